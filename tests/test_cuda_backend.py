"""The ``cuda`` backend (csrc/cuda) against the float64 reference, on a GPU.

Every op and option, forward and backward, float16/bfloat16/float32, through the functional API
with ``backend="cuda"`` (which calls ``torch.ops.fused_attn_C.*`` on CUDA tensors). Dropout uses
the shared counter hash, so the fused and reference runs drop exactly the same elements (both
draw [seed, offset] from a generator seeded the same way). Also: bad inputs to the raw ops raise
RuntimeError, the backward is deterministic, empty sizes work.

The oracle tests are marked ``gpu``: they collect everywhere and are skipped without CUDA. The
backend's declared limits are checked everywhere.
"""
from __future__ import annotations

import math

import pytest
import torch

import fused_attn
from fused_attn import functional as F
from fused_attn import reference as R
from fused_attn.ops_common import BAND_UNBOUNDED, CAUSAL_BAND, NO_BAND
from fused_attn.testing import check_against_reference, compare, make_inputs

gpu = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]
DEV = "cuda"


@pytest.fixture(autouse=True)
def _require_cuda_backend(request):
    """On a GPU machine a missing cuda backend is a failure (the extension must be built with CUDA)."""
    if "gpu" not in request.keywords:
        return
    report = fused_attn.available_backends()["cuda"]
    assert report["available"], f"the cuda backend is unavailable: {report['reasons']}"
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32 exact
    torch.backends.cudnn.allow_tf32 = False


