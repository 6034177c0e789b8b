"""Conformance tests of spec/FORMAT.md and spec/PROTOCOL.md: one test (or more) per numbered
requirement, named after it (``test_F12_...`` checks ``[F-12]``). Broken checkpoints are made
by editing the manifest or data files of real saved ones, or built by hand with an
independent safetensors writer (``_data_file``), so the reader is not checked against itself.
"""

from __future__ import annotations

import base64
import collections
import decimal
import enum
import itertools
import json
import math
import os
import re
import shutil
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
import torch

import ckptproto
from ckptproto import dtypes
from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    UnsupportedValueError,
)

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"
SCHEMA = json.loads((SPEC / "manifest.schema.json").read_text())
DATA = "data-00000-000.safetensors"
pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.safetensors")


# ---------------------------------------------------------------- helpers


def _state() -> dict[str, Any]:
    """A small trainer state using most of the value encoding."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "trainer": {"global_step": 7, "current_epoch": 1, "callbacks": {"ckpt": {"best": 0.5}}},
        "models": {"model": model.state_dict()},
        "optimizers": {"opt": opt.state_dict()},
        "extra": {
            "arr": np.arange(6, dtype=np.int16).reshape(2, 3),
            "bf": torch.ones(3, dtype=torch.bfloat16),
            "c128": torch.ones(2, dtype=torch.complex128),
            "flag": torch.tensor([True, False]),
            "big": 2**70,
            "nan": math.nan,
            "raw": b"\x00\xff",
            "tup": (1, 2.5),
            "ikeys": {1: "a", 2: "b"},
            "od": OrderedDict(z=1, a=2),
        },
    }


def save(tmp_path: Path, state: Any = None, name: str = "ck", **kw: Any) -> Path:
    path = tmp_path / name
    ckptproto.save(_state() if state is None else state, path, **kw)
    return path


def doc_of(ck: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((ck / "manifest.json").read_bytes())
    return result


def put_doc(ck: Path, doc: Any) -> None:
    (ck / "manifest.json").write_text(json.dumps(doc))


def edit(ck: Path, fn: Callable[[dict[str, Any]], Any]) -> Path:
    doc = doc_of(ck)
    fn(doc)
    put_doc(ck, doc)
    return ck


def put_data(ck: Path, name: str, data: bytes) -> None:
    """Replace a data file and update its manifest size and checksum, so only the change
    under test is wrong."""
    (ck / name).write_bytes(data)
    doc = doc_of(ck)
    doc["files"][name].update(size=len(data), checksum=f"crc32:{zlib.crc32(data):08x}")
    put_doc(ck, doc)


def header_of(data: bytes) -> tuple[int, dict[str, Any]]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _data_file(entries: list[tuple[str, str, list[int], bytes]], *, pad: bool = True) -> bytes:
    """An independent safetensors writer: ``(key, code, shape, bytes)`` laid out in order."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    position = 0
    for key, code, shape, raw in entries:
        header[key] = {"dtype": code, "shape": shape, "data_offsets": [position, position + len(raw)]}
        position += len(raw)
    text = json.dumps(header).encode()
    if pad:
        text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(e[3] for e in entries)


def build(ck: Path, files: dict[str, bytes], tensors: list[Any], state: Any, **extra: Any) -> Path:
    """A hand-made checkpoint directory."""
    ck.mkdir()
    for name, data in files.items():
        (ck / name).write_bytes(data)
    doc = {
        "format": "ckptproto",
        "format_version": "1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "writer": "test",
        "world_size": 1,
        "metadata": {},
        "files": {
            n: {"size": len(d), "checksum": f"crc32:{zlib.crc32(d):08x}", "rank": 0} for n, d in files.items()
        },
        "tensors": tensors,
        "state": state,
        **extra,
    }
    put_doc(ck, doc)
    return ck


def one_tensor(tmp_path: Path, values: Any = None, name: str = "one") -> Path:
    """A hand-made checkpoint of one float32 tensor [2, 3] in one chunk."""
    arr = np.arange(6, dtype="<f4").reshape(2, 3) if values is None else values
    data = _data_file([("t", "F32", list(arr.shape), arr.tobytes())])
    chunk = {"file": DATA, "key": "t", "offsets": [0] * arr.ndim, "shape": list(arr.shape)}
    tensor = {"dtype": "float32", "shape": list(arr.shape), "chunks": [chunk]}
    return build(tmp_path / name, {DATA: data}, [tensor], {"t": {"$torch": 0}})


def refused(ck: Path, error: type[CheckpointError], *readers: Callable[[Path], Any]) -> None:
    """Every reader refuses ``ck`` with ``error`` (a subclass of it is fine)."""
    for read in readers or (ckptproto.load, ckptproto.verify):
        with pytest.raises(error):
            read(ck)


class _Sink:
    """A Stateful that takes whatever a checkpoint holds: load_into reads every tensor."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


def verdicts(ck: Path) -> dict[str, str | None]:
    """What each reader says of ``ck``: the exact exception class name, or None (accepted).
    ``validate`` answers through ``reader_verdict`` (FORMAT.md §9's order)."""
    from ckptproto.conformance.validate import reader_verdict, validate

    out: dict[str, str | None] = {}
    readers: dict[str, Callable[[Path], Any]] = {
        "load": ckptproto.load,
        "load_into": lambda p: ckptproto.load_into(p, _Sink(), strict=False),
        "verify": ckptproto.verify,
    }
    for name, read in readers.items():
        try:
            read(ck)
            out[name] = None
        except CheckpointError as exc:
            out[name] = type(exc).__name__
    out["validate"] = reader_verdict(validate(ck))
    return out


def agree(ck: Path, expected: type[CheckpointError] | None, *, schema: bool = False) -> None:
    """load, load_into, verify and validate all give ``expected`` (None: all accept); with
    ``schema`` the manifest's validity under manifest.schema.json agrees too."""
    want = None if expected is None else expected.__name__
    got = verdicts(ck)
    assert got == dict.fromkeys(got, want), got
    if schema:
        from ckptproto.format import strict_json  # exact past Python's 4,300-digit int limit

        doc = strict_json.loads((ck / "manifest.json").read_text())
        limit = sys.get_int_max_str_digits()
        sys.set_int_max_str_digits(0)  # jsonschema's messages str() every instance
        try:
            assert jsonschema.Draft202012Validator(SCHEMA).is_valid(doc) == (expected is None)
        finally:
            sys.set_int_max_str_digits(limit)


def state_as(ck: Path, value: Any) -> Path:
    return edit(ck, lambda d: d.__setitem__("state", value))


# ---------------------------------------------------------------- FORMAT §1 layout


def test_F1_directory_without_manifest_is_not_a_checkpoint(tmp_path: Path) -> None:
    ck = save(tmp_path)
    (ck / "manifest.json").unlink()
    refused(ck, CheckpointNotFoundError, ckptproto.load, ckptproto.verify, ckptproto.read_info)
    agree(ck, CheckpointNotFoundError)
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", CheckpointNotFoundError)
    refused(tmp_path / "absent", CheckpointNotFoundError)
    # A manifest.json that is not a regular file: no manifest, so no checkpoint.
    (ck / "manifest.json").mkdir()
    agree(ck, CheckpointNotFoundError)
    refused(ck, CheckpointNotFoundError, ckptproto.read_manifest, ckptproto.read_info)
    (ck / "manifest.json").rmdir()
    os.mkfifo(ck / "manifest.json")
    never_blocks(ck / "manifest.json", lambda: agree(ck, CheckpointNotFoundError))


def never_blocks(fifo: Path, check: Callable[[], None]) -> None:
    """Run ``check`` (which must not open ``fifo`` for reading and wait); if it hangs there,
    unblock it by writing EOF into the FIFO and fail."""
    import threading

    failure: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as exc:  # handed to the test thread
            failure.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)  # a guard against hanging the suite, not a timing check
    if worker.is_alive():
        while worker.is_alive():  # a reader blocked in open() or read(): give it an EOF
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK) if _has_reader(fifo) else None
            if fd is not None:
                os.close(fd)
            worker.join(1)
        pytest.fail(f"a reader blocked on the FIFO {fifo}")
    if failure:
        raise failure[0]


def _has_reader(fifo: Path) -> bool:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # ENXIO: nobody has it open for reading yet
        return False
    return True


def test_F2_hidden_names_are_never_checkpoints(tmp_path: Path) -> None:
    ck = save(tmp_path)
    shutil.copytree(ck, tmp_path / ".hidden")
    refused(tmp_path / ".hidden", CheckpointNotFoundError, ckptproto.load, ckptproto.read_info)
    agree(tmp_path / ".hidden", CheckpointNotFoundError)
    # The name is the directory's own, links resolved: every reader agrees.
    (tmp_path / "latest").symlink_to(tmp_path / ".hidden")
    agree(tmp_path / "latest", CheckpointNotFoundError)
    (tmp_path / ".latest").symlink_to(ck)
    agree(tmp_path / ".latest", None)
    (tmp_path / "latest").unlink()
    (tmp_path / ".latest").unlink()
    with pytest.raises(CheckpointWriteError):
        ckptproto.save({"a": 1}, tmp_path / "sub" / ".dot")
    assert not (tmp_path / "sub" / ".dot").exists()


def test_F3_data_file_names_are_plain(tmp_path: Path) -> None:
    ck = save(tmp_path)
    names = list(doc_of(ck)["files"])
    assert names == ["data-00000-000.safetensors"]
    assert all(NAME_RE.fullmatch(n) and ".." not in n for n in names)
    bad_names = [
        "../x.safetensors",
        "a/b.safetensors",
        "/abs.safetensors",
        ".hidden.safetensors",
        "a..b.safetensors",
        "x.bin",
        "manifest.json",
        "a\\b.safetensors",
        "x" * 250 + ".safetensors",
    ]
    for bad in bad_names:
        ck2 = tmp_path / f"bad{bad_names.index(bad)}"
        shutil.copytree(ck, ck2)

        def rename(d: dict[str, Any], bad: str = bad) -> None:
            d["files"] = {bad: d["files"][DATA]}
            for t in d["tensors"]:
                for c in t["chunks"]:
                    c["file"] = bad

        edit(ck2, rename)
        refused(ck2, CheckpointFormatError, ckptproto.load, ckptproto.verify, ckptproto.read_manifest)


