"""Defined answers for edge cases, on every backend that runs on this machine.

Semantics (also in the README):
- empty batch / zero heads / zero-length sequences give empty outputs of the right shape; zero
  keys give zeros; zero rows of a norm or feed-forward give empty outputs;
- a query row whose keys are all masked gives zeros and zero gradients (never NaN);
- NaN/inf in an input propagate to the rows they touch and no further;
- float16 logits far beyond float16's range do not overflow (scores accumulate in float32);
- non-contiguous, transposed, expanded (stride 0) and offset views work as their contiguous copies;
- inputs are never modified; forward and backward are bitwise reproducible.
"""
import warnings
import pytest
import torch

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.rotary import apply_rotary_emb
from fused_attn.testing import (backend_cases, check_against_reference, compare, make_inputs, runnable_backends,
                                union_cases)


def cases(op, dtype=torch.float32):
    return backend_cases(op, dtype, reference_on_gpu=True)


ATTN = cases("attention")
ATTN_F16 = cases("attention", dtype=torch.float16)
NORM = cases("layer_norm_residual")
FFN = cases("feed_forward")


@pytest.fixture(autouse=True)
def _on_device(request):
    """Factory calls in each test create tensors on the case's device."""
    callspec = getattr(request.node, "callspec", None)
    device = callspec.params.get("device", "cpu") if callspec is not None else "cpu"
    with torch.device(device):
        yield


@pytest.mark.parametrize("device,backend", ATTN)
@pytest.mark.parametrize("shape", [(0, 2, 3, 4), (2, 0, 3, 4), (1, 2, 0, 4)])
def test_attention_empty(device, backend, shape):
    q = torch.randn(shape, requires_grad=True)
    kv = torch.randn(shape[0], shape[1], 5, shape[3], requires_grad=True)
    out = F.attention(q, kv, kv, backend=backend)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == q.shape and torch.all(kv.grad == 0)


@pytest.mark.parametrize("device,backend", ATTN)
def test_attention_zero_keys_gives_zeros_and_zero_grads(device, backend):
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    k = torch.randn(1, 2, 0, 4, requires_grad=True)
    out = F.attention(q, k, k, backend=backend)
    assert out.shape == (1, 2, 3, 4) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0)


@pytest.mark.parametrize("device,backend", ATTN)
@pytest.mark.parametrize("kind", ["bool", "additive", "causal+mask"])
def test_attention_fully_masked_rows(device, backend, kind):
    q, k, v = make_inputs((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8))
    mask, causal = None, False
    if kind == "bool":
        mask = torch.ones(5, 6, dtype=torch.bool)
        mask[2] = False
    elif kind == "additive":
        mask = torch.zeros(5, 6)
        mask[2] = float("-inf")
    else:  # causal leaves row 0 only key 0, which the mask removes
        mask = torch.ones(5, 6, dtype=torch.bool)
        mask[:, 0] = False
        causal = True
    dead = [0] if kind == "causal+mask" else [2]
    out = F.attention(q, k, v, attn_mask=mask, causal=causal, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.all(out[:, :, dead] == 0)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :, dead] == 0)


@pytest.mark.parametrize("device,backend", ATTN)
def test_attention_nan_stays_in_its_rows(device, backend):
    q, k, v = make_inputs((2, 2, 6, 8), (2, 2, 6, 8), (2, 2, 6, 8), requires_grad=False)
    q[0, 1, 3, 2] = float("nan")
    out = F.attention(q, k, v, backend=backend)
    bad = ~torch.isfinite(out)
    assert bad[0, 1, 3].all()
    bad[0, 1, 3] = False
    assert not bad.any()
    k2 = k.clone()
    k2[1, 0, 4, 0] = float("inf")
    out = F.attention(q[1:], k2[1:], v[1:], backend=backend)  # NaN/inf in key 4 of (b=1, h=0)
    assert torch.isfinite(out[:, 1]).all()  # the other head is untouched
    # The gradients are non-finite exactly where the reference's are (the NaN query row's dq, and
    # every dk/dv of its head, which that row's probabilities reach).
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    F.attention(*leaves, backend=backend).sum().backward()
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    R.attention(*ref).sum().backward()
    for name, got, want in zip(("dq", "dk", "dv"), leaves, ref):
        bad, ref_bad = ~torch.isfinite(got.grad), ~torch.isfinite(want.grad)
        assert ref_bad.any() and torch.equal(bad, ref_bad), f"{backend}: the non-finite {name} entries differ"


@pytest.mark.parametrize("device,backend", ATTN_F16)
def test_attention_float16_large_logits_do_not_overflow(device, backend):
    q, k, v = make_inputs((1, 2, 16, 64), (1, 2, 16, 64), (1, 2, 16, 64), dtype=torch.float16, scale=30.0)
    out = F.attention(q, k, v, backend=backend)  # raw scores reach ~1e5, above float16's 65504
    assert torch.isfinite(out).all()
    ref64 = R.attention(q.double(), k.double(), v.double())
    compare("large-logit output", out, ref64, ref64.half(), k=1.0, floor=2e-2 * ref64.abs().max().item())


def _views(B=2, H=3, L=7, D=8):
    base = torch.randn(B, L, H, 2 * D)
    transposed = base[..., :D].transpose(1, 2)  # non-contiguous, offset-free
    offset = base[..., D:].transpose(1, 2)  # offset view
    expanded = torch.randn(1, H, L, D).expand(B, H, L, D)  # stride 0 along batch
    return transposed, offset, expanded


@pytest.mark.parametrize("device,backend", ATTN)
def test_attention_strided_views(device, backend):
    q, k, v = _views()
    expected = F.attention(q.contiguous(), k.contiguous(), v.contiguous(), backend=backend)
    torch.testing.assert_close(F.attention(q, k, v, backend=backend), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", ATTN)
def test_attention_inputs_unmodified_and_deterministic(device, backend):
    q, k, v = make_inputs((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8))
    mask = torch.randn(9, 9, requires_grad=True)
    snapshot = [t.detach().clone() for t in (q, k, v, mask)]
    results = []
    for _ in range(2):
        for t in (q, k, v, mask):
            t.grad = None
        g = torch.Generator().manual_seed(3)
        out = F.attention(q, k, v, attn_mask=mask, causal=True, dropout_p=0.2, generator=g, backend=backend)
        out.backward(torch.ones_like(out))
        results.append([out.detach().clone()] + [t.grad.clone() for t in (q, k, v, mask)])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    for t, s in zip((q, k, v, mask), snapshot):
        assert torch.equal(t.detach(), s)


def _warnings_are_errors():
    """Our warnings as errors, not Triton's: Triton 3.6's interpreter (the card's GPU Triton, run on
    CPU) converts one-element arrays to scalars, which numpy >= 1.25 deprecates with a warning
    raised from Triton's own code."""
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"triton\.")


@pytest.mark.parametrize("device,backend", NORM)
def test_layer_norm_edge_cases(device, backend):
    x = torch.randn(0, 5, 16, requires_grad=True)
    with warnings.catch_warnings():  # (the reference's var_mean warned of no degrees of freedom)
        _warnings_are_errors()
        out = F.layer_norm_residual(x, torch.randn(0, 5, 16), backend=backend)
    assert out.shape == (0, 5, 16)
    # zero rows whose strides are 0 (an empty expand; out.sum()'s gradient is one): the C++ ops
    # refused them ("must have unit stride along its last dimension, got strides [0, 0]")
    x = torch.randn(0, 8, requires_grad=True)
    F.layer_norm_residual(x, backend=backend).sum().backward()
    assert x.grad.shape == (0, 8)
    assert F.layer_norm_residual(torch.zeros(1, 1).expand(0, 8), backend=backend).shape == (0, 8)
    x = torch.randn(4, 16)
    x[2, 3] = float("nan")
    out = F.layer_norm_residual(x, torch.randn(4, 16), backend=backend)
    assert (~torch.isfinite(out[2])).all() and torch.isfinite(out[[0, 1, 3]]).all()
    base = torch.randn(16, 8).t()  # (8, 16) with a row stride of 1 and column stride 8
    residual = torch.randn(1, 16).expand(8, 16)
    torch.testing.assert_close(F.layer_norm_residual(base, residual, backend=backend),
                               F.layer_norm_residual(base.contiguous(), residual.contiguous(), backend=backend))


