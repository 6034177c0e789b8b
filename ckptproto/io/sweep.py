"""The leftovers of interrupted saves, and who may remove them.

A save writes into a hidden temporary directory and holds an exclusive advisory lock (flock)
on it from creation to commit or abort (:func:`hold`, :func:`release`); a committed
checkpoint on its way to deletion or back goes through a hidden name under its lock
(:func:`locked_while`). :func:`remove_leftovers` deletes only the hidden directories whose
writer is gone::

    removed = remove_leftovers(Path("checkpoints"))
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from ckptproto.errors import CheckpointError
from ckptproto.format import layout
from ckptproto.format.manifest import MAX_MANIFEST_BYTES, Manifest
from ckptproto.io.dirs import fsync_dir, is_committed

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


def try_lock(path: Path) -> int | None:
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


def hold(temp: Path) -> bool:
    """Lock the new ``temp`` for this save. False if a cleanup removed it in the instant before
    the lock (it found it unlocked): the caller makes another."""
    fd = try_lock(temp)
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


def release(temp: Path) -> None:
    with _held_guard:
        fd = _held.pop(str(temp), None)
    if fd is not None:
        os.close(fd)


@contextlib.contextmanager
def locked_while(path: Path) -> Iterator[None]:
    """Hold ``path``'s lock while a committed checkpoint goes through a hidden (leftover-looking)
    name on its way to deletion or back, so no cleanup takes it for a dead writer's."""
    fd = try_lock(path)
    try:
        yield
    finally:
        if fd is not None and fd >= 0:
            os.close(fd)


def _writer_alive(info: layout.Leftover, path: Path, held: list[int]) -> bool:
    """Conservative: a leftover whose lock a process holds (its writer, in any PID namespace)
    is alive; else only one written on this host by a pid that no longer exists is dead;
    other hosts (shared filesystems) and untagged names count as alive. The lock of a dead
    one is appended to ``held`` (kept until it is removed)."""
    fd = try_lock(path)
    if fd is None:
        return True
    # Free lock: a locking writer on this host is gone; else (an older writer, another host
    # whose locks this one may not see, no flock here) only the pid can tell.
    locking_writer = fd >= 0 and info.host == layout.this_host() and (path / LOCKED_MARKER).exists()
    alive = not locking_writer and pid_alive(info)
    if fd >= 0:
        if alive:
            os.close(fd)
        else:
            held.append(fd)
    return alive


def pid_alive(info: layout.Leftover) -> bool:
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
