"""AsyncSaver: snapshot consistency under in-place mutation, saves in flight, failures in the
background, close() and interpreter exit with pending saves."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ckptproto
from ckptproto import CheckpointError, CheckpointExistsError, CheckpointWriteError
from ckptproto.errors import SaverBusyError, UnsupportedValueError
from ckptproto.format import layout
from ckptproto.io import async_save, pipeline, staging, threads

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MODES = ["blocking", "background"]


# -- helpers ------------------------------------------------------------------------------------


class Gate:
    """Holds a real pipeline stage (the write, or the staging copy) until ``open()``, so tests
    can have saves deterministically in flight."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
        self.event = threading.Event()
        self.entered = threading.Semaphore(0)
        real = getattr(module, name)

        def gated(*args: Any, **kwargs: Any) -> Any:
            self.entered.release()
            self.event.wait(30)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, gated)

    def open(self) -> None:
        self.event.set()


@pytest.fixture
def write_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate(monkeypatch, pipeline, "run")
    yield gate
    gate.open()


@pytest.fixture
def stage_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate(monkeypatch, staging, "stage_state")
    yield gate
    gate.open()


def committed(path: Path) -> bool:
    return (path / layout.MANIFEST_NAME).is_file()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if layout.is_hidden(p.name))


def random_state(rng: random.Random, device: str = "cpu") -> dict[str, Any]:
    """A state of random tensors (several dtypes, non-contiguous views, a tied tensor, numpy
    arrays) and plain values."""
    tensors: dict[str, Any] = {}
    dtypes = [
        torch.float32,
        torch.float64,
        torch.bfloat16,
        torch.int64,
        torch.int8,
        torch.bool,
        torch.complex64,
    ]
    for i in range(rng.randint(1, 6)):
        shape = tuple(rng.randint(0 if rng.random() < 0.05 else 1, 40) for _ in range(rng.randint(0, 3)))
        dtype = rng.choice(dtypes)
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        if dtype == torch.bool:
            t = torch.rand(shape, generator=g) > 0.5
        elif dtype in (torch.int64, torch.int8):
            t = torch.randint(-100, 100, shape, generator=g, dtype=dtype)
        else:
            t = torch.randn(shape, generator=g, dtype=dtype if dtype != torch.bfloat16 else torch.float32).to(
                dtype
            )
        t = t.to(device)
        if t.dim() >= 2 and rng.random() < 0.3:
            t = t.transpose(0, 1)  # non-contiguous view
        tensors[f"t{i}"] = t
    if rng.random() < 0.5:
        tensors["tied"] = tensors["t0"]
    arrays = {
        f"a{i}": np.random.default_rng(rng.randrange(2**31))
        .standard_normal(rng.randint(0, 50))
        .astype(rng.choice([np.float32, np.float64, np.int32]))
        for i in range(rng.randint(0, 2))
    }
    return {
        "models": {"model": tensors},
        "extra": arrays,
        "trainer": {"global_step": rng.randint(0, 10**6), "history": [rng.random() for _ in range(3)]},
    }


def mutate(state: dict[str, Any]) -> None:
    """Change every tensor in place, as an optimizer step would, and the plain list too."""
    seen: set[int] = set()
    for t in state["models"]["model"].values():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)
    for a in state["extra"].values():
        a += 1
    state["trainer"]["history"].append(-1.0)
    state["trainer"]["global_step"] += 1


def snapshot(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "models": {"model": {k: t.detach().cpu().clone() for k, t in state["models"]["model"].items()}},
        "extra": {k: a.copy() for k, a in state["extra"].items()},
        "trainer": {
            "global_step": state["trainer"]["global_step"],
            "history": list(state["trainer"]["history"]),
        },
    }


