#!/usr/bin/env python
# Usage: PYTHONPATH=. python benchmarks/bench_rotary.py [--out FILE.json] [--reps N]
"""Rotary embedding (``fused_attn.apply_rotary_emb``) against the Hugging Face formula
(``x * cos + rotate_half(x) * sin`` on per-token tables, eager torch) and, on a GPU, the same
formula under ``torch.compile``; forward, and forward + backward, on this machine's device
(CUDA if there is one, else the CPU). Median of event-timed calls after warm-up (perf_counter on
the CPU). Memory-bound: the floor is one read and one write of x (and of the gradient), so the
table gives GB/s of x moved, to compare with the device's copy bandwidth (about 4.3 TB/s read +
written on the H200)."""
import argparse
import json
import statistics
import time

import torch

import fused_attn


def hf_rotary(x, cos, sin, positions):
    """transformers' apply_rotary_pos_emb on x (B, L, H, D): tables gathered per token, duplicated."""
    c = torch.cat((cos, cos), -1)[positions].unsqueeze(2).to(x.dtype)  # (B, L, 1, D)
    s = torch.cat((sin, sin), -1)[positions].unsqueeze(2).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * c + rotated * s


def timer(device):
    if device.type == "cuda":
        def run(fn, reps):
            for _ in range(5):
                fn()
            times = []
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
    else:
        def run(fn, reps):
            for _ in range(3):
                fn()
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    reps = args.reps or (30 if gpu else 10)
    # (B, L, H, D): training-size q, a decoding step's q
    cases = [(8, 4096, 32, 128), (64, 1, 32, 128), (2, 4096, 8, 64)] if gpu else [(2, 1024, 8, 64), (16, 1, 32, 128)]
    run = timer(device)
    rows = []
    for B, L, H, D in cases:
        S = L + 64
        angles = torch.outer(torch.arange(S, device=device, dtype=torch.float32),
                             10000.0 ** -(torch.arange(D // 2, device=device) / (D // 2)))
        cos, sin = angles.cos(), angles.sin()
        offset = S - L
        positions = (torch.arange(L, device=device) + offset).expand(B, L)
        x = torch.randn(B, L, H, D, device=device, dtype=dtype)
        ref = hf_rotary(x.float(), cos, sin, positions)
        ours_out = fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=offset)
        err = float((ours_out.float() - ref).abs().max())
        moved = 2 * x.numel() * x.element_size()  # x read, out written
        impls = {"fused_attn": lambda t: fused_attn.apply_rotary_emb(t, cos, sin, seqlen_offsets=offset),
                 "eager": lambda t: hf_rotary(t, cos, sin, positions)}
        if gpu:
            impls["compiled"] = torch.compile(lambda t: hf_rotary(t, cos, sin, positions))
        grad = torch.randn_like(x)
        for name, fn in impls.items():
            with torch.no_grad():
                fwd = run(lambda: fn(x), reps)
            xg = x.detach().requires_grad_()

            def step():
                fn(xg).backward(grad)
            both = run(step, reps)
            rows.append(dict(case=f"B{B} L{L} H{H} D{D}", impl=name, fwd_ms=fwd, fwd_bwd_ms=both,
                             fwd_GBps=moved / fwd / 1e6, fwd_bwd_GBps=2 * moved / both / 1e6, max_err_vs_fp32=err))
        base = {r["impl"]: r for r in rows if r["case"] == rows[-1]["case"]}
        for r in base.values():
            r["fwd_speedup_vs_eager"] = base["eager"]["fwd_ms"] / r["fwd_ms"]
            r["fwd_bwd_speedup_vs_eager"] = base["eager"]["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        if args.out:  # after every case: a run cut short by a time limit keeps what it measured
            with open(args.out, "w") as f:
                json.dump({"device": str(device), "dtype": str(dtype), "rows": rows}, f, indent=1)
    print(f"device: {torch.cuda.get_device_name(0) if gpu else 'cpu'}, dtype {dtype}, torch {torch.__version__}")
    print(f"{'case':22s} {'impl':11s} {'fwd ms':>9s} {'GB/s':>7s} {'x eager':>7s} {'f+b ms':>9s} {'GB/s':>7s} "
          f"{'x eager':>7s}")
    for r in rows:
        print(f"{r['case']:22s} {r['impl']:11s} {r['fwd_ms']:9.4f} {r['fwd_GBps']:7.0f} {r['fwd_speedup_vs_eager']:7.2f} "
              f"{r['fwd_bwd_ms']:9.4f} {r['fwd_bwd_GBps']:7.0f} {r['fwd_bwd_speedup_vs_eager']:7.2f}")


if __name__ == "__main__":
    main()
