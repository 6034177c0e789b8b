"""The seeded-bug corpus: real resume bugs planted in the reference trainers, and the script
that runs the conformance suite over them and over the correct trainers::

    $ python -m examples.adapters.corpus             # everything (~10 min on 2 cores)
    $ python -m examples.adapters.corpus --sample    # the CI sample (no Lightning)
    ...
    caught 25/25 bugs, failed 0/4 correct trainers

Each bug is one adapter (``examples.adapters.corpus:NanoScalerNotSaved``...) whose trainer
differs from a correct reference trainer by one classic mistake. A bug is *caught* when a
check fails; the line printed for it names the check and the cause that check reported.
Checks run cheapest first and a bug run stops at its first failing check (``--all-checks``
runs them all).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from examples.adapters.nanogpt_trainer import NanoGPTAdapter, NanoGPTTrainer, check_keys
from examples.adapters.torch_trainer import TorchAdapter, TorchTrainer, _check_keys

# -- nanoGPT-style loop ------------------------------------------------------------------------


def _without(state: dict[str, Any], *path: str) -> dict[str, Any]:
    node = state
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return state


class _NanoOmits(NanoGPTTrainer):
    """Leaves ``omit`` out of state_dict() and of what load_state_dict() restores."""

    omit: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        return _without(super().state_dict(), *self.omit)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_keys(self.state_dict(), state)
        # the current values stand in for what was not saved
        self.apply_state(_merge(NanoGPTTrainer.state_dict(self), state))


def _merge(base: dict[str, Any], incoming: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in incoming.items():
        out[k] = _merge(base[k], v) if isinstance(base.get(k), dict) and isinstance(v, Mapping) else v
    return out


class NanoScalerNotSavedTrainer(_NanoOmits):
    omit = ("scaler",)


class NanoEmaNotSavedTrainer(_NanoOmits):
    omit = ("models", "ema")


class NanoTorchRngNotSavedTrainer(_NanoOmits):
    omit = ("rng", "torch")


class NanoNumpyRngNotSavedTrainer(_NanoOmits):
    omit = ("rng", "numpy")


class NanoPythonRngNotSavedTrainer(_NanoOmits):
    omit = ("rng", "random")


class NanoDropsAccumulatedGradsTrainer(_NanoOmits):
    omit = ("accumulated_grads",)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for p in self.model.parameters():
            p.grad = None  # the accumulated gradients of the window are lost


class NanoMicroStepNotRestoredTrainer(NanoGPTTrainer):
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.micro_step = 0  # restarts the accumulation window


class NanoScalerNotLoadedTrainer(NanoGPTTrainer):
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        scaler = self.scaler.state_dict()
        super().load_state_dict(state)
        self.scaler.load_state_dict(scaler)  # saved, but the fresh scaler is kept


class NanoOptimizerNotLoadedTrainer(NanoGPTTrainer):
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fresh = self.optimizer.state_dict()
        super().load_state_dict(state)
        self.optimizer.load_state_dict(fresh)  # "weights are enough"


class NanoIterNumNotRestoredTrainer(NanoGPTTrainer):
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.iter_num = 0  # the LR schedule restarts its warmup


class NanoIterNumOffByOneTrainer(NanoGPTTrainer):
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.iter_num += 1  # "the saved step is done, continue with the next one"


class NanoExtraDrawOnLoadTrainer(NanoGPTTrainer):
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        torch.rand(1)  # e.g. a random run id drawn after the RNG was restored


class NanoStateDictDrawsTrainer(NanoGPTTrainer):
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["trainer"]["checkpoint_id"] = int(torch.randint(1 << 30, ()))  # consumes the RNG
        return state


class NanoLenientLoadTrainer(NanoGPTTrainer):
    """Relies on torch.optim's own loading, which does not check keys."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.apply_state(state)


_LR_SCALE: dict[str, float] = {}


class NanoCachedLrScaleTrainer(NanoGPTTrainer):
    """A per-run LR scale "computed once" into a module-level cache keyed by nothing: the
    first trainer of a process decides it for every later one."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        _LR_SCALE.setdefault("scale", 1.0 + (seed % 7) / 10)

    def micro(self) -> None:
        for group in self.optimizer.param_groups:
            group["weight_decay"] = 0.1 * _LR_SCALE["scale"] if group["weight_decay"] else 0.0
        super().micro()


# -- the plain PyTorch reference trainer ----------------------------------------------------------


class TorchSamplerEpochNotSavedTrainer(TorchTrainer):
    def state_dict(self) -> dict[str, Any]:
        return _without(super().state_dict(), "dataloaders", "train", "epoch")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_keys(self.state_dict(), state)
        self.apply_state(_merge(TorchTrainer.state_dict(self), state))  # keeps the current epoch


class TorchSchedulerNotLoadedTrainer(TorchTrainer):
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        fresh = self.scheduler.state_dict()
        super().load_state_dict(state)
        self.scheduler.load_state_dict(fresh)


class TorchDropoutRngNotRestoredTrainer(TorchTrainer):
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        rng = self.rng_state
        super().load_state_dict(state)
        self.rng_state = rng


class TorchStaleBatchIteratorTrainer(TorchTrainer):
    """Keeps the batch iterator it had before the load: the loaded sampler position is only
    used from the next epoch on."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        _check_keys(self.state_dict(), state)
        batches = self._batches
        super().load_state_dict(state)
        self._batches = batches if batches is not None else iter(self.loader)


