"""Paired differences over seeds: the real-model track's comparisons of two arms.

Every seed trains every arm on the same data order and grades them on the same held-out
problems, so the comparison of arms A and B is the per-seed difference ``d_s = A_s - B_s``; the
seeds are independent (each draws its own training problems, corruption, data order and
held-out problems), so the mean difference gets a t interval over seeds and a percentile
bootstrap interval (seeds resampled with replacement).
"""

from __future__ import annotations

import math
import random
import statistics

# Two-sided 95% quantiles of Student's t, by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def t_interval(diffs: list[float]) -> tuple[float, float]:
    """95% t interval of the mean of ``diffs`` (at least 2)."""
    n = len(diffs)
    half = T975[n - 1] * statistics.stdev(diffs) / math.sqrt(n)
    mean = statistics.mean(diffs)
    return mean - half, mean + half


def bootstrap_interval(diffs: list[float], draws: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of ``diffs``: ``draws`` resamples of the seeds."""
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(rng.choice(diffs) for _ in range(n)) / n for _ in range(draws))
    return means[int(0.025 * draws)], means[min(draws - 1, int(0.975 * draws))]


def paired(a: dict[int, float], b: dict[int, float], draws: int, seed: int) -> dict:
    """``a - b`` per seed (``a`` and ``b``: seed -> value, the seeds both have), their mean, and the
    t and bootstrap 95% intervals of the mean (None with fewer than 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    out = {"seeds": seeds, "per_seed": diffs, "mean": statistics.mean(diffs) if diffs else None,
           "t_ci": None, "bootstrap_ci": None}
    if len(diffs) >= 2:
        out["t_ci"] = list(t_interval(diffs))
        out["bootstrap_ci"] = list(bootstrap_interval(diffs, draws, seed))
    return out


def excludes_zero(interval: list[float] | None) -> bool:
    return interval is not None and (interval[0] > 0 or interval[1] < 0)
