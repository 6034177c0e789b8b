"""A single process's ShareJob as plain columns, to hand it to the checkpoint writer process.

Serializing 20,000 ``Piece``/``ArraySpec``/``TensorLeaf`` dataclasses one by one costs ~100 ms
of the training process's GIL; JSON lists of strings and ints cost a fraction of that, and the
writer process rebuilds the objects on its own CPU::

    text = json.dumps(pack(share))    # in the training process (tensor values already staged)
    share = unpack(json.loads(text))  # in the writer process
"""

from __future__ import annotations

from typing import Any

from ckptproto import dtypes
from ckptproto.arrays import ArraySpec
from ckptproto.errors import CheckpointError
from ckptproto.io.plan import Piece
from ckptproto.io.share import ShareJob
from ckptproto.tree import EncodedState, TensorLeaf


def pack(share: ShareJob) -> dict[str, Any]:
    """The columns of ``share`` (its layout and pieces; values are not included). Only a
    world of one: a DTensor's shard layout does not travel."""
    tensors = share.encoded.tensors
    if any(t.shard is not None for t in tensors):
        raise CheckpointError("internal error: a distributed share cannot go to the writer process")
    pieces = share.pieces
    return {
        "tree": share.encoded.tree,
        "paths": [t.path for t in tensors],
        "kinds": [t.spec.kind for t in tensors],
        "dtypes": [t.spec.dtype.name for t in tensors],
        "shapes": [t.spec.shape for t in tensors],
        "digest": share.digest,
        "sources": [p.source for p in pieces],
        "keys": [p.key for p in pieces],
        "piece_dtypes": [p.spec.dtype.name for p in pieces],
        "piece_shapes": [p.spec.shape for p in pieces],
        "piece_kinds": [p.spec.kind for p in pieces],
        "offsets": [p.offsets for p in pieces],
        "tensor_index": share.tensor_index,
        "replicas": share.replicas,
    }


def unpack(columns: dict[str, Any]) -> ShareJob:
    """The ShareJob :func:`pack` described, also after a JSON round trip (which turns tuples
    into lists); ``leaves`` is empty: the bytes come from staging."""
    specs: dict[tuple[Any, ...], ArraySpec] = {}

    def spec(kind: Any, dtype: str, shape: list[int] | tuple[int, ...]) -> ArraySpec:
        key = (kind, dtype, tuple(shape))
        found = specs.get(key)
        if found is None:
            found = specs[key] = ArraySpec(kind, dtypes.by_name(dtype), key[2])
        return found

    tensors = [
        TensorLeaf(None, spec(kind, dtype, shape), path)
        for path, kind, dtype, shape in zip(
            columns["paths"], columns["kinds"], columns["dtypes"], columns["shapes"], strict=True
        )
    ]
    pieces = [
        Piece(source, key, spec(kind, dtype, shape), tuple(offsets))
        for source, key, kind, dtype, shape, offsets in zip(
            columns["sources"],
            columns["keys"],
            columns["piece_kinds"],
            columns["piece_dtypes"],
            columns["piece_shapes"],
            columns["offsets"],
            strict=True,
        )
    ]
    return ShareJob(
        EncodedState(columns["tree"], tensors),
        columns["digest"],
        pieces,
        [],
        columns["tensor_index"],
        {int(index): crc for index, crc in columns["replicas"].items()},  # JSON keys are strings
    )
