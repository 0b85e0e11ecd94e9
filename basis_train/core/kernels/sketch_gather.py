"""The sketch kernels: a slot table built in parallel, then a gather-and-sum that only loads.

Evaluating the inverse Feistel network, cycle-walked, inside the summing kernel puts a chain
of dependent integer ops per row ahead of every load, which serialises the loads (an earlier
kernel did: ~0.11 ms for 8192 x 3072 bf16 on an H200 against a ~15 us floor). Here that work
is split into two launches, same bins and signs as `feistel.py`:

1. `_slot_table_kernel`: every row i, in parallel, computes its slot pi(i) with the forward
   Feistel network (cycle-walked into range(rows), as `feistel.permutation`) and its sign bit,
   and writes entry (i << 1) | sign_bit at table[pi(i)]. pi is a bijection, so every slot is
   written exactly once: no atomics, and the table is the inverse permutation.
2. `_gather_kernel`: the program for (block of BLOCK_R consecutive bins, column block, split)
   reads the table entries of slots b + kR (BLOCK_K values of k at a time, so BLOCK_R *
   BLOCK_K independent row loads per iteration), loads those rows, and accumulates signed
   rows, squares and (for dY) plain rows in float32 tiles that are reduced once at the end.
   The next iteration's table entries are loaded before this iteration's rows, so the
   table -> row dependency does not stall every iteration.

Determinism: each partial result (sketch block per split, squared-norm scalar per program,
column sums per split and bin block) has its own slot, and the partials are summed by fixed-
shape torch reductions, so a seed gives the same bits on every run. No host synchronisation:
shapes and launch grids depend only on (rows, cols, rank), so the kernels are CUDA-graph safe.

Arithmetic is uint32 (wrapping multiply, logical shifts), equal mod 2**32 to feistel.py's
masked int64 arithmetic.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from basis_train.core import feistel as fe

_MUL1 = tl.constexpr(fe.MUL1)
_MUL2 = tl.constexpr(fe.MUL2)
_ROUNDS = tl.constexpr(fe.ROUNDS)
# Stream offsets and round offsets, reduced mod 2**32 here so the kernel adds uint32 values.
PERM_OFFSET = tl.constexpr(fe.STREAM_PERM * fe.STREAM_MUL & fe.M32)
SIGN_OFFSET = tl.constexpr(fe.STREAM_SIGN * fe.STREAM_MUL & fe.M32)
_ROUND_MUL = tl.constexpr(fe.ROUND_MUL)
_M32 = tl.constexpr(fe.M32)

# Rows up to 2**30: a table entry packs the row and its sign bit into one int32.
MAX_ROWS = 1 << 30


@triton.jit
def mix32(x):
    # x is uint32: the multiplies wrap mod 2**32 exactly like feistel.mix32's masked ones.
    x = x ^ (x >> 16)
    x = x * _MUL1
    x = x ^ (x >> 15)
    x = x * _MUL2
    return x ^ (x >> 16)


@triton.jit
def feistel_round(x, pkey, BITS: tl.constexpr):
    for r in tl.static_range(_ROUNDS):
        s = (BITS + r % 2) // 2  # BITS // 2 on even rounds, BITS - BITS // 2 on odd
        rk = mix32(pkey + ((r * _ROUND_MUL) & _M32))
        lo = x & ((1 << s) - 1)
        hi = x >> s
        f = mix32(lo ^ rk) & ((1 << (BITS - s)) - 1)
        x = (lo << (BITS - s)) | (hi ^ f)
    return x


@triton.jit
def _slot_table_kernel(seed_ptr, table_ptr, rows, BITS: tl.constexpr, BLOCK: tl.constexpr):
    i = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.uint32)
    valid = i < rows
    # Seeds are below 2**32, so the truncation to uint32 keeps them whole.
    seed = tl.load(seed_ptr).to(tl.uint32)
    pkey = mix32(seed + PERM_OFFSET)
    skey = mix32(seed + SIGN_OFFSET)
    y = feistel_round(tl.where(valid, i, 0), pkey, BITS)
    walk = valid & (y >= rows)
    while tl.max(walk.to(tl.int32), axis=0) > 0:  # cycle-walking; chains are short (domain < 2 * rows)
        y = tl.where(walk, feistel_round(y, pkey, BITS), y)
        walk = valid & (y >= rows)
    sign_bit = mix32(mix32(i + skey) ^ skey) & 1
    tl.store(table_ptr + y.to(tl.int32), ((i << 1) | sign_bit).to(tl.int32), mask=valid)


@triton.jit
def _gather_kernel(m_ptr, table_ptr, out_ptr, sumsq_ptr, colsum_ptr, sknorm_ptr, rows, cols, stride_m, rank,
                   steps_per_split, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
                   COLSUM: tl.constexpr, SKNORM: tl.constexpr):
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    sp = tl.program_id(2)
    n_rb = tl.num_programs(0)
    n_cb = tl.num_programs(1)
    # Tile row t holds bin rb * BLOCK_R + t % BLOCK_R at step t // BLOCK_R of this iteration.
    t = tl.arange(0, BLOCK_R * BLOCK_K)
    b = rb * BLOCK_R + t % BLOCK_R
    kk = t // BLOCK_R
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < cols
    k_first = sp * steps_per_split
    acc = tl.zeros((BLOCK_R * BLOCK_K, BLOCK_C), dtype=tl.float32)
    sq = tl.zeros((BLOCK_R * BLOCK_K, BLOCK_C), dtype=tl.float32)
    cs = tl.zeros((BLOCK_R * BLOCK_K, BLOCK_C), dtype=tl.float32)
    # steps_per_split is a multiple of BLOCK_K (launch_shape), so a split's steps never spill
    # into the next split's: only bins beyond R and slots beyond the rows need masking.
    slot = b + (k_first + kk) * rank
    valid = (b < rank) & (slot < rows)
    entry = tl.load(table_ptr + slot, mask=valid, other=0)
    for _ in range(0, steps_per_split, BLOCK_K):
        # Prefetch the next iteration's table entries before this iteration's rows.
        slot_next = slot + BLOCK_K * rank
        valid_next = (b < rank) & (slot_next < rows)
        entry_next = tl.load(table_ptr + slot_next, mask=valid_next, other=0)
        row = (entry >> 1).to(tl.int64)
        tile = tl.load(m_ptr + row[:, None] * stride_m + c[None, :], mask=valid[:, None] & cmask[None, :], other=0.0)
        tile = tile.to(tl.float32)
        acc += tl.where((entry & 1)[:, None] != 0, -tile, tile)
        sq += tile * tile
        if COLSUM:
            cs += tile
        slot, valid, entry = slot_next, valid_next, entry_next
    bins = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    sk = tl.sum(tl.reshape(acc, (BLOCK_K, BLOCK_R, BLOCK_C)), axis=0)
    tl.store(out_ptr + (sp * rank + bins)[:, None] * cols + c[None, :], sk,
             mask=(bins < rank)[:, None] & cmask[None, :])
    part = sp * n_rb + rb
    tl.store(sumsq_ptr + part * n_cb + cb, tl.sum(tl.sum(sq, axis=1), axis=0))
    if SKNORM:  # unsplit: this tile of the sketch is final, so its squared norm is a partial of ||S m||^2
        tl.store(sknorm_ptr + rb * n_cb + cb, tl.sum(tl.sum(sk * sk, axis=1), axis=0))
    if COLSUM:
        tl.store(colsum_ptr + part * cols + c, tl.sum(cs, axis=0), mask=cmask)


@triton.jit
def _reduce_splits_kernel(parts_ptr, out_ptr, sknorm_ptr, rank, cols, splits,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sum the per-split partial sketches in split order; squared norm of each finished tile."""
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < rank)[:, None] & (c < cols)[None, :]
    offs = r[:, None] * cols + c[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for sp in range(0, splits):
        acc += tl.load(parts_ptr + sp * rank * cols + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)
    tl.store(sknorm_ptr + rb * tl.num_programs(1) + cb, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _fixed_order_sum(ptr, n, BLOCK: tl.constexpr):
    # Every program that calls this sums the same values in the same order: the same bits.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, n, BLOCK):
        acc += tl.load(ptr + i + tl.arange(0, BLOCK), mask=i + tl.arange(0, BLOCK) < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _finish_kernel(sk_ptr, sumsq_ptr, n_sumsq, sknorm_ptr, n_sknorm, cs_parts_ptr, n_cs, cs_ptr, rank, cols, shrink,
                   eps, SCALARS: tl.constexpr, COLSUM: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """In place: sketch *= (1 - lam) * ||m||_F / (||S m||_F + eps) (the invariant scalars, as
    sketch._scale), and the column sums of m from their partials. One BLOCK_R x BLOCK_C tile per
    program: a grid over columns alone left a 256 x 3072 sketch to 24 programs (9 us a call on an
    H100, results/bench/h100_gpt2/speed/profile.txt). Every program sums the partials itself, in one
    order, so every tile gets the same factor."""
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < cols
    if SCALARS:
        sumsq = _fixed_order_sum(sumsq_ptr, n_sumsq, BLOCK_N)
        factor = tl.sqrt(sumsq) / (tl.sqrt(_fixed_order_sum(sknorm_ptr, n_sknorm, BLOCK_N)) + eps) * shrink
    else:
        factor = shrink
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs = r[:, None] * cols + c[None, :]
    mask = (r < rank)[:, None] & cmask[None, :]
    tl.store(sk_ptr + offs, tl.load(sk_ptr + offs, mask=mask, other=0.0) * factor, mask=mask)
    if COLSUM and rb == 0:
        cs = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p in range(0, n_cs):
            cs += tl.load(cs_parts_ptr + p * cols + c, mask=cmask, other=0.0)
        tl.store(cs_ptr + c, cs, mask=cmask)


def _tuning() -> dict[str, int]:
    """Launch shape; BASIS_SKETCH_V2="tile_rows=32,block_c=128,warps=4,programs=528" overrides
    any of them (to time other launch shapes on a GPU)."""
    # programs=264 (2 per SM of an H200): the fastest of the shapes timed on an H200 for dY at every R
    # and for X at R = 64, 256 (results/bench/h200_gpt2/sketch_v2/kernel_ab.json: dY 8192 x 3072
    # at R = 64 37.3 us against 48.4 us with 528)
    cfg = dict(tile_rows=32, block_c=128, warps=4, programs=264, table_block=1024)
    for item in filter(None, os.environ.get("BASIS_SKETCH_V2", "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in cfg:
            raise ValueError(f"BASIS_SKETCH_V2: unknown key {key!r}; known: {sorted(cfg)}")
        cfg[key.strip()] = int(value)
    return cfg


def launch_shape(rows: int, cols: int, rank: int, cfg: dict[str, int] | None = None) -> dict[str, int]:
    """BLOCK_R, BLOCK_K, BLOCK_C, splits and steps per split for a (rows, cols) matrix at rank R.

    About `programs` programs (2 per SM of an H200 by default) hide the memory latency: first
    as many bins per program as that allows, then the steps of a bin split over programs
    (partials summed afterwards), only when even one bin per program gives too few.
    """
    cfg = cfg or _tuning()
    block_c = min(cfg["block_c"], triton.next_power_of_2(cols))
    n_cb = triton.cdiv(cols, block_c)
    per_bin = triton.cdiv(rows, rank)  # steps k: slots b, b + R, ..., below rows
    block_r = min(cfg["tile_rows"], triton.next_power_of_2(rank))
    while block_r > 1 and triton.cdiv(rank, block_r) * n_cb < cfg["programs"]:
        block_r //= 2
    block_k = min(max(1, cfg["tile_rows"] // block_r), triton.next_power_of_2(per_bin))
    tiles = triton.cdiv(rank, block_r) * n_cb
    splits = max(1, min(triton.cdiv(per_bin, block_k), triton.cdiv(cfg["programs"], tiles)))
    steps = triton.cdiv(triton.cdiv(per_bin, splits), block_k) * block_k
    return dict(block_r=block_r, block_k=block_k, block_c=block_c, n_rb=triton.cdiv(rank, block_r), n_cb=n_cb,
                splits=triton.cdiv(per_bin, steps), steps=steps)


@functools.lru_cache(maxsize=1024)
def _shape(rows: int, cols: int, rank: int, tuning: str) -> tuple[dict[str, int], dict[str, int]]:
    # (_tuning(), launch_shape) per matrix shape, `tuning` (the environment's override) in the key:
    # launch_shape's Python took about 30 us a call on a 2-core CPU, paid by every uncompiled sketch op.
    # The dicts are shared: read only.
    cfg = _tuning()
    return cfg, launch_shape(rows, cols, rank, cfg)


def _launcher(traceable: bool):
    # torch.library.wrap_triton in the body of a triton_op (sketch_ops.py): torch.compile traces the
    # launch and Inductor emits it from its own code; run eagerly it is the plain kernel. Elsewhere the
    # plain kernel, without the wrapper's dispatch.
    return torch.library.wrap_triton if traceable else (lambda kernel: kernel)


def slot_table(seed: torch.Tensor, rows: int, block: int | None = None, traceable: bool = False) -> torch.Tensor:
    """int32 table: entry (row << 1) | sign_bit at slot pi(row); slot j feeds bin j mod R."""
    if rows >= MAX_ROWS:
        raise ValueError(f"the v2 sketch kernels take fewer than 2**30 rows, got {rows}")
    block = block or _tuning()["table_block"]
    table = torch.empty(rows, device=seed.device, dtype=torch.int32)
    _launcher(traceable)(_slot_table_kernel)[(triton.cdiv(rows, block),)](seed, table, rows, BITS=fe.domain_bits(rows),
                                                                           BLOCK=block)
    return table


def _gather(m: torch.Tensor, seed: torch.Tensor, rank: int, colsum: bool, sknorm: bool, traceable: bool = False):
    """Launch the table and gather kernels. (sketch partials [splits, R, C], squared-norm partials,
    column-sum partials [parts, C] or None, sketch-norm partials or None (unsplit only), shape)."""
    rows, cols = m.shape
    cfg, sh = _shape(rows, cols, rank, os.environ.get("BASIS_SKETCH_V2", ""))
    table = slot_table(seed, rows, cfg["table_block"], traceable)
    splits, n_tiles = sh["splits"], sh["n_rb"] * sh["n_cb"]
    out = torch.empty(splits, rank, cols, device=m.device, dtype=torch.float32)
    sumsq = torch.empty(splits * n_tiles, device=m.device, dtype=torch.float32)
    cs = torch.empty(splits * sh["n_rb"], cols, device=m.device, dtype=torch.float32) if colsum else None
    skn = torch.empty(n_tiles, device=m.device, dtype=torch.float32) if sknorm and splits == 1 else None
    _launcher(traceable)(_gather_kernel)[(sh["n_rb"], sh["n_cb"], splits)](
        m, table, out, sumsq, out if cs is None else cs, sumsq if skn is None else skn, rows, cols, m.stride(0),
        rank, sh["steps"], BLOCK_R=sh["block_r"], BLOCK_K=sh["block_k"], BLOCK_C=sh["block_c"],
        COLSUM=colsum, SKNORM=skn is not None, num_warps=cfg["warps"],
    )
    return out, sumsq, cs, skn, sh


def _contiguous_rows(m: torch.Tensor) -> torch.Tensor:
    return m if m.stride(1) == 1 else m.contiguous()


def sketch_stats(m: torch.Tensor, seed: torch.Tensor, rank: int, colsum: bool = False):
    """(S m in float32, ||m||_F^2 as a 0-d float32 tensor, column sums of m or None)."""
    out, sumsq, cs, _, _ = _gather(_contiguous_rows(m), seed, rank, colsum, sknorm=False)
    sketch = out[0] if out.shape[0] == 1 else out.sum(0)
    return sketch, sumsq.sum(), (cs[0] if cs.shape[0] == 1 else cs.sum(0)) if colsum else None


# Finish kernels' blocks (module-level so the tests can shrink them to cover every loop).
_FINISH_BLOCK_C = 128
_FINISH_BLOCK_R = 16
_FINISH_BLOCK_N = 1024


def scaled_stats(m: torch.Tensor, seed: torch.Tensor, rank: int, scalars: bool, lam: float, eps: float,
                 colsum: bool = False, traceable: bool = False):
    """(sketch._scale(S m, ||m||_F^2, lam, scalars), column sums of m or None), in at most four
    launches (table, gather, split reduction when the bins' steps are split, finish) instead of
    a dozen small torch ops after the kernel. `traceable`: launched through wrap_triton (sketch_ops.py's
    triton_op bodies)."""
    m = _contiguous_rows(m)
    rows, cols = m.shape
    out, sumsq, cs, skn, sh = _gather(m, seed, rank, colsum, sknorm=scalars, traceable=traceable)
    sketch = out[0]
    if sh["splits"] > 1:
        sketch = torch.empty(rank, cols, device=m.device, dtype=torch.float32)
        grid = (triton.cdiv(rank, _FINISH_BLOCK_R), triton.cdiv(cols, _FINISH_BLOCK_C))
        skn = torch.empty(grid[0] * grid[1], device=m.device, dtype=torch.float32)
        _launcher(traceable)(_reduce_splits_kernel)[grid](out, sketch, skn, rank, cols, sh["splits"],
                                    BLOCK_R=_FINISH_BLOCK_R, BLOCK_C=_FINISH_BLOCK_C)
    colsums = torch.empty(cols, device=m.device, dtype=torch.float32) if colsum else None
    _launcher(traceable)(_finish_kernel)[(triton.cdiv(rank, _FINISH_BLOCK_R), triton.cdiv(cols, _FINISH_BLOCK_C))](
        sketch, sumsq, sumsq.numel(), sumsq if skn is None else skn, 0 if skn is None else skn.numel(),
        sketch if cs is None else cs, 0 if cs is None else cs.shape[0], sketch if colsums is None else colsums,
        rank, cols, 1.0 - lam, eps, SCALARS=scalars, COLSUM=colsum,
        BLOCK_R=_FINISH_BLOCK_R, BLOCK_C=_FINISH_BLOCK_C, BLOCK_N=_FINISH_BLOCK_N,
    )
    return sketch, colsums
