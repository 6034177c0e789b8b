"""CheckpointCallback: cadence, names, retention, callback state, resume and fallback,
find_checkpoints, preemption — each on real files through a real (tiny) training loop."""

from __future__ import annotations

import math
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from _policy_helpers import make_trainer, weights
from _roots import arg, committed, visible

import ckptproto
from ckptproto import (
    Callback,
    CheckpointCallback,
    CheckpointParameters,
    ResumeWarning,
    find_checkpoints,
)
from ckptproto.format import layout
from ckptproto.location import Location
from ckptproto.policy import checkpoint as checkpoint_module
from ckptproto.policy.retention import Kept, applies_retention, select_kept

# 24 samples, batch 4: 6 optimizer steps per epoch.


def names(root: Location) -> list[str]:
    return visible(root)  # through the storage: the same on every backend


def steps(root: Location) -> list[int | None]:
    return sorted((r.step or 0) for r in find_checkpoints(root))


def test_step_interval(checkpoint_root: Location) -> None:
    cb = CheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root, save_every_n_steps=5, keep_top_k=-1)
    )
    make_trainer([cb], epochs=2).fit()
    # steps 5 and 10, and the final state at step 12 (save_last)
    assert names(checkpoint_root) == ["checkpoint_step_10", "checkpoint_step_12", "checkpoint_step_5"]
    state = ckptproto.load(arg(checkpoint_root / "checkpoint_step_10"))
    assert state["trainer"]["global_step"] == 10 and state["trainer"]["current_epoch"] == 1


def test_epoch_interval_and_default_every_epoch(checkpoint_root: Location) -> None:
    cb = CheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root / "a", save_every_n_epochs=2, keep_top_k=-1)
    )
    make_trainer([cb], epochs=4).fit()
    assert steps(checkpoint_root / "a") == [12, 24]
    # no interval and no monitor: every epoch (Lightning's default)
    cb = CheckpointCallback(CheckpointParameters(root_dir=checkpoint_root / "b", keep_top_k=-1))
    make_trainer([cb], epochs=3).fit()
    assert steps(checkpoint_root / "b") == [6, 12, 18]
    assert [r.epoch for r in find_checkpoints(checkpoint_root / "b")] == [3, 2, 1]


def test_two_saves_at_one_step_do_not_collide_or_duplicate(checkpoint_root: Location) -> None:
    # step 6 is both a step-interval save and an epoch-end save
    cb = CheckpointCallback(
        CheckpointParameters(
            root_dir=checkpoint_root, save_every_n_steps=6, save_every_n_epochs=1, keep_top_k=-1
        )
    )
    make_trainer([cb], epochs=2).fit()
    assert names(checkpoint_root) == ["checkpoint_step_12", "checkpoint_step_6"]
    info = ckptproto.read_info(arg(checkpoint_root / "checkpoint_step_6"))
    assert info.epoch == 1  # the later (epoch-end) save replaced the step save
    assert cb.kept == ["checkpoint_step_6", "checkpoint_step_12"]


def test_foreign_directories_are_never_touched(tmp_path: Path) -> None:
    ckptproto.save({"trainer": {"global_step": 6, "current_epoch": 0}}, tmp_path / "checkpoint_step_6")
    ckptproto.save({"trainer": {"global_step": 999, "current_epoch": 0}}, tmp_path / "checkpoint_step_999")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    (tmp_path / "checkpoint_step_12").mkdir()
    (tmp_path / "checkpoint_step_12" / "x").write_text("not a checkpoint")
    cb = CheckpointCallback(
        CheckpointParameters(
            root_dir=tmp_path, save_every_n_steps=6, keep_top_k=1, save_last=False, resume_mode=None
        )
    )
    make_trainer([cb], epochs=3).fit()
    assert names(tmp_path) == [
        "checkpoint_step_12",
        "checkpoint_step_18",
        "checkpoint_step_6",
        "checkpoint_step_999",
        "notes",
    ]
    assert (tmp_path / "checkpoint_step_12" / "x").read_text() == "not a checkpoint"
    assert ckptproto.read_info(tmp_path / "checkpoint_step_6").metadata.get("run_id") is None
    # ours went to suffixed names, then retention deleted all but the newest of ours
    assert cb.kept == ["checkpoint_step_18"]


