"""Dream Trainer's checkpoint callbacks, storing checkpoints with ckptproto. Change one import::

    # from dream_trainer.callbacks import CheckpointCallback, AsyncCheckpointCallback
    from ckptproto.integrations.dream_trainer import CheckpointCallback, AsyncCheckpointCallback

    callbacks = CallbackCollection([CheckpointCallback(CheckpointParameters(
        root_dir="./checkpoints", monitor="val/loss", resume_mode="min",
        checkpoint_every_n_val_epochs=1, keep_top_k=3))])

The classes subclass Dream Trainer's own callbacks (dream-trainer 0.3.0) and replace only the
storage: Dream Trainer's ``CheckpointParameters``, hooks, cadence, the metric reduced across
ranks, directory names (``root_dir/project/group/experiment/checkpoints/
step=000016__metric=7_230648``), resume modes and top-k retention are Dream Trainer's. Each
checkpoint is a ckptproto directory instead of a DCP one: committed atomically (a crash never
leaves a directory that looks like a checkpoint), checksummed and verified on load, no pickle,
every rank writing its share (Dream Trainer's gloo process group), and readable by
``ckptproto ls/verify/inspect`` and ``ckptproto.load``. The manifest records the step, epoch
and ``metrics: {monitor: value}``, so ``ckptproto.find_checkpoints`` ranks them too.

* Finding checkpoints reads manifests (the step and metric come from the manifest, whatever the
  directory is called); retention removes a checkpoint by first renaming it to a hidden name,
  so a crash mid-delete never leaves half a checkpoint that resume would pick.
* Checkpoints Dream Trainer wrote with DCP in the same directory are still found, ranked,
  retained and resumed from, read through DCP as Dream Trainer reads them; each such resume
  logs a warning and raises a ``LegacyCheckpointWarning`` (convert them with
  ``ckptproto convert DIR DIR.ckptproto --to ckptproto`` when convenient).
* ``AsyncCheckpointCallback``: ``async_mode="async"`` copies the tensors before the save
  returns (as DCP's ``async_save`` does); ``"async_with_pinned_mem"`` copies them in the
  background and waits before the next train step and optimizer step (as Dream Trainer does
  for its staging). Writes run on a ``ckptproto.AsyncSaver``; a failed write is raised at the
  next save or at ``post_fit``, as with Dream Trainer.
* Dream Trainer's behaviour is kept where it surprises: a checkpoint written at a validation
  (``checkpoint_every_n_val_epochs``) is saved before ``current_epoch`` advances, so resuming
  from it replays that epoch from its first batch. ``checkpoint_every_n_train_epochs`` saves at
  the start of the next epoch and resumes exactly.
* S3 roots (``s3://``) are refused here (Dream Trainer's own S3 storage keys its checkpoints
  differently); ``ckptproto.find_checkpoints``/``ckptproto.CheckpointCallback`` take s3:// roots.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

try:
    from dream_trainer.callbacks.checkpoint.async_ import (
        AsyncCheckpointCallback as _DreamAsyncCheckpointCallback,
    )
    from dream_trainer.callbacks.checkpoint.base import CheckpointCallback as _DreamCheckpointCallback
    from dream_trainer.callbacks.checkpoint.s3 import is_s3_uri
    from dream_trainer.callbacks.checkpoint.types import Checkpoint
    from dream_trainer.callbacks.checkpoint.utils import sort_checkpoints
    from dream_trainer.configs import CheckpointParameters
    from dream_trainer.utils import logger  # Dream Trainer's loguru logger: same log lines
except ImportError as exc:  # pragma: no cover - the Dream Trainer test environment has it
    raise ImportError(
        "ckptproto.integrations.dream_trainer needs Dream Trainer: pip install 'dream-trainer[metrics,wandb]'"
    ) from exc

from ckptproto.errors import CheckpointError, StateMismatchError
from ckptproto.format import layout
from ckptproto.io import commit
from ckptproto.io.async_save import AsyncSaver, SaveFuture, StagingMode
from ckptproto.io.reader import read_manifest
from ckptproto.io.sync import load_into, read_info, save
from ckptproto.location import Location
from ckptproto.policy.locations import as_arg, resolve
from ckptproto.tree import decode_tree, join_path

__all__ = [
    "AsyncCheckpointCallback",
    "CheckpointCallback",
    "CheckpointParameters",
    "LegacyCheckpointWarning",
    "find_checkpoints",
]

SAVED_BY = "ckptproto.integrations.dream_trainer"
# Dream Trainer's directory name: step=000016__metric=7_230648 (types.CHECKPOINT_REGEX).
_NAME = re.compile(r"step=(\d+)__metric=(-?(?:\d+(?:_\d+)?|inf|nan))")
_DCP_METADATA = ".metadata"
RNGS_BY_RANK = "rngs_by_rank"  # top-level section: each rank's generators, when they differ


class LegacyCheckpointWarning(UserWarning):
    """A checkpoint Dream Trainer wrote with DCP was resumed from (read through DCP)."""


@dataclass(kw_only=True, eq=False)
class FoundCheckpoint(Checkpoint):
    """A Dream Trainer ``Checkpoint`` found on disk: its directory, and whether it is a DCP one
    written by Dream Trainer itself (``legacy``). Orders and compares as Dream Trainer's."""

    path: Location
    legacy: bool = False


