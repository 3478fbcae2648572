"""The C++ CPU backend's packed varlen attention (fused_attn_C::attention_varlen_fwd / _bwd,
csrc/cpu/attention.cpp) against the per-sequence loop it replaces (``Backend.attention_varlen_fwd``
/ ``_bwd`` of fused_attn/backends/base.py, which runs the dense op on each sequence alone).

Both run the same tiles on the same operands (each sequence is a part of the dense kernels with
its own rows, band, ALiBi row and dropout offset), so on the register-blocked path (float32,
float16, bfloat16 with and without the AVX512-BF16 dot products) the results are bitwise equal,
whichever backward schedule each side picks; the float64 BLAS path, and the gradients of a float32
decoding step (whose backward runs the forward's BLAS products), agree to rounding (MKL's summation
order depends on the operands' leading dimensions, which packing changes). The oracle
comparisons across options are in tests/test_attention_varlen.py.
"""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import _extension
from fused_attn import functional as F
from fused_attn.backends import get_backend
from fused_attn.backends.base import Backend
from fused_attn.backends.cuda import CudaBackend
from fused_attn.ops_common import CAUSAL_BAND, NO_BAND, attention_band
from fused_attn.testing import check_against_reference, cpu_has_avx512bf16, make_inputs

pytestmark = pytest.mark.skipif(
    fused_attn.extension_error() is not None or not _extension.has_kernel("attention_varlen_fwd", "CPU"),
    reason=f"fused_attn._C with the CPU varlen attention kernel is not built: {fused_attn.extension_error()}")


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


# (name, q lengths, k lengths (None: the same), seqused_k, Hq, Hkv, D, Dv, band, bottom_right, dropout_p,
#  softcap, alibi, dlse)
CASES = [
    ("64 equal sequences", [64] * 16, None, None, 8, 8, 64, 64, NO_BAND, False, 0.0, 0.0, False, False),
    ("GQA causal window, dropout, ALiBi, empty sequence, Dv != D, dlse", [17, 0, 97, 1, 130], None, None, 4, 2, 40,
     24, (-16, 0), False, 0.2, 0.0, True, True),
    ("cross bottom-right causal, seqused_k, softcap, one kv head", [3, 17, 40, 1, 6], [10, 5, 97, 1, 0],
     [7, 0, 90, 1, 0], 8, 1, 32, 32, CAUSAL_BAND, True, 0.1, 2.0, True, False),
    ("two-sided window, bottom-right, dropout, seqused_k", [5, 30, 2, 0], [12, 20, 2, 4], [12, 11, 0, 4], 8, 2, 64,
     64, (-3, 2), True, 0.25, 0.0, True, True),
]


def _inputs(case, dtype, seed=0):
    _, lens_q, lens_k, used, Hq, Hkv, D, Dv, band, bottom_right, p, softcap, alibi, dlse = case
    lens_k = lens_q if lens_k is None else lens_k
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), Hq, D, generator=g).to(dtype)
    k = torch.randn(sum(lens_k), Hkv, D, generator=g).to(dtype)
    v = torch.randn(sum(lens_k), Hkv, Dv, generator=g).to(dtype)
    seqused = None if used is None else torch.tensor(used, dtype=torch.int32)
    slopes = torch.rand(len(lens_q), Hq, generator=g) if alibi else None
    fwd_args = (q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k), *band, bottom_right, p, D ** -0.5,
                1234, 56, softcap, seqused, slopes)
    return fwd_args, g, dlse


def _both(fwd_args, g, with_dlse):
    """(native, loop) results: [out, lse, dq, dk, dv] each, from the same inputs."""
    cpu = get_backend("cpu")
    inputs = [t.clone() if isinstance(t, torch.Tensor) else t for t in fwd_args]
    native_out, native_lse = cpu.attention_varlen_fwd(*fwd_args)
    loop_out, loop_lse = Backend.attention_varlen_fwd(cpu, *fwd_args)
    q, k, v, cu_q, cu_k, max_q, max_k, lo, hi, bottom_right, p, scale, seed, offset, softcap, seqused, slopes = fwd_args
    dout = torch.randn(loop_out.shape, generator=g).to(q.dtype)
    dlse = torch.randn(loop_lse.shape, generator=g, dtype=loop_lse.dtype) if with_dlse else None
    bwd = (q, k, v, None, None, cu_q, cu_k, max_q, max_k, lo, hi, bottom_right, p, scale, seed, offset, softcap,
           seqused, slopes, dlse)

    def grads(fn, out, lse):
        return list(fn(dout, *bwd[:3], out, lse, *bwd[5:]))
    native = [native_out, native_lse] + grads(cpu.attention_varlen_bwd, native_out, native_lse)
    loop = [loop_out, loop_lse] + grads(lambda *a: Backend.attention_varlen_bwd(cpu, *a), loop_out, loop_lse)
    for before, after in zip(inputs, fwd_args):  # nothing the caller passed is written
        if isinstance(before, torch.Tensor):
            assert torch.equal(before, after)
    return native, loop


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype,bf16_dot", [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "off"),
                                            (torch.float16, "auto")],
                         ids=["float32", "bfloat16", "bfloat16 without bf16 dot", "float16"])
