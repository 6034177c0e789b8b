"""The load side's fast paths (issue 17, per-tensor cost) against the general ones they skip.

- A data file's header is checked by regenerating it from the manifest (io/headercheck.py):
  equal bytes must mean exactly what the full parse would find, and any other header (one
  byte off, keys reordered, other spacing or metadata) must go through the full parse.
- Small tensors are read in runs (io/bulkread.py): the values must equal the per-tensor
  path's, each tensor with memory of its own, and load_into must fill the same targets.
- tensor_kinds reuses the references Manifest.parse vouched for.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptproto
from ckptproto import dtypes
from ckptproto import tree as tree_module
from ckptproto.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError
from ckptproto.format import safetensors
from ckptproto.format.manifest import (
    Chunk,
    ColumnTable,
    FileEntry,
    Manifest,
    RunTable,
    TensorEntry,
    dtypes_and_shapes,
    table_columns,
    table_runs,
)
from ckptproto.io import bulkread, headercheck, match, reader, readplan, restore, threads
from ckptproto.io.plan import FILE_METADATA
from ckptproto.tree import decode_tree, quick_refs


def _state() -> dict[str, Any]:
    """Every layout case: dtypes of each width (so the writer reorders them), sub-byte and
    raw-stored dtypes, 0-d, empty and multi-dimensional tensors, a numpy array, a tensor over
    SMALL_BYTES between small ones, tied tensors and an RNG state."""
    g = torch.Generator().manual_seed(0)
    tied = torch.randn(3, 2, generator=g)
    return {
        "f32": torch.randn(5, generator=g),
        "f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
        "i8": torch.arange(-3, 6, dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "c128": torch.randn(3, generator=g, dtype=torch.complex128),
        "u4": torch.zeros(4, dtype=torch.uint8).view(torch.uint4)
        if hasattr(torch, "uint4")
        else torch.zeros(1),
        "e8": torch.zeros(3, dtype=torch.float8_e8m0fnu),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(bulkread.SMALL_BYTES // 4 + 3, generator=g),
        "after_big": torch.randn(4, 1, 2, generator=g),
        "np": np.arange(6, dtype=np.int32).reshape(2, 3),
        "tied_a": tied,
        "tied_b": tied,
        "rng": torch.get_rng_state(),
        "step": 7,
    }


def _slow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the general paths: no regenerated header, so no layout, no runs."""
    monkeypatch.setattr(reader, "expected_header", lambda layout, file_size=None: None)


