"""Check 11, shadow state: what changes the future but lives outside ``state_dict()``.

A GradScaler, an EMA of the weights, a callback's buffers, a generator kept in an attribute:
when the trainer leaves one out of its state, a resume starts it from scratch and the run goes
on differently -- but only the adapter's fingerprint would show it, and a fingerprint lists
what its author thought of. This check walks the trainer object itself after the straight
run and after the resumed run (``create(S)``, ``train(N + M)`` versus ``create(S)``,
``train(N)``, save, ``create(S + 1)``, load, ``train(M)``), collecting

* the ``state_dict()`` of every object that has one (optimizers, schedulers, scalers,
  modules, callbacks, data loaders),
* every generator (``torch.Generator``, numpy ``Generator``/``RandomState``,
  ``random.Random``), as its state,
* every loose tensor or array held in an attribute,

and compares the tensors, arrays and generator states both trainers hold at the same
attribute path::

    trainer.scaler._scale: expected torch float32[] = 1024.0, got 65536.0

Plain values (counters of a framework's bookkeeping, timers, paths) are not compared -- what
they decide shows in the fingerprint; nor is the trainer's own ``state_dict()`` (checks 3 and
4 cover it). ``shadow_ignore`` names paths to leave out.
"""

from __future__ import annotations

import random
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptproto import arrays
from ckptproto.conformance.compare import Difference, compare_trees, is_array
from ckptproto.conformance.context import CheckFailed, Context, snapshot

MAX_DEPTH = 8
MAX_OBJECTS = 20_000
# Objects never walked into: what they hold is not training state, or is huge and shared.
_SKIP_MODULE_PREFIXES = (
    "ckptproto.",
    "logging",
    "threading",
    "concurrent.",
    "subprocess",
    "tempfile",
    "pathlib",
    "weakref",
    "typing",
    "abc",
    "_io",
    "io",
    "socket",
    "multiprocessing",
    "queue",
    "torch._C",
    "torch.utils.hooks",
    "torch.distributed",
    "torch.multiprocessing",
)
_SKIP_ATTRS = {"_parameters", "_buffers", "_forward_hooks", "_backward_hooks", "_state_dict_hooks"}


def _tensors(tree: Any) -> Any:
    """The tensors and arrays of ``tree`` (None for a subtree without any). Plain values are
    left out: progress counters, timers and paths of a framework's own bookkeeping differ
    between a straight and a resumed run without changing training (Lightning's
    ``epoch_progress.processed``); what they decide shows in the fingerprint (check 4)."""
    if is_array(tree):
        return tree
    if isinstance(tree, Mapping):
        kept = {k: _tensors(v) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
    if isinstance(tree, (list, tuple)):
        items = [_tensors(v) for v in tree]
        return items if any(v is not None for v in items) else None
    return None


def _generator_state(obj: Any) -> Any:
    if isinstance(obj, random.Random):
        version, inner, gauss = obj.getstate()
        return (version, tuple(inner), gauss)
    if isinstance(obj, np.random.Generator):
        return obj.bit_generator.state
    if isinstance(obj, np.random.RandomState):
        return obj.get_state(legacy=False)
    if type(obj).__name__ == "Generator" and type(obj).__module__.startswith("torch"):
        return obj.get_state()
    return None


def _attribute(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)`` for any object a trainer holds: a ``__getattr__`` that
    raises something other than AttributeError (wandb's disabled summary raises KeyError)
    means the attribute is absent, not that the check failed."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _children(obj: Any, path: str) -> list[tuple[str, Any]]:
    try:
        if isinstance(obj, Mapping):
            return [
                (f"{path}.{k}" if isinstance(k, (str, int)) else f"{path}[{i}]", v)
                for i, (k, v) in enumerate(obj.items())
            ]
        if isinstance(obj, (list, tuple)):
            return [(f"{path}[{i}]", v) for i, v in enumerate(obj)]
        attrs = _attribute(obj, "__dict__")
        if isinstance(attrs, dict):
            return [(f"{path}.{k}", v) for k, v in attrs.items() if k not in _SKIP_ATTRS]
    except Exception:  # a container whose iteration raises holds nothing we can compare
        pass
    return []


def collect(root: Any, name: str = "trainer") -> dict[str, Any]:
    """Attribute path -> snapshot of every state_dict(), generator state and loose tensor
    reachable from ``root``."""
    found: dict[str, Any] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(root, name, 0)]
    while stack and len(seen) < MAX_OBJECTS:
        obj, path, depth = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, complex)):
            continue
        seen.add(id(obj))
        if is_array(obj):
            if arrays.try_spec(obj) is not None:
                found[path] = snapshot(obj)
            continue
        gen = _generator_state(obj)
        if gen is not None:
            found[f"{path}.<rng>"] = snapshot(gen)
            continue
        if isinstance(obj, (type, types.ModuleType, types.FunctionType, types.MethodType)):
            continue
        if type(obj).__module__.startswith(_SKIP_MODULE_PREFIXES) or depth >= MAX_DEPTH:
            continue
        state_dict = _attribute(obj, "state_dict")
        if callable(state_dict) and not isinstance(obj, Mapping) and depth > 0:
            try:
                state = state_dict()
            except Exception:  # not a state_dict() of the protocol's kind (needs arguments...)
                state = None
            kept = _tensors(state) if isinstance(state, Mapping) else None
            if kept is not None:
                found[f"{path}.state_dict()"] = snapshot(kept)
        for child_path, child in reversed(_children(obj, path)):
            stack.append((child, child_path, depth + 1))
    return found


def shadow_state(ctx: Context) -> str:
    """11. The trainer objects of the straight and the resumed run hold the same state, also
    outside what ``state_dict()`` reports."""
    straight = collect(ctx.straight_trainer())
    resumed = collect(ctx.resumed_trainer())
    ignore = ctx.caps.shadow_ignore
    common = [p for p in straight if p in resumed and not p.startswith(ignore or ("\0",))]
    differences: list[Difference] = []
    for path in common:
        differences.extend(
            compare_trees(straight[path], resumed[path], where=path, rtol=ctx.caps.rtol, atol=ctx.caps.atol)
        )
    if differences:
        raise CheckFailed(
            f"after a resume, {len(differences)} values outside the adapter's fingerprint differ from "
            f"the straight run; first: {differences[0]}",
            differences,
            cause="state that changes the future lives outside state_dict() (a GradScaler, an EMA, "
            "a callback's buffers, a generator), or load_state_dict() does not restore it",
            fix="add the object at that path to state_dict() and restore it in load_state_dict() "
            "(or list the path in the adapter's shadow_ignore if it never affects training)",
        )
    return f"{len(common)} state_dict()s, generators and tensors reachable from the trainer are equal"
