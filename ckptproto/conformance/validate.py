"""``validate``: check any writer's output against every MUST of ``spec/FORMAT.md``.

Independent of ckptproto's reader: it parses the manifest and every data file itself,
collects every violation instead of stopping at the first, and names the requirement each
one breaks::

    for v in validate("ckpt/step_100"):
        print(v)   # [F-21] data-00000-000.safetensors: size 1032 in the manifest, 1030 on disk
"""

from __future__ import annotations

import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeGuard

from ckptproto import dtypes
from ckptproto.errors import CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError
from ckptproto.format import layout, strict_json
from ckptproto.format.crc import crc32, parse_checksum
from ckptproto.format.regular_file import NotRegularFileError, open_regular
from ckptproto.format.safetensors import MAX_HEADER_BYTES, RAW_CODE
from ckptproto.io.storage import Generation, StoredFile
from ckptproto.location import Location
from ckptproto.policy.locations import resolve
from ckptproto.tree import MAX_SAFE_INT, check_tree, int_text, iter_tensor_refs

MAX_MANIFEST_BYTES = 1 << 30
MAX_NDIM = 64
MAX_DIM = 1 << 62
MAX_CHUNKS = 1 << 16
_BLOCK = 1 << 20
# F-36: a first member shaped like the checksum (any 17-character name: a damaged key).
_CHECKSUM_LIKE = re.compile(rb'\{"manifest_checksum":"|\{"[^"]{17}":"crc32:')
_OWN_CHECKSUM = re.compile(rb'\{"manifest_checksum":"crc32:([0-9a-f]{8})",')

# Requirement id in spec/FORMAT.md -> what it requires. The ids are the spec's; the text is
# a reminder for people reading a report.
RULES: dict[str, str] = {
    "F-1": "a checkpoint is a directory containing a regular file manifest.json",
    "F-2": "a directory whose name starts with '.' is never a checkpoint",
    "F-3": "data file names are plain [A-Za-z0-9][A-Za-z0-9_.-]{0,200}.safetensors names without '..'",
    "F-4": "manifest.json and data files are regular files, not symbolic links",
    "F-6": 'manifest.json is UTF-8 JSON without duplicate keys or NaN/Infinity; "format" is "ckptproto"',
    "F-7": "writers write every manifest field (format, format_version, created, writer, world_size, "
    "metadata, files, tensors, state; rank in file entries) with its type",
    "F-8": 'a file entry is {"size", "checksum", "rank" >= 0}; size equals the file\'s size; listed files exist',
    "F-9": "a tensor entry has a known dtype, a shape of ints and a non-empty chunks list",
    "F-10": "a chunk names a listed file and a key; offsets/shape have the tensor's rank; the box lies inside",
    "F-11": "a tensor's chunks tile it exactly: no overlap, element counts add up",
    "F-12": "a (file, key) pair is used by at most one chunk in the whole manifest",
    "F-13": "a chunk's data file entry exists, stored with the dtype's safetensors code and the chunk's "
    "shape, or as U8 [elements x itemsize] for dtypes without a code (F-20)",
    "F-14": "tensor references satisfy 0 <= i < len(tensors), never both $torch and $numpy for one "
    "index, and $numpy only for dtypes numpy has",
    "F-15": "metadata decodes to an object without tensor references; state decodes to an object",
    "F-16": "values are encoded exactly as in the table ($int only outside +-(2**53-1), $dict only "
    "where a plain object cannot hold the dict)",
    "F-17": "an object with a '$' key is a tagged object: exactly one key, a known tag",
    "F-18": "tag payloads are well formed ($int digits, $float strings, padded base64, pairs, keys)",
    "F-22": "data files are valid safetensors files: header length <= 100 MiB, JSON object of exactly "
    "dtype/shape/data_offsets entries (+ __metadata__ str -> str), entries tiling the buffer to EOF",
    "F-23": "the header JSON is padded with spaces so the data buffer starts at a multiple of 8 bytes",
    "F-26": 'checksum is "crc32:" + 8 lowercase hex digits of the CRC-32 of the whole data file',
    "F-31": 'format_version is "MAJOR.MINOR"',
    "F-32": "the major version is 1 (the version this validator checks)",
    "F-36": "a manifest starting with its manifest_checksum member matches it",
    "F-33": "limits: manifest <= 1 GiB, nesting <= 200, <= 64 dimensions, dimensions <= 2**62, "
    "<= 65,536 chunks per tensor",
}


