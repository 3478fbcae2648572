"""The host-time shortcuts of the eager calls must answer as the long way does.

Each test runs a call once (so that whatever is cached or bound is), then the same call under
another setting the shortcut must notice: another ``use_backend`` (in this thread, in another
thread), another ``FUSED_ATTN_BACKEND``, grad mode, inference mode, forward-mode AD, a torch.func
transform, or a bad argument that must still be refused. Small CPU tensors: seconds in all.
"""
import threading

import pytest
import torch

from fused_attn import backends, ops
from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.backends import BACKENDS, Call, resolve, use_backend
from fused_attn.ops_common import check_varlen_bounds

HAS_CPU = not BACKENDS["cpu"].call_reasons(Call("layer_norm_residual", torch.device("cpu"), torch.float32,
                                                {"dropout": False, "hidden": 8, "residual_in_fp32": False,
                                                 "rms": False}))
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the cpu backend (fused_attn._C) is not built")


@pytest.fixture
def ran(norm_forward_backends):
    """The backends the layer_norm_residual forwards ran on, in order (conftest's spies)."""
    return norm_forward_backends


def _norm_inputs(d=8):
    torch.manual_seed(0)
    return torch.randn(3, d), torch.randn(3, d), torch.randn(d), torch.randn(d)


@needs_cpu
def test_cached_backend_choice_follows_use_backend_threads_and_the_variable(ran, monkeypatch):
    x, r, w, b = _norm_inputs()
    monkeypatch.delenv("FUSED_ATTN_BACKEND", raising=False)
    F.layer_norm_residual(x, r, w, b)
    F.layer_norm_residual(x, r, w, b)  # (the choice is cached now)
    with use_backend("reference"):
        F.layer_norm_residual(x, r, w, b)
    F.layer_norm_residual(x, r, w, b, backend="reference")
    assert ran == ["cpu", "cpu", "reference", "reference"]

    # another thread's selection is its own, whichever thread asked first
    ran.clear()
    go, done = threading.Event(), threading.Event()

    def other():
        with use_backend("reference"):
            go.wait(10)
            F.layer_norm_residual(x, r, w, b)
            done.set()

    thread = threading.Thread(target=other)
    thread.start()
    F.layer_norm_residual(x, r, w, b)
    go.set()
    done.wait(10)
    F.layer_norm_residual(x, r, w, b)
    thread.join(10)
    assert sorted(ran) == ["cpu", "cpu", "reference"] and ran[0] == "cpu" and ran[-1] == "cpu"

    # the variable is read on every call; a bad value is refused on every call, never cached
    ran.clear()
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "reference")
    F.layer_norm_residual(x, r, w, b)
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "refrence")
    for _ in range(2):
        with pytest.raises(ValueError, match="FUSED_ATTN_BACKEND must be one of"):
            F.layer_norm_residual(x, r, w, b)
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "cpu")
    F.layer_norm_residual(x, r, w, b)
    assert ran == ["reference", "cpu"]


def test_the_cache_of_choices_is_bounded(monkeypatch):
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(backends, "_RESOLVED_MAX", 4)
    for d in range(1, 12):
        x, r, w, b = _norm_inputs(d)
        out = F.layer_norm_residual(x, r, w, b)
        torch.testing.assert_close(out, R.layer_norm_residual(x, r, w, b, 1e-5))
        assert len(backends._resolved) <= 4


@pytest.mark.parametrize("requested", [None, "auto", "reference"])
def test_resolve_values_answers_as_resolve(requested):
    names = ("dropout", "hidden", "residual_in_fp32", "rms")
    for values in [(False, 8, False, False), (True, 64, True, True), (False, 1 << 21, False, True)]:
        options = dict(zip(names, values))
        call = Call("layer_norm_residual", torch.device("cpu"), torch.float32, options)
        for _ in range(2):  # (the second from the cache)
            assert backends.resolve_values("layer_norm_residual", names, torch.device("cpu"), torch.float32, values,
                                           requested) == resolve(call, requested)


def test_a_cached_choice_is_not_reused_under_torch_func(monkeypatch):
    """Under vmap / grad the options gain torch_func (backends whose launchers read memory refuse
    the wrapped tensors): an eager call cached before must not answer for them."""
    seen = []
    real = backends._resolve_constant

    def spy(op, device_type, dtype, options, requested):
        seen.append(dict(options))
        return real(op, device_type, dtype, options, requested)

    monkeypatch.setattr(backends, "_resolve_constant", spy)
    monkeypatch.setattr(backends, "_resolved", {})
    x, r, w, b = _norm_inputs()
    eager = F.layer_norm_residual(x, r, w, b)
    F.layer_norm_residual(x, r, w, b)
    assert len(seen) == 1 and "torch_func" not in seen[0]
    batched = torch.func.vmap(lambda x: F.layer_norm_residual(x, None, w, b))(torch.stack([x + r, x + r]))
    assert any(options.get("torch_func") for options in seen[1:])
    torch.testing.assert_close(batched[0], eager)


