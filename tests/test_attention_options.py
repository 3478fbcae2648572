"""Attention's FlashAttention-style options on every backend of this machine: local (sliding-window)
attention, bottom-right alignment and logit soft-capping.

The user's terms (``causal``, ``window_size``, ``alignment``) become one band (band_lo, band_hi)
in ``ops_common.attention_band``; the kernels see only the band. The oracle here is built from the
user's terms directly (``reference.visible_keys``), so a wrong band formula fails these tests too.
Soft-capping: the logits are ``softcap * tanh(scale * q.k / softcap)`` before the mask; its tests
scale q and k up so that the cap bites (|scale * q.k| well above the cap for many pairs), where a
kernel that skipped the cap, or its derivative 1 - tanh^2 in the backward, would be far off.
"""
import itertools

import pytest
import torch

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.ops_common import attention_band, clamp_band
from fused_attn.testing import backend_cases, check_against_reference, make_inputs

WINDOWS = [None, (0, 0), (1, 0), (2, 3), (-1, 1), (3, -1), (0, -1), (-1, 0), (-1, -1)]


def cases(dtype):
    return backend_cases("attention", dtype)


@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
def test_band_is_the_users_window(alignment):
    """Every (Lq, Lk, causal, window) up to 6 x 6: the band keeps exactly the keys the definition keeps."""
    for Lq, Lk, causal, window in itertools.product(range(7), range(7), (False, True), WINDOWS):
        lo, hi = attention_band(Lq, Lk, causal, window, alignment)
        expected = R.visible_keys(Lq, Lk, causal, window, alignment)
        if expected is None:
            expected = torch.ones(Lq, Lk, dtype=torch.bool)
        assert torch.equal(R.visible_keys(Lq, Lk, band=(lo, hi)), expected), (Lq, Lk, causal, window)
        assert torch.equal(R.visible_keys(Lq, Lk, band=clamp_band(lo, hi, Lq, Lk)), expected)


def test_visible_keys_spot_values():
    """The definition itself, on cases worked by hand."""
    # Lq 2, Lk 4, bottom-right causal: query 0 sits at key 2, query 1 at key 3.
    assert R.visible_keys(2, 4, True, None, "bottom_right").tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    # top-left causal sliding window of 2 keys (left 1)
    assert R.visible_keys(3, 3, True, (1, 0)).tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    # Lq 3 > Lk 1, bottom-right causal: the first two queries see nothing
    assert R.visible_keys(3, 1, True, None, "bottom_right").tolist() == [[0], [0], [1]]


# (name, B, Hq, Hkv, Lq, Lk, D, causal, window, alignment, extra)
CASES = [
    ("causal sliding window", 1, 4, 2, 97, 97, 40, True, (16, 0), "top_left", None),
    ("bottom-right causal Lq<Lk", 2, 2, 1, 17, 97, 59, True, None, "bottom_right", None),
    ("bottom-right causal Lq>Lk (dead rows)", 1, 2, 2, 97, 61, 16, True, None, "bottom_right", None),
    ("two-sided window", 1, 2, 1, 130, 97, 64, False, (5, 9), "top_left", None),
    ("left-only window, bool mask", 1, 2, 2, 61, 97, 40, False, (7, -1), "bottom_right", "bool"),
    ("decode step, windowed cache", 2, 4, 1, 1, 147, 64, True, (31, 0), "bottom_right", None),
    ("window + additive mask grad", 1, 2, 1, 33, 70, 24, True, (9, 0), "bottom_right", "additive"),
    ("window + dropout", 1, 2, 2, 45, 45, 32, False, (4, 4), "top_left", "dropout"),
]


