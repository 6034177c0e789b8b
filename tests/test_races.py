"""Races between real processes (the reliability harness, with tests/test_crash.py):

* concurrent writers: two processes save to the same new path with ``overwrite=False`` at the
  same instant; exactly one wins, the other gets CheckpointExistsError (renameat2 no-replace,
  and the rename(2) fallback);
* readers (load, load mmap, verify, load_into) against a writer re-saving the same path with
  ``overwrite=True``: every read is one generation, whole; no error;
* readers against retention (save a new step, delete the older ones): every read is whole or
  CheckpointNotFoundError, never a raw FileNotFoundError or a false corruption report.

CI mode runs a few seconds; ``CKPTPROTO_STRESS=1`` ten times more. Figures are printed
(``pytest -s``) and appended to $CKPTPROTO_RELIABILITY_REPORT.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptproto

sys.path.insert(0, str(Path(__file__).parent))
from _reliability import STRESS, report, scratch_dir

WORKER = Path(__file__).with_name("_race_worker.py")
WRITER_TRIALS = 2000 if STRESS else 100
READ_SECONDS = 30.0 if STRESS else 2.0


@pytest.fixture
def race_dir(tmp_path: Path) -> Iterator[Path]:
    with scratch_dir(tmp_path, "ckptproto-race-") as path:
        yield path


def _start(cmd: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(cmd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"race worker failed ({proc.returncode}): {err[-3000:]}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2-noreplace", "rename-fallback"])
def test_concurrent_writers_exactly_one_wins(race_dir: Path, fallback: bool) -> None:
    period = 0.015
    t0 = time.time() + 1.5  # both workers are up (imports done) by then
    base = {"role": "race_save", "dir": str(race_dir), "trials": WRITER_TRIALS, "period": period, "t0": t0}
    procs = [_start({**base, "me": me, "fallback": fallback}) for me in (0, 1)]
    results = [_result(p, timeout=60 + WRITER_TRIALS * period * 3)["outcomes"] for p in procs]
    stats: Counter[str] = Counter()
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        outcome = sorted([a[0], b[0]])
        stats["trials"] += 1
        stats["overlapping (neither started late)"] += not a[1] and not b[1]
        if outcome == ["exists", "ok"]:
            stats["one won, the other CheckpointExistsError"] += 1
            winner = 0 if a[0] == "ok" else 1
            step = ckptproto.load(race_dir / str(i))["trainer"]["global_step"]
            stats["committed state is the winner's"] += step == 2 * i + winner
        else:
            stats[f"WRONG: {outcome}"] += 1
    leftovers = [n for n in os.listdir(race_dir) if n.startswith(".")]
    report(
        f"races_concurrent_writers{'_fallback' if fallback else ''}", {**stats, "leftovers": len(leftovers)}
    )
    assert stats["one won, the other CheckpointExistsError"] == WRITER_TRIALS, stats
    assert stats["committed state is the winner's"] == WRITER_TRIALS, stats
    assert not leftovers, leftovers


def _readers_against(
    race_dir: Path, writer: dict[str, Any], reader: dict[str, Any], name: str
) -> Counter[str]:
    deadline = time.time() + 1.5 + READ_SECONDS
    procs = [_start({**writer, "deadline": deadline})]
    procs += [_start({**reader, "deadline": deadline}) for _ in range(2)]
    results = [_result(p, timeout=120 + READ_SECONDS * 3) for p in procs]
    tally: Counter[str] = Counter()
    samples: dict[str, str] = {}
    for r in results[1:]:
        tally.update(r["tally"])
        samples.update(r["samples"])
    report(
        name, {"writer saves": results[0]["saves"], "seconds": READ_SECONDS, **dict(sorted(tally.items()))}
    )
    bad = {k: v for k, v in tally.items() if not k.endswith((" whole", " not found"))}
    assert not bad, (bad, samples)
    return tally


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2-exchange", "rename-fallback"])
def test_readers_against_an_overwriting_writer(race_dir: Path, fallback: bool) -> None:
    path = race_dir / "latest"
    ckptproto.save({"w": np.zeros(65536, dtype=np.float32), "trainer": {"global_step": 0}}, path)
    tally = _readers_against(
        race_dir,
        {"role": "overwrite_loop", "path": str(path), "fallback": fallback},
        {"role": "read_loop", "path": str(path)},
        f"races_readers_vs_overwrite{'_fallback' if fallback else ''}",
    )
    if not fallback:  # with the exchange the path always holds a checkpoint
        assert not any(k.endswith(" not found") for k in tally), tally
    for kind in ("load", "mmap", "verify", "load_into"):
        assert tally[f"{kind} whole"] > 0, tally


def test_readers_against_retention(race_dir: Path) -> None:
    tally = _readers_against(
        race_dir,
        {"role": "retain_loop", "dir": str(race_dir)},
        {"role": "read_loop", "dir": str(race_dir)},
        "races_readers_vs_retention",
    )
    for kind in ("load", "mmap", "verify", "load_into"):
        assert tally[f"{kind} whole"] > 0, tally


class _Interactive:
    """A worker process taking one JSON line and answering one, optionally in a new PID
    namespace (``unshare --pid --fork --kill-child``: killing it kills the worker)."""

    def __init__(self, role: str, new_namespace: bool) -> None:
        argv = [sys.executable, str(WORKER), json.dumps({"role": role})]
        if new_namespace:
            argv = ["unshare", "--pid", "--fork", "--kill-child", *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )

    def ask(self, message: dict[str, Any] | str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((message if isinstance(message, str) else json.dumps(message)) + "\n")
        line = self.proc.stdout.readline()
        assert line, f"worker exited ({self.proc.poll()})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _unshare_works() -> bool:
    try:
        probe = ["unshare", "--pid", "--fork", "--kill-child", "true"]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


NS_TRIALS = 60 if STRESS else 6


def test_leftover_sweep_across_pid_namespaces(race_dir: Path) -> None:
    """A save paused mid-write in one PID namespace, ``remove_leftovers`` run from another
    (both ways; same host name): the live save is never touched. Every third writer is then
    SIGKILLed instead of resumed: its leftover is removed, also where its pid number is taken
    in the sweeper's namespace (pid 1 of the inner namespace, seen from outside)."""
    if not _unshare_works():
        pytest.skip("unshare --pid --fork is not permitted here (needs root or user namespaces)")
    stats: Counter[str] = Counter()
    sweepers = {inside: _Interactive("ns_sweeper", inside) for inside in (False, True)}
    try:
        for i in range(NS_TRIALS):
            writer_inside = i % 2 == 1  # the sweeper runs in the other namespace
            sweeper = sweepers[not writer_inside]
            writer = _Interactive("ns_writer", writer_inside)
            try:
                paused = writer.ask({"save": str(race_dir / f"step_{i}"), "step": i})
                temp = Path(paused["paused"])
                removed = sweeper.ask({"sweep": str(race_dir)})["removed"]
                stats["live saves swept at"] += 1
                if str(temp) in removed or not temp.is_dir():
                    stats["WRONG: a live save was removed"] += 1
                    continue
                if i % 3 == 2:
                    writer.kill()  # kills unshare; the kernel then kills the worker inside
                    deadline = time.monotonic() + 30
                    removed = sweeper.ask({"sweep": str(race_dir)})["removed"]
                    while str(temp) not in removed and temp.exists() and time.monotonic() < deadline:
                        time.sleep(0.05)  # until the worker is really gone (its lock released)
                        removed = sweeper.ask({"sweep": str(race_dir)})["removed"]
                    where = (
                        "writer inside, sweeper outside"
                        if writer_inside
                        else "writer outside, sweeper inside"
                    )
                    stats[f"dead writer ({where}): leftover removed"] += str(temp) in removed
                    stats[f"dead writer ({where}): leftover kept"] += str(temp) not in removed
                    continue
                assert writer.ask("go")["saved"] == str(race_dir / f"step_{i}")
                assert ckptproto.verify(race_dir / f"step_{i}").step == i
                stats["live saves committed whole after the sweep"] += 1
            finally:
                if writer.proc.poll() is None:
                    writer.close()
    finally:
        for sweeper in sweepers.values():
            sweeper.close()
    report("races_leftover_sweep_pid_namespaces", dict(sorted(stats.items())))
    assert not stats["WRONG: a live save was removed"], stats
    assert stats["live saves committed whole after the sweep"] == NS_TRIALS - NS_TRIALS // 3, stats
    assert not any(k.endswith("leftover kept") and v for k, v in stats.items()), stats
