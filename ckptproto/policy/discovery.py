"""find_checkpoints: the committed checkpoints under a directory, read from their manifests."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from ckptproto.errors import CheckpointError
from ckptproto.format import layout
from ckptproto.format.info import CheckpointInfo
from ckptproto.io.sync import read_info
from ckptproto.location import Location

logger = logging.getLogger("ckptproto.policy")

PathLike = str | os.PathLike[str]


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


def record_from_info(info: CheckpointInfo, monitor: str | None = None) -> CheckpointRecord:
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


def scan(checkpoint_dir: PathLike, monitor: str | None = None) -> tuple[list[CheckpointRecord], list[str]]:
    """Every readable checkpoint directly under ``checkpoint_dir`` (unordered), and a line per
    non-hidden directory whose manifest could not be read."""
    root = Path(checkpoint_dir)
    records: list[CheckpointRecord] = []
    problems: list[str] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return [], []
    for entry in entries:
        if layout.is_hidden(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        path = root / entry.name
        if not (path / layout.MANIFEST_NAME).exists():
            problems.append(f"{path}: no manifest (not a checkpoint, or an unfinished one)")
            continue
        try:
            records.append(record_from_info(read_info(path), monitor))
        except CheckpointError as exc:
            problems.append(str(exc))
    return records, problems


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip
_PICKLE_MAGIC = b"\x80"  # torch.save's legacy pickle (protocol 2+)


def foreign_checkpoints(checkpoint_dir: PathLike) -> list[Path]:
    """Entries directly under ``checkpoint_dir`` that look like checkpoints of another format,
    which ckptproto cannot resume from without ``ckptproto convert``: DCP directories (Dream
    Trainer's and torchtitan's too; a ``.metadata`` file), ``torch.save`` files (zip or
    pickle) and safetensors files."""
    root = Path(checkpoint_dir)
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        if layout.is_hidden(entry.name):
            continue
        path = root / entry.name
        if entry.is_dir(follow_symlinks=False):
            if (path / ".metadata").is_file() and not (path / layout.MANIFEST_NAME).exists():
                found.append(path)
        elif entry.is_file(follow_symlinks=False):
            try:
                with open(path, "rb") as f:
                    head = f.read(9)
            except OSError:
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
    checkpoint_dir: PathLike,
    mode: Literal["latest", "best"] = "latest",
    *,
    monitor: str | None = None,
    metric_mode: Literal["min", "max"] | None = None,
) -> list[CheckpointRecord]:
    """The committed checkpoints under ``checkpoint_dir``, read from their manifests (names
    do not matter), newest first (``mode="latest"``) or best first (``mode="best"``)::

        for ckpt in find_checkpoints(checkpoint_dir="./checkpoints", mode="best"):
            print(f"Step: {ckpt.step}, Metric: {ckpt.metric}")

    ``monitor``/``metric_mode`` default to what the saving callback recorded in each manifest.
    Directories whose manifest cannot be read are skipped and logged as warnings.
    """
    records, problems = scan(checkpoint_dir, monitor)
    for problem in problems:
        logger.warning("skipping %s", problem)
    return order(records, mode, metric_mode)
