"""Data files: safetensors files, written and validated byte range by byte range.

Layout (the safetensors spec): an 8-byte little-endian header length ``n``, ``n`` bytes of
UTF-8 JSON (padded with spaces), then the data buffer. Every tensor entry's
``data_offsets`` are relative to the buffer and the entries tile it exactly.
"""

from __future__ import annotations

import json
import math
import struct
from itertools import chain, repeat
from typing import Any, NamedTuple

from ckptproto.dtypes import SAFETENSORS_ITEMSIZE
from ckptproto.errors import CheckpointCorruptError, CheckpointFormatError
from ckptproto.format import json_text, strict_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors reference limit
HEADER_ALIGN = 8
# A buffer of at least PAGE_BUFFER_MIN bytes starts at a multiple of PAGE (still one of 8, as
# F-23 asks): its tensors then lie at the page offsets they have in a page-aligned staging
# buffer, so a writer past the page cache (io/direct.py) writes them from where they are, with
# no copy; and a reader maps them page-aligned. At most PAGE - 8 spaces more on 4 MiB.
PAGE = 4096
PAGE_BUFFER_MIN = 4 << 20
RAW_CODE = "U8"  # dtypes safetensors lacks are stored as raw bytes under this code
_text = json_text.text


class HeaderEntry(NamedTuple):
    """One tensor of a data file; ``begin``/``end`` are absolute file offsets. (A named tuple:
    one is built per tensor read, and a frozen dataclass costs four times as much.)"""

    code: str
    shape: tuple[int, ...]
    begin: int
    end: int


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str]
) -> bytes:
    """The header bytes (length prefix + JSON) for ``(key, code, shape, begin, end)`` entries
    whose offsets are relative to the data buffer."""
    if not entries:
        return encode_header_columns([], [], [], [], [], metadata)
    keys, codes, shapes, begins, ends = map(list, zip(*entries, strict=True))
    return encode_header_columns(keys, codes, shapes, begins, ends, metadata)


def encode_header_columns(
    keys: list[str],
    codes: list[str],
    shapes: list[tuple[int, ...]],
    begins: list[int],
    ends: list[int],
    metadata: dict[str, str],
    *,
    plain_distinct_keys: bool = False,
    align: int = HEADER_ALIGN,
) -> bytes:
    """:func:`encode_header` of entries given as parallel columns (what a planner holds)::

    encode_header_columns(["w"], ["F32"], [(2,)], [0], [8], {"format": "pt"})

    ``align``: the buffer starts at a multiple of it (a multiple of 8: :func:`buffer_align`).

    ``plain_distinct_keys``: the caller knows ``keys`` are distinct and that JSON writes each
    as itself (no ``"``, backslash or control character): neither is checked again.
    """
    distinct = plain_distinct_keys or len(set(keys)) == len(keys)
    if distinct and "__metadata__" not in keys:
        # Written as text directly, the bytes json.dumps gives (tests/test_many_tensors.py):
        # no dict and two lists per tensor on the way, and one format operation for all the
        # entries (a Python step per entry costs more than the C formatting of all of them).
        # An entry's dtype and shape text repeat from entry to entry: each distinct
        # (code, shape) is rendered once, and put into the format itself when there is one.
        heads: dict[tuple[str, tuple[int, ...]], str] = {}
        for pair in set(zip(codes, shapes, strict=True)):
            dims = ",".join(map(int.__repr__, pair[1]))
            heads[pair] = f':{{"dtype":{_text(pair[0])},"shape":[{dims}],"data_offsets":['
        # Keys with nothing to escape (the usual state) go into the format as they are.
        names = keys if plain_distinct_keys or json_text.plain(keys) else [_text(k)[1:-1] for k in keys]
        columns: list[Any] = [names, begins, ends]
        if len(heads) == 1:
            entry = ',"%s"' + next(iter(heads.values())).replace("%", "%%") + "%d,%d]}"
        else:
            entry = ',"%s"%s%d,%d]}'
            columns.insert(1, map(heads.__getitem__, zip(codes, shapes, strict=True)))
        head = json.dumps({"__metadata__": metadata}, separators=(",", ":"), ensure_ascii=False)
        # The whole text from one format (made by one join, not by concatenations: each copy
        # of a large header is fresh memory and its page faults).
        form = "".join(chain((head[:-1].replace("%", "%%"),), repeat(entry, len(keys)), ("}",)))
        text = (form % tuple(chain.from_iterable(zip(*columns, strict=True)))).encode("utf-8")
    else:  # a repeated key keeps its first position and last value, as a dict does
        obj: dict[str, Any] = {"__metadata__": metadata}
        for key, code, shape, begin, end in zip(keys, codes, shapes, begins, ends, strict=True):
            obj[key] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    pad = -(8 + len(text)) % align
    return b"".join((struct.pack("<Q", len(text) + pad), text, b" " * pad))


def buffer_align(buffer_size: int) -> int:
    """Where ckptproto's writer starts a data file's buffer of ``buffer_size`` bytes: at a
    multiple of 8 (F-23), of a page from PAGE_BUFFER_MIN on::

        encode_header_columns(keys, codes, shapes, begins, ends, meta, align=buffer_align(ends[-1]))
    """
    return PAGE if buffer_size >= PAGE_BUFFER_MIN else HEADER_ALIGN


