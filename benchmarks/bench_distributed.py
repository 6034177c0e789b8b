"""Distributed save/load: ckptproto against DCP (torch.distributed.checkpoint) on the same
sharded state, on 2 and 4 gloo ranks (spawned processes on 127.0.0.1), in one run.

The state: ``--mib`` MiB of float32 DTensors sharded on dim 0 over all ranks (the FSDP2
layout), plus ``--replicated-mib`` MiB of plain tensors held by every rank (DDP-style,
replicated). Each measurement is the slowest rank's time between two barriers; saves go to
fresh directories and include fsync (DCP's FileSystemWriter fsyncs by default). Loads read
into existing DTensors (ckptproto.load_into, dcp.load). Best and median of ``--repeat``
(the two libraries alternate which goes first); on a shared machine compare the ratios.

    python benchmarks/bench_distributed.py --ranks 2 4 --mib 64 --dir /tmp

``--async`` saves with ``ckptproto.AsyncSaver`` (one per rank, made once) and
``dcp.async_save`` instead: the ``stall`` row is the time until the save call returned (what
the training loop waits for), ``save`` the time until the checkpoint was committed on every
rank; the loads then read those checkpoints from the disk (both evicted from the page cache
first: ckptproto's async writes bypass it, DCP's do not).

``--phases`` also times each step of ckptproto's saves on every rank (prepare, begin, the
three messages, writing with CRCs, the fsyncs, manifest and commit; wall and this thread's
CPU) and DCP's fsyncs, and prints every rank's median per step and the timeline of the
median save: where a save's time goes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _evict(path: Path) -> None:
    """Drop the (written back, clean) page-cache pages of every file under ``path``."""
    for file in path.rglob("*"):
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _state(mib: float, replicated_mib: float, mesh: Any, zero: bool) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    n_sharded, n_rep = 16, 4
    rows = max(1, int(mib * 2**20 / 4 / n_sharded / 1024))
    rep_rows = max(1, int(replicated_mib * 2**20 / 4 / n_rep / 1024))
    model = {}
    for i in range(n_sharded):
        full = torch.zeros(rows, 1024) if zero else torch.randn(rows, 1024, generator=g)
        model[f"layer{i}.weight"] = distribute_tensor(full, mesh, [Shard(0)])
    replicated = {
        f"embed{i}": torch.zeros(rep_rows, 1024) if zero else torch.randn(rep_rows, 1024, generator=g)
        for i in range(n_rep)
    }
    return {"model": model, "replicated": replicated}


class _Phases:
    """Times the steps of a save on this rank by wrapping the functions that take them (wall
    from the save's start, and the calling thread's CPU time), one list of events per save."""

    def __init__(self) -> None:
        import ckptproto.io.commit as commit
        import ckptproto.io.coordinate as coordinate
        import ckptproto.io.local_storage as local_storage
        import ckptproto.io.pipeline as pipeline
        import ckptproto.io.writer as writer

        self.events: list[tuple[str, float, float, float]] = []
        self.start = 0.0
        self._wrap(pipeline, "prepare", "prepare")
        self._wrap(local_storage.LocalStorage, "begin", "begin")
        self._wrap(coordinate.Group, "share", "share")  # the first: the temporary directory; then the outcome
        self._wrap(coordinate.Group, "collect", "collect")
        self._wrap(local_storage.LocalStorage, "write_file", "write file")
        self._wrap(writer, "crc_of", "crc")
        self._wrap(os, "fsync", "fsync")
        self._wrap(local_storage.LocalStorage, "write_small_file", "manifest")
        self._wrap(local_storage.LocalStorage, "commit", "commit")
        self._wrap(commit, "fsync_dir", "fsync dir")

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        real = getattr(owner, name)
        events = self.events

        def timed(*args: Any, **kwargs: Any) -> Any:
            begin, cpu = time.perf_counter(), time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                name = label
                if label == "share":
                    name = "share: dir" if all(e[0] != "share: dir" for e in events) else "share: outcome"
                events.append((name, begin, time.perf_counter(), time.thread_time() - cpu))

        setattr(owner, name, timed)

    def begin(self) -> None:
        self.events.clear()
        self.start = time.perf_counter()

    def take(self) -> list[tuple[str, float, float, float]]:
        return [(label, a - self.start, b - self.start, cpu) for label, a, b, cpu in self.events]


def _rank(rank: int, world: int, port: int, args: dict[str, Any], out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import ckptproto

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(minutes=5),
    )
    mesh = init_device_mesh("cpu", (world,))
    state = _state(args["mib"], args["replicated_mib"], mesh, zero=False)
    root = Path(args["root"])

    phases = _Phases() if args["phases"] else None
    steps: dict[str, list[Any]] = {"ours": [], "dcp": []}

    def timed(fn: Any, record: str | None = None) -> float:
        dist.barrier()
        if phases is not None:
            phases.begin()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        if phases is not None and record is not None:
            wall = time.perf_counter() - start
            steps[record].append({"wall": wall, "cpu": time.process_time() - cpu, "events": phases.take()})
        dist.barrier()
        elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed.item())

    def timed_async(start: Any) -> tuple[float, float]:
        """(until ``start()`` returned, until the wait it returned did), slowest rank each."""
        dist.barrier()
        begin = time.perf_counter()
        wait = start()
        stall = time.perf_counter() - begin
        wait()
        dist.barrier()
        elapsed = torch.tensor([stall, time.perf_counter() - begin], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed[0]), float(elapsed[1])

    def ours_async(path: Path) -> Any:
        return saver.save(state, path).result

    def dcp_async(path: Path) -> Any:
        response = dcp.async_save(state, checkpoint_id=str(path))
        return getattr(response, "upload_completion", response).result  # (a Future, in 2.13)

    saver = ckptproto.AsyncSaver() if args["async"] else None  # a collective call: made once
    times: dict[str, list[float]] = {"ours_save": [], "dcp_save": [], "ours_load": [], "dcp_load": []}
    times.update({"ours_stall": [], "dcp_stall": []} if saver is not None else {})
    for attempt in range(args["repeat"]):
        ours, theirs = root / f"ours-{world}-{attempt}", root / f"dcp-{world}-{attempt}"
        order = [("ours", ours), ("dcp", theirs)] if attempt % 2 == 0 else [("dcp", theirs), ("ours", ours)]
        for name, path in order:
            if saver is not None:
                stall, total = timed_async(
                    lambda p=path, n=name: (ours_async if n == "ours" else dcp_async)(p)
                )
                times[f"{name}_stall"].append(stall)
                times[f"{name}_save"].append(total)
            elif name == "ours":
                times["ours_save"].append(timed(lambda p=path: ckptproto.save(state, p), "ours"))
            else:
                times["dcp_save"].append(timed(lambda p=path: dcp.save(state, checkpoint_id=str(p)), "dcp"))
        if saver is not None:
            # Async saves write ckptproto's files past the page cache (io/direct.py) and DCP's
            # through it: both loads read from the disk, or the ratio says which is cached.
            if rank == 0:
                _evict(ours)
                _evict(theirs)
            dist.barrier()
        targets = {n: _state(args["mib"], args["replicated_mib"], mesh, zero=True) for n in ("ours", "dcp")}
        for name, path in order:
            t = targets[name]
            if name == "ours":
                times["ours_load"].append(timed(lambda p=path, t=t: ckptproto.load_into(p, t)))
            else:
                times["dcp_load"].append(timed(lambda p=path, t=t: dcp.load(t, checkpoint_id=str(p))))
        for name, t in targets.items():  # both loads really produced the saved values
            for key, value in state["model"].items():
                assert torch.equal(t["model"][key].to_local(), value.to_local()), (name, key)
            for key, value in state["replicated"].items():
                assert torch.equal(t["replicated"][key], value), (name, key)
    if saver is not None:
        saver.close()
    if phases is not None:
        Path(f"{out}.phases.{rank}").write_text(json.dumps(steps))
    dist.barrier()
    if rank == 0:
        result: dict[str, Any] = {k: min(v) for k, v in times.items()}
        result.update({f"{k}_median": statistics.median(v) for k, v in times.items()})
        result["ours_bytes"] = _dir_bytes(root / f"ours-{world}-0")
        result["dcp_bytes"] = _dir_bytes(root / f"dcp-{world}-0")
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run(world: int, args: dict[str, Any]) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = Path(args["root"]) / f"result-{world}.json"
    port = _port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, str(out))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
    result: dict[str, Any] = json.loads(out.read_text())
    if args["phases"]:
        result["phases"] = [json.loads(Path(f"{out}.phases.{r}").read_text()) for r in range(world)]
    return result


def _print_phases(world: int, per_rank: list[dict[str, list[Any]]]) -> None:
    """Every rank's median time per step of ckptproto's saves, and the median save's timeline."""
    for lib in ("ours", "dcp"):
        saves = [ranks[lib] for ranks in per_rank]  # [rank][attempt]
        slowest = [max(rank_saves[i]["wall"] for rank_saves in saves) for i in range(len(saves[0]))]
        name = "ckptproto" if lib == "ours" else "DCP"
        print(
            f"{world:>5} {name} save, slowest rank (ms): "
            + " ".join(f"{w * 1000:.0f}" for w in slowest)
            + "; process CPU per rank, median (ms): "
            + " ".join(
                f"{statistics.median(s['cpu'] for s in rank_saves) * 1000:.0f}" for rank_saves in saves
            )
        )
        labels = sorted({e[0] for rank_saves in saves for s in rank_saves for e in s["events"]})
        for label in labels:
            cells = []
            for rank_saves in saves:
                wall = [sum(e[2] - e[1] for e in s["events"] if e[0] == label) for s in rank_saves]
                cpu = [sum(e[3] for e in s["events"] if e[0] == label) for s in rank_saves]
                cells.append(f"{statistics.median(wall) * 1000:6.1f} ({statistics.median(cpu) * 1000:4.1f})")
            print(f"      {label:>10}: " + "  ".join(cells))
    saves = [ranks["ours"] for ranks in per_rank]
    slowest = [max(rank_saves[i]["wall"] for rank_saves in saves) for i in range(len(saves[0]))]
    median = sorted(range(len(slowest)), key=slowest.__getitem__)[len(slowest) // 2]
    print(f"{world:>5} ckptproto's median save (attempt {median}), ms from its start [start-end cpu]:")
    for r, rank_saves in enumerate(saves):
        events = sorted(rank_saves[median]["events"], key=lambda e: e[1])
        line = " ".join(f"{e[0]}[{e[1] * 1000:.0f}-{e[2] * 1000:.0f} {e[3] * 1000:.0f}]" for e in events)
        print(f"      rank {r}: {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--mib", type=float, default=64, help="sharded state size (MiB)")
    parser.add_argument("--replicated-mib", type=float, default=16, help="replicated plain tensors (MiB)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    parser.add_argument("--phases", action="store_true", help="time each step of the saves on every rank")
    parser.add_argument(
        "--async",
        dest="async_",
        action="store_true",
        help="AsyncSaver against dcp.async_save: the save call's stall, then the commit",
    )
    ns = parser.parse_args()
    if ns.async_ and ns.phases:
        parser.error("--phases times the blocking saves; run it without --async")
    root = Path(tempfile.mkdtemp(prefix="bench-distributed-", dir=ns.dir))
    args = {
        "mib": ns.mib,
        "replicated_mib": ns.replicated_mib,
        "repeat": ns.repeat,
        "root": str(root),
        "phases": ns.phases,
        "async": ns.async_,
    }
    print(
        f"state: {ns.mib:g} MiB sharded (16 DTensors, Shard(0)) + {ns.replicated_mib:g} MiB replicated "
        f"(4 plain tensors on every rank); best and median of {ns.repeat}; in {root}"
        + (
            "\nasync: stall = until the save call returned, save = until committed on every rank"
            if ns.async_
            else ""
        )
    )
    header = (
        f"{'ranks':>5} {'op':>5} {'ckptproto s':>12} {'DCP s':>8} {'DCP/ours':>9}"
        f" {'median: ckptproto s':>20} {'DCP s':>8} {'DCP/ours':>9}"
    )
    try:
        for world in ns.ranks:
            r = run(world, args)
            print(header)
            for op in ("stall", "save", "load") if ns.async_ else ("save", "load"):
                ours, theirs = r[f"ours_{op}"], r[f"dcp_{op}"]
                mine, other = r[f"ours_{op}_median"], r[f"dcp_{op}_median"]
                print(
                    f"{world:>5} {op:>5} {ours:>12.3f} {theirs:>8.3f} {theirs / ours:>9.2f}"
                    f" {mine:>20.3f} {other:>8.3f} {other / mine:>9.2f}"
                )
            print(
                f"{world:>5} bytes written: ckptproto {r['ours_bytes']:,}  DCP {r['dcp_bytes']:,}  "
                f"(DCP/ours {r['dcp_bytes'] / r['ours_bytes']:.3f})"
            )
            if ns.phases:
                print(f"{world:>5} per step, median over the saves, per rank: wall ms (this thread's CPU ms)")
                _print_phases(world, r["phases"])
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
