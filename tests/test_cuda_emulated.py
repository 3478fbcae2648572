"""The CUDA kernels (csrc/cuda/*.cu), float32 path, run on CPU threads.

There is no GPU on the development machines, so tests/cuda_emu provides a small emulation of the
CUDA features the kernels use (threads, __syncthreads, warp shuffles, shared memory) and compiles
the kernels against it with the host compiler. Every CUDA thread becomes a std::thread; the
float32 instantiations run for real: for attention (plain-FMA tile products) the tiling, the
online softmax, masks, visibility bands (causal, sliding windows, bottom-right alignment, rows
that see nothing) and the key/query blocks they skip, grouped-query heads, dropout, strides and the three
backward kernels; for the norms the row reductions, 16-byte and scalar paths, dropout and the
two-stage weight-gradient reduction; for the FFN the activation epilogues. Each is held to the
float64 reference with the oracle (ALiBi too: per-(batch, head) slopes with any strides, the
bottom-right shift). The register-resident attention forward runs in float16 and
bfloat16: its warp primitives (mma.sync, ldmatrix, cp.async) are emulated from the PTX ISA's
fragment layouts (tests/cuda_emu/emu_mma_sm80.h), and those layouts are checked against plain
matrix products. The WMMA products of the other 16-bit instantiations are not emulated; they run
in tests/test_cuda_backend.py on a GPU. The host-side shared-memory plans (attention tiles, the
norms' rows) are held to their Python mirror in fused_attn/backends/cuda.py, which declines up front
the calls a device's shared memory cannot take. The launchers themselves (attention_fwd/bwd,
layer_norm_fwd/bwd) run against emulated devices (tests/cuda_emu/emu_device.h: compute capability,
opt-in shared memory, grid limits; the checks a GPU makes at a launch), for real on small calls and
as dry runs (checked and recorded, not run) on lengths far beyond what CPU threads could run: their
grids, and the shared-memory ceilings they raise, from several threads too.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch

import fused_attn
from fused_attn import _rng
from fused_attn import reference as R
from fused_attn.ops_common import BAND_UNBOUNDED, CAUSAL_BAND, NO_BAND, new_attention_out
from fused_attn.testing import compare

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emu"


def _build(tmp_path_factory, source: str) -> ctypes.CDLL:
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the CPU emulation of the CUDA kernels")
    lib = tmp_path_factory.mktemp("cuda_emu") / (Path(source).stem + ".so")
    # -fno-strict-aliasing: the kernels' 16-byte vector accesses reinterpret arrays, fine on a GPU.
    cmd = [cxx, "-std=c++20", "-O1", "-fno-strict-aliasing", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra",
           "-Werror", "-Wno-unknown-pragmas", "-DFUSED_ATTN_CPU_EMULATION", f"-I{EMU_DIR}", str(EMU_DIR / source),
           "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the emulated kernels ({source}) failed:\n{proc.stderr[-6000:]}"
    return ctypes.CDLL(str(lib))


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return _build(tmp_path_factory, "emu_attention.cpp")


@pytest.fixture(scope="module")
def emu_nf(tmp_path_factory):
    return _build(tmp_path_factory, "emu_norm_ffn.cpp")


def _i64(values):
    return (ctypes.c_int64 * len(values))(*values)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


def _dropout_args(p, seed, offset):
    scale_bits = struct.unpack("<I", struct.pack("<f", 1.0 / (1.0 - p)))[0] if p > 0 else 0
    return (ctypes.c_uint64 * 5)(int(p > 0), seed, offset, _rng.dropout_threshold(p) if p > 0 else 0, scale_bits)


def _common_args(q, k, v, mask, band, scale, p, seed, offset, softcap=0.0, alibi=None, alignment="top_left"):
    """The arguments the emulated entries share; ``band`` = (band_lo, band_hi), unclamped (the entries
    clamp it to [-Lq, Lk] as the binding does); softcap 0 is off; ``alibi``: None or float32 (B, Hq)
    slopes with any strides, passed as the binding does (pointer, strides, shift = Lk - Lq when
    ``alignment`` is bottom_right, else 0)."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    sizes = _i64([B, Hq, k.shape[1], Lq, Lk, D, v.shape[3]])
    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    if alibi is not None:
        assert alibi.dtype == torch.float32 and alibi.shape == (B, Hq)
    shift = Lk - Lq if alibi is not None and alignment == "bottom_right" else 0
    return [_ptr(q), _i64(q.stride()), _ptr(k), _i64(k.stride()), _ptr(v), _i64(v.stride()), sizes, ctypes.c_int(kind),
            _ptr(mask), _i64(mask.stride() if mask is not None else (0, 0, 0, 0)), ctypes.c_int64(band[0]),
            ctypes.c_int64(band[1]), ctypes.c_float(scale), _dropout_args(p, seed, offset), ctypes.c_float(softcap),
            _ptr(alibi), _i64(alibi.stride() if alibi is not None else (0, 0)), ctypes.c_int64(shift)]


def band_keep(band, Lq, Lk):
    """The (Lq, Lk) bool matrix of the band: query i sees key j iff lo <= j - i <= hi (the
    reference's definition, independent of the kernels' block ranges)."""
    return R.visible_keys(Lq, Lk, band=band)


def with_band(mask, band, Lq, Lk):
    """``mask`` (None, bool or additive) with the band folded in, for the reference."""
    keep = band_keep(band, Lq, Lk)
    if bool(keep.all()):
        return mask
    if mask is None:
        return keep
    return mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))


def case_band(opts):
    """A case's band: ``band`` as given, else causal (top-left) or none."""
    return opts.get("band", CAUSAL_BAND if opts.get("causal") else NO_BAND)


def emulated_attention(emu, q, k, v, mask, band, scale, p, seed, offset, dout, blocks, softcap=0.0, alibi=None,
                       alignment="top_left", dlse=None):
    """(out, lse, dq, dk, dv, dmask) from the emulated kernels; dmask only for an additive mask;
    ``dlse``: the lse's gradient (contiguous float32 (B, Hq, Lq)) or None."""
    common = _common_args(q, k, v, mask, band, scale, p, seed, offset, softcap, alibi, alignment)
    out = new_attention_out(q, v.shape[3])
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    assert emu.emu_attention_fwd(*common, _ptr(out), _i64(out.stride()), _ptr(lse), *blocks) == 0
    dq, dk, dv = torch.empty_like(q, memory_format=torch.contiguous_format), torch.zeros(k.shape), torch.zeros(v.shape)
    additive = mask is not None and mask.dtype != torch.bool
    dmask = torch.zeros(q.shape[:3] + (k.shape[2],)) if additive else None
    delta = torch.empty(q.shape[:3], dtype=torch.float32)
    assert emu.emu_attention_bwd(*common, _ptr(out), _i64(out.stride()), _ptr(lse), _ptr(dout), _i64(dout.stride()),
                                 _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dmask), _ptr(delta), *blocks,
                                 _ptr(None if dlse is None else dlse.contiguous())) == 0
    return out, lse, dq, dk, dv, dmask


def reference_attention(q, k, v, mask, band, scale, p, seed, offset, dout, dtype, softcap=0.0, alibi=None,
                        alignment="top_left", dlse=None):
    """The same quantities from fused_attn.reference in ``dtype`` (autograd for the gradients), the
    band applied as a mask (with_band), ALiBi's bias placed by ``alignment`` (the band is given
    whole, so alignment moves only the bias); dmask is the gradient of the given mask. ``dlse``:
    the lse's gradient (None = zeros)."""
    cast = lambda t: None if t is None else (t if t.dtype == torch.bool else t.to(dtype))
    q_, k_, v_, m_ = (cast(t) for t in (q, k, v, mask))
    Lq, Lk = q.shape[2], k.shape[2]
    additive = mask is not None and mask.dtype != torch.bool
    rng = (seed, offset) if p > 0 else None

    def outputs(q, k, v, m):
        m = with_band(m, band, Lq, Lk)
        return (R.attention(q, k, v, attn_mask=m, dropout_p=p, scale=scale, rng=rng, softcap=softcap,
                            alibi_slopes=alibi, alignment=alignment),
                R.attention_lse(q, k, attn_mask=m, scale=scale, softcap=softcap, alibi_slopes=alibi,
                                alignment=alignment))

    grads_out = (dout.to(dtype), torch.zeros(q.shape[:3], dtype=dtype) if dlse is None else dlse.to(dtype))
    if additive:
        (out, lse), vjp = torch.func.vjp(outputs, q_, k_, v_, m_)
        dq, dk, dv, dmask = vjp(grads_out)
    else:
        (out, lse), vjp = torch.func.vjp(lambda q, k, v: outputs(q, k, v, m_), q_, k_, v_)
        (dq, dk, dv), dmask = vjp(grads_out), None
    return out, lse, dq, dk, dv, dmask


def check_dead_rows(band, Lq, Lk, out, lse, dq):
    """Rows the band leaves no key: exactly zero output and dq, lse = +inf. Returns their number."""
    dead = ~band_keep(band, Lq, Lk).any(dim=1)
    if bool(dead.any()):
        assert (out[:, :, dead] == 0).all() and (dq[:, :, dead] == 0).all()
        assert torch.isinf(lse[:, :, dead]).all() and (lse[:, :, dead] > 0).all()
    return int(dead.sum())