@pytest.fixture(params=[False, True], ids=["one-thread", "in-two"])
def in_two(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Each test twice: as a small state loads (one thread), and with every build and copy of
    two tensors or more done in two halves on two threads (threads.in_two), as a state of
    thousands of tensors loads."""
    if request.param:
        _halves_on_the_pool(monkeypatch)
    return bool(request.param)


def _halves_on_the_pool(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """threads.in_two of two items or more, its first half always run by a pool thread (the
    real one takes back a half no pool thread has started: a test's tiny work would rarely
    reach the pool). Returns the names of the threads that ran a first half."""
    ran: list[str] = []

    def first_half(work: Any, half: int) -> list[Any]:
        ran.append(threading.current_thread().name)
        return list(work(0, half))

    def in_two(work: Any, count: int) -> list[Any]:
        if count < 2:
            return list(work(0, count))
        half = count // 2
        first = threads.pool().submit(first_half, work, half)
        second = work(half, count)
        return first.result() + second

    monkeypatch.setattr(threads, "in_two", in_two)
    return ran


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _bytes(a) == _bytes(b)
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    else:
        assert a == b


def _bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    if flat.element_size() == 1:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def test_regenerated_headers_are_the_written_ones_and_parse_the_same(tmp_path: Path) -> None:
    ckptproto.save(_state(), tmp_path / "c")
    with reader.OpenCheckpoint(tmp_path / "c") as ckpt:
        assert ckpt.files and all(f.layout is not None for f in ckpt.files.values())
        for data_file in ckpt.files.values():
            assert data_file.layout is not None
            parsed = safetensors.parse_header(data_file.header[8:], data_file.size, data_file.where)
            assert data_file.layout.header_entries(len(data_file.header)) == parsed
            assert list(data_file.layout.header_entries(len(data_file.header))) == list(parsed)


def test_safetensors_itemsizes_agree_with_the_dtype_table() -> None:
    # headercheck's soundness argument: a code's item size is the dtype's (F-20).
    for dtype in dtypes.BY_NAME.values():
        if dtype.safetensors is not None:
            assert safetensors.SAFETENSORS_ITEMSIZE[dtype.safetensors] == dtype.itemsize, dtype.name


def test_fast_and_general_paths_load_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_two: bool
) -> None:
    ckptproto.save(_state(), tmp_path / "c")
    fast = ckptproto.load(tmp_path / "c")
    with monkeypatch.context() as m:
        _slow(m)
        slow = ckptproto.load(tmp_path / "c")
    _same(fast, slow)
    expected = _state()
    expected["rng"] = fast["rng"]  # the generator moved on since the save
    _same(fast, expected)
    assert fast["tied_a"] is fast["tied_b"]


def test_run_tensors_have_memory_of_their_own(tmp_path: Path, in_two: bool) -> None:
    ckptproto.save(_state(), tmp_path / "c")
    state = ckptproto.load(tmp_path / "c")
    for key in ("f32", "f64", "bf16", "i8", "bool", "scalar", "after_big", "rng", "tied_a"):
        t = state[key]
        assert t.storage_offset() == 0, key
        assert t.untyped_storage().nbytes() == t.nbytes, key
        assert t._base is None, key
    torch.set_rng_state(state["rng"])  # reads from the start of the storage: failed on a view
    assert torch.equal(torch.get_rng_state(), state["rng"])


def _edit_data_header(path: Path, fn: Any, align: int = 8) -> None:
    """Rewrite the data file's header text with ``fn(text) -> text`` (padded so the buffer
    starts at a multiple of ``align``) and fix the manifest's size and checksum, so that only
    the header differs from what the writer made."""
    (name,) = [p.name for p in path.glob("*.safetensors")]
    data = (path / name).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = fn(data[8 : 8 + n].rstrip(b" "))
    text = text.ljust(len(text) + (-(8 + len(text)) % align))
    new = struct.pack("<Q", len(text)) + text + data[8 + n :]
    (path / name).write_bytes(new)
    doc = json.loads((path / "manifest.json").read_text())
    doc["files"][name] = {"size": len(new), "checksum": f"crc32:{zlib.crc32(new):08x}", "rank": 0}
    doc.pop("manifest_checksum", None)  # (edited once already: gone)
    (path / "manifest.json").write_text(json.dumps(doc))


def _save_small(path: Path) -> dict[str, torch.Tensor]:
    state = {"a": torch.arange(4.0), "b": torch.arange(6.0).reshape(2, 3), "c": torch.arange(2.0)}
    ckptproto.save(state, path)
    return state


def _opened_fast(path: Path) -> bool:
    with reader.OpenCheckpoint(path) as ckpt:
        return all(f.layout is not None for f in ckpt.files.values())


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace(b'"writer":"ckptproto"', b'"writer":"ckptprotO"'),  # other metadata
        lambda t: t.replace(b",", b", "),  # other spacing
        lambda t: json.dumps(json.loads(t), indent=1).encode(),
    ],
)
def test_another_valid_header_takes_the_full_parse(tmp_path: Path, edit: Any) -> None:
    state = _save_small(tmp_path / "c")
    assert _opened_fast(tmp_path / "c")
    _edit_data_header(tmp_path / "c", edit)
    assert not _opened_fast(tmp_path / "c")
    _same(ckptproto.load(tmp_path / "c"), state)


@pytest.mark.parametrize("large", [False, True])
def test_either_padding_the_writer_gives_takes_the_fast_path(tmp_path: Path, large: bool) -> None:
    """A data file's buffer starts at a multiple of 8, or of a page from
    PAGE_BUFFER_MIN (files written before that rule have the first): both headers are
    regenerated; any other padding is valid too, and takes the full parse."""
    n = safetensors.PAGE_BUFFER_MIN // 4 if large else 6
    state = {"a": torch.arange(float(n)), "b": torch.ones(3)}
    ckptproto.save(state, tmp_path / "c")
    (data,) = (tmp_path / "c").glob("*.safetensors")
    (length,) = struct.unpack("<Q", data.read_bytes()[:8])
    assert (8 + length) % (safetensors.PAGE if large else 8) == 0
    assert large or (8 + length) % safetensors.PAGE != 0  # (the short header: minimal padding)
    assert _opened_fast(tmp_path / "c")
    for align, fast in ((8, True), (safetensors.PAGE, True), (16 << 10, False)):
        _edit_data_header(tmp_path / "c", lambda t: t, align)
        assert _opened_fast(tmp_path / "c") == fast, align
        _same(ckptproto.load(tmp_path / "c"), state)
    _edit_data_header(tmp_path / "c", lambda t: t + b" " * 8)  # 8 more than the minimum
    assert not _opened_fast(tmp_path / "c")
    _same(ckptproto.load(tmp_path / "c"), state)


def test_reordered_keys_take_the_full_parse(tmp_path: Path) -> None:
    state = _save_small(tmp_path / "c")

    def reorder(text: bytes) -> bytes:
        doc = json.loads(text)
        return json.dumps(dict(reversed(list(doc.items()))), separators=(",", ":")).encode()

    _edit_data_header(tmp_path / "c", reorder)
    assert not _opened_fast(tmp_path / "c")
    _same(ckptproto.load(tmp_path / "c"), state)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t.replace(b'"shape":[2,3]', b'"shape":[3,3]'), "needs 36 bytes"),
        (lambda t: t.replace(b'"data_offsets":[16,40]', b'"data_offsets":[16,41]'), "needs 24 bytes"),
        (lambda t: t.replace(b'"dtype":"F32","shape":[2', b'"dtype":"I32","shape":[2'), "stored as I32"),
        (lambda t: t.replace(b'"b":', b'"B":'), "missing from the data file"),
        (lambda t: t.replace(b'"__metadata__"', b'"__metadata_x"'), "needs exactly dtype"),
    ],
)
def test_a_header_one_field_off_is_refused_as_before(tmp_path: Path, edit: Any, match: str) -> None:
    _save_small(tmp_path / "c")
    _edit_data_header(tmp_path / "c", edit)
    for call in (
        lambda: ckptproto.load(tmp_path / "c"),
        lambda: ckptproto.load_into(
            tmp_path / "c", {"a": torch.zeros(4), "b": torch.zeros(2, 3), "c": torch.zeros(2)}
        ),
    ):
        with pytest.raises(CheckpointFormatError, match=match):
            call()


def test_a_damaged_run_is_refused_and_no_target_is_written(tmp_path: Path) -> None:
    _save_small(tmp_path / "c")
    (name,) = [p.name for p in (tmp_path / "c").glob("*.safetensors")]
    data = bytearray((tmp_path / "c" / name).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "c" / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        ckptproto.load(tmp_path / "c")
    target = {"a": torch.zeros(4), "b": torch.zeros(2, 3), "c": torch.zeros(2)}
    with pytest.raises(CheckpointCorruptError, match="checksum"):
        ckptproto.load_into(tmp_path / "c", target)
    # Runs are copied into their targets only after every CRC matched.
    assert all(not t.any() for t in target.values())


def _targets(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = torch.zeros_like(v)
        elif isinstance(v, np.ndarray):
            out[k] = np.zeros_like(v)
        else:
            out[k] = None
    out["tied_b"] = out["tied_a"]
    return out


def test_load_into_fast_and_general_fill_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_two: bool
) -> None:
    state = _state()
    ckptproto.save(state, tmp_path / "c")
    fast = _targets(state)
    ckptproto.load_into(tmp_path / "c", fast)
    slow = _targets(state)
    with monkeypatch.context() as m:
        _slow(m)
        ckptproto.load_into(tmp_path / "c", slow)
    _same(fast, slow)
    _same(fast, state)


@pytest.mark.parametrize("one_d", [False, True])
@pytest.mark.parametrize("inference_target", [False, True])
def test_load_into_parameters_inference_tensors_and_views(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_d: bool, inference_target: bool, in_two: bool
) -> None:
    """Targets torch will not simply copy into, in a run of 1-d targets (one
    split_with_sizes_copy, falling back to copies one by one) and of mixed shapes."""
    shape = (6,) if one_d else (2, 3)
    state = {
        "p": torch.arange(6.0).reshape(shape),
        "i": torch.arange(3.0),
        "v": torch.arange(4.0),
        "x": torch.ones(2),
    }
    ckptproto.save(state, tmp_path / "c")
    base = torch.zeros(8)
    with torch.inference_mode():
        inference = torch.zeros(3)
    target = {
        "p": torch.nn.Parameter(torch.zeros(shape)),  # requires grad: filled without autograd
        # in-place outside inference mode is refused by torch: bytes instead
        "i": inference if inference_target else torch.zeros(3),
        "v": base[::2],  # not contiguous
        "x": torch.zeros(2),
    }
    ckptproto.load_into(tmp_path / "c", target)
    _same({k: v.detach() for k, v in target.items()}, state)
    assert target["p"].requires_grad and base[1::2].eq(0).all()


def test_load_into_past_the_scratch_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_two: bool
) -> None:
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(50)}
    ckptproto.save(state, tmp_path / "c")
    monkeypatch.setattr(bulkread, "SCRATCH_BYTES", 12 * 10)  # ten tensors in runs, the rest direct
    monkeypatch.setattr(bulkread, "RUN_BYTES", 12 * 4)  # several runs
    target = {k: torch.zeros(3) for k in state}
    ckptproto.load_into(tmp_path / "c", target)
    _same(target, state)
    _same(ckptproto.load(tmp_path / "c"), state)


def test_tensor_kinds_from_vouched_refs_equal_the_walk(tmp_path: Path) -> None:
    ckptproto.save(_state(), tmp_path / "c")
    manifest = reader.read_manifest(tmp_path / "c")
    assert manifest.refs is not None
    vouched = readplan.tensor_kinds(manifest, "m")
    walked = readplan.tensor_kinds(Manifest(manifest.state, manifest.tensors, manifest.files), "m")
    assert vouched == walked and set(vouched.values()) == {"torch", "numpy"}


def test_tensor_kinds_walk_still_refuses(tmp_path: Path) -> None:
    ckptproto.save({"a": torch.zeros(2)}, tmp_path / "c")
    manifest = reader.read_manifest(tmp_path / "c")
    bad = Manifest({"a": {"$torch": 0}, "b": {"$numpy": 0}}, manifest.tensors, manifest.files)
    with pytest.raises(CheckpointFormatError, match="both torch and numpy"):
        readplan.tensor_kinds(bad, "m")


def test_decode_without_leaf_paths_builds_the_same_tree() -> None:
    tree = {"a": {"$torch": 0}, "b": [{"$torch": 1}, {"$tuple": [{"$torch": 0}]}], "c": {"d": {"$int": "7"}}}
    seen: list[str] = []
    with_paths = decode_tree(json.loads(json.dumps(tree)), lambda k, i, p: seen.append(p) or i)
    without = decode_tree(json.loads(json.dumps(tree)), lambda k, i, p: i, paths=False, in_place=True)
    assert with_paths == without == {"a": 0, "b": [1, (0,)], "c": {"d": 7}}
    assert seen == ["a", "b.0", "b.1.0"]


REFS = {f"p{i}": {"$torch": i} for i in range(12)}  # enough to be decoded a column at a time


@pytest.mark.parametrize(
    "tree",
    [
        {"m": REFS, "n": [REFS, {"$tuple": [REFS]}], "o": {**REFS, "x": 3}},
        {"m": {**REFS, "p3": {"$torch": -1}}},
        {"m": {**REFS, "p3": {"$torch": True}}},
        {"m": {**REFS, "p3": {"$torch": 3.0}}},
        {"m": {**REFS, "p3": {"$torch": "3"}}},
        {"m": {**REFS, "p3": {"$numpy": 3}}},
        {"m": {**REFS, "p3": {"$torch": 3, "x": 1}}},
        {"m": {**REFS, "$p3": {"$torch": 3}}},
        {"m": {**REFS, "p3": {"$int": "3"}}},
        {"m": {**REFS, "p3": {"x": 3}}},
        {"m": {**REFS, "p3": None}},
        # values of length one that are not objects (torch_column's ["$torch"] raises on them)
        {"m": {**REFS, "p3": "x"}},
        {"m": {**REFS, "p3": [3]}},
        {"m": {**REFS, "p3": [{"$torch": 3}]}},
        {"m": {**REFS, "p3": 3}},
    ],
)
def test_a_column_of_references_decodes_as_value_by_value(tree: dict[str, Any]) -> None:
    """decode_tree without paths takes an object of references a column at a time
    (tree.torch_column); with paths it goes value by value. Same tree or same error, and the
    same resolve calls in the same order; quick_refs gives the references in that order too."""

    def decode(**kwargs: Any) -> tuple[Any, list[tuple[str, int]]]:
        seen: list[tuple[str, int]] = []
        try:
            out = decode_tree(
                json.loads(json.dumps(tree)), lambda k, i, p: seen.append((k, i)) or i * 10, **kwargs
            )
        except CheckpointFormatError as exc:
            return str(exc), seen
        return out, seen

    by_value = decode()
    assert decode(paths=False) == by_value
    assert decode(paths=False, in_place=True) == by_value

    def many(indices: list[int]) -> list[Any]:  # what resolve gives for each, in one call
        return [resolve_one("torch", i, "") for i in indices]

    seen_many: list[tuple[str, int]] = []
    resolve_one = lambda k, i, p: seen_many.append((k, i)) or i * 10  # noqa: E731
    try:
        out = decode_tree(json.loads(json.dumps(tree)), resolve_one, paths=False, resolve_many=many)
    except CheckpointFormatError as exc:
        out = str(exc)
    assert (out, seen_many) == by_value
    refs = quick_refs(json.loads(json.dumps(tree)))
    if refs is not None:
        assert [("torch", i) for i in refs[0]] == [s for s in by_value[1] if s[0] == "torch"]
    if isinstance(by_value[0], str):
        assert refs is None
    # One memo shared by the checks and the decodes of one parsed tree (a reader's): the
    # same answers as without it, and an object decoded in place leaves it.
    parsed, memo = json.loads(json.dumps(tree)), {}
    assert quick_refs(parsed, columns=memo) == refs
    seen_memo: list[tuple[str, int]] = []
    try:
        shared = decode_tree(
            parsed, lambda k, i, p: seen_memo.append((k, i)) or i * 10, paths=False, columns=memo
        )
        decode_tree(parsed, lambda k, i, p: i * 10, paths=False, in_place=True, columns=memo)
    except CheckpointFormatError as exc:
        shared = str(exc)
    assert (shared, seen_memo) == by_value
    assert all(entry[1] is None for entry in memo.values())  # every column decoded in place: gone


def test_a_load_works_out_each_column_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The parse, the check and the decode of a manifest ask the same question of each object
    of references (a module's state dict): it is worked out once per load, not per asker."""
    model = {f"layer{i}.weight": torch.full((2,), float(i)) for i in range(40)}
    ckptproto.save({"models": {"m": model}, "step": 3}, tmp_path / "c")
    asked: list[int] = []
    work = tree_module._column_indices

    def counted(node: dict[str, Any]) -> Any:
        asked.append(len(node))
        return work(node)

    monkeypatch.setattr(tree_module, "_column_indices", counted)
    state = ckptproto.load(tmp_path / "c")
    assert all(torch.equal(state["models"]["m"][k], v) for k, v in model.items())
    assert asked.count(40) == 1
    asked.clear()
    target = {"models": {"m": {k: torch.zeros(2) for k in model}}, "step": 0}
    ckptproto.load_into(tmp_path / "c", target)
    assert all(torch.equal(target["models"]["m"][k], v) for k, v in model.items())
    assert asked.count(40) == 1
    # A load's manifest keeps no memo of the objects it handed over as the state.
    _, manifest = restore.load_state(tmp_path / "c")
    assert manifest.columns is None