def test_native_varlen_is_bitwise_the_loop(monkeypatch, threads, case, dtype, bf16_dot):
    # The products pinned to the register-blocked kernels: in the automatic mode a dense call with
    # few query rows that sees every key (a decoding step) takes BLAS instead, which the packed op,
    # running all sequences on one path, does not follow sequence by sequence.
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", "tiles")
    monkeypatch.setenv("FUSED_ATTN_CPU_BF16_DOT", bf16_dot)
    fwd_args, g, with_dlse = _inputs(case, dtype)
    native, loop = _both(fwd_args, g, with_dlse)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], native, loop):
        assert a.shape == b.shape and a.dtype == b.dtype and a.is_contiguous(), name
        assert torch.equal(a, b), f"{name}: max |diff| {(a.double() - b.double()).abs().max().item()}"


# Decoding (every sequence has few query rows per kv head: a KV-cache step) in the automatic mode:
# as the dense op does, no per-call layout of the used cache. float32 runs BLAS where every
# sequence's queries see all of its keys, bitwise FUSED_ATTN_CPU_GEMM=blas, in the forward and the
# backward (the gradients agree with the loop's to rounding: BLAS on other leading dimensions), and
# keeps the panels when a band (a sliding window) hides some; bfloat16 on the AVX512-BF16 dot products reads k and v
# as rows whatever the band, bitwise the dense op on each sequence alone (which does the same),
# and not the pair panels' result. Held to the oracle in tests/test_attention_varlen.py and
# tests/test_kvcache.py. (name, q lengths, k lengths, seqused_k, Hq, Hkv, D, Dv, band, bottom_right,
# dropout_p, softcap, alibi, dlse)
DECODE_CASES = [
    ("one query each, seqused_k, GQA", [1, 1, 1, 1], [300] * 4, [290, 0, 300, 1], 8, 2, 64, 64, CAUSAL_BAND, True,
     0.0, 0.0, False, False),
    ("two queries, odd D, ALiBi, softcap, dropout", [2, 2, 1], [97, 40, 17], [97, 33, 2], 4, 4, 59, 40, NO_BAND,
     True, 0.2, 2.0, True, False),
    ("sliding window", [1, 2, 1], [300] * 3, [280, 5, 300], 4, 2, 40, 40, (-16, 0), True, 0.0, 0.0, False, False),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_varlen_decoding_path(monkeypatch, case, dtype):
    monkeypatch.delenv("FUSED_ATTN_CPU_BF16_DOT", raising=False)
    fwd_args, g, with_dlse = _inputs(case, dtype)
    cpu = get_backend("cpu")

    def forward(mode):
        if mode is None:
            monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
        else:
            monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
        return cpu.attention_varlen_fwd(*fwd_args)
    auto, tiles = forward(None), forward("tiles")
    banded = case[8] != CAUSAL_BAND and case[8] != NO_BAND
    if dtype == torch.float32:
        expected = tiles if banded else forward("blas")
        assert all(torch.equal(a, b) for a, b in zip(auto, expected))
        assert banded or not torch.equal(auto[0], tiles[0]), "the automatic mode laid out the panels"
    elif cpu_has_avx512bf16():
        assert not torch.equal(auto[0], tiles[0]), "the automatic mode laid out the pair panels"
    monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
    native, loop = _both(fwd_args, g, with_dlse)  # (every dense call of the loop decodes too)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], native, loop):
        if dtype == torch.float32 and not banded and name.startswith("d"):
            # the backward runs the forward's BLAS products too, whose rounding depends on the
            # operands' leading dimensions (FUSED_ATTN_CPU_GEMM=blas differs the same way)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(a, b), f"{name}: max |diff| {(a.double() - b.double()).abs().max().item()}"


# What docs/api.md promises of attention_varlen on the cpu backend: each sequence's rows are bitwise
# what `attention` gives on it alone under FUSED_ATTN_CPU_GEMM=tiles, and equal to rounding in the
# automatic mode, where the packed op runs every sequence on the batch's path while a sequence
# alone may take a decoding one: float32 BLAS for the one-query sequence packed after a 64-query
# one (the reviewer's case: 6e-8 apart), float16 BLAS for 16 query rows per kv head, bfloat16 K and V read as rows on
# AVX512-BF16 for 9 (the packed op's longest sequence, 33, takes the pair panels). (dtype, q and k
# lengths, Hq, Hkv, D, tolerance)
ALONE_CASES = [(torch.float32, [64, 1], [64, 64], 1, 1, 16, 1e-6), (torch.float16, [16, 16], [16, 16], 2, 2, 8, 2e-3),
               (torch.bfloat16, [9, 33], [9, 33], 2, 2, 24, 2e-2)]


@pytest.mark.parametrize("dtype,lens_q,lens_k,Hq,Hkv,D,tol", ALONE_CASES, ids=[str(c[0]) for c in ALONE_CASES])
def test_varlen_is_each_sequence_alone_bitwise_on_tiles_to_rounding_in_auto(monkeypatch, dtype, lens_q, lens_k, Hq,
                                                                            Hkv, D, tol):
    monkeypatch.delenv("FUSED_ATTN_CPU_BF16_DOT", raising=False)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), Hq, D, generator=g).to(dtype)
    k, v = (torch.randn(sum(lens_k), Hkv, D, generator=g).to(dtype) for _ in range(2))
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    bounds = list(zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()))

    def run(mode):
        """The packed rows of each sequence, and what `attention` gives on it alone."""
        monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
        out = F.attention_varlen(q, k, v, cu_q, cu_k, backend="cpu")
        dense = [(q[qa:qb], k[ka:kb], v[ka:kb]) for qa, qb, ka, kb in bounds]
        alone = [F.attention(*(t.transpose(0, 1)[None] for t in qkv), backend="cpu")[0].transpose(0, 1)
                 for qkv in dense]
        return out, [out[qa:qb] for qa, qb, _, _ in bounds], alone

    out, packed, alone = run("tiles")
    for s, (a, b) in enumerate(zip(packed, alone)):
        assert torch.equal(a, b), f"sequence {s}: max |diff| {(a.double() - b.double()).abs().max().item()}"
    out_auto, packed, alone = run("auto")
    assert torch.equal(out_auto, out), "the packed op left the register-blocked products"
    for s, (a, b) in enumerate(zip(packed, alone)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"sequence {s}")


