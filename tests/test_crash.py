"""Crash safety under real SIGKILL: saves (sync, async, overwrite, with retention) are killed at
random moments and at injected points, and after every kill the directory is checked.

CI mode runs a few hundred kills; ``CKPTPROTO_STRESS=1`` runs ten times more. Figures are
printed (``pytest -s``) and, with ``CKPTPROTO_RELIABILITY_REPORT=file.jsonl``, appended there.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptproto
from ckptproto.format import layout
from ckptproto.io import commit, sweep

sys.path.insert(0, str(Path(__file__).parent))
from _crash_worker import CALLBACK_RE, STEP_RE, committed_steps, state_for
from _reliability import STRESS, report, scratch_dir

KILLS = 3000 if STRESS else 300
KEEP = 2
WORKER = Path(__file__).with_name("_crash_worker.py")

KILL_POINTS = {
    "sync": [
        ("writer.write_file", "before"),
        ("writer.write_file", "after"),
        ("writer.write_small_file", "before"),
        ("writer.write_small_file", "after"),
        ("commit.fsync_dir", "before"),
        ("commit.fsync_dir", "after"),
        ("commit._rename_noreplace", "before"),
        ("commit._rename_noreplace", "after"),
    ],
    "overwrite": [
        ("commit._exchange", "before"),
        ("commit._exchange", "after"),
        ("commit.fsync_dir", "after"),
        ("shutil.rmtree", "before"),
        ("os.unlink", "after"),
    ],
    "overwrite-noexchange": [
        ("os.rename", "before"),
        ("os.rename", "after"),
        ("commit.fsync_dir", "after"),
        ("shutil.rmtree", "before"),
        ("os.unlink", "after"),
    ],
    "retain": [
        ("os.rename", "before"),
        ("os.rename", "after"),
        ("commit.fsync_dir", "after"),
        ("shutil.rmtree", "before"),
        ("os.unlink", "after"),
    ],
}
KILL_POINTS["async"] = KILL_POINTS["sync"]
KILL_POINTS["retain-noexchange"] = KILL_POINTS["retain"]
KILL_POINTS["callback"] = [
    *KILL_POINTS["retain"],
    ("writer.write_file", "before"),
    ("writer.write_small_file", "after"),
]


class ForkServer:
    def __init__(self, tmp: Path) -> None:
        self.stderr = open(tmp / "worker.stderr", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), "--torch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            bufsize=1,
        )
        self.unreached = 0  # injected kill points never reached (the child was killed late)

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.stderr.seek(0)
            raise AssertionError(f"crash worker died: {self.stderr.read()[-3000:]}")
        result: dict[str, Any] = json.loads(line)
        return result

    def trial(self, trial: dict[str, Any], kill_after: float | None) -> int:
        """Run one trial; SIGKILL the child after ``kill_after`` s (None: it kills itself)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(trial) + "\n")
        pid = self._read()["pid"]
        if kill_after is not None:
            time.sleep(kill_after)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        else:
            # 30 s, not 10: on a loaded 2-core machine a trial's save took longer than 10 s
            # and its kill point was counted as never reached (a passing run never waits).
            return self._read_with_deadline(time.monotonic() + 30, pid)
        status: int = self._read()["status"]
        return status

    def _read_with_deadline(self, deadline: float, pid: int) -> int:
        # An injected kill point that is never reached would loop forever: bound it.
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            self.unreached += 1
            with contextlib.suppress(ProcessLookupError):  # it may end on its own meanwhile
                os.kill(pid, signal.SIGKILL)
        status: int = self._read()["status"]
        return status

    def stderr_tail(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read()[-3000:]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = ForkServer(tmp_path_factory.mktemp("crash-worker"))
    yield s
    s.close()


def returned_steps(progress: Path) -> list[int]:
    if not progress.exists():
        return []
    return [int(x) for x in progress.read_text().split("\n") if x.strip().isdigit()]


def check_checkpoint(path: Path, seed: int, stats: Counter[str]) -> int:
    """Verify and load ``path`` fully; it must hold exactly the state of its step."""
    info = ckptproto.verify(path)
    state = ckptproto.load(path)
    step = state["trainer"]["global_step"]
    assert info.step == step
    expected = state_for(step, seed)
    np.testing.assert_array_equal(state["models"]["model"]["w"], expected["models"]["model"]["w"])
    np.testing.assert_array_equal(state["models"]["model"]["b"], expected["models"]["model"]["b"])
    stats["checkpoints verified"] += 1
    return int(step)


def check_callback_checkpoint(path: Path, stats: Counter[str]) -> int:
    """A CheckpointCallback checkpoint: whole, and its model weight holds its step."""
    ckptproto.verify(path)
    state = ckptproto.load(path)
    step = int(state["trainer"]["global_step"])
    assert path.name == f"checkpoint_step_{step}"
    weight = state["models"]["model"]["weight"]
    assert bool((weight == float(step)).all()), f"{path} holds the weights of another step"
    stats["checkpoints verified"] += 1
    return step


def check_lane(lane: Path, progress: Path, mode: str, seed: int, stats: Counter[str]) -> None:
    entries = sorted(os.listdir(lane)) if lane.exists() else []
    leftovers = [n for n in entries if layout.is_leftover(n)]
    for name in entries:
        if layout.is_hidden(name):
            assert layout.is_leftover(name), name
            # a temporary directory is never taken for a checkpoint
            with pytest.raises(ckptproto.CheckpointNotFoundError):
                ckptproto.read_manifest(lane / name)
        else:
            # nothing non-hidden is ever half-written: it is a committed checkpoint
            assert commit.is_committed(lane / name), f"{lane / name} is visible but not committed"
            if mode == "callback":
                check_callback_checkpoint(lane / name, stats)
            else:
                check_checkpoint(lane / name, seed, stats)
    stats["leftovers found"] += len(leftovers)
    # the next run's cleanup removes every leftover of the killed writer
    removed = ckptproto.remove_leftovers(lane)
    stats["leftovers removed"] += len(removed)
    remaining = [n for n in os.listdir(lane) if layout.is_leftover(n)] if lane.exists() else []
    assert remaining == [], f"cleanup left {remaining}: {[_why_kept(lane / n) for n in remaining]}"
    restored = [n for n in os.listdir(lane) if n not in entries] if lane.exists() else []
    stats["checkpoints restored by cleanup"] += len(restored)
    done = returned_steps(progress)
    if mode == "overwrite":
        latest = lane / "latest"
        if done:
            # a save that returned is never lost, even half-way through being replaced
            assert commit.is_committed(latest), "the replaced checkpoint was lost"
            assert check_checkpoint(latest, seed, stats) >= done[-1]
        return
    steps = committed_steps(lane, CALLBACK_RE if mode == "callback" else STEP_RE)
    if done:
        # resume (newest committed step_N) picks up at least the last save that returned
        assert steps and steps[-1] >= done[-1], (steps, done[-5:])
    if mode in ("retain", "callback"):
        # a kill between commit and deletion leaves more checkpoints, never fewer
        assert len(steps) >= min(KEEP, len(set(done))), (steps, done[-5:])
        floor = steps[-KEEP] if len(steps) >= KEEP else -1
        assert all(s in steps or s < floor for s in done), (steps, done[-5:])


def _why_kept(path: Path) -> dict[str, Any]:
    """What cleanup saw of a leftover it kept (for the failure message)."""
    info = layout.parse_leftover(path.name)
    fd = sweep.try_lock(path)
    if fd is not None and fd >= 0:
        os.close(fd)
    return {
        "locked by another process": fd is None,
        "lock holders": _lock_holders(path),
        "marked": (path / commit.LOCKED_MARKER).exists(),
        "pid alive": info is not None and sweep.pid_alive(info),
        "contents": sorted(os.listdir(path)) if path.is_dir() else None,
    }


def _lock_holders(path: Path) -> list[str]:
    """The /proc/locks lines on ``path``'s inode, each with its pid's command line if it runs
    (for flock the pid is the process that took the lock; a forked child may hold it now)."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) > 5 and fields[5].rsplit(":", 1)[-1] == str(inode):
            try:
                cmd = Path(f"/proc/{fields[4]}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                cmd = "(gone)"
            found.append(f"{line} :: {cmd}")
    return found


def prune(lane: Path, keep: int) -> None:
    for old in committed_steps(lane)[:-keep] if lane.exists() else []:
        commit.discard(lane / f"step_{old}")


@pytest.fixture
def lanes_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the killed saves write (tmpfs when there is one: _reliability.scratch_dir)."""
    with scratch_dir(tmp_path, "ckptproto-crash-") as path:
        yield path


def test_sigkill_during_saves(server: ForkServer, lanes_dir: Path) -> None:
    tmp_path = lanes_dir
    rng = random.Random(1234)
    lanes = [
        ("sync", False),
        ("async", False),
        ("retain", False),
        ("overwrite", False),
        ("overwrite", True),  # no renameat2 at all: the rename fallbacks (trash dir, rename(2))
        ("retain", True),
        ("callback", False),  # CheckpointCallback: save every step, keep 2, resume latest
    ]
    stats: Counter[str] = Counter()
    start = time.monotonic()
    for i in range(KILLS):
        mode, no_exchange = lanes[i % len(lanes)]
        name = f"{mode}{'-noexchange' if no_exchange else ''}"
        lane, progress = tmp_path / name, tmp_path / f"{name}.progress"
        lane.mkdir(exist_ok=True)
        seed = zlib.crc32(name.encode()) % 1000
        trial: dict[str, Any] = {
            "dir": str(lane),
            "progress": str(progress),
            "mode": mode,
            "seed": seed,
            "keep": KEEP,
            "no_exchange": no_exchange,
            "kill_at": None,
        }
        if mode == "callback":
            newest_before = max(committed_steps(lane, CALLBACK_RE), default=0)
            progress_before = progress.stat().st_size if progress.exists() else 0
        injected = rng.random() < 0.4
        if injected:
            target, when = rng.choice(KILL_POINTS[name])
            trial["kill_at"] = [target, when, rng.randint(1, 4)]
            before = server.unreached
            status = server.trial(trial, None)
            if server.unreached != before:
                print(f"kill point not reached: {trial}")
            stats[f"injected {target} {when}"] += 1
        else:
            status = server.trial(trial, rng.uniform(0.0, 0.06))
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"trial {trial} ended with status {status}, not SIGKILL: {server.stderr_tail()}"
        )
        stats["kills"] += 1
        if mode == "callback":
            lines = progress.read_bytes()[progress_before:].decode().split("\n") if progress.exists() else []
            resumed = [int(x.split()[1]) for x in lines if x.startswith("resume ")]
            if resumed:  # resume picked the newest committed checkpoint
                assert resumed == [newest_before], (resumed, newest_before)
                stats["resumes checked"] += 1
        check_lane(lane, progress, mode, seed, stats)
        if mode in ("sync", "async"):
            prune(lane, 3)  # the test's own housekeeping, outside any kill
    stats["saves returned"] = sum(len(returned_steps(p)) for p in tmp_path.glob("*.progress"))
    report(
        "crash",
        {
            "dir": str(tmp_path.parent),
            "seconds": round(time.monotonic() - start, 1),
            **dict(sorted(stats.items())),
        },
    )
    assert stats["kills"] == KILLS
    assert server.unreached == 0, f"{server.unreached} injected kill points were never reached"
    assert stats["leftovers removed"] > 0  # kills did land mid-save
    assert stats["saves returned"] > KILLS  # and saves did complete between kills


