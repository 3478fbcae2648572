"""The functional API through the op machinery (autograd Functions -> registered ops -> backend).

Runs on the reference backend everywhere, and on every other backend that can run on this
machine (so the same semantics hold for all of them).
"""
import pytest
import torch

import fused_attn
from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.backends import BACKENDS, Call
from fused_attn.ops_common import NO_BAND
from fused_attn.testing import check_against_reference, compare, make_inputs


def runnable(op, dtype=torch.float32):
    call = Call(op, torch.device("cpu"), dtype, {})
    return [name for name, b in BACKENDS.items() if not b.call_reasons(call)]


@pytest.mark.parametrize("backend", runnable("attention"))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 2, 17, 9, 16, 8), (1, 2, 2, 1, 5, 8, 8), (1, 3, 1, 7, 7, 4, 6)])
def test_attention_options_meet_oracle(backend, causal, shape):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv))
    mask = make_inputs((Lq, Lk), seed=3)[0]
    check_against_reference(lambda q, k, v, m: F.attention(q, k, v, attn_mask=m, causal=causal, backend=backend),
                            lambda q, k, v, m: R.attention(q, k, v, m, causal), [q, k, v, mask], names=["q", "k", "v", "mask"])


@pytest.mark.parametrize("backend", runnable("attention"))
def test_attention_output_layout_and_empty(backend):
    q, k, v = make_inputs((2, 3, 5, 4), (2, 3, 6, 4), (2, 3, 6, 4))
    out = F.attention(q, k, v, backend=backend)
    assert out.shape == (2, 3, 5, 4) and out.transpose(1, 2).is_contiguous()
    empty = F.attention(q[:, :, :0], k, v, backend=backend)
    assert empty.shape == (2, 3, 0, 4)
    no_keys = F.attention(q, k[:, :, :0], v[:, :, :0], backend=backend)
    assert no_keys.shape == (2, 3, 5, 4) and torch.all(no_keys == 0)


