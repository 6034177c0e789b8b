"""Memory and time of reading hostile-but-legal checkpoints (FORMAT.md F-33's bound).

    python benchmarks/bench_hostile_input.py                 # 8 MiB inputs
    python benchmarks/bench_hostile_input.py --size-mb 32

For each input, each reader runs in a fresh child process and reports the address space it
grew by (VmPeak minus VmSize after a warm-up read; what RLIMIT_AS caps) and its wall time:

- ``lists``: a manifest whose state is one list of empty lists (``[],`` is 3 bytes for a
  64-byte object: the worst case per byte of a manifest),
- ``header``: a data file whose header holds one empty ``U8`` entry per ~55 bytes.

Compare another checkout with ``PYTHONPATH=/path/to/it python benchmarks/bench_hostile_input.py``.
The spec states 32x the manifest and 24x the header; ``tests/test_spec.py`` holds that
under a cap (``test_F33_memory_stays_within_the_documented_multiple``).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

DATA = "data-00000-000.safetensors"
CHILD = """
import gc, sys
import ckptproto
from ckptproto.conformance.validate import validate
read = {"read_manifest": ckptproto.read_manifest, "load": ckptproto.load,
        "verify": ckptproto.verify, "validate": validate}[sys.argv[1]]
read(sys.argv[3])
gc.collect()
def vm(field):
    return next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith(field))
base = vm("VmSize")
read(sys.argv[2])
print(vm("VmPeak") - base)
"""


def _checkpoint(root: Path, data: bytes, state: bytes) -> Path:
    root.mkdir(parents=True)
    (root / DATA).write_bytes(data)
    entry = {"size": len(data), "checksum": f"crc32:{zlib.crc32(data):08x}", "rank": 0}
    doc = {"format": "ckptproto", "format_version": "1.0", "files": {DATA: entry}, "tensors": [], "state": {}}
    (root / "manifest.json").write_bytes(
        json.dumps(doc).encode().replace(b'"state": {}', b'"state": ' + state)
    )
    return root


def _header_file(entries: int) -> bytes:
    header = {f"{i:x}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(entries)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=8)
    args = parser.parse_args()
    size = args.size_mb << 20
    # This checkout's ckptproto unless PYTHONPATH names another (e.g. an older one to compare).
    env = {
        **os.environ,
        "PYTHONPATH": os.environ.get("PYTHONPATH") or str(Path(__file__).resolve().parents[1]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        empty = _header_file(0)
        warm = _checkpoint(root / "warm", empty, b"{}")
        lists = _checkpoint(root / "lists", empty, b'{"x": [' + b"[]," * (size // 3) + b"[]]}")
        header = _checkpoint(root / "header", _header_file(size // 55), b"{}")
        inputs = {
            "lists": (lists, (lists / "manifest.json").stat().st_size),
            "header": (header, (header / DATA).stat().st_size),
        }
        for name, (path, nbytes) in inputs.items():
            ops = (
                ("read_manifest", "load", "verify", "validate")
                if name == "lists"
                else ("load", "verify", "validate")
            )
            for op in ops:
                start = time.perf_counter()
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, op, str(path), str(warm)],
                    capture_output=True,
                    text=True,
                    check=True,
                    cwd=tmp,  # not the caller's directory: PYTHONPATH picks the ckptproto measured
                    env=env,
                )
                grew = int(out.stdout)
                print(
                    f"{name:7} {nbytes / 2**20:6.1f} MiB  {op:13} +{grew / 2**20:7.1f} MiB "
                    f"({grew / nbytes:4.1f}x)  {time.perf_counter() - start:6.1f} s"
                )


if __name__ == "__main__":
    main()
