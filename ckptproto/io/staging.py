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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from operator import attrgetter
from typing import Any

import numpy as np

from ckptproto import arrays
from ckptproto._recent import Recent
from ckptproto.arrays import ArraySpec
from ckptproto.errors import CheckpointError
from ckptproto.io.staging_pool import ALIGN, PAGE, PoolStats, Slab, StagingPool, round_up, slab_capacity
from ckptproto.io.torn_guard import capture_versions, check_not_mutated, check_unchanged, is_cuda
from ckptproto.tree import TensorLeaf

# The pool and the torn-snapshot guard live in their own modules; their names stay importable
# from here, where they were first defined.
__all__ = [
    "ALIGN",
    "PAGE",
    "PoolStats",
    "Ready",
    "Slab",
    "Staged",
    "StagingPool",
    "capture_ready",
    "capture_versions",
    "check_not_mutated",
    "side_stream",
    "slab_capacity",
    "stage_state",
]


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
        if is_cuda(leaf.value) and leaf.value.device not in ready.events:
            device = leaf.value.device
            _check_cuda(leaf)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            ready.events[device] = event
    return ready


def _check_cuda(leaf: TensorLeaf) -> None:
    if leaf.value.device.type != "cuda":
        raise CheckpointError(
            f"{leaf.path}: tensors on {leaf.value.device} cannot be staged; move them to the CPU or CUDA first"
        )


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
        self._copier: threading.Thread | None = None  # the host copy, when it runs apart
        self._tasks: _Tasks | None = None  # its copies, which the waiting thread helps with

    def shared(self) -> tuple[int, np.ndarray[Any, Any]] | None:
        """``(fd, spans)`` when every tensor was staged into one shared slab (no CUDA tensor):
        the memfd to map and each view's ``(offset, length)`` in it, in order; else None."""
        if len(self._slabs) != 1 or not self._slabs[0].shared:
            return None
        slab = self._slabs[0]
        return slab.fd, slab.layout_spans

    def synchronize(self) -> None:
        """Wait until every copy (including asynchronous CUDA copies and a host copy running
        on its own thread) has landed; raises the host copy's error, if it failed."""
        tasks = self._tasks
        self._settle()
        self._tasks = None
        if tasks is not None and tasks.error is not None:
            raise tasks.error

    def _copy_apart(self, copy: Callable[[_Tasks], None]) -> None:
        """Run the host copy ``copy`` on a thread of its own: torch's and numpy's copies release
        the GIL, so the caller's own Python work (encoding the writer process's job) runs
        beside it on another core. ``copy`` lists its copies in the :class:`_Tasks` it is given
        and takes them one by one; :meth:`synchronize` takes those still left, on its own
        thread, then waits for the rest."""
        tasks = self._tasks = _Tasks()

        def run() -> None:
            try:
                copy(tasks)
            except BaseException as exc:
                tasks.fail(exc)
            finally:
                tasks.listed.set()  # (whatever ``copy`` did: the waiting thread stops waiting)

        # A thread per save (~0.1 ms), not a pool: nothing to restart after a fork.
        self._copier = threading.Thread(target=run, name="ckptproto-stage-copy", daemon=True)
        self._copier.start()

    def _settle(self) -> None:
        """Wait for every copy in flight (helping with the host copies left), raising nothing."""
        copier, self._copier = self._copier, None
        if copier is not None:
            if self._tasks is not None:
                self._tasks.listed.wait()  # the copier lists them first (its setup is ~1-3 ms)
                self._tasks.run()
            copier.join()
        for event in self._events:
            event.synchronize()
        self._events.clear()
        self._sources.clear()

    def release(self) -> None:
        """Give the slabs back to the pool (after the bytes were written, or on failure)."""
        self._settle()  # never hand out a slab a copy is still writing into
        self._tasks = None  # (a failed save releases its slabs: the error was raised then)
        slabs, self._slabs = self._slabs, []
        self.views = []
        for slab in slabs:
            self._pool.release(slab)


