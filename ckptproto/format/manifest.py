"""The manifest: ``manifest.json``, the one file that makes a directory a checkpoint.

``Manifest.parse`` validates everything that can be checked without reading data files; the
reader validates the rest against each data file's header before touching tensor bytes.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import chain, pairwise, repeat
from operator import itemgetter
from typing import Any, NamedTuple, overload

import numpy as np

from ckptproto import dtypes
from ckptproto.dtypes import DType
from ckptproto.errors import CheckpointCorruptError, CheckpointFormatError
from ckptproto.format import json_text, layout, manifest_text, strict_json
from ckptproto.format.crc import crc32, parse_checksum
from ckptproto.tree import ColumnMemo, check_tree, int_text, quick_refs

FORMAT_NAME = "ckptproto"
FORMAT_VERSION = (1, 0)
MAX_MANIFEST_BYTES = 1 << 30
MAX_NDIM = 64
MAX_DIM = 1 << 62
MAX_EXTENT = (1 << 63) - 1  # bytes a shape may span with its zero dimensions taken as 1
MAX_CHUNKS_PER_TENSOR = 1 << 16
# The manifest's own checksum is its first member, so the bytes it covers are easy to find:
# ``{"manifest_checksum":"crc32:xxxxxxxx",`` + the rest; the CRC is that of ``{`` + the rest
# (the manifest as it would read without the member). Optional in format 1.0; ckptproto
# always writes it and requires it from manifests whose ``writer`` is ckptproto.
CHECKSUM_KEY = "manifest_checksum"
_CHECKSUM_PREFIX = b'{"' + CHECKSUM_KEY.encode() + b'":"crc32:'
_CHECKSUM_HEAD = len(_CHECKSUM_PREFIX) + 8 + 2  # + hex digits + '",'
_DAMAGED_CHECKSUM = re.compile(rb'\{"[^"]{%d}":"crc32:' % len(CHECKSUM_KEY))
_HEX8 = re.compile(rb"[0-9a-f]{8}")
_CRC_OF_BRACE = zlib.crc32(b"{")
_ENCODED_PARTS = 64  # Manifest.to_json encodes up to this many parts one by one
_VERSION = re.compile(r"[0-9]{1,5}\.[0-9]{1,5}")  # ASCII digits only ("١.0" is not a version)


class Chunk(NamedTuple):
    """A box of a tensor stored in one data file under one key.

    A named tuple, not a frozen dataclass: one is built per tensor a checkpoint holds (300,000
    in a large state), and a frozen dataclass costs about four times as much to construct."""

    file: str
    key: str
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class TensorEntry(NamedTuple):
    """One tensor of the checkpoint: its global dtype and shape, stored as one or more chunks
    (a named tuple for the same reason as :class:`Chunk`)."""

    dtype: DType
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_whole(self) -> bool:
        return len(self.chunks) == 1 and self.chunks[0].shape == self.shape


class EntryTable(Sequence[TensorEntry]):
    """A tensor table held in another form than a list of entries (:class:`ColumnTable`,
    :class:`RunTable`): equal, as a list is, to any table, list or tuple of the same entries."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (EntryTable, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # as a list's


class ColumnTable(EntryTable):
    """A tensor table of one-chunk entries held as columns: entry ``i`` is ``forms[form_of[i]]``
    (its entry but for the key) under its chunk's key ``keys[i]``. What a reader derives from
    an entry's dtype, shape and file it then derives once per form (a few in a usual state),
    not once per tensor; the entries themselves are built, all at once, only when one is
    asked for (a load of small tensors never asks)::

        table = table_columns(tensors)   # table == tensors; Manifest.parse gives one as is
        table.keys, table.form_of, table.forms
    """

    __slots__ = ("_entries", "form_of", "forms", "keys", "plain_keys")

    def __init__(
        self, keys: list[str], form_of: list[int], forms: list[TensorEntry], *, plain_keys: bool = False
    ) -> None:
        if len(form_of) != len(keys):
            raise ValueError(f"ColumnTable: {len(keys)} keys, {len(form_of)} forms")
        self.keys, self.form_of, self.forms = keys, form_of, forms
        # Every key is written in JSON as itself (no character JSON escapes): known from the
        # text the table was read from (manifest_text), not checked again by its users.
        self.plain_keys = plain_keys
        self._entries: list[TensorEntry] | None = None

    def entries(self) -> list[TensorEntry]:
        """Every entry, as a list (built once, by columns)."""
        if self._entries is None:
            column = list(map(self.forms.__getitem__, self.form_of))
            shapes = list(map(_SHAPE_OF, column))
            built = _rekeyed(list(map(_FIRST, map(_CHUNKS_OF, column))), self.keys)
            self._entries = list(
                map(_new, repeat(TensorEntry), zip(map(_DTYPE_OF, column), shapes, zip(built), strict=True))
            )
        return self._entries

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> TensorEntry: ...

    @overload
    def __getitem__(self, index: slice) -> list[TensorEntry]: ...

    def __getitem__(self, index: int | slice) -> TensorEntry | list[TensorEntry]:
        return self.entries()[index]

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries())


