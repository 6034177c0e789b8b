"""load(mmap=True): tensors backed by the data file (no up-front read), copy-on-write."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_same

import ckptproto

DATA = "data-00000-000.safetensors"


def _rchar() -> int:
    """Bytes this process has read through read()/pread() so far (not counting page faults)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_mmap_values_equal(tmp_ckpt: Path) -> None:
    state = {
        "f32": torch.randn(5, 7),
        "bf16": torch.randn(3, 3).to(torch.bfloat16),
        "f8": torch.randn(9).to(torch.float8_e4m3fn),
        "c128": torch.randn(4, dtype=torch.complex128),
        "np": np.arange(10, dtype=np.uint16),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "odd": torch.arange(3, dtype=torch.int8),  # leaves the next tensor unaligned if it came next
        "i64": torch.arange(5),
        "plain": [1, "x", None],
    }
    ckptproto.save(state, tmp_ckpt)
    loaded = ckptproto.load(tmp_ckpt, mmap=True)
    assert_same(state, loaded)


def test_mmap_reads_nothing_up_front(tmp_ckpt: Path) -> None:
    size = 64 << 20
    ckptproto.save({f"w{i}": torch.ones(size // 4 // 8) for i in range(8)}, tmp_ckpt)
    before = _rchar()
    state = ckptproto.load(tmp_ckpt, mmap=True)
    read_mmap = _rchar() - before
    assert read_mmap < size // 100, f"mmap load read {read_mmap} bytes of {size}"
    assert float(state["w3"][-1]) == 1.0  # touching a value pages it in lazily
    before = _rchar()
    ckptproto.load(tmp_ckpt)
    assert _rchar() - before >= size  # the ordinary load does read every byte


def test_mmap_tensors_are_copy_on_write(tmp_ckpt: Path) -> None:
    ckptproto.save({"t": torch.zeros(1024), "a": np.zeros(16, dtype=np.float64)}, tmp_ckpt)
    before = (tmp_ckpt / DATA).read_bytes()
    state = ckptproto.load(tmp_ckpt, mmap=True)
    state["t"].add_(1.0)
    state["a"][:] = 7.0
    assert float(state["t"].sum()) == 1024.0 and state["a"].sum() == 112.0
    del state
    assert (tmp_ckpt / DATA).read_bytes() == before
    ckptproto.verify(tmp_ckpt)
    again = ckptproto.load(tmp_ckpt, mmap=True)
    assert float(again["t"].sum()) == 0.0


def test_mmap_survives_the_checkpoint_being_replaced(tmp_ckpt: Path) -> None:
    ckptproto.save({"t": torch.full((256,), 1.0)}, tmp_ckpt)
    state = ckptproto.load(tmp_ckpt, mmap=True)
    ckptproto.save({"t": torch.full((256,), 2.0)}, tmp_ckpt, overwrite=True)
    assert float(state["t"].sum()) == 256.0  # the old inode stays mapped
    assert float(ckptproto.load(tmp_ckpt, mmap=True)["t"].sum()) == 512.0


def test_mmap_with_map_location(tmp_ckpt: Path) -> None:
    ckptproto.save({"t": torch.arange(4.0)}, tmp_ckpt)
    t = ckptproto.load(tmp_ckpt, mmap=True, map_location="cpu")["t"]
    assert torch.equal(t, torch.arange(4.0))


def _sparse_checkpoint(root: Path, nbytes: int) -> Path:
    """A checkpoint of one uint8 array of ``nbytes`` zeros in a sparse data file (no disk)."""
    import json
    import os
    import struct

    root.mkdir()
    header = json.dumps({"t": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-(8 + len(header)) % 8)
    data = root / DATA
    data.write_bytes(struct.pack("<Q", len(header)) + header)
    os.truncate(data, 8 + len(header) + nbytes)
    chunk = {"file": DATA, "key": "t", "offsets": [0], "shape": [nbytes]}
    manifest = {
        "format": "ckptproto",
        "format_version": "1.0",
        "files": {DATA: {"size": data.stat().st_size, "checksum": "crc32:00000000", "rank": 0}},
        "tensors": [{"dtype": "uint8", "shape": [nbytes], "chunks": [chunk]}],
        "state": {"t": {"$numpy": 0}},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_mmap_of_a_checkpoint_larger_than_memory(tmp_path: Path) -> None:
    """A private map reserves no memory for pages never written (MAP_NORESERVE): a 1 TiB
    array maps on a machine with far less memory; writes are private, reads see the file."""
    import os

    try:
        ck = _sparse_checkpoint(tmp_path / "big", 2**40)
    except OSError as exc:  # a file system without sparse files this large
        pytest.skip(f"no 1 TiB sparse file here: {exc}")
    t = ckptproto.load(ck, mmap=True)["t"]
    assert t.shape == (2**40,) and t[0] == 0 and t[-1] == 0
    t[7] = 9  # copy on write: this page only
    assert t[7] == 9
    with open(ck / DATA, "rb") as f:
        f.seek(os.path.getsize(ck / DATA) - 2**40 + 7)
        assert f.read(1) == b"\0"


def test_mmap_failure_is_a_checkpoint_error(tmp_path: Path, monkeypatch: Any) -> None:
    import mmap

    ck = _sparse_checkpoint(tmp_path / "ck", 64)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(ckptproto.CheckpointError, match="mmap=False"):
        ckptproto.load(ck, mmap=True)
