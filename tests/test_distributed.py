"""Distributed save/load on real gloo ranks (spawned processes on 127.0.0.1).

Each test runs one spawned job that combines several checks, since starting ranks is the
slow part: resharding N -> M for N, M in {1, 2, 4}; FSDP2 model + optimizer round trip and
resume equivalence; a rank raising mid-save; a rank SIGKILLed mid-save.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _dist_helpers import run_ranks

import ckptproto
from ckptproto.format import layout
from ckptproto.io import writer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

FAIL_TIMEOUT = 5.0  # seconds a rank waits for a dead or failed peer in the failure tests


# ----------------------------------------------------------------------------- states


def reference() -> dict[str, torch.Tensor]:
    """The full tensors every layout below shards (odd sizes: uneven shards on 2 and 4 ranks)."""
    g = torch.Generator().manual_seed(1234)
    return {
        "w": torch.randn(10, 6, generator=g),
        "m": torch.randn(5, 7, generator=g, dtype=torch.float64),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "idx": torch.randint(-(2**40), 2**40, (9, 3), generator=g),
        "s": torch.tensor(3.5),
        "e": torch.empty(0, 3),
        "flag": torch.rand(6, generator=g) > 0.5,
    }


def replicated() -> dict[str, Any]:
    g = torch.Generator().manual_seed(99)
    return {
        "emb": torch.randn(16, 8, generator=g),
        "head": torch.randn(8, 3, generator=g),
        "counts": np.arange(12, dtype=np.int32).reshape(3, 4),
    }


def layouts(mesh: Any, mesh2d: Any | None) -> dict[str, tuple[Any, ...]]:
    from torch.distributed.tensor import Replicate, Shard

    out: dict[str, tuple[Any, ...]] = {
        "w": (mesh, [Shard(0)]),
        "m": (mesh, [Shard(1)]),
        "b": (mesh, [Shard(0)]),
        "idx": (mesh, [Shard(1)]),
        "s": (mesh, [Replicate()]),
        "e": (mesh, [Shard(0)]),
        "flag": (mesh, [Shard(0)]),
    }
    if mesh2d is not None:  # 2x2: a Replicate mesh dimension, written once
        out["w"] = (mesh2d, [Shard(0), Replicate()])
        out["m"] = (mesh2d, [Replicate(), Shard(0)])
        out["idx"] = (mesh2d, [Shard(1), Shard(0)])
    return out


def other_layouts(mesh: Any) -> dict[str, tuple[Any, ...]]:
    """Different placements to load into: chunks and local boxes do not line up."""
    from torch.distributed.tensor import Replicate, Shard

    return {
        "w": (mesh, [Shard(1)]),
        "m": (mesh, [Shard(0)]),
        "b": (mesh, [Replicate()]),
        "idx": (mesh, [Shard(0)]),
        "s": (mesh, [Replicate()]),
        "e": (mesh, [Shard(1)]),
        "flag": (mesh, [Shard(0)]),
    }


def sharded(
    full: dict[str, torch.Tensor], spec: dict[str, tuple[Any, ...]], zero: bool = False
) -> dict[str, Any]:
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for name, (mesh, placements) in spec.items():
        value = torch.zeros_like(full[name]) if zero else full[name]
        out[name] = distribute_tensor(value, mesh, placements)
    return out


def assert_same(got: Any, want: Any, what: str) -> None:
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype, what
        assert np.array_equal(got, want), what
        return
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{got.shape}"
    # Bit-identical: compare the bytes (NaN-safe, -0.0 distinct from 0.0).
    assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), what


def data_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all files, bytes of tensor data in them) of a checkpoint."""
    manifest = ckptproto.read_manifest(path)
    total = sum(f.stat().st_size for f in path.iterdir())
    tensor_bytes = 0
    for entry in manifest.tensors:
        tensor_bytes += sum(c.numel for c in entry.chunks) * entry.dtype.itemsize
    return total, tensor_bytes


