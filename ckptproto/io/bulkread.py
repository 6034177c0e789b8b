"""Small tensors read in bulk: the per-tensor cost of a load of many small tensors.

Allocating, planning and reading each tensor on its own costs several microseconds of Python
and torch calls per tensor (a large MoE state holds 100,000-300,000 of them). When a data
file's header is the one ckptproto's writer makes (``DataFile.layout``, io/headercheck.py),
the reader knows where every tensor lies without a lookup, and neighbouring small tensors are
read as one run: one buffer, one read (CRC computed on the way, as for any read), then one
``split_with_sizes`` per dtype gives the tensors as views of it::

    plan = ReadPlan()
    taken = plan_small(ckpt, kinds, plan, values)   # values[index] is filled after execute
    execute(ckpt, plan, verify=True)

The tensors of one run share its memory (at most RUN_BYTES): one of them kept alive keeps
the run alive, and ``torch.save`` of one such tensor alone writes its run. Tensors over
SMALL_BYTES get their own memory as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ckptproto import arrays
from ckptproto.arrays import Kind
from ckptproto.dtypes import DType

if TYPE_CHECKING:
    from ckptproto.io.reader import OpenCheckpoint


class ReadPlan(Protocol):
    """What this module needs of ``readplan.ReadPlan`` (which imports this module)."""

    def add(
        self, file: str, begin: int, dest: memoryview, after: Callable[[], None] | None = None
    ) -> None: ...


SMALL_BYTES = 64 << 10  # a tensor up to this size may share a run's memory
RUN_BYTES = 1 << 20  # the most one run holds

# One tensor of a run: (tensor index, torch dtype, shape, begin in the run, element count).
_Item = tuple[int, Any, tuple[int, ...], int, int]


def _torch_dtype(dtype: DType) -> Any:
    """The torch dtype a run may view its bytes as, or None: a dtype stored under its own
    safetensors code whose item size is a power of two up to 8 (no sub-byte or raw-stored
    dtype, whose views torch may lack)."""
    if dtype.safetensors is None or dtype.torch_name is None or dtype.itemsize not in (1, 2, 4, 8):
        return None
    return dtype.torch_dtype()


def plan_small(
    ckpt: OpenCheckpoint, kinds: dict[int, tuple[Kind, list[str]]], plan: ReadPlan, values: dict[int, Any]
) -> set[int]:
    """Schedule every small, whole torch tensor of ``kinds`` stored in a file whose layout is
    known into runs read by ``plan``; after the plan runs (CRCs checked), ``values[index]``
    holds each of them. Returns the indices scheduled; the caller plans the others."""
    tensors = ckpt.manifest.tensors
    taken: set[int] = set()
    usable: dict[int, Any] = {}  # id(DType) -> torch dtype or None (DTypes live in dtypes.BY_NAME)
    for name, data_file in ckpt.files.items():
        layout = data_file.layout
        if layout is None:
            continue
        start = len(data_file.header)
        items: list[_Item] = []
        run_begin = run_end = 0
        for (index, _number), (_key, _code, _shape, begin, end) in zip(
            layout.owners, layout.entries, strict=True
        ):
            found = kinds.get(index)
            tensor = tensors[index]
            if found is None or found[0] != "torch" or len(tensor.chunks) != 1 or end - begin > SMALL_BYTES:
                continue
            dtype = tensor.dtype
            torch_dtype = usable.get(id(dtype), usable)
            if torch_dtype is usable:
                torch_dtype = usable[id(dtype)] = _torch_dtype(dtype)
            if torch_dtype is None:
                continue
            if items and (begin != run_end or end - run_begin > RUN_BYTES):
                _flush(plan, name, start + run_begin, run_end - run_begin, items, values)
                items = []
            if not items:
                run_begin = begin
            items.append(
                (index, torch_dtype, tensor.shape, begin - run_begin, (end - begin) // dtype.itemsize)
            )
            run_end = end
            taken.add(index)
        if items:
            _flush(plan, name, start + run_begin, run_end - run_begin, items, values)
    return taken


def _flush(
    plan: ReadPlan, file: str, at: int, nbytes: int, items: list[_Item], values: dict[int, Any]
) -> None:
    torch = arrays.require_torch()
    buffer = arrays.empty_cpu((nbytes,), torch.uint8)
    plan.add(file, at, arrays.writable_bytes(buffer) or memoryview(b""), _builder(buffer, items, values))


def _builder(buffer: Any, items: list[_Item], values: dict[int, Any]) -> Callable[[], None]:
    def build() -> None:
        i, count = 0, len(items)
        while i < count:
            torch_dtype, first = items[i][1], items[i][3]
            j = i + 1
            while j < count and items[j][1] is torch_dtype:
                j += 1
            group = items[i:j]
            last = group[-1]
            size = torch_dtype.itemsize
            end = last[3] + last[4] * size
            raw = buffer[first:end]
            if first % size:  # cannot happen in a writer's layout (wider dtypes first); kept correct
                raw = raw.clone()
            typed = raw.view(torch_dtype)
            parts = typed.split_with_sizes([item[4] for item in group]) if len(group) > 1 else (typed,)
            for (index, _dtype, shape, _begin, _numel), part in zip(group, parts, strict=True):
                values[index] = part if len(shape) == 1 else part.view(shape)
            i = j

    return build
