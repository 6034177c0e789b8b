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

import numpy as np
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
    # Short runs (shapes alternate): more parts than to_json encodes one by one.
    short = [
        TensorEntry(f32, shape, (Chunk("b.safetensors", f"k{i}", (0,) * len(shape), shape),))
        for i, shape in enumerate([(2,), (3, 1)] * 40)
    ]
    yield Manifest({"w": {"$torch": 0}}, short, files, {}, "2026-01-01T00:00:00Z", (1, 0), 1, ODD[4])


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
        # Keys with nothing to escape (put into the format as they are), "%" among them: one
        # (code, shape) for all (put into the format itself), then several.
        [(f"layers.{i}.w%s%d%%", "F32", (4,), 16 * i, 16 * (i + 1)) for i in range(5)],
        [(f"p{i}.é%", ["F32", "BF16"][i % 2], [(4,), (2, 2), ()][i % 3], i, i + 1) for i in range(7)],
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


# The inline checks of the tensor table and the state (Manifest.parse) against the general
# path they stand in for: on every variant below, the same entries or the same refusal.


def _one_tensor_manifest(entry: Any, state: Any = None, extra: list[Any] | None = None) -> bytes:
    doc = {
        "format": "ckptproto",
        "format_version": "1.0",
        "files": {"d.safetensors": {"size": 64, "checksum": "crc32:00000000"}},
        "tensors": [entry, *(extra or [])],
        "state": {"w": {"$torch": 0}} if state is None else state,
    }
    return json.dumps(doc).encode()


def _general_parse(data: bytes) -> list[TensorEntry]:
    """The tensor table through the general per-entry path alone."""
    from ckptproto.format import manifest as m

    doc = json.loads(data)
    files = m._parse_files(doc["files"], "m")
    tensors = [m._parse_tensor(t, i, files, "m") for i, t in enumerate(doc["tensors"])]
    m._check_pairs_unique(tensors, "m")
    return tensors


def _whole(dims: Any, **chunk: Any) -> dict[str, Any]:
    """A one-chunk entry of shape ``dims``; ``chunk`` replaces fields of the chunk (``cshape``:
    its shape)."""
    if "cshape" in chunk:
        chunk["shape"] = chunk.pop("cshape")
    c = {"file": "d.safetensors", "key": "w", "offsets": [0] * len(dims), "shape": dims, **chunk}
    return {"dtype": "float32", "shape": dims, "chunks": [c]}


_ENTRIES = [
    _whole([4]),
    _whole([]),
    _whole([0, 3]),
    _whole([2, 2], extra="ignored"),
    {**_whole([4]), "extra": 1},
    _whole([True]),
    _whole([1.0]),
    _whole([1], cshape=[True]),
    _whole([4], cshape=[4.0]),
    _whole([4], offsets=[False]),
    _whole([4], offsets=[0.0]),
    _whole([4], offsets=[1]),
    _whole([4], offsets=[]),
    _whole([4], file="other.safetensors"),
    _whole([4], file=1),
    _whole([4], key=None),
    _whole([-1]),
    _whole([2**62 + 1]),
    _whole([2**62, 2**62]),
    _whole([0, 2**62, 2**62]),
    _whole([1] * 65),
    {**_whole([4]), "dtype": "float31"},
    {**_whole([4]), "dtype": ["float32"]},
    {**_whole([4]), "shape": "4"},
    {**_whole([4]), "chunks": []},
    {**_whole([4]), "chunks": [[]]},
    {
        "dtype": "float32",
        "shape": [4],
        "chunks": [
            {"file": "d.safetensors", "key": "a", "offsets": [0], "shape": [2]},
            {"file": "d.safetensors", "key": "b", "offsets": [2], "shape": [2]},
        ],
    },
    {
        "dtype": "float32",
        "shape": [4],
        "chunks": [
            {"file": "d.safetensors", "key": "a", "offsets": [0], "shape": [3]},
            {"file": "d.safetensors", "key": "b", "offsets": [2], "shape": [1]},
        ],
    },
    [1],
]