# ----------------------------------------------------------------------------- resharding


def scenario_reshard(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    full, rep = reference(), replicated()
    mesh4 = init_device_mesh("cpu", (4,))
    mesh22 = init_device_mesh("cpu", (2, 2))
    mesh2 = DeviceMesh("cpu", [0, 1])  # every rank builds it; ranks 2 and 3 are outside
    pair = dist.new_group([0, 1])
    in_pair = rank < 2

    # Saved by 1 (rank 0 alone, plain tensors), by 2 (ranks 0-1, 1-D mesh), by 4 (2x2 mesh).
    if rank == 0:
        ckptproto.save({"t": full, "rep": rep, "step": 1}, tmp / "c1", process_group="local")
    if in_pair:
        info2 = ckptproto.save(
            {"t": sharded(full, layouts(mesh2, None)), "rep": rep, "step": 2}, tmp / "c2", process_group=pair
        )
        assert info2.step is None and info2.metadata == {}
    info4 = ckptproto.save({"t": sharded(full, layouts(mesh4, mesh22)), "rep": rep, "step": 4}, tmp / "c4")
    assert info4.path == tmp / "c4"
    dist.barrier()

    for name in ("c1", "c2", "c4"):
        # On 4 ranks, into DTensors with other placements than any save used.
        target = {
            "t": sharded(full, other_layouts(mesh4), zero=True),
            "rep": {k: v * 0 for k, v in rep.items()},
            "step": 0,
        }
        ckptproto.load_into(tmp / name, target)
        for key, value in target["t"].items():
            assert_same(value.full_tensor(), full[key], f"{name} -> 4: t.{key}")
        for key, value in target["rep"].items():
            assert_same(value, rep[key], f"{name} -> 4: rep.{key}")
        if name == "c2":  # On 4 ranks, 2-D mesh targets (replicas read the same chunks).
            target = {"t": sharded(full, layouts(mesh4, mesh22), zero=True)}
            ckptproto.load_into(tmp / name, target, strict=False)
            for key, value in target["t"].items():
                assert_same(value.full_tensor(), full[key], f"{name} -> 4 (2x2): t.{key}")
        if name == "c4":  # load: full tensors on every rank.
            state = ckptproto.load(tmp / name)
            for key, value in state["t"].items():
                assert_same(value, full[key], f"{name} load on 4: t.{key}")
        # On 2 ranks (ranks 0-1 of the 4).
        if in_pair:
            target = {"t": sharded(full, other_layouts(mesh2), zero=True)}
            ckptproto.load_into(tmp / name, target, process_group=pair, strict=False)
            for key, value in target["t"].items():
                assert_same(value.full_tensor(), full[key], f"{name} -> 2: t.{key}")
        dist.barrier()

    # Replicated plain tensors and DTensor replicas are written once: data bytes == unique bytes.
    if rank == 0:
        manifest = ckptproto.read_manifest(tmp / "c4")
        assert manifest.world_size == 4 and len(manifest.files) >= 2
        _total, written = data_bytes(tmp / "c4")
        unique = sum(v.numel() * v.element_size() for v in full.values()) + sum(
            v.nbytes if isinstance(v, np.ndarray) else v.numel() * v.element_size() for v in rep.values()
        )
        assert written == unique, (written, unique)

    # Against DCP on the same sharded state (DCP cannot hold numpy arrays: tensors only).
    dcp_state = {
        "t": sharded(full, layouts(mesh4, mesh22)),
        "rep": {k: v for k, v in rep.items() if k != "counts"},
    }
    dcp.save(dcp_state, checkpoint_id=str(tmp / "dcp4"))
    ckptproto.save(dcp_state, tmp / "ours4")
    dist.barrier()
    if rank == 0:
        dcp_bytes = sum(f.stat().st_size for f in (tmp / "dcp4").iterdir())
        ours_bytes = sum(f.stat().st_size for f in (tmp / "ours4").iterdir())
        return {"dcp_bytes": dcp_bytes, "ours_bytes": ours_bytes}
    return {}


def test_reshard_1_2_4_to_1_2_4(tmp_path: Path) -> None:
    results = run_ranks(scenario_reshard, 4, tmp_path)
    full, rep = reference(), replicated()
    for name in ("c1", "c2", "c4"):  # on 1: this (non-distributed) process, full tensors
        state = ckptproto.load(tmp_path / name)
        assert state["step"] == int(name[1])
        for key, value in full.items():
            assert_same(state["t"][key], value, f"{name} -> 1: t.{key}")
        for key, value in rep.items():
            assert_same(state["rep"][key], value, f"{name} -> 1: rep.{key}")
        ckptproto.verify(tmp_path / name)
    assert ckptproto.read_manifest(tmp_path / "c2").world_size == 2
    assert results[0]["ours_bytes"] <= results[0]["dcp_bytes"], results[0]


# ----------------------------------------------------------------------------- FSDP2


def _fsdp_model(seed: int) -> tuple[Any, Any]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.ReLU(), torch.nn.Linear(10, 3))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    return model, opt


