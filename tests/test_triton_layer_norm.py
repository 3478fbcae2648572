"""The Triton residual-add + LayerNorm/RMSNorm kernels against the float64 reference.

Without a GPU the kernels run under the Triton interpreter (tests/conftest.py turns it on), in
float32 and float16 (the interpreter cannot do bfloat16). Every numerical check goes through the
oracle (fused_attn.testing.check_against_reference): forward outputs k = 2, gradients of x,
residual, weight and bias k = 5. The interpreter's cost is per operation and per program, so the
big sizes appear in a few rows of the shape table rather than in a full cartesian product.
With a GPU the same tests run the compiled kernels on it (``DEV``; ``benchmarks/gpu_check.sh``).
"""
import pytest
import torch

import fused_attn
from fused_attn import reference as R
from fused_attn.testing import check_against_reference, make_inputs, reconstruct_dropout_mask
from fused_attn.triton import layer_norm as L
from test_robustness import nearly_constant_rows

F32, F16 = torch.float32, torch.float16
#: where the kernels run: the GPU when there is one (compiled), else the CPU (interpreter)
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _fused(prenorm=False, rms=False, residual_in_fp32=False, dropout_p=0.0, gen_seed=None):
    def fn(x, residual, weight, bias):
        gen = None if gen_seed is None else torch.Generator().manual_seed(gen_seed)
        return fused_attn.layer_norm_residual(x, residual, weight, bias, 1e-5, dropout_p=dropout_p, prenorm=prenorm,
                                              rms=rms, residual_in_fp32=residual_in_fp32, backend="triton",
                                              generator=gen)
    return fn


def _rng_of(gen_seed):
    """The (seed, offset) the functional API draws from torch.Generator().manual_seed(gen_seed)."""
    seed, offset = torch.randint(0, 2**62, (2,), dtype=torch.int64,
                                 generator=torch.Generator().manual_seed(gen_seed)).tolist()
    return seed, offset


def _reference(prenorm=False, rms=False, residual_in_fp32=False, dropout_p=0.0, gen_seed=None):
    rng = None if gen_seed is None else _rng_of(gen_seed)

    def fn(x, residual, weight, bias):
        if residual_in_fp32 and not rms:
            # F.layer_norm on CPU refuses a float32 input with half weights ("mixed dtype"):
            # hand it the same values in float32 (an exact conversion)
            weight = None if weight is None else weight.float()
            bias = None if bias is None else bias.float()
        return R.layer_norm_residual(x, residual, weight, bias, 1e-5, dropout_p, prenorm=prenorm, rms=rms,
                                     residual_in_fp32=residual_in_fp32, rng=rng)
    return fn


def _inputs(n, d, dtype, residual=True, weight=True, bias=True, residual_dtype=None, seed=0, device=DEV):
    x, r, w, b = make_inputs((n, d), (n, d), (d,), (d,), dtype=dtype, seed=seed, device=device)
    if residual_dtype is not None:
        r = r.detach().to(residual_dtype).requires_grad_()
    # weight/bias away from 1/0 so that their contributions are visible in every gradient
    w = (1.0 + 0.5 * w.detach()).requires_grad_()
    return [x, r if residual else None, w if weight else None, b if bias else None]


def _check(n, d, dtype, *, residual=True, weight=True, bias=True, residual_dtype=None, **opts):
    inputs = _inputs(n, d, dtype, residual, weight, bias, residual_dtype)
    return check_against_reference(_fused(**opts), _reference(**opts), inputs,
                                   names=["x", "residual", "weight", "bias"])


# ---- the shape table: hidden sizes 1, 7, 64, 1000, 4097 x rows 1, 3, 1025 ----------------------

SHAPES = [(n, d) for n in (1, 3) for d in (1, 7, 64, 1000, 4097)] + [(1025, d) for d in (1, 7, 64, 1000)]


