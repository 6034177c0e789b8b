"""Loads only, from a warm page cache: what verification costs (issue 17, goal 1).

    python benchmarks/bench_verified_load.py                  # 512 MiB fp32 in 64 tensors
    python benchmarks/bench_verified_load.py --size-mb 256 --rounds 15 --dir /dev/shm

Every case runs in the same process, interleaved round by round (the order rotates), and
the table prints the median wall time of each and its ratio to torch.load of the same bytes,
and the same for the CPU time of the process (all threads; steadier on a busy machine). ``load``
and ``load_into`` check every CRC; "(zlib)" runs them with zlib's CRC-32 even where the
``fastcrc`` extra (ISA-L) is installed; ``verify=False`` is the floor without checksums.
Each checkpoint is saved once (the saves are not timed: bench_save_load.py times them).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import ckptproto
from ckptproto.format import crc


@contextmanager
def zlib_crc() -> Iterator[None]:
    fast = crc._crc32
    crc._crc32 = zlib.crc32
    try:
        yield
    finally:
        crc._crc32 = fast


def cases(root: Path, state: dict[str, torch.Tensor]) -> dict[str, Callable[[], Any]]:
    ckptproto.save(state, root / "ck")
    torch.save(state, root / "t.pt")
    target = {k: torch.empty_like(v) for k, v in state.items()}

    def load_zlib() -> Any:
        with zlib_crc():
            return ckptproto.load(root / "ck")

    def load_into_zlib() -> Any:
        with zlib_crc():
            return ckptproto.load_into(root / "ck", target)

    out: dict[str, Callable[[], Any]] = {
        "torch.load": lambda: torch.load(root / "t.pt", weights_only=True),
        f"load ({crc.IMPLEMENTATION})": lambda: ckptproto.load(root / "ck"),
        f"load_into ({crc.IMPLEMENTATION})": lambda: ckptproto.load_into(root / "ck", target),
        "load(verify=False)": lambda: ckptproto.load(root / "ck", verify=False),
    }
    if crc.IMPLEMENTATION != "zlib":
        out["load (zlib)"] = load_zlib
        out["load_into (zlib)"] = load_into_zlib
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    args = parser.parse_args()
    per = args.size_mb * (1 << 20) // 4 // args.n
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(args.n)}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="ckptproto-bench-") as tmp:
        table = cases(Path(tmp), state)
        del state
        times: dict[str, list[float]] = {k: [] for k in table}
        cpu: dict[str, list[float]] = {k: [] for k in table}
        for r in range(args.rounds):
            order = list(table)[r % len(table) :] + list(table)[: r % len(table)]
            for k in order:
                c0, t0 = time.process_time(), time.perf_counter()
                out = table[k]()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
                del out
    base, base_cpu = statistics.median(times["torch.load"]), statistics.median(cpu["torch.load"])
    print(f"{args.n} tensors, {args.size_mb} MiB, median of {args.rounds} (CRC-32: {crc.IMPLEMENTATION})")
    print(f"  {'':<22} {'wall s':>7} {'x torch':>8} {'cpu s':>7} {'x torch':>8}")
    for k, v in times.items():
        m, c = statistics.median(v), statistics.median(cpu[k])
        print(f"  {k:<22} {m:7.3f} {m / base:8.2f} {c:7.3f} {c / base_cpu:8.2f}")


if __name__ == "__main__":
    main()