@pytest.mark.parametrize("device,backend", union_cases(NORM, FFN))
def test_zero_hidden_size_with_leading_dims(device, backend):
    """A last size of 0 under two or more leading dims gives empty outputs, as torch's layer_norm
    and linear do (and as a 2-D input did): the rows were flattened by reshape(-1, 0), ambiguous
    for an empty tensor ("cannot reshape tensor of 0 elements into shape [-1, 0]"). No warning
    either: the reference's row statistics warned of var_mean's degrees of freedom there."""
    _warnings_are_errors()  # (pytest restores the filters after the test)
    x, residual = torch.randn(2, 3, 0, requires_grad=True), torch.randn(2, 3, 0, requires_grad=True)
    takes = {op: any(case.values == (device, backend) for case in cases) for op, cases in (("norm", NORM), ("ffn", FFN))}
    assert any(takes.values())
    if takes["norm"]:
        out = F.layer_norm_residual(x, residual, backend=backend)
        assert out.shape == (2, 3, 0)
        out.sum().backward()
        assert x.grad.shape == x.shape and residual.grad.shape == residual.shape
    if takes["ffn"]:
        w1, w2, b2 = torch.randn(4, 0, requires_grad=True), torch.randn(5, 4, requires_grad=True), torch.randn(5)
        out = F.feed_forward(x, w1, None, w2, b2, backend=backend)
        assert out.shape == (2, 3, 5) and torch.equal(out.detach(), b2.expand(2, 3, 5))  # h = relu(0) = 0
        out.sum().backward()
        assert x.grad.shape == x.shape and torch.all(w2.grad == 0)