@pytest.mark.parametrize("n,d", SHAPES)
def test_shapes_layer_norm_pre_ln_float32(n, d):
    _check(n, d, F32, prenorm=True)


@pytest.mark.parametrize("n,d", [(1, 4097), (3, 1000), (1025, 7), (1025, 64), (3, 1)])
def test_shapes_rms_norm_post_ln_float16(n, d):
    _check(n, d, F16, rms=True)


# ---- the feature table at one size: dtype x norm x pre/post-LN x affine ----------------------

AFFINE = [(True, True), (True, False), (False, True), (False, False)]


@pytest.mark.parametrize("weight,bias", AFFINE, ids=["w+b", "w", "b", "none"])
@pytest.mark.parametrize("prenorm", [False, True], ids=["post", "pre"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("dtype", [F32, F16], ids=["f32", "f16"])
def test_features(dtype, rms, prenorm, weight, bias):
    _check(37, 200, dtype, rms=rms, prenorm=prenorm, weight=weight, bias=bias)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("residual_dtype", [F32, F16], ids=["res32", "res16"])
def test_residual_in_fp32(residual_dtype, rms):
    results = _check(33, 96, F16, residual_dtype=residual_dtype, residual_in_fp32=True, prenorm=True, rms=rms)
    assert results  # the oracle compared out, summed and four gradients


def test_summed_is_float32_with_residual_in_fp32():
    x, r, w, b = _inputs(4, 24, F16, residual_dtype=F32)
    out, summed = _fused(prenorm=True, residual_in_fp32=True)(x, r, w, b)
    assert out.dtype == F16 and summed.dtype == F32
    assert torch.equal(summed, x.float() + r)


@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_without_residual(rms):
    _check(9, 130, F32, residual=False, rms=rms, prenorm=True)


def test_gradient_only_through_summed():
    # pre-LN where only the residual stream is used: dout arrives as None (zeros)
    x, r, w, b = _inputs(5, 40, F32)
    _, summed = _fused(prenorm=True)(x, r, w, b)
    summed.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(r.grad, torch.ones_like(r))
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


# ---- long rows: the chunked two-pass path -----------------------------------------------------

def test_hidden_65536_chunked():
    # above both register budgets: forward and backward take the chunked path as on the GPU
    assert not L.kernel_config(65536)["SINGLE"] and not L.kernel_config(65536, backward=True)["SINGLE"]
    _check(2, 65536, F16, prenorm=True)


@pytest.fixture
def small_chunks(monkeypatch):
    """Shrink the register budgets so that modest rows take the chunked path (fast under the
    interpreter) with a ragged last chunk."""
    monkeypatch.setattr(L, "_MAX_FWD_BLOCK", 256)
    monkeypatch.setattr(L, "_MAX_BWD_BLOCK", 256)
    monkeypatch.setattr(L, "_FWD_CHUNK", 256)
    monkeypatch.setattr(L, "_BWD_CHUNK", 128)
    yield from _fresh_launch_configs()


def _fresh_launch_configs():
    """Forget the launchers' memoised configurations for the test and after it (a generator for
    the fixtures to yield from): a hidden size launched earlier in the process (1000 by the shape
    table) kept the configuration of the unpatched budgets, and the "chunked" test of it ran the
    whole-row path."""
    L._launch_config.cache_clear()
    yield
    L._launch_config.cache_clear()


@pytest.mark.parametrize("rms,weight,bias,prenorm", [(False, True, True, True), (True, True, False, False),
                                                     (False, False, False, False), (True, False, True, True)])
def test_chunked_path(small_chunks, rms, weight, bias, prenorm):
    assert not L._launch_config(1000, False, L._tile_elems(torch.empty(0, device=DEV)))["SINGLE"]
    _check(6, 1000, F32, rms=rms, weight=weight, bias=bias, prenorm=prenorm)


def test_chunked_path_float16_dropout(small_chunks):
    _check(5, 700, F16, prenorm=True, dropout_p=0.2, gen_seed=3)


def test_chunked_statistics_of_offset_rows(small_chunks):
    # a large common offset makes a naive sum-of-squares variance cancel; the corrected two-pass does not
    x, r, w, b = _inputs(4, 1000, F32)
    with torch.no_grad():
        x.add_(1000.0)
    _check_inputs = [x, r, w, b]
    check_against_reference(_fused(), _reference(), _check_inputs, names=["x", "residual", "weight", "bias"])


@pytest.mark.parametrize("mean,std,d", [(1e4, 2e-3, 1000), (1e6, 0.1, 700), (-3e5, 0.05, 300)])
def test_chunked_nearly_constant_rows(small_chunks, mean, std, d):
    # Rows whose spread is a few float32 ulps of their mean, on the chunked paths forward and
    # backward (test_robustness.py has the whole-row ones): the float32 mean's rounding shifted
    # every xhat (1e4 +- 2e-3: out off by 0.05); the kernels now normalise with the pair (mean,
    # corr), the backward recomputing corr in its first pass. x + residual is the row exactly.
    assert not L._launch_config(d, False, L._tile_elems(torch.empty(0, device=DEV)))["SINGLE"]
    assert not L._launch_config(d, True, L._tile_elems(torch.empty(0, device=DEV)))["SINGLE"]
    x, residual = nearly_constant_rows(mean, std, 2, d, seed=d)
    _, _, w, b = _inputs(2, d, F32)
    inputs = [x.to(DEV).requires_grad_(), residual.to(DEV).requires_grad_(), w, b]
    check_against_reference(_fused(), _reference(), inputs, names=["x", "residual", "weight", "bias"])


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_chunked_path_overflowing_variance(small_chunks, rms):
    # the chunked statistics of a row whose variance overflows float32: LayerNorm gives NaN (rstd NaN), as
    # torch and the whole-row path do (rstd was 0: out = bias, dx = 0); RMSNorm keeps rstd 0
    # (out = bias), as torch's rms_norm does. (test_robustness.py covers the whole-row path.)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1000, generator=gen, dtype=torch.float64).float()
    x[1] *= 1e30
    w, b = torch.randn(1000, generator=gen).to(DEV), torch.randn(1000, generator=gen).to(DEV)
    x = x.to(DEV).requires_grad_()
    out = fused_attn.layer_norm_residual(x, None, w, b, rms=rms, backend="triton")
    (dx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    ref = R.layer_norm_residual(x.detach(), None, w, b, rms=rms)
    ok = torch.tensor([True, False, True], device=DEV)
    torch.testing.assert_close(out[ok], ref[ok])
    if rms:
        torch.testing.assert_close(out[1], b)
        assert torch.isfinite(dx).all()
    else:
        assert torch.isnan(out[1]).all() and torch.isnan(ref[1]).all() and torch.isnan(dx[1]).all()
        assert torch.isfinite(dx[ok]).all()


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_chunked_statistics_of_huge_rows(small_chunks, rms):
    # Rows whose variance (mean square) is representable while a plain float32 sum of their squares
    # overflows (+-1e18 over 1000 columns: 1e39, variance 1e36): the chunked sums are of scaled terms,
    # as the whole-row ones (test_robustness.py); they gave NaN (LayerNorm) or out = bias (RMSNorm)
    # and dx = 0. For LayerNorm also a mean of 1e21 (spread 3e18) and constant rows of 1e20, 1e36
    # and -3e38 (_origin; the backward's xhat outside the row).
    d = 1000
    gen = torch.Generator().manual_seed(1)
    alt = torch.full((d,), 1e18)
    alt[::2] = -1e18
    alt[0] = 2e18
    rows = [alt, torch.randn(d, generator=gen) * 1e18]
    if not rms:
        rows += [(1e21 + 3e18 * torch.randn(d, generator=gen, dtype=torch.float64)).float()]
        rows += [torch.full((d,), c) for c in (1e20, 1e36, -3e38)]
    x = torch.stack(rows + [torch.randn(d, generator=gen)]).to(DEV)
    w, b = (1 + 0.25 * torch.randn(d, generator=gen)).to(DEV), torch.randn(d, generator=gen).to(DEV)
    dout = torch.randn(x.shape, generator=gen).to(DEV)
    assert not L._launch_config(d, False, L._tile_elems(x))["SINGLE"]
    assert not L._launch_config(d, True, L._tile_elems(x))["SINGLE"]
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    out = fused_attn.layer_norm_residual(leaves[0], None, leaves[1], leaves[2], rms=rms, backend="triton")
    got = [out.detach()] + list(torch.autograd.grad(out, leaves, dout))
    # in float64, two-pass (torch's float64 layer_norm gives dx = 0 on a constant row of 1e25)
    x64, w64, b64 = [t.double().requires_grad_() for t in (x, w, b)]
    centred = x64 if rms else x64 - x64.mean(-1, keepdim=True)
    ref = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * w64 + b64
    want = [ref.detach()] + list(torch.autograd.grad(ref, (x64, w64, b64), dout.double()))
    for name, g, e in zip(("out", "dx", "dweight", "dbias"), got, want):
        assert torch.isfinite(g).all(), name
        for r, (g_row, e_row) in enumerate(zip(g.double().reshape(-1, d), e.reshape(-1, d))):
            err = (g_row - e_row).abs().max().item()
            assert err <= 1e-4 * e_row.abs().max().item() + 1e-30, f"{name} row {r}: err {err:.3g}"
    if not rms:
        assert torch.equal(got[0][3:6], b.expand(3, d))


# ---- the corrected two-pass statistics (_corrected_stats) ---------------------------------------

@pytest.fixture(params=["whole", "chunked"])
def stats_path(request, monkeypatch):
    """The whole-row path, or the chunked one (small chunks, a ragged last chunk: the hidden sizes
    used with it are not multiples of 64)."""
    if request.param == "chunked":
        monkeypatch.setattr(L, "_MAX_FWD_BLOCK", 4)
        monkeypatch.setattr(L, "_FWD_CHUNK", 64)
    for _ in _fresh_launch_configs():
        yield request.param


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
@pytest.mark.parametrize("d", [7, 100, 1000, 4097])
def test_constant_rows_give_exactly_the_bias(stats_path, d, eps):
    # A constant row c normalises to 0, so out is exactly the bias (torch, the reference and the
    # cpu kernel give it). The float32 mean sum(c) / d is not always c: the kernels used
    # (c - mean) / sqrt(eps) for xhat, up to 1e-4 and more; the corrected two-pass mean is c.
    assert L._launch_config(d, False, L._tile_elems(torch.empty(0, device=DEV)))["SINGLE"] == (stats_path == "whole")
    values = torch.tensor([1.7, -3.3, 0.1, 300.1, 1e-3])[:, None]
    x = values.expand(5, d).to(DEV)
    gen = torch.Generator().manual_seed(d)
    w, b = torch.randn(d, generator=gen).to(DEV), torch.randn(d, generator=gen).to(DEV)
    for weight, bias in ((None, None), (w, b)):
        out = fused_attn.layer_norm_residual(x, None, weight, bias, eps, backend="triton")
        expected = torch.zeros_like(x) if bias is None else bias.expand_as(x)
        assert torch.equal(out, expected), (out - expected).abs().max().item()
    # the same rows as x + residual: the sum is constant too
    out = fused_attn.layer_norm_residual(x - 0.5, torch.full_like(x, 0.5), w, b, eps, backend="triton")
    assert torch.equal(out, b.expand_as(x))


def test_constant_rows_at_the_real_chunk_size():
    # 16385 columns: above the whole-row budget, chunks of 8192 and a last chunk of one column
    assert not L.kernel_config(16385)["SINGLE"] and L.kernel_config(16385)["BLOCK_D"] == 8192
    x = torch.tensor([1.7, -3.3])[:, None].expand(2, 16385).to(DEV)
    b = torch.randn(16385, generator=torch.Generator().manual_seed(0)).to(DEV)
    out = fused_attn.layer_norm_residual(x, None, None, b, 1e-6, backend="triton")
    assert torch.equal(out, b.expand_as(x)), (out - b).abs().max().item()


@pytest.mark.parametrize("mean", [300.0, -3000.0])
@pytest.mark.parametrize("d", [1000, 4096])
def test_large_mean_rows(stats_path, mean, d):
    # A mean large against the spread (std 0.01): the float32 mean's rounding shifted every xhat
    # of the row (tests/test_cpu_layer_norm.py has the same cases for the cpu kernel). No residual:
    # the float32 x + residual would round each element by as much and hide the mean's error.
    assert L._launch_config(d, False, L._tile_elems(torch.empty(0, device=DEV)))["SINGLE"] == (stats_path == "whole")
    gen = torch.Generator().manual_seed(int(abs(mean)) + d)
    x = (torch.randn(4, d, generator=gen, dtype=torch.float64) * 0.01 + mean).float().to(DEV).requires_grad_()
    _, _, w, b = _inputs(4, d, F32)
    check_against_reference(_fused(), _reference(), [x, None, w, b], names=["x", "residual", "weight", "bias"])


def test_gpu_tile_sizes_under_the_interpreter(monkeypatch):
    # the interpreter normally uses bigger tiles; run the GPU's (rows of 1024: 4 per program
    # forward, 2 backward), which are what _tile_elems hands a CUDA launch
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():  # (a CUDA tensor's metadata without a GPU)
        on_gpu = torch.empty(0, device="cuda")
    assert L._tile_elems(on_gpu) is None and L._tile_elems(torch.empty(0)) == L._INTERPRETER_TILE_ELEMS
    monkeypatch.setattr(L, "_INTERPRETER_TILE_ELEMS", None)
    assert L.kernel_config(1000)["ROWS"] == 4 and L.kernel_config(1000, backward=True)["ROWS"] == 2
    _check(11, 1000, F16, prenorm=True)


# ---- layouts and edge cases -------------------------------------------------------------------

def test_strided_rows_and_leading_dims():
    base = make_inputs((2, 5, 3, 80), dtype=F32, seed=1, device=DEV)[0].detach()
    x = base[:, :, 1, 8:72].requires_grad_()  # (2, 5, 64) with row strides 240 / 1200, unit column stride
    assert not x.is_contiguous()
    r, w, b = make_inputs((2, 5, 64), (64,), (64,), dtype=F32, seed=2, device=DEV)
    check_against_reference(_fused(prenorm=True), _reference(prenorm=True), [x, r, w, b],
                            names=["x", "residual", "weight", "bias"])


def test_launcher_does_not_copy_row_strided_input(monkeypatch):
    seen = {}
    real = L._ln_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen["x_ptr"], seen["stride"] = args[0].data_ptr(), args[10]
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(L, "_ln_fwd_kernel", Spy())
    base = torch.randn(6, 100, device=DEV)
    x = base[:, 10:50]
    L.layer_norm_residual_fwd(x, None, None, None, 1e-5, 0.0, False, False, 0, 0)
    assert seen == {"x_ptr": x.data_ptr(), "stride": 100}


def test_zero_rows():
    x, r, w, b = make_inputs((0, 16), (0, 16), (16,), (16,), dtype=F32, device=DEV)
    out, summed = _fused(prenorm=True)(x, r, w, b)
    assert out.shape == (0, 16) and summed.shape == (0, 16)
    (out.sum() + summed.sum()).backward()
    assert x.grad.shape == (0, 16) and r.grad.shape == (0, 16)
    assert torch.equal(w.grad, torch.zeros(16, device=DEV)) and torch.equal(b.grad, torch.zeros(16, device=DEV))


def test_launcher_outputs_and_dtypes():
    x, r, w, b = [t.detach() for t in _inputs(5, 48, F16, residual_dtype=F32)]
    x0, r0 = x.clone(), r.clone()
    out, summed, mean, rstd = L.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, True, True, 0, 0)
    assert (out.dtype, summed.dtype, mean.shape, rstd.dtype, rstd.shape) == (F16, F32, (0,), F32, (5,))
    assert torch.equal(x, x0) and torch.equal(r, r0)  # inputs untouched
    dout = torch.randn(5, 48, device=DEV).half()
    dsum, dx, dw, db = L.layer_norm_residual_bwd(dout, None, summed, w, b, mean, rstd, 1e-5, 0.0, True, 0, 0, F16)
    assert dsum.dtype == F32 and dsum.shape == (5, 48)
    assert dx.numel() == 0  # no dropout: dsum serves as both dx and dresidual, never copied
    assert dw.dtype == F16 and db.dtype == F16 and dw.shape == (48,)
    _, dx2, dw2, db2 = L.layer_norm_residual_bwd(dout, None, summed, None, None, mean, rstd, 1e-5, 0.1, True, 5, 9,
                                                 F16)
    assert dx2.dtype == F16 and dx2.shape == (5, 48) and dw2.numel() == 0 and db2.numel() == 0
    # plain norm without dropout: summed must still be a fresh tensor, not x
    _, s_plain, mean_plain, _ = L.layer_norm_residual_fwd(x, None, None, None, 1e-5, 0.0, False, False, 0, 0)
    assert s_plain.data_ptr() != x.data_ptr() and torch.equal(s_plain, x) and mean_plain.shape == (5,)


def test_weight_gradient_is_deterministic():
    x, r, w, b = _inputs(1025, 64, F32)
    grads = []
    for _ in range(2):
        for t in (x, r, w, b):
            t.grad = None
        out = _fused()(x, r, w, b)
        out.backward(torch.ones_like(out) + x.detach())
        grads.append((w.grad.clone(), b.grad.clone(), x.grad.clone()))
    assert all(torch.equal(a, c) for a, c in zip(*grads))
    tile_elems = L._tile_elems(torch.empty(0, device=DEV))
    programs, _ = L._bwd_programs(1025, L.kernel_config(64, True, tile_elems)["ROWS"], 8, torch.device(DEV))
    assert programs > 1  # the partial sums really were reduced across several programs


def test_unsupported_reasons():
    from fused_attn.backends.base import Call
    call = Call("layer_norm_residual", torch.device("cpu"), F32, {"hidden": L.MAX_HIDDEN + 1})
    assert "hidden size" in " ".join(L.unsupported_reasons(call))
    assert L.unsupported_reasons(Call("layer_norm_residual", torch.device("cpu"), F32, {"hidden": 65536})) == []


def test_configs_cover_the_hidden_range():
    assert L.kernel_config(1)["BLOCK_D"] == 64 and L.kernel_config(4097)["BLOCK_D"] == 8192
    for backward in (False, True):
        for d in (1, 63, 64, 1000, 4096, 4097, 8192, 16384, 16385, 65536):
            cfg = L.kernel_config(d, backward)
            assert cfg["BLOCK_D"] >= d if cfg["SINGLE"] else cfg["BLOCK_D"] < d
            assert {k: v for k, v in cfg.items()} in [{k: v for k, v in c.items() if k != "backward"}
                                                       for c in L.possible_configs() if c["backward"] == backward]


@pytest.mark.parametrize("rms,dropout_p", [(False, 0.1), (True, 0.0)], ids=["ln-dropout", "rms"])
def test_ops_match_their_fake_implementations(rms, dropout_p):
    # torch.library.opcheck: schema, fake (meta) shapes/dtypes/strides vs the Triton launchers,
    # autograd registration and AOT dispatch, for both op halves
    x, w, b = (torch.randn(*shape, device=DEV).half() for shape in ((5, 48), (48,), (48,)))
    r = torch.randn(5, 48, device=DEV)
    rng = torch.tensor([123, 2**40 + 9]) if dropout_p else None
    args = (x, r, w, b, 1e-5, dropout_p, rms, True, rng, "triton")
    torch.library.opcheck(torch.ops.fused_attn.layer_norm_residual_fwd.default, args)
    _, summed, mean, rstd = torch.ops.fused_attn.layer_norm_residual_fwd(*args)
    for dsummed, weight, bias in ((torch.randn(5, 48, device=DEV), w, b), (None, None, None)):
        bargs = (torch.randn(5, 48, device=DEV).half(), dsummed, summed, weight, bias, mean, rstd, 1e-5, dropout_p, rms, rng,
                 F16, "triton")
        torch.library.opcheck(torch.ops.fused_attn.layer_norm_residual_bwd.default, bargs)


# ---- dropout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,rms", [(F32, False), (F16, True)], ids=["f32-ln", "f16-rms"])
def test_dropout_matches_reference(dtype, rms):
    # same (seed, offset) as the reference: outputs and all four gradients meet the oracle, which
    # needs the backward mask to be the forward mask (dx differs from dresidual exactly by it)
    _check(67, 130, dtype, rms=rms, prenorm=True, dropout_p=0.3, gen_seed=11)


def test_dropout_summed_is_bitwise_the_reference():
    x, r, w, b = [t.detach() for t in _inputs(31, 77, F16)]
    _, summed = _fused(prenorm=True, dropout_p=0.4, gen_seed=5)(x, r, w, b)
    _, ref_summed = _reference(prenorm=True, dropout_p=0.4, gen_seed=5)(x, r, w, b)
    assert torch.equal(summed, ref_summed)


def test_dropout_keep_fraction_and_mask():
    n, d, p = 1025, 64, 0.3
    x = torch.rand(n, d, device=DEV) + 0.5  # nonzero everywhere, so zeros in summed are exactly the dropped elements
    summed = _fused(prenorm=True, dropout_p=p, gen_seed=2)(x, None, None, None)[1]
    kept = summed != 0
    frac = kept.float().mean().item()
    sigma = (p * (1 - p) / (n * d)) ** 0.5
    assert abs(frac - (1 - p)) < 5 * sigma
    seed, offset = _rng_of(2)
    assert torch.equal(kept.cpu(), reconstruct_dropout_mask(seed, offset, p, n, d))
    assert torch.allclose(summed[kept], x[kept] / (1 - p))


def test_dropout_reproducible_and_backward_mask():
    x, r, w, b = _inputs(40, 96, F32)
    runs = []
    for gen_seed in (9, 9, 10):
        for t in (x, r, w, b):
            t.grad = None
        out, summed = _fused(prenorm=True, dropout_p=0.5, gen_seed=gen_seed)(x, r, w, b)
        (out.square().sum() + summed.sum()).backward()
        runs.append((out.detach(), summed.detach(), x.grad.clone(), r.grad.clone(), w.grad.clone()))
    assert all(torch.equal(a, c) for a, c in zip(runs[0], runs[1]))  # same (seed, offset): bitwise equal
    assert not torch.equal(runs[0][1], runs[2][1])  # another seed: another mask
    # backward mask = forward mask: dx = dresidual * keep / (1 - p), with keep read off the forward
    seed, offset = _rng_of(9)
    keep = reconstruct_dropout_mask(seed, offset, 0.5, 40, 96)
    keep = keep.to(DEV)
    assert torch.equal(runs[0][2] == 0, ~keep)
    assert torch.allclose(runs[0][2], runs[0][3] * keep / 0.5)


def test_dropout_offsets_rows_from_offset():
    # the launcher's (seed, offset) map row n to logical row offset + n: rows 1.. of a call with
    # offset 0 equal rows 0.. of a call with offset 1
    x = torch.rand(6, 50, device=DEV) + 0.5
    s0 = L.layer_norm_residual_fwd(x, None, None, None, 1e-5, 0.5, True, False, 123, 0)[1]
    s1 = L.layer_norm_residual_fwd(x[1:], None, None, None, 1e-5, 0.5, True, False, 123, 1)[1]
    assert torch.equal(s0[1:] != 0, s1 != 0)


@pytest.mark.parametrize("seed,offset", [(0, 0), (2**40 + 5, 2**32 - 3), (2**62 - 1, 2**62 - 7), (7, 2**31 - 2)])
def test_dropout_mask_is_the_shared_hash(seed, offset):
    # includes offsets whose rows carry across the 32-bit boundary and seeds with high bits set
    x = torch.rand(6, 40, device=DEV) + 0.5
    summed = L.layer_norm_residual_fwd(x, None, None, None, 1e-5, 0.25, False, False, seed, offset)[1]
    assert torch.equal((summed != 0).cpu(), reconstruct_dropout_mask(seed, offset, 0.25, 6, 40))


# ---- on a GPU (skipped without CUDA): compiled kernels, bfloat16, the big sizes --------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, F16, F32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("n,d", [(4096, 1024), (1000, 4097), (64, 16384), (8, 65536), (3, 1), (2050, 8192)])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_gpu_oracle(n, d, dtype, rms):
    inputs = [t if t is None else t.detach().cuda().requires_grad_() for t in _inputs(n, d, dtype)]
    check_against_reference(_fused(prenorm=True, rms=rms), _reference(prenorm=True, rms=rms), inputs,
                            names=["x", "residual", "weight", "bias"])


@pytest.mark.gpu
@pytest.mark.parametrize("d", [768, 65536])
def test_gpu_dropout_and_residual_in_fp32(d):
    x, r, w, b = [t.detach().cuda() for t in _inputs(64, d, torch.bfloat16, residual_dtype=F32)]
    inputs = [t.requires_grad_() for t in (x, r, w, b)]
    opts = dict(prenorm=True, residual_in_fp32=True, dropout_p=0.1, gen_seed=4)
    check_against_reference(_fused(**opts), _reference(**opts), inputs, names=["x", "residual", "weight", "bias"])
    seed, offset = _rng_of(4)
    summed = _fused(**opts)(x.detach(), None, None, None)[1]
    assert torch.equal((summed != 0).cpu(), reconstruct_dropout_mask(seed, offset, 0.1, 64, d) & (x != 0).cpu())


@pytest.mark.gpu
def test_gpu_weight_gradient_is_deterministic():
    x, r, w, b = [t.detach().cuda().requires_grad_() for t in _inputs(8192, 2048, torch.bfloat16)]
    grads = []
    for _ in range(3):
        for t in (x, r, w, b):
            t.grad = None
        out = _fused()(x, r, w, b)
        out.backward(torch.ones_like(out))
        grads.append((w.grad.clone(), b.grad.clone()))
    assert all(torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1]) for g in grads)


@pytest.mark.parametrize("d", [40, 20000])  # whole rows (the sum's store skipped) and chunked rows
def test_store_summed_false_gives_the_same_output_and_no_sum(d):
    x, r, w, b = make_inputs((3, d), (3, d), (d,), (d,), dtype=F32, seed=5, device=DEV)
    kept = L.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, True, 0, 0)
    skipped = L.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, True, 0, 0, store_summed=False)
    assert torch.equal(kept[0], skipped[0]) and torch.equal(kept[2], skipped[2]) and torch.equal(kept[3], skipped[3])
    assert kept[1].shape == (3, d) and skipped[1].numel() == 0 and skipped[1].dtype == torch.float32
