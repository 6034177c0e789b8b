"""The coordinator seam of the save and load pipelines: who else takes part, and how answers
are exchanged and failures settled.

A :class:`Solo` coordinator is a world of one (this process alone); a :class:`Group` runs the
same steps across the ranks of a ``torch.distributed`` process group. The pipelines
(``ckptproto.io.pipeline`` for saves, ``ckptproto.io.restore`` for loads) are written once
against this seam, so a check added to one path holds on every path::

    coord = coordinator(process_group=None, timeout=60)   # Solo() outside torch.distributed
    answers = coord.exchange({"ok": True}, "saving ckpt/step_5")

Three steps, all through rank 0: :meth:`~Coordinator.share` (rank 0's payload to every rank),
:meth:`~Coordinator.collect` (every rank's payload to rank 0) and :meth:`~Coordinator.exchange`
(both: every rank's payload on every rank).
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any

from ckptproto.errors import CheckpointError, DistributedCheckpointError
from ckptproto.io import wire

logger = logging.getLogger("ckptproto")

LOCAL = "local"
"""``process_group=LOCAL``: this process alone, even when torch.distributed is initialised."""

DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch.distributed's own default for gloo
Timeout = timedelta | float | None

_TAG = 0x636B7074  # "ckpt": the control messages' tag, apart from a caller's own p2p (tag 0)


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


def failure(exc: BaseException, *, reason: str | None = None) -> dict[str, Any]:
    """The answer of a rank that failed: its error, named for the others. ``reason``: what
    ``failed_ranks`` says of it (by default the error itself)."""
    error = f"{type(exc).__name__}: {exc}"
    if reason is None:
        return {"ok": False, "error": error}
    return {"ok": False, "error": reason, "detail": str(exc)}


class Coordinator:
    """The ranks taking part in one save or load. ``share``, ``collect`` and ``exchange``
    move payloads (small dicts); ``verdict`` and ``conclude`` turn failures into one error
    raised alike on every rank. Subclasses: :class:`Solo`, :class:`Group`."""

    rank: int = 0
    size: int = 1
    distributed: bool = False  # a torch.distributed group (DTensors allowed), even of size 1

    def share(self, payload: Any, what: str, *, wait: bool = True) -> Any:
        """Rank 0's ``payload`` on every rank (the others pass None). ``wait=False``: rank 0
        goes on at once; its sends complete by its next :meth:`collect`."""
        raise NotImplementedError

    def collect(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """On rank 0, every rank's ``payload`` in rank order (a rank that did not answer within
        the timeout: a failed answer saying so); on the others, an empty list."""
        raise NotImplementedError

    def exchange(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """Every rank's ``payload``, in rank order, on every rank; raises naming ranks that did
        not answer."""
        raise NotImplementedError

    def verdict(self, answers: list[dict[str, Any]], what: str, note: str = "") -> dict[str, Any] | None:
        """The failure that ``answers`` report, as a payload for :meth:`conclude` (None: none)."""
        failed = {r: a["error"] for r, a in enumerate(answers) if not a.get("ok")}
        if not failed:
            return None
        parts = []
        missing = [r for r, a in enumerate(answers) if "gone" in a]
        if missing:
            parts.append(
                f"rank {_ranks(missing)} did not answer within {self.timeout_s():g} s: "
                f"{answers[missing[0]]['gone']}"
            )
        by_error: dict[str, list[int]] = {}
        for r, a in sorted(enumerate(answers)):
            if not a.get("ok") and r not in missing:
                by_error.setdefault(a.get("detail", a["error"]), []).append(r)
        if by_error:
            lines = "; ".join(f"rank {_ranks(rs)}: {e}" for e, rs in by_error.items())
            ranks = sorted(r for rs in by_error.values() for r in rs)
            parts.append(f"failed on rank {_ranks(ranks)}{note} ({lines})")
        elif note:
            parts[-1] += note
        return {"ok": False, "error": f"{what}: {'; '.join(parts)}", "failed": failed}

    def conclude(self, outcome: dict[str, Any], local: BaseException | None) -> None:
        """Raise the failure of a :meth:`verdict` (``local``: this rank's own error, if any)."""
        raise NotImplementedError

    def settle(
        self, answers: list[dict[str, Any]], what: str, local: BaseException | None, note: str = ""
    ) -> None:
        """Raise if any answer reports a failure (``local``: this rank's own, if any)."""
        outcome = self.verdict(answers, what, note)
        if outcome is not None or local is not None:
            self.conclude(outcome or {"ok": False, "error": what, "failed": {}}, local)

    def timeout_s(self) -> float:
        return DEFAULT_TIMEOUT.total_seconds()


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks))


