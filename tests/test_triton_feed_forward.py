"""The Triton feed-forward kernels (fused_attn/triton/feed_forward.py) against the float64 oracle.

Without a GPU these run under TRITON_INTERPRET=1 (set by conftest), float32 and float16 only,
on small odd shapes (the interpreter is slow per element).
"""
import pytest
import torch

import fused_attn.functional as F
from fused_attn import reference as R
from fused_attn.backends import get_backend
from fused_attn.backends.base import Call
from fused_attn.testing import check_against_reference, make_inputs, reconstruct_dropout_mask

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]
GATED = {"swiglu", "geglu"}
DTYPES = [torch.float32, torch.float16]
NAMES = ["x", "w1", "b1", "w2", "b2"]


def _triton_available(device):
    reasons = get_backend("triton").call_reasons(Call("feed_forward", torch.device(device), torch.float32))
    return not reasons, reasons


@pytest.fixture(autouse=True)
def _need_triton(device):
    ok, reasons = _triton_available(device)
    if not ok:  # e.g. triton not installed; conftest turns the interpreter on when CUDA is absent
        pytest.skip("; ".join(reasons))


def _ffn_inputs(T, d, d_ff, activation, dtype, device, bias=True, d_out=None, seed=0, leading=()):
    F1 = 2 * d_ff if activation in GATED else d_ff
    d_out = d if d_out is None else d_out
    x, w1, b1, w2, b2 = make_inputs((*leading, T, d), (F1, d), (F1,), (d_out, d_ff), (d_out,), dtype=dtype,
                                    device=device, seed=seed, scale=0.5)
    if not bias:
        b1 = b2 = None
    return x, w1, b1, w2, b2


def _fused(activation, dropout_p=0.0, seed=None):
    def fn(x, w1, b1, w2, b2):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return F.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p, backend="triton",
                              generator=gen)
    return fn


def _reference(activation):
    def fn(x, w1, b1, w2, b2):
        return R.feed_forward(x, w1, b1, w2, b2, activation=activation)
    return fn


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_oracle(activation, dtype, bias, device):
    """17 tokens, d_model 40, d_ff 100: nothing is a multiple of the 32-wide interpreter tiles."""
    x, w1, b1, w2, b2 = _ffn_inputs(17, 40, 100, activation, dtype, device, bias=bias)
    check_against_reference(_fused(activation), _reference(activation), [x, w1, b1, w2, b2], names=NAMES)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("shape", [(1, 59, 33, 7), (97, 16, 64, 40)], ids=["T1-d59", "T97-dout40"])
def test_odd_shapes_and_leading_dims(activation, shape, device):
    T, d, d_ff, d_out = shape
    x, w1, b1, w2, b2 = _ffn_inputs(T, d, d_ff, activation, torch.float32, device, d_out=d_out, leading=(2,))
    check_against_reference(_fused(activation), _reference(activation), [x, w1, b1, w2, b2], names=NAMES)


def test_transposed_weight_views(device):
    """Weights that are transposed views (not contiguous) are read through their strides."""
    x, w1, b1, w2, b2 = _ffn_inputs(17, 40, 48, "swiglu", torch.float32, device)
    w1t = w1.detach().t().contiguous().t().requires_grad_()
    w2t = w2.detach().t().contiguous().t().requires_grad_()
    assert not w1t.is_contiguous() and not w2t.is_contiguous()
    check_against_reference(_fused("swiglu"), _reference("swiglu"), [x, w1t, b1, w2t, b2], names=NAMES)


def _bias_view(b, layout):
    """``b``'s values (for "expanded": its first value repeated) as a 1-D view of another layout,
    built from ``b`` so that its gradient flows back to it: "strided" (stride 2, storage offset
    1), "expanded" (stride 0 over one element) or "offset" (unit stride, storage offset 3)."""
    n = b.shape[0]
    if layout == "strided":
        return torch.cat([b.new_zeros(1), b.repeat_interleave(2)])[1::2]
    if layout == "expanded":
        return b[:1].expand(n)
    return torch.cat([b.new_zeros(3), b])[3:]


