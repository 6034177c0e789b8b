"""A single process's save, described compactly, to hand it to the checkpoint writer process.

For a world of one the share is fully determined by the encoded state: its tree, each tensor's
path and spec. So only those travel, and the writer process plans the pieces itself with the
same :func:`~ckptproto.io.share.plan_share` every save runs. Specs are shared objects (a state
of 20,000 tensors has a handful of distinct ones), so they go as a small table plus one raw
integer per tensor. JSON of the tree and the paths is all the training process encodes
(io/writer_process.py): ~15 ms of its GIL at 20,000 tensors, where JSON columns of every
piece cost ~40 ms::

    columns, spec_ids = pack(encoded)              # in the training process (sent as JSON)
    share = unpack(job["share"], spec_ids)         # in the writer process, job = json.loads(...)
"""

from __future__ import annotations

from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np

from ckptproto import dtypes
from ckptproto.arrays import ArraySpec
from ckptproto.errors import CheckpointError
from ckptproto.io.share import ShareJob, plan_share
from ckptproto.tree import EncodedState, TensorLeaf


def pack(encoded: EncodedState) -> tuple[dict[str, Any], np.ndarray[Any, Any]]:
    """The description of a world of one's save of ``encoded`` (values not included): JSON-ready
    columns (the tree, the paths, the distinct specs) and, per tensor, the index of its spec in
    that table (int64). A DTensor's shards are not implied by the tree: refused."""
    tensors = encoded.tensors
    if list(map(_SHARD, tensors)).count(None) != len(tensors):
        raise CheckpointError("internal error: a distributed share cannot go to the writer process")
    # Specs are shared objects: the distinct ones by identity, in C (a dict keeps the first
    # position of each key), then each tensor's position in that table.
    every = list(map(_SPEC, tensors))
    ids = list(map(id, every))
    distinct: dict[int, ArraySpec] = dict(zip(ids, every, strict=True))
    position = {key: n for n, key in enumerate(distinct)}
    columns = {
        "tree": encoded.tree,
        "paths": list(map(_PATH, tensors)),
        "specs": [[s.kind, s.dtype.name, s.shape] for s in distinct.values()],
    }
    return columns, np.fromiter(map(position.__getitem__, ids), dtype=np.int64, count=len(ids))


_SPEC, _PATH, _SHARD = itemgetter(1), itemgetter(2), itemgetter(3)  # TensorLeaf fields


def unpack(columns: dict[str, Any], spec_ids: np.ndarray[Any, Any]) -> ShareJob:
    """The ShareJob :func:`pack` described, also after a JSON round trip (which turns tuples
    into lists), planned as ``plan_share`` plans a world of one; ``leaves`` is empty: the
    bytes come from staging."""
    specs = [ArraySpec(kind, dtypes.by_name(dtype), tuple(shape)) for kind, dtype, shape in columns["specs"]]
    paths = columns["paths"]
    if len(spec_ids) != len(paths) or (
        len(spec_ids) and not 0 <= int(spec_ids.min()) <= int(spec_ids.max()) < len(specs)
    ):
        raise CheckpointError("internal error: the writer process got a malformed job (tensor specs)")
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
    share = plan_share(EncodedState(columns["tree"], tensors), 0, 1)
    share.leaves = []
    return share
