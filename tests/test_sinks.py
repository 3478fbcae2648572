"""Attention sinks (``sinks``: gpt-oss's per-head sink logits, transformers' ``s_aux``) on every
backend of this machine.

Definition (the oracle, ``reference.attention(..., sinks=)``): each softmax row gets one more
column holding its head's sink logit, which is dropped after the softmax (it has no value), so
query i attends key j with weight e^{s_ij} / (sum_j' e^{s_ij'} + e^{sink_h}). The functional layer
computes it from the kernels' (out, lse) as out * sigmoid(lse - sink), through the differentiable
lse, so the sinks get their gradient. The sinks here are of the size of the row log-sum-exps, so
they take a large share of each row; rows that see no key give zeros (the sink takes them whole).
"""
import pytest
import torch

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.testing import backend_cases, check_against_reference, make_inputs


def cases(dtype, **options):
    return backend_cases("attention", dtype, **options)


# (name, B, Hq, Hkv, Lq, Lk, D, causal, window, alignment, extra)
CASES = [
    ("plain", 1, 2, 2, 17, 17, 16, False, None, "top_left", ""),
    ("gqa causal bottom-right dead rows", 2, 4, 2, 37, 29, 24, True, None, "bottom_right", ""),
    ("window bool mask softcap", 1, 2, 1, 21, 33, 40, False, (5, 3), "top_left", "bool softcap"),
    ("additive mask grad alibi", 1, 2, 2, 19, 23, 24, True, None, "top_left", "additive alibi"),
    ("dropout", 1, 2, 2, 33, 33, 16, True, None, "top_left", "dropout"),
    ("seqlen 1, head dim 59", 1, 2, 1, 1, 97, 59, False, None, "top_left", ""),
]


def _run_case(backend, dtype, case, return_lse=True):
    name, B, Hq, Hkv, Lq, Lk, D, causal, window, alignment, extra = case
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), dtype=dtype, seed=len(name))
    softcap = 2.0 if "softcap" in extra else None
    if softcap:
        q, k = ((t.detach() * 3).requires_grad_() for t in (q, k))
    sinks = (torch.tensor([2.0, -1.0, 0.5, 3.0][:Hq], dtype=dtype, device=q.device)).requires_grad_()
    slopes = torch.tensor([0.3, -0.2])[:Hq].to(q.device) if "alibi" in extra else None
    inputs, names = [q, k, v, sinks], ["q", "k", "v", "sinks"]
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

    def fused(q, k, v, sinks, mask=None):
        return F.attention(q, k, v, attn_mask=mask, dropout_p=p, alibi_slopes=slopes, sinks=sinks,
                           return_lse=return_lse, backend=backend, generator=rng(), **opts)

    def reference(q, k, v, sinks, mask=None):
        seed_offset = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=rng()).tolist()) if p else None
        alibi = None if slopes is None else slopes.to(q.dtype)
        out = R.attention(q, k, v, mask, causal, p, None, seed_offset, window_size=window, alignment=alignment,
                          softcap=softcap, alibi_slopes=alibi, sinks=sinks)
        if not return_lse:
            return out
        return out, R.attention_lse(q, k, mask, causal, window_size=window, alignment=alignment, softcap=softcap,
                                    alibi_slopes=alibi, sinks=sinks)

    return check_against_reference(fused, reference, inputs, names=names)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_sinks_match_reference(device, backend, case):
    """Output, lse (the whole denominator's, sink included) and the gradients of q, k, v, the
    sinks and an additive mask, against the float64 definition."""
    with torch.device(device):
        results = _run_case(backend, torch.float32, case)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASES[1][0], CASES[3][0]])
