"""Reading checkpoints: every byte range is validated against the manifest and the data file
headers before a tensor is allocated or a byte is read into it (the safetensors discipline).
"""

from __future__ import annotations

import mmap as mmap_module
import os
import platform
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ckptproto import arrays
from ckptproto.arrays import ArraySpec, Kind
from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
)
from ckptproto.format import layout, safetensors
from ckptproto.format.crc import crc32_combine
from ckptproto.format.manifest import MAX_MANIFEST_BYTES, Chunk, Manifest, TensorEntry, show
from ckptproto.format.regular_file import NotRegularFileError, open_regular
from ckptproto.io import threads


def _read_exact(fd: int, n: int, offset: int) -> bytes:
    buf = bytearray(n)
    got = threads.preadv_all(fd, [memoryview(buf)], offset)
    return bytes(buf[:got])


def read_manifest(path: str | os.PathLike[str], *, dir_fd: int | None = None) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``path`` (with ``dir_fd``, an open
    descriptor of that directory, the manifest is read relative to it)::

    manifest = ckptproto.read_manifest("ckpt/step_100")
    print(manifest.files, len(manifest.tensors))
    """
    root = Path(path)
    where = root / layout.MANIFEST_NAME
    # F-2 names the directory itself: a symbolic link to a hidden temporary directory is
    # refused, a link with a hidden name to a checkpoint is read (validate agrees).
    if layout.is_hidden(os.path.basename(os.path.realpath(root))):
        raise CheckpointNotFoundError(f"{root} is a hidden (temporary) directory, never a checkpoint")
    try:
        if dir_fd is None:
            fd, st = open_regular(where)
        else:
            fd, st = open_regular(layout.MANIFEST_NAME, dir_fd=dir_fd)
    except FileNotFoundError:
        hint = "no such directory" if not root.exists() else "no committed manifest"
        raise CheckpointNotFoundError(f"{root} is not a checkpoint ({hint})") from None
    except NotRegularFileError as exc:  # F-1: a directory, FIFO, link... is no manifest
        raise CheckpointNotFoundError(
            f"{root} is not a checkpoint: {layout.MANIFEST_NAME} is a {exc.kind}, not a regular file"
        ) from None
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot open {where}: {exc}") from exc
    try:
        if st.st_size > MAX_MANIFEST_BYTES:
            raise CheckpointFormatError(f"{where} is {st.st_size} bytes, over the {MAX_MANIFEST_BYTES} limit")
        data = _read_exact(fd, st.st_size, 0)
    finally:
        os.close(fd)
    return Manifest.parse(data, str(where))


@dataclass
class DataFile:
    """An open, header-validated data file."""

    name: str
    path: Path
    fd: int
    size: int
    header: bytes  # the length prefix and JSON, for the file checksum
    entries: dict[str, safetensors.HeaderEntry]


_GENERATION_ATTEMPTS = 8  # re-opens after the directory was replaced while being opened


def _open_dir(root: Path) -> int:
    try:
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{root} is not a checkpoint (no such directory)") from None
    except NotADirectoryError:
        raise CheckpointNotFoundError(f"{root} is not a checkpoint (not a directory)") from None
    except OSError as exc:
        raise CheckpointNotFoundError(f"cannot open {root}: {exc}") from exc


class OpenCheckpoint:
    """One generation of a checkpoint, pinned: the directory is opened once and the manifest
    and every data file are opened relative to that descriptor, then validated::

        with OpenCheckpoint("ckpt/step_100") as ckpt:
            print(ckpt.manifest.files)

    A save with ``overwrite=True`` swaps a new directory in at the same path, and retention
    renames a checkpoint away and deletes it; neither can mix generations here (open files
    stay readable after they are unlinked). If the directory is replaced before every file was
    opened (a file of the old one already deleted), it is opened again, whole; if it is gone,
    CheckpointNotFoundError says so. ``problems``: a list to collect per-file errors into
    (``verify``) instead of raising the first one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        manifest: Manifest | None = None,
        *,
        problems: list[CheckpointError] | None = None,
    ) -> None:
        self.path = Path(path)
        self.files: dict[str, DataFile] = {}
        self._located: dict[tuple[str, str], safetensors.HeaderEntry] = {}
        self._dir_fd = -1
        for attempt in range(_GENERATION_ATTEMPTS):
            found: list[CheckpointError] = []
            try:
                self._open_generation(manifest, found if problems is not None else None)
                retry = bool(found) and self._replaced(manifest, attempt)
            except CheckpointError:
                try:
                    retry = self._replaced(manifest, attempt)
                except BaseException:
                    self.close()
                    raise
                if not retry:
                    self.close()
                    raise
            except BaseException:
                self.close()
                raise
            if not retry:
                if problems is not None:
                    problems.extend(found)
                return
            self.close()

    def _open_generation(
        self,
        manifest: Manifest | None,
        problems: list[CheckpointError] | None,
    ) -> None:
        self._dir_fd = _open_dir(self.path)
        self.manifest = manifest if manifest is not None else read_manifest(self.path, dir_fd=self._dir_fd)
        try:
            for name, entry in self.manifest.files.items():
                try:
                    self.files[name] = self._open(name, entry.size)
                except CheckpointError as exc:
                    if problems is None:
                        raise
                    problems.append(exc)
            if problems is None:
                self.check_chunks()
        except CheckpointCorruptError:
            raise
        except CheckpointFormatError as exc:
            damage = self.damage()  # FORMAT.md §9: damage is reported before format problems
            if damage:
                raise CheckpointCorruptError(
                    "; ".join(damage) + f" (and so: {exc})", problems=damage
                ) from exc
            raise

    def _replaced(self, manifest: Manifest | None, attempt: int) -> bool:
        """After a failure to open: True if another directory now stands at the path (an
        overwrite swapped it in: open that one); CheckpointNotFoundError if none does (deleted,
        e.g. by retention); False if the pinned directory is still the checkpoint there."""
        if self._dir_fd < 0:
            return False
        pinned = os.fstat(self._dir_fd)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{self.path} was deleted while it was being read (retention, or another process); "
                "it is no longer a checkpoint"
            ) from None
        moved = (now.st_dev, now.st_ino) != (pinned.st_dev, pinned.st_ino)
        return moved and manifest is None and attempt + 1 < _GENERATION_ATTEMPTS

    def damage(self) -> list[str]:
        """Every listed data file that is missing, of another size or fails its checksum:
        a file damaged after writing explains whatever else looks wrong with it."""
        problems = []
        for name, entry in self.manifest.files.items():
            path = self.path / name
            try:
                fd, st = open_regular(name, dir_fd=self._dir_fd)
            except FileNotFoundError:
                problems.append(f"{path}: data file listed in the manifest is missing")
                continue
            except OSError:
                continue  # not a regular file: a format problem, reported as such
            try:
                if st.st_size != entry.size:
                    problems.append(f"{path}: {st.st_size} bytes on disk, the manifest says {entry.size}")
                elif (crc := file_crc(DataFile(name, path, fd, st.st_size, b"", {}))) != entry.crc32:
                    problems.append(
                        f"{path}: checksum {crc:08x} does not match the manifest's {entry.crc32:08x}"
                    )
            finally:
                os.close(fd)
        return problems

    def _open(self, name: str, expected_size: int) -> DataFile:
        path = self.path / name
        try:
            fd, st = open_regular(name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            raise CheckpointCorruptError(f"{path}: data file listed in the manifest is missing") from None
        except NotRegularFileError as exc:  # F-4: nothing outside the directory is read
            raise CheckpointFormatError(f"{path}: data file is a {exc.kind}, not a regular file") from None
        except OSError as exc:
            raise CheckpointFormatError(f"{path}: cannot open data file safely ({exc})") from exc
        try:
            if st.st_size != expected_size:
                raise CheckpointCorruptError(
                    f"{path}: {st.st_size} bytes on disk, the manifest says {expected_size} "
                    "(truncated or replaced)"
                )
            prefix = _read_exact(fd, 8, 0)
            n = safetensors.header_length(prefix, st.st_size, str(path))
            raw = _read_exact(fd, n, 8)
            entries = safetensors.parse_header(raw, st.st_size, str(path))
            return DataFile(name, path, fd, st.st_size, prefix + raw, entries)
        except BaseException:
            os.close(fd)
            raise

    def check_chunks(self) -> None:
        """Every chunk names a distinct, existing data file entry of the right dtype/shape."""
        used: set[tuple[str, str]] = set()
        for index, tensor in enumerate(self.manifest.tensors):
            for chunk in tensor.chunks:
                if (chunk.file, chunk.key) in used:
                    raise CheckpointFormatError(
                        f"{self.path / chunk.file}: tensor {chunk.key!r} is claimed by two chunks"
                    )
                used.add((chunk.file, chunk.key))
                self.locate(tensor, chunk, index)

    def locate(self, tensor: TensorEntry, chunk: Chunk, index: int) -> safetensors.HeaderEntry:
        """The data file entry holding ``chunk``, checked against the manifest's dtype/shape."""
        found = self._located.get((chunk.file, chunk.key))
        if found is not None:
            return found
        data_file = self.files[chunk.file]
        entry = data_file.entries.get(chunk.key)
        where = f"{data_file.path}: tensor {chunk.key!r} (tensors[{index}])"
        if entry is None:
            raise CheckpointFormatError(f"{where} is missing from the data file")
        code = tensor.dtype.safetensors
        want_code = code or safetensors.RAW_CODE
        want_shape = chunk.shape if code else (chunk.numel * tensor.dtype.itemsize,)
        if entry.code != want_code or entry.shape != want_shape:
            raise CheckpointFormatError(
                f"{where} is stored as {entry.code}{list(entry.shape)}, the manifest needs "
                f"{want_code}{list(want_shape)} for {tensor.dtype.name}{list(chunk.shape)}"
            )
        self._located[(chunk.file, chunk.key)] = entry
        return entry

    def close(self) -> None:
        for f in self.files.values():
            os.close(f.fd)
        self.files.clear()
        self._located.clear()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


def _read_batch(fd: int, offset: int, views: list[memoryview], with_crc: bool, name: Path) -> tuple[int, int]:
    want = sum(len(v) for v in views)
    got = threads.preadv_all(fd, views, offset)
    if got != want:
        raise CheckpointCorruptError(
            f"{name}: file ended at byte {offset + got}, expected data up to {offset + want}"
        )
    crc = 0
    if with_crc:
        for view in views:
            crc = zlib.crc32(view, crc)
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
            pool.submit(_read_batch, data_file.fd, at, views, verify and covered, data_file.path)
            for at, views in threads.batches([(r.begin, r.dest) for r in reads])
        ]
        jobs.append((data_file, covered, futures))
    problems = []
    for data_file, covered, futures in jobs:
        results = threads.gather(futures)
        if not verify:
            continue
        if covered:
            crc = zlib.crc32(data_file.header)
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
                f"{data_file.path}: checksum {crc:08x} does not match the manifest's {expected:08x}"
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


