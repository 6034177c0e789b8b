"""A tiny deterministic training setup driving the policy callbacks (shared by policy tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

from ckptproto import AsyncCheckpointCallback, Callback, CallbackCollection, TrainState, find_checkpoints
from ckptproto.io import async_save
from ckptproto.location import Location


class MyTrainer(TrainState):
    """The seed's ``MyTrainer(config); configure(); setup(); fit()`` shape over TrainState."""

    def __init__(
        self,
        callbacks: Sequence[Callback[Any]] = (),
        *,
        epochs: int = 2,
        n_samples: int = 24,
        batch_size: int = 4,
        val_metrics: Callable[[int], Mapping[str, Any]] | None = None,
        stop_after_steps: int | None = None,
        step_hook: Callable[[MyTrainer], None] | None = None,
    ) -> None:
        super().__init__(callbacks=CallbackCollection(callbacks))
        self.epochs = epochs
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.val_metrics = val_metrics
        self.stop_after_steps = stop_after_steps
        self.step_hook = step_hook
        self.seen_batches: list[list[int]] = []

    def configure(self) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.9)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(self.n_samples, 4, generator=g)
        self.y = self.x.sum(dim=1, keepdim=True)
        data = list(range(self.n_samples))
        # The sampler gets its own generator (saved in the loader state); the loader's own
        # generator only seeds workers, so resuming mid-epoch draws nothing from torch's
        # global RNG (which RNGState restores for the model's dropout).
        self.loader = StatefulDataLoader(
            data,
            batch_size=self.batch_size,
            sampler=RandomSampler(data, generator=torch.Generator().manual_seed(2)),
            generator=torch.Generator().manual_seed(3),
        )

    def setup(self) -> None:
        self.models = {"model": self.model}
        self.optimizers = {"optimizer": self.optimizer}
        self.schedulers = {"scheduler": self.scheduler}
        self.dataloaders = {"train": self.loader}
        self.callbacks.bind(self)

    def fit(self) -> None:
        cbs = self.callbacks
        cbs.pre_fit()
        try:
            while self.current_epoch < self.epochs:
                cbs.pre_train_epoch()
                for batch_idx, idx in enumerate(self.loader):
                    self.seen_batches.append([int(i) for i in idx])
                    cbs.pre_train_step(batch_idx)
                    loss = torch.nn.functional.mse_loss(self.model(self.x[idx]), self.y[idx])
                    self.optimizer.zero_grad()
                    loss.backward()
                    cbs.pre_optimizer_step()
                    self.optimizer.step()
                    self.scheduler.step()
                    self.global_step += 1
                    cbs.post_train_step({"loss": loss.item()}, batch_idx)
                    if self.step_hook is not None:
                        self.step_hook(self)
                    if cbs.should_stop or (
                        self.stop_after_steps is not None and self.global_step >= self.stop_after_steps
                    ):
                        break
                else:
                    self.current_epoch += 1
                    cbs.post_train_epoch()
                    if self.val_metrics is not None:
                        cbs.pre_validation_epoch()
                        cbs.post_validation_epoch(self.val_metrics(self.current_epoch))
                    continue
                break
        except BaseException as exc:
            cbs.on_exception(exc)
            raise
        cbs.post_fit()


def make_trainer(callbacks: Sequence[Callback[Any]] = (), **kwargs: Any) -> MyTrainer:
    trainer = MyTrainer(callbacks, **kwargs)
    trainer.configure()
    trainer.setup()
    return trainer


def weights(trainer: MyTrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.model.parameters()]


STEPS_PER_EPOCH = 2


def run_loop(
    callbacks: Sequence[Callback[Any]],
    vals: Sequence[float | None],
    *,
    monitor_key: str = "val_loss",
    losses: Sequence[float] | None = None,
) -> TrainState:
    """``len(vals)`` epochs of STEPS_PER_EPOCH steps, each followed by a validation reporting
    ``{monitor_key: val}`` (no validation for None), driven through the hooks as a loop does.
    Step ``n`` reports ``{"loss": losses[n - 1]}`` (default: ``n``)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    cbs = CallbackCollection(callbacks)
    state = TrainState(models={"model": model}, callbacks=cbs)
    cbs.bind(state)
    cbs.pre_fit()
    try:
        for val in vals:
            cbs.pre_train_epoch()
            for batch_idx in range(STEPS_PER_EPOCH):
                cbs.pre_optimizer_step()
                with torch.no_grad():
                    model.weight.add_(1.0)  # every step is a different state
                state.global_step += 1
                loss = float(state.global_step) if losses is None else losses[state.global_step - 1]
                cbs.post_train_step({"loss": loss}, batch_idx)
            state.current_epoch += 1
            cbs.post_train_epoch()
            if val is not None:
                cbs.pre_validation_epoch()
                cbs.post_validation_epoch({monitor_key: val, "val_acc": 1.0})
    except BaseException as exc:
        cbs.on_exception(exc)
        raise
    cbs.post_fit()
    return state


def on_disk(root: Location, monitor: str = "val_loss") -> dict[str, float | None]:
    """name -> the score its manifest claims."""
    return {r.name: r.metric for r in find_checkpoints(root, monitor=monitor)}


class WriteGate(Callback[Any]):
    """Holds every background write of the async callbacks until ``post_fit`` (put it first in
    the callback list), so their decisions are made while none of their saves is committed.
    Armed again at ``pre_fit`` (a resumed run)."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.made: list[AsyncCheckpointCallback] = []  # closed by hold_async_writes at the end

    def pre_fit(self) -> None:
        self.open.clear()

    def post_fit(self) -> None:
        self.open.set()

    def on_exception(self, exc: BaseException) -> None:
        self.open.set()


def hold_async_writes(monkeypatch: Any) -> Iterator[WriteGate]:
    """A fixture body: the writer thread of every AsyncSaver waits at the gate before it
    writes (the real write follows)."""
    gate = WriteGate()
    real = async_save.pipeline.run

    def held(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name == "ckptproto-async-write":
            assert gate.open.wait(60), "the gate was never opened"
        return real(*args, **kwargs)

    monkeypatch.setattr(async_save.pipeline, "run", held)
    yield gate
    gate.open.set()
    for cb in gate.made:
        cb.close()
