"""Reading tensors out of an open checkpoint: read plans executed by the I/O pool straight
into destination buffers (CRC computed on the way), whole loads, mmap, resharded boxes::

    plan = ReadPlan()
    plan_into(ckpt, plan, index, spec, value, dest)
    execute(ckpt, plan, verify=True)
"""

from __future__ import annotations

import mmap as mmap_module
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ckptproto import arrays
from ckptproto.arrays import ArraySpec, Kind
from ckptproto.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError
from ckptproto.format.crc import crc32, crc32_combine
from ckptproto.format.manifest import Chunk, Manifest, TensorEntry, show
from ckptproto.io import bulkread, threads
from ckptproto.io.reader import DataFile, OpenCheckpoint, check_all_files, file_crc, read_size
from ckptproto.io.storage import StoredFile


@dataclass
class _Read:
    begin: int
    dest: memoryview
    after: Callable[[], None] | None = None


@dataclass
class ReadPlan:
    """Byte ranges to read from each file into destination buffers."""

    reads: dict[str, list[_Read]] = field(default_factory=dict)

    def add(self, file: str, begin: int, dest: memoryview, after: Callable[[], None] | None = None) -> None:
        self.reads.setdefault(file, []).append(_Read(begin, dest, after))


def _read_batch(
    file: StoredFile, offset: int, views: list[memoryview], with_crc: bool, name: str
) -> tuple[int, int]:
    want = sum(len(v) for v in views)
    got = file.read_into(offset, views)
    if got != want:
        raise CheckpointCorruptError(
            f"{name}: file ended at byte {offset + got}, expected data up to {offset + want}"
        )
    crc = 0
    if with_crc:
        for view in views:
            crc = crc32(view, crc)
    return crc, want


def execute(ckpt: OpenCheckpoint, plan: ReadPlan, *, verify: bool, partial: str = "read") -> set[str]:
    """Run every read; with ``verify`` also check the CRC of every data file the plan touches
    against the manifest (CheckpointCorruptError names each damaged file). A file the plan
    reads only in part is checksummed on its own, or with ``partial="skip"`` left unchecked
    (a distributed load has another rank check it). Returns the names of the files checked."""
    checked: set[str] = set()
    pool = threads.pool()
    jobs: list[tuple[DataFile, bool, list[Any]]] = []
    for name, reads in sorted(plan.reads.items()):
        data_file = ckpt.files[name]
        reads.sort(key=lambda r: r.begin)
        covered = _tiles(reads, len(data_file.header), data_file.size)
        futures = [
            pool.submit(_read_batch, data_file.file, at, views, verify and covered, data_file.where)
            for at, views in threads.batches([(r.begin, r.dest) for r in reads], read_size(data_file.file))
        ]
        jobs.append((data_file, covered, futures))
    problems = []
    for data_file, covered, futures in jobs:
        results = threads.gather(futures)
        if not verify:
            continue
        if covered:
            crc = crc32(data_file.header)
            for batch_crc, length in results:
                crc = crc32_combine(crc, batch_crc, length)
        elif partial == "skip":
            continue
        else:  # some bytes were not read (a partial load): checksum the file on its own
            crc = file_crc(data_file)
        checked.add(data_file.name)
        expected = ckpt.manifest.files[data_file.name].crc32
        if crc != expected:
            problems.append(
                f"{data_file.where}: checksum {crc:08x} does not match the manifest's {expected:08x}"
            )
    if problems:
        raise CheckpointCorruptError("; ".join(problems), problems=problems)
    for reads in plan.reads.values():
        for r in reads:
            if r.after is not None:
                r.after()
    return checked


def _tiles(reads: list[_Read], start: int, end: int) -> bool:
    position = start
    for r in reads:
        if r.begin != position:
            return False
        position += len(r.dest)
    return position == end


def tensor_kinds(manifest: Manifest, where: str) -> dict[int, Kind]:
    """For each referenced tensor index: how the state uses it (torch or numpy)."""
    if manifest.refs is not None:
        # Manifest.parse walked the state and vouched for every reference (F-14): in range,
        # one kind per index. The same answer as the walk below, without walking again.
        torch_refs, numpy_refs = manifest.refs
        kinds: dict[int, Kind] = dict.fromkeys(torch_refs, "torch")
        if numpy_refs:
            kinds.update(dict.fromkeys(numpy_refs, "numpy"))
        return kinds
    from ckptproto.tree import iter_tensor_refs

    found: dict[int, Kind] = {}
    for path, kind, index in iter_tensor_refs(manifest.state):
        if type(index) is not int or not 0 <= index < len(manifest.tensors):
            raise CheckpointFormatError(
                f"{where}: {path} refers to tensor {show(index)}, which does not exist"
            )
        prior = found.setdefault(index, kind)
        if prior != kind:
            raise CheckpointFormatError(f"{where}: tensor {index} is used as both torch and numpy")
    return found


