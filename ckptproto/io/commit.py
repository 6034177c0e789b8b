"""Atomic commit of a checkpoint directory.

Files are written into a hidden temporary sibling directory (``layout.temp_name``), fsynced,
the manifest last; then the directory is renamed into place and the parent fsynced. Until that
rename nothing at the final path changes, so a crash leaves either the old state or the new
one, plus a hidden leftover that readers ignore.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

from ckptproto.errors import CheckpointExistsError, CheckpointWriteError
from ckptproto.format import layout

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_committed(path: Path) -> bool:
    """A directory is a checkpoint only once its manifest is there under a non-hidden name."""
    return not layout.is_hidden(path.name) and (path / layout.MANIFEST_NAME).is_file()


def begin(final: Path, *, overwrite: bool) -> Path:
    """Check the destination and create the temporary directory to write into."""
    if layout.is_hidden(final.name) or final.name in ("", ".", ".."):
        raise CheckpointWriteError(f"{final}: a checkpoint name must not be empty or start with '.'")
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
        temp = final.parent / layout.temp_name(final.name)
        temp.mkdir()
    except OSError as exc:
        raise CheckpointWriteError(f"cannot create a checkpoint under {final.parent}: {exc}") from exc
    return temp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def refuse_if_committed(temp: Path, final: Path) -> None:
    """For a save with ``overwrite=False``, just before :func:`finish`: if another saver
    committed a checkpoint at ``final`` while this one was writing, drop ``temp`` and raise
    CheckpointExistsError instead of replacing it."""
    if is_committed(final):
        abort(temp)
        raise CheckpointExistsError(
            f"{final} was committed by another saver while this one was writing; "
            "pass overwrite=True to replace it"
        )


def finish(temp: Path, final: Path) -> None:
    """Make the fully written ``temp`` the checkpoint at ``final`` (replacing an old one)."""
    try:
        fsync_dir(temp)
        if is_committed(final):
            # Swap atomically so the final path always holds a whole checkpoint; the old one
            # ends up at the temporary name and is deleted after the swap is durable.
            if not _exchange(temp, final):
                old = final.parent / layout.trash_name(final.name)
                os.rename(final, old)
                try:
                    os.rename(temp, final)
                except OSError:
                    os.rename(old, final)  # put the old checkpoint back before giving up
                    raise
                temp = old
            fsync_dir(final.parent)
            shutil.rmtree(temp, ignore_errors=True)
        else:
            if final.is_dir():
                final.rmdir()  # empty (checked in begin); rename cannot replace it portably
            os.rename(temp, final)
            fsync_dir(final.parent)
    except OSError as exc:
        abort(temp)
        raise CheckpointWriteError(f"cannot commit checkpoint {final}: {exc}") from exc


def abort(temp: Path) -> None:
    """Remove a temporary directory after a failed save."""
    shutil.rmtree(temp, ignore_errors=True)
