from __future__ import annotations

import math

import pytest

from basis_train.reporting.stats import mean_ci, paired_diff, verdict_parity


def test_mean_ci_by_hand():
    r = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert r["n"] == 5 and r["mean"] == pytest.approx(3.0)
    assert r["std"] == pytest.approx(math.sqrt(2.5))
    assert r["sem"] == pytest.approx(math.sqrt(0.5))
    half = 2.7764451052 * math.sqrt(0.5)
    assert r["half_width"] == pytest.approx(half, abs=1e-8)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((3 - half, 3 + half), abs=1e-8)


@pytest.mark.parametrize(("n", "t975"), [(2, 12.7062047), (3, 4.3026527), (10, 2.2621572), (30, 2.0452296)])
def test_mean_ci_uses_the_t_quantile(n, t975):
    # values 0, 1, 0, 1, ...: the half width is t_{0.975, n-1} * sem, from a printed t table
    r = mean_ci([float(i % 2) for i in range(n)])
    assert r["half_width"] == pytest.approx(t975 * r["sem"], abs=1e-6)


def test_mean_ci_two_values_and_level():
    r = mean_ci([6.0, 7.0], level=0.9)  # df = 1: t_{0.95,1} = 6.3137515
    assert r["std"] == pytest.approx(math.sqrt(0.5))
    assert r["half_width"] == pytest.approx(6.3137515147 * 0.5, abs=1e-8)


def test_mean_ci_single_and_empty():
    r = mean_ci([6.5])
    assert r["n"] == 1 and r["mean"] == 6.5
    assert all(math.isnan(r[k]) for k in ("std", "sem", "ci_low", "ci_high", "half_width"))
    r = mean_ci([])
    assert r["n"] == 0 and math.isnan(r["mean"])


def test_paired_ci_excludes_zero_where_unpaired_cis_overlap():
    # Seeds differ a lot (1..5) but b is consistently 0.08-0.12 worse than a on every seed.
    a = [1.0, 2.0, 3.0, 4.0, 5.0]
    b = [1.10, 2.12, 3.08, 4.11, 5.09]
    ca, cb = mean_ci(a), mean_ci(b)
    assert ca["ci_high"] > cb["ci_low"] and cb["ci_high"] > ca["ci_low"]  # unpaired: overlap
    d = paired_diff(a, b)
    # d = -(0.10, 0.12, 0.08, 0.11, 0.09): mean -0.1, deviations (0, -.02, .02, -.01, .01)
    # var = 0.001 / 4 = 0.00025, sem = sqrt(0.00025 / 5) = 0.0070711, t = -10 sqrt(2)
    assert d["n"] == 5 and d["mean"] == pytest.approx(-0.1, abs=1e-12)
    assert d["std"] == pytest.approx(math.sqrt(0.00025), rel=1e-9)
    assert d["sem"] == pytest.approx(math.sqrt(0.00005), rel=1e-9)
    assert d["t"] == pytest.approx(-10 * math.sqrt(2), rel=1e-9)
    half = 2.7764451052 * math.sqrt(0.00005)
    assert d["ci_low"] == pytest.approx(-0.1 - half, abs=1e-9)
    assert d["ci_high"] == pytest.approx(-0.1 + half, abs=1e-9)
    assert d["ci_high"] < 0
    # df = 4 closed form: p = 2 P(T > |t|) = 1 - u (1 + (1 - u^2)/2), u^2 = t^2 / (t^2 + 4)
    u = math.sqrt(200 / 204)
    assert d["p_value"] == pytest.approx(1 - u * (1 + 2 / 204), rel=1e-9)
    assert d["p_value"] == pytest.approx(1.4513e-4, rel=1e-3)
    assert d["n_better"] == 5 and d["n_worse"] == 0
    assert verdict_parity(d, margin=0.05) == "better"


def test_paired_diff_df1_p_value():
    d = paired_diff([1.0, 2.0], [0.0, 0.0])  # diffs 1, 2: mean 1.5, sem 0.5, t = 3
    assert d["t"] == pytest.approx(3.0)
    assert d["p_value"] == pytest.approx(1 - 2 * math.atan(3.0) / math.pi, rel=1e-12)
    assert d["n_better"] == 0 and d["n_worse"] == 2


def test_paired_diff_degenerate():
    same = paired_diff([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["mean"] == 0 and same["p_value"] == 1.0 and same["n_better"] == 0
    shifted = paired_diff([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert shifted["p_value"] == 0.0 and shifted["n_better"] == 3
    one = paired_diff([1.0], [2.0])
    assert one["mean"] == -1.0 and math.isnan(one["p_value"]) and math.isnan(one["ci_low"])
    with pytest.raises(ValueError):
        paired_diff([1.0, 2.0], [1.0])


@pytest.mark.parametrize(("ci", "margin", "expected"), [
    ((-0.3, -0.1), 0.05, "better"),
    ((-0.03, -0.01), 0.05, "better"),  # significant wins over equivalent
    ((0.01, 0.2), 0.05, "worse"),
    ((-0.02, 0.03), 0.05, "equivalent within ±0.05"),
    ((-0.05, 0.05), 0.05, "equivalent within ±0.05"),
    ((-0.02, 0.08), 0.05, "inconclusive"),
    ((-0.2, 0.2), 0.05, "inconclusive"),
    ((math.nan, math.nan), 0.05, "inconclusive"),
])
def test_verdict_parity(ci, margin, expected):
    assert verdict_parity(ci, margin) == expected
    assert verdict_parity({"ci_low": ci[0], "ci_high": ci[1]}, margin) == expected


def test_verdict_rejects_negative_margin():
    with pytest.raises(ValueError):
        verdict_parity((-1.0, 1.0), -0.1)
