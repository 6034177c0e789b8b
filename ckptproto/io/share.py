"""Planning each rank's share of a save: which tensors, shards and replicas it writes.

Plain tensors and arrays are replicated by definition (as in DCP): each is written once, by
one rank, chosen by a deterministic size-balanced assignment every rank computes alike.
DTensor shards are written by their own rank (shards repeated along ``Replicate`` mesh
dimensions by one rank only). A world of one writes everything::

    job = plan_share(encode_state(state), rank=0, world_size=1)
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import is_not
from typing import Any

from ckptproto import arrays
from ckptproto.arrays import ArraySpec
from ckptproto.io.plan import Piece, WholePieces, unique_keys
from ckptproto.location import Location
from ckptproto.tree import EncodedState, TensorLeaf

logger = logging.getLogger("ckptproto")

# Plain (replicated) tensors up to this size are compared across ranks by their CRC-32 before
# a save: a per-rank value saved as one replica must not pass unnoticed. Larger ones are not
# (reading every replica on every rank would double the cost of a save).
REPLICA_CHECK_BYTES = 64 * 1024


def layout_digest(encoded: EncodedState) -> str:
    layout_doc = [
        [leaf.path, leaf.spec.kind, leaf.spec.dtype.name, list(leaf.spec.shape), leaf.shard is not None]
        for leaf in encoded.tensors
    ]
    return hashlib.sha256(json.dumps(layout_doc).encode()).hexdigest()


def assign_writers(encoded: EncodedState, world_size: int) -> list[int | None]:
    """The rank that writes each plain (replicated) tensor, None for DTensors (every shard is
    written by its own rank). Largest first onto the least loaded rank: the same answer on
    every rank, and the bytes spread evenly."""
    if world_size == 1:
        return [None if leaf.shard is not None else 0 for leaf in encoded.tensors]
    owners: list[int | None] = [None] * len(encoded.tensors)
    loads = [(0, r) for r in range(world_size)]  # a heap of (bytes so far, rank)
    plain = [i for i, leaf in enumerate(encoded.tensors) if leaf.shard is None]
    for i in sorted(plain, key=lambda i: (-encoded.tensors[i].spec.nbytes, i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + encoded.tensors[i].spec.nbytes, rank))
    return owners


@dataclass
class ShareJob:
    """One rank's part of a distributed save, planned before any byte is copied: the global
    layout (``encoded``, tensor values dropped), and the ``pieces`` this rank writes with
    ``leaves`` holding their values (plain tensors: what to stage or write)."""

    encoded: EncodedState
    digest: str
    pieces: Sequence[Piece]  # a world of one's: WholePieces (piece i is tensor i, whole), by columns
    leaves: list[TensorLeaf]
    tensor_index: list[int]  # per piece: its tensor in ``encoded``
    replicas: dict[int, int]  # CRC-32 of each small plain tensor, by index (compared across ranks)


def plan_share(encoded: EncodedState, rank: int, world_size: int, *, keep_values: bool = False) -> ShareJob:
    """What ``rank`` writes of ``encoded``: its DTensor shards (unless another rank writes a
    replica of them) and the plain tensors :func:`assign_writers` gives it.

    The job's layout (``job.encoded``) holds no tensor values, so a job kept past its save
    (an async save's) does not keep the state's tensors alive; ``keep_values=True`` (a
    synchronous save, whose job ends with the call) lets a world of one reuse ``encoded``
    as the layout instead of a copy of every leaf without its value::

        job = plan_share(encoded, 0, 1, keep_values=True)   # job.encoded is encoded
    """
    tensors = encoded.tensors
    if tensors and world_size == 1:
        values, specs, paths, shards, addresses = zip(*tensors, strict=True)
        if shards.count(None) == len(shards):
            # A world of one without DTensors (the usual save): every tensor whole, by columns.
            # (Values by identity: == on a tensor or an array is a Python call, or an array.)
            if keep_values or (
                not any(map(is_not, values, repeat(None))) and addresses.count(0) == len(addresses)
            ):
                layout = encoded  # values kept, or dropped already (the writer process's job)
            else:
                valueless = zip(repeat(None), specs, paths, shards, repeat(0))
                layout = EncodedState(encoded.tree, list(map(tuple.__new__, repeat(TensorLeaf), valueless)))
            whole = WholePieces(unique_keys(list(paths)), list(specs))
            return ShareJob(layout, "", whole, list(tensors), list(range(len(tensors))), {})
    keys = unique_keys([t.path for t in tensors])
    owners = assign_writers(encoded, world_size)
    pieces: list[Piece] = []
    leaves: list[TensorLeaf] = []
    index: list[int] = []
    zeros = [(0,) * n for n in range(8)]  # whole-tensor offsets, shared by the usual ranks
    for i, (leaf, key) in enumerate(zip(encoded.tensors, keys, strict=True)):
        shard = leaf.shard
        if shard is None:
            if owners[i] != rank:
                continue
            ndim = len(leaf.spec.shape)
            pieces.append(Piece(len(leaves), key, leaf.spec, zeros[ndim] if ndim < 8 else (0,) * ndim))
            leaves.append(leaf)  # the plain tensor itself: its value, spec and path
            index.append(i)
            continue
        if leaf.spec.numel == 0:
            # An empty global tensor still needs one (empty) chunk: rank 0 writes it.
            if rank != 0:
                continue
            value, offsets, spec = (
                shard.local.new_empty(leaf.spec.shape),
                (0,) * len(leaf.spec.shape),
                leaf.spec,
            )
        else:
            if not shard.writer or shard.local.numel() == 0:
                continue  # a replica of a shard another rank writes, or an empty uneven shard
            value, offsets = shard.local, shard.offsets
            spec = ArraySpec(leaf.spec.kind, leaf.spec.dtype, shard.shape)
        pieces.append(Piece(len(leaves), key, spec, offsets))
        leaves.append(TensorLeaf(value, spec, leaf.path))
        index.append(i)
    layout_only = EncodedState(encoded.tree, [TensorLeaf(None, t.spec, t.path) for t in encoded.tensors])
    if world_size == 1:  # nobody to compare layouts or replicas with
        return ShareJob(layout_only, "", pieces, leaves, index, {})
    return ShareJob(layout_only, layout_digest(encoded), pieces, leaves, index, replica_digests(encoded))


def replica_digests(encoded: EncodedState) -> dict[int, int]:
    """CRC-32 of every plain tensor/array of at most REPLICA_CHECK_BYTES bytes, by index."""
    found = {}
    for i, leaf in enumerate(encoded.tensors):
        if leaf.shard is None and leaf.value is not None and leaf.spec.nbytes <= REPLICA_CHECK_BYTES:
            view, _owner = arrays.to_host_bytes(leaf.value)
            found[i] = zlib.crc32(view)
    return found


def warn_if_replicas_differ(
    final: Location, job: ShareJob, answers: list[dict[str, Any]], world: int
) -> None:
    """On rank 0: name the plain tensors whose value is not the same on every rank (only one
    rank's value is written), and which rank's value the checkpoint holds."""
    owners = assign_writers(job.encoded, world)
    lines = []
    for index, crc in sorted(answers[0]["replicas"].items()):
        differ = [r for r, a in enumerate(answers) if a["replicas"].get(index) != crc]
        if differ:
            path = job.encoded.tensors[index].path
            lines.append(
                f"{path} (rank {', '.join(map(str, differ))} differ from rank 0; the checkpoint "
                f"holds rank {owners[index]}'s)"
            )
    if not lines:
        return
    shown = "; ".join(lines[:10]) + (f"; and {len(lines) - 10} more" if len(lines) > 10 else "")
    message = (
        f"saving {final}: plain tensors differ between ranks: {shown}. A plain tensor is saved "
        "once, as replicated; make a per-rank value a DTensor, gather it under per-rank keys "
        "(as RNGState does), or save it with process_group='local' (docs/distributed.md)"
    )
    logger.warning("%s", message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)
