"""The ``ckptproto`` command line. Each subcommand lives in its own module with a
``register(subparsers)`` function that adds its parser and sets ``run``::

    $ ckptproto verify checkpoints/checkpoint_step_10
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
    parser = argparse.ArgumentParser(prog="ckptproto", description="Inspect, verify and manage checkpoints.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


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
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
