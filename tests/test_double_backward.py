"""Double backward (``create_graph=True``: gradient penalties, Hessian-vector products) through
every op, and torch.func transforms that the ops cannot run: an answer checked by
``torch.autograd.gradgradcheck`` in float64 on the CPU backends, or a clear error, never a
gradient silently missing its graph."""
import pytest
import torch

import fused_attn
from fused_attn import functional as F

BACKENDS = ["reference"] + (["cpu"] if fused_attn.extension_error() is None else [])


def _t(*shape, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_()


def _gradgradcheck(fn, inputs):
    assert torch.autograd.gradgradcheck(fn, inputs, atol=1e-5, rtol=1e-4, nondet_tol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["plain", "causal_gqa", "mask_grad", "window_alibi_softcap", "dropout"])
def test_attention(backend, case):
    q, k, v = _t(1, 4, 5, 6, seed=1), _t(1, 2, 7, 6, seed=2), _t(1, 2, 7, 6, seed=3)
    kw, extra = {}, []
    if case == "causal_gqa_lse":
        kw = dict(causal=True, alignment="bottom_right")  # (return_lse: the lse is float32, too coarse here)
    elif case == "mask_grad":
        extra = [_t(1, 1, 5, 7, seed=4, scale=0.5)]
    elif case == "window_alibi_softcap":
        kw = dict(window_size=(2, 1), alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float32),
                  softcap=3.0)
    elif case == "dropout":
        kw = dict(dropout_p=0.3)

    def fn(q, k, v, *mask):
        gen = torch.Generator().manual_seed(7) if case == "dropout" else None
        return F.attention(q, k, v, attn_mask=mask[0] if mask else None, backend=backend, generator=gen, **kw)

    _gradgradcheck(fn, [q, k, v] + extra)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_varlen(backend):
    q, k, v = _t(9, 2, 4, seed=1), _t(9, 2, 4, seed=2), _t(9, 2, 4, seed=3)
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)

    def fn(q, k, v):
        return F.attention_varlen(q, k, v, cu, cu, 6, 6, causal=True, backend=backend)

    _gradgradcheck(fn, [q, k, v])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["layernorm_prenorm", "rms_no_residual", "dropout"])
def test_layer_norm_residual(backend, case):
    x, r, w, b = _t(3, 5, 8, seed=1), _t(3, 5, 8, seed=2), _t(8, seed=3), _t(8, seed=4)
    if case == "rms_no_residual":
        _gradgradcheck(lambda x, w: F.layer_norm_residual(x, None, w, None, 1e-5, rms=True, backend=backend), [x, w])
        return
    p = 0.25 if case == "dropout" else 0.0

    def fn(x, r, w, b):
        gen = torch.Generator().manual_seed(3)
        out, summed = F.layer_norm_residual(x, r, w, b, 1e-5, dropout_p=p, prenorm=True, backend=backend, generator=gen)
        return out + 0.5 * summed

    _gradgradcheck(fn, [x, r, w, b])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "swiglu_pair"])
