"""One policy decision for all ranks: under ``torch.distributed`` rank 0 decides, every rank
follows.

Ranks see different values of an unreduced metric (each validates its own shard of the
data), so if each rank decided for itself whether to save, one rank could enter the
collective save alone and the job would hang. Every decision that leads to a collective (save
now or not, a checkpoint's score, which checkpoint to resume from) therefore goes through
:func:`from_rank0`::

    decision = from_rank0(self.should_save(), "should_save")   # rank 0's answer, on every rank

Outside ``torch.distributed`` (or with one rank) these functions cost nothing.
"""

from __future__ import annotations

from typing import Any, TypeVar

from ckptproto.io.coordinate import Group, resolve_group

T = TypeVar("T")


def _control() -> Any:
    group = resolve_group(None)
    if group is None:
        return None
    control = Group(group, None)
    return control if control.size > 1 else None


def gather(value: T, what: str) -> list[T]:
    """Every rank's ``value`` (a plain JSON value: the ranks exchange JSON, so a tuple comes
    back as a list), in rank order, on every rank. Every rank calls it at the same point."""
    control = _control()
    if control is None:
        return [value]
    answers = control.exchange({"value": value}, f"checkpoint policy: agreeing on {what}")
    return [answer["value"] for answer in answers]


def from_rank0(value: T, what: str) -> T:
    """Rank 0's ``value`` on every rank (``value`` itself outside torch.distributed)."""
    return gather(value, what)[0]
