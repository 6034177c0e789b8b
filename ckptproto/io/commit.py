"""Atomic commit of a checkpoint directory.

Files are written into a hidden temporary sibling directory (``layout.temp_name``), fsynced,
the manifest last; then the directory is renamed into place and the parent fsynced. Until that
rename nothing at the final path changes, so a crash leaves either the old state or the new
one, plus a hidden leftover that readers ignore and :func:`remove_leftovers` (run by every
``begin``) deletes once its writer process is gone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from pathlib import Path

from ckptproto.errors import CheckpointError, CheckpointExistsError, CheckpointWriteError
from ckptproto.format import layout
from ckptproto.format.manifest import MAX_MANIFEST_BYTES, Manifest

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


def _writer_alive(info: layout.Leftover) -> bool:
    """Conservative: only a leftover written on this host by a pid that no longer exists is
    dead; other hosts (shared filesystems) and untagged names count as alive."""
    if info.pid is None or info.host != layout.this_host():
        return True
    if info.pid == os.getpid():
        return True  # this process may have a save in flight (async, threads)
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: exists, owned by someone else
    return True


def remove_leftovers(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden temporary and trash directories that interrupted saves left in
    ``parent``, and return them. Only leftovers whose writer process is gone are touched (the
    writer's pid and host are in the name), so a save running concurrently in ``parent`` is
    never disturbed::

        removed = ckptproto.remove_leftovers("checkpoints")

    A trash directory that a replacing save (``finish`` without an atomic exchange) made and
    then died beside — its temporary directory for the same name is still there and the final
    name holds no checkpoint — is moved back to its name instead of being deleted, provided all
    of its files are still whole. Any other trash (a deletion cut short) is removed.
    """
    root = Path(parent)
    removed: list[Path] = []
    try:
        entries = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    dead = [(e, info) for e in entries if (info := layout.parse_leftover(e.name)) and not _writer_alive(info)]
    replacing = {(info.final_name, info.pid) for _, info in dead if not info.trash}
    for entry, info in sorted(dead, key=lambda d: not d[1].trash):  # trash first
        path = root / entry.name
        final = root / info.final_name
        if (
            info.trash
            and (info.final_name, info.pid) in replacing
            and not layout.is_hidden(info.final_name)
            and not final.is_symlink()
            and not is_committed(final)
            and _whole(path)
        ):
            try:
                if final.is_dir():
                    final.rmdir()  # only ever empty here; a non-empty one makes rmdir fail
                os.rename(path, final)
                fsync_dir(root)
            except OSError:
                pass  # keep it where it is: never delete the only copy
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed


def _whole(path: Path) -> bool:
    """The directory holds a parseable manifest and every data file it lists, at full size."""
    manifest_path = path / layout.MANIFEST_NAME
    try:
        if manifest_path.is_symlink() or manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            return False
        manifest = Manifest.parse(manifest_path.read_bytes(), str(manifest_path))
        return all(
            not (path / name).is_symlink() and (path / name).stat().st_size == f.size
            for name, f in manifest.files.items()
        )
    except (OSError, CheckpointError):
        return False


def discard(path: str | os.PathLike[str]) -> None:
    """Delete a committed checkpoint so that no crash can leave half of it looking committed::

        commit.discard("checkpoints/step_100")   # retention

    It is first renamed to a hidden temporary name (atomic; readers and discovery stop seeing
    it), the rename made durable, then removed; a crash midway leaves only a leftover for
    :func:`remove_leftovers`. (Deleting in place could remove data files before the manifest
    and leave a "checkpoint" that fails to load.)
    """
    final = Path(path)
    hidden = final.parent / layout.temp_name(final.name)
    try:
        os.rename(final, hidden)
        fsync_dir(final.parent)
    except OSError as exc:
        raise CheckpointWriteError(f"cannot delete checkpoint {final}: {exc}") from exc
    shutil.rmtree(hidden, ignore_errors=True)


def abort(temp: Path) -> None:
    """Remove a temporary directory after a failed save."""
    shutil.rmtree(temp, ignore_errors=True)