def test_F4_symlinks_are_refused(tmp_path: Path) -> None:
    ck = save(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(ck / DATA, outside)
    (ck / DATA).symlink_to(outside)
    refused(ck, CheckpointFormatError)
    (ck / DATA).unlink()
    (ck / DATA).mkdir()
    refused(ck, CheckpointFormatError)
    ck2 = save(tmp_path, name="ck2")
    shutil.move(ck2 / "manifest.json", tmp_path / "m.json")
    (ck2 / "manifest.json").symlink_to(tmp_path / "m.json")
    refused(ck2, CheckpointNotFoundError, ckptproto.load, ckptproto.read_info)
    agree(ck2, CheckpointNotFoundError)
    # Data files that are not regular files: refused, and never waited on (a FIFO).
    ck3 = save(tmp_path, name="ck3")
    (ck3 / DATA).unlink()
    (ck3 / DATA).mkdir()
    agree(ck3, CheckpointFormatError)
    (ck3 / DATA).rmdir()
    os.mkfifo(ck3 / DATA)
    never_blocks(ck3 / DATA, lambda: agree(ck3, CheckpointFormatError))


def test_F5_unlisted_files_are_ignored(tmp_path: Path) -> None:
    ck = save(tmp_path, {"t": torch.arange(4)})
    (ck / "notes.txt").write_text("hello")
    (ck / "data-00009-000.safetensors").write_bytes(b"garbage")
    assert torch.equal(ckptproto.load(ck)["t"], torch.arange(4))
    ckptproto.verify(ck)


# ---------------------------------------------------------------- FORMAT §2 manifest


def test_F6_manifest_is_strict_json_of_format_ckptproto(tmp_path: Path) -> None:
    ck = save(tmp_path, {"a": 1})
    good = (ck / "manifest.json").read_bytes()
    assert json.loads(good)["format"] == "ckptproto"
    variants = [
        b"\xff\xfe" + good,
        good.replace(b'"format":"ckptproto"', b'"format":"ckptproto","format":"ckptproto"'),
        good.replace(b'"state":{"a":1}', b'"state":{"a":NaN}'),
        good.replace(b'"state":{"a":1}', b'"state":{"a":1,"a":2}'),
        good.replace(b'"format":"ckptproto"', b'"format":"other"'),
        b"[" + good + b"]",
        good[:-3],
        good.replace(b'"state":{"a":1}', b'"state":{"a":"\\ud800"}'),
        good.replace(b'"state":{"a":1}', b'"state":{"a":["x\\udc00y"]}'),
        good.replace(b'"state":{"a":1}', b'"state":{"\\ud83d":1}'),
        good.replace(b'"state":{"a":1}', b'"state":{"a":1e400}'),
        good.replace(b'"state":{"a":1}', b'"state":{"a":' + b"1" * 10_001 + b"}"),
    ]
    for data in variants:
        assert data != good
        (ck / "manifest.json").write_bytes(
            re.sub(rb'^\{"manifest_checksum":"crc32:[0-9a-f]{8}",', b"{", data)
        )
        refused(ck, CheckpointFormatError, ckptproto.load, ckptproto.read_manifest, ckptproto.read_info)
        agree(ck, CheckpointFormatError)
    # A surrogate pair is one character, escaped or not; \\ud800 is an escaped backslash.
    for text in (b'"\\ud83d\\ude00"', '"\U0001f600"'.encode(), b'"\\\\ud800"'):
        (ck / "manifest.json").write_bytes(
            b"{" + good[38:].replace(b'"state":{"a":1}', b'"state":{"a":' + text + b"}")
        )
        assert ckptproto.load(ck)["a"] == json.loads(text)
        agree(ck, None)


def test_F7_real_manifests_validate_against_the_schema(tmp_path: Path) -> None:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    states = [_state(), {}, {"$weird": {"$torch": [1, 2]}, "x": {1: (None,)}}, {"z": np.zeros((0, 4))}]
    for i, state in enumerate(states):
        doc = doc_of(save(tmp_path, state, name=f"s{i}", metadata={"metrics": {"loss": 0.5}}))
        validator.validate(doc)
        assert set(SCHEMA["required"]) <= set(doc)
    # The schema is not vacuous: broken manifests fail it.
    doc = doc_of(save(tmp_path, {"a": (1,)}, name="b"))
    for breakage in (
        lambda d: d.pop("state"),
        lambda d: d.__setitem__("state", {"a": {"$tuple": [1], "x": 1}}),
        lambda d: d.__setitem__("state", {"a": {"$set": [1]}}),
        lambda d: d.__setitem__("state", [1]),
        lambda d: d.__setitem__("metadata", {"t": {"$torch": 0}}),
        lambda d: d["files"][DATA].__setitem__("checksum", "crc32:ABCDEF01"),
        lambda d: d.__setitem__("files", {"../x.safetensors": d["files"][DATA]}),
        lambda d: d.__setitem__("format_version", "2.0"),
    ):
        broken = json.loads(json.dumps(doc))
        breakage(broken)
        assert not validator.is_valid(broken)
    # Readers default the optional fields.
    ck = one_tensor(tmp_path)
    edit(ck, lambda d: [d.pop(k) for k in ("created", "writer", "world_size", "metadata")])
    edit(ck, lambda d: d["files"][DATA].pop("rank"))
    assert ckptproto.load(ck)["t"].shape == (2, 3)
    assert ckptproto.read_info(ck).metadata == {}
    for required in ("format_version", "files", "tensors", "state"):
        ck2 = one_tensor(tmp_path, name=f"no_{required}")
        edit(ck2, lambda d, r=required: d.pop(r))
        refused(ck2, CheckpointFormatError, ckptproto.load, ckptproto.read_manifest)


def test_F8_file_entries_size_and_presence(tmp_path: Path) -> None:
    ck = save(tmp_path, {"t": torch.arange(10)})
    size = (ck / DATA).stat().st_size
    assert doc_of(ck)["files"][DATA]["size"] == size
    edit(ck, lambda d: d["files"][DATA].__setitem__("size", size + 1))
    refused(ck, CheckpointCorruptError)
    edit(ck, lambda d: d["files"][DATA].__setitem__("size", size))
    data = (ck / DATA).read_bytes()
    (ck / DATA).write_bytes(data[:-4])  # truncated; the manifest still says the old size
    refused(ck, CheckpointCorruptError)
    (ck / DATA).unlink()
    refused(ck, CheckpointCorruptError)
    for bad in ({"size": -1, "checksum": "crc32:00000000"}, {"size": 100}, {"size": 100, "checksum": 5}):
        ck2 = one_tensor(tmp_path, name=f"bad{len(str(bad))}")
        edit(ck2, lambda d, bad=bad: d["files"].__setitem__(DATA, bad))
        refused(ck2, CheckpointFormatError, ckptproto.read_manifest)
    ck3 = one_tensor(tmp_path, name="rank")
    edit(ck3, lambda d: d["files"][DATA].__setitem__("rank", -1))
    refused(ck3, CheckpointFormatError, ckptproto.read_manifest)


def test_F9_tensor_entries(tmp_path: Path) -> None:
    for i, change in enumerate(
        (
            lambda t: t.__setitem__("dtype", "float128"),
            lambda t: t.__setitem__("dtype", "F32"),
            lambda t: t.__setitem__("chunks", []),
            lambda t: t.pop("shape"),
            lambda t: t.__setitem__("shape", [2, -3]),
        )
    ):
        ck = one_tensor(tmp_path, name=f"c{i}")
        edit(ck, lambda d, change=change: change(d["tensors"][0]))
        refused(ck, CheckpointFormatError, ckptproto.load, ckptproto.read_manifest)


def test_F10_chunk_fields(tmp_path: Path) -> None:
    changes = (
        lambda c: c.__setitem__("file", "data-00001-000.safetensors"),
        lambda c: c.__setitem__("key", 3),
        lambda c: c.__setitem__("offsets", [0]),
        lambda c: c.__setitem__("shape", [2, 3, 1]),
        lambda c: c.__setitem__("offsets", [1, 0]),
    )
    for i, change in enumerate(changes):
        ck = one_tensor(tmp_path, name=f"c{i}")
        edit(ck, lambda d, change=change: change(d["tensors"][0]["chunks"][0]))
        refused(ck, CheckpointFormatError, ckptproto.load, ckptproto.read_manifest)


def _chunked(tmp_path: Path, name: str, boxes: list[tuple[str, list[int], list[int]]]) -> Path:
    """A [4, 6] int32 tensor (values 0..23) stored as the given boxes over two files."""
    full = np.arange(24, dtype="<i4").reshape(4, 6)
    per_file: dict[str, list[tuple[str, str, list[int], bytes]]] = {}
    chunks = []
    for j, (file, offsets, shape) in enumerate(boxes):
        box = full[offsets[0] : offsets[0] + shape[0], offsets[1] : offsets[1] + shape[1]]
        per_file.setdefault(file, []).append((f"w{j}", "I32", shape, np.ascontiguousarray(box).tobytes()))
        chunks.append({"file": file, "key": f"w{j}", "offsets": offsets, "shape": shape})
    files = {f: _data_file(e) for f, e in per_file.items()}
    tensors = [{"dtype": "int32", "shape": [4, 6], "chunks": chunks}]
    return build(tmp_path / name, files, tensors, {"w": {"$torch": 0}})


F0, F1 = "data-00000-000.safetensors", "data-00001-000.safetensors"


def test_F11_chunks_tile_the_tensor(tmp_path: Path) -> None:
    # Non-contiguous boxes (column halves split by rows) over two files assemble exactly.
    good = [(F0, [0, 0], [2, 3]), (F1, [0, 3], [2, 3]), (F1, [2, 0], [2, 3]), (F0, [2, 3], [2, 3])]
    ck = _chunked(tmp_path, "good", good)
    expected = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    assert torch.equal(ckptproto.load(ck)["w"], expected)
    target = {"w": torch.zeros(4, 6, dtype=torch.int32)}
    ckptproto.load_into(ck, target)
    assert torch.equal(target["w"], expected)
    ckptproto.verify(ck)
    overlap = [(F0, [0, 0], [2, 3]), (F1, [0, 2], [2, 3]), (F1, [2, 0], [2, 6]), (F0, [0, 5], [2, 1])]
    gap = [(F0, [0, 0], [2, 3]), (F1, [0, 3], [2, 3]), (F1, [2, 0], [2, 3])]
    for name, boxes in (("overlap", overlap), ("gap", gap)):
        refused(
            _chunked(tmp_path, name, boxes), CheckpointFormatError, ckptproto.load, ckptproto.read_manifest
        )


def test_F12_file_key_used_once(tmp_path: Path) -> None:
    ck = one_tensor(tmp_path)
    edit(ck, lambda d: d["tensors"].append(json.loads(json.dumps(d["tensors"][0]))))
    edit(ck, lambda d: d["state"].__setitem__("u", {"$torch": 1}))
    refused(ck, CheckpointFormatError)


def test_F13_chunk_entry_matches_data_file(tmp_path: Path) -> None:
    ck = save(tmp_path, {"f": torch.ones(2, 3), "c": torch.ones(2, dtype=torch.complex128)})
    _, header = header_of((ck / DATA).read_bytes())
    assert header["f"]["dtype"] == "F32" and header["f"]["shape"] == [2, 3]
    assert header["c"]["dtype"] == "U8" and header["c"]["shape"] == [32]
    ckptproto.verify(ck)

    def index_of(d: dict[str, Any], key: str) -> int:
        return next(i for i, t in enumerate(d["tensors"]) if t["chunks"][0]["key"] == key)

    changes = (
        lambda d: d["tensors"][index_of(d, "f")].__setitem__("dtype", "int32"),
        lambda d: d["tensors"][index_of(d, "f")]["chunks"][0].__setitem__("key", "nope"),
        lambda d: d["tensors"][index_of(d, "c")].__setitem__("dtype", "complex64"),
        lambda d: d["tensors"][index_of(d, "c")].__setitem__("dtype", "float8_e8m0fnu"),
    )
    for i, change in enumerate(changes):
        ck2 = tmp_path / f"c{i}"
        shutil.copytree(ck, ck2)
        edit(ck2, change)
        refused(ck2, CheckpointFormatError)


def test_F14_tensor_references(tmp_path: Path) -> None:
    for i, state in enumerate(
        (
            {"t": {"$torch": 1}},
            {"t": {"$torch": -1}},
            {"t": {"$torch": "0"}},
            {"t": {"$torch": True}},
            {"t": {"$torch": 0}, "u": {"$numpy": 0}},
        )
    ):
        refused(state_as(one_tensor(tmp_path, name=f"s{i}"), state), CheckpointFormatError)
    ck = save(tmp_path, {"b": torch.ones(2, dtype=torch.bfloat16)})
    edit(ck, lambda d: d.__setitem__("state", {"b": {"$numpy": 0}}))
    refused(ck, CheckpointFormatError, ckptproto.load)
    shared = state_as(one_tensor(tmp_path, name="shared"), {"a": {"$torch": 0}, "b": [{"$torch": 0}]})
    out = ckptproto.load(shared)
    assert out["a"] is out["b"][0]


def test_F15_metadata_and_state_roots_are_objects(tmp_path: Path) -> None:
    ck = save(tmp_path, {"t": torch.ones(1)}, metadata={"note": "x"})
    assert ckptproto.read_info(ck).metadata["note"] == "x"
    for i, meta in enumerate(([1], {"t": {"$torch": 0}}, {"$tuple": [1]}, 3)):
        ck2 = tmp_path / f"m{i}"
        shutil.copytree(ck, ck2)
        edit(ck2, lambda d, meta=meta: d.__setitem__("metadata", meta))
        refused(ck2, CheckpointFormatError, ckptproto.read_info, ckptproto.load)
    for i, state in enumerate(([{"$torch": 0}], {"$tuple": [{"$torch": 0}]}, 5, None)):
        ck3 = tmp_path / f"s{i}"
        shutil.copytree(ck, ck3)
        edit(ck3, lambda d, state=state: d.__setitem__("state", state))
        refused(ck3, CheckpointFormatError, ckptproto.load)
    with pytest.raises(UnsupportedValueError):
        ckptproto.save({"a": 1}, tmp_path / "x", metadata={"t": torch.ones(1)})
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- FORMAT §3 value encoding


def test_F16_encoding_table(tmp_path: Path) -> None:
    state = {
        "none": None,
        "b": True,
        "s": "é$",
        "i": 2**53 - 1,
        "neg": -(2**53 - 1),
        "big": 2**53,
        "nbig": -(10**30),
        "f": 1.0,
        "e": 1e300,
        "nz": -0.0,
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "by": b"\x00\x01\xfe",
        "l": [1, [2]],
        "t": (1, ()),
        "d": {"k": {}},
        "ik": {1: "a", "s": 2},
        "dk": {"$torch": 1},
        "od": OrderedDict([("b", 1), (2, 3)]),
        "tn": torch.zeros(1),
        "np": np.zeros(1),
    }
    expected = {
        "none": None,
        "b": True,
        "s": "é$",
        "i": 2**53 - 1,
        "neg": -(2**53 - 1),
        "big": {"$int": str(2**53)},
        "nbig": {"$int": str(-(10**30))},
        "f": 1.0,
        "e": 1e300,
        "nz": -0.0,
        "nan": {"$float": "nan"},
        "inf": {"$float": "inf"},
        "ninf": {"$float": "-inf"},
        "by": {"$bytes": base64.b64encode(b"\x00\x01\xfe").decode()},
        "l": [1, [2]],
        "t": {"$tuple": [1, {"$tuple": []}]},
        "d": {"k": {}},
        "ik": {"$dict": [[1, "a"], ["s", 2]]},
        "dk": {"$dict": [["$torch", 1]]},
        "od": {"$odict": [["b", 1], [2, 3]]},
        "tn": {"$torch": 0},
        "np": {"$numpy": 1},
    }
    ck = save(tmp_path, state)
    written = doc_of(ck)["state"]
    assert json.dumps(written) == json.dumps(expected)
    assert list(written) == list(expected)
    assert math.copysign(1, written["nz"]) == -1
    out = ckptproto.load(ck)
    assert type(out["t"]) is tuple and type(out["od"]) is OrderedDict and out["dk"] == {"$torch": 1}


def test_F17_tagged_objects(tmp_path: Path) -> None:
    for i, value in enumerate(
        (
            {"a": 1, "$int": "5"},
            {"$int": "5", "a": 1},
            {"$tuple": [], "$bytes": ""},
            {"$set": [1, 2]},
            {"$": 1},
            {"$Torch": 0},
        )
    ):
        ck = state_as(one_tensor(tmp_path, name=f"v{i}"), {"t": {"$torch": 0}, "x": value})
        refused(ck, CheckpointFormatError)
    ck = state_as(one_tensor(tmp_path, name="named"), {"t": {"$torch": 0}, "x": {"$future": 1}})
    with pytest.raises(CheckpointFormatError, match=r"\$future"):
        ckptproto.load(ck)


@pytest.mark.parametrize(
    "value",
    [
        {"$int": "--5"},
        {"$int": "+5"},
        {"$int": "1.5"},
        {"$int": "²"},
        {"$int": "١٢"},
        {"$int": " 5"},
        {"$int": ""},
        {"$int": 5},
        {"$int": "9" * 10_001},
        {"$float": "NaN"},
        {"$float": 1.5},
        {"$float": "1e5"},
        {"$bytes": "not base64!"},
        {"$bytes": "AAA"},
        {"$bytes": "AAAA!"},
        {"$bytes": "A-B_"},
        {"$bytes": 7},
        {"$tuple": {"a": 1}},
        {"$dict": {"a": 1}},
        {"$dict": [["a"]]},
        {"$dict": [["a", 1, 2]]},
        {"$dict": [[1.5, 1]]},
        {"$dict": [[True, 1]]},
        {"$dict": [[None, 1]]},
        {"$odict": [["a", 1], ["a", 2]]},
        {"$dict": [[{"$int": str(2**60)}, 1], [{"$int": str(2**60)}, 2]]},
    ],
)
def test_F18_malformed_payloads(tmp_path: Path, value: Any) -> None:
    ck = state_as(one_tensor(tmp_path), {"t": {"$torch": 0}, "x": value})
    refused(ck, CheckpointFormatError)


def test_F19_json_numbers(tmp_path: Path) -> None:
    ck = save(tmp_path, {"f": 1.0, "g": 3.0e20, "i": 3})
    text = (ck / "manifest.json").read_text()
    assert '"f":1.0' in text and '"i":3' in text and re.search(r'"g":3(\.0)?e\+?20', text)
    raw = text.replace('"i":3', '"i":123456789012345678901234567890').replace('"f":1.0', '"f":1e2')
    raw = re.sub(r'^\{"manifest_checksum":"crc32:[0-9a-f]{8}",', "{", raw)  # edited: drop its CRC
    (ck / "manifest.json").write_text(raw)
    out = ckptproto.load(ck)
    assert out["i"] == 123456789012345678901234567890 and type(out["i"]) is int
    assert out["f"] == 100.0 and type(out["f"]) is float
    # Exact beyond Python's 4,300-digit int(str) limit, up to F-33's 10,000 characters, as a
    # value and as a $dict key; readers accept (validate: only F-16, a writer's rule).
    big = 7 * 10**4999 + 1
    digits = str(decimal.Decimal(big))
    state = '{"v":' + digits + ',"k":{"$dict":[[' + digits + ",1]]}}"
    ck2 = one_tensor(tmp_path, name="big")
    (ck2 / "manifest.json").write_text(
        (ck2 / "manifest.json").read_text().replace('{"t": {"$torch": 0}}', state)
    )
    agree(ck2, None)
    out = ckptproto.load(ck2)
    assert out["v"] == big and out["k"] == {big: 1}
    assert ckptproto.read_manifest(ck2).state["v"] == big
    # Longer integers and numbers that overflow a double are refused, by every reader, and
    # a directory of them is skipped (with a warning) by discovery, not a crash.
    for name, value in (
        ("wider", "9" * 10_001),
        ("neg", "-" + "9" * 10_000),
        ("inf", "1e400"),
        ("ninf", "-1.5e999"),
    ):
        bad = one_tensor(tmp_path, name=name)
        (bad / "manifest.json").write_text(
            (bad / "manifest.json").read_text().replace('{"t": {"$torch": 0}}', '{"v": ' + value + "}")
        )
        agree(bad, CheckpointFormatError)
        refused(bad, CheckpointFormatError, ckptproto.read_manifest, ckptproto.read_info)
    found = {r.path.name for r in ckptproto.find_checkpoints(tmp_path)}
    assert found == {"ck", "big"}


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("size", CheckpointFormatError),  # F-8: a file size fits 63 bits
        ("index", CheckpointFormatError),  # F-14: no such tensor
        ("version", CheckpointFormatError),  # F-31: not a string
        ("shape", CheckpointFormatError),  # F-33
        ("world_size", None),  # any int >= 1: read exactly, nothing to refuse
        ("rank", None),
    ],
)
def test_F19_5000_digit_integers_in_every_field(tmp_path: Path, field: str, expected: Any) -> None:
    """Past Python's 4,300-digit str() limit in each plain-integer field: every reader gives
    the same verdict, each refusal a CheckpointFormatError with a readable message."""
    big = 9 * 10**4999
    ck = one_tensor(tmp_path)

    def put(d: dict[str, Any]) -> None:
        if field == "size":
            d["files"][DATA]["size"] = big
        elif field == "index":
            d["state"]["t"] = {"$torch": big}
        elif field == "version":
            d["format_version"] = big
        elif field == "shape":
            d["tensors"][0]["shape"][0] = big
        else:
            (d if field == "world_size" else d["files"][DATA])[field] = big

    doc = doc_of(ck)
    put(doc)
    (ck / "manifest.json").write_text(_dumps_big(doc))
    agree(ck, expected, schema=field != "index")  # the schema cannot count tensors
    if expected is not None:
        with pytest.raises(expected) as info:
            ckptproto.load(ck)
        assert len(str(info.value)) < 2000