def _rng(seed: int) -> tuple[int, int]:
    """The [seed, offset] pair functional draws from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(seed)
    s, o = torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=g).tolist()
    return int(s), int(o)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

# name: (B, Hq, Hkv, Lq, Lk, D, Dv, options)
ATTN_CASES = {
    "basic": (2, 3, 3, 97, 97, 64, 64, {}),
    "odd_lengths": (1, 2, 2, 17, 97, 40, 40, {}),
    "one_query": (2, 2, 2, 1, 33, 59, 59, {}),
    "dv_differs": (1, 2, 2, 33, 17, 59, 40, {}),
    "causal": (2, 2, 2, 97, 97, 64, 64, {"causal": True}),
    "causal_lq_lt_lk": (1, 2, 2, 17, 97, 64, 64, {"causal": True}),
    "causal_lq_gt_lk": (1, 2, 2, 97, 17, 32, 32, {"causal": True}),
    "gqa": (2, 4, 2, 33, 65, 64, 64, {}),
    "mqa_causal": (1, 4, 1, 65, 65, 32, 32, {"causal": True}),
    "scale": (1, 2, 2, 33, 33, 64, 64, {"scale": 0.3}),
    "bool_mask": (2, 2, 2, 33, 47, 64, 64, {"mask": "bool"}),
    "key_padding_mask": (2, 2, 2, 33, 47, 64, 64, {"mask": "key_padding"}),
    "additive_mask": (1, 2, 2, 33, 47, 64, 64, {"mask": "additive"}),
    "additive_mask_grad": (2, 2, 2, 33, 47, 32, 32, {"mask": "additive", "mask_grad": True}),
    "mask_causal_gqa": (1, 4, 2, 47, 47, 32, 32, {"mask": "bool", "causal": True}),
    "dropout": (2, 2, 2, 65, 65, 64, 64, {"dropout_p": 0.17}),
    "dropout_causal_gqa": (1, 4, 2, 47, 65, 40, 40, {"dropout_p": 0.3, "causal": True}),
    "dropout_mask_grad": (1, 2, 2, 33, 47, 32, 32, {"dropout_p": 0.2, "mask": "additive", "mask_grad": True}),
    "head_dim_128": (1, 2, 2, 65, 65, 128, 128, {"causal": True}),
    "head_dim_80": (1, 2, 2, 70, 70, 80, 80, {}),
    "many_blocks_causal_gqa_d128": (1, 4, 2, 300, 333, 128, 128, {"causal": True}),
    "head_dim_256": (1, 2, 1, 47, 65, 256, 256, {}),
    "head_dim_256_dropout": (1, 2, 2, 33, 33, 256, 200, {"dropout_p": 0.1, "causal": True}),
    "blhd_layout": (2, 3, 3, 33, 47, 64, 64, {"layout": "blhd"}),
    "broadcast_kv": (2, 2, 2, 33, 33, 32, 32, {"layout": "broadcast_kv"}),
}


def _mask(kind, B, H, Lq, Lk, dtype, gen):
    if kind == "bool":
        m = torch.rand(B, H, Lq, Lk, generator=gen) > 0.3
        m[:, :, 3, :] = False  # a fully masked row: zeros and zero gradients, never NaN
        return m.to(DEV)
    if kind == "key_padding":
        m = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        m[0, ..., Lk // 2:] = False
        return m.to(DEV)
    if kind == "additive":  # broadcast over batch (a stride-0 view for the kernel)
        m = torch.randn(1, H, Lq, Lk, generator=gen, dtype=torch.float64)
        m[..., : Lk // 4] = float("-inf") if Lk > 4 else 0.0
        return m.to(DEV, dtype)
    raise ValueError(kind)


def _attention_case(name, dtype):
    B, Hq, Hkv, Lq, Lk, D, Dv, opts = ATTN_CASES[name]
    layout = opts.get("layout")
    gen = torch.Generator().manual_seed(1)
    if layout == "blhd":  # (B, L, H, D) storage: q, k, v are transposed views
        q, k, v = make_inputs((B, Lq, Hq, D), (B, Lk, Hkv, D), (B, Lk, Hkv, Dv), dtype=dtype, device=DEV)
        view = lambda q, k, v: (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    elif layout == "broadcast_kv":  # k, v shared by the batch: stride 0 along it
        q, k, v = make_inputs((B, Hq, Lq, D), (1, Hkv, Lk, D), (1, Hkv, Lk, Dv), dtype=dtype, device=DEV)
        view = lambda q, k, v: (q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
    else:
        q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv), dtype=dtype, device=DEV)
        view = lambda q, k, v: (q, k, v)
    mask = None
    if "mask" in opts:
        mask = _mask(opts["mask"], B, Hq, Lq, Lk, dtype, gen)
        if opts.get("mask_grad"):
            mask = mask.masked_fill(mask == float("-inf"), -30.0).requires_grad_(True)
    return (q, k, v, mask), view, opts


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_matches_reference(name, dtype):
    (q, k, v, mask), view, opts = _attention_case(name, dtype)
    causal, p, scale = opts.get("causal", False), opts.get("dropout_p", 0.0), opts.get("scale")
    seed = 1234

    def fused(q, k, v, mask=None):
        return F.attention(*view(q, k, v), attn_mask=mask, causal=causal, dropout_p=p, scale=scale,
                           backend="cuda", generator=_gen(seed))

    def ref(q, k, v, mask=None):
        return R.attention(*view(q, k, v), mask, causal, p, scale, _rng(seed) if p > 0 else None)

    inputs = [q, k, v] + ([mask] if mask is not None else [])
    check_against_reference(fused, ref, inputs, names=["q", "k", "v", "attn_mask"][: len(inputs)])


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_lse_and_layout(dtype):
    """The raw op: out stored as a contiguous (B, Lq, Hq, Dv), lse float32 and +inf on dead rows."""
    B, H, Lq, Lk, D = 2, 2, 17, 33, 64
    q, k, v = make_inputs((B, H, Lq, D), (B, H, Lk, D), (B, H, Lk, D), dtype=dtype, device=DEV, requires_grad=False)
    mask = torch.ones(B, H, Lq, Lk, dtype=torch.bool, device=DEV)
    mask[:, :, 5] = False
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, mask, *NO_BAND, 0.0, 0.125, 0, 0)
    assert out.shape == (B, H, Lq, D) and out.transpose(1, 2).is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq)
    ref_lse = R.attention_lse(q.double(), k.double(), attn_mask=mask, scale=0.125)
    assert torch.isinf(lse[:, :, 5]).all() and (lse[:, :, 5] > 0).all()
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite].double(), ref_lse[finite], atol=2e-2 if dtype != torch.float32 else 1e-5,
                               rtol=0)
    assert (out[:, :, 5] == 0).all()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_attention_empty_sizes(dtype):
    for Lq, Lk in ((0, 17), (17, 0), (0, 0)):
        q, k, v = make_inputs((2, 2, Lq, 32), (2, 2, Lk, 32), (2, 2, Lk, 32), dtype=dtype, device=DEV)
        out = F.attention(q, k, v, backend="cuda")
        assert out.shape == (2, 2, Lq, 32)
        assert (out == 0).all()
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad is not None and t.grad.shape == t.shape and (t.grad == 0).all()


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_attention_backward_is_deterministic(dtype):
    q, k, v = make_inputs((2, 4, 129, 64), (2, 2, 129, 64), (2, 2, 129, 64), dtype=dtype, device=DEV)
    grads = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        F.attention(q, k, v, causal=True, dropout_p=0.1, backend="cuda", generator=_gen(7)).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# (dtype, head dim): the register-resident kernels, the 16-bit shared-memory tiles of the backward at head
# dim 256, float32's shared-memory tiles
LONG_CASES = [(torch.float16, 64), (torch.float16, 256), (torch.float32, 64)]


@gpu
@pytest.mark.parametrize("dtype,D", LONG_CASES, ids=["fp16_d64", "fp16_d256", "fp32_d64"])
def test_attention_sequences_beyond_65535_blocks(dtype, D):
    """The sequence blocks are on the grid's x (up to 2^31 - 1 blocks): a forward over 65537 blocks
    of 64 queries and a backward over 65537 blocks of 64 keys run. On the grid's y (at most 65535)
    they were refused ("attention: sequence too long for the grid"). The rows of the first and last
    blocks against the reference (no mask: each query row on its own)."""
    L = 65536 * 64 + 1
    gen = torch.Generator(device=DEV).manual_seed(D)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=DEV).to(dtype)
    rows = torch.cat([torch.arange(0, 100), torch.arange(L - 300, L)]).to(DEV)
    # forward: L queries, 77 keys
    q, k, v = randn(1, 1, L, D), randn(1, 1, 77, D), randn(1, 1, 77, D)
    out = F.attention(q, k, v, backend="cuda")
    q_rows = q[:, :, rows]
    compare("out", out[:, :, rows], R.attention(q_rows.double(), k.double(), v.double()), R.attention(q_rows, k, v))
    del q, k, v, out
    # backward: 70 queries, L keys
    q, k, v = randn(1, 1, 70, D), randn(1, 1, L, D), randn(1, 1, L, D)
    dout = randn(1, 1, 70, D)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    got = torch.autograd.grad(F.attention(*leaves, backend="cuda"), leaves, dout)
    refs = []
    for ref_dtype in (torch.float64, dtype):
        ref_leaves = [t.to(ref_dtype).requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(R.attention(*ref_leaves), ref_leaves, dout.to(ref_dtype))
        refs.append([grads[0], grads[1][:, :, rows], grads[2][:, :, rows]])
        del ref_leaves, grads
    for name, g, ref64, ref_lp in zip(("dq", "dk", "dv"), (got[0], got[1][:, :, rows], got[2][:, :, rows]), *refs):
        compare(name, g, ref64, ref_lp, k=5.0)


@gpu
def test_kernels_launched_from_several_threads():
    """Threads launching the same kernels with more and less dynamic shared memory (float32 attention
    at head dim 240: ~200 KB a block on sm_90, at 16: ~50 KB; the norm at two widths) never fail. The
    launchers set each kernel's shared-memory ceiling to each call's size, so one thread could lower
    it between another's setting and launch: that launch failed with "invalid argument". The ceiling
    is now raised once per (kernel, device) and never lowered."""
    import threading

    errors = []

    def work(index):
        try:
            gen = torch.Generator(device=DEV).manual_seed(index)
            for i in range(40):
                D, hidden = ((240, 12000), (16, 100))[(index + i) % 2]  # (within sm_86's 99 KB a block too)
                q = torch.randn(1, 2, 150, D, device=DEV, generator=gen, requires_grad=True)
                F.attention(q, q, q, causal=True, backend="cuda").sum().backward()
                x = torch.randn(8, hidden, device=DEV, generator=gen, requires_grad=True)
                w = torch.ones(hidden, device=DEV, requires_grad=True)
                F.layer_norm_residual(x, None, w, None, backend="cuda").sum().backward()
            torch.cuda.synchronize()
        except Exception as error:  # (reported below, with the thread)
            errors.append((index, repr(error)))

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


# name: (Lq, Lk, (band_lo, band_hi)) -- query i sees key j iff band_lo <= j - i <= band_hi
BAND_CASES = {
    "causal_top_left": (130, 130, CAUSAL_BAND),
    "window_left40": (200, 200, (-40, 0)),
    "bottom_right_causal_lq_lt_lk": (70, 300, (-BAND_UNBOUNDED, 300 - 70)),
    "bottom_right_causal_lq_gt_lk_dead_rows": (300, 70, (-BAND_UNBOUNDED, 70 - 300)),
    "lo1_hi100_odd": (131, 259, (1, 100)),
    "lo_gt_hi_all_dead": (65, 65, (3, 1)),
}


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(BAND_CASES))
def test_attention_raw_op_bands(name, dtype):
    """The raw ops with a visibility band (unbounded ends as +-2^62, clamped by the binding) and an
    additive mask whose gradient is asked for, against the reference with the band as a mask."""
    Lq, Lk, band = BAND_CASES[name]
    B, Hq, Hkv, D, scale = 1, 4, 2, 64, 0.125
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), dtype=dtype, device=DEV,
                          requires_grad=False)
    mask, dout = make_inputs((B, Hq, Lq, Lk), (B, Hq, Lq, D), dtype=dtype, device=DEV, seed=1, requires_grad=False)
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, mask, *band, 0.0, scale, 0, 0)
    dq, dk, dv, dmask = torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, mask, *band, 0.0, scale, 0, 0,
                                                             True)
    rel = torch.arange(Lk, device=DEV)[None, :] - torch.arange(Lq, device=DEV)[:, None]  # j - i
    keep = (rel >= band[0]) & (rel <= band[1])

    def ref(ref_dtype):
        q_, k_, v_, m_ = (t.to(ref_dtype).requires_grad_(True) for t in (q, k, v, mask))
        banded = m_.masked_fill(~keep, float("-inf"))
        o = R.attention(q_, k_, v_, attn_mask=banded, scale=scale)
        grads = torch.autograd.grad(o, (q_, k_, v_, m_), dout.to(ref_dtype), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip((q_, k_, v_, m_), grads)]
        return [o.detach(), R.attention_lse(q_.detach(), k_.detach(), attn_mask=banded.detach(), scale=scale)] + grads

    ref64, ref_lp = ref(torch.float64), ref(dtype)
    for i, (what, got) in enumerate(zip(("out", "lse", "dq", "dk", "dv", "dmask"), (out, lse, dq, dk, dv, dmask))):
        compare(f"{name} {what}", got, ref64[i], ref_lp[i], k=2.0 if i < 2 else 5.0)
    dead = ~keep.any(dim=1)  # rows the band leaves no key: zeros, lse = +inf, zero dq and dmask
    assert (out[:, :, dead] == 0).all() and (dq[:, :, dead] == 0).all() and (dmask[:, :, dead] == 0).all()
    assert torch.isinf(lse[:, :, dead]).all() and (lse[:, :, dead] > 0).all()
    assert (dmask.masked_select(~keep) == 0).all()  # masked out by the band: zero gradient, never written


# name: (Lq, Lk, D, (band_lo, band_hi), additive mask): softcap 5 on logits scaled up 4x (so it bites)
SOFTCAP_CASES = {
    "window_left40_mask_grad_d64": (200, 200, 64, (-40, 0), True),
    "no_band_d128_plain_blocks": (200, 230, 128, NO_BAND, False),  # the register kernels' unmasked blocks
    "bottom_right_d256": (70, 150, 256, (-BAND_UNBOUNDED, 150 - 70), True),  # backward: shared-memory kernels
}


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(SOFTCAP_CASES))
def test_attention_raw_op_softcap(name, dtype):
    """The raw ops with logit soft-capping: s = softcap tanh(scale q.k / softcap), then the mask and
    the band; the reference is written here from that definition (autograd for the gradients)."""
    Lq, Lk, D, band, with_mask = SOFTCAP_CASES[name]
    B, Hq, Hkv, scale, softcap = 1, 4, 2, 1.0 / math.sqrt(D), 5.0
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), dtype=dtype, device=DEV,
                          requires_grad=False)
    q = q * 4
    mask, dout = make_inputs((B, Hq, Lq, Lk), (B, Hq, Lq, D), dtype=dtype, device=DEV, seed=1, requires_grad=False)
    mask = mask if with_mask else None
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, mask, *band, 0.0, scale, 0, 0, softcap)
    dq, dk, dv, dmask = torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, mask, *band, 0.0, scale, 0, 0,
                                                             with_mask, softcap)
    keep = _check_raw_op_against_definition(name, dtype, (out, lse, dq, dk, dv, dmask), q, k, v, mask, dout, band,
                                            scale, softcap)
    dead = ~keep.any(dim=1)
    assert (out[:, :, dead] == 0).all() and (dq[:, :, dead] == 0).all()


def _check_raw_op_against_definition(name, dtype, got, q, k, v, mask, dout, band, scale, softcap, slopes=None,
                                     bottom_right=False):
    """The raw ops' (out, lse, dq, dk, dv, dmask) against the definition written out here, in float64
    and in ``dtype`` (the oracle's yardstick): s = cap(scale q.k) - slope |j - i - shift| + mask,
    shift = Lk - Lq when bottom_right, then the band; autograd for the gradients of q, k, v and the
    mask (none flows to the slopes). Returns the band's (Lq, Lk) keep matrix."""
    Hq, Lq, Hkv, Lk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    rel = torch.arange(Lk, device=DEV)[None, :] - torch.arange(Lq, device=DEV)[:, None]  # j - i
    keep = (rel >= band[0]) & (rel <= band[1])
    dist = (rel - (Lk - Lq if bottom_right else 0)).abs()  # |j - i - shift|

    def ref(ref_dtype):
        leaves = [t.to(ref_dtype).requires_grad_(True) for t in (q, k, v) + ((mask,) if mask is not None else ())]
        q_, k_, v_ = leaves[:3]
        k_r, v_r = (t.repeat_interleave(Hq // Hkv, dim=1) for t in (k_, v_))
        s = torch.matmul(q_, k_r.transpose(-2, -1)) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if slopes is not None:
            s = s - slopes.to(ref_dtype)[:, :, None, None] * dist.to(ref_dtype)
        if mask is not None:
            s = s + leaves[3]
        s = s.masked_fill(~keep, float("-inf"))
        dead = (s == float("-inf")).all(dim=-1, keepdim=True)
        o = torch.matmul(torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0), v_r)
        grads = list(torch.autograd.grad(o, leaves, dout.to(ref_dtype)))
        lse_ref = torch.logsumexp(s.detach(), dim=-1)
        return [o.detach(), lse_ref.masked_fill(lse_ref == float("-inf"), float("inf"))] + grads

    ref64, ref_lp = ref(torch.float64), ref(dtype)
    names = ("out", "lse", "dq", "dk", "dv") + (("dmask",) if mask is not None else ())
    for i, what in enumerate(names):
        compare(f"{name} {what}", got[i], ref64[i], ref_lp[i], k=2.0 if i < 2 else 5.0)
    return keep


# name: (B, Hq, Hkv, Lq, Lk, D, (band_lo, band_hi), bottom_right, slopes, additive mask, softcap). Slopes:
# "per_batch" per (batch, head) in [-0.1, 0.5) (negative ones reward distance), "heads" the paper's
# (Hq,) x 4 expanded over the batch (stride 0), "transposed" per (batch, head) with strides (1, B).
ALIBI_CASES = {
    "causal_gqa_mask_grad_d64": (2, 4, 2, 200, 200, 64, CAUSAL_BAND, False, "per_batch", True, 0.0),
    # the register kernels' unmasked blocks, with the shift Lk - Lq > 0
    "bottom_right_lq_lt_lk_plain_blocks_d128": (2, 4, 2, 130, 300, 128, NO_BAND, True, "transposed", False, 0.0),
    # the shift < 0, rows the band leaves nothing
    "bottom_right_causal_lq_gt_lk_dead_rows_softcap_d32": (1, 4, 2, 300, 70, 32, (-BAND_UNBOUNDED, 70 - 300), True,
                                                           "heads", False, 5.0),
    # backward: shared-memory kernels
    "bottom_right_window_softcap_mask_grad_d256": (2, 4, 2, 70, 150, 256, (-40, 10), True, "per_batch", True, 5.0),
}


def _alibi_slopes(kind, B, Hq, gen):
    if kind == "per_batch":
        return (torch.rand(B, Hq, generator=gen) * 0.6 - 0.1).to(DEV)
    if kind == "heads":
        return (fused_attn.get_alibi_slopes(Hq) * 4).to(DEV).expand(B, Hq)
    return (torch.rand(Hq, B, generator=gen) * 0.6 - 0.1).to(DEV).t()


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(ALIBI_CASES))
def test_attention_raw_op_alibi(name, dtype):
    """The raw ops with ALiBi: s = cap(scale q.k) - slope[b, h] |j - i - shift| + mask, shift = Lk - Lq
    when bottom_right, then the band; the reference is written here from that definition (autograd
    for the gradients of q, k, v and the mask; none flows to the slopes)."""
    B, Hq, Hkv, Lq, Lk, D, band, bottom_right, kind, with_mask, softcap = ALIBI_CASES[name]
    scale = 1.0 / math.sqrt(D)
    q, k, v = make_inputs((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D), dtype=dtype, device=DEV,
                          requires_grad=False)
    if softcap:
        q = q * 4
    mask, dout = make_inputs((B, Hq, Lq, Lk), (B, Hq, Lq, D), dtype=dtype, device=DEV, seed=1, requires_grad=False)
    mask = mask if with_mask else None
    slopes = _alibi_slopes(kind, B, Hq, _gen(2))
    out, lse = torch.ops.fused_attn_C.attention_fwd(q, k, v, mask, *band, 0.0, scale, 0, 0, softcap, slopes,
                                                    bottom_right)
    dq, dk, dv, dmask = torch.ops.fused_attn_C.attention_bwd(dout, q, k, v, out, lse, mask, *band, 0.0, scale, 0, 0,
                                                             with_mask, softcap, slopes, bottom_right)
    keep = _check_raw_op_against_definition(name, dtype, (out, lse, dq, dk, dv, dmask), q, k, v, mask, dout, band,
                                            scale, softcap, slopes, bottom_right)
    dead = ~keep.any(dim=1)
    assert (out[:, :, dead] == 0).all() and (dq[:, :, dead] == 0).all()
    assert torch.isinf(lse[:, :, dead]).all() and (lse[:, :, dead] > 0).all()


@gpu
def test_attention_raw_op_rejects_bad_input():
    q, k, v = make_inputs((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16), dtype=torch.float16, device=DEV,
                          requires_grad=False)
    op = torch.ops.fused_attn_C.attention_fwd
    with pytest.raises(RuntimeError, match="k"):
        op(q, k[..., :8], v, None, *NO_BAND, 0.0, 1.0, 0, 0)  # head dims differ
    with pytest.raises(RuntimeError, match="heads"):
        op(q, k[:, :1].expand(1, 3, 8, 16)[:, :3], v[:, :1].expand(1, 3, 8, 16), None, *NO_BAND, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        op(q, k.float(), v, None, *NO_BAND, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="head dims"):
        big = torch.zeros(1, 2, 8, 264, dtype=torch.float16, device=DEV)
        op(big, big, big, None, *NO_BAND, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="attn_mask"):
        op(q, k, v, torch.ones(1, 2, 8, 7, dtype=torch.bool, device=DEV), *NO_BAND, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="CUDA"):
        op(q, k.cpu(), v, None, *NO_BAND, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="dropout_p"):
        op(q, k, v, None, *NO_BAND, 1.5, 1.0, 0, 0)
    for bad_softcap in (-1.0, float("inf"), float("nan"), 3.5e38, 1e39):  # > float32's max: inf in the kernels
        with pytest.raises(RuntimeError, match="softcap"):
            op(q, k, v, None, *NO_BAND, 0.0, 1.0, 0, 0, bad_softcap)
    # ALiBi slopes: float32 (B, Hq) = (1, 2) on q's device, any strides
    good = torch.rand(2, device=DEV).expand(1, 2)
    out, lse = op(q, k, v, None, *NO_BAND, 0.0, 1.0, 0, 0, 0.0, good, True)
    bwd = torch.ops.fused_attn_C.attention_bwd
    for bad, message in ((good.half(), "alibi_slopes must have dtype"), (good.double(), "alibi_slopes must have dtype"),
                         (torch.rand(1, 3, device=DEV), r"alibi_slopes must be a \(B, Hq\) = \(1, 2\) view"),
                         (torch.rand(2, 1, device=DEV), r"alibi_slopes must be a \(B, Hq\)"),
                         (torch.rand(2, device=DEV), "alibi_slopes must be 2-D"),
                         (torch.rand(1, 2), "alibi_slopes must be a CUDA tensor")):
        with pytest.raises(RuntimeError, match=message):
            op(q, k, v, None, *NO_BAND, 0.0, 1.0, 0, 0, 0.0, bad, True)
        with pytest.raises(RuntimeError, match=message):
            bwd(q, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0, bad, True)
    # the lse's gradient: float32 of lse's shape on q's device, any strides
    strided = lse.transpose(1, 2).contiguous().transpose(1, 2)
    bwd(q, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0, None, False, strided)
    for bad, message in ((lse.double(), "dlse must have dtype"), (lse[..., :4], "dlse must have lse's shape"),
                         (lse[0], "dlse must be 3-D"), (lse.cpu(), "dlse must be a CUDA tensor")):
        with pytest.raises(RuntimeError, match=message):
            bwd(q, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0, None, False, bad)


# ---------------------------------------------------------------------------------------------
# residual-add + LayerNorm / RMSNorm
# ---------------------------------------------------------------------------------------------

# name: (shape, options)
NORM_CASES = {
    "layernorm": ((2, 17, 64), {}),
    "layernorm_residual": ((2, 17, 1024), {"residual": True}),
    "layernorm_odd_width": ((3, 7, 59), {"residual": True}),
    "layernorm_no_affine": ((2, 9, 96), {"residual": True, "weight": False, "bias": False}),
    "layernorm_no_bias": ((1, 33, 128), {"residual": True, "bias": False}),
    "layernorm_dropout": ((2, 17, 256), {"residual": True, "dropout_p": 0.2}),
    "layernorm_wide": ((4, 4096), {"residual": True}),
    "rmsnorm": ((2, 17, 64), {"rms": True, "bias": False}),
    "rmsnorm_residual_dropout": ((2, 17, 200), {"rms": True, "residual": True, "dropout_p": 0.1}),
    "rmsnorm_bias_odd": ((1, 5, 33), {"rms": True, "residual": True}),
    "one_row": ((1, 64), {"residual": True}),
}
FP32_RESIDUAL_CASES = {
    "residual_in_fp32": ((2, 17, 128), {"residual": "fp32"}),
    "residual_in_fp32_same_dtype": ((2, 17, 64), {"residual": True, "residual_in_fp32": True}),
    "rms_residual_in_fp32_dropout": ((2, 9, 96), {"rms": True, "residual": "fp32", "dropout_p": 0.25}),
}


def _norm_check(shape, opts, dtype):
    d = shape[-1]
    gen = torch.Generator().manual_seed(3)
    (x,) = make_inputs(shape, dtype=dtype, device=DEV, seed=5)
    inputs = [x]
    res_kind = opts.get("residual", False)
    residual_in_fp32 = opts.get("residual_in_fp32", False) or res_kind == "fp32"
    if res_kind:
        (r,) = make_inputs(shape, dtype=torch.float32 if res_kind == "fp32" else dtype, device=DEV, seed=6)
        inputs.append(r)
    else:
        inputs.append(None)
    w = (1.0 + 0.3 * torch.randn(d, generator=gen, dtype=torch.float64)).to(DEV, dtype).requires_grad_(True)
    b = (0.2 * torch.randn(d, generator=gen, dtype=torch.float64)).to(DEV, dtype).requires_grad_(True)
    inputs += [w if opts.get("weight", True) else None, b if opts.get("bias", True) else None]
    rms, p, seed = opts.get("rms", False), opts.get("dropout_p", 0.0), 99

    def fused(x, r, w, b):
        return F.layer_norm_residual(x, r, w, b, 1e-5, dropout_p=p, prenorm=True, rms=rms,
                                     residual_in_fp32=residual_in_fp32, backend="cuda", generator=_gen(seed))

    def ref(x, r, w, b):
        return R.layer_norm_residual(x, r, w, b, 1e-5, p, prenorm=True, rms=rms, residual_in_fp32=residual_in_fp32,
                                     rng=_rng(seed) if p > 0 else None)

    check_against_reference(fused, ref, inputs, names=["x", "residual", "weight", "bias"])


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(NORM_CASES))
def test_layer_norm_residual_matches_reference(name, dtype):
    shape, opts = NORM_CASES[name]
    _norm_check(shape, opts, dtype)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(FP32_RESIDUAL_CASES))
