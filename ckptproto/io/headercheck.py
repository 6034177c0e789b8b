"""Checking a data file's header by regenerating it: the fast path of F-13/F-22 on load.

A data file written by ckptproto has a header that is a pure function of what the manifest
already says about it: the keys, dtypes and chunk shapes of its chunks, laid out in the
writer's order (``io/plan.py``: manifest order, wider dtypes first) back to back from offset
0. So the reader regenerates those bytes with the writer's own ``encode_header`` and compares
them with the file's (one ``bytes ==``); only a file whose header differs (another writer,
other spacing, order or metadata, or damage) is parsed and checked field by field::

    layouts = file_layouts(manifest)
    layout = layouts["data-00000-000.safetensors"]
    if header_bytes == expected_header(layout, file_size):
        ...  # every F-13/F-22 check passes; entries come from layout.entries

Why equal bytes prove what the full parse would (``safetensors.parse_header`` then
``OpenCheckpoint.check_chunks``): the regenerated text is what ``json.dumps`` writes for an
object (tests/test_many_tensors.py holds encode_header to that), so it is UTF-8 JSON the
strict parser reads back exactly: keys are distinct (F-12 made the manifest's ``(file, key)``
pairs unique, and a layout holding the reserved ``__metadata__`` key is never regenerated),
there is no NaN, no float, no lone surrogate (manifest strings passed the strict parser, and
UTF-8 cannot encode one: encoding raises, and the slow path runs); ``__metadata__`` is
``FILE_METADATA``, strings to strings; every entry has exactly dtype, shape and data_offsets;
every code is the manifest dtype's safetensors code (F-20), or ``U8`` with ``[nbytes]`` for a
dtype without one, and ``SAFETENSORS_ITEMSIZE`` of that code is the dtype's item size
(tests/test_load_fast.py checks the table), so each entry's byte length matches its shape;
offsets run back to back from 0, and the layout is used only when the last one ends at the
end of the file (exact tiling); the header is at most MAX_HEADER_BYTES (else the slow path
refuses it) and its length prefix is encode_header's own, padded with spaces as the writer
pads (to a multiple of 8, or of a page: both are tried, the parse skips the spaces alike).
The entries the parse would return are then exactly ``layout.entries`` shifted by the header
length, and each chunk finds its entry with its own code and shape (F-13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import accumulate
from operator import itemgetter

from ckptproto.dtypes import DType
from ckptproto.format import safetensors
from ckptproto.format.manifest import ColumnTable, Manifest, TensorEntry, table_columns
from ckptproto.io.plan import FILE_METADATA, align_width, file_order

Stored = tuple[str, tuple[int, ...], int, int]  # code, stored shape, nbytes, min(itemsize, 8)
Entry = tuple[str, str, tuple[int, ...], int, int]  # key, code, stored shape, begin, end


@dataclass
class FileLayout:
    """A data file as a ckptproto writer lays it out from the manifest, in file order, as
    columns: each entry's key, safetensors code, stored shape and ``begin``/``end`` offsets
    (relative to the buffer), and the tensor index each one stores (``owners``)::

        layout = FileLayout(["w"], ["F32"], [(2,)], [0], [8], [0], 8)
        layout.entries  # [("w", "F32", (2,), 0, 8)]
    """

    keys: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    begins: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    buffer_size: int = 0
    # Where the table has columns (manifest.ColumnTable): each entry's form, an index into
    # ``forms``, the entries but for the key (a reader's work per form, not per tensor).
    form_of: list[int] | None = None
    forms: list[TensorEntry] = field(default_factory=list)
    # The keys are written in JSON as themselves (ColumnTable.plain_keys), and distinct (F-12,
    # checked by the parse that made that table): the regenerated header checks neither.
    plain_keys: bool = False

    @property
    def entries(self) -> list[Entry]:
        """The ``(key, code, shape, begin, end)`` entries, built on demand."""
        return list(zip(self.keys, self.codes, self.shapes, self.begins, self.ends, strict=True))

    def header_entries(self, data_start: int) -> dict[str, safetensors.HeaderEntry]:
        """What ``parse_header`` returns for the regenerated header (absolute offsets)."""
        new = tuple.__new__
        return {
            key: new(safetensors.HeaderEntry, (code, shape, data_start + begin, data_start + end))
            for key, code, shape, begin, end in self.entries
        }


def _stored(dtype: DType, shape: tuple[int, ...]) -> Stored:
    """How a chunk of ``shape`` is stored (F-20): its code and shape, bytes, and alignment."""
    nbytes = math.prod(shape) * dtype.itemsize
    width = align_width(dtype.itemsize)
    if dtype.safetensors is None:
        return (safetensors.RAW_CODE, (nbytes,), nbytes, width)
    return (dtype.safetensors, shape, nbytes, width)


def _layout(
    keys: list[str], stored: list[Stored], owners: list[int], form_of: list[int] | None = None
) -> FileLayout:
    """Entries back to back from offset 0 in the writer's order: manifest order, wider dtypes
    first (io/plan.py), in C-level passes over the columns."""
    order = file_order(list(map(_WIDTH, stored)))
    if order is not None:
        keys = list(map(keys.__getitem__, order))
        stored = list(map(stored.__getitem__, order))
        owners = list(map(owners.__getitem__, order))
        if form_of is not None:
            form_of = list(map(form_of.__getitem__, order))
    ends = list(accumulate(map(_NBYTES, stored)))
    begins = [0, *ends[:-1]] if ends else []
    codes, shapes = list(map(_CODE, stored)), list(map(_STORED_SHAPE, stored))
    return FileLayout(keys, codes, shapes, begins, ends, owners, ends[-1] if ends else 0, form_of)


_CODE, _STORED_SHAPE, _NBYTES, _WIDTH = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(3)


def file_layouts(manifest: Manifest) -> dict[str, FileLayout]:
    """Each listed data file's layout as ckptproto's writer would make it from ``manifest``."""
    tensors = manifest.tensors
    columns = table_columns(tensors)
    if columns is not None:  # every tensor one chunk (a one-process save, say): by columns
        return _column_layouts(columns, list(manifest.files))
    # (id(dtype), chunk shape) -> how it is stored: a few distinct ones in a large state.
    # The id of a DType from dtypes.BY_NAME, which keeps every one alive (a DType's own hash
    # is a Python call).
    known: dict[tuple[int, tuple[int, ...]], Stored] = {}
    by_file: dict[str, tuple[list[str], list[Stored], list[int]]] = {n: ([], [], []) for n in manifest.files}
    for index, tensor in enumerate(tensors):
        dtype = tensor.dtype
        for chunk in tensor.chunks:
            found = known.get((id(dtype), chunk.shape))
            if found is None:
                found = known[(id(dtype), chunk.shape)] = _stored(dtype, chunk.shape)
            keys, stored_column, owners = by_file[chunk.file]
            keys.append(chunk.key)
            stored_column.append(found)
            owners.append(index)
    return {name: _layout(*column) for name, column in by_file.items()}


def _column_layouts(columns: ColumnTable, names: list[str]) -> dict[str, FileLayout]:
    """:func:`file_layouts` of a table of one-chunk entries: how each form is stored, worked
    out once per form, then spread over each file's tensors in C-level passes."""
    forms, form_of, keys = columns.forms, columns.form_of, columns.keys
    stored_forms = [_stored(form.dtype, form.chunks[0].shape) for form in forms]
    file_forms = [form.chunks[0].file for form in forms]
    owned: dict[str, list[int]] = {}
    if len(set(file_forms)) == 1:  # one file holds every tensor (a one-process save)
        owned[file_forms[0]] = list(range(len(form_of)))
    elif form_of:
        for index, file in enumerate(map(file_forms.__getitem__, form_of)):
            owned.setdefault(file, []).append(index)
    layouts: dict[str, FileLayout] = {}
    for name in names:
        owners = owned.get(name, [])
        whole = len(owners) == len(form_of)
        owned_forms = form_of if whole else list(map(form_of.__getitem__, owners))
        layout = _layout(
            keys if whole else list(map(keys.__getitem__, owners)),
            list(map(stored_forms.__getitem__, owned_forms)),
            owners,
            owned_forms,
        )
        layout.forms = forms
        layout.plain_keys = columns.plain_keys
        layouts[name] = layout
    return layouts


