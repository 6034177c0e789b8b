"""AsyncCheckpointCallback on the real AsyncSaver: staging before the optimizer step, pending
saves finished at fit end and on exception, retention on commit, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _policy_helpers import MyTrainer, make_trainer, weights

import ckptproto
from ckptproto import AsyncCheckpointCallback, Callback, CheckpointParameters, find_checkpoints
from ckptproto.location import Location


class _Snapshots(Callback[Any]):
    """Records the weights right after each optimizer step, and checks at every
    ``pre_optimizer_step`` that the async callback's pending saves are staged."""

    def __init__(self, async_cb: AsyncCheckpointCallback) -> None:
        self.async_cb = async_cb
        self.at_step: dict[int, list[torch.Tensor]] = {}
        self.checked = 0

    def post_train_step(self, result: Any, batch_idx: int) -> None:
        self.at_step[self.trainer.global_step] = [p.detach().clone() for p in self.trainer.model.parameters()]

    def pre_optimizer_step(self) -> None:
        for future, _record, _done in self.async_cb._futures:
            assert future.staged()
            self.checked += 1


@pytest.mark.parametrize("staging", ["background", "blocking"])
def test_checkpoints_hold_the_weights_of_their_step(checkpoint_root: Location, staging: str) -> None:
    cb = AsyncCheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root, save_every_n_steps=2, keep_top_k=-1), staging=staging
    )
    snaps = _Snapshots(cb)
    trainer = make_trainer([cb, snaps], epochs=2)
    trainer.fit()
    # post_fit finished every pending save: all committed without an explicit wait
    assert cb._futures == [] and cb.saver.pending() == 0
    assert snaps.checked > 0
    records = find_checkpoints(checkpoint_root)
    assert [r.step for r in records] == [12, 10, 8, 6, 4, 2]
    for record in records:
        state = ckptproto.load(str(record.path))
        saved = list(state["models"]["model"].values())
        assert all(torch.equal(a, b) for a, b in zip(saved, snaps.at_step[record.step or 0], strict=True))
    cb.close()


def test_retention_runs_when_saves_commit(checkpoint_root: Location) -> None:
    cb = AsyncCheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root, save_every_n_steps=2, keep_top_k=2)
    )
    make_trainer([cb], epochs=2).fit()
    assert [r.step for r in find_checkpoints(checkpoint_root)] == [12, 10]
    assert cb.kept == ["checkpoint_step_10", "checkpoint_step_12"]
    cb.close()


def test_pending_saves_finish_on_exception(checkpoint_root: Location) -> None:
    def boom(t: MyTrainer) -> None:
        if t.global_step == 5:
            raise RuntimeError("loss is nan")

    cb = AsyncCheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root, save_every_n_steps=4, keep_top_k=-1)
    )
    trainer = make_trainer([cb], epochs=2, step_hook=boom)
    with pytest.raises(RuntimeError, match="nan"):
        trainer.fit()
    assert cb.saver.pending() == 0
    assert [r.step for r in find_checkpoints(checkpoint_root)] == [4]
    ckptproto.verify(str(checkpoint_root / "checkpoint_step_4"))
    cb.close()


def test_async_resume_equals_uninterrupted(checkpoint_root: Location) -> None:
    reference = make_trainer(epochs=3)
    reference.fit()
    params = CheckpointParameters(root_dir=checkpoint_root, save_every_n_steps=4, keep_top_k=2)
    first_cb = AsyncCheckpointCallback(params)
    make_trainer([first_cb], epochs=3, stop_after_steps=9).fit()
    second_cb = AsyncCheckpointCallback(params)
    second = make_trainer([second_cb], epochs=3)
    second.fit()
    assert second_cb.resumed_from == checkpoint_root / "checkpoint_step_9"  # the final state (save_last)
    assert all(torch.equal(a, b) for a, b in zip(weights(reference), weights(second), strict=True))
    first_cb.close()
    second_cb.close()


class _Squatter(Callback[Any]):
    """Puts a plain file where checkpoint_step_6 is about to be written, after its name was
    chosen and while the trainer's state is captured: that save then fails in the writer."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def state_dict(self) -> dict[str, Any]:
        if self.trainer.global_step == 6:
            (self.root / "checkpoint_step_6").write_text("in the way")
        return {}


def test_failed_async_save_is_reported_and_keeps_older_checkpoints(tmp_path: Path) -> None:
    cb = AsyncCheckpointCallback(CheckpointParameters(root_dir=tmp_path, save_every_n_steps=3, keep_top_k=1))
    trainer = make_trainer([cb, _Squatter(tmp_path)], epochs=1)
    with pytest.warns(RuntimeWarning, match="checkpoint_step_6"):
        trainer.fit()
    assert [r.step for r in find_checkpoints(tmp_path)] == [3]
    assert (tmp_path / "checkpoint_step_6").read_text() == "in the way"
    cb.close()


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    """The demo's story as a test: a real SIGKILL while training (saves in flight), a real
    restart, and final weights bitwise equal to an uninterrupted run."""
    import os
    import runpy
    import signal
    import subprocess
    import sys

    demo_path = Path(__file__).parent.parent / "examples" / "demo.py"
    demo = runpy.run_path(str(demo_path))
    threads = torch.get_num_threads()
    try:
        assert demo["train"](str(tmp_path / "ref_root"), str(tmp_path / "ref.ckpt"), slow=False, compare=None)
    finally:
        torch.set_num_threads(threads)

    root, out = tmp_path / "run", tmp_path / "final.ckpt"
    cmd = [sys.executable, str(demo_path), "train", str(root), str(out)]
    child = subprocess.Popen([*cmd, "--slow"], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("step 33 "):
            os.kill(child.pid, signal.SIGKILL)
            break
    assert child.wait() == -signal.SIGKILL
    found = find_checkpoints(root)
    assert found and all((r.step or 0) <= 33 for r in found)
    for record in found:
        ckptproto.verify(record.path)  # whatever is visible is whole

    done = subprocess.run(
        [*cmd, "--compare", str(tmp_path / "ref.ckpt")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resumed from {found[0].name}" in done.stdout
    assert "bitwise: True" in done.stdout
