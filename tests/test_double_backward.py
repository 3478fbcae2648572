"""Higher-order and forward-mode derivatives through every op: double backward (``create_graph=True``:
gradient penalties, Hessian-vector products) checked by ``torch.autograd.gradgradcheck`` in float64
on the CPU backends; torch.func's transforms (grad, jacrev, vmap(grad), nested ones: hessian,
jacrev(jacrev)); forward-mode AD (jvp, jacfwd, torch.autograd.forward_ad). Never a gradient silently
missing its graph, never a tangent silently zero."""
import pytest
import torch

import fused_attn
import fused_attn.modules
from fused_attn import functional as F
from fused_attn.testing import runnable_backends

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
    if case == "mask_grad":
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
def test_attention_lse_and_sinks(backend):
    """The returned lse and learnable sinks (applied through the lse) in float64: the lse is
    float64 for float64 inputs, so second differences see no float32 rounding."""
    q, k, v, sinks = _t(1, 4, 5, 6, seed=1), _t(1, 2, 7, 6, seed=2), _t(1, 2, 7, 6, seed=3), _t(4, seed=4)

    def fn(q, k, v, sinks):
        return F.attention(q, k, v, causal=True, alignment="bottom_right", sinks=sinks, return_lse=True,
                           backend=backend)

    _gradgradcheck(fn, [q, k, v, sinks])


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_sinks_on_rows_that_see_no_key(backend):
    """A row that sees no key has the sink alone (lse = its sink): its second derivatives are
    finite, those of plain torch's softmax with the sink as one more logit. logaddexp(-inf, sink)
    gave the sinks a NaN second derivative (a gradient penalty through the lse)."""
    q, k, v, sinks = _t(1, 1, 3, 2, seed=1), _t(1, 1, 3, 2, seed=2), _t(1, 1, 3, 2, seed=3), _t(1, seed=4)
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])  # row 1 sees none

    def fn(q, k, v, sinks):
        return F.attention(q, k, v, attn_mask=mask, sinks=sinks, return_lse=True, backend=backend)

    _gradgradcheck(fn, [q, k, v, sinks])
    lse = fn(q, k, v, sinks)[1]
    dq, = torch.autograd.grad(lse.sum(), q, create_graph=True)
    dsinks, = torch.autograd.grad(dq.pow(2).sum(), sinks)
    # plain torch: the sink one more logit of each row, masked keys at -inf
    logits = torch.cat([(q @ k.transpose(-1, -2) / 2 ** 0.5).masked_fill(~mask, float("-inf")),
                        sinks.view(1, 1, 1, 1).expand(1, 1, 3, 1)], dim=-1)
    dq_ref, = torch.autograd.grad(logits.logsumexp(-1).sum(), q, create_graph=True)
    expected, = torch.autograd.grad(dq_ref.pow(2).sum(), sinks)
    torch.testing.assert_close(dsinks, expected)


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


def _forward_mode_cases(backend, dtype=torch.float64):
    """op name -> (f of one tensor of ``dtype``, the tensor): each Function, the arguments whose
    tangents matter (the mask, the residual and weight, the gated pair, an in-place rotation),
    dropout on. (``dtype``: float64, or float32 for the Triton backend, which takes no float64.)"""
    g = torch.Generator().manual_seed(5)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    q, k, v, x, res, w, b = r(1, 4, 5, 6), r(1, 2, 7, 6), r(1, 2, 7, 6), r(3, 8), r(3, 8), r(8), r(8)
    w1, w2, w_up, w2g = r(12, 8), r(8, 12), r(6, 8), r(8, 6)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    qp, kp, vp = r(5, 2, 4), r(5, 2, 4), r(5, 2, 4)
    angles = r(9, 2)
    seeded = _seeded

    return {
        "attention": (lambda q: F.attention(q, k, v, causal=True, alignment="bottom_right", backend=backend), q),
        "attention_lse": (lambda q: torch.cat([t.flatten().double() for t in F.attention(
            q, k, v, window_size=(2, 1), softcap=3.0, return_lse=True, backend=backend)]), q),
        "attention_mask": (lambda m: F.attention(q, k, v, attn_mask=m, backend=backend), r(5, 7)),
        "attention_dropout": (seeded(lambda q: F.attention(q, k, v, dropout_p=0.3, backend=backend)), q),
        "attention_varlen": (lambda q: F.attention_varlen(q, kp, vp, cu, cu, causal=True, backend=backend), qp),
        "layer_norm": (lambda x: F.layer_norm_residual(x, res, w, b, 1e-5, backend=backend), x),
        "layer_norm_weight_prenorm_rms": (lambda w: torch.cat([t.flatten() for t in F.layer_norm_residual(
            x, res, w, None, 1e-5, prenorm=True, rms=True, backend=backend)]), w),
        "layer_norm_residual_dropout": (seeded(lambda res: F.layer_norm_residual(
            x, res, w, b, 1e-5, dropout_p=0.3, backend=backend)), res),
        "feed_forward": (lambda x: F.feed_forward(x, w1, None, w2, b, activation="gelu", backend=backend), x),
        "feed_forward_up_pair_dropout": (seeded(lambda w_up: F.feed_forward(
            x, (r(6, 8).zero_() + 0.5, w_up), None, w2g, None, activation="swiglu", dropout_p=0.3, backend=backend)),
            w_up),
        "rotary": (lambda x: F.apply_rotary_emb(x, angles.cos(), angles.sin(), backend=backend), r(1, 9, 2, 4)),
        "rotary_inplace": (lambda x: F.apply_rotary_emb(x.clone(), angles.cos(), angles.sin(), inplace=True,
                                                        backend=backend), r(1, 9, 2, 4)),
    }


def _seeded(f):
    """f with the same dropout masks at every call (the seed drawn from torch's generator)."""
    def call(t):
        with torch.random.fork_rng():
            torch.manual_seed(7)
            return f(t)
    return call