def expected_header(layout: FileLayout, file_size: int | None = None) -> bytes | None:
    """The header (length prefix, JSON, padding) a ckptproto writer gives the file, or None
    when the comparison could not stand for the full check (see the module docstring).

    ``file_size``: the header of that file as either padding makes it, to a multiple of 8 or
    of a page (``safetensors.buffer_align``: files written before the page rule, and files
    with other buffer sizes, keep the fast path); None when the file's size fits neither.
    Without it, the header the writer gives this layout today."""
    if "__metadata__" in layout.keys:
        return None
    try:
        header = safetensors.encode_header_columns(
            layout.keys,
            layout.codes,
            layout.shapes,
            layout.begins,
            layout.ends,
            FILE_METADATA,
            plain_distinct_keys=layout.plain_keys,
        )
    except UnicodeEncodeError:  # a key no UTF-8 file holds: the parse says what is wrong
        return None
    paged = -(-len(header) // safetensors.PAGE) * safetensors.PAGE
    if file_size is None:
        length = paged if safetensors.buffer_align(layout.buffer_size) == safetensors.PAGE else len(header)
    else:
        length = file_size - layout.buffer_size
        if length not in (len(header), paged):
            return None
    if length - 8 > safetensors.MAX_HEADER_BYTES:
        return None
    # (Padding only adds spaces after the JSON, which the full parse skips as it does F-23's.)
    return header if length == len(header) else safetensors.padded_to(header, length)
