"""Tensors and arrays as bytes: the one place that knows how torch and numpy lay memory out.

torch is never imported here unless the caller already imported it (a state cannot hold a torch
tensor otherwise), or a checkpoint being loaded holds torch tensors.
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from ckptproto import dtypes
from ckptproto.dtypes import DType
from ckptproto.errors import CheckpointError

if TYPE_CHECKING:
    import torch

Kind = Literal["torch", "numpy"]


def loaded_torch() -> Any:
    """The torch module if the process already imported it, else None (never imports it)."""
    return sys.modules.get("torch")


def require_torch() -> Any:
    """Import torch, or explain that this checkpoint needs it."""
    global _TORCH
    if _TORCH is not None:
        return _TORCH  # an import statement per tensor allocated costs more than the check
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - the test environment has torch
        raise CheckpointError(
            "this checkpoint holds torch tensors; install torch (pip install 'ckptproto[torch]')"
        ) from exc
    _TORCH = torch
    return torch


_TORCH: Any = None


def is_torch_tensor(value: object) -> bool:
    torch = loaded_torch()
    return torch is not None and isinstance(value, torch.Tensor)


@dataclass(frozen=True, init=False)
class ArraySpec:
    """What the format needs to know about one tensor or array::

        spec = ArraySpec("torch", dtypes.by_name("float32"), (4, 2))   # spec.nbytes == 32

    Specs are immutable, so equal ones are shared: a state of 100,000 tensors has a few
    distinct specs, and one is built (numel and nbytes computed) per distinct spec, not per
    tensor (a frozen dataclass costs over a microsecond to construct)."""

    kind: Kind
    dtype: DType
    shape: tuple[int, ...]
    numel: int = field(repr=False, compare=False)
    nbytes: int = field(repr=False, compare=False)

    def __new__(cls, kind: Kind, dtype: DType, shape: tuple[int, ...]) -> ArraySpec:
        # By the dtype's identity: DType's dataclass hash is a Python call per lookup. The
        # cached spec holds its dtype, so that id is not reused while the entry lives.
        key = (kind, id(dtype), shape)
        try:
            found = _SPECS.get(key)
        except TypeError:  # a shape that cannot be hashed (a list): built, not shared
            return _new_spec(cls, kind, dtype, tuple(shape))
        if found is None:
            found = _new_spec(cls, kind, dtype, tuple(shape))
            if len(_SPECS) >= _MAX_SPECS:
                _SPECS.clear()  # a process that saw many shapes: start over, memory stays flat
            _SPECS[key] = found
        return found

    def __getnewargs__(self) -> tuple[Kind, DType, tuple[int, ...]]:
        return self.kind, self.dtype, self.shape  # pickle and copy go through __new__


def _new_spec(cls: type[ArraySpec], kind: Kind, dtype: DType, shape: tuple[int, ...]) -> ArraySpec:
    spec = object.__new__(cls)
    numel = math.prod(shape)
    for name, value in (("kind", kind), ("dtype", dtype), ("shape", shape), ("numel", numel)):
        object.__setattr__(spec, name, value)
    object.__setattr__(spec, "nbytes", numel * dtype.itemsize)
    return spec


_SPECS: dict[tuple[Any, ...], ArraySpec] = {}
_MAX_SPECS = 4096


_torch_dtypes: dict[Any, DType | None] = {}


def _torch_dtype(dtype: Any) -> DType | None:
    found = _torch_dtypes.get(dtype, _torch_dtypes)
    if found is _torch_dtypes:
        found = _torch_dtypes[dtype] = dtypes.from_torch(dtype)
    return found  # type: ignore[return-value]


def _torch_constants() -> tuple[Any, Any, Any]:
    """``(torch.Tensor, torch.nn.Parameter, torch.strided)``, looked up once per process."""
    global _TORCH_CONSTANTS
    if _TORCH_CONSTANTS is None:
        torch = require_torch()
        _TORCH_CONSTANTS = (torch.Tensor, torch.nn.Parameter, torch.strided)
    return _TORCH_CONSTANTS


_TORCH_CONSTANTS: tuple[Any, Any, Any] | None = None


def describe_torch(t: torch.Tensor) -> ArraySpec | str:
    """The spec of a torch tensor, or why the format cannot store it as plain bytes."""
    tensor_type, parameter_type, strided = _torch_constants()
    if type(t) is not tensor_type and type(t) is not parameter_type:
        return (
            f"tensor subclass {type(t).__module__}.{type(t).__qualname__} is not supported; "
            "save its local or full tensor instead"
        )
    d = _torch_dtype(t.dtype)
    if d is None:
        if t.is_quantized or str(t.dtype).removeprefix("torch.") in dtypes.QUANTIZED_TORCH:
            return f"quantized dtype {t.dtype} is not supported; dequantize() it first"
        return f"dtype {t.dtype} is not supported"
    if t.layout is not strided:
        return f"{t.layout} tensors are not supported; call .to_dense() first"
    try:
        shape = t.shape  # a torch.Size: hashed and compared as the tuple it is
    except RuntimeError:  # a (strided) nested tensor has no single shape; jagged ones another layout
        return (
            "nested tensors are not supported; save t.unbind() (a list of tensors) or t.to_padded_tensor(0)"
        )
    if t.is_meta:
        return "meta tensors hold no data"
    return ArraySpec("torch", d, shape)


def describe_numpy(a: np.ndarray[Any, Any]) -> ArraySpec | str:
    """The spec of a numpy array, or why the format cannot store it."""
    if type(a) is not np.ndarray:
        return f"ndarray subclass {type(a).__qualname__} is not supported; pass np.asarray(value)"
    d = dtypes.from_numpy(a.dtype)
    if d is None:
        return f"numpy dtype {a.dtype} is not supported (numeric and bool dtypes only)"
    return ArraySpec("numpy", d, tuple(a.shape))


def describe(value: Any) -> ArraySpec | str:
    """The spec of a tensor or array, or a reason it cannot be stored."""
    if isinstance(value, np.ndarray):
        return describe_numpy(value)
    return describe_torch(value)


def try_spec(value: Any) -> ArraySpec | None:
    """Spec of any tensor/array, or None if the format cannot hold it."""
    if not isinstance(value, np.ndarray) and not is_torch_tensor(value):
        return None
    spec = describe(value)
    return spec if isinstance(spec, ArraySpec) else None


def identity(value: Any) -> tuple[Any, ...]:
    """Equal for two objects that are the same view of the same memory (tied weights) and
    read the same values from it: torch's lazy conjugate and negative bits are part of the
    view (``c.conj()`` shares ``c``'s memory, offset, shape and strides, yet holds other values)."""
    if value.size == 0 if isinstance(value, np.ndarray) else value.numel() == 0:
        # Empty tensors all share the null data pointer: only the very same object is tied.
        return ("empty", id(value))
    if isinstance(value, np.ndarray):
        ai = value.__array_interface__
        return ("numpy", ai["data"][0], value.shape, value.strides, value.dtype.str)
    return torch_identity(value, tuple(value.shape))


def torch_identity(value: Any, shape: tuple[int, ...]) -> tuple[Any, ...]:
    """:func:`identity` of a non-empty torch tensor whose ``shape`` the caller already has.
    The address of the first element (``data_ptr``: the storage's address plus the offset) with
    shape, strides and dtype fixes which bytes a view reads."""
    return (
        "torch",
        "cpu" if value.is_cpu else value.device,  # .device builds an object: ~0.3 us a tensor
        value.data_ptr(),
        shape,
        value.stride(),
        value.dtype,
        value.is_conj(),
        value.is_neg(),
    )


def _raw_view(address: int, nbytes: int) -> memoryview:
    """A byte view of memory the caller keeps alive (the tensor it belongs to)."""
    if nbytes == 0:
        return memoryview(b"")
    array_type = _ARRAY_TYPES.get(nbytes)
    if array_type is None:  # ``c_ubyte * n`` costs as much as the view: once per size
        if len(_ARRAY_TYPES) >= _MAX_SPECS:
            _ARRAY_TYPES.clear()
        array_type = _ARRAY_TYPES[nbytes] = ctypes.c_ubyte * nbytes
    return memoryview(array_type.from_address(address))


_ARRAY_TYPES: dict[int, Any] = {}


def host_bytes(value: Any) -> tuple[memoryview, Any]:
    """A flat, C-ordered, little-endian byte view of a CPU tensor/array, plus the object that
    owns that memory (keep it alive while the view is used). Copies only when the input is not
    contiguous, is big-endian, or has lazy conj/neg bits."""
    if isinstance(value, np.ndarray):
        arr = value
        if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and sys.byteorder == "big"):
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        return _raw_view(arr.ctypes.data, arr.nbytes), arr
    t = value
    if not t.is_cpu:  # t.device builds a Python object: ~1 us, paid per tensor
        raise CheckpointError(f"host_bytes needs a CPU tensor, got one on {t.device}")
    if t.is_conj() or t.is_neg():
        t = t.detach().resolve_conj().resolve_neg()
    if not t.is_contiguous():
        t = _contiguous(t.detach())
    return _raw_view(t.data_ptr(), t.nbytes), t


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """A C-ordered copy; torch has no copy kernel (nor, in deterministic mode, fill kernel)
    for its bit and sub-byte dtypes (uint1..7, int1..7, bits*), so those are copied as the
    integer dtype of their width."""
    try:
        return t.contiguous()
    except RuntimeError:  # NotImplementedError: "copy_kernel" not implemented for 'UInt4'
        same_width = same_width_int(t.dtype)
        if same_width is None:
            raise
        return t.view(same_width).contiguous().view(t.dtype)


