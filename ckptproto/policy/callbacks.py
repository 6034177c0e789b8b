"""Callbacks: the hooks a training loop calls, and the trainer protocol they see.

A loop drives them like this (``CheckpointManager`` does it for a plain loop; examples/demo.py by hand)::

    callbacks = CallbackCollection([CheckpointCallback(params)])
    callbacks.bind(state)                 # state: a TrainerLike (e.g. ckptproto.TrainState)
    callbacks.pre_fit()                   # resumes here
    try:
        for state.current_epoch in range(state.current_epoch, epochs):
            for batch_idx, batch in enumerate(loader):
                loss = model(batch).mean(); loss.backward()
                callbacks.pre_optimizer_step()
                opt.step(); opt.zero_grad(); state.global_step += 1
                callbacks.post_train_step({"loss": loss.item()}, batch_idx)
                if callbacks.should_stop: break
            ...
    except BaseException as exc:
        callbacks.on_exception(exc); raise
    callbacks.post_fit()
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable


@runtime_checkable
class TrainerLike(Protocol):
    """What checkpoint callbacks need from a trainer: a ``Stateful`` whose ``state_dict()``
    holds the canonical sections, with the loop's progress counters as attributes."""

    global_step: int
    current_epoch: int

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> Any: ...


T = TypeVar("T", bound=TrainerLike)


class Callback(Generic[T]):
    """Base class: override the hooks you need. ``self.trainer`` is set by ``bind``.

    ::

        class PrintLoss(Callback[TrainState]):
            def post_train_step(self, result, batch_idx):
                print(self.trainer.global_step, result["loss"])

    A callback with state (best scores, kept checkpoints) overrides ``state_dict`` /
    ``load_state_dict``; it is saved under ``trainer.callbacks`` and restored on resume.
    """

    trainer: T
    should_stop: bool = False

    def bind(self, trainer: T) -> None:
        self.trainer = trainer

    def pre_fit(self) -> None:
        """Before training starts (checkpoint callbacks resume here)."""

    def post_fit(self) -> None:
        """After training finished (async saves are completed here)."""

    def pre_train_epoch(self) -> None:
        """At the start of each training epoch."""

    def post_train_epoch(self, result: Mapping[str, Any] | None = None) -> None:
        """After each training epoch; the loop has already advanced ``current_epoch``."""

    def pre_train_step(self, batch_idx: int) -> None:
        """Before each training step."""

    def pre_optimizer_step(self) -> None:
        """Just before ``optimizer.step()`` (an async save finishes staging here)."""

    def post_train_step(self, result: Mapping[str, Any], batch_idx: int) -> None:
        """After each optimizer step; the loop has already advanced ``global_step``."""

    def pre_validation_epoch(self) -> None:
        """Before a validation pass."""

    def post_validation_epoch(self, result: Mapping[str, Any]) -> None:
        """After a validation pass, with its metrics (e.g. ``{"val_loss": 0.3}``)."""

    def on_exception(self, exc: BaseException) -> None:
        """The loop is failing with ``exc`` (pending saves are completed here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        del state_dict


class CallbackCollection:
    """An ordered list of callbacks; calling a hook on it calls it on each, in order.

    ::

        callbacks = CallbackCollection([CheckpointCallback(params), PrintLoss()])
        callbacks.bind(trainer)
        callbacks.post_validation_epoch({"val_loss": 0.25})

    Its ``state_dict()`` maps each callback's key (class name, ``_1``, ``_2`` … for repeats) to
    its state; a trainer stores it as ``trainer.callbacks``.
    """

    def __init__(self, callbacks: Iterable[Callback[Any]] = ()) -> None:
        self.callbacks: list[Callback[Any]] = list(callbacks)

    def __iter__(self) -> Iterator[Callback[Any]]:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def append(self, callback: Callback[Any]) -> None:
        self.callbacks.append(callback)

    def keys(self) -> list[str]:
        """The key each callback's state is saved under."""
        seen: dict[str, int] = {}
        keys = []
        for cb in self.callbacks:
            name = type(cb).__name__
            n = seen.get(name, 0)
            seen[name] = n + 1
            keys.append(name if n == 0 else f"{name}_{n}")
        return keys

    @property
    def should_stop(self) -> bool:
        """True when a callback asks the loop to stop (e.g. after a preemption save)."""
        return any(getattr(cb, "should_stop", False) for cb in self.callbacks)

    def bind(self, trainer: Any) -> None:
        for cb in self.callbacks:
            cb.bind(trainer)

    def pre_fit(self) -> None:
        for cb in self.callbacks:
            cb.pre_fit()

    def post_fit(self) -> None:
        for cb in self.callbacks:
            cb.post_fit()

    def pre_train_epoch(self) -> None:
        for cb in self.callbacks:
            cb.pre_train_epoch()

    def post_train_epoch(self, result: Mapping[str, Any] | None = None) -> None:
        for cb in self.callbacks:
            cb.post_train_epoch(result)

    def pre_train_step(self, batch_idx: int) -> None:
        for cb in self.callbacks:
            cb.pre_train_step(batch_idx)

    def pre_optimizer_step(self) -> None:
        for cb in self.callbacks:
            cb.pre_optimizer_step()

    def post_train_step(self, result: Mapping[str, Any], batch_idx: int) -> None:
        for cb in self.callbacks:
            cb.post_train_step(result, batch_idx)

    def pre_validation_epoch(self) -> None:
        for cb in self.callbacks:
            cb.pre_validation_epoch()

    def post_validation_epoch(self, result: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            cb.post_validation_epoch(result)

    def on_exception(self, exc: BaseException) -> None:
        for cb in self.callbacks:
            cb.on_exception(exc)

    def state_dict(self) -> dict[str, Any]:
        return {key: cb.state_dict() for key, cb in zip(self.keys(), self.callbacks, strict=True)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        for key, cb in zip(self.keys(), self.callbacks, strict=True):
            if key in state_dict:
                cb.load_state_dict(state_dict[key])