@pytest.mark.parametrize("layout", ["strided", "expanded", "offset"])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_bias_views(activation, layout, device):
    """b1 and b2 as non-contiguous 1-D views: the epilogue used to read bias[n] at bias_ptr + n,
    so a stride-2 slice gave the wrong biases and a stride-0 expand read past its one element
    (garbage under the interpreter, an out-of-bounds read on a GPU). Forward and the gradients
    of the biases' sources against the oracle."""
    x, w1, b1, w2, b2 = _ffn_inputs(17, 40, 48, activation, torch.float32, device)

    def run(fn):
        return lambda x, w1, b1, w2, b2: fn(x, w1, _bias_view(b1, layout), w2, _bias_view(b2, layout))

    check_against_reference(run(_fused(activation)), run(_reference(activation)), [x, w1, b1, w2, b2], names=NAMES)


def test_bias_views_at_the_op(device):
    """The registered op itself with a stride-0 b2 and a strided b1: pre and out as torch computes them."""
    x, w1, _, w2, _ = (t.detach() for t in _ffn_inputs(9, 16, 20, "gelu", torch.float32, device))
    b1 = torch.randn(41, device=device)[1::2]
    b2 = torch.tensor([0.5], device=device).expand(16)
    out, pre = torch.ops.fused_attn.feed_forward_fwd(x, w1, b1, w2, b2, "gelu", 0.0, None, "triton")
    torch.testing.assert_close(pre, x @ w1.t() + b1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, torch.nn.functional.gelu(pre) @ w2.t() + 0.5, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu_tanh", "geglu"])
def test_dropout_matches_reference_backend(activation, dtype, device):
    """Same generator -> same (seed, offset) -> the reference's mask bit for bit, forward and backward."""
    x, w1, b1, w2, b2 = _ffn_inputs(17, 40, 100, activation, dtype, device)

    def reference(x, w1, b1, w2, b2):
        return F.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=0.3, backend="reference",
                              generator=torch.Generator().manual_seed(7))

    check_against_reference(_fused(activation, 0.3, seed=7), reference, [x, w1, b1, w2, b2], names=NAMES)


@pytest.mark.parametrize("offset", [5, 3 * 2**32 + 11], ids=["small-offset", "offset>2^32"])
def test_dropout_mask_is_the_shared_hash(offset, device):
    """With w2 = identity and silu (non-zero almost everywhere) the output *is* the dropped
    activation, so its zero pattern is the keep-mask of fused_attn._rng exactly."""
    T, d, d_ff, p, seed = 37, 24, 70, 0.4, -1234567890123
    x, w1 = make_inputs((T, d), (d_ff, d), device=device, requires_grad=False)
    w2 = torch.eye(d_ff, device=device)
    rng = torch.tensor([seed, offset], dtype=torch.int64)
    out, pre = torch.ops.fused_attn.feed_forward_fwd(x, w1, None, w2, None, "silu", p, rng, "triton")
    keep = reconstruct_dropout_mask(seed, offset, p, T, d_ff)
    assert 0.45 < keep.float().mean() < 0.75
    torch.testing.assert_close(pre, x @ w1.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out.cpu() != 0, keep)
    expected = torch.nn.functional.silu(pre) * keep.to(pre.device) / (1 - p)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_contract_pre_and_absent_bias_grads(device):
    """pre = x w1^T + b1 with [gate | up] halves; db1/db2 are empty tensors when has_b1/has_b2 are false."""
    x, w1, b1, w2, b2 = _ffn_inputs(9, 16, 20, "swiglu", torch.float32, device)
    x, w1, b1, w2 = (t.detach() for t in (x, w1, b1, w2))
    out, pre = torch.ops.fused_attn.feed_forward_fwd(x, w1, b1, w2, None, "swiglu", 0.0, None, "triton")
    assert pre.shape == (9, 40) and pre.is_contiguous() and out.shape == (9, 16)
    torch.testing.assert_close(pre, x @ w1.t() + b1, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    dx, dw1, db1, dw2, db2 = torch.ops.fused_attn.feed_forward_bwd(dout, x, w1, w2, pre, "swiglu", 0.0, None,
                                                                   False, False, "triton")
    assert db1.numel() == 0 and db2.numel() == 0
    assert dx.shape == x.shape and dw1.shape == w1.shape and dw2.shape == w2.shape
    assert all(g.is_contiguous() for g in (dx, dw1, dw2))


def test_empty_tokens(device):
    x, w1, b1, w2, b2 = _ffn_inputs(0, 16, 20, "gelu", torch.float32, device)
    out = _fused("gelu")(x, w1, b1, w2, b2)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert torch.count_nonzero(w1.grad) == 0 and torch.count_nonzero(b2.grad) == 0 and x.grad.shape == x.shape


def test_inputs_are_not_modified(device):
    inputs = _ffn_inputs(17, 40, 36, "geglu", torch.float16, device)
    before = [t.detach().clone() for t in inputs]
    _fused("geglu", 0.2, seed=1)(*inputs).float().sum().backward()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, inputs))


