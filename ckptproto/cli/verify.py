"""``ckptproto verify PATH...``: check manifests, headers and every checksum."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ckptproto.cli.paths import checkpoint_problem
from ckptproto.errors import CheckpointCorruptError, CheckpointError
from ckptproto.io.sync import verify


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "verify",
        help="check a checkpoint's manifest, headers and checksums",
        description="Exit status: 0 when every PATH is intact, 1 when one is damaged, "
        "2 when one is not a checkpoint at all (a directory of checkpoints, a file, a typo).",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint directories")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when every checkpoint is intact, 1 when any is damaged, 2 when a PATH
    is not a checkpoint (said on stderr with what was probably meant)."""
    failed = 0
    not_checkpoints = 0
    for path in args.paths:
        problem = checkpoint_problem(path, "verify")
        if problem is not None:
            not_checkpoints += 1
            print(f"ckptproto verify: {problem}", file=sys.stderr)
            continue
        try:
            info = verify(path)
        except CheckpointCorruptError as exc:
            failed += 1
            print(f"DAMAGED {path}")
            for item in exc.problems:
                print(f"  {item}")
        except CheckpointError as exc:
            failed += 1
            print(f"DAMAGED {path}\n  {exc}")
        else:
            print(f"OK      {path}  ({info.nbytes} bytes, format {info.format_version})")
    return 2 if not_checkpoints else 1 if failed else 0
