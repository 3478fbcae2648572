"""FlashAttention's API on fused_attn (``fused_attn.integrations.flash_attn``, ``patch_flash_attn``).

The oracle is written from FlashAttention's documented meaning, not from our wrappers: tensors are
(batch, seqlen, heads, dim), causal / window / ALiBi bottom-right aligned, window (-1, -1) and
softcap 0 off; it is ``reference.attention`` in float64 on the transposed tensors. Every backend of
this machine runs through ``use_backend`` (the wrappers take no ``backend=``).
"""
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_attn
from fused_attn import reference as R
from fused_attn.integrations import flash_attn as FA
from fused_attn.testing import backend_cases, check_against_reference, make_inputs


def cases(op="attention", **options):
    """The CPU backends only: the front-ends are views and argument translation over the
    functional calls, whose GPU cases the core test files run; keeping these off the GPU keeps
    benchmarks/gpu_check.sh's test step within its time."""
    return [c for c in backend_cases(op, torch.float32, **options) if c.values[0] == "cpu"]


def fa_oracle(q, k, v, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None):
    """FlashAttention's flash_attn_func as its docstring defines it, on (B, L, H, D) tensors."""
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    slopes = None if alibi_slopes is None else alibi_slopes.to(q.dtype)
    out = R.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, causal, 0.0, softmax_scale,
                      window_size=window, alignment="bottom_right", softcap=softcap or None, alibi_slopes=slopes)
    return out.transpose(1, 2)


# (B, Lq, Lk, Hq, Hkv, D, Dv, options): odd sizes, Lq < Lk and Lq > Lk (bottom-right dead rows)
FUNC_CASES = [
    dict(id="causal Lq < Lk, GQA", shape=(2, 17, 23, 4, 2, 40, 40), opts=dict(causal=True)),
    dict(id="causal Lq > Lk: dead rows", shape=(1, 23, 17, 2, 2, 16, 16), opts=dict(causal=True)),
    dict(id="one query, Dv != D, scale", shape=(2, 1, 97, 2, 1, 59, 24), opts=dict(softmax_scale=0.3)),
    dict(id="window, softcap, alibi per head", shape=(2, 17, 17, 4, 4, 32, 32),
         opts=dict(causal=True, window_size=(5, 0), softcap=2.0, alibi="head")),
    dict(id="two-sided window, alibi per batch", shape=(2, 9, 14, 2, 1, 16, 16),
         opts=dict(window_size=(3, 2), alibi="batch")),
    dict(id="one side unbounded", shape=(1, 12, 12, 2, 2, 16, 16), opts=dict(window_size=(-1, 2))),
]


def _case_inputs(case, dtype=torch.float32, seed=0):
    B, Lq, Lk, Hq, Hkv, D, Dv = case["shape"]
    q, k, v = make_inputs((B, Lq, Hq, D), (B, Lk, Hkv, D), (B, Lk, Hkv, Dv), dtype=dtype, seed=seed)
    opts = dict(case["opts"])
    alibi = opts.pop("alibi", None)
    if alibi == "head":
        opts["alibi_slopes"] = fused_attn.get_alibi_slopes(Hq)
    elif alibi == "batch":
        opts["alibi_slopes"] = torch.linspace(0.05, 0.6, B * Hq).view(B, Hq)
    return q, k, v, opts


@pytest.mark.parametrize("case", FUNC_CASES, ids=[c["id"] for c in FUNC_CASES])
@pytest.mark.parametrize("device,backend", cases(alibi=True))
def test_flash_attn_func_matches_flashattention_semantics(device, backend, case):
    """Output and the gradients of q, k, v against the float64 oracle; the output is contiguous
    (B, Lq, Hq, Dv), as FlashAttention returns it."""
    q, k, v, opts = _case_inputs(case)
    q, k, v = (t.detach().to(device).requires_grad_() for t in (q, k, v))
    opts = {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in opts.items()}

    def fused(q, k, v):
        with fused_attn.use_backend(backend):
            out = FA.flash_attn_func(q, k, v, **opts)
        assert out.is_contiguous() and out.shape == q.shape[:3] + (v.shape[-1],)
        return out

    results = check_against_reference(fused, lambda q, k, v: fa_oracle(q, k, v, **opts), [q, k, v],
                                      names=["q", "k", "v"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_flash_attn_func_float16():
    q, k, v, opts = _case_inputs(FUNC_CASES[0], dtype=torch.float16)
    results = check_against_reference(lambda q, k, v: FA.flash_attn_func(q, k, v, **opts),
                                      lambda q, k, v: fa_oracle(q, k, v, **opts), [q, k, v])
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_packed_forms_equal_the_unpacked_call_and_stack_the_gradients():
    """qkvpacked / kvpacked give the unpacked call's output bitwise, and the packed tensor's
    gradient is the three (two) gradients stacked in its layout."""
    B, L, H, D = 2, 17, 4, 40
    qkv = torch.randn(B, L, 3, H, D, requires_grad=True)
    out = FA.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(4, 0))
    q, k, v = (qkv.detach()[:, :, i].clone().requires_grad_() for i in range(3))
    ref = FA.flash_attn_func(q, k, v, causal=True, window_size=(4, 0))
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(qkv.grad, torch.stack([q.grad, k.grad, v.grad], dim=2))
    kv = torch.randn(B, 23, 2, 2, D, requires_grad=True)  # grouped-query: 2 kv heads
    q2 = torch.randn(B, L, H, D, requires_grad=True)
    out = FA.flash_attn_kvpacked_func(q2, kv, causal=True)
    k2, v2 = (kv.detach()[:, :, i].clone().requires_grad_() for i in range(2))
    ref = FA.flash_attn_func(q2.detach(), k2, v2, causal=True)
    assert torch.equal(out, ref)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(kv.grad, torch.stack([k2.grad, v2.grad], dim=2))


def _packed(lengths_q, lengths_k, Hq, Hkv, D, seed=0):
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).int()
    q, k, v = make_inputs((int(cu_q[-1]), Hq, D), (int(cu_k[-1]), Hkv, D), (int(cu_k[-1]), Hkv, D), seed=seed)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("device,backend", cases(varlen=True, alibi=True))
