"""DTensor leaves (``torch.distributed.tensor``, FSDP2 parameters): the box of the global tensor
a rank holds, and whether that rank is the one that writes it.

A DTensor is stored as chunks of its global tensor: the manifest records the global dtype and
shape, each rank contributes its local shard as one chunk. Shards repeated along ``Replicate``
mesh dimensions are written once, by the rank at coordinate 0 of those dimensions.

torch is never imported here: a state can only hold a DTensor if the process already imported
``torch.distributed.tensor``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ckptproto import arrays
from ckptproto.arrays import ArraySpec


@dataclass(frozen=True)
class LocalShard:
    """This rank's part of a DTensor: ``local`` (a plain torch tensor) sits at ``offsets`` in
    the global tensor; ``writer`` is True on exactly one rank for each distinct shard."""

    local: Any
    offsets: tuple[int, ...]
    writer: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.local.shape)


def is_dtensor(value: object) -> bool:
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(value, module.DTensor)


def describe(value: Any) -> tuple[ArraySpec, LocalShard] | str:
    """The global spec and local shard of a DTensor, or why it cannot be stored::

    spec, shard = describe(model.weight)   # an FSDP2 parameter on rank 1 of 2
    spec.shape, shard.offsets              # ((10, 4), (5, 0))
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = value.device_mesh, tuple(value.placements)
    for placement in placements:
        # Partial needs a reduction and _StridedShard (FSDP2 + TP) is not a box of the global
        # tensor: both would need more than "one chunk per rank".
        if type(placement) is not Shard and type(placement) is not Replicate:
            return (
                f"DTensor placement {type(placement).__name__} ({placement}) is not supported "
                "(only Shard(dim) and Replicate); "
                "redistribute() it to Shard/Replicate placements first"
            )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        return "this rank is not part of the DTensor's device mesh"
    local = value.to_local()
    local_spec = arrays.describe_torch(local)
    if isinstance(local_spec, str):
        return f"DTensor local shard: {local_spec}"
    global_shape = tuple(value.shape)
    shape, offsets = compute_local_shape_and_global_offset(global_shape, mesh, placements)
    if tuple(shape) != local_spec.shape:
        return (
            f"DTensor local shard has shape {list(local_spec.shape)}, its placements {placements} "
            f"give {list(shape)} (a padded or hand-built local tensor?)"
        )
    writer = all(coordinate[d] == 0 for d, p in enumerate(placements) if type(p) is Replicate)
    return ArraySpec("torch", local_spec.dtype, global_shape), LocalShard(local, tuple(offsets), writer)
