"""Atomic commit of a checkpoint directory.

Files are written into a hidden temporary sibling directory (``layout.temp_name``, locked by
its writer), fsynced, the manifest last (:func:`seal`: the manifest and the directory fsynced
at the same time); then the directory is renamed into place (without ``overwrite``, a
no-replace rename) and the parent fsynced. Until that rename nothing at the final path
changes, so a crash leaves either the old state or the new one, plus a hidden leftover that
readers ignore and :func:`~ckptproto.io.sweep.remove_leftovers` (run by every ``begin``)
deletes once its writer process is gone. The atomic-rename primitives for other
directories and files (:func:`place_dir`, :func:`place_file`) and the deletion of a committed
checkpoint (:func:`hide`, :func:`discard`) live here too: they are the same renames.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from ckptproto.errors import CheckpointExistsError, CheckpointWriteError
from ckptproto.format import layout
from ckptproto.io import writer
from ckptproto.io.dirs import fsync_dir, is_committed
from ckptproto.io.sweep import LOCKED_MARKER, hold, locked_while, release, remove_leftovers

__all__ = [
    "LOCKED_MARKER",
    "abort",
    "begin",
    "discard",
    "finish",
    "fsync_dir",
    "hide",
    "is_committed",
    "place_dir",
    "place_file",
    "remove_leftovers",
    "seal",
]

# Temporary directories whose entries seal() made durable: their finish() goes straight to
# the rename. Kept here, not guessed from the directory: a marker that was never created
# (hold() tolerates that) must not pass for a sealed directory.
_sealed: set[Path] = set()
_sealed_guard = threading.Lock()

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def begin(final: Path, *, overwrite: bool) -> Path:
    """Check the destination and create the temporary directory to write into."""
    if layout.is_hidden(final.name) or final.name in ("", ".", ".."):
        raise CheckpointWriteError(f"{final}: a checkpoint name must not be empty or start with '.'")
    # Leftovers of a killed earlier run go first: that may also move back a checkpoint that
    # run was replacing, which the checks below must then see.
    remove_leftovers(final.parent)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CheckpointExistsError(f"{final} exists and is not a directory; choose another path")
    if final.is_dir():
        if is_committed(final):
            if not overwrite:
                raise CheckpointExistsError(
                    f"{final} already holds a checkpoint; pass overwrite=True to replace it"
                )
        elif any(final.iterdir()):
            raise CheckpointExistsError(
                f"{final} is a non-empty directory that is not a checkpoint; refusing to replace it"
            )
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        for _attempt in range(8):
            temp = final.parent / layout.temp_name(final.name)
            temp.mkdir()
            if hold(temp):
                return temp
        raise OSError(errno.EAGAIN, "every new temporary directory was removed at once by another process")
    except OSError as exc:
        raise CheckpointWriteError(f"cannot create a checkpoint under {final.parent}: {exc}") from exc


@functools.lru_cache(maxsize=1)
def _renameat2_fn() -> Any:
    """libc's renameat2, or None (not Linux, or a libc older than glibc 2.28)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    return getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """``renameat2(a, b, flags)``; False where the call or the flag is unsupported (the
    kernel, or the file system: EINVAL), so the caller falls back."""
    fn = _renameat2_fn()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(a: Path, b: Path) -> bool:
    """Rename ``a`` to ``b`` unless ``b`` exists (EEXIST), as one atomic step (Linux
    renameat2 RENAME_NOREPLACE); False where unsupported."""
    return _renameat2(a, b, _RENAME_NOREPLACE)


def _place_new(temp: Path, final: Path) -> bool:
    """Rename ``temp`` to ``final`` only if ``final`` holds nothing; False if something is
    there (an empty directory there is removed first, so the caller tries again).

    The existence check and the rename are one atomic step: renameat2(RENAME_NOREPLACE), else
    plain rename(2), which never replaces a non-empty directory (POSIX: ENOTEMPTY/EEXIST) and
    a committed checkpoint always holds its manifest. Two savers racing for one new name:
    exactly one rename succeeds."""
    try:
        if not _rename_noreplace(temp, final):
            os.rename(temp, final)
        return True
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    try:
        final.rmdir()  # an empty directory is no checkpoint: take its place (never a full one)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    return False


def _replace(temp: Path, final: Path) -> None:
    """Swap the committed checkpoint at ``final`` for ``temp`` so that ``final`` always holds
    a whole checkpoint; the old one is deleted after the swap is durable."""
    if _exchange(temp, final):
        fsync_dir(final.parent)
        shutil.rmtree(temp, ignore_errors=True)  # the old checkpoint, under the locked name
        return
    with locked_while(final):
        old = final.parent / layout.trash_name(final.name)
        os.rename(final, old)
        try:
            os.rename(temp, final)
        except OSError:
            os.rename(old, final)  # put the old checkpoint back before giving up
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)


def seal(temp: Path, name: str, data: bytes) -> None:
    """Write the last file of a checkpoint (its manifest) into the temporary directory and
    make it and every entry of the directory durable, so that :func:`finish` goes straight
    to the rename::

        commit.seal(temp, "manifest.json", manifest_bytes)
        commit.finish(temp, final, overwrite=False)

    The file and the directory are fsynced at the same time (FORMAT.md F-28: both finished
    before the rename), one wait for the disk where one after the other took two."""
    writer.write_small_file(temp, name, data)  # fsyncs the file and the directory at once
    with _sealed_guard:
        _sealed.add(temp)


def _unseal(temp: Path) -> bool:
    """Whether :func:`seal` made ``temp``'s entries durable (and forget it)."""
    with _sealed_guard:
        if temp in _sealed:
            _sealed.discard(temp)
            return True
        return False


