"""Pausing Python's cyclic garbage collector while building or reading large manifests.

A state of 10,000 tensors creates hundreds of thousands of small dicts and lists; each burst
of allocations triggers generational collections that walk every live object (the tensors
included) and more than double the time of a save or load. None of these objects form
cycles, so collection is deferred to the end of the operation.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def paused() -> Iterator[None]:
    """``with paused(): ...`` — GC off inside (re-entrant and thread-safe), restored after."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
