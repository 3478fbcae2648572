"""ALiBi (``alibi_slopes``) on every backend of this machine.

The oracle adds ``reference.alibi_bias`` (``-slope * |j - d_i|``, d_i = query i's key position
under ``alignment``) to the float64 logits after the cap, where the mask goes. The kernels never
build that (Lq, Lk) tensor: each computes the distance of its own (query, key) pairs. The slopes
here are large enough that the bias moves the probabilities a lot (distances up to ~100 times
slopes up to 0.5), and the per-batch ones include negative slopes, so a wrong sign, a missing
absolute value, the wrong alignment or the wrong (batch, head) slope fails by far.
"""
import math

import pytest
import torch

import fused_attn
from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.testing import backend_cases, check_against_reference, compare, make_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cases(dtype, varlen=False):
    return backend_cases("attention", dtype, alibi=True, **({"varlen": True} if varlen else {}))


def slopes_for(B, Hq, per_batch, device, seed=0):
    """The paper's slopes x 4 (so that they bite at these lengths), or per-(batch, head) ones in
    [-0.1, 0.5): negative slopes reward distance, which only a correct |j - d_i| gets right."""
    if not per_batch:
        return (fused_attn.get_alibi_slopes(Hq) * 4).to(device)
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(B, Hq, generator=gen) * 0.6 - 0.1).to(device)


# (name, B, Hq, Hkv, Lq, Lk, D, causal, window, alignment, per-batch slopes, extra)
CASES = [
    ("plain", 2, 4, 4, 17, 17, 40, False, None, "top_left", False, None),
    ("causal gqa", 1, 4, 2, 97, 97, 59, True, None, "top_left", True, None),
    ("bottom-right cross Lq<Lk", 2, 2, 1, 17, 97, 16, False, None, "bottom_right", True, None),
    ("top-left cross Lq>Lk", 1, 2, 2, 97, 61, 16, False, None, "top_left", False, None),
    ("bottom-right causal Lq>Lk (dead rows)", 1, 2, 2, 97, 61, 16, True, None, "bottom_right", False, None),
    ("causal window + softcap", 1, 2, 1, 70, 70, 24, True, (9, 0), "top_left", False, "softcap"),
    ("additive mask grad", 1, 2, 1, 33, 70, 24, False, None, "bottom_right", True, "additive"),
    ("bool mask, two-sided window", 1, 2, 2, 61, 97, 40, False, (7, 12), "bottom_right", False, "bool"),
    ("dropout", 1, 2, 2, 45, 45, 32, True, None, "top_left", True, "dropout"),
    ("decode step", 2, 4, 1, 1, 147, 64, True, None, "bottom_right", True, None),
]


def _run_case(device, backend, dtype, case):
    name, B, Hq, Hkv, Lq, Lk, D, causal, window, alignment, per_batch, extra = case
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), dtype=dtype, seed=Lq + Lk)
    slopes = slopes_for(B, Hq, per_batch, device, seed=Lq)
    softcap = 2.0 if extra == "softcap" else None
    if softcap:  # |scale * q.k| well above the cap for many pairs
        q, k = ((t.detach() * 4).requires_grad_() for t in (q, k))
    inputs, names, p = [q, k, v], ["q", "k", "v"], 0.0
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
                           softcap=softcap, dropout_p=p, alibi_slopes=slopes, backend=backend, generator=rng())

    def reference(q, k, v, mask=None):
        seed_offset = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=rng()).tolist()) if p else None
        return R.attention(q, k, v, mask, causal, p, None, seed_offset, window_size=window, alignment=alignment,
                           softcap=softcap, alibi_slopes=slopes.to(q.dtype))

    return check_against_reference(fused, reference, inputs, names=names)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_alibi_matches_reference_float32(device, backend, case):
    with torch.device(device):
        results = _run_case(device, backend, torch.float32, case)
    assert all(r.ok for r in results), "\n".join(map(str, results))


HALF_CASES = [CASES[1], CASES[4], CASES[6], CASES[9]]


