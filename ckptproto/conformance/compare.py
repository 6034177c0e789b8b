"""Comparing states and fingerprints, naming the path of every difference.

::

    diffs = compare_trees(expected, got, where="fingerprint")
    for d in diffs:
        print(d)   # fingerprint.params.fc1.weight: float32[8, 4] differ at [0, 1]: 0.25 != 0.5 (...)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptproto import arrays
from ckptproto.conformance.rngdiff import rng_draws
from ckptproto.errors import UnsupportedValueError
from ckptproto.tree import join_path

MAX_DIFFERENCES = 20


@dataclass(frozen=True)
class Difference:
    """One place where two trees disagree: its dotted ``path`` and what each side holds."""

    path: str
    expected: str
    got: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: expected {self.expected}, got {self.got}"

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "expected": self.expected, "got": self.got}


def is_array(value: object) -> bool:
    return isinstance(value, np.ndarray) or arrays.is_torch_tensor(value)


def array_spec(value: Any) -> arrays.ArraySpec:
    """The spec of a tensor/array; UnsupportedValueError for one the format cannot hold."""
    spec = arrays.try_spec(value)
    if spec is None:
        raise UnsupportedValueError(
            f"{type(value).__qualname__} {getattr(value, 'dtype', '')} cannot be stored"
        )
    return spec


def describe_array(value: Any) -> str:
    spec = array_spec(value)
    return f"{spec.kind} {spec.dtype.name}{list(spec.shape)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _as_float64(value: Any) -> np.ndarray[Any, Any] | None:
    """A float64 copy of a real-valued tensor for value comparisons, or None where numpy has
    no meaning for it (complex, sub-byte and bit dtypes)."""
    try:
        if isinstance(value, np.ndarray):
            return value.astype(np.float64) if value.dtype.kind in "biuf" else None
        if value.is_complex():
            return None
        # a torch tensor: converted through its own methods, so torch is never imported here
        return np.asarray(value.detach().cpu().double().numpy(), dtype=np.float64)
    except (RuntimeError, TypeError, AttributeError):
        return None


def _raw(value: Any) -> bytes:
    view, _owner = arrays.host_bytes(value)
    return bytes(view)


def compare_arrays(expected: Any, got: Any, path: str, *, rtol: float, atol: float) -> Difference | None:
    """None when equal: bit for bit, or within ``atol + rtol * |expected|`` when a tolerance is
    given (NaN matches NaN then)."""
    e_spec, g_spec = array_spec(expected), array_spec(got)
    if (e_spec.dtype, e_spec.shape) != (g_spec.dtype, g_spec.shape):
        return Difference(path, describe_array(expected), describe_array(got))
    e_raw, g_raw = _raw(expected), _raw(got)
    if e_raw == g_raw:
        return None
    what = describe_array(expected)
    e64, g64 = _as_float64(expected), _as_float64(got)
    if e64 is None or g64 is None:
        byte = next(i for i, (a, b) in enumerate(zip(e_raw, g_raw, strict=True)) if a != b)
        return Difference(path, f"{what} with byte {byte} = {e_raw[byte]:#04x}", f"{g_raw[byte]:#04x}")
    e64, g64 = np.atleast_1d(e64), np.atleast_1d(g64)
    tolerant = bool(rtol or atol)
    both_nan = np.isnan(e64) & np.isnan(g64)
    if tolerant:
        close = np.isclose(g64, e64, rtol=rtol, atol=atol) | both_nan
        if close.all():
            return None
    else:
        close = e64 == g64
        if close.all():  # equal values, different bits: -0.0 vs 0.0, NaN payloads
            return Difference(path, f"{what} with bytes {e_raw.hex()[:32]}", f"bytes {g_raw.hex()[:32]}")
    bad = np.argwhere(~close)
    first = tuple(int(i) for i in bad[0])
    at = list(first) if array_spec(expected).shape else []
    tol = f" (rtol={rtol}, atol={atol})" if tolerant else " (bitwise)"
    whole = e_spec.dtype.name.startswith(("int", "uint", "bool"))
    show: Any = int if whole else float
    return Difference(
        path,
        f"{what} with {at} = {show(e64[first])!r}{tol}",
        f"{show(g64[first])!r}; {len(bad)} of {e64.size} elements differ",
    )


def compare_trees(
    expected: Any, got: Any, *, where: str = "", rtol: float = 0.0, atol: float = 0.0
) -> list[Difference]:
    """Every difference (up to MAX_DIFFERENCES) between two trees of dicts, lists, tuples,
    tensors and plain values. Floats compare exactly unless a tolerance is given."""
    out: list[Difference] = []
    _walk(expected, got, where, rtol, atol, out)
    return out


def _walk(e: Any, g: Any, path: str, rtol: float, atol: float, out: list[Difference]) -> None:
    if len(out) >= MAX_DIFFERENCES:
        return
    if is_array(e) or is_array(g):
        if not (is_array(e) and is_array(g)):
            out.append(Difference(path, _kind(e), _kind(g)))
        else:
            diff = compare_arrays(e, g, path, rtol=rtol, atol=atol)
            if diff is not None:
                draws = rng_draws(e, g)
                out.append(diff if draws is None else Difference(path, "the same RNG state", draws))
        return
    if _maybe_rng(e) and _maybe_rng(g):
        inner: list[Difference] = []
        _walk_containers(e, g, path, rtol, atol, inner)
        draws = rng_draws(e, g) if inner else None
        out.extend(inner if draws is None else [Difference(path, "the same RNG state", draws)])
        return
    _walk_containers(e, g, path, rtol, atol, out)


def _maybe_rng(value: Any) -> bool:
    """A numpy bit generator state dict or a ``random.getstate()`` tuple."""
    if isinstance(value, Mapping):
        return "bit_generator" in value
    return isinstance(value, tuple) and len(value) == 3 and value[0] == 3


def _walk_containers(e: Any, g: Any, path: str, rtol: float, atol: float, out: list[Difference]) -> None:
    if isinstance(e, Mapping) and isinstance(g, Mapping):
        for key in e:
            if key not in g:
                out.append(Difference(join_path(path, key), _kind(e[key]), "nothing (key missing)"))
        for key in g:
            if key not in e:
                out.append(Difference(join_path(path, key), "nothing (unexpected key)", _kind(g[key])))
        for key in e:
            if key in g:
                _walk(e[key], g[key], join_path(path, key), rtol, atol, out)
        return
    if isinstance(e, (list, tuple)) and isinstance(g, (list, tuple)) and type(e) is type(g):
        if len(e) != len(g):
            out.append(Difference(path, f"{len(e)} items", f"{len(g)} items"))
            return
        for i, (a, b) in enumerate(zip(e, g, strict=True)):
            _walk(a, b, join_path(path, i), rtol, atol, out)
        return
    if type(e) is float and type(g) is float:
        if _floats_equal(e, g, rtol, atol):
            return
    elif type(e) is type(g) and e == g:
        return
    out.append(Difference(path, _short(e), _short(g)))


def _floats_equal(e: float, g: float, rtol: float, atol: float) -> bool:
    if math.isnan(e) or math.isnan(g):
        return math.isnan(e) and math.isnan(g)
    if rtol or atol:
        return abs(e - g) <= atol + rtol * abs(e)
    return e.hex() == g.hex()


def _kind(value: Any) -> str:
    if is_array(value):
        return describe_array(value)
    if isinstance(value, (dict, list, tuple)):
        return f"a {type(value).__qualname__} of {len(value)} items"
    return _short(value)
