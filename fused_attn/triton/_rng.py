"""The shared counter-based dropout hash as Triton device functions (see fused_attn/_rng.py).

A kernel receives ``seed_lo``, ``seed_hi_mix`` and ``threshold`` from ``dropout_args(p, seed)``
and, per logical row, ``offset + row`` as int64:

    key  = dropout_row_key(seed_lo, seed_hi_mix, offset + rows)      # uint32, once per row
    keep = dropout_keep(key[:, None], cols[None, :], threshold)       # bool, per element

which reproduces ``fused_attn._rng.keep_mask`` bit for bit (uint32 wrap-around arithmetic).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .._rng import MASK32, dropout_threshold, mix32_int


def dropout_args(p: float, seed: int) -> tuple[int, int, int]:
    """Host-side constants: (seed_lo, mix32(seed_hi), threshold), each in [0, 2**32)."""
    seed &= (1 << 64) - 1
    return seed & MASK32, mix32_int((seed >> 32) & MASK32), dropout_threshold(p)


@triton.jit
def mix32(x):
    # x: uint32. Literals >= 2**31 are typed uint32 by Triton, so the products wrap mod 2**32.
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def dropout_row_key(seed_lo, seed_hi_mix, row):
    """uint32 key of logical row ``row`` (int64, offset already added)."""
    row = row.to(tl.int64)
    r_lo = row.to(tl.uint32)
    r_hi = (row >> 32).to(tl.uint32)
    return mix32(mix32(r_lo ^ seed_lo.to(tl.uint32)) ^ r_hi ^ seed_hi_mix.to(tl.uint32))


@triton.jit
def dropout_keep(row_key, col, threshold):
    """True where the element (row with key ``row_key``, column ``col``) is kept."""
    c = col.to(tl.uint32)
    bits = mix32(mix32(row_key ^ c) + row_key)
    return bits >= threshold.to(tl.uint32)
