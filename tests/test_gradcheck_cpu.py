"""torch.autograd.gradcheck in float64 for the C++ CPU ops (small shapes, every option)."""
import pytest
import torch

import fused_attn
from fused_attn import _extension
from fused_attn.reference import ACTIVATIONS, GATED_ACTIVATIONS


def _cpu_reason(op):
    err = fused_attn.extension_error()
    if err is not None:
        return err
    return None if _extension.has_kernel(op, "CPU") else f"fused_attn._C has no CPU kernel for {op}"


def _leaf(*shape, seed, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).requires_grad_()


_LN_REASON = _cpu_reason("layer_norm_residual_fwd")


@pytest.mark.skipif(_LN_REASON is not None, reason=f"C++ CPU backend unavailable: {_LN_REASON}")
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_residual_gradcheck(rms, dropout_p, affine):
    x, r = _leaf(4, 7, seed=0), _leaf(4, 7, seed=1)
    w = _leaf(7, seed=2, scale=0.3, shift=1.0) if affine else None
    b = _leaf(7, seed=3, scale=0.3) if affine else None

    def fn(x, r, w, b):
        gen = torch.Generator().manual_seed(11)  # the same dropout mask on every call
        return fused_attn.layer_norm_residual(x, r, w, b, 1e-5, dropout_p=dropout_p, prenorm=True, rms=rms,
                                              backend="cpu", generator=gen)

    assert torch.autograd.gradcheck(fn, (x, r, w, b), eps=1e-6, atol=1e-7, rtol=1e-5)


_FFN_REASON = _cpu_reason("feed_forward_fwd")


@pytest.mark.skipif(_FFN_REASON is not None, reason=f"C++ CPU backend unavailable: {_FFN_REASON}")
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_feed_forward_gradcheck(activation, dropout_p):
    d, d_ff, d_out = 6, 5, 4
    f1 = 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff
    x = _leaf(3, d, seed=0)
    w1, b1 = _leaf(f1, d, seed=1, scale=0.5), _leaf(f1, seed=2, scale=0.5)
    w2, b2 = _leaf(d_out, d_ff, seed=3, scale=0.5), _leaf(d_out, seed=4)

    def fn(x, w1, b1, w2, b2):
        gen = torch.Generator().manual_seed(5)
        return fused_attn.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p, backend="cpu",
                                       generator=gen)

    assert torch.autograd.gradcheck(fn, (x, w1, b1, w2, b2), eps=1e-6, atol=1e-7, rtol=1e-5)


_ATTN_REASON = _cpu_reason("attention_fwd")


@pytest.mark.skipif(_ATTN_REASON is not None, reason=f"C++ CPU backend unavailable: {_ATTN_REASON}")
@pytest.mark.parametrize("case", ["bottom_right_causal_mask_softcap", "top_left_window_dropout", "cross_per_batch"])
def test_attention_alibi_gradcheck(case):
    """ALiBi (alibi_slopes) through fused_attn.attention on the cpu backend: q, k, v (and an additive
    mask) in float64 (the float64 path: BLAS products, the lse recomputed in float64 with the bias)."""
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 5, 7, 4
    q, k = _leaf(B, Hq, Lq, D, seed=0, scale=2.0), _leaf(B, Hkv, Lk, D, seed=1, scale=2.0)
    v = _leaf(B, Hkv, Lk, D, seed=2)
    slopes = torch.tensor([0.5, -0.25, 1.0, 0.125])  # (Hq,): one negative, rewarding distance
    mask, opts = None, {}
    if case == "bottom_right_causal_mask_softcap":
        mask = _leaf(1, Hq, Lq, Lk, seed=3)
        opts = dict(causal=True, alignment="bottom_right", softcap=1.5)
    elif case == "top_left_window_dropout":
        opts = dict(causal=True, window_size=(3, 0), dropout_p=0.3)
    else:  # per-(batch, head) slopes, Lq > Lk, bottom-right without a band
        q = _leaf(B, Hq, 9, D, seed=4)
        slopes = torch.tensor([[0.3, -0.1, 0.7, 0.0], [1.2, 0.05, -0.4, 0.9]])
        opts = dict(alignment="bottom_right")

    def fn(q, k, v, mask):
        gen = torch.Generator().manual_seed(9)  # the same dropout mask on every call
        return fused_attn.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, backend="cpu", generator=gen,
                                    **opts)

    assert torch.autograd.gradcheck(fn, (q, k, v, mask), eps=1e-6, atol=1e-7, rtol=1e-5)
