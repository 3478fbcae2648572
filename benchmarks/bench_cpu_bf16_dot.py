#!/usr/bin/env python
# Usage: PYTHONPATH=. python benchmarks/bench_cpu_bf16_dot.py [reps=5]
"""bf16 forward of fused_attn.attention(backend="cpu") with FUSED_ATTN_CPU_BF16_DOT=on / off, and SDPA, in TFLOP/s.
Median of repeated calls under torch.no_grad(), B=2 H=8, 4*B*H*L^2*D FLOPs (half for causal); on/off/sdpa interleaved."""
import os, statistics, sys, time
import torch
import torch.nn.functional as F
import fused_attn
B, H = 2, 8
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5

print(f"threads={torch.get_num_threads()}")
print(f"{'L':>5} {'D':>4} {'causal':>6} | {'on':>6} {'off':>6} {'sdpa':>6} | on/off on/sdpa")
for L in (1024, 2048):
    for D in (64, 128):
        for causal in (False, True):
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, H, L, D, generator=g).bfloat16() for _ in range(3))
            flops = 4 * B * H * L * L * D / (2 if causal else 1)
            def fa(mode):
                def f():
                    os.environ["FUSED_ATTN_CPU_BF16_DOT"] = mode
                    fused_attn.attention(q, k, v, causal=causal, backend="cpu")
                return f
            fns = {"on": fa("on"), "off": fa("off"), "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)}
            times = {n: [] for n in fns}
            with torch.no_grad():
                for f in fns.values(): f()
                for _ in range(reps):
                    for n, f in fns.items():
                        t0 = time.perf_counter(); f(); times[n].append(time.perf_counter() - t0)
            tf = {n: flops / statistics.median(ts) / 1e12 for n, ts in times.items()}
            print(f"{L:>5} {D:>4} {str(causal):>6} | {tf['on']:6.3f} {tf['off']:6.3f} {tf['sdpa']:6.3f} | {tf['on']/tf['off']:5.2f}x {tf['on']/tf['sdpa']:5.2f}x", flush=True)