def test_other_runs_checkpoints_are_never_deleted(checkpoint_root: Location) -> None:
    # the same decisions on every backend: a name taken by a checkpoint of another run gets a
    # _vN suffix, and retention deletes only this run's own checkpoints
    for step in (6, 999):
        ckptproto.save(
            {"trainer": {"global_step": step, "current_epoch": 0}},
            arg(checkpoint_root / f"checkpoint_step_{step}"),
        )
    params = CheckpointParameters(
        root_dir=checkpoint_root, save_every_n_steps=6, keep_top_k=1, save_last=False, resume_mode=None
    )
    cb = CheckpointCallback(params)
    make_trainer([cb], epochs=2).fit()
    assert names(checkpoint_root) == ["checkpoint_step_12", "checkpoint_step_6", "checkpoint_step_999"]
    assert cb.kept == ["checkpoint_step_12"]
    assert ckptproto.read_info(arg(checkpoint_root / "checkpoint_step_6")).metadata.get("run_id") is None


def test_retention_top_k_by_metric_with_nan_and_inf(checkpoint_root: Location) -> None:
    trainer = make_trainer()
    cb = CheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root, monitor="val_loss", keep_top_k=2, save_last=True)
    )
    cb.bind(trainer)
    for step, metric in [
        (1, 0.5),
        (2, float("nan")),
        (3, 0.2),
        (4, float("inf")),
        (5, 0.9),
        (6, 0.4),
        (7, 0.3),
    ]:
        trainer.global_step = step
        cb._current_metric = metric  # as the seed's MetricCheckpointCallback does
        cb.save()
    # best two finite: 0.2 (step 3), 0.3 (step 7); step 7 is also the last
    assert steps(checkpoint_root) == [3, 7]
    best = find_checkpoints(checkpoint_root, mode="best")
    assert [(r.step, r.metric) for r in best] == [(3, 0.2), (7, 0.3)]
    # nan/inf are never best, even when they are all there is
    trainer.global_step = 8
    cb._current_metric = float("nan")
    cb.save()
    assert steps(checkpoint_root) == [3, 7, 8]  # 8 kept as the last one only
    assert find_checkpoints(checkpoint_root, mode="best")[0].step == 3


def test_select_kept_rules() -> None:
    recs = [Kept(f"c{i}", i, 0, m, i) for i, m in enumerate([0.3, math.nan, math.inf, -math.inf, 0.1, 0.2])]
    assert select_kept(recs, keep_top_k=2, mode="min", monitored=True, save_last=False) == {"c4", "c5"}
    assert select_kept(recs, keep_top_k=1, mode="max", monitored=True, save_last=True) == {"c0", "c5"}
    assert select_kept(recs, keep_top_k=2, mode="min", monitored=False, save_last=False) == {"c5", "c4"}
    assert select_kept(recs, keep_top_k=0, mode="min", monitored=True, save_last=True) == {"c5"}
    assert len(select_kept(recs, keep_top_k=-1, mode="min", monitored=True, save_last=False)) == 6


def test_validation_metric_improvement_saves(checkpoint_root: Location) -> None:
    vals = {1: 0.5, 2: 0.3, 3: float("nan"), 4: 0.4, 5: 0.6}
    cb = CheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root, monitor="val_loss", keep_top_k=2, save_last=True)
    )
    make_trainer([cb], epochs=5, val_metrics=lambda e: {"val_loss": vals[e]}).fit()
    # saved at epochs 1 (0.5), 2 (0.3), 4 (0.4 enters the top 2, 0.5 leaves); not at 3 (nan);
    # at 5 (0.6) only as the final state (save_last)
    assert steps(checkpoint_root) == [12, 24, 30]
    assert [r.metric for r in find_checkpoints(checkpoint_root, mode="best")] == [0.3, 0.4, 0.6]


class _Unsaveable(Callback[Any]):
    """A callback whose state becomes unsaveable on demand (a real save failure)."""

    broken = False

    def state_dict(self) -> dict[str, Any]:
        return {"x": object()} if self.broken else {}


def test_failed_save_deletes_nothing(checkpoint_root: Location) -> None:
    cb = CheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root, save_every_n_steps=2, keep_top_k=1, save_last=False)
    )
    bad = _Unsaveable()

    def hook(t: Any) -> None:
        bad.broken = t.global_step >= 3

    trainer = make_trainer([cb, bad], epochs=1, step_hook=hook)
    with pytest.raises(ckptproto.UnsupportedValueError):
        trainer.fit()
    assert names(checkpoint_root) == ["checkpoint_step_2"]


