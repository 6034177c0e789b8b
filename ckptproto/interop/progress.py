"""A one-line progress bar on stderr while a conversion writes, silent when not on a terminal.

Writers (torch.save, DCP, our own) do not report progress, so a small thread watches the bytes
that reach the output instead: it sums the blocks allocated to the files under the paths it is
given (a checkpoint being written lands in a hidden temporary sibling first)::

    with Progress(total_bytes, "converting", watch=lambda: [tmp_dir]) as bar:
        write_everything(tmp_dir)
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

_INTERVAL = 0.2
_WIDTH = 30


def _allocated(path: Path) -> int:
    """Bytes allocated on disk to ``path`` (a file, or every file below a directory)."""
    try:
        if path.is_file():
            return path.stat().st_blocks * 512
        total = 0
        for root, _dirs, files in os.walk(path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(root, name)).st_blocks * 512
        return total
    except OSError:
        return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class Progress:
    """Draws ``label [#####.....]  42%  1.1 GiB / 2.6 GiB`` while active.

    ``enabled=None`` (default) draws only when ``stream`` is a terminal."""

    def __init__(
        self,
        total: int,
        label: str,
        *,
        watch: Callable[[], Iterable[Path]],
        stream: TextIO | None = None,
        enabled: bool | None = None,
    ) -> None:
        self.total = max(total, 1)
        self.label = label
        self.watch = watch
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line(self, done: int) -> str:
        fraction = min(done / self.total, 1.0)
        filled = int(fraction * _WIDTH)
        bar = "#" * filled + "." * (_WIDTH - filled)
        return f"{self.label} [{bar}] {fraction * 100:3.0f}%  {_human(done)} / {_human(self.total)}"

    def _draw(self, done: int) -> None:
        self.stream.write("\r" + self.line(done))
        self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(_INTERVAL):
            self._draw(sum(_allocated(p) for p in self.watch()))

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="ckptproto-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            self._draw(self.total)
        self.stream.write("\n")
        self.stream.flush()
