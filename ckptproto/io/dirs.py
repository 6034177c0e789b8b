"""The two directory facts every local commit step builds on: a directory's entries made
durable (``fsync`` of the directory), and whether a directory is a committed checkpoint::

    fsync_dir(Path("checkpoints"))
    is_committed(Path("checkpoints/step_10"))
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptproto.format import layout


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_committed(path: Path) -> bool:
    """A directory is a checkpoint only once its manifest is there under a non-hidden name."""
    return not layout.is_hidden(path.name) and (path / layout.MANIFEST_NAME).is_file()
