"""Removing what interrupted saves left in an S3 store (FORMAT.md F-42)::

    removed = s3_sweep.sweep(ObjectLocation("s3", "bucket", "run/step_10"), grace_s=3600)

A save puts a marker ``.ckptproto-writing.<token>`` before its first data object and deletes
it after its commit or failure. A data object that the committed manifest does not list is
deleted once its save's marker is gone or older than the grace period; an object whose name
carries no token (not ckptproto's) is never touched.
"""

from __future__ import annotations

from datetime import datetime, timezone

from ckptproto.format import layout
from ckptproto.io import s3_objects
from ckptproto.location import Location, ObjectLocation


def sweep(prefix: ObjectLocation, grace_s: float) -> list[Location]:
    """Delete the dead saves' data objects and markers directly under ``prefix``; what it
    deleted."""
    # Listed before the manifest is read: a save that commits in between had its marker
    # listed (so its objects are kept) or is in the manifest read afterwards.
    objects = s3_objects.listing(prefix)
    marker = s3_objects.MARKER_PREFIX
    markers = {
        name[len(marker) :]: meta["last_modified"] for name, meta in objects if name.startswith(marker)
    }
    if layout.MANIFEST_NAME in {name for name, _ in objects}:
        referenced = s3_objects.listed_files(prefix)
        if referenced is None:
            return []  # a manifest that does not parse: nothing is judged unreferenced
    else:
        referenced = set()
    now = datetime.now(timezone.utc)

    def dead(token: str) -> bool:
        started = markers.get(token)
        return started is None or (now - started).total_seconds() >= grace_s

    doomed = []
    for name, _meta in objects:
        token = s3_objects.token_of(name)
        if token is not None and name not in referenced and dead(token):
            doomed.append(name)
    doomed += [marker + t for t in sorted(markers) if dead(t)]
    s3_objects.delete(prefix, doomed)
    return [prefix / name for name in doomed]
