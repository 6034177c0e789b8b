"""Reading checkpoints: every byte range is validated against the manifest and the data file
headers before a tensor is allocated or a byte is read into it (the safetensors discipline).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
)
from ckptproto.format import layout, safetensors
from ckptproto.format.crc import crc32, crc32_combine
from ckptproto.format.manifest import MAX_MANIFEST_BYTES, Chunk, Manifest, TensorEntry
from ckptproto.io import threads
from ckptproto.io.backends import resolve
from ckptproto.io.headercheck import FileLayout, expected_header, file_layouts
from ckptproto.io.storage import Generation, Storage, StoredFile, read_bytes
from ckptproto.location import Location


def read_manifest(
    path: str | os.PathLike[str] | Location, *, generation: Generation | None = None
) -> Manifest:
    """Read and validate the manifest of the checkpoint at ``path`` (from ``generation``, a
    pinned generation of it, when given; else through the storage backend of ``path``)::

    manifest = ckptproto.read_manifest("ckpt/step_100")
    print(manifest.files, len(manifest.tensors))
    """
    if generation is not None:
        return _parse_manifest(generation)
    storage, location = resolve(path)
    with storage.open(location) as pinned:
        return _parse_manifest(pinned)


def _parse_manifest(generation: Generation) -> Manifest:
    where = f"{generation.location}/{layout.MANIFEST_NAME}"
    data = generation.read_manifest()
    # Backends refuse an oversized manifest before reading it; this bounds what any one returns.
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointFormatError(f"{where} is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    return Manifest.parse(data, where)


@dataclass
class DataFile:
    """An open, header-validated data file; ``where`` names it in messages."""

    name: str
    where: str
    file: StoredFile
    size: int
    header: bytes  # the length prefix and JSON, for the file checksum
    entries: dict[str, safetensors.HeaderEntry]
    # Set when the header is the one ckptproto's writer makes from the manifest (checked by
    # regenerating it: io/headercheck.py); ``entries`` is then built only if asked for.
    layout: FileLayout | None = None

    def entry(self, key: str) -> safetensors.HeaderEntry | None:
        """The header's entry for ``key``, if it has one."""
        if self.layout is not None and not self.entries:
            self.entries = self.layout.header_entries(len(self.header))
        return self.entries.get(key)


_GENERATION_ATTEMPTS = 8  # re-opens after the checkpoint was replaced while being opened


