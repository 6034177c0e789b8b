"""The subprocess half of check 5 (resume across processes)::

    python -m ckptproto.conformance.child save   SPEC SEED STEPS CHECKPOINT
    python -m ckptproto.conformance.child resume SPEC SEED CHECKPOINT STEPS FINGERPRINT_OUT

``save`` trains a fresh trainer and saves it; ``resume`` loads the checkpoint into a trainer
from another seed, trains on and saves its fingerprint as a ckptproto checkpoint
(``{"fingerprint": ...}``) for the parent to compare.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ckptproto.conformance.adapter import load_adapter
from ckptproto.io import sync


def main(argv: Sequence[str]) -> int:
    if len(argv) == 5 and argv[0] == "save":
        _, spec, seed, steps, out = argv
        adapter = load_adapter(spec)
        trainer = adapter.create(int(seed))
        adapter.train(trainer, int(steps))
        sync.save(trainer, out)
        return 0
    if len(argv) == 6 and argv[0] == "resume":
        _, spec, seed, checkpoint, steps, out = argv
        adapter = load_adapter(spec)
        trainer = adapter.create(int(seed))
        sync.load_into(checkpoint, trainer)
        adapter.train(trainer, int(steps))
        sync.save({"fingerprint": dict(adapter.fingerprint(trainer))}, out)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
