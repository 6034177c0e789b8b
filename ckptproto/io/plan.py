"""Planning a save: which bytes go where, decided before any file is opened.

A plan is pure data (torchsnapshot's split of planning from I/O): the sync saver executes it
at once, the async saver after staging, a distributed rank for its own share.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """One data file: its header bytes and where every piece's bytes start."""

    name: str
    rank: int
    header: bytes
    placements: tuple[Placement, ...]

    @property
    def size(self) -> int:
        return len(self.header) + sum(p.piece.nbytes for p in self.placements)

    def chunks(self) -> dict[int, Chunk]:
        """The manifest chunk for each piece, by ``piece.source``."""
        return {
            p.piece.source: Chunk(self.name, p.piece.key, p.piece.offsets, p.piece.spec.shape)
            for p in self.placements
        }


def plan_file(name: str, rank: int, pieces: list[Piece], metadata: dict[str, str] | None = None) -> FilePlan:
    """Lay ``pieces`` out in one safetensors file. Wider dtypes go first so that every tensor
    starts at a multiple of its item size (the header is padded to 8 bytes), which lets
    loaders map tensors straight from the file."""
    widths = [min(p.spec.dtype.itemsize, 8) for p in pieces]
    ordered = pieces
    if len(set(widths)) > 1:  # one dtype width (the usual state): already in order
        ordered = [pieces[i] for i in sorted(range(len(pieces)), key=lambda i: -widths[i])]
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    append = entries.append
    position = 0
    raw = safetensors.RAW_CODE
    for piece in ordered:
        spec = piece.spec
        code = spec.dtype.safetensors
        end = position + spec.nbytes
        append((piece.key, code or raw, spec.shape if code is not None else (spec.nbytes,), position, end))
        position = end
    header = safetensors.encode_header(entries, FILE_METADATA if metadata is None else metadata)
    start = len(header)
    placements = tuple(
        [Placement(piece, start + entry[3]) for piece, entry in zip(ordered, entries, strict=True)]
    )
    return FilePlan(name, rank, header, placements)


def unique_keys(paths: list[str]) -> list[str]:
    """Data-file keys from state paths: the path itself, made unique (``a.b`` can come from
    ``{"a": {"b": x}}`` and from ``{"a.b": y}``) and never the reserved ``__metadata__``."""
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
