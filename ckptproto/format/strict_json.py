"""JSON parsing that refuses what two parsers could read differently: duplicate keys (one
parser keeps the first, another the last) and the non-standard NaN/Infinity constants."""

from __future__ import annotations

import json
from typing import Any

from ckptproto.errors import CheckpointFormatError


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that raises CheckpointFormatError on a repeated key."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CheckpointFormatError(f"duplicate JSON key {k!r}")
        out[k] = v
    return out


def reject_constant(name: str) -> Any:
    """``parse_constant`` hook: NaN, Infinity and -Infinity are not JSON."""
    raise CheckpointFormatError(f"non-standard JSON constant {name}")


def loads(text: str) -> Any:
    """``json.loads`` with both refusals: ``loads('{"a": 1, "a": 2}')`` raises."""
    return json.loads(text, object_pairs_hook=no_duplicate_keys, parse_constant=reject_constant)
