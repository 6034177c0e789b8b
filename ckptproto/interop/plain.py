"""Turning what fully unpickled ``torch.save`` checkpoints commonly hold into values the format
stores, and numpy arrays into tensors for files ``torch.load`` must read with its defaults.

Only the ``--unsafe-allow-pickle`` path uses ``plain_values``: a file read with
``weights_only=True`` holds only what the format accepts or refuses by name. Each change is
reported by state path, so nothing is altered silently::

    state, notes = plain_values({"args": argparse.Namespace(lr=0.1)})
    # state == {"args": {"lr": 0.1}}
    # notes == ["args: argparse.Namespace stored as a dict of its attributes"]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import enum
import pathlib
import types
from collections.abc import Callable
from typing import Any

import numpy as np

from ckptproto.arrays import loaded_torch, require_torch

_PLAIN_LEAVES = (type(None), bool, int, float, str, bytes)


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value: object) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _torch_plain(value: Any) -> tuple[Any, str] | None:
    torch = loaded_torch()
    if torch is None:
        return None
    if isinstance(value, torch.Size):
        return tuple(int(n) for n in value), "a tuple of ints"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value), f"the string {str(value)!r}"
    return None


def _convert_one(value: Any) -> tuple[Any, str] | None:
    """``(replacement, what it became)`` for a value the format refuses but has a plain
    equivalent for; None when the value needs no change or has none."""
    if isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        return dict(vars(value)), "a dict of its attributes"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, "a dict of its fields"
    if isinstance(value, enum.Enum):
        return value.value, "its value"
    if isinstance(value, pathlib.PurePath):
        return str(value), "a string"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat(), "an ISO 8601 string"
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value), "a sorted list"
        except TypeError:
            return list(value), "a list"
    if isinstance(value, bytearray):
        return bytes(value), "bytes"
    if isinstance(value, np.generic):
        return np.asarray(value), "a 0-d numpy array"
    if isinstance(value, tuple) and hasattr(value, "_asdict") and type(value) is not tuple:
        return dict(value._asdict()), "a dict of its fields"
    if isinstance(value, collections.OrderedDict) and type(value) is not collections.OrderedDict:
        return collections.OrderedDict(value), "an OrderedDict"
    if isinstance(value, dict) and type(value) is not dict and not isinstance(value, collections.OrderedDict):
        return dict(value), "a dict"
    if isinstance(value, (list, tuple)) and type(value) not in (list, tuple):
        base = list if isinstance(value, list) else tuple
        torch_plain = _torch_plain(value)
        return torch_plain if torch_plain is not None else (base(value), f"a {base.__name__}")
    return _torch_plain(value)


def _map_tree(state: Any, change: Callable[[Any, str], Any]) -> Any:
    """A copy of ``state`` whose dicts, lists and tuples are rebuilt, each other node
    replaced by ``change(node, path)`` first (and descended into when that is a container).
    A node reached twice (tied tensors, shared dicts) is changed once and stays shared."""
    seen: dict[int, tuple[Any, Any]] = {}  # id -> (original, kept alive so ids stay unique; copy)

    def walk(value: Any, path: str) -> Any:
        if type(value) in _PLAIN_LEAVES:
            return value
        if id(value) in seen:
            return seen[id(value)][1]
        original = value
        if type(value) not in (dict, collections.OrderedDict, list, tuple):
            value = change(value, path)
        out: Any
        if isinstance(value, dict):
            out = type(value)() if type(value) in (dict, collections.OrderedDict) else {}
            for k, v in value.items():
                out[k] = walk(v, _join(path, k))
        elif type(value) in (list, tuple):
            items = [walk(v, _join(path, i)) for i, v in enumerate(value)]
            out = items if type(value) is list else tuple(items)
        else:
            out = value
        seen[id(original)] = (original, out)
        return out

    return walk(state, "")


def plain_values(state: Any) -> tuple[Any, list[str]]:
    """A copy of ``state`` (containers rebuilt, leaves shared) where each value of a kind in
    the list below is replaced by its plain equivalent, and one note per replacement:
    ``argparse.Namespace``/``SimpleNamespace``/dataclass/namedtuple -> dict, ``enum`` -> its
    value, paths and ``torch.dtype``/``torch.device`` -> str, dates -> ISO 8601 str, sets ->
    sorted list, ``torch.Size`` -> tuple, numpy scalars -> 0-d arrays, container subclasses ->
    the plain container. Anything else is left for ``encode_state`` to refuse by path."""
    notes: list[str] = []

    def change(value: Any, path: str) -> Any:
        converted = _convert_one(value)
        if converted is None:
            return value
        replacement, became = converted
        notes.append(f"{path or '<root>'}: {_kind(value)} stored as {became}")
        return replacement

    return _map_tree(state, change), notes


def numpy_to_tensors(state: Any) -> tuple[Any, list[str]]:
    """A copy of ``state`` with every numpy array replaced by a CPU tensor sharing its memory
    (``torch.from_numpy``), so ``torch.load(weights_only=True)`` reads the file without being
    told about numpy; one note per array. Arrays of a dtype torch lacks stay numpy arrays."""
    torch = require_torch()
    notes: list[str] = []
    to_tensor: Callable[[np.ndarray[Any, Any]], Any] = torch.from_numpy

    def change(value: Any, path: str) -> Any:
        if not isinstance(value, np.ndarray):
            return value
        array = value if value.dtype.isnative else value.astype(value.dtype.newbyteorder("="))
        try:
            tensor = to_tensor(np.ascontiguousarray(array))
        except TypeError:  # a dtype torch does not have: keep the array
            return value
        notes.append(f"{path}: numpy {value.dtype}{list(value.shape)} written as a torch tensor")
        return tensor

    return _map_tree(state, change), notes
