"""Shared by the convert tests: a real trained model + optimizer + scheduler state, and an
exact, type-checking comparison of two state trees."""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
import torch


def trained_state(seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[2].weight.data = model[2].weight.data.to(torch.bfloat16).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return {
        "models": {"model": model.state_dict()},
        "optimizers": {"optimizer": opt.state_dict()},
        "schedulers": {"scheduler": sched.state_dict()},
        "trainer": {"global_step": 3, "current_epoch": 0},
    }


def rich_state(seed: int = 0) -> dict[str, Any]:
    """The trained state plus values that test exactness: tuples, OrderedDict, big ints,
    non-finite floats, bytes, numpy arrays, bf16/fp16/int/bool tensors and tied tensors."""
    state = trained_state(seed)
    shared = torch.arange(6, dtype=torch.float16).reshape(2, 3)
    state["extra"] = {
        "tuple": (1, "x", None, 2.5),
        "odict": collections.OrderedDict([("b", 1), ("a", [True, False])]),
        "big": 2**70,
        "nan": float("nan"),
        "inf": -math.inf,
        "bytes": b"\x00\xffcheckpoint",
        "numpy": np.arange(7, dtype=np.uint16),
        "bf16": torch.randn(3, 2).to(torch.bfloat16),
        "bool": torch.tensor([True, False, True]),
        "int64": torch.tensor([2**62, -1]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "tied_a": shared,
        "tied_b": shared,
        "int_keys": {0: "zero", 7: "seven"},
    }
    return state


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal values of equal types all the way down; tensors bit-identical, same dtype/shape."""
    assert type(a) is type(b), f"{path}: {type(a).__qualname__} != {type(b).__qualname__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        raw_a = a.detach().contiguous().reshape(-1).view(torch.uint8)
        raw_b = b.detach().contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(raw_a, raw_b), f"{path}: tensor bytes differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"