def _directional(f, x, t, eps=1e-6):
    """The central difference (f(x + eps t) - f(x - eps t)) / 2 eps: the oracle of J t in float64."""
    return (f(x + eps * t) - f(x - eps * t)) / (2 * eps)


FORWARD_MODE_CASES = list(_forward_mode_cases("reference"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
def test_forward_mode_ad(backend, case):
    """torch.func.jvp, torch.autograd.forward_ad and jacfwd give the tangent (computed through the
    reference math from the call's inputs, dropout mask included): against central differences
    of the fused function itself."""
    import torch.autograd.forward_ad as fwAD

    f, x = _forward_mode_cases(backend)[case]
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    expected = _directional(f, x, t, eps=1e-6)
    tol = dict(atol=1e-7, rtol=1e-6)
    out, tangent = torch.func.jvp(f, (x,), (t,))
    torch.testing.assert_close(out, f(x), atol=0, rtol=0)  # the primal: the kernels' own
    torch.testing.assert_close(tangent, expected, **tol)
    with fwAD.dual_level():
        dual = f(fwAD.make_dual(x, t))
        torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, expected, **tol)
    jac = torch.func.jacfwd(f, randomness="same")(x)  # (a dropout seed is drawn under jacfwd's vmap)
    torch.testing.assert_close((jac.reshape(-1, x.numel()) @ t.flatten()).reshape(expected.shape), expected, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
def test_dual_level_opened_inside_grad(backend, case):
    """A ``forward_ad.dual_level()`` opened inside ``torch.func.grad`` (the tangent sits on the
    grad level's wrapper): the call takes its forward-mode path, and grad differentiates the
    tangent. Before, the tangent was not seen beneath the wrapper (rotary: "must implement the
    jvp"), and the tangent's computation opened a second, refused dual level. Oracle: the
    gradient of g(x) = <J(x) t, w> along a direction s, against central differences of g."""
    import torch.autograd.forward_ad as fwAD

    f, x = _forward_mode_cases(backend)[case]
    gen = torch.Generator().manual_seed(9)
    t, s = (torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(2))
    w = torch.randn(f(x).shape, generator=gen, dtype=x.dtype)

    def g(x):
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(f(fwAD.make_dual(x, t))).tangent
        return (tangent * w).sum()

    expected_g = (_directional(f, x, t) * w).sum()
    assert expected_g.abs() > 1e-3
    grad = torch.func.grad(g)(x)
    torch.testing.assert_close(g(x), expected_g, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close((grad * s).sum(), _directional(g, x, s, eps=1e-5), atol=1e-6, rtol=1e-5)


def _torch_jvp_scale(mode):
    """1 where torch's own ops give the true jvp tangent in this grad mode, 0 where they give zero
    (torch 2.11 under inference_mode; 2.13 the true one): our ops must do what torch's do."""
    x = torch.ones(2, dtype=torch.float64)
    with getattr(torch, mode)():
        return 0.0 if torch.func.jvp(torch.sin, (x,), (x,))[1].abs().max() == 0 else 1.0


# (the Triton interpreter, float32: under no_grad the fast path handed it jvp-wrapped tensors)
NO_GRAD_BACKENDS = BACKENDS + (["triton"] if "triton" in runnable_backends("rotary") else [])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("backend", NO_GRAD_BACKENDS)
@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
def test_forward_mode_ad_without_grad_mode(backend, case, mode):
    """Grad mode off stops reverse mode only: torch computes jvp tangents under no_grad and
    inference_mode too, and so must every op. Before, the inference fast path handed the dual /
    jvp-wrapped tensors to the kernels: a tangent of exactly zero on cpu (feed_forward: a crash
    in an out= matmul), a crash on Triton. Oracle: the same call's tangent with grad mode on
    (itself checked against central differences by ``test_forward_mode_ad``)."""
    import torch.autograd.forward_ad as fwAD

    dtype = torch.float32 if backend == "triton" else torch.float64
    f, x = _forward_mode_cases(backend, dtype)[case]
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    expected_out, expected = torch.func.jvp(f, (x,), (t,))
    assert expected.abs().max() > 1e-3
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    expected = expected * _torch_jvp_scale(mode)
    with getattr(torch, mode)():
        out, tangent = torch.func.jvp(f, (x,), (t,))
        torch.testing.assert_close(out, expected_out, **tol)
        torch.testing.assert_close(tangent, expected, **tol)
        # (jacfwd under inference_mode fails inside torch itself where its jvp gives zero)
        if backend != "triton" and _torch_jvp_scale(mode):  # (triton: its launchers refuse jacfwd's vmap)
            jac = torch.func.jacfwd(f, randomness="same")(x)
            torch.testing.assert_close((jac.reshape(-1, x.numel()) @ t.flatten()).reshape(expected.shape), expected,
                                       **tol)
        if mode == "no_grad":  # (torch's forward_ad makes no dual tensors under inference_mode)
            with fwAD.dual_level():
                dual = f(fwAD.make_dual(x, t))
                torch.testing.assert_close(fwAD.unpack_dual(dual).tangent, expected, **tol)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("backend", NO_GRAD_BACKENDS)
def test_forward_mode_ad_of_a_module_without_grad_mode(backend, mode):
    """A whole layer (attention, norms, feed-forward) under jvp in eval mode: the tangent with grad
    mode off is the one with it on (before: exactly zero on cpu, a crash on Triton)."""
    torch.manual_seed(0)
    dtype = torch.float32 if backend == "triton" else torch.float64
    layer = fused_attn.modules.TransformerLayer(8, 2, d_ff=16, backend=backend, dtype=dtype).eval()
    x, t = torch.randn(2, 2, 5, 8, dtype=dtype).unbind(0)
    expected_out, expected = torch.func.jvp(layer, (x,), (t,))
    assert expected.abs().max() > 1e-3
    if not _torch_jvp_scale(mode):
        # (torch 2.11 under inference_mode: its own ops give a zero tangent, and its autograd
        # Functions, which ours are, refuse to save the layer's inference-mode intermediates)
        with getattr(torch, mode)(), pytest.raises(RuntimeError, match="Inference tensors cannot be saved"):
            torch.func.jvp(layer, (x,), (t,))
        return
    with getattr(torch, mode)():
        out, tangent = torch.func.jvp(layer, (x,), (t,))
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(tangent, expected)


@pytest.mark.parametrize("backend", NO_GRAD_BACKENDS)
def test_forward_mode_tangent_of_alibi_slopes(backend):
    """The tangent of attention's output along its ALiBi slopes is jacrev @ t, as reverse mode
    differentiates learnable slopes (before: silently zero in every mode and backend). Slopes that
    carry a tangent take the path of slopes that require grad (a bias mask, whose tangent the
    Function takes), with grad mode on or off."""
    import torch.autograd.forward_ad as fwAD

    dtype = torch.float32 if backend == "triton" else torch.float64
    gen = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(3, 1, 2, 5, 4, generator=gen, dtype=torch.float64).unbind(0)
    a, t = torch.rand(2, generator=gen, dtype=torch.float64), torch.randn(2, generator=gen, dtype=torch.float64)

    def f(a, backend=backend):
        qkv = (q, k, v) if backend == "reference" else (q.to(dtype), k.to(dtype), v.to(dtype))
        return F.attention(*qkv, alibi_slopes=a, causal=True, backend=backend)

    expected = torch.func.jacrev(lambda a: f(a, "reference"))(a) @ t
    assert expected.abs().max() > 1e-2
    a, t = a.to(dtype), t.to(dtype)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-8)
    for mode in ("enable_grad", "no_grad", "inference_mode"):
        with getattr(torch, mode)():
            torch.testing.assert_close(torch.func.jvp(f, (a,), (t,))[1],
                                       expected.to(dtype) * _torch_jvp_scale(mode), **tol)
    with torch.no_grad(), fwAD.dual_level():
        torch.testing.assert_close(fwAD.unpack_dual(f(fwAD.make_dual(a, t))).tangent, expected.to(dtype), **tol)
    if backend != "triton":  # (whose launchers refuse jacfwd's vmap)
        torch.testing.assert_close(torch.func.jacfwd(f)(a) @ t, expected, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_tangent_of_learnable_slopes_in_a_packed_module(backend):
    """A module's learnable slopes on packed sequences carrying a tangent go per sequence through
    ``attention`` (as while training them), not to attention_varlen, whose kernels give them none."""
    torch.manual_seed(0)
    mha = fused_attn.modules.MultiHeadAttention(8, 2, alibi="learnable", causal=True, backend=backend,
                                                dtype=torch.float64)
    x, cu = torch.randn(5, 8, dtype=torch.float64), torch.tensor([0, 2, 5], dtype=torch.int32)
    slopes = mha.alibi_slopes.detach().double()

    def f(a):
        return torch.func.functional_call(mha, {"alibi_slopes": a}, (x,), {"cu_seqlens": cu, "max_seqlen": 3})

    t = torch.ones_like(slopes)
    expected = torch.func.jacrev(f)(slopes) @ t
    assert expected.abs().max() > 1e-3
    for mode in (torch.enable_grad, torch.no_grad):
        with mode():
            torch.testing.assert_close(torch.func.jvp(f, (slopes,), (t,))[1], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_refuses_slopes_and_tables_the_kernels_do_not_differentiate(backend):
    """attention_varlen's and attention_with_kvcache's slopes and the rotary tables get no
    derivative from the kernels: carrying a forward-mode tangent they raise the ValueError that
    requiring grad raises (before: a tangent silently missing their part). Detached, they run."""
    import torch.autograd.forward_ad as fwAD

    gen = torch.Generator().manual_seed(4)
    a = torch.rand(2, generator=gen, dtype=torch.float64)
    qp, kp, vp = torch.randn(3, 5, 2, 4, generator=gen, dtype=torch.float64).unbind(0)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    q1 = torch.randn(1, 2, 2, 4, dtype=torch.float64)
    kc, vc = torch.randn(2, 1, 6, 2, 4, dtype=torch.float64).unbind(0)
    cos, sin = torch.randn(2, 10, 2, generator=gen, dtype=torch.float64).unbind(0)
    x = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64)
    calls = {
        "alibi_slopes": [lambda a: F.attention_varlen(qp, kp, vp, cu, cu, alibi_slopes=a, backend=backend),
                         lambda a: F.attention_with_kvcache(q1, kc.clone(), vc.clone(), cache_seqlens=3,
                                                            alibi_slopes=a, backend=backend)],
        "cos": [lambda c: F.apply_rotary_emb(x, c.expand(10, 2), sin, backend=backend)],
        "sin": [lambda s: F.apply_rotary_emb(x, cos, s.expand(10, 2), backend=backend)],
    }
    for name, fns in calls.items():
        arg = a if name == "alibi_slopes" else torch.rand(2, dtype=torch.float64)
        for fn in fns:
            for mode in (torch.enable_grad, torch.no_grad):
                with mode(), pytest.raises(ValueError, match=f"{name} carries a forward-mode tangent"):
                    torch.func.jvp(fn, (arg,), (torch.ones_like(arg),))
                with mode(), fwAD.dual_level(), pytest.raises(ValueError, match=f"{name} carries a forward-mode"):
                    fn(fwAD.make_dual(arg, torch.ones_like(arg)))
            with pytest.raises(ValueError, match=f"{name} requires grad"):  # (reverse mode's, as before)
                fn(arg.clone().requires_grad_())
            # detached (its tangent dropped), the call runs
            torch.func.jvp(lambda a, fn=fn: fn(a.detach()), (arg,), (torch.ones_like(arg),))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
def test_nested_transforms_give_second_derivatives(backend, case):
    """A backward that an outer transform differentiates (hessian = jacfwd(jacrev), jacrev(jacrev),
    grad of grad, forward-over-reverse) runs the reference math with a graph: before, the kernels'
    gradient came back as a constant and every second derivative was silently zero. Oracle: the
    central difference of the fused op's own first-order gradient along t."""
    f, x = _forward_mode_cases(backend)[case]
    t = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=x.dtype)
    weights = torch.randn(f(x).shape, generator=torch.Generator().manual_seed(11), dtype=x.dtype)

    def loss(x):
        return (f(x) * weights).sum() + f(x).square().sum()

    grad = torch.func.grad(loss)
    expected = _directional(grad, x, t)
    assert expected.abs().max() > 1e-3  # the second derivative is not trivially zero
    flat_t = t.flatten()
    tol = dict(atol=1e-6, rtol=1e-5)
    hessians = [("hessian", torch.func.jacfwd(torch.func.jacrev(loss), randomness="same")),  # = torch.func.hessian
                ("jacrev(jacrev)", torch.func.jacrev(grad))]
    for name, hessian in hessians:
        got = (hessian(x).reshape(x.numel(), x.numel()) @ flat_t).reshape(x.shape)
        torch.testing.assert_close(got, expected, **tol, msg=name)
    torch.testing.assert_close(torch.func.jvp(grad, (x,), (t,))[1], expected, **tol)  # forward-over-reverse
    torch.testing.assert_close(torch.func.grad(lambda x: (grad(x) * t).sum())(x), expected, **tol)  # grad of grad


# (the others are linear in their argument: a third derivative of the loss of exactly zero)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [c for c in FORWARD_MODE_CASES if not c.startswith("rotary")
                                  and c not in ("layer_norm_weight_prenorm_rms", "feed_forward_up_pair_dropout")])
