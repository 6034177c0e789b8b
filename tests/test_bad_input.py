"""Bad input: illegal leaves are refused before anything is written; damaged or hostile
checkpoints raise the right CheckpointError subclass, never another exception, never a giant
allocation, never a read outside the checkpoint directory."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import quantized
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptproto
from ckptproto import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    UnsupportedValueError,
)

DATA = "data-00000-000.safetensors"


# --------------------------------------------------------------------------- illegal leaves


class FloatSub(float):
    pass


class IntSub(int):
    pass


class TensorSub(torch.Tensor):
    pass


def _deep(n: int) -> Any:
    node: Any = 0
    for _ in range(n):
        node = [node]
    return node


def _cycle() -> dict[str, Any]:
    d: dict[str, Any] = {"x": 1}
    d["self"] = d
    return d


ILLEGAL: dict[str, Callable[[], Any]] = {
    "set": lambda: {1, 2},
    "frozenset": lambda: frozenset(),
    "object": object,
    "complex": lambda: 1 + 2j,
    "bytearray": lambda: bytearray(b"x"),
    "numpy_scalar": lambda: np.float32(1.5),
    "numpy_int_scalar": lambda: np.int64(3),
    "float_subclass": lambda: FloatSub(1.0),
    "int_subclass": lambda: IntSub(1),
    "tensor_subclass": lambda: torch.zeros(2).as_subclass(TensorSub),
    "sparse_tensor": lambda: torch.eye(3).to_sparse(),
    "sparse_csr_tensor": lambda: torch.eye(3).to_sparse_csr(),
    "quantized_tensor": lambda: quantized("qint8"),
    "meta_tensor": lambda: torch.empty(2, device="meta"),
    "object_array": lambda: np.array([1, "a"], dtype=object),
    "str_array": lambda: np.array(["ab"]),
    "datetime_array": lambda: np.array(["2020-01-01"], dtype="datetime64[D]"),
    "structured_array": lambda: np.zeros(2, dtype=[("a", "i4")]),
    "longdouble_array": lambda: np.zeros(2, dtype=np.longdouble),
    "masked_array": lambda: np.ma.array([1, 2]),
    "function": lambda: len,
    "device": lambda: torch.device("cpu"),
    "dtype": lambda: torch.float32,
}


@pytest.mark.parametrize("name", sorted(ILLEGAL))
def test_illegal_leaf_names_path_and_writes_nothing(name: str, tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.param_groups[0]["foo"] = ILLEGAL[name]()
    state = {"models": {"model": model}, "optimizers": {"optimizer": opt}}
    with pytest.raises(UnsupportedValueError) as info:
        ckptproto.save(state, tmp_path / "ckpt")
    assert info.value.path == "optimizers.optimizer.param_groups.0.foo"
    assert "optimizers.optimizer.param_groups.0.foo" in str(info.value)
    assert isinstance(info.value, CheckpointError)
    assert os.listdir(tmp_path) == []  # no checkpoint, no temporary directory


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": {True: 1}}, "a"),
        ({"a": {(1, 2): 1}}, "a"),
        ({"a": {None: 1}}, "a"),
        ({"a": {1.5: 1}}, "a"),
        ({"a": [0, {"b": _cycle()}]}, "a.1.b.self"),
        ({"deep": _deep(500)}, "deep" + ".0" * 199),
        ({"t": torch.zeros(2), "later": {"x": [1, 2, {3}]}}, "later.x.2"),
    ],
    ids=["bool_key", "tuple_key", "none_key", "float_key", "cycle", "too_deep", "after_tensors"],
)
def test_illegal_structure(state: dict[str, Any], path: str, tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        ckptproto.save(state, tmp_path / "ckpt")
    assert info.value.path == path
    assert (path or "<root>") in str(info.value)
    assert os.listdir(tmp_path) == []


def test_illegal_metadata(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedValueError) as info:
        ckptproto.save({"a": 1}, tmp_path / "c", metadata={"metrics": {"loss": np.float64(0.5)}})
    assert info.value.path == "metadata.metrics.loss"
    with pytest.raises(UnsupportedValueError, match="metadata"):
        ckptproto.save({"a": 1}, tmp_path / "c", metadata={"w": torch.zeros(1)})
    assert os.listdir(tmp_path) == []


def test_top_level_must_be_a_dict(tmp_path: Path) -> None:
    for bad in ([1, 2], 3, "x", torch.zeros(1)):
        with pytest.raises(UnsupportedValueError):
            ckptproto.save(bad, tmp_path / "c")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------- damaged checkpoints


def _good(path: Path) -> Path:
    ckptproto.save(
        {
            "a": torch.arange(6.0).reshape(2, 3),
            "b": np.arange(4),
            "c": torch.zeros(3, dtype=torch.float8_e8m0fnu),
            "n": {"x": 1},
        },
        path,
    )
    return path


def _edit_manifest(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((path / "manifest.json").read_text())
    fn(doc)
    (path / "manifest.json").write_text(json.dumps(doc))


def _fix_file_entry(path: Path, name: str = DATA) -> None:
    """Make the manifest's size and checksum match the data file as it is now, so that only
    the damage under test is wrong."""
    data = (path / name).read_bytes()

    def fix(doc: dict[str, Any]) -> None:
        doc["files"][name]["size"] = len(data)
        doc["files"][name]["checksum"] = f"crc32:{zlib.crc32(data):08x}"

    _edit_manifest(path, fix)


def _edit_header(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    data = (path / DATA).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    fn(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text = text.ljust(len(text) + (-(8 + len(text)) % 8))  # offsets are relative to the buffer
    (path / DATA).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    _fix_file_entry(path)


def _all_loaders(path: Path) -> list[Callable[[], Any]]:
    target = {
        "a": torch.zeros(2, 3),
        "b": np.zeros(4, dtype=np.int64),
        "c": torch.zeros(3, dtype=torch.float8_e8m0fnu),
    }
    return [
        lambda: ckptproto.load(path),
        lambda: ckptproto.load(path, mmap=True),
        lambda: ckptproto.load_into(path, target, strict=False),
        lambda: ckptproto.verify(path),
    ]


def _expect(path: Path, exc: type[CheckpointError], match: str | None = None) -> list[CheckpointError]:
    errors = []
    for call in _all_loaders(path):
        with pytest.raises(exc, match=match) as info:
            call()
        errors.append(info.value)
    return errors


@pytest.mark.parametrize(
    "bad",
    [
        "../evil.safetensors",
        "/tmp/evil.safetensors",
        ".hidden.safetensors",
        "sub/x.safetensors",
        "..safetensors",
        "x.bin",
        "",
    ],
)
def test_data_file_names_outside_or_hidden(bad: str, tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    if not bad.startswith("/") and "/" in bad:
        (path / "sub").mkdir()
    # Put a real copy where the bad name points, so refusal is the only way not to read it.
    target = Path(bad) if bad.startswith("/") else path / bad
    if bad and not bad.endswith("/"):
        target.write_bytes((path / DATA).read_bytes())

    def rename(doc: dict[str, Any]) -> None:
        doc["files"][bad] = doc["files"].pop(DATA)
        for t in doc["tensors"]:
            for c in t["chunks"]:
                c["file"] = bad

    _edit_manifest(path, rename)
    errors = _expect(path, CheckpointFormatError)
    assert any("manifest.json" in str(e) for e in errors)
    if bad.startswith("/"):
        target.unlink()


def test_symlinked_data_file_is_refused(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    outside = tmp_path / "outside.safetensors"
    os.replace(path / DATA, outside)
    os.symlink(outside, path / DATA)
    for e in _expect(path, CheckpointFormatError):
        assert DATA in str(e)


def test_data_file_that_is_a_directory(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    (path / DATA).unlink()
    (path / DATA).mkdir()
    _expect(path, CheckpointFormatError)


def test_missing_data_file(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    (path / DATA).unlink()
    for e in _expect(path, CheckpointCorruptError):
        assert DATA in str(e)


def test_header_ranges_overlap(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")

    def overlap(h: dict[str, Any]) -> None:  # "c" (3 raw bytes) moved onto "a"'s bytes
        h["c"]["data_offsets"] = [32, 35]

    _edit_header(path, overlap)
    _expect(path, CheckpointFormatError, match="overlap|hole|end")


def test_header_ranges_leave_a_hole(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")

    def hole(h: dict[str, Any]) -> None:  # "b" shrinks to 3 elements: bytes 24..32 belong to no one
        h["b"]["shape"] = [3]
        h["b"]["data_offsets"] = [0, 24]

    _edit_header(path, hole)
    _expect(path, CheckpointFormatError, match="hole")


def test_header_range_runs_past_the_file(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")

    def past(h: dict[str, Any]) -> None:
        h["c"]["shape"] = [1003]
        h["c"]["data_offsets"] = [56, 1059]

    _edit_header(path, past)
    # The manifest records this file as it is: written wrong, not damaged (FORMAT.md §9).
    errors = _expect(path, CheckpointFormatError, match="outside")
    assert all(type(e) is CheckpointFormatError for e in errors)


def test_header_length_past_the_file(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    data = bytearray((path / DATA).read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 100)
    (path / DATA).write_bytes(bytes(data))
    _expect(path, CheckpointCorruptError)  # the manifest's checksum tells damage
    _fix_file_entry(path)
    assert all(type(e) is CheckpointFormatError for e in _expect(path, CheckpointFormatError))


def test_header_length_giant(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    data = bytearray((path / DATA).read_bytes())
    data[:8] = struct.pack("<Q", 2**63)
    (path / DATA).write_bytes(bytes(data))
    _fix_file_entry(path)
    _expect(path, CheckpointFormatError)


def test_manifest_size_past_the_file(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    _edit_manifest(path, lambda d: d["files"][DATA].__setitem__("size", 10**6))
    for e in _expect(path, CheckpointCorruptError):
        assert DATA in str(e)


def test_truncated_data_file(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    data = (path / DATA).read_bytes()
    (path / DATA).write_bytes(data[:-5])
    _expect(path, CheckpointCorruptError, match="truncated|bytes")
    _fix_file_entry(path)  # the manifest agrees with the short file: it was written so
    assert all(type(e) is CheckpointFormatError for e in _expect(path, CheckpointFormatError))
    (path / DATA).write_bytes(data[:4])
    _fix_file_entry(path)
    _expect(path, CheckpointFormatError)


def test_wrong_checksum(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    data = bytearray((path / DATA).read_bytes())
    data[-4] ^= 0x40  # a tensor byte
    (path / DATA).write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="checksum") as info:
        ckptproto.load(path)
    assert DATA in str(info.value)
    with pytest.raises(CheckpointCorruptError) as info:
        ckptproto.verify(path)
    assert len(info.value.problems) == 1 and DATA in info.value.problems[0]
    with pytest.raises(CheckpointCorruptError):
        ckptproto.load_into(  # strict=False: the target has no "n"
            path,
            {
                "a": torch.zeros(2, 3),
                "b": np.zeros(4, dtype=np.int64),
                "c": torch.zeros(3, dtype=torch.float8_e8m0fnu),
            },
            strict=False,
        )
    with pytest.raises(CheckpointCorruptError):
        ckptproto.load(path, mmap=True, verify=True)
    ckptproto.load(path, verify=False)  # asked not to check: loads the damaged bytes


def test_wrong_checksum_in_manifest(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    _edit_manifest(path, lambda d: d["files"][DATA].__setitem__("checksum", "crc32:00000000"))
    with pytest.raises(CheckpointCorruptError):
        ckptproto.load(path)
    _edit_manifest(path, lambda d: d["files"][DATA].__setitem__("checksum", "md5:abc"))
    _expect(path, CheckpointFormatError, match="checksum")


def _raises(exc: type[BaseException], call: Callable[[], Any]) -> None:
    with pytest.raises(exc):
        call()


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def _peak_during(call: Callable[[], Any]) -> tuple[int, int]:
    """(tracemalloc peak bytes, resident-set peak growth in KiB) while ``call`` runs. The RSS
    peak is the kernel's VmHWM, reset first (ru_maxrss only ever grows over the process's
    life, so an allocation below an earlier test's peak would not show)."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmHWM")
    tracemalloc.start()
    try:
        call()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak, _status_kib("VmHWM") - before