def assert_same(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert loaded["trainer"] == expected["trainer"]
    assert loaded["models"]["model"].keys() == expected["models"]["model"].keys()
    for k, t in expected["models"]["model"].items():
        got = loaded["models"]["model"][k]
        assert got.dtype == t.dtype and got.shape == t.shape, k
        assert torch.equal(got, t), k
    for k, a in expected["extra"].items():
        got = loaded["extra"][k]
        assert got.dtype == a.dtype and np.array_equal(got, a), k


# -- snapshot consistency ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_holds_the_state_as_of_save_despite_immediate_mutation(tmp_path: Path, mode: str) -> None:
    rng = random.Random(f"snapshot-{mode}")
    with ckptproto.AsyncSaver(max_pending=3, staging=mode) as saver:  # type: ignore[arg-type]
        checks: list[tuple[ckptproto.SaveFuture, dict[str, Any]]] = []
        for trial in range(30):
            state = random_state(rng)
            expected = snapshot(state)
            fut = saver.save(state, tmp_path / f"c{trial}")
            fut.wait_staged()
            mutate(state)
            mutate(state)
            checks.append((fut, expected))
        for fut, expected in checks:
            info = fut.result(timeout=60)
            assert info.step == expected["trainer"]["global_step"]
            assert_same(ckptproto.load(info.path), expected)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", MODES)
def test_plain_values_are_captured_by_save_itself(tmp_path: Path, mode: str, stage_gate: Gate) -> None:
    state = {"trainer": {"global_step": 3, "seen": [1, 2]}, "w": torch.zeros(3)}
    with ckptproto.AsyncSaver(staging=mode) as saver:  # type: ignore[arg-type]
        if mode == "blocking":
            stage_gate.open()
        fut = saver.save(state, tmp_path / "c", metadata={"notes": ["a"]})
        # Before staging has even run (background), mutating plain values must not leak in.
        state["trainer"]["seen"].append(3)  # type: ignore[index]
        state["trainer"]["global_step"] = 4
        stage_gate.open()
        info = fut.result(timeout=30)
    loaded = ckptproto.load(info.path)
    assert loaded["trainer"] == {"global_step": 3, "seen": [1, 2]}
    assert info.step == 3 and info.metadata["notes"] == ["a"]


def test_statefuls_are_saved_and_load_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with ckptproto.AsyncSaver(staging="background") as saver:
        fut = saver.save(
            {"models": {"model": model}, "optimizers": {"optimizer": opt}, "trainer": {"global_step": 1}},
            tmp_path / "c",
        )
        fut.wait_staged()
        opt.step()  # mutates parameters and Adam's buffers in place
        fut.result(timeout=30)
    fresh = torch.nn.Linear(8, 4)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    trainer: dict[str, Any] = {"global_step": 0}
    ckptproto.load_into(
        tmp_path / "c",
        {"models": {"model": fresh}, "optimizers": {"optimizer": fresh_opt}, "trainer": trainer},
    )
    assert trainer == {"global_step": 1}
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, expected[k])
    assert fresh_opt.state_dict()["state"][0]["step"] == 1


# -- saves in flight --------------------------------------------------------------------------


def test_several_in_flight_commit_in_order_and_raise_when_full(tmp_path: Path, write_gate: Gate) -> None:
    order: list[str] = []
    saver = ckptproto.AsyncSaver(max_pending=3, when_full="raise")
    futs = []
    for i in range(3):
        fut = saver.save({"w": torch.full((10,), float(i))}, tmp_path / f"c{i}")
        fut.add_done_callback(lambda f: order.append(f.path.name))  # type: ignore[attr-defined]
        futs.append(fut)
    assert saver.pending() == 3
    with pytest.raises(SaverBusyError, match="max_pending=3"):
        saver.save({"w": torch.zeros(1)}, tmp_path / "c3")
    assert not (tmp_path / "c3").exists()
    write_gate.open()
    assert saver.wait(timeout=30)
    assert order == ["c0", "c1", "c2"]
    for i, fut in enumerate(futs):
        assert fut.exception() is None
        assert ckptproto.load(fut.result().path)["w"][0].item() == i
    saver.save({"w": torch.zeros(1)}, tmp_path / "c3").result(timeout=30)  # room again
    saver.close()


def test_save_blocks_while_full_until_one_finishes(tmp_path: Path, write_gate: Gate) -> None:
    saver = ckptproto.AsyncSaver(max_pending=1)
    first = saver.save({"w": torch.ones(4)}, tmp_path / "a")
    second: list[ckptproto.SaveFuture] = []
    thread = threading.Thread(target=lambda: second.append(saver.save({"w": torch.ones(4)}, tmp_path / "b")))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not second  # blocked: the first save holds the only slot
    write_gate.open()
    thread.join(30)
    assert not thread.is_alive()
    assert first.result().path.name == "a" and second[0].result(timeout=30).path.name == "b"
    saver.close()


