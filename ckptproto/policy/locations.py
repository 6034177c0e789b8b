"""Checkpoint locations as the policy layer, the CLI and the integrations handle them: a local
path or an object-store URL, resolved to its storage backend once, joined with ``root / name``::

    storage, root = resolve("s3://bucket/run")         # or resolve("checkpoints")
    for entry in storage.entries(root):
        save(state, as_arg(root / entry.name), overwrite=True)

Everything that touches a checkpoint location goes through the storage
(:mod:`ckptproto.io.storage`); the few things that are local by nature (symbolic links, FIFOs,
foreign formats' files) use :func:`local_only`, which refuses a URL loudly instead of creating
a folder named ``s3:``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ckptproto.errors import CheckpointError
from ckptproto.io.backends import resolve
from ckptproto.location import Location, ObjectLocation, parse_location

__all__ = ["Location", "LocationLike", "as_arg", "local_only", "parse_location", "resolve"]

LocationLike = str | os.PathLike[str] | Location


def as_arg(location: Location) -> str | Path:
    """``location`` as the public entry points (``save``, ``load``, ``read_info``...) take it:
    the path itself, or the URL text of an object-store location::

        save(state, as_arg(root / "checkpoint_step_10"))
    """
    return location if isinstance(location, Path) else str(location)


def local_only(location: LocationLike, what: str) -> Path:
    """``location`` as a local path; CheckpointError naming the URL and ``what`` needs a local
    path where it is an object-store URL::

        path = local_only(dst, "writing a torch.save file")
    """
    parsed = parse_location(location)
    if isinstance(parsed, ObjectLocation):
        raise CheckpointError(
            f"{parsed}: {what} needs a local path, not a {parsed.scheme}:// URL; "
            "use a local path (copy the file there first, or write it there and upload it)"
        )
    return parsed
