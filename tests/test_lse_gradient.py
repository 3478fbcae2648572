"""The lse that ``return_lse=True`` returns is differentiable, on every backend of this machine.

lse_i = log sum_j exp(s_ij) over the row's visible logits (scaled, capped, biased, masked), so
d lse_i / d s_ij = P_ij: the lse's gradient dlse joins the softmax backward as one row term,
dS = P (dP - (delta - dlse)), and every backend subtracts it from delta = rowsum(dO * O). The
oracle differentiates ``reference.attention_lse`` in float64 (its dead rows, +inf, get a zero
gradient). The gradients drawn for the lse are as large as those of the output, and the checks
below fail when the lse's term is dropped (see ``test_the_lse_term_is_not_small``).

What it is for: attention over split keys (split-KV decoding, ring / context parallelism) merged by
the lse is attention over all keys, and with a differentiable lse the merge trains under plain
autograd (FlexAttention's ``return_lse`` differentiates too; FlashAttention's lse is a constant).
"""
import pytest
import torch

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.testing import backend_cases, check_against_reference, make_inputs, runnable_backends


def cases(dtype, **options):
    return backend_cases("attention", dtype, **options)


# (name, B, Hq, Hkv, Lq, Lk, D, causal, window, alignment, extra)
CASES = [
    ("plain", 1, 2, 2, 17, 17, 16, False, None, "top_left", None),
    ("gqa causal bottom-right dead rows", 2, 4, 2, 37, 29, 24, True, None, "bottom_right", None),
    ("window bool mask softcap", 1, 2, 1, 21, 33, 40, False, (5, 3), "top_left", "bool softcap"),
    ("additive mask grad alibi", 1, 2, 2, 19, 23, 24, True, None, "top_left", "additive alibi"),
    ("dropout", 1, 2, 2, 33, 33, 16, True, None, "top_left", "dropout"),
    ("seqlen 1", 1, 1, 1, 1, 1, 8, False, None, "top_left", None),
    ("head dim 59, Lk 97", 1, 2, 2, 17, 97, 59, False, None, "top_left", None),
]


def _run_case(backend, dtype, case):
    name, B, Hq, Hkv, Lq, Lk, D, causal, window, alignment, extra = case
    extra = extra or ""
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), dtype=dtype, seed=len(name))
    softcap = 2.0 if "softcap" in extra else None
    if softcap:  # logits well above the cap, so that its derivative matters
        q, k = ((t.detach() * 3).requires_grad_() for t in (q, k))
    slopes = torch.tensor([0.3, -0.2])[:Hq].to(q.device) if "alibi" in extra else None
    inputs, names = [q, k, v], ["q", "k", "v"]
    if "bool" in extra:
        gen = torch.Generator().manual_seed(3)
        inputs.append((torch.rand(B, 1, Lq, Lk, generator=gen) > 0.2).to(q.device))
        names.append("mask")
    elif "additive" in extra:
        inputs.append(make_inputs((1, Hq, Lq, Lk), dtype=dtype, seed=5, device=q.device)[0])
        names.append("mask")
    p = 0.25 if "dropout" in extra else 0.0
    rng = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    opts = dict(causal=causal, window_size=window, alignment=alignment, softcap=softcap)

    def fused(q, k, v, mask=None):
        return F.attention(q, k, v, attn_mask=mask, dropout_p=p, alibi_slopes=slopes, return_lse=True,
                           backend=backend, generator=rng(), **opts)

    def reference(q, k, v, mask=None):
        seed_offset = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=rng()).tolist()) if p else None
        alibi = None if slopes is None else slopes.to(q.dtype)
        out = R.attention(q, k, v, mask, causal, p, None, seed_offset, window_size=window, alignment=alignment,
                          softcap=softcap, alibi_slopes=alibi)
        # the lse of the logits before dropout, as the kernels return it
        lse = R.attention_lse(q, k, mask, causal, window_size=window, alignment=alignment, softcap=softcap,
                              alibi_slopes=alibi)
        return out, lse

    return check_against_reference(fused, reference, inputs, names=names)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_lse_gradient_matches_reference(device, backend, case):
    with torch.device(device):
        results = _run_case(backend, torch.float32, case)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASES[1][0], CASES[3][0]])
