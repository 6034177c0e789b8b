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
    params = CheckpointParameters(root_dir=tmp / "run", save_every_n_steps=4, keep_top_k=2)
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
