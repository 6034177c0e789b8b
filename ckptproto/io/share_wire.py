"""A single process's save, described compactly, to hand it to the checkpoint writer process.

For a world of one the share is fully determined by the encoded state: its tree, each tensor's
path and spec. So only those travel, and the writer process plans the pieces itself with the
same :func:`~ckptproto.io.share.plan_share` every save runs. Specs are shared objects (a state
of 20,000 tensors has a handful of distinct ones), so they go as a small table plus one raw
integer per tensor. A module's state dict (a ``tree.References`` column) goes as its keys, its
first index and its path, which imply its references and its tensors' paths; only the paths
of other tensors travel. That JSON is all the training process encodes (io/writer_process.py)::

    columns, tree, spec_ids = pack(encoded)        # in the training process (sent as JSON)
    job, found = loads(message)                    # in the writer process
    share = unpack(job["share"], spec_ids, job["tree"], found)
"""

from __future__ import annotations

import json
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np

from ckptproto import dtypes
from ckptproto._recent import Recent
from ckptproto.arrays import ArraySpec
from ckptproto.errors import CheckpointError
from ckptproto.format import json_text
from ckptproto.io.share import ShareJob, plan_share
from ckptproto.tree import EncodedState, References, TensorLeaf, column_paths


def pack(encoded: EncodedState) -> tuple[dict[str, Any], str, np.ndarray[Any, Any]]:
    """The description of a world of one's save of ``encoded`` (values not included): JSON-ready
    columns (the tensor count, the distinct specs, the paths no column implies), the tree's
    JSON text, and, per tensor, the index of its spec in that table (int64). A DTensor's shards
    are not implied by the tree: refused.

    Each ``tree.References`` column the tree's writer meets goes as its first index, its path
    and its keys (``{"$column": [3, "models.model", ["w", "b"]]}``): its references and its
    tensors' paths follow from those (:func:`loads` rebuilds them), so the text holds each key
    once, not a reference object per key and each path again."""
    tensors = encoded.tensors
    if list(map(_SHARD, tensors)).count(None) != len(tensors):
        raise CheckpointError("internal error: a distributed share cannot go to the writer process")
    # Specs are shared objects: the distinct ones by identity, in C (a dict keeps the first
    # position of each key), then each tensor's position in that table.
    every = list(map(_SPEC, tensors))
    ids = list(map(id, every))
    distinct: dict[int, ArraySpec] = dict(zip(ids, every, strict=True))
    position = {key: n for n, key in enumerate(distinct)}
    implied = np.zeros(len(tensors), dtype=bool)

    def column(refs: References) -> str:
        if getattr(refs, "path", None) is None:  # not the encoder's: as the dict it is
            return json_text.tree(dict(refs))
        implied[refs.first : refs.first + len(refs)] = True
        return _column_text(refs)

    tree = json_text.tree(encoded.tree, column)
    loose = np.flatnonzero(~implied).tolist()
    columns = {
        "count": len(tensors),
        "loose": [loose, list(map(_PATH, map(tensors.__getitem__, loose)))],
        "specs": [[s.kind, s.dtype.name, s.shape] for s in distinct.values()],
    }
    return columns, tree, np.fromiter(map(position.__getitem__, ids), dtype=np.int64, count=len(ids))


COLUMN = "$column"  # never a key of an encoded dict: the encoder writes "$" keys as "$dict" pairs


def _column_text(refs: References) -> str:
    """``{"$column": [first, path, keys]}`` of the encoder's column ``refs``. The encoder gives
    a module's column of the last save again when its state is saved again (``tree``'s recent
    columns): then its text is the last one's (its keys compared: the same strings, ~0.01 us
    a key, against ~0.15 to write them)."""
    keys = list(refs)
    return _recent.get_or_make(
        (refs.first, refs.path, keys),
        lambda: f'{{"{COLUMN}":[{refs.first},{json_text.text(refs.path)},{_KEYS.encode(keys)}]}}',
    )


