"""A paged KV cache: ``attention_varlen(..., block_table=)`` (FlashAttention's / vLLM's layout).

K and V are (num_pages, page_size, Hkv, dim) pages; sequence s's key j is row j % page_size of
page block_table[s, j // page_size], and its key count comes from cu_seqlens_k (or seqused_k).
The oracle packs each sequence's keys by hand, page by page, and runs the float64 reference on
the packed tensors; gradients reach the pages (summed over the sequences sharing one). The Triton
forward reads the pages in place; every other backend, and any call that needs gradients, gets
them gathered first. Runs on every backend of this machine.
"""
import pytest
import torch

import fused_attn
from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.testing import backend_cases, check_against_reference, index_view, make_inputs

PAGE = 16


def _cache(lengths, q_lengths, Hq=4, Hkv=2, D=24, Dv=24, pages_per_seq=8, spare_pages=5, device="cpu",
           dtype=torch.float32, seed=0, share_prefix=True, requires_grad=True):
    """Random pages in a random order, a block table (unused entries -1), and the queries. With
    ``share_prefix`` the last sequence starts on the first sequence's first page (a common prompt
    prefix: one page, two owners)."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // PAGE) for n in lengths]
    num_pages = sum(needed) + spare_pages
    order = torch.randperm(num_pages, generator=gen).tolist()
    table = torch.full((len(lengths), pages_per_seq), -1, dtype=torch.int32)
    it = iter(order)
    for s, n in enumerate(needed):
        for j in range(n):
            table[s, j] = next(it)
    if share_prefix and needed[0] and needed[-1]:
        table[-1, 0] = table[0, 0]
    q, k, v = make_inputs((sum(q_lengths), Hq, D), (num_pages, PAGE, Hkv, D), (num_pages, PAGE, Hkv, Dv),
                          dtype=dtype, seed=seed + 1, device=device, requires_grad=requires_grad)
    cu = lambda ls: torch.tensor([0] + torch.tensor(ls).cumsum(0).tolist(), dtype=torch.int32, device=device)  # noqa: E731
    return q, k, v, table.to(device), cu(q_lengths), cu(lengths)


def _packed(pages, table, lengths):
    """Each sequence's keys, page by page, back to back: the layout the reference runs on
    (differentiable: the pages' gradient is what flows back through these slices)."""
    rows = []
    for s, n in enumerate(lengths):
        for j in range(0, n, PAGE):
            rows.append(pages[int(table[s, j // PAGE])][:min(PAGE, n - j)])
    return torch.cat(rows) if rows else pages.new_zeros(0, *pages.shape[2:])


def cases(dtype=torch.float32):
    return backend_cases("attention", dtype)


# (name, key lengths, query lengths, options)
CASES = [
    ("decode ragged", (37, 0, 100, 5), (1, 1, 1, 1), dict(causal=True, alignment="bottom_right")),
    ("prefill chunks bottom-right", (33, 70, 16), (5, 17, 16), dict(causal=True, alignment="bottom_right")),
    ("window softcap alibi", (90, 41), (3, 41), dict(causal=True, alignment="bottom_right", window_size=(20, 0),
                                                     softcap=2.0, alibi=True)),
    ("dropout, seqused_k", (60, 48, 97), (4, 1, 9), dict(dropout=0.25, seqused=(59, 1, 97))),
]


def _run_case(backend, case, device, dtype=torch.float32, grad=True, views=False):
    """``views``: the block table, cu_seqlens and seqused_k as strided views at an offset (``index_view``)."""
    name, lengths, q_lengths, opts = case
    opts = dict(opts)
    q, k, v, table, cu_q, cu_k = _cache(lengths, q_lengths, device=device, dtype=dtype, seed=len(name),
                                        requires_grad=grad)
    p = opts.pop("dropout", 0.0)
    seqused = opts.pop("seqused", None)
    used = None if seqused is None else torch.tensor(seqused, dtype=torch.int32, device=device)
    if views:
        table, cu_q, cu_k = index_view(table), index_view(cu_q), index_view(cu_k)
        used = None if used is None else index_view(used)
    slopes = torch.tensor([0.3, -0.2, 0.1, 0.5], device=device) if opts.pop("alibi", False) else None
    rng = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    causal, window, alignment, softcap = (opts.get("causal", False), opts.get("window_size"),
                                          opts.get("alignment", "top_left"), opts.get("softcap"))

    def fused(q, k, v):
        return F.attention_varlen(q, k, v, cu_q, cu_k, block_table=table, seqused_k=used, dropout_p=p,
                                  alibi_slopes=slopes, return_lse=True, backend=backend, generator=rng(), **opts)

    def reference(q, k, v):
        kp, vp = _packed(k, table, lengths), _packed(v, table, lengths)
        seed_offset = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=rng()).tolist()) if p else None
        return R.attention_varlen(q, kp, vp, cu_q, cu_k, causal, p, None, seed_offset, window_size=window,
                                  alignment=alignment, softcap=softcap, with_lse=True, seqused_k=used,
                                  alibi_slopes=None if slopes is None else slopes.to(q.dtype))

    return check_against_reference(fused, reference, [q, k, v], names=["q", "k pages", "v pages"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", cases())
def test_paged_matches_reference(device, backend, case):
    """Output, lse and the gradients of q and of the pages against the float64 reference on the
    hand-packed keys."""
    results = _run_case(backend, case, device)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("device,backend", cases())
def test_paged_inference_matches_reference(device, backend, case):
    """Without gradients (decoding): the output and lse, from the pages read in place by the
    Triton forward, gathered for the other backends."""
    results = _run_case(backend, case, device, grad=False)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("case", CASES[:2], ids=[c[0] for c in CASES[:2]])
@pytest.mark.parametrize("device,backend", cases(torch.float16))
def test_paged_matches_reference_float16(device, backend, case):
    results = _run_case(backend, case, device, torch.float16)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASES[0][0], CASES[3][0]])
@pytest.mark.parametrize("device,backend", cases())
def test_paged_index_views_match_reference(device, backend, case):
    """A block table whose columns are not adjacent (a transposed or column-sliced table), and
    cu_seqlens / seqused_k with a stride and an offset, give the answer of dense ones. (The Triton
    kernel took only the table's row stride and stepped along a row by 1: it read wrong pages.)"""
    results = _run_case(backend, case, device, grad=False, views=True)
    assert all(r.ok for r in results), "\n".join(map(str, results))


TRITON_DEVICES = [pytest.param(c.values[0], marks=c.marks, id=c.values[0])
                  for c in backend_cases("attention") if c.values[1] == "triton"]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_reads_a_strided_block_table_in_place(device, monkeypatch, splits):
    """The Triton forward (unsplit and split-KV) on a transposed table and a column slice of a
    wider one: bitwise the answer on the dense table, pages still read in place
    (PAGED). A table whose columns are adjacent (a row slice of a wider one) reaches the kernel as
    it is, not copied."""
    from fused_attn.triton import attention as A

    monkeypatch.setattr(A, "KV_SPLITS", splits)
    tables_seen = []
    launch = A._launch

    def spy(kernel, rows, heads, args, constexprs):
        assert constexprs["PAGED"] and constexprs["SPLIT_KV"] == (splits > 1)
        tables_seen.append(args[-4])  # (..., BlockTable, stride_tb, stride_kpage, stride_vpage)
        return launch(kernel, rows, heads, args, constexprs)

    monkeypatch.setattr(A, "_launch", spy)
    # (the longest sequence spans 3 split-KV chunks of 128 keys: 17 pages of the 20 per row)
    q, k, v, table, cu_q, cu_k = _cache((37, 0, 260, 5), (2, 1, 3, 1), Hq=2, Hkv=1, D=16, Dv=16, pages_per_seq=20,
                                        device=device, seed=5, requires_grad=False)
    B, P = table.shape
    wide = torch.zeros(B, 3 * P, dtype=torch.int32, device=device)
    wide[:, ::3] = table
    tables = {"dense": table, "transposed": table.t().contiguous().t(), "column slice": wide[:, ::3]}

    def run(t):
        return F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alignment="bottom_right", block_table=t,
                                  return_lse=True, backend="triton")

    expected = run(tables["dense"])
    for name, t in tables.items():
        got = run(t)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), name
    # the columns in use (17 of 20) of a table with adjacent columns: a view of the table itself
    padded = torch.zeros(B, P + 3, dtype=torch.int32, device=device)
    padded[:, :P] = table
    tables_seen.clear()
    got = run(padded[:, :P])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert tables_seen[0].data_ptr() == padded.data_ptr() and tables_seen[0].stride() == padded.stride()


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_reads_pages_in_place(device, monkeypatch, splits):
    """Without gradients the Triton forward reads the pages through the block table; it gives
    exactly what it gives on the gathered pages (same keys, same order of operations)."""
    from fused_attn.ops_common import gather_kv_pages, paged_layout
    from fused_attn.triton import attention as A

    monkeypatch.setattr(A, "KV_SPLITS", splits)
    seen = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda kernel, *a: (seen.append(a[3]["PAGED"]), launch(kernel, *a)))
    lengths = (37, 0, 100, 5)
    q, k, v, table, cu_q, cu_k = _cache(lengths, (3, 1, 4, 1), device=device, seed=3)
    with torch.no_grad():
        paged, paged_lse = F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alignment="bottom_right",
                                              block_table=table, return_lse=True, backend="triton")
        kg, vg = gather_kv_pages(k, v, table)
        cu_g, used = paged_layout(table, PAGE, cu_k, None)
        gathered, gathered_lse = F.attention_varlen(q, kg, vg, cu_q, cu_g, causal=True, alignment="bottom_right",
                                                    seqused_k=used, return_lse=True, backend="triton")
    assert seen == [True, False]
    assert torch.equal(paged, gathered)
    assert torch.equal(paged_lse, gathered_lse)


