"""The policy layer (CheckpointCallback) unchanged under torch.distributed: every rank saves
into one checkpoint, only rank 0 deletes for retention, resume picks the same checkpoint on
every rank and continues exactly as an uninterrupted run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_helpers import run_ranks

import ckptproto

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def scenario_policy(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    import torch.distributed as dist
    from _policy_helpers import make_trainer, weights

    from ckptproto import CheckpointCallback, CheckpointParameters

    reference = make_trainer(epochs=3)
    reference.fit()
    # save_last=False: the first run's clean end at step 10 saves nothing, so the resume is
    # from the step interval's checkpoint (mid-epoch)
    params = CheckpointParameters(root_dir=tmp / "run", save_every_n_steps=4, keep_top_k=2, save_last=False)
    first = make_trainer([CheckpointCallback(params)], epochs=3, stop_after_steps=10)
    first.fit()
    dist.barrier()
    after_first = sorted(p.name for p in (tmp / "run").iterdir())
    second_cb = CheckpointCallback(params)
    second = make_trainer([second_cb], epochs=3)
    second.fit()
    resumed: list[Any] = [None] * world
    dist.all_gather_object(resumed, str(second_cb.resumed_from))
    assert len(set(resumed)) == 1, resumed
    assert first.seen_batches[:8] + second.seen_batches == reference.seen_batches
    assert all(torch.equal(a, b) for a, b in zip(weights(reference), weights(second), strict=True))
    dist.barrier()
    return {"after_first": after_first, "resumed": resumed[0], "kept": second_cb.kept}


def test_checkpoint_callback_on_two_ranks(tmp_path: Path) -> None:
    results = run_ranks(scenario_policy, 2, tmp_path)
    assert results[0]["after_first"] == ["checkpoint_step_4", "checkpoint_step_8"]
    assert results[0]["resumed"] == str(tmp_path / "run" / "checkpoint_step_8")
    assert results[0]["kept"] == results[1]["kept"]
    on_disk = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert on_disk == sorted(results[0]["kept"])  # rank 0 deleted the rest, nothing hidden left
    for name in on_disk:
        manifest = ckptproto.read_manifest(tmp_path / "run" / name)
        assert manifest.world_size == 2
        ckptproto.verify(tmp_path / "run" / name)


def scenario_rng_per_rank(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    import random

    import numpy as np

    from ckptproto import RNGState

    def draws() -> list[float]:
        return [random.random(), float(np.random.random()), float(torch.rand(1))]

    random.seed(100 + rank)  # every rank draws its own dropout masks
    np.random.seed(200 + rank)
    torch.manual_seed(300 + rank)
    draws()
    ckptproto.save({"rng": RNGState()}, tmp / "rng")
    expected = [draws() for _ in range(3)]
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    ckptproto.load_into(tmp / "rng", {"rng": RNGState()})
    return {"expected": expected, "got": [draws() for _ in range(3)]}


def test_rng_state_is_kept_per_rank(tmp_path: Path) -> None:
    results = run_ranks(scenario_rng_per_rank, 2, tmp_path)
    for r in results.values():
        assert r["got"] == r["expected"]  # each rank continues its own random stream
    assert results[0]["expected"] != results[1]["expected"]
    saved = ckptproto.load(tmp_path / "rng")["rng"]
    assert len(saved["ranks"]) == 2  # one entry per rank, written once
    with pytest.warns(RuntimeWarning, match="RNG states of 2 ranks"):
        from ckptproto import RNGState

        RNGState().load_state_dict(saved)  # a single process takes rank 0's generators
