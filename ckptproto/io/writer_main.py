"""The checkpoint writer process's entry point, apart from :mod:`ckptproto.io.writer_process` so
that starting it does not import that module twice: the training process runs
``python_command("ckptproto.io.writer_main:start", FD, PIPE_FD)`` (``ckptproto._child``)."""

from __future__ import annotations

import sys

from ckptproto.io.writer_process import main


def start() -> None:
    """Serve the training process: ``sys.argv[1:]`` are the socket's descriptor and that of the
    pipe whose end-of-file says the training process is gone."""
    main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)


if __name__ == "__main__":
    start()
