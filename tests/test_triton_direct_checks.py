"""Direct calls of the registered ops (``torch.ops.fused_attn.*``) on the ``triton`` backend with
arguments of the wrong shape, dtype or device raise an error naming the argument and what was
expected, as the ``cpu`` backend's TORCH_CHECKs do (csrc/cpu/*.cpp). The functional API checks all
of this before it calls the ops; a direct caller gets no such checks, and the Triton kernels read
raw pointers with the sizes and strides they are handed: a mask that is not expanded, a weight or
lse too short, a head count that does not divide, positions of the wrong shape read out of bounds
(a segfault, or other memory read as values: a wrong answer without an error) or launched kernels
they were never built for. Under the interpreter an out-of-bounds read need not crash, so these
tests assert the raise, which the old launchers never gave.

Position *values* are data: checking them would read a GPU tensor on the host (a device sync), so
the Triton kernel clamps each position into the tables' rows instead (as the cuda backend's
kernel does): ``test_rotary_positions_out_of_range_are_clamped_not_read_out_of_bounds``.
"""
import pytest
import torch

from fused_attn.backends import BACKENDS
from fused_attn.ops_common import NO_BAND

pytest.importorskip("triton")

if BACKENDS["triton"].unavailable_reasons():
    pytest.skip(f"triton backend unavailable: {BACKENDS['triton'].unavailable_reasons()}", allow_module_level=True)

ops = torch.ops.fused_attn
f32 = torch.float32
B, HQ, HKV, LQ, LK, D = 2, 2, 2, 3, 4, 8


@pytest.fixture
def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _t(dev, *shape, dtype=f32):
    return torch.randn(*shape, device=dev).to(dtype)


def _ints(dev, values, dtype=torch.int32):
    return torch.tensor(values, device=dev, dtype=dtype)


# ---- attention -----------------------------------------------------------------------------

def _attn(dev, backend="triton", **change):
    """attention_fwd's arguments (B, Hq, Lq, D) x (B, Hkv, Lk, D), with ``change`` applied."""
    a = dict(q=_t(dev, B, HQ, LQ, D), k=_t(dev, B, HKV, LK, D), v=_t(dev, B, HKV, LK, D), attn_mask=None,
             band_lo=NO_BAND[0], band_hi=NO_BAND[1], dropout_p=0.0, scale=0.3, rng=None, backend=backend, softcap=0.0,
             alibi_slopes=None, bottom_right=False)
    a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
    return a


def _attn_fwd(dev, **change):
    return lambda: ops.attention_fwd(**_attn(dev, **change))


def _attn_bwd(dev, **change):
    """attention_bwd's arguments: the good forward's (out and lse from the cpu backend), then
    ``change`` applied to the backward's alone."""
    def call():
        fwd = _attn(dev, backend="cpu")
        out, lse = ops.attention_fwd(**fwd)
        a = dict(fwd, backend="triton", dout=torch.ones_like(out), out=out, lse=lse, mask_grad=False, dlse=None)
        a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
        return ops.attention_bwd(**a)
    return call


def _mask(dtype=torch.bool, shape=(B, HQ, LQ, LK)):
    return lambda dev: torch.ones(shape, device=dev, dtype=dtype)


