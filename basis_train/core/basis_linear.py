"""`BasisLinear`, the drop-in `nn.Linear` whose weight gradient is a BASIS estimate, and its autograd
function: exact forward, exact dX and db, dW from the count-sketches of X and dY (core/sketch.py),
through the operators of core/sketch_ops.py."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from basis_train.core.sketch import SketchSpec, draw_seed, mm_float32
from basis_train.core.sketch_ops import sketch_colsum_op, sketch_op


def _weight_grad(gs: torch.Tensor, xs: torch.Tensor, grad_dtype: torch.dtype) -> torch.Tensor:
    """gs^T xs. Under bf16/fp16 autocast on CUDA on tensor cores with float32 accumulation;
    float32 inputs (the paper's protocol) keep the float32 product and its TF32 setting."""
    if gs.is_cuda and grad_dtype in (torch.bfloat16, torch.float16):
        return mm_float32(gs.t().to(grad_dtype), xs.to(grad_dtype))
    return gs.t() @ xs


class BasisLinearFunction(torch.autograd.Function):
    """Exact forward, exact dX and db, count-sketched dW. Inputs are 2-D (rows, features)."""

    @staticmethod
    def forward(ctx, x, weight, bias, seed, spec: SketchSpec):
        # R_safe = min(R, B); at least one bin so that an empty batch gives an empty sketch.
        r = max(1, min(spec.rank, x.shape[0]))
        # The sketch reads x as given (under autocast the matmul below may read a bf16
        # cast of it) and always sums in float32.
        xs = sketch_op(x.detach(), seed, r, spec)
        ctx.save_for_backward(xs, seed, weight)
        ctx.rank, ctx.spec, ctx.x_dtype, ctx.has_bias = r, spec, x.dtype, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        xs, seed, weight = ctx.saved_tensors
        r, spec, x_dtype, has_bias = ctx.rank, ctx.spec, ctx.x_dtype, ctx.has_bias
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(grad_out.dtype)).to(x_dtype)
        need_b = has_bias and ctx.needs_input_grad[2]
        if ctx.needs_input_grad[1]:
            # One pass over dY: its sketch, its norm and (for the bias) its column sums.
            if need_b:
                gs, colsum = sketch_colsum_op(grad_out, seed, r, spec)
                grad_b = colsum.to(weight.dtype)
            else:
                gs = sketch_op(grad_out, seed, r, spec)
            grad_w = _weight_grad(gs, xs, grad_out.dtype).to(weight.dtype)
        elif need_b:
            grad_b = grad_out.sum(0, dtype=torch.promote_types(grad_out.dtype, torch.float32)).to(weight.dtype)
        return grad_x, grad_w, grad_b, None, None


_salts = itertools.count()


class BasisLinear(nn.Linear):
    """Drop-in `nn.Linear` whose weight gradient is a BASIS estimate while training.

    Same parameters and state_dict as nn.Linear. In eval mode, under no_grad, or when the
    weight needs no gradient it is an ordinary linear layer (nothing to estimate, so no sketch).

    `sketch` is a kind from SKETCH_KINDS. `seed`, when set, is used instead of drawing one
    from `generator`: activation checkpointing sets it so that the recompute of a forward
    sketches with that forward's seed (see model.py).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        rank: int = 32,
        sketch: str = "balanced",
        invariant_scalars: bool = True,
        lam: float = 0.01,
        device=None,
        dtype=None,
    ) -> None:
        spec = SketchSpec(rank, sketch, bool(invariant_scalars), float(lam))
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = spec
        self.generator: torch.Generator | None = None
        self.seed: torch.Tensor | None = None
        self._salt = next(_salts)

    # The spec's fields under the names the rest of the package reads.
    rank = property(lambda self: self.spec.rank)
    sketch = property(lambda self: self.spec.kind)
    invariant_scalars = property(lambda self: self.spec.scalars)
    lam = property(lambda self: self.spec.lam)

    def sketching(self) -> bool:
        """Whether a forward now draws a sketch (training, grad on, a weight that wants a gradient)."""
        return self.training and torch.is_grad_enabled() and self.weight.requires_grad

    def take_seed(self, x: torch.Tensor) -> torch.Tensor:
        """This forward's sketch seed: the one set from outside (the training step or a
        checkpointed block's recompute), else a fresh draw: eagerly from `generator`, or under
        torch.compile as an opaque op on the global generator that no recompute re-runs."""
        if self.seed is not None:
            return self.seed
        if torch.compiler.is_compiling():
            return torch.ops.basis.fresh_seed(x, self._salt)
        return draw_seed(x.device, self.generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sketching():
            return F.linear(x, self.weight, self.bias)
        y = BasisLinearFunction.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, self.take_seed(x), self.spec)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rank={self.rank}, sketch={self.sketch}, "
            f"invariant_scalars={self.invariant_scalars}, lam={self.lam}"
        )
