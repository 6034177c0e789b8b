"""``torch.distributed.checkpoint`` (DCP) directories, written and read in one process.

Writing hands DCP the state itself, so a DCP user's own ``dcp.load(template, ...)`` finds every
value at the key DCP would have given it. numpy arrays go in as torch tensors sharing their
memory. ckptproto also stores, under the top-level key ``__ckptproto__``, the state tree in its
lossless JSON encoding with each tensor's DCP key, so reading the directory back with ckptproto
restores tuples, int dict keys, OrderedDicts, numpy arrays and tied tensors exactly.

Reading a DCP directory that ckptproto did not write rebuilds the nesting the way torch's own
``dcp_to_torch_save`` does (DCP records no container types: an int key becomes a list index).

Safety: DCP's ``.metadata`` file is a pickle, which DCP unpickles fully. ckptproto reads it
with an unpickler that builds only DCP's own metadata classes, torch sizes, dtypes and layouts
and paths, and refuses anything else (``PickleRefusedError``) unless ``allow_pickle=True``
(``--unsafe-allow-pickle``). Non-tensor values DCP stores as pickled bytes are likewise loaded
with ``torch.load(weights_only=True)`` (DCP itself would unpickle them fully).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ckptproto import arrays
from ckptproto.arrays import require_torch
from ckptproto.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointWriteError,
    PickleRefusedError,
    UnsupportedValueError,
)
from ckptproto.format import layout
from ckptproto.io import commit
from ckptproto.tree import decode_tree, encode_state

TREE_KEY = "__ckptproto__"
METADATA_NAME = ".metadata"


def is_dcp_dir(path: Path) -> bool:
    return path.is_dir() and (path / METADATA_NAME).is_file()


def write(state: dict[str, Any], final: Path, *, overwrite: bool = False) -> Path:
    """Save ``state`` with ``torch.distributed.checkpoint.save`` (no process group) into a
    temporary sibling directory, then rename it into place."""
    torch = require_torch()
    import numpy as np
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.filesystem import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    if TREE_KEY in state:
        raise UnsupportedValueError(
            f"the top-level key {TREE_KEY!r} is reserved for ckptproto", path=TREE_KEY
        )
    final = final.absolute()
    if final.exists() and not (is_dcp_dir(final) or (final.is_dir() and not any(final.iterdir()))):
        raise CheckpointExistsError(
            f"{final} exists and is not a DCP checkpoint directory; refusing to replace it"
        )
    if final.exists() and not overwrite and any(final.iterdir()):
        raise CheckpointExistsError(
            f"{final} already exists; pass overwrite=True (--overwrite) to replace it"
        )
    encoded = encode_state(state)

    def as_torch(value: Any) -> Any:
        kind = type(value)
        if kind is np.ndarray:
            return torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, dict):
            return type(value)((k, as_torch(v)) for k, v in value.items())
        if kind is list:
            return [as_torch(v) for v in value]
        return value

    dcp_state = as_torch(dict(state))
    flat, _mapping = flatten_state_dict(dcp_state)
    # Each distinct tensor's DCP key: the first key whose value is that very tensor.
    by_identity: dict[tuple[Any, ...], str] = {}
    for key, value in flat.items():
        if isinstance(value, torch.Tensor):
            by_identity.setdefault(arrays.identity(value), key)
    flat_leaves, _ = flatten_state_dict(as_torch({"x": [leaf.value for leaf in encoded.tensors]}))
    keys: list[str] = []
    for i, leaf in enumerate(encoded.tensors):
        found = by_identity.get(arrays.identity(flat_leaves[f"x.{i}"]))
        if found is None:
            raise UnsupportedValueError(
                f"{leaf.path}: a tensor inside a tuple (or another value DCP pickles whole) cannot "
                "be stored as a DCP tensor; make the tuple a list",
                path=leaf.path,
            )
        keys.append(found)
    dcp_state[TREE_KEY] = json.dumps({"state": encoded.tree, "keys": keys}, separators=(",", ":"))
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = final.parent / layout.temp_name(final.name)
    try:
        temp.mkdir()
        with _single_process():
            dcp_save(dcp_state, storage_writer=FileSystemWriter(str(temp)), no_dist=True)
        _fsync_tree(temp)
        # One atomic step: final never goes missing, and without overwrite a directory that
        # appeared meanwhile is never replaced.
        commit.place_dir(temp, final, overwrite=overwrite)
    except OSError as exc:
        raise CheckpointWriteError(f"writing DCP checkpoint {final} failed: {exc}") from exc
    except CheckpointException as exc:  # DCP's (a BaseException), wrapping its writer's error
        failure = _find_checkpoint_error(exc)
        if failure is not None:
            raise failure from None
        raise CheckpointWriteError(f"writing DCP checkpoint {final} failed: {exc}") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return final


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """One process is what we ask for (no_dist=True); DCP warns about it anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_tree(directory: Path) -> None:
    for entry in directory.iterdir():
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    commit.fsync_dir(directory)


