"""The Triton attention kernels (fused_attn/triton/attention.py) against the float64 oracle.

Without a GPU these run under TRITON_INTERPRET=1 (set by conftest.py) in float32 and float16;
sizes are kept small because the interpreter is slow. The interpreter uses one fixed block
configuration (INTERPRETER_CONFIG, outer 32 / inner 16), so lengths like 17, 97, 129 cross several
blocks with ragged ends and the causal diagonal crosses blocks of unequal sizes.
"""
import math

import pytest
import torch

from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.backends import BackendUnavailableError
from fused_attn.ops_common import CAUSAL_BAND, NO_BAND
from fused_attn.testing import check_against_reference, make_inputs, reconstruct_dropout_mask

pytest.importorskip("triton")
from fused_attn.triton import attention as triton_attention  # noqa: E402  (after TRITON_INTERPRET is set)

f32, f16 = torch.float32, torch.float16


def _check(shape, dtype, device, *, causal=False, mask=None, scale=None, dropout_p=0.0, rng=None, grad=True,
           q_scale=1.0, seed=0, floor=None):
    B, Hq, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), dtype=dtype, device=device, seed=seed,
                          requires_grad=grad)
    if q_scale != 1.0:
        q = (q.detach() * q_scale).requires_grad_(grad)
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    names = ["q", "k", "v", "attn_mask"][:len(inputs)]

    def fused(q, k, v, m=None):
        gen = None if rng is None else torch.Generator().manual_seed(rng)
        return F.attention(q, k, v, attn_mask=m, causal=causal, scale=scale, dropout_p=dropout_p, backend="triton",
                           generator=gen)

    def ref(q, k, v, m=None):
        pair = None
        if dropout_p > 0.0:
            pair = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64,
                                       generator=torch.Generator().manual_seed(rng)).tolist())
        return R.attention(q, k, v, m, causal, dropout_p, scale, pair)

    return check_against_reference(fused, ref, inputs, names=names, floor=floor)


# (B, Hq, Hkv, Lq, Lk, D, Dv): the seqlens 1, 17, 97, 128, 129, cross-attention pairs, head dims
# 16, 40, 59, 64, 128, grouped-query heads and Dv != D.
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16),
    (2, 2, 2, 17, 17, 40, 40),
    (1, 2, 1, 97, 97, 59, 59),
    (1, 1, 1, 128, 128, 64, 64),
    (1, 1, 1, 129, 129, 16, 16),
    (1, 2, 2, 1, 147, 64, 64),
    (1, 1, 1, 239, 1, 40, 40),
    (1, 4, 2, 63, 65, 32, 48),
    (1, 3, 1, 33, 20, 128, 128),
    (2, 4, 1, 18, 31, 24, 8),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}Hq{}Hkv{}Lq{}Lk{}D{}Dv{}".format(*s))
def test_shapes_float32(shape, causal, device):
    floor = None
    if shape[4] == 1:
        # One key: its probability is exactly 1 and dK is exactly 0. The float32 reference gets 0
        # by exact cancellation; the kernel's dS = p * (dO.v - rowsum(dO*O)) keeps a rounding
        # residue (two summation orders), summed over Lq rows. Absolute floor for that case.
        floor = 2e-5
    _check(shape, f32, device, causal=causal, floor=floor)


@pytest.mark.parametrize("shape,causal", [
    ((1, 2, 2, 17, 17, 40, 40), False),
    ((1, 1, 1, 97, 97, 64, 64), True),
    ((1, 2, 1, 63, 65, 59, 59), True),
    ((1, 1, 1, 1, 147, 16, 16), False),
    ((1, 1, 1, 129, 40, 128, 128), True),
], ids=lambda x: str(x))
def test_shapes_float16(shape, causal, device):
    _check(shape, f16, device, causal=causal)


@pytest.mark.parametrize("causal", [True, False])
def test_large_logits_float16_do_not_overflow(device, causal):
    # q.k reaches ~ 16 * 8 * 8 / sqrt(16) = 256 > log(65504): exp in half precision would overflow.
    # Not causal, the 96 keys are three full blocks: the unmasked loop's max-of-raw-scores path.
    _check((1, 1, 1, 33, 47 if causal else 96, 16, 16), f16, device, q_scale=8.0, causal=causal)


@pytest.mark.parametrize("scale", [0.37, -0.5, 0.0])
def test_custom_scale(device, scale):
    """Any finite scale, negative and zero included: the forward's unmasked key blocks take the row
    maximum of the raw scores times the scale, which only holds for scale >= 0 (SCALE_NONNEG).
    Logits of a few hundred (q scaled by 30): subtracting anything but the row maximum overflows."""
    _check((1, 2, 1, 20, 70, 40, 40), f32, device, scale=scale, q_scale=30.0)


