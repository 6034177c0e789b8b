"""The small shared thread pool that moves bytes (os.pwritev/preadv and zlib.crc32 release the
GIL, so a few threads keep the disk and both cores busy)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

T = TypeVar("T")

BATCH_BYTES = 16 << 20  # one pwritev/preadv call moves at most this much
MAX_IOV = 512  # below IOV_MAX (1024 on Linux)
# One pwritev call writes at most this much (see pwritev_all): Linux sizes new page-cache
# folios by the write, and on this machine (6.18, ext4 large folios) writes of 2 MiB or more
# became ~10x slower once earlier checkpoints filled the page cache: 40 MiB into a new file in
# one call 210-260 ms, in 1 MiB calls 28 ms (median of 5; 17 ms either way into just-freed
# memory). That was most of a distributed save with its previous checkpoints kept.
WRITE_CALL_BYTES = 1 << 20

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(2, min(8, 2 * (os.cpu_count() or 1))), thread_name_prefix="ckptproto-io"
            )
        return _pool


def _forget_pool_after_fork() -> None:
    # The child inherits the pool object but none of its threads: work submitted there would
    # wait forever. It gets a fresh pool on first use.
    global _lock, _pool
    _lock = threading.Lock()
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def gather(futures: list[Future[Any]]) -> list[Any]:
    """Results in order; waits for every future before raising the first error, so no worker
    still touches a file descriptor the caller is about to close."""
    wait(futures)
    return [f.result() for f in futures]


# in_two splits work of at least this many items (a few ms of torch's C++ at ~2 us an item;
# a pool thread's hand-off is ~0.1 ms).
TWO_CORES_FROM = 4096


def in_two(work: Callable[[int, int], list[T]], count: int) -> list[T]:
    """``work(0, count)``, as ``work(0, half) + work(half, count)``: the first half handed to
    the I/O pool while this thread does the second, when ``count`` is at least TWO_CORES_FROM.
    For torch calls that release the GIL and cost a microsecond or two per item (a tensor made
    or copied in C++): a load of many small tensors builds them on both cores. A first half no
    pool thread has taken by then (all busy writing, or waiting like this one on a pool
    thread) is taken back and done here: the pool never holds this thread up. A pool thread
    has none of the caller's thread-local torch modes (grad, inference): a torch caller sets
    them in each part (``bulkread._in_two_as_caller``)::

        in_two(lambda a, b: torch.split_with_sizes_copy(flat[starts[a]:starts[b]], numels[a:b]), len(numels))
    """
    if count < TWO_CORES_FROM:
        return work(0, count)
    half = count // 2
    first = pool().submit(work, 0, half)
    try:
        second = work(half, count)
    except BaseException:
        first.cancel()
        wait([first])  # a first half under way ends before the error is raised
        raise
    if first.cancel():
        return work(0, half) + second
    return first.result() + second


def batches(
    ranges: list[tuple[int, memoryview]], limit: int | None = None
) -> list[tuple[int, list[memoryview]]]:
    """Group ``(offset, view)`` ranges sorted by offset into runs of adjacent bytes of at most
    ``limit`` (default BATCH_BYTES), splitting views larger than that."""
    limit = limit or BATCH_BYTES
    out: list[tuple[int, list[memoryview]]] = []
    views: list[memoryview] = []
    start, size, end = 0, 0, -1
    for offset, view in ranges:
        for pos in range(0, len(view), limit):
            piece = view[pos : pos + limit]
            at = offset + pos
            if views and (at != end or size + len(piece) > limit or len(views) >= MAX_IOV):
                out.append((start, views))
                views, size = [], 0
            if not views:
                start = at
            views.append(piece)
            size += len(piece)
            end = at + len(piece)
    if views:
        out.append((start, views))
    return out


def _load_sync_file_range() -> Any:
    name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(name, use_errno=True), "sync_file_range", None) if name else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range to disk now (Linux ``sync_file_range``), so the
    final fsync waits for less; measured here: durable 512 MiB write 0.45 s -> 0.28 s.
    A no-op where unavailable; fsync remains the durability guarantee."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Write every byte of ``views`` at ``offset`` (pwritev may write less than asked), at
    most ``WRITE_CALL_BYTES`` a call."""
    pending = [v for v in views if len(v)]
    while pending:
        call: list[memoryview] = []
        size = 0
        for view in pending:
            if size >= WRITE_CALL_BYTES or len(call) >= MAX_IOV:
                break
            call.append(view[: WRITE_CALL_BYTES - size])
            size += len(call[-1])
        n = os.pwritev(fd, call, offset)
        if n <= 0:
            raise OSError(f"pwritev wrote {n} bytes")
        offset += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]


def preadv_all(fd: int, views: list[memoryview], offset: int) -> int:
    """Fill ``views`` from ``offset``; returns the bytes read (less only at end of file)."""
    pending = [v for v in views if len(v)]
    total = 0
    while pending:
        n = os.preadv(fd, pending, offset)
        if n <= 0:
            break
        offset += n
        total += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]
    return total
