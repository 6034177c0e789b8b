"""Background staging never commits a torn checkpoint: a tensor changed in place between the
save request and the end of its staging (a forgotten ``wait_staged()`` /
``pre_optimizer_step()``) fails that save loudly, naming the tensor and the missing call.

Staging is held at a real point of the pipeline (a gate), so the mutation lands inside the
window deterministically, on the real saver threads, real tensors and real optimizers."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _policy_helpers import make_trainer

import ckptproto
from ckptproto import AsyncCheckpointCallback, CheckpointError, CheckpointParameters, find_checkpoints
from ckptproto.io import staging


class _Gate:
    """Holds ``module.name`` (a real stage of the pipeline) until ``open()``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.event = threading.Event()
        self.entered = threading.Event()
        real = getattr(owner, name)

        def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.event.wait(30), "gate never opened"
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, gated)

    def open(self) -> None:
        self.event.set()


def _sgd_step(model: torch.nn.Module) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()


def _fused_adam_step(model: torch.nn.Module) -> None:
    # The fused kernel writes the parameters without bumping torch's version counter.
    opt = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()


def _data_write(model: torch.nn.Module) -> None:
    model.weight.data.mul_(2.0)  # .data: a fresh version counter, invisible to autograd


MUTATIONS: dict[str, Callable[[torch.nn.Module], None]] = {
    "sgd": _sgd_step,
    "fused_adam": _fused_adam_step,
    "data": _data_write,
}


@pytest.mark.parametrize("how", ["sgd"])
def test_a_mutation_before_background_staging_fails_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    gate = _Gate(monkeypatch, staging, "stage_state")
    model = torch.nn.Linear(4, 3)
    with ckptproto.AsyncSaver(staging="background") as saver:
        fut = saver.save({"models": {"model": model}}, tmp_path / "c")
        assert gate.entered.wait(30)
        MUTATIONS[how](model)  # the loop forgot fut.wait_staged()
        gate.open()
        with pytest.raises(
            CheckpointError, match=r"models\.model\.(weight|bias): the tensor was modified"
        ) as err:
            fut.result(timeout=30)
        assert "wait_staged()" in str(err.value) and "pre_optimizer_step()" in str(err.value)
        assert not (tmp_path / "c").exists() and saver.pool.stats.in_use == 0
        # The saver still works, and a loop that keeps the contract gets its checkpoint.
        fut = saver.save({"models": {"model": model}}, tmp_path / "c")
        fut.wait_staged()
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        MUTATIONS[how](model)
        fut.result(timeout=30)
    out = ckptproto.load(tmp_path / "c")["models"]["model"]
    assert all(torch.equal(out[k], v) for k, v in expected.items())


@pytest.mark.parametrize("how", sorted(MUTATIONS))
def test_a_mutation_while_staging_fails_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # The bytes were copied, then the state changed before staging was over (the save is
    # waiting for its copies to land): also those the version counter does not see.
    gate = _Gate(monkeypatch, staging.Staged, "synchronize")
    model = torch.nn.Linear(4, 3)
    with ckptproto.AsyncSaver(staging="background") as saver:
        fut = saver.save({"models": {"model": model}}, tmp_path / "c")
        assert gate.entered.wait(30)
        MUTATIONS[how](model)
        gate.open()
        with pytest.raises(CheckpointError, match=r"models\.model\.weight: the tensor was modified"):
            fut.result(timeout=30)
    assert not (tmp_path / "c").exists()


def test_numpy_arrays_changed_while_staging_fail_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate(monkeypatch, staging.Staged, "synchronize")
    a = np.arange(10.0)
    with ckptproto.AsyncSaver(staging="background") as saver:
        fut = saver.save({"extra": {"a": a}}, tmp_path / "c")
        assert gate.entered.wait(30)
        a[3] = -1.0
        gate.open()
        with pytest.raises(CheckpointError, match=r"extra\.a: the tensor was modified"):
            fut.result(timeout=30)


def test_nan_payloads_and_unchanged_views_are_not_a_false_alarm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = _Gate(monkeypatch, staging.Staged, "synchronize")
    w = torch.tensor([float("nan"), 1.0, -0.0, float("inf")])
    c = torch.tensor([1 + 2j, 3 - 4j])
    state = {"w": w, "t": w[1:].t(), "cc": c.conj(), "n": np.array([np.nan, 2.0]), "i": torch.ones(3).int()}
    with ckptproto.AsyncSaver(staging="background") as saver:
        fut = saver.save(state, tmp_path / "c")
        assert gate.entered.wait(30)
        w.sum()  # reads are fine
        gate.open()
        fut.result(timeout=30)
    out = ckptproto.load(tmp_path / "c")
    assert torch.equal(out["cc"], c.conj()) and torch.isnan(out["w"][0])


def test_callback_loop_that_forgets_pre_optimizer_step_gets_no_torn_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The async callback with background staging, in a loop that never calls
    # pre_optimizer_step(): staging of the step-2 save is held until the step-3 optimizer
    # step has run, which used to commit "checkpoint_step_2" holding step 3's weights.
    gate = _Gate(monkeypatch, staging, "stage_state")
    cb = AsyncCheckpointCallback(
        CheckpointParameters(root_dir=tmp_path, save_every_n_steps=2, keep_top_k=-1), staging="background"
    )
    snapshots: dict[int, list[torch.Tensor]] = {}

    def hook(t: Any) -> None:
        snapshots[t.global_step] = [p.detach().clone() for p in t.model.parameters()]
        if t.global_step == 3:
            gate.open()
        elif t.global_step != 2:  # every later save is staged before the next step (no race)
            for future, _record, _done in cb._futures:
                future.wait_staged()

    trainer = make_trainer([cb], epochs=1, step_hook=hook)
    trainer.callbacks.pre_optimizer_step = lambda: None  # the loop forgets the hook
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit()
    cb.close()
    failures = [str(w.message) for w in caught if "checkpoint_step_2" in str(w.message)]
    assert failures and "the tensor was modified in place" in failures[0], [str(w.message) for w in caught]
    assert "pre_optimizer_step()" in failures[0]
    records = find_checkpoints(tmp_path)
    assert 2 not in [r.step for r in records] and records
    for record in records:  # whatever was committed holds exactly the weights of its step
        saved = list(ckptproto.load(record.path)["models"]["model"].values())
        assert all(torch.equal(a, b) for a, b in zip(saved, snapshots[record.step or 0], strict=True))


def test_the_callback_stages_blocking_by_default(tmp_path: Path) -> None:
    # A loop that forgets pre_optimizer_step() loses the overlap, never consistency.
    cb = AsyncCheckpointCallback(CheckpointParameters(root_dir=tmp_path))
    assert cb.saver.staging == "blocking"
    cb.close()
