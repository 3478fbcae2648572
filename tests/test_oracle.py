"""The oracle helper itself: it passes the reference and catches planted errors."""
import pytest
import torch

from fused_attn import reference as R
from fused_attn.testing import check_against_reference, compare, make_inputs


def _attention_with_k_grad(change):
    """The reference attention, except that the gradient reaching k is ``change(grad)``: a
    planted error of a chosen size."""
    class Tamper(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return change(g)

    return lambda q, k, v: R.attention(q, Tamper.apply(k), v)


def test_reference_passes_its_own_oracle():
    q, k, v = make_inputs((2, 3, 17, 8), (2, 3, 17, 8), (2, 3, 17, 8), dtype=torch.float16)
    check_against_reference(R.attention, R.attention, [q, k, v], names="qkv")


def test_planted_output_error_is_caught():
    q, k, v = make_inputs((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8), dtype=torch.float32)

    def wrong(q, k, v):
        out = R.attention(q, k, v)
        return out + 1e-3 * (out.detach().abs() > 0.5)

    with pytest.raises(AssertionError, match="output0"):
        check_against_reference(wrong, R.attention, [q, k, v])


def test_planted_gradient_error_is_caught():
    q, k, v = make_inputs((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8), dtype=torch.float32)

    with pytest.raises(AssertionError, match="grad of k"):
        check_against_reference(_attention_with_k_grad(lambda g: g * 1.01), R.attention, [q, k, v], names="qkv")


def test_nan_where_reference_is_finite_is_caught():
    ref = torch.ones(4, dtype=torch.float64)
    bad = torch.tensor([1.0, float("nan"), 1.0, 1.0])
    with pytest.raises(AssertionError, match="NaN"):
        compare("x", bad, ref, ref.float())


def test_an_overflowed_low_precision_reference_is_named():
    """A float16 reference that overflowed (inf where the float64 one is finite) has no error to
    scale there: the failure says so, where it read as a kernel infinitely worse than an exact
    reference ("k*err_lowp with err_lowp 0")."""
    ref = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    actual = torch.tensor([1.0, 2.01, 3.0], dtype=torch.float16)
    lowp = torch.tensor([1.0, float("inf"), 3.0], dtype=torch.float16)
    with pytest.raises(AssertionError, match=r"float16 reference is NaN/inf at 1 position\(s\) where the float64 "
                                             r"one is finite"):
        compare("x", actual, ref, lowp)
    with pytest.raises(AssertionError) as plain:  # (an ordinary failure says nothing of it)
        compare("x", actual, ref, ref.half())
    assert "NaN/inf" not in str(plain.value)


def test_shape_mismatch_is_caught():
    with pytest.raises(AssertionError, match="shape"):
        compare("x", torch.ones(3), torch.ones(4, dtype=torch.float64), torch.ones(4))


def test_a_gradient_zero_by_cancellation_is_held_to_the_calls_gradient_scale():
    """Attention over a single key: dK is exactly zero (dS = dP - delta cancels), the float32
    reference gets that zero exactly, and a fused kernel leaves float32 rounding of the
    cancelling terms. The floor follows the call's largest gradient, so rounding passes, while
    an error a thousand times larger (still small) is caught."""
    q, k, v = make_inputs((1, 1, 11, 8), (1, 1, 1, 8), (1, 1, 1, 16), dtype=torch.float32, seed=11)

    def with_k_grad_noise(scale):
        return _attention_with_k_grad(lambda g: g + scale)

    results = check_against_reference(with_k_grad_noise(3e-6), R.attention, [q, k, v], names="qkv")
    dk = next(r for r in results if r.name == "grad of k")
    assert dk.err_lp == 0.0 and dk.err > 2e-6  # beyond the old own-scale floor, within the new one
    with pytest.raises(AssertionError, match="grad of k"):
        check_against_reference(with_k_grad_noise(3e-3), R.attention, [q, k, v], names="qkv")


def test_union_cases_takes_gpu_marked_cases():
    """backend_cases' GPU cases carry pytest's gpu mark, which does not hash: their union is by id
    (a set of them made tests/test_robustness.py fail to collect on every GPU machine)."""
    import pytest

    from fused_attn.testing import union_cases

    gpu = [pytest.param("cuda", "triton", id="cuda-triton", marks=(pytest.mark.gpu,))]
    cpu = [pytest.param("cpu", "cpu", id="cpu-cpu"), pytest.param("cpu", "reference", id="cpu-reference")]
    with pytest.raises(TypeError):
        set(gpu)  # (why the union cannot be a set)
    cases = union_cases(cpu + gpu, gpu, cpu)
    assert [c.id for c in cases] == ["cpu-cpu", "cpu-reference", "cuda-triton"]
    assert cases[2].marks == (pytest.mark.gpu,)


def _rms_norm_with_eps_off_in_low_precision(x):
    """The reference RMSNorm whose eps is 64x too large except in float64: the shape of a bug in the
    reference's float32 path (an eps not scaled with the statistics, c^2 = 1/64 at d = 64), which the
    float64 run, the oracle's truth, does not take."""
    eps = 1e-5 if x.dtype == torch.float64 else 64e-5
    return R.layer_norm_residual(x, None, None, None, eps, rms=True)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_reference_backend_is_held_to_a_fixed_bound(backend):
    """Run as the reference backend, a result is its own low-precision reference (err == err_lowp),
    so ``k * err_lowp + floor`` passes whatever it computes: the reference backend is held to the
    fixed REFERENCE_RTOL against float64 instead. tests/conftest.py applies it to a test
    parametrised with backend="reference" (this one), backend= to a single call."""
    x = make_inputs((5, 64), dtype=torch.float32)[0]
    wrong = _rms_norm_with_eps_off_in_low_precision
    if backend == "reference":
        with pytest.raises(AssertionError, match="output0: .*the reference backend's fixed bound"):
            check_against_reference(wrong, wrong, [x])
        check_against_reference(R.layer_norm_residual, R.layer_norm_residual, [x])  # (the real one passes)
    else:
        results = check_against_reference(wrong, wrong, [x])  # (a kernel: held to k * err_lowp, met here)
        assert results[0].err == results[0].err_lp > 1e-4
        with pytest.raises(AssertionError, match="fixed bound"):
            check_against_reference(wrong, wrong, [x], backend="reference")