def to_host_bytes(value: Any) -> tuple[memoryview, Any]:
    """Like :func:`host_bytes`, for a tensor on any device: a device tensor is first copied to
    the host (synchronously; the async saver stages device tensors its own way)."""
    if isinstance(value, np.ndarray):
        return host_bytes(value)
    if not value.is_cpu:
        value = value.detach().cpu()
    elif value.is_contiguous() and not value.is_conj() and not value.is_neg():
        return _raw_view(value.data_ptr(), value.nbytes), value  # the usual tensor, no copy
    return host_bytes(value)


class HostRanges(Sequence[memoryview]):
    """Ranges of host memory, ``sizes[i]`` bytes at ``addresses[i]`` (none empty), as a
    sequence of memoryviews each made when asked for; :meth:`take` gives the ranges in
    another order and :meth:`joined` the bytes of all of them back to back, in numpy copies
    with no Python object per range (a state of many small tensors: ~0.1 µs a tensor, where
    a view each and a join cost 1–2). The memory is the caller's to keep alive::

        ranges = HostRanges([a0, a1], [16, 8])
        bytes(ranges[1])      # the 8 bytes at a1
        ranges.joined()       # the 24 bytes, a numpy uint8 array
    """

    __slots__ = ("_low", "_whole", "addresses", "sizes")

    def __init__(self, addresses: Any, sizes: Any, span: tuple[int, memoryview] | None = None) -> None:
        self.addresses = np.asarray(addresses, dtype=np.uint64)  # (a tagged pointer may pass 2**63)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if len(self.addresses) != len(self.sizes) or (len(self.sizes) and int(self.sizes.min()) < 1):
            raise ValueError("HostRanges: one size (at least 1) for each address")
        if span is None:
            span = _span(self.addresses.tolist(), self.sizes.tolist()) if len(self.sizes) else (0, _EMPTY)
        self._low, self._whole = span

    def __len__(self) -> int:
        return len(self.sizes)

    @overload
    def __getitem__(self, index: int) -> memoryview: ...

    @overload
    def __getitem__(self, index: slice) -> HostRanges: ...

    def __getitem__(self, index: int | slice) -> memoryview | HostRanges:
        if isinstance(index, slice):
            return HostRanges(self.addresses[index], self.sizes[index], (self._low, self._whole))
        i = range(len(self))[index]  # IndexError past the end, as a list (and iteration) wants
        start = int(self.addresses[i]) - self._low
        return self._whole[start : start + int(self.sizes[i])]

    def take(self, order: list[int]) -> HostRanges:
        """The ranges ``order[0]``, ``order[1]``, ...: ``ranges.take([1, 0])``."""
        at = np.asarray(order, dtype=np.intp)
        return HostRanges(self.addresses[at], self.sizes[at], (self._low, self._whole))

    @property
    def nbytes(self) -> int:
        return int(self.sizes.sum())

    def joined(self) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """Every range's bytes, one after another, in a new array."""
        sizes = self.sizes
        if len(sizes) and sizes.min() == sizes.max():  # one size: the gathered rows are the bytes
            return self._rows_of(int(sizes[0]), slice(None)).reshape(-1)
        out = np.empty(int(sizes.sum()), dtype=np.uint8)
        self.copy_into(out, np.cumsum(sizes) - sizes)
        return out

    def copy_into(self, out: np.ndarray[Any, np.dtype[np.uint8]], offsets: Any) -> None:
        """Copy range ``i``'s bytes to ``out[offsets[i] : offsets[i] + sizes[i]]`` (``out``: a
        1-d uint8 array, each range's place inside it), with no Python object per range::

            ranges.copy_into(slab, np.array([0, 64]))   # range 0 at byte 0, range 1 at 64
        """
        sizes = self.sizes
        if not len(sizes):
            return
        places = np.asarray(offsets, dtype=np.int64)
        if len(places) != len(sizes) or int(places.min()) < 0 or int((places + sizes).max()) > len(out):
            raise ValueError("HostRanges.copy_into: a place for each range, inside the array")
        distinct = sizes[:1] if sizes.min() == sizes.max() else np.unique(sizes)
        if len(distinct) > _JOIN_SIZES_MAX:  # a copy per size would cost more than a view each
            views = _slices(self.addresses.tolist(), sizes.tolist(), (self._low, self._whole))
            for view, place in zip(views, places.tolist(), strict=True):
                out[place : place + len(view)] = np.frombuffer(view, dtype=np.uint8)
            return
        for size in distinct.tolist():
            chosen = slice(None) if len(distinct) == 1 else sizes == size
            at = places[chosen]
            first = int(at[0])
            if (np.diff(at) == size).all():  # back to back: one block of rows
                out[first : first + len(at) * size].reshape(-1, size)[...] = self._rows_of(size, chosen)
            else:
                _rows(out, size)[at] = self._rows_of(size, chosen)

    def _rows_of(self, size: int, chosen: Any) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The ``chosen`` ranges (each ``size`` bytes) as the rows of a new array. A range of s
        bytes is a row of the (overlapping) rows of s bytes that start at each byte of the
        span: one fancy-indexed copy takes them all (never ``np.take``, which would first copy
        those rows whole: the span's size times s)."""
        starts = (self.addresses[chosen] - np.uint64(self._low)).astype(np.intp)
        return _rows(np.frombuffer(self._whole, dtype=np.uint8), size)[starts]  # type: ignore[no-any-return]


# Distinct sizes from which HostRanges.joined joins views instead (a numpy copy per size).
_JOIN_SIZES_MAX = 64


def _rows(array: np.ndarray[Any, Any], size: int) -> np.ndarray[Any, Any]:
    """The rows of ``size`` bytes of the 1-d ``array`` starting at each of its bytes (a view)."""
    return np.lib.stride_tricks.as_strided(array, shape=(len(array) - size + 1, size), strides=(1, 1))


def host_views(
    values: list[Any], addresses: list[int], sizes: list[int]
) -> tuple[Sequence[memoryview], list[Any]]:
    """:func:`to_host_bytes` of each of ``values``: their byte views, and the objects that own
    that memory (keep them alive while the views are used)::

        views, owners = host_views(values, addresses, sizes)

    ``addresses[i]``: where the ``sizes[i]`` bytes of ``values[i]``, a contiguous CPU tensor
    without lazy conj/neg bits, were found (``tree.TensorLeaf.host_address``), or 0 for any
    other value. Those (most of a state) are slices of one view of the address range they all
    lie in: a ctypes view per tensor costs ten times a slice."""
    if values and 0 not in addresses and 0 not in sizes:
        # The usual state, every value a plain tensor with bytes: when each still lies where
        # it was found (checked in one pass), its bytes are ranges of the span they all lie
        # in (HostRanges: no view made per tensor unless one is asked for).
        torch = loaded_torch()
        if torch is not None and list(map(torch.Tensor.data_ptr, values)) == addresses:
            return HostRanges(addresses, sizes, _span(addresses, sizes)), list(values)
    owners = list(values)
    views: list[memoryview] = [_EMPTY] * len(values)
    at: list[int] = []  # the tensors viewed in place: indices, addresses, sizes
    ptrs: list[int] = []
    lengths: list[int] = []
    for i, (value, address, nbytes) in enumerate(zip(values, addresses, sizes, strict=True)):
        if address and nbytes and value.data_ptr() == address:
            at.append(i)
            ptrs.append(address)
            lengths.append(nbytes)
        else:  # not described as plain, empty, or its storage was swapped since
            views[i], owners[i] = to_host_bytes(value)
    if at:
        for i, view in zip(at, _slices(ptrs, lengths), strict=True):
            views[i] = view
    return views, owners


def _slices(
    addresses: list[int], sizes: list[int], span: tuple[int, memoryview] | None = None
) -> list[memoryview]:
    """A view of the ``sizes[i]`` bytes at each ``addresses[i]`` (none empty), each a slice of
    one view of the range they all lie in (``span``: :func:`_span` of them, if known): a
    ctypes view per tensor costs ten times a slice."""
    low, whole = _span(addresses, sizes) if span is None else span
    return [whole[ptr - low : ptr - low + nbytes] for ptr, nbytes in zip(addresses, sizes, strict=True)]


def _span(addresses: list[int], sizes: list[int]) -> tuple[int, memoryview]:
    """The lowest of ``addresses`` and a view of memory from there past the last byte of the
    ranges (nothing reads beyond them)."""
    low = min(addresses)
    span = max(map(int.__add__, addresses, sizes)) - low
    # ctypes keeps every array type it made: a power of two bounds them to a few dozen.
    return low, memoryview((ctypes.c_ubyte * (1 << (span - 1).bit_length())).from_address(low))


_EMPTY = memoryview(b"")


def allocate(spec: ArraySpec) -> tuple[Any, memoryview]:
    """A new uninitialised tensor/array for ``spec`` and a writable byte view of it."""
    if spec.kind == "numpy":
        arr = np.empty(spec.shape, dtype=spec.dtype.numpy_dtype())
        return arr, _raw_view(arr.ctypes.data, arr.nbytes)
    t = empty_cpu(spec.shape, spec.dtype.torch_dtype())
    return t, _raw_view(t.data_ptr(), spec.nbytes)


_CPU: Any = None


def empty_cpu(shape: tuple[int, ...], dtype: Any) -> Any:
    """``torch.empty`` on the CPU whatever torch's global modes: the default device
    (``torch.set_default_device("meta")`` would hand out memory that cannot be written) and
    ``torch.use_deterministic_algorithms(True)``, under which torch fills new memory and has no
    fill kernel for its bit and sub-byte dtypes (uint1..7, int1..7, bits*, float4_e2m1fn_x2):
    those are allocated as a same-width integer tensor and viewed as their dtype."""
    torch = require_torch()
    global _CPU
    if _CPU is None:
        _CPU = torch.device("cpu")  # a device object: torch parses a "cpu" string on every call
    try:
        return torch.empty(shape, dtype=dtype, device=_CPU)
    except RuntimeError:  # NotImplementedError: "fill_empty_deterministic_" not implemented
        same_width = same_width_int(dtype)
        if same_width is None:
            raise
        return torch.empty(shape, dtype=same_width, device="cpu").view(dtype)


def same_width_int(dtype: Any) -> Any:
    """The torch integer dtype as wide as ``dtype`` (None past 8 bytes): a view as it has the
    kernels (fill, copy) torch lacks for its bit and sub-byte dtypes."""
    torch = require_torch()
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(dtype.itemsize)


def from_buffer(spec: ArraySpec, buffer: Any, offset: int) -> Any:
    """A tensor/array backed by ``buffer[offset : offset + nbytes]`` (no copy), or None if the
    bytes are not aligned for the dtype."""
    if spec.nbytes == 0 or offset % min(spec.dtype.itemsize, 8):
        return None
    if spec.kind == "numpy":
        return np.frombuffer(buffer, dtype=spec.dtype.numpy_dtype(), count=spec.numel, offset=offset).reshape(
            spec.shape
        )
    torch = require_torch()
    flat = torch.frombuffer(buffer, dtype=torch.uint8, count=spec.nbytes, offset=offset)
    return flat.view(spec.dtype.torch_dtype()).reshape(spec.shape)


def byte_grid(value: Any, spec: ArraySpec) -> np.ndarray[Any, Any]:
    """A writable uint8 numpy view of a contiguous CPU tensor/array, shaped like the tensor
    with the last dimension widened by the item size (so chunk slices become byte slices)."""
    view, _owner = host_bytes(value)
    grid = np.frombuffer(view, dtype=np.uint8)
    if not spec.shape:
        return grid
    return grid.reshape(*spec.shape[:-1], spec.shape[-1] * spec.dtype.itemsize)


def writable_bytes(value: Any) -> memoryview | None:
    """A byte view straight into an existing CPU tensor/array that can be overwritten in place,
    or None if it is not contiguous / not on the CPU (the caller then copies)."""
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous or not value.flags.writeable or value.dtype.byteorder == ">":
            return None
        return _raw_view(value.ctypes.data, value.nbytes)
    if not value.is_cpu or not value.is_contiguous() or value.is_conj() or value.is_neg():
        return None
    return _raw_view(value.data_ptr(), value.numel() * value.element_size())


def to_device(value: Any, map_location: Any) -> Any:
    """Move a loaded torch tensor to ``map_location`` (numpy arrays are returned unchanged)."""
    if map_location is None or isinstance(value, np.ndarray):
        return value
    return value.to(map_location)


def copy_bytes(dst: Any, src: Any) -> bool:
    """Copy the bytes of ``src``, a contiguous CPU tensor, over those of ``dst`` if ``dst`` is
    a contiguous, writable CPU tensor of as many bytes, as a read into ``dst`` writes them
    (whatever torch's autograd or inference-mode rules say of an in-place copy); False, and
    nothing written, when it is not::

        copy_bytes(target, loaded)   # True: target now holds loaded's bytes
    """
    view = writable_bytes(dst)
    if view is None or len(view) != src.nbytes:
        return False
    if src.nbytes:
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), src.nbytes)
    return True


