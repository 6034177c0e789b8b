"""How long an async save blocks the training thread, side by side, in one run.

    python benchmarks/bench_async.py                     # ~1 GiB fp32 in 64 tensors
    python benchmarks/bench_async.py --size-mb 256 --repeat 5 --dir /dev/shm

Part 1, the stall: for the same CPU state, the time the calling thread is blocked per save
("stall"), the time until the state may be mutated ("staged"), and the time until the
checkpoint is durably committed ("commit"), for

- ``clone()`` of every tensor (the memcpy floor for staging),
- ckptproto ``AsyncSaver(staging="blocking")`` and ``staging="background"``,
- ``torch.distributed.checkpoint.async_save`` (single process) with its default stager, and
  with a reused ``DefaultStager(StagingOptions(False, False, True, False))`` (async staging),
- synchronous ``ckptproto.save`` for reference.

Each async method is warmed up by one save first (its staging buffers are allocated once),
then timed ``--repeat`` times; medians are printed with ratios.

Part 2, the loop: a training loop of small steps (an MLP with Adam) run for the same number
of steps without checkpoints and with an async save every ``--save-every`` steps (blocking
staging; background staging with ``wait_staged()`` just before ``optimizer.step()``);
throughput and its loss versus no checkpointing. The loop is timed to its last step; waiting
for the last save to commit ("final drain") is printed apart.

Part 3 (``--python-loop``, issue 17's goal 4): a Python-heavy loop with and without one async
save in flight, A/B pairs, the median slowdown with a 95% interval. ``--burn-ms 60`` adds a
control with no save: a process spinning 60 ms of CPU on the other core (what the writer
process spends on a 20,000-tensor save), the share of the slowdown that is the machine's::

    python benchmarks/bench_async.py --python-loop --py-repeat 31 --modes blocking \
        --writers auto --skip-dcp --py-states 20k --burn-ms 60
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import ckptproto

warnings.filterwarnings("ignore")

Timing = dict[str, float]  # stall, staged, commit (seconds)


def big_state(size_mb: int, n: int) -> dict[str, Any]:
    per = size_mb * (1 << 20) // 4 // n
    g = torch.Generator().manual_seed(0)
    return {"model": {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}}


def mutate(state: dict[str, Any]) -> None:
    for t in state["model"].values():
        t.add_(1.0)


class Stall:
    """One method of part 1: ``run(path)`` saves once and returns its timings."""

    def __init__(self, name: str, run: Callable[[Path], Timing], close: Callable[[], None] = lambda: None):
        self.name, self.run, self.close = name, run, close


def clone_floor(state: dict[str, Any]) -> Stall:
    def run(path: Path) -> Timing:
        t0 = time.perf_counter()
        copies = [t.clone() for t in state["model"].values()]
        dt = time.perf_counter() - t0
        del copies
        return {"stall": dt, "staged": dt, "commit": float("nan")}

    return Stall("clone() every tensor (floor)", run)


def ckptproto_async(state: dict[str, Any], mode: str) -> Stall:
    saver = ckptproto.AsyncSaver(max_pending=1, staging=mode)  # type: ignore[arg-type]

    def run(path: Path) -> Timing:
        t0 = time.perf_counter()
        fut = saver.save(state, path)
        t1 = time.perf_counter()
        fut.wait_staged()
        t2 = time.perf_counter()
        mutate(state)  # what the loop does next; the checkpoint must not see it
        fut.result()
        t3 = time.perf_counter()
        return {"stall": t1 - t0, "staged": t2 - t0, "commit": t3 - t0}

    return Stall(f"ckptproto AsyncSaver {mode}", run, saver.close)


def ckptproto_sync(state: dict[str, Any]) -> Stall:
    def run(path: Path) -> Timing:
        t0 = time.perf_counter()
        ckptproto.save(state, path)
        dt = time.perf_counter() - t0
        return {"stall": dt, "staged": dt, "commit": dt}

    return Stall("ckptproto.save (sync)", run)


def dcp_async(state: dict[str, Any], async_staging: bool) -> Stall:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(False, False, True, False)) if async_staging else None

    def run(path: Path) -> Timing:
        t0 = time.perf_counter()
        writer = dcp.FileSystemWriter(str(path), sync_files=True)
        response = dcp.async_save(state, storage_writer=writer, async_stager=stager, no_dist=True)
        t1 = time.perf_counter()
        if hasattr(response, "staging_completion"):
            response.staging_completion.result()
            t2 = time.perf_counter()
            response.upload_completion.result()
        else:
            t2 = t1
            response.result()
        t3 = time.perf_counter()
        return {"stall": t1 - t0, "staged": t2 - t0, "commit": t3 - t0}

    def close() -> None:
        if stager is not None:
            stager.close()

    name = (
        "DCP async_save + DefaultStager(async staging)"
        if async_staging
        else "DCP async_save (default stager)"
    )
    return Stall(name, run, close)


def part1(args: argparse.Namespace, root: Path) -> None:
    state = big_state(args.size_mb, args.tensors)
    nbytes = sum(t.nbytes for t in state["model"].values())
    print(f"part 1: stall per save, {nbytes / 2**20:.0f} MiB fp32 in {args.tensors} tensors, dir {root}")
    methods = [
        clone_floor(state),
        ckptproto_async(state, "blocking"),
        ckptproto_async(state, "background"),
        dcp_async(state, async_staging=False),
        dcp_async(state, async_staging=True),
        ckptproto_sync(state),
    ]
    results: dict[str, list[Timing]] = {m.name: [] for m in methods}
    first: dict[str, Timing] = {}
    counter = 0

    def once(m: Stall) -> Timing:
        nonlocal counter
        counter += 1
        path = root / f"ckpt{counter}"
        timing = m.run(path)
        shutil.rmtree(path, ignore_errors=True)
        return timing

    for m in methods:
        first[m.name] = once(m)  # warm-up: allocates staging buffers, imports, thread start
    for _ in range(args.repeat):  # interleaved, so drift hits every method alike
        for m in methods:
            results[m.name].append(once(m))
    for m in methods:
        m.close()

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"{'method':48} {'stall':>9} {'staged':>9} {'commit':>9} {'1st stall':>10}")
    for m in methods:
        print(
            f"{m.name:48} {med(m.name, 'stall') * 1e3:8.1f}ms {med(m.name, 'staged') * 1e3:8.1f}ms "
            f"{med(m.name, 'commit') * 1e3:8.1f}ms {first[m.name]['stall'] * 1e3:9.1f}ms"
        )
    floor = med(methods[0].name, "stall")
    blocking = med(methods[1].name, "stall")
    background = med(methods[2].name, "stall")
    dcp_default = med(methods[3].name, "stall")
    dcp_stager = med(methods[4].name, "stall")
    print(f"blocking stall / clone floor:                 {blocking / floor:6.2f}x   (target <= 1.2x)")
    print(
        f"background stall / DCP async_save (default):  {background / dcp_default:6.3f}x   (target < 0.10x)"
    )
    print(f"background stall / DCP async_save (stager):   {background / dcp_stager:6.3f}x")
    print(
        f"background staged / clone floor:              {med(methods[2].name, 'staged') / floor:6.2f}x"
        f"   commit: blocking {med(methods[1].name, 'commit') / med(methods[5].name, 'commit'):.2f}x,"
        f" background {med(methods[2].name, 'commit') / med(methods[5].name, 'commit'):.2f}x of sync save"
    )


def part2(args: argparse.Namespace, root: Path) -> None:
    torch.manual_seed(0)
    width = args.width
    layers = max(1, args.loop_mb * (1 << 20) // (width * width * 4))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(args.batch, width)
    params = sum(p.numel() for p in model.parameters())

    def step() -> None:
        loss = model(x).square().mean()
        loss.backward()

    def loop(mode: str | None) -> tuple[float, float, float]:
        saver = ckptproto.AsyncSaver(max_pending=1, staging=mode) if mode else None  # type: ignore[arg-type]
        fut = None
        stall = 0.0
        done: list[Path] = []
        t0 = time.perf_counter()
        for i in range(args.loop_steps):
            step()
            if fut is not None:
                fut.wait_staged()  # only a background save can still be copying
            opt.step()
            opt.zero_grad()
            if saver is not None and (i + 1) % args.save_every == 0:
                s0 = time.perf_counter()
                path = root / f"loop-{mode}-{i}"
                fut = saver.save(
                    {
                        "models": {"model": model},
                        "optimizers": {"optimizer": opt},
                        "trainer": {"global_step": i},
                    },
                    path,
                )
                stall += time.perf_counter() - s0
                done.append(path)
                if len(done) > 2:
                    old = done.pop(0)
                    shutil.rmtree(old, ignore_errors=True)  # committed: max_pending=1 and a newer one exists
        elapsed = time.perf_counter() - t0
        if saver is not None:
            saver.close()  # the last save's write, reported apart: a longer run amortizes it
        drain = time.perf_counter() - t0 - elapsed
        for p in done:
            shutil.rmtree(p, ignore_errors=True)
        return elapsed, stall, drain

    state_mb = params * 4 * 3 / 2**20  # weights + Adam's two moments
    print(
        f"\npart 2: training loop, {layers}x Linear({width},{width}) + Adam (~{state_mb:.0f} MiB state), "
        f"batch {args.batch}, {args.loop_steps} steps, a save every {args.save_every} steps"
    )
    for _ in range(3):
        step()
        opt.step()
        opt.zero_grad()  # warm-up (Adam state created)
    runs: dict[str, list[float]] = {"none": [], "blocking": [], "background": []}
    stalls: dict[str, list[float]] = {"none": [], "blocking": [], "background": []}
    drains: dict[str, list[float]] = {"none": [], "blocking": [], "background": []}
    for _ in range(args.loop_repeat):
        for mode in ("none", "blocking", "background"):
            elapsed, stall, drain = loop(None if mode == "none" else mode)
            runs[mode].append(elapsed)
            stalls[mode].append(stall)
            drains[mode].append(drain)
    base = statistics.median(runs["none"])
    saves = args.loop_steps // args.save_every
    for mode, times in runs.items():
        t = statistics.median(times)
        per_step = t / args.loop_steps * 1e3
        loss = (t / base - 1) * 100
        stall = statistics.median(stalls[mode]) / max(saves, 1) * 1e3 if mode != "none" else 0.0
        print(
            f"  {mode:11} {t:7.2f} s  {per_step:7.1f} ms/step  throughput loss {loss:+6.1f}%  "
            f"save() stall {stall:6.1f} ms/save  final drain {statistics.median(drains[mode]):5.2f} s"
        )


def python_step(work: int, scratch: torch.Tensor) -> float:
    """One step of a Python-heavy loop: interpreter work (dict/list bookkeeping, the kind a
    data pipeline, logging or a small-op model does) and tiny torch ops whose cost is
    dispatch, not math. Everything here holds the GIL."""
    acc: dict[int, float] = {}
    for i in range(work):
        acc[i % 61] = acc.get(i % 61, 0.0) + i * 0.5
    t = scratch
    for _ in range(work // 20):
        t = t.add(1.0).mul_(0.5)
    return float(t[0]) + sum(acc.values())


def loop_state(kind: str) -> dict[str, Any]:
    """The two states of issue 17's goal 4: 20,000 tensors of 1 KiB, or 512 MiB in 64."""
    g = torch.Generator().manual_seed(0)
    if kind == "20k":
        data = torch.randn(20_000, 256, generator=g)
        return {"models": {"model": {f"layers.{i // 8}.p{i % 8}": data[i].clone() for i in range(20_000)}}}
    per = 512 * (1 << 20) // 4 // 64
    return {"models": {"model": {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(64)}}}


