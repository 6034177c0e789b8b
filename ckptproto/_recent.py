"""The last few results of a costly step, found again by an equal key: a training run saves
the same layout again and again, and a save of a state of many tensors spends most of its
Python work on text and plans that depend on that layout only (``io/plan.py``, the columns'
texts, the encoder's columns)::

    recent: Recent[tuple[int, list[str]], str] = Recent(4)
    text = recent.get((first, keys))
    if text is None:
        text = write(first, keys)
        recent.put((first, keys), text)

A key is compared with ``==`` (a tuple element by element, stopping at the first that
differs; equal strings that are the same objects by identity): keep the cheap parts first.
Keys and values are kept as given: give copies of anything the caller may change later.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The values of the last ``size`` keys put, newest first (thread-safe)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: list[tuple[K, V]] = []
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value put with a key equal to ``key`` lately, or None."""
        with self._lock:
            return next((value for seen, value in self._items if seen == key), None)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items.insert(0, (key, value))
            del self._items[self._size :]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
