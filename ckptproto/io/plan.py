"""Planning a save: which bytes go where, decided before any file is opened.

A plan is pure data (torchsnapshot's split of planning from I/O): the sync saver executes it
at once, the async saver after staging, a distributed rank for its own share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple, overload

from ckptproto._recent import Recent
from ckptproto.arrays import ArraySpec
from ckptproto.format import safetensors
from ckptproto.format.manifest import Chunk

# Written into every data file's safetensors metadata, so tools that look for it (hub loaders
# expect "format": "pt") and people opening the file see where it came from.
FILE_METADATA = {"format": "pt", "writer": "ckptproto"}


class Piece(NamedTuple):
    """A whole tensor or one chunk of it to be stored: ``source`` indexes the caller's list
    of byte sources; ``offsets``/``shape`` place it in the global tensor. (A named tuple: one
    is built per tensor saved, and a frozen dataclass costs four times as much.)"""

    source: int
    key: str
    spec: ArraySpec
    offsets: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return self.spec.nbytes


class WholePieces(Sequence[Piece]):
    """Pieces each holding one whole tensor, piece ``i`` from source ``i``, by columns: a world
    of one's share (every tensor of the state), 100,000 pieces of a large one. The planner and
    the pipeline read the columns; a :class:`Piece` is built only for whoever asks for one::

        pieces = WholePieces(["w", "b"], [spec_w, spec_b])   # pieces[1] == Piece(1, "b", spec_b, (0,))
    """

    __slots__ = ("keys", "specs")

    def __init__(self, keys: list[str], specs: list[ArraySpec]) -> None:
        if len(keys) != len(specs):
            raise ValueError(f"WholePieces: {len(keys)} keys for {len(specs)} specs")
        self.keys, self.specs = keys, specs

    def __len__(self) -> int:
        return len(self.keys)

    @overload
    def __getitem__(self, index: int) -> Piece: ...

    @overload
    def __getitem__(self, index: slice) -> list[Piece]: ...

    def __getitem__(self, index: int | slice) -> Piece | list[Piece]:
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        i = range(len(self))[index]  # negative indices as a list takes them; IndexError past the end
        spec = self.specs[i]
        return Piece(i, self.keys[i], spec, (0,) * len(spec.shape))

    def __eq__(self, other: object) -> bool:
        """Equal as the lists of their pieces are (to another WholePieces, a list or a tuple)."""
        if isinstance(other, WholePieces):
            return self.keys == other.keys and self.specs == other.specs
        if isinstance(other, (list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable columns, as a list's

    def __iter__(self) -> Iterator[Piece]:
        ndims = [len(s.shape) for s in self.specs]
        zeros = [(0,) * n for n in range(max(ndims, default=0) + 1)]  # shared, as plan_share's
        offsets = map(zeros.__getitem__, ndims)
        return map(Piece._make, zip(range(len(self)), self.keys, self.specs, offsets, strict=True))


def piece_columns(pieces: Sequence[Piece]) -> tuple[Sequence[int], list[str], list[ArraySpec]]:
    """``(sources, keys, specs)`` of ``pieces``, without building a Piece of WholePieces."""
    if isinstance(pieces, WholePieces):
        return range(len(pieces)), pieces.keys, pieces.specs
    return [p.source for p in pieces], [p.key for p in pieces], [p.spec for p in pieces]


class Placement(NamedTuple):
    piece: Piece
    begin: int  # absolute offset in the file


@dataclass(frozen=True)
class FilePlan:
    """One data file: its header bytes and where every piece's bytes start. Parallel columns
    in file order (``pieces[i]`` starts at ``begins[i]``, ``sizes[i]`` bytes long, its bytes in
    the caller's ``sources[order[i]]``): the pieces tile the file after the header exactly."""

    name: str
    rank: int
    header: bytes
    given: Sequence[Piece]  # the pieces in the caller's order
    positions: list[int] | None  # of ``given``, in file order (None: the given order)
    order: list[int]
    begins: list[int]
    sizes: list[int]
    size: int

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """The pieces in file order (built on demand: the writer needs only the columns)."""
        if self.positions is None:
            return tuple(self.given)
        return tuple(map(self.given.__getitem__, self.positions))

    @property
    def placements(self) -> tuple[Placement, ...]:
        return tuple(map(Placement, self.pieces, self.begins))

    def chunks(self) -> dict[int, Chunk]:
        """The manifest chunk for each piece, by ``piece.source``."""
        return {p.source: Chunk(self.name, p.key, p.offsets, p.spec.shape) for p in self.pieces}


def align_width(itemsize: int) -> int:
    """The alignment a data file gives a piece of this item size (the header is padded to 8,
    or to a page: ``safetensors.buffer_align``)."""
    return min(itemsize, 8)


def file_order(widths: list[int]) -> list[int] | None:
    """The order of a data file's pieces, given each one's :func:`align_width`: wider first,
    otherwise as given (a stable sort); None when that is the given order (one width, the
    usual state). Readers that regenerate a header (``io/headercheck.py``) use this same rule."""
    if len(set(widths)) <= 1:
        return None
    return sorted(range(len(widths)), key=[-w for w in widths].__getitem__)


def _widths(specs: list[ArraySpec]) -> list[int]:
    """:func:`align_width` of each spec, computed once per distinct spec (specs are shared
    objects: a state of 100,000 tensors holds a few), looked up by identity in C."""
    ids = list(map(id, specs))
    distinct = dict(zip(ids, specs, strict=True))
    width = {i: align_width(s.dtype.itemsize) for i, s in distinct.items()}
    if len(set(width.values())) <= 1:
        return [next(iter(width.values()))] * len(specs) if specs else []
    return list(map(width.__getitem__, ids))


def plan_file(
    name: str, rank: int, pieces: Sequence[Piece], metadata: dict[str, str] | None = None
) -> FilePlan:
    """Lay ``pieces`` out in one safetensors file. Wider dtypes go first so that every tensor
    starts at a multiple of its item size (the header is padded to 8 bytes), which lets
    loaders map tensors straight from the file::

        plan = plan_file("rank0.safetensors", 0, WholePieces(["w"], [spec]))

    A training run saves the same layout again and again: when ``pieces`` have the keys,
    specs and sources of a file planned lately (with the same ``metadata``), that plan's
    columns and header are taken again (comparing them is ~0.05 us a piece, planning ~1.5).
    """
    sources, keys, specs = piece_columns(pieces)
    meta = FILE_METADATA if metadata is None else metadata
    found = _recent.get(_Layout(sources, keys, specs, meta))
    if found is not None:
        return dataclasses.replace(found, name=name, rank=rank, given=pieces)
    plan = _plan_file(name, rank, pieces, sources, keys, specs, meta)
    # Kept as copies: a caller may change its lists after this call.
    kept = _Layout(
        sources if isinstance(sources, range) else list(sources), list(keys), list(specs), dict(meta)
    )
    _recent.put(kept, dataclasses.replace(plan, given=()))  # (not this call's pieces: kept alive)
    return plan


class _Layout(NamedTuple):
    """What a data file's plan depends on (its name and rank only name it)."""

    sources: Sequence[int]
    keys: list[str]
    specs: list[ArraySpec]  # compared by identity first (equal specs are shared objects)
    metadata: dict[str, str]


# The plans of the two files planned or found last (a save plans one data file per rank: the
# header, columns and keys of a state of 300,000 tensors hold ~80 MB), by their layout.
_recent: Recent[_Layout, FilePlan] = Recent(2)


def _plan_file(
    name: str,
    rank: int,
    pieces: Sequence[Piece],
    sources: Sequence[int],
    keys: list[str],
    specs: list[ArraySpec],
    metadata: dict[str, str],
) -> FilePlan:
    positions = file_order(_widths(specs))
    if positions is not None:
        sources = [sources[i] for i in positions]
        keys, specs = [keys[i] for i in positions], [specs[i] for i in positions]
    sizes = [s.nbytes for s in specs]
    ends = list(accumulate(sizes))
    begins = [0, *ends[:-1]] if ends else []
    known = [s.dtype.safetensors for s in specs]
    shapes = [s.shape for s in specs]
    if None in known:  # dtypes safetensors lacks: raw bytes, one dimension
        shapes = [
            shape if code is not None else (n,) for code, shape, n in zip(known, shapes, sizes, strict=True)
        ]
    codes = [code or safetensors.RAW_CODE for code in known]
    header = safetensors.encode_header_columns(
        keys,
        codes,
        shapes,
        begins,
        ends,
        metadata,
        align=safetensors.buffer_align(ends[-1] if ends else 0),
    )
    start = len(header)
    return FilePlan(
        name,
        rank,
        header,
        pieces,
        positions,
        list(sources),
        list(map(start.__add__, begins)),
        sizes,
        start + (ends[-1] if ends else 0),
    )


def unique_keys(paths: list[str]) -> list[str]:
    """Data-file keys from state paths: the path itself, made unique (``a.b`` can come from
    ``{"a": {"b": x}}`` and from ``{"a.b": y}``) and never the reserved ``__metadata__``."""
    distinct = set(paths)
    if len(distinct) == len(paths) and "" not in distinct and "__metadata__" not in distinct:
        return list(paths)  # the usual state: every path is already a unique, allowed key
    seen: set[str] = set()
    keys = []
    for path in paths:
        key = path or "<root>"
        candidate, n = key, 1
        while candidate in seen or candidate == "__metadata__":
            n += 1
            candidate = f"{key}#{n}"
        seen.add(candidate)
        keys.append(candidate)
    return keys
