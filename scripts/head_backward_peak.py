"""The fused head's backward: the peak bytes of its live tensors, exact against BASIS (both ways of
sketching the dlogits), on a CPU in float32 at GPT-2 small's width and vocabulary.

    python scripts/head_backward_peak.py [--rows 4096] [--rank 1024] [--chunk 1024]

`core/memory.live_bytes_peak` counts the storages the backward's ops allocate while they are alive
(no allocator involved), so the figures are the same on any machine; a GPU's compiled step may
plan its buffers differently. The matmul sketch runs on CUDA under bf16; here it is forced on CPU in
float32, as the tests force it.
"""

from __future__ import annotations

import argparse

import torch

from basis_train.core import head
from basis_train.core.memory import live_bytes_peak
from basis_train.core.sketch import SketchSpec

N_EMBD, VOCAB = 768, 50257
MIB = 2**20


def backward_peak(rows: int, rank: int, chunk: int, how: str) -> int:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, N_EMBD, generator=g, requires_grad=True)
    w = (torch.randn(VOCAB, N_EMBD, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, VOCAB, (rows,), generator=g)
    spec = None if how == "exact" else SketchSpec(rank=rank)
    head.MATMUL_DEVICES = ("cuda", "cpu") if how == "matmul" else ("cuda",)
    loss = head.fused_linear_cross_entropy(x, w, t, chunk, spec, torch.tensor(7) if spec else None)
    return live_bytes_peak(lambda: torch.autograd.grad(loss, (x, w)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=1024)
    a = ap.parse_args()
    print(f"rows {a.rows}, width {N_EMBD}, vocab {VOCAB}, chunk {a.chunk}, R {a.rank}, float32, torch {torch.__version__}")
    print(f"one R x V float32 buffer: {a.rank * VOCAB * 4 / MIB:.1f} MiB")
    for how in ("exact", "index_add", "matmul"):
        print(f"{how:10s} backward peak of live tensors: {backward_peak(a.rows, a.rank, a.chunk, how) / MIB:7.1f} MiB")


if __name__ == "__main__":
    main()
