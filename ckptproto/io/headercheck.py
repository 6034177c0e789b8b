"""Checking a data file's header by regenerating it: the fast path of F-13/F-22 on load.

A data file written by ckptproto has a header that is a pure function of what the manifest
already says about it: the keys, dtypes and chunk shapes of its chunks, laid out in the
writer's order (``io/plan.py``: manifest order, wider dtypes first) back to back from offset
0. So the reader regenerates those bytes with the writer's own ``encode_header`` and compares
them with the file's (one ``bytes ==``); only a file whose header differs (another writer,
other spacing, order or metadata, or damage) is parsed and checked field by field::

    layouts = file_layouts(manifest)
    layout = layouts["data-00000-000.safetensors"]
    if header_bytes == expected_header(layout):
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
(tests/test_header_regen.py checks the table), so each entry's byte length matches its shape;
offsets run back to back from 0, and the layout is used only when the last one ends at the
end of the file (exact tiling); the header is at most MAX_HEADER_BYTES (else the slow path
refuses it) and its length prefix is encode_header's own. The entries the parse would return
are then exactly ``layout.entries`` shifted by the header length, and each chunk finds its
entry with its own code and shape (F-13).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter

from ckptproto.format import safetensors
from ckptproto.format.manifest import Manifest
from ckptproto.io.plan import FILE_METADATA

Stored = tuple[str, tuple[int, ...], int, int]  # code, stored shape, nbytes, min(itemsize, 8)


@dataclass
class FileLayout:
    """A data file as a ckptproto writer lays it out from the manifest: in file order, the
    ``(key, code, shape, begin, end)`` entries (offsets relative to the buffer) and the
    tensor index and chunk number each one stores."""

    entries: list[tuple[str, str, tuple[int, ...], int, int]] = field(default_factory=list)
    owners: list[tuple[int, int]] = field(default_factory=list)  # (tensor index, chunk number)
    buffer_size: int = 0

    def header_entries(self, data_start: int) -> dict[str, safetensors.HeaderEntry]:
        """What ``parse_header`` returns for the regenerated header (absolute offsets)."""
        new = tuple.__new__
        return {
            key: new(safetensors.HeaderEntry, (code, shape, data_start + begin, data_start + end))
            for key, code, shape, begin, end in self.entries
        }


def file_layouts(manifest: Manifest) -> dict[str, FileLayout]:
    """Each listed data file's layout as ckptproto's writer would make it from ``manifest``."""
    raw = safetensors.RAW_CODE
    per_file: dict[str, list[tuple[str, Stored, int, int]]] = {name: [] for name in manifest.files}
    # (id(dtype), chunk shape) -> how it is stored: a few distinct ones in a large state.
    # The id of a DType from dtypes.BY_NAME, which keeps every one alive.
    stored: dict[tuple[int, tuple[int, ...]], Stored] = {}
    for index, tensor in enumerate(manifest.tensors):
        dtype = tensor.dtype
        for number, chunk in enumerate(tensor.chunks):
            found = stored.get((id(dtype), chunk.shape))
            if found is None:
                nbytes = chunk.numel * dtype.itemsize
                code = dtype.safetensors
                found = stored[(id(dtype), chunk.shape)] = (
                    (code, chunk.shape, nbytes, min(dtype.itemsize, 8))
                    if code is not None
                    else (raw, (nbytes,), nbytes, min(dtype.itemsize, 8))
                )
            per_file[chunk.file].append((chunk.key, found, index, number))
    layouts: dict[str, FileLayout] = {}
    for name, items in per_file.items():
        if len({s[3] for _, s, _, _ in items}) > 1:
            items.sort(key=lambda item: -item[1][3])  # stable: the writer's order (io/plan.py)
        layout = layouts[name] = FileLayout()
        append = layout.entries.append
        position = 0
        for key, (code, shape, nbytes, _width), _index, _number in items:
            end = position + nbytes
            append((key, code, shape, position, end))
            position = end
        layout.owners = [(index, number) for _, _, index, number in items]
        layout.buffer_size = position
    return layouts


def expected_header(layout: FileLayout) -> bytes | None:
    """The header (length prefix, JSON, padding) a ckptproto writer gives the file, or None
    when the comparison could not stand for the full check (see the module docstring)."""
    if "__metadata__" in map(itemgetter(0), layout.entries):
        return None
    try:
        header = safetensors.encode_header(layout.entries, FILE_METADATA)
    except UnicodeEncodeError:  # a key no UTF-8 file holds: the parse says what is wrong
        return None
    if len(header) - 8 > safetensors.MAX_HEADER_BYTES:
        return None
    return header


def matches(layout: FileLayout, header: bytes, file_size: int) -> bool:
    """Whether ``header`` (the file's first bytes) is the regenerated one and the entries tile
    the rest of the file exactly."""
    expected = expected_header(layout)
    return expected is not None and header == expected and len(expected) + layout.buffer_size == file_size
