"""The C++ CPU feed-forward kernels against the float64 reference, and their saved memory."""
import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import _extension
from fused_attn import reference as R
from fused_attn.reference import ACTIVATIONS, GATED_ACTIVATIONS
from fused_attn.testing import check_against_reference, make_inputs

_REASON = fused_attn.extension_error() or (
    None if _extension.has_kernel("feed_forward_fwd", "CPU") else "fused_attn._C has no CPU feed_forward kernel")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU backend unavailable: {_REASON}")

NAMES = ["x", "w1", "b1", "w2", "b2"]


def _inputs(shape, d, d_ff, activation, dtype, d_out=None, bias=True, seed=0):
    d_out = d if d_out is None else d_out
    f1 = 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff
    x, w1, b1, w2, b2 = make_inputs(tuple(shape) + (d,), (f1, d), (f1,), (d_out, d_ff), (d_out,), dtype=dtype, seed=seed)
    with torch.no_grad():  # nn.Linear-like scales, so activations sit in their interesting range
        w1.mul_(d ** -0.5)
        w2.mul_(d_ff ** -0.5)
        b1.mul_(0.5)
        b2.mul_(0.5)
    return [x, w1, b1 if bias else None, w2, b2 if bias else None]


def _rng_of(seed):
    return tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(seed)).tolist())


def _fused(activation, dropout_p=0.0, seed=None):
    def fn(x, w1, b1, w2, b2):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return fused_attn.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p, backend="cpu",
                                       generator=gen)
    return fn


def _reference(activation, dropout_p=0.0, seed=None):
    rng = None if seed is None else _rng_of(seed)
    return lambda x, w1, b1, w2, b2: R.feed_forward(x, w1, b1, w2, b2, activation, dropout_p, rng)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations(activation, dtype):
    check_against_reference(_fused(activation), _reference(activation), _inputs((17,), 40, 100, activation, dtype),
                            names=NAMES)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
@pytest.mark.parametrize("half_gemm", ["native", "float32"])
def test_both_half_precision_gemm_paths(monkeypatch, half_gemm, activation, dtype):
    """Half-precision GEMMs run in the input dtype on CPUs with AVX512-BF16/FP16 and in float32 on
    converted operands elsewhere; FUSED_ATTN_CPU_HALF_GEMM forces each path here, so both meet the
    oracle on any CI machine (the native path once added b1 after rounding the GEMM: ReLU's
    derivative then flipped near 0, which only AVX512-BF16 machines saw), with dropout too."""
    monkeypatch.setenv("FUSED_ATTN_CPU_HALF_GEMM", half_gemm)
    inputs = _inputs((17,), 40, 100, activation, dtype)
    check_against_reference(_fused(activation), _reference(activation), inputs, names=NAMES)
    check_against_reference(_fused(activation, 0.25, 77), _reference(activation, 0.25, 77), inputs, names=NAMES)


