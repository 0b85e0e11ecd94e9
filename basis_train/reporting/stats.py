"""Small-sample statistics for comparing runs across seeds, without scipy.

The Student-t CDF goes through the regularized incomplete beta function (continued fraction,
modified Lentz), and the quantile inverts it with a bracketed Newton iteration, so both are good to
~1e-12 rather than the few digits of a closed-form approximation. With 3-10 seeds the t quantile is
far from the normal one (12.7 vs 1.96 at n = 2), which is the whole point of using it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

_TINY = 1e-300
_EPS = 1e-15
# Beyond this many degrees of freedom t and the normal differ by < 1e-15: use the normal.
_NORMAL_DF = 1e15


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction for I_x(a, b); converges fast for x < (a + 1) / (a + b + 2)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        # even step of the fraction
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        # odd step
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _lgamma_ratio(a: float, b: float) -> float:
    """log Gamma(a + b) - log Gamma(a), without the cancellation of two huge lgammas."""
    if a < 10.0:
        return math.lgamma(a + b) - math.lgamma(a)
    # Stirling series difference; terms kept up to 1/a^3, far below double precision for a >= 10.
    ab = a + b
    return ((a - 0.5) * math.log1p(b / a) + b * math.log(ab) - b
            + (1.0 / ab - 1.0 / a) / 12.0 - (1.0 / ab ** 3 - 1.0 / a ** 3) / 360.0)


def _lbeta_inv(a: float, b: float) -> float:
    """-log B(a, b) = lgamma(a + b) - lgamma(a) - lgamma(b)."""
    if a < b:
        a, b = b, a
    return _lgamma_ratio(a, b) - math.lgamma(b)


def betainc(a: float, b: float, x: float, y: float | None = None) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1.

    `y` = 1 - x may be passed when the caller knows it more precisely than 1 - x rounds to
    (x near 1 with a huge `a`, as in the t distribution with many degrees of freedom).
    """
    if a <= 0 or b <= 0:
        raise ValueError(f"betainc needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc needs 0 <= x <= 1, got {x}")
    if y is None:
        y = 1.0 - x
    if x == 0.0 or y == 0.0:
        return 0.0 if x == 0.0 else 1.0
    log_x = math.log(x) if x < 0.5 else math.log1p(-y)
    log_y = math.log(y) if y < 0.5 else math.log1p(-x)
    log_front = _lbeta_inv(a, b) + a * log_x + b * log_y
    # Use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) on whichever side the fraction converges.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, y) / b


def _check_df(df: float) -> None:
    if not df > 0:
        raise ValueError(f"degrees of freedom must be > 0, got {df}")


def _beta_xy(t: float, df: float) -> tuple[float, float]:
    """(df / (df + t^2), t^2 / (df + t^2)), each computed directly and without overflowing t^2."""
    if abs(t) <= math.sqrt(df):
        r2 = t * t / df
        return 1.0 / (1.0 + r2), r2 / (1.0 + r2)
    u2 = (math.sqrt(df) / t) ** 2
    return u2 / (1.0 + u2), 1.0 / (1.0 + u2)


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with `df` degrees of freedom (df may be math.inf)."""
    _check_df(df)
    if math.isnan(t):
        return math.nan
    if df > _NORMAL_DF:
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    # Two-tailed mass beyond |t| is I_{df/(df+t^2)}(df/2, 1/2); computing the small tail
    # directly keeps full relative precision for tiny p-values.
    tail = 0.5 * betainc(0.5 * df, 0.5, *_beta_xy(t, df))
    return tail if t > 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t."""
    return t_sf(-t, df)


def t_pdf(t: float, df: float) -> float:
    _check_df(df)
    if df > _NORMAL_DF:
        return math.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    log_norm = _lgamma_ratio(0.5 * df, 0.5) - 0.5 * math.log(df * math.pi)
    r2 = t * t / df if abs(t) <= math.sqrt(df) else None
    if r2 is not None:
        log_kernel = math.log1p(r2)
    else:  # log(1 + t^2/df) without forming t^2, which overflows for heavy-tailed quantiles
        u = math.sqrt(df) / abs(t)
        log_kernel = -2.0 * math.log(u) + math.log1p(u * u)
    return math.exp(log_norm - 0.5 * (df + 1) * log_kernel)


def _normal_guess(q: float) -> float:
    """Rough upper-tail normal quantile (Abramowitz-Stegun 26.2.23), a Newton starting point."""
    r = math.sqrt(-2.0 * math.log(q))
    return r - (2.515517 + 0.802853 * r + 0.010328 * r * r) / (
        1.0 + 1.432788 * r + 0.189269 * r * r + 0.001308 * r ** 3)


def t_quantile(p: float, df: float) -> float:
    """Inverse CDF of Student's t: the t with P(T <= t) = p."""
    _check_df(df)
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"probability must be in [0, 1], got {p}")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    if p == 0.5:
        return 0.0
    # Solve in the smaller tail: 1 - p is exact for p >= 0.5, whereas 1 - (1 - p) for a tiny p
    # would already have lost most of its digits.
    if p < 0.5:
        return -_upper_quantile(p, df)
    return _upper_quantile(1.0 - p, df)


def _upper_quantile(q: float, df: float) -> float:
    """The t > 0 with P(T > t) = q, for 0 < q < 0.5."""
    if df == 1.0:
        return 1.0 / math.tan(math.pi * q)  # cot keeps precision as q -> 0
    if df == 2.0:
        return (1.0 - 2.0 * q) / math.sqrt(2.0 * q * (1.0 - q))
    z = _normal_guess(q)
    if df > _NORMAL_DF:
        guess = z
    else:
        # Cornish-Fisher expansion in 1/df: a close start for moderate df.
        guess = z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df * df)
    lo, hi = 0.0, max(guess, 1e-3)
    while t_sf(hi, df) > q:  # grow the bracket until it holds the root; heavy tails need this
        lo, hi = hi, hi * 2.0
        if hi > 1e300:
            return math.inf
    t = guess if lo < guess < hi else 0.5 * (lo + hi)
    for _ in range(200):
        f = t_sf(t, df) - q
        if f > 0:
            lo = t
        else:
            hi = t
        dens = t_pdf(t, df)
        step = f / dens if dens > 0 else math.inf
        new = t + step
        if not lo < new < hi:  # Newton left the bracket: bisect instead
            new = 0.5 * (lo + hi)
        if abs(new - t) <= 1e-13 * max(1.0, abs(new)):
            return new
        t = new
    return t


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
    half = t_quantile(0.5 + level / 2.0, n - 1) * sem
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
        p = min(1.0, 2.0 * t_sf(abs(t), n - 1))
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
