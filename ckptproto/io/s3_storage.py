"""The object-store backend of the storage seam: checkpoints in S3-compatible stores
(``s3://bucket/prefix``; optional extra ``ckptproto[s3]``)::

    storage, final = resolve("s3://bucket/run/step_10")     # S3Storage, ObjectLocation
    ckptproto.save(state, "s3://bucket/run/step_10")

A checkpoint ``s3://b/p/step_10`` is the objects ``p/step_10/manifest.json`` and its data files.
There is no rename on an object store, so the commit works differently (FORMAT.md, "Object
stores"):

- every save names its data objects uniquely (``data-00000-000.<token>.safetensors``): a save
  never rewrites an object that a reader of an older generation may be reading, and two
  writers never clobber each other;
- the manifest is put last and is the commit marker (F-1): without ``overwrite`` by a
  conditional put (``If-None-Match: *``), so of racing writers exactly one commits; with
  ``overwrite`` the old generation's data objects are deleted after the new manifest is in;
- a save announces itself with a marker object ``.ckptproto-writing.<token>`` until it commits
  or fails; :meth:`S3Storage.remove_leftovers` deletes data objects that no manifest lists only
  once their save's marker is gone or older than a grace period.

Reading is in :mod:`ckptproto.io.s3_read`, the client and its errors in
:mod:`ckptproto.io.s3_client`.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from ckptproto.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)
from ckptproto.format import layout
from ckptproto.format.manifest import FileEntry, Manifest
from ckptproto.io import s3_client, s3_read, threads, writer
from ckptproto.io.plan import FilePlan
from ckptproto.io.storage import Generation, Listed
from ckptproto.location import Location, ObjectLocation, parse_location

MARKER_PREFIX = ".ckptproto-writing."
PART_BYTES = 16 << 20  # multipart part size: 8 parts in flight hold 128 MiB
MIN_PART_BYTES = 5 << 20  # S3's least part size (all but the last)
MAX_PARTS = 9_000  # S3 allows 10,000; parts grow past PART_BYTES for larger files
UPLOAD_CONCURRENCY = 8
SWEEP_GRACE_S = 3600.0  # a save whose marker is younger is presumed alive
_TOKEN = re.compile(r"[0-9a-f]{16}")
_DATA_TOKEN = re.compile(r"\.([0-9a-f]{16})\.safetensors$")


def _location(location: Location) -> ObjectLocation:
    if not isinstance(location, ObjectLocation):
        raise CheckpointError(f"{location}: the S3 backend was given a local path")
    return location


def _env_number(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        return float(text)
    except ValueError:
        raise CheckpointError(f"{name}={text!r} is not a number") from None


class S3Storage:
    """Checkpoints as object prefixes of an S3-compatible store.

    ``part_bytes`` (default 16 MiB, or ``CKPTPROTO_S3_PART_BYTES``): files larger than this
    are uploaded as multipart uploads of such parts, ``UPLOAD_CONCURRENCY`` at a time.
    ``sweep_grace_s`` (default 1 h, or ``CKPTPROTO_S3_SWEEP_GRACE_S``): how old a save's
    marker must be before :meth:`remove_leftovers` treats that save as dead; a save that takes
    longer than this must not run beside a sweep of its parent.
    """

    def __init__(self, *, part_bytes: int | None = None, sweep_grace_s: float | None = None) -> None:
        self._part_bytes = part_bytes
        self._sweep_grace_s = sweep_grace_s
        self._lock = threading.Lock()
        self._manifests: dict[str, bytes] = {}  # staging -> manifest bytes, put at commit

    @property
    def part_bytes(self) -> int:
        chosen = self._part_bytes
        if chosen is None:  # read at use: the shared instance outlives changes of the environment
            chosen = int(_env_number("CKPTPROTO_S3_PART_BYTES", PART_BYTES))
        return max(MIN_PART_BYTES, chosen)

    @property
    def sweep_grace_s(self) -> float:
        if self._sweep_grace_s is not None:
            return self._sweep_grace_s
        return _env_number("CKPTPROTO_S3_SWEEP_GRACE_S", SWEEP_GRACE_S)

    # -- saving -------------------------------------------------------------------------
    def begin(self, final: Location, *, overwrite: bool) -> str:
        final = _location(final)
        if not final.key or layout.is_hidden(final.name):
            raise CheckpointWriteError(f"{final}: a checkpoint name must not be empty or start with '.'")
        if not overwrite and self.is_committed(final):
            raise CheckpointExistsError(
                f"{final} already holds a checkpoint; pass overwrite=True to replace it"
            )
        token = uuid.uuid4().hex[:16]
        marker = {"pid": os.getpid(), "host": layout.this_host(), "time": time.time()}
        self._put(final, MARKER_PREFIX + token, json.dumps(marker).encode(), "starting the save")
        return json.dumps({"url": str(final), "token": token})

    def data_file_name(self, staging: str, rank: int) -> str:
        return f"data-{rank:05d}-000.{_staging(staging)[1]}.safetensors"

    def write_file(self, staging: str, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
        final, token = _staging(staging)
        where = final / plan.name
        if _DATA_TOKEN.search(plan.name) is None or f".{token}." not in plan.name:
            raise CheckpointWriteError(f"{where}: not a data file name of this save ({token})")
        views = [memoryview(plan.header)]
        position = len(plan.header)
        for at, view in writer.piece_ranges(plan, sources, str(where)):
            if at != position:
                raise CheckpointWriteError(f"{where}: the plan leaves a gap at byte {position}")
            views.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
            position += len(view)
        # The CRC is computed on the pool while the bytes are uploaded.
        pool = threads.pool()
        ranges, offset = [], 0
        for view in views:
            ranges.append((offset, view))
            offset += len(view)
        crcs = [pool.submit(writer.crc_of, batch) for _, batch in threads.batches(ranges)]
        try:
            self._upload(final, plan.name, plan.size, views)
        finally:
            parts = threads.gather(crcs)
        return writer.file_entry(plan, parts)

    def _upload(self, final: ObjectLocation, name: str, size: int, views: list[memoryview]) -> None:
        obstore = s3_client.obstore_module()
        key = final.object_key(name)
        part = max(self.part_bytes, -(-size // MAX_PARTS))
        try:
            if size <= part:
                obstore.put(s3_client.store(final.bucket), key, b"".join(views), use_multipart=False)
            else:
                # obstore aborts its multipart upload when a part fails; a killed process leaves
                # one open (invisible; a bucket lifecycle rule removes it, docs/storage.md).
                obstore.put(
                    s3_client.store(final.bucket),
                    key,
                    views,
                    use_multipart=True,
                    chunk_size=part,
                    max_concurrency=UPLOAD_CONCURRENCY,
                )
        except Exception as exc:
            raise s3_client.failure(exc, final / name, "uploading", write=True) from exc

    def write_small_file(self, staging: str, name: str, data: bytes) -> None:
        final, _token = _staging(staging)
        if name == layout.MANIFEST_NAME:
            # The manifest is the commit marker on an object store: it is put by commit().
            with self._lock:
                self._manifests[staging] = bytes(data)
            return
        self._put(final, name, data, "writing")

    def commit(self, staging: str, final: Location, *, overwrite: bool) -> None:
        final = _location(final)
        staged, token = _staging(staging)
        if staged != final:
            raise CheckpointWriteError(f"{final}: this save was begun for {staged}")
        with self._lock:
            data = self._manifests.pop(staging, None)
        if data is None:
            raise CheckpointWriteError(f"{final}: commit before the manifest was written")
        manifest_url = final / layout.MANIFEST_NAME
        files = Manifest.parse(data, str(manifest_url)).files
        self._check_uploaded(final, files)
        obstore = s3_client.obstore_module()
        store = s3_client.store(final.bucket)
        key = final.object_key(layout.MANIFEST_NAME)
        old: set[str] = set()
        try:
            if overwrite:
                old = self._listed_files(final) or set()
                obstore.put(store, key, data, mode="overwrite", use_multipart=False)
            else:
                obstore.put(store, key, data, mode="create", use_multipart=False)
        except Exception as exc:
            if s3_client.is_conflict(exc):
                self.abort(staging)
                raise CheckpointExistsError(
                    f"{final} already holds a checkpoint (another save committed it first); "
                    "pass overwrite=True to replace it"
                ) from exc
            raise s3_client.failure(exc, manifest_url, "committing the manifest", write=True) from exc
        # Committed. What is left is tidying: failures here leave only leftovers for the sweep.
        self._delete(final, [*sorted(old - set(files)), MARKER_PREFIX + token], quiet=True)

    def _check_uploaded(self, final: ObjectLocation, files: dict[str, FileEntry]) -> None:
        """Every data object is there, whole, right before the manifest goes in (a sweep that
        misjudged this save as dead would otherwise leave a manifest naming missing files)."""
        obstore = s3_client.obstore_module()
        store = s3_client.store(final.bucket)

        def size_of(name: str) -> int:
            try:
                return int(obstore.head(store, final.object_key(name))["size"])
            except Exception as exc:
                if s3_client.is_not_found(exc):
                    return -1
                raise s3_client.failure(exc, final / name, "checking the upload", write=True) from exc

        names = sorted(files)
        # Its own threads: commit may run on a thread of the shared pool (an async save).
        with ThreadPoolExecutor(max(1, min(16, len(names)))) as pool:
            sizes = threads.gather([pool.submit(size_of, n) for n in names])
        for name, size in zip(names, sizes, strict=True):
            if size != files[name].size:
                state = "is missing" if size < 0 else f"has {size} bytes, not {files[name].size}"
                raise CheckpointWriteError(
                    f"{final / name} {state} at commit (removed by a sweep of leftovers?); nothing "
                    "was committed"
                )

    def abort(self, staging: str) -> None:
        final, token = _staging(staging)
        with self._lock:
            self._manifests.pop(staging, None)
        try:
            names = [o for o, _meta in self._objects(final) if f".{token}." in o]
        except CheckpointError:
            names = []
        self._delete(final, [*names, MARKER_PREFIX + token], quiet=True)

    # -- reading ------------------------------------------------------------------------
    def open(self, location: Location) -> Generation:
        return s3_read.S3Generation(_location(location))

    # -- namespace ----------------------------------------------------------------------
    def exists(self, location: Location) -> bool:
        location = _location(location)
        if location.key and self._head(location.parent, location.name) is not None:
            return True
        listed = self._list(location)
        return bool(listed["objects"] or listed["common_prefixes"])

    def is_committed(self, location: Location) -> bool:
        location = _location(location)
        if not location.key or layout.is_hidden(location.name):
            return False
        return self._head(location, layout.MANIFEST_NAME) is not None

    def entries(self, location: Location) -> list[Listed]:
        location = _location(location)
        listed = self._list(location)
        found = [Listed(p.rsplit("/", 1)[-1], True) for p in listed["common_prefixes"]]
        found += [Listed(o["path"].rsplit("/", 1)[-1], False) for o in listed["objects"]]
        return sorted(found, key=lambda e: e.name)

    def read_head(self, location: Location, size: int) -> bytes:
        location = _location(location)
        meta = self._head(location.parent, location.name) if location.key else None
        if meta is None:
            raise CheckpointNotFoundError(f"{location}: no such object")
        return s3_read.read_range(location, 0, min(size, int(meta["size"])))

    def remove(self, location: Location) -> None:
        location = _location(location)
        if not self.is_committed(location):
            raise CheckpointNotFoundError(f"{location}: no checkpoint to remove (no {layout.MANIFEST_NAME})")
        files = self._listed_files(location) or set()  # one that does not parse: left to the sweep
        # The manifest first: from then on no reader sees a checkpoint here, whatever is left.
        self._delete(location, [layout.MANIFEST_NAME])
        self._delete(location, sorted(files), quiet=True)
        self._sweep(location, self.sweep_grace_s)

    def remove_leftovers(self, parent: Location, *, grace_s: float | None = None) -> list[Location]:
        """Delete the data objects and markers of dead saves in every checkpoint prefix
        directly under ``parent``: objects no committed manifest lists, whose save's marker is
        gone or older than ``grace_s`` (default :attr:`sweep_grace_s`). A referenced object,
        a live save's object, or an object ckptproto did not name is never deleted."""
        parent = _location(parent)
        grace = self.sweep_grace_s if grace_s is None else grace_s
        removed: list[Location] = []
        for prefix in self._list(parent)["common_prefixes"]:
            removed += self._sweep(parent / prefix.rsplit("/", 1)[-1], grace)
        return removed

    def _sweep(self, prefix: ObjectLocation, grace: float) -> list[Location]:
        # Listed before the manifest is read: a save that commits in between had its marker
        # listed (so its objects are kept) or is in the manifest read afterwards.
        objects = self._objects(prefix)
        markers = {
            name[len(MARKER_PREFIX) :]: meta["last_modified"]
            for name, meta in objects
            if name.startswith(MARKER_PREFIX)
        }
        if layout.MANIFEST_NAME in {name for name, _ in objects}:
            referenced = self._listed_files(prefix)
            if referenced is None:
                return []  # a manifest that does not parse: nothing is judged unreferenced
        else:
            referenced = set()
        now = datetime.now(timezone.utc)

        def dead(token: str) -> bool:
            started = markers.get(token)
            return started is None or (now - started).total_seconds() >= grace

        doomed = []
        for name, _meta in objects:
            found = _DATA_TOKEN.search(name)
            if found is not None and name not in referenced and dead(found.group(1)):
                doomed.append(name)
        doomed += [MARKER_PREFIX + t for t in sorted(markers) if dead(t)]
        self._delete(prefix, doomed)
        return [prefix / name for name in doomed]

    # -- helpers ------------------------------------------------------------------------
    def _listed_files(self, location: ObjectLocation) -> set[str] | None:
        """The data files the manifest at ``location`` lists; None if there is no manifest or
        it does not parse."""
        try:
            data, _etag = s3_read.get_manifest(location)
        except CheckpointNotFoundError:
            return None
        try:
            return set(Manifest.parse(data, str(location / layout.MANIFEST_NAME)).files)
        except CheckpointError:
            return None

    def _put(self, final: ObjectLocation, name: str, data: bytes, doing: str) -> None:
        obstore = s3_client.obstore_module()
        try:
            obstore.put(s3_client.store(final.bucket), final.object_key(name), data, use_multipart=False)
        except Exception as exc:
            raise s3_client.failure(exc, final / name, doing, write=True) from exc

    def _head(self, location: ObjectLocation, name: str) -> dict[str, Any] | None:
        obstore = s3_client.obstore_module()
        try:
            return dict(obstore.head(s3_client.store(location.bucket), location.object_key(name)))
        except Exception as exc:
            if s3_client.is_not_found(exc):
                return None
            raise s3_client.failure(exc, location / name, "reading") from exc

    def _list(self, location: ObjectLocation) -> dict[str, Any]:
        obstore = s3_client.obstore_module()
        try:
            return dict(obstore.list_with_delimiter(s3_client.store(location.bucket), location.key or None))
        except Exception as exc:
            raise s3_client.failure(exc, location, "listing") from exc

    def _objects(self, location: ObjectLocation) -> list[tuple[str, dict[str, Any]]]:
        """(name, metadata) of the objects directly under ``location``."""
        return [(o["path"].rsplit("/", 1)[-1], o) for o in self._list(location)["objects"]]

    def _delete(self, location: ObjectLocation, names: Sequence[str], *, quiet: bool = False) -> None:
        if not names:
            return
        obstore = s3_client.obstore_module()
        try:
            obstore.delete(s3_client.store(location.bucket), [location.object_key(n) for n in names])
        except Exception as exc:
            if not quiet:
                raise s3_client.failure(exc, location, "deleting", write=True) from exc


def _staging(staging: str) -> tuple[ObjectLocation, str]:
    """The final location and the token of a save from its staging string."""
    try:
        doc = json.loads(staging)
        final, token = parse_location(doc["url"]), doc["token"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointWriteError(f"{staging!r} is not a staging area of the S3 backend") from None
    if not isinstance(final, ObjectLocation) or not isinstance(token, str) or not _TOKEN.fullmatch(token):
        raise CheckpointWriteError(f"{staging!r} is not a staging area of the S3 backend")
    return final, token


S3 = S3Storage()
"""The shared instance :func:`ckptproto.io.backends.resolve` hands out for ``s3://`` URLs."""
