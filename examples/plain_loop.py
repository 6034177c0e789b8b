"""A plain PyTorch loop checkpointed by ``ckptproto.CheckpointManager``: no trainer framework.

It saves every 5 steps and at each epoch end (the newest kept), resumes from the latest
checkpoint, and on SIGTERM saves and stops. Run it twice: the first run preempts itself (it
sends itself SIGTERM during step 7), so it saves checkpoint_step_7 and stops; the second
logs "resumed from .../checkpoint_step_7 (step 7, epoch 0)" and finishes at step 16::

    python examples/plain_loop.py /tmp/plain-ckpt 7     # preempted during step 7: saves, stops
    python examples/plain_loop.py /tmp/plain-ckpt       # resumes at step 7, finishes at 16
    ckptproto ls /tmp/plain-ckpt
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

import ckptproto

EPOCHS = 2
TOTAL_STEPS = 16  # 32 samples / batch 4 * 2 epochs


def train(root: str | Path, steps_limit: int | None = None) -> int:
    """Train to the end, or until a SIGTERM sent during step ``steps_limit``; returns the
    last step done."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.randn(32, 9, generator=torch.Generator().manual_seed(1))
    loader = StatefulDataLoader(data, batch_size=4)

    # The checkpointing glue: a manager, a `with`, its batches, and (optionally) the metrics.
    ckpt = ckptproto.CheckpointManager(
        root,
        models={"model": model},
        optimizers={"optimizer": optimizer},
        dataloaders={"train": loader},
        save_every_n_steps=5,
        save_every_n_epochs=1,
    )
    with ckpt:  # resumes from the latest checkpoint, if any; finishes pending saves at the end
        for batch in ckpt.batches(loader, epochs=EPOCHS):  # stops after a preemption save
            loss = torch.nn.functional.mse_loss(model(batch[:, :8]), batch[:, 8:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # an async save's staging completes before the weights change
            ckpt.log(loss=loss.item())
            if ckpt.global_step == steps_limit:  # simulate a preemption: the job gets SIGTERM
                os.kill(os.getpid(), signal.SIGTERM)
    return ckpt.global_step


if __name__ == "__main__":
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
    print(f"stopped at step {train(sys.argv[1], limit)}")
