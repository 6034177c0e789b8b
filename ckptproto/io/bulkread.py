"""Small tensors read in bulk: the per-tensor cost of a load of many small tensors.

Allocating, planning and reading each tensor on its own costs several microseconds of Python
and torch calls per tensor (a large MoE state holds 100,000-300,000 of them). When a data
file's header is the one ckptproto's writer makes (``DataFile.layout``, io/headercheck.py),
the reader knows where every tensor lies without a lookup, and neighbouring small tensors are
read as one run: one buffer, one read (CRC computed on the way, as for any read), then one
``split_with_sizes`` per dtype gives the tensors as views of it (``split_with_sizes_copy`` on
``load``: as copies)::

    plan = ReadPlan()
    bulk = plan_small(ckpt, kinds, plan, values)   # values[index] is filled after execute
    execute(ckpt, plan, verify=True)
    bulk.copy()                                     # load_into: into the target tensors

A run is scratch memory (at most RUN_BYTES): on ``load`` each tensor is copied out of it
into memory of its own (one ``split_with_sizes_copy`` per run and dtype), so what a load
returns is what ``torch.empty`` would give; on ``load_into`` they are copied into the targets with one
``torch._foreach_copy_``, and at most SCRATCH_BYTES of runs are allocated for that per load
(memory stays flat): the other tensors are read straight into the targets as before.
Tensors over SMALL_BYTES are read straight into their own memory.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from operator import attrgetter, itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ckptproto import arrays
from ckptproto.arrays import Kind
from ckptproto.dtypes import DType
from ckptproto.io import threads

if TYPE_CHECKING:
    from ckptproto.io.headercheck import FileLayout
    from ckptproto.io.reader import OpenCheckpoint


class ReadPlan(Protocol):
    """What this module needs of ``readplan.ReadPlan`` (which imports this module)."""

    def add(
        self, file: str, begin: int, dest: memoryview, after: Callable[[], None] | None = None
    ) -> None: ...


SMALL_BYTES = 64 << 10  # a tensor up to this size may share a run's memory
RUN_BYTES = 1 << 20  # the most one run holds
SCRATCH_BYTES = 64 << 20  # load_into: the most run memory allocated only to be copied

# One tensor of a run: (tensor index, torch dtype, shape, begin in the buffer, element count,
# the target tensors to copy it into: None for a new tensor, the run's view then its value).
_Item = tuple[int, Any, tuple[int, ...], int, int, "list[Any] | None"]


class _Columns(NamedTuple):
    """Tensors of a run (or of a whole file) as columns of :data:`_Item`'s fields; ``dests``
    None when every tensor is new (``load``). ``one_each``: each of ``dests`` is the one
    target tensor itself, not a list (``load_into``'s usual run)."""

    indices: list[int]
    torch_dtypes: list[Any]
    shapes: list[tuple[int, ...]]
    begins: list[int]
    numels: list[int]
    dests: list[Any] | None
    one_each: bool = False

    def part(self, begin: int, end: int) -> _Columns:
        """The tensors ``begin:end`` of these."""
        return _Columns(
            self.indices[begin:end],
            self.torch_dtypes[begin:end],
            self.shapes[begin:end],
            self.begins[begin:end],
            self.numels[begin:end],
            None if self.dests is None else self.dests[begin:end],
            self.one_each,
        )


def _columns_of(items: list[_Item]) -> _Columns:
    """``items`` as columns (``dests`` None when no item has targets; ``one_each`` when each
    has exactly one)."""
    dests: list[Any] = [item[5] for item in items]
    one_each = None not in dests and set(map(len, dests)) == {1}
    return _Columns(
        [item[0] for item in items],
        [item[1] for item in items],
        [item[2] for item in items],
        [item[3] for item in items],
        [item[4] for item in items],
        list(map(_FIRST, dests)) if one_each else None if dests.count(None) == len(dests) else dests,
        one_each,
    )


def _torch_dtype(dtype: DType) -> Any:
    """The torch dtype a run may view its bytes as, or None: a dtype stored under its own
    safetensors code whose item size is a power of two up to 8 (no sub-byte or raw-stored
    dtype, whose views and copies torch may lack)."""
    if dtype.safetensors is None or dtype.torch_name is None or dtype.itemsize not in (1, 2, 4, 8):
        return None
    return dtype.torch_dtype()


class Bulk:
    """The tensors :func:`plan_small` scheduled (``taken``) and, for ``load_into``, the copies
    into the targets that :meth:`copy` makes once the plan has run."""

    def __init__(self) -> None:
        self.taken: set[int] = set()
        # Each target and the view of a run copied into it, filled by the reads (two columns:
        # what _foreach_copy_ takes, without a tuple per tensor on the way)
        self.targets: list[Any] = []
        self.views: list[Any] = []
        # Stretches of a run copied into 1-d targets of their own dtype and size: (the typed
        # stretch, the element counts, the targets), one split_with_sizes_copy each (no view
        # of each tensor on the way)
        self.splits: list[tuple[Any, list[int], list[Any]]] = []

    def copy(self) -> None:
        """Copy every run's tensors into their targets: one ``split_with_sizes_copy`` per
        stretch of 1-d targets, one ``_foreach_copy_`` for all the others."""
        torch = arrays.loaded_torch()
        if torch is None:
            return
        splits, self.splits = self.splits, []
        split_copy = getattr(torch, "split_with_sizes_copy", None)
        for typed, numels, targets in splits:
            if split_copy is not None:
                try:
                    _split_into(split_copy, typed, numels, targets)
                    continue
                except RuntimeError:  # e.g. an inference tensor outside inference mode
                    pass
            self.targets += targets
            self.views += typed.split_with_sizes(numels)
        if not self.targets:
            return
        dsts, srcs = self.targets, self.views
        self.targets, self.views = [], []
        try:
            _copies_in_two(lambda a, b: torch._foreach_copy_(dsts[a:b], srcs[a:b]), len(dsts))
            return
        except RuntimeError:  # e.g. an inference tensor outside inference mode: one at a time
            pass
        for dst, src in zip(dsts, srcs, strict=True):
            if not arrays.copy_bytes(dst, src):  # the bytes, as a direct read writes them
                with torch.no_grad():
                    dst.copy_(src)


def _split_into(split_copy: Any, typed: Any, numels: list[int], targets: list[Any]) -> None:
    """``split_copy(typed, numels, out=targets)`` (torch.split_with_sizes_copy), in two halves
    on two cores when the targets are many."""

    def part(a: int, b: int) -> None:
        split_copy(typed.narrow(0, sum(numels[:a]), sum(numels[a:b])), numels[a:b], out=targets[a:b])

    _copies_in_two(part, len(numels))


def _copies_in_two(copy: Callable[[int, int], object], count: int) -> None:
    """``copy(a, b)`` of items ``[a, b)`` for all ``count`` items, its result dropped:
    :func:`_in_two_as_caller`."""

    def part(a: int, b: int) -> list[None]:
        copy(a, b)
        return []

    _in_two_as_caller(part, count)


def _in_two_as_caller(work: Callable[[int, int], list[Any]], count: int) -> list[Any]:
    """:func:`threads.in_two` of ``work``, each part in the caller's inference mode (tensors
    made in it are inference tensors, and only in it may one be written) with gradient mode
    off (a Parameter that requires grad is overwritten, not traced): both modes are per
    thread, and a pool thread has neither of the caller's."""
    torch = arrays.require_torch()
    inference = torch.is_inference_mode_enabled()

    def part(a: int, b: int) -> list[Any]:
        with torch.inference_mode(inference), torch.no_grad():
            return work(a, b)

    return threads.in_two(part, count)


def plan_small(
    ckpt: OpenCheckpoint,
    kinds: dict[int, Kind],
    plan: ReadPlan,
    values: dict[int, Any],
    *,
    targets: dict[int, Any] | None = None,
    more_targets: Mapping[int, list[Any]] | None = None,
    wanted: set[int] | None = None,
) -> Bulk:
    """Schedule the small, whole torch tensors of ``kinds`` stored in files of a known layout
    into runs read by ``plan``; once the plan has run (CRCs checked), ``values[index]`` holds
    each of them. Without ``targets`` (``load``) every such tensor is taken; with them
    (``load_into``: the first matched target of each index, ``more_targets`` any further
    ones), an index whose targets are all plain CPU tensors (copied into by
    :meth:`Bulk.copy`, then ``values[index]`` is the first), or without targets but in
    ``wanted`` (a new tensor). The caller plans the others."""
    bulk = Bulk()
    if targets is not None:
        torch = arrays.loaded_torch()  # None: no target is a torch tensor
    else:
        torch = arrays.require_torch() if "torch" in kinds.values() else None
    if torch is None:
        return bulk
    plain = (torch.Tensor, torch.nn.Parameter)
    tensors = ckpt.manifest.tensors
    taken = bulk.taken
    usable: dict[int, Any] = {}  # id(DType) -> torch dtype or None (DTypes live in dtypes.BY_NAME)
    scratch = SCRATCH_BYTES
    for name, data_file in ckpt.files.items():
        layout = data_file.layout
        if layout is None:
            continue
        start = len(data_file.header)
        whole = _whole_file(layout, kinds, usable, targets, more_targets, plain, scratch)
        if whole is not None:  # the usual file: every tensor small, planned in C-level passes
            if targets is not None:
                scratch -= layout.buffer_size
            _flush_all(plan, name, start, whole, layout, values, bulk)
            taken.update(layout.owners)
            continue
        items: list[_Item] = []
        run_begin = run_end = 0
        for index, begin, end in zip(layout.owners, layout.begins, layout.ends, strict=True):
            tensor = tensors[index]
            if kinds.get(index) != "torch" or len(tensor.chunks) != 1 or end - begin > SMALL_BYTES:
                continue
            dtype = tensor.dtype
            torch_dtype = usable.get(id(dtype), usable)
            if torch_dtype is usable:
                torch_dtype = usable[id(dtype)] = _torch_dtype(dtype)
            if torch_dtype is None:
                continue
            dests: list[Any] | None = None
            if targets is not None:
                first = targets.get(index)
                if first is not None:
                    dests = [first, *more_targets.get(index, ())] if more_targets else [first]
                    if end - begin > scratch or not _plain_cpu(dests, plain):
                        continue
                    scratch -= end - begin
                elif wanted is None or index not in wanted:
                    continue
            if items and (begin != run_end or end - run_begin > RUN_BYTES):
                _flush(plan, name, start, run_begin, run_end - run_begin, _columns_of(items), values, bulk)
                items = []
            if not items:
                run_begin = begin
            numel = (end - begin) // dtype.itemsize
            items.append((index, torch_dtype, tensor.shape, begin, numel, dests))
            run_end = end
            taken.add(index)
        if items:
            _flush(plan, name, start, run_begin, run_end - run_begin, _columns_of(items), values, bulk)
    return bulk


def _whole_file(
    layout: FileLayout,
    kinds: dict[int, Kind],
    usable: dict[int, Any],
    targets: dict[int, Any] | None,
    more_targets: Mapping[int, list[Any]] | None,
    plain: tuple[type, ...],
    scratch: int,
) -> _Columns | None:
    """The columns of every entry of ``layout`` when the loop of :func:`plan_small` would take
    each one (a torch tensor, whole, small, of a dtype runs can view; for ``load_into``, with
    one target, a plain CPU tensor, all within the scratch left), else None. Needs the
    layout's forms (a table of one-chunk entries): what a form decides is decided once."""
    owners, form_of, forms = layout.owners, layout.form_of, layout.forms
    if not owners or form_of is None or list(map(kinds.get, owners)).count("torch") != len(owners):
        return None
    dests: list[Any] | None = None
    if targets is not None:
        if layout.buffer_size > scratch:
            return None
        if more_targets and not more_targets.keys().isdisjoint(owners):
            return None  # ties: the loop's lists of targets
        firsts: list[Any] = list(map(targets.get, owners))
        # (type None, an index without a target, is not plain: no `None in` a list of tensors,
        # whose == is a Python call each)
        if not set(map(type, firsts)) <= set(plain) or not all(map(_IS_CPU, firsts)):
            return None
        dests = firsts
    torch_dtypes: list[Any] = [None] * len(forms)
    numels = [0] * len(forms)
    for k in set(form_of):
        form = forms[k]
        dtype = form.dtype
        torch_dtype = usable.get(id(dtype), usable)
        if torch_dtype is usable:
            torch_dtype = usable[id(dtype)] = _torch_dtype(dtype)
        numels[k] = math.prod(form.chunks[0].shape)
        if torch_dtype is None or numels[k] * dtype.itemsize > SMALL_BYTES:
            return None
        torch_dtypes[k] = torch_dtype
    return _Columns(
        owners,
        list(map(torch_dtypes.__getitem__, form_of)),
        list(map(_SHAPE_OF, map(forms.__getitem__, form_of))),
        layout.begins,
        list(map(numels.__getitem__, form_of)),
        dests,
        dests is not None,
    )


def _flush_all(
    plan: ReadPlan,
    file: str,
    start: int,
    columns: _Columns,
    layout: FileLayout,
    values: dict[int, Any],
    bulk: Bulk,
) -> None:
    """:func:`_flush` ``columns`` (every entry of ``layout``, back to back) in runs of at most
    RUN_BYTES (one entry alone may be larger: at most SMALL_BYTES)."""
    ends, begins = layout.ends, layout.begins
    i, count = 0, len(begins)
    while i < count:
        run_begin = begins[i]
        j = max(bisect_right(ends, run_begin + RUN_BYTES), i + 1)
        _flush(plan, file, start, run_begin, ends[j - 1] - run_begin, columns.part(i, j), values, bulk)
        i = j


_FIRST, _IS_CPU = itemgetter(0), attrgetter("is_cpu")
_SHAPE_OF = itemgetter(1)  # a TensorEntry's shape


def _plain_cpu(dests: list[Any], plain: tuple[type, ...]) -> bool:
    """Every target a plain CPU tensor (exact types: never a DTensor or another subclass)."""
    if len(dests) == 1:  # the usual target, without a generator
        return type(dests[0]) in plain and bool(dests[0].is_cpu)
    return all(type(t) in plain and t.is_cpu for t in dests)


def _flush(
    plan: ReadPlan,
    file: str,
    start: int,
    run_begin: int,
    nbytes: int,
    columns: _Columns,
    values: dict[int, Any],
    bulk: Bulk,
) -> None:
    """Plan one run: ``nbytes`` from ``run_begin`` in the buffer (at ``start`` in the file)."""
    torch = arrays.require_torch()
    buffer = arrays.empty_cpu((nbytes,), torch.uint8)
    view = arrays.writable_bytes(buffer)
    assert view is not None  # a new contiguous CPU tensor
    plan.add(file, start + run_begin, view, _builder(buffer, run_begin, columns, values, bulk))


def _builder(
    buffer: Any, run_begin: int, columns: _Columns, values: dict[int, Any], bulk: Bulk
) -> Callable[[], None]:
    def build() -> None:
        indices, torch_dtypes, shapes, begins, numels, dests, one_each = columns
        count = len(indices)
        # load: every tensor new, each in memory of its own at offset 0, as torch.empty gives
        # (a view into the run would keep the whole run alive, and some of torch's own readers
        # of a tensor ignore its storage offset: torch.set_rng_state, "Invalid mt19937 state").
        # One split_with_sizes_copy per stretch makes them without a Python view of each.
        all_new = dests is None
        views: list[Any] = []
        view_dests: list[Any] = []  # one_each: the target of each of views
        dest_column: list[Any] = dests if dests is not None else []
        i = 0
        while i < count:  # one pass per stretch of one dtype (one, in the usual run)
            torch_dtype, first = torch_dtypes[i], begins[i] - run_begin
            j = count if torch_dtypes.count(torch_dtype) == count else i + 1
            while j < count and torch_dtypes[j] is torch_dtype:
                j += 1
            size = torch_dtype.itemsize
            raw = buffer[first : begins[j - 1] - run_begin + numels[j - 1] * size]
            if first % size:  # not in a writer's layout (wider dtypes first); kept correct anyway
                raw = raw.clone()
            typed = raw.view(torch_dtype)
            parts: Sequence[Any]
            one_d = set(map(len, shapes[i:j])) == {1}
            if all_new:
                parts = _own_copies(typed, numels[i:j])
            elif one_each and one_d:  # copied in one call, once every read is checked
                bulk.splits.append((typed, numels[i:j], dest_column[i:j]))
                i = j
                continue
            else:
                parts = typed.split_with_sizes(numels[i:j]) if j - i > 1 else (typed,)
                if one_each:
                    view_dests += dest_column[i:j]
            if one_d:
                views.extend(parts)  # 1-d tensors: the split gives them their shape
            else:
                # A copy takes its shape in place (resize_ to its own element count: a
                # tensor of its own, no view of it with a _base), a view of the run by view().
                views.extend(
                    p if len(shape) == 1 else p.resize_(shape) if all_new else p.view(shape)
                    for p, shape in zip(parts, shapes[i:j], strict=True)
                )
            i = j
        if dests is None:  # load: every tensor new, a copy already
            values.update(zip(indices, views, strict=True))
            return
        if one_each:  # load_into's usual run: one target each, the dests themselves
            values.update(zip(indices, dests, strict=True))
            bulk.targets += view_dests
            bulk.views += views
            return
        fresh: list[int] = []
        fresh_views: list[Any] = []
        for index, view, targets in zip(indices, views, dests, strict=True):
            if targets is None:
                fresh.append(index)
                fresh_views.append(view)
                continue
            values[index] = targets[0]
            for target in targets:
                bulk.targets.append(target)
                bulk.views.append(view)
        values.update(zip(fresh, _clone(fresh_views), strict=True))

    return build


def _own_copies(flat: Any, numels: list[int]) -> list[Any]:
    """The consecutive pieces of the 1-d ``flat`` of ``numels`` elements, each a contiguous
    copy with memory of its own, in one C call (no Python view of each piece on the way)."""
    split_copy = getattr(arrays.require_torch(), "split_with_sizes_copy", None)
    if split_copy is None:
        return _clone(list(flat.split_with_sizes(numels)))

    def copies(a: int, b: int) -> list[Any]:  # (on two cores: ~2 us a tensor of torch's C++)
        return list(split_copy(flat.narrow(0, sum(numels[:a]), sum(numels[a:b])), numels[a:b]))

    return _in_two_as_caller(copies, len(numels))


def _clone(views: list[Any]) -> list[Any]:
    """Contiguous copies of ``views``, each with memory of its own (one C call for all)."""
    torch = arrays.require_torch()
    clone_all = getattr(torch, "_foreach_clone", None)
    if clone_all is not None and views:
        return list(clone_all(views))
    return [v.clone() for v in views]