def _entry(dtype: str, shape: tuple[int, ...], file: str, key: str) -> TensorEntry:
    return TensorEntry(dtypes.by_name(dtype), shape, (Chunk(file, key, (0,) * len(shape), shape),))


F0, F1 = "data-00000-000.safetensors", "data-00001-000.safetensors"
FILES = {F0: FileEntry(1, "crc32:00000000"), F1: FileEntry(1, "crc32:00000000", 1)}


@pytest.mark.parametrize(
    "table",
    [
        [],
        [_entry("float32", (4,), F0, "a")],
        [_entry(d, s, F0, f"k{i}") for i, (d, s) in enumerate([("float32", (2, 3)), ("int8", (5,))] * 5)],
        [_entry("bfloat16", (3,), F0, "a"), _entry("float64", (2,), F0, "b"), _entry("bool", (), F0, "c")],
        # two files (a two-rank save read by one process), and a file holding nothing
        [_entry("float32", (i % 3 + 1,), (F0, F1)[i % 2], f"k{i}") for i in range(9)],
        [_entry("float32", (2,), F1, "a"), _entry("int64", (2,), F1, "b")],
        [_entry("float8_e4m3fn", (3,), F0, "a"), _entry("int4", (4,), F0, "b")],  # stored raw
    ],
)
def test_layouts_by_columns_equal_the_chunk_walk(
    table: list[TensorEntry], monkeypatch: pytest.MonkeyPatch
) -> None:
    """headercheck.file_layouts by the table's columns (as parse sets them, or as
    table_columns derives them) lays every file out as the walk chunk by chunk does."""
    files = dict(FILES)

    def fields(layouts: dict[str, headercheck.FileLayout]) -> dict[str, tuple[Any, ...]]:
        return {
            n: (x.keys, x.codes, x.shapes, x.begins, x.ends, x.owners, x.buffer_size)
            for n, x in layouts.items()
        }

    manifest = Manifest({}, table, files)
    derived = headercheck.file_layouts(manifest)
    columns = table_columns(table)
    assert columns is not None and derived[F0].form_of is not None
    parsed = headercheck.file_layouts(Manifest({}, columns, files))
    with monkeypatch.context() as m:
        m.setattr(headercheck, "table_columns", lambda tensors: None)
        walked = headercheck.file_layouts(manifest)
    assert walked[F0].form_of is None
    assert fields(derived) == fields(parsed) == fields(walked)
    for layout in derived.values():  # each entry's form is its entry but for the key
        assert layout.form_of is not None
        for owner, form in zip(layout.owners, layout.form_of, strict=True):
            assert layout.forms[form]._replace(chunks=table[owner].chunks) == table[owner]


