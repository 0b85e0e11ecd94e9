"""Count-sketches of every fleet member at once, in a number of ops that does not grow with M.

fleet/model.py's per-member loop called `scaled_sketch` (forward) and `sketch_stats` + `rescale`
(backward) once per sketched member per layer: about a dozen launches each, thousands per fleet
step at M = 30. Here one layer's sketches of all members are a few batched ops:

1. bins and signs (M, rows) from the members' seeds (M,), exactly the ones `sketch_bins` /
   `sketch_signs` give each member alone (R_safe = max(1, min(R, rows)), as BasisLinear);
   exact members get bin i and sign +1. On CUDA one Triton launch (kernels/bins.py),
   elsewhere feistel.py's functions broadcast over a (M, 1) seed.
2. S (M, Rmax, rows), the dense signed count-sketch matrices (one-hot bins times signs; the
   identity for exact members), and the sketch torch.bmm(S, m): every product is a value
   times +-1 or 0, so the sums are the only rounding (float32 with TF32 off, as the paper's
   runs; under TF32 the bmm would round m to TF32 first). No atomics, deterministic.
3. The invariant scalars and lambda of `sketch.rescale`, per member from small (M,) tensors:
   factor sqrt(||m||^2) / (||S m|| + eps) where the member uses scalars, times (1 - lam);
   exact members get factor 1, so their rows come back unchanged.

S is kept from forward for backward, which sketches dY with it (tiny: M x Rmax x rows); there the
factor of step 3 is applied not to S dY but to the smallest tensor of the dW product it enters
(`dw_product` below; the batched head, fleet/head.py, forms no (M, Rmax, vocab) sketch at all).
The per-member constants (modes, ranks, scalars, 1 - lam) are built once per layer, device
and dtype and cached on its `FleetSketch`: a CUDA-graph captured step must not copy from the
host. Gaussian members (a dense projection, not a hashing) and fleets whose S would be large
stay on the per-member loop (`_kept_rows`, `_sketched_rows` below).

The functions at the end give the batched layers (fleet/model.py, fleet/head.py) the two
sides of their dW product, whichever path the layer takes: `kept_side` in forward, `dy_side` in
backward, `dw_product` for the product itself.
"""

from __future__ import annotations

import torch

from basis_train.core.kernels import KernelRoute
from basis_train.core.sketch import SCALE_EPS, SketchSpec, rescale, scaled_sketch, sketch_bins, sketch_signs, sketch_stats

EXACT, BALANCED, UNIFORM = 0, 1, 2  # as kernels/bins.py
_MODES = {"balanced": BALANCED, "uniform": UNIFORM}
# Elements of S (M x Rmax x rows) above which the per-member loop is used instead: the dense
# matrices and their bmm grow as rows^2 (M = 30, 64 rows: 1.2e5).
MAX_DENSE = 1 << 24
KERNELS = KernelRoute("basis_train.fleet.kernels.bins", "fleets expand their sketch seeds with PyTorch")


def safe_ranks(plans: tuple, rows: int) -> list[int]:
    """Rows each member's dW product reads: min(R, rows) (at least 1) if sketched, rows if exact."""
    return [rows if p is None else max(1, min(p.rank, rows)) for p in plans]


class _Consts:
    """One layer's per-member constants on one device, dtype and row count (see FleetSketch)."""

    def __init__(self, plans: tuple, rows: int, device: torch.device, dtype: torch.dtype) -> None:
        ranks, modes = safe_ranks(plans, rows), [EXACT if p is None else _MODES[p.kind] for p in plans]
        self.width = max(ranks)
        self.modes = torch.tensor(modes, dtype=torch.int32, device=device)
        self.ranks = torch.tensor(ranks, dtype=torch.int32, device=device)
        self.scalars = torch.tensor([p is not None and p.scalars for p in plans], device=device)
        self.shrink = torch.tensor([1.0 if p is None else 1.0 - p.lam for p in plans], dtype=dtype, device=device)
        self.rows = torch.arange(rows, device=device)
        self.bin_ids = torch.arange(self.width, device=device).view(1, -1, 1)
        # Member masks (M, 1) of the modes some member uses: the others need not be computed.
        self.has = {mode: (self.modes == mode).view(-1, 1) for mode in set(modes)}


