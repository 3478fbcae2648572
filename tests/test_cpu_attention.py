"""The C++ CPU attention kernels (csrc/cpu/attention.cpp) against the float64 reference.

Forward and backward through ``fused_attn.functional.attention(..., backend="cpu")`` held to the
oracle (``fused_attn.testing.check_against_reference``) in float32, bfloat16 and float16 over odd
shapes and every option; visibility bands (sliding windows, bottom-right alignment, rows left
without a key) through the compiled ops against a float64 softmax built here from the band's
definition; dropout compared with the reference for the same (seed, offset);
``torch.autograd.gradcheck`` in float64; logit soft-capping (softcap > 0) through the compiled ops
against the same float64 reference with the cap; ALiBi (alibi_slopes, top-left and bottom-right)
likewise, and as the additive mask it stands for; direct op calls with bad input raise; the backward's
two parallel schedules (whole kv heads per thread, or key blocks then query blocks) are both
exercised; a long sequence runs without an L x L allocation.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_attn
from fused_attn import functional as F
from fused_attn import reference as ref
from fused_attn.ops import AttentionFunction
from fused_attn.ops_common import CAUSAL_BAND, NO_BAND
from fused_attn.testing import check_against_reference, cpu_has_avx512bf16, make_inputs

pytestmark = pytest.mark.skipif(
    fused_attn.extension_error() is not None
    or not torch._C._dispatch_has_kernel_for_dispatch_key("fused_attn_C::attention_fwd", "CPU"),
    reason=f"fused_attn._C with the CPU attention kernel is not built: {fused_attn.extension_error()}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _attention(causal=False, dropout_p=0.0, rng=(0, 0), scale=None):
    """(fused, reference) callables over (q, k, v[, mask]) with the same options."""
    def fused(q, k, v, mask=None):
        if dropout_p == 0.0:
            return fused_attn.functional.attention(q, k, v, attn_mask=mask, causal=causal, scale=scale, backend="cpu")
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        band = CAUSAL_BAND if causal else NO_BAND
        return AttentionFunction.apply(q, k, v, mask, *band, dropout_p, s, torch.tensor(rng), "cpu", 0.0, None, False,
                                       False)[0]  # (out, lse)

    def reference(q, k, v, mask=None):
        return ref.attention(q, k, v, mask, causal, dropout_p, scale, rng if dropout_p > 0 else None)
    return fused, reference


def _check(dtype, B, Hq, Hkv, Lq, Lk, D, Dv=None, causal=False, mask=None, dropout_p=0.0, seed=0, floor=None):
    Dv = D if Dv is None else Dv
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), dtype=dtype, seed=seed)
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    fused, reference = _attention(causal, dropout_p, rng=(1234 + seed, 99))
    return check_against_reference(fused, reference, inputs, names=["q", "k", "v", "mask"][:len(inputs)], floor=floor)


# ---- oracle: shapes ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("L", [1, 17, 97, 128, 129])
def test_seqlens(dtype, L):
    _check(dtype, 2, 2, 2, L, L, 40)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Lq,Lk", [(1, 147), (239, 1), (63, 65), (200, 700)])
@pytest.mark.parametrize("causal", [False, True])
def test_unequal_lengths(dtype, Lq, Lk, causal):
    floor = None
    if Lk == 1 and dtype == torch.float32:
        # One key: the true dK is exactly 0, and the float32 reference gets exactly 0 too (its
        # softmax backward subtracts sum(P * dP) from the same dP). The fused backward, like
        # FlashAttention's, subtracts rowsum(dO * O) computed separately, leaving float32
        # rounding (~1e-6) in dK, which the zero-error bound cannot absorb; allow that much.
        floor = 5e-5
    _check(dtype, 1, 3, 3, Lq, Lk, 64, causal=causal, floor=floor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [16, 40, 59, 64, 128])
def test_head_dims(dtype, D):
    _check(dtype, 1, 2, 2, 77, 83, D, causal=D in (59, 128))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_value_dim_differs(dtype):
    _check(dtype, 2, 2, 1, 33, 70, 24, Dv=48, causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (6, 1), (4, 4)])
def test_grouped_query(dtype, Hq, Hkv):
    _check(dtype, 2, Hq, Hkv, 70, 90, 32, causal=True)


def test_long_causal_many_blocks():
    # several forward (96 x 256, or 256 x 512 with BLAS) and backward (64 x 128) tiles, a causal
    # diagonal that cuts tiles and register blocks at every offset
    _check(torch.float32, 1, 2, 1, 700, 1100, 32, causal=True)


# ---- the two ways to run the tile products ----------------------------------------------------
# On a CPU with AVX2 + FMA every other test here runs the register-blocked products (the default,
# FUSED_ATTN_CPU_GEMM unset); these run the hardest cases through BLAS too (the path of float64,
# of other CPUs, and of FUSED_ATTN_CPU_GEMM=blas|aten), and hold the two to each other.

_GEMM_CASES = {
    # rows not a multiple of the 6-row register block, keys not a multiple of 16, head dims not a
    # multiple of 16, several query/key tiles, a causal diagonal at every offset (Lq != Lk)
    "odd_causal": dict(B=1, Hq=2, Hkv=1, Lq=239, Lk=301, D=59, Dv=40, causal=True),
    "queries_past_keys": dict(B=2, Hq=4, Hkv=2, Lq=97, Lk=17, D=40, causal=True),
    "one_query": dict(B=1, Hq=3, Hkv=3, Lq=1, Lk=147, D=16),
    "mask_dropout": dict(B=1, Hq=2, Hkv=2, Lq=70, Lk=290, D=24, mask=True, dropout_p=0.3),
}


@pytest.mark.parametrize("mode", ["tiles", "blas", "aten"])
@pytest.mark.parametrize("case", sorted(_GEMM_CASES))
def test_gemm_modes_meet_the_oracle(monkeypatch, mode, case):
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
    c = dict(_GEMM_CASES[case])
    mask = None
    if c.pop("mask", False):
        mask = make_inputs((c["B"], c["Hq"], 1, c["Lk"]), dtype=torch.float32, seed=9)[0].requires_grad_()
    _check(torch.float32, c.pop("B"), c.pop("Hq"), c.pop("Hkv"), c.pop("Lq"), c.pop("Lk"), c.pop("D"), mask=mask, **c)


@pytest.mark.parametrize("band", [CAUSAL_BAND, (-37, 5)], ids=["causal", "window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemm_modes_agree(monkeypatch, dtype, band):
    """Register-blocked and BLAS products: the same answer to float32 rounding, forward and backward.
    (bfloat16: the register-blocked float32 panels; the AVX512-BF16 forward rounds P to bf16 and is
    held to these by test_bf16_dot_on_and_off_agree.)"""
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", "off")
    q, k, v, dout = make_inputs((2, 4, 131, 72), (2, 2, 150, 72), (2, 2, 150, 72), (2, 4, 131, 72), dtype=dtype, seed=4,
                                requires_grad=False)
    mask = torch.randn(2, 1, 131, 150).to(dtype)
    results = {}
    for mode in ("tiles", "blas"):
        monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
        out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, mask.expand(2, 4, 131, 150), *band, 0.0, 0.1, 0, 0)
        grads = torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, mask.expand(2, 4, 131, 150), *band, 0.0,
                                                     0.1, 0, 0, True)
        results[mode] = (out, lse, *grads)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dmask"], results["tiles"], results["blas"]):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride(), name
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol, msg=name)


def test_gemm_mode_is_checked(monkeypatch):
    """A bad value is a ValueError naming the variable and its values, as the tile sizes' are
    (it was a RuntimeError), through the op and the public function alike."""
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", "mkl")
    q, k, v = _good()
    with pytest.raises(ValueError, match="FUSED_ATTN_CPU_GEMM must be one of auto, tiles, blas, aten; got 'mkl'"):
        torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.5, 0, 0)
    with pytest.raises(ValueError, match="FUSED_ATTN_CPU_GEMM must be one of auto, tiles, blas, aten; got 'mkl'"):
        F.attention(q, k, v, backend="cpu")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,Hkv", [(1, 1), (1, 2), (3, 1)])
def test_backward_schedules(threads, B, Hkv):
    """Both backward schedules (per kv head, and two passes over blocks) on GQA with masks."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mask = make_inputs((B, 2 * Hkv, 1, 150), dtype=torch.float32, seed=5)[0]
        _check(torch.float32, B, 2 * Hkv, Hkv, 140, 150, 24, causal=True, mask=mask)
    finally:
        torch.set_num_threads(old)


# The backward's schedule follows the thread count (per kv head when the (batch row, kv head)
# pairs spread evenly over the threads, else a dK/dV pass and a dQ pass). Both run the same tiles,
# so the gradients are bitwise those of any other thread count (README's Determinism). The BLAS
# path (float64, FUSED_ATTN_CPU_GEMM=blas) needs it of its tile shapes, whose summation order MKL
# follows: tiles cut at the band's edges in one schedule and at the key blocks' in the other gave
# float64 dk and dv differing in the last bit between 1 and 2 threads. B * Hkv (or sequences *
# Hkv) of 1 or 2 and 3 sequences: 1, 2 and 3 threads take both schedules.
_THREAD_CASES = {
    "causal": dict(B=1, Hq=2, Hkv=1, Lq=40, Lk=50, D=40, causal=True),
    "window_bottom_right": dict(B=1, Hq=2, Hkv=1, Lq=17, Lk=97, D=59, causal=True, window_size=(30, 0),
                                alignment="bottom_right"),
    "window_mask_softcap_alibi_dropout": dict(B=1, Hq=4, Hkv=2, Lq=130, Lk=300, D=40, window_size=(40, 70),
                                              mask=True, softcap=5.0, alibi=True, dropout_p=0.2),
    "bottom_right_causal_alibi": dict(B=2, Hq=2, Hkv=1, Lq=200, Lk=300, D=59, causal=True,
                                      alignment="bottom_right", alibi=True),
    "dense_mask": dict(B=1, Hq=2, Hkv=1, Lq=17, Lk=97, D=40, mask=True),
    "varlen_causal": dict(lens_q=[40, 17, 130], lens_k=[50, 97, 130], Hq=2, Hkv=1, D=40, causal=True),
    "varlen_window_bottom_right": dict(lens_q=[17, 200, 5], lens_k=[97, 260, 9], Hq=2, Hkv=1, D=59, causal=True,
                                       window_size=(40, 0), alignment="bottom_right", alibi=True, softcap=5.0),
}


