"""CheckpointParameters: what the checkpoint callbacks save, keep and resume from."""

from __future__ import annotations

import os
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any, Literal

from ckptproto.errors import CheckpointError
from ckptproto.location import Location, ObjectLocation, url_scheme
from ckptproto.policy.locations import LocationLike, parse_location, resolve

PathLike = LocationLike
ResumeMode = Literal["latest", "best"] | Path | ObjectLocation | str | None
_RESUME_ALIASES = {"last": "latest", "latest": "latest", "best": "best"}


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
    * ``root_dir``: a directory, or an object-store URL (``"s3://bucket/run"``).
    * ``resume_mode``: ``"latest"``, ``"best"``, ``None`` (start fresh) or the path of a
      checkpoint (a ``pathlib.Path``, a string containing a path separator, or a URL).
    * ``save_on_preemption``: on SIGTERM, save once more and ask the loop to stop.
    * ``strict_load``: resuming requires every key of the trainer state in the checkpoint.

    Dream Trainer's names (dream-trainer 0.3.0 ``CheckpointParameters``) are accepted where
    they mean the same: ``checkpoint_every_n_train_epochs`` (= ``save_every_n_epochs``; also
    ``checkpoint_every_n_epochs``/``checkpoint_every_n_steps``), ``resume_mode="last"``
    (= "latest"), ``resume_mode="min"|"max"`` (= "best" with that ``mode``), ``enable=True``,
    ``resume_data=True``, ``async_mode="disabled"``, ``storage_options=None`` and
    ``model_weights_only`` (ignored, as Dream Trainer ignores it). Those whose meaning would
    change what is saved, kept or deleted raise ``ValueError`` saying what to write instead:
    ``keep_top_k=0`` next to Dream Trainer fields (Dream Trainer keeps all; here 0 keeps only
    the last: write ``keep_top_k=-1``), ``checkpoint_every_n_val_epochs``, a step number as
    ``resume_mode``, ``enable=False``, ``resume_data=False``, other ``async_mode`` values and
    ``storage_options``. (``ckptproto.integrations.dream_trainer`` runs Dream Trainer's own
    config unchanged.) Bad values raise ``ValueError`` naming the field.
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
    # Dream Trainer 0.3.0's own field names (see the class doc and _dream_trainer_fields).
    checkpoint_every_n_train_epochs: InitVar[int | None] = None
    checkpoint_every_n_val_epochs: InitVar[int | None] = None
    enable: InitVar[bool | None] = None
    resume_data: InitVar[bool | None] = None
    async_mode: InitVar[str | None] = None
    storage_options: InitVar[dict[str, Any] | None] = None
    model_weights_only: InitVar[bool | None] = None

    def __post_init__(
        self,
        checkpoint_every_n_steps: int | None,
        checkpoint_every_n_epochs: int | None,
        checkpoint_every_n_train_epochs: int | None,
        checkpoint_every_n_val_epochs: int | None,
        enable: bool | None,
        resume_data: bool | None,
        async_mode: str | None,
        storage_options: dict[str, Any] | None,
        model_weights_only: bool | None,
    ) -> None:
        dream = {
            name: value
            for name, value in (
                ("checkpoint_every_n_train_epochs", checkpoint_every_n_train_epochs),
                ("checkpoint_every_n_val_epochs", checkpoint_every_n_val_epochs),
                ("enable", enable),
                ("resume_data", resume_data),
                ("async_mode", async_mode),
                ("storage_options", storage_options),
                ("model_weights_only", model_weights_only),
                ("checkpoint_every_n_steps", checkpoint_every_n_steps),
                ("checkpoint_every_n_epochs", checkpoint_every_n_epochs),
            )
            if value is not None
        }
        _dream_trainer_fields(dream, self.resume_mode, self.keep_top_k)
        if checkpoint_every_n_train_epochs is not None:
            if checkpoint_every_n_epochs is not None:
                raise ValueError(
                    "give checkpoint_every_n_train_epochs or checkpoint_every_n_epochs, not both"
                )
            checkpoint_every_n_epochs = checkpoint_every_n_train_epochs
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
        if not isinstance(self.root_dir, (str, os.PathLike, ObjectLocation)) or str(self.root_dir) == "":
            raise ValueError(f"root_dir must be a non-empty path or URL, got {self.root_dir!r}")
        try:
            resolve(self.root_dir)  # a URL no backend serves is refused now, not at the first save
        except CheckpointError as exc:
            raise ValueError(f"root_dir={str(self.root_dir)!r}: {exc}") from exc
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
    def root(self) -> Location:
        """``root_dir`` as a location (a Path, or an ObjectLocation for a URL)."""
        return parse_location(self.root_dir)

    @property
    def resume_path(self) -> Location | None:
        """The explicit checkpoint to resume from, when ``resume_mode`` is a path or a URL."""
        return self.resume_mode if isinstance(self.resume_mode, (Path, ObjectLocation)) else None