def test_third_order_reverse(backend, case):
    """grad of grad of grad: the second-order gradient's graph (the reference math, recomputed with
    a graph) is right to one more order. Before, LayerNorm's came from torch's layer_norm, whose
    double-backward formula reads the saved statistics as constants: a third derivative 30% off.
    Oracle: the central difference of the fused op's own second-order gradient along u."""
    f, x = _forward_mode_cases(backend)[case]
    gen = torch.Generator().manual_seed(9)
    t, s, u = (torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(3))
    weights = torch.randn(f(x).shape, generator=gen, dtype=x.dtype)

    def loss(x):
        return (f(x) * weights).sum() + f(x).square().sum()

    def second(x):  # <H(x) t, s>
        return (torch.func.grad(lambda x: (torch.func.grad(loss)(x) * t).sum())(x) * s).sum()

    expected = _directional(second, x, u, eps=1e-5)
    assert expected.abs() > 1e-3
    torch.testing.assert_close((torch.func.grad(second)(x) * u).sum(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
def test_reverse_mode_inside_a_dual_level(backend, case):
    """torch.autograd.grad inside a ``forward_ad.dual_level()``, the input a dual tensor: the
    backward reads saved tensors that carry tangents, so the gradient's tangent is the Hessian
    along t (forward over reverse by torch.autograd: ``_create_graph``'s tangent branch, the
    backward through the reference math). Oracle: central differences of the fused op's own
    gradient along t."""
    import torch.autograd.forward_ad as fwAD

    f, x = _forward_mode_cases(backend)[case]
    gen = torch.Generator().manual_seed(9)
    t = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    weights = torch.randn(f(x).shape, generator=gen, dtype=x.dtype)

    def loss(x):
        return (f(x) * weights).sum() + f(x).square().sum()

    expected = _directional(torch.func.grad(loss), x, t)
    assert expected.abs().max() > 1e-3
    leaf = x.clone().requires_grad_()
    with fwAD.dual_level():
        (grad,) = torch.autograd.grad(loss(fwAD.make_dual(leaf, t)), leaf)
        got = fwAD.unpack_dual(grad).tangent
    torch.testing.assert_close(grad, torch.func.grad(loss)(x), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
def test_forward_ad_dual_tensor_through_vmap(backend, case):
    """A forward_ad dual tensor handed to torch.func.vmap: the call runs its reference math under
    vmap (as nested forward mode does), which torch differentiates. Before, the tangent's
    reverse-mode computation failed inside torch ("vmap: inplace arithmetic ... please file a bug
    report"; before that "Nested forward mode AD is not supported"). Oracle: torch.func.jvp of
    each sample alone; the primal, the reference math's, to rounding of the kernels'."""
    import torch.autograd.forward_ad as fwAD

    f, x = _forward_mode_cases(backend)[case]
    xs = torch.stack([x, 2 * x])
    ts = torch.randn(xs.shape, generator=torch.Generator().manual_seed(9), dtype=xs.dtype)
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(torch.func.vmap(f, randomness="same")(fwAD.make_dual(xs, ts)))
    expected = [torch.func.jvp(f, (xi,), (ti,)) for xi, ti in zip(xs, ts)]
    tol = dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(primal, torch.stack([o for o, _ in expected]), **tol)
    torch.testing.assert_close(tangent, torch.stack([t for _, t in expected]), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_higher_order_paths_on_rows_of_large_magnitude(backend):
    """The reference math a derivative is taken of (create_graph, jvp tangents) at rows of 1e17 in
    float32: LayerNorm divides by the root, where a product with rsqrt differentiated through rstd^3,
    which underflowed float32 (a gradient 5-25 % off). Oracle: float64."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=gen) * 1e17
    w, b, dy, t = torch.randn(64, generator=gen), torch.randn(64, generator=gen), torch.randn(4, 64, generator=gen), \
        torch.randn(4, 64, generator=gen) * 1e17

    def f(x, w=w, b=b):
        return F.layer_norm_residual(x, None, w, b, 1e-5, backend=backend)

    def expected_f(x):
        return torch.nn.functional.layer_norm(x, (64,), w.double(), b.double(), 1e-5)

    leaf = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad((f(leaf) * dy).sum(), leaf, create_graph=True)
    x64 = x.double().requires_grad_()
    (expected,) = torch.autograd.grad((expected_f(x64) * dy.double()).sum(), x64)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    tangent = torch.func.jvp(f, (x,), (t,))[1]
    expected_tangent = torch.func.jvp(expected_f, (x.double(),), (t.double(),))[1]
    torch.testing.assert_close(tangent.double(), expected_tangent, rtol=1e-4,
                               atol=1e-4 * expected_tangent.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_grad_over_parameters_that_require_grad(backend):
    """torch.func.grad of a loss over a fused layer's nn.Parameters (functional_call: weights that
    require grad of the enclosing autograd): torch.func runs the backward in grad mode, where the cpu
    backend's feed-forward backward (out= GEMMs) raised "functions with out=... arguments don't
    support automatic differentiation". Oracle: the same gradients by loss.backward()."""
    torch.manual_seed(0)
    layer = fused_attn.modules.TransformerLayer(16, 4, 32, backend=backend, dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    params = dict(layer.named_parameters())
    got = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).pow(2).sum())(params)
    layer(x).pow(2).sum().backward()
    for name, p in params.items():
        torch.testing.assert_close(got[name], p.grad, atol=1e-12, rtol=1e-10, msg=name)
    w1 = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(16, 32, dtype=torch.float64, requires_grad=True)
    xs = torch.randn(10, 16, dtype=torch.float64)
    torch.testing.assert_close(
        torch.func.grad(lambda x: F.feed_forward(x, w1, None, w2, None, backend=backend).pow(2).sum())(xs),
        torch.func.grad(lambda x: F.feed_forward(x, w1.detach(), None, w2.detach(), None,
                                                 backend=backend).pow(2).sum())(xs))


def test_forward_mode_leaves_compiled_calls_alone():
    """The jvp lives on a twin Function used only under forward-mode AD: torch.compile refuses to
    trace a Function that defines jvp, so the traced class must have none (fullgraph training)."""
    from fused_attn import ops

    for cls in (ops.AttentionFunction, ops.AttentionVarlenFunction, ops.LayerNormResidualFunction,
                ops.FeedForwardFunction, ops.RotaryFunction):
        assert cls.jvp is torch.autograd.Function.jvp, cls
        assert cls.forward_mode.jvp is not torch.autograd.Function.jvp and issubclass(cls.forward_mode, cls)
    q = torch.randn(1, 2, 5, 4, requires_grad=True)
    compiled = torch.compile(lambda q: F.attention(q, q, q, causal=True), fullgraph=True, backend="eager")
    compiled(q).sum().backward()
    assert q.grad is not None


def test_vmap_over_inputs_still_runs_the_kernels():
    q = torch.randn(3, 1, 2, 5, 4)
    out = torch.func.vmap(lambda q: F.attention(q, q, q, causal=True))(q)
    ref = torch.stack([F.attention(qi, qi, qi, causal=True, backend="reference") for qi in q])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _per_sample_cases(backend):
    """op -> (fused f(x) dropping out, its reference g(x, rng) with a given [seed, offset], x)."""
    from fused_attn import reference as R

    def r(*shape, seed=0):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    k, v, res, w, b = r(1, 2, 3, 4, seed=1), r(1, 2, 3, 4, seed=2), r(2, 4, seed=3), r(4, seed=4), r(4, seed=5)
    kp, vp, cu = r(5, 2, 4, seed=6), r(5, 2, 4, seed=7), torch.tensor([0, 2, 5], dtype=torch.int32)
    w1, w2 = r(6, 4, seed=8), r(4, 6, seed=9)
    return {
        "attention": (lambda q: F.attention(q, k, v, dropout_p=0.4, backend=backend),
                      lambda q, rng: R.attention(q, k, v, None, False, 0.4, None, rng), r(1, 2, 2, 4)),
        "attention_varlen": (lambda q: F.attention_varlen(q, kp, vp, cu, cu, dropout_p=0.4, backend=backend),
                             lambda q, rng: R.attention_varlen(q, kp, vp, cu, cu, False, 0.4, None, rng), r(5, 2, 4)),
        "layer_norm_residual": (lambda x: F.layer_norm_residual(x, res, w, b, dropout_p=0.4, backend=backend),
                                lambda x, rng: R.layer_norm_residual(x, res, w, b, dropout_p=0.4, rng=rng), r(2, 4)),
        "feed_forward": (lambda x: F.feed_forward(x, w1, None, w2, None, activation="gelu", dropout_p=0.4,
                                                  backend=backend),
                         lambda x, rng: R.feed_forward(x, w1, None, w2, None, "gelu", 0.4, rng), r(2, 4)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["attention", "attention_varlen", "layer_norm_residual", "feed_forward"])
def test_vmap_randomness_different_draws_a_mask_per_sample(backend, op):
    """vmap(..., randomness="different") draws the [seed, offset] pair once per sample, a batched
    tensor the kernels could not read (every dropout op raised "Cannot access data pointer"):
    each sample now gets the mask of its own pair, the pair torch.randint draws for it (so the
    result is reproducible under torch.manual_seed), in vmap, vmap(grad) and jacfwd alike."""
    fused, ref, x = _per_sample_cases(backend)[op]
    n = 3
    xs = x.expand(n, *x.shape)  # the same input in every sample: only the masks tell them apart

    def pairs(count):  # what vmap draws: torch.randint's (2,) once per sample, a (count, 2) draw
        torch.manual_seed(0)
        return torch.randint(0, 2**62, (count, 2), dtype=torch.int64)

    torch.manual_seed(0)
    out = torch.func.vmap(fused, randomness="different")(xs)
    torch.testing.assert_close(out, torch.stack([ref(x, rng) for rng in pairs(n)]), atol=1e-12, rtol=1e-12)
    assert not torch.equal(out[0], out[1])

    def loss(f):
        return lambda x, *rng: f(x, *rng).square().sum()

    torch.manual_seed(0)
    grads = torch.func.vmap(torch.func.grad(loss(fused)), randomness="different")(xs)
    expected = torch.stack([torch.func.grad(loss(ref))(x, rng) for rng in pairs(n)])
    torch.testing.assert_close(grads, expected, atol=1e-12, rtol=1e-12)

    torch.manual_seed(0)
    jac = torch.func.jacfwd(fused, randomness="different")(x)  # a pair per basis tangent
    basis = torch.eye(x.numel(), dtype=x.dtype).reshape(x.numel(), *x.shape)
    columns = [torch.func.jvp(lambda x: ref(x, rng), (x,), (e,))[1] for e, rng in zip(basis, pairs(x.numel()))]
    torch.testing.assert_close(jac, torch.stack(columns, dim=-1).reshape(jac.shape), atol=1e-12, rtol=1e-12)


def _first_order_cases(backend):
    """op -> (f(*inputs) -> tuple of outputs, float64 inputs): every output that carries a gradient
    of its own (attention's lse, a prenorm norm's summed stream), dropout on, a learned mask,
    sinks, a gated pair."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()

    def seeded(f):
        return lambda *a: f(*a, generator=torch.Generator().manual_seed(4))

    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    angles = torch.randn(9, 2, generator=g, dtype=torch.float64)
    return {
        "attention": (seeded(lambda q, k, v, m, s, generator: F.attention(
            q, k, v, attn_mask=m, sinks=s, dropout_p=0.3, return_lse=True, backend=backend, generator=generator)),
            [r(1, 4, 5, 6), r(1, 2, 7, 6), r(1, 2, 7, 6), r(5, 7, scale=0.5), r(4)]),
        "attention_varlen": (seeded(lambda q, k, v, generator: F.attention_varlen(
            q, k, v, cu, cu, causal=True, dropout_p=0.3, return_lse=True, backend=backend, generator=generator)),
            [r(5, 2, 4), r(5, 2, 4), r(5, 2, 4)]),
        "layer_norm_residual_prenorm": (seeded(lambda x, res, w, b, generator: F.layer_norm_residual(
            x, res, w, b, 1e-5, dropout_p=0.3, prenorm=True, backend=backend, generator=generator)),
            [r(3, 8), r(3, 8), r(8), r(8)]),
        "rms_norm_prenorm": (lambda x, res, w: F.layer_norm_residual(x, res, w, None, 1e-5, prenorm=True, rms=True,
                                                                     backend=backend),
                             [r(3, 8), r(3, 8), r(8)]),
        "feed_forward": (seeded(lambda x, w1, b1, w2, b2, generator: F.feed_forward(
            x, w1, b1, w2, b2, activation="gelu", dropout_p=0.3, backend=backend, generator=generator)),
            [r(3, 8), r(12, 8, scale=0.5), r(12), r(8, 12, scale=0.5), r(8)]),
        "feed_forward_swiglu_pair": (lambda x, wg, wu, w2: F.feed_forward(x, (wg, wu), None, w2, None,
                                                                         activation="swiglu", backend=backend),
                                     [r(3, 8), r(6, 8, scale=0.5), r(6, 8, scale=0.5), r(8, 6, scale=0.5)]),
        "rotary": (lambda x: F.apply_rotary_emb(x, angles.cos(), angles.sin(), backend=backend), [r(1, 9, 2, 4)]),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(_first_order_cases("reference")))
def test_create_graph_gradient_equals_the_plain_gradient(backend, case):
    """A backward under create_graph=True recomputes the gradient through the reference math (a
    separate path from the kernels' backward). gradgradcheck only checks that path against its
    own finite differences, never against the first-order gradient: it once dropped the prenorm
    summed stream's gradient and every check still passed. Here the first-order gradient taken
    with create_graph=True equals the plain one, every output weighted in the loss."""
    f, inputs = _first_order_cases(backend)[case]
    outs = f(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(5)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + o.square().sum() for o in outs)
    plain = torch.autograd.grad(loss, inputs, retain_graph=True)
    with_graph = torch.autograd.grad(loss, inputs, create_graph=True)
    for i, (a, b) in enumerate(zip(plain, with_graph)):
        assert b.requires_grad, i  # the recomputed path ran
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9, msg=f"input {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
def test_forward_mode_nested_gives_second_order_tangents(backend, case):
    """jvp of jvp and jacfwd of jacfwd: with more than one forward-mode level around the call it runs the reference math under the transforms,
    which differentiate it to any order. Before, the twin Function's jvp gave a tangent carrying
    no tangent of the enclosing level: every second-order tangent was exactly zero. Oracle: the
    central difference of the (first-order, correct) tangent; the inner tangent depends on the
    point (t + x) so that linear ops (rotary) have a nonzero second-order term too. (torch itself
    refuses a torch.func jvp inside a forward_ad dual level: "Nested forward mode AD".)"""
    f, x = _forward_mode_cases(backend)[case]
    gen = torch.Generator().manual_seed(9)
    t, s = torch.randn(x.shape, generator=gen, dtype=x.dtype), torch.randn(x.shape, generator=gen, dtype=x.dtype)

    def g(a):  # J(a) (t + a)
        return torch.func.jvp(f, (a,), (t + a,))[1]

    expected = _directional(g, x, s, eps=1e-5)
    assert expected.abs().max() > 1e-3  # not trivially zero
    tol = dict(atol=1e-6, rtol=1e-5)
    out, got = torch.func.jvp(g, (x,), (s,))
    torch.testing.assert_close(out, g(x), **tol)
    torch.testing.assert_close(got, expected, **tol, msg="jvp(jvp)")
    # jacfwd(jacfwd(f)) contracted with t and s: d/ds (J t), the same oracle with t alone
    expected = _directional(lambda a: torch.func.jvp(f, (a,), (t,))[1], x, s, eps=1e-5)
    hess = torch.func.jacfwd(torch.func.jacfwd(f, randomness="same"), randomness="same")(x)
    got = (hess.reshape(-1, x.numel(), x.numel()) @ t.flatten()) @ s.flatten()
    torch.testing.assert_close(got.reshape(expected.shape), expected, **tol, msg="jacfwd(jacfwd)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
def test_forward_mode_over_vmap(backend, case):
    """jvp(vmap(f)): a jvp level enclosing a vmap level runs the reference math (before: torch's
    internal assert "Expected both tensor and its forward grad to be floating point or complex"
    for attention). Oracle: each sample's own jvp (vmap(jvp(f)) and a plain jvp agree)."""
    f, x = _forward_mode_cases(backend)[case]
    gen = torch.Generator().manual_seed(9)
    xs, ts = (torch.randn(3, *x.shape, generator=gen, dtype=x.dtype) for _ in range(2))
    out, got = torch.func.jvp(torch.func.vmap(f, randomness="same"), (xs,), (ts,))
    expected = [torch.func.jvp(f, (xi,), (ti,)) for xi, ti in zip(xs, ts)]
    tol = dict(atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(out, torch.stack([o for o, _ in expected]), **tol)
    torch.testing.assert_close(got, torch.stack([t for _, t in expected]), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_nested_alibi_slopes(backend):
    """jvp of jvp along attention's ALiBi slopes (through the bias mask slopes with a tangent take):
    the second-order tangent equals plain reference math with the ALiBi bias written out (before:
    exactly zero)."""
    R = fused_attn.reference
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 3, 4, dtype=torch.float64, generator=gen).unbind(0)
    a, t = torch.rand(2, dtype=torch.float64, generator=gen), torch.randn(2, dtype=torch.float64, generator=gen)

    def second(f):  # d/dt of J(s) (s + t) at s = a
        return torch.func.jvp(lambda s: torch.func.jvp(f, (s,), (s + t,))[1], (a,), (t,))[1]

    expected = second(lambda s: R.attention(q, k, v, R.alibi_bias(s, 3, 3, dtype=torch.float64)))
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(second(lambda s: F.attention(q, k, v, alibi_slopes=s, backend=backend)), expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("other", ["dual_level", "jvp"])
def test_another_threads_forward_mode_leaves_this_threads_backward_alone(backend, other, monkeypatch):
    """torch.autograd.forward_ad's level is process-wide: while another thread was inside a
    ``dual_level()`` or a running ``torch.func.jvp``, every fused backward of every thread took the
    reference path with a graph (``_create_graph``): slower, the (L, L) matrix materialised, and
    gradients off by rounding (bitwise reproducibility broken). Forward mode is now asked of the
    call's own tensors: the gradients are bitwise those without the other thread, from the kernels."""
    import threading

    import torch.autograd.forward_ad as fwAD

    from fused_attn import ops

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 64, 16, generator=gen).requires_grad_()
    x = torch.randn(2, 8, 16, generator=gen).requires_grad_()
    w1, w2 = torch.randn(32, 16, generator=gen).requires_grad_(), torch.randn(16, 32, generator=gen)
    wn = torch.randn(16, generator=gen).requires_grad_()
    cos, sin = torch.randn(2, 64, 8, generator=gen).unbind(0)
    cu = torch.tensor([0, 20, 64], dtype=torch.int32)
    leaves = (q, x, w1, wn)

    def grads():
        for t in leaves:
            t.grad = None
        loss = (F.attention(q, q, q, causal=True, backend=backend).pow(2).sum()
                + F.attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu,
                                     causal=True, backend=backend).pow(2).sum()
                + F.feed_forward(x, w1, None, w2, None, activation="gelu", backend=backend).pow(2).sum()
                + F.layer_norm_residual(x, x, wn, None, backend=backend)[0].pow(3).sum()
                + F.apply_rotary_emb(q.transpose(1, 2), cos, sin, backend=backend).pow(2).sum())
        loss.backward()
        return [t.grad.clone() for t in leaves]

    expected = grads()
    graph_paths = []

    def create_graph(*tensors, _real=ops._create_graph):
        graph_paths.append(_real(*tensors))
        return graph_paths[-1]

    monkeypatch.setattr(ops, "_create_graph", create_graph)
    inside, stop = threading.Event(), threading.Event()

    def hold(value):
        inside.set()
        stop.wait(30)
        return value

    def run_other():
        if other == "dual_level":
            with fwAD.dual_level():
                hold(None)
        else:
            torch.func.jvp(hold, (torch.ones(2),), (torch.ones(2),))

    thread = threading.Thread(target=run_other)
    thread.start()
    try:
        assert inside.wait(30) and fwAD._current_level >= 0  # (the other thread's level, seen here)
        got = grads()
    finally:
        stop.set()
        thread.join()
    assert graph_paths and not any(graph_paths)  # every backward on the kernels' path
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


_VMAP_SCRIPT = r"""
import torch
from torch.func import grad, vmap
from fused_attn import functional as F

gen = torch.Generator().manual_seed(0)
q = torch.randn(3, 1, 2, 5, 8, generator=gen)
x, res = torch.randn(2, 3, 4, 8, generator=gen).unbind(0)
w, w1, w2 = torch.randn(8, generator=gen), torch.randn(3, 16, 8, generator=gen), torch.randn(3, 8, 16, generator=gen)
cos, sin = torch.randn(2, 10, 4, generator=gen).unbind(0)
cu = torch.tensor([0, 2, 5], dtype=torch.int32)
calls = {
    "attention": (lambda q: F.attention(q, q, q, causal=True, backend=BACKEND), (q,)),
    "attention_varlen": (lambda q: F.attention_varlen(q[0], q[0], q[0], cu, cu, backend=BACKEND), (q.transpose(2, 3),)),
    "layer_norm_residual": (lambda x, r: F.layer_norm_residual(x, r, w, None, backend=BACKEND)[0], (x, res)),
    "feed_forward": (lambda x, a, b: F.feed_forward(x, a, None, b, None, activation="gelu", backend=BACKEND),
                     (x, w1, w2)),
    "rotary": (lambda x: F.apply_rotary_emb(x, cos, sin, backend=BACKEND), (q.transpose(2, 3),)),
}
for name, (f, args) in calls.items():
    for _ in range(2):
        out = vmap(f)(*args)
        expected = torch.stack([f(*(a[i] for a in args)) for i in range(3)])
        assert torch.equal(out, expected), name
        g = vmap(grad(lambda *a: f(*a).square().sum()))(*args)  # (the Function's path)
        assert torch.equal(g, torch.stack([grad(lambda *a: f(*a).square().sum())(*(a[i] for a in args))
                                           for i in range(3)])), name
drop = vmap(lambda q: F.attention(q, q, q, dropout_p=0.5, backend=BACKEND), randomness="different")(q)
print("ran", len(calls), drop.shape)
"""


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled extension (the reference runs torch's ops)")
def test_vmap_prints_no_fallback_warning():
    """Under torch.func.vmap the fused_attn_C ops (and the registered fused_attn ops, which a
    per-sample dropout seed reaches) have a rule that runs them sample by sample: before, torch's
    BatchedFallback did so and printed "There is a performance drop because we have not yet
    implemented the batching rule for fused_attn_C::attention_fwd..." from C++ on every no-grad
    call (past Python's warnings filters; a UserWarning under vmap(grad)). Results bitwise as a loop
    over the samples. (A subprocess: C++ writes the warning to the process's stderr.)"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "BACKEND = 'cpu'\n" + _VMAP_SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ran 5" in proc.stdout
    assert "batching rule" not in proc.stderr and "BatchedFallback" not in proc.stderr, proc.stderr


def _op_and_inputs(op, backend):
    """A small call of ``op`` as a function of its differentiable inputs, and those inputs."""
    if op == "attention":
        return (lambda q, k, v: F.attention(q, k, v, causal=True, backend=backend),
                [_t(1, 2, 3, 4, seed=1), _t(1, 2, 3, 4, seed=2), _t(1, 2, 3, 4, seed=3)])
    if op == "layer_norm_residual":
        return (lambda x, w: F.layer_norm_residual(x, None, w, None, 1e-5, backend=backend),
                [_t(3, 4, seed=1), _t(4, seed=2)])
    return (lambda x, w1, w2: F.feed_forward(x, w1, None, w2, None, activation="gelu", backend=backend),
            [_t(3, 4, seed=1), _t(5, 4, seed=2, scale=0.5), _t(4, 5, seed=3, scale=0.5)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["attention", "layer_norm_residual", "feed_forward"])
@pytest.mark.parametrize("hooks", ["save_on_cpu", "pack_hooks", "allow_mutation"])
def test_inside_saved_tensor_hooks(backend, op, hooks):
    """First- and second-order backward and forward-mode AD inside a saved-tensor-hooks context
    (``save_on_cpu``, a user's pack hooks, ``allow_mutation_on_saved_tensors``, whose dispatch mode
    sends the calls through the registered ops) give what they give outside it, as torch's own ops
    do. The backwards used torch.func, which refuses to run inside such a context ("torch.func.{grad,
    vjp, ...} don't yet support saved tensor hooks"): a double backward on every backend, every
    backward of the reference backend (``auto``'s fallback), forward mode inside a dual level."""
    import torch.autograd.forward_ad as fwAD
    from torch.autograd.graph import allow_mutation_on_saved_tensors, save_on_cpu, saved_tensors_hooks

    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    contexts = {"save_on_cpu": save_on_cpu, "pack_hooks": lambda: saved_tensors_hooks(pack, lambda t: t),
                "allow_mutation": allow_mutation_on_saved_tensors}
    fn, inputs = _op_and_inputs(op, backend)
    tangents = [torch.randn_like(t) for t in inputs]

    def derivatives():
        first = torch.autograd.grad(fn(*inputs).pow(2).sum(), inputs, create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), inputs)
        plain = torch.autograd.grad(fn(*inputs).pow(2).sum(), inputs)
        with fwAD.dual_level():
            out = fn(*(fwAD.make_dual(t.detach(), dt) for t, dt in zip(inputs, tangents)))
            tangent = fwAD.unpack_dual(out).tangent
        return first, second, plain, tangent

    expected = derivatives()
    with contexts[hooks]():
        got = derivatives()
    assert hooks != "pack_hooks" or packed
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["attention", "layer_norm_residual", "feed_forward"])
def test_autograd_functional_vectorized_forward_mode(backend, op):
    """``torch.autograd.functional.jacobian(..., strategy="forward-mode", vectorize=True)`` and
    ``hessian(..., outer_jacobian_strategy="forward-mode", vectorize=True)`` match the jacobian and
    hessian computed one row at a time. Their tangents are batched by torch's legacy vmap, which the
    jvp's copy of its tangent into the output's layout (in place, into an unbatched tensor) failed
    on ("vmap: aten::copy_ ... not possible")."""
    from torch.autograd.functional import hessian, jacobian

    fn, inputs = _op_and_inputs(op, backend)
    x, rest = inputs[0].detach(), [t.detach() for t in inputs[1:]]

    def f(x):
        return fn(x, *rest)

    torch.testing.assert_close(jacobian(f, x, vectorize=True, strategy="forward-mode"), jacobian(f, x))

    def g(x):
        return f(x).pow(3).sum()

    torch.testing.assert_close(hessian(g, x, vectorize=True, outer_jacobian_strategy="forward-mode"), hessian(g, x))
