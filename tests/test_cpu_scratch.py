"""The C++ CPU backend's scratch cache (csrc/cpu/scratch.h): operand buffers of a MiB and more are
kept between calls, up to ``FUSED_ATTN_CPU_SCRATCH_MB``, and ``fused_attn.empty_cpu_cache()``
frees them.

A kept buffer comes back holding the last call's bytes, so every kernel that takes one must
write all of it that it reads (panel padding, the padding column of odd head dims). The
stale-data test fills the cache with NaN-laden buffers from larger calls, then runs calls of odd
sizes through every path that takes buffers (dense forward and both backward schedules, varlen,
float32 panels and bf16 layouts) and holds them bitwise to the same calls with nothing kept.
"""
from __future__ import annotations

import sys
import threading

import pytest
import torch

import fused_attn
from fused_attn import functional as F

pytestmark = pytest.mark.skipif(
    fused_attn.extension_error() is not None
    or not torch._C._dispatch_has_kernel_for_dispatch_key("fused_attn_C::attention_fwd", "CPU"),
    reason=f"fused_attn._C with the CPU attention kernel is not built: {fused_attn.extension_error()}")

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _register_blocked(monkeypatch):
    # the register-blocked products are the ones that lay operands out (BLAS reads them in place)
    monkeypatch.setenv("FUSED_ATTN_CPU_GEMM", "tiles")
    monkeypatch.delenv("FUSED_ATTN_CPU_SCRATCH_MB", raising=False)
    fused_attn.empty_cpu_cache()
    yield
    fused_attn.empty_cpu_cache()


def _dense(B, Hq, Hkv, L, D, dtype, seed, fill=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(B, h, L, D, generator=g).to(dtype) for h in (Hq, Hkv, Hkv, Hq))
    if fill is not None:
        for t in (q, k, v, dout):
            t.view(-1)[::7] = fill
    return q, k, v, dout


