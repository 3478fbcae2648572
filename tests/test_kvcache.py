"""Decoding against a KV cache: ``attention_with_kvcache`` (FlashAttention's ``flash_attn_with_kvcache``).

The call writes the new keys and values into the cache in place, at positions cache_seqlens[b] ..
cache_seqlens[b] + Lnew - 1, then attends q to each sequence's first cache_seqlens[b] + Lnew keys,
bottom-right aligned. The oracle never looks at the written cache: it takes each sequence's old
keys from a pristine copy of the cache (row by row, or page by page through the block table),
appends the new k and v, and runs ``reference.attention`` in float64 on every sequence alone. The
cache rows the call must not read (past each sequence's keys, the new rows before the write,
spare pages, unused cache rows) hold NaN, so a read out of place, a write to the wrong offset or a
dropped write all show up as NaN in the output. Dense and paged caches, on every backend of this
machine (the Triton one under TRITON_INTERPRET=1 on the CPU).
"""
import pytest
import torch

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.testing import backend_cases, check_against_reference, index_view, make_inputs

PAGE = 16
NAN = float("nan")


def cases(dtype=torch.float32):
    return backend_cases("attention", dtype)


# id, then the shapes and options; dense caches are Lmax = 17 rows, paged ones pages of 16 rows.
CASES = [
    dict(id="decode, ragged lengths incl. empty and full", B=4, Lq=1, new=1, seqlens=[0, 5, 16, 9], Hq=4, Hkv=2,
         D=40, causal=True),
    dict(id="no new keys: full, empty and partial caches", B=3, Lq=1, new=0, seqlens=[17, 0, 9], Hq=2, Hkv=2, D=40,
         causal=True),
    dict(id="speculative chunk, bottom-right causal, Dv != D", B=3, Lq=4, new=4, seqlens=[0, 3, 13], Hq=4, Hkv=1,
         D=59, Dv=40, causal=True),
    dict(id="more queries than keys: dead rows", B=2, Lq=3, new=1, seqlens=[0, 6], Hq=2, Hkv=2, D=24, causal=True),
    dict(id="chunk without causal", B=2, Lq=3, new=2, seqlens=[4, 15], Hq=2, Hkv=1, D=24, causal=False),
    dict(id="cache_batch_idx", B=3, Lq=2, new=2, seqlens=[4, 0, 15], Hq=4, Hkv=2, D=40, causal=True,
         batch_idx=[4, 0, 2], cache_rows=5),
    dict(id="cache_batch_idx, no new keys, a row read twice", B=3, Lq=1, new=0, seqlens=[6, 17, 2], Hq=2, Hkv=2,
         D=24, causal=True, batch_idx=[1, 1, 0], cache_rows=2),
    dict(id="paged decode", B=4, Lq=1, new=1, seqlens=[37, 0, 47, 5], Hq=4, Hkv=2, D=40, causal=True, paged=True),
    dict(id="paged chunk across page boundaries, full table", B=2, Lq=3, new=3, seqlens=[14, 61], Hq=2, Hkv=2, D=24,
         causal=True, paged=True),
    dict(id="paged, no new keys", B=3, Lq=2, new=0, seqlens=[0, 33, 64], Hq=2, Hkv=1, D=32, Dv=24, causal=True,
         paged=True),
    dict(id="window softcap alibi sinks scale", B=3, Lq=2, new=2, seqlens=[9, 0, 15], Hq=4, Hkv=2, D=32, causal=True,
         window=(4, 0), softcap=1.0, alibi="per head", sinks=True, scale=0.2),
    dict(id="two-sided window, per-batch alibi", B=2, Lq=3, new=1, seqlens=[10, 3], Hq=2, Hkv=2, D=16, causal=False,
         window=(3, 1), alibi="per batch"),
    dict(id="paged window sinks", B=2, Lq=2, new=1, seqlens=[30, 8], Hq=2, Hkv=1, D=24, causal=True, window=(6, 0),
         sinks=True, paged=True),
    dict(id="int cache_seqlens, strided cache view", B=2, Lq=1, new=1, seqlens=7, Hq=2, Hkv=2, D=24, causal=True,
         strided=True),
    dict(id="int64 cache_seqlens", B=2, Lq=2, new=1, seqlens=[3, 11], Hq=2, Hkv=2, D=24, causal=True,
         seqlens_dtype=torch.int64),
    dict(id="cache_leftpad: left-padded prompts, one all padding", B=3, Lq=1, new=1, seqlens=[9, 5, 16],
         leftpad=[4, 0, 16], Hq=4, Hkv=2, D=40, causal=True),
    dict(id="cache_leftpad, cache_batch_idx, chunk, window, per-batch alibi, sinks", B=3, Lq=3, new=2,
         seqlens=[6, 12, 3], leftpad=[2, 7, 3], batch_idx=[2, 0, 1], cache_rows=3, Hq=2, Hkv=1, D=24, causal=True,
         window=(3, 0), alibi="per batch", sinks=True),
    dict(id="cache_leftpad, no new keys, a sequence with none", B=2, Lq=2, new=0, seqlens=[17, 8], leftpad=[5, 8],
         Hq=2, Hkv=2, D=16, causal=False, seqlens_dtype=torch.int64),
    dict(id="cache_leftpad among the new keys: a left-padded prefill", B=3, Lq=4, new=4, seqlens=[0, 0, 2],
         leftpad=[1, 3, 4], Hq=2, Hkv=1, D=24, causal=True, alibi="per head"),
    # views: cache_seqlens, cache_batch_idx, cache_leftpad and block_table as strided views at an
    # offset (fused_attn.testing.index_view), a transposed block table among them
    dict(id="paged, index tensors as strided views", B=3, Lq=2, new=1, seqlens=[20, 0, 33], Hq=2, Hkv=1, D=16,
         causal=True, paged=True, views=True),
    dict(id="cache_batch_idx, index tensors as strided views", B=2, Lq=1, new=1, seqlens=[5, 9], batch_idx=[2, 0],
         batch_idx_dtype=torch.int32, cache_rows=3, Hq=2, Hkv=2, D=16, causal=True, views=True),
    dict(id="cache_leftpad, cache_batch_idx, index tensors as strided views", B=3, Lq=2, new=1, seqlens=[6, 12, 3],
         leftpad=[2, 7, 0], batch_idx=[2, 0, 1], cache_rows=3, Hq=2, Hkv=1, D=16, causal=True, views=True),
]
LMAX = 17
PAGES_PER_SEQ = 4


