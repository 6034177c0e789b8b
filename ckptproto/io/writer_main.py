"""The checkpoint writer process's entry point (``python -m ckptproto.io.writer_main FD [PARENT_PIPE_FD]``), apart
from :mod:`ckptproto.io.writer_process` so that running it does not import that module twice."""

from __future__ import annotations

import sys

from ckptproto.io.writer_process import main

if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