@pytest.mark.parametrize("backend", runnable("attention"))
def test_attention_dropout_is_reproducible_and_matches_reference(backend):
    q, k, v = make_inputs((1, 2, 9, 8), (1, 2, 11, 8), (1, 2, 11, 8), requires_grad=False)
    rng = torch.tensor([1234, 56])
    out, _ = torch.ops.fused_attn.attention_fwd(q, k, v, None, *NO_BAND, 0.25, 8 ** -0.5, rng, backend)
    again, _ = torch.ops.fused_attn.attention_fwd(q, k, v, None, *NO_BAND, 0.25, 8 ** -0.5, rng, backend)
    assert torch.equal(out, again)
    torch.testing.assert_close(out, R.attention(q, k, v, dropout_p=0.25, rng=(1234, 56)))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = F.attention(q, k, v, dropout_p=0.5, generator=g1, backend=backend)
    b = F.attention(q, k, v, dropout_p=0.5, generator=g2, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", runnable("layer_norm_residual"))
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("prenorm", [False, True])
def test_layer_norm_residual_meets_oracle(backend, rms, prenorm):
    x, r, w, b = make_inputs((3, 5, 33), (3, 5, 33), (33,), (33,))
    check_against_reference(
        lambda *a: F.layer_norm_residual(*a, rms=rms, prenorm=prenorm, backend=backend),
        lambda *a: R.layer_norm_residual(*a, rms=rms, prenorm=prenorm), [x, r, w, b], names=["x", "residual", "w", "b"])


@pytest.mark.parametrize("backend", runnable("layer_norm_residual"))
@pytest.mark.parametrize("create_graph", [False, True])
def test_layer_norm_residual_leaf_grads_do_not_share_memory(backend, create_graph):
    """x and residual get the one gradient (no dropout): as leaves their .grad must still be two
    tensors, as torch gives for layer_norm(x + r). Two views of one buffer became both .grads, so a
    second backward accumulated 3x instead of 2x and an in-place change of one changed the other."""
    x = torch.randn(3, 8, requires_grad=True)
    r = torch.randn(3, 8, requires_grad=True)
    first = None
    for _ in range(2):
        out = F.layer_norm_residual(x, r, backend=backend)
        out.pow(2).sum().backward(create_graph=create_graph)
        if first is None:
            first = x.grad.detach().clone()
    torch.testing.assert_close(x.grad, 2 * first)
    torch.testing.assert_close(r.grad, 2 * first)
    assert x.grad.data_ptr() != r.grad.data_ptr()
    x.grad.mul_(0)  # (torch.autograd.grad may hand back one tensor for both, as torch's x + r does)
    torch.testing.assert_close(r.grad, 2 * first)


@pytest.mark.parametrize("backend", runnable("layer_norm_residual"))
def test_layer_norm_residual_without_residual_or_affine(backend):
    (x,) = make_inputs((4, 7))
    check_against_reference(lambda x: F.layer_norm_residual(x, backend=backend), lambda x: R.layer_norm_residual(x), [x])


@pytest.mark.parametrize("backend", runnable("layer_norm_residual"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_residual_inference_skips_the_sum(backend, dtype):
    """Without grad and without prenorm the op is asked not to store the sum (one output stream):
    the output is unchanged, the op's second output is empty; with prenorm the sum is returned."""
    x, r, w, b = (t.to(dtype) for t in make_inputs((37, 40), (37, 40), (40,), (40,)))
    w.requires_grad_(True)  # parameters of a model under no_grad still require grad
    with torch.no_grad():
        out = F.layer_norm_residual(x, r, w, b, backend=backend)
        full, summed = F.layer_norm_residual(x, r, w, b, prenorm=True, backend=backend)
        op = torch.ops.fused_attn.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, False, None, backend, False)
    assert torch.equal(out, full)
    assert torch.equal(summed, x + r)
    assert op[1].numel() == 0 and op[1].dtype == dtype
    assert torch.equal(op[0], out)
    ref = R.layer_norm_residual(x.double(), r.double(), w.double(), b.double())
    assert (out.double() - ref).abs().max() < (2e-2 if dtype == torch.float16 else 1e-5)


@pytest.mark.parametrize("backend", runnable("feed_forward"))
@pytest.mark.parametrize("activation", R.ACTIVATIONS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
def test_feed_forward_meets_oracle(backend, activation, dropout_p):
    """Every backend, every activation, with and without dropout. The dropout mask is the shared
    counter hash of (seed, offset): the functional call draws the pair from its generator, and the
    oracle's reference takes the pair drawn from a generator seeded alike (fused_attn._rng), so that
    it drops the same elements of h (the mask then reaches dx, dw1 and db1 through dh, and dw2
    through h itself, each backend's own backward)."""
    width = 2 * 10 if activation in R.GATED_ACTIVATIONS else 10
    x, w1, b1, w2, b2 = make_inputs((2, 3, 6), (width, 6), (width,), (5, 10), (5,))
    seed = 21
    gen = torch.Generator().manual_seed(seed)
    rng = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=gen).tolist())
    check_against_reference(lambda *a: F.feed_forward(*a, activation=activation, dropout_p=dropout_p, backend=backend,
                                                      generator=torch.Generator().manual_seed(seed)),
                            lambda *a: R.feed_forward(*a, activation=activation, dropout_p=dropout_p, rng=rng),
                            [x, w1, b1, w2, b2], names=["x", "w1", "b1", "w2", "b2"])


def test_inputs_are_not_modified():
    q, k, v = make_inputs((1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 5, 4))
    before = [t.detach().clone() for t in (q, k, v)]
    F.attention(q, k, v, causal=True, dropout_p=0.3).sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))


def test_public_names():
    assert fused_attn.attention is F.attention
    assert set(fused_attn.available_backends()) == {"triton", "cuda", "cpu", "reference"}