def test_deletion_happens_only_after_the_replacement_is_committed(
    checkpoint_root: Location, monkeypatch: Any
) -> None:
    real = checkpoint_module.delete_checkpoint
    seen = []

    def checked_delete(root: Location, name: str, run_id: str) -> bool:
        newest = max(find_checkpoints(root), key=lambda r: r.step or 0)
        assert newest.name != name and committed(root / newest.name)
        seen.append(name)
        return real(root, name, run_id)

    monkeypatch.setattr(checkpoint_module, "delete_checkpoint", checked_delete)
    cb = CheckpointCallback(
        CheckpointParameters(root_dir=checkpoint_root, save_every_n_steps=2, keep_top_k=1)
    )
    make_trainer([cb], epochs=1).fit()
    assert seen == ["checkpoint_step_2", "checkpoint_step_4"]
    assert names(checkpoint_root) == ["checkpoint_step_6"]


def test_callback_state_survives_restart(checkpoint_root: Location) -> None:
    params = CheckpointParameters(
        root_dir=checkpoint_root, monitor="loss", keep_top_k=2, save_every_n_steps=3
    )
    first = CheckpointCallback(params)
    make_trainer([first], epochs=2, stop_after_steps=9).fit()
    saved = ckptproto.load(arg(checkpoint_root / "checkpoint_step_9"))["trainer"]["callbacks"][
        "CheckpointCallback"
    ]
    assert saved["run_id"] == first.run_id
    assert saved["kept"], "the kept checkpoints are part of the checkpoint"
    assert saved["metrics"] == first._metrics  # the latest loss, as of step 9

    second = CheckpointCallback(params)
    assert second.run_id != first.run_id
    trainer = make_trainer([second], epochs=2)
    assert second.resume() == checkpoint_root / "checkpoint_step_9"
    assert trainer.global_step == 9
    assert second.run_id == first.run_id  # restored: this is the same run, continued
    assert second.kept == first.kept  # what the state listed, plus the one resumed from
    assert second._seq == first._seq
    trainer.fit()
    # retention of the resumed run covers the first process's checkpoints too
    assert set(names(checkpoint_root)) == set(second.kept)
    assert len(second.kept) <= 3


def test_resume_exactly_equals_uninterrupted(checkpoint_root: Location) -> None:
    reference = make_trainer(epochs=3)
    reference.fit()
    params = CheckpointParameters(root_dir=checkpoint_root, save_every_n_steps=4)
    first = make_trainer([CheckpointCallback(params)], epochs=3, stop_after_steps=10)
    first.fit()  # the loop ends cleanly at step 10 (mid-epoch): save_last saves that state
    second = make_trainer([CheckpointCallback(params)], epochs=3)
    second.fit()
    assert first.seen_batches[:10] + second.seen_batches == reference.seen_batches
    assert all(torch.equal(a, b) for a, b in zip(weights(reference), weights(second), strict=True))
    assert second.scheduler.get_last_lr() == reference.scheduler.get_last_lr()


def _three_checkpoints(root: Location) -> None:
    vals = iter([0.5, 0.1, 0.3])
    trainer = make_trainer(epochs=3)
    cb = CheckpointCallback(CheckpointParameters(root_dir=root, monitor="val", keep_top_k=-1))
    cb.bind(trainer)
    for step in (2, 4, 6):
        trainer.global_step = step
        cb._observe({"val": next(vals)})
        cb.save()


def test_resume_modes(checkpoint_root: Location) -> None:
    _three_checkpoints(checkpoint_root)
    for mode, expected in [("latest", 6), ("best", 4), ("last", 6), ("min", 4), ("max", 2)]:
        params = CheckpointParameters(root_dir=checkpoint_root, monitor="val", resume_mode=mode)
        trainer = make_trainer([CheckpointCallback(params)])
        trainer.callbacks.pre_fit()
        assert trainer.global_step == expected, mode


def test_resume_none_and_explicit_path(checkpoint_root: Location) -> None:
    _three_checkpoints(checkpoint_root)
    fresh = make_trainer(
        [CheckpointCallback(CheckpointParameters(root_dir=checkpoint_root, resume_mode=None))]
    )
    fresh.callbacks.pre_fit()
    assert fresh.global_step == 0
    explicit = make_trainer(
        [
            CheckpointCallback(
                CheckpointParameters(
                    root_dir=checkpoint_root / "elsewhere", resume_mode=checkpoint_root / "checkpoint_step_4"
                )
            )
        ]
    )
    explicit.callbacks.pre_fit()
    assert explicit.global_step == 4
    missing = make_trainer(
        [
            CheckpointCallback(
                CheckpointParameters(root_dir=checkpoint_root, resume_mode=checkpoint_root / "nope")
            )
        ]
    )
    with pytest.raises(ckptproto.CheckpointNotFoundError):
        missing.callbacks.pre_fit()
    empty = make_trainer([CheckpointCallback(CheckpointParameters(root_dir=checkpoint_root / "empty"))])
    empty.callbacks.pre_fit()
    assert empty.global_step == 0


