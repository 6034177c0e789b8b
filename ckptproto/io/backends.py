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
    raise CheckpointError(
        f"{location}: no storage backend for {location.scheme}:// URLs; ckptproto saves to file "
        "systems only: mount the bucket (e.g. mountpoint-s3, gcsfuse) and pass the mounted path"
    )
