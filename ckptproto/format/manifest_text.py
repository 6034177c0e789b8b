"""A manifest's text read as ckptproto writes it, in C-level passes: the quick way in for
:meth:`Manifest.parse`, which takes the general JSON path whenever this one declines.

JSON parsing of the tensor table is most of a large manifest's cost: ~170 bytes and three
objects per tensor, each object through the duplicate-key hook. Written by ckptproto, the
table is regular text (compact, members in one order, strings without escapes): one regular
expression pass splits it at its keys, and the text between two keys (the end of one entry
and the start of the next) repeats from entry to entry, so the few distinct pieces are
checked, and the few distinct entries parsed as JSON, once. Every other member is parsed by
the strict JSON scanner.

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
from json.scanner import make_scanner
from typing import Any, NamedTuple, cast

from ckptproto.format import strict_json
from ckptproto.tree import ColumnMemo, torch_column

# A JSON string without escapes or control characters: its text is its value.
_PLAIN = r'[^"\\\x00-\x1f]*'
# One entry of one chunk holding the tensor whole, as the writer spells it: fixed texts
# around three parts, the entry up to the key (dtype, shape, file), the key, and after it
# (offsets, chunk shape). Numbers are matched loosely (digits and commas): the distinct
# entries are parsed as JSON, which refuses what JSON refuses ("01", "1,,2").
ENTRY_TEXT = ('{"dtype":"', '","key":"', '","offsets":', "}]}")
_HEAD = rf'([a-z0-9_]+","shape":\[[0-9,]*\],"chunks":\[\{{"file":"{_PLAIN})'
_TAIL = r'(\[[0,]*\],"shape":\[[0-9,]*\])'
# The table's text is split at its keys; between two keys lies one entry's tail and the next
# entry's head (a "middle" piece); before the first key, the first head; after the last, the
# last tail.
_KEY = re.compile(re.escape(ENTRY_TEXT[1]) + rf"({_PLAIN})" + re.escape(ENTRY_TEXT[2]))
_FIRST_PIECE = re.compile(re.escape(ENTRY_TEXT[0]) + _HEAD)
_MIDDLE_PIECE = re.compile(_TAIL + re.escape(ENTRY_TEXT[3] + "," + ENTRY_TEXT[0]) + _HEAD)
_LAST_PIECE = re.compile(_TAIL + re.escape(ENTRY_TEXT[3]))
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


def _spaced_key(span: str) -> bool:
    """Whether ``span`` has a key followed by whitespace before its colon: searched for only
    when it holds a whitespace character at all (one memchr pass each; the writer's compact
    text has none unless a string does), the regular expression's scan ~10 ms for 5 MB."""
    return any(map(span.__contains__, " \t\n\r")) and _SPACED_KEY.search(span) is not None


class Table(NamedTuple):
    """A tensor table read from its text: each entry's key and the index of its form (its
    text before and after the key) in ``forms``, the distinct forms, and each form parsed as
    the JSON of an entry whose key is ``""`` (``entries[i]`` of ``forms[i]``)."""

    keys: list[str]
    form_of: list[int]
    forms: list[tuple[str, str]]
    entries: list[Any]


def split_members(text: str, columns: ColumnMemo | None = None) -> tuple[dict[str, Any], Table | None] | None:
    """The top-level members of the manifest ``text``, and the rows of its ``"tensors"`` table
    when that table is in the writer's form (the member is then absent from the dict);
    None when the text is not read here (the caller parses it as JSON). ``columns``: filled
    with what ``tree.torch_column`` found for the objects parsed (for their later readers)."""
    if not strict_json.c_int_limit() or strict_json.has_surrogate_escape(text):
        return None  # the general path's own int and surrogate handling
    try:
        return _members(text, columns)
    except (ValueError, StopIteration, RecursionError, IndexError):  # CheckpointFormatError is a ValueError
        return None  # malformed or refused: the general path says how


