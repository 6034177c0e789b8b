"""Names inside and around a checkpoint directory."""

from __future__ import annotations

import re
import uuid

MANIFEST_NAME = "manifest.json"
TEMP_MARKER = ".ckptproto-tmp-"
TRASH_MARKER = ".ckptproto-old-"
_DATA_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.safetensors")


def data_file_name(rank: int, index: int = 0) -> str:
    """``data-00003-000.safetensors``: the first data file written by rank 3."""
    return f"data-{rank:05d}-{index:03d}.safetensors"


def is_valid_data_file_name(name: object) -> bool:
    """A plain file name inside the checkpoint: no separators, no ``..``, not hidden."""
    return isinstance(name, str) and _DATA_FILE_RE.fullmatch(name) is not None and ".." not in name


def temp_name(final_name: str) -> str:
    """A hidden sibling name for a checkpoint being written; never mistaken for a checkpoint."""
    return f".{final_name}{TEMP_MARKER}{uuid.uuid4().hex[:12]}"


def trash_name(final_name: str) -> str:
    """A hidden sibling name an overwritten checkpoint is moved to before it is deleted."""
    return f".{final_name}{TRASH_MARKER}{uuid.uuid4().hex[:12]}"


def is_leftover(name: str) -> bool:
    """A temporary or trash directory left by an interrupted save."""
    return name.startswith(".") and (TEMP_MARKER in name or TRASH_MARKER in name)


def is_hidden(name: str) -> bool:
    """Names starting with '.' are never checkpoints (temporary directories live there)."""
    return name.startswith(".")
