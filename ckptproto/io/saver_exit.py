"""What happens to async savers at interpreter exit and in a forked child.

At exit every saver that was not closed finishes its pending saves (never half-committed);
in a forked child (a DataLoader worker) a saver forgets the parent's threads, which the child
does not have::

    register(saver)     # saver.close() at exit, saver.reset_after_fork() in a forked child
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

logger = logging.getLogger("ckptproto")


class Finishable(Protocol):
    def close(self) -> None: ...

    def reset_after_fork(self) -> None: ...


_savers: weakref.WeakSet[Finishable] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_installed = False
_register_thread_exit: Callable[[Callable[[], None]], None] | None = getattr(
    threading, "_register_atexit", None
)


def _finish_all_at_exit() -> None:
    """At interpreter exit, pending saves are completed (never left half-committed)."""
    for saver in list(_savers):
        try:
            saver.close()
        except Exception:  # pragma: no cover - close() logs; exit must go on
            logger.exception("closing an AsyncSaver at exit failed")


def _install_exit_hook() -> None:
    # threading's own exit hooks run before the interpreter joins non-daemon threads, so the
    # worker threads are told to finish and stop; plain atexit would run only after that join
    # (which would then wait forever on idle workers).
    global _exit_hook_installed
    with _exit_hook_lock:
        if _exit_hook_installed:
            return
        if _register_thread_exit is not None:
            _register_thread_exit(_finish_all_at_exit)
        else:  # pragma: no cover - CPython >= 3.9 has it
            atexit.register(_finish_all_at_exit)
        _exit_hook_installed = True


def _reset_after_fork() -> None:
    # A forked child (a DataLoader worker, say) inherits the savers but not their threads;
    # without this, a save there would wait forever on threads that do not exist. The
    # parent's pending saves are the parent's: the child neither finishes nor waits for them.
    for saver in list(_savers):
        saver.reset_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def register(saver: Finishable) -> None:
    """Finish ``saver``'s pending saves at interpreter exit (unless closed before), and reset
    its threads in a forked child. Held weakly: a saver that is dropped is forgotten."""
    _install_exit_hook()
    _savers.add(saver)


def threads_are_daemons() -> bool:
    """Whether the saver's threads must be daemons: only where threading's exit hook is
    missing (then an idle worker would block the interpreter's exit)."""
    return _register_thread_exit is None