@pytest.mark.parametrize("case", HALF_CASES, ids=[c[0] for c in HALF_CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float16))
def test_alibi_matches_reference_float16(device, backend, case):
    with torch.device(device):
        results = _run_case(device, backend, torch.float16, case)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_alibi_is_the_additive_bias_and_lse(device, backend):
    """ALiBi gives what the same bias passed as an additive mask gives (how users wrote ALiBi
    before, with an (Lq, Lk) tensor), and return_lse includes the bias."""
    with torch.device(device):
        B, Hq, Lq, Lk = 2, 4, 37, 53
        q, k, v = make_inputs((B, Hq, Lq, 24), (B, 2, Lk, 24), (B, 2, Lk, 24), requires_grad=False)
        slopes = slopes_for(B, Hq, True, device, seed=7)
        for alignment in ("top_left", "bottom_right"):
            out, lse = F.attention(q, k, v, causal=True, alignment=alignment, alibi_slopes=slopes, return_lse=True,
                                   backend=backend)
            bias = R.alibi_bias(slopes, Lq, Lk, alignment)
            masked = F.attention(q, k, v, causal=True, alignment=alignment, attn_mask=bias, backend=backend)
            torch.testing.assert_close(out, masked, rtol=2e-5, atol=2e-6)
            ref_lse = R.attention_lse(q.double(), k.double(), None, True, None, alignment=alignment,
                                      alibi_slopes=slopes.double())
            torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
@pytest.mark.parametrize("alignment,causal", [("top_left", False), ("bottom_right", True)])
def test_alibi_huge_slopes_match_reference(device, backend, alignment, causal):
    """Any finite slope, up to float32's max, gives the reference's output, lse and gradients on
    every backend: here each row keeps its own position's key alone (the bias of the others is
    -1e38 or less). The Triton kernels work in base-2 units and took slope * log2(e), which
    overflows float32 above ~2.36e38: inf * 0 = NaN at the row's own key, NaN rows."""
    with torch.device(device):
        q, k, v = make_inputs((2, 3, 3, 4), (2, 3, 5, 4), (2, 3, 5, 4), seed=2)
        slopes = torch.tensor([[3e38, 2.4e38, torch.finfo(torch.float32).max], [1e38, 0.5, 2.5e38]])
        options = dict(causal=causal, alignment=alignment, alibi_slopes=slopes)
        results = check_against_reference(
            lambda q, k, v: F.attention(q, k, v, return_lse=True, backend=backend, **options),
            lambda q, k, v: (R.attention(q, k, v, **options), R.attention_lse(q, k, **options)),
            [q, k, v], names="qkv")
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_alibi_decode_matches_full_prefill(device, backend):
    """KV-cache decoding with ALiBi: each query alone against its prefix (bottom-right) gives the
    rows of one causal pass; a top-left decode step would not (its query would sit at key 0)."""
    with torch.device(device):
        q, k, v = make_inputs((1, 4, 29, 32), (1, 4, 29, 32), (1, 4, 29, 32), requires_grad=False)
        slopes = fused_attn.get_alibi_slopes(4).to(device)
        full = F.attention(q, k, v, causal=True, alibi_slopes=slopes, backend=backend)
        for t in (0, 1, 16, 28):
            step = F.attention(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], causal=True,
                               alignment="bottom_right", alibi_slopes=slopes, backend=backend)
            torch.testing.assert_close(step, full[:, :, t:t + 1], rtol=1e-5, atol=1e-6)
        wrong = F.attention(q[:, :, 28:], k, v, alibi_slopes=slopes, backend=backend)  # top-left: d_0 = 0
        assert (wrong - full[:, :, 28:]).abs().max() > 1e-2


def _varlen_inputs(dtype, device, lens_q, lens_k, Hq=4, Hkv=2, D=24):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q, k, v = make_inputs((int(cu_q[-1]), Hq, D), (int(cu_k[-1]), Hkv, D), (int(cu_k[-1]), Hkv, D), dtype=dtype,
                          seed=sum(lens_q))
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("per_batch", [False, True], ids=["head-slopes", "batch-head-slopes"])
@pytest.mark.parametrize("alignment", ["top_left", "bottom_right"])
@pytest.mark.parametrize("device,backend", cases(torch.float32, varlen=True))
def test_alibi_varlen(device, backend, alignment, per_batch):
    """Packed sequences: each placed on its own lengths, row s of (B, Hq) slopes for sequence s;
    with seqused_k, bottom-right places the queries on the used keys."""
    lens_q, lens_k = [17, 1, 40, 5], [23, 9, 40, 1]
    with torch.device(device):
        q, k, v, cu_q, cu_k = _varlen_inputs(torch.float32, device, lens_q, lens_k)
        slopes = slopes_for(len(lens_q), 4, per_batch, device, seed=3)
        for seqused in (None, torch.tensor([20, 9, 33, 1], dtype=torch.int32, device=device)):
            def fused(q, k, v):
                return F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alignment=alignment,
                                          alibi_slopes=slopes, seqused_k=seqused, backend=backend)

            def reference(q, k, v):
                return R.attention_varlen(q, k, v, cu_q, cu_k, True, alignment=alignment,
                                          alibi_slopes=slopes.to(q.dtype), seqused_k=seqused)

            results = check_against_reference(fused, reference, [q, k, v], names=["q", "k", "v"])
            assert all(r.ok for r in results), f"seqused_k {seqused}:\n" + "\n".join(map(str, results))
        out, lse = F.attention_varlen(q.detach(), k.detach(), v.detach(), cu_q, cu_k, alibi_slopes=slopes,
                                      alignment=alignment, return_lse=True, backend=backend)
        ref_out, ref_lse = R.attention_varlen(q.detach().double(), k.detach().double(), v.detach().double(), cu_q,
                                              cu_k, alignment=alignment, alibi_slopes=slopes.double(), with_lse=True)
        assert compare("lse", lse, ref_lse, ref_lse.float()).ok


