"""The Triton rotary-embedding kernel (fused_attn.triton.rotary.apply_rotary) against a float64
reference written here from the formulas (its GPU readiness, AOT compilation: test_triton_rotary_aot.py).

Without a GPU the kernel runs under the Triton interpreter (tests/conftest.py turns it on), in
float32 and float16 (the interpreter has no bfloat16 arithmetic); with one, on the GPU (``DEV``),
bfloat16 included. cos/sin are real RoPE tables (cos(p * f_i), sin(p * f_i)), so that the
conjugate really inverts the forward, and rows of different positions differ (a position off by
one turns the highest frequency by one radian).
"""
import pytest
import torch

from fused_attn.triton import rotary as ROT

F32, F16 = torch.float32, torch.float16
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [F32, F16] + ([torch.bfloat16] if DEV == "cuda" else [])
TOL = {F32: dict(atol=1e-6, rtol=1e-6), F16: dict(atol=2e-3, rtol=1e-3), torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3)}


# ---- reference and inputs -----------------------------------------------------------------------

def apply_rotary(x, cos, sin, offsets, cu_seqlens=None, max_seqlen=None, *, interleaved=False, conjugate=False):
    """FlashAttention's call (offsets, packed sequences) on the launcher, which takes each token's
    position: (B, L) positions offset[b] + l, or for packed (T, H, D) sequences one batch row of
    (1, T) positions restarting at each sequence. ``max_seqlen`` only bounds the sequences."""
    if cu_seqlens is None:
        B, L = x.shape[:2]
        off = torch.as_tensor(offsets, device=x.device).long().reshape(-1).expand(B)
        positions = off[:, None] + torch.arange(L, device=x.device)
        return ROT.apply_rotary(x, cos, sin, positions, interleaved=interleaved, conjugate=conjugate)
    cu = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    assert max_seqlen is None or max(lengths, default=0) <= max_seqlen
    off = [offsets] * len(lengths) if isinstance(offsets, int) else offsets.tolist()
    positions = torch.tensor([o + t for o, n in zip(off, lengths) for t in range(n)], dtype=torch.int64,
                             device=x.device)
    out = ROT.apply_rotary(x[None], cos, sin, positions[None], interleaved=interleaved, conjugate=conjugate)
    return out[0]