def attention_inputs(name, dtype, B, Hq, Hkv, Lq, Lk, D, Dv, opts):
    """(q, k, v, mask, randn) for a case, drawn from a generator seeded by its name."""
    gen = torch.Generator().manual_seed(len(name))
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)
    if opts.get("layout") == "strided":  # q as a (B, L, H, D) transpose, k/v shared by the batch (stride 0)
        q = randn(B, Lq, Hq, D).transpose(1, 2)
        k = randn(1, Hkv, Lk, D).expand(B, -1, -1, -1)
        v = randn(1, Hkv, Lk, Dv).expand(B, -1, -1, -1)
    elif opts.get("layout") == "padded_rows":  # the first D (Dv) features of wider rows: the row stride
        # allows 16-byte loads, the row length does not (the loads past it would read the next features)
        pad = lambda n: n + (-n) % 4 + 4
        q = randn(B, Hq, Lq, pad(D))[..., :D]
        k = randn(B, Hkv, Lk, pad(D))[..., :D]
        v = randn(B, Hkv, Lk, pad(Dv))[..., :Dv]
    else:
        q, k, v = randn(B, Hq, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, Dv)
    if "q_scale" in opts:  # larger logits (so that a softcap bites)
        q = q * opts["q_scale"]
    mask = None
    if opts.get("mask") == "bool":
        mask = torch.rand(B, Hq, Lq, Lk, generator=gen) > 0.3
        mask[:, :, 2, :] = False  # a row with nothing to attend
    elif opts.get("mask") == "bool_key_major":  # stored (B, Hq, Lk, Lq): the key stride is Lq, not 1
        mask = (torch.rand(B, Hq, Lk, Lq, generator=gen) > 0.3).transpose(2, 3)
        mask[:, :, 2, :] = False
    elif opts.get("mask") == "additive":  # broadcast over the batch and heads: a stride-0 view
        m = randn(1, 1, Lq, Lk)
        m[..., :3] = float("-inf")
        mask = m.expand(B, Hq, Lq, Lk)
    return q, k, v, mask, randn


def alibi_inputs(name, B, Hq, opts):
    """A case's ALiBi slopes (float32 (B, Hq) views, as the binding gets them) and their alignment:
    - "per_batch": per (batch, head), in [-0.1, 0.5): the bias moves the probabilities a lot at these
      distances, and negative slopes (which reward distance) fail a missing absolute value;
    - "heads": the paper's (Hq,) slopes x 4 expanded over the batch (stride 0, as functional passes them);
    - "transposed": per (batch, head), stored (Hq, B) and transposed (strides (1, B)), so a slope read
      with the strides swapped is another head's or batch's."""
    kind, alignment = opts.get("alibi"), opts.get("alignment", "top_left")
    if kind is None:
        return None, alignment
    gen = torch.Generator().manual_seed(len(name) + 1)
    if kind == "per_batch":
        return torch.rand(B, Hq, generator=gen) * 0.6 - 0.1, alignment
    if kind == "heads":
        return (fused_attn.get_alibi_slopes(Hq) * 4).expand(B, Hq), alignment
    if kind == "transposed":
        return (torch.rand(Hq, B, generator=gen) * 0.6 - 0.1).t(), alignment
    raise ValueError(kind)


_U = BAND_UNBOUNDED  # an open end of a band, as the callers pass it