def dtypes_and_shapes(
    tensors: Sequence[TensorEntry], indices: list[int]
) -> tuple[list[DType], list[tuple[int, ...]]]:
    """The dtype and shape of each entry ``tensors[i]`` for ``i`` in ``indices``, as two
    columns (from a ColumnTable's forms: no entry built)::

        dtypes, shapes = dtypes_and_shapes(manifest.tensors, [0, 3])
    """
    if isinstance(tensors, ColumnTable):
        forms, form_of = tensors.forms, tensors.form_of
        chosen = list(map(forms.__getitem__, map(form_of.__getitem__, indices)))
    else:
        chosen = list(map(tensors.__getitem__, indices))
    return list(map(_DTYPE_OF, chosen)), list(map(_SHAPE_OF, chosen))


def _rekeyed(chunks: list[Chunk], keys: Iterable[str]) -> Iterator[Chunk]:
    """Each of ``chunks`` under the key beside it in ``keys``, in C-level passes."""
    parts = zip(
        map(_CHUNK_FILE, chunks), keys, map(_CHUNK_OFFSETS, chunks), map(_CHUNK_SHAPE, chunks), strict=False
    )
    return map(_new, repeat(Chunk), parts)


def table_columns(tensors: Sequence[TensorEntry]) -> ColumnTable | None:
    """``tensors`` as a :class:`ColumnTable` (itself when it is one), or None when an entry
    has several chunks (a sharded tensor: a reader goes chunk by chunk)."""
    if isinstance(tensors, ColumnTable):
        return tensors
    if set(map(len, map(_CHUNKS_OF, tensors))) - {1}:
        return None
    chunks = list(map(_FIRST, map(_CHUNKS_OF, tensors)))
    # An entry's form: the entry under the key "" (equal entries, equal forms).
    blank = _rekeyed(chunks, repeat(""))
    formed = map(
        _new,
        repeat(TensorEntry),
        zip(map(_DTYPE_OF, tensors), map(_SHAPE_OF, tensors), zip(blank), strict=True),
    )
    index: dict[TensorEntry, int] = {}
    form_of = [index.setdefault(form, len(index)) for form in formed]
    return ColumnTable(list(map(_CHUNK_KEY, chunks)), form_of, list(index))


@dataclass(frozen=True)
class FileEntry:
    """A data file: its exact size, its checksum (``crc32:xxxxxxxx``) and the rank that wrote it."""

    size: int
    checksum: str
    rank: int = 0

    @property
    def crc32(self) -> int:
        crc = parse_checksum(self.checksum)
        assert crc is not None  # validated by Manifest.parse
        return crc