def test_a_parsed_tables_columns_are_its_entries(tmp_path: Path) -> None:
    ckptproto.save(_state(), tmp_path / "c")
    manifest = reader.read_manifest(tmp_path / "c")
    table = manifest.tensors
    assert isinstance(table, ColumnTable)  # the writer's table: read as rows
    keys, form_of, forms = table.keys, table.form_of, table.forms
    assert table == table.entries() and len(table) == len(keys) and table[-1] == table.entries()[-1]
    rebuilt = [
        forms[f]._replace(chunks=(forms[f].chunks[0]._replace(key=k),))
        for k, f in zip(keys, form_of, strict=True)
    ]
    assert rebuilt == table.entries()
    assert table_columns(table.entries()) == table
    # Every form of the table equals every other, both ways round (manifest.EntryTable).
    runs = RunTable(table_runs(table.entries()))
    assert runs == table and table == runs and table.entries() == runs and tuple(runs) == table
    assert table != table.entries()[:-1] and runs != table[:-1]


def test_dtypes_and_shapes_from_columns_equal_those_of_the_entries(tmp_path: Path) -> None:
    ckptproto.save(_state(), tmp_path / "c")
    table = reader.read_manifest(tmp_path / "c").tensors
    assert isinstance(table, ColumnTable)
    indices = [len(table) - 1, 0, 2, 2]
    expected = ([table.entries()[i].dtype for i in indices], [table.entries()[i].shape for i in indices])
    assert dtypes_and_shapes(table, indices) == dtypes_and_shapes(table.entries(), indices) == expected