MASK_SHAPES = {  # broadcastable to (B=2, Hq=2, Lq=19, Lk=37)
    "LqLk": (19, 37),
    "key_padding": (2, 1, 1, 37),
    "per_head": (1, 2, 19, 37),
    "full": (2, 2, 19, 37),
    "row": (2, 1, 19, 1),
}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES), ids=str)
def test_bool_mask(mask_shape, causal, device):
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand(MASK_SHAPES[mask_shape], generator=gen) > 0.3
    _check((2, 2, 1, 19, 37, 24, 24), f32, device, causal=causal, mask=mask.to(device))


@pytest.mark.parametrize("dtype", [f32, f16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_shape", ["LqLk", "key_padding", "full"], ids=str)
def test_additive_mask_with_grad(mask_shape, causal, dtype, device):
    gen = torch.Generator().manual_seed(2)
    mask = (torch.randn(MASK_SHAPES[mask_shape], generator=gen) * 2).to(device=device, dtype=dtype)
    mask.requires_grad_(True)
    results = _check((2, 2, 2, 19, 37, 16, 16), dtype, device, causal=causal, mask=mask)
    assert any(r.name == "grad of attn_mask" for r in results)


def test_additive_mask_without_grad_gqa(device):
    mask = torch.randn(1, 1, 45, 30, generator=torch.Generator().manual_seed(3)).to(device)
    _check((1, 4, 2, 45, 30, 40, 40), f32, device, mask=mask)


def test_fully_masked_rows_give_zeros(device):
    B, H, Lq, Lk, D = 1, 2, 21, 18, 16
    keep = torch.rand(B, H, Lq, Lk, generator=torch.Generator().manual_seed(4)) > 0.4
    keep[:, :, 3] = False  # rows 3 and 20 of every head see no key
    keep[0, 1, 20] = False
    keep = keep.to(device)
    _check((B, H, H, Lq, Lk, D, D), f32, device, mask=keep)
    q, k, v = make_inputs((B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D), device=device)
    out = F.attention(q, k, v, attn_mask=keep, backend="triton")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert (out[:, :, 3] == 0).all() and (out[0, 1, 20] == 0).all()
    assert (q.grad[:, :, 3] == 0).all() and (q.grad[0, 1, 20] == 0).all()


def test_additive_minus_inf_rows_and_lse(device):
    B, H, Lq, Lk, D = 1, 1, 9, 13, 16
    bias = torch.randn(B, H, Lq, Lk, generator=torch.Generator().manual_seed(5))
    bias[0, 0, 2] = float("-inf")
    bias[0, 0, 5, :7] = float("-inf")
    q, k, v = make_inputs((B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D), device=device, requires_grad=False)
    bias = bias.to(device)
    scale = 1 / math.sqrt(D)
    out, lse = triton_attention.attention_fwd(q, k, v, bias, *NO_BAND, 0.0, scale, 0, 0)
    ref_lse = R.attention_lse(q.double(), k.double(), bias.double(), False, scale)
    assert torch.isinf(lse[0, 0, 2]) and lse[0, 0, 2] > 0
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)
    assert (out[0, 0, 2] == 0).all()
    _check((B, H, H, Lq, Lk, D, D), f32, device, mask=bias.requires_grad_(True))


def test_output_layout_and_lse(device):
    q, k, v = make_inputs((2, 3, 11, 16), (2, 3, 14, 16), (2, 3, 14, 8), device=device, requires_grad=False)
    out, lse = triton_attention.attention_fwd(q, k, v, None, *CAUSAL_BAND, 0.0, 0.25, 0, 0)
    assert out.shape == (2, 3, 11, 8) and out.transpose(1, 2).is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 11)
    torch.testing.assert_close(lse.double(), R.attention_lse(q.double(), k.double(), None, True, 0.25),
                               rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs(device):
    B, H, L, D = 2, 3, 23, 32
    gen = torch.Generator().manual_seed(6)
    # q in the (B, L, H, D) layout of a projection, k with a non-unit last stride, v a slice.
    q = torch.randn(B, L, H, D, generator=gen).to(device).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, H, L, 2 * D, generator=gen).to(device)[..., ::2].requires_grad_(True)
    v = torch.randn(B, H, L + 5, D, generator=gen).to(device)[:, :, 3:L + 3].requires_grad_(True)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())

    check_against_reference(lambda q, k, v: F.attention(q, k, v, causal=True, backend="triton"),
                            lambda q, k, v: R.attention(q, k, v, causal=True), [q, k, v])
    # The oracle's copies keep only dense layouts (q's); run the launcher on the views themselves too.
    out, _ = triton_attention.attention_fwd(q.detach(), k.detach(), v.detach(), None, *CAUSAL_BAND, 0.0, D ** -0.5,
                                           0, 0)
    torch.testing.assert_close(out, R.attention(q.detach(), k.detach(), v.detach(), causal=True), rtol=1e-5,
                               atol=1e-5)


