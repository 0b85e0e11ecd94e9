"""Every fleet member's bins and signs in one launch (fleet/sketch.py's CUDA path).

A fleet step sketches M members per layer; `sketch_gather.slot_table` per member would be M
launches (plus the torch ops around each). Here the program for (member m, block of rows)
loads m's seed, mode and rank and evaluates the same arithmetic as feistel.py for its rows,
through sketch_gather's `mix32` and `feistel_round`:

- balanced: bin = pi(i) mod R, pi the forward Feistel network cycle-walked into range(rows)
  (as `_slot_table_kernel`);
- uniform: bin = hash_bits(seed, STREAM_BIN)[i] mod R;
- exact: bin = i, sign +1 (the member's "sketch" is the identity);

sign = 1 - 2 * (hash_bits(seed, STREAM_SIGN)[i] & 1) for the sketched members. Shapes and the
grid depend only on (M, rows), so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from basis_train.core import feistel as fe
from basis_train.core.kernels.sketch_gather import MAX_ROWS, PERM_OFFSET, SIGN_OFFSET, feistel_round, mix32

_BIN_OFFSET = tl.constexpr(fe.STREAM_BIN * fe.STREAM_MUL & fe.M32)
# Member modes (fleet/sketch.py builds the per-member int32 tensor once per fleet).
EXACT, BALANCED, UNIFORM = 0, 1, 2


@triton.jit
def _fleet_bins_kernel(seed_ptr, mode_ptr, rank_ptr, bins_ptr, signs_ptr, rows, BITS: tl.constexpr,
                       BLOCK: tl.constexpr):
    m = tl.program_id(0)
    i = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.uint32)
    valid = i < rows
    seed = tl.load(seed_ptr + m).to(tl.uint32)  # below 2**32: the truncation keeps it whole
    mode = tl.load(mode_ptr + m)
    rank = tl.load(rank_ptr + m).to(tl.uint32)  # already min(R, rows), at least 1
    pkey = mix32(seed + PERM_OFFSET)
    y = feistel_round(tl.where(valid, i, 0), pkey, BITS)
    walk = valid & (mode == 1) & (y >= rows)
    while tl.max(walk.to(tl.int32), axis=0) > 0:  # cycle-walking, balanced members only
        y = tl.where(walk, feistel_round(y, pkey, BITS), y)
        walk = walk & (y >= rows)
    bkey = mix32(seed + _BIN_OFFSET)
    h = mix32(mix32(i + bkey) ^ bkey)
    skey = mix32(seed + SIGN_OFFSET)
    sign_bit = mix32(mix32(i + skey) ^ skey) & 1
    b = tl.where(mode == 1, y % rank, tl.where(mode == 2, h % rank, i))
    sign = tl.where(mode == 0, 1.0, 1.0 - 2.0 * sign_bit.to(tl.float32))
    offs = m.to(tl.int64) * rows + i.to(tl.int64)
    tl.store(bins_ptr + offs, b.to(tl.int64), mask=valid)
    tl.store(signs_ptr + offs, sign, mask=valid)


def bins_and_signs(seeds: torch.Tensor, modes: torch.Tensor, ranks: torch.Tensor, rows: int,
                   block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(bins (M, rows) int64, signs (M, rows) float32) of members with `seeds` (M,) int64, `modes`
    (M,) int32 (EXACT, BALANCED, UNIFORM) and `ranks` (M,) int32, each min(R, rows) and >= 1."""
    if rows >= MAX_ROWS:
        raise ValueError(f"the fleet sketch kernel takes fewer than 2**30 rows, got {rows}")
    size = seeds.shape[0]
    bins = torch.empty(size, rows, device=seeds.device, dtype=torch.int64)
    signs = torch.empty(size, rows, device=seeds.device, dtype=torch.float32)
    if rows:
        block = min(block, triton.next_power_of_2(rows))
        _fleet_bins_kernel[(size, triton.cdiv(rows, block))](seeds, modes, ranks, bins, signs, rows,
                                                             BITS=fe.domain_bits(rows), BLOCK=block)
    return bins, signs