# What a DCP ``.metadata`` pickle may name (torch 2.x): building these runs no code of the file.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: no global outside ``_METADATA_GLOBALS``
    (and torch's dtypes, layouts and memory formats) is ever looked up."""

    def __init__(self, file: Any, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        torch = require_torch()
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
        ):
            return getattr(torch, name)
        raise PickleRefusedError(
            f"{self.where}: DCP metadata names {module}.{name}, which is not DCP metadata; "
            "unpickling it could run arbitrary code. If you trust this checkpoint pass "
            "allow_pickle=True (--unsafe-allow-pickle)"
        )


def read_metadata(path: Path) -> Any:
    """The ``Metadata`` of the DCP directory ``path``, unpickled without running its code::

    read_metadata(Path("dcp_dir")).state_dict_metadata.keys()
    """
    where = path / METADATA_NAME
    try:
        with open(where, "rb") as f:
            return _MetadataUnpickler(f, where).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged pickle: whatever the unpickler raises
        raise CheckpointFormatError(f"{where}: cannot read DCP metadata: {exc}") from None


def read(path: Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Load a DCP directory into memory (one copy of its tensors), rebuilding the state."""
    torch = require_torch()
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        StorageMeta,
        TensorStorageMetadata,
    )
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    class _Reader(FileSystemReader):
        """DCP's reader, its metadata unpickled by ``read_metadata`` unless allowed in full."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            if allow_pickle:
                return super().read_metadata(*args, **kwargs)
            metadata = read_metadata(path)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class _WeightsOnlyPlanner(DefaultLoadPlanner):
        """DCP unpickles non-tensor values fully; load them with weights_only=True instead."""

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            try:
                loaded = torch.load(value, weights_only=not allow_pickle)
            except pickle.UnpicklingError as exc:
                raise PickleRefusedError(
                    f"{path}: the value at {fqn!r} needs full unpickling, which can run arbitrary code; "
                    "if you trust this checkpoint pass allow_pickle=True (--unsafe-allow-pickle)"
                ) from exc
            loaded_bytes[fqn] = loaded

    if not is_dcp_dir(path):
        raise CheckpointFormatError(f"{path}: not a DCP checkpoint directory (no {METADATA_NAME})")
    reader = _Reader(str(path))
    try:
        metadata = reader.read_metadata()
    except CheckpointError:
        raise
    except Exception as exc:  # DCP raises whatever unpickling raises
        raise CheckpointFormatError(f"{path}: cannot read DCP metadata: {exc}") from None
    template: dict[str, Any] = {}
    loaded_bytes: dict[str, Any] = {}  # dcp.load copies the top level: collect values aside
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            template[fqn] = torch.empty(md.size, dtype=md.properties.dtype)
        elif isinstance(md, BytesStorageMetadata):
            template[fqn] = None
    try:
        with _single_process():
            dcp_load(template, storage_reader=reader, planner=_WeightsOnlyPlanner(), no_dist=True)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:  # CheckpointException is a BaseException
        cause = exc.__cause__ if isinstance(exc.__cause__, CheckpointError) else None
        if cause is not None:
            raise cause from None
        found = _find_checkpoint_error(exc)
        if found is not None:
            raise found from None
        raise CheckpointFormatError(f"{path}: DCP could not load the checkpoint: {exc}") from None
    template.update(loaded_bytes)
    tree_json = template.pop(TREE_KEY, None)
    if isinstance(tree_json, str):
        return _rebuild(path, tree_json, template)
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    mappings = {k: v for k, v in mappings.items() if k in template}
    if set(mappings) != set(template):  # written without flattening: keys are the paths
        mappings = {k: (k,) for k in template}
    state: dict[str, Any] = unflatten_state_dict(template, mappings)
    return state


def _find_checkpoint_error(exc: BaseException) -> CheckpointError | None:
    """DCP wraps errors raised on its reader threads (CheckpointException); find ours."""
    seen = 0
    stack: list[Any] = [exc]
    while stack and seen < 50:
        item = stack.pop()
        seen += 1
        if isinstance(item, CheckpointError):
            return item
        if isinstance(item, (tuple, list)):  # DCP keeps (exception, traceback) pairs
            stack.extend(item)
        elif isinstance(item, BaseException):
            stack.extend([item.__cause__, item.__context__])
            failures = getattr(item, "failures", None)
            if isinstance(failures, dict):
                stack.extend(failures.values())
    return None


def _rebuild(path: Path, tree_json: str, flat: dict[str, Any]) -> dict[str, Any]:
    where = f"{path} ({TREE_KEY})"
    try:
        doc = json.loads(tree_json)
        tree, keys = doc["state"], doc["keys"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{where}: {exc}") from None

    def resolve(kind: str, index: int, state_path: str) -> Any:
        if (
            not isinstance(keys, list)
            or index >= len(keys)
            or not isinstance(keys[index], str)
            or keys[index] not in flat
        ):
            raise CheckpointFormatError(f"{where}: tensor {index} at {state_path} is missing")
        value = flat[keys[index]]
        return value.numpy() if kind == "numpy" else value

    state = decode_tree(tree, resolve, where=where)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{where}: the state must be an object at the top level")
    return state
