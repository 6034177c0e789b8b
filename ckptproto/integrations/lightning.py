"""A PyTorch Lightning ``CheckpointIO`` plugin that writes ckptproto checkpoints::

    from ckptproto.integrations.lightning import CkptprotoCheckpointIO

    trainer = lightning.Trainer(plugins=[CkptprotoCheckpointIO()])      # or async_save=True

Every checkpoint Lightning saves (``ModelCheckpoint``, ``trainer.save_checkpoint``) becomes a
ckptproto checkpoint directory at the path Lightning chose (``epoch=0-step=10.ckpt`` and
``last.ckpt`` are directories): committed atomically, checksummed and verified on load, and
free of pickle, with ckptproto's canonical ``trainer`` section (``global_step``,
``current_epoch``) added beside Lightning's own keys so ckptproto's tools see the step (it is
removed again on load). Resuming (``ckpt_path="last"``, ``"best"`` or a path) and top-k deletion work
as with Lightning's own format. A path may be an object-store URL (``s3://bucket/run/last.ckpt``):
the plugin saves, loads and removes checkpoints there through ckptproto's storage backends.

Lightning's checkpoint dict is mostly legal ckptproto state (tensors, ints, strings, lists of
optimizer and scheduler state dicts). The values that are not — found in ``hyper_parameters``
and wherever a user puts them — are handled explicitly, never dropped and never pickled by
default: a small set of known types is stored as a marked plain dict
(``{"__ckptproto_type__": name, "value": ...}``) and rebuilt on load:

* ``AttributeDict`` (Lightning's) and ``argparse.Namespace`` -> their items;
* ``pathlib`` paths -> their string; ``set``/``frozenset`` -> a list;
* ``torch.dtype`` / ``torch.device`` -> their name; numpy scalars -> a 0-d array;
* a real dict that happens to hold the marker key is wrapped, so it round-trips too.

Any other type raises ``UnsupportedValueError`` naming its path (``hyper_parameters.model_cls``)
before anything is written: pass ``save_hyperparameters(ignore=[...])`` or plain values. As a
last resort for values you trust, ``CkptprotoCheckpointIO(unsafe_allow_pickle=True)`` stores
such values as pickled bytes, and unpickles them on load only when also constructed with
``unsafe_allow_pickle=True``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import pathlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError:  # the standalone pytorch-lightning / lightning-fabric packages
    try:
        from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[assignment, no-redef, unused-ignore]
    except ImportError as exc:  # pragma: no cover - the test environment has lightning
        raise ImportError("ckptproto.integrations.lightning needs Lightning: pip install lightning") from exc

from ckptproto.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    PickleRefusedError,
    UnsupportedValueError,
)
from ckptproto.io.sync import load, save
from ckptproto.policy.locations import as_arg, local_only, resolve
from ckptproto.tree import join_path

MARKER = "__ckptproto_type__"
TRAINER_FLAG = "added_by_ckptproto_lightning"
_PATHS = {
    cls.__name__: cls
    for cls in (
        pathlib.Path,
        pathlib.PurePath,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
    )
}
_LEAF_TYPES = (type(None), bool, int, float, str, bytes)


def _attribute_dict() -> type | None:
    try:
        from lightning.fabric.utilities.data import AttributeDict
    except ImportError:  # pragma: no cover
        try:
            from lightning_fabric.utilities.data import AttributeDict  # type: ignore[assignment, no-redef, unused-ignore]
        except ImportError:
            return None
    cls: type = AttributeDict
    return cls


def encode_checkpoint(checkpoint: dict[str, Any], *, allow_pickle: bool = False) -> dict[str, Any]:
    """Lightning's checkpoint dict with every non-leaf value replaced by a marked plain dict
    (see the module docstring); raises UnsupportedValueError naming the path of a value it
    cannot store::

        encode_checkpoint({"hyper_parameters": {"args": argparse.Namespace(lr=0.1)}})
        # {"hyper_parameters": {"args": {"__ckptproto_type__": "argparse.Namespace", "value": {"lr": 0.1}}}}
    """
    import torch

    attribute_dict = _attribute_dict()

    def marked(name: str, value: Any) -> dict[str, Any]:
        return {MARKER: name, "value": value}

    def walk(value: Any, path: str) -> Any:
        kind = type(value)
        if kind in _LEAF_TYPES or kind is np.ndarray or isinstance(value, torch.Tensor):
            return value
        if kind is dict:
            items = {k: walk(v, join_path(path, k)) for k, v in value.items()}
            return marked("dict", items) if MARKER in value else items
        if kind is collections.OrderedDict:
            return type(value)((k, walk(v, join_path(path, k))) for k, v in value.items())
        if kind is list:
            return [walk(v, join_path(path, i)) for i, v in enumerate(value)]
        if kind is tuple:
            return tuple(walk(v, join_path(path, i)) for i, v in enumerate(value))
        if attribute_dict is not None and kind is attribute_dict:
            return marked("AttributeDict", {k: walk(v, join_path(path, k)) for k, v in value.items()})
        if kind is argparse.Namespace:
            return marked(
                "argparse.Namespace", {k: walk(v, join_path(path, k)) for k, v in vars(value).items()}
            )
        if isinstance(value, pathlib.PurePath) and kind.__name__ in _PATHS:
            return marked(f"pathlib.{kind.__name__}", str(value))
        if kind in (set, frozenset):
            return marked(kind.__name__, [walk(v, join_path(path, i)) for i, v in enumerate(value)])
        if kind is torch.dtype:
            return marked("torch.dtype", str(value).removeprefix("torch."))
        if kind is torch.device:
            return marked("torch.device", str(value))
        if isinstance(value, np.generic) and value.dtype.kind in "biufc":
            return marked("numpy.scalar", np.asarray(value))
        if allow_pickle:
            return marked("pickle", pickle.dumps(value))
        raise UnsupportedValueError(
            f"lightning checkpoint: {path or '<root>'}: values of type {kind.__module__}.{kind.__qualname__} "
            "cannot be stored without pickle; keep it out of the checkpoint (e.g. "
            "save_hyperparameters(ignore=[...])), make it a plain value, or, for values you trust, "
            "use CkptprotoCheckpointIO(unsafe_allow_pickle=True)",
            path=path,
        )

    encoded: dict[str, Any] = walk(checkpoint, "")
    return encoded


def decode_checkpoint(
    state: dict[str, Any], *, allow_pickle: bool = False, where: str = ""
) -> dict[str, Any]:
    """Undo ``encode_checkpoint``."""
    import torch

    attribute_dict = _attribute_dict()

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            if MARKER in value and set(value) == {MARKER, "value"}:
                return unmark(value[MARKER], value["value"], path)
            return type(value)((k, walk(v, join_path(path, k))) for k, v in value.items())
        if isinstance(value, list):
            return [walk(v, join_path(path, i)) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return tuple(walk(v, join_path(path, i)) for i, v in enumerate(value))
        return value

    def unmark(name: Any, payload: Any, path: str) -> Any:
        at = f"{where}: {path or '<root>'}"
        if name == "dict" and isinstance(payload, dict):
            return {k: walk(v, join_path(path, k)) for k, v in payload.items()}
        if name == "AttributeDict" and isinstance(payload, dict):
            inner = {k: walk(v, join_path(path, k)) for k, v in payload.items()}
            return attribute_dict(inner) if attribute_dict is not None else inner
        if name == "argparse.Namespace" and isinstance(payload, dict):
            return argparse.Namespace(**{k: walk(v, join_path(path, k)) for k, v in payload.items()})
        if (
            isinstance(name, str)
            and name.startswith("pathlib.")
            and name[8:] in _PATHS
            and isinstance(payload, str)
        ):
            return _PATHS[name[8:]](payload)
        if name in ("set", "frozenset") and isinstance(payload, list):
            items = [walk(v, join_path(path, i)) for i, v in enumerate(payload)]
            return set(items) if name == "set" else frozenset(items)
        if name == "torch.dtype" and isinstance(payload, str):
            dtype = getattr(torch, payload, None)
            if isinstance(dtype, torch.dtype):
                return dtype
        if name == "torch.device" and isinstance(payload, str):
            return torch.device(payload)
        if name == "numpy.scalar" and isinstance(payload, np.ndarray) and payload.ndim == 0:
            return payload[()]
        if name == "pickle" and isinstance(payload, bytes):
            if not allow_pickle:
                raise PickleRefusedError(
                    f"{at}: this value was stored pickled (unsafe_allow_pickle=True when saved); "
                    "loading it runs code from the checkpoint: pass CkptprotoCheckpointIO(unsafe_allow_pickle=True) "
                    "if you trust it"
                )
            return pickle.loads(payload)
        raise CheckpointError(f"{at}: unknown or malformed {MARKER} value {name!r}")

    decoded: dict[str, Any] = walk(state, "")
    return decoded


def add_trainer_section(state: dict[str, Any]) -> None:
    """Add ckptproto's canonical ``trainer`` section (``global_step``, ``current_epoch``),
    copied from Lightning's top-level ``global_step``/``epoch`` and flagged so that loading
    removes it again; a checkpoint that already has a ``trainer`` key is left alone."""
    if "trainer" in state:
        return
    step, epoch = state.get("global_step"), state.get("epoch")
    if type(step) is int and type(epoch) is int:
        state["trainer"] = {"global_step": step, "current_epoch": epoch, TRAINER_FLAG: True}


def remove_trainer_section(state: dict[str, Any]) -> None:
    section = state.get("trainer")
    if isinstance(section, dict) and section.get(TRAINER_FLAG) is True:
        del state["trainer"]


class CkptprotoCheckpointIO(CheckpointIO):  # type: ignore[misc, unused-ignore]
    """Lightning ``CheckpointIO`` writing ckptproto checkpoint directories.

    ``async_save=True`` hands each save to a ``ckptproto.AsyncSaver`` (tensors are copied
    before ``save_checkpoint`` returns, the write happens in the background; a failed write is
    raised at the next save, load or teardown). ``unsafe_allow_pickle``: see the module doc.
    """

    def __init__(
        self, *, async_save: bool = False, max_pending: int = 1, unsafe_allow_pickle: bool = False
    ) -> None:
        super().__init__()
        self.async_save = async_save
        self.max_pending = max_pending
        self.unsafe_allow_pickle = unsafe_allow_pickle
        self._saver: Any = None
        self._futures: list[Any] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "CkptprotoCheckpointIO.save_checkpoint does not take storage_options; "
                f"got {storage_options!r}"
            )
        self._raise_failures()
        state = encode_checkpoint(checkpoint, allow_pickle=self.unsafe_allow_pickle)
        add_trainer_section(state)
        metadata: dict[str, Any] = {"lightning_version": str(checkpoint.get("pytorch-lightning_version", ""))}
        for key, name in (("global_step", "step"), ("epoch", "epoch")):
            if type(checkpoint.get(key)) is int:
                metadata[name] = checkpoint[key]
        _storage, target = resolve(path)
        if self.async_save:
            if self._saver is None:
                from ckptproto.io.async_save import AsyncSaver

                self._saver = AsyncSaver(max_pending=self.max_pending)
            self._futures.append(self._saver.save(state, as_arg(target), metadata=metadata, overwrite=True))
        else:
            save(state, as_arg(target), metadata=metadata, overwrite=True)

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load and verify (CRC) a checkpoint. ``map_location``: a device name or
        ``torch.device`` moves tensors there; anything else (None, a function, a dict) loads
        them on the CPU and Lightning copies them where its modules live. ``weights_only`` is
        accepted and moot: nothing is unpickled unless ``unsafe_allow_pickle`` was set.

        A ``.ckpt`` *file* (Lightning's own torch.save format, from before switching) is read
        with ``torch.load(weights_only=True)``, so a run can resume from it directly."""
        import torch

        self.wait()
        storage, root = resolve(path)
        if not storage.exists(root):
            raise CheckpointNotFoundError(f"checkpoint at {root} not found")
        if root.is_file() if isinstance(root, Path) else not storage.entries(root):
            # a Lightning .ckpt written by torch.save, from before the switch (local files only)
            from ckptproto.interop import torch_save

            local = local_only(root, "reading a Lightning .ckpt file (torch.save)")
            return torch_save.read(local, allow_pickle=self.unsafe_allow_pickle)
        device = map_location if isinstance(map_location, (str, torch.device)) else None
        state = load(as_arg(root), map_location=device)
        remove_trainer_section(state)
        return decode_checkpoint(state, allow_pickle=self.unsafe_allow_pickle, where=str(root))

    def remove_checkpoint(self, path: Any) -> None:
        """Remove a checkpoint (waiting for a pending save of it first) through its storage, so
        it is never seen half-deleted (locally: renamed to a hidden name, then deleted). A
        local file (an old ``.ckpt``) is unlinked; at a URL, only a ckptproto checkpoint is
        removed (anything else there is left, with a warning)."""
        storage, target = resolve(path)
        if any(f.path == target for f in self._futures if not f.done()):
            self.wait()
        if isinstance(target, Path) and (target.is_symlink() or not target.is_dir()):
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        elif isinstance(target, Path) or storage.is_committed(target):
            storage.remove(target)
        elif storage.exists(target):
            warnings.warn(
                f"CkptprotoCheckpointIO.remove_checkpoint: {target} is not a ckptproto checkpoint; "
                "not removing it",
                RuntimeWarning,
                stacklevel=2,
            )

    def wait(self) -> None:
        """Block until every pending async save is committed; raise the first failure."""
        if self._saver is not None:
            self._saver.wait()
        self._raise_failures()

    def teardown(self) -> None:
        if self._saver is not None:
            self._saver.close()
            self._saver = None
        self._raise_failures()

    def _raise_failures(self) -> None:
        done = [f for f in self._futures if f.done()]
        self._futures = [f for f in self._futures if not f.done()]
        for future in done:
            exc = future.exception()
            if exc is not None:
                raise exc
