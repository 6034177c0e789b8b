"""The read half of the local-filesystem backend: one generation of a checkpoint directory,
pinned by a directory descriptor (FORMAT.md F-38), its files opened relative to it as regular
files only (F-1, F-4)::

    with open_generation(Path("ckpt/step_10")) as generation:
        manifest_bytes = generation.read_manifest()
        data = generation.open_file("data-00000-000.safetensors")
        data.read_into(0, [memoryview(bytearray(8))])

A save with ``overwrite=True`` swaps a new directory in at the same path and retention renames
a checkpoint away and deletes it; files opened through the descriptor stay those of the pinned
directory (open files stay readable after they are unlinked).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointNotFoundError,
)
from ckptproto.format import layout
from ckptproto.format.manifest import MAX_MANIFEST_BYTES
from ckptproto.format.regular_file import NotRegularFileError, open_regular
from ckptproto.io import threads
from ckptproto.io.storage import read_bytes
from ckptproto.location import Location


class LocalFile:
    """A data file opened read-only; ``read_into`` is ``preadv`` (thread-safe: no shared
    file position), ``fileno`` the descriptor to memory-map."""

    def __init__(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.size = size
        self._fd = fd

    def read_into(self, offset: int, views: Sequence[memoryview]) -> int:
        return threads.preadv_all(self._fd, list(views), offset)

    def fileno(self) -> int | None:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LocalGeneration:
    """The directory at ``location`` as it was when opened: ``open_generation(path)``."""

    def __init__(self, location: Path, dir_fd: int) -> None:
        self.location: Location = location  # the protocol's type: a Generation of any backend
        self._path = location
        self._dir_fd = dir_fd

    def read_manifest(self) -> bytes:
        root = self.location
        where = f"{root}/{layout.MANIFEST_NAME}"
        try:
            fd, st = open_regular(layout.MANIFEST_NAME, dir_fd=self._dir_fd)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{root} is not a checkpoint (no committed manifest)") from None
        except NotRegularFileError as exc:  # F-1: a directory, FIFO, link... is no manifest
            raise CheckpointNotFoundError(
                f"{root} is not a checkpoint: {layout.MANIFEST_NAME} is a {exc.kind}, not a regular file"
            ) from None
        except OSError as exc:
            raise CheckpointNotFoundError(f"cannot open {where}: {exc}") from exc
        file = LocalFile(layout.MANIFEST_NAME, fd, st.st_size)
        try:
            if st.st_size > MAX_MANIFEST_BYTES:  # refused before a byte is allocated
                raise CheckpointFormatError(
                    f"{where} is {st.st_size} bytes, over the {MAX_MANIFEST_BYTES} limit"
                )
            return read_bytes(file, st.st_size, 0)
        finally:
            file.close()

    def open_file(self, name: str) -> LocalFile:
        where = f"{self.location}/{name}"
        try:
            fd, st = open_regular(name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{where}: data file listed in the manifest is missing") from None
        except NotRegularFileError as exc:  # F-4: nothing outside the directory is read
            raise CheckpointFormatError(f"{where}: data file is a {exc.kind}, not a regular file") from None
        except OSError as exc:
            raise CheckpointFormatError(f"{where}: cannot open data file safely ({exc})") from exc
        return LocalFile(name, fd, st.st_size)

    def replaced(self) -> bool:
        pinned = os.fstat(self._dir_fd)
        try:
            now = os.stat(self._path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.location} was deleted while it was being read (retention, or another process); "
                "it is no longer a checkpoint"
            ) from None
        return (now.st_dev, now.st_ino) != (pinned.st_dev, pinned.st_ino)

    def close(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> LocalGeneration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_generation(root: Path) -> LocalGeneration:
    """Pin the checkpoint directory at ``root`` (CheckpointNotFoundError if there is none)."""
    # F-2 names the directory itself: a symbolic link to a hidden temporary directory is
    # refused, a link with a hidden name to a checkpoint is read (validate agrees).
    if layout.is_hidden(os.path.basename(os.path.realpath(root))):
        raise CheckpointNotFoundError(f"{root} is a hidden (temporary) directory, never a checkpoint")
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{root} is not a checkpoint (no such directory)") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{root} is not a checkpoint (not a directory)") from None
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot open {root}: {exc}") from exc
    return LocalGeneration(root, fd)
