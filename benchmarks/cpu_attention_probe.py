"""Quick timing of the cpu attention kernels against torch's own CPU flash attention.

    PYTHONPATH=$PWD python benchmarks/cpu_attention_probe.py [--quick] [--dtype float32|bfloat16]

For each shape it times F.scaled_dot_product_attention and fused_attn.functional.attention(...,
backend="cpu") alternately (forward alone, then forward + backward), takes the minimum of the
repeats for each and prints the ratio sdpa_time / fused_time (> 1 means fused is faster). Both
run in the same process, interleaved, so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import fused_attn


def timeit(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(B, H, L, D, dtype, causal, reps, backward):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(dtype).requires_grad_(backward) for _ in range(3))
    dout = torch.randn(B, H, L, D, generator=gen).to(dtype)

    def sdpa():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        if backward:
            o.backward(dout)

    def fused():
        o = fused_attn.functional.attention(q, k, v, causal=causal, backend="cpu")
        if backward:
            o.backward(dout)

    grad_ctx = torch.enable_grad if backward else torch.no_grad
    with grad_ctx():
        sdpa(), fused()  # warm-up
        t_sdpa, t_fused = float("inf"), float("inf")
        for _ in range(reps):  # interleave so that noise hits both alike
            t_sdpa = min(t_sdpa, timeit(sdpa, 1))
            t_fused = min(t_fused, timeit(fused, 1))
    return t_sdpa, t_fused


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quick", action="store_true", help="a few shapes only")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default="", help="comma list of B*H:L:D (e.g. 16:1024:64)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split(":")) for s in args.shapes.split(",")]
    elif args.quick:
        shapes = [(16, 1024, 64), (16, 1024, 128)]
    else:
        shapes = [(32, 512, 64), (16, 1024, 64), (16, 2048, 64), (16, 4096, 64), (16, 1024, 128), (16, 2048, 128)]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, dtype {args.dtype}")
    print(f"{'B*H':>4} {'L':>5} {'D':>4} {'causal':>6} | {'fwd sdpa ms':>11} {'fused ms':>9} {'ratio':>6} | "
          f"{'f+b sdpa ms':>11} {'fused ms':>9} {'ratio':>6}")
    for BH, L, D in shapes:
        for causal in (False, True):
            fs, ff = bench(1, BH, L, D, dtype, causal, args.reps, False)
            bs, bf = bench(1, BH, L, D, dtype, causal, args.reps, True)
            print(f"{BH:>4} {L:>5} {D:>4} {str(causal):>6} | {fs*1e3:>11.1f} {ff*1e3:>9.1f} {fs/ff:>6.2f} | "
                  f"{bs*1e3:>11.1f} {bf*1e3:>9.1f} {bs/bf:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