@pytest.mark.parametrize("mode", MODES)
def test_back_to_back_saves_reuse_the_staging_slabs(tmp_path: Path, mode: str) -> None:
    state = {
        "w": torch.zeros(2 << 20),
        "b": np.zeros(1 << 20, dtype=np.float32),
        "trainer": {"global_step": 0},
    }
    saver = ckptproto.AsyncSaver(max_pending=2, staging=mode)  # type: ignore[arg-type]
    rss = []
    futs = []
    for step in range(20):
        state["trainer"]["global_step"] = step  # type: ignore[index]
        fut = saver.save(state, tmp_path / f"s{step}")
        fut.wait_staged()
        state["w"].fill_(step + 1)  # type: ignore[union-attr]
        state["b"][:] = step + 1  # type: ignore[index]
        futs.append(fut)
        if step == 4:
            held = saver.pool.stats.held_bytes
            allocated = saver.pool.stats.allocated
        if step >= 4:
            rss.append(_rss_bytes())
    saver.close()
    for step, fut in enumerate(futs):
        loaded = ckptproto.load(fut.result().path)
        assert loaded["w"][0].item() == step and loaded["b"][-1] == step
    # The pool's own accounting: two slabs (max_pending=2), never more, from save 5 to 20.
    assert allocated == 2 and saver.pool.stats.allocated == 2
    assert held >= 12 << 20
    # And the process: RSS does not grow by a state's size per save (would be ~180 MiB).
    assert max(rss) - rss[0] < 12 << 20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_failing_save_is_raised_and_logged_then_a_good_one_works(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with ckptproto.AsyncSaver(staging=mode) as saver, caplog.at_level(logging.ERROR, "ckptproto"):  # type: ignore[arg-type]
        bad = saver.save({"w": torch.ones(3)}, blocker / "ckpt")
        with pytest.raises(CheckpointWriteError, match="cannot create a checkpoint"):
            bad.result(timeout=30)
        assert isinstance(bad.exception(), CheckpointWriteError)
        assert bad.staged()
        good = saver.save({"w": torch.ones(3)}, tmp_path / "good")
        assert good.result(timeout=30).path == tmp_path / "good"
        assert good.exception() is None
    assert any(str(blocker / "ckpt") in r.getMessage() for r in caplog.records)
    assert leftovers(tmp_path) == []


def test_an_existing_destination_fails_in_the_background_and_is_kept(tmp_path: Path) -> None:
    ckptproto.save({"w": torch.zeros(2)}, tmp_path / "c")
    with ckptproto.AsyncSaver() as saver:
        with pytest.raises(CheckpointExistsError, match="overwrite=True"):
            saver.save({"w": torch.ones(2)}, tmp_path / "c").result(timeout=30)
        assert ckptproto.load(tmp_path / "c")["w"].sum().item() == 0
        saver.save({"w": torch.ones(2)}, tmp_path / "c", overwrite=True).result(timeout=30)
    assert ckptproto.load(tmp_path / "c")["w"].sum().item() == 2


def test_an_unsupported_value_raises_from_save_with_nothing_started(tmp_path: Path) -> None:
    with ckptproto.AsyncSaver(max_pending=1, when_full="raise") as saver:
        with pytest.raises(UnsupportedValueError, match=r"trainer\.bad"):
            saver.save({"trainer": {"bad": object()}, "w": torch.ones(1)}, tmp_path / "c")
        assert saver.pending() == 0 and not (tmp_path / "c").exists()
        saver.save({"w": torch.ones(1)}, tmp_path / "c").result(timeout=30)


def test_a_tensor_resized_before_background_staging_fails_late(tmp_path: Path, stage_gate: Gate) -> None:
    t = torch.zeros(16)
    with ckptproto.AsyncSaver(staging="background") as saver:
        fut = saver.save({"model": {"w": t}}, tmp_path / "c")
        stage_gate.entered.acquire(timeout=30)
        t.resize_(8)  # breaks the contract: mutated before wait_staged()
        stage_gate.open()
        with pytest.raises(CheckpointError, match=r"model\.w: the tensor changed"):
            fut.result(timeout=30)
        assert not (tmp_path / "c").exists() and saver.pool.stats.in_use == 0
        saver.save({"model": {"w": t}}, tmp_path / "c").result(timeout=30)


def test_wait_staged_times_out_while_staging_is_held(tmp_path: Path, stage_gate: Gate) -> None:
    with ckptproto.AsyncSaver(staging="background") as saver:
        fut = saver.save({"w": torch.ones(4)}, tmp_path / "c")
        with pytest.raises(TimeoutError):
            fut.wait_staged(timeout=0.05)
        with pytest.raises(TimeoutError):
            fut.result(timeout=0.01)
        stage_gate.open()
        fut.wait_staged(timeout=30)
        fut.result(timeout=30)


def test_an_internal_error_in_the_writer_does_not_stop_the_saver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pipeline.run
    calls = []

    def broken_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        if len(calls) == 1:
            return None  # a writer bug: no CheckpointInfo
        if len(calls) == 2:
            raise SystemExit(1)  # not even an Exception
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "run", broken_once)
    with ckptproto.AsyncSaver(max_pending=1) as saver:
        with pytest.raises(CheckpointError, match="internal error"):
            saver.save({"w": torch.ones(2)}, tmp_path / "a").result(timeout=30)
        with pytest.raises(SystemExit):
            saver.save({"w": torch.ones(2)}, tmp_path / "b").result(timeout=30)
        assert saver.save({"w": torch.ones(2)}, tmp_path / "c").result(timeout=30).path == tmp_path / "c"
        assert saver.pool.stats.in_use == 0


