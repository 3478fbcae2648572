"""merge_attention: attention over split keys, merged through the log-sum-exps, is attention over
all the keys (forward, lse and every gradient), on every CPU backend; rows some part (or every
part) saw no key for; the varlen lse layout; torch.compile; xformers' merge_attentions on top."""
import pytest
import torch

import fused_attn
from fused_attn import functional as F
from fused_attn.integrations import xformers as X
from fused_attn.testing import backend_cases, make_inputs


def _chunks(n, sizes):
    bounds = [0]
    for s in sizes:
        bounds.append(bounds[-1] + s)
    assert bounds[-1] == n
    return list(zip(bounds, bounds[1:]))


@pytest.mark.parametrize("device,backend", backend_cases("attention"))
def test_merged_parts_are_attention_over_all_keys(device, backend):
    """Keys in three parts of 7, 1 and 15; a mask hides the whole first part from some rows and a
    whole row from everything: out, lse and the gradients of q, k, v equal one call over all."""
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 5, 23, 24
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), device=device, seed=3)
    mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool, device=device)
    mask[0, :, 1, :7] = False  # row 1 of batch 0 sees nothing in part 0
    mask[1, :, 3, :] = False  # row 3 of batch 1 sees no key at all
    with fused_attn.use_backend(backend):
        full, full_lse = F.attention(q, k, v, attn_mask=mask, return_lse=True)
        outs, lses = [], []
        for a, b in _chunks(Lk, [7, 1, 15]):
            o, lse = F.attention(q, k[:, :, a:b], v[:, :, a:b], attn_mask=mask[..., a:b], return_lse=True)
            outs.append(o)
            lses.append(lse)
        out, lse = F.merge_attention(outs, lses)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-6)
    assert lse[1, :, 3].isinf().all() and not out[1, :, 3].any()
    dout, dlse = torch.randn_like(out), torch.randn_like(lse).masked_fill(lse.isinf(), 0.0)
    grads = torch.autograd.grad((out * dout).sum() + (lse.masked_fill(lse.isinf(), 0) * dlse).sum(), (q, k, v))
    expected = torch.autograd.grad((full * dout).sum() + (full_lse.masked_fill(full_lse.isinf(), 0) * dlse).sum(),
                                   (q, k, v))
    for g, e in zip(grads, expected):
        assert g.isfinite().all()
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_varlen_lse_layout_and_one_part():
    """attention_varlen's (Hq, total) lse passes transposed; one part merges to itself."""
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = make_inputs((8, 2, 16), (8, 2, 16), (8, 2, 16), requires_grad=False)
    full = F.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
    out, lse = F.merge_attention([full[0]], [full[1].t()])
    torch.testing.assert_close(out, full[0])
    torch.testing.assert_close(lse.t(), full[1])


def test_merge_compiles_and_keeps_dtype():
    q, k, v = make_inputs((1, 2, 4, 16), (1, 2, 12, 16), (1, 2, 12, 16), requires_grad=False, dtype=torch.float16)
    parts = [F.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True) for a, b in ((0, 5), (5, 12))]
    merged = torch.compile(lambda p: F.merge_attention([o for o, _ in p], [lse for _, lse in p]), fullgraph=True,
                           backend="aot_eager")(parts)
    assert merged[0].dtype == torch.float16 and merged[1].dtype == torch.float32
    torch.testing.assert_close(merged[0], F.attention(q, k, v), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("outs,lses,error,match", [
    (torch.zeros(2, 3, 4), [torch.zeros(2, 3)], TypeError, "must be sequences"),
    ([], [], ValueError, "non-empty and of one length"),
    ([torch.zeros(2, 3)], [torch.zeros(2), torch.zeros(2)], ValueError, "non-empty and of one length"),
    ([torch.zeros(2, 3), torch.zeros(2, 4)], [torch.zeros(2), torch.zeros(2)], ValueError, r"outs\[1\] must match"),
    ([torch.zeros(2, 3)], [torch.zeros(3)], ValueError, r"lses\[0\] must have outs\[0\]'s shape without"),
    ([torch.zeros(2, 3)], [torch.zeros(2, dtype=torch.int64)], TypeError, r"lses\[0\] must be a floating-point"),
])
def test_merge_bad_input(outs, lses, error, match):
    with pytest.raises(error, match=match):
        F.merge_attention(outs, lses)


def test_xformers_partial_and_merge_attentions():
    """memory_efficient_attention_partial on key parts, stacked and merged by merge_attentions, is
    the call over all the keys; (B, M, G, H, K) too; a row that sees no key in a part has lse -inf."""
    q, k, v = make_inputs((2, 6, 4, 16), (2, 13, 4, 16), (2, 13, 4, 16), requires_grad=False, seed=8)
    full, full_lse = X.memory_efficient_attention_partial(q, k, v)
    parts = [X.memory_efficient_attention_partial(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 4), (4, 13))]
    attn_split = torch.stack([o for o, _ in parts])
    lse_split = torch.stack([lse for _, lse in parts])
    assert lse_split.shape == (2, 2, 4, 6)
    out, lse = X.merge_attentions(attn_split, lse_split)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-5, atol=1e-6)
    assert X.merge_attentions(attn_split, lse_split, write_lse=False)[1] is None
    # 6 queries, 2 keys, bottom-right causal: query i sees keys j <= i - 4, so rows 0-3 see none
    out_part, lse_part = X.memory_efficient_attention_partial(q, k[:, :2], v[:, :2],
                                                              attn_bias=X.LowerTriangularFromBottomRightMask())
    assert (lse_part[..., :4] == float("-inf")).all() and lse_part[..., 4:].isfinite().all()
    assert not out_part[:, :4].any()
    q5 = q.view(2, 6, 2, 2, 16)
    k5, v5 = k[:, :, :2, None].expand(2, 13, 2, 2, 16), v[:, :, :2, None].expand(2, 13, 2, 2, 16)
    parts = [X.memory_efficient_attention_partial(q5, k5[:, a:b], v5[:, a:b]) for a, b in ((0, 9), (9, 13))]
    out5, lse5 = X.merge_attentions(torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts]))
    assert out5.shape == (2, 6, 2, 2, 16) and lse5.shape == (2, 2, 2, 6)
    torch.testing.assert_close(out5, X.memory_efficient_attention(q5, k5, v5), rtol=1e-5, atol=1e-6)


