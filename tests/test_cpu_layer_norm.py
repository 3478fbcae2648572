"""The C++ CPU residual-add + LayerNorm / RMSNorm kernels against the float64 reference."""
import pytest
import torch

import fused_attn
from fused_attn import _extension
from fused_attn import reference as R
from fused_attn.testing import check_against_reference, make_inputs, runnable_backends

_REASON = fused_attn.extension_error() or (
    None if _extension.has_kernel("layer_norm_residual_fwd", "CPU") else "fused_attn._C has no CPU layer_norm kernel")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"C++ CPU backend unavailable: {_REASON}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _fused(rms, prenorm, dropout_p=0.0, residual_in_fp32=False, seed=None, eps=1e-5):
    def fn(x, residual, weight, bias):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return fused_attn.layer_norm_residual(x, residual, weight, bias, eps, dropout_p=dropout_p, prenorm=prenorm,
                                              rms=rms, residual_in_fp32=residual_in_fp32, backend="cpu",
                                              generator=gen)
    return fn


def _reference(rms, prenorm, dropout_p=0.0, residual_in_fp32=False, seed=None, eps=1e-5):
    rng = None
    if seed is not None:  # the (seed, offset) the functional API draws from a generator seeded alike
        rng = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(seed)).tolist())

    def fn(x, residual, weight, bias):
        # (In the float64 oracle run the sum stays float64: residual_in_fp32 keeps float64 x's sum in float64.)
        fp32 = residual_in_fp32
        if fp32 and x.dtype not in (torch.float32, torch.float64):
            # reference.layer_norm_residual hands a float32 sum with half-precision weights to
            # F.layer_norm, which refuses mixed dtypes; the kernels compute this affine in float32.
            weight = None if weight is None else weight.float()
            bias = None if bias is None else bias.float()
        return R.layer_norm_residual(x, residual, weight, bias, eps, dropout_p=dropout_p, prenorm=prenorm, rms=rms,
                                     residual_in_fp32=fp32, rng=rng)
    return fn


def _inputs(n, d, dtype, residual=True, weight=True, bias=True, seed=0):
    x, r, w, b = make_inputs((n, d), (n, d), (d,), (d,), dtype=dtype, seed=seed)
    with torch.no_grad():  # weights around 1, biases small: a realistic affine
        w.mul_(0.25).add_(1.0)
        b.mul_(0.1)
    return [x, r if residual else None, w if weight else None, b if bias else None]


