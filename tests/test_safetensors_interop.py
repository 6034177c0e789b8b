"""Every data file is a valid safetensors file: the real ``safetensors`` package opens it and
returns tensors bit-identical to what ckptproto loads (raw-stored dtypes as their U8 bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from conftest import raw_bytes
from safetensors import safe_open
from test_roundtrip import STORABLE_TORCH

import ckptproto

NUMPY_NAMES = {"float64", "float32", "float16", "int64", "int32", "int16", "int8"}
NUMPY_NAMES |= {"uint64", "uint32", "uint16", "uint8", "bool", "complex64"}


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    n = int(np.prod(shape))
    raw = bytearray((i * 131 + 7) % 256 for i in range(n * size))
    if dtype == torch.bool:
        raw = bytearray(b & 1 for b in raw)
    return (
        torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
        if n
        else torch.empty(shape, dtype=dtype)
    )


def _check_files(path: Path) -> int:
    """Open every data file of the checkpoint with safetensors (torch and numpy flavours) and
    compare each chunk with what ckptproto loads. Returns the number of tensors checked."""
    manifest = ckptproto.read_manifest(path)
    loaded = ckptproto.load(path)
    by_index = _tensors_by_index(manifest.state, loaded)
    checked = 0
    for name in manifest.files:
        file = str(path / name)
        pt = safetensors.torch.load_file(file)
        with safe_open(file, framework="pt") as f_pt, safe_open(file, framework="np") as f_np:
            assert f_pt.metadata() == {"format": "pt", "writer": "ckptproto"}
            keys = set(f_pt.keys())
            for index, entry in enumerate(manifest.tensors):
                assert entry.is_whole()
                chunk = entry.chunks[0]
                assert chunk.key in keys
                ours = by_index[index]
                theirs = f_pt.get_tensor(chunk.key)
                assert raw_bytes(pt[chunk.key]) == raw_bytes(theirs)
                if entry.dtype.safetensors is None:  # raw-stored: U8 bytes, manifest holds the dtype
                    assert theirs.dtype == torch.uint8 and theirs.shape == (entry.nbytes,)
                else:
                    assert str(theirs.dtype).removeprefix("torch.") == entry.dtype.name
                    assert tuple(theirs.shape) == entry.shape
                assert raw_bytes(theirs) == raw_bytes(ours), chunk.key
                if entry.dtype.safetensors is None or entry.dtype.name in NUMPY_NAMES:
                    arr = f_np.get_tensor(chunk.key)
                    assert arr.tobytes() == raw_bytes(ours)
                    if entry.dtype.safetensors is not None:
                        assert arr.dtype == np.dtype(entry.dtype.name) and arr.shape == entry.shape
                checked += 1
    return checked


def _tensors_by_index(node: Any, value: Any, out: dict[int, Any] | None = None) -> dict[int, Any]:
    out = {} if out is None else out
    if isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("$torch", "$numpy"):
        out[next(iter(node.values()))] = value
    elif isinstance(node, dict):
        for k, v in node.items():
            _tensors_by_index(v, value[k], out)
    return out


@pytest.mark.parametrize("dtype", STORABLE_TORCH, ids=str)
def test_each_torch_dtype_opens_in_safetensors(dtype: torch.dtype, tmp_ckpt: Path) -> None:
    state = {
        "m": _sample(dtype, (3, 5)),
        "v": _sample(dtype, (7,)),
        "s": _sample(dtype, ()),
        "e": _sample(dtype, (0, 4)),
    }
    ckptproto.save(state, tmp_ckpt)
    assert _check_files(tmp_ckpt) == 4


def test_mixed_checkpoint_opens_in_safetensors(tmp_ckpt: Path) -> None:
    state: dict[str, Any] = {
        "torch": {str(d).removeprefix("torch."): _sample(d, (2, 3)) for d in STORABLE_TORCH},
        "numpy": {n: np.arange(6).astype(n).reshape(3, 2) for n in sorted(NUMPY_NAMES | {"complex128"})},
        "nan": torch.tensor([float("nan"), -0.0, float("inf")]),
    }
    state["nan"].view(torch.int32)[0] = 0x7FC0_BEEF  # a nan with a payload
    ckptproto.save(state, tmp_ckpt)
    assert _check_files(tmp_ckpt) == len(STORABLE_TORCH) + len(NUMPY_NAMES) + 2
    # Whole-file numpy loading works too when every dtype has a numpy twin.
    ckptproto.save({"a": np.arange(5.0), "b": np.ones((2, 2), dtype=np.int8)}, tmp_ckpt, overwrite=True)
    arrays = safetensors.numpy.load_file(str(tmp_ckpt / "data-00000-000.safetensors"))
    assert np.array_equal(arrays["a"], np.arange(5.0)) and np.array_equal(
        arrays["b"], np.ones((2, 2), np.int8)
    )


def test_many_small_tensors_and_odd_keys(tmp_ckpt: Path) -> None:
    state = {f"layer.{i}": torch.full((i % 5,), float(i)) for i in range(200)}
    state["__metadata__"] = torch.ones(1)  # the safetensors reserved key, as a state path
    state["a.b"] = torch.zeros(2)
    state["a"] = {"b": torch.ones(2)}  # type: ignore[assignment]
    ckptproto.save(state, tmp_ckpt)
    assert _check_files(tmp_ckpt) == 203
