"""Split-KV (flash-decoding) and packed query groups in the Triton attention forward.

A forward with few query blocks (decoding) splits the keys among several programs per query
block, each writing a partial output and lse to float32 scratch, and ``_attn_fwd_combine`` merges
them: out = sum_s exp(lse_s - lse) o_s with lse = log sum_s exp(lse_s). With one query per head and
grouped-query attention the group's query heads become the rows of one query block ("pack GQA"),
so that K and V are read once per group. On a GPU ``kv_splits`` decides from the SM count; the
tests force the count (``attention.KV_SPLITS``), which also runs the kernels under the interpreter.
They run on the GPU when there is one (``device``), else under the interpreter on the CPU.
"""
import pytest
import torch

pytest.importorskip("triton")

from fused_attn import functional as F  # noqa: E402
from fused_attn import reference as R  # noqa: E402
from fused_attn.backends import available_backends  # noqa: E402
from fused_attn.testing import check_against_reference, make_inputs  # noqa: E402

pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="the triton backend is not available")


@pytest.fixture
def A():
    from fused_attn.triton import attention
    return attention


@pytest.fixture
def splits(A, monkeypatch):
    """Force the split count of every Triton forward: ``splits(n)``."""
    def force(n):
        monkeypatch.setattr(A, "KV_SPLITS", n)
    return force


# (name, B, Hq, Hkv, Lq, Lk, D, Dv, options)
CASES = [
    ("decode gqa packed", 2, 4, 2, 1, 300, 40, 40, {}),
    ("decode gqa packed, padding mask, dropout", 2, 6, 2, 1, 333, 16, 24, {"mask": "bool", "dropout": 0.3}),
    ("decode bottom-right window", 1, 2, 2, 1, 600, 16, 16, {"window_size": (200, 0), "alignment": "bottom_right"}),
    ("chunk bottom-right causal softcap alibi", 1, 2, 1, 5, 700, 59, 59,
     {"causal": True, "alignment": "bottom_right", "softcap": 2.0, "alibi": True}),
    ("decode additive mask with dead rows", 2, 2, 1, 1, 260, 16, 16, {"mask": "dead"}),
    ("decode one key", 1, 4, 2, 1, 1, 16, 16, {}),
]


def _run_case(case, device, dtype=torch.float32):
    name, B, Hq, Hkv, Lq, Lk, D, Dv, opts = case
    opts = dict(opts)
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), dtype=dtype, seed=len(name),
                          device=device)
    inputs, names = [q, k, v], ["q", "k", "v"]
    mask = opts.pop("mask", None)
    gen = torch.Generator().manual_seed(4)
    if mask == "bool":  # padding: each batch entry's prompt starts at its own key
        starts = torch.tensor([0, 37])[:B, None, None, None]
        inputs.append((torch.arange(Lk)[None, None, None, :] >= starts).to(device))
        names.append("mask")
    elif mask == "dead":  # batch entry 1 sees no key: zeros, lse +inf, zero gradients
        m = torch.randn(B, 1, Lq, Lk, generator=gen, dtype=dtype)
        m[1] = float("-inf")
        inputs.append(m.to(device))
        names.append("mask")
    p = opts.pop("dropout", 0.0)
    slopes = torch.tensor([0.3, -0.2], device=device)[:Hq] if opts.pop("alibi", False) else None
    rng = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    causal, window, alignment, softcap = (opts.get("causal", False), opts.get("window_size"),
                                          opts.get("alignment", "top_left"), opts.get("softcap"))

    def fused(q, k, v, mask=None):
        return F.attention(q, k, v, attn_mask=mask, dropout_p=p, alibi_slopes=slopes, return_lse=True,
                           backend="triton", generator=rng(), **opts)

    def reference(q, k, v, mask=None):
        seed_offset = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=rng()).tolist()) if p else None
        alibi = None if slopes is None else slopes.to(q.dtype)
        out = R.attention(q, k, v, mask, causal, p, None, seed_offset, window_size=window, alignment=alignment,
                          softcap=softcap, alibi_slopes=alibi)
        return out, R.attention_lse(q, k, mask, causal, window_size=window, alignment=alignment, softcap=softcap,
                                    alibi_slopes=alibi)

    return check_against_reference(fused, reference, inputs, names=names)