def test_strided_gradients_through_launcher(device):
    """attention_bwd on non-contiguous q/k/v/dout views equals the contiguous run bitwise."""
    B, H, L, D = 1, 2, 19, 16
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, L, H, D, generator=gen).to(device).transpose(1, 2)
    k = torch.randn(B, H, L, 2 * D, generator=gen).to(device)[..., ::2]
    v = torch.randn(B, H, L, D, generator=gen).to(device)
    dout = torch.randn(B, L, H, D, generator=gen).to(device).transpose(1, 2)
    args = (None, *CAUSAL_BAND, 0.0, 0.25, 0, 0)
    out, lse = triton_attention.attention_fwd(q, k, v, *args)
    grads = triton_attention.attention_bwd(dout, q, k, v, out, lse, *args, False)
    c = [t.contiguous() for t in (q, k, v, dout)]
    out_c, lse_c = triton_attention.attention_fwd(c[0], c[1], c[2], *args)
    grads_c = triton_attention.attention_bwd(c[3], c[0], c[1], c[2], out_c, lse_c, *args, False)
    for g, gc in zip(grads[:3], grads_c[:3]):
        assert g.is_contiguous() and torch.equal(g, gc)


# Row offsets past 2**31. The views below are (1, 1, FAR_LEN, 16) float16 rows FAR_ROW = 2**24 - 1
# elements apart (the widest row stride read in place: a step of 128 rows still fits int32,
# ``_int32_tiles``), from storage offset 2**31 of a 10 GiB buffer that torch.empty leaves untouched
# (only the rows written become resident: ~2 MB). Rows from 129 on lie 2**31 elements or more into
# the view, and blocks of 32 or 64 rows start at row 192: while a row's index times the stride was
# an int32 offset, rows 129-192 were read (or written) 2**32 elements too low, inside the buffer.
# Each case compares with the same call on compact copies, bitwise.
FAR_ROW, FAR_BASE, FAR_LEN = 2**24 - 1, 2**31, 193


@pytest.fixture
def far_buffer(device):
    try:
        buf = torch.empty(FAR_BASE + (FAR_LEN - 1) * FAR_ROW + 128, dtype=f16, device=device)
    except RuntimeError as exc:  # torch.cuda.OutOfMemoryError included
        pytest.skip(f"needs 10 GiB of (virtual) memory for views whose rows lie 2**24 elements apart: {exc}")
    buf[:128] = 100.0  # where test_rows_too_far_apart...'s wrapped offsets land
    return buf


def _far(buf, col, shape=(1, 1, FAR_LEN, 16), strides=(0, 0, FAR_ROW, 1), seed=0):
    """A view of ``buf`` at FAR_BASE + col (rows FAR_ROW apart), filled with normal values."""
    view = buf.as_strided(shape, strides, FAR_BASE + col)
    view.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return view


def _far_inputs(buf, far, device):
    """(q, k, v, dout) as far views where named in ``far``, else compact; and all four compact."""
    tensors = []
    for i, name in enumerate(("q", "k", "v", "dout")):
        if name in far:
            tensors.append(_far(buf, 16 * i, seed=i))
        else:
            tensors.append(torch.randn(1, 1, FAR_LEN, 16, generator=torch.Generator().manual_seed(i)).to(device, f16))
    return tensors, [t.contiguous() for t in tensors]


@pytest.mark.parametrize("far", [("q",), ("k", "v")], ids=["q", "kv"])
def test_forward_reads_rows_past_int32_offsets(far_buffer, far, device):
    """The forward reads q's query blocks (or K's and V's key blocks) 2**31 elements into a view."""
    (q, k, v, _), (qc, kc, vc, _) = _far_inputs(far_buffer, far, device)
    args = (None, *NO_BAND, 0.0, 0.25, 0, 0)
    out, lse = triton_attention.attention_fwd(q, k, v, *args)
    out_c, lse_c = triton_attention.attention_fwd(qc, kc, vc, *args)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