@dataclass
class Manifest:
    """A parsed, validated manifest. ``state`` and ``metadata`` stay in their encoded form
    (``ckptproto.tree``) until decoded."""

    state: Any
    # A ColumnTable when parse read the writer's table as rows, else a list; a RunTable when
    # a writer built it.
    tensors: Sequence[TensorEntry]
    files: dict[str, FileEntry]
    metadata: Any = field(default_factory=dict)
    created: str = ""
    version: tuple[int, int] = FORMAT_VERSION
    world_size: int = 1
    writer: str = ""
    # Set by parse when it vouched for every tensor reference of ``state`` (in range, one
    # kind per index, numpy dtypes for $numpy): the ``$torch`` and ``$numpy`` indices, so a
    # reader need not walk the state again to find them.
    refs: tuple[list[int], list[int]] | None = field(default=None, compare=False, repr=False)
    # Set by parse: what tree.torch_column found for the objects of ``state`` (its columns: a
    # module's state dict), for a reader's decode of ``state`` unchanged since (decode_tree's
    # ``columns``); a tree changed in place makes it stale, so only such a reader passes it.
    columns: ColumnMemo | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> bytes:
        head = {
            "format": FORMAT_NAME,
            "format_version": f"{self.version[0]}.{self.version[1]}",
            "created": self.created,
            "writer": self.writer,
            "world_size": self.world_size,
            "metadata": self.metadata,
            "files": {
                name: {"size": f.size, "checksum": f.checksum, "rank": f.rank}
                for name, f in self.files.items()
            },
        }
        # The tensor table is written as text directly: the same bytes json.dumps gives for it
        # (tests/test_many_tensors.py compares them), without a dict and three lists per tensor.
        # Everything of a one-chunk entry but its key repeats from entry to entry: each
        # distinct (dtype, shape, file, offsets, chunk shape) is written once.
        ints: dict[tuple[int, ...], str] = {}

        def _ints(values: tuple[int, ...]) -> str:
            text = ints.get(values)
            if text is None:
                text = ints[values] = ",".join(map(int.__repr__, values))
            return text

        def _chunk(c: Chunk) -> str:
            return (
                f'{{"file":{_text(c.file)},"key":{_text(c.key)},"offsets":[{_ints(c.offsets)}],'
                f'"shape":[{_ints(c.shape)}]}}'
            )

        # The document after its opening brace, in parts joined once (the checksum covers "{"
        # + this, and the file is the checksum member + this): a large manifest is copied as
        # few times as can be, each copy of fresh memory costing its page faults.
        parts = [_dumps(head)[1:-1], ',"tensors":[']
        append = parts.append
        around: dict[tuple[Any, ...], tuple[str, str]] = {}
        runs = runs_of(self.tensors)
        # Keys with nothing to escape (the usual state) are joined as they are, quotes around.
        quote = '"' if json_text.plain(list(chain.from_iterable(keys for _i, _t, keys in runs))) else ""
        for index, t, keys in runs:
            if index:
                append(",")
            if keys:  # entries that differ only in their one chunk's key: one join for all
                c = t.chunks[0]
                shared = (t.dtype.name, t.shape, c.file, c.offsets, c.shape)
                text = around.get(shared)
                if text is None:
                    text = around[shared] = (
                        f'{{"dtype":{_text(t.dtype.name)},"shape":[{_ints(t.shape)}],"chunks":[{{"file":'
                        f'{_text(c.file)},"key":{quote}',
                        f'{quote},"offsets":[{_ints(c.offsets)}],"shape":[{_ints(c.shape)}]}}]}}',
                    )
                append(text[0])
                append((text[1] + "," + text[0]).join(keys if quote else map(_text, keys)))
                append(text[1])
            else:
                append(
                    f'{{"dtype":{_text(t.dtype.name)},"shape":[{_ints(t.shape)}],'
                    f'"chunks":[{",".join(map(_chunk, t.chunks))}]}}'
                )
        parts += ['],"state":', json_text.tree(self.state), "}"]
        # Few parts (few runs, the large manifest of a uniform state): each encoded as it is,
        # no str copy of the whole document; many (short runs): joined first, one encode.
        pieces = [p.encode() for p in parts] if len(parts) <= _ENCODED_PARTS else ["".join(parts).encode()]
        crc = _CRC_OF_BRACE
        for piece in pieces:
            crc = crc32(piece, crc)  # (format.crc: ISA-L where installed, as for the data files)
        return b"".join((_CHECKSUM_PREFIX, b"%08x" % crc, b'",', *pieces))

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files.values())

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        """Parse and validate manifest bytes; ``where`` names the file in error messages.

        Everything the manifest alone decides is checked here, values included (tags,
        payloads, tensor references), so every reader refuses a bad manifest whole and
        before it opens a data file (FORMAT.md §9, refusal order)."""
        _check_own_checksum(data, where)  # damage first: a damaged manifest may not even parse
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointFormatError(f"{where}: not valid UTF-8 JSON ({exc})") from None
        columns: ColumnMemo = {}
        split = manifest_text.split_members(text, columns)
        if split is not None:
            manifest = cls._from_doc(*split, where, columns)
            if manifest is not None:
                return manifest
        # The general path: the text as JSON, every refusal with its message.
        manifest = cls._from_doc(_load_json(text, where), None, where, {})
        assert manifest is not None  # no rows given: a table is always parsed or refused
        return manifest

    @classmethod
    def _from_doc(
        cls, doc: Any, table: manifest_text.Table | None, where: str, columns: ColumnMemo
    ) -> Manifest | None:
        """The manifest of the parsed document ``doc``, its tensor table from ``table`` when
        given (the member then absent from ``doc``); None when the table is not vouched for
        here (the caller then parses the whole text the general way, for its message)."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            raise CheckpointFormatError(f'{where}: not a ckptproto manifest (no "format": "ckptproto")')
        version = _parse_version(doc.get("format_version"), where)
        files = _parse_files(doc.get("files"), where)
        tensors: Sequence[TensorEntry] | None
        if table is not None:
            tensors = _table_of(table, files)
            if tensors is None:
                return None
        else:
            tensors_doc = doc.get("tensors")
            if not isinstance(tensors_doc, list):
                raise CheckpointFormatError(f'{where}: "tensors" must be a list')
            tensors = _parse_tensors(tensors_doc, files, where)
        if not isinstance(doc.get("state"), dict):
            raise CheckpointFormatError(f'{where}: "state" must be an object')
        world_size = doc.get("world_size", 1)
        if type(world_size) is not int or world_size < 1:
            raise CheckpointFormatError(f"{where}: bad world_size {show(world_size)}")
        created, writer = doc.get("created", ""), doc.get("writer", "")
        if not isinstance(created, str) or not isinstance(writer, str):
            raise CheckpointFormatError(f'{where}: "created" and "writer" must be strings')
        metadata = doc.get("metadata", {})
        refs = _check_values(doc["state"], metadata, tensors, where, columns)
        return cls(
            doc["state"], tensors, files, metadata, created, version, world_size, writer, refs, columns
        )


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


_text = json_text.text

# The tensor table as runs: ``(index of the first entry, the first entry, every entry's key)``.
TableRuns = list[tuple[int, TensorEntry, list[str]]]


def table_runs(tensors: Sequence[TensorEntry]) -> TableRuns:
    """The table as runs of consecutive one-chunk entries that differ only in their chunk's key
    (the usual state: many tensors of one dtype and shape in one file), as ``(index of the
    first entry, the first entry, every entry's key)``; an entry of several chunks is a run of
    its own with no keys. Entries join a run only when they hold the very same dtype, shape,
    file, offsets and chunk shape objects, so every check and text of the first holds for all."""
    runs: list[tuple[int, TensorEntry, list[str]]] = []
    dtype: Any = None
    shape = file = offsets = cshape = None
    keys: list[str] = []
    for index, t in enumerate(tensors):
        chunks = t[2]
        if len(chunks) != 1:
            runs.append((index, t, []))
            dtype = None
            continue
        c = chunks[0]
        if t[0] is dtype and t[1] is shape and c[0] is file and c[2] is offsets and c[3] is cshape:
            keys.append(c[1])
            continue
        dtype, shape, file, offsets, cshape = t[0], t[1], c[0], c[2], c[3]
        keys = [c[1]]
        runs.append((index, t, keys))
    return runs


class RunTable(EntryTable):
    """A tensor table held as its :func:`table_runs`: what a writer builds by columns and then
    only checks and writes run by run (:func:`check_tensor_table`, :meth:`Manifest.to_json`
    take the runs as they are). An entry is built only when one is asked for::

        table = RunTable(table_runs(tensors))   # table[i] == tensors[i], list(table) == tensors
    """

    __slots__ = ("_count", "_starts", "runs")

    def __init__(self, runs: TableRuns) -> None:
        count = 0
        for start, first, keys in runs:  # a step per run, never per entry
            if start != count or (keys and (len(first.chunks) != 1 or first.chunks[0].key != keys[0])):
                raise ValueError(f"RunTable: the run at {start} is not what table_runs gives at {count}")
            count += max(len(keys), 1)
        self.runs, self._count = runs, count
        self._starts = [start for start, _first, _keys in runs]

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> TensorEntry: ...

    @overload
    def __getitem__(self, index: slice) -> list[TensorEntry]: ...

    def __getitem__(self, index: int | slice) -> TensorEntry | list[TensorEntry]:
        if isinstance(index, slice):
            return [self[i] for i in range(self._count)[index]]
        i = range(self._count)[index]  # negative indices as a list takes them; IndexError past the end
        start, first, keys = self.runs[bisect_right(self._starts, i) - 1]
        return first if i == start else _with_key(first, keys[i - start])

    def __iter__(self) -> Iterator[TensorEntry]:
        for _start, first, keys in self.runs:
            yield first
            for key in keys[1:]:
                yield _with_key(first, key)


def _with_key(entry: TensorEntry, key: str) -> TensorEntry:
    """A one-chunk entry's run mate: the same entry under another key."""
    c = entry.chunks[0]
    return TensorEntry(entry.dtype, entry.shape, (Chunk(c.file, key, c.offsets, c.shape),))


def runs_of(tensors: Sequence[TensorEntry]) -> TableRuns:
    """The runs of a table: those a RunTable holds, else :func:`table_runs`."""
    return tensors.runs if isinstance(tensors, RunTable) else table_runs(tensors)


def whole_table(file: str, keys: list[str], dtypes: list[DType], shapes: list[tuple[int, ...]]) -> RunTable:
    """The tensor table of tensors stored whole, each in one chunk of ``file`` under its key
    (a world of one's save), built by columns as its runs: a Python step per run (the first
    entry of each), none per entry. Entries of one run share their dtype, shape and offsets
    objects, as :func:`table_runs` requires::

        table = whole_table("data-00000-000.safetensors", ["w"], [f32], [(2, 3)])
    """
    count = len(keys)
    if len(dtypes) != count or len(shapes) != count:
        raise ValueError(f"whole_table: {count} keys, {len(dtypes)} dtypes, {len(shapes)} shapes")
    if not count:
        return RunTable([])
    # A run ends where the dtype or the shape object changes (offsets follow the shape's
    # length, and every chunk is in ``file``): compared by identity, as table_runs does.
    dtype_ids = np.fromiter(map(id, dtypes), np.uint64, count)
    shape_ids = np.fromiter(map(id, shapes), np.uint64, count)
    changes = np.flatnonzero((dtype_ids[1:] != dtype_ids[:-1]) | (shape_ids[1:] != shape_ids[:-1]))
    bounds = [0, *(changes + 1).tolist(), count]
    zeros = {n: (0,) * n for n in set(map(len, shapes))}  # shared by the entries of a length
    new = tuple.__new__  # a named tuple's own __new__ is a Python call around this
    return RunTable(
        [
            (
                a,
                new(
                    TensorEntry,
                    (dtypes[a], shapes[a], (new(Chunk, (file, keys[a], zeros[len(shapes[a])], shapes[a])),)),
                ),
                keys[a:b],
            )
            for a, b in pairwise(bounds)
        ]
    )


def show(value: object) -> str:
    """A value from a checkpoint, for a message: ``repr`` cut to 80 characters, and never
    failing (``str`` of an int past 4,300 digits raises)."""
    text = int_text(value) if type(value) is int else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_tensors(docs: list[Any], files: dict[str, FileEntry], where: str) -> list[TensorEntry]:
    """The tensor table, every entry checked, then F-12 (pairs unique) over all of them.

    This runs once per tensor (300,000 in a large state), so the usual entry (one chunk holding
    the whole tensor) is checked by :func:`_whole_entry`, its shape and zero offsets shared with
    every entry of the same shape. Any other entry, and any entry that check does not vouch
    for, goes through :func:`_parse_tensor`, the general path that also formats the message."""
    names = {name: name for name in files}  # one str per file name, not one per chunk
    shapes: _Shapes = {}
    tensors: list[TensorEntry] = []
    append = tensors.append
    pairs: set[tuple[str, str]] = set()
    add_pair = pairs.add
    nchunks = 0
    for index, doc in enumerate(docs):
        entry = _whole_entry(doc, names, shapes)
        if entry is None:
            entry = _parse_tensor(doc, index, files, where)
        append(entry)
        chunks = entry[2]
        if len(chunks) == 1:
            c = chunks[0]
            add_pair((c[0], c[1]))
            nchunks += 1
            continue
        for chunk in chunks:
            add_pair((chunk.file, chunk.key))
        nchunks += len(chunks)
    if len(pairs) != nchunks:
        _check_pairs_unique(tensors, where)  # raises, naming the first repeated pair
    return tensors


# A validated shape (a tuple of ints: hashing it cannot confuse 1 with True or 1.0) ->
# (that tuple, shared; zero offsets of its length; bytes it spans per item, zeros as 1).
_Shapes = dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...], int]]
_new = tuple.__new__  # a named tuple's own __new__ is a Python call around this