@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_split_forward_matches_reference(splits, device, case, num_splits):
    """Output, lse and every gradient (the backward runs on the merged output and lse) against the
    float64 definition, the keys split in 2 or 5 (capped by the 128-key chunks a call spans)."""
    splits(num_splits)
    results = _run_case(case, device)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("case", [CASES[1], CASES[3]], ids=[CASES[1][0], CASES[3][0]])
def test_split_forward_matches_reference_float16(splits, device, case):
    splits(3)
    results = _run_case(case, device, torch.float16)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_split_forward_matches_reference_bfloat16(splits, case):
    """bfloat16 (not under the interpreter, which has no bfloat16 arithmetic), and the automatic
    split count of the card."""
    splits(None)
    results = _run_case(case, "cuda", torch.bfloat16)
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_split_equals_unsplit(splits, device):
    """The merge reproduces the unsplit forward to float32 rounding, dead rows included (zeros,
    lse +inf), with the same dropout mask."""
    q, k, v = make_inputs((2, 4, 1, 32), (2, 2, 517, 32), (2, 2, 517, 32), requires_grad=False, seed=1,
                          device=device)
    mask = torch.ones(2, 1, 1, 517, dtype=torch.bool, device=device)
    mask[1, :, :, :] = False

    def run(n):
        splits(n)
        return F.attention(q, k, v, attn_mask=mask, dropout_p=0.2, return_lse=True, backend="triton",
                           generator=torch.Generator().manual_seed(5))

    (o1, l1), (o4, l4) = run(1), run(4)
    torch.testing.assert_close(o4, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l4, l1, rtol=1e-6, atol=1e-6)
    assert bool((o4[1] == 0).all()) and bool(torch.isinf(l4[1]).all()) and bool((l4[1] > 0).all())


def test_nan_stays_in_its_rows(splits, device):
    """A NaN key reaches the rows that see it (batch entry 0, through its split's lse and output)
    and no other row."""
    splits(3)
    q, k, v = make_inputs((2, 2, 1, 16), (2, 1, 400, 16), (2, 1, 400, 16), requires_grad=False, seed=2,
                          device=device)
    k[0, 0, 390, 3] = float("nan")
    out, lse = F.attention(q, k, v, return_lse=True, backend="triton")
    assert bool(torch.isnan(out[0]).all()) and bool(torch.isnan(lse[0]).all())
    assert bool(torch.isfinite(out[1]).all()) and bool(torch.isfinite(lse[1]).all())


def test_split_scratch_past_int32_offsets_runs_unsplit(A, splits, monkeypatch, device):
    """The merge reaches split s's partials at the int32 offset s * (rows * Dv): a split count whose
    float32 scratch would pass 2**31 elements (only a forced one, on a long prefill) runs the forward
    unsplit. The limit is shrunk here to what 3 splits of this call need (2 * 4 * 16 rows, Dv 8)."""
    launches = []
    launch = A._launch
    monkeypatch.setattr(A, "_launch", lambda kernel, *rest: launches.append(rest[3].get("SPLIT_KV")) or
                        launch(kernel, *rest))
    q, k, v = make_inputs((2, 4, 16, 8), (2, 4, 300, 8), (2, 4, 300, 8), requires_grad=False, device=device)
    splits(3)
    expected = F.attention(q, k, v, backend="triton")
    monkeypatch.setattr(A, "_INT32_MAX", 3 * 2 * 4 * 16 * 8 - 1)
    torch.testing.assert_close(F.attention(q, k, v, backend="triton"), expected, rtol=1e-5, atol=1e-6)
    assert launches == [True, False]


