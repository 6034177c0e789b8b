"""What every check shares: the adapter under test, a scratch directory, the straight and
resumed runs (cached), and the rules of attribution.

::

    ctx = Context(adapter, Path("/tmp/scratch"), "mypkg.mymodule:MyAdapter")
    trainer = ctx.create(ctx.seed)      # global RNGs scrambled from the seed first
    ctx.train(trainer, ctx.n)
    state = ctx.state(trainer)          # an exception here is the trainer's, not ckptproto's

Attribution: every call into the adapter or the trainer goes through :meth:`Context.call`,
which marks what it raises as the trainer's. The runner reports anything else that escapes a
check -- an exception from ckptproto's own code that is not a ``CheckpointError`` about the
trainer's state -- as an internal error of ckptproto, never as the trainer's failure.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ckptproto import arrays, protocol
from ckptproto.conformance.adapter import Capabilities, TrainerAdapter
from ckptproto.conformance.compare import Difference, compare_trees, describe_array, is_array
from ckptproto.errors import UnsupportedValueError
from ckptproto.io import sync
from ckptproto.io.prepare import resolve_statefuls


class CheckFailed(Exception):
    """A check found the trainer misbehaving; ``differences`` name the paths at fault;
    ``cause`` (what is wrong) and ``fix`` (what to do) override the check's defaults."""

    def __init__(
        self,
        summary: str,
        differences: list[Difference] | None = None,
        *,
        cause: str = "",
        fix: str = "",
    ) -> None:
        super().__init__(summary)
        self.summary = summary
        self.differences = list(differences or [])
        self.cause = cause
        self.fix = fix


class CheckSkipped(Exception):
    """A check does not apply (the adapter declared so, or something it needs is missing)."""


class InternalError(Exception):
    """ckptproto itself failed while checking (not the trainer): reported as ``error``."""


class TrainerRaised(Exception):
    """Wraps an exception raised by the adapter or the trainer, so the report blames them."""

    def __init__(self, what: str, exc: BaseException) -> None:
        super().__init__(f"{what} raised {type(exc).__qualname__}: {exc}")
        self.what = what
        self.original = exc


class Guarded:
    """A trainer seen through :meth:`Context.call`: what ``save``/``load_into`` call on it is
    attributed to the trainer when it raises."""

    def __init__(self, ctx: Context, trainer: Any) -> None:
        self._ctx = ctx
        self._trainer = trainer

    def state_dict(self) -> Any:
        return self._ctx.call("state_dict()", self._trainer.state_dict)

    def load_state_dict(self, state: Any, strict: bool = True) -> Any:
        load = self._trainer.load_state_dict
        if _accepts_strict(load):
            return self._ctx.call("load_state_dict()", lambda: load(state, strict=strict))
        return self._ctx.call("load_state_dict()", load, state)


def _accepts_strict(fn: Callable[..., Any]) -> bool:
    import inspect

    try:
        return "strict" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def scramble_global_rngs(salt: int) -> None:
    """Set the global RNGs of ``random``, numpy and (when imported) torch, CUDA included, to a
    state derived from ``salt``: a trainer that draws from them without saving and restoring
    them resumes differently, whatever ran earlier in this process."""
    value = (salt * 2654435761 + 97) % (2**32)
    random.seed(value)
    np.random.seed(value)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(value)  # also seeds every CUDA device


def global_rng_states() -> dict[str, Any]:
    """The states of the global RNGs (``random``, numpy, torch when imported), storable."""
    version, inner, gauss = random.getstate()
    states: dict[str, Any] = {
        "random": (version, tuple(inner), gauss),
        "numpy": np.random.get_state(legacy=False),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        states["torch"] = torch.get_rng_state()
    return states


# The torch switches a trainer may flip for itself (Lightning's Trainer(deterministic=True)
# turns on torch.use_deterministic_algorithms for the whole process): checks of ckptproto's
# own code run with torch's defaults, and a session leaves the caller's flags as it found them.
_TORCH_DEFAULTS: tuple[bool, bool, str, bool] = (False, False, "float32", True)


def torch_flags() -> tuple[bool, bool, str, bool]:
    """(deterministic, warn_only, default dtype name, grad enabled); torch's defaults when
    torch is not imported yet."""
    torch = sys.modules.get("torch")
    if torch is None:
        return _TORCH_DEFAULTS
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        str(torch.get_default_dtype()).removeprefix("torch."),
        torch.is_grad_enabled(),
    )


