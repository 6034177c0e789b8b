"""Put on the checkpoint writer process's PYTHONPATH by tests/test_writer_process.py: while the
file named by CKPTPROTO_TEST_DIE_MARKER exists, writing a data file kills the process (the
writer process dies in the middle of a save, deterministically)."""

from __future__ import annotations

import os
import signal
from typing import Any

_marker = os.environ.get("CKPTPROTO_TEST_DIE_MARKER")
if _marker:
    from ckptproto.io import local_storage

    _real = local_storage.LocalStorage.write_file

    def _write_file(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _marker is not None and os.path.exists(_marker):
            os.kill(os.getpid(), signal.SIGKILL)
        return _real(self, *args, **kwargs)

    local_storage.LocalStorage.write_file = _write_file  # type: ignore[method-assign]
