"""Per-tensor cost: save and load of many small tensors, ckptproto vs torch.save, safetensors, DCP.

    python benchmarks/bench_many_tensors.py                       # 10k, 100k, 300k tensors
    python benchmarks/bench_many_tensors.py --counts 10000 100000 --repeat 5 --dir /dev/shm

Each tensor holds ``--numel`` float32 values (default 4), so the bytes are negligible and the
figure is the software's own cost per tensor. Every method runs in the same process, interleaved
round by round (the order rotates each round); the table prints the median of ``--repeat``
rounds as microseconds per tensor and the ratio to ckptproto (>1: ckptproto is faster).

Same durability for all saves: every written file and its directory is fsynced before the
clock stops (ckptproto does this itself). Verification differs and is stated: ckptproto
``load``/``load_into`` check every data file's CRC-32 and the manifest; ``torch.load`` (zip CRCs
are not checked by torch's reader), safetensors and DCP check none. ``load_into`` and DCP's load
fill a target state allocated before the clock starts (the "resume into a model" case); the other
loads allocate their tensors. "ckptproto" saves the same state each round, as a training run
saves again and again (a layout saved lately takes its data file's plan and columns' texts
again); "ckpt 1st save" saves it under keys renamed each round, a layout not saved before, as
the first save of a run. DCP runs only up to ``--dcp-max`` tensors (default 100,000): at
300k it takes minutes per round.

ckptproto's own per-tensor cost, steadier on a busy machine (CPU time of the process, the
collector paused as ckptproto pauses it itself), before/after a change: run the same command
with ``PYTHONPATH`` at each checkout, alternating::

    python benchmarks/bench_many_tensors.py --only ckptproto --clock cpu --no-gc --repeat 3

Where a save's and a load's per-tensor time goes, stage by stage (CPU time, best of ``--repeat``;
the save twice: the same state again, as a training run saves it, and a layout not saved
before, as the first save of a run; ``--clock wall`` for wall-clock time)::

    python benchmarks/bench_many_tensors.py --stages --counts 100000 --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _durable import fsync_tree, safetensors_save_durable, torch_save_durable

import ckptproto

warnings.filterwarnings("ignore")


def make_state(n: int, numel: int) -> dict[str, torch.Tensor]:
    """``n`` distinct float32 tensors named like a deep model's parameters."""
    g = torch.Generator().manual_seed(n)
    data = torch.randn(n, numel, generator=g)
    return {f"layers.{i // 8}.block.p{i % 8}": data[i].clone() for i in range(n)}


Save = Callable[[Path], None]
Load = Callable[[Path], Any]


def methods(state: dict[str, torch.Tensor], with_dcp: bool) -> dict[str, tuple[str, Save, Load]]:
    """name -> (which save's files it loads, save, load). Loads sharing a save reuse its files."""
    from safetensors.torch import load_file

    def target() -> dict[str, torch.Tensor]:
        return {k: torch.empty_like(v) for k, v in state.items()}

    def ck_save(p: Path) -> None:
        ckptproto.save(state, p)

    def torch_save(p: Path) -> None:
        torch_save_durable(state, p)

    def st_save(p: Path) -> None:
        safetensors_save_durable(state, p)

    first_save = _NewLayoutSave(state)
    out: dict[str, tuple[str, Save, Load]] = {
        "ckptproto": ("ckptproto", ck_save, lambda p: ckptproto.load(p)),
        NEW_LAYOUT: (NEW_LAYOUT, first_save, lambda p: ckptproto.load(p)),
        "ckpt load_into": ("ckptproto", ck_save, _prepared(target, lambda p, t: ckptproto.load_into(p, t))),
        "torch.save": ("torch.save", torch_save, lambda p: torch.load(p, weights_only=True)),
        "safetensors": ("safetensors", st_save, lambda p: load_file(str(p))),
    }
    if with_dcp:
        import torch.distributed.checkpoint as dcp

        def dcp_save(p: Path) -> None:
            dcp.save(state, checkpoint_id=str(p))
            fsync_tree(p)

        out["DCP"] = ("DCP", dcp_save, _prepared(target, lambda p, t: dcp.load(t, checkpoint_id=str(p))))
    return out


