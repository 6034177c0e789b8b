"""Shared test fixtures: a fresh checkpoint path per test and the hypothesis profiles.

``CKPTPROTO_HYPOTHESIS=ci`` selects the ``ci`` profile (fewer examples, derandomized).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# A real S3-compatible server (moto) and the ``s3_url`` fixture for the object-store tests;
# checkpoint_root (every storage backend) and its helpers: tests/_roots.py.
pytest_plugins = ["_s3_server", "_roots"]

# Tests reuse tmp_path across examples on purpose (each saves with overwrite=True).
_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
settings.register_profile("default", deadline=None, max_examples=60, suppress_health_check=_SUPPRESS)
settings.register_profile(
    "ci", deadline=None, max_examples=30, derandomize=True, suppress_health_check=_SUPPRESS
)
# Bug hunting: pytest --hypothesis-profile=thorough (minutes, not part of the suite budget).
settings.register_profile("thorough", deadline=None, max_examples=600, suppress_health_check=_SUPPRESS)
settings.load_profile(os.environ.get("CKPTPROTO_HYPOTHESIS", "default"))


@pytest.fixture
def tmp_ckpt(tmp_path: Path) -> Path:
    """A path where no checkpoint exists yet, inside a per-test directory."""
    return tmp_path / "ckpt"


def quantized(dtype_name: str) -> object:
    """A quantized tensor, made without using up torch's warn-once deprecation warning that
    other tests may assert on (set_warn_always makes TORCH_WARN_ONCE skip its once-flag)."""
    import torch

    previous = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dtype = getattr(torch, dtype_name)
            if dtype_name in ("qint8", "quint8", "qint32"):
                return torch.quantize_per_tensor(torch.ones(4), 0.1, 0, dtype)
            return torch.empty(4, dtype=dtype)
    finally:
        torch.set_warn_always(previous)


def raw_bytes(value: object) -> bytes:
    """The logical bytes of a tensor/array in C order, little-endian, computed independently of
    ckptproto (lazy conj/neg bits resolved), so round trips compare bitwise, nan payloads too."""
    import ctypes

    import numpy as np

    if isinstance(value, np.ndarray):
        native = value.dtype.newbyteorder("<")
        if value.dtype.byteorder == ">":
            value = value.byteswap().view(native)
        return np.ascontiguousarray(value).tobytes()
    import torch

    assert isinstance(value, torch.Tensor)
    t = value.detach()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        # torch has no copy kernel for sub-byte dtypes (uint1..7, int1..7): copy as uint8.
        t = t.view(torch.uint8).contiguous() if t.element_size() == 1 else t.contiguous()
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def assert_same(a: object, b: object, path: str = "<root>") -> None:
    """``b`` (loaded) equals ``a`` (saved) exactly: same types, same key order and key types,
    bitwise-equal tensors, -0.0 kept, nan stays nan."""
    import math
    import struct
    from collections import OrderedDict

    import numpy as np

    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if isinstance(a, np.ndarray):
        assert type(b) is np.ndarray, f"{path}: {type(b)} is not numpy"
        assert b.dtype == a.dtype.newbyteorder("="), f"{path}: dtype {b.dtype} != {a.dtype}"
        assert b.shape == a.shape, f"{path}: shape"
        assert raw_bytes(b) == raw_bytes(a), f"{path}: bytes differ"
        return
    if torch is not None and isinstance(a, torch.Tensor):
        # A Parameter comes back as a plain tensor, as in module.state_dict(): the format
        # stores data, not autograd wrappers.
        assert type(b) is torch.Tensor, f"{path}: {type(b)} is not torch.Tensor"
        assert b.dtype == a.dtype and tuple(b.shape) == tuple(a.shape), f"{path}: {b.dtype}{b.shape}"
        assert not b.is_conj() and not b.is_neg()
        assert raw_bytes(b) == raw_bytes(a), f"{path}: bytes differ"
        return
    assert type(b) is type(a), f"{path}: {type(b).__name__} is not {type(a).__name__}"
    if isinstance(a, float):
        assert isinstance(b, float)
        if math.isnan(a):
            assert math.isnan(b), path
        else:
            assert struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {b!r} != {a!r}"
    elif isinstance(a, (dict, OrderedDict)):
        assert isinstance(b, dict)
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], f"{path}: keys differ"
        for k in a:
            label = k if type(k) is not int or k.bit_length() < 10_000 else "<huge int>"
            assert_same(a[k], b[k], f"{path}.{label}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: length"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b, f"{path}: {b!r} != {a!r}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: a test that moves hundreds of MiB (deselect with -m 'not slow')"
    )