# name: (B, Hq, Hkv, Lq, Lk, D, Dv, options, (BM, BN))  -- the tile pairs the launcher may pick
CASES = {
    "basic_16x16": (1, 2, 2, 37, 29, 40, 24, {}, (16, 16)),
    "causal_gqa_lq_gt_lk_32x32": (2, 4, 2, 33, 20, 16, 16, {"causal": True}, (32, 32)),
    "causal_lq_lt_lk_64x32": (1, 1, 1, 19, 70, 8, 8, {"causal": True}, (64, 32)),
    "padded_rows_d6_dv10_gqa_16x16": (1, 2, 1, 19, 23, 6, 10, {"layout": "padded_rows", "causal": True}, (16, 16)),
    "bool_mask_key_major_16x16": (2, 2, 1, 19, 27, 8, 8, {"mask": "bool_key_major"}, (16, 16)),
    "bool_mask_dead_row_dropout_32x32": (1, 2, 1, 21, 35, 24, 24, {"mask": "bool", "dropout_p": 0.25}, (32, 32)),
    "additive_mask_grad_causal_64x32": (1, 2, 2, 40, 40, 8, 12, {"mask": "additive", "causal": True}, (64, 32)),
    "strided_and_broadcast_kv_64x64": (2, 2, 2, 17, 70, 32, 32, {"layout": "strided"}, (64, 64)),
    "dropout_mask_grad_16x16": (1, 2, 2, 18, 33, 16, 16, {"mask": "additive", "dropout_p": 0.3}, (16, 16)),
    # bands: key blocks before / after a query block's band and query blocks outside a key block's are skipped
    "window_left20_mask_grad_32x32": (1, 1, 1, 97, 97, 16, 16, {"band": (-20, 0), "mask": "additive"}, (32, 32)),
    # lo = -33: the last query seeing a key block [n0, n1) (n1 - 1 + 33) opens a query block (16, 32 or 64 rows)
    "window_left33_gqa_16x16": (1, 2, 1, 70, 70, 8, 8, {"band": (-33, 0)}, (16, 16)),
    "bottom_right_causal_lq_lt_lk_16x16": (1, 2, 2, 37, 90, 8, 8, {"band": (-_U, 90 - 37)}, (16, 16)),
    "bottom_right_causal_gqa_lq_gt_lk_dead_rows_16x16": (1, 4, 2, 45, 20, 16, 16,
                                                         {"band": (-_U, 20 - 45), "dropout_p": 0.2}, (16, 16)),
    "band_lo5_hi40_odd_32x32": (1, 2, 2, 53, 77, 24, 20, {"band": (5, 40)}, (32, 32)),
    "band_lo_gt_hi_all_dead_mask_grad_16x16": (1, 2, 1, 23, 31, 8, 8, {"band": (4, 1), "mask": "additive"}, (16, 16)),
    # logit soft-capping (q scaled up: scaled logits ~ N(0, 4^2), so tanh(s / 5) is far from linear)
    "softcap_gqa_dropout_32x32": (1, 4, 2, 37, 45, 24, 24, {"softcap": 5.0, "q_scale": 4.0, "dropout_p": 0.2},
                                  (32, 32)),
    "softcap_additive_mask_grad_band_16x16": (1, 2, 2, 41, 50, 16, 16, {"softcap": 5.0, "q_scale": 4.0,
                                                                        "mask": "additive", "band": (-12, 3)}, (16, 16)),
    # ALiBi (-slope |j - i - shift|): per-(batch, head) slopes with negative ones, any strides, the
    # bottom-right shift Lk - Lq of either sign, with the band, GQA, softcap, an additive mask, dropout
    "alibi_per_batch_causal_gqa_32x32": (2, 4, 2, 45, 45, 16, 16, {"alibi": "per_batch", "causal": True},
                                         (32, 32)),
    "alibi_transposed_bottom_right_lq_lt_lk_16x16": (2, 2, 1, 19, 70, 8, 8,
                                                     {"alibi": "transposed", "alignment": "bottom_right"}, (16, 16)),
    "alibi_heads_bottom_right_causal_lq_gt_lk_dead_rows_dropout_32x32": (
        2, 2, 2, 45, 20, 16, 16, {"alibi": "heads", "alignment": "bottom_right", "band": (-_U, 20 - 45),
                                  "dropout_p": 0.2}, (32, 32)),
    "alibi_softcap_additive_mask_grad_band_gqa_16x16": (
        2, 4, 2, 41, 50, 16, 16, {"alibi": "per_batch", "softcap": 5.0, "q_scale": 4.0, "mask": "additive",
                                  "band": (-12, 3)}, (16, 16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_attention_matches_reference(emu, name):
    B, Hq, Hkv, Lq, Lk, D, Dv, opts, blocks = CASES[name]
    q, k, v, mask, randn = attention_inputs(name, torch.float32, B, Hq, Hkv, Lq, Lk, D, Dv, opts)
    band, p, softcap = case_band(opts), opts.get("dropout_p", 0.0), opts.get("softcap", 0.0)
    scale, seed, offset = 1.0 / math.sqrt(D), 123456789012345, 987654321
    dout = randn(B, Hq, Lq, Dv)
    alibi, alignment = alibi_inputs(name, B, Hq, opts)

    got = emulated_attention(emu, q, k, v, mask, band, scale, p, seed, offset, dout, blocks, softcap, alibi,
                             alignment)
    ref64 = reference_attention(q, k, v, mask, band, scale, p, seed, offset, dout, torch.float64, softcap, alibi,
                                alignment)
    ref32 = reference_attention(q, k, v, mask, band, scale, p, seed, offset, dout, torch.float32, softcap, alibi,
                                alignment)
    names = ("out", "lse", "dq", "dk", "dv", "dmask")
    for i, name in enumerate(names):
        if got[i] is None:
            assert ref64[i] is None
            continue
        compare(name, got[i], ref64[i], ref32[i], k=2.0 if i < 2 else 5.0)
    if opts.get("mask") in ("bool", "bool_key_major"):  # the dead row: zeros and lse = +inf
        assert (got[0][:, :, 2] == 0).all() and torch.isinf(got[1][:, :, 2]).all()
    if check_dead_rows(band, Lq, Lk, got[0], got[1], got[2]) == Lq:  # the band leaves nothing: zeros throughout
        assert all((g == 0).all() for g in got[2:] if g is not None)


@pytest.mark.parametrize("name", ["causal_gqa_lq_gt_lk_32x32", "bottom_right_causal_gqa_lq_gt_lk_dead_rows_16x16",
                                  "alibi_softcap_additive_mask_grad_band_gqa_16x16"])
def test_emulated_attention_lse_gradient(emu, name):
    """The lse's gradient (dlse) through the delta kernel both kernel families share: dS = P (dP - (delta
    - dlse)), on top of the output's gradient; the dead rows' dlse changes nothing."""
    B, Hq, Hkv, Lq, Lk, D, Dv, opts, blocks = CASES[name]
    q, k, v, mask, randn = attention_inputs(name, torch.float32, B, Hq, Hkv, Lq, Lk, D, Dv, opts)
    band, p, softcap = case_band(opts), opts.get("dropout_p", 0.0), opts.get("softcap", 0.0)
    scale, seed, offset = 1.0 / math.sqrt(D), 123456789012345, 987654321
    dout, dlse = randn(B, Hq, Lq, Dv), randn(B, Hq, Lq)
    alibi, alignment = alibi_inputs(name, B, Hq, opts)
    args = (q, k, v, mask, band, scale, p, seed, offset, dout)
    got = emulated_attention(emu, *args, blocks, softcap, alibi, alignment, dlse=dlse)
    ref64 = reference_attention(*args, torch.float64, softcap, alibi, alignment, dlse=dlse)
    ref32 = reference_attention(*args, torch.float32, softcap, alibi, alignment, dlse=dlse)
    without = reference_attention(*args, torch.float64, softcap, alibi, alignment)
    assert float((without[2] - ref64[2]).abs().max()) > 0.1  # the lse's term is large
    for i, label in enumerate(("dq", "dk", "dv", "dmask"), start=2):
        if got[i] is not None:
            compare(label, got[i], ref64[i], ref32[i], k=5.0)


def test_emulated_attention_without_keys(emu):
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)
    dout = torch.randn(1, 2, 5, 8)
    out, lse, dq, dk, dv, _ = emulated_attention(emu, q, k, v, None, NO_BAND, 0.5, 0.0, 0, 0, dout, (16, 16))
    assert (out == 0).all() and torch.isinf(lse).all() and (lse > 0).all() and (dq == 0).all()


# ---------------------------------------------------------------------------------------------
# the register-resident forward (float16 / bfloat16: mma.sync, ldmatrix, cp.async emulated)
# ---------------------------------------------------------------------------------------------

_DTYPE_IDS = {torch.float16: 0, torch.bfloat16: 1}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("trans_b", [0, 1], ids=["b_rows_n", "b_rows_k"])
def test_emulated_warp_product_layouts(emu, dtype, trans_b):
    """One warp's ldmatrix + two mma.sync + the accumulator layout give A B (the layouts the kernel uses)."""
    gen = torch.Generator().manual_seed(7 + trans_b)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 16, generator=gen).to(dtype)  # [n][k] (trans_b 0) or [k][n] (trans_b 1)
    c = torch.empty(16, 16)
    emu.emu_warp_product(ctypes.c_int(_DTYPE_IDS[dtype]), _ptr(a), _ptr(b), ctypes.c_int(trans_b), _ptr(c))
    expected = a.double() @ (b.double() if trans_b else b.double().T)
    torch.testing.assert_close(c.double(), expected, rtol=1e-6, atol=1e-5)


# name: (dtype, B, Hq, Hkv, Lq, Lk, D, Dv, options, compiled head dim)
MMA_CASES = {
    "fp16_d40_lq17_lk97": (torch.float16, 1, 2, 2, 17, 97, 40, 40, {}, 64),
    "bf16_d59_dv24_causal_gqa_scalar_loads": (torch.bfloat16, 2, 4, 2, 97, 33, 59, 24, {"causal": True}, 64),
    "fp16_d128_lq1": (torch.float16, 1, 1, 1, 1, 65, 128, 128, {}, 128),
    "fp16_d128_causal_two_q_blocks": (torch.float16, 1, 1, 1, 70, 70, 128, 128, {"causal": True}, 128),
    "bf16_d96_negative_scale": (torch.bfloat16, 1, 2, 1, 33, 70, 80, 96, {"scale": -0.3}, 96),
    "fp16_d32_bool_mask_dead_row_dropout": (torch.float16, 1, 2, 1, 21, 35, 24, 32,
                                            {"mask": "bool", "dropout_p": 0.25}, 32),
    "bf16_d32_additive_mask_strided": (torch.bfloat16, 2, 2, 2, 19, 40, 32, 16,
                                       {"mask": "additive", "layout": "strided"}, 32),
    "fp16_d256_lk_not_multiple_of_block": (torch.float16, 1, 1, 1, 9, 37, 256, 200, {}, 256),
    # bands (the forward and dQ kernels take 64 queries x 64 keys a block, dK/dV 64 keys x 32 queries)
    "fp16_d32_window_left20_mask_grad": (torch.float16, 1, 2, 1, 97, 97, 32, 32,
                                         {"band": (-20, 0), "mask": "additive"}, 32),
    "bf16_d32_bottom_right_causal_gqa_lq_gt_lk_dead_rows": (torch.bfloat16, 1, 4, 2, 150, 40, 32, 32,
                                                            {"band": (-_U, 40 - 150)}, 32),
    # blocks wholly inside the band run unmasked (dK/dV: keys [64, 128) x queries [32, 64))
    "fp16_d40_band_lo1_hi100_odd": (torch.float16, 1, 1, 1, 67, 131, 40, 40, {"band": (1, 100)}, 64),
    "bf16_d32_band_lo_gt_hi_all_dead_mask_grad": (torch.bfloat16, 1, 2, 1, 33, 45, 32, 32,
                                                  {"band": (4, 1), "mask": "additive"}, 32),
    # hi = 62 = a 64-key block's width - 2: the blocks at n0 = m0 are masked by their top-right corner
    # alone (query m0 may not see key m0 + 63), so the unmasked-block test must count that corner
    "fp16_d32_window_left33_dkdv_last_query_block": (torch.float16, 1, 1, 1, 130, 130, 32, 32, {"band": (-33, 0)}, 32),
    "fp16_d32_band_hi62_corner_masked_blocks": (torch.float16, 1, 1, 1, 70, 140, 32, 32, {"band": (-_U, 62)}, 32),
    # logit soft-capping: unmasked blocks (the plain path) with dropout, and a band with a mask gradient
    "fp16_d128_softcap_plain_blocks_dropout": (torch.float16, 1, 2, 1, 130, 140, 128, 128,
                                               {"softcap": 5.0, "q_scale": 4.0, "dropout_p": 0.2}, 128),
    "bf16_d32_softcap_band_mask_grad_gqa": (torch.bfloat16, 1, 4, 2, 97, 97, 32, 32,
                                            {"softcap": 5.0, "q_scale": 4.0, "band": (-20, 5), "mask": "additive"},
                                            32),
    # ALiBi: the bias on the unmasked blocks' plain path with the bottom-right shift (forward and dQ:
    # queries [0, 64) x keys [0, 64) and [64, 128); dK/dV: keys [0, 64) x queries [0, 32), [32, 64)),
    # per-(batch, head) slopes with negative ones and any strides, GQA (the dK/dV kernels walk the
    # query heads, each with its slope), dropout, the band, softcap, a mask gradient, head dim 256
    "fp16_d32_alibi_transposed_plain_blocks_bottom_right_lq_lt_lk": (
        torch.float16, 2, 2, 1, 70, 140, 32, 32, {"alibi": "transposed", "alignment": "bottom_right"}, 32),
    "bf16_d64_alibi_per_batch_causal_gqa_dropout": (torch.bfloat16, 2, 4, 2, 97, 97, 64, 64,
                                                    {"alibi": "per_batch", "causal": True, "dropout_p": 0.2}, 64),
    "fp16_d32_alibi_heads_bottom_right_causal_gqa_lq_gt_lk_dead_rows": (
        torch.float16, 1, 4, 2, 150, 40, 32, 32, {"alibi": "heads", "alignment": "bottom_right",
                                                  "band": (-_U, 40 - 150)}, 32),
    "bf16_d32_alibi_softcap_band_mask_grad": (torch.bfloat16, 2, 2, 1, 97, 97, 32, 32,
                                              {"alibi": "per_batch", "softcap": 5.0, "q_scale": 4.0,
                                               "band": (-20, 5), "mask": "additive"}, 32),
    "fp16_d256_alibi_bottom_right_lq_lt_lk": (torch.float16, 2, 2, 2, 9, 37, 256, 200,
                                              {"alibi": "per_batch", "alignment": "bottom_right"}, 256),
}


@pytest.mark.parametrize("name", list(MMA_CASES))
def test_emulated_mma_kernels_match_reference(emu, name):
    dtype, B, Hq, Hkv, Lq, Lk, D, Dv, opts, kd = MMA_CASES[name]
    q, k, v, mask, randn = attention_inputs(name, dtype, B, Hq, Hkv, Lq, Lk, D, Dv, opts)
    band, p, softcap = case_band(opts), opts.get("dropout_p", 0.0), opts.get("softcap", 0.0)
    scale, seed, offset = opts.get("scale", 1.0 / math.sqrt(D)), 123456789012345, 987654321
    alibi, alignment = alibi_inputs(name, B, Hq, opts)

    out = new_attention_out(q, Dv)
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    args = _common_args(q, k, v, mask, band, scale, p, seed, offset, softcap, alibi, alignment)
    rc = emu.emu_attention_fwd_mma(ctypes.c_int(_DTYPE_IDS[dtype]), *args, _ptr(out), _i64(out.stride()), _ptr(lse),
                                   ctypes.c_int(kd))
    assert rc == 0, f"emu_attention_fwd_mma returned {rc}"

    def reference(ref_dtype):
        cast = lambda t: None if t is None else (t if t.dtype == torch.bool else t.to(ref_dtype))
        q_, k_, v_, m_ = (cast(t) for t in (q, k, v, mask))
        m_ = with_band(m_, band, Lq, Lk)
        rng = (seed, offset) if p > 0 else None
        return (R.attention(q_, k_, v_, attn_mask=m_, dropout_p=p, scale=scale, rng=rng, softcap=softcap,
                            alibi_slopes=alibi, alignment=alignment),
                R.attention_lse(q_, k_, attn_mask=m_, scale=scale, softcap=softcap, alibi_slopes=alibi,
                                alignment=alignment))

    (out64, lse64), (out_lp, lse_lp) = reference(torch.float64), reference(dtype)
    compare("out", out, out64, out_lp)
    compare("lse", lse, lse64, lse_lp)
    if opts.get("mask") == "bool":  # the dead row: zeros and lse = +inf
        assert (out[:, :, 2] == 0).all() and torch.isinf(lse[:, :, 2]).all()
    if kd > 128:  # the register-resident backward takes head dims up to 128
        return

    # The backward from this forward's out and lse (as the op runs it).
    dout = randn(B, Hq, Lq, Dv)
    dq = torch.empty(q.shape, dtype=dtype)
    dk, dv = torch.zeros(k.shape, dtype=dtype), torch.zeros(v.shape, dtype=dtype)
    additive = mask is not None and mask.dtype != torch.bool
    dmask = torch.zeros(q.shape[:3] + (Lk,), dtype=dtype) if additive else None
    delta = torch.empty(q.shape[:3], dtype=torch.float32)
    rc = emu.emu_attention_bwd_mma(ctypes.c_int(_DTYPE_IDS[dtype]), *args, _ptr(out), _i64(out.stride()), _ptr(lse),
                                   _ptr(dout), _i64(dout.stride()), _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dmask),
                                   _ptr(delta), ctypes.c_int(kd))
    assert rc == 0, f"emu_attention_bwd_mma returned {rc}"
    ref64 = reference_attention(q, k, v, mask, band, scale, p, seed, offset, dout, torch.float64, softcap, alibi,
                                alignment)
    ref_lp = reference_attention(q, k, v, mask, band, scale, p, seed, offset, dout, dtype, softcap, alibi,
                                 alignment)
    grads = {"dq": dq, "dk": dk, "dv": dv, "dmask": dmask}
    for i, name in enumerate(("dq", "dk", "dv", "dmask"), start=2):
        if grads[name] is None:
            assert ref64[i] is None
            continue
        compare(name, grads[name], ref64[i], ref_lp[i], k=5.0)
    if check_dead_rows(band, Lq, Lk, out, lse, dq) == Lq:  # the band leaves nothing: zeros throughout
        assert all((g == 0).all() for g in grads.values() if g is not None)


