"""The one script to run on a machine with a CUDA device: every CUDA test, then the GPU stall table.

    python benchmarks/bench_gpu.py                          # CUDA tests, then 2, 8 and 32 GiB
    python benchmarks/bench_gpu.py --sizes-gib 2 8 --repeat 3 --dir /dev/shm
    python benchmarks/bench_gpu.py --skip-tests --sizes-gib 1

Step 1 runs every test that needs a CUDA device (the ones a CPU-only CI run skips; selected by
``benchmarks/cuda_tests_plugin.py``) in a subprocess and counts passed / failed / skipped.

Step 2 measures, for a state of GPU tensors of each size (fp32, 256 MiB per tensor), how long a
save blocks the training thread ("stall"), how long until the GPU tensors may be mutated again
("staged": every device-to-host copy done), and how long until the checkpoint is durably on
disk ("commit"), for

- the floor: ``copy_(non_blocking=True)`` of every tensor into preallocated pinned host buffers
  (stall = enqueueing the copies; staged = the copies done; nothing written),
- ckptproto ``AsyncSaver(staging="blocking")`` and ``AsyncSaver(staging="background")``
  (pinned staging pool, side CUDA stream),
- DCP ``async_save`` with its pinned-memory stager
  (``DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False,
  use_async_staging=True, use_non_blocking_copy=True))``), files fsynced like ours.

Each method is warmed up once (buffers are allocated on the first save), then timed
``--repeat`` times, interleaved; medians and ratios to the floor are printed in one table.
Durability is the same for every writer (fsync of files; ckptproto also fsyncs the directory).

Exit status: 0 when every CUDA test passed; 1 when one failed or none could run on a CUDA
machine; 2 when there is no CUDA device (nothing was measured; ``--allow-cpu`` runs the
benchmark code path on CPU tensors, with plain host buffers, only to check the script: with
small sizes, ``--allow-cpu --skip-tests --sizes-gib 0.5 --repeat 1``, as the default 8 and 32
GiB of CPU tensors plus their staging copies exceed a small machine's RAM).
Expect about 1 minute for the tests and, on a fast NVMe, a few minutes for 2+8+32 GiB with
``--repeat 2``; the host needs RAM for two copies of the largest size (staging + page cache).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckptproto

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
TENSOR_BYTES = 256 << 20

Timing = dict[str, float]


def run_cuda_tests() -> tuple[int, dict[str, int]]:
    """Run every CUDA test in a subprocess; return pytest's exit code and the outcome counts."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "cuda_tests_plugin"]
        cmd += ["-p", "no:cacheprovider", f"--junitxml={report}", str(HERE.parent / "tests")]
        code = subprocess.call(cmd, env=env, cwd=HERE.parent)
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        if report.exists():
            for case in ET.parse(report).iter("testcase"):
                if case.find("skipped") is not None:
                    counts["skipped"] += 1
                elif case.find("failure") is not None or case.find("error") is not None:
                    counts["failed"] += 1
                else:
                    counts["passed"] += 1
        return code, counts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_state(size_gib: float, device: torch.device) -> dict[str, Any]:
    n = max(1, int(size_gib * (1 << 30)) // TENSOR_BYTES)
    per = TENSOR_BYTES // 4 if size_gib >= TENSOR_BYTES / (1 << 30) else int(size_gib * (1 << 30)) // 4
    return {"model": {f"layer{i}.weight": torch.full((per,), float(i), device=device) for i in range(n)}}


def mutate(state: dict[str, Any]) -> None:
    for t in state["model"].values():
        t.add_(1.0)  # what the next training step does; the checkpoint must not see it


class Method:
    def __init__(self, name: str, run: Callable[[Path], Timing], close: Callable[[], None] = lambda: None):
        self.name, self.run, self.close = name, run, close


def floor(state: dict[str, Any], device: torch.device) -> Method:
    pinned = device.type == "cuda"
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned) for t in state["model"].values()]

    def run(path: Path) -> Timing:
        t0 = time.perf_counter()
        for dst, src in zip(hosts, state["model"].values(), strict=True):
            dst.copy_(src, non_blocking=pinned)
        t1 = time.perf_counter()
        sync(device)
        t2 = time.perf_counter()
        return {"stall": t1 - t0, "staged": t2 - t0, "commit": float("nan")}

    return Method("pinned copy_(non_blocking) floor", run)