@pytest.mark.parametrize("device,backend", NORM)
@pytest.mark.parametrize("mean", [300.0, -3000.0])
def test_layer_norm_rows_of_large_mean(device, backend, mean):
    """Rows whose mean is large against their spread (std 0.01) lose the spread to a float32 mean's
    rounding unless the variance pass corrects it: the cpu kernel failed the oracle here (err 1.1e-2
    against 4.7e-3 at mean 300); on a GPU this holds the Triton and CUDA kernels to it too."""
    gen = torch.Generator().manual_seed(int(abs(mean)) + 4096)
    x = (torch.randn(4, 4096, generator=gen, dtype=torch.float64) * 0.01 + mean).float().to(device)
    w, b = make_inputs((4096,), (4096,), seed=0, requires_grad=False)  # (weights around 1, biases small)
    w, b = (w * 0.25 + 1).to(device), (b * 0.1).to(device)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    if backend == "reference":
        # Here float32 itself loses the spread (torch's own layer_norm is 3e-2 off float64), so the
        # reference backend misses the oracle's fixed bound; the reference does not shift these
        # rows and is torch's layer_norm (bit for bit on the CPU), forward and backward: held to
        # that instead (the oracle would compare it with itself).
        dy = torch.randn(x.shape, generator=gen).to(device)

        def run(fn):
            args = [t.detach().clone().requires_grad_() for t in inputs]
            out = fn(*args)
            out.backward(dy)
            return [out.detach()] + [a.grad for a in args]

        got = run(lambda x, w, b: F.layer_norm_residual(x, None, w, b, 1e-5, backend=backend))
        want = run(lambda x, w, b: torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, 1e-5))
        for name, g, t in zip(["out", "dx", "dweight", "dbias"], got, want):
            torch.testing.assert_close(g, t, rtol=1e-6, atol=1e-6 * t.abs().max().item(), msg=name)
        return
    results = check_against_reference(lambda x, w, b: F.layer_norm_residual(x, None, w, b, 1e-5, backend=backend),
                                      lambda x, w, b: R.layer_norm_residual(x, None, w, b, 1e-5), inputs,
                                      names=["x", "weight", "bias"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


def nearly_constant_rows(mean, std, rows, d, seed):
    """(x, residual): float32 rows whose spread is only a few float32 ulps of their mean, split into
    x (the ulps below 1/16) and a residual (the rest) whose float32 sum is the row exactly: no
    rounding of the add hides the mean's error (the float64 reference would not round it)."""
    gen = torch.Generator().manual_seed(seed)
    s = (mean + std * torch.randn(rows, d, generator=gen, dtype=torch.float64)).float()
    residual = ((s.double() * 16).round() / 16).float()
    x = s - residual  # exact (Sterbenz), and x + residual == s exactly
    assert torch.equal(x + residual, s)
    return x, residual


@pytest.mark.parametrize("device,backend", NORM)
@pytest.mark.parametrize("mean,std,d", [(1e4, 2e-3, 1024), (1e6, 0.1, 4096), (-3e5, 0.05, 97)])
def test_layer_norm_nearly_constant_rows(device, backend, mean, std, d):
    """Rows whose spread is only a few float32 ulps of their mean (|mean| / std beyond ~2^22): a
    float32 mean's rounding, up to ulp(mean) / 2, shifts every xhat of the row by up to
    ulp(mean) / (2 std). The cpu and Triton kernels normalised with a float32 mean (1e4 +- 2e-3:
    output off by 0.05, dx by 0.25 %); they now normalise with the float32 mean and the residual
    sum(s - mean) / d it cannot hold, forward and backward. Held to the reference (which shifts
    such rows by their mean first) with the oracle: out, dx, dresidual, dweight and dbias."""
    x, residual = nearly_constant_rows(mean, std, 3, d, seed=d)
    w, b = make_inputs((d,), (d,), seed=1, requires_grad=False)
    w, b = (w * 0.25 + 1).to(device), (b * 0.1).to(device)
    inputs = [t.to(device).requires_grad_() for t in (x, residual, w, b)]
    results = check_against_reference(
        lambda x, r, w, b: F.layer_norm_residual(x, r, w, b, 1e-5, backend=backend),
        lambda x, r, w, b: R.layer_norm_residual(x, r, w, b, 1e-5), inputs,
        names=["x", "residual", "weight", "bias"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", FFN)
def test_feed_forward_edge_cases(device, backend):
    w1, w2 = torch.randn(12, 8), torch.randn(8, 12)
    assert F.feed_forward(torch.randn(0, 8), w1, None, w2, None, backend=backend).shape == (0, 8)
    x = torch.randn(5, 8)
    x[1, 0] = float("nan")
    out = F.feed_forward(x, w1, None, w2, None, backend=backend)
    assert (~torch.isfinite(out[1])).all() and torch.isfinite(out[[0, 2, 3, 4]]).all()
    xt = torch.randn(8, 5).t()
    check_against_reference(lambda x, a, b: F.feed_forward(x, a, None, b, None, activation="gelu", backend=backend),
                            lambda x, a, b: R.feed_forward(x, a, None, b, None, "gelu"),
                            [xt.requires_grad_(), w1.t().contiguous().t().requires_grad_(), w2.requires_grad_()])


ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]
#: pre-activations from far below zero to far above, through exp's under/overflow points
EXTREME_PRE = [-3e38, -1e38, -1e30, -1e20, -1e5, -104.0, -100.0, -88.5, -87.0, -20.0, -1.0, 0.0, 1.0, 20.0, 88.5,
               1e5, 1e20, 1e30, 1e38, 3e38]


def _one_unit_ffn(activation, with_b1=False):
    """(w1, b1, w2) of a feed-forward with one unit: pre = x (gated: gate = x, up = 1), out = h.
    ``with_b1``: a zero b1 where there would be none (ReLU with b1 and no dropout takes its own
    path on the cuda backend: bias and ReLU in the GEMM's epilogue, torch._addmm_activation)."""
    if activation in ("swiglu", "geglu"):
        return torch.tensor([[1.0], [0.0]]), torch.tensor([0.0, 1.0]), torch.ones(1, 1)
    return torch.ones(1, 1), torch.zeros(1) if with_b1 else None, torch.ones(1, 1)


#: (activation, with_b1): every activation without b1 (the gated ones have one), and ReLU with b1 too
ACTIVATION_B1 = [pytest.param(a, False, id=a) for a in ACTIVATIONS] + [pytest.param("relu", True, id="relu-b1")]


@pytest.mark.parametrize("device,backend", FFN)
@pytest.mark.parametrize("activation,with_b1", ACTIVATION_B1)
def test_feed_forward_extreme_pre_activations(device, backend, activation, with_b1):
    # Every backend gives torch's act(x) and act'(x) wherever torch's are finite. The cpu kernels'
    # exp clamped its argument, so sigmoid(-3e38) was 6e-39 instead of 0: silu(-3e38) = -1.82,
    # silu(-1e38) = -0.6, and gelu's pdf term x * phi(x) gave gelu'(3e38) = 2.46. Where torch
    # overflows on the way (gelu(3e38) = inf, gelu_tanh'(x) NaN once x^2 overflows) it is skipped.
    # A NaN pre-activation gives NaN out (ReLU with b1 included: a fused bias+ReLU epilogue must
    # not turn it into 0) and, for ReLU, a passing gradient (torch's relu(x) <= 0 ? 0 : grad).
    w1, b1, w2 = _one_unit_ffn(activation, with_b1)
    x = torch.tensor(EXTREME_PRE + [float("nan")])[:, None].requires_grad_()
    out = F.feed_forward(x, w1, b1, w2, None, activation=activation, backend=backend)
    (dx,) = torch.autograd.grad(out.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    ref = R.feed_forward(x_ref, w1, b1, w2, None, activation)
    (dx_ref,) = torch.autograd.grad(ref.sum(), x_ref)
    for name, got, want in (("out", out, ref), ("dx", dx, dx_ref)):
        finite = torch.isfinite(want)
        assert finite.sum() >= len(EXTREME_PRE) // 2, name
        torch.testing.assert_close(got[finite], want[finite], atol=1e-6, rtol=1e-5,
                                   msg=lambda m: f"{name} at x = {x.detach()[finite].flatten().tolist()}: {m}")
        assert torch.isnan(got[-1]).item() == torch.isnan(want[-1]).item(), f"{name} at x = NaN: {got[-1].item()}"
    assert torch.isnan(out[-1]).all()
    if activation == "relu":
        assert dx[-1].item() == 1.0  # the gradient passes at NaN, as torch's


@pytest.mark.parametrize("device,backend", FFN)
@pytest.mark.parametrize("activation,with_b1", ACTIVATION_B1)
def test_feed_forward_nan_pre_activation_gradients_follow_torch(device, backend, activation, with_b1):
    # torch's relu backward is ``relu(x) <= 0 ? 0 : grad``: at a NaN pre-activation the gradient
    # passes (NaN <= 0 is false); the cpu/triton/cuda kernels had ``x > 0 ? 1 : 0`` and zeroed it,
    # which changed the finite entries of dx and dW1. The smooth activations give NaN there.
    # ReLU with b1 (no dropout) is the cuda backend's fused bias+ReLU GEMM epilogue: the NaN must
    # come out of it as NaN (out, and the h saved for the backward), not as 0.
    gated = activation in ("swiglu", "geglu")
    x = torch.tensor([[float("nan"), 1.0], [0.5, -0.3], [2.0, -1.5]])
    w1 = torch.cat([torch.eye(2), 0.5 * torch.eye(2)]) if gated else torch.eye(2)
    w2 = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    b1 = torch.tensor([0.25, -0.5]) if with_b1 else None
    grads, results = {}, []
    for be in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, w1, w2) + ((b1,) if with_b1 else ())]
        b1_leaf = leaves[3] if with_b1 else None
        out = F.feed_forward(leaves[0], leaves[1], b1_leaf, leaves[2], None, activation=activation, backend=be)
        results.append([out.detach()] + list(torch.autograd.grad(out.sum(), leaves)))
    names = ["out", "dx", "dw1", "dw2"] + (["db1"] if with_b1 else [])
    for name, got, want in zip(names, *results):
        torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{name}: {m}")
    assert torch.isnan(results[0][0][0]).all()  # the NaN row's output
    if activation == "relu":
        assert torch.isfinite(results[0][1][0]).all()  # dx of the NaN row: finite, as torch's


@pytest.mark.parametrize("device,backend", NORM)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("d", [8, 64])
def test_layer_norm_overflowing_variance(device, backend, rms, d):
    # A row whose variance overflows float32 (|x| ~ 1e20 and up): torch's layer_norm gives NaN
    # (rstd NaN) and so must every kernel; they gave rstd = 0, out = bias and dx = 0 silently.
    # torch's rms_norm gives x * rsqrt(inf) = 0 there (out = bias, finite gradients): the kernels too
    # (but for dx of the row of 3e38, where torch's autograd meets inf * 0: sum(g * x) overflows).
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(4, d, generator=gen)
    x[1] *= 1e30
    x[3] = x[3].clamp(-1, 1) * 3e38
    w, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    dout = torch.randn(4, d, generator=gen)
    results = []
    for be in (backend, "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = F.layer_norm_residual(leaves[0], None, leaves[1], leaves[2], rms=rms, backend=be)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, dout)))
    (out, dx, dw, db), (ref, dx_ref, dw_ref, db_ref) = results
    big = torch.tensor([False, True, False, True])
    if rms:
        rows = slice(0, 3)
        for name, got, want in (("out", out, ref), ("dx", dx[rows], dx_ref[rows]), ("dw", dw, dw_ref), ("db", db, db_ref)):
            assert torch.isfinite(want).all(), name
            torch.testing.assert_close(got, want, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(out[big], b.expand(2, d))
        assert backend == "reference" or torch.isfinite(dx).all()  # the kernels: 0 * finite
        return
    assert torch.isnan(ref[big]).all() and torch.isnan(dx_ref[big]).all()  # torch's answer
    assert torch.isnan(out[big]).all() and torch.isnan(dx[big]).all() and torch.isnan(dw).all()
    torch.testing.assert_close(out[~big], ref[~big])
    torch.testing.assert_close(dx[~big], dx_ref[~big])
    torch.testing.assert_close(db, db_ref)


def _norm64(x, w, b, rms, eps=1e-5):
    """The norm in float64, with the one float32 rule of every backend: a mean square (RMSNorm)
    beyond float32's range gives rstd 0. (LayerNorm's variance of these rows never overflows.)"""
    if rms:
        ms = x.pow(2).mean(-1, keepdim=True)
        xhat = x * torch.where(ms.float().isinf(), 0.0, torch.rsqrt(ms + eps))
    else:
        mean = x.mean(-1, keepdim=True)
        xhat = (x - mean) * torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps)
    return xhat * w + b


def _large_rows(d, rms):
    """Rows whose statistics are representable in float32 while plain float32 sums over them
    overflow: the sum of squares of +-1e18 over 1024 columns (1e39; variance 1e36) or of 1e18 *
    randn; at d = 16, +-1e19 with one 2e19 (variance 1.2e38, that element's square 4e38). For
    LayerNorm also a row of mean 1e21 and spread 3e18, and constant rows of 1e20, 1e36 and -3e38
    (variance 0; the sum of the last two overflows over 1024 columns): torch's layer_norm gives NaN
    for all (from a mean of ~2e19 on, whatever the variance). (Their mean squares overflow: RMSNorm
    gives out = bias there, test_layer_norm_overflowing_variance.) An ordinary row last."""
    gen = torch.Generator().manual_seed(d)
    scale = 1e18 if d >= 1024 else 1e19
    alt = torch.full((d,), scale)
    alt[::2] = -scale
    alt[0] = 2 * scale
    rows = [alt, alt.flip(0) * 0.75, torch.randn(d, generator=gen) * scale]
    if not rms:
        rows += [(1e21 + 3e18 * torch.randn(d, generator=gen, dtype=torch.float64)).float()]
        rows += [torch.full((d,), c) for c in (1e20, 1e36, -3e38)]
        # and constant rows of 1e6 and 1e12, where the reference's torch layer_norm backward lost the
        # (zero) deviations to the mean's rounding: dx 0 and |dweight| 1.5e8 at 1e12, for 0
        rows += [torch.full((d,), c) for c in (1e6, -1e12)]
    return torch.stack(rows + [torch.randn(d, generator=gen)])


@pytest.mark.parametrize("device,backend", NORM)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("d", [16, 1024])
def test_layer_norm_representable_statistics_of_huge_rows(device, backend, rms, d):
    # The statistics are right wherever the variance (RMSNorm: the mean square) is representable in
    # float32, however far a plain float32 sum of the row's squares (or of the row) would overflow:
    # the reference and the Triton kernel summed e^2 in float32 and gave a silent row of bias (RMSNorm,
    # and the reference's LayerNorm) or NaN (Triton's LayerNorm) for +-1e18 over 1024 columns, with
    # dx = 0; the cpu kernel's float32 squares and block sums overflowed at +-1e19 (NaN); the
    # reference (torch's layer_norm) gave NaN at means beyond ~2e19; the Triton kernel's rounding
    # of a huge mean swamped a constant row's variance (1e20: dx 1e13 times too small; 1e36: NaN)
    # and its backward overflowed outside the row (-3e38: dx NaN). Compared, out and every
    # gradient, with the float64 computation.
    x = _large_rows(d, rms)
    gen = torch.Generator().manual_seed(d + 1)
    w, b = torch.randn(d, generator=gen) * 0.5 + 1, torch.randn(d, generator=gen)
    dout = torch.randn(x.shape, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = F.layer_norm_residual(leaves[0], None, leaves[1], leaves[2], rms=rms, backend=backend)
    got = [out] + list(torch.autograd.grad(out, leaves, dout))
    leaves64 = [t.double().requires_grad_() for t in (x, w, b)]
    want = _norm64(*leaves64, rms)
    want = [want] + list(torch.autograd.grad(want, leaves64, dout.double()))
    for name, g, e in zip(("out", "dx", "dweight", "dbias"), got, want):
        assert torch.isfinite(e).all() and torch.isfinite(g).all(), name
        # row by row for out and dx (dx is ~1e-18 on the 1e18 rows, ~300 on the constant ones)
        for r, (g_row, e_row) in enumerate(zip(g.double().reshape(-1, d), e.reshape(-1, d))):
            err = (g_row - e_row).abs().max().item()
            assert err <= 1e-4 * e_row.abs().max().item() + 1e-30, f"{name} row {r}: err {err:.3g}"
    if not rms:  # a constant row normalises to exactly 0: out is exactly the bias
        assert torch.equal(out[4:7].detach(), b.detach().expand(3, d))


def _check_in_place_on_output(call, rows, n_inputs):
    """call(*inputs) -> output; the output modified in place (``mul_``, ``add_``) must give the
    value and the gradients of the same arithmetic out of place."""
    inputs = [torch.randn(*shape, requires_grad=True) for shape in (rows, rows, (16,))[:n_inputs]]
    expected = call(*inputs) * 2 + inputs[0]
    expected.sum().backward()
    expected_grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    out = call(*inputs)
    out.mul_(2).add_(inputs[0])
    assert out.shape == torch.Size(rows)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    for i, (e, t) in enumerate(zip(expected_grads, inputs)):
        torch.testing.assert_close(t.grad, e, msg=f"gradient {i}")


# The norm's and the feed-forward's outputs are ordinary tensors, as those of nn.LayerNorm and
# nn.Linear: ``h = ffn(x); h += x`` (or a ReLU(inplace=True) after it) trains, with the gradients
# of the out-of-place code. (They were views made inside the autograd Function, which autograd
# refuses to modify in place.) Attention's output is saved for its backward, as SDPA's is: an
# in-place change after the backward works, one before it meets autograd's usual version-counter
# error at the backward.
ROWS = pytest.mark.parametrize("rows", [(6, 16), (2, 3, 16), (16,)], ids=["2-D", "3-D", "1-D"])


@pytest.mark.parametrize("device,backend", NORM)
@ROWS
@pytest.mark.parametrize("prenorm", [False, True])
def test_layer_norm_output_can_be_modified_in_place(device, backend, rows, prenorm):
    def call(x, residual, weight):
        out = F.layer_norm_residual(x, residual, weight, None, prenorm=prenorm, backend=backend)
        return out[0] if prenorm else out
    _check_in_place_on_output(call, rows, 3)


@pytest.mark.parametrize("device,backend", FFN)
@ROWS
def test_feed_forward_output_can_be_modified_in_place(device, backend, rows):
    w1, w2 = torch.randn(24, 16, requires_grad=True), torch.randn(16, 24, requires_grad=True)
    _check_in_place_on_output(lambda x: F.feed_forward(x, w1, None, w2, None, backend=backend), rows, 1)


def _attention_calls(backend):
    """(name, call of q, k, v) for each attention entry point whose output is its Function's (the
    SDPA wrapper's 3-D call views a 4-D one)."""
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    yield "attention", (1, 2, 5, 8), lambda q, k, v: F.attention(q, k, v, causal=True, backend=backend)
    yield "attention_varlen", (5, 2, 8), lambda q, k, v: F.attention_varlen(q, k, v, cu, cu, 3, 3, causal=True,
                                                                            backend=backend)
    yield "scaled_dot_product_attention 3-D", (2, 5, 8), lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, backend=backend)


@pytest.mark.parametrize("device,backend", ATTN)
def test_attention_output_can_be_modified_in_place_after_backward(device, backend):
    """As SDPA's: after the backward the output is the caller's to change (it was a view made inside
    the autograd Function, which autograd refuses to modify in place ever: "Output 0 of
    AttentionFunction is a view ... created inside a custom Function"), and it keeps the layout
    docs/api.md gives it, (B, Lq, Hq, Dv) in memory."""
    for name, shape, call in _attention_calls(backend):
        q, k, v = (torch.randn(*shape, device=device, requires_grad=True) for _ in range(3))
        out = call(q, k, v)
        if out.dim() == 4:
            assert out.transpose(1, 2).is_contiguous(), name
        out.sum().backward()
        before = out.detach().clone()
        out.mul_(2).add_(1)
        torch.testing.assert_close(out.detach(), before * 2 + 1, msg=name)


@pytest.mark.parametrize("device,backend", ATTN)
def test_attention_output_modified_before_backward_raises_at_backward(device, backend):
    """An in-place change before the backward, which reads the output, is refused at the backward
    with torch's version-counter error, as for SDPA (not at the change itself)."""
    for name, shape, call in _attention_calls(backend):
        q, k, v = (torch.randn(*shape, device=device, requires_grad=True) for _ in range(3))
        out = call(q, k, v)
        out.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


def _left_alive(fn, backward: bool) -> list:
    """Run ``fn`` (and a backward through its first output), drop every output, and list what
    outlives them: the outputs, their grad_fn's saved tensors, the grad_fn itself."""
    import gc
    import weakref
    outs = fn()
    outs = outs if isinstance(outs, tuple) else (outs,)
    node = outs[0].grad_fn
    while type(node).__name__.startswith("ViewBackward"):  # (rows viewed in x's shape) to the Function
        node = node.next_functions[0][0]
    held = [(f"output {i}", weakref.ref(t)) for i, t in enumerate(outs)]
    held += [(f"saved tensor {i}", weakref.ref(t)) for i, t in enumerate(node.saved_tensors) if t is not None]
    held.append(("grad_fn", weakref.ref(node)))
    if backward:
        outs[0].sum().backward()
    del outs, node
    gc.collect()
    return [name for name, ref in held if ref() is not None]


def _graph_cases(backend):
    """(name, op, fn): each call builds fresh inputs, so that once its outputs are dropped nothing
    the test holds keeps the graph or the saved tensors alive."""
    def g(*shape):
        return torch.randn(*shape, requires_grad=True)
    for rows in ((6, 16), (2, 3, 16)):
        yield f"layer_norm {len(rows)}-D", "layer_norm_residual", lambda rows=rows: F.layer_norm_residual(
            g(*rows), g(*rows), g(16), g(16), backend=backend)
        yield f"layer_norm prenorm {len(rows)}-D", "layer_norm_residual", lambda rows=rows: F.layer_norm_residual(
            g(*rows), g(*rows), g(16), g(16), prenorm=True, backend=backend)
        yield f"feed_forward {len(rows)}-D", "feed_forward", lambda rows=rows: F.feed_forward(
            g(*rows), g(24, 16), g(24), g(16, 24), None, backend=backend)
    yield "attention", "attention", lambda: F.attention(g(1, 2, 5, 8), g(1, 2, 5, 8), g(1, 2, 5, 8), causal=True,
                                                        backend=backend)
    yield "attention mask", "attention", lambda: F.attention(g(1, 2, 5, 8), g(1, 2, 5, 8), g(1, 2, 5, 8),
                                                             attn_mask=g(5, 5), backend=backend)


@pytest.mark.parametrize("device,backend", union_cases(ATTN, NORM, FFN))
def test_no_graph_outlives_its_outputs(device, backend):
    """A saved tensor that is a view of the Function's own output closes a reference cycle
    through C++ (output -> grad_fn -> saved view -> output) that Python's gc cannot collect: the
    layer norm on 2-D input leaked its whole graph on every call until this test. Forward with
    the outputs dropped, and forward + backward, must both leave nothing alive."""
    leaks = {}
    for name, op, fn in _graph_cases(backend):
        if backend not in runnable_backends(op, device=device, dtype=torch.float32):
            continue
        for backward in (False, True):
            alive = _left_alive(fn, backward)
            if alive:
                leaks[f"{name}{' forward+backward' if backward else ' forward'}"] = alive
    assert not leaks, f"left alive after the outputs were dropped: {leaks}"


def test_meta_tensors_give_shapes_forward_and_backward():
    """Meta tensors (shapes without data: memory estimates, deferred init) run through the
    reference math, which PyTorch runs on meta, forward and backward, as SDPA and layer_norm do
    (they raised "unknown device type for autocast")."""
    import fused_attn
    from fused_attn import functional as F

    q = torch.empty(1, 2, 4, 8, device="meta", requires_grad=True)
    out = F.attention(q, q, q, causal=True)
    assert out.device.type == "meta" and out.shape == (1, 2, 4, 8)
    out.sum().backward()
    assert q.grad.device.type == "meta" and q.grad.shape == q.shape
    x = torch.empty(3, 8, device="meta", requires_grad=True)
    w1, w2 = torch.empty(32, 8, device="meta"), torch.empty(8, 16, device="meta")
    assert F.layer_norm_residual(x, x, torch.empty(8, device="meta")).shape == (3, 8)
    assert F.feed_forward(x, w1, None, w2, None, activation="swiglu").shape == (3, 8)
    model = fused_attn.Transformer(16, 2, 1, device="meta")
    model(torch.empty(2, 5, 16, device="meta")).sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())


def _shapes_only(kind):
    """Where tensors have shapes but no data: created on meta, or fake (FakeTensorMode, as memory
    estimators run a model outside torch.compile)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return torch.device("meta") if kind == "meta" else FakeTensorMode()


def _no_data(t) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.is_meta or is_fake(t)


@pytest.mark.parametrize("kind", ["meta", "fake"])
def test_shapes_without_data_through_the_calls_that_read_lengths(kind):
    """The calls whose lengths live in tensors (cu_seqlens, cache_seqlens, position_ids, tensor
    seqlen_offsets) give their output shapes, and gradients of the inputs' shapes, on meta and
    fake tensors: they take torch.compile's path, which reads nothing on the host (they raised
    "Cannot copy out of meta tensor" / DataDependentOutputException reading the lengths)."""
    def grads(out, *inputs):
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        return [tuple(t.grad.shape) for t in inputs]

    with _shapes_only(kind):
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        q, k, v = (torch.empty(7, h, 8, requires_grad=True) for h in (4, 2, 2))
        for max_seqlen in (4, None):  # (None: nothing to read it from; the total length bounds it)
            out = F.attention_varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=True, dropout_p=0.1)
            assert _no_data(out) and out.shape == (7, 4, 8)
            assert grads(out, q, k, v) == [(7, 4, 8), (7, 2, 8), (7, 2, 8)]
            q.grad = k.grad = v.grad = None
        out, lse = F.attention_varlen(q, k, v, cu, cu, seqused_k=torch.tensor([2, 3], dtype=torch.int32),
                                      return_lse=True)
        assert out.shape == (7, 4, 8) and lse.shape == (4, 7)
        with torch.no_grad():
            pages = torch.empty(3, 4, 2, 8)
            table = torch.zeros(2, 2, dtype=torch.int32)
            assert F.attention_varlen(q, pages, pages, cu, cu, block_table=table).shape == (7, 4, 8)
            qd, cache, new = torch.empty(2, 1, 4, 8), torch.empty(2, 16, 2, 8), torch.empty(2, 1, 2, 8)
            lengths = torch.tensor([3, 4], dtype=torch.int32)
            tables = torch.empty(32, 4)
            for options in (dict(cache_seqlens=3), dict(cache_seqlens=lengths),
                            dict(cache_seqlens=lengths, cache_leftpad=torch.tensor([1, 0], dtype=torch.int32)),
                            dict(cache_seqlens=3, cache_batch_idx=torch.tensor([1, 0], dtype=torch.int32)),
                            dict(cache_seqlens=lengths, rotary_cos=tables, rotary_sin=tables, causal=True)):
                out = F.attention_with_kvcache(qd, cache, cache.clone(), new, new, **options)
                assert _no_data(out) and out.shape == (2, 1, 4, 8), options
            out = F.attention_with_kvcache(qd, pages, pages.clone(), new, new, cache_seqlens=lengths,
                                           block_table=table.clone(), return_lse=True)
            assert out[0].shape == (2, 1, 4, 8) and out[1].shape == (2, 4, 1)
            assert F.attention_with_kvcache(qd, cache, cache, cache_seqlens=3).shape == (2, 1, 4, 8)
        cos = torch.empty(16, 4)
        x = torch.empty(7, 2, 8, requires_grad=True)
        for options in (dict(cu_seqlens=cu), dict(cu_seqlens=cu, max_seqlen=4),
                        dict(position_ids=torch.zeros(7, dtype=torch.long))):
            out = F.apply_rotary_emb(x, cos, cos, **options)
            assert _no_data(out) and out.shape == (7, 2, 8), options
            assert grads(out, x) == [(7, 2, 8)]
            x.grad = None
        x4 = torch.empty(2, 5, 2, 8, requires_grad=True)
        out = F.apply_rotary_emb(x4, cos, cos, seqlen_offsets=torch.tensor([1, 2]))
        assert out.shape == (2, 5, 2, 8) and grads(out, x4) == [(2, 5, 2, 8)]


@pytest.mark.parametrize("kind", ["meta", "fake"])
@pytest.mark.parametrize("module", ["fused", "reference"])
def test_shapes_without_data_through_packed_and_decoding_modules(kind, module):
    """A Transformer built on meta (or under FakeTensorMode) runs packed sequences, forward and
    backward (learnable ALiBi's per-sequence path included), and decodes with a KV cache (a
    left-padded prefill included), fused and reference modules alike; they raised reading
    cu_seqlens and the cache's counts."""
    import fused_attn

    cls = fused_attn.Transformer if module == "fused" else R.Transformer
    with _shapes_only(kind):
        cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        for options in (dict(rotary=True, dropout=0.1), dict(alibi="learnable", sinks=True)):
            model = cls(16, 2, 2, d_ff=32, num_kv_heads=1, causal=True, **options)
            for max_seqlen in (3, None):
                out = model(torch.empty(5, 16), cu_seqlens=cu, max_seqlen=max_seqlen)
                assert _no_data(out) and out.shape == (5, 16), options
                out.sum().backward()
                assert all(p.grad.shape == p.shape for p in model.parameters()), options
            model.eval()
            with torch.no_grad():
                cache = model.new_kv_cache(2, 8)
                prompt_pad = torch.tensor([[True, False, False], [False, False, False]])
                assert model(torch.empty(2, 3, 16), kv_cache=cache, key_padding_mask=prompt_pad).shape == (2, 3, 16)
                out = model(torch.empty(2, 1, 16), kv_cache=cache)
                assert _no_data(out) and out.shape == (2, 1, 16), options


def test_shapes_without_data_draw_no_dropout_seed():
    """A dropout call on meta or fake tensors leaves torch's generator as it was, as torch's
    dropout and SDPA do there (a shape probe before a seeded run changed the run's masks); a
    functional call on fake tensors used outside their FakeTensorMode gets a fake seed (a real one
    failed the op)."""
    import fused_attn
    from torch._subclasses.fake_tensor import FakeTensorMode

    def calls():
        q = torch.empty(2, 4, 5, 8)
        x, w1, w2 = torch.empty(3, 8), torch.empty(32, 8), torch.empty(8, 32)
        cu = torch.tensor([0, 3, 7], dtype=torch.int32)
        packed = torch.empty(7, 4, 8)
        model = fused_attn.Transformer(16, 2, 1, d_ff=32, dropout=0.1, norm_first=True)
        tokens, cu_tokens = torch.empty(2, 5, 16), torch.tensor([0, 2, 5], dtype=torch.int32)
        return [lambda: F.attention(q, q, q, dropout_p=0.1),
                lambda: F.attention(q, q, q, dropout_p=0.1, generator=torch.Generator()),
                lambda: F.attention_varlen(packed, packed, packed, cu, cu, 4, 4, dropout_p=0.1),
                lambda: F.layer_norm_residual(x, x, dropout_p=0.2),
                lambda: F.feed_forward(x, w1, None, w2, None, dropout_p=0.1),
                lambda: model(tokens),
                lambda: model(tokens[0], cu_seqlens=cu_tokens)]

    for kind in ("meta", "fake"):
        torch.manual_seed(0)
        state = torch.get_rng_state()
        with _shapes_only(kind):
            for i, call in enumerate(calls()):
                assert _no_data(call()), (kind, i)
        assert torch.equal(state, torch.get_rng_state()), kind
    with FakeTensorMode():
        outside = calls()
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for i, call in enumerate(outside[:5]):  # (the functional calls: a module makes tensors of its own, real there)
        assert _no_data(call()), i
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("device,backend", ATTN)
def test_inference_mode_with_grad_enabled_records_nothing(device, backend):
    """``torch.enable_grad()`` inside ``torch.inference_mode()`` (validation loops that turn grad
    back on): torch's ops record no graph there and return inference tensors, and so do ours
    (they chose the autograd Function and raised 'Inference tensors cannot be saved for
    backward'), as does a module's KV-cache decoding (refused as 'not inference')."""
    import fused_attn
    from fused_attn import TransformerLayer

    if any(backend not in runnable_backends(op, device=device) for op in ("layer_norm_residual", "feed_forward")):
        pytest.skip(f"{backend} does not run every op here")
    q = make_inputs((1, 2, 5, 8), seed=1)[0]
    w, w1, w2 = (torch.randn(*shape).requires_grad_() for shape in ((8,), (16, 8), (8, 16)))
    cos, sin = torch.ones(5, 4), torch.zeros(5, 4)
    layer = TransformerLayer(8, 2, causal=True).to(q.device)
    calls = [lambda: F.attention(q, q, q), lambda: F.layer_norm_residual(q, None, w, None),
             lambda: F.feed_forward(q, w1, None, w2, None), lambda: F.apply_rotary_emb(q.transpose(1, 2), cos, sin),
             lambda: layer(torch.randn(1, 5, 8)),
             lambda: layer(torch.randn(2, 3, 8), kv_cache=layer.new_kv_cache(2, 4))]
    with fused_attn.use_backend(backend), torch.inference_mode(), torch.enable_grad():
        for call in calls:
            out = call()
            assert out.is_inference() and not out.requires_grad


@pytest.mark.parametrize("device,backend", ATTN)
def test_attention_rows_hidden_by_finfo_min(device, backend):
    """A row every key of which a huge finite additive mask hides (torch.finfo(float32).min, as
    Hugging Face builds its masks; README "Huge finite masks"): its logits are all equal, so it
    averages the values, as SDPA does, on every backend but Triton, whose base-2 logits overflow
    to -inf there, so that the row is fully masked (zeros). The other rows match SDPA."""
    q, k, v = make_inputs((1, 2, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8), requires_grad=False, seed=5)
    mask = torch.zeros(1, 1, 4, 5)
    mask[..., 2, :] = torch.finfo(torch.float32).min
    mask[..., 1, 3] = float("-inf")
    out = F.attention(q, k, v, attn_mask=mask, backend=backend)
    hidden_row = torch.zeros_like(out[:, :, 2]) if backend == "triton" else v.mean(dim=2).expand_as(out[:, :, 2])
    torch.testing.assert_close(out[:, :, 2], hidden_row, rtol=1e-5, atol=1e-6)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    rows = [0, 1, 3]
    torch.testing.assert_close(out[:, :, rows], expected[:, :, rows], rtol=1e-5, atol=1e-6)


#: the ends of the documented ranges (README: softcap in [1e-30, F.MAX_SCALE], |scale| at most
#: F.MAX_SCALE) as (q's factor, the options). The Triton kernels take softcap * log2(e) and scale *
#: log2(e) as float32 (NaN past ~2.36e38, now refused); their tanh was 0 for |x| < ~3e-8 (every
#: logit 0 under the largest cap, errors of ~1e-3 at a cap of 1e4); and their scale / softcap, 1e40
#: for the last case, was inf in float32 (0 * inf = NaN logits on the zero queries).
EXTREME_SCALES = {
    "softcap_1e4": (1.0, dict(softcap=1e4)),
    "softcap_max": (1.0, dict(softcap=F.MAX_SCALE)),
    "scale_max": (1e-38, dict(scale=F.MAX_SCALE)),  # (tiny queries: logits of a few units)
    "scale_min": (1e-38, dict(scale=-F.MAX_SCALE)),
    "scale_over_softcap_overflows": (0.0, dict(scale=1e10, softcap=1e-30)),
}


@pytest.mark.parametrize("device,backend", ATTN)
@pytest.mark.parametrize("case", EXTREME_SCALES)
def test_attention_extreme_scale_and_softcap(device, backend, case):
    """The ends of the documented softcap and scale ranges give the reference's answer, output and
    gradients, on every backend. (Not q's gradient at the largest |scale|: scale * dS K is beyond
    float32's range there.)"""
    factor, options = EXTREME_SCALES[case]
    q, k, v = make_inputs((1, 2, 3, 4), (1, 2, 4, 4), (1, 2, 4, 4), seed=7)
    q = (q.detach() * factor).requires_grad_(abs(options.get("scale", 1.0)) < 1e30)
    check_against_reference(lambda q, k, v: F.attention(q, k, v, backend=backend, **options),
                            lambda q, k, v: R.attention(q, k, v, **options), [q, k, v], names="qkv")


#: the ends of the soft cap's range, as (softcap, scale, q's factor, the limit's q factor): a cap far
#: above every logit leaves them as they are (the limit: no cap, q as it is), one far below
#: flattens them to +-softcap ~ 0 (the limit: q times 0, every key weighted alike, no gradient
#: reaching q or k). The reference's derivative g * softcap * (1 - t^2) / softcap overflowed
#: float32 at the huge caps (inf and NaN gradients; and every backend's create_graph backward,
#: which differentiates the reference); Triton's scale / softcap underflowed float32 at the third
#: case (every logit 0), and was clamped to float32's max at the last (1e40), where its derivative
#: 1 - t^2 came from s / softcap 30 times too small, unsaturated (|q.k| of 5e-39 to 2e-38 there:
#: s / softcap of 50 to 200 truly, of 2 to 7 clamped; dq ~1e7 instead of ~0).
SOFTCAP_ENDS = {
    "huge": (1e38, None, 1.0, 1.0),
    "largest": (F.MAX_SCALE, None, 1.0, 1.0),
    "huge_small_scale": (1e38, 1e-10, 1e10, 1.0),
    "tiny": (1e-30, None, 1.0, 0.0),
    "tiny_huge_scale": (1e-30, 1e10, 1e-38, 0.0),
}


@pytest.mark.parametrize("device,backend", ATTN)
@pytest.mark.parametrize("case", SOFTCAP_ENDS)
def test_attention_softcap_ends_reach_their_limits(device, backend, case):
    """At either end of the cap's range the output, its gradients (upstream gradient 4: |g * cap|
    beyond float32 at the huge caps), by the backend's backward and by a differentiable one
    (create_graph), the gradients of a gradient penalty and the forward-mode tangents are finite
    and the limit's: the uncapped attention under a huge cap, the flat one under a tiny cap."""
    cap, scale, factor, limit_factor = SOFTCAP_ENDS[case]
    q, k, v, tq, tk, tv = make_inputs((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4),
                                      requires_grad=False, seed=3)
    if case == "tiny_huge_scale":  # (one dim, |q.k| in [0.5, 2] * factor: every s / softcap saturates tanh)
        q = (q.sign() * (1 + q.abs().clamp(max=1))) * torch.tensor([1.0, 0, 0, 0])
        k = k.sign() * (0.5 + 0.5 * k.abs().clamp(max=1))
    q = q * factor
    tq = tq * factor

    def derivatives(fn, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*inputs)
        dout = torch.full_like(out, 4.0)
        grads = torch.autograd.grad(out, inputs, dout, retain_graph=True)  # (the backend's backward)
        graph_grads = torch.autograd.grad(out, inputs, dout, create_graph=True)  # (the reference's, differentiable)
        penalty = sum(g.square().sum() for g in graph_grads)
        second = torch.autograd.grad(penalty, inputs)
        # (small tangents: their ds / softcap went subnormal in float32 under the huge caps, 1e-4 off)
        _, tangent = torch.func.jvp(fn, tuple(t.detach() for t in inputs),
                                    tuple(1e-3 * t.to(dtype) for t in (tq, tk, tv)))
        return [out, *grads, *graph_grads, *second, tangent]

    names = ["out", "dq", "dk", "dv", "graph dq", "graph dk", "graph dv", "penalty dq", "penalty dk", "penalty dv",
             "tangent"]
    got = derivatives(lambda q, k, v: F.attention(q, k, v, scale=scale, softcap=cap, backend=backend), torch.float32)
    limit = derivatives(lambda q, k, v: R.attention(q * limit_factor, k, v, scale=scale), torch.float64)
    for name, a, b in zip(names, got, limit):
        assert bool(torch.isfinite(a).all()), name
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())), msg=name)