def test_varlen_is_flash_attn_func_per_sequence(device, backend):
    """Each packed sequence gives what flash_attn_func gives on it alone (bottom-right per sequence),
    lse included; the varlen qkv- and kv-packed forms give the same output."""
    lq, lk = [1, 17, 0, 9], [5, 17, 3, 4]
    q, k, v, cu_q, cu_k = _packed(lq, lk, 4, 2, 24)
    q, k, v, cu_q, cu_k = (t.detach().to(device) for t in (q, k, v, cu_q, cu_k))
    slopes = torch.linspace(0.1, 0.5, 4 * 4, device=device).view(4, 4)
    opts = dict(causal=True, softcap=3.0, alibi_slopes=slopes)
    with fused_attn.use_backend(backend):
        out, lse, s_dmask = FA.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), return_attn_probs=True,
                                                      **opts)
        assert s_dmask.numel() == 0 and lse.shape == (4, q.shape[0])  # FlashAttention's: empty without dropout
        for s in range(4):
            qs, ks, vs = q[cu_q[s]:cu_q[s + 1]], k[cu_k[s]:cu_k[s + 1]], v[cu_k[s]:cu_k[s + 1]]
            alone, alone_lse, _ = FA.flash_attn_func(qs[None], ks[None], vs[None], return_attn_probs=True,
                                                     **dict(opts, alibi_slopes=slopes[s:s + 1]))
            torch.testing.assert_close(out[cu_q[s]:cu_q[s + 1]], alone[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(lse[:, cu_q[s]:cu_q[s + 1]], alone_lse[0], rtol=1e-5, atol=1e-6)
        qkv_q, _, _, cu, _ = _packed(lq, lq, 2, 2, 16, seed=1)
        qkv = torch.stack([qkv_q, qkv_q.flip(0), qkv_q * 0.5], dim=1).detach().to(device)
        cu = cu.to(device)
        torch.testing.assert_close(FA.flash_attn_varlen_qkvpacked_func(qkv, cu, max(lq), causal=True),
                                   FA.flash_attn_varlen_func(*qkv.unbind(1), cu, cu, max(lq), max(lq), causal=True),
                                   rtol=0, atol=0)
        kv = torch.stack([k, v], dim=1)
        torch.testing.assert_close(FA.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, max(lq), max(lk), **opts),
                                   out, rtol=0, atol=0)


def test_return_attn_probs_gives_the_dropout_pattern():
    """With dropout, S_dmask holds the probabilities with the dropped ones negated: the output is
    exactly dropout(P) v rebuilt from it, so the mask is the one the kernel used; lse is the
    row log-sum-exp of the oracle's logits."""
    torch.manual_seed(0)
    q, k, v, opts = _case_inputs(FUNC_CASES[0])
    q, k, v = (t.detach() for t in (q, k, v))
    p = 0.3
    out, lse, s_dmask = FA.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **opts)
    assert s_dmask.shape == (2, 4, 17, 23)
    dropped = ((s_dmask < 0).sum() / (s_dmask != 0).sum()).item()  # among the probabilities not masked
    assert 0.25 < dropped < 0.35
    kept = s_dmask.clamp(min=0) / (1 - p)
    vh = v.transpose(1, 2).repeat_interleave(2, dim=1)
    rebuilt = (kept @ vh).transpose(1, 2)
    torch.testing.assert_close(out, rebuilt, rtol=1e-4, atol=1e-5)
    ref_lse = R.attention_lse(q.transpose(1, 2).double(), k.transpose(1, 2).double(), causal=True,
                              alignment="bottom_right")
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    probs = s_dmask.abs()  # rows sum to one (every row sees a key here)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 17), rtol=1e-5, atol=1e-5)
    # the varlen form: per sequence, padded to (B, H, max_seqlen_q, max_seqlen_k)
    lq, lk = [3, 7], [5, 7]
    qp, kp, vp, cu_q, cu_k = (t.detach() for t in _packed(lq, lk, 2, 2, 16))
    out, _, s_dmask = FA.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 7, 7, dropout_p=p, causal=True,
                                                return_attn_probs=True)
    assert s_dmask.shape == (2, 2, 7, 7)
    for s in range(2):
        P = s_dmask[s, :, :lq[s], :lk[s]].clamp(min=0) / (1 - p)
        rebuilt = (P @ vp[cu_k[s]:cu_k[s + 1]].transpose(0, 1)).transpose(0, 1)
        torch.testing.assert_close(out[cu_q[s]:cu_q[s + 1]], rebuilt, rtol=1e-4, atol=1e-5)
        assert not s_dmask[s, :, lq[s]:].any() and not s_dmask[s, :, :, lk[s]:].any()


def test_dropout_draws_from_torch_seed():
    q, k, v, _ = _case_inputs(FUNC_CASES[0])
    torch.manual_seed(3)
    a = FA.flash_attn_func(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = FA.flash_attn_func(q, k, v, dropout_p=0.5)
    c = FA.flash_attn_func(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("device,backend", cases(varlen=True))
def test_with_kvcache_is_attention_with_kvcache(device, backend):
    """flash_attn_with_kvcache is attention_with_kvcache with FlashAttention's defaults: rotary
    pairs interleaved, window (-1, -1) off; cache_seqlens=None reads the whole cache."""
    B, Lmax, Hq, Hkv, D = 2, 20, 4, 2, 32
    q, k, v, kc, vc = make_inputs((B, 1, Hq, D), (B, 1, Hkv, D), (B, 1, Hkv, D), (B, Lmax, Hkv, D), (B, Lmax, Hkv, D),
                                  requires_grad=False, device=device, seed=4)
    angles = torch.outer(torch.arange(32.0), 1.0 / 100.0 ** (torch.arange(8) / 8)).to(device)
    cos, sin = angles.cos(), angles.sin()
    seqlens = torch.tensor([3, 11], dtype=torch.int32, device=device)
    pads = torch.tensor([1, 0], dtype=torch.int32, device=device)
    kc2, vc2 = kc.clone(), vc.clone()
    with fused_attn.use_backend(backend):
        out, lse = FA.flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, cache_seqlens=seqlens, cache_leftpad=pads,
                                              causal=True, return_softmax_lse=True, num_splits=4)
        ref, ref_lse = fused_attn.attention_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=seqlens,
                                                         cache_leftpad=pads, rotary_cos=cos, rotary_sin=sin,
                                                         rotary_interleaved=True, causal=True, return_lse=True)
        assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
        assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
        whole = FA.flash_attn_with_kvcache(q, kc, vc)
        torch.testing.assert_close(whole, fa_oracle(q, kc, vc), rtol=1e-5, atol=1e-5)


def test_with_kvcache_bad_input():
    q, kc, vc, k, v = make_inputs((1, 1, 2, 8), (1, 9, 2, 8), (1, 9, 2, 8), (1, 1, 2, 8), (1, 1, 2, 8),
                                  requires_grad=False)
    with pytest.raises(ValueError, match="cache_seqlens is needed with new k and v"):
        FA.flash_attn_with_kvcache(q, kc, vc, k, v)
    with pytest.raises(ValueError, match="num_splits must be an int >= 0"):
        FA.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=2, num_splits=-1)
    with pytest.raises(TypeError, match="window_size must be a pair"):  # (a TypeError, as attention's)
        FA.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=2, window_size=3)