@pytest.mark.parametrize(
    "shape", [[2**40, 2**40], [2**62], [2**31, 2**31, 2**31], [1 << 14, 1 << 14]], ids=str
)
@pytest.mark.parametrize("where", ["manifest", "manifest_and_header"])
def test_huge_declared_shape(shape: list[int], where: str, tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")

    def grow(doc: dict[str, Any]) -> None:
        doc["tensors"][0]["shape"] = shape
        chunk = doc["tensors"][0]["chunks"][0]
        chunk["shape"], chunk["offsets"] = shape, [0] * len(shape)

    _edit_manifest(path, grow)
    if where == "manifest_and_header":

        def header(h: dict[str, Any]) -> None:
            h["a"]["shape"] = shape  # bytes stay 24: the shape no longer fits them

        _edit_header(path, header)
    for call in _all_loaders(path):
        peak, rss = _peak_during(lambda call=call: _raises(CheckpointFormatError, call))
        assert peak < 32 << 20, f"traced {peak} bytes"
        assert rss < 64 << 10, f"maxrss grew {rss} KiB"


def test_zero_size_tensor_with_huge_dims_is_fine(tmp_path: Path) -> None:
    t = torch.empty(0, 2**40)  # legal: no element
    ckptproto.save({"t": t}, tmp_path / "c")
    assert ckptproto.load(tmp_path / "c")["t"].shape == (0, 2**40)


def test_newer_major_version_is_refused(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    _edit_manifest(path, lambda d: d.__setitem__("format_version", "2.3"))
    for call in [
        *_all_loaders(path),
        lambda: ckptproto.read_info(path),
        lambda: ckptproto.read_manifest(path),
    ]:
        with pytest.raises(CheckpointFormatError) as info:
            call()
        assert "2.3" in str(info.value) and "1." in str(info.value)


def test_newer_minor_version_and_unknown_fields_are_accepted(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")

    def extend(doc: dict[str, Any]) -> None:
        doc["format_version"] = "1.99"
        doc["future"] = {"anything": [1, 2]}
        doc["files"][DATA]["compression"] = "none"
        doc["tensors"][0]["layout"] = "strided"
        doc["tensors"][0]["chunks"][0]["replica"] = 0

    _edit_manifest(path, extend)
    state = ckptproto.load(path)
    assert torch.equal(state["a"], torch.arange(6.0).reshape(2, 3))
    assert ckptproto.verify(path).format_version == "1.99"


@pytest.mark.parametrize(
    ("mutate", "exc"),
    [
        (lambda d: d.pop("state"), CheckpointFormatError),
        (lambda d: d.__setitem__("format", "other"), CheckpointFormatError),
        (lambda d: d.__setitem__("format_version", "one"), CheckpointFormatError),
        (lambda d: d.__setitem__("tensors", {}), CheckpointFormatError),
        (lambda d: d["tensors"][0].__setitem__("dtype", "float128"), CheckpointFormatError),
        (lambda d: d["tensors"][0].__setitem__("shape", [3, 2]), CheckpointFormatError),
        (lambda d: d["tensors"][0].__setitem__("shape", [-2, -3]), CheckpointFormatError),
        (lambda d: d["tensors"][0]["chunks"][0].__setitem__("key", "b"), CheckpointFormatError),
        (lambda d: d["tensors"][0]["chunks"][0].__setitem__("key", "nope"), CheckpointFormatError),
        (
            lambda d: d["tensors"][0]["chunks"][0].__setitem__("file", "other.safetensors"),
            CheckpointFormatError,
        ),
        (lambda d: d["tensors"][1].__setitem__("dtype", "float64"), CheckpointFormatError),
        (lambda d: d["tensors"][2].__setitem__("dtype", "uint16"), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$torch": 17}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$torch": -1}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$numpy": 0, "x": 1}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$pickle": "gASV"}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$int": "12x"}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$float": "1e400"}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$bytes": "!!"}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$dict": [[1.5, 2]]}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("a", {"$dict": [[1, 2], [1, 3]]}), CheckpointFormatError),
        (lambda d: d["state"].__setitem__("b2", {"$torch": 1}), CheckpointFormatError),
        (lambda d: d.__setitem__("state", [1]), CheckpointFormatError),
        (lambda d: d.__setitem__("world_size", 0), CheckpointFormatError),
    ],
)
def test_malformed_manifest(
    mutate: Callable[[dict[str, Any]], Any], exc: type[CheckpointError], tmp_path: Path
) -> None:
    path = _good(tmp_path / "ckpt")
    _edit_manifest(path, mutate)
    for call in [
        lambda: ckptproto.load(path),
        lambda: ckptproto.verify(path),
        lambda: ckptproto.load_into(path, {}, strict=False),
    ]:
        with pytest.raises(exc) as info:
            call()
        assert "manifest.json" in str(info.value) or DATA in str(info.value)