@pytest.mark.parametrize("device,backend", cases(torch.float16))
def test_lse_gradient_matches_reference_float16(device, backend, case):
    with torch.device(device):
        results = _run_case(backend, torch.float16, case)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_the_lse_term_is_not_small(device, backend):
    """The lse's share of q's gradient, for the gradients the oracle test draws, is far above its
    tolerance: a backend that ignored dlse would fail there."""
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 17, 16), (1, 2, 17, 16), (1, 2, 17, 16), seed=5)
        out, lse = F.attention(q, k, v, return_lse=True, backend=backend)
        gen = torch.Generator().manual_seed(0)
        g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
        g_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse)
        with_lse = torch.autograd.grad([out, lse], q, [g_out, g_lse], retain_graph=True)[0]
        without = torch.autograd.grad(out, q, g_out)[0]
    assert float((with_lse - without).abs().max()) > 0.1


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_lse_alone(device, backend):
    """A loss of the lse alone: the output's gradient is absent (zeros reach the kernels), v gets
    zeros, q and k the oracle's."""
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 13, 16), (1, 1, 21, 16), (1, 1, 21, 16), seed=7)
        _, lse = F.attention(q, k, v, causal=True, alignment="bottom_right", return_lse=True, backend=backend)
        dq, dk, dv = torch.autograd.grad((lse * lse.new_tensor(range(13))).sum(), (q, k, v))
        q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
        lse64 = R.attention_lse(q64, k64, None, True, alignment="bottom_right")
        dq64, dk64 = torch.autograd.grad((lse64 * lse64.new_tensor(range(13))).sum(), (q64, k64))
    torch.testing.assert_close(dq.double(), dq64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dk.double(), dk64, rtol=1e-5, atol=1e-5)
    assert bool((dv == 0).all())


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_merged_split_keys_train_like_whole_attention(device, backend):
    """Attention over two halves of the keys, merged by their lse under autograd, has the output and
    the gradients (q, k, v) of attention over all keys: ring attention without a custom backward."""
    with torch.device(device):
        q, k, v = make_inputs((2, 4, 19, 24), (2, 2, 45, 24), (2, 2, 45, 24), seed=9)
        o1, l1 = F.attention(q, k[:, :, :20], v[:, :, :20], return_lse=True, backend=backend)
        o2, l2 = F.attention(q, k[:, :, 20:], v[:, :, 20:], return_lse=True, backend=backend)
        merged_lse = torch.logaddexp(l1, l2)
        merged = o1 * torch.exp(l1 - merged_lse)[..., None] + o2 * torch.exp(l2 - merged_lse)[..., None]
        g = torch.randn(merged.shape, generator=torch.Generator().manual_seed(1)).to(merged)
        grads = torch.autograd.grad(merged, (q, k, v), g)
        whole = F.attention(q, k, v, backend=backend)
        expected = torch.autograd.grad(whole, (q, k, v), g)
    torch.testing.assert_close(merged, whole, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", cases(torch.float32, varlen=True))
def test_varlen_lse_gradient_matches_reference(device, backend):
    """Packed sequences (one empty, one whose first queries see no key under bottom-right causal,
    GQA, ALiBi): the (Hq, total_q) lse's gradient reaches each sequence's rows."""
    lens_q, lens_k = [7, 0, 12, 1], [4, 3, 12, 17]
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)  # noqa
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    slopes = torch.tensor([0.25, -0.5], device=device)
    q, k, v = make_inputs((sum(lens_q), 2, 16), (sum(lens_k), 1, 16), (sum(lens_k), 1, 16), device=device, seed=13)
    opts = dict(alignment="bottom_right")

    def fused(q, k, v):
        return F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alibi_slopes=slopes, return_lse=True,
                                  backend=backend, **opts)

    def reference(q, k, v):
        return R.attention_varlen(q, k, v, cu_q, cu_k, True, alibi_slopes=slopes.to(q.dtype), with_lse=True, **opts)

    results = check_against_reference(fused, reference, [q, k, v], names=["q", "k", "v"])
    assert all(r.ok for r in results), "\n".join(map(str, results))
    _, lse = fused(q, k, v)
    assert bool(torch.isinf(lse).any())  # the dead rows are there


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_lse_gradient_gradcheck_float64(backend):
    """Finite differences of (out, lse) in float64, causal with dead rows and an additive mask
    whose gradient is taken too, at gradcheck's own step and tolerances: the lse is float64 for
    float64 inputs (float32 for the others, as FlashAttention's)."""
    if backend not in runnable_backends("attention", dtype=torch.float64):
        pytest.skip(f"the {backend} backend is not available")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)
               for s in ((1, 2, 6, 5), (1, 1, 4, 5), (1, 1, 4, 3)))
    mask = torch.randn(1, 2, 6, 4, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, mask):
        out, lse = F.attention(q, k, v, attn_mask=mask, causal=True, alignment="bottom_right", return_lse=True,
                               softcap=1.5, backend=backend)
        assert lse.dtype == torch.float64
        return out, lse.masked_fill(torch.isinf(lse), 0.0)  # +inf rows have no finite difference

    assert torch.autograd.gradcheck(fn, (q, k, v, mask))


# Losses whose lse gradient is not a contiguous (B, H, L) tensor: every other test draws dlse as a
# fresh tensor, but a sum's gradient is a stride-0 expand, a transposed product's has the rows
# outermost, a slice's is a strided scatter. The kernels must read dlse through its strides.
_STRIDED_LSE_LOSSES = {
    "sum": lambda out, lse: out.sum() + lse.sum(),  # dlse: a stride-0 expand of one
    "transposed": lambda out, lse: out.sum() + (lse.transpose(-1, -2)
                                                * torch.arange(lse.shape[-1] * lse.shape[-2], device=lse.device)
                                                .view(lse.shape[-1], lse.shape[-2]).to(lse.dtype) / 7).sum(),
}


@pytest.mark.parametrize("loss", list(_STRIDED_LSE_LOSSES))
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("device,backend", cases(torch.float32, varlen=True))
def test_lse_gradient_of_any_layout(device, backend, varlen, loss):
    """dq, dk, dv of a loss whose dlse is a stride-0 expand or a transposed view match the float64
    reference, dense (B, H, L) lse and packed (H, total) lse alike."""
    lossfn = _STRIDED_LSE_LOSSES[loss]
    cu = torch.tensor([0, 7, 20], dtype=torch.int32, device=device)
    q, k, v = make_inputs((1, 2, 20, 16), (1, 2, 20, 16), (1, 2, 20, 16), device=device, seed=21)

    def grads(q, k, v, backend):
        if varlen:  # the (total, H, D) packing of the same rows: two sequences, 7 and 13 long
            qq, kk, vv = (t[0].transpose(0, 1) for t in (q, k, v))
            out, lse = F.attention_varlen(qq, kk, vv, cu, cu, causal=True, return_lse=True, backend=backend)
        else:
            out, lse = F.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        return torch.autograd.grad(lossfn(out, lse), (q, k, v))

    got = grads(q, k, v, backend)
    want = grads(*(t.detach().double().requires_grad_() for t in (q, k, v)), "reference")
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name} ({loss}): {m}")