ATTENTION_CASES = {
    "mask not expanded": (_attn_fwd, dict(attn_mask=_mask(shape=(1, 1, LQ, LK))), ValueError,
                          r"attn_mask must be a \(B, Hq, Lq, Lk\) = \(2, 2, 3, 4\) view"),
    "mask of the wrong length": (_attn_fwd, dict(attn_mask=_mask(shape=(B, HQ, LQ, LK - 1))), ValueError,
                                 r"attn_mask must be a \(B, Hq, Lq, Lk\)"),
    "mask 2-D": (_attn_fwd, dict(attn_mask=_mask(shape=(LQ, LK))), ValueError, r"attn_mask must be a \(B, Hq"),
    "mask of int dtype": (_attn_fwd, dict(attn_mask=_mask(torch.int32)), TypeError,
                          "attn_mask must be bool or q's dtype float32, got int32"),
    "mask of another float dtype": (_attn_fwd, dict(attn_mask=_mask(torch.float16)), TypeError,
                                    "attn_mask must be bool or q's dtype float32, got float16"),
    "gqa heads not dividing": (_attn_fwd, dict(q=lambda dev: _t(dev, B, 3, LQ, D)), ValueError,
                               r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    "head dim too large": (_attn_fwd, dict(q=lambda dev: _t(dev, 1, 1, 1, 264), k=lambda dev: _t(dev, 1, 1, 1, 264),
                                           v=lambda dev: _t(dev, 1, 1, 1, 8)), ValueError,
                           "head dim 264 is above the 256"),
    "value head dim too large": (_attn_fwd, dict(v=lambda dev: _t(dev, B, HKV, LK, 260)), ValueError,
                                 "head dim of v 260 is above the 256"),
    "k head dim differs": (_attn_fwd, dict(k=lambda dev: _t(dev, B, HKV, LK, D - 1)), ValueError,
                           "q and k must have the same head dim"),
    "v length differs": (_attn_fwd, dict(v=lambda dev: _t(dev, B, HKV, LK + 1, D)), ValueError,
                         "k and v must agree in heads and length"),
    "k batch differs": (_attn_fwd, dict(k=lambda dev: _t(dev, 1, HKV, LK, D)), ValueError, "batch sizes differ"),
    "q 3-D": (_attn_fwd, dict(q=lambda dev: _t(dev, HQ, LQ, D)), ValueError, r"q must be 4-D \(B, H, L, D\)"),
    "k of another dtype": (_attn_fwd, dict(k=lambda dev: _t(dev, B, HKV, LK, D, dtype=torch.float16)), TypeError,
                           "k has dtype float16 but q has float32"),
    "float64": (_attn_fwd, dict(q=lambda dev: _t(dev, B, HQ, LQ, D, dtype=torch.float64),
                                k=lambda dev: _t(dev, B, HKV, LK, D, dtype=torch.float64),
                                v=lambda dev: _t(dev, B, HKV, LK, D, dtype=torch.float64)), TypeError,
                "q/k/v must be float16, bfloat16 or float32, got float64"),
    "alibi not expanded": (_attn_fwd, dict(alibi_slopes=lambda dev: torch.ones(HQ, device=dev)), ValueError,
                           r"alibi_slopes must be a \(B, Hq\) = \(2, 2\) tensor"),
    "alibi float16": (_attn_fwd, dict(alibi_slopes=lambda dev: torch.ones(B, HQ, device=dev, dtype=torch.float16)),
                      TypeError, "alibi_slopes must be float32, got float16"),
    "dropout_p 1": (_attn_fwd, dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    "scale inf": (_attn_fwd, dict(scale=float("inf")), ValueError, "scale must be finite, got inf"),
    "softcap negative": (_attn_fwd, dict(softcap=-1.0), ValueError, "softcap must be finite and >= 0"),
    "bwd lse too short": (_attn_bwd, dict(lse=lambda dev: torch.zeros(B, HQ, LQ - 1, device=dev)), ValueError,
                          r"lse must be a float32 tensor of shape \(B, Hq, Lq\) = \(2, 2, 3\)"),
    "bwd lse float64": (_attn_bwd, dict(lse=lambda dev: torch.zeros(B, HQ, LQ, device=dev, dtype=torch.float64)),
                        TypeError, "lse must be a float32 tensor"),
    "bwd out too short": (_attn_bwd, dict(out=lambda dev: _t(dev, B, HQ, LQ - 1, D)), ValueError,
                          r"out must have shape \(B, Hq, Lq, Dv\) = \(2, 2, 3, 8\)"),
    "bwd dout too short": (_attn_bwd, dict(dout=lambda dev: _t(dev, B, HQ, LQ, D - 1)), ValueError,
                           r"dout must have shape \(B, Hq, Lq, Dv\)"),
    "bwd dout float16": (_attn_bwd, dict(dout=lambda dev: _t(dev, B, HQ, LQ, D, dtype=torch.float16)), TypeError,
                         "dout must have q's dtype float32, got float16"),
    "bwd dlse too short": (_attn_bwd, dict(dlse=lambda dev: torch.zeros(B, HQ, 1, device=dev)), ValueError,
                           "dlse must be None or a float32 tensor of lse's shape"),
    "bwd mask_grad without an additive mask": (_attn_bwd, dict(attn_mask=_mask(), mask_grad=True), ValueError,
                                               "mask_grad needs an additive"),
    "bwd mask not expanded": (_attn_bwd, dict(attn_mask=_mask(f32, (1, 1, LQ, LK))), ValueError,
                              r"attn_mask must be a \(B, Hq, Lq, Lk\)"),
}


# ---- varlen attention ------------------------------------------------------------------------
# two sequences of 3 and 2 queries, 2 and 4 keys

def _varlen(dev, **change):
    a = dict(q=_t(dev, 5, HQ, D), k=_t(dev, 6, HKV, D), v=_t(dev, 6, HKV, D), cu_seqlens_q=_ints(dev, [0, 3, 5]),
             cu_seqlens_k=_ints(dev, [0, 2, 6]), max_seqlen_q=3, max_seqlen_k=4, band_lo=NO_BAND[0],
             band_hi=NO_BAND[1], bottom_right=False, dropout_p=0.0, scale=0.3, rng=None, backend="triton",
             softcap=0.0, seqused_k=None, checked=True, alibi_slopes=None)
    a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
    return a


def _varlen_fwd(dev, **change):
    return lambda: ops.attention_varlen_fwd(**_varlen(dev, **change))


def _varlen_bwd(dev, **change):
    def call():
        fwd = _varlen(dev, backend="cpu")
        out, lse = ops.attention_varlen_fwd(**fwd)
        a = dict(fwd, backend="triton", dout=torch.ones_like(out), out=out, lse=lse, dlse=None)
        del a["checked"]
        a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
        return ops.attention_varlen_bwd(**a)
    return call


def _paged(dev, **change):
    """A paged cache: 3 pages of 4 rows, block_table (2 sequences, 2 pages each)."""
    base = dict(k=lambda dev: _t(dev, 3, 4, HKV, D), v=lambda dev: _t(dev, 3, 4, HKV, D),
                block_table=lambda dev: _ints(dev, [[0, 1], [2, 0]]), cu_seqlens_k=lambda dev: _ints(dev, [0, 2, 6]))
    return _varlen_fwd(dev, **dict(base, **change))


VARLEN_CASES = {
    "varlen q 4-D": (_varlen_fwd, dict(q=lambda dev: _t(dev, 1, 5, HQ, D)), ValueError,
                     r"q must be 3-D \(total, heads, dim\)"),
    "varlen v total differs": (_varlen_fwd, dict(v=lambda dev: _t(dev, 5, HKV, D)), ValueError,
                               "k and v must agree in total length and heads"),
    "varlen gqa heads not dividing": (_varlen_fwd, dict(q=lambda dev: _t(dev, 5, 3, D)), ValueError,
                                      r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    "varlen head dim too large": (_varlen_fwd, dict(q=lambda dev: _t(dev, 5, HQ, 264),
                                                    k=lambda dev: _t(dev, 6, HKV, 264)),
                                  ValueError, "head dim 264 is above the 256"),
    "varlen k head dim differs": (_varlen_fwd, dict(k=lambda dev: _t(dev, 6, HKV, D + 1)), ValueError,
                                  "q and k must have the same head dim"),
    "varlen cu_seqlens_q float": (_varlen_fwd, dict(cu_seqlens_q=lambda dev: torch.tensor([0., 3., 5.], device=dev)),
                                  TypeError, "cu_seqlens_q must be int32 or int64, got float32"),
    "varlen cu_seqlens_q 2-D": (_varlen_fwd, dict(cu_seqlens_q=lambda dev: _ints(dev, [[0, 3, 5]])), ValueError,
                                "cu_seqlens_q must be 1-D with num_sequences"),
    "varlen cu_seqlens_k too short": (_varlen_fwd, dict(cu_seqlens_k=lambda dev: _ints(dev, [0, 6])), ValueError,
                                      r"cu_seqlens_k must be 1-D with cu_seqlens_q's \(num_sequences \+ 1\) = 3"),
    "varlen seqused_k too short": (_varlen_fwd, dict(seqused_k=lambda dev: _ints(dev, [1])), ValueError,
                                   r"seqused_k must be 1-D with num_sequences = 2"),
    "varlen alibi not per sequence": (_varlen_fwd, dict(alibi_slopes=lambda dev: torch.ones(1, HQ, device=dev)),
                                      ValueError, r"alibi_slopes must be a \(num_sequences, Hq\) = \(2, 2\)"),
    "paged block_table too short": (_paged, dict(block_table=lambda dev: _ints(dev, [[0, 1]])), ValueError,
                                    r"block_table must be a 2-D int32 \(num_sequences, pages\) = \(2, \.\.\.\)"),
    "paged block_table int64": (_paged, dict(block_table=lambda dev: _ints(dev, [[0, 1], [2, 0]], torch.int64)),
                                TypeError, "block_table must be a 2-D int32"),
    "paged k not pages": (_paged, dict(k=lambda dev: _t(dev, 12, HKV, D)), ValueError,
                          r"k must be 4-D pages \(num_pages, page_size, heads, dim\)"),
    "paged v pages differ": (_paged, dict(v=lambda dev: _t(dev, 2, 4, HKV, D)), ValueError,
                             "k and v pages must agree"),
    "varlen bwd lse too short": (_varlen_bwd, dict(lse=lambda dev: torch.zeros(HQ, 4, device=dev)), ValueError,
                                 r"lse must be a float32 tensor of shape \(Hq, total_q\) = \(2, 5\)"),
    "varlen bwd out too short": (_varlen_bwd, dict(out=lambda dev: _t(dev, 4, HQ, D)), ValueError,
                                 r"out must have shape \(total_q, Hq, Dv\) = \(5, 2, 8\)"),
    "varlen bwd dlse too short": (_varlen_bwd, dict(dlse=lambda dev: torch.zeros(HQ, 1, device=dev)), ValueError,
                                  "dlse must be None or a float32 tensor of lse's shape"),
}


# ---- residual-add + norm ---------------------------------------------------------------------
N, DM = 3, 8


def _norm(dev, **change):
    a = dict(x=_t(dev, N, DM), residual=_t(dev, N, DM), weight=_t(dev, DM), bias=_t(dev, DM), eps=1e-5,
             dropout_p=0.0, rms=False, residual_in_fp32=False, rng=None, backend="triton")
    a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
    return a


def _norm_fwd(dev, **change):
    return lambda: ops.layer_norm_residual_fwd(**_norm(dev, **change))


def _norm_bwd(dev, **change):
    def call():
        fwd = _norm(dev, backend="cpu")
        out, summed, mean, rstd = ops.layer_norm_residual_fwd(**fwd)
        a = dict(dout=torch.ones_like(out), dsummed=None, summed=summed, weight=fwd["weight"], bias=fwd["bias"],
                 mean=mean, rstd=rstd, eps=fwd["eps"], dropout_p=fwd["dropout_p"], rms=fwd["rms"], rng=None,
                 x_dtype=out.dtype, backend="triton")
        a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
        return ops.layer_norm_residual_bwd(**a)
    return call


NORM_CASES = {
    "norm weight too short": (_norm_fwd, dict(weight=lambda dev: _t(dev, DM - 1)), ValueError,
                              r"weight must have shape \(8,\), got \(7,\)"),
    "norm weight too long": (_norm_fwd, dict(weight=lambda dev: _t(dev, DM + 5)), ValueError,
                             r"weight must have shape \(8,\)"),
    "norm bias too short": (_norm_fwd, dict(bias=lambda dev: _t(dev, 2)), ValueError, r"bias must have shape \(8,\)"),
    "norm weight float16": (_norm_fwd, dict(weight=lambda dev: _t(dev, DM, dtype=torch.float16)), TypeError,
                            "weight must have dtype float32, got float16"),
    "norm residual too short": (_norm_fwd, dict(residual=lambda dev: _t(dev, N - 1, DM)), ValueError,
                                r"residual must have shape \(3, 8\), got \(2, 8\)"),
    "norm residual of another dtype": (_norm_fwd, dict(x=lambda dev: _t(dev, N, DM, dtype=torch.float16),
                                                       weight=None, bias=None), TypeError,
                                       r"residual must have x's dtype float16 \(or float32 with residual_in_fp32\)"),
    "norm x 3-D": (_norm_fwd, dict(x=lambda dev: _t(dev, 1, N, DM)), ValueError, r"x must be 2-D \(N, d\)"),
    "norm x float64": (_norm_fwd, dict(x=lambda dev: _t(dev, N, DM, dtype=torch.float64), residual=None, weight=None,
                                       bias=None), TypeError, "x must be float16, bfloat16 or float32, got float64"),
    "norm eps negative": (_norm_fwd, dict(eps=-1.0), ValueError, "eps must be non-negative"),
    "norm bwd rstd too short": (_norm_bwd, dict(rstd=lambda dev: torch.ones(N - 1, device=dev)), ValueError,
                                r"rstd must be a float32 tensor of shape \(3,\)"),
    "norm bwd mean too short": (_norm_bwd, dict(mean=lambda dev: torch.ones(1, device=dev)), ValueError,
                                r"mean must be a float32 tensor of shape \(3,\) \(empty for rms\)"),
    "norm bwd dout too short": (_norm_bwd, dict(dout=lambda dev: _t(dev, N - 1, DM)), ValueError,
                                r"dout must have shape \(3, 8\)"),
    "norm bwd dsummed too short": (_norm_bwd, dict(dsummed=lambda dev: _t(dev, N, DM - 1)), ValueError,
                                   r"dsummed must have shape \(3, 8\)"),
    "norm bwd weight too short": (_norm_bwd, dict(weight=lambda dev: _t(dev, 2)), ValueError,
                                  r"weight must have shape \(8,\)"),
    "norm bwd x_dtype float64": (_norm_bwd, dict(x_dtype=torch.float64), TypeError,
                                 "x_dtype must be float16, bfloat16 or float32, got float64"),
}


# ---- feed-forward ---------------------------------------------------------------------------
T, DFF = 3, 16


def _ffn(dev, **change):
    a = dict(x=_t(dev, T, DM), w1=_t(dev, DFF, DM), b1=_t(dev, DFF), w2=_t(dev, DM, DFF), b2=_t(dev, DM),
             activation="gelu", dropout_p=0.0, rng=None, backend="triton")
    a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
    return a


def _ffn_fwd(dev, **change):
    return lambda: ops.feed_forward_fwd(**_ffn(dev, **change))


def _ffn_bwd(dev, **change):
    def call():
        fwd = _ffn(dev, backend="cpu")
        out, pre = ops.feed_forward_fwd(**fwd)
        a = dict(dout=torch.ones_like(out), x=fwd["x"], w1=fwd["w1"], w2=fwd["w2"], pre=pre,
                 activation=fwd["activation"], dropout_p=0.0, rng=None, has_b1=True, has_b2=True, backend="triton")
        a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
        return ops.feed_forward_bwd(**a)
    return call


FFN_CASES = {
    "ffn w2 too short": (_ffn_fwd, dict(w2=lambda dev: _t(dev, DM, DFF - 4)), ValueError,
                         r"w2 must have shape \(d_out, 16\), got \(8, 12\)"),
    "ffn w1 of another width": (_ffn_fwd, dict(w1=lambda dev: _t(dev, DFF, DM + 1)), ValueError,
                                r"w1 must have shape \(F1, 8\)"),
    "ffn b1 too short": (_ffn_fwd, dict(b1=lambda dev: _t(dev, DFF - 1)), ValueError, r"b1 must have shape \(16,\)"),
    "ffn b2 too short": (_ffn_fwd, dict(b2=lambda dev: _t(dev, 1)), ValueError, r"b2 must have shape \(8,\)"),
    "ffn gated odd w1": (_ffn_fwd, dict(activation="swiglu", w1=lambda dev: _t(dev, 15, DM)), ValueError,
                         r"gated activations need an even w1.shape\[0\]"),
    "ffn w1 float16": (_ffn_fwd, dict(w1=lambda dev: _t(dev, DFF, DM, dtype=torch.float16)), TypeError,
                       "w1 must have dtype float32, got float16"),
    "ffn x 3-D": (_ffn_fwd, dict(x=lambda dev: _t(dev, 1, T, DM)), ValueError, "x must be 2-D"),
    "ffn unknown activation": (_ffn_fwd, dict(activation="tanh"), ValueError, "activation must be one of"),
    "ffn bwd dout too short": (_ffn_bwd, dict(dout=lambda dev: _t(dev, T - 1, DM)), ValueError,
                               r"dout must have shape \(3, 8\)"),
    "ffn bwd pre too short": (_ffn_bwd, dict(pre=lambda dev: _t(dev, T, DFF - 1)), ValueError,
                              r"pre must have shape \(3, 16\)"),
}


# ---- rotary ---------------------------------------------------------------------------------
RB, RL, RH, RD, S = 2, 3, 2, 8, 5


def _rot(dev, **change):
    a = dict(x=_t(dev, RB, RL, RH, RD), cos=_t(dev, S, RD // 2), sin=_t(dev, S, RD // 2),
             positions=_ints(dev, [[0, 1, 2], [2, 3, 4]], torch.int64), interleaved=False, conjugate=False,
             backend="triton")
    a.update({k: (v(dev) if callable(v) else v) for k, v in change.items()})
    return a


def _rotary(dev, **change):
    return lambda: ops.rotary(**_rot(dev, **change))


def _rotary_inplace(dev, **change):
    return lambda: ops.rotary_(**_rot(dev, **change))


ROTARY_CASES = {
    "rotary positions 1-D": (_rotary, dict(positions=lambda dev: _ints(dev, [0, 1, 2], torch.int64)), ValueError,
                             r"positions must have shape \(B, L\) = \(2, 3\), got \(3,\)"),
    "rotary positions too short": (_rotary, dict(positions=lambda dev: _ints(dev, [[0, 1], [2, 3]])), ValueError,
                                   r"positions must have shape \(B, L\) = \(2, 3\), got \(2, 2\)"),
    "rotary positions float": (_rotary, dict(positions=lambda dev: torch.zeros(RB, RL, device=dev)), TypeError,
                               "positions must be int32 or int64, got float32"),
    "rotary sin of another shape": (_rotary, dict(sin=lambda dev: _t(dev, S - 1, RD // 2)), ValueError,
                                    r"cos and sin must be 2-D \(S, R/2\) of one shape"),
    "rotary sin of another dtype": (_rotary, dict(sin=lambda dev: _t(dev, S, RD // 2, dtype=torch.float16)),
                                    TypeError, "cos and sin must share a floating-point dtype"),
    "rotary tables too wide": (_rotary, dict(cos=lambda dev: _t(dev, S, RD), sin=lambda dev: _t(dev, S, RD)),
                               ValueError, r"cos and sin must have at most D/2 = 4 columns"),
    "rotary tables without rows": (_rotary, dict(cos=lambda dev: _t(dev, 0, RD // 2),
                                                 sin=lambda dev: _t(dev, 0, RD // 2)), ValueError,
                                   "cos and sin have no rows"),
    "rotary x 3-D": (_rotary, dict(x=lambda dev: _t(dev, RL, RH, RD)), ValueError, r"x must be 4-D \(B, L, H, D\)"),
    "rotary in place into overlapping x": (_rotary_inplace, dict(x=lambda dev: _t(dev, 1, RL, RH, RD).expand(RB, -1, -1,
                                                                                                           -1)),
                                           ValueError, "out must not have overlapping elements"),
}

CASES = {**ATTENTION_CASES, **VARLEN_CASES, **NORM_CASES, **FFN_CASES, **ROTARY_CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_triton_calls_with_bad_arguments_raise(case, dev):
    make, change, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        make(dev, **change)()


@pytest.mark.parametrize("make", [_attn_fwd, _attn_bwd, _varlen_fwd, _varlen_bwd, _paged, _norm_fwd, _norm_bwd,
                                  _ffn_fwd, _ffn_bwd, _rotary, _rotary_inplace])
def test_the_base_calls_run(make, dev):
    """The arguments the cases above spoil run as they are (the checks refuse nothing valid)."""
    make(dev)()


def test_rotary_positions_out_of_range_are_clamped_not_read_out_of_bounds(dev):
    """Position values are not read on the host (on a GPU that is a sync); the kernel clamps each
    into [0, S), as the cuda backend's does, so a direct call with positions outside the tables
    reads their first or last row, never memory past them (it read whatever lay there)."""
    from fused_attn import reference as R

    x = _t(dev, RB, RL, RH, RD)
    cos, sin = torch.rand(S, RD // 2, device=dev) + 1, torch.rand(S, RD // 2, device=dev) + 1
    bad = _ints(dev, [[0, S, -1], [S + 3, 2, -7]], torch.int64)
    clamped = bad.clamp(0, S - 1)
    for interleaved in (False, True):
        out = ops.rotary(x, cos, sin, bad, interleaved, False, "triton")
        torch.testing.assert_close(out, R.rotary(x, cos, sin, clamped, interleaved, False))