# -- remove_leftovers and discard, directly ------------------------------------------------------


def _leftover(parent: Path, final: str, pid: int, host: str | None = None, trash: bool = False) -> Path:
    marker = layout.TRASH_MARKER if trash else layout.TEMP_MARKER
    path = parent / f".{final}{marker}0123456789abP{pid}H{host or layout.this_host()}"
    path.mkdir()
    (path / "data-00000-000.safetensors").write_bytes(b"x")
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_remove_leftovers_spares_live_writers(tmp_path: Path) -> None:
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        gone = _leftover(tmp_path, "step_1", dead)
        gone_trash = _leftover(tmp_path, "step_2", dead, trash=True)
        keep_live = _leftover(tmp_path, "step_3", live.pid)
        keep_self = _leftover(tmp_path, "step_4", os.getpid())
        keep_other_host = _leftover(tmp_path, "step_5", dead, host="anotherhost")
        untagged = tmp_path / f".step_6{layout.TEMP_MARKER}0123456789ab"
        untagged.mkdir()
        removed = ckptproto.remove_leftovers(tmp_path)
        assert sorted(removed) == sorted([gone, gone_trash])
        for kept in (keep_live, keep_self, keep_other_host, untagged):
            assert kept.is_dir()
    finally:
        live.kill()
        live.wait()


