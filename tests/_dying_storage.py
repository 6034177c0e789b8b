"""A local storage whose data-file write kills the process writing it while ``DIE_MARKER``
exists: the checkpoint writer process dies in the middle of a save (tests/test_writer_process.py
puts this directory on the child's PYTHONPATH so that it can unpickle the class)."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

from ckptproto.format.manifest import FileEntry
from ckptproto.io.local_storage import LocalStorage
from ckptproto.io.plan import FilePlan


class DyingStorage(LocalStorage):
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def write_file(self, staging: str, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
        if self.marker.exists():
            os.kill(os.getpid(), signal.SIGKILL)
        return super().write_file(staging, plan, sources)