def _saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs, the
    parameters (w1, b1, w2, b2: saved by reference, no memory of their own) left out."""
    storages = {}
    params = {a.untyped_storage().data_ptr() for a in args[1:] if a is not None}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


@pytest.mark.parametrize("activation,dropout_p", [("gelu", 0.0), ("silu", 0.0), ("swiglu", 0.0),
                                                  ("geglu", 0.0), ("relu", 0.1), ("relu", 0.0)])
def test_saved_for_backward_is_smaller_than_unfused(activation, dropout_p, device):
    """The fused block saves x, w1, w2 and pre; the unfused nn.Linear -> act -> dropout -> nn.Linear
    saves pre *and* the activation (and the mask; for gated ones also act(gate)). ReLU without dropout
    is the one tie: unfused relu saves only its output h, which is also linear2's input."""
    T, d, d_ff = 64, 16, 64
    x, w1, b1, w2, b2 = _ffn_inputs(T, d, d_ff, activation, torch.float16, device)
    fused = _saved_bytes(_fused(activation, dropout_p, seed=0), x, w1, b1, w2, b2)

    def unfused(x, w1, b1, w2, b2):
        h = R.activation_fn(torch.nn.functional.linear(x, w1, b1), activation)
        return torch.nn.functional.linear(torch.nn.functional.dropout(h, dropout_p), w2, b2)

    baseline = _saved_bytes(unfused, x, w1, b1, w2, b2)
    act_bytes = T * d_ff * x.element_size()
    if activation == "relu" and dropout_p == 0.0:
        assert fused <= baseline
    else:
        assert fused <= baseline - act_bytes, (fused, baseline)


@pytest.mark.parametrize("activation,dropout_p,dtype", [("gelu", 0.0, torch.float32), ("swiglu", 0.25, torch.float32),
                                                        ("geglu", 0.0, torch.float16)])
def test_backward_in_column_chunks(activation, dropout_p, dtype, device, monkeypatch):
    """Wide layers run the backward over d_ff in column chunks (dpre and h one chunk at a time,
    dx accumulated over chunks); shrink the chunk width so a small layer takes that path:
    100 = 32 + 32 + 32 + 4."""
    from fused_attn.triton import feed_forward as ff
    monkeypatch.setattr(ff, "BWD_CHUNK_MIN_COLS", 32)
    monkeypatch.setattr(ff, "BWD_CHUNK_ALIGN", 32)
    assert ff._bwd_chunks(100) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    x, w1, b1, w2, b2 = _ffn_inputs(17, 24, 100, activation, dtype, device)

    def reference(x, w1, b1, w2, b2):
        return F.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=dropout_p, backend="reference",
                              generator=torch.Generator().manual_seed(3))

    check_against_reference(_fused(activation, dropout_p, seed=3), reference, [x, w1, b1, w2, b2], names=NAMES)


