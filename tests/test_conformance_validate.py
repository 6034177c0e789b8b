"""Check 10's material: the golden checkpoints, their expected values, and ``validate``,
which must name the MUST of spec/FORMAT.md that a corrupted checkpoint breaks."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptproto
from ckptproto.cli import main
from ckptproto.conformance import golden
from ckptproto.conformance.validate import RULES, validate
from ckptproto.location import Location

ROOT = Path(__file__).resolve().parent.parent


def test_goldens_validate_and_decode_to_expected_values() -> None:
    assert golden.names() == ["plain_and_numpy", "sharded", "torch_dtypes"]
    for name in golden.names():
        assert validate(golden.path(name)) == [], name
        assert golden.check_decoded(name) == [], name
    sharded = json.loads((golden.path("sharded") / "manifest.json").read_text())
    assert len(sharded["files"]) == 3 and sharded["world_size"] == 2
    assert all(len(t["chunks"]) > 1 for t in sharded["tensors"][:3])
    described = {
        d["dtype"] for d in golden.expected()["checkpoints"]["torch_dtypes"]["state"].values() if "dtype" in d
    }
    assert {
        "bfloat16",
        "float8_e4m3fn",
        "float4_e2m1fn_x2",
        "complex32",
        "uint3",
        "bits16",
        "bool",
    } <= described


def test_top_level_golden_dir_is_the_packaged_one() -> None:
    assert (ROOT / "conformance" / "golden").resolve() == golden.GOLDEN_DIR.resolve()


def test_goldens_are_reproduced_byte_for_byte(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_golden", ROOT / "conformance" / "make_golden.py")
    assert spec is not None and spec.loader is not None
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    make_golden.main(tmp_path)
    committed = sorted(p.relative_to(golden.GOLDEN_DIR) for p in golden.GOLDEN_DIR.rglob("*") if p.is_file())
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made == committed
    for rel in committed:
        assert (tmp_path / rel).read_bytes() == (golden.GOLDEN_DIR / rel).read_bytes(), rel


def _copy(tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(golden.path(name), dest)
    return dest


def _edit_manifest(root: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads((root / "manifest.json").read_text())
    edit(doc)
    (root / "manifest.json").write_text(json.dumps(doc))


def _rewrite_file(root: Path, name: str, data: bytes) -> None:
    """Replace a data file and fix its size and checksum, so only the intended rule breaks."""
    (root / name).write_bytes(data)

    def fix(doc: dict[str, Any]) -> None:
        doc["files"][name].update(size=len(data), checksum=f"crc32:{zlib.crc32(data):08x}")

    _edit_manifest(root, fix)


def _flip_data_byte(root: Path) -> None:
    path = root / "data-00000-000.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _rename_header_key(root: Path) -> None:
    name = "data-00000-000.safetensors"
    data = (root / name).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + n].replace(b'"models.grid@0"', b'"models.grid@X"')
    _rewrite_file(root, name, data[:8] + header + data[8 + n :])


def _header_gap(root: Path) -> None:
    name = "data-00000-000.safetensors"
    data = (root / name).read_bytes()
    _rewrite_file(root, name, data + b"\x00" * 8)


def _symlink_data_file(root: Path) -> None:
    name = "data-00000-001.safetensors"
    (root / name).rename(root.parent / "elsewhere.safetensors")
    (root / name).symlink_to(root.parent / "elsewhere.safetensors")


def _pad_with_newlines(root: Path) -> None:
    name = "data-00000-001.safetensors"
    data = (root / name).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8 : 8 + n]
    body = header.rstrip(b" ")
    padded = body + b"\n" * (len(header) - len(body))
    _rewrite_file(root, name, data[:8] + padded + data[8 + n :])


def test_hidden_directory_is_never_a_checkpoint(tmp_path: Path) -> None:
    root = _copy(tmp_path, "sharded")
    hidden = root.rename(tmp_path / ".sharded-tmp")
    assert {v.rule for v in validate(hidden)} == {"F-2"}


CORRUPTIONS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "no manifest": ("F-1", lambda r: (r / "manifest.json").unlink()),
    "file outside the checkpoint": (
        "F-3",
        lambda r: _edit_manifest(
            r,
            lambda d: d["files"].update(
                {"../x.safetensors": {"size": 8, "checksum": "crc32:00000000", "rank": 0}}
            ),
        ),
    ),
    "symlinked data file": ("F-4", _symlink_data_file),
    "manifest not JSON": ("F-6", lambda r: (r / "manifest.json").write_bytes(b'{"format": "ckptproto",')),
    "NaN constant": ("F-6", lambda r: (r / "manifest.json").write_text('{"format": NaN}')),
    "wrong format name": ("F-6", lambda r: _edit_manifest(r, lambda d: d.update(format="other"))),
    "no created field": ("F-7", lambda r: _edit_manifest(r, lambda d: d.pop("created"))),
    "world_size 0": ("F-7", lambda r: _edit_manifest(r, lambda d: d.update(world_size=0))),
    "negative rank": (
        "F-8",
        lambda r: _edit_manifest(r, lambda d: d["files"]["data-00001-000.safetensors"].update(rank=-1)),
    ),
    "data file missing": ("F-8", lambda r: (r / "data-00000-001.safetensors").unlink()),
    "data file truncated": (
        "F-8",
        lambda r: (r / "data-00001-000.safetensors").write_bytes(
            (r / "data-00001-000.safetensors").read_bytes()[:-4]
        ),
    ),
    "unknown dtype": ("F-9", lambda r: _edit_manifest(r, lambda d: d["tensors"][0].update(dtype="float128"))),
    "chunk outside the tensor": (
        "F-10",
        lambda r: _edit_manifest(r, lambda d: d["tensors"][1]["chunks"][0].update(offsets=[9])),
    ),
    "chunk dropped": ("F-11", lambda r: _edit_manifest(r, lambda d: d["tensors"][0]["chunks"].pop())),
    "chunk used twice": (
        "F-12",
        lambda r: _edit_manifest(
            r, lambda d: d["tensors"][3]["chunks"][0].update(d["tensors"][1]["chunks"][1])
        ),
    ),
    "chunk key not in the header": ("F-13", _rename_header_key),
    "reference past the tensors": (
        "F-14",
        lambda r: _edit_manifest(r, lambda d: d["state"].update(x={"$torch": 99})),
    ),
    "torch and numpy reference": (
        "F-14",
        lambda r: _edit_manifest(r, lambda d: d["state"].update(x={"$torch": 0})),
    ),
    "tensor in the metadata": (
        "F-15",
        lambda r: _edit_manifest(r, lambda d: d["metadata"].update(w={"$numpy": 0})),
    ),
    "big int as a JSON number": ("F-16", lambda r: _edit_manifest(r, lambda d: d["state"].update(x=2**60))),
    "small int as $int": ("F-16", lambda r: _edit_manifest(r, lambda d: d["state"].update(x={"$int": "5"}))),
    "unknown tag in the state": (
        "F-17",
        lambda r: _edit_manifest(r, lambda d: d["state"].update(x={"$set": [1]})),
    ),
    "malformed $bytes": (
        "F-18",
        lambda r: _edit_manifest(r, lambda d: d["state"].update(x={"$bytes": "!!"})),
    ),
    "header length past the file": (
        "F-22",
        lambda r: _rewrite_file(r, "data-00000-001.safetensors", struct.pack("<Q", 1 << 20) + b"{}      "),
    ),
    "trailing bytes after the tensors": ("F-22", _header_gap),
    "header padded with newlines": ("F-23", _pad_with_newlines),
    "flipped data byte": ("F-26", _flip_data_byte),
    "upper-case checksum": (
        "F-26",
        lambda r: _edit_manifest(
            r, lambda d: d["files"]["data-00000-000.safetensors"].update(checksum="crc32:ABCDEF12")
        ),
    ),
    "malformed version": ("F-31", lambda r: _edit_manifest(r, lambda d: d.update(format_version="1"))),
    "format major 2": ("F-32", lambda r: _edit_manifest(r, lambda d: d.update(format_version="2.0"))),
    "65 dimensions": ("F-33", lambda r: _edit_manifest(r, lambda d: d["tensors"][3].update(shape=[1] * 65))),
    "manifest byte damaged under its checksum": (
        "F-36",
        lambda r: (r / "manifest.json").write_bytes(
            (r / "manifest.json").read_bytes().replace(b'"world_size":2', b'"world_size":3')
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_golden_fails_with_the_must_it_breaks(case: str, tmp_path: Path) -> None:
    rule, corrupt = CORRUPTIONS[case]
    root = _copy(tmp_path, "sharded")
    corrupt(root)
    found = validate(root)
    assert rule in {v.rule for v in found}, [str(v) for v in found]
    assert all(v.rule in RULES for v in found)


def test_validate_cli_names_the_rule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = golden.path("plain_and_numpy")
    bad = _copy(tmp_path, "plain_and_numpy")
    _flip_data_byte(bad)
    report = tmp_path / "report.json"
    assert main(["validate", str(good), str(bad), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert f"VALID   {good}" in out and f"INVALID {bad}" in out
    assert "[F-26] data-00000-000.safetensors: CRC-32 is" in out
    findings = json.loads(report.read_text())
    assert findings[str(good)] == [] and findings[str(bad)][0]["rule"] == "F-26"
    assert main(["validate", str(good)]) == 0


def test_reader_value_mismatch_is_reported_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte changed consistently (checksum fixed) still validates, but no longer decodes to
    the expected values: the decode half of check 10 names the path."""
    root = _copy(tmp_path, "plain_and_numpy")
    name = "data-00000-000.safetensors"
    data = bytearray((root / name).read_bytes())
    data[-1] ^= 0x01
    _rewrite_file(root, name, bytes(data))
    assert validate(root) == []
    monkeypatch.setattr(golden, "GOLDEN_DIR", tmp_path)
    monkeypatch.setattr(
        golden,
        "expected",
        lambda: json.loads((ROOT / "conformance" / "golden" / "expected.json").read_text()),
    )
    problems = golden.check_decoded("plain_and_numpy")
    assert len(problems) == 1 and problems[0].path.startswith("golden/plain_and_numpy:numpy.")