def test_half_gemm_env_is_checked(monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_CPU_HALF_GEMM", "fp8")
    x, w1, b1, w2, b2 = [t.detach() for t in _inputs((3,), 8, 16, "relu", torch.bfloat16)]
    with pytest.raises(ValueError, match="FUSED_ATTN_CPU_HALF_GEMM must be one of auto, native, float32; got 'fp8'"):
        fused_attn.feed_forward(x, w1, b1, w2, b2, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_no_bias_3d_input_and_other_d_out(activation, dtype):
    inputs = _inputs((3, 7), 40, 59, activation, dtype, d_out=24, bias=False)
    check_against_reference(_fused(activation), _reference(activation), inputs, names=NAMES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dropout_matches_reference(activation, dtype):
    p, seed = 0.25, 77
    inputs = _inputs((17,), 40, 100, activation, dtype)
    check_against_reference(_fused(activation, p, seed), _reference(activation, p, seed), inputs, names=NAMES)


@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_dropout_mask_is_exact(activation):
    """Zeroed columns of h are exactly the reference mask: with w2 = identity the output is h."""
    d_ff, p = 64, 0.5
    x, w1, b1, _, _ = [t.detach() if t is not None else None for t in _inputs((33,), 16, d_ff, activation, torch.float32)]
    w2 = torch.eye(d_ff)
    rng = torch.tensor([5, 1 << 40], dtype=torch.int64)
    out, pre = torch.ops.fused_attn.feed_forward_fwd(x, w1, b1, w2, None, activation, p, rng, "cpu")
    ref_out, ref_pre = torch.ops.fused_attn.feed_forward_fwd(x, w1, b1, w2, None, activation, p, rng, "reference")
    keep = fused_attn.testing.reconstruct_dropout_mask(5, 1 << 40, p, 33, d_ff)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    torch.testing.assert_close(pre, ref_pre)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_empty_tokens(dtype):
    x, w1, b1, w2, b2 = [t.detach() for t in _inputs((0,), 8, 12, "gelu", dtype)]
    out = fused_attn.feed_forward(x, w1, b1, w2, b2, activation="gelu", backend="cpu")
    assert out.shape == (0, 8)
    dx, dw1, db1, dw2, db2 = torch.ops.fused_attn_C.feed_forward_bwd(out, x, w1, w2, torch.empty(0, 12, dtype=dtype),
                                                                     "gelu", 0.0, 0, 0, True, True)
    assert dx.shape == (0, 8) and torch.equal(dw1, torch.zeros_like(w1)) and torch.equal(db1, torch.zeros_like(b1))
    assert torch.equal(dw2, torch.zeros_like(w2)) and torch.equal(db2, torch.zeros_like(b2))


def test_inputs_not_modified():
    inputs = [t.detach() for t in _inputs((9,), 16, 24, "swiglu", torch.bfloat16)]
    copies = [t.clone() for t in inputs]
    fused_attn.feed_forward(*inputs, activation="swiglu", backend="cpu")
    for t, c in zip(inputs, copies):
        assert torch.equal(t, c)


def _saved_bytes(fn, *args):
    """Bytes of the tensors the graph saves, the parameters (w1, b1, w2, b2, saved by reference,
    no memory of their own) left out."""
    total = [0]
    params = {a.untyped_storage().data_ptr() for a in args[1:] if a is not None}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return total[0]


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_saves_less_memory_than_eager(activation):
    """Eager saves x, pre (for the activation) and h (for the second Linear); fused: x and pre."""
    x, w1, b1, w2, b2 = _inputs((64,), 32, 128, activation, torch.float32)

    def eager(x, w1, b1, w2, b2):
        return F.linear(R.activation_fn(F.linear(x, w1, b1), activation), w2, b2)

    fused = _saved_bytes(_fused(activation), x, w1, b1, w2, b2)
    ref = _saved_bytes(eager, x, w1, b1, w2, b2)
    h_bytes = 64 * 128 * 4
    assert fused <= ref - h_bytes, (fused, ref)


def test_bad_input_raises():
    x, w1, b1, w2, b2 = [t.detach() for t in _inputs((5,), 8, 12, "relu", torch.float32)]
    f = torch.ops.fused_attn_C.feed_forward_fwd
    bad = [
        lambda: f(x, w1, b1, w2, b2, "tanh", 0.0, 0, 0),
        lambda: f(x[0], w1, b1, w2, b2, "relu", 0.0, 0, 0),
        lambda: f(x, w1[:, :7], b1, w2, b2, "relu", 0.0, 0, 0),
        lambda: f(x, w1, b1[:3], w2, b2, "relu", 0.0, 0, 0),
        lambda: f(x, w1, b1, w2[:, :5], b2, "relu", 0.0, 0, 0),
        lambda: f(x, w1, b1, w2, b2[:2], "relu", 0.0, 0, 0),
        lambda: f(x, w1.double(), b1, w2, b2, "relu", 0.0, 0, 0),
        lambda: f(x.int(), w1, b1, w2, b2, "relu", 0.0, 0, 0),
        lambda: f(x, w1[:11], b1[:11], w2, b2, "swiglu", 0.0, 0, 0),  # odd gated width
        lambda: f(x, w1, b1, w2, b2, "relu", 1.5, 0, 0),
    ]
    out, pre = f(x, w1, b1, w2, b2, "relu", 0.0, 0, 0)
    g = torch.ops.fused_attn_C.feed_forward_bwd
    bad += [
        lambda: g(out[:, :3], x, w1, w2, pre, "relu", 0.0, 0, 0, True, True),
        lambda: g(out, x, w1, w2, pre[:, :5], "relu", 0.0, 0, 0, True, True),
        lambda: g(out, x, w1, w2, pre.double(), "relu", 0.0, 0, 0, True, True),
        lambda: g(out, x, w1, w2, pre, "gelu_erf", 0.0, 0, 0, True, True),
    ]
    for call in bad:
        with pytest.raises(RuntimeError):
            call()
