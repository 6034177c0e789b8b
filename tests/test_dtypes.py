"""The dtype table: every torch dtype (but the quantized ones) and every numeric numpy dtype is
storable, maps to the safetensors code safetensors itself uses, and loads in place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import raw_bytes
from test_roundtrip import NUMPY_DTYPES, QUANTIZED, STORABLE_TORCH, TORCH_DTYPES

import ckptproto
from ckptproto import dtypes


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    size = dtype.itemsize
    n = int(np.prod(shape)) * size
    raw = bytearray((i * 53 + 1) % 256 for i in range(n))
    if dtype == torch.bool:
        raw = bytearray(b & 1 for b in raw)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)


def test_table_covers_every_torch_dtype() -> None:
    names = {str(d).removeprefix("torch.") for d in TORCH_DTYPES}
    assert names >= QUANTIZED
    for d in STORABLE_TORCH:
        entry = dtypes.from_torch(d)
        assert entry is not None, d
        assert entry.torch_dtype() == d
        assert entry.itemsize == torch.empty((), dtype=d).element_size(), d
    for name in QUANTIZED:
        assert dtypes.from_torch(getattr(torch, name)) is None


def test_safetensors_codes_agree_with_safetensors() -> None:
    # safetensors' own torch -> code table, read by saving one tensor of each dtype it takes.
    for entry in dtypes.BY_NAME.values():
        if entry.safetensors is None or entry.torch_name is None:
            continue
        blob = safetensors.torch.save({"x": torch.zeros(1, dtype=entry.torch_dtype())})
        assert f'"dtype":"{entry.safetensors}"' in blob[8:200].decode(errors="replace"), entry.name


def test_numpy_dtypes() -> None:
    for d in NUMPY_DTYPES:
        for order in "<>":
            entry = dtypes.from_numpy(d.newbyteorder(order))
            assert entry is not None and entry.itemsize == d.itemsize and entry.numpy_dtype() == d
    for bad in ("longdouble", "clongdouble", "O", "U3", "S2", "M8[s]", "m8[s]", "V4"):
        assert dtypes.from_numpy(np.dtype(bad)) is None, bad
    with pytest.raises(ckptproto.CheckpointFormatError, match="numpy has no dtype"):
        dtypes.by_name("bfloat16").numpy_dtype()
    with pytest.raises(ckptproto.CheckpointFormatError):
        dtypes.by_name("float128")


@pytest.mark.parametrize("dtype", STORABLE_TORCH, ids=str)
def test_load_into_every_torch_dtype(dtype: torch.dtype, tmp_ckpt: Path) -> None:
    value = _sample(dtype, (3, 4))
    ckptproto.save({"t": value}, tmp_ckpt)
    size = value.element_size()
    contiguous = torch.zeros(3, 4 * size, dtype=torch.uint8).view(dtype)  # no fill kernel for some
    ptr = contiguous.data_ptr()
    ckptproto.load_into(tmp_ckpt, {"t": contiguous})
    assert contiguous.data_ptr() == ptr and raw_bytes(contiguous) == raw_bytes(value)
    transposed = torch.zeros(4, 3 * size, dtype=torch.uint8).view(dtype).t()
    ckptproto.load_into(tmp_ckpt, {"t": transposed})
    assert not transposed.is_contiguous() and raw_bytes(transposed) == raw_bytes(value)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=str)
def test_load_into_every_numpy_dtype(dtype: np.dtype[np.generic], tmp_ckpt: Path) -> None:
    raw = bytes((i * 29 + 3) % 256 for i in range(12 * dtype.itemsize))
    value = (
        np.frombuffer(raw, dtype=dtype).reshape(3, 4)
        if dtype.kind != "b"
        else np.arange(12).reshape(3, 4) % 3 == 0
    )
    ckptproto.save({"a": value}, tmp_ckpt)
    for target in (
        np.zeros((3, 4), dtype=dtype),
        np.zeros((4, 3), dtype=dtype).T,
        np.zeros((3, 4), dtype=dtype.newbyteorder(">")),
    ):
        ckptproto.load_into(tmp_ckpt, {"a": target})
        assert raw_bytes(target) == raw_bytes(value)
        assert np.array_equal(target, value, equal_nan=dtype.kind in "fc")


@pytest.fixture(params=["deterministic", "default_device_meta"])
def torch_global_mode(request: pytest.FixtureRequest) -> Any:
    """A torch global mode a trainer may have switched on (Lightning's deterministic=True
    calls torch.use_deterministic_algorithms(True))."""
    if request.param == "deterministic":
        was = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        yield request.param
        torch.use_deterministic_algorithms(was)
    else:
        torch.set_default_device("meta")
        try:
            yield request.param
        finally:
            torch.set_default_device(None)


def _bits(t: torch.Tensor) -> bytes:
    # raw_bytes needs .contiguous(), which deterministic mode cannot run for bits16
    width = {2: torch.int16, 4: torch.int32, 8: torch.int64}.get(t.element_size())
    return raw_bytes(t.view(width) if width is not None else t)


def test_every_torch_dtype_loads_in_every_global_mode(tmp_path: Path, torch_global_mode: str) -> None:
    # Saved outside the mode, then saved again (sync and async, non-contiguous sources) and
    # read back every way inside it.
    state = {str(d): _sample(d, (3, 4)) for d in STORABLE_TORCH}
    ckptproto.save(state, tmp_path / "outside")
    mode = torch_global_mode
    with ckptproto.AsyncSaver() as saver:
        saver.save({k: v.t() for k, v in state.items()}, tmp_path / "async").result(timeout=60)
    ckptproto.save({k: v.t() for k, v in state.items()}, tmp_path / "sync")
    for name in ("outside", "sync", "async"):
        want = state if name == "outside" else {k: v.t() for k, v in state.items()}
        for mmap in (False, True):
            out = ckptproto.load(tmp_path / name, mmap=mmap)
            for key, value in want.items():
                assert out[key].device.type == "cpu" and _bits(out[key]) == _bits(value), (
                    mode,
                    name,
                    key,
                )
        ckptproto.verify(tmp_path / name)
    targets = {
        k: torch.zeros(4, 3 * v.element_size(), dtype=torch.uint8, device="cpu").view(v.dtype).t()
        for k, v in state.items()
    }
    ckptproto.load_into(tmp_path / "outside", targets)
    assert all(_bits(targets[k]) == _bits(v) for k, v in state.items())
