"""A Lightning 2.x ``Trainer`` with a LightningModule, checkpointing through
``CkptprotoCheckpointIO``, and its conformance adapter.

The trainer object the suite drives is a :class:`LightningRun`: ``train(steps)`` runs
``Trainer.fit`` up to ``global_step + steps``, resuming from the run's latest checkpoint, which
a callback writes inside the loop after the last batch (as ``ModelCheckpoint`` does; a
checkpoint written after ``fit`` returns has lost the dataloader's position). Its
``state_dict()`` is that checkpoint; ``load_state_dict`` makes the next ``fit`` resume from it.

What a Lightning user must add to pass the suite (all in :class:`TinyModule` below):

* the global RNG in the checkpoint: Lightning does not save it; dropout draws from it.
  ``on_save_checkpoint`` stores ``torch.get_rng_state()`` (numpy/random/CUDA too when used),
  and it is set back in ``on_train_start`` (or ``on_load_checkpoint`` -- but then only with a
  ``generator=`` for the loader: without one, Lightning's data setup after that hook draws the
  loader's base seed from the global RNG, 2 draws the straight run made long before);
* on the last batch of an epoch, the checkpoint written at the epoch's end, not in
  ``on_train_batch_end``: Lightning 2.6 resumes from the latter one epoch too far;
* data order from (seed, epoch) with the epoch counted by the sampler itself and saved
  (Lightning's ``set_epoch`` value drifts by one per mid-epoch resume), and a ``generator=``
  for the loader, whose iterator otherwise draws its base seed from the global RNG;
* a ``StatefulDataLoader`` (torchdata) instead of a ``DataLoader``, so a mid-epoch resume
  continues the epoch instead of restarting it, with ``generator=`` so its shuffle order is
  part of its state;
* a key check in ``on_load_checkpoint``: Lightning hands the optimizer and scheduler states to
  ``torch.optim``'s ``load_state_dict``, which accepts a state missing a parameter's moments or
  a scheduler field and silently trains on from fresh values;
* ``deterministic=True`` when you want bitwise resumes (this adapter sets it: the suite runs
  ckptproto's own format check with torch's defaults, whatever the trainer sets).

::

    $ ckptproto conformance examples.adapters.lightning_trainer:LightningAdapter
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Sampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

import ckptproto
from ckptproto.integrations.lightning import CkptprotoCheckpointIO
from examples.adapters.structure import check_structure

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


def check_checkpoint(checkpoint: Mapping[str, Any], module: L.LightningModule) -> None:
    """Raise KeyError unless the optimizer and scheduler states are complete: torch.optim's
    loading does not check (a state missing a parameter's moments restarts them silently)."""
    params = list(module.parameters())
    probe = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    sched = torch.optim.lr_scheduler.StepLR(probe, step_size=3)
    for state in checkpoint.get("optimizer_states", []):
        groups = state["param_groups"]
        if len(groups) != 1 or set(groups[0]) != set(probe.state_dict()["param_groups"][0]) | {"initial_lr"}:
            raise KeyError(f"optimizer param_groups do not fit: {sorted(map(str, groups[0]))}")
        per_param = state["state"]
        if per_param and (
            set(per_param) != set(range(len(params)))
            or any(set(v) != {"step", "exp_avg", "exp_avg_sq"} for v in per_param.values())
        ):
            raise KeyError("incomplete optimizer state")
    for state in checkpoint.get("lr_schedulers", []):
        if set(state) != set(sched.state_dict()):
            raise KeyError(f"scheduler state does not fit: {sorted(map(str, state))}")


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch), counting its own epochs in
    ``state`` (a dict the module saves in its checkpoint). Not Lightning's ``set_epoch``:
    Lightning 2.6 passes ``epoch_progress.current.processed``, which grows by one at every
    mid-epoch resume, so a resumed run shuffles the next epoch differently (the suite's
    resume_sweep caught it). Not ``StatefulDataLoader(shuffle=True, generator=...)`` either:
    resumed, it gave the next epoch another order than the straight run."""

    def __init__(self, n: int, state: dict[str, int]) -> None:
        self.n, self.state = n, state

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.state["seed"] * 1_000_003 + self.state["epoch"])
        yield from torch.randperm(self.n, generator=generator).tolist()

    def __len__(self) -> int:
        return self.n


class TinyModule(L.LightningModule):
    checks_keys = True  # on_load_checkpoint checks the optimizer and scheduler states

    def __init__(self, seed: int, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters("lr")
        self.data = {"seed": seed, "epoch": 0}  # the sampler's; saved in the checkpoint
        self._resumed_rng: torch.Tensor | None = None
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1)
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
        # generator=: without one, creating the loader's iterator draws its base seed from the
        # global RNG.
        return StatefulDataLoader(
            dataset(),
            batch_size=BATCH,
            sampler=EpochShuffleSampler(N_SAMPLES, self.data),
            generator=torch.Generator().manual_seed(self.data["seed"]),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        checkpoint["data"] = dict(self.data)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checks_keys:
            check_checkpoint(checkpoint, self)
        self.data.update(checkpoint["data"])  # train_dataloader() is called after this
        self._resumed_rng = checkpoint["rng"]["torch"]

    def on_train_epoch_start(self) -> None:
        self.data["epoch"] = self.current_epoch  # right after a resume too, unlike set_epoch's

    def on_train_start(self) -> None:
        # Not in on_load_checkpoint: without a generator= for the loader, setting up the data
        # after it draws 2 numbers from the global RNG that a straight run drew long before
        # its first batch (the suite reported "2 extra draws" per resume).
        if self._resumed_rng is not None:
            torch.set_rng_state(self._resumed_rng)
            self._resumed_rng = None


def make_trainer(max_steps: int, root: Path, callbacks: list[L.Callback]) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(root),
        plugins=[CkptprotoCheckpointIO()],
        callbacks=callbacks,
    )


class SaveAtLastStep(L.Callback):
    """Writes the run's checkpoint inside the loop, after the last batch of this fit -- but
    on the last batch of an epoch, at the epoch's end: Lightning 2.6 resumed from a checkpoint
    written in on_train_batch_end of an epoch's last batch starts one epoch too far (the
    suite's resume_sweep found it)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == trainer.max_steps and not trainer.is_last_batch:
            trainer.save_checkpoint(self.path)

    def on_train_epoch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == trainer.max_steps:
            trainer.save_checkpoint(self.path)


