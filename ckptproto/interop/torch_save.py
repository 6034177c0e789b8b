"""``torch.save`` files: read with ``weights_only=True`` only (unless the caller explicitly
trusts the file), written atomically.

::

    state = read(Path("model.pt"))                      # refuses files that need full unpickling
    write(state, Path("out.pt"), overwrite=False)       # torch.load("out.pt") reads it as is

``write`` stores numpy arrays as tensors by default, because ``torch.load``'s default
(``weights_only=True``) refuses numpy arrays; with ``numpy_as_tensors=False`` they stay numpy
arrays and the file is read with ``torch.serialization.safe_globals(numpy_globals())``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from ckptproto.arrays import require_torch
from ckptproto.errors import CheckpointFormatError, CheckpointWriteError, PickleRefusedError
from ckptproto.interop.files import atomic_file
from ckptproto.interop.plain import numpy_to_tensors

ZIP_MAGIC = b"PK\x03\x04"


def numpy_globals() -> list[Any]:
    """What ``weights_only`` must be told to rebuild plain numeric numpy arrays (torch's own
    documented recipe); object arrays still need globals that stay refused::

        with torch.serialization.safe_globals(numpy_globals()):
            state = torch.load("out.pt")   # a file written with numpy_as_tensors=False
    """
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
    refuses, unless ``allow_pickle=True`` (which runs arbitrary code from the file): the objects
    come back as unpickled (``interop.convert`` then makes them plain values)."""
    torch = require_torch()
    with open(path, "rb") as f:
        is_zip = f.read(4) == ZIP_MAGIC
    try:
        with torch.serialization.safe_globals(numpy_globals()):
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
    except (ImportError, AttributeError) as exc:  # full unpickling imports the classes it names
        raise CheckpointFormatError(
            f"{path}: unpickling needs code that is not importable here ({type(exc).__name__}: {exc}); "
            "run from where the training code that saved it is importable (its directory, or "
            "PYTHONPATH=...)"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(
            f"{path}: holds a {type(state).__qualname__}, not a dict; save a state dict (e.g. "
            "model.state_dict()) instead of the object itself"
        )
    return state


def write(
    state: dict[str, Any],
    final: Path,
    *,
    overwrite: bool = False,
    numpy_as_tensors: bool = True,
    notes: list[str] | None = None,
) -> Path:
    """``torch.save(state)`` into a temporary sibling, fsync, rename: all or nothing.

    ``numpy_as_tensors`` (default): numpy arrays are written as tensors (same bytes, dtype and
    shape), so ``torch.load(final)`` with its defaults reads the file; each is noted in
    ``notes``. Otherwise they stay arrays and ``notes`` says what ``torch.load`` needs."""
    torch = require_torch()
    if numpy_as_tensors:
        state, changes = numpy_to_tensors(state)
        if notes is not None:
            notes.extend(changes)
    elif notes is not None and _holds_numpy(state):
        notes.append(
            f"{final} holds numpy arrays: read it with `with torch.serialization.safe_globals("
            "ckptproto.interop.torch_save.numpy_globals()): torch.load(path)`"
        )
    with atomic_file(final, overwrite=overwrite) as temp:
        try:
            torch.save(state, temp)
        except RuntimeError as exc:  # torch reports a file it cannot open as a RuntimeError
            raise CheckpointWriteError(f"writing {final} failed: {exc}") from exc
    return final


def _holds_numpy(value: Any) -> bool:
    import numpy as np

    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, dict):
        return any(_holds_numpy(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_numpy(v) for v in value)
    return False
