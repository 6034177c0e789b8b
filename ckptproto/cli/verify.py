"""``ckptproto verify PATH...``: check manifests, headers and every checksum."""

from __future__ import annotations

import argparse
from typing import Any

from ckptproto.errors import CheckpointCorruptError, CheckpointError
from ckptproto.io.sync import verify


def register(sub: Any) -> None:
    parser = sub.add_parser("verify", help="check a checkpoint's manifest, headers and checksums")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint directories")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every checkpoint is intact, 1 when any is damaged."""
    failed = 0
    for path in args.paths:
        try:
            info = verify(path)
        except CheckpointCorruptError as exc:
            failed += 1
            print(f"DAMAGED {path}")
            for problem in exc.problems:
                print(f"  {problem}")
        except CheckpointError as exc:
            failed += 1
            print(f"DAMAGED {path}\n  {exc}")
        else:
            print(f"OK      {path}  ({info.nbytes} bytes, format {info.format_version})")
    return 1 if failed else 0