def find_checkpoints(
    checkpoint_dir: str | os.PathLike[str] | Location, mode: Literal["min", "max", "last"] = "last"
) -> list[FoundCheckpoint]:
    """The checkpoints in one Dream Trainer checkpoint directory, ordered as Dream Trainer's
    ``find_checkpoints`` orders them (``"last"``: newest step first; ``"min"``/``"max"``: by
    metric): ckptproto ones by their manifest, DCP ones Dream Trainer wrote by their name::

        for ckpt in find_checkpoints("checkpoints/proj/group/exp/checkpoints", mode="min"):
            print(ckpt.step, ckpt.metric, ckpt.path)

    A directory whose manifest cannot be read (damaged, or still being written by another
    process) is skipped with a warning in the log.
    """
    storage, root = resolve(checkpoint_dir)
    found: list[FoundCheckpoint] = []
    for entry in storage.entries(root):
        if layout.is_hidden(entry.name) or not entry.is_dir:
            continue
        path = root / entry.name
        if storage.exists(path / layout.MANIFEST_NAME):
            checkpoint = _from_manifest(path)
            if checkpoint is not None:
                found.append(checkpoint)
        elif storage.exists(path / _DCP_METADATA) and (match := _NAME.search(entry.name)):
            step, metric = int(match.group(1)), float(match.group(2).replace("_", "."))
            found.append(FoundCheckpoint(step=step, metric=metric, path=path, legacy=True))
    ordered = sort_checkpoints(list(found), mode)
    return [c for c in ordered if isinstance(c, FoundCheckpoint)]


def _from_manifest(path: Location) -> FoundCheckpoint | None:
    try:
        info = read_info(as_arg(path))
    except CheckpointError as exc:
        logger.warning(f"skipping {path}: {exc}")
        return None
    dream = info.metadata.get("dream_trainer")
    metric: Any = dream.get("metric") if isinstance(dream, dict) else None
    if not isinstance(metric, (int, float)) or isinstance(metric, bool):
        match = _NAME.search(path.name)  # converted or hand-made: the name carries the metric
        metric = float(match.group(2).replace("_", ".")) if match else None
    if info.step is None or metric is None:
        return None  # a ckptproto checkpoint, but not one of a Dream Trainer run
    return FoundCheckpoint(step=info.step, metric=float(metric), path=path)


def _leaf_names(tree: Any) -> set[str]:
    """Callback names with at least one stored value (DCP records no empty dicts, so Dream
    Trainer treats a callback with empty state as absent from the checkpoint)."""

    def has_leaf(node: Any) -> bool:
        if isinstance(node, dict):
            return any(has_leaf(v) for v in node.values())
        return True

    return {str(k) for k, v in tree.items() if has_leaf(v)} if isinstance(tree, dict) else set()


def _missing(target: Any, stored: Any, path: str = "") -> list[str]:
    """State paths of ``target`` (a state dict to load into) that ``stored`` lacks: what DCP
    refuses without ``allow_partial_load`` (Dream Trainer's ``strict_load=True``)."""
    if isinstance(target, dict):
        if not isinstance(stored, dict):
            return [path or "<root>"]
        out: list[str] = []
        for key, value in target.items():
            at = join_path(path, key)
            out += _missing(value, stored[key], at) if key in stored else [at]
        return out
    if isinstance(target, list) and isinstance(stored, list):
        out = [join_path(path, i) for i in range(len(stored), len(target))]
        for i, (t, s) in enumerate(zip(target, stored, strict=False)):
            out += _missing(t, s, join_path(path, i))
        return out
    return []


