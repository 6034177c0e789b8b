"""The alternatives' saves made as durable as ckptproto's (every file and the parent directory
fsynced), shared by the benchmarks so each compares the same durability."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def fsync_tree(path: Path) -> None:
    """fsync every file at or under ``path``, then its parent directory."""
    paths = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for p in [*paths, path.parent]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def torch_save_durable(state: Any, path: Path) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_tree(path)


def safetensors_save_durable(state: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(state, str(path))
    fsync_tree(path)


_DD_BLOCK = 1 << 20


def raw_write_durable(state: dict[str, Any], path: Path) -> None:
    """The floor a durable save is measured against (``dd bs=1M`` + ``fsync``): the same tensor
    bytes written one after another into one file with plain ``write`` calls of at most 1 MiB,
    no header, no checksum, then the file and its directory fsynced. 1 MiB, as ckptproto's
    writer: on Linux 6.x with large page-cache folios, single writes of several MiB into a
    new file were up to ~10x slower once the page cache was full (issue 17), and a floor that
    trips over that would flatter every method measured against it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for tensor in state.values():
            view = memoryview(tensor.detach().contiguous().numpy()).cast("B")
            while view:
                view = view[os.write(fd, view[:_DD_BLOCK]) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_tree(path)


def raw_read(path: Path) -> Any:
    """The floor a full load is measured against: the file's bytes read into one new buffer."""
    size = path.stat().st_size
    buffer = bytearray(size)
    with open(path, "rb", buffering=0) as f:
        got = f.readinto(buffer)
    assert got == size
    return buffer