def _setup(case, device="cpu", dtype=torch.float32, seed=0):
    """The call's inputs, the cache holding NaN wherever the call must not read (the rows the new
    keys go to included), and the block table (paged: random pages, unused entries -1)."""
    c = dict(case)
    B, Lq, new, Hq, Hkv, D = c["B"], c["Lq"], c["new"], c["Hq"], c["Hkv"], c["D"]
    Dv = c.get("Dv", D)
    lengths = c["seqlens"] if isinstance(c["seqlens"], list) else [c["seqlens"]] * B
    gen = torch.Generator().manual_seed(seed)
    table = batch_idx = None
    if c.get("paged"):
        needed = [-(-(n + new) // PAGE) for n in lengths]
        num_pages = sum(needed) + 3
        order = iter(torch.randperm(num_pages, generator=gen).tolist())
        table = torch.full((B, PAGES_PER_SEQ), -1, dtype=torch.int32)
        for b, m in enumerate(needed):
            for j in range(m):
                table[b, j] = next(order)
        slots, rows = num_pages, PAGE
    else:
        slots, rows = c.get("cache_rows", B), LMAX
        if "batch_idx" in c:
            batch_idx = torch.tensor(c["batch_idx"], dtype=c.get("batch_idx_dtype", torch.int64))
    q, k, v, kc, vc = make_inputs((B, Lq, Hq, D), (B, new, Hkv, D), (B, new, Hkv, Dv), (slots, rows, Hkv, D),
                                  (slots, rows, Hkv, Dv), dtype=dtype, device=device, seed=seed + 1,
                                  requires_grad=False)
    pads = c.get("leftpad", [0] * B)  # the padding rows before each sequence's keys: never read
    valid = torch.zeros(slots, rows, dtype=torch.bool)  # the old keys the call may read
    for b, n in enumerate(lengths):
        for j in range(pads[b], n):
            if table is not None:
                valid[int(table[b, j // PAGE]), j % PAGE] = True
            else:
                valid[b if batch_idx is None else int(batch_idx[b]), j] = True
    kc[~valid.to(device)] = NAN
    vc[~valid.to(device)] = NAN
    if c.get("strided"):  # caches as views of a wider buffer: not viewable as packed rows
        kc = torch.cat([kc, torch.zeros_like(kc[:, :3])], 1)[:, :rows]
        vc = torch.cat([vc, torch.zeros_like(vc[:, :3])], 1)[:, :rows]
    if isinstance(c["seqlens"], list):
        seqlens = torch.tensor(lengths, dtype=c.get("seqlens_dtype", torch.int32), device=device)
    else:
        seqlens = c["seqlens"]
    alibi = None
    if c.get("alibi") == "per head":
        alibi = torch.linspace(0.1, 0.6, Hq, device=device)
    elif c.get("alibi") == "per batch":
        alibi = torch.linspace(-0.3, 0.5, B * Hq, device=device).view(B, Hq)
    sinks = torch.linspace(-1.0, 2.0, Hq, device=device) if c.get("sinks") else None
    if new == 0:
        k = v = None
    kwargs = dict(cache_seqlens=seqlens, cache_batch_idx=None if batch_idx is None else batch_idx.to(device),
                  block_table=None if table is None else table.to(device), causal=c.get("causal", False),
                  cache_leftpad=torch.tensor(pads, device=device) if "leftpad" in c else None,
                  window_size=c.get("window"), scale=c.get("scale"), softcap=c.get("softcap"), alibi_slopes=alibi,
                  sinks=sinks)
    if c.get("views"):  # the same values, neither contiguous nor at the start of their storage
        for name in ("cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table"):
            if isinstance(kwargs[name], torch.Tensor):
                kwargs[name] = index_view(kwargs[name])
    return q, kc, vc, k, v, kwargs, lengths


def _old_keys(cache, b, n, kwargs):
    """Sequence b's cached keys, the first n rows of its cache past its left padding, from the
    (unwritten) cache: (n - cache_leftpad[b], Hkv, dim)."""
    table, idx, pads = kwargs["block_table"], kwargs["cache_batch_idx"], kwargs["cache_leftpad"]
    if table is not None:
        return torch.stack([cache[int(table[b, j // PAGE]), j % PAGE] for j in range(n)]) if n else cache[0, :0]
    return cache[b if idx is None else int(idx[b]), (0 if pads is None else int(pads[b])):n]


def oracle(q, kc, vc, k, v, kwargs, lengths, return_lse=True):
    """Each sequence alone through ``reference.attention``, bottom-right aligned, on its old keys
    followed by the new ones: out (B, Lq, Hq, Dv), lse (B, Hq, Lq)."""
    alibi, sinks = kwargs["alibi_slopes"], kwargs["sinks"]
    wide = torch.promote_types(q.dtype, torch.float32)
    outs, lses = [], []
    for b, n in enumerate(lengths):
        ks, vs = _old_keys(kc, b, n, kwargs), _old_keys(vc, b, n, kwargs)
        if k is not None:  # after any new keys that are still left padding
            skip = 0 if kwargs["cache_leftpad"] is None else max(int(kwargs["cache_leftpad"][b]) - n, 0)
            ks, vs = torch.cat([ks, k[b, skip:]]), torch.cat([vs, v[b, skip:]])
        qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (q[b], ks, vs))  # (1, heads, len, dim)
        slopes = None if alibi is None else (alibi if alibi.dim() == 1 else alibi[b]).to(q.dtype)
        opts = dict(window_size=kwargs["window_size"], alignment="bottom_right", softcap=kwargs["softcap"],
                    alibi_slopes=slopes)
        outs.append(R.attention(qs, ks, vs, None, kwargs["causal"], 0.0, kwargs["scale"], None,
                                sinks=None if sinks is None else sinks.to(q.dtype), **opts)[0].transpose(0, 1))
        lses.append(R.attention_lse(qs.to(wide), ks.to(wide), None, kwargs["causal"], kwargs["scale"],
                                    sinks=None if sinks is None else sinks.to(wide), **opts)[0])
    out = torch.stack(outs)
    return (out, torch.stack(lses)) if return_lse else out


def _check(case, device, backend, dtype=torch.float32, return_lse=True):
    q, kc, vc, k, v, kwargs, lengths = _setup(case, device, dtype)

    def fused(q, kc, vc, k, v):
        if case.get("strided"):  # check_against_reference hands over contiguous copies: rebuild the views
            kc, vc = (torch.cat([t, torch.zeros_like(t[:, :3])], 1)[:, :LMAX] for t in (kc, vc))
        return F.attention_with_kvcache(q, kc, vc, k, v, return_lse=return_lse, backend=backend, **kwargs)

    def reference(q, kc, vc, k, v):
        return oracle(q, kc, vc, k, v, kwargs, lengths, return_lse)

    return check_against_reference(fused, reference, [q, kc, vc, k, v], names=["q", "k_cache", "v_cache", "k", "v"])


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
@pytest.mark.parametrize("device,backend", cases())
def test_kvcache_matches_reference(device, backend, case):
    """Output and lse against the float64 oracle on the old keys plus the new ones."""
    results = _check(case, device, backend)
    assert all(r.ok for r in results), "\n".join(map(str, results))


HALF_CASES = [CASES[0], CASES[2], CASES[5], CASES[8], CASES[16]]


@pytest.mark.parametrize("case", HALF_CASES, ids=[c["id"] for c in HALF_CASES])
@pytest.mark.parametrize("device,backend", cases(torch.float16))
def test_kvcache_matches_reference_float16(device, backend, case):
    results = _check(case, device, backend, torch.float16, return_lse=False)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases(torch.bfloat16) if torch.cuda.is_available() else [])
def test_kvcache_matches_reference_bfloat16(device, backend):
    if device != "cuda" or backend == "reference":
        pytest.skip("bfloat16 runs on the GPU")
    results = _check(CASES[7], device, backend, torch.bfloat16)
    assert all(r.ok for r in results), "\n".join(map(str, results))


# bfloat16 on the cpu backend: few query rows per kv head (every case here), so on the AVX512-BF16
# dot products the packed op reads the cache's k and v as rows (any band; elsewhere the float32
# panels of the used keys): dense and paged caches, windows, the cap, ALiBi, sinks, leftpad.
CPU_BF16_CASES = [CASES[0], CASES[2], CASES[7], CASES[10], CASES[12], CASES[15]]


@pytest.mark.parametrize("case", CPU_BF16_CASES, ids=[c["id"] for c in CPU_BF16_CASES])
def test_kvcache_matches_reference_bfloat16_cpu(case):
    if "cpu" not in [c.values[1] for c in cases(torch.bfloat16)]:
        pytest.skip("the cpu backend is not built")
    results = _check(case, "cpu", "cpu", torch.bfloat16)
    assert all(r.ok for r in results), "\n".join(map(str, results))


WRITE_CASES = [CASES[0], CASES[2], CASES[5], CASES[8], CASES[13], CASES[16], CASES[18], CASES[19], CASES[21]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # (gpu: pytest -m gpu)
@pytest.mark.parametrize("case", WRITE_CASES, ids=[c["id"] for c in WRITE_CASES])
def test_kvcache_write_changes_exactly_the_new_rows(case, device):
    """After the call the cache holds k and v at rows cache_seqlens[b] .. + Lnew - 1 of sequence b's
    cache row (or pages) and is bitwise unchanged everywhere else (NaN included); q, k, v,
    cache_seqlens and the index tensors are untouched; the output is a fresh tensor."""
    q, kc, vc, k, v, kwargs, lengths = _setup(case, device)
    expected_k, expected_v = kc.clone(), vc.clone()
    table, idx = kwargs["block_table"], kwargs["cache_batch_idx"]
    for b, n in enumerate(lengths):
        for i in range(k.shape[1]):
            j = n + i
            if table is not None:
                where = (int(table[b, j // PAGE]), j % PAGE)
            else:
                where = (b if idx is None else int(idx[b]), j)
            expected_k[where], expected_v[where] = k[b, i], v[b, i]
    inputs = {"q": q, "k": k, "v": v, **{n: t for n, t in kwargs.items() if isinstance(t, torch.Tensor)}}
    before = {n: t.clone() for n, t in inputs.items()}
    out = F.attention_with_kvcache(q, kc, vc, k, v, backend="reference", **kwargs)
    assert torch.equal(kc.isnan(), expected_k.isnan()) and torch.equal(vc.isnan(), expected_v.isnan())
    assert torch.equal(kc.nan_to_num(), expected_k.nan_to_num()) and torch.equal(vc.nan_to_num(),
                                                                                 expected_v.nan_to_num())
    for n, t in inputs.items():
        assert torch.equal(t.nan_to_num(), before[n].nan_to_num()), n
    assert all(out.data_ptr() != t.data_ptr() for t in (q, kc, vc, k, v))
    if case.get("strided"):  # the write went to the wider buffer the cache views
        assert kc._base is not None and torch.equal(kc._base[:, :LMAX].nan_to_num(), expected_k.nan_to_num())


@pytest.mark.parametrize("device,backend", cases())
def test_kvcache_decode_loop_is_causal_attention(device, backend):
    """A prompt prefilled through the cache, then tokens decoded one at a time, each step writing its
    key and value: every step's output is the row a single causal pass over the whole sequence
    gives it, and the cache ends up holding the whole sequence's keys and values."""
    B, Hq, Hkv, D, prompt, steps = 2, 4, 2, 24, 5, 4
    total = prompt + steps
    q, k, v = make_inputs((B, total, Hq, D), (B, total, Hkv, D), (B, total, Hkv, D), requires_grad=False,
                          device=device, seed=21)
    full = F.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                       backend="reference").transpose(1, 2)
    kc, vc = torch.full((B, LMAX, Hkv, D), NAN, device=device), torch.full((B, LMAX, Hkv, D), NAN, device=device)
    out = F.attention_with_kvcache(q[:, :prompt], kc, vc, k[:, :prompt], v[:, :prompt], cache_seqlens=0, causal=True,
                                   backend=backend)
    torch.testing.assert_close(out, full[:, :prompt])
    for t in range(prompt, total):
        seqlens = torch.full((B,), t, dtype=torch.int32, device=device)
        out = F.attention_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1], v[:, t:t + 1], cache_seqlens=seqlens,
                                       causal=True, backend=backend)
        torch.testing.assert_close(out, full[:, t:t + 1])
    assert torch.equal(kc[:, :total], k) and torch.equal(vc[:, :total], v) and bool(kc[:, total:].isnan().all())


@pytest.mark.parametrize("device,backend", cases())
def test_kvcache_dense_paged_and_batch_idx_agree(device, backend):
    """One cache held three ways, dense, behind cache_batch_idx (rows in another order, among
    others) and paged (pages shuffled), gives the same answer and the same written rows."""
    B, Hq, Hkv, D, Lq = 3, 2, 1, 16, 2
    lengths = [5, 0, 15]  # the last one's new keys straddle two pages
    q, k, v, old_k, old_v = make_inputs((B, Lq, Hq, D), (B, Lq, Hkv, D), (B, Lq, Hkv, D), (B, 32, Hkv, D),
                                        (B, 32, Hkv, D), requires_grad=False, device=device, seed=5)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    opts = dict(cache_seqlens=seqlens, causal=True, return_lse=True, backend=backend)
    dense_k, dense_v = old_k.clone(), old_v.clone()
    dense = F.attention_with_kvcache(q, dense_k, dense_v, k, v, **opts)
    idx = torch.tensor([3, 0, 1], device=device)
    rows_k, rows_v = torch.zeros(4, 32, Hkv, D, device=device), torch.zeros(4, 32, Hkv, D, device=device)
    rows_k[idx], rows_v[idx] = old_k, old_v
    by_idx = F.attention_with_kvcache(q, rows_k, rows_v, k, v, cache_batch_idx=idx, **opts)
    order = torch.randperm(B * 2, generator=torch.Generator().manual_seed(1)).view(B, 2)  # page of row (b, half)
    pages_k, pages_v = torch.zeros(B * 2, PAGE, Hkv, D, device=device), torch.zeros(B * 2, PAGE, Hkv, D, device=device)
    pages_k[order.flatten()], pages_v[order.flatten()] = old_k.reshape(B * 2, PAGE, Hkv, D), old_v.reshape(
        B * 2, PAGE, Hkv, D)
    table = order.to(device=device, dtype=torch.int32)
    paged = F.attention_with_kvcache(q, pages_k, pages_v, k, v, block_table=table, **opts)
    for other in (by_idx, paged):
        torch.testing.assert_close(other[0], dense[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other[1], dense[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(rows_k[idx], dense_k) and torch.equal(rows_v[idx], dense_v)
    assert torch.equal(pages_k[order.flatten()].view(B, 32, Hkv, D), dense_k)
    assert torch.equal(pages_v[order.flatten()].view(B, 32, Hkv, D), dense_v)


def test_kvcache_reads_the_lengths_once(monkeypatch):
    """An eager call copies its lengths (and the table's flags) to the host once, in its own
    checks: attention_varlen is handed them and does not read and check its boundaries or the
    table again (on a GPU each of those is a sync of the decoding step). A public attention_varlen
    call still checks both."""
    import fused_attn.functional as functional
    calls = []
    for name in ("check_block_table", "check_varlen_bounds"):
        original = getattr(functional, name)
        monkeypatch.setattr(functional, name, lambda *a, _name=name, _f=original, **kw: (calls.append(_name),
                                                                                         _f(*a, **kw))[1])
    for case in (c for c in CASES if c["id"] in ("decode, ragged lengths incl. empty and full", "cache_batch_idx",
                                                 "paged chunk across page boundaries, full table")):
        q, kc, vc, k, v, kwargs, lengths = _setup(case, "cpu")
        out = F.attention_with_kvcache(q, kc, vc, k, v, backend="reference", **kwargs)
        torch.testing.assert_close(out, oracle(q, kc, vc, k, v, kwargs, lengths, False).to(out.dtype))
    assert calls == []
    q, k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    F.attention_varlen(q, k, v, cu, cu, backend="reference")
    assert calls == ["check_varlen_bounds"]


@pytest.mark.parametrize("layout", ["contiguous", "expanded", "sequence-major"])
def test_kvcache_copies_only_the_rows_read_of_a_cache_that_does_not_flatten(layout, monkeypatch):
    """A dense cache whose (B, Lmax) rows do not flatten into one strided run (a shared prefix
    expanded over the batch, a cache stored (Lmax, B, H, D)) is read as packed rows after a copy:
    of the rows some sequence reads, not of the whole cache (B x Lmax rows on every decoding step).
    A contiguous cache is read in place."""
    import fused_attn.functional as functional
    B, Lmax, used = 3, 64, [5, 9, 2]
    g = torch.Generator().manual_seed(3)
    base_k, base_v = torch.randn(B, Lmax, 2, 8, generator=g), torch.randn(B, Lmax, 2, 8, generator=g)
    if layout == "expanded":
        kc, vc = base_k[:1].expand(B, -1, -1, -1), base_v[:1].expand(B, -1, -1, -1)
    elif layout == "sequence-major":
        kc, vc = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (base_k, base_v))
    else:
        kc, vc = base_k, base_v
    seen = []
    varlen = functional.attention_varlen
    monkeypatch.setattr(functional, "attention_varlen",
                        lambda q, k, v, *a, **kw: (seen.append(k), varlen(q, k, v, *a, **kw))[1])
    q = torch.randn(B, 1, 4, 8, generator=g)
    out = F.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor(used), backend="cpu")
    expected = torch.cat([R.attention(q[b:b + 1].transpose(1, 2), kc[b:b + 1, :n].transpose(1, 2),
                                      vc[b:b + 1, :n].transpose(1, 2), None, False).transpose(1, 2)
                          for b, n in enumerate(used)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    keys = seen[0]
    if layout == "contiguous":
        assert keys.shape[0] == B * Lmax and keys.data_ptr() == kc.data_ptr()  # (a view)
    else:
        assert keys.shape[0] == B * max(used)


@pytest.mark.parametrize("device", [pytest.param(c.values[0], marks=c.marks, id=c.values[0])
                                    for c in backend_cases("attention") if c.values[1] == "triton"])
def test_triton_reads_the_cache_in_place(device, monkeypatch):
    """The Triton backend reads a dense cache as packed rows and a cache behind cache_batch_idx as
    one page per cache row (the PAGED forward): no gather of the cache either way."""
    from fused_attn.triton import attention as A

    seen = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda kernel, *a: (kernel == "fwd" and seen.append(a[3]["PAGED"]),
                                                          launch(kernel, *a)))
    for case in (CASES[0], CASES[5]):
        q, kc, vc, k, v, kwargs, lengths = _setup(case, device)
        out = F.attention_with_kvcache(q, kc, vc, k, v, backend="triton", **kwargs)
        torch.testing.assert_close(out, oracle(q, kc, vc, k, v, kwargs, lengths, False).to(out.dtype))
    assert seen == [False, True]


def test_kvcache_refuses_a_cache_whose_rows_share_memory():
    """A cache expanded over the batch (stride 0) would have sequence 0's new key land in every
    sequence's row: the write is refused before anything is written, as rotary's in-place call
    refuses such an x. Read-only calls (no new keys) still take it."""
    q = torch.randn(2, 1, 2, 8)
    base = torch.randn(1, 6, 2, 8)
    kc, vc = base.expand(2, 6, 2, 8), base.clone().expand(2, 6, 2, 8)
    k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    before = base.clone()
    with torch.no_grad():
        with pytest.raises(ValueError, match="k_cache has overlapping elements .* pass a cache with memory of its own"):
            F.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor([2, 3]))
        assert torch.equal(base, before)
        out = F.attention_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([2, 3]))
    assert out.shape == (2, 1, 2, 8)


ALIASES = ["k and v rows of their caches", "crossed: k from v_cache, v from k_cache", "q a row being written"]


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("B", [2, 1])  # batch 1: the views are contiguous, where torch's own check raised
@pytest.mark.parametrize("alias", ALIASES)
@pytest.mark.parametrize("device,backend", cases())
def test_kvcache_new_keys_that_view_the_cache_are_read_before_the_write(device, backend, alias, B, paged):
    """New k and v (or q) that are views of the cache's rows (rows copied ahead, a reused buffer)
    give the output and the cache of the same call on copies of them: rows 2, 3 written to rows
    3, 4 hold the old rows 2, 3, where a write reading its source as it wrote copied row 2 twice
    (batch > 1) or raised torch's "single memory location" error (batch 1, contiguous views)."""
    g = torch.Generator().manual_seed(0)
    kc = torch.randn(B, 8, 1, 16, generator=g).to(device)
    vc = torch.randn(B, 8, 1, 16, generator=g).to(device)
    q = torch.randn(B, 1, 1, 16, generator=g).to(device)
    kwargs = dict(cache_seqlens=3, causal=True, backend=backend)
    if paged:  # the cache rows as pages of 8 rows, sequence b on page B - 1 - b
        kwargs["block_table"] = torch.arange(B - 1, -1, -1, dtype=torch.int32, device=device).view(B, 1)
    expected_k, expected_v = kc.clone(), vc.clone()
    if alias == ALIASES[0]:
        k, v = kc[:, 2:4], vc[:, 2:4]
    elif alias == ALIASES[1]:
        k, v = vc[:, 2:4], kc[:, 2:4]
    else:
        k, v, q = kc[:, 2:4], vc[:, 2:4], kc[:, 4:5]
    with torch.no_grad():
        expected = F.attention_with_kvcache(q.clone(), expected_k, expected_v, k.clone(), v.clone(), **kwargs)
        out = F.attention_with_kvcache(q, kc, vc, k, v, **kwargs)
    assert torch.equal(kc, expected_k) and torch.equal(vc, expected_v)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("device, backend", backend_cases("attention", varlen=True))
def test_kvcache_inference_cache_outside_inference_mode_is_refused_before_any_write(device, backend):
    # torch refuses an in-place write into an inference tensor outside inference mode, but only at
    # the second cache's write: k_cache was already changed when the error came
    with torch.inference_mode():
        k_cache, v_cache = torch.zeros(2, 8, 1, 4, device=device), torch.zeros(2, 8, 1, 4, device=device)
    q, k, v = (torch.randn(2, 1, 1, 4, device=device), torch.ones(2, 1, 1, 4, device=device),
               torch.ones(2, 1, 1, 4, device=device))
    with torch.no_grad(), pytest.raises(RuntimeError, match="k_cache: Inplace update to inference tensor"):
        F.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3, backend=backend)
    assert not k_cache.any() and not v_cache.any()
    with torch.inference_mode():  # where torch allows the write, so does the call
        F.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=3, backend=backend)
    assert k_cache[:, 3].eq(1).all() and v_cache[:, 3].eq(1).all()
    with torch.no_grad():  # read-only calls write nothing and are allowed
        F.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=4, backend=backend)


def test_kvcache_refuses_a_k_cache_sharing_memory_with_v_cache():
    """A k_cache and v_cache that share memory (one tensor passed twice, overlapping views of one
    buffer) would have the new values written over the new keys: with new k and v the call raises
    before writing anything. A read-only call takes them (nothing is written), and the distinct
    halves of a packed (B, L, 2, H, D) buffer are two caches."""
    q, k, v = torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8), torch.randn(2, 1, 2, 8)
    buf = torch.randn(2, 6, 2, 12)
    seqlens = torch.tensor([2, 3])
    for kc, vc in ((buf[..., :8], buf[..., :8]), (buf[..., :8], buf[..., 4:]), (buf[..., 4:], buf[..., :8])):
        before = buf.clone()
        with torch.no_grad():
            with pytest.raises(ValueError, match=r"k_cache and v_cache share memory .* pass caches of distinct memory"):
                F.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens)
            assert torch.equal(buf, before)
            out = F.attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens)
            expected = F.attention_with_kvcache(q, kc.clone(), vc.clone(), cache_seqlens=seqlens)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert torch.equal(buf, before)
    packed = torch.randn(2, 6, 2, 2, 8)
    expected_k, expected_v = packed[:, :, 0].clone(), packed[:, :, 1].clone()
    with torch.no_grad():
        expected = F.attention_with_kvcache(q, expected_k, expected_v, k, v, cache_seqlens=seqlens)
        out = F.attention_with_kvcache(q, packed[:, :, 0], packed[:, :, 1], k, v, cache_seqlens=seqlens)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(packed[:, :, 0], expected_k) and torch.equal(packed[:, :, 1], expected_v)


def test_kvcache_refuses_inputs_that_require_grad():
    """An inference call, as FlashAttention's: a tensor that requires grad raises, under grad mode
    only, before the cache is written; under no_grad the same call runs."""
    q, kc, vc, k, v, kwargs, _ = _setup(CASES[0])
    for name in ("q", "k_cache", "v_cache", "k", "v", "sinks"):
        args = dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v)
        extra = dict(kwargs)
        if name == "sinks":
            extra["sinks"] = torch.zeros(q.shape[2], requires_grad=True)
        else:
            args[name] = args[name].detach().clone().requires_grad_()
        cache_before = args["k_cache"].detach().clone()
        with pytest.raises(ValueError, match=f"{name} requires grad, but attention_with_kvcache is an inference"):
            F.attention_with_kvcache(**args, **extra)
        assert torch.equal(args["k_cache"].detach().nan_to_num(), cache_before.nan_to_num())
        with torch.no_grad():
            out = F.attention_with_kvcache(**args, **extra)
        assert not out.requires_grad
    with torch.inference_mode():
        qi, kci, vci = q.clone(), kc.clone(), vc.clone()
        F.attention_with_kvcache(qi, kci, vci, k.clone(), v.clone(), **kwargs)


ROTARY_CASES = [(CASES[0], False), (CASES[2], True), (CASES[4], False), (CASES[5], True), (CASES[8], False),
                (CASES[10], True), (CASES[16], True), (CASES[19], False), (CASES[21], True)]


def rope_tables(rows, half):
    angles = torch.outer(torch.arange(rows, dtype=torch.float64), 1.0 / 500.0 ** (torch.arange(half) / half))
    return angles.cos().float(), angles.sin().float()


def rope_positions(case, kwargs, lengths, Lq, new):
    """FlashAttention's: new key i at cache_seqlens[b] + i; queries there too when causal or local,
    else all at cache_seqlens[b]."""
    start = torch.tensor(lengths)[:, None]
    steps = case.get("causal") or case.get("window") is not None
    return (start + torch.arange(Lq)) if steps else start.expand(-1, Lq), start + torch.arange(new)


@pytest.mark.parametrize("case,interleaved", ROTARY_CASES, ids=[f"{c['id']}{', interleaved' if i else ''}"
                                                                for c, i in ROTARY_CASES])
@pytest.mark.parametrize("device,backend", cases())
def test_kvcache_rotary_embeds_new_keys_and_queries(device, backend, case, interleaved):
    """rotary_cos/rotary_sin: the oracle turns q and the new keys (float64) to FlashAttention's
    positions and attends; the cache receives the turned keys, exactly what apply_rotary_emb gives."""
    q, kc, vc, k, v, kwargs, lengths = _setup(case, device)
    half = min(case["D"] // 2, 12) if interleaved else case["D"] // 2  # partial rotary on some
    cos, sin = (t.to(device) for t in rope_tables(70, half))
    q_pos, k_pos = rope_positions(case, kwargs, lengths, q.shape[1], k.shape[1])
    rope = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved)

    def fused(q, kc, vc, k, v):
        return F.attention_with_kvcache(q, kc, vc, k, v, return_lse=True, backend=backend, **rope, **kwargs)

    def reference(q, kc, vc, k, v):
        q = R.rotary(q, cos, sin, q_pos.to(device), interleaved)
        k = R.rotary(k, cos, sin, k_pos.to(device), interleaved)
        return oracle(q, kc, vc, k, v, kwargs, lengths)

    check_against_reference(fused, reference, [q, kc, vc, k, v], names=["q", "k_cache", "v_cache", "k", "v"])
    kc_written = kc.clone()
    F.attention_with_kvcache(q, kc_written, vc.clone(), k, v, backend=backend, **rope, **kwargs)
    turned = F.apply_rotary_emb(k, cos, sin, position_ids=k_pos.to(device), interleaved=interleaved,
                                backend=backend)
    for b, n in enumerate(lengths):
        for i in range(k.shape[1]):
            j = n + i
            table, idx = kwargs["block_table"], kwargs["cache_batch_idx"]
            row = (kc_written[int(table[b, j // PAGE]), j % PAGE] if table is not None
                   else kc_written[b if idx is None else int(idx[b]), j])
            assert torch.equal(row, turned[b, i])


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_kvcache_window_wider_than_the_cache_is_no_window(paged):
    """FlashAttention's rule: a window side at least the cache's capacity (rows, or pages x page
    size) is unbounded, so such a window is no window, RoPE included: the queries stay at
    cache_seqlens (a local call steps them) and the answer is bitwise None's."""
    q, kc, vc, k, v, kwargs, _ = _setup(dict(CASES[8], causal=False) if paged else CASES[4])
    assert q.shape[1] > 1 and not kwargs.get("causal") and kwargs.get("window_size") is None
    table = kwargs["block_table"]
    capacity = table.shape[1] * kc.shape[1] if paged else kc.shape[1]
    cos, sin = rope_tables(70, q.shape[-1] // 2)

    def call(window):
        with torch.no_grad():
            return F.attention_with_kvcache(q, kc.clone(), vc.clone(), k, v, rotary_cos=cos, rotary_sin=sin,
                                            **dict(kwargs, window_size=window))

    none = call(None)
    for window in ((-1, capacity), (capacity, capacity + 7), (capacity, -1)):
        assert torch.equal(call(window), none), window
    assert not torch.equal(call((capacity - 1, -1)), none)  # a side below capacity still steps the queries


def test_kvcache_rotary_under_torch_compile():
    q, kc, vc, k, v, kwargs, lengths = _setup(CASES[2])
    cos, sin = rope_tables(70, 16)

    def f(q, kc, vc, k, v, cache_seqlens):
        return F.attention_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=sin,
                                        **dict(kwargs, cache_seqlens=cache_seqlens))

    eager_k = kc.clone()
    eager = f(q, eager_k, vc.clone(), k, v, kwargs["cache_seqlens"])
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    out = compiled(q, kc, vc, k, v, kwargs["cache_seqlens"])
    torch.testing.assert_close(out, eager, equal_nan=True)
    assert torch.equal(kc.nan_to_num(), eager_k.nan_to_num())
    short_cos, short_sin = cos[:15], sin[:15]  # 13 + 4 new keys reach position 16
    g = torch.compile(lambda *a: F.attention_with_kvcache(*a, rotary_cos=short_cos, rotary_sin=short_sin, **kwargs),
                      fullgraph=True, backend="aot_eager", dynamic=False)
    with pytest.raises(Exception, match="must index the rows of cos and sin"):
        g(q, kc, vc, k, v)


def _bad_inputs(paged=False):
    case = CASES[8] if paged else dict(CASES[5], seqlens=[4, 0, 14])  # dense: room for 3 new keys in row 2
    q, kc, vc, k, v, kwargs, _ = _setup(case)
    return dict(q=q, k_cache=kc, v_cache=vc, k=k, v=v, **kwargs)


def _int(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


DENSE_ERRORS = [
    (lambda a: dict(rotary_cos=rope_tables(20, 8)[0]), ValueError, "rotary_cos was given without rotary_sin"),
    (lambda a: dict(rotary_sin=rope_tables(20, 8)[1]), ValueError, "rotary_sin was given without rotary_cos"),
    (lambda a: dict(zip(("rotary_cos", "rotary_sin"), rope_tables(20, 8)), k=None, v=None), ValueError,
     "pass the new k and v too"),
    (lambda a: dict(zip(("rotary_cos", "rotary_sin"), rope_tables(15, 8))), ValueError,
     "rotary_cos and rotary_sin have 15 rows, but cache_seqlens = 14 puts a new key or query at position 15"),
    (lambda a: dict(zip(("rotary_cos", "rotary_sin"), rope_tables(20, 21))), ValueError,
     "must have between 1 and D/2 = 20 columns"),
    (lambda a: dict(rotary_cos=rope_tables(20, 8)[0], rotary_sin=rope_tables(20, 4)[1]), ValueError,
     "rotary_cos and rotary_sin must have the same shape"),
    (lambda a: dict(zip(("rotary_cos", "rotary_sin"), rope_tables(20, 8)), rotary_interleaved="yes"), TypeError,
     "rotary_interleaved must be a bool"),
    # (without tables too: a bad flag was ignored until tables came with it)
    (lambda a: dict(rotary_interleaved="yes"), TypeError, "rotary_interleaved must be a bool, got str 'yes'"),
    (lambda a: dict(rotary_interleaved=1, k=None, v=None), TypeError, "rotary_interleaved must be a bool"),
    (lambda a: dict(v=None), ValueError, "k was given without v"),
    (lambda a: dict(k=None), ValueError, "v was given without k"),
    (lambda a: dict(q=a["q"][0]), ValueError, "q must be 4-D"),
    (lambda a: dict(k_cache=a["k_cache"][0]), ValueError, "k_cache must be 4-D"),
    (lambda a: dict(v_cache=a["v_cache"][None]), ValueError, "v_cache must be 4-D"),
    (lambda a: dict(k=a["k"][0], v=a["v"][0]), ValueError, "k must be 4-D"),
    (lambda a: dict(q=a["q"].long()), TypeError, "q must be a floating-point tensor"),
    (lambda a: dict(k_cache=[1.0]), TypeError, "k_cache must be a torch.Tensor"),
    (lambda a: dict(k_cache=a["k_cache"].double()), TypeError, "k_cache has dtype float64 but q has float32"),
    (lambda a: dict(v=a["v"].half()), TypeError, "v has dtype float16 but q has float32"),
    (lambda a: dict(v_cache=a["v_cache"].to("meta")), ValueError, "v_cache is on meta but q is on cpu"),
    (lambda a: dict(k=a["k"].to("meta")), ValueError, "k is on meta but q is on cpu"),
    (lambda a: dict(v_cache=a["v_cache"][:, :16]), ValueError, "k_cache and v_cache must have the same cache rows"),
    (lambda a: dict(k_cache=a["k_cache"][..., :8]), ValueError, "q and k_cache must have the same head dim"),
    (lambda a: dict(k_cache=a["k_cache"][:, :, :1].expand(5, 17, 3, 40), v_cache=a["v_cache"][:, :, :1].expand(
        5, 17, 3, 40)), ValueError, r"query heads \(q.shape\[2\] = 4\) must be a multiple of the key/value heads"),
    (lambda a: dict(k=a["k"][:, :, :1], v=a["v"][:, :, :1]), ValueError, r"k must have shape \(B, Lnew, Hkv, D\)"),
    (lambda a: dict(v=a["v"][:, :1]), ValueError, r"v must have shape \(B, Lnew, Hkv, Dv\) = \(3, 2, 2, 40\)"),
    (lambda a: dict(cache_batch_idx=None), ValueError, "k_cache has 5 cache rows .* but q has batch 3"),
    (lambda a: dict(cache_seqlens=_int([4, 0, 16])), ValueError,
     r"cache_seqlens\[2\] = 16 plus the 2 new keys of k makes 18 keys, more than the 17 rows"),
    (lambda a: dict(cache_seqlens=_int([4, 18, 1]), k=None, v=None), ValueError,
     r"cache_seqlens\[1\] = 18 makes 18 keys, more than the 17 rows"),
    (lambda a: dict(cache_seqlens=_int([4, -1, 1])), ValueError, r"cache_seqlens\[1\] = -1 is negative"),
    (lambda a: dict(cache_seqlens=-2), ValueError, "cache_seqlens must be >= 0"),
    (lambda a: dict(cache_seqlens=16), ValueError, r"cache_seqlens\[0\] = 16 plus the 2 new keys"),
    (lambda a: dict(cache_seqlens=True), TypeError, "cache_seqlens must be an int or an int32/int64 tensor"),
    (lambda a: dict(cache_seqlens=[4, 0, 1]), TypeError, "cache_seqlens must be an int or an int32/int64 tensor"),
    (lambda a: dict(cache_seqlens=None), TypeError, "cache_seqlens must be an int or an int32/int64 tensor"),
    (lambda a: dict(cache_seqlens=_int([4.0, 0.0, 1.0], torch.float32)), TypeError,
     "cache_seqlens must be int32 or int64, got float32"),
    (lambda a: dict(cache_seqlens=_int([4, 0])), ValueError,
     r"cache_seqlens must have one entry per batch row, shape \(3,\)"),
    (lambda a: dict(cache_seqlens=_int([4, 0, 1]).to("meta")), ValueError, "cache_seqlens is on meta but q is on cpu"),
    (lambda a: dict(cache_batch_idx=_int([4, 5, 2])), ValueError,
     r"cache_batch_idx\[1\] = 5 is outside the 5 cache rows of k_cache"),
    (lambda a: dict(cache_batch_idx=_int([4, -1, 2])), ValueError, r"cache_batch_idx\[1\] = -1 is outside"),
    (lambda a: dict(cache_batch_idx=_int([4, 0, 4])), ValueError,
     r"cache_batch_idx\[0\] and cache_batch_idx\[2\] both name cache row 4"),
    (lambda a: dict(cache_batch_idx=_int([4, 0, 2], torch.float32)), TypeError,
     "cache_batch_idx must be int32 or int64"),
    (lambda a: dict(cache_batch_idx=_int([[4, 0, 2]])), ValueError,
     "cache_batch_idx must have one entry per batch row"),
    (lambda a: dict(cache_batch_idx=[4, 0, 2]), TypeError, "cache_batch_idx must be a torch.Tensor"),
    (lambda a: dict(block_table=_int([[0], [1], [2]])), ValueError,
     "cache_batch_idx cannot be combined with block_table"),
    (lambda a: dict(window_size=(-2, 0)), ValueError, "window_size sides must be >= 0"),
    (lambda a: dict(softcap=-1.0), ValueError, "softcap must be 0 or None \\(off\\), or a number in \\[1e-30"),
    (lambda a: dict(softcap=1e-39), ValueError, "or a number in \\[1e-30"),
    (lambda a: dict(scale=float("inf")), ValueError, "scale must be a finite float"),  # (a bad value, not type)
    (lambda a: dict(causal=1), TypeError, "causal must be a bool"),
    (lambda a: dict(return_lse="yes"), TypeError, "return_lse must be a bool"),
    (lambda a: dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must have shape \(Hq,\) = \(4,\)"),
    (lambda a: dict(sinks=torch.ones(2)), ValueError, r"sinks must have shape \(Hq,\) = \(4,\)"),
    (lambda a: dict(backend="fastest"), ValueError, "backend must be one of"),
    (lambda a: dict(cache_leftpad=_int([0, 0, 18])), ValueError,
     r"cache_leftpad\[2\] = 18 must be >= 0 and <= cache_seqlens\[2\] \+ Lnew = 16"),
    (lambda a: dict(cache_leftpad=_int([0, -1, 0])), ValueError, r"cache_leftpad\[1\] = -1 must be >= 0"),
    (lambda a: dict(cache_leftpad=_int([0, 0])), ValueError, r"cache_leftpad must have one entry per batch row"),
    (lambda a: dict(cache_leftpad=torch.zeros(3)), TypeError, "cache_leftpad must be int32 or int64"),
]
PAGED_ERRORS = [
    (lambda a: dict(cache_seqlens=_int([14, 62])), ValueError,
     r"cache_seqlens\[1\] = 62 plus the 3 new keys of k makes 65 keys, more than the 64 keys its block_table row "
     r"addresses \(4 pages of 16 rows\)"),
    (lambda a: dict(block_table=a["block_table"][:, :2], cache_seqlens=_int([14, 30])), ValueError,
     r"cache_seqlens\[1\] = 30 plus the 3 new keys of k makes 33 keys, more than the 32"),
    (lambda a: dict(block_table=torch.where(torch.arange(4) == 1, -1, a["block_table"]).int()), ValueError,
     r"block_table\[0\] names page -1, outside the \d+ pages of k_cache"),
    (lambda a: dict(block_table=torch.where(torch.arange(4) == 3, 99, a["block_table"]).int()), ValueError,
     r"block_table\[1\] names page 99"),
    (lambda a: dict(block_table=torch.stack([a["block_table"][0], torch.cat([a["block_table"][0, :1],
                                                                              a["block_table"][1, 1:]])]),
                    cache_seqlens=_int([14, 15])), ValueError,
     r"block_table rows 0 and 1 both place new keys on rows 15..15 of page"),
    (lambda a: dict(block_table=a["block_table"].long()), TypeError, "block_table must be int32"),
    (lambda a: dict(block_table=a["block_table"][:1]), ValueError, r"block_table must have one row per sequence \(2\)"),
    (lambda a: dict(block_table=a["block_table"][0]), ValueError, "block_table must be 2-D"),
    (lambda a: dict(v_cache=a["v_cache"][:, :8]), ValueError, "k_cache and v_cache must have the same pages"),
    (lambda a: dict(cache_batch_idx=_int([0, 1])), ValueError, "cache_batch_idx cannot be combined with block_table"),
    (lambda a: dict(cache_leftpad=_int([0, 1])), ValueError, "cache_leftpad cannot be combined with block_table"),
]


@pytest.mark.parametrize("paged,changes,error,match", [(False, *e) for e in DENSE_ERRORS] +
                         [(True, *e) for e in PAGED_ERRORS])
def test_kvcache_bad_input_names_the_argument(paged, changes, error, match):
    """Each bad input raises, naming the argument and the value, before anything is written: the
    cache is unchanged after the refused call."""
    args = _bad_inputs(paged)
    caches = [args["k_cache"].clone(), args["v_cache"].clone()]
    args.update(changes(args))
    with pytest.raises(error, match=match):
        F.attention_with_kvcache(**args)
    for t, before in zip((args["k_cache"], args["v_cache"]), caches):
        if isinstance(t, torch.Tensor) and t.shape == before.shape and t.device == before.device:
            assert torch.equal(t.nan_to_num(), before.nan_to_num())
    F.attention_with_kvcache(**_bad_inputs(paged))  # the unchanged call runs


def test_kvcache_is_exported():
    import fused_attn

    assert fused_attn.attention_with_kvcache is F.attention_with_kvcache
    assert "attention_with_kvcache" in F.__all__ and "attention_with_kvcache" in fused_attn.__all__


def test_kvcache_empty_batch_and_no_new_rows():
    """A batch of none and a k of zero new keys are no-ops on the cache."""
    q, kc, vc = make_inputs((0, 1, 2, 8), (0, 17, 2, 8), (0, 17, 2, 8), requires_grad=False)
    out, lse = F.attention_with_kvcache(q, kc, vc, cache_seqlens=0, return_lse=True)
    assert out.shape == (0, 1, 2, 8) and lse.shape == (0, 2, 1)
    q, kc, vc, k, v = make_inputs((2, 1, 2, 8), (2, 17, 2, 8), (2, 17, 2, 8), (2, 0, 2, 8), (2, 0, 2, 8),
                                  requires_grad=False)
    before = kc.clone()
    out = F.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=_int([17, 3]))
    assert torch.equal(kc, before)
    torch.testing.assert_close(out, F.attention_with_kvcache(q, kc, vc, cache_seqlens=_int([17, 3])))


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_kvcache_under_torch_compile(paged):
    """The call traces without graph breaks (the cache sizes bound max_seqlen, nothing is read on
    the host), writes the cache of the compiled call's caller in place and gives the eager answer;
    bad lengths fail when the compiled call runs (asserted on the device), before the write."""
    q, kc, vc, k, v, kwargs, _ = _setup(CASES[8] if paged else CASES[2])
    kwargs["return_lse"] = True

    def f(q, kc, vc, k, v, cache_seqlens):
        return F.attention_with_kvcache(q, kc, vc, k, v, **dict(kwargs, cache_seqlens=cache_seqlens))

    seqlens = kwargs["cache_seqlens"]
    eager_k, eager_v = kc.clone(), vc.clone()
    eager = f(q, eager_k, eager_v, k, v, seqlens)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    out = compiled(q, kc, vc, k, v, seqlens)
    torch.testing.assert_close(out, eager, equal_nan=True)
    assert torch.equal(kc.nan_to_num(), eager_k.nan_to_num()) and torch.equal(vc.nan_to_num(), eager_v.nan_to_num())
    before = kc.clone()
    bad = seqlens.clone()
    bad[1] = 62 if paged else 14  # 14 + 4 new keys > 17 rows; 62 + 3 > 64
    with pytest.raises(Exception, match="attention_with_kvcache: cache_seqlens must be >= 0"):
        compiled(q, kc, vc, k, v, bad)
    bad[1] = -1
    with pytest.raises(Exception, match="attention_with_kvcache: cache_seqlens must be >= 0"):
        compiled(q, kc, vc, k, v, bad)
    assert torch.equal(kc.nan_to_num(), before.nan_to_num())


def test_kvcache_leftpad_under_torch_compile():
    """cache_leftpad traces too (the padding becomes boundaries built on the device) and gives the
    eager answer; a padding longer than the cached keys fails when the compiled call runs."""
    q, kc, vc, k, v, kwargs, _ = _setup(CASES[16])

    def f(q, kc, vc, k, v, cache_leftpad):
        return F.attention_with_kvcache(q, kc, vc, k, v, return_lse=True, **dict(kwargs, cache_leftpad=cache_leftpad))

    pads = kwargs["cache_leftpad"]
    eager_k = kc.clone()
    eager = f(q, eager_k, vc.clone(), k, v, pads)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    out = compiled(q, kc, vc, k, v, pads)
    torch.testing.assert_close(out, eager, equal_nan=True)
    assert torch.equal(kc.nan_to_num(), eager_k.nan_to_num())
    with pytest.raises(Exception, match="cache_leftpad must be >= 0 and <= cache_seqlens"):
        compiled(q, kc, vc, k, v, pads + 8)


def test_kvcache_leftpad_is_the_unpadded_cache():
    """A left-padded cache gives what the same keys give packed at the start of their rows, bitwise
    on the CPU backend (the same kernel over the same keys)."""
    B, Hq, Hkv, D = 3, 4, 2, 32
    pads, lengths = [3, 0, 6], [8, 5, 6]
    q, k, v, kc, vc = make_inputs((B, 1, Hq, D), (B, 1, Hkv, D), (B, 1, Hkv, D), (B, 20, Hkv, D), (B, 20, Hkv, D),
                                  requires_grad=False, seed=3)
    packed_k, packed_v = torch.zeros_like(kc), torch.zeros_like(vc)
    for b, (p, n) in enumerate(zip(pads, lengths)):
        packed_k[b, :n - p], packed_v[b, :n - p] = kc[b, p:n], vc[b, p:n]
    padded = F.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=torch.tensor(lengths), causal=True,
                                      cache_leftpad=torch.tensor(pads), return_lse=True)
    packed = F.attention_with_kvcache(q, packed_k, packed_v, k, v, causal=True, return_lse=True,
                                      cache_seqlens=torch.tensor([n - p for p, n in zip(pads, lengths)]))
    for a, b in zip(padded, packed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for b, (p, n) in enumerate(zip(pads, lengths)):  # the new keys went after the padded keys
        assert torch.equal(kc[b, n], k[b, 0]) and torch.equal(packed_k[b, n - p], k[b, 0])


def test_tensors_may_share_memory_memoised_verdicts():
    """tensors_may_share_memory memoises its layout test (~5 us, every decoding step of a packed
    cache): asked twice, overlapping and distinct views of one buffer get the same verdicts."""
    from fused_attn.ops_common import tensors_may_share_memory

    kv = torch.randn(2, 6, 2, 3, 4)
    flat = kv.flatten()
    pairs = [(kv[:, :, 0], kv[:, :, 1], False), (kv[:, :, 0], kv[:, :, 0], True), (flat[:40], flat[30:70], True),
             (flat[:40], flat[40:80], False), (kv[:, :3, 0], kv[:, 2:, 0], True), (kv[:, :3, 0], kv[:, 3:, 0], False)]
    for _ in range(2):
        assert [tensors_may_share_memory(a, b) for a, b, _ in pairs] == [want for *_, want in pairs]