def _forward(emu, q, k, v, band=NO_BAND, softcap=0.0):
    """(out, lse): the register-resident kernel for 16-bit inputs, the shared-memory one for float32."""
    out = new_attention_out(q, v.shape[3])
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    args = _common_args(q, k, v, None, band, 1.0 / math.sqrt(q.shape[3]), 0.0, 0, 0, softcap)
    if q.dtype == torch.float32:
        rc = emu.emu_attention_fwd(*args, _ptr(out), _i64(out.stride()), _ptr(lse), 32, 32)
    else:
        rc = emu.emu_attention_fwd_mma(ctypes.c_int(_DTYPE_IDS[q.dtype]), *args, _ptr(out), _i64(out.stride()),
                                       _ptr(lse), ctypes.c_int(64))
    assert rc == 0
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16_registers", "fp32_shared"])
def test_emulated_forward_nan_and_inf_stay_in_their_rows(emu, dtype):
    """A NaN or inf input turns exactly the rows that see it non-finite, as in the reference: no
    'nothing visible' shortcut may turn a NaN row into zeros."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 70, 64, generator=gen).to(dtype) for _ in range(3))
    q[0, 1, 5, 3] = float("nan")   # one query row
    k[0, 0, 66, 0] = float("inf")  # one key of head 0, in the second key block: +-inf scores
    out, lse = _forward(emu, q, k, v, band=CAUSAL_BAND)
    bad = ~torch.isfinite(out)
    causal = band_keep(CAUSAL_BAND, 70, 70)
    ref_bad = ~torch.isfinite(R.attention(q.double(), k.double(), v.double(), attn_mask=causal))
    assert bad[0, 1, 5].all() and torch.isnan(lse[0, 1, 5])
    assert bad[0, 0, 66:].any() and not bad[0, 0, :66].any()  # earlier rows cannot see key 66
    assert torch.equal(bad, ref_bad), "the non-finite rows differ from the reference's"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16_registers", "fp32_shared"])
def test_emulated_softcap_forward_nan_stays_in_its_row(emu, dtype):
    """With the logits soft-capped (tanh of NaN is NaN) a NaN query still turns exactly its row
    non-finite, on the plain (unmasked-block) path too; the other rows match the reference."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 70, 64, generator=gen).to(dtype) for _ in range(3))
    q = q * 4
    q[0, 1, 5, 3] = float("nan")
    out, lse = _forward(emu, q, k, v, softcap=5.0)
    bad = ~torch.isfinite(out)
    assert bad[0, 1, 5].all() and torch.isnan(lse[0, 1, 5])
    bad[0, 1, 5] = False
    assert not bad.any()
    scale = 1.0 / math.sqrt(64)
    ref64 = R.attention(q.double(), k.double(), v.double(), scale=scale, softcap=5.0)
    ref_lp = R.attention(q, k, v, scale=scale, softcap=5.0)
    keep = torch.ones(70, dtype=torch.bool)
    keep[5] = False
    compare("out (finite rows)", out[0, 1, keep], ref64[0, 1, keep], ref_lp[0, 1, keep])
    compare("out (head 0)", out[0, 0], ref64[0, 0], ref_lp[0, 0])


def test_emulated_mma_forward_large_logits_do_not_overflow(emu):
    gen = torch.Generator().manual_seed(12)
    # raw scores ~1e5, above float16's 65504: the float32 accumulators and the max keep them finite
    q = (30 * torch.randn(1, 2, 33, 64, generator=gen)).half()
    k, v = (torch.randn(1, 2, 47, 64, generator=gen).half() for _ in range(2))
    out, _ = _forward(emu, q, k, v)
    ref64 = R.attention(q.double(), k.double(), v.double())
    compare("large-logit output", out, ref64, ref64.half(), k=1.0, floor=2e-2 * ref64.abs().max().item())


# ---------------------------------------------------------------------------------------------
# residual-add + LayerNorm / RMSNorm
# ---------------------------------------------------------------------------------------------

def _f(x):
    return ctypes.c_float(x)


# name: (rows, hidden, options)
NORM_CASES = {
    "layernorm_vec": (5, 64, {"residual": True, "vec": True}),
    "layernorm_scalar_odd": (4, 59, {"residual": True}),
    "layernorm_dropout_strided": (6, 48, {"residual": True, "dropout_p": 0.2, "vec": True, "strided": True}),
    "layernorm_no_affine": (3, 40, {"weight": False, "bias": False, "vec": True}),
    "rmsnorm_vec_dsummed": (5, 96, {"rms": True, "residual": True, "vec": True, "bias": False, "dsummed": True}),
    "rmsnorm_wide_dropout": (3, 1300, {"rms": True, "residual": True, "dropout_p": 0.1}),
}


@pytest.mark.parametrize("name", list(NORM_CASES))
def test_emulated_layer_norm_matches_reference(emu_nf, name):
    rows, d, opts = NORM_CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).float()
    x = randn(rows, d + 8)[:, 4:4 + d] if opts.get("strided") else randn(rows, d)
    r = randn(rows, d) if opts.get("residual") else None
    w = 1.0 + 0.3 * randn(d) if opts.get("weight", True) else None
    b = 0.2 * randn(d) if opts.get("bias", True) else None
    rms, p, seed, offset, eps, vec = opts.get("rms", False), opts.get("dropout_p", 0.0), 77, 5, 1e-5, opts.get("vec", False)
    drop = _dropout_args(p, seed, offset)
    out, summed = torch.empty(rows, d), torch.empty(rows, d)
    mean, rstd = torch.empty(rows), torch.empty(rows)
    assert emu_nf.emu_layer_norm_fwd(_ptr(x), ctypes.c_int64(x.stride(0)), _ptr(r), ctypes.c_int64(d), _ptr(w), _ptr(b),
                                     ctypes.c_int64(rows), ctypes.c_int64(d), _f(eps), ctypes.c_int(int(rms)), drop,
                                     _ptr(out), _ptr(summed), _ptr(None if rms else mean), _ptr(rstd),
                                     ctypes.c_int(int(vec))) == 0
    # store_summed=False hands the kernel no sum pointer: the same out, mean and rstd, nothing else written
    out2, mean2, rstd2 = torch.empty(rows, d), torch.empty(rows), torch.empty(rows)
    assert emu_nf.emu_layer_norm_fwd(_ptr(x), ctypes.c_int64(x.stride(0)), _ptr(r), ctypes.c_int64(d), _ptr(w), _ptr(b),
                                     ctypes.c_int64(rows), ctypes.c_int64(d), _f(eps), ctypes.c_int(int(rms)), drop,
                                     _ptr(out2), _ptr(None), _ptr(None if rms else mean2), _ptr(rstd2),
                                     ctypes.c_int(int(vec))) == 0
    assert torch.equal(out2, out) and torch.equal(rstd2, rstd) and (rms or torch.equal(mean2, mean))
    dout, dsummed = randn(rows, d), (randn(rows, d) if opts.get("dsummed") else None)
    parts = 2  # fewer partial blocks than rows: each block walks several rows
    dsum, dx = torch.empty(rows, d), torch.empty(rows, d)
    dw, db, partials = torch.empty(d), torch.empty(d), torch.empty(parts, 2, d)
    assert emu_nf.emu_layer_norm_bwd(_ptr(dout), ctypes.c_int64(d), _ptr(dsummed), ctypes.c_int64(d), _ptr(summed),
                                     _ptr(w), ctypes.c_int(int(b is not None)), _ptr(None if rms else mean), _ptr(rstd),
                                     ctypes.c_int64(rows), ctypes.c_int64(d), ctypes.c_int(int(rms)), drop, _ptr(dsum),
                                     _ptr(dx if p > 0 else None), _ptr(dw if w is not None else None),
                                     _ptr(db if b is not None else None), _ptr(partials), ctypes.c_int64(parts),
                                     ctypes.c_int(int(vec))) == 0

    def run(dtype):
        c = lambda t: None if t is None else t.to(dtype).requires_grad_(True)
        x_, r_, w_, b_ = c(x), c(r), c(w), c(b)
        o, s = R.layer_norm_residual(x_, r_, w_, b_, eps, p, prenorm=True, rms=rms,
                                     rng=(seed, offset) if p > 0 else None)
        s_ = s.float() if dtype == torch.float32 else s
        rstd_ref = torch.rsqrt((s_.pow(2).mean(-1) if rms else s_.var(-1, unbiased=False)) + eps)
        grads_out = [dout.to(dtype)] + ([dsummed.to(dtype)] if dsummed is not None else [])
        outs = [o] + ([s] if dsummed is not None else [])
        leaves = [t for t in (x_, r_, w_, b_) if t is not None]
        g = torch.autograd.grad(outs, leaves, grads_out)
        return [o.detach(), s.detach(), rstd_ref.detach(), s_.mean(-1).detach()] + list(g)

    ref64, ref32 = run(torch.float64), run(torch.float32)
    got = [out, summed, rstd, mean]
    names = ["out", "summed", "rstd", "mean"]
    # gradients, in the order of the leaves: x, residual, weight, bias
    got.append(dx if p > 0 else dsum); names.append("dx")
    if r is not None:
        got.append(dsum); names.append("dresidual")
    if w is not None:
        got.append(dw); names.append("dweight")
    if b is not None:
        got.append(db); names.append("dbias")
    for i, (name, value) in enumerate(zip(names, got)):
        if name == "mean" and rms:
            continue
        compare(name, value, ref64[i], ref32[i], k=2.0 if i < 4 else 5.0)


