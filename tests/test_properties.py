"""Property-based tests: random shapes, options and strides against the oracle, for every backend
that runs on this machine. Derandomised and bounded so the suite stays fast."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.testing import check_against_reference, make_inputs, runnable_backends


def bounded(max_examples):
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def split_by_speed(op, strategies, test_fn):
    """Two tests from one property: the compiled backends get 12 cases, the (much slower) Triton
    interpreter 3, so that the suite stays within CI's time."""
    backends = runnable_backends(op)
    fast = [b for b in backends if b != "triton"]
    slow = [b for b in backends if b == "triton"]
    return (pytest.mark.parametrize("backend", fast)(bounded(12)(given(**strategies)(test_fn))),
            pytest.mark.parametrize("backend", slow)(bounded(3)(given(**strategies)(test_fn))))


def _maybe_transposed(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    """The same values, stored (B, L, H, D) and viewed as (B, H, L, D) when ``transpose``."""
    if not transpose:
        return t
    return t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)


#: how a small parameter tensor (bias, LayerNorm weight, ALiBi slopes) is laid out (``_laid_out``)
PARAM_LAYOUTS = st.sampled_from(["contiguous", "strided", "expanded"])


ATTENTION_CASES = dict(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 3), Lq=st.integers(1, 40),
    Lk=st.integers(1, 40), D=st.sampled_from([4, 8, 13, 16]), Dv=st.sampled_from([4, 7, 16]),
    causal=st.booleans(), mask=st.sampled_from([None, "bool", "additive", "row"]), transpose=st.booleans(),
    alibi=st.sampled_from([None, "head", "batch"]), slopes_layout=PARAM_LAYOUTS, seed=st.integers(0, 2**16))


def _laid_out(t, layout):
    """``t``'s values as a view of another layout, built from ``t`` so that gradients flow back to
    it: "strided" (every other element of a larger storage, storage offset 1) or "expanded" (its
    first value with stride 0 everywhere: the values change, for the fused and reference call
    alike). Kernels that took such tensors as dense arrays read the wrong values, or past the end."""
    if t is None or layout == "contiguous":
        return t
    if layout == "strided":
        return torch.stack([torch.zeros_like(t), t], dim=-1)[..., 1]
    return t.reshape(-1)[:1].reshape((1,) * t.dim()).expand(t.shape)


def _slopes(kind, B, Hq, g, layout="contiguous"):
    """None, (Hq,) or (B, Hq) ALiBi slopes in [-0.2, 0.6), laid out as ``layout`` (``_laid_out``)."""
    if kind is None:
        return None
    return _laid_out(torch.rand(*((Hq,) if kind == "head" else (B, Hq)), generator=g) * 0.8 - 0.2, layout)


def attention_property(backend, B, Hkv, group, Lq, Lk, D, Dv, causal, mask, transpose, alibi, slopes_layout, seed):
    Hq = Hkv * group
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), seed=seed)
    q, k, v = (_maybe_transposed(t, transpose) for t in (q, k, v))
    g = torch.Generator().manual_seed(seed)
    if mask == "bool":
        m = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
    elif mask == "additive":
        m = torch.randn(1, Hq, Lq, Lk, generator=g)
    elif mask == "row":
        m = torch.rand(Lk, generator=g) > 0.2
    else:
        m = None
    slopes = _slopes(alibi, B, Hq, g, slopes_layout)
    inputs = [q, k, v] + ([m] if m is not None else [])
    check_against_reference(
        lambda q, k, v, *mm: F.attention(q, k, v, attn_mask=mm[0] if mm else None, causal=causal, backend=backend,
                                         alibi_slopes=slopes),
        lambda q, k, v, *mm: R.attention(q, k, v, mm[0] if mm else None, causal,
                                         alibi_slopes=None if slopes is None else slopes.to(q.dtype)), inputs)


test_attention_random, test_attention_random_interpreted = split_by_speed("attention", ATTENTION_CASES, attention_property)


VARLEN_CASES = dict(lens_q=st.lists(st.integers(0, 30), min_size=1, max_size=4), self_attention=st.booleans(),
    extra_k=st.lists(st.integers(0, 12), min_size=4, max_size=4), Hkv=st.integers(1, 2), group=st.integers(1, 2),
    D=st.sampled_from([4, 13, 16]), Dv=st.sampled_from([7, 16]), causal=st.booleans(),
    window=st.sampled_from([None, (0, 0), (3, 0), (2, 5), (-1, 1)]), alignment=st.sampled_from(["top_left", "bottom_right"]),
    alibi=st.sampled_from([None, "head", "batch"]), seed=st.integers(0, 2**16))


def varlen_property(backend, lens_q, self_attention, extra_k, Hkv, group, D, Dv, causal, window, alignment, alibi,
                    seed):
    """Packed sequences of random lengths (0 included), self- or cross-attention, with every band option."""
    lens_k = lens_q if self_attention else [n + e for n, e in zip(lens_q, extra_k)]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32) for n in (lens_q, lens_k))
    q, k, v = make_inputs((sum(lens_q), Hkv * group, D), (sum(lens_k), Hkv, D), (sum(lens_k), Hkv, Dv), seed=seed)
    slopes = _slopes(alibi, len(lens_q), Hkv * group, torch.Generator().manual_seed(seed))
    opts = dict(causal=causal, window_size=window, alignment=alignment)
    check_against_reference(
        lambda q, k, v, cq, ck: F.attention_varlen(q, k, v, cq, ck, backend=backend, alibi_slopes=slopes, **opts),
        lambda q, k, v, cq, ck: R.attention_varlen(q, k, v, cq, ck, **opts,
                                                   alibi_slopes=None if slopes is None else slopes.to(q.dtype)),
        [q, k, v, cu_q, cu_k])


