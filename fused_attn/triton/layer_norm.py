"""Fused dropout + residual-add + LayerNorm / RMSNorm in Triton, forward and backward.

Forward, per row of the flattened ``(N, d)`` input (``s`` is the residual stream):

    s   = dropout(x) + residual          stored as ``summed`` (float32 with residual_in_fp32)
    mu  = mean(s)                        (LayerNorm only; RMSNorm has no centring)
    var = mean((s - mu)^2)               (RMSNorm: mean(s^2))
    y   = (s - mu) * rstd * w + b,       rstd = 1 / sqrt(var + eps)

Only ``summed``, ``mean`` and ``rstd`` are kept for backward; the normalised row
``xhat = (s - mu) * rstd`` is recomputed there from them (one read of ``summed`` instead of
storing and re-reading a second (N, d) tensor). The mean is held as a pair, the float32 mean
that is saved and ``corr = sum(s - mean) / d``, the part of it float32 cannot hold: ``xhat =
((s - mean) - corr) * rstd``, forward and backward (which recomputes corr from the row; see
_corrected_moments).

Backward, with ``g = dout * w`` and sums over the row of length d:

    dsum = rstd * (g - xhat * sum(g * xhat) / d - sum(g) / d)  (+ dsummed, the pre-LN gradient
                                                                  flowing into the summed output)
    RMSNorm drops the ``sum(g) / d`` term.
    dw   = sum over rows of dout * xhat,   db = sum over rows of dout
    dx   = dsum * keep / (1 - p)           (only with dropout)

``dsum`` is the gradient of both inputs of the add: without dropout it *is* dx and dresidual,
so the kernel writes it once, returns an empty ``dx`` and the autograd Function hands the same
tensor to both inputs (no copy); only with dropout does the kernel also write the masked ``dx``.

dw/db are reduced deterministically without atomics: backward runs a fixed number of programs,
each owning a fixed contiguous range of rows and one row of a float32 ``(programs, d)`` buffer of
partial sums; a second small kernel adds those rows in a fixed order.

Row sizes: when a row fits the register budget (``_MAX_FWD_BLOCK`` / ``_MAX_BWD_BLOCK``
elements) a program holds whole rows (several rows per program for small d, so each program
still moves a few KB); longer rows (up to any d, tested to 65 536) are processed in chunks of
``BLOCK_D`` with passes inside the program: the row's sum first (while writing ``summed``), for
LayerNorm the sums of the deviations from that first mean (the corrected two-pass statistics,
as the whole-row path computes them), then normalisation, the later passes re-reading the
``summed`` row that pass one just wrote (it is still in L2).

Dropout uses the shared counter hash (``fused_attn.triton._rng``): element (n, c) has logical
row n and column c, so masks match every other backend bit for bit.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..ops_common import empty, norm_stat_scale
from . import _checks
from ._host import cdiv, next_pow2
from ._rng import dropout_args, dropout_keep, dropout_row_key
from ._tuning import LAUNCH_OPTIONS

# Largest row (in elements) a program keeps whole in registers, forward and backward (backward
# holds more live values per element: summed, dout, its accumulators). Longer rows are chunked.
_MAX_FWD_BLOCK = 16384
_MAX_BWD_BLOCK = 8192
# Chunk width for rows longer than that.
_FWD_CHUNK = 8192
_BWD_CHUNK = 4096
# Elements one program covers when several short rows share it (forward; backward); narrowest block.
# The backward keeps about twice the live float32 values per element (summed, dout, xhat, the
# gradient, the dweight/dbias accumulators): at 4096 elements on 8 warps it needed 128-186
# registers per thread (AOT, sm_90), so one program -- 8 warps -- fit an SM, and the H200 moved
# 0.2-1.1 TB/s. Its tiles are therefore half as large and its programs wider: 8 elements per
# thread per tensor, 32 warps per SM in flight (``_bwd_programs``).
_TILE_ELEMS = 4096
_BWD_TILE_ELEMS = 2048
_MIN_BLOCK = 64
_INTERPRETER_TILE_ELEMS = 32768
# Hidden sizes above this are refused (nothing breaks beyond it, but it is untested).
MAX_HIDDEN = 1 << 20


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------

# The dropout constants change on every call (a fresh seed and offset). Triton types an int
# argument by its value (i32 below 2**31, u32 below 2**32, else i64) and specialises it on
# divisibility by 16, so raw values would compile a new variant of the kernel every few calls.
# The launcher therefore passes each 32-bit word tagged with bit 32 (always i64) and the kernels
# opt these arguments out of specialisation; the hash reads the low 32 bits.
_RNG_ARGS = ["drop_threshold", "seed_lo", "seed_hi_mix", "offset_lo", "offset_hi"]
_RNG_TAG = 1 << 32
#: ``_dropout_launch_args`` without dropout (the launchers use it without the call)
_NO_DROPOUT = (_RNG_TAG, 1.0, _RNG_TAG, _RNG_TAG, _RNG_TAG, _RNG_TAG)


@triton.jit
def _logical_rows(offset_lo, offset_hi, rows64):
    """offset + row as int64 from the two tagged 32-bit words of the offset."""
    offset = ((offset_hi - 4294967296) << 32) + (offset_lo - 4294967296)
    return offset + rows64


@triton.jit
def _dropout_residual_sum(X, RES, SUMMED, rows64, cols, mask, stride_x, stride_res, stride_s,
                          drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi,
                          HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, STORE: tl.constexpr):
    """s = dropout(x) + residual for a [ROWS, BLOCK_D] tile; stores it to SUMMED (if STORE) and
    returns it in float32 exactly as stored (rounded to summed's dtype), as the reference sees it."""
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        key = dropout_row_key(seed_lo, seed_hi_mix, _logical_rows(offset_lo, offset_hi, rows64))
        keep = dropout_keep(key[:, None], cols[None, :], drop_threshold)
        # round the scaled value to x's dtype first, as dropout(x) in x's dtype does
        x = tl.where(keep, (x * drop_scale).to(X.dtype.element_ty).to(tl.float32), 0.0)
    if HAS_RES:
        x += tl.load(RES + rows64[:, None] * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = x.to(SUMMED.dtype.element_ty)
    if STORE:
        tl.store(SUMMED + rows64[:, None] * stride_s + cols[None, :], s, mask=mask)
    return s.to(tl.float32)


# LayerNorm statistics: the corrected two-pass algorithm of the cpu kernel
# (csrc/cpu/layer_norm_kernels.h). With mean0 = sum(s) / n and e = s - mean0,
#
#     mean = mean0 + sum(e) / n,   m2 = n * var = max(sum(e^2) - sum(e)^2 / n, 0).
#
# sum(e) corrects mean0's rounding (the sum's and the division's, which is approximate on the
# GPU): without it a row whose mean is large against its spread (mean 300, std 0.01) had xhat
# shifted by that rounding, and a constant row c gave out = bias + (c - mean0) / sqrt(eps) instead
# of exactly bias (the mean rounds to c now). The clamp only guards rounding (sum(e)^2 / n <=
# sum(e^2) exactly) and lets a NaN through (deviations that overflow: inf - inf), as the cpu
# kernel's std::max does, so such a row keeps rstd NaN. The whole-row path takes both passes over
# the row in registers; the chunked one sums in pass 1 and takes e's sums over the summed row it
# re-reads. (It merged chunk statistics by Chan's method before, which rounds the mean once per
# chunk: at mean -3000, std 0.01 and 64-column chunks its error was up to 2.8x the oracle's bound,
# with each chunk's statistics corrected as above or not.)
#
# The corrected mean is saved rounded to float32, but the rows are normalised with the pair
# (mean, corr), corr = mean0 + sum(e) / n - mean the part of the mean float32 cannot hold: a
# single float32 mean fails where a row's spread is only a few float32 ulps of its mean
# (|mean| / std beyond ~2^22, 1e4 +- 2e-3): its rounding, up to ulp(mean) / 2, shifted every
# xhat by up to ulp(mean) / (2 std) (out off by 0.05, dx by 0.25 %). With the pair, s - mean is
# exact on such rows (Sterbenz: s and mean within a factor of 2 of each other) and
# xhat = ((s - mean) - corr) * rstd rounds only that small difference. The backward recomputes
# corr = sum(s - mean) / n against the saved mean, with its other row sums.
#
# Overflow: the sums are taken of scaled terms, so that they overflow float32 only where the
# statistic itself does (a plain sum of squares overflowed at +-1e18 over 1024 columns, whose
# variance is 1e36: LayerNorm gave NaN, RMSNorm a silent row of bias, and dx = 0). The launcher
# passes q = ops_common.norm_stat_scale(n), a power of two with q^2 <= 1/n: the mean is
# sum(s * q^2) / (n q^2) and the mean square sum((s q)^2) / (n q^2), no partial sum beyond
# max |s| or the mean square. The deviations are scaled by t = q / max(1, |mean0| / 2^60): each
# (e t)^2 is at most the variance plus mean0's rounding squared, which t keeps in range for means
# up to float32's largest, and no (e t)^2 underflows there (e is 0 or a few ulps of mean0 at
# least). t == q below 2^60, and scaling by a power of two rounds nothing: the results are the
# unscaled arithmetic's wherever it did not overflow, up to the order of the joined reduction's
# sums (LayerNorm's whole-row path moved by 1-3 ulp on ordinary rows under the interpreter; the
# constant-row and offset-row exactness above is kept).
#
# Beyond 2^60 mean0's rounding, a few ulps of a huge number, swamps the variance of a (nearly)
# constant row through the rounding of sum(e^2) - sum(e)^2 / n: a constant row of 1e20 got rstd
# 2e-11 instead of 1/sqrt(eps) (its dx 1e13 times too small), one of 1e36 rstd NaN. There e is
# taken from the row's first element s0 instead when s0 lies within 2^-14 |mean0| of mean0
# (_origin): a constant row's e are then exactly 0, and any row's as exact as the spread allows.
# The cpu kernel and the reference get these rows right by their own means (float64 sums, Welford's
# mean); rows below 2^60 keep mean0, bit for bit.

@triton.jit
def _origin(mean0, s0):
    """The deviations' origin for each row: mean0, or the row's first element s0 where |mean0| >
    2^60 and |s0 - mean0| <= 2^-14 |mean0| (see above)."""
    near = tl.abs(s0 - mean0) <= tl.abs(mean0) * 6.103515625e-05
    return tl.where((tl.abs(mean0) > 1.152921504606847e18) & near, s0, mean0)


@triton.jit
def _deviation_scale(mean0, q):
    """t = q / max(1, |mean0| / 2^60) for each row (see above)."""
    return q / tl.maximum(tl.abs(mean0) * 8.673617379884035e-19, 1.0)


@triton.jit
def _deviation_sums(s, mask, mean0, t):
    """(e, sum(e t), sum((e t)^2)) for each row of a [ROWS, BLOCK] tile, e = s - mean0 (0 outside
    ``mask``), t = _deviation_scale. One reduction of the joined pairs: as two tl.sum the
    16384-wide row spilled (6-8 LDL/STL on sm_80 under Triton 3.9, AOT); joined, every
    configuration compiles clean (3.9 and 3.6). (tl.reduce with a pair-adding combine compiles
    alike but runs a few hundred times slower under the interpreter, which loops over its combine
    in Python.)"""
    e = tl.where(mask, s - mean0[:, None], 0.0)
    et = e * t[:, None]
    e1, e2 = tl.split(tl.sum(tl.join(et, et * et), axis=1))
    return e, e1, e2


@triton.jit
def _corrected_moments(mean0, e1, e2, n, t):
    """(mean, hi, corr, var) from mean0 and the sums e1 = sum(e t), e2 = sum((e t)^2) of
    e = s - mean0 over the row's n elements (see above): mean = mean0 + sum(e) / n in float32;
    hi = mean - mean0 (exact: the two are within a factor of 2 wherever it matters, Sterbenz), so
    that s - mean = e - hi; corr = sum(e - hi) / n = sum(s - mean) / n, the part of the row's
    mean the float32 mean cannot hold, so that xhat = ((e - hi) - corr) * rstd. corr is taken as
    (e1 - n hi t) / n / t rather than as sum(e) / n - hi: for a constant row n hi t is e1 exactly
    and corr exactly 0 (out exactly the bias), where a division's rounding (approximate on the
    GPU) would leave a few ulps of e. var = m2 t^2 / (n t) / t, one rounding where t is a power of
    two."""
    c = e1 / n
    m2 = e2 - e1 * c
    mean = mean0 + c / t
    hi = mean - mean0
    corr = (e1 - n * (hi * t)) / n / t
    return mean, hi, corr, tl.where(m2 < 0.0, 0.0, m2) / (n * t) / t


@triton.jit
def _mean_of_scaled(total, n, q):
    """sum(s) / n from total = sum(s * q^2) (LayerNorm's first mean), or mean(s^2) from
    total = sum((s q)^2) (RMSNorm's mean square): total / (n q) / q (see above)."""
    return total / (n * q) / q


@triton.jit(do_not_specialize=_RNG_ARGS)
def _ln_fwd_kernel(X, RES, W, B, OUT, SUMMED, MEAN, RSTD,
                   n_rows, n_cols, stride_x, stride_res, stride_out, stride_s, eps, stat_scale,
                   drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
                   HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   RMS: tl.constexpr, DROPOUT: tl.constexpr, STORE_SUM: tl.constexpr = True):
    """One program normalises ROWS rows (SINGLE: whole rows in registers) or one long row in
    chunks of BLOCK_D (two passes: statistics while writing summed, then normalisation).
    STORE_SUM=False (whole rows only: the chunked pass re-reads the sum) skips the sum's store
    for inference; SUMMED then only gives the sum's dtype. stat_scale: the q that scales the
    statistics' sums (see above)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    if SINGLE:
        mask = row_ok[:, None] & (cols[None, :] < n_cols)
        s = _dropout_residual_sum(X, RES, SUMMED, rows64, cols, mask, stride_x, stride_res, stride_s,
                                  drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi, HAS_RES, DROPOUT,
                                  STORE_SUM)
        if RMS:
            centred = s
            sq = s * stat_scale
            var = _mean_of_scaled(tl.sum(sq * sq, axis=1), n_cols, stat_scale)
        else:
            # the row's sum (scaled) and its first element (for _origin), a reduction each. (One
            # reduction of joined pairs saves a few registers on sm_80 and sm_90, AOT, but the
            # interpreter, numpy, sums a joined pair's axis sequentially where it sums a plain
            # row pairwise: mean0 of 1e6 +- 0.1 over 4096 columns came out 31 (500 ulps) off, and
            # the corrected variance, e2 - e1^2 / n, lost its digits to that: rstd 25 % off.)
            total = tl.sum(s * (stat_scale * stat_scale), axis=1)
            s0 = tl.sum(tl.where(cols[None, :] == 0, s, 0.0), axis=1)
            mean0 = _origin(_mean_of_scaled(total, n_cols, stat_scale), s0)
            t = _deviation_scale(mean0, stat_scale)
            e, e1, e2 = _deviation_sums(s, mask, mean0, t)
            mean, hi, corr, var = _corrected_moments(mean0, e1, e2, n_cols, t)
            # (s - mean) - corr, with s - mean as e - hi: exact wherever e is (s near mean0), since
            # hi is (Sterbenz); only e stays live, as only the centred row did before, and a
            # constant row gives exactly 0 (e == hi, corr == 0)
            centred = (e - hi[:, None]) - corr[:, None]
            tl.store(MEAN + rows, mean, mask=row_ok)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        if not RMS:  # an overflowed variance gives NaN, as torch does (it gave rstd 0: out = bias)
            rstd = tl.where(var == float("inf"), float("nan"), rstd)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        y = centred * rstd[:, None]
        if HAS_W:
            y *= tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y += tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        tl.store(OUT + rows64[:, None] * stride_out + cols[None, :], y.to(OUT.dtype.element_ty), mask=mask)
    else:
        # pass 1: write summed; the row's sum (RMSNorm: its sum of squares)
        total = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_D):
            c = start + cols
            mask = row_ok[:, None] & (c[None, :] < n_cols)
            s = _dropout_residual_sum(X, RES, SUMMED, rows64, c, mask, stride_x, stride_res, stride_s,
                                      drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi, HAS_RES, DROPOUT,
                                      True)
            if RMS:
                sq = s * stat_scale
                total += tl.sum(sq * sq, axis=1)
            else:
                total += tl.sum(s * (stat_scale * stat_scale), axis=1)
        # make this program's summed stores visible to all its threads before re-reading them
        tl.debug_barrier()
        if RMS:
            var = _mean_of_scaled(total, n_cols, stat_scale)
        else:
            # LayerNorm, pass 1b: the sums of e = s - mean0 over the row re-read from summed (the
            # corrected two-pass; L2-resident: this program wrote it just now)
            mean0 = _mean_of_scaled(total, n_cols, stat_scale)
            s0 = tl.load(SUMMED + rows64 * stride_s, mask=row_ok, other=0.0).to(tl.float32)
            mean0 = _origin(mean0, s0)
            t = _deviation_scale(mean0, stat_scale)
            e1 = tl.zeros([ROWS], dtype=tl.float32)
            e2 = tl.zeros([ROWS], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_D):
                c = start + cols
                mask = row_ok[:, None] & (c[None, :] < n_cols)
                s = tl.load(SUMMED + rows64[:, None] * stride_s + c[None, :], mask=mask, other=0.0).to(tl.float32)
                _e, e1_chunk, e2_chunk = _deviation_sums(s, mask, mean0, t)
                e1 += e1_chunk
                e2 += e2_chunk
            mean, _hi, corr, var = _corrected_moments(mean0, e1, e2, n_cols, t)
            tl.store(MEAN + rows, mean, mask=row_ok)
        rstd = 1.0 / tl.sqrt_rn(var + eps)
        if not RMS:
            rstd = tl.where(var == float("inf"), float("nan"), rstd)
        tl.store(RSTD + rows, rstd, mask=row_ok)
        # pass 2: normalise from summed (L2-resident: this program wrote it just now)
        for start in range(0, n_cols, BLOCK_D):
            c = start + cols
            col_ok = c < n_cols
            mask = row_ok[:, None] & col_ok[None, :]
            s = tl.load(SUMMED + rows64[:, None] * stride_s + c[None, :], mask=mask, other=0.0).to(tl.float32)
            if RMS:
                y = s * rstd[:, None]
            else:  # the mean as the pair (mean, corr): see _corrected_moments
                y = ((s - mean[:, None]) - corr[:, None]) * rstd[:, None]
            if HAS_W:
                y *= tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_B:
                y += tl.load(B + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(OUT + rows64[:, None] * stride_out + c[None, :], y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _ln_bwd_store(DSUM, DX, DSUMMED, ds, rows64, c, mask, stride_dsummed, stride_ds, stride_dx,
                  drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi,
                  HAS_DSUMMED: tl.constexpr, DROPOUT: tl.constexpr, X_DTYPE: tl.constexpr):
    """Add the pre-LN gradient, store dsum (summed's dtype) and, with dropout, dx (x's dtype)."""
    if HAS_DSUMMED:
        ds += tl.load(DSUMMED + rows64[:, None] * stride_dsummed + c[None, :], mask=mask, other=0.0).to(tl.float32)
    ds = ds.to(DSUM.dtype.element_ty)
    tl.store(DSUM + rows64[:, None] * stride_ds + c[None, :], ds, mask=mask)
    if DROPOUT:
        key = dropout_row_key(seed_lo, seed_hi_mix, _logical_rows(offset_lo, offset_hi, rows64))
        keep = dropout_keep(key[:, None], c[None, :], drop_threshold)
        # as dropout(dsum.to(x dtype)): round to x's dtype, then scale
        dx = tl.where(keep, ds.to(X_DTYPE).to(tl.float32) * drop_scale, 0.0)
        tl.store(DX + rows64[:, None] * stride_dx + c[None, :], dx.to(X_DTYPE), mask=mask)


@triton.jit(do_not_specialize=_RNG_ARGS)
def _ln_bwd_kernel(DOUT, DSUMMED, SUMMED, W, MEAN, RSTD, DSUM, DX, DW_PART, DB_PART, ROW_C1, ROW_C2, ROW_CORR,
                   n_rows, n_cols, rows_per_program, stride_dout, stride_dsummed, stride_s, stride_ds, stride_dx,
                   drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi,
                   ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DSUMMED: tl.constexpr,
                   RMS: tl.constexpr, DROPOUT: tl.constexpr, X_DTYPE: tl.constexpr):
    """Program p owns rows [p * rows_per_program, (p + 1) * rows_per_program) (a multiple of
    ROWS) and writes row p of the dw/db partial-sum buffers.

    LayerNorm's xhat = ((s - mean) - corr) * rstd, with corr = sum(s - mean) / d recomputed from
    the row and the saved mean (the part of the row's mean the float32 mean cannot hold; see
    _corrected_moments).

    SINGLE: whole rows in registers, ROWS at a time; corr, then the row sums sum(g * xhat), sum(g)
    come from the tile itself. Otherwise (long rows, ROWS == 1): pass 1 computes the row sums over
    chunks, with e = s - mean and xh0 = e * rstd: sum(e), sum(g), sum(g * xh0), from which
    corr = sum(e) / d and sum(g * xhat) = sum(g * xh0) - corr * rstd * sum(g), and parks them in
    ROW_C1/ROW_C2/ROW_CORR; pass 2 walks chunk by chunk and, inside, row by row, so each chunk's
    dw/db partial sums stay in registers."""
    pid = tl.program_id(0)
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, n_rows)
    cols = tl.arange(0, BLOCK_D)
    if SINGLE:
        col_ok = cols < n_cols
        dw_acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        db_acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        for first in range(row_begin, row_end, ROWS):
            rows = first + tl.arange(0, ROWS)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            mask = row_ok[:, None] & col_ok[None, :]
            s = tl.load(SUMMED + rows64[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DOUT + rows64[:, None] * stride_dout + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            # outside the row dy == 0, and so are g * xhat and dy * xhat for a finite xhat; LayerNorm's
            # xhat there, (0 - mean) * rstd, overflows where |mean| > ~1e36 (a constant row: rstd is
            # 1/sqrt(eps)), and 0 * inf = NaN made the row's dx NaN: 0 there (e too, for corr's sum)
            if RMS:
                xhat = s * rstd[:, None]
            else:
                e = tl.where(mask, s - tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None], 0.0)
                corr = tl.sum(e, axis=1) / n_cols
                xhat = tl.where(mask, (e - corr[:, None]) * rstd[:, None], 0.0)
            # accumulate dw/db first so that dy dies early (register pressure at 8192-wide rows)
            if HAS_W:
                dw_acc += dy * xhat
            if HAS_B:
                db_acc += dy
            # w is re-read for each tile (an L1 hit) rather than held across the loop: at 8192-wide
            # rows on 16 warps (128 registers per thread) holding it spilled under Triton 3.6
            if HAS_W:
                g = dy * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            else:
                g = dy
            c1 = tl.sum(g * xhat, axis=1) / n_cols
            ds = g - xhat * c1[:, None]
            if not RMS:
                ds -= (tl.sum(g, axis=1) / n_cols)[:, None]
            _ln_bwd_store(DSUM, DX, DSUMMED, ds * rstd[:, None], rows64, cols, mask, stride_dsummed, stride_ds,
                          stride_dx, drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi, HAS_DSUMMED,
                          DROPOUT, X_DTYPE)
        if HAS_W:
            tl.store(DW_PART + pid.to(tl.int64) * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
        if HAS_B:
            tl.store(DB_PART + pid.to(tl.int64) * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    else:
        # pass 1: per row, c1 = sum(g * xhat) / d and c2 = sum(g) / d over all chunks (and for
        # LayerNorm corr, from sum(e): see the docstring)
        for row in range(row_begin, row_end):
            rows = row + tl.arange(0, ROWS)
            row_ok = rows < row_end
            rows64 = rows.to(tl.int64)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            if not RMS:
                mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            c1 = tl.zeros([ROWS], dtype=tl.float32)
            c2 = tl.zeros([ROWS], dtype=tl.float32)
            c3 = tl.zeros([ROWS], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_D):
                c = start + cols
                col_ok = c < n_cols
                mask = row_ok[:, None] & col_ok[None, :]
                s = tl.load(SUMMED + rows64[:, None] * stride_s + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DOUT + rows64[:, None] * stride_dout + c[None, :], mask=mask, other=0.0).to(tl.float32)
                if RMS:
                    xhat = s * rstd[:, None]
                else:  # e and xh0 0 outside the row, where they may overflow (see the whole-row path)
                    e = tl.where(mask, s - mean[:, None], 0.0)
                    c3 += tl.sum(e, axis=1)
                    xhat = e * rstd[:, None]  # xh0
                if HAS_W:
                    g = dy * tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                else:
                    g = dy
                c1 += tl.sum(g * xhat, axis=1)
                c2 += tl.sum(g, axis=1)
            if not RMS:
                corr = c3 / n_cols
                c1 -= corr * rstd * c2  # sum(g * xhat) from sum(g * xh0)
                tl.store(ROW_CORR + rows, corr, mask=row_ok)
            tl.store(ROW_C1 + rows, c1 / n_cols, mask=row_ok)
            tl.store(ROW_C2 + rows, c2 / n_cols, mask=row_ok)
        tl.debug_barrier()
        # pass 2: chunk by chunk, row by row: dsum (and dx), and this chunk's dw/db partial sums
        for start in range(0, n_cols, BLOCK_D):
            c = start + cols
            col_ok = c < n_cols
            if HAS_W:
                w = tl.load(W + c, mask=col_ok, other=0.0).to(tl.float32)
            dw_acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            db_acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            for row in range(row_begin, row_end):
                rows = row + tl.arange(0, ROWS)
                row_ok = rows < row_end
                rows64 = rows.to(tl.int64)
                mask = row_ok[:, None] & col_ok[None, :]
                s = tl.load(SUMMED + rows64[:, None] * stride_s + c[None, :], mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DOUT + rows64[:, None] * stride_dout + c[None, :], mask=mask, other=0.0).to(tl.float32)
                rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
                if RMS:
                    xhat = s * rstd[:, None]
                else:
                    corr = tl.load(ROW_CORR + rows, mask=row_ok, other=0.0)
                    xhat = ((s - tl.load(MEAN + rows, mask=row_ok, other=0.0)[:, None]) - corr[:, None]) * rstd[:, None]
                if HAS_W:
                    dw_acc += dy * xhat
                if HAS_B:
                    db_acc += dy
                g = dy * w[None, :] if HAS_W else dy
                ds = g - xhat * tl.load(ROW_C1 + rows, mask=row_ok, other=0.0)[:, None]
                if not RMS:
                    ds -= tl.load(ROW_C2 + rows, mask=row_ok, other=0.0)[:, None]
                _ln_bwd_store(DSUM, DX, DSUMMED, ds * rstd[:, None], rows64, c, mask, stride_dsummed, stride_ds,
                              stride_dx, drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi, HAS_DSUMMED,
                              DROPOUT, X_DTYPE)
            if HAS_W:
                tl.store(DW_PART + pid.to(tl.int64) * n_cols + c, tl.sum(dw_acc, axis=0), mask=col_ok)
            if HAS_B:
                tl.store(DB_PART + pid.to(tl.int64) * n_cols + c, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def _sum_partials_kernel(PART, OUT0, OUT1, n_parts, n_cols, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUTk[c] = sum over p of PART[k, p, c] (k = 0, 1: dweight and/or dbias) in a fixed order.

    Program (i, k) owns BLOCK_C columns of output k and walks the partial rows BLOCK_P at a time,
    so the result is the same bit for bit on every run (no atomics). Narrow column blocks spread
    the (programs, d) buffer over many SMs even for small d."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    part = PART + tl.program_id(1).to(tl.int64) * n_parts * n_cols
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for first in range(0, n_parts, BLOCK_P):
        p = first + tl.arange(0, BLOCK_P)
        mask = (p < n_parts)[:, None] & col_ok[None, :]
        acc += tl.load(part + p[:, None].to(tl.int64) * n_cols + cols[None, :], mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)
    if tl.program_id(1) == 0:
        tl.store(OUT0 + cols, total.to(OUT0.dtype.element_ty), mask=col_ok)
    else:
        tl.store(OUT1 + cols, total.to(OUT1.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# launch configuration
# ---------------------------------------------------------------------------------------------

def kernel_config(d: int, backward: bool = False, tile_elems: int = None) -> dict:
    """Launch parameters for rows of ``d`` elements.

    - rows that fit the register budget (``_MAX_FWD_BLOCK`` / ``_MAX_BWD_BLOCK``) are held whole:
      BLOCK_D = max(64, next_pow2(d)) columns, and ROWS = tile_elems // BLOCK_D rows per program
      (at least 1) so that a program moves 4-16 KB per tensor even for short rows (tile_elems:
      ``_TILE_ELEMS`` forward, ``_BWD_TILE_ELEMS`` backward); forward 8 warps up to 4096 columns,
      16 above; backward 8 warps up to 2048 columns, 32 above;
    - longer rows: one row per program in chunks of ``_FWD_CHUNK`` / ``_BWD_CHUNK`` (SINGLE False).

    The configurations do not depend on the dtype (the kernels compute in float32 whatever they
    load), which keeps the set small enough that the AOT test compiles every one of them.
    ``tile_elems`` defaults to the GPU's; the interpreter uses bigger tiles (fewer programs:
    its cost is per operation, not per element).
    """
    max_block, chunk = (_MAX_BWD_BLOCK, _BWD_CHUNK) if backward else (_MAX_FWD_BLOCK, _FWD_CHUNK)
    if d > max_block:
        block, rows, single = chunk, 1, False
    else:
        block, single = max(_MIN_BLOCK, next_pow2(d)), True
        rows = max(1, (tile_elems or (_BWD_TILE_ELEMS if backward else _TILE_ELEMS)) // block)
    if backward:
        # whole rows: 8 warps up to 2048 columns (8 elements per thread, 74-100 registers: three
        # programs per SM), 32 warps for 4096 and 8192 (one program of 32 warps per SM); the
        # chunked path stays on 8 warps (its two passes need ~190-240 registers, which 16 warps
        # cap at 128 and spill)
        warps = 8 if (block <= 2048 or not single) else 32
    else:
        warps = 8 if block <= 4096 else 16
    return {"ROWS": rows, "BLOCK_D": block, "SINGLE": single, "num_warps": warps}


@functools.lru_cache(maxsize=256)
def _launch_config(d: int, backward: bool, tile_elems) -> dict:
    """``kernel_config``, memoised for the launchers (a model has a few hidden sizes; building the
    dict cost ~1 us a launch). Shared between calls: read it, never modify it."""
    return kernel_config(d, backward, tile_elems)


def _tile_elems(t: torch.Tensor):
    """kernel_config's ``tile_elems`` for a launch on t: None on a GPU (its own tiles, which differ
    between forward and backward), the interpreter's larger ones elsewhere. (Asked of the tensor:
    ``t.is_cuda`` costs ~0.15 us less than ``t.device.type``, on every launch.)"""
    return None if t.is_cuda else _INTERPRETER_TILE_ELEMS


def possible_configs() -> list[dict]:
    """Every configuration the launchers may pick (forward and backward): the AOT test compiles
    each one."""
    configs = []
    for backward in (False, True):
        seen = []
        for d in [1 << k for k in range(0, 17)] + [(1 << 16) + 1]:
            cfg = kernel_config(d, backward)
            if cfg not in seen:
                seen.append(cfg)
        configs += [dict(cfg, backward=backward) for cfg in seen]
    return configs


def _bwd_programs(n_rows: int, rows: int, num_warps: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) for backward: 32 warps per SM (a quarter to half of them
    resident at once, by the AOT register counts), each program a contiguous range of whole
    tiles. The partial-sum buffer has one row per program."""
    tiles = cdiv(n_rows, rows)
    if device.type == "cuda":
        target = _sm_count(device) * max(1, 32 // num_warps)
    else:  # the interpreter: a few programs are enough to exercise the partial sums
        target = 4
    tiles_per_program = cdiv(tiles, min(tiles, target))
    return cdiv(tiles, tiles_per_program), tiles_per_program * rows


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """The SMs of a CUDA device (a tensor's: it has an index), read once: get_device_properties
    costs a few us of Python a call."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dropout_launch_args(dropout_p: float, seed: int, offset: int) -> tuple:
    """(drop_threshold, drop_scale, seed_lo, seed_hi_mix, offset_lo, offset_hi): the 32-bit words
    tagged with bit 32 so that Triton always types them int64 (see _RNG_ARGS)."""
    if dropout_p <= 0.0:
        return _NO_DROPOUT
    seed_lo, seed_hi_mix, threshold = dropout_args(dropout_p, seed)
    offset = int(offset) & ((1 << 63) - 1)
    words = (threshold, seed_lo, seed_hi_mix, offset & 0xFFFFFFFF, offset >> 32)
    tagged = [w | _RNG_TAG for w in words]
    return tagged[0], 1.0 / (1.0 - dropout_p), *tagged[1:]


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    """t (2-D) with a unit stride along its rows: itself when it has one (or rows of at most one
    element), else a contiguous copy. (is_contiguous() first: one call, where stride(1) and
    shape[1] cost twice that, on every launch.)"""
    return t if t.is_contiguous() or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


# ---------------------------------------------------------------------------------------------
# launchers (the contract of fused_attn/backends/base.py)
# ---------------------------------------------------------------------------------------------

def _check_params(what, weight, bias, d, dtype):
    """weight and bias None or (d,) of x's dtype (the cpu backend's check_param)."""
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _checks.rows_like(what, name, p, (d,), "", dtype)


def _check_fwd(x, residual, weight, bias, eps, dropout_p, residual_in_fp32):
    """The forward's inputs (the cpu backend's checks; ``_checks``)."""
    xs, dtype, device = x.shape, x.dtype, x.get_device()
    if (len(xs) == 2 and dtype in _checks.FLOAT_SET and eps >= 0.0 and 0.0 <= dropout_p < 1.0
            and (residual is None or residual.shape == xs and residual.get_device() == device
                 and (residual.dtype is dtype or residual_in_fp32 and residual.dtype is torch.float32))
            and (weight is None or weight.shape == xs[1:] and weight.dtype is dtype and weight.get_device() == device)
            and (bias is None or bias.shape == xs[1:] and bias.dtype is dtype and bias.get_device() == device)):
        return  # (the common case in one expression, ~1 us less; else the checks below name what is wrong)
    what = "layer_norm_residual (triton)"
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be 2-D (N, d), got shape {tuple(x.shape)}")
    _checks.float_dtype(what, "x", x.dtype)
    _checks.same_device(what, "x", x, {"residual": residual, "weight": weight, "bias": bias})
    if residual is not None:
        if residual.dtype != x.dtype and not (residual_in_fp32 and residual.dtype is torch.float32):
            raise TypeError(f"{what}: residual must have x's dtype {_checks.name_of(x.dtype)} (or float32 with "
                            f"residual_in_fp32), got {_checks.name_of(residual.dtype)}")
        _checks.rows_like(what, "residual", residual, x.shape, "")
    _check_params(what, weight, bias, x.shape[1], x.dtype)
    if not eps >= 0.0:
        raise ValueError(f"{what}: eps must be non-negative, got {eps}")
    _checks.dropout(what, dropout_p)


def _check_bwd(dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms, x_dtype):
    """The backward's inputs (the cpu backend's checks; ``_checks``)."""
    ss, sdtype, device = summed.shape, summed.dtype, summed.get_device()
    if (len(ss) == 2 and x_dtype in _checks.FLOAT_SET and (sdtype is x_dtype or sdtype is torch.float32)
            and dout.shape == ss and dout.dtype is x_dtype and dout.get_device() == device
            and (dsummed is None or dsummed.shape == ss and dsummed.dtype is sdtype and dsummed.get_device() == device)
            and (weight is None or weight.shape == ss[1:] and weight.dtype is x_dtype and weight.get_device() == device)
            and (bias is None or bias.shape == ss[1:] and bias.dtype is x_dtype and bias.get_device() == device)
            and rstd.dtype is torch.float32 and rstd.shape == ss[:1] and rstd.get_device() == device
            and mean.dtype is torch.float32 and mean.shape == ((0,) if rms else ss[:1]) and mean.get_device() == device
            and eps >= 0.0 and 0.0 <= dropout_p < 1.0):
        return  # (the common case in one expression; else the checks below name what is wrong)
    what = "layer_norm_residual_bwd (triton)"
    _checks.float_dtype(what, "x_dtype", x_dtype)
    if summed.dim() != 2:
        raise ValueError(f"{what}: summed must be 2-D (N, d), got shape {tuple(summed.shape)}")
    if summed.dtype != x_dtype and summed.dtype != torch.float32:
        raise TypeError(f"{what}: summed must have dtype {_checks.name_of(x_dtype)} or float32, got "
                        f"{_checks.name_of(summed.dtype)}")
    _checks.same_device(what, "summed", summed, {"dout": dout, "dsummed": dsummed, "weight": weight, "bias": bias,
                                                 "mean": mean, "rstd": rstd})
    n, d = summed.shape
    _checks.rows_like(what, "dout", dout, summed.shape, "", x_dtype)
    if dsummed is not None:
        _checks.rows_like(what, "dsummed", dsummed, summed.shape, "", summed.dtype, "summed's ")
    _check_params(what, weight, bias, d, x_dtype)
    _checks.float32_rows(what, "rstd", rstd, (n,), "")
    _checks.float32_rows(what, "mean", mean, (0 if rms else n,), "", " (empty for rms)")
    if not eps >= 0.0:
        raise ValueError(f"{what}: eps must be non-negative, got {eps}")
    _checks.dropout(what, dropout_p)


def layer_norm_residual_fwd(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, seed, offset,
                            store_summed=True):
    """(out, summed, mean, rstd) for x (N, d); see the module docstring.

    ``store_summed=False`` returns an empty summed. Whole-row kernels then skip the sum's store;
    rows longer than one tile still write it to a scratch buffer, because their normalisation
    pass re-reads it.

    (Host time: sizes go to torch.empty as separate ints, which it parses ~0.3 us faster than a
    tuple; strides are read as ``stride()`` tuples, ``stride(i)`` parsing its argument ~0.07 us
    slower; a fresh (n, d) tensor's row stride is d. Every launch pays these.)"""
    _check_fwd(x, residual, weight, bias, eps, dropout_p, residual_in_fp32)
    n, d = x.shape
    device = x.device
    summed_dtype = torch.float32 if residual_in_fp32 else x.dtype
    out = torch.empty(n, d, dtype=x.dtype, device=device)
    mean = torch.empty(0 if rms else n, dtype=torch.float32, device=device)
    rstd = torch.empty(n, dtype=torch.float32, device=device)
    if n == 0 or d == 0:
        if d == 0:  # statistics of an empty row are undefined, as in the reference
            mean.fill_(math.nan)
            rstd.fill_(math.nan)
        summed = torch.empty(n, d, dtype=summed_dtype, device=device) if store_summed else \
            torch.empty(0, dtype=summed_dtype, device=device)
        return out, summed, mean, rstd
    cfg = _launch_config(d, False, _tile_elems(x))
    single = cfg["SINGLE"]
    store = store_summed or not single
    if store:
        summed = torch.empty(n, d, dtype=summed_dtype, device=device)
    else:
        # without a store the kernel takes only the sum's dtype from SUMMED and never reads or
        # writes it: a tensor of that dtype stands in (out is x's dtype; rstd float32, the sum's
        # dtype with residual_in_fp32 when x is not float32)
        summed = out if summed_dtype == x.dtype else rstd
    x = _unit_cols(x)
    residual = None if residual is None else _unit_cols(residual)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    _ln_fwd_kernel[(-(-n // cfg["ROWS"]),)](  # (cdiv)
        x, x if residual is None else residual, x if weight is None else weight, x if bias is None else bias,
        out, summed, rstd if rms else mean, rstd,
        n, d, x.stride()[0], 0 if residual is None else residual.stride()[0], d, d if store else 0, float(eps),
        norm_stat_scale(d), *(_NO_DROPOUT if dropout_p <= 0.0 else _dropout_launch_args(dropout_p, seed, offset)),
        ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"], SINGLE=single,
        HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        RMS=bool(rms), DROPOUT=dropout_p > 0.0, STORE_SUM=store, num_warps=cfg["num_warps"], **LAUNCH_OPTIONS)
    if store_summed:
        return out, summed, mean, rstd
    # the (0,) summed returned without store_summed: made only now, after the launch (a torch.empty
    # is host time on every call)
    return out, torch.empty(0, dtype=summed_dtype, device=device), mean, rstd


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def layer_norm_residual_bwd(dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms, seed, offset,
                            x_dtype):
    """(dsum, dx, dweight, dbias); dx is empty without dropout (dsum is then dx and dresidual).
    (Host time as in the forward: sizes as ints, ``stride()`` tuples, fresh tensors' strides known.)"""
    _check_bwd(dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms, x_dtype)
    n, d = summed.shape
    device = summed.device
    dropout = dropout_p > 0.0
    dsum = torch.empty(n, d, dtype=summed.dtype, device=device)
    dx = torch.empty(n, d, dtype=x_dtype, device=device) if dropout else torch.empty(0, dtype=x_dtype, device=device)
    has_w, has_b = weight is not None, bias is not None
    # with no rows the parameter gradients are zero; placeholders when absent (separate tensors:
    # outputs of an op may not alias each other)
    new_grad = torch.zeros if n == 0 or d == 0 else torch.empty
    dweight = new_grad(d, dtype=weight.dtype, device=device) if has_w else empty(summed)
    dbias = new_grad(d, dtype=bias.dtype, device=device) if has_b else empty(summed)
    if n == 0 or d == 0:
        return dsum, dx, dweight, dbias
    dout = _unit_cols(dout)
    dsummed = None if dsummed is None else _unit_cols(dsummed)
    summed = _unit_cols(summed)
    weight = None if weight is None else weight.contiguous()
    cfg = _launch_config(d, True, _tile_elems(summed))
    single = cfg["SINGLE"]
    programs, rows_per_program = _bwd_programs(n, cfg["ROWS"], cfg["num_warps"], device)
    # partial sums of dweight and/or dbias, one (programs, d) slab each: both stacked in one
    # buffer, split by one unbind (an index is a dispatcher call each); a single one is the slab
    # itself (the sum kernel reads slab 0 at the buffer's start either way); the pointer of an
    # absent one is a placeholder the kernel does not read
    n_sums = int(has_w) + int(has_b)
    if n_sums == 2:
        parts = torch.empty(2, programs, d, dtype=torch.float32, device=device)
        dw_part, db_part = parts.unbind()
    else:
        parts = dw_part = db_part = torch.empty(programs if n_sums else 0, d if n_sums else 0, dtype=torch.float32,
                                                device=device)
    # per-row sums for long rows (pass 1 -> pass 2 of the chunked path: c1, c2 and the mean's
    # correction); whole rows never touch them, so a float32 tensor at hand stands in for all three
    # (each torch.empty is host time on every call): rstd, which the kernel only reads
    if single:
        row_c1 = row_c2 = row_corr = rstd
    else:
        row_c1, row_c2, row_corr = torch.empty(3, n, dtype=torch.float32, device=device)
    _ln_bwd_kernel[(programs,)](
        dout, dout if dsummed is None else dsummed, summed, dout if weight is None else weight,
        rstd if rms else mean, rstd, dsum, dx if dropout else dsum,
        dw_part, db_part, row_c1, row_c2, row_corr,
        n, d, rows_per_program, dout.stride()[0], 0 if dsummed is None else dsummed.stride()[0], summed.stride()[0],
        d, d if dropout else 0,
        *(_dropout_launch_args(dropout_p, seed, offset) if dropout else _NO_DROPOUT),
        ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"], SINGLE=single,
        HAS_W=has_w, HAS_B=has_b, HAS_DSUMMED=dsummed is not None, RMS=bool(rms), DROPOUT=dropout,
        X_DTYPE=_TL_DTYPES[x_dtype], num_warps=cfg["num_warps"], **LAUNCH_OPTIONS)
    if n_sums:
        # one launch reduces both (program_id(1) picks dweight or dbias)
        _sum_partials_kernel[(-(-d // _SUM_BLOCK_C), n_sums)](  # (cdiv)
            parts, dweight if has_w else dbias, dbias if has_b else dweight, programs, d, BLOCK_P=_SUM_BLOCK_P,
            BLOCK_C=_SUM_BLOCK_C, num_warps=4, **LAUNCH_OPTIONS)
    return dsum, dx, dweight, dbias


_SUM_BLOCK_P, _SUM_BLOCK_C = 64, 64


def unsupported_reasons(call) -> list[str]:
    """Why the Triton kernels cannot take ``call`` (fused_attn.backends.triton asks)."""
    hidden = call.options.get("hidden", 0)
    if hidden > MAX_HIDDEN:
        return [f"hidden size {hidden} is above the {MAX_HIDDEN} the Triton LayerNorm kernels are built for"]
    return []