class LightningRun:
    """One training run, Stateful through its latest checkpoint."""

    module_class: type[TinyModule] = TinyModule
    saver_class: type[SaveAtLastStep] = SaveAtLastStep
    checks_structure = True  # load_state_dict refuses a checkpoint of another structure
    extra_callbacks: tuple[type[L.Callback], ...] = ()

    def __init__(self, seed: int) -> None:
        L.seed_everything(seed, verbose=False)
        self.module = self.module_class(seed)
        self.callbacks = [c() for c in self.extra_callbacks]
        self.root = Path(tempfile.mkdtemp(prefix="ckptproto-lightning-"))
        self.count = 0
        self.global_step = 0
        self.current_epoch = 0
        self.checkpoint = self._fit(0, resume=None)

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "root", ""), ignore_errors=True)

    def _fit(self, max_steps: int, resume: Path | None) -> Path:
        self.count += 1
        path = self.root / f"run-{self.count}.ckpt"
        trainer = make_trainer(max_steps, self.root, [self.saver_class(path), *self.callbacks])
        trainer.fit(self.module, ckpt_path=str(resume) if resume is not None else None)
        if max_steps == 0:  # no batch ran: save the initial state after fit
            trainer.save_checkpoint(path)
        self.global_step, self.current_epoch = trainer.global_step, trainer.current_epoch
        return path

    def train(self, steps: int) -> None:
        self.checkpoint = self._fit(self.global_step + steps, resume=self.checkpoint)

    def state_dict(self) -> dict[str, Any]:
        return ckptproto.load(self.checkpoint)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Lightning restores a checkpoint without "loops", without a dataloader's state or
        # with an empty optimizer list, and trains on differently: refuse those here.
        if self.checks_structure:
            check_structure(self.state_dict(), state, fresh=("optimizer_states.0.state",))
            check_checkpoint(state, self.module)
        self.count += 1
        path = self.root / f"loaded-{self.count}.ckpt"
        ckptproto.save(dict(state), path)
        # What the next fit restores; done now so that the fingerprint shows the loaded state.
        self.module.load_state_dict(CkptprotoCheckpointIO().load_checkpoint(path)["state_dict"])
        self.global_step, self.current_epoch = int(state["global_step"]), int(state["epoch"])
        self.checkpoint = path


class LightningAdapter:
    """Conformance adapter for :class:`LightningRun`."""

    steps_per_epoch = STEPS_PER_EPOCH
    resume_steps = (3, 4)  # resumes mid-epoch, crosses the epoch boundary at step 4
    check_budget_s = 30.0
    run_class: type[LightningRun] = LightningRun

    def create(self, seed: int) -> LightningRun:
        return self.run_class(seed)

    def train(self, trainer: LightningRun, steps: int) -> None:
        trainer.train(steps)

    def fingerprint(self, trainer: LightningRun) -> dict[str, Any]:
        return {
            "global_step": trainer.global_step,
            "current_epoch": trainer.current_epoch,
            "rng": torch.get_rng_state(),
            "last_loss": trainer.module.last_loss,
            "params": {k: v.detach().clone() for k, v in trainer.module.state_dict().items()},
        }