@pytest.mark.parametrize("device,backend", cases(torch.float16))
def test_sinks_match_reference_float16(device, backend, case):
    with torch.device(device):
        results = _run_case(backend, torch.float16, case, return_lse=False)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_sinks_take_their_share(device, backend):
    """A very negative sink changes nothing; a large one takes most of every row (the output
    shrinks by sigmoid(lse - sink)); rows with no key give zeros and the sink as their lse."""
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 9, 16), (1, 2, 6, 16), (1, 2, 6, 16), requires_grad=False, seed=3)
        opts = dict(causal=True, alignment="bottom_right", backend=backend)
        plain, plain_lse = F.attention(q, k, v, return_lse=True, **opts)
        none = F.attention(q, k, v, sinks=torch.full((2,), -1e4), **opts)
        big, lse = F.attention(q, k, v, sinks=torch.tensor([30.0, 1.0]), return_lse=True, **opts)
    torch.testing.assert_close(none, plain)
    dead = torch.isinf(plain_lse)
    assert bool(dead[0, :, :3].all()) and not bool(dead[0, :, 3:].any())  # Lq - Lk = 3 rows see no key
    assert bool((big[:, :, :3] == 0).all())
    torch.testing.assert_close(lse[0, :, :3], torch.tensor([[30.0] * 3, [1.0] * 3], device=lse.device))
    assert float(big[0, 0].abs().max()) < 1e-6 * float(plain[0, 0].abs().max()) + 1e-9
    factor = torch.sigmoid(plain_lse[0, 1, 3:] - 1.0)
    torch.testing.assert_close(big[0, 1, 3:], plain[0, 1, 3:] * factor[:, None])


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_sinks_merge_over_split_keys_when_given_to_one_part(device, backend):
    """docs/api.md (merge_attention): each part's lse includes the sinks it was given, so split keys
    merge to the whole call's output when one part carries the sinks (and not when every part
    does: they would count once per part)."""
    with torch.device(device):
        q, k, v = make_inputs((2, 2, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), requires_grad=False, seed=4)
        sinks = torch.tensor([1.5, -0.5])
        whole = F.attention(q, k, v, sinks=sinks, backend=backend)
        first = F.attention(q, k[:, :, :3], v[:, :, :3], sinks=sinks, return_lse=True, backend=backend)
        rest = F.attention(q, k[:, :, 3:], v[:, :, 3:], return_lse=True, backend=backend)
        rest_too = F.attention(q, k[:, :, 3:], v[:, :, 3:], sinks=sinks, return_lse=True, backend=backend)
    torch.testing.assert_close(F.merge_attention([first[0], rest[0]], [first[1], rest[1]])[0], whole)
    twice = F.merge_attention([first[0], rest_too[0]], [first[1], rest_too[1]])[0]
    assert not torch.allclose(twice, whole, atol=1e-3)


@pytest.mark.parametrize("device,backend", cases(torch.float32, varlen=True))
def test_varlen_sinks_match_reference(device, backend):
    """Packed sequences (one empty, one with rows that see no key, GQA): every sequence's rows get
    their head's sink; the sinks' gradient sums over the sequences."""
    lens_q, lens_k = [7, 0, 12, 1], [4, 3, 12, 17]
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)  # noqa
    cu_q, cu_k = cu(lens_q), cu(lens_k)
    q, k, v = make_inputs((sum(lens_q), 2, 16), (sum(lens_k), 1, 16), (sum(lens_k), 1, 16), device=device, seed=13)
    sinks = torch.tensor([1.5, -0.5], device=device, requires_grad=True)

    def fused(q, k, v, sinks):
        return F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alignment="bottom_right", sinks=sinks,
                                  return_lse=True, backend=backend)

    def reference(q, k, v, sinks):
        return R.attention_varlen(q, k, v, cu_q, cu_k, True, alignment="bottom_right", sinks=sinks, with_lse=True)

    results = check_against_reference(fused, reference, [q, k, v, sinks], names=["q", "k", "v", "sinks"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_sinks_are_validated():
    q = torch.randn(1, 4, 5, 8)
    with pytest.raises(TypeError, match="sinks must be a torch.Tensor or None, got list"):
        F.attention(q, q, q, sinks=[0.0] * 4)
    with pytest.raises(TypeError, match="sinks must be a floating-point tensor, got int64"):
        F.attention(q, q, q, sinks=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"sinks must have shape \(Hq,\) = \(4,\), got \(1, 4\)"):
        F.attention(q, q, q, sinks=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="sinks is on meta but q is on cpu"):
        F.attention(q, q, q, sinks=torch.zeros(4, device="meta"))
    packed = q[0].transpose(0, 1)
    with pytest.raises(ValueError, match=r"sinks must have shape \(Hq,\) = \(4,\), got \(3,\)"):
        F.attention_varlen(packed, packed, packed, torch.tensor([0, 5]), torch.tensor([0, 5]), sinks=torch.zeros(3))


def test_sinks_compile_fullgraph():
    """Learnable sinks under torch.compile(fullgraph=True): one graph, eager's numbers and gradients."""
    q, k, v = make_inputs((1, 2, 11, 8), (1, 1, 11, 8), (1, 1, 11, 8))
    sinks = torch.tensor([0.5, 2.0], requires_grad=True)

    def fn(q, k, v, sinks):
        return F.attention(q, k, v, causal=True, sinks=sinks).square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, sinks)
    grads = torch.autograd.grad(loss, (q, sinks))
    eager = fn(q, k, v, sinks)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads, torch.autograd.grad(eager, (q, sinks)))
