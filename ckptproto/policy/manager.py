"""CheckpointManager: periodic, top-k and last saves, async staging, resume and preemption for
a plain training loop, in a few lines, with no hook to forget::

    ckpt = ckptproto.CheckpointManager("checkpoints", models={"model": model},
                                       optimizers={"optimizer": opt}, dataloaders={"train": loader},
                                       save_every_n_steps=100, keep_top_k=3)
    with ckpt:                                           # resumes; finishes pending saves on exit
        for batch in ckpt.batches(loader, epochs=10):    # counts steps and epochs; stops on SIGTERM
            loss = model(batch).mean()
            opt.zero_grad(); loss.backward(); opt.step()  # an async save finishes staging in here
            ckpt.log(loss=loss.item())

It is built on the callbacks (``AsyncCheckpointCallback`` or ``CheckpointCallback`` in a
``CallbackCollection``, a ``TrainState``) and calls their hooks at the right points, so the
semantics are theirs (docs/policy.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, TypeVar

from ckptproto.arrays import loaded_torch
from ckptproto.io.async_save import StagingMode
from ckptproto.policy.async_checkpoint import AsyncCheckpointCallback
from ckptproto.policy.callbacks import Callback, CallbackCollection
from ckptproto.policy.checkpoint import CheckpointCallback
from ckptproto.policy.locations import Location, parse_location
from ckptproto.policy.params import CheckpointParameters, PathLike
from ckptproto.policy.trainer import TrainState

logger = logging.getLogger("ckptproto.policy")

B = TypeVar("B")


class _LoopPosition(Callback[Any]):
    """Makes each epoch's loader iterator so that a resumed run draws from torch's global RNG
    exactly what the uninterrupted run drew (dropout depends on it).

    Making a ``DataLoader`` iterator draws its base seed from the global RNG (unless the
    loader has ``generator=``), and a ``StatefulDataLoader`` restored from an exhausted state
    draws more than once. So the iterator is made with the RNG state put back afterwards, and
    then exactly one seed-sized draw is taken, as a plain ``DataLoader`` would; except for the
    first iterator of a run resumed mid-epoch, since the uninterrupted run had already made
    that epoch's iterator before the checkpoint was saved. ``in_epoch`` is saved with the
    checkpoint to tell the two apart."""

    def __init__(self) -> None:
        self.in_epoch = False
        self.resumed_in_epoch = False

    def state_dict(self) -> dict[str, Any]:
        return {"in_epoch": self.in_epoch}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.resumed_in_epoch = bool(state_dict.get("in_epoch", False))

    def iterate(self, loader: Iterable[B], rng: bool) -> Iterator[B]:
        torch = loaded_torch()
        resumed_in_epoch, self.resumed_in_epoch = self.resumed_in_epoch, False
        self.in_epoch = True
        if not rng or torch is None:
            return iter(loader)
        state = torch.get_rng_state()
        iterator = iter(loader)
        torch.set_rng_state(state)
        if not resumed_in_epoch:
            torch.empty((), dtype=torch.int64).random_()  # the base seed's draw, made by us
        return iterator


class CheckpointManager:
    """Checkpointing for a plain loop: the ``TrainState``, the checkpoint callback, and the
    hooks called where they belong.

    * ``with manager:`` resumes (``resume_mode``, "latest" by default) and logs one WARNING
      line saying from where (``resumed_from``: that checkpoint, or None after a fresh
      start); on leaving, pending saves are finished (a SIGTERM after the last step still
      saves), and on an exception they are finished before it propagates.
    * ``manager.batches(loader, epochs=N)`` yields the batches of the epochs not done yet
      (after a resume, a ``StatefulDataLoader`` continues mid-epoch). A batch during which an
      optimizer stepped is one step: ``global_step`` counts it as soon as the optimizer
      stepped, and when the batch's body ends the step may save; batches without an
      optimizer step (gradient accumulation) do not count. After SIGTERM
      (``save_on_preemption``, on by default here) it saves and stops yielding.
    * The optimizers' ``step()`` is hooked (``register_step_pre_hook``): an async save's
      tensors are staged before any optimizer changes them, whichever code calls ``step()``.
      For an optimizer without that hook (or none), the wait happens before each batch
      instead, and each batch counts as a step when its body ends.
    * ``log(**metrics)`` reports step metrics (a ``monitor`` such as ``loss``);
      ``validated(**metrics)`` reports a validation pass (``val_loss``) and may save.

    Policy keywords are those of ``CheckpointParameters`` (``monitor``, ``mode``,
    ``keep_top_k``, ``save_last``, ``save_every_n_steps``, ``save_every_n_epochs``,
    ``resume_mode``, ``save_on_preemption``, ``strict_load``), or pass ``params=``.
    ``async_save=False`` saves synchronously; ``staging`` is that of
    ``AsyncCheckpointCallback``; ``callbacks`` adds callbacks of your own (their state is
    checkpointed too).
    """

    def __init__(
        self,
        root_dir: PathLike,
        *,
        models: Mapping[str, Any] | None = None,
        optimizers: Mapping[str, Any] | None = None,
        schedulers: Mapping[str, Any] | None = None,
        dataloaders: Mapping[str, Any] | None = None,
        params: CheckpointParameters | None = None,
        async_save: bool = True,
        staging: StagingMode = "background",
        callbacks: Iterable[Callback[Any]] = (),
        rng: bool = True,
        **policy: Any,
    ) -> None:
        if params is not None and policy:
            raise TypeError("pass params=CheckpointParameters(...) or policy keywords, not both")
        if params is None:
            policy.setdefault("save_on_preemption", True)
            params = CheckpointParameters(root_dir=root_dir, **policy)
        elif params.root != parse_location(root_dir):
            raise ValueError(f"root_dir {root_dir!r} differs from params.root_dir {params.root_dir!r}")
        self.callback: CheckpointCallback = (
            AsyncCheckpointCallback(params, staging=staging) if async_save else CheckpointCallback(params)
        )
        self._position = _LoopPosition()
        self.callbacks = CallbackCollection([self.callback, *callbacks, self._position])
        self.state = TrainState(
            models=models,
            optimizers=optimizers,
            schedulers=schedulers,
            dataloaders=dataloaders,
            callbacks=self.callbacks,
            rng=rng,
        )
        self.callbacks.bind(self.state)
        self._hooks: list[Any] = []
        self._in_batch = False  # inside the body of `for batch in manager.batches(...)`
        self._stepped = False  # an optimizer stepped in this batch (global_step counted it)
        self._closed = False
        self._metrics: dict[str, Any] = {}
        self._active = False

    # -- what the loop reads -----------------------------------------------------------------

    @property
    def global_step(self) -> int:
        """Optimizer steps done, counting those of the run resumed from."""
        return self.state.global_step

    @property
    def current_epoch(self) -> int:
        """Epochs done (the index of the epoch in progress)."""
        return self.state.current_epoch

    @property
    def resumed_from(self) -> Location | None:
        """The checkpoint this run resumed from; None when it started fresh."""
        return self.callback.resumed_from

    @property
    def last_saved(self) -> Location | None:
        """The checkpoint most recently saved (with async saves: maybe still being written)."""
        return self.callback.last_saved

    @property
    def kept(self) -> list[str]:
        """Names of this run's committed checkpoints that retention keeps, oldest first."""
        return self.callback.kept

    @property
    def should_stop(self) -> bool:
        """True once a callback asked the loop to stop (after a preemption save)."""
        return self.callbacks.should_stop

    # -- entering and leaving ----------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        if self._active or self._closed:
            raise RuntimeError(
                "a CheckpointManager is used by one `with` block; make a new one to train again"
            )
        try:
            self.callbacks.pre_fit()  # resumes
        except BaseException:
            self._closed = True  # e.g. the checkpoint does not fit the model: nothing to finish
            self._close_saver()
            raise
        self._active = True
        self._hook_optimizers()
        if self.resumed_from is not None:
            logger.warning(
                "ckptproto: resumed from %s (step %d, epoch %d)",
                self.resumed_from,
                self.global_step,
                self.current_epoch,
            )
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._active = False
        self._closed = True
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        try:
            if exc is None:
                self.callbacks.post_fit()  # a SIGTERM after the last step saves here; waits for saves
            else:
                self.callbacks.on_exception(exc)  # finishes pending saves; the exception propagates
        finally:
            self._close_saver()

    def _close_saver(self) -> None:
        if isinstance(self.callback, AsyncCheckpointCallback):
            self.callback.close()  # stops the saver's threads

    def _hook_optimizers(self) -> None:
        for opt in self.state.optimizers.values():
            if hasattr(opt, "register_step_pre_hook") and hasattr(opt, "register_step_post_hook"):
                self._hooks.append(opt.register_step_pre_hook(self._before_optimizer_step))
                self._hooks.append(opt.register_step_post_hook(self._after_optimizer_step))

    def _before_optimizer_step(self, *_args: Any) -> None:
        self.callbacks.pre_optimizer_step()  # async saves: tensors staged before they change

    def _after_optimizer_step(self, *_args: Any) -> None:
        # The first optimizer step of a batch is the step (several optimizers: still one).
        if self._in_batch and not self._stepped:
            self._stepped = True
            self.state.global_step += 1

    # -- the loop ----------------------------------------------------------------------------

    def _require_active(self, what: str) -> None:
        if not self._active:
            raise RuntimeError(
                f"CheckpointManager.{what}() outside `with manager:`; the `with` block resumes "
                "and finishes pending saves"
            )

    def epochs(self, epochs: int) -> Iterator[int]:
        """The indices of the epochs not done yet, up to ``epochs``; iterate each epoch's
        batches with ``batches(loader)`` (without ``epochs=``)::

            for epoch in manager.epochs(10):
                for batch in manager.batches(loader):
                    ...
                manager.validated(val_loss=evaluate(model))
        """
        self._require_active("epochs")
        while self.state.current_epoch < epochs and not self.should_stop:
            epoch = self.state.current_epoch
            self.callbacks.pre_train_epoch()
            yield epoch
            if self.should_stop:
                return
            if self.state.current_epoch == epoch:
                raise RuntimeError(
                    f"epoch {epoch} ended before its batches did: iterate them with "
                    "`for batch in manager.batches(loader)` to the end (to stop training, leave "
                    "the epoch loop too)"
                )

    def batches(self, loader: Iterable[B], epochs: int | None = None) -> Iterator[B]:
        """Yield ``loader``'s batches, counting steps; at the end of ``loader`` the epoch is
        counted (and may save). With ``epochs=N``, all the epochs left up to N; without, one
        epoch (inside ``for epoch in manager.epochs(N)``). Stops early after a preemption save."""
        self._require_active("batches")
        if epochs is not None:
            for _epoch in self.epochs(epochs):
                yield from self.batches(loader)
            return
        self._check_loader(loader)
        hooked = bool(self._hooks)
        for batch_idx, batch in enumerate(self._position.iterate(loader, self.state.rng is not None)):
            self.callbacks.pre_train_step(batch_idx)
            if not hooked:  # nothing tells us when an optimizer steps: stage before the batch
                self.callbacks.pre_optimizer_step()
            self._in_batch, self._stepped = True, False
            try:
                yield batch
            finally:
                self._in_batch = False
            if not hooked:
                self.state.global_step += 1  # every batch is a step
            elif not self._stepped:
                continue  # no optimizer step in this batch (gradient accumulation)
            metrics, self._metrics = self._metrics, {}
            self.callbacks.post_train_step(metrics, batch_idx)
            if self.should_stop:
                return
        self._position.in_epoch = False
        self.state.current_epoch += 1
        self.callbacks.post_train_epoch(None)

    def _check_loader(self, loader: Any) -> None:
        if hasattr(loader, "state_dict") and all(dl is not loader for dl in self.state.dataloaders.values()):
            warnings.warn(
                "this loader has state_dict() but is not in the manager's dataloaders: a resumed "
                "run restarts its epoch from the first batch; pass dataloaders={'train': loader}",
                RuntimeWarning,
                stacklevel=3,
            )

    def log(self, **metrics: Any) -> None:
        """Metrics of the current step (``loss=loss.item()``); a ``monitor`` among them ranks
        the checkpoint saved at this step."""
        self._metrics.update(metrics)

    def validated(self, **metrics: Any) -> None:
        """A validation pass ended with these metrics (``val_loss=0.31``); saves when the
        monitored one would enter the ``keep_top_k`` best."""
        self._require_active("validated")
        self.callbacks.pre_validation_epoch()
        self.callbacks.post_validation_epoch(metrics)

    def save(self) -> Location:
        """Save now, whatever the policy says; returns the checkpoint's location (a Path, or an
        ObjectLocation under an ``s3://`` root_dir)."""
        self._require_active("save")
        return self.callback.save()