class OpenCheckpoint:
    """One generation of a checkpoint, pinned (``Storage.open``): the manifest and every data
    file are those of one committed save, then validated::

        with OpenCheckpoint("ckpt/step_100") as ckpt:
            print(ckpt.manifest.files)

    A save with ``overwrite=True`` swaps a new generation in at the same location, and
    retention deletes one; neither can mix generations here (FORMAT.md F-38). If the
    checkpoint is replaced before every file was opened (a file of the old one already
    deleted), it is opened again, whole; if it is gone, CheckpointNotFoundError says so.
    ``problems``: a list to collect per-file errors into (``verify``) instead of raising the
    first one.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | Location,
        manifest: Manifest | None = None,
        *,
        problems: list[CheckpointError] | None = None,
    ) -> None:
        self.storage: Storage
        self.storage, self.location = resolve(path)
        self.files: dict[str, DataFile] = {}
        self._located: dict[tuple[str, str], safetensors.HeaderEntry] = {}
        self._generation: Generation | None = None
        self.layouts: dict[str, FileLayout] = {}
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

    def where(self, name: str) -> str:
        """``location/name``, for messages (a path or a URL alike)."""
        return f"{self.location}/{name}"

    @property
    def generation(self) -> Generation:
        if self._generation is None:
            raise CheckpointError(f"{self.location}: the checkpoint is closed")
        return self._generation

    def _open_generation(
        self,
        manifest: Manifest | None,
        problems: list[CheckpointError] | None,
    ) -> None:
        self._generation = self.storage.open(self.location)
        self.manifest = (
            manifest if manifest is not None else read_manifest(self.location, generation=self._generation)
        )
        self.layouts = file_layouts(self.manifest)
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
        """After a failure to open: True if another generation now stands at the location (an
        overwrite swapped it in: open that one); CheckpointNotFoundError if none does (deleted,
        e.g. by retention); False if the pinned one is still the checkpoint there."""
        if self._generation is None:
            return False
        moved = self._generation.replaced()
        return moved and manifest is None and attempt + 1 < _GENERATION_ATTEMPTS

    def damage(self) -> list[str]:
        """Every listed data file that is missing, of another size or fails its checksum:
        a file damaged after writing explains whatever else looks wrong with it."""
        problems = []
        for name, entry in self.manifest.files.items():
            where = self.where(name)
            try:
                file = self.generation.open_file(name)
            except CheckpointCorruptError as exc:  # missing
                problems.extend(exc.problems)
                continue
            except CheckpointError:
                continue  # not a regular file: a format problem, reported as such
            try:
                if file.size != entry.size:
                    problems.append(f"{where}: {file.size} bytes on disk, the manifest says {entry.size}")
                elif (crc := file_crc(DataFile(name, where, file, file.size, b"", {}))) != entry.crc32:
                    problems.append(
                        f"{where}: checksum {crc:08x} does not match the manifest's {entry.crc32:08x}"
                    )
            finally:
                file.close()
        return problems

    def _open(self, name: str, expected_size: int) -> DataFile:
        where = self.where(name)
        file = self.generation.open_file(name)
        try:
            if file.size != expected_size:
                raise CheckpointCorruptError(
                    f"{where}: {file.size} bytes on disk, the manifest says {expected_size} "
                    "(truncated or replaced)"
                )
            layout = self.layouts.get(name)
            expected = expected_header(layout, file.size) if layout is not None else None
            if (
                layout is not None
                and expected is not None
                and len(expected) + layout.buffer_size == file.size
            ):
                head = read_bytes(file, len(expected), 0)
                if head == expected:  # as the writer made it: every header check passes (headercheck)
                    return DataFile(name, where, file, file.size, head, {}, layout)
            prefix = read_bytes(file, 8, 0)
            n = safetensors.header_length(prefix, file.size, where)
            raw = read_bytes(file, n, 8)
            entries = safetensors.parse_header(raw, file.size, where)
            return DataFile(name, where, file, file.size, prefix + raw, entries)
        except BaseException:
            file.close()
            raise

    def check_chunks(self) -> None:
        """Every chunk names a distinct, existing data file entry of the right dtype/shape."""
        files = self.files
        if len(files) == len(self.manifest.files) and all(f.layout is not None for f in files.values()):
            # Every data file's header is the one regenerated from the manifest's own chunks:
            # each chunk is in it with its dtype's code and its shape (io/headercheck.py).
            return
        located = self._located  # empty here: it holds exactly the chunks located so far
        locate = self.locate
        for index, tensor in enumerate(self.manifest.tensors):
            for chunk in tensor.chunks:
                if (chunk.file, chunk.key) in located:
                    raise CheckpointFormatError(
                        f"{self.where(chunk.file)}: tensor {chunk.key!r} is claimed by two chunks"
                    )
                locate(tensor, chunk, index)

    def locate(self, tensor: TensorEntry, chunk: Chunk, index: int) -> safetensors.HeaderEntry:
        """The data file entry holding ``chunk``, checked against the manifest's dtype/shape."""
        pair = (chunk.file, chunk.key)
        found = self._located.get(pair)
        if found is not None:
            return found
        data_file = self.files[chunk.file]
        entry = data_file.entry(chunk.key)
        code = tensor.dtype.safetensors
        if entry is not None and code is not None and entry.code == code and entry.shape == chunk.shape:
            self._located[pair] = entry  # the usual chunk: no message text built
            return entry
        where = f"{data_file.where}: tensor {chunk.key!r} (tensors[{index}])"
        if entry is None:
            raise CheckpointFormatError(f"{where} is missing from the data file")
        want_code = code or safetensors.RAW_CODE
        want_shape = chunk.shape if code else (chunk.numel * tensor.dtype.itemsize,)
        if entry.code != want_code or entry.shape != want_shape:
            raise CheckpointFormatError(
                f"{where} is stored as {entry.code}{list(entry.shape)}, the manifest needs "
                f"{want_code}{list(want_shape)} for {tensor.dtype.name}{list(chunk.shape)}"
            )
        self._located[pair] = entry
        return entry

    def close(self) -> None:
        for f in self.files.values():
            f.file.close()
        self.files.clear()
        self._located.clear()
        if self._generation is not None:
            self._generation.close()
            self._generation = None

    def __enter__(self) -> OpenCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _crc_block(file: StoredFile, offset: int, length: int, name: str) -> int:
    buf = bytearray(length)
    got = file.read_into(offset, [memoryview(buf)])
    if got != length:
        raise CheckpointCorruptError(f"{name}: file ended at byte {offset + got}")
    return crc32(buf)


# A file with a descriptor is read with syscalls from the page cache: small reads keep each
# piece in the core's cache from its read to its CRC and spread the work evenly over the pool
# (512 MiB in 64 tensors, verified load: 16 MiB reads 0.244 s, 2 MiB 0.206 s; torch's loader
# 0.275 s on the same run). Other backends (object stores: one request per read) keep the
# large batches their reads want.
LOCAL_READ_BYTES = 2 << 20


def read_size(file: StoredFile) -> int:
    """How many bytes one pool task reads of ``file`` at most."""
    return LOCAL_READ_BYTES if file.fileno() is not None else threads.BATCH_BYTES


def file_crc(data_file: DataFile) -> int:
    """CRC of a whole data file, read in blocks by the pool (a few blocks in memory at once)."""
    start = len(data_file.header)
    step = read_size(data_file.file)
    blocks = [(at, min(step, data_file.size - at)) for at in range(start, data_file.size, step)]
    pool = threads.pool()
    futures = [pool.submit(_crc_block, data_file.file, at, n, data_file.where) for at, n in blocks]
    crc = crc32(data_file.header)
    for (_, n), block_crc in zip(blocks, threads.gather(futures), strict=True):
        crc = crc32_combine(crc, block_crc, n)
    return crc


def check_file(ckpt: OpenCheckpoint, name: str, data_file: DataFile) -> None:
    """Compare one data file's CRC with the manifest (CheckpointCorruptError naming it)."""
    crc = file_crc(data_file)
    expected = ckpt.manifest.files[name].crc32
    if crc != expected:
        raise CheckpointCorruptError(
            f"{data_file.where}: checksum {crc:08x} does not match the manifest's {expected:08x}"
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
