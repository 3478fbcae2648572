#!/usr/bin/env python
# Usage: PYTHONPATH=. python benchmarks/bench_cpu_bf16_dot.py [reps=5] [--backward]
"""bf16 fused_attn.attention(backend="cpu") with FUSED_ATTN_CPU_BF16_DOT=on / off, and SDPA, in TFLOP/s.
Default: the forward, median of repeated calls under torch.no_grad(), 4*B*H*L^2*D FLOPs.
--backward: forward + backward (requires_grad inputs, out.backward(g); 3.5x the forward's FLOPs) and the
backward alone (out.backward(g) timed after an untimed forward; 2.5x). B=2 H=8, FLOPs halved for causal;
on/off/sdpa interleaved."""
import os, statistics, time
from _script_args import parse  # before torch's import: --help answers at once
_args = parse(__doc__, count=("reps", 5), flags=[("--backward", "time forward + backward and the backward alone")])
backward, reps = _args.backward, _args.reps
import torch
import torch.nn.functional as F
import fused_attn
B, H = 2, 8


def fa(mode, causal):
    def f(q, k, v):
        os.environ["FUSED_ATTN_CPU_BF16_DOT"] = mode
        return fused_attn.attention(q, k, v, causal=causal, backend="cpu")
    return f


def sdpa(causal):
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


print(f"threads={torch.get_num_threads()} reps={reps} {'forward+backward, backward' if backward else 'forward'}")
if backward:
    print(f"{'L':>5} {'D':>4} {'causal':>6} | fwd+bwd {'on':>6} {'off':>6} {'sdpa':>6} | on/off on/sdpa | "
          f"bwd {'on':>6} {'off':>6} {'sdpa':>6} | on/off on/sdpa")
else:
    print(f"{'L':>5} {'D':>4} {'causal':>6} | {'on':>6} {'off':>6} {'sdpa':>6} | on/off on/sdpa")
for L in (1024, 2048):
    for D in (64, 128):
        for causal in (False, True):
            g = torch.Generator().manual_seed(0)
            q, k, v, dout = (torch.randn(B, H, L, D, generator=g).bfloat16() for _ in range(4))
            flops = 4 * B * H * L * L * D / (2 if causal else 1)
            fns = {"on": fa("on", causal), "off": fa("off", causal), "sdpa": sdpa(causal)}
            if not backward:
                times = {n: [] for n in fns}
                with torch.no_grad():
                    for f in fns.values(): f(q, k, v)
                    for _ in range(reps):
                        for n, f in fns.items():
                            t0 = time.perf_counter(); f(q, k, v); times[n].append(time.perf_counter() - t0)
                tf = {n: flops / statistics.median(ts) / 1e12 for n, ts in times.items()}
                print(f"{L:>5} {D:>4} {str(causal):>6} | {tf['on']:6.3f} {tf['off']:6.3f} {tf['sdpa']:6.3f} | "
                      f"{tf['on']/tf['off']:5.2f}x {tf['on']/tf['sdpa']:5.2f}x", flush=True)
                continue
            qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
            both = {n: [] for n in fns}
            bwd = {n: [] for n in fns}
            for rep in range(reps + 1):  # the first round warms up
                for n, f in fns.items():
                    qg.grad = kg.grad = vg.grad = None
                    t0 = time.perf_counter()
                    out = f(qg, kg, vg)
                    t1 = time.perf_counter()
                    out.backward(dout)
                    t2 = time.perf_counter()
                    if rep:
                        both[n].append(t2 - t0)
                        bwd[n].append(t2 - t1)
            tb = {n: 3.5 * flops / statistics.median(ts) / 1e12 for n, ts in both.items()}
            tw = {n: 2.5 * flops / statistics.median(ts) / 1e12 for n, ts in bwd.items()}
            print(f"{L:>5} {D:>4} {str(causal):>6} | fwd+bwd {tb['on']:6.3f} {tb['off']:6.3f} {tb['sdpa']:6.3f} | "
                  f"{tb['on']/tb['off']:5.2f}x {tb['on']/tb['sdpa']:5.2f}x | "
                  f"bwd {tw['on']:6.3f} {tw['off']:6.3f} {tw['sdpa']:6.3f} | {tw['on']/tw['off']:5.2f}x {tw['on']/tw['sdpa']:5.2f}x",
                  flush=True)
