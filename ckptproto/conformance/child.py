"""The subprocess half of check 5 (resume across processes)::

    python -m ckptproto.conformance.child save   SPEC SEED STEPS CHECKPOINT
    python -m ckptproto.conformance.child resume SPEC SEED CHECKPOINT STEPS FINGERPRINT_OUT

``save`` trains a fresh trainer and saves it; ``resume`` loads the checkpoint into a trainer
from another seed, trains on and saves its fingerprint as a ckptproto checkpoint
(``{"fingerprint": ...}``) for the parent to compare. Trainers are created as in the parent
(global RNGs scrambled from the seed first). Exit status 1: the trainer or adapter raised;
``INTERNAL_EXIT``: ckptproto itself failed.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path

from ckptproto.conformance.adapter import load_adapter
from ckptproto.conformance.context import Context, TrainerRaised
from ckptproto.errors import CheckpointError
from ckptproto.io import sync

INTERNAL_EXIT = 3


def _run(argv: Sequence[str]) -> int:
    if len(argv) == 5 and argv[0] == "save":
        _, spec, seed, steps, out = argv
        ctx = Context(load_adapter(spec), Path(tempfile.gettempdir()), spec)
        trainer = ctx.create(int(seed))
        ctx.train(trainer, int(steps))
        ctx.save(trainer, Path(out))
        return 0
    if len(argv) == 6 and argv[0] == "resume":
        _, spec, seed, checkpoint, steps, out = argv
        ctx = Context(load_adapter(spec), Path(tempfile.gettempdir()), spec)
        trainer = ctx.resume(Path(checkpoint), int(seed), int(steps))
        sync.save({"fingerprint": ctx.fingerprint(trainer)}, out)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


def main(argv: Sequence[str]) -> int:
    try:
        return _run(argv)
    except (TrainerRaised, CheckpointError):
        traceback.print_exc()
        return 1
    except Exception:
        traceback.print_exc()
        print("ckptproto internal error (not the trainer's)", file=sys.stderr)
        return INTERNAL_EXIT


def start() -> None:
    """The entry point checks.py starts (``ckptproto._child.python_command``)."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    start()