def _dream_trainer_fields(given: dict[str, Any], resume_mode: Any, keep_top_k: Any) -> None:
    """Refuse Dream Trainer settings whose meaning here would differ from Dream Trainer's."""
    dream_spelling = isinstance(resume_mode, str) and resume_mode in ("last", "min", "max")
    if keep_top_k == 0 and (given or dream_spelling):
        raise ValueError(
            "keep_top_k=0 with Dream Trainer settings: Dream Trainer's keep_top_k=0 keeps every "
            "checkpoint, ckptproto's keeps none but the last. Write keep_top_k=-1 to keep all, "
            "or use ckptproto.integrations.dream_trainer to run Dream Trainer's config unchanged"
        )
    if isinstance(resume_mode, int) and not isinstance(resume_mode, bool):
        raise ValueError(
            f"resume_mode={resume_mode}: Dream Trainer's step-number resume is not supported here; "
            "pass the checkpoint's path (e.g. resume_mode=Path('checkpoints/checkpoint_step_"
            f"{resume_mode}')), or use ckptproto.integrations.dream_trainer"
        )
    val_epochs = given.get("checkpoint_every_n_val_epochs")
    if val_epochs is not None:
        raise ValueError(
            f"checkpoint_every_n_val_epochs={val_epochs!r} saves after every N-th validation in Dream "
            "Trainer; here validation saves follow `monitor` improvements. Use save_every_n_epochs / "
            "save_every_n_steps, or ckptproto.integrations.dream_trainer for Dream Trainer's cadence"
        )
    for name in ("enable", "resume_data"):
        if given.get(name, True) is not True:
            what = "leave the callback out" if name == "enable" else "saved dataloader state is restored"
            raise ValueError(f"{name}={given[name]!r} has no equivalent: {what}")
    if given.get("async_mode", "disabled") != "disabled":
        raise ValueError(
            f"async_mode={given['async_mode']!r}: pick the class instead, ckptproto.AsyncCheckpointCallback "
            "(staging='blocking' is Dream Trainer's 'async', staging='background' its "
            "'async_with_pinned_mem')"
        )
    if given.get("storage_options") is not None:
        raise ValueError(
            f"storage_options={given['storage_options']!r} (S3): pass an s3:// URL as root_dir; the "
            "credentials and endpoint come from the environment (AWS_* variables), as for boto3"
        )


def _check_int(name: str, value: Any, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        hint = " (-1 keeps all)" if minimum == -1 else ""
        raise ValueError(f"{name} must be an int >= {minimum}{hint}, got {value!r}")


def _resume_mode(value: Any) -> ResumeMode:
    if value is None or isinstance(value, (Path, ObjectLocation)):
        return value
    if isinstance(value, os.PathLike):
        return Path(value)
    if isinstance(value, str):
        if value in _RESUME_ALIASES:
            return _RESUME_ALIASES[value]
        if url_scheme(value) is not None:
            try:
                return parse_location(value)
            except CheckpointError as exc:
                raise ValueError(f"resume_mode={value!r}: {exc}") from exc
        if os.sep in value or (os.altsep and os.altsep in value):
            return Path(value)
    raise ValueError(
        f"resume_mode must be 'latest', 'best', None or a checkpoint path (a pathlib.Path, a "
        f"string containing '/' or a URL), got {value!r}"
    )
