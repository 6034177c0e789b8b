"""The checkpoint writer process (AsyncSaver(writer="process"|"auto")): the same checkpoint,
the same errors, the same commit as the writer thread; a dead child fails its save loudly and
the next save starts a new one."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptproto
from ckptproto import CheckpointError, CheckpointExistsError, CheckpointWriteError
from ckptproto.format import layout
from ckptproto.io import async_job, share_wire, staging, writer_process
from ckptproto.io.coordinate import Solo
from ckptproto.io.prepare import prepare

pytestmark = pytest.mark.skipif(not writer_process.available(), reason="needs memfd_create (Linux)")
MODES = ["blocking", "background"]


def mixed_state(n: int = 40) -> dict[str, Any]:
    g = torch.Generator().manual_seed(n)
    model = {f"layers.{i}.w": torch.randn(i % 7 + 1, 3, generator=g) for i in range(n)}
    model["half"] = torch.randn(5, generator=g).to(torch.bfloat16)
    model["ints"] = torch.arange(9, dtype=torch.int64).reshape(3, 3)
    model["flags"] = torch.tensor([True, False, True])
    model["empty"] = torch.empty(0, 4)
    model["strided"] = torch.randn(6, 4, generator=g).t()  # not contiguous
    model["np"] = np.arange(10, dtype=">f4")  # big-endian numpy: stored little-endian
    trainer = {"global_step": 7, "history": [1.5, 2.5], "big": 3**20000, "nan": float("nan"), "t": (1, "x")}
    return {"models": {"model": model}, "trainer": trainer}


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if layout.is_hidden(p.name)]


def data_bytes(path: Path) -> bytes:
    return (path / layout.data_file_name(0)).read_bytes()


@pytest.mark.parametrize("mode", MODES)
def test_the_process_writes_the_same_checkpoint_as_the_thread(tmp_path: Path, mode: str) -> None:
    state = mixed_state()
    expected = {
        k: v.clone() if isinstance(v, torch.Tensor) else v.copy() for k, v in state["models"]["model"].items()
    }
    with ckptproto.AsyncSaver(staging=mode, writer="thread") as saver:  # type: ignore[arg-type]
        by_thread = saver.save(state, tmp_path / "thread", metadata={"m": 1, "big": 3**20000}).result(
            timeout=60
        )
    with ckptproto.AsyncSaver(staging=mode, writer="process") as saver:  # type: ignore[arg-type]
        fut = saver.save(state, tmp_path / "process", metadata={"m": 1, "big": 3**20000})
        fut.wait_staged()
        state["models"]["model"]["layers.0.w"].add_(1.0)  # after staging: not in the checkpoint
        by_process = fut.result(timeout=60)
        assert saver.writer_pid is not None and saver.writer_pid != os.getpid()
    assert by_process.path == tmp_path / "process" and by_process.step == by_thread.step == 7
    assert by_process.metadata == by_thread.metadata
    # Byte for byte the same data file (the same plan, header, CRC), and it loads back.
    assert data_bytes(tmp_path / "process") == data_bytes(tmp_path / "thread")
    loaded = ckptproto.load(tmp_path / "process")
    for key, value in expected.items():
        got = loaded["models"]["model"][key]
        if isinstance(value, np.ndarray):
            assert np.array_equal(got, value)
        else:
            assert torch.equal(got, value), key
    trainer = loaded["trainer"]
    assert math.isnan(trainer.pop("nan"))
    assert trainer == {"global_step": 7, "history": [1.5, 2.5], "big": 3**20000, "t": (1, "x")}
    assert leftovers(tmp_path) == []


def test_the_process_serves_many_saves_and_reuses_the_shared_slab(tmp_path: Path) -> None:
    state = mixed_state()
    with ckptproto.AsyncSaver(writer="process") as saver:
        pids = set()
        for i in range(4):
            state["trainer"]["global_step"] = i
            assert saver.save(state, tmp_path / f"c{i}").result(timeout=60).step == i
            pids.add(saver.writer_pid)
        assert len(pids) == 1  # one long-lived child
        assert saver.pool.stats.allocated == 1
    assert saver.writer_pid is None  # close() stopped it
    assert [ckptproto.verify(tmp_path / f"c{i}").step for i in range(4)] == [0, 1, 2, 3]


def test_errors_in_the_process_come_back_as_the_same_exceptions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ckptproto.save({"w": torch.zeros(2)}, tmp_path / "c")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with ckptproto.AsyncSaver(writer="process") as saver, caplog.at_level(logging.ERROR, "ckptproto"):
        with pytest.raises(CheckpointExistsError, match="overwrite=True"):
            saver.save({"w": torch.ones(2)}, tmp_path / "c").result(timeout=60)
        with pytest.raises(CheckpointWriteError, match="cannot create a checkpoint"):
            saver.save({"w": torch.ones(2)}, blocker / "ckpt").result(timeout=60)
        assert ckptproto.load(tmp_path / "c")["w"].sum().item() == 0
        saver.save({"w": torch.ones(2)}, tmp_path / "c", overwrite=True).result(timeout=60)
    assert ckptproto.load(tmp_path / "c")["w"].sum().item() == 2
    assert any(str(blocker / "ckpt") in r.getMessage() for r in caplog.records)  # logged too
    assert leftovers(tmp_path) == []


def child_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str) -> tuple[Path, Path]:
    """Arm one of tests/_writer_child/sitecustomize.py's hooks in the writer processes started
    from now on (they inherit this environment) while the returned marker file exists; and an
    empty output directory."""
    hooks = str(Path(__file__).resolve().parent / "_writer_child")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [hooks, os.environ.get("PYTHONPATH")])))
    marker = tmp_path / variable.lower()
    marker.touch()
    monkeypatch.setenv(variable, str(marker))
    out = tmp_path / "out"
    out.mkdir()
    return marker, out


def test_a_writer_process_that_dies_mid_save_fails_it_and_the_next_save_starts_a_new_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker, out = child_hook(tmp_path, monkeypatch, "CKPTPROTO_TEST_DIE_MARKER")  # kills it in write_file
    with ckptproto.AsyncSaver(writer="process") as saver:
        fut = saver.save({"w": torch.ones(3), "trainer": {"global_step": 1}}, out / "a")
        with pytest.raises(
            CheckpointWriteError, match=r"writer process .* exited with code -9.*not committed"
        ):
            fut.result(timeout=60)
        assert not (out / "a").exists()
        marker.unlink()
        info = saver.save({"w": torch.ones(3), "trainer": {"global_step": 2}}, out / "b").result(timeout=60)
        assert info.step == 2 and saver.writer_pid is not None
    assert torch.equal(ckptproto.load(out / "b")["w"], torch.ones(3))
    assert not (out / "a").exists()  # the dead child's temporary directory is hidden, if left


def test_a_writer_process_killed_between_saves_is_replaced(tmp_path: Path) -> None:
    with ckptproto.AsyncSaver(writer="process") as saver:
        saver.save({"w": torch.ones(2)}, tmp_path / "a").result(timeout=60)
        pid = saver.writer_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        info = saver.save({"w": torch.ones(2)}, tmp_path / "b").result(timeout=60)
        assert info.path == tmp_path / "b" and saver.writer_pid not in (None, pid)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """One "process" per save handed to a writer process."""
    seen: list[str] = []
    real = writer_process.WriterProcess.run

    def spy(self: writer_process.WriterProcess, *args: Any, **kwargs: Any) -> Any:
        seen.append("process")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(writer_process.WriterProcess, "run", spy)
    return seen


def test_auto_writes_many_tensors_from_the_process_and_few_from_the_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: list[str]
) -> None:
    monkeypatch.setattr(async_job, "PROCESS_MIN_TENSORS", 20)
    with ckptproto.AsyncSaver() as saver:
        saver.save({f"t{i}": torch.ones(2) for i in range(19)}, tmp_path / "few").result(timeout=60)
        assert saver.writer_pid is None
        assert calls == []
        saver.save({f"t{i}": torch.ones(2) for i in range(20)}, tmp_path / "many").result(timeout=60)
        assert calls == ["process"]
    with ckptproto.AsyncSaver(writer="thread") as saver:
        saver.save({f"t{i}": torch.ones(2) for i in range(50)}, tmp_path / "thread").result(timeout=60)
        assert calls == ["process"]
    assert len(ckptproto.load(tmp_path / "many")) == 20


def test_auto_writes_a_large_state_of_few_tensors_from_the_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, calls: list[str]
) -> None:
    """Bytes count as well as tensors: the thread's checksums and page-cache copies of a large
    state would take a core and GIL hand-offs from the training process."""
    monkeypatch.setattr(async_job, "PROCESS_MIN_BYTES", 4096)
    with ckptproto.AsyncSaver() as saver:
        saver.save({"small": torch.ones(1023)}, tmp_path / "small").result(timeout=60)
        assert calls == []
        saver.save({"a": torch.ones(512), "b": np.ones(512, dtype=np.float32)}, tmp_path / "big").result(
            timeout=60
        )
        assert calls == ["process"] and saver.writer_pid is not None
    assert np.array_equal(ckptproto.load(tmp_path / "big")["b"], np.ones(512, dtype=np.float32))


def _malformed_then_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, bad: Any
) -> None:
    """With ``owner.name`` replaced by ``bad`` a save fails with "malformed job" and commits
    nothing; restored, the same writer process serves the next save."""
    real = getattr(owner, name)
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(5)}
    with ckptproto.AsyncSaver(writer="process") as saver:
        monkeypatch.setattr(owner, name, bad)
        with pytest.raises(CheckpointError, match="malformed job"):
            saver.save(state, tmp_path / "bad").result(timeout=60)
        monkeypatch.setattr(owner, name, real)
        saver.save(state, tmp_path / "good").result(timeout=60)
    assert not (tmp_path / "bad").exists()
    assert torch.equal(ckptproto.load(tmp_path / "good")["t4"], torch.full((3,), 4.0))


def test_a_malformed_job_fails_that_save_and_the_writer_serves_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child checks the raw part against the marshalled columns (a bug in either side is
    a loud failure of that save, never a checkpoint with misplaced bytes)."""
    real = share_wire.pack

    def short(share: Any) -> Any:
        columns, tree, ids = real(share)
        return columns, tree, ids[:-1]

    _malformed_then_served(tmp_path, monkeypatch, share_wire, "pack", short)


