"""The writer process's CPU per async save, for A/B runs of a change against the commit
before it (the other single-phase figures come from ``bench_many_tensors.py``: ``--stages`` for
each phase of a save and a load, ``--only ckptproto --clock cpu --no-gc`` for the process CPU
of the repeated and the first save)::

    git worktree add --detach /work/wt/a HEAD~1
    for w in /work/wt/a .; do PYTHONPATH=$w python benchmarks/bench_probes.py writer-cpu; done

``writer-cpu``: the writer process's CPU per async save of issue 17's 20,000-tensor state
(``/proc/PID/stat`` before and after each of 10 saves; 10 ms clock ticks). ``bench_async.py``
reports the same CPU (its ``child`` column) inside its much longer loop runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("probe", choices=["writer-cpu"])
    parser.add_argument("--dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(f"{args.probe}, ckptproto from {Path(ckptproto.__file__).parent}")
        writer_cpu(root)


if __name__ == "__main__":
    main()
