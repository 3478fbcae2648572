"""Host time of this session's additions on the CPU backend, medians of 400 calls, three rounds
alternated in one run: the FlashAttention and xformers front-ends against the functional call
they wrap (a transpose, a view), and a decoding step of attention_with_kvcache with and without
cache_leftpad. Run from the repository root: PYTHONPATH=. python docs/results/cpu-2026-11-30g/host_overhead.py"""
import time

import torch

from fused_attn import functional as F
from fused_attn.integrations import flash_attn as FA
from fused_attn.integrations import xformers as X

torch.set_num_threads(2)


def median_us(f, n=400):
    for _ in range(30):
        f()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[n // 2] * 1e6


q, k, v = (torch.randn(1, 64, 4, 32) for _ in range(3))
qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
B, L, H, D = 4, 512, 8, 64
kc, vc = torch.randn(B, L, 2, D), torch.randn(B, L, 2, D)
qd, kn, vn = torch.randn(B, 1, H, D), torch.randn(B, 1, 2, D), torch.randn(B, 1, 2, D)
lengths = torch.tensor([100, 200, 300, 400], dtype=torch.int32)
pads = torch.tensor([5, 0, 7, 1], dtype=torch.int32)
calls = {
    "attention B1 L64 H4 D32 causal (functional)": lambda: F.attention(qh, kh, vh, causal=True,
                                                                       alignment="bottom_right"),
    "  flash_attn_func": lambda: FA.flash_attn_func(q, k, v, causal=True),
    "  xformers memory_efficient_attention": lambda: X.memory_efficient_attention(
        q, k, v, attn_bias=X.LowerTriangularFromBottomRightMask()),
    "decode step B4 Lk<=401 Hq8 Hkv2 D64, write": lambda: F.attention_with_kvcache(
        qd, kc, vc, kn, vn, cache_seqlens=lengths, causal=True),
    "  with cache_leftpad": lambda: F.attention_with_kvcache(qd, kc, vc, kn, vn, cache_seqlens=lengths,
                                                            cache_leftpad=pads, causal=True),
}
results = {name: [] for name in calls}
with torch.no_grad():
    for _ in range(3):
        for name, f in calls.items():
            results[name].append(median_us(f))
for name, values in results.items():
    print(f"{name:46s} " + "  ".join(f"{x:6.1f}" for x in values) + "  us")
