"""A real Dream Trainer (dream-trainer 0.3.0) run on CPU ranks, for the integration tests.

``run(spec, world_size)`` starts one process per rank (gloo over 127.0.0.1, the environment
``torchrun`` would set) running ``python tests/_dream_trainer_harness.py SPEC``; each rank fits
a small ``DreamTrainer`` with either Dream Trainer's own checkpoint callback (``"dcp"``) or
ckptproto's (``"ckptproto"``) and writes its final state (``trainer.state_dict()``) to
``out/rank{r}.pt``. ``kill_at`` SIGKILLs every rank when ``global_step`` reaches it, after
the pending checkpoint is committed: an interrupted run, resumed by running the spec again.

Upstream defects of dream-trainer 0.3.0 worked around here, and only here (the integration
module needs none of them):
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def install_workarounds() -> None:
    """Make dream-trainer 0.3.0 importable and runnable on Python 3.11 and CPU."""
    import typing_extensions

    # Defect 1: dream-trainer declares requires-python >= 3.10 but imports `typing.override`
    # (new in Python 3.12) in callbacks/{benchmark,gc,profile,...}.py and
    # callbacks/checkpoint/partial.py; typing_extensions has the same decorator.
    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override  # type: ignore[attr-defined]
    # Defect 2: callbacks/checkpoint/export.py does `from registry import Module`, a module
    # that no declared dependency provides; importing dream_trainer.callbacks fails without it.
    if "registry" not in sys.modules:
        registry = types.ModuleType("registry")

        class Module:  # only used by ExportCallback's isinstance checks
            pass

        registry.Module = Module  # type: ignore[attr-defined]
        sys.modules["registry"] = registry


def cpu_device_workarounds() -> None:
    """Defect 3: DistributedWorld assumes an accelerator. get_device_info() falls back to
    "cuda" when none is found (the world then calls torch.cuda.set_device), and launch()
    builds the backend string f"{device}:{backend},cpu:{cpu_backend}", which on CPU is
    "cpu:gloo,cpu:gloo" and torch refuses as a duplicate; on a CPU-only machine we point
    it at torch.cpu and give init_process_group plain "gloo"."""
    import dream_trainer.trainer.world.distributed_world as world_mod
    import dream_trainer.utils.common as common
    import torch

    def cpu_device_info() -> tuple[str, Any]:
        return "cpu", torch.cpu

    common.get_device_info = cpu_device_info

    class _Dist(types.ModuleType):
        """torch.distributed as distributed_world.py sees it, with the CPU backend string fixed."""

        def __getattr__(self, name: str) -> Any:
            return getattr(torch.distributed, name)

        @staticmethod
        def init_process_group(*args: Any, backend: str | None = None, **kwargs: Any) -> Any:
            if backend == "cpu:gloo,cpu:gloo":
                backend = "gloo"
            return torch.distributed.init_process_group(*args, backend=backend, **kwargs)

        @staticmethod
        def barrier(group: Any = None, async_op: bool = False, device_ids: Any = None) -> Any:
            return torch.distributed.barrier(group=group, async_op=async_op)

    world_mod.dist = _Dist("torch.distributed")  # type: ignore[assignment]
    world_mod.get_device_info = cpu_device_info
    if not hasattr(torch.cpu, "set_device"):  # pragma: no cover - torch 2.13 has it
        torch.cpu.set_device = lambda device: None  # type: ignore[attr-defined]


def build_trainer(spec: dict[str, Any]) -> Any:
    import torch
    import torch.nn as nn
    from dream_trainer import DreamTrainer, DreamTrainerConfig
    from dream_trainer.callbacks import (
        AsyncCheckpointCallback,
        Callback,
        CallbackCollection,
        CheckpointCallback,
    )
    from dream_trainer.configs import (
        CheckpointParameters,
        DeviceParameters,
        TrainingParameters,
        WandbLoggingParameters,
    )
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    import ckptproto.integrations.dream_trainer as ours

    rank = int(os.environ.get("RANK", "0"))

    class StreamLoader:
        """An endless, deterministic stream of batches whose position is checkpointed (the
        ``dataloaders.train`` state), different on each rank (data parallel)."""

        batch_size = 4

        def __init__(self, seed: int) -> None:
            self.seed = seed
            self.position = 0

        def __iter__(self) -> Any:
            while True:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.position)
                self.position += 1
                x = torch.randn(self.batch_size, 8, generator=g)
                yield {"x": x, "y": x.sum(dim=1, keepdim=True).tanh()}

        def state_dict(self) -> dict[str, Any]:
            return {"position": self.position}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.position = int(state["position"])

    class Killer(Callback[DreamTrainer]):
        """Interrupts the run: SIGKILL on every rank at ``kill_at``, once the checkpoints
        saved so far are committed."""

        def __init__(self, kill_at: int | None) -> None:
            self.kill_at = kill_at

        def pre_train_step(self, batch: Any, batch_idx: int) -> None:
            if self.kill_at is None or self.trainer.global_step != self.kill_at:
                return
            for callback in self.trainer.callbacks.values():
                wait = getattr(callback, "_wait_save", None)
                if wait is not None:
                    wait()
            torch.distributed.barrier()
            os.kill(os.getpid(), signal.SIGKILL)

    class ToyTrainer(DreamTrainer):
        def configure_models(self) -> None:
            self.model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.0), nn.Linear(16, 1))

        def init_weights(self) -> None:
            g = torch.Generator().manual_seed(spec.get("seed", 7))
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

        def apply_replicate(self, dp_replicate_mesh: Any) -> None:
            from torch.distributed._composable.replicate import replicate

            replicate(self.model, device_mesh=dp_replicate_mesh)

        def configure_metrics(self) -> None:
            pass

        def configure_rngs(self) -> None:
            # per-rank streams unless the spec asks for one stream replicated on every rank
            seed = 100 + spec.get("seed", 0) + (rank if spec.get("rank_rngs", True) else 0)
            self.noise_rng = torch.Generator().manual_seed(seed)
            if spec.get("extra_rng"):  # a generator added since the checkpoint was written
                self.extra_rng = torch.Generator().manual_seed(5)

        def configure_optimizers(self) -> dict[Any, Any]:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05, weight_decay=0.01)
            return {self.model: self.optimizer}

        def configure_schedulers(self) -> dict[Any, Any]:
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.7)
            return {self.optimizer: self.scheduler}

        def configure_dataloaders(self) -> tuple[Any, Any]:
            return StreamLoader(1 + rank), StreamLoader(1000 + rank)

        def model_state_dict(self, **kwargs: Any) -> dict[str, Any]:
            return {"model": get_model_state_dict(self.model)}

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
            noise = torch.randn(batch["x"].shape, generator=self.noise_rng) * 0.01
            loss = ((self.model(batch["x"] + noise) - batch["y"]) ** 2).mean()
            self.last_loss = loss.detach()
            self.backward(loss)
            if not self.is_accumulating_gradients:
                self.step(self.optimizer)
            return {"train/loss": loss}

        def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
            loss = ((self.model(batch["x"]) - batch["y"]) ** 2).mean()
            return {"val/loss": loss}

    params = CheckpointParameters(
        enable=spec["storage"] is not None,
        root_dir=spec["root"],
        monitor=spec.get("monitor", "train/loss"),
        resume_mode=spec.get("resume_mode", "last"),
        keep_top_k=spec.get("keep_top_k", 3),
        strict_load=spec.get("strict_load", False),
        checkpoint_every_n_train_epochs=spec.get("every_train_epochs"),
        checkpoint_every_n_val_epochs=spec.get("every_val_epochs"),
        async_mode=spec.get("async_mode", "disabled"),
    )
    is_async = params.async_mode != "disabled"
    if spec["storage"] == "dcp":
        callbacks = [AsyncCheckpointCallback(params) if is_async else CheckpointCallback(params)]
    elif spec["storage"] == "ckptproto":
        callbacks = [ours.AsyncCheckpointCallback(params) if is_async else ours.CheckpointCallback(params)]
    else:  # no checkpoint callback: the conformance adapter saves the trainer itself
        callbacks = []
    config = DreamTrainerConfig(
        seed=11,
        project="proj",
        group="grp",
        experiment="exp",
        device_parameters=DeviceParameters(
            param_dtype=torch.float32, compile_model=False, async_tensor_parallel=False
        ),
        training_parameters=TrainingParameters(
            n_epochs=spec.get("epochs", 4),
            train_steps_per_epoch=spec.get("steps_per_epoch", 3),
            val_steps_per_epoch=2,
            val_every_n_steps=spec.get("val_every_n_steps"),
        ),
        logging_parameters=WandbLoggingParameters(enabled=False),
        callbacks=CallbackCollection([*callbacks, Killer(spec.get("kill_at"))]),
    )
    return ToyTrainer(config)


def main(spec_path: str) -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    install_workarounds()
    cpu_device_workarounds()
    import torch

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_path).read_text())
    trainer = build_trainer(spec)
    trainer.fit()
    state = trainer.state_dict()
    state["trainer"]["callbacks"] = {}  # compared separately: callback objects differ by design
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / f"rank{os.environ.get('RANK', '0')}.pt")
    trainer.world.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(spec: dict[str, Any], world_size: int = 1, *, killed: bool = False, timeout: float = 300) -> None:
    """Run ``spec`` on ``world_size`` ranks; with ``killed`` every rank must die by SIGKILL."""
    spec_path = Path(spec["out"]).with_suffix(".spec.json")
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        }
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            WANDB_MODE="disabled",
            PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]),
        )
        log = open(Path(spec["out"]).with_suffix(f".rank{rank}.log"), "w")  # noqa: SIM115
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, str(Path(__file__)), str(spec_path)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                ),
                log,
            )
        )
    failures = []
    for rank, (proc, log) in enumerate(procs):
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        log.close()
        expected = -signal.SIGKILL if killed else 0
        if code != expected:
            text = Path(log.name).read_text()[-4000:]
            failures.append(f"rank {rank} exited {code} (expected {expected}):\n{text}")
    if failures:
        raise AssertionError("\n".join(failures))


if __name__ == "__main__":
    main(sys.argv[1])