def _thread_case_grads(dtype, case):
    """The gradients of every differentiable input of one _THREAD_CASES call."""
    c = dict(_THREAD_CASES[case])
    gen = torch.Generator().manual_seed(0)
    varlen = "lens_q" in c
    if varlen:
        lens_q, lens_k = c.pop("lens_q"), c.pop("lens_k")
        rows_q, rows_k, Hq, Hkv, D = sum(lens_q), sum(lens_k), c.pop("Hq"), c.pop("Hkv"), c.pop("D")
        q_shape, k_shape, slopes = (rows_q, Hq, D), (rows_k, Hkv, D), (Hq,)
    else:
        B, Hq, Hkv, Lq, Lk, D = (c.pop(n) for n in ("B", "Hq", "Hkv", "Lq", "Lk", "D"))
        q_shape, k_shape, slopes = (B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hq)
    inputs = [torch.randn(s, generator=gen, dtype=dtype, requires_grad=True) for s in (q_shape, k_shape, k_shape)]
    if c.pop("mask", False):
        inputs.append(torch.randn(B, 1, Lq, Lk, generator=gen, dtype=dtype, requires_grad=True))
        c["attn_mask"] = inputs[-1]
    if c.pop("alibi", False):
        c["alibi_slopes"] = torch.rand(slopes, generator=gen)
    if c.get("dropout_p"):
        c["generator"] = torch.Generator().manual_seed(1)
    if varlen:
        cu_q, cu_k = (torch.tensor([0] + lens).cumsum(0).to(torch.int32) for lens in (lens_q, lens_k))
        out = F.attention_varlen(*inputs[:3], cu_q, cu_k, backend="cpu", **c)
    else:
        out = F.attention(*inputs[:3], backend="cpu", **c)
    return torch.autograd.grad(out, inputs, torch.randn(out.shape, generator=gen, dtype=dtype))


@pytest.mark.parametrize("dtype,mode", [(torch.float64, "blas"), (torch.float32, "blas"), (torch.float32, "tiles")],
                         ids=["float64", "float32-blas", "float32-tiles"])
@pytest.mark.parametrize("case", sorted(_THREAD_CASES))
def test_gradients_do_not_depend_on_the_thread_count(monkeypatch, dtype, mode, case):
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
    old = torch.get_num_threads()
    try:
        grads = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads[threads] = _thread_case_grads(dtype, case)
    finally:
        torch.set_num_threads(old)
    names = ["dq", "dk", "dv", "dmask"]
    for threads in (2, 3):
        for name, a, b in zip(names, grads[1], grads[threads]):
            assert torch.equal(a, b), f"{name}, 1 against {threads} threads: max |diff| {(a - b).abs().max().item()}"


# ---- oracle: visibility bands ------------------------------------------------------------------
# The ops' band (query i sees key j iff i + lo <= j <= i + hi, then the mask) straight through the
# compiled ops, against a float64 softmax whose visible set is built here from the definition
# (not from fused_attn's own band helpers). Unbounded ends are +-2^62, as the callers pass them.

U = 1 << 62


class _RawBandAttention(torch.autograd.Function):
    """(out, lse) of fused_attn_C::attention_fwd with its backward: the compiled ops alone."""

    @staticmethod
    def forward(ctx, q, k, v, mask, lo, hi, dropout_p, scale, seed, offset, softcap=0.0, alibi=None,
                bottom_right=False):
        mask4 = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, mask4, lo, hi, dropout_p, scale, seed, offset,
                                                        softcap, alibi, bottom_right)
        ctx.save_for_backward(q, k, v, out, lse, mask, alibi)
        ctx.options = (lo, hi, dropout_p, scale, seed, offset)
        ctx.softcap, ctx.bottom_right = softcap, bottom_right
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, mask, alibi = ctx.saved_tensors
        mask4 = None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        mask_grad = bool(ctx.needs_input_grad[3])
        dq, dk, dv, dmask = torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, mask4, *ctx.options,
                                                                 mask_grad, ctx.softcap, alibi, ctx.bottom_right)
        return dq, dk, dv, dmask.sum_to_size(mask.shape) if mask_grad else None, *([None] * 9)


def _band_reference(lo, hi, dropout_p, scale, rng, softcap=0.0, alibi=None, bottom_right=False):
    """(out, lse) of softmax attention with keep = (j - i >= lo) & (j - i <= hi) & mask; dead rows zero.
    softcap > 0: the logits are softcap * tanh(scale q.k / softcap) before the mask and the band.
    alibi: (B, Hq) slopes, ref.alibi_bias (-slope |j - i - shift|, shift = Lk - Lq if bottom_right)
    added to the capped logits."""
    extra = dict(alibi_slopes=alibi, alignment="bottom_right" if bottom_right else "top_left")

    def reference(q, k, v, mask=None):
        keep = ref.visible_keys(q.shape[2], k.shape[2], band=(lo, hi))
        if mask is None:
            mask = keep
        elif mask.dtype == torch.bool:
            mask = mask & keep
        else:  # additive: -inf outside the band; the gradient of mask passes through the sum
            mask = mask + torch.zeros(keep.shape, dtype=mask.dtype).masked_fill(~keep, float("-inf"))
        out = ref.attention(q, k, v, mask, False, dropout_p, scale, rng if dropout_p > 0 else None, softcap=softcap,
                            **extra)
        return out, ref.attention_lse(q.detach(), k.detach(), mask.detach(), False, scale, softcap=softcap, **extra)
    return reference


def _check_band(dtype, B, Hq, Hkv, Lq, Lk, D, band, mask=None, dropout_p=0.0, seed=0, softcap=0.0, q_scale=1.0,
                alibi=None, bottom_right=False):
    lo, hi = band
    if isinstance(alibi, str):  # "head" or "batch" (_alibi_slopes)
        alibi = _alibi_slopes(B, Hq, alibi, seed)
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), dtype=dtype, seed=seed)
    if q_scale != 1.0:  # bigger logits (a power of two: exact in every dtype)
        q = (q.detach() * q_scale).requires_grad_()
    if isinstance(mask, str):  # "bool" or "additive" (requires grad), as (B, 1, Lq, Lk) and (1, Hq, 1, Lk)
        gen = torch.Generator().manual_seed(seed + 17)
        mask = (torch.rand(B, 1, Lq, Lk, generator=gen) > 0.25) if mask == "bool" else \
            make_inputs((1, Hq, 1, Lk), dtype=dtype, seed=seed + 17)[0]
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    scale, rng = 0.3, (4321 + seed, 77)

    def fused(q, k, v, mask=None):
        return _RawBandAttention.apply(q, k, v, mask, lo, hi, dropout_p, scale, *rng, softcap, alibi, bottom_right)
    results = check_against_reference(fused, _band_reference(lo, hi, dropout_p, scale, rng, softcap, alibi,
                                                             bottom_right), inputs,
                                      names=["q", "k", "v", "mask"][:len(inputs)])
    names = {r.name for r in results}
    assert {"output0", "output1", "grad of q", "grad of k", "grad of v"} <= names
    assert (mask is None or not mask.requires_grad) or "grad of mask" in names
    return results


def _bands(Lq, Lk):
    """Named bands for a (Lq, Lk) problem: windows, bottom-right alignment, dead rows."""
    br = Lk - Lq  # the bottom-right diagonal
    return {
        "none": (-U, U),
        "causal": (-U, 0),
        "window": (-7, 0),                 # causal sliding window of 8 keys
        "window_right": (-5, 2),           # a window with keys right of the diagonal
        "bottom_right": (-U, br),          # bottom-right causal: rows i < Lq - Lk dead when Lq > Lk
        "bottom_right_window": (br - 3, br),
        "above": (4, 10),                  # keys strictly after the query
        "dead_start": (-U, -20),           # rows i < 20 see nothing
        "dead_end": (Lk - 40, U),          # rows i > 39 see nothing (when Lq > 40)
        "empty": (6, 2),                   # lo > hi: every row dead
        "huge": (-U, U - 1),
    }


