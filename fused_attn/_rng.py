"""The counter-based dropout RNG shared by every backend.

Dropout masks in fused_attn are a pure function of ``(seed, offset, row, col)``: no state is
carried between calls, so the backward pass regenerates exactly the mask the forward pass used,
and every backend (reference, cpu, triton, cuda) produces the *same* mask bit for bit. That lets
the tests hold a fused kernel's dropout output to the reference exactly, not only statistically.

The hash is built from ``mix32`` (Chris Wellons' "lowbias32" integer finaliser, a bijection of
uint32 with good avalanche), using only 32-bit xor, shifts and wrapping multiplies, which every
backend has natively:

    mix32(x)   = x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    r          = offset + row                                   (64-bit; split into r_lo, r_hi)
    row_key    = mix32(mix32(r_lo ^ seed_lo) ^ r_hi ^ mix32(seed_hi))
    bits       = mix32(mix32(row_key ^ col) + row_key)         (+ wraps mod 2**32)
    keep       = bits >= threshold,   threshold = min(floor(p * 2**32), 2**32 - 1)

and kept elements are scaled by ``1 / (1 - p)``. The logical rows of each op:

- attention: element ``(b, h, i, j)`` of the ``(B, Hq, Lq, Lk)`` probabilities has
  ``row = (b * Hq + h) * Lq + i`` and ``col = j``;
- layer_norm_residual: element ``(n, c)`` of the flattened ``(N, d)`` input;
- feed_forward: element ``(t, c)`` of the flattened ``(T, d_ff)`` activation.

Under ``torch.func.vmap(..., randomness="different")`` the ``[seed, offset]`` pair is drawn once
per sample (a batched tensor): the kernels then run sample by sample, each with its own pair, and
the mask's tensor math here takes the pair as 0-dim tensors (``seed_offset``), giving each sample
the mask its own pair defines.
"""
from __future__ import annotations

import math

import torch

from .ops_common import is_dtensor

MASK32 = 0xFFFFFFFF
MIX_MUL1 = 0x7FEB352D
MIX_MUL2 = 0x846CA68B


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which an element is dropped."""
    return min(int(p * 4294967296.0), MASK32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # int64 tensors holding uint32 values; products wrap mod 2**64, whose low 32 bits are the
    # uint32 product, so masking after each multiply gives exact uint32 arithmetic.
    x = x ^ (x >> 16)
    x = (x * MIX_MUL1) & MASK32
    x = x ^ (x >> 15)
    x = (x * MIX_MUL2) & MASK32
    return x ^ (x >> 16)


def mix32_int(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_MUL1) & MASK32
    x ^= x >> 15
    x = (x * MIX_MUL2) & MASK32
    return x ^ (x >> 16)


def vmapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by a ``torch.func.vmap`` level, under any ``grad`` levels wrapping
    it (``vmap(grad(f), randomness="different")`` draws the pair batched, then grad-wrapped)."""
    if not torch._C._are_functorch_transforms_active():
        return False
    from torch._C import _functorch

    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def seed_offset(rng) -> tuple:
    """``(seed, offset)`` of an rng pair (an int64 tensor ``[seed, offset]`` or a tuple) as ints,
    or, where a vmap batched it (one pair per sample, which no int can hold), as the 0-dim tensors
    ``rng[0]``, ``rng[1]``: ``row_keys`` reads those per sample. (A plain tensor pair is read to
    the host once, not once per number.)"""
    if isinstance(rng, torch.Tensor) and not vmapped(rng):
        seed, offset = rng.tolist()
        return int(seed), int(offset)
    seed, offset = rng[0], rng[1]
    return tuple(v if isinstance(v, torch.Tensor) and vmapped(v) else int(v) for v in (seed, offset))


def row_keys(seed, offset, rows: torch.Tensor) -> torch.Tensor:
    """uint32 key of each logical row (``rows`` is an int64 tensor of row indices). ``seed`` and
    ``offset``: ints, or 0-dim int64 tensors (``seed_offset``), which give the same bits: the
    tensors' two's-complement bits are the ints' mod 2**64, and >> then & MASK32 takes the same
    32 of them."""
    if isinstance(seed, torch.Tensor):
        seed_lo, seed_hi_key = seed & MASK32, _mix32((seed >> 32) & MASK32)
    else:
        seed &= (1 << 64) - 1
        seed_lo, seed_hi_key = seed & MASK32, mix32_int((seed >> 32) & MASK32)
    r = rows.to(torch.int64) + offset
    r_lo, r_hi = r & MASK32, (r >> 32) & MASK32
    return _mix32(_mix32(r_lo ^ seed_lo) ^ r_hi ^ seed_hi_key)


def random_bits(seed, offset, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """uint32 random bits (as int64) for every (row, col) pair, broadcasting rows against cols."""
    key = row_keys(seed, offset, rows)
    return _mix32((_mix32(key ^ cols.to(torch.int64)) + key) & MASK32)


def keep_mask(seed, offset, p: float, n_rows: int, n_cols: int, device=None) -> torch.Tensor:
    """Boolean keep-mask of shape (n_rows, n_cols) for logical rows 0..n_rows-1."""
    rows = torch.arange(n_rows, device=device, dtype=torch.int64).unsqueeze(1)
    cols = torch.arange(n_cols, device=device, dtype=torch.int64).unsqueeze(0)
    return random_bits(seed, offset, rows, cols) >= dropout_threshold(p)


def apply_dropout(t: torch.Tensor, p: float, seed, offset) -> torch.Tensor:
    """Dropout of a tensor whose last dim is ``col`` and whose flattened leading dims are ``row``."""
    if p == 0.0:
        return t
    n_cols = t.shape[-1]
    n_rows = t.numel() // max(n_cols, 1)
    if is_dtensor(t):
        keep = _keep_mask_of_shards(t, seed, offset, p)
    else:
        keep = keep_mask(seed, offset, p, n_rows, n_cols, device=t.device).reshape(t.shape)
    return t * keep.to(t.dtype) * (1.0 / (1.0 - p))


def _keep_mask_of_shards(t, seed, offset, p: float):
    """``keep_mask`` for a DTensor ``t`` (tensor parallelism: the reference math run on DTensors), a
    DTensor placed as t: each rank hashes the whole tensor's (row, col) indices of its own shard
    only, so the elements dropped are those the call on plain tensors drops, at the cost of the
    shard (the whole mask on every rank would cost the mesh's size times that). The indices' parts
    come from redistributing replicated ones, which takes slices and sends nothing; the hash itself
    runs on the local tensors (torch 2.13's DTensor returned ``x >> 16`` as x, unshifted)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh, last = t.device_mesh, t.ndim - 1
    # a partial sum takes the whole mask on each rank (dropout is linear); shards their part
    placements = [q if q.is_shard() else Replicate() for q in t.placements]
    rows = torch.arange(math.prod(t.shape[:-1]), device=t.device, dtype=torch.int64).reshape(*t.shape[:-1], 1)
    cols = torch.arange(t.shape[-1], device=t.device, dtype=torch.int64)

    def part(index, index_placements):
        whole = DTensor.from_local(index, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return whole.redistribute(mesh, index_placements).to_local()

    rows = part(rows, [Replicate() if q.is_shard(last) else q for q in placements])
    cols = part(cols, [Shard(0) if q.is_shard(last) else Replicate() for q in placements])
    keep = random_bits(seed, offset, rows, cols) >= dropout_threshold(p)
    stride = torch.empty(t.shape, device="meta").stride()
    return DTensor.from_local(keep, mesh, placements, shape=t.shape, stride=stride)
