"""The per-tensor fast paths (benchmarks/bench_many_tensors.py) give exactly what the general
paths give: the same manifest and header bytes, the same parsed values, the same refusals."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptproto
from ckptproto import dtypes
from ckptproto.errors import CheckpointFormatError
from ckptproto.format import safetensors, strict_json
from ckptproto.format.manifest import _CHECKSUM_PREFIX, Chunk, FileEntry, Manifest, TensorEntry
from ckptproto.tree import encode_state

ODD = ["plain", 'quo"te', "back\\slash", "new\nline\t\x01", "ünï€😀", "/", "\u2028"]


def _reference_to_json(m: Manifest) -> bytes:
    """Manifest.to_json as written before the fast path: the whole document through json.dumps."""
    doc = {
        "format": "ckptproto",
        "format_version": f"{m.version[0]}.{m.version[1]}",
        "created": m.created,
        "writer": m.writer,
        "world_size": m.world_size,
        "metadata": m.metadata,
        "files": {n: {"size": f.size, "checksum": f.checksum, "rank": f.rank} for n, f in m.files.items()},
        "tensors": [
            {
                "dtype": t.dtype.name,
                "shape": list(t.shape),
                "chunks": [
                    {"file": c.file, "key": c.key, "offsets": list(c.offsets), "shape": list(c.shape)}
                    for c in t.chunks
                ],
            }
            for t in m.tensors
        ],
        "state": m.state,
    }
    body = json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return _CHECKSUM_PREFIX + b"%08x" % zlib.crc32(body) + b'",' + body[1:]


def _manifests() -> Iterator[Manifest]:
    files = {
        "data-00000-000.safetensors": FileEntry(64, "crc32:0000abcd"),
        "b.safetensors": FileEntry(9, "crc32:ffffffff", 3),
    }
    f32, bf16 = dtypes.by_name("float32"), dtypes.by_name("bfloat16")
    tensors = [
        TensorEntry(f32, (), (Chunk("data-00000-000.safetensors", "", (), ()),)),
        TensorEntry(
            bf16,
            (4, 6),
            (Chunk("b.safetensors", ODD[1], (0, 0), (2, 6)), Chunk("b.safetensors", ODD[4], (2, 0), (2, 6))),
        ),
        *(
            TensorEntry(f32, (i, 2**40), (Chunk("data-00000-000.safetensors", k, (0, 0), (i, 2**40)),))
            for i, k in enumerate(ODD)
        ),
    ]
    state = encode_state({"a": [1, 2.5, None, True, "x\ny"], ODD[4]: {"$k": (3,)}, "big": 2**60}).tree
    yield Manifest(
        state, tensors, files, {"note": ODD[3]}, "2026-01-01T00:00:00Z", (1, 0), 2, "ckptproto test"
    )
    yield Manifest({}, [], {}, {}, "", (1, 7), 1, "")


@pytest.mark.parametrize("manifest", list(_manifests()))
def test_manifest_text_is_what_json_dumps_writes(manifest: Manifest) -> None:
    data = manifest.to_json()
    assert data == _reference_to_json(manifest)
    parsed = Manifest.parse(data, "m")
    assert parsed.tensors == manifest.tensors and parsed.state == manifest.state


def test_manifest_with_a_lone_surrogate_is_refused_as_before() -> None:
    m = next(_manifests())
    m.tensors[0] = TensorEntry(m.tensors[0].dtype, (), (Chunk("b.safetensors", "\ud800", (), ()),))
    with pytest.raises(UnicodeEncodeError):
        _reference_to_json(m)
    with pytest.raises(UnicodeEncodeError):
        m.to_json()


def _reference_header(
    entries: list[tuple[str, str, tuple[int, ...], int, int]], meta: dict[str, str]
) -> bytes:
    obj: dict[str, Any] = {"__metadata__": meta}
    for key, code, shape, begin, end in entries:
        obj[key] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    "entries",
    [
        [(k, "F32", (i, 2), 8 * i * i, 8 * i * (i + 1)) for i, k in enumerate(ODD)],
        [],
        [("a", "U8", (), 0, 1), ("b", "BF16", (3,), 1, 7), ("a", "I64", (1,), 7, 15)],  # a repeated key
        [("__metadata__", "U8", (1,), 0, 1)],
    ],
)
def test_header_text_is_what_json_dumps_writes(
    entries: list[tuple[str, str, tuple[int, ...], int, int]],
) -> None:
    for meta in ({}, {"format": "pt", ODD[3]: ODD[4]}):
        assert safetensors.encode_header(entries, meta) == _reference_header(entries, meta)


def test_header_entries_out_of_file_order_still_tile() -> None:
    raw = json.dumps(
        {
            "b": {"dtype": "U8", "shape": [2], "data_offsets": [3, 5]},
            "z": {"dtype": "U8", "shape": [0], "data_offsets": [3, 3]},
            "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        }
    ).encode()
    entries = safetensors.parse_header(raw, 8 + len(raw) + 5, "f")
    assert [(k, e.begin - 8 - len(raw), e.end - 8 - len(raw)) for k, e in entries.items()] == [
        ("b", 3, 5),
        ("z", 3, 3),
        ("a", 0, 3),
    ]
    for offsets, problem in (([2, 4], "overlap"), ([4, 6], "leave a hole")):
        bad = json.dumps(
            {
                "a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                "b": {"dtype": "U8", "shape": [2], "data_offsets": offsets},
            }
        ).encode()
        with pytest.raises(CheckpointFormatError, match=problem):
            safetensors.parse_header(bad, 8 + len(bad) + offsets[1], "f")


needs_int_limit = pytest.mark.skipif(
    not hasattr(sys, "set_int_max_str_digits"), reason="Python before 3.10.7 has no int/str limit"
)


@needs_int_limit
@pytest.mark.parametrize("limit", [640, 4300, 0])
def test_long_integers_exact_and_bounded_whatever_int_max_str_digits(limit: int) -> None:
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(limit)
    try:
        for digits in (1, 639, 641, 4301, 9999):
            value = strict_json.loads(f'{{"n":[-{"7" * digits}]}}')["n"][0]
            assert value == -(7 * (10**digits - 1) // 9)  # -777...7, built without int(str)
        with pytest.raises(CheckpointFormatError, match="10000-character limit"):
            strict_json.loads("[" + "1" * 10_001 + "]")
        with pytest.raises(CheckpointFormatError, match="duplicate JSON key 'a'"):
            strict_json.loads('{"b":1,"a":1,"a":2}')
        with pytest.raises(CheckpointFormatError, match="overflows"):
            strict_json.loads('{"x":' + "1" * 700 + ',"y":1e400}')
    finally:
        sys.set_int_max_str_digits(old)


def test_views_tie_by_address_shape_strides_dtype_and_bits(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    same = base.view(3, 4)
    state = {
        "a": same,
        "a_again": base.view(3, 4),  # another view object of the same bytes: tied
        "shifted": base[1:],  # same storage, other offset: not tied
        "shifted_again": base.narrow(0, 1, 11),
        "t": same.t(),  # same address, other strides: not tied
        "as_int": base.view(torch.int32),  # same bytes read as another dtype: not tied
    }
    encoded = encode_state(state)
    refs = {k: v["$torch"] for k, v in encoded.tree.items()}
    assert refs["a"] == refs["a_again"] and refs["shifted"] == refs["shifted_again"]
    assert len({refs["a"], refs["shifted"], refs["t"], refs["as_int"]}) == 4
    ckptproto.save(state, tmp_path / "c")
    loaded = ckptproto.load(tmp_path / "c")
    assert loaded["a"] is loaded["a_again"] and torch.equal(loaded["shifted"], base[1:])


@needs_int_limit
def test_state_with_long_ints_round_trips_under_a_lowered_int_str_limit(tmp_path: Path) -> None:
    """Python's int<->str limit is the process's setting (640 at the lowest), not 4,300: a
    700-digit value or dict key is saved and read exactly under it, never a raw ValueError."""
    big = 7 * (10**700 - 1) // 9
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        ckptproto.save({"n": big, "keys": {big: -big}, "t": torch.ones(2)}, tmp_path / "c")
        loaded = ckptproto.load(tmp_path / "c")
    finally:
        sys.set_int_max_str_digits(old)
    assert loaded["n"] == big and loaded["keys"] == {big: -big}
