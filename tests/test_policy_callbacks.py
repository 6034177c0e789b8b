"""Callback, CallbackCollection, TrainerLike and TrainState."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptproto
from ckptproto import Callback, CallbackCollection, TrainerLike, TrainState


class Recorder(Callback[Any]):
    def __init__(self, log: list[str], tag: str) -> None:
        self.log, self.tag, self.count = log, tag, 0

    def post_train_step(self, result: Mapping[str, Any], batch_idx: int) -> None:
        self.count += 1
        self.log.append(f"{self.tag}:step{self.trainer.global_step}:{result['loss']}")

    def post_validation_epoch(self, result: Mapping[str, Any]) -> None:
        self.log.append(f"{self.tag}:val:{result['val_loss']}")

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.count = int(state_dict["count"])


def test_hooks_run_in_order_and_state_is_keyed_by_class(tmp_path: Path) -> None:
    log: list[str] = []
    callbacks = CallbackCollection([Recorder(log, "a"), Recorder(log, "b")])
    state = TrainState(models={"m": torch.nn.Linear(2, 2)}, callbacks=callbacks)
    assert isinstance(state, TrainerLike) and isinstance(state, ckptproto.Stateful)
    callbacks.bind(state)
    for hook in ("pre_fit", "pre_train_epoch", "pre_optimizer_step", "pre_validation_epoch", "post_fit"):
        getattr(callbacks, hook)()  # the base hooks do nothing, and exist
    callbacks.pre_train_step(0)
    callbacks.post_train_epoch()
    callbacks.on_exception(RuntimeError("x"))
    state.global_step = 1
    callbacks.post_train_step({"loss": 0.5}, 0)
    callbacks.post_validation_epoch({"val_loss": 0.25})
    assert log == ["a:step1:0.5", "b:step1:0.5", "a:val:0.25", "b:val:0.25"]
    assert callbacks.keys() == ["Recorder", "Recorder_1"]
    assert not callbacks.should_stop

    ckptproto.save(state, tmp_path / "c")
    assert ckptproto.load(tmp_path / "c")["trainer"]["callbacks"] == {
        "Recorder": {"count": 1},
        "Recorder_1": {"count": 1},
    }
    fresh = CallbackCollection([Recorder([], "a"), Recorder([], "b")])
    ckptproto.load_into(tmp_path / "c", TrainState(models={"m": torch.nn.Linear(2, 2)}, callbacks=fresh))
    assert [cb.count for cb in fresh] == [1, 1]  # type: ignore[attr-defined]


def test_should_stop_when_any_callback_asks() -> None:
    class Stopper(Callback[Any]):
        should_stop = True

    assert CallbackCollection([Callback(), Stopper()]).should_stop
    collection = CallbackCollection()
    collection.append(Callback())
    assert len(collection) == 1 and not collection.should_stop


def test_train_state_round_trip_and_strictness(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = TrainState(models={"model": model}, optimizers={"optimizer": opt}, dataloaders={"plain": [1, 2]})
    state.global_step, state.current_epoch = 5, 2
    ckptproto.save(state, tmp_path / "s")
    loaded = ckptproto.load(tmp_path / "s")
    assert set(loaded["dataloaders"]) == set()  # a loader without state_dict is skipped
    assert set(loaded["trainer"]) == {"global_step", "current_epoch", "callbacks", "rng"}

    model2 = torch.nn.Linear(3, 1)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    target = TrainState(models={"model": model2}, optimizers={"optimizer": opt2})
    ckptproto.load_into(tmp_path / "s", target)
    assert (target.global_step, target.current_epoch) == (5, 2)
    assert torch.equal(model2.weight, model.weight)
    assert torch.equal(
        opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"]
    )
    extra = TrainState(models={"model": torch.nn.Linear(3, 1), "other": torch.nn.Linear(1, 1)})
    with pytest.raises(ckptproto.StateMismatchError, match="other"):
        extra.load_state_dict(loaded)
    with pytest.raises(ckptproto.StateMismatchError, match="trainer"):
        extra.load_state_dict({"models": {}})
