"""Planning a save: which bytes go where, decided before any file is opened.

A plan is pure data (torchsnapshot's split of planning from I/O): the sync saver executes it
at once, the async saver after staging, a distributed rank for its own share.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

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
    pieces: tuple[Piece, ...]
    order: list[int]
    begins: list[int]
    sizes: list[int]
    size: int

    @property
    def placements(self) -> tuple[Placement, ...]:
        return tuple(map(Placement, self.pieces, self.begins))

    def chunks(self) -> dict[int, Chunk]:
        """The manifest chunk for each piece, by ``piece.source``."""
        return {p.source: Chunk(self.name, p.key, p.offsets, p.spec.shape) for p in self.pieces}


def align_width(itemsize: int) -> int:
    """The alignment a data file gives a piece of this item size (the header is padded to 8)."""
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


def plan_file(name: str, rank: int, pieces: list[Piece], metadata: dict[str, str] | None = None) -> FilePlan:
    """Lay ``pieces`` out in one safetensors file. Wider dtypes go first so that every tensor
    starts at a multiple of its item size (the header is padded to 8 bytes), which lets
    loaders map tensors straight from the file."""
    specs = [p.spec for p in pieces]
    ordered = pieces
    order = file_order(_widths(specs))
    if order is not None:
        ordered, specs = [pieces[i] for i in order], [specs[i] for i in order]
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
        [p.key for p in ordered], codes, shapes, begins, ends, FILE_METADATA if metadata is None else metadata
    )
    start = len(header)
    return FilePlan(
        name,
        rank,
        header,
        tuple(ordered),
        [p.source for p in ordered],
        [start + b for b in begins],
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