# ---------------------------------------------------------------------------------------------
# the TMA path (AB_TMA): forced on with FUSED_ATTN_TRITON_TMA=on, which the interpreter honours
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def streamed(monkeypatch):
    """Turns TMA on and records, per GEMM launch, whether A and B went in as descriptors (then the
    kernel reads them: under the interpreter by construction, on a GPU because TMA_KEY 2 leaves
    the autotuner only the TMA twins)."""
    from fused_attn.triton import feed_forward as ff
    monkeypatch.setenv("FUSED_ATTN_TRITON_TMA", "on")
    launches = []
    describe = ff.gemm_descriptors

    def spy(a, b_km, tma=None):
        result = describe(a, b_km, tma)
        launches.append(result[3] == 2)
        return result

    monkeypatch.setattr(ff, "gemm_descriptors", spy)
    return launches


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_tma_path_matches_oracle(activation, device, streamed):
    """Rows of 40 and 104 half-precision elements are 16-byte multiples: every GEMM (both forward
    ones, the backward's fused one) loads its tiles through descriptors, zero-filled at the edges
    (17 tokens, 104 = 3 x 32 + 8 columns)."""
    x, w1, b1, w2, b2 = _ffn_inputs(17, 40, 104, activation, torch.float16, device)
    check_against_reference(_fused(activation), _reference(activation), [x, w1, b1, w2, b2], names=NAMES)
    assert len(streamed) == 3 and all(streamed)


def test_tma_path_chunked_backward_and_dropout(device, streamed, monkeypatch):
    """The backward's column chunks of w2 (base pointers 64 bytes apart, a last chunk 8 wide) as
    (K, N) descriptors, with dropout and the gated activation's two B tiles."""
    from fused_attn.triton import feed_forward as ff
    monkeypatch.setattr(ff, "BWD_CHUNK_MIN_COLS", 32)
    monkeypatch.setattr(ff, "BWD_CHUNK_ALIGN", 32)
    x, w1, b1, w2, b2 = _ffn_inputs(33, 24, 104, "swiglu", torch.float16, device)

    def reference(x, w1, b1, w2, b2):
        return F.feed_forward(x, w1, b1, w2, b2, activation="swiglu", dropout_p=0.25, backend="reference",
                              generator=torch.Generator().manual_seed(3))

    check_against_reference(_fused("swiglu", 0.25, seed=3), reference, [x, w1, b1, w2, b2], names=NAMES)
    assert len(streamed) == 2 + 4 and all(streamed)


def test_tma_falls_back_to_pointers(device, streamed):
    """d_ff = 100 half-precision elements (200 bytes) per row of w2 and h: not 16-byte multiples,
    so the GEMMs reading them take the pointer path (the first forward GEMM still streams)."""
    x, w1, b1, w2, b2 = _ffn_inputs(17, 40, 100, "gelu", torch.float16, device)
    check_against_reference(_fused("gelu"), _reference("gelu"), [x, w1, b1, w2, b2], names=NAMES)
    assert streamed == [True, False, False]


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bfloat16_and_wide_layer_on_gpu(activation, device):
    """Compiled kernels (autotuned configs, tensor cores), bfloat16, and a d_ff wide enough for
    the chunked backward (2560 columns -> 3 chunks of at most 1024)."""
    x, w1, b1, w2, b2 = _ffn_inputs(1000, 256, 2560, activation, torch.bfloat16, device)
    check_against_reference(_fused(activation), _reference(activation), [x, w1, b1, w2, b2], names=NAMES)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_tma_path_on_gpu(activation, device, monkeypatch):
    """The TMA twins on an sm_90+ GPU (skipped below), bfloat16, chunked backward."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or newer")
    monkeypatch.setenv("FUSED_ATTN_TRITON_TMA", "on")
    x, w1, b1, w2, b2 = _ffn_inputs(1000, 256, 2560, activation, torch.bfloat16, device)
    check_against_reference(_fused(activation), _reference(activation), [x, w1, b1, w2, b2], names=NAMES)
