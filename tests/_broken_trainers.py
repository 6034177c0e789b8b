"""Deliberately broken trainers, each with one classic checkpointing bug, built on the numpy
reference trainer. ``tests/test_conformance_bite.py`` asserts each fails exactly the check
that names its bug. Importable as ``_broken_trainers:<Adapter>`` with tests/ on sys.path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from examples.adapters.numpy_trainer import (
    N_SAMPLES,
    NumpyAdapter,
    NumpyTrainer,
    ShuffledLoader,
    check_same_keys,
    key_paths,
)


def _merge(current: Mapping[str, Any], incoming: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with whatever ``incoming`` has for the same keys (the rest silently kept)."""
    merged = dict(current)
    for k, v in incoming.items():
        if k in current:
            merged[k] = (
                _merge(current[k], v) if isinstance(current[k], Mapping) and isinstance(v, Mapping) else v
            )
    return merged


class _Omitting(NumpyTrainer):
    """Leaves ``omit`` (a path of keys) out of its state; loading keeps the current value."""

    omit: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        node = state
        for key in self.omit[:-1]:
            node = node[key]
        del node[self.omit[-1]]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_same_keys(self.state_dict(), state)
        self.apply_state(_merge(super().state_dict(), state))


class ForgetsRngTrainer(_Omitting):
    omit = ("rng",)


class ForgetsDataPositionTrainer(_Omitting):
    omit = ("dataloaders", "train", "position")


class ForgetsSchedulerTrainer(_Omitting):
    omit = ("schedulers",)


class LiveViewTrainer(NumpyTrainer):
    """Hands out one dict it keeps refreshing in place, so an earlier snapshot changes."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self._view: dict[str, Any] = {}
        self._publish()

    def _publish(self) -> None:
        fresh = super().state_dict()
        for section, value in fresh.items():
            if isinstance(self._view.get(section), dict):
                self._view[section].update(value)
            else:
                self._view[section] = value

    def step(self) -> None:
        super().step()
        self._publish()

    def state_dict(self) -> dict[str, Any]:
        self._publish()
        return self._view

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self._publish()


class NonStrictTrainer(NumpyTrainer):
    """Loads whatever keys it recognises: missing ones keep their value, unknown ones vanish."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.apply_state(_merge(self.state_dict(), state))


_ORDER_CACHE: dict[int, np.ndarray[Any, Any]] = {}


class _CachedOrderLoader(ShuffledLoader):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.order(0)  # warm the cache while building the trainer

    def order(self, epoch: int) -> np.ndarray[Any, Any]:
        # The bug: the cache is keyed by epoch only, so the first trainer of a process decides
        # the data order of every later one -- which state_dict() never records.
        if epoch not in _ORDER_CACHE:
            _ORDER_CACHE[epoch] = np.random.default_rng([self.seed, epoch]).permutation(N_SAMPLES)
        return _ORDER_CACHE[epoch]


class GlobalStateTrainer(NumpyTrainer):
    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.loader = _CachedOrderLoader(seed)


