"""Converting checkpoints between ckptproto and torch.save, flat safetensors and DCP.

::

    from ckptproto.interop import convert

    convert("model.pt", "checkpoints/model", to="ckptproto")          # torch.save -> ckptproto
    convert("checkpoints/model", "model.safetensors", to="safetensors")
    convert("dcp_dir", "checkpoints/step_100", to="ckptproto")
    convert("s3://bucket/run/step_100", "model.pt", to="torch")          # object stores too

A ckptproto checkpoint may be at an object-store URL on either side (it is read and written
through ``ckptproto.load``/``ckptproto.save``); the other formats are local files only.

The source format is detected from what is at ``src`` (or given as ``source_format``). Tensors
stream: the source is memory-mapped where its format allows (ckptproto, torch.save zip files,
safetensors; DCP is read into memory once) and written straight from those buffers, so a
conversion never holds two copies of the tensors.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO, get_args

from ckptproto.errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError
from ckptproto.format import layout
from ckptproto.format.regular_file import NotRegularFileError, open_regular
from ckptproto.interop import dcp, flat_safetensors, torch_save
from ckptproto.interop.plain import plain_values
from ckptproto.interop.progress import Progress
from ckptproto.io import sync
from ckptproto.location import ObjectLocation
from ckptproto.policy.locations import Location, LocationLike, as_arg, local_only, resolve
from ckptproto.tree import encode_state

Format = Literal["ckptproto", "torch", "safetensors", "dcp"]
FORMATS: tuple[str, ...] = get_args(Format)
PathLike = LocationLike


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert`` did: formats, destination, and the distinct tensors it wrote.
    ``notes``: each value stored in another form than it was read, by state path."""

    source_format: str
    target_format: str
    destination: Location
    tensors: int
    nbytes: int
    notes: tuple[str, ...] = field(default=())


def detect_format(path: LocationLike) -> Format:
    """Which format is at ``path``: a ckptproto directory (``manifest.json``), a DCP directory
    (``.metadata``), a zip or pickle written by ``torch.save``, or a safetensors file (at an
    object-store URL: a ckptproto checkpoint, or CheckpointFormatError)."""
    _storage, p = resolve(path)
    if isinstance(p, ObjectLocation):
        return _object_source_format(p, None)
    if p.is_dir():
        if (p / layout.MANIFEST_NAME).is_file():
            return "ckptproto"
        if dcp.is_dcp_dir(p):
            return "dcp"
        raise CheckpointFormatError(
            f"{p}: a directory with neither {layout.MANIFEST_NAME} (ckptproto) nor .metadata (DCP)"
        )
    if not p.exists():
        raise CheckpointNotFoundError(f"{p} does not exist")
    try:
        fd, _st = open_regular(p)  # a FIFO would block a plain open
    except NotRegularFileError as exc:
        raise CheckpointFormatError(f"{p} is a {exc.kind}, not a checkpoint file") from None
    with os.fdopen(fd, "rb") as f:
        head = f.read(9)
    # safetensors first: its 8-byte header length may itself start with 0x80
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] + 8 <= p.stat().st_size:
        return "safetensors"
    if head[:4] == torch_save.ZIP_MAGIC or head[:1] == b"\x80":
        return "torch"
    raise CheckpointFormatError(
        f"{p}: not a torch.save file (zip or pickle) nor a safetensors file; pass source_format= (--from)"
    )


def _read(src: Location, fmt: str, allow_pickle: bool) -> dict[str, Any]:
    if fmt == "ckptproto":
        return sync.load(as_arg(src), mmap=True, verify=True)
    src = local_only(src, f"reading a {fmt} checkpoint")
    if fmt == "torch":
        return torch_save.read(src, allow_pickle=allow_pickle)
    if fmt == "safetensors":
        return flat_safetensors.read(src)
    return dcp.read(src, allow_pickle=allow_pickle)


def _ckptproto_write(state: dict[str, Any], dst: Location, *, overwrite: bool) -> Location:
    sync.save(state, as_arg(dst), overwrite=overwrite)
    return dst


