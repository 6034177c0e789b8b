"""Writing a single output file atomically: a hidden temporary sibling, fsync, rename."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from ckptproto.errors import CheckpointError, CheckpointExistsError, CheckpointWriteError
from ckptproto.format import layout
from ckptproto.io import commit


def check_destination(final: Path, *, overwrite: bool) -> None:
    """Refuse to replace an existing path unless asked; never replace a directory by a file."""
    if final.is_dir():
        raise CheckpointExistsError(f"{final} is a directory; pass a file path for this format")
    if final.exists() and not overwrite:
        raise CheckpointExistsError(
            f"{final} already exists; pass overwrite=True (--overwrite) to replace it"
        )


@contextlib.contextmanager
def atomic_file(final: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; when the block succeeds the file is fsynced
    and renamed to ``final``, otherwise removed. Readers never see a half-written file::

        with atomic_file(Path("model.safetensors"), overwrite=False) as tmp:
            write_to(tmp)
    """
    final = final.absolute()
    check_destination(final, overwrite=overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / layout.temp_name(final.name)
    try:
        yield temp
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        check_destination(final, overwrite=overwrite)
        commit.place_file(temp, final, overwrite=overwrite)  # no-replace unless overwrite
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointWriteError(f"writing {final} failed: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