@pytest.mark.parametrize("device,backend", ATTN)
@pytest.mark.parametrize("softcap", [1e-30, 30.0, 1e38, F.MAX_SCALE])
def test_attention_softcap_logits_over_the_range(device, backend, softcap):
    """With one key a row's lse is its capped logit softcap * tanh(x / softcap): a few ulp of it
    for logits x of 1e-30 to 1e38, either sign. Under a huge cap x / softcap is subnormal in
    float32 (and 1 / softcap too, above ~8.5e37): the cpu backend's cap * tanh(x * (1 / cap)) was
    ~2e-7 off at every logit and 0 below ~1e-7, Triton's likewise (and worse: qk * (scale / cap)),
    the float32 reference's below ~1e-7; they now take the cap's linear part from x itself."""
    mags = torch.logspace(-30, 38, 137, dtype=torch.float64)
    x = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64)])
    q = x.float().view(1, 1, -1, 1)
    one = torch.ones(1, 1, 1, 1)
    _, lse = F.attention(q, one, one, scale=1.0, softcap=softcap, return_lse=True, backend=backend)
    expected = softcap * torch.tanh(q.double().view(-1) / softcap)
    torch.testing.assert_close(lse.view(-1).double(), expected, rtol=5e-7, atol=0)


@pytest.mark.parametrize("device,backend", ATTN)
@pytest.mark.parametrize("where", ["k", "q"])
def test_attention_softcap_inf_input_gradients_stay_in_their_rows(device, backend, where):
    """With a soft cap an inf in one key (query) leaves every capped logit finite: the gradients of
    the other inputs' rows are finite on every backend, as the reference's. The inf key's own
    dk/dv (the inf query's own dq) too, except on Triton, whose backward takes the tile's padding
    rows (zeros: 0 * inf = NaN scores) into them (README, NaN / inf)."""
    q, k, v = make_inputs((1, 1, 4, 8), (1, 1, 4, 8), (1, 1, 4, 8), requires_grad=False, seed=6)
    (k if where == "k" else q)[0, 0, 1, 2] = float("inf")
    grads = {}
    for name in (backend, "reference"):
        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = F.attention(*inputs, softcap=5.0, backend=name)
        assert bool(torch.isfinite(out).all())
        out.backward(torch.ones_like(out))
        grads[name] = [torch.isfinite(t.grad) for t in inputs]
    own_row = (1 if where == "k" else 0), (0, 0, 1)  # (the input holding the inf, its row)
    for i, (mine, ref) in enumerate(zip(grads[backend], grads["reference"])):
        if backend == "triton" and (i == own_row[0] or (where == "k" and i == 2)):
            mine, ref = mine.clone(), ref.clone()
            mine[own_row[1]] = ref[own_row[1]] = True  # (its own row: NaN on Triton, documented)
        assert torch.equal(mine, ref)
    assert bool(grads["reference"][own_row[0]][own_row[1]].all())  # (the reference's own row is finite)


