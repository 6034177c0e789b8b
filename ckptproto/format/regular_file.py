"""Opening a checkpoint's files for reading: regular files only, never blocking.

A FIFO named ``manifest.json`` would block a plain ``open`` forever and a directory or a
device would be read as garbage; a symbolic link could point anywhere. Every reader opens
through :func:`open_regular`, which refuses all of them before reading a byte (FORMAT.md
F-1, F-4)::

    fd, st = open_regular("ckpt/manifest.json")
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)


class NotRegularFileError(OSError):
    """The path names something other than a regular file (a directory, FIFO, device,
    socket or symbolic link); ``kind`` says which."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(f"{path} is a {kind}, not a regular file")
        self.kind = kind


def file_kind(mode: int) -> str:
    """A word for the file type in ``mode``: ``file_kind(os.stat(".").st_mode) == "directory"``."""
    for test, word in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return word
    return "special file"


def open_regular(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open ``path`` (relative to ``dir_fd`` when given) read-only, without following a
    symbolic link and without blocking, and return the descriptor and its ``fstat``.

    Raises :class:`NotRegularFileError` for anything but a regular file, ``FileNotFoundError``
    when absent and other ``OSError`` as ``os.open`` does. The descriptor is left blocking
    again (non-blocking only guards the open of a FIFO)."""
    try:
        fd = os.open(path, _FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise NotRegularFileError(os.fspath(path), "symbolic link") from exc
        if exc.errno == errno.ENXIO:  # a socket cannot be opened at all
            raise NotRegularFileError(os.fspath(path), "socket or special file") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(os.fspath(path), file_kind(st.st_mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd, st