def all_match_torch(tensors: list[Any], dtype_column: list[DType], shapes: list[tuple[int, ...]]) -> bool:
    """:func:`matches_torch` of every ``tensors[i]`` (plain tensors or Parameters, the caller
    checked their exact types) against ``dtype_column[i]`` and ``shapes[i]``, in C-level
    passes over the columns (each distinct dtype pair compared once)::

        all_match_torch([torch.zeros(2)], [dtypes.by_name("float32")], [(2,)])   # True
    """
    _tensor_type, _parameter_type, strided = _torch_constants()
    torch_dtypes = list(map(_DTYPE_ATTR, tensors))
    if len(torch_dtypes) != len(dtype_column):
        return False
    # Each distinct (torch dtype, stored dtype) pair compared once: in a state of one dtype,
    # found without a pair per tensor.
    pairs: Iterable[tuple[Any, DType]]
    if len(set(torch_dtypes)) == 1 and len(set(map(id, dtype_column))) == 1:
        pairs = [(torch_dtypes[0], dtype_column[0])]
    else:
        by_id = dict(zip(map(id, dtype_column), dtype_column, strict=True))
        pairs = [(t, by_id[i]) for t, i in set(zip(torch_dtypes, map(id, dtype_column), strict=True))]
    for torch_dtype, dtype in pairs:
        found = _torch_dtype(torch_dtype)
        if found is None or (found is not dtype and found != dtype):
            return False
    return (
        set(map(_LAYOUT_ATTR, tensors)) <= {strided}
        and not any(map(_IS_NESTED, tensors))
        and not any(map(_IS_META, tensors))
        and list(map(_SHAPE_ATTR, tensors)) == shapes
    )


_DTYPE_ATTR, _SHAPE_ATTR, _LAYOUT_ATTR = attrgetter("dtype"), attrgetter("shape"), attrgetter("layout")
_IS_NESTED, _IS_META = attrgetter("is_nested"), attrgetter("is_meta")


def matches_torch(t: Any, dtype: DType, shape: tuple[int, ...]) -> bool:
    """Whether ``t``, a plain ``torch.Tensor`` or ``Parameter`` (the caller checked its exact
    type), is what :func:`describe_torch` describes as a torch tensor of ``dtype`` and
    ``shape``, without building that description (a load_into check per target tensor)::

        matches_torch(torch.zeros(2, 3), dtypes.by_name("float32"), (2, 3))   # True
    """
    _tensor_type, _parameter_type, strided = _torch_constants()
    found = _torch_dtype(t.dtype)
    if found is None or (found is not dtype and found != dtype):
        return False
    if t.layout is not strided or t.is_nested or t.is_meta:
        return False
    return bool(t.shape == shape)
