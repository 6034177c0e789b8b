"""One save pipeline, one restore pipeline: the drift bugs of issue 16 stay gone.

Sync, async and distributed saves used to be three near-copies, and a check added to one did
not reach the others. Each test here runs a rule on every path: a world of one (``Solo``),
the async saver's threads, and a real torch.distributed gloo group (of one rank, in this
process: the code path of any group size).
"""

from __future__ import annotations

import gc
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptproto
from ckptproto.errors import UnsupportedValueError
from ckptproto.format.manifest import check_tensor_table
from ckptproto.io import writer


@pytest.fixture
def world_of_one() -> Iterator[Any]:
    """A real gloo process group of one rank in this process, and a 1-device CPU mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _dtensor(mesh: Any) -> Any:
    from torch.distributed.tensor import Shard, distribute_tensor

    return distribute_tensor(torch.arange(8.0).reshape(4, 2), mesh, [Shard(0)])


def _save_sync(state: Any, path: Path, **kw: Any) -> ckptproto.CheckpointInfo:
    return ckptproto.save(state, path, **kw)


def _save_async(state: Any, path: Path, **kw: Any) -> ckptproto.CheckpointInfo:
    group = kw.pop("process_group", None)
    with ckptproto.AsyncSaver(process_group=group) as saver:
        return saver.save(state, path, **kw).result(timeout=60)


SAVES = {"sync": _save_sync, "async": _save_async}


@pytest.mark.parametrize("how", sorted(SAVES))
def test_a_dtensor_without_a_process_group_is_refused_before_anything_starts(
    tmp_path: Path, world_of_one: Any, how: str
) -> None:
    # Was: only the sync save refused it; the async saver accepted it and failed later on
    # its thread with a misleading "tensor changed while it was copied".
    with pytest.raises(UnsupportedValueError, match=r"w: a DTensor is saved by all ranks") as caught:
        SAVES[how]({"w": _dtensor(world_of_one)}, tmp_path / "c", process_group="local")
    assert caught.value.path == "w"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", sorted(SAVES))
def test_a_dtensor_in_a_group_is_saved_on_every_path(tmp_path: Path, world_of_one: Any, how: str) -> None:
    SAVES[how]({"w": _dtensor(world_of_one)}, tmp_path / "c")
    assert torch.equal(
        ckptproto.load(tmp_path / "c", process_group="local")["w"], torch.arange(8.0).reshape(4, 2)
    )


@pytest.fixture(params=["solo", "group"])
def coordinator(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "group":
        request.getfixturevalue("world_of_one")
    yield request.param


@pytest.mark.parametrize("how", sorted(SAVES))
def test_the_collector_runs_while_bytes_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinator: str, how: str
) -> None:
    # Was: the async saver's distributed path held the collector off for its whole write
    # (only the single-process path paused it just while planning).
    assert gc.isenabled()
    seen: list[bool] = []
    real = writer.write_file

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "write_file", spy)
    if how == "sync":
        # The caller of a sync save waits for it anyway: it runs with the collector paused.
        ckptproto.save({"w": torch.ones(4)}, tmp_path / "c")
        assert seen == [False]
    else:
        _save_async({"w": torch.ones(4)}, tmp_path / "c")
        assert seen == [True]
    assert gc.isenabled()


@pytest.mark.parametrize("how", sorted(SAVES))
def test_a_tensor_table_its_readers_refuse_is_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinator: str, how: str
) -> None:
    # Was: only the distributed save checked its manifest as every reader does before the
    # commit; a single-process save could commit one its readers refuse. (The check once
    # parsed the written manifest back; it now checks the tensor table it was written from.)
    # A share whose two chunks hold the right number of elements but overlap (and so leave a
    # hole) must not commit.
    from ckptproto.io import pipeline

    real = pipeline._write_share

    def overlapping(*args: Any) -> dict[str, Any]:
        out = real(*args)
        if "whole" in out:  # a world of one says "every tensor whole": listed, to break one
            out = {"file": out["file"], "chunks": [[0, out.pop("whole")[0], (0,), (4,)]]}
        index, key, _offsets, _shape = out["chunks"][0]
        out["chunks"][0] = [index, key, (0,), (2,)]
        out["chunks"].append([index, "extra", (1,), (2,)])
        return out

    monkeypatch.setattr(pipeline, "_write_share", overlapping)
    with pytest.raises(ckptproto.CheckpointError, match="chunks 0 and 1 overlap"):
        SAVES[how]({"w": torch.ones(4), "step": 3}, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(pipeline, "_write_share", real)
    # The same check is what every reader applies: the table parsed from a manifest agrees.
    SAVES[how]({"w": torch.ones(4), "step": 3}, tmp_path / "c")
    manifest = ckptproto.read_manifest(tmp_path / "c")
    check_tensor_table(manifest.tensors, manifest.files, "m")


def test_timeout_is_a_parameter_of_every_entry_point() -> None:
    # Was: reachable only through ckptproto.io.distributed.
    for entry in (ckptproto.save, ckptproto.load, ckptproto.load_into, ckptproto.AsyncSaver):
        assert "timeout" in inspect.signature(entry).parameters, entry
    for bad in (0, -1, "5", True):
        with pytest.raises(ValueError, match="timeout"):
            ckptproto.save({"w": torch.ones(1)}, "never-written", timeout=bad)
        with pytest.raises(ValueError, match="timeout"):
            ckptproto.AsyncSaver(timeout=bad)


@pytest.mark.parametrize("how", sorted(SAVES))
def test_a_manifest_over_the_readers_limit_is_never_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, coordinator: str, how: str
) -> None:
    # Was: readers refuse a manifest over MAX_MANIFEST_BYTES, but the writer committed one.
    # The real limit is 1 GiB; the test lowers the writer's copy of it so a 10 kB list of
    # floats crosses it.
    from ckptproto.io import pipeline

    monkeypatch.setattr(pipeline, "MAX_MANIFEST_BYTES", 4096)
    # Alone the CheckpointWriteError itself; in a group, DistributedCheckpointError naming it.
    with pytest.raises(ckptproto.CheckpointError, match="over the 4096 that readers accept"):
        SAVES[how]({"w": torch.ones(2), "losses": [0.1] * 1000}, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []
    SAVES[how]({"w": torch.ones(2), "losses": [0.1] * 10}, tmp_path / "c")
    assert ckptproto.load(tmp_path / "c", process_group="local")["losses"] == [0.1] * 10