# ---- views with the negative bit ---------------------------------------------------------------
# ``z.conj().imag`` of a complex z (a sin table built as ``torch.polar(1, angle).conj().imag``) is
# a real float view whose memory holds the negation of its values (``is_neg()``); torch's ops read
# it through the bit. Every backend must read such an argument as its values, forward and backward,
# inputs and incoming gradients alike (the Triton launchers hand the kernels raw pointers: they read
# -t until the views are resolved; the cpu and cuda ops get them materialised by the dispatcher),
# and an in-place call writes its values through the bit.

def _neg_bit(t, layout):
    """A view with t's values and the negative bit, differentiable in t: ``conj().imag`` (what
    complex maths hands over, every other element of a complex tensor) or ``torch._neg_view``'s
    contiguous one (which a ``.contiguous()`` on the way would leave as it is)."""
    view = torch.complex(torch.zeros_like(t), -t).conj().imag if layout == "imag" else torch._neg_view(-t)
    assert view.is_neg()
    return view


def _neg_attention(backend, q, k, v, mask, slopes, return_lse=True):
    return F.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, causal=True, return_lse=return_lse,
                       backend=backend)


def _neg_varlen(backend, q, k, v, slopes):
    cu = torch.tensor([0, 2, 5], dtype=torch.int32, device=q.device)
    return F.attention_varlen(q, k, v, cu, cu, 3, 3, alibi_slopes=slopes, causal=True, return_lse=True,
                              backend=backend)


