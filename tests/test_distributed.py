"""Distributed save/load on real gloo ranks (spawned processes on 127.0.0.1).

Each test runs one spawned job that combines several checks, since starting ranks is the
slow part: resharding N -> M for N, M in {1, 2, 4}; FSDP2 model + optimizer round trip and
resume equivalence; a rank raising mid-save; a rank SIGKILLed mid-save.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptproto
from ckptproto.format import layout
from ckptproto.io import distributed as cdist
from ckptproto.io import writer

from _dist_helpers import run_ranks

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
        # On 4 ranks, 2-D mesh targets.
        target = {"t": sharded(full, layouts(mesh4, mesh22), zero=True)}
        ckptproto.load_into(tmp / name, target, strict=False)
        for key, value in target["t"].items():
            assert_same(value.full_tensor(), full[key], f"{name} -> 4 (2x2): t.{key}")
        # load: full tensors on every rank.
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
