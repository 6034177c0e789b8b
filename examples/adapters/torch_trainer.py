"""A plain PyTorch trainer and its conformance adapter: the worked example of
``docs/conformance.md``.

Model with dropout, AdamW, a StepLR scheduler, a ``DataLoader`` reshuffling every epoch through
a Stateful sampler, and the torch RNG, all in one ``state_dict()`` in the canonical layout::

    $ ckptproto conformance examples.adapters.torch_trainer:TorchAdapter
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

N_SAMPLES, N_FEATURES, HIDDEN, BATCH = 24, 4, 8, 4
STEPS_PER_EPOCH = N_SAMPLES // BATCH


def _dataset() -> TensorDataset:
    """Fixed data (independent of the trainer's seed)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, N_FEATURES, generator=g)
    y = x @ torch.randn(N_FEATURES, 1, generator=g) + 0.1 * torch.randn(N_SAMPLES, 1, generator=g)
    return TensorDataset(x, y)


class ResumableShuffleSampler(Sampler[int]):
    """Yields a fresh permutation every epoch and records how far it got, so a restored
    sampler continues mid-epoch with the same order. (torchdata 0.11's StatefulDataLoader with
    shuffle=True was tried first: resumed mid-epoch, it gave the *next* epoch a different order
    than an uninterrupted run -- check 4 caught it.)"""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.position = n, seed, 0, 0

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self) -> Iterator[int]:
        order = self.order(self.epoch)
        while self.position < self.n:
            self.position += 1
            yield int(order[self.position - 1])
        self.epoch, self.position = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.n

    def peek(self, count: int) -> torch.Tensor:
        """The next ``count`` indices, without moving."""
        epoch, position = (self.epoch + 1, 0) if self.position >= self.n else (self.epoch, self.position)
        return self.order(epoch)[position : position + count]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


class TorchTrainer:
    """A minimal training loop whose ``state_dict()`` captures everything that decides what
    happens next: weights, optimizer moments, scheduler position, where the data loader is in
    its shuffled epoch (and its generator), the RNG that drives dropout, and the counters."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(
            torch.nn.Linear(N_FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.25),
            torch.nn.Linear(HIDDEN, 1),
        )
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05, weight_decay=0.01)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=3, gamma=0.7)
        self.sampler = ResumableShuffleSampler(N_SAMPLES, seed)
        self.loader = DataLoader(_dataset(), batch_size=BATCH, sampler=self.sampler)
        self._batches: Iterator[Any] | None = None
        # torch.nn.Dropout draws from the global CPU generator: it is part of the state.
        self.rng_state = torch.get_rng_state()
        self.global_step = 0
        self.current_epoch = 0
        self.last_loss = float("nan")

    def _next_batch(self) -> Any:
        if self._batches is None:
            self._batches = iter(self.loader)
        try:
            return next(self._batches)
        except StopIteration:
            self.current_epoch += 1
            self._batches = iter(self.loader)
            return next(self._batches)

    def step(self) -> None:
        x, y = self._next_batch()
        torch.set_rng_state(self.rng_state)  # other trainers in this process share the global RNG
        self.model.train()
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.rng_state = torch.get_rng_state()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        self.last_loss = loss.item()

    # -- the Stateful protocol -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "trainer": {
                "global_step": self.global_step,
                "current_epoch": self.current_epoch,
                "last_loss": self.last_loss,
            },
            "models": {"model": self.model.state_dict()},
            "optimizers": {"optimizer": self.optimizer.state_dict()},
            "schedulers": {"scheduler": self.scheduler.state_dict()},
            "dataloaders": {"train": self.sampler.state_dict()},
            "rng": {"torch": self.rng_state.clone()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # torch's optimizer and scheduler load_state_dict accept anything; check the keys here.
        _check_keys(self.state_dict(), state)
        self.apply_state(state)

    def apply_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["models"]["model"])
        # Optimizer.load_state_dict keeps the given tensors (no copy on CPU): training would then
        # write into the caller's dict -- check 8 caught that. Hand it a copy.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizers"]["optimizer"]))
        self.scheduler.load_state_dict(state["schedulers"]["scheduler"])
        self.sampler.load_state_dict(state["dataloaders"]["train"])
        self._batches = None  # the next iter() resumes where the saved loader was
        self.rng_state = state["rng"]["torch"].clone()
        trainer = state["trainer"]
        self.global_step, self.current_epoch = trainer["global_step"], trainer["current_epoch"]
        self.last_loss = trainer["last_loss"]


def _paths(tree: Any, prefix: str = "") -> set[str]:
    if not isinstance(tree, Mapping):
        return {prefix}
    out: set[str] = set()
    for k, v in tree.items():
        out |= _paths(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def _check_keys(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    want, have = _paths(expected), _paths(got)
    # The optimizer's per-parameter state appears at the first step: compare the sections
    # that exist on both sides of a fresh trainer, and every key elsewhere.
    fresh = {p for p in want ^ have if p.startswith("optimizers.optimizer.state.")}
    missing, unexpected = sorted(want - have - fresh), sorted(have - want - fresh)
    if missing or unexpected:
        raise KeyError(f"state does not fit this trainer: missing {missing}, unexpected {unexpected}")
    # ...but once trained, every parameter has its full AdamW state: a state missing one would
    # silently restart that parameter's moments (check 7 caught it).
    optimizer_state = got["optimizers"]["optimizer"]["state"]
    if got["trainer"]["global_step"] > 0:
        n_params = len(got["optimizers"]["optimizer"]["param_groups"][0]["params"])
        per_param = {"step", "exp_avg", "exp_avg_sq"}
        if set(optimizer_state) != set(range(n_params)) or any(
            set(v) != per_param for v in optimizer_state.values()
        ):
            raise KeyError("state does not fit this trainer: incomplete optimizer state")


class TorchAdapter:
    """The conformance adapter for TorchTrainer."""

    steps_per_epoch = STEPS_PER_EPOCH
    resume_steps = (3, 4)  # crosses the epoch boundary at step 6

    def create(self, seed: int) -> TorchTrainer:
        return TorchTrainer(seed)

    def train(self, trainer: TorchTrainer, steps: int) -> None:
        for _ in range(steps):
            trainer.step()

    def fingerprint(self, trainer: TorchTrainer) -> dict[str, Any]:
        return {
            "global_step": trainer.global_step,
            "current_epoch": trainer.current_epoch,
            "lr": trainer.scheduler.get_last_lr()[0],
            "next_batch": trainer.sampler.peek(BATCH),
            "rng": trainer.rng_state.clone(),
            "last_loss": trainer.last_loss,
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        }
