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


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.EFAULT])
def test_a_direct_write_refused_halfway_is_written_buffered(
    tmp_path: Path, small_direct: list[int], monkeypatch: pytest.MonkeyPatch, refusal: int
) -> None:
    """EINVAL: the file system refuses aligned direct writes; EFAULT: memory a write from a
    piece's own memory cannot take (managed memory). Either way the range goes buffered."""
    if direct._in_memory(tmp_path):
        pytest.skip("the temporary directory is on tmpfs: no direct writes there")
    real = direct.os.pwrite
    refusals: list[int] = []

    def refuse_after_one(fd: int, data: Any, offset: int) -> int:
        if small_direct:  # the first chunk went out; the next aligned write is refused
            refusals.append(offset)
            raise OSError(refusal, os.strerror(refusal))
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


def _direct_descriptor(path: Path) -> direct.DirectFile:
    """An O_DIRECT descriptor of ``path`` (created), or a skip where there is none."""
    if not hasattr(os, "O_DIRECT") or direct._in_memory(path.parent):
        pytest.skip("no O_DIRECT here (platform or tmpfs)")
    path.write_bytes(b"")
    try:
        return direct.DirectFile(os.open(path, os.O_WRONLY | os.O_DIRECT))
    except OSError as exc:
        pytest.skip(f"this file system gives no O_DIRECT descriptor: {exc}")


def test_pieces_at_their_files_page_offset_are_written_from_their_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Of a range's pieces, those lying at the same offset in a page as in the file go out
    from their own memory (their page-aligned part); the rest, and the parts before and after,
    through the bounce buffer: the file holds every byte as a buffered write gives it."""
    import mmap

    page = direct.ALIGN
    memory = mmap.mmap(-1, 64 * page)  # page-aligned
    whole = np.frombuffer(memory, dtype=np.uint8)
    whole[:] = np.random.default_rng(3).integers(0, 255, whole.size, dtype=np.uint8)
    raw = memoryview(memory)
    offset = 3 * page + 100  # the range starts inside a page
    # In file order, from ``offset``: congruent (starts at offset 100 in its page, as the
    # file position does), then one off by 8 bytes, then congruent again (the bytes before it
    # moved it to a page offset it has in memory too), then a short congruent one.
    pieces = [
        raw[100 : 100 + 20 * page],  # file 3p+100 .. 23p+100, memory 100 .. 20p+100
        raw[30 * page + 108 : 30 * page + 108 + 5 * page],  # file 23p+100, memory offset 108
        raw[40 * page + 100 : 40 * page + 100 + 17 * page + 50],  # file 28p+100: congruent
        raw[20 * page + 150 : 20 * page + 150 + 3 * page],  # file 45p+150: congruent, its
    ]  # aligned part (45p+150 .. 48p, where the range's last page boundary is) under 4 pages
    expected = b"".join(bytes(p) for p in pieces)
    monkeypatch.setattr(direct, "MIN_BYTES", page)
    monkeypatch.setattr(direct, "IN_PLACE_MIN", 4 * page)
    monkeypatch.setattr(direct, "BOUNCE_BYTES", 2 * page)
    monkeypatch.setattr(direct, "_local", threading.local())
    # The range's interior: file offsets 4p .. 48p, as positions in the pieces' bytes
    in_place = direct._in_place(pieces, page - 100, 45 * page - 100, offset)
    assert [(begin, end) for begin, end, _ in in_place] == [
        (page - 100, 20 * page - 100),  # the first piece's aligned part: file 4p .. 23p
        (26 * page - 100, 42 * page - 100),  # the third's: file 29p .. 45p
    ]
    path = tmp_path / "f"
    descriptor = _direct_descriptor(path)
    fd = os.open(path, os.O_WRONLY)
    written: list[tuple[int, int]] = []
    real = os.pwrite

    def recording(fd: int, data: Any, at: int) -> int:
        written.append((at, len(data)))
        return real(fd, data, at)

    monkeypatch.setattr(direct.os, "pwrite", recording)
    try:
        assert descriptor.write(fd, offset, pieces)
    finally:
        descriptor.close()
        os.close(fd)
    assert path.read_bytes()[offset:] == expected
    assert (4 * page, 19 * page) in written and (29 * page, 16 * page) in written  # as they lie
    bounced = [(at, n) for at, n in written if (at, n) not in ((4 * page, 19 * page), (29 * page, 16 * page))]
    assert sum(n for _, n in bounced) == 44 * page - 35 * page  # the interior's other pages
    assert all(n <= 2 * page for _, n in bounced)  # a bounce buffer at a time


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_an_async_save_of_page_sized_tensors_copies_nothing_into_the_bounce_buffer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The saver's staging slab starts on a page and a data file's buffer of 4 MiB or more
    does too, so tensors whose sizes are multiples of a page are written from the slab: no
    byte goes through the bounce buffer, and the checkpoint loads back the same."""
    torch = pytest.importorskip("torch")
    probe = _direct_descriptor(tmp_path / "probe")
    probe.close()
    (tmp_path / "probe").unlink()
    bounced: list[int] = []
    real = direct.DirectFile._bounced

    def counting(self: direct.DirectFile, views: Any, start: int, stop: int, at: int) -> None:
        bounced.append(stop - start)
        real(self, views, start, stop, at)

    from_memory: list[int] = []
    real_in_place = direct._in_place

    def listing(*args: Any) -> Any:
        found = real_in_place(*args)
        from_memory.extend(end - begin for begin, end, _ in found)
        return found

    monkeypatch.setattr(direct.DirectFile, "_bounced", counting)
    monkeypatch.setattr(direct, "_in_place", listing)
    monkeypatch.setenv(direct.ENV, "1")
    g = torch.Generator().manual_seed(0)
    state = {"m": {f"w{i}": torch.randn(1 << 18, generator=g) for i in range(6)}}  # 1 MiB each
    with ckptproto.AsyncSaver(writer="thread") as saver:
        saver.save(state, tmp_path / "ck").result()
    assert sum(from_memory) == 6 << 20 and sum(bounced) == 0
    loaded = ckptproto.load(tmp_path / "ck")
    for key, value in state["m"].items():
        assert torch.equal(loaded["m"][key], value)
