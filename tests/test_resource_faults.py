"""Resource faults: disk full, read-only and immutable directories, missing directories, paths
that are files. Every one gives a clear CheckpointError subclass, leaves the checkpoints
already there intact, and leaves no temporary directory behind.

Disk full runs on a real 2 MiB tmpfs mounted by the test when mounting is permitted (root),
and always also through an injected ENOSPC (``os.pwritev``), at every write of a save.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptproto
from ckptproto.format import layout


def _try(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def assert_clean(parent: Path) -> None:
    leftovers = [n for n in os.listdir(parent) if layout.is_leftover(n)]
    assert leftovers == [], f"temporary directories left behind: {leftovers}"


def small_state(step: int) -> dict[str, Any]:
    return {"w": np.full(1000, step, dtype=np.float32), "trainer": {"global_step": step}}


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if not _try(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)]):
        pytest.skip("cannot mount a tmpfs here (not root / no CAP_SYS_ADMIN); injected ENOSPC still runs")
    try:
        yield mnt
    finally:
        _try(["umount", "-l", str(mnt)])


def test_disk_full_on_a_real_tmpfs(tiny_tmpfs: Path) -> None:
    good = ckptproto.save(small_state(1), tiny_tmpfs / "step_1")
    big = {"w": np.ones(1 << 20, dtype=np.float32), "trainer": {"global_step": 2}}  # 4 MiB > 2 MiB
    with pytest.raises(ckptproto.CheckpointWriteError, match="No space left") as info:
        ckptproto.save(big, tiny_tmpfs / "step_2")
    assert "step_2" in str(info.value)
    assert not (tiny_tmpfs / "step_2").exists()
    assert_clean(tiny_tmpfs)
    ckptproto.verify(good.path)
    # overwrite=True on a full disk keeps the old checkpoint
    with pytest.raises(ckptproto.CheckpointWriteError):
        ckptproto.save(big, tiny_tmpfs / "step_1", overwrite=True)
    assert ckptproto.load(tiny_tmpfs / "step_1")["trainer"]["global_step"] == 1
    assert_clean(tiny_tmpfs)
    # and the space is given back: a normal save fits again
    ckptproto.save(small_state(3), tiny_tmpfs / "step_3")
    ckptproto.verify(tiny_tmpfs / "step_3")


def test_disk_full_during_async_save(tiny_tmpfs: Path) -> None:
    ckptproto.save(small_state(1), tiny_tmpfs / "step_1")
    big = {"w": np.ones(1 << 20, dtype=np.float32)}
    with ckptproto.AsyncSaver() as saver:
        fut = saver.save(big, tiny_tmpfs / "step_2")
        with pytest.raises(ckptproto.CheckpointWriteError):
            fut.result(timeout=60)
    assert_clean(tiny_tmpfs)
    ckptproto.verify(tiny_tmpfs / "step_1")


def _count_writes(tmp_path: Path) -> int:
    calls = [0]
    real = os.pwritev

    def counting(*args: Any) -> int:
        calls[0] += 1
        return real(*args)

    os.pwritev = counting
    try:
        ckptproto.save(small_state(0), tmp_path / "probe", overwrite=True)
    finally:
        os.pwritev = real
    return calls[0]


def test_injected_enospc_at_every_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC from each pwritev call in turn (data header, tensor bytes, manifest)."""
    parent = tmp_path / "ckpts"
    good = ckptproto.save(small_state(1), parent / "step_1")
    writes = _count_writes(tmp_path)
    assert writes >= 2  # data file and manifest at least
    real = os.pwritev
    for fail_at in range(1, writes + 1):
        calls = [0]

        def failing(fd: int, buffers: Any, offset: int, _at: int = fail_at, calls: list[int] = calls) -> int:
            calls[0] += 1
            if calls[0] == _at:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "pwritev", failing)
        for target, overwrite in ((parent / "step_2", False), (parent / "step_1", True)):
            calls[0] = 0
            with pytest.raises(ckptproto.CheckpointWriteError, match="No space left"):
                ckptproto.save(small_state(2), target, overwrite=overwrite)
            assert not (parent / "step_2").exists()
            assert_clean(parent)
        monkeypatch.setattr(os, "pwritev", real)
        info = ckptproto.verify(good.path)
        assert info.step == 1


