"""``timeout=`` of the top-level API on real gloo ranks: a rank that fails before a collective
save/load (and stays alive, stuck in its own error handling) leaves the other rank waiting
only ``timeout``, not torch's 30-minute default; the error names the rank that did not come."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_helpers import run_ranks

import ckptproto

SHORT = 1.5  # seconds; the default would be 30 minutes


CALLS = ["save", "load", "load_into", "AsyncSaver"]


def scenario_rank_fails_early(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    import torch.distributed as dist

    # One group per call (created collectively up front): a collective that timed out breaks
    # its group, and each call's own timeout is what is being checked.
    groups = {call: dist.new_group(backend="gloo") for call in CALLS}
    saver = ckptproto.AsyncSaver(process_group=groups["AsyncSaver"], timeout=timedelta(seconds=SHORT))
    state = {"w": torch.arange(8.0), "step": 1}
    ckptproto.save(state, tmp / "good")
    if rank == 1:
        # The user's code fails on this rank before the next checkpoint (a bad batch, say)
        # and the process lingers in its error handling; it never joins the collectives.
        deadline = time.monotonic() + 120
        while not (tmp / "rank0-done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"teardown": False}
    calls = {
        "save": lambda g: ckptproto.save(state, tmp / "next", process_group=g, timeout=SHORT),
        "load": lambda g: ckptproto.load(tmp / "good", process_group=g, timeout=SHORT),
        "load_into": lambda g: ckptproto.load_into(
            tmp / "good", {"w": torch.zeros(8), "step": 0}, process_group=g, timeout=SHORT
        ),
        "AsyncSaver": lambda g: saver.save(state, tmp / "async").result(timeout=120),
    }
    results = {}
    try:
        for call in CALLS:
            start = time.monotonic()
            try:
                calls[call](groups[call])
            except ckptproto.DistributedCheckpointError as exc:
                results[call] = {
                    "took": time.monotonic() - start,
                    "error": str(exc),
                    "failed": exc.failed_ranks,
                }
            else:
                raise AssertionError(f"{call} should have failed: rank 1 never came")
    finally:
        (tmp / "rank0-done").touch()
    return {"teardown": False, "results": results}


def test_a_rank_that_fails_early_costs_the_others_only_the_timeout(tmp_path: Path) -> None:
    results = run_ranks(scenario_rank_fails_early, 2, tmp_path, timeout=240)[0]["results"]
    assert sorted(results) == sorted(CALLS)
    for call, result in results.items():
        assert result["failed"] == {"1": "did not answer"}, (call, result)
        assert f"rank 1 did not answer within {SHORT:g} s" in result["error"], (call, result["error"])
        # bounded by the short timeout (plus slack for a busy machine), not the 30-minute default
        assert result["took"] < SHORT + 60, (call, result)
    assert not (tmp_path / "next").exists() and not (tmp_path / "async").exists()


@pytest.mark.parametrize("bad", [0, -1, "10", True, timedelta(0)])
def test_a_bad_timeout_is_refused(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ValueError, match="timeout"):
        ckptproto.save({"w": torch.ones(2)}, tmp_path / "c", timeout=bad)
    with pytest.raises(ValueError, match="timeout"):
        ckptproto.AsyncSaver(timeout=bad)
    assert not (tmp_path / "c").exists()


def scenario_rank_hangs(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    import torch.distributed as dist

    groups = {call: dist.new_group(backend="gloo") for call in ("save", "load")}
    state = {"w": torch.arange(8.0), "step": 1}
    ckptproto.save(state, tmp / "good")
    if rank == 2:  # never joins; lingers until the others are done
        deadline = time.monotonic() + 120
        while len(list(tmp.glob("done-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        return {"teardown": False}
    calls = {
        "save": lambda g: ckptproto.save(state, tmp / "next", process_group=g, timeout=SHORT),
        "load": lambda g: ckptproto.load(tmp / "good", process_group=g, timeout=SHORT),
    }
    results = {}
    try:
        for call, fn in calls.items():
            try:
                fn(groups[call])
            except ckptproto.DistributedCheckpointError as exc:
                results[call] = {"error": str(exc), "failed": exc.failed_ranks}
            else:
                raise AssertionError(f"{call} should have failed: rank 2 never came")
    finally:
        (tmp / f"done-{rank}").touch()
    return {"teardown": False, "results": results}


def test_a_rank_that_hangs_is_named_by_rank_0_and_blamed_on_nobody_else(tmp_path: Path) -> None:
    # Rank 1 answers at once and waits for rank 0's outcome while rank 0 waits out the
    # timeout for rank 2. A timeout makes gloo close all of rank 0's connections, so rank 1
    # learns only that the group broke: it must not blame rank 0 (which did answer in time).
    results = run_ranks(scenario_rank_hangs, 3, tmp_path, timeout=240)
    for call, result in results[0]["results"].items():
        assert result["failed"] == {"2": "did not answer"}, (call, result)
        assert f"rank 2 did not answer within {SHORT:g} s" in result["error"], (call, result)
    for call, result in results[1]["results"].items():
        assert result["failed"] == {}, (call, result)
        assert "the group broke" in result["error"] and "rank 0's error names it" in result["error"], (
            call,
            result,
        )
    assert not (tmp_path / "next").exists()