NOT_FOUND = "CheckpointNotFoundError"
CORRUPT = "CheckpointCorruptError"
FORMAT = "CheckpointFormatError"
WRITER_ONLY = ""  # a rule for writers that readers do not enforce (F-7 defaults, F-16, F-23)


@dataclass(frozen=True)
class Violation:
    """One broken requirement: the spec's id, where (file and JSON path / tensor key), what.

    ``error`` is the exception a reader refuses the checkpoint with because of it
    (``CheckpointFormatError``...; empty for rules only writers must keep) and ``stage`` when
    a reader finds it: 0 before reading (F-1, F-2), 1 in the manifest, 2 in the data files.
    :func:`reader_verdict` combines them as FORMAT.md §9 orders."""

    rule: str
    where: str
    message: str
    error: str = FORMAT
    stage: int = 1

    def __str__(self) -> str:
        return f"[{self.rule}] {self.where}: {self.message}"

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "where": self.where, "message": self.message}


class _Collector:
    def __init__(self) -> None:
        self.found: list[Violation] = []

    def add(self, rule: str, where: str, message: str, *, error: str | None = None) -> None:
        assert rule in RULES, rule
        if error is None:
            error = (
                NOT_FOUND if rule in ("F-1", "F-2") else WRITER_ONLY if rule in ("F-16", "F-23") else FORMAT
            )
        data_file = not where.startswith(layout.MANIFEST_NAME) and rule in ("F-4", "F-8", "F-26")
        stage = 0 if error == NOT_FOUND else 2 if data_file or rule in ("F-13", "F-22", "F-23") else 1
        self.found.append(Violation(rule, where, message, error, stage))


def reader_verdict(violations: list[Violation]) -> str | None:
    """The exception class name a conforming reader refuses with, or None when readers
    accept the checkpoint (no violations, or only writers' rules broken). FORMAT.md §9: the
    earliest stage decides; within a stage damage (CheckpointCorruptError) comes first::

        reader_verdict(validate("ckpt/step_100"))   # None, or e.g. "CheckpointCorruptError"
    """
    refusing = [v for v in violations if v.error]
    if not refusing:
        return None
    return min(refusing, key=lambda v: (v.stage, v.error != CORRUPT)).error


def validate(path: str | os.PathLike[str] | Location) -> list[Violation]:
    """Every violation of spec/FORMAT.md found in the checkpoint at ``path`` (a directory, or
    an object-store URL; empty when it conforms). Reads every byte once (for the checksums);
    never raises for bad input (a URL no storage backend serves raises CheckpointError)::

        for violation in validate("checkpoints/checkpoint_step_10"):
            print(violation)
    """
    storage, location = resolve(path)
    out = _Collector()
    if isinstance(location, Path):
        # raw files: the file-kind and symbolic-link rules (F-1, F-4) are only visible here
        if location.resolve().name.startswith("."):
            out.add("F-2", str(location), "the directory name starts with '.', so it is never a checkpoint")
        _check(_LocalFiles(location), out)
        return out.found
    if location.name.startswith("."):
        out.add("F-2", str(location), "the name starts with '.', so it is never a checkpoint")
    try:
        generation = storage.open(location)
    except CheckpointNotFoundError as exc:
        out.add("F-1", str(location), f"no {layout.MANIFEST_NAME} ({exc})")
        return out.found
    with generation, _StoredFiles(generation) as files:
        _check(files, out)
    return out.found


def _check(files: _Files, out: _Collector) -> None:
    doc = _manifest(files, out)
    if doc is None:
        return
    world_size = _top_level(doc, out)
    sizes = _files(files, doc.get("files"), world_size, out)
    # Every listed name (a chunk naming a listed but missing file is damage, not F-10).
    listed: dict[str, Any] = doc["files"] if isinstance(doc.get("files"), dict) else {}
    headers: dict[str, dict[str, _Entry] | None] = dict.fromkeys(listed)
    headers.update({name: _header(files, name, size, out) for name, size in sizes.items()})
    tensors = _tensors(doc.get("tensors"), sizes, headers, out)
    _state(doc, tensors, out)
    _metadata(doc, out)