def test_temp_names_carry_pid_and_host() -> None:
    info = layout.parse_leftover(layout.temp_name("step_7"))
    assert info is not None
    assert (info.final_name, info.trash, info.pid, info.host) == (
        "step_7",
        False,
        os.getpid(),
        layout.this_host(),
    )
    trash = layout.parse_leftover(layout.trash_name("a-b.c"))
    assert trash is not None and trash.trash and trash.final_name == "a-b.c" and trash.pid == os.getpid()
    assert layout.parse_leftover("step_7") is None


def test_cleanup_moves_back_a_checkpoint_whose_replacement_was_killed(tmp_path: Path) -> None:
    ckptproto.save({"x": np.arange(3)}, tmp_path / "ckpt")
    # the rename fallback was killed after moving the old checkpoint aside, beside its new one
    pid = _dead_pid()
    trash = tmp_path / f".ckpt{layout.TRASH_MARKER}0123456789abP{pid}H{layout.this_host()}"
    os.rename(tmp_path / "ckpt", trash)
    new = _leftover(tmp_path, "ckpt", pid)
    assert ckptproto.remove_leftovers(tmp_path) == [new]
    np.testing.assert_array_equal(ckptproto.load(tmp_path / "ckpt")["x"], np.arange(3))
    assert not trash.exists()