def _run_case(backend, dtype, case, softcap=None):
    """The fused call against the oracle, forward and every gradient; with a softcap, q and k x4."""
    name, B, Hq, Hkv, Lq, Lk, D, causal, window, alignment, extra = case
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), dtype=dtype, seed=Lq + Lk)
    if softcap:  # |scale * q.k| ~ 16 typical, above every cap used here
        q, k = ((t.detach() * 4).requires_grad_() for t in (q, k))
    inputs = [q, k, v]
    names = ["q", "k", "v"]
    p = 0.0
    if extra == "bool":
        gen = torch.Generator().manual_seed(3)
        inputs.append((torch.rand(B, 1, Lq, Lk, generator=gen) > 0.2).to(q.device))
        names.append("mask")
    elif extra == "additive":
        inputs.append(make_inputs((1, Hq, Lq, Lk), dtype=dtype, seed=5)[0])
        names.append("mask")
    elif extra == "dropout":
        p = 0.25

    def rng():
        return torch.Generator().manual_seed(11)

    def fused(q, k, v, mask=None):
        return F.attention(q, k, v, attn_mask=mask, causal=causal, window_size=window, alignment=alignment,
                           softcap=softcap, dropout_p=p, backend=backend, generator=rng())

    def reference(q, k, v, mask=None):
        seed_offset = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=rng()).tolist()) if p else None
        return R.attention(q, k, v, mask, causal, p, None, seed_offset, window_size=window, alignment=alignment,
                           softcap=softcap)

    return check_against_reference(fused, reference, inputs, names=names)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_window_matches_reference_float32(device, backend, case):
    with torch.device(device):
        results = _run_case(backend, torch.float32, case)
    assert all(r.ok for r in results), "\n".join(map(str, results))


HALF_CASES = [CASES[0], CASES[2], CASES[6]]