# ckptproto's save of a layout not saved before: the first save of a training run (the later
# ones take the data file's plan and the columns' texts of the last save of their layout).
NEW_LAYOUT = "ckpt 1st save"


class _NewLayoutSave:
    """``ckptproto.save`` of the state under keys no save had before, renamed before the clock
    starts (see :func:`run_count`)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state, self.rounds, self.renamed = state, 0, dict(state)

    def prepare(self) -> None:
        self.rounds += 1
        self.renamed = {f"r{self.rounds}.{key}": t for key, t in self.state.items()}

    def __call__(self, p: Path) -> None:
        ckptproto.save(self.renamed, p)


class _prepared:
    """A load into a target made before the clock starts (see :func:`run_count`)."""

    def __init__(self, make: Callable[[], Any], load: Callable[[Path, Any], Any]) -> None:
        self.make, self.load, self.target = make, load, None

    def prepare(self) -> None:
        self.target = self.make()

    def __call__(self, p: Path) -> Any:
        self.load(p, self.target)
        target, self.target = self.target, None
        return target


def run_count(
    n: int,
    numel: int,
    root: Path,
    repeat: int,
    with_dcp: bool,
    only: list[str] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    no_gc: bool = False,
) -> dict[str, tuple[float, float]]:
    state = make_state(n, numel)
    table = methods(state, with_dcp)
    if only:
        table = {
            m: v for m, v in table.items() if v[0] in only or (v[0] == NEW_LAYOUT and "ckptproto" in only)
        }
    savers = sorted({src for src, _, _ in table.values()}, key=list(table).index)
    saves: dict[str, list[float]] = {m: [] for m in savers}
    loads: dict[str, list[float]] = {m: [] for m in table}
    # The first save of a new layout always right after ckptproto's repeated save: between
    # two repeated saves one other layout only, as a training run's occasional other save
    # (rotated with the rest, two new layouts came in a row every other round and pushed the
    # repeated save's plan out of io/plan.py's two: that round timed a first save again).
    rotated = [m for m in savers if m != NEW_LAYOUT]
    for r in range(repeat):
        order = rotated[r % len(rotated) :] + rotated[: r % len(rotated)]
        if NEW_LAYOUT in savers:
            order.insert(order.index("ckptproto") + 1 if "ckptproto" in order else 0, NEW_LAYOUT)
        for m in order:
            path = root / f"{n}-{m}"
            save = table[m][1]
            if isinstance(save, _NewLayoutSave):
                save.prepare()
            os.sync()
            gc.collect()
            _pause_gc(no_gc)
            t0 = clock()
            save(path)
            saves[m].append(clock() - t0)
            gc.enable()
        load_order = list(table)[r % len(table) :] + list(table)[: r % len(table)]
        for m in load_order:
            src, _, load = table[m]
            if isinstance(load, _prepared):
                load.prepare()
            gc.collect()
            _pause_gc(no_gc)
            t0 = clock()
            tree = load(root / f"{n}-{src}")
            loads[m].append(clock() - t0)
            gc.enable()
            del tree
        for m in savers:
            path = root / f"{n}-{m}"
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    us = 1e6 / n
    result = {}
    for m in table:
        s = statistics.median(saves[table[m][0]]) * us
        lo = statistics.median(loads[m]) * us
        result[m] = (s, lo)
    return result


def _pause_gc(pause: bool) -> None:
    if pause:
        gc.disable()


# The stages of the sync save path, timed by --stages (module attribute -> label).
STAGES = [
    ("ckptproto.io.prepare", "encode_state", "encode (tree.encode_state)"),
    ("ckptproto.io.prepare", "plan_share", "plan this rank's share"),
    ("ckptproto.io.pipeline", "prepare", "prepare (encode, share, metadata)"),
    ("ckptproto.arrays", "host_views", "byte views of the tensors"),
    ("ckptproto.io.pipeline", "plan_file", "plan the data file (header)"),
    ("ckptproto.format.safetensors", "encode_header_columns", "  of which the header's text"),
    ("ckptproto.io.writer", "write_file", "write + CRC + fsync the data file"),
    ("ckptproto.io.pipeline", "_table", "manifest tensor table"),
    ("ckptproto.io.pipeline", "check_tensor_table", "check the table"),
    ("ckptproto.format.manifest", "Manifest.to_json", "manifest JSON"),
    ("ckptproto.format.json_text", "tree", "  of which the state tree's text"),
    ("ckptproto.io.writer", "write_small_file", "write + fsync the manifest"),
    ("ckptproto.io.pipeline", "run", "run (write + commit)"),
]


# The stages of the load, timed by --stages after the save's.
LOAD_STAGES = [
    ("ckptproto.format.manifest", "Manifest.parse", "parse the manifest"),
    ("ckptproto.format.manifest_text", "split_members", "  of which the quick reading"),
    ("ckptproto.format.manifest", "_table_of", "  of which the table's columns"),
    ("ckptproto.format.manifest", "_check_values", "  of which the state's references"),
    ("ckptproto.io.reader", "file_layouts", "the data files' layouts"),
    ("ckptproto.io.reader", "expected_header", "the data files' headers, regenerated"),
    ("ckptproto.io.readplan", "materialize", "read the tensors (plan, read + CRC, build)"),
    ("ckptproto.io.bulkread", "plan_small", "  of which the plan of the small ones"),
    ("ckptproto.io.bulkread", "_own_copies", "  of which memory of their own (copies)"),
    ("ckptproto.io.restore", "decode_tree", "decode the state tree"),
]


def _timed_stages(
    stages: list[tuple[str, str, str]],
    spent: dict[str, float],
    clock: Callable[[], float] = time.process_time,
) -> list[tuple[Any, str, Any]]:
    """Wrap each stage's function to add its time by ``clock`` to ``spent``; returns what to
    restore."""
    import functools
    import importlib

    originals = []
    for module_name, dotted, label in stages:
        owner: Any = importlib.import_module(module_name)
        *outer, attr = dotted.split(".")
        for part in outer:
            owner = getattr(owner, part)
        original = getattr(owner, attr)

        def timed(*args: Any, _f: Any = original, _label: str = label, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return _f(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + clock() - t0

        setattr(owner, attr, functools.wraps(original)(timed))
        originals.append((owner, attr, original))
    return originals


def _best_by_stage(
    stages: list[tuple[str, str, str]],
    total: str,
    once: Callable[[int], None],
    repeat: int,
    after: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.process_time,
) -> dict[str, float]:
    """The least time by ``clock`` (CPU by default) of each stage over ``repeat`` calls of
    ``once`` (after one that warms caches), the collector paused, with ``once``'s own time as
    ``total``; ``after`` runs after each call, off the clock (a load's state freed there:
    ~0.4 us a tensor)."""
    spent: dict[str, float] = {}
    best: dict[str, float] = {}
    originals = _timed_stages(stages, spent, clock)
    try:
        for r in range(repeat + 1):
            spent.clear()
            gc.collect()
            gc.disable()
            t0 = clock()
            try:
                once(r)
            finally:
                gc.enable()
            spent[total] = clock() - t0
            after()
            if r:
                for label, seconds in spent.items():
                    best[label] = min(best.get(label, seconds), seconds)
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)
    return best


def stage_split(n: int, numel: int, root: Path, repeat: int, wall: bool = False) -> None:
    """CPU time (``wall``: wall-clock time) of each stage of ``ckptproto.save`` and then of
    ``ckptproto.load`` (min over ``repeat`` calls, gc paused), in us per tensor: where the
    per-tensor cost goes."""
    clock, unit = (time.perf_counter, "wall") if wall else (time.process_time, "CPU")
    state = make_state(n, numel)

    def save(r: int) -> None:
        ckptproto.save(state, root / f"stages-{r}")
        shutil.rmtree(root / f"stages-{r}")

    # The same tensors under other keys each round: a layout no save planned before (the
    # first save of a run; the ones after it take the data file's plan and the columns' text
    # of the last save of their layout).
    renamed = [{f"r{r}.{key}": t for key, t in state.items()} for r in range(repeat + 1)]

    def save_new_layout(r: int) -> None:
        ckptproto.save(renamed[r], root / f"stages-new-{r}")
        shutil.rmtree(root / f"stages-new-{r}")

    saved = _best_by_stage(STAGES, "save (total)", save, repeat, clock=clock)
    saved_new = _best_by_stage(STAGES, "save (total)", save_new_layout, repeat, clock=clock)
    ckptproto.save(state, root / "stages-load")
    kept: list[Any] = []  # each load's state, freed after the clock stops (as run_count does)

    def load(r: int) -> None:
        kept.append(ckptproto.load(root / "stages-load"))

    loaded = _best_by_stage(LOAD_STAGES, "load (total)", load, repeat, after=kept.clear, clock=clock)
    shutil.rmtree(root / "stages-load")
    for what, stages, best, kind in (
        ("save", STAGES, saved, "the same layout again"),
        ("save", STAGES, saved_new, "a layout not saved before"),
        ("load", LOAD_STAGES, loaded, ""),
    ):
        kind = f", {kind}" if kind else ""
        print(f"\nckptproto {what} of {n:,} tensors by stage{kind} ({unit} us per tensor, best of {repeat}):")
        print(f"  {what + ' (total)':<42} {best[what + ' (total)'] * 1e6 / n:7.2f}")
        # The save's stages by cost; the load's in their order, each "of which" under its own.
        ordered = [label for _m, _f, label in stages if label in best]
        if what == "save":
            ordered.sort(key=lambda label: -best[label])
        for label in ordered:
            print(f"  {label:<42} {best[label] * 1e6 / n:7.2f}")


def print_table(n: int, numel: int, repeat: int, result: dict[str, tuple[float, float]]) -> None:
    base_s, base_l = result["ckptproto"] if "ckptproto" in result else next(iter(result.values()))
    print(
        f"\n{n:,} tensors of {numel} float32, median of {repeat} (us per tensor; x ours >1: ckptproto faster)"
    )
    print(f"  {'method':<15} {'save us':>9} {'x ours':>7}   {'load us':>9} {'x ours':>7}")
    for m, (s, lo) in result.items():
        print(f"  {m:<15} {s:9.2f} {s / base_s:7.2f}   {lo:9.2f} {lo / base_l:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--numel", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dcp-max", type=int, default=100_000, help="run DCP only up to this count")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only these saves (ckptproto, torch.save, safetensors, DCP)",
    )
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default=None,
        help="wall or the process's CPU time (default: wall; with --stages, CPU)",
    )
    parser.add_argument("--no-gc", action="store_true", help="pause the collector while a method runs")
    parser.add_argument(
        "--stages", action="store_true", help="only ckptproto's save and load, their CPU time split by stage"
    )
    args = parser.parse_args()
    if args.stages:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="ckptproto-stages-") as tmp:
            for n in args.counts:
                stage_split(n, args.numel, Path(tmp), args.repeat, wall=args.clock == "wall")
        return
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ckptproto-many-") as tmp:
        print(f"writing under {tmp} ({os.cpu_count()} cores, torch {torch.__version__})")
        results = {}
        for n in args.counts:
            results[n] = run_count(
                n, args.numel, Path(tmp), args.repeat, n <= args.dcp_max, args.only, clock, args.no_gc
            )
            print_table(n, args.numel, args.repeat, results[n])
        if len(results) > 1 and "ckptproto" in next(iter(results.values())):
            print("\nckptproto us/tensor as the count grows (flat = no superlinear step):")
            for n, r in results.items():
                print(
                    f"  {n:>9,}: save {r['ckptproto'][0]:7.2f}  load {r['ckptproto'][1]:7.2f}  "
                    f"load_into {r['ckpt load_into'][1]:7.2f}  1st save {r[NEW_LAYOUT][0]:7.2f}"
                )


if __name__ == "__main__":
    main()
