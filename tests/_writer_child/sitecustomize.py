"""Put on the checkpoint writer process's PYTHONPATH by tests/test_writer_process.py. While the
file named by CKPTPROTO_TEST_DIE_MARKER exists, writing a data file kills the process (the
writer process dies in the middle of a save, deterministically). While the file named by
CKPTPROTO_TEST_HOLD_MARKER exists, writing a data file waits (after creating that name plus
``.reached``): the test holds the writer process in the middle of a save."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

_die = os.environ.get("CKPTPROTO_TEST_DIE_MARKER")
_hold = os.environ.get("CKPTPROTO_TEST_HOLD_MARKER")
if _die or _hold:
    from ckptproto.io import local_storage

    _real = local_storage.LocalStorage.write_file

    def _write_file(self: Any, *args: Any, **kwargs: Any) -> Any:
        if _die is not None and os.path.exists(_die):
            os.kill(os.getpid(), signal.SIGKILL)
        if _hold is not None and os.path.exists(_hold):
            with open(_hold + ".reached", "w"):
                pass
            while os.path.exists(_hold):
                time.sleep(0.01)
        return _real(self, *args, **kwargs)

    local_storage.LocalStorage.write_file = _write_file  # type: ignore[method-assign]
