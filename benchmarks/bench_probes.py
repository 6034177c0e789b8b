"""Single-phase probes of the async save, for A/B runs of a change against the commit before
it (the other single-phase figures come from ``bench_many_tensors.py``: ``--stages`` for each
phase of a save and a load, ``--only ckptproto --clock cpu --no-gc`` for the process CPU of the
repeated and the first save)::

    git worktree add --detach /work/wt/a HEAD~1
    for w in /work/wt/a .; do PYTHONPATH=$w python benchmarks/bench_probes.py save-stall; done

All on issue 17's 20,000-tensor state (tensors of 1 KiB):

``writer-cpu``: the writer process's CPU per async save (``/proc/PID/stat`` before and after
each of 10 saves; 10 ms clock ticks). ``bench_async.py`` reports the same CPU (its ``child``
column) inside its much longer loop runs.

``save-stall``: how long ``AsyncSaver.save()`` (blocking staging, the writer process) holds
the caller, wall clock and the process's CPU (the copier thread's included), best and median
of 9 saves after 3 warm ones; each save committed before the next starts.

``load-scale``: whether a load's cost a tensor stays flat as the count grows (issue 17, goal 3),
at each of ``--counts`` (tensors of 4 floats, as ``bench_many_tensors.py``): ``load`` and
``load_into`` (into targets made before the clock) timed alone, min and median of 4, and the
manifest's parse (``Manifest.parse``) beside CPython's own ``json.loads`` of the same text,
best of 5, the collector paused: what rises in both is Python objects past the caches, not a
step of ckptproto's.

``stage-copy``: the staging copy alone (``staging._copy_host`` into one shared slab, one
thread), the small tensors as address ranges (numpy row copies, the path of a state just
described) against ``torch._foreach_copy_`` (the path of any other), best and median of 15.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ckptproto


def writer_cpu(root: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_async import loop_state

    state = loop_state("20k")
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    with ckptproto.AsyncSaver(staging="blocking", writer="process") as saver:
        saver.save(state, root / "warm").result()
        pid = saver.writer_pid
        assert pid is not None
        per_save = []
        for i in range(10):
            before = cpu(pid)
            saver.save(state, root / f"s{i}").result()
            per_save.append(cpu(pid) - before)
    print(
        f"  writer process CPU per save: median {statistics.median(per_save) * 1e3:.0f} ms, "
        f"min {min(per_save) * 1e3:.0f} ms"
    )


def save_stall(root: Path) -> None:
    import gc
    import time

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_async import loop_state

    state = loop_state("20k")
    with ckptproto.AsyncSaver(staging="blocking", writer="process") as saver:
        for i in range(3):
            saver.save(state, root / f"warm{i}").result()
        walls, cpus = [], []
        for i in range(9):
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            future = saver.save(state, root / f"s{i}")
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            future.result()
    for what, xs in (("wall", walls), ("process CPU", cpus)):
        print(f"  save() {what}: best {min(xs) * 1e3:.1f} ms, median {statistics.median(xs) * 1e3:.1f} ms")


def stage_copy(root: Path) -> None:
    import gc
    import time

    from ckptproto.io import staging
    from ckptproto.tree import encode_state

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_async import loop_state

    leaves = encode_state(loop_state("20k")).tensors
    pool = staging.StagingPool()
    staged = staging.stage_state(pool, leaves, staging.Ready(), recheck=False, shared=True)
    slab = staged._slabs[0]
    gc.disable()
    try:
        for plain, label in ((True, "address ranges (numpy)"), (False, "torch._foreach_copy_")):
            for clock, unit in ((time.perf_counter, "wall"), (time.process_time, "CPU")):
                times = []
                for _ in range(15):
                    t0 = clock()
                    staging._copy_host(leaves, slab, plain)
                    times.append(clock() - t0)
                print(
                    f"  {label:<24} {unit:<4}: best {min(times) * 1e3:5.1f} ms, "
                    f"median {statistics.median(times) * 1e3:5.1f} ms"
                )
    finally:
        gc.enable()
        staged.release()


def load_scale(root: Path, counts: list[int]) -> None:
    import gc
    import json
    import time

    import torch

    from ckptproto.format.manifest import Manifest

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_many_tensors import make_state

    def us(seconds: float, n: int) -> str:
        return f"{seconds * 1e6 / n:5.2f}"

    def best_of(make: Callable[[], Any], times: int) -> float:
        spent = []
        for _ in range(times):
            gc.collect()
            gc.disable()
            t0 = time.perf_counter()
            made = make()
            spent.append(time.perf_counter() - t0)
            gc.enable()
            del made
        return min(spent)

    print(
        "  tensors   load_into min / median   load min / median   Manifest.parse   json.loads (us a tensor)"
    )
    for n in counts:
        state = make_state(n, 4)
        path = root / f"scale-{n}"
        ckptproto.save(state, path)
        into, plain = [], []
        for _ in range(4):
            target = {k: torch.empty_like(v) for k, v in state.items()}
            gc.collect()
            t0 = time.perf_counter()
            ckptproto.load_into(path, target)
            into.append(time.perf_counter() - t0)
            del target
            gc.collect()
            t0 = time.perf_counter()
            loaded = ckptproto.load(path)
            plain.append(time.perf_counter() - t0)
            del loaded
        raw = (path / "manifest.json").read_bytes()
        text = raw.decode("utf-8")
        parse = best_of(partial(Manifest.parse, raw, str(path)), 5)
        loads = best_of(partial(json.loads, text), 5)
        print(
            f"  {n:>9,}   {us(min(into), n)} / {us(statistics.median(into), n)}"
            f"          {us(min(plain), n)} / {us(statistics.median(plain), n)}"
            f"       {us(parse, n)}          {us(loads, n)}"
        )
        del state, raw, text


# The probes that take only the directory to write under (load-scale takes --counts too).
PROBES = {"writer-cpu": writer_cpu, "save-stall": save_stall, "stage-copy": stage_copy}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("probe", choices=sorted([*PROBES, "load-scale"]))
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    parser.add_argument(
        "--counts", type=int, nargs="+", default=[10_000, 100_000, 300_000], help="load-scale's counts"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"{args.probe}, ckptproto from {Path(ckptproto.__file__).parent}")
        probes = {**PROBES, "load-scale": partial(load_scale, counts=args.counts)}
        probes[args.probe](root)


if __name__ == "__main__":
    main()
