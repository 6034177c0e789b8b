"""Regenerate the golden checkpoints and their expected values.

    PYTHONPATH=. python conformance/make_golden.py [OUT_DIR]

OUT_DIR defaults to ckptproto/conformance/golden (shipped in the wheel; conformance/golden is
a link to it). The output is byte-for-byte reproducible: the test suite regenerates it into a
temporary directory and compares, so a change to the writer that changes the bytes shows up.
Needs torch (the goldens hold torch tensors of every dtype).
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckptproto import arrays, dtypes
from ckptproto.arrays import ArraySpec
from ckptproto.conformance import golden
from ckptproto.format import layout
from ckptproto.format.manifest import Chunk, FileEntry, Manifest, TensorEntry
from ckptproto.io import commit, meta, sync, writer
from ckptproto.io.plan import Piece, plan_file
from ckptproto.io.share import plan_share
from ckptproto.tree import encode_state

CREATED = "2026-01-01T00:00:00.000000+00:00"
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "ckptproto" / "conformance" / "golden"


def _bytes_pattern(n: int, salt: int) -> np.ndarray[Any, Any]:
    return ((np.arange(n, dtype=np.int64) * 37 + salt * 11) % 251).astype(np.uint8)


def plain_and_numpy() -> tuple[dict[str, Any], dict[str, Any]]:
    """Every plain leaf kind and every numpy dtype; decodable without torch."""
    numpy_arrays = {}
    for i, d in enumerate(t for t in dtypes.BY_NAME.values() if t.numpy_name is not None):
        raw = _bytes_pattern(6 * d.itemsize, i)
        if d.name == "bool":
            raw = raw % 2
        numpy_arrays[d.name] = raw.view(d.numpy_dtype()).reshape(2, 3)
    shared = np.arange(4, dtype=np.float32)
    state = {
        "trainer": {"global_step": 12, "current_epoch": 2},
        "plain": {
            "none": None,
            "true": True,
            "false": False,
            "int": 7,
            "negative": -3,
            "max_safe": 2**53 - 1,
            "big": 2**80 + 1,
            "big_negative": -(2**64),
            "float": 0.1,
            "whole_float": 2.0,
            "negative_zero": -0.0,
            "nan": float("nan"),
            "inf": float("inf"),
            "-inf": float("-inf"),
            "tiny": 5e-324,
            "str": "héllo ✓ \u0000 end",
            "empty_str": "",
            "bytes": b"\x00\x01\xfe\xff",
            "empty_bytes": b"",
            "list": [1, "two", 3.0, None],
            "empty_list": [],
            "tuple": (0.9, 0.999),
            "nested_tuple": ((1, 2), [3, (4,)]),
            "int_keys": {0: "zero", 1: "one"},
            "dollar_key": {"$torch": "not a tensor"},
            "odict": OrderedDict([("b", 1), ("a", 2)]),
            "empty_dict": {},
        },
        "numpy": {
            "dtypes": numpy_arrays,
            "scalar": np.array(3.5, dtype=np.float64),
            "empty": np.zeros((0, 3), dtype=np.float32),
            "three_d": np.arange(24, dtype=np.int16).reshape(2, 3, 4),
            "big_endian": np.arange(3, dtype=">i4"),
            "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "tied_a": shared,
            "tied_b": shared,
        },
    }
    return state, {"metrics": {"loss": 0.25}}


def torch_dtypes() -> tuple[dict[str, Any], dict[str, Any]]:
    """Every torch dtype the format stores (raw-byte ones included), in the canonical layout."""
    tensors = {}
    for i, d in enumerate(t for t in dtypes.BY_NAME.values() if t.torch_name is not None):
        if not hasattr(torch, d.torch_name or ""):
            continue
        raw = torch.from_numpy(_bytes_pattern(4 * d.itemsize, i).copy())
        if d.name == "bool":
            raw = raw % 2
        tensors[d.name] = raw.view(d.torch_dtype()).reshape(2, 2)
    weight = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    state = {
        "trainer": {"global_step": 40, "current_epoch": 1},
        "models": {"model": {"weight": weight, "tied_weight": weight, "bias": torch.tensor([0.5, -1.0])}},
        "optimizers": {
            "optimizer": {
                "state": {0: {"step": torch.tensor(40.0)}},
                "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0]}],
            }
        },
        "dtypes": tensors,
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 2, dtype=torch.bfloat16),
        "transposed": torch.arange(6, dtype=torch.int32).reshape(2, 3).t(),
        "numpy_beside_torch": np.arange(3, dtype=np.int64),
    }
    return state, {}


def write_whole(out: Path, state: dict[str, Any], metadata: dict[str, Any]) -> None:
    """One data file, whole tensors: what ckptproto.save writes, with a fixed timestamp."""
    encoded = encode_state(state)
    pieces = plan_share(encoded, 0, 1).pieces
    sources = [arrays.host_bytes(leaf.value) for leaf in encoded.tensors]
    plan = plan_file(layout.data_file_name(0), 0, pieces)
    temp = commit.begin(out, overwrite=True)
    entry = writer.write_file(temp, plan, [view for view, _owner in sources])
    chunks = plan.chunks()
    tensors = [TensorEntry(t.spec.dtype, t.spec.shape, (chunks[i],)) for i, t in enumerate(encoded.tensors)]
    manifest = Manifest(
        encoded.tree,
        tensors,
        {plan.name: entry},
        meta.encode_metadata(metadata, state),
        CREATED,
        writer=meta.WRITER,
    )
    writer.write_small_file(temp, layout.MANIFEST_NAME, manifest.to_json())
    commit.finish(temp, out)


def sharded(out: Path) -> dict[str, Any]:
    """Two ranks, three data files, tensors split into boxes across files (as a distributed
    save writes them). Returns the decoded state it must load as."""
    grid = np.arange(24, dtype=np.float32).reshape(4, 6) / 8
    ramp = np.arange(10, dtype=np.int64) - 5
    bf16 = (torch.arange(12, dtype=torch.float32).reshape(3, 4) / 4).to(torch.bfloat16)
    whole = np.array([True, False, True])
    # (tensor index, offsets, shape, file)
    f0, f1, f2 = layout.data_file_name(0, 0), layout.data_file_name(0, 1), layout.data_file_name(1, 0)
    boxes = [
        (0, (0, 0), (2, 3), f0),
        (0, (0, 3), (2, 3), f2),
        (0, (2, 0), (2, 3), f1),
        (0, (2, 3), (2, 3), f2),
        (1, (0,), (3,), f0),
        (1, (3,), (5,), f2),
        (1, (8,), (2,), f1),
        (2, (0, 0), (3, 1), f0),
        (2, (0, 1), (3, 3), f2),
        (3, (0,), (3,), f2),
    ]
    values = [grid, ramp, bf16, whole]
    state = {
        "trainer": {"global_step": 5, "current_epoch": 0},
        "models": {"grid": grid, "ramp": ramp, "bf16": bf16},
        "flags": whole,
    }
    encoded = encode_state(state)
    assert [t.path for t in encoded.tensors] == ["models.grid", "models.ramp", "models.bf16", "flags"]
    per_file: dict[str, list[tuple[int, Piece, Any]]] = {f0: [], f1: [], f2: []}
    for n, (index, offsets, shape, name) in enumerate(boxes):
        box = tuple(slice(o, o + s) for o, s in zip(offsets, shape, strict=True))
        part = values[index][box]
        part = part.contiguous() if isinstance(part, torch.Tensor) else np.ascontiguousarray(part)
        spec = ArraySpec(encoded.tensors[index].spec.kind, encoded.tensors[index].spec.dtype, shape)
        per_file[name].append(
            (index, Piece(len(per_file[name]), f"{encoded.tensors[index].path}@{n}", spec, offsets), part)
        )
    temp = commit.begin(out, overwrite=True)
    files: dict[str, FileEntry] = {}
    chunks: dict[int, list[Chunk]] = {i: [] for i in range(len(values))}
    for name, items in per_file.items():
        plan = plan_file(name, 1 if name == f2 else 0, [p for _i, p, _v in items])
        owners = [arrays.host_bytes(v) for _i, _p, v in items]
        files[name] = writer.write_file(temp, plan, [view for view, _o in owners])
        placed = plan.chunks()
        for i, piece, _v in items:
            chunks[i].append(placed[piece.source])
    tensors = [
        TensorEntry(t.spec.dtype, t.spec.shape, tuple(chunks[i])) for i, t in enumerate(encoded.tensors)
    ]
    manifest = Manifest(
        encoded.tree,
        tensors,
        files,
        meta.encode_metadata({}, state),
        CREATED,
        world_size=2,
        writer=meta.WRITER,
    )
    writer.write_small_file(temp, layout.MANIFEST_NAME, manifest.to_json())
    commit.finish(temp, out)
    return state


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Any] = {
        "format": "ckptproto-golden",
        "version": 1,
        "description": "Expected decoded values of each golden checkpoint, as flat {state path: "
        "description}; see ckptproto/conformance/golden.py for the description rules.",
        "checkpoints": {},
    }
    notes = {
        "plain_and_numpy": "every plain leaf kind and numpy dtype, one data file; no torch needed",
        "torch_dtypes": "every torch dtype (raw-byte ones too), tied and non-contiguous tensors, one data file",
        "sharded": "world_size 2, three data files, tensors split into boxes across files",
    }
    for name, build in (("plain_and_numpy", plain_and_numpy), ("torch_dtypes", torch_dtypes)):
        state, metadata = build()
        write_whole(out / name, state, metadata)
        step, epoch = state["trainer"]["global_step"], state["trainer"]["current_epoch"]
        decoded = sync.load(out / name)  # tensors come back contiguous, little-endian
        expected["checkpoints"][name] = {
            "description": notes[name],
            "step": step,
            "epoch": epoch,
            "state": golden.flatten(decoded),
        }
        _check_same(state, decoded, name)
    state = sharded(out / "sharded")
    expected["checkpoints"]["sharded"] = {
        "description": notes["sharded"],
        "step": 5,
        "epoch": 0,
        "state": golden.flatten(state),
    }
    (out / golden.EXPECTED_NAME).write_text(
        json.dumps(expected, indent=1, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _check_same(original: Any, decoded: Any, name: str) -> None:
    """The expected values come from the source state, not only from our own reader."""
    from ckptproto.conformance.compare import compare_trees

    diffs = compare_trees(original, decoded, where=name)
    real = [d for d in diffs if "big_endian" not in d.path]  # dtype byte order is not kept
    if real:
        raise SystemExit(f"golden {name} does not load back as written: {real[0]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT)