def test_corrupt_or_partial_newest_falls_back_with_a_warning(tmp_path: Path) -> None:
    _three_checkpoints(tmp_path)
    # newest: damaged tensor bytes
    data = tmp_path / "checkpoint_step_6" / layout.data_file_name(0)
    raw = bytearray(data.read_bytes())
    raw[-5] ^= 0xFF
    data.write_bytes(bytes(raw))
    # next: partial (torn manifest)
    manifest = tmp_path / "checkpoint_step_4" / layout.MANIFEST_NAME
    manifest.write_bytes(manifest.read_bytes()[:40])
    # an interrupted save leaves a hidden temporary directory: ignored silently
    (tmp_path / layout.temp_name("checkpoint_step_8")).mkdir()
    trainer = make_trainer([CheckpointCallback(CheckpointParameters(root_dir=tmp_path))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.callbacks.pre_fit()
    texts = [str(w.message) for w in caught if issubclass(w.category, ResumeWarning)]
    assert any("checkpoint_step_6" in t for t in texts), texts
    assert any("checkpoint_step_4" in t for t in texts), texts
    assert trainer.global_step == 2


def test_find_checkpoints_reads_manifests_not_names(tmp_path: Path) -> None:
    _three_checkpoints(tmp_path)
    for old, new in [
        ("checkpoint_step_2", "zzz"),
        ("checkpoint_step_4", "aaa"),
        ("checkpoint_step_6", "mmm"),
    ]:
        os.rename(tmp_path / old, tmp_path / new)
    (tmp_path / "checkpoint_step_100").mkdir()  # a name alone does not make a checkpoint
    assert [(r.name, r.step) for r in find_checkpoints(tmp_path, mode="latest")] == [
        ("mmm", 6),
        ("aaa", 4),
        ("zzz", 2),
    ]
    best = find_checkpoints(checkpoint_dir=tmp_path, mode="best")
    assert [(r.step, r.metric) for r in best] == [(4, 0.1), (6, 0.3), (2, 0.5)]
    assert [r.step for r in find_checkpoints(tmp_path, mode="best", metric_mode="max")] == [2, 6, 4]
    assert find_checkpoints(tmp_path / "missing") == []
    with pytest.raises(ValueError, match="mode"):
        find_checkpoints(tmp_path, mode="oldest")  # type: ignore[arg-type]


def test_sigterm_saves_and_stops(tmp_path: Path) -> None:
    def hook(t: Any) -> None:
        if t.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    cb = CheckpointCallback(
        CheckpointParameters(root_dir=tmp_path, save_on_preemption=True, save_every_n_steps=100)
    )
    trainer = make_trainer([cb], epochs=2, step_hook=hook)
    trainer.fit()
    # the signal arrived after step 3's hooks: saved at the next step boundary, then stopped
    assert trainer.global_step == 4 and cb.should_stop
    assert steps(tmp_path) == [4]
    assert signal.getsignal(signal.SIGTERM) == before


def test_only_rank_zero_applies_retention() -> None:
    assert applies_retention()  # no process group: this process decides
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert applies_retention()
    finally:
        dist.destroy_process_group()


def test_plain_loop_example(tmp_path: Path) -> None:
    import runpy

    example = runpy.run_path(str(Path(__file__).parent.parent / "examples" / "plain_loop.py"))
    first = example["train"](tmp_path, steps_limit=7)
    assert first == 7
    assert example["train"](tmp_path) == example["TOTAL_STEPS"]
    assert find_checkpoints(tmp_path)[0].step == example["TOTAL_STEPS"]


def test_sigterm_after_the_last_step_still_saves(tmp_path: Path) -> None:
    def hook(t: Any) -> None:
        if t.global_step == 6:  # the last step of the only epoch
            os.kill(os.getpid(), signal.SIGTERM)

    cb = ckptproto.AsyncCheckpointCallback(
        CheckpointParameters(root_dir=tmp_path, save_on_preemption=True, keep_top_k=-1)
    )
    trainer = make_trainer([cb], epochs=1, step_hook=hook)
    trainer.fit()
    assert cb.should_stop
    # saved by the SIGTERM at step 6 (the epoch-end save of step 6 replaced or preceded it)
    assert steps(tmp_path) == [6]
    assert cb.saver.pending() == 0
    cb.close()