def test_enospc_on_fsync_is_a_write_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = ckptproto.save(small_state(1), tmp_path / "step_1")
    real = os.fsync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(ckptproto.CheckpointWriteError, match="I/O error"):
        ckptproto.save(small_state(2), tmp_path / "step_2")
    monkeypatch.setattr(os, "fsync", real)
    assert not (tmp_path / "step_2").exists()
    assert_clean(tmp_path)
    ckptproto.verify(good.path)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory holding one checkpoint, then bind-mounted read-only over itself."""
    ro = tmp_path / "ro"
    ckptproto.save(small_state(1), ro / "step_1")
    if not (_try(["mount", "--bind", str(ro), str(ro)])):
        pytest.skip("cannot bind-mount here (not root); root ignores permission bits, so no fallback")
    try:
        if not _try(["mount", "-o", "remount,ro,bind", str(ro)]):
            pytest.skip("cannot remount read-only here")
        yield ro
    finally:
        _try(["umount", "-l", str(ro)])


def test_read_only_directory(read_only_dir: Path) -> None:
    with pytest.raises(ckptproto.CheckpointWriteError, match="Read-only file system") as info:
        ckptproto.save(small_state(2), read_only_dir / "step_2")
    assert str(read_only_dir) in str(info.value)
    with pytest.raises(ckptproto.CheckpointWriteError):
        ckptproto.save(small_state(2), read_only_dir / "step_1", overwrite=True)
    with pytest.raises(ckptproto.CheckpointWriteError):
        ckptproto.save(small_state(2), read_only_dir / "sub" / "step_2")
    # reading from a read-only directory works
    ckptproto.verify(read_only_dir / "step_1")
    assert ckptproto.load(read_only_dir / "step_1")["trainer"]["global_step"] == 1
    assert_clean(read_only_dir)


@pytest.fixture
def immutable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory with the immutable attribute: even root gets EPERM creating entries in it."""
    d = tmp_path / "immutable"
    ckptproto.save(small_state(1), d / "step_1")
    if shutil.which("chattr") is None or not _try(["chattr", "+i", str(d)]):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        yield d
    finally:
        _try(["chattr", "-i", str(d)])


def test_permission_denied(immutable_dir: Path) -> None:
    with pytest.raises(ckptproto.CheckpointWriteError, match="Operation not permitted"):
        ckptproto.save(small_state(2), immutable_dir / "step_2")
    with pytest.raises(ckptproto.CheckpointWriteError):
        ckptproto.save(small_state(2), immutable_dir / "step_1", overwrite=True)
    ckptproto.verify(immutable_dir / "step_1")
    assert_clean(immutable_dir)


def test_missing_directories(tmp_path: Path) -> None:
    # saving creates missing parents
    info = ckptproto.save(small_state(1), tmp_path / "a" / "b" / "step_1")
    ckptproto.verify(info.path)
    # reading from a missing path is a clear not-found error
    for call in (ckptproto.load, ckptproto.verify, ckptproto.read_info, ckptproto.read_manifest):
        with pytest.raises(ckptproto.CheckpointNotFoundError, match="no such directory"):
            call(tmp_path / "missing" / "step_1")
    with pytest.raises(ckptproto.CheckpointNotFoundError):
        ckptproto.load_into(tmp_path / "missing", {"w": np.zeros(1000, dtype=np.float32)})
    # a directory that is not (or no longer) a checkpoint
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckptproto.CheckpointNotFoundError, match="no committed manifest"):
        ckptproto.load(tmp_path / "empty")


def test_paths_that_are_files(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("not a checkpoint")
    with pytest.raises(ckptproto.CheckpointExistsError, match="not a directory"):
        ckptproto.save(small_state(1), file)
    assert file.read_text() == "not a checkpoint"
    with pytest.raises(ckptproto.CheckpointWriteError, match="cannot create"):
        ckptproto.save(small_state(1), file / "step_1")  # the parent is a file
    for call in (ckptproto.load, ckptproto.verify, ckptproto.read_manifest):
        with pytest.raises(ckptproto.CheckpointNotFoundError):
            call(file)
    # a manifest that is a directory, a data file that is a directory
    ckpt = ckptproto.save(small_state(1), tmp_path / "step_1").path
    data = next(ckpt.glob("*.safetensors"))
    data.unlink()
    data.mkdir()
    with pytest.raises(ckptproto.CheckpointError, match=data.name):
        ckptproto.load(ckpt)
    with pytest.raises(ckptproto.CheckpointFormatError, match=data.name) as info:
        ckptproto.verify(ckpt)
    assert type(info.value) is ckptproto.CheckpointFormatError  # F-4, not damage (FORMAT.md §9)
    assert_clean(tmp_path)


def test_non_empty_non_checkpoint_directory_is_not_replaced(tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ckptproto.CheckpointExistsError, match="not a checkpoint"):
        ckptproto.save(small_state(1), target, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    assert_clean(tmp_path)
