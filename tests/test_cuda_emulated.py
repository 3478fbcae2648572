"""The CUDA attention kernels (csrc/cuda/attention.cu), float32 path, run on CPU threads.

There is no GPU on the development machines, so tests/cuda_emu provides a small emulation of the
CUDA features the kernels use (threads, __syncthreads, warp shuffles, shared memory) and compiles
attention.cu against it with the host compiler. Every CUDA thread becomes a std::thread; the
float32 instantiation (plain-FMA tile products) runs for real, so the tiling, the online softmax,
masks, causal limits, grouped-query heads, dropout, strides and the three backward kernels are
checked against the float64 reference with the oracle. The float16/bfloat16 WMMA products are not
emulated; they run in tests/test_cuda_backend.py on a GPU.
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

from fused_attn import _rng
from fused_attn import reference as R
from fused_attn.ops_common import new_attention_out
from fused_attn.testing import compare

ROOT = Path(__file__).resolve().parents[1]
EMU_DIR = ROOT / "tests" / "cuda_emu"


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the CPU emulation of the CUDA kernels")
    lib = tmp_path_factory.mktemp("cuda_emu") / "emu_attention.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra", "-Werror",
           "-Wno-unknown-pragmas", "-DFUSED_ATTN_CPU_EMULATION", f"-I{EMU_DIR}", str(EMU_DIR / "emu_attention.cpp"),
           "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the emulated kernels failed:\n{proc.stderr[-6000:]}"
    return ctypes.CDLL(str(lib))


def _i64(values):
    return (ctypes.c_int64 * len(values))(*values)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


def _dropout_args(p, seed, offset):
    scale_bits = struct.unpack("<I", struct.pack("<f", 1.0 / (1.0 - p)))[0] if p > 0 else 0
    return (ctypes.c_uint64 * 5)(int(p > 0), seed, offset, _rng.dropout_threshold(p) if p > 0 else 0, scale_bits)


def _common_args(q, k, v, mask, causal, scale, p, seed, offset):
    B, Hq, Lq, D = q.shape
    sizes = _i64([B, Hq, k.shape[1], Lq, k.shape[2], D, v.shape[3]])
    kind = 0 if mask is None else (1 if mask.dtype == torch.bool else 2)
    return [_ptr(q), _i64(q.stride()), _ptr(k), _i64(k.stride()), _ptr(v), _i64(v.stride()), sizes, ctypes.c_int(kind),
            _ptr(mask), _i64(mask.stride() if mask is not None else (0, 0, 0, 0)), ctypes.c_int(int(causal)),
            ctypes.c_float(scale), _dropout_args(p, seed, offset)]


def emulated_attention(emu, q, k, v, mask, causal, scale, p, seed, offset, dout, blocks):
    """(out, lse, dq, dk, dv, dmask) from the emulated kernels; dmask only for an additive mask."""
    common = _common_args(q, k, v, mask, causal, scale, p, seed, offset)
    out = new_attention_out(q, v.shape[3])
    lse = torch.empty(q.shape[:3], dtype=torch.float32)
    assert emu.emu_attention_fwd(*common, _ptr(out), _i64(out.stride()), _ptr(lse), *blocks) == 0
    dq, dk, dv = torch.empty_like(q, memory_format=torch.contiguous_format), torch.zeros(k.shape), torch.zeros(v.shape)
    additive = mask is not None and mask.dtype != torch.bool
    dmask = torch.zeros(q.shape[:3] + (k.shape[2],)) if additive else None
    delta = torch.empty(q.shape[:3], dtype=torch.float32)
    assert emu.emu_attention_bwd(*common, _ptr(out), _i64(out.stride()), _ptr(lse), _ptr(dout), _i64(dout.stride()),
                                 _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dmask), _ptr(delta), *blocks) == 0
    return out, lse, dq, dk, dv, dmask


def reference_attention(q, k, v, mask, causal, scale, p, seed, offset, dout, dtype):
    """The same quantities from fused_attn.reference in ``dtype`` (autograd for the gradients)."""
    cast = lambda t: None if t is None else (t if t.dtype == torch.bool else t.to(dtype))
    q_, k_, v_, m_ = (cast(t) for t in (q, k, v, mask))
    additive = mask is not None and mask.dtype != torch.bool
    rng = (seed, offset) if p > 0 else None
    if additive:
        fn = lambda q, k, v, m: R.attention(q, k, v, m, causal, p, scale, rng)
        out, vjp = torch.func.vjp(fn, q_, k_, v_, m_)
        dq, dk, dv, dmask = vjp(dout.to(dtype))
    else:
        fn = lambda q, k, v: R.attention(q, k, v, m_, causal, p, scale, rng)
        out, vjp = torch.func.vjp(fn, q_, k_, v_)
        (dq, dk, dv), dmask = vjp(dout.to(dtype)), None
    lse = R.attention_lse(q_, k_, m_, causal, scale)
    return out, lse, dq, dk, dv, dmask


# name: (B, Hq, Hkv, Lq, Lk, D, Dv, options, (BM, BN))  -- the tile pairs the launcher may pick
CASES = {
    "basic_16x16": (1, 2, 2, 37, 29, 40, 24, {}, (16, 16)),
    "causal_gqa_lq_gt_lk_32x32": (2, 4, 2, 33, 20, 16, 16, {"causal": True}, (32, 32)),
    "causal_lq_lt_lk_64x32": (1, 1, 1, 19, 70, 8, 8, {"causal": True}, (64, 32)),
    "bool_mask_dead_row_dropout_32x32": (1, 2, 1, 21, 35, 24, 24, {"mask": "bool", "dropout_p": 0.25}, (32, 32)),
    "additive_mask_grad_causal_64x32": (1, 2, 2, 40, 40, 8, 12, {"mask": "additive", "causal": True}, (64, 32)),
    "strided_and_broadcast_kv_64x64": (2, 2, 2, 17, 70, 32, 32, {"layout": "strided"}, (64, 64)),
    "dropout_mask_grad_16x16": (1, 2, 2, 18, 33, 16, 16, {"mask": "additive", "dropout_p": 0.3}, (16, 16)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_emulated_attention_matches_reference(emu, name):
    B, Hq, Hkv, Lq, Lk, D, Dv, opts, blocks = CASES[name]
    gen = torch.Generator().manual_seed(len(name))
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).float()
    if opts.get("layout") == "strided":  # q as a (B, L, H, D) transpose, k/v shared by the batch (stride 0)
        q = randn(B, Lq, Hq, D).transpose(1, 2)
        k = randn(1, Hkv, Lk, D).expand(B, -1, -1, -1)
        v = randn(1, Hkv, Lk, Dv).expand(B, -1, -1, -1)
    else:
        q, k, v = randn(B, Hq, Lq, D), randn(B, Hkv, Lk, D), randn(B, Hkv, Lk, Dv)
    mask = None
    if opts.get("mask") == "bool":
        mask = torch.rand(B, Hq, Lq, Lk, generator=gen) > 0.3
        mask[:, :, 2, :] = False  # a row with nothing to attend
    elif opts.get("mask") == "additive":  # broadcast over the batch and heads: a stride-0 view
        m = randn(1, 1, Lq, Lk)
        m[..., :3] = float("-inf")
        mask = m.expand(B, Hq, Lq, Lk)
    causal, p = opts.get("causal", False), opts.get("dropout_p", 0.0)
    scale, seed, offset = 1.0 / math.sqrt(D), 123456789012345, 987654321
    dout = randn(B, Hq, Lq, Dv)

    got = emulated_attention(emu, q, k, v, mask, causal, scale, p, seed, offset, dout, blocks)
    ref64 = reference_attention(q, k, v, mask, causal, scale, p, seed, offset, dout, torch.float64)
    ref32 = reference_attention(q, k, v, mask, causal, scale, p, seed, offset, dout, torch.float32)
    names = ("out", "lse", "dq", "dk", "dv", "dmask")
    for i, name in enumerate(names):
        if got[i] is None:
            assert ref64[i] is None
            continue
        compare(name, got[i], ref64[i], ref32[i], k=2.0 if i < 2 else 5.0)
    if opts.get("mask") == "bool":  # the dead row: zeros and lse = +inf
        assert (got[0][:, :, 2] == 0).all() and torch.isinf(got[1][:, :, 2]).all()


def test_emulated_attention_without_keys(emu):
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 0, 8), torch.randn(1, 2, 0, 8)
    dout = torch.randn(1, 2, 5, 8)
    out, lse, dq, dk, dv, _ = emulated_attention(emu, q, k, v, None, False, 0.5, 0.0, 0, 0, dout, (16, 16))
    assert (out == 0).all() and torch.isinf(lse).all() and (lse > 0).all() and (dq == 0).all()
