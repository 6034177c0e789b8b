"""Durable save and full load, side by side: ckptproto vs torch.save, safetensors and DCP.

    python benchmarks/bench_save_load.py                 # ~1 GiB in 100 tensors + 10,000 small
    python benchmarks/bench_save_load.py --size-mb 256 --repeat 5 --dir /dev/shm

Each method is timed in the same run, interleaved round by round (one method saves, loads and
deletes its files before the next saves: the same page cache for all); the table prints the median
and the ratio to ckptproto (>1 means ckptproto is faster). "Durable" means the data is fsynced
before the clock stops. "Full load" means every page of every tensor is touched; "x torch" is
the load time over torch.load's ("ckpt into" is load_into, "ckpt noverif" load(verify=False);
the others check every CRC, except mmap); "x dd" is the save time over ``dd+fsync``'s: the same
bytes written one after another with plain writes, then fsynced (issue 17's floor). Loads run
with a warm page cache unless --drop-caches is given (needs root and a writable
/proc/sys/vm/drop_caches).
"""

from __future__ import annotations

import argparse
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
from _durable import fsync_tree, raw_read, raw_write_durable, safetensors_save_durable, torch_save_durable

import ckptproto
from ckptproto.format import crc

warnings.filterwarnings("ignore")


def big_state(size_mb: int, n: int) -> dict[str, torch.Tensor]:
    per = size_mb * (1 << 20) // 4 // n
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}


def small_state(n: int, numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {f"block{i // 10}.p{i % 10}": torch.randn(numel, generator=g) for i in range(n)}


def touch(tree: Any) -> float:
    """Read every byte of every tensor (a sum), so lazily mapped data is really loaded."""
    if isinstance(tree, bytearray):  # the dd+fsync floor: already read into owned memory
        return float(len(tree))
    return sum(float(t.sum()) for t in tree.values())


def methods(
    state: dict[str, torch.Tensor],
) -> dict[str, tuple[Callable[[Path], None], Callable[[Path], Any]]]:
    from safetensors.torch import load_file

    def ck_save(p: Path) -> None:
        ckptproto.save(state, p)

    def ck_load(p: Path) -> Any:
        return ckptproto.load(p)

    def torch_save(p: Path) -> None:
        torch_save_durable(state, p)

    def torch_load(p: Path) -> Any:
        return torch.load(p, weights_only=True)

    def st_save(p: Path) -> None:
        safetensors_save_durable(state, p)

    def st_load(p: Path) -> Any:
        return load_file(str(p))

    def ck_load_mmap(p: Path) -> Any:
        return ckptproto.load(p, mmap=True)

    def ck_load_unverified(p: Path) -> Any:
        return ckptproto.load(p, verify=False)

    target = {k: torch.empty_like(v) for k, v in state.items()}

    def ck_load_into(p: Path) -> Any:
        ckptproto.load_into(p, target)  # every CRC checked, as load does
        return target

    out = {
        "ckptproto": (ck_save, ck_load),
        "ckpt into": (ck_save, ck_load_into),
        "ckpt noverif": (ck_save, ck_load_unverified),
        "ckpt mmap": (ck_save, ck_load_mmap),
        "torch.save": (torch_save, torch_load),
        "safetensors": (st_save, st_load),
        "dd+fsync": (lambda p: raw_write_durable(state, p), raw_read),
    }
    try:
        import torch.distributed.checkpoint as dcp

        def dcp_save(p: Path) -> None:
            dcp.save(state, checkpoint_id=str(p))
            fsync_tree(p)

        def dcp_load(p: Path) -> Any:
            target = {k: torch.empty_like(v) for k, v in state.items()}
            dcp.load(target, checkpoint_id=str(p))
            return target

        out["DCP"] = (dcp_save, dcp_load)
    except ImportError:
        pass
    return out


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def run_case(name: str, state: dict[str, torch.Tensor], root: Path, repeat: int, drop: bool) -> None:
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    table = methods(state)
    saves: dict[str, list[float]] = {m: [] for m in table}
    loads: dict[str, list[float]] = {m: [] for m in table}
    for r in range(repeat):
        order = list(table)[r % len(table) :] + list(table)[: r % len(table)]  # rotate: fair order
        # One method at a time, its files deleted before the next one saves: every save starts
        # with the same page cache and no other method's writeback in flight (fairness).
        for m in order:
            path = root / f"{name}-{m}-{r}"
            os.sync()
            t0 = time.perf_counter()
            table[m][0](path)
            saves[m].append(time.perf_counter() - t0)
            if drop:
                drop_caches()
            else:
                os.sync()
            t0 = time.perf_counter()
            tree = table[m][1](path)
            touch(tree)
            loads[m].append(time.perf_counter() - t0)
            del tree
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"\n{name}: {len(state)} tensors, {nbytes / 2**20:.0f} MiB, median of {repeat}")
    base_s, base_l = statistics.median(saves["ckptproto"]), statistics.median(loads["ckptproto"])
    torch_l = statistics.median(loads["torch.save"])
    dd_s = statistics.median(saves["dd+fsync"])
    print(
        f"  {'method':<12} {'save s':>8} {'GB/s':>6} {'x ours':>7} {'x dd':>6}   {'load s':>8} {'GB/s':>6}"
        f" {'x ours':>7} {'x torch':>8}"
    )
    for m in table:
        s, lo = statistics.median(saves[m]), statistics.median(loads[m])
        print(
            f"  {m:<12} {s:8.3f} {nbytes / s / 1e9:6.2f} {s / base_s:7.2f} {s / dd_s:6.2f}   "
            f"{lo:8.3f} {nbytes / lo / 1e9:6.2f} {lo / base_l:7.2f} {lo / torch_l:8.2f}"
        )
    print("  (x dd: save time over the same bytes written sequentially, 1 MiB writes + fsync;")
    print("   goal: ckptproto <= 1.1. dd+fsync's load: one read() into a new bytearray, for reference.)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--n-big", type=int, default=100)
    parser.add_argument("--n-small", type=int, default=10_000)
    parser.add_argument("--small-numel", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    parser.add_argument("--drop-caches", action="store_true")
    parser.add_argument("--only", choices=["big", "small"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    drop = args.drop_caches and drop_caches()
    if args.drop_caches and not drop:
        print("note: cannot drop caches here; loads run with a warm page cache")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ckptproto-bench-") as tmp:
        root = Path(tmp)
        print(
            f"writing under {root} ({os.cpu_count()} cores, torch {torch.__version__}, CRC-32: {crc.IMPLEMENTATION})"
        )
        if args.only in (None, "big"):
            run_case("big", big_state(args.size_mb, args.n_big), root, args.repeat, drop)
        if args.only in (None, "small"):
            run_case("small", small_state(args.n_small, args.small_numel), root, args.repeat, drop)


if __name__ == "__main__":
    main()