def test_merge_of_huge_lses_weighs_the_parts():
    """Rows every key of which a huge finite mask hides have lses near -1e30, far past the point
    where log(sum) survives rounding: the parts still weigh exp(lse_i) / sum (the weights were
    exp(lse_i - total) = 1 each, so two equal parts merged to twice the answer)."""
    o1, o2 = torch.full((1, 4), 1.0), torch.full((1, 4), 3.0)
    for big in (-1e30, 1e30, -3e38):
        merged, lse = F.merge_attention([o1, o2], [torch.tensor([big]), torch.tensor([big])])
        torch.testing.assert_close(merged, torch.full((1, 4), 2.0))
        assert float(lse) == float(torch.tensor(big))  # (log 2 is below its rounding step)
    lses = [torch.tensor([-1e30], requires_grad=True), torch.tensor([-1e30 + 2 ** 77], requires_grad=True)]
    merged, lse = F.merge_attention([o1, o2], lses)  # (the second part's lse one rounding step higher)
    assert bool(torch.isfinite(merged).all()) and 1.0 <= float(merged[0, 0]) <= 3.0
    merged.sum().backward()
    assert all(bool(torch.isfinite(l.grad).all()) for l in lses)


def test_rows_no_part_saw_ignore_the_parts_outputs():
    """A row with an infinite lse in every part (+inf: this library's "saw no key", -inf: others'
    convention) merges to out 0 and lse +inf whatever the parts hold there, and no gradient flows
    into their outputs on it: another producer's empty rows need not be zeros (a part with 7s there
    gave 3.5 when the empty parts were weighed 1/n)."""
    inf = float("inf")
    for empty_lses in ((inf, -inf), (-inf, -inf), (inf, inf)):
        o1 = torch.tensor([[1.0, 2.0], [0.0, 0.0]], requires_grad=True)
        o2 = torch.tensor([[3.0, 4.0], [7.0, 7.0]], requires_grad=True)
        l1, l2 = torch.tensor([0.5, empty_lses[0]]), torch.tensor([0.1, empty_lses[1]])
        out, lse = F.merge_attention([o1, o2], [l1, l2])
        assert out[1].tolist() == [0.0, 0.0] and float(lse[1]) == inf, (empty_lses, out, lse)
        w1 = 1 / (1 + torch.exp(torch.tensor(0.1 - 0.5)))  # the first row: both parts saw keys
        torch.testing.assert_close(out[0], w1 * o1[0].detach() + (1 - w1) * o2[0].detach())
        out.sum().backward()
        assert o1.grad[1].tolist() == [0.0, 0.0] and o2.grad[1].tolist() == [0.0, 0.0], (empty_lses, o1.grad, o2.grad)
        torch.testing.assert_close(o2.grad[0], (1 - w1).expand(2))


def test_float64_merge_is_float64():
    out, lse = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float32)
    merged, merged_lse = F.merge_attention([out], [lse])
    assert merged.dtype == torch.float64 and merged_lse.dtype == torch.float64 and torch.equal(merged, out)


def test_xformers_partial_outputs_are_float32_and_lists_merge():
    """xformers returns partial outputs in float32 (unless output_dtype says otherwise; float64 stays
    float64), and newer xformers' merge_attentions takes lists of the parts: both as there (the
    partials came back in the query's half dtype; lists raised TypeError)."""
    q, k, v = (t.half() for t in make_inputs((1, 5, 2, 8), (1, 9, 2, 8), (1, 9, 2, 8), requires_grad=False, seed=3))
    out, lse = X.memory_efficient_attention_partial(q, k, v)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert X.memory_efficient_attention_partial(q, k, v, output_dtype=torch.float16)[0].dtype == torch.float16
    assert X.memory_efficient_attention_partial(q.double(), k.double(), v.double())[0].dtype == torch.float64
    parts = [X.memory_efficient_attention_partial(q, k[:, a:b], v[:, a:b]) for a, b in ((0, 4), (4, 9))]
    merged, merged_lse = X.merge_attentions([o for o, _ in parts], [lse for _, lse in parts])
    stacked = X.merge_attentions(torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts]))
    assert merged.dtype == torch.float32
    torch.testing.assert_close(merged, stacked[0], rtol=0, atol=0)
    torch.testing.assert_close(merged, out, rtol=2e-3, atol=2e-3)