@pytest.mark.parametrize("backend", runnable("attention"))
def test_inference_calls_skip_the_autograd_layers_and_give_the_same_outputs(backend, monkeypatch):
    """A call that builds no autograd graph (no_grad, or no input requiring grad) runs the op's
    implementation directly; its outputs equal, bit for bit, those of the autograd path, with
    dropout, masks and prenorm included."""
    from fused_attn import ops

    q, k, v = make_inputs((2, 4, 9, 8), (2, 2, 11, 8), (2, 2, 11, 8))
    mask = make_inputs((9, 11), seed=5)[0].detach()
    x, r, w, b = make_inputs((3, 5, 16), (3, 5, 16), (16,), (16,), seed=6)
    fx, w1, b1, w2, b2 = make_inputs((7, 16), (24, 16), (24,), (16, 12), (16,), seed=7)
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    calls = {
        "attention": lambda: F.attention(q, k, v, attn_mask=mask, causal=True, dropout_p=0.3, generator=gen(),
                                         backend=backend),
        "layer_norm": lambda: F.layer_norm_residual(x, r, w, b, dropout_p=0.2, prenorm=True, generator=gen(),
                                                    backend=backend if backend in runnable("layer_norm_residual")
                                                    else "reference"),
        "feed_forward": lambda: F.feed_forward(fx, w1, b1, w2, b2, activation="swiglu", dropout_p=0.1,
                                               generator=gen(), backend=backend if backend in
                                               runnable("feed_forward") else "reference"),
    }
    with_graph = {name: call() for name, call in calls.items()}

    def refuse(*args, **kwargs):
        raise AssertionError("an inference call went through the autograd Function")

    for fn in (ops.AttentionFunction, ops.LayerNormResidualFunction, ops.FeedForwardFunction):
        monkeypatch.setattr(fn, "apply", refuse)
    with torch.no_grad():
        for name, call in calls.items():
            expected, got = with_graph[name], call()
            for e, g in zip(expected if isinstance(expected, tuple) else (expected,),
                            got if isinstance(got, tuple) else (got,)):
                assert not g.requires_grad and torch.equal(e.detach(), g), name
    with pytest.raises(AssertionError, match="autograd Function"):
        calls["attention"]()  # grad mode with inputs that require grad: the autograd path


