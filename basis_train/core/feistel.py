"""The sketch's randomness: a keyed bijection of row indices and keyed per-row hashes.

Everything here is a pure function of a 32-bit seed (a 0-d int64 tensor, so drawing it
needs no host synchronisation and CUDA graphs replay it from memory). The fused GPU kernels
(`kernels/sketch_gather.py`, fleet/kernels/bins.py) evaluate the same arithmetic row by row; this module is the
PyTorch path (CPU, float64, or CUDA without Triton) and the tests' reference, so CPU and
GPU put the same rows in the same bins with the same signs for a seed.

Balanced bins without sorting: pi is a Feistel network over the next power of two >= rows,
restricted to range(rows) by cycle-walking (apply it again until the value lands in range,
which keeps it a bijection). Row i goes to bin pi(i) mod R, so every bin receives floor or
ceil of rows / R rows. The kernels gather instead of scatter: the program for bin b reads
rows pi^-1(b), pi^-1(b + R), ... so no atomics are needed and sums are deterministic. The v2
kernels (`kernels/sketch_gather.py`) get pi^-1 as a table written by every row i in parallel
at pi(i) (the forward network, cycle-walked); v1 evaluated the inverse network per slot.

All arithmetic is on int64 values below 2**32, with multipliers below 2**31 so no product
overflows; the kernels do exactly the same operations.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
# Counter-based hash constants (lowbias32 family).
MUL1 = 0x7FEB352D
MUL2 = 0x68E31DA5
STREAM_MUL = 0x2545F491
ROUND_MUL = 0x3C6EF372  # per-round key offsets, below 2**31 like the others
ROUNDS = 6
# Below 64 values a Feistel network of 1- or 2-bit halves is far from a uniform permutation
# (seen: pair-collision frequencies 7 standard errors off at 6 rows); cycle-walking from a
# 64-value domain restores it at a few extra rounds for tiny matrices only.
MIN_BITS = 6
STREAM_PERM, STREAM_SIGN, STREAM_BIN, STREAM_GAUSS = 1, 2, 3, 4


def mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * MUL1) & M32
    x = x ^ (x >> 15)
    x = (x * MUL2) & M32
    return x ^ (x >> 16)


def stream_key(seed: torch.Tensor, stream: int) -> torch.Tensor:
    return mix32((seed.long() + stream * STREAM_MUL) & M32)


def hash_bits(seed: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """n pseudo-random 32-bit integers (int64) determined by (seed, stream)."""
    key = stream_key(seed, stream)
    idx = torch.arange(n, device=seed.device, dtype=torch.int64)
    return mix32(mix32((idx + key) & M32) ^ key)


def domain_bits(rows: int) -> int:
    """Bits of the Feistel domain: the next power of two >= rows, at least 2**MIN_BITS."""
    return max(MIN_BITS, (rows - 1).bit_length())


def round_keys(seed: torch.Tensor) -> list[torch.Tensor]:
    key = stream_key(seed, STREAM_PERM)
    return [mix32((key + r * ROUND_MUL) & M32) for r in range(ROUNDS)]


def _split(r: int, bits: int) -> int:
    # Unbalanced halves alternate (s, bits - s), so any bit count works.
    return bits // 2 if r % 2 == 0 else bits - bits // 2


def feistel(x: torch.Tensor, keys: list[torch.Tensor], bits: int) -> torch.Tensor:
    """The keyed bijection of range(2**bits), applied elementwise."""
    for r, k in enumerate(keys):
        s = _split(r, bits)
        lo, hi = x & ((1 << s) - 1), x >> s
        f = mix32(lo ^ k) & ((1 << (bits - s)) - 1)
        x = (lo << (bits - s)) | (hi ^ f)
    return x


def feistel_inverse(y: torch.Tensor, keys: list[torch.Tensor], bits: int) -> torch.Tensor:
    for r in reversed(range(len(keys))):
        s = _split(r, bits)
        lo, t = y >> (bits - s), y & ((1 << (bits - s)) - 1)
        hi = t ^ (mix32(lo ^ keys[r]) & ((1 << (bits - s)) - 1))
        y = (hi << s) | lo
    return y


def _cycle_walk(first: torch.Tensor, rows: int, bits: int) -> torch.Tensor:
    """Cycle-walk every start x of range(2**bits): follow x -> first[x] until in range(rows).

    Pointer jumping (each pass doubles the steps covered) instead of a data-dependent loop:
    no host synchronisation, so it is CUDA-graph safe. A chain meets at most
    2**bits - rows out-of-range values, so `bits` passes cover it. `first` may carry leading
    dimensions (one network per seed of a batch): each walks along its last dimension.
    """
    p = first
    for _ in range(bits):
        out = p >= rows
        if p.device.type == "cpu" and not out.any():
            break
        p = torch.where(out, p.gather(-1, p), p)
    return p


def permutation(seed: torch.Tensor, rows: int) -> torch.Tensor:
    """pi(i) for i in range(rows): a keyed, uniformly distributed permutation of range(rows).
    A seed of shape (M, 1) gives M permutations, (M, rows), as M calls would."""
    bits = domain_bits(rows)
    walk = _cycle_walk(feistel(torch.arange(1 << bits, device=seed.device), round_keys(seed), bits), rows, bits)
    return walk[..., :rows]


def inverse_permutation(seed: torch.Tensor, rows: int) -> torch.Tensor:
    """pi^-1: the row at each slot (a scatter of a bijection, so deterministic)."""
    pi = permutation(seed, rows)
    inv = torch.empty_like(pi)
    inv[pi] = torch.arange(rows, device=pi.device)
    return inv


def signs(seed: torch.Tensor, rows: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rademacher signs, one per row, from a stream independent of the permutation's."""
    return (1 - 2 * (hash_bits(seed, rows, STREAM_SIGN) & 1)).to(dtype)