def test_get_alibi_slopes_is_the_papers():
    """Powers of two: 2^(-8 (h + 1) / n); otherwise the nearest lower power's slopes, then every
    other slope of twice that many (the ALiBi repository's get_slopes)."""
    assert fused_attn.get_alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert fused_attn.get_alibi_slopes(1).tolist() == [2.0 ** -8]
    assert fused_attn.get_alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1,
                                                        2.0 ** -3]
    twelve = fused_attn.get_alibi_slopes(12)
    assert twelve.dtype == torch.float32 and twelve.shape == (12,)
    assert twelve[:8].tolist() == [2.0 ** -i for i in range(1, 9)]
    torch.testing.assert_close(twelve[8:], torch.tensor([2.0 ** -(0.5 + i) for i in range(4)]))
    for bad, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="num_heads"):
            fused_attn.get_alibi_slopes(bad)


def test_device_arguments_are_checked():
    """A device string torch cannot parse, a negative index or another type, given as ``device=``
    to get_alibi_slopes, KVCache, the modules or FlashAttention's RotaryEmbedding, raises naming
    device (torch's RuntimeError "Expected one of cpu, cuda, ..." or TypeError "argument 'device'
    must be torch.device" named neither); a well-formed one works as torch's factories take it."""
    from fused_attn.integrations import flash_attn as FA
    makers = (lambda d: fused_attn.get_alibi_slopes(4, device=d), lambda d: fused_attn.KVCache(1, 2, 1, 2, device=d),
              lambda d: fused_attn.MultiHeadAttention(8, 2, device=d),
              lambda d: fused_attn.reference.LayerNormResidual(8, device=d),
              lambda d: fused_attn.FeedForward(8, device=d), lambda d: FA.RotaryEmbedding(8, device=d))
    for make in makers:
        for bad, error, match in (("nope", ValueError, "device must be a device such as 'cpu'.* got 'nope'"),
                                  (-1, ValueError, "device must be a device index >= 0, got -1"),
                                  (3.5, TypeError, "device must be None, a torch.device, .* got float 3.5")):
            with pytest.raises(error, match=match):
                make(bad)
        for good in ("cpu", torch.device("cpu"), "meta", None):
            make(good)
    assert fused_attn.get_alibi_slopes(4, device="meta").device.type == "meta"


def test_alibi_slopes_bad_input():
    q, k, v = make_inputs((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), requires_grad=False)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(Hq,\) = \(4,\) or \(B, Hq\)"):
        F.attention(q, k, v, alibi_slopes=torch.ones(2))
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        F.attention(q, k, v, alibi_slopes=torch.ones(3, 4))
    with pytest.raises(TypeError, match="alibi_slopes must be a floating-point tensor"):
        F.attention(q, k, v, alibi_slopes=torch.ones(4, dtype=torch.int32))
    with pytest.raises(TypeError, match="alibi_slopes must be a torch.Tensor"):
        F.attention(q, k, v, alibi_slopes=[0.5] * 4)
    learnable = torch.ones(4, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):  # checked as fixed slopes are
        F.attention(q, k, v, alibi_slopes=torch.ones(3, requires_grad=True))
    with torch.no_grad():  # no graph: the in-kernel path
        F.attention(q, k, v, alibi_slopes=learnable)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    qv, kv, vv = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match=r"\(B, Hq\) = \(2, 4\)"):
        F.attention_varlen(qv, kv, vv, cu, cu, alibi_slopes=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"alibi_slopes requires grad.*detach\(\) \(attention, with an"):
        F.attention_varlen(qv, kv, vv, cu, cu, alibi_slopes=learnable)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_alibi_slopes_not_modified_and_half_slopes_accepted(device, backend):
    """The slopes are used in float32 (a float64 or bfloat16 tensor is converted, never written)."""
    with torch.device(device):
        q, k, v = make_inputs((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 9, 8), requires_grad=False)
        slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
        before = slopes.clone()
        a = F.attention(q, k, v, alibi_slopes=slopes.to(device), backend=backend)
        b = F.attention(q, k, v, alibi_slopes=slopes.to(device=device, dtype=torch.bfloat16), backend=backend)
    assert torch.equal(slopes, before)
    torch.testing.assert_close(a, b)  # 0.5 and 0.25 are exact in bfloat16


