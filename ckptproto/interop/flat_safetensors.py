"""A single flat ``.safetensors`` file, the layout model hubs use.

Writing: every distinct tensor becomes one entry named by its dotted state path
(``models.model.0.weight``; a path repeated or named ``__metadata__`` gets a ``#2`` suffix).
Everything that is not a tensor — nesting, ints, floats, strings, tuples, int dict keys, which
entries are numpy arrays, tied tensors — is kept in ``__metadata__`` under
``ckptproto.state`` (the state tree in ckptproto's lossless JSON value encoding, with
tensors referenced by index) and ``ckptproto.tensors`` (the entry name, dtype and shape of each
index), so reading the file back with ckptproto rebuilds the state exactly. Tools that ignore
``__metadata__`` see a plain ``{name: tensor}`` file.

Reading a file without that metadata (a hub model) gives the flat ``{name: tensor}`` dict,
which is what ``model.load_state_dict`` expects.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Any

from ckptproto import arrays, dtypes
from ckptproto.arrays import ArraySpec
from ckptproto.errors import CheckpointError, CheckpointFormatError
from ckptproto.format import safetensors, strict_json
from ckptproto.format.manifest import check_extent
from ckptproto.format.regular_file import NotRegularFileError, open_regular
from ckptproto.interop.files import atomic_file
from ckptproto.io import writer
from ckptproto.io.plan import FILE_METADATA, Piece, plan_file, unique_keys
from ckptproto.tree import decode_tree, encode_state, int_text

STATE_KEY = "ckptproto.state"
TENSORS_KEY = "ckptproto.tensors"
_BY_CODE = {d.safetensors: d for d in dtypes.BY_NAME.values() if d.safetensors is not None}


def write(state: dict[str, Any], final: Path, *, overwrite: bool = False) -> Path:
    """Write ``state`` as one flat safetensors file, tensor bytes straight from the state's own
    memory (memory-mapped inputs are read page by page as they are written)."""
    encoded = encode_state(state)
    keys = unique_keys([leaf.path for leaf in encoded.tensors])
    pieces = [
        Piece(i, key, leaf.spec, (0,) * len(leaf.spec.shape))
        for i, (leaf, key) in enumerate(zip(encoded.tensors, keys, strict=True))
    ]
    table = [
        [key, leaf.spec.dtype.name, list(leaf.spec.shape)]
        for key, leaf in zip(keys, encoded.tensors, strict=True)
    ]
    metadata = {
        **FILE_METADATA,
        STATE_KEY: json.dumps(encoded.tree, separators=(",", ":"), ensure_ascii=False, allow_nan=False),
        TENSORS_KEY: json.dumps(table, separators=(",", ":")),
    }
    hosted = [arrays.to_host_bytes(leaf.value) for leaf in encoded.tensors]  # owners kept alive
    sources = [view for view, _owner in hosted]
    with atomic_file(final, overwrite=overwrite) as temp:
        writer.write_file(temp.parent, plan_file(temp.name, 0, pieces, metadata), sources)
    return final


def read(path: Path) -> dict[str, Any]:
    """The state in a flat safetensors file; tensors are views of a private memory map of the
    file (read lazily), copied only when their bytes are not aligned for their dtype."""
    try:
        fd, st = open_regular(path)  # a FIFO would block a plain open
    except NotRegularFileError as exc:
        raise CheckpointFormatError(f"{path} is a {exc.kind}, not a safetensors file") from None
    except OSError as exc:
        raise CheckpointError(f"cannot open {path}: {exc}") from exc
    try:
        size = st.st_size
        prefix = os.pread(fd, 8, 0)
        n = safetensors.header_length(prefix, size, str(path))
        raw = os.pread(fd, n, 8)
        entries = safetensors.parse_header(raw, size, str(path))
        meta = strict_json.loads(raw.decode("utf-8")).get("__metadata__") or {}
        buffer = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if size else b""
    finally:
        os.close(fd)
    where = f"{path} (__metadata__)"
    if STATE_KEY in meta:
        return _read_tree(path, entries, meta, buffer, where)
    state: dict[str, Any] = {}
    for key, entry in entries.items():
        dtype = _BY_CODE.get(entry.code)
        if dtype is None:
            raise CheckpointFormatError(
                f"{path}: tensor {key!r} has dtype {entry.code} that torch cannot hold"
            )
        state[key] = _tensor(ArraySpec("torch", dtype, entry.shape), buffer, entry.begin)
    return state


def _read_tree(
    path: Path, entries: dict[str, safetensors.HeaderEntry], meta: dict[str, str], buffer: Any, where: str
) -> dict[str, Any]:
    try:  # as strict as a manifest (F-6): big ints exact, no 1e400, no lone surrogates
        tree = strict_json.loads(meta[STATE_KEY])
        table = strict_json.loads(meta.get(TENSORS_KEY, "[]"))
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{where}: {exc}") from None
    except RecursionError:
        raise CheckpointFormatError(f"{where}: the JSON nests too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError
        raise CheckpointFormatError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(table, list):
        raise CheckpointFormatError(f"{where}: {TENSORS_KEY} is not a list")

    def resolve(kind: str, index: int, state_path: str) -> Any:
        if index >= len(table) or not isinstance(table[index], list) or len(table[index]) != 3:
            raise CheckpointFormatError(f"{where}: bad tensor reference {int_text(index)} at {state_path}")
        key, dtype_name, shape = table[index]
        if (
            not isinstance(key, str)
            or not isinstance(shape, list)
            or not all(type(d) is int and d >= 0 for d in shape)
        ):
            raise CheckpointFormatError(f"{where}: malformed entry {index} of {TENSORS_KEY} at {state_path}")
        entry = entries.get(key)
        if entry is None:
            raise CheckpointFormatError(f"{path}: tensor {key!r} (state path {state_path}) is missing")
        dtype = dtypes.by_name(dtype_name)
        check_extent(tuple(shape), dtype.itemsize, f"{where}: {TENSORS_KEY}[{index}]")
        spec = ArraySpec("numpy" if kind == "numpy" else "torch", dtype, tuple(shape))
        if entry.end - entry.begin != spec.nbytes:
            raise CheckpointFormatError(
                f"{path}: tensor {key!r} has {entry.end - entry.begin} bytes, "
                f"{dtype_name}{[int_text(d) for d in shape]} needs {int_text(spec.nbytes)}"
            )
        return cache.setdefault(index, _tensor(spec, buffer, entry.begin))

    cache: dict[int, Any] = {}
    state = decode_tree(tree, resolve, where=where)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{where}: the state must be an object at the top level")
    return state


def _tensor(spec: ArraySpec, buffer: Any, offset: int) -> Any:
    value = arrays.from_buffer(spec, buffer, offset) if spec.nbytes else None
    if value is None:  # empty, or not aligned for the dtype: copy these few bytes
        value, dest = arrays.allocate(spec)
        if spec.nbytes:
            dest[:] = memoryview(buffer)[offset : offset + spec.nbytes]
    return value