def test_cleanup_never_restores_a_deletion_or_a_half_deleted_checkpoint(tmp_path: Path) -> None:
    pid = _dead_pid()
    ckptproto.save({"x": np.arange(3)}, tmp_path / "deleted")
    ckptproto.save({"x": np.arange(3)}, tmp_path / "half")
    # a deletion (retention) cut short: trash without a replacing temp dir is removed
    trash = tmp_path / f".deleted{layout.TRASH_MARKER}0123456789abP{pid}H{layout.this_host()}"
    os.rename(tmp_path / "deleted", trash)
    # a replacement cut short while its trash was being removed: data file already gone
    half = tmp_path / f".half{layout.TRASH_MARKER}0123456789abP{pid}H{layout.this_host()}"
    os.rename(tmp_path / "half", half)
    next(half.glob("*.safetensors")).unlink()
    new = _leftover(tmp_path, "half", pid)
    assert sorted(ckptproto.remove_leftovers(tmp_path)) == sorted([trash, half, new])
    assert os.listdir(tmp_path) == []


def test_save_cleans_a_dead_writers_leftovers(tmp_path: Path) -> None:
    gone = _leftover(tmp_path, "step_1", _dead_pid())
    ckptproto.save({"x": np.zeros(2)}, tmp_path / "step_1")
    assert not gone.exists()
    ckptproto.verify(tmp_path / "step_1")


def test_discard_hides_before_deleting(tmp_path: Path) -> None:
    ckptproto.save({"x": np.zeros(2)}, tmp_path / "step_1")
    seen: list[list[str]] = []
    real_rmtree = commit.shutil.rmtree

    def spy(path: Any, *args: Any, **kwargs: Any) -> None:
        seen.append(sorted(os.listdir(tmp_path)))
        real_rmtree(path, *args, **kwargs)

    commit.shutil.rmtree = spy  # type: ignore[assignment]
    try:
        commit.discard(tmp_path / "step_1")
    finally:
        commit.shutil.rmtree = real_rmtree  # type: ignore[assignment]
    assert seen and all(layout.is_hidden(n) for n in seen[0])  # gone from view before deletion
    assert os.listdir(tmp_path) == []


def test_step_names_match_worker() -> None:
    assert STEP_RE.fullmatch("step_12") and not STEP_RE.fullmatch(".step_12")