# float32 decoding against the oracle in the automatic mode, gradients included: the backward runs
# the products the forward ran (BLAS where every sequence's queries see all of its keys), so it
# recomputes P = exp(s - lse) from scores summed in the order of the forward's lse. (It used to run
# the register-blocked ones against the BLAS forward's lse: sharp softmax rows of P no longer summed
# to 1, and the gradients were ~1e-5 off, several times the oracle's bound; the dense op's twin is
# in tests/test_cpu_attention.py.) scale=1.0, as T5 uses: sharp rows. (q lengths, k lengths, Hq,
# Hkv, D, Dv, seed)
F32_DECODE_GRAD_CASES = [([1, 1], [97, 300], 4, 2, 256, 8, 0), ([2, 1, 2], [300, 97, 40], 4, 1, 64, 8, 14),
                         ([1, 2], [97, 300], 8, 2, 64, 64, 4)]


@pytest.mark.parametrize("lens_q,lens_k,Hq,Hkv,D,Dv,seed", F32_DECODE_GRAD_CASES,
                         ids=[f"q{c[0]}-k{c[1]}-Hq{c[2]}-Hkv{c[3]}-d{c[4]}-dv{c[5]}" for c in F32_DECODE_GRAD_CASES])
def test_native_varlen_float32_decoding_gradients_meet_the_oracle(monkeypatch, lens_q, lens_k, Hq, Hkv, D, Dv, seed):
    monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
    q, k, v = make_inputs((sum(lens_q), Hq, D), (sum(lens_k), Hkv, D), (sum(lens_k), Hkv, Dv), seed=seed)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)

    def op(backend, **options):
        return lambda q, k, v: fused_attn.attention_varlen(q, k, v, cu_q, cu_k, scale=1.0, backend=backend,
                                                           **options)
    check_against_reference(op("cpu"), op("reference"), [q, k, v], names="qkv")

    def grads(mode, **options):
        if mode is None:
            monkeypatch.delenv("FUSED_ATTN_CPU_GEMM", raising=False)
        else:
            monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", mode)
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        op("cpu", **options)(*leaves).backward(torch.ones(sum(lens_q), Hq, Dv))
        return [t.grad for t in leaves]
    # the path taken: the forward's, bit for bit (BLAS; the register-blocked products with a band)
    assert all(torch.equal(a, b) for a, b in zip(grads(None), grads("blas")))
    window = dict(causal=True, alignment="bottom_right", window_size=(20, 0))
    assert all(torch.equal(a, b) for a, b in zip(grads(None, **window), grads("tiles", **window)))


