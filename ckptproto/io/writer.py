"""Executing a FilePlan: tensor bytes go from memory to disk without intermediate copies."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ckptproto.errors import CheckpointWriteError
from ckptproto.format.crc import crc32, crc32_combine, format_checksum
from ckptproto.format.manifest import FileEntry
from ckptproto.io import threads
from ckptproto.io.dirs import fsync_dir, together
from ckptproto.io.plan import FilePlan


def _write_batch(fd: int, offset: int, views: list[memoryview]) -> tuple[int, int]:
    threads.pwritev_all(fd, views, offset)
    threads.start_writeback(fd, offset, sum(len(v) for v in views))
    return crc_of(views)


def crc_of(views: Sequence[memoryview]) -> tuple[int, int]:
    """CRC-32 and length of the bytes of ``views`` one after another (``format.crc.crc32``:
    ISA-L where installed, else zlib; both release the GIL on large buffers, so
    callers run this on pool threads, one range each, and combine with :func:`file_entry`)."""
    crc = 0
    for view in views:
        crc = crc32(view, crc)
    return crc, sum(len(v) for v in views)


def piece_ranges(plan: FilePlan, sources: Sequence[memoryview], where: str) -> list[tuple[int, memoryview]]:
    """``(offset in the file, bytes)`` of every piece of ``plan``, sorted by offset, each
    checked against its planned size (every backend writes a FilePlan from these)."""
    ranges = []
    for placement in plan.placements:
        view = sources[placement.piece.source]
        if len(view) != placement.piece.nbytes:
            raise CheckpointWriteError(
                f"{where}: {placement.piece.key} has {len(view)} bytes, planned {placement.piece.nbytes}"
            )
        ranges.append((placement.begin, view))
    ranges.sort(key=lambda r: r[0])
    return ranges


def file_entry(plan: FilePlan, parts: Iterable[tuple[int, int]]) -> FileEntry:
    """The manifest entry of a written file from the ``(crc, length)`` of its consecutive
    parts, header first, in file order."""
    crc, total = 0, 0
    for part_crc, length in parts:
        crc = crc32_combine(crc, part_crc, length)
        total += length
    if total != plan.size:
        raise CheckpointWriteError(f"{plan.name}: {total} bytes written, planned {plan.size}")
    return FileEntry(plan.size, format_checksum(crc), plan.rank)


def write_file(directory: Path, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
    """Write one data file of ``plan`` into ``directory`` and fsync it. ``sources[i]`` holds the
    bytes of the piece whose ``source`` is ``i``. Returns its manifest entry (size, CRC)."""
    path = directory / plan.name
    ranges = piece_ranges(plan, sources, str(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot create {path}: {exc}") from exc
    try:
        threads.pwritev_all(fd, [memoryview(plan.header)], 0)
        pool = threads.pool()
        futures = [pool.submit(_write_batch, fd, at, views) for at, views in threads.batches(ranges)]
        parts = [crc_of([memoryview(plan.header)]), *threads.gather(futures)]
        os.fsync(fd)
    except OSError as exc:
        raise CheckpointWriteError(f"writing {path} failed: {exc}") from exc
    finally:
        os.close(fd)
    return file_entry(plan, parts)


def write_small_file(directory: Path, name: str, data: bytes) -> None:
    """Write a small file (the manifest) in one go and make it durable, its entry in
    ``directory`` too: the file and the directory are fsynced at the same time, both done
    when this returns::

        write_small_file(temp, "manifest.json", data)
    """
    path = directory / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            threads.pwritev_all(fd, [memoryview(data)], 0)
            together(lambda: os.fsync(fd), lambda: fsync_dir(directory))
        finally:
            os.close(fd)
    except OSError as exc:
        raise CheckpointWriteError(f"writing {path} failed: {exc}") from exc
