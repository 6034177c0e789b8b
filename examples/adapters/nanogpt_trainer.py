"""A nanoGPT-style training loop and its conformance adapter.

What it has, as nanoGPT's ``train.py`` does: a tiny GPT with tied embedding / LM-head
weights and dropout, AdamW with two parameter groups (decay / no decay), a warmup-cosine
learning rate computed from ``iter_num`` and written into the groups every iteration,
gradient accumulation over ``GRAD_ACCUM`` micro-steps, a ``GradScaler``, gradient clipping,
and batches drawn from the global torch RNG (``torch.randint``). On top, as common forks do:
an EMA of the weights, token dropout drawn from numpy's global RNG and a random crop offset
from Python's ``random``.

What a nanoGPT user must add to pass the suite (all here, in ``state_dict()``):

* the three global RNG states (torch, numpy, random): the next batch, dropout masks and
  augmentations are drawn from them;
* ``scaler.state_dict()`` and the EMA's ``state_dict()`` (nanoGPT saves neither);
* ``iter_num`` (the LR is computed from it) and, for saves inside an accumulation window,
  ``micro_step`` and the accumulated gradients;
* a key check in ``load_state_dict``: ``torch.optim``'s own loading accepts a state missing a
  parameter's moments and silently restarts them.

::

    $ ckptproto conformance examples.adapters.nanogpt_trainer:NanoGPTAdapter
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

VOCAB, BLOCK, EMBD, BATCH = 16, 8, 16, 4
GRAD_ACCUM = 2
WARMUP_ITERS, LR_DECAY_ITERS, LEARNING_RATE, MIN_LR = 3, 12, 6e-3, 6e-4
GRAD_CLIP = 1.0
TOKEN_DROPOUT = 0.1


def get_lr(it: int) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to MIN_LR, then MIN_LR."""
    if it < WARMUP_ITERS:
        return LEARNING_RATE * (it + 1) / (WARMUP_ITERS + 1)
    if it > LR_DECAY_ITERS:
        return MIN_LR
    ratio = (it - WARMUP_ITERS) / (LR_DECAY_ITERS - WARMUP_ITERS)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LEARNING_RATE - MIN_LR)


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, EMBD)
        self.wpe = nn.Embedding(BLOCK, EMBD)
        self.drop = nn.Dropout(0.1)
        self.ln = nn.LayerNorm(EMBD)
        self.fc = nn.Linear(EMBD, 4 * EMBD)
        self.proj = nn.Linear(4 * EMBD, EMBD)
        self.ln_f = nn.LayerNorm(EMBD)
        self.lm_head = nn.Linear(EMBD, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as nanoGPT

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
        x = x + self.proj(F.gelu(self.fc(self.ln(x))))
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, VOCAB), targets.reshape(-1))


def _data() -> torch.Tensor:
    return torch.randint(VOCAB, (256,), generator=torch.Generator().manual_seed(0))


