"""Naming an RNG difference as "N extra/missing draws" when that is what it is.

::

    >>> import torch
    >>> a = torch.get_rng_state(); torch.rand(2); b = torch.get_rng_state()
    >>> rng_draws(a, b)
    'the RNG state is 2 draws (32-bit) ahead: 2 extra draws since the expected state'

Recognised: torch's CPU generator state (``torch.get_rng_state()``, a uint8 tensor of 5056
bytes), numpy bit generator states (``np.random.default_rng().bit_generator.state``, MT19937
and PCG64) and ``random.getstate()``. Two states of the same stream are compared by stepping
one towards the other, up to :data:`MAX_DRAWS` 32-bit (or 64-bit for PCG64) draws each way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptproto import arrays

MAX_DRAWS = 4096
_TORCH_CPU_STATE_BYTES = 5056  # the_initial_seed, left, seeded, next, state[624], normal cache


def rng_draws(expected: Any, got: Any) -> str | None:
    """A sentence saying how many draws separate two RNG states of one stream, or None when
    they are not recognisable RNG states or not within MAX_DRAWS of each other."""
    first, second = _as_stream(expected), _as_stream(got)
    if first is None or second is None or first[0] != second[0]:
        return None
    name, e, g = first[0], first[1], second[1]
    ahead = _distance(name, e, g)
    if ahead is not None:
        if ahead == 0:
            return None
        return (
            f"the {_LABEL[name]} state is {_n(ahead)} ahead: {_n(ahead, 'extra ')} since the expected state"
        )
    behind = _distance(name, g, e)
    if behind:
        return f"the {_LABEL[name]} state is {_n(behind)} behind: {_n(behind, 'missing ')}"
    return None


def _n(count: int, kind: str = "") -> str:
    return f"{count} {kind}draw{'' if count == 1 else 's'}"


_LABEL = {"mt19937": "RNG (MT19937, 32-bit draws)", "pcg64": "RNG (PCG64, 64-bit draws)"}


def _as_stream(value: Any) -> tuple[str, Any] | None:
    """("mt19937", (key, pos)) or ("pcg64", state dict) for a recognised RNG state."""
    if arrays.is_torch_tensor(value) or isinstance(value, np.ndarray):
        raw = _bytes(value)
        if raw is None or len(raw) != _TORCH_CPU_STATE_BYTES:
            return None
        left = int(np.frombuffer(raw[8:12], np.int32)[0])
        key = np.frombuffer(raw[24 : 24 + 624 * 8], np.uint64)
        if not 1 <= left <= 624 or int(key.max()) >= 2**32:
            return None
        return "mt19937", (key.astype(np.uint32), 625 - left)
    if isinstance(value, Mapping) and isinstance(value.get("state"), Mapping):
        state = value["state"]
        if value.get("bit_generator") == "MT19937" and "key" in state and "pos" in state:
            return "mt19937", (np.asarray(state["key"], dtype=np.uint32), int(state["pos"]))
        if value.get("bit_generator") == "PCG64" and "state" in state and "inc" in state:
            return "pcg64", dict(value)
        return None
    if isinstance(value, (tuple, list)) and len(value) == 3 and value[0] == 3:
        inner = value[1]
        if isinstance(inner, (tuple, list)) and len(inner) == 625:
            return "mt19937", (np.asarray(inner[:624], dtype=np.uint32), int(inner[624]))
    return None


def _bytes(value: Any) -> bytes | None:
    try:
        view, _owner = arrays.host_bytes(value)
    except (TypeError, ValueError, RuntimeError):
        return None
    return bytes(view)


def _distance(name: str, start: Any, target: Any) -> int | None:
    """How many draws take ``start`` to ``target`` (0..MAX_DRAWS), or None."""
    if name == "mt19937":
        key, pos = start
        goal_key, goal_pos = target
        bg = np.random.MT19937()
        bg.state = {"bit_generator": "MT19937", "state": {"key": key.copy(), "pos": pos}}
        for n in range(MAX_DRAWS + 1):
            now = bg.state["state"]
            if now["pos"] == goal_pos and np.array_equal(now["key"], goal_key):
                return n
            bg.random_raw(1)
        return None
    pcg = np.random.PCG64()
    pcg.state = start
    for n in range(MAX_DRAWS + 1):
        if pcg.state["state"] == target["state"]:
            return n
        pcg.random_raw(1)
    return None
