"""The real-model track's paired differences (`benchmarks/quality/paired.py`) against outside references:
scipy's t quantiles, and the bootstrap distribution enumerated exhaustively."""

from __future__ import annotations

import importlib.util
import itertools
import math
import statistics
from pathlib import Path

import pytest

# The quality benchmark's tooling, which runs in `make test`'s environment (with scipy): `make test` only.
pytestmark = pytest.mark.env_independent

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "paired.py"
spec = importlib.util.spec_from_file_location("quality_paired", PATH)
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 21])
def test_t_interval_is_scipys(n):
    from scipy import stats  # collected in every environment, run where scipy is

    diffs = [math.sin(3 * i) + 0.2 for i in range(n)]
    sem = statistics.stdev(diffs) / math.sqrt(n)
    low, high = stats.t.interval(0.95, n - 1, loc=statistics.mean(diffs), scale=sem)
    assert paired.t_interval(diffs) == pytest.approx((low, high), rel=1e-3)


def test_bootstrap_interval_matches_the_enumerated_distribution():
    """Every one of the 4^4 resamples of 4 seeds, weighted equally: the 2.5% and 97.5% quantiles."""
    diffs = [0.1, -0.3, 0.7, 1.6]
    means = sorted(sum(c) / 4 for c in itertools.product(diffs, repeat=4))
    low, high = paired.bootstrap_interval(diffs, 40_000, seed=1)
    assert low == pytest.approx(means[int(0.025 * len(means))], abs=0.03)
    assert high == pytest.approx(means[int(0.975 * len(means))], abs=0.03)


def test_paired_differences_are_per_seed_over_the_common_seeds():
    a = {0: 1.0, 1: 2.0, 2: 4.0, 3: 9.0}
    b = {0: 0.5, 1: 2.5, 2: 1.0}  # seed 3 missing in b: not compared
    out = paired.paired(a, b, draws=2000, seed=0)
    assert out["seeds"] == [0, 1, 2]
    assert out["per_seed"] == [0.5, -0.5, 3.0]
    assert out["mean"] == pytest.approx(1.0)
    assert out["t_ci"] == pytest.approx(list(paired.t_interval([0.5, -0.5, 3.0])))
    assert out["bootstrap_ci"][0] >= -0.5 and out["bootstrap_ci"][1] <= 3.0
    one = paired.paired({0: 1.0}, {0: 0.0}, draws=10, seed=0)
    assert one["t_ci"] is None and one["bootstrap_ci"] is None
    assert paired.excludes_zero([0.1, 0.2]) and paired.excludes_zero([-0.2, -0.1])
    assert not paired.excludes_zero([-0.1, 0.2]) and not paired.excludes_zero(None)