def test_header_check_refuses_a_metadata_key(tmp_path: Path) -> None:
    # A chunk key "__metadata__" would regenerate into a header whose parse differs: never
    # compared, the full parse decides.
    layout = headercheck.FileLayout(["__metadata__"], ["F32"], [(1,)], [0], [4], [0], 4)
    assert headercheck.expected_header(layout) is None
    ok = headercheck.FileLayout(["x"], ["F32"], [(1,)], [0], [4], [0], 4)
    assert isinstance(headercheck.expected_header(ok), bytes)


def test_errors_name_the_file(tmp_path: Path) -> None:
    _save_small(tmp_path / "c")
    _edit_data_header(tmp_path / "c", lambda t: t.replace(b'"shape":[2,3]', b'"shape":[3,3]'))
    with pytest.raises(CheckpointError, match=r"data-.*\.safetensors"):
        ckptproto.load(tmp_path / "c")


def test_matches_torch_agrees_with_describe_torch() -> None:
    from ckptproto import arrays

    f32, f64 = dtypes.by_name("float32"), dtypes.by_name("float64")
    cases = [
        torch.zeros(2, 3),
        torch.nn.Parameter(torch.zeros(2, 3)),
        torch.zeros(2, 3, dtype=torch.float64),
        torch.zeros(3, 2),
        torch.zeros(2, 3).t().contiguous().t(),
        torch.zeros(2, 3, dtype=torch.complex64).conj(),
        torch.zeros(2, 3).to_sparse(),
        torch.zeros(2, 3, device="meta"),
        torch.nested.nested_tensor([torch.zeros(3), torch.zeros(3)]),
        # (no quantized tensor here: creating one warns once per process, and tests/test_spec.py
        # expects that warning)
    ]
    for t in cases:
        for dtype in (f32, f64):
            spec = arrays.describe_torch(t)
            expected = type(spec) is arrays.ArraySpec and spec.dtype == dtype and spec.shape == (2, 3)
            assert arrays.matches_torch(t, dtype, (2, 3)) == expected, (t, dtype)


