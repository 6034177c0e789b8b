"""The ``ckptproto`` command line. Each subcommand lives in its own module with a
``register(subparsers)`` function that adds its parser and sets ``run``::

    $ ckptproto verify checkpoints/checkpoint_step_10

A user's mistake (a wrong path, a file that is not a checkpoint, a refused value) is one line
on stderr naming it, and exit status 2; never a traceback. ``CKPTPROTO_TRACEBACK=1`` shows
the traceback of an unexpected error (a bug to report).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ckptproto.errors import CheckpointError

# One module per subcommand; adding a command is one line here.
COMMAND_MODULES = (
    "ckptproto.cli.verify",
    "ckptproto.cli.ls",
    "ckptproto.cli.inspect",
    "ckptproto.cli.convert",
    "ckptproto.cli.conformance",
    "ckptproto.cli.validate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptproto",
        description="Inspect, verify and manage checkpoints.",
        epilog="Exit status: 0 success; 1 a check failed (a damaged or invalid checkpoint, a failed "
        "conformance check); 2 a mistake in the command (said in one line); 3 an unexpected "
        "error, a bug (CKPTPROTO_TRACEBACK=1 shows its traceback); 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"ckptproto {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _version() -> str:
    from ckptproto import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckptproto`` script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        status: int = args.run(args)
    except CheckpointError as exc:
        print(f"ckptproto {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ckptproto inspect ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"ckptproto {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # permissions, a full disk, a path that is not what it should be
        print(f"ckptproto {args.command}: {_os_error_text(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("CKPTPROTO_TRACEBACK") == "1":
            raise
        print(
            f"ckptproto {args.command}: unexpected {type(exc).__name__}: {exc} "
            "(a bug in ckptproto? run again with CKPTPROTO_TRACEBACK=1 and report the traceback)",
            file=sys.stderr,
        )
        return 3
    return status


def _os_error_text(exc: OSError) -> str:
    """``[Errno 13] Permission denied: 'x'`` reads as ``x: Permission denied``."""
    if exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
