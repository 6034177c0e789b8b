"""JSON text written directly, without building the objects ``json.dumps`` would walk: the
exact bytes ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` gives, for the
parts of a document that repeat per tensor (a data file's header, the manifest's table)::

    plain(["layers.0.weight", "é"])  # True: written as '"layers.0.weight"' and '"é"'
    plain(['a"b'])  # False: written as '"a\\"b"'
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from itertools import chain, repeat
from operator import itemgetter
from typing import Any

from ckptproto._recent import Recent
from ckptproto.tree import References

# What json.dumps(ensure_ascii=False) writes for a str: the same C function. It escapes `"`,
# `\\` and the control characters U+0000..U+001F, and leaves every other character as is.
text = json.encoder.encode_basestring


def plain(strings: list[str]) -> bool:
    """Whether every string of ``strings`` is written in JSON as itself between quotes (no
    character to escape): then a caller can put them into a format as they are, one scan of
    the joined text instead of a quoted copy of each."""
    joined = "".join(strings)
    # Control characters are not printable (nor are a few others, which only cost the
    # caller the quoted path): faster than a regular expression over the same text.
    return joined.isprintable() and '"' not in joined and "\\" not in joined


# json.dumps with the manifest's options. No circularity check: the trees written come from
# the encoder (or a parsed manifest), which makes none, and the check costs the C encoder a
# dict insertion for every container it enters.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), check_circular=False)
# A dict of at least this many items is tried as a dict of references (see :func:`tree`).
BULK_MIN = 32
# Items of small dicts written by Python around those dicts (the rest goes to the C encoder):
# enough for the few levels above a state's modules, never a Python step per tensor.
_WALK_ITEMS = 256


def tree(value: Any, column: Callable[[References], str] | None = None) -> str:
    """``json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))`` of an
    encoded tree (no cycles), the same text, with each dict of many references
    (``{"layer.weight": {"$torch": 3}, ...}``: a module's state_dict) written by one format
    operation: the C encoder spends more on each one-item dict than that on the whole dict::

        tree({"model": {"w": {"$torch": 0}, "b": {"$torch": 1}}, "step": 3})

    ``column``: the text of each ``tree.References`` the walk meets, in its place (the writer
    process's job spells one in fewer bytes: ``io/share_wire.py``); one in a part of the tree
    left to the C encoder is written as the dict it is.
    """
    return _tree(value, [_WALK_ITEMS], column or _column_text)


def _column_text(value: References) -> str:
    """The text of a References column. A training run saves the same module again and again:
    the text of a column of the same first index and keys as one written lately is taken
    again (comparing the keys is ~0.03 us a reference, writing them ~0.3)."""
    keys = list(value)
    return _recent.get_or_make(
        (value.first, keys),
        lambda: _reference_text(keys, "$torch", range(value.first, value.first + len(keys))),
    )


# The texts of the last few columns written (a state's modules), by first index and keys:
# ~50 bytes a reference held (14 MB for a state of 300,000 tensors).
_recent: Recent[tuple[int, list[str]], str] = Recent(4)


def _tree(value: Any, budget: list[int], column: Callable[[References], str]) -> str:
    if type(value) is References and value:
        return column(value)
    if type(value) is not dict or not value:
        return _ENCODER.encode(value)
    keys = list(value)
    if len(keys) >= BULK_MIN:
        refs = _references(value, keys)
        if refs is not None:
            return refs
    if len(keys) > budget[0] or not all(type(k) is str for k in keys):
        return _ENCODER.encode(value)
    budget[0] -= len(keys)
    return "{" + ",".join([text(k) + ":" + _tree(v, budget, column) for k, v in value.items()]) + "}"


def _references(value: dict[Any, Any], keys: list[Any]) -> str | None:
    """The text of a dict whose keys are all str and whose values are all one-item dicts of
    one str key and an int (``{"$torch": 3}``), else None. Checked a column at a time in C."""
    inner = list(value.values())
    if set(map(type, inner)) != {dict} or set(map(type, keys)) != {str}:
        return None
    tags = set().union(*inner)  # every key of every value, in C
    if len(tags) != 1:
        return None
    tag = tags.pop()
    try:  # (an empty dict among them has no tag)
        indices = list(map(itemgetter(tag), inner))
    except KeyError:
        return None
    if type(tag) is not str or set(map(type, indices)) != {int}:
        return None
    return _reference_text(keys, tag, indices)


def _reference_text(keys: list[str], tag: str, indices: Sequence[int]) -> str:
    """The text of the dict ``{keys[i]: {tag: indices[i]}}`` (keys all str)."""
    names = keys if plain(keys) else [text(k)[1:-1] for k in keys]
    entry = '"%s":{' + text(tag).replace("%", "%%") + ":%d}"
    # One format made by one join (no copy of the text by concatenation).
    form = "".join(chain(("{", entry), repeat("," + entry, len(keys) - 1), ("}",)))
    return form % tuple(chain.from_iterable(zip(names, indices, strict=True)))