class InFlight:
    """One method of part 3: ``start(path)`` begins one save and returns a ``wait`` for its
    commit (``None`` for the no-save baseline)."""

    def __init__(self, name: str, start: Callable[[Path], Callable[[], None] | None]) -> None:
        self.name, self.start = name, start
        self.close: Callable[[], None] = lambda: None
        self.child: Callable[[], int | None] = lambda: None  # the writer process's pid, if any


def inflight_methods(
    state: dict[str, Any], with_dcp: bool, writers: list[str], modes: list[str], burn_ms: float = 0.0
) -> list[InFlight]:
    none = InFlight("no save (baseline)", lambda path: None)
    out = [none]
    for mode in modes:
        for writer in writers:
            # (writer= only when asked: the same script then also measures versions without it)
            extra: dict[str, Any] = {} if writer == "auto" else {"writer": writer}
            saver = ckptproto.AsyncSaver(max_pending=1, staging=mode, **extra)  # type: ignore[arg-type]

            def start(path: Path, saver: ckptproto.AsyncSaver = saver) -> Callable[[], None]:
                fut = saver.save(state, path)
                return lambda: (fut.result(), None)[1]

            default = " (default)" if (mode, writer) == ("blocking", "auto") else ""
            m = InFlight(f"ckptproto {mode}, writer={writer}{default}", start)
            m.close = saver.close
            m.child = lambda saver=saver: saver.writer_pid  # type: ignore[misc]
            out.append(m)
    if burn_ms:
        out.append(cpu_burner(burn_ms))
    if with_dcp:
        import torch.distributed.checkpoint as dcp

        flat = state["models"]["model"]

        def dcp_start(path: Path) -> Callable[[], None]:
            writer = dcp.FileSystemWriter(str(path), sync_files=True)
            response = dcp.async_save(flat, storage_writer=writer, no_dist=True)
            return lambda: (response.result(), None)[1]

        out.append(InFlight("DCP async_save (default)", dcp_start))
    return out


