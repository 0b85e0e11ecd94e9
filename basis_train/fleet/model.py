"""Many GPTs of one shape as one batched model: every parameter stacked along a leading
member axis [M, ...], every layer a batched op.

A fleet is built from the members' own single-run models (`build_gpt(cfg, seed, method)`),
so each member starts from exactly the weights its single run starts from, and which of its
linear layers are BASIS layers (with which rank, hashing, scalars and lambda) is read off that
model's modules: a member is sketched where its single run is sketched, and nowhere else.

Randomness: each member keeps its single run's sketch generator. A training forward draws,
layer by layer in the order the single model runs them, one seed per sketched member from
that member's generator, so every member's stream is the one its single run would draw.

The sketches are batched over members (fleet/sketch.py): per layer, every member's bins
and signs come from its seed in one kernel launch (or broadcast PyTorch ops), the same ones
core/sketch.py draws for that member alone; a dense signed count-sketch matrix S (M, Rmax,
rows) (the identity for exact members) gives all sketches in one torch.bmm, rescaled with
`rescale`'s invariant scalars and lambda from per-member constants, and S is kept for the dY
sketch in backward. So the ops of a step do not grow with M, apart from the seed draws.
Fleets with a gaussian member, or whose S would be large, take the per-member loop instead
(fleet/sketch.py `_kept_rows`, `_sketched_rows`: `scaled_sketch`, `sketch_stats` +
`rescale` per member).
Everything around the sketches is batched as well: the matmuls, attention, LayerNorm,
embeddings, and the final dW product, for which sketches are zero-padded to a common row count
(zero rows change neither the norms, taken before padding, nor the product).

The fused head: when a step's rows fit one chunk (the paper: 64 rows, chunks of 256) all
members' heads run as one batched fused op (fleet/head.py `FleetFusedCE`) whose sketched
dW is BasisLinear's; with several chunks each member calls core/head.py's
`fused_linear_cross_entropy` itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from basis_train.core.basis_linear import BasisLinear
from basis_train.core.head import FusedBasisHead, FusedHead, fused_linear_cross_entropy
from basis_train.core.model import GPT
from basis_train.core.sketch import SketchSpec, draw_seed
from basis_train.fleet.head import FleetFusedCE, head_kernels_for
from basis_train.fleet.sketch import FleetSketch, dw_product, dy_side, kept_side

_LN_EPS = 1e-6  # as the single model's LayerNorms


def _key(name: str) -> str:
    return name.replace(".", "__")  # parameter names may not hold dots


def _sketch_of(module: nn.Module) -> SketchSpec | None:
    """The spec of a BASIS layer that sketches while training; None for exact."""
    if isinstance(module, BasisLinear) and module.weight.requires_grad:
        return module.spec
    return None


class FleetLinear(torch.autograd.Function):
    """y[m] = x[m] W[m]^T + b[m] for every member; exact dX and db; dW exact or BASIS per member.

    x (M, rows, N), weight (M, O, N), bias (M, O) or None, seeds (M,) int64 (read only for
    sketched members), sketch: the layer's FleetSketch (per member None or (rank, hashing,
    scalars, lam)).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, seeds, sketch):
        y = torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2)) if bias is not None else \
            torch.bmm(x, weight.transpose(1, 2))
        kept, smat = kept_side(x, seeds, sketch)
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
            gk, sums, factor = dy_side(grad_out, kept.shape[1], seeds, smat, ctx.sketch, colsum=need_b)
            for m, colsum in enumerate(sums):
                if colsum is not None:
                    grad_b[m] = colsum.to(weight.dtype)
            grad_w = dw_product(gk, kept, factor).to(weight.dtype)  # fleets train in float32
        return grad_x, grad_w, grad_b, None, None


class EmbeddingRows:
    """The token embedding's gradient of one training step as rows: `index` (flat rows of the members'
    tables laid end to end, member m's rows m * vocab + token, member-major) and `rows` (one gradient
    row per token, index order). Set by `_FleetEmbedding`'s backward, consumed and cleared by
    fleet/optim.py's FleetSGD. A dense (M, vocab, D) gradient would be zero-filled, written
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
        # Their batched sketches, each caching its per-member constants (fleet/sketch.py).
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
            y = FleetLinear.apply(flat, w, b, self._seeds(plans, x.device), self.sketches[name])
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
            return FleetFusedCE.apply(h.flatten(1, 2), self.p("lm_head.weight"), targets.flatten(1),
                                       self._seeds(plans, h.device), sketch, torch.is_grad_enabled())
        rows = h.flatten(1, 2).unbind(0)  # unbind: its backward stacks the members' dX in one copy
        weights = self.p("lm_head.weight").unbind(0)
        losses = []
        for m in range(self.size):
            spec = plans[m] if training else None  # the fused head draws its seed itself, as alone
            losses.append(fused_linear_cross_entropy(rows[m], weights[m], targets[m].reshape(-1), self.chunk, spec,
                                                     generator=self.generators[m]))
        return torch.stack(losses)

    @torch.no_grad()
    def eval_loss_sums(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy per member (M,) float64 of one batch (B, T) that every member scores:
        full float32 logits of one member at a time ((B, T, vocab) is the large tensor). Where the
        head kernels run (CUDA), the logits are formed transposed and the cross-entropy is their
        log-sum-exp from one read (fleet/kernels/head.py `row_lse`) minus the targets' logits;
        elsewhere F.cross_entropy, as the single run's evaluation. The two differ by rounding."""
        h = self.trunk(x.expand(self.size, *x.shape)).flatten(1, 2)  # (M, tokens, D)
        w = self.p("lm_head.weight")
        out = torch.zeros(self.size, dtype=torch.float64, device=x.device)
        targets = y.reshape(1, -1)
        kernels = head_kernels_for(h, None, lse_only=True)
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
