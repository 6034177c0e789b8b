"""A numpy-only trainer and its conformance adapter: no torch anywhere, to show the protocol
and the suite are framework-agnostic.

A two-layer MLP with dropout, trained by AdamW with a step-decay learning rate, on a shuffled
in-memory dataset read in batches; every piece of state that decides what happens next lives
in ``state_dict()``::

    $ ckptproto conformance examples.adapters.numpy_trainer:NumpyAdapter
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

N_SAMPLES, N_FEATURES, HIDDEN, BATCH = 24, 4, 8, 4
STEPS_PER_EPOCH = N_SAMPLES // BATCH
DROPOUT = 0.25


def _dataset() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The data is fixed (it does not depend on the trainer's seed)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_SAMPLES, N_FEATURES))
    y = x @ rng.normal(size=(N_FEATURES, 1)) + 0.1 * rng.normal(size=(N_SAMPLES, 1))
    return x, y


class ShuffledLoader:
    """Batches of sample indices, reshuffled every epoch from (seed, epoch)."""

    def __init__(self, seed: int) -> None:
        self.seed, self.epoch, self.position = seed, 0, 0

    def order(self, epoch: int) -> np.ndarray[Any, Any]:
        return np.random.default_rng([self.seed, epoch]).permutation(N_SAMPLES)

    def peek(self) -> np.ndarray[Any, Any]:
        return self.order(self.epoch)[self.position : self.position + BATCH]

    def next(self) -> np.ndarray[Any, Any]:
        batch = self.peek()
        self.position += BATCH
        if self.position >= N_SAMPLES:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


class NumpyTrainer:
    """Everything is built from ``seed``; ``state_dict()`` holds every bit of progress."""

    base_lr, gamma, step_size = 0.05, 0.7, 3
    betas, eps, weight_decay = (0.9, 0.999), 1e-8, 0.01

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.x, self.y = _dataset()
        self.params = {
            "w1": rng.normal(size=(N_FEATURES, HIDDEN)) * 0.5,
            "b1": np.zeros(HIDDEN),
            "w2": rng.normal(size=(HIDDEN, 1)) * 0.5,
            "b2": np.zeros(1),
        }
        self.exp_avg = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.global_step = 0
        self.scheduler_step = 0
        self.loader = ShuffledLoader(seed)
        self.dropout_rng = np.random.default_rng([seed, 1])
        self.last_loss = float("nan")

    @property
    def lr(self) -> float:
        return self.base_lr * self.gamma ** (self.scheduler_step // self.step_size)

    def step(self) -> None:
        index = self.loader.next()
        x, y = self.x[index], self.y[index]
        p = self.params
        pre = x @ p["w1"] + p["b1"]
        keep = (self.dropout_rng.random(pre.shape) >= DROPOUT) / (1 - DROPOUT)
        hidden = np.maximum(pre, 0) * keep
        err = hidden @ p["w2"] + p["b2"] - y
        self.last_loss = float(np.mean(err**2))
        d_out = 2 * err / len(err)
        d_hidden = (d_out @ p["w2"].T) * keep * (pre > 0)
        grads = {"w2": hidden.T @ d_out, "b2": d_out.sum(0), "w1": x.T @ d_hidden, "b1": d_hidden.sum(0)}
        self.global_step += 1
        b1, b2 = self.betas
        for k, g in grads.items():
            self.exp_avg[k] *= b1
            self.exp_avg[k] += (1 - b1) * g
            self.exp_avg_sq[k] *= b2
            self.exp_avg_sq[k] += (1 - b2) * g * g
            m_hat = self.exp_avg[k] / (1 - b1**self.global_step)
            v_hat = self.exp_avg_sq[k] / (1 - b2**self.global_step)
            p[k] -= self.lr * (m_hat / (np.sqrt(v_hat) + self.eps) + self.weight_decay * p[k])
        self.scheduler_step += 1

    # -- the Stateful protocol -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # Arrays are the live parameters (as torch's state_dict() gives); every container and
        # plain value is fresh, so a snapshot never changes under a later step.
        return {
            "trainer": {
                "global_step": self.global_step,
                "current_epoch": self.loader.epoch,
                "last_loss": self.last_loss,
            },
            "models": {"mlp": dict(self.params)},
            "optimizers": {
                "adamw": {
                    "exp_avg": dict(self.exp_avg),
                    "exp_avg_sq": dict(self.exp_avg_sq),
                    "step": self.global_step,
                }
            },
            "schedulers": {"step_lr": {"last_step": self.scheduler_step}},
            "dataloaders": {"train": self.loader.state_dict()},
            "rng": {"dropout": self.dropout_rng.bit_generator.state},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Strict: the keys must be exactly those of ``state_dict()``; arrays are copied in."""
        check_same_keys(self.state_dict(), state)
        self.apply_state(state)

    def apply_state(self, state: Mapping[str, Any]) -> None:
        for target, source in (
            (self.params, state["models"]["mlp"]),
            (self.exp_avg, state["optimizers"]["adamw"]["exp_avg"]),
            (self.exp_avg_sq, state["optimizers"]["adamw"]["exp_avg_sq"]),
        ):
            for k in target:
                target[k][...] = source[k]  # copy: never keep the caller's buffers
        self.global_step = state["trainer"]["global_step"]
        self.last_loss = state["trainer"]["last_loss"]
        self.scheduler_step = state["schedulers"]["step_lr"]["last_step"]
        self.loader.load_state_dict(state["dataloaders"]["train"])
        self.dropout_rng.bit_generator.state = dict(state["rng"]["dropout"])


def key_paths(tree: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf under the string-keyed dicts of ``tree``."""
    if not isinstance(tree, Mapping):
        return {prefix}
    paths: set[str] = set()
    for k, v in tree.items():
        paths |= key_paths(v, f"{prefix}.{k}" if prefix else str(k))
    return paths


def check_same_keys(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """KeyError naming every missing and unexpected state path."""
    want, have = key_paths(expected), key_paths(got)
    missing, unexpected = sorted(want - have), sorted(have - want)
    if missing or unexpected:
        raise KeyError(f"state does not fit this trainer: missing {missing}, unexpected {unexpected}")


class NumpyAdapter:
    """The conformance adapter: three methods and two capability attributes."""

    steps_per_epoch = STEPS_PER_EPOCH
    resume_steps = (3, 4)  # 3 + 4 crosses the epoch boundary at 6

    trainer_class: type[NumpyTrainer] = NumpyTrainer

    def create(self, seed: int) -> NumpyTrainer:
        return self.trainer_class(seed)

    def train(self, trainer: NumpyTrainer, steps: int) -> None:
        for _ in range(steps):
            trainer.step()

    def fingerprint(self, trainer: NumpyTrainer) -> dict[str, Any]:
        # Most telling keys first: a report lists differences in this order.
        return {
            "global_step": trainer.global_step,
            "lr": trainer.lr,
            "next_batch": trainer.loader.peek(),
            "dropout_rng": trainer.dropout_rng.bit_generator.state,
            "last_loss": trainer.last_loss,
            "params": {k: v.copy() for k, v in trainer.params.items()},
        }