def _match(manifest: Manifest, target: Any, many: int, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    refs: dict[int, match.Ref] = {}
    skeleton = decode_tree(
        manifest.state, lambda kind, index, p: refs.setdefault(index, match.Ref(kind, index))
    )
    with monkeypatch.context() as m:
        m.setattr(match, "_MANY", many)
        matcher = match.Matcher(manifest, strict=True, reject_unexpected=True)
        matcher.match(skeleton, target, "")
    destinations = {i: [id(t) for t in matcher.destinations(i)] for i in matcher.first}
    return destinations, matcher.missing, matcher.mismatched, matcher.unexpected


class _ListKeys(Mapping[str, Any]):
    """A mapping whose keys() is a list, not a set view (a dict-like some libraries make)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    def keys(self) -> list[str]:  # type: ignore[override]
        return list(self.data)


@pytest.mark.parametrize("kind", [dict, _ListKeys])
def test_keys_missing_from_the_checkpoint_are_found_for_any_mapping(tmp_path: Path, kind: Any) -> None:
    """The matcher finds the target's keys the checkpoint lacks with one set comparison where
    keys() is a set view, key by key where it is not (a list): the same paths either way."""
    ckptproto.save({"m": {"a": torch.zeros(1), "b": torch.zeros(1)}}, tmp_path / "c")
    manifest = ckptproto.read_manifest(tmp_path / "c")
    skeleton = decode_tree(manifest.state, lambda k, i, p: match.Ref(k, i))
    for keys, missing in ((["a"], []), (["a", "b"], []), (["a", "x", "y"], ["m.x", "m.y"])):
        matcher = match.Matcher(manifest, strict=False, reject_unexpected=False)
        matcher.match(skeleton, {"m": kind({k: torch.zeros(1) for k in keys})}, "")
        assert matcher.missing == missing


@pytest.mark.parametrize(
    ("edit", "in_passes"),
    [
        (lambda t: None, True),
        (lambda t: t.update(w3=torch.zeros(4, dtype=torch.float64)), False),  # another dtype
        (lambda t: t.update(w3=torch.zeros(5)), False),  # another shape
        (lambda t: t.update(w3=torch.zeros(4, device="meta")), False),
        (lambda t: t.update(w3=torch.nested.nested_tensor([torch.zeros(4)])), False),
        (lambda t: t.update(w3=torch.zeros(4).to_sparse()), False),
        (lambda t: t.update(w3=np.zeros(4, np.float32)), False),  # an array, not a torch tensor
        (lambda t: t.update(w3=torch.nn.Parameter(torch.zeros(4))), True),  # a Parameter is plain
        (lambda t: t.update(w3=torch.zeros(8)[::2]), True),  # a strided view matches by dtype and shape
        (lambda t: t.update(w3=None), False),
        (lambda t: t.pop("w3"), False),  # missing from the target
        (lambda t: t.update(extra=torch.zeros(4)), True),  # missing from the checkpoint
        (lambda t: t.update(twice=t["w0"]), True),  # one target tensor for two keys
        (lambda t: t.update({k: v.double() for k, v in t.items()}), False),  # every dtype other
    ],
)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("one_dtype", [False, True])
def test_matching_a_dict_at_once_records_what_one_by_one_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: Any, in_passes: bool, tied: bool, one_dtype: bool
) -> None:
    """Matcher._plain_all (a module's state_dict against its references, in passes) records
    the destinations and problems the member-by-member walk records, for every target (in a
    state of one dtype, whose dtypes are compared once, and of two)."""
    weights = {f"w{i}": torch.full((4,), float(i)) for i in range(20)}
    if not one_dtype:
        weights["i"] = torch.arange(4)
    if tied:  # two keys, one checkpoint tensor
        weights["w19"] = weights["w0"]
    state = {"m": weights, "step": 1}
    ckptproto.save(state, tmp_path / "c")
    manifest = ckptproto.read_manifest(tmp_path / "c")
    target = {"m": {k: torch.zeros_like(v) for k, v in weights.items()}, "step": 0}
    edit(target["m"])
    taken: list[bool] = []
    plain_all = match.Matcher._plain_all

    def spy(self: match.Matcher, ckpt_node: Any, target_node: Any) -> bool:
        taken.append(plain_all(self, ckpt_node, target_node))
        return taken[-1]

    monkeypatch.setattr(match.Matcher, "_plain_all", spy)
    batched = _match(manifest, target, 16, monkeypatch)
    assert batched == _match(manifest, target, 1 << 30, monkeypatch)
    assert taken == [in_passes and not tied]  # a checkpoint tie: recorded one by one


def test_a_quickly_read_tables_keys_regenerate_the_header_unchecked(tmp_path: Path) -> None:
    """Keys read by the quick reader (JSON strings without escapes, distinct by F-12) are put
    into the regenerated header as they are, unchecked: the same bytes as the checked path,
    and the file's own, also for keys json_text.plain turns down (not printable: U+2028,
    DEL) but JSON writes as themselves."""
    state = {
        "m": {f"k{i}{c}": torch.full((2,), float(i)) for i, c in enumerate(["", "\u2028", "\x7f", "é", "%s"])}
    }
    ckptproto.save(state, tmp_path / "c")
    ckpt = reader.OpenCheckpoint(tmp_path / "c")
    try:
        assert isinstance(ckpt.manifest.tensors, ColumnTable) and ckpt.manifest.tensors.plain_keys
        for name, layout in headercheck.file_layouts(ckpt.manifest).items():
            assert layout.plain_keys
            checked = safetensors.encode_header_columns(
                layout.keys, layout.codes, layout.shapes, layout.begins, layout.ends, FILE_METADATA
            )
            assert headercheck.expected_header(layout) == checked
            assert (tmp_path / "c" / name).read_bytes()[: len(checked)] == checked
    finally:
        ckpt.close()
    # A table built from entries (the general path) vouches for nothing: checked as before.
    assert not table_columns(list(ckpt.manifest.tensors)).plain_keys  # type: ignore[union-attr]


def test_in_two_gives_the_halves_in_order_from_two_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "TWO_CORES_FROM", 4)
    calls: list[tuple[int, int, str]] = []

    def work(a: int, b: int) -> list[int]:
        calls.append((a, b, threading.current_thread().name))
        time.sleep(0.05)  # (a pool thread takes the first half meanwhile)
        return list(range(a, b))

    assert threads.in_two(work, 9) == list(range(9))
    assert sorted(c[:2] for c in calls) == [(0, 4), (4, 9)]
    names = {c[0]: c[2] for c in calls}
    assert names[0].startswith("ckptproto-io") and names[4] == threading.current_thread().name
    calls.clear()
    assert threads.in_two(work, 3) == [0, 1, 2]  # below TWO_CORES_FROM: one piece, here
    assert calls == [(0, 3, threading.current_thread().name)]


def test_in_two_never_waits_for_a_busy_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pool thread busy (writing an async save, say), or itself in in_two: the half no
    pool thread took is done by the caller, which never waits for the pool."""
    monkeypatch.setattr(threads, "TWO_CORES_FROM", 2)
    pool = threads.pool()
    release = threading.Event()
    busy = [pool.submit(release.wait, 30) for _ in range(pool._max_workers)]
    try:
        calls: list[tuple[int, int, str]] = []

        def work(a: int, b: int) -> list[int]:
            calls.append((a, b, threading.current_thread().name))
            return list(range(a, b))

        assert threads.in_two(work, 6) == list(range(6))  # (blocked workers: a hang without)
        assert sorted(calls) == [(0, 3, "MainThread"), (3, 6, "MainThread")]
    finally:
        release.set()
        threads.gather(busy)
    # each pool thread in in_two: the halves they hand over wait behind them in the queue
    nested = [pool.submit(threads.in_two, work, 6) for _ in range(pool._max_workers)]
    assert [f.result(timeout=30) for f in nested] == [list(range(6))] * len(nested)


@pytest.mark.parametrize("failing", [0, 5], ids=["pool-half", "caller-half"])
def test_in_two_raises_either_halfs_error_once_the_other_ended(
    monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    monkeypatch.setattr(threads, "TWO_CORES_FROM", 2)
    started: list[int] = []
    ended: list[int] = []

    def work(a: int, b: int) -> list[int]:
        started.append(a)
        if a == failing:
            raise ValueError(f"half at {a}")
        time.sleep(0.05)
        ended.append(a)
        return []

    for _ in range(5):
        started.clear()
        ended.clear()
        with pytest.raises(ValueError, match=f"half at {failing}"):
            threads.in_two(work, 10)
        # the other half ran to its end before the error was raised, or (a first half no pool
        # thread had taken yet) never started
        assert sorted(started) == sorted([failing, *ended])
        if failing == 0:
            assert ended == [5]


def test_load_into_many_parameters_in_two_halves_needs_no_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Autograd is per thread: the pool's half copies into Parameters that require grad with it
    off too, in both copies (1-d targets: split_with_sizes_copy; others: _foreach_copy_),
    never falling back to copies one by one."""
    ran = _halves_on_the_pool(monkeypatch)
    state = {f"p{i}": torch.full((3,) if i % 2 else (1, 3), float(i)) for i in range(12)}
    ckptproto.save(state, tmp_path / "c")
    for one_d in (True, False):
        chosen = {k: v for k, v in state.items() if (v.dim() == 1) == one_d}
        target = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in chosen.items()}

        with monkeypatch.context() as m:
            m.setattr(bulkread.arrays, "copy_bytes", _one_by_one)
            ckptproto.load_into(tmp_path / "c", target, strict=False)
        _same({k: v.detach() for k, v in target.items()}, chosen)
        assert all(p.requires_grad and p.grad_fn is None for p in target.values())
    assert ran and all(name.startswith("ckptproto-io") for name in ran)


def test_load_into_inference_tensors_in_inference_mode_in_two_halves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inference mode is per thread too: in it, the pool's half writes inference tensors as
    the caller's does, never falling back to copies one by one."""
    ran = _halves_on_the_pool(monkeypatch)
    state = {f"p{i}": torch.full((3,) if i % 2 else (1, 3), float(i)) for i in range(12)}
    ckptproto.save(state, tmp_path / "c")
    with torch.inference_mode():
        target = {k: torch.zeros_like(v) for k, v in state.items()}
        with monkeypatch.context() as m:
            m.setattr(bulkread.arrays, "copy_bytes", _one_by_one)
            ckptproto.load_into(tmp_path / "c", target)
    _same(target, state)
    assert all(t.is_inference() for t in target.values())
    with torch.inference_mode():  # as the caller makes its half, so does the pool
        loaded = ckptproto.load(tmp_path / "c")
    assert all(t.is_inference() for t in loaded.values())
    loaded = ckptproto.load(tmp_path / "c")
    assert not any(t.is_inference() for t in loaded.values())
    assert len(ran) >= 3  # the pool ran a half of each


def _one_by_one(dst: Any, src: Any) -> bool:
    raise AssertionError("copied one by one: a half ran with autograd on")


def test_thousands_of_tensors_load_in_two_halves_by_default(tmp_path: Path) -> None:
    count = 2 * threads.TWO_CORES_FROM + 3
    state = {f"t{i}": torch.full((2,) if i % 3 else (1, 2), float(i)) for i in range(count)}
    ckptproto.save(state, tmp_path / "c")
    loaded = ckptproto.load(tmp_path / "c")
    _same(loaded, state)
    assert all(t.untyped_storage().nbytes() == t.nbytes and t._base is None for t in loaded.values())
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    ckptproto.load_into(tmp_path / "c", target)
    _same(target, state)
