"""CheckpointManager: a plain loop gets saves, retention, async staging, resume and preemption
from a `with` block and a batch iterator (examples/plain_loop.py uses it)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import RandomSampler

import ckptproto
from ckptproto import Callback, CheckpointManager, find_checkpoints
from ckptproto.location import Location

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "plain_loop.py"


class Setup:
    """A small model with dropout, AdamW, a shuffling stateful loader: resume must restore
    the weights, the optimizer, the loader position and the RNG to continue bit-exactly."""

    def __init__(self, root: Location, **policy: Any) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1)
        )
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=0.01)
        data = torch.randn(24, 5, generator=torch.Generator().manual_seed(1))
        self.loader = StatefulDataLoader(
            data, batch_size=4, sampler=RandomSampler(data, generator=torch.Generator().manual_seed(2))
        )
        self.ckpt = CheckpointManager(
            root,
            models={"model": self.model},
            optimizers={"opt": self.opt},
            dataloaders={"train": self.loader},
            **policy,
        )

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.model(batch[:, :4]), batch[:, 4:])

    def train(self, epochs: int, stop_at: int | None = None) -> int:
        """Train; ``stop_at`` interrupts the run there with an exception (a crash, not the end of
        fit: ending fit would save the final state, as ``save_last`` asks)."""
        try:
            with self.ckpt:
                for batch in self.ckpt.batches(self.loader, epochs=epochs):
                    loss = self.loss(batch)
                    self.opt.zero_grad()
                    loss.backward()
                    self.opt.step()
                    self.ckpt.log(loss=loss.item())
                    if self.ckpt.global_step == stop_at:
                        raise Interrupted
        except Interrupted:
            pass
        return self.ckpt.global_step


class Interrupted(Exception):
    """Stands for a crash in the middle of a run."""


def same_state(a: Setup, b: Setup) -> None:
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    for x, y in zip(a.opt.state.values(), b.opt.state.values(), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.parametrize(
    ("policy", "stop_at", "resume_step", "resume_epoch"),
    [
        ({"save_every_n_steps": 4}, 10, 8, 1),  # mid-epoch
        ({"save_every_n_steps": 3}, 7, 6, 0),  # the last batch of epoch 0, before it ended
        ({"save_every_n_epochs": 1}, 9, 6, 1),  # at the end of epoch 0
    ],
)
def test_interrupted_run_resumes_bit_exactly_and_says_where_from(
    checkpoint_root: Location,
    caplog: pytest.LogCaptureFixture,
    policy: dict[str, int],
    stop_at: int,
    resume_step: int,
    resume_epoch: int,
) -> None:
    """Dropout draws from torch's global RNG, and so does making a DataLoader iterator: the
    resumed run must draw exactly what the uninterrupted one did."""
    whole = Setup(checkpoint_root / "whole", **policy)
    assert whole.train(epochs=3) == 18
    first = Setup(checkpoint_root / "split", **policy)
    with caplog.at_level(logging.INFO, logger="ckptproto"):
        assert first.train(epochs=3, stop_at=stop_at) == stop_at
    assert first.ckpt.resumed_from is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    caplog.clear()
    second = Setup(checkpoint_root / "split", **policy)
    with caplog.at_level(logging.WARNING, logger="ckptproto"):
        assert second.train(epochs=3) == 18
    where = checkpoint_root / "split" / f"checkpoint_step_{resume_step}"
    assert second.ckpt.resumed_from == where
    warnings_seen = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings_seen == [f"ckptproto: resumed from {where} (step {resume_step}, epoch {resume_epoch})"]
    same_state(whole, second)


def test_plain_loop_example_is_preempted_at_step_7_and_resumes_there(tmp_path: Path) -> None:
    """The example's docstring, run as it says: two real processes, a real SIGTERM."""
    first = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path / "ck"), "7"], capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "stopped at step 7"
    assert [c.step for c in find_checkpoints(tmp_path / "ck")] == [7]
    second = subprocess.run(
        [sys.executable, str(EXAMPLE), str(tmp_path / "ck")], capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "stopped at step 16"
    resumed = [line for line in second.stderr.splitlines() if "resumed from" in line]
    assert resumed == [f"ckptproto: resumed from {tmp_path / 'ck' / 'checkpoint_step_7'} (step 7, epoch 0)"]
    # bit-exactness against an uninterrupted run: test_interrupted_run_resumes_bit_exactly...


class Recorder(Callback[Any]):
    """Records, at each hook the manager drives, the step and the first weight."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.events: list[tuple[str, int, float]] = []

    def _note(self, hook: str) -> None:
        self.events.append((hook, self.trainer.global_step, float(self.model.weight[0, 0].detach())))

    def pre_optimizer_step(self) -> None:
        self._note("pre_optimizer_step")

    def post_train_step(self, result: Any, batch_idx: int) -> None:
        self._note("post_train_step")


def test_the_staging_wait_runs_inside_optimizer_step_without_being_called(tmp_path: Path) -> None:
    """The loop never calls pre_optimizer_step: the manager hooks optimizer.step(), so every
    step is preceded by it, and each checkpoint holds the weights of the step it is named after."""
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 512)  # 1 MiB: background staging takes a while
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = Recorder(model)
    ckpt = CheckpointManager(
        tmp_path,
        models={"model": model},
        optimizers={"opt": opt},
        save_every_n_steps=1,
        keep_top_k=-1,
        callbacks=[recorder],
        staging="background",
    )
    weights = {}
    with ckpt:
        for _batch in ckpt.batches(range(6), epochs=1):
            before = float(model.weight[0, 0].detach())
            model(torch.ones(1, 512)).sum().backward()
            opt.step()
            opt.zero_grad()
            assert recorder.events[-1] == ("pre_optimizer_step", ckpt.global_step - 1, before)
            weights[ckpt.global_step] = model.weight.detach().clone()
    assert [e[0] for e in recorder.events] == ["pre_optimizer_step", "post_train_step"] * 6
    for step, weight in weights.items():
        saved = ckptproto.load(tmp_path / f"checkpoint_step_{step}")["models"]["model"]["weight"]
        assert torch.equal(saved, weight), step


def test_gradient_accumulation_counts_optimizer_steps_not_batches(tmp_path: Path) -> None:
    s = Setup(tmp_path, save_every_n_steps=2, keep_top_k=-1)
    with s.ckpt:
        for i, batch in enumerate(s.ckpt.batches(s.loader, epochs=2)):  # 6 batches an epoch
            (s.loss(batch) / 3).backward()
            if i % 3 == 2:  # one optimizer step every 3 batches
                s.opt.step()
                s.opt.zero_grad()
    assert s.ckpt.global_step == 4 and s.ckpt.current_epoch == 2
    assert sorted(c.step for c in find_checkpoints(tmp_path)) == [2, 4]


def test_epochs_and_validation_keep_the_top_k(checkpoint_root: Location) -> None:
    s = Setup(checkpoint_root, monitor="val_loss", keep_top_k=2, save_last=False)
    val_losses = iter([0.5, 0.2, 0.9, 0.1])
    with s.ckpt:
        for epoch in s.ckpt.epochs(4):
            for batch in s.ckpt.batches(s.loader):
                s.opt.zero_grad()
                s.loss(batch).backward()
                s.opt.step()
            assert s.ckpt.current_epoch == epoch + 1  # the epoch is counted when its batches end
            s.ckpt.validated(val_loss=next(val_losses))
    best = [(c.step, c.metric) for c in find_checkpoints(checkpoint_root, mode="best")]
    assert best == [(24, 0.1), (12, 0.2)]


def test_an_exception_finishes_pending_saves_and_propagates(checkpoint_root: Location) -> None:
    s = Setup(checkpoint_root, save_every_n_steps=3)
    with pytest.raises(ValueError, match="boom"), s.ckpt:
        for batch in s.ckpt.batches(s.loader, epochs=1):
            s.opt.zero_grad()
            s.loss(batch).backward()
            s.opt.step()
            if s.ckpt.global_step == 4:  # step 3 saved as its body ended
                raise ValueError("boom")
    ckptproto.verify(str(checkpoint_root / "checkpoint_step_3"))  # committed before the exception left


def test_misuse_is_loud(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    with pytest.raises(RuntimeError, match="outside `with manager:`"):
        next(iter(s.ckpt.batches(s.loader, epochs=1)))
    with s.ckpt, pytest.raises(RuntimeError, match="epoch 0 ended before its batches did"):
        for _epoch in s.ckpt.epochs(2):
            for _batch in s.ckpt.batches(s.loader):
                break
    with pytest.raises(RuntimeError, match="one `with` block"), s.ckpt:
        pass
    loader = StatefulDataLoader(list(range(4)), batch_size=2)
    other = CheckpointManager(tmp_path / "o", models={"model": s.model})
    with other, pytest.warns(RuntimeWarning, match="not in the manager's dataloaders"):
        list(other.batches(loader, epochs=1))


class PlainOptimizer:
    """An optimizer without torch's step hooks."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1

    def state_dict(self) -> dict[str, int]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.steps = state["steps"]


def test_optimizer_without_step_hooks_counts_every_batch(checkpoint_root: Location) -> None:
    opt = PlainOptimizer()
    ckpt = CheckpointManager(checkpoint_root, optimizers={"opt": opt}, save_every_n_steps=2, async_save=False)

    def batches() -> Iterator[int]:
        yield from range(5)

    with ckpt:
        for _ in ckpt.batches(batches(), epochs=1):
            opt.step()
    # Steps 2 and 4 by the interval, step 5 because fit ended (save_last).
    assert ckpt.global_step == 5 and ckpt.last_saved == checkpoint_root / "checkpoint_step_5"
    assert ckptproto.load(str(checkpoint_root / "checkpoint_step_5"))["optimizers"]["opt"] == {"steps": 5}
    assert ckptproto.read_info(str(checkpoint_root / "checkpoint_step_5")).step == 5


def test_a_checkpoint_that_does_not_fit_fails_the_with_block_loudly(checkpoint_root: Location) -> None:
    s = Setup(checkpoint_root, save_every_n_steps=2)
    s.train(epochs=1)
    wider = CheckpointManager(checkpoint_root, models={"model": torch.nn.Linear(4, 3)})
    with pytest.raises(ckptproto.StateMismatchError), wider:
        pytest.fail("the body must not run")
    with pytest.raises(RuntimeError, match="one `with` block"), wider:
        pass
