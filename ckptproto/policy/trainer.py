"""TrainState: a ready-made TrainerLike holding the canonical checkpoint sections."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckptproto.errors import StateMismatchError
from ckptproto.policy.callbacks import CallbackCollection
from ckptproto.policy.rng import RNGState
from ckptproto.protocol import CALLBACKS, CURRENT_EPOCH, GLOBAL_STEP

_SECTIONS = ("models", "optimizers", "schedulers", "dataloaders")


class TrainState:
    """The state of a training run in the canonical layout (``trainer``, ``models``,
    ``optimizers``, ``schedulers``, ``dataloaders``), with RNG state and callback state under
    ``trainer``. Use it as is from a plain loop, or subclass it as a trainer::

        state = TrainState(models={"model": model}, optimizers={"optimizer": opt},
                           dataloaders={"train": loader}, callbacks=callbacks)
        ckptproto.save(state, "ckpt/checkpoint_step_0")

    Each value of a section is a ``Stateful`` (module, optimizer, scheduler,
    ``StatefulDataLoader``); dataloaders without ``state_dict`` are skipped.
    """

    def __init__(
        self,
        *,
        models: Mapping[str, Any] | None = None,
        optimizers: Mapping[str, Any] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        dataloaders: Mapping[str, Any] | None = None,
        callbacks: CallbackCollection | None = None,
        rng: bool = True,
    ) -> None:
        self.global_step = 0
        self.current_epoch = 0
        self.models: dict[str, Any] = dict(models or {})
        self.optimizers: dict[str, Any] = dict(optimizers or {})
        self.schedulers: dict[str, Any] = dict(schedulers or {})
        self.dataloaders: dict[str, Any] = dict(dataloaders or {})
        self.callbacks = callbacks if callbacks is not None else CallbackCollection()
        self.rng = RNGState() if rng else None

    def _section(self, name: str) -> dict[str, Any]:
        items: dict[str, Any] = getattr(self, name)
        return {k: v for k, v in items.items() if hasattr(v, "state_dict")}

    def state_dict(self) -> dict[str, Any]:
        trainer: dict[str, Any] = {
            GLOBAL_STEP: self.global_step,
            CURRENT_EPOCH: self.current_epoch,
            CALLBACKS: self.callbacks.state_dict(),
        }
        if self.rng is not None:
            trainer["rng"] = self.rng.state_dict()
        state: dict[str, Any] = {"trainer": trainer}
        for name in _SECTIONS:
            state[name] = self._section(name)  # Statefuls: ckptproto.save resolves them
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        trainer = state_dict.get("trainer")
        if not isinstance(trainer, Mapping):
            raise StateMismatchError("trainer: missing from the checkpoint")
        self.global_step = int(trainer[GLOBAL_STEP])
        self.current_epoch = int(trainer[CURRENT_EPOCH])
        for name in _SECTIONS:
            section = state_dict.get(name, {})
            for key, obj in self._section(name).items():
                if key in section:
                    if name == "models":
                        obj.load_state_dict(section[key], strict=strict)
                    else:
                        obj.load_state_dict(section[key])
                elif strict:
                    raise StateMismatchError(f"{name}.{key}: missing from the checkpoint")
        if self.rng is not None and "rng" in trainer:
            self.rng.load_state_dict(trainer["rng"])
        self.callbacks.load_state_dict(trainer.get(CALLBACKS) or {})
