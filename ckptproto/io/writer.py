"""Executing a FilePlan: tensor bytes go from memory to disk without intermediate copies."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

from ckptproto.errors import CheckpointWriteError
from ckptproto.format.crc import crc32_combine, format_checksum
from ckptproto.format.manifest import FileEntry
from ckptproto.io import threads
from ckptproto.io.plan import FilePlan


def _write_batch(fd: int, offset: int, views: list[memoryview]) -> tuple[int, int]:
    threads.pwritev_all(fd, views, offset)
    threads.start_writeback(fd, offset, sum(len(v) for v in views))
    crc = 0
    for view in views:
        crc = zlib.crc32(view, crc)
    return crc, sum(len(v) for v in views)


def write_file(directory: Path, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
    """Write one data file of ``plan`` into ``directory`` and fsync it. ``sources[i]`` holds the
    bytes of the piece whose ``source`` is ``i``. Returns its manifest entry (size, CRC)."""
    path = directory / plan.name
    ranges = []
    for placement in plan.placements:
        view = sources[placement.piece.source]
        if len(view) != placement.piece.nbytes:
            raise CheckpointWriteError(
                f"{path}: {placement.piece.key} has {len(view)} bytes, planned {placement.piece.nbytes}"
            )
        ranges.append((placement.begin, view))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot create {path}: {exc}") from exc
    try:
        threads.pwritev_all(fd, [memoryview(plan.header)], 0)
        pool = threads.pool()
        futures = [pool.submit(_write_batch, fd, at, views) for at, views in threads.batches(ranges)]
        crc = zlib.crc32(plan.header)
        for batch_crc, length in threads.gather(futures):
            crc = crc32_combine(crc, batch_crc, length)
        os.fsync(fd)
    except OSError as exc:
        raise CheckpointWriteError(f"writing {path} failed: {exc}") from exc
    finally:
        os.close(fd)
    return FileEntry(plan.size, format_checksum(crc), plan.rank)


def write_small_file(directory: Path, name: str, data: bytes) -> None:
    """Write and fsync a small file (the manifest) in one go."""
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            threads.pwritev_all(fd, [memoryview(data)], 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointWriteError(f"writing {path} failed: {exc}") from exc