# ---------------------------------------------------------------------------------------------
# feed-forward activation epilogues
# ---------------------------------------------------------------------------------------------

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"]


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_emulated_ffn_activation_matches_reference(emu_nf, activation, dropout_p):
    tokens, d_ff = 7, 45
    gated = activation in ("swiglu", "geglu")
    gen = torch.Generator().manual_seed(3)
    pre = (2.0 * torch.randn(tokens, 2 * d_ff if gated else d_ff, generator=gen, dtype=torch.float64)).float()
    dh = torch.randn(tokens, d_ff, generator=gen, dtype=torch.float64).float()
    seed, offset = 31337, 12
    drop = _dropout_args(dropout_p, seed, offset)
    act_id = ctypes.c_int(ACTIVATIONS.index(activation))
    h, h2, dpre = torch.empty(tokens, d_ff), torch.empty(tokens, d_ff), torch.empty_like(pre)
    blocks = ctypes.c_int(1)  # one block: the grid-stride loop covers the rest
    assert emu_nf.emu_ffn_fwd(_ptr(pre), _ptr(h), ctypes.c_int64(tokens), ctypes.c_int64(d_ff), act_id, drop, blocks) == 0
    assert emu_nf.emu_ffn_bwd(_ptr(pre), _ptr(dh), _ptr(dpre), _ptr(h2), ctypes.c_int64(tokens), ctypes.c_int64(d_ff),
                              act_id, drop, blocks) == 0

    def run(dtype):
        p_ = pre.to(dtype).requires_grad_(True)
        out = R.activation_fn(p_, activation)
        if dropout_p > 0:
            out = _rng.apply_dropout(out, dropout_p, seed, offset)
        (g,) = torch.autograd.grad(out, p_, dh.to(dtype))
        return out.detach(), g

    (h64, g64), (h32, g32) = run(torch.float64), run(torch.float32)
    compare("h", h, h64, h32)
    compare("h (backward's recomputation)", h2, h64, h32)
    compare("dpre", dpre, g64, g32, k=5.0)


# ---------------------------------------------------------------------------------------------
# shared memory: fused_attn/backends/cuda.py's mirror of the host-side plans
# ---------------------------------------------------------------------------------------------

PLAN_DTYPES = {0: torch.float16, 1: torch.bfloat16, 2: torch.float32}  # emu_attention_plan's dtype ids
PLAN_HEAD_DIMS = (1, 8, 16, 17, 32, 64, 96, 100, 128, 129, 160, 176, 192, 193, 208, 224, 240, 241, 248, 256)
# opt-in shared memory per block: sm_60/sm_70/sm_75/sm_86 (sm_89)/sm_80/sm_90
PLAN_LIMITS = (48 * 1024, 96 * 1024, 64 * 1024, 101376, 166912, 232448)


def _cpp_plan(emu, dtype_id, backward, D, Dv, limit):
    """attention.cu's fwd_plan / bwd_plan: (bytes of each kernel launched) and (BM, BN), or None."""
    out = (ctypes.c_int64 * 4)()
    emu.emu_attention_plan(ctypes.c_int(dtype_id), ctypes.c_int(int(backward)), ctypes.c_int64(D), ctypes.c_int64(Dv),
                           ctypes.c_int64(limit), out)
    if out[0] == 0:
        return None
    return (tuple(out[:2]) if backward else (out[0],)), (out[2], out[3])


def test_attention_shared_memory_plans_match_the_python_mirror(emu):
    """CudaBackend declines a call up front when attention.cu's planner would find no tiles for it:
    the Python mirror (backends/cuda.py) picks the same tiles and bytes as the C++ at every device
    limit (and at each tile choice's exact size), every launched kernel fits the limit (dQ too:
    with BM > BN and Dv < D it needs more than dK/dV), and the declared need is the exact threshold."""
    from fused_attn.backends import cuda as C
    emu.emu_attention_plan.restype = None
    for dtype_id, dtype in PLAN_DTYPES.items():
        for D in PLAN_HEAD_DIMS:
            for Dv in PLAN_HEAD_DIMS:
                needs = C.attention_shared_memory(dtype, D, Dv)
                for backward, need in ((False, needs[0]), (True, needs[1])):
                    kernels = ("dkdv", "dq") if backward else ("fwd",)
                    exact = {max(C.attention_tile_bytes(dtype, D, Dv, bm, bn, k) for k in kernels)
                             for bm, bn in C._BLOCK_CHOICES}
                    for limit in sorted({*PLAN_LIMITS, *exact, *(e - 1 for e in exact)}):
                        got = _cpp_plan(emu, dtype_id, backward, D, Dv, limit)
                        assert got == C.attention_plan(dtype, D, Dv, limit, backward), (dtype, D, Dv, backward, limit)
                        assert (got is not None) == (need <= limit), (dtype, D, Dv, backward, limit, need)
                        assert got is None or max(got[0]) <= limit


def test_layer_norm_shared_memory_matches_the_python_mirror(emu_nf):
    from fused_attn.backends import cuda as C
    emu_nf.emu_layer_norm_smem_bytes.restype = ctypes.c_int64
    for hidden in (0, 1, 8, 1000, 4096, 12656, 12657, 16384, 65536):
        got = tuple(emu_nf.emu_layer_norm_smem_bytes(ctypes.c_int64(hidden), ctypes.c_int(b)) for b in (0, 1))
        assert got == C.layer_norm_shared_memory(hidden), hidden


def _emulated_activation(emu_nf, activation, pre, dh):
    """(h, dpre) of the CUDA epilogue kernels (forward and backward) on pre (tokens, F1)."""
    tokens, d_ff = dh.shape
    drop = _dropout_args(0.0, 0, 0)
    act_id = ctypes.c_int(ACTIVATIONS.index(activation))
    h, h2, dpre = torch.empty(tokens, d_ff), torch.empty(tokens, d_ff), torch.empty_like(pre)
    assert emu_nf.emu_ffn_fwd(_ptr(pre), _ptr(h), ctypes.c_int64(tokens), ctypes.c_int64(d_ff), act_id, drop,
                              ctypes.c_int(1)) == 0
    assert emu_nf.emu_ffn_bwd(_ptr(pre), _ptr(dh), _ptr(dpre), _ptr(h2), ctypes.c_int64(tokens), ctypes.c_int64(d_ff),
                              act_id, drop, ctypes.c_int(1)) == 0
    assert torch.equal(h, h2) or torch.equal(torch.isnan(h), torch.isnan(h2))
    return h, dpre


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_emulated_ffn_activation_extremes_and_nan(emu_nf, activation):
    # act and act' far beyond the usual range and at NaN: torch's value wherever torch's is finite
    # (tests/test_robustness.py has the same for the other backends); relu's gradient passes at a
    # NaN pre-activation, as torch's (relu(x) <= 0 ? 0 : grad) does (it was x > 0 ? 1 : 0).
    gated = activation in ("swiglu", "geglu")
    vals = torch.tensor([-3e38, -1e38, -1e30, -1e20, -1e5, -104.0, -88.5, -20.0, 0.0, 20.0, 88.5, 1e5, 1e20, 1e30,
                         3e38, float("nan")])[:, None]
    pre = torch.cat([vals, torch.ones_like(vals)], 1) if gated else vals.clone()
    dh = torch.ones(len(vals), 1)
    h, dpre = _emulated_activation(emu_nf, activation, pre, dh)
    p_ = pre.clone().requires_grad_(True)
    ref = R.activation_fn(p_, activation)
    (dref,) = torch.autograd.grad(ref, p_, dh)
    for name, got, want in (("h", h, ref.detach()), ("dpre", dpre[:, :1], dref[:, :1])):
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite], want[finite], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        assert torch.isnan(got[-1]).item() == torch.isnan(want[-1]).item(), f"{name} at NaN"
    if activation == "relu":
        assert dpre[-1, 0].item() == 1.0


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("vec", [False, True])
def test_emulated_layer_norm_overflowing_variance(emu_nf, rms, vec):
    # A row whose variance overflows float: LayerNorm gives NaN (rstd NaN), as torch does (rsqrt(inf)
    # = 0 gave out = bias and dx = 0 silently); RMSNorm keeps rstd 0 (out = bias), as torch's rms_norm.
    rows, d, eps = 3, 64, 1e-5
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(rows, d, generator=gen)
    x[1] *= 1e30
    w, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    drop = _dropout_args(0.0, 0, 0)
    out, summed, mean, rstd = torch.empty(rows, d), torch.empty(rows, d), torch.empty(rows), torch.empty(rows)
    assert emu_nf.emu_layer_norm_fwd(_ptr(x), ctypes.c_int64(d), _ptr(None), ctypes.c_int64(d), _ptr(w), _ptr(b),
                                     ctypes.c_int64(rows), ctypes.c_int64(d), _f(eps), ctypes.c_int(int(rms)), drop,
                                     _ptr(out), _ptr(summed), _ptr(None if rms else mean), _ptr(rstd),
                                     ctypes.c_int(int(vec))) == 0
    ref = R.layer_norm_residual(x, None, w, b, eps, rms=rms)
    ok = torch.tensor([True, False, True])
    torch.testing.assert_close(out[ok], ref[ok])
    if rms:
        assert rstd[1].item() == 0.0
        torch.testing.assert_close(out[1], ref[1])
    else:
        assert torch.isnan(rstd[1]) and torch.isnan(out[1]).all() and torch.isnan(ref[1]).all()
    dout = torch.randn(rows, d, generator=gen)
    parts = 2
    dsum, dw, db, partials = torch.empty(rows, d), torch.empty(d), torch.empty(d), torch.empty(parts, 2, d)
    assert emu_nf.emu_layer_norm_bwd(_ptr(dout), ctypes.c_int64(d), _ptr(None), ctypes.c_int64(d), _ptr(summed),
                                     _ptr(w), ctypes.c_int(1), _ptr(None if rms else mean), _ptr(rstd),
                                     ctypes.c_int64(rows), ctypes.c_int64(d), ctypes.c_int(int(rms)), drop, _ptr(dsum),
                                     _ptr(None), _ptr(dw), _ptr(db), _ptr(partials), ctypes.c_int64(parts),
                                     ctypes.c_int(int(vec))) == 0
    assert torch.isfinite(dsum[ok]).all() and torch.isfinite(db).all()
    assert torch.isfinite(dsum[1]).all() if rms else torch.isnan(dsum[1]).all() and torch.isnan(dw).all()