def _neg_kvcache(backend, q, k_cache, v_cache, k, v, slopes, cos, sin):
    out = F.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([1, 3], dtype=torch.int32, device=q.device),
                                   rotary_cos=cos, rotary_sin=sin, alibi_slopes=slopes, causal=True, backend=backend)
    return out, k_cache, v_cache  # (the caches as written: read through the views when they are ones)


def _neg_rotary(backend, x, cos, sin, inplace=False):
    if inplace and not x.is_neg():  # (a leaf that requires grad cannot be written in place)
        x = x.clone()
    return apply_rotary_emb(x, cos, sin, inplace=inplace, backend=backend)


def _angles(rows, half):
    angle = torch.rand(rows, half) * 6
    return angle.cos(), angle.sin()


# name: (the op whose backends run it, the call, its inputs (a fresh set per run: the caches are
# written), which inputs get a gradient (none: an inference call))
NEG_BIT_CASES = {
    "attention": ("attention", _neg_attention,
                  lambda: [torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 5),
                           torch.randn(3, 3), torch.rand(1, 2)], (0, 1, 2, 3)),
    "attention_varlen": ("attention", _neg_varlen,
                         lambda: [torch.randn(5, 1, 4), torch.randn(5, 1, 4), torch.randn(5, 1, 4), torch.rand(2, 1)],
                         (0, 1, 2)),
    "attention_with_kvcache": ("attention", _neg_kvcache,
                               lambda: [torch.randn(2, 1, 1, 4), torch.randn(2, 5, 1, 4), torch.randn(2, 5, 1, 4),
                                        torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4), torch.rand(2, 1),
                                        *_angles(8, 2)], ()),
    "rotary": ("rotary", _neg_rotary, lambda: [torch.randn(2, 3, 2, 8), *_angles(6, 3)], (0,)),
    "rotary in place": ("rotary", lambda backend, x, cos, sin: _neg_rotary(backend, x, cos, sin, inplace=True),
                        lambda: [torch.randn(2, 3, 2, 8), *_angles(6, 3)], (0,)),
    "feed_forward": ("feed_forward", lambda backend, *a: F.feed_forward(*a, activation="gelu", backend=backend),
                     lambda: [torch.randn(4, 6), torch.randn(8, 6), torch.randn(8), torch.randn(6, 8), torch.randn(6)],
                     (0, 1, 2, 3, 4)),
    "layer_norm_residual": ("layer_norm_residual",
                            lambda backend, *a: F.layer_norm_residual(*a, prenorm=True, backend=backend),
                            lambda: [torch.randn(4, 6), torch.randn(4, 6), torch.randn(6), torch.randn(6)],
                            (0, 1, 2, 3)),
}