def test_feed_forward(backend, activation):
    x, w2, b2 = _t(2, 3, 6, seed=1), _t(6, 5, seed=2, scale=0.5), _t(6, seed=3)
    if activation == "swiglu_pair":
        wg, wu, bg, bu = _t(5, 6, seed=4, scale=0.5), _t(5, 6, seed=5, scale=0.5), _t(5, seed=6), _t(5, seed=7)
        _gradgradcheck(lambda x, wg, wu, bg, bu, w2, b2: F.feed_forward(x, (wg, wu), (bg, bu), w2, b2,
                                                                        activation="swiglu", backend=backend),
                       [x, wg, wu, bg, bu, w2, b2])
        return
    w1 = _t(10 if activation == "swiglu" else 5, 6, seed=4, scale=0.5)
    b1 = _t(w1.shape[0], seed=5)
    _gradgradcheck(lambda x, w1, b1, w2, b2: F.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=0.2,
                                                            backend=backend,
                                                            generator=torch.Generator().manual_seed(1)),
                   [x, w1, b1, w2, b2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary(backend):
    x = _t(1, 4, 2, 6, seed=1)
    cos, sin = torch.cos(torch.arange(12.0).view(4, 3) / 5).double(), torch.sin(torch.arange(12.0).view(4, 3) / 5).double()
    _gradgradcheck(lambda x: F.apply_rotary_emb(x, cos, sin, backend=backend).square(), [x])


def test_gradient_penalty_through_a_fused_transformer_matches_the_reference():
    torch.manual_seed(0)
    fused = fused_attn.Transformer(16, 2, 1, d_ff=24, causal=True, rotary=True, activation="swiglu")
    plain = fused_attn.reference.Transformer(16, 2, 1, d_ff=24, causal=True, rotary=True, activation="swiglu")
    plain.load_state_dict(fused.state_dict())
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    penalties = []
    for model in (fused, plain):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad((model(xi) * r).sum(), xi, create_graph=True)
        penalty = g.square().sum()
        penalty.backward()
        penalties.append((penalty.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(penalties[0][0], penalties[1][0], rtol=1e-4, atol=1e-5)
    params = dict(plain.named_parameters())
    for name, grad in penalties[1][1].items():  # (None: no path, a zero gradient)
        fused_grad = penalties[0][1][name]
        zeros = torch.zeros_like(params[name])
        torch.testing.assert_close(zeros if fused_grad is None else fused_grad, zeros if grad is None else grad,
                                   rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_feed_forward_with_a_strided_x(backend):
    x = _t(6, 4, seed=1).t()  # (4, 6), last dim strided: the kernel reads a copy, the graph keeps x
    w1, w2 = _t(5, 6, seed=2, scale=0.5), _t(6, 5, seed=3, scale=0.5)
    _gradgradcheck(lambda x, w1, w2: F.feed_forward(x, w1, None, w2, None, activation="gelu", backend=backend),
                   [x, w1, w2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_jacrev_and_per_sample_gradients(backend):
    """torch.func.grad, jacrev and vmap(grad) (per-sample gradients, as Opacus computes them) run
    the fused ops' backward and equal the plain-PyTorch reference's."""
    from fused_attn import reference as R
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    x, w, b = (torch.randn(*s, generator=gen, dtype=torch.float64) for s in ((4, 8), (8,), (8,)))
    w1, w2 = torch.randn(10, 8, generator=gen, dtype=torch.float64), torch.randn(8, 5, generator=gen, dtype=torch.float64)
    cases = [
        (lambda q: F.attention(q, k, v, causal=True, backend=backend).square().sum(),
         lambda q: R.attention(q, k, v, None, True).square().sum(), q, torch.randn(3, *q.shape, dtype=q.dtype)),
        (lambda w: F.layer_norm_residual(x, x, w, b, 1e-5, backend=backend).square().sum(),
         lambda w: R.layer_norm_residual(x, x, w, b, 1e-5).square().sum(), w, torch.randn(3, 8, dtype=w.dtype)),
        (lambda w1: F.feed_forward(x, w1, None, w2, None, activation="swiglu", backend=backend).square().sum(),
         lambda w1: R.feed_forward(x, w1, None, w2, None, "swiglu").square().sum(), w1,
         torch.randn(3, *w1.shape, dtype=w1.dtype)),
    ]
    for fused, ref, arg, batch in cases:
        torch.testing.assert_close(torch.func.grad(fused)(arg), torch.func.grad(ref)(arg))
        torch.testing.assert_close(torch.func.vmap(torch.func.grad(fused))(batch),
                                   torch.func.vmap(torch.func.grad(ref))(batch))
    jac = torch.func.jacrev(lambda q: F.attention(q, k, v, backend=backend))(q)
    torch.testing.assert_close(jac, torch.func.jacrev(lambda q: R.attention(q, k, v))(q))


@pytest.mark.parametrize("transform", ["jvp", "forward_ad"])
def test_forward_mode_raises_instead_of_dropping_the_tangent(transform):
    x, w = torch.randn(3, 8), torch.ones(8)
    if transform == "jvp":
        with pytest.raises(NotImplementedError, match="jvp"):
            torch.func.jvp(lambda x: F.layer_norm_residual(x, None, w, None, 1e-5), (x,), (torch.ones_like(x),))
    else:
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level(), pytest.raises(NotImplementedError, match="jvp"):
            F.layer_norm_residual(fwAD.make_dual(x, torch.ones_like(x)), None, w, None, 1e-5)


def test_vmap_over_inputs_still_runs_the_kernels():
    q = torch.randn(3, 1, 2, 5, 4)
    out = torch.func.vmap(lambda q: F.attention(q, q, q, causal=True))(q)
    ref = torch.stack([F.attention(qi, qi, qi, causal=True, backend="reference") for qi in q])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
