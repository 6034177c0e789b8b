"""``torch.save`` files: read with ``weights_only=True`` only (unless the caller explicitly
trusts the file), written atomically.

::

    state = read(Path("model.pt"))                      # refuses files that need full unpickling
    write(state, Path("out.pt"), overwrite=False)
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ckptproto.arrays import require_torch
from ckptproto.errors import CheckpointFormatError, PickleRefusedError
from ckptproto.interop.files import atomic_file

ZIP_MAGIC = b"PK\x03\x04"


def _numpy_globals() -> list[Any]:
    """What ``weights_only`` must be told to rebuild plain numeric numpy arrays (torch's own
    documented recipe); object arrays still need globals that stay refused."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    dtype_classes = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]
    return [_reconstruct, np.ndarray, np.dtype, *dtype_classes]


def read(path: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Load a ``torch.save`` file on the CPU, memory-mapped when the file allows it (zip
    format), so tensors are read from disk only as the writer consumes them.

    Raises PickleRefusedError when the file holds anything ``torch.load(weights_only=True)``
    refuses, unless ``allow_pickle=True`` (which runs arbitrary code from the file)."""
    torch = require_torch()
    with open(path, "rb") as f:
        is_zip = f.read(4) == ZIP_MAGIC
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            state = torch.load(path, map_location="cpu", weights_only=not allow_pickle, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if allow_pickle:
            raise CheckpointFormatError(f"{path}: cannot unpickle: {exc}") from None
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line), "")
        raise PickleRefusedError(
            f"{path}: this torch.save file needs full unpickling, which can run arbitrary code "
            f"(torch.load(weights_only=True) refused it{': ' + detail.strip() if detail else ''}). "
            "If you trust the file, pass allow_pickle=True (--unsafe-allow-pickle)."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointFormatError(f"{path}: not a readable torch.save file: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(
            f"{path}: holds a {type(state).__qualname__}, not a dict; save a state dict (e.g. "
            "model.state_dict()) instead of the object itself"
        )
    return state


def write(state: dict[str, Any], final: Path, *, overwrite: bool = False) -> Path:
    """``torch.save(state)`` into a temporary sibling, fsync, rename: all or nothing."""
    torch = require_torch()
    with atomic_file(final, overwrite=overwrite) as temp:
        torch.save(state, temp)
    return final