# (B, Hq, Hkv, Lq, Lk, D): odd sizes, GQA; 130 x 300 spans two forward key tiles (256) and
# query tiles (96 or 128), several backward tiles (64 x 128); B * Hkv = 1 runs the backward's
# two-pass schedule on 2 threads, 2 the per-head one.
_BAND_SHAPES = {
    "1x1": (1, 2, 1, 1, 1, 40),
    "17x17": (1, 2, 2, 17, 17, 59),
    "97x61": (2, 4, 1, 97, 61, 64),
    "61x97": (1, 3, 1, 61, 97, 40),
    "17x97": (1, 2, 1, 17, 97, 40),
    "130x300": (1, 4, 2, 130, 300, 64),
    "300x130": (1, 2, 1, 300, 130, 59),
}
_BAND_CASES = [
    # (shape, band, mask, dropout_p)
    ("1x1", "causal", None, 0.0),
    ("17x17", "window", "bool", 0.0),
    ("17x17", "empty", "additive", 0.0),
    ("97x61", "bottom_right", "additive", 0.0),
    ("97x61", "above", "bool", 0.3),
    ("61x97", "bottom_right_window", None, 0.3),
    ("61x97", "dead_start", "bool", 0.0),
    ("130x300", "window_right", "additive", 0.2),
    ("130x300", "bottom_right", "bool", 0.0),
    ("130x300", "dead_end", None, 0.0),
    ("300x130", "window", None, 0.0),
    ("300x130", "huge", "additive", 0.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,band,mask,dropout_p", _BAND_CASES,
                         ids=[f"{s}-{b}-{m}-p{p}" for s, b, m, p in _BAND_CASES])
def test_band_matches_reference(dtype, shape, band, mask, dropout_p):
    B, Hq, Hkv, Lq, Lk, D = _BAND_SHAPES[shape]
    _check_band(dtype, B, Hq, Hkv, Lq, Lk, D, _bands(Lq, Lk)[band], mask=mask, dropout_p=dropout_p)


_BAND_GEMM_CASES = {
    "window_right_mask_dropout": ("130x300", "window_right", "additive", 0.2),
    "bottom_right_window": ("300x130", "bottom_right_window", "bool", 0.0),
    "dead_start_and_end": ("130x300", "dead_start", None, 0.0),
    "long_window": (None, (-150, 40), "bool", 0.0),
}


@pytest.mark.parametrize("mode", ["tiles", "blas"])  # ("aten" differs from "blas" only in the BLAS entry point)
@pytest.mark.parametrize("case", sorted(_BAND_GEMM_CASES))
def test_band_gemm_modes_meet_the_oracle(monkeypatch, mode, case):
    """Both ways to run the tile products (and both backward schedules: B * Hkv = 1 and 2) on banded tiles."""
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
    shape, band, mask, p = _BAND_GEMM_CASES[case]
    if shape is None:  # a window over many key tiles: whole key blocks before and after it skipped
        B, Hq, Hkv, Lq, Lk, D = 1, 1, 1, 600, 800, 16
    else:
        B, Hq, Hkv, Lq, Lk, D = _BAND_SHAPES[shape]
        band = _bands(Lq, Lk)[band]
    _check_band(torch.float32, B, Hq, Hkv, Lq, Lk, D, band, mask=mask, dropout_p=p)


@pytest.mark.parametrize("left", [1, 65])
def test_two_pass_backward_reaches_the_last_query_of_a_key_block(left):
    """The two-pass backward's dK/dV pass runs, for each key block, the query blocks holding the rows
    that see it. With a causal window (left, 0) the last row to see key block [0, 128) is 127 + left:
    128 or 192, the first row of a 64-row query block. Leaving that block out (an end one short)
    lost its contribution to dK and dV at key 127 (an error of O(0.1-1)), which no other band hits.
    B * Hkv = 1 on 2 threads: the two-pass schedule; blocks 64 x 128, the default."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check_band(torch.float64, 1, 1, 1, 200, 200, 32, (-left, 0))
    finally:
        torch.set_num_threads(old)


# ---- oracle: logit soft-capping ----------------------------------------------------------------
# softcap > 0: the logits are softcap * tanh(scale q.k / softcap), then the mask and the band,
# through the compiled ops against fused_attn.reference's (float64, _band_reference). q is scaled by
# 4 so that |scale q.k| (std ~ 0.3 * 4 * sqrt(D), about 8-10) passes a cap of 5 on most pairs and
# bends tanh well away from linear under a cap of 30.

_SOFTCAP_CASES = [
    # (shape, band, mask, dropout_p, softcap)
    ("1x1", "none", None, 0.0, 5.0),
    ("17x97", "causal", "additive", 0.0, 5.0),
    ("17x97", "window", "bool", 0.2, 30.0),
    ("97x61", "bottom_right", "additive", 0.0, 30.0),   # dead rows (Lq > Lk), GQA 4:1, per-head schedule
    ("97x61", "none", "bool", 0.3, 5.0),
    ("130x300", "window_right", "additive", 0.2, 5.0),  # GQA 2:1, several tiles both ways
    ("130x300", "causal", None, 0.0, 30.0),
    ("130x300", "none", "bool", 0.0, 5.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,band,mask,dropout_p,softcap", _SOFTCAP_CASES,
                         ids=[f"{s}-{b}-{m}-p{p}-cap{c:g}" for s, b, m, p, c in _SOFTCAP_CASES])
def test_softcap_matches_reference(dtype, shape, band, mask, dropout_p, softcap):
    """out, lse, dq, dk, dv (and dmask for the additive masks) with the logit cap biting."""
    B, Hq, Hkv, Lq, Lk, D = _BAND_SHAPES[shape]
    results = _check_band(dtype, B, Hq, Hkv, Lq, Lk, D, _bands(Lq, Lk)[band], mask=mask, dropout_p=dropout_p,
                          softcap=softcap, q_scale=4.0)
    assert mask != "additive" or "grad of mask" in {r.name for r in results}


@pytest.mark.parametrize("mode", ["tiles", "blas"])
@pytest.mark.parametrize("threads", [1, 2])
def test_softcap_gemm_modes_and_schedules(monkeypatch, mode, threads):
    """Both ways to run the tile products and both backward schedules (B * Hkv = 1: per kv head on
    one thread, two passes on two) with the cap, a window, an additive mask and dropout."""
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_band(torch.float32, 1, 4, 1, 130, 300, 48, (-40, 70), mask="additive", dropout_p=0.2, softcap=5.0,
                    q_scale=4.0)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("band", [NO_BAND, CAUSAL_BAND], ids=["none", "causal"])
def test_softcap_gradcheck(band):
    """float64 gradcheck of the capped op (q, k, v and an additive mask), GQA 2:1."""
    gen = torch.Generator().manual_seed(5)

    def t(*shape):
        return (3 * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()
    q, k, v, mask = t(1, 2, 6, 4), t(1, 1, 7, 4), t(1, 1, 7, 4), t(1, 2, 6, 7)

    def fn(q, k, v, mask):
        return _RawBandAttention.apply(q, k, v, mask, *band, 0.0, 0.9, 0, 0, 1.5)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


@pytest.mark.parametrize("mode", ["tiles", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_softcap_zero_is_bitwise_off(monkeypatch, mode, dtype):
    """softcap = 0 is the op without the argument, bit for bit, forward and backward."""
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
    q, k, v, dout = make_inputs((2, 4, 70, 40), (2, 2, 90, 40), (2, 2, 90, 40), (2, 4, 70, 40), dtype=dtype, seed=6,
                                requires_grad=False)
    mask = make_inputs((2, 4, 70, 90), dtype=dtype, seed=7, requires_grad=False)[0]
    opts = (mask, -30, 5, 0.2, 0.3, 11, 3)
    fwd, bwd = torch.ops.fused_attn_C.attention_fwd, torch.ops.fused_attn_C.attention_bwd
    out, lse = fwd(q, k, v, *opts)
    out0, lse0 = fwd(q, k, v, *opts, 0.0)
    assert torch.equal(out, out0) and torch.equal(lse, lse0)
    grads = bwd(dout, q, k, v, out, lse, *opts, True)
    grads0 = bwd(dout, q, k, v, out, lse, *opts, True, 0.0)
    for name, a, b in zip(["dq", "dk", "dv", "dmask"], grads, grads0):
        assert torch.equal(a, b), name
    capped, _ = fwd(q, k, v, *opts, 1.0)
    assert not torch.equal(out, capped)  # (the argument does reach the kernel)


@pytest.mark.parametrize("softcap", [1.0, 30.0])
def test_softcap_tanh_accuracy(softcap):
    """One key: lse is the capped logit itself, softcap * tanh(x / softcap), over a range of x
    (both branches of the vectorised tanh and its edges), +-inf to +-softcap, NaN to NaN."""
    x = torch.cat([torch.linspace(-12, 12, 20001) * softcap,
                   torch.tensor([0.0, 1e-30, -1e-20, 0.625 * softcap, 9 * softcap, 1e30, -1e30])])
    q = torch.cat([x, torch.tensor([float("inf"), -float("inf"), float("nan")])]).view(1, 1, -1, 1)
    one = torch.ones(1, 1, 1, 1)
    _, lse = torch.ops.fused_attn_C.attention_fwd(q, one, one, None, *NO_BAND, 0.0, 1.0, 0, 0, softcap)
    lse = lse.view(-1).double()
    expect = softcap * torch.tanh(x.double() / softcap)
    torch.testing.assert_close(lse[:len(x)], expect, rtol=4e-7, atol=0)
    assert lse[-3].item() == softcap and lse[-2].item() == -softcap and math.isnan(lse[-1].item())


def test_softcap_nan_stays_in_its_row():
    q, k, v = make_inputs((1, 2, 20, 16), (1, 2, 30, 16), (1, 2, 30, 16), requires_grad=False)
    q[0, 1, 3, 5] = float("nan")
    for mode_band in (NO_BAND, CAUSAL_BAND):
        out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *mode_band, 0.0, 0.25, 0, 0, 5.0)
        assert out[0, 1, 3].isnan().all() and lse[0, 1, 3].isnan()
        rest = torch.ones(out.shape[:3], dtype=torch.bool)
        rest[0, 1, 3] = False
        assert torch.isfinite(out[rest]).all() and torch.isfinite(lse[rest]).all()


@pytest.mark.parametrize("softcap", [-1.0, -1e-30, float("nan"), float("inf"), -float("inf")])
def test_bad_softcap_raises(softcap):
    q, k, v = _good()
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match="softcap"):
        torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.5, 0, 0, softcap)
    with pytest.raises(RuntimeError, match="softcap"):
        torch.ops.fused_attn_C.attention_bwd(torch.randn_like(out), q, k, v, out, lse, None, *NO_BAND, 0.0, 0.5, 0, 0,
                                             False, softcap)


# ---- oracle: ALiBi ------------------------------------------------------------------------------
# alibi_slopes: the logit of query i and key j gains -slope[b, h] * |j - i - shift| (shift = Lk - Lq
# when bottom-right, else 0) after the cap, where the mask is added; through the compiled ops
# against fused_attn.reference's (float64, _band_reference). The slopes bite: the paper's x 4 (a
# stride-0 expand of (Hq,), as fused_attn.functional passes them) or per-(batch, head) ones in
# [-0.1, 0.5) stored transposed (strides (1, B)); negative slopes reward distance, so a wrong sign,
# a missing absolute value, a wrong shift or a wrong (batch, head) slope fails by far.

def _alibi_slopes(B, Hq, kind, seed=0):
    """float32 (B, Hq) slopes: "head", the paper's x 4 expanded (stride 0 along B); "batch", random
    per (batch, head), a transposed (non-contiguous) view."""
    if kind == "head":
        return (fused_attn.get_alibi_slopes(Hq) * 4).expand(B, Hq)
    gen = torch.Generator().manual_seed(100 + seed)
    return (torch.rand(Hq, B, generator=gen) * 0.6 - 0.1).t()


_ALIBI_CASES = [
    # (shape, band, mask, dropout_p, softcap, slopes, bottom_right)
    ("1x1", "none", None, 0.0, 0.0, "head", False),
    ("17x17", "causal", "bool", 0.0, 0.0, "batch", False),
    ("17x97", "none", "additive", 0.0, 0.0, "batch", True),       # bottom-right cross attention, dmask
    ("17x97", "bottom_right", None, 0.2, 0.0, "head", True),       # causal bottom-right, dropout
    ("97x61", "bottom_right", "additive", 0.0, 5.0, "batch", True),  # dead rows (Lq > Lk), cap, per-head sched.
    ("97x61", "none", None, 0.0, 0.0, "head", False),              # top-left, Lq > Lk
    ("61x97", "bottom_right_window", "bool", 0.3, 0.0, "batch", True),
    ("130x300", "window_right", "additive", 0.2, 5.0, "batch", False),  # several tiles both ways, GQA 2:1
    ("130x300", "none", None, 0.0, 0.0, "head", True),
    ("300x130", "causal", "bool", 0.0, 0.0, "batch", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,band,mask,dropout_p,softcap,slopes,bottom_right", _ALIBI_CASES,
                         ids=[f"{s}-{b}-{m}-p{p}-cap{c:g}-{a}-{'br' if br else 'tl'}"
                              for s, b, m, p, c, a, br in _ALIBI_CASES])
def test_alibi_matches_reference(dtype, shape, band, mask, dropout_p, softcap, slopes, bottom_right):
    """out, lse (with the bias), dq, dk, dv (and dmask for the additive masks) with ALiBi."""
    B, Hq, Hkv, Lq, Lk, D = _BAND_SHAPES[shape]
    results = _check_band(dtype, B, Hq, Hkv, Lq, Lk, D, _bands(Lq, Lk)[band], mask=mask, dropout_p=dropout_p,
                          softcap=softcap, q_scale=4.0 if softcap else 1.0, alibi=slopes, bottom_right=bottom_right)
    assert mask != "additive" or "grad of mask" in {r.name for r in results}


@pytest.mark.parametrize("mode", ["tiles", "blas"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bottom_right", [False, True], ids=["tl", "br"])
def test_alibi_gemm_modes_and_schedules(monkeypatch, mode, threads, bottom_right):
    """Both ways to run the tile products and both backward schedules (B * Hkv = 1: per kv head on
    one thread, two passes on two) with ALiBi, the cap, a window, an additive mask and dropout."""
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_band(torch.float32, 1, 4, 1, 130, 300, 48, (-40, 200), mask="additive", dropout_p=0.2, softcap=5.0,
                    q_scale=4.0, alibi="batch", bottom_right=bottom_right)
        _check_band(torch.float64, 1, 4, 1, 130, 300, 48, (-U, U), alibi="head", bottom_right=bottom_right)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("mode", ["tiles", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("bottom_right", [False, True], ids=["tl", "br"])
def test_alibi_is_the_additive_bias(monkeypatch, mode, dtype, bottom_right):
    """ALiBi gives what its bias (ref.alibi_bias, an (B, Hq, Lq, Lk) tensor) added to the additive
    mask gives: out, lse, dq, dk, dv and dmask, to rounding; zero slopes give the op without them,
    bit for bit (the bias path leaves nothing else changed)."""
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
    B, Hq, Lq, Lk = 2, 4, 70, 150
    q, k, v, dout = make_inputs((B, Hq, Lq, 40), (B, 2, Lk, 40), (B, 2, Lk, 40), (B, Hq, Lq, 40), dtype=dtype, seed=6,
                                requires_grad=False)
    mask = make_inputs((B, Hq, Lq, Lk), dtype=dtype, seed=7, requires_grad=False)[0]
    slopes = _alibi_slopes(B, Hq, "batch", seed=2)
    bias = ref.alibi_bias(slopes, Lq, Lk, "bottom_right" if bottom_right else "top_left", torch.float64)
    biased_mask = (mask.double() + bias).to(dtype)
    opts = (-50, 30, 0.2, 0.3, 11, 3)
    fwd, bwd = torch.ops.fused_attn_C.attention_fwd, torch.ops.fused_attn_C.attention_bwd
    out, lse = fwd(q, k, v, mask, *opts, 0.0, slopes, bottom_right)
    grads = bwd(dout, q, k, v, out, lse, mask, *opts, True, 0.0, slopes, bottom_right)
    out_m, lse_m = fwd(q, k, v, biased_mask, *opts)
    grads_m = bwd(dout, q, k, v, out_m, lse_m, biased_mask, *opts, True)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dmask"], (out, lse, *grads), (out_m, lse_m, *grads_m)):
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, msg=name)
    zero = torch.zeros(Hq).expand(B, Hq)
    out0, lse0 = fwd(q, k, v, mask, *opts, 0.0, zero, bottom_right)
    plain_out, plain_lse = fwd(q, k, v, mask, *opts)
    assert torch.equal(out0, plain_out) and torch.equal(lse0, plain_lse)
    grads0 = bwd(dout, q, k, v, out0, lse0, mask, *opts, True, 0.0, zero, bottom_right)
    plain = bwd(dout, q, k, v, plain_out, plain_lse, mask, *opts, True)
    for name, a, b in zip(["dq", "dk", "dv", "dmask"], grads0, plain):
        assert torch.equal(a, b), name


def test_alibi_decode_step_and_long_distances():
    """One query against 5000 keys (bottom-right: it sits at the last key; top-left: at key 0), and
    a row whose keys all lie far from its diagonal: the lse is the biased logits' exactly."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, L, 16, generator=gen) for L in (1, 5000, 5000))
    slopes = torch.tensor([[0.01, -0.002]])
    for bottom_right in (False, True):
        out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.25, 0, 0, 0.0, slopes,
                                                        bottom_right)
        align = "bottom_right" if bottom_right else "top_left"
        ref_lse = ref.attention_lse(q.double(), k.double(), None, False, 0.25, alignment=align,
                                    alibi_slopes=slopes.double())
        ref_out = ref.attention(q.double(), k.double(), v.double(), None, False, 0.0, 0.25, alignment=align,
                                alibi_slopes=slopes.double())
        torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["shape_hq", "shape_b", "rank_1", "rank_3", "float64", "float16", "int32", "bool"])