def _whole_entry(doc: Any, names: dict[str, str], shapes: _Shapes) -> TensorEntry | None:
    """The usual entry, one chunk holding the tensor whole, checked inline (``names``: the
    file table's names, each to itself; ``shapes``: the shapes checked so far, shared by the
    entries of one table); None where these checks do not vouch for ``doc``, which then goes
    through :func:`_parse_tensor` to be parsed or refused with a message."""
    if type(doc) is not dict:
        return None
    name, dims, chunks_doc = doc.get("dtype"), doc.get("shape"), doc.get("chunks")
    dtype = dtypes.BY_NAME.get(name) if type(name) is str else None
    if (
        dtype is None
        or type(chunks_doc) is not list
        or len(chunks_doc) != 1
        or type(chunks_doc[0]) is not dict
        or type(dims) is not list
        or len(dims) > MAX_NDIM
    ):
        return None
    c = chunks_doc[0]
    file, key, offsets, cshape = c.get("file"), c.get("key"), c.get("offsets"), c.get("shape")
    file = names.get(file) if type(file) is str else None
    if (
        file is None
        or type(key) is not str
        or type(offsets) is not list
        or type(cshape) is not list
        or cshape != dims  # values only (1 == True == 1.0): types checked below
        or len(offsets) != len(dims)
    ):
        return None
    for d in dims:
        if type(d) is not int or not 0 <= d <= MAX_DIM:
            return None
    for d in cshape:
        if type(d) is not int:
            return None
    for o in offsets:
        if type(o) is not int or o:
            return None
    known = shapes.get(shape := tuple(dims))
    if known is None:
        span = 1
        for d in shape:
            span *= d or 1
            if span > MAX_EXTENT:
                break  # refused by the general path: a hostile shape needs no exact product
        known = shapes[shape] = (shape, (0,) * len(shape), span)
    if known[2] * dtype.itemsize > MAX_EXTENT:
        return None
    shape = known[0]
    return _new(TensorEntry, (dtype, shape, (_new(Chunk, (file, key, known[1], shape)),)))