class AliasingTrainer(NumpyTrainer):
    """Keeps the loaded arrays themselves, so training writes into the caller's state."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.params = dict(state["models"]["mlp"])


def _adapter(trainer: type[NumpyTrainer]) -> type[NumpyAdapter]:
    return type(
        f"{trainer.__name__}Adapter", (NumpyAdapter,), {"trainer_class": trainer, "__module__": __name__}
    )


ForgetsRng = _adapter(ForgetsRngTrainer)
ForgetsDataPosition = _adapter(ForgetsDataPositionTrainer)
ForgetsScheduler = _adapter(ForgetsSchedulerTrainer)
LiveView = _adapter(LiveViewTrainer)
NonStrict = _adapter(NonStrictTrainer)
GlobalState = _adapter(GlobalStateTrainer)
Aliasing = _adapter(AliasingTrainer)

# Checks that a resume bug fails besides resume_equivalence: the shadow check sees the same
# state, and every resume point of the sweep shows it.
RESUME = frozenset({"shadow_state", "resume_sweep"})
# adapter name -> the check that must fail, a word its report must mention, the other checks
# that may fail for the same bug
BUGS: dict[str, tuple[str, str, frozenset[str]]] = {
    "ForgetsRng": ("resume_equivalence", "fingerprint.dropout_rng", RESUME),
    "ForgetsDataPosition": ("resume_equivalence", "fingerprint.next_batch", RESUME),
    "ForgetsScheduler": ("resume_equivalence", "fingerprint.lr", RESUME),
    "LiveView": ("async_resume", "state.trainer.global_step", frozenset()),
    "NonStrict": ("strict_loading", "trainer", frozenset()),
    "GlobalState": ("resume_across_processes", "fingerprint.last_loss", frozenset()),
}
__all__ = ["BUGS", "key_paths"]


# Bugs for the other checks (tested against their own check only).


class NumpyScalarTrainer(NumpyTrainer):
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["trainer"]["best_loss"] = np.float64(self.last_loss)  # should be float(...)
        return state


class DrawingStateDictTrainer(NumpyTrainer):
    def state_dict(self) -> dict[str, Any]:
        self.dropout_rng.random()  # e.g. a random "checkpoint id": consumes the training RNG
        return super().state_dict()


class MiscountingTrainer(NumpyTrainer):
    def step(self) -> None:
        super().step()
        self.global_step += 1  # counts forward and backward as two steps


NumpyScalar = _adapter(NumpyScalarTrainer)
DrawingStateDict = _adapter(DrawingStateDictTrainer)
Miscounting = _adapter(MiscountingTrainer)


# Trainers for the suite's false positives and blind spots (tests/test_conformance_v2.py).


class LenientUnknownTrainer(NumpyTrainer):
    """Refuses missing keys but ignores unknown ones, as torch.optim's load_state_dict does:
    harmless, since nothing it ignores changes training."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = sorted(key_paths(self.state_dict()) - key_paths(state))
        if missing:
            raise KeyError(f"missing {missing}")
        self.apply_state(state)


class LenientPositionTrainer(NumpyTrainer):
    """Strict, except that a state without the data position keeps the current one."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        full = super().state_dict()
        if "position" not in state.get("dataloaders", {}).get("train", {"position": 0}):
            state = _merge(full, state)
            state["dataloaders"]["train"]["position"] = full["dataloaders"]["train"]["position"]
        super().load_state_dict(state)


class EmptiesGivenDictTrainer(NumpyTrainer):
    """Loads correctly, then clears the dict it was given (pops what it consumed)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if isinstance(state, dict):
            state.clear()


class _GlobalDropout:
    """Dropout masks from numpy's global RNG; the reported state is a constant (the bug)."""

    def __init__(self) -> None:
        self.bit_generator = np.random.default_rng(0).bit_generator

    def random(self, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        return np.random.random(shape)


class UnseededGlobalRngTrainer(NumpyTrainer):
    """Draws dropout from numpy's global RNG, which it neither seeds nor saves."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.dropout_rng = _GlobalDropout()  # type: ignore[assignment]


class EmaOutsideStateTrainer(NumpyTrainer):
    """Keeps an EMA of the weights (used for evaluation) outside state_dict()."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.ema = {k: v.copy() for k, v in self.params.items()}

    def step(self) -> None:
        super().step()
        for k, v in self.params.items():
            self.ema[k] = 0.9 * self.ema[k] + 0.1 * v


class EpochBoundaryTrainer(NumpyTrainer):
    """Resumed from a checkpoint written at an epoch's end, starts the next epoch twice."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if self.loader.position == 0 and self.global_step > 0:
            self.loader.epoch += 1


LenientUnknown = _adapter(LenientUnknownTrainer)
LenientPosition = _adapter(LenientPositionTrainer)
EmptiesGivenDict = _adapter(EmptiesGivenDictTrainer)
UnseededGlobalRng = _adapter(UnseededGlobalRngTrainer)
EmaOutsideState = _adapter(EmaOutsideStateTrainer)
EpochBoundary = _adapter(EpochBoundaryTrainer)
