"""Variable-length (packed) attention, ``functional.attention_varlen``, on every backend of this machine.

Sequences of different lengths are packed one after another in (total, heads, dim) tensors and
described by cumulative lengths, as FlashAttention's ``flash_attn_varlen_func`` takes them. The
oracle is ``reference.attention_varlen``: plain ``reference.attention`` on each sequence alone,
built from the user's terms (causal, window_size, alignment per sequence), so a wrong sequence
offset, a band shifted by the wrong sequence's lengths or a dropout row counted across sequences
all fail here. The Triton backend runs every sequence in one launch (its kernels' VARLEN flag),
the cpu backend in one packed op (fused_attn_C::attention_varlen_*, tests/test_cpu_attention_varlen.py
holds it bitwise to the per-sequence loop); the others run each sequence through their plain kernels.
"""
import pytest
import torch

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.testing import backend_cases, check_against_reference, index_view, make_inputs


def cases(dtype):
    return backend_cases("attention", dtype)


def cu_seqlens(lengths, dtype=torch.int32, device=None):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=dtype, device=device)


# (name, q lengths, k lengths (None: the same), Hq, Hkv, D, Dv, causal, window, alignment, extra)
CASES = [
    ("self, odd lengths incl. 0 and 1", [1, 17, 97, 0, 5], None, 2, 2, 40, 40, False, None, "top_left", None),
    ("causal GQA", [17, 1, 64, 33], None, 4, 2, 59, 59, True, None, "top_left", None),
    ("cross, bottom-right causal, dead rows", [3, 17, 40, 1], [10, 5, 97, 1], 2, 1, 16, 16, True, None,
     "bottom_right", None),
    ("causal sliding window + softcap", [50, 97, 9], None, 2, 2, 32, 32, True, (8, 0), "top_left", "softcap"),
    ("cross, bottom-right causal window", [5, 30, 2], [12, 20, 2], 2, 2, 24, 24, True, (3, 0), "bottom_right",
     None),
    ("two-sided window + dropout", [17, 40, 2], None, 2, 1, 32, 32, False, (4, 4), "top_left", "dropout"),
    ("Dv != D, one head, a sequence without keys", [4, 3, 7], [5, 0, 7], 1, 1, 32, 24, False, None, "top_left", None),
]


def _run_case(backend, dtype, case, device):
    name, lens_q, lens_k, Hq, Hkv, D, Dv, causal, window, alignment, extra = case
    lens_k = lens_q if lens_k is None else lens_k
    cu_q, cu_k = cu_seqlens(lens_q, device=device), cu_seqlens(lens_k, device=device)
    q, k, v = make_inputs((sum(lens_q), Hq, D), (sum(lens_k), Hkv, D), (sum(lens_k), Hkv, Dv), dtype=dtype,
                          device=device, seed=len(lens_q) + D)
    softcap = 3.0 if extra == "softcap" else None
    if softcap:  # |scale * q.k| well above the cap for many pairs
        q, k = ((t.detach() * 4).requires_grad_() for t in (q, k))
    p = 0.25 if extra == "dropout" else 0.0

    def rng():
        return torch.Generator().manual_seed(7)

    def fused(q, k, v, cu_q, cu_k):
        return F.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, window_size=window, alignment=alignment,
                                  softcap=softcap, dropout_p=p, backend=backend, generator=rng())

    def reference(q, k, v, cu_q, cu_k):
        seed_offset = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=rng()).tolist()) if p else None
        return R.attention_varlen(q, k, v, cu_q, cu_k, causal, p, None, seed_offset, window_size=window,
                                  alignment=alignment, softcap=softcap)

    return check_against_reference(fused, reference, [q, k, v, cu_q, cu_k], names=["q", "k", "v", "cu_q", "cu_k"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_matches_reference_float32(device, backend, case):
    results = _run_case(backend, torch.float32, case, device)
    assert all(r.ok for r in results), "\n".join(map(str, results))


HALF_CASES = [CASES[1], CASES[2], CASES[4]]


@pytest.mark.parametrize("case", HALF_CASES, ids=[c[0] for c in HALF_CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float16))
def test_varlen_matches_reference_float16(device, backend, case):
    results = _run_case(backend, torch.float16, case, device)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.bfloat16) if torch.cuda.is_available() else [])
