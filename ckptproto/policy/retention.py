"""Which checkpoints to keep (pure), and the one safe way to delete one."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ckptproto.errors import CheckpointError
from ckptproto.format import layout
from ckptproto.io.sync import read_info
from ckptproto.policy.discovery import is_finite
from ckptproto.policy.locations import Location, LocationLike, as_arg, resolve

logger = logging.getLogger("ckptproto.policy")


@dataclass(frozen=True)
class Kept:
    """A committed checkpoint of this run, as the callback remembers it (``seq``: save order)."""

    name: str
    step: int
    epoch: int
    metric: float | None
    seq: int

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: Any) -> Kept:
        metric = state.get("metric")
        return cls(
            name=str(state["name"]),
            step=int(state["step"]),
            epoch=int(state["epoch"]),
            metric=float(metric) if metric is not None else None,
            seq=int(state["seq"]),
        )


def select_kept(
    records: Sequence[Kept], *, keep_top_k: int, mode: str, monitored: bool, save_last: bool
) -> set[str]:
    """Names to keep: the ``keep_top_k`` best by metric (finite metrics only; nan/inf and
    None never rank; among equal ones the oldest) or, without a monitor, the newest; plus the
    most recent one with ``save_last``.

    >>> a, b = Kept("a", 1, 0, 0.5, 0), Kept("b", 2, 0, float("nan"), 1)
    >>> sorted(select_kept([a, b], keep_top_k=1, mode="min", monitored=True, save_last=False))
    ['a']
    """
    if keep_top_k == -1:
        return {r.name for r in records}
    newest = sorted(records, key=lambda r: (r.step, r.seq), reverse=True)
    if monitored:
        ranked = sorted((r for r in records if is_finite(r.metric)), key=lambda r: r.seq)
        sign = 1.0 if mode == "min" else -1.0
        # stable sort over oldest-first: among equal metrics the oldest stays, as a save
        # only enters the top k by beating the worst kept value (Lightning does the same)
        ranked.sort(key=lambda r: sign * r.metric)  # type: ignore[operator]
        keep = {r.name for r in ranked[:keep_top_k]}
    else:
        keep = {r.name for r in newest[:keep_top_k]}
    if save_last and newest:
        keep.add(max(records, key=lambda r: r.seq).name)
    return keep


def owned_by(path: LocationLike, run_id: str) -> bool:
    """True if ``path`` is a committed checkpoint whose manifest names this run."""
    storage, location = resolve(path)
    if not storage.is_committed(location):
        return False
    try:
        return read_info(as_arg(location)).metadata.get("run_id") == run_id
    except CheckpointError:
        return False


def delete_checkpoint(root: LocationLike, name: str, run_id: str) -> bool:
    """Delete ``root/name`` if, and only if, it is a committed checkpoint of run ``run_id``
    (``root`` a path or an object-store URL).

    The storage removes it so that it stops being a checkpoint first (locally: renamed to a
    hidden name, atomically), then its files go, so a crash mid-delete never leaves a
    half-deleted directory that looks like a checkpoint. A symbolic link is never followed.
    """
    if not name or name != Path(name).name or layout.is_hidden(name):
        return False
    storage, base = resolve(root)
    path: Location = base / name
    if (isinstance(path, Path) and path.is_symlink()) or not owned_by(path, run_id):
        logger.warning("not deleting %s: not a committed checkpoint of this run", path)
        return False
    try:
        storage.remove(path)
    except (OSError, CheckpointError) as exc:
        logger.warning("cannot delete checkpoint %s: %s", path, exc)
        return False
    logger.info("deleted checkpoint %s", path)
    return True


def applies_retention() -> bool:
    """Whether this process deletes checkpoints: rank 0 when ``torch.distributed`` is
    initialised (every rank saves, one decides what to delete), always otherwise."""
    import sys

    dist = getattr(sys.modules.get("torch"), "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return True
    return int(dist.get_rank()) == 0