class NanoGPTTrainer:
    """The loop's state, one optimizer step per ``GRAD_ACCUM`` micro-steps."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)  # nanoGPT: torch.manual_seed(1337 + seed_offset)
        np.random.seed(seed)
        random.seed(seed)
        self.data = _data()
        self.model = TinyGPT()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LEARNING_RATE,
            betas=(0.9, 0.95),
        )
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        self.iter_num = 0
        self.micro_step = 0
        self.epoch = 0  # nanoGPT has none; the suite's metadata check wants the key
        self.last_loss = float("nan")

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(self.data) - BLOCK - 1, (BATCH,))  # the global RNG, as nanoGPT
        x = torch.stack([self.data[i : i + BLOCK] for i in ix])
        y = torch.stack([self.data[i + 1 : i + 1 + BLOCK] for i in ix])
        keep = torch.from_numpy(np.random.rand(BATCH, BLOCK) >= TOKEN_DROPOUT)  # numpy's global RNG
        shift = random.randrange(BLOCK)  # Python's global RNG
        return torch.roll(x * keep, shift, dims=1), torch.roll(y, shift, dims=1)

    def micro(self) -> None:
        """One micro-step; every GRAD_ACCUM-th also steps the optimizer."""
        x, y = self.get_batch()
        self.model.train()
        loss = self.model(x, y) / GRAD_ACCUM
        self.scaler.scale(loss).backward()
        self.micro_step += 1
        self.last_loss = float(loss.detach()) * GRAD_ACCUM
        if self.micro_step < GRAD_ACCUM:
            return
        lr = get_lr(self.iter_num)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update_parameters(self.model)
        self.micro_step = 0
        self.iter_num += 1

    # -- the Stateful protocol -----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        grads = {
            name: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for name, p in self.model.named_parameters()
        }
        return {
            "trainer": {
                "global_step": self.iter_num,
                "current_epoch": self.epoch,
                "micro_step": self.micro_step,
                "last_loss": self.last_loss,
            },
            "models": {"model": self.model.state_dict(), "ema": self.ema.state_dict()},
            "optimizers": {"optimizer": self.optimizer.state_dict()},
            "scaler": self.scaler.state_dict(),
            "accumulated_grads": grads,
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(legacy=False),
                "random": random.getstate(),
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_keys(self.state_dict(), state)
        self.apply_state(state)

    def apply_state(self, state: Mapping[str, Any]) -> None:
        self.model.load_state_dict(state["models"]["model"])
        self.ema.load_state_dict(state["models"]["ema"])
        # torch.optim keeps the given tensors: hand it a copy (the caller may load it again).
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizers"]["optimizer"]))
        self.scaler.load_state_dict(state["scaler"])
        trainer = state["trainer"]
        self.iter_num, self.epoch = trainer["global_step"], trainer["current_epoch"]
        self.micro_step, self.last_loss = trainer["micro_step"], trainer["last_loss"]
        for name, p in self.model.named_parameters():
            p.grad = state["accumulated_grads"][name].clone() if self.micro_step else None
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        version, inner, gauss = rng["random"]
        random.setstate((version, tuple(inner), gauss))


def _paths(tree: Any, prefix: str = "") -> set[str]:
    if not isinstance(tree, Mapping) or not tree:
        return {prefix}
    out: set[str] = set()
    for k, v in tree.items():
        out |= _paths(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def check_keys(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """Raise KeyError unless ``got`` has the keys of ``expected``: torch.optim's loading does
    not check them. A fresh optimizer has no per-parameter state yet; a trained one must have
    all of it (a state missing one parameter's moments would silently restart them)."""
    want, have = _paths(expected), _paths(got)
    opt = "optimizers.optimizer.state"
    fresh = {p for p in want ^ have if p.startswith(opt)}
    missing, unexpected = sorted(want - have - fresh), sorted(have - want - fresh)
    if missing or unexpected:
        raise KeyError(f"state does not fit this trainer: missing {missing}, unexpected {unexpected}")
    groups = got["optimizers"]["optimizer"]["param_groups"]
    n_params = sum(len(g["params"]) for g in groups)
    per_param = got["optimizers"]["optimizer"]["state"]
    if per_param and (
        set(per_param) != set(range(n_params))
        or any(set(v) != {"step", "exp_avg", "exp_avg_sq"} for v in per_param.values())
    ):
        raise KeyError("state does not fit this trainer: incomplete optimizer state")
    if got["trainer"]["global_step"] > 0 and not per_param:
        raise KeyError("state does not fit this trainer: a trained state without optimizer state")


class NanoGPTAdapter:
    """Conformance adapter: ``train`` counts optimizer steps (GRAD_ACCUM micro-steps each);
    ``train_micro`` lets the suite save inside an accumulation window."""

    resume_steps = (3, 4)  # crosses the end of warmup (3)
    resume_points = (WARMUP_ITERS,)
    micro_steps = GRAD_ACCUM
    trainer_class: type[NanoGPTTrainer] = NanoGPTTrainer

    def create(self, seed: int) -> NanoGPTTrainer:
        return self.trainer_class(seed)

    def train(self, trainer: NanoGPTTrainer, steps: int) -> None:
        for _ in range(steps * GRAD_ACCUM):
            trainer.micro()

    def train_micro(self, trainer: NanoGPTTrainer, micro_steps: int) -> None:
        for _ in range(micro_steps):
            trainer.micro()

    def fingerprint(self, trainer: NanoGPTTrainer) -> dict[str, Any]:
        return {
            "iter_num": trainer.iter_num,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "rng": torch.get_rng_state(),
            "last_loss": trainer.last_loss,
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        }
