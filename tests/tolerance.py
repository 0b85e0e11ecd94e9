"""Tolerances for float32 sums, set from the arithmetic rather than from what one machine printed.

A float32 sum of n terms, in any order (recursive, blocked, pairwise, a BLAS kernel's own), is off
from the exact sum by at most lambda * sqrt(n) * u * sum|terms|, u = 2^-24, with probability at
least 1 - 2n exp(-lambda^2 / 2) (Higham & Mary, "A new approach to probabilistic rounding error
analysis", SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4, for inner products; a sum is the
inner product with ones). lambda = 7 makes the failure chance per entry below 5e-11 * n. The
worst-case bound (n u instead of sqrt(n) u) would be 224 times looser at n = 50,257 and could
not tell a dropped term from rounding; exact-integer inputs test the indexing instead (see
`small_integers`)."""

import math

import torch

U32 = 2.0**-24
LAMBDA = 7.0


def fp32_sum_bound(abs_sum: torch.Tensor, n: int) -> torch.Tensor:
    """The bound above, per entry: `abs_sum` holds each entry's sum of |terms| (float64)."""
    return LAMBDA * math.sqrt(n) * U32 * abs_sum.double()


def assert_fp32_sum_close(got: torch.Tensor, exact: torch.Tensor, abs_sum: torch.Tensor, n: int, msg: str = ""):
    """`got`, a float32 sum of n terms per entry, against the float64 `exact`, within the bound."""
    err = (got.double() - exact.double()).abs()
    bound = fp32_sum_bound(abs_sum, n).expand_as(err)
    worst = (err / bound.clamp_min(1e-300)).max().item()
    assert bool((err <= bound).all()), f"{msg}: float32 sum of {n} terms off by up to {worst:.3g} x the bound"


def small_integers(*shape: int, generator: torch.Generator, high: int = 4) -> torch.Tensor:
    """float32 integers in [-high, high): products and any partial sums below 2^24 are exact in float32
    whatever the order, so a sum over them must equal the float64 one exactly; a dropped, doubled or
    misplaced term shows."""
    return torch.randint(-high, high, shape, generator=generator).float()
