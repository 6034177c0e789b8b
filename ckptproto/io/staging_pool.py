"""The staging pool: reusable host buffers ("slabs") an async save copies tensors into.

Allocating (and first-touch faulting) a gigabyte costs more than copying it, and pinned memory
for CUDA tensors is far slower still to allocate, so slabs are kept and reused from save to
save::

    pool = StagingPool()
    slab = pool.acquire(1 << 20, pinned=False)
    slab.array[:4] = 1             # a uint8 numpy view of the whole slab
    pool.release(slab)
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptproto import arrays
from ckptproto.errors import CheckpointError
from ckptproto.format import safetensors

# Slabs start on the page a data file's buffer starts on (one constant: a tensor is written
# from its slab past the page cache only when both agree, io/direct.py).
PAGE = safetensors.PAGE
ALIGN = 64  # every tensor starts at a multiple of this in a slab (any dtype view is aligned)


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def slab_capacity(nbytes: int) -> int:
    """The size a slab for ``nbytes`` is allocated with: rounded up by at most 1/16, so a state
    that grows a little (an optimizer creating its buffers) still fits in the same slab."""
    if nbytes <= 1 << 16:
        return round_up(max(nbytes, ALIGN), ALIGN)
    return round_up(nbytes, 1 << (nbytes.bit_length() - 4))


def shared_memory_available() -> bool:
    """Whether shared slabs can be made here (Linux ``memfd_create``)."""
    return hasattr(os, "memfd_create")


class Slab:
    """One contiguous host buffer of ``capacity`` bytes: a numpy uint8 array (pageable), a
    pinned torch uint8 tensor, or (``shared``) a memfd mapped here whose descriptor ``fd`` the
    checkpoint writer process maps too. ``array`` is a uint8 numpy view of it in every case."""

    def __init__(self, capacity: int, pinned: bool, shared: bool = False) -> None:
        self.capacity = capacity
        self.pinned = pinned
        self.shared = shared
        self.fd = -1
        self.tensor: Any = None  # the pinned torch tensor owning the memory, if pinned
        self.array: np.ndarray[Any, Any]
        if shared:
            if pinned:
                raise CheckpointError("internal error: a staging slab cannot be both pinned and shared")
            self.fd = os.memfd_create("ckptproto-staging", os.MFD_CLOEXEC)
            # The descriptor is closed when the slab is dropped; the mapping lives as long as
            # any view of it (numpy keeps the mmap alive), the writer process maps its own.
            weakref.finalize(self, os.close, self.fd)
            os.ftruncate(self.fd, capacity)
            self.array = np.frombuffer(mmap.mmap(self.fd, capacity), dtype=np.uint8)
        elif pinned:
            self.tensor = _page_aligned(capacity, pin_memory=True)
            self.array = self.tensor.numpy()
        elif arrays.loaded_torch() is not None:
            # torch's CPU allocator measured fastest as a copy_ destination
            self.tensor = _page_aligned(capacity, pin_memory=False)
            self.array = self.tensor.numpy()
        else:
            # numpy's allocation is only 16-byte aligned; copies into misaligned destinations
            # measured ~1.5x slower here, so the slab starts on a page boundary.
            raw = np.empty(capacity + PAGE, dtype=np.uint8)
            start = -raw.ctypes.data % PAGE
            self.array = raw[start : start + capacity]
        # Destination views of the last layout staged here, reused when the next save has the
        # same tensors (building ~10k views costs more than copying small tensors).
        self.layout_key: tuple[Any, ...] | None = None
        self.layout_views: list[Any] = []
        self.layout_bytes: list[memoryview] = []  # the same ranges as uint8 memoryviews
        self.layout_spans = np.zeros((0, 2), dtype=np.int64)  # (offset, length) of each

    def torch_view(self) -> Any:
        """A uint8 torch tensor over the whole slab (shares memory)."""
        if self.tensor is None:
            self.tensor = arrays.require_torch().from_numpy(self.array)
        return self.tensor


def _page_aligned(capacity: int, *, pin_memory: bool) -> Any:
    """A uint8 CPU tensor of ``capacity`` bytes that starts on a page. Every slab does (a shared
    one is a mapping): a tensor staged at the page offset its data file gives it too is then
    written past the page cache from the slab itself (io/direct.py), not copied into a bounce
    buffer first. Memory that comes page-aligned (pinned memory: cudaHostAlloc) is kept as it
    is: a page more would take the next power of two from torch's pinned allocator."""
    torch = arrays.require_torch()
    # (device="cpu": whatever torch.set_default_device says)
    exact = torch.empty(capacity, dtype=torch.uint8, device="cpu", pin_memory=pin_memory)
    if exact.data_ptr() % PAGE == 0:
        return exact
    del exact
    buffer = torch.empty(capacity + PAGE, dtype=torch.uint8, device="cpu", pin_memory=pin_memory)
    start = -buffer.data_ptr() % PAGE
    return buffer[start : start + capacity]