def set_torch_flags(flags: tuple[bool, bool, str, bool]) -> None:
    torch = sys.modules.get("torch")
    if torch is None:
        return
    deterministic, warn_only, dtype, grad = flags
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_default_dtype(getattr(torch, dtype))
    torch.set_grad_enabled(grad)


@contextmanager
def torch_defaults() -> Iterator[None]:
    """Run the block with torch's global flags at their defaults; restore them after."""
    before = torch_flags()
    try:
        set_torch_flags(_TORCH_DEFAULTS)
        yield
    finally:
        set_torch_flags(before)


class Context:
    """One adapter under test, a scratch directory, and results shared between checks."""

    def __init__(self, adapter: TrainerAdapter, workdir: Path, spec: str | None) -> None:
        self.adapter = adapter
        self.caps = Capabilities.of(adapter)
        self.workdir = workdir
        self.spec = spec
        self.warnings: list[str] = []
        self._cache: dict[str, Any] = {}
        self._counter = 0

    @property
    def seed(self) -> int:
        return self.caps.seed

    @property
    def n(self) -> int:
        return self.caps.resume_steps[0]

    @property
    def m(self) -> int:
        return self.caps.resume_steps[1]

    # -- calls into the adapter and the trainer ------------------------------------------------

    def call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; what it raises is re-raised as :class:`TrainerRaised`."""
        try:
            return fn(*args)
        except (TrainerRaised, CheckFailed, CheckSkipped):
            raise
        except Exception as exc:
            raise TrainerRaised(what, exc) from exc

    def create(self, seed: int, *, salt: int | None = None) -> Any:
        """A fresh trainer from ``seed``, the global RNGs first scrambled from ``salt``
        (default: ``seed``), so that trainers from one seed start alike and trainers from
        different seeds start from different global RNG states."""
        scramble_global_rngs(seed if salt is None else salt)
        return self.call(f"create({seed})", self.adapter.create, seed)

    def train(self, trainer: Any, steps: int) -> None:
        if steps > 0:
            self.call(f"train(trainer, {steps})", self.adapter.train, trainer, steps)

    def train_micro(self, trainer: Any, micro_steps: int) -> None:
        hook = getattr(self.adapter, "train_micro", None)
        if hook is None:
            raise CheckSkipped("the adapter has no train_micro(trainer, micro_steps) hook")
        if micro_steps > 0:
            self.call(f"train_micro(trainer, {micro_steps})", hook, trainer, micro_steps)

    def fingerprint(self, trainer: Any) -> dict[str, Any]:
        """A copy of the adapter's fingerprint, so later training cannot change it."""
        fp = self.call("fingerprint(trainer)", self.adapter.fingerprint, trainer)
        if not isinstance(fp, Mapping):
            raise CheckFailed(f"fingerprint() returned {type(fp).__qualname__}, not a mapping")
        copied: dict[str, Any] = snapshot(dict(fp))
        return copied

    def state(self, trainer: Any) -> Mapping[str, Any]:
        """The trainer's state as ``save`` sees it: Statefuls nested in its dicts (PROTOCOL.md
        [P-2]) replaced by their own ``state_dict()``."""
        raw = self.call("state_dict()", protocol.state_of, trainer)
        try:
            resolved: dict[str, Any] = self.call("a nested state_dict()", resolve_statefuls, raw)
            return resolved
        except TrainerRaised as exc:
            if isinstance(exc.original, UnsupportedValueError):
                raise CheckFailed(str(exc.original)) from None
            raise

    def load_state(self, trainer: Any, state: Mapping[str, Any]) -> None:
        self.call("load_state_dict()", trainer.load_state_dict, state)

    def save(self, trainer: Any, path: Path) -> None:
        sync.save(Guarded(self, trainer), path)

    def load_into(self, path: Path, trainer: Any) -> None:
        try:
            sync.load_into(path, Guarded(self, trainer))
        except Exception as exc:
            # load_into re-raises the trainer's refusal as StateMismatchError: still the trainer's
            cause = exc.__cause__
            if isinstance(cause, TrainerRaised):
                raise cause from None
            raise

    # -- bookkeeping -----------------------------------------------------------------------------

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def new_path(self, label: str) -> Path:
        self._counter += 1
        return self.workdir / f"{self._counter:02d}-{label}"

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # -- shared runs -------------------------------------------------------------------------

    def straight_trainer(self) -> Any:
        """A trainer from ``seed`` trained N + M steps in one go (kept for the shadow check)."""

        def run() -> Any:
            trainer = self.create(self.seed)
            self.train(trainer, self.n + self.m)
            return trainer, self.fingerprint(trainer), global_rng_states()

        return self.cached("straight", run)[0]

    def straight(self) -> dict[str, Any]:
        """Fingerprint after N + M steps in one go, from ``seed``."""
        self.straight_trainer()
        result: dict[str, Any] = self._cache["straight"][1]
        return result

    def checkpoint_at_n(self) -> Path:
        """A checkpoint (ckptproto.save) of a trainer from ``seed`` after N steps."""

        def run() -> Path:
            trainer = self.create(self.seed)
            self.train(trainer, self.n)
            path = self.new_path(f"step{self.n}")
            self.save(trainer, path)
            return path

        path: Path = self.cached("checkpoint", run)
        return path

    def resume(self, checkpoint: Path, seed: int, steps: int) -> Any:
        """A trainer from ``seed`` (global RNGs scrambled), loaded from ``checkpoint``, trained
        ``steps`` steps."""
        trainer = self.create(seed)
        self.load_into(checkpoint, trainer)
        self.train(trainer, steps)
        return trainer

    def resumed_trainer(self) -> Any:
        """The trainer of :meth:`resumed` (kept for the shadow check)."""

        def run() -> Any:
            trainer = self.resume(self.checkpoint_at_n(), self.seed + 1, self.m)
            return trainer, self.fingerprint(trainer), global_rng_states()

        return self.cached("resumed", run)[0]

    def resumed(self) -> dict[str, Any]:
        """Fingerprint of a trainer from another seed, loaded from step N and trained M steps."""
        self.resumed_trainer()
        result: dict[str, Any] = self._cache["resumed"][1]
        return result

    def global_rngs_after(self, run: str) -> dict[str, Any]:
        """The global RNG states right after the ``"straight"`` or ``"resumed"`` run."""
        self.straight_trainer() if run == "straight" else self.resumed_trainer()
        states: dict[str, Any] = self._cache[run][2]
        return states

    def compare_fingerprints(self, expected: Any, got: Any) -> list[Difference]:
        return compare_trees(expected, got, where="fingerprint", rtol=self.caps.rtol, atol=self.caps.atol)


def snapshot(tree: Any) -> Any:
    """A deep copy of a state tree: containers rebuilt, tensors and arrays cloned."""
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if arrays.is_torch_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        copied = type(tree)() if type(tree) is not dict and isinstance(tree, MutableMapping) else {}
        for k, v in tree.items():
            copied[k] = snapshot(v)
        return copied
    if isinstance(tree, list):
        return [snapshot(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(snapshot(v) for v in tree)
    return tree


def skeleton(tree: Any) -> Any:
    """A tree's structure and plain values, with each tensor replaced by its dtype and shape."""
    if is_array(tree):
        return f"<{describe_array(tree)}>"
    if isinstance(tree, Mapping):
        return {k: skeleton(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(skeleton(v) for v in tree)
    return tree