# Rows whose mean is large against their spread (std 0.01): the float mean of the whole row was a
# few ulps off and shifted all of xhat (mean 30, d = 4096: err 7.6e-4 against the oracle's bound
# 5.5e-4); the second pass's sum(s - mean) now corrects it, as the CPU kernel does.
@pytest.mark.parametrize("vec", [False, True])
@pytest.mark.parametrize("d,mean", [(4096, 30.0), (4096, 300.0), (16384, 300.0), (1000, -3000.0)])
def test_emulated_layer_norm_large_mean(emu_nf, d, mean, vec):
    rows, eps = 4, 1e-5
    gen = torch.Generator().manual_seed(int(abs(mean)) + d)
    x = (torch.randn(rows, d, generator=gen, dtype=torch.float64) * 0.01 + mean).float()
    w, b = 1 + 0.25 * torch.randn(d, generator=gen), 0.1 * torch.randn(d, generator=gen)
    out, summed, mu, rstd = torch.empty(rows, d), torch.empty(rows, d), torch.empty(rows), torch.empty(rows)
    assert emu_nf.emu_layer_norm_fwd(_ptr(x), ctypes.c_int64(d), _ptr(None), ctypes.c_int64(d), _ptr(w), _ptr(b),
                                     ctypes.c_int64(rows), ctypes.c_int64(d), _f(eps), ctypes.c_int(0),
                                     _dropout_args(0.0, 0, 0), _ptr(out), _ptr(summed), _ptr(mu), _ptr(rstd),
                                     ctypes.c_int(int(vec))) == 0
    ref64 = R.layer_norm_residual(x.double(), None, w.double(), b.double(), eps)
    compare("out", out, ref64, R.layer_norm_residual(x, None, w, b, eps))
    x64 = x.double()
    compare("mean", mu, x64.mean(-1), x.mean(-1))
    compare("rstd", rstd, torch.rsqrt(x64.var(-1, unbiased=False) + eps), torch.rsqrt(x.var(-1, unbiased=False) + eps))


# Rows whose spread is only a few float ulps of their mean (|mean| / std beyond ~2^22): normalised
# with the corrected mean rounded to float, whose rounding (up to ulp(mean) / 2) shifted every
# xhat by up to ulp(mean) / (2 std): 1e4 +- 2e-3, out off by 0.05, dx by 0.25 %. The kernels now
# normalise with the pair (mean, corr), the backward recomputing corr from the row and the saved
# mean. Forward and backward (dx, dresidual, dweight, dbias) against the reference with the oracle;
# the saved mean is still the float one (the corrected mean, rounded).
@pytest.mark.parametrize("vec", [False, True])
@pytest.mark.parametrize("mean,std,d", [(1e4, 2e-3, 1024), (1e6, 0.1, 4096), (-3e5, 0.05, 97)])
def test_emulated_layer_norm_nearly_constant_rows(emu_nf, mean, std, d, vec):
    if vec and d % 4:
        pytest.skip("the 16-byte path needs a hidden size divisible by 4")
    from test_robustness import nearly_constant_rows

    rows, eps = 3, 1e-5
    x, r = nearly_constant_rows(mean, std, rows, d, seed=d)
    gen = torch.Generator().manual_seed(d)
    w, b = 1 + 0.25 * torch.randn(d, generator=gen), 0.1 * torch.randn(d, generator=gen)
    drop = _dropout_args(0.0, 0, 0)
    out, summed, mu, rstd = torch.empty(rows, d), torch.empty(rows, d), torch.empty(rows), torch.empty(rows)
    assert emu_nf.emu_layer_norm_fwd(_ptr(x), ctypes.c_int64(d), _ptr(r), ctypes.c_int64(d), _ptr(w), _ptr(b),
                                     ctypes.c_int64(rows), ctypes.c_int64(d), _f(eps), ctypes.c_int(0), drop,
                                     _ptr(out), _ptr(summed), _ptr(mu), _ptr(rstd), ctypes.c_int(int(vec))) == 0
    dout = torch.randn(rows, d, generator=gen)
    dsum, dw, db, partials = torch.empty(rows, d), torch.empty(d), torch.empty(d), torch.empty(2, 2, d)
    assert emu_nf.emu_layer_norm_bwd(_ptr(dout), ctypes.c_int64(d), _ptr(None), ctypes.c_int64(d), _ptr(summed),
                                     _ptr(w), ctypes.c_int(1), _ptr(mu), _ptr(rstd), ctypes.c_int64(rows),
                                     ctypes.c_int64(d), ctypes.c_int(0), drop, _ptr(dsum), _ptr(None), _ptr(dw),
                                     _ptr(db), _ptr(partials), ctypes.c_int64(2), ctypes.c_int(int(vec))) == 0

    def run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, r, w, b)]
        o = R.layer_norm_residual(*leaves, eps)
        return [o.detach()] + list(torch.autograd.grad(o, leaves, dout.to(dtype)))

    ref64, ref32 = run(torch.float64), run(torch.float32)
    for i, (name, value) in enumerate(zip(["out", "dx", "dresidual", "dweight", "dbias"], [out, dsum, dsum, dw, db])):
        compare(name, value, ref64[i], ref32[i], k=2.0 if i == 0 else 5.0)
    s64 = (x + r).double()
    assert torch.equal(mu, s64.mean(-1).float())  # the float mean, correctly rounded on these rows


@pytest.mark.parametrize("vec", [False, True])
@pytest.mark.parametrize("d", [100, 1000])
def test_emulated_layer_norm_constant_rows_give_exactly_the_bias(emu_nf, d, vec):
    # A constant row normalises to exactly 0 (out = bias): the mean's correction corr is 0 exactly
    # there, taken as (e1 - d hi t) / d / t; as sum(e) / d - hi it kept a few ulps of the first
    # mean's error through inv_d's rounding (the last four values at d = 1000: out off by up to
    # 4e-7).
    values = torch.tensor([1.7, -3.3, 0.1, 300.1, 1e-3, 62.98143005371094, 505.7718505859375, 3085.228759765625,
                           8093.60693359375])[:, None]
    x = values.expand(len(values), d).contiguous()
    rows = x.shape[0]
    gen = torch.Generator().manual_seed(d)
    w, b = torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    out, summed, mu, rstd = torch.empty(rows, d), torch.empty(rows, d), torch.empty(rows), torch.empty(rows)
    for eps in (1e-6, 1e-5):
        assert emu_nf.emu_layer_norm_fwd(_ptr(x), ctypes.c_int64(d), _ptr(None), ctypes.c_int64(d), _ptr(w), _ptr(b),
                                         ctypes.c_int64(rows), ctypes.c_int64(d), _f(eps), ctypes.c_int(0),
                                         _dropout_args(0.0, 0, 0), _ptr(out), _ptr(summed), _ptr(mu), _ptr(rstd),
                                         ctypes.c_int(int(vec))) == 0
        assert torch.equal(out, b.expand(rows, d)), (out - b).abs().max().item()
        assert torch.equal(mu, values[:, 0])