def test_layer_norm_residual_in_fp32_matches_reference(name, dtype):
    shape, opts = FP32_RESIDUAL_CASES[name]
    _norm_check(shape, opts, dtype)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layer_norm_strided_rows_and_empty(dtype):
    # rows with a stride larger than the width (a column slice), and zero rows
    (big,) = make_inputs((9, 80), dtype=dtype, device=DEV, requires_grad=False)
    x = big[:, 8:72]
    out = F.layer_norm_residual(x, None, None, None, 1e-5, backend="cuda")
    torch.testing.assert_close(out.double(), R.layer_norm_residual(x.double(), eps=1e-5),
                               atol=1e-2 if dtype != torch.float32 else 1e-5, rtol=0)
    (e,) = make_inputs((0, 64), dtype=dtype, device=DEV)
    out = F.layer_norm_residual(e, None, None, None, 1e-5, backend="cuda")
    assert out.shape == (0, 64)
    out.sum().backward()
    assert e.grad.shape == (0, 64)


@gpu
def test_layer_norm_backward_is_deterministic():
    x, r = make_inputs((4096, 512), (4096, 512), dtype=torch.float16, device=DEV)
    w = torch.randn(512, device=DEV, dtype=torch.float16, requires_grad=True)
    b = torch.randn(512, device=DEV, dtype=torch.float16, requires_grad=True)
    grads = []
    for _ in range(2):
        for t in (x, r, w, b):
            t.grad = None
        F.layer_norm_residual(x, r, w, b, backend="cuda").square().sum().backward()
        grads.append([t.grad.clone() for t in (x, r, w, b)])
    for a, c in zip(*grads):
        assert torch.equal(a, c)


