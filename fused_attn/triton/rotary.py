"""Rotary position embedding (RoPE) in Triton: the ``rotary`` op of the ``triton`` backend.

Token (b, l) sits at position ``p = positions[b, l]`` (``fused_attn.rotary`` derives the positions
from FlashAttention's offsets and packed sequences, or takes Hugging Face's position ids). With
``c = cos[p, i]`` and ``s = sin[p, i]`` (``s`` negated for ``conjugate``: the inverse rotation,
i.e. the backward) the first R = 2 * cos.shape[1] features of every head are rotated pairwise,
for i < R/2:

    non-interleaved (GPT-NeoX): (x1, x2) = (x[i], x[i + R/2]) -> out[i] = x1*c - x2*s, out[i + R/2] = x1*s + x2*c
    interleaved (GPT-J):        (x1, x2) = (x[2i], x[2i+1])   -> out[2i] = x1*c - x2*s, out[2i + 1] = x1*s + x2*c

in float32, rounded once to x's dtype; features R..D-1 are copied unchanged. The output is
``torch.empty_like(x)`` (x's layout when x is dense), written through its strides.

A program owns ROWS consecutive (token, head) rows of one batch row -- row j is token j // H,
head j % H -- and all their features: the rotated halves in chunks of BLOCK_K pairs (one chunk up
to R = 1024), then the pass-through columns in chunks of BLOCK_P. Flattening tokens and heads
keeps the configuration a function of R alone (seven of them, ``possible_configs``) and every
tile full whatever H is (one head for MQA keys, 64 for queries); the price is a per-row integer
division by H, a per-row position load and cos/sin gathered per row rather than per token: rows
of the same token read the same addresses, which the warp's coalescer and L1 serve once, so DRAM
sees the positions and cos/sin rows about once per token and program.

The grid is one flat axis of B x tiles programs (no 65 535 limit on the batch): program ``pid``
is tile ``pid % tiles`` of batch row ``pid // tiles``. Packed sequences come as one batch row of
``total`` tokens whose positions restart at each sequence (computed on the device by the caller).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _checks
from ._host import cdiv, next_pow2
from ._tuning import LAUNCH_OPTIONS

# Elements of x one program moves per chunk (rotated halves together, or one pass-through chunk):
# 4 KB of float16 / 8 KB of float32 on 4 warps, 16 values per thread per tensor.
_TILE_ELEMS = 2048
_NUM_WARPS = 4
# Rotated pairs per chunk: at least 8 (16-byte float16 vectors; smaller R leaves lanes masked),
# at most _TILE_ELEMS // 4 (R = 1024 in one chunk; larger R loops).
_MIN_BLOCK_K = 8
_MAX_BLOCK_K = _TILE_ELEMS // 4


@triton.jit
def _rotary_kernel(X, COS, SIN, OUT, POS,
                   seqlen, nheads, half, head_dim, tiles, table_rows,
                   stride_xb, stride_xl, stride_xh, stride_xd,
                   stride_ob, stride_ol, stride_oh, stride_od,
                   stride_pb, stride_pl,
                   stride_cl, stride_ck, stride_sl, stride_sk,
                   ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                   INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr):
    """ROWS (token, head) rows of one batch row: rotate the first 2 * half features, copy the
    rest. Every tensor through its strides (Triton specialises the strides equal to 1, so the usual
    unit-stride feature dimension loads and stores whole vectors)."""
    pid = tl.program_id(0)
    b = pid // tiles
    tile = pid - b * tiles
    b64 = b.to(tl.int64)
    rows = tile * ROWS + tl.arange(0, ROWS)
    row_ok = rows < seqlen * nheads
    tok = rows // nheads
    head = rows - tok * nheads
    tok64 = tok.to(tl.int64)
    head64 = head.to(tl.int64)
    x_row = (X + b64 * stride_xb + tok64 * stride_xl + head64 * stride_xh)[:, None]
    o_row = (OUT + b64 * stride_ob + tok64 * stride_ol + head64 * stride_oh)[:, None]
    pos = tl.load(POS + b64 * stride_pb + tok64 * stride_pl, mask=row_ok, other=0).to(tl.int64)
    # clamped into the tables (as the cuda backend's kernel does): a position outside them, which
    # only a direct call of the op can pass (the functional API checks them), reads the first or
    # last row, never memory past the tables (checking on the host would read the positions: a sync)
    pos = tl.minimum(tl.maximum(pos, 0), table_rows - 1)
    cos_row = (COS + pos * stride_cl)[:, None]
    sin_row = (SIN + pos * stride_sl)[:, None]
    row_ok = row_ok[:, None]

    k = tl.arange(0, BLOCK_K)
    for k0 in range(0, half, BLOCK_K):
        kk = (k0 + k)[None, :]
        mask = row_ok & (kk < half)
        c = tl.load(cos_row + kk * stride_ck, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sin_row + kk * stride_sk, mask=mask, other=0.0).to(tl.float32)
        if CONJUGATE:
            s = -s
        if INTERLEAVED:
            # Memory: one contiguous [ROWS, 2 * BLOCK_K] tile of pairs (x[2i], x[2i+1]) -- full
            # 16-byte vectors, as the output's store -- de-interleaved in registers (reshape to
            # [.., BLOCK_K, 2] + split; join + reshape back for the store).
            cols = 2 * k0 + tl.arange(0, 2 * BLOCK_K)[None, :]
            mask2 = row_ok & (cols < 2 * half)
            xx = tl.load(x_row + cols * stride_xd, mask=mask2, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(xx, [ROWS, BLOCK_K, 2]))
            o = tl.join(x1 * c - x2 * s, x1 * s + x2 * c)
            tl.store(o_row + cols * stride_od, tl.reshape(o, [ROWS, 2 * BLOCK_K]).to(OUT.dtype.element_ty),
                     mask=mask2)
        else:
            # Memory: two [ROWS, BLOCK_K] tiles, columns i and i + R/2 (each contiguous per row)
            x1 = tl.load(x_row + kk * stride_xd, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + (kk + half) * stride_xd, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + kk * stride_od, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
            tl.store(o_row + (kk + half) * stride_od, (x1 * s + x2 * c).to(OUT.dtype.element_ty), mask=mask)

    # features R..D-1: copied as they are (no conversion), [ROWS, BLOCK_P] at a time
    p = tl.arange(0, BLOCK_P)[None, :]
    for c0 in range(2 * half, head_dim, BLOCK_P):
        cols = c0 + p
        mask = row_ok & (cols < head_dim)
        tl.store(o_row + cols * stride_od, tl.load(x_row + cols * stride_xd, mask=mask), mask=mask)


def kernel_config(rotary_dim: int) -> dict:
    """Launch parameters for a rotary dimension R (they depend on nothing else).

    BLOCK_K = next power of two of R/2 (at least ``_MIN_BLOCK_K``, at most ``_MAX_BLOCK_K``:
    larger R loops over chunks); ROWS = ``_TILE_ELEMS`` // (2 * BLOCK_K) rows, so that the two
    rotated halves of a chunk hold ``_TILE_ELEMS`` elements; the pass-through chunk BLOCK_P =
    2 * BLOCK_K has the same size. The kernel holds x1, x2, cos and sin in float32, ~32 values per
    thread on 4 warps."""
    block_k = min(_MAX_BLOCK_K, max(_MIN_BLOCK_K, next_pow2(rotary_dim // 2)))
    return {"ROWS": _TILE_ELEMS // (2 * block_k), "BLOCK_K": block_k, "BLOCK_P": 2 * block_k,
            "num_warps": _NUM_WARPS}


@functools.lru_cache(maxsize=64)
def _launch_config(rotary_dim: int) -> dict:
    """``kernel_config`` memoised (shared between calls: read it, never modify it)."""
    return kernel_config(rotary_dim)


def possible_configs() -> list[dict]:
    """Every configuration ``apply_rotary`` may launch (the AOT test compiles each one)."""
    configs = []
    for r in [0] + [1 << k for k in range(1, 14)]:
        cfg = kernel_config(r)
        if cfg not in configs:
            configs.append(cfg)
    return configs


def _check(x, cos, sin, positions, out):
    """The cpu backend's checks of a rotary call (csrc/cpu/rotary.cpp's checked_positions and
    rotary_out's), less the position values; ``_checks``."""
    xs, cs, ps, device = x.shape, cos.shape, positions.shape, x.get_device()
    if (len(xs) == 4 and x.dtype in _checks.FLOAT_SET and len(cs) == 2 and sin.shape == cs and cos.is_floating_point()
            and sin.dtype is cos.dtype and 2 * cs[1] <= xs[3] and cs[0] >= 1
            and (positions.dtype is torch.int64 or positions.dtype is torch.int32) and len(ps) == 2
            and ps[0] == xs[0] and ps[1] == xs[1] and cos.get_device() == device and sin.get_device() == device
            and positions.get_device() == device
            and (out is None or out.shape == xs and out.dtype is x.dtype and out.get_device() == device
                 and out.is_contiguous())):
        return  # (the common case in one expression; else the checks below name what is wrong)
    what = "rotary (triton)"
    if x.dim() != 4:
        raise ValueError(f"{what}: x must be 4-D (B, L, H, D), got shape {tuple(x.shape)}")
    _checks.float_dtype(what, "x", x.dtype)
    _checks.same_device(what, "x", x, {"cos": cos, "sin": sin, "positions": positions, "out": out})
    if cos.dim() != 2 or sin.shape != cos.shape:
        raise ValueError(f"{what}: cos and sin must be 2-D (S, R/2) of one shape, got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if sin.dtype != cos.dtype or not cos.is_floating_point():
        raise TypeError(f"{what}: cos and sin must share a floating-point dtype, got {_checks.name_of(cos.dtype)} "
                        f"and {_checks.name_of(sin.dtype)}")
    B, L, _, D = x.shape
    half = cos.shape[1]
    if 2 * half > D:  # (0 columns is a copy: the kernel takes it, tests/test_triton_rotary.py runs it)
        raise ValueError(f"{what}: cos and sin must have at most D/2 = {D // 2} columns (the rotary dim R/2), got "
                         f"{half}")
    if cos.shape[0] < 1 and x.numel():
        raise ValueError(f"{what}: cos and sin have no rows (S = 0), got shape {tuple(cos.shape)}")
    if positions.dtype != torch.int32 and positions.dtype != torch.int64:
        raise TypeError(f"{what}: positions must be int32 or int64, got {_checks.name_of(positions.dtype)}")
    if positions.shape != (B, L):
        raise ValueError(f"{what}: positions must have shape (B, L) = {(B, L)}, got {tuple(positions.shape)}")
    if out is not None:
        _checks.rows_like(what, "out", out, x.shape, "x's", x.dtype, "x's ")
        _checks.no_overlap(what, "out", out)


def apply_rotary(x, cos, sin, positions, *, interleaved=False, conjugate=False, out=None) -> torch.Tensor:
    """RoPE of ``x`` (see the module docstring): the ``rotary`` launcher of fused_attn.backends.base.

    x: (B, L, H, D); cos, sin: (S, R/2), any float dtype and strides; positions: int32/int64 (B, L),
    any strides (stride 0 along B for a shared offset). Shapes, dtypes and devices are checked here
    (``_check``); the position values are not read (on a GPU that is a device sync): the caller
    checks every position is in [0, S) (the functional API does), and the kernel clamps any other
    into the tables. Inputs are never written, except ``out``. Returns ``out`` (x's shape and
    dtype, no overlapping elements; x itself for the embedding in place: a program loads each tile
    before it stores it, and no two programs touch one element) or, when None,
    ``torch.empty_like(x)`` filled."""
    _check(x, cos, sin, positions, out)
    out = torch.empty_like(x) if out is None else out
    if x.numel() == 0:
        return out
    B, L, H, D = x.shape
    half = cos.shape[1]
    cfg = _launch_config(2 * half)
    tiles = cdiv(L * H, cfg["ROWS"])
    _rotary_kernel[(B * tiles,)](
        x, cos, sin, out, positions, L, H, half, D, tiles, cos.shape[0], *x.stride(), *out.stride(),
        *positions.stride(),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
        ROWS=cfg["ROWS"], BLOCK_K=cfg["BLOCK_K"], BLOCK_P=cfg["BLOCK_P"],
        INTERLEAVED=bool(interleaved), CONJUGATE=bool(conjugate),
        num_warps=cfg["num_warps"], **LAUNCH_OPTIONS)
    return out