def test_decoding_packs_query_groups(A, splits, monkeypatch, device):
    """With one query per head and GQA the forward runs (B * Hkv * splits) programs of `group` rows;
    with ALiBi (a slope per query head) or a band (it moves with the row) it does not pack."""
    launches = []
    launch = A._launch

    def spy(kernel, grid_rows, heads, args, constexprs):
        launches.append((kernel, grid_rows, heads, constexprs.get("SPLIT_KV")))
        return launch(kernel, grid_rows, heads, args, constexprs)

    monkeypatch.setattr(A, "_launch", spy)
    splits(3)
    q, k, v = make_inputs((2, 8, 1, 16), (2, 2, 384, 16), (2, 2, 384, 16), requires_grad=False, device=device)
    F.attention(q, k, v, backend="triton")
    F.attention(q, k, v, backend="triton", alibi_slopes=torch.linspace(0.1, 0.8, 8, device=device))
    F.attention(q, k, v, backend="triton", window_size=(100, 0), alignment="bottom_right")
    assert launches == [("fwd", 4, 2 * 2 * 3, True), ("fwd", 1, 2 * 8 * 3, True), ("fwd", 1, 2 * 8 * 1, False)]
    # the window's keys [283, 384) lie in one 128-key chunk from key 256: nothing to split


def test_varlen_split_matches_reference(splits, device):
    """Packed sequences (decoding a ragged KV cache: seqused_k, an empty sequence) with split keys."""
    splits(3)
    Hq, Hkv, D = 4, 2, 24
    cu_q = torch.tensor([0, 1, 1, 4, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 300, 310, 700, 1000], dtype=torch.int32, device=device)
    used = torch.tensor([290, 10, 390, 1], dtype=torch.int32, device=device)
    q, k, v = make_inputs((5, Hq, D), (1000, Hkv, D), (1000, Hkv, D), seed=3, device=device)

    def fused(q, k, v):
        return F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alignment="bottom_right", seqused_k=used,
                                  return_lse=True, backend="triton")

    def reference(q, k, v):
        return F.attention_varlen(q, k, v, cu_q, cu_k, causal=True, alignment="bottom_right", seqused_k=used,
                                  return_lse=True, backend="reference")

    results = check_against_reference(fused, reference, [q, k, v], names=["q", "k", "v"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_kv_splits_heuristic(A):
    """FlashAttention 2's rule on a 132-SM chip: no split when the programs fill 80 % of the SMs or
    the keys are one chunk; else the fewest splits whose last wave is within 85 % of the best."""
    assert A.kv_splits(106, 64, 132) == 1
    assert A.kv_splits(8, 1, 132) == 1
    # 8 programs over 32 chunks: 16 splits of 2 chunks fill 128 of 132 SMs (11 splits: 88)
    assert A.kv_splits(8, 32, 132) == 16
    # 32 programs: 4 splits fill 128 SMs
    assert A.kv_splits(32, 256, 132) == 4
    for programs in (1, 3, 8, 20, 50, 100):
        for chunks in (2, 7, 33, 512):
            n = A.kv_splits(programs, chunks, 132)
            assert 1 <= n <= min(A.MAX_KV_SPLITS, chunks)
            assert A.cdiv(chunks, A.cdiv(chunks, n)) == n  # a count that changes the chunks per split


def test_split_plan(A, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(A, "KV_SPLITS", None)
    assert A.KvSplit.plan(4, 0, 100_000, cpu) is None  # no SMs to fill on the CPU: automatic means none
    monkeypatch.setattr(A, "KV_SPLITS", 3)
    plan = A.KvSplit.plan(4, 399, 600, cpu)  # keys [399, 600): chunks from 384, two of them
    assert (plan.num, plan.base, plan.keys) == (2, 384, 128)
    plan = A.KvSplit.plan(4, 0, 1000, cpu)  # 8 chunks in 3 splits of 3 chunks
    assert (plan.num, plan.base, plan.keys) == (3, 0, 384)
    assert A.KvSplit.plan(4, 0, 128, cpu) is None  # one chunk


@pytest.mark.parametrize("value,expected", [("auto", None), (" 4 ", 4), ("1", 1), ("0", ValueError),
                                            ("two", ValueError), ("-3", ValueError)])
def test_kv_splits_environment(A, monkeypatch, value, expected):
    monkeypatch.setenv("FUSED_ATTN_TRITON_KV_SPLITS", value)
    if expected is ValueError:
        with pytest.raises(ValueError, match="FUSED_ATTN_TRITON_KV_SPLITS"):
            A._kv_splits_setting()
    else:
        assert A._kv_splits_setting() == expected
