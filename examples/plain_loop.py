"""A plain PyTorch loop with ckptproto's checkpoint callback: no trainer framework.

Run it twice: the second run resumes where the first stopped::

    python examples/plain_loop.py /tmp/plain-ckpt 7     # stops after 7 steps
    python examples/plain_loop.py /tmp/plain-ckpt       # resumes at step 7, finishes
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from ckptproto import CallbackCollection, CheckpointCallback, CheckpointParameters, TrainState

EPOCHS = 2
TOTAL_STEPS = 16  # 32 samples / batch 4 * 2 epochs


def train(root: str | Path, steps_limit: int | None = None) -> int:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.randn(32, 9, generator=torch.Generator().manual_seed(1))
    loader = StatefulDataLoader(data, batch_size=4)

    # 1. The state to checkpoint, and the callbacks.
    state = TrainState(
        models={"model": model}, optimizers={"optimizer": optimizer}, dataloaders={"train": loader}
    )
    callbacks = CallbackCollection(
        [CheckpointCallback(CheckpointParameters(root_dir=root, save_every_n_steps=5, save_every_n_epochs=1))]
    )
    state.callbacks = callbacks  # callback state (kept checkpoints) is saved with the rest
    callbacks.bind(state)

    # 2. The loop, calling the hooks.
    callbacks.pre_fit()  # resumes from the latest checkpoint, if any
    try:
        while state.current_epoch < EPOCHS:
            callbacks.pre_train_epoch()
            for batch_idx, batch in enumerate(loader):
                loss = torch.nn.functional.mse_loss(model(batch[:, :8]), batch[:, 8:])
                optimizer.zero_grad()
                loss.backward()
                callbacks.pre_optimizer_step()
                optimizer.step()
                state.global_step += 1
                callbacks.post_train_step({"loss": loss.item()}, batch_idx)
                if callbacks.should_stop or state.global_step == steps_limit:
                    callbacks.post_fit()
                    return state.global_step
            state.current_epoch += 1
            callbacks.post_train_epoch()
    except BaseException as exc:
        callbacks.on_exception(exc)
        raise
    callbacks.post_fit()
    return state.global_step


if __name__ == "__main__":
    limit = int(sys.argv[2]) if len(sys.argv) > 2 else None
    print(f"stopped at step {train(sys.argv[1], limit)}")
