"""Atomic commit: a checkpoint directory appears whole or not at all; failures leave the
previous checkpoint intact and no temporary directory behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptproto
from ckptproto import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    UnsupportedValueError,
)
from ckptproto.format import layout


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((64,), value), "trainer": {"global_step": int(value)}}


def _step_of(path: Path) -> int:
    state = ckptproto.load(path)
    assert torch.equal(state["w"], torch.full((64,), float(state["trainer"]["global_step"])))
    return int(state["trainer"]["global_step"])


def _only(parent: Path, *names: str) -> None:
    assert sorted(os.listdir(parent)) == sorted(names), os.listdir(parent)


def test_overwrite_false_refuses_existing(tmp_ckpt: Path) -> None:
    ckptproto.save(_state(1), tmp_ckpt)
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        ckptproto.save(_state(2), tmp_ckpt)
    assert _step_of(tmp_ckpt) == 1
    _only(tmp_ckpt.parent, "ckpt")


def test_overwrite_true_replaces(tmp_ckpt: Path) -> None:
    ckptproto.save(_state(1), tmp_ckpt)
    info = ckptproto.save(_state(2), tmp_ckpt, overwrite=True)
    assert info.step == 2 and _step_of(tmp_ckpt) == 2
    _only(tmp_ckpt.parent, "ckpt")  # the old one is gone, no trash left


def test_overwrite_without_renameat2_exchange(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto.io import commit

    monkeypatch.setattr(commit, "_exchange", lambda a, b: False)
    ckptproto.save(_state(1), tmp_ckpt)
    ckptproto.save(_state(2), tmp_ckpt, overwrite=True)
    assert _step_of(tmp_ckpt) == 2
    _only(tmp_ckpt.parent, "ckpt")


def test_empty_directory_is_filled(tmp_ckpt: Path) -> None:
    tmp_ckpt.mkdir()
    ckptproto.save(_state(3), tmp_ckpt)
    assert _step_of(tmp_ckpt) == 3


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_paths_are_refused(tmp_path: Path, overwrite: bool) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CheckpointExistsError, match="not a checkpoint"):
        ckptproto.save(_state(1), foreign, overwrite=overwrite)
    assert (foreign / "cat.jpg").read_bytes() == b"meow"
    afile = tmp_path / "notes.txt"
    afile.write_text("keep")
    with pytest.raises(CheckpointExistsError):
        ckptproto.save(_state(1), afile, overwrite=overwrite)
    assert afile.read_text() == "keep"
    link = tmp_path / "link"
    link.symlink_to(foreign)
    with pytest.raises(CheckpointExistsError):
        ckptproto.save(_state(1), link, overwrite=overwrite)
    _only(tmp_path, "photos", "notes.txt", "link")


def test_hidden_or_empty_names_are_refused(tmp_path: Path) -> None:
    for name in (".hidden", ".."):
        with pytest.raises(CheckpointWriteError):
            ckptproto.save(_state(1), tmp_path / name)
    _only(tmp_path)


def test_unsupported_value_keeps_previous(tmp_ckpt: Path) -> None:
    ckptproto.save(_state(1), tmp_ckpt)
    with pytest.raises(UnsupportedValueError):
        ckptproto.save({**_state(2), "bad": {1, 2}}, tmp_ckpt, overwrite=True)
    assert _step_of(tmp_ckpt) == 1
    _only(tmp_ckpt.parent, "ckpt")


def test_enospc_during_write_keeps_previous(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckptproto.save(_state(1), tmp_ckpt)
    real = os.pwritev
    calls = {"n": 0}

    def full_disk(fd: int, buffers: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 1:  # the header goes through, the tensor bytes do not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", full_disk)
    with pytest.raises(CheckpointWriteError, match="No space left") as info:
        ckptproto.save(_state(2), tmp_ckpt, overwrite=True)
    assert isinstance(info.value, OSError)
    monkeypatch.setattr(os, "pwritev", real)
    assert _step_of(tmp_ckpt) == 1
    _only(tmp_ckpt.parent, "ckpt")
    ckptproto.verify(tmp_ckpt)


def test_failure_writing_the_manifest_keeps_previous(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto.io import writer

    ckptproto.save(_state(1), tmp_ckpt)

    def fail(directory: Path, name: str, data: bytes) -> None:
        (directory / name).write_bytes(data[: len(data) // 2])  # a torn manifest in the temp dir
        raise CheckpointWriteError("injected")

    monkeypatch.setattr(writer, "write_small_file", fail)
    with pytest.raises(CheckpointWriteError, match="injected"):
        ckptproto.save(_state(2), tmp_ckpt, overwrite=True)
    assert _step_of(tmp_ckpt) == 1
    _only(tmp_ckpt.parent, "ckpt")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_parent(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(CheckpointWriteError):
            ckptproto.save(_state(1), parent / "ckpt")
        _only(parent)
    finally:
        parent.chmod(0o700)


def test_failed_commit_rename_keeps_previous(tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto.io import commit

    ckptproto.save(_state(1), tmp_ckpt)

    def broken_exchange(a: Path, b: Path) -> bool:
        raise OSError(errno.EIO, "injected I/O error")

    monkeypatch.setattr(commit, "_exchange", broken_exchange)
    with pytest.raises(CheckpointWriteError, match="injected"):
        ckptproto.save(_state(2), tmp_ckpt, overwrite=True)
    assert _step_of(tmp_ckpt) == 1
    _only(tmp_ckpt.parent, "ckpt")


def test_hidden_temp_dirs_are_never_checkpoints(tmp_path: Path) -> None:
    ckptproto.save(_state(1), tmp_path / "ckpt")
    temp = tmp_path / layout.temp_name("ckpt")
    os.rename(tmp_path / "ckpt", temp)  # a complete directory, but under a temporary name
    for call in (ckptproto.load, ckptproto.read_info, ckptproto.verify, ckptproto.read_manifest):
        with pytest.raises(CheckpointNotFoundError):
            call(temp)
    with pytest.raises(CheckpointNotFoundError):
        ckptproto.load_into(temp, {"w": torch.zeros(64)})
    assert layout.is_leftover(temp.name)


def test_directory_without_manifest_is_not_a_checkpoint(tmp_ckpt: Path) -> None:
    ckptproto.save(_state(1), tmp_ckpt)
    (tmp_ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="not a checkpoint"):
        ckptproto.load(tmp_ckpt)
    with pytest.raises(CheckpointNotFoundError):
        ckptproto.verify(tmp_ckpt)
    # Not a checkpoint and not empty: a save refuses to replace it even with overwrite.
    with pytest.raises(CheckpointExistsError):
        ckptproto.save(_state(2), tmp_ckpt, overwrite=True)


def test_save_creates_parents_and_reports_info(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "checkpoint_step_7"
    info = ckptproto.save(_state(7), path, metadata={"metrics": {"loss": 0.25}, "note": "x"})
    assert info.path == path and info.step == 7 and info.metric("loss") == 0.25
    assert info.nbytes == sum(f.stat().st_size for f in path.iterdir() if f.name != "manifest.json")
    assert ckptproto.read_info(path).metadata == {"metrics": {"loss": 0.25}, "note": "x", "step": 7}
    assert info.format_version == "1.0" and info.created is not None


def test_racing_saver_without_overwrite_does_not_replace(
    tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two savers target the same new path with overwrite=False: the one that commits second
    must fail, not silently replace the first one's checkpoint."""
    from ckptproto.io import writer

    real = writer.write_small_file
    raced = {"done": False}

    def manifest_then_race(directory: Path, name: str, data: bytes) -> None:
        real(directory, name, data)
        if not raced["done"]:  # another saver commits while this one is about to rename
            raced["done"] = True
            ckptproto.save(_state(2), tmp_ckpt)

    monkeypatch.setattr(writer, "write_small_file", manifest_then_race)
    with pytest.raises(CheckpointExistsError):
        ckptproto.save(_state(1), tmp_ckpt)
    assert _step_of(tmp_ckpt) == 2
    _only(tmp_ckpt.parent, "ckpt")


