"""The first stage of every save: resolve Statefuls, check and encode every value, encode the
metadata, and plan this rank's share. Sync, async and distributed saves all start here::

    job = prepare({"models": {"model": model}}, metadata=None, coord=Solo())

Every value is checked before any byte is written (UnsupportedValueError names the path).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

import numpy as np

from ckptproto import arrays, protocol
from ckptproto.errors import UnsupportedValueError
from ckptproto.io.coordinate import Coordinator
from ckptproto.io.meta import encode_metadata
from ckptproto.io.share import ShareJob, plan_share
from ckptproto.protocol import Stateful
from ckptproto.tree import MAX_DEPTH, EncodedState, encode_state, join_path

_PLAIN = (type(None), bool, int, float, str, bytes, list, tuple)
_SHARD = attrgetter("shard")


@dataclass
class Prepared:
    """A save, checked and planned: the full ``encoded`` state (live values), its
    ``metadata_tree`` and this rank's ``share`` (the pieces it writes, with their values)."""

    encoded: EncodedState
    metadata_tree: Any
    share: ShareJob


def prepare(
    state_or_stateful: Stateful | Mapping[str, Any], metadata: Mapping[str, Any] | None, coord: Coordinator
) -> Prepared:
    """Check, encode and plan a save on ``coord``. A DTensor is refused unless ``coord`` is a
    torch.distributed group (its other shards live on the other ranks)."""
    encoded, metadata_tree = check_and_encode(state_or_stateful, metadata, coord)
    # (a synchronous save: its job ends with the call, the layout may hold the values)
    return Prepared(encoded, metadata_tree, plan_share(encoded, coord.rank, coord.size, keep_values=True))


def check_and_encode(
    state_or_stateful: Stateful | Mapping[str, Any], metadata: Mapping[str, Any] | None, coord: Coordinator
) -> tuple[EncodedState, Any]:
    """:func:`prepare` without planning the share: the encoded state and metadata tree. (An
    async save handed to the writer process is planned there, not in the training process.)::

        encoded, metadata_tree = check_and_encode(state, None, Solo())
    """
    state = resolve_statefuls(protocol.state_of(state_or_stateful))
    encoded = encode_state(state)
    # (a pass in C first: a state of 20,000 tensors holds no DTensor)
    if not coord.distributed and any(map(_SHARD, encoded.tensors)):
        for leaf in encoded.tensors:
            if leaf.shard is not None:
                raise UnsupportedValueError(
                    f"{leaf.path}: a DTensor is saved by all ranks of a process group; "
                    "do not pass process_group='local'",
                    path=leaf.path,
                )
    return encoded, encode_metadata(metadata, state)


def resolve_statefuls(state: Mapping[str, Any]) -> dict[str, Any]:
    """Replace Stateful objects held in (nested) dicts of a state by their ``state_dict()``,
    so ``{"models": {"model": model}, "optimizers": {"optimizer": opt}}`` saves as expected."""

    active: set[int] = set()  # dicts and Statefuls on the current path, to catch cycles

    def walk(value: Any, path: str, depth: int) -> Any:
        kind = type(value)
        if kind is not dict and (kind in _PLAIN or kind is np.ndarray or arrays.is_torch_tensor(value)):
            return value  # leaves, lists, tuples: encode_state checks them
        stateful = kind is not dict and isinstance(value, Stateful) and not isinstance(value, Mapping)
        if kind is not dict and not stateful:
            return value
        # The encoder refuses these too, but only after this walk: it must not recurse first.
        if depth >= MAX_DEPTH:
            raise UnsupportedValueError(
                f"state nests deeper than {MAX_DEPTH} levels at {path or '<root>'}", path=path
            )
        if id(value) in active:
            raise UnsupportedValueError(f"state contains a reference cycle at {path or '<root>'}", path=path)
        active.add(id(value))
        try:
            if stateful:
                return walk(protocol.state_of(value), path, depth)
            if leaves.issuperset(map(type, value.values())):
                return value  # nothing to resolve in it (a module's state: 20,000 tensors)
            return {
                k: v if type(v) in leaves else walk(v, join_path(path, k), depth + 1)
                for k, v in value.items()
            }
        finally:
            active.discard(id(value))

    # Values kept as they are, tested before a call per value: most of a large state's values
    # are plain tensors (their exact types; subclasses take the call).
    torch = arrays.loaded_torch()
    leaves = frozenset(
        (*_PLAIN, np.ndarray, *((torch.Tensor, torch.nn.Parameter) if torch is not None else ()))
    )
    active.add(id(state))
    resolved = {k: v if type(v) in leaves else walk(v, join_path("", k), 1) for k, v in state.items()}
    # module.state_dict() is an OrderedDict: keep it one, as at any other depth of the tree.
    return OrderedDict(resolved) if type(state) is OrderedDict else resolved
