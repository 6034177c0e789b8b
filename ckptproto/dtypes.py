"""The element types a checkpoint can hold, and how each maps to torch, numpy and safetensors.

A dtype is named in the manifest by its canonical name (``"bfloat16"``, ``"float8_e4m3fn"``).
Where safetensors has a code for it (``"BF16"``), data files store the tensor under that code;
otherwise the tensor is stored as raw bytes (``U8`` with shape ``[nbytes]``) and only the
manifest knows the true dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ckptproto.errors import CheckpointFormatError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    """One element type: canonical ``name``, bytes per element, and its names elsewhere."""

    name: str
    itemsize: int
    safetensors: str | None  # None: stored as raw bytes (U8) in the data file
    numpy_name: str | None  # numpy dtype name, None where numpy has no such type
    torch_name: str | None  # attribute of the torch module, None where torch has no such type

    def numpy_dtype(self) -> np.dtype[Any]:
        """The little-endian numpy dtype; raises for dtypes numpy lacks (e.g. bfloat16)."""
        if self.numpy_name is None:
            raise CheckpointFormatError(f"numpy has no dtype {self.name!r}; load it as a torch tensor")
        return np.dtype(self.numpy_name).newbyteorder("<")

    def torch_dtype(self) -> torch.dtype:
        """The torch dtype; imports torch."""
        found = _TORCH_DTYPES.get(self.name)  # once per dtype, not per tensor loaded
        if found is not None:
            return found
        import torch

        if self.torch_name is None or not hasattr(torch, self.torch_name):
            raise CheckpointFormatError(
                f"this torch ({torch.__version__}) has no dtype {self.name!r}; upgrade torch to load it"
            )
        result: torch.dtype = getattr(torch, self.torch_name)
        _TORCH_DTYPES[self.name] = result
        return result


_TORCH_DTYPES: dict[str, torch.dtype] = {}


def _d(name: str, itemsize: int, st: str | None, numpy: bool, torch: bool = True) -> DType:
    return DType(name, itemsize, st, name if numpy else None, name if torch else None)


_TABLE: tuple[DType, ...] = (
    _d("float64", 8, "F64", True),
    _d("float32", 4, "F32", True),
    _d("float16", 2, "F16", True),
    _d("bfloat16", 2, "BF16", False),
    _d("float8_e4m3fn", 1, "F8_E4M3", False),
    _d("float8_e4m3fnuz", 1, "F8_E4M3FNUZ", False),
    _d("float8_e5m2", 1, "F8_E5M2", False),
    _d("float8_e5m2fnuz", 1, "F8_E5M2FNUZ", False),
    _d("float8_e8m0fnu", 1, None, False),
    _d("float4_e2m1fn_x2", 1, None, False),
    _d("complex128", 16, None, True),
    _d("complex64", 8, "C64", True),
    _d("complex32", 4, None, False),
    _d("int64", 8, "I64", True),
    _d("int32", 4, "I32", True),
    _d("int16", 2, "I16", True),
    _d("int8", 1, "I8", True),
    _d("uint64", 8, "U64", True),
    _d("uint32", 4, "U32", True),
    _d("uint16", 2, "U16", True),
    _d("uint8", 1, "U8", True),
    _d("bool", 1, "BOOL", True),
    # torch's bit-container and sub-byte placeholder dtypes: one byte (two for bits16) per
    # element in memory, stored as those raw bytes.
    _d("bits8", 1, None, False),
    _d("bits16", 2, None, False),
    _d("bits1x8", 1, None, False),
    _d("bits2x4", 1, None, False),
    _d("bits4x2", 1, None, False),
    *(_d(f"int{n}", 1, None, False) for n in range(1, 8)),
    *(_d(f"uint{n}", 1, None, False) for n in range(1, 8)),
)

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
_BY_NUMPY: dict[str, DType] = {d.numpy_name: d for d in _TABLE if d.numpy_name is not None}
SAFETENSORS_ITEMSIZE: dict[str, int] = {d.safetensors: d.itemsize for d in _TABLE if d.safetensors}
# torch's quantized dtypes carry scale/zero-point outside their bytes; storing the bytes alone
# would silently lose that, so they are refused.
QUANTIZED_TORCH = frozenset({"qint8", "quint8", "qint32", "quint4x2", "quint2x4"})


def by_name(name: object) -> DType:
    """Look a manifest dtype name up: ``by_name("bfloat16").itemsize == 2``."""
    if not isinstance(name, str) or name not in BY_NAME:
        raise CheckpointFormatError(f"unknown dtype {name!r}")
    return BY_NAME[name]


def from_torch(dtype: torch.dtype) -> DType | None:
    """The DType for a torch dtype, or None when it cannot be stored (quantized dtypes)."""
    return BY_NAME.get(str(dtype).removeprefix("torch."))


def from_numpy(dtype: np.dtype[Any]) -> DType | None:
    """The DType for a numpy dtype (either byte order), or None for object, string, time..."""
    if dtype.kind not in "biufc" or dtype.fields is not None or dtype.subdtype is not None:
        return None
    found = _BY_NUMPY.get(dtype.name)
    # longdouble is 80-bit x87 on one machine and IEEE quad on another under the same name:
    # refused rather than stored in a way another machine misreads.
    if found is None or found.itemsize != dtype.itemsize:
        return None
    return found