def _neg_bit_run(backend, name, layout, where, device):
    """(outputs, gradients) of case ``name`` on ``device`` with the input ``where`` (an index), or
    the incoming gradient of output ``("grad", i)``, given as a view with the negative bit; None:
    all plain."""
    _, call, make, grads = NEG_BIT_CASES[name]
    torch.manual_seed(0)
    inputs = [t.to(device).requires_grad_(i in grads) for i, t in enumerate(make())]
    given = [_neg_bit(t, layout) if i == where else t for i, t in enumerate(inputs)]
    outs = call(backend, *given)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    if not grads:
        return [o.detach().clone() for o in outs], []
    torch.manual_seed(1)
    grad_outs = [torch.randn_like(o) for o in outs]
    if isinstance(where, tuple):
        grad_outs[where[1]] = _neg_bit(grad_outs[where[1]], layout)
    wanted = [inputs[i] for i in grads]
    return [o.detach() for o in outs], list(torch.autograd.grad(outs, wanted, grad_outs))


def _neg_bit_params():
    # (each case's marks kept: the GPU cases' gpu mark is what puts them in gpu_check.sh's pytest -m gpu)
    return [pytest.param(*case.values, name, id=f"{name}-{case.values[0]}-{case.values[1]}", marks=case.marks)
            for name, (op, *_) in NEG_BIT_CASES.items()
            for case in cases(op)
            if case.values[1] != "reference"]  # (the oracle: plain torch ops, which read the bit)


