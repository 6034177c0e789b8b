"""Small probes of one phase each, for A/B runs of a change against the commit before it.

Run the same probe with ``PYTHONPATH`` at each checkout, alternating (this VM's wall-clock
noise at 100k tensors is about ±1 µs a tensor, more than most single changes)::

    git worktree add --detach /work/wt/a HEAD~1
    for w in /work/wt/a .; do PYTHONPATH=$w python benchmarks/bench_probes.py load-phases; done

- ``load-phases``: ``ckptproto.load`` of N tensors of 4 floats, with the manifest's parse, the
  header check, the read and the decode each timed by a wrapper (median of 6 loads, µs a tensor).
- ``save-cpu``: the process CPU of a repeated save and of a save of a layout not saved before
  (7 of each; min and median, µs a tensor).
- ``writer-cpu``: the writer process's CPU per async save of issue 17's 20,000-tensor state
  (``/proc/PID/stat`` before and after each of 10 saves; 10 ms clock ticks).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckptproto


def _state(count: int) -> dict[str, Any]:
    data = torch.randn(count, 4, generator=torch.Generator().manual_seed(count))
    return {"models": {"m": {f"layers.{i // 8}.block.p{i % 8}": data[i].clone() for i in range(count)}}}


def _timed(spent: dict[str, list[float]], module: str, attr: str, label: str) -> None:
    owner: Any = importlib.import_module(module)
    *outer, name = attr.split(".")
    for part in outer:
        owner = getattr(owner, part)
    real: Callable[..., Any] = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            spent.setdefault(label, []).append(time.perf_counter() - start)

    setattr(owner, name, wrapper)


def load_phases(count: int, root: Path) -> None:
    ckptproto.save(_state(count), root / "c")
    spent: dict[str, list[float]] = {}
    for module, attr, label in [
        ("ckptproto.format.manifest", "Manifest.parse", "parse the manifest"),
        ("ckptproto.io.reader", "file_layouts", "the data files' layouts"),
        ("ckptproto.io.reader", "expected_header", "the headers, regenerated"),
        ("ckptproto.io.readplan", "materialize", "read + CRC + build the tensors"),
        ("ckptproto.io.restore", "decode_tree", "decode the state"),
    ]:
        _timed(spent, module, attr, label)
    totals = []
    for round_ in range(8):
        gc.collect()
        gc.disable()
        start = time.perf_counter()
        state = ckptproto.load(root / "c")
        totals.append(time.perf_counter() - start)
        gc.enable()
        del state
        if round_ < 2:  # warm-up rounds
            totals.clear()
            for times in spent.values():
                times.clear()
    for label, times in spent.items():
        print(f"  {label:32} {statistics.median(times) * 1e6 / count:6.2f} µs a tensor")
    print(f"  {'load()':32} {statistics.median(totals) * 1e6 / count:6.2f} µs a tensor")


def save_cpu(count: int, root: Path) -> None:
    state = _state(count)
    repeated, first = [], []
    for round_ in range(7):
        gc.collect()
        gc.disable()
        start = time.process_time()
        ckptproto.save(state, root / "same", overwrite=True)
        repeated.append(time.process_time() - start)
        renamed = {"models": {"m": {f"r{round_}.{k}": v for k, v in state["models"]["m"].items()}}}
        start = time.process_time()
        ckptproto.save(renamed, root / "new", overwrite=True)
        first.append(time.process_time() - start)
        gc.enable()
    for label, times in (("repeated save", repeated), ("first save of a layout", first)):
        print(
            f"  {label:24} min {min(times) * 1e6 / count:5.2f}  median "
            f"{statistics.median(times) * 1e6 / count:5.2f} µs a tensor (process CPU)"
        )


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("probe", choices=["load-phases", "save-cpu", "writer-cpu"])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"{args.probe}, ckptproto from {Path(ckptproto.__file__).parent}")
        if args.probe == "load-phases":
            load_phases(args.count, root)
        elif args.probe == "save-cpu":
            save_cpu(args.count, root)
        else:
            writer_cpu(root)


if __name__ == "__main__":
    main()
