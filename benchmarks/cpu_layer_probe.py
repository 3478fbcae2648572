"""Interleaved timing of one whole post-LN TransformerLayer, forward + backward, three ways:
the fused modules (``cpu`` backend), the reference layer with F.scaled_dot_product_attention,
and the plain eager reference; plus the share of the time the GEMMs take.

    PYTHONPATH=$PWD python benchmarks/cpu_layer_probe.py [--reps 24] [--threads 2]

The three run alternately in one process (the order reversed every other round), so the drift
of a shared machine hits all of them alike; it prints the minimum and the median of each and the
ratios. Then one torch.profiler pass over each of the first two sums the self time of the
aten::mm / aten::addmm calls: the part of the layer no fusion changes, which bounds the ratio
any fused layer can reach against the SDPA layer (Amdahl).
"""
from __future__ import annotations

import argparse
import time

import torch

from fused_attn import reference as R
from fused_attn.bench import _sdpa, functional_layer_forward, fused_layer_class


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref = R.TransformerLayer(512, 8, d_ff=2048)
    fused = fused_layer_class()(512, 8, d_ff=2048)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(args.batch, args.seq, 512, requires_grad=True)
    grad = torch.randn(args.batch, args.seq, 512)

    def sdpa_layer():
        return functional_layer_forward(ref, x, _sdpa,
                                        lambda x, r, w, b, eps, rms: R.layer_norm_residual(x, r, w, b, eps, rms=rms),
                                        R.feed_forward)

    layers = {"fused": lambda: fused(x).backward(grad), "sdpa": lambda: sdpa_layer().backward(grad),
              "eager": lambda: ref(x).backward(grad)}
    for fn in layers.values():
        fn()
        fn()
    times = {name: [] for name in layers}
    for i in range(args.reps):
        order = list(layers.items())
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    best = {n: min(v) * 1e3 for n, v in times.items()}
    med = {n: sorted(v)[len(v) // 2] * 1e3 for n, v in times.items()}
    print(f"TransformerLayer d512 h8 ff2048 B{args.batch} L{args.seq} float32, fwd+bwd, {args.threads} threads, "
          f"{args.reps} interleaved rounds")
    for n in layers:
        print(f"  {n:6s} min {best[n]:7.1f} ms  median {med[n]:7.1f} ms")
    print(f"  fused x SDPA layer: min {best['sdpa'] / best['fused']:.2f}, median {med['sdpa'] / med['fused']:.2f};"
          f"  fused x eager: min {best['eager'] / best['fused']:.2f}, median {med['eager'] / med['fused']:.2f}")

    from torch.profiler import ProfilerActivity, profile
    for name in ("fused", "sdpa"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layers[name]()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / 1e3
        gemm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm")) / 1e3
        print(f"  {name:6s} profiled {total:7.1f} ms, of which GEMMs {gemm:7.1f} ms ({100 * gemm / total:.0f} %)")


if __name__ == "__main__":
    main()
