"""The protocol: what a checkpointable object is, and the canonical trainer state layout.

torch modules, optimizers and LR schedulers are ``Stateful`` as they are::

    model = torch.nn.Linear(2, 2)
    assert isinstance(model, ckptproto.Stateful)
    ckptproto.save(model, "ckpt/linear")
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ckptproto.errors import UnsupportedValueError

# Top-level sections of a trainer checkpoint (spec/PROTOCOL.md). Others are allowed.
TRAINER = "trainer"
MODELS = "models"
OPTIMIZERS = "optimizers"
SCHEDULERS = "schedulers"
DATALOADERS = "dataloaders"
CANONICAL_SECTIONS = (TRAINER, MODELS, OPTIMIZERS, SCHEDULERS, DATALOADERS)
GLOBAL_STEP = "global_step"
CURRENT_EPOCH = "current_epoch"
CALLBACKS = "callbacks"


@runtime_checkable
class Stateful(Protocol):
    """Anything that can hand out its state and take it back."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> Any: ...


def state_of(state_or_stateful: Stateful | Mapping[str, Any]) -> Mapping[str, Any]:
    """The state tree: ``obj.state_dict()`` for a Stateful, the mapping itself otherwise."""
    if isinstance(state_or_stateful, Mapping):
        return state_or_stateful
    if isinstance(state_or_stateful, Stateful):
        state = state_or_stateful.state_dict()
        if not isinstance(state, Mapping):
            raise UnsupportedValueError(
                f"{type(state_or_stateful).__qualname__}.state_dict() returned "
                f"{type(state).__qualname__}, not a dict"
            )
        return state
    raise UnsupportedValueError(
        f"cannot save a {type(state_or_stateful).__qualname__}: pass a dict or an object with "
        "state_dict()/load_state_dict()"
    )


def trainer_progress(state: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(global_step, current_epoch)`` from the canonical ``trainer`` section, if present."""
    trainer = state.get(TRAINER)
    if not isinstance(trainer, Mapping):
        return None, None
    step, epoch = trainer.get(GLOBAL_STEP), trainer.get(CURRENT_EPOCH)
    return (
        step if type(step) is int else None,
        epoch if type(epoch) is int else None,
    )
