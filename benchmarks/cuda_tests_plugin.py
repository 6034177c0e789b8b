"""pytest plugin used by bench_gpu.py: keep only the tests that need a CUDA device.

A test is a CUDA test when one of its ``skipif`` markers gives a reason that mentions CUDA
(the convention every test file here follows: ``reason="needs a CUDA device"``) or when its
name says ``cuda``. Everything else is deselected, so ``pytest -p cuda_tests_plugin`` runs
exactly the tests that a CPU-only CI run skips.
"""

from __future__ import annotations

from typing import Any


def _is_cuda_test(item: Any) -> bool:
    if "cuda" in item.name.lower():
        return True
    return any("cuda" in str(m.kwargs.get("reason", "")).lower() for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    keep = [item for item in items if _is_cuda_test(item)]
    dropped = [item for item in items if not _is_cuda_test(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep
