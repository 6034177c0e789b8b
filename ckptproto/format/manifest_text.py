"""A manifest's text read as ckptproto writes it, in C-level passes: the quick way in for
:meth:`Manifest.parse`, which takes the general JSON path whenever this one declines.

JSON parsing of the tensor table is most of a large manifest's cost: ~170 bytes and three
objects per tensor, each object through the duplicate-key hook. Written by ckptproto, the
table is regular text (compact, members in one order, strings without escapes), so one
regular expression pass reads it as rows of three strings, and the few distinct rows are
parsed and checked as JSON. Every other member is parsed by the strict JSON scanner.

The result is the one the general path gives, or None: this module refuses nothing itself.
Any text it does not recognise (spaces, another member order, an escape, a lone surrogate
escape, a repeated top-level member, an entry of several chunks) makes it decline, and the
general path then parses the document, raising what it raises::

    split = split_members(text)   # None: parse the text as JSON
    if split is not None:
        members, rows = split     # rows: None where "tensors" was parsed as JSON
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from itertools import chain
from json.scanner import make_scanner
from typing import Any, cast

from ckptproto.format import strict_json

# A JSON string without escapes or control characters: its text is its value.
_PLAIN = r'[^"\\\x00-\x1f]*'
# A canonical JSON integer, bounded so every one converts exactly (limits are checked later).
_INT = r"(?:0|[1-9][0-9]{0,18})"
_DIMS = rf"\[(?:{_INT}(?:,{_INT})*)?\]"
# One entry of one chunk holding the tensor whole, as the writer spells it, in three groups:
# the entry up to the key (dtype, shape, file), the key, and after it (offsets, chunk shape),
# between the fixed texts below; then the separator: "," or the end of the table's text
# (where the search stops).
ENTRY_TEXT = ('{"dtype":"', '","key":"', '","offsets":', "}]}")
_ENTRY = re.compile(
    re.escape(ENTRY_TEXT[0])
    + rf'([a-z0-9_]+","shape":{_DIMS},"chunks":\[\{{"file":"{_PLAIN})'
    + re.escape(ENTRY_TEXT[1])
    + rf"({_PLAIN})"
    + re.escape(ENTRY_TEXT[2])
    + rf'(\[(?:0(?:,0)*)?\],"shape":{_DIMS})'
    + re.escape(ENTRY_TEXT[3])
    + r"(,|\Z)"
)
_ENTRY_FIXED = sum(map(len, ENTRY_TEXT))  # the characters of an entry outside its groups
_TABLE_END = "}]}]"  # the last entry's end and the table's "]"

# The strict parser's scanner (the same hooks as strict_json.loads's usual path): one value.
_scan = cast(
    Callable[[str, int], tuple[Any, int]],
    make_scanner(
        json.JSONDecoder(  # type: ignore[arg-type]  # typeshed's stub takes a scanner context
            object_pairs_hook=strict_json.no_duplicate_keys,
            parse_constant=strict_json.reject_constant,
            parse_float=strict_json.parse_float,
        )
    ),
)

# A table row: (the entry's text up to its key, the key, the text after it, the separator).
Row = tuple[str, str, str, str]


def split_members(text: str) -> tuple[dict[str, Any], list[Row] | None] | None:
    """The top-level members of the manifest ``text``, and the rows of its ``"tensors"`` table
    when that table is in the writer's form (the member is then absent from the dict);
    None when the text is not read here (the caller parses it as JSON)."""
    if not strict_json.c_int_limit() or strict_json.has_surrogate_escape(text):
        return None  # the general path's own int and surrogate handling
    try:
        return _members(text)
    except (ValueError, StopIteration, RecursionError, IndexError):  # CheckpointFormatError is a ValueError
        return None  # malformed or refused: the general path says how


def _members(text: str) -> tuple[dict[str, Any], list[Row] | None] | None:
    if text[:2] != '{"':
        return None
    members: dict[str, Any] = {}
    rows: list[Row] | None = None
    pos = 1
    while True:
        if text[pos] != '"':
            return None
        key, pos = _scan(text, pos)  # a string: the key
        if text[pos] != ":" or key in members or (key == "tensors" and rows is not None):
            return None
        pos += 1
        if key == "tensors" and text[pos] == "[":
            found = _table_rows(text, pos + 1)
            if found is not None:
                rows, pos = found
            else:
                members[key], pos = _scan(text, pos)
        else:
            members[key], pos = _scan(text, pos)
        if text[pos] == ",":
            pos += 1
            continue
        if text[pos] == "}" and pos + 1 == len(text):
            return members, rows
        return None


def _table_rows(text: str, start: int) -> tuple[list[Row], int] | None:
    """The rows of the table whose text starts at ``start`` (after its "["), and the position
    after its "]"; None unless every entry is in the writer's form."""
    if text[start] == "]":
        return [], start + 1
    end = text.find(_TABLE_END, start)
    if end < 0:
        return None
    end += len(_TABLE_END) - 1  # the table's "]": the entries' text stops before it
    rows: list[Row] = _ENTRY.findall(text, start, end)
    # Matches never overlap and lie between start and end, so when their lengths add up to
    # that span they tile it: the text is these entries, back to back, and nothing else.
    if len(rows) * _ENTRY_FIXED + sum(map(len, chain.from_iterable(rows))) != end - start:
        return None
    return rows, end + 1
