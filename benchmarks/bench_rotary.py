#!/usr/bin/env python
# Usage: PYTHONPATH=. python benchmarks/bench_rotary.py [--out FILE.json] [--budget SECONDS]
"""Rotary embedding (``fused_attn.apply_rotary_emb``) against the Hugging Face formula
(``x * cos + rotate_half(x) * sin`` on per-token tables, eager torch) and, on a GPU, the same
formula under ``torch.compile``; forward, and forward + backward, on this machine's device
(CUDA if there is one, else the CPU). Timed as ``python -m fused_attn.bench`` times (its
``time_calls``): warm-up, then the median of many calls, each between two CUDA events with the
calls queued behind a GPU sleep (device time alone; the host's time per call beside it),
perf_counter on the CPU; the inputs rotate through enough sets to exceed twice the last-level
cache (at most 8). The forward + backward is ``torch.autograd.grad`` of the output (nothing
accumulates into a .grad). Memory-bound: the floor is one read and one write of x (and of the
gradient), so the table gives GB/s of x moved, to compare with the device's copy bandwidth (about 4.3 TB/s read +
written on the H200)."""
import argparse
import json
import math
import os
import statistics

import torch

import fused_attn
from fused_attn import bench


def hf_rotary(x, cos, sin, positions):
    """transformers' apply_rotary_pos_emb on x (B, L, H, D): tables gathered per token, duplicated."""
    c = torch.cat((cos, cos), -1)[positions].unsqueeze(2).to(x.dtype)  # (B, L, 1, D)
    s = torch.cat((sin, sin), -1)[positions].unsqueeze(2).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * c + rotated * s


def measure(call, n_sets, device, budget_s):
    """(median ms, median host ms, prefilled) of ``call(i)``, i cycling through the input sets:
    fused_attn.bench's timing (warm-up, then on CUDA every call between two events, the calls
    queued behind a GPU sleep so that the events see the device's time alone; perf_counter on
    the CPU)."""
    t = bench.time_calls(call, n_sets, device, budget_s, min_reps=10, max_reps=1000)
    return statistics.median(t.times) * 1e3, statistics.median(t.host) * 1e3, t.prefilled


def input_sets(make, device):
    """Input sets (x and its output gradient) enough to exceed twice the last-level cache together
    (60 MB of L2 on the H200), at most 8, as fused_attn.bench.make_sets does: the timed calls then
    read x from memory, not from a warm cache. (The decode row's 8 sets of 0.5 MB still fit the
    L2, as a decoding step's q would.)"""
    first = make(0)
    set_bytes = max(1, sum(t.numel() * t.element_size() for t in first))
    n_sets = max(1, min(8, math.ceil(2 * bench.cache_bytes(device) / set_bytes)))
    return [first] + [make(i) for i in range(1, n_sets)]


def write_atomically(path, payload):
    """A reader (gpu_check.sh's summary, after every step) never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per measurement (default 0.05 on CUDA, 0.1 on the CPU)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    budget = args.budget if args.budget is not None else (0.05 if gpu else 0.1)
    # (B, L, H, D): training-size q, a decoding step's q
    cases = [(8, 4096, 32, 128), (64, 1, 32, 128), (2, 4096, 8, 64)] if gpu else [(2, 1024, 8, 64), (16, 1, 32, 128)]
    rows = []
    for B, L, H, D in cases:
        S = L + 64
        angles = torch.outer(torch.arange(S, device=device, dtype=torch.float32),
                             10000.0 ** -(torch.arange(D // 2, device=device) / (D // 2)))
        cos, sin = angles.cos(), angles.sin()
        offset = S - L
        positions = (torch.arange(L, device=device) + offset).expand(B, L)
        gen = torch.Generator(device=device)

        def make(i):
            gen.manual_seed(i)
            x = torch.randn(B, L, H, D, device=device, dtype=dtype, generator=gen)
            return [x.requires_grad_(), torch.randn(B, L, H, D, device=device, dtype=dtype, generator=gen)]

        sets = input_sets(make, device)
        x = sets[0][0]
        with torch.no_grad():
            ref = hf_rotary(x.float(), cos, sin, positions)
            ours_out = fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=offset)
        err = float((ours_out.float() - ref).abs().max())
        moved = 2 * x.numel() * x.element_size()  # x read, out written
        impls = {"fused_attn": lambda t: fused_attn.apply_rotary_emb(t, cos, sin, seqlen_offsets=offset),
                 "eager": lambda t: hf_rotary(t, cos, sin, positions)}
        if gpu:
            impls["compiled"] = torch.compile(lambda t: hf_rotary(t, cos, sin, positions))
        for name, fn in impls.items():
            def forward(i, fn=fn):
                with torch.no_grad():
                    return fn(sets[i][0])

            def forward_backward(i, fn=fn):
                xi, gi = sets[i]
                return torch.autograd.grad(fn(xi), xi, gi)

            fwd, fwd_host, fwd_pre = measure(forward, len(sets), device, budget)
            both, both_host, both_pre = measure(forward_backward, len(sets), device, budget)
            rows.append(dict(case=f"B{B} L{L} H{H} D{D}", impl=name, fwd_ms=fwd, fwd_bwd_ms=both,
                             fwd_host_ms=fwd_host, fwd_bwd_host_ms=both_host, prefilled=fwd_pre and both_pre,
                             fwd_GBps=moved / fwd / 1e6, fwd_bwd_GBps=2 * moved / both / 1e6, max_err_vs_fp32=err,
                             input_sets=len(sets)))
        base = {r["impl"]: r for r in rows if r["case"] == rows[-1]["case"]}
        for r in base.values():
            r["fwd_speedup_vs_eager"] = base["eager"]["fwd_ms"] / r["fwd_ms"]
            r["fwd_bwd_speedup_vs_eager"] = base["eager"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        del sets, x, ref, ours_out
        if args.out:  # after every case: a run cut short by a time limit keeps what it measured
            write_atomically(args.out, {"device": str(device), "dtype": str(dtype), "budget_s": budget, "rows": rows})
    print(f"device: {torch.cuda.get_device_name(0) if gpu else 'cpu'}, dtype {dtype}, torch {torch.__version__}")
    print(f"{'case':22s} {'impl':11s} {'fwd ms':>9s} {'GB/s':>7s} {'x eager':>7s} {'f+b ms':>9s} {'GB/s':>7s} "
          f"{'x eager':>7s} {'host ms':>8s}")
    for r in rows:
        print(f"{r['case']:22s} {r['impl']:11s} {r['fwd_ms']:9.4f} {r['fwd_GBps']:7.0f} {r['fwd_speedup_vs_eager']:7.2f} "
              f"{r['fwd_bwd_ms']:9.4f} {r['fwd_bwd_GBps']:7.0f} {r['fwd_bwd_speedup_vs_eager']:7.2f} "
              f"{r['fwd_bwd_host_ms']:8.4f}")


if __name__ == "__main__":
    main()