def test_every_attention_backend_takes_alibi():
    """No backend refuses ALiBi for lack of an implementation (where it can run attention at all)."""
    from fused_attn.backends import BACKENDS, Call

    for device in DEVICES:
        for dtype in (torch.float32, torch.float16):
            plain = Call("attention", torch.device(device), dtype, {"alibi": False})
            with_alibi = Call("attention", torch.device(device), dtype, {"alibi": True})
            for name, backend in BACKENDS.items():
                if not backend.call_reasons(plain):
                    assert not backend.call_reasons(with_alibi), (name, device, dtype, backend.call_reasons(with_alibi))


LEARNABLE = [
    dict(id="per head, causal", slopes=(4,), causal=True),
    dict(id="per batch, bool mask, bottom-right, softcap", slopes=(2, 4), causal=True, mask="bool", Lq=5,
         alignment="bottom_right", softcap=2.0),
    dict(id="per head, additive mask that requires grad too", slopes=(4,), mask="additive"),
]


@pytest.mark.parametrize("case", LEARNABLE, ids=[c["id"] for c in LEARNABLE])
@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_learnable_slopes_get_their_gradient(device, backend, case):
    """Slopes that require grad: the output is the fixed-slope call's, and the slopes' gradient
    (with q's, k's, v's and a learnable mask's) meets the float64 oracle, autograd through the
    reference's bias."""
    Lq, Lk = case.get("Lq", 9), 9
    with torch.device(device):
        q, k, v = make_inputs((2, 4, Lq, 16), (2, 2, Lk, 16), (2, 2, Lk, 16), seed=4)
        slopes = (torch.linspace(0.05, 0.9, math.prod(case["slopes"])).view(case["slopes"])).requires_grad_()
        mask = None
        if case.get("mask") == "bool":
            mask = torch.rand(2, 1, Lq, Lk, generator=torch.Generator().manual_seed(1)).to(device) > 0.3
        elif case.get("mask") == "additive":
            mask = (0.3 * torch.randn(1, 4, Lq, Lk, generator=torch.Generator().manual_seed(1))).to(device)
            mask.requires_grad_()
    opts = dict(causal=case.get("causal", False), alignment=case.get("alignment", "top_left"),
                softcap=case.get("softcap"))

    def fused(q, k, v, slopes, *mask):
        return F.attention(q, k, v, attn_mask=mask[0] if mask else None, alibi_slopes=slopes, backend=backend, **opts)

    def ref(q, k, v, slopes, *mask):
        return R.attention(q, k, v, mask[0] if mask else None, opts["causal"], alignment=opts["alignment"],
                           softcap=opts["softcap"], alibi_slopes=slopes)

    inputs = [q, k, v, slopes] + ([mask] if mask is not None else [])
    results = check_against_reference(fused, ref, inputs, names=["q", "k", "v", "alibi_slopes", "attn_mask"])
    assert all(r.ok for r in results), "\n".join(map(str, results))
    with torch.no_grad():
        fixed = F.attention(q, k, v, attn_mask=mask, alibi_slopes=slopes, backend=backend, **opts)
    torch.testing.assert_close(fused(q, k, v, slopes, *([mask] if mask is not None else [])), fixed, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if fused_attn.extension_error() is None else []))
@pytest.mark.parametrize("mask", [None, "additive"])
def test_learnable_slopes_float64_gradcheck(backend, mask):
    """float64 slopes (and an additive float64 mask) with float64 q: the learnable bias is built in
    float64 (it was built in float32, so the slopes' gradient failed float64 gradcheck)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, dtype=torch.float64, generator=gen) for _ in range(3))
    attn_mask = None if mask is None else 0.3 * torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=gen)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: F.attention(q, k, v, attn_mask=attn_mask, alibi_slopes=s, causal=True,
                                                          backend=backend), (slopes,))


def test_learnable_slopes_compile_fullgraph():
    q, k, v = make_inputs((2, 4, 9, 16), (2, 4, 9, 16), (2, 4, 9, 16), seed=6)
    slopes = torch.linspace(0.1, 0.5, 4).requires_grad_()
    compiled = torch.compile(lambda q, k, v, s: F.attention(q, k, v, causal=True, alibi_slopes=s), fullgraph=True,
                             backend="aot_eager")
    compiled(q, k, v, slopes).sum().backward()
    grad, slopes.grad = slopes.grad.clone(), None
    F.attention(q, k, v, causal=True, alibi_slopes=slopes).sum().backward()
    torch.testing.assert_close(grad, slopes.grad, rtol=1e-5, atol=1e-5)