def finish(temp: Path, final: Path, *, overwrite: bool = True) -> None:
    """Make the fully written ``temp`` the checkpoint at ``final``. With ``overwrite`` a
    committed checkpoint there is replaced atomically; without, a checkpoint committed there
    by anyone, even while this call runs, is never replaced: ``temp`` is dropped and
    CheckpointExistsError raised (no-replace commit, :func:`_place_new`)."""
    try:
        _finish(temp, final, overwrite)
    finally:
        release(temp)


def _finish(temp: Path, final: Path, overwrite: bool) -> None:
    try:
        sealed = _unseal(temp)
        # Not part of the checkpoint. Kept until now: a leftover without it is judged by the
        # pid in its name alone (F-30), which means nothing from another PID namespace.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp / LOCKED_MARKER)
        if not sealed:
            fsync_dir(temp)
        # Sealed: every entry the checkpoint needs is durable. The marker's removal is not
        # fsynced on its own (a wait for the disk): a journaling file system (ext4, XFS)
        # writes it before the later rename; elsewhere a crash may leave the empty hidden
        # marker inside the committed checkpoint, a file no reader opens.
        for _attempt in range(8):  # each retry means another writer changed ``final`` meanwhile
            if is_committed(final):
                if not overwrite:
                    raise CheckpointExistsError(
                        f"{final} was committed by another saver while this one was writing; "
                        "pass overwrite=True to replace it"
                    )
                _replace(temp, final)
                return
            if _place_new(temp, final):
                fsync_dir(final.parent)
                return
        raise CheckpointExistsError(
            f"{final} is a non-empty directory that is not a checkpoint; refusing to replace it"
        )
    except CheckpointExistsError:
        abort(temp)
        raise
    except OSError as exc:
        abort(temp)
        raise CheckpointWriteError(f"cannot commit checkpoint {final}: {exc}") from exc


def place_dir(temp: Path, final: Path, *, overwrite: bool) -> None:
    """Rename the fully written, fsynced directory ``temp`` to ``final`` as one atomic step
    (for directories that are not ckptproto checkpoints: a DCP export)::

        commit.place_dir(Path(".out.tmp"), Path("out"), overwrite=False)

    A new name takes a no-replace rename; with ``overwrite`` an existing directory is swapped
    out atomically (renameat2 exchange where the kernel has it) and then deleted, so ``final``
    never goes missing. Without ``overwrite`` an existing non-empty ``final`` raises
    CheckpointExistsError, even one created while the caller was writing."""
    for _attempt in range(8):  # each retry means another writer changed ``final`` meanwhile
        if _place_new(temp, final):
            fsync_dir(final.parent)
            return
        if not overwrite:
            raise CheckpointExistsError(f"{final} already exists; pass overwrite=True to replace it")
        if final.is_dir() and not final.is_symlink():
            _replace(temp, final)
            return
    raise CheckpointExistsError(f"{final} keeps changing under this writer; refusing to replace it")


def place_file(temp: Path, final: Path, *, overwrite: bool) -> None:
    """Rename the fully written, fsynced file ``temp`` to ``final`` and make that durable::

        commit.place_file(Path(".model.tmp"), Path("model.safetensors"), overwrite=False)

    Without ``overwrite`` the check and the rename are one step (renameat2 RENAME_NOREPLACE,
    else a hard link, which never replaces): a file created at ``final`` by anyone, even
    while the caller was writing, is never replaced (CheckpointExistsError)."""
    if overwrite:
        os.replace(temp, final)
    else:
        try:
            if not _rename_noreplace(temp, final):
                os.link(temp, final)  # fails with EEXIST rather than replace
                os.unlink(temp)
        except FileExistsError:
            raise CheckpointExistsError(
                f"{final} was created by another writer while this one was writing; "
                "pass overwrite=True (--overwrite) to replace it"
            ) from None
    fsync_dir(final.parent)


def hide(path: str | os.PathLike[str]) -> Path:
    """Rename a committed checkpoint out of sight (a hidden leftover name; readers and
    discovery stop seeing it at once), durably; returns the hidden path for the caller to
    delete now or later (``abort``). The first half of :func:`discard`::

        hidden = commit.hide("checkpoints/step_100")
    """
    final = Path(path)
    with locked_while(final):
        return _hide(final)


def _hide(final: Path) -> Path:
    hidden = final.parent / layout.temp_name(final.name)
    try:
        os.rename(final, hidden)
        fsync_dir(final.parent)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot delete checkpoint {final}: {exc}") from exc
    return hidden


def discard(path: str | os.PathLike[str]) -> None:
    """Delete a committed checkpoint so that no crash can leave half of it looking committed::

        commit.discard("checkpoints/step_100")   # retention

    It is first renamed to a hidden temporary name (atomic; readers and discovery stop seeing
    it), the rename made durable, then removed; a crash midway leaves only a leftover for
    :func:`remove_leftovers`. (Deleting in place could remove data files before the manifest
    and leave a "checkpoint" that fails to load.)
    """
    final = Path(path)
    with locked_while(final):  # held until the files are gone: no sweeper races the delete
        shutil.rmtree(_hide(final), ignore_errors=True)


def abort(temp: Path) -> None:
    """Remove a temporary directory after a failed save (its lock goes last)."""
    _unseal(temp)
    shutil.rmtree(temp, ignore_errors=True)
    release(temp)
