#!/usr/bin/env python
# Usage: PYTHONPATH=. python benchmarks/bench_cpu_module_decode.py [steps=64] [--threads=2]
"""Decoding through the modules on the CPU: a causal rotary Transformer (d 256, 8 heads, 2 KV heads,
4 layers, d_ff 1024, float32, batch 2) prefills a 256-token prompt, then generates ``steps`` tokens
one at a time (each step feeds the last output back). Three ways, median ms per generated token
over the steps: the fused modules with ``kv_cache`` (attention_with_kvcache), the reference modules
with ``kv_cache`` (their own cache writes and attention), and the fused modules without a cache
(the whole sequence again at every step, what a model without one must do)."""
import statistics
import time

from _script_args import parse  # before torch's import: --help answers at once
_args = parse(__doc__, count=("steps", 64), threads=2)
steps, threads = _args.steps, _args.threads
import torch

import fused_attn
from fused_attn import modules as M
from fused_attn import reference as R

torch.set_num_threads(threads)
B, PROMPT, D = 2, 256, 256
kw = dict(d_ff=1024, num_kv_heads=2, causal=True, rotary=True)


def build(cls):
    torch.manual_seed(0)
    return cls(D, 8, 4, **kw).eval()


def generate(model, prompt, cached: bool):
    """Per-step seconds, and the generated rows."""
    times, rows = [], []
    with torch.no_grad():
        if cached:
            caches = model.new_kv_cache(B, PROMPT + steps)
            last = model(prompt, kv_cache=caches)[:, -1:]
        else:
            seq = prompt
            last = model(seq)[:, -1:]
        for _ in range(steps):
            t = time.perf_counter()
            if cached:
                last = model(last, kv_cache=caches)
            else:
                seq = torch.cat([seq, last], 1)
                last = model(seq)[:, -1:]
            times.append(time.perf_counter() - t)
            rows.append(last)
    return times, torch.cat(rows, 1)


prompt = torch.randn(B, PROMPT, D, generator=torch.Generator().manual_seed(1))
fused, ref = build(M.Transformer), build(R.Transformer)
results = {}
for name, model, cached in (("fused, kv_cache", fused, True), ("reference, kv_cache", ref, True),
                            ("fused, no cache", fused, False)):
    generate(model, prompt, cached)  # warm-up
    times, rows = generate(model, prompt, cached)
    results[name] = (statistics.median(times) * 1e3, rows)
base = results["fused, kv_cache"]
print(f"torch {torch.__version__}, {threads} threads; prompt {PROMPT}, {steps} generated tokens, batch {B}")
for name, (ms, rows) in results.items():
    diff = float((rows - base[1]).abs().max())
    print(f"{name:22s} {ms:8.3f} ms/token   x{ms / base[0]:6.2f} the fused cached step   max |diff| {diff:.1e}")
