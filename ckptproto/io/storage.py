"""The storage seam: where a checkpoint's bytes go and come from, behind one small protocol.

The save pipeline (``ckptproto.io.pipeline``), the readers (``ckptproto.io.reader``) and the
policy layer never open a file themselves: they go through a :class:`Storage`, which
:func:`ckptproto.io.backends.resolve` picks for a location::

    storage, final = resolve("checkpoints/step_10")        # LocalStorage, Path(...)
    storage, final = resolve("s3://bucket/run/step_10")    # S3Storage, ObjectLocation(...)

    staging = storage.begin(final, overwrite=False)        # save
    name = storage.data_file_name(staging, rank=0)
    entry = storage.write_file(staging, file_plan, sources)
    storage.write_small_file(staging, "manifest.json", data)
    storage.commit(staging, final, overwrite=False)

    with storage.open(final) as generation:                # read one generation
        manifest_bytes = generation.read_manifest()
        data = generation.open_file(name)
        data.read_into(offset, [memoryview(buffer)])

    storage.entries(final.parent)                            # namespace
    storage.remove(final)

Backends: the local file system (:mod:`ckptproto.io.local_storage`), and S3-compatible object
stores (:mod:`ckptproto.io.s3_storage`, optional extra ``ckptproto[s3]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ckptproto.format.manifest import FileEntry
from ckptproto.io.plan import FilePlan
from ckptproto.location import Location


class StoredFile(Protocol):
    """One data file of a pinned generation, open for ranged reads."""

    name: str
    size: int

    def read_into(self, offset: int, views: Sequence[memoryview]) -> int:
        """Fill ``views`` one after another with the bytes from ``offset`` on; the number of
        bytes read (less than asked only where the file ends). Safe to call from many threads
        at once."""
        ...

    def fileno(self) -> int | None:
        """A descriptor to memory-map, or None where the backend has none (object stores:
        ``load(mmap=True)`` then reads into memory)."""
        ...

    def close(self) -> None: ...


def read_bytes(file: StoredFile, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes of ``file`` from ``offset`` (fewer where it ends), copied once into
    the bytes returned (a manifest of 100,000 tensors is ~17 MB)::

        prefix = read_bytes(file, 8, 0)
    """
    buf = bytearray(n)
    got = file.read_into(offset, [memoryview(buf)])
    with memoryview(buf) as view:
        return view[:got].tobytes()


class Generation(Protocol):
    """One committed version of a checkpoint, pinned: every file opened through it belongs to
    the manifest :meth:`read_manifest` returned, even while a save with ``overwrite=True`` or
    retention replaces or deletes the checkpoint (FORMAT.md F-38)."""

    location: Location

    def read_manifest(self) -> bytes:
        """The manifest's bytes (CheckpointNotFoundError when there is none; CheckpointFormatError
        over ``MAX_MANIFEST_BYTES``)."""
        ...

    def open_file(self, name: str) -> StoredFile:
        """Open a data file listed in the manifest. A missing file raises
        CheckpointCorruptError, one that is not a regular file CheckpointFormatError."""
        ...

    def replaced(self) -> bool:
        """After a failure to open: True if another generation now stands at the location
        (open that one instead); CheckpointNotFoundError if none does; False if this
        generation is still the checkpoint there."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Generation: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class Listed:
    """An entry directly under a location: ``is_dir`` for a directory (local) or a common
    prefix (object store)."""

    name: str
    is_dir: bool


class Storage(Protocol):
    """What ckptproto needs from a backend. ``staging`` is an opaque string a backend hands out
    in :meth:`begin` and accepts on any rank (it crosses the process group)."""

    # -- saving -------------------------------------------------------------------------
    def begin(self, final: Location, *, overwrite: bool) -> str:
        """Check the destination (CheckpointExistsError unless ``overwrite``) and open a new,
        invisible staging area for one checkpoint."""
        ...

    def data_file_name(self, staging: str, rank: int) -> str:
        """The name rank ``rank`` gives its data file in this save (FORMAT.md F-3)."""
        ...

    def write_file(self, staging: str, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
        """Write one data file of ``plan`` durably from ``sources``; its size and CRC."""
        ...

    def write_small_file(self, staging: str, name: str, data: bytes) -> None:
        """Write a small file (the manifest) durably."""
        ...

    def commit(self, staging: str, final: Location, *, overwrite: bool) -> None:
        """Make the staged checkpoint visible at ``final`` at once (never half of it); without
        ``overwrite`` never replace a checkpoint committed there meanwhile."""
        ...

    def abort(self, staging: str) -> None:
        """Remove a staging area after a failed save."""
        ...

    # -- reading ------------------------------------------------------------------------
    def open(self, location: Location) -> Generation:
        """Pin the generation committed at ``location`` (CheckpointNotFoundError if none)."""
        ...

    # -- namespace ----------------------------------------------------------------------
    def exists(self, location: Location) -> bool:
        """Anything at all stands at ``location`` (a checkpoint or not)."""
        ...

    def is_committed(self, location: Location) -> bool:
        """``location`` holds a committed checkpoint (a manifest under a non-hidden name)."""
        ...

    def entries(self, location: Location) -> list[Listed]:
        """The entries directly under ``location``, sorted by name ([] if there is none)."""
        ...

    def read_head(self, location: Location, size: int) -> bytes:
        """Up to ``size`` first bytes of the file at ``location`` (sniffing foreign formats)."""
        ...

    def remove(self, location: Location) -> None:
        """Delete the committed checkpoint at ``location`` so that no crash leaves a part of it
        looking committed (it stops being a checkpoint first, then its files go)."""
        ...

    def remove_leftovers(self, parent: Location) -> list[Location]:
        """Remove what interrupted saves left under ``parent`` (never a live save's files)."""
        ...
