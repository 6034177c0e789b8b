"""Property tests: random trees of every legal leaf survive save -> load exactly."""

from __future__ import annotations

import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_same, quantized
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ckptproto

NUMPY_DTYPES = [
    np.dtype(n)
    for n in (
        "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
        "float16", "float32", "float64", "complex64", "complex128",
    )
]  # fmt: skip
QUANTIZED = {"qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
TORCH_DTYPES = sorted(
    {v for n in dir(torch) if isinstance(v := getattr(torch, n), torch.dtype)} - {None}, key=str
)
STORABLE_TORCH = [d for d in TORCH_DTYPES if str(d).removeprefix("torch.") not in QUANTIZED]
NEGATABLE = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16}
NEGATABLE |= {torch.int32, torch.int64, torch.complex64, torch.complex128, torch.uint8}

shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def numpy_arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dtype = draw(st.sampled_from(NUMPY_DTYPES))
    shape = draw(shapes)
    n = int(np.prod(shape)) if shape else 1
    # Random bytes, not random values: covers nan payloads, -0.0, subnormals, any bool byte
    # pattern numpy would never produce itself is avoided (bool bytes are 0/1).
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    arr = np.frombuffer(raw, dtype=dtype).copy().reshape(shape)
    if dtype.kind == "b":
        arr = np.frombuffer(bytes(b & 1 for b in raw), dtype=dtype).copy().reshape(shape)
    variant = draw(
        st.sampled_from(["plain", "transposed", "strided", "bigendian", "readonly", "reversed", "unaligned"])
    )
    if variant == "transposed" and arr.ndim >= 2:
        arr = arr.T
    elif variant == "strided" and arr.ndim >= 1:
        arr = np.repeat(arr, 2, axis=0)[::2]
    elif variant == "bigendian":
        arr = arr.byteswap().view(arr.dtype.newbyteorder(">"))
    elif variant == "readonly":
        arr.flags.writeable = False
    elif variant == "reversed" and arr.ndim >= 1:
        arr = arr[::-1]
    elif variant == "unaligned":
        buf = np.zeros(arr.nbytes + 1, dtype=np.uint8)
        arr = np.frombuffer(buf.data, dtype=dtype, count=arr.size, offset=1).reshape(arr.shape)
        arr[...] = np.frombuffer(raw, dtype=dtype).reshape(shape) if dtype.kind != "b" else arr
    return arr


@st.composite
def torch_tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(STORABLE_TORCH))
    shape = draw(shapes)
    size = torch.empty((), dtype=dtype).element_size()
    n = int(np.prod(shape)) if shape else 1
    raw = draw(st.binary(min_size=n * size, max_size=n * size))
    if dtype == torch.bool:
        raw = bytes(b & 1 for b in raw)
    t = torch.frombuffer(bytearray(raw) or bytearray(1), dtype=torch.uint8)[: n * size]
    t = t.view(dtype).reshape(shape)
    variant = draw(st.sampled_from(["plain", "transposed", "strided", "conj", "neg", "param"]))
    if variant == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif variant == "strided" and t.dim() >= 1:
        t = t.repeat_interleave(2, dim=0)[::2] if size > 1 or dtype in NEGATABLE else t[: t.shape[0] // 2]
    elif variant == "conj" and t.is_complex() and dtype != torch.complex32:
        t = t.conj()
    elif variant == "neg" and dtype in NEGATABLE:
        t = torch._neg_view(t)
    elif variant == "param" and (t.is_floating_point() or t.is_complex()):
        t = torch.nn.Parameter(t, requires_grad=False)
    return t


floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([-0.0, float("inf"), float("-inf")])
ints = (
    st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.sampled_from([2**64, -(2**63) - 1, 2**53, -(2**53)])
)
plain_leaves = st.none() | st.booleans() | ints | floats | st.text(max_size=8) | st.binary(max_size=8)
keys = (
    st.text(max_size=6)
    | st.text(max_size=4).map(lambda s: "$" + s)
    | st.sampled_from(["$torch", "$int", "$dict"])
    | ints
)


def containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(keys, children, max_size=4)
        | st.dictionaries(keys, children, max_size=4).map(lambda d: OrderedDict(reversed(d.items())))
    )


