"""The local-filesystem backend of the storage seam: everything ``commit`` and ``writer``
guarantee (files fsynced, the manifest last, a locked hidden temporary directory renamed into
place with a no-replace rename or renameat2 exchange, leftovers of dead writers swept), and
``local_read``'s pinned generations for reading::

    staging = LOCAL.begin(Path("ckpt/step_10"), overwrite=False)
    with LOCAL.open(Path("ckpt/step_10")) as generation:
        manifest_bytes = generation.read_manifest()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ckptproto.errors import CheckpointError
from ckptproto.format import layout
from ckptproto.format.manifest import FileEntry
from ckptproto.format.regular_file import open_regular
from ckptproto.io import commit, local_read, sweep, writer
from ckptproto.io.plan import FilePlan
from ckptproto.io.storage import Generation, Listed
from ckptproto.location import Location


def _path(location: Location) -> Path:
    if not isinstance(location, Path):
        raise CheckpointError(f"{location}: the local file-system backend was given a URL")
    return location


class LocalStorage:
    """Checkpoints as directories of a POSIX file system (``ckptproto.io.commit``)."""

    def begin(self, final: Location, *, overwrite: bool) -> str:
        return str(commit.begin(_path(final), overwrite=overwrite))

    def data_file_name(self, staging: str, rank: int) -> str:
        return layout.data_file_name(rank)

    def write_file(self, staging: str, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
        return writer.write_file(Path(staging), plan, sources)

    def write_small_file(self, staging: str, name: str, data: bytes) -> None:
        if name == layout.MANIFEST_NAME:  # written last: it seals the directory for commit()
            commit.seal(Path(staging), name, data)
        else:
            writer.write_small_file(Path(staging), name, data)

    def commit(self, staging: str, final: Location, *, overwrite: bool) -> None:
        commit.finish(Path(staging), _path(final), overwrite=overwrite)

    def abort(self, staging: str) -> None:
        commit.abort(Path(staging))

    def open(self, location: Location) -> Generation:
        return local_read.open_generation(_path(location))

    def exists(self, location: Location) -> bool:
        return os.path.lexists(_path(location))

    def is_committed(self, location: Location) -> bool:
        return commit.is_committed(_path(location))

    def entries(self, location: Location) -> list[Listed]:
        try:
            with os.scandir(_path(location)) as entries:
                found = [Listed(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(found, key=lambda e: e.name)

    def read_head(self, location: Location, size: int) -> bytes:
        # open_regular, not open(): sniffing a FIFO would block; a symbolic link is not followed
        fd, _st = open_regular(_path(location))
        with os.fdopen(fd, "rb") as f:
            return f.read(size)

    def remove(self, location: Location) -> None:
        commit.discard(_path(location))

    def remove_leftovers(self, parent: Location) -> list[Location]:
        return list(sweep.remove_leftovers(_path(parent)))


LOCAL = LocalStorage()
