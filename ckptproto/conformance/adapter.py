"""The adapter a trainer author writes so the conformance suite can drive their trainer.

::

    class MyAdapter:
        rtol = 0.0                      # optional capabilities, see Capabilities
        def create(self, seed: int) -> MyTrainer: return MyTrainer(seed=seed)
        def train(self, trainer: MyTrainer, steps: int) -> None: trainer.fit(steps)
        def fingerprint(self, trainer: MyTrainer) -> dict[str, Any]:
            return {"params": trainer.model.state_dict(), "loss": trainer.last_loss}

    $ ckptproto conformance mypkg.mymodule:MyAdapter
"""

from __future__ import annotations

import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ckptproto.errors import CheckpointError
from ckptproto.protocol import Stateful


class AdapterError(CheckpointError):
    """An adapter spec cannot be imported, or the object it names is not a TrainerAdapter."""


@runtime_checkable
class TrainerAdapter(Protocol):
    """What the suite needs from a trainer; everything else is optional capabilities.

    ``create(seed)`` builds a fresh trainer (model, optimizer, scheduler, data, RNG) from
    ``seed`` alone; ``train(trainer, steps)`` advances it by ``steps`` optimizer steps;
    ``fingerprint(trainer)`` returns what must match after a correct resume (parameters,
    the latest loss, the learning rate, the next batch, ...), made of values ckptproto can
    store (tensors, numpy arrays, plain values in dicts/lists/tuples), and without changing
    the trainer.

    Optional, additive hooks (an adapter without them stays valid):
    ``train_micro(trainer, micro_steps)`` advances by micro-steps of gradient accumulation
    (with the ``micro_steps`` capability), so that a save inside an accumulation window is
    checked. Before each ``create(seed)`` the suite sets the global RNGs (``random``, numpy,
    torch) from ``seed``; subprocesses get no launcher variables (``RANK``, ``MASTER_PORT``...).
    """

    def create(self, seed: int) -> Stateful: ...

    def train(self, trainer: Any, steps: int, /) -> None: ...

    def fingerprint(self, trainer: Any, /) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Capabilities:
    """Optional adapter attributes, with their defaults.

    * ``rtol``/``atol`` (0.0): tolerance for fingerprint tensors and floats after a resume,
      for trainers using nondeterministic kernels; 0 means bitwise equality.
    * ``strict_loading`` (True): the trainer refuses a state with missing or unexpected keys.
      Declare False to skip that check.
    * ``resume_steps`` ((3, 4)): N and M of "train N, save, resume, train M"; pick them so
      N + M crosses an epoch boundary.
    * ``steps_per_epoch`` (None): when given, the suite checks ``current_epoch`` advances
      after that many steps.
    * ``seed`` (1234): the seed of the reference trainer; resumed ones use other seeds.
    * ``check_budget_s`` (60.0): time budget of each of the checks that probe many cases
      (strict_loading's keys, resume_sweep's resume points); what was not reached is reported.
    * ``resume_points`` (()): extra steps resume_sweep resumes at (end of warmup, eval steps).
    * ``sweep_steps`` (None): how far resume_sweep trains; default covers two epochs (with
      ``steps_per_epoch``) or N + M + 2 steps.
    * ``micro_steps`` (None): micro-steps per optimizer step of a trainer accumulating
      gradients; with a ``train_micro(trainer, micro_steps)`` hook, resume_sweep also saves
      inside an accumulation window.
    * ``shadow_ignore`` (()): attribute paths (prefixes, e.g. ``"trainer.timer"``) the
      shadow_state check leaves out.
    """

    rtol: float = 0.0
    atol: float = 0.0
    strict_loading: bool = True
    resume_steps: tuple[int, int] = (3, 4)
    steps_per_epoch: int | None = None
    seed: int = 1234
    check_budget_s: float = 60.0
    resume_points: tuple[int, ...] = ()
    sweep_steps: int | None = None
    micro_steps: int | None = None
    shadow_ignore: tuple[str, ...] = ()

    @classmethod
    def of(cls, adapter: object) -> Capabilities:
        """Read the optional attributes of ``adapter``, checking their types."""
        default = cls()
        rtol = float(getattr(adapter, "rtol", default.rtol))
        atol = float(getattr(adapter, "atol", default.atol))
        strict = getattr(adapter, "strict_loading", default.strict_loading)
        steps = tuple(getattr(adapter, "resume_steps", default.resume_steps))
        per_epoch = getattr(adapter, "steps_per_epoch", default.steps_per_epoch)
        seed = getattr(adapter, "seed", default.seed)
        name = type(adapter).__qualname__
        if not isinstance(strict, bool):
            raise AdapterError(f"{name}.strict_loading must be a bool, got {strict!r}")
        if len(steps) != 2 or not all(type(s) is int and s >= 1 for s in steps):
            raise AdapterError(f"{name}.resume_steps must be two positive ints (N, M), got {steps!r}")
        if per_epoch is not None and (type(per_epoch) is not int or per_epoch < 1):
            raise AdapterError(f"{name}.steps_per_epoch must be a positive int or None")
        if type(seed) is not int or rtol < 0 or atol < 0:
            raise AdapterError(f"{name}: seed must be an int and rtol/atol non-negative")
        budget = float(getattr(adapter, "check_budget_s", default.check_budget_s))
        points = tuple(getattr(adapter, "resume_points", default.resume_points))
        sweep = getattr(adapter, "sweep_steps", default.sweep_steps)
        micro = getattr(adapter, "micro_steps", default.micro_steps)
        ignore = getattr(adapter, "shadow_ignore", default.shadow_ignore)
        if budget <= 0 or not all(type(p) is int and p >= 1 for p in points):
            raise AdapterError(f"{name}: check_budget_s must be > 0 and resume_points positive ints")
        for attr, value in (("sweep_steps", sweep), ("micro_steps", micro)):
            if value is not None and (type(value) is not int or value < 1):
                raise AdapterError(f"{name}.{attr} must be a positive int or None, got {value!r}")
        if isinstance(ignore, str) or not all(isinstance(p, str) for p in ignore):
            raise AdapterError(f"{name}.shadow_ignore must be a tuple of attribute paths")
        return cls(
            rtol,
            atol,
            strict,
            (steps[0], steps[1]),
            per_epoch,
            seed,
            budget,
            points,
            sweep,
            micro,
            tuple(ignore),
        )


