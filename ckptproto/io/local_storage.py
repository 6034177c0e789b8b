"""The local-filesystem backend of the storage seam: everything ``commit`` and ``writer``
guarantee (files fsynced, the manifest last, a locked hidden temporary directory renamed into
place with a no-replace rename or renameat2 exchange, leftovers of dead writers swept)::

    staging = LOCAL.begin(Path("ckpt/step_10"), overwrite=False)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ckptproto.format.manifest import FileEntry
from ckptproto.io import commit, writer
from ckptproto.io.plan import FilePlan


class LocalStorage:
    """Checkpoints as directories of a POSIX file system (``ckptproto.io.commit``)."""

    def begin(self, final: Path, *, overwrite: bool) -> str:
        return str(commit.begin(final, overwrite=overwrite))

    def write_file(self, staging: str, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
        return writer.write_file(Path(staging), plan, sources)

    def write_small_file(self, staging: str, name: str, data: bytes) -> None:
        writer.write_small_file(Path(staging), name, data)

    def commit(self, staging: str, final: Path, *, overwrite: bool) -> None:
        commit.finish(Path(staging), final, overwrite=overwrite)

    def abort(self, staging: str) -> None:
        commit.abort(Path(staging))


LOCAL = LocalStorage()
