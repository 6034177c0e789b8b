"""find_checkpoints: the committed checkpoints under a directory, read from their manifests."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from ckptproto.errors import CheckpointError
from ckptproto.format import layout
from ckptproto.format.info import CheckpointInfo
from ckptproto.io.sync import read_info
from ckptproto.location import Location
from ckptproto.policy.locations import LocationLike, as_arg, resolve

logger = logging.getLogger("ckptproto.policy")


@dataclass(frozen=True)
class CheckpointRecord:
    """One committed checkpoint as its manifest describes it.

    ``metric`` is the value of ``monitor`` (the metric the saving callback ranked by, unless
    ``find_checkpoints`` was given another), or None.
    """

    path: Location
    step: int | None
    epoch: int | None
    metric: float | None
    monitor: str | None
    metrics: dict[str, Any] = field(default_factory=dict)
    created: datetime | None = None
    nbytes: int = 0
    run_id: str | None = None
    info: CheckpointInfo | None = None

    @property
    def name(self) -> str:
        return self.path.name


def is_finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _finite(value: float | None) -> float:
    assert value is not None
    return value


def record_from_info(
    info: CheckpointInfo, monitor: str | None = None, path: Location | None = None
) -> CheckpointRecord:
    """The record of the checkpoint ``info`` describes, at ``path`` (default ``info.path``)."""
    if path is not None:
        info = dataclasses.replace(info, path=path)
    meta_monitor = info.metadata.get("monitor")
    name = monitor if monitor is not None else (meta_monitor if isinstance(meta_monitor, str) else None)
    run_id = info.metadata.get("run_id")
    return CheckpointRecord(
        path=info.path,
        step=info.step,
        epoch=info.epoch,
        metric=info.metric(name),
        monitor=name,
        metrics=dict(info.metrics),
        created=info.created,
        nbytes=info.nbytes,
        run_id=run_id if isinstance(run_id, str) else None,
        info=info,
    )


def scan(
    checkpoint_dir: LocationLike, monitor: str | None = None
) -> tuple[list[CheckpointRecord], list[str]]:
    """Every readable checkpoint directly under ``checkpoint_dir`` (a path or an object-store
    URL; unordered), and a line per non-hidden directory whose manifest could not be read."""
    storage, root = resolve(checkpoint_dir)
    records: list[CheckpointRecord] = []
    problems: list[str] = []
    for entry in storage.entries(root):
        if layout.is_hidden(entry.name) or not entry.is_dir:
            continue
        path = root / entry.name
        if not storage.exists(path / layout.MANIFEST_NAME):
            problems.append(f"{path}: no manifest (not a checkpoint, or an unfinished one)")
            continue
        try:
            records.append(record_from_info(read_info(as_arg(path)), monitor, path))
        except CheckpointError as exc:
            problems.append(str(exc))
    return records, problems


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy pickle (protocol 2+)


def foreign_checkpoints(checkpoint_dir: LocationLike) -> list[Location]:
    """Entries directly under ``checkpoint_dir`` that look like checkpoints of another format,
    which ckptproto cannot resume from without ``ckptproto convert``: DCP directories (Dream
    Trainer's and torchtitan's too; a ``.metadata`` file), ``torch.save`` files (zip or
    pickle) and safetensors files."""
    storage, root = resolve(checkpoint_dir)
    found: list[Location] = []
    for entry in storage.entries(root):
        if layout.is_hidden(entry.name):
            continue
        path = root / entry.name
        if entry.is_dir:
            if storage.exists(path / ".metadata") and not storage.exists(path / layout.MANIFEST_NAME):
                found.append(path)
            continue
        try:
            head = storage.read_head(path, 9)
        except (OSError, CheckpointError):  # unreadable, or not a regular file: not sniffed
            continue
        safetensors = len(head) == 9 and head[8:9] == b"{"
        if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_MAGIC) or safetensors:
            found.append(path)
    return found


def order(
    records: list[CheckpointRecord], mode: Literal["latest", "best"], metric_mode: str | None = None
) -> list[CheckpointRecord]:
    """Newest first (by step, then creation time) for "latest"; best metric first for "best"
    (the oldest first among equal ones; records without a finite metric follow, newest
    first)."""
    by_time = sorted(
        records,
        key=lambda r: (r.step if r.step is not None else -1, r.created.timestamp() if r.created else 0.0),
        reverse=True,
    )
    if mode == "latest":
        return by_time
    if mode != "best":
        raise ValueError(f"mode must be 'latest' or 'best', got {mode!r}")
    # among equal metrics the oldest first: it reached that value first, and retention keeps
    # the older of two equal checkpoints too
    ranked = [r for r in reversed(by_time) if is_finite(r.metric)]
    unranked = [r for r in by_time if not is_finite(r.metric)]

    def direction(r: CheckpointRecord) -> str:
        if metric_mode is not None:
            return metric_mode
        meta_mode = r.info.metadata.get("mode") if r.info else None
        return meta_mode if meta_mode in ("min", "max") else "min"

    ranked.sort(key=lambda r: _finite(r.metric) if direction(r) == "min" else -_finite(r.metric))
    return ranked + unranked


def find_checkpoints(
    checkpoint_dir: LocationLike,
    mode: Literal["latest", "best"] = "latest",
    *,
    monitor: str | None = None,
    metric_mode: Literal["min", "max"] | None = None,
) -> list[CheckpointRecord]:
    """The committed checkpoints under ``checkpoint_dir``, read from their manifests (names
    do not matter), newest first (``mode="latest"``) or best first (``mode="best"``)::

        for ckpt in find_checkpoints(checkpoint_dir="./checkpoints", mode="best"):
            print(f"Step: {ckpt.step}, Metric: {ckpt.metric}")
        latest = find_checkpoints("s3://bucket/run")[0].path    # an object store alike

    ``monitor``/``metric_mode`` default to what the saving callback recorded in each manifest.
    Directories whose manifest cannot be read are skipped and logged as warnings.
    """
    records, problems = scan(checkpoint_dir, monitor)
    for problem in problems:
        logger.warning("skipping %s", problem)
    return order(records, mode, metric_mode)