def test_bad_alibi_raises(case):
    """A malformed alibi_slopes passed to the ops directly raises, naming the argument."""
    q, k, v = _good()  # B = 1, Hq = 2
    slopes = {"shape_hq": torch.ones(1, 3), "shape_b": torch.ones(2, 2), "rank_1": torch.ones(2),
              "rank_3": torch.ones(1, 2, 1), "float64": torch.ones(1, 2, dtype=torch.float64),
              "float16": torch.ones(1, 2, dtype=torch.float16), "int32": torch.ones(1, 2, dtype=torch.int32),
              "bool": torch.ones(1, 2, dtype=torch.bool)}[case]
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.5, 0, 0)
    with pytest.raises(RuntimeError, match="alibi_slopes must"):
        torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.5, 0, 0, 0.0, slopes)
    with pytest.raises(RuntimeError, match="alibi_slopes must"):
        torch.ops.fused_attn_C.attention_bwd(torch.randn_like(out), q, k, v, out, lse, None, *NO_BAND, 0.0, 0.5, 0, 0,
                                             False, 0.0, slopes, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_band_ends_are_clamped(dtype):
    """Any ends past [-Lq, Lk] are the same band, bit for bit: +-2^62, int64's limits, the edges."""
    q, k, v, dout = make_inputs((1, 2, 37, 24), (1, 2, 53, 24), (1, 2, 53, 24), (1, 2, 37, 24), dtype=dtype,
                                requires_grad=False)
    i64 = torch.iinfo(torch.int64)
    for same in ([NO_BAND, (-37, 53), (i64.min, i64.max), (-38, 54)],
                 [CAUSAL_BAND, (-37, 0), (i64.min, 0)],
                 [(6, 2), (U, -U), (i64.max, i64.min), (53, -37), (100, 80)]):
        results = []
        for lo, hi in same:
            out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, None, lo, hi, 0.0, 0.2, 0, 0)
            grads = torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, None, lo, hi, 0.0, 0.2, 0, 0, False)
            results.append((out, lse, *grads[:3]))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("band", [(6, 2), (-U, -40), (40, U), (U, U), (-U, -U)],
                         ids=["lo_gt_hi", "all_below", "all_above", "right_of_keys", "left_of_keys"])
def test_band_with_no_visible_key(dtype, band):
    """Rows the band leaves without a key: zero output, lse = +inf, zero gradients, never NaN."""
    q, k, v, dout = make_inputs((1, 2, 39, 16), (1, 2, 35, 16), (1, 2, 35, 16), (1, 2, 39, 16), dtype=dtype,
                                requires_grad=False)
    mask = make_inputs((1, 2, 39, 35), dtype=dtype, seed=3, requires_grad=False)[0]
    lo, hi = band
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, mask, lo, hi, 0.1, 0.25, 5, 6)
    dq, dk, dv, dmask = torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, mask, lo, hi, 0.1, 0.25, 5, 6,
                                                             True)
    assert not ref.visible_keys(39, 35, band=(lo, hi)).any()  # (the premise: no query sees any key)
    assert torch.all(out == 0) and torch.all(lse == float("inf"))
    for g in (dq, dk, dv, dmask):
        assert torch.all(g == 0)


# ---- oracle: strides and layouts --------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_inputs(dtype):
    """q as a transposed view of (B, L, H, D), k non-unit stride along D, v broadcast (stride 0)."""
    B, H, L, D = 2, 3, 45, 32
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, L, H, D, generator=gen).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(B, H, D, L, generator=gen).to(dtype).transpose(2, 3).requires_grad_()
    v = torch.randn(1, 1, L, D, generator=gen).to(dtype).expand(B, H, L, D)
    fused, reference = _attention(causal=True)
    out = fused(q, k, v)
    assert out.shape == (B, H, L, D)
    assert out.transpose(1, 2).is_contiguous(), "out must be stored as a contiguous (B, Lq, Hq, Dv)"
    out.sum().backward()
    expect = reference(q.double(), k.double(), v.double())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), expect, atol=tol, rtol=tol)
    q2, k2 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    reference(q2, k2, v.double()).sum().backward()
    torch.testing.assert_close(q.grad.double(), q2.grad, atol=tol * 5, rtol=tol * 5)
    torch.testing.assert_close(k.grad.double(), k2.grad, atol=tol * 5, rtol=tol * 5)


def test_output_layouts():
    q, k, v = make_inputs((2, 4, 9, 8), (2, 2, 11, 8), (2, 2, 11, 6), requires_grad=False)
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.3, 0, 0)
    assert out.shape == (2, 4, 9, 6) and out.transpose(1, 2).is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 9) and lse.is_contiguous()
    torch.testing.assert_close(lse, ref.attention_lse(q, k, None, False, 0.3))
    dout = torch.randn_like(out)
    dq, dk, dv, dmask = torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, None, *NO_BAND, 0.0, 0.3, 0, 0,
                                                             False)
    assert dq.is_contiguous() and dk.is_contiguous() and dv.is_contiguous() and dmask.numel() == 0
    assert dk.shape == k.shape and dv.shape == v.shape


# ---- oracle: masks ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 50, 61), (1, 1, 50, 61), (2, 1, 1, 61), (50, 61), (61,), (1, 3, 50, 1)])
def test_bool_mask(dtype, shape):
    gen = torch.Generator().manual_seed(11)
    mask = torch.rand(shape, generator=gen) > 0.4
    _check(dtype, 2, 3, 3, 50, 61, 32, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 50, 61), (1, 3, 1, 61), (50, 1), (2, 1, 50, 61)])
