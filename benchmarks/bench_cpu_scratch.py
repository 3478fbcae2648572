#!/usr/bin/env python
# Usage: PYTHONPATH=. python benchmarks/bench_cpu_scratch.py [reps=15] [--threads=2]
"""The C++ CPU backend's scratch cache (csrc/cpu/scratch.h): the same attention calls with nothing kept
between calls (FUSED_ATTN_CPU_SCRATCH_MB=0, every call faults its operand buffers in afresh) and with the
default cap (256 MiB), interleaved in one run. Median milliseconds after warm-up; the register-blocked
products (FUSED_ATTN_CPU_GEMM=tiles, what the automatic mode takes for these shapes); causal (bottom-right
for Lq < Lk); float32 and bfloat16; forward under torch.no_grad, or forward + backward."""
import os
import statistics
import time

from _script_args import parse  # before torch's import: --help answers at once
_args = parse(__doc__, count=("reps", 15), threads=2)
reps, threads = _args.reps, _args.threads
import torch

import fused_attn

torch.set_num_threads(threads)
os.environ["FUSED_ATTN_CPU_GEMM"] = "tiles"

# (B, Hq, Hkv, Lq, Lk, D, backward)
CASES = [(4, 8, 8, 16, 4096, 64, False), (4, 8, 8, 128, 4096, 64, False), (1, 8, 8, 512, 4096, 64, False),
         (2, 8, 8, 2048, 2048, 64, False), (2, 8, 8, 2048, 2048, 64, True), (8, 12, 12, 512, 512, 64, True)]
CAPS = {"nothing kept": "0", "kept": "256"}


def call_for(B, Hq, Hkv, Lq, Lk, D, backward, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    if not backward:
        def run():
            with torch.no_grad():
                fused_attn.attention(q, k, v, causal=True, alignment="bottom_right", backend="cpu")
        return run
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dout = torch.randn(B, Hq, Lq, D, generator=g).to(dtype)

    def run():
        fused_attn.attention(q, k, v, causal=True, alignment="bottom_right", backend="cpu").backward(dout)
    return run


def timed(run, cap):
    os.environ["FUSED_ATTN_CPU_SCRATCH_MB"] = cap
    fused_attn.empty_cpu_cache()
    run()  # warm-up (and, kept, fills the cache)
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


print(f"threads={threads} reps={reps} torch={torch.__version__}")
print(f"{'dtype':9} {'B Hq Hkv Lq Lk D':24} {'pass':8} " + " ".join(f"{name:>13}" for name in CAPS) + "  speed-up")
for dtype in (torch.float32, torch.bfloat16):
    for case in CASES:
        run = call_for(*case, dtype)
        times = {name: [] for name in CAPS}
        for _ in range(reps):
            for name, cap in CAPS.items():
                times[name].append(timed(run, cap))
        ms = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        shape = " ".join(str(x) for x in case[:6])
        print(f"{str(dtype)[6:]:9} {shape:24} {'fwd+bwd' if case[6] else 'fwd':8} "
              + " ".join(f"{ms[name]:10.2f} ms" for name in CAPS)
              + f"  x{ms['nothing kept'] / ms['kept']:.2f}", flush=True)
fused_attn.empty_cpu_cache()
