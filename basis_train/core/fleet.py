"""Many GPTs of one shape as one batched model: every parameter stacked along a leading
member axis [M, ...], every layer a batched op.

A fleet is built from the members' own single-run models (`build_gpt(cfg, seed, method)`),
so each member starts from exactly the weights its single run starts from, and which of its
linear layers are BASIS layers (with which rank, hashing, scalars and lambda) is read off that
model's modules: a member is sketched where its single run is sketched, and nowhere else.

Randomness: each member keeps its single run's sketch generator. A training forward draws,
layer by layer in the order the single model runs them, one seed per sketched member from
that member's generator, so every member's stream is the one its single run would draw.

The sketches are batched over members (core/fleet_sketch.py): per layer, every member's bins
and signs come from its seed in one kernel launch (or broadcast PyTorch ops), the same ones
core/sketch.py draws for that member alone; a dense signed count-sketch matrix S (M, Rmax,
rows) (the identity for exact members) gives all sketches in one torch.bmm, rescaled with
`_scale`'s invariant scalars and lambda from per-member constants, and S is kept for the dY
sketch in backward. So the ops of a step do not grow with M, apart from the seed draws.
Fleets with a gaussian member, or whose S would be large, take the per-member loop instead
(`_kept_rows`, `_sketched_rows`: `scaled_sketch`, `_sketch_stats` + `_scale` per member).
Everything around the sketches is batched as well: the matmuls, attention, LayerNorm,
embeddings, and the final dW product, for which sketches are zero-padded to a common row count
(zero rows change neither the norms, taken before padding, nor the product).

The fused head: when a step's rows fit one chunk (the paper: 64 rows, chunks of 256) all
members' heads run as one batched fused op (`_FleetFusedCE`) whose sketched dW is
BasisLinear's; with several chunks each member calls core/head.py's
`fused_linear_cross_entropy` itself.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from basis_train.core.fleet_sketch import FleetSketch, safe_ranks
from basis_train.core.head import FusedBasisHead, FusedHead, fused_linear_cross_entropy
from basis_train.core.kernels import optional
from basis_train.core.model import GPT
from basis_train.core.sketch import _EPS, BasisLinear, _scale, _sketch_stats, draw_seed, scaled_sketch

_LN_EPS = 1e-6  # as the single model's LayerNorms


def _key(name: str) -> str:
    return name.replace(".", "__")  # parameter names may not hold dots


def _sketch_of(module: nn.Module) -> tuple | None:
    """(rank, hashing, scalars, lam) of a BASIS layer that sketches while training; None for exact."""
    if isinstance(module, BasisLinear) and module.weight.requires_grad:
        return module.rank, module.sketch, module.invariant_scalars, module.lam
    return None


class _FleetLinear(torch.autograd.Function):
    """y[m] = x[m] W[m]^T + b[m] for every member; exact dX and db; dW exact or BASIS per member.

    x (M, rows, N), weight (M, O, N), bias (M, O) or None, seeds (M,) int64 (read only for
    sketched members), sketch: the layer's FleetSketch (per member None or (rank, hashing,
    scalars, lam)).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, seeds, sketch):
        y = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)) if bias is not None else \
            torch.bmm(x, weight.transpose(1, 2))
        kept, smat = _kept(x, seeds, sketch)
        ctx.save_for_backward(kept, weight, seeds, smat)
        ctx.sketch, ctx.has_bias = sketch, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_out):
        kept, weight, seeds, smat = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(grad_out, weight.to(grad_out.dtype))
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        if need_b:
            grad_b = grad_out.sum(1, dtype=torch.promote_types(grad_out.dtype, torch.float32)).to(weight.dtype)
        if ctx.needs_input_grad[1]:
            gk, sums, factor = _dy_side(grad_out, kept.shape[1], seeds, smat, ctx.sketch, colsum=need_b)
            for m, colsum in enumerate(sums):
                if colsum is not None:
                    grad_b[m] = colsum.to(weight.dtype)
            grad_w = _dw_product(gk, kept, factor).to(weight.dtype)  # fleets train in float32
        return grad_x, grad_w, grad_b, None, None