def reference(x, cos, sin, offsets, cu_seqlens=None, interleaved=False, conjugate=False):
    """float64 RoPE of x (B, L, H, D) or packed (T, H, D) with cu_seqlens, straight from the formulas."""
    x64, c64, s64 = x.detach().cpu().double(), cos.cpu().double(), sin.cpu().double()
    if conjugate:
        s64 = -s64
    r = 2 * cos.shape[1]
    if cu_seqlens is None:
        bounds = [(b, None) for b in range(x.shape[0])]
    else:
        cu = cu_seqlens.tolist()
        bounds = [(cu[b], cu[b + 1]) for b in range(len(cu) - 1)]
    out = x64.clone()
    for b, (lo, hi) in enumerate(bounds):
        seq = x64[lo] if hi is None else x64[lo:hi]  # (L, H, D)
        off = offsets if isinstance(offsets, int) else int(offsets[b])
        pos = off + torch.arange(seq.shape[0])
        c, s = c64[pos][:, None, :], s64[pos][:, None, :]  # (L, 1, R/2)
        if interleaved:
            x1, x2 = seq[..., 0:r:2], seq[..., 1:r:2]
        else:
            x1, x2 = seq[..., : r // 2], seq[..., r // 2: r]
        o = seq.clone()
        o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
        if interleaved:
            o[..., 0:r:2], o[..., 1:r:2] = o1, o2
        else:
            o[..., : r // 2], o[..., r // 2: r] = o1, o2
        if hi is None:
            out[lo] = o
        else:
            out[lo:hi] = o
    return out


def tables(seqlen_ro, rotary_dim, dtype=F32, base=10000.0):
    """RoPE cos/sin tables (seqlen_ro, R/2): angle p * base^(-2i/R), computed in float64."""
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / max(rotary_dim, 1))
    angles = torch.arange(seqlen_ro, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype).to(DEV), angles.sin().to(dtype).to(DEV)


def rand(*shape, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)


def check(out, x, cos, sin, offsets, cu_seqlens=None, interleaved=False, conjugate=False):
    assert out.shape == x.shape and out.dtype == x.dtype and out.stride() == torch.empty_like(x).stride()
    assert out.data_ptr() != x.data_ptr()
    ref = reference(x, cos, sin, offsets, cu_seqlens, interleaved, conjugate)
    torch.testing.assert_close(out.cpu().double(), ref, **TOL[x.dtype])


# ---- dense (B, L, H, D) -------------------------------------------------------------------------

# (head dim D, rotary dim R): full, half, non-power-of-two R with an odd D's tail, R = D not a
# power of two, R = 2 (a pass-through of four chunks)
DIMS = [(64, 64), (64, 32), (59, 40), (40, 40), (64, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("conjugate", [False, True])
@pytest.mark.parametrize("d,r", DIMS)
def test_dims_styles_dtypes(d, r, conjugate, interleaved, dtype):
    x = rand(2, 17, 3, d, dtype=dtype)
    cos, sin = tables(40, r)
    out = apply_rotary(x, cos, sin, 5, interleaved=interleaved, conjugate=conjugate)
    check(out, x, cos, sin, 5, interleaved=interleaved, conjugate=conjugate)


@pytest.mark.parametrize("b,l,h", [(1, 1, 1), (3, 1, 3), (1, 97, 1), (2, 97, 3), (1, 17, 8)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_odd_shapes(b, l, h, interleaved):
    x = rand(b, l, h, 48, seed=1)
    cos, sin = tables(100, 32)
    out = apply_rotary(x, cos, sin, 3, interleaved=interleaved)
    check(out, x, cos, sin, 3, interleaved=interleaved)


@pytest.mark.parametrize("d,r", [(1100, 1040), (8, 0)])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_dim_extremes(d, r, interleaved):
    # R = 1040: BLOCK_K = 512, two chunks of the rotated halves; R = 0: a pure copy
    x = rand(1, 3, 2, d, seed=2)
    cos, sin = tables(8, r)
    out = apply_rotary(x, cos, sin, 4, interleaved=interleaved)
    check(out, x, cos, sin, 4, interleaved=interleaved)
    if r == 0:
        assert torch.equal(out, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
def test_conjugate_inverts_forward(interleaved, dtype):
    x = rand(2, 17, 3, 59, dtype=dtype, seed=3)
    cos, sin = tables(20, 40)
    y = apply_rotary(x, cos, sin, 2, interleaved=interleaved)
    back = apply_rotary(y, cos, sin, 2, interleaved=interleaved, conjugate=True)
    assert not torch.allclose(y.float(), x.float(), atol=0.1)  # the forward did rotate
    tol = {F32: dict(atol=1e-5, rtol=1e-5), F16: dict(atol=1e-2, rtol=1e-2),
           torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}[dtype]
    torch.testing.assert_close(back, x, **tol)
    assert torch.equal(back[..., 40:], x[..., 40:])  # the tail is copied both ways, bit for bit


@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("interleaved", [False, True])
def test_tensor_offsets(offset_dtype, interleaved):
    x = rand(3, 17, 2, 64, seed=4)
    cos, sin = tables(40, 64)
    offsets = torch.tensor([0, 7, 23], dtype=offset_dtype, device=DEV)
    out = apply_rotary(x, cos, sin, offsets, interleaved=interleaved)
    check(out, x, cos, sin, offsets, interleaved=interleaved)


def test_offset_reaches_end_of_table():
    # the last token sits at position seqlen_ro - 1
    x = rand(2, 17, 2, 32, seed=5)
    cos, sin = tables(20, 32)
    out = apply_rotary(x, cos, sin, 3)
    check(out, x, cos, sin, 3)
    offsets = torch.tensor([3, 0], dtype=torch.int64, device=DEV)
    check(apply_rotary(x, cos, sin, offsets), x, cos, sin, offsets)


# ---- varlen (T, H, D) ---------------------------------------------------------------------------

LENGTHS = [0, 1, 17, 5]


def _cu(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("offsets", ["int", "int32", "int64"])
def test_varlen(offsets, interleaved, dtype):
    cu = _cu(LENGTHS)
    x = rand(sum(LENGTHS), 3, 59, dtype=dtype, seed=6)
    cos, sin = tables(40, 40)
    if offsets == "int":
        offs = 6
    else:
        offs = torch.tensor([9, 0, 22, 35], dtype=getattr(torch, offsets), device=DEV)
    out = apply_rotary(x, cos, sin, offs, cu, max(LENGTHS), interleaved=interleaved)
    check(out, x, cos, sin, offs, cu, interleaved=interleaved)


def test_varlen_conjugate():
    cu = _cu(LENGTHS)
    x = rand(sum(LENGTHS), 2, 32, seed=7)
    cos, sin = tables(30, 32)
    out = apply_rotary(x, cos, sin, 1, cu, conjugate=True)
    check(out, x, cos, sin, 1, cu, conjugate=True)


def test_varlen_single_and_many_sequences():
    lengths = [3, 0, 0, 2, 1, 0, 4, 1]
    cu = _cu(lengths)
    x = rand(sum(lengths), 1, 16, seed=8)
    cos, sin = tables(11, 16)
    offs = torch.arange(8, dtype=torch.int32, device=DEV) % 5
    check(apply_rotary(x, cos, sin, offs, cu, 4, interleaved=True), x, cos, sin, offs, cu, interleaved=True)
    cu1 = _cu([11])
    x1 = rand(11, 4, 16, seed=9)
    check(apply_rotary(x1, cos, sin, 0, cu1, 11), x1, cos, sin, 0, cu1)


# ---- strides, dtypes of the tables, inputs untouched ----------------------------------------------

@pytest.mark.parametrize("interleaved", [False, True])
def test_non_contiguous_x(interleaved):
    # (B, H, L, 2D) storage viewed as (B, L, H, D) with the last dim of stride 2
    base = rand(2, 3, 17, 2 * 59, seed=10)
    x = base.transpose(1, 2)[..., ::2]
    assert x.stride(-1) == 2 and not x.is_contiguous()
    cos, sin = tables(30, 40)
    out = apply_rotary(x, cos, sin, 4, interleaved=interleaved)
    check(out, x, cos, sin, 4, interleaved=interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
def test_non_contiguous_varlen_x(interleaved):
    cu = _cu(LENGTHS)
    x = rand(sum(LENGTHS), 6, 2 * 40, seed=11)[:, 1::2, ::2]  # head and feature strides 2
    cos, sin = tables(40, 40)
    offs = torch.tensor([1, 2, 3, 4], dtype=torch.int64, device=DEV)
    out = apply_rotary(x, cos, sin, offs, cu, 17, interleaved=interleaved)
    check(out, x, cos, sin, offs, cu, interleaved=interleaved)


@pytest.mark.parametrize("interleaved", [False, True])
def test_float32_tables_non_contiguous_half_input(interleaved):
    # x float16, cos/sin float32 and strided in both dims: a column slice and a transposed view
    x = rand(2, 17, 3, 64, dtype=F16, seed=12)
    cos_full, sin_full = tables(40, 64)
    cos = torch.repeat_interleave(cos_full, 2, dim=1)[:, ::2]  # (40, 32), column stride 2
    sin = sin_full.t().contiguous().t()  # (40, 32), strides (1, 40)
    assert cos.stride() != (32, 1) and sin.stride() == (1, 40)
    out = apply_rotary(x, cos, sin, 5, interleaved=interleaved)
    check(out, x, cos, sin, 5, interleaved=interleaved)


def test_half_tables_with_float32_input():
    x = rand(2, 9, 2, 40, seed=13)
    cos, sin = tables(20, 40, dtype=F16)
    out = apply_rotary(x, cos, sin, 2)
    check(out, x, cos, sin, 2)  # the reference reads the same float16 table values


def test_inputs_unchanged():
    cu = _cu(LENGTHS)
    x = rand(sum(LENGTHS), 3, 59, seed=14)
    cos, sin = tables(40, 40)
    cos, sin = cos[:, :20], sin.t().contiguous().t()
    offs = torch.tensor([3, 1, 4, 1], dtype=torch.int32, device=DEV)
    saved = [t.clone() for t in (x, cos, sin, offs, cu)]
    for conjugate in (False, True):
        out = apply_rotary(x, cos, sin, offs, cu, 17, interleaved=True, conjugate=conjugate)
        for before, after in zip(saved, (x, cos, sin, offs, cu)):
            assert torch.equal(before, after)
    xd = rand(2, 5, 3, 64, seed=15)
    xd_saved = xd.clone()
    apply_rotary(xd, cos, sin, 0)
    assert torch.equal(xd, xd_saved)
    check(out, x, cos, sin, offs, cu, interleaved=True, conjugate=True)


@pytest.mark.parametrize("shape", [(0, 4, 2, 32), (2, 0, 2, 32), (2, 4, 0, 32), (0, 2, 32)])
def test_empty(shape):
    cos, sin = tables(8, 32)
    x = torch.empty(shape, dtype=F16, device=DEV)
    if len(shape) == 3:  # varlen: every sequence empty
        out = apply_rotary(x, cos, sin, 0, _cu([0, 0]), 0)
    else:
        out = apply_rotary(x, cos, sin, 0)
    assert out.shape == x.shape and out.dtype == x.dtype
    # and no sequences at all
    out = apply_rotary(torch.empty((0, 2, 32), device=DEV), cos, sin, 0,
                       torch.zeros(1, dtype=torch.int32, device=DEV), 0)
    assert out.shape == (0, 2, 32)


# ---- configurations -------------------------------------------------------------------------------

def test_configs():
    configs = ROT.possible_configs()
    for r in range(0, 4100, 2):
        cfg = ROT.kernel_config(r)
        assert cfg in configs, r
        # a chunk of the rotated halves covers R/2 when it fits, else is the largest one
        assert cfg["BLOCK_K"] >= min(r // 2, ROT._MAX_BLOCK_K)
        assert cfg["ROWS"] * 2 * cfg["BLOCK_K"] == ROT._TILE_ELEMS == cfg["ROWS"] * cfg["BLOCK_P"]
    assert len(configs) == len({tuple(sorted(c.items())) for c in configs}) == 7
