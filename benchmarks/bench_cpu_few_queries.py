#!/usr/bin/env python
# Usage: PYTHONPATH=. python benchmarks/bench_cpu_few_queries.py [reps=15] [--causal]
"""Few queries per head against long keys (decoding chunks, cross-attention to a long context), float32, on the cpu
backend: the register-blocked products (FUSED_ATTN_CPU_GEMM=tiles, which lay K and V out as panels on every call)
against BLAS on the tiles (=blas) and torch's SDPA, median ms under torch.no_grad on 2 threads. What
csrc/cpu/attention.cpp's kMinPanelRows (the automatic mode's crossover, in query rows per kv head) is set from."""
import os
import statistics
import time

from _script_args import parse  # before torch's import: --help answers at once
_args = parse(__doc__, count=("reps", 15), flags=[("--causal", "causal attention (bottom-right)")])
reps, causal = _args.reps, _args.causal
import torch

import fused_attn

torch.set_num_threads(2)
# (B, Hq, Hkv, Lq, Lk, D)
CASES = [(2, 8, 8, 16, 2048, 64), (2, 8, 8, 32, 2048, 64), (2, 8, 8, 64, 2048, 64), (2, 8, 8, 96, 2048, 64),
         (4, 8, 8, 16, 4096, 64), (4, 8, 8, 64, 4096, 64), (2, 8, 8, 48, 1024, 128),
         (4, 8, 2, 8, 4096, 64), (4, 8, 2, 16, 4096, 64), (1, 32, 8, 16, 8192, 128)]


def median_ms(fn):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


print(f"float32, {'causal bottom-right' if causal else 'not causal'}, median of {reps}, torch {torch.__version__}")
print(f"{'B Hq Hkv Lq Lk D':22} {'rows/kv head':>12} {'tiles':>8} {'blas':>8} {'sdpa':>8}  tiles/blas")
for B, Hq, Hkv, Lq, Lk, D in CASES:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    opts = dict(causal=True, alignment="bottom_right") if causal else {}
    ms = {}
    with torch.no_grad():
        for mode in ("tiles", "blas"):
            os.environ["FUSED_ATTN_CPU_GEMM"] = mode
            ms[mode] = median_ms(lambda: fused_attn.attention(q, k, v, backend="cpu", **opts))
        os.environ.pop("FUSED_ATTN_CPU_GEMM")
        ms["sdpa"] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=False, enable_gqa=Hq != Hkv))
    shape = " ".join(str(x) for x in (B, Hq, Hkv, Lq, Lk, D))
    print(f"{shape:22} {Lq * Hq // Hkv:12d} {ms['tiles']:8.2f} {ms['blas']:8.2f} {ms['sdpa']:8.2f}  "
          f"{ms['tiles'] / ms['blas']:.2f}", flush=True)
