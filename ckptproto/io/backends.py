"""Which storage backend serves a location: :func:`resolve`::

storage, final = resolve("checkpoints/step_10")        # LocalStorage, Path(...)
storage, final = resolve("s3://bucket/run/step_10")    # S3Storage, ObjectLocation(...)
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptproto.errors import CheckpointError
from ckptproto.io.local_storage import LOCAL
from ckptproto.io.storage import Storage
from ckptproto.location import Location, ObjectLocation, parse_location


def resolve(location: str | os.PathLike[str] | Location) -> tuple[Storage, Location]:
    """The backend for ``location`` and the location as that backend names it::

    storage, final = resolve("checkpoints/step_10")
    storage, final = resolve("s3://bucket/run/step_10")
    """
    parsed = parse_location(location)
    if isinstance(parsed, Path):
        return LOCAL, parsed
    return _object_storage(parsed), parsed


def _object_storage(location: ObjectLocation) -> Storage:
    if location.scheme == "s3":
        # Imported here: the module is light, but its client library is an optional extra
        # that it imports only when a request is made.
        from ckptproto.io import s3_storage

        return s3_storage.S3
    raise CheckpointError(
        f"{location}: no storage backend for {location.scheme}:// URLs; ckptproto saves to file "
        "systems and s3:// (S3-compatible) stores only: mount the bucket (e.g. gcsfuse) and pass "
        "the mounted path"
    )