@pytest.mark.parametrize("call,error,match", [
    (lambda q, k, v: FA.flash_attn_func(q, k, v, window_size=(1, 2, 3)), TypeError, "window_size must be a pair"),
    (lambda q, k, v: FA.flash_attn_func(q, k, v, window_size=3), TypeError, "window_size must be a pair"),
    (lambda q, k, v: FA.flash_attn_func(q, k, v, softcap=None), TypeError, "softcap must be a float"),
    (lambda q, k, v: FA.flash_attn_func(q, k, v, deterministic=1), TypeError, "deterministic must be a bool"),
    (lambda q, k, v: FA.flash_attn_func(q, k, v, return_attn_probs="yes"), TypeError,
     "return_attn_probs must be a bool"),
    (lambda q, k, v: FA.flash_attn_func(q[0], k, v), ValueError, r"q must be a 4-D \(batch, seqlen, heads, dim\)"),
    (lambda q, k, v: FA.flash_attn_func(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
    # (under FlashAttention's name: the errors said scale, attention's name)
    (lambda q, k, v: FA.flash_attn_func(q, k, v, softmax_scale=float("nan")), ValueError,
     "^softmax_scale must be a finite float or None, got nan"),
    (lambda q, k, v: FA.flash_attn_kvpacked_func(q, torch.stack([k, v], 2), softmax_scale="1"), TypeError,
     "^softmax_scale must be a finite float or None, got str"),
    (lambda q, k, v: FA.flash_attn_with_kvcache(q, k, v, cache_seqlens=2, softmax_scale=float("inf")), ValueError,
     "^softmax_scale must be a finite float or None, got inf"),
    (lambda q, k, v: FA.flash_attn_with_kvcache(q, k, v, cache_seqlens=2, num_splits=1.0), TypeError,
     "^num_splits must be an int >= 0"),
    (lambda q, k, v: FA.flash_attn_qkvpacked_func(q), ValueError, r"qkv must have shape \(B, L, 3, H, D\)"),
    (lambda q, k, v: FA.flash_attn_kvpacked_func(q, k), ValueError, r"kv must have shape \(B, L, 2, Hkv, D\)"),
    (lambda q, k, v: FA.flash_attn_varlen_qkvpacked_func(q[:, None], None, 3), ValueError,
     r"qkv must have shape \(total, 3, H, D\)"),
])
def test_bad_input_names_the_argument(call, error, match):
    q, k, v = make_inputs((1, 3, 2, 8), (1, 3, 2, 8), (1, 3, 2, 8), requires_grad=False)
    with pytest.raises(error, match=match):
        call(q, k, v)


def test_softmax_scale_is_named_so_under_torch_compile_too():
    """The stand-in checked softmax_scale only in eager mode: traced, attention's own check named
    it scale."""
    q = torch.randn(1, 3, 2, 8)
    compiled = torch.compile(lambda q: FA.flash_attn_func(q, q, q, softmax_scale=float("nan")), fullgraph=True,
                             backend="eager")
    with pytest.raises(Exception, match="softmax_scale must be a finite float or None, got nan"):
        compiled(q)


@pytest.mark.parametrize("call,error,match", [
    # (-1.0, -1.0) was taken as "off"; upstream's C++ binding takes ints only
    (lambda: FA.flash_attn_func(*[torch.randn(1, 3, 2, 8)] * 3, window_size=(-1.0, -1.0)), TypeError,
     r"window_size must be a pair of ints \(left, right\), -1 for an unbounded side, got \(-1.0, -1.0\)"),
    (lambda: FA.flash_attn_with_kvcache(torch.randn(1, 1, 2, 8), *[torch.zeros(1, 4, 2, 8)] * 2, cache_seqlens=2,
                                        window_size=(-1.0, -1.0)), TypeError, "window_size must be a pair of ints"),
    # base 0 or below gave NaN angles silently (as an int too large for a float: OverflowError)
    (lambda: FA.RotaryEmbedding(8, base=0), ValueError, "base must be a finite number > 0 .* got 0"),
    (lambda: FA.RotaryEmbedding(8, base=-1.0), ValueError, "base must be a finite number > 0 .* got -1.0"),
    (lambda: FA.RotaryEmbedding(8, base=float("inf")), ValueError, "base must be a finite number > 0"),
    (lambda: FA.RotaryEmbedding(8, base=10**400), ValueError, "base must be a finite number > 0 .* an int of"),
    (lambda: FA.RotaryEmbedding(8, base="1e4"), TypeError, "base must be a finite number > 0, got str"),
    (lambda: FA.RotaryEmbedding(8, interleaved="x"), TypeError, "interleaved must be a bool, got str 'x'"),
    (lambda: FA.RotaryEmbedding(8, pos_idx_in_fp32="x"), TypeError, "pos_idx_in_fp32 must be a bool, got str"),
    (lambda: FA.flash_attn_with_kvcache(torch.randn(1, 1, 2, 8), torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8),
                                        cache_seqlens=1, rotary_interleaved=1), TypeError,
     "rotary_interleaved must be a bool, got int 1"),
    # float indices were truncated by .long() (upstream's indexing refuses them)
    (lambda: FA.pad_input(torch.randn(3, 4), torch.tensor([0.0, 2.5, 3.0]), 2, 2), TypeError,
     r"indices must be an integer tensor \(int64, .* or int32\), got torch.float32"),
    (lambda: FA.index_first_axis(torch.randn(3, 4), torch.tensor([True, False, True])), TypeError,
     "indices must be an integer tensor"),
])
def test_options_upstream_refuses_are_refused(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_flash_attn_func_compiles_without_graph_breaks():
    q, k, v, opts = _case_inputs(FUNC_CASES[3])
    compiled = torch.compile(lambda q, k, v: FA.flash_attn_func(q, k, v, **opts), fullgraph=True,
                             backend="aot_eager")
    out = compiled(q, k, v)
    torch.testing.assert_close(out, FA.flash_attn_func(q, k, v, **opts))
    out.sum().backward()
    assert q.grad is not None


# --- layers.rotary -----------------------------------------------------------------------------

def _tables(rows=40, half=8):
    angles = torch.outer(torch.arange(float(rows)), 1.0 / 100.0 ** (torch.arange(half) / half))
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_qkv_and_kv_in_place(interleaved):
    """apply_rotary_emb_qkv_ turns q and k (v untouched) in place, as apply_rotary_emb would; the
    grouped-query form (Hq + 2 Hkv heads) and apply_rotary_emb_kv_ likewise."""
    cos, sin = _tables()
    qkv = torch.randn(2, 17, 3, 4, 24)
    before = qkv.clone()
    assert FA.apply_rotary_emb_qkv_(qkv, cos, sin, interleaved=interleaved, seqlen_offsets=5) is qkv
    for i in range(2):
        assert torch.equal(qkv[:, :, i], FA.apply_rotary_emb(before[:, :, i], cos, sin, interleaved, False, 5))
    assert torch.equal(qkv[:, :, 2], before[:, :, 2])
    gqa = torch.randn(2, 17, 4 + 2 * 2, 24)
    before = gqa.clone()
    cos_k, sin_k = _tables(rows=30)
    FA.apply_rotary_emb_qkv_(gqa, cos, sin, cos_k, sin_k, interleaved=interleaved, num_heads_q=4)
    assert torch.equal(gqa[:, :, :4], FA.apply_rotary_emb(before[:, :, :4], cos, sin, interleaved))
    assert torch.equal(gqa[:, :, 4:6], FA.apply_rotary_emb(before[:, :, 4:6], cos_k, sin_k, interleaved))
    assert torch.equal(gqa[:, :, 6:], before[:, :, 6:])
    kv = torch.randn(2, 17, 2, 2, 24)
    before = kv.clone()
    FA.apply_rotary_emb_kv_(kv, cos, sin, interleaved=interleaved)
    assert torch.equal(kv[:, :, 0], FA.apply_rotary_emb(before[:, :, 0], cos, sin, interleaved))
    assert torch.equal(kv[:, :, 1], before[:, :, 1])


def test_rotary_in_place_writes_bump_the_version_counter():
    """Every in-place rotary of the stand-in (apply_rotary_emb_qkv_, apply_rotary_emb_kv_,
    RotaryEmbedding with qkv or with q and kv) on a tensor another op saved: torch's "modified by
    an inplace operation" at backward, as x.mul_() gives. kv's write (through the kernel's data
    pointer, grad mode off or no gradient wanted) left its version as it was: a wrong gradient."""
    cos, sin = _tables()
    rope = FA.RotaryEmbedding(8)
    calls = [(torch.randn(2, 9, 3, 2, 16), lambda qkv: FA.apply_rotary_emb_qkv_(qkv, cos, sin)),
             (torch.randn(2, 9, 2, 2, 16), lambda kv: FA.apply_rotary_emb_kv_(kv, cos, sin)),
             (torch.randn(2, 9, 3, 2, 16), rope),
             (torch.randn(2, 9, 2, 2, 16), lambda kv: rope(torch.randn(2, 9, 2, 16), kv))]
    for saved, call in calls:
        w = torch.randn(saved.shape, requires_grad=True)
        loss = (saved * w).sum()  # mul saves the tensor for w's gradient
        call(saved)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("interleaved", [False, True])
def test_ops_triton_rotary_apply_rotary(interleaved):
    """flash_attn.ops.triton.rotary.apply_rotary: apply_rotary_emb's rotation (dense with per-sequence
    offsets, packed with cu_seqlens, in place returning x); conjugate=True is the inverse rotation,
    so it undoes the forward one; a non-bool conjugate is refused."""
    angles = torch.outer(torch.arange(40.0, dtype=torch.float64), torch.rand(8, dtype=torch.float64))
    cos, sin = angles.cos(), angles.sin()  # (float64: with float32 tables cos^2 + sin^2 = 1 to 1e-7 only)
    x = torch.randn(2, 17, 3, 24, dtype=torch.float64)
    offsets = torch.tensor([0, 5])
    turned = FA.apply_rotary(x, cos, sin, offsets, interleaved=interleaved)
    assert torch.equal(turned, FA.apply_rotary_emb(x, cos, sin, interleaved, False, offsets))
    assert not torch.equal(turned, x)
    back = FA.apply_rotary(turned, cos, sin, offsets, interleaved=interleaved, conjugate=True)
    torch.testing.assert_close(back, x, rtol=1e-12, atol=1e-12)
    packed, cu = x[0, :11], torch.tensor([0, 4, 11], dtype=torch.int32)
    expected = torch.cat([FA.apply_rotary_emb(packed[None, :4], cos, sin, interleaved)[0],
                          FA.apply_rotary_emb(packed[None, 4:], cos, sin, interleaved)[0]])
    torch.testing.assert_close(FA.apply_rotary(packed, cos, sin, cu_seqlens=cu, max_seqlen=7,
                                               interleaved=interleaved), expected, rtol=0, atol=0)
    y = x.clone()
    assert FA.apply_rotary(y, cos, sin, offsets, interleaved=interleaved, inplace=True, conjugate=True) is y
    assert torch.equal(y, FA.apply_rotary_emb(x, cos, -sin, interleaved, False, offsets))
    with pytest.raises(TypeError, match=r"conjugate must be a bool \(True: the inverse rotation\), got 1 \(int\)"):
        FA.apply_rotary(x, cos, sin, conjugate=1)


def test_rotary_qkv_bad_input():
    cos, sin = _tables()
    with pytest.raises(ValueError, match="needs num_heads_q"):
        FA.apply_rotary_emb_qkv_(torch.randn(1, 3, 6, 16), cos, sin)
    with pytest.raises(ValueError, match="no even number of key and value heads"):
        FA.apply_rotary_emb_qkv_(torch.randn(1, 3, 7, 16), cos, sin, num_heads_q=4)
    with pytest.raises(ValueError, match=r"kv must have shape \(B, L, 2, Hkv, D\)"):
        FA.apply_rotary_emb_kv_(torch.randn(1, 3, 3, 2, 16), cos, sin)


# --- ops.triton.layer_norm ----------------------------------------------------------------------

def fa_norm_oracle(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                   is_rms_norm=False, zero_centered_weight=False):
    """FlashAttention's layer_norm_ref: norm(x + residual), the sum returned with prenorm."""
    if zero_centered_weight:
        weight = weight + 1
    summed = x if residual is None else x + residual
    if residual_in_fp32:
        summed = summed.float() if summed.dtype != torch.float64 else summed
    if is_rms_norm:
        y = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + eps) * weight
        y = y if bias is None else y + bias
    else:
        y = torch.nn.functional.layer_norm(summed, summed.shape[-1:], weight, bias, eps)
    y = y.to(x.dtype)
    return (y, summed) if prenorm else y


@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm_fn", "rms_norm_fn"])
@pytest.mark.parametrize("prenorm,zero_centered", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("device,backend", cases("layer_norm_residual"))
def test_layer_norm_fn_matches_flashattention_semantics(device, backend, rms, prenorm, zero_centered):
    x, res, w, b = make_inputs((3, 7, 97), (3, 7, 97), (97,), (97,), device=device, seed=2)
    opts = dict(eps=1e-6, prenorm=prenorm, zero_centered_weight=zero_centered)
    bias = None if rms else b

    def fused(x, res, w, b):
        with fused_attn.use_backend(backend):
            fn = FA.rms_norm_fn if rms else FA.layer_norm_fn
            return fn(x, w, None if rms else b, res, **opts)

    def ref(x, res, w, b):
        return fa_norm_oracle(x, w, None if rms else b, res, is_rms_norm=rms, **opts)

    inputs = [x, res, w, b] if bias is not None else [x, res, w, b.detach()]
    results = check_against_reference(fused, ref, inputs, names=["x", "residual", "weight", "bias"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_layer_norm_fn_residual_in_fp32_out_dtype_and_dropout_mask():
    x, res, w = make_inputs((4, 64), (4, 64), (64,), dtype=torch.float16, requires_grad=False, seed=5)
    y, summed = FA.rms_norm_fn(x, w, None, res.float(), prenorm=True, residual_in_fp32=True, out_dtype=torch.float32)
    assert y.dtype == torch.float32 and summed.dtype == torch.float32
    torch.testing.assert_close(summed, x.float() + res.float())
    p = 0.25
    y, summed, mask, mask1 = FA.layer_norm_fn(x.float(), w.float(), None, res.float(), dropout_p=p, prenorm=True,
                                              return_dropout_mask=True)
    assert mask.dtype == torch.bool and mask.shape == x.shape and mask1 is None
    assert 0.1 < 1 - mask.float().mean().item() < 0.4
    torch.testing.assert_close(summed, x.float() * mask / (1 - p) + res.float())  # the mask that was used
    y, mask, mask1 = FA.layer_norm_fn(x.float(), w.float(), None, return_dropout_mask=True)
    assert mask is None and mask1 is None


@pytest.mark.parametrize("name", ["x1", "weight1", "bias1", "rowscale", "out", "residual_out"])
def test_layer_norm_fn_refuses_what_has_no_kernel(name):
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match=f"{name} is not supported by fused_attn's layer_norm_fn"):
        FA.layer_norm_fn(x, w, None, **{name: torch.ones(2, 8)})


def test_rms_norm_module():
    norm = FA.RMSNorm(40, eps=1e-5)
    x, res = torch.randn(3, 40), torch.randn(3, 40)
    assert torch.equal(norm.weight, torch.ones(40)) and norm.bias is None
    out, summed = norm(x, res, prenorm=True)
    torch.testing.assert_close(out, fa_norm_oracle(x, norm.weight, None, res, eps=1e-5, is_rms_norm=True))
    centered = FA.RMSNorm(40, zero_centered_weight=True)
    assert torch.equal(centered.weight, torch.zeros(40))
    torch.testing.assert_close(centered(x), fa_norm_oracle(x, torch.ones(40), None, eps=1e-5, is_rms_norm=True))


# --- bert_padding, and code written against FlashAttention --------------------------------------

def test_unpad_pad_round_trip():
    hidden = torch.randn(3, 6, 8, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    packed, indices, cu, max_len, used = FA.unpad_input(hidden, mask)
    assert cu.tolist() == [0, 3, 9, 11] and max_len == 6 and used.tolist() == [3, 6, 2]
    assert cu.dtype == torch.int32 and torch.equal(packed, hidden.flatten(0, 1)[mask.flatten().bool()])
    back = FA.pad_input(packed, indices, 3, 6)
    assert torch.equal(back, hidden * mask[..., None])
    back.sum().backward()
    assert torch.equal(hidden.grad, mask[..., None].float().expand(3, 6, 8))
    unused = torch.tensor([[0, 0, 0, 1, 0, 0], [0] * 6, [0] * 6])
    _, _, cu, max_len, used = FA.unpad_input(hidden, mask, unused)
    assert cu.tolist() == [0, 4, 10, 12] and used.tolist() == [3, 6, 2]


def test_padded_batch_through_varlen_is_masked_sdpa():
    """The FlashAttention-2 pattern of Hugging Face models, written against flash_attn: unpad,
    flash_attn_varlen_func, pad; equal to torch's SDPA with the padding mask (right-padded batch)."""
    B, L, H, D = 3, 11, 2, 16
    q, k, v = (torch.randn(B, L, H, D) for _ in range(3))
    mask = (torch.arange(L)[None] < torch.tensor([11, 4, 7])[:, None]).long()
    q_u, idx, cu, max_len, _ = FA.unpad_input(q, mask)
    k_u, v_u = FA.unpad_input(k, mask)[0], FA.unpad_input(v, mask)[0]
    out = FA.pad_input(FA.flash_attn_varlen_func(q_u, k_u, v_u, cu, cu, max_len, max_len, causal=True), idx, B, L)
    keep = mask.bool()[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=keep).transpose(1, 2)
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-5, atol=1e-5)
    assert not out[~valid].any()


# --- patch_flash_attn ---------------------------------------------------------------------------

def test_patch_flash_attn_serves_the_imports_and_undoes():
    assert "flash_attn" not in sys.modules
    with fused_attn.patch_flash_attn():
        import flash_attn
        from flash_attn import flash_attn_func
        from flash_attn.bert_padding import unpad_input
        from flash_attn.flash_attn_interface import flash_attn_varlen_func
        from flash_attn.layers.rotary import apply_rotary_emb
        from flash_attn.ops.triton.layer_norm import RMSNorm, rms_norm_fn
        from flash_attn.ops.triton.rotary import apply_rotary
        import flash_attn.ops.triton.layer_norm as ln

        assert flash_attn_func is FA.flash_attn_func and flash_attn_varlen_func is FA.flash_attn_varlen_func
        assert apply_rotary_emb is fused_attn.apply_rotary_emb and unpad_input is FA.unpad_input
        assert ln.rms_norm_fn is rms_norm_fn and RMSNorm is FA.RMSNorm and apply_rotary is FA.apply_rotary
        assert flash_attn.__version__.startswith("2.8")
        with pytest.raises(AttributeError, match="fused_attn.s stand-in"):
            flash_attn.flash_attn_unpadded_func  # noqa: B018 (FlashAttention 1's name: not provided)
        with pytest.raises(ImportError):
            from flash_attn.layers.rotary import ApplyRotaryEmb  # noqa: F401 (FlashAttention's Function class)
    assert not any(name == "flash_attn" or name.startswith("flash_attn.") for name in sys.modules)


def test_patch_flash_attn_does_not_shadow_an_installed_flash_attn(monkeypatch):
    import types

    real = types.ModuleType("flash_attn")
    real.__version__ = "2.8.3"
    monkeypatch.setitem(sys.modules, "flash_attn", real)
    with pytest.raises(RuntimeError, match="flash_attn is installed"):
        fused_attn.patch_flash_attn()
    with fused_attn.patch_flash_attn(force=True):
        import flash_attn

        assert flash_attn is not real
    assert sys.modules["flash_attn"] is real


def test_code_written_for_flash_attn_runs_in_a_fresh_process():
    """A script that imports flash_attn and uses it as a FlashAttention user would, after one
    ``fused_attn.patch_flash_attn()``: runs on this CPU-only machine."""
    script = textwrap.dedent("""
        import torch, fused_attn
        fused_attn.patch_flash_attn()
        from flash_attn import flash_attn_func, flash_attn_with_kvcache
        from flash_attn.ops.triton.layer_norm import rms_norm_fn
        q = torch.randn(1, 5, 2, 16); kc = torch.zeros(1, 8, 2, 16); vc = torch.zeros(1, 8, 2, 16)
        out = flash_attn_func(q, q, q, causal=True)
        step = flash_attn_with_kvcache(q[:, :1], kc, vc, q[:, :1], q[:, :1], cache_seqlens=0, causal=True)
        assert torch.allclose(step, q[:, :1]) and torch.equal(kc[:, 0], q[:, 0])
        y = rms_norm_fn(out, torch.ones(16), None, residual=out, prenorm=True)
        print("ok", tuple(out.shape), type(y).__name__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok (1, 5, 2, 16) tuple"


def test_layer_norm_fn_mixed_dtypes_as_flashattention():
    """float32 weight, bias and residual with a float16 x (mixed precision): y in x's dtype,
    residual_out in the residual's; a float16 residual keeps float16 even with residual_in_fp32
    (FlashAttention's rule: the flag only speaks when there is no residual)."""
    x, res, w, b = make_inputs((4, 96), (4, 96), (96,), (96,), requires_grad=False, seed=9)
    xh = x.half()
    y, summed = FA.layer_norm_fn(xh, w, b, res, prenorm=True)
    assert y.dtype == torch.float16 and summed.dtype == torch.float32
    expected = torch.nn.functional.layer_norm(xh.float() + res, (96,), w.half().float(), b.half().float(), 1e-6)
    torch.testing.assert_close(y.float(), expected, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(summed, xh.float() + res)
    y, summed = FA.rms_norm_fn(xh, w, None, res.half(), prenorm=True, residual_in_fp32=True)
    assert summed.dtype == torch.float16
    y, summed = FA.rms_norm_fn(xh, w, None, None, prenorm=True, residual_in_fp32=True)
    assert summed.dtype == torch.float32 and torch.equal(summed, xh.float())
    w16 = w.clone().requires_grad_()
    FA.rms_norm_fn(xh, w16, None).float().sum().backward()
    assert w16.grad.dtype == torch.float32 and w16.grad.isfinite().all()


def test_rms_norm_module_dropout_attribute():
    norm = FA.RMSNorm(16, dropout_p=0.1)
    assert isinstance(norm.drop, torch.nn.Dropout) and norm.drop.p == 0.1
    assert FA.RMSNorm(16).drop is None


@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_embedding_module(interleaved):
    """FlashAttention's RotaryEmbedding: turns q and k of qkv in place (v untouched) with the
    angles t * base^(-2i/dim) over the first dim features; with kv, q and kv's k; offsets."""
    B, L, H, D, dim = 2, 9, 2, 16, 8
    rope = FA.RotaryEmbedding(dim, base=500.0, interleaved=interleaved)
    angles = torch.outer(torch.arange(40.0), 1.0 / 500.0 ** (torch.arange(0, dim, 2) / dim))
    cos, sin = angles.cos(), angles.sin()
    qkv = torch.randn(B, L, 3, H, D)
    before = qkv.clone()
    assert rope(qkv, seqlen_offset=3) is qkv
    for i in range(2):
        expected = fused_attn.apply_rotary_emb(before[:, :, i], cos, sin, interleaved, seqlen_offsets=3)
        torch.testing.assert_close(qkv[:, :, i], expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv[:, :, 2], before[:, :, 2])
    q, kv = torch.randn(B, L, H, D), torch.randn(B, L, 2, H, D)
    q0, kv0 = q.clone(), kv.clone()
    offsets = torch.tensor([0, 5])
    q_out, kv_out = rope(q, kv, seqlen_offset=offsets, max_seqlen=20)
    assert q_out is q and kv_out is kv
    torch.testing.assert_close(q, fused_attn.apply_rotary_emb(q0, cos, sin, interleaved, seqlen_offsets=offsets),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(kv[:, :, 0], fused_attn.apply_rotary_emb(kv0[:, :, 0], cos, sin, interleaved,
                                                                        seqlen_offsets=offsets), rtol=1e-6, atol=1e-6)
    assert torch.equal(kv[:, :, 1], kv0[:, :, 1])
    with pytest.raises(ValueError, match="xPos"):
        FA.RotaryEmbedding(dim, scale_base=512)


def test_rotate_half_and_the_torch_rotary():
    """apply_rotary_emb_torch is x cos + rotate_half(x) sin over the turned features (tables
    repeated to the pairs' layout) and equals the fused op."""
    x = torch.randn(2, 7, 3, 12)
    angles = torch.outer(torch.arange(7.0), torch.rand(4))
    cos, sin = angles.cos(), angles.sin()
    for interleaved in (False, True):
        rep = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: torch.cat([t, t], -1))
        c, s_ = rep(cos)[:, None], rep(sin)[:, None]
        turned = x[..., :8] * c + FA.rotate_half(x[..., :8], interleaved) * s_
        expected = torch.cat([turned, x[..., 8:]], -1)
        torch.testing.assert_close(FA.apply_rotary_emb_torch(x, cos, sin, interleaved), expected)
        torch.testing.assert_close(FA.apply_rotary_emb_func(x, cos, sin, interleaved), expected, rtol=1e-6, atol=1e-6)


def test_unpad_input_for_concatenated_sequences():
    """FlashAttention's example: rows [2, 3], [3, 2], [6]: five samples, each its own sequence."""
    hidden = torch.randn(3, 6, 4)
    lengths = torch.tensor([[2, 3, 0, 0, 0, 0], [3, 2, 0, 0, 0, 0], [6, 0, 0, 0, 0, 0]])
    packed, indices, cu, max_len = FA.unpad_input_for_concatenated_sequences(hidden, lengths)
    assert cu.tolist() == [0, 2, 5, 8, 10, 16] and max_len == 6 and cu.dtype == torch.int32
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
    assert torch.equal(packed, hidden.flatten(0, 1)[indices])


def test_refused_rotary_calls_change_nothing_and_bad_head_counts_raise():
    cos, sin = _tables()
    qkv = torch.randn(1, 5, 3, 2, 16)
    before = qkv.clone()
    with pytest.raises(ValueError):
        FA.apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=cos[:3], sin_k=sin[:3])  # k's tables too short
    assert torch.equal(qkv, before)
    q = torch.randn(1, 5, 2, 16)
    q_before = q.clone()
    with pytest.raises(ValueError, match=r"kv must have shape \(B, L, 2, Hkv, D\)"):
        FA.RotaryEmbedding(16)(q, torch.randn(1, 5, 3, 2, 16))
    assert torch.equal(q, q_before)
    # a leaf that requires grad: torch's in-place error before anything is written (k was turned, q not)
    leaf = torch.randn(1, 5, 3, 2, 16, requires_grad=True)
    leaf_before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad is being used in an in-place"):
        FA.apply_rotary_emb_qkv_(leaf, cos, sin)
    assert torch.equal(leaf.detach(), leaf_before)
    # RotaryEmbedding with kv: q was turned in place before kv was refused (its positions, or a leaf)
    for kv in (torch.randn(1, 7, 2, 2, 16), torch.randn(1, 5, 2, 2, 16, requires_grad=True)):
        kv_before = kv.detach().clone()
        with pytest.raises((ValueError, RuntimeError)):
            FA.RotaryEmbedding(16)(q, kv)
        assert torch.equal(q, q_before) and torch.equal(kv.detach(), kv_before)
    kv = torch.randn(1, 5, 2, 2, 16)
    kv_before = kv.clone()
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad is being used in an in-place"):
        FA.RotaryEmbedding(16)(q.clone().requires_grad_(), kv)  # (q's write refused before kv's)
    assert torch.equal(kv, kv_before)
    # so are q's other refusals (kv was turned, then q's write raised inside torch's copy_)
    with torch.inference_mode():
        inference_q = torch.randn(1, 5, 2, 16)
    for bad_q, error, match in ((torch.randn(1, 5, 1, 16).expand(1, 5, 2, 16), ValueError,
                                 "inplace=True writes into qkv, whose elements overlap"),
                                (inference_q, RuntimeError, "Inplace update to inference tensor")):
        with pytest.raises(error, match=match):
            FA.RotaryEmbedding(16)(bad_q, kv)
        assert torch.equal(kv, kv_before)
    gqa = torch.randn(1, 5, 6, 16)
    for bad, error in ((-2, ValueError), (0, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_heads_q must be an int >= 1"):
            FA.apply_rotary_emb_qkv_(gqa, cos, sin, num_heads_q=bad)
    rope = FA.RotaryEmbedding(16)
    import numpy as np
    out = rope(torch.randn(1, 5, 3, 2, 16), seqlen_offset=np.int64(2))  # numpy ints are ints
    assert out.shape == (1, 5, 3, 2, 16)


def test_same_seed_same_dropout_with_or_without_the_probabilities():
    q, k, v, _ = _case_inputs(FUNC_CASES[0])
    q, k, v = (t.detach() for t in (q, k, v))
    torch.manual_seed(11)
    plain = FA.flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
    after_plain = torch.random.get_rng_state()
    torch.manual_seed(11)
    out, _, s_dmask = FA.flash_attn_func(q, k, v, dropout_p=0.3, causal=True, return_attn_probs=True)
    assert torch.equal(out, plain) and torch.equal(torch.random.get_rng_state(), after_plain)
    x, res = torch.randn(3, 16), torch.randn(3, 16)
    torch.manual_seed(12)
    y = FA.layer_norm_fn(x, torch.ones(16), None, res, dropout_p=0.5)
    torch.manual_seed(12)
    y2, mask, _ = FA.layer_norm_fn(x, torch.ones(16), None, res, dropout_p=0.5, return_dropout_mask=True)
    assert torch.equal(y, y2) and mask.dtype == torch.bool


def test_front_end_input_checks():
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor, got list"):
        FA.flash_attn_func([1], q, q)
    with pytest.raises(TypeError, match="out_dtype must be a floating torch.dtype"):
        FA.layer_norm_fn(torch.randn(2, 8), torch.ones(8), None, out_dtype="float16")
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        FA.unpad_input(torch.randn(2, 3, 4), [[1, 1, 0], [1, 0, 0]])
    hidden = torch.arange(15.0).view(3, 5, 1)
    for bad, match in ((torch.tensor([[2, 0, 0, 0], [3, 0, 0, 0], [1, 0, 0, 0]]), r"int \(B, L\) = \(3, 5\)"),
                       (torch.tensor([[4, 4, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5]), "adding up to at most 5"),
                       (torch.tensor([[-1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0] * 5]), "lengths")):
        with pytest.raises(ValueError, match=match):
            FA.unpad_input_for_concatenated_sequences(hidden, bad)


def test_layer_norm_fn_sums_a_residual_of_another_dtype_unrounded():
    """A residual neither x's dtype nor float32 (bfloat16 or float64 next to float16 x): the sum is
    computed without rounding either operand to x's dtype and comes back in the residual's dtype,
    y in x's, as FlashAttention's kernel (float32 sum, stored in the residual's dtype). (The
    residual was cast to x's dtype first: 1e5 became float16's inf, y NaN.)"""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 64, generator=g).half(), torch.randn(64, generator=g)
    for res in ((torch.randn(3, 64, generator=g) * 3000).bfloat16(),
                torch.randn(3, 64, generator=g, dtype=torch.float64) * 1e5):
        y, summed = FA.layer_norm_fn(x, w, None, res, prenorm=True)
        exact = x.double() + res.double()
        assert y.dtype == torch.float16 and summed.dtype == res.dtype
        assert torch.equal(summed, exact.to(res.dtype))
        torch.testing.assert_close(y.double(), torch.nn.functional.layer_norm(exact, (64,), w.half().double()),
                                   rtol=2e-3, atol=2e-3)


def test_float64_layer_norm_fn_keeps_float64():
    x, res, w = torch.randn(4, 32, dtype=torch.float64), torch.randn(4, 32, dtype=torch.float64), torch.randn(
        32, dtype=torch.float64)
    y, summed = FA.layer_norm_fn(x, w, None, res.float(), prenorm=True)
    assert y.dtype == torch.float64 and summed.dtype == torch.float32  # residual_out: the residual's dtype
    expected = torch.nn.functional.layer_norm(x + res.float().double(), (32,), w, None, 1e-6)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_patches_undone_out_of_order_leave_nothing():
    first, second = fused_attn.patch_flash_attn(), fused_attn.patch_flash_attn()
    first.undo()
    second.undo()
    assert not any(name == "flash_attn" or name.startswith("flash_attn.") for name in sys.modules)


def test_pad_input_takes_int32_indices():
    """transformers' older flash-attention decoding path pads with int32 indices (cu_seqlens[:-1])."""
    hidden = torch.randn(3, 2, 4, requires_grad=True)
    indices = torch.tensor([0, 2, 5], dtype=torch.int32)
    out = FA.pad_input(hidden, indices, 2, 3)
    expected = torch.zeros(6, 2, 4)
    expected[[0, 2, 5]] = hidden.detach()
    torch.testing.assert_close(out, expected.view(2, 3, 2, 4))
    out.sum().backward()
    assert torch.equal(hidden.grad, torch.ones_like(hidden))


def test_layer_norm_fn_wider_out_dtype_is_not_rounded_to_x_dtype():
    """FlashAttention writes its float32 result straight into a float32 y for bfloat16 x."""
    x, res, w, b = make_inputs((8, 64), (8, 64), (64,), (64,), dtype=torch.bfloat16, requires_grad=False, seed=3)
    y, summed = FA.layer_norm_fn(x, w, b, res, prenorm=True, out_dtype=torch.float32)
    s = x.float() + res.float()
    expected = torch.nn.functional.layer_norm(s, (64,), w.float(), b.float(), 1e-6)
    assert y.dtype == torch.float32 and summed.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)  # bfloat16 rounding would be ~1e-2
    torch.testing.assert_close(summed, s.to(torch.bfloat16))
    y = FA.rms_norm_fn(x, w, None, out_dtype=torch.float32)
    rms = x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + 1e-6) * w.float()
    torch.testing.assert_close(y, rms, atol=1e-5, rtol=1e-5)


def test_unpad_input_for_concatenated_sequences_skips_zeros_anywhere():
    """FlashAttention takes the nonzero lengths wherever they sit in the row."""
    hidden = torch.randn(1, 6, 4)
    packed, indices, cu, max_len = FA.unpad_input_for_concatenated_sequences(hidden, torch.tensor([[2, 0, 3, 0, 0, 0]]))
    assert cu.tolist() == [0, 2, 5] and max_len == 3 and indices.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="adding up to at most 6"):
        FA.unpad_input_for_concatenated_sequences(hidden, torch.tensor([[4, 0, 3, 0, 0, 0]]))


def test_rotary_embedding_built_on_meta():
    """inv_freq is a non-persistent buffer (in no state dict): built on meta, to_empty left it
    uninitialised memory (the tables silently garbage) and a forward on CPU failed copying out of
    meta. to_empty / any move now recomputes it, reset_parameters does, and a forward computes it
    where it runs if nothing placed it."""
    rope = FA.RotaryEmbedding(8, base=500.0)
    qkv = torch.randn(1, 4, 3, 2, 8)
    expected = rope(qkv.clone())
    with torch.device("meta"):
        lazy = FA.RotaryEmbedding(8, base=500.0)
    lazy.to_empty(device="cpu")
    assert torch.equal(lazy.inv_freq, rope.inv_freq)
    torch.testing.assert_close(lazy(qkv.clone()), expected)
    with torch.no_grad():
        lazy.inv_freq.fill_(float("nan"))
    lazy.reset_parameters()
    torch.testing.assert_close(lazy(qkv.clone()), expected)
    with torch.device("meta"):
        lazy = FA.RotaryEmbedding(8, base=500.0)
    torch.testing.assert_close(lazy(qkv.clone()), expected)
    assert torch.equal(lazy.inv_freq, rope.inv_freq)
    # a user's edit of the buffer (position interpolation) survives ordinary moves, as in
    # FlashAttention's module: only a move off meta recomputes it (the tables use it only while
    # it is float32: test_rotary_embedding_cast_to_half_precision)
    scaled = FA.RotaryEmbedding(8, base=500.0)
    with torch.no_grad():
        scaled.inv_freq.div_(4)
    scaled.to("cpu").double().float()
    torch.testing.assert_close(scaled.inv_freq, rope.inv_freq / 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rotary_embedding_cast_to_half_precision(dtype):
    """model.to(bfloat16) casts the inv_freq buffer too: the tables were computed from the rounded
    frequencies (angles off by radians at position 2000: errors of 2.6 in q). As FlashAttention's
    _update_cos_sin_cache, a buffer that is not float32 is recomputed in float32 from dim and base,
    so the cast module gives the float32 tables rounded once; a float32 buffer (a user's edit of
    it) is used as it is."""
    L, dim = 2048, 64
    inv = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    angles = torch.outer(torch.arange(L, dtype=torch.float32), inv)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    qkv = torch.randn(1, L, 3, 1, dim, dtype=dtype)
    rope = FA.RotaryEmbedding(dim).to(dtype)
    assert rope.inv_freq.dtype == dtype  # (the cast reaches the buffer: the case at hand)
    out = rope(qkv.clone())
    assert rope._cos_cached.dtype == dtype
    assert torch.equal(rope._cos_cached, cos) and torch.equal(rope._sin_cached, sin)
    for i in range(2):
        assert torch.equal(out[:, :, i], FA.apply_rotary_emb(qkv[:, :, i], cos, sin))
    assert torch.equal(out[:, :, 2], qkv[:, :, 2])
    # the kv form reads the same tables
    q_out, kv_out = FA.RotaryEmbedding(dim).to(dtype)(qkv[:, :, 0].clone(), qkv[:, :, 1:].clone())
    assert torch.equal(q_out, out[:, :, 0]) and torch.equal(kv_out[:, :, 0], out[:, :, 1])
    # an edit of a float32 buffer is used; cast, the buffer is ignored, as in FlashAttention's
    edited = FA.RotaryEmbedding(dim)
    with torch.no_grad():
        edited.inv_freq.div_(4)
    edited(qkv.float().clone())
    torch.testing.assert_close(edited._cos_cached, torch.outer(torch.arange(L, dtype=torch.float32), inv / 4).cos())
    edited.to(dtype)(qkv.clone())
    assert torch.equal(edited._cos_cached, cos)


def fa2_window_oracle(q, k, v, causal, window_size, seqlen_k=None):
    """Attention in float64 as FlashAttention 2 computes it for (B, L, H, D) q, k, v (one head
    count): its window rules first (csrc/flash_attn/flash_api.cpp), with seqlen_k k's length
    unless given (varlen's max_seqlen_k, a KV cache's capacity) -- mha_fwd / mha_varlen_fwd /
    mha_fwd_kvcache make a side >= seqlen_k -1 and causal sets the right side to 0, then
    set_params_fprop makes the call causal when left < 0 and right == 0, and turns a side < 0 into
    seqlen_k when the other is >= 0 -- then its kernels' masks, bottom-right (query i faces key
    i + Lk - Lq): causal keeps j <= that, local keeps it - left <= j <= it + right. A row that
    sees no key is zeros (FlashAttention's output there)."""
    Lq, Lk = q.shape[1], k.shape[1]
    seqlen_k = Lk if seqlen_k is None else seqlen_k
    left, right = window_size
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if causal:
        right = 0
    is_causal = left < 0 and right == 0
    if left < 0 and right >= 0:
        left = seqlen_k
    if left >= 0 and right < 0:
        right = seqlen_k
    facing = torch.arange(Lq)[:, None] + Lk - Lq
    j = torch.arange(Lk)[None]
    if is_causal:
        keep = j <= facing
    elif left >= 0 or right >= 0:
        keep = (j >= facing - left) & (j <= facing + right)
    else:
        keep = torch.ones(Lq, Lk, dtype=torch.bool)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.double())


# (any negative side is unbounded in FlashAttention, as -1: (-3, 0), (2, -5), (-2, -7))
FA2_WINDOWS = [(-1, 5), (2, -1), (5, 0), (-1, -1), (1, 1), (0, 7), (-1, 2), (9, -1), (-3, 0), (2, -5), (-2, -7)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", FA2_WINDOWS)
@pytest.mark.parametrize("Lq,Lk", [(10, 6), (10, 3), (7, 7)], ids=["Lq>Lk", "Lq>2Lk", "Lq=Lk"])
def test_window_as_flashattention_rewrites_it(Lq, Lk, window_size, causal):
    """FlashAttention turns a window side >= seqlen_k into -1 and then a -1 side facing a bounded
    one into seqlen_k; fused_attn's -1 stays unbounded and its sides are taken as given, so with
    Lq > Lk the front-ends gave other answers: (-1, 5) on 3 keys hid every key from the first
    two queries (FlashAttention: full attention), (2, -1) saw keys that (2, Lk) hides. Each form
    is held to a float64 oracle of FlashAttention's rules and masks."""
    B, H, D = 2, 2, 8
    q, k, v = make_inputs((B, Lq, H, D), (B, Lk, H, D), (B, Lk, H, D), dtype=torch.float64, requires_grad=False,
                          seed=Lq * 31 + Lk)
    tol = dict(rtol=1e-10, atol=1e-10)
    opts = dict(causal=causal, window_size=window_size)
    expected = fa2_window_oracle(q, k, v, causal, window_size)
    torch.testing.assert_close(FA.flash_attn_func(q, k, v, **opts), expected, **tol)
    torch.testing.assert_close(FA.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), **opts), expected, **tol)
    if Lq == Lk:
        qkv = torch.stack([q, k, v], dim=2)
        torch.testing.assert_close(FA.flash_attn_qkvpacked_func(qkv, **opts), expected, **tol)
    # varlen: the rules on max_seqlen_k (as given, a loose one included), each sequence on its lengths
    lq, lk = [Lq, 4, 1], [Lk, 2, Lk]
    cu_q, cu_k = (torch.tensor([0] + n).cumsum(0).int() for n in (lq, lk))
    qp, kp, vp = make_inputs((sum(lq), H, D), (sum(lk), H, D), (sum(lk), H, D), dtype=torch.float64,
                             requires_grad=False, seed=5)
    for max_k in (max(lk), max(lk) + 4):
        out = FA.flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, max(lq), max_k, **opts)
        packed = FA.flash_attn_varlen_kvpacked_func(qp, torch.stack([kp, vp], dim=1), cu_q, cu_k, max(lq), max_k,
                                                    **opts)
        for s in range(3):
            rows, keys = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
            want = fa2_window_oracle(qp[None, rows], kp[None, keys], vp[None, keys], causal, window_size, max_k)[0]
            torch.testing.assert_close(out[rows], want, **tol)
            torch.testing.assert_close(packed[rows], want, **tol)
    if Lq == Lk:
        qkv = torch.stack([qp[:sum(lq)], qp.flip(0), qp * 0.5], dim=1)
        out = FA.flash_attn_varlen_qkvpacked_func(qkv, cu_q, max(lq), **opts)
        for s in range(3):
            rows = slice(cu_q[s], cu_q[s + 1])
            want = fa2_window_oracle(*(qkv[None, rows, i] for i in range(3)), causal, window_size, max(lq))[0]
            torch.testing.assert_close(out[rows], want, **tol)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window_size", FA2_WINDOWS)
def test_with_kvcache_window_as_flashattention_rewrites_it(window_size, causal, paged):
    """flash_attn_with_kvcache: FlashAttention's window rules on the cache's capacity (rows, or
    pages per table row times the page size), each sequence on its own key count: with more
    queries than the cache holds, (2, -1) is (2, capacity), which hides keys from the first
    queries (it saw them)."""
    B, Lq, H, D, capacity = 2, 10, 2, 8, 4
    q, kc, vc = make_inputs((B, Lq, H, D), (B, capacity, H, D), (B, capacity, H, D), dtype=torch.float64,
                            requires_grad=False, seed=9)
    seqlens = torch.tensor([4, 2], dtype=torch.int32)
    block_table = None
    k_cache, v_cache = kc, vc
    if paged:  # pages of 2 rows, the batch rows' pages in reverse order
        k_cache, v_cache = (t.reshape(B * 2, 2, H, D).flip(0).contiguous() for t in (kc, vc))
        block_table = torch.tensor([[3, 2], [1, 0]], dtype=torch.int32)
    out = FA.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=block_table,
                                     causal=causal, window_size=window_size)
    for b in range(B):
        n = int(seqlens[b])
        want = fa2_window_oracle(q[b:b + 1], kc[b:b + 1, :n], vc[b:b + 1, :n], causal, window_size, capacity)
        torch.testing.assert_close(out[b:b + 1], want, rtol=1e-10, atol=1e-10)


def test_varlen_window_rules_without_max_seqlen_k():
    """max_seqlen_k=None (FlashAttention requires it; fused_attn reads it from cu_seqlens_k): the
    window rules use the longest sequence, as a call that passes it."""
    lq, lk = [10, 4], [3, 2]
    q, k, v, cu_q, cu_k = (t.detach() for t in _packed(lq, lk, 2, 2, 8))
    for window in ((-1, 5), (2, -1)):
        torch.testing.assert_close(FA.flash_attn_varlen_func(q, k, v, cu_q, cu_k, None, None, window_size=window),
                                   FA.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk),
                                                             window_size=window), rtol=0, atol=0)