def _table_of(table: manifest_text.Table, files: dict[str, FileEntry]) -> ColumnTable | None:
    """The tensor table read by :func:`manifest_text.split_members`, as columns: each distinct
    form checked once by :func:`_whole_entry`. None where a form is not vouched for, or a
    (file, key) pair repeats (F-12): the general path then parses the table, for its message."""
    names = {name: name for name in files}
    shapes: _Shapes = {}
    forms: list[TensorEntry] = []
    for doc in table.entries:
        entry = _whole_entry(doc, names, shapes)
        if entry is None:
            return None
        forms.append(_with_key(entry, ""))
    keys, form_of = table.keys, table.form_of
    # F-12: the usual table names one file, and then its keys alone must be distinct.
    file_forms = [form.chunks[0].file for form in forms]
    if len(set(file_forms)) <= 1:
        pairs: list[Any] = keys
    else:
        pairs = list(zip(map(file_forms.__getitem__, form_of), keys, strict=True))
    if len(set(pairs)) != len(keys):
        return None
    # (the quick reader matched every key as a JSON string without escapes)
    return ColumnTable(keys, form_of, forms, plain_keys=True)


_DTYPE_OF, _SHAPE_OF, _CHUNKS_OF = itemgetter(0), itemgetter(1), itemgetter(2)  # TensorEntry fields
_FIRST, _CHUNK_FILE, _CHUNK_KEY = itemgetter(0), itemgetter(0), itemgetter(1)  # (and Chunk fields)
_CHUNK_OFFSETS, _CHUNK_SHAPE = itemgetter(2), itemgetter(3)


def _check_pairs_unique(tensors: Sequence[TensorEntry], where: str) -> None:
    """F-12: a (file, key) pair stores one chunk of the whole manifest."""
    used: set[tuple[str, str]] = set()
    for index, tensor in enumerate(tensors):
        for chunk in tensor.chunks:
            if (chunk.file, chunk.key) in used:
                raise CheckpointFormatError(
                    f"{where}: tensors[{index}]: ({chunk.file}, {chunk.key!r}) is claimed by two chunks"
                )
            used.add((chunk.file, chunk.key))