def cpu_burner(burn_ms: float) -> InFlight:
    """The machine's own floor (``--burn-ms``): no save, a process apart that spins Python for
    ``burn_ms`` of CPU time on the other core, no memory traffic, no file, no GIL of ours. What
    it costs the loop is what any process's CPU beside the loop costs on this machine (on a VM
    whose two vCPUs share a physical core, or are overcommitted, much more than nothing)."""
    spin = (
        "import sys, time\n"
        "while sys.stdin.buffer.read(1):\n"
        "    t = time.process_time()\n"
        f"    while time.process_time() - t < {burn_ms / 1e3!r}: pass\n"
        "    sys.stdout.buffer.write(b'x'); sys.stdout.buffer.flush()\n"
    )
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", spin], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None
    stdin, stdout = child.stdin, child.stdout

    def start(path: Path) -> Callable[[], None]:
        stdin.write(b"x")
        stdin.flush()
        return lambda: (stdout.read(1), None)[1]

    m = InFlight(f"CPU burner, {burn_ms:.0f} ms on the other core", start)

    def close() -> None:
        stdin.close()
        child.wait()

    m.close = close
    m.child = lambda: child.pid
    return m


Window = dict[str, float]  # seconds, except outlived (0/1)


def threads_cpu(prefix: str) -> float:
    """CPU time of this process's live threads whose name starts with ``prefix``."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith(prefix) and thread.ident is not None:
            with contextlib.suppress(OSError):  # it just ended
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return total


def page_faults() -> tuple[int, int]:
    """(minor, major) page faults of this whole process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_majflt