def test_metadata_must_not_refer_to_tensors(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    _edit_manifest(path, lambda d: d.__setitem__("metadata", {"m": {"$torch": 0}}))
    for call in (ckptproto.verify, ckptproto.read_info, lambda p: ckptproto.load_into(p, {}, strict=False)):
        with pytest.raises(CheckpointFormatError, match=r"metadata\.m"):
            call(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"{", b"\xff\xfe", b"[]", b'{"format": "ckptproto", "format": "ckptproto"}', b"NaN", b"[" * 100000],
    ids=["empty", "truncated", "not_utf8", "array", "duplicate_key", "nan", "deep"],
)
def test_manifest_not_json(content: bytes, tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    (path / "manifest.json").write_bytes(content)
    for call in _all_loaders(path):
        with pytest.raises(CheckpointFormatError):
            call()


def test_manifest_is_a_directory_or_missing(tmp_path: Path) -> None:
    path = _good(tmp_path / "ckpt")
    (path / "manifest.json").unlink()
    for call in _all_loaders(path):
        with pytest.raises(CheckpointNotFoundError):
            call()
    (path / "manifest.json").mkdir()
    for call in _all_loaders(path):
        with pytest.raises(CheckpointError):
            call()
    with pytest.raises(CheckpointNotFoundError):
        ckptproto.load(tmp_path / "nothing_here")


@given(
    target=st.sampled_from(["manifest", "header", "data"]),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_random_damage_raises_checkpoint_errors_only(
    target: str, flips: list[tuple[int, int]], tmp_path: Path
) -> None:
    path = tmp_path / "ckpt"
    if not path.exists():
        _good(path)
    pristine = {n: (path / n).read_bytes() for n in ("manifest.json", DATA)}
    name = "manifest.json" if target == "manifest" else DATA
    data = bytearray(pristine[name])
    (n,) = struct.unpack("<Q", pristine[DATA][:8])
    lo, hi = {"manifest": (0, len(data)), "header": (0, 8 + n), "data": (8 + n, len(data))}[target]
    for pos, xor in flips:
        data[lo + pos % (hi - lo)] ^= xor
    (path / name).write_bytes(bytes(data))
    try:
        for call in _all_loaders(path):
            with contextlib.suppress(CheckpointError):
                call()
    finally:
        for n_, content in pristine.items():
            (path / n_).write_bytes(content)


def _json_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            paths += _json_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            paths += _json_paths(v, (*prefix, i))
    return paths


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, -1, 1, 2**62, 2**63, 10**30, 1.5, "", "$torch", "U8", "float32", "1.0", "2.0"])
    | st.text(max_size=5),
    lambda c: (
        st.lists(c, max_size=3)
        | st.dictionaries(st.sampled_from(["$torch", "$numpy", "$dict", "a", "shape", "x"]), c, max_size=2)
    ),
    max_leaves=5,
)


@settings(max_examples=min(settings().max_examples, 25))
@given(data=st.data())
def test_random_manifest_edits_raise_checkpoint_errors_only(data: st.DataObject, tmp_path: Path) -> None:
    """Replace one random node of a valid manifest with a random JSON value: loading either
    works or raises a CheckpointError, nothing else."""
    path = tmp_path / "ckpt"
    if not path.exists():
        _good(path)
    pristine = (path / "manifest.json").read_bytes()
    doc = json.loads(pristine)
    where = data.draw(st.sampled_from(_json_paths(doc)[1:]))
    value = data.draw(json_values)
    node = doc
    for key in where[:-1]:
        node = node[key]
    if isinstance(node, dict) and data.draw(st.booleans()):
        node.pop(where[-1])
    else:
        node[where[-1]] = value
    (path / "manifest.json").write_text(json.dumps(doc))
    try:
        for call in [*_all_loaders(path), lambda: ckptproto.read_info(path)]:
            with contextlib.suppress(CheckpointError):
                call()
    finally:
        (path / "manifest.json").write_bytes(pristine)