class CheckpointCallback(_DreamCheckpointCallback):
    """Dream Trainer's ``CheckpointCallback``, saving ckptproto checkpoints::

        callback = CheckpointCallback(CheckpointParameters(
            root_dir="./checkpoints", checkpoint_every_n_train_epochs=1))

    Same config, hooks, names, resume and retention as Dream Trainer's; see the module doc.
    """

    def __init__(self, config: CheckpointParameters) -> None:
        if is_s3_uri(config.root_dir):
            raise ValueError(
                f"root_dir={config.root_dir!r}: ckptproto writes checkpoints to a filesystem path; "
                "use dream_trainer.callbacks.CheckpointCallback for S3, or a mounted path"
            )
        super().__init__(config)

    # -- storage: the only part that differs from Dream Trainer ---------------------------------

    def _metadata(self, checkpoint: Checkpoint) -> dict[str, Any]:
        mode = self.config.resume_mode
        return {
            "step": checkpoint.step,
            "epoch": int(self.trainer.current_epoch),
            "metrics": {self.config.monitor: checkpoint.metric},
            "monitor": self.config.monitor,
            "mode": mode if mode in ("min", "max") else "min",
            "saved_by": f"{SAVED_BY}.{type(self).__name__}",
            "dream_trainer": {"checkpoint_id": checkpoint.checkpoint_id, "metric": checkpoint.metric},
        }

    def _per_rank_rngs(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Keep generators that differ between ranks (``named_rngs`` seeded per rank): every
        rank stores the same tree, ``rngs`` being rank 0's and ``rngs_by_rank.{r}`` each rank's.
        (DCP keeps one rank's copy and every rank resumes that one stream.)"""
        import torch.distributed as dist

        rngs = state_dict.get("rngs")
        if not isinstance(rngs, dict) or not rngs or dist.get_world_size(self.pg) == 1:
            return state_dict
        gathered: list[Any] = [None] * dist.get_world_size(self.pg)
        dist.all_gather_object(gathered, {k: v.detach().cpu() for k, v in rngs.items()}, group=self.pg)
        if all(set(g) == set(gathered[0]) and all(g[k].equal(gathered[0][k]) for k in g) for g in gathered):
            return state_dict
        return {**state_dict, "rngs": gathered[0], RNGS_BY_RANK: {str(r): g for r, g in enumerate(gathered)}}

    def _save(self, checkpoint: Checkpoint, state_dict: dict[str, Any]) -> None:
        if self._checkpoint_exists(checkpoint):
            return
        save_path = self._checkpoint_path(checkpoint)
        logger.info(f"Saving checkpoint {checkpoint.checkpoint_id}")
        state_dict = self._per_rank_rngs(state_dict)
        save(state_dict, save_path, metadata=self._metadata(checkpoint), process_group=self.pg)
        logger.info(f"Saved checkpoint to {save_path}")
        self._cleanup_checkpoints()
        self.trainer.world.barrier()

    def _load(self, checkpoint: Checkpoint, state_dict: dict[str, Any]) -> None:
        if getattr(checkpoint, "legacy", False):
            self._warn_legacy(checkpoint)
            super()._load(checkpoint, state_dict)  # Dream Trainer's own DCP read
            return
        path = self._checkpoint_path(checkpoint)
        logger.info(f"Loading checkpoint {path}")
        stored = decode_tree(read_manifest(path).state, lambda *_: None)
        if self.config.strict_load:
            missing = _missing(state_dict, stored)
            if missing:
                shown = "\n  ".join(missing[:20])
                raise StateMismatchError(
                    f"{path}: strict_load=True but the checkpoint lacks {len(missing)} value(s) "
                    f"of the trainer state:\n  {shown}\nSet strict_load=False to load what matches."
                )
        # strict=False: like DCP, values only the checkpoint has are ignored; missing ones
        # were refused above when strict_load asks for it.
        mine = self._rank_rng_target(state_dict, stored)
        load_into(path, state_dict, strict=False, process_group=self.pg)
        if mine is not None:
            state_dict["rngs"].update(state_dict.pop(RNGS_BY_RANK)[mine])
        logger.info(f"Resumed {self.trainer.experiment} from step {checkpoint.step}")
        self.trainer.world.barrier()

    def _rank_rng_target(self, state_dict: dict[str, Any], stored: Any) -> str | None:
        """When the checkpoint holds per-rank generators, add this rank's to the load target
        (returns its key); the shared ``rngs`` are used when there is none for this rank."""
        import torch
        import torch.distributed as dist

        by_rank = stored.get(RNGS_BY_RANK) if isinstance(stored, dict) else None
        rngs = state_dict.get("rngs")
        if not isinstance(by_rank, dict) or not isinstance(rngs, dict):
            return None
        rank = str(dist.get_rank(self.pg))
        if rank not in by_rank:
            logger.warning(
                f"the checkpoint holds per-rank RNG states for ranks {sorted(by_rank)}, none for "
                f"rank {rank}: this rank resumes rank 0's streams"
            )
            return None
        theirs = by_rank[rank] if isinstance(by_rank[rank], dict) else {}
        state_dict[RNGS_BY_RANK] = {rank: {k: torch.empty_like(v) for k, v in rngs.items() if k in theirs}}
        return rank

    def _warn_legacy(self, checkpoint: Checkpoint) -> None:
        message = (
            f"resuming from {self._checkpoint_path(checkpoint)}, a DCP checkpoint written by "
            "Dream Trainer's own callback: it is read through DCP (its .metadata is a pickle), "
            "without ckptproto's checksums; the next checkpoints are ckptproto ones"
        )
        logger.warning(message)
        warnings.warn(message, LegacyCheckpointWarning, stacklevel=3)

    def _checkpoint_callback_names(self, checkpoint: Checkpoint) -> set[str]:
        if getattr(checkpoint, "legacy", False):
            return set(super()._checkpoint_callback_names(checkpoint))
        state = decode_tree(read_manifest(self._checkpoint_path(checkpoint)).state, lambda *_: None)
        trainer = state.get("trainer") if isinstance(state, dict) else None
        return _leaf_names(trainer.get("callbacks") if isinstance(trainer, dict) else None)

    def _checkpoint_path(self, checkpoint: Checkpoint) -> Path:
        if isinstance(checkpoint, FoundCheckpoint):
            assert isinstance(checkpoint.path, Path), "__init__ refuses s3:// roots"
            return checkpoint.path
        return Path(self.root_dir) / str(checkpoint.checkpoint_id)

    def _find_checkpoints(self, mode: Any | None = None) -> list[Checkpoint]:
        mode = self.config.resume_mode if mode is None else mode
        order: Literal["min", "max", "last"] = mode if mode in ("min", "max") else "last"  # int: "last"
        return list(find_checkpoints(Path(self.root_dir), order))

    def _discard(self, checkpoint: Checkpoint) -> None:
        """Retention: through the storage, which makes it stop being a checkpoint first
        (locally: renamed out of sight, atomically), then deletes it."""
        storage, path = resolve(self._checkpoint_path(checkpoint))
        logger.info(f"Purging checkpoint {checkpoint.checkpoint_id}")
        try:
            storage.remove(path)
        except CheckpointError as exc:
            logger.warning(str(exc))

    def _cleanup_checkpoints(self) -> None:
        if self.trainer.world.is_global_zero:
            for checkpoint in self._stale_checkpoints():
                self._discard(checkpoint)
        self.trainer.world.barrier()


class AsyncCheckpointCallback(_DreamAsyncCheckpointCallback, CheckpointCallback):
    """Dream Trainer's ``AsyncCheckpointCallback``, saving ckptproto checkpoints in the
    background (``async_mode="async"`` or ``"async_with_pinned_mem"``)::

        callback = AsyncCheckpointCallback(CheckpointParameters(
            root_dir="./checkpoints", checkpoint_every_n_train_epochs=1, async_mode="async"))
    """

    _saver: AsyncSaver | None = None

    def post_setup(self) -> None:
        super().post_setup()
        # Collective under torch.distributed: every rank builds its saver here.
        staging: StagingMode = (
            "background" if self.config.async_mode == "async_with_pinned_mem" else "blocking"
        )
        self._saver = AsyncSaver(max_pending=1, staging=staging, process_group=self.pg)

    def _save(self, checkpoint: Checkpoint, state_dict: dict[str, Any]) -> None:
        self._wait_save()  # the previous save is committed and retention has run
        if self._checkpoint_exists(checkpoint):
            return
        assert self._saver is not None, "post_setup creates the saver"
        state_dict = self._per_rank_rngs(state_dict)
        save_path = self._checkpoint_path(checkpoint)
        logger.info(f"Saving checkpoint {checkpoint.checkpoint_id}")
        self._save_future = self._saver.save(state_dict, save_path, metadata=self._metadata(checkpoint))
        self._pending_saved_step = checkpoint.step
        self._pending_checkpoint_path = save_path

    def maybe_wait_for_staging(self) -> None:
        # The live tensors may change from the next train step on: wait until they are copied.
        future = self._save_future
        if isinstance(future, SaveFuture):
            future.wait_staged()

    def _cleanup_checkpoints(self) -> None:
        # Runs on rank 0 after a save committed. The rename is immediate (a stale checkpoint
        # stops being one at once); the purge thread only frees the disk space.
        if not self.trainer.world.is_global_zero:
            return
        for checkpoint in self._stale_checkpoints():
            # local only (__init__ refuses s3:// roots): hidden now, deleted by the purge thread
            path = self._checkpoint_path(checkpoint)
            try:
                hidden = commit.hide(path)
            except CheckpointError as exc:
                logger.warning(str(exc))
                continue
            logger.info(f"Purging checkpoint {checkpoint.checkpoint_id}")
            if self.purge_thread.is_alive():
                self.purge_queue.put(str(hidden))
            else:
                commit.abort(hidden)

    def _close(self) -> None:
        try:
            super()._close()
        finally:
            if self._saver is not None:
                self._saver.close()
