"""The coordinator seam of the save and load pipelines: who else takes part, and how answers
are exchanged and failures settled.

A :class:`Solo` coordinator is a world of one (this process alone); a :class:`Group` runs the
same steps across the ranks of a ``torch.distributed`` process group. The pipelines
(``ckptproto.io.pipeline`` for saves, ``ckptproto.io.restore`` for loads) are written once
against this seam, so a check added to one path holds on every path::

    coord = coordinator(process_group=None, timeout=60)   # Solo() outside torch.distributed
    answers = coord.exchange({"ok": True}, "saving ckpt/step_5")
"""

from __future__ import annotations

import re
import sys
from datetime import timedelta
from typing import Any

from ckptproto.errors import CheckpointError, DistributedCheckpointError

LOCAL = "local"
"""``process_group=LOCAL``: this process alone, even when torch.distributed is initialised."""

DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch.distributed's own default for gloo
Timeout = timedelta | float | None


def as_timeout(timeout: Timeout) -> timedelta | None:
    """``timeout=`` of the top-level API as a timedelta (None: torch.distributed's default of
    30 minutes); ValueError for anything but a positive number of seconds or timedelta."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise ValueError(f"timeout must be seconds or a datetime.timedelta, got {timeout!r}")
    if not seconds > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return timedelta(seconds=seconds)


def resolve_group(process_group: Any) -> Any:
    """The process group a save/load runs on, or None for a single-process one: the given
    group; by default the world group when torch.distributed is initialised."""
    if isinstance(process_group, str) and process_group == LOCAL:
        return None
    if process_group is not None:
        return process_group
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD


def failure(exc: BaseException) -> dict[str, Any]:
    """The answer of a rank that failed: its error, named for the others."""
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


class Coordinator:
    """The ranks taking part in one save or load. ``exchange`` gathers every rank's payload;
    ``settle`` raises if any rank failed. Subclasses: :class:`Solo`, :class:`Group`."""

    rank: int = 0
    size: int = 1
    distributed: bool = False  # a torch.distributed group (DTensors allowed), even of size 1

    def exchange(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """Every rank's ``payload``, in rank order."""
        raise NotImplementedError

    def settle(
        self, answers: list[dict[str, Any]], what: str, local: BaseException | None, note: str = ""
    ) -> None:
        """Raise if any answer reports a failure (``local``: this rank's own, if any)."""
        raise NotImplementedError


class Solo(Coordinator):
    """A world of one: nothing to wait for, and this process's own error raised as it is."""

    def exchange(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        return [payload]

    def settle(
        self, answers: list[dict[str, Any]], what: str, local: BaseException | None, note: str = ""
    ) -> None:
        if local is not None:
            raise local
        if not answers[0].get("ok"):
            raise CheckpointError(f"{what}: {answers[0].get('error')}{note}")


_CONTROL_GROUPS: dict[tuple[int, ...], Any] = {}


class Group(Coordinator):
    """The ranks of a torch.distributed group: one status exchange at a time, each preceded
    by a ``monitored_barrier`` with ``timeout``, so a rank that died or hangs is named and the
    others give up in bounded time. The exchanges run on the group itself when it is a gloo
    group, else on a gloo group over the same ranks (created once per group)."""

    distributed = True

    def __init__(self, group: Any, timeout: Timeout) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.timeout = as_timeout(timeout) or DEFAULT_TIMEOUT
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise CheckpointError("this rank is not a member of the process group passed to ckptproto")
        self.group = group if dist.get_backend(group) == "gloo" else self._gloo_twin(group)

    def _gloo_twin(self, group: Any) -> Any:
        # monitored_barrier and CPU object collectives need gloo; NCCL groups get a gloo twin.
        ranks = tuple(self.dist.get_process_group_ranks(group))
        twin = _CONTROL_GROUPS.get(ranks)
        if twin is None:
            twin = self.dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
            _CONTROL_GROUPS[ranks] = twin
        return twin

    def exchange(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """Every rank's ``payload``, in group rank order; raises naming ranks that did not come."""
        if self.size == 1:
            return [payload]
        try:
            self.dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
            answers: list[Any] = [None] * self.size
            self.dist.all_gather_object(answers, payload, group=self.group)
        except RuntimeError as exc:  # DistBackendError too: a rank died, hangs or left
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            missing = missing_ranks(str(exc), self.rank)
            if missing:
                who = f"rank {', '.join(map(str, missing))} did not answer"
            else:  # not rank 0: it only sees the group break; rank 0's error names the rank
                who = "the group broke (a rank died, hung or failed; rank 0's error names it)"
            raise DistributedCheckpointError(
                f"{what}: {who} within {self.timeout.total_seconds():g} s: {text}",
                failed_ranks={r: "did not answer" for r in missing},
            ) from exc
        return answers

    def settle(
        self, answers: list[dict[str, Any]], what: str, local: BaseException | None, note: str = ""
    ) -> None:
        failed = {r: a["error"] for r, a in enumerate(answers) if not a.get("ok")}
        if not failed:
            return
        by_error: dict[str, list[int]] = {}
        for r, error in sorted(failed.items()):
            by_error.setdefault(error, []).append(r)
        lines = "; ".join(f"rank {', '.join(map(str, rs))}: {e}" for e, rs in by_error.items())
        ranks = ", ".join(map(str, sorted(failed)))
        raise DistributedCheckpointError(
            f"{what} failed on rank {ranks}{note} ({lines})", failed_ranks=failed
        ) from local


def missing_ranks(text: str, me: int) -> list[int]:
    """The ranks a monitored_barrier error on rank 0 lists as not having arrived."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass", text)
    if found is None:
        return []
    return sorted({int(r) for r in re.findall(r"\d+", found.group(1))} - {me})


def coordinator(process_group: Any, timeout: Timeout) -> Coordinator:
    """The coordinator of one save or load: a :class:`Group` under torch.distributed (the
    given group, by default the world group once initialised), else :class:`Solo`."""
    limit = as_timeout(timeout)  # checked even where nobody is waited for
    group = resolve_group(process_group)
    return Solo() if group is None else Group(group, limit)


def background_coordinator(process_group: Any, timeout: Timeout = None) -> Coordinator:
    """The coordinator of an AsyncSaver's background saves: under torch.distributed, on a gloo
    group of its own (the training loop's collectives run on the caller's group from another
    thread, and two threads must never interleave collectives on one group). Creating it is
    collective: every rank of the group constructs its AsyncSaver at the same point."""
    limit = as_timeout(timeout)
    group = resolve_group(process_group)
    if group is None:
        return Solo()
    import torch.distributed as dist

    own = dist.new_group(
        sorted(dist.get_process_group_ranks(group)), backend="gloo", use_local_synchronization=True
    )
    return Group(own, limit)