class Solo(Coordinator):
    """A world of one: nothing to wait for, and this process's own error raised as it is."""

    def share(self, payload: Any, what: str, *, wait: bool = True) -> Any:
        assert payload is not None
        return payload

    def collect(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        return [payload]

    def exchange(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        return [payload]

    def conclude(self, outcome: dict[str, Any], local: BaseException | None) -> None:
        if local is not None:
            raise local
        if not outcome.get("ok"):
            raise CheckpointError(outcome["error"])


_CONTROL_GROUPS: dict[tuple[int, ...], Any] = {}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Group(Coordinator):
    """The ranks of a torch.distributed group. Every message goes through rank 0 as
    point-to-point sends and receives (dicts as JSON, never written anywhere), each waited for
    at most ``timeout``: a rank that died or hangs is named, and the others give up in bounded
    time. The messages travel on the group itself when it is a gloo group, else on a gloo
    group over the same ranks (created once per group)."""

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
        # Ranks that did not answer rank 0: unreachable on this group from then on (a peer
        # that died; after a timeout gloo closes all of this rank's connections).
        self.gone: dict[int, str] = {}
        self._pending: list[tuple[int, Any]] = []  # rank 0's sends of share(wait=False)
        self._keep: list[Any] = []  # the tensors those sends read from
        self._answered = False  # this rank sent rank 0 its part of a collect

    def timeout_s(self) -> float:
        return self.timeout.total_seconds()

    def _gloo_twin(self, group: Any) -> Any:
        # CPU point-to-point needs gloo; NCCL groups get a gloo twin.
        ranks = tuple(self.dist.get_process_group_ranks(group))
        twin = _CONTROL_GROUPS.get(ranks)
        if twin is None:
            twin = self.dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
            _CONTROL_GROUPS[ranks] = twin
        return twin

    def _wait(self, works: list[tuple[int, Any]], deadline: float) -> dict[int, str]:
        """Wait for each (peer, work) until ``deadline``; the peers whose work failed."""
        failed: dict[int, str] = {}
        for peer, work in works:
            if peer in failed:
                continue
            left = max(deadline - time.monotonic(), 0.001)
            try:
                work.wait(timedelta(seconds=left))
            except RuntimeError as exc:  # DistBackendError too: timed out, or the peer died
                failed[peer] = _first_line(exc)
        return failed

    def _mark(self, lost: dict[int, str]) -> None:
        for peer, text in lost.items():
            self.gone.setdefault(peer, text)  # the first failure says why; later ones echo it

    def _send(self, parts: list[Any], peer: int) -> list[tuple[int, Any]]:
        return [(peer, self.group.send([part], peer, _TAG)) for part in parts]

    def _lost(self, what: str, text: str, deadline: float, waited: float) -> DistributedCheckpointError:
        """On a rank other than 0: rank 0 is out of reach. Silent until the deadline, it is
        named; a connection closed sooner does not say whether rank 0 died or gave up on
        another rank (gloo closes all of a rank's connections after one timed out), and rank
        0's own error names the rank that failed."""
        if time.monotonic() >= deadline:
            return DistributedCheckpointError(
                f"{what}: rank 0 did not answer within {waited:g} s: {text}",
                failed_ranks={0: "did not answer"},
            )
        return DistributedCheckpointError(
            f"{what}: the group broke (rank 0 died, or gave up on a rank that died, hung or "
            f"failed; rank 0's error names it): {text}"
        )

    def share(self, payload: Any, what: str, *, wait: bool = True) -> Any:
        if self.size == 1:
            assert payload is not None
            return payload
        if self.rank != 0:
            return self._receive(what)
        assert payload is not None
        parts = wire.pack(payload)
        works: list[tuple[int, Any]] = []
        for peer in range(1, self.size):
            if peer in self.gone:
                continue
            try:
                works += self._send(parts, peer)
            except RuntimeError as exc:  # the connection is closed already
                self._mark({peer: _first_line(exc)})
        if wait:
            lost = self._wait(works, time.monotonic() + self.timeout_s())
            self._mark(lost)
            for peer, text in lost.items():  # rank 0's own outcome stands; that rank raises itself
                logger.warning(
                    "%s: rank %d did not take rank 0's answer within %g s: %s",
                    what,
                    peer,
                    self.timeout_s(),
                    text,
                )
        else:
            self._pending += works
            self._keep.append(parts)
        return payload

    def _receive(self, what: str) -> Any:
        """On a rank other than 0: the next payload rank 0 sends."""
        import torch

        # After a collect, rank 0 may first wait up to the timeout for the slowest rank, then
        # tell this one who did not answer: wait for that answer as long again.
        patience = self.timeout * (2 if self._answered else 1)
        self._answered = False
        deadline = time.monotonic() + patience.total_seconds()
        slot = torch.empty(wire.SLOT, dtype=torch.uint8)
        try:
            self.group.recv([slot], 0, _TAG).wait(patience)
            rest = wire.rest(slot)
            if rest is not None:
                self.group.recv([rest], 0, _TAG).wait(
                    timedelta(seconds=max(deadline - time.monotonic(), 0.001))
                )
        except RuntimeError as exc:
            raise self._lost(what, _first_line(exc), deadline, patience.total_seconds()) from exc
        return wire.unpack(slot, rest)

    def collect(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        if self.size == 1:
            return [payload]
        deadline = time.monotonic() + self.timeout_s()
        if self.rank != 0:
            try:
                works = self._send(wire.pack(payload), 0)
            except RuntimeError as exc:
                raise self._lost(what, _first_line(exc), deadline, self.timeout_s()) from exc
            for text in self._wait(works, deadline).values():
                raise self._lost(what, text, deadline, self.timeout_s())
            self._answered = True
            return []
        return self._gather(payload, deadline)

    def _gather(self, payload: dict[str, Any], deadline: float) -> list[dict[str, Any]]:
        import torch

        # Receives first, so no rank's send waits on rank 0 while rank 0 waits on another's.
        slots: dict[int, Any] = {}
        works: list[tuple[int, Any]] = []
        for peer in range(1, self.size):
            if peer in self.gone:
                continue
            slots[peer] = torch.empty(wire.SLOT, dtype=torch.uint8)
            try:
                works.append((peer, self.group.recv([slots[peer]], peer, _TAG)))
            except RuntimeError as exc:
                self._mark({peer: _first_line(exc)})
        # Then rank 0's sends of an earlier share(wait=False). After a timeout gloo closes all
        # of this rank's connections: every rank not heard from by then fails at once (the
        # deadline is common, so they too did not answer in time).
        self._mark(self._wait(self._pending, deadline))
        self._pending, self._keep = [], []
        self._mark(self._wait(works, deadline))
        rests: dict[int, Any] = {}
        more: list[tuple[int, Any]] = []
        for peer, slot in slots.items():
            if peer in self.gone:
                continue
            rests[peer] = wire.rest(slot)
            if rests[peer] is not None:
                try:
                    more.append((peer, self.group.recv([rests[peer]], peer, _TAG)))
                except RuntimeError as exc:
                    self._mark({peer: _first_line(exc)})
        self._mark(self._wait(more, deadline))
        answers = [payload]
        for peer in range(1, self.size):
            if peer in self.gone:
                answers.append({"ok": False, "error": "did not answer", "gone": self.gone[peer]})
            else:
                answers.append(wire.unpack(slots[peer], rests[peer]))
        return answers

    def exchange(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        if self.size == 1:
            return [payload]
        collected = self.collect(payload, what)  # on rank 0 only
        answers: list[dict[str, Any]] = self.share(collected if self.rank == 0 else None, what)
        missing = {r: a["gone"] for r, a in enumerate(answers) if "gone" in a}
        if missing:
            first = min(missing)
            raise DistributedCheckpointError(
                f"{what}: rank {_ranks(sorted(missing))} did not answer within {self.timeout_s():g} s: "
                f"{missing[first]}",
                failed_ranks={r: "did not answer" for r in missing},
            )
        return answers

    def conclude(self, outcome: dict[str, Any], local: BaseException | None) -> None:
        if outcome.get("ok"):
            return
        failed = {int(r): e for r, e in outcome["failed"].items()}  # JSON keys are strings
        raise DistributedCheckpointError(outcome["error"], failed_ranks=failed) from local


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