@pytest.mark.parametrize("device,backend", cases())
def test_paged_inputs_are_not_modified(device, backend):
    q, k, v, table, cu_q, cu_k = _cache((20, 33), (2, 3), device=device)
    before = [t.detach().clone() for t in (q, k, v, table, cu_q, cu_k)]
    out = F.attention_varlen(q, k, v, cu_q, cu_k, block_table=table, backend=backend)
    out.sum().backward()
    for t, b in zip((q, k, v, table, cu_q, cu_k), before):
        assert torch.equal(t.detach(), b)


def _bad(**changes):
    q, k, v, table, cu_q, cu_k = _cache((20, 33), (2, 3))
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, block_table=table)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,error,match", [
    (lambda a: dict(block_table=a["block_table"].long()), TypeError, "block_table must be int32"),
    (lambda a: dict(block_table=a["block_table"][0]), ValueError, "block_table must be 2-D"),
    (lambda a: dict(block_table=a["block_table"][:1]), ValueError, "one row per sequence"),
    (lambda a: dict(block_table=a["block_table"].float()), TypeError, "block_table must be int32"),
    (lambda a: dict(block_table=[[0]]), TypeError, "block_table must be a torch.Tensor"),
    (lambda a: dict(k=a["k"].flatten(0, 1)), ValueError, "k must be 4-D"),
    (lambda a: dict(v=a["v"][:, :8]), ValueError, "same pages"),
    (lambda a: dict(k=a["k"][..., :8]), ValueError, "head dim"),
    (lambda a: dict(block_table=a["block_table"][:, :1]), ValueError, "addresses 1 pages of 16 rows"),
    (lambda a: dict(block_table=torch.where(a["block_table"] >= 0, a["block_table"] + 100, -1).int()),
     ValueError, "outside the"),
    (lambda a: dict(cu_seqlens_k=torch.tensor([0, 30, 20], dtype=torch.int32)), ValueError, "never decrease"),
])
def test_paged_bad_input_names_the_argument(changes, error, match):
    args = _bad()
    args.update(changes(args))
    with pytest.raises(error, match=match):
        F.attention_varlen(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q"),
                           args.pop("cu_seqlens_k"), backend="reference", **args)


