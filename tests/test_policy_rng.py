"""RNGState and stateful dataloaders: a restored run draws the same numbers and batches."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import ckptproto
from ckptproto import RNGState, TrainState


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    draws()
    ckptproto.save({"rng": RNGState()}, tmp_path / "rng")
    expected = [draws() for _ in range(3)]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    ckptproto.load_into(tmp_path / "rng", {"rng": RNGState()})
    assert [draws() for _ in range(3)] == expected
    state = ckptproto.load(tmp_path / "rng")["rng"]
    assert set(state) >= {"python", "numpy", "torch"}
    assert state["numpy"]["keys"].dtype == np.uint32


def test_rng_state_gauss_cache(tmp_path: Path) -> None:
    random.gauss(0, 1)  # leaves a cached second value
    np.random.standard_normal()
    rng = RNGState()
    saved = rng.state_dict()
    expected = (random.gauss(0, 1), float(np.random.standard_normal()))
    rng.load_state_dict(saved)
    assert (random.gauss(0, 1), float(np.random.standard_normal())) == expected


@torch.no_grad()
def test_stateful_dataloader_resumes_at_the_next_batch(tmp_path: Path) -> None:
    def loader() -> StatefulDataLoader:
        return StatefulDataLoader(
            list(range(40)), batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(5)
        )

    original = loader()
    it = iter(original)
    consumed = [next(it).tolist() for _ in range(4)]
    state = TrainState(dataloaders={"train": original}, rng=False)
    ckptproto.save(state, tmp_path / "mid_epoch")
    rest = [b.tolist() for b in it]

    resumed = loader()
    ckptproto.load_into(tmp_path / "mid_epoch", TrainState(dataloaders={"train": resumed}, rng=False))
    assert [b.tolist() for b in resumed] == rest
    assert sorted(i for batch in consumed + rest for i in batch) == list(range(40))


def test_every_cuda_generator(tmp_path: Path) -> None:
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.cuda.init()
    torch.cuda.manual_seed_all(7)
    ckptproto.save({"rng": RNGState()}, tmp_path / "cuda_rng")
    expected = [torch.rand(2, device=f"cuda:{i}").tolist() for i in range(torch.cuda.device_count())]
    torch.cuda.manual_seed_all(8)
    ckptproto.load_into(tmp_path / "cuda_rng", {"rng": RNGState()})
    assert [torch.rand(2, device=f"cuda:{i}").tolist() for i in range(torch.cuda.device_count())] == expected