class _Tasks:
    """Copies that any thread may take, one at a time, until none is left (or one failed): the
    copier thread lists them and starts on them, and the thread that then waits for them
    (``Staged.synchronize``, once it has encoded the writer process's job) takes the ones left
    instead of idling. 20,000 small plain tensors are ~10 ms of numpy copies (~25 of torch
    dispatch for tensors that are not plain), which two threads on two cores share."""

    def __init__(self) -> None:
        self._items: list[Callable[[], None]] = []
        self._next = 0
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.listed = threading.Event()  # set once the copies are listed (or none will be)

    def add(self, items: list[Callable[[], None]]) -> None:
        with self._lock:
            self._items += items
        self.listed.set()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = exc

    def run(self) -> None:
        """Take and run copies until none is left; the first failure stops every taker."""
        while True:
            with self._lock:
                if self.error is not None or self._next >= len(self._items):
                    return
                task = self._items[self._next]
                self._next += 1
            try:
                task()
            except BaseException as exc:
                self.fail(exc)
                return


def _numpy_dest(slab: Slab, offset: int, spec: ArraySpec, value: np.ndarray[Any, Any]) -> Any:
    dtype = value.dtype.newbyteorder("<") if value.dtype.byteorder in "<>=" else value.dtype
    return slab.array[offset : offset + spec.nbytes].view(dtype).reshape(spec.shape)


def _torch_dest(slab: Slab, offset: int, spec: ArraySpec, value: Any) -> Any:
    flat = slab.torch_view()[offset : offset + spec.nbytes]
    return flat.view(value.dtype).view(spec.shape)


def _layout_key(leaves: Sequence[TensorLeaf], plain: bool = False) -> tuple[Any, ...]:
    # The specs themselves: equal specs are shared objects (ArraySpec), so comparing two keys
    # is an identity test per tensor, in C (~0.3 ms at 20,000 tensors; an ArraySpec's __eq__
    # would be Python code, ~1 us a tensor). A numpy array's own dtype picks its destination
    # view (byte order), so theirs are part of the key too (``plain``: there are none).
    specs = tuple([leaf.spec for leaf in leaves])
    if plain:
        return (specs, ())
    return (specs, tuple([leaf.value.dtype for leaf in leaves if leaf.spec.kind == "numpy"]))


# The bytes the last few layouts take in a slab, by layout key (a key's specs are compared by
# identity, ~0.005 us a tensor, summing their sizes ~0.1).
_totals: Recent[tuple[Any, ...], int] = Recent(4)