@pytest.mark.parametrize("layout", ["imag", "neg_view"])
@pytest.mark.parametrize("device,backend,name", _neg_bit_params())
def test_negative_bit_views_are_read_as_their_values(device, backend, name, layout):
    _, _, make, grads = NEG_BIT_CASES[name]
    expected = _neg_bit_run("reference", name, layout, None, device)
    n_outs = len(expected[0]) if grads else 0
    for where in [*range(len(make())), *(("grad", i) for i in range(n_outs))]:
        outs, grad = _neg_bit_run(backend, name, layout, where, device)
        for i, (actual, wanted) in enumerate(zip(outs + grad, expected[0] + expected[1])):
            torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{where} given with the negative bit, result {i}: {m}")


def _meta_calls_on_every_op(backend=None):
    """Each op's calls on meta tensors with ``backend=backend``, forward and backward (no_grad
    for the KV cache), and their output shapes."""
    import fused_attn

    def meta(*shape, grad=True):
        return torch.empty(*shape, device="meta", requires_grad=grad)

    def backward(out, *inputs):
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        assert [t.grad.shape for t in inputs] == [t.shape for t in inputs] and all(t.grad.is_meta for t in inputs)
        for t in inputs:
            t.grad = None
        return out

    on = dict(backend=backend)
    q, k, v = meta(2, 4, 5, 8), meta(2, 2, 7, 8), meta(2, 2, 7, 6)
    mask = meta(2, 1, 5, 7)
    out = backward(F.attention(q, k, v, attn_mask=mask, causal=True, alignment="bottom_right", softcap=5.0, **on),
                   q, k, v, mask)
    assert out.shape == (2, 4, 5, 6)
    out, lse = backward(F.attention(q, k, v, window_size=(2, 1), alibi_slopes=torch.ones(2, 4, device="meta"),
                                    return_lse=True, dropout_p=0.1, **on), q, k, v)
    assert out.shape == (2, 4, 5, 6) and lse.shape == (2, 4, 5)
    assert backward(F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **on), q, k, v).shape == (2, 4, 5, 6)

    cu = torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")
    pq, pk, pv = meta(7, 4, 8), meta(7, 2, 8), meta(7, 2, 8)
    assert backward(F.attention_varlen(pq, pk, pv, cu, cu, 4, 4, causal=True, **on), pq, pk, pv).shape == (7, 4, 8)
    with torch.no_grad():
        pages, table = meta(3, 4, 2, 8), torch.zeros(2, 2, dtype=torch.int32, device="meta")
        assert F.attention_varlen(pq, pages, pages, cu, cu, block_table=table, **on).shape == (7, 4, 8)
        qd, cache, new, tables = meta(2, 1, 4, 8), meta(2, 16, 2, 8), meta(2, 1, 2, 8), meta(32, 4)
        lengths = torch.tensor([3, 4], dtype=torch.int32, device="meta")
        assert F.attention_with_kvcache(qd, cache, cache.clone(), new, new, cache_seqlens=lengths, rotary_cos=tables,
                                        rotary_sin=tables, causal=True, **on).shape == (2, 1, 4, 8)
        assert F.attention_with_kvcache(qd, pages, pages.clone(), new, new, cache_seqlens=lengths,
                                        block_table=table.clone(), **on).shape == (2, 1, 4, 8)

    x, res, w, b = meta(3, 8), meta(3, 8), meta(8), meta(8)
    for rms in (False, True):
        out, summed = F.layer_norm_residual(x, res, w, b, prenorm=True, rms=rms, dropout_p=0.1, **on)
        assert out.shape == summed.shape == (3, 8)
        backward(out, x, res, w, b)
    w1, b1, w2, b2 = meta(32, 8), meta(32), meta(8, 16), meta(8)
    assert backward(F.feed_forward(x, w1, b1, w2, b2, activation="swiglu", **on), x, w1, b1, w2, b2).shape == (3, 8)
    assert backward(F.feed_forward(x, w1, b1, meta(8, 32), b2, activation="gelu", **on), x, w1).shape == (3, 8)

    xr, cos = meta(2, 5, 2, 8), meta(16, 4, grad=False)
    assert backward(F.apply_rotary_emb(xr, cos, cos, **on), xr).shape == (2, 5, 2, 8)
    out = F.apply_rotary_emb(xr, cos, cos, interleaved=True, seqlen_offsets=3, **on)
    assert backward(out, xr).shape == (2, 5, 2, 8)
    assert backward(F.apply_rotary_emb(pq, cos, cos, cu_seqlens=cu, max_seqlen=4, **on), pq).shape == (7, 4, 8)

    model = fused_attn.Transformer(16, 2, 1, d_ff=32, rotary=True, causal=True, device="meta", **on)
    model(torch.empty(2, 5, 16, device="meta")).sum().backward()
    assert all(p.grad is not None and p.grad.is_meta for p in model.parameters())


@pytest.mark.parametrize("how", ["argument", "use_backend", "environment"])
@pytest.mark.parametrize("name", ["triton", "cuda", "cpu", "reference"])
def test_meta_tensors_run_under_any_forced_backend(name, how, monkeypatch):
    """A forced backend (backend=, use_backend, FUSED_ATTN_BACKEND) on meta tensors gives the
    shapes, as auto does: meta tensors hold no data for a kernel to read, so every request runs
    the shape-only reference math there. They raised BackendUnavailableError ("runs on cpu
    tensors, got meta"), which broke building and probing a model on meta under a selection."""
    import contextlib

    import fused_attn

    context = fused_attn.use_backend(name) if how == "use_backend" else contextlib.nullcontext()
    if how == "environment":
        monkeypatch.setenv("FUSED_ATTN_BACKEND", name)
    with context, warnings.catch_warnings():
        warnings.simplefilter("error")  # (no fallback warning either: nothing falls back)
        _meta_calls_on_every_op(name if how == "argument" else None)