def _check_values(
    state: Any, metadata: Any, tensors: Sequence[TensorEntry], where: str, columns: ColumnMemo | None = None
) -> tuple[list[int], list[int]] | None:
    """F-14, F-15, F-17, F-18: decode both trees once, keeping nothing. Returns the state's
    ``$torch`` and ``$numpy`` indices when the quick walk vouched for them (else None)."""
    count = len(tensors)
    refs = quick_refs(state, where=f"{where} (state)", columns=columns)
    if refs is not None:
        torch_refs, numpy_refs = refs
        if (
            (not torch_refs or max(torch_refs) < count)
            and (not numpy_refs or max(numpy_refs) < count)
            and (not numpy_refs or _numpy_refs_ok(torch_refs, numpy_refs, tensors))
        ):
            state = None  # vouched for: only the metadata is left to check
        else:
            refs = None
    if state is not None:
        _check_state(state, tensors, where)

    def no_tensors(kind: str, index: int, path: str) -> None:
        raise CheckpointFormatError(f"{where}: metadata.{path} refers to a tensor")

    if not check_tree(metadata, no_tensors, where=f"{where} (metadata)"):
        raise CheckpointFormatError(f"{where}: metadata must be an object")
    return refs


def _numpy_refs_ok(torch_refs: list[int], numpy_refs: list[int], tensors: Sequence[TensorEntry]) -> bool:
    """No tensor is referenced both as torch and numpy, and numpy has every $numpy dtype."""
    used = set(numpy_refs)
    return used.isdisjoint(torch_refs) and all(tensors[i].dtype.numpy_name is not None for i in used)


def _check_state(state: Any, tensors: Sequence[TensorEntry], where: str) -> None:
    """The state decoded with every check, raising the first problem with its path."""
    kinds: dict[int, str] = {}
    count = len(tensors)

    def resolve(kind: str, index: int, path: str) -> None:
        if index < count and kinds.setdefault(index, kind) == kind and kind == "torch":
            return  # the common case, no message built
        at = f"state.{path}" if path else "state"
        if index >= count:
            raise CheckpointFormatError(f"{where}: {at} refers to tensor {show(index)}, which does not exist")
        if kinds.setdefault(index, kind) != kind:
            raise CheckpointFormatError(f"{where}: tensor {index} is used as both torch and numpy ({at})")
        if kind == "numpy" and tensors[index].dtype.numpy_name is None:
            raise CheckpointFormatError(
                f"{where}: {at} is a $numpy reference to a {tensors[index].dtype.name} tensor, "
                "a dtype numpy lacks"
            )

    if not check_tree(state, resolve, where=f"{where} (state)"):
        raise CheckpointFormatError(f"{where}: the state must be an object at the top level")


def _check_own_checksum(data: bytes, where: str) -> None:
    """Catch damage that still parses and validates (a flipped digit in a value), and damage
    that does not parse: checked on the raw bytes, before the JSON is parsed.

    The checksum protects the bytes as ckptproto writes them (compact, the member first). A
    manifest without the member (another writer, format 1.0 without it) is not checked; nor is
    one rewritten by a JSON tool (the member no longer first, or spaced). Any single damaged
    byte of a written manifest still fails: in the member's key it leaves a first member
    shaped like the checksum under another name, refused here too.
    """
    if not data.startswith(_CHECKSUM_PREFIX[: len(CHECKSUM_KEY) + 5]) and not _DAMAGED_CHECKSUM.match(data):
        return
    stored = data[len(_CHECKSUM_PREFIX) : _CHECKSUM_HEAD - 2]
    if (
        data.startswith(_CHECKSUM_PREFIX)
        and data[_CHECKSUM_HEAD - 2 : _CHECKSUM_HEAD] == b'",'
        and _HEX8.fullmatch(stored) is not None
        and int(stored, 16) == crc32(memoryview(data)[_CHECKSUM_HEAD:], _CRC_OF_BRACE)
    ):
        return
    raise CheckpointCorruptError(
        f"{where}: the manifest does not match its own {CHECKSUM_KEY} (damaged, or "
        f'edited after writing: an edited manifest must drop "{CHECKSUM_KEY}")'
    )


def _load_json(text: str, where: str) -> Any:
    try:
        return strict_json.loads(text)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{where}: {exc}") from None
    except RecursionError:
        raise CheckpointFormatError(f"{where}: JSON nests too deeply") from None
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{where}: not valid UTF-8 JSON ({exc})") from None


def _parse_version(text: object, where: str) -> tuple[int, int]:
    if not isinstance(text, str) or _VERSION.fullmatch(text) is None:
        raise CheckpointFormatError(
            f"{where}: bad format_version {show(text)}; this ckptproto reads {FORMAT_VERSION[0]}.x"
        )
    major, minor = (int(part) for part in text.split("."))
    if major != FORMAT_VERSION[0]:
        raise CheckpointFormatError(
            f"{where}: written in format version {major}.{minor}; this ckptproto reads "
            f"{FORMAT_VERSION[0]}.x — use a ckptproto release that supports version {major}"
        )
    return major, minor


