"""Data files written past the page cache (io/direct.py) hold exactly the bytes a buffered
write gives, whatever the alignment of their ranges, and fall back to buffered writes where
direct ones are refused."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptproto
from ckptproto.errors import CheckpointWriteError
from ckptproto.io import direct, writer

# Pieces of odd sizes (ranges start and end off the page boundaries), large enough not to be
# joined (writer.JOIN_BYTES), in a file over the (lowered) threshold.
SIZES = [70_001, 130_003, 4_099, 262_147, 65_537, 99_991]


def _state() -> dict[str, Any]:
    rng = np.random.default_rng(7)
    return {"models": {"m": {f"p{i}": rng.integers(0, 255, n, dtype=np.uint8) for i, n in enumerate(SIZES)}}}


def _data_file(root: Path) -> bytes:
    (name,) = [p for p in os.listdir(root) if p.endswith(".safetensors")]
    return (root / name).read_bytes()


@pytest.fixture
def small_direct(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Direct writes for every file from 128 KiB, through a 16 KiB bounce buffer (several
    chunks a range); returns a list that counts the direct chunks written."""
    monkeypatch.setenv(direct.ENV, "1")
    monkeypatch.setattr(direct, "MIN_BYTES", 128 << 10)
    monkeypatch.setattr(direct, "BOUNCE_BYTES", 16 << 10)
    monkeypatch.setattr(direct, "_local", threading.local())  # buffers of that size
    monkeypatch.setattr(writer, "JOIN_BYTES", 1 << 10)
    monkeypatch.setattr(direct.threads, "BATCH_BYTES", 256 << 10)  # several ranges a file
    chunks: list[int] = []
    real = os.pwrite

    def counting(fd: int, data: Any, offset: int) -> int:
        assert offset % direct.ALIGN == 0 and len(data) % direct.ALIGN == 0
        chunks.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", counting)
    return chunks


def test_direct_writes_give_the_buffered_bytes(
    tmp_path: Path, small_direct: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if direct._in_memory(tmp_path):
        pytest.skip("the temporary directory is on tmpfs: no direct writes there")
    state = _state()
    ckptproto.save(state, tmp_path / "direct")
    assert small_direct, "no range went direct"
    monkeypatch.setenv(direct.ENV, "0")
    ckptproto.save(state, tmp_path / "buffered")
    assert _data_file(tmp_path / "direct") == _data_file(tmp_path / "buffered")
    loaded = ckptproto.load(tmp_path / "direct")
    for key, value in state["models"]["m"].items():
        assert np.array_equal(loaded["models"]["m"][key], value)


def test_a_direct_write_refused_halfway_is_written_buffered(
    tmp_path: Path, small_direct: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if direct._in_memory(tmp_path):
        pytest.skip("the temporary directory is on tmpfs: no direct writes there")
    real = direct.os.pwrite
    refusals: list[int] = []

    def refuse_after_one(fd: int, data: Any, offset: int) -> int:
        if small_direct:  # the first chunk went out; the next aligned write is refused
            refusals.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        small_direct.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", refuse_after_one)
    state = _state()
    ckptproto.save(state, tmp_path / "refused")
    assert small_direct and refusals  # (the I/O threads may each have written a chunk first)
    monkeypatch.setenv(direct.ENV, "0")
    ckptproto.save(state, tmp_path / "buffered")
    assert _data_file(tmp_path / "refused") == _data_file(tmp_path / "buffered")
    ckptproto.verify(tmp_path / "refused")


def test_a_failing_direct_write_fails_the_save_and_commits_nothing(
    tmp_path: Path, small_direct: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if direct._in_memory(tmp_path):
        pytest.skip("the temporary directory is on tmpfs: no direct writes there")

    def broken_disk(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(direct.os, "pwrite", broken_disk)
    with pytest.raises(CheckpointWriteError, match="Input/output error"):
        ckptproto.save(_state(), tmp_path / "ck")
    assert not (tmp_path / "ck").exists()
    assert os.listdir(tmp_path) == []  # the temporary directory is gone too


def test_who_writes_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, only a process that asked (the async writer process) writes direct; the
    environment decides over both; small files and in-memory file systems never do."""
    if direct._in_memory(tmp_path):
        pytest.skip("the temporary directory is on tmpfs: no direct writes there")
    path = tmp_path / "f"
    path.write_bytes(b"")
    big = direct.MIN_BYTES

    def opened(size: int = big) -> bool:
        found = direct.DirectFile.open(path, size)
        if found is not None:
            found.close()
        return found is not None

    monkeypatch.delenv(direct.ENV, raising=False)
    monkeypatch.setattr(direct, "_preferred", False)
    assert not opened()
    in_thread: list[bool] = []

    def asking_thread() -> None:
        direct.prefer(thread=True)
        in_thread.append(opened())

    worker = threading.Thread(target=asking_thread)
    worker.start()
    worker.join()
    assert in_thread == [True] and not opened()  # that thread's files only
    direct.prefer()
    assert opened() and not opened(big - 1)
    monkeypatch.setenv(direct.ENV, "0")
    assert not opened()
    monkeypatch.setattr(direct, "_preferred", False)
    monkeypatch.setenv(direct.ENV, "1")
    assert opened()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and direct._in_memory(shm):
        in_memory = shm / f"ckptproto-direct-{os.getpid()}"
        in_memory.write_bytes(b"")
        try:
            assert direct.DirectFile.open(in_memory, big) is None
        finally:
            in_memory.unlink()


def _cached_fraction(path: Path) -> float:
    """The fraction of ``path``'s pages in the page cache (Linux ``mincore`` of a mapping)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapping:
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vector) != 0:
            pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
        resident = sum(v & 1 for v in vector)
        del address
    return resident / pages


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("writer_mode", ["process", "thread"])
def test_async_saves_write_past_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer_mode: str
) -> None:
    """A blocking save leaves its data file in the page cache; an async save's (direct
    writes, in the writer process or the saver's writer thread) is out of it but for the
    pages at its ranges' ends."""
    torch = pytest.importorskip("torch")
    from ckptproto.io import writer_process

    if direct._in_memory(tmp_path) or (writer_mode == "process" and not writer_process.available()):
        pytest.skip("tmpfs, or no writer process here")
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    monkeypatch.setenv(direct.ENV, "1")
    opened = direct.DirectFile.open(probe, direct.MIN_BYTES)
    if opened is None:
        pytest.skip("this file system gives no O_DIRECT descriptor")
    opened.close()
    probe.unlink()
    monkeypatch.delenv(direct.ENV)
    state = {"m": {f"w{i}": torch.arange(i, i + 1_000_003, dtype=torch.float32) for i in range(4)}}
    ckptproto.save(state, tmp_path / "sync")
    with ckptproto.AsyncSaver(writer=writer_mode) as saver:  # type: ignore[arg-type]
        saver.save(state, tmp_path / "async").result()
    sync_file = next((tmp_path / "sync").glob("*.safetensors"))
    async_file = next((tmp_path / "async").glob("*.safetensors"))
    assert sync_file.stat().st_size > direct.MIN_BYTES
    cached_sync, cached_async = _cached_fraction(sync_file), _cached_fraction(async_file)
    assert cached_sync > 0.9 and cached_async < 0.1, (cached_sync, cached_async)
    assert sync_file.read_bytes() == async_file.read_bytes()