class FleetSketch:
    """One linear layer's sketch plans for the whole fleet: per member None (exact) or the
    `SketchSpec` of its BASIS layer, as fleet/model.py reads them off the members' models."""

    def __init__(self, plans: tuple[SketchSpec | None, ...]) -> None:
        self.plans = tuple(plans)
        self.batched = not any(p is not None and p.kind not in _MODES for p in self.plans)  # no gaussian
        self._consts: dict = {}

    def use_batched(self, rows: int) -> bool:
        """Whether this layer's sketches at `rows` rows take the batched path (decided on the host)."""
        return self.batched and len(self.plans) * max(safe_ranks(self.plans, rows)) * rows <= MAX_DENSE

    def consts(self, rows: int, device: torch.device, dtype: torch.dtype) -> _Consts:
        key = (rows, device, dtype)
        if key not in self._consts:  # the eager steps before a capture fill this
            self._consts[key] = _Consts(self.plans, rows, device, dtype)
        return self._consts[key]

    def bins_and_signs(self, seeds: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32):
        """(bins (M, rows) int64, signs (M, rows) `dtype`): see the module doc, step 1."""
        c = self.consts(rows, seeds.device, dtype)
        kernels = KERNELS.on(seeds.device.type) if rows > 0 else None
        if kernels:
            bins, signs = kernels.bins_and_signs(seeds, c.modes, c.ranks, rows)
            return bins, signs.to(dtype)
        return torch_bins_and_signs(seeds, rows, c, dtype)

    def matrix(self, seeds: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """S (M, Rmax, rows): S[m, b, i] = sign of row i if row i is in bin b, else 0."""
        c = self.consts(rows, seeds.device, dtype)
        bins, signs = self.bins_and_signs(seeds, rows, dtype)
        return (bins.unsqueeze(1) == c.bin_ids).to(dtype) * signs.unsqueeze(1)

    def sketch_and_factor(self, s: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S m (M, Rmax, cols), factor (M,)): every member's sketch, not yet rescaled, and the factor
        `rescale` multiplies it by (the invariant scalars' ratio of norms, times 1 - lam; 1 for exact
        members). Callers whose S m is wide (the head's dlogits) apply the factor to a smaller
        tensor of the product it enters instead of to S m."""
        c = self.consts(m.shape[1], m.device, m.dtype)
        sk = torch.bmm(s, m)
        ratio = torch.linalg.vector_norm(m, dim=(1, 2)) / (torch.linalg.vector_norm(sk, dim=(1, 2)) + SCALE_EPS)
        return sk, torch.where(c.scalars, ratio, 1.0) * c.shrink

    def scaled(self, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Every member's `rescale(S m, ||m||^2, spec)`, (M, Rmax, cols); exact members: m."""
        sk, factor = self.sketch_and_factor(s, m)
        return sk * factor.view(-1, 1, 1)


def torch_bins_and_signs(seeds: torch.Tensor, rows: int, c: _Consts, dtype: torch.dtype):
    """The PyTorch path of `FleetSketch.bins_and_signs`: feistel.py's elementwise functions on a
    (M, 1) seed give every member's rows at once; modes pick each member's hashing."""
    s = seeds.view(-1, 1)
    ranks = c.ranks.view(-1, 1).long()
    bins = c.rows.expand(s.shape[0], rows)
    for mode, hashing in ((BALANCED, "balanced"), (UNIFORM, "uniform")):
        if mode in c.has:
            bins = torch.where(c.has[mode], sketch_bins(s, rows, ranks, hashing), bins)
    signs = sketch_signs(s, rows, dtype)
    if EXACT in c.has:
        signs = torch.where(c.has[EXACT], 1.0, signs)
    return bins, signs


# ------------------------------------------------ the two sides of a fleet's dW product
def kept_side(x: torch.Tensor, seeds: torch.Tensor, sketch: FleetSketch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kept rows of x for the dW product, S for backward or None): the batched sketch of every
    member (fleet/sketch.py) where the layer allows it, else the per-member loop."""
    rows = x.shape[1]
    if sketch.use_batched(rows):
        smat = sketch.matrix(seeds, rows, x.dtype)
        return sketch.scaled(smat, x.detach()), smat
    return _kept_rows(x, seeds, sketch.plans)[0], None


def dy_side(grad_out: torch.Tensor, width: int, seeds: torch.Tensor, smat: torch.Tensor | None,
             sketch: FleetSketch, colsum: bool = False) -> tuple[torch.Tensor, list, torch.Tensor | None]:
    """The dY side of the dW product with forward's randomness, and the per-member factor (M,)
    still to be applied to it, or None where it is applied already. With S from forward (the
    batched path) the side is S dY unscaled and the factor is `rescale`'s (the bias needs no
    column sums from it: the caller's grad_out.sum(1) serves); else `_sketched_rows`, rescaled."""
    if smat is not None:
        gk, factor = sketch.sketch_and_factor(smat.to(grad_out.dtype), grad_out)
        return gk, [None] * grad_out.shape[0], factor
    gk, sums = _sketched_rows(grad_out, width, seeds, sketch.plans, safe_ranks(sketch.plans, grad_out.shape[1]), colsum)
    return gk, sums, None


def dw_product(gk: torch.Tensor, kept: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """Every member's dW = factor[m] * gk[m]^T kept[m], (M, O, N) from gk (M, R, O) and kept (M, R, N),
    the factor applied to whichever of gk, kept and the product has the fewest elements: the head's
    kept side (M, R, 64) rather than its (M, R, vocab) dlogits sketch, one pass less over a wide
    tensor. Only rounding differs from scaling gk."""
    if factor is None:
        return torch.bmm(gk.transpose(1, 2), kept)
    f = factor.view(-1, 1, 1)
    r, o, n = gk.shape[1], gk.shape[2], kept.shape[2]
    if r * n <= min(r * o, o * n):
        return torch.bmm(gk.transpose(1, 2), kept * f)
    if r * o <= o * n:
        return torch.bmm((gk * f).transpose(1, 2), kept)
    return torch.bmm(gk.transpose(1, 2), kept).mul_(f)


def _kept_rows(x: torch.Tensor, seeds: torch.Tensor, plans: tuple) -> tuple[torch.Tensor, list[int]]:
    """What each member's dW product needs of its input, zero-padded to one row count: x itself
    (exact) or `scaled_sketch` of x with the member's seed, rank, hashing, scalars and lambda."""
    rows = x.shape[1]
    ranks = safe_ranks(plans, rows)
    if all(p is None for p in plans):
        return x, ranks
    kept = x.new_zeros(x.shape[0], max(ranks), x.shape[2])
    for m, p in enumerate(plans):
        if p is None:
            kept[m, :rows] = x[m].detach()
        else:
            kept[m, : ranks[m]] = scaled_sketch(x[m].detach(), seeds[m], p, ranks[m])
    return kept, ranks


def _sketched_rows(grad_out: torch.Tensor, width: int, seeds: torch.Tensor, plans: tuple, ranks: list[int],
                   colsum: bool = False) -> tuple[torch.Tensor, list]:
    """The dY side of each member's dW product, zero-padded to `width` rows: dY itself (exact) or
    its rescaled sketch (`sketch_stats` + `rescale`, BasisLinear's backward); with `colsum`, also
    each sketched member's column sums of dY from the same pass (None for exact members)."""
    gk = grad_out.new_zeros(grad_out.shape[0], width, grad_out.shape[2])
    sums = [None] * len(plans)
    for m, p in enumerate(plans):
        if p is None:
            gk[m, : grad_out.shape[1]] = grad_out[m]
        else:
            gs, sumsq, sums[m] = sketch_stats(grad_out[m], seeds[m], ranks[m], p.kind, colsum=colsum)
            gk[m, : ranks[m]] = rescale(gs, sumsq, p)
    return gk, sums
