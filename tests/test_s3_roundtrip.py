"""ckptproto's public API on s3:// URLs against a real S3 server: save, load, load_into,
verify and read_info of numpy and torch states (models, optimizers), AsyncSaver, and a 2-rank
gloo save and load, each also read back whole through the S3 generation (sizes, CRCs)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _dist_helpers import run_ranks
from conftest import assert_same

import ckptproto
from ckptproto.format.manifest import Manifest
from ckptproto.io import s3_storage
from ckptproto.location import ObjectLocation, parse_location


def _loc(url: str) -> ObjectLocation:
    loc = parse_location(url)
    assert isinstance(loc, ObjectLocation)
    return loc


def _files(url: str) -> dict[str, bytes]:
    """Every data file of the checkpoint at ``url``, read whole through its generation and
    checked against the manifest's sizes and CRCs."""
    out = {}
    with s3_storage.S3.open(_loc(url)) as generation:
        manifest = Manifest.parse(generation.read_manifest(), url)
        for name, entry in manifest.files.items():
            data = generation.open_file(name)
            whole = bytearray(data.size)
            assert data.read_into(0, [memoryview(whole)]) == entry.size == data.size
            assert f"crc32:{zlib.crc32(whole):08x}" == entry.checksum, name
            out[name] = bytes(whole)
    return out


def _trained() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    return {
        "models": {"model": model.state_dict()},
        "optimizers": {"optimizer": opt.state_dict()},
        "trainer": {"global_step": 2, "arr": np.arange(6, dtype=np.int16).reshape(2, 3)},
    }


def test_save_load_load_into_verify_read_info(s3_url: str) -> None:
    state = _trained()
    url = s3_url + "/step_2"
    info = ckptproto.save(state, url, metadata={"step": 2, "metrics": {"loss": 0.5}})
    assert info.step == 2 and info.metric("loss") == 0.5 and str(info.path) == url
    (data,) = _files(url).values()
    assert state["models"]["model"]["0.weight"].numpy().tobytes() in data
    assert_same(state, ckptproto.load(url))
    assert_same(state, ckptproto.load(url, mmap=True))  # nothing to map: read into memory
    target = _trained()
    for group in target["optimizers"]["optimizer"]["state"].values():
        for value in group.values():
            value.zero_()
    target["models"]["model"]["0.weight"].zero_()
    ckptproto.load_into(url, target)
    assert_same(state, target)
    assert ckptproto.verify(url).step == 2
    info2 = ckptproto.read_info(url)
    assert info2.step == 2 and info2.nbytes == info.nbytes and str(info2.path) == url
    with pytest.raises(ckptproto.CheckpointNotFoundError):
        ckptproto.load(s3_url + "/nothing_here")


def test_verify_finds_a_damaged_object(s3_url: str) -> None:
    import obstore

    from ckptproto.io import s3_client

    url = s3_url + "/c"
    ckptproto.save({"w": np.arange(1000.0)}, url)
    ((name, data),) = _files(url).items()
    damaged = bytearray(data)
    damaged[-1] ^= 1
    loc = _loc(url)
    obstore.put(s3_client.store(loc.bucket), loc.object_key(name), bytes(damaged))
    with pytest.raises(ckptproto.CheckpointCorruptError, match=name):
        ckptproto.verify(url)
    with pytest.raises(ckptproto.CheckpointCorruptError):
        ckptproto.load(url)


def test_async_saver_to_s3(s3_url: str) -> None:
    saver = ckptproto.AsyncSaver()
    try:
        futures = [
            saver.save({"w": np.full(1000, float(i)), "step": i}, s3_url + f"/step_{i}") for i in range(3)
        ]
        assert saver.wait(timeout=120)
        for future in futures:
            future.result()
    finally:
        saver.close()
    assert [e.name for e in s3_storage.S3.entries(_loc(s3_url))] == ["step_0", "step_1", "step_2"]
    for i in range(3):
        _files(s3_url + f"/step_{i}")
        loaded = ckptproto.load(s3_url + f"/step_{i}")
        assert loaded["step"] == i and np.array_equal(loaded["w"], np.full(1000, float(i)))


def scenario_save_to_s3(rank: int, world: int, tmp: Path, url: str, env: dict[str, str]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(env)  # the ranks fork from a server started before the test set them
    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    info = ckptproto.save({"w": distribute_tensor(full, mesh, [Shard(0)]), "step": 5}, url)
    # Loaded back on the ranks into other placements (each rank reads its own shard's bytes).
    target = {"w": distribute_tensor(torch.zeros(10, 6), mesh, [Shard(1)]), "step": 0}
    ckptproto.load_into(url, target)
    assert torch.equal(target["w"].full_tensor(), full) and target["step"] == 5
    return {"path": str(info.path)}


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_ranks_save_to_s3(s3_url: str, tmp_path: Path) -> None:
    from _s3_server import s3_env

    url = s3_url + "/dist"
    results = run_ranks(scenario_save_to_s3, 2, tmp_path, url, s3_env())
    assert results[0]["path"] == results[1]["path"] == url
    files = _files(url)
    with s3_storage.S3.open(_loc(url)) as generation:
        manifest = Manifest.parse(generation.read_manifest(), url)
    assert manifest.world_size == 2
    assert sorted(f.rank for f in manifest.files.values()) == [0, 1]  # one data object per rank
    rows = [np.arange(30, dtype=np.float32).tobytes(), np.arange(30, 60, dtype=np.float32).tobytes()]
    assert all(any(r in data for data in files.values()) for r in rows)
    loaded = ckptproto.load(url)  # on 1: the full tensor from both ranks' objects
    assert torch.equal(loaded["w"], torch.arange(60, dtype=torch.float32).reshape(10, 6))
    ckptproto.verify(url)
