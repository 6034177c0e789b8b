"""The storage seam: where a save's bytes go, behind a small protocol the pipeline calls.

The save pipeline (``ckptproto.io.pipeline``) never opens a file itself: it begins a
checkpoint, writes data files from buffers and the manifest into it, and commits or aborts
it through a :class:`Storage`. :func:`resolve` picks the backend for a location::

    storage, final = resolve("checkpoints/step_10")      # LocalStorage(), Path(...)
    staging = storage.begin(final, overwrite=False)
    entry = storage.write_file(staging, file_plan, sources)
    storage.write_small_file(staging, "manifest.json", data)
    storage.commit(staging, final, overwrite=False)

The local filesystem is the only backend today. A URL (``s3://bucket/prefix``, ``gs://...``)
is refused loudly (CheckpointError naming it and what to do) instead of becoming a local
folder named ``s3:``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ckptproto.errors import CheckpointError
from ckptproto.format.manifest import FileEntry
from ckptproto.io.local_storage import LOCAL
from ckptproto.io.plan import FilePlan

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class Storage(Protocol):
    """What the save pipeline needs from a backend. ``staging`` is an opaque string a backend
    hands out in :meth:`begin` and accepts on any rank (it crosses the process group)."""

    def begin(self, final: Path, *, overwrite: bool) -> str:
        """Check the destination (CheckpointExistsError unless ``overwrite``) and open a new,
        invisible staging area for one checkpoint."""
        ...

    def write_file(self, staging: str, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
        """Write one data file of ``plan`` durably from ``sources``; its size and CRC."""
        ...

    def write_small_file(self, staging: str, name: str, data: bytes) -> None:
        """Write a small file (the manifest) durably."""
        ...

    def commit(self, staging: str, final: Path, *, overwrite: bool) -> None:
        """Make the staged checkpoint visible at ``final`` at once (never half of it)."""
        ...

    def abort(self, staging: str) -> None:
        """Remove a staging area after a failed save."""
        ...


def resolve(location: str | os.PathLike[str]) -> tuple[Storage, Path]:
    """The backend for ``location`` and the location as that backend names it::

    storage, final = resolve("checkpoints/step_10")
    """
    text = os.fspath(location)
    found = _URL.match(text) if isinstance(text, str) else None
    if found is not None:
        raise CheckpointError(
            f"{text}: no storage backend for {found.group(1)}:// URLs; ckptproto saves to file "
            "systems only: mount the bucket (e.g. mountpoint-s3, gcsfuse) and pass the mounted path"
        )
    return LOCAL, Path(location)