def test_forward_stores_rows_past_int32_offsets(far_buffer, device, monkeypatch):
    """The output store of a query block 2**31 elements into the output (as at Hq = 32, Dv = 128 and
    Lq > 2**19: out is (B, Lq, Hq, Dv) in memory): here the output itself is a far view."""
    (q, k, v, _), _ = _far_inputs(far_buffer, (), device)
    out_far = far_buffer.as_strided((1, 1, FAR_LEN, 16), (0, 0, FAR_ROW, 1), FAR_BASE + 64).fill_(float("nan"))
    args = (None, *NO_BAND, 0.0, 0.25, 0, 0)
    monkeypatch.setattr(triton_attention, "new_attention_out", lambda q, dv: out_far)
    assert triton_attention.attention_fwd(q, k, v, *args)[0] is out_far
    monkeypatch.undo()
    assert torch.equal(out_far, triton_attention.attention_fwd(q, k, v, *args)[0])


@pytest.mark.parametrize("far", [("q",), ("k", "v"), ("dout",), ("out",)], ids=["q", "kv", "dout", "out"])
def test_backward_reads_rows_past_int32_offsets(far_buffer, far, device):
    """dQ, dK, dV from q (its blocks in the dQ kernel and in dK/dV's query loop), K and V (dK/dV's
    key blocks, dQ's key loop), dO (delta, dQ, dK/dV's query loop) or O (delta) read 2**31 elements
    into a view."""
    (q, k, v, dout), (qc, kc, vc, dout_c) = _far_inputs(far_buffer, far, device)
    args = (None, *NO_BAND, 0.0, 0.25, 0, 0)
    out, lse = triton_attention.attention_fwd(qc, kc, vc, *args)  # (the forward has its own test)
    out_far = out
    if "out" in far:
        out_far = far_buffer.as_strided(out.shape, (0, 0, FAR_ROW, 1), FAR_BASE + 64).copy_(out)
    grads = triton_attention.attention_bwd(dout, q, k, v, out_far, lse, *args, False)
    grads_c = triton_attention.attention_bwd(dout_c, qc, kc, vc, out, lse, *args, False)
    for name, g, gc in zip(("dq", "dk", "dv"), grads, grads_c):
        assert torch.equal(g, gc), name


def test_varlen_delta_over_packed_rows_past_int32_offsets(far_buffer, device):
    """attention_varlen's backward computes delta over the (1, Hq, total_q, Dv) view of the packed
    dO, in blocks over all the packed tokens: a block late in a long pack starts 2**31 elements in
    (e.g. 65 sequences of 8192 tokens at Hq = 32, Dv = 128) however short its sequence. Here the
    packed dO's tokens lie FAR_ROW apart and the sequences are 120 and 73 tokens long: only the
    delta pass reaches 2**31 (each sequence's own rows are addressed from its first)."""
    T = FAR_LEN
    cu = torch.tensor([0, 120, T], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(T, 1, 16, generator=gen).to(device, f16) for _ in range(3))
    dout = _far(far_buffer, 48, (T, 1, 16), (FAR_ROW, 0, 1))
    args = (cu, cu, 120, 120, *NO_BAND, False, 0.0, 0.25, 0, 0)
    out, lse = triton_attention.attention_varlen_fwd(q, k, v, *args)
    grads = triton_attention.attention_varlen_bwd(dout, q, k, v, out, lse, *args)
    grads_c = triton_attention.attention_varlen_bwd(dout.contiguous(), q, k, v, out, lse, *args)
    for name, g, gc in zip(("dq", "dk", "dv"), grads, grads_c):
        assert torch.equal(g, gc), name


def test_rows_too_far_apart_for_int32_tile_offsets_are_read_from_a_copy(far_buffer, device):
    """q's rows 2**30 elements apart: the offsets within one tile (row 2 at 2**31) do not fit int32
    either, so the launcher reads such a view from a compact copy (``_int32_tiles``), while usual
    layouts (a (B, L, H, D) projection's transpose) are read in place."""
    q = _far(far_buffer, 80, (1, 1, 3, 16), (0, 0, 2**30, 1))
    k, v = (torch.randn(1, 1, 5, 16, generator=torch.Generator().manual_seed(i)).to(device, f16) for i in (1, 2))
    out = F.attention(q, k, v, backend="triton")
    torch.testing.assert_close(out.double(), R.attention(q.double(), k.double(), v.double()), rtol=2e-3, atol=2e-3)
    assert (far_buffer[:128] == 100).all()
    usual = torch.empty(1, 1024, 32, 128, dtype=f16, device=device).transpose(1, 2)
    assert triton_attention._int32_tiles(usual) is usual
    widest = far_buffer.as_strided((1, 1, 2, 16), (0, 0, FAR_ROW, 1))  # read in place, one more element is not
    assert triton_attention._int32_tiles(widest) is widest
    assert triton_attention._int32_tiles(far_buffer.as_strided((1, 1, 2, 16), (0, 0, FAR_ROW + 1, 1))).is_contiguous()
    assert triton_attention._int32_tiles(q) is not q and triton_attention._int32_tiles(q).is_contiguous()