def _members(text: str, columns: ColumnMemo | None) -> tuple[dict[str, Any], Table | None] | None:
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
                members[key], pos = _value(text, pos, columns)
        else:
            members[key], pos = _value(text, pos, columns)
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
        return Table([], [], [], []), start + 1
    end = text.find(_TABLE_END, start)
    if end < 0:
        return None
    end += len(_TABLE_END) - 1  # the table's "]": the entries' text stops before it
    # Split at the keys, the text is pieces and keys in turn, and nothing else: when the
    # first piece is a head, the last a tail and every other a tail then a head, the text is
    # entries in the writer's form back to back. Each distinct piece is checked once.
    parts = _KEY.split(text[start:end])
    keys, pieces = parts[1::2], parts[0::2]
    if not keys:
        return None
    first, last = _FIRST_PIECE.fullmatch(pieces[0]), _LAST_PIECE.fullmatch(pieces[-1])
    if first is None or last is None:
        return None
    inner = pieces[1:-1]
    # Piece ids: the distinct middle pieces 0..m-1, then the first piece m, the last m + 1.
    # In the usual table every middle piece is the same text (one dtype, shape and file):
    # found by comparing them with the first, without hashing each.
    uniform = not inner or inner.count(inner[0]) == len(inner)
    middles = inner[:1] if uniform else list(dict.fromkeys(inner))
    heads: list[str] = []
    tails: list[str] = []
    for piece in middles:
        found = _MIDDLE_PIECE.fullmatch(piece)
        if found is None:
            return None
        tails.append(found[1])
        heads.append(found[2])
    count = len(middles)
    heads += (first[1], "")
    tails += ("", last[1])
    # Entry i lies between piece i (its head) and piece i + 1 (its tail): one code per pair.
    width = count + 2
    if uniform:  # the codes are: first then middle, middle then middle, ..., middle then last
        codes = [count * width + (0 if inner else count + 1)]
        if inner:
            codes += [0] * (len(inner) - 1)
            codes.append(count + 1)
    else:
        ids = [count, *map(dict(zip(middles, range(count), strict=True)).__getitem__, inner), count + 1]
        codes = list(map(int.__add__, map(width.__mul__, ids[:-1]), ids[1:]))
    index: dict[tuple[str, str], int] = {}
    by_code: dict[int, int] = {}
    for code in dict.fromkeys(codes):
        form = (heads[code // width], tails[code % width])
        by_code[code] = index.setdefault(form, len(index))
    forms = list(index)
    # The distinct forms (a few in a usual state: its dtypes, shapes, files) as JSON, here,
    # so the document is known to be JSON before any of it is checked (the refusal order).
    entries = [
        json.loads("".join((ENTRY_TEXT[0], head, *ENTRY_TEXT[1:3], tail, ENTRY_TEXT[3])))
        for head, tail in forms
    ]
    if uniform and len(codes) > 2:  # the middle entries' form, repeated (no lookup each)
        form_of = [by_code[codes[0]], *([by_code[0]] * (len(codes) - 2)), by_code[codes[-1]]]
    else:
        form_of = list(map(by_code.__getitem__, codes))
    return Table(keys, form_of, forms, entries), end + 1


def _value(text: str, pos: int, columns: ColumnMemo | None) -> tuple[Any, int]:
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
        if "\\" in span or _spaced_key(span) or span.count('":') != _members_in(value, columns):
            if columns is not None:
                columns.clear()  # (of objects now dropped)
            return _scan_strict(text, pos)
    return value, end


_COLUMN_MIN = 8  # an object of this many members may be counted by torch_column


def _members_in(node: dict[str, Any] | list[Any], columns: ColumnMemo | None = None) -> int:
    """The members of every object in ``node`` (iteratively: it may nest deeply)."""
    total = 0
    stack = [node]
    pop, push = stack.pop, stack.append
    while stack:
        children: Any = pop()
        if type(children) is dict:
            total += len(children)
            if len(children) >= _COLUMN_MIN and torch_column(children, columns) is not None:
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
