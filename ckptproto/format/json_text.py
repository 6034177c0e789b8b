"""JSON text written directly, without building the objects ``json.dumps`` would walk: the
exact bytes ``json.dumps(..., ensure_ascii=False, separators=(",", ":"))`` gives, for the
parts of a document that repeat per tensor (a data file's header, the manifest's table)::

    plain(["layers.0.weight", "é"])  # True: written as '"layers.0.weight"' and '"é"'
    plain(['a"b'])  # False: written as '"a\\"b"'
"""

from __future__ import annotations

import json

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