# -- adapters ------------------------------------------------------------------------------------


def _nano(trainer: type[NanoGPTTrainer]) -> type[NanoGPTAdapter]:
    name = trainer.__name__.removesuffix("Trainer")
    return type(name, (NanoGPTAdapter,), {"trainer_class": trainer, "__module__": __name__})


def _torch(trainer: type[TorchTrainer]) -> type[TorchAdapter]:
    name = trainer.__name__.removesuffix("Trainer")

    def create(self: TorchAdapter, seed: int) -> TorchTrainer:
        return trainer(seed)

    return type(name, (TorchAdapter,), {"create": create, "__module__": __name__})


NanoScalerNotSaved = _nano(NanoScalerNotSavedTrainer)
NanoScalerNotLoaded = _nano(NanoScalerNotLoadedTrainer)
NanoEmaNotSaved = _nano(NanoEmaNotSavedTrainer)
NanoTorchRngNotSaved = _nano(NanoTorchRngNotSavedTrainer)
NanoNumpyRngNotSaved = _nano(NanoNumpyRngNotSavedTrainer)
NanoPythonRngNotSaved = _nano(NanoPythonRngNotSavedTrainer)
NanoDropsAccumulatedGrads = _nano(NanoDropsAccumulatedGradsTrainer)
NanoMicroStepNotRestored = _nano(NanoMicroStepNotRestoredTrainer)
NanoOptimizerNotLoaded = _nano(NanoOptimizerNotLoadedTrainer)
NanoIterNumNotRestored = _nano(NanoIterNumNotRestoredTrainer)
NanoIterNumOffByOne = _nano(NanoIterNumOffByOneTrainer)
NanoExtraDrawOnLoad = _nano(NanoExtraDrawOnLoadTrainer)
NanoStateDictDraws = _nano(NanoStateDictDrawsTrainer)
NanoLenientLoad = _nano(NanoLenientLoadTrainer)
NanoCachedLrScale = _nano(NanoCachedLrScaleTrainer)
TorchSamplerEpochNotSaved = _torch(TorchSamplerEpochNotSavedTrainer)
TorchSchedulerNotLoaded = _torch(TorchSchedulerNotLoadedTrainer)
TorchDropoutRngNotRestored = _torch(TorchDropoutRngNotRestoredTrainer)
TorchStaleBatchIterator = _torch(TorchStaleBatchIteratorTrainer)


@dataclass(frozen=True)
class Entry:
    spec: str
    what: str  # the bug, in words (empty for a correct trainer)
    sample: bool  # run in CI's sample


HERE = __name__
LIT = "examples.adapters.lightning_corpus"
HF = "examples.adapters.hf_corpus"

CORRECT: tuple[Entry, ...] = (
    Entry("examples.adapters.numpy_trainer:NumpyAdapter", "", True),
    Entry("examples.adapters.torch_trainer:TorchAdapter", "", True),
    Entry("examples.adapters.nanogpt_trainer:NanoGPTAdapter", "", True),
    Entry("examples.adapters.lightning_trainer:LightningAdapter", "", False),
    Entry("examples.adapters.hf_trainer:HFAdapter", "", False),
)