@pytest.mark.parametrize("shift", ["past", "before"])
def test_spans_outside_the_slab_fail_that_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shift: str
) -> None:
    """The child checks every tensor's span against the slab it mapped before it reads (a
    span past it would otherwise be cut short or read out of bounds)."""
    real = staging.Staged.shared

    def moved(self: staging.Staged) -> Any:
        found = real(self)
        if found is None:
            return None
        fd, spans = found
        spans = spans.copy()
        spans[-1, 0] = 1 << 40 if shift == "past" else -8
        return fd, spans

    _malformed_then_served(tmp_path, monkeypatch, staging.Staged, "shared", moved)


@pytest.mark.parametrize("message", [b"\xffnot JSON", b"[1,2]", b'{"final":'])
def test_a_job_that_is_not_a_json_object_fails_that_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, message: bytes
) -> None:
    """Bytes that are not the parent's JSON job are a loud failure of that save."""
    real = writer_process.describe

    def garbled(*args: Any) -> writer_process.WireJob:
        job = real(*args)
        return writer_process.WireJob(job.final, message, job.raw, job.fd, job.metadata_tree)

    _malformed_then_served(tmp_path, monkeypatch, writer_process, "describe", garbled)


def test_without_shared_memory_the_thread_writes_the_save(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memfd that cannot be had (a file size limit covers memfds too, as may a container's
    shared-memory limit) is no reason to fail a save: a private slab and the thread serve."""

    def no_memfd(*args: Any) -> int:
        raise OSError(27, "File too large")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    state = {f"t{i}": torch.full((3,), float(i)) for i in range(5)}
    with ckptproto.AsyncSaver(writer="process") as saver:
        saver.save(state, tmp_path / "c").result(timeout=60)
        assert saver.writer_pid is None
        assert saver.pool.stats.allocated == 1
    assert torch.equal(ckptproto.load(tmp_path / "c")["t4"], torch.full((3,), 4.0))


def test_bad_writer_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="writer must be"):
        ckptproto.AsyncSaver(writer="fork")  # type: ignore[arg-type]


def test_the_share_travels_as_columns_and_comes_back_equal() -> None:
    state = mixed_state()
    state["models"]["model"]["same.name"] = torch.ones(3)  # "same.name" also a nested path:
    state["models"]["model"]["same"] = {"name": torch.zeros(3)}  # keys made unique alike
    prepared = prepare(state, None, Solo())
    share = prepared.share
    columns, tree, spec_ids = share_wire.pack(prepared.encoded)
    # A handful of distinct specs, each sent once; one raw index per tensor.
    assert len(columns["specs"]) < len(share.pieces) and len(spec_ids) == len(share.pieces)
    raw_ids = np.frombuffer(spec_ids.tobytes(), np.int64)
    job, found = share_wire.loads(json.dumps({"share": columns})[:-1] + ',"tree":' + tree + "}")
    back = share_wire.unpack(job["share"], raw_ids, job["tree"], found)
    assert back.pieces == share.pieces
    assert [(t.path, t.spec) for t in back.encoded.tensors] == [
        (t.path, t.spec) for t in share.encoded.tensors
    ]
    assert back.encoded.tree == share.encoded.tree
    assert (back.digest, back.tensor_index, back.replicas, back.leaves) == (
        share.digest,
        share.tensor_index,
        share.replicas,
        [],
    )


def _column(n: int, start: float = 0.0, key: str = "w{}") -> dict[str, torch.Tensor]:
    return {key.format(i): torch.full((2,), start + i) for i in range(n)}


def _wire_round_trip(state: dict[str, Any]) -> tuple[Any, Any, str]:
    prepared = prepare(state, None, Solo())
    columns, tree, spec_ids = share_wire.pack(prepared.encoded)
    job, found = share_wire.loads(json.dumps({"share": columns})[:-1] + ',"tree":' + tree + "}")
    return prepared.share, share_wire.unpack(job["share"], spec_ids, job["tree"], found), tree


@pytest.mark.parametrize(
    ("state", "sent_as_columns"),
    [
        (_column(12), 1),  # a column at the root: its paths are its keys
        ({"models": {"a": _column(10), "b": _column(9, 100.0)}, "step": 3}, 2),
        ({"x": [_column(10), _column(8, 50.0)], "y": _column(11, 9.0)}, 1),  # in a list: dicts
        ({"m": _column(10, key='k"{}\\'), "n": {"é": _column(10)}, "o": {"é{}": 0, **_column(9)}}, 2),
        # In a dict past what the tree's writer walks in Python (60 x 7 items before it): the
        # C encoder writes that dict, the column in it as a plain dict.
        (
            {f"g{j}": {f"s{i}": torch.ones(1) for i in range(7)} for j in range(60)}
            | {"late": {"c": _column(20), **{f"v{i}": i for i in range(9)}}},
            0,
        ),
    ],
    ids=["root", "modules", "in-a-list", "quoted-keys", "late"],
)
def test_columns_travel_as_their_keys_and_come_back_the_same(
    state: dict[str, Any], sent_as_columns: int
) -> None:
    """A module's state dict goes as its keys, first index and path (its references and its
    tensors' paths follow from them); every other tensor's path goes as it is. The writer
    process gets back the same tree, paths and pieces wherever the columns are."""
    share, back, tree = _wire_round_trip(state)
    assert back.encoded.tree == share.encoded.tree
    assert [(t.path, t.spec) for t in back.encoded.tensors] == [
        (t.path, t.spec) for t in share.encoded.tensors
    ]
    assert back.pieces == share.pieces
    assert tree.count('"$column"') == sent_as_columns


def test_a_references_dict_the_encoder_did_not_place_goes_as_a_dict() -> None:
    """A ``References`` without a path (not made by the encoder) is written as the dict it is,
    and its tensors' paths go as they are."""
    from ckptproto.tree import References

    prepared = prepare({"m": _column(10)}, None, Solo())
    column = prepared.encoded.tree["m"]
    bare = References(column)
    bare.first = column.first  # no path
    prepared.encoded.tree["m"] = bare
    columns, tree, spec_ids = share_wire.pack(prepared.encoded)
    assert '"$column"' not in tree and columns["loose"][0] == list(range(10))
    job, found = share_wire.loads(json.dumps({"share": columns})[:-1] + ',"tree":' + tree + "}")
    back = share_wire.unpack(job["share"], spec_ids, job["tree"], found)
    assert [t.path for t in back.encoded.tensors] == [f"m.w{i}" for i in range(10)]
    assert back.encoded.tree == prepared.encoded.tree


def test_a_column_that_does_not_fit_the_job_is_refused() -> None:
    """Columns that overlap, run past the tensors or are spelled wrong: a malformed job."""
    prepared = prepare({"m": _column(10), "n": _column(10)}, None, Solo())
    columns, tree, spec_ids = share_wire.pack(prepared.encoded)
    assert tree.count('"$column"') == 2
    for bad_tree in (
        tree.replace('"$column":[10,', '"$column":[5,'),  # overlaps the first
        tree.replace('"$column":[10,', '"$column":[11,'),  # one past the end
        tree.replace('"$column":[10,', '"$column":["10",'),
        tree.replace('"$column":[10,"n",', '"$column":[10,"n",["w0"],'),
    ):
        message = json.dumps({"share": columns})[:-1] + ',"tree":' + bad_tree + "}"
        with pytest.raises(CheckpointError, match="malformed job"):
            job, found = share_wire.loads(message)
            share_wire.unpack(job["share"], spec_ids, job["tree"], found)


def test_shared_staging_hands_out_the_memfd_and_every_views_place() -> None:
    prepared = prepare(mixed_state(), None, Solo())
    pool = staging.StagingPool()
    staged = staging.stage_state(pool, prepared.share.leaves, staging.Ready(), shared=True)
    shared = staged.shared()
    assert shared is not None
    fd, spans = shared
    # The memfd holds exactly the views' bytes at the given places.
    mapped = np.memmap(f"/proc/self/fd/{fd}", dtype=np.uint8, mode="r")
    for view, (offset, length) in zip(staged.views, spans.tolist(), strict=True):
        assert bytes(mapped[offset : offset + length]) == bytes(view)
    staged.release()
    plain = staging.stage_state(pool, prepared.share.leaves, staging.Ready())
    assert plain.shared() is None  # a pageable slab is not shared
    plain.release()


_CHILD = """
import sys, numpy as np, ckptproto
saver = ckptproto.AsyncSaver(writer="process")
saver.save({"w": np.arange(1 << 20, dtype=np.float64), "trainer": {"global_step": 9}}, sys.argv[1])
"""


def test_interpreter_exit_right_after_save_still_commits_through_the_process(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert ckptproto.verify(tmp_path / "ckpt").step == 9
    assert np.array_equal(ckptproto.load(tmp_path / "ckpt")["w"], np.arange(1 << 20, dtype=np.float64))
    assert leftovers(tmp_path) == []


_HELD_PARENT = """
import sys, time, torch, ckptproto
saver = ckptproto.AsyncSaver(writer="process")
fut = saver.save({"w": torch.ones(1000), "trainer": {"global_step": 3}}, sys.argv[1])
while saver.writer_pid is None:  # started by the saver's thread
    time.sleep(0.01)
print(saver.writer_pid, flush=True)
time.sleep(600)  # the test kills us while the writer process holds the save
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"  # a zombie nobody reaped yet
    except FileNotFoundError:
        return True


def test_a_parent_killed_mid_save_takes_the_save_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training process killed for real while its writer process is in the middle of a save:
    the child exits at once and commits nothing, as a writer thread would have died with the
    process; the next sweep removes its leftover. (A child that finished the save after its
    parent was gone would commit into a directory that a restarted job may be using.)"""
    hold, out = child_hook(tmp_path, monkeypatch, "CKPTPROTO_TEST_HOLD_MARKER")  # holds it in write_file
    script = tmp_path / "parent.py"
    script.write_text(_HELD_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), str(out / "step_3")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        reached = Path(str(hold) + ".reached")
        deadline = time.monotonic() + 60
        while not reached.exists():
            assert time.monotonic() < deadline and parent.poll() is None, "the save never reached its write"
            time.sleep(0.01)
        assert leftovers(out), "the save in flight has its temporary directory"
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 30
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    hold.unlink()  # a child still alive now would go on to commit
    time.sleep(0.5)
    assert _gone(child), "the writer process outlived the training process"
    assert not (out / "step_3").exists()
    assert ckptproto.remove_leftovers(out) and leftovers(out) == []


def test_a_forked_child_lets_go_of_the_parents_writer_process(tmp_path: Path) -> None:
    """A DataLoader worker forked from the training process must not keep the writer process's
    parent pipe open (the writer would then outlive a killed training process)."""
    with ckptproto.AsyncSaver(writer="process") as saver:
        saver.save({"w": torch.ones(2)}, tmp_path / "a").result(timeout=60)
        alive = saver._writer_process._alive if saver._writer_process is not None else None
        assert alive is not None
        pid = os.fork()
        if pid == 0:
            try:
                os.fstat(alive)
                os._exit(1)  # still open in the child
            except OSError:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


def test_a_save_in_flight_leaves_the_collector_nothing_to_do(tmp_path: Path) -> None:
    """The per-tensor objects a save builds (tree, leaves, pieces) are dropped before save()
    returns, while the collector is paused: alive across the loop's allocations they cost it
    young and full collections (~100 ms each at 20,000 tensors), the largest part of what a
    loop lost to a save in flight."""
    state = {f"layers.{i}.w": torch.full((4,), float(i)) for i in range(5000)}
    passes: list[int] = []

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    with ckptproto.AsyncSaver(writer="process") as saver:
        saver.save(state, tmp_path / "warm").result(timeout=60)  # the slab and its views
        gc.collect()
        gc.callbacks.append(count)
        try:
            for i in range(3):
                saver.save(state, tmp_path / f"c{i}").result(timeout=60)
        finally:
            gc.callbacks.remove(count)
    # Before: 18 passes here, one of them over the older generation. The saves' own few
    # objects (futures, answers) may still fill the young generation once in a while.
    assert len(passes) <= 3 and set(passes) <= {0}, passes
    assert torch.equal(ckptproto.load(tmp_path / "c2")["layers.4999.w"], torch.full((4,), 4999.0))


def test_the_writer_imports_this_ckptproto_whatever_the_current_directory_holds(tmp_path: Path) -> None:
    """A training script run from a directory that holds another ckptproto (a checkout, an
    older copy) must still get a writer process of its own version: ``python -m`` would put
    the current directory first on the child's sys.path."""
    shadow = tmp_path / "cwd" / "ckptproto"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the wrong ckptproto')\n")
    script = tmp_path / "script" / "child.py"
    script.parent.mkdir()
    script.write_text(
        "import sys, torch, ckptproto\n"
        "with ckptproto.AsyncSaver(writer='process') as saver:\n"
        "    saver.save({'w': torch.ones(3)}, sys.argv[1]).result(timeout=60)\n"
    )
    root = str(Path(ckptproto.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        cwd=shadow.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(ckptproto.load(tmp_path / "ckpt")["w"], torch.ones(3))


def test_a_column_sent_again_is_the_same_text_and_a_changed_one_is_written_anew() -> None:
    """The text of a column sent lately is taken again for the same first index, path and
    keys (a module saved again); a key changed gives a text of its own."""
    state = {"models": {"a": _column(10), "b": _column(9, 100.0)}, "step": 1}
    _share, _back, first = _wire_round_trip(state)
    share, back, again = _wire_round_trip({"models": {"a": _column(10), "b": _column(9, 7.0)}, "step": 1})
    assert again == first and back.encoded.tree == share.encoded.tree
    renamed = {"models": {"a": _column(10, key="v{}"), "b": _column(9, 7.0)}, "step": 1}
    share, back, text = _wire_round_trip(renamed)
    assert '"v0"' in text and '"w0"' not in text.split('"b"')[0]
    assert back.encoded.tree == share.encoded.tree
    assert [t.path for t in back.encoded.tensors] == [t.path for t in share.encoded.tensors]