def process_cpu(pid: int | None) -> float:
    """CPU time (user + system) of process ``pid`` so far; 0 for None or a process gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_window(m: InFlight, path: Path, steps: int, work: int, scratch: torch.Tensor) -> Window:
    """``steps`` loop steps with ``m``'s save started first, then waits for its commit.

    Wall times: ``loop`` (the loop, save() included), ``stall`` (save() alone). The loop's own
    thread: ``own`` (its CPU time in the loop's steps, save() excluded: grows when the save
    evicts its caches or faults pages), ``off`` (the steps' wall time it did not run: waiting
    for the GIL, or for a core). CPU times, which a busy machine inflates far less than wall
    times: ``caller`` (the loop's thread inside save()), ``saver`` (the saver's staging and
    writer threads: Python work that holds the GIL the loop needs), ``io`` (ckptproto's I/O
    pool: write and CRC, GIL released; it competes only for cores), ``other`` (everything this
    process ran outside the loop's thread), ``child`` (the writer process's own), ``gc``
    (collector passes in the whole process). ``outlived``: the save was still running when the
    loop ended (then not all of its cost fell inside the window)."""
    cpu0, saver0, io0 = time.process_time(), threads_cpu("ckptproto-async"), threads_cpu("ckptproto-io")
    gc0 = sum(s["collections"] for s in gc.get_stats())
    child0 = process_cpu(m.child())
    faults0 = page_faults()
    own0 = time.thread_time()
    t0 = time.perf_counter()
    wait = m.start(path)
    stall = time.perf_counter() - t0
    caller = time.thread_time() - own0
    own1 = time.thread_time()
    for _ in range(steps):
        python_step(work, scratch)
    elapsed = time.perf_counter() - t0
    own = time.thread_time() - own1
    outlived = False
    if wait is not None:
        t1 = time.perf_counter()
        wait()
        outlived = time.perf_counter() - t1 > 1e-3
    other = (time.process_time() - cpu0) - (time.thread_time() - own0)
    faults1 = page_faults()
    shutil.rmtree(path, ignore_errors=True)
    return {
        "loop": elapsed,
        "stall": stall,
        "own": own,
        "off": elapsed - stall - own,
        "caller": caller,
        "saver": threads_cpu("ckptproto-async") - saver0,
        "io": threads_cpu("ckptproto-io") - io0,
        "other": other,
        "gc": sum(s["collections"] for s in gc.get_stats()) - gc0,
        "child": process_cpu(m.child()) - child0,
        "minflt": faults1[0] - faults0[0],
        "outlived": float(outlived),
    }


def window_median(windows: list[Window], key: str) -> float:
    return statistics.median(w[key] for w in windows)


def pair_median(pairs: list[tuple[Window, Window]], key: str) -> float:
    """Median over A/B pairs of (with save) - (its own baseline), for ``key``."""
    return statistics.median(b[key] - a[key] for a, b in pairs)


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval for the median of ``values`` (order statistics,
    the sign test's binomial): ``(low, high, coverage)`` for the narrowest pair of order
    statistics covering at least ``level``; with too few values for ``level`` (5 or fewer for
    95%), the whole range and the coverage it has (5 values: 93.75%)::

        median_interval([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09])  # (0.02, 0.08, 0.9609375)
    """
    xs, n = sorted(values), len(values)
    interval = (xs[0], xs[-1], 1 - 2 * 0.5**n)
    tail = 0.0  # P(Binomial(n, 1/2) < k): the chance that the median lies below the k-th value
    for k in range(1, (n + 1) // 2):
        tail += math.comb(n, k - 1) / 2**n
        coverage = 1 - 2 * tail
        if coverage < level:
            break
        interval = (xs[k - 1], xs[n - k], coverage)
    return interval


def part3(args: argparse.Namespace, root: Path) -> None:
    """Issue 17 goal 4: a Python-heavy loop with and without one async save in flight.

    Every method's run is paired with a no-save run right beside it (A/B, the order
    alternating from round to round, the methods' order rotating), and the slowdown printed is
    the median over ``--py-repeat`` pairs of (loop with the save) / (its pair's loop without)
    - 1: a drift in the machine's load hits both halves of a pair alike. Beside it, a 95%
    confidence interval for that median (:func:`median_interval`; the whole range, and its
    lower coverage, with 5 pairs or fewer): the slowdown is shown to be under a bound only
    when the interval's upper end is."""
    scratch = torch.zeros(16)
    for _ in range(50):
        python_step(args.py_work, scratch)
    t0, done = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.3:
        python_step(args.py_work, scratch)
        done += 1
    per_step = (time.perf_counter() - t0) / done  # a first guess: set again per state, below
    steps = max(10, round(args.window / per_step))
    print(
        f"\npart 3: Python-heavy loop (~{args.window:.1f} s without a save) "
        f"with one save started at its first step; {args.py_repeat} A/B pairs per method "
        "(a no-save run beside each), medians"
    )
    counter = 0
    for kind in args.py_states:
        state = loop_state(kind)
        tensors = state["models"]["model"]
        nbytes = sum(t.nbytes for t in tensors.values())
        methods = inflight_methods(
            state, with_dcp=not args.skip_dcp, writers=args.writers, modes=args.modes, burn_ms=args.burn_ms
        )
        baseline, saving = methods[0], methods[1:]
        pairs: dict[str, list[tuple[Window, Window]]] = {m.name: [] for m in saving}

        def window(m: InFlight, steps: int) -> Window:
            nonlocal counter
            counter += 1
            return run_window(m, root / f"py{counter}", steps, args.py_work, scratch)

        for m in methods:
            window(m, steps)  # warm-up: buffers, threads, the writer process, imports
        # The loop's length set from warm no-save windows of this very setting (a step timed
        # alone, before the state exists, ran ~1.8x slower than in the windows: loops of 1.1 s).
        took = statistics.median(window(baseline, steps)["loop"] for _ in range(3))
        steps = max(10, round(steps * args.window / took))
        for r in range(args.py_repeat):
            for m in saving[r % len(saving) :] + saving[: r % len(saving)]:
                if r % 2 == 0:
                    a = window(baseline, steps)
                    b = window(m, steps)
                else:
                    b = window(m, steps)
                    a = window(baseline, steps)
                pairs[m.name].append((a, b))
        for m in methods:
            m.close()

        every_a = [a for p in pairs.values() for a, _b in p]
        print(
            f"  state: {len(tensors)} tensors, {nbytes / 2**20:.0f} MiB; {steps} steps; no-save loop "
            f"{window_median(every_a, 'loop'):.3f} s (median of {len(every_a)})"
        )
        print(
            f"  {'method':44} {'slowdown':>9} {'95% interval':>16} {'min..max':>14} | {'+loop':>7} = {'save()':>7} "
            f"{'+own':>7} {'+off':>7} | CPU: {'caller':>7} {'saver':>7} {'io':>7} {'other':>7} {'child':>7} "
            f"{'gc':>4} {'faults':>7} outlived"
        )
        for m in saving:
            p = pairs[m.name]
            ratios = sorted(b["loop"] / a["loop"] - 1 for a, b in p)
            low, high, coverage = median_interval(ratios)
            interval = f"{low * 100:+.1f}..{high * 100:+.1f}%" + (
                "" if coverage >= 0.95 else f" ({coverage:.0%})"
            )
            w = [b for _a, b in p]
            cpu = " ".join(
                f"{window_median(w, k) * 1e3:5.0f}ms" for k in ("caller", "saver", "io", "other", "child")
            )
            print(
                f"  {m.name:44} {statistics.median(ratios) * 100:+8.1f}% {interval:>16} "
                f"{ratios[0] * 100:+6.1f}..{ratios[-1] * 100:+5.1f}% | "
                f"{pair_median(p, 'loop') * 1e3:5.0f}ms = {window_median(w, 'stall') * 1e3:5.0f}ms "
                f"{pair_median(p, 'own') * 1e3:+5.0f}ms {pair_median(p, 'off') * 1e3:+5.0f}ms | "
                f"     {cpu} {window_median(w, 'gc'):4.0f} {pair_median(p, 'minflt'):7.0f} "
                f"{sum(x['outlived'] for x in w):.0f}/{len(w)}"
            )
        del state, tensors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--tensors", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir in /tmp)")
    parser.add_argument("--loop-mb", type=int, default=64, help="model weights in the loop (MiB)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--loop-steps", type=int, default=60)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--loop-repeat", type=int, default=1)
    parser.add_argument("--skip-loop", action="store_true")
    parser.add_argument("--skip-stall", action="store_true")
    parser.add_argument("--python-loop", action="store_true", help="run only part 3 (goal 4)")
    parser.add_argument("--py-states", nargs="+", default=["20k", "512mib"], choices=["20k", "512mib"])
    parser.add_argument("--py-work", type=int, default=2000, help="Python work per step")
    parser.add_argument("--window", type=float, default=2.0, help="loop length without a save (s)")
    parser.add_argument("--py-repeat", type=int, default=5)
    parser.add_argument("--skip-dcp", action="store_true")
    parser.add_argument(
        "--burn-ms",
        type=float,
        default=0.0,
        help="part 3 also runs a control: a process spinning this much CPU on the other core, no save",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["blocking", "background"], choices=["blocking", "background"]
    )
    parser.add_argument(
        "--writers", nargs="+", default=["auto", "thread", "process"], choices=["auto", "thread", "process"]
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_async-", dir=args.dir))
    try:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
        if args.python_loop:
            part3(args, root)
            return
        if not args.skip_stall:
            part1(args, root)
        if not args.skip_loop:
            part2(args, root)
        part3(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
