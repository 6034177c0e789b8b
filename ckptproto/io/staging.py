"""Staging: copying a state's tensors out of the live objects into reusable host buffers.

An async save must not read the live tensors after the training loop starts mutating them, so
their bytes are first copied ("staged") into host memory the saver owns; the writer then
writes from there. Buffers come from a :class:`StagingPool` and are reused from save to save:
allocating (and first-touch faulting) a gigabyte costs more than copying it, and pinned
memory for CUDA tensors is far slower still to allocate.

One save stages into at most two *slabs* (one contiguous buffer each): a pageable one for CPU
tensors and numpy arrays, a pinned one for CUDA tensors. CUDA tensors are copied with
``non_blocking=True`` on a dedicated side stream per device that first waits for the work the
caller had queued when it asked for the save; an event recorded after the copies tells when
the bytes are on the host::

    pool = StagingPool()
    staged = stage_state(pool, encoded.tensors, ready=capture_ready(encoded.tensors))
    staged.synchronize()           # the live tensors may be mutated from here on
    write(staged.views)            # host byte views, one per tensor
    staged.release()               # slabs go back to the pool
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptproto import arrays
from ckptproto.arrays import ArraySpec
from ckptproto.errors import CheckpointError
from ckptproto.tree import TensorLeaf

PAGE = 4096
ALIGN = 64  # every tensor starts at a multiple of this in a slab (any dtype view is aligned)


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def slab_capacity(nbytes: int) -> int:
    """The size a slab for ``nbytes`` is allocated with: rounded up by at most 1/16, so a state
    that grows a little (an optimizer creating its buffers) still fits in the same slab."""
    if nbytes <= 1 << 16:
        return _round_up(max(nbytes, ALIGN), ALIGN)
    return _round_up(nbytes, 1 << (nbytes.bit_length() - 4))


class Slab:
    """One contiguous host buffer of ``capacity`` bytes: a numpy uint8 array (pageable) or a
    pinned torch uint8 tensor. ``array`` is a uint8 numpy view of it either way."""

    def __init__(self, capacity: int, pinned: bool) -> None:
        self.capacity = capacity
        self.pinned = pinned
        self.tensor: Any = None  # the pinned torch tensor owning the memory, if pinned
        if pinned:
            torch = arrays.require_torch()
            self.tensor = torch.empty(capacity, dtype=torch.uint8, device="cpu", pin_memory=True)
            self.array: np.ndarray[Any, Any] = self.tensor.numpy()
        elif (torch := arrays.loaded_torch()) is not None:
            # torch's CPU allocator (64-byte aligned) measured fastest as a copy_ destination
            self.tensor = torch.empty(capacity, dtype=torch.uint8, device="cpu")  # any default device
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

    def torch_view(self) -> Any:
        """A uint8 torch tensor over the whole slab (shares memory)."""
        if self.tensor is None:
            self.tensor = arrays.require_torch().from_numpy(self.array)
        return self.tensor


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

    def acquire(self, nbytes: int, *, pinned: bool) -> Slab:
        """A slab of at least ``nbytes`` bytes (reused when one is free)."""
        with self._lock:
            fits = [s for s in self._free if s.pinned == pinned and s.capacity >= nbytes]
            if fits:
                slab = min(fits, key=lambda s: s.capacity)
                self._free.remove(slab)
                self.stats.in_use += 1
                return slab
            small = [s for s in self._free if s.pinned == pinned]
            for s in small:
                self._free.remove(s)
                self.stats.freed += 1
                self.stats.held_bytes -= s.capacity
        capacity = slab_capacity(nbytes)
        try:
            slab = Slab(capacity, pinned)
        except (MemoryError, RuntimeError) as exc:
            kind = "pinned host" if pinned else "host"
            raise CheckpointError(
                f"cannot allocate {capacity} bytes of {kind} memory to stage a checkpoint: {exc}; "
                "use the synchronous ckptproto.save, or lower max_pending"
            ) from exc
        with self._lock:
            self.stats.allocated += 1
            self.stats.held_bytes += capacity
            self.stats.in_use += 1
        return slab

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


def _is_cuda(value: Any) -> bool:
    return not isinstance(value, np.ndarray) and value.device.type != "cpu"


@dataclass
class Ready:
    """Per CUDA device, an event recorded on the caller's current stream when it asked for the
    save: the side stream's copies wait for it, so they see every update queued before."""

    events: dict[Any, Any] = field(default_factory=dict)


def capture_ready(leaves: Sequence[TensorLeaf]) -> Ready:
    """Record, on the calling thread, where each CUDA device's current stream stands."""
    ready = Ready()
    torch = arrays.loaded_torch()
    if torch is None:
        return ready
    for leaf in leaves:
        if _is_cuda(leaf.value) and leaf.value.device not in ready.events:
            device = leaf.value.device
            if device.type != "cuda":
                raise CheckpointError(
                    f"{leaf.path}: tensors on {device} cannot be staged; move them to the CPU or CUDA first"
                )
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            ready.events[device] = event
    return ready


