"""Readers see one generation of a checkpoint, whole: an overwrite (rename-exchange) or a
retention deletion that lands while a reader is opening or reading it never mixes two saves'
files, never makes a healthy checkpoint look corrupt, and a checkpoint deleted mid-read is
CheckpointNotFoundError, not a raw FileNotFoundError.

The writer acts at a fixed point inside the reader (right after it read the manifest, or
after it opened every file), through real saves and real deletions; the multi-process races
are in tests/test_races.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptproto
from ckptproto import CheckpointNotFoundError
from ckptproto.io import commit, reader

N = 4096  # every generation has the same sizes: a mix would pass every size check


def _state(step: int) -> dict[str, Any]:
    return {"w": np.full(N, step, dtype=np.float32), "trainer": {"global_step": step}}


def _check_whole(state: dict[str, Any]) -> int:
    step = int(state["trainer"]["global_step"])
    assert np.array_equal(np.asarray(state["w"]), np.full(N, step, dtype=np.float32)), "generations mixed"
    return step


def _load(path: Path) -> int:
    return _check_whole(ckptproto.load(path))


def _load_mmap(path: Path) -> int:
    return _check_whole(ckptproto.load(path, mmap=True))


def _verify(path: Path) -> int:
    return ckptproto.verify(path).step or 0


def _load_into(path: Path) -> int:
    target: dict[str, Any] = {"w": np.zeros(N, dtype=np.float32), "trainer": {"global_step": -1}}
    ckptproto.load_into(path, target)
    return _check_whole(target)


READERS: dict[str, Callable[[Path], int]] = {
    "load": _load,
    "load_mmap": _load_mmap,
    "verify": _verify,
    "load_into": _load_into,
}


def _after_first(
    monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, action: Callable[[], None]
) -> list[int]:
    """Run ``action`` (the writer) once, right after the first call of ``owner.name``."""
    real = getattr(owner, name)
    calls: list[int] = []

    def hooked(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if not calls:
            calls.append(1)
            action()
        return result

    monkeypatch.setattr(owner, name, hooked)
    return calls


@pytest.mark.parametrize("how", sorted(READERS))
def test_overwrite_after_the_manifest_was_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    path = tmp_path / "latest"
    ckptproto.save(_state(1), path)
    calls = _after_first(
        monkeypatch, reader, "read_manifest", lambda: ckptproto.save(_state(2), path, overwrite=True)
    )
    assert READERS[how](path) in (1, 2)  # one generation, whole, and no false corruption
    assert calls


@pytest.mark.parametrize("how", sorted(READERS))
def test_overwrite_after_every_file_was_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The old generation is swapped out and deleted while the reader holds its files: it is
    # still read whole (unlinked open files stay readable).
    path = tmp_path / "latest"
    ckptproto.save(_state(1), path)
    calls = _after_first(
        monkeypatch,
        reader.OpenCheckpoint,
        "check_chunks",
        lambda: ckptproto.save(_state(2), path, overwrite=True),
    )
    if how == "verify":  # verify opens every file, then checks the chunks once the CRCs pass
        calls = _after_first(
            monkeypatch, reader, "file_crc", lambda: ckptproto.save(_state(2), path, overwrite=True)
        )
    assert READERS[how](path) == 1
    assert calls and _load(path) == 2


@pytest.mark.parametrize("how", sorted(READERS))
def test_retention_deleting_mid_read_is_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    path = tmp_path / "step_1"
    ckptproto.save(_state(1), path)
    _after_first(monkeypatch, reader, "read_manifest", lambda: commit.discard(path))
    with pytest.raises(CheckpointNotFoundError, match=r"deleted while it was being read|no such directory"):
        READERS[how](path)


@pytest.mark.parametrize("how", sorted(READERS))
def test_a_checkpoint_deleted_before_the_read_is_not_found(tmp_path: Path, how: str) -> None:
    path = tmp_path / "step_1"
    ckptproto.save(_state(1), path)
    commit.discard(path)
    with pytest.raises(CheckpointNotFoundError, match="no such directory"):
        READERS[how](path)
