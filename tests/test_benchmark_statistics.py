"""The benchmarks' statistics: what their printed intervals claim is what they cover."""

from __future__ import annotations

import sys
from math import comb
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
try:
    from bench_async import median_interval
finally:
    sys.path.pop(0)


@pytest.mark.parametrize(
    ("n", "low", "high"),
    # The sign test's 95% intervals for the median in the usual tables: the low-th and high-th
    # of n sorted values (1-based).
    [(6, 1, 6), (9, 2, 8), (12, 3, 10), (15, 4, 12), (20, 6, 15), (25, 8, 18), (31, 10, 22)],
)
def test_median_interval_is_the_sign_tests(n: int, low: int, high: int) -> None:
    values = [float(v) for v in reversed(range(1, n + 1))]  # unsorted: the function sorts
    found_low, found_high, coverage = median_interval(values)
    assert (found_low, found_high) == (low, high)
    exact = 1 - 2 * sum(comb(n, i) for i in range(low)) / 2**n
    assert coverage == pytest.approx(exact) and coverage >= 0.95


def test_too_few_values_give_the_range_and_its_lower_coverage() -> None:
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, 0.9375)