def test_rule_ids_are_the_specs_musts() -> None:
    """Every id validate reports is a numbered MUST of spec/FORMAT.md (once the spec is here)."""
    spec = ROOT / "spec" / "FORMAT.md"
    if not spec.exists():
        pytest.skip("spec/FORMAT.md is not in this checkout")
    import re

    text = spec.read_text(encoding="utf-8")
    items = dict(re.findall(r"\*\*\[(F-\d+)\]\*\*(.*?)(?=\n- \*\*\[F-|\n## |\Z)", text, flags=re.S))
    for rule in RULES:
        assert rule in items, f"{rule} is not in spec/FORMAT.md"
        assert "MUST" in items[rule], f"{rule} is not a MUST in spec/FORMAT.md"
    assert all(c[0] in RULES for c in CORRUPTIONS.values())
    assert {c[0] for c in CORRUPTIONS.values()} | {"F-2"} == set(RULES), "every rule needs a corruption test"


def test_without_torch_torch_goldens_are_skipped_not_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto import arrays
    from ckptproto.conformance import run_conformance
    from ckptproto.errors import CheckpointError

    def no_torch() -> None:
        raise CheckpointError("no torch here")

    monkeypatch.setattr(arrays, "require_torch", no_torch)
    with pytest.raises(golden.NeedsTorch):
        golden.check_decoded("torch_dtypes")
    assert golden.check_decoded("plain_and_numpy") == []
    report = run_conformance("examples.adapters.numpy_trainer:NumpyAdapter", only=["format_conformance"])
    result = report.result("format_conformance")
    assert result.status == "pass", result.summary
    assert (
        "1 golden checkpoints decode" in result.summary
        and "sharded, torch_dtypes need torch" in result.summary
    )


