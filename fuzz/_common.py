"""Shared setup of the atheris harnesses: one valid checkpoint to mutate, and the readers."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

import ckptproto
from ckptproto.format.crc import format_checksum
from ckptproto.format.manifest import CHECKSUM_KEY

WORK = Path(tempfile.mkdtemp(prefix="ckptproto-fuzz-"))
BASE = WORK / "base"
ckptproto.save(
    {"a": np.arange(5), "m": {"b": np.ones((2, 3), np.float32)}, "trainer": {"global_step": 3}}, BASE
)
DOC: dict[str, Any] = json.loads((BASE / "manifest.json").read_text())
del DOC[CHECKSUM_KEY]  # fuzzed manifests must get past the checksum to reach validation
DOC["writer"] = "fuzz"
DATA_NAME = next(iter(DOC["files"]))
DATA = (BASE / DATA_NAME).read_bytes()
TARGET = WORK / "ckpt"


def write(manifest: bytes, data: bytes) -> Path:
    if TARGET.exists():
        shutil.rmtree(TARGET)
    TARGET.mkdir()
    (TARGET / DATA_NAME).write_bytes(data)
    (TARGET / "manifest.json").write_bytes(manifest)
    return TARGET


def manifest_for(data: bytes) -> bytes:
    """The base manifest, agreeing with ``data``'s size and CRC."""
    doc = json.loads(json.dumps(DOC))
    doc["files"][DATA_NAME]["size"] = max(len(data), 8)
    doc["files"][DATA_NAME]["checksum"] = format_checksum(zlib.crc32(data))
    return json.dumps(doc).encode()


def read_all(path: Path) -> None:
    """Every reader; only CheckpointError may come out (anything else is a finding)."""
    target = {"a": np.zeros(5, np.int64), "m": {"b": np.zeros((2, 3), np.float32)}}
    for call in (
        ckptproto.read_manifest,
        ckptproto.verify,
        ckptproto.load,
        lambda p: ckptproto.load(p, mmap=True, verify=True),
        lambda p: ckptproto.load_into(p, target, strict=False),
    ):
        with contextlib.suppress(ckptproto.CheckpointError):
            call(path)


def splice(base: bytes, data: bytes) -> bytes:
    """``base`` with a stretch replaced by ``data[4:]`` (position and length from ``data[:4]``),
    so most inputs stay close to a valid file and reach the deeper checks."""
    if len(data) < 4:
        return base
    at = int.from_bytes(data[:2], "little") % (len(base) + 1)
    cut = data[2] % 64
    return base[:at] + data[4:] + base[at + cut :]