test_varlen_random, test_varlen_random_interpreted = split_by_speed("attention", VARLEN_CASES, varlen_property)


LAYER_NORM_CASES = dict(rows=st.integers(1, 40), d=st.integers(1, 300), rms=st.booleans(), affine=st.booleans(),
    residual=st.booleans(), prenorm=st.booleans(), layout=PARAM_LAYOUTS, seed=st.integers(0, 2**16))


def layer_norm_property(backend, rows, d, rms, affine, residual, prenorm, layout, seed):
    """``layout``: weight and bias as strided or stride-0 views (``_laid_out``)."""
    x, r, w, b = make_inputs((rows, d), (rows, d), (d,), (d,), seed=seed)
    inputs = [x, r if residual else None, w if affine else None, b if affine else None]

    def laid_out(fn):
        return lambda x, r, w, b: fn(x, r, _laid_out(w, layout), _laid_out(b, layout), rms=rms, prenorm=prenorm)

    check_against_reference(laid_out(lambda *a, **kw: F.layer_norm_residual(*a, **kw, backend=backend)),
                            laid_out(R.layer_norm_residual), inputs)


test_layer_norm_random, test_layer_norm_random_interpreted = split_by_speed("layer_norm_residual", LAYER_NORM_CASES, layer_norm_property)


FEED_FORWARD_CASES = dict(T=st.integers(1, 24), d=st.integers(1, 24), d_ff=st.integers(1, 40), d_out=st.integers(1, 24),
    activation=st.sampled_from(R.ACTIVATIONS), biases=st.booleans(), layout=PARAM_LAYOUTS, seed=st.integers(0, 2**16))


def feed_forward_property(backend, T, d, d_ff, d_out, activation, biases, layout, seed):
    """``layout``: b1 and b2 as strided or stride-0 views (``_laid_out``)."""
    width = 2 * d_ff if activation in R.GATED_ACTIVATIONS else d_ff
    x, w1, b1, w2, b2 = make_inputs((T, d), (width, d), (width,), (d_out, d_ff), (d_out,), seed=seed)
    inputs = [x, w1, b1 if biases else None, w2, b2 if biases else None]

    def laid_out(fn):
        return lambda x, w1, b1, w2, b2: fn(x, w1, _laid_out(b1, layout), w2, _laid_out(b2, layout),
                                            activation=activation)

    check_against_reference(laid_out(lambda *a, **kw: F.feed_forward(*a, **kw, backend=backend)),
                            laid_out(R.feed_forward), inputs)


test_feed_forward_random, test_feed_forward_random_interpreted = split_by_speed("feed_forward", FEED_FORWARD_CASES, feed_forward_property)


PAGED_CASES = dict(lens_k=st.lists(st.integers(0, 70), min_size=1, max_size=4), q_per_seq=st.integers(1, 3),
    page=st.sampled_from([1, 3, 8, 16]), spare=st.integers(0, 3), Hkv=st.integers(1, 2), group=st.integers(1, 3),
    D=st.sampled_from([4, 13, 16]), causal=st.booleans(), grad=st.booleans(), splits=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16))


def paged_property(backend, lens_k, q_per_seq, page, spare, Hkv, group, D, causal, grad, splits, seed):
    """A paged KV cache (block_table) with random page sizes, lengths and page order, decoding or
    prefilling a few queries per sequence (bottom-right), with or without gradients (the Triton
    forward reads the pages in place, with ``splits`` key splits, only without); the oracle runs
    on each sequence's keys packed by hand."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-n // page) for n in lens_k]
    num_pages = sum(needed) + spare
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.full((len(lens_k), max(needed + [1])), -1, dtype=torch.int32)
    starts = [sum(needed[:s]) for s in range(len(needed))]
    for s, n in enumerate(needed):
        table[s, :n] = torch.tensor(order[starts[s]:starts[s] + n], dtype=torch.int32)
    lens_q = [min(q_per_seq, n) for n in lens_k]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32) for n in (lens_q, lens_k))
    q, k, v = make_inputs((sum(lens_q), Hkv * group, D), (num_pages, page, Hkv, D), (num_pages, page, Hkv, D),
                          seed=seed, requires_grad=grad)
    opts = dict(causal=causal, alignment="bottom_right")

    def packed(pages):
        return torch.cat([pages[table[s, j // page]][j % page:j % page + 1] for s, n in enumerate(lens_k)
                          for j in range(n)] or [pages.new_zeros(0, Hkv, D)])

    A = _triton_attention() if backend == "triton" else None
    saved = A.KV_SPLITS if A else None
    if A:
        A.KV_SPLITS = splits
    try:
        check_against_reference(
            lambda q, k, v: F.attention_varlen(q, k, v, cu_q, cu_k, block_table=table, backend=backend, **opts),
            lambda q, k, v: R.attention_varlen(q, packed(k), packed(v), cu_q, cu_k, **opts), [q, k, v])
    finally:
        if A:
            A.KV_SPLITS = saved


def _triton_attention():
    from fused_attn.triton import attention
    return attention


test_paged_random, test_paged_random_interpreted = split_by_speed("attention", PAGED_CASES, paged_property)
