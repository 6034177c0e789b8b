"""Large byte ranges written past the page cache (``O_DIRECT``): from the tensors' own memory
where it lies as the file does, else through a page-aligned bounce buffer of each I/O thread.

A buffered write copies every byte into the page cache, whose pages the kernel must first
find, often by reclaiming older ones (earlier checkpoints); the copy and that work are CPU
time, and when the save is async they are taken from the training loop beside it. A direct
write needs its memory, file offset and length aligned to a page. A staging slab starts on a
page (io/staging_pool.py) and a data file's buffer of 4 MiB or more does too
(``safetensors.buffer_align``), so a staged tensor usually sits at the offset in its page
that it has in the file, and its page-aligned part is written from the slab as it is: no CPU
copy at all. Pieces that do not (a file whose tensors' sizes are not multiples of 64 bytes,
or ordered apart from the slab) go through the bounce buffer: one copy into memory that is
already there. On the 2-core VM, 512 MiB written durably took 0.17-1.96 s of CPU buffered
(the high end with the page cache full), ~0.11 s through the bounce buffer and ~0.04 s from
the tensors' memory; an async save of it (``writer="thread"``, staging included) 0.16 s of
CPU and 0.41-0.44 s against 0.26-0.28 s and 0.54-0.61 s through the bounce buffer. A blocking
``save()`` writes buffered: its sources are the caller's tensors, which torch places 64 bytes
into a page (so through the bounce buffer), and a buffered write into free page cache
finished first there (0.29-0.30 s against 0.37-0.52 s), leaving the bytes cached for a load
that follows. So async saves write direct (the writer process and the async saver's writer
thread: :func:`prefer`), unless ``CKPTPROTO_DIRECT_IO`` says otherwise. Durability is the same
either way: the file is fsynced (its size, its new blocks, the device's cache). An I/O thread
that has bounced a write keeps its buffer (``BOUNCE_BYTES``) for the next save.

Only the page-aligned interior of a range goes direct; the bytes before its first boundary and
after its last go through the buffered descriptor, so no page is written both ways. Where the
file system cannot (tmpfs and ramfs hold files in the page cache: a copy more and nothing
saved) or refuses an aligned write (``EINVAL``, ``EOPNOTSUPP``, or ``EFAULT`` from memory
it cannot take directly), the range is written buffered as before::

    direct = DirectFile.open(path, size)       # None: write buffered
    if direct is None or not direct.write(fd, offset, views):
        threads.pwritev_all(fd, views, offset)
    ...
    direct.close()
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ckptproto.format import safetensors
from ckptproto.io import threads

# File offsets, lengths and buffer addresses: a page, which every device accepts, and the one
# data files' buffers and staging slabs start on.
ALIGN = safetensors.PAGE
MIN_BYTES = 4 << 20  # ranges from this size go direct: below it the page cache costs less
BOUNCE_BYTES = 8 << 20  # each I/O thread's aligned buffer (anonymous memory: page-aligned)
# "1": every data file of MIN_BYTES or more goes direct, "0": none (a file system that
# mishandles O_DIRECT); unset: the files of a process that called prefer() (the async writer).
ENV = "CKPTPROTO_DIRECT_IO"
_IN_MEMORY = {0x01021994, 0x858458F6}  # TMPFS_MAGIC, RAMFS_MAGIC (statfs f_type)

_local = threading.local()
_preferred = False


def prefer(*, thread: bool = False) -> None:
    """Write the large data files this process opens from now on direct (unless
    ``CKPTPROTO_DIRECT_IO`` says otherwise); ``thread``: only those this thread opens. The
    async writer process and the async saver's writer thread do, as their CPU is taken from
    the training loop beside them, and a buffered write's is several times a direct one's
    (``bench_async.py``, 512 MiB: the loop's own CPU +145 ms buffered, -7 ms direct). A
    blocking ``save()`` does not: its caller waits for the wall time alone, and on the 2-core
    VM a buffered write into free page cache finished first (512 MiB durable in ~0.29 s against
    ~0.37-0.45 s direct), and left the bytes in the page cache for a load that follows::

        direct.prefer(thread=True)   # the async saver's writer thread, once
    """
    global _preferred
    if thread:
        _local.preferred = True
    else:
        _preferred = True


class DirectFile:
    """The ``O_DIRECT`` descriptor of one data file being written, shared by the I/O threads."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refused = False  # an aligned write was refused (EINVAL): the rest goes buffered

    @classmethod
    def open(cls, path: Path, size: int) -> DirectFile | None:
        """A second descriptor of ``path`` (created already) that bypasses the page cache;
        None where it is not wanted (:func:`prefer`, ``CKPTPROTO_DIRECT_IO``), gains nothing
        or cannot be had: a file under ``MIN_BYTES``, no ``O_DIRECT`` on the platform, a file
        system held in memory, an open that fails."""
        flag = getattr(os, "O_DIRECT", 0)
        preferred = _preferred or getattr(_local, "preferred", False)
        wanted = os.environ.get(ENV, "1" if preferred else "0") == "1"
        if not flag or not wanted or size < MIN_BYTES or _in_memory(path):
            return None
        try:
            return cls(os.open(path, os.O_WRONLY | os.O_CLOEXEC | flag))
        except OSError:
            return None

    def close(self) -> None:
        os.close(self.fd)

    def write(self, fd: int, offset: int, views: Sequence[memoryview]) -> bool:
        """Write the bytes of ``views`` (byte views, one after another) at ``offset``: the
        aligned interior through this descriptor, the unaligned ends through ``fd``. False,
        with nothing written, for a range under ``MIN_BYTES`` or once this file refused an
        aligned write (the caller then writes the range buffered: a range refused halfway is
        written whole again, the same bytes over the same places)."""
        total = sum(map(len, views))
        if total < MIN_BYTES or self.refused:
            return False
        begin, end = -(-offset // ALIGN) * ALIGN, (offset + total) // ALIGN * ALIGN
        try:
            self._interior(views, begin - offset, end - offset, offset)
        except OSError as exc:
            # (EFAULT: memory the device cannot take straight from, e.g. managed memory, in a
            # write from a piece's own memory; the buffered write that follows then copies it,
            # and fails in turn if the memory is really unreadable.)
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EFAULT):
                raise
            self.refused = True
            return False
        threads.pwritev_all(fd, _slice(views, 0, begin - offset), offset)
        threads.pwritev_all(fd, _slice(views, end - offset, total), end)
        return True

    def _interior(self, views: Sequence[memoryview], start: int, stop: int, offset: int) -> None:
        """Bytes ``start:stop`` of ``views`` (a range written at file offset ``offset``; both
        ``offset + start`` and ``offset + stop`` aligned): every part of a piece that lies at
        the same page offset in memory as in the file (a tensor of a page-aligned staging
        buffer, in a file whose buffer starts at a page: ``safetensors.buffer_align``) is
        written from where it is, the rest through the bounce buffer."""
        pos = start
        for begin, end, view in _in_place(views, start, stop, offset):
            self._bounced(views, pos, begin, offset + pos)
            self._pwrite(view, offset + begin)
            pos = end
        self._bounced(views, pos, stop, offset + pos)

    def _bounced(self, views: Sequence[memoryview], start: int, stop: int, at: int) -> None:
        """Bytes ``start:stop`` of ``views`` to file offset ``at`` (all aligned), a bounce
        buffer at a time: numpy's copy and ``os.pwrite`` both release the GIL."""
        if start >= stop:
            return
        bounce, raw = _bounce()
        while start < stop:
            n = min(BOUNCE_BYTES, stop - start)
            filled = 0
            for view in _slice(views, start, start + n):
                np.copyto(bounce[filled : filled + len(view)], np.frombuffer(view, dtype=np.uint8))
                filled += len(view)
            self._pwrite(raw[:n], at)
            start, at = start + n, at + n

    def _pwrite(self, data: memoryview, at: int) -> None:
        """All of ``data`` (aligned in memory, in length and at ``at``) through this descriptor."""
        done = 0
        while done < len(data):
            wrote = os.pwrite(self.fd, data[done:], at + done)
            if wrote <= 0:
                raise OSError(f"pwrite wrote {wrote} bytes")
            done += wrote


# A piece's aligned part is written from its own memory from this size (smaller ones go
# through the bounce buffer with their neighbours: one write instead of several).
IN_PLACE_MIN = 16 * ALIGN


def _in_place(
    views: Sequence[memoryview], start: int, stop: int, offset: int
) -> list[tuple[int, int, memoryview]]:
    """``(begin, end, bytes)``, by position in ``views`` from ``start`` to ``stop`` (the range
    at file offset ``offset``), of the page-aligned parts of pieces whose memory has their
    file offset's place in a page: those ``O_DIRECT`` can write as they are. In order, apart."""
    out: list[tuple[int, int, memoryview]] = []
    pos = 0
    for view in views:
        end = pos + len(view)
        lo, hi = max(pos, start), min(end, stop)
        if hi - lo >= IN_PLACE_MIN:
            address = np.frombuffer(view, dtype=np.uint8).ctypes.data + (lo - pos)
            if (address - (offset + lo)) % ALIGN == 0:
                begin = -(-(offset + lo) // ALIGN) * ALIGN - offset
                finish = (offset + hi) // ALIGN * ALIGN - offset
                if finish - begin >= IN_PLACE_MIN:
                    out.append((begin, finish, view[begin - pos : finish - pos]))
        pos = end
        if pos >= stop:
            break
    return out


def _slice(views: Sequence[memoryview], start: int, stop: int) -> list[memoryview]:
    """Bytes ``start:stop`` of ``views`` taken one after another, as views of them."""
    out: list[memoryview] = []
    pos = 0
    for view in views:
        end = pos + len(view)
        if end > start and pos < stop:
            out.append(view[max(start - pos, 0) : min(stop, end) - pos])
        pos = end
        if pos >= stop:
            break
    return out


def _bounce() -> tuple[np.ndarray, memoryview]:
    """This thread's aligned buffer, as an array (to copy into) and a view (to write from)."""
    found: tuple[np.ndarray, memoryview] | None = getattr(_local, "bounce", None)
    if found is None:
        buffer = mmap.mmap(-1, BOUNCE_BYTES)
        found = _local.bounce = (np.frombuffer(buffer, dtype=np.uint8), memoryview(buffer))
    return found


def _load_statfs() -> Any:
    name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(name, use_errno=True), "statfs", None) if name else None
    if fn is not None:
        fn.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    return fn


_statfs = _load_statfs() if sys.platform.startswith("linux") else None


def _in_memory(path: Path) -> bool:
    """Whether ``path`` lies on tmpfs or ramfs (Linux ``statfs``: ``f_type`` is the struct's
    first member, a C long); False where that cannot be told."""
    if _statfs is None:
        return False
    buffer = ctypes.create_string_buffer(512)  # larger than struct statfs on every Linux ABI
    if _statfs(os.fsencode(path), buffer) != 0:
        return False
    f_type = int.from_bytes(buffer.raw[: ctypes.sizeof(ctypes.c_long)], sys.byteorder, signed=True)
    return (f_type & 0xFFFFFFFF) in _IN_MEMORY