@pytest.mark.parametrize("dtype", [f32, f16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_reference(causal, dtype, device):
    _check((1, 4, 2, 37, 29, 16, 24), dtype, device, causal=causal, dropout_p=0.3, rng=11)


def test_dropout_with_mask_grad(device):
    mask = torch.randn(1, 1, 21, 33, generator=torch.Generator().manual_seed(8)).to(device).requires_grad_(True)
    _check((2, 2, 1, 21, 33, 16, 16), f32, device, mask=mask, dropout_p=0.2, rng=12)


def test_dropout_mask_is_the_hash_and_same_in_backward(device):
    """With V = identity the output is the dropped, rescaled probability matrix itself, and dV with
    dO = identity is its transpose: both must show exactly the reconstructed keep-mask."""
    B, H, L, p = 2, 2, 48, 0.4
    q, k = make_inputs((B, H, L, 16), (B, H, L, 16), device=device, requires_grad=False, seed=9)
    v = torch.eye(L, device=device).expand(B, H, L, L).contiguous().requires_grad_(True)
    gen = torch.Generator().manual_seed(21)
    seed, offset = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=torch.Generator().manual_seed(21)).tolist()
    out = F.attention(q, k, v, dropout_p=p, backend="triton", generator=gen)
    keep = reconstruct_dropout_mask(seed, offset, p, B * H * L, L).reshape(B, H, L, L).to(device)
    assert torch.equal(out.detach() != 0, keep)
    kept = keep.float().mean().item()
    assert abs(kept - (1 - p)) < 4 * math.sqrt(p * (1 - p) / keep.numel())
    probs = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    torch.testing.assert_close(out.detach(), probs * keep / (1 - p), rtol=1e-5, atol=1e-6)
    out.backward(torch.eye(L, device=device).expand(B, H, L, L))
    assert torch.equal(v.grad.transpose(-1, -2) != 0, keep)


def test_dropout_reproducible_and_seed_dependent(device):
    q, k, v = make_inputs((1, 2, 30, 16), (1, 2, 30, 16), (1, 2, 30, 16), device=device, requires_grad=False)
    run = lambda s: F.attention(q, k, v, dropout_p=0.5, backend="triton", generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_backward_bitwise_reproducible(device):
    q, k, v = make_inputs((1, 4, 40, 16), (1, 2, 40, 16), (1, 2, 40, 16), device=device, requires_grad=False)
    out, lse = triton_attention.attention_fwd(q, k, v, None, *CAUSAL_BAND, 0.0, 0.25, 0, 0)
    dout = torch.randn_like(out)
    a = triton_attention.attention_bwd(dout, q, k, v, out, lse, None, *CAUSAL_BAND, 0.0, 0.25, 0, 0, False)
    b = triton_attention.attention_bwd(dout, q, k, v, out, lse, None, *CAUSAL_BAND, 0.0, 0.25, 0, 0, False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("sizes", [(0, 2, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0)], ids=["B0", "Lq0", "Lk0"])
def test_empty_sizes(sizes, device):
    B, H, Lq, Lk = sizes
    q, k, v = make_inputs((B, H, Lq, 16), (B, H, Lk, 16), (B, H, Lk, 8), device=device)
    mask = torch.zeros(1, 1, Lq, Lk, device=device, requires_grad=True)
    out = F.attention(q, k, v, attn_mask=mask, backend="triton")
    assert out.shape == (B, H, Lq, 8)
    assert (out == 0).all()
    out.sum().backward()
    for t in (q, k, v, mask):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


def test_inputs_not_modified_outputs_fresh(device):
    q, k, v = make_inputs((1, 2, 17, 16), (1, 2, 17, 16), (1, 2, 17, 16), device=device, requires_grad=False)
    copies = [t.clone() for t in (q, k, v)]
    out, lse = triton_attention.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 0.25, 0, 0)
    dout = torch.randn_like(out)
    grads = triton_attention.attention_bwd(dout, q, k, v, out, lse, None, *NO_BAND, 0.0, 0.25, 0, 0, False)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))
    ptrs = {t.data_ptr() for t in (q, k, v, dout)}
    assert not any(t.data_ptr() in ptrs for t in (out, lse) + grads[:3])


def test_head_dim_over_256_is_refused_with_reason(device):
    q, k, v = make_inputs((1, 1, 4, 264), (1, 1, 4, 264), (1, 1, 4, 16), device=device)
    with pytest.raises(BackendUnavailableError, match="head_dim 264 > 256"):
        F.attention(q, k, v, backend="triton")


