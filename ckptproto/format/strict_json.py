"""JSON parsing that refuses what two parsers could read differently: duplicate keys (one
parser keeps the first, another the last), the non-standard NaN/Infinity constants, numbers
that overflow a double (``1e400``: one parser gives inf, another an error), integers longer
than the format's 10,000-character limit (beyond Python's own 4,300-digit ``int(str)``
limit, read exactly up to it), and lone UTF-16 surrogate escapes (``"\\ud800"``: no UTF-8
string holds one, so a writer could never have meant it)."""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any

from ckptproto.errors import CheckpointFormatError
from ckptproto.tree import MAX_INT_CHARS, decimal_int

# A surrogate escape, possibly preceded by escaped backslashes: only then can a decoded
# string hold a lone surrogate (raw surrogates are not valid UTF-8 and fail decoding).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_UNPARSED = object()


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that raises CheckpointFormatError on a repeated key."""
    out = dict(pairs)  # in C; the names are compared one by one only when one repeats
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise CheckpointFormatError(f"duplicate JSON key {k!r}")
            seen.add(k)
    return out


def reject_constant(name: str) -> Any:
    """``parse_constant`` hook: NaN, Infinity and -Infinity are not JSON."""
    raise CheckpointFormatError(f"non-standard JSON constant {name}")


def parse_int(text: str) -> int:
    """``parse_int`` hook: exact at any length up to MAX_INT_CHARS characters, refused beyond."""
    if len(text) > MAX_INT_CHARS:
        raise CheckpointFormatError(
            f"a JSON integer of {len(text)} characters, over the {MAX_INT_CHARS}-character limit"
        )
    return decimal_int(text)


def parse_float(text: str) -> float:
    """``parse_float`` hook: a number that overflows a double (``1e400``) is refused, not inf."""
    value = float(text)
    if not math.isfinite(value):
        raise CheckpointFormatError(
            f'JSON number {text[:40]} overflows a 64-bit float (write inf as {{"$float": "inf"}})'
        )
    return value


def loads(text: str) -> Any:
    """``json.loads`` with every refusal above: ``loads('{"a": 1, "a": 2}')`` raises
    CheckpointFormatError (and RecursionError for absurd nesting, left to the caller)."""
    doc: Any = _UNPARSED
    if c_int_limit():
        # Common case, integers parsed in C: int() itself refuses more than ``limit`` digits
        # (ValueError), and then the text is parsed again with the exact, bounded hook below.
        # A parse_int hook is a Python call per integer: most of a manifest's numbers.
        try:
            doc = json.loads(
                text,
                object_pairs_hook=no_duplicate_keys,
                parse_constant=reject_constant,
                parse_float=parse_float,
            )
        except ValueError as exc:
            if isinstance(exc, (json.JSONDecodeError, CheckpointFormatError)):
                raise
    if doc is _UNPARSED:
        doc = json.loads(
            text,
            object_pairs_hook=no_duplicate_keys,
            parse_constant=reject_constant,
            parse_int=parse_int,
            parse_float=parse_float,
        )
    if has_surrogate_escape(text):
        _refuse_lone_surrogates(doc)
    return doc


def c_int_limit() -> bool:
    """Whether ``int()`` refuses integers longer than the format allows (before the format's
    limit), so JSON integers may be converted in C: the usual case. No such limit before
    Python 3.10.7 (``int()`` then converts any length), or with the limit turned off."""
    limit_of = getattr(sys, "get_int_max_str_digits", None)
    limit = 0 if limit_of is None else limit_of()
    return 0 < limit < MAX_INT_CHARS


def has_surrogate_escape(text: str) -> bool:
    """Whether ``text`` has an escape that could decode to a lone surrogate (a text without a
    backslash, the usual manifest, is told by one memchr pass: ~0.5 ms for 18 MB, the
    regular expression's scan ~12)."""
    return "\\" in text and _SURROGATE_ESCAPE.search(text) is not None


def _refuse_lone_surrogates(doc: Any) -> None:
    """Walk ``doc`` (iteratively: it may nest deeply) for strings that UTF-8 cannot encode."""
    stack: list[tuple[Any, str]] = [(doc, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            _check(node, path)
        elif isinstance(node, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node))
        elif isinstance(node, dict):
            for k, v in node.items():
                _check(k, path)
                at = f"{path}.{k}" if path else k
                stack.append((v, at))


def _check(text: str, path: str) -> None:
    found = _SURROGATE.search(text)
    if found is not None:
        at = path.encode("utf-8", "backslashreplace").decode("ascii", "replace") or "<root>"
        raise CheckpointFormatError(
            f"a lone UTF-16 surrogate \\u{ord(found.group()):04x} in a string at {at}: "
            "not a Unicode character, no UTF-8 text holds it"
        )