def plan_into(
    ckpt: OpenCheckpoint, plan: ReadPlan, index: int, spec: ArraySpec, value: Any, dest: memoryview | None
) -> None:
    """Schedule reading tensor ``index`` into ``value`` (whose bytes are ``dest`` when it is a
    contiguous CPU buffer; otherwise chunks are assembled through a byte grid of it)."""
    entry = ckpt.manifest.tensors[index]
    chunks = entry.chunks
    if dest is not None and len(chunks) == 1 and chunks[0].shape == entry.shape and len(dest) == spec.nbytes:
        # The whole tensor in one chunk, read straight into all of ``dest``: the usual tensor.
        plan.add(chunks[0].file, ckpt.locate(entry, chunks[0], index).begin, dest)
        return
    grid: np.ndarray[Any, Any] | None = None
    for chunk in chunks:
        header_entry = ckpt.locate(entry, chunk, index)
        span = _contiguous_span(entry, chunk)
        if dest is not None and span is not None:
            plan.add(chunk.file, header_entry.begin, dest[span[0] : span[1]])
            continue
        if grid is None:
            grid = arrays.byte_grid(value, spec)
        scratch = np.empty(header_entry.end - header_entry.begin, dtype=np.uint8)
        plan.add(
            chunk.file, header_entry.begin, scratch.data.cast("B"), _copy_box(grid, scratch, chunk, spec)
        )


def plan_box_into(
    ckpt: OpenCheckpoint,
    plan: ReadPlan,
    index: int,
    offsets: tuple[int, ...],
    spec: ArraySpec,
    value: Any,
    dest: memoryview,
) -> None:
    """Schedule reading the box of tensor ``index`` at ``offsets`` with ``spec.shape`` (a
    DTensor's local shard) into ``value``, a contiguous CPU tensor whose bytes are ``dest``.
    Only the rows of each chunk that overlap the box are read, straight into ``dest`` when
    chunk and box span the same columns (the usual ``Shard(0)`` case)."""
    entry = ckpt.manifest.tensors[index]
    item = entry.dtype.itemsize
    box_end = tuple(o + s for o, s in zip(offsets, spec.shape, strict=True))
    grid: np.ndarray[Any, Any] | None = None
    for chunk in entry.chunks:
        lo = tuple(max(a, b) for a, b in zip(chunk.offsets, offsets, strict=True))
        hi = tuple(min(a + s, b) for a, s, b in zip(chunk.offsets, chunk.shape, box_end, strict=True))
        if any(h <= low for low, h in zip(lo, hi, strict=True)) or (spec.shape and not chunk.numel):
            continue
        header_entry = ckpt.locate(entry, chunk, index)
        if len(spec.shape) < 2 or (chunk.shape[1:] == spec.shape[1:] and chunk.offsets[1:] == offsets[1:]):
            # 0-d/1-d, or the same columns on both sides: the overlapping rows land as one
            # contiguous range of the local tensor.
            row = item * (chunk.numel // chunk.shape[0]) if spec.shape else item
            skip = lo[0] - chunk.offsets[0] if spec.shape else 0
            at = (lo[0] - offsets[0]) * row if spec.shape else 0
            nbytes = (hi[0] - lo[0]) * row if spec.shape else item
            plan.add(chunk.file, header_entry.begin + skip * row, dest[at : at + nbytes])
            continue
        # Rows [lo0, hi0) of the chunk along dim 0 are one contiguous byte range of it; read
        # them and copy the overlapping columns into place.
        chunk_row = item * (chunk.numel // chunk.shape[0])
        begin = header_entry.begin + (lo[0] - chunk.offsets[0]) * chunk_row
        nrows = hi[0] - lo[0]
        if grid is None:
            grid = arrays.byte_grid(value, spec)
        scratch = np.empty(nrows * chunk_row, dtype=np.uint8)
        plan.add(
            chunk.file,
            begin,
            scratch.data.cast("B"),
            _copy_overlap(grid, scratch, chunk, lo, hi, offsets, item),
        )


def _copy_overlap(
    grid: np.ndarray[Any, Any],
    scratch: np.ndarray[Any, Any],
    chunk: Chunk,
    lo: tuple[int, ...],
    hi: tuple[int, ...],
    offsets: tuple[int, ...],
    item: int,
) -> Callable[[], None]:
    def run() -> None:
        rows = scratch.reshape(hi[0] - lo[0], *chunk.shape[1:-1], chunk.shape[-1] * item)
        src = [slice(None)]
        dst = [slice(lo[0] - offsets[0], hi[0] - offsets[0])]
        for d in range(1, len(lo)):
            a, b = lo[d] - chunk.offsets[d], hi[d] - chunk.offsets[d]
            c, e = lo[d] - offsets[d], hi[d] - offsets[d]
            if d == len(lo) - 1:
                a, b, c, e = a * item, b * item, c * item, e * item
            src.append(slice(a, b))
            dst.append(slice(c, e))
        grid[tuple(dst)] = rows[tuple(src)]

    return run


def _copy_box(
    grid: np.ndarray[Any, Any], scratch: np.ndarray[Any, Any], chunk: Chunk, spec: ArraySpec
) -> Callable[[], None]:
    def run() -> None:
        if not spec.shape:
            grid[...] = scratch
            return
        item = spec.dtype.itemsize
        box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets[:-1], chunk.shape[:-1], strict=True))
        last = slice(chunk.offsets[-1] * item, (chunk.offsets[-1] + chunk.shape[-1]) * item)
        shape = (*chunk.shape[:-1], chunk.shape[-1] * item)
        grid[(*box, last)] = scratch.reshape(shape)

    return run


