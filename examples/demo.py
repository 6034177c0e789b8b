"""Demo: train with the async checkpoint callback, SIGKILL the process mid-run, start it again,
resume from the last good checkpoint, finish — and get exactly the weights of a run that was
never interrupted.

    python examples/demo.py [DIR]      # the whole story (about 10-20 s on 2 cores)
    python examples/demo.py train ROOT OUT [--slow] [--compare REF]   # one training process

The story's checkpoints stay in DIR (default ./demo-checkpoints, replaced by each run), so
the command line can be tried on them next: ``ckptproto ls demo-checkpoints/run``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

EPOCHS = 4
STEPS_PER_EPOCH = 25  # 200 samples, batch 8
KILL_AT_STEP = 57


def train(root: str, out: str, slow: bool, compare: str | None) -> bool:
    """One training process: resumes from ROOT if it holds checkpoints, saves the final
    weights to OUT. Prints ``step N`` after every step (the story kills it mid-run). With
    ``compare``, checks the final weights against those saved at that path."""
    import warnings

    warnings.filterwarnings("ignore", message=".*set_vital", category=UserWarning)  # torchdata 0.11 noise
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import RandomSampler

    import ckptproto
    from ckptproto import AsyncCheckpointCallback, CallbackCollection, CheckpointParameters, TrainState

    torch.set_num_threads(1)  # bitwise-reproducible CPU kernels
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 1)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * STEPS_PER_EPOCH)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(240, 16, generator=g)
    y = (x[:, :4].sum(dim=1, keepdim=True) - x[:, 4:8].prod(dim=1, keepdim=True)).tanh()
    train_idx, val_idx = list(range(200)), torch.arange(200, 240)
    # The sampler has its own generator (saved in the loader's state), so resuming mid-epoch
    # replays the exact remaining batches; dropout draws from torch's RNG (RNGState).
    loader = StatefulDataLoader(
        train_idx,
        batch_size=8,
        sampler=RandomSampler(train_idx, generator=torch.Generator().manual_seed(2)),
        generator=torch.Generator().manual_seed(3),  # seeds workers; keeps the global RNG out of it
    )

    callback = AsyncCheckpointCallback(
        CheckpointParameters(
            root_dir=root,
            monitor="val_loss",
            mode="min",
            keep_top_k=2,
            save_last=True,
            save_every_n_steps=10,
            resume_mode="latest",
        )
    )
    callbacks = CallbackCollection([callback])
    state = TrainState(
        models={"model": model},
        optimizers={"optimizer": optimizer},
        schedulers={"scheduler": scheduler},
        dataloaders={"train": loader},
        callbacks=callbacks,
    )
    callbacks.bind(state)
    callbacks.pre_fit()
    if callback.resumed_from is not None:
        print(
            f"resumed from {callback.resumed_from.name} (step {state.global_step}, epoch {state.current_epoch})"
        )
    else:
        print("no checkpoint found: starting fresh")
    try:
        while state.current_epoch < EPOCHS:
            model.train()
            for batch_idx, idx in enumerate(loader):
                loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                callbacks.pre_optimizer_step()  # a pending async save finishes staging here
                optimizer.step()
                scheduler.step()
                state.global_step += 1
                callbacks.post_train_step({"loss": loss.item()}, batch_idx)
                print(f"step {state.global_step} loss {loss.item():.6f}", flush=True)
                if slow:
                    time.sleep(0.02)
            state.current_epoch += 1
            callbacks.post_train_epoch()
            model.eval()
            with torch.no_grad():
                val_loss = torch.nn.functional.mse_loss(model(x[val_idx]), y[val_idx]).item()
            print(f"epoch {state.current_epoch}: val_loss {val_loss:.4f}", flush=True)
            callbacks.post_validation_epoch({"val_loss": val_loss})
    except BaseException as exc:
        callbacks.on_exception(exc)
        raise
    callbacks.post_fit()
    callback.close()
    ckptproto.save({"models": {"model": model}}, out, overwrite=True)
    print(f"finished at step {state.global_step}")
    if compare is None:
        return True
    reference = ckptproto.load(compare)["models"]["model"]
    mine = model.state_dict()
    same = reference.keys() == mine.keys() and all(torch.equal(reference[k], mine[k]) for k in mine)
    print(f"final weights == uninterrupted run's, bitwise: {same}")
    return same


def _child(root: Path, out: Path, *options: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, "train", str(root), str(out), *options],
        stdout=subprocess.PIPE,
        text=True,
    )


def _echo(line: str) -> None:
    if not line.startswith("step ") or int(line.split()[1]) % 10 == 0:
        print(f"    | {line}")


def _ls(root: Path) -> None:
    from ckptproto.cli import main as cli

    print(f"  $ ckptproto ls {root.name}")
    sys.stdout.flush()
    cli(["ls", str(root)])


def _shown(path: Path) -> str:
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _try_next(root: Path) -> None:
    import ckptproto

    newest = ckptproto.find_checkpoints(root)[0].path
    venv_cli = Path(sys.executable).parent / "ckptproto"  # the venv's script: not on PATH
    cli = _shown(venv_cli) if venv_cli.exists() else "ckptproto"
    print(f"5. The checkpoints stay in {_shown(root)}; try the command line on them:")
    for command in ("ls", "inspect", "verify"):
        print(f"  {cli} {command} {_shown(root if command == 'ls' else newest)}")


DEMO_NAMES = {"run", "reference", "final.ckpt", "reference.ckpt"}


def main(workdir: str = "demo-checkpoints") -> int:
    started = time.monotonic()
    tmp = Path(workdir).absolute()
    if tmp.exists():
        if not {p.name for p in tmp.iterdir()} <= DEMO_NAMES:
            print(f"{tmp} holds files that are not a previous demo's; pass another directory")
            return 2
        shutil.rmtree(tmp)  # the previous demo's
    tmp.mkdir(parents=True)
    root, out, ref_out = tmp / "run", tmp / "final.ckpt", tmp / "reference.ckpt"
    # The same training, never interrupted, runs alongside for the comparison at the end.
    reference = _child(tmp / "reference", ref_out)

    print(f"1. Train {EPOCHS} epochs with AsyncCheckpointCallback: save every 10 steps, keep the 2 best")
    print("   by val_loss plus the last; resume_mode='latest'")
    child = _child(root, out, "--slow")
    assert child.stdout is not None
    for raw in child.stdout:
        line = raw.rstrip()
        _echo(line)
        if line.startswith(f"step {KILL_AT_STEP} "):
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    print(f"2. SIGKILL at step {KILL_AT_STEP} (exit status {child.returncode}): no clean shutdown")
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith("."))
    for name in leftovers:
        print(f"   leftover of the save in flight (hidden, never read as a checkpoint): {name}")
    _ls(root)

    if reference.wait() != 0:
        print("the reference run failed")
        return 1
    print("3. Run the same command again: it resumes from the last good checkpoint and finishes")
    child = _child(root, out, "--compare", str(ref_out))
    assert child.stdout is not None
    for raw in child.stdout:
        _echo(raw.rstrip())
    status = child.wait()
    _ls(root)
    verdict = "OK: killed, resumed, and bitwise equal to the uninterrupted run" if status == 0 else "FAILED"
    print(f"4. {verdict} ({time.monotonic() - started:.1f} s)")
    if status == 0:
        _try_next(root)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "train":
        rest = sys.argv[4:]
        ok = train(
            sys.argv[2],
            sys.argv[3],
            slow="--slow" in rest,
            compare=rest[rest.index("--compare") + 1] if "--compare" in rest else None,
        )
        sys.exit(0 if ok else 1)
    else:
        sys.exit(main(*sys.argv[1:2]))
