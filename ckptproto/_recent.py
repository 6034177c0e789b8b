"""The last few results of a costly step, found again by an equal key (the least recently
used dropped first): a training run saves the same layout again and again, and a save of a
state of many tensors spends most of its Python work on text and plans that depend on that
layout only (``io/plan.py``, the columns' texts, the encoder's columns)::

    recent: Recent[tuple[int, list[str]], str] = Recent(4)
    text = recent.get_or_make((first, keys), lambda: write(first, keys))

A key is compared with ``==`` (a tuple element by element, stopping at the first that
differs; equal strings that are the same objects by identity): keep the cheap parts first.
Keys and values are kept as given: give copies of anything the caller may change later.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Recent(Generic[K, V]):
    """The values of the last ``size`` keys put or found, the least recently used dropped
    first (thread-safe). A key found again is the newest again: the layout a training run
    saves at every checkpoint is not pushed out by other layouts saved once each between."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: list[tuple[K, V]] = []
        self._lock = threading.Lock()
        _every.add(self)

    def get(self, key: K) -> V | None:
        """The value put with a key equal to ``key`` lately, or None."""
        with self._lock:
            items = self._items
            for at, (seen, value) in enumerate(items):
                if seen == key:
                    if at:
                        items.insert(0, items.pop(at))
                    return value
            return None

    def get_or_make(self, key: K, make: Callable[[], V]) -> V:
        """The value put with a key equal to ``key`` lately, else ``make()``, put with ``key``
        (made outside the lock: two threads may both make it; an error in ``make`` puts
        nothing)."""
        value = self.get(key)
        if value is None:
            value = make()
            self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items.insert(0, (key, value))
            del self._items[self._size :]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


_every: weakref.WeakSet[Recent[Any, Any]] = weakref.WeakSet()  # (each Recent adds itself)


def clear_caches() -> None:
    """Drop what every save path keeps of the layouts it saved lately (thread-safe): the next
    save of any layout builds its plans and texts again, once. For a long-lived process done
    saving a large state (they hold ~650 bytes a tensor of the last few layouts saved: ~190 MiB
    after a save of 300,000 tensors). An AsyncSaver's writer process keeps its own until the
    saver is closed::

        ckptproto.save(state, "checkpoints/final")
        ckptproto.clear_caches()
    """
    for recent in list(_every):
        recent.clear()
