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

from ckptproto.errors import CheckpointError, CheckpointFormatError, MonitorNotFoundError, StateMismatchError
from ckptproto.format.info import CheckpointInfo
from ckptproto.io.sync import load_into, save
from ckptproto.location import ObjectLocation
from ckptproto.policy.agree import from_rank0, gather
from ckptproto.policy.callbacks import Callback, TrainerLike
from ckptproto.policy.discovery import foreign_checkpoints, is_finite, order, scan
from ckptproto.policy.locations import Location, LocationLike, as_arg, resolve
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
        callback = CheckpointCallback(root_dir="s3://bucket/run")   # an object store alike

    When it saves (``should_save``, which subclasses may override; ``self._current_metric``
    holds the value of ``monitor`` measured for the current state, or None):

    * after a train step whose ``global_step`` is a multiple of ``save_every_n_steps``, and
      after a train epoch whose (already advanced) ``current_epoch`` is a multiple of
      ``save_every_n_epochs`` — every epoch when no interval and no monitor are set. With a
      monitor, such a save happens only if it is kept: with ``save_last``, with
      ``keep_top_k=-1``, or when the monitor measured for this very state enters the top k;
    * after a validation epoch or a train epoch that brought a new value of ``monitor`` which
      would enter the ``keep_top_k`` best;
    * at ``post_fit`` with ``save_last``, if the final state is not saved yet.

    A checkpoint's score is the value of ``monitor`` reported at its own ``global_step``;
    a save between two measurements has none and never ranks. Which checkpoints to keep is
    decided when a save starts (against every earlier save, pending or committed), and
    checkpoints are deleted only once the save that displaced them is committed. Under
    ``torch.distributed`` rank 0 decides and every rank follows (``ckptproto.policy.agree``).
    ``pre_fit`` resumes according to ``resume_mode``. Its own state (run id, kept
    checkpoints, latest metrics) is saved under ``trainer.callbacks`` and restored on resume.
    """

    def __init__(self, config: CheckpointParameters | None = None, **params: Any) -> None:
        if config is None:
            config = CheckpointParameters(**params)
        elif params:
            raise TypeError("pass a CheckpointParameters or keyword parameters, not both")
        self.config = config
        self.storage, self.root = resolve(config.root_dir)
        self.run_id = uuid.uuid4().hex
        self._metric: tuple[float | None, int | None] = (None, None)  # monitor: (value, step measured)
        self._metrics: dict[str, float] = {}  # latest value of every metric
        self._measured_at: dict[str, int] = {}  # the global_step each of them was reported at
        self._fresh_metric = False
        self._trigger: str | None = None
        self._kept: list[Kept] = []  # every save still kept, committed or pending, in save order
        self._seq = 0
        self._lock = threading.RLock()
        self._preempted = False
        self._previous_handler: Any = None
        self._saved_step: int | None = None  # global_step of the state last saved or resumed from
        self.should_stop = False
        self.resumed_from: Location | None = None
        self.last_saved: Location | None = None

    # -- hooks -------------------------------------------------------------------------------

    def bind(self, trainer: TrainerLike) -> None:
        super().bind(trainer)
        loaders = getattr(trainer, "dataloaders", None)
        if not isinstance(loaders, Mapping):
            return
        for key, loader in loaders.items():
            if loader is not None and not hasattr(loader, "state_dict"):
                warnings.warn(
                    f"dataloaders[{key!r}] ({type(loader).__module__}.{type(loader).__qualname__}) has no "
                    "state_dict(): it is not saved, and a resumed run restarts its epoch from the first "
                    "batch (the schedule then runs past its end, e.g. OneCycleLR). Use "
                    "torchdata.stateful_dataloader.StatefulDataLoader, with a sampler and the loader "
                    "given generator=torch.Generator().manual_seed(...) (docs/policy.md, RNG and data)",
                    ResumeWarning,
                    stacklevel=2,
                )

    def pre_fit(self) -> None:
        self.should_stop = False
        self.resume()
        if self.config.save_on_preemption:
            self._install_sigterm()

    def post_train_step(self, result: Mapping[str, Any], batch_idx: int) -> None:
        self._observe(result)
        if self.config.save_on_preemption:
            # SIGTERM may reach the ranks at different steps: all save if any rank got it
            self._preempted = any(gather(self._preempted, "a SIGTERM"))
        if self._preempted:
            self._preemption_save()
            return
        self._decide("step")

    def post_train_epoch(self, result: Mapping[str, Any] | None = None) -> None:
        self._observe(result)
        self._decide("epoch")

    def post_validation_epoch(self, result: Mapping[str, Any]) -> None:
        self._observe(result)
        self._decide("validation", reported=sorted(str(k) for k in (result or {})))

    def post_fit(self) -> None:
        if self._preempted:  # SIGTERM after the last step: the state is whole, save it now
            self._preemption_save()
        elif self.config.save_last and self._saved_step != int(self.trainer.global_step):
            self.save()  # save_last: a run always ends with its final state on disk
        monitor = self.config.monitor
        if monitor is not None and monitor not in self._metrics:  # no validation ever ran
            warnings.warn(
                f"CheckpointParameters(monitor={monitor!r}) was never reported during fit (metrics "
                f"reported: {sorted(self._metrics)}); no checkpoint was ranked by it",
                RuntimeWarning,
                stacklevel=2,
            )
        self._restore_sigterm()

    def on_exception(self, exc: BaseException) -> None:
        self._restore_sigterm()

    # -- deciding ----------------------------------------------------------------------------

    @property
    def _current_metric(self) -> float | None:
        """The value of ``monitor`` measured for the current state (reported at the current
        ``global_step``), or None: a value reported before the last step belongs to another
        state. Assigning it (as the seed's ``MetricCheckpointCallback`` does) reports a value
        for the current state."""
        value, step = self._metric
        return value if step is None or step == self._step() else None

    @_current_metric.setter
    def _current_metric(self, value: float | None) -> None:
        self._metric = (value, self._step())

    def _step(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else int(trainer.global_step)

    def _decide(self, trigger: str, reported: list[str] | None = None) -> None:
        """Ask ``should_save`` at ``trigger`` and save if it says so; under torch.distributed
        rank 0's answer holds on every rank (a save is collective)."""
        self._trigger = trigger
        missing = reported is not None and self._monitor_never_reported(reported)
        decision = False if missing else self.should_save()
        default = type(self).should_save is CheckpointCallback.should_save
        if (
            trigger != "step"
            or not default
            or (self.config.monitor is not None and self._step_interval_due())
        ):
            # the default step decision without a monitor depends only on global_step, equal
            # on every rank; anything that can depend on a metric is rank 0's
            agreed: tuple[bool, bool, list[str] | None] = (decision, missing, reported)
            decision, missing, reported = from_rank0(agreed, "should_save")
        if missing:
            raise MonitorNotFoundError(
                f"CheckpointParameters(monitor={self.config.monitor!r}) was never reported: this "
                f"validation reported {reported}, and the metrics reported so far are "
                f"{sorted(set(reported or ()) | set(self._metrics))}; fix the name in monitor=, or "
                "report that metric from the loop"
            )
        if decision:
            self.save()

    def _monitor_never_reported(self, reported: list[str]) -> bool:
        monitor = self.config.monitor
        return monitor is not None and monitor not in reported and monitor not in self._metrics

    def should_save(self) -> bool:
        """Whether to save now (at ``self._trigger``: "step", "epoch" or "validation")."""
        cfg = self.config
        epoch = self.trainer.current_epoch
        due = False
        if self._trigger == "step":
            due = self._step_interval_due()
        elif self._trigger == "epoch":
            every = cfg.save_every_n_epochs
            if every is None and cfg.save_every_n_steps is None and cfg.monitor is None:
                every = 1
            due = every is not None and epoch > 0 and epoch % every == 0
        if cfg.monitor is None:
            return due
        enters = self._would_enter_top_k(self._current_metric)
        if due:  # an interval save is only made if it is kept
            return cfg.save_last or cfg.keep_top_k == -1 or enters
        return self._trigger != "step" and self._fresh_metric and enters

    def _step_interval_due(self) -> bool:
        n, step = self.config.save_every_n_steps, self.trainer.global_step
        return n is not None and step > 0 and step % n == 0

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
        step = self._step()
        for key, value in result.items():
            number = _as_float(value)
            if isinstance(key, str) and number is not None:
                self._metrics[key] = number
                if step is not None:
                    self._measured_at[key] = step
        monitor = self.config.monitor
        if monitor is not None and monitor in result:
            self._current_metric = self._metrics.get(monitor)
            self._fresh_metric = True

    # -- saving ------------------------------------------------------------------------------

    def save(self) -> Location:
        """Save the trainer now, as ``root_dir/checkpoint_step_{global_step}``; returns where.

        Its score is ``self._current_metric`` (rank 0's under torch.distributed). A second
        save at the same step replaces this run's checkpoint of that step atomically (no
        duplicate); a directory of that name that is not this run's gets a ``_vN`` suffix.
        """
        score = from_rank0(self._current_metric, "the score of the checkpoint")
        with self._lock:
            step, epoch = int(self.trainer.global_step), int(self.trainer.current_epoch)
            name, overwrite = self._choose_name(step)
            record = Kept(name, step, epoch, score, self._seq)
            self._seq += 1
            self._fresh_metric = False
            self._saved_step = step
            evicted = self._plan(record)
            metadata = self._metadata(record)
        path = self.root / name
        self._write(path, metadata, overwrite, record, evicted)
        self.last_saved = path
        return path

    def _metadata(self, record: Kept) -> dict[str, Any]:
        # Only the metrics measured for this state: a stale value would rank it on resume.
        metrics = {k: v for k, v in self._metrics.items() if self._measured_at.get(k) == record.step}
        monitor = self.config.monitor
        if monitor is not None:
            metrics.pop(monitor, None)
            if record.metric is not None:
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
        kept = {r.name for r in self._kept}
        for i in count():
            name = base if i == 0 else f"{base}_v{i}"
            path = self.root / name
            if name in kept:
                return name, True
            if not self.storage.exists(path):
                return name, False
            if owned_by(path, self.run_id):
                return name, True
        raise AssertionError("unreachable")  # pragma: no cover

    def _plan(self, record: Kept) -> list[Kept]:
        """Take ``record`` into the kept set and return the records retention drops for it.

        Decided now, against every earlier save (committed or still being written), so the
        async callback decides exactly as the sync one does; the dropped checkpoints are
        deleted only once ``record`` is committed (``_committed``)."""
        cfg = self.config
        with self._lock:
            # a checkpoint of the same name is replaced: listed so a failed save restores it
            replaced = [r for r in self._kept if r.name == record.name]
            self._kept = [r for r in self._kept if r.name != record.name] + [record]
            keep = select_kept(
                self._kept,
                keep_top_k=cfg.keep_top_k,
                mode=cfg.mode,
                monitored=cfg.monitor is not None,
                save_last=cfg.save_last,
            )
            evicted = [r for r in self._kept if r.name not in keep]
            self._kept = [r for r in self._kept if r.name in keep]
            return replaced + evicted

    def _write(
        self, path: Location, metadata: dict[str, Any], overwrite: bool, record: Kept, evicted: list[Kept]
    ) -> None:
        try:
            save(self.trainer, as_arg(path), metadata=metadata, overwrite=overwrite)
        except BaseException:
            self._failed(record, evicted)
            raise
        self._committed(record, evicted)

    def _committed(self, record: Kept, evicted: list[Kept]) -> None:
        """``record`` is committed: delete what it displaced (never before this)."""
        if not applies_retention():
            return
        with self._lock:
            planned = {r.name for r in self._kept}
            for old in evicted:
                if old.name not in planned:  # not saved again under the same name since
                    delete_checkpoint(self.root, old.name, self.run_id)

    def _failed(self, record: Kept, evicted: list[Kept]) -> None:
        """``record`` failed: it is not kept, and what it displaced stays."""
        with self._lock:
            self._kept = [r for r in self._kept if r.seq != record.seq]
            names = {r.name for r in self._kept}
            self._kept.extend(r for r in evicted if r.name not in names)
            self._kept.sort(key=lambda r: r.seq)

    @property
    def kept(self) -> list[str]:
        """Names of this run's checkpoints that retention keeps (committed, or being written
        by the async callback), oldest first."""
        with self._lock:
            return [r.name for r in sorted(self._kept, key=lambda r: r.seq)]

    # -- resuming ----------------------------------------------------------------------------

    def resume(self) -> Location | None:
        """Restore the trainer per ``resume_mode``; returns the checkpoint used (None: fresh).

        "latest"/"best" try checkpoints newest/best first; a corrupt, partial or unreadable
        one is skipped with a ResumeWarning naming it. An explicit path must load. A
        ``root_dir`` holding only checkpoints of other formats (DCP, torch.save) raises
        CheckpointFormatError naming them, rather than starting fresh. Under torch.distributed
        rank 0 orders the candidates and a checkpoint is used only if it loads on every rank.
        """
        mode = self.config.resume_mode
        if mode is None:
            return None
        if isinstance(mode, (Path, ObjectLocation)):  # an explicit checkpoint: it must load
            self.load(mode)
            return mode
        candidates, foreign = from_rank0(self._candidates(mode), "the checkpoints to resume from")
        for name in candidates:
            path = self.root / name
            local: CheckpointError | None = None
            try:
                self.load(path)
            except CheckpointError as exc:
                local = exc
            outcomes = gather(
                None if local is None else (isinstance(local, StateMismatchError), str(local)),
                f"resuming from {path}",
            )
            if all(outcome is None for outcome in outcomes):
                return path
            self.resumed_from = None  # loaded here, not on every rank: not resumed from it
            mismatched = [(r, o[1]) for r, o in enumerate(outcomes) if o is not None and o[0]]
            if mismatched:  # the checkpoint is fine; the trainer does not fit it: say so
                if isinstance(local, StateMismatchError):
                    raise local
                rank, text = mismatched[0]
                raise StateMismatchError(f"resume: on rank {rank}: {text}")
            errors = "; ".join(
                f"rank {r}: {o[1]}" if len(outcomes) > 1 else o[1] for r, o in enumerate(outcomes) if o
            )
            warnings.warn(
                f"resume: skipping checkpoint {path}: {errors}; trying an older one",
                ResumeWarning,
                stacklevel=2,
            )
        if foreign:
            raise CheckpointFormatError(
                f"resume_mode={mode!r}: {self.root} holds no ckptproto checkpoint but checkpoints of "
                f"another format: {', '.join(foreign)}. Convert one (ckptproto convert "
                f"{self.root / foreign[0]} {self.root / 'checkpoint_converted'} --to ckptproto) to "
                "resume from it, or pass resume_mode=None to start fresh"
            )
        logger.info("no checkpoint to resume from in %s; starting fresh", self.root)
        return None

    def _candidates(self, mode: str) -> tuple[list[str], list[str]]:
        """The names of the checkpoints to try, in order, and of the entries of ``root_dir``
        that look like checkpoints of another format (said at WARNING)."""
        records, problems = scan(self.root, self.config.monitor)
        for problem in problems:
            if "no manifest" not in problem:
                warnings.warn(f"resume: skipping {problem}", ResumeWarning, stacklevel=2)
        foreign = [p.name for p in foreign_checkpoints(self.root)]
        if foreign:
            logger.warning(
                "%s holds checkpoints ckptproto cannot resume from: %s; convert with `ckptproto convert "
                "SRC DST --to ckptproto`",
                self.root,
                ", ".join(foreign),
            )
        metric_mode = self.config.mode if self.config.monitor is not None else None
        ordered = order(records, "best" if mode == "best" else "latest", metric_mode)
        return [r.name for r in ordered], foreign

    def load(self, path: LocationLike) -> CheckpointInfo:
        """Restore the trainer (and this callback's state) from the checkpoint at ``path`` (a
        path or an object-store URL)."""
        _storage, location = resolve(path)
        info = load_into(
            as_arg(location),
            _RestoreTarget(self.trainer, self.config.strict_load),
            strict=self.config.strict_load,
        )
        self.resumed_from = location
        self._saved_step = int(self.trainer.global_step)  # the state on disk: no final save needed
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
            metric, metric_step = self._metric
            return {
                "run_id": self.run_id,
                "seq": self._seq,
                "kept": [r.to_state() for r in self._kept],
                "current_metric": metric if metric is None or math.isfinite(metric) else str(metric),
                "current_metric_step": metric_step,
                "metrics": {k: v for k, v in self._metrics.items() if math.isfinite(v)},
                "measured_at": dict(self._measured_at),
            }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        with self._lock:
            self.run_id = str(state_dict.get("run_id", self.run_id))
            self._seq = int(state_dict.get("seq", 0))
            self._kept = [Kept.from_state(r) for r in state_dict.get("kept", [])]
            metric, step = state_dict.get("current_metric"), state_dict.get("current_metric_step", -1)
            self._metric = (
                float(metric) if metric is not None else None,
                None if step is None else int(step),
            )
            self._metrics = {str(k): float(v) for k, v in dict(state_dict.get("metrics", {})).items()}
            self._measured_at = {str(k): int(v) for k, v in dict(state_dict.get("measured_at", {})).items()}
