"""Executing a FilePlan: tensor bytes go from memory to disk without intermediate copies."""

from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate, compress, count
from pathlib import Path

from ckptproto.arrays import HostRanges
from ckptproto.errors import CheckpointWriteError
from ckptproto.format.crc import crc32, crc32_combine, format_checksum
from ckptproto.format.manifest import FileEntry
from ckptproto.io import threads
from ckptproto.io.direct import DirectFile
from ckptproto.io.dirs import fsync_dir, together
from ckptproto.io.plan import FilePlan


def _write_batch(
    fd: int, offset: int, views: Sequence[memoryview], direct: DirectFile | None
) -> tuple[int, int]:
    views = _joined_if_small(views)
    if direct is None or not direct.write(fd, offset, views):
        threads.pwritev_all(fd, views, offset)
        threads.start_writeback(fd, offset, sum(len(v) for v in views))
    return crc_of(views)


# Pieces smaller than this are joined into one buffer before they are written (see
# :func:`file_batches`); larger ones are written straight from their memory.
JOIN_BYTES = 64 << 10


def _joined_if_small(views: Sequence[memoryview]) -> list[memoryview]:
    """Small pieces (a state of many small tensors) as one buffer: one copy, one write, one
    CRC instead of a Python call per piece (the join releases the GIL past 1 MiB)."""
    if len(views) > 1:
        if isinstance(views, HostRanges):  # ranges of memory: joined without a view each
            if views.nbytes < JOIN_BYTES * len(views):
                return [views.joined().data]
        elif sum(map(len, views)) < JOIN_BYTES * len(views):
            return [memoryview(b"".join(views))]
    return list(views)


def crc_of(views: Sequence[memoryview]) -> tuple[int, int]:
    """CRC-32 and length of the bytes of ``views`` one after another (``format.crc.crc32``:
    ISA-L where installed, else zlib; both release the GIL on large buffers, so
    callers run this on pool threads, one range each, and combine with :func:`file_entry`)."""
    crc = 0
    for view in views:
        crc = crc32(view, crc)
    return crc, sum(len(v) for v in views)


def file_views(plan: FilePlan, sources: Sequence[memoryview], where: str) -> Sequence[memoryview]:
    """The bytes of every piece of ``plan`` in file order (``plan.begins``), each checked
    against its planned size."""
    views: Sequence[memoryview]
    if isinstance(sources, HostRanges):
        views = sources.take(plan.order)
        sizes = views.sizes.tolist()
    else:
        views = list(map(sources.__getitem__, plan.order))
        sizes = list(map(len, views))
    if sizes != plan.sizes:
        for view, piece in zip(views, plan.pieces, strict=True):
            if len(view) != piece.nbytes:
                raise CheckpointWriteError(
                    f"{where}: {piece.key} has {len(view)} bytes, planned {piece.nbytes}"
                )
    return views


def piece_ranges(plan: FilePlan, sources: Sequence[memoryview], where: str) -> list[tuple[int, memoryview]]:
    """``(offset in the file, bytes)`` of every piece of ``plan``, sorted by offset, each
    checked against its planned size (every backend writes a FilePlan from these)."""
    return list(zip(plan.begins, file_views(plan, sources, where), strict=True))


def file_batches(plan: FilePlan, views: Sequence[memoryview]) -> list[tuple[int, Sequence[memoryview]]]:
    """:func:`threads.batches` of ``views`` (from :func:`file_views`: they tile the file after
    the header), without a Python step per small piece: a run of pieces under JOIN_BYTES is
    cut by cumulative size into batches of at most BATCH_BYTES (which ``_write_batch`` joins);
    a run of larger pieces goes through ``threads.batches``, which also splits what exceeds a
    batch."""
    sizes, limit = plan.sizes, threads.BATCH_BYTES
    ends = list(accumulate(sizes, initial=0))
    start = len(plan.header)
    out: list[tuple[int, Sequence[memoryview]]] = []
    large = list(compress(count(), map(JOIN_BYTES.__le__, sizes)))  # in C: a state of small pieces has none
    i = 0
    for a, b in _runs(large, len(views)):
        while i < a:  # small pieces i..a-1
            j = max(i + 1, bisect_right(ends, ends[i] + limit, i + 1, a + 1) - 1)
            out.append((start + ends[i], views[i:j]))
            i = j
        out += threads.batches([(start + ends[k], views[k]) for k in range(a, b)])
        i = b
    return out


def _runs(indices: list[int], count: int) -> list[tuple[int, int]]:
    """Runs ``[a, b)`` of consecutive ``indices`` (sorted), then an empty run at ``count``."""
    runs: list[tuple[int, int]] = []
    for k in indices:
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    runs.append((count, count))
    return runs


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
    views = file_views(plan, sources, str(path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot create {path}: {exc}") from exc
    direct = DirectFile.open(path, plan.size)  # async saves' large files: past the page cache
    try:
        threads.pwritev_all(fd, [memoryview(plan.header)], 0)
        pool = threads.pool()
        futures = [
            pool.submit(_write_batch, fd, at, batch, direct) for at, batch in file_batches(plan, views)
        ]
        parts = [crc_of([memoryview(plan.header)]), *threads.gather(futures)]
        os.fsync(fd)  # the file's size, its new blocks and the device's cache, however written
    except OSError as exc:
        raise CheckpointWriteError(f"writing {path} failed: {exc}") from exc
    finally:
        if direct is not None:
            direct.close()
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
