"""Seeded Lightning bugs for the corpus (``examples/adapters/corpus.py``): each adapter is
the reference :mod:`examples.adapters.lightning_trainer` with one of its fixes undone."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from examples.adapters.lightning_trainer import (
    BATCH,
    N_SAMPLES,
    EpochShuffleSampler,
    LightningAdapter,
    LightningRun,
    SaveAtLastStep,
    TinyModule,
    check_checkpoint,
    dataset,
)


class _NoRng(TinyModule):
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        del checkpoint["rng"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        check_checkpoint(checkpoint, self)
        self.data.update(checkpoint["data"])  # the RNG is not restored


class _RngInOnLoadNoGenerator(TinyModule):
    """The usual recipe -- RNG set back in on_load_checkpoint -- with a loader that has no
    generator=: its iterator then draws its base seed from the global RNG after the restore."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        torch.set_rng_state(checkpoint["rng"]["torch"])
        self._resumed_rng = None

    def train_dataloader(self) -> Any:
        loader = super().train_dataloader()
        return type(loader)(dataset(), batch_size=BATCH, sampler=loader.sampler)


class _SetEpochSampler(EpochShuffleSampler):
    def set_epoch(self, epoch: int) -> None:
        self.state["epoch"] = epoch  # Lightning's epoch_progress.current.processed


class _UsesSetEpoch(TinyModule):
    def train_dataloader(self) -> Any:
        loader = super().train_dataloader()
        loader.sampler.__class__ = _SetEpochSampler
        return loader

    def on_train_epoch_start(self) -> None:
        pass


class _PlainLoader(TinyModule):
    def train_dataloader(self) -> Any:
        return DataLoader(
            dataset(),
            batch_size=BATCH,
            sampler=EpochShuffleSampler(N_SAMPLES, self.data),
            generator=torch.Generator().manual_seed(self.data["seed"]),
        )


class _SaveInBatchEnd(SaveAtLastStep):
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == trainer.max_steps:
            trainer.save_checkpoint(self.path)

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        pass


class EmaCallback(L.Callback):
    """Keeps an EMA of the weights for evaluation -- without state_dict(), so a resume
    restarts it from the current weights."""

    def __init__(self) -> None:
        self.ema: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        for name, p in module.named_parameters():
            old = self.ema.get(name, p.detach().clone())
            self.ema[name] = 0.9 * old + 0.1 * p.detach()


def _run(name: str, **attrs: Any) -> type[LightningAdapter]:
    run = type(f"{name}Run", (LightningRun,), attrs)
    return type(name, (LightningAdapter,), {"run_class": run, "__module__": __name__})


class _NoKeyCheck(TinyModule):
    checks_keys = False


LitRngNotSaved = _run("LitRngNotSaved", module_class=_NoRng)
LitLoaderDrawsAfterRestore = _run("LitLoaderDrawsAfterRestore", module_class=_RngInOnLoadNoGenerator)
LitSetEpochSampler = _run("LitSetEpochSampler", module_class=_UsesSetEpoch)
LitPlainDataLoader = _run("LitPlainDataLoader", module_class=_PlainLoader)
LitEmaCallbackNoState = _run("LitEmaCallbackNoState", extra_callbacks=(EmaCallback,))
LitSaveOnEpochLastBatch = _run("LitSaveOnEpochLastBatch", saver_class=_SaveInBatchEnd)
LitNoKeyCheck = _run("LitNoKeyCheck", module_class=_NoKeyCheck, checks_structure=False)