def _slab_bytes(leaves: Sequence[TensorLeaf]) -> int:
    """The bytes ``leaves`` take in a slab, each at a multiple of ALIGN (round_up, inlined)."""
    return sum([-(-leaf.spec.nbytes // ALIGN) * ALIGN for leaf in leaves])


def _build_layout(slab: Slab, subset: Sequence[TensorLeaf], key: tuple[Any, ...]) -> None:
    """Destination views (typed, for the copies) and byte views (for the writer) of every
    tensor of ``subset`` in ``slab``, each at a multiple of ALIGN."""
    slab.layout_key = None  # a failure while building leaves no stale layout
    dests, spans, places, total = [], [], [], 0
    for leaf in subset:
        nbytes = leaf.spec.nbytes
        if isinstance(leaf.value, np.ndarray):
            dests.append(_numpy_dest(slab, total, leaf.spec, leaf.value))
        else:
            dests.append(_torch_dest(slab, total, leaf.spec, leaf.value))
        spans.append(slab.array[total : total + nbytes].data)
        places.append((total, nbytes))
        total += round_up(nbytes, ALIGN)
    slab.layout_views, slab.layout_bytes = dests, spans
    slab.layout_spans = np.array(places, dtype=np.int64).reshape(-1, 2)
    slab.layout_key = key


def stage_state(
    pool: StagingPool,
    leaves: Sequence[TensorLeaf],
    ready: Ready,
    *,
    recheck: bool = True,
    shared: bool = False,
    copy_apart: bool = False,
) -> Staged:
    """Copy every tensor of ``leaves`` into slabs from ``pool``. CPU copies are done when this
    returns, or with ``copy_apart`` run on a thread of their own; CUDA copies are queued on the
    side streams. Call ``Staged.synchronize`` before the live tensors may change.

    ``recheck``: first check that no tensor was resized or retyped since ``leaves`` were
    described (needed when staging runs later, on another thread; the blocking path stages
    right after describing them, on the same thread, and passes False). ``shared``: stage
    host tensors into a slab the checkpoint writer process can map (:meth:`Staged.shared`).

    On failure every slab taken is released and the error (naming the state path) raised.
    """
    if recheck:
        for leaf in leaves:
            check_unchanged(leaf)
    # Described just now, on this thread (not ``recheck``), and every one given an address by
    # the encoder: all plain CPU torch tensors (contiguous, no lazy conj/neg bit), the usual
    # state. Then no test per tensor (~8 ms at 20,000 tensors) finds the CUDA ones or arrays.
    plain = not recheck and 0 not in [leaf.host_address for leaf in leaves]
    # (is_cuda inlined: a call per tensor is ~2 ms at 20,000 tensors)
    on_device = (
        []
        if plain
        else [
            i
            for i, leaf in enumerate(leaves)
            if not (isinstance(leaf.value, np.ndarray) or leaf.value.is_cpu)
        ]
    )
    device = set(on_device)
    host: Sequence[int] = [i for i in range(len(leaves)) if i not in device] if device else range(len(leaves))
    groups: dict[bool, Sequence[int]] = {False: host, True: on_device}
    views: list[memoryview] = []
    slabs: list[Slab] = []
    staged = Staged(pool, slabs, [])
    try:
        for pinned, indices in groups.items():
            if not indices:
                continue
            subset = [leaves[i] for i in indices] if len(indices) < len(leaves) else list(leaves)
            key = _layout_key(subset, plain)
            # (the layout of a save before: the same state again)
            total = _totals.get_or_make(key, partial(_slab_bytes, subset))
            slab = pool.acquire(total, pinned=pinned, shared=shared and not pinned)
            slabs.append(slab)
            if slab.layout_key != key:
                _build_layout(slab, subset, key)
            if pinned:
                _copy_cuda(staged, subset, slab.layout_views, ready)
            elif copy_apart:
                staged._copy_apart(partial(_copy_host, subset, slab, plain))
            else:
                _copy_host(subset, slab, plain)
            if len(indices) == len(leaves):
                views = list(slab.layout_bytes)
            else:
                if not views:
                    views = [memoryview(b"")] * len(leaves)
                for i, span in zip(indices, slab.layout_bytes, strict=True):
                    views[i] = span
    except BaseException:
        staged.release()
        raise
    staged.views = views
    return staged


# Plain host tensors of at least this many bytes are copied with one np.copyto each: a single
# thread's memcpy with the GIL released. torch's copy_ splits a large copy over its intra-op
# threads, which gains nothing on a copy bound by memory bandwidth, spends ~4x the CPU waiting
# for each other, and waits for a descheduled helper on a busy machine (512 MiB in 64 tensors
# on the shared 2-core VM: 0.13 s wall and 0.05 s CPU against 0.5 s and 0.24 s).
MEMCPY_MIN_BYTES = 256 * 1024


# Small tensors are copied by one torch call per this many (a copy any thread may take).
COPY_CHUNK = 1024
# Plain ones, as address ranges, by one numpy copy per this many (~0.3 ms a part at 1 KiB each)
RANGES_CHUNK = 4096
_HOST_ADDRESS = attrgetter("host_address")


def _copy_host(
    leaves: Sequence[TensorLeaf], slab: Slab, plain: bool = False, tasks: _Tasks | None = None
) -> None:
    """Copy ``leaves`` (host tensors and arrays; ``plain``: all plain CPU torch tensors) into
    ``slab``, at its layout's places: here and now, or, given ``tasks``, as copies listed there
    for this thread and any helper to take (their first error is ``tasks.error``)."""
    torch = arrays.loaded_torch()
    dests = slab.layout_views
    arrays_at = [] if plain else [i for i, leaf in enumerate(leaves) if leaf.spec.kind == "numpy"]
    large = (
        [i for i, leaf in enumerate(leaves) if leaf.spec.nbytes >= MEMCPY_MIN_BYTES]
        if plain
        else [
            i
            for i, leaf in enumerate(leaves)
            if leaf.spec.nbytes >= MEMCPY_MIN_BYTES and leaf.spec.kind == "torch" and _plain(leaf.value)
        ]
    )
    tensors: Sequence[int]
    if arrays_at or large:
        skip = set(arrays_at).union(large)
        tensors = [i for i in range(len(leaves)) if i not in skip]
    else:  # every leaf a small torch tensor, the usual case: no index lists to build
        tensors = range(len(leaves))
    items: list[Callable[[], None]]
    if plain and tensors:
        # Plain CPU tensors described just now, on this thread: their bytes lie at their
        # host addresses. Copied as address ranges by numpy (~0.1 us a tensor, no tensor view
        # or torch dispatch per tensor: _foreach_copy_ costs ~0.6), into their slab places.
        small = leaves if type(tensors) is range else list(map(leaves.__getitem__, tensors))
        spans = slab.layout_spans if type(tensors) is range else slab.layout_spans[np.asarray(tensors)]
        ranges = arrays.HostRanges(
            np.fromiter(map(_HOST_ADDRESS, small), np.uint64, len(tensors)), spans[:, 1]
        )
        places = spans[:, 0]
        items = [
            partial(
                _copy_ranges,
                leaves,
                tensors[a],
                ranges[a : a + RANGES_CHUNK],
                slab,
                places[a : a + RANGES_CHUNK],
            )
            for a in range(0, len(tensors), RANGES_CHUNK)
        ]
    else:
        sources, targets = [leaves[i].value for i in tensors], [dests[i] for i in tensors]
        items = [
            partial(
                _copy_small,
                leaves,
                dests,
                tensors[a : a + COPY_CHUNK],
                targets[a : a + COPY_CHUNK],
                sources[a : a + COPY_CHUNK],
            )
            for a in range(0, len(tensors), COPY_CHUNK)
        ]
    items += [partial(_copy_large, leaves[i], slab, i) for i in large]
    items += [partial(_copy_one, leaves[i], dests[i], torch) for i in arrays_at]
    if tasks is None:
        for item in items:
            item()
    else:
        tasks.add(items)
        tasks.run()


def _copy_small(
    leaves: Sequence[TensorLeaf],
    dests: Sequence[Any],
    indices: Sequence[int],
    targets: list[Any],
    sources: list[Any],
) -> None:
    """Small torch tensors ``leaves[i]`` for ``i`` in ``indices`` (``sources``) into their
    places (``targets``)."""
    torch = arrays.require_torch()
    with torch.no_grad():  # (per thread: a helper thread has grad mode on)
        try:
            # One call for many tensors instead of one Python-level copy_ each (~3 us per
            # tensor); it releases the GIL. Any failure is redone tensor by tensor below,
            # which names the tensor.
            torch._foreach_copy_(targets, sources)
        except Exception:
            for i in indices:
                _copy_one(leaves[i], dests[i], torch)


def _copy_ranges(
    leaves: Sequence[TensorLeaf], first: int, ranges: arrays.HostRanges, slab: Slab, places: Any
) -> None:
    """Plain tensors' bytes (``ranges``, the first of them ``leaves[first]``) to their
    ``places`` in the slab."""
    try:
        ranges.copy_into(slab.array, places)
    except Exception as exc:
        raise CheckpointError(
            f"{leaves[first].path} and the {len(ranges) - 1} tensors after it: copying them for the "
            f"checkpoint failed: {exc}"
        ) from exc


def _copy_large(leaf: TensorLeaf, slab: Slab, i: int) -> None:
    """A large plain tensor ``leaf`` (``i``-th of the slab's layout) by one memcpy, GIL released."""
    offset, length = slab.layout_spans[i].tolist()
    try:
        live, _owner = arrays.host_bytes(leaf.value)  # a view: the tensor is plain
        np.copyto(slab.array[offset : offset + length], np.frombuffer(live, dtype=np.uint8))
    except Exception as exc:
        raise CheckpointError(
            f"{leaf.path}: copying the tensor for the checkpoint failed: {exc} "
            "(was it resized or freed while the save was being staged?)"
        ) from exc


def _plain(t: Any) -> bool:
    """Whether a CPU tensor's memory holds exactly the bytes to save (contiguous, no lazy
    conj/neg bit), so they can be copied as bytes."""
    return bool(t.is_cpu and t.is_contiguous() and not t.is_conj() and not t.is_neg())


def _copy_one(leaf: TensorLeaf, dest: Any, torch: Any) -> None:
    value = leaf.value
    if not leaf.spec.nbytes:
        return
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
        _check_cuda(leaf)
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
