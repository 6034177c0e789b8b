"""CheckpointCallback: save on a cadence or when a metric improves, keep the best, resume."""

from __future__ import annotations

import inspect
import logging
import math
import signal
import threading
import uuid
import warnings
from collections.abc import Mapping
from itertools import count
from pathlib import Path
from types import FrameType
from typing import Any

from ckptproto.errors import CheckpointError, StateMismatchError
from ckptproto.format.info import CheckpointInfo
from ckptproto.io.sync import load_into, save
from ckptproto.policy.callbacks import Callback, TrainerLike
from ckptproto.policy.discovery import is_finite, order, scan
from ckptproto.policy.params import CheckpointParameters
from ckptproto.policy.retention import Kept, applies_retention, delete_checkpoint, owned_by, select_kept
from ckptproto.protocol import CALLBACKS, TRAINER

logger = logging.getLogger("ckptproto.policy")


class ResumeWarning(UserWarning):
    """A checkpoint was skipped while resuming (corrupt, partial or unreadable)."""


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    item = getattr(value, "item", None)  # 0-d torch tensor / numpy scalar
    if item is not None and getattr(value, "ndim", 1) == 0:
        out = item()
        return float(out) if isinstance(out, (int, float)) and not isinstance(out, bool) else None
    return None


class _RestoreTarget:
    """The trainer as ``load_into`` sees it when resuming: callback states are plain values and
    matched by the callbacks themselves, so a callback added since the checkpoint was written
    (state missing from it) does not make a strict resume fail."""

    def __init__(self, trainer: TrainerLike, strict: bool) -> None:
        self.trainer, self.strict = trainer, strict

    def state_dict(self) -> dict[str, Any]:
        state = dict(self.trainer.state_dict())
        section = state.get(TRAINER)
        if isinstance(section, Mapping):
            state[TRAINER] = {k: v for k, v in section.items() if k != CALLBACKS}
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], /) -> None:
        load = self.trainer.load_state_dict
        try:
            takes_strict = "strict" in inspect.signature(load).parameters
        except (TypeError, ValueError):
            takes_strict = False
        if takes_strict:
            load(state_dict, strict=self.strict)  # type: ignore[call-arg]
        else:
            load(state_dict)


