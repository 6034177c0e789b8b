"""One atomic placement for every output: checkpoints, single interop files, DCP exports
(``commit.place_file``/``place_dir``), and one out-of-sight delete (``commit.hide``/``discard``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptproto.errors import CheckpointExistsError
from ckptproto.format import layout
from ckptproto.interop.files import atomic_file
from ckptproto.io import commit


def test_a_file_created_while_an_export_is_written_is_never_replaced(tmp_path: Path) -> None:
    final = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointExistsError), atomic_file(final, overwrite=False) as temp:
        temp.write_bytes(b"ours")
        final.write_bytes(b"theirs")  # another writer, while this one writes
    assert final.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_place_file_checks_and_renames_in_one_step(tmp_path: Path) -> None:
    # Was: atomic_file checked the destination, then os.replace()d: a file created between
    # the check and the rename was silently replaced. The no-replace rename is the check.
    final, temp = tmp_path / "model.safetensors", tmp_path / ".model.tmp"
    final.write_bytes(b"theirs")
    temp.write_bytes(b"ours")
    with pytest.raises(CheckpointExistsError, match="another writer"):
        commit.place_file(temp, final, overwrite=False)
    assert final.read_bytes() == b"theirs" and temp.read_bytes() == b"ours"
    commit.place_file(temp, final, overwrite=True)
    assert final.read_bytes() == b"ours" and not temp.exists()


def test_a_file_export_replaces_only_with_overwrite(tmp_path: Path) -> None:
    final = tmp_path / "model.safetensors"
    with atomic_file(final, overwrite=False) as temp:
        temp.write_bytes(b"one")
    with atomic_file(final, overwrite=True) as temp:
        temp.write_bytes(b"two")
    assert final.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def _written_dir(tmp_path: Path, content: bytes) -> Path:
    temp = tmp_path / layout.temp_name("out")
    temp.mkdir()
    (temp / "f").write_bytes(content)
    return temp


def test_place_dir_never_replaces_without_overwrite_and_swaps_with_it(tmp_path: Path) -> None:
    final = tmp_path / "out"
    commit.place_dir(_written_dir(tmp_path, b"one"), final, overwrite=False)
    second = _written_dir(tmp_path, b"two")
    with pytest.raises(CheckpointExistsError):
        commit.place_dir(second, final, overwrite=False)
    assert (final / "f").read_bytes() == b"one" and second.is_dir()
    commit.place_dir(second, final, overwrite=True)
    assert (final / "f").read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old one deleted


def test_hide_takes_a_checkpoint_out_of_sight_at_once(tmp_path: Path) -> None:
    final = tmp_path / "step_1"
    final.mkdir()
    (final / layout.MANIFEST_NAME).write_text("{}")
    hidden = commit.hide(final)
    assert not final.exists() and layout.is_leftover(hidden.name) and hidden.parent == tmp_path
    commit.abort(hidden)
    assert list(tmp_path.iterdir()) == []
