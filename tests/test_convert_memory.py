"""Converting streams: peak memory stays near one copy of the input, never two."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

SIZE_MIB = 256

SCRIPT = textwrap.dedent(
    """
    import gc, json, resource, sys
    from pathlib import Path
    import torch, ckptproto
    from ckptproto.interop import convert

    root = Path(sys.argv[1])
    n = 64
    tensors = {f"layer{i}": torch.full((SIZE_MIB * 1024 * 1024 // 4 // n,), float(i)) for i in range(n)}
    ckptproto.save({"models": {"model": tensors}, "trainer": {"global_step": 1}}, root / "src")
    del tensors
    gc.collect()

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(field)

    steps = [("src", "a.pt", "torch"), ("a.pt", "b.safetensors", "safetensors"),
             ("b.safetensors", "c", "ckptproto"), ("c", "d_dcp", "dcp"), ("d_dcp", "e", "ckptproto")]
    out = {}
    for src, dst, fmt in steps:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = status("VmRSS")
        convert(root / src, root / dst, to=fmt)
        gc.collect()
        out[f"{src}->{dst}"] = status("VmHWM") - base
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
    """
).replace("SIZE_MIB", str(SIZE_MIB))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_conversions_hold_at_most_one_copy_of_the_input(tmp_path: Path) -> None:
    # tmpfs when there is room: the same memory accounting (mapped input pages count, written
    # output does not), without waiting on a shared disk for 1.5 GB of fsynced writes
    shm = Path("/dev/shm")
    use_shm = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * 2**30
    with tempfile.TemporaryDirectory(dir=shm if use_shm else tmp_path) as root:
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, root], capture_output=True, text=True, env=os.environ.copy()
        )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    size = SIZE_MIB * 1024 * 1024
    for step, extra in peaks.items():
        if step == "ru_maxrss":
            continue
        # one copy (a memory map or DCP's in-memory load) plus small change; two copies = 2.0x
        print(f"{step}: peak RSS +{extra / size:.2f}x the input")
        assert extra < 1.5 * size, f"{step}: peak RSS rose by {extra / size:.2f}x the input"