# Rows whose variance (mean square) is representable while a plain float sum of their squares is
# not: the kernel's float sum_sq overflowed at +-1e18 over 1024 columns (variance 1e36), LayerNorm
# gave NaN and RMSNorm out = bias, dx = 0. Its sums are of scaled terms now (norm_stat_scale), as
# the Triton kernel's and the reference's; out, rstd and dx against float64. The constant rows of
# 1e20 and 1e36 check the deviations' origin (their variance came out 1e20 and inf).
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("vec", [False, True])
@pytest.mark.parametrize("d", [16, 1024])
def test_emulated_layer_norm_representable_statistics_of_huge_rows(emu_nf, rms, vec, d):
    eps = 1e-5
    gen = torch.Generator().manual_seed(d)
    scale = 1e18 if d >= 1024 else 1e19
    alt = torch.full((d,), scale)
    alt[::2] = -scale
    alt[0] = 2 * scale  # at d = 16 its square, 4e38, overflows; the variance, 1.2e38, does not
    rows = [alt, torch.randn(d, generator=gen) * scale]
    if not rms:  # a mean of 1e21 (spread 3e18), and constant rows (giving exactly the bias)
        rows += [(1e21 + 3e18 * torch.randn(d, generator=gen, dtype=torch.float64)).float()]
        rows += [torch.full((d,), c) for c in (1e20, 1e36, -3e38)]
    x = torch.stack(rows + [torch.randn(d, generator=gen)])
    n = x.shape[0]
    w, b = 1 + 0.25 * torch.randn(d, generator=gen), torch.randn(d, generator=gen)
    out, summed, mu, rstd = torch.empty(n, d), torch.empty(n, d), torch.empty(n), torch.empty(n)
    assert emu_nf.emu_layer_norm_fwd(_ptr(x), ctypes.c_int64(d), _ptr(None), ctypes.c_int64(d), _ptr(w), _ptr(b),
                                     ctypes.c_int64(n), ctypes.c_int64(d), _f(eps), ctypes.c_int(int(rms)),
                                     _dropout_args(0.0, 0, 0), _ptr(out), _ptr(summed), _ptr(None if rms else mu),
                                     _ptr(rstd), ctypes.c_int(int(vec))) == 0
    dout = torch.randn(n, d, generator=gen)
    dsum, dw, db, partials = torch.empty(n, d), torch.empty(d), torch.empty(d), torch.empty(2, 2, d)
    assert emu_nf.emu_layer_norm_bwd(_ptr(dout), ctypes.c_int64(d), _ptr(None), ctypes.c_int64(d), _ptr(summed),
                                     _ptr(w), ctypes.c_int(1), _ptr(None if rms else mu), _ptr(rstd),
                                     ctypes.c_int64(n), ctypes.c_int64(d), ctypes.c_int(int(rms)),
                                     _dropout_args(0.0, 0, 0), _ptr(dsum), _ptr(None), _ptr(dw), _ptr(db),
                                     _ptr(partials), ctypes.c_int64(2), ctypes.c_int(int(vec))) == 0
    x64 = x.double().requires_grad_()
    w64, b64 = w.double().requires_grad_(), b.double().requires_grad_()
    if rms:
        rstd64 = torch.rsqrt(x64.pow(2).mean(-1) + eps)
        xhat = x64 * rstd64[:, None]
    else:
        rstd64 = torch.rsqrt(x64.var(-1, unbiased=False) + eps)
        xhat = (x64 - x64.mean(-1, keepdim=True)) * rstd64[:, None]
    want = xhat * w64 + b64
    want_grads = torch.autograd.grad(want, (x64, w64, b64), dout.double())
    # row by row (dx is ~1e-18 on the 1e18 rows, ~300 on the constant one)
    for name, got, ref in (("out", out, want.detach()), ("rstd", rstd[:, None], rstd64.detach()[:, None]),
                           ("dx", dsum, want_grads[0]), ("dweight", dw[None], want_grads[1][None]),
                           ("dbias", db[None], want_grads[2][None])):
        assert torch.isfinite(got).all(), name
        for r, (g_row, e_row) in enumerate(zip(got.double(), ref)):
            err = (g_row - e_row).abs().max().item()
            assert err <= 1e-4 * e_row.abs().max().item() + 1e-30, f"{name} row {r}: err {err:.3g}"
    if not rms:
        assert torch.equal(out[3:6], b.expand(3, d))


# ---------------------------------------------------------------------------------------------
# the launchers themselves (attention_fwd/bwd, layer_norm_fwd/bwd) on emulated devices: their grids
# and their shared-memory opt-ins (tests/cuda_emu/emu_device.h)
# ---------------------------------------------------------------------------------------------

INT_MAX = 2**31 - 1
# index: (compute capability major, opt-in shared memory per block, grid limits (x, y, z))
EMU_DEVICES = {
    0: (9, 232448, (INT_MAX, 65535, 65535)),  # sm_90 (H100/H200)
    1: (8, 101376, (INT_MAX, 65535, 65535)),  # sm_86/sm_89
    2: (8, 166912, (INT_MAX, 65535, 65535)),  # sm_80 (A100)
    # tiny grids: spare blocks and the grid's errors on small calls; 4 has float32's smallest tiles (16 x 16)
    3: (9, 232448, (32, 2, 2)),
    4: (9, 24576, (32, 2, 2)),
}
_EMU_DTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def _with_devices(lib):
    for index, (cc, optin, (gx, gy, gz)) in EMU_DEVICES.items():
        lib.emu_set_device(index, cc, optin, 132, ctypes.c_int64(gx), ctypes.c_int64(gy), ctypes.c_int64(gz))
    return lib


@pytest.fixture(scope="module")
def host(emu):
    return _with_devices(emu)


@pytest.fixture(scope="module")
def host_nf(emu_nf):
    return _with_devices(emu_nf)


def _launches(lib):
    """This thread's launches since the last call: (kernel, device, (gx, gy, gz), threads, smem) each."""
    cap = 64
    buf = (ctypes.c_int64 * (7 * cap))()
    n = lib.emu_launches(buf, cap)
    assert n <= cap
    return [(buf[7 * i], buf[7 * i + 1], tuple(buf[7 * i + 2:7 * i + 5]), buf[7 * i + 5], buf[7 * i + 6])
            for i in range(n)]


def _attribute_calls(lib):
    """Every cudaFuncSetAttribute so far: (kernel, device, attribute, value) each."""
    cap = 4096
    buf = (ctypes.c_int64 * (4 * cap))()
    n = lib.emu_attribute_calls(buf, cap)
    assert n <= cap
    return [tuple(buf[4 * i:4 * i + 4]) for i in range(n)]


def _on_device(lib, device, dry_run, call):
    lib.emu_use_device(device)
    lib.emu_set_dry_run(int(dry_run))
    _launches(lib)  # (forget earlier ones)
    try:
        error = ctypes.c_char_p()
        rc = call(ctypes.byref(error))
        assert (rc != 0) == (error.value is not None)
        return (error.value.decode() if rc else None), _launches(lib)
    finally:
        lib.emu_set_dry_run(0)
        lib.emu_use_device(0)


def _dry_attention(lib, dtype, B, Hq, Hkv, Lq, Lk, D, Dv, *, backward, device=0):
    """What attention_fwd / attention_bwd do for these sizes on an emulated device, nothing run:
    (error or None, launches). The inputs are stride-0 views of one element (any length costs nothing)."""
    view = lambda *shape: torch.zeros(1, 1, 1, 1, dtype=dtype).expand(*shape)
    common = _common_args(view(B, Hq, Lq, D), view(B, Hkv, Lk, D), view(B, Hkv, Lk, Dv), None, NO_BAND, 0.125, 0.0,
                          0, 0)
    o_strides = _i64(torch.empty(B, Hq, Lq, Dv, device="meta").stride())
    null, dtype_id = ctypes.c_void_p(0), ctypes.c_int(_EMU_DTYPE[dtype])
    if backward:
        call = lambda err: lib.emu_attention_bwd_host(dtype_id, *common, null, o_strides, null, null, o_strides, null,
                                                      null, null, null, null, null, err)
    else:
        call = lambda err: lib.emu_attention_fwd_host(dtype_id, *common, null, o_strides, null, err)
    return _on_device(lib, device, True, call)