class _NoSharedMemory(Exception):
    """A shared slab could not be made here (a private one serves instead)."""


@dataclass
class PoolStats:
    """What a pool holds: ``allocated`` slabs ever created, ``bytes`` currently held."""

    allocated: int = 0
    freed: int = 0
    held_bytes: int = 0
    in_use: int = 0


class StagingPool:
    """Reusable staging slabs, keyed by (capacity, pinned). A slab handed out by
    :meth:`acquire` comes back with :meth:`release` once its save is committed or failed.

    The pool never holds more slabs of a kind than were in use at the same time: when no free
    slab is large enough, the free ones that are too small are dropped before a new one is
    allocated, so a state that grows does not leave dead slabs behind::

        pool = StagingPool()
        slab = pool.acquire(1 << 20, pinned=False)
        ...
        pool.release(slab)
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[Slab] = []
        self.stats = PoolStats()

    def acquire(self, nbytes: int, *, pinned: bool, shared: bool = False) -> Slab:
        """A slab of at least ``nbytes`` bytes (reused when one is free); ``shared``: one the
        checkpoint writer process can map (see :class:`Slab`) if shared memory can be had,
        else a private one (``slab.shared`` says which: the save is then written by a thread).
        """
        if shared:
            try:
                return self._acquire(nbytes, pinned=pinned, shared=True)
            except _NoSharedMemory:
                pass  # e.g. a file size limit (RLIMIT_FSIZE) covers memfds too
        return self._acquire(nbytes, pinned=pinned, shared=False)

    def _acquire(self, nbytes: int, *, pinned: bool, shared: bool) -> Slab:
        want = (pinned, shared)
        with self._lock:
            fits = [s for s in self._free if (s.pinned, s.shared) == want and s.capacity >= nbytes]
            if fits:
                slab = min(fits, key=lambda s: s.capacity)
                self._free.remove(slab)
                self.stats.in_use += 1
                return slab
            small = [s for s in self._free if (s.pinned, s.shared) == want]
            for s in small:
                self._free.remove(s)
                self.stats.freed += 1
                self.stats.held_bytes -= s.capacity
        capacity = slab_capacity(nbytes)
        try:
            slab = Slab(capacity, pinned, shared)
        except OSError as exc:
            if shared:
                raise _NoSharedMemory from exc
            raise self._cannot(capacity, pinned, exc) from exc
        except (MemoryError, RuntimeError) as exc:
            raise self._cannot(capacity, pinned, exc) from exc
        with self._lock:
            self.stats.allocated += 1
            self.stats.held_bytes += capacity
            self.stats.in_use += 1
        return slab

    @staticmethod
    def _cannot(capacity: int, pinned: bool, exc: BaseException) -> CheckpointError:
        kind = "pinned host" if pinned else "host"
        return CheckpointError(
            f"cannot allocate {capacity} bytes of {kind} memory to stage a checkpoint: {exc}; "
            "use the synchronous ckptproto.save, or lower max_pending"
        )

    def release(self, slab: Slab) -> None:
        with self._lock:
            self.stats.in_use -= 1
            self._free.append(slab)

    def clear(self) -> None:
        """Drop every free slab (slabs in use are dropped when released to a cleared pool)."""
        with self._lock:
            for s in self._free:
                self.stats.freed += 1
                self.stats.held_bytes -= s.capacity
            self._free.clear()