def test_head_dim_256_and_value_dim_1(device):
    _check((1, 1, 1, 9, 18, 256, 200), f32, device, causal=True)
    _check((1, 1, 1, 9, 18, 16, 1), f32, device)



def test_dkdv_in_two_passes(device, monkeypatch):
    """Head dims above DKDV_SPLIT_ABOVE (128) compute dK and dV in two passes of the dK/dV kernel
    (pass 1: dK and the mask gradient, pass 2: dV). Forced here at small head dims, with every
    feature on: causal, an additive mask with its gradient, dropout, grouped-query heads, Dv != D."""
    assert triton_attention.dkdv_passes(256, 64) == (triton_attention.DKDV_DK, triton_attention.DKDV_DV)
    assert triton_attention.dkdv_passes(128, 128) == (triton_attention.DKDV_BOTH,)
    monkeypatch.setattr(triton_attention, "DKDV_SPLIT_ABOVE", 16)
    assert triton_attention.dkdv_passes(32, 16) == (triton_attention.DKDV_DK, triton_attention.DKDV_DV)
    mask = torch.randn(1, 4, 23, 37, generator=torch.Generator().manual_seed(9)).to(device).requires_grad_(True)
    _check((1, 4, 2, 23, 37, 24, 40), f32, device, causal=True, mask=mask, dropout_p=0.2, rng=13)

@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), (64, 64), (128, 32), (128, 64)], ids=str)
def test_other_block_shapes(blocks, device, monkeypatch):
    """The GPU autotuner picks other (outer, inner) blocks than the interpreter default: the same
    kernels with inner > outer, inner < outer and equal blocks (and the sm_90 dK/dV tiles of 128
    keys by 32 or 64 queries), on causal + mask + ragged lengths spanning several blocks."""
    monkeypatch.setattr(triton_attention, "INTERPRETER_CONFIG", {k: blocks for k in ("fwd", "dq", "dkdv")})
    lq, lk = (45, 70) if max(blocks) <= 64 else (150, 290)
    mask = (torch.randn(1, 2, lq, lk, generator=torch.Generator().manual_seed(10)) * 3).to(device)
    _check((1, 2, 1, lq, lk, 16, 16), f32, device, causal=True, mask=mask.requires_grad_(True))



@pytest.mark.parametrize("dtype,mask", [(f32, "additive"), (f32, "bool"), (f32, None), (f16, "additive")],
                         ids=["f32-additive", "f32-bool", "f32-none", "f16-additive"])
def test_launch_precision_and_loop_stages(dtype, mask, device, monkeypatch):
    """What the interpreter ignores, read off the launches of a forward and backward: float32 dots
    are IEEE (DOT_PRECISION "ieee", docs/backends.md: "float32 uses IEEE dots"; tf32 would round the inputs
    to 10-bit mantissas on a GPU), and the inner loops run unpipelined (LOOP_STAGES 1) exactly for
    float32 with an additive mask, the case the H200's software pipeliner got wrong (the comment on
    MASK_ADDITIVE); every other case keeps the configuration's stages (None)."""
    launches = []
    launch = triton_attention._launch

    def spy(kernel, grid_rows, heads, args, constexprs):
        launches.append((kernel, constexprs))
        return launch(kernel, grid_rows, heads, args, constexprs)

    monkeypatch.setattr(triton_attention, "_launch", spy)
    q, k, v = make_inputs((1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16), dtype=dtype, device=device, seed=4)
    gen = torch.Generator().manual_seed(4)
    attn_mask = None
    if mask == "additive":
        attn_mask = torch.randn(1, 2, 9, 11, generator=gen).to(device=device, dtype=dtype)
    elif mask == "bool":
        attn_mask = (torch.rand(1, 1, 9, 11, generator=gen) > 0.3).to(device)
    out = F.attention(q, k, v, attn_mask=attn_mask, causal=True, backend="triton")
    out.sum().backward()
    assert {kernel for kernel, _ in launches} == {"fwd", "dkdv", "dq"}
    for kernel, constexprs in launches:
        if dtype == f32:
            assert constexprs["DOT_PRECISION"] == "ieee", (kernel, constexprs["DOT_PRECISION"])
        expected = 1 if dtype == f32 and mask == "additive" else None
        assert constexprs["LOOP_STAGES"] == expected, (kernel, constexprs["LOOP_STAGES"])