def _dense_call(q, k, v, dout, causal):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.attention(q, k, v, causal=causal, backend="cpu")
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _varlen_call(q, k, v, dout, cu):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.attention_varlen(q, k, v, cu, cu, causal=True, backend="cpu")
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def _calls(dtype, fill=None, grow=0):
    """The buffer-taking paths, each on odd sizes (`grow` makes every size larger)."""
    L, D = 1000 + 24 * grow, 59 + 5 * grow
    results = []
    # per-head backward schedule (6 kv heads on 2 threads) and a two-pass one (5 kv heads)
    for Hq, Hkv in ((12, 6), (5, 5)):
        results += _dense_call(*_dense(1, Hq, Hkv, L, D, dtype, seed=Hkv, fill=fill), causal=True)
    # varlen: 3 sequences, one of them odd
    lens = [400 + 10 * grow, 97, 2000 + 48 * grow]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, dout = (t[0].transpose(0, 1).contiguous()
                     for t in _dense(1, 8, 8, int(cu[-1]), D, dtype, seed=3, fill=fill))
    results += _varlen_call(q, k, v, dout, cu)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kept_buffers_never_leak_stale_bytes(dtype, monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_CPU_SCRATCH_MB", "0")
    expected = _calls(dtype)
    assert fused_attn.empty_cpu_cache() == 0  # nothing was kept
    monkeypatch.setenv("FUSED_ATTN_CPU_SCRATCH_MB", "1024")
    _calls(dtype, fill=float("nan"), grow=1)  # leaves NaN in the kept buffers, past the smaller calls' data
    got = _calls(dtype)
    for i, (e, g) in enumerate(zip(expected, got)):
        assert torch.isfinite(g).all(), f"result {i}: non-finite values from a reused buffer"
        assert torch.equal(e, g), f"result {i} differs with buffers reused"
    assert fused_attn.empty_cpu_cache() > 0


def test_cache_keeps_buffers_up_to_the_cap(monkeypatch):
    q, k, v, _ = _dense(2, 8, 8, 1024, 64, torch.float32, seed=0)  # K and V panels: 4 MiB each
    with torch.no_grad():
        F.attention(q, k, v, backend="cpu")
    kept = fused_attn.empty_cpu_cache()
    assert 8 * MiB <= kept <= 256 * MiB  # the default cap
    assert fused_attn.empty_cpu_cache() == 0  # emptied

    monkeypatch.setenv("FUSED_ATTN_CPU_SCRATCH_MB", "5")  # room for one panel buffer, not two
    with torch.no_grad():
        F.attention(q, k, v, backend="cpu")
    assert 4 * MiB <= fused_attn.empty_cpu_cache() <= 5 * MiB

    monkeypatch.setenv("FUSED_ATTN_CPU_SCRATCH_MB", "0")
    with torch.no_grad():
        F.attention(q, k, v, backend="cpu")
    assert fused_attn.empty_cpu_cache() == 0


def test_small_buffers_are_not_kept():
    q, k, v, _ = _dense(1, 2, 2, 64, 32, torch.float32, seed=0)  # panels of 16 KiB
    with torch.no_grad():
        F.attention(q, k, v, backend="cpu")
    assert fused_attn.empty_cpu_cache() == 0


def test_a_repeated_call_takes_its_buffers_back():
    """The second call finds what the first kept: the cache holds no more after two calls than after one."""
    q, k, v, _ = _dense(2, 8, 8, 1024, 64, torch.float32, seed=0)
    with torch.no_grad():
        F.attention(q, k, v, backend="cpu")
        kept_once = fused_attn.empty_cpu_cache()
        for _ in range(2):
            F.attention(q, k, v, backend="cpu")
    assert fused_attn.empty_cpu_cache() == kept_once


@pytest.mark.parametrize("value", ["x", "-1", "1.5", " 8", "8 "])
def test_a_bad_cap_is_a_clear_error(value, monkeypatch):
    monkeypatch.setenv("FUSED_ATTN_CPU_SCRATCH_MB", value)
    q, k, v, _ = _dense(2, 8, 8, 1024, 64, torch.float32, seed=0)
    with pytest.raises(ValueError, match=f"FUSED_ATTN_CPU_SCRATCH_MB must be a whole number of MiB >= 0 .*'{value}'"):
        F.attention(q, k, v, backend="cpu")


def test_concurrent_calls_share_the_cache():
    """Threads calling at once each get their own buffers (results as when run alone)."""
    inputs = [_dense(1, 6, 6, 700 + 50 * i, 48, torch.float32, seed=i) for i in range(4)]
    expected = [_dense_call(*x, causal=bool(i % 2)) for i, x in enumerate(inputs)]
    got = [None] * len(inputs)
    errors = []

    def worker(i):
        try:
            for _ in range(3):
                got[i] = _dense_call(*inputs[i], causal=bool(i % 2))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for e, g in zip(expected, got):
        for a, b in zip(e, g):
            assert torch.equal(a, b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm and sets RLIMIT_AS")
def test_kept_buffers_are_freed_before_an_allocation_fails():
    """Under a memory limit, a call that only fits once the kept buffers are gone frees them and
    runs (rather than failing with memory the library itself holds). A subprocess, as the limit
    (RLIMIT_AS) cannot be lifted again."""
    import subprocess
    import textwrap
    script = textwrap.dedent("""
        import os, resource, torch, fused_attn
        torch.set_num_threads(1)
        os.environ["FUSED_ATTN_CPU_GEMM"] = "tiles"
        MiB = 1 << 20
        q = torch.randn(1, 8, 16, 64)
        small, large = torch.randn(1, 8, 32768, 64), torch.randn(1, 8, 40000, 64)  # K/V panels 64, 78 MiB
        with torch.no_grad():
            fused_attn.attention(q, large, large, backend="cpu")  # every other allocation warmed up once
            fused_attn.empty_cpu_cache()
            fused_attn.attention(q, small, small, backend="cpu")  # keeps 2 x 64 MiB
            vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (vm + 100 * MiB, resource.RLIM_INFINITY))
            out = fused_attn.attention(q, large, large, backend="cpu")  # 2 x 80 MiB: fits once 128 MiB go
        assert torch.isfinite(out).all()
        print("ran")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ran" in result.stdout, result.stderr[-2000:]


def test_outputs_come_back_to_the_cache_and_stay_ordinary_tensors():
    """The ops' large outputs are allocated from the cache (a c10::Allocator): when the caller drops
    them their blocks are kept for the next call; while alive they are ordinary CPU tensors (resizable
    storage, picklable, in-place ops)."""
    import pickle
    x = torch.randn(4096, 512)  # outputs of 8 MiB
    out = F.layer_norm_residual(x, x, backend="cpu")
    fused_attn.empty_cpu_cache()  # out is alive: its block is not in the cache
    reference = torch.nn.functional.layer_norm(x + x, (512,))
    torch.testing.assert_close(pickle.loads(pickle.dumps(out)), reference)
    out.mul_(2)
    out.resize_(8192, 512)  # grows through the allocator
    out[4096:] = 1
    torch.testing.assert_close(out[:4096], 2 * reference)
    del out
    assert fused_attn.empty_cpu_cache() >= 16 * MiB  # the grown block came back


def _norm_step():
    x, residual, weight = (torch.randn(*shape, requires_grad=True) for shape in ((8192, 512), (8192, 512), (512,)))
    dout = torch.randn(8192, 512)
    return lambda: F.layer_norm_residual(x, residual, weight, backend="cpu").backward(dout)


def _feed_forward_step():
    x, w1, b1, w2 = (torch.randn(*shape, requires_grad=True) for shape in ((2048, 256), (2048, 256), (2048,),
                                                                             (256, 2048)))
    dout = torch.randn(2048, 256)
    return lambda: F.feed_forward(x, w1, b1, w2, None, activation="gelu", backend="cpu").backward(dout)


def test_rotary_output_keeps_a_transposed_layout_from_the_cache():
    """The rotary op's output is at::empty_like(x) from the cache: x's strides when x is dense."""
    x = torch.randn(2, 8, 2048, 64).transpose(1, 2)  # (B, L, H, D) view of a (B, H, L, D) tensor, 8 MiB
    angles = torch.outer(torch.arange(2048.0), torch.rand(32))
    out = F.apply_rotary_emb(x, angles.cos(), angles.sin(), backend="cpu")
    assert out.stride() == x.stride()
    fused_attn.empty_cpu_cache()
    del out
    assert fused_attn.empty_cpu_cache() >= 8 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts page faults with getrusage")
@pytest.mark.parametrize("make_step", [_norm_step, _feed_forward_step], ids=["layer_norm", "feed_forward"])
def test_repeated_steps_fault_no_pages_in(make_step):
    """A training step's outputs (8-16 MiB here), allocated every step: kept and taken back, they
    are not faulted in afresh (hundreds to thousands of pages a step with nothing kept: the norm
    1600-2900, the feed-forward 400-800 here). (Attention's ops fault none either, but its step
    also allocates outside them, in autograd, so its count is not the ops' own.)"""
    import resource
    step = make_step()
    for _ in range(3):
        step()
    # The fewest of three windows: glibc's heap under the step's other allocations (autograd's)
    # depends on what ran before in the process, and a full run's worker once trimmed it in one
    # window (819 faults a step); with nothing kept every window faults.
    counts = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            step()
        counts.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    assert min(counts) < 256, f"{counts} page faults per step"


def test_the_profiler_sees_the_buffers_handed_out():
    """torch.profiler's memory events (what the benchmark's peak-memory column reads) count a
    buffer from the cache while it is handed out, as they count the default allocator's: the
    attention forward's K/V panels (4 MiB each) and its output, even when they come back from the
    cache."""
    from fused_attn.bench import CpuMemoryProbe
    q, k, v, _ = _dense(2, 8, 8, 1024, 64, torch.float32, seed=0)
    with torch.no_grad():
        F.attention(q, k, v, backend="cpu")  # fills the cache: the profiled call takes its buffers back
        with CpuMemoryProbe() as probe:
            with probe.region("call"):
                out = F.attention(q, k, v, backend="cpu")
    assert probe.peaks()["call"] >= 8 * MiB + out.numel() * 4