def test_fake_tensors_take_the_registered_ops():
    """Under FakeTensorMode (shape inference, tracing tools) calls go through the registered ops
    and their fake implementations, also without grad, where real tensors would skip them."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    backend = "cpu" if "cpu" in runnable("attention") else "reference"
    with FakeTensorMode(), torch.no_grad():
        q, k, v = torch.empty(2, 4, 16, 8), torch.empty(2, 2, 12, 8), torch.empty(2, 2, 12, 6)
        assert F.attention(q, k, v, backend=backend).shape == (2, 4, 16, 6)
        x, w = torch.empty(3, 5, 16), torch.empty(16)
        out, summed = F.layer_norm_residual(x, x, w, w, prenorm=True, backend=backend)
        assert out.shape == summed.shape == (3, 5, 16)
        w1, w2 = torch.empty(24, 16), torch.empty(16, 24)
        assert F.feed_forward(x, w1, None, w2, None, activation="gelu", backend=backend).shape == (3, 5, 16)


@pytest.mark.parametrize("backend", runnable("attention"))
def test_registered_op_path_and_direct_path_agree(backend, monkeypatch):
    """Eager calls on plain tensors run the ops' implementations directly (ops.direct_call_ok);
    traced, subclassed or mode-intercepted calls go through the registered custom ops. Forced
    through the custom ops here, outputs and every gradient are the same bits."""
    from fused_attn import functional, ops

    def run():
        q, k, v = make_inputs((2, 4, 9, 8), (2, 2, 11, 8), (2, 2, 11, 8))
        mask = make_inputs((9, 11), seed=5)[0]
        x, r, w, b = make_inputs((3, 5, 16), (3, 5, 16), (16,), (16,), seed=6)
        fx, w1, b1, w2, b2 = make_inputs((7, 16), (24, 16), (24,), (16, 12), (16,), seed=7)
        gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
        other = lambda op: backend if backend in runnable(op) else "reference"  # noqa: E731
        outs = [F.attention(q, k, v, attn_mask=mask, causal=True, dropout_p=0.3, generator=gen(), backend=backend),
                *F.layer_norm_residual(x, r, w, b, dropout_p=0.2, prenorm=True, generator=gen(),
                                       backend=other("layer_norm_residual")),
                F.feed_forward(fx, w1, b1, w2, b2, activation="swiglu", dropout_p=0.1, generator=gen(),
                               backend=other("feed_forward"))]
        leaves = [q, k, v, mask, x, r, w, b, fx, w1, b1, w2, b2]
        grads = torch.autograd.grad([o.square().sum() for o in outs], leaves)
        return [o.detach() for o in outs] + list(grads)

    direct = run()
    calls = []
    registered = torch.ops.fused_attn.attention_fwd

    def spy(*args):
        calls.append(1)
        return registered(*args)

    monkeypatch.setattr(ops, "direct_call_ok", lambda *tensors: False)
    monkeypatch.setattr(functional, "direct_call_ok", lambda *tensors: False)
    monkeypatch.setattr(functional, "_eager_inference", lambda *tensors: False)
    monkeypatch.setattr(torch.ops.fused_attn, "attention_fwd", spy)
    through_ops = run()
    assert calls, "the forced run did not go through the registered op"
    for a, b in zip(direct, through_ops):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # (gpu: pytest -m gpu)
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
def test_feed_forward_backward_same_from_pre_or_relu_output(backend, device):
    """The op contract lets a forward save h = relu(pre) in place of pre for relu without dropout
    (the cuda backend does: its GEMM applies the ReLU). Every backward must then give bitwise the
    same gradients from either, exact zeros in pre included (relu'(0) = 0 both ways)."""
    call = Call("feed_forward", torch.device(device), torch.float32, {"activation": "relu", "dropout": False})
    reasons = BACKENDS[backend].call_reasons(call)
    if reasons:
        pytest.skip(f"{backend} cannot run here: {reasons}")
    gen = torch.Generator().manual_seed(5)
    x, w1, w2, dout = (torch.randn(*s, generator=gen).to(device) for s in ((7, 16), (24, 16), (8, 24), (7, 8)))
    pre = x @ w1.t()
    pre[:, :3] = 0.0
    grads = [torch.ops.fused_attn.feed_forward_bwd(dout, x, w1, w2, saved, "relu", 0.0, None, True, True, backend)
             for saved in (pre, torch.relu(pre))]
    assert (pre < 0).any() and (pre > 0).any()
    for name, from_pre, from_h in zip(("dx", "dw1", "db1", "dw2", "db2"), *grads):
        assert torch.equal(from_pre, from_h), f"{backend}: {name} differs when the saved tensor is relu(pre)"


def test_autocast_follows_torch_policy():
    """Under torch.autocast (CPU, bfloat16): feed_forward casts float32 operands as nn.Linear does
    and attention as SDPA does (the same results as the bfloat16 call); a norm takes float32
    parameters and a float32 residual next to bfloat16 x (the sum kept in float32), returning x's
    dtype; float32 parameters get float32 gradients. Outside autocast, mixed dtypes still raise."""
    x, w1, b1, w2, b2 = make_inputs((3, 7, 16), (40, 16), (40,), (16, 40), (16,), seed=5)
    q, k, v = make_inputs((2, 4, 9, 16), (2, 2, 9, 16), (2, 2, 9, 16), seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = F.feed_forward(x, w1, b1, w2, b2, activation="gelu")
        att = F.attention(q, k, v, causal=True)
        xb = h.detach().requires_grad_()
        normed, summed = F.layer_norm_residual(xb, x, b2 + 1, b2, prenorm=True)
    assert h.dtype == att.dtype == normed.dtype == torch.bfloat16 and summed.dtype == torch.float32
    bf = [t.detach().bfloat16() for t in (x, w1, b1, w2, b2)]
    assert torch.equal(h, F.feed_forward(*bf, activation="gelu"))
    assert torch.equal(att, F.attention(*[t.detach().bfloat16() for t in (q, k, v)], causal=True))
    torch.testing.assert_close(summed, xb.float() + x, rtol=0, atol=0)
    (h.float().sum() + att.float().sum() + normed.float().sum()).backward()
    assert w1.grad.dtype == torch.float32 and q.grad.dtype == torch.float32 and w2.grad.isfinite().all()
    with pytest.raises(TypeError, match="w1 has dtype float32 but x has bfloat16"):
        F.feed_forward(x.detach().bfloat16(), w1, b1, w2, b2)


@pytest.mark.parametrize("backend", [b for b in runnable("layer_norm_residual", torch.float16) if b in ("cpu", "reference")])
def test_norm_residual_of_another_dtype_under_autocast_follows_promotion(backend):
    """Under autocast the residual add follows torch's type promotion, as ``x + residual`` does: a
    bfloat16 residual next to float16 x is summed in float32 (returned float32, the normed output
    in x's dtype, as with a float32 residual); a float64 one makes the sum and the output float64.
    (Both were cast to x's dtype: 1e5 in bfloat16 became float16's inf, and float64 was rounded.)
    Outside autocast they still raise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, generator=g).half()
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    for res in (torch.full((3, 8), 1e5).bfloat16() + torch.randn(3, 8, generator=g).bfloat16() * 100,
                torch.randn(3, 8, generator=g, dtype=torch.float64) * 1e5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, summed = F.layer_norm_residual(x, res, w, b, prenorm=True, backend=backend)
            expected_sum = x + res  # torch's promotion under autocast
        assert summed.dtype == expected_sum.dtype and torch.equal(summed, expected_sum)
        assert out.dtype == (torch.float64 if res.dtype == torch.float64 else torch.float16)
        # the parameters are used in x's dtype (float64 here when the residual widens x)
        w_used, b_used = (p.to(out.dtype) for p in (w, b))
        exact = torch.nn.functional.layer_norm(expected_sum.double(), (8,), w_used.double(), b_used.double())
        rounded = torch.nn.functional.layer_norm(expected_sum, (8,), w_used.to(expected_sum.dtype),
                                                 b_used.to(expected_sum.dtype)).to(out.dtype)
        compare("out", out, exact, rounded)
        with pytest.raises(TypeError, match=f"residual has dtype {str(res.dtype)[6:]} but x has float16"):
            F.layer_norm_residual(x, res, w, b, backend=backend)


@pytest.mark.parametrize("op", ["attention", "varlen", "layer_norm", "feed_forward"])
def test_reference_backend_under_autocast_is_the_precast_call(op):
    """The reference backend under autocast computes what it computes on autocast's casts made
    beforehand, bitwise, forward and backward: its own matmuls are not cast a second time (they were:
    the oracle's float32 scores and lse ran in bfloat16, the lse came back bfloat16)."""
    g = torch.Generator().manual_seed(0)
    if op in ("attention", "varlen"):
        shape = (2, 4, 9, 16) if op == "attention" else (9, 4, 16)
        inputs = [torch.randn(*shape, generator=g, requires_grad=True) for _ in range(3)]
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)

        def call(q, k, v):
            if op == "attention":
                return F.attention(q, k, v, causal=True, return_lse=True, backend="reference")
            return F.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True, backend="reference")
    elif op == "layer_norm":
        inputs = [torch.randn(5, 16, generator=g).bfloat16().requires_grad_(), torch.randn(5, 16, generator=g),
                  torch.randn(16, generator=g, requires_grad=True)]

        def call(x, r, w):
            return (F.layer_norm_residual(x, r, w, None, prenorm=True, residual_in_fp32=True, backend="reference"),)
    else:
        inputs = [torch.randn(5, 16, generator=g, requires_grad=True), torch.randn(32, 16, generator=g,
                  requires_grad=True), torch.randn(16, 32, generator=g, requires_grad=True)]

        def call(x, w1, w2):
            return (F.feed_forward(x, w1, None, w2, None, activation="gelu", backend="reference"),)

    def run(autocast):
        ins = [t.detach().clone().requires_grad_() for t in inputs]
        used = ins if autocast else [t.bfloat16() if op != "layer_norm" or i == 0 else t for i, t in enumerate(ins)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs = call(*used)
            outs = [o for out in outs for o in (out if isinstance(out, tuple) else (out,))]
            sum(o.float().sum() for o in outs if o.is_floating_point()).backward()
        return outs, [t.grad for t in ins]

    outs, grads = run(True)
    want_outs, want_grads = run(False)
    if op in ("attention", "varlen"):
        assert outs[1].dtype == torch.float32  # the lse
    for got, want in zip(outs + grads, want_outs + want_grads):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_autocast_casts_every_eligible_dtype_as_torch_does():
    """Under a bfloat16 autocast, float16 operands are cast too (autocast casts every floating
    tensor but float64), as SDPA and nn.Linear do: the result is bfloat16, where it was float16
    (or a mixed-dtype error for float16 q with float32 k and v)."""
    q, k, v = (t.detach().half() for t in make_inputs((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8), seed=7))
    x, w1, w2 = make_inputs((3, 8), (16, 8), (8, 16), seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for args in [(q, k, v), (q, k.float(), v.float())]:
            expected = torch.nn.functional.scaled_dot_product_attention(*args)
            out = F.attention(*args)
            assert out.dtype == expected.dtype == torch.bfloat16
            # (the same math on the same bfloat16 operands, rounded differently: the cpu backend's
            # few-rows bfloat16 path keeps P in float32, SDPA rounds it; each is held to the float64
            # result on the cast operands, ours no further off than SDPA's, plus one rounding)
            exact = torch.nn.functional.scaled_dot_product_attention(*(t.bfloat16().double() for t in args))
            sdpa_error = (expected.double() - exact).abs().max().item()
            assert (out.double() - exact).abs().max().item() <= sdpa_error + 2 ** -8 * exact.abs().max().item()
        out = F.feed_forward(x.detach().half(), w1, None, w2, None)
        expected = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x.detach().half(), w1)), w2)
        assert out.dtype == expected.dtype == torch.bfloat16


