"""AsyncCheckpointCallback: CheckpointCallback whose saves are written in the background."""

from __future__ import annotations

import logging
import threading
import warnings
from concurrent.futures import Future
from typing import Any

from ckptproto.format.info import CheckpointInfo
from ckptproto.io.async_save import AsyncSaver, SaveFuture, StagingMode
from ckptproto.io.coordinate import LOCAL, resolve_group
from ckptproto.policy.checkpoint import CheckpointCallback
from ckptproto.policy.locations import Location, as_arg
from ckptproto.policy.params import CheckpointParameters
from ckptproto.policy.retention import Kept

logger = logging.getLogger("ckptproto.policy")


class AsyncCheckpointCallback(CheckpointCallback):
    """Same policy as CheckpointCallback; saves go through an ``AsyncSaver``::

        callback = AsyncCheckpointCallback(checkpoint_config)   # training continues while it saves

    * It decides exactly what CheckpointCallback decides (when to save, which checkpoints
      to keep), whatever the I/O timing: decisions count the saves still being written.
    * ``save`` returns once the tensors are copied out (``staging="blocking"``, the default:
      correct whatever hooks the loop calls) or once the save is accepted
      (``staging="background"``); the loop never waits longer.
    * ``pre_optimizer_step`` waits until the tensors of pending saves are staged, so the
      checkpoint holds the weights of the step it is named after; with background staging a
      loop that skips it gets a failed save, not a torn one, where the guard can tell
      (docs/async.md). States that change during the forward pass (BatchNorm running
      statistics) need ``staging="blocking"``.
    * The saver is created at the first save, so a process group started after the callback
      was built (as frameworks do) is the one the saves run on.
    * Deletions for retention run when the displacing save commits; ``post_fit`` and
      ``on_exception`` finish pending saves. A failed save is logged and warned about; the
      checkpoints before it stay.
    """

    def __init__(
        self,
        config: CheckpointParameters | None = None,
        *,
        staging: StagingMode = "blocking",
        max_pending: int = 1,
        saver: AsyncSaver | None = None,
        **params: Any,
    ) -> None:
        super().__init__(config, **params)
        self._staging: StagingMode = staging
        self._max_pending = max_pending
        if saver is None:  # check the arguments now, not at the first save
            AsyncSaver(max_pending=max_pending, staging=staging, process_group=LOCAL).close()
        self._saver = saver
        self._own_saver = saver is None
        self._futures: list[tuple[SaveFuture, Kept, threading.Event]] = []
        self.failed: list[tuple[Location | str, BaseException]] = []

    @property
    def saver(self) -> AsyncSaver:
        """The ``AsyncSaver`` the saves go through (the one passed in, or one made at the first
        save, bound to the process group of that moment)."""
        if self._saver is None:
            self._saver = AsyncSaver(max_pending=self._max_pending, staging=self._staging)
        return self._saver

    def _bound_saver(self) -> AsyncSaver:
        saver = self.saver
        if self._own_saver and not saver.distributed and resolve_group(None) is not None:
            # made before torch.distributed was started (e.g. ``saver`` read early): every rank
            # would write a whole checkpoint of world size 1 to the same path; rebind.
            saver.close()
            self._saver = saver = AsyncSaver(max_pending=self._max_pending, staging=self._staging)
        return saver

    def _write(
        self, path: Location, metadata: dict[str, Any], overwrite: bool, record: Kept, evicted: list[Kept]
    ) -> None:
        self._futures = [item for item in self._futures if not item[2].is_set()]
        try:
            future = self._bound_saver().save(
                self.trainer, as_arg(path), metadata=metadata, overwrite=overwrite
            )
        except BaseException:
            self._failed(record, evicted)
            raise
        done = threading.Event()
        self._futures.append((future, record, done))
        # Runs on the saver's writer thread right after the commit.
        future.add_done_callback(lambda fut: self._done(fut, record, evicted, done))

    def _done(
        self, future: Future[CheckpointInfo], record: Kept, evicted: list[Kept], done: threading.Event
    ) -> None:
        try:
            exc = future.exception()
            if exc is not None:
                self._failed(record, evicted)
                with self._lock:
                    self.failed.append((getattr(future, "path", "?"), exc))
                return
            self._committed(record, evicted)
        except BaseException as exc:
            logger.error("retention after %s failed: %s", getattr(future, "path", "?"), exc, exc_info=exc)
        finally:
            done.set()

    def pre_optimizer_step(self) -> None:
        for future, _record, _done in self._futures:
            future.wait_staged()

    def wait(self) -> None:
        """Block until every pending save is committed (or failed) and retention has run."""
        for _future, _record, done in self._futures:
            done.wait()  # set after the future completed and retention ran
        self._futures = []
        with self._lock:
            failed, self.failed = self.failed, []
        for path, exc in failed:
            warnings.warn(f"async checkpoint {path} failed: {exc}", RuntimeWarning, stacklevel=2)

    def post_fit(self) -> None:
        super().post_fit()  # may start the final save (save_last)
        self.wait()

    def on_exception(self, exc: BaseException) -> None:
        self.wait()
        super().on_exception(exc)

    def close(self) -> None:
        """Finish pending saves and stop the saver's threads."""
        self.wait()
        if self._saver is not None:
            self._saver.close()