def _dumps_big(doc: Any) -> str:
    """``json.dumps`` for ints past Python's 4,300-digit str() limit."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    try:
        return json.dumps(doc)
    finally:
        sys.set_int_max_str_digits(limit)


@pytest.mark.parametrize(
    ("state_json", "expected"),
    [
        ('{"v": 9007199254740993}', {"v": 9007199254740993}),
        ('{"v": [1, 1.0, 1e2]}', {"v": [1, 1.0, 100.0]}),
        ('{"b": 1, "2": 2, "a": 3}', {"b": 1, "2": 2, "a": 3}),
        ('{"__proto__": 1, "constructor": 2}', {"__proto__": 1, "constructor": 2}),
        ('{"k": {"$dict": [[9007199254740993, 1], [{"$int": "-9007199254740994"}, 2]]}}', None),
        ('{"v": "\\ud83d\\ude00"}', {"v": "\U0001f600"}),
        ('{"a": 1, "a": 2}', CheckpointFormatError),
        ('{"v": {"$bytes": "AA"}}', CheckpointFormatError),
        ('{"v": {"$bytes": "AA=="}}', {"v": b"\0"}),
        ('{"v": {"$bytes": "-_8="}}', CheckpointFormatError),
        ('{"v": [1e400]}', CheckpointFormatError),
        ('{"v": ["\\ud800"]}', CheckpointFormatError),
        ('{"v": NaN}', CheckpointFormatError),
    ],
)
def test_F19_generic_parser_pitfalls(tmp_path: Path, state_json: str, expected: Any) -> None:
    """FORMAT.md §10's table, row by row: what a generic JSON parser gets wrong, read by
    every reader of this implementation."""
    ck = one_tensor(tmp_path)
    text = (ck / "manifest.json").read_text()
    (ck / "manifest.json").write_text(text.replace('{"t": {"$torch": 0}}', state_json))
    if isinstance(expected, type):
        # The schema sees malformed base64; duplicate keys, NaN, 1e400 and lone surrogates are
        # below it (a JSON parser's business, F-6).
        agree(ck, expected, schema="$bytes" in state_json)
        return
    agree(ck, None, schema=True)
    loaded = ckptproto.load(ck)
    if expected is None:  # int $dict keys past 2**53, plain and tagged, exact
        assert loaded["k"] == {9007199254740993: 1, -9007199254740994: 2}
    else:
        assert loaded == expected and list(loaded) == list(expected)
        if isinstance(expected.get("v"), list):  # 1 an int, 1.0 and 1e2 floats
            assert [type(x) for x in loaded["v"]] == [type(x) for x in expected["v"]]


# ---------------------------------------------------------------- FORMAT §4 dtypes, data files


def _spec_dtype_table() -> dict[str, str | None]:
    """The dtype table of FORMAT.md §4, parsed from the text."""
    text = (SPEC / "FORMAT.md").read_text()
    section = text.split("## 4.")[1].split("- **[F-20]**")[0]
    table: dict[str, str | None] = {}
    for line in section.splitlines():
        if line.startswith("| ") and "---" not in line and "safetensors |" not in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            for name, code in zip(cells[::2], cells[1::2], strict=True):
                if name:
                    table[name] = code
    raw = section.split("the true dtype only in the manifest:")[1]
    for token in re.findall(r"[a-z][a-z0-9_]+(?:…[a-z0-9]+)?", raw):
        if "…" in token:  # int1…int7
            stem = token.split("…")[0].rstrip("0123456789")
            for n in range(1, 8):
                table[f"{stem}{n}"] = None
        elif token not in ("byte", "bytes", "two", "values", "each", "and"):
            table[token] = None
    return table


def _random_tensor(name: str, shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    dtype = getattr(torch, name)
    itemsize = dtypes.BY_NAME[name].itemsize
    raw = np.random.default_rng(len(name)).integers(0, 256, math.prod(shape) * itemsize, dtype=np.uint8)
    if name == "bool":
        raw %= 2
    if name.startswith("complex") or name.startswith("float") or name.startswith("bfloat"):
        raw[:itemsize] = 0xFF  # a NaN pattern with payload bits
    return torch.frombuffer(bytearray(raw.tobytes()), dtype=torch.uint8).view(dtype).reshape(shape)


TORCH_DTYPES = [n for n in dtypes.BY_NAME if hasattr(torch, n)]


def test_F20_dtype_codes(tmp_path: Path) -> None:
    table = _spec_dtype_table()
    assert table == {d.name: d.safetensors for d in dtypes.BY_NAME.values()}
    ck = save(tmp_path, {n: _random_tensor(n) for n in TORCH_DTYPES})
    _, header = header_of((ck / DATA).read_bytes())
    by_key = {t["chunks"][0]["key"]: t for t in doc_of(ck)["tensors"]}
    for name in TORCH_DTYPES:
        assert by_key[name]["dtype"] == name
        code = table[name]
        want = (code, [2, 3]) if code else ("U8", [6 * dtypes.BY_NAME[name].itemsize])
        assert (header[name]["dtype"], header[name]["shape"]) == want, name


def test_F21_little_endian_row_major_bytes(tmp_path: Path) -> None:
    big = np.arange(12, dtype=">i4").reshape(3, 4)[:, ::2]  # big-endian and non-contiguous
    t = torch.arange(12, dtype=torch.int16).reshape(3, 4).t()  # non-contiguous
    ck = save(tmp_path, {"big": big, "t": t})
    data = (ck / DATA).read_bytes()
    n, header = header_of(data)

    def stored(key: str) -> bytes:
        begin, end = header[key]["data_offsets"]
        return data[8 + n + begin : 8 + n + end]

    assert stored("big") == np.ascontiguousarray(big).astype("<i4").tobytes()
    assert stored("t") == np.ascontiguousarray(t.numpy()).astype("<i2").tobytes()


def test_F22_data_files_are_safetensors(tmp_path: Path) -> None:
    ck = save(tmp_path)
    data = (ck / DATA).read_bytes()
    n, header = header_of(data)
    assert n <= 100 * 2**20
    meta = header.pop("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    spans = sorted(tuple(e["data_offsets"]) for e in header.values())
    assert all(set(e) == {"dtype", "shape", "data_offsets"} for e in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(data) - 8 - n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    ck1 = one_tensor(tmp_path, name="base")

    def variant(name: str, data: bytes) -> Path:
        path = tmp_path / name
        shutil.copytree(ck1, path)
        put_data(path, DATA, data)
        return path

    payload = np.arange(6, dtype="<f4").tobytes()
    hdr = json.dumps({"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    assert ckptproto.load(variant("ok", struct.pack("<Q", len(hdr)) + hdr + payload))["t"].shape == (2, 3)
    huge = struct.pack("<Q", 100 * 2**20 + 1) + hdr + payload
    with pytest.raises(CheckpointFormatError, match="limit") as info:
        ckptproto.load(variant("huge", huge))
    assert type(info.value) is CheckpointFormatError
    two = [("t", "F32", [2, 3], payload), ("u", "F32", [1], b"\0" * 4)]
    ok2 = _data_file(two)
    n2, h2 = header_of(ok2)
    buffer = ok2[8 + n2 :]
    bad_files = {  # header, buffer: each exactly as long as the header's largest end
        "overlap": ({**h2, "u": {"dtype": "F32", "shape": [1], "data_offsets": [20, 24]}}, buffer[:24]),
        "gap": ({**h2, "u": {"dtype": "F32", "shape": [1], "data_offsets": [28, 32]}}, buffer + b"\0" * 4),
        "extra_field": ({**h2, "u": {**h2["u"], "extra": 1}}, buffer),
        "bad_code": ({**h2, "u": {**h2["u"], "dtype": "F128"}}, buffer),
        "size_mismatch": ({**h2, "u": {**h2["u"], "shape": [2]}}, buffer),
        "metadata_not_str": ({**h2, "__metadata__": {"a": 1}}, buffer),
    }
    for name, (header_obj, body) in bad_files.items():
        text = json.dumps(header_obj).encode()
        with pytest.raises(CheckpointFormatError) as info:
            ckptproto.load(variant(name, struct.pack("<Q", len(text)) + text + body))
        assert type(info.value) is CheckpointFormatError, name  # not a truncation: a bad layout
    past_end = {**h2, "u": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}}
    text = json.dumps(past_end).encode()
    # Files the manifest records as they are (size and CRC agree) were written wrong:
    # CheckpointFormatError; the same bytes under the manifest of the good file are damage.
    written_wrong = {
        "past_end": struct.pack("<Q", len(text)) + text + ok2[8 + n2 :],
        "trailing": ok2 + b"\0" * 4,
        "short": ok2[:6],
        "not_json": struct.pack("<Q", 4) + b"{{{{" + payload,
        "header_past_end": struct.pack("<Q", 10**6) + hdr + payload,
        "unknown_code_unused": _data_file([*two, ("v", "F4", [1], b"\0")]),
    }
    text2 = ok2[8 : 8 + n2]
    for name, old, new in (
        ("offsets_5000_digits", b"[24, 28]", b"[24, " + b"9" * 5000 + b"]"),
        ("header_nan", b'{"format": "pt"}', b'{"format": NaN}'),
        ("header_1e400", b"[24, 28]", b"[24, 1e400]"),
        ("shape_5000_digits", b'"shape": [1]', b'"shape": [' + b"9" * 5000 + b"]"),
        ("header_lone_surrogate", b'"pt"', b'"\\ud800"'),
    ):
        assert old in text2
        changed = text2.replace(old, new)
        written_wrong[name] = struct.pack("<Q", len(changed)) + changed + buffer
    for name, data in written_wrong.items():
        agree(variant(name, data), CheckpointFormatError)
        damaged = tmp_path / f"damaged_{name}"
        shutil.copytree(ck1, damaged)
        (damaged / DATA).write_bytes(data)
        agree(damaged, CheckpointCorruptError)


def test_F23_header_padded_to_8_with_spaces(tmp_path: Path) -> None:
    for i in range(4):  # different key lengths give different raw header lengths
        ck = save(tmp_path, {"k" * (i + 1): torch.ones(1)}, name=f"c{i}")
        data = (ck / DATA).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        assert (8 + n) % 8 == 0
        text = data[8 : 8 + n]
        stripped = text.rstrip(b" ")
        assert stripped.endswith(b"}") and json.loads(stripped) == json.loads(text)
    # ckptproto's writer starts a buffer of 4 MiB or more at a page, 4096 bytes (a multiple
    # of 8 still): the safetensors package reads the file as any other.
    from safetensors.torch import load as safetensors_load

    big = {"w": torch.arange(1 << 20, dtype=torch.float32)}
    ck = save(tmp_path, big, name="big")
    data = (ck / DATA).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert (8 + n) % 4096 == 0 and data[8 + n - 1 : 8 + n] == b" "
    assert torch.equal(safetensors_load(data)["w"], big["w"])


def test_F24_tensors_aligned_to_itemsize(tmp_path: Path) -> None:
    state = {
        "b": torch.ones(3, dtype=torch.bool),
        "h": torch.ones(3, dtype=torch.float16),
        "d": torch.ones(3, dtype=torch.float64),
        "c": torch.ones(1, dtype=torch.complex128),
        "i8": np.ones(5, dtype=np.int8),
        "f": torch.ones(3),
        "z": torch.ones(1, dtype=torch.complex32),
    }
    ck = save(tmp_path, state)
    data = (ck / DATA).read_bytes()
    n, header = header_of(data)
    for t in doc_of(ck)["tensors"]:
        key = t["chunks"][0]["key"]
        begin = 8 + n + header[key]["data_offsets"][0]
        assert begin % min(dtypes.BY_NAME[t["dtype"]].itemsize, 8) == 0, key


def test_F25_real_safetensors_reads_the_same_bytes(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import load_file as np_load_file

    state = {n: _random_tensor(n) for n in TORCH_DTYPES}
    state["np16"] = np.arange(5, dtype=np.uint16)
    ck = save(tmp_path, state)
    loaded = ckptproto.load(ck)
    keys = {t["chunks"][0]["key"]: t for t in doc_of(ck)["tensors"]}
    with safe_open(str(ck / DATA), framework="pt") as f:
        assert set(f.keys()) == set(keys)
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            ours = loaded[key]
            theirs = f.get_tensor(key)
            ours_bytes = ours.tobytes() if isinstance(ours, np.ndarray) else bytes(ours.untyped_storage())
            assert bytes(theirs.contiguous().untyped_storage()) == ours_bytes, key
    plain = save(
        tmp_path, {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), dtype=np.int64)}, name="np"
    )
    numpy_side = np_load_file(str(plain / DATA))
    ours_np = ckptproto.load(plain)
    for key in ("a", "b"):
        assert (
            numpy_side[key].tobytes() == ours_np[key].tobytes()
            and numpy_side[key].dtype == ours_np[key].dtype
        )
    # The numpy flavour: every entry with a numpy dtype (raw U8 ones as bytes); a file with a
    # BF16 or F8 entry is refused whole, as F-25 says.
    raw = save(
        tmp_path,
        {"c32": torch.ones(2, dtype=torch.complex32), "u16": torch.ones(2, dtype=torch.uint16)},
        name="raw",
    )
    assert np_load_file(str(raw / DATA))["c32"].dtype == np.uint8
    with pytest.raises(TypeError, match="bfloat16"):
        np_load_file(str(save(tmp_path, {"b": torch.ones(2, dtype=torch.bfloat16)}, name="bf") / DATA))


# ---------------------------------------------------------------- FORMAT §5 checksums


def test_F26_checksums(tmp_path: Path) -> None:
    ck = save(tmp_path, {"t": torch.arange(100)})
    data = (ck / DATA).read_bytes()
    assert doc_of(ck)["files"][DATA]["checksum"] == f"crc32:{zlib.crc32(data):08x}"
    flipped = bytearray(data)
    flipped[-1] ^= 1
    (ck / DATA).write_bytes(bytes(flipped))
    refused(ck, CheckpointCorruptError)
    with pytest.raises(CheckpointCorruptError) as info:
        ckptproto.verify(ck)
    assert DATA in str(info.value)
    # Header bytes are covered too.
    (ck / DATA).write_bytes(data.replace(b'"pt"', b'"PT"'))
    refused(ck, CheckpointCorruptError)
    (ck / DATA).write_bytes(data)
    for bad in (
        "crc32:ABCDEF01",
        "CRC32:abcdef01",
        "crc32:+bcdef01",
        "crc32: bcdef01",
        "crc32:abc_ef01",
        "md5:x",
    ):
        edit(ck, lambda d, bad=bad: d["files"][DATA].__setitem__("checksum", bad))
        refused(ck, CheckpointFormatError, ckptproto.read_manifest)
    # verify reports every damaged file.
    boxes = [(F0, [0, 0], [2, 6]), (F1, [2, 0], [2, 6])]
    ck2 = _chunked(tmp_path, "two", boxes)
    for name in (F0, F1):
        raw = bytearray((ck2 / name).read_bytes())
        raw[-1] ^= 0xFF
        (ck2 / name).write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptError) as info:
        ckptproto.verify(ck2)
    assert len(info.value.problems) == 2
    assert ckptproto.load(ck2, verify=False)["w"].shape == (4, 6)  # the bytes are read, unchecked


def test_F37_refusal_order(tmp_path: Path) -> None:
    """Several problems at once: every reader names the class of the earliest stage (§9)."""
    boxes = [(F0, [0, 0], [2, 6]), (F1, [2, 0], [2, 6])]

    def case(name: str, *breaks: Callable[[Path], Any]) -> Path:
        ck = _chunked(tmp_path, name, boxes)
        for b in breaks:
            b(ck)
        return ck

    def missing(ck: Path) -> None:
        (ck / F1).unlink()

    def flipped(ck: Path) -> None:
        raw = bytearray((ck / F1).read_bytes())
        raw[-1] ^= 1
        (ck / F1).write_bytes(bytes(raw))

    def bad_header(ck: Path) -> None:  # recorded in the manifest: written wrong, not damaged
        n, header = header_of((ck / F0).read_bytes())
        header["w0"]["dtype"] = "F99"
        put_data(ck, F0, _rebuild(header, (ck / F0).read_bytes()[8 + n :]))

    def data_dir(ck: Path) -> None:
        (ck / F0).unlink()
        (ck / F0).mkdir()

    def bad_value(ck: Path) -> None:
        edit(ck, lambda d: d["state"].__setitem__("x", {"$int": "12a"}))

    def bad_ref(ck: Path) -> None:
        edit(ck, lambda d: d["state"].__setitem__("x", {"$numpy": 0}))

    def reused_pair(ck: Path) -> None:
        edit(ck, lambda d: d["tensors"].append(json.loads(json.dumps(d["tensors"][0]))))

    # The manifest alone decides before any data file is looked at...
    for name, manifest_problem, schema in (
        ("value", bad_value, True),  # the schema sees a bad $int; references and pairs it cannot
        ("ref", bad_ref, False),
        ("pair", reused_pair, False),
    ):
        agree(case(f"{name}_missing", manifest_problem, missing), CheckpointFormatError, schema=schema)
        agree(case(f"{name}_flipped", manifest_problem, flipped), CheckpointFormatError, schema=schema)
    # ...then damage to any data file, whatever else is wrong with the files...
    agree(case("header_and_flipped", bad_header, flipped), CheckpointCorruptError)
    agree(case("dir_and_missing", data_dir, missing), CheckpointCorruptError)
    agree(case("missing", missing), CheckpointCorruptError)
    # ...then the rest.
    agree(case("header", bad_header), CheckpointFormatError)
    agree(case("dir", data_dir), CheckpointFormatError)
    agree(case("fine"), None, schema=True)


def test_F37_random_damage_gets_one_verdict(tmp_path: Path) -> None:
    """Seeded random damage to a real checkpoint (byte changes, truncations, inserted JSON
    tokens, enlarged numbers; the manifest mostly without its checksum so the damage reaches
    the parser): every reader gives the same verdict, always a CheckpointError.
    CKPTPROTO_STRESS=1 runs 2,000 trials instead of 60."""
    import random

    from _reliability import STRESS

    base = save(tmp_path, name="base")
    names = sorted(os.listdir(base))
    rnd = random.Random(37)
    inserts = [b"0", b"9" * 5000, b"[", b"{", b'"', b",", b"-", b"e400", b"\\ud800", b" "]
    for trial in range(2000 if STRESS else 60):
        ck = tmp_path / f"t{trial}"
        shutil.copytree(base, ck)
        target = ck / rnd.choice(names)
        data = bytearray(target.read_bytes())
        if target.name == "manifest.json" and rnd.random() < 0.7:
            data = bytearray(re.sub(rb'^\{"manifest_checksum":"crc32:[0-9a-f]{8}",', b"{", bytes(data)))
        at = rnd.randrange(len(data))
        kind = rnd.randrange(4)
        if kind == 0:
            data[at] = rnd.randrange(256)
        elif kind == 1:
            del data[at:]
        elif kind == 2:
            data[at:at] = rnd.choice(inserts)
        else:
            digits = [m.start() for m in re.finditer(rb"[0-9]", bytes(data))]
            p = rnd.choice(digits)
            data[p : p + 1] = rnd.choice([b"9" * 30, b"0", b"-1", b"1.5", b"9" * 20])
        target.write_bytes(bytes(data))
        got = verdicts(ck)  # a raw exception escapes here and fails the test
        assert len(set(got.values())) == 1, (trial, target.name, kind, got)
        shutil.rmtree(ck)


def _rebuild(header: dict[str, Any], buffer: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + buffer


# ---------------------------------------------------------------- FORMAT §6 atomic commit


class _Spy:
    """Records, during a real save, the temporary directory and every fsync in order."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, final: Path, on_finish: Callable[[Path], None]
    ) -> None:
        from ckptproto.io import commit

        self.fsynced: list[str] = []  # in the order the fsyncs finished
        self.temps: list[Path] = []
        self.finished_before_commit: list[str] = []  # what fsync had finished when finish began
        real_fsync, real_finish = os.fsync, commit.finish

        def fsync(fd: int) -> None:
            name = os.readlink(f"/proc/self/fd/{fd}")
            real_fsync(fd)
            self.fsynced.append(name)

        def finish(temp: Path, final_path: Path, **kwargs: Any) -> None:
            self.temps.append(temp)
            self.finished_before_commit = list(self.fsynced)
            on_finish(temp)
            real_finish(temp, final_path, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(commit, "finish", finish)


def test_F36_manifest_checksum(tmp_path: Path) -> None:
    ck = save(tmp_path)
    manifest = ck / "manifest.json"
    data = manifest.read_bytes()
    assert data.startswith(b'{"manifest_checksum":"crc32:') and data[36:38] == b'",'
    assert int(data[28:36], 16) == zlib.crc32(b"{" + data[38:])
    ckptproto.load(ck)
    # A change that still parses and validates: a digit of a value.
    at = data.index(b'"format_version":"1.0"') + len(b'"format_version":"1.')
    manifest.write_bytes(data[:at] + b"1" + data[at + 1 :])
    with pytest.raises(ckptproto.CheckpointCorruptError, match="manifest_checksum"):
        ckptproto.load(ck)
    # A damaged member name is refused too, not ignored as an unknown field.
    manifest.write_bytes(data.replace(b"manifest_checksum", b"manifest_checksun", 1))
    with pytest.raises(ckptproto.CheckpointCorruptError):
        ckptproto.read_manifest(ck)
    # Damage is found before parsing: also where it leaves JSON that no longer parses, or
    # breaks the "crc32:" literal; every reader says so.
    at_quote = data.index(b'"format":')
    for damaged in (
        data[:at] + b"1" + data[at + 1 :],
        data[:at_quote] + b"'" + data[at_quote + 1 :],
        data[:-1] + b"]",
        data.replace(b'"crc32:', b'"crc22:', 1),
    ):
        manifest.write_bytes(damaged)
        agree(ck, CheckpointCorruptError)
    # Without the member (another writer, a hand edit), the manifest is read unchecked.
    manifest.write_bytes(b"{" + data[38:])
    ckptproto.load(ck)
    agree(ck, None)


def test_F27_temporary_sibling_is_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "ck"
    seen: list[list[str]] = []
    spy = _Spy(monkeypatch, final, lambda temp: seen.append(sorted(os.listdir(temp.parent))))
    ckptproto.save({"t": torch.ones(3)}, final)
    (temp,) = spy.temps
    assert temp.parent == final.parent
    assert re.fullmatch(r"\.ck\.ckptproto-tmp-[0-9a-zA-Z]+", temp.name)
    assert seen == [[temp.name]]  # before the rename only the hidden temp dir exists
    assert os.listdir(tmp_path) == ["ck"]


def test_F28_data_then_manifest_then_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    final = tmp_path / "ck"
    contents: list[set[str]] = []
    from ckptproto.io.commit import LOCKED_MARKER

    # (the writer's liveness marker, F-30, is removed by the commit itself)
    spy = _Spy(monkeypatch, final, lambda temp: contents.append(set(os.listdir(temp)) - {LOCKED_MARKER}))
    ckptproto.save({"t": torch.ones(3), "u": np.zeros(2)}, final)
    (temp,) = spy.temps
    assert contents == [{DATA, "manifest.json"}]
    assert sorted(os.listdir(final)) == sorted([DATA, "manifest.json"])
    # The data file, then the manifest and the directory (at the same time, F-28), both
    # finished before the commit renames anything; then the parent.
    assert spy.fsynced[-4] == str(temp / DATA)
    assert sorted(spy.fsynced[-3:-1]) == sorted([str(temp / "manifest.json"), str(temp)])
    assert spy.fsynced[-1] == str(tmp_path)
    assert spy.finished_before_commit == spy.fsynced[:-1]
    # The manifest was written after the data file was complete.
    assert (final / "manifest.json").stat().st_mtime_ns >= (final / DATA).stat().st_mtime_ns


def test_F28_manifest_and_directory_fsyncs_run_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest's fsync and the temporary directory's run at the same time (one journal
    # commit, not two in a row): each waits here until the other has started. One after the
    # other, the first would wait alone and the barrier break.
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name fsynced descriptors")
    import threading

    final = tmp_path / "ck"
    both = threading.Barrier(2, timeout=10)
    met: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if name.name == "manifest.json" or name.name.startswith(".ck.ckptproto-tmp-"):
            both.wait()
            met.append(name.name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    ckptproto.save({"t": torch.ones(3)}, final)
    assert len(met) == 2 and "manifest.json" in met
    assert torch.equal(ckptproto.load(final)["t"], torch.ones(3))


def test_F29_replacing_is_explicit_and_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "ck"
    ckptproto.save({"v": torch.zeros(3)}, final)
    with pytest.raises(CheckpointExistsError):
        ckptproto.save({"v": torch.ones(3)}, final)
    assert torch.equal(ckptproto.load(final)["v"], torch.zeros(3))
    during: list[Any] = []
    _Spy(monkeypatch, final, lambda temp: during.append(ckptproto.load(final)["v"]))
    ckptproto.save({"v": torch.ones(3)}, final, overwrite=True)
    assert torch.equal(during[0], torch.zeros(3))  # the old one was whole until the swap
    assert torch.equal(ckptproto.load(final)["v"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ck"]  # the old one is gone, no leftovers
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointExistsError):
        ckptproto.save({"v": 1}, other, overwrite=True)
    assert os.listdir(other) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointExistsError):
        ckptproto.save({"v": 1}, tmp_path / "file", overwrite=True)


def test_F29_without_overwrite_the_commit_never_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another writer commits NAME after every check of this one, just before its rename: the
    # rename itself must refuse (no-replace), so exactly one of the two commits.
    final = tmp_path / "ck"
    competitor: list[Path] = []

    def commit_another(temp: Path) -> None:
        if not competitor:
            competitor.append(temp)
            ckptproto.save({"v": torch.full((3,), 2.0)}, final)

    _Spy(monkeypatch, final, commit_another)
    with pytest.raises(CheckpointExistsError, match="another saver"):
        ckptproto.save({"v": torch.ones(3)}, final)
    assert torch.equal(ckptproto.load(final)["v"], torch.full((3,), 2.0))
    assert os.listdir(tmp_path) == ["ck"]


def test_F30_cleanup_spares_a_locked_writer(tmp_path: Path) -> None:
    # The name says: this host, a pid that no longer exists (what a writer in another PID
    # namespace looks like from here); the directory's flock says the writer lives.
    import subprocess
    import sys

    from ckptproto.format import layout

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = tmp_path / f".ck{layout.TEMP_MARKER}0123456789abP{int(gone.stdout)}H{layout.this_host()}"
    leftover.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()", str(leftover)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert ckptproto.remove_leftovers(tmp_path) == [] and leftover.is_dir()
    finally:
        holder.communicate("")
    assert ckptproto.remove_leftovers(tmp_path) == [leftover] and not leftover.exists()
    # A locking writer's leftover (it holds the marker) whose lock is free is its dead
    # writer's, even when that pid number now belongs to a live process (reuse, another
    # namespace): removed.
    from ckptproto.io import commit

    reused = tmp_path / f".ck{layout.TEMP_MARKER}0123456789abP{os.getppid()}H{layout.this_host()}"
    reused.mkdir()
    (reused / commit.LOCKED_MARKER).touch()
    assert ckptproto.remove_leftovers(tmp_path) == [reused]


def test_F38_readers_read_one_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto.io import commit, reader

    final = tmp_path / "ck"
    ckptproto.save({"v": torch.zeros(64), "step": 0}, final)
    real = reader.read_manifest
    act: list[Callable[[], Any]] = [
        lambda: ckptproto.save({"v": torch.ones(64), "step": 1}, final, overwrite=True)
    ]

    def then_write(*args: Any, **kwargs: Any) -> Any:
        manifest = real(*args, **kwargs)
        if act:
            act.pop()()  # the writer acts between the manifest and the data files
        return manifest

    monkeypatch.setattr(reader, "read_manifest", then_write)
    state = ckptproto.load(final)  # replaced meanwhile: one generation, whole, not "corrupt"
    assert torch.equal(state["v"], torch.full((64,), float(state["step"])))
    act.append(lambda: commit.discard(final))
    with pytest.raises(CheckpointNotFoundError):
        ckptproto.verify(final)  # deleted meanwhile


def test_F30_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto.io import writer

    final = tmp_path / "ck"
    ckptproto.save({"v": torch.zeros(2)}, final)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise CheckpointWriteError("disk full (simulated)")

    monkeypatch.setattr(writer, "write_small_file", broken)
    with pytest.raises(CheckpointWriteError):
        ckptproto.save({"v": torch.ones(2)}, final, overwrite=True)
    with pytest.raises(CheckpointWriteError):
        ckptproto.save({"v": torch.ones(2)}, tmp_path / "new")
    assert os.listdir(tmp_path) == ["ck"]
    assert torch.equal(ckptproto.load(final)["v"], torch.zeros(2))


# ---------------------------------------------------------------- FORMAT §6.1 object stores
# Against a real S3 server (moto, tests/_s3_server.py); skipped where moto/obstore are missing.


def _s3_save(storage: Any, url: str, state: dict[str, Any], *, overwrite: bool = False) -> Any:
    """A real save (prepare, plan, upload, commit) through ``storage``."""
    from ckptproto.io import pipeline
    from ckptproto.io.coordinate import Solo
    from ckptproto.io.prepare import prepare
    from ckptproto.location import parse_location

    prepared = prepare(state, None, Solo())
    sources = [memoryview(np.ascontiguousarray(leaf.value)).cast("B") for leaf in prepared.share.leaves]
    return pipeline.run(
        parse_location(url), prepared.share, prepared.metadata_tree, sources, Solo(),
        overwrite=overwrite, storage=storage,
    )  # fmt: skip


def _s3_names(url: str) -> list[str]:
    from ckptproto.io import s3_storage
    from ckptproto.location import parse_location

    return [e.name for e in s3_storage.S3.entries(parse_location(url))]


def test_F39_object_store_manifest_last_and_a_prefix_without_one_is_invisible(s3_url: str) -> None:
    import obstore

    from ckptproto.io import s3_client, s3_storage
    from ckptproto.location import parse_location

    url = s3_url + "/ck"
    final = parse_location(url)
    seen: list[list[str]] = []

    class Watched(s3_storage.S3Storage):
        def commit(self, staging: str, final: Any, *, overwrite: bool) -> None:
            # Every data object is up and the manifest is not: no checkpoint yet.
            seen.append(_s3_names(url))
            assert not self.is_committed(final)
            with pytest.raises(CheckpointNotFoundError):
                self.open(final)
            super().commit(staging, final, overwrite=overwrite)

    _s3_save(Watched(), url, {"v": np.arange(4.0)})
    assert [n.endswith(".safetensors") or n.startswith(".") for n in seen[0]] == [True, True]
    assert "manifest.json" in _s3_names(url) and s3_storage.S3.is_committed(final)

    class Swept(s3_storage.S3Storage):
        def commit(self, staging: str, final: Any, *, overwrite: bool) -> None:
            data = [n for n in _s3_names(url2) if n.endswith(".safetensors")]
            obstore.delete(s3_client.store(final.bucket), [final.object_key(n) for n in data])
            super().commit(staging, final, overwrite=overwrite)

    url2 = s3_url + "/swept"
    with pytest.raises(CheckpointWriteError, match="missing at commit"):
        _s3_save(Swept(), url2, {"v": np.arange(4.0)})
    assert not s3_storage.S3.is_committed(parse_location(url2))


def test_F40_object_store_conditional_commit_one_of_racing_writers_wins(s3_url: str) -> None:
    import threading

    from ckptproto.io import s3_storage

    barrier = threading.Barrier(2, timeout=60)

    class Gated(s3_storage.S3Storage):  # both saves uploaded and checked before either commits
        def commit(self, staging: str, final: Any, *, overwrite: bool) -> None:
            barrier.wait()
            super().commit(staging, final, overwrite=overwrite)

    url = s3_url + "/ck"
    outcomes: list[object] = []

    def save(value: float) -> None:
        try:
            outcomes.append(_s3_save(Gated(), url, {"v": np.full(8, value)}))
        except CheckpointExistsError as exc:
            outcomes.append(exc)

    workers = [threading.Thread(target=save, args=(float(i),)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert sorted(type(o).__name__ for o in outcomes) == ["CheckpointExistsError", "CheckpointInfo"]
    names = _s3_names(url)  # the loser's data object is gone
    assert len(names) == 2 and names[1] == "manifest.json", names


def test_F41_object_store_unique_names_and_old_generation_after_new_manifest(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import obstore

    from ckptproto.io import s3_storage
    from ckptproto.location import parse_location

    url = s3_url + "/ck"
    final = parse_location(url)
    ckptproto.save({"v": np.zeros(8)}, url)
    first = _s3_names(url)
    old = s3_storage.S3.open(final)
    (old_name,) = json.loads(old.read_manifest())["files"]
    manifest_at_delete: list[set[str]] = []
    real = obstore.delete

    def recording(store: Any, paths: Any) -> None:
        if any(str(p).endswith(old_name) for p in paths):  # what stands when the old goes
            with s3_storage.S3.open(final) as now:
                manifest_at_delete.append(set(json.loads(now.read_manifest())["files"]))
        real(store, paths)

    monkeypatch.setattr(obstore, "delete", recording)
    ckptproto.save({"v": np.ones(8)}, url, overwrite=True)
    assert len(manifest_at_delete) == 1 and old_name not in manifest_at_delete[0]
    second = _s3_names(url)
    assert NAME_RE.fullmatch(second[0]) and second[0] != first[0] and old_name not in second
    # The old generation's reader finds its object gone, learns the manifest changed, and
    # the new generation is whole.
    with pytest.raises(CheckpointCorruptError, match="missing"):
        old.open_file(old_name)
    assert old.replaced()
    fresh = s3_storage.S3.open(final)
    (new_name,) = json.loads(fresh.read_manifest())["files"]
    assert new_name == second[0] and fresh.open_file(new_name).size > 0
    s3_storage.S3.remove(final)
    with pytest.raises(CheckpointNotFoundError):
        fresh.replaced()


def test_F42_object_store_remove_manifest_first_and_sweep_spares_the_living(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import obstore

    from ckptproto.io import s3_storage
    from ckptproto.io.coordinate import Solo
    from ckptproto.io.plan import plan_file
    from ckptproto.io.prepare import prepare
    from ckptproto.location import parse_location

    root = parse_location(s3_url)
    ckptproto.save({"v": np.zeros(8)}, s3_url + "/a")
    ckptproto.save({"v": np.zeros(8)}, s3_url + "/b")
    deleted: list[str] = []
    real = obstore.delete

    def recording(store: Any, paths: Any) -> None:
        deleted.extend([paths] if isinstance(paths, str) else paths)
        real(store, paths)

    monkeypatch.setattr(obstore, "delete", recording)
    s3_storage.S3.remove(root / "a")
    assert deleted[0].endswith("/a/manifest.json") and len(deleted) == 2, deleted
    assert _s3_names(s3_url + "/a") == []
    # A save in progress beside b (marker put, data uploaded, no commit yet).
    staging = s3_storage.S3.begin(root / "b", overwrite=True)
    prepared = prepare({"v": np.ones(8)}, None, Solo())
    plan = plan_file(s3_storage.S3.data_file_name(staging, 0), 0, list(prepared.share.pieces))
    s3_storage.S3.write_file(staging, plan, [memoryview(np.ones(8)).cast("B")])
    marker = s3_storage.MARKER_PREFIX + plan.name.split(".")[1]
    committed = [n for n in _s3_names(s3_url + "/b") if n not in (plan.name, marker)]
    assert len(committed) == 2
    assert s3_storage.S3.remove_leftovers(root) == []  # its marker is young: alive
    removed = s3_storage.S3Storage(sweep_grace_s=0).remove_leftovers(root)  # judged dead
    assert sorted(r.name for r in removed) == sorted([plan.name, marker])
    assert _s3_names(s3_url + "/b") == committed  # what the manifest lists stays


# ---------------------------------------------------------------- FORMAT §7 versioning


def test_F31_newer_minor_and_unknown_fields_are_accepted(tmp_path: Path) -> None:
    ck = _chunked(tmp_path, "ck", [(F0, [0, 0], [4, 6])])

    def future(d: dict[str, Any]) -> None:
        d["format_version"] = "1.7"
        d["compression"] = {"kind": "none"}
        d["files"][F0]["sha256"] = "00"
        d["tensors"][0]["layout"] = "strided"
        d["tensors"][0]["chunks"][0]["replica"] = 2

    edit(ck, future)
    assert ckptproto.load(ck)["w"].shape == (4, 6)
    ckptproto.verify(ck)
    assert ckptproto.read_info(ck).format_version == "1.7"
    assert doc_of(save(tmp_path, {"a": 1}, name="w"))["format_version"] == "1.0"


def test_F32_other_major_refused_naming_both_versions(tmp_path: Path) -> None:
    ck = one_tensor(tmp_path)
    edit(ck, lambda d: d.__setitem__("format_version", "2.0"))
    for read in (ckptproto.load, ckptproto.read_manifest, ckptproto.verify):
        with pytest.raises(CheckpointFormatError, match=r"2\.0") as info:
            read(ck)
        assert "1." in str(info.value).replace("2.0", "")
    for bad in ("0.9", "1", "1.x", "v1.0", "1.0.0", 1.0, None, "١.0", "1.١", "1.100000", "01.0x", " 1.0"):
        edit(ck, lambda d, bad=bad: d.__setitem__("format_version", bad))
        refused(ck, CheckpointFormatError, ckptproto.read_manifest)
        agree(ck, CheckpointFormatError, schema=True)
    for good in ("1.0", "1.99999", "1.00"):
        edit(ck, lambda d, good=good: d.__setitem__("format_version", good))
        agree(ck, None, schema=True)


# ---------------------------------------------------------------- FORMAT §8 limits, safety


def test_F33_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto import tree
    from ckptproto.format import manifest, safetensors
    from ckptproto.io import reader

    assert reader.MAX_MANIFEST_BYTES == manifest.MAX_MANIFEST_BYTES == 2**30
    assert safetensors.MAX_HEADER_BYTES == 100 * 2**20
    assert (tree.MAX_DEPTH, manifest.MAX_NDIM, manifest.MAX_DIM) == (200, 64, 2**62)
    assert (tree.MAX_INT_CHARS, manifest.MAX_CHUNKS_PER_TENSOR) == (10_000, 65_536)
    ck = one_tensor(tmp_path)
    monkeypatch.setattr(reader, "MAX_MANIFEST_BYTES", (ck / "manifest.json").stat().st_size - 1)
    refused(ck, CheckpointFormatError, ckptproto.read_manifest)
    monkeypatch.undo()

    def nested(levels: int) -> Any:
        node: Any = None
        for _ in range(levels):
            node = [node]
        return node

    # The root object is one container; 199 more nest under it.
    ckptproto.save({"x": nested(199)}, tmp_path / "deep")
    assert ckptproto.load(tmp_path / "deep")["x"] == nested(199)
    with pytest.raises(UnsupportedValueError):
        ckptproto.save({"x": nested(200)}, tmp_path / "deeper")
    refused(state_as(one_tensor(tmp_path, name="d"), {"x": nested(200)}), CheckpointFormatError)
    ckptproto.save({"x": -(10**9998)}, tmp_path / "wide")  # 10,000 characters
    assert ckptproto.load(tmp_path / "wide")["x"] == -(10**9998)
    with pytest.raises(UnsupportedValueError):
        ckptproto.save({"x": 10**10000}, tmp_path / "wider")
    assert not (tmp_path / "wider").exists()
    changes = (
        lambda t: t.update(
            shape=[1] * 65, chunks=[{**t["chunks"][0], "offsets": [0] * 65, "shape": [1] * 65}]
        ),
        lambda t: t.update(
            shape=[2**62 + 1], chunks=[{**t["chunks"][0], "offsets": [0], "shape": [2**62 + 1]}]
        ),
        lambda t: t.update(
            shape=[65_537], chunks=[{**t["chunks"][0], "offsets": [i], "shape": [1]} for i in range(65_537)]
        ),
    )
    for i, change in enumerate(changes):
        ck2 = one_tensor(tmp_path, name=f"l{i}")
        edit(ck2, lambda d, change=change: change(d["tensors"][0]))
        refused(ck2, CheckpointFormatError, ckptproto.read_manifest)
    # Zero elements, but strides past 2**63 bytes: one rule for every reader (refused from
    # the manifest), so load_into of a Stateful fails cleanly and discovery skips it.
    # [0, 2**62, 2**62]; and [0, 2**30, 2**30, 2] of float32: 2**63 bytes, one past the limit.
    for name, shape in (("z_over", [0, 2**62, 2**62]), ("z_edge", [0, 2**30, 2**30, 2])):
        data = _data_file([("t", "F32", shape, b"")])
        chunk = {"file": DATA, "key": "t", "offsets": [0] * len(shape), "shape": shape}
        tensor = {"dtype": "float32", "shape": shape, "chunks": [chunk]}
        ck3 = build(tmp_path / name, {DATA: data}, [tensor], {"t": {"$torch": 0}})
        agree(ck3, CheckpointFormatError)
        with pytest.raises(CheckpointFormatError):
            ckptproto.load_into(ck3, torch.nn.Linear(1, 1), strict=False)
    fits = [0, 2**30, 2**30, 1]  # 2**62 bytes of float32 if it had elements: legal
    data = _data_file([("t", "F32", fits, b"")])
    chunk = {"file": DATA, "key": "t", "offsets": [0] * 4, "shape": fits}
    ck4 = build(
        tmp_path / "z_fits",
        {DATA: data},
        [{"dtype": "float32", "shape": fits, "chunks": [chunk]}],
        {"t": {"$torch": 0}},
    )
    agree(ck4, None)
    assert ckptproto.load(ck4)["t"].shape == tuple(fits)
    assert {r.path.name for r in ckptproto.find_checkpoints(tmp_path)} >= {"z_fits"}
    assert not {"z_over", "z_edge"} & {r.path.name for r in ckptproto.find_checkpoints(tmp_path)}


_UNDER_CAP = """
import gc, resource, sys
import ckptproto
from ckptproto.conformance.validate import validate
op, path, warm, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
class Sink:  # a Stateful taking the whole state
    def state_dict(self): return {}
    def load_state_dict(self, state): pass
read = {"read_manifest": ckptproto.read_manifest, "load": ckptproto.load,
        "load_into": lambda p: ckptproto.load_into(p, Sink(), strict=False),
        "verify": ckptproto.verify, "validate": validate}[op]
read(warm)  # imports, the read pool's threads and their malloc arenas exist before the cap
gc.collect()
size = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + budget, size + budget))
try:
    read(path)
    print("ok")
except MemoryError:
    print("MemoryError")
"""


def test_F33_memory_stays_within_the_documented_multiple(tmp_path: Path) -> None:
    """F-33's bound, held under an address-space cap (RLIMIT_AS) in a child process: the
    worst case per byte, a manifest of empty lists and a header of empty entries."""
    import subprocess
    import sys

    mib = 2**20
    size = 4 * mib
    ckptproto.save({"a": 1}, tmp_path / "warm")
    data = _data_file([])
    lists = build(tmp_path / "lists", {DATA: data}, [], {"x": 0})
    text = (lists / "manifest.json").read_bytes()
    (lists / "manifest.json").write_bytes(text.replace(b'"x": 0', b'"x": [' + b"[]," * (size // 3) + b"[]]"))
    entries = [(f"{i:x}", "U8", [0], b"") for i in range(size // 50)]
    header = build(tmp_path / "header", {DATA: _data_file(entries)}, [], {})
    header_size = (header / DATA).stat().st_size
    assert header_size >= size

    slack = 8 * mib
    runs = {  # what runs under which cap, and what it must print
        ("read_manifest", lists, 32 * size + slack): "ok",
        ("validate", lists, 32 * size + slack): "ok",
        ("load", lists, 32 * size + slack): "ok",  # decoded in place: one tree, not two
        ("load_into", lists, 64 * size + slack): "ok",  # plus a skeleton, freed before decoding
        ("verify", header, 24 * header_size + slack): "ok",
        ("read_manifest", lists, 8 * size): "MemoryError",  # the cap bites
    }
    children = {
        run: subprocess.Popen(
            [sys.executable, "-c", _UNDER_CAP, run[0], str(run[1]), str(tmp_path / "warm"), str(run[2])],
            stdout=subprocess.PIPE,
            text=True,
        )
        for run in runs
    }
    said = {run: child.communicate()[0].strip() for run, child in children.items()}
    assert said == runs


def test_F34_no_allocation_before_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto import arrays

    allocated: list[Any] = []
    real = arrays.allocate
    monkeypatch.setattr(arrays, "allocate", lambda spec: allocated.append(spec) or real(spec))
    for i, shape in enumerate(([2**40], [2**31, 2**31], [2**62])):
        ck = one_tensor(tmp_path, name=f"h{i}")
        edit(
            ck,
            lambda d, shape=shape: d["tensors"][0].update(
                shape=shape,
                chunks=[{**d["tensors"][0]["chunks"][0], "offsets": [0] * len(shape), "shape": shape}],
            ),
        )
        refused(ck, CheckpointFormatError)
        target = {"t": torch.zeros(2, 3)}
        with pytest.raises(CheckpointError):
            ckptproto.load_into(ck, target)
    assert allocated == []


def test_F35_nothing_executes_on_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    # interop/ and integrations/ read foreign formats (torch.save files, Lightning hparams)
    # and may unpickle only behind an explicit, loudly named opt-in (allow_pickle=True /
    # --unsafe-allow-pickle); their tests check that the default refuses. They are not on the
    # default path of a ckptproto checkpoint, which is what F-35 is about.
    opt_in_only = {"ckptproto/interop", "ckptproto/integrations", "ckptproto/cli/convert.py"}
    for source in (ROOT / "ckptproto").rglob("*.py"):
        relative = source.relative_to(ROOT)
        if relative.parent.as_posix() in opt_in_only or relative.as_posix() in opt_in_only:
            continue
        text = source.read_text()
        for forbidden in (
            "import pickle",
            "pickle.",
            "torch.load",
            "eval(",
            "exec(",
            "__import__",
            "importlib",
        ):
            # The CLI dispatcher imports its own fixed list of subcommand modules.
            if (
                forbidden == "importlib"
                and source.relative_to(ROOT).as_posix() == "ckptproto/cli/__init__.py"
            ):
                continue
            assert forbidden not in text, f"{forbidden} in {source}"
    ck = save(tmp_path)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling during load")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "load", boom)
    ckptproto.load(ck)
    ckptproto.load(ck, mmap=True)
    ckptproto.verify(ck)
    ckptproto.load_into(ck, _state())
    # A state string that looks like code stays a string.
    ck2 = save(tmp_path, {"s": "__import__('os').system('false')", "b": b"cos\nsystem\n"}, name="code")
    assert ckptproto.load(ck2)["s"].startswith("__import__")


# ---------------------------------------------------------------- PROTOCOL


def test_P1_torch_objects_are_stateful(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    for obj in (model, opt, sched, torch.nn.Sequential(torch.nn.ReLU())):
        assert isinstance(obj, ckptproto.Stateful)
    assert not isinstance({"a": 1}, ckptproto.Stateful) and not isinstance(torch.ones(1), ckptproto.Stateful)
    ckptproto.save(model, tmp_path / "m")
    loaded = ckptproto.load(tmp_path / "m")
    assert list(loaded) == list(model.state_dict())
    fresh = torch.nn.Linear(3, 2)
    ckptproto.load_into(tmp_path / "m", fresh)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True)
    )

    class Counter:
        def __init__(self) -> None:
            self.n, self.calls = 0, []

        def state_dict(self) -> dict[str, Any]:
            return {"n": self.n}

        def load_state_dict(self, state: Any, strict: bool = True) -> None:
            self.calls.append((dict(state), strict))

    c = Counter()
    c.n = 5
    ckptproto.save(c, tmp_path / "c")
    target = Counter()
    ckptproto.load_into(tmp_path / "c", target, strict=False)
    assert target.calls == [({"n": 5}, False)]


def test_P2_nested_statefuls(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    ckptproto.save({"models": {"model": model}, "optimizers": {"opt": opt}}, tmp_path / "ck")
    tree = ckptproto.load(tmp_path / "ck")
    assert torch.equal(tree["models"]["model"]["weight"], model.weight.detach())
    assert tree["optimizers"]["opt"]["param_groups"][0]["lr"] == 0.5
    model2 = torch.nn.Linear(2, 2)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    ckptproto.load_into(tmp_path / "ck", {"models": {"model": model2}, "optimizers": {"opt": opt2}})
    assert torch.equal(model2.weight, model.weight)
    assert opt2.param_groups[0]["lr"] == 0.5
    assert torch.equal(
        opt2.state[model2.weight]["momentum_buffer"], opt.state[model.weight]["momentum_buffer"]
    )


def test_P3_canonical_layout_and_other_sections(tmp_path: Path) -> None:
    state = {
        "trainer": {"global_step": 12, "current_epoch": 3, "callbacks": {"c": {"k": 1}}},
        "models": {},
        "optimizers": {},
        "schedulers": {},
        "dataloaders": {"train": {"pos": 5}},
        "rng": {"seed": 1},
    }
    info = ckptproto.save(state, tmp_path / "a")
    assert (info.step, info.epoch) == (12, 3)
    assert doc_of(tmp_path / "a")["metadata"] == {"step": 12, "epoch": 3}
    assert ckptproto.load(tmp_path / "a") == state
    info = ckptproto.save(state, tmp_path / "b", metadata={"step": 99})
    assert (ckptproto.read_info(tmp_path / "b").step, info.epoch) == (99, 3)
    assert ckptproto.save({"x": 1}, tmp_path / "c").step is None


def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return (
            list(a) == list(b)
            and all(type(k) is type(k2) for k, k2 in zip(a, b, strict=True))
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_P4_plain_leaves_round_trip(tmp_path: Path) -> None:
    leaves = [None, True, False, 0, 1, -1, 2**53, -(2**80), 10**4000, 1.0, -0.0, 1e-320, math.nan, math.inf]
    leaves += [-math.inf, "", "ünï\0", b"", bytes(range(256))]
    state = {f"v{i}": v for i, v in enumerate(leaves)}
    ckptproto.save(state, tmp_path / "ck")
    out = ckptproto.load(tmp_path / "ck")
    assert _same(out, state)


def test_P5_containers_round_trip(tmp_path: Path) -> None:
    state = {
        "z": 1,
        "a": {3: "x", 1: "y", "s": (1, [2, (3,)])},
        "od": OrderedDict([("b", OrderedDict()), ("a", [])]),
        "dollar": {"$torch": 0, "$dict": [1]},
        "empty": ({}, [], ()),
        "neg": {-(2**70): None},
    }
    ckptproto.save(state, tmp_path / "ck")
    assert _same(ckptproto.load(tmp_path / "ck"), state)


def test_P6_tensors_round_trip_bitwise(tmp_path: Path) -> None:
    state: dict[str, Any] = {n: _random_tensor(n) for n in TORCH_DTYPES}
    state["scalar"] = torch.tensor(3.5)
    state["empty"] = torch.empty(0, 4)
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        state[f"np_{name}"] = np.arange(6).astype(name).reshape(2, 3)
    for name in ("float16", "float32", "float64", "complex64", "complex128"):
        state[f"np_{name}"] = np.array([np.nan, -0.0, 1.5]).astype(name)
    ckptproto.save(state, tmp_path / "ck")
    for mmap in (False, True):
        out = ckptproto.load(tmp_path / "ck", mmap=mmap)
        for key, value in state.items():
            got = out[key]
            if isinstance(value, np.ndarray):
                assert type(got) is np.ndarray and got.dtype == value.dtype and got.shape == value.shape
                assert got.tobytes() == value.tobytes(), key
            else:
                assert type(got) is torch.Tensor and got.dtype == value.dtype and got.shape == value.shape
                assert got.device.type == "cpu"
                assert bytes(got.contiguous().untyped_storage()) == bytes(value.untyped_storage()), key


class _Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        ({1, 2}, "set"),
        (object(), "object"),
        (np.float32(1), "float32"),
        (collections.namedtuple("Pair", "a b")(1, 2), "Pair"),
        (_Color.RED, "_Color"),
        (collections.defaultdict(int), "defaultdict"),
        ({(1, 2): 3}, "tuple"),
        ({True: 3}, "bool"),
        ({None: 3}, "NoneType"),
        (np.array(["a"]), "<U1"),
        (np.array([object()]), "object"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "datetime64"),
        (np.zeros(2, dtype=[("a", "i4")]), "('a'"),
        (bytearray(b"x"), "bytearray"),
        (1 + 2j, "complex"),
    ],
)
def test_P7_illegal_values_refused_before_writing(tmp_path: Path, value: Any, type_name: str) -> None:
    state = {"optimizers": {"optimizer": {"param_groups": [{"lr": 0.1, "foo": value}]}}}
    with pytest.raises(UnsupportedValueError) as info:
        ckptproto.save(state, tmp_path / "ck")
    assert info.value.path.startswith("optimizers.optimizer.param_groups.0.foo")
    assert "optimizers.optimizer.param_groups.0.foo" in str(info.value)
    assert type_name in str(info.value)
    assert os.listdir(tmp_path) == []


def test_P7_other_refusals(tmp_path: Path) -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    with pytest.warns(UserWarning):
        quantized = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.quint8)
    with pytest.raises(UnsupportedValueError, match="cycle") as info:
        ckptproto.save({"a": {"b": cycle}}, tmp_path / "cyc")
    assert info.value.path == "a.b.0"
    for i, (state, kw) in enumerate(
        (
            ({"q": quantized}, {}),
            ({"a": 1}, {"metadata": {"t": torch.ones(1)}}),
            ({"a": 1}, {"metadata": {"s": {1, 2}}}),
            ({"x": np.ones(2, dtype=np.longdouble)}, {}),
        )
    ):
        if i == 4 and np.dtype(np.longdouble).itemsize == 8:
            continue  # longdouble is float64 here: legal
        with pytest.raises(UnsupportedValueError):
            ckptproto.save(state, tmp_path / f"ck{i}", **kw)
    with pytest.raises(UnsupportedValueError):
        ckptproto.save([1, 2], tmp_path / "list")  # type: ignore[arg-type]
    # Dict cycles and dicts nested past the limit fail in save's Stateful resolution too
    # (before encoding), for the sync and the async saver alike, naming the path.
    looped: dict[str, Any] = {"x": {}}
    looped["x"]["back"] = looped
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(2000):
        node["d"] = {}
        node = node["d"]
    with ckptproto.AsyncSaver() as saver:
        for name, bad, path_prefix, what in (
            ("loop", looped, "x.back", "cycle"),
            ("deep", {"a": deep}, "a.d.d.d", "deeper"),
            ("surrogate", {"a": {"s": "ok \ud800"}}, "a.s", "surrogate"),
            ("surrogate_key", {"a": {"k\udfff": 1}}, "a.k", "surrogate"),
            ("surrogate_dict_key", {"a": {1: "x", "\ud800": 2}}, "a", "surrogate"),
        ):
            for save_with in (ckptproto.save, lambda s, p: saver.save(s, p).result()):
                with pytest.raises(UnsupportedValueError, match=what) as info:
                    save_with(bad, tmp_path / name)
                assert info.value.path.startswith(path_prefix), info.value.path
                str(info.value).encode("utf-8")  # printable, even when the path is not
        with pytest.raises(UnsupportedValueError, match="surrogate") as info:
            ckptproto.save({"a": 1}, tmp_path / "meta", metadata={"note": "\udc80"})
        assert info.value.path == "metadata.note"
    assert os.listdir(tmp_path) == []


def test_P8_tied_tensors(tmp_path: Path) -> None:
    w = torch.arange(6.0).reshape(2, 3)
    a = np.arange(4)
    state = {"enc": w, "dec": w, "deep": {"x": [w]}, "row": w[0], "flat": w.view(6), "a": a, "a2": a}
    ckptproto.save(state, tmp_path / "ck")
    doc = doc_of(tmp_path / "ck")
    assert len(doc["tensors"]) == 4  # w, w[0], w.view(6), a
    out = ckptproto.load(tmp_path / "ck")
    assert out["enc"] is out["dec"] is out["deep"]["x"][0]
    assert out["a"] is out["a2"]
    assert out["row"] is not out["enc"] and torch.equal(out["row"], w[0])
    # Tied weights as torch hands them out: distinct tensor objects viewing the same memory.
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    sd = tied.state_dict()
    assert sd["0.weight"] is not sd["1.weight"]
    ckptproto.save(sd, tmp_path / "tied")
    assert len(doc_of(tmp_path / "tied")["tensors"]) == 3
    out2 = ckptproto.load(tmp_path / "tied")
    assert out2["0.weight"] is out2["1.weight"]
    out["row"][0] = 100.0
    out["flat"][0] = -1.0
    assert out["enc"][0, 0] == 0.0  # partially overlapping views came back independent
    target = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items() if k != "deep"}
    target["dec"] = target["enc"]
    ckptproto.load_into(tmp_path / "ck", target, strict=False)
    assert torch.equal(target["enc"], w)


def test_P8_conjugate_and_negative_views_are_not_tied(tmp_path: Path) -> None:
    # c.conj() and f._neg_view() share c's/f's memory, offset, shape, strides and dtype but
    # hold other values: written as one tensor they came back as c and f.
    c = torch.tensor([1 + 2j, 3 - 4j, -5 + 0.5j])
    f = torch.tensor([1.0, -2.0, 3.5])
    state = {
        "c": c,
        "cc": c.conj(),
        "cc2": c.conj(),
        "f": f,
        "nf": f._neg_view(),
        "ncc": c.conj()._neg_view(),
    }
    ckptproto.save(state, tmp_path / "ck")
    assert len(doc_of(tmp_path / "ck")["tensors"]) == 5  # c, conj(c), f, -f, -conj(c)
    out = ckptproto.load(tmp_path / "ck")
    for key, value in state.items():
        assert torch.equal(out[key], value.resolve_conj().resolve_neg()), key
    assert out["cc"] is out["cc2"] and out["cc"] is not out["c"]
    assert torch.equal(ckptproto.load(tmp_path / "ck", mmap=True)["nf"], -f)
    target = {k: torch.zeros_like(v.resolve_conj().resolve_neg()) for k, v in state.items()}
    ckptproto.load_into(tmp_path / "ck", target)
    assert torch.equal(target["cc"], c.conj()) and torch.equal(target["nf"], -f)


def test_P9_what_is_not_kept(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.ones(2))
    be = np.arange(3, dtype=">f8")
    ckptproto.save({"p": p, "be": be, "nc": np.arange(6).reshape(2, 3).T}, tmp_path / "ck")
    out = ckptproto.load(tmp_path / "ck")
    assert type(out["p"]) is torch.Tensor and not out["p"].requires_grad and torch.equal(out["p"], p.detach())
    assert out["be"].dtype == np.dtype("<f8") and np.array_equal(out["be"], be)
    assert out["nc"].flags.c_contiguous and np.array_equal(out["nc"], np.arange(6).reshape(2, 3).T)


# ---------------------------------------------------------------- spec and tests stay in step


def test_every_requirement_has_a_test() -> None:
    ids = set()
    for doc in ("FORMAT.md", "PROTOCOL.md"):
        ids |= set(re.findall(r"\*\*\[([FP]-\d+)\]\*\*", (SPEC / doc).read_text()))
    tested = {
        f"{m.group(1)}-{m.group(2)}"
        for m in re.finditer(r"^def test_([FP])(\d+)_", Path(__file__).read_text(), re.MULTILINE)
    }
    assert len(ids) >= 40
    assert ids - tested == set(), f"requirements without a test: {sorted(ids - tested)}"
    assert tested - ids == set(), f"tests citing no requirement: {sorted(tested - ids)}"