class CheckpointCallback(Callback[TrainerLike]):
    """Saves the trainer (any ``TrainerLike``) as ``root_dir/checkpoint_step_{step}``::

        callback = CheckpointCallback(CheckpointParameters(root_dir="./checkpoints",
                                                           monitor="val_loss", keep_top_k=3))

    When it saves (``should_save``, which subclasses may override; ``self._current_metric``
    holds the latest value of ``monitor``):

    * after a train step whose ``global_step`` is a multiple of ``save_every_n_steps``;
    * after a train epoch whose (already advanced) ``current_epoch`` is a multiple of
      ``save_every_n_epochs`` — every epoch when no interval and no monitor are set;
    * after a validation epoch or a train epoch that brought a new value of ``monitor`` which
      would enter the ``keep_top_k`` best.

    Each save is followed by retention (only once the save is committed). ``pre_fit``
    resumes according to ``resume_mode``. Its own state (run id, kept checkpoints, latest
    metric) is saved under ``trainer.callbacks`` and restored on resume.
    """

    def __init__(self, config: CheckpointParameters | None = None, **params: Any) -> None:
        if config is None:
            config = CheckpointParameters(**params)
        elif params:
            raise TypeError("pass a CheckpointParameters or keyword parameters, not both")
        self.config = config
        self.root = Path(config.root_dir)
        self.run_id = uuid.uuid4().hex
        self._current_metric: float | None = None
        self._metrics: dict[str, float] = {}
        self._fresh_metric = False
        self._trigger: str | None = None
        self._kept: list[Kept] = []
        self._seq = 0
        self._lock = threading.RLock()
        self._preempted = False
        self._previous_handler: Any = None
        self.should_stop = False
        self.resumed_from: Path | None = None
        self.last_saved: Path | None = None

    # -- hooks -------------------------------------------------------------------------------

    def pre_fit(self) -> None:
        self.should_stop = False
        self.resume()
        if self.config.save_on_preemption:
            self._install_sigterm()

    def post_train_step(self, result: Mapping[str, Any], batch_idx: int) -> None:
        self._observe(result)
        if self._preempted:
            self._preemption_save()
            return
        self._trigger = "step"
        if self.should_save():
            self.save()

    def post_train_epoch(self, result: Mapping[str, Any] | None = None) -> None:
        self._observe(result)
        self._trigger = "epoch"
        if self.should_save():
            self.save()

    def post_validation_epoch(self, result: Mapping[str, Any]) -> None:
        self._observe(result)
        self._trigger = "validation"
        if self.should_save():
            self.save()

    def post_fit(self) -> None:
        if self._preempted:  # SIGTERM after the last step: the state is whole, save it now
            self._preemption_save()
        self._restore_sigterm()

    def on_exception(self, exc: BaseException) -> None:
        self._restore_sigterm()

    # -- deciding ----------------------------------------------------------------------------

    def should_save(self) -> bool:
        """Whether to save now (at ``self._trigger``: "step", "epoch" or "validation")."""
        cfg = self.config
        step, epoch = self.trainer.global_step, self.trainer.current_epoch
        if self._trigger == "step":
            return cfg.save_every_n_steps is not None and step > 0 and step % cfg.save_every_n_steps == 0
        if self._trigger == "epoch":
            every = cfg.save_every_n_epochs
            if every is None and cfg.save_every_n_steps is None and cfg.monitor is None:
                every = 1
            if every is not None and epoch > 0 and epoch % every == 0:
                return True
        return (
            cfg.monitor is not None and self._fresh_metric and self._would_enter_top_k(self._current_metric)
        )

    def _would_enter_top_k(self, metric: float | None) -> bool:
        if not is_finite(metric):
            return False
        k = self.config.keep_top_k
        if k == -1:
            return True
        with self._lock:
            ranked = sorted(r.metric for r in self._kept if is_finite(r.metric))  # type: ignore[type-var]
        if self.config.mode == "max":
            ranked.reverse()
        if len(ranked) < k:
            return True
        if k == 0:
            return False
        worst = ranked[k - 1]
        return metric < worst if self.config.mode == "min" else metric > worst  # type: ignore[operator]

    def _observe(self, result: Mapping[str, Any] | None) -> None:
        if not result:
            return
        for key, value in result.items():
            number = _as_float(value)
            if isinstance(key, str) and number is not None:
                self._metrics[key] = number
        monitor = self.config.monitor
        if monitor is not None and monitor in result:
            self._current_metric = self._metrics.get(monitor)
            self._fresh_metric = True

    # -- saving ------------------------------------------------------------------------------

    def save(self) -> Path:
        """Save the trainer now, as ``root_dir/checkpoint_step_{global_step}``; returns the path.

        A second save at the same step replaces this run's checkpoint of that step atomically
        (no duplicate); a directory of that name that is not this run's gets a ``_vN`` suffix.
        """
        with self._lock:
            step, epoch = int(self.trainer.global_step), int(self.trainer.current_epoch)
            name, overwrite = self._choose_name(step)
            record = Kept(name, step, epoch, self._current_metric, self._seq)
            self._seq += 1
            self._fresh_metric = False
            metadata = self._metadata(record)
        path = self.root / name
        self._write(path, metadata, overwrite, record)
        self.last_saved = path
        return path

    def _metadata(self, record: Kept) -> dict[str, Any]:
        metrics = dict(self._metrics)
        monitor = self.config.monitor
        if monitor is not None and record.metric is not None:
            metrics[monitor] = record.metric
        return {
            "step": record.step,
            "epoch": record.epoch,
            "metrics": metrics,
            "monitor": monitor,
            "mode": self.config.mode,
            "run_id": self.run_id,
            "seq": record.seq,
            "saved_by": f"ckptproto.{type(self).__name__}",
        }

    def _choose_name(self, step: int) -> tuple[str, bool]:
        base = f"checkpoint_step_{step}"
        kept = {r.name for r in self._kept} | self._pending_names()
        for i in count():
            name = base if i == 0 else f"{base}_v{i}"
            path = self.root / name
            if name in kept:
                return name, True
            if not path.exists() and not path.is_symlink():
                return name, False
            if owned_by(path, self.run_id):
                return name, True
        raise AssertionError("unreachable")  # pragma: no cover

    def _pending_names(self) -> set[str]:
        return set()

    def _write(self, path: Path, metadata: dict[str, Any], overwrite: bool, record: Kept) -> None:
        save(self.trainer, path, metadata=metadata, overwrite=overwrite)
        self._committed(record)

    def _committed(self, record: Kept) -> None:
        """A save is committed: remember it, then apply retention (never before this)."""
        with self._lock:
            self._kept = [r for r in self._kept if r.name != record.name]
            self._kept.append(record)
            self._apply_retention()

    def _apply_retention(self) -> None:
        cfg = self.config
        keep = select_kept(
            self._kept,
            keep_top_k=cfg.keep_top_k,
            mode=cfg.mode,
            monitored=cfg.monitor is not None,
            save_last=cfg.save_last,
        )
        deleting = applies_retention()
        for record in [r for r in self._kept if r.name not in keep]:
            if deleting:
                delete_checkpoint(self.root, record.name, self.run_id)
            self._kept.remove(record)

    @property
    def kept(self) -> list[str]:
        """Names of this run's committed checkpoints that retention keeps, oldest first."""
        with self._lock:
            return [r.name for r in sorted(self._kept, key=lambda r: r.seq)]

    # -- resuming ----------------------------------------------------------------------------

    def resume(self) -> Path | None:
        """Restore the trainer per ``resume_mode``; returns the checkpoint used (None: fresh).

        "latest"/"best" try checkpoints newest/best first; a corrupt, partial or unreadable
        one is skipped with a ResumeWarning naming it. An explicit path must load.
        """
        mode = self.config.resume_mode
        if mode is None:
            return None
        if isinstance(mode, Path):
            self.load(mode)
            return mode
        records, problems = scan(self.root, self.config.monitor)
        for problem in problems:
            if "no manifest" not in problem:
                warnings.warn(f"resume: skipping {problem}", ResumeWarning, stacklevel=2)
        metric_mode = self.config.mode if self.config.monitor is not None else None
        for record in order(records, "best" if mode == "best" else "latest", metric_mode):
            try:
                self.load(record.path)
            except StateMismatchError:
                raise  # the checkpoint is fine; the trainer does not fit it: say so
            except CheckpointError as exc:
                warnings.warn(
                    f"resume: skipping checkpoint {record.path}: {exc}; trying an older one",
                    ResumeWarning,
                    stacklevel=2,
                )
                continue
            return record.path
        logger.info("no checkpoint to resume from in %s; starting fresh", self.root)
        return None

    def load(self, path: str | Path) -> CheckpointInfo:
        """Restore the trainer (and this callback's state) from the checkpoint at ``path``."""
        info = load_into(
            path, _RestoreTarget(self.trainer, self.config.strict_load), strict=self.config.strict_load
        )
        self.resumed_from = Path(path)
        self._adopt()
        logger.info("resumed from %s (step %s, epoch %s)", path, info.step, info.epoch)
        return info

    def _adopt(self) -> None:
        """After a restore: forget kept checkpoints that are gone, and take in this run's
        committed checkpoints the restored state did not know (the one resumed from, and
        saves that happened after it) so retention covers them."""
        records, _problems = scan(self.root, self.config.monitor)
        with self._lock:
            known = {r.name for r in self._kept}
            mine = {r.name: r for r in records if r.run_id == self.run_id}
            self._kept = [r for r in self._kept if r.name in mine]
            for name, rec in mine.items():
                if name in known:
                    continue
                seq = rec.info.metadata.get("seq") if rec.info else None
                self._kept.append(
                    Kept(
                        name,
                        rec.step or 0,
                        rec.epoch or 0,
                        rec.metric,
                        seq if type(seq) is int else self._seq,
                    )
                )
            self._seq = max([self._seq, *(r.seq + 1 for r in self._kept)])

    # -- preemption --------------------------------------------------------------------------

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("save_on_preemption: not on the main thread, cannot handle SIGTERM")
            return
        self._preempted = False
        self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: the save happens at the next step boundary, where the state is whole.
        self._preempted = True

    def _restore_sigterm(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
            self._previous_handler = None

    def _preemption_save(self) -> None:
        path = self.save()
        self.wait()
        self._preempted = False
        self.should_stop = True
        logger.warning("SIGTERM: saved %s; asking the loop to stop", path)

    def wait(self) -> None:
        """Wait for pending saves (none: this callback saves synchronously)."""

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            metric = self._current_metric
            return {
                "run_id": self.run_id,
                "seq": self._seq,
                "kept": [r.to_state() for r in self._kept],
                "current_metric": metric if metric is None or math.isfinite(metric) else str(metric),
                "metrics": {k: v for k, v in self._metrics.items() if math.isfinite(v)},
            }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        with self._lock:
            self.run_id = str(state_dict.get("run_id", self.run_id))
            self._seq = int(state_dict.get("seq", 0))
            self._kept = [Kept.from_state(r) for r in state_dict.get("kept", [])]
            metric = state_dict.get("current_metric")
            self._current_metric = float(metric) if metric is not None else None
            self._metrics = {str(k): float(v) for k, v in dict(state_dict.get("metrics", {})).items()}
