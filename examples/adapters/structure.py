"""A key check for adapters of frameworks whose own loading does not check keys
(``torch.optim`` optimizers and LR schedulers, Lightning's loops)::

    check_structure(self.state_dict(), state)   # KeyError naming the first mismatch
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_structure(expected: Any, got: Any, path: str = "", *, fresh: tuple[str, ...] = ()) -> None:
    """Raise KeyError where ``got`` lacks a key or list item of ``expected`` or has one more.
    Dicts at a path ending with one of ``fresh`` are not compared: a fresh optimizer has no
    per-parameter state yet (its completeness is checked separately)."""
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping):
            raise KeyError(f"{path}: expected a dict, got {type(got).__qualname__}")
        if path.endswith(fresh) and fresh:
            return
        missing, unexpected = set(expected) - set(got), set(got) - set(expected)
        if missing or unexpected:
            raise KeyError(
                f"{path or '<root>'}: missing {sorted(map(str, missing))}, "
                f"unexpected {sorted(map(str, unexpected))}"
            )
        for key in expected:
            check_structure(expected[key], got[key], f"{path}.{key}" if path else str(key), fresh=fresh)
    elif isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            raise KeyError(f"{path}: expected {len(expected)} items")
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            check_structure(e, g, f"{path}.{i}", fresh=fresh)


def check_adamw_state(optimizer_state: Mapping[str, Any], trained: bool) -> None:
    """Raise KeyError unless every parameter has its full AdamW state once trained."""
    n_params = sum(len(g["params"]) for g in optimizer_state["param_groups"])
    per_param = optimizer_state["state"]
    if trained and (
        set(per_param) != set(range(n_params))
        or any(set(v) != {"step", "exp_avg", "exp_avg_sq"} for v in per_param.values())
    ):
        raise KeyError("incomplete optimizer state: a parameter's AdamW moments are missing")
