"""torch modules, optimizers and LR schedulers are Stateful as they are, and round trip exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same

import ckptproto


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int) -> None:
    for i in range(steps):
        loss = model(torch.full((3, 4), float(i + 1))).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(1.0)  # a flat metric: the plateau counter moves, then the lr drops
        elif sched is not None:
            sched.step()


def _warmup(epoch: int) -> float:  # module level: a LambdaLR state holds no lambda then
    return 1.0 / (epoch + 1)


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, _warmup),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1),
}
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "SGD": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
}


def test_torch_objects_are_stateful() -> None:
    model = _model()
    opt = OPTIMIZERS["AdamW"](model.parameters())
    assert isinstance(model, ckptproto.Stateful)
    assert isinstance(opt, ckptproto.Stateful)
    for make in SCHEDULERS.values():
        sched = make(OPTIMIZERS["SGD"](_model().parameters()))
        assert isinstance(sched, ckptproto.Stateful), type(sched)
    assert not isinstance({"a": 1}, ckptproto.Stateful)
    assert not isinstance(torch.zeros(1), ckptproto.Stateful)


def test_module_round_trip(tmp_ckpt: Path) -> None:
    model = _model()
    ckptproto.save(model, tmp_ckpt)
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    ckptproto.load_into(tmp_ckpt, fresh)
    assert_same(model.state_dict(), fresh.state_dict())
    assert_same(model.state_dict(), ckptproto.load(tmp_ckpt))


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("sched_name", sorted(SCHEDULERS))
def test_training_state_round_trip(opt_name: str, sched_name: str, tmp_ckpt: Path) -> None:
    model = _model()
    opt = OPTIMIZERS[opt_name](model.parameters())
    sched = SCHEDULERS[sched_name](opt)
    _train(model, opt, sched, 5)
    state = {
        "trainer": {"global_step": 5, "current_epoch": 1},
        "models": {"model": model},
        "optimizers": {"optimizer": opt},
        "schedulers": {"scheduler": sched},
    }
    info = ckptproto.save(state, tmp_ckpt)
    assert (info.step, info.epoch) == (5, 1)

    model2 = _model()
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)  # differ from the saved weights, so the load must write them
    opt2 = OPTIMIZERS[opt_name](model2.parameters())
    sched2 = SCHEDULERS[sched_name](opt2)
    target = {
        "models": {"model": model2},
        "optimizers": {"optimizer": opt2},
        "schedulers": {"scheduler": sched2},
    }
    ckptproto.load_into(tmp_ckpt, target, strict=False)  # no "trainer" in the target

    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())
    assert_same(sched.state_dict(), sched2.state_dict())
    # Training on from both gives the same next lr and the same weights.
    _train(model, opt, sched, 3)
    _train(model2, opt2, sched2, 3)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]
    assert_same(model.state_dict(), model2.state_dict())

    loaded = ckptproto.load(tmp_ckpt)
    assert loaded["trainer"] == {"global_step": 5, "current_epoch": 1}
    assert set(loaded["optimizers"]["optimizer"]["state"]) == set(range(4))  # int keys stay int


def test_state_dict_not_a_dict_is_refused(tmp_ckpt: Path) -> None:
    class Odd:
        def state_dict(self) -> Any:
            return [1, 2]

        def load_state_dict(self, sd: Any) -> None:
            pass

    with pytest.raises(ckptproto.UnsupportedValueError, match="not a dict"):
        ckptproto.save(Odd(), tmp_ckpt)
    assert not tmp_ckpt.exists()