@pytest.mark.parametrize("entry", _ENTRIES, ids=range(len(_ENTRIES)))
@pytest.mark.parametrize("second", [None, "same key", "bad dtype"])
def test_inline_tensor_table_checks_agree_with_the_general_path(entry: Any, second: str | None) -> None:
    extra = {"same key": [_whole([4])], "bad dtype": [{**_whole([4], key="v"), "dtype": "x"}]}.get(
        second or "", []
    )
    data = _one_tensor_manifest(entry, extra=extra)
    try:
        expected: Any = _general_parse(data)
    except CheckpointFormatError as exc:
        expected = str(exc)
    try:
        got: Any = Manifest.parse(data, "m").tensors
    except CheckpointFormatError as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, list):
        for a, b in zip(got, expected, strict=True):  # the same types, not only equal values
            assert [type(d) for d in a.shape] == [type(d) for d in b.shape]
            assert [type(c.offsets) for c in a.chunks] == [type(c.offsets) for c in b.chunks]


_STATES = [
    {"w": {"$torch": 0}},
    {"a": {"b": [{"$torch": 0}, 1, "x", None, 2.5, True]}, "t": {"$tuple": [{"$torch": 0}]}},
    {"n": {"$numpy": 0}},
    {"n": {"$numpy": 0}, "w": {"$torch": 0}},
    {"w": {"$torch": 1}},
    {"w": {"$torch": -1}},
    {"w": {"$torch": True}},
    {"w": {"$torch": 0.0}},
    {"w": {"$torch": 0, "x": 1}},
    {"w": {"x": 1, "$torch": 0}},
    {"$torch": 0},
    {"w": {"$dict": [[1, {"$torch": 0}]]}},
    {"w": {"$dict": [[1, 2, 3]]}},
    {"w": {"$odict": [["a", {"$numpy": 0}]]}},
    {"w": {"$int": "12"}, "f": {"$float": "nan"}, "b": {"$bytes": "AA=="}},
    {"w": {"$int": "1.5"}},
    {"w": {"$unknown": 1}},
    {"w": {}},
    {"w": []},
]


def _deep(levels: int) -> dict[str, Any]:
    node: Any = {"$torch": 0}
    for _ in range(levels):
        node = {"k": node}
    return {"w": node}