class _FleetFusedCE(torch.autograd.Function):
    """Every member's fused head in one chunk (rows <= chunk): per-member mean cross-entropy of
    x[m] W[m]^T. The logits are formed transposed, (M, vocab, rows), so that vocabulary chunks are
    contiguous blocks. Forward, once the log-sum-exp and the targets' logits are taken, turns them
    in place into dlogits = softmax - onehot and keeps that for backward: no second
    (M, rows, vocab) product. With keep False (no gradient wanted) nothing is kept and only the
    loss is formed. Keeping it holds one (M, rows, vocab) tensor from forward to backward (386 MB
    for the paper's 30 members); a fleet's reported memory figures are its members' single-run
    probes (training/fleet.py `_measure`), so none of them changes.

    dX = dl W sums over the whole vocabulary for a tiny (rows, 64) result, which cuBLAS ran on a
    few dozen thread blocks (about 1.8 ms of a 6.6 ms step of 30 members on an H200,
    scripts/fleet_profile.py); `_dx` splits that sum over vocabulary chunks.

    The dW estimate of a sketched member is BasisLinear's: the rescaled sketch of x in forward
    times the rescaled sketch of its whole dlogits matrix (one chunk holds all of it), with the
    same bins and signs. With the batched sketch (S kept from forward) it is formed without
    the (M, Rmax, vocab) sketch of dlogits: (S dl)^T kept = dl^T (S^T kept), and the invariant
    scalar ||dl|| / ||S dl|| comes from the squared norms `_softmax_grad` adds up while it forms
    dl (one Triton pass on CUDA, core/kernels/fleet_head.py). Each member's grad_loss / rows
    scales the small (M, rows, 64) sides instead of dl, and the scalar's epsilon is divided by
    it, so the estimate is the one of scaled dlogits. Only rounding differs from BasisLinear.
    Without S (the per-member loop of large or gaussian sketches) backward sketches the scaled
    dlogits member by member (`_dy_side`).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, seeds, sketch, keep=True):
        rows = x.shape[1]
        logits_t = torch.bmm(weight, x.transpose(1, 2))  # (M, vocab, rows); becomes dlogits below
        kernels = _head_kernels_for(logits_t, None)
        lse = kernels.row_lse(logits_t) if kernels else torch.logsumexp(logits_t, dim=1)
        picked = logits_t.gather(1, targets.unsqueeze(1)).squeeze(1)
        loss = (lse - picked).sum(1) / rows
        if not keep:
            return loss
        kept, smat = (x, None) if sketch is None else _kept(x, seeds, sketch)
        sums = _softmax_grad(logits_t, lse, targets, smat)  # logits_t is dlogits^T from here on
        ctx.save_for_backward(weight, logits_t, kept, seeds, smat, *sums)
        ctx.sketch = sketch
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        weight, dl_t, kept, seeds, smat, *sums = ctx.saved_tensors
        scale = (grad_loss / dl_t.shape[2]).view(-1, 1, 1)
        grad_x = _dx(dl_t, weight).mul_(scale) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if ctx.sketch is None:
                grad_w = torch.bmm(dl_t, kept * scale)  # kept is x
            elif smat is not None:
                sumsq, sksq = sums
                c = ctx.sketch.consts(dl_t.shape[2], dl_t.device, dl_t.dtype)
                ratio = sumsq.sqrt() / (sksq.sqrt() + _EPS / scale.view(-1).abs())  # the scalar of scaled dl
                factor = torch.where(c.scalars, ratio, 1.0) * c.shrink
                side = torch.bmm(smat.transpose(1, 2), kept) * (factor.view(-1, 1, 1) * scale)
                grad_w = torch.bmm(dl_t, side)
            else:
                dl = dl_t.transpose(1, 2).mul(scale)
                gk, _, factor = _dy_side(dl, kept.shape[1], seeds, smat, ctx.sketch)
                grad_w = _dw_product(gk, kept, factor)
        return grad_x, grad_w, None, None, None, None


@functools.cache
def _vocab_chunks(vocab: int) -> int:
    """How many equal vocabulary chunks `_dx` sums over: the divisor of `vocab` whose chunks are
    closest to 2,048 entries (50257 = 29 x 1733), or 1 where `vocab` has none in 256..16384."""
    best = 1
    for c in range(2, vocab // 256 + 1):
        if vocab % c == 0 and vocab // c <= 16384 and abs(vocab // c - 2048) < abs(vocab // best - 2048):
            best = c
    return best


def _dx(dl_t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every member's dl W, (M, rows, N), from dl_t (M, vocab, rows) and weight (M, vocab, N): one batched
    product per vocabulary chunk (chunks are contiguous, so both sides are views), then their sum."""
    size, vocab, rows = dl_t.shape
    c = _vocab_chunks(vocab)
    part = torch.bmm(dl_t.reshape(size * c, vocab // c, rows).transpose(1, 2),
                     weight.reshape(size * c, vocab // c, weight.shape[2]))
    return part.view(size, c, rows, -1).sum(1)


def _softmax_grad(logits_t: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor,
                  smat: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """logits_t (M, vocab, rows) becomes (softmax - onehot) transposed in place; returns
    (||dl||^2 (M,), ||S dl||^2 (M,)), or () without S. One Triton pass where the kernel takes the
    tensors (core/kernels/fleet_head.py), else these PyTorch ops (CPU)."""
    kernels = _head_kernels_for(logits_t, smat)
    if kernels:
        sumsq, sksq = kernels.softmax_grad_(logits_t, lse, targets, smat)
        return () if smat is None else (sumsq, sksq)
    dl_t = logits_t.sub_(lse.unsqueeze(1)).exp_()
    dl_t.scatter_add_(1, targets.unsqueeze(1), dl_t.new_full((targets.shape[0], 1, targets.shape[1]), -1.0))
    if smat is None:
        return ()
    return dl_t.square().sum((1, 2)), torch.bmm(smat, dl_t.transpose(1, 2)).square().sum((1, 2))


# Device types routed to the head kernel; tests add "cpu" with an interpreted `_kernels_head`.
_HEAD_KERNEL_DEVICES = {"cuda"}
_kernels_head = None  # core/kernels/fleet_head.py once imported; False where Triton is missing


def _head_kernels_for(logits_t: torch.Tensor, smat: torch.Tensor | None, lse_only: bool = False):
    """core/kernels/fleet_head.py where it takes these tensors on their device (with `lse_only`,
    where `row_lse` takes logits_t: any float32 tensor), else None."""
    global _kernels_head
    if logits_t.device.type not in _HEAD_KERNEL_DEVICES:
        return None
    if _kernels_head is None:
        _kernels_head = optional("fleet_head", "the fleet head forms its softmax gradient with PyTorch")
    if not _kernels_head:
        return None
    ok = logits_t.dtype == torch.float32 if lse_only else _kernels_head.supports(logits_t, smat)
    return _kernels_head if ok else None


def _kept(x: torch.Tensor, seeds: torch.Tensor, sketch: FleetSketch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(kept rows of x for the dW product, S for backward or None): the batched sketch of every
    member (core/fleet_sketch.py) where the layer allows it, else the per-member loop."""
    rows = x.shape[1]
    if sketch.use_batched(rows):
        smat = sketch.matrix(seeds, rows, x.dtype)
        return sketch.scaled(smat, x.detach()), smat
    return _kept_rows(x, seeds, sketch.plans)[0], None


def _dy_side(grad_out: torch.Tensor, width: int, seeds: torch.Tensor, smat: torch.Tensor | None,
             sketch: FleetSketch, colsum: bool = False) -> tuple[torch.Tensor, list, torch.Tensor | None]:
    """The dY side of the dW product with forward's randomness, and the per-member factor (M,)
    still to be applied to it, or None where it is applied already. With S from forward (the
    batched path) the side is S dY unscaled and the factor is `_scale`'s (the bias needs no
    column sums from it: the caller's grad_out.sum(1) serves); else `_sketched_rows`, rescaled."""
    if smat is not None:
        gk, factor = sketch.sketch_and_factor(smat.to(grad_out.dtype), grad_out)
        return gk, [None] * grad_out.shape[0], factor
    gk, sums = _sketched_rows(grad_out, width, seeds, sketch.plans, safe_ranks(sketch.plans, grad_out.shape[1]), colsum)
    return gk, sums, None


def _dw_product(gk: torch.Tensor, kept: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
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
            _, kind, scalars, lam = p
            kept[m, : ranks[m]] = scaled_sketch(x[m].detach(), seeds[m], ranks[m], kind, scalars, lam)
    return kept, ranks


def _sketched_rows(grad_out: torch.Tensor, width: int, seeds: torch.Tensor, plans: tuple, ranks: list[int],
                   colsum: bool = False) -> tuple[torch.Tensor, list]:
    """The dY side of each member's dW product, zero-padded to `width` rows: dY itself (exact) or
    its rescaled sketch (`_sketch_stats` + `_scale`, BasisLinear's backward); with `colsum`, also
    each sketched member's column sums of dY from the same pass (None for exact members)."""
    gk = grad_out.new_zeros(grad_out.shape[0], width, grad_out.shape[2])
    sums = [None] * len(plans)
    for m, p in enumerate(plans):
        if p is None:
            gk[m, : grad_out.shape[1]] = grad_out[m]
        else:
            _, kind, scalars, lam = p
            gs, sumsq, sums[m] = _sketch_stats(grad_out[m], seeds[m], ranks[m], kind, colsum=colsum)
            gk[m, : ranks[m]] = _scale(gs, sumsq, lam, scalars)
    return gk, sums


class EmbeddingRows:
    """The token embedding's gradient of one training step as rows: `index` (flat rows of the members'
    tables laid end to end, member m's rows m * vocab + token, member-major) and `rows` (one gradient
    row per token, index order). Set by `_FleetEmbedding`'s backward, consumed and cleared by
    training/fleet_optim.py's FleetSGD. A dense (M, vocab, D) gradient would be zero-filled, written
    and read once more by the update: 3 x 386 MB per step at the paper's 30 members, for 64 rows a
    member."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None


class _FleetEmbedding(torch.autograd.Function):
    """The members' token embeddings, F.embedding on their tables laid end to end; backward leaves the
    table's .grad alone and hands its gradient rows to `holder` (EmbeddingRows)."""

    @staticmethod
    def forward(ctx, flat_idx, table, holder):
        ctx.save_for_backward(flat_idx)
        ctx.holder = holder
        return F.embedding(flat_idx, table.reshape(-1, table.shape[-1]))

    @staticmethod
    def backward(ctx, grad_out):
        (flat_idx,) = ctx.saved_tensors
        if ctx.holder.rows is not None:  # else the table would silently never train
            raise RuntimeError("the token embedding's gradient rows of the last step were never used: the "
                               "optimiser must take them (FleetSGD(..., sparse={index: holder}))")
        ctx.holder.index = flat_idx.reshape(-1)
        ctx.holder.rows = grad_out.reshape(-1, grad_out.shape[-1])
        return None, None, None


class FleetGPT(nn.Module):
    """M members of core/model.py's GPT, all of one GPTConfig shape and head type."""

    # The one-chunk batched fused head: None picks it on CUDA only. On CPU it was slower than each
    # member running core/head.py: with the per-member sketch loop its row gather of the wide dlogits
    # took 0.5 s against 5 ms (64 x 50257, two threads against one on a busy 2-core machine); with the
    # batched sketch a step of 4 members (64 rows, vocab 50257) still took 206 ms against 147 ms.
    batched_head: bool | None = None

    def __init__(self, members: list[GPT], generators: list[torch.Generator | None]) -> None:
        super().__init__()
        if not members or len(members) != len(generators):
            raise ValueError("a fleet needs one generator (or None) per member, and at least one member")
        first = members[0]
        shape = _shape(first)
        for g in members[1:]:
            if _shape(g) != shape:
                raise ValueError(f"fleet members must share the model shape and head type: {_shape(g)} != {shape}")
        self.cfg, self.size = first.cfg, len(members)
        self.head_kind = "fused" if isinstance(first.lm_head, (FusedHead, FusedBasisHead)) else "plain"
        self.generators = list(generators)
        self.names = [n for n, _ in first.named_parameters()]
        self.params = nn.ParameterDict({
            _key(n): nn.Parameter(torch.stack([dict(g.named_parameters())[n].detach() for g in members]))
            for n in self.names
        })
        # Per linear layer, per member: how its weight gradient is formed (None: exact).
        linears = [n for n, mod in first.named_modules() if isinstance(mod, nn.Linear)]
        self.plans = {n: tuple(_sketch_of(g.get_submodule(n)) for g in members) for n in linears}
        # Their batched sketches, each caching its per-member constants (core/fleet_sketch.py).
        self.sketches = {n: FleetSketch(plans) for n, plans in self.plans.items()}
        for n, plans in self.plans.items():
            for m, p in enumerate(plans):
                if p is not None and generators[m] is None:
                    raise ValueError(f"member {m} sketches {n} but has no sketch generator")
        self.chunk = getattr(first.lm_head, "chunk", None)
        self.embedding_rows: EmbeddingRows | None = None  # see `sparse_embedding_grad`

    def sparse_embedding_grad(self) -> EmbeddingRows:
        """From now on training steps leave wte's .grad None and put its gradient rows in the returned
        EmbeddingRows, for an optimiser that updates from them (FleetSGD's `sparse`)."""
        self.embedding_rows = EmbeddingRows()
        return self.embedding_rows

    def sketching_generators(self) -> list[torch.Generator]:
        """The generators a training step draws from (a CUDA graph must register each)."""
        return [g for m, g in enumerate(self.generators) if any(p[m] is not None for p in self.plans.values())]

    def p(self, name: str) -> torch.Tensor:
        return self.params[_key(name)]

    # ------------------------------------------------------------------ layers
    def _seeds(self, plans: tuple, device: torch.device) -> torch.Tensor:
        """One fresh seed per sketched member (0 for the others), each from its own generator."""
        if not (self.training and torch.is_grad_enabled()) or all(p is None for p in plans):
            return torch.zeros(self.size, dtype=torch.int64, device=device)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return torch.stack([zero if p is None else draw_seed(device, self.generators[m]) for m, p in enumerate(plans)])

    def _linear(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x (M, ..., N) -> (M, ..., O) through every member's layer `name`."""
        w = self.p(f"{name}.weight")
        b = self.params[_key(f"{name}.bias")] if _key(f"{name}.bias") in self.params else None
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        training = self.training and torch.is_grad_enabled()
        plans = self.plans[name] if training else (None,) * self.size
        if all(p is None for p in plans):
            y = torch.baddbmm(b.unsqueeze(1), flat, w.transpose(1, 2)) if b is not None else torch.bmm(flat, w.transpose(1, 2))
        else:
            y = _FleetLinear.apply(flat, w, b, self._seeds(plans, x.device), self.sketches[name])
        return y.view(*x.shape[:-1], w.shape[1])

    def _layer_norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        y = F.layer_norm(x, x.shape[-1:], eps=_LN_EPS)
        return y * self.p(f"{name}.weight").view(shape) + self.p(f"{name}.bias").view(shape)

    def _attention(self, name: str, x: torch.Tensor) -> torch.Tensor:
        mc, b, t, d = x.shape
        h = self.cfg.n_head
        q, k, v = (self._linear(f"{name}.{p}", x).view(mc * b, t, h, d // h).transpose(1, 2) for p in "qkv")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self._linear(f"{name}.out", y.transpose(1, 2).reshape(mc, b, t, d))

    def _block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        pre = f"blocks.{i}"
        x = x + self._attention(f"{pre}.attn", self._layer_norm(f"{pre}.ln1", x))
        hidden = F.gelu(self._linear(f"{pre}.mlp.fc", self._layer_norm(f"{pre}.ln2", x)), approximate="tanh")
        return x + self._linear(f"{pre}.mlp.proj", hidden)

    def trunk(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (M, B, T) -> ln_f output (M, B, T, D)."""
        mc, _, t = idx.shape
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
        wte = self.p("wte.weight")
        vocab = wte.shape[1]
        # One lookup into the members' tables laid end to end: member m's ids move by m * vocab.
        offset = (torch.arange(mc, device=idx.device) * vocab).view(mc, 1, 1)
        if self.embedding_rows is not None and self.training and torch.is_grad_enabled():
            x = _FleetEmbedding.apply(idx + offset, wte, self.embedding_rows)
        else:
            x = F.embedding(idx + offset, wte.reshape(mc * vocab, -1))
        x = x + self.p("wpe.weight")[:, :t].unsqueeze(1)
        for i in range(self.cfg.n_layer):
            x = self._block(i, x)
        return self._layer_norm("ln_f", x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-member mean cross-entropy (M,) of a training (or no-grad) step; idx, targets (M, B, T)."""
        h = self.trunk(idx)
        if self.head_kind == "plain":
            logits = self._linear("lm_head", h)
            per_row = F.cross_entropy(logits.float().flatten(0, 2), targets.reshape(-1), reduction="none")
            return per_row.view(self.size, -1).mean(1)
        training = self.training and torch.is_grad_enabled()
        plans = self.plans["lm_head"]
        batched = h.is_cuda if self.batched_head is None else self.batched_head
        if batched and h.shape[1] * h.shape[2] <= self.chunk:  # one chunk: every member's head in one op
            plans = plans if training else (None,) * self.size
            sketch = None if all(p is None for p in plans) else self.sketches["lm_head"]
            return _FleetFusedCE.apply(h.flatten(1, 2), self.p("lm_head.weight"), targets.flatten(1),
                                       self._seeds(plans, h.device), sketch, torch.is_grad_enabled())
        rows = h.flatten(1, 2).unbind(0)  # unbind: its backward stacks the members' dX in one copy
        weights = self.p("lm_head.weight").unbind(0)
        losses = []
        for m in range(self.size):
            sketch = None
            if training and plans[m] is not None:
                sketch = (*plans[m], self.generators[m])  # the fused head draws its seed itself, as alone
            losses.append(fused_linear_cross_entropy(rows[m], weights[m], targets[m].reshape(-1), self.chunk, sketch))
        return torch.stack(losses)

    @torch.no_grad()
    def eval_loss_sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy per member (M,) float64 of one batch (B, T) that every member scores:
        full float32 logits of one member at a time ((B, T, vocab) is the large tensor). Where the
        head kernels run (CUDA), the logits are formed transposed and the cross-entropy is their
        log-sum-exp from one read (core/kernels/fleet_head.py `row_lse`) minus the targets' logits;
        elsewhere F.cross_entropy, as the single run's evaluation. The two differ by rounding."""
        h = self.trunk(x.expand(self.size, *x.shape)).flatten(1, 2)  # (M, tokens, D)
        w = self.p("lm_head.weight")
        out = torch.zeros(self.size, dtype=torch.float64, device=x.device)
        targets = y.reshape(1, -1)
        kernels = _head_kernels_for(h, None, lse_only=True)
        for m in range(self.size):
            if kernels:
                logits_t = (w[m] @ h[m].t()).unsqueeze(0)  # (1, vocab, tokens)
                lse = kernels.row_lse(logits_t)
                out[m] = (lse - logits_t[0].gather(0, targets)).sum(dtype=torch.float64)
            else:
                out[m] = F.cross_entropy(F.linear(h[m], w[m]).float(), y.flatten(), reduction="sum")
        return out


def _shape(model: GPT) -> tuple:
    c = model.cfg
    head = "fused" if isinstance(model.lm_head, (FusedHead, FusedBasisHead)) else "plain"
    return (c.vocab_size, c.block_size, c.n_embd, c.n_head, c.n_layer, c.mlp_ratio, head, c.head_chunk)