def _contiguous_span(entry: TensorEntry, chunk: Chunk) -> tuple[int, int] | None:
    """Byte range of ``chunk`` in the row-major global tensor, if it is one contiguous range."""
    shape, offsets, cshape = entry.shape, chunk.offsets, chunk.shape
    if cshape == shape:  # the whole tensor: by far the most common case
        return 0, entry.nbytes
    if chunk.numel == 0:
        return (0, 0)
    # Contiguous iff every dim after the first one longer than 1 is full (a whole tensor is).
    first = next((d for d in range(len(shape)) if cshape[d] != 1), len(shape))
    if any(cshape[d] != shape[d] for d in range(first + 1, len(shape))):
        return None
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    start = sum(o * s for o, s in zip(offsets, strides, strict=True)) * entry.dtype.itemsize
    return start, start + chunk.numel * entry.dtype.itemsize


def materialize(
    ckpt: OpenCheckpoint, kinds: dict[int, Kind], *, use_mmap: bool, verify: bool
) -> dict[int, Any]:
    """Every referenced tensor, read into new memory (or, with ``use_mmap``, mapped from the
    files whose storage gives a descriptor to map; the others are read into memory)."""
    values: dict[int, Any] = {}
    plan = ReadPlan()
    maps: dict[str, mmap_module.mmap] = {}
    # Small tensors in files of a known layout: read in runs, made views of them (bulkread).
    taken = set() if use_mmap else bulkread.plan_small(ckpt, kinds, plan, values).taken
    for index, kind in kinds.items():
        if index in taken:
            continue
        entry = ckpt.manifest.tensors[index]
        spec = ArraySpec(kind, entry.dtype, entry.shape)
        if use_mmap and entry.is_whole():
            chunk = entry.chunks[0]
            header_entry = ckpt.locate(entry, chunk, index)
            data_file = ckpt.files[chunk.file]
            if chunk.file not in maps and data_file.size > 0 and data_file.file.fileno() is not None:
                maps[chunk.file] = map_private(data_file)
            mapped = (
                arrays.from_buffer(spec, maps[chunk.file], header_entry.begin) if chunk.file in maps else None
            )
            if mapped is not None:
                values[index] = mapped
                continue
        value, dest = allocate(spec, ckpt, index)
        values[index] = value
        plan_into(ckpt, plan, index, spec, value, dest)
    execute(ckpt, plan, verify=verify and not use_mmap)
    if use_mmap and verify:
        check_all_files(ckpt)
    return values


# Linux's MAP_NORESERVE (0x4000 on x86-64 and arm64; Python's mmap module lacks the name):
# a private map reserves no commit charge for pages never written, so a checkpoint larger
# than free memory maps (under the default heuristic overcommit, not under strict mode 2).
_MAP_NORESERVE = 0x4000 if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64") else 0


def map_private(data_file: DataFile) -> mmap_module.mmap:
    """A copy-on-write map of a whole data file: pages are read from the file when touched
    and copied only where the caller writes. Until then they show the file: a file changed
    under the map changes the tensors (ckptproto never rewrites a committed file)."""
    fd = data_file.file.fileno()
    if fd is None:
        raise CheckpointError(f"{data_file.where}: its storage cannot be memory-mapped; load with mmap=False")
    try:
        return mmap_module.mmap(
            fd,
            0,
            flags=mmap_module.MAP_PRIVATE | _MAP_NORESERVE,
            prot=mmap_module.PROT_READ | mmap_module.PROT_WRITE,
        )
    except OSError as exc:
        raise CheckpointError(
            f"{data_file.where}: cannot map {data_file.size} bytes ({exc}); load with mmap=False, "
            "or allow overcommit (vm.overcommit_memory != 2)"
        ) from exc


def allocate(spec: ArraySpec, ckpt: OpenCheckpoint, index: int) -> tuple[Any, memoryview]:
    """A new tensor for ``tensors[index]``; what the library refuses is a format error."""
    try:
        return arrays.allocate(spec)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
        raise CheckpointFormatError(
            f"{ckpt.location}: cannot allocate tensors[{index}] {spec}: {exc}"
        ) from exc
