"""A tiny LightningModule trained by a real ``lightning.Trainer`` whose checkpoints go through
``CkptprotoCheckpointIO``, and its conformance adapter (``ckptproto.conformance``)::

    $ ckptproto conformance _lightning_adapter:LightningAdapter     # with tests/ on PYTHONPATH

The adapter's trainer object is a ``LightningRun``: training advances it with ``Trainer.fit``
(resuming from the plugin's last checkpoint), its ``state_dict()`` is exactly what the plugin
wrote for that checkpoint, and ``load_state_dict`` makes the next ``fit`` resume from it.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import ckptproto
from ckptproto.errors import StateMismatchError
from ckptproto.integrations.lightning import CkptprotoCheckpointIO

N_SAMPLES, BATCH = 16, 4
STEPS_PER_EPOCH = N_SAMPLES // BATCH

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="lightning")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*set_vital.*")


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 3, generator=g)
    return TensorDataset(x, x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(N_SAMPLES, 1, generator=g))


class TinyModule(L.LightningModule):
    def __init__(self, lr: float = 0.05, hidden: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
        )
        self.last_loss = float("nan")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.last_loss = float(loss.detach())
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> StatefulDataLoader:
        # Stateful, so Lightning saves its position and a mid-epoch resume continues where
        # it stopped (a plain DataLoader restarts the epoch from its first batch).
        return StatefulDataLoader(dataset(), batch_size=BATCH, shuffle=False)


def make_trainer(max_steps: int, root: Path, **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=str(root),
        plugins=[kwargs.pop("plugin", CkptprotoCheckpointIO())],
        **kwargs,
    )


class SaveAtLastStep(L.Callback):
    """Saves (through the trainer's CheckpointIO) inside the loop after the last step, as
    ModelCheckpoint does: a checkpoint taken after ``fit`` returns has lost the dataloader's
    position, so resuming from it would replay the epoch's first batches."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == trainer.max_steps:
            trainer.save_checkpoint(self.path)


class LightningRun:
    """One training run; Stateful through the plugin's checkpoints."""

    def __init__(self, seed: int) -> None:
        L.seed_everything(seed, verbose=False)
        self.module = TinyModule()
        self.root = Path(tempfile.mkdtemp(prefix="ckptproto-lightning-"))
        self.count = 0
        self.checkpoint = self._fit(0, resume=None)

    def _fit(self, max_steps: int, resume: Path | None) -> Path:
        self.count += 1
        path = self.root / f"run-{self.count}.ckpt"
        saver = SaveAtLastStep(path)
        trainer = make_trainer(max_steps, self.root, enable_checkpointing=False, callbacks=[saver])
        trainer.fit(self.module, ckpt_path=str(resume) if resume is not None else None)
        if max_steps == 0:  # no batch ran: save the initial state after fit
            trainer.save_checkpoint(path)
        self.global_step = trainer.global_step
        return path

    def train(self, steps: int) -> None:
        self.checkpoint = self._fit(self.global_step + steps, resume=self.checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return ckptproto.load(self.checkpoint)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _same_keys(self.state_dict(), state, "")
        self.count += 1
        path = self.root / f"loaded-{self.count}.ckpt"
        ckptproto.save(dict(state), path)
        # What Lightning would do on resume, so the fingerprint reflects the loaded state now.
        self.module.load_state_dict(CkptprotoCheckpointIO().load_checkpoint(path)["state_dict"])
        self.global_step = int(state["global_step"])
        self.checkpoint = path


def _same_keys(expected: Any, got: Any, path: str) -> None:
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping):
            raise StateMismatchError(f"{path}: expected a dict")
        missing = set(expected) - set(got)
        unexpected = set(got) - set(expected)
        if missing or unexpected:
            raise StateMismatchError(
                f"{path or '<root>'}: missing {sorted(map(str, missing))}, unexpected {sorted(map(str, unexpected))}"
            )
        for key in expected:
            _same_keys(expected[key], got[key], f"{path}.{key}" if path else str(key))


class LightningAdapter:
    """Conformance adapter: a LightningModule trained through CkptprotoCheckpointIO."""

    steps_per_epoch = STEPS_PER_EPOCH
    resume_steps = (3, 4)  # resumes mid-epoch and crosses the epoch boundary at step 4

    def create(self, seed: int) -> LightningRun:
        return LightningRun(seed)

    def train(self, trainer: LightningRun, steps: int) -> None:
        trainer.train(steps)

    def fingerprint(self, trainer: LightningRun) -> dict[str, Any]:
        return {
            "params": {k: v.detach().clone() for k, v in trainer.module.state_dict().items()},
            "global_step": trainer.global_step,
        }