class _Files(Protocol):
    """The manifest and data files of one checkpoint, as the validator reads them."""

    def manifest(self, out: _Collector) -> bytes | None:
        """The manifest's bytes, or None after reporting why there are none."""
        ...

    def size(self, name: str, out: _Collector) -> int | None:
        """The size of data file ``name``, or None after reporting it missing or not a file."""
        ...

    def read(self, name: str, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes of data file ``name`` from ``offset`` (after ``size``)."""
        ...


class _LocalFiles:
    """A local checkpoint directory, read raw (never following a symbolic link)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def manifest(self, out: _Collector) -> bytes | None:
        where = layout.MANIFEST_NAME
        try:
            fd, st = open_regular(self.root / where)
        except NotRegularFileError as exc:
            if exc.kind == "symbolic link":
                out.add("F-4", where, "is a symbolic link", error=NOT_FOUND)
            else:
                out.add("F-1", where, f"is a {exc.kind}, not a regular file")
            return None
        except OSError as exc:
            out.add("F-1", str(self.root), f"no {where} ({exc.strerror})")
            return None
        with os.fdopen(fd, "rb") as f:
            if st.st_size > MAX_MANIFEST_BYTES:
                out.add("F-33", where, f"{st.st_size} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
                return None
            return f.read()

    def size(self, name: str, out: _Collector) -> int | None:
        try:
            st = os.stat(self.root / name, follow_symlinks=False)
        except OSError:
            out.add("F-8", name, "listed in the manifest but missing", error=CORRUPT)
            return None
        if not stat.S_ISREG(st.st_mode):
            out.add("F-4", name, "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file")
            return None
        return st.st_size

    def read(self, name: str, offset: int, n: int) -> bytes:
        with open(self.root / name, "rb") as f:
            f.seek(offset)
            return f.read(n)


class _StoredFiles:
    """One pinned generation of a checkpoint in a storage backend (an object store)."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.opened: dict[str, StoredFile] = {}

    def manifest(self, out: _Collector) -> bytes | None:
        try:
            return self.generation.read_manifest()
        except CheckpointNotFoundError as exc:
            out.add("F-1", str(self.generation.location), f"no {layout.MANIFEST_NAME} ({exc})")
        except CheckpointFormatError as exc:  # over MAX_MANIFEST_BYTES
            out.add("F-33", layout.MANIFEST_NAME, str(exc))
        return None

    def size(self, name: str, out: _Collector) -> int | None:
        try:
            stored = self.generation.open_file(name)
        except CheckpointCorruptError:
            out.add("F-8", name, "listed in the manifest but missing", error=CORRUPT)
            return None
        except CheckpointFormatError as exc:
            out.add("F-4", name, f"not a regular file ({exc})")
            return None
        self.opened[name] = stored
        return stored.size

    def read(self, name: str, offset: int, n: int) -> bytes:
        buffer = bytearray(n)
        got = self.opened[name].read_into(offset, [memoryview(buffer)])
        return bytes(memoryview(buffer)[:got])  # one copy (a bytearray slice would add one)

    def __enter__(self) -> _StoredFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        for stored in self.opened.values():
            stored.close()


def _manifest(files: _Files, out: _Collector) -> dict[str, Any] | None:
    where = layout.MANIFEST_NAME
    data = files.manifest(out)
    if data is None:
        return None
    if _CHECKSUM_LIKE.match(data):  # F-36, on the raw bytes: damage may not even parse
        own = _OWN_CHECKSUM.match(data)
        if own is None or int(own.group(1), 16) != zlib.crc32(
            memoryview(data)[own.end() :], zlib.crc32(b"{")
        ):
            out.add("F-36", where, "does not match its own manifest_checksum (damaged)", error=CORRUPT)
    try:
        doc = strict_json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, CheckpointFormatError) as exc:
        out.add("F-6", where, f"not valid JSON: {exc}")
        return None
    if not isinstance(doc, dict):
        out.add("F-6", where, f"top level is a {type(doc).__name__}, not an object")
        return None
    return doc


def _top_level(doc: dict[str, Any], out: _Collector) -> int:
    m = layout.MANIFEST_NAME
    if doc.get("format") != "ckptproto":
        out.add("F-6", m, f'"format" is {_show(doc.get("format"))}, not "ckptproto"')
    version = doc.get("format_version")
    parts = version.split(".") if isinstance(version, str) else []
    # ASCII digits only: str.isdigit() and int() also take "١" (Arabic-Indic one).
    if len(parts) != 2 or not all(re.fullmatch("[0-9]{1,5}", p) for p in parts):
        out.add("F-31", m, f'"format_version" {_show(version)} is not "MAJOR.MINOR"')
    elif int(parts[0]) != 1:
        out.add("F-32", m, f'"format_version" {_show(version)}: this validator checks major version 1')
    for key in ("format_version", "created", "writer", "world_size", "metadata", "files", "tensors", "state"):
        if key not in doc:
            required = key in ("format_version", "files", "tensors", "state")
            out.add("F-7", m, f'no "{key}" field', error=None if required else WRITER_ONLY)
    world_size = doc.get("world_size", 1)
    if type(world_size) is not int or world_size < 1:
        out.add("F-7", m, f'"world_size" {_show(world_size)} is not an integer >= 1')
        world_size = 1
    for key in ("created", "writer"):
        if key in doc and not isinstance(doc[key], str):
            out.add("F-7", m, f'"{key}" is not a string')
    return world_size


def _files(files: _Files, doc: Any, world_size: int, out: _Collector) -> dict[str, int]:
    """Listed, well-formed data files that exist with the right size and checksum: name -> size."""
    m = layout.MANIFEST_NAME
    if not isinstance(doc, dict):
        out.add("F-7", m, '"files" is missing or not an object')
        return {}
    good: dict[str, int] = {}
    for name, entry in doc.items():
        where = f"{m}: files[{name!r}]"
        if not layout.is_valid_data_file_name(name):
            out.add("F-3", where, "not a plain *.safetensors file name inside the checkpoint")
            continue
        if not isinstance(entry, dict):
            out.add("F-8", where, "not an object")
            continue
        size, checksum, rank = entry.get("size"), entry.get("checksum"), entry.get("rank", 0)
        ok = True
        if type(size) is not int or not 8 <= size < 1 << 63:
            out.add("F-8", where, f"size {_show(size)} is not an integer in [8, 2**63)")
            ok = False
        crc = parse_checksum(checksum)
        if crc is None or not isinstance(checksum, str) or checksum != checksum.lower():
            out.add("F-26", where, f"checksum {_show(checksum)} is not 'crc32:' and 8 lowercase hex digits")
            ok = False
        if "rank" not in entry:
            out.add("F-7", where, 'no "rank"', error=WRITER_ONLY)
        elif type(rank) is not int or rank < 0:
            out.add("F-8", where, f"rank {_show(rank)} is not an integer >= 0")
        stored_size = files.size(name, out)
        if stored_size is None or not ok:
            continue
        assert isinstance(size, int) and crc is not None
        if stored_size != size:
            out.add("F-8", name, f"{stored_size} bytes stored, {_show(size)} in the manifest", error=CORRUPT)
            continue
        actual = _crc(files, name, size)
        if actual != crc:
            out.add(
                "F-26", name, f"CRC-32 is crc32:{actual:08x}, the manifest says {checksum}", error=CORRUPT
            )
        good[name] = size
    return good


def _crc(files: _Files, name: str, size: int) -> int:
    crc = 0
    for offset in range(0, size, _BLOCK):
        crc = crc32(files.read(name, offset, min(_BLOCK, size - offset)), crc)
    return crc


@dataclass(frozen=True)
class _Entry:
    code: str
    shape: tuple[int, ...]
    nbytes: int


def _header(files: _Files, name: str, size: int, out: _Collector) -> dict[str, _Entry] | None:
    prefix = files.read(name, 0, 8)
    if len(prefix) < 8:
        out.add("F-22", name, "shorter than the 8-byte header length")
        return None
    n = struct.unpack("<Q", prefix)[0]
    if n > MAX_HEADER_BYTES or 8 + n > size:
        out.add(
            "F-22",
            name,
            f"header length {n} exceeds the file ({size} bytes) or the {MAX_HEADER_BYTES}-byte limit",
        )
        return None
    raw = files.read(name, 8, n)
    try:
        obj = strict_json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, CheckpointFormatError) as exc:
        out.add("F-22", name, f"header is not valid JSON: {exc}")
        return None
    if not isinstance(obj, dict):
        out.add("F-22", name, "header is not a JSON object")
        return None
    if (8 + n) % 8 or raw[len(raw.rstrip(b" \t\r\n")) :].strip(b" "):
        out.add(
            "F-23",
            name,
            f"data buffer starts at byte {8 + n}, or the header is padded with other than spaces",
        )
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        out.add("F-22", name, "__metadata__ does not map strings to strings")
    buffer_len = size - 8 - n
    entries: dict[str, _Entry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, e in obj.items():
        where = f"{name}: tensor {key!r}"
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            out.add("F-22", where, "needs exactly dtype, shape and data_offsets")
            continue
        code, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if code not in dtypes.SAFETENSORS_ITEMSIZE:
            out.add("F-22", where, f"unknown dtype code {_show(code)}")
            continue
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            out.add("F-22", where, f"bad shape {_show(shape)}")
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            out.add("F-22", where, f"bad data_offsets {_show(offsets)}")
            continue
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= offsets[0] <= offsets[1] <= buffer_len:
            out.add("F-22", where, f"data_offsets {_show(offsets)} fall outside the {buffer_len}-byte buffer")
            continue
        if numel * dtypes.SAFETENSORS_ITEMSIZE[code] != offsets[1] - offsets[0]:
            out.add(
                "F-22",
                where,
                f"shape {_show(shape)} of {code} needs {_show(numel * dtypes.SAFETENSORS_ITEMSIZE[code])} bytes, data_offsets span {offsets[1] - offsets[0]}",
            )
            continue
        entries[key] = _Entry(code, tuple(shape), offsets[1] - offsets[0])
        spans.append((offsets[0], offsets[1], key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            what = (
                "overlaps the previous tensor"
                if begin < position
                else f"leaves a gap at buffer offset {position}"
            )
            out.add("F-22", f"{name}: tensor {key!r}", what)
        position = max(position, end)
    if position != buffer_len and len(spans) == len(obj):
        out.add("F-22", name, f"tensors end at buffer offset {position}, the buffer has {buffer_len} bytes")
    return entries


def _tensors(
    doc: Any, files: dict[str, int], headers: dict[str, dict[str, _Entry] | None], out: _Collector
) -> list[dtypes.DType | None]:
    """The dtype of each tensor entry (None where it is malformed), for the state check."""
    m = layout.MANIFEST_NAME
    if not isinstance(doc, list):
        out.add("F-9", m, '"tensors" is missing or not a list')
        return []
    result: list[dtypes.DType | None] = []
    used: dict[tuple[str, str], str] = {}
    for i, t in enumerate(doc):
        where = f"{m}: tensors[{i}]"
        result.append(None)
        if not isinstance(t, dict):
            out.add("F-9", where, "not an object")
            continue
        dtype_name = t.get("dtype")
        dtype = dtypes.BY_NAME.get(dtype_name) if isinstance(dtype_name, str) else None
        shape = t.get("shape")
        chunks = t.get("chunks")
        if dtype is None:
            out.add("F-9", where, f"unknown dtype {_show(t.get('dtype'))}")
        if not _int_list(shape):
            out.add("F-9", where, f"shape {_show(shape)} is not a list of ints >= 0")
            continue
        if len(shape) > MAX_NDIM or any(d > MAX_DIM for d in shape):
            out.add("F-33", where, f"shape {_show(shape)} has over {MAX_NDIM} dimensions or one over 2**62")
            continue
        extent = dtype.itemsize if dtype is not None else 1
        for d in shape:
            extent *= d or 1
        if extent >= 1 << 63:
            out.add("F-33", where, f"shape {_show(shape)} spans over 2**63-1 bytes, zero dimensions ignored")
            continue
        if isinstance(chunks, list) and len(chunks) > MAX_CHUNKS:
            out.add("F-33", where, f"{len(chunks)} chunks, over the {MAX_CHUNKS} limit")
            continue
        if not isinstance(chunks, list) or not chunks:
            out.add("F-9", where, "chunks is missing, empty or not a list")
            continue
        if dtype is None:
            continue
        result[-1] = dtype
        for j, c in enumerate(chunks):
            if isinstance(c, dict) and isinstance(c.get("file"), str) and isinstance(c.get("key"), str):
                pair, here = (c["file"], c["key"]), f"{where}.chunks[{j}]"
                if pair in used:
                    out.add("F-12", here, f"({pair[0]}, {pair[1]!r}) is also used by {used[pair]}")
                used.setdefault(pair, here)
        boxes = [
            b
            for j, c in enumerate(chunks)
            if (b := _chunk(c, f"{where}.chunks[{j}]", dtype, shape, files, headers, out))
        ]
        if len(boxes) == len(chunks):
            _tiling(boxes, shape, where, out)
    return result


def _int_list(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _chunk(
    c: Any,
    where: str,
    dtype: dtypes.DType,
    shape: list[int],
    files: dict[str, int],
    headers: dict[str, dict[str, _Entry] | None],
    out: _Collector,
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    if not isinstance(c, dict):
        out.add("F-10", where, "not an object")
        return None
    file, key, offsets, cshape = c.get("file"), c.get("key"), c.get("offsets"), c.get("shape")
    if not isinstance(file, str) or not isinstance(key, str):
        out.add("F-10", where, "file and key must be strings")
        return None
    if (
        not _int_list(offsets)
        or not _int_list(cshape)
        or len(offsets) != len(shape)
        or len(cshape) != len(shape)
    ):
        out.add(
            "F-10", where, f"offsets {_show(offsets)} and shape {_show(cshape)} need {len(shape)} ints >= 0"
        )
        return None
    if any(o + s > g for o, s, g in zip(offsets, cshape, shape, strict=True)):
        out.add(
            "F-10",
            where,
            f"box {_show(offsets)}+{_show(cshape)} runs outside the tensor's shape {_show(shape)}",
        )
        return None
    header = headers.get(file)
    if file not in files and file not in headers:
        out.add("F-10", where, f'file {file!r} is not a good entry of "files"')
    elif header is not None:
        entry = header.get(key)
        numel = 1
        for d in cshape:
            numel *= d
        if entry is None:
            out.add("F-13", where, f"key {key!r} is not in {file}'s header")
        elif dtype.safetensors is not None and (entry.code, entry.shape) != (
            dtype.safetensors,
            tuple(cshape),
        ):
            out.add(
                "F-13",
                where,
                f"{file}:{key} is {entry.code}{list(entry.shape)}, expected {dtype.safetensors}{_show(cshape)}",
            )
        elif dtype.safetensors is None and (entry.code, entry.shape) != (RAW_CODE, (numel * dtype.itemsize,)):
            out.add(
                "F-13",
                where,
                f"{file}:{key} is {entry.code}{list(entry.shape)}, expected raw {RAW_CODE}[{numel * dtype.itemsize}] for {dtype.name}",
            )
    return tuple(offsets), tuple(cshape)


def _tiling(
    boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], shape: list[int], where: str, out: _Collector
) -> None:
    def volume(s: tuple[int, ...] | list[int]) -> int:
        n = 1
        for d in s:
            n *= d
        return n

    total = volume(shape)
    covered = sum(volume(s) for _o, s in boxes)
    nonempty = [(o, s) for o, s in boxes if volume(s)]
    # Sweep along the dimension with the most distinct starts, comparing a box only with the
    # boxes still open there: all pairs would take hours for 65,536 chunks.
    dim = max(range(len(shape)), key=lambda d: len({o[d] for o, _s in nonempty}), default=0)
    open_boxes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for o1, s1 in sorted(nonempty, key=lambda box: box[0][dim] if shape else 0):
        if shape:
            open_boxes = [(o, s) for o, s in open_boxes if o[dim] + s[dim] > o1[dim]]
        for o2, s2 in open_boxes:
            if all(a < b + t and b < a + u for a, u, b, t in zip(o1, s1, o2, s2, strict=True)):
                out.add(
                    "F-11", where, f"chunks with boxes at {_show(list(o2))} and {_show(list(o1))} overlap"
                )
                return
        open_boxes.append((o1, s1))
    if covered != total:
        out.add("F-11", where, f"chunks hold {_show(covered)} elements, the shape needs {_show(total)}")


def _state(doc: dict[str, Any], tensors: list[dtypes.DType | None], out: _Collector) -> None:
    m = layout.MANIFEST_NAME
    if "state" not in doc:
        out.add("F-7", m, 'no "state"')
        return
    state = doc["state"]

    kinds: dict[int, str] = {}

    def resolve(kind: str, index: int, path: str) -> None:
        at = f"{m}: state.{path}" if path else f"{m}: state"
        if kinds.setdefault(index, kind) != kind:
            out.add("F-14", at, f"tensor {_show(index)} is referenced both as $torch and as $numpy")
        if index >= len(tensors):
            out.add("F-14", at, f"${kind} reference {_show(index)} is past the {len(tensors)} tensors")
        elif kind == "numpy" and tensors[index] is not None and tensors[index].numpy_name is None:  # type: ignore[union-attr]
            out.add("F-14", at, f"$numpy reference to a {tensors[index].name} tensor, which numpy lacks")  # type: ignore[union-attr]

    try:
        is_dict = check_tree(state, resolve, where=f"{m}: state")
    except CheckpointFormatError as exc:
        out.add(_decode_rule(str(exc)), f"{m}: state", str(exc).removeprefix(f"{m}: state: "))
        return
    if not is_dict:
        out.add("F-15", f"{m}: state", "the top level is not an object")
    for path, value in _numbers(state, ""):
        out.add("F-16", f"{m}: state.{path}" if path else f"{m}: state", value)


def _decode_rule(message: str) -> str:
    """Which requirement a value-decoding error breaks, from the decoder's message."""
    if "nests deeper" in message:
        return "F-33"
    if "unknown tag" in message or "mixes '$' keys" in message or "extra keys" in message:
        return "F-17"
    return "F-18"


def _numbers(node: Any, path: str, depth: int = 0) -> Iterator[tuple[str, str]]:
    """Values not encoded as the table says: big ints as JSON numbers, small ints as $int,
    $dict where a plain object would do."""
    if depth > 200:
        return
    if type(node) is int and abs(node) > MAX_SAFE_INT:
        yield (
            path,
            f'integer {int_text(node)} outside +-(2**53-1) written as a JSON number, not {{"$int": ...}}',
        )
    elif isinstance(node, dict) and len(node) == 1 and "$int" in node:
        text = node["$int"]
        if isinstance(text, str) and re.fullmatch(r"-?[0-9]{1,16}", text) and abs(int(text)) <= MAX_SAFE_INT:
            yield path, f"$int {text} is within +-(2**53-1): write it as a JSON integer"
    elif isinstance(node, dict) and len(node) == 1 and isinstance(node.get("$dict"), list):
        pairs = node["$dict"]
        plain = [
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and not p[0].startswith("$")
            for p in pairs
        ]
        if all(plain):
            yield path, "a $dict whose keys are all plain strings: write it as a JSON object"
        for p in pairs:
            if isinstance(p, list) and len(p) == 2:
                yield from _numbers(p[1], f"{path}.{_show(p[0])}" if path else _show(p[0]), depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{path}.{i}" if path else str(i), depth + 1)
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k), depth + 1)


def _metadata(doc: dict[str, Any], out: _Collector) -> None:
    m = layout.MANIFEST_NAME
    meta = doc.get("metadata", {})
    refs = list(iter_tensor_refs(meta))
    if refs:
        out.add("F-15", f"{m}: metadata.{refs[0][0]}", "metadata holds a tensor reference")
        return
    try:
        is_dict = check_tree(meta, lambda kind, index, p: None, where=f"{m}: metadata")
    except CheckpointFormatError as exc:
        out.add("F-15", f"{m}: metadata", str(exc))
        return
    if not is_dict:
        out.add("F-15", f"{m}: metadata", "is not an object")
        return


def _show(value: Any) -> str:
    """A value from the checkpoint, for a message: short, and never failing (``str`` of an
    int past 4,300 digits raises; a hostile list can be huge)."""
    if type(value) is int:
        return int_text(value)
    if isinstance(value, list):
        shown = ", ".join(_show(v) for v in value[:8])
        return f"[{shown}{', ...' if len(value) > 8 else ''}]"
    text = repr(value) if not isinstance(value, (dict, tuple)) else f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."