def padded_to(header: bytes, length: int) -> bytes:
    """``header`` (length prefix, JSON, spaces) with more spaces, ``length`` bytes in all::

    padded_to(encode_header_columns(...), 4096)   # the buffer then starts at 4096
    """
    if length < len(header):
        raise ValueError(f"a header of {len(header)} bytes cannot be padded to {length}")
    return b"".join((struct.pack("<Q", length - 8), header[8:], b" " * (length - len(header))))


def header_length(prefix: bytes, file_size: int, name: str) -> int:
    """Validate the 8-byte prefix and return the JSON header length."""
    if len(prefix) < 8 or file_size < 8:
        raise CheckpointCorruptError(f"{name}: truncated, too short for a safetensors header")
    n: int = struct.unpack("<Q", prefix[:8])[0]
    if n > MAX_HEADER_BYTES:
        raise CheckpointFormatError(f"{name}: header claims {n} bytes, over the {MAX_HEADER_BYTES} limit")
    if 8 + n > file_size:
        raise CheckpointFormatError(f"{name}: header claims {n} bytes but the file has {file_size}")
    return n


def parse_header(raw: bytes, file_size: int, name: str) -> dict[str, HeaderEntry]:
    """Validate a header (``raw`` is the JSON bytes after the length prefix) against the file
    size: known dtypes, byte lengths matching shapes, entries tiling the buffer exactly.

    Every problem is a CheckpointFormatError: whether the file was damaged after writing
    (CheckpointCorruptError) is for its size and checksum to tell (FORMAT.md §9)."""
    try:
        obj = strict_json.loads(raw.decode("utf-8"))
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{name}: header has {exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CheckpointFormatError(f"{name}: header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"{name}: header is not a JSON object")
    data_start = 8 + len(raw)
    buffer_len = file_size - data_start
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointFormatError(f"{name}: __metadata__ must map strings to strings")
    entries: dict[str, HeaderEntry] = {}
    fields = {"dtype", "shape", "data_offsets"}
    itemsizes = SAFETENSORS_ITEMSIZE
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # checked shapes, one tuple for each
    new = tuple.__new__
    for key in list(obj):
        e = obj.pop(key)  # free the parsed JSON as entries are built: a header may be 100 MiB
        if type(e) is not dict or len(e) != 3 or not fields.issuperset(e):
            raise CheckpointFormatError(f"{name}: tensor {key!r} needs exactly dtype, shape and data_offsets")
        code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        itemsize = itemsizes.get(code) if type(code) is str else None
        if itemsize is None:
            raise CheckpointFormatError(f"{name}: tensor {key!r} has unsupported dtype {_short(code)}")
        if type(shape) is not list:
            raise CheckpointFormatError(f"{name}: tensor {key!r} has a bad shape {_short(shape)}")
        for d in shape:  # inline: a call per entry costs more than the check
            if type(d) is not int or d < 0:
                raise CheckpointFormatError(f"{name}: tensor {key!r} has a bad shape {_short(shape)}")
        if type(offsets) is list and len(offsets) == 2:
            begin, end = offsets
            good = type(begin) is int and type(end) is int and 0 <= begin <= end <= buffer_len
        else:
            good = False
        if not good:
            raise CheckpointFormatError(
                f"{name}: tensor {key!r}: data_offsets {_short(offsets)} fall outside the "
                f"{buffer_len}-byte buffer"
            )
        nbytes = math.prod(shape) * itemsize
        if nbytes != end - begin:
            raise CheckpointFormatError(
                f"{name}: tensor {key!r}: shape {_short(shape)} of {code} needs {_short(nbytes)} bytes, "
                f"data_offsets give {end - begin}"
            )
        dims = tuple(shape)  # ints only (checked above): hashing cannot confuse 1 with True
        dims = shapes.setdefault(dims, dims)
        entries[key] = new(HeaderEntry, (code, dims, data_start + begin, data_start + end))
    position = data_start
    for entry in entries.values():  # written in file order: then one pass tells, no sort
        if entry.begin != position:
            break
        position = entry.end
    else:
        if position == file_size:
            return entries
    position = data_start
    for entry in sorted(entries.values(), key=lambda x: (x.begin, x.end)):
        if entry.begin != position:
            problem = "overlap" if entry.begin < position else "leave a hole"
            raise CheckpointFormatError(f"{name}: tensor byte ranges {problem} at offset {position}")
        position = entry.end
    if position != file_size:
        raise CheckpointFormatError(
            f"{name}: tensors end at byte {position} but the file has {file_size} bytes"
        )
    return entries


def _short(value: object) -> str:
    """``repr`` for a message, cut short (a hostile header's list may be huge)."""
    if isinstance(value, list) and len(value) > 8:
        return f"[... {len(value)} items]"
    if type(value) is int and value.bit_length() > 64:
        return f"<an int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except ValueError:  # an int past str()'s 4,300 digits
        return "<a value too long to show>"
    return text if len(text) <= 80 else text[:77] + "..."
