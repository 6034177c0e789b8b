"""Reading checkpoints: every byte range is validated against the manifest and the data file
headers before a tensor is allocated or a byte is read into it (the safetensors discipline).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointNotFoundError,
)
from ckptproto.format import layout, safetensors
from ckptproto.format.crc import crc32_combine
from ckptproto.format.manifest import MAX_MANIFEST_BYTES, Chunk, Manifest, TensorEntry
from ckptproto.format.regular_file import NotRegularFileError, open_regular
from ckptproto.io import threads
from ckptproto.location import Location, ObjectLocation


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
        path: str | os.PathLike[str] | Location,
        manifest: Manifest | None = None,
        *,
        problems: list[CheckpointError] | None = None,
    ) -> None:
        if isinstance(path, ObjectLocation):
            raise CheckpointError(f"{path}: reading from object stores is not wired yet")
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
