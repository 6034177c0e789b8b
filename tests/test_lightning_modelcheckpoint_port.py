"""Lightning's ``ModelCheckpoint`` semantics, ported to ckptproto's plain-loop policy and run
side by side with a real ``lightning.Trainer`` (our own port: the scenarios follow what
Lightning's ModelCheckpoint tests exercise — top k in both modes, ties, nan, ``save_last``,
step and epoch intervals, mid-epoch validation, a missing monitor, invalid settings).

Every scenario runs three ways: Lightning (``ModelCheckpoint`` in a ``Trainer`` whose
validation logs the scripted values), ``CheckpointCallback`` and ``AsyncCheckpointCallback``
(writes held back until the run ends, so its decisions cannot lean on I/O timing). The
outcome compared is which states stay on disk (by ``global_step``: top-k files plus
``last.ckpt`` for Lightning) and which one is best. A scenario either matches Lightning or
names the row of docs/policy.md's table of differences that explains it; both outcomes are
then asserted, so a documented difference that changes is noticed too.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from _policy_helpers import WriteGate, hold_async_writes

from ckptproto import (
    AsyncCheckpointCallback,
    Callback,
    CallbackCollection,
    CheckpointCallback,
    CheckpointParameters,
    TrainState,
    find_checkpoints,
)

pl = pytest.importorskip("lightning.pytorch")

DOCS = (Path(__file__).resolve().parents[1] / "docs" / "policy.md").read_text()
RAISES = "raises"


@dataclass(frozen=True)
class Scenario:
    """One run: ``epochs`` epochs of ``steps`` steps; a validation after every
    ``val_every`` steps (None: at each epoch end; 0: never) reporting the next of ``vals``."""

    name: str
    vals: tuple[float, ...] = ()
    epochs: int = 3
    steps: int = 2
    val_every: int | None = None
    monitor: str | None = "val_loss"
    mode: str = "min"
    top_k: int = 1
    save_last: bool = False
    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    resume_after: int | None = None  # stop after this many epochs, then resume "latest"/"last"
    # where ckptproto differs on purpose: (a phrase of the docs table row, ours, Lightning's)
    differs: tuple[str, Any, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)


SCENARIOS = [
    Scenario("top1_min", vals=(0.5, 0.3, 0.4)),
    Scenario("top2_min", vals=(0.5, 0.3, 0.4, 0.6), epochs=4, top_k=2),
    Scenario("top2_max", vals=(0.1, 0.9, 0.5, 0.7), epochs=4, top_k=2, mode="max"),
    Scenario("keep_all", vals=(0.5, 0.3, 0.4), top_k=-1),
    Scenario("top3_more_than_saves", vals=(0.5, 0.3), epochs=2, top_k=3),
    Scenario("ties_keep_the_first", vals=(0.5, 0.5, 0.5)),
    Scenario("ties_top2", vals=(0.4, 0.5, 0.4, 0.5), epochs=4, top_k=2),
    Scenario(
        "save_last_and_top1",
        vals=(0.5, 0.3, 0.4),
        save_last=True,
        differs=(
            "saves the final state at `post_fit`",
            {"kept": [4, 6], "best": 4},
            {"kept": [4], "best": 4},
        ),
    ),
    Scenario("save_last_best_is_last", vals=(0.5, 0.4, 0.3), save_last=True),
    Scenario(
        "top0_save_last",
        vals=(0.5, 0.3, 0.4),
        top_k=0,
        save_last=True,
        # the final state's manifest holds the score measured for it, so it ranks
        differs=(
            "saves the final state at `post_fit`",
            {"kept": [6], "best": 6},
            {"kept": [6], "best": None},
        ),
    ),
    Scenario("no_monitor_every_epoch", monitor=None, val_every=0),
    Scenario("no_monitor_keep_all", monitor=None, val_every=0, top_k=-1),
    Scenario("no_monitor_every_2_epochs", monitor=None, val_every=0, top_k=-1, epochs=4, every_n_epochs=2),
    Scenario("no_monitor_every_3_steps", monitor=None, val_every=0, top_k=-1, every_n_steps=3),
    Scenario(
        "monitor_every_2_epochs",
        vals=(0.5, 0.3, 0.4, 0.2),
        epochs=4,
        every_n_epochs=2,
        top_k=-1,
        differs=(
            "intervals add saves to those of the monitor",
            {"kept": [2, 4, 6, 8], "best": 8},
            {"kept": [4, 8], "best": 8},
        ),
    ),
    Scenario(
        "interval_longer_than_run_save_last", monitor=None, val_every=0, every_n_steps=1000, save_last=True
    ),
    Scenario("mid_epoch_validation_top2", vals=(0.5, 0.3, 0.6, 0.2, 0.4, 0.7), steps=4, val_every=2, top_k=2),
    Scenario("monitor_missing_raises", monitor="val_los", vals=(0.5, 0.3)),
    Scenario("top3_max_many", vals=(0.1, 0.5, 0.3, 0.7, 0.2, 0.6, 0.4), epochs=7, top_k=3, mode="max"),
    Scenario("inf_never_ranks", vals=(0.5, float("inf"), 0.4), top_k=2),
    Scenario(
        "mid_epoch_validation_top1_max", vals=(0.1, 0.4, 0.3, 0.2), steps=4, val_every=2, mode="max", epochs=2
    ),
    Scenario(
        "no_monitor_every_2_steps_top2",
        monitor=None,
        val_every=0,
        top_k=2,
        every_n_steps=2,
        epochs=4,
        differs=("keeps the `keep_top_k` newest", {"kept": [6, 8], "best": None}, RAISES),
    ),
    Scenario(
        "resume_top2_save_last",
        vals=(0.5, 0.3, 0.4, 0.2, 0.6),
        epochs=5,
        top_k=2,
        save_last=True,
        resume_after=2,
        differs=(
            "saves the final state at `post_fit`",
            {"kept": [4, 8, 10], "best": 8},
            {"kept": [4, 8], "best": 8},
        ),
    ),
    Scenario(
        "resume_no_monitor_keep_all",
        monitor=None,
        val_every=0,
        top_k=-1,
        save_last=True,
        epochs=4,
        resume_after=2,
    ),
    Scenario(
        "resume_after_a_run_without_improvement",
        vals=(0.3, 0.5, 0.4, 0.6),
        epochs=4,
        save_last=True,
        resume_after=2,
    ),
    Scenario(
        "nan_never_ranks",
        vals=(float("nan"), 0.5, float("nan")),
        top_k=2,
        differs=("nan and ±inf never rank", {"kept": [4], "best": 4}, {"kept": [2, 4], "best": 4}),
    ),
    Scenario(
        "always_nan_save_last",
        vals=(float("nan"),) * 3,
        save_last=True,
        differs=("nan and ±inf never rank", {"kept": [6], "best": None}, {"kept": [2], "best": 2}),
    ),
    Scenario(
        "no_monitor_mid_epoch_validation",
        monitor=None,
        vals=(0.5, 0.3, 0.4, 0.2, 0.6, 0.1),
        steps=4,
        val_every=2,
        top_k=-1,
        differs=(
            "one save per **train epoch**",
            {"kept": [4, 8, 12], "best": None},
            {
                "kept": [2, 4, 6, 8, 10, 12],
                "best": None,
            },
        ),
    ),
    Scenario(
        "step_interval_with_stale_monitor",
        vals=(0.5, 0.9, 0.4),
        every_n_steps=1,
        top_k=2,
        differs=(
            "an interval save between validations has none and never ranks",
            {"kept": [2, 6], "best": 6},
            {"kept": [3, 4], "best": 3},  # steps 3 and 4 ranked by step 2's 0.5
        ),
    ),
    Scenario(
        "every_n_epochs_zero",
        vals=(0.5,),
        epochs=1,
        every_n_epochs=0,
        differs=("A zero or negative interval", RAISES, {"kept": [], "best": None}),
    ),
    Scenario(
        "top0_without_save_last",
        vals=(0.5, 0.3),
        epochs=2,
        top_k=0,
        differs=("`keep_top_k=0` with `save_last=False`", RAISES, {"kept": [], "best": None}),
    ),
]


# -- Lightning -------------------------------------------------------------------------------


class _Scripted(pl.LightningModule):  # type: ignore[misc,name-defined]
    def __init__(self, sc: Scenario) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.sc = sc
        self.validations = 0

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val_loss", float(self.sc.vals[_val_index(self.sc, self.global_step)]))

    def on_validation_epoch_end(self) -> None:
        self.validations += 1

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.randn(self.sc.steps, 2), batch_size=1)

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.randn(1, 2), batch_size=1)


def _val_index(sc: Scenario, global_step: int) -> int:
    """Which of ``vals`` the validation after ``global_step`` steps reports (so a resumed run
    continues the script)."""
    return global_step // (sc.val_every or sc.steps) - 1


def _step_of(path: Path) -> int:
    if path.name.startswith("last"):
        return int(torch.load(path, weights_only=False, map_location="cpu")["global_step"])
    found = re.search(r"step=(\d+)", path.name)
    assert found, path
    return int(found.group(1))


def run_lightning(sc: Scenario, root: Path) -> Any:
    try:
        if sc.resume_after is not None:
            _fit_lightning(sc, root, sc.resume_after, None)
            callback = _fit_lightning(sc, root, sc.epochs, "last")
        else:
            callback = _fit_lightning(sc, root, sc.epochs, None)
    except Exception as exc:  # MisconfigurationException and friends
        if "MisconfigurationException" in type(exc).__name__ or isinstance(exc, ValueError):
            return RAISES
        raise
    kept = sorted({_step_of(p) for p in root.glob("*.ckpt")})
    best = callback.best_model_path
    return {"kept": kept, "best": _step_of(Path(best)) if best and sc.monitor else None}


def _fit_lightning(sc: Scenario, root: Path, epochs: int, ckpt_path: str | None) -> Any:
    callback = pl.callbacks.ModelCheckpoint(
        dirpath=root,
        filename="{step}",
        monitor=sc.monitor,
        mode=sc.mode,
        save_top_k=sc.top_k,
        save_last=sc.save_last,
        every_n_epochs=sc.every_n_epochs,
        every_n_train_steps=sc.every_n_steps,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0 if sc.val_every == 0 else 1,
        val_check_interval=sc.val_every if sc.val_every else 1.0,
        accelerator="cpu",
        devices=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(_Scripted(sc), ckpt_path=ckpt_path)
    return callback


# -- ckptproto -------------------------------------------------------------------------------


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteGate]:
    yield from hold_async_writes(monkeypatch)


def _loop(sc: Scenario, callbacks: list[Callback[Any]], epochs: int) -> None:
    """The plain loop of docs/policy.md: validation after every ``val_every`` steps, or after
    ``post_train_epoch`` at each epoch end."""
    model = torch.nn.Linear(2, 1)
    cbs = CallbackCollection(callbacks)
    state = TrainState(models={"model": model}, callbacks=cbs)
    cbs.bind(state)
    cbs.pre_fit()

    def validate() -> None:
        cbs.pre_validation_epoch()
        cbs.post_validation_epoch({"val_loss": sc.vals[_val_index(sc, state.global_step)]})

    try:
        while state.current_epoch < epochs:
            cbs.pre_train_epoch()
            for batch_idx in range(sc.steps):
                cbs.pre_optimizer_step()
                with torch.no_grad():
                    model.weight.add_(1.0)
                state.global_step += 1
                cbs.post_train_step({"train_loss": 1.0}, batch_idx)
                if sc.val_every and (batch_idx + 1) % sc.val_every == 0 and batch_idx + 1 < sc.steps:
                    validate()
            state.current_epoch += 1
            cbs.post_train_epoch()
            if sc.val_every is None or (sc.val_every and sc.steps % sc.val_every == 0):
                validate()
    except BaseException as exc:
        cbs.on_exception(exc)
        raise
    cbs.post_fit()


def run_ours(sc: Scenario, root: Path, kind: str, gate: WriteGate) -> Any:
    if sc.resume_after is None:
        return _fit_ours(sc, root, kind, gate, sc.epochs, None)
    first = _fit_ours(sc, root, kind, gate, sc.resume_after, None)
    return first if first == RAISES else _fit_ours(sc, root, kind, gate, sc.epochs, "latest")


def _fit_ours(sc: Scenario, root: Path, kind: str, gate: WriteGate, epochs: int, resume: str | None) -> Any:
    try:
        params = CheckpointParameters(
            root_dir=root,
            monitor=sc.monitor,
            mode=sc.mode,  # type: ignore[arg-type]
            keep_top_k=sc.top_k,
            save_last=sc.save_last,
            save_every_n_epochs=sc.every_n_epochs,
            save_every_n_steps=sc.every_n_steps,
            resume_mode=resume,
        )
    except ValueError:
        return RAISES
    if kind == "sync":
        cb: CheckpointCallback = CheckpointCallback(params)
        callbacks: list[Callback[Any]] = [cb]
    else:
        cb = AsyncCheckpointCallback(params, max_pending=64)
        callbacks = [gate, cb]
    try:
        _loop(sc, callbacks, epochs)
    except ValueError:  # MonitorNotFoundError
        return RAISES
    finally:
        if isinstance(cb, AsyncCheckpointCallback):
            cb.close()
    records = find_checkpoints(root)
    best = find_checkpoints(root, mode="best")
    ranked = best[0].step if best and best[0].metric is not None and math.isfinite(best[0].metric) else None
    return {"kept": sorted(r.step or 0 for r in records), "best": ranked if sc.monitor else None}


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name)
def test_matches_lightning_or_documents_why_not(sc: Scenario, tmp_path: Path, gate: WriteGate) -> None:
    lightning = run_lightning(sc, tmp_path / "lightning")
    sync = run_ours(sc, tmp_path / "sync", "sync", gate)
    asynchronous = run_ours(sc, tmp_path / "async", "async", gate)
    assert asynchronous == sync  # the async callback decides exactly as the sync one
    if sc.differs is None:
        assert sync == lightning
        return
    row, ours, theirs = sc.differs
    assert row in DOCS, f"docs/policy.md does not document: {row}"
    assert (sync, lightning) == (ours, theirs)
