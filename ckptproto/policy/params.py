"""CheckpointParameters: what the checkpoint callbacks save, keep and resume from."""

from __future__ import annotations

import os
import re
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Literal

PathLike = str | os.PathLike[str]
ResumeMode = Literal["latest", "best"] | Path | str | None
_RESUME_ALIASES = {"last": "latest", "latest": "latest", "best": "best"}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class _DefaultMode(str):
    """The default ``mode`` ("min"), told apart from an explicit ``mode="min"`` by identity."""


_DEFAULT_MODE: Literal["min", "max"] = _DefaultMode("min")  # type: ignore[assignment]


@dataclass
class CheckpointParameters:
    """Checkpointing policy, following Lightning's ModelCheckpoint semantics::

        params = CheckpointParameters(
            root_dir="./checkpoints", monitor="val_loss", mode="min",
            keep_top_k=3, save_last=True, save_every_n_steps=1000, resume_mode="latest",
        )

    * ``monitor``/``mode``: the metric (a key of the step or validation results) that ranks
      checkpoints, and whether smaller (``"min"``) or larger (``"max"``) is better.
    * ``keep_top_k``: how many checkpoints to keep, the best by ``monitor`` (the newest
      without one); ``-1`` keeps all. ``save_last`` also keeps the most recent one.
    * ``save_every_n_steps`` / ``save_every_n_epochs``: save intervals (None: off).
    * ``resume_mode``: ``"latest"``, ``"best"``, ``None`` (start fresh) or the path of a
      checkpoint (a ``pathlib.Path``, or a string containing a path separator).
    * ``save_on_preemption``: on SIGTERM, save once more and ask the loop to stop.
    * ``strict_load``: resuming requires every key of the trainer state in the checkpoint.

    Dream Trainer's names are accepted too: ``checkpoint_every_n_steps``,
    ``checkpoint_every_n_epochs``, ``resume_mode="last"`` (= "latest"), and
    ``resume_mode="min"|"max"`` (= "best" with that ``mode``).
    Bad values raise ``ValueError`` naming the field.
    """

    root_dir: PathLike = "./checkpoints"
    monitor: str | None = None
    mode: Literal["min", "max"] = _DEFAULT_MODE
    keep_top_k: int = 1
    save_last: bool = True
    save_every_n_epochs: int | None = None
    save_every_n_steps: int | None = None
    resume_mode: ResumeMode = "latest"
    save_on_preemption: bool = False
    strict_load: bool = True
    checkpoint_every_n_steps: InitVar[int | None] = None
    checkpoint_every_n_epochs: InitVar[int | None] = None

    def __post_init__(
        self, checkpoint_every_n_steps: int | None, checkpoint_every_n_epochs: int | None
    ) -> None:
        if checkpoint_every_n_steps is not None:
            if self.save_every_n_steps is not None:
                raise ValueError("give save_every_n_steps or checkpoint_every_n_steps (its alias), not both")
            self.save_every_n_steps = checkpoint_every_n_steps
        if checkpoint_every_n_epochs is not None:
            if self.save_every_n_epochs is not None:
                raise ValueError(
                    "give save_every_n_epochs or checkpoint_every_n_epochs (its alias), not both"
                )
            self.save_every_n_epochs = checkpoint_every_n_epochs
        if not isinstance(self.root_dir, (str, os.PathLike)) or str(self.root_dir) == "":
            raise ValueError(f"root_dir must be a non-empty path, got {self.root_dir!r}")
        if _URL.match(str(self.root_dir)):
            raise ValueError(
                f"root_dir={str(self.root_dir)!r} is a URL; ckptproto saves to file systems only (an "
                "object store backend is not there yet): mount the bucket (e.g. mountpoint-s3, "
                "gcsfuse) and pass the mounted path"
            )
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ValueError(f"monitor must be a metric name or None, got {self.monitor!r}")
        if isinstance(self.resume_mode, str) and self.resume_mode in ("min", "max"):
            if self.mode is not _DEFAULT_MODE and self.mode != self.resume_mode:
                raise ValueError(
                    f"resume_mode={self.resume_mode!r} (best by a {self.resume_mode}imum) contradicts "
                    f"mode={self.mode!r}; give one of them"
                )
            self.mode = "min" if self.resume_mode == "min" else "max"
            self.resume_mode = "best"
        if isinstance(self.mode, _DefaultMode):
            self.mode = "min"  # a plain str from here on (it is written into manifests)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        _check_int("keep_top_k", self.keep_top_k, minimum=-1)
        if self.keep_top_k == 0 and not self.save_last:
            raise ValueError("keep_top_k=0 with save_last=False would keep no checkpoint; raise keep_top_k")
        for name in ("save_every_n_epochs", "save_every_n_steps"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=1)
        for name in ("save_last", "save_on_preemption", "strict_load"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        self.resume_mode = _resume_mode(self.resume_mode)

    @property
    def resume_path(self) -> Path | None:
        """The explicit checkpoint to resume from, when ``resume_mode`` is a path."""
        return self.resume_mode if isinstance(self.resume_mode, Path) else None


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        hint = " (-1 keeps all)" if minimum == -1 else ""
        raise ValueError(f"{name} must be an int >= {minimum}{hint}, got {value!r}")


def _resume_mode(value: Any) -> ResumeMode:
    if value is None or isinstance(value, Path):
        return value
    if isinstance(value, os.PathLike):
        return Path(value)
    if isinstance(value, str):
        if value in _RESUME_ALIASES:
            return _RESUME_ALIASES[value]
        if os.sep in value or (os.altsep and os.altsep in value):
            return Path(value)
    raise ValueError(
        f"resume_mode must be 'latest', 'best', None or a checkpoint path (a pathlib.Path or a "
        f"string containing '/'), got {value!r}"
    )
