"""Property-based tests: random shapes, options and strides against the oracle, for every backend
that runs on this machine. Derandomised and bounded so the suite stays fast."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.testing import check_against_reference, make_inputs, runnable_backends

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _maybe_transposed(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The same values, stored (B, L, H, D) and viewed as (B, H, L, D) when ``transpose``."""
    if not transpose:
        return t
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("backend", runnable_backends("attention"))
@SETTINGS
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3), Lq=st.integers(1, 40),
       Lk=st.integers(1, 40), D=st.sampled_from([4, 8, 13, 16]), Dv=st.sampled_from([4, 7, 16]),
       causal=st.booleans(), mask=st.sampled_from([None, "bool", "additive", "row"]), transpose=st.booleans(),
       seed=st.integers(0, 2**16))
def test_attention_random(backend, B, Hkv, group, Lq, Lk, D, Dv, causal, mask, transpose, seed):
    Hq = Hkv * group
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), seed=seed)
    q, k, v = (_maybe_transposed(t, transpose) for t in (q, k, v))
    g = torch.Generator().manual_seed(seed)
    if mask == "bool":
        m = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
    elif mask == "additive":
        m = torch.randn(1, Hq, Lq, Lk, generator=g)
    elif mask == "row":
        m = torch.rand(Lk, generator=g) > 0.2
    else:
        m = None
    inputs = [q, k, v] + ([m] if m is not None else [])
    check_against_reference(
        lambda q, k, v, *mm: F.attention(q, k, v, attn_mask=mm[0] if mm else None, causal=causal, backend=backend),
        lambda q, k, v, *mm: R.attention(q, k, v, mm[0] if mm else None, causal), inputs)


@pytest.mark.parametrize("backend", runnable_backends("layer_norm_residual"))
@SETTINGS
@given(rows=st.integers(1, 40), d=st.integers(1, 300), rms=st.booleans(), affine=st.booleans(),
       residual=st.booleans(), prenorm=st.booleans(), seed=st.integers(0, 2**16))
def test_layer_norm_random(backend, rows, d, rms, affine, residual, prenorm, seed):
    x, r, w, b = make_inputs((rows, d), (rows, d), (d,), (d,), seed=seed)
    inputs = [x, r if residual else None, w if affine else None, b if affine else None]
    check_against_reference(lambda *a: F.layer_norm_residual(*a, rms=rms, prenorm=prenorm, backend=backend),
                            lambda *a: R.layer_norm_residual(*a, rms=rms, prenorm=prenorm), inputs)


@pytest.mark.parametrize("backend", runnable_backends("feed_forward"))
@SETTINGS
@given(T=st.integers(1, 24), d=st.integers(1, 24), d_ff=st.integers(1, 40), d_out=st.integers(1, 24),
       activation=st.sampled_from(R.ACTIVATIONS), biases=st.booleans(), seed=st.integers(0, 2**16))
def test_feed_forward_random(backend, T, d, d_ff, d_out, activation, biases, seed):
    width = 2 * d_ff if activation in R.GATED_ACTIVATIONS else d_ff
    x, w1, b1, w2, b2 = make_inputs((T, d), (width, d), (width,), (d_out, d_ff), (d_out,), seed=seed)
    inputs = [x, w1, b1 if biases else None, w2, b2 if biases else None]
    check_against_reference(lambda *a: F.feed_forward(*a, activation=activation, backend=backend),
                            lambda *a: R.feed_forward(*a, activation=activation), inputs)