# The texts of the last few columns sent (a state's modules), by first index, path and keys.
_recent: Recent[tuple[int, str, list[str]], str] = Recent(8)
_KEYS = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


def loads(message: bytes | str) -> tuple[Any, list[tuple[References, list[str]]]]:
    """``json.loads`` of a job :func:`pack` described, with each column in its tree back as the
    ``tree.References`` it was (its references rebuilt), and those columns with their tensors'
    paths, in no order. A column received lately (the same module saved again) is copied
    from that one, its references and paths not built again."""
    found: list[tuple[References, list[str]]] = []

    def rebuild(obj: dict[str, Any]) -> Any:
        if len(obj) != 1 or COLUMN not in obj:
            return obj
        spec = obj[COLUMN]
        if (
            type(spec) is not list
            or len(spec) != 3
            or type(spec[0]) is not int
            or type(spec[1]) is not str
            or type(spec[2]) is not list
            or not set(map(type, spec[2])) <= {str}
        ):
            raise CheckpointError("internal error: the writer process got a malformed job (a column)")
        first, path, keys = spec
        # (keys: a list of this message's own)
        seen = _received.get_or_make((first, path, keys), lambda: _received_column(first, path, keys))
        refs = seen[0].copy()  # this job's tree is its own
        found.append((refs, seen[1]))
        return refs

    return json.loads(message, object_hook=rebuild), found


def _received_column(first: int, path: str, keys: list[str]) -> tuple[References, list[str]]:
    """The column a job sent as ``[first, path, keys]``, and its tensors' paths."""
    made = References.numbered(keys, first, path)
    if len(made) != len(keys):
        raise CheckpointError("internal error: the writer process got a malformed job (column keys)")
    return made, column_paths(path, keys)


# The columns received lately (the modules of the last save), by first index, path and keys:
# their references and their tensors' paths.
_received: Recent[tuple[int, str, list[str]], tuple[References, list[str]]] = Recent(8)


_SPEC, _PATH, _SHARD = itemgetter(1), itemgetter(2), itemgetter(3)  # TensorLeaf fields


def unpack(
    columns: dict[str, Any],
    spec_ids: np.ndarray[Any, Any],
    tree: Any,
    found: list[tuple[References, list[str]]],
) -> ShareJob:
    """The ShareJob :func:`pack` described, from its columns, tree and the tree's columns
    (:func:`loads`), planned as ``plan_share`` plans a world of one; ``leaves`` is empty: the
    bytes come from staging."""
    specs = [ArraySpec(kind, dtypes.by_name(dtype), tuple(shape)) for kind, dtype, shape in columns["specs"]]
    count, (loose, loose_paths) = columns["count"], columns["loose"]
    if len(spec_ids) != count or (
        len(spec_ids) and not 0 <= int(spec_ids.min()) <= int(spec_ids.max()) < len(specs)
    ):
        raise CheckpointError("internal error: the writer process got a malformed job (tensor specs)")
    paths: list[str | None] = [None] * count
    try:
        for refs, refs_paths in found:
            if not 0 <= refs.first <= refs.first + len(refs) <= count:
                raise IndexError(refs.first)
            paths[refs.first : refs.first + len(refs)] = refs_paths
        for i, path in zip(loose, loose_paths, strict=True):
            paths[i] = path
    except (IndexError, TypeError, ValueError):
        raise CheckpointError("internal error: the writer process got a malformed job (paths)") from None
    # Every place filled exactly once: as many paths as places, and none left empty.
    if sum(len(refs) for refs, _paths in found) + len(loose) != count or paths.count(None):
        raise CheckpointError("internal error: the writer process got a malformed job (paths)")
    # (tuple.__new__ by columns: a named tuple's own __new__ is a Python call per tensor)
    tensors = list(
        map(
            tuple.__new__,
            repeat(TensorLeaf),
            zip(
                repeat(None),
                map(specs.__getitem__, spec_ids.tolist()),
                paths,
                repeat(None),
                repeat(0),
                strict=False,
            ),
        )
    )
    share = plan_share(EncodedState(tree, tensors), 0, 1)
    share.leaves = []
    return share