@pytest.mark.parametrize("causal", [False, True])
def test_additive_mask_with_grad(dtype, shape, causal):
    mask = make_inputs(shape, dtype=dtype, seed=7)[0]
    results = _check(dtype, 2, 3, 1, 50, 61, 32, causal=causal, mask=mask)
    assert any(r.name == "grad of mask" for r in results)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_additive_mask_with_neg_inf(dtype):
    mask = torch.zeros(1, 1, 40, 52, dtype=dtype)
    mask[..., 30:] = float("-inf")
    mask[..., 5, :] = float("-inf")  # a fully masked row
    _check(dtype, 1, 2, 2, 40, 52, 16, mask=mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(dtype):
    """Rows with no key left give zero output, +inf lse and zero gradients (never NaN)."""
    B, H, Lq, Lk, D = 1, 2, 20, 30, 16
    mask = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    mask[:, :, 3] = False
    mask[:, 1, 10:15] = False
    _check(dtype, B, H, H, Lq, Lk, D, mask=mask)
    q, k, v = make_inputs((B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D), dtype=dtype)
    out = fused_attn.functional.attention(q, k, v, attn_mask=mask, backend="cpu")
    out.sum().backward()
    assert torch.all(out[:, :, 3] == 0) and torch.all(q.grad[:, :, 3] == 0)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    _, lse = torch.ops.fused_attn_C.attention_fwd(q.detach(), k.detach(), v.detach(), mask, *NO_BAND, 0.0, 0.25, 0, 0)
    assert torch.all(lse[:, :, 3] == float("inf")) and torch.all(lse[:, 1, 10:15] == float("inf"))
    assert torch.isfinite(lse[:, 0, 4:]).all()


def test_causal_with_more_queries_than_keys():
    # top-left causal with Lq > Lk: rows i >= Lk see every key; with a mask killing key 0, row 0 is empty
    mask = torch.ones(1, 1, 1, 20, dtype=torch.bool)
    mask[..., 0] = False
    _check(torch.float32, 1, 2, 2, 45, 20, 16, causal=True, mask=mask)


# ---- dropout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_matches_reference(dtype, causal):
    _check(dtype, 2, 4, 2, 67, 75, 32, causal=causal, dropout_p=0.3, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_mask_is_the_shared_hash(dtype):
    """With v = identity, out * (1 - p) * rowsum is the keep mask times P: compare it bit for bit."""
    B, H, L, p = 2, 3, 40, 0.25
    seed, offset = 987654321987, 5000
    q, k = make_inputs((B, H, L, 8), (B, H, L, 8), dtype=dtype, requires_grad=False)
    v = torch.eye(L, dtype=dtype).expand(B, H, L, L)
    out, _ = torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, p, 0.5, seed, offset)
    kept = out != 0
    expect = fused_attn.testing.reconstruct_dropout_mask(seed, offset, p, B * H * L, L).reshape(B, H, L, L)
    assert torch.equal(kept, expect)
    rate = 1 - kept.double().mean().item()
    assert abs(rate - p) < 0.05


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dropout_same_rng_same_result(dtype):
    q, k, v = make_inputs((1, 2, 30, 16), (1, 2, 30, 16), (1, 2, 30, 16), dtype=dtype, requires_grad=False)
    a = torch.ops.fused_attn.attention_fwd(q, k, v, None, *NO_BAND, 0.5, 0.25, torch.tensor([3, 4]), "cpu")[0]
    b = torch.ops.fused_attn.attention_fwd(q, k, v, None, *NO_BAND, 0.5, 0.25, torch.tensor([3, 4]), "cpu")[0]
    c = torch.ops.fused_attn.attention_fwd(q, k, v, None, *NO_BAND, 0.5, 0.25, torch.tensor([3, 5]), "cpu")[0]
    r = torch.ops.fused_attn.attention_fwd(q, k, v, None, *NO_BAND, 0.5, 0.25, torch.tensor([3, 4]), "reference")[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.testing.assert_close(a, r)


# ---- empty sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("B,H,Lq,Lk", [(1, 2, 0, 5), (1, 2, 5, 0), (0, 2, 5, 5), (1, 2, 0, 0)])
def test_empty(B, H, Lq, Lk):
    q, k, v = make_inputs((B, H, Lq, 8), (B, H, Lk, 8), (B, H, Lk, 8))
    out = fused_attn.functional.attention(q, k, v, backend="cpu")
    assert out.shape == (B, H, Lq, 8) and torch.all(out == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and torch.all(t.grad == 0)
    _, lse = torch.ops.fused_attn_C.attention_fwd(q.detach(), k.detach(), v.detach(), None, *NO_BAND, 0.0, 1.0, 0, 0)
    assert lse.shape == (B, H, Lq) and torch.all(lse == float("inf"))


# ---- gradcheck (float64) ----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "causal_gqa", "additive_mask", "bool_mask", "dropout", "dv_differs",
                                  "alibi"])
def test_gradcheck(case):
    gen = torch.Generator().manual_seed(2)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)
    B, Hq, Hkv, Lq, Lk, D, Dv = 1, 2, 2, 5, 7, 4, 4
    causal, mask, p = False, None, 0.0
    if case == "causal_gqa":
        Hq, Hkv, Lq, Lk, causal = 4, 2, 7, 5, True
    elif case == "additive_mask":
        mask = t(1, Hq, Lq, 1)
        causal = True
    elif case == "bool_mask":
        mask = torch.rand(B, 1, Lq, Lk, generator=gen) > 0.3
        mask[..., 0, :] = False
    elif case == "dropout":
        p = 0.3
    elif case == "dv_differs":
        Dv = 3
    slopes, bottom_right = None, False
    if case == "alibi":  # bottom-right causal, GQA, an additive mask; one negative slope
        Hq, Hkv, causal, bottom_right = 4, 2, True, True
        mask = t(1, Hq, Lq, 1)
        slopes = torch.tensor([0.5, -0.25, 1.0, 0.125]).expand(B, Hq)
    q, k, v = t(B, Hq, Lq, D), t(B, Hkv, Lk, D), t(B, Hkv, Lk, Dv)
    rng = torch.tensor([77, 3])

    def fn(q, k, v, mask):
        band = ((-U, Lk - Lq) if bottom_right else CAUSAL_BAND) if causal else NO_BAND
        return AttentionFunction.apply(q, k, v, mask, *band, p, 0.5, rng if p > 0 else None, "cpu", 0.0, slopes,
                                       bottom_right, False)[0]  # (out, lse)
    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


def test_float64_matches_reference_tightly():
    """The float64 backward recomputes the log-sum-exp in float64, so it meets the tight float64 floor."""
    mask = make_inputs((1, 2, 1, 40), dtype=torch.float64, seed=3)[0]
    _check(torch.float64, 2, 2, 1, 33, 40, 16, causal=True, mask=mask)


# ---- bad input --------------------------------------------------------------------------------

def _good():
    q, k, v = make_inputs((1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8), requires_grad=False)
    return q, k, v


@pytest.mark.parametrize("case", [
    "q_3d", "k_dtype", "int_dtype", "batch", "head_dim", "heads_not_multiple", "kv_len", "mask_shape", "mask_dtype",
    "mask_3d", "dropout_p", "scale_nan",
])
def test_forward_bad_input_raises(case):
    q, k, v = _good()
    mask, p, scale = None, 0.0, 0.5
    if case == "q_3d":
        q = q[0]
    elif case == "k_dtype":
        k = k.double()
    elif case == "int_dtype":
        q, k, v = q.int(), k.int(), v.int()
    elif case == "batch":
        k, v = k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)
    elif case == "head_dim":
        k = k[..., :4]
    elif case == "heads_not_multiple":
        q = torch.randn(1, 3, 5, 8)
    elif case == "kv_len":
        v = v[:, :, :4]
    elif case == "mask_shape":
        mask = torch.ones(1, 2, 5, 5, dtype=torch.bool)
    elif case == "mask_dtype":
        mask = torch.ones(1, 2, 5, 6, dtype=torch.float64)
    elif case == "mask_3d":
        mask = torch.ones(2, 5, 6, dtype=torch.bool)
    elif case == "dropout_p":
        p = 1.0
    elif case == "scale_nan":
        scale = float("nan")
    with pytest.raises(RuntimeError):
        torch.ops.fused_attn_C.attention_fwd(q, k, v, mask, *NO_BAND, p, scale, 0, 0)


@pytest.mark.parametrize("case", ["lse_dtype", "lse_shape", "dout_shape", "out_dtype", "mask_grad_bool", "mask_grad_none"])
def test_backward_bad_input_raises(case):
    q, k, v = _good()
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.5, 0, 0)
    dout, mask, mask_grad = torch.randn_like(out), None, False
    if case == "lse_dtype":
        lse = lse.double()
    elif case == "lse_shape":
        lse = lse[..., :3]
    elif case == "dout_shape":
        dout = dout[..., :4]
    elif case == "out_dtype":
        out = out.double()
    elif case == "mask_grad_bool":
        mask, mask_grad = torch.ones(1, 2, 5, 6, dtype=torch.bool), True
    elif case == "mask_grad_none":
        mask_grad = True
    with pytest.raises(RuntimeError):
        torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, mask, *NO_BAND, 0.0, 0.5, 0, 0, mask_grad)


def test_inputs_not_modified():
    q, k, v = make_inputs((1, 2, 20, 8), (1, 2, 20, 8), (1, 2, 20, 8))
    mask = make_inputs((1, 2, 20, 20), seed=4)[0]
    copies = [t.detach().clone() for t in (q, k, v, mask)]
    fused_attn.functional.attention(q, k, v, attn_mask=mask, causal=True, backend="cpu").sum().backward()
    for t, c in zip((q, k, v, mask), copies):
        assert torch.equal(t.detach(), c)


# ---- AVX512-BF16 products ------------------------------------------------------------------
# bfloat16 inputs on a CPU with AVX512-BF16: the forward's two products and the backward's five
# run as vdpbf16ps dot products on bf16 pair layouts (csrc/cpu/attention_bf16_dot.h), P rounded
# to bf16 for P V, P_drop^T dO; dS for dS^T Q and dS K. FUSED_ATTN_CPU_BF16_DOT=on forces them
# (auto, the default, takes them wherever the CPU has them), off the float32 panels. Held to the
# oracle over odd shapes (odd head dims: a half pair; key or query counts ending odd: the masked
# half step; Dv != D, GQA) and every option, on both backward schedules (1 thread: per kv head;
# 2 threads: per kv head when B * Hkv is even, else the two passes), to each other, and `off` to
# the float32 computation it was.

_HAS_BF16_DOT = cpu_has_avx512bf16()
_needs_bf16_dot = pytest.mark.skipif(not _HAS_BF16_DOT, reason="the CPU has no AVX512-BF16 (avx512_bf16 in "
                                                                "/proc/cpuinfo): the bf16 dot products cannot run")

