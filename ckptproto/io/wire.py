"""How the coordinator's control messages travel between ranks: a JSON payload framed in
uint8 tensors (a fixed first slot holding its length and start, the rest, if any, in a
second tensor of exactly its size), for point-to-point sends and receives::

    parts = pack({"ok": True})                 # [slot] or [slot, rest]
    extra = rest(parts[0])                     # the receiver's buffer for the second part
    assert unpack(parts[0], parts[1] if len(parts) > 1 else None) == {"ok": True}

JSON, not pickle: nothing received is ever executed, even from a rank that is not one of ours.
"""

from __future__ import annotations

import json
from typing import Any

SLOT = 16 * 1024  # every message's first part; a larger payload follows in a second one
LENGTH = 8  # bytes of the slot holding the payload's length


def _scalar(value: Any) -> Any:
    """A one-element tensor or array (a metric, say) as its Python number; anything else that
    JSON does not take is refused."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    raise TypeError(
        f"a {type(value).__qualname__} cannot travel between ranks: send None, bools, numbers, "
        "strings, lists and dicts with string keys"
    )


def pack(payload: Any) -> list[Any]:
    """``payload`` (a JSON value: tuples arrive as lists, dict keys must be strings) as the
    tensors that carry it: one slot of ``SLOT`` bytes (its length, then its start), and the
    rest, if any, in a second tensor of exactly its size. JSON, not pickle: nothing received
    is ever executed, even from a rank that is not one of ours."""
    import torch

    data = json.dumps(payload, default=_scalar, separators=(",", ":")).encode()
    slot = bytearray(SLOT)
    slot[:LENGTH] = len(data).to_bytes(LENGTH, "little")
    head = data[: SLOT - LENGTH]
    slot[LENGTH : LENGTH + len(head)] = head
    parts = [torch.frombuffer(slot, dtype=torch.uint8)]
    if len(data) > len(head):
        parts.append(torch.frombuffer(bytearray(data[len(head) :]), dtype=torch.uint8))
    return parts


def _length(slot: Any) -> int:
    return int.from_bytes(slot[:LENGTH].numpy().tobytes(), "little")


def rest(slot: Any) -> Any:
    """The tensor that receives the second part of the payload ``slot`` begins, or None."""
    import torch

    extra = _length(slot) - (SLOT - LENGTH)
    return torch.empty(extra, dtype=torch.uint8) if extra > 0 else None


def unpack(slot: Any, rest: Any) -> Any:
    data = slot[LENGTH : LENGTH + _length(slot)].numpy().tobytes()
    if rest is not None:
        data += rest.numpy().tobytes()
    return json.loads(data)