def _crc_block(fd: int, offset: int, length: int, name: Path) -> int:
    buf = bytearray(length)
    got = threads.preadv_all(fd, [memoryview(buf)], offset)
    if got != length:
        raise CheckpointCorruptError(f"{name}: file ended at byte {offset + got}")
    return zlib.crc32(buf)


def file_crc(data_file: DataFile) -> int:
    """CRC of a whole data file, read in blocks by the pool (a few blocks in memory at once)."""
    start = len(data_file.header)
    blocks = [
        (at, min(threads.BATCH_BYTES, data_file.size - at))
        for at in range(start, data_file.size, threads.BATCH_BYTES)
    ]
    pool = threads.pool()
    futures = [pool.submit(_crc_block, data_file.fd, at, n, data_file.path) for at, n in blocks]
    crc = zlib.crc32(data_file.header)
    for (_, n), block_crc in zip(blocks, threads.gather(futures), strict=True):
        crc = crc32_combine(crc, block_crc, n)
    return crc


def tensor_kinds(manifest: Manifest, where: str) -> dict[int, tuple[Kind, list[str]]]:
    """For each referenced tensor index: how the state uses it (torch/numpy) and its paths."""
    from ckptproto.tree import iter_tensor_refs

    found: dict[int, tuple[Kind, list[str]]] = {}
    for path, kind, index in iter_tensor_refs(manifest.state):
        if type(index) is not int or not 0 <= index < len(manifest.tensors):
            raise CheckpointFormatError(
                f"{where}: {path} refers to tensor {show(index)}, which does not exist"
            )
        prior = found.get(index)
        if prior is None:
            found[index] = (kind, [path])
        elif prior[0] != kind:
            raise CheckpointFormatError(f"{where}: tensor {index} is used as both torch and numpy")
        else:
            prior[1].append(path)
    return found