_streams_lock = threading.Lock()
_streams: dict[Any, Any] = {}


def side_stream(device: Any) -> Any:
    """The dedicated copy stream of a CUDA device (one per process and device)."""
    with _streams_lock:
        stream = _streams.get(device)
        if stream is None:
            stream = _streams[device] = arrays.require_torch().cuda.Stream(device)
        return stream


class Staged:
    """The staged bytes of one save: ``views[i]`` holds tensor ``i``'s bytes (valid once
    :meth:`synchronize` returned), until :meth:`release`."""

    def __init__(self, pool: StagingPool, slabs: list[Slab], views: list[memoryview]) -> None:
        self._pool = pool
        self._slabs = slabs
        self.views = views
        self._events: list[Any] = []
        self._sources: list[Any] = []  # CUDA sources kept alive until their copies are done

    def synchronize(self) -> None:
        """Wait until every copy (including asynchronous CUDA copies) has landed."""
        for event in self._events:
            event.synchronize()
        self._events.clear()
        self._sources.clear()

    def release(self) -> None:
        """Give the slabs back to the pool (after the bytes were written, or on failure)."""
        self.synchronize()  # never hand out a slab a copy is still writing into
        slabs, self._slabs = self._slabs, []
        self.views = []
        for slab in slabs:
            self._pool.release(slab)


def _numpy_dest(slab: Slab, offset: int, spec: ArraySpec, value: np.ndarray[Any, Any]) -> Any:
    dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder in "<>=" else value.dtype
    return slab.array[offset : offset + spec.nbytes].view(dtype).reshape(spec.shape)


def _torch_dest(slab: Slab, offset: int, spec: ArraySpec, value: Any) -> Any:
    flat = slab.torch_view()[offset : offset + spec.nbytes]
    return flat.view(value.dtype).view(spec.shape)


def _layout_key(leaves: Sequence[TensorLeaf]) -> tuple[Any, ...]:
    return tuple(
        (leaf.spec, leaf.value.dtype if isinstance(leaf.value, np.ndarray) else None) for leaf in leaves
    )


def stage_state(pool: StagingPool, leaves: Sequence[TensorLeaf], ready: Ready) -> Staged:
    """Copy every tensor of ``leaves`` into slabs from ``pool``. CPU copies are done when this
    returns; CUDA copies are queued on the side streams (call ``Staged.synchronize``).

    On failure every slab taken is released and the error (naming the state path) raised.
    """
    groups: dict[bool, list[int]] = {False: [], True: []}
    for i, leaf in enumerate(leaves):
        _check_unchanged(leaf)
        groups[_is_cuda(leaf.value)].append(i)
    views: list[memoryview | None] = [None] * len(leaves)
    slabs: list[Slab] = []
    staged = Staged(pool, slabs, [])
    try:
        for pinned, indices in groups.items():
            if not indices:
                continue
            subset = [leaves[i] for i in indices]
            offsets, total = [], 0
            for leaf in subset:
                offsets.append(total)
                total += _round_up(leaf.spec.nbytes, ALIGN)
            slab = pool.acquire(total, pinned=pinned)
            slabs.append(slab)
            key = _layout_key(subset)
            if slab.layout_key != key:
                slab.layout_key = None  # a failure while building leaves no stale layout
                slab.layout_views = [
                    _numpy_dest(slab, off, leaf.spec, leaf.value)
                    if isinstance(leaf.value, np.ndarray)
                    else _torch_dest(slab, off, leaf.spec, leaf.value)
                    for leaf, off in zip(subset, offsets, strict=True)
                ]
                slab.layout_key = key
            if pinned:
                _copy_cuda(staged, subset, slab.layout_views, ready)
            else:
                _copy_host(subset, slab.layout_views)
            for i, off, leaf in zip(indices, offsets, subset, strict=True):
                views[i] = slab.array[off : off + leaf.spec.nbytes].data
    except BaseException:
        staged.release()
        raise
    staged.views = [v if v is not None else memoryview(b"") for v in views]
    return staged


def _check_unchanged(leaf: TensorLeaf) -> None:
    """A tensor resized (or given new data) in place after ``save`` was called, before
    background staging copied it, would otherwise be broadcast, truncated or converted."""
    now = arrays.try_spec(leaf.value)
    if now != leaf.spec:
        was = f"{leaf.spec.dtype.name}{list(leaf.spec.shape)}"
        got = f"{now.dtype.name}{list(now.shape)}" if now is not None else "an unsupported value"
        raise CheckpointError(
            f"{leaf.path}: the tensor changed from {was} to {got} after save() was called; "
            "call wait_staged() before mutating the state"
        )


