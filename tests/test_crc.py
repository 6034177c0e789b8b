"""CRC-32 as the readers compute it: ``format.crc.crc32`` (ISA-L's where the ``fastcrc`` extra is
installed, zlib's otherwise) is zlib's CRC-32, and a verified load checks every byte of a file
read in many pieces."""

from __future__ import annotations

import functools
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

import ckptproto
from ckptproto.errors import CheckpointCorruptError
from ckptproto.format import crc, layout
from ckptproto.io import reader


@pytest.mark.parametrize("size", [0, 1, 255, 4099, (1 << 20) + 7])
def test_crc32_is_zlibs(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    view = memoryview(data).cast("B")
    assert crc.crc32(view) == zlib.crc32(view)
    assert crc.crc32(view, 0x1234ABCD) == zlib.crc32(view, 0x1234ABCD)
    half = size // 2
    assert crc.crc32_combine(crc.crc32(view[:half]), crc.crc32(view[half:]), size - half) == zlib.crc32(view)


def test_a_missing_or_wrong_fast_crc_falls_back_to_zlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "isal", None)  # not installed: the import fails
    assert crc._isal_crc32() is None
    assert crc._agreeing(None) is zlib.crc32
    assert crc._agreeing(lambda data, value=0: 0) is zlib.crc32  # never trusted unchecked
    assert crc._agreeing(lambda data, value=0: zlib.crc32(data)) is zlib.crc32  # ignores value
    agrees = functools.partial(zlib.crc32)
    assert crc._agreeing(agrees) is agrees


READERS = {
    "load": lambda p: ckptproto.load(p),
    "load_into": lambda p: ckptproto.load_into(
        p, {"a": np.zeros(10_001, np.float32), "b": np.zeros(3_333, np.float64), "c": np.zeros(77, np.int8)}
    ),
    "verify": lambda p: ckptproto.verify(p),
    "load_mmap_verified": lambda p: ckptproto.load(p, mmap=True, verify=True),
}


@pytest.mark.parametrize("how", sorted(READERS))
def test_every_piece_of_a_file_read_in_pieces_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # Local files are read and checksummed in LOCAL_READ_BYTES pieces by the pool, the CRCs
    # combined; small pieces here make tensors straddle many of them, at odd offsets.
    monkeypatch.setattr(reader, "LOCAL_READ_BYTES", 4096)
    state = {
        "a": np.arange(10_001, dtype=np.float32),
        "b": np.linspace(0, 1, 3_333),
        "c": np.arange(77, dtype=np.int8),
    }
    path = tmp_path / "c"
    ckptproto.save(state, path)
    READERS[how](path)
    data = path / layout.data_file_name(0)
    size = data.stat().st_size
    for at in (size // 3, size // 2 + 4095, size - 1):
        with open(data, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(CheckpointCorruptError, match="checksum"):
            READERS[how](path)
        with open(data, "r+b") as f:
            f.seek(at)
            f.write(byte)
    READERS[how](path)
