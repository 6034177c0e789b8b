"""atheris harness: a data file (the valid one with a fuzzed stretch spliced in, or the raw
input), with a manifest that agrees with its size
and CRC (so only the safetensors header checks stand between the bytes and the reader).

    PYTHONPATH=. /work/main/.venv/bin/python fuzz/fuzz_data_file.py -max_total_time=60
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import _common

    import ckptproto  # noqa: F401


def test_one_input(data: bytes) -> None:
    blob = _common.splice(_common.DATA, data) if data[:1] and data[0] % 2 else data
    _common.read_all(_common.write(_common.manifest_for(blob), blob))


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
