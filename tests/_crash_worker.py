"""Fork server for the crash tests: imports ckptproto once, then forks one child per trial
that saves checkpoints in a loop until it is SIGKILLed (by the test, after a random delay, or
by itself at an injected kill point).

Protocol (one JSON object per line): the test writes a trial to stdin; the server forks, writes
``{"pid": ...}``, waits for the child and writes ``{"status": <wait status>}``. A trial::

    {"dir": "/tmp/x/lane", "progress": "/tmp/x/lane.progress", "mode": "sync" | "async" |
     "overwrite" | "retain", "kill_at": null | ["writer.write_file", "before", 2],
     "no_exchange": false, "seed": 7, "keep": 2}

The child appends ``"<step>\\n"`` to ``progress`` each time a save has returned (committed),
and ``"retained <step>\\n"`` once retention deleted the old ones after it. It resumes from the
newest committed checkpoint in ``dir`` (what a restarted training run does).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np

import ckptproto
from ckptproto.io import commit, writer

STEP_RE = re.compile(r"step_(\d+)")
CALLBACK_RE = re.compile(r"checkpoint_step_(\d+)")


def state_for(step: int, rng_seed: int) -> dict[str, Any]:
    """The deterministic state saved at ``step`` (the test recomputes it to compare)."""
    n = 16 + (rng_seed * 7919 + step * 104729) % 100_000  # up to ~400 KB: kills land mid-write
    return {
        "models": {"model": {"w": np.full(n, step, dtype=np.float32), "b": np.arange(step % 13)}},
        "trainer": {"global_step": step, "note": f"step {step}"},
    }


def committed_steps(directory: Path, pattern: re.Pattern[str] = STEP_RE) -> list[int]:
    """Steps of the committed checkpoints ``step_N`` in ``directory`` (what resume sees)."""
    steps = []
    for entry in os.scandir(directory):
        m = pattern.fullmatch(entry.name)
        if m and commit.is_committed(Path(entry.path)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def _install_kill_point(target: str, when: str, nth: int) -> None:
    """Wrap ``module.function`` so the ``nth`` call SIGKILLs this process before/after it runs."""
    modules = {"writer": writer, "commit": commit, "os": os, "shutil": shutil}
    mod_name, _, fn_name = target.partition(".")
    module = modules[mod_name]
    original = getattr(module, fn_name)
    calls = [0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        hit = calls[0] == nth
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, fn_name, wrapper)


def _report(fd: int, text: str) -> None:
    os.write(fd, text.encode())  # O_APPEND: one line per write, survives SIGKILL (page cache)


def run_callback(directory: Path, progress: int, keep: int) -> None:
    """A training loop with ``CheckpointCallback`` (save every step, keep the newest ``keep``,
    resume from the latest): reports ``resume <step>`` once, then each step whose save and
    retention returned. The model's weight holds the step it was saved at."""
    import torch

    from ckptproto import CallbackCollection, CheckpointCallback, CheckpointParameters, TrainState

    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 4)
    callback = CheckpointCallback(
        CheckpointParameters(root_dir=directory, keep_top_k=keep, save_last=False, save_every_n_steps=1)
    )
    trainer = TrainState(models={"model": model}, callbacks=CallbackCollection([callback]), rng=False)
    trainer.callbacks.bind(trainer)
    trainer.callbacks.pre_fit()
    _report(progress, f"resume {trainer.global_step}\n")
    for batch in range(10_000):
        trainer.global_step += 1
        with torch.no_grad():
            model.weight.fill_(float(trainer.global_step))
        trainer.callbacks.post_train_step({"loss": 0.0}, batch)
        _report(progress, f"{trainer.global_step}\n")


def run_child(trial: dict[str, Any]) -> None:
    directory = Path(trial["dir"])
    directory.mkdir(parents=True, exist_ok=True)
    mode, seed, keep = trial["mode"], trial["seed"], trial.get("keep", 2)
    if trial.get("no_exchange"):
        commit._exchange = lambda a, b: False  # type: ignore[assignment]  # the rename fallback
        commit._rename_noreplace = lambda a, b: False  # type: ignore[assignment]  # plain rename(2)
    if trial.get("kill_at"):
        _install_kill_point(*trial["kill_at"])
    progress = os.open(trial["progress"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    if mode == "callback":
        run_callback(directory, progress, keep)
        return
    steps = committed_steps(directory)
    if mode == "overwrite":
        latest = directory / "latest"
        step = ckptproto.read_info(latest).step + 1 if commit.is_committed(latest) else 0
    else:
        step = steps[-1] + 1 if steps else 0
    saver = ckptproto.AsyncSaver(max_pending=1) if mode == "async" else None
    for _ in range(10_000):  # the test kills us long before
        state = state_for(step, seed)
        if mode == "overwrite":
            ckptproto.save(state, directory / "latest", overwrite=True)
            _report(progress, f"{step}\n")
        elif saver is not None:
            fut = saver.save(state, directory / f"step_{step}")
            fut.add_done_callback(
                lambda f, s=step: _report(progress, f"{s}\n") if f.exception() is None else None
            )
        else:
            ckptproto.save(state, directory / f"step_{step}")
            _report(progress, f"{step}\n")
            if mode == "retain":
                # Retention as a policy does it: the new checkpoint is committed first, then
                # the oldest beyond ``keep`` are discarded (each one atomically hidden first).
                for old in committed_steps(directory)[:-keep]:
                    commit.discard(directory / f"step_{old}")
                _report(progress, f"retained {step}\n")
        step += 1
    if saver is not None:
        saver.close()


def serve() -> None:
    if "--torch" in sys.argv:  # import once here, not in every forked child
        import torch  # noqa: F401

        import ckptproto.policy  # noqa: F401
    for line in sys.stdin:
        trial = json.loads(line)
        random.seed(trial["seed"])
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                run_child(trial)
            except BaseException as exc:  # a failure the test must see, not a silent exit
                sys.stderr.write(f"crash worker child failed: {exc!r}\n")
                code = 3
            finally:
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)


if __name__ == "__main__":
    serve()