def capture_versions(leaves: Sequence[TensorLeaf]) -> list[int | None]:
    """torch's in-place version counter of every tensor, read on the caller's thread when it
    asks for the save (None for numpy arrays and inference tensors, which have none)."""
    versions: list[int | None] = []
    for leaf in leaves:
        version = None
        if not isinstance(leaf.value, np.ndarray) and leaf.value is not None:
            try:
                version = int(leaf.value._version)
            except RuntimeError:  # "Inference tensors do not track version counter"
                version = None
        versions.append(version)
    return versions


def check_not_mutated(
    leaves: Sequence[TensorLeaf], versions: Sequence[int | None], views: Sequence[memoryview], *, where: str
) -> None:
    """Refuse a torn snapshot: raise CheckpointError naming the first tensor changed in place
    between the save request (``versions``, from :func:`capture_versions`) and the end of its
    staging (``views``, synchronized). Two independent tests, because neither sees everything:

    * torch's version counter, bumped by every in-place op autograd knows of (``optimizer.step``
      with or without ``foreach``, ``add_``, ``copy_``, ``zero_``), CPU and CUDA alike;
    * for host tensors and numpy arrays, the staged bytes compared with the live ones: catches
      writes the counter misses (fused optimizers, BatchNorm statistics updated in the forward
      pass, ``.data``, numpy) made after the tensor was copied and before staging ended.
    """
    for leaf, version, view in zip(leaves, versions, views, strict=True):
        value = leaf.value
        if value is None:
            continue
        if version is not None and int(value._version) != version:
            raise CheckpointError(
                _torn_message(leaf, where, f"torch version counter {version} -> {value._version}")
            )
        if leaf.spec.nbytes and not _is_cuda(value):
            live, _owner = arrays.host_bytes(value)
            if not np.array_equal(np.frombuffer(live, np.uint8), np.frombuffer(view, np.uint8)):
                raise CheckpointError(_torn_message(leaf, where, "its bytes changed while they were copied"))


def _torn_message(leaf: TensorLeaf, where: str, how: str) -> str:
    return (
        f"{where}: {leaf.path}: the tensor was modified in place ({how}) while the save was "
        "staging it in the background; the checkpoint would mix two steps, so nothing was "
        "committed. Call fut.wait_staged() (AsyncCheckpointCallback: pre_optimizer_step()) "
        "before changing the state, e.g. before optimizer.step(), or use staging='blocking'"
    )


def _copy_host(leaves: Sequence[TensorLeaf], dests: Sequence[Any]) -> None:
    torch = arrays.loaded_torch()
    for leaf, dest in zip(leaves, dests, strict=True):
        value = leaf.value
        if not leaf.spec.nbytes:
            continue
        try:
            if isinstance(value, np.ndarray):
                np.copyto(dest, value, casting="equiv")
            else:
                with torch.no_grad():
                    _copy_torch(dest, value)
        except Exception as exc:
            raise CheckpointError(
                f"{leaf.path}: copying the tensor for the checkpoint failed: {exc} "
                "(was it resized or freed while the save was being staged?)"
            ) from exc


def _copy_torch(dest: Any, value: Any) -> None:
    try:
        dest.copy_(value)  # torch resolves conj/neg bits and strides while copying
    except RuntimeError:  # NotImplementedError: no "copy_kernel" for uint1..7, int1..7, bits*
        same_width = arrays.same_width_int(value.dtype)
        if same_width is None or value.is_conj() or value.is_neg() or value.device.type != "cpu":
            raise
        dest.view(same_width).copy_(value.view(same_width))


def _copy_cuda(staged: Staged, leaves: Sequence[TensorLeaf], dests: Sequence[Any], ready: Ready) -> None:
    torch = arrays.require_torch()
    by_device: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        by_device.setdefault(leaf.value.device, []).append(i)
    for device, indices in by_device.items():
        stream = side_stream(device)
        event = ready.events.get(device)
        if event is not None:
            stream.wait_event(event)
        else:  # no ready point captured: wait for everything queued so far on the default stream
            stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for i in indices:
                leaf = leaves[i]
                if not leaf.spec.nbytes:
                    continue
                try:
                    dests[i].copy_(leaf.value, non_blocking=True)
                except Exception as exc:
                    raise CheckpointError(
                        f"{leaf.path}: copying the CUDA tensor for the checkpoint failed: {exc}"
                    ) from exc
                # The caching allocator must not hand this memory to another tensor before
                # the copy has read it, even if the caller drops its last reference.
                leaf.value.record_stream(stream)
                staged._sources.append(leaf.value)
            done = torch.cuda.Event()
            done.record(stream)
        staged._events.append(done)