_BF16_DOT_CASES = {
    # (B, Hq, Hkv, Lq, Lk, D, Dv, causal, mask, dropout_p)
    "1x1": (1, 2, 1, 1, 1, 40, None, False, None, 0.0),
    "17x17_d59": (2, 2, 2, 17, 17, 59, None, False, None, 0.0),
    "97x97_causal": (1, 2, 2, 97, 97, 40, None, True, None, 0.0),
    "17x97_dv72": (1, 3, 3, 17, 97, 40, 72, False, None, 0.0),
    "97x17_causal_d59_dv40": (1, 2, 1, 97, 17, 59, 40, True, None, 0.0),  # queries past keys: dead rows
    "gqa_4_2": (2, 4, 2, 70, 97, 40, 24, True, None, 0.0),
    "gqa_6_1_bool": (1, 6, 1, 61, 97, 59, None, False, "bool", 0.0),
    "additive_dropout": (1, 2, 2, 97, 300, 40, None, False, "additive", 0.3),  # two key tiles
    "causal_dropout_d59": (1, 2, 1, 130, 301, 59, 17, True, None, 0.2),
}


@pytest.fixture
def _threads(request):
    """torch's thread count for one test (the backward's schedule depends on it), restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


# (grad, threads): the forward alone; forward + backward on 1 thread (every case per kv head) and
# on 2 (B * Hkv odd: the two-pass schedule; "1x1", "17x97_dv72", "97x17_causal_d59_dv40",
# "gqa_6_1_bool", "causal_dropout_d59")
@_needs_bf16_dot
@pytest.mark.parametrize("grad,_threads", [(False, 2), (True, 1), (True, 2)], ids=["fwd", "fwd_bwd_t1", "fwd_bwd_t2"],
                         indirect=["_threads"])
@pytest.mark.parametrize("case", sorted(_BF16_DOT_CASES))
def test_bf16_dot_meets_the_oracle(monkeypatch, case, grad, _threads):
    """fused_attn.functional.attention(backend="cpu") in bfloat16 with the bf16 dot products forced:
    the output alone (fwd), and with the gradients from the bf16 backward (which recomputes P from
    the forward's lse, so a wrong lse would show there too), on both of its schedules. (The pair
    panels pinned: in the automatic mode the shapes with few query rows would read k and v as rows,
    test_bf16_decoding_meets_the_oracle.)"""
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", "on")
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", "tiles")
    B, Hq, Hkv, Lq, Lk, D, Dv, causal, mask, p = _BF16_DOT_CASES[case]
    Dv = D if Dv is None else Dv
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), dtype=torch.bfloat16, seed=3,
                          requires_grad=grad)
    if mask == "bool":
        mask = torch.rand(B, 1, Lq, Lk, generator=torch.Generator().manual_seed(5)) > 0.25
    elif mask == "additive":
        mask = make_inputs((1, Hq, 1, Lk), dtype=torch.bfloat16, seed=6, requires_grad=grad)[0]
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    fused, reference = _attention(causal, p, rng=(77, 5))
    results = check_against_reference(fused, reference, inputs, names=["q", "k", "v", "mask"][:len(inputs)])
    assert len(results) == (1 + len(inputs) - (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool)
                            if grad else 1)


_BF16_DOT_BAND_CASES = [
    # (shape, band, mask, dropout_p, softcap, alibi, bottom_right)
    ("17x17", "window", "bool", 0.0, 0.0, None, False),
    ("97x61", "bottom_right", "additive", 0.0, 0.0, None, False),   # dead rows, GQA 4:1
    ("61x97", "bottom_right_window", None, 0.3, 0.0, None, False),
    ("17x97", "causal", "additive", 0.0, 5.0, None, False),         # softcap
    ("130x300", "window_right", "additive", 0.2, 5.0, None, False), # several tiles, cut ones
    ("130x300", "dead_end", None, 0.0, 0.0, None, False),
    ("300x130", "causal", "bool", 0.0, 0.0, "batch", False),        # ALiBi
    ("17x97", "bottom_right", None, 0.2, 0.0, "head", True),        # ALiBi bottom-right, dropout
    ("130x300", "none", None, 0.0, 30.0, "head", True),
]


@_needs_bf16_dot
@pytest.mark.parametrize("_threads", [1, 2], ids=["t1", "t2"], indirect=True)
@pytest.mark.parametrize("shape,band,mask,dropout_p,softcap,alibi,bottom_right", _BF16_DOT_BAND_CASES,
                         ids=[f"{s}-{b}-{m}-p{p}-cap{c:g}-{a}-{'br' if br else 'tl'}"
                              for s, b, m, p, c, a, br in _BF16_DOT_BAND_CASES])
def test_bf16_dot_band_options_meet_the_oracle(monkeypatch, shape, band, mask, dropout_p, softcap, alibi,
                                               bottom_right, _threads):
    """Bands (causal, bottom-right, sliding windows, dead rows: the pruned register blocks), masks,
    dropout, the soft-cap and ALiBi through the compiled ops with the bf16 dot products forced: out,
    lse, dq, dk, dv (and dmask), the backward on 1 thread (per kv head) and 2 (two passes where
    B * Hkv = 1: every shape but 97x61, 17x17 and 130x300). (The pair panels pinned, as above.)"""
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", "on")
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", "tiles")
    B, Hq, Hkv, Lq, Lk, D = _BAND_SHAPES[shape]
    _check_band(torch.bfloat16, B, Hq, Hkv, Lq, Lk, D, _bands(Lq, Lk)[band], mask=mask, dropout_p=dropout_p,
                softcap=softcap, q_scale=4.0 if softcap else 1.0, alibi=alibi, bottom_right=bottom_right)


def _bf16_dot_call(monkeypatch, mode, q, k, v, mask, band, dropout_p=0.0):
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", mode)
    return torch.ops.fused_attn_C.attention_fwd(q, k, v, mask, *band, dropout_p, 0.2, 7, 3)


@_needs_bf16_dot
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("band", [NO_BAND, CAUSAL_BAND, (-37, 5)], ids=["none", "causal", "window"])
def test_bf16_dot_on_and_off_agree(monkeypatch, band, layout):
    """on and off give the same out to bf16 rounding of P (not bit for bit: `on` must really take the
    other path) and the same lse to float32 summation order (the scores are exact bf16 products
    either way); `off`, and `auto` too where the CPU has no AVX512-BF16, is bit for bit the float32
    computation on the converted inputs (the float32-panel path as it was). strided: q, k, v with a
    non-unit head-dim stride (q is copied into even-width rows, k and v laid out from strides)."""
    B, Hq, Hkv, Lq, Lk, D, Dv = 2, 4, 2, 131, 301, 59, 40
    q, k, v = make_inputs((B, Hq, D, Lq), (B, Hkv, D, Lk), (B, Hkv, Dv, Lk), dtype=torch.bfloat16, seed=11,
                          requires_grad=False)
    q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
    if layout == "contiguous":
        q, k, v = (t.contiguous() for t in (q, k, v))
    mask = make_inputs((B, 1, Lq, Lk), dtype=torch.bfloat16, seed=12, requires_grad=False)[0].expand(B, Hq, Lq, Lk)
    out_on, lse_on = _bf16_dot_call(monkeypatch, "on", q, k, v, mask, band, 0.1)
    out_off, lse_off = _bf16_dot_call(monkeypatch, "off", q, k, v, mask, band, 0.1)
    assert out_on.shape == out_off.shape and out_on.stride() == out_off.stride()
    assert not torch.equal(out_on, out_off), "FUSED_ATTN_CPU_BF16_DOT=on gave the float32 path's bits"
    torch.testing.assert_close(out_on.float(), out_off.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_on, lse_off, atol=2e-5, rtol=2e-5)
    out_f32, lse_f32 = _bf16_dot_call(monkeypatch, "off", q.float(), k.float(), v.float(), mask.float(), band, 0.1)
    assert torch.equal(out_off, out_f32.bfloat16()) and torch.equal(lse_off, lse_f32)
    out_auto, lse_auto = _bf16_dot_call(monkeypatch, "auto", q, k, v, mask, band, 0.1)
    assert torch.equal(out_auto, out_on) and torch.equal(lse_auto, lse_on)


@_needs_bf16_dot
@pytest.mark.parametrize("gemm", ["auto", "tiles"])
def test_bf16_dot_reads_no_value_past_the_band(monkeypatch, gemm):
    """Query 0 sees keys 0..16 (17: an odd count, so the last pair step of P V is half a pair);
    keys 17.. hold inf in k and v (keys the band hides: their scores are inf or NaN). The float32
    path never reads them, and neither may the bf16 one: a P past the tile's last key must be
    zero, not the raw score, and v's half of the last pair must be masked, or 0 * inf turns the
    whole row into NaN. tiles: the pair panels; auto: one query, k and v read as rows, whose P V
    must run over the visible keys only."""
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", gemm)
    q, k, v = make_inputs((1, 1, 1, 32), (1, 1, 40, 32), (1, 1, 40, 32), dtype=torch.bfloat16, seed=2,
                          requires_grad=False)
    k[0, 0, 17:] = float("inf")
    v[0, 0, 17:] = float("inf")
    for mode in ("on", "off"):
        out, lse = _bf16_dot_call(monkeypatch, mode, q, k, v, None, (-U, 16))
        assert torch.isfinite(out).all() and torch.isfinite(lse).all(), mode
    ref_out = ref.attention(q.double(), k[:, :, :17].double(), v[:, :, :17].double(), None, False, 0.0, 0.2)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)


def _bf16_dot_backward(monkeypatch, mode, dout, q, k, v, out, lse, mask, band, dropout_p=0.0, mask_grad=False,
                       softcap=0.0):
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", mode)
    return torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, mask, *band, dropout_p, 0.2, 7, 3, mask_grad,
                                                softcap)


@_needs_bf16_dot
@pytest.mark.parametrize("_threads", [1, 2], ids=["t1", "t2"], indirect=True)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("band", [NO_BAND, CAUSAL_BAND, (-37, 5)], ids=["none", "causal", "window"])
def test_bf16_dot_backward_on_and_off_agree(monkeypatch, band, layout, _threads):
    """The backward alone (the same out, lse for both), on and off: dq, dk, dv and dmask agree to
    the bf16 rounding of P and dS (not bit for bit: `on` must really take the other path); `off` is
    bit for bit the float32 computation on the converted inputs, and `auto` is `on` here. B * Hkv =
    2 and 1: on 2 threads the per-kv-head schedule and the two passes; strided: q, k, v, dout with a
    non-unit head-dim stride (q and dout copied into even-width rows). Dropout, an additive mask
    (dmask) and the soft-cap on; odd Lq (the half pair of queries in dV, dK) and Lk."""
    for B, Hkv in ((2, 1), (1, 1)):
        Hq, Lq, Lk, D, Dv = 2 * Hkv, 131, 301, 59, 40
        q, k, v = make_inputs((B, Hq, D, Lq), (B, Hkv, D, Lk), (B, Hkv, Dv, Lk), dtype=torch.bfloat16, seed=11,
                              requires_grad=False)
        dout = make_inputs((B, Hq, Dv, Lq), dtype=torch.bfloat16, seed=13, requires_grad=False)[0]
        q, k, v, dout = (t.transpose(-1, -2) for t in (q, k, v, dout))
        if layout == "contiguous":
            q, k, v, dout = (t.contiguous() for t in (q, k, v, dout))
        mask = make_inputs((B, 1, Lq, Lk), dtype=torch.bfloat16, seed=12, requires_grad=False)[0].expand(B, Hq, Lq, Lk)
        monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", "off")
        out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, mask, *band, 0.1, 0.2, 7, 3, 5.0)
        on = _bf16_dot_backward(monkeypatch, "on", dout, q, k, v, out, lse, mask, band, 0.1, True, 5.0)
        off = _bf16_dot_backward(monkeypatch, "off", dout, q, k, v, out, lse, mask, band, 0.1, True, 5.0)
        for name, a, b in zip(("dq", "dk", "dv", "dmask"), on, off):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.bfloat16, name
            assert torch.isfinite(b).all(), name
            if name != "dmask":  # (dmask = dS in float32, the same on both paths up to dP's summation order)
                assert not torch.equal(a, b), f"FUSED_ATTN_CPU_BF16_DOT=on gave the float32 path's {name}"
            scale = b.float().abs().max().item()
            torch.testing.assert_close(a.float(), b.float(), atol=2e-2 * scale, rtol=3e-2, msg=name)
        f32 = _bf16_dot_backward(monkeypatch, "off", dout.float(), q.float(), k.float(), v.float(), out.float(), lse,
                                 mask.float(), band, 0.1, True, 5.0)
        for name, a, b in zip(("dq", "dk", "dv", "dmask"), off, f32):
            assert torch.equal(a, b.bfloat16()), name
        auto = _bf16_dot_backward(monkeypatch, "auto", dout, q, k, v, out, lse, mask, band, 0.1, True, 5.0)
        for name, a, b in zip(("dq", "dk", "dv", "dmask"), auto, on):
            assert torch.equal(a, b), name


@_needs_bf16_dot
@pytest.mark.parametrize("_threads", [1, 2], ids=["t1", "t2"], indirect=True)
def test_bf16_dot_backward_reads_no_value_past_the_band(monkeypatch, _threads):
    """Band (23, U): query i sees keys [i + 23, 40), so queries 0..16 see 17..1 keys and 17..31 none
    (empty rows); keys 16..22 (in the tile: it starts at key 16) no query sees. inf in k and v at
    keys 16..22 and in q and dout at queries 17..31 (their delta = dout . out = inf * 0 is NaN, and
    so their dS row). The float32 products never read them into a finite gradient: dk and dv are
    finite everywhere, dq and out on rows 0..16. Neither may the bf16 ones: dQ's keys of rows 0..5
    start at key 23 (odd: the half pair (22, 23), k masked at key 22), dK's and dV's queries of the
    last keys end at query 16 (the half pair (16, 17): q, dout and the NaN dS^T masked at 17)."""
    q, k, v = make_inputs((1, 1, 32, 32), (1, 1, 40, 32), (1, 1, 40, 32), dtype=torch.bfloat16, seed=2,
                          requires_grad=False)
    dout = make_inputs((1, 1, 32, 32), dtype=torch.bfloat16, seed=4, requires_grad=False)[0]
    for t in (k, v):
        t[0, 0, 16:23] = float("inf")
    for t in (q, dout):
        t[0, 0, 17:] = float("inf")
    band = (23, U)
    grads = {}
    for mode in ("on", "off"):
        out, lse = _bf16_dot_call(monkeypatch, mode, q, k, v, None, band)
        assert torch.isfinite(out[:, :, :17]).all() and torch.isfinite(lse[:, :, :17]).all(), mode
        grads[mode] = _bf16_dot_backward(monkeypatch, mode, dout, q, k, v, out, lse, None, band)[:3]
    for name, on, off in zip(("dq", "dk", "dv"), grads["on"], grads["off"]):
        rows = slice(0, 17) if name == "dq" else slice(None)
        assert torch.isfinite(off[:, :, rows]).all(), name  # the float32 path: finite there
        assert torch.isfinite(on[:, :, rows]).all(), name
        scale = off[:, :, rows].float().abs().max().item()
        torch.testing.assert_close(on[:, :, rows].float(), off[:, :, rows].float(), atol=2e-2 * scale, rtol=3e-2,
                                   msg=name)


def test_bf16_dot_mode_is_checked(monkeypatch):
    """Any value but auto, on, off raises, naming the variable, whatever the dtype."""
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", "yes")
    q, k, v = _good()
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match="FUSED_ATTN_CPU_BF16_DOT must be one of auto, on, off; got 'yes'"):
            torch.ops.fused_attn_C.attention_fwd(q.to(dtype), k.to(dtype), v.to(dtype), None, *NO_BAND, 0.0, 0.5, 0, 0)


@pytest.mark.skipif(_HAS_BF16_DOT, reason="the CPU has AVX512-BF16: `on` runs there")
def test_bf16_dot_on_without_the_instructions_raises(monkeypatch):
    """`on` on a CPU without AVX512-BF16 raises (rather than reaching an illegal instruction); float32
    inputs never use the bf16 products, so they run."""
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", "on")
    q, k, v = _good()
    with pytest.raises(RuntimeError, match="FUSED_ATTN_CPU_BF16_DOT=on: .* no AVX512-BF16"):
        torch.ops.fused_attn_C.attention_fwd(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, *NO_BAND, 0.0, 0.5, 0, 0)
    torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.5, 0, 0)


# ---- memory: no L x L buffer ------------------------------------------------------------------

def test_long_sequence_has_no_quadratic_buffer():
    """Forward + backward at L = 8192 (B = H = 1, D = 64) in a fresh process: its peak RSS grows
    by far less than one L x L float32 matrix (256 MB), which an unfused kernel would allocate."""
    script = textwrap.dedent("""
        import resource, torch, fused_attn
        torch.set_num_threads(2)
        L, D = 8192, 64
        q, k, v = (torch.randn(1, 1, L, D, requires_grad=True) for _ in range(3))
        warm = fused_attn.functional.attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="cpu")
        warm.sum().backward()
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fused_attn.functional.attention(q, k, v, causal=True, backend="cpu")
        out.sum().backward()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) * 1024)
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    grown = int(res.stdout.strip().splitlines()[-1])
    l_by_l = 8192 * 8192 * 4
    assert grown < l_by_l / 4, f"peak RSS grew by {grown / 2**20:.1f} MB during L=8192 attention"