def _check_seq_grid(grid, length, rows, pairs, limits):
    """A grid of the attention kernels (seq_grid): the sequence blocks along x, the (batch, head) pairs
    along y and z, all within the device's limits, no z slice wholly spare."""
    gx, gy, gz = grid
    assert gx == -(-length // rows), (grid, length, rows)
    assert gy * gz >= pairs > gy * (gz - 1), (grid, pairs)
    assert all(0 < g <= lim for g, lim in zip(grid, limits)), (grid, limits)


def _rows(dtype, D, device, backward):
    """(rows of a dK/dV block, rows of a query block) the launcher picks: 64 for the register-resident
    kernels (16-bit, sm_80+, head dims <= 128 in the backward), else the tiles of the Python mirror of
    the plans (held to the C++ above)."""
    from fused_attn.backends import cuda as C
    cc, optin, _ = EMU_DEVICES[device]
    if dtype != torch.float32 and cc >= 8 and (D <= 128 or not backward):
        return 64, 64
    _, (bm, bn) = C.attention_plan(dtype, D, D, optin, backward)
    return bn, bm


# The lengths the kernels refused when the sequence blocks were on the grid's y (at most 65535
# blocks: "attention: sequence too long for the grid"): one block more than that, for the tiles the
# launcher takes. (id: dtype, backward, head dim, device)
LONG_SEQUENCES = {
    "fp16_forward_registers_4.2M": (torch.float16, False, 64, 0),
    "bf16_backward_registers_4.2M": (torch.bfloat16, True, 64, 0),
    "fp16_backward_d256_shared_tiles_2.1M": (torch.float16, True, 256, 0),
    "fp32_forward_d256_2.1M": (torch.float32, False, 256, 0),
    "fp32_backward_d128": (torch.float32, True, 128, 0),
    "fp32_forward_d256_sm86_small_tiles_1.05M": (torch.float32, False, 256, 1),
    "bf16_forward_d256_sm86_shared_tiles": (torch.bfloat16, False, 256, 1),
}


@pytest.mark.parametrize("name", list(LONG_SEQUENCES))
def test_launchers_take_sequences_beyond_65535_blocks(host, name):
    dtype, backward, D, device = LONG_SEQUENCES[name]
    rows_k, rows_q = _rows(dtype, D, device, backward)
    B, Hq, Hkv = 1, 2, 1
    Lq = 65536 * rows_q + 1
    Lk = 65536 * rows_k + 1 if backward else 77
    error, launches = _dry_attention(host, dtype, B, Hq, Hkv, Lq, Lk, D, D, backward=backward, device=device)
    assert error is None, error
    limits = EMU_DEVICES[device][2]
    if not backward:
        assert len(launches) == 1
        _check_seq_grid(launches[0][2], Lq, rows_q, B * Hq, limits)
        return
    delta, dkdv, dq = launches
    assert delta[2] == (-(-B * Hq * Lq // 8), 1, 1) and delta[4] == 0
    _check_seq_grid(dkdv[2], Lk, rows_k, B * Hkv, limits)
    _check_seq_grid(dq[2], Lq, rows_q, B * Hq, limits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_launchers_spread_many_heads_over_y_and_z(host, dtype, backward):
    """More (batch, head) pairs than the grid's y takes (65535) go on to z."""
    B, Hq, Hkv, L, D = 3, 30001, 30001, 100, 64
    error, launches = _dry_attention(host, dtype, B, Hq, Hkv, L, L, D, D, backward=backward)
    assert error is None, error
    rows_k, rows_q = _rows(dtype, D, 0, backward)
    limits = EMU_DEVICES[0][2]
    _check_seq_grid(launches[-1][2], L, rows_q, B * Hq, limits)
    assert launches[-1][2][2] == 2  # 90003 pairs: two z slices of 45002 (one spare block)
    if backward:
        _check_seq_grid(launches[1][2], L, rows_k, B * Hkv, limits)


def _host_attention(lib, dtype, q, k, v, dout, band, device):
    """out, lse, dq, dk, dv through the launchers (attention_fwd, attention_bwd) on an emulated device."""
    scale = 1.0 / math.sqrt(q.shape[3])
    common = _common_args(q, k, v, None, band, scale, 0.0, 0, 0)
    out = new_attention_out(q, v.shape[3])
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    dtype_id = ctypes.c_int(_EMU_DTYPE[dtype])
    error, fwd = _on_device(lib, device, False, lambda err: lib.emu_attention_fwd_host(
        dtype_id, *common, _ptr(out), _i64(out.stride()), _ptr(lse), err))
    assert error is None, error
    dq, dk, dv = torch.empty(q.shape, dtype=dtype), torch.zeros(k.shape, dtype=dtype), torch.zeros(v.shape, dtype=dtype)
    delta = torch.empty(q.shape[:3], dtype=torch.float32)
    error, bwd = _on_device(lib, device, False, lambda err: lib.emu_attention_bwd_host(
        dtype_id, *common, _ptr(out), _i64(out.stride()), _ptr(lse), _ptr(dout), _i64(dout.stride()), _ptr(dq),
        _ptr(dk), _ptr(dv), ctypes.c_void_p(0), _ptr(delta), ctypes.c_void_p(0), err))
    assert error is None, error
    return (out, lse, dq, dk, dv), fwd + bwd


# dtype: (device, Lq, grids of the forward, delta, dK/dV and dQ kernels)
_GRID_RUNS = {torch.float32: (4, 20, [(2, 2, 2), (8, 1, 1), (1, 2, 2), (2, 2, 2)]),  # 16 x 16 tiles
              torch.float16: (3, 70, [(2, 2, 2), (27, 1, 1), (1, 2, 2), (2, 2, 2)])}  # 64-row blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32_shared_tiles", "fp16_registers"])
def test_launchers_grid_mapping_runs_with_spare_blocks(host, dtype):
    """The launchers' grids run for real on a device whose grid takes 32 x 2 x 2 blocks: the sequence
    blocks on x (two of them), the 3 (batch, head) pairs on y = 2 by z = 2 (a spare block in each
    column); against the reference."""
    device, Lq, grids = _GRID_RUNS[dtype]
    B, Hq, Hkv, Lk, D = 3, 1, 1, 12, 32
    q, k, v, _, randn = attention_inputs("grid_mapping", dtype, B, Hq, Hkv, Lq, Lk, D, D, {})
    dout = randn(B, Hq, Lq, D)
    got, launches = _host_attention(host, dtype, q, k, v, dout, CAUSAL_BAND, device=device)
    assert [launch[2] for launch in launches] == grids  # forward; delta, dK/dV, dQ
    ref64 = reference_attention(q, k, v, None, CAUSAL_BAND, 1.0 / math.sqrt(D), 0.0, 0, 0, dout, torch.float64)
    ref_lp = reference_attention(q, k, v, None, CAUSAL_BAND, 1.0 / math.sqrt(D), 0.0, 0, 0, dout, dtype)
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        compare(name, got[i], ref64[i], ref_lp[i], k=2.0 if i < 2 else 5.0)


def test_launchers_name_the_grid_limit_they_meet(host):
    """Beyond the grid (here 32 x 2 x 2 blocks), the launcher says which length (or batch * heads, or
    the delta kernel's rows) and which limit, and the backward launches neither dK/dV nor dQ when
    either grid does not fit."""
    error, launches = _dry_attention(host, torch.float32, 1, 1, 1, 2049, 40, 32, 32, backward=False, device=3)
    assert error == "attention: len_q = 2049 needs 33 blocks of 64 rows, more than the 32 the grid takes"
    assert launches == []
    error, launches = _dry_attention(host, torch.float32, 5, 1, 1, 70, 40, 32, 32, backward=False, device=3)
    assert error == "attention: batch * heads = 5 is more than the grid's 2 x 2 blocks"
    error, launches = _dry_attention(host, torch.float16, 1, 1, 1, 70, 2049, 32, 32, backward=True, device=3)
    assert error == "attention: len_k = 2049 needs 33 blocks of 64 rows, more than the 32 the grid takes"
    assert len(launches) == 1  # the delta kernel only
    error, launches = _dry_attention(host, torch.float16, 1, 4, 1, 70, 70, 32, 32, backward=True, device=3)
    assert error == "attention: batch * heads * len_q = 280 rows need 35 blocks of 8, more than the 32 the grid takes"
    assert launches == []


# (dtype, head dim, backward): calls whose kernels take more and less dynamic shared memory, twice
_SMEM_CALLS = [(torch.float32, 256, False), (torch.float32, 16, False), (torch.float32, 256, False),
               (torch.float32, 128, True), (torch.float32, 16, True), (torch.float16, 256, False),
               (torch.float16, 32, False), (torch.float16, 64, True), (torch.float16, 16, True)]


def _check_ceilings(lib, devices):
    """Each kernel's dynamic shared-memory ceiling was set once per device, to all the device lets a
    block opt in to (the kernels have no static shared memory): never per call, never lowered."""
    seen = {}
    for kernel, device, attribute, value in _attribute_calls(lib):
        assert attribute == 8  # cudaFuncAttributeMaxDynamicSharedMemorySize
        assert (kernel, device) not in seen, f"kernel {kernel:#x} on device {device}: set again to {value}"
        seen[kernel, device] = value
        assert value == EMU_DEVICES[device][1], (device, value)
    assert {device for _, device in seen} >= set(devices)
    return seen


def test_launchers_raise_each_kernels_shared_memory_ceiling_once(host):
    """cudaFuncAttributeMaxDynamicSharedMemorySize is the kernel's on a device, not the call's or the
    thread's: set to each call's size, a call with less lowered it under another thread's launch.
    Every launch here checks its size against the kernel's ceiling, as a GPU does."""
    for device in (0, 1, 2):
        for dtype, D, backward in _SMEM_CALLS:
            error, launches = _dry_attention(host, dtype, 1, 2, 1, 300, 300, D, D, backward=backward, device=device)
            assert error is None, (device, dtype, D, backward, error)
            assert launches and all(launch[1] == device for launch in launches)
    seen = _check_ceilings(host, (0, 1, 2))
    assert len({kernel for kernel, _ in seen}) >= 6  # fp32 fwd/dK-dV/dQ, the fp16 register kernels


def test_layer_norm_launchers_raise_the_ceiling_once(host_nf):
    f = ctypes.c_float
    for device in (0, 1):
        for hidden in (12000, 100, 12000):
            error, launches = _on_device(host_nf, device, True, lambda err: host_nf.emu_layer_norm_fwd_host(
                None, ctypes.c_int64(hidden), None, ctypes.c_int64(hidden), None, None, ctypes.c_int64(4),
                ctypes.c_int64(hidden), f(1e-5), 0, _dropout_args(0.0, 0, 0), None, None, None, None, err))
            assert error is None and len(launches) == 1 and launches[0][4] == (hidden + 32) * 4, (error, launches)
            error, launches = _on_device(host_nf, device, True, lambda err: host_nf.emu_layer_norm_bwd_host(
                None, ctypes.c_int64(hidden), None, None, 1, None, None, ctypes.c_int64(4), ctypes.c_int64(hidden), 0,
                None, None, None, None, err))
            assert error is None and len(launches) == 1 and launches[0][4] == (2 * hidden + 32) * 4, (error, launches)
    _check_ceilings(host_nf, (0, 1))


def test_launchers_from_several_threads(host):
    """Threads launching the same kernels with different shared memory, on one device and on two,
    never fail: no thread lowers a ceiling under another's launch (every launch is checked against
    its kernel's ceiling, as a GPU does). Launchers that set the ceiling to each call's size failed
    here (a launch above the ceiling another thread had just set: invalid argument)."""
    first_error = ctypes.c_char_p()
    failures = host.emu_attention_threads(4, 1000, (ctypes.c_int * 2)(0, 2), ctypes.byref(first_error))
    assert failures == 0, f"{failures} calls failed, the first with {first_error.value}"
    _check_ceilings(host, (0, 2))
