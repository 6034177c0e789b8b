"""The handle of one async save: a ``concurrent.futures.Future`` of its CheckpointInfo that
also tells when the save stopped reading the live state::

    fut = saver.save(state, "ckpt/step_100")
    fut.wait_staged()            # tensors copied out; the caller may mutate them now
    info = fut.result()          # committed; raises the save's error
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from ckptproto.format.info import CheckpointInfo
from ckptproto.location import Location


class SaveFuture(Future[CheckpointInfo]):
    """The handle of one async save (a ``concurrent.futures.Future`` of its CheckpointInfo)::

        fut = saver.save(state, "ckpt/step_100")
        fut.wait_staged()            # tensors copied out; the caller may mutate them now
        info = fut.result()          # committed (atomic, durable); raises if the save failed

    ``result()``/``exception()`` raise TimeoutError when ``timeout`` passes. A save cannot be
    cancelled once accepted (``cancel()`` returns False).
    """

    def __init__(self, path: Location) -> None:
        super().__init__()
        self.path = path
        self._staged = threading.Event()

    def wait_staged(self, timeout: float | None = None) -> None:
        """Return once the live state is no longer read by this save (its tensors are copied,
        or the save failed before that: the error then comes from ``result()``)."""
        if not self._staged.wait(timeout):
            raise TimeoutError(f"staging the save to {self.path} did not finish within {timeout} s")

    def mark_staged(self) -> None:
        """Called by the saver once the save no longer reads the live state (copied, or
        failed): releases every ``wait_staged()``."""
        self._staged.set()

    def staged(self) -> bool:
        """True once ``wait_staged()`` would return at once."""
        return self._staged.is_set()

    def __repr__(self) -> str:
        return f"<SaveFuture {self.path} staged={self.staged()} done={self.done()}>"