# ---------------------------------------------------------------------------------------------
# the TMA-streamed path (STREAM_TMA): forced on with FUSED_ATTN_TRITON_TMA=on, which the
# interpreter honours, so the descriptor loads (zero-filled past the sequence and head dim) are
# held to the oracle here; on a GPU the autotuner chooses between it and the pointer path.
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def streamed(monkeypatch):
    """Turns TMA on and records, per launch (forward, then dK/dV and dQ), whether the streamed
    operands went in as descriptors (which then are what the kernel reads: under the interpreter
    by construction, on a GPU because TMA_KEY 2 leaves the autotuner only TMA configurations)."""
    monkeypatch.setenv("FUSED_ATTN_TRITON_TMA", "on")
    launches = []
    describe = triton_attention.descriptors

    def spy(*tensors, tma=None):
        result = describe(*tensors, tma=tma)
        launches.append(result[-1] == 2)
        return result

    monkeypatch.setattr(triton_attention, "descriptors", spy)
    return launches


@pytest.mark.parametrize("shape,causal", [
    ((2, 2, 2, 17, 17, 40, 40), False),
    ((1, 4, 2, 97, 63, 64, 32), True),
    ((1, 1, 1, 1, 147, 16, 16), False),
    ((1, 2, 1, 129, 40, 128, 128), True),
], ids=str)
def test_tma_stream_matches_oracle(shape, causal, device, streamed):
    _check(shape, f16, device, causal=causal)
    assert streamed and all(streamed)


def test_tma_stream_with_mask_dropout_and_strided_layout(device, streamed):
    """(B, L, H, D) tensors viewed as (B, H, L, D) (descriptor strides from the view), an additive
    mask with its gradient, dropout and grouped-query heads."""
    B, Hq, Hkv, Lq, Lk, D = 2, 4, 2, 33, 45, 32
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, Lq, Hq, D, generator=gen).to(device, f16).transpose(1, 2).requires_grad_(True)
    k = torch.randn(B, Lk, Hkv, D, generator=gen).to(device, f16).transpose(1, 2).requires_grad_(True)
    v = torch.randn(B, Lk, Hkv, D, generator=gen).to(device, f16).transpose(1, 2).requires_grad_(True)
    mask = torch.randn(1, Hq, Lq, Lk, generator=gen).to(device, f16).requires_grad_(True)

    def fused(q, k, v, m):
        return F.attention(q, k, v, attn_mask=m, causal=True, dropout_p=0.2, backend="triton",
                           generator=torch.Generator().manual_seed(5))

    def ref(q, k, v, m):
        pair = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64,
                                   generator=torch.Generator().manual_seed(5)).tolist())
        return R.attention(q, k, v, m, True, 0.2, None, pair)

    check_against_reference(fused, ref, [q, k, v, mask], names=["q", "k", "v", "attn_mask"])
    assert streamed and all(streamed)


@pytest.mark.parametrize("dtype,head_dim", [(f16, 59), (f32, 64)], ids=str)
def test_tma_falls_back_to_pointers(dtype, head_dim, device, streamed):
    """Rows of 59 half-precision elements (118 bytes) are not 16-byte aligned, and float32 runs
    IEEE dots off the tensor cores: no descriptors, the pointer path, still exact."""
    _check((1, 2, 1, 21, 30, head_dim, head_dim), dtype, device, causal=True)
    assert streamed and not any(streamed)


def test_stream_descriptor_layouts():
    from fused_attn.triton._tma import descriptor as make
    t = torch.empty(2, 3, 50, 40, dtype=f16)
    d = make(t)
    assert isinstance(d, triton_attention._DESCRIPTOR_TYPES)
    assert list(d.shape) == [2, 3, 50, 40] and list(d.strides) == [6000, 2000, 40, 1]
    view = torch.empty(2, 50, 3, 64, dtype=torch.bfloat16).transpose(1, 2)
    assert list(make(view).strides) == [9600, 64, 192, 1]
    # a size-1 dim's stride is never stepped: any value becomes a well-formed one
    one = torch.empty(1, 3, 50, 40, dtype=f16).as_strided((1, 3, 50, 40), (7, 2000, 40, 1))
    strides = make(one).strides
    assert strides[1:] == [2000, 40, 1] and strides[0] % 8 == 0 and strides[0] >= 6000
    for bad in (torch.empty(2, 3, 50, 59, dtype=f16),                         # 118-byte rows
                torch.empty(2, 3, 50, 64, dtype=f32),                         # float32
                torch.empty(2, 3, 64, 50, dtype=f16).transpose(2, 3),         # head dim not unit-stride
                torch.empty(1, 3, 50, 64, dtype=f16).expand(2, 3, 50, 64),    # stride 0 along the batch
                torch.empty(2 * 3 * 50 * 64 + 1, dtype=f16)[1:].view(2, 3, 50, 64)):  # 2-byte aligned base
        assert make(bad) is None