@pytest.mark.parametrize("case", HALF_CASES, ids=[c[0] for c in HALF_CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float16))
def test_window_matches_reference_float16(device, backend, case):
    with torch.device(device):
        results = _run_case(backend, torch.float16, case)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_window_covering_everything_is_plain_attention(device, backend):
    """A window wider than the sequence changes nothing: same output bits as no window."""
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 37, 16), (1, 2, 29, 16), (1, 2, 29, 16), requires_grad=False)
        plain = F.attention(q, k, v, backend=backend)
        wide = F.attention(q, k, v, window_size=(100, 100), backend=backend)
        causal = F.attention(q, k, v, causal=True, backend=backend)
        causal_wide = F.attention(q, k, v, causal=True, window_size=(100, -1), backend=backend)
    assert torch.equal(plain, wide)
    assert torch.equal(causal, causal_wide)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_bottom_right_decode_matches_full_prefill(device, backend):
    """KV-cache decoding: each new query against all keys so far (bottom-right causal, Lq = 1)
    gives the rows of one causal pass over the whole sequence, windowed or not."""
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 23, 32), (1, 2, 23, 32), (1, 2, 23, 32), requires_grad=False)
        for window in (None, (5, 0)):
            full = F.attention(q, k, v, causal=True, window_size=window, backend=backend)
            for t in (0, 1, 9, 22):
                step = F.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], causal=True, window_size=window,
                                   alignment="bottom_right", backend=backend)
                torch.testing.assert_close(step, full[:, :, t:t + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_dead_rows_of_bottom_right_give_zeros_and_zero_grads(device, backend):
    with torch.device(device):
        q, k, v = make_inputs((1, 1, 9, 8), (1, 1, 4, 8), (1, 1, 4, 8))
        out = F.attention(q, k, v, causal=True, alignment="bottom_right", backend=backend)
        out.sum().backward()
    assert torch.all(out[:, :, :5] == 0) and torch.isfinite(out).all()
    assert torch.all(q.grad[:, :, :5] == 0) and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


SWEEP_WINDOWS = [(0, 0), (1, 0), (31, 0), (32, 0), (33, 2), (0, 31), (5, -1), (-1, 4), (63, 1), (2, 64)]


@pytest.mark.parametrize("device,backend", cases(torch.float32))
@pytest.mark.parametrize("Lq,Lk", [(70, 70), (40, 100), (100, 40)])
def test_window_sweep(device, backend, Lq, Lk):
    """Many band edges against the block boundaries of the tiled kernels (blocks of 16-128 rows):
    windows one key either side of a block multiple, both alignments, forward and gradients."""
    with torch.device(device):
        q, k, v = make_inputs((1, 1, Lq, 16), (1, 1, Lk, 16), (1, 1, Lk, 16), seed=Lq)
        dout = make_inputs((1, 1, Lq, 16), seed=1, requires_grad=False)[0]
        for n, window in enumerate(SWEEP_WINDOWS):
            alignment = ("top_left", "bottom_right")[n % 2]
            out = F.attention(q, k, v, window_size=window, alignment=alignment, backend=backend)
            grads = torch.autograd.grad(out, (q, k, v), dout)
            q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
            ref = R.attention(q64, k64, v64, window_size=window, alignment=alignment)
            ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
            for what, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
                torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5,
                                           msg=lambda m: f"{what}, window {window}, {alignment}: {m}")


@pytest.mark.parametrize("device,backend", cases(torch.float32))
@pytest.mark.parametrize("band", [(5, 2), (2**62, 2**62), (-2**62, -2**62), (40, 40), (-30, -30)])
def test_empty_band_through_the_ops(device, backend, band):
    """The ops take any band, also ones the functional API never builds (band_lo > band_hi, or
    entirely outside the keys): every row then sees nothing: zeros, lse +inf, zero gradients."""
    import fused_attn.ops  # noqa: F401  (registers torch.ops.fused_attn)

    with torch.device(device):
        q, k, v = make_inputs((1, 2, 21, 8), (1, 1, 29, 8), (1, 1, 29, 8), requires_grad=False)
        out, lse = torch.ops.fused_attn.attention_fwd(q, k, v, None, *band, 0.0, 0.5, None, backend)
        assert torch.all(out == 0) and torch.all(lse == float("inf"))
        grads = torch.ops.fused_attn.attention_bwd(torch.ones_like(out), q, k, v, out, lse, None, *band, 0.0, 0.5,
                                                   None, False, backend)
    for g in grads[:3]:
        assert torch.all(g == 0)


# ---------------------------------------------------------------------------------------------
# logit soft-capping
# ---------------------------------------------------------------------------------------------

# (case as above, softcap)
SOFTCAP_CASES = [
    (("cap 5", 1, 2, 2, 33, 47, 32, False, None, "top_left", None), 5.0),
    (("cap 30 causal gqa", 2, 4, 2, 97, 97, 40, True, None, "top_left", None), 30.0),
    (("cap 3 window bool mask", 1, 2, 1, 61, 80, 16, True, (9, 0), "bottom_right", "bool"), 3.0),
    (("cap 8 additive mask grad", 1, 2, 2, 17, 29, 24, False, None, "top_left", "additive"), 8.0),
    (("cap 4 dropout", 1, 2, 2, 40, 40, 16, False, None, "top_left", "dropout"), 4.0),
    (("single row and key", 1, 1, 1, 1, 1, 8, False, None, "top_left", None), 2.0),
]


@pytest.mark.parametrize("case,softcap", SOFTCAP_CASES, ids=[c[0][0] for c in SOFTCAP_CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_softcap_matches_reference_float32(device, backend, case, softcap):
    with torch.device(device):
        _run_case(backend, torch.float32, case, softcap)


HALF_SOFTCAP_CASES = [SOFTCAP_CASES[1], SOFTCAP_CASES[3]]


@pytest.mark.parametrize("case,softcap", HALF_SOFTCAP_CASES, ids=[c[0][0] for c in HALF_SOFTCAP_CASES])
@pytest.mark.parametrize("device,backend", [c for c in cases(torch.float16) if c.values[1] != "reference"])
def test_softcap_matches_reference_float16(device, backend, case, softcap):
    with torch.device(device):
        _run_case(backend, torch.float16, case, softcap)


def test_softcap_changes_the_answer():
    """The oracle itself: a cap that bites changes the output; a huge cap leaves it (nearly) as is."""
    q, k, v = make_inputs((1, 1, 9, 8), (1, 1, 9, 8), (1, 1, 9, 8), requires_grad=False)
    q = q * 4
    plain = R.attention(q, k, v)
    assert not torch.allclose(R.attention(q, k, v, softcap=2.0), plain, atol=1e-2)
    torch.testing.assert_close(R.attention(q, k, v, softcap=1e6), plain)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_softcap_zero_is_off(device, backend):
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 13, 16), (1, 2, 21, 16), (1, 2, 21, 16), requires_grad=False)
        assert torch.equal(F.attention(q, k, v, softcap=0.0, backend=backend), F.attention(q, k, v, backend=backend))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_softcap_keeps_nan_in_its_row(device, backend):
    with torch.device(device):
        q, k, v = make_inputs((1, 1, 5, 8), (1, 1, 6, 8), (1, 1, 6, 8), requires_grad=False)
        q[0, 0, 2, 3] = float("nan")
        out = F.attention(q, k, v, softcap=5.0, backend=backend)
    assert torch.isnan(out[0, 0, 2]).all()
    assert torch.isfinite(out[0, 0, [0, 1, 3, 4]]).all()


# ---------------------------------------------------------------------------------------------
# return_lse: the log-sum-exp as FlashAttention's return_softmax_lse
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_return_lse_matches_reference(device, backend):
    """The returned lse is the float64 reference's (bottom-right causal window with dead rows, GQA,
    a bool mask and a soft cap), +inf on the rows that see no key; it is part of the autograd graph
    (its gradient: tests/test_lse_gradient.py), and the output is the one a call without return_lse
    gives."""
    with torch.device(device):
        q, k, v = make_inputs((2, 4, 37, 24), (2, 2, 29, 24), (2, 2, 29, 16), seed=21)
        keep = torch.rand(2, 1, 37, 29, generator=torch.Generator().manual_seed(4)).to(device) > 0.25
        opts = dict(attn_mask=keep, causal=True, window_size=(6, 0), alignment="bottom_right", softcap=2.0)
        out, lse = F.attention(q, k, v, return_lse=True, backend=backend, **opts)
        plain = F.attention(q, k, v, backend=backend, **opts)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 37) and lse.requires_grad
    assert torch.equal(out, plain)
    expected = R.attention_lse(q.double(), k.double(), keep, True, window_size=(6, 0), alignment="bottom_right",
                               softcap=2.0)
    dead = torch.isinf(expected)
    assert bool(dead.any()) and bool((~dead).any())
    assert torch.equal(torch.isinf(lse.cpu()), dead.cpu()) and bool((lse[dead] > 0).all())
    torch.testing.assert_close(lse[~dead].double(), expected[~dead], rtol=1e-5, atol=1e-5)
    out.sum().backward()  # the output still differentiates
    assert q.grad is not None and bool(torch.isfinite(q.grad).all())


