"""Names inside and around a checkpoint directory."""

from __future__ import annotations

import os
import re
import socket
import uuid
from dataclasses import dataclass

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


_HOST_RE = re.compile(r"[^A-Za-z0-9]")
_TAG_RE = re.compile(r"[0-9a-f]{12}P([0-9]{1,10})H([A-Za-z0-9]{1,64})")


def _owner_tag() -> str:
    """``{random}P{pid}H{host}`` (letters and digits only): who is writing, so cleanup can tell
    a dead writer's leftover from a live save in the same parent directory."""
    return f"{uuid.uuid4().hex[:12]}P{os.getpid()}H{this_host()}"


def temp_name(final_name: str) -> str:
    """A hidden sibling name for a checkpoint being written; never mistaken for a checkpoint:
    ``.step_10.ckptproto-tmp-3f2a9c1b7e40P4242Hnode7``."""
    return f".{final_name}{TEMP_MARKER}{_owner_tag()}"


def trash_name(final_name: str) -> str:
    """A hidden sibling name an overwritten checkpoint is moved to before it is deleted."""
    return f".{final_name}{TRASH_MARKER}{_owner_tag()}"


def is_leftover(name: str) -> bool:
    """A temporary or trash directory left by an interrupted save."""
    return name.startswith(".") and (TEMP_MARKER in name or TRASH_MARKER in name)


@dataclass(frozen=True)
class Leftover:
    """What a temporary (``trash=False``) or trash directory name says about its writer.
    ``pid``/``host`` are None for names written without an owner tag."""

    final_name: str
    trash: bool
    pid: int | None
    host: str | None


def parse_leftover(name: str) -> Leftover | None:
    """Decode a leftover name; None if ``name`` is not one.

    >>> parse_leftover(".step_10.ckptproto-tmp-3f2a9c1b7e40P4242Hnode7")
    Leftover(final_name='step_10', trash=False, pid=4242, host='node7')
    """
    if not is_leftover(name):
        return None
    trash = TRASH_MARKER in name and (
        TEMP_MARKER not in name or name.rfind(TRASH_MARKER) > name.rfind(TEMP_MARKER)
    )
    marker = TRASH_MARKER if trash else TEMP_MARKER
    final_name, _, tag = name[1:].rpartition(marker)
    m = _TAG_RE.fullmatch(tag)
    if m:
        return Leftover(final_name, trash, int(m.group(1)), m.group(2))
    return Leftover(final_name, trash, None, None)


def this_host() -> str:
    """This machine's name as it appears in leftover names."""
    return _HOST_RE.sub("_", socket.gethostname())[:64] or "unknown"


def is_hidden(name: str) -> bool:
    """Names starting with '.' are never checkpoints (temporary directories live there)."""
    return name.startswith(".")
