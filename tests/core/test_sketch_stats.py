"""Statistics of the sort-free balanced family (feistel.py): pair collisions and signs."""

import pytest
import torch

from basis_train.core.sketch import sketch_bins, sketch_signs

DRAWS = 4000


def draws(rows, rank):
    seeds = [torch.tensor(s) for s in range(DRAWS)]
    return (torch.stack([sketch_bins(s, rows, rank) for s in seeds]),
            torch.stack([sketch_signs(s, rows, torch.float64) for s in seeds]))


def z(freq, p):
    return abs(freq - p) / (p * (1 - p) / DRAWS) ** 0.5


@pytest.mark.parametrize("rows,rank", [(24, 8), (13, 3), (64, 32)])
def test_two_rows_share_a_bin_as_under_a_uniform_permutation(rows, rank):
    # A uniform permutation puts rows i != j together with probability sum_b c_b (c_b - 1) / (B (B - 1)),
    # (ceil(B/R) - 1) / (B - 1) when R divides B.
    bins, _ = draws(rows, rank)
    sizes = torch.bincount(torch.arange(rows) % rank).double()
    p = ((sizes * (sizes - 1)).sum() / (rows * (rows - 1))).item()
    for i, j in [(0, 1), (0, rows - 1), (rows // 2, rows // 2 + 1), (3, 7)]:
        assert z((bins[:, i] == bins[:, j]).double().mean().item(), p) < 4.5, (i, j)


def test_signs_are_fair_independent_and_independent_of_bins():
    rows, rank = 24, 8
    bins, signs = draws(rows, rank)
    se = DRAWS**-0.5
    assert (signs.mean(0).abs() / se).max() < 4.5  # fair
    assert abs((signs[:, 0] * signs[:, 1]).mean()) / se < 4.5  # pairwise independent
    together = bins[:, 0] == bins[:, 1]
    # What unbiasedness needs: E[s_i s_j | i, j share a bin] = 0.
    n = together.sum().item()
    assert n > 100
    assert abs((signs[together, 0] * signs[together, 1]).mean()) / n**-0.5 < 4.5
    assert abs(signs[together, 0].mean()) / n**-0.5 < 4.5


def test_pair_check_rejects_a_weak_bijection(monkeypatch):
    # Power: with 2 Feistel rounds instead of 6 the bijection is far from a uniform permutation, and the
    # same pair statistic (same draws, same threshold) must notice it on some pair.
    from basis_train.core import feistel

    monkeypatch.setattr(feistel, "ROUNDS", 2)
    rows, rank = 13, 3
    bins, _ = draws(rows, rank)
    sizes = torch.bincount(torch.arange(rows) % rank).double()
    p = ((sizes * (sizes - 1)).sum() / (rows * (rows - 1))).item()
    worst = max(z((bins[:, i] == bins[:, j]).double().mean().item(), p) for i in range(rows) for j in range(i))
    assert worst > 4.5