# Every (rows, hidden) pair of {1, 3, 1025} x {1, 7, 64, 1000, 4097}; the largest only as LayerNorm
# (RMSNorm shares the code path, and the float64 oracle run of 4M elements is the slow part).
SHAPES = [(n, d) for n in (1, 3, 1025) for d in (1, 7, 64, 1000, 4097)]


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_shapes_float32(n, d, rms):
    if rms and (n, d) == (1025, 4097):
        pytest.skip("covered by the LayerNorm case of this shape and by the smaller RMSNorm shapes")
    check_against_reference(_fused(rms, True), _reference(rms, True), _inputs(n, d, torch.float32),
                            names=["x", "residual", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("n,d", [(1, 1), (3, 7), (1025, 64), (3, 1000), (1, 4097), (97, 4097)])
def test_shapes_half(n, d, rms, dtype):
    check_against_reference(_fused(rms, True), _reference(rms, True), _inputs(n, d, dtype),
                            names=["x", "residual", "weight", "bias"])


# The float32 row statistics at large hidden sizes: summed in one float32 accumulator per vector
# lane over the whole row, their error grew with d (RMSNorm at d = 2^20: err 4.9e-5 against the
# oracle's bound 1.1e-5; torch's float32 layer_norm 3.4e-7). Forward and backward (sum(g) and
# sum(g * xhat) had the same single accumulators).
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_long_rows_float32(rms):
    check_against_reference(_fused(rms, True), _reference(rms, True), _inputs(2, 1 << 20, torch.float32),
                            names=["x", "residual", "weight", "bias"])


# Rows whose mean is large against their spread: the float32 mean's rounding error shifted the
# whole row of xhat (mean 300, std 0.01: err 1.1e-2 against the oracle's bound 4.7e-3). No
# residual: the float32 sum x + residual would round each element by as much, for the kernel and
# the float32 reference alike, and hide the mean's error.
@pytest.mark.parametrize("mean", [30.0, 300.0, -3000.0])
@pytest.mark.parametrize("d", [4096, 1000])
def test_large_mean_rows_float32(mean, d):
    gen = torch.Generator().manual_seed(int(abs(mean)) + d)
    x = (torch.randn(4, d, generator=gen, dtype=torch.float64) * 0.01 + mean).float().requires_grad_()
    _, _, w, b = _inputs(4, d, torch.float32)
    check_against_reference(_fused(False, False), _reference(False, False), [x, None, w, b],
                            names=["x", "residual", "weight", "bias"])


# float64 rows whose spread is ~1e-12 of their mean. The float64 backward could not use the saved
# float32 statistics and recomputed them from the row without the forward's correction of the
# variance (its sum(s - mean) term): rstd was off by ~(mean's rounding / std)^2, and dx, dresidual
# and dweight only 3e-11 (1e8 +- 1e-4, d = 64) to 2e-6 (1e12 +- 1, d = 1024) relative accurate.
# The statistics are saved in float64 for float64 inputs now, and the backward reads the
# forward's: all within ~3e-16 of the float64 reference (which shifts such rows by their mean).
@pytest.mark.parametrize("mean,std", [(1e8, 1e-4), (1e12, 1.0), (-3e9, 1e-3)])
@pytest.mark.parametrize("d", [64, 97, 1024])
def test_nearly_constant_rows_float64(mean, std, d):
    gen = torch.Generator().manual_seed(d)
    s = mean + std * torch.randn(3, d, generator=gen, dtype=torch.float64)
    residual = s.round()
    x = s - residual  # exact, and x + residual == s exactly: the sum rounds nothing
    assert torch.equal(x + residual, s)
    w = 1 + 0.25 * torch.randn(d, generator=gen, dtype=torch.float64)
    b = 0.1 * torch.randn(d, generator=gen, dtype=torch.float64)
    dout = torch.randn(3, d, generator=gen, dtype=torch.float64)

    def run(fn):
        inputs = [t.clone().requires_grad_() for t in (x, residual, w, b)]
        out = fn(*inputs)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in inputs]

    got = run(_fused(False, False))
    want = run(_reference(False, False))
    for name, g, t in zip(["out", "dx", "dresidual", "dweight", "dbias"], got, want):
        # (measured: at most 3.3e-16 of the largest element; the old backward's 3e-11 fails)
        torch.testing.assert_close(g, t, rtol=0, atol=1e-12 * t.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
def test_statistics_dtype(dtype, rms):
    """The saved mean and rstd are float32, float64 for float64 inputs (as torch's
    native_layer_norm's), on the cpu and reference backends and in the ops' fake implementation;
    the cpu backward refuses statistics of another dtype."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, r, w, b = [t.detach() for t in _inputs(4, 16, dtype)]
    want = torch.float64 if dtype == torch.float64 else torch.float32
    args = (x, r, w, b, 1e-5, 0.0, rms, False, None)
    for backend in ("cpu", "reference"):
        _, summed, mean, rstd = torch.ops.fused_attn.layer_norm_residual_fwd(*args, backend)
        assert (mean.dtype, rstd.dtype, mean.shape, rstd.shape) == (want, want, (0 if rms else 4,), (4,)), backend
    with FakeTensorMode() as mode:
        _, _, fake_mean, fake_rstd = torch.ops.fused_attn.layer_norm_residual_fwd(
            *[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args], "cpu")
    assert (fake_mean.dtype, fake_rstd.dtype) == (want, want)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    with pytest.raises(RuntimeError, match="rstd must be a " + ("Double" if dtype == torch.float64 else "Float")):
        torch.ops.fused_attn_C.layer_norm_residual_bwd(x, None, summed, w, b, mean, rstd.to(other), 1e-5, 0.0, rms, 0,
                                                        0, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["plain", "prenorm"])
@pytest.mark.parametrize("residual,weight,bias", [(r, w, b) for r in (0, 1) for w in (0, 1) for b in (0, 1)])
def test_optional_inputs(residual, weight, bias, prenorm, rms, dtype):
    inputs = _inputs(17, 100, dtype, residual=residual, weight=weight, bias=bias)
    check_against_reference(_fused(rms, prenorm), _reference(rms, prenorm), inputs,
                            names=["x", "residual", "weight", "bias"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("residual_dtype", ["fp32", "same"])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_residual_in_fp32(dtype, residual_dtype, rms):
    x, r, w, b = _inputs(33, 130, dtype)
    if residual_dtype == "fp32":
        r = r.detach().float().requires_grad_()
    out, summed = _fused(rms, True, residual_in_fp32=True)(x, r, w, b)
    assert out.dtype == dtype and summed.dtype == torch.float32
    check_against_reference(_fused(rms, True, residual_in_fp32=True), _reference(rms, True, residual_in_fp32=True),
                            [x, r, w, b], names=["x", "residual", "weight", "bias"])
    # The gradients come back in each input's own dtype.
    out, summed = _fused(rms, True, residual_in_fp32=True)(x, r, w, b)
    (out.float().sum() + summed.sum()).backward()
    assert x.grad.dtype == dtype and r.grad.dtype == r.dtype


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("residual_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_residual_in_fp32_keeps_float64_sums(backend, residual_dtype, dropout_p):
    """residual_in_fp32 with float64 x keeps the sum in float64 (the wider of float32 and x's
    dtype): it was rounded to float32 (float64 gradcheck failed), and the reference rounded x and
    the residual to float32 before adding where the cpu kernel added in float64 and rounded once
    (3e-7 apart). Now both add in float64: the same sums bit for bit, and float64 gradcheck."""
    x, r, w, b = _inputs(5, 12, torch.float64)
    r = r.detach().to(residual_dtype).requires_grad_()

    def fn(backend):
        return lambda x, r, w, b: fused_attn.layer_norm_residual(
            x, r, w, b, prenorm=True, residual_in_fp32=True, dropout_p=dropout_p, backend=backend,
            generator=torch.Generator().manual_seed(3))

    out, summed = fn(backend)(x, r, w, b)
    assert out.dtype == torch.float64 and summed.dtype == torch.float64
    ref_out, ref_summed = fn("reference")(x, r, w, b)
    assert torch.equal(summed, ref_summed)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-12)
    (out.sum() + summed.sum()).backward()
    assert r.grad.dtype == residual_dtype
    if residual_dtype == torch.float64:
        assert torch.autograd.gradcheck(fn(backend), (x, r, w, b))


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["sum-in-dtype", "sum-in-fp32"])
@pytest.mark.parametrize("dtype,big", [(torch.bfloat16, 256.0), (torch.float16, 2048.0)], ids=["bf16", "fp16"])
def test_statistics_read_the_sum_rounded_to_its_dtype(dtype, big, residual_in_fp32, backend):
    """The summed stream is rounded to its dtype (x's, or float32 under residual_in_fp32) before
    the mean and variance are taken: the statistics see exactly the stored sum that the next
    layer and the backward read. big +- 0.5 rounds to big in bfloat16 (256) and float16 (2048),
    so every row is constant and the output is exactly the bias; statistics of the unrounded
    sums would give +-weight + bias. In float32 the sums stay big +- 0.5: xhat = +-1."""
    if backend not in runnable_backends("layer_norm_residual", dtype=dtype):
        pytest.skip(f"{backend} takes no {dtype} layer_norm_residual here")
    n, d = 3, 64  # whole vectors of every lane width: the kernels' vector loop, not their scalar tail
    x = torch.full((n, d), big, dtype=dtype)
    r = (torch.arange(d) % 2 - 0.5).repeat(n, 1).to(dtype)
    w, b = torch.linspace(0.5, 2, d).to(dtype), torch.linspace(-1, 1, d).to(dtype)
    out, summed = fused_attn.layer_norm_residual(x, r, w, b, prenorm=True, residual_in_fp32=residual_in_fp32,
                                                 backend=backend)
    if not residual_in_fp32:
        assert summed.dtype == dtype and torch.equal(summed, x)
        assert torch.equal(out, b.expand(n, d))
    else:
        assert summed.dtype == torch.float32 and torch.equal(summed, x.float() + r.float())
        xhat = r.double() / (0.25 + 1e-5) ** 0.5
        torch.testing.assert_close(out.double(), xhat * w.double() + b.double(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["sum-in-dtype", "sum-in-fp32"])
def test_dropout_matches_reference(dtype, rms, residual_in_fp32):
    p, seed = 0.3, 1234
    inputs = _inputs(37, 257, dtype)
    check_against_reference(_fused(rms, True, p, residual_in_fp32, seed), _reference(rms, True, p, residual_in_fp32, seed),
                            inputs, names=["x", "residual", "weight", "bias"])


def test_dropout_mask_is_exact():
    """The dropped positions are exactly the reference's (the counter hash is bit-exact), and in
    float32 the sum itself is bit-exact too (same operations in the same order)."""
    x, r, w, b = [t.detach() if t is not None else None for t in _inputs(64, 300, torch.float32)]
    rng = torch.tensor([987654321, 4242], dtype=torch.int64)
    args = (x, r, w, b, 1e-5, 0.5, False, False, rng)
    out_c, sum_c, mean_c, rstd_c = torch.ops.fused_attn.layer_norm_residual_fwd(*args, "cpu")
    out_r, sum_r, mean_r, rstd_r = torch.ops.fused_attn.layer_norm_residual_fwd(*args, "reference")
    assert torch.equal(sum_c, sum_r)
    dropped = sum_c == r
    assert 0.4 < dropped.float().mean() < 0.6
    torch.testing.assert_close(out_c, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean_c, mean_r)
    torch.testing.assert_close(rstd_c, rstd_r)
    # Backward: dx is dsum with the same mask, scaled by 1/(1-p).
    dout = torch.randn_like(x)
    bargs = (dout, None, sum_c, w, b, mean_c, rstd_c, 1e-5, 0.5, False, rng, torch.float32)
    dsum, dx, dw, db = torch.ops.fused_attn.layer_norm_residual_bwd(*bargs, "cpu")
    keep = ~dropped
    assert torch.equal(dx[~keep], torch.zeros_like(dx[~keep]))
    torch.testing.assert_close(dx[keep], dsum[keep] * 2.0)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("residual_in_fp32", [False, True], ids=["sum-in-dtype", "sum-in-fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dropout_rounds_as_the_reference_in_half_precision(dtype, residual_in_fp32, backend):
    """With a 16-bit x, dropout(x) is a tensor of x's dtype (the reference, the CUDA kernel):
    x * keep/(1-p) is rounded to x's dtype before the residual is added, so summed is the
    reference's bit for bit, as in float32 (test_dropout_mask_is_exact). The cpu kernel kept the
    product in float32: about a fifth of the sums differed in their last bit. Backward, dx is
    dropout(dsum in x's dtype): dsum rounded to x's dtype, then scaled and rounded again, which
    differs from one rounding of dsum * keep/(1-p) where dsum is float32 (residual_in_fp32): the
    cpu kernel rounded once. 75 columns: the kernels' vector loops and a scalar tail."""
    if backend not in runnable_backends("layer_norm_residual", dtype=dtype):
        pytest.skip(f"{backend} takes no {dtype} layer_norm_residual here")
    n, d, p, eps = 5, 75, 0.3, 1e-5
    x, r, w, b = [t.detach() for t in _inputs(n, d, dtype, seed=4)]
    rng = torch.tensor([987654321, 4242], dtype=torch.int64)
    args = (x, r, w, b, eps, p, False, residual_in_fp32, rng)
    out, summed, mean, rstd = torch.ops.fused_attn.layer_norm_residual_fwd(*args, backend)
    out_r, summed_r, mean_r, rstd_r = torch.ops.fused_attn.layer_norm_residual_fwd(*args, "reference")
    assert summed.dtype == summed_r.dtype == (torch.float32 if residual_in_fp32 else dtype)
    assert torch.equal(summed, summed_r), f"{int((summed != summed_r).sum())} of {summed.numel()} sums differ"
    torch.testing.assert_close(out, out_r)
    # Backward from the same saved tensors: dsum (dresidual) to the reference's accuracy, and
    # dx exactly the reference's dropout of this dsum.
    dout = make_inputs((n, d), dtype=dtype, seed=5)[0].detach()
    bargs = (dout, None, summed_r, w, b, mean_r, rstd_r, eps, p, False, rng, dtype)
    dsum, dx, _, _ = torch.ops.fused_attn.layer_norm_residual_bwd(*bargs, backend)
    dsum_r, dx_r, _, _ = torch.ops.fused_attn.layer_norm_residual_bwd(*bargs, "reference")
    torch.testing.assert_close(dsum, dsum_r)
    expected = fused_attn._rng.apply_dropout(dsum.to(dtype), p, *rng.tolist())
    assert dx.dtype == dtype and torch.equal(dx, expected), f"{int((dx != expected).sum())} of {dx.numel()} differ"
    torch.testing.assert_close(dx, dx_r)


def test_no_dropout_dx_is_empty_and_grads_shared():
    x, r, w, b = [t.detach() for t in _inputs(5, 16, torch.float32)]
    out, summed, mean, rstd = torch.ops.fused_attn_C.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, False, 0, 0)
    dsum, dx, dw, db = torch.ops.fused_attn_C.layer_norm_residual_bwd(torch.ones_like(x), None, summed, w, b, mean,
                                                                       rstd, 1e-5, 0.0, False, 0, 0, torch.float32)
    assert dx.numel() == 0 and dsum.shape == x.shape and dw.shape == (16,) and db.shape == (16,)
    _, _, dw2, db2 = torch.ops.fused_attn_C.layer_norm_residual_bwd(torch.ones_like(x), None, summed, None, None,
                                                                     mean, rstd, 1e-5, 0.0, False, 0, 0, torch.float32)
    assert dw2.numel() == 0 and db2.numel() == 0


def test_strided_rows_and_3d_input():
    base = make_inputs((2, 9, 160), dtype=torch.float32)[0]
    x = base.detach()[..., 16:80].requires_grad_()  # row stride 160, unit stride along d
    assert not x.is_contiguous()
    r, w, b = make_inputs((2, 9, 64), (64,), (64,), seed=3)
    check_against_reference(_fused(False, True), _reference(False, True), [x, r, w, b],
                            names=["x", "residual", "weight", "bias"])


def test_inputs_not_modified_and_outputs_do_not_alias():
    x, r, w, b = [t.detach() for t in _inputs(8, 32, torch.bfloat16)]
    copies = [t.clone() for t in (x, r, w, b)]
    out, summed = fused_attn.layer_norm_residual(x, r, w, b, prenorm=True, backend="cpu")
    for t, c in zip((x, r, w, b), copies):
        assert torch.equal(t, c)
    # No residual, no dropout: the sum equals x but is its own tensor.
    out, summed = fused_attn.layer_norm_residual(x, None, w, b, prenorm=True, backend="cpu")
    assert torch.equal(summed, x) and summed.data_ptr() != x.data_ptr()


def test_weight_grads_are_deterministic_across_thread_counts():
    x, r, w, b = _inputs(1025, 300, torch.float32)
    grads = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for t in (w, b):
                t.grad = None
            out = fused_attn.layer_norm_residual(x, r, w, b, backend="cpu")
            out.backward(torch.ones_like(out) * torch.linspace(-1, 1, 300))
            grads.append((w.grad.clone(), b.grad.clone()))
    finally:
        torch.set_num_threads(old)
    for gw, gb in grads[1:]:
        assert torch.equal(gw, grads[0][0]) and torch.equal(gb, grads[0][1])


def test_empty_rows():
    x, r, w, b = [t.detach() for t in _inputs(0, 16, torch.float32)]
    out, summed = fused_attn.layer_norm_residual(x, r, w, b, prenorm=True, backend="cpu")
    assert out.shape == (0, 16) and summed.shape == (0, 16)
    o, s, m, rs = torch.ops.fused_attn_C.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, False, 0, 0)
    ds, dx, dw, db = torch.ops.fused_attn_C.layer_norm_residual_bwd(o, None, s, w, b, m, rs, 1e-5, 0.0, False, 0, 0,
                                                                     torch.float32)
    assert ds.shape == (0, 16) and torch.equal(dw, torch.zeros(16)) and torch.equal(db, torch.zeros(16))


def _bad_fwd_calls():
    """(what, call, the message it must raise: the argument and what was expected)."""
    x = torch.randn(4, 8)
    w = torch.ones(8)
    f = torch.ops.fused_attn_C.layer_norm_residual_fwd
    yield "1-D x", lambda: f(torch.randn(8), None, None, None, 1e-5, 0.0, False, False, 0, 0), \
        r"x must be 2-D \(N, d\), got shape \[8\]"
    yield "int x", lambda: f(torch.ones(4, 8, dtype=torch.int32), None, None, None, 1e-5, 0.0, False, False, 0, 0), \
        "x must be float32, float64, bfloat16 or float16, got Int"
    yield "residual shape", lambda: f(x, torch.randn(4, 9), None, None, 1e-5, 0.0, False, False, 0, 0), \
        r"residual must have shape \(4, 8\), got \[4, 9\]"
    x64 = torch.randn(4, 8, dtype=torch.float64)
    yield "residual dtype", lambda: f(x, x64, None, None, 1e-5, 0.0, False, False, 0, 0), \
        "residual must have x's dtype Float .*, got Double"
    yield "weight shape", lambda: f(x, None, torch.ones(7), None, 1e-5, 0.0, False, False, 0, 0), \
        r"weight must have shape \(8\), got \[7\]"
    yield "weight dtype", lambda: f(x, None, w.double(), None, 1e-5, 0.0, False, False, 0, 0), \
        "weight must have dtype Float, got Double"
    yield "bias shape", lambda: f(x, None, w, torch.ones(2, 4), 1e-5, 0.0, False, False, 0, 0), \
        r"bias must have shape \(8\), got \[2, 4\]"
    yield "column stride", lambda: f(torch.randn(8, 4).t(), None, None, None, 1e-5, 0.0, False, False, 0, 0), \
        r"x must have unit stride along its last dimension, got strides \[1, 4\]"
    yield "dropout_p", lambda: f(x, None, None, None, 1e-5, 1.0, False, False, 0, 0), \
        r"dropout_p must be in \[0, 1\), got 1"
    yield "negative eps", lambda: f(x, None, None, None, -1.0, 0.0, False, False, 0, 0), \
        "eps must be non-negative, got -1"
    yield "meta device", lambda: f(x.to("meta"), None, None, None, 1e-5, 0.0, False, False, 0, 0), \
        "layer_norm_residual_fwd: attempted to run this operator with Meta tensors"


@pytest.mark.parametrize("what,call,match", list(_bad_fwd_calls()), ids=[w for w, _, _ in _bad_fwd_calls()])
def test_bad_forward_input_raises(what, call, match):
    with pytest.raises((RuntimeError, NotImplementedError), match=match):
        call()


def test_bad_backward_input_raises():
    x = torch.randn(4, 8)
    out, s, m, rs = torch.ops.fused_attn_C.layer_norm_residual_fwd(x, None, None, None, 1e-5, 0.0, False, False, 0, 0)
    b = torch.ops.fused_attn_C.layer_norm_residual_bwd
    bad = [
        (lambda: b(torch.randn(4, 9), None, s, None, None, m, rs, 1e-5, 0.0, False, 0, 0, torch.float32),
         r"dout must have shape \(4, 8\), got \[4, 9\]"),
        (lambda: b(out.double(), None, s, None, None, m, rs, 1e-5, 0.0, False, 0, 0, torch.float32),
         "dout must have dtype Float, got Double"),
        (lambda: b(out, None, s, None, None, m[:2], rs, 1e-5, 0.0, False, 0, 0, torch.float32),
         r"mean must be a Float CPU tensor of shape \(4\) .*, got Float \[2\]"),
        (lambda: b(out, None, s, None, None, m, rs.double(), 1e-5, 0.0, False, 0, 0, torch.float32),
         r"rstd must be a Float CPU tensor of shape \(4\), got Double \[4\]"),
        (lambda: b(out, None, s, None, None, m, rs, 1e-5, 0.0, True, 0, 0, torch.float32),  # rms wants empty mean
         r"mean must be a Float CPU tensor of shape \(0\) \(empty for rms\), got Float \[4\]"),
        (lambda: b(out, s.double(), s, None, None, m, rs, 1e-5, 0.0, False, 0, 0, torch.float32),
         "dsummed must have summed's dtype Float, got Double"),
        (lambda: b(out, None, s, torch.ones(3), None, m, rs, 1e-5, 0.0, False, 0, 0, torch.float32),
         r"weight must have shape \(8\), got \[3\]"),
        (lambda: b(out, None, s, None, None, m, rs, 1e-5, 0.0, False, 0, 0, torch.int32),
         "x_dtype must be float32, float64, bfloat16 or float16, got Int"),
    ]
    for call, match in bad:
        with pytest.raises(RuntimeError, match=match):
            call()
