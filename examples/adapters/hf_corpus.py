"""Seeded Hugging Face ``Trainer`` bugs for the corpus (``examples/adapters/corpus.py``):
each adapter is the reference :mod:`examples.adapters.hf_trainer` with one fix undone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import Trainer

from examples.adapters.hf_trainer import HFAdapter, HFRun


class _OtherSeedRun(HFRun):
    """Saves the run's seed but resumes with its own TrainingArguments.seed."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        seed = self.seed
        super().load_state_dict(state)
        self.seed = seed


class _NoKeyCheckRun(HFRun):
    checks_keys = False


class _MaxStepsPerCallRun(HFRun):
    """Sets max_steps to where each train() call stops: the LR schedule is rebuilt from it."""

    def _trainer(self, stop_at: int) -> Trainer:
        trainer = super()._trainer(stop_at)
        trainer.args.max_steps = max(stop_at, 1)
        return trainer


def _adapter(name: str, run: type[HFRun]) -> type[HFAdapter]:
    return type(name, (HFAdapter,), {"run_class": run, "__module__": __name__})


HFResumesWithOtherSeed = _adapter("HFResumesWithOtherSeed", _OtherSeedRun)
HFNoKeyCheck = _adapter("HFNoKeyCheck", _NoKeyCheckRun)
HFMaxStepsPerCall = _adapter("HFMaxStepsPerCall", _MaxStepsPerCallRun)