def _parse_files(doc: object, where: str) -> dict[str, FileEntry]:
    if not isinstance(doc, dict):
        raise CheckpointFormatError(f'{where}: "files" must be an object')
    files: dict[str, FileEntry] = {}
    for name, f in doc.items():
        if not layout.is_valid_data_file_name(name):
            raise CheckpointFormatError(
                f"{where}: data file name {show(name)} is not a plain *.safetensors name in the checkpoint"
            )
        if not isinstance(f, dict):
            raise CheckpointFormatError(f"{where}: files[{show(name)}] must be an object")
        size, checksum, rank = f.get("size"), f.get("checksum"), f.get("rank", 0)
        if type(size) is not int or not 8 <= size <= MAX_EXTENT:
            raise CheckpointFormatError(f"{where}: files[{name!r}] has a bad size {show(size)}")
        if parse_checksum(checksum) is None:
            raise CheckpointFormatError(f"{where}: files[{name!r}] has a bad checksum {show(checksum)}")
        if type(rank) is not int or rank < 0:
            raise CheckpointFormatError(f"{where}: files[{name!r}] has a bad rank {show(rank)}")
        assert isinstance(checksum, str)
        files[name] = FileEntry(size, checksum, rank)
    return files


def _int_list(value: object) -> tuple[int, ...] | None:
    """``value`` as a tuple if it is a list of at most MAX_NDIM integers in [0, 2**62], else None."""
    if type(value) is list and len(value) <= MAX_NDIM:
        for v in value:  # a plain loop: all() over a generator costs more than the check
            if type(v) is not int or not 0 <= v <= MAX_DIM:
                return None
        return tuple(value)
    return None


def _bad_int_list(what: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{what} must be a list of at most {MAX_NDIM} integers in [0, 2**62]")


def _parse_tensor(doc: object, index: int, files: dict[str, FileEntry], where: str) -> TensorEntry:
    # Messages are formatted only on failure: this runs once per tensor (300,000 in a large state).
    if type(doc) is not dict:
        raise CheckpointFormatError(f"{where}: tensors[{index}] must be an object")
    name = doc.get("dtype")
    dtype = dtypes.BY_NAME.get(name) if type(name) is str else None
    if dtype is None:
        try:
            dtypes.by_name(name)
        except CheckpointFormatError as exc:
            raise CheckpointFormatError(f"{where}: tensors[{index}]: {exc}") from None
        raise AssertionError("by_name accepted a name BY_NAME lacks")  # pragma: no cover
    shape = _int_list(doc.get("shape"))
    if shape is None:
        raise _bad_int_list(f"{where}: tensors[{index}].shape")
    chunks_doc = doc.get("chunks")
    if type(chunks_doc) is not list or not chunks_doc or len(chunks_doc) > MAX_CHUNKS_PER_TENSOR:
        raise CheckpointFormatError(f"{where}: tensors[{index}].chunks must be a non-empty list")
    chunks = []
    ndim = len(shape)
    for j, c in enumerate(chunks_doc):
        if type(c) is not dict:
            raise CheckpointFormatError(f"{where}: tensors[{index}].chunks[{j}] must be an object")
        file, key = c.get("file"), c.get("key")
        if type(file) is not str or file not in files:
            raise CheckpointFormatError(
                f'{where}: tensors[{index}].chunks[{j}]: file {show(file)} is not listed in "files"'
            )
        if type(key) is not str:
            raise CheckpointFormatError(f"{where}: tensors[{index}].chunks[{j}]: key must be a string")
        offsets = _int_list(c.get("offsets"))
        if offsets is None:
            raise _bad_int_list(f"{where}: tensors[{index}].chunks[{j}].offsets")
        cshape = _int_list(c.get("shape"))
        if cshape is None:
            raise _bad_int_list(f"{where}: tensors[{index}].chunks[{j}].shape")
        if len(offsets) != ndim or len(cshape) != ndim:
            raise CheckpointFormatError(
                f"{where}: tensors[{index}].chunks[{j}]: offsets and shape need {ndim} dimensions"
            )
        # A whole-tensor box (offsets all zero) is inside by construction: not walked.
        if (cshape != shape or any(offsets)) and any(
            o + n > g for o, n, g in zip(offsets, cshape, shape, strict=True)
        ):
            raise CheckpointFormatError(
                f"{where}: tensors[{index}].chunks[{j}]: box {offsets}+{cshape} runs outside shape {shape}"
            )
        chunks.append(Chunk(file, key, offsets, cshape))
    extent = dtype.itemsize
    for d in shape:
        extent *= d or 1
        if extent > MAX_EXTENT:
            check_extent(shape, dtype.itemsize, f"{where}: tensors[{index}]")  # raises, with the message
    entry = TensorEntry(dtype, shape, tuple(chunks))
    if len(chunks) != 1 or chunks[0].shape != shape:
        _check_tiling(entry, f"{where}: tensors[{index}]")
    return entry


def check_tensor_table(tensors: Sequence[TensorEntry], files: dict[str, FileEntry], where: str) -> None:
    """What :meth:`Manifest.parse` checks in a tensor table, for entries a writer built (typed
    already, so no JSON types to check): every chunk's file listed, its offsets and shape of the
    tensor's rank and its box inside the tensor, chunks covering the tensor exactly once (no
    overlap, no hole), shapes within MAX_NDIM/MAX_DIM and F-33's extent, (file, key) pairs
    unique (F-12), and the file table itself. A writer's check before it commits, without
    parsing its own manifest back (a :class:`RunTable` is checked run by run as it is)::

        check_tensor_table(manifest.tensors, manifest.files, "ckpt/manifest.json")
    """
    # The file table as a reader checks it (names, sizes, checksums, ranks): a few files.
    _parse_files(
        {n: {"size": f.size, "checksum": f.checksum, "rank": f.rank} for n, f in files.items()}, where
    )
    shapes: dict[tuple[int, ...], int] = {}  # a checked shape -> bytes per item it spans
    keys_in: dict[str, list[str]] = {}  # the keys of each file, to find a repeated (file, key)
    for index, entry, keys in runs_of(tensors):
        shape, chunks = entry.shape, entry.chunks
        span = shapes.get(shape)
        if span is None:
            if len(shape) > MAX_NDIM or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape):
                raise _bad_int_list(f"{where}: tensors[{index}].shape")
            span = shapes[shape] = math.prod(d or 1 for d in shape)
        if span * entry.dtype.itemsize > MAX_EXTENT:
            check_extent(shape, entry.dtype.itemsize, f"{where}: tensors[{index}]")  # raises
        if len(chunks) == 1:
            c = chunks[0]
            if c.shape == shape and c.file in files and len(c.offsets) == len(shape) and not any(c.offsets):
                # The whole tensor in one chunk: the usual entry, and all of its run.
                keys_in.setdefault(c.file, []).extend(keys)
                continue
        if not chunks or len(chunks) > MAX_CHUNKS_PER_TENSOR:
            raise CheckpointFormatError(f"{where}: tensors[{index}].chunks must be a non-empty list")
        for j, c in enumerate(chunks):
            if c.file not in files:
                raise CheckpointFormatError(
                    f'{where}: tensors[{index}].chunks[{j}]: file {show(c.file)} is not listed in "files"'
                )
            if c.shape == shape and not any(c.offsets) and len(c.offsets) == len(shape):
                continue  # the whole tensor
            _check_box(c, shape, f"{where}: tensors[{index}].chunks[{j}]")
        if len(chunks) == 1:
            keys_in.setdefault(chunks[0].file, []).extend(keys)  # a run's keys, all checked here
        else:
            for c in chunks:
                keys_in.setdefault(c.file, []).append(c.key)
        if len(chunks) != 1 or chunks[0].shape != shape:
            _check_tiling(entry, f"{where}: tensors[{index}]")
    if any(len(set(keys)) != len(keys) for keys in keys_in.values()):
        _check_pairs_unique(tensors, where)  # raises, naming the first repeated pair


