"""Reading checkpoints from an S3-compatible store: one pinned generation, data files read by
concurrent ranged GETs into the caller's buffers::

    with S3Generation(ObjectLocation("s3", "bucket", "run/step_10")) as generation:
        manifest = generation.read_manifest()
        data = generation.open_file("data-00000-000.3f2a9c1b7e40aa01.safetensors")
        data.read_into(0, [memoryview(buffer)])

A generation is pinned by the manifest's ETag: data object names are unique per save
(:mod:`ckptproto.io.s3_storage`), so every data object a manifest names belongs to it alone. An
overwrite deletes the old generation's objects after its new manifest is in; a reader then
finds an object missing, asks :meth:`S3Generation.replaced`, and starts again (F-38).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
)
from ckptproto.format import layout
from ckptproto.format.manifest import MAX_MANIFEST_BYTES
from ckptproto.io import s3_client, threads
from ckptproto.io.storage import Generation
from ckptproto.location import Location, ObjectLocation

READ_CONCURRENCY = 8  # parts (threads.BATCH_BYTES each) fetched by one request batch


def _meta_version(meta: Any) -> tuple[object, ...]:
    """What tells two versions of an object apart (the ETag, where the store gives one)."""
    return (meta.get("e_tag"), meta.get("size"), meta.get("last_modified"))


def get_manifest(location: ObjectLocation) -> tuple[bytes, tuple[object, ...]]:
    """The bytes of the manifest at ``location`` and its version (CheckpointNotFoundError if
    there is none, CheckpointFormatError over ``MAX_MANIFEST_BYTES``)."""
    obstore = s3_client.obstore_module()
    url = location / layout.MANIFEST_NAME
    try:
        result = obstore.get(s3_client.store(location.bucket), url.key)
        meta = result.meta
        if int(meta["size"]) > MAX_MANIFEST_BYTES:
            raise CheckpointFormatError(
                f"{url}: the manifest is {meta['size']} bytes, over the {MAX_MANIFEST_BYTES} readers accept"
            )
        return bytes(result.bytes()), _meta_version(meta)
    except Exception as exc:
        if s3_client.is_not_found(exc) and "NoSuchBucket" not in str(exc):
            raise CheckpointNotFoundError(
                f"{location}: no checkpoint here (no {layout.MANIFEST_NAME}); a prefix without one "
                "is not a checkpoint"
            ) from exc
        raise s3_client.failure(exc, url, "reading the manifest") from exc


def read_range(location: ObjectLocation, start: int, length: int) -> bytes:
    """``length`` bytes of the object at ``location`` from ``start`` (which must exist)."""
    if length <= 0:
        return b""
    obstore = s3_client.obstore_module()
    try:
        return bytes(
            obstore.get_range(s3_client.store(location.bucket), location.key, start=start, length=length)
        )
    except Exception as exc:
        raise s3_client.failure(exc, location, "reading") from exc


def _head(location: ObjectLocation, missing: Exception) -> Any:
    """The metadata of the object at ``location``; ``missing`` raised if there is none."""
    obstore = s3_client.obstore_module()
    try:
        return obstore.head(s3_client.store(location.bucket), location.key)
    except Exception as exc:
        if s3_client.is_not_found(exc):
            raise missing from exc
        raise s3_client.failure(exc, location, "reading") from exc


class S3File:
    """One data object of a pinned generation (:class:`~ckptproto.io.storage.StoredFile`)."""

    def __init__(self, location: ObjectLocation, size: int, generation: S3Generation | None = None) -> None:
        self.location = location
        self.name = location.name
        self.size = size
        self._generation = generation

    def read_into(self, offset: int, views: Sequence[memoryview]) -> int:
        """Fill ``views`` from ``offset`` on with ranged GETs, ``READ_CONCURRENCY`` parts at a
        time for large reads; the bytes read (fewer only where the object ends)."""
        left = max(0, self.size - offset)
        ranges, at = [], offset
        for view in views:
            flat = view.cast("B") if view.format != "B" or view.ndim != 1 else view
            flat = flat[:left]
            if len(flat):
                ranges.append((at, flat))
            at += len(flat)
            left -= len(flat)
        parts = threads.batches(ranges)
        for first in range(0, len(parts), READ_CONCURRENCY):
            self._fetch(parts[first : first + READ_CONCURRENCY])
        return at - offset

    def _fetch(self, parts: list[tuple[int, list[memoryview]]]) -> None:
        # One get_ranges call: the client fetches the parts concurrently (Python threads each
        # calling get_range were slower). coalesce=0: adjacent parts stay separate requests,
        # in parallel, instead of being merged into one sequential GET.
        obstore = s3_client.obstore_module()
        starts = [start for start, _ in parts]
        lengths = [sum(len(v) for v in views) for _, views in parts]
        try:
            got = obstore.get_ranges(
                s3_client.store(self.location.bucket),
                self.location.key,
                starts=starts,
                lengths=lengths,
                coalesce=0,
            )
        except Exception as exc:
            if s3_client.is_not_found(exc) and "NoSuchBucket" not in str(exc):
                raise self._missing() from exc
            where = f"reading bytes {starts[0]}..{starts[-1] + lengths[-1]}"
            raise s3_client.failure(exc, self.location, where) from exc
        for (start, views), length, data in zip(parts, lengths, got, strict=True):
            source = memoryview(data)
            if len(source) != length:
                raise CheckpointCorruptError(
                    f"{self.location}: {len(source)} bytes at {start}, expected {length} (the object changed?)"
                )
            position = 0
            for view in views:
                view[:] = source[position : position + len(view)]
                position += len(view)

    def _missing(self) -> CheckpointError:
        """Why an object that was there at open is gone: its generation was replaced (an
        overwrite deletes the old objects) or deleted, or else it is damage."""
        if self._generation is not None and self._generation.replaced():  # NotFound if deleted
            return CheckpointError(
                f"{self.location}: the checkpoint was replaced by another save while being read "
                "(its data objects are deleted once the new one is in; F-38): read it again"
            )
        return CheckpointCorruptError(f"{self.location}: data file listed in the manifest is missing")

    def fileno(self) -> int | None:
        return None  # nothing to memory-map: load(mmap=True) reads into memory

    def close(self) -> None:
        pass  # nothing is held open between requests


class S3Generation:
    """The generation committed at ``location`` when it was opened
    (:class:`~ckptproto.io.storage.Generation`)."""

    def __init__(self, location: ObjectLocation) -> None:
        if not location.key or layout.is_hidden(location.name):
            raise CheckpointNotFoundError(
                f"{location}: a checkpoint name must not be empty or start with '.' (F-2)"
            )
        self.location: Location = location
        self._where = location
        self._manifest, self._version = get_manifest(location)

    def read_manifest(self) -> bytes:
        return self._manifest

    def open_file(self, name: str) -> S3File:
        where = f"{self._where}/{name}"
        if not layout.is_valid_data_file_name(name):
            raise CheckpointFormatError(f"{where}: not a valid data file name (F-3)")
        location = self._where / name
        meta = _head(
            location, CheckpointCorruptError(f"{location}: data file listed in the manifest is missing")
        )
        return S3File(location, int(meta["size"]), self)

    def replaced(self) -> bool:
        gone = CheckpointNotFoundError(f"{self._where}: the checkpoint was deleted while being read")
        return _meta_version(_head(self._where / layout.MANIFEST_NAME, gone)) != self._version

    def close(self) -> None:
        pass  # nothing is held open

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
