"""The policy layer (CheckpointCallback) unchanged under torch.distributed: every rank saves
into one checkpoint, only rank 0 deletes for retention, resume picks the same checkpoint on
every rank and continues exactly as an uninterrupted run."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_helpers import run_ranks
from _roots import backend_env, names

import ckptproto
from ckptproto.location import Location

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def scenario_policy(rank: int, world: int, tmp: Path, root_text: str, env: dict[str, str]) -> dict[str, Any]:
    import torch.distributed as dist
    from _policy_helpers import make_trainer, weights
    from _roots import visible

    from ckptproto import CheckpointCallback, CheckpointParameters
    from ckptproto.location import parse_location

    os.environ.update(env)  # the ranks fork from a server started before the test set them
    root = parse_location(root_text)  # a local directory or an s3:// prefix

    reference = make_trainer(epochs=3)
    reference.fit()
    # save_last=False: the first run's clean end at step 10 saves nothing, so the resume is
    # from the step interval's checkpoint (mid-epoch)
    params = CheckpointParameters(root_dir=root / "run", save_every_n_steps=4, keep_top_k=2, save_last=False)
    first = make_trainer([CheckpointCallback(params)], epochs=3, stop_after_steps=10)
    first.fit()
    dist.barrier()
    after_first = visible(root / "run")
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


def test_checkpoint_callback_on_two_ranks(tmp_path: Path, checkpoint_root: Location) -> None:
    results = run_ranks(scenario_policy, 2, tmp_path, str(checkpoint_root), backend_env(checkpoint_root))
    assert results[0]["after_first"] == ["checkpoint_step_4", "checkpoint_step_8"]
    assert results[0]["resumed"] == str(checkpoint_root / "run" / "checkpoint_step_8")
    assert results[0]["kept"] == results[1]["kept"]
    on_disk = names(checkpoint_root / "run")
    assert on_disk == sorted(results[0]["kept"])  # rank 0 deleted the rest, nothing hidden left
    for name in on_disk:
        manifest = ckptproto.read_manifest(checkpoint_root / "run" / name)
        assert manifest.world_size == 2
        ckptproto.verify(str(checkpoint_root / "run" / name))


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


def scenario_rank_metrics_differ(rank: int, world: int, tmp: Path, port: int) -> dict[str, Any]:
    """Each rank sees its own (unreduced) val_loss. The callbacks are built before the process
    group exists, as frameworks do (issue 11 item 9), then the group is started."""
    from datetime import timedelta

    import torch.distributed as dist
    from _policy_helpers import run_loop

    from ckptproto import AsyncCheckpointCallback, Callback, CheckpointCallback, CheckpointParameters

    dist.destroy_process_group()
    params = {"monitor": "val_loss", "keep_top_k": 1, "save_last": False}
    sync_cb = CheckpointCallback(CheckpointParameters(root_dir=tmp / "sync", **params))
    async_cb = AsyncCheckpointCallback(CheckpointParameters(root_dir=tmp / "async", **params))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=30),
    )
    # rank 0 improves at epochs 1 and 2; rank 1 at epochs 1 and 3: deciding per rank, one
    # rank would enter the collective save alone and hang
    vals = [[0.5, 0.4, 0.6], [0.5, 0.7, 0.3]][rank]
    out: dict[str, Any] = {}
    for name, cb in (("sync", sync_cb), ("async", async_cb)):
        run_loop([cb], vals)
        dist.barrier()
        out[name] = {"kept": cb.kept}
        resumed = CheckpointCallback(CheckpointParameters(root_dir=tmp / name, **params))
        run_loop([resumed], [])
        out[name]["resumed"] = str(resumed.resumed_from)
    async_cb.close()

    # a monitor reported by every step, different on each rank, judged at a step interval
    step_cb = CheckpointCallback(
        CheckpointParameters(
            root_dir=tmp / "steps", monitor="loss", keep_top_k=1, save_last=False, save_every_n_steps=1
        )
    )
    run_loop([step_cb], [None, None], losses=[[0.5, 0.4, 0.6, 0.3], [0.5, 0.6, 0.2, 0.7]][rank])
    out["steps"] = {"kept": step_cb.kept}

    # SIGTERM reaches rank 0 only: every rank saves at that step and stops
    class _SigtermOnRank0(Callback[Any]):
        def post_train_step(self, result: Any, batch_idx: int) -> None:
            if rank == 0 and self.trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    preempt_cb = CheckpointCallback(
        CheckpointParameters(
            root_dir=tmp / "preempt", save_on_preemption=True, save_last=False, keep_top_k=-1
        )
    )
    run_loop([_SigtermOnRank0(), preempt_cb], [None, None])
    out["preempt"] = {"kept": preempt_cb.kept, "should_stop": preempt_cb.should_stop}
    dist.barrier()
    return out


def test_ranks_with_different_metrics_agree(tmp_path: Path) -> None:
    from _dist_helpers import free_port

    results = run_ranks(scenario_rank_metrics_differ, 2, tmp_path, free_port(), timeout=120)
    assert results[0]["steps"] == results[1]["steps"] == {"kept": ["checkpoint_step_4"]}  # rank 0's 0.3
    assert results[0]["preempt"] == results[1]["preempt"]
    # epoch ends (2, 4: the loop goes on) and the SIGTERM save at step 3, on both ranks
    kept = ["checkpoint_step_2", "checkpoint_step_3", "checkpoint_step_4"]
    assert results[0]["preempt"] == {"kept": kept, "should_stop": True}
    assert ckptproto.read_manifest(tmp_path / "preempt" / "checkpoint_step_3").world_size == 2
    for name in ("sync", "async"):
        assert results[0][name] == results[1][name]  # every rank made the same decisions
        assert results[0][name]["kept"] == ["checkpoint_step_4"]  # rank 0's 0.4
        assert results[0][name]["resumed"] == str(tmp_path / name / "checkpoint_step_4")
        (only,) = ckptproto.find_checkpoints(tmp_path / name)
        assert only.name == "checkpoint_step_4" and only.metric == 0.4
        manifest = ckptproto.read_manifest(only.path)
        assert manifest.world_size == 2  # one checkpoint written by both ranks
        ckptproto.verify(only.path)