@pytest.mark.parametrize("device,backend", cases(torch.float64))
def test_float64_lse_is_float64_accurate(device, backend):
    """For float64 inputs the lse is float64 (float32 otherwise), dense, varlen and from the KV
    cache alike: a merge of split keys, and sinks applied through it, are then exact to float64
    rounding, not to float32's."""
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 9, 16), (1, 2, 40, 16), (1, 2, 40, 16), requires_grad=False, seed=22,
                              dtype=torch.float64)
        sinks = torch.tensor([0.5, -1.0], dtype=torch.float64)
        parts = [F.attention(q, k[:, :, s], v[:, :, s], return_lse=True, backend=backend)
                 for s in (slice(0, 23), slice(23, 40))]
        whole, lse = F.attention(q, k, v, return_lse=True, backend=backend)
        with_sinks, sinks_lse = F.attention(q, k, v, sinks=sinks, return_lse=True, backend=backend)
        qp, kp, vp = (t[0].transpose(0, 1) for t in (q, k, v))
        cu_q, cu_k = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 40], dtype=torch.int32)
        _, varlen_lse = F.attention_varlen(qp, kp, vp, cu_q, cu_k, return_lse=True, backend=backend)
        _, cache_lse = F.attention_with_kvcache(qp[None], kp[None], vp[None], cache_seqlens=40, return_lse=True,
                                                backend=backend)
    expected = R.attention_lse(q, k, None, False)
    for got in (lse, parts[0][1], varlen_lse[None], cache_lse, sinks_lse):
        assert got.dtype == torch.float64
    torch.testing.assert_close(lse, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(varlen_lse[None], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cache_lse, expected, rtol=1e-12, atol=1e-12)
    merged, merged_lse = F.merge_attention([o for o, _ in parts], [l for _, l in parts])
    torch.testing.assert_close(merged_lse, lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged, whole, rtol=1e-12, atol=1e-12)
    expected_sinks = R.attention(q, k, v, None, False, sinks=sinks)
    torch.testing.assert_close(with_sinks, expected_sinks, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sinks_lse, torch.logaddexp(expected, sinks.view(1, 2, 1)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_lse_merges_split_keys(device, backend):
    """What the lse is for: attention over two halves of the keys, merged by their lse, is
    attention over all of them (split-KV decoding, ring attention)."""
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 9, 16), (1, 2, 40, 16), (1, 2, 40, 16), requires_grad=False, seed=22)
        o1, l1 = F.attention(q, k[:, :, :23], v[:, :, :23], return_lse=True, backend=backend)
        o2, l2 = F.attention(q, k[:, :, 23:], v[:, :, 23:], return_lse=True, backend=backend)
        whole, l = F.attention(q, k, v, return_lse=True, backend=backend)
    merged_lse = torch.logaddexp(l1, l2)
    merged = o1 * torch.exp(l1 - merged_lse)[..., None] + o2 * torch.exp(l2 - merged_lse)[..., None]
    torch.testing.assert_close(merged_lse, l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_return_lse(device, backend):
    lens_q, lens_k = [3, 0, 20], [5, 4, 20]
    cu_q = torch.tensor([0, 3, 3, 23], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 5, 9, 29], dtype=torch.int32, device=device)
    q, k, v = make_inputs((23, 2, 16), (29, 1, 16), (29, 1, 16), device=device, seed=23)
    out, lse = F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alignment="bottom_right", return_lse=True,
                                  backend=backend)
    ref_out, ref_lse = R.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, True,
                                          alignment="bottom_right", with_lse=True)
    assert lse.shape == (2, 23) and lse.requires_grad
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)


def test_return_lse_compiles_fullgraph():
    q, k, v = make_inputs((1, 2, 11, 8), (1, 2, 11, 8), (1, 2, 11, 8))

    def fn(q, k, v):
        out, lse = F.attention(q, k, v, causal=True, return_lse=True)
        return out.sum() + (lse * torch.linspace(-1, 1, lse.shape[-1])).sum()  # both outputs differentiated

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k)]
    q.grad = k.grad = None
    eager = fn(q, k, v)
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads, [q.grad, k.grad])
    without_lse = torch.autograd.grad(F.attention(q, k, v, causal=True).sum(), q)[0]
    assert (grads[0] - without_lse).abs().max() > 1e-3  # the lse's gradient is in there


def test_return_lse_is_validated():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="return_lse must be a bool, got int"):
        F.attention(q, q, q, return_lse=1)
    with pytest.raises(TypeError, match="return_lse must be a bool, got str"):
        F.attention_varlen(q[0, 0, :, None], q[0, 0, :, None], q[0, 0, :, None], torch.tensor([0, 4]),
                           torch.tensor([0, 4]), return_lse="yes")