def test_paged_under_torch_compile():
    """The paged call traces (the table's checks then run inside the op) and gives the eager answer."""
    q, k, v, table, cu_q, cu_k = _cache((37, 5), (1, 1))
    q, k, v = (t.detach() for t in (q, k, v))

    def f(q, k, v, table, cu_q, cu_k):
        return F.attention_varlen(q, k, v, cu_q, cu_k, 1, 37, causal=True, alignment="bottom_right",
                                  block_table=table)

    eager = f(q, k, v, table, cu_q, cu_k)
    compiled = torch.compile(f, fullgraph=True, backend="eager")(q, k, v, table, cu_q, cu_k)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("grad", [False, True])
def test_only_the_table_columns_in_use_are_gathered(monkeypatch, grad):
    """A decoding table is sized for the longest context; the paths that gather pages (every
    backend but Triton's forward, and every call with gradients) take only the columns some
    sequence reads: here 7 of 500 (the longest sequence has 100 keys in pages of 16), not 500."""
    import fused_attn.functional as functional
    seen = []
    gather = functional.gather_kv_pages

    def spy(k, v, block_table):
        seen.append(tuple(block_table.shape))
        return gather(k, v, block_table)

    monkeypatch.setattr(functional, "gather_kv_pages", spy)
    lengths, q_lengths = (37, 0, 100, 5), (1, 1, 1, 1)
    q, k, v, table, cu_q, cu_k = _cache(lengths, q_lengths, pages_per_seq=500, requires_grad=grad)
    wide = torch.full((4, 500), -7, dtype=torch.int32)  # junk past the used entries is never read
    wide[:, :8] = table[:, :8]
    table = wide
    out = F.attention_varlen(q, k, v, cu_q, cu_k, block_table=table, causal=True, alignment="bottom_right",
                             backend="reference")
    assert seen == [(4, 7)]
    expected = R.attention_varlen(q, _packed(k, table, lengths), _packed(v, table, lengths), cu_q, cu_k,
                                  causal=True, alignment="bottom_right")
    torch.testing.assert_close(out, expected)
    if grad:
        out.sum().backward()
        assert k.grad is not None and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if fused_attn.extension_error() is None else []))
def test_raw_op_refuses_block_table_for_a_backend_without_paged_kv(backend):
    """torch.ops.fused_attn.attention_varlen_fwd(..., block_table=) on a backend that reads no
    pages raised a bare TypeError (an unexpected keyword of the backend's method); now a
    ValueError saying to gather the pages first (the functional layer does so itself)."""
    from fused_attn.ops_common import NO_BAND

    q, k_pages, v_pages = torch.randn(4, 2, 8), torch.randn(3, 4, 2, 8), torch.randn(3, 4, 2, 8)
    cu, table = torch.tensor([0, 4], dtype=torch.int32), torch.tensor([[0, 1]], dtype=torch.int32)
    with pytest.raises(ValueError, match=f"block_table is given but the '{backend}' backend reads no paged K/V"):
        torch.ops.fused_attn.attention_varlen_fwd(q, k_pages, v_pages, cu, cu, 4, 4, *NO_BAND, False, 0.0, 0.3, None,
                                                  backend, block_table=table)
