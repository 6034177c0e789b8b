"""Shared by the reliability tests: the stress switch and the figures report."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STRESS = os.environ.get("CKPTPROTO_STRESS") == "1"


def report(name: str, figures: dict[str, Any]) -> None:
    """Print one JSON line of figures; also append it to $CKPTPROTO_RELIABILITY_REPORT."""
    line = json.dumps({"test": name, "stress": STRESS, **figures})
    print(line)
    target = os.environ.get("CKPTPROTO_RELIABILITY_REPORT")
    if target:
        with open(target, "a") as f:
            f.write(line + "\n")


@contextlib.contextmanager
def scratch_dir(fallback: Path, prefix: str) -> Iterator[Path]:
    """Where trials write: ``CKPTPROTO_CRASH_DIR`` if set, else /dev/shm (tmpfs: a SIGKILL
    loses no page-cache data, so process-crash semantics are those of a disk, and fsync costs
    nothing, so hundreds of trials fit in CI), else ``fallback`` (pytest's tmp_path)."""
    base = os.environ.get("CKPTPROTO_CRASH_DIR") or ("/dev/shm" if os.access("/dev/shm", os.W_OK) else "")
    if not base:
        yield fallback
        return
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
