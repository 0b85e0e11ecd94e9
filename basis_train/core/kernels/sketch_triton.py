"""One fused Triton kernel per sketched matrix: bins, signs, signed bin sums, squared norm, column sums.

The program for (bin b, column block, split) gathers the rows in slots b, b + R, b + 2R, ...
of the balanced permutation, i.e. rows pi^-1(b + kR), computed here from the seed with the
inverse Feistel network of `feistel.py` (cycle-walked into range). Each row of the matrix
belongs to exactly one bin, so the programs partition the matrix: one read of it gives the
sketch, the squared Frobenius norm (for the invariant scalars) and, for dY, the column sums
(the exact bias gradient). No atomics: every partial result has its own slot, summed
afterwards in a fixed order, so a seed always gives the same bits.

The seed is read from device memory, never with .item(), so the kernel is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from basis_train.core import feistel as fe

_M32 = tl.constexpr(fe.M32)
_MUL1 = tl.constexpr(fe.MUL1)
_MUL2 = tl.constexpr(fe.MUL2)
_STREAM_MUL = tl.constexpr(fe.STREAM_MUL)
_ROUND_MUL = tl.constexpr(fe.ROUND_MUL)
_ROUNDS = tl.constexpr(fe.ROUNDS)
_STREAM_PERM = tl.constexpr(fe.STREAM_PERM)
_STREAM_SIGN = tl.constexpr(fe.STREAM_SIGN)


@triton.jit
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _M32
    return x ^ (x >> 16)


@triton.jit
def _feistel_inverse(y, key, BITS: tl.constexpr):
    for i in tl.static_range(_ROUNDS):
        r = _ROUNDS - 1 - i
        s = (BITS + r % 2) // 2  # BITS // 2 on even rounds, BITS - BITS // 2 on odd ones
        rk = _mix32((key + r * _ROUND_MUL) & _M32)
        lo = y >> (BITS - s)
        t = y & ((1 << (BITS - s)) - 1)
        hi = t ^ (_mix32(lo ^ rk) & ((1 << (BITS - s)) - 1))
        y = (hi << s) | lo
    return y


@triton.jit
def _sketch_kernel(m_ptr, seed_ptr, out_ptr, sumsq_ptr, colsum_ptr, rows, cols, stride_m, rank, slots_per_split,
                   BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, COLSUM: tl.constexpr):
    b = tl.program_id(0)
    cb = tl.program_id(1)
    sp = tl.program_id(2)
    n_cb = tl.num_programs(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < cols
    seed = tl.load(seed_ptr).to(tl.int64)
    pkey = _mix32((seed + _STREAM_PERM * _STREAM_MUL) & _M32)
    skey = _mix32((seed + _STREAM_SIGN * _STREAM_MUL) & _M32)
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    cs = tl.zeros((BLOCK_C,), dtype=tl.float32)
    k_start = sp * slots_per_split
    for k0 in range(0, slots_per_split, BLOCK_K):
        kk = k_start + k0 + tl.arange(0, BLOCK_K)
        j = b + kk.to(tl.int64) * rank
        valid = (j < rows) & (k0 + tl.arange(0, BLOCK_K) < slots_per_split)
        y = _feistel_inverse(tl.where(valid, j, 0), pkey, BITS)
        walk = valid & (y >= rows)
        while tl.max(walk.to(tl.int32), axis=0) > 0:  # cycle-walking back into range(rows)
            y = tl.where(walk, _feistel_inverse(y, pkey, BITS), y)
            walk = valid & (y >= rows)
        row = tl.where(valid, y, 0)
        h = _mix32(_mix32((row + skey) & _M32) ^ skey)
        sign = 1.0 - 2.0 * (h & 1).to(tl.float32)
        tile = tl.load(m_ptr + row[:, None] * stride_m + c[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
        tile = tile.to(tl.float32)
        acc += tl.sum(tile * sign[:, None], axis=0)
        sq += tl.sum(tile * tile, axis=0)
        if COLSUM:
            cs += tl.sum(tile, axis=0)
    part = sp * rank + b
    tl.store(out_ptr + part * cols + c, acc, mask=cmask)
    tl.store(sumsq_ptr + part * n_cb + cb, tl.sum(sq, axis=0))
    if COLSUM:
        tl.store(colsum_ptr + part * cols + c, cs, mask=cmask)


# Enough programs to fill an H200 (132 SMs) several times over, whatever R is.
_TARGET_PROGRAMS = 1024


def sketch_stats(m: torch.Tensor, seed: torch.Tensor, rank: int, colsum: bool = False):
    """(S m in float32, ||m||_F^2 as a 0-d float32 tensor, column sums of m or None)."""
    rows, cols = m.shape
    if m.stride(1) != 1:
        m = m.contiguous()
    block_c = min(128, triton.next_power_of_2(cols))
    n_cb = triton.cdiv(cols, block_c)
    per_bin = triton.cdiv(rows, rank)
    block_k = min(32, triton.next_power_of_2(per_bin))
    splits = max(1, min(triton.cdiv(per_bin, block_k), _TARGET_PROGRAMS // (rank * n_cb)))
    slots = triton.cdiv(triton.cdiv(per_bin, splits), block_k) * block_k
    splits = triton.cdiv(per_bin, slots)
    out = torch.empty(splits, rank, cols, device=m.device, dtype=torch.float32)
    sumsq = torch.empty(splits * rank * n_cb, device=m.device, dtype=torch.float32)
    cs = torch.empty(splits, rank, cols, device=m.device, dtype=torch.float32) if colsum else out
    _sketch_kernel[(rank, n_cb, splits)](
        m, seed, out, sumsq, cs, rows, cols, m.stride(0), rank, slots,
        BITS=max(fe.MIN_BITS, (rows - 1).bit_length()), BLOCK_K=block_k, BLOCK_C=block_c, COLSUM=colsum,
        num_warps=4,
    )
    sketch = out[0] if splits == 1 else out.sum(0)
    return sketch, sumsq.sum(), cs.sum((0, 1)) if colsum else None
