"""Policy semantics (issue 18): a checkpoint's score is the one measured for its own state, the
true best is never deleted for a stale copy, the async callback decides exactly as the sync
one whatever the I/O timing (its writes held back by a gate here), a run with ``save_last``
always ends saved, and a monitor that is never reported is an error."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _policy_helpers import WriteGate, hold_async_writes, on_disk, run_loop

import ckptproto
from ckptproto import (
    AsyncCheckpointCallback,
    Callback,
    CallbackCollection,
    CheckpointCallback,
    CheckpointParameters,
    TrainState,
    find_checkpoints,
)
from ckptproto.errors import MonitorNotFoundError
from ckptproto.location import Location


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteGate]:
    yield from hold_async_writes(monkeypatch)


def make_callback(
    kind: str, gate: WriteGate | None, **params: Any
) -> tuple[CheckpointCallback, list[Callback[Any]]]:
    config = CheckpointParameters(resume_mode=None, **params)
    if kind == "sync":
        cb: CheckpointCallback = CheckpointCallback(config)
        return cb, [cb]
    async_cb = AsyncCheckpointCallback(config, max_pending=64)  # every save accepted while writes wait
    gate.made.append(async_cb)
    return async_cb, [gate, async_cb]


def weight_of(path: Location) -> float:
    return float(ckptproto.load(str(path))["models"]["model"]["weight"][0, 0])


KINDS = ["sync", "async"]


@pytest.mark.parametrize("kind", KINDS)
def test_true_best_survives_an_epoch_interval_save(
    checkpoint_root: Location, kind: str, gate: WriteGate
) -> None:
    cb, cbs = make_callback(
        kind,
        gate,
        root_dir=checkpoint_root,
        monitor="val_loss",
        keep_top_k=1,
        save_every_n_epochs=1,
        save_last=False,
    )
    run_loop(cbs, [0.5, 0.9])
    # step 2 measured 0.5; step 4 measured 0.9. Main kept step 4 labelled 0.5.
    assert on_disk(checkpoint_root) == {"checkpoint_step_2": 0.5}
    assert cb.kept == ["checkpoint_step_2"]


@pytest.mark.parametrize("kind", KINDS)
def test_interval_saves_between_validations_do_not_rank(
    checkpoint_root: Location, kind: str, gate: WriteGate
) -> None:
    # README's shape: a step interval with save_last
    _cb, cbs = make_callback(
        kind,
        gate,
        root_dir=checkpoint_root,
        monitor="val_loss",
        keep_top_k=1,
        save_every_n_steps=1,
        save_last=True,
    )
    run_loop(cbs, [0.5, 0.9])
    # step 2 (0.5) is the best; step 4 is kept as the last one and claims no score
    assert on_disk(checkpoint_root) == {"checkpoint_step_2": 0.5, "checkpoint_step_4": None}
    best = find_checkpoints(checkpoint_root, mode="best")[0]
    assert best.name == "checkpoint_step_2" and weight_of(best.path) == weight_of(
        checkpoint_root / "checkpoint_step_2"
    )
    meta = ckptproto.read_info(str(checkpoint_root / "checkpoint_step_4")).metrics
    assert "val_loss" not in meta and meta["loss"] == 4.0  # only what was measured at step 4


# (params, validation values, what the sync callback keeps: name -> score)
DECISIONS = [
    ({"keep_top_k": 1, "save_last": False}, [0.5, 0.5], {"checkpoint_step_2": 0.5}),
    (
        {"keep_top_k": 2, "save_last": True},
        [0.5, 0.2, 0.9],
        {"checkpoint_step_2": 0.5, "checkpoint_step_4": 0.2, "checkpoint_step_6": 0.9},
    ),
    (
        {"keep_top_k": 2, "save_last": False},
        [0.5, 0.4, 0.3, 0.6, 0.1],
        {"checkpoint_step_6": 0.3, "checkpoint_step_10": 0.1},
    ),
    (
        {"keep_top_k": 1, "save_last": True, "save_every_n_steps": 1},
        [0.5, 0.9, 0.4],
        {"checkpoint_step_6": 0.4},
    ),
]


@pytest.mark.parametrize(("params", "vals", "expected"), DECISIONS)
def test_async_decides_like_sync_with_writes_held_back(
    checkpoint_root: Location,
    gate: WriteGate,
    params: dict[str, Any],
    vals: list[float],
    expected: dict[str, float],
) -> None:
    sync_cb, sync_cbs = make_callback(
        "sync", gate, root_dir=checkpoint_root / "sync", monitor="val_loss", **params
    )
    run_loop(sync_cbs, vals)
    assert on_disk(checkpoint_root / "sync") == expected

    async_cb, async_cbs = make_callback(
        "async", gate, root_dir=checkpoint_root / "async", monitor="val_loss", **params
    )
    run_loop(async_cbs, vals)
    assert on_disk(checkpoint_root / "async") == expected
    assert async_cb.kept == sync_cb.kept
    latest = [find_checkpoints(checkpoint_root / d)[0].name for d in ("sync", "async")]
    assert latest[0] == latest[1]  # resume "latest" picks the same checkpoint


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("params", "vals"),
    [
        ({"save_every_n_steps": 1000}, [None, None]),  # the interval is longer than the run
        ({"monitor": "val_loss"}, [math.nan, math.nan]),  # the monitor is always nan
        ({"monitor": "val_loss", "keep_top_k": 0}, [0.3, 0.2]),  # only the last one is kept
        ({"save_every_n_epochs": 2}, [None, None, None]),  # the run ends between two intervals
    ],
)
def test_save_last_always_ends_with_the_final_state(
    checkpoint_root: Location, kind: str, gate: WriteGate, params: dict[str, Any], vals: list[float | None]
) -> None:
    cb, cbs = make_callback(kind, gate, root_dir=checkpoint_root, save_last=True, **params)
    state = run_loop(cbs, vals)
    final = checkpoint_root / f"checkpoint_step_{state.global_step}"
    assert final.name in on_disk(checkpoint_root) and final.name in cb.kept
    assert weight_of(final) == float(state.models["model"].weight.detach()[0, 0])


@pytest.mark.parametrize("kind", KINDS)
def test_no_final_save_when_the_final_state_is_saved(
    checkpoint_root: Location, kind: str, gate: WriteGate
) -> None:
    _cb, cbs = make_callback(kind, gate, root_dir=checkpoint_root, save_every_n_steps=2, keep_top_k=-1)
    run_loop(cbs, [None, None])
    assert sorted(on_disk(checkpoint_root)) == ["checkpoint_step_2", "checkpoint_step_4"]
    assert [r.info.metadata["seq"] for r in find_checkpoints(checkpoint_root) if r.info] == [
        1,
        0,
    ]  # one save each


@pytest.mark.parametrize("kind", KINDS)
def test_a_monitor_never_reported_raises_naming_the_reported_keys(
    tmp_path: Path, kind: str, gate: WriteGate
) -> None:
    _cb, cbs = make_callback(kind, gate, root_dir=tmp_path, monitor="val_los", keep_top_k=1)
    with pytest.raises(MonitorNotFoundError, match=r"val_los.*'loss'.*'val_acc'.*'val_loss'"):
        run_loop(cbs, [0.5, 0.4])


def test_a_monitor_reported_by_train_steps_is_not_missing_at_validation(
    tmp_path: Path, gate: WriteGate
) -> None:
    _cb, cbs = make_callback("sync", gate, root_dir=tmp_path, monitor="loss", mode="max", keep_top_k=1)
    run_loop(cbs, [0.5, 0.4])  # validations do not report "loss"; train steps do
    assert on_disk(tmp_path, "loss") == {"checkpoint_step_4": 4.0}


@pytest.mark.parametrize("kind", KINDS)
def test_a_monitor_never_reported_without_validation_warns_at_fit_end(
    tmp_path: Path, kind: str, gate: WriteGate
) -> None:
    _cb, cbs = make_callback(kind, gate, root_dir=tmp_path, monitor="val_los", keep_top_k=1)
    with pytest.warns(RuntimeWarning, match=r"val_los.*never reported.*\['loss'\]"):
        run_loop(cbs, [None, None])  # no validation: nothing to raise at
    assert list(on_disk(tmp_path)) == ["checkpoint_step_4"]  # save_last still saved the end


def test_a_plain_dataloader_is_named_at_bind(tmp_path: Path) -> None:
    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2)
    state = TrainState(models={"model": torch.nn.Linear(2, 1)}, dataloaders={"train": loader})
    cb = CheckpointCallback(CheckpointParameters(root_dir=tmp_path))
    with pytest.warns(
        ckptproto.ResumeWarning, match=r"dataloaders\['train'\].*DataLoader.*StatefulDataLoader"
    ):
        CallbackCollection([cb]).bind(state)


def test_foreign_checkpoints_refuse_a_silent_fresh_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.save({"model": torch.nn.Linear(2, 1).state_dict()}, tmp_path / "epoch=3.ckpt")
    dcp_dir = tmp_path / "step_100"
    dcp_dir.mkdir()
    (dcp_dir / ".metadata").write_bytes(b"\x80\x04pickled")
    cb = CheckpointCallback(CheckpointParameters(root_dir=tmp_path))
    with pytest.raises(
        ckptproto.CheckpointFormatError, match=r"epoch=3\.ckpt, step_100.*ckptproto convert.*resume_mode=None"
    ):
        run_loop([cb], [None])
    assert "ckptproto convert" in caplog.text and "WARNING" in caplog.text.upper()
    # with a checkpoint of ours there, it resumes from that one and still names the others
    CheckpointCallback(CheckpointParameters(root_dir=tmp_path, resume_mode=None))
    run_loop([CheckpointCallback(CheckpointParameters(root_dir=tmp_path, resume_mode=None))], [None])
    caplog.clear()
    resumed = CheckpointCallback(CheckpointParameters(root_dir=tmp_path))
    run_loop([resumed], [])
    assert resumed.resumed_from == tmp_path / "checkpoint_step_2"
    assert "epoch=3.ckpt" in caplog.text


def test_a_fifo_or_a_link_in_root_dir_is_not_sniffed(tmp_path: Path) -> None:
    # local only (FIFOs, symbolic links): sniffing foreign formats goes through
    # storage.read_head, which must neither block on a FIFO nor follow a link
    import os

    from ckptproto.policy.discovery import foreign_checkpoints

    torch.save({"w": torch.ones(1)}, tmp_path / "model.pt")
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "link.pt").symlink_to(tmp_path / "model.pt")
    assert foreign_checkpoints(tmp_path) == [tmp_path / "model.pt"]