# -- futures, close, the default saver --------------------------------------------------------


def test_done_callbacks_and_exception(tmp_path: Path) -> None:
    calls: list[Any] = []
    with ckptproto.AsyncSaver() as saver:
        fut = saver.save({"w": torch.ones(2)}, tmp_path / "c")
        fut.add_done_callback(lambda f: calls.append(("early", f)))
        info = fut.result(timeout=30)
        fut.add_done_callback(lambda f: calls.append(("late", f)))  # already done: runs now
    assert calls == [("early", fut), ("late", fut)]
    assert fut.done() and fut.exception() is None and not fut.cancel()
    assert info.nbytes > 0 and "done=True" in repr(fut)


def test_close_finishes_pending_saves_and_refuses_new_ones(tmp_path: Path, write_gate: Gate) -> None:
    saver = ckptproto.AsyncSaver(max_pending=3, staging="background")
    futs = [saver.save({"w": torch.full((3,), float(i))}, tmp_path / f"c{i}") for i in range(3)]
    threading.Timer(0.05, write_gate.open).start()
    saver.close()
    assert all(f.done() and f.exception() is None for f in futs)
    assert all(committed(tmp_path / f"c{i}") for i in range(3))
    with pytest.raises(CheckpointError, match="closed"):
        saver.save({"w": torch.ones(1)}, tmp_path / "late")
    saver.close()  # idempotent


def test_close_during_a_save_on_another_thread_still_commits_it(tmp_path: Path, stage_gate: Gate) -> None:
    saver = ckptproto.AsyncSaver(staging="blocking")
    futs: list[ckptproto.SaveFuture] = []
    saving = threading.Thread(target=lambda: futs.append(saver.save({"w": torch.ones(3)}, tmp_path / "c")))
    saving.start()
    assert stage_gate.entered.acquire(timeout=30)  # the save holds its slot, copying
    workers = list(saver._threads)
    closing = threading.Thread(target=saver.close)
    closing.start()
    closing.join(0.2)
    assert closing.is_alive()  # close() waits for the save being handed over
    stage_gate.open()
    saving.join(30)
    closing.join(30)
    assert not closing.is_alive() and futs[0].done() and futs[0].exception() is None
    assert committed(tmp_path / "c")
    assert workers and not any(t.is_alive() for t in workers)