def _check_box(chunk: Chunk, shape: tuple[int, ...], what: str) -> None:
    """A chunk's offsets and shape: of the tensor's rank, and a box inside it."""
    offsets, cshape = chunk.offsets, chunk.shape
    for name, dims in (("offsets", offsets), ("shape", cshape)):
        if len(dims) > MAX_NDIM or not all(type(d) is int and 0 <= d <= MAX_DIM for d in dims):
            raise _bad_int_list(f"{what}.{name}")
    if len(offsets) != len(shape) or len(cshape) != len(shape):
        raise CheckpointFormatError(f"{what}: offsets and shape need {len(shape)} dimensions")
    if any(o + n > g for o, n, g in zip(offsets, cshape, shape, strict=True)):
        raise CheckpointFormatError(f"{what}: box {offsets}+{cshape} runs outside shape {shape}")


def check_extent(shape: tuple[int, ...], itemsize: int, what: str) -> None:
    """F-33: the bytes a shape spans, zero dimensions ignored, fit a signed 64-bit integer.

    A zero-element tensor ``[0, 2**62, 2**62]`` holds no bytes, but its strides overflow:
    torch and numpy cannot even create it empty, so every reader refuses it up front."""
    extent = itemsize
    for d in shape:
        extent *= d or 1
        if extent > MAX_EXTENT:
            raise CheckpointFormatError(
                f"{what}: shape {list(shape)} spans over 2**63-1 bytes (zero dimensions ignored); "
                "no tensor library can lay it out"
            )


def _check_tiling(entry: TensorEntry, what: str) -> None:
    """Chunks must cover the tensor exactly once: volumes add up and no two boxes overlap."""
    if sum(c.numel for c in entry.chunks) != entry.numel:
        raise CheckpointFormatError(
            f"{what}: chunks hold {sum(c.numel for c in entry.chunks)} elements, shape needs {entry.numel}"
        )
    boxes = [c for c in entry.chunks if c.numel]
    if len(boxes) < 2:
        return
    lo = np.array([c.offsets for c in boxes], dtype=np.int64)
    hi = lo + np.array([c.shape for c in boxes], dtype=np.int64)
    # Sweep along the dim with the most distinct starts, comparing each box only with those
    # starting before it ends there: all pairs would be quadratic (65,536 chunks: minutes).
    dim = max(range(lo.shape[1]), key=lambda d: len(np.unique(lo[:, d])))
    order = np.argsort(lo[:, dim], kind="stable")
    lo, hi = lo[order], hi[order]
    ends = np.searchsorted(lo[:, dim], hi[:, dim], side="left")
    for i in range(len(boxes) - 1):
        if ends[i] <= i + 1:
            continue
        window = slice(i + 1, int(ends[i]))
        overlap = np.all((lo[i] < hi[window]) & (lo[window] < hi[i]), axis=1)
        if overlap.any():
            j = i + 1 + int(np.argmax(overlap))
            raise CheckpointFormatError(f"{what}: chunks {int(order[i])} and {int(order[j])} overlap")
