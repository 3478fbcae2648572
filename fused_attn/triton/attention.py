"""Fused scaled-dot-product attention in Triton: forward and backward (FlashAttention-2).

Forward (``_attn_fwd``), one program per (batch*head, block of BLOCK_M queries): the query block
stays in registers while blocks of BLOCK_N keys stream past. For each key block it forms the
scores ``s = q k^T * scale (+ additive mask)`` in base-2 units (``s * log2 e``, so that ``exp2``
can be used), and keeps the online softmax state per query row: the running maximum ``m``, the
running sum ``l = sum exp2(s - m)`` and the unnormalised output ``acc = sum exp2(s - m) v``; when
the maximum grows by ``d``, ``l`` and ``acc`` are rescaled by ``exp2(-d)``. At the end
``out = acc / l`` and the natural log-sum-exp ``lse = (m + log2 l) * ln 2`` is saved. A row whose
keys are all masked keeps ``m = -inf`` and ``l = 0``: it stores zeros and ``lse = +inf``, so that
backward's ``exp(s - lse)`` is 0 there too. The Lq x Lk matrix is never stored.

Backward recomputes the probabilities ``p = exp(s - lse)`` tile by tile. With ``dO`` the output
gradient and ``Z`` the dropout keep-mask scaled by 1/(1-p_drop):

    dV = (P*Z)^T dO         dP = (dO V^T) * Z         dS = P * (dP - delta)
    dQ = scale * dS K       dK = scale * dS^T Q        delta = rowsum(dO * O)

(``delta = rowsum(P * dP)`` equals ``rowsum(dO * O)`` even with dropout, so a small preprocessing
kernel computes it from the saved output.) ``_attn_bwd_dkdv`` runs one program per (batch*kv head,
block of keys) and loops over the query heads of its group (grouped-query attention) and over query
blocks (at head dims above 128 it runs twice, once for dK and once for dV, so that each program holds
one accumulator: ``dkdv_passes``); ``_attn_bwd_dq`` runs one program per (batch*head, query block)
and loops over key blocks.
Each gradient element is thus written by exactly one program, without atomics, so the results are
bitwise reproducible. The gradient of an additive mask is dS itself; ``_attn_bwd_dkdv`` writes it.

Masks: causal attention and sliding windows arrive as one band: query i sees key j iff
``band_lo <= j - i <= band_hi`` (top-left causal is (-inf, 0); ``ops_common.attention_band``).
Key blocks wholly outside the band are never visited, so a window of w keys costs Lq * w, not
Lq * Lk. ``attn_mask`` arrives as a 4-D (B, Hq, Lq, Lk) view with stride 0 along broadcast dims;
it is read through its strides, never expanded. In forward and dQ the key loop is split
(``_key_ranges``) so that only the blocks that cross an edge of the band or the end of the keys
pay for the index masking (``CHECK_*`` constexpr flags on one shared inner loop); dK/dV tests
every query block of its range (one loop instance keeps registers in budget).

ALiBi (``alibi_slopes``, constexpr ``HAS_ALIBI``): the logit of query i and key j gains
``-slope[b, h] * |j - i - shift|`` where the additive mask is added (after the soft cap), shift =
Lk - Lq for bottom-right alignment (per sequence with varlen: its used keys minus its queries),
else 0. Each kernel reads the slope of its (batch, head) through the slopes' strides (one scalar
load per program, per query head in dK/dV) and computes the distance from the row and column
indices it already has (``_scores``): the (Lq, Lk) bias is never formed. The bias is a constant:
the lse includes it, the backward recomputes P with it, and dS and the soft cap's derivative are
unchanged. It does not change which key blocks are visited (the band decides that).

Decoding (split-KV, constexpr ``SPLIT_KV``): when the (batch*head, query block) programs are too
few to fill the GPU, the keys are split among ``num_splits`` programs per query block, each saving
its partial output (normalised by its own sum) and lse to float32 scratch; ``_attn_fwd_combine``
merges them with the weights exp(lse_s - lse). With one query per head and grouped-query
attention the launcher first packs the group's query heads into the rows of one block
(``_pack_query_groups``), so that a program reads its K and V once for the whole group. A paged
KV cache (constexpr ``PAGED``, varlen only) is read in place: each key block looks up its keys'
pages in the sequence's block-table row.

Dropout uses the counter-based hash of ``fused_attn._rng`` (``fused_attn.triton._rng``): element
(b, h, i, j) has row ``(b*Hq + h)*Lq + i`` and column ``j``, so forward and backward regenerate the
same mask, and it equals the reference's bit for bit.

Head dims up to 256 of any value: the tiles are padded to a power of two (>= 16) with masked loads.
float32 inputs use IEEE-precision dots (no TF32), half-precision inputs accumulate in float32.

Hopper (sm_90) and newer: the tiles each inner loop streams (K and V in forward and dQ, Q and dO in
dK/dV) can come through the tensor-memory accelerator instead of per-thread loads (constexpr
``STREAM_TMA``): the launcher passes host-side descriptors of the 4-D tensors (any strides that are
16-byte multiples; ``_tma.descriptors``), a configuration's pre-hook sizes their boxes to its
tiles, and a load is ``desc.load([b, h, row, 0])``, zero-filled by the copy engine past the
sequence and the head dim, so it needs no masks and no address registers. The autotuner times
these configurations beside the pointer ones and keeps the faster (``FUSED_ATTN_TRITON_TMA``:
auto / on / off). The interpreter runs the same descriptor loads, which is how the tests hold the
path to the oracle on machines without a GPU.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ..backends.base import Call
from ..backends.triton import interpreter_enabled
from ..ops_common import NO_BAND, clamp_band, empty, new_attention_out, new_varlen_out, varlen_lse_shape
from ._rng import dropout_args, dropout_keep, dropout_row_key
from ._tma import DESCRIPTOR_TYPES as _DESCRIPTOR_TYPES
from ._tuning import LAUNCH_OPTIONS, pick
from ._tma import descriptors
from . import _checks
from ._host import cdiv, next_pow2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


#: Whether the kernels below run under the interpreter: Triton decides it when ``triton.jit``
#: wraps them, at import, so it is read once (an environment read on every launch cost ~0.7 us).
_INTERPRETING = interpreter_enabled()


def _interpreting() -> bool:
    return _INTERPRETING


# ---------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _load_2d(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a 2-D tile, masking only the dimensions that may run past the tensor (zeros there)."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _cols_ok(D: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Which of the HEAD_DIM (padded) columns exist: a constant all-true mask when D == HEAD_DIM,
    which the compiler folds away (loads inside the loops are written with masks, not through
    helper calls, because each device-function call costs milliseconds in the interpreter)."""
    if D == HEAD_DIM:
        ok = tl.full([HEAD_DIM], True, tl.int1)
    else:
        ok = tl.arange(0, HEAD_DIM) < D
    return ok


@triton.jit
def _block_offset(start, stride):
    """start * stride as int64, for a block's first row ``start`` and a row stride, both int32 and
    non-negative (the launchers pass strides below 2**31: ``_int32_tiles``): the product passes
    2**31 at long sequences, so the inner loops add it to their 64-bit base pointers rather than
    to their int32 in-tile offsets. Zero-extended, the two factors make one unsigned widening
    multiply whose high halves take no register; sign-extended ones (a signed int64 product) kept
    the strides' high words live and pushed tight kernels into spilling (the AOT sweep)."""
    return tl.cast(tl.cast(start, tl.uint32), tl.int64) * tl.cast(tl.cast(stride, tl.uint32), tl.int64)


@triton.jit
def _kv_tile(offs_n, stride_n, stride_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The int32 offsets of a (BLOCK_N, HEAD_DIM) tile from its first row: row offs_n mod BLOCK_N
    (the inner loops' blocks start at multiples of BLOCK_N, ``_key_ranges``) times the row stride,
    plus the columns. Taken from offs_n, not from an arange tile outside the loop, which the
    compiler would keep live through it (the AOT sweep measured spills in the loops that way)."""
    return (offs_n & (BLOCK_N - 1))[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :] * stride_d


@triton.jit
def _tanh_parts(a):
    """For a = |x|: ((1 - e) / (1 + e), e = exp(-2a), tanh(a) for a > 0.625; and z p(z), z = a^2,
    Cephes' tanhf polynomial (the cpu backend's tanh8): tanh(a) = a + a z p(z) below). The exp form
    alone lost tanh's small values to the cancellation in 1 - e (an absolute error of ~1e-7, so 0
    for |x| < ~3e-8): the logit softcap * tanh(s / softcap) was off by ~1e-7 * softcap, ~1e-3 at
    softcap 1e4 and everything at 1e8 (every logit 0)."""
    e = tl.math.exp2(-2.8853900817779268 * a)  # exp(-2a)
    z = a * a
    p = -5.70498872745e-3 * z + 2.06390887954e-2
    p = p * z - 5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z - 3.33332819422e-1
    return (1.0 - e) / (1.0 + e), p * z


@triton.jit
def _softcap_tanh(x):
    """tanh(x) to ~2 ulp, exact at the ends (+-1 for |x| large, NaN for NaN): the interpreter has no
    tanh, and on the GPU this costs what libdevice's would (which also takes a polynomial near 0)."""
    a = tl.abs(x)
    large, small = _tanh_parts(a)
    t = tl.where(a > 0.625, large, small * a + a)  # (NaN: not > 0.625, the polynomial's NaN)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softcap_arg(x, softcap_log2):
    """tanh's argument of the soft cap, s / softcap, from the uncapped base-2 logit x = s * log2(e):
    x * (1 / (softcap * log2 e)), with no clamp needed (|x| beyond ~5e8 under the smallest cap gives
    +-inf, where tanh is +-1). Forward and backward form it alike."""
    return x * (1.0 / softcap_log2)


@triton.jit
def _softcap_logit(x, softcap_log2):
    """The capped base-2 logit softcap_log2 * tanh(u), u = ``_softcap_arg(x, softcap_log2)``, of
    the uncapped one x, to ~2 ulp (as ``_softcap_tanh``). Where |u| <= 0.625 it is taken as
    x * (1 + u^2 p(u^2)) (Cephes' odd polynomial, tanh(u) = u (1 + u^2 p(u^2)), times softcap =
    x / u), not as softcap_log2 * tanh(u): under a huge cap u is subnormal or 0 in float32 (s /
    1e38), and tanh(u) * softcap lost the logit to it (the kernels took qk * (scale / softcap),
    whose factor underflowed at a cap of 1e38 and a scale of 1e-10: every logit 0). So a cap far
    above the logits leaves them exactly as without it. Above 0.625, +-softcap_log2 (1 - e) / (1 + e),
    e = exp(-2|u|); NaN stays NaN."""
    u = _softcap_arg(x, softcap_log2)
    a = tl.abs(u)
    large, small = _tanh_parts(a)
    big = large * softcap_log2
    big = tl.where(u < 0, -big, big)
    return tl.where(a > 0.625, big, x + x * small)  # (NaN: not > 0.625, x's NaN)


@triton.jit
def _scores(qk, qi, kj, mask_ptrs, Lq, Lk, band_lo, band_hi, qk_scale, softcap_log2, alibi_log2, alibi_shift,
            MASK_KIND: tl.constexpr, CHECK_KEYS: tl.constexpr, CHECK_BAND: tl.constexpr, SOFTCAP: tl.constexpr,
            HAS_ALIBI: tl.constexpr):
    """Scaled, masked scores in base-2 units (-inf where masked) of the raw q.k tile ``qk``.

    ``qi``/``kj`` are the query/key indices broadcast to the tile's orientation ((M,1)/(1,N) in
    forward and dQ, (1,M)/(N,1) in dK/dV), ``mask_ptrs`` the attn_mask addresses of the tile.
    MASK_KIND: 0 none, 1 boolean (nonzero = attend), 2 additive. CHECK_BAND: query i sees key j
    only if band_lo <= j - i <= band_hi; CHECK_KEYS: only keys j < Lk exist. qk_scale = scale *
    log2(e). SOFTCAP: the logit is softcap * tanh(scale * qk / softcap) (``_softcap_logit`` of
    qk * qk_scale), softcap_log2 = softcap * log2(e) (the launcher's ``_scales``), before the mask
    is added. HAS_ALIBI: ALiBi's
    bias -slope * |j - (i + alibi_shift)| is added with the mask, ``alibi_log2`` = slope * log2(e)
    (``_alibi``).
    """
    if SOFTCAP:
        s = _softcap_logit(qk * qk_scale, softcap_log2)
    else:
        s = qk * qk_scale
    if MASK_KIND == 1:
        keep = tl.load(mask_ptrs, mask=(qi < Lq) & (kj < Lk), other=0)
        s = tl.where(keep != 0, s, float("-inf"))
    elif MASK_KIND == 2:
        bias = tl.load(mask_ptrs, mask=(qi < Lq) & (kj < Lk), other=0.0)
        s = s + bias.to(tl.float32) * 1.4426950408889634
    if HAS_ALIBI:
        # ALiBi: -slope * |j - d_i|, d_i = i + shift being query i's key position. The scores here
        # are in base-2 units (s * log2 e, for exp2), so the natural-log bias is scaled by log2 e
        # too (folded into alibi_log2). The distance is taken in float32: each index converts
        # exactly (|index| < 2^24) and so does their difference, leaving one rounding, in the
        # product (slope * j - slope * d_i would lose the distance to cancellation at long
        # sequences). Only the (rows, 1) and (1, cols) index vectors are converted; per element
        # this costs a subtraction and a multiply by |dist| (the scaling of qk becomes an FMA).
        dist = kj.to(tl.float32) - (qi + alibi_shift).to(tl.float32)
        s = s - alibi_log2 * tl.abs(dist)
    if CHECK_BAND:
        # band_lo <= j - i <= band_hi as one unsigned compare: j - i - band_lo in [0, band_hi - band_lo]
        # (the launcher guarantees band_lo <= band_hi)
        visible = (kj - qi - band_lo).to(tl.uint32) <= (band_hi - band_lo).to(tl.uint32)
        if CHECK_KEYS:
            visible = visible & (kj < Lk)
        s = tl.where(visible, s, float("-inf"))
    elif CHECK_KEYS:
        s = tl.where(kj < Lk, s, float("-inf"))
    return s