def test_save_async_uses_one_default_saver(tmp_path: Path) -> None:
    fut = ckptproto.save_async({"w": torch.arange(5)}, tmp_path / "c", metadata={"step": 5})
    info = fut.result(timeout=30)
    assert info.step == 5 and async_save.default_saver() is async_save.default_saver()
    assert torch.equal(ckptproto.load(tmp_path / "c")["w"], torch.arange(5))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        ckptproto.AsyncSaver(max_pending=0)
    with pytest.raises(ValueError, match="staging"):
        ckptproto.AsyncSaver(staging="lazy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="when_full"):
        ckptproto.AsyncSaver(when_full="drop")  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_can_save_with_an_inherited_saver(tmp_path: Path, write_gate: Gate) -> None:
    threads.pool().submit(int).result()  # the parent's I/O pool has live worker threads
    saver = ckptproto.AsyncSaver(max_pending=1)
    parent = saver.save({"w": np.ones(3)}, tmp_path / "parent")  # in flight during the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            write_gate.open()
            saver.save({"w": np.zeros(3)}, tmp_path / "child").result(timeout=30)
            saver.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert np.array_equal(ckptproto.load(tmp_path / "child")["w"], np.zeros(3))
    write_gate.open()
    assert parent.result(timeout=30).path == tmp_path / "parent"
    saver.close()


# -- real processes: exit, SIGKILL, disk full -------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    import numpy as np
    import ckptproto
    path, mode, action = sys.argv[1], sys.argv[2], sys.argv[3]
    state = {"w": np.arange(6 << 20, dtype=np.float64), "trainer": {"global_step": 9}}
    if action == "diskfull":
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        saver = ckptproto.AsyncSaver(staging=mode)
        fut = saver.save(state, path)
        exc = fut.exception(timeout=60)
        small = saver.save({"w": np.ones(1000)}, path + "-small").result(timeout=60)
        print(json.dumps({"error": type(exc).__name__, "message": str(exc), "small": str(small.path)}))
        sys.exit(0)
    if action == "default":
        ckptproto.save_async(state, path)
    else:
        ckptproto.AsyncSaver(staging=mode).save(state, path)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "exit3":
        sys.exit(3)
    """
)


def run_child(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    return subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.mark.parametrize(
    ("mode", "action"), [("blocking", "exit"), ("background", "exit3"), ("blocking", "default")]
)
def test_interpreter_exit_with_a_pending_save_completes_it(tmp_path: Path, mode: str, action: str) -> None:
    target = tmp_path / "ckpt"
    proc = run_child(tmp_path, str(target), mode, action)
    assert proc.returncode == (3 if action == "exit3" else 0), proc.stderr
    info = ckptproto.verify(target)
    assert info.step == 9
    assert np.array_equal(ckptproto.load(target)["w"], np.arange(6 << 20, dtype=np.float64))
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mode", MODES)
def test_sigkill_right_after_save_leaves_a_whole_checkpoint_or_none(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "ckpt"
    proc = run_child(tmp_path, str(target), mode, "kill")
    assert proc.returncode == -signal.SIGKILL
    if target.exists():  # the save may have won the race; it must then be whole
        ckptproto.verify(target)
    visible = [p.name for p in tmp_path.iterdir() if not layout.is_hidden(p.name)]
    assert set(visible) <= {"ckpt", "child.py"}


@pytest.mark.parametrize("mode", MODES)
def test_disk_full_fails_the_save_commits_nothing_and_the_next_save_works(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "ckpt"
    proc = run_child(tmp_path, str(target), mode, "diskfull")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] == "CheckpointWriteError" and "ckpt" in result["message"]
    assert "async save to" in proc.stderr  # logged, not only raised
    assert not target.exists() and leftovers(tmp_path) == []
    ckptproto.verify(result["small"])


# -- CUDA (run where a GPU is lent) -------------------------------------------------------------


@cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_snapshot_consistency(tmp_path: Path, mode: str) -> None:
    rng = random.Random(f"cuda-{mode}")
    with ckptproto.AsyncSaver(max_pending=2, staging=mode) as saver:  # type: ignore[arg-type]
        checks = []
        for trial in range(20):
            state = random_state(rng, device="cuda")
            state["models"]["model"]["big"] = torch.randn(1 << 20, device="cuda")
            expected = snapshot(state)
            fut = saver.save(state, tmp_path / f"c{trial}")
            fut.wait_staged()
            mutate(state)  # queued on the current stream right after the save
            checks.append((fut, expected))
        for fut, expected in checks:
            assert_same(ckptproto.load(fut.result(timeout=60).path), expected)
        stats = saver.pool.stats
        assert stats.allocated - stats.freed <= 4  # held: <= max_pending slabs of each kind


@cuda
def test_cuda_pinned_pool_does_not_grow(tmp_path: Path) -> None:
    t = torch.randn(1 << 20, device="cuda")
    with ckptproto.AsyncSaver(staging="background") as saver:
        for step in range(10):
            fut = saver.save({"w": t}, tmp_path / f"c{step}")
            fut.wait_staged()
            t.add_(1)
        saver.wait()
        assert saver.pool.stats.allocated == 1
