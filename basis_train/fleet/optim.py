"""SGD for a fleet: every member's update in one op per stacked parameter.

It is torch.optim.SGD's update (no dampening, no Nesterov; the paper's optimiser), with the
learning rate a per-member vector: members may differ in lr_factor and lr_scale_sketched,
which one float per parameter group cannot express for stacked tensors. On the PyTorch path,
where all members share a parameter's lr the update is torch's own `add_(buf, alpha=-lr)`, bit
for bit.

On CUDA, once the momentum buffers exist (the first step is PyTorch's, as torch.optim.SGD sets
buf = d there), each stacked parameter's update is one Triton launch (fleet/kernels/sgd.py)
that reads p, its gradient, its buffer and the members' lrs once and writes buffer and parameter
once, instead of the separate ops' many full passes; it rounds as those ops do, up to FMAs.
Elsewhere, or without Triton, the PyTorch path below runs.

Its state converts to and from each member's single-run optimiser (`to_member`,
`from_member`), so a member's checkpoint is a single run's checkpoint.
"""

from __future__ import annotations

import torch

from basis_train.core.kernels import KernelRoute

KERNELS = KernelRoute("basis_train.fleet.kernels.sgd", "fleets update their parameters with PyTorch")


class FleetSGD:
    def __init__(self, params: list[torch.Tensor], lrs: list[list[float]], momentum: float, weight_decay: float,
                 sparse: dict | None = None) -> None:
        """params: stacked [M, ...] tensors; lrs[i][m]: member m's lr for params[i]; sparse: {i: holder}
        for params whose gradient arrives as rows (fleet/model.py `EmbeddingRows`) instead of .grad."""
        self.params, self.momentum, self.weight_decay = params, float(momentum), float(weight_decay)
        self.bufs: list[torch.Tensor | None] = [None] * len(params)
        self.sparse = dict(sparse or {})
        self.set_lrs(lrs)

    def set_lrs(self, lrs: list[list[float]]) -> None:
        """Floats where every member agrees (torch's exact update), else a device vector; and
        for the fused kernel every parameter's lrs as an (M,) float32 vector, built here once
        (a captured step must not copy from the host)."""
        self.lrs, self.lr_vectors = [], []
        for p, lr in zip(self.params, lrs, strict=True):
            if len(set(lr)) == 1:
                self.lrs.append(float(lr[0]))
            else:
                self.lrs.append(torch.tensor(lr, dtype=p.dtype, device=p.device).view(-1, *([1] * (p.dim() - 1))))
            self.lr_vectors.append(torch.tensor(lr, dtype=torch.float32, device=p.device))

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if i in self.sparse:
                self._rows_step(i, self.sparse[i])
                continue
            g = p.grad
            if g is None:
                continue
            buf = self.bufs[i]
            kernels = KERNELS.on(p.device.type) if self.momentum == 0 or buf is not None else None
            if kernels and kernels.supports(p, g, buf):
                kernels.fleet_sgd_(p, g, buf, self.lr_vectors[i], self.momentum, self.weight_decay)
                continue
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                if self.bufs[i] is None:
                    self.bufs[i] = g.detach().clone()  # as torch: the first buffer is the gradient
                else:
                    self.bufs[i].mul_(self.momentum).add_(g)
                g = self.bufs[i]
            lr = self.lrs[i]
            if isinstance(lr, float):
                p.add_(g, alpha=-lr)
            else:
                p.sub_(g * lr)

    def _rows_step(self, i: int, holder) -> None:
        """SGD of params[i] from gradient rows: p - lr * (momentum * buf + wd * p + g) with g zero outside
        the rows, as the dense update; the rows are consumed. No rows (no backward ran): no update."""
        index, rows = holder.index, holder.rows
        if rows is None:
            return
        holder.index = holder.rows = None
        p = self.params[i]
        if self.momentum and self.bufs[i] is None:
            self.bufs[i] = torch.zeros_like(p)  # momentum * 0 + g = g: torch's first buffer, row by row
        buf = self.bufs[i] if self.momentum else None
        lr = self.lr_vectors[i]
        kernels = KERNELS.on(p.device.type)
        if kernels and kernels.supports(p, None, buf):
            if buf is not None or self.weight_decay:
                kernels.fleet_sgd_(p, None, buf, lr, self.momentum, self.weight_decay)
            kernels.fleet_sgd_rows_(p, buf, index, rows.contiguous(), lr)
            return
        shape = (-1,) + (1,) * (p.dim() - 1)
        if buf is not None:
            buf.mul_(self.momentum)
            if self.weight_decay:
                buf.add_(p, alpha=self.weight_decay)
            p.sub_(buf * lr.view(shape))
        elif self.weight_decay:
            p.sub_(p * (self.weight_decay * lr.view(shape)))
        flat, per = p.view(-1, p.shape[-1]), p[0].numel() // p.shape[-1]
        if buf is not None:
            buf.view(-1, p.shape[-1]).index_add_(0, index, rows)
        flat.index_add_(0, index, rows * -lr[index // per].unsqueeze(1))

    def zero_grad(self, set_to_none: bool = True) -> None:  # always None, as torch's default
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------ member state
    def to_member(self, m: int, opt: torch.optim.SGD, params_by_index: list[torch.Tensor]) -> None:
        """Write member m's momentum buffers into its single-run optimiser `opt`, whose
        parameter params_by_index[i] corresponds to the stacked params[i]."""
        for i, q in enumerate(params_by_index):
            if self.bufs[i] is not None:
                opt.state[q]["momentum_buffer"] = self.bufs[i][m].detach().clone()

    def from_member(self, m: int, opt: torch.optim.SGD, params_by_index: list[torch.Tensor]) -> None:
        for i, q in enumerate(params_by_index):
            buf = opt.state.get(q, {}).get("momentum_buffer")
            if buf is None:
                continue
            if self.bufs[i] is None:
                self.bufs[i] = torch.zeros_like(self.params[i])
            self.bufs[i][m].copy_(buf)
