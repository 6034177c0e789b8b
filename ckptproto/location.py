"""Where a checkpoint lives: a local path, or a URL of an object store.

Local checkpoints are named by :class:`pathlib.Path`; checkpoints in an object store by an
:class:`ObjectLocation`, which joins and splits like a path (``root / "step_10"``, ``.name``,
``.parent``) so the policy layer handles both the same way::

    root = parse_location("s3://bucket/runs/a")      # ObjectLocation
    (root / "step_10").name                          # "step_10"
    str(root / "step_10")                            # "s3://bucket/runs/a/step_10"
    parse_location("checkpoints")                    # PosixPath('checkpoints')

An ObjectLocation has no ``__fspath__`` on purpose: ``open()``/``os.*`` refuse it instead of
creating a local folder named ``s3:``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from ckptproto.errors import CheckpointError

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


@dataclass(frozen=True)
class ObjectLocation:
    """``scheme://bucket/key`` with ``key`` a ``/``-separated prefix without a trailing ``/``
    (``""`` for the bucket itself)."""

    scheme: str
    bucket: str
    key: str

    def __truediv__(self, name: str) -> ObjectLocation:
        if not name or "/" in name or name in (".", ".."):
            raise CheckpointError(f"{self}: {name!r} is not a plain name (no '/', '.' or '..')")
        return ObjectLocation(self.scheme, self.bucket, f"{self.key}/{name}" if self.key else name)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectLocation:
        return ObjectLocation(self.scheme, self.bucket, self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def object_key(self, name: str) -> str:
        """The key of an object directly under this location: ``prefix/name``."""
        return f"{self.key}/{name}" if self.key else name

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}" if self.key else f"{self.scheme}://{self.bucket}"


Location: TypeAlias = Path | ObjectLocation


def url_scheme(text: str) -> str | None:
    """The scheme of a URL (``"s3"``), or None for a path."""
    found = _URL.match(text)
    return found.group(1).lower() if found else None


def parse_location(location: str | os.PathLike[str] | ObjectLocation) -> Location:
    """A Path for a local path, an ObjectLocation for ``scheme://bucket/key`` (any scheme;
    :func:`ckptproto.io.storage.resolve` decides which ones a backend serves)."""
    if isinstance(location, ObjectLocation):
        return location
    text = os.fspath(location)
    if not isinstance(text, str):
        return Path(os.fsdecode(text))
    scheme = url_scheme(text)
    if scheme is None:
        return Path(text)
    rest = text[len(scheme) + 3 :]
    bucket, _, key = rest.partition("/")
    parts = [p for p in key.split("/") if p]
    if not bucket or any(p in (".", "..") for p in parts):
        raise CheckpointError(f"{text}: a URL must be {scheme}://bucket/prefix without '.' or '..' parts")
    return ObjectLocation(scheme, bucket, "/".join(parts))