def test_bad_tile_sizes_are_a_clear_error():
    """FUSED_ATTN_CPU_{FWD,BWD}_{BM,BN} (tile sizes for tuning, read once, at the first call that
    needs them): a value that is not a whole number in [1, 65536] raises, naming the variable and the
    value, at every call (it used to run as a block of 1: right, and many times slower); a good
    one is taken. In a fresh process: the sizes are read once."""
    script = textwrap.dedent("""
        import os, torch, fused_attn
        q, k, v = (torch.randn(1, 2, 70, 16, requires_grad=True) for _ in range(3))
        def run(backward=False):
            out = fused_attn.functional.attention(q, k, v, causal=True, backend="cpu")
            if backward:
                out.sum().backward()
            return out
        def refused(name, value, backward):
            os.environ[name] = value
            try:
                run(backward)
            except ValueError as e:  # (as the package's other settings: a bad value)
                assert f"{name} must be a whole number" in str(e) and f"'{value}'" in str(e), str(e)
            else:
                raise AssertionError(f"{name}={value!r} was accepted")
        for value in ("abc", "0", "-5", "1.5", "64k", "100000", " 64", "64 ", "+64"):
            refused("FUSED_ATTN_CPU_FWD_BM", value, False)
            refused("FUSED_ATTN_CPU_FWD_BM", value, False)  # again: not taken as a default after one error
        os.environ["FUSED_ATTN_CPU_FWD_BM"] = "48"
        expected = fused_attn.reference.attention(q.double(), k.double(), v.double(), None, True)
        torch.testing.assert_close(run().double(), expected, rtol=1e-4, atol=1e-5)
        for value in ("abc", "0", "-5"):
            refused("FUSED_ATTN_CPU_BWD_BN", value, True)
        print("ok")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSED_ATTN_CPU_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


def test_decoding_takes_blas_in_the_automatic_mode(monkeypatch):
    """float32, one query per head against a cache that it sees whole: the automatic mode runs the
    BLAS products (no per-call panel layout of the cache), bitwise what FUSED_ATTN_CPU_GEMM=blas
    gives; with a band (a sliding window) it keeps the register-blocked ones, which never read the
    keys the band hides. Both meet the oracle (the other tests)."""
    q, k, v = make_inputs((2, 8, 1, 64), (2, 2, 700, 64), (2, 2, 700, 64), requires_grad=False, seed=9)

    def run(mode, **options):
        if mode is None:
            monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
        else:
            monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
        return fused_attn.attention(q, k, v, causal=True, alignment="bottom_right", backend="cpu", **options)

    assert torch.equal(run(None), run("blas"))
    assert not torch.equal(run("tiles"), run("blas"))  # the two paths do round differently here
    window = dict(window_size=(100, 0))
    assert torch.equal(run(None, **window), run("tiles", **window))
    # a few queries per head that see every key (not causal): BLAS below 64 rows per kv head
    for Lq, Hkv, blas in ((32, 8, True), (8, 2, True), (64, 8, False), (16, 2, False)):
        q, k, v = make_inputs((2, 8, Lq, 64), (2, Hkv, 300, 64), (2, Hkv, 300, 64), requires_grad=False, seed=Lq)
        monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
        auto = fused_attn.attention(q, k, v, backend="cpu")
        monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", "blas" if blas else "tiles")
        assert torch.equal(auto, fused_attn.attention(q, k, v, backend="cpu")), (Lq, Hkv)


# float32 decoding against the oracle in the automatic mode, gradients included: the backward runs
# the products the forward ran (BLAS where every query sees every key, decode_takes_blas), so it
# recomputes P = exp(s - lse) from scores summed in the order of the forward's lse. (It used to run
# the register-blocked ones against a BLAS forward's lse: a sharp softmax row of P then summed to
# 1 +- 1e-6 and dQ, dK, dV were ~1e-5 off, up to 10x the oracle's bound, while either path alone
# meets it with a wide margin.) scale=1.0, as T5 uses: sharp rows. (Hq, Hkv, Lq, Lk, D, Dv, seed)
_F32_DECODE_GRAD_CASES = [(2, 2, 1, 97, 256, 8, 0), (4, 2, 1, 97, 256, 8, 5), (4, 1, 2, 300, 64, 8, 9),
                          (8, 2, 1, 300, 64, 64, 9)]


@pytest.mark.parametrize("Hq,Hkv,Lq,Lk,D,Dv,seed", _F32_DECODE_GRAD_CASES,
                         ids=[f"Hq{c[0]}-Hkv{c[1]}-{c[2]}x{c[3]}-d{c[4]}-dv{c[5]}" for c in _F32_DECODE_GRAD_CASES])
def test_float32_decoding_gradients_meet_the_oracle(monkeypatch, Hq, Hkv, Lq, Lk, D, Dv, seed):
    monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
    q, k, v = make_inputs((1, Hq, Lq, D), (1, Hkv, Lk, D), (1, Hkv, Lk, Dv), seed=seed)

    def op(backend, **options):
        return lambda q, k, v: fused_attn.attention(q, k, v, scale=1.0, backend=backend, **options)
    check_against_reference(op("cpu"), op("reference"), [q, k, v], names="qkv")

    def grads(mode, **options):
        if mode is None:
            monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
        else:
            monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        op("cpu", **options)(*leaves).backward(torch.ones(1, Hq, Lq, Dv))
        return [t.grad for t in leaves]
    # the path taken: the forward's, bit for bit (BLAS; the register-blocked products with a band)
    assert all(torch.equal(a, b) for a, b in zip(grads(None), grads("blas")))
    window = dict(causal=True, alignment="bottom_right", window_size=(Lk // 2, 0))
    assert all(torch.equal(a, b) for a, b in zip(grads(None, **window), grads("tiles", **window)))


# Sharp float32 softmax rows (logits of magnitude 30-90) with one to three queries per head,
# through the register-blocked products (forced here; the automatic mode takes them for banded
# calls such as causal bottom-right with several queries). The float32 reference computes such
# scores with BLAS kernels vectorised over the head dimension; the products used to sum each
# score in one FMA chain over all of it, about twice the rounding at D = 64-128, and a sharp
# softmax turns a logit's last bits into ~1e-5 of the output: these cases failed the forward's
# bound by 1.1-2.3x. The chains now sum 16 steps each (attention_tile_gemm.h, block), and they
# pass with a wide margin. (B, Hq, Hkv, Lq, Lk, D, logit scale * sqrt(D), causal, seed)
_F32_SHARP_DECODE_CASES = [(1, 1, 1, 2, 249, 128, 24, False, 728), (2, 2, 1, 2, 45, 128, 16, False, 229),
                           (2, 6, 2, 2, 101, 128, 20, False, 503), (2, 4, 1, 3, 136, 64, 30, False, 679),
                           (2, 2, 1, 2, 185, 40, 24, False, 734), (2, 8, 2, 2, 140, 128, 20, True, 549)]


@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,sharpness,causal,seed", _F32_SHARP_DECODE_CASES,
                         ids=[f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-{c[3]}x{c[4]}-d{c[5]}-s{c[6]}{'-causal' if c[7] else ''}"
                              for c in _F32_SHARP_DECODE_CASES])
def test_register_blocked_sharp_decoding_meets_the_oracle(monkeypatch, B, Hq, Hkv, Lq, Lk, D, sharpness, causal, seed):
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", "tiles")
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), seed=seed)
    options = dict(scale=sharpness / math.sqrt(D), causal=causal, alignment="bottom_right")

    def op(backend):
        return lambda q, k, v: fused_attn.attention(q, k, v, backend=backend, **options)
    check_against_reference(op("cpu"), op("reference"), [q, k, v], names="qkv")


# ---- decoding in bfloat16: K and V read as rows -------------------------------------------------
# With the AVX512-BF16 dot products and few query rows per kv head (a decoding step), the automatic
# mode reads K and V in place, row by row (bf16_dot::row_scores / row_accumulate, P in float32),
# instead of laying the whole cache out as bf16 pair panels on every call (below 32 such rows).
# Every case below has at most 4 query rows per kv head, which takes that path in the automatic
# mode (the last test checks that the path taken is neither of the other two); any band, mask,
# dropout, cap and ALiBi.

_DECODE_ROWS_CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, band, mask, dropout_p, softcap, alibi, bottom_right)
    (1, 2, 2, 1, 1, 40, "none", None, 0.0, 0.0, None, False),
    (2, 2, 2, 1, 17, 59, "none", "bool", 0.0, 0.0, None, False),
    (1, 2, 2, 1, 97, 128, "bottom_right", None, 0.0, 0.0, None, True),
    (2, 2, 1, 2, 1, 59, "bottom_right", None, 0.0, 0.0, None, True),
    (1, 4, 2, 2, 17, 128, "bottom_right", "additive", 0.0, 0.0, None, True),
    (2, 2, 2, 2, 97, 40, "bottom_right_window", None, 0.0, 0.0, None, True),
    (1, 4, 1, 1, 97, 59, "none", "additive", 0.3, 0.0, "head", True),     # dropout, ALiBi, GQA 4:1
    (1, 2, 2, 2, 97, 128, "causal", "bool", 0.0, 5.0, "batch", False),    # top-left: keys 0-1; cap
    (1, 2, 2, 2, 300, 40, "window_right", None, 0.2, 0.0, None, False),   # past the first key tile
    (1, 2, 2, 2, 300, 59, "none", "additive", 0.0, 2.0, "batch", True),  # two key tiles, all seen
    (1, 2, 1, 2, 17, 40, "dead_start", None, 0.0, 0.0, None, False),      # no key seen: empty rows
]


@_needs_bf16_dot
@pytest.mark.parametrize("B,Hq,Hkv,Lq,Lk,D,band,mask,dropout_p,softcap,alibi,bottom_right", _DECODE_ROWS_CASES,
                         ids=[f"B{c[0]}-Hq{c[1]}-Hkv{c[2]}-{c[3]}x{c[4]}-d{c[5]}-{c[6]}-{c[7]}-p{c[8]}-cap{c[9]:g}-"
                              f"{c[10]}" for c in _DECODE_ROWS_CASES])
def test_bf16_decoding_meets_the_oracle(monkeypatch, B, Hq, Hkv, Lq, Lk, D, band, mask, dropout_p, softcap, alibi,
                                        bottom_right):
    """out and lse of the decoding forward (and the gradients, through the backward's products)."""
    monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
    monkeypatch.delenv("FUSED_ATTN_CPU_BF16_DOT", raising=False)
    _check_band(torch.bfloat16, B, Hq, Hkv, Lq, Lk, D, _bands(Lq, Lk)[band], mask=mask, dropout_p=dropout_p,
                softcap=softcap, q_scale=4.0 if softcap else 1.0, alibi=alibi, bottom_right=bottom_right)


@_needs_bf16_dot
@pytest.mark.parametrize("Lq,D,Dv", [(1, 59, 24), (2, 40, 136)])
def test_bf16_decoding_value_dim_differs(monkeypatch, Lq, D, Dv):
    """Dv != D: P V sweeps Dv's columns in blocks of 128 (136: a second, partial block)."""
    monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
    _check(torch.bfloat16, 2, 4, 2, Lq, 97, D, Dv=Dv, causal=True)


@_needs_bf16_dot
def test_bf16_decoding_reads_k_and_v_as_rows(monkeypatch):
    """One query per head: the automatic mode's out is not the pair panels' (FUSED_ATTN_CPU_GEMM=
    tiles, which rounds P to bf16), nor is its lse the float32 path's (FUSED_ATTN_CPU_BF16_DOT=off:
    the same exact products summed in another order), and it is nearer the float64 result than the
    panels' on average. k and v are read where they are: rows of a wider cache (row stride != D) give what their
    contiguous copies give; a strided head dim (which the rows cannot read) takes the panels."""
    B, Hq, Hkv, Lk, D = 2, 4, 2, 300, 59
    q, k_wide, v_wide = make_inputs((B, Hq, 1, D), (B, Hkv, Lk, 64), (B, Hkv, Lk, 64), dtype=torch.bfloat16, seed=21,
                                    requires_grad=False)
    k, v = k_wide[..., :D], v_wide[..., :D]  # unit head-dim stride, rows 64 apart

    def run(q, k, v, gemm=None, bf16_dot=None):
        for name, value in (("FUSED_ATTN_CPU_GEMM", gemm), ("FUSED_ATTN_CPU_BF16_DOT", bf16_dot)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)
        return torch.ops.fused_attn_C.attention_fwd(q, k, v, None, *NO_BAND, 0.0, D ** -0.5, 0, 0)

    out, lse = run(q, k, v)
    panels_out, panels_lse = run(q, k, v, gemm="tiles")
    float32_out, float32_lse = run(q, k, v, bf16_dot="off")
    assert not torch.equal(out, panels_out), "the automatic mode laid out the panels"
    assert not torch.equal(lse, float32_lse), "the automatic mode took the float32 path"
    exact = ref.attention(q.double(), k.double(), v.double(), None, False, 0.0, D ** -0.5)
    # (on average: the output's own bf16 rounding dominates the largest errors of both)
    assert (out.double() - exact).abs().mean() < (panels_out.double() - exact).abs().mean()
    torch.testing.assert_close(lse, panels_lse, rtol=1e-6, atol=1e-6)  # the scores: exact products either way
    contiguous = run(q, k.contiguous(), v.contiguous())
    assert torch.equal(out, contiguous[0]) and torch.equal(lse, contiguous[1])
    # a strided head dim: the panels, bit for bit
    k_t, v_t = (t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (k, v))
    assert k_t.stride(-1) != 1
    assert torch.equal(run(q, k_t, v_t)[0], panels_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_farther_apart_than_int_max(dtype):
    """Two query rows 2^31 + 64 elements apart (a view into an 8-16 GiB storage that stays virtual:
    only the two rows are touched) compute as their contiguous copy: the float32/float64 BLAS path
    copies such an operand (its leading dimension is 32-bit) instead of refusing it."""
    try:
        big = torch.empty(2 ** 31 + 2 ** 20, dtype=dtype)
    except RuntimeError as e:  # (no room for the virtual storage)
        pytest.skip(f"cannot reserve the storage: {e}")
    rows = big.as_strided((1, 1, 2, 16), (0, 0, 2 ** 31 + 64, 1), 0)
    rows.copy_(torch.randn(1, 1, 2, 16, dtype=dtype))
    k, v = torch.randn(1, 1, 5, 16, dtype=dtype), torch.randn(1, 1, 5, 16, dtype=dtype)
    out = F.attention(rows, k, v, backend="cpu")
    torch.testing.assert_close(out, F.attention(rows.contiguous(), k, v, backend="cpu"), rtol=0, atol=0)
    out = F.attention(k, rows, rows, backend="cpu")
    torch.testing.assert_close(out, F.attention(k, rows.contiguous(), rows.contiguous(), backend="cpu"))
