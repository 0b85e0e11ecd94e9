"""Small-sample statistics for comparing runs across seeds.

With 3-10 seeds the Student-t quantile is far from the normal one (12.7 vs 1.96 at n = 2),
which is the whole point of using it; scipy.stats supplies it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence


def _t():
    # Imported on first use: a GPU machine that only runs a grid's training processes need
    # not have scipy; its report can be written anywhere with --report-only.
    from scipy import stats

    return stats.t


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean with a two-sided Student-t confidence interval.

    n = 1 gives the mean and NaN for every spread (no error), n = 0 gives NaN throughout, so
    partially finished sweeps can still be summarized.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    xs = [float(v) for v in values]
    n = len(xs)
    nan = math.nan
    out = {"n": n, "mean": nan, "std": nan, "sem": nan, "ci_low": nan, "ci_high": nan,
           "half_width": nan, "level": level}
    if n == 0:
        return out
    mean = math.fsum(xs) / n
    out["mean"] = mean
    if n == 1:
        return out
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    sem = std / math.sqrt(n)
    half = float(_t().ppf(0.5 + level / 2.0, n - 1)) * sem
    out.update(std=std, sem=sem, ci_low=mean - half, ci_high=mean + half, half_width=half)
    return out


def paired_diff(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Paired comparison of a against b (a_i, b_i from the same seed; the caller aligns them).

    Returns mean_ci of d_i = a_i - b_i plus the two-sided paired t-test `p_value`, `t`, and
    `n_better` = #(a_i < b_i): for losses, negative differences and n_better favour a.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_diff needs equal lengths, got {len(a)} and {len(b)}")
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    out: dict[str, float] = dict(mean_ci(diffs, level))
    out["n_better"] = sum(d < 0 for d in diffs)
    out["n_worse"] = sum(d > 0 for d in diffs)
    n, mean, sem = out["n"], out["mean"], out["sem"]
    if n < 2 or math.isnan(sem):
        t, p = math.nan, math.nan
    elif sem == 0.0:
        # Every seed moved by exactly the same amount: no noise to test against.
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / sem
        p = min(1.0, 2.0 * float(_t().sf(abs(t), n - 1)))
    out["t"] = t
    out["p_value"] = p
    return out


def verdict_parity(diff_ci: Mapping[str, float] | Sequence[float], margin: float) -> str:
    """Classify a paired-difference CI (method minus baseline, lower is better).

    Returns "better" (CI below 0), "worse" (CI above 0), "equivalent within ±<margin>" (CI inside
    [-margin, margin]: any real difference is smaller than the margin), or "inconclusive".
    A significant difference wins over equivalence, since it is the stronger statement.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if isinstance(diff_ci, Mapping):
        low, high = float(diff_ci["ci_low"]), float(diff_ci["ci_high"])
    else:
        low, high = (float(v) for v in diff_ci)
    if math.isnan(low) or math.isnan(high):
        return "inconclusive"
    if high < 0:
        return "better"
    if low > 0:
        return "worse"
    if -margin <= low and high <= margin:
        return f"equivalent within ±{margin:g}"
    return "inconclusive"