@pytest.mark.parametrize("noreplace", [True, False], ids=["renameat2", "rename-fallback"])
def test_saver_committing_during_the_final_rename_is_never_replaced(
    tmp_ckpt: Path, monkeypatch: pytest.MonkeyPatch, noreplace: bool
) -> None:
    """The race past every earlier check: another saver commits between this saver's last
    look at the destination and its rename. The rename itself must refuse (no-replace)."""
    from ckptproto.io import commit

    if not noreplace:
        monkeypatch.setattr(commit, "_rename_noreplace", lambda a, b: False)
    real_is_committed = commit.is_committed
    raced = {"done": False}

    def commit_meanwhile(path: Path) -> bool:
        seen = real_is_committed(path)
        if path == tmp_ckpt and not raced["done"] and not seen and len(os.listdir(tmp_ckpt.parent)) == 1:
            # the only entry is this saver's temporary directory, about to be renamed
            raced["done"] = True
            monkeypatch.setattr(commit, "is_committed", real_is_committed)
            ckptproto.save(_state(2), tmp_ckpt)
        return seen

    monkeypatch.setattr(commit, "is_committed", commit_meanwhile)
    with pytest.raises(CheckpointExistsError, match="committed by another saver"):
        ckptproto.save(_state(1), tmp_ckpt)
    assert raced["done"] and _step_of(tmp_ckpt) == 2
    _only(tmp_ckpt.parent, "ckpt")