@pytest.mark.parametrize("case", CASES[1:], ids=[c[0] for c in CASES[1:]])
def test_native_varlen_float64_meets_the_loop(case):
    fwd_args, g, with_dlse = _inputs(case, torch.float64)
    native, loop = _both(fwd_args, g, with_dlse)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], native, loop):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_native_varlen_empty_sequences_and_unused_keys():
    """Sequences without queries or keys, and keys past seqused_k (NaN there: never read), give
    zero rows, lse = +inf and zero gradients."""
    lens_q, lens_k, used = [0, 4, 3, 5], [3, 0, 6, 8], [3, 0, 2, 8]
    q = torch.randn(sum(lens_q), 2, 16)
    k, v = torch.randn(sum(lens_k), 1, 16), torch.randn(sum(lens_k), 1, 16)
    k[3 + 2:3 + 6] = v[3 + 2:3 + 6] = float("nan")
    ops = torch.ops.fused_attn_C
    args = (q, k, v, _cu(lens_q), _cu(lens_k), 5, 8, *CAUSAL_BAND, False, 0.0, 0.25, 0, 0, 0.0,
            torch.tensor(used), None)
    out, lse = ops.attention_varlen_fwd(*args)
    assert torch.equal(out[:4], torch.zeros_like(out[:4])) and bool((lse[:, :4] == float("inf")).all())
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse[:, 4:]).all())
    dq, dk, dv = ops.attention_varlen_bwd(torch.ones_like(out), q, k, v, out, lse, *args[3:], None)
    assert torch.equal(dq[:4], torch.zeros_like(dq[:4]))
    assert torch.equal(dk[3 + 2:3 + 6], torch.zeros_like(dk[3 + 2:3 + 6]))
    assert torch.equal(dv[3 + 2:3 + 6], torch.zeros_like(dv[3 + 2:3 + 6]))
    assert all(bool(torch.isfinite(t).all()) for t in (dq, dk, dv))


def test_cpu_backend_takes_the_native_kernel_and_falls_back(monkeypatch):
    """functional.attention_varlen(backend="cpu") runs the packed ops (the loop is not called);
    with an extension built before them it runs the loop; the cuda backend, which shares
    CompiledBackend, has no varlen kernel and keeps the loop."""
    calls = []
    loop_fwd, loop_bwd = Backend.attention_varlen_fwd, Backend.attention_varlen_bwd
    monkeypatch.setattr(Backend, "attention_varlen_fwd", lambda self, *a: calls.append("fwd") or loop_fwd(self, *a))
    monkeypatch.setattr(Backend, "attention_varlen_bwd", lambda self, *a: calls.append("bwd") or loop_bwd(self, *a))
    lens = [5, 0, 12]
    q, k, v = (torch.randn(sum(lens), 2, 8, requires_grad=True) for _ in range(3))
    cu = _cu(lens)

    def run():
        out = F.attention_varlen(q, k, v, cu, cu, causal=True, backend="cpu")
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        return [out.detach(), *grads]
    native = run()
    assert calls == []
    monkeypatch.setattr(_extension, "has_kernel",
                        lambda op, key: False if op.startswith("attention_varlen") else True)
    loop = run()
    assert calls == ["fwd", "bwd"]
    for a, b in zip(native, loop):
        assert torch.equal(a, b)
    assert CudaBackend.attention_varlen_fwd is Backend.attention_varlen_fwd
    assert CudaBackend.attention_varlen_bwd is Backend.attention_varlen_bwd
    assert attention_band(5, 5, causal=True) == CAUSAL_BAND


@pytest.mark.parametrize("Hq,D,Dv", [(2, 0, 4), (2, 4, 0), (2, 0, 0), (0, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_varlen_empty_dims_are_the_loop(Hq, D, Dv, dtype):
    """Zero heads or head dims (functional answers those before any backend; the op must still be
    the loop: with D = 0 every visible key weighs the same, with Dv = 0 the lse remains)."""
    cpu = get_backend("cpu")
    cu = _cu([3, 2])
    q, k, v = torch.randn(5, Hq, D).to(dtype), torch.randn(5, 1, D).to(dtype), torch.randn(5, 1, Dv).to(dtype)
    fwd = (q, k, v, cu, cu, 3, 3, *CAUSAL_BAND, True, 0.1, 1.0, 0, 0)
    native, loop = cpu.attention_varlen_fwd(*fwd), Backend.attention_varlen_fwd(cpu, *fwd)
    dout = torch.randn(native[0].shape).to(dtype)
    bwd = (dout, q, k, v, *loop, cu, cu, 3, 3, *CAUSAL_BAND, True, 0.1, 1.0, 0, 0)
    for a, b in zip([*native, *cpu.attention_varlen_bwd(*bwd)], [*loop, *Backend.attention_varlen_bwd(cpu, *bwd)]):
        assert torch.equal(a, b)
