"""A Hugging Face ``transformers.Trainer`` with a tiny GPT-2 (built from a config in code, no
download) and its conformance adapter.

The trainer object the suite drives is an :class:`HFRun`: ``train(steps)`` runs
``Trainer.train(resume_from_checkpoint=...)`` from the run's latest checkpoint directory
until ``global_step + steps`` and writes a new one (HF's own format: ``model.safetensors``,
``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``). Its
``state_dict()`` reads that directory into one dict; ``load_state_dict`` writes a directory
the next ``train`` resumes from.

What a Hugging Face user must add to pass the suite:

* a fixed ``max_steps`` for the whole run, with training stopped early by a callback: the
  cosine/linear schedule is built from ``max_steps``, so a run resumed with another
  ``max_steps`` follows another LR curve;
* a key check before resuming: ``Trainer`` hands ``optimizer.pt`` and ``scheduler.pt`` to
  ``torch.optim``'s ``load_state_dict``, which accepts a state missing a parameter's moments;
* the run's ``TrainingArguments.seed`` in the checkpoint, and the same seed when resuming:
  ``Trainer`` does not save it, and it decides the data order (a resume with another seed
  trains on other batches);
* nothing for the RNG and the data position: ``Trainer`` saves ``rng_state.pth`` and skips
  the batches of the epoch already seen.

::

    $ ckptproto conformance examples.adapters.hf_trainer:HFAdapter
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.utils import logging as hf_logging

from examples.adapters.structure import check_adamw_state, check_structure

N_SAMPLES, SEQ, BATCH, VOCAB = 24, 8, 4, 32
STEPS_PER_EPOCH = N_SAMPLES // BATCH
MAX_STEPS = 64  # the whole run's length, fixed: the LR schedule is built from it

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", module="transformers")


class TokenDataset(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        self.x = torch.randint(VOCAB, (N_SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


class StopAt(TrainerCallback):
    """Stops training at ``step`` without changing max_steps (nor the LR schedule)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


FILES = ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


class HFRun:
    """One training run, Stateful through its latest HF checkpoint directory."""

    checks_keys = True  # load_state_dict refuses a state of another structure

    def __init__(self, seed: int) -> None:
        set_seed(seed)
        self.seed = seed
        self.model = tiny_gpt2()
        self.root = Path(tempfile.mkdtemp(prefix="ckptproto-hf-"))
        self.count = 0
        trainer = self._trainer(0)
        trainer.create_optimizer_and_scheduler(num_training_steps=MAX_STEPS)
        # the state train() would record, for the checkpoint of the untrained run
        trainer.state.train_batch_size, trainer.state.max_steps, trainer.state.epoch = BATCH, MAX_STEPS, 0.0
        self.checkpoint = self._save(trainer)

    def __del__(self) -> None:
        shutil.rmtree(getattr(self, "root", ""), ignore_errors=True)

    def _trainer(self, stop_at: int) -> Trainer:
        self.count += 1
        args = TrainingArguments(
            output_dir=str(self.root / f"out-{self.count}"),
            max_steps=MAX_STEPS,
            per_device_train_batch_size=BATCH,
            learning_rate=1e-2,
            lr_scheduler_type="cosine",
            warmup_steps=2,
            seed=self.seed,
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=self.model, args=args, train_dataset=TokenDataset(), callbacks=[StopAt(stop_at)]
        )
        trainer.remove_callback(PrinterCallback)  # no metrics line per train()
        return trainer

    def _save(self, trainer: Trainer) -> Path:
        trainer._save_checkpoint(trainer.model, None)
        (out,) = Path(trainer.args.output_dir).glob("checkpoint-*")
        return out

    @property
    def global_step(self) -> int:
        return int(json.loads((self.checkpoint / "trainer_state.json").read_text())["global_step"])

    def train(self, steps: int) -> None:
        trainer = self._trainer(self.global_step + steps)
        trainer.train(resume_from_checkpoint=str(self.checkpoint))
        self.checkpoint = self._save(trainer)

    def state_dict(self) -> dict[str, Any]:
        ckpt = self.checkpoint
        trainer_state = json.loads((ckpt / "trainer_state.json").read_text())
        return {
            "trainer": {
                "global_step": int(trainer_state["global_step"]),
                "current_epoch": int(trainer_state["epoch"] or 0),
                "seed": self.seed,  # TrainingArguments.seed: HF does not save it
            },
            "models": {"model": load_file(ckpt / "model.safetensors")},
            "optimizers": {"optimizer": torch.load(ckpt / "optimizer.pt", weights_only=True)},
            "schedulers": {"scheduler": torch.load(ckpt / "scheduler.pt", weights_only=True)},
            # HF's own file: python/numpy/torch RNG states (numpy's legacy tuple needs pickle)
            "rng": torch.load(ckpt / "rng_state.pth", weights_only=False),
            "trainer_state": (ckpt / "trainer_state.json").read_text(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.checks_keys:
            check_structure(self.state_dict(), state, fresh=("optimizer.state",))
            check_adamw_state(state["optimizers"]["optimizer"], state["trainer"]["global_step"] > 0)
        self.count += 1
        out = self.root / f"loaded-{self.count}"
        shutil.copytree(self.checkpoint, out, ignore=shutil.ignore_patterns(*FILES))
        save_file(dict(state["models"]["model"]), out / "model.safetensors", metadata={"format": "pt"})
        torch.save(state["optimizers"]["optimizer"], out / "optimizer.pt")
        torch.save(state["schedulers"]["scheduler"], out / "scheduler.pt")
        torch.save(dict(state["rng"]), out / "rng_state.pth")
        (out / "trainer_state.json").write_text(state["trainer_state"])
        # What the next train() restores; done now so that the fingerprint shows it.
        missing, unexpected = self.model.load_state_dict(state["models"]["model"], strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding
            raise KeyError(f"model state does not fit: missing {missing}, unexpected {unexpected}")
        self.seed = state["trainer"]["seed"]
        self.checkpoint = out


class HFAdapter:
    """Conformance adapter for :class:`HFRun`."""

    steps_per_epoch = STEPS_PER_EPOCH
    resume_steps = (3, 4)  # crosses the end of warmup (2) and the epoch boundary at 6
    check_budget_s = 60.0
    run_class: type[HFRun] = HFRun

    def create(self, seed: int) -> HFRun:
        return self.run_class(seed)

    def train(self, trainer: HFRun, steps: int) -> None:
        trainer.train(steps)

    def fingerprint(self, trainer: HFRun) -> dict[str, Any]:
        scheduler = torch.load(trainer.checkpoint / "scheduler.pt", weights_only=True)
        return {
            "global_step": trainer.global_step,
            "lr": scheduler["_last_lr"][0],
            "rng": torch.get_rng_state(),
            "params": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        }