BUGS: tuple[Entry, ...] = (
    Entry(f"{HERE}:NanoScalerNotSaved", "GradScaler not saved", True),
    Entry(f"{HERE}:NanoScalerNotLoaded", "GradScaler saved but not loaded", False),
    Entry(f"{HERE}:NanoEmaNotSaved", "EMA weights not saved", True),
    Entry(f"{HERE}:NanoTorchRngNotSaved", "torch global RNG not saved", False),
    Entry(f"{HERE}:NanoNumpyRngNotSaved", "numpy global RNG not saved", True),
    Entry(f"{HERE}:NanoPythonRngNotSaved", "Python random not saved", False),
    Entry(f"{HERE}:NanoDropsAccumulatedGrads", "accumulated gradients lost at a mid-window save", True),
    Entry(f"{HERE}:NanoMicroStepNotRestored", "accumulation micro-step counter reset on load", False),
    Entry(f"{HERE}:NanoOptimizerNotLoaded", "optimizer state not loaded", False),
    Entry(f"{HERE}:NanoIterNumNotRestored", "iteration counter (LR schedule) not restored", False),
    Entry(f"{HERE}:NanoIterNumOffByOne", "iteration counter off by one on resume", True),
    Entry(f"{HERE}:NanoExtraDrawOnLoad", "an extra RNG draw after restoring the RNG", False),
    Entry(f"{HERE}:NanoStateDictDraws", "state_dict() draws from the training RNG", False),
    Entry(f"{HERE}:NanoLenientLoad", "load relies on torch.optim's unchecked loading", False),
    Entry(f"{HERE}:NanoCachedLrScale", "per-run value cached in a module global", False),
    Entry(f"{HERE}:TorchSamplerEpochNotSaved", "sampler epoch (shuffle order) not saved", True),
    Entry(f"{HERE}:TorchSchedulerNotLoaded", "LR scheduler not loaded", False),
    Entry(f"{HERE}:TorchDropoutRngNotRestored", "dropout RNG not restored", False),
    Entry(f"{HERE}:TorchStaleBatchIterator", "batch iterator kept across the load", False),
    Entry(f"{LIT}:LitRngNotSaved", "Lightning: global RNG not in the checkpoint", False),
    Entry(
        f"{LIT}:LitLoaderDrawsAfterRestore",
        "Lightning: loader without generator= draws after the RNG restore",
        False,
    ),
    Entry(f"{LIT}:LitSaveOnEpochLastBatch", "Lightning: checkpoint on an epoch's last batch", False),
    Entry(f"{LIT}:LitSetEpochSampler", "Lightning: sampler epoch from set_epoch", False),
    Entry(f"{LIT}:LitPlainDataLoader", "Lightning: plain DataLoader (epoch restarts)", False),
    Entry(f"{LIT}:LitEmaCallbackNoState", "Lightning: EMA callback without state_dict", False),
    Entry(f"{LIT}:LitNoKeyCheck", "Lightning: checkpoint structure not checked", False),
    Entry(f"{HF}:HFResumesWithOtherSeed", "HF: resumed with another TrainingArguments.seed", False),
    Entry(f"{HF}:HFNoKeyCheck", "HF: optimizer/scheduler files loaded unchecked", False),
    Entry(f"{HF}:HFMaxStepsPerCall", "HF: max_steps set per train() call (LR schedule)", False),
)

# Cheapest first; a bug run stops at its first failure unless --all-checks.
ORDER = (
    "legal_state",
    "pure_state_dict",
    "round_trip",
    "resume_equivalence",
    "trainer_metadata",
    "repeated_load",
    "async_resume",
    "shadow_state",
    "resume_sweep",
    "strict_loading",
    "format_conformance",
    "resume_across_processes",
)


def run_entry(entry: Entry, *, all_checks: bool) -> dict[str, Any]:
    """Run the suite on one entry; its failing checks with their causes."""
    from ckptproto.conformance.runner import Session

    started = time.perf_counter()
    failures: list[dict[str, str]] = []
    errors: list[str] = []
    with Session(entry.spec) as session:
        for name in ORDER:
            result = session.run(name)
            if result.status == "error":
                errors.append(f"{name}: {result.summary}")
            if result.status == "fail":
                failures.append({"check": name, "cause": result.cause, "summary": result.summary})
                if entry.what and not all_checks:
                    break
    return {
        "spec": entry.spec,
        "bug": entry.what,
        "failed": failures,
        "errors": errors,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", action="store_true", help="only the CI sample")
    parser.add_argument("--all-checks", action="store_true", help="do not stop a bug at its first failure")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="only entries whose spec contains NAME"
    )
    args = parser.parse_args(argv)
    chosen = [
        e
        for e in (*CORRECT, *BUGS)
        if (e.sample or not args.sample) and (not args.only or any(o in e.spec for o in args.only))
    ]
    results = []
    for entry in chosen:
        r = run_entry(entry, all_checks=args.all_checks)
        results.append(r)
        name = entry.spec.rpartition(":")[2]
        if entry.what:
            verdict = (
                f"CAUGHT by {r['failed'][0]['check']}: {r['failed'][0]['cause']}" if r["failed"] else "MISSED"
            )
            print(f"bug     {name:<28} {r['seconds']:>6.1f}s  {entry.what}\n        {verdict}", flush=True)
        else:
            verdict = "passes" if not r["failed"] else "FAILS " + ", ".join(f["check"] for f in r["failed"])
            print(f"correct {name:<28} {r['seconds']:>6.1f}s  {verdict}", flush=True)
        for error in r["errors"]:
            print(f"        ckptproto internal error: {error}", flush=True)
    bugs = [r for r in results if r["bug"]]
    correct = [r for r in results if not r["bug"]]
    caught = sum(bool(r["failed"]) for r in bugs)
    false = sum(bool(r["failed"]) for r in correct)
    print(f"caught {caught}/{len(bugs)} bugs, failed {false}/{len(correct)} correct trainers")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0 if caught == len(bugs) and not false and not any(r["errors"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