def _object_source_format(src: ObjectLocation, source_format: Format | None) -> Format:
    """The format at an object-store ``src``: only a ckptproto checkpoint is read from there."""
    storage, _ = resolve(src)
    if source_format not in (None, "ckptproto"):
        raise CheckpointError(
            f"{src}: a {source_format} checkpoint is converted from a local file, not a "
            f"{src.scheme}:// URL; download it first"
        )
    if storage.is_committed(src):
        return "ckptproto"
    if not storage.exists(src):
        raise CheckpointNotFoundError(f"{src} does not exist")
    raise CheckpointFormatError(
        f"{src} is not a ckptproto checkpoint (no {layout.MANIFEST_NAME}); other formats are "
        "converted from local files: download it first"
    )


_WRITERS: dict[str, Callable[..., Location]] = {
    "ckptproto": _ckptproto_write,
    "torch": torch_save.write,
    "safetensors": flat_safetensors.write,
    "dcp": dcp.write,
}


def convert(
    src: LocationLike,
    dst: LocationLike,
    *,
    to: Format,
    source_format: Format | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    progress_stream: TextIO | None = None,
    keep_numpy: bool = False,
) -> ConversionResult:
    """Convert the checkpoint at ``src`` into format ``to`` at ``dst``. A ckptproto checkpoint
    may be at an object-store URL (``s3://bucket/run/step_10``), either side; torch.save,
    safetensors and DCP are local files (a URL for them raises CheckpointError).

    ``allow_pickle=True`` lets torch.save files (and DCP values) be fully unpickled: only for
    files you trust, since unpickling can run arbitrary code. ``progress``: draw a progress
    line on stderr (default: only when stderr is a terminal). The destination appears
    atomically; an existing one is replaced only with ``overwrite=True``.

    With ``allow_pickle``, unpickled objects the format has no type for but a plain
    equivalent (``argparse.Namespace`` -> dict, ``torch.Size`` -> tuple, ...; see
    ``interop.plain.plain_values``) are stored as that, each listed in the result's ``notes``.
    ``to="torch"`` writes numpy arrays as tensors, so ``torch.load`` reads the file with its
    defaults (``weights_only=True``); ``keep_numpy=True`` keeps them numpy arrays.
    """
    if to not in FORMATS:
        raise ValueError(f"to must be one of {', '.join(FORMATS)}, got {to!r}")
    _src_storage, src_path = resolve(src)
    _dst_storage, dst_path = resolve(dst)
    if isinstance(dst_path, Path):
        dst_path = dst_path.absolute()
    elif to != "ckptproto":
        local_only(dst_path, f"writing a {to} checkpoint")
    if isinstance(src_path, ObjectLocation):
        fmt = _object_source_format(src_path, source_format)
    else:
        fmt = source_format or detect_format(src_path)
    if fmt not in FORMATS:
        raise ValueError(f"source_format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if (src_path.absolute() if isinstance(src_path, Path) else src_path) == dst_path:
        raise CheckpointFormatError(f"{dst_path}: source and destination are the same path")
    state = _read(src_path, fmt, allow_pickle)
    notes: list[str] = []
    if allow_pickle:
        state, notes = plain_values(state)
    encoded = encode_state(state)  # checks every value before anything is written
    nbytes, count = encoded.nbytes, len(encoded.tensors)
    del encoded
    prefix = f".{dst_path.name}{layout.TEMP_MARKER}"

    def in_flight() -> list[Path]:
        if not isinstance(dst_path, Path):
            return []  # an object store's upload is not watched: the bar jumps when it ends
        try:
            return [p for p in dst_path.parent.iterdir() if p.name.startswith(prefix)]
        except OSError:
            return []

    bar = Progress(nbytes, f"{fmt} -> {to}", watch=in_flight, stream=progress_stream, enabled=progress)
    options: dict[str, Any] = {"numpy_as_tensors": not keep_numpy, "notes": notes} if to == "torch" else {}
    with bar:
        _WRITERS[to](state, dst_path, overwrite=overwrite, **options)
    return ConversionResult(fmt, to, dst_path, count, nbytes, tuple(notes))