@pytest.mark.gpu
def test_autocast_on_cuda_casts_as_torch_does():
    """Under a CUDA autocast the three ops cast float32 operands to the autocast dtype, as SDPA,
    nn.Linear and layer_norm's policy do (the "autocast off" test is one C call that must still see
    CUDA's autocast); outside it nothing is cast."""
    q, k, v = (t.detach().cuda() for t in make_inputs((1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8), seed=7))
    x, w1, w2 = (t.detach().cuda() for t in make_inputs((3, 8), (16, 8), (8, 16), seed=8))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert F.attention(q, k, v).dtype == torch.nn.functional.scaled_dot_product_attention(q, k, v).dtype
        assert F.attention(q, k, v).dtype == torch.bfloat16
        assert F.feed_forward(x, w1, None, w2, None).dtype == torch.bfloat16
        assert F.layer_norm_residual(x.bfloat16(), x.bfloat16(), torch.ones(8, device="cuda")).dtype == torch.bfloat16
    assert F.attention(q, k, v).dtype == torch.float32
    assert F.feed_forward(x, w1, None, w2, None).dtype == torch.float32


@pytest.mark.parametrize("rms", [False, True])
def test_norm_takes_float32_parameters_next_to_half_x_outside_autocast(rms):
    """float32 weight and bias next to bfloat16 x, outside autocast, as torch's layer_norm and
    rms_norm take them (models that keep their norms in float32): x's dtype out, float32
    gradients for the parameters. (They raised a mixed-dtype TypeError.) A float16 x with
    bfloat16 parameters still raises, as torch's does."""
    x = torch.randn(4, 16).bfloat16()
    w, b = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    out = F.layer_norm_residual(x, None, w, None if rms else b, 1e-5, rms=rms)
    expected = (torch.nn.functional.rms_norm(x, (16,), w.bfloat16()) if rms
                else torch.nn.functional.layer_norm(x, (16,), w, b))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=3e-2, rtol=2e-2)
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.isfinite().all()
    with pytest.raises(TypeError, match="weight has dtype bfloat16 but x has float16"):
        F.layer_norm_residual(x.half(), None, w.detach().bfloat16(), None, 1e-5, rms=rms)