def _many_chunks(root: Path, n: int, overlap: bool = False) -> Path:
    """A uint8 [n] tensor in n one-element chunks (the F-33 maximum is 65,536)."""
    root.mkdir()
    header = {f"k{i}": {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i in range(n)}
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    data = struct.pack("<Q", len(text)) + text + bytes(n)
    name = "data-00000-000.safetensors"
    (root / name).write_bytes(data)
    chunks = [{"file": name, "key": f"k{i}", "offsets": [i], "shape": [1]} for i in range(n)]
    if overlap:
        chunks[-1]["offsets"] = [n // 2]
    doc = {
        "format": "ckptproto",
        "format_version": "1.0",
        "created": "",
        "writer": "test",
        "world_size": 1,
        "metadata": {},
        "files": {name: {"size": len(data), "checksum": f"crc32:{zlib.crc32(data):08x}", "rank": 0}},
        "tensors": [{"dtype": "uint8", "shape": [n], "chunks": chunks}],
        "state": {"t": {"$numpy": 0}},
    }
    (root / "manifest.json").write_text(json.dumps(doc))
    return root


def test_validate_checks_65536_chunks_without_comparing_every_pair(tmp_path: Path) -> None:
    """Hostile but legal: the most chunks F-33 allows. Comparing all pairs took hours; run
    in a child so a regression fails the test (the timeout is a hang guard, not a timing)."""
    import subprocess
    import sys

    good = _many_chunks(tmp_path / "good", 65_536)
    bad = _many_chunks(tmp_path / "bad", 65_536, overlap=True)
    code = (
        "import sys, json\n"
        "from ckptproto.conformance.validate import validate\n"
        "print(json.dumps([[v.rule for v in validate(p)] for p in sys.argv[1:]]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(good), str(bad)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    assert json.loads(proc.stdout) == [[], ["F-11"]]


def test_validate_reads_every_backend(checkpoint_root: Location, capsys: pytest.CaptureFixture[str]) -> None:
    # local: the raw files; object stores: one pinned generation through the storage
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "step": 3, "nested": {"b": np.ones(2)}}
    ckptproto.save(state, str(checkpoint_root / "ok"), metadata={"step": 3})
    assert validate(checkpoint_root / "ok") == []
    assert validate(str(checkpoint_root / "ok")) == []
    missing = validate(checkpoint_root / "missing")
    assert [v.rule for v in missing] == ["F-1"] and missing[0].error == "CheckpointNotFoundError"
    assert main(["validate", str(checkpoint_root / "ok")]) == 0
    assert f"VALID   {checkpoint_root / 'ok'}" in capsys.readouterr().out