def ckptproto_async(state: dict[str, Any], mode: str, device: torch.device) -> Method:
    saver = ckptproto.AsyncSaver(max_pending=1, staging=mode)  # type: ignore[arg-type]

    def run(path: Path) -> Timing:
        t0 = time.perf_counter()
        future = saver.save(state, path)
        t1 = time.perf_counter()
        future.wait_staged()
        t2 = time.perf_counter()
        mutate(state)
        future.result()
        t3 = time.perf_counter()
        return {"stall": t1 - t0, "staged": t2 - t0, "commit": t3 - t0}

    return Method(f"ckptproto AsyncSaver {mode}", run, saver.close)


def dcp_pinned(state: dict[str, Any], device: torch.device) -> Method:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    pinned = device.type == "cuda"
    stager = DefaultStager(
        StagingOptions(
            use_pinned_memory=pinned,
            use_shared_memory=False,
            use_async_staging=True,
            use_non_blocking_copy=pinned,
        )
    )

    def run(path: Path) -> Timing:
        t0 = time.perf_counter()
        writer = dcp.FileSystemWriter(str(path), sync_files=True)
        response = dcp.async_save(state, storage_writer=writer, async_stager=stager, no_dist=True)
        t1 = time.perf_counter()
        response.staging_completion.result()
        t2 = time.perf_counter()
        mutate(state)
        response.upload_completion.result()
        t3 = time.perf_counter()
        return {"stall": t1 - t0, "staged": t2 - t0, "commit": t3 - t0}

    return Method("DCP async_save + pinned DefaultStager", run, stager.close)


def measure(size_gib: float, repeat: int, root: Path, device: torch.device) -> list[tuple[str, Timing]]:
    state = make_state(size_gib, device)
    methods = [
        floor(state, device),
        ckptproto_async(state, "blocking", device),
        ckptproto_async(state, "background", device),
        dcp_pinned(state, device),
    ]
    results: dict[str, list[Timing]] = {m.name: [] for m in methods}
    counter = 0

    def once(m: Method) -> Timing:
        nonlocal counter
        counter += 1
        path = root / f"ckpt{counter}"
        sync(device)
        timing = m.run(path)
        shutil.rmtree(path, ignore_errors=True)
        return timing

    for m in methods:
        once(m)  # warm-up: staging buffers, threads, imports
    for _ in range(repeat):
        for m in methods:  # interleaved, so drift hits every method alike
            results[m.name].append(once(m))
    for m in methods:
        m.close()
    del state, methods
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [
        (name, {key: statistics.median(r[key] for r in runs) for key in ("stall", "staged", "commit")})
        for name, runs in results.items()
    ]


def _seconds(value: float) -> str:
    return f"{'-':>9}" if value != value else f"{value:8.2f}s"  # nan: the floor writes nothing


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-gib", type=float, nargs="+", default=[2, 8, 32])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where checkpoints are written")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="check the script on CPU tensors (give small --sizes-gib)"
    )
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("bench_gpu: no CUDA device here; nothing measured (use --allow-cpu to check the script)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")

    test_code, counts = (0, {}) if args.skip_tests else run_cuda_tests()
    rows: list[tuple[float, str, Timing]] = []
    root = Path(tempfile.mkdtemp(prefix="bench_gpu_", dir=args.dir))
    try:
        for size in args.sizes_gib:
            print(f"measuring {size:g} GiB ...", flush=True)
            rows += [(size, name, t) for name, t in measure(size, args.repeat, root, device)]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'GiB':>5} {'method':40} {'stall':>10} {'staged':>10} {'commit':>9} {'stall/floor':>12}")
    floors = {size: t["stall"] for size, name, t in rows if name.endswith("floor")}
    staged_floors = {size: t["staged"] for size, name, t in rows if name.endswith("floor")}
    for size, name, t in rows:
        print(
            f"{size:5g} {name:40} {t['stall'] * 1e3:8.1f}ms {t['staged'] * 1e3:8.1f}ms "
            f"{_seconds(t['commit'])} {t['stall'] / floors[size]:11.2f}x"
        )
    for size in floors:
        print(f"{size:5g} GiB: staging floor (all copies done) {staged_floors[size] * 1e3:.1f} ms")
    if not args.skip_tests:
        print(f"CUDA tests: {counts}, pytest exit code {test_code}")
        if test_code != 0 or counts.get("failed", 0):
            return 1
        if cuda and counts.get("passed", 0) == 0:
            print("no CUDA test ran on a CUDA machine")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