def test_varlen_matches_reference_bfloat16(device, backend):
    if device != "cuda" or backend == "reference":
        pytest.skip("bfloat16 runs on the GPU")
    results = _run_case(backend, torch.bfloat16, CASES[1], device)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_is_attention_on_each_sequence(device, backend):
    """Each sequence's rows are what ``attention`` gives on that sequence alone (bitwise on the CPU,
    where both run the same kernels on the same block partition), and the packed tensors are strided
    views of one qkv buffer (FlashAttention's qkv-packed layout), read without copies."""
    lens = [7, 1, 33, 20]
    Hq, D = 2, 24
    cu = cu_seqlens(lens, device=device)
    qkv = make_inputs((sum(lens), 3, Hq, D), requires_grad=False, device=device, seed=3)[0]
    q, k, v = qkv.unbind(1)
    before = qkv.clone()
    out = F.attention_varlen(q, k, v, cu, cu, causal=True, backend=backend)
    assert torch.equal(qkv, before)
    assert out.shape == (sum(lens), Hq, D) and out.is_contiguous()
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        alone = F.attention(*(t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v)), causal=True,
                            backend=backend)[0].transpose(0, 1)
        if device == "cpu":
            assert torch.equal(out[a:b], alone), s
        else:
            torch.testing.assert_close(out[a:b], alone)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_equals_padded_batch(device, backend):
    """Packing is an optimisation: the valid rows of a padded batch with a key-padding mask are
    the packed result."""
    lens = [5, 12, 1, 9]
    H, D, L = 2, 16, max(lens)
    q, k, v = make_inputs((sum(lens), H, D), (sum(lens), H, D), (sum(lens), H, D), requires_grad=False,
                          device=device, seed=9)
    cu = cu_seqlens(lens, device=device)
    packed = F.attention_varlen(q, k, v, cu, cu, backend=backend)

    def pad(t):
        out = t.new_zeros(len(lens), L, H, D)
        for s, n in enumerate(lens):
            out[s, :n] = t[int(cu[s]):int(cu[s]) + n]
        return out.transpose(1, 2)

    keys_ok = torch.arange(L, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    padded = F.attention(pad(q), pad(k), pad(v), attn_mask=keys_ok[:, None, None, :], backend=backend)
    for s, n in enumerate(lens):
        torch.testing.assert_close(packed[int(cu[s]):int(cu[s]) + n], padded[s, :, :n].transpose(0, 1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_dropout_reproducible_and_int64_boundaries(device, backend):
    """The same generator state gives the same bits (int32 or int64 boundaries alike); another
    seed drops other elements."""
    lens = [9, 30]
    q, k, v = make_inputs((39, 2, 16), (39, 2, 16), (39, 2, 16), requires_grad=False, device=device, seed=4)

    def run(seed, dtype):
        cu = cu_seqlens(lens, dtype=dtype, device=device)
        return F.attention_varlen(q, k, v, cu, cu, dropout_p=0.5, backend=backend,
                                  generator=torch.Generator().manual_seed(seed))

    first = run(1, torch.int32)
    assert torch.equal(first, run(1, torch.int32))
    assert torch.equal(first, run(1, torch.int64))
    assert not torch.equal(first, run(2, torch.int32))
    # boundaries given as a strided view (every other element of a longer tensor) read the same
    spread = torch.stack([cu_seqlens(lens, device=device), torch.full((3,), 99, dtype=torch.int32,
                                                                       device=device)], 1).flatten()[::2]
    assert not spread.is_contiguous()
    assert torch.equal(first, F.attention_varlen(q, k, v, spread, spread, dropout_p=0.5, backend=backend,
                                                 generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_empty(device, backend):
    q, k, v = make_inputs((0, 2, 8), (0, 2, 8), (0, 2, 8), device=device)
    for cu in ([0], [0, 0, 0]):
        cu = torch.tensor(cu, dtype=torch.int32, device=device)
        out = F.attention_varlen(q, k, v, cu, cu, backend=backend)
        assert out.shape == (0, 2, 8)
        out.sum().backward()
        assert q.grad.shape == q.shape
    # queries without keys: zeros, zero gradients, no NaN
    q, k, v = make_inputs((3, 2, 8), (0, 2, 8), (0, 2, 8), device=device)
    out = F.attention_varlen(q, k, v, cu_seqlens([3], device=device), cu_seqlens([0], device=device),
                             backend=backend)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(q.grad, torch.zeros_like(q))


def test_varlen_validation():
    q, k, v = make_inputs((10, 2, 8), (10, 2, 8), (10, 2, 8), requires_grad=False)
    cu = cu_seqlens([4, 6])
    bad = [
        (dict(q=q[None]), ValueError, "q must be 3-D"),
        (dict(cu_seqlens_q=cu.float()), TypeError, "cu_seqlens_q must be int32 or int64"),
        (dict(cu_seqlens_k=cu[None]), ValueError, "cu_seqlens_k must be 1-D"),
        (dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "must start at 0"),
        (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32),
              cu_seqlens_k=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "never decrease"),
        (dict(cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, "total length 10"),
        (dict(cu_seqlens_k=torch.tensor([0, 2, 4, 10], dtype=torch.int32)), ValueError, "same number of sequences"),
        (dict(max_seqlen_q=5), ValueError, "max_seqlen_q = 5 is shorter than the longest sequence"),
        (dict(max_seqlen_k=True), TypeError, "max_seqlen_k must be an int"),
        (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be >= 0"),
        (dict(k=k[:, :1].expand(10, 3, 8).contiguous(), v=v[:, :1].expand(10, 3, 8).contiguous()), ValueError,
         "multiple of the key/value heads"),
        (dict(v=v[:9]), ValueError, "same tokens and heads"),
        (dict(cu_seqlens_q=[0, 4, 10]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
        (dict(alignment="centre"), ValueError, "alignment must be one of"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    ]
    base = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu)
    for change, exc, text in bad:
        kwargs = dict(base, **change)
        with pytest.raises(exc, match=text.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            F.attention_varlen(kwargs.pop("q"), kwargs.pop("k"), kwargs.pop("v"), kwargs.pop("cu_seqlens_q"),
                               kwargs.pop("cu_seqlens_k"), **kwargs)
    # an upper bound for max_seqlen is fine
    torch.testing.assert_close(F.attention_varlen(q, k, v, cu, cu, 64, 64), F.attention_varlen(q, k, v, cu, cu))


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("how", ["eager", "compiled", "compiled_without_max_seqlen"])
def test_varlen_loose_max_seqlen_reaches_kernels_as_longest(monkeypatch, grad, how):
    """A loose max_seqlen (a model's context length passed with every batch) is only a bound: the
    lengths are read anyway (in eager mode by the call, in a compiled one by the op when it runs,
    forward and backward), and the kernels get the longest sequence, which sizes the Triton grid,
    instead of a million-row launch of empty programs. Under torch.compile a missing max_seqlen is
    traced as the total length, a bound like any other."""
    from fused_attn.backends import get_backend
    backend = get_backend("reference")
    seen = []
    for name in ("attention_varlen_fwd", "attention_varlen_bwd"):
        original = getattr(backend, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            at = 5 if _name == "attention_varlen_fwd" else 8  # max_seqlen_q's position
            seen.append((_name, args[at], args[at + 1]))
            return _original(*args, **kwargs)
        monkeypatch.setattr(backend, name, spy)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 8], dtype=torch.int32)
    q, k, v = (torch.randn(t, 2, 8, requires_grad=grad) for t in (10, 8, 8))
    bounds = (None, None) if how == "compiled_without_max_seqlen" else (10**6, 4096)

    def call(q, k, v, cu, cu_k):
        return F.attention_varlen(q, k, v, cu, cu_k, *bounds, causal=True, backend=backend.name)

    torch._dynamo.reset()
    out = (call if how == "eager" else torch.compile(call, fullgraph=True, backend="aot_eager"))(q, k, v, cu, cu_k)
    if grad:
        out.sum().backward()
    called = {"attention_varlen_fwd", "attention_varlen_bwd"} if grad else {"attention_varlen_fwd"}
    assert {entry[0] for entry in seen} == called and all(entry[1:] == (7, 6) for entry in seen), seen
    torch.testing.assert_close(out, F.attention_varlen(q, k, v, cu, cu_k, causal=True, backend=backend.name))


def test_varlen_compiles_fullgraph():
    """Traced without graph breaks (nothing is read from cu_seqlens on the host inside the graph),
    with max_seqlen given or not; the same outputs and gradients as eager."""
    lens = [5, 11]
    cu = cu_seqlens(lens)
    q, k, v = make_inputs((16, 2, 8), (16, 2, 8), (16, 2, 8))

    def fn(q, k, v, cu):
        return F.attention_varlen(q, k, v, cu, cu, 11, 11, causal=True).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, cu)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    fn(q, k, v, cu).backward()
    torch.testing.assert_close(loss, fn(q, k, v, cu))
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad)
    no_max = torch.compile(lambda q, k, v, cu: F.attention_varlen(q, k, v, cu, cu, causal=True).sum(),
                           fullgraph=True, backend="aot_eager")
    eager_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    loss = no_max(q, k, v, cu)
    loss.backward()
    torch.testing.assert_close(loss, fn(q, k, v, cu))
    for g, t in zip(eager_grads, (q, k, v)):
        torch.testing.assert_close(t.grad, g)


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_nan_stays_in_its_sequence(device, backend):
    """A NaN in one sequence's keys reaches that sequence's rows and no other sequence's; a NaN query
    row stays in its row. Gradients of the other sequences stay finite."""
    lens = [6, 9, 5]
    cu = cu_seqlens(lens, device=device)
    q, k, v = make_inputs((20, 2, 8), (20, 2, 8), (20, 2, 8), requires_grad=False, device=device, seed=8)
    k[8, 1, 3] = float("nan")  # sequence 1 (rows 6:15), head 1
    q[17, 0, 0] = float("nan")  # sequence 2, row 17, head 0
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = F.attention_varlen(q, k, v, cu, cu, backend=backend)
    bad = ~torch.isfinite(out)
    expected = torch.zeros_like(bad)
    expected[6:15, 1] = True
    expected[17, 0] = True
    assert torch.equal(bad, expected)
    out.masked_fill(bad, 0.0).sum().backward()
    assert bool(torch.isfinite(q.grad[:6]).all()) and bool(torch.isfinite(k.grad[:6]).all())


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_seqused_k_padded_cache(device, backend):
    """A padded KV cache of 3 slots of 20 with ragged used lengths (seqused_k), queried by chunks of
    1-4 new tokens, bottom-right causal (decoding): forward and every gradient meet the oracle,
    the unused cache rows are never read (NaN there changes nothing) and get zero gradients."""
    slot, used = 20, [5, 17, 1]
    cu_k = torch.arange(4, dtype=torch.int32, device=device) * slot
    cu_q = cu_seqlens([1, 4, 1], device=device)
    seqused = torch.tensor(used, dtype=torch.int32, device=device)
    q, k, v = make_inputs((6, 4, 16), (3 * slot, 2, 16), (3 * slot, 2, 16), device=device, seed=31)
    unused = torch.ones(3 * slot, dtype=torch.bool, device=device)
    for s, n in enumerate(used):
        unused[s * slot:s * slot + n] = False
    with torch.no_grad():
        k[unused] = float("nan")
        v[unused] = float("nan")

    def fused(q, k, v, cu_q, cu_k, seqused):
        return F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alignment="bottom_right", seqused_k=seqused,
                                  backend=backend)

    def reference(q, k, v, cu_q, cu_k, seqused):
        return R.attention_varlen(q, k, v, cu_q, cu_k, True, alignment="bottom_right", seqused_k=seqused)

    results = check_against_reference(fused, reference, [q, k, v, cu_q, cu_k, seqused],
                                      names=["q", "k", "v", "cu_q", "cu_k", "seqused_k"])
    assert all(r.ok for r in results), "\n".join(map(str, results))
    k.grad = v.grad = None
    fused(q, k, v, cu_q, cu_k, seqused).sum().backward()
    assert torch.equal(k.grad[unused], torch.zeros_like(k.grad[unused]))
    assert torch.equal(v.grad[unused], torch.zeros_like(v.grad[unused]))


# Decoding steps against a padded cache (seqused_k) on the cpu backend: one or two queries per
# sequence, few query rows per kv head. The C++ op runs those without laying the used cache out as
# panels (float32: BLAS where every query sees all of its keys, else the panels; bfloat16 on
# AVX512-BF16 dot products: k and v read as rows, under any band); tests/test_cpu_attention_varlen.py
# checks which path each takes. The cache rows past seqused_k hold NaN: never read.
DECODE_CASES = [
    # (name, q lengths, used keys, Hq, Hkv, D, causal, window, extra)
    ("one query each, GQA", [1, 1, 1, 1], [50, 0, 64, 1], 8, 2, 64, True, None, None),
    ("one query each, not causal, softcap, ALiBi", [1, 1, 1], [33, 2, 17], 4, 4, 59, False, None, "softcap"),
    ("two queries, sliding window", [2, 1, 2], [60, 5, 64], 4, 2, 40, True, (16, 0), None),
    ("two queries, dropout, D 128", [2, 2], [40, 7], 2, 1, 128, True, None, "dropout"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_varlen_decoding_steps_cpu(case, dtype):
    if "cpu" not in [c.values[1] for c in cases(dtype)]:
        pytest.skip("the cpu backend is not built")
    name, lens_q, used, Hq, Hkv, D, causal, window, extra = case
    slot = 64
    n = len(lens_q)
    cu_q, cu_k = cu_seqlens(lens_q), torch.arange(n + 1, dtype=torch.int32) * slot
    seqused = torch.tensor(used, dtype=torch.int32)
    q, k, v = make_inputs((sum(lens_q), Hq, D), (n * slot, Hkv, D), (n * slot, Hkv, D), dtype=dtype, seed=41,
                          requires_grad=False)
    unused = torch.ones(n * slot, dtype=torch.bool)
    for s, m in enumerate(used):
        unused[s * slot:s * slot + m] = False
    k[unused] = float("nan")
    v[unused] = float("nan")
    softcap = 2.0 if extra == "softcap" else None
    slopes = torch.linspace(0.05, 0.4, Hq) if extra == "softcap" else None
    p = 0.25 if extra == "dropout" else 0.0

    def rng():
        return torch.Generator().manual_seed(11)

    def fused(q, k, v):
        return F.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, window_size=window, alignment="bottom_right",
                                  softcap=softcap, alibi_slopes=slopes, dropout_p=p, seqused_k=seqused,
                                  return_lse=True, backend="cpu", generator=rng())

    def reference(q, k, v):
        seed_offset = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=rng()).tolist()) if p else None
        return R.attention_varlen(q, k, v, cu_q, cu_k, causal, p, None, seed_offset, window_size=window,
                                  alignment="bottom_right", softcap=softcap, with_lse=True, seqused_k=seqused,
                                  alibi_slopes=None if slopes is None else slopes.to(q.dtype))

    results = check_against_reference(fused, reference, [q, k, v], names=["q", "k", "v"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.float32))
def test_varlen_index_views_equal_dense(device, backend):
    """cu_seqlens_q, cu_seqlens_k and seqused_k as strided views at an offset (``index_view``) and
    (B, Hq) ALiBi slopes stored transposed: output, lse and every gradient bitwise those of dense
    ones (the kernels must read them through their strides and offsets, or copy them)."""
    cu_q, cu_k = cu_seqlens([3, 1, 5], device=device), cu_seqlens([4, 6, 5], device=device)
    seqused = torch.tensor([4, 2, 5], dtype=torch.int32, device=device)
    slopes = torch.tensor([[0.5, 0.25], [0.1, 0.7], [0.3, 0.2]], device=device)
    q, k, v = make_inputs((9, 2, 16), (15, 1, 16), (15, 1, 16), device=device, seed=5, requires_grad=False)
    grad = torch.randn(9, 2, 16, generator=torch.Generator().manual_seed(1)).to(device)

    def run(cu_q, cu_k, seqused, slopes):
        q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = F.attention_varlen(q_, k_, v_, cu_q, cu_k, causal=True, alignment="bottom_right",
                                      seqused_k=seqused, alibi_slopes=slopes, return_lse=True, backend=backend)
        out.backward(grad)
        return out, lse, q_.grad, k_.grad, v_.grad

    dense = run(cu_q, cu_k, seqused, slopes)
    views = run(index_view(cu_q), index_view(cu_k), index_view(seqused), slopes.t().contiguous().t())
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), dense, views):
        assert torch.equal(a, b), name


def test_varlen_seqused_k_validation():
    q, k, v = make_inputs((4, 2, 8), (10, 2, 8), (10, 2, 8), requires_grad=False)
    cu_q, cu_k = cu_seqlens([2, 2]), cu_seqlens([4, 6])
    for used, exc, text in [(torch.tensor([5, 1]), ValueError, r"seqused_k\[0\] = 5 is outside \[0, 4\]"),
                            (torch.tensor([1, -1]), ValueError, r"seqused_k\[1\] = -1 is outside \[0, 6\]"),
                            (torch.tensor([1]), ValueError, r"one entry per sequence, shape \(2,\)"),
                            (torch.tensor([1.0, 2.0]), TypeError, "seqused_k must be int32 or int64"),
                            ([1, 2], TypeError, "seqused_k must be a torch.Tensor or None")]:
        with pytest.raises(exc, match=text):
            F.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=used)
    full = F.attention_varlen(q, k, v, cu_q, cu_k)
    torch.testing.assert_close(F.attention_varlen(q, k, v, cu_q, cu_k, seqused_k=torch.tensor([4, 6])), full)


def test_varlen_traced_call_checks_boundaries_when_it_runs():
    """Under torch.compile nothing is read on the host at trace time, so the op itself checks the
    boundaries when it runs: bad ones raise instead of steering the kernels out of bounds."""
    q, k, v = make_inputs((16, 2, 8), (16, 2, 8), (16, 2, 8), requires_grad=False)
    fn = torch.compile(lambda q, k, v, cu, m: F.attention_varlen(q, k, v, cu, cu, m, m), fullgraph=True,
                       backend="aot_eager", dynamic=False)
    good = cu_seqlens([5, 11])
    torch.testing.assert_close(fn(q, k, v, good, 11), F.attention_varlen(q, k, v, good, good))
    with pytest.raises(Exception, match="cu_seqlens_q must start at 0"):
        fn(q, k, v, torch.tensor([2, 5, 16], dtype=torch.int32), 11)
    with pytest.raises(Exception, match="max_seqlen_q = 4 is shorter than the longest sequence"):
        fn(q, k, v, good, 4)
    # the raw op checks too (a direct caller of torch.ops.fused_attn.attention_varlen_fwd)
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0"):
        torch.ops.fused_attn.attention_varlen_fwd(q, k, v, good, torch.tensor([1, 5, 16], dtype=torch.int32), 11, 11,
                                                  -2**62, 2**62, False, 0.0, 0.3, None, "cpu")


def test_reference_varlen_takes_each_sequence_from_one_split():
    """The reference backend's varlen forward (which its backward differentiates whole) sliced each
    sequence out of the packed tensors: every slice's backward made a gradient of the packed size,
    quadratic in the number of sequences (400 sequences of 64 tokens, H4 D64: 18 s of backward).
    Sorted boundaries are now cut by one torch.split (one cat in the backward); the parts are the
    sequences' rows, and unsorted boundaries are still sliced."""
    from fused_attn.backends.base import _rows_of

    def graph_names(t):
        names, stack = set(), [t.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None and type(node).__name__ not in names:
                names.add(type(node).__name__)
                stack.extend(n for n, _ in node.next_functions)
        return names

    t = torch.randn(10, 2, 3, requires_grad=True)
    part = _rows_of(t, [0, 4, 4, 9])
    assert torch.equal(part(0, 3), t[0:3].transpose(0, 1).unsqueeze(0))
    assert torch.equal(part(2, 5), t[4:9].transpose(0, 1).unsqueeze(0))
    assert part(1, 0).shape == (1, 2, 0, 3)
    assert "SplitWithSizesBackward0" in graph_names(part(2, 5))
    unsorted = _rows_of(t, [5, 0, 10])
    assert torch.equal(unsorted(0, 2), t[5:7].transpose(0, 1).unsqueeze(0))
    assert torch.equal(unsorted(1, 4), t[0:4].transpose(0, 1).unsqueeze(0))