def test_tma_mode_setting(monkeypatch):
    from fused_attn.triton._tma import tma_mode

    monkeypatch.delenv("FUSED_ATTN_TRITON_TMA", raising=False)
    assert tma_mode() == "off"  # the default (measured on an H200: see fused_attn/triton/_tma.py)
    for value, mode in (("auto", "auto"), ("1", "on"), ("on", "on"), ("0", "off"), ("OFF", "off"), ("", "off")):
        monkeypatch.setenv("FUSED_ATTN_TRITON_TMA", value)
        assert tma_mode() == mode
    monkeypatch.setenv("FUSED_ATTN_TRITON_TMA", "sometimes")
    with pytest.raises(ValueError, match="FUSED_ATTN_TRITON_TMA must be one of auto, on, off"):
        tma_mode()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,causal", [((2, 8, 2, 1000, 1000, 64, 64), True), ((1, 4, 4, 333, 1030, 128, 128), False),
                                          ((1, 2, 1, 257, 129, 256, 256), True), ((2, 4, 4, 1, 700, 96, 96), False)],
                         ids=str)
def test_gpu_compiled_kernels(shape, causal, dtype):
    """The compiled (autotuned) kernels on a real GPU, half precision, against the oracle."""
    _check(shape, dtype, "cuda", causal=causal)


@pytest.mark.gpu
def test_gpu_mask_grad_and_dropout():
    mask = torch.randn(1, 1, 300, 500, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    _check((2, 4, 2, 300, 500, 64, 64), torch.bfloat16, "cuda", causal=True, mask=mask, dropout_p=0.1, rng=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_tma_stream(dtype, monkeypatch):
    """The TMA-streamed kernels on an sm_90+ GPU (skipped below): ragged lengths, Dv != D, GQA, an
    additive mask with its gradient and dropout."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or newer")
    monkeypatch.setenv("FUSED_ATTN_TRITON_TMA", "on")
    _check((2, 8, 2, 1000, 777, 128, 64), dtype, "cuda", causal=True)
    mask = torch.randn(1, 1, 300, 500, device="cuda", dtype=dtype).requires_grad_(True)
    _check((2, 4, 2, 300, 500, 64, 64), dtype, "cuda", causal=True, mask=mask, dropout_p=0.1, rng=3)


def test_host_integer_helpers_match_triton():
    """The launchers' cdiv / next_pow2 (plain Python: Triton's are constexpr_functions, a few us a
    host call) give Triton's results."""
    import triton

    from fused_attn.triton._host import cdiv, next_pow2

    for n in list(range(0, 300)) + [1023, 1024, 1025, 65535, 65536, 65537, 2**31 - 1]:
        assert next_pow2(max(n, 1)) == triton.next_power_of_2(max(n, 1)), n
        for b in (1, 2, 16, 64, 128, 1000):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    assert next_pow2(0) == 1


def test_torch_func_transforms_route_around_the_triton_launchers(monkeypatch):
    """vmap and grad hand the ops wrapped tensors, which the Triton launchers cannot read (they
    failed with "Cannot access storage of BatchedTensorImpl"): a forced triton call under them
    refuses with the reason, and auto with triton first (as on a GPU) takes the next backend,
    equal to the reference. jvp alone hands plain tensors: it still runs the Triton kernels."""
    from fused_attn import backends

    monkeypatch.setattr(backends, "AUTO_ORDER", {**backends.AUTO_ORDER, "cpu": ("triton", "reference")})
    monkeypatch.setattr(backends, "_resolved", {})
    q = torch.randn(3, 1, 2, 5, 8, generator=torch.Generator().manual_seed(0))

    def loss(backend):
        return lambda t: F.attention(t, t, t, causal=True, backend=backend).square().sum()

    with pytest.raises(BackendUnavailableError, match="under a torch.func transform"):
        torch.func.vmap(torch.func.grad(loss("triton")))(q)
    with pytest.raises(BackendUnavailableError, match="under a torch.func transform"):
        torch.func.grad(loss("triton"))(q[0])
    expected = torch.func.vmap(torch.func.grad(loss("reference")))(q)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(loss(None)))(q), expected)
    launched = []
    original = triton_attention.attention_fwd
    monkeypatch.setattr(triton_attention, "attention_fwd", lambda *a: launched.append(1) or original(*a))
    tangent = torch.func.jvp(lambda t: F.attention(t, t, t, causal=True, backend="triton"), (q[0],),
                             (torch.ones_like(q[0]),))[1]
    assert launched
    torch.testing.assert_close(tangent, torch.func.jvp(lambda t: R.attention(t, t, t, None, True), (q[0],),
                                                       (torch.ones_like(q[0]),))[1])