_r = torch.randn
_CU_Q, _CU_K = torch.tensor([0, 5, 10], dtype=torch.int32), torch.tensor([0, 7, 14], dtype=torch.int32)


@pytest.mark.parametrize("call,expected", [
    (lambda: FA.flash_attn_func(_r(2, 5, 6, 8), _r(3, 7, 3, 8), _r(3, 7, 3, 8)),
     "q, k and v must have the same batch size (dim 0), got q (2, 5, 6, 8), k (3, 7, 3, 8), v (3, 7, 3, 8)"),
    (lambda: FA.flash_attn_func(_r(2, 5, 6, 8), _r(2, 7, 3, 8), _r(2, 6, 3, 8)),
     "k and v must have the same sequence length (dim 1), got q (2, 5, 6, 8), k (2, 7, 3, 8), v (2, 6, 3, 8)"),
    # (said "the query heads (q.shape[1] = 6)": dim 1 of the transposed view, the caller's seqlen is 5)
    (lambda: FA.flash_attn_func(_r(2, 5, 6, 8), _r(2, 7, 4, 8), _r(2, 7, 4, 8)),
     "q's number of heads (6) must be a multiple of k's and v's (4) (grouped-query attention), got q (2, 5, 6, 8), "
     "k (2, 7, 4, 8), v (2, 7, 4, 8)"),
    (lambda: FA.flash_attn_func(_r(2, 5, 6, 8), _r(2, 7, 3, 8), _r(2, 7, 2, 8)),
     "k and v must have the same number of heads, got q (2, 5, 6, 8), k (2, 7, 3, 8), v (2, 7, 2, 8)"),
    (lambda: FA.flash_attn_func(_r(2, 5, 6, 8), _r(2, 7, 3, 4), _r(2, 7, 3, 8)),
     "q and k must have the same head dim (last dim), got q (2, 5, 6, 8), k (2, 7, 3, 4), v (2, 7, 3, 8)"),
    (lambda: FA.flash_attn_kvpacked_func(_r(2, 5, 6, 8), _r(3, 7, 2, 3, 8)),
     "q and kv must have the same batch size (dim 0), got q (2, 5, 6, 8), kv (3, 7, 2, 3, 8)"),
    (lambda: FA.flash_attn_kvpacked_func(_r(2, 5, 6, 8), _r(2, 7, 2, 4, 8)),
     "q's number of heads (6) must be a multiple of kv's (4) (grouped-query attention), got q (2, 5, 6, 8), "
     "kv (2, 7, 2, 4, 8)"),
    (lambda: FA.flash_attn_kvpacked_func(_r(2, 5, 6, 8), _r(2, 7, 2, 3, 4)),
     "q and kv must have the same head dim (last dim), got q (2, 5, 6, 8), kv (2, 7, 2, 3, 4)"),
    (lambda: FA.flash_attn_qkvpacked_func(_r(2, 5, 3, 6, 0)),
     "qkv must have a head dim (last dim) of at least 1, got qkv (2, 5, 3, 6, 0)"),
    (lambda: FA.flash_attn_varlen_func(_r(10, 6, 8), _r(14, 3, 8), _r(13, 3, 8), _CU_Q, _CU_K, 5, 7),
     "k and v must have the same number of tokens (dim 0), got q (10, 6, 8), k (14, 3, 8), v (13, 3, 8)"),
    (lambda: FA.flash_attn_varlen_func(_r(10, 6, 8), _r(14, 4, 8), _r(14, 4, 8), _CU_Q, _CU_K, 5, 7),
     "q's number of heads (6) must be a multiple of k's and v's (4) (grouped-query attention), got q (10, 6, 8), "
     "k (14, 4, 8), v (14, 4, 8)"),
    (lambda: FA.flash_attn_varlen_func(_r(10, 6, 8), _r(14, 3, 4), _r(14, 3, 8), _CU_Q, _CU_K, 5, 7),
     "q and k must have the same head dim (last dim), got q (10, 6, 8), k (14, 3, 4), v (14, 3, 8)"),
    # (paged: attention_varlen calls a page's heads k.shape[1], its page size)
    (lambda: FA.flash_attn_varlen_func(_r(10, 6, 8), _r(4, 16, 4, 8), _r(4, 16, 4, 8), _CU_Q, _CU_K, 5, 7,
                                       block_table=torch.tensor([[0], [1]], dtype=torch.int32)),
     "q's number of heads (6) must be a multiple of k's and v's (4) (grouped-query attention), got q (10, 6, 8), "
     "k (4, 16, 4, 8), v (4, 16, 4, 8)"),
    (lambda: FA.flash_attn_varlen_func(_r(10, 6, 8), _r(4, 16, 3, 8), _r(4, 8, 3, 8), _CU_Q, _CU_K, 5, 7,
                                       block_table=torch.tensor([[0], [1]], dtype=torch.int32)),
     "k and v must have the same page size (dim 1), got q (10, 6, 8), k (4, 16, 3, 8), v (4, 8, 3, 8)"),
    (lambda: FA.flash_attn_varlen_kvpacked_func(_r(10, 6, 8), _r(14, 2, 4, 8), _CU_Q, _CU_K, 5, 7),
     "q's number of heads (6) must be a multiple of kv's (4) (grouped-query attention), got q (10, 6, 8), "
     "kv (14, 2, 4, 8)"),
    (lambda: FA.flash_attn_varlen_kvpacked_func(_r(10, 6, 8), _r(14, 2, 3, 4), _CU_Q, _CU_K, 5, 7),
     "q and kv must have the same head dim (last dim), got q (10, 6, 8), kv (14, 2, 3, 4)"),
    (lambda: FA.flash_attn_varlen_qkvpacked_func(_r(10, 3, 6, 0), _CU_Q, 5),
     "qkv must have a head dim (last dim) of at least 1, got qkv (10, 3, 6, 0)"),
])
def test_shape_errors_name_the_callers_arguments_in_its_layout(call, expected):
    """Shape errors came from attention on the transposed (B, H, L, D) views (or a packed tensor's
    views): "the query heads (q.shape[1] = 6)" for a q whose dim 1 is its seqlen. They are now the
    caller's: its argument names and shapes, in FlashAttention's layout."""
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == expected


def test_varlen_window_on_meta_without_max_seqlen_k():
    """A windowed flash_attn_varlen_func with max_seqlen_k=None read the longest sequence from
    cu_seqlens_k for FlashAttention's window rules, which on meta raised "Tensor.item() cannot be
    called on meta tensors"; it bounds it by the keys' total there (the shapes are those of any
    window), as attention_varlen does."""
    q, k, v = (torch.empty(n, 2, 8, device="meta") for n in (9, 7, 7))
    cu_q = torch.tensor([0, 4, 9], dtype=torch.int32, device="meta")
    cu_k = torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")
    out = FA.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, None, window_size=(2, -1))
    assert out.shape == (9, 2, 8) and out.is_meta
