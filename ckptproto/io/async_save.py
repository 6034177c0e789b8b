"""The thread-based async saver: the training loop hands over its state and keeps training,
while the bytes reach disk in the background.

::

    saver = ckptproto.AsyncSaver(max_pending=1, staging="background")
    for step in range(steps):
        loss = model(batch).sum(); loss.backward()
        if fut is not None:
            fut.wait_staged()        # the last save has copied the tensors out: safe to step
        optimizer.step(); optimizer.zero_grad()
        if step % 100 == 0:
            fut = saver.save({"models": {"model": model}, "optimizers": {"optimizer": optimizer},
                              "trainer": {"global_step": step}}, f"ckpt/step_{step}")
    saver.close()                    # finishes every pending save

The checkpoint holds the state exactly as it was when ``save`` was called, provided the caller
does not mutate a tensor before ``wait_staged()`` returned (with ``staging="blocking"``, the
default, ``save`` itself returns only then). Plain values (ints, lists, strings) are captured
by ``save`` itself in either mode. See docs/async.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import wait as wait_futures
from typing import Any, Literal

from ckptproto import _gc
from ckptproto.errors import CheckpointError, SaverBusyError
from ckptproto.format.info import CheckpointInfo
from ckptproto.io import async_job, direct, saver_exit, staging, writer_process

# Re-exported (``as``): policy tests hold the write by patching ``async_save.pipeline.run``.
from ckptproto.io import pipeline as pipeline
from ckptproto.io.async_job import SaveJob, WriterMode
from ckptproto.io.backends import resolve
from ckptproto.io.coordinate import Timeout, background_coordinator
from ckptproto.io.prepare import check_and_encode
from ckptproto.io.save_future import SaveFuture
from ckptproto.io.staging import StagingPool
from ckptproto.protocol import Stateful

__all__ = ["AsyncSaver", "SaveFuture", "StagingMode", "WhenFull", "WriterMode", "default_saver", "save_async"]

logger = logging.getLogger("ckptproto")

PathLike = str | os.PathLike[str]
StagingMode = Literal["blocking", "background"]
WhenFull = Literal["block", "raise"]


class AsyncSaver:
    """Saves checkpoints in the background, at most ``max_pending`` at a time.

    ``staging``: ``"blocking"`` (default) copies the tensors into reusable staging buffers
    before ``save`` returns — the caller may mutate its state at once; ``"background"`` returns
    at once and copies on the saver's thread — the caller must call ``fut.wait_staged()``
    before it mutates a tensor of the state (e.g. just before ``optimizer.step()``).

    ``when_full``: what ``save`` does when ``max_pending`` saves are still in flight:
    ``"block"`` (default) waits until one is committed (or failed); ``"raise"`` raises
    SaverBusyError at once, with nothing started.

    ``process_group``: under torch.distributed (by default the world group once initialised)
    every rank stages and writes its own share and rank 0 commits when every rank's files are
    durable (docs/distributed.md); constructing the saver is then a collective call.
    ``timeout`` (seconds or a ``datetime.timedelta``, default 30 minutes): how long each
    background save waits for the other ranks before it fails on every rank, naming them.

    A context manager; ``close()`` (also at interpreter exit) finishes every pending save::

        with ckptproto.AsyncSaver(max_pending=2) as saver:
            fut = saver.save({"models": {"model": model}}, "ckpt/step_10")
    """

    def __init__(
        self,
        max_pending: int = 1,
        staging: StagingMode = "blocking",
        *,
        when_full: WhenFull = "block",
        pool: StagingPool | None = None,
        process_group: Any = None,
        timeout: Timeout = None,
        writer: WriterMode = "auto",
    ) -> None:
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ValueError(f"max_pending must be an int >= 1, got {max_pending!r}")
        if staging not in ("blocking", "background"):
            raise ValueError(f"staging must be 'blocking' or 'background', got {staging!r}")
        if when_full not in ("block", "raise"):
            raise ValueError(f"when_full must be 'block' or 'raise', got {when_full!r}")
        if writer not in ("auto", "thread", "process"):
            raise ValueError(f"writer must be 'auto', 'thread' or 'process', got {writer!r}")
        if writer == "process" and not writer_process.available():
            raise ValueError("writer='process' needs memfd_create and fd passing (Linux); use 'auto'")
        self.max_pending = max_pending
        self.staging: StagingMode = staging
        self.when_full: WhenFull = when_full
        self.pool = pool if pool is not None else StagingPool()
        # Under torch.distributed every rank stages and writes its share; the commit waits for
        # every rank's files (docs/distributed.md). Created here: it is a collective call.
        self._coordinator = background_coordinator(process_group, timeout)
        if writer == "process" and self._coordinator.distributed:
            raise ValueError(
                "writer='process' is for single-process saves; a distributed save writes from the "
                "training process (its coordinator exchanges run there); use 'auto' or 'thread'"
            )
        self.writer: WriterMode = writer
        self._writer_process: writer_process.WriterProcess | None = None
        self._cond = threading.Condition()
        self._inflight: set[SaveFuture] = set()  # holding a slot (counts against max_pending)
        self._unfinished: set[SaveFuture] = set()  # not yet done (what wait() waits for)
        self._closed = False
        self._submitting = 0  # save() calls between taking a slot and queueing their job
        self._stage_queue: queue.SimpleQueue[SaveJob | None] = queue.SimpleQueue()
        self._write_queue: queue.SimpleQueue[SaveJob | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        saver_exit.register(self)

    @property
    def distributed(self) -> bool:
        """True when this saver's saves run across the ranks of a torch.distributed group
        (it was made while one was initialised, or given one)::

            if not saver.distributed and torch.distributed.is_initialized(): ...
        """
        return self._coordinator.distributed

    @property
    def writer_pid(self) -> int | None:
        """The process id of this saver's checkpoint writer process while it runs; None before
        a save went to it, after ``close()``, and with ``writer="thread"``::

            saver = ckptproto.AsyncSaver(writer="process")
        """
        proc = self._writer_process
        return proc.pid if proc is not None else None

    # -- the caller's side -------------------------------------------------------------------

    def save(
        self,
        state_or_stateful: Stateful | Mapping[str, Any],
        path: PathLike,
        *,
        metadata: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> SaveFuture:
        """Start saving ``state_or_stateful`` to ``path``; returns a SaveFuture.

        The state is read and checked here, as ``ckptproto.save`` does: a value the format
        cannot store raises UnsupportedValueError from this call, with nothing started. Every
        later problem (the destination exists, disk full, a failed copy) is raised from
        ``fut.result()`` and logged to the ``ckptproto`` logger; nothing partial is committed.
        """
        storage, final = resolve(path)  # a location no backend serves is refused here
        # The collector stays paused from prepare until the job is handed off (async_job.
        # hand_off drops its per-tensor objects), except while this call waits for a slot.
        with contextlib.ExitStack() as pause:
            pause.enter_context(_gc.paused())
            encoded, metadata_tree = check_and_encode(state_or_stateful, metadata, self._coordinator)
            future = SaveFuture(final)
            future.set_running_or_notify_cancel()  # accepted saves cannot be cancelled
            if not self._reserve(future, wait=False):
                pause.close()  # a wait for a save in flight can be long: collect meanwhile
                self._reserve(future)
            job = SaveJob(
                future, None, storage, final, metadata_tree, overwrite, staging.Ready(), encoded=encoded
            )
            try:
                job.process = async_job.use_process(job, self.writer, self._coordinator)
                if not job.process:
                    # Stage only what this rank writes; the global layout travels in the share.
                    # (The writer process plans its job itself: that is Python work, ~0.5 us a
                    # tensor, the training process no longer does.)
                    async_job.plan(job, self._coordinator)
                if self.staging == "background":
                    leaves = async_job.stage_leaves(job)
                    job.versions = staging.capture_versions(leaves)  # the torn-snapshot guard's reference
                    # Where each CUDA stream stands now; staging on this thread, right away, sees
                    # the same point without it (the side stream waits on the current stream).
                    job.ready = staging.capture_ready(encoded.tensors)
                del encoded  # the job holds what it needs
                if self.staging == "blocking":
                    self._stage(job)
                    self._write_queue.put(job)
                else:
                    self._stage_queue.put(job)
            except BaseException as exc:
                self._complete(job, None, exc, log=False)
                raise
            finally:
                with self._cond:
                    self._submitting -= 1
                    self._cond.notify_all()
        return future

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every save accepted so far is committed or failed; False on timeout.
        Failures are not raised here: each is on its future (and in the log)."""
        with self._cond:
            pending = list(self._unfinished)
        _done, not_done = wait_futures(pending, timeout=timeout)
        return not not_done

    def pending(self) -> int:
        """How many saves are accepted and not yet committed or failed."""
        with self._cond:
            return len(self._unfinished)

    def close(self) -> None:
        """Finish every pending save, then stop the saver's threads (idempotent). Later
        ``save`` calls raise CheckpointError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._submitting:  # a save() on another thread is queueing its job
                self._cond.wait()
            threads, self._threads = self._threads, []
        # The stop marker goes in behind every accepted save (the staging thread passes it on
        # to the writer), so the threads finish those saves before they stop, even if this
        # call is interrupted (Ctrl-C during exit) and never joins them.
        if len(threads) == 2:
            self._stage_queue.put(None)
        elif threads:
            self._write_queue.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        self.wait()
        self.pool.clear()
        with self._cond:
            proc, self._writer_process = self._writer_process, None
        if proc is not None:
            proc.close()

    def _writer(self) -> writer_process.WriterProcess:
        with self._cond:
            if self._writer_process is None:
                self._writer_process = writer_process.WriterProcess()
            return self._writer_process

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _reserve(self, future: SaveFuture, *, wait: bool = True) -> bool:
        """Take a slot for ``future``; False (nothing taken) if that needs a wait and ``wait``
        is False."""
        with self._cond:
            while True:
                if self._closed:
                    raise CheckpointError(f"{future.path}: this AsyncSaver is closed; create a new one")
                if len(self._inflight) < self.max_pending:
                    self._ensure_threads()
                    self._inflight.add(future)
                    self._unfinished.add(future)
                    self._submitting += 1
                    return True
                if self.when_full == "raise":
                    raise SaverBusyError(
                        f"{future.path}: {len(self._inflight)} saves still in flight (max_pending="
                        f"{self.max_pending}); wait for one, or use when_full='block'"
                    )
                if not wait:
                    return False
                self._cond.wait()

    def reset_after_fork(self) -> None:
        """In a forked child: forget the parent's threads and pending saves (the child has
        none of those threads; without this a save there would wait on them forever)."""
        self._cond = threading.Condition()
        self._inflight = set()
        self._unfinished = set()
        self._stage_queue = queue.SimpleQueue()
        self._write_queue = queue.SimpleQueue()
        self._threads = []
        self._submitting = 0
        self.pool._lock = threading.Lock()
        if self._writer_process is not None:
            self._writer_process.forget()  # the parent's child process; a new one starts on use
        self._writer_process = None

    def _ensure_threads(self) -> None:
        with self._cond:
            if self._threads:
                return
            daemon = saver_exit.threads_are_daemons()
            workers = [threading.Thread(target=self._write_loop, name="ckptproto-async-write", daemon=daemon)]
            if self.staging == "background":
                workers.append(
                    threading.Thread(target=self._stage_loop, name="ckptproto-async-stage", daemon=daemon)
                )
            for thread in workers:
                thread.start()
            self._threads = workers

    # -- the saver's threads -----------------------------------------------------------------

    def _stage(self, job: SaveJob) -> None:
        background = self.staging == "background"
        leaves = async_job.stage_leaves(job)
        job.staged = staging.stage_state(
            self.pool, leaves, job.ready, recheck=background, shared=job.process, copy_apart=job.process
        )
        try:
            with _gc.paused():  # (already paused in a blocking save())
                # The writer process's job needs only the layout: encoded while the bytes are
                # copied, on another core (~15 ms of save() at 20,000 tensors).
                async_job.describe(job)
        finally:
            job.staged.synchronize()
        if background:
            # The caller may have mutated the state while it was copied (a missed
            # wait_staged()): such a checkpoint would be torn, so the save fails instead.
            staging.check_not_mutated(leaves, job.versions, job.staged.views, where=str(job.future.path))
        del leaves
        job.ready = staging.Ready()
        job.future.mark_staged()
        with _gc.paused():  # (already paused in a blocking save())
            # The live tensors dropped (the write needs only the staged bytes and the plan).
            async_job.hand_off(job)

    def _stage_loop(self) -> None:
        while (job := self._stage_queue.get()) is not None:
            try:
                self._stage(job)
            except BaseException as exc:
                self._complete(job, None, exc)
                continue
            self._write_queue.put(job)
        self._write_queue.put(None)

    def _write_loop(self) -> None:
        direct.prefer(thread=True)  # its CPU is taken from the loop: large files skip the page cache
        while (job := self._write_queue.get()) is not None:
            info: CheckpointInfo | None = None
            error: BaseException | None = None
            try:
                if job.staged is None:
                    raise CheckpointError(f"{job.future.path}: internal error: the save was not staged")
                info = async_job.write(job, self._coordinator, self._writer)
            except BaseException as exc:
                error = exc
            self._complete(job, info, error)

    def _complete(
        self, job: SaveJob, info: CheckpointInfo | None, exc: BaseException | None, *, log: bool = True
    ) -> None:
        """Settle a job's future; never raises (a dead worker thread would hang every later
        save and close())."""
        try:
            staged, job.staged = job.staged, None
            if staged is not None:
                staged.release()
        except BaseException as release_error:
            if exc is None:
                exc = release_error
            else:
                logger.error("releasing the staging buffers of %s failed", job.future.path, exc_info=True)
        if exc is None and not isinstance(info, CheckpointInfo):
            exc = CheckpointError(f"{job.future.path}: internal error: the write returned {info!r}")
        job.future.mark_staged()
        if exc is not None and log:
            logger.error("async save to %s failed: %s", job.future.path, exc, exc_info=exc)
        # Free the slot before the future completes, so a callback (or a thread woken by
        # result()) can start the next save at once.
        with self._cond:
            self._inflight.discard(job.future)
            self._cond.notify_all()
        try:
            if exc is not None:
                job.future.set_exception(exc)
            else:
                logger.debug("async save committed %s", job.future.path)
                job.future.set_result(info)  # type: ignore[arg-type]
        finally:
            with self._cond:
                self._unfinished.discard(job.future)


_default_lock = threading.Lock()
_default: AsyncSaver | None = None


def default_saver() -> AsyncSaver:
    """The process-wide saver ``save_async`` uses (max_pending=1, blocking staging)."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = AsyncSaver()
        return _default


def save_async(
    state_or_stateful: Stateful | Mapping[str, Any],
    path: PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> SaveFuture:
    """``AsyncSaver.save`` on the process-wide default saver::

    fut = ckptproto.save_async({"models": {"model": model}}, "ckpt/step_10")
    info = fut.result()
    """
    return default_saver().save(state_or_stateful, path, metadata=metadata, overwrite=overwrite)
