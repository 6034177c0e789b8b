"""The conformance adapter for a Dream Trainer trainer (dream-trainer 0.3.0)::

    $ ckptproto conformance _dream_trainer_adapter:DreamTrainerAdapter   # tests/ on PYTHONPATH

The trainer under test is the ``DreamTrainer`` of tests/_dream_trainer_harness.py (a small
MLP, AdamW, StepLR, a checkpointed data stream and a named generator), on one CPU rank. The
suite saves and loads it through its own ``state_dict()``/``load_state_dict()``, exactly
what ckptproto.integrations.dream_trainer stores. ``train`` runs Dream Trainer's own epoch
(``perform_training_epoch``) with one optimizer step per epoch, and advances
``current_epoch`` as ``DreamTrainer.fit`` does between epochs.

Dream Trainer launches torch.distributed once per process (``DistributedWorld.launch``); the
trainers of one process share the world of the first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import _dream_trainer_harness as harness

_WORLD: Any = None


def _launched_world(trainer: Any) -> Any:
    global _WORLD
    if _WORLD is None:
        if os.environ["WORLD_SIZE"] == "1":
            # A port of our own: a process started by this one (the suite's check 5) inherits
            # the parent's MASTER_PORT, which the parent's store still listens on.
            os.environ["MASTER_PORT"] = str(harness.free_port())
        trainer.world.launch()
        _WORLD = trainer.world
    return _WORLD


class DreamTrainerAdapter:
    """create/train/fingerprint for a real ``DreamTrainer``."""

    steps_per_epoch = 1  # one optimizer step per Dream Trainer epoch (train_steps_per_epoch=1)
    # Dream Trainer's load_state_dict takes strict= but only logs keys it did not load
    # ("Keys in state_dict were not loaded"); it never refuses.
    strict_loading = False

    def __init__(self) -> None:
        os.environ.setdefault("WANDB_MODE", "disabled")
        os.environ.setdefault("WANDB_SILENT", "true")
        # One rank, as torchrun would describe it (DistributedWorld reads these).
        for key, value in (
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("LOCAL_WORLD_SIZE", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
        ):
            os.environ.setdefault(key, value)
        harness.install_workarounds()
        harness.cpu_device_workarounds()

    def create(self, seed: int) -> Any:
        from dream_trainer.utils.common import seed_everything

        trainer = harness.build_trainer(
            {"root": "", "storage": None, "seed": seed, "epochs": None, "steps_per_epoch": 1}
        )
        trainer.world = _launched_world(trainer)
        seed_everything(seed)
        # DreamTrainer._fit, from configure to pre_fit (no sanity validation: 0 steps).
        trainer.configure()
        trainer.setup()
        trainer._setup_trainer_metadata()
        trainer.post_setup()
        trainer.callbacks.post_setup()
        trainer.callbacks.pre_fit()
        trainer.pre_fit()
        trainer.last_loss = None
        return trainer

    def train(self, trainer: Any, steps: int) -> None:
        for _ in range(steps):  # DreamTrainer._fit's epoch loop body
            trainer.callbacks.pre_epoch()
            trainer.perform_training_epoch()
            trainer.callbacks.post_epoch()
            trainer.current_epoch += 1

    def fingerprint(self, trainer: Any) -> Mapping[str, Any]:
        import torch

        probe = torch.Generator()
        probe.set_state(trainer.noise_rng.get_state())
        return {
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
            "loss": None if trainer.last_loss is None else trainer.last_loss.clone(),
            "lr": [group["lr"] for group in trainer.optimizer.param_groups],
            "noise_rng": trainer.noise_rng.get_state(),
            "next_noise": torch.randn(3, generator=probe),
            "data_position": trainer.train_dataloader.position,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
        }
