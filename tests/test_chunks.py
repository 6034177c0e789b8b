"""Chunk assembly: a tensor stored as boxes spread over several data files (one per rank) is
loaded back whole; chunk sets that overlap or leave gaps are refused."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import assert_same, raw_bytes
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptproto
from ckptproto import CheckpointFormatError, arrays
from ckptproto.arrays import ArraySpec
from ckptproto.format import layout
from ckptproto.format.manifest import Manifest, TensorEntry
from ckptproto.io import writer
from ckptproto.io.plan import Piece, plan_file

Box = tuple[int, tuple[int, ...], tuple[int, ...]]  # (rank, offsets, shape)


def _spec(value: Any) -> ArraySpec:
    spec = arrays.try_spec(value)
    assert spec is not None
    return spec


def _build(path: Path, tensors: dict[str, tuple[Any, list[Box]]]) -> None:
    """Write a checkpoint by hand: each named global tensor is cut into the given boxes, each
    box stored in the data file of its rank."""
    path.mkdir()
    sources: list[memoryview] = []
    owners: list[Any] = []
    pieces: dict[int, list[Piece]] = {}
    layout_of: list[tuple[str, int, list[int]]] = []  # (name, tensor index, source indices)
    for index, (name, (value, boxes)) in enumerate(tensors.items()):
        spec = _spec(value)
        ids = []
        for j, (rank, offsets, shape) in enumerate(boxes):
            part = value[(*(slice(o, o + s) for o, s in zip(offsets, shape, strict=True)), ...)]
            view, owner = arrays.host_bytes(part)
            ids.append(len(sources))
            sources.append(view)
            owners.append(owner)
            piece_spec = ArraySpec(spec.kind, spec.dtype, tuple(shape))
            pieces.setdefault(rank, []).append(Piece(ids[-1], f"{name}/{j}", piece_spec, tuple(offsets)))
        layout_of.append((name, index, ids))
    files, chunks = {}, {}
    for rank, rank_pieces in sorted(pieces.items()):
        plan = plan_file(layout.data_file_name(rank), rank, rank_pieces)
        files[plan.name] = writer.write_file(path, plan, sources)
        chunks.update(plan.chunks())
    entries, state = [], {}
    for name, index, ids in layout_of:
        value = tensors[name][0]
        spec = _spec(value)
        entries.append(TensorEntry(spec.dtype, spec.shape, tuple(chunks[i] for i in ids)))
        state[name] = {f"${spec.kind}": index}
    manifest = Manifest(state=state, tensors=entries, files=files, world_size=max(pieces) + 1)
    writer.write_small_file(path, layout.MANIFEST_NAME, manifest.to_json())


def _grid(shape: tuple[int, ...], cuts: list[list[int]], ranks: int) -> list[Box]:
    """Boxes of a grid split: ``cuts[d]`` are the split points of dim d."""
    edges = [[0, *c, n] for c, n in zip(cuts, shape, strict=True)]
    spans = [list(itertools.pairwise(e)) for e in edges]
    boxes = []
    for i, combo in enumerate(itertools.product(*spans)):
        boxes.append((i % ranks, tuple(a for a, _ in combo), tuple(b - a for a, b in combo)))
    return boxes


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = bytearray((i * 97 + 5) % 256 for i in range(n))
    if dtype == torch.bool:
        raw = bytearray(b & 1 for b in raw)
    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


CASES: dict[str, tuple[Any, list[Box]]] = {
    "dim0": (_sample(torch.float32, (6, 4)), _grid((6, 4), [[2, 5], []], 3)),
    "dim1": (_sample(torch.float32, (4, 6)), _grid((4, 6), [[], [2, 5]], 3)),
    "grid": (_sample(torch.bfloat16, (5, 7)), _grid((5, 7), [[2], [3, 4]], 4)),
    "grid3d": (_sample(torch.int16, (3, 4, 5)), _grid((3, 4, 5), [[1], [2], [1, 3]], 2)),
    "raw_dtype": (_sample(torch.float8_e8m0fnu, (4, 6)), _grid((4, 6), [[1], [3]], 2)),
    "sub_byte": (_sample(torch.uint4, (4, 4)), _grid((4, 4), [[], [1, 2]], 3)),
    "complex": (_sample(torch.complex128, (3, 3)), _grid((3, 3), [[1], [2]], 2)),
    "numpy": (np.arange(24, dtype=np.float64).reshape(4, 6), _grid((4, 6), [[2], [1]], 2)),
    "empty_chunks": (
        _sample(torch.float32, (4, 3)),
        [(0, (0, 0), (4, 3)), (1, (4, 0), (0, 3)), (2, (2, 3), (2, 0))],
    ),
    "all_empty": (torch.empty(0, 5), [(0, (0, 0), (0, 2)), (1, (0, 2), (0, 3))]),
    "scalar": (torch.tensor(2.5, dtype=torch.float64), [(1, (), ())]),
    "single_rows": (
        _sample(torch.int64, (3, 2)),
        [(2, (2, 0), (1, 2)), (0, (0, 0), (1, 2)), (1, (1, 0), (1, 2))],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_chunks_assemble(name: str, tmp_ckpt: Path) -> None:
    value, boxes = CASES[name]
    _build(tmp_ckpt, {name: (value, boxes)})
    manifest = ckptproto.read_manifest(tmp_ckpt)
    assert len(manifest.tensors[0].chunks) == len(boxes)
    ckptproto.verify(tmp_ckpt)
    assert_same({name: value}, ckptproto.load(tmp_ckpt))
    assert_same({name: value}, ckptproto.load(tmp_ckpt, mmap=True))
    # load_into, into a contiguous target and into a non-contiguous (transposed) one.
    strided: Any = None
    if isinstance(value, np.ndarray):
        target: Any = np.zeros_like(value)
        strided = np.zeros(value.shape[::-1], dtype=value.dtype).T
    elif value.dtype == torch.uint4:  # torch has no fill/copy kernels for it: bytes only
        target = torch.zeros(value.shape, dtype=torch.uint8).view(torch.uint4)
    else:
        target = torch.zeros_like(value)
        if value.dim() == 2:
            strided = torch.zeros_like(value.t()).t()
    ckptproto.load_into(tmp_ckpt, {name: target})
    assert raw_bytes(target) == raw_bytes(value)
    if strided is not None:
        ckptproto.load_into(tmp_ckpt, {name: strided})
        assert raw_bytes(strided) == raw_bytes(value)
    # Every rank's file is a plain safetensors file holding its boxes.
    for file in manifest.files:
        safetensors.torch.load_file(str(tmp_ckpt / file))


def test_many_tensors_across_ranks(tmp_ckpt: Path) -> None:
    tensors = {k: CASES[k] for k in ("dim0", "dim1", "grid", "numpy", "scalar")}
    _build(tmp_ckpt, tensors)
    assert len(ckptproto.read_manifest(tmp_ckpt).files) == 4
    assert_same({k: v for k, (v, _) in tensors.items()}, ckptproto.load(tmp_ckpt))


@pytest.mark.parametrize(
    ("boxes", "match"),
    [
        ([(0, (0, 0), (4, 3)), (1, (2, 0), (2, 3))], "hold"),  # too many elements
        (
            [(0, (0, 0), (2, 3)), (1, (1, 0), (2, 3)), (2, (3, 0), (1, 2)), (2, (3, 2), (1, 1))],
            None,
        ),  # overlap, gap
        ([(0, (0, 0), (3, 3)), (1, (2, 0), (1, 3))], None),  # overlap, total short... and gap
        ([(0, (0, 0), (2, 3))], "hold"),  # incomplete
        ([(0, (0, 0), (2, 3)), (1, (3, 0), (2, 3))], "outside"),  # runs past the shape
    ],
    ids=["too_many", "overlap_same_volume", "overlap_and_gap", "incomplete", "outside"],
)
def test_bad_chunk_sets_are_refused(boxes: list[Box], match: str | None, tmp_ckpt: Path) -> None:
    value = _sample(torch.float32, (4, 3))
    padded = torch.zeros(5, 3)  # lets a box run past the declared shape when cutting
    padded[:4] = value
    _build(tmp_ckpt, {"t": (padded, boxes)})
    # The global shape in the manifest is (4, 3): patch it in.
    import json

    doc = json.loads((tmp_ckpt / "manifest.json").read_text())
    doc["tensors"][0]["shape"] = [4, 3]
    (tmp_ckpt / "manifest.json").write_text(json.dumps(doc))
    for call in (
        ckptproto.load,
        ckptproto.verify,
        lambda p: ckptproto.load_into(p, {"t": torch.zeros(4, 3)}),
    ):
        with pytest.raises(CheckpointFormatError, match=match):
            call(tmp_ckpt)


def test_overlap_with_equal_volume_is_refused(tmp_ckpt: Path) -> None:
    # Rows 0-1 twice and rows 2-3 never: the element count matches, the tiling does not.
    value = _sample(torch.float32, (4, 3))
    _build(tmp_ckpt, {"t": (value, [(0, (0, 0), (2, 3)), (1, (0, 0), (2, 3))])})
    import json

    doc = json.loads((tmp_ckpt / "manifest.json").read_text())
    doc["tensors"][0]["shape"] = [4, 3]
    (tmp_ckpt / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointFormatError, match="overlap"):
        ckptproto.load(tmp_ckpt)


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[Any, list[Box]]:
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=3)))
    cuts = [
        sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=2)))) if n > 1 else [] for n in shape
    ]
    ranks = draw(st.integers(1, 3))
    dtype = draw(
        st.sampled_from([torch.float32, torch.bfloat16, torch.uint8, torch.float8_e8m0fnu, torch.complex64])
    )
    value: Any = _sample(dtype, shape)
    if draw(st.booleans()) and dtype == torch.float32:
        value = value.numpy()
    boxes = _grid(shape, cuts, ranks)
    order = draw(st.permutations(range(len(boxes))))
    return value, [boxes[i] for i in order]


@settings(max_examples=40)
@given(layout=_layouts())
def test_random_chunk_layouts(layout: tuple[Any, list[Box]], tmp_path: Path) -> None:
    import shutil

    value, boxes = layout
    path = tmp_path / "ckpt"
    shutil.rmtree(path, ignore_errors=True)
    _build(path, {"t": (value, boxes)})
    assert_same({"t": value}, ckptproto.load(path))
    if isinstance(value, np.ndarray):
        target: Any = np.zeros_like(value)
    else:
        nbytes = value.numel() * value.element_size()
        target = torch.zeros(nbytes, dtype=torch.uint8).view(value.dtype).reshape(value.shape)
    ckptproto.load_into(path, {"t": target})
    assert raw_bytes(target) == raw_bytes(value)


@st.composite
def _tilings_with_overlap(
    draw: st.DrawFn,
) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], tuple[int, ...]]], bool]:
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    cuts = [
        sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=3)))) if n > 1 else [] for n in shape
    ]
    boxes = [(o, s) for _, o, s in _grid(shape, cuts, 1)]
    broken = draw(st.booleans()) and len(boxes) >= 2
    if broken:  # move one box onto another's start: same volume, one overlap, one gap
        i, j = draw(st.lists(st.integers(0, len(boxes) - 1), min_size=2, max_size=2, unique=True))
        (oi, si), (oj, _) = boxes[i], boxes[j]
        moved = tuple(min(o, n - s) for o, s, n in zip(oj, si, shape, strict=True))
        broken = moved != oi
        boxes[i] = (moved, si)
    order = draw(st.permutations(range(len(boxes))))
    return shape, [boxes[k] for k in order], broken


@given(case=_tilings_with_overlap())
def test_overlap_check_on_random_tilings(case: tuple[tuple[int, ...], list[Any], bool]) -> None:
    """The manifest's tiling check accepts every grid split and refuses one moved box."""
    import json

    from ckptproto.format.manifest import Manifest

    shape, boxes, broken = case
    doc = {
        "format": "ckptproto",
        "format_version": "1.0",
        "files": {"a.safetensors": {"size": 64, "checksum": "crc32:00000000"}},
        "tensors": [
            {
                "dtype": "uint8",
                "shape": list(shape),
                "chunks": [
                    {"file": "a.safetensors", "key": str(k), "offsets": list(o), "shape": list(s)}
                    for k, (o, s) in enumerate(boxes)
                ],
            }
        ],
        "state": {},
    }
    data = json.dumps(doc).encode()
    if broken:
        with pytest.raises(CheckpointFormatError, match="overlap"):
            Manifest.parse(data, "m")
    else:
        Manifest.parse(data, "m")