def load_adapter(spec: str) -> TrainerAdapter:
    """Import ``"package.module:Name"`` (``Name`` may be dotted). A class is instantiated with
    no arguments; any other object is used as it is::

        adapter = load_adapter("examples.adapters.numpy_trainer:NumpyAdapter")
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AdapterError(f"adapter spec {spec!r} must look like 'package.module:AdapterClass'")
    # The spec comes from the user's command line, never from a checkpoint.
    try:
        obj: Any = pkgutil.resolve_name(spec)
    except ImportError as exc:
        raise AdapterError(
            f"cannot import {module_name!r} for adapter {spec!r}: {exc}; is its directory on "
            "PYTHONPATH or the package installed?"
        ) from exc
    except (AttributeError, ValueError):
        raise AdapterError(f"{module_name!r} has no attribute {attr!r} (adapter {spec!r})") from None
    if isinstance(obj, type):
        obj = obj()
    return check_adapter(obj, spec)


def check_adapter(obj: object, name: str = "") -> TrainerAdapter:
    """``obj`` if it has create/train/fingerprint, else AdapterError saying what is missing."""
    missing = [m for m in ("create", "train", "fingerprint") if not callable(getattr(obj, m, None))]
    if missing:
        looks_like_trainer = any(hasattr(obj, m) for m in ("state_dict", "fit", "model", "optimizer"))
        raise AdapterError(
            f"{name or type(obj).__qualname__} is not a TrainerAdapter: missing {', '.join(missing)}"
            + (" (it looks like a trainer itself)" if looks_like_trainer else "")
            + ". The suite drives your trainer through a small adapter class you write: "
            "create(seed) builds a fresh trainer, train(trainer, steps) runs optimizer steps, "
            "fingerprint(trainer) returns what must match after a resume; see docs/conformance.md "
            "and examples/adapters/torch_trainer.py"
        )
    Capabilities.of(obj)
    assert isinstance(obj, TrainerAdapter)
    return obj


def spec_of(adapter: object) -> str | None:
    """The ``module:Class`` spec that recreates ``adapter`` in another process, if there is one."""
    kind = type(adapter)
    module = kind.__module__
    if module in ("__main__", "builtins") or "<locals>" in kind.__qualname__:
        return None
    return f"{module}:{kind.__qualname__}"