def _train(model: Any, opt: Any, rank: int, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(1000 * step + rank)
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()


def _full_params(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor().clone() for k, v in model.state_dict().items()}


def _failing_write_file(*args: Any, **kwargs: Any) -> Any:
    _REAL_WRITE_FILE(*args, **kwargs)  # the file is really written, then the rank fails
    raise ckptproto.CheckpointWriteError("injected failure after writing this rank's data file")


_REAL_WRITE_FILE = writer.write_file


def scenario_fsdp(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    model, opt = _fsdp_model(seed=0)
    _train(model, opt, rank, range(3))
    state = {"models": {"model": model}, "optimizers": {"optimizer": opt}, "trainer": {"global_step": 3}}
    info = ckptproto.save(state, tmp / "a", metadata={"metrics": {"loss": 0.5}})
    assert info.step == 3 and info.metric("loss") == 0.5
    saved = _full_params(model)
    # The same state saved asynchronously: staged per rank, training goes on (mutating the
    # parameters) while the background thread writes and commits with the other ranks.
    with ckptproto.AsyncSaver(staging="background") as saver:
        fut = saver.save(state, tmp / "async")
        fut.wait_staged()
        _train(model, opt, rank, range(3, 4))
        async_info = fut.result(timeout=60)
    assert async_info.step == 3 and async_info.path == tmp / "async"
    _train(model, opt, rank, range(4, 6))
    expected = _full_params(model)

    # Resume into a fresh model and optimizer (its state made to exist by one step, as the
    # optimizer's load_state_dict needs DTensor state to load DTensor state into).
    model2, opt2 = _fsdp_model(seed=7)
    _train(model2, opt2, rank, range(100, 101))
    info2 = ckptproto.load_into(
        tmp / "a",
        {"models": {"model": model2}, "optimizers": {"optimizer": opt2}, "trainer": {"global_step": 0}},
    )
    assert info2.step == 3
    for key, value in _full_params(model2).items():
        assert_same(value, saved[key], f"resumed {key}")
    _train(model2, opt2, rank, range(3, 6))
    for key, value in _full_params(model2).items():
        assert_same(value, expected[key], f"after resume: {key}")

    # One rank raising mid-save (after writing its file): nothing committed, every rank raises
    # naming rank 1, the old checkpoint survives an overwrite attempt.
    results: dict[str, Any] = {}
    for target, overwrite in ((tmp / "b", False), (tmp / "a", True)):
        if rank == 1:
            writer.write_file = _failing_write_file
        start = time.monotonic()
        try:
            ckptproto.save(state, target, overwrite=overwrite, timeout=FAIL_TIMEOUT)
        except ckptproto.DistributedCheckpointError as exc:
            assert list(exc.failed_ranks) == [1], exc.failed_ranks
            assert "rank 1" in str(exc) and "injected failure" in str(exc), str(exc)
        else:
            raise AssertionError("the save should have failed on every rank")
        finally:
            writer.write_file = _REAL_WRITE_FILE
        results[target.name] = time.monotonic() - start
    assert not (tmp / "b").exists()
    if rank == 0:  # rank 0 removed the temporary directory before raising
        assert not [p.name for p in tmp.iterdir() if layout.is_leftover(p.name)]
    # The checkpoint at "a" is still the old one: it loads and resumes as before.
    model3, opt3 = _fsdp_model(seed=8)
    _train(model3, opt3, rank, range(100, 101))
    ckptproto.load_into(
        tmp / "a",
        {"models": {"model": model3}, "optimizers": {"optimizer": opt3}, "trainer": {"global_step": 0}},
    )
    for key, value in _full_params(model3).items():
        assert_same(value, saved[key], f"after the failed overwrite: {key}")
    # A rank whose state differs from rank 0's writes nothing, and nothing is committed.
    odd = {"x": torch.zeros(3 if rank == 0 else 4)}
    try:
        ckptproto.save(odd, tmp / "c")
    except ckptproto.DistributedCheckpointError as exc:
        assert exc.failed_ranks == {1: "state differs from rank 0's"}, exc.failed_ranks
    else:
        raise AssertionError("states of different shapes should not save")
    assert not (tmp / "c").exists()
    # Every rank must save to the same path (a policy layer choosing names per rank would
    # otherwise split one checkpoint in two).
    try:
        ckptproto.save({"x": torch.zeros(2)}, tmp / f"per-rank-{rank}")
    except ckptproto.DistributedCheckpointError as exc:
        assert list(exc.failed_ranks) == [1] and "same path" in str(exc), str(exc)
    else:
        raise AssertionError("saves to different paths should fail")
    # Partial placements are refused on every rank, naming the state path.
    from torch.distributed.tensor import DTensor, Partial

    partial = DTensor.from_local(torch.ones(2), model[0].weight.device_mesh, [Partial()])
    try:
        ckptproto.save({"grad": {"sum": partial}}, tmp / "partial")
    except ckptproto.DistributedCheckpointError as exc:
        assert sorted(exc.failed_ranks) == [0, 1] and "grad.sum" in str(exc) and "Partial" in str(exc), str(
            exc
        )
    else:
        raise AssertionError("a Partial DTensor should not save")
    # A damaged data file fails the load on every rank, naming the rank that found it.
    if rank == 0:
        shutil.copytree(tmp / "a", tmp / "damaged")
        damaged = tmp / "damaged" / layout.data_file_name(1)
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 0xFF
        damaged.write_bytes(bytes(data))
    torch.distributed.barrier()
    try:
        ckptproto.load_into(tmp / "damaged", {"models": {"model": model3}}, strict=False)
    except ckptproto.DistributedCheckpointError as exc:
        assert list(exc.failed_ranks) == [1] and "checksum" in str(exc), str(exc)
    else:
        raise AssertionError("a damaged checkpoint should not load")
    return {"seconds": results, "saved": {k: v.tolist() for k, v in saved.items()}}


def test_fsdp2_round_trip_resume_and_failed_save(tmp_path: Path) -> None:
    results = run_ranks(scenario_fsdp, 2, tmp_path)
    for rank, result in results.items():
        for what, seconds in result["seconds"].items():
            assert seconds < FAIL_TIMEOUT + 10, (rank, what, seconds)
    # The FSDP checkpoint loads in one plain process as full tensors.
    state = ckptproto.load(tmp_path / "a")
    assert state["trainer"]["global_step"] == 3
    # The async save holds the state as it was at save(), not the later training step.
    async_state = ckptproto.load(tmp_path / "async")
    assert ckptproto.read_manifest(tmp_path / "async").world_size == 2
    for section in ("models", "optimizers"):
        a, b = state[section], async_state[section]
        assert repr(sorted(a)) == repr(sorted(b))
    for key, value in state["models"]["model"].items():
        assert torch.equal(async_state["models"]["model"][key], value), key
    for index, slots in state["optimizers"]["optimizer"]["state"].items():
        for name, value in slots.items():
            assert torch.equal(async_state["optimizers"]["optimizer"]["state"][index][name], value), (
                index,
                name,
            )
    model = state["models"]["model"]
    for key, value in results[0]["saved"].items():
        assert torch.equal(model[key], torch.tensor(value)), key
    assert set(state["optimizers"]["optimizer"]["state"]) == {0, 1, 2, 3}
    assert state["optimizers"]["optimizer"]["state"][0]["exp_avg"].shape == (10, 6)


# ----------------------------------------------------------------------------- SIGKILL


def _killing_write_file(*args: Any, **kwargs: Any) -> Any:
    _REAL_WRITE_FILE(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)


def scenario_kill(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    # Three equal tensors: the size-balanced assignment gives one to each rank.
    state = {"w": list(torch.arange(36.0).reshape(3, 3, 4)), "step": 1}
    ckptproto.save(state, tmp / "good", timeout=FAIL_TIMEOUT)
    if rank == 1:
        writer.write_file = _killing_write_file
    start = time.monotonic()
    try:
        ckptproto.save({"w": list(torch.ones(3, 64, 64)), "step": 2}, tmp / "next", timeout=FAIL_TIMEOUT)
    except ckptproto.DistributedCheckpointError as exc:
        return {"teardown": False, "seconds": time.monotonic() - start, "error": str(exc),
                "failed": sorted(exc.failed_ranks)}  # fmt: skip
    raise AssertionError("the save should have failed")


def test_rank_killed_mid_save(tmp_path: Path) -> None:
    results = run_ranks(scenario_kill, 3, tmp_path, killed=frozenset({1}))
    assert set(results) == {0, 2}
    for rank, result in results.items():
        assert result["seconds"] < 2 * FAIL_TIMEOUT + 10, (rank, result)
    # Every surviving rank names the dead one (was: rank 2 only saw "the group broke"):
    # rank 0 hears every rank's file, and tells every rank still there the outcome.
    for rank in (0, 2):
        assert results[rank]["failed"] == [1], results[rank]
        assert "rank 1 did not answer" in results[rank]["error"], results[rank]
    assert not (tmp_path / "next").exists()
    assert not [p.name for p in tmp_path.iterdir() if layout.is_leftover(p.name)]
    assert ckptproto.load(tmp_path / "good")["step"] == 1
    ckptproto.verify(tmp_path / "good")


# ----------------------------------------------------------------------------- CUDA / NCCL


def scenario_cuda(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.cuda.set_device(rank)
    mesh = init_device_mesh("cuda", (world,))
    full = torch.arange(48.0).reshape(8, 6)
    state = {"w": distribute_tensor(full.cuda(), mesh, [Shard(0)]), "b": torch.ones(3, device="cuda")}
    ckptproto.save(state, tmp / "cuda")  # NCCL group: the protocol runs on a gloo twin
    target = {
        "w": distribute_tensor(torch.zeros(8, 6, device="cuda"), mesh, [Shard(1)]),
        "b": torch.zeros(3, device="cuda"),
    }
    ckptproto.load_into(tmp / "cuda", target)
    assert torch.equal(target["w"].full_tensor().cpu(), full)
    assert torch.equal(target["b"].cpu(), torch.ones(3))
    return {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dtensor_on_nccl(tmp_path: Path) -> None:
    world = min(torch.cuda.device_count(), 2)
    run_ranks(scenario_cuda, world, tmp_path, backend="cpu:gloo,cuda:nccl")
    assert torch.equal(ckptproto.load(tmp_path / "cuda")["w"], torch.arange(48.0).reshape(8, 6))
