"""The read half of the storage seam: load, load_into, verify and read_info reach a
checkpoint's bytes only through ``Storage.open`` -> ``Generation`` -> ``StoredFile`` (as the
save pipeline writes only through ``Storage``, tests/test_storage.py), so an object-store
backend serves every read by implementing that protocol alone."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptproto
from ckptproto.errors import CheckpointCorruptError
from ckptproto.format import layout
from ckptproto.io import backends, local_storage
from ckptproto.io.storage import Generation, StoredFile
from ckptproto.location import Location, ObjectLocation

DATA = layout.data_file_name(0)
_depth = threading.local()


@contextmanager
def _inside() -> Iterator[None]:
    """Marks the storage's own code: file-system calls are allowed there, nowhere else."""
    _depth.n = getattr(_depth, "n", 0) + 1
    try:
        yield
    finally:
        _depth.n -= 1


class _File:
    def __init__(self, inner: StoredFile, calls: list[str], mappable: bool) -> None:
        self.inner, self.calls, self.mappable = inner, calls, mappable
        self.name, self.size = inner.name, inner.size

    def read_into(self, offset: int, views: Sequence[memoryview]) -> int:
        self.calls.append(f"read_into {self.name}")
        with _inside():
            return self.inner.read_into(offset, views)

    def fileno(self) -> int | None:
        self.calls.append(f"fileno {self.name}")
        return self.inner.fileno() if self.mappable else None

    def close(self) -> None:
        self.calls.append(f"close {self.name}")
        with _inside():
            self.inner.close()


class _Generation:
    def __init__(self, inner: Generation, location: Location, calls: list[str], mappable: bool) -> None:
        self.inner, self.location, self.calls, self.mappable = inner, location, calls, mappable

    def read_manifest(self) -> bytes:
        self.calls.append("read_manifest")
        with _inside():
            return self.inner.read_manifest()

    def open_file(self, name: str) -> StoredFile:
        self.calls.append(f"open_file {name}")
        with _inside():
            return _File(self.inner.open_file(name), self.calls, self.mappable)

    def replaced(self) -> bool:
        self.calls.append("replaced")
        with _inside():
            return self.inner.replaced()

    def close(self) -> None:
        self.calls.append("close generation")
        with _inside():
            self.inner.close()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Recording(local_storage.LocalStorage):
    """The local backend, recording every read call; ``mappable=False`` hides the file
    descriptors as an object store has none; ``root`` serves ``s3://bucket/...`` from a
    local directory (a stand-in object store)."""

    def __init__(self, *, mappable: bool = True, root: Path | None = None) -> None:
        self.calls: list[str] = []
        self.mappable, self.root = mappable, root

    def open(self, location: Location) -> Generation:
        self.calls.append("open")
        local = self.root / location.key if isinstance(location, ObjectLocation) and self.root else location
        with _inside():
            return _Generation(super().open(local), location, self.calls, self.mappable)


def _guard(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every open/preadv made outside the storage's code."""
    strays: list[str] = []
    for name in ("open", "preadv", "pread", "read"):
        real = getattr(os, name)

        def guarded(*args: Any, _real: Callable[..., Any] = real, _name: str = name, **kwargs: Any) -> Any:
            if not getattr(_depth, "n", 0):
                strays.append(f"os.{_name}{args[:1]}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, guarded)
    return strays


def _state() -> dict[str, Any]:
    return {
        "w": np.arange(1000, dtype=np.float32),
        "b": np.full((3, 4), 7, dtype=np.int16),
        "trainer": {"global_step": 5},
    }


def _check(state: dict[str, Any]) -> None:
    assert np.array_equal(np.asarray(state["w"]), np.arange(1000, dtype=np.float32))
    assert np.array_equal(np.asarray(state["b"]), np.full((3, 4), 7, dtype=np.int16))
    assert state["trainer"]["global_step"] == 5


def _flip_last_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))


def _load_into(path: str | Path) -> None:
    target: dict[str, Any] = {
        "w": np.zeros(1000, dtype=np.float32),
        "b": np.zeros((3, 4), dtype=np.int16),
        "trainer": {"global_step": 0},
    }
    ckptproto.load_into(path, target)
    _check(target)


READERS: dict[str, Callable[[Path], None]] = {
    "load": lambda p: _check(ckptproto.load(p)),
    "load_mmap": lambda p: _check(ckptproto.load(p, mmap=True)),
    "load_mmap_verified": lambda p: _check(ckptproto.load(p, mmap=True, verify=True)),
    "load_into": _load_into,
    "verify": lambda p: None if ckptproto.verify(p).step == 5 else pytest.fail("step"),
    "read_info": lambda p: None if ckptproto.read_info(p).step == 5 else pytest.fail("step"),
}


@pytest.mark.parametrize("how", sorted(READERS))
def test_every_read_goes_through_the_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # Was: the readers opened the directory and its files with os.open/preadv themselves.
    path = tmp_path / "c"
    ckptproto.save(_state(), path)
    storage = _Recording()
    monkeypatch.setattr(backends, "LOCAL", storage)
    strays = _guard(monkeypatch)
    READERS[how](path)
    monkeypatch.undo()
    assert strays == [], "file-system calls outside the storage"
    assert storage.calls[:2] == ["open", "read_manifest"]
    assert storage.calls[-1] == "close generation" and storage.calls.count("open") == 1
    if how == "read_info":
        assert storage.calls == ["open", "read_manifest", "close generation"]
        return
    assert f"open_file {DATA}" in storage.calls and storage.calls.count(f"close {DATA}") == 1
    assert f"read_into {DATA}" in storage.calls  # header, data or checksum
    assert (f"fileno {DATA}" in storage.calls) == how.startswith("load_mmap")


def test_mmap_load_without_a_descriptor_reads_into_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c"
    ckptproto.save(_state(), path)
    storage = _Recording(mappable=False)
    monkeypatch.setattr(backends, "LOCAL", storage)
    state = ckptproto.load(path, mmap=True)
    _check(state)
    reads = storage.calls.count(f"read_into {DATA}")
    assert f"fileno {DATA}" in storage.calls and reads >= 2  # the header, then the tensors
    state["w"][0] = 42.0  # its own memory: the file is untouched
    _check(ckptproto.load(path, mmap=True))
    # Read into memory, a damaged file is still caught when verification is asked for.
    _flip_last_byte(path / DATA)
    with pytest.raises(CheckpointCorruptError, match=f"{DATA}: checksum"):
        ckptproto.load(path, mmap=True, verify=True)


def test_a_url_location_flows_through_to_its_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Was: OpenCheckpoint refused any ObjectLocation ("reading from object stores is not wired yet").
    ckptproto.save(_state(), tmp_path / "c")
    storage = _Recording(mappable=False, root=tmp_path)
    monkeypatch.setattr(backends, "_object_storage", lambda location: storage)
    _check(ckptproto.load("s3://bucket/c"))
    _check(ckptproto.load("s3://bucket/c", mmap=True))
    _load_into("s3://bucket/c")
    assert ckptproto.verify("s3://bucket/c").step == 5
    assert ckptproto.read_info("s3://bucket/c").path == ObjectLocation("s3", "bucket", "c")
    _flip_last_byte(tmp_path / "c" / DATA)
    with pytest.raises(CheckpointCorruptError, match=f"s3://bucket/c/{DATA}: checksum"):
        ckptproto.load("s3://bucket/c")
