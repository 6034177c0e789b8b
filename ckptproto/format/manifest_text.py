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
        members, table = split    # table: None where "tensors" was parsed as JSON
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from itertools import chain
from json.scanner import make_scanner
from operator import itemgetter
from typing import Any, NamedTuple, cast

from ckptproto.format import strict_json
from ckptproto.tree import torch_column

# A JSON string without escapes or control characters: its text is its value.
_PLAIN = r'[^"\\\x00-\x1f]*'
# One entry of one chunk holding the tensor whole, as the writer spells it, in three groups
# between the fixed texts below: the entry up to the key (dtype, shape, file), the key, and
# after it (offsets, chunk shape); then "," or the end of the table's text (where the search
# stops). Numbers are matched loosely (digits and commas): the distinct rows are parsed as
# JSON, which refuses what JSON refuses ("01", "1,,2").
ENTRY_TEXT = ('{"dtype":"', '","key":"', '","offsets":', "}]}")
_ENTRY = re.compile(
    re.escape(ENTRY_TEXT[0])
    + rf'([a-z0-9_]+","shape":\[[0-9,]*\],"chunks":\[\{{"file":"{_PLAIN})'
    + re.escape(ENTRY_TEXT[1])
    + rf"({_PLAIN})"
    + re.escape(ENTRY_TEXT[2])
    + r'(\[[0,]*\],"shape":\[[0-9,]*\])'
    + re.escape(ENTRY_TEXT[3])
    + r"(?:,|\Z)"
)
_ENTRY_FIXED = sum(map(len, ENTRY_TEXT))  # the characters of an entry outside its groups
_TABLE_END = "}]}]"  # the last entry's end and the table's "]"


def _scanner(**hooks: Any) -> Callable[[str, int], tuple[Any, int]]:
    """A JSON scanner (one value at a position) with the strict parser's number hooks."""
    decoder = json.JSONDecoder(
        parse_constant=strict_json.reject_constant, parse_float=strict_json.parse_float, **hooks
    )
    return cast(Callable[[str, int], tuple[Any, int]], make_scanner(decoder))  # type: ignore[arg-type]


_scan_strict = _scanner(object_pairs_hook=strict_json.no_duplicate_keys)  # strict_json.loads's usual path
_scan_plain = _scanner()  # objects as dicts, in C: a repeated key is found by counting (_value)
# A key followed by whitespace before its colon (the count below sees only '":').
_SPACED_KEY = re.compile(r'"[ \t\n\r]+:')


class Table(NamedTuple):
    """A tensor table read from its text: each entry's key and form (its text before and after
    the key), and each distinct form parsed as the JSON of an entry whose key is ``""``."""

    keys: list[str]
    forms: list[tuple[str, str]]
    entries: dict[tuple[str, str], Any]


def split_members(text: str) -> tuple[dict[str, Any], Table | None] | None:
    """The top-level members of the manifest ``text``, and the rows of its ``"tensors"`` table
    when that table is in the writer's form (the member is then absent from the dict);
    None when the text is not read here (the caller parses it as JSON)."""
    if not strict_json.c_int_limit() or strict_json.has_surrogate_escape(text):
        return None  # the general path's own int and surrogate handling
    try:
        return _members(text)
    except (ValueError, StopIteration, RecursionError, IndexError):  # CheckpointFormatError is a ValueError
        return None  # malformed or refused: the general path says how


def _members(text: str) -> tuple[dict[str, Any], Table | None] | None:
    if text[:2] != '{"':
        return None
    members: dict[str, Any] = {}
    table: Table | None = None
    pos = 1
    while True:
        if text[pos] != '"':
            return None
        key, pos = _scan_plain(text, pos)  # a string: the key
        if text[pos] != ":" or key in members or (key == "tensors" and table is not None):
            return None
        pos += 1
        if key == "tensors" and text[pos] == "[":
            found = _table(text, pos + 1)
            if found is not None:
                table, pos = found
            else:
                members[key], pos = _value(text, pos)
        else:
            members[key], pos = _value(text, pos)
        if text[pos] == ",":
            pos += 1
            continue
        if text[pos] == "}" and pos + 1 == len(text):
            return members, table
        return None


def _table(text: str, start: int) -> tuple[Table, int] | None:
    """The table whose text starts at ``start`` (after its "["), and the position after its
    "]"; None unless every entry is in the writer's form and valid JSON."""
    if text[start] == "]":
        return Table([], [], {}), start + 1
    end = text.find(_TABLE_END, start)
    if end < 0:
        return None
    end += len(_TABLE_END) - 1  # the table's "]": the entries' text stops before it
    if text.count('{"file":', start, end) != text.count('{"dtype":', start, end):
        return None  # an entry of several chunks (a sharded tensor): not one of these rows
    rows: list[tuple[str, str, str]] = _ENTRY.findall(text, start, end)
    # Matches never overlap and lie between start and end. Counted with a "," after each but
    # the last (only the last can end at the end, without one), their lengths add up to the
    # span only when they tile it: the text is these entries, back to back, nothing else.
    if len(rows) * (_ENTRY_FIXED + 1) - 1 + sum(map(len, chain.from_iterable(rows))) != end - start:
        return None
    forms = list(zip(map(_HEAD, rows), map(_TAIL, rows), strict=True))
    # The distinct forms (a few in a usual state: its dtypes, shapes, files) as JSON, here,
    # so the document is known to be JSON before any of it is checked (the refusal order).
    entries = {
        form: json.loads("".join((ENTRY_TEXT[0], form[0], *ENTRY_TEXT[1:3], form[1], ENTRY_TEXT[3])))
        for form in set(forms)
    }
    return Table(list(map(_KEY, rows)), forms, entries), end + 1


_HEAD, _KEY, _TAIL = itemgetter(0), itemgetter(1), itemgetter(2)


def _value(text: str, pos: int) -> tuple[Any, int]:
    """The JSON value at ``pos`` and the position after it, parsed strictly. Objects are built
    in C without the duplicate-key hook (a Python call per object: most of a state's cost)
    when the value's text lets the keys be counted: with no backslash, every '"' delimits a
    string, so each key directly followed by its colon is one '":', and a '":' that is not a
    key (a string starting with ':') only adds to the count. The count then equals the
    members the parsed objects hold only if no key repeated; otherwise the value is parsed
    again with the hook, which names the repeated key."""
    value, end = _scan_plain(text, pos)
    if type(value) is dict or type(value) is list:
        span = text[pos:end]
        if "\\" in span or _SPACED_KEY.search(span) or span.count('":') != _members_in(value):
            return _scan_strict(text, pos)
    return value, end


_COLUMN_MIN = 8  # an object of this many members may be counted by torch_column


def _members_in(node: dict[str, Any] | list[Any]) -> int:
    """The members of every object in ``node`` (iteratively: it may nest deeply)."""
    total = 0
    stack = [node]
    pop, push = stack.pop, stack.append
    while stack:
        children: Any = pop()
        if type(children) is dict:
            total += len(children)
            if len(children) >= _COLUMN_MIN and torch_column(children) is not None:
                total += len(children)  # each value a reference of one member
                continue
            children = children.values()
        for child in children:
            kind = type(child)
            if kind is dict:
                if len(child) == 1 and "$torch" in child:  # a tensor reference: most objects
                    total += 1
                else:
                    push(child)
            elif kind is list:
                push(child)
    return total