trees = st.dictionaries(
    keys,
    st.recursive(plain_leaves | numpy_arrays() | torch_tensors(), containers, max_leaves=12),
    max_size=5,
)


def _roundtrip(state: Any, path: Path) -> Any:
    ckptproto.save(state, path, overwrite=True)
    return ckptproto.load(path)


@given(state=trees)
def test_random_trees_round_trip(state: dict[Any, Any], tmp_path: Path) -> None:
    loaded = _roundtrip(state, tmp_path / "c")
    assert_same(state, loaded)


@given(arr=numpy_arrays())
def test_numpy_arrays_round_trip(arr: np.ndarray[Any, Any], tmp_path: Path) -> None:
    loaded = _roundtrip({"a": arr}, tmp_path / "c")["a"]
    assert_same(arr, loaded)
    assert loaded.flags.writeable


@given(t=torch_tensors())
def test_torch_tensors_round_trip(t: torch.Tensor, tmp_path: Path) -> None:
    loaded = _roundtrip({"t": t}, tmp_path / "c")["t"]
    assert_same(t, loaded)


@pytest.mark.parametrize("dtype", STORABLE_TORCH, ids=str)
def test_every_torch_dtype(dtype: torch.dtype, tmp_ckpt: Path) -> None:
    size = torch.empty((), dtype=dtype).element_size()
    raw = bytearray((i * 37 + 11) % 256 for i in range(6 * size))
    if dtype == torch.bool:
        raw = bytearray(b & 1 for b in raw)
    t = torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(2, 3)
    state = {"t": t, "tt": t.t(), "zero_d": t[1, 2], "empty": t[:0], "row": t[1]}
    loaded = _roundtrip(state, tmp_ckpt)
    assert_same(state, loaded)


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_quantized_dtypes_are_refused(name: str, tmp_ckpt: Path) -> None:
    t = quantized(name)
    with pytest.raises(ckptproto.UnsupportedValueError) as info:
        ckptproto.save({"layer": {"w": t}}, tmp_ckpt)
    assert info.value.path == "layer.w" and "layer.w" in str(info.value)
    assert not tmp_ckpt.exists()


def test_plain_value_edges(tmp_ckpt: Path) -> None:
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8_0000_DEAD_BEEF))[0]
    state = {
        "big": [2**64, -(2**64), 2**1000, -(2**53) - 1, 2**53 - 1, 0],
        "floats": (float("nan"), nan_payload, float("inf"), float("-inf"), -0.0, 5e-324, 1.79e308),
        "text": "héllo ✓ \U0001f600 \x00",
        "bytes": b"\x00\xff" * 3,
        7: {"$not_a_tag": 1, "$torch": 3, -1: None},
        "odict": OrderedDict([("b", 1), ("a", 2)]),
        "empty": [{}, (), [], OrderedDict()],
        "bools": [True, False],
    }
    loaded = _roundtrip(state, tmp_ckpt)
    assert_same(state, loaded)
    assert isinstance(loaded["odict"], OrderedDict) and type(loaded[7]) is dict


def test_huge_ints_as_values_and_keys(tmp_ckpt: Path) -> None:
    huge = 3**20000  # 9,543 digits: past Python's 4,300-digit str() limit, under the format's 10,000
    state = {
        "v": huge,
        "neg": -huge,
        "d": {huge: torch.ones(1), -huge: [huge]},
        "o": OrderedDict([(huge, 1)]),
    }
    loaded = _roundtrip(state, tmp_ckpt)
    assert_same(state, loaded)
    with pytest.raises(ckptproto.UnsupportedValueError) as info:
        ckptproto.save({"d": {1: {2: 10**10001}}}, tmp_ckpt, overwrite=True)
    assert info.value.path == "d.1.2"


def test_same_array_twice_stays_shared(tmp_ckpt: Path) -> None:
    a = np.arange(6, dtype=np.int32)
    t = torch.arange(6.0)
    loaded = _roundtrip({"x": a, "y": [a, t], "z": {"t": t}}, tmp_ckpt)
    assert loaded["x"] is loaded["y"][0]
    assert loaded["y"][1] is loaded["z"]["t"]
