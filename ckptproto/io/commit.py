"""Atomic commit of a checkpoint directory.

Files are written into a hidden temporary sibling directory (``layout.temp_name``, locked by
its writer), fsynced, the manifest last; then the directory is renamed into place (without
``overwrite``, a no-replace rename) and the parent fsynced. Until that rename nothing at the
final path changes, so a crash leaves either the old state or the new one, plus a hidden
leftover that readers ignore and :func:`remove_leftovers` (run by every ``begin``) deletes
once its writer process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckptproto.errors import CheckpointError, CheckpointExistsError, CheckpointWriteError
from ckptproto.format import layout
from ckptproto.format.manifest import MAX_MANIFEST_BYTES, Manifest

_RENAME_NOREPLACE = 1
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
        for _attempt in range(8):
            temp = final.parent / layout.temp_name(final.name)
            temp.mkdir()
            if _hold(temp):
                return temp
        raise OSError(errno.EAGAIN, "every new temporary directory was removed at once by another process")
    except OSError as exc:
        raise CheckpointWriteError(f"cannot create a checkpoint under {final.parent}: {exc}") from exc


# The liveness of a save: its writer holds an exclusive advisory lock (flock) on its temporary
# directory from creation to commit or abort. The kernel drops it when the process dies, so a
# cleanup in another PID namespace (a container on the same host name, where the writer's pid
# means nothing) still sees the save as alive.
_held: dict[str, int] = {}
_held_guard = threading.Lock()
# Created in a temporary directory once its writer holds the lock (removed just before the
# commit): a leftover holding it was written by a locking writer, so on this host a free lock
# alone says that writer is gone, even if its pid number now belongs to another process.
LOCKED_MARKER = ".ckptproto-writer-locks"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def _try_lock(path: Path) -> int | None:
    """A descriptor of ``path`` holding its exclusive flock; None if another process holds
    it; -1 if the lock cannot be taken here (no such directory, or no flock on this file
    system: liveness then falls back to the pid)."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        return -1
    return fd


def _hold(temp: Path) -> bool:
    """Lock the new ``temp`` for this save. False if a cleanup removed it in the instant before
    the lock (it found it unlocked): the caller makes another."""
    fd = _try_lock(temp)
    if fd is None:
        return False  # a cleanup holds it and is deleting it
    if fd < 0:
        return temp.is_dir()  # no flock here: the pid in the name is all cleanup can go by
    try:
        pinned, now = os.fstat(fd), os.stat(temp)
        if (pinned.st_dev, pinned.st_ino) != (now.st_dev, now.st_ino):
            raise FileNotFoundError(temp)
    except FileNotFoundError:
        os.close(fd)
        return False
    with _held_guard:
        _held[str(temp)] = fd
    with contextlib.suppress(OSError):  # without it, cleanup goes by the pid: still safe
        os.close(os.open(temp / LOCKED_MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    return True


def _release(temp: Path) -> None:
    with _held_guard:
        fd = _held.pop(str(temp), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def _locked_while(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock while a committed checkpoint goes through a hidden (leftover-looking)
    name on its way to deletion or back, so no cleanup takes it for a dead writer's."""
    fd = _try_lock(path)
    try:
        yield
    finally:
        if fd is not None and fd >= 0:
            os.close(fd)


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
    with _locked_while(final):
        old = final.parent / layout.trash_name(final.name)
        os.rename(final, old)
        try:
            os.rename(temp, final)
        except OSError:
            os.rename(old, final)  # put the old checkpoint back before giving up
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)


def finish(temp: Path, final: Path, *, overwrite: bool = True) -> None:
    """Make the fully written ``temp`` the checkpoint at ``final``. With ``overwrite`` a
    committed checkpoint there is replaced atomically; without, a checkpoint committed there
    by anyone, even while this call runs, is never replaced: ``temp`` is dropped and
    CheckpointExistsError raised (no-replace commit, :func:`_place_new`)."""
    try:
        _finish(temp, final, overwrite)
    finally:
        _release(temp)


def _finish(temp: Path, final: Path, overwrite: bool) -> None:
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp / LOCKED_MARKER)  # not part of the checkpoint
        fsync_dir(temp)
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


def _writer_alive(info: layout.Leftover, path: Path, held: list[int]) -> bool:
    """Conservative: a leftover whose lock a process holds (its writer, in any PID namespace)
    is alive; else only one written on this host by a pid that no longer exists is dead;
    other hosts (shared filesystems) and untagged names count as alive. The lock of a dead
    one is appended to ``held`` (kept until it is removed)."""
    fd = _try_lock(path)
    if fd is None:
        return True
    # Free lock: a locking writer on this host is gone; else (an older writer, another host
    # whose locks this one may not see, no flock here) only the pid can tell.
    locking_writer = fd >= 0 and info.host == layout.this_host() and (path / LOCKED_MARKER).exists()
    alive = not locking_writer and _pid_alive(info)
    if fd >= 0:
        if alive:
            os.close(fd)
        else:
            held.append(fd)
    return alive


def _pid_alive(info: layout.Leftover) -> bool:
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
    ``parent``, and return them. Only leftovers whose writer process is gone are touched, so
    a save running concurrently in ``parent`` is never disturbed: a writer holds an advisory
    lock (flock) on its directory, which no other process, in any PID namespace, can take
    while it lives; and where the lock is free, the writer's pid and host in the name must
    also say it is gone (a pid number taken in this namespace keeps it, conservatively)::

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
    held: list[int] = []  # the locks of the leftovers judged dead, held while they are removed
    try:
        dead = [
            (e, info)
            for e in entries
            if (info := layout.parse_leftover(e.name)) and not _writer_alive(info, root / e.name, held)
        ]
        return _remove_dead(root, dead)
    finally:
        for fd in held:
            os.close(fd)


def _remove_dead(root: Path, dead: list[tuple[os.DirEntry[str], layout.Leftover]]) -> list[Path]:
    removed: list[Path] = []
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
    with _locked_while(final):
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
    with _locked_while(final):  # held until the files are gone: no sweeper races the delete
        shutil.rmtree(_hide(final), ignore_errors=True)


def abort(temp: Path) -> None:
    """Remove a temporary directory after a failed save (its lock goes last)."""
    shutil.rmtree(temp, ignore_errors=True)
    _release(temp)
