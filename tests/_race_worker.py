"""One process of a race trial (tests/test_races.py): ``python _race_worker.py '<json>'`` runs
one role and prints one JSON line of results. Roles:

* ``race_save``: trial ``i`` starts at ``t0 + i * period`` (so two workers start together) and
  saves ``state(2 * i + me)`` to ``dir/<i>`` with ``overwrite=False``; reports each outcome.
* ``overwrite_loop``: re-saves ``path`` with ``overwrite=True`` until ``deadline``.
* ``retain_loop``: saves ``dir/step_<n>`` and discards all but the newest, until ``deadline``.
* ``read_loop``: reads (load, load mmap, verify, load_into in turn) ``path``, or the newest
  ``dir/step_<n>``, until ``deadline``; counts whole reads, mixed generations and errors.
* ``ns_writer``, ``ns_sweeper``: interactive (one JSON line in, one out), for the trials
  across PID namespaces: a save paused mid-write, and ``remove_leftovers``.

``"fallback": true`` disables renameat2 (exchange and no-replace): the rename(2) fallbacks.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

import ckptproto
from ckptproto.io import commit

N = 65536  # every generation has the same sizes: a mix of two would pass every size check
STEP_DIR = re.compile(r"step_(\d+)")


def state(step: int) -> dict[str, Any]:
    return {"w": np.full(N, step, dtype=np.float32), "trainer": {"global_step": step}}


def race_save(cmd: dict[str, Any]) -> dict[str, Any]:
    outcomes = []
    for i in range(cmd["trials"]):
        start = cmd["t0"] + i * cmd["period"]
        while time.time() < start:  # spin: both workers leave this loop within microseconds
            pass
        late = time.time() - start > cmd["period"] / 4
        try:
            ckptproto.save(state(2 * i + cmd["me"]), Path(cmd["dir"]) / str(i))
            outcomes.append(["ok", late])
        except ckptproto.CheckpointExistsError:
            outcomes.append(["exists", late])
        except Exception as exc:
            outcomes.append([f"{type(exc).__name__}: {exc}", late])
    return {"outcomes": outcomes}


def overwrite_loop(cmd: dict[str, Any]) -> dict[str, Any]:
    saves = 0
    while time.time() < cmd["deadline"]:
        saves += 1
        ckptproto.save(state(saves), cmd["path"], overwrite=True)
    return {"saves": saves}


def retain_loop(cmd: dict[str, Any]) -> dict[str, Any]:
    root = Path(cmd["dir"])
    step = 0
    while time.time() < cmd["deadline"]:
        step += 1
        ckptproto.save(state(step), root / f"step_{step}")
        for name in os.listdir(root):
            m = STEP_DIR.fullmatch(name)
            if m and int(m.group(1)) < step:
                commit.discard(root / name)
    return {"saves": step}


def _newest(root: Path) -> Path | None:
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := STEP_DIR.fullmatch(name))]
    return root / f"step_{max(steps)}" if steps else None


def _read(kind: str, path: Path) -> int:
    """Read ``path`` one way; the step it holds (after checking its tensor is that step's)."""
    if kind == "verify":
        return ckptproto.verify(path).step or 0
    if kind == "load_into":
        loaded: dict[str, Any] = {"w": np.zeros(N, dtype=np.float32), "trainer": {"global_step": -1}}
        ckptproto.load_into(path, loaded)
    else:
        loaded = ckptproto.load(path, mmap=kind == "mmap")
    step = int(loaded["trainer"]["global_step"])
    if not np.array_equal(np.asarray(loaded["w"]), np.full(N, step, dtype=np.float32)):
        raise AssertionError("mixed")
    return step


def read_loop(cmd: dict[str, Any]) -> dict[str, Any]:
    kinds = ["load", "mmap", "verify", "load_into"]
    tally: Counter[str] = Counter()
    samples: dict[str, str] = {}
    i = 0
    while time.time() < cmd["deadline"]:
        kind = kinds[i % len(kinds)]
        i += 1
        path = Path(cmd["path"]) if "path" in cmd else _newest(Path(cmd["dir"]))
        if path is None:
            continue
        try:
            _read(kind, path)
            tally[f"{kind} whole"] += 1
        except AssertionError:
            tally[f"{kind} MIXED"] += 1
        except ckptproto.CheckpointNotFoundError:
            tally[f"{kind} not found"] += 1
        except Exception as exc:
            name = f"{kind} {type(exc).__name__}"
            tally[name] += 1
            samples.setdefault(name, str(exc)[:300])
    return {"tally": dict(tally), "samples": samples}


def ns_writer(cmd: dict[str, Any]) -> dict[str, Any]:
    """Interactive: for each ``{"save": path, "step": n}`` line, save, pausing after the data
    file is written (prints ``{"paused": temp}``, waits for a line), then ``{"saved": path}``."""
    from ckptproto.io import writer

    real = writer.write_small_file

    def pause_before_manifest(directory: Path, name: str, data: bytes) -> None:
        print(json.dumps({"paused": str(directory), "pid": os.getpid()}), flush=True)
        sys.stdin.readline()
        real(directory, name, data)

    writer.write_small_file = pause_before_manifest  # type: ignore[assignment]
    for line in sys.stdin:
        job = json.loads(line)
        ckptproto.save(state(job["step"]), job["save"])
        print(json.dumps({"saved": job["save"]}), flush=True)
    return {"done": True}


def ns_sweeper(cmd: dict[str, Any]) -> dict[str, Any]:
    """Interactive: for each ``{"sweep": dir}`` line, ``remove_leftovers(dir)``; prints what
    it removed."""
    for line in sys.stdin:
        removed = ckptproto.remove_leftovers(json.loads(line)["sweep"])
        print(json.dumps({"removed": [str(p) for p in removed], "pid": os.getpid()}), flush=True)
    return {"done": True}


def main() -> None:
    cmd = json.loads(sys.argv[1])
    if cmd.get("fallback"):
        commit._exchange = lambda a, b: False  # type: ignore[assignment]
        commit._rename_noreplace = lambda a, b: False  # type: ignore[assignment]
    role = {
        "race_save": race_save,
        "overwrite_loop": overwrite_loop,
        "retain_loop": retain_loop,
        "ns_writer": ns_writer,
        "ns_sweeper": ns_sweeper,
    }
    result = role.get(cmd["role"], read_loop)(cmd)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
