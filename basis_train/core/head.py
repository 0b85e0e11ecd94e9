"""A fused, chunked linear + cross-entropy head: the loss without keeping the logits.

The plain head computes logits = x W^T (rows x vocab) and cross-entropy keeps their
log-softmax for backward: at the paper's size that is 96% of everything a step keeps.
Here the forward pass walks over chunks of `chunk` rows, computes each chunk's logits,
adds its loss and its log-sum-exp to running totals and throws the logits away. It keeps
the head's input (rows x N), the targets and one float32 log-sum-exp per row. The
backward pass recomputes each chunk's logits, turns them into dlogits = softmax - onehot,
and accumulates dX = dlogits W and dW = dlogits^T x chunk by chunk.

The sketched (BASIS) head keeps the same tensors plus the R x N sketch of x, taken in
forward exactly as BasisLinear takes it. It still needs x itself: the exact dX needs
dlogits, which need the logits, which need x. Its dW estimate is built from the count
sketch of dlogits, accumulated over chunks in float32 (on CUDA under bf16/fp16 a tensor-core
matmul with the chunk's R x c count-sketch matrix, elsewhere an index_add of signed rows into
R x V) together with the squared Frobenius norm of dlogits for the invariant scalar. That scalar
multiplies the R x N sketch of x rather than the R x V one (the same product, no R x V copy). With the
same seed it is the estimate of BasisLinear + cross_entropy.

Dtypes. Under autocast the chunk's logits are computed in the autocast dtype (bf16 or
fp16, the same rounding as the plain head's matmul) and the softmax, log-sum-exp and loss
in float32. Inside the function autocast is off and every cast is explicit. The weight is
never saved as a cast: backward casts the parameter again (a transient copy).

With `grads_ahead` (head kernel forward-grad) forward goes on from each chunk's logits to its dlogits
and adds dX and dW (or the sketch) there, so nothing is recomputed; it keeps dX and dW instead of x
and the log-sum-exp, and backward multiplies them by the loss's gradient. Both orders share the
chunk loop's code (`_HeadGrads`) and give the same numbers at a loss gradient of 1.

Shapes depend only on (rows, chunk, vocab), never on data, and nothing reads a value back
to the host, so the head can be captured in a CUDA graph and run under DDP.

With `kernel="cce"` the exact head (FusedHead) runs Apple's Cut Cross-Entropy instead on CUDA under
bf16/fp16 (core/head_cce.py); the code here is the default and the reference.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from basis_train.core import head_cce, memory
from basis_train.core.basis_linear import BasisLinear
from basis_train.core.options import DEFAULT_CHUNK, KERNELS
from basis_train.core.sketch import SketchSpec, draw_seed, gaussian_projection, mm_float32, rescale_factor
from basis_train.core.sketch_ops import bins_and_signs, sketch_op


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # float64 stays float64 (tests)


def _chunks(rows: int, chunk: int):
    return [(a, min(a + chunk, rows)) for a in range(0, rows, chunk)]


# GPT-2's vocabulary (50257) is odd: matrices with a leading dimension of 50257 16-bit elements are
# misaligned for tensor-core GEMMs, which then run far below peak. On CUDA the weight is padded with
# zero rows to a multiple of PAD_VOCAB for the head's matmuls; the padded logits are sliced away before
# the softmax, so the numbers are those of the unpadded head. None: 64 on CUDA, no padding elsewhere
# (the tests set it to run the padded path on CPU); BASIS_HEAD_PAD=1 switches it off (A/B timing).
PAD_VOCAB: int | None = None


def _pad_multiple(device: torch.device) -> int:
    if PAD_VOCAB is not None:
        return PAD_VOCAB
    if os.environ.get("BASIS_HEAD_PAD") == "1":
        return 1
    return 64 if device.type == "cuda" else 1


def _padded(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype`, with zero rows up to a multiple of the pad: one copy, cast on the way."""
    v, multiple = weight.shape[0], _pad_multiple(weight.device)
    vp = -(-v // multiple) * multiple
    if vp == v:
        return weight.to(dtype)
    out = weight.new_zeros(vp, weight.shape[1], dtype=dtype)
    out[:v] = weight
    return out


# The sketch of dlogits, summed chunk by chunk. Its rows go to their bins with their signs: that is
# S_c dl for the chunk's R x c count-sketch matrix S_c (one +-1 per column), and on CUDA under bf16/fp16
# it runs as that matmul on the tensor cores, in float32 accumulation. Products with +-1 are exact, so
# the sums are index_add's float32 sums in another order, for 2 R c V flops where index_add made
# several passes over a float32 copy of dl and added them with atomics (on an H200 at GPT-2 small
# that took more time than the exact dW it replaces). Above MATMUL_MAX_RANK the matmul's flops cost
# more than those passes. Elsewhere (CPU, float32 as the paper protocol, where a float32 matmul would
# round through TF32) the index_add; the tests add "cpu" to run the matmul on CPU in float32.
MATMUL_MAX_RANK = 2048
MATMUL_DEVICES: tuple[str, ...] = ("cuda",)


def _sketch_by_matmul(x: torch.Tensor, cd: torch.dtype, rank: int) -> bool:
    if x.device.type not in MATMUL_DEVICES or rank > MATMUL_MAX_RANK:
        return False
    # off CUDA (the tests) only where dl is already in the accumulation dtype: no tensor cores to keep it
    return cd in (torch.bfloat16, torch.float16) if x.is_cuda else cd in (torch.float32, torch.float64)


def sketch_matrix(bins: torch.Tensor, signs: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """The R x rows count-sketch matrix: column i holds row i's sign in row bins[i]."""
    rows = bins.shape[0]
    s = torch.zeros(rank, rows, dtype=dtype, device=bins.device)
    s[bins, torch.arange(rows, device=bins.device)] = signs.to(dtype)
    return s


def _chunk_logits(xc: torch.Tensor, wp: torch.Tensor, v: int, a: int, b: int, acc: torch.dtype) -> torch.Tensor:
    """Rows a:b's logits in the accumulation dtype, the pad columns sliced away."""
    return (xc[a:b] @ wp.t())[:, :v].to(acc)


def _dlogits_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(softmax - onehot) * scale, in place of a chunk's float32 logits."""
    dl = logits.sub_(lse[:, None]).exp_()
    dl.scatter_add_(1, targets[:, None], dl.new_full((dl.shape[0], 1), -1.0))
    return dl.mul_(scale)


class _HeadGrads:
    """dX and dW of the head, summed chunk by chunk from its dlogits: dW exact, or (`spec`) the BASIS
    estimate from the count sketch of dlogits and the R x N sketch of x given to `result`."""

    def __init__(self, xc: torch.Tensor, wp: torch.Tensor, v: int, chunk: int, need_x: bool, need_w: bool,
                 spec: SketchSpec | None, rank: int | None, seed: torch.Tensor | None, acc: torch.dtype) -> None:
        rows, cd, vp = xc.shape[0], xc.dtype, wp.shape[0]
        self.xc, self.wp, self.v, self.spec, self.rank, self.acc = xc, wp, v, spec, rank, acc
        self.grad_x = torch.empty_like(xc) if need_x else None
        self.exact_w = need_w and spec is None
        self.sketch_w = need_w and spec is not None
        self.grad_w = torch.zeros(vp, wp.shape[1], dtype=acc, device=xc.device) if self.exact_w else None
        # dlogits in the compute dtype, padded; its pad columns stay zero across chunks
        self.dlp = torch.zeros(min(chunk, rows), vp, dtype=cd, device=xc.device) if vp != v else None
        self.by_mm = False
        if self.sketch_w:
            self.hashing = spec.kind
            self.by_mm = self.hashing != "gaussian" and _sketch_by_matmul(xc, cd, rank)
            # by matmul, the padded width: dl's pad columns are zero, so are the sketch's (sliced off)
            self.g_sketch = torch.zeros(rank, vp if self.by_mm else v, dtype=acc, device=xc.device)
            self.g_sq = torch.zeros((), dtype=acc, device=xc.device)
            if self.hashing == "gaussian":
                self.proj = gaussian_projection(seed, rows, rank).to(acc)
            else:
                self.bins, signs = bins_and_signs(seed, rows, rank, self.hashing)
                self.smat = sketch_matrix(self.bins, signs, rank, cd) if self.by_mm else None
                self.signs = None if self.by_mm else signs.to(acc)

    def add(self, a: int, b: int, dl: torch.Tensor) -> None:
        """Rows a:b's dlogits (float32, scaled, unpadded)."""
        v = self.v
        if self.dlp is not None:
            self.dlp[: b - a, :v] = dl  # cast into the padded buffer: the rounding of .to(cd), no extra copy
            dlm = self.dlp[: b - a]
            dl = dlm[:, :v]
        else:
            dl = dlm = dl.to(self.xc.dtype)
        if self.grad_x is not None:
            self.grad_x[a:b] = dlm @ self.wp
        if self.exact_w:
            self.grad_w += (dlm.t() @ self.xc[a:b]).to(self.acc)
        elif self.sketch_w and self.by_mm:
            self.g_sq += torch.linalg.vector_norm(dl, dtype=self.acc).square()
            self.g_sketch += mm_float32(self.smat[:, a:b], dlm)
        elif self.sketch_w:
            dlf = dl.to(self.acc)
            self.g_sq += dlf.square().sum()
            if self.hashing == "gaussian":
                self.g_sketch += self.proj[:, a:b] @ dlf
            else:
                self.g_sketch.index_add_(0, self.bins[a:b], dlf * self.signs[a:b, None])

    def result(self, xs: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(dX in the compute dtype, dW in float32 with the vocabulary's rows), None where not needed."""
        if not self.sketch_w:
            return self.grad_x, self.grad_w[: self.v] if self.exact_w else None
        # The squared norm taken back from its root, as every run so far rounded it.
        g_sq = torch.linalg.vector_norm(self.g_sq.sqrt().view(1), dtype=self.g_sketch.dtype).square()
        g_sketch = self.g_sketch[:, : self.v]
        # rescale's factor is one scalar: on the R x N sketch of x, no R x V copy of g_sketch
        return self.grad_x, g_sketch.t() @ (xs * rescale_factor(g_sketch, g_sq, self.spec))


class _FusedLinearCE(torch.autograd.Function):
    """Mean cross-entropy of x W^T against targets. `spec` is None (exact dW) or the
    SketchSpec of the BASIS estimate, sketched with `seed`.

    `ahead` (need_x, need_w), or None: the gradients are computed in forward, from the logits it
    has just made, and kept for backward in place of x (see fused_linear_cross_entropy)."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, spec, seed, ahead):
        cd, acc = head_cce.compute_dtype(x), _acc_dtype(x)
        dev = x.device.type
        rows = x.shape[0]
        r = min(spec.rank, rows) if spec is not None else None
        with torch.autocast(dev, enabled=False):
            xc, wp = x.to(cd), _padded(weight, cd)
            v = weight.shape[0]
            lse = torch.empty(rows, dtype=acc, device=x.device)
            loss = torch.zeros((), dtype=acc, device=x.device)
            grads = None
            if ahead is not None:
                # the scale backward would use with a gradient of 1: the same numbers when it is 1
                scale = torch.ones((), dtype=acc, device=x.device) / rows
                grads = _HeadGrads(xc, wp, v, chunk, *ahead, spec if ahead[1] else None, r, seed, acc)
            for a, b in _chunks(rows, chunk):
                logits = _chunk_logits(xc, wp, v, a, b, acc)
                lse[a:b] = torch.logsumexp(logits, dim=1)
                picked = logits.gather(1, targets[a:b, None]).squeeze(1)
                loss += (lse[a:b] - picked).sum()
                if grads is not None:
                    grads.add(a, b, _dlogits_(logits, lse[a:b], targets[a:b], scale))
                del logits, picked  # eagerly, else they live on while the next chunk's are made
            # As BasisLinear: the sketch reads x as given, before any autocast cast.
            xs = sketch_op(x.detach(), seed, r, spec) if spec is not None and (ahead is None or ahead[1]) else None
            ctx.spec, ctx.rank, ctx.ahead = spec, r, ahead
            if ahead is not None:
                grad_x, grad_w = grads.result(xs)
                saved = [t for t in (grad_x, grad_w) if t is not None]
                if not torch.compiler.is_compiling():  # the meter runs eagerly
                    for t in saved:
                        memory.mark(t, "head")
            else:
                saved = [xc, targets, lse, weight]
                if xs is not None:
                    saved += [xs, seed]
                    if not torch.compiler.is_compiling():
                        memory.mark(xs, "sketches")
                        memory.mark(seed, "seeds")
        ctx.save_for_backward(*saved)
        ctx.chunk, ctx.cd, ctx.x_dtype, ctx.w_dtype = chunk, cd, x.dtype, weight.dtype
        return loss / rows

    @staticmethod
    def backward(ctx, grad_loss):
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.ahead is not None:
            kept = iter(ctx.saved_tensors)
            grad_x = next(kept) if ctx.ahead[0] else None
            grad_w = next(kept) if ctx.ahead[1] else None
            # times the loss's gradient, in float32 (exact when it is 1 or a power of two)
            grad_x = (grad_x.to(grad_loss.dtype) * grad_loss).to(ctx.x_dtype) if need_x else None
            grad_w = (grad_w * grad_loss.to(grad_w.dtype)).to(ctx.w_dtype) if need_w else None
            return grad_x, grad_w, None, None, None, None, None
        xc, targets, lse, weight, *sk = ctx.saved_tensors
        rows = xc.shape[0]
        acc = lse.dtype
        scale = grad_loss.to(acc) / rows
        with torch.autocast(xc.device.type, enabled=False):
            wp = _padded(weight, ctx.cd)
            v = weight.shape[0]
            seed = sk[1] if sk else None
            grads = _HeadGrads(xc, wp, v, ctx.chunk, need_x, need_w, ctx.spec, ctx.rank, seed, acc)
            for a, b in _chunks(rows, ctx.chunk):
                grads.add(a, b, _dlogits_(_chunk_logits(xc, wp, v, a, b, acc), lse[a:b], targets[a:b], scale))
            grad_x, grad_w = grads.result(sk[0] if sk else None)
        grad_x = grad_x.to(ctx.x_dtype) if need_x else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_x, grad_w, None, None, None, None, None


def fused_linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk: int = DEFAULT_CHUNK, spec: SketchSpec | None = None,
                               seed: torch.Tensor | None = None,
                               generator: torch.Generator | None = None, grads_ahead: bool = False) -> torch.Tensor:
    """Mean cross-entropy of (x W^T) over rows of x (rows, N) against targets (rows,).

    `spec`, for the BASIS dW; `seed`, when given, is the sketch's seed, else one is drawn from
    `generator` (as BasisLinear draws it).

    `grads_ahead`: where a gradient will be taken, compute dX and dW in forward from the chunk's
    logits just made, and keep them (rows x N in the compute dtype, V x N in float32) for backward in
    place of x and the log-sum-exp: backward then only multiplies them by the loss's gradient. That
    saves the recompute of the logits, one rows x N x V matmul, for V x N x 4 more bytes kept from the
    end of forward (the dW buffer backward would allocate first thing). With a loss gradient of 1 (or a
    power of two) the numbers are those of the default; otherwise dX is scaled after its rounding to
    the compute dtype rather than before. Not under float16: its loss scaling would reach dlogits only
    after their cast to float16, where small ones flush to zero. It pays only eagerly: under
    torch.compile the default's recompute is gone already (AOTAutograd merges the two matmuls and keeps
    the dlogits instead; docs/memory.md)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    if spec is not None and seed is None:
        seed = draw_seed(x.device, generator)
    ahead = None
    if grads_ahead and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        if head_cce.compute_dtype(x) == torch.float16:
            raise ValueError("grads_ahead (head kernel forward-grad) cannot run in float16: dlogits would be cast "
                             "to float16 before the loss scale reaches them; use bfloat16 or float32")
        ahead = (x.requires_grad, weight.requires_grad)
    return _FusedLinearCE.apply(x, weight, targets, int(chunk), spec, seed, ahead)


class FusedHead(nn.Linear):
    """A bias-free nn.Linear (same parameters and state_dict) whose `loss` is fused.

    `kernel` picks the implementation of the exact fused loss (core/head_cce.py): "auto" and
    "native" run ours, "forward-grad" ours with the gradients computed in forward
    (fused_linear_cross_entropy's grads_ahead), "cce" Cut Cross-Entropy (an error where it cannot
    run). `kernel_ran` records the last choice for summary.json."""

    def __init__(self, in_features: int, out_features: int, chunk: int = DEFAULT_CHUNK, kernel: str = "auto",
                 **kw) -> None:
        super().__init__(in_features, out_features, bias=False, **kw)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.chunk, self.kernel = int(chunk), kernel
        self.kernel_ran: str | None = None

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        if head_cce.use_cce(self.kernel, x):
            self.kernel_ran = "cce"
            return head_cce.cce_linear_cross_entropy(x, self.weight, targets)
        self.kernel_ran = "forward-grad" if self.kernel == "forward-grad" else "native"
        return fused_linear_cross_entropy(x, self.weight, targets, self.chunk, grads_ahead=self.kernel == "forward-grad")


class FusedBasisHead(BasisLinear):
    """The BASIS head, fused: exact loss and dX, BASIS dW; same seed draws as BasisLinear.

    Always our kernel: the count sketch of dlogits is accumulated inside it, which no library
    offers. `kernel` "forward-grad" computes the gradients in forward (as FusedHead's); any other
    value runs the default, and `kernel_ran` says which ran."""

    def __init__(self, in_features: int, out_features: int, chunk: int = DEFAULT_CHUNK, kernel: str = "auto",
                 **kw) -> None:
        super().__init__(in_features, out_features, bias=False, **kw)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        self.chunk, self.kernel = int(chunk), kernel
        self.kernel_ran = "forward-grad" if kernel == "forward-grad" else "native"

    def loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x, targets = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        ahead = self.kernel == "forward-grad"
        # The sketch only serves dW: a frozen weight gets the exact head and draws no seed (as BasisLinear).
        if not self.sketching():
            return fused_linear_cross_entropy(x, self.weight, targets, self.chunk, grads_ahead=ahead)
        return fused_linear_cross_entropy(x, self.weight, targets, self.chunk, self.spec, self.take_seed(x),
                                          grads_ahead=ahead)
