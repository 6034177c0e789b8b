"""atheris harness: ``manifest.json`` = a valid manifest with a fuzzed stretch spliced in
(odd inputs) or the raw input (even), beside a valid data file.

    PYTHONPATH=. /work/main/.venv/bin/python fuzz/fuzz_manifest.py -max_total_time=60 -dict=fuzz/manifest.dict
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import _common

    import ckptproto
    from ckptproto.format.manifest import Manifest


BASE = _common.manifest_for(_common.DATA)


def test_one_input(data: bytes) -> None:
    manifest = _common.splice(BASE, data) if data[:1] and data[0] % 2 else data
    try:
        Manifest.parse(manifest, "fuzz/manifest.json")
    except ckptproto.CheckpointError:
        return
    _common.read_all(_common.write(manifest, _common.DATA))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