def plan_into(
    ckpt: OpenCheckpoint, plan: ReadPlan, index: int, spec: ArraySpec, value: Any, dest: memoryview | None
) -> None:
    """Schedule reading tensor ``index`` into ``value`` (whose bytes are ``dest`` when it is a
    contiguous CPU buffer; otherwise chunks are assembled through a byte grid of it)."""
    entry = ckpt.manifest.tensors[index]
    grid: np.ndarray[Any, Any] | None = None
    for chunk in entry.chunks:
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
    ckpt: OpenCheckpoint, kinds: dict[int, tuple[Kind, list[str]]], *, use_mmap: bool, verify: bool
) -> dict[int, Any]:
    """Every referenced tensor, read into new memory (or mapped from the files with ``use_mmap``)."""
    values: dict[int, Any] = {}
    plan = ReadPlan()
    maps: dict[str, mmap_module.mmap] = {}
    for index, (kind, _paths) in kinds.items():
        entry = ckpt.manifest.tensors[index]
        spec = ArraySpec(kind, entry.dtype, entry.shape)
        if use_mmap and entry.is_whole():
            chunk = entry.chunks[0]
            header_entry = ckpt.locate(entry, chunk, index)
            if chunk.file not in maps and ckpt.files[chunk.file].size > 0:
                maps[chunk.file] = map_private(ckpt.files[chunk.file])
            mapped = arrays.from_buffer(spec, maps[chunk.file], header_entry.begin)
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
    try:
        return mmap_module.mmap(
            data_file.fd,
            0,
            flags=mmap_module.MAP_PRIVATE | _MAP_NORESERVE,
            prot=mmap_module.PROT_READ | mmap_module.PROT_WRITE,
        )
    except OSError as exc:
        raise CheckpointError(
            f"{data_file.path}: cannot map {data_file.size} bytes ({exc}); load with mmap=False, "
            "or allow overcommit (vm.overcommit_memory != 2)"
        ) from exc


def check_file(ckpt: OpenCheckpoint, name: str, data_file: DataFile) -> None:
    """Compare one data file's CRC with the manifest (CheckpointCorruptError naming it)."""
    crc = file_crc(data_file)
    expected = ckpt.manifest.files[name].crc32
    if crc != expected:
        raise CheckpointCorruptError(
            f"{data_file.path}: checksum {crc:08x} does not match the manifest's {expected:08x}"
        )


def check_all_files(ckpt: OpenCheckpoint) -> None:
    """Compare every data file's CRC with the manifest; raises listing every damaged file."""
    problems = []
    for name, data_file in ckpt.files.items():
        try:
            check_file(ckpt, name, data_file)
        except CheckpointCorruptError as exc:
            problems.extend(exc.problems)
    if problems:
        raise CheckpointCorruptError("; ".join(problems), problems=problems)


def allocate(spec: ArraySpec, ckpt: OpenCheckpoint, index: int) -> tuple[Any, memoryview]:
    """A new tensor for ``tensors[index]``; what the library refuses is a format error."""
    try:
        return arrays.allocate(spec)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, TypeError, MemoryError) as exc:
        raise CheckpointFormatError(f"{ckpt.path}: cannot allocate tensors[{index}] {spec}: {exc}") from exc
