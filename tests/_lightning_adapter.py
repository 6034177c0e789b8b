"""A tiny LightningModule trained by a real ``lightning.Trainer`` whose checkpoints go through
``CkptprotoCheckpointIO`` (tests/test_lightning.py). The Lightning conformance adapter is the
reference one in examples/adapters/lightning_trainer.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptproto.integrations.lightning import CkptprotoCheckpointIO
from examples.adapters.lightning_trainer import BATCH, dataset  # also quiets Lightning's logs


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
