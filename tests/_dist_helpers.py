"""Running a test scenario on real torch.distributed ranks (gloo over 127.0.0.1, one spawned
process per rank). A scenario is a module-level function ``fn(rank, world_size, tmp, *args)``
that asserts inside the rank; it returns a JSON-able result, or ``{"teardown": False}`` when
the group is broken (a rank was killed) and the rank must exit without a final barrier."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    tmp: str,
    args: tuple[Any, ...],
    backend: str = "gloo",
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(tmp) / f"result-{rank}.json"
    teardown = True
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=60),
        )
        result = fn(rank, world_size, Path(tmp), *args)
        if isinstance(result, dict) and result.get("teardown") is False:
            teardown = False
        out.write_text(json.dumps({"ok": True, "result": result}))
    except BaseException:
        teardown = False
        out.write_text(json.dumps({"ok": False, "error": traceback.format_exc()}))
    if teardown:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)


_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp", "ckptproto"]


def _context() -> Any:
    """A forkserver: torch is imported once, in a process that never ran a torch op (so no
    OpenMP threads exist to be broken by fork), and every rank forks from it; starting ranks
    as fresh interpreters (spawn) costs seconds each on a busy 2-core machine."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    tmp: Path,
    *args: Any,
    timeout: float = 150,
    killed: frozenset[int] = frozenset(),
    backend: str = "gloo",
) -> dict[int, Any]:
    """Run ``fn`` on ``world_size`` ranks; returns each surviving rank's result. Fails with every
    rank's traceback if a rank raised, hung past ``timeout`` or died (unless listed in ``killed``)."""
    ctx = _context()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, str(tmp), args, backend), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    problems, results = [], {}
    for r in range(world_size):
        path = tmp / f"result-{r}.json"
        if r in killed:
            assert not path.exists(), f"rank {r} was meant to be killed but finished"
            continue
        if r in hung:
            problems.append(f"rank {r}: still running after {timeout} s")
        elif not path.exists():
            problems.append(f"rank {r}: exited with code {procs[r].exitcode} and no result")
        else:
            doc = json.loads(path.read_text())
            if doc["ok"]:
                results[r] = doc["result"]
            else:
                problems.append(f"rank {r}:\n{doc['error']}")
        path.unlink(missing_ok=True)
    assert not problems, "\n".join(problems)
    return results
