"""Golden checkpoints: fixed bytes written by ckptproto's writer, with their expected decoded
values in a torch-free description (``golden/expected.json``), for checking any reader.

A value is described as JSON: ``{"type": "int", "value": "123"}``, floats by ``float.hex``,
bytes and tensor contents as hex of their little-endian C-order bytes::

    {"type": "tensor", "kind": "torch", "dtype": "bfloat16", "shape": [2], "hex": "803f0040"}

``expected.json`` maps each checkpoint to a flat ``{state path: description}``; containers
are listed too (``{"type": "dict", "keys": [...]}``) so a reader that drops or adds entries
fails. A reader in another language decodes a golden checkpoint, describes its values the
same way and compares::

    for problem in check_decoded("plain_and_numpy"):
        print(problem)
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ckptproto import arrays
from ckptproto.conformance.compare import Difference, array_spec, is_array
from ckptproto.errors import CheckpointError
from ckptproto.io import sync
from ckptproto.tree import join_path

GOLDEN_DIR = Path(__file__).with_name("golden")
EXPECTED_NAME = "expected.json"


class NeedsTorch(CheckpointError):
    """The golden checkpoint holds torch tensors and torch is not installed."""


def describe(value: Any) -> dict[str, Any]:
    """The torch-free description of one leaf (containers: their type and keys/length)."""
    if value is None:
        return {"type": "none"}
    kind = type(value)
    if kind is bool:
        return {"type": "bool", "value": value}
    if kind is int:
        return {"type": "int", "value": str(value)}
    if kind is float:
        return {"type": "float", "hex": value.hex()}
    if kind is str:
        return {"type": "str", "value": value}
    if kind is bytes:
        return {"type": "bytes", "hex": value.hex()}
    if is_array(value):
        spec = array_spec(value)
        view, _owner = arrays.host_bytes(value)
        return {
            "type": "tensor",
            "kind": spec.kind,
            "dtype": spec.dtype.name,
            "shape": list(spec.shape),
            "hex": bytes(view).hex(),
        }
    if kind in (list, tuple):
        return {"type": kind.__name__, "length": len(value)}
    if isinstance(value, Mapping):
        name = "odict" if kind is OrderedDict else "dict"
        return {"type": name, "keys": [describe(k) for k in value]}
    raise TypeError(f"cannot describe a {kind.__qualname__}")


def flatten(state: Any, path: str = "") -> dict[str, dict[str, Any]]:
    """``{state path: description}`` for every node of a decoded state, root included."""
    out = {path: describe(state)}
    if isinstance(state, Mapping):
        children = state.items()
    elif isinstance(state, (list, tuple)):
        children = enumerate(state)  # type: ignore[assignment]
    else:
        return out
    for key, child in children:
        out.update(flatten(child, join_path(path, key)))
    return out


def names() -> list[str]:
    """The golden checkpoints shipped with this package."""
    return sorted(expected()["checkpoints"])


def path(name: str) -> Path:
    return GOLDEN_DIR / name


def expected() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GOLDEN_DIR / EXPECTED_NAME).read_text(encoding="utf-8"))
    return doc


def needs_torch(name: str) -> bool:
    return any(
        d["type"] == "tensor" and d["kind"] == "torch"
        for d in expected()["checkpoints"][name]["state"].values()
    )


def check_decoded(name: str) -> list[Difference]:
    """Load golden checkpoint ``name`` with ckptproto and list every value that differs from
    ``expected.json``; raises NeedsTorch when it holds torch tensors and torch is missing."""
    if needs_torch(name):
        try:
            arrays.require_torch()
        except CheckpointError:
            raise NeedsTorch(
                f"golden checkpoint {name} holds torch tensors; install torch to decode it"
            ) from None
    want = expected()["checkpoints"][name]
    with warnings.catch_warnings():  # torch warns that complex32 is experimental
        warnings.simplefilter("ignore", UserWarning)
        state = sync.load(path(name))
    got = flatten(state)
    problems = []
    for key in want["state"]:
        if key not in got:
            problems.append(Difference(f"golden/{name}:{key}", _brief(want["state"][key]), "nothing"))
        elif got[key] != want["state"][key]:
            problems.append(Difference(f"golden/{name}:{key}", _brief(want["state"][key]), _brief(got[key])))
    for key in got:
        if key not in want["state"]:
            problems.append(Difference(f"golden/{name}:{key}", "nothing", _brief(got[key])))
    info = sync.read_info(path(name))
    for field in ("step", "epoch"):
        if want.get(field) != getattr(info, field):
            problems.append(
                Difference(
                    f"golden/{name}:metadata.{field}", repr(want.get(field)), repr(getattr(info, field))
                )
            )
    return problems


def _brief(description: Mapping[str, Any]) -> str:
    text = json.dumps(description, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."
