"""Requests on the objects directly under a prefix of an S3 store, and the names ckptproto
gives them (the S3 backend's building blocks)::

    s3_objects.put(final, ".ckptproto-writing.3f2a9c1b7e40aa01", b"{}", "starting the save")
    names = [name for name, meta in s3_objects.listing(final)]
    s3_objects.delete(final, names)

Every client error becomes a ckptproto error naming the URL (:func:`s3_client.failure`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ckptproto.errors import CheckpointError, CheckpointNotFoundError
from ckptproto.format import layout
from ckptproto.format.manifest import Manifest
from ckptproto.io import s3_client, s3_read
from ckptproto.location import ObjectLocation

MARKER_PREFIX = ".ckptproto-writing."  # + token: a save in progress (JSON: pid, host, time)
TOKEN = re.compile(r"[0-9a-f]{16}")
_DATA_TOKEN = re.compile(r"\.([0-9a-f]{16})\.safetensors$")


def data_name(rank: int, token: str) -> str:
    """``data-00003-000.3f2a9c1b7e40aa01.safetensors``: rank 3's data object in save ``token``
    (F-3 allows it; F-41 wants it unique per save)."""
    return f"data-{rank:05d}-000.{token}.safetensors"


def token_of(name: str) -> str | None:
    """The save token in a data object's name; None for a name ckptproto did not give."""
    found = _DATA_TOKEN.search(name)
    return found.group(1) if found else None


def put(location: ObjectLocation, name: str, data: bytes, doing: str) -> None:
    """One PUT of ``data`` (small objects: markers, files other than data files)."""
    obstore = s3_client.obstore_module()
    try:
        obstore.put(s3_client.store(location.bucket), location.object_key(name), data, use_multipart=False)
    except Exception as exc:
        raise s3_client.failure(exc, location / name, doing, write=True) from exc


def head(location: ObjectLocation, name: str) -> dict[str, Any] | None:
    """The metadata of object ``name`` under ``location`` (size, e_tag, ...), None if absent."""
    obstore = s3_client.obstore_module()
    try:
        return dict(obstore.head(s3_client.store(location.bucket), location.object_key(name)))
    except Exception as exc:
        if s3_client.is_not_found(exc):
            return None
        raise s3_client.failure(exc, location / name, "reading") from exc


def list_dir(location: ObjectLocation) -> dict[str, Any]:
    """ListObjectsV2 with delimiter ``/``: ``common_prefixes`` and ``objects`` under it."""
    obstore = s3_client.obstore_module()
    try:
        return dict(obstore.list_with_delimiter(s3_client.store(location.bucket), location.key or None))
    except Exception as exc:
        raise s3_client.failure(exc, location, "listing") from exc


def listing(location: ObjectLocation) -> list[tuple[str, dict[str, Any]]]:
    """(name, metadata) of the objects directly under ``location``."""
    return [(o["path"].rsplit("/", 1)[-1], o) for o in list_dir(location)["objects"]]


def delete(location: ObjectLocation, names: Sequence[str], *, quiet: bool = False) -> None:
    """Delete objects ``names`` under ``location`` (absent ones are no error); ``quiet``: a
    failure is left for the sweep instead of raised (tidying after a commit)."""
    if not names:
        return
    obstore = s3_client.obstore_module()
    try:
        obstore.delete(s3_client.store(location.bucket), [location.object_key(n) for n in names])
    except Exception as exc:
        if not quiet:
            raise s3_client.failure(exc, location, "deleting", write=True) from exc


def listed_files(location: ObjectLocation) -> set[str] | None:
    """The data files the manifest at ``location`` lists; None if there is no manifest or it
    does not parse."""
    try:
        data, _version = s3_read.get_manifest(location)
    except CheckpointNotFoundError:
        return None
    try:
        return set(Manifest.parse(data, str(location / layout.MANIFEST_NAME)).files)
    except CheckpointError:
        return None