@pytest.mark.parametrize(
    "state", [*_STATES, _deep(190), _deep(196), _deep(197), _deep(198), _deep(199), _deep(300)]
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quick_state_walk_agrees_with_the_decoder(state: Any, dtype: str) -> None:
    from ckptproto.format import manifest as m

    data = _one_tensor_manifest({**_whole([4]), "dtype": dtype}, state=state)
    tensors = _general_parse(data)
    try:
        m._check_state(state, tensors, "m")  # the decoder alone, every check with its message
        expected = None
    except CheckpointFormatError as exc:
        expected = str(exc)
    try:
        Manifest.parse(data, "m")
        got = None
    except CheckpointFormatError as exc:
        got = str(exc)
    assert got == expected


def _table(
    *chunks: tuple[str, str, tuple[int, ...], tuple[int, ...]], shape: Any = (4,)
) -> list[TensorEntry]:
    return [TensorEntry(dtypes.by_name("float32"), shape, tuple(Chunk(*c) for c in chunks))]


@pytest.mark.parametrize(
    "tensors",
    [
        _table(("d.safetensors", "w", (0,), (4,))),
        _table(("d.safetensors", "a", (0,), (2,)), ("d.safetensors", "b", (2,), (2,))),
        _table(("d.safetensors", "a", (0,), (3,)), ("d.safetensors", "b", (2,), (1,))),  # overlap
        _table(("d.safetensors", "a", (0,), (2,)), ("d.safetensors", "b", (3,), (2,))),  # outside
        _table(("d.safetensors", "a", (0,), (2,)), ("d.safetensors", "b", (2,), (1,))),  # a hole
        _table(("d.safetensors", "a", (0,), (2,)), ("d.safetensors", "a", (2,), (2,))),  # one pair twice
        _table(("x.safetensors", "w", (0,), (4,))),
        _table(("d.safetensors", "w", (0, 0), (4,))),
        _table(("d.safetensors", "w", (1,), (4,))),
        _table(("d.safetensors", "w", (0, 0, 0), (0, 2**62, 2**62)), shape=(0, 2**62, 2**62)),
        _table(("d.safetensors", "w", (0,), (2**62 + 1,)), shape=(2**62 + 1,)),
        _table(shape=(4,)),
    ],
)
def test_writer_check_of_the_tensor_table_agrees_with_the_reader(tensors: list[TensorEntry]) -> None:
    from ckptproto.format.manifest import check_tensor_table

    files = {"d.safetensors": FileEntry(64, "crc32:00000000")}
    data = Manifest({"w": {"$torch": 0}}, tensors, files).to_json()
    try:
        Manifest.parse(data, "m")
        expected = None
    except CheckpointFormatError as exc:
        expected = str(exc)
    try:
        check_tensor_table(tensors, files, "m")
        got = None
    except CheckpointFormatError as exc:
        got = str(exc)
    assert got == expected


def test_array_specs_are_shared_and_behave_as_values() -> None:
    import copy
    import pickle

    from ckptproto.arrays import ArraySpec

    f32 = dtypes.by_name("float32")
    a = ArraySpec("torch", f32, (2, 3))
    assert a is ArraySpec("torch", f32, torch.Size([2, 3])) and type(a.shape) is tuple
    assert (a.numel, a.nbytes) == (6, 24) and a != ArraySpec("numpy", f32, (2, 3))
    for again in (pickle.loads(pickle.dumps(a)), copy.copy(a), copy.deepcopy(a)):
        assert again == a and again.nbytes == 24
    listed = ArraySpec("torch", f32, [2, 3])  # type: ignore[arg-type]
    assert listed == a and listed.shape == (2, 3)


def test_tensor_refs_in_tree_order_with_their_paths() -> None:
    import numpy as np

    from ckptproto.tree import iter_tensor_refs

    t = [torch.ones(1) * i for i in range(8)]
    state = {
        "a": t[0],
        "l": [1, [t[1], "x"], {"k": t[2]}],
        "tup": (t[3], (t[4],)),
        "ints": {3: t[5], 2**60: {"w": t[6]}},
        "$odd": np.zeros(2),
        "deep": {"x": {"y": {"z": t[7]}}, "n": None},
    }
    tree = encode_state(state).tree
    assert list(iter_tensor_refs(tree)) == [
        ("a", "torch", 0),
        ("l.1.0", "torch", 1),
        ("l.2.k", "torch", 2),
        ("tup.0", "torch", 3),
        ("tup.1.0", "torch", 4),
        ("ints.3", "torch", 5),
        (f"ints.{2**60}.w", "torch", 6),
        ("$odd", "numpy", 7),
        ("deep.x.y.z", "torch", 8),
    ]
    assert list(iter_tensor_refs({"$torch": 2}, "root")) == [("root", "torch", 2)]
    assert list(iter_tensor_refs({"k": {"$tuple": {"$numpy": 1}}})) == [("k", "numpy", 1)]


def _varied_state() -> dict[str, Any]:
    """Runs of tensors of one dtype and shape, broken by others; ties; numpy; non-ASCII and
    escaped keys; an empty tensor, a scalar, raw bytes (a dtype safetensors lacks)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3, 2, generator=g)
    module = {f"layer{i}.weight": torch.randn(4, 4, generator=g) for i in range(36)}  # one bulk dict
    module.update({f"layer{i}.bias": torch.randn(4, generator=g) for i in range(3)})
    module["layer99.weight"] = torch.randn(4, 4, generator=g)  # the first run's shape again
    return {
        "model": module,
        "mixed": {
            f"m{i}": torch.ones([(2,), (2, 1), ()][i % 3], dtype=[torch.float32, torch.bfloat16][i % 2])
            for i in range(9)
        },
        "w": w,
        "tied": w,
        "row": w[0],
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
        "np_f": np.ones(3, dtype=np.float64),
        "é日本": torch.zeros(2, dtype=torch.int64),
        ODD[1]: torch.ones(1),
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(2.5),
        "raw": torch.ones(2, dtype=torch.float8_e4m3fn) if hasattr(torch, "float8_e4m3fn") else torch.ones(2),
        "c": torch.ones(2, dtype=torch.complex64),
        "step": 7,
    }


def test_saved_manifest_and_header_are_what_json_dumps_writes(tmp_path: Path) -> None:
    """A save through the pipeline's fast paths (the table and its runs by columns, the
    header by one format operation) writes the bytes json.dumps gives for the same documents."""
    ckptproto.save(_varied_state(), tmp_path / "c", metadata={"note": ODD[4]})
    data = (tmp_path / "c" / "manifest.json").read_bytes()
    manifest = Manifest.parse(data, "m")
    assert data == _reference_to_json(manifest)
    assert 5 < len({(t.dtype, t.shape) for t in manifest.tensors}) < len(manifest.tensors)
    raw = (tmp_path / "c" / "data-00000-000.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    entries = safetensors.parse_header(raw[8 : 8 + size], len(raw), "d")
    start = 8 + size
    meta = json.loads(raw[8 : 8 + size])["__metadata__"]
    reference = [(k, e.code, e.shape, e.begin - start, e.end - start) for k, e in entries.items()]
    assert raw[: 8 + size] == _reference_header(reference, meta)


def test_table_by_columns_is_the_table_of_its_entries() -> None:
    """whole_table's entries and runs are what the per-entry path gives, and a RunTable is
    checked and written as the list of its entries is."""
    from ckptproto.format.manifest import RunTable, check_tensor_table, table_runs, whole_table
    from ckptproto.io.share import plan_share

    encoded = encode_state(_varied_state())
    specs = [t.spec for t in encoded.tensors]
    keys = [f"k{i}" for i in range(len(specs))]
    columns = [s.dtype for s in specs], [s.shape for s in specs]
    table = whole_table("d.safetensors", keys, *columns)
    entries = [
        TensorEntry(s.dtype, s.shape, (Chunk("d.safetensors", k, (0,) * len(s.shape), s.shape),))
        for k, s in zip(keys, specs, strict=True)
    ]
    assert table == entries and list(table) == entries and [table[i] for i in range(len(table))] == entries
    assert table[-1] == entries[-1] and table[2:9] == entries[2:9]
    with pytest.raises(IndexError):
        table[len(entries)]
    assert table.runs == table_runs(list(table)) and 1 < len(table.runs) < len(table)
    files = {"d.safetensors": FileEntry(64, "crc32:00000000")}
    check_tensor_table(table, files, "m")
    as_list = Manifest(encoded.tree, entries, files, {}, "2026-01-01T00:00:00Z")
    assert Manifest(encoded.tree, table, files, {}, "2026-01-01T00:00:00Z").to_json() == as_list.to_json()
    assert as_list.to_json() == _reference_to_json(as_list)
    broken = whole_table("d.safetensors", [*keys[:-1], "k0"], *columns)
    with pytest.raises(
        CheckpointFormatError, match=r"tensors\[\d+\]: \(d.safetensors, 'k0'\) is claimed by two"
    ):
        check_tensor_table(broken, files, "m")
    assert list(whole_table("d.safetensors", [], [], [])) == [] == RunTable([])
    for m in _manifests():  # entries of several chunks are runs of their own
        assert RunTable(table_runs(m.tensors)) == m.tensors
    with pytest.raises(ValueError, match="the run at 1"):
        RunTable([table.runs[0], (1, *table.runs[1][1:])])  # the first run holds more than one
    with pytest.raises(ValueError, match="the run at 0"):
        RunTable([(0, table.runs[0][1], ["other", *table.runs[0][2][1:]])])  # not the first's key
    # The pieces of a world of one, by columns, are the pieces the general split gives.
    job = plan_share(encoded, 0, 1)
    assert list(job.pieces) == [job.pieces[i] for i in range(len(job.pieces))]
    assert job.pieces[-1] == job.pieces[len(job.pieces) - 1] and job.pieces[1:3] == list(job.pieces)[1:3]
    with pytest.raises(IndexError):
        job.pieces[len(job.pieces)]


def _refs(n: int, tag: str = "$torch", key: str = "layers.{}.w") -> dict[str, Any]:
    return {key.format(i): {tag: i} for i in range(n)}


_TREES: list[Any] = [
    {},
    [],
    {"step": 3, "name": ODD[4], "x": [1.5, None, True, {"$tuple": [1, 2]}]},
    {"model": _refs(40), "trainer": {"global_step": 7, "epoch": 1}},
    {"models": {"model": _refs(33, key=ODD[4] + "{}%s")}, "optimizers": {"opt": _refs(35, "$numpy")}},
    {"m": _refs(40, key=ODD[1] + "{}"), "n": _refs(40, key=ODD[3] + "{}"), "o": _refs(40, key="\u2028{}")},
    {"m": {**_refs(40), "extra": {"$torch": 41, "more": 1}}},  # one value of two items
    {"m": {**_refs(40), "empty": {}}},
    {"m": {**_refs(40), "flag": {"$torch": True}}},  # a bool is not an index
    {"m": {**_refs(40), "mixed": {"$numpy": 40}}},  # two tags
    {"m": {**_refs(40), "step": 5}},
    {"m": {1: "int key", **_refs(40)}},  # json.dumps writes the key as "1"
    {"m": {**{f"k{i}": {"$torch": 2**70 + i} for i in range(40)}}},
    {f"d{i}": {f"e{j}": {"f": [i, j]} for j in range(30)} for i in range(30)},  # past the walk's budget
    _refs(31),
    _refs(32),
]


@pytest.mark.parametrize("value", _TREES, ids=range(len(_TREES)))
def test_tree_text_is_what_json_dumps_writes(value: Any) -> None:
    from ckptproto.format import json_text

    assert json_text.tree(value) == json.dumps(
        value, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )


@pytest.mark.parametrize("key", [*ODD[:4], "layers.{}.weight", "%s{}%d"])
def test_an_encoded_column_of_tensors_is_written_as_json_dumps_writes_it(key: str) -> None:
    """The encoder's dict of many plain tensors (tree.References: written from its keys and
    first index, its values unread) gives json.dumps's text, at any index it starts from and
    with keys to escape."""
    from ckptproto.format import json_text
    from ckptproto.tree import References, encode_state

    first = {"w": torch.zeros(1), "nested": [torch.ones(2)]}
    column = {key.replace("{}", str(i)) + str(i): torch.full((2,), float(i)) for i in range(40)}
    encoded = encode_state({"before": first, "m": column, "after": {"x": torch.zeros(3), "step": 4}})
    assert type(encoded.tree["m"]) is References and encoded.tree["m"].first == 2
    assert json_text.tree(encoded.tree) == json.dumps(
        encoded.tree, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    )


def test_tree_text_refuses_what_json_dumps_refuses() -> None:
    from ckptproto.format import json_text

    for bad in ({"m": {**_refs(40), "loss": float("nan")}}, {"x": {"y": float("inf")}}):
        with pytest.raises(ValueError, match="Out of range float"):
            json.dumps(bad, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        with pytest.raises(ValueError, match="Out of range float"):
            json_text.tree(bad)


def test_the_stage_split_times_functions_that_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench_many_tensors --stages wraps functions by name: each must still exist, and every
    stage must be reached by a save and a load of a plain state (else it prints no line)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_many_tensors as bench
    finally:
        sys.path.pop(0)
    bench.stage_split(300, 4, tmp_path, 1)
    printed = capsys.readouterr().out
    for _module, _function, label in bench.STAGES + bench.LOAD_STAGES:
        assert f"  {label} " in printed, label


def test_the_repeated_save_of_the_benchmark_plans_its_layout_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench_many_tensors' "ckptproto" save is the repeated save of a training run: over its
    rounds (a first save of a new layout beside each) its data file is planned once, so
    every round after the first times a save whose plan was kept (its median is not a
    first save's)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_many_tensors as bench
    finally:
        sys.path.pop(0)
    from ckptproto.io import plan

    firsts: list[str] = []
    real = plan._plan_file

    def counted(*args: Any, **kwargs: Any) -> Any:
        firsts.append(args[4][0])  # the first key: "layers..." or a new layout's "r1.layers..."
        return real(*args, **kwargs)

    monkeypatch.setattr(plan, "_plan_file", counted)
    ckptproto.clear_caches()
    bench.run_count(300, 4, tmp_path, 5, False, ["ckptproto"])
    assert [key.split(".")[0] for key in firsts] == ["layers", "r1", "r2", "r3", "r4", "r5"]


def test_the_stage_copy_probe_reaches_both_copies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench_probes stage-copy calls staging's internals by name (_copy_host, a Staged's
    slabs): they must still exist and take both of its copies."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_probes
    finally:
        sys.path.pop(0)
    bench_probes.stage_copy(tmp_path)
    printed = capsys.readouterr().out
    assert "address ranges (numpy)   CPU" in printed and "torch._foreach_copy_     wall" in printed


def test_the_load_scale_probe_prints_a_row_per_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """bench_probes load-scale calls Manifest.parse by its signature and loads through both
    public loads: a row for each count, its six figures all above zero."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_probes
    finally:
        sys.path.pop(0)
    bench_probes.load_scale(tmp_path, [64, 200])
    rows = [[f for f in line.split() if f != "/"] for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["64", "200"]
    assert all(len(row) == 7 and min(map(float, row[1:])) > 0 for row in rows)


def test_the_state_text_benchmark_reads_back_what_it_writes() -> None:
    """bench_state_text compares format 1.0's reference objects with a column form: both of
    its readers must still take its writers' text back to the same keys and indices (it
    asserts that itself), through the quick reader (a declined text would time the general
    path instead)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_state_text as bench
    finally:
        sys.path.pop(0)
    figures = bench.measure(300, 1)
    assert set(figures) == {
        "1.0 tree",
        "write 1.0",
        "write column",
        "read 1.0",
        "read column",
        "bytes 1.0",
        "bytes column",
    }
    assert figures["bytes column"] < figures["bytes 1.0"]


def test_a_column_written_again_takes_its_text_and_nothing_stale() -> None:
    """json_text keeps the texts of the last columns written, by keys and first index: the
    same column again gets that text; another first index, other keys, or keys changed in
    place since are written anew (each time what json.dumps writes)."""
    from ckptproto.format import json_text
    from ckptproto.tree import References

    def column(keys: list[str], first: int) -> References:
        refs = References(zip(keys, [{"$torch": first + i} for i in range(len(keys))], strict=True))
        refs.first, refs.path = first, "m"
        return refs

    def dumps(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    keys = [f"layers.{i}.weight" for i in range(40)]
    first = json_text.tree({"m": column(keys, 0)})
    assert json_text.tree({"m": column([str(k) for k in keys], 0)}) == first == dumps({"m": column(keys, 0)})
    for other in (column(keys, 7), column(keys[::-1], 0), column([*keys[:-1], "moved"], 0)):
        assert json_text.tree({"m": other}) == dumps({"m": other}) != first
    changed = column(keys, 0)
    json_text.tree({"m": changed})
    changed["extra"] = {"$torch": 40}  # a dict like any other: changed after it was written
    assert json_text.tree({"m": changed}) == dumps({"m": changed})


def test_a_numbered_column_and_its_copy() -> None:
    from ckptproto.tree import References

    column = References.numbered(["w", "b"], 3, "models.model")
    assert column == {"w": {"$torch": 3}, "b": {"$torch": 4}}
    assert (column.first, column.path) == (3, "models.model")
    copy = column.copy()
    assert type(copy) is References and copy == column and copy is not column
    assert (copy.first, copy.path) == (3, "models.model")
    del copy["w"]
    assert "w" in column