@triton.jit
def _key_ranges(start_m, Lq, Lk, band_lo, band_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BANDED: tl.constexpr):
    """Where the key loop of the queries [start_m, start_m + BLOCK_M) runs, as block starts
    (multiples of BLOCK_N): (first, full_lo, full_hi, end). Blocks in [full_lo, full_hi) are
    seen whole by every query row (inside Lk and inside the band: no index masks); those in
    [first, full_lo) cross the band's lower edge, those in [full_hi, end) its upper edge or Lk.
    Query i sees keys [i + band_lo, i + band_hi], so the block's first row bounds the keys from
    below and its last row from above; the clamps make first <= full_lo <= full_hi <= end."""
    first = 0
    full_lo = 0
    full_hi = (Lk // BLOCK_N) * BLOCK_N
    end = Lk
    if BANDED:
        last_m = tl.minimum(start_m + BLOCK_M, Lq) - 1
        first = (tl.maximum(start_m + band_lo, 0) // BLOCK_N) * BLOCK_N
        end = tl.maximum(tl.minimum(Lk, last_m + band_hi + 1), first)
        full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(last_m + band_lo, 0), BLOCK_N) * BLOCK_N, first), end)
        full_hi = tl.minimum(full_hi, (tl.maximum(start_m + band_hi + 1, 0) // BLOCK_N) * BLOCK_N)
        full_hi = tl.minimum(tl.maximum(full_hi, full_lo), end)
    return first, full_lo, full_hi, end


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, b, hk, mask_base, drop_keys, offs_m, lo, hi,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Lq, Lk, band_lo, band_hi, qk_scale,
               softcap_log2, alibi_log2, alibi_shift, drop_threshold, D: tl.constexpr, DV: tl.constexpr,
               HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_KEYS: tl.constexpr,
               CHECK_BAND: tl.constexpr, DOT_PRECISION: tl.constexpr, STREAM_TMA: tl.constexpr,
               LOOP_STAGES: tl.constexpr, SCALE_NONNEG: tl.constexpr, HAS_ALIBI: tl.constexpr, page_row,
               stride_kpage, stride_vpage, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Online-softmax over the key blocks starting in [lo, hi). With STREAM_TMA the K and V tiles
    come through the (B, Hkv, Lk, D) tensor descriptors ``k_desc``/``v_desc`` (rows past Lk and
    columns past D are zero-filled by the copy engine), else through pointers and masks. PAGED:
    key j is row j % PAGE_SIZE of page page_row[j // PAGE_SIZE] (a paged KV cache)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    d_ok = _cols_ok(D, HEAD_DIM)
    dv_ok = _cols_ok(DV, HEAD_DIM_V)
    # attn_mask addresses: a 64-bit scalar base per block plus loop-invariant int32 tile offsets
    # (64-bit pointer tiles would cost two registers per element).
    mask_offs = tl.arange(0, BLOCK_M)[:, None] * stride_mm + tl.arange(0, BLOCK_N)[None, :] * stride_mn
    if not STREAM_TMA and not PAGED:
        # K and V through scalar pointers at the key block's first row, advanced a block per step
        # (64-bit pointers: lo * stride passes 2**31 at long sequences; the step, BLOCK_N rows, fits
        # int32, ``_int32_tiles``), and int32 offsets within the block (``_kv_tile``)
        k_blk = k_base + _block_offset(lo, stride_kn)
        v_blk = v_base + _block_offset(lo, stride_vn)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=LOOP_STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if CHECK_KEYS:
            key_ok = offs_n < Lk
        else:
            key_ok = tl.full([BLOCK_N], True, tl.int1)
        if PAGED:  # each key's page from the sequence's block table (one int32 per key, cached)
            page = tl.load(page_row + offs_n // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
            k_rows = page * stride_kpage + (offs_n % PAGE_SIZE) * stride_kn
            v_rows = page * stride_vpage + (offs_n % PAGE_SIZE) * stride_vn
        if STREAM_TMA:
            k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        elif PAGED:
            k = tl.load(k_base + k_rows[:, None] + offs_d[None, :] * stride_kd,
                        mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_blk + _kv_tile(offs_n, stride_kn, stride_kd, HEAD_DIM, BLOCK_N),
                        mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if (MASK_KIND == 0 and not CHECK_KEYS and not CHECK_BAND and not SOFTCAP and not HAS_ALIBI
                and SCALE_NONNEG):
            # Nothing masked: with scale >= 0 the row maximum of the scaled scores is the scaled
            # maximum of the raw ones, so the scaled scores are never formed on their own and the
            # exponent is one FFMA per element (qk * scale - m) instead of an FMUL and an FADD.
            # Every key here is real, so m_new is finite for finite inputs.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            p = tl.math.exp2(qk * qk_scale - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
        else:
            mask_ptrs = mask_base + tl.cast(start_n, tl.int64) * stride_mn + mask_offs
            s = _scores(qk, offs_m[:, None], offs_n[None, :], mask_ptrs, Lq, Lk, band_lo, band_hi, qk_scale,
                        softcap_log2, alibi_log2, alibi_shift, MASK_KIND, CHECK_KEYS, CHECK_BAND, SOFTCAP, HAS_ALIBI)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with every key so far masked has m_new = -inf; subtract 0 instead (exp2(-inf) = 0).
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:  # the normaliser uses all probabilities, the output only the kept ones
            p = tl.where(dropout_keep(drop_keys[:, None], offs_n[None, :], drop_threshold), p, 0.0)
        if STREAM_TMA:
            v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_V)
        elif PAGED:
            v = tl.load(v_base + v_rows[:, None] + offs_dv[None, :] * stride_vd,
                        mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        else:
            v = tl.load(v_blk + _kv_tile(offs_n, stride_vn, stride_vd, HEAD_DIM_V, BLOCK_N),
                        mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        if not STREAM_TMA and not PAGED:
            k_blk += BLOCK_N * stride_kn
            v_blk += BLOCK_N * stride_vn
    return acc, l_i, m_i


@triton.jit
def _drop_row_keys(seed_lo, seed_hi_mix, offset_lo, offset_hi, row0, offs_m):
    """The dropout hash key of query rows ``offs_m`` of a head whose row 0 is logical row ``row0``
    (``_drop_row0``): row = offset + row0 + i."""
    offset = (offset_hi.to(tl.uint32).to(tl.int64) << 32) | offset_lo.to(tl.uint32).to(tl.int64)
    return dropout_row_key(seed_lo, seed_hi_mix, offset + row0 + offs_m)


@triton.jit
def _drop_row0(b, h, Hq, Lq, q_start, VARLEN: tl.constexpr):
    """The dropout RNG's logical row of query 0 of head h (int64): (b * Hq + h) * Lq; a varlen
    sequence counts as a batch of one at offset Hq * q_start (``ops_common.varlen_rng_offset``)."""
    if VARLEN:
        return h * Lq + q_start * Hq
    return (b * Hq + h) * Lq


@triton.jit
def _sequence(Starts, Ends, b):
    """(start row, length) of varlen sequence b: rows Starts[b]:Ends[b] (for cumulative lengths
    cu, Starts = cu and Ends = cu + 1)."""
    start = tl.load(Starts + b).to(tl.int64)
    return start, (tl.load(Ends + b) - start).to(tl.int32)


@triton.jit
def _program_sequence(CuQ, CuK, KEnd, b, Lq, Lk, band_lo, band_hi, VARLEN: tl.constexpr,
                      BOTTOM_RIGHT: tl.constexpr):
    """(q_start, k_start, Lq, Lk, band_lo, band_hi) of batch entry b: with VARLEN its sequence's
    first query and key rows, lengths and band (``_sequence_band``); otherwise rows 0 and the
    arguments as they are. Sequence b's keys end at KEnd[b]: cu_seqlens_k[b + 1], or fewer with
    ``seqused_k``."""
    q_start = tl.zeros([], tl.int64)
    k_start = tl.zeros([], tl.int64)
    if VARLEN:
        q_start, Lq = _sequence(CuQ, CuQ + 1, b)
        k_start, Lk = _sequence(CuK, KEnd, b)
        band_lo, band_hi = _sequence_band(band_lo, band_hi, Lq, Lk, BOTTOM_RIGHT)
    return q_start, k_start, Lq, Lk, band_lo, band_hi


@triton.jit
def _sequence_band(band_lo, band_hi, Lq, Lk, BOTTOM_RIGHT: tl.constexpr):
    """A varlen sequence's band: the launcher's band is relative to the top-left corner (and
    clamped to +-(max_seqlen_q + max_seqlen_k)); BOTTOM_RIGHT shifts it by this sequence's
    Lk - Lq. Clamped to [-Lq, Lk] as ``ops_common.clamp_band``, an empty band to (Lk, Lk)."""
    if BOTTOM_RIGHT:
        band_lo = band_lo + (Lk - Lq)
        band_hi = band_hi + (Lk - Lq)
    lo = tl.minimum(tl.maximum(band_lo, -Lq), Lk)
    hi = tl.minimum(tl.maximum(band_hi, -Lq), Lk)
    empty = lo > hi
    return tl.where(empty, Lk, lo), tl.where(empty, Lk, hi)


@triton.jit
def _alibi(Alibi, stride_ab, stride_ah, b, h, Lq, Lk, HAS_ALIBI: tl.constexpr, BOTTOM_RIGHT: tl.constexpr):
    """(slope * log2 e, shift) of ALiBi for batch entry (or varlen sequence) b and query head h:
    the slope read through the (B, Hq) slopes' strides (often a stride-0 expand of (Hq,)), in the
    base-2 units of the scores; shift = Lk - Lq (this sequence's lengths) with BOTTOM_RIGHT, which
    places query i at key position i + Lk - Lq, else 0. Without HAS_ALIBI: (0, 0), placeholders
    ``_scores`` does not read, and no load.

    A finite slope above float32's max / log2(e) (~2.36e38) overflows slope * log2(e) to +-inf,
    whose product with the row's own key's distance 0 was NaN (NaN rows, where the other backends,
    in natural units, give that key the bias 0 and the others -slope * |dist|, -inf from 2 on): it
    is taken as +-float32's max instead, which keeps the bias 0 at distance 0 and, at distance 1,
    a finite base-2 logit below -3.4e38 + s (as the others' -slope + s, a probability of 0 beside
    any key of the usual range). Per program, not per score; an inf or NaN slope stays as it is
    (NaN rows, as on the other backends)."""
    slope = 0.0
    shift = 0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h * stride_ah).to(tl.float32)
        scaled = slope * 1.4426950408889634
        overflowed = (tl.abs(slope) <= 3.4028234663852886e38) & (tl.abs(scaled) > 3.4028234663852886e38)
        slope = tl.where(overflowed, tl.where(slope > 0, 3.4028234663852886e38, -3.4028234663852886e38), scaled)
        if BOTTOM_RIGHT:
            shift = Lk - Lq
    return slope, shift


# ---------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["seed_lo", "seed_hi_mix", "offset_lo", "offset_hi", "drop_threshold"])
def _attn_fwd(Q, K, V, KDesc, VDesc, Mask, Out, Lse, CuQ, CuK, KEnd,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_mb, stride_mh, stride_mm, stride_mn,
              stride_ob, stride_oh, stride_om, stride_od,
              Hq, GROUP, Lq, Lk, TQ, band_lo, band_hi, qk_scale, softcap_log2, keep_scale,
              seed_lo, seed_hi_mix, offset_lo, offset_hi, drop_threshold,
              LQ_KEY, LK_KEY, TMA_KEY,  # autotuning keys only: rounded lengths, descriptors (``_tma.descriptors``)
              Alibi, stride_ab, stride_ah,  # last, so that the other arguments keep their places without ALiBi
              num_splits, split_base, split_keys, stride_split_o, stride_split_lse,  # SPLIT_KV only
              BlockTable, stride_tb, stride_kpage, stride_vpage,  # PAGED only
              D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BANDED: tl.constexpr,
              VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
              SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STREAM_TMA: tl.constexpr, LOOP_STAGES: tl.constexpr,
              SCALE_NONNEG: tl.constexpr, SPLIT_KV: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """One query block of one head. VARLEN: b is a packed sequence (``attention_varlen``), Lq / Lk
    arrive as the longest lengths (they size the grid) and become this sequence's; the tensors
    come as (1, H, total, dim) views with batch stride 0, moved here to the sequence's first row;
    Lse is (Hq, TQ). HAS_ALIBI: Alibi holds the (B, Hq) slopes (B = sequences with VARLEN) and
    BOTTOM_RIGHT places the queries at the end of the keys (``_alibi``; without VARLEN it matters
    for nothing else: the launcher has aligned the band).

    SPLIT_KV (flash-decoding, ``kv_splits``): ``num_splits`` programs share each query block, split
    s taking the keys [base + s * split_keys, base + (s + 1) * split_keys) (base = ``split_base``;
    base and split_keys are multiples of every BLOCK_N). Out and Lse are then float32 scratch
    holding one partial result per split, split s at element offset s * stride_split_o (and
    s * stride_split_lse): the output normalised by the split's own sum and the split's lse, -inf
    where it saw no key. ``_attn_fwd_combine`` merges them.

    PAGED (with VARLEN: a paged KV cache, ``attention_varlen(..., block_table=)``): K and V are
    (num_pages, PAGE_SIZE, Hkv, dim) pages, passed with the strides of a page's rows (stride_kn),
    heads and columns and of the pages (stride_kpage); sequence b's key j is row j % PAGE_SIZE of
    page BlockTable[b, j // PAGE_SIZE] (row b at b * stride_tb, its entries adjacent: ``Varlen``
    copies a table whose columns are not). CuK / KEnd then give only the sequences' key counts."""
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    split = 0
    if SPLIT_KV:  # the splits of one query block are neighbours in the grid
        split = pid % num_splits
        pid = pid // num_splits
        Out += split.to(tl.int64) * stride_split_o
        Lse += split.to(tl.int64) * stride_split_lse
    bh = (pid // num_m).to(tl.int64)
    pid_m = pid % num_m
    if BANDED:  # causal: the last query blocks see the most keys, start them first
        pid_m = num_m - 1 - pid_m
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    q_start, k_start, Lq, Lk, band_lo, band_hi = _program_sequence(CuQ, CuK, KEnd, b, Lq, Lk, band_lo, band_hi,
                                                                   VARLEN, BOTTOM_RIGHT)
    lse_row0 = bh * Lq
    if VARLEN:
        if start_m >= Lq:  # past this sequence's queries
            return
        Q += q_start * stride_qm
        Out += q_start * stride_om
        if not PAGED:  # paged keys are found through the block table instead
            K += k_start * stride_kn
            V += k_start * stride_vn
        lse_row0 = h * TQ + q_start
    alibi_log2, alibi_shift = _alibi(Alibi, stride_ab, stride_ah, b, h, Lq, Lk, HAS_ALIBI, BOTTOM_RIGHT)
    rows = tl.arange(0, BLOCK_M)  # in-tile rows: int32 offsets from the block's 64-bit base
    offs_m = start_m + rows
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row0 = start_m.to(tl.int64)  # (start_m * row stride passes 2**31 at long sequences)

    q = _load_2d(Q + b * stride_qb + h * stride_qh + row0 * stride_qm
                 + (rows[:, None] * stride_qm + offs_d[None, :] * stride_qd),
                 offs_m < Lq, offs_d < D, True, D != HEAD_DIM)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    page_row = BlockTable + b * stride_tb
    mask_base = Mask + b * stride_mb + h * stride_mh + start_m.to(tl.int64) * stride_mm
    drop_keys = offs_m.to(tl.uint32)  # placeholder when DROPOUT is off
    if DROPOUT:
        drop_keys = _drop_row_keys(seed_lo, seed_hi_mix, offset_lo, offset_hi,
                                   _drop_row0(b, h, Hq, Lq, q_start, VARLEN), offs_m)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    # Only the key blocks that cross an edge of the band or the end of the keys pay for index masks.
    first, full_lo, full_hi, end = _key_ranges(start_m, Lq, Lk, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    if SPLIT_KV:  # this split's share of each range; the bounds stay ordered and block-aligned
        split_lo = split_base + split * split_keys
        split_hi = split_lo + split_keys
        first = tl.minimum(tl.maximum(first, split_lo), split_hi)
        full_lo = tl.minimum(tl.maximum(full_lo, split_lo), split_hi)
        full_hi = tl.minimum(tl.maximum(full_hi, split_lo), split_hi)
        end = tl.minimum(tl.maximum(end, split_lo), split_hi)
    b32 = b.to(tl.int32)  # descriptor coordinates are 32-bit
    hk32 = hk.to(tl.int32)
    if BANDED:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b32, hk32, mask_base, drop_keys,
                                   offs_m, first, full_lo, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                                   stride_mn, Lq, Lk, band_lo, band_hi, qk_scale, softcap_log2, alibi_log2,
                                   alibi_shift, drop_threshold, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N,
                                   MASK_KIND, DROPOUT, SOFTCAP, True, True, DOT_PRECISION, STREAM_TMA, LOOP_STAGES,
                                   SCALE_NONNEG, HAS_ALIBI, page_row, stride_kpage, stride_vpage, PAGED,
                                   PAGE_SIZE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b32, hk32, mask_base, drop_keys,
                               offs_m, full_lo, full_hi, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                               stride_mn, Lq, Lk, band_lo, band_hi, qk_scale, softcap_log2, alibi_log2, alibi_shift,
                               drop_threshold, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT,
                               SOFTCAP, False, False, DOT_PRECISION, STREAM_TMA, LOOP_STAGES, SCALE_NONNEG, HAS_ALIBI,
                               page_row, stride_kpage, stride_vpage, PAGED, PAGE_SIZE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, KDesc, VDesc, b32, hk32, mask_base, drop_keys,
                               offs_m, full_hi, end, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               Lq, Lk, band_lo, band_hi, qk_scale, softcap_log2, alibi_log2, alibi_shift,
                               drop_threshold, D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT,
                               SOFTCAP, True, BANDED, DOT_PRECISION, STREAM_TMA, LOOP_STAGES, SCALE_NONNEG, HAS_ALIBI,
                               page_row, stride_kpage, stride_vpage, PAGED, PAGE_SIZE)

    has_keys = l_i != 0.0  # not "> 0": a NaN row (NaN input) must stay NaN, lse included
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc * tl.where(has_keys, keep_scale / l_safe, 0.0)[:, None]
    # A row with no key: lse = +inf, so that backward's exp(s - lse) is 0; a split with no key
    # for the row: -inf, the weight 0 of its (zero) partial output in the merge.
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453,
                   float("-inf") if SPLIT_KV else float("inf"))
    tl.store(Lse + lse_row0 + offs_m, lse, mask=offs_m < Lq)
    out_ptrs = (Out + b * stride_ob + h * stride_oh + row0 * stride_om
                + (rows[:, None] * stride_om + offs_dv[None, :] * stride_od))
    if DV == HEAD_DIM_V:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < Lq)[:, None])
    else:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=(offs_m < Lq)[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _attn_fwd_combine(OutPart, LsePart, Out, Lse, num_splits, stride_split_o, stride_split_lse, rows, Hq, Lq,
                      stride_ob, stride_oh, stride_om, stride_od,
                      DV: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr):
    """Merge the split-KV partial results (``_attn_fwd`` with SPLIT_KV) of BLOCK_M rows.

    Row r (of ``rows``; r = (b * Hq + h) * Lq + i, the Lse layout) has from split s the output
    o_s, normalised by its split's sum, and that split's lse_s. With lse = log sum_s exp(lse_s)
    the merged output is sum_s exp(lse_s - lse) * o_s: each split's share of the row's softmax
    mass. Splits that saw no key have lse_s = -inf and weigh nothing; a row no split saw keeps
    zeros and lse = +inf (the unsplit kernel's dead row). A NaN lse_s makes the row NaN."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # rows: int32 (fewer than 2**31 lse rows)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row_ok = offs_m < rows
    part_rows = offs_m.to(tl.int64)[:, None] * DV  # the partials' element offsets may pass 2**31
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for s in range(num_splits):
        m = tl.maximum(m, tl.load(LsePart + s * stride_split_lse + offs_m, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], tl.float32)
    for s in range(num_splits):
        lse_s = tl.load(LsePart + s * stride_split_lse + offs_m, mask=row_ok, other=float("-inf"))
        weight = tl.math.exp2((lse_s - m_safe) * 1.4426950408889634)
        total += weight
        o_s = _load_2d(OutPart + s * stride_split_o + part_rows + offs_dv[None, :], row_ok, offs_dv < DV,
                       True, DV != HEAD_DIM_V)
        acc += weight[:, None] * o_s
    has_keys = total != 0.0
    total_safe = tl.where(has_keys, total, 1.0)
    out = acc / total_safe[:, None]
    tl.store(Lse + offs_m, tl.where(has_keys, m_safe + tl.log(total_safe), float("inf")), mask=row_ok)
    b = offs_m // (Hq * Lq)
    h = (offs_m // Lq) % Hq
    i = offs_m % Lq
    out_rows = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_om
    out_ptrs = Out + out_rows[:, None] + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_dv < DV)[None, :])


# ---------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _attn_bwd_delta(Out, dOut, Delta, dLse,
                    stride_ob, stride_oh, stride_om, stride_od,
                    stride_gb, stride_gh, stride_gm, stride_gd,
                    stride_lb, stride_lh, stride_lm,
                    Hq, Lq, DV: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                    HAS_DLSE: tl.constexpr):
    """delta[b, h, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] - dlse[b, h, i] in float32.

    dlse, the returned lse's gradient, enters only here: d lse_i / d s_ij = P_ij, so its term
    dlse_i * P_ij folds into dS = P * (dP - delta)."""
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_m).to(tl.int64)
    b = bh // Hq
    h = bh % Hq
    start_m = (pid % num_m) * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = start_m + rows
    row0 = start_m.to(tl.int64)  # the block's first row enters the 64-bit base (row0 * stride may pass 2**31)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    o = _load_2d(Out + b * stride_ob + h * stride_oh + row0 * stride_om
                 + (rows[:, None] * stride_om + offs_dv[None, :] * stride_od),
                 offs_m < Lq, offs_dv < DV, True, DV != HEAD_DIM_V)
    do = _load_2d(dOut + b * stride_gb + h * stride_gh + row0 * stride_gm
                  + (rows[:, None] * stride_gm + offs_dv[None, :] * stride_gd),
                  offs_m < Lq, offs_dv < DV, True, DV != HEAD_DIM_V)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(dLse + b * stride_lb + h * stride_lh + row0 * stride_lm + rows * stride_lm, mask=offs_m < Lq,
                         other=0.0)
    tl.store(Delta + bh * Lq + offs_m, delta, mask=offs_m < Lq)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, q_desc, do_desc, b, h, lse_base, delta_base, mask_base, dmask_base,
                offs_n, lo, hi, stride_qm, stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, Lq, Lk, band_lo,
                band_hi, qk_scale, softcap_log2, alibi_log2, alibi_shift, keep_scale, seed_lo, seed_hi_mix, offset_lo,
                offset_hi, drop_threshold, drop_row0, D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr,
                HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                MASK_GRAD: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_BAND: tl.constexpr,
                DOT_PRECISION: tl.constexpr, DKDV_PASS: tl.constexpr, STREAM_TMA: tl.constexpr,
                LOOP_STAGES: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks starting in [lo, hi).

    Tiles are transposed ((keys, queries)) so that dK, dV accumulate with plain dots. Queries
    past Lq need no score mask: their lse loads as +inf, so their probabilities are 0.
    DKDV_PASS (see _attn_bwd_dkdv): 0 accumulates both, 1 only dK (and writes dMask), 2 only dV
    (``v`` is then unused and ``dk`` passes through). STREAM_TMA: Q and dO tiles come through the
    descriptors ``q_desc``/``do_desc`` (zero-filled past Lq and the head dims).
    """
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    d_ok = _cols_ok(D, HEAD_DIM)
    dv_ok = _cols_ok(DV, HEAD_DIM_V)
    # mask/dmask addresses: 64-bit scalar bases (already at this key block) + int32 tile offsets
    mask_offs = tl.arange(0, BLOCK_M)[None, :] * stride_mm + tl.arange(0, BLOCK_N)[:, None] * stride_mn
    dmask_offs = tl.arange(0, BLOCK_M)[None, :] * Lk + tl.arange(0, BLOCK_N)[:, None]
    for start_m in tl.range(lo, hi, BLOCK_M, num_stages=LOOP_STAGES):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if STREAM_TMA:
            q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
        else:
            # the query block's first row in the 64-bit base, its rows as int32 offsets (as in
            # _fwd_inner; offs_m % BLOCK_M here, which the AOT sweep found clean where & was not)
            q = tl.load(q_base + _block_offset(start_m, stride_qm)
                        + ((offs_m % BLOCK_M)[:, None] * stride_qm + offs_d[None, :] * stride_qd),
                        mask=(offs_m < Lq)[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(lse_base + offs_m, mask=offs_m < Lq, other=float("inf")) * 1.4426950408889634
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        mask_ptrs = mask_base + tl.cast(start_m, tl.int64) * stride_mm + mask_offs
        sT = _scores(qkT, offs_m[None, :], offs_n[:, None], mask_ptrs, Lq, Lk, band_lo, band_hi, qk_scale, softcap_log2,
                     alibi_log2, alibi_shift, MASK_KIND, False, CHECK_BAND, SOFTCAP, HAS_ALIBI)
        pT = tl.math.exp2(sT - lse[None, :])
        if STREAM_TMA:
            do = do_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, HEAD_DIM_V)
        else:
            do = tl.load(do_base + _block_offset(start_m, stride_gm)
                         + ((offs_m % BLOCK_M)[:, None] * stride_gm + offs_dv[None, :] * stride_gd),
                         mask=(offs_m < Lq)[:, None] & dv_ok[None, :], other=0.0)
        # (the statement order of the combined pass 0 is the one the AOT sweep measured at D <= 128)
        if DKDV_PASS != 2:
            dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keys = _drop_row_keys(seed_lo, seed_hi_mix, offset_lo, offset_hi, drop_row0, offs_m)
            keepT = dropout_keep(keys[None, :], offs_n[:, None], drop_threshold)
            pT_kept = tl.where(keepT, pT * keep_scale, 0.0)
            if DKDV_PASS != 2:
                dpT = tl.where(keepT, dpT * keep_scale, 0.0)
        else:
            pT_kept = pT
        if DKDV_PASS != 1:
            dv = tl.dot(pT_kept.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if DKDV_PASS != 2:
            delta = tl.load(delta_base + offs_m, mask=offs_m < Lq, other=0.0)
            dsT = pT * (dpT - delta[None, :])
            if MASK_GRAD:
                dmask_ptrs = dmask_base + tl.cast(start_m, tl.int64) * Lk + dmask_offs
                tl.store(dmask_ptrs, dsT.to(dmask_base.dtype.element_ty),
                         mask=(offs_m[None, :] < Lq) & (offs_n[:, None] < Lk))
            # through the cap: d(softcap * tanh(x)) / dx = softcap * (1 - tanh(x)^2), from the capped
            # score alone (the mask and ALiBi's bias are added after the cap: constants to it)
            if SOFTCAP:
                tT = _softcap_tanh(_softcap_arg(qkT * qk_scale, softcap_log2))
                dsT = dsT * (1.0 - tT * tT)
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed_lo", "seed_hi_mix", "offset_lo", "offset_hi", "drop_threshold"])
def _attn_bwd_dkdv(Q, K, V, QDesc, dODesc, Mask, dOut, Lse, Delta, dK, dV, dMask, CuQ, CuK, KEnd,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                   stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn, stride_gb, stride_gh,
                   stride_gm, stride_gd, Hq, Hkv, GROUP, Lq, Lk, TQ, band_lo, band_hi, qk_scale, softcap_log2, scale,
                   keep_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi, drop_threshold, LQ_KEY, LK_KEY, TMA_KEY,
                   Alibi, stride_ab, stride_ah,
                   D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BANDED: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                   MASK_GRAD: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DKDV_PASS: tl.constexpr, STREAM_TMA: tl.constexpr, LOOP_STAGES: tl.constexpr):
    """dK, dV (contiguous, K's / V's shape) and, with MASK_GRAD, dMask (contiguous (B, Hq, Lq, Lk)).

    DKDV_PASS 0 computes both. A program of it holds two (BLOCK_N, head dim) float32 accumulators
    beside K and V, which at head dims above 128 does not fit the register file even for 64-key
    blocks (the AOT sweep measured 9-216 spill instructions). There the launcher runs the kernel
    twice (``dkdv_passes``): pass 1 accumulates dK only (and writes dMask), pass 2 dV only. Each
    holds one accumulator; the price is that both recompute the scores and probabilities.
    VARLEN: as in _attn_fwd; dK, dV are then contiguous (total_k, Hkv, D / DV). HAS_ALIBI: as in
    _attn_fwd, each query head of the group with its own slope.
    """
    num_n = tl.cdiv(Lk, BLOCK_N)
    pid = tl.program_id(0)
    bhk = (pid // num_n).to(tl.int64)
    pid_n = pid % num_n
    b = bhk // Hkv
    hk = bhk % Hkv
    start_n = pid_n * BLOCK_N
    q_start, k_start, Lq, Lk, band_lo, band_hi = _program_sequence(CuQ, CuK, KEnd, b, Lq, Lk, band_lo, band_hi,
                                                                   VARLEN, BOTTOM_RIGHT)
    # dK, dV addresses: row 0 of this head and the step between rows
    dk_row0 = bhk * Lk * D
    dv_row0 = bhk * Lk * DV
    dk_step = D
    dv_step = DV
    if VARLEN:
        if start_n >= Lk:  # past this sequence's keys
            return
        Q += q_start * stride_qm
        dOut += q_start * stride_gm
        K += k_start * stride_kn
        V += k_start * stride_vn
        dk_row0 = (k_start * Hkv + hk) * D
        dv_row0 = (k_start * Hkv + hk) * DV
        dk_step = Hkv * D
        dv_step = Hkv * DV
    rows = tl.arange(0, BLOCK_N)  # in-tile key rows: int32 offsets from the block's 64-bit base
    offs_n = start_n + rows
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row0 = start_n.to(tl.int64)  # (start_n * row stride passes 2**31 at long sequences)
    k = _load_2d(K + b * stride_kb + hk * stride_kh + row0 * stride_kn
                 + (rows[:, None] * stride_kn + offs_d[None, :] * stride_kd),
                 offs_n < Lk, offs_d < D, True, D != HEAD_DIM)
    v = k  # placeholder: the dV pass never reads V
    if DKDV_PASS != 2:
        v = _load_2d(V + b * stride_vb + hk * stride_vh + row0 * stride_vn
                     + (rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd),
                     offs_n < Lk, offs_dv < DV, True, DV != HEAD_DIM_V)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], tl.float32)

    # The queries that see any of these keys: i with band_lo <= j - i <= band_hi for a key j of the
    # block, i.e. [start_n - band_hi, last_n - band_lo]; the loop starts at a multiple of BLOCK_M.
    m_lo = 0
    m_hi = Lq
    if BANDED:
        last_n = tl.minimum(start_n + BLOCK_N, Lk) - 1
        m_lo = (tl.maximum(start_n - band_hi, 0) // BLOCK_M) * BLOCK_M
        m_hi = tl.minimum(Lq, last_n - band_lo + 1)
    for g in range(0, GROUP):  # the query heads that read this kv head, in order: deterministic
        h = hk * GROUP + g
        bh = b * Hq + h
        # each query head of the group has its own slope
        alibi_log2, alibi_shift = _alibi(Alibi, stride_ab, stride_ah, b, h, Lq, Lk, HAS_ALIBI, BOTTOM_RIGHT)
        lse_row0 = bh * Lq
        if VARLEN:
            lse_row0 = h * TQ + q_start
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = dOut + b * stride_gb + h * stride_gh
        mask_base = Mask + b * stride_mb + h * stride_mh + start_n.to(tl.int64) * stride_mn
        dmask_base = dMask + bh * Lq * Lk + start_n
        # One loop for all query blocks (the band test applied to each): two loop instances (masked
        # edge blocks, then unmasked ones) keep both loops' invariants live and spill at D = 128.
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, QDesc, dODesc, b.to(tl.int32), h.to(tl.int32),
                             Lse + lse_row0, Delta + lse_row0, mask_base, dmask_base, offs_n, m_lo, m_hi, stride_qm,
                             stride_qd, stride_gm, stride_gd, stride_mm, stride_mn, Lq, Lk, band_lo, band_hi, qk_scale,
                             softcap_log2, alibi_log2, alibi_shift, keep_scale, seed_lo, seed_hi_mix, offset_lo,
                             offset_hi, drop_threshold, _drop_row0(b, h, Hq, Lq, q_start, VARLEN),
                             D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, MASK_GRAD, DROPOUT, SOFTCAP,
                             BANDED, DOT_PRECISION, DKDV_PASS, STREAM_TMA, LOOP_STAGES, HAS_ALIBI)

    # dK, dV are contiguous (B, Hkv, Lk, D / DV), or (total_k, Hkv, D / DV) with VARLEN; the row
    # offsets in int64 (row * step passes 2**31 at long sequences; formed here, after the loops,
    # they cost no register inside them)
    if DKDV_PASS != 2:
        dk = dk * scale
        dk_ptrs = dK + dk_row0 + offs_n.to(tl.int64)[:, None] * dk_step + offs_d[None, :]
        tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=(offs_n < Lk)[:, None] & (offs_d < D)[None, :])
    if DKDV_PASS != 1:
        dv_ptrs = dV + dv_row0 + offs_n.to(tl.int64)[:, None] * dv_step + offs_dv[None, :]
        tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=(offs_n < Lk)[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, k_desc, v_desc, b, hk, mask_base, drop_keys, offs_m, lo, hi,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Lq, Lk, band_lo, band_hi, qk_scale,
              softcap_log2, alibi_log2, alibi_shift, keep_scale, drop_threshold, D: tl.constexpr, DV: tl.constexpr,
              HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, CHECK_KEYS: tl.constexpr,
              CHECK_BAND: tl.constexpr, DOT_PRECISION: tl.constexpr, STREAM_TMA: tl.constexpr,
              LOOP_STAGES: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Accumulate (dS K) of one query block over the key blocks starting in [lo, hi) (K, V tiles
    through the descriptors with STREAM_TMA, as in ``_fwd_inner``)."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    d_ok = _cols_ok(D, HEAD_DIM)
    dv_ok = _cols_ok(DV, HEAD_DIM_V)
    mask_offs = tl.arange(0, BLOCK_M)[:, None] * stride_mm + tl.arange(0, BLOCK_N)[None, :] * stride_mn
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=LOOP_STAGES):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if CHECK_KEYS:
            key_ok = offs_n < Lk
        else:
            key_ok = tl.full([BLOCK_N], True, tl.int1)
        if STREAM_TMA:
            k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, HEAD_DIM_V)
        else:
            # the key block's first row in a 64-bit base formed per block (the block pointers that
            # _fwd_inner advances measured worse here, in the AOT sweep), int32 offsets within it
            k = tl.load(k_base + _block_offset(start_n, stride_kn)
                        + _kv_tile(offs_n, stride_kn, stride_kd, HEAD_DIM, BLOCK_N),
                        mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_base + _block_offset(start_n, stride_vn)
                        + _kv_tile(offs_n, stride_vn, stride_vd, HEAD_DIM_V, BLOCK_N),
                        mask=key_ok[:, None] & dv_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        mask_ptrs = mask_base + tl.cast(start_n, tl.int64) * stride_mn + mask_offs
        s = _scores(qk, offs_m[:, None], offs_n[None, :], mask_ptrs, Lq, Lk, band_lo, band_hi, qk_scale, softcap_log2,
                    alibi_log2, alibi_shift, MASK_KIND, CHECK_KEYS, CHECK_BAND, SOFTCAP, HAS_ALIBI)
        p = tl.math.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(drop_keys[:, None], offs_n[None, :], drop_threshold)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # from the capped score alone, as in _dkdv_inner
            t = _softcap_tanh(_softcap_arg(qk * qk_scale, softcap_log2))
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed_lo", "seed_hi_mix", "offset_lo", "offset_hi", "drop_threshold"])
def _attn_bwd_dq(Q, K, V, KDesc, VDesc, Mask, dOut, Lse, Delta, dQ, CuQ, CuK, KEnd,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                 stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn, stride_gb, stride_gh,
                 stride_gm, stride_gd, Hq, GROUP, Lq, Lk, TQ, band_lo, band_hi, qk_scale, softcap_log2, scale,
                 keep_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi, drop_threshold, LQ_KEY, LK_KEY, TMA_KEY,
                 Alibi, stride_ab, stride_ah,
                 D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                 BANDED: tl.constexpr, VARLEN: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
                 DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STREAM_TMA: tl.constexpr, LOOP_STAGES: tl.constexpr):
    """dQ (contiguous, Q's shape; VARLEN and HAS_ALIBI as in _attn_fwd, dQ (total_q, Hq, D))."""
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // num_m).to(tl.int64)
    pid_m = pid % num_m
    if BANDED:
        pid_m = num_m - 1 - pid_m
    b = bh // Hq
    h = bh % Hq
    hk = h // GROUP
    start_m = pid_m * BLOCK_M
    q_start, k_start, Lq, Lk, band_lo, band_hi = _program_sequence(CuQ, CuK, KEnd, b, Lq, Lk, band_lo, band_hi,
                                                                   VARLEN, BOTTOM_RIGHT)
    lse_row0 = bh * Lq
    dq_row0 = bh * Lq * D
    dq_step = D
    if VARLEN:
        if start_m >= Lq:  # past this sequence's queries
            return
        Q += q_start * stride_qm
        dOut += q_start * stride_gm
        K += k_start * stride_kn
        V += k_start * stride_vn
        lse_row0 = h * TQ + q_start
        dq_row0 = (q_start * Hq + h) * D
        dq_step = Hq * D
    alibi_log2, alibi_shift = _alibi(Alibi, stride_ab, stride_ah, b, h, Lq, Lk, HAS_ALIBI, BOTTOM_RIGHT)
    rows = tl.arange(0, BLOCK_M)  # in-tile rows: int32 offsets from the block's 64-bit base
    offs_m = start_m + rows
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    row0 = start_m.to(tl.int64)  # (start_m * row stride passes 2**31 at long sequences)
    q = _load_2d(Q + b * stride_qb + h * stride_qh + row0 * stride_qm
                 + (rows[:, None] * stride_qm + offs_d[None, :] * stride_qd),
                 offs_m < Lq, offs_d < D, True, D != HEAD_DIM)
    do = _load_2d(dOut + b * stride_gb + h * stride_gh + row0 * stride_gm
                  + (rows[:, None] * stride_gm + offs_dv[None, :] * stride_gd),
                  offs_m < Lq, offs_dv < DV, True, DV != HEAD_DIM_V)
    lse = tl.load(Lse + lse_row0 + offs_m, mask=offs_m < Lq, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + lse_row0 + offs_m, mask=offs_m < Lq, other=0.0)
    dQ += dq_row0 + row0 * dq_step  # this block's dQ rows
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = Mask + b * stride_mb + h * stride_mh + start_m.to(tl.int64) * stride_mm
    drop_keys = offs_m.to(tl.uint32)
    if DROPOUT:
        drop_keys = _drop_row_keys(seed_lo, seed_hi_mix, offset_lo, offset_hi,
                                   _drop_row0(b, h, Hq, Lq, q_start, VARLEN), offs_m)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    first, full_lo, full_hi, end = _key_ranges(start_m, Lq, Lk, band_lo, band_hi, BLOCK_M, BLOCK_N, BANDED)
    b32 = b.to(tl.int32)
    hk32 = hk.to(tl.int32)
    if BANDED:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, KDesc, VDesc, b32, hk32, mask_base, drop_keys, offs_m,
                       first, full_lo, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Lq, Lk,
                       band_lo, band_hi, qk_scale, softcap_log2, alibi_log2, alibi_shift, keep_scale, drop_threshold,
                       D, DV, HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT, SOFTCAP, True, True,
                       DOT_PRECISION, STREAM_TMA, LOOP_STAGES, HAS_ALIBI)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, KDesc, VDesc, b32, hk32, mask_base, drop_keys, offs_m,
                   full_lo, full_hi, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Lq, Lk, band_lo,
                   band_hi, qk_scale, softcap_log2, alibi_log2, alibi_shift, keep_scale, drop_threshold, D, DV,
                   HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT, SOFTCAP, False, False, DOT_PRECISION,
                   STREAM_TMA, LOOP_STAGES, HAS_ALIBI)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, KDesc, VDesc, b32, hk32, mask_base, drop_keys, offs_m,
                   full_hi, end, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, Lq, Lk, band_lo,
                   band_hi, qk_scale, softcap_log2, alibi_log2, alibi_shift, keep_scale, drop_threshold, D, DV,
                   HEAD_DIM, HEAD_DIM_V, BLOCK_M, BLOCK_N, MASK_KIND, DROPOUT, SOFTCAP, True, BANDED, DOT_PRECISION,
                   STREAM_TMA, LOOP_STAGES, HAS_ALIBI)
    dq = dq * scale
    dq_ptrs = dQ + (rows[:, None] * dq_step + offs_d[None, :])
    tl.store(dq_ptrs, dq.to(dQ.dtype.element_ty), mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :])


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------
# Each kernel has an "outer" block (the rows a program owns: queries for _attn_fwd/_attn_bwd_dq,
# keys for _attn_bwd_dkdv) and an "inner" block (the rows streamed through the loop).
# OUTER_INNER names the constexprs of each kernel in that order.
OUTER_INNER = {"fwd": ("BLOCK_M", "BLOCK_N"), "dq": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_N", "BLOCK_M")}
#: The configurations the autotuner may try, per kernel and padded head dim (<= 64, 128, 256), as
#: (outer, inner, num_warps, num_stages), for sm_90 and newer. Drawn from BLOCK_M in {64, 128},
#: BLOCK_N in {32, 64, 128}, stages 2-4, warps 4/8, keeping those that the AOT sweep
#: (tests/test_triton_attention_aot.py) compiled without local-memory spills: the fp32 accumulators
#: of the outer block (dK and dV together in _attn_bwd_dkdv) plus the score tiles must fit 255
#: registers per thread, which rules out large inner tiles at D = 128 and 128-row outer blocks at
#: D = 256 for fwd and dQ. dK/dV at D = 256 runs as two passes with one accumulator each
#: (``dkdv_passes``); a config there is kept only if both passes compile clean.
CONFIGS = {
    "fwd": {
        64: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
        # The first three (added with the loop-aware spill count): no spill inside the loop in
        # any feature set under Triton 3.6 and 3.9, except (128, 64, 8, 2) with every feature on
        # (3 under 3.9: HEAVY_SPILLS); their key tiles of 32-64 give the q k^T GEMM an N of 32-64.
        # The others: clean in every feature set ((64, 32, 4, 3) spills 16 and (64, 32, 4, 2) 21
        # under 3.6 with every feature on: HEAVY_SPILLS)
        256: [(128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 32, 8, 2),
              (128, 16, 8, 2)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 8, 4), (64, 64, 4, 3), (64, 32, 4, 4)],
        # (128, 128, 8, 2): clean inside the loop only for the plain kernel (PLAIN_ONLY: 58 LDL/STL
        # there for the causal kernel under Triton 3.9, 17-183 once a mask or dropout is on). The
        # 128-query tiles by 64 keys spill 5-65 with every feature on (HEAVY_SPILLS)
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2)],
        # the dQ accumulator of 64 x 256 is 128 registers per thread on 4 warps: (64, 32, 4, 2/3)
        # spilled 20-62 under Triton 3.6; on 8 warps these are clean in every feature set (3.6, 3.9)
        # inside the loop, except (64, 64, 8, 2) and (128, 32, 8, 2) with every feature on (12-22 and
        # 5 under 3.6: HEAVY_SPILLS), and (64, 64, 8, 2) once causal since the 64-bit row offsets
        # (7 under 3.9: PLAIN_ONLY)
        256: [(128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2), (128, 16, 8, 2)],
    },
    "dkdv": {
        # (64, 64, 4, 3) was dropped: 12 (Triton 3.6) / 26 (3.9) LDL/STL for the plain kernel.
        64: [(128, 64, 8, 3), (128, 32, 8, 3), (128, 32, 8, 4), (64, 32, 4, 3)],
        # 128 keys on 8 warps. The score GEMMs (k q^T, v dO^T) have the queries as their N: at 16
        # queries each HGMMA.64x16x16 reads both operands from shared memory (2.5 KB for 32 KFLOP,
        # about 2.5x what the tensor cores can consume), so the wider inner tiles come first:
        # 64 queries (HGMMA.64x64x16, 4 KB per 131 KFLOP) is clean inside the loop only for the
        # plain kernel (PLAIN_ONLY; 14-16 LDL/STL saved and restored around the loops, 7-17 in the
        # loop once causal), 32 queries in every feature set but the mask gradient (HEAVY_SPILLS;
        # 16 in the loop under 3.9); 16 queries is clean everywhere under Triton 3.6 and 3.9.
        128: [(128, 64, 8, 2), (128, 32, 8, 2), (128, 16, 8, 2), (128, 16, 8, 3)],
        # Two passes (dK, then dV). 128 keys on 8 warps (two warpgroups of 64 rows, a 128-register
        # accumulator): by 32 queries clean inside the loops in every feature set but all at once
        # (1 LDL/STL under 3.6, 57 under 3.9: HEAVY_SPILLS), by 16 clean with every feature on
        # under Triton 3.6 and 3.9; 64 keys on 8 warps replicates the score tiles on both
        # warpgroups and spills once a mask, its gradient or dropout is on (HEAVY_SPILLS), but is
        # clean for the plain and causal kernels.
        256: [(128, 32, 8, 2), (128, 16, 8, 2), (64, 32, 8, 2)],
    },
}
#: The same for sm_8x (mma.sync instead of wgmma: different register layouts, less shared memory).
CONFIGS_SM80 = {
    "fwd": {
        64: CONFIGS["fwd"][64],
        128: [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3)],
        256: [(64, 32, 8, 2)],
    },
    "dq": {
        64: CONFIGS["dq"][64],
        128: [(128, 32, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        256: [(64, 32, 8, 2)],
    },
    "dkdv": {
        # the 16-query tiles: clean in all six feature sets of the AOT sweep under Triton 3.6 and 3.9
        64: [(128, 32, 8, 3), (128, 32, 8, 4), (64, 32, 4, 3), (64, 16, 8, 2), (64, 16, 4, 2)],
        # (64, 32, 4, 2) was dropped: 6-71 LDL/STL in every feature set under Triton 3.6. (64, 32, 8, 2)
        # is clean under 3.6; under 3.9 it spills 15 with every feature on, 6 with the mask gradient.
        # 32 x 32 on 4 warps is clean in all six feature sets under both versions.
        128: [(64, 32, 8, 2), (32, 32, 4, 2)],
        # two passes; clean for the plain and causal kernels and with a boolean mask (an earlier
        # sweep: 17 LDL/STL under Triton 3.6); with every feature on 8 reloads in the dK pass's
        # loop over query heads, none in its query loop, under 3.9 (4 before the 64-bit row
        # offsets; 0 under 3.6): accepted, the only config. 128-key blocks do not fit 163 KB of
        # shared memory at D = 256.
        256: [(64, 32, 8, 2)],
    },
}
#: Configurations that compile cleanly for the plain and causal kernels but spill on sm_90 once an
#: attn_mask, its gradient, dropout and the soft cap add their tiles (the AOT sweep's "all" feature
#: set; LDL/STL in the loop): the autotuner skips them when any of those is on, unless nothing else
#: is left.
HEAVY_SPILLS = {
    ("dkdv", 128, (128, 32, 8, 2)),  # mask gradient: 16 in the loop (Triton 3.9)
    ("dkdv", 256, (128, 32, 8, 2)),  # every feature on: 1 (3.6) / 57 (3.9) in the loops
    ("fwd", 256, (128, 64, 8, 2)),   # every feature on: 3 in the loop (3.9)
    ("dq", 256, (64, 64, 8, 2)),     # every feature on: 12 (3.6) / 22 (3.9) in the loop
    ("dq", 128, (128, 64, 8, 3)),    # every feature on: 65 (Triton 3.6) / 5 (3.9)
    ("dq", 128, (128, 64, 8, 2)),    # every feature on: 56 (3.6) / 7 (3.9)
    ("dq", 256, (128, 32, 8, 2)),    # every feature on: 5 (3.6)
    ("fwd", 64, (128, 128, 8, 3)),   # every feature on: 193 (3.6) / 111 (3.9)
    ("fwd", 128, (64, 64, 4, 3)),    # every feature on: 9 (3.9)
    ("fwd", 256, (64, 32, 4, 2)),    # every feature on: 21 (3.6)
    ("fwd", 128, (128, 128, 8, 2)),
    ("dq", 128, (64, 64, 4, 2)),
    ("fwd", 256, (64, 32, 4, 3)),
    ("dkdv", 64, (128, 64, 8, 3)),
    ("dkdv", 256, (64, 32, 8, 2)),   # dK pass: 18 (Triton 3.6) / 104 (3.9) with every feature on
    # every feature on: 7 in the loop over the band's upper edge (3.9) since the K/V block
    # pointers of the 64-bit row offsets (clean under 3.6)
    ("fwd", 128, (128, 64, 8, 3)),
}
#: Configurations clean inside their loops only for the plain kernel (no causal mask or window, no
#: attn_mask, no dropout, no soft cap, no ALiBi; sm_90 pointer path): the autotuner skips them
#: otherwise.
PLAIN_ONLY = {
    ("dkdv", 128, (128, 64, 8, 2)),  # causal: 7 (Triton 3.6) / 17 (3.9) LDL/STL in the loop; ALiBi: 3 (3.9)
    ("dq", 128, (128, 128, 8, 2)),   # causal: 58 (3.9); any mask or dropout: 17-183; ALiBi: 4 (3.9)
    ("dq", 256, (64, 64, 8, 2)),     # causal: 7 (3.9) since the 64-bit row offsets (ALiBi: 8 before)
}
#: The sm_90 configurations added after the TMA sweep (not compiled with descriptors: kept off the
#: TMA lists)
_NOT_TMA_SWEPT = {("dkdv", 128, (128, 64, 8, 2)), ("dkdv", 128, (128, 32, 8, 2)), ("dkdv", 256, (128, 32, 8, 2)),
                  ("fwd", 256, (128, 64, 8, 2)), ("fwd", 256, (128, 32, 8, 2)), ("fwd", 256, (64, 64, 8, 2)),
                  ("dq", 256, (128, 32, 8, 2)), ("dq", 256, (64, 64, 8, 2)), ("dq", 128, (128, 128, 8, 2))}
#: TMA-streamed configurations (sm_90 and newer; ``STREAM_TMA``): the inner loop's tiles (K and V
#: in forward and dQ, Q and dO in dK/dV) arrive by the tensor-memory accelerator through host-side
#: descriptors instead of per-thread pointer loads, which frees the address registers and lets
#: the copy engine zero-fill the rows past the sequence and the columns past the head dim. The
#: autotuner measures them beside the pointer configurations and keeps the faster.
#: The candidates are the sm_90 pointer lists: the AOT sweep (``--tma``; bf16, head dims 64/128/256,
#: plain / causal / every feature, Triton 3.6 and 3.9) compiled all 34 of them with HGMMA and
#: UTMALDG, no spills in the plain and causal kernels, and 10-40 fewer registers per thread than
#: the pointer kernels (fwd D = 128, 128 x 64: 150 vs 184). Warp specialisation
#: (``tl.range(..., warp_specialize=True)``) compiles to the same SASS on sm_90 under both
#: versions (Triton specialises warps on Blackwell only), so it is not used.
TMA_CONFIGS = {kernel: {bucket: [c for c in configs if (kernel, bucket, c) not in _NOT_TMA_SWEPT]
                         for bucket, configs in per_dim.items()}
               for kernel, per_dim in CONFIGS.items()}
#: HEAVY_SPILLS of the TMA configurations (spills with every feature on, either version). dK/dV at
#: D = 256 keeps (128, 16, 8, 2), its one other TMA config: 1 LDL/STL in the dK pass's loop with
#: every feature on under Triton 3.9 (0 under 3.6; 5 with ALiBi too), accepted.
TMA_HEAVY_SPILLS = {
    ("fwd", 64, (128, 128, 8, 3)),   # 60 (Triton 3.9)
    ("fwd", 128, (128, 128, 8, 2)),  # 12 (3.6) / 338 (3.9)
    ("fwd", 128, (128, 64, 8, 3)),   # 4 (3.6) / 3 (3.9)
    ("fwd", 128, (128, 64, 8, 2)),   # 4 (3.6) / 6 (3.9)
    ("fwd", 128, (64, 64, 4, 3)),    # 2 (3.6)
    ("fwd", 256, (64, 32, 4, 2)),    # 4 (3.6)
    ("fwd", 256, (64, 32, 4, 3)),    # 5 (3.6)
    ("dq", 128, (128, 64, 8, 3)),    # 8 (3.6)
    ("dq", 128, (128, 64, 8, 2)),    # 32 (3.6)
    ("dq", 128, (64, 64, 4, 2)),     # 32 (3.6)
    ("dq", 256, (128, 16, 8, 2)),    # 29 (3.6)
    ("dkdv", 64, (128, 64, 8, 3)),   # 13 (3.6)
    ("dkdv", 128, (128, 16, 8, 3)),  # 4 (3.6)
    ("dkdv", 256, (64, 32, 8, 2)),   # dK pass: 89 (3.9)
}
#: the kernel arguments that take the streamed operands' descriptors (first: head dim D, second: Dv)
STREAM_DESCRIPTORS = {"fwd": ("KDesc", "VDesc"), "dq": ("KDesc", "VDesc"), "dkdv": ("QDesc", "dODesc")}
#: HEAVY_SPILLS of the sm_8x lists, from the sm_80 AOT sweep with every feature on, the mask
#: gradient, dropout and a boolean mask under Triton 3.6 and 3.9 (LDL/STL counts, worst case).
#: dK/dV at D = 256 keeps its one config, (64, 32, 8, 2): 8 reloads in the dK pass's loop over query
#: heads (none in its query loop) with every feature on under 3.9, clean under 3.6.
HEAVY_SPILLS_SM80 = {
    ("dkdv", 64, (128, 32, 8, 3)),   # 12
    ("dkdv", 64, (128, 32, 8, 4)),   # 20
    ("dkdv", 64, (64, 32, 4, 3)),    # 16
    ("dkdv", 128, (64, 32, 8, 2)),   # 15
    ("dq", 128, (64, 64, 4, 2)),     # 35
    ("dq", 128, (128, 32, 8, 3)),    # every feature on: 72 (Triton 3.6) / 37 (3.9)
    ("dq", 64, (64, 64, 4, 3)),      # every feature on: 211 (3.6) / 201 (3.9)
    ("dq", 64, (128, 64, 8, 3)),     # every feature on: 77 (3.6) / 149 (3.9)
    ("dq", 64, (128, 64, 8, 4)),     # every feature on: 77 (3.6) / 149 (3.9)
    ("fwd", 128, (64, 64, 4, 3)),    # every feature on: 38 (3.6)
    ("fwd", 64, (128, 128, 8, 3)),   # packed sequences with dropout and the soft cap: 1 (3.9)
}
#: PLAIN_ONLY of the sm_8x lists
PLAIN_ONLY_SM80 = {
    ("fwd", 128, (128, 64, 8, 2)),   # causal: 5 (Triton 3.9); every feature on: 22 (3.6)
}


def heavy_spills(arch: int, tma: bool = False) -> set:
    """The (kernel, head-dim bucket, config) entries skipped when a mask, its gradient, dropout or the
    soft cap is on."""
    if tma:
        return TMA_HEAVY_SPILLS
    return HEAVY_SPILLS if arch >= 90 else HEAVY_SPILLS_SM80


def plain_only(arch: int, tma: bool = False) -> set:
    """The (kernel, head-dim bucket, config) entries kept only for the plain kernel (skipped when it
    is banded, e.g. causal, or any feature is on)."""
    if tma:
        return set()
    return PLAIN_ONLY if arch >= 90 else PLAIN_ONLY_SM80


#: ALiBi's distance (``HAS_ALIBI``) keeps a slope and the rows' key positions live and adds two
#: operations per score. The AOT sweep compiled every configuration above with it (bf16, head dims
#: 64/128/256, sm_90 pointer and TMA, sm_80; Triton 3.6 and 3.9; feature sets "alibi", "alibi_causal",
#: "alibi_all" and "varlen_alibi"); these are the ones that spill inside their loops with ALiBi and
#: compile clean without it (the same feature set less ALiBi), per table ("sm90": CONFIGS, "tma":
#: TMA_CONFIGS, "sm80": CONFIGS_SM80). ALIBI_SPILLS: with ALiBi alone or causal, skipped whenever
#: ALiBi is on; ALIBI_HEAVY_SPILLS: with every feature on, skipped when ALiBi and a mask, its
#: gradient, dropout or the soft cap are on (as HEAVY_SPILLS), unless nothing else is left. Counts
#: are LDL/STL in the loop. sm_80's dK/dV at D = 256 keeps its one config, (64, 32, 8, 2): 4 (3.6) /
#: 14 (3.9) in the dK pass with every feature and ALiBi on.
ALIBI_SPILLS = {
    "sm90": {
        ("dkdv", 64, (128, 64, 8, 3)),   # ALiBi alone: 7 (Triton 3.9)
        ("dq", 256, (64, 64, 8, 2)),     # causal: 8 (3.9)
    },
    "tma": {
        ("dq", 256, (128, 16, 8, 2)),    # causal: 5 (3.6)
    },
    "sm80": set(),
}
ALIBI_HEAVY_SPILLS = {
    "sm90": {
        ("fwd", 128, (128, 64, 8, 2)),   # 3 (3.9)
        ("fwd", 128, (128, 64, 8, 3)),   # 3 (3.9)
        ("fwd", 256, (64, 64, 8, 2)),    # packed sequences: 3 (3.9)
        ("dq", 256, (64, 32, 8, 2)),     # 1 (3.9)
    },
    "tma": {
        ("fwd", 128, (64, 64, 4, 3)),    # 9 (3.9)
        ("dq", 128, (128, 64, 8, 3)),    # 20 (3.9)
        ("dq", 256, (64, 32, 8, 2)),     # 1 (3.9)
        ("dkdv", 128, (128, 16, 8, 2)),  # 4 (3.6)
    },
    "sm80": set(),
}


def alibi_spills(arch: int, tma: bool = False, heavy: bool = False) -> set:
    """The (kernel, head-dim bucket, config) entries skipped when ALiBi is on: ALIBI_SPILLS, and with
    a mask, its gradient, dropout or the soft cap (``heavy``) ALIBI_HEAVY_SPILLS too."""
    table = "tma" if tma else ("sm90" if arch >= 90 else "sm80")
    return ALIBI_SPILLS[table] | (ALIBI_HEAVY_SPILLS[table] if heavy else set())


#: the single (outer, inner) configuration of each kernel under the interpreter (autotuning there
#: is slow and pointless; large blocks mean fewer interpreted steps). Outer != inner, in both
#: orders, so that the causal-diagonal logic is exercised with unequal blocks.
INTERPRETER_CONFIG = {"fwd": (64, 32), "dq": (32, 64), "dkdv": (64, 32)}


def delta_block_m(head_dim_v: int) -> int:
    """Rows per program of the delta kernel (``_attn_bwd_delta``): 2048 elements of O and of dO,
    16 of each per thread of its 4 warps, about 50 registers whatever the head dim. (A fixed 64
    rows took 160-255 registers at Dv = 128-256 and spilled at 256, AOT for sm_90 under Triton 3.6
    and 3.9.) The interpreter takes 64: fewer programs to interpret."""
    return 64 if _interpreting() else max(8, min(64, 2048 // _pow2(head_dim_v)))


#: usable shared memory per block by compute capability (opt-in maximum, bytes)
SHARED_BYTES = {90: 227 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024}


def _head_bucket(head_dim: int, head_dim_v: int) -> int:
    hd = max(head_dim, head_dim_v)
    return 64 if hd <= 64 else (128 if hd <= 128 else 256)


def _config(kernel: str, outer: int, inner: int, warps: int, stages: int, tma: bool = False):
    outer_name, inner_name = OUTER_INNER[kernel]
    return triton.Config({outer_name: outer, inner_name: inner, "STREAM_TMA": tma}, num_warps=warps,
                         num_stages=stages, pre_hook=_descriptor_blocks_hook(kernel) if tma else None)


def all_configs(kernel: str) -> list:
    """Every configuration the autotuner of ``kernel`` ("fwd", "dq", "dkdv") starts from: the
    pointer-path ones of every table, then the TMA-streamed ones (sm_90 and newer)."""
    seen = sorted({c for table in (CONFIGS, CONFIGS_SM80) for per_dim in table[kernel].values() for c in per_dim})
    tma = sorted({c for per_dim in TMA_CONFIGS[kernel].values() for c in per_dim})
    return [_config(kernel, *c) for c in seen] + [_config(kernel, *c, tma=True) for c in tma]


def shared_bytes(kernel: str, outer: int, inner: int, stages: int, head_dim: int, head_dim_v: int,
                 elem_bytes: int, mask_bytes: int = 0) -> int:
    """Shared memory the compiled kernel uses (covers the AOT-compiled sizes): the pipelined inner
    tiles (K and V, or Q and dO) of every stage, the outer tiles staged for the tensor cores, and
    the pipelined attn_mask tiles (one per stage: Triton 3.6 buffers them in every stage, 3.9 in
    all but one)."""
    outer_tiles = head_dim if kernel == "fwd" else head_dim + head_dim_v
    return (stages * inner * (head_dim + head_dim_v) * elem_bytes + outer * outer_tiles * elem_bytes
            + stages * outer * inner * mask_bytes)


def config_ok(kernel: str, cfg, head_dim: int, head_dim_v: int, elem_bytes: int, arch: int = 90,
              mask_bytes: int = 0, heavy: bool = False, tma: str = "off", banded: bool = False,
              alibi: bool = False) -> bool:
    """Whether the autotuner may try ``cfg`` for this head-dim pair (padded powers of two), element
    size, compute capability (80, 90, ...) and mask element size (0 = no mask); ``heavy`` (a mask,
    its gradient, dropout or the soft cap is on) also skips HEAVY_SPILLS, ``alibi`` (ALiBi is on)
    ALIBI_SPILLS (and with ``heavy`` ALIBI_HEAVY_SPILLS), ``heavy``, ``banded`` (causal or a window)
    or ``alibi`` PLAIN_ONLY (``plain_only``).
    ``tma``: "off" (the launch passes no descriptors: pointer configs only), "auto" (both kinds,
    on sm_90 and newer) or "only" (TMA configs only)."""
    outer_name, inner_name = OUTER_INNER[kernel]
    key = (cfg.kwargs[outer_name], cfg.kwargs[inner_name], cfg.num_warps, cfg.num_stages)
    streamed = bool(cfg.kwargs.get("STREAM_TMA", False))
    if streamed:
        table = TMA_CONFIGS
        if arch < 90 or tma == "off":
            return False
    else:
        table = CONFIGS if arch >= 90 else CONFIGS_SM80
        if tma == "only" and arch >= 90:
            return False
    bucket = _head_bucket(head_dim, head_dim_v)
    if key not in table[kernel][bucket]:
        return False
    if heavy and (kernel, bucket, key) in heavy_spills(arch, streamed):
        return False
    if alibi and (kernel, bucket, key) in alibi_spills(arch, streamed, heavy):
        return False
    if (heavy or banded or alibi) and (kernel, bucket, key) in plain_only(arch, streamed):
        return False
    limit = SHARED_BYTES.get(arch, SHARED_BYTES[80] if arch < 90 else SHARED_BYTES[90]) - 1024
    return shared_bytes(kernel, key[0], key[1], key[3], head_dim, head_dim_v, elem_bytes, mask_bytes) <= limit


def _descriptor_blocks_hook(kernel: str):
    """The configuration pre-hook that sizes the descriptors' blocks to its tiles: one (1, 1,
    inner rows, padded head dim) box per load."""
    first, second = STREAM_DESCRIPTORS[kernel]
    inner_name = OUTER_INNER[kernel][1]

    def hook(nargs):
        for name, cols in ((first, nargs["HEAD_DIM"]), (second, nargs["HEAD_DIM_V"])):
            if isinstance(nargs[name], _DESCRIPTOR_TYPES):
                nargs[name].block_shape = [1, 1, nargs[inner_name], cols]
    return hook


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def _len_key(n: int) -> int:
    """Sequence lengths round up to powers of two for the autotuning key."""
    return next_pow2(n)


def _make_prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        args = dict(named_args, **kwargs)
        elem = args["Q"].element_size()
        major, minor = torch.cuda.get_device_capability(args["Q"].device)
        mask_bytes = args["Mask"].element_size() if args["MASK_KIND"] else 0
        arch = major * 10 + minor
        heavy = bool(args["MASK_KIND"] or args["DROPOUT"] or args.get("MASK_GRAD", False)
                     or args.get("SOFTCAP", False))
        tma = ("off", "auto", "only")[args.get("TMA_KEY", 0)]
        keep = [c for c in configs if config_ok(kernel, c, args["HEAD_DIM"], args["HEAD_DIM_V"], elem, arch,
                                                mask_bytes, heavy, tma, bool(args.get("BANDED", False)),
                                                bool(args.get("HAS_ALIBI", False)))]
        if not keep:
            keep = [c for c in configs if config_ok(kernel, c, args["HEAD_DIM"], args["HEAD_DIM_V"], elem, arch,
                                                    mask_bytes, False, tma)]
        if not keep:  # e.g. float32 at D = 256 on a small-shared-memory chip: the smallest tiles
            outer_name, inner_name = OUTER_INNER[kernel]
            keep = [min(configs, key=lambda c: (c.kwargs[outer_name] * c.kwargs[inner_name] * c.num_stages))]
        outer_name = OUTER_INNER[kernel][0]
        outer_len = args["LK_KEY"] if kernel == "dkdv" else args["LQ_KEY"]
        small = [c for c in keep if c.kwargs[outer_name] <= max(outer_len, 64)]  # short sequences: 64-row blocks
        return pick(small or keep)
    return prune


_AUTOTUNE_KEYS = ["LQ_KEY", "LK_KEY", "TMA_KEY", "D", "DV", "BANDED", "VARLEN", "MASK_KIND", "DROPOUT", "SOFTCAP",
                  "HAS_ALIBI"]
_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv}
_tuned = {}


def _launch(kernel: str, grid_rows: int, heads: int, args: tuple, constexprs: dict):
    """Launch ``kernel`` over ``heads`` x blocks of ``grid_rows`` outer rows: autotuned on a GPU,
    with INTERPRETER_CONFIG under the interpreter."""
    outer_name, inner_name = OUTER_INNER[kernel]
    if _interpreting():
        outer, inner = INTERPRETER_CONFIG[kernel]
        named = dict(zip(_KERNELS[kernel].arg_names, args), **constexprs, **{outer_name: outer, inner_name: inner})
        named["STREAM_TMA"] = bool(named["TMA_KEY"])  # descriptors were passed
        _descriptor_blocks_hook(kernel)(named)
        _KERNELS[kernel][(cdiv(grid_rows, outer) * heads,)](*args, **constexprs, STREAM_TMA=named["STREAM_TMA"],
                                                                   **{outer_name: outer, inner_name: inner},
                                                                   **LAUNCH_OPTIONS)
        return
    fn = _tuned.get(kernel)
    if fn is None:
        keys = _AUTOTUNE_KEYS + {"dkdv": ["MASK_GRAD", "DKDV_PASS"], "fwd": ["SPLIT_KV", "PAGED"]}.get(kernel, [])
        fn = _tuned[kernel] = triton.autotune(all_configs(kernel), key=keys,
                                              prune_configs_by={"early_config_prune": _make_prune(kernel)})(
            _KERNELS[kernel])
    fn[lambda meta: (cdiv(grid_rows, meta[outer_name]) * heads,)](*args, **constexprs, **LAUNCH_OPTIONS)


# ---------------------------------------------------------------------------------------------
# launchers (the contract of fused_attn.backends.base)
# ---------------------------------------------------------------------------------------------

def unsupported_reasons(call: Call) -> list[str]:
    reasons = []
    for name in ("head_dim", "head_dim_v"):
        value = call.options.get(name)
        if value is not None and value > MAX_HEAD_DIM:
            reasons.append(f"{name} {value} > {MAX_HEAD_DIM} (the Triton kernels keep a head in registers)")
    return reasons


def _i32(x: int) -> int:
    """A value in [0, 2**32) as the int32 with the same bits (so Triton always types it i32)."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _dropout_scalars(dropout_p: float, seed: int, offset: int):
    """(keep_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi, threshold), the last five as int32 bits."""
    if dropout_p == 0.0:
        return 1.0, 0, 0, 0, 0, 0
    seed_lo, seed_hi_mix, threshold = dropout_args(dropout_p, seed)
    offset &= (1 << 64) - 1
    return (1.0 / (1.0 - dropout_p), _i32(seed_lo), _i32(seed_hi_mix), _i32(offset), _i32(offset >> 32),
            _i32(threshold))


#: MASK_KIND of an additive (float) attn_mask
MASK_ADDITIVE = 2
#: LOOP_STAGES (the inner loops' software-pipelining depth; None = the configuration's num_stages)
#: is 1 -- no pipelining -- for float32 inputs with an additive mask. On the H200 (Triton 3.6)
#: that case alone gave wrong results (lse finite or NaN on a row the mask sets to -inf, outputs
#: off by O(1) or NaN), while the interpreter, bool masks and 16-bit masks were right. It is the
#: one case where the pipeliner turns the mask load into cp.async copies (the float32 dot is
#: FMA-based, ``input_precision="ieee"``, and a mask element is 4 bytes, the smallest cp.async;
#: 16-bit and bool masks stay plain loads). The probe in docs/results/gpu-2026-11-29 launched the
#: forward directly: num_stages=3 gave NaN at three shapes, num_stages=1 or LOOP_STAGES=1 the
#: right answer (max error 2e-7 to 8e-7). Plain loads cost little: float32 is not the fast path.


def _mask_args(attn_mask, dummy):
    """(pointer tensor, strides, MASK_KIND) of the (B, Hq, Lq, Lk) mask view."""
    if attn_mask is None:
        return dummy, (0, 0, 0, 0), 0
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8), attn_mask.stride(), 1
    return attn_mask, attn_mask.stride(), MASK_ADDITIVE


def _band_args(band_lo, band_hi, Lq, Lk):
    """(band_lo, band_hi, BANDED): the band clamped to [-Lq, Lk] and whether it hides any key from any
    query (some row i has i + band_lo > 0 or i + band_hi < Lk - 1); unbanded kernels skip the tests."""
    lo, hi = clamp_band(band_lo, band_hi, Lq, Lk)  # lo <= hi, as _scores' one-compare test needs
    return lo, hi, (Lq - 1) + lo > 0 or hi < Lk - 1


class Varlen:
    """The packed-sequence facts a varlen launch adds (``attention_varlen_fwd``): cumulative lengths,
    the longest sequences (they size the grid) and the alignment of the band."""

    def __init__(self, cu_q, cu_k, max_q, max_k, bottom_right, seqused_k=None, block_table=None):
        # the kernels index the boundaries as dense arrays (a strided view would be read wrong)
        self.cu_q, self.cu_k = cu_q.contiguous(), cu_k.contiguous()
        # where each sequence's keys end: the next one's start, or its start + seqused_k
        self.k_end = self.cu_k[1:] if seqused_k is None else self.cu_k[:-1] + seqused_k.to(self.cu_k.dtype)
        self.max_q, self.max_k, self.bottom_right = max_q, max_k, bottom_right
        # a paged KV cache: (B, pages per sequence) int32 page numbers; K and V are then pages. The
        # kernels step along a row by 1 (page_row + j // PAGE_SIZE) and take only the row stride, so
        # a table whose columns are not adjacent (a transposed or column-strided view) is copied
        # (B x pages int32, tiny); any row stride (a row slice of a wider table, one row expanded over
        # the sequences) is read in place, as is a one-column table (cache_batch_idx's).
        if block_table is not None and block_table.shape[1] > 1 and block_table.stride(1) != 1:
            block_table = block_table.contiguous()
        self.block_table = block_table

    def kv_args(self, k, v):
        """The K and V arguments of the forward, (tensor, 4 strides) each, and the paged cache's
        (BlockTable, stride_tb, stride_kpage, stride_vpage, PAGED, PAGE_SIZE). Packed K / V come as
        (1, Hkv, total, dim) views (``as_batch``); pages as (num_pages, page_size, Hkv, dim)."""
        if self.block_table is None:
            return (k, *_strides(k, self)), (v, *_strides(v, self)), (self.cu_k, 0, 0, 0, False, 1)
        # a page's rows stand for the sequence's keys (stride_kn); the page stride picks the page
        kv = tuple((t, 0, t.stride(2), t.stride(1), t.stride(3)) for t in (k, v))
        return (*kv, (self.block_table, self.block_table.stride(0), k.stride(0), v.stride(0), True, k.shape[1]))

    @staticmethod
    def as_batch(t):
        """A packed (total, H, dim) tensor as the (1, H, total, dim) view the kernels index."""
        return t.transpose(0, 1).unsqueeze(0)

    def band(self, band_lo, band_hi):
        """(band_lo, band_hi, BANDED) of a varlen launch: the band stays relative to each sequence
        (the kernels shift and clamp it per sequence, ``_sequence_band``); here it is only clamped
        to +-(max_q + max_k), which changes no sequence's visible keys and fits 32 bits."""
        if (band_lo, band_hi) == NO_BAND:
            return 0, 0, False  # unused: the kernels skip the band when not BANDED
        reach = self.max_q + self.max_k
        return min(max(band_lo, -reach), reach), min(max(band_hi, -reach), reach), True


def _alibi_args(alibi_slopes, dummy):
    """(pointer tensor, stride_ab, stride_ah) of the (B, Hq) slopes (any strides: a stride-0
    expand of (Hq,) is read as it is), or of a placeholder when there are none."""
    if alibi_slopes is None:
        return dummy, 0, 0
    return (alibi_slopes, *alibi_slopes.stride())


def _no_varlen(dummy, alibi_slopes=None, bottom_right=False):
    """The varlen arguments of a plain launch: (CuQ, CuK, KEnd, TQ, VARLEN, BOTTOM_RIGHT). The band
    comes aligned already, so BOTTOM_RIGHT serves only ALiBi's distance; without ALiBi it stays
    False, so that top-left and bottom-right calls share one compiled kernel."""
    return dummy, dummy, dummy, 0, False, bool(bottom_right) and alibi_slopes is not None


def _strides(t, varlen):
    """t's 4-D strides as the kernels take them; a varlen view's batch stride is 0 (one sequence
    per program, found through CuQ / CuK)."""
    st = t.stride()
    return (0,) + tuple(st[1:]) if varlen is not None else tuple(st)


#: The most rows of one tensor that a kernel's tile spans: the largest block of any configuration
#: (the delta and combine kernels take at most 64 rows).
TILE_ROWS = max(n for table in (CONFIGS, CONFIGS_SM80) for per_dim in table.values() for configs in per_dim.values()
                for config in configs for n in config[:2])
_INT32_MAX = 2**31 - 1


def _int32_tiles(t, rows_dim=2, cols_dim=3):
    """``t``, or a contiguous copy of it if the int32 offsets within one tile of it could pass 2**31.

    The kernels address a tile as a 64-bit scalar base (batch, head, and the tile's first row times
    the row stride: past 2**31 at long sequences) plus int32 offsets within the tile, row * row
    stride + column * column stride, for at most TILE_ROWS rows (along ``rows_dim``) and every
    column (along ``cols_dim``; None for a tensor of rows only, e.g. dlse), and the inner loops
    step their bases by a block of rows in int32: 64-bit offset tiles would cost a second register
    per element. These pass 2**31 only for a row stride of 2**24 elements or more (or a column
    stride above ~2**23), e.g. a view whose rows lie gigabytes apart; such a tensor is read from a
    compact copy instead (the copy's strides are the head dims')."""
    if t.numel() == 0:
        return t
    span = (TILE_ROWS * t.stride(rows_dim)) if t.shape[rows_dim] > 1 else 0
    if cols_dim is not None:
        span += (t.shape[cols_dim] - 1) * t.stride(cols_dim)
    return t if span <= _INT32_MAX else t.contiguous()


def _scales(scale, softcap):
    """(qk_scale, softcap_log2) of the kernels: the logits in base-2 units are x = qk * qk_scale, or
    with a soft cap softcap_log2 * tanh(x / softcap_log2) (see _scores, _softcap_logit).

    The kernels take both as float32, where scale * log2(e) and softcap * log2(e) stay finite:
    |scale| and softcap are at most float32's max / log2(e) (functional.MAX_SCALE). (They took
    scale / softcap as one factor of qk, which left float32's range at the ends: 1e-48 at a scale of
    1e-10 and a cap of 1e38, 0 in float32, every logit 0; 1e40 at 1e10 and 1e-30, clamped to float32's
    max, so tanh's derivative 1 - t^2 came from arguments 30 times too small.)"""
    return scale * LOG2E, (softcap * LOG2E if softcap > 0.0 else 0.0)


def _common_constexprs(q, v, banded, mask_kind, dropout_p, softcap, alibi_slopes):
    D, Dv = q.shape[3], v.shape[3]
    float32 = q.dtype == torch.float32
    return dict(D=D, DV=Dv, HEAD_DIM=_pow2(D), HEAD_DIM_V=_pow2(Dv), BANDED=bool(banded), MASK_KIND=mask_kind,
                DROPOUT=dropout_p > 0.0, SOFTCAP=softcap > 0.0, HAS_ALIBI=alibi_slopes is not None,
                DOT_PRECISION="ieee" if float32 else "tf32",
                LOOP_STAGES=1 if float32 and mask_kind == MASK_ADDITIVE else None)



def fwd_launch_args(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, out, lse, tma=None,
                    softcap=0.0, varlen=None, alibi_slopes=None, bottom_right=False, split=None):
    """(grid_rows, heads, args, constexprs) of ``_attn_fwd`` for these inputs (also used by the AOT
    tests). K and V go in twice: as pointers and, when TMA is used, as descriptors. ``varlen``
    (a ``Varlen``): q, k, v, out are the (1, H, total, dim) views of packed tensors (which carries
    its own alignment; ``bottom_right`` is the plain launch's, used by ALiBi only). ``split`` (a
    ``KvSplit``): out and lse are split 0's views of its float32 scratch."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q)
    keep_scale, *drop = _dropout_scalars(dropout_p, seed, offset)
    if varlen is None:
        k_desc, v_desc, tma_key = descriptors(k, v, tma=tma)
        band_lo, band_hi, banded = _band_args(band_lo, band_hi, Lq, Lk)
        cu_q, cu_k, k_end, total_q, varlen_on, bottom_right = _no_varlen(lse, alibi_slopes, bottom_right)
    else:  # pointer loads only: the descriptors' boxes would cross sequence boundaries
        k_desc, v_desc, tma_key = None, None, 0
        band_lo, band_hi, banded = varlen.band(band_lo, band_hi)
        B, total_q, Lq, Lk = varlen.cu_q.shape[0] - 1, Lq, varlen.max_q, varlen.max_k
        cu_q, cu_k, k_end, varlen_on, bottom_right = varlen.cu_q, varlen.cu_k, varlen.k_end, True, \
            varlen.bottom_right
        if varlen.block_table is not None:
            Hkv = k.shape[2]  # pages: (num_pages, page_size, Hkv, dim)
    if varlen is None:
        k_args, v_args, (*paged, paged_on, page_size) = (k, *k.stride()), (v, *v.stride()), (lse, 0, 0, 0, False, 1)
    else:
        k_args, v_args, (*paged, paged_on, page_size) = varlen.kv_args(k, v)
    args = (q, k, v, k_desc, v_desc, mask, out, lse, cu_q, cu_k, k_end, *_strides(q, varlen), *k_args[1:],
            *v_args[1:], *mask_strides, *_strides(out, varlen), Hq, Hq // Hkv, Lq, Lk, total_q, band_lo,
            band_hi, *_scales(scale, softcap), keep_scale, *drop, _len_key(Lq), _len_key(Lk), tma_key,
            *_alibi_args(alibi_slopes, lse), *(split or KvSplit.NONE).args(), *paged)
    splits = 1 if split is None else split.num
    return Lq, B * Hq * splits, args, dict(_common_constexprs(q, v, banded, mask_kind, dropout_p, softcap,
                                                              alibi_slopes),
                                           SCALE_NONNEG=scale >= 0, VARLEN=varlen_on, BOTTOM_RIGHT=bottom_right,
                                           SPLIT_KV=split is not None, PAGED=paged_on, PAGE_SIZE=page_size)


#: _attn_bwd_dkdv's DKDV_PASS values: both gradients in one pass, or dK (+ dMask) and dV apart
DKDV_BOTH, DKDV_DK, DKDV_DV = 0, 1, 2
#: padded head dims (the larger of D, Dv) above this run dK and dV as two passes
DKDV_SPLIT_ABOVE = 128


def dkdv_passes(head_dim: int, head_dim_v: int) -> tuple:
    """The DKDV_PASS values to launch, in order, for these padded head dims."""
    return (DKDV_DK, DKDV_DV) if max(head_dim, head_dim_v) > DKDV_SPLIT_ABOVE else (DKDV_BOTH,)


def bwd_launch_args(dout, q, k, v, lse, delta, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset,
                    mask_grad, dq, dk, dv, dmask, tma=None, softcap=0.0, varlen=None, alibi_slopes=None,
                    bottom_right=False):
    """{"dkdv": (...), "dq": (...)}: (grid_rows, heads, args, constexprs) of the two gradient kernels.
    The dkdv constexprs name its first pass; ``dkdv_passes`` lists all of them. ``varlen`` as in
    ``fwd_launch_args`` (dout, q, k, v as (1, H, total, dim) views; dq, dk, dv packed), as are
    ``alibi_slopes`` and ``bottom_right``."""
    B, Hq, Lq, _ = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    mask, mask_strides, mask_kind = _mask_args(attn_mask, q)
    keep_scale, *drop = _dropout_scalars(dropout_p, seed, offset)
    if varlen is None:
        band_lo, band_hi, banded = _band_args(band_lo, band_hi, Lq, Lk)
        q_desc, do_desc, dkdv_tma = descriptors(q, dout, tma=tma)
        k_desc, v_desc, dq_tma = descriptors(k, v, tma=tma)
        cu_q, cu_k, k_end, total_q, varlen_on, bottom_right = _no_varlen(lse, alibi_slopes, bottom_right)
    else:
        band_lo, band_hi, banded = varlen.band(band_lo, band_hi)
        q_desc = do_desc = k_desc = v_desc = None
        dkdv_tma = dq_tma = 0
        B, total_q, Lq, Lk = varlen.cu_q.shape[0] - 1, Lq, varlen.max_q, varlen.max_k
        cu_q, cu_k, k_end, varlen_on, bottom_right = varlen.cu_q, varlen.cu_k, varlen.k_end, True, \
            varlen.bottom_right
    common = dict(_common_constexprs(q, v, banded, mask_kind, dropout_p, softcap, alibi_slopes), VARLEN=varlen_on,
                  BOTTOM_RIGHT=bottom_right)
    strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *mask_strides,
               *_strides(dout, varlen))
    tail = (Lq, Lk, total_q, band_lo, band_hi, *_scales(scale, softcap), scale, keep_scale, *drop, _len_key(Lq),
            _len_key(Lk))
    alibi = _alibi_args(alibi_slopes, lse)
    dkdv = (q, k, v, q_desc, do_desc, mask, dout, lse, delta, dk, dv, dmask if mask_grad else dq, cu_q, cu_k,
            k_end, *strides, Hq, Hkv, Hq // Hkv, *tail, dkdv_tma, *alibi)
    dq_args = (q, k, v, k_desc, v_desc, mask, dout, lse, delta, dq, cu_q, cu_k, k_end, *strides, Hq, Hq // Hkv,
               *tail, dq_tma, *alibi)
    first_pass = dkdv_passes(common["HEAD_DIM"], common["HEAD_DIM_V"])[0]
    return {"dkdv": (Lk, B * Hkv, dkdv, dict(common, MASK_GRAD=bool(mask_grad), DKDV_PASS=first_pass)),
            "dq": (Lq, B * Hq, dq_args, common)}


# ---- split-KV (flash-decoding) -------------------------------------------------------------
# A forward with few query blocks (decoding: Lq = 1 to a few, small batch) has one program per
# (batch, head, query block): B * Hq programs, e.g. 32 for one sequence of a 32-head model, leave
# most of an H200's 132 SMs idle while each program streams the whole KV cache. Splitting the keys
# among several programs per query block (each writes its partial output and lse) and merging the
# partials in a second small kernel (``_attn_fwd_combine``) fills the machine. The backward is
# unchanged: the merged output and lse are the unsplit ones, up to rounding.

#: Keys per split are a multiple of this: every forward BLOCK_N divides it.
SPLIT_KEYS_QUANTUM = 128
#: At most this many splits (FlashAttention 2 caps them at 128; the partials grow with the count).
MAX_KV_SPLITS = 64


def _kv_splits_setting():
    """FUSED_ATTN_TRITON_KV_SPLITS: "auto" (default: ``kv_splits`` decides) or a positive count
    forced on every forward (capped by the keys' 128-key chunks), 1 to turn splitting off."""
    value = os.environ.get("FUSED_ATTN_TRITON_KV_SPLITS", "auto").strip().lower()
    if value == "auto":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FUSED_ATTN_TRITON_KV_SPLITS must be 'auto' or a positive integer, got {value!r}")
    return int(value)


#: The forced split count (None: automatic). Read once at import; tests set it directly.
KV_SPLITS = _kv_splits_setting()


def kv_splits(programs: int, chunks: int, sm_count: int) -> int:
    """How many splits a forward of ``programs`` programs over ``chunks`` 128-key chunks gets on a
    chip of ``sm_count`` SMs (FlashAttention 2's ``num_splits_heuristic``): none when the programs
    already fill most of the chip; otherwise the fewest splits whose grid fills its last wave of
    SMs to within 85 % of the best filling any split count achieves. Only counts that change the
    chunks per split are considered (7 splits of 11 chunks each run 2 chunks, as 6 would)."""
    if programs >= 0.8 * sm_count or chunks < 2:
        return 1
    candidates = sorted({cdiv(chunks, cdiv(chunks, n)) for n in range(1, min(MAX_KV_SPLITS, sm_count, chunks) + 1)})

    def filling(n):
        waves = programs * n / sm_count
        return waves / math.ceil(waves)

    best = max(filling(n) for n in candidates)
    return next(n for n in candidates if filling(n) >= 0.85 * best)


_sm_counts = {}


def _sm_count(device: torch.device):
    """The device's SM count, or None where there is none to fill (CPU tensors: the interpreter)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = _sm_counts.get(index)
    if count is None:
        count = _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return count


class KvSplit:
    """The split-KV plan of one forward: ``num`` splits of ``keys`` keys from key ``base`` (both
    multiples of SPLIT_KEYS_QUANTUM), and the strides between the splits' partial results."""

    def __init__(self, num, base, keys, stride_out=0, stride_lse=0):
        self.num, self.base, self.keys, self.stride_out, self.stride_lse = num, base, keys, stride_out, stride_lse

    def args(self):
        """``_attn_fwd``'s (num_splits, split_base, split_keys, stride_split_o, stride_split_lse)."""
        return self.num, self.base, self.keys, self.stride_out, self.stride_lse

    @staticmethod
    def plan(programs: int, key_lo: int, key_hi: int, device: torch.device):
        """The split of the keys [key_lo, key_hi) that some query of the call sees, for a launch of
        ``programs`` programs, or None for an unsplit launch."""
        base = (max(key_lo, 0) // SPLIT_KEYS_QUANTUM) * SPLIT_KEYS_QUANTUM
        chunks = cdiv(max(key_hi - base, 0), SPLIT_KEYS_QUANTUM)
        if KV_SPLITS is not None:
            num = min(KV_SPLITS, chunks)
        else:
            sm_count = _sm_count(device)
            num = 1 if sm_count is None else kv_splits(programs, chunks, sm_count)
        if num <= 1:
            return None
        keys = cdiv(chunks, num) * SPLIT_KEYS_QUANTUM
        return KvSplit(cdiv(key_hi - base, keys), base, keys)


KvSplit.NONE = KvSplit(1, 0, 0)


def _programs(heads: int, rows: int) -> int:
    """About how many programs a forward of ``heads`` (batch x heads) by ``rows`` query rows
    launches: the autotuner gives short query blocks 64 rows, longer ones 64 or 128."""
    return heads * cdiv(rows, 64 if rows <= 64 else 128)


def _launch_forward(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, out, lse, split,
                    varlen=None, **options):
    """The forward launch, split or not. ``out`` is the (B, H, L, Dv) view of the output (the
    (1, H, total, Dv) one with ``varlen``), ``lse`` its lse."""
    if split is not None and split.num * lse.numel() * out.shape[3] > _INT32_MAX:
        # _attn_fwd_combine reaches split s's partials at the int32 offset s * (rows * Dv): past
        # 2**31 float32 elements (8 GiB of scratch; only a forced FUSED_ATTN_TRITON_KV_SPLITS on a
        # long prefill gets there, never kv_splits' choice) the forward runs unsplit
        split = None
    if split is None:
        _launch("fwd", *fwd_launch_args(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, out,
                                        lse, varlen=varlen, **options))
        return
    # the partials of row r (lse's layout: the (B, H, L) or (H, total) order) at [split, r]
    out_part = torch.empty((split.num, *lse.shape, out.shape[3]), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((split.num, *lse.shape), device=q.device, dtype=torch.float32)
    split.stride_out, split.stride_lse = out_part.stride(0), lse_part.stride(0)
    out_view = out_part[0] if varlen is None else out_part[0].unsqueeze(0)
    _launch("fwd", *fwd_launch_args(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, out_view,
                                    lse_part[0], varlen=varlen, split=split, **options))
    rows = lse.numel()
    block_m = delta_block_m(out.shape[3])
    _attn_fwd_combine[(cdiv(rows, block_m),)](
        out_part, lse_part, out, lse, split.num, split.stride_out, split.stride_lse, rows, out.shape[1], out.shape[2],
        *out.stride(), DV=out.shape[3], HEAD_DIM_V=_pow2(out.shape[3]), BLOCK_M=block_m, num_warps=COMBINE_WARPS,
        **LAUNCH_OPTIONS)


#: warps of ``_attn_fwd_combine``: its delta_block_m(Dv) x Dv tile is 8 elements a thread on 8 warps
#: (40-52 registers AOT for sm_90; 64-96 on 4 warps)
COMBINE_WARPS = 8


def _pack_query_groups(t, group):
    """A (B, Hq, 1, X) view as the (B, Hkv, group, X) view of the same elements: query head
    hk * group + g becomes row g of kv head hk."""
    sb, sh, _, sx = t.stride()
    return t.as_strided((t.shape[0], t.shape[1] // group, group, t.shape[3]), (sb, sh * group, sh, sx),
                        t.storage_offset())


def _dense_ok(q, k, v, attn_mask, dropout_p, scale, softcap, alibi_slopes) -> bool:
    """Whether a dense call's inputs pass every check of ``_check_dense``, in one expression: the
    common case's host time (~1 us, where the checks one by one took several). False only says
    that ``_check_dense`` must look (it finds and names what is wrong)."""
    qs, ks, vs, dtype, device = q.shape, k.shape, v.shape, q.dtype, q.get_device()
    return (len(qs) == 4 and len(ks) == 4 and len(vs) == 4 and dtype in _checks.FLOAT_SET and k.dtype is dtype
            and v.dtype is dtype and k.get_device() == device and v.get_device() == device
            and ks[0] == qs[0] and vs[0] == qs[0] and ks[1] == vs[1] and ks[2] == vs[2] and ks[3] == qs[3]
            and ks[1] > 0 and qs[1] % ks[1] == 0 and qs[3] <= MAX_HEAD_DIM and vs[3] <= MAX_HEAD_DIM
            and 0.0 <= dropout_p < 1.0 and -math.inf < scale < math.inf and 0.0 <= softcap < math.inf
            and (attn_mask is None or (attn_mask.dtype is torch.bool or attn_mask.dtype is dtype)
                 and attn_mask.shape == (qs[0], qs[1], qs[2], ks[2]) and attn_mask.get_device() == device)
            and (alibi_slopes is None or alibi_slopes.dtype is torch.float32
                 and alibi_slopes.shape == (qs[0], qs[1]) and alibi_slopes.get_device() == device))


def _check_dense(what, q, k, v, attn_mask, dropout_p, scale, softcap, alibi_slopes):
    """The checks of a dense call's inputs (``_checks``: the cpu backend's check_inputs)."""
    if _dense_ok(q, k, v, attn_mask, dropout_p, scale, softcap, alibi_slopes):
        return
    _checks.qkv_tensors(what, q, k, v, 4, "(B, H, L, D)")
    B, Hq, Lq, _ = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"{what}: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{what}: k and v must agree in heads and length, got k {tuple(k.shape)}, v "
                         f"{tuple(v.shape)}")
    _checks.attention_heads(what, q, k, v, Hq, k.shape[1], MAX_HEAD_DIM)
    _checks.options(what, dropout_p, scale, softcap)
    if attn_mask is not None:
        _checks.same_device(what, "q", q, {"attn_mask": attn_mask})
        if attn_mask.dtype != torch.bool and attn_mask.dtype != q.dtype:
            raise TypeError(f"{what}: attn_mask must be bool or q's dtype {_checks.name_of(q.dtype)}, got "
                            f"{_checks.name_of(attn_mask.dtype)}")
        if attn_mask.shape != (B, Hq, Lq, k.shape[2]):
            raise ValueError(f"{what}: attn_mask must be a (B, Hq, Lq, Lk) = {(B, Hq, Lq, k.shape[2])} view (expand "
                             f"broadcast dims), got shape {tuple(attn_mask.shape)}")
    _checks.alibi(what, alibi_slopes, (B, Hq), "(B, Hq)", q)


def _check_gradient_inputs(what, q, v, dout, out, lse, dlse, shape, shape_name, lse_shape, lse_name):
    """The backward's own inputs: dout and out of ``shape`` in q's dtype, lse (and dlse) float32
    of ``lse_shape``, all on q's device."""
    dtype, device = q.dtype, q.get_device()
    if (dout.dtype is dtype and out.dtype is dtype and lse.dtype is torch.float32 and dout.shape == shape
            and out.shape == shape and lse.shape == lse_shape and dout.get_device() == device
            and out.get_device() == device and lse.get_device() == device
            and (dlse is None or dlse.dtype is torch.float32 and dlse.shape == lse_shape
                 and dlse.get_device() == device)):
        return  # (the common case in one expression; else the checks below name what is wrong)
    _checks.same_device(what, "q", q, {"dout": dout, "out": out, "lse": lse, "dlse": dlse})
    for name, t in (("dout", dout), ("out", out)):
        _checks.rows_like(what, name, t, shape, shape_name, q.dtype, "q's ")
    _checks.float32_rows(what, "lse", lse, lse_shape, lse_name)
    _checks.dlse(what, dlse, lse_shape)


def attention_fwd(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, softcap=0.0,
                  alibi_slopes=None, bottom_right=False):
    _check_dense("attention (triton)", q, k, v, attn_mask, dropout_p, scale, softcap, alibi_slopes)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    out = new_attention_out(q, v.shape[3])
    lse = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    if B * Hq * Lq == 0:
        return out, lse
    if Lk == 0:  # no key at all: every row is "fully masked"
        out.zero_()
        lse.fill_(float("inf"))
        return out, lse
    lo, hi = clamp_band(band_lo, band_hi, Lq, Lk)
    q_view, out_view, lse_view, mask_view = q, out, lse, attn_mask
    group = Hq // Hkv
    if Lq == 1 and group > 1 and alibi_slopes is None and lo <= 0 and hi >= Lk - 1:
        # Decoding with grouped-query attention: the query heads of a group become the rows of one
        # (B, Hkv, group) query block, so that a program reads its K and V once for all of them
        # (FlashAttention's "pack GQA"). Valid only where every row sees every key (no band: a
        # row's band would move with its row index) and without ALiBi (a slope per query head).
        # The dropout row of (b, hk, g) is (b * Hkv + hk) * group + g = b * Hq + h, as unpacked.
        q_view, out_view, lse_view = (_pack_query_groups(q, group), _pack_query_groups(out, group),
                                      lse.view(B, Hkv, group))
        if attn_mask is not None:
            mask_view = _pack_query_groups(attn_mask, group)
        band_lo, band_hi = NO_BAND
        lo, hi = 0, Lk - 1
    q_view, k, v = _int32_tiles(q_view), _int32_tiles(k), _int32_tiles(v)  # (out_view is ours: compact)
    rows = q_view.shape[2]
    split = KvSplit.plan(_programs(B * q_view.shape[1], rows), lo, min(Lk, rows - 1 + hi + 1), q.device)
    _launch_forward(q_view, k, v, mask_view, band_lo, band_hi, dropout_p, scale, seed, offset, out_view, lse_view,
                    split, softcap=softcap, alibi_slopes=alibi_slopes, bottom_right=bottom_right)
    return out, lse


def _launch_delta(out, dout, delta, dlse):
    """delta = rowsum(dO * O) - dlse over (batch, heads, rows, Dv) views; dlse None = zeros."""
    batch, heads, rows, dv = out.shape
    dlse_strides = (0, 0, 0) if dlse is None else dlse.stride()
    block_m = delta_block_m(dv)
    _attn_bwd_delta[(cdiv(rows, block_m) * batch * heads,)](
        out, dout, delta, delta if dlse is None else dlse, *out.stride(), *dout.stride(), *dlse_strides, heads, rows,
        DV=dv, HEAD_DIM_V=_pow2(dv), BLOCK_M=block_m, HAS_DLSE=dlse is not None,
        **LAUNCH_OPTIONS)


def attention_bwd(dout, q, k, v, out, lse, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, mask_grad,
                  softcap=0.0, alibi_slopes=None, bottom_right=False, dlse=None):
    what = "attention_bwd (triton)"
    _check_dense(what, q, k, v, attn_mask, dropout_p, scale, softcap, alibi_slopes)
    B, Hq, Lq, D = q.shape
    _check_gradient_inputs(what, q, v, dout, out, lse, dlse, (B, Hq, Lq, v.shape[3]), "(B, Hq, Lq, Dv)",
                           (B, Hq, Lq), "(B, Hq, Lq)")
    if mask_grad and (attn_mask is None or attn_mask.dtype == torch.bool):
        raise ValueError(f"{what}: mask_grad needs an additive (floating) attn_mask")
    Lk = k.shape[2]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dmask = empty(q)
    if mask_grad:
        # With a band the dK/dV loop skips the query blocks outside it: start from zeros.
        banded = _band_args(band_lo, band_hi, Lq, Lk)[2]
        dmask = (torch.zeros if banded else torch.empty)((B, Hq, Lq, Lk), device=q.device, dtype=attn_mask.dtype)
    if B * Hq * Lq == 0 or Lk == 0:  # nothing flows: all gradients are zero
        for t in (dq, dk, dv, dmask):
            t.zero_()
        return dq, dk, dv, dmask
    dout, q, k, v, out = (_int32_tiles(t) for t in (dout, q, k, v, out))
    if dlse is not None:
        dlse = _int32_tiles(dlse, cols_dim=None)
    delta = torch.empty((B, Hq, Lq), device=q.device, dtype=torch.float32)
    _launch_delta(out, dout, delta, dlse)
    launches = bwd_launch_args(dout, q, k, v, lse, delta, attn_mask, band_lo, band_hi, dropout_p, scale, seed,
                               offset, mask_grad, dq, dk, dv, dmask, softcap=softcap, alibi_slopes=alibi_slopes,
                               bottom_right=bottom_right)
    rows, heads, args, constexprs = launches["dkdv"]
    for dkdv_pass in dkdv_passes(constexprs["HEAD_DIM"], constexprs["HEAD_DIM_V"]):
        _launch("dkdv", rows, heads, args, dict(constexprs, DKDV_PASS=dkdv_pass))
    _launch("dq", *launches["dq"])
    return dq, dk, dv, dmask


_INDEX_SET = frozenset((torch.int32, torch.int64))


def _varlen_ok(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, dropout_p, scale, softcap,
               block_table) -> bool:
    """Whether a varlen call's inputs pass every check of ``_check_varlen``, in one expression (see
    ``_dense_ok``)."""
    qs, ks, vs, cs, dtype, device = q.shape, k.shape, v.shape, cu_seqlens_q.shape, q.dtype, q.get_device()
    if block_table is None:
        if not (len(ks) == 3 and len(vs) == 3 and ks[0] == vs[0] and ks[1] == vs[1]):
            return False
    elif not (len(ks) == 4 and len(vs) == 4 and ks[0] == vs[0] and ks[1] == vs[1] and ks[2] == vs[2]
              and block_table.dtype is torch.int32 and block_table.dim() == 2 and len(cs) == 1
              and block_table.shape[0] == cs[0] - 1 and block_table.get_device() == device):
        return False
    hkv = ks[-2]
    return (len(qs) == 3 and dtype in _checks.FLOAT_SET and k.dtype is dtype and v.dtype is dtype
            and k.get_device() == device and v.get_device() == device and ks[-1] == qs[2] and hkv > 0
            and qs[1] % hkv == 0 and qs[2] <= MAX_HEAD_DIM and vs[-1] <= MAX_HEAD_DIM
            and 0.0 <= dropout_p < 1.0 and -math.inf < scale < math.inf and 0.0 <= softcap < math.inf
            and len(cs) == 1 and cs[0] >= 1 and cu_seqlens_q.dtype in _INDEX_SET
            and cu_seqlens_q.get_device() == device and cu_seqlens_k.shape == cs and cu_seqlens_k.dtype in _INDEX_SET
            and cu_seqlens_k.get_device() == device
            and (seqused_k is None or seqused_k.shape == (cs[0] - 1,) and seqused_k.dtype in _INDEX_SET
                 and seqused_k.get_device() == device)
            and (alibi_slopes is None or alibi_slopes.dtype is torch.float32
                 and alibi_slopes.shape == (cs[0] - 1, qs[1]) and alibi_slopes.get_device() == device))


def _check_varlen(what, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, dropout_p, scale, softcap,
                  block_table=None):
    """The checks of a varlen call's inputs that need no data (the cpu backend's
    check_varlen_inputs less the boundaries' values, which the op checks unless ``checked``):
    packed q, k, v (total, heads, dim), or with ``block_table`` k and v as the (num_pages,
    page_size, Hkv, dim) pages it indexes."""
    if _varlen_ok(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, dropout_p, scale, softcap,
                  block_table):
        return
    if block_table is None:
        _checks.qkv_tensors(what, q, k, v, 3, "(total, heads, dim)")
        if k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]:
            raise ValueError(f"{what}: k and v must agree in total length and heads, got k {tuple(k.shape)}, v "
                             f"{tuple(v.shape)}")
        Hkv = k.shape[1]
    else:
        if q.dim() != 3:
            raise ValueError(f"{what}: q must be 3-D (total, heads, dim), got shape {tuple(q.shape)}")
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"{what}: {name} must be 4-D pages (num_pages, page_size, heads, dim) with a "
                                 f"block_table, got shape {tuple(t.shape)}")
        _checks.qkv_tensors(what, q, k, v, None)
        if k.shape[:3] != v.shape[:3]:
            raise ValueError(f"{what}: k and v pages must agree in count, size and heads, got k {tuple(k.shape)}, v "
                             f"{tuple(v.shape)}")
        Hkv = k.shape[2]
    _checks.attention_heads(what, q, k, v, q.shape[1], Hkv, MAX_HEAD_DIM)
    _checks.options(what, dropout_p, scale, softcap)
    _checks.index_tensor(what, "cu_seqlens_q", cu_seqlens_q, -1, "num_sequences + 1 >= 1", q)
    n = cu_seqlens_q.shape[0] - 1
    _checks.index_tensor(what, "cu_seqlens_k", cu_seqlens_k, n + 1, f"cu_seqlens_q's (num_sequences + 1) = {n + 1}",
                         q)
    if seqused_k is not None:
        _checks.index_tensor(what, "seqused_k", seqused_k, n, f"num_sequences = {n}", q)
    _checks.alibi(what, alibi_slopes, (n, q.shape[1]), "(num_sequences, Hq)", q)
    if block_table is not None:
        _checks.same_device(what, "q", q, {"block_table": block_table})
        if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != n:
            error = TypeError if block_table.dtype != torch.int32 else ValueError
            raise error(f"{what}: block_table must be a 2-D int32 (num_sequences, pages) = ({n}, ...) tensor of page "
                        f"numbers, got {_checks.name_of(block_table.dtype)} {tuple(block_table.shape)}")


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
                         bottom_right, dropout_p, scale, seed, offset, softcap=0.0, seqused_k=None,
                         alibi_slopes=None, block_table=None):
    """Packed sequences in one launch: a program per (sequence, query head, query block of the
    longest sequence); blocks past their own sequence return at once. ``block_table``: K and V
    are the (num_pages, page_size, Hkv, dim) pages of a paged cache, read in place."""
    _check_varlen("attention_varlen (triton)", q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, dropout_p,
                  scale, softcap, block_table)
    out = new_varlen_out(q, v.shape[-1])
    lse = torch.empty(varlen_lse_shape(q), device=q.device, dtype=torch.float32)
    if max_seqlen_q == 0:
        return out, lse
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bottom_right, seqused_k, block_table)
    view = Varlen.as_batch
    if block_table is None:
        k, v = _int32_tiles(view(k)), _int32_tiles(view(v))
    else:  # pages (num_pages, page_size, Hkv, dim): a tile's rows lie within one page
        k, v = _int32_tiles(k, rows_dim=1), _int32_tiles(v, rows_dim=1)
    split = KvSplit.plan(_programs((cu_seqlens_q.shape[0] - 1) * q.shape[1], max_seqlen_q), 0, max_seqlen_k,
                         q.device)
    # (out is ours, compact: written in place)
    _launch_forward(_int32_tiles(view(q)), k, v, None, band_lo, band_hi, dropout_p, scale, seed, offset, view(out),
                    lse, split, varlen=varlen, softcap=softcap, alibi_slopes=alibi_slopes)
    return out, lse


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo,
                         band_hi, bottom_right, dropout_p, scale, seed, offset, softcap=0.0, seqused_k=None,
                         alibi_slopes=None, dlse=None):
    what = "attention_varlen_bwd (triton)"
    _check_varlen(what, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, dropout_p, scale, softcap)
    _check_gradient_inputs(what, q, v, dout, out, lse, dlse, (q.shape[0], q.shape[1], v.shape[2]),
                           "(total_q, Hq, Dv)", varlen_lse_shape(q), "(Hq, total_q)")
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    # every key block of a sequence is written, zeros included; the keys past seqused_k are not
    new = torch.empty if seqused_k is None else torch.zeros
    dk = new(k.shape, device=k.device, dtype=k.dtype)
    dv = new(v.shape, device=v.device, dtype=v.dtype)
    if max_seqlen_q == 0:
        return dq, dk, dv
    # the (1, H, total, dim) views the kernels index (compact copies where a tile's int32 offsets
    # would not fit: ``_int32_tiles``)
    out_, dout_, q_, k_, v_ = (_int32_tiles(Varlen.as_batch(t)) for t in (out, dout, q, k, v))
    if dlse is not None:
        dlse = _int32_tiles(dlse.unsqueeze(0), cols_dim=None)
    # delta = rowsum(dO * O) - dlse over the packed rows: the plain kernel on one "batch" of total_q
    # rows gives the (Hq, total_q) layout of lse
    delta = torch.empty(varlen_lse_shape(q), device=q.device, dtype=torch.float32)
    _launch_delta(out_, dout_, delta, dlse)
    varlen = Varlen(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, bottom_right, seqused_k)
    launches = bwd_launch_args(dout_, q_, k_, v_, lse, delta, None, band_lo, band_hi, dropout_p,
                               scale, seed, offset, False, dq, dk, dv, empty(q), softcap=softcap, varlen=varlen,
                               alibi_slopes=alibi_slopes)
    rows, heads, args, constexprs = launches["dkdv"]
    for dkdv_pass in dkdv_passes(constexprs["HEAD_DIM"], constexprs["HEAD_DIM_V"]):
        _launch("dkdv", rows, heads, args, dict(constexprs, DKDV_PASS=dkdv_pass))
    _launch("dq", *launches["dq"])
    return dq, dk, dv