@gpu
def test_layer_norm_raw_op_rejects_bad_input():
    x = torch.randn(4, 16, device=DEV, dtype=torch.float16)
    op = torch.ops.fused_attn_C.layer_norm_residual_fwd
    with pytest.raises(RuntimeError, match="residual"):
        op(x, torch.randn(4, 8, device=DEV, dtype=torch.float16), None, None, 1e-5, 0.0, False, False, 0, 0)
    with pytest.raises(RuntimeError, match="weight"):
        op(x, None, torch.ones(8, device=DEV, dtype=torch.float16), None, 1e-5, 0.0, False, False, 0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        op(x, None, torch.ones(16, device=DEV), None, 1e-5, 0.0, False, False, 0, 0)
    with pytest.raises(RuntimeError, match="eps"):
        op(x, None, None, None, 0.0, 0.0, False, False, 0, 0)
    with pytest.raises(RuntimeError, match="x"):
        op(x.double(), None, None, None, 1e-5, 0.0, False, False, 0, 0)


# ---------------------------------------------------------------------------------------------
# feed-forward
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("variant", ["bias", "no_bias", "dropout"])
def test_feed_forward_matches_reference(activation, variant, dtype):
    d, d_ff, d_out = 64, 96, 48
    width = 2 * d_ff if activation in ("swiglu", "geglu") else d_ff
    x, w1, b1, w2, b2 = make_inputs((2, 17, d), (width, d), (width,), (d_out, d_ff), (d_out,), dtype=dtype,
                                    device=DEV, seed=11)
    with torch.no_grad():  # nn.Linear-like scales keep the activations in their interesting range
        w1.mul_(1.0 / math.sqrt(d))
        w2.mul_(1.0 / math.sqrt(d_ff))
    if variant == "no_bias":
        b1 = b2 = None
    p, seed = (0.2 if variant == "dropout" else 0.0), 5

    def fused(x, w1, b1, w2, b2):
        return F.feed_forward(x, w1, b1, w2, b2, activation=activation, dropout_p=p, backend="cuda",
                              generator=_gen(seed))

    def ref(x, w1, b1, w2, b2):
        return R.feed_forward(x, w1, b1, w2, b2, activation, p, _rng(seed) if p > 0 else None)

    check_against_reference(fused, ref, [x, w1, b1, w2, b2], names=["x", "w1", "b1", "w2", "b2"])


@gpu
def test_feed_forward_empty_tokens():
    x, w1, w2 = make_inputs((0, 32), (64, 32), (32, 64), dtype=torch.float16, device=DEV)
    out = F.feed_forward(x, w1, None, w2, None, activation="gelu", backend="cuda")
    assert out.shape == (0, 32)
    out.sum().backward()
    assert (w1.grad == 0).all() and (w2.grad == 0).all()


@gpu
def test_feed_forward_raw_op_rejects_bad_input():
    x, w1, w2 = (torch.randn(s, device=DEV, dtype=torch.float16) for s in ((4, 32), (64, 32), (32, 64)))
    op = torch.ops.fused_attn_C.feed_forward_fwd
    with pytest.raises(RuntimeError, match="activation"):
        op(x, w1, None, w2, None, "tanh", 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="w2"):
        op(x, w1, None, w2[:, :10], None, "relu", 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="even"):
        op(x, w1[:63], None, w2, None, "swiglu", 0.0, 0, 0)
    with pytest.raises(RuntimeError, match="b1"):
        op(x, w1, torch.zeros(3, device=DEV, dtype=torch.float16), w2, None, "relu", 0.0, 0, 0)


# ---------------------------------------------------------------------------------------------
# compute-sanitizer on small cases (memory errors; shared-memory races and barrier misuse)
# ---------------------------------------------------------------------------------------------

_SANITIZED_SCRIPT = """
import torch
from fused_attn import functional as F
dev, g = "cuda", torch.Generator().manual_seed(0)
for dtype in (torch.float16, torch.float32):
    q = torch.randn(1, 2, 19, 40, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(1, 1, 23, 40, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(1, 1, 23, 24, device=dev, dtype=dtype, requires_grad=True)
    m = torch.randn(1, 1, 19, 23, device=dev, dtype=dtype, requires_grad=True)
    F.attention(q, k, v, attn_mask=m, causal=True, dropout_p=0.1, backend="cuda", generator=g).sum().backward()
    s = torch.rand(2, device=dev)  # ALiBi: the slopes read through a stride-0 (B, Hq) view
    F.attention(q, k, v, causal=True, alignment="bottom_right", alibi_slopes=s, backend="cuda").sum().backward()
    if dtype == torch.float16:  # several key and query blocks: the cp.async stages alternate
        q = torch.randn(1, 2, 70, 64, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 2, 150, 64, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 2, 150, 64, device=dev, dtype=dtype, requires_grad=True)
        F.attention(q, k, v, backend="cuda").sum().backward()
    if TOOL == "memcheck":
        x = torch.randn(5, 59, device=dev, dtype=dtype, requires_grad=True)
        r = torch.randn(5, 59, device=dev, dtype=dtype, requires_grad=True)
        w = torch.randn(59, device=dev, dtype=dtype, requires_grad=True)
        F.layer_norm_residual(x, r, w, w, dropout_p=0.1, backend="cuda", generator=g).sum().backward()
        x8 = torch.randn(5, 64, device=dev, dtype=dtype, requires_grad=True)
        F.layer_norm_residual(x8, x8, None, None, rms=True, backend="cuda").sum().backward()
        w1 = torch.randn(2 * 24, 16, device=dev, dtype=dtype, requires_grad=True)
        w2 = torch.randn(8, 24, device=dev, dtype=dtype, requires_grad=True)
        xf = torch.randn(7, 16, device=dev, dtype=dtype, requires_grad=True)
        F.feed_forward(xf, w1, None, w2, None, activation="swiglu", dropout_p=0.1, backend="cuda",
                       generator=g).sum().backward()
torch.cuda.synchronize()
print("sanitized run finished")
"""


@gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck"])
def test_compute_sanitizer_small_cases(tool, tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    sanitizer = shutil.which("compute-sanitizer")
    if sanitizer is None:
        pytest.skip("compute-sanitizer is not installed on this machine")
    script = tmp_path / "sanitized.py"
    script.write_text(f"TOOL = {tool!r}\n" + _SANITIZED_SCRIPT)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # so memcheck sees each allocation's bounds
    proc = subprocess.run([sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=900, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "sanitized run finished" in log, f"compute-sanitizer {tool}:\n{log[-8000:]}"


# ---------------------------------------------------------------------------------------------
# the backend's declared limits (no GPU needed)
# ---------------------------------------------------------------------------------------------

def test_cuda_backend_declares_its_kernel_limits():
    from fused_attn.backends import BACKENDS, Call
    cuda = BACKENDS["cuda"]
    dev = torch.device("cuda")
    big_head = cuda.call_reasons(Call("attention", dev, torch.float16, {"head_dim": 64, "head_dim_v": 320}))
    assert any("head_dim_v 320 > 256" in r for r in big_head)
    ok_head = cuda.call_reasons(Call("attention", dev, torch.float16, {"head_dim": 256, "head_dim_v": 256}))
    assert not any("head_dim" in r for r in ok_head)
    wide = cuda.call_reasons(Call("layer_norm_residual", dev, torch.bfloat16, {"hidden": 65536}))
    assert any("hidden size 65536" in r for r in wide)
    assert not any("hidden" in r for r in cuda.call_reasons(Call("layer_norm_residual", dev, torch.bfloat16,
                                                                 {"hidden": 4096})))


# ---------------------------------------------------------------------------------------------
# shared memory per block: a call the device cannot take is declined up front (no GPU needed:
# the device's properties are mocked)
# ---------------------------------------------------------------------------------------------

# cudaDevAttrMaxSharedMemoryPerBlockOptin
SM86 = 101376  # sm_86 / sm_89 (RTX 30xx / 40xx, A10, L4, L40)
SM80 = 166912  # A100
SM90 = 232448  # H100 / H200


@pytest.fixture
def mocked_devices(monkeypatch):
    """Makes the cuda backend available and its devices report the opt-in shared memory that the test
    sets: ``mocked_devices(limit, ..., capabilities=None)`` (one device per limit; compute capability
    9.0 each unless ``capabilities`` lists them). Returns the get_device_properties calls (the
    get_device_capability calls are ``capability_calls``)."""
    from types import SimpleNamespace

    from fused_attn import _extension, backends
    from fused_attn.backends import cuda as cuda_module

    calls, limits, capabilities = [], [], []

    def props(index):
        calls.append(index)
        return SimpleNamespace(shared_memory_per_block_optin=limits[index])

    def capability(index):
        set_limits.capability_calls.append(index)
        return capabilities[index]

    monkeypatch.setattr(cuda_module.CudaBackend, "unavailable_reasons", lambda self: [])
    monkeypatch.setattr(_extension, "has_kernel", lambda *args: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(limits))
    monkeypatch.setattr(cuda_module, "_limits", {}, raising=False)
    monkeypatch.setattr(cuda_module, "_capabilities", {}, raising=False)
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(backends, "_warned", set())

    def set_limits(*values, capabilities=None):
        limits[:] = values
        set_capabilities(*(capabilities or [(9, 0)] * len(values)))
        cuda_module._limits.clear()
        backends._resolved.clear()
        return calls

    def set_capabilities(*values):
        capabilities[:] = values
        cuda_module._capabilities.clear()

    set_limits.capability_calls = []
    return set_limits


def _attention_call(dtype, D, Dv, device="cuda"):
    from fused_attn.backends import Call
    return Call("attention", torch.device(device), dtype, {"causal": False, "head_dim": D, "head_dim_v": Dv})


def _layer_norm_call(hidden, device="cuda"):
    from fused_attn.backends import Call
    return Call("layer_norm_residual", torch.device(device), torch.float32, {"hidden": hidden})


HEAD_DIMS = sorted({1, 16, 64, 128, 129, 192, 200, 224, 239, 240, 241, 248, 255, 256})


def test_cuda_backend_declines_what_sm86_shared_memory_cannot_take(mocked_devices):
    """sm_86/sm_89 (99 KB a block): float32 attention with both head dims above 240 (the smallest
    dK/dV tiles at 256/256 need 103,872 B) and layer norm above hidden 12,656 (the backward's
    (2 hidden + 32) floats) are declined; everything else stays."""
    from fused_attn.backends import BACKENDS
    cuda = BACKENDS["cuda"]
    mocked_devices(SM86)
    for dtype in DTYPES:
        for D in HEAD_DIMS:
            for Dv in HEAD_DIMS:
                reasons = cuda.call_reasons(_attention_call(dtype, D, Dv))
                expected = dtype == torch.float32 and D > 240 and Dv > 240
                assert bool(reasons) == expected, (dtype, D, Dv, reasons)
    reasons = cuda.call_reasons(_attention_call(torch.float32, 256, 256))
    assert len(reasons) == 1 and "103872 bytes of shared memory" in reasons[0] and "101376" in reasons[0], reasons
    for hidden in (1, 4096, 12656, 12657, 12672, 16384):
        reasons = cuda.call_reasons(_layer_norm_call(hidden))
        assert bool(reasons) == (hidden > 12656), (hidden, reasons)
    reasons = cuda.call_reasons(_layer_norm_call(16384))
    assert "131200 bytes of shared memory" in reasons[0] and "101376" in reasons[0], reasons
    # the limits of the kernels themselves still come first
    assert cuda.call_reasons(_attention_call(torch.float32, 320, 256)) == ["head_dim 320 > 256"]


@pytest.mark.parametrize("limit", [SM80, SM90], ids=["sm80", "sm90"])
def test_cuda_backend_declines_nothing_more_on_sm80_and_sm90(mocked_devices, limit):
    """The A100 and the H200 take every call they took before the shared-memory check."""
    from fused_attn.backends import BACKENDS
    cuda = BACKENDS["cuda"]
    mocked_devices(limit)
    for dtype in DTYPES:
        for D in range(1, 257):
            for Dv in (D, 1, 256):
                assert cuda.call_reasons(_attention_call(dtype, D, Dv)) == [], (dtype, D, Dv)
    for hidden in (1, 12657, 16384):
        assert cuda.call_reasons(_layer_norm_call(hidden)) == []


def test_cuda_backend_shared_memory_limit_per_device(mocked_devices, monkeypatch):
    """The limit is read once per device; a call on cuda:N gets that device's, a call on "cuda"
    (dispatch decides per device type) the smallest of the visible devices'."""
    from fused_attn.backends import BACKENDS
    cuda = BACKENDS["cuda"]
    calls = mocked_devices(SM90, SM86)
    assert cuda.call_reasons(_attention_call(torch.float32, 256, 256, "cuda:0")) == []
    declined = cuda.call_reasons(_attention_call(torch.float32, 256, 256, "cuda:1"))
    assert declined and "cuda:1" in declined[0]
    assert cuda.call_reasons(_attention_call(torch.float32, 256, 256))
    for _ in range(3):
        cuda.call_reasons(_layer_norm_call(16384))
    assert sorted(calls) == [0, 1]
    # torch without the property: nothing declined for shared memory (the kernels still raise)
    from types import SimpleNamespace

    import fused_attn.backends.cuda as cuda_module
    mocked_devices(SM86)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace())
    assert cuda_module.shared_memory_limit(torch.device("cuda")) is None
    assert cuda.call_reasons(_attention_call(torch.float32, 256, 256)) == []


def test_dispatch_moves_past_cuda_when_shared_memory_is_short(mocked_devices, monkeypatch):
    """``auto`` goes on to the next backend (saying why), a forced ``cuda`` raises with the need and the limit."""
    from fused_attn import backends
    from fused_attn.backends.triton import TritonBackend
    monkeypatch.setattr(TritonBackend, "unavailable_reasons", lambda self: ["not in this test"])
    mocked_devices(SM86)
    call = _attention_call(torch.float32, 256, 256)
    with pytest.warns(UserWarning, match="103872 bytes of shared memory"):
        assert backends.resolve(call, "auto") == "reference"
    assert backends.resolve(_attention_call(torch.float32, 240, 256), "auto") == "cuda"
    with pytest.raises(backends.BackendUnavailableError, match=r"cuda.*103872 bytes.*101376"):
        backends.resolve(call, "cuda")
    assert backends.resolve(_attention_call(torch.float32, 240, 256), "cuda") == "cuda"
    with pytest.raises(backends.BackendUnavailableError, match=r"hidden size 16384 needs 131200 bytes"):
        backends.resolve(_layer_norm_call(16384), "cuda")


# ---------------------------------------------------------------------------------------------
# compute capability: the build holds machine code / PTX for fused_attn/_cuda_archs.py only; other
# GPUs are declined up front (a launch there fails with cudaErrorNoKernelImageForDevice)
# ---------------------------------------------------------------------------------------------

def _every_op_call(device="cuda"):
    from fused_attn.backends import Call
    dev = torch.device(device)
    return [_attention_call(torch.float16, 64, 64, device), _layer_norm_call(1024, device),
            Call("feed_forward", dev, torch.bfloat16, {}), Call("rotary", dev, torch.float32, {})]


@pytest.mark.parametrize("capability", [(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)],
                         ids=lambda c: f"sm{c[0]}{c[1]}")
def test_cuda_backend_declines_devices_the_build_has_no_code_for(mocked_devices, capability):
    """sm_80 machine code serves sm_80-sm_89, sm_90's sm_90, and newer GPUs (B200 sm_100, RTX 50xx
    sm_120) JIT-compile the compute_90 PTX; older ones (T4 sm_75, V100 sm_70) have nothing to run."""
    from fused_attn.backends import BACKENDS
    cuda = BACKENDS["cuda"]
    mocked_devices(SM90, capabilities=[capability])
    runs = capability >= (8, 0)
    for call in _every_op_call() + _every_op_call("cuda:0"):
        reasons = cuda.call_reasons(call)
        if runs:
            assert reasons == [], (call, reasons)
        else:
            sm = f"sm_{capability[0]}{capability[1]}"
            assert reasons == [f"cuda:0 ({sm}) cannot run fused_attn._C's CUDA kernels, built as sm_80, sm_90 "
                               f"machine code and compute_90 PTX (fused_attn/_cuda_archs.py)"], (call, reasons)


def test_cuda_backend_capability_per_device_read_once(mocked_devices):
    """A call on cuda:N asks that device; a call on "cuda" (dispatch decides per device type) needs
    every visible device to run the kernels. Each device's capability is read once."""
    from fused_attn.backends import BACKENDS
    cuda = BACKENDS["cuda"]
    mocked_devices(SM90, SM90, capabilities=[(9, 0), (7, 5)])
    call = _every_op_call
    for _ in range(3):
        assert cuda.call_reasons(call("cuda:0")[2]) == []
        assert "cuda:1 (sm_75) cannot run" in cuda.call_reasons(call("cuda:1")[2])[0]
        assert "cuda:1 (sm_75) cannot run" in cuda.call_reasons(call()[2])[0]
    assert sorted(mocked_devices.capability_calls) == [0, 1]


def test_dispatch_moves_past_cuda_on_a_device_without_code(mocked_devices, monkeypatch):
    """``auto`` goes on to the next backend (the cuda backend comes first for feed_forward); a forced
    ``cuda`` raises with the reason instead of failing at launch."""
    from fused_attn import backends
    from fused_attn.backends.triton import TritonBackend
    monkeypatch.setattr(TritonBackend, "unavailable_reasons", lambda self: ["not in this test"])
    call = _every_op_call()[2]
    assert backends.auto_order("feed_forward", "cuda")[0] == "cuda"
    mocked_devices(SM90, capabilities=[(7, 5)])
    with pytest.warns(UserWarning, match=r"cuda: cuda:0 \(sm_75\) cannot run"):
        assert backends.resolve(call, "auto") == "reference"
    with pytest.raises(backends.BackendUnavailableError, match=r"cuda.*cuda:0 \(sm_75\) cannot run.*sm_80"):
        backends.resolve(call, "cuda")
    mocked_devices(SM90, capabilities=[(10, 0)])
    assert backends.resolve(call, "auto") == backends.resolve(call, "cuda") == "cuda"


def test_cuda_backend_is_unavailable_when_no_device_can_run_it(monkeypatch):
    """available_backends() says so when no visible GPU can run the build (one that can is enough),
    once CUDA is initialised (it never initialises CUDA itself)."""
    import fused_attn
    from fused_attn.backends import cuda as cuda_module
    capabilities = []
    monkeypatch.setattr(cuda_module.CompiledBackend, "unavailable_reasons", lambda self: [])
    monkeypatch.setattr(cuda_module, "_extension_has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    monkeypatch.setattr(cuda_module, "_capabilities", {}, raising=False)
    capabilities[:] = [(7, 5), (7, 0)]
    # before CUDA is initialised nothing is asked (asking would initialise it)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert fused_attn.available_backends()["cuda"]["available"] and not cuda_module._capabilities
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    report = fused_attn.available_backends()["cuda"]
    assert not report["available"]
    assert report["reasons"] == ["cuda:0 (sm_75), cuda:1 (sm_70) cannot run fused_attn._C's CUDA kernels, built as "
                                 "sm_80, sm_90 machine code and compute_90 PTX (fused_attn/_cuda_archs.py)"]
    for usable in ([(7, 5), (8, 6)], [(12, 0)]):
        capabilities[:] = usable
        cuda_module._capabilities.clear()
        assert fused_attn.available_backends()["cuda"] == {"available": True, "devices": ("cuda",), "reasons": []}


def test_cuda_archs_can_run():
    """The rule the backend applies: a cubin runs on its own major version at the same or a later minor;
    PTX on any later capability."""
    from fused_attn import _cuda_archs
    runs = [(major, minor) for major in range(5, 14) for minor in range(10) if _cuda_archs.can_run(major, minor)]
    assert runs == [(major, minor) for major in range(8, 14) for minor in range(10)]
