"""Demo: train a tiny model, checkpoint it, restore into a fresh model, check it matches."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import ckptproto


def make(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=5, gamma=0.5)
    return model, optimizer, scheduler


def main() -> None:
    model, optimizer, scheduler = make(seed=0)
    data = torch.randn(64, 16)
    target = data.sum(dim=1, keepdim=True)
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(data), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    state = {
        "trainer": {"global_step": 20, "current_epoch": 0, "callbacks": {}},
        "models": {"model": model},
        "optimizers": {"optimizer": optimizer},
        "schedulers": {"scheduler": scheduler},
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint_step_20"
        info = ckptproto.save(state, path, metadata={"metrics": {"loss": loss.item()}})
        print(f"saved step {info.step} (loss {loss.item():.4f}) to {path.name}: {info.nbytes} bytes")
        for f in sorted(path.iterdir()):
            print(f"  {f.name:32} {f.stat().st_size:>8} bytes")

        model2, optimizer2, scheduler2 = make(seed=1)
        ckptproto.load_into(
            path,
            {
                "trainer": {"global_step": 0, "current_epoch": 0, "callbacks": {}},
                "models": {"model": model2},
                "optimizers": {"optimizer": optimizer2},
                "schedulers": {"scheduler": scheduler2},
            },
        )
        same_weights = all(
            torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True)
        )
        same_lr = scheduler.get_last_lr() == scheduler2.get_last_lr()
        next_loss = [torch.nn.functional.mse_loss(m(data), target).item() for m in (model, model2)]
        print(
            f"restored into a fresh model: weights equal={same_weights}, lr equal={same_lr}, "
            f"next loss {next_loss[0]:.6f} vs {next_loss[1]:.6f}"
        )
        ckptproto.verify(path)
        print("verify: all checksums OK")
        if not (same_weights and same_lr and next_loss[0] == next_loss[1]):
            raise SystemExit("restored state differs")


if __name__ == "__main__":
    main()