# ---------------------------------------------------------------------------------------------
# the no-grad shortcut against grad mode, inference mode, forward AD, autocast


def _calls():
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    x, r, w, b = _norm_inputs()
    fx, w1, b1, w2, b2 = torch.randn(3, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    return {
        "attention": ((q, k, v), lambda q, k, v: F.attention(q, k, v, causal=True),
                      lambda q, k, v: R.attention(q, k, v, causal=True)),
        "layer_norm": ((x, r, w, b), lambda x, r, w, b: F.layer_norm_residual(x, r, w, b),
                       lambda x, r, w, b: R.layer_norm_residual(x, r, w, b, 1e-5)),
        "feed_forward": ((fx, w1, b1, w2, b2), lambda *t: F.feed_forward(*t, activation="gelu"),
                         lambda *t: R.feed_forward(*t, "gelu")),
    }


@pytest.mark.parametrize("op", ["attention", "layer_norm", "feed_forward"])
def test_the_same_call_right_after_a_no_grad_one_follows_the_mode(op):
    inputs, fused, ref = _calls()[op]
    expected = ref(*inputs)
    for _ in range(2):
        out = fused(*inputs)
        assert out.grad_fn is None
        torch.testing.assert_close(out, expected)
    # one input requiring grad: the graph is built and the gradient is the reference's
    leaf = inputs[-1].clone().requires_grad_()
    out = fused(*inputs[:-1], leaf)
    assert out.grad_fn is not None
    (grad,) = torch.autograd.grad(out.square().sum(), leaf)
    leaf_ref = inputs[-1].clone().requires_grad_()
    (grad_ref,) = torch.autograd.grad(ref(*inputs[:-1], leaf_ref).square().sum(), leaf_ref)
    torch.testing.assert_close(grad, grad_ref)
    with torch.no_grad():
        assert fused(*inputs[:-1], leaf).grad_fn is None
    with torch.inference_mode():
        out = fused(*inputs)
        assert out.is_inference()
        torch.testing.assert_close(out, expected)
    # forward-mode AD under no_grad: the tangent still flows (the no-grad shortcut must not take it)
    tangent = torch.randn_like(inputs[0])
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(inputs[0], tangent)
        out_tangent = torch.autograd.forward_ad.unpack_dual(fused(dual, *inputs[1:])).tangent
    _, expected_tangent = torch.func.jvp(lambda t: ref(t, *inputs[1:]), (inputs[0],), (tangent,))
    torch.testing.assert_close(out_tangent, expected_tangent)
    # autocast right after (bfloat16 on CPU): as torch's ops take it (attention and the linears
    # in bfloat16; the norm in float32, returning x's dtype, as CPU autocast's layer_norm does)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused(*inputs).dtype == (torch.float32 if op == "layer_norm" else torch.bfloat16)
    assert fused(*inputs).dtype == torch.float32


def test_checks_still_run_right_after_a_passing_call():
    x, r, w, b = _norm_inputs()
    F.layer_norm_residual(x, r, w, b)
    for kwargs, error, match in [
            (dict(residual=r.double()), TypeError, "residual has dtype float64 but x has float32"),
            (dict(weight=torch.randn(7)), ValueError, r"weight must have shape \(8,\)"),
            (dict(bias=torch.randn(8, dtype=torch.float64)), TypeError, "bias has dtype float64"),
            (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
            (dict(dropout_p=True), TypeError, "dropout_p must be a float"),
            (dict(eps=0.0), ValueError, "eps must be a positive finite float"),
            (dict(prenorm=1), TypeError, "prenorm must be a bool"),
            (dict(backend="cpp"), ValueError, "backend must be one of")]:
        args = dict(residual=r, weight=w, bias=b)
        args.update(kwargs)
        with pytest.raises(error, match=match):
            F.layer_norm_residual(x, **args)
    assert torch.equal(F.layer_norm_residual(x, r, w, b, dropout_p=0), F.layer_norm_residual(x, r, w, b))

    fx, w1, b1, w2, b2 = torch.randn(3, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8, 16), torch.randn(8)
    F.feed_forward(fx, w1, b1, w2, b2)
    with pytest.raises(ValueError, match="activation must be one of"):
        F.feed_forward(fx, w1, b1, w2, b2, activation="rleu")
    with pytest.raises(ValueError, match=r"w2 must have shape \(d_out, 16\)"):
        F.feed_forward(fx, w1, b1, torch.randn(8, 15), b2)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        F.feed_forward(fx, w1, b1, w2, b2, dropout_p=-0.5)
    with pytest.raises(TypeError, match="w1 has dtype float64"):
        F.feed_forward(fx, w1.double(), b1, w2, b2)

    q = torch.randn(1, 2, 4, 8)
    F.attention(q, q, q)
    with pytest.raises(TypeError, match="causal must be a bool"):
        F.attention(q, q, q, causal=1)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        F.attention(q, q, q, dropout_p=2.0)
    with pytest.raises(TypeError, match="k has dtype float64"):
        F.attention(q, q.double(), q)

    cu = torch.tensor([0, 4], dtype=torch.int32)
    packed = q[0].transpose(0, 1)
    F.attention_varlen(packed, packed, packed, cu, cu, 4, 4)
    with pytest.raises(TypeError, match="max_seqlen_q must be an int or None, got True"):
        F.attention_varlen(packed, packed, packed, cu, cu, True, 4)
    with pytest.raises(ValueError, match="max_seqlen_k = 3 is shorter than the longest sequence"):
        F.attention_varlen(packed, packed, packed, cu, cu, 4, 3)


def test_one_boundaries_tensor_for_queries_and_keys_is_checked_against_both_totals():
    """Self-attention passes one cu_seqlens as both: read and checked once, unless the totals
    differ, when the keys' total must still be checked."""
    cu = torch.tensor([0, 3, 8])
    assert check_varlen_bounds(cu, cu, 8, 8) == (5, 5)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0, never decrease and end at the total length "
                                         "10"):
        check_varlen_bounds(cu, cu, 8, 10)
    with pytest.raises(ValueError, match="cu_seqlens_q must start at 0, never decrease"):
        check_varlen_bounds(torch.tensor([0, 5, 3, 8]), cu, 8, 8)


# ---------------------------------------------------------------------------------------------
# the direct paths' pieces


@pytest.mark.parametrize("make", [
    lambda: torch.randn(4, 6),
    lambda: torch.randn(2, 3, 6),
    lambda: torch.randn(6, 4).t(),  # columns strided
    lambda: torch.randn(8, 6)[::2],  # rows strided, columns unit
    lambda: torch.randn(4, 2)[:, :1],  # one column of stride 1, rows of 2
    lambda: torch.randn(4, 3)[:, ::3],  # one column of stride 3
    lambda: torch.randn(4, 3, 6).transpose(0, 1),
    lambda: torch.empty(0, 6),
    lambda: torch.empty(1, 1).expand(0, 6),
    lambda: torch.empty(0, 0).expand(0, 0),
])
def test_rows_direct_is_rows(make):
    t = make()
    d = t.shape[-1]
    expected, got = ops._rows(t, d), ops._rows_direct(t, d)
    assert got.shape == expected.shape and got.stride() == expected.stride()
    assert (got is t) == (expected is t)
    assert (got.data_ptr() == t.data_ptr()) == (expected.data_ptr() == t.data_ptr()) or t.numel() == 0
    assert torch.equal(got, expected)


def test_environment_reads_follow_os_environ(monkeypatch):
    from fused_attn._extension import env_get

    monkeypatch.setenv("FUSED_ATTN_TEST_VARIABLE", "a")
    assert env_get("FUSED_ATTN_TEST_VARIABLE") == "a"
    monkeypatch.setenv("FUSED_ATTN_TEST_VARIABLE", "b")
    assert env_get("FUSED_ATTN_TEST_VARIABLE") == "b"
    monkeypatch.delenv("FUSED_ATTN_TEST_VARIABLE")
    assert env_get("FUSED_ATTN_TEST_VARIABLE", "off") == "off"
    import os

    monkeypatch.setattr(os, "environ", {"FUSED_ATTN_TEST_VARIABLE": "c"})  # (a harness's mapping)
    assert env_get("FUSED_ATTN_TEST_VARIABLE") == "c"



# ---------------------------------------------------------------------------------------------
# the backward's inputs


@pytest.mark.parametrize("op", ["attention", "attention_varlen", "feed_forward"])
def test_the_backward_gets_no_zero_filled_gradient_for_outputs_it_returned_for_itself(op):
    """The tensors a Function returns only for its own backward (attention's lse without
    return_lse, the feed-forward's pre-activation and copied rows) are non-differentiable: autograd
    must hand the backward None for them, not a zero-filled tensor of their shape (for the
    feed-forward a (T, d_ff) fill, on every backward, that nothing reads). Seen as the ``aten.zeros``
    the engine dispatches before calling the backward; the gradients are unchanged."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(2)
    if op == "attention":
        inputs = [torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3)]
        out = F.attention(*inputs, causal=True)
        ref = R.attention(*inputs, causal=True)
    elif op == "attention_varlen":
        inputs = [torch.randn(7, 2, 8, requires_grad=True) for _ in range(3)]
        cu = torch.tensor([0, 3, 7])
        out = F.attention_varlen(*inputs, cu, cu, causal=True)
        ref = torch.cat([R.attention(*(t[a:b].transpose(0, 1)[None] for t in inputs), causal=True)[0].transpose(0, 1)
                         for a, b in ((0, 3), (3, 7))])
    else:
        inputs = [torch.randn(*shape, requires_grad=True) for shape in ((3, 8), (16, 8), (16,), (8, 16), (8,))]
        out = F.feed_forward(*inputs, activation="gelu")
        ref = R.feed_forward(*inputs, "gelu")
    grad_out = torch.randn_like(out)
    with Seen() as seen:
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert not [name for name in seen.ops if "zeros" in name], seen.ops
    for grad, expected in zip(grads, torch.autograd.grad(ref, inputs, grad_out)):
        torch.testing.assert_close(grad, expected)
