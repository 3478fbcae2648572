#!/usr/bin/env python
# Usage: PYTHONPATH=. python benchmarks/bench_cpu_varlen.py [reps=7] [--causal] [--threads=2]
"""fused_attn.attention_varlen(..., backend="cpu"): the packed kernels (fused_attn_C::attention_varlen_fwd/bwd)
against the per-sequence loop they replace (Backend.attention_varlen_fwd/bwd of fused_attn/backends/base.py,
bound onto the cpu backend for the "loop" rows). Median milliseconds of the forward (under torch.no_grad) and of
forward + backward (out.backward(dout) on requires_grad inputs), loop and packed interleaved, after one warm-up
round. D = 64, Hq = 8 with Hkv = 8 and 2 (GQA); float32 and bfloat16; 2 threads unless --threads says otherwise."""
import statistics
import time
import types

from _script_args import parse  # before torch's import: --help answers at once
_args = parse(__doc__, count=("reps", 7), flags=[("--causal", "causal attention")], threads=2)
reps, causal, threads = _args.reps, _args.causal, _args.threads
import torch

import fused_attn
from fused_attn.backends import get_backend
from fused_attn.backends.base import Backend

torch.set_num_threads(threads)
D, HQ = 64, 8

# ragged: 23 sequences of 16 to 512 tokens, 4096 in all (a packed batch of documents)
_g = torch.Generator().manual_seed(0)
_ragged = [16 + int(x) for x in torch.randint(0, 497, (22,), generator=_g)]
_ragged.append(max(1, 4096 - sum(_ragged))) if sum(_ragged) < 4096 else None
SHAPES = {"64 x 64": [64] * 64, "16 x 256": [256] * 16, "4 x 1024": [1024] * 4,
          f"ragged {len(_ragged)} ({min(_ragged)}-{max(_ragged)})": _ragged}


class loop_backend:
    """Within the block, the cpu backend runs varlen attention through the base class's per-sequence loop."""

    def __enter__(self):
        self.cpu = get_backend("cpu")
        self.cpu.attention_varlen_fwd = types.MethodType(Backend.attention_varlen_fwd, self.cpu)
        self.cpu.attention_varlen_bwd = types.MethodType(Backend.attention_varlen_bwd, self.cpu)

    def __exit__(self, *exc):
        del self.cpu.attention_varlen_fwd, self.cpu.attention_varlen_bwd


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main():
    print(f"threads={torch.get_num_threads()} reps={reps} causal={causal} D={D} Hq={HQ}; median ms")
    print(f"{'sequences':>24} {'Hkv':>3} {'dtype':>8} | {'fwd loop':>8} {'packed':>8} {'speedup':>7} | "
          f"{'f+b loop':>8} {'packed':>8} {'speedup':>7}")
    for name, lens in SHAPES.items():
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        total = sum(lens)
        for hkv in (8, 2):
            for dtype in (torch.float32, torch.bfloat16):
                g = torch.Generator().manual_seed(1)
                q = torch.randn(total, HQ, D, generator=g).to(dtype).requires_grad_()
                k = torch.randn(total, hkv, D, generator=g).to(dtype).requires_grad_()
                v = torch.randn(total, hkv, D, generator=g).to(dtype).requires_grad_()
                dout = torch.randn(total, HQ, D, generator=g).to(dtype)

                def forward():
                    with torch.no_grad():
                        fused_attn.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal,
                                                    backend="cpu")

                def forward_backward():
                    q.grad = k.grad = v.grad = None
                    fused_attn.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal,
                                                backend="cpu").backward(dout)

                times = {key: [] for key in ("fwd loop", "fwd packed", "fb loop", "fb packed")}
                for rep in range(reps + 1):  # round 0 warms up
                    for mode in ("loop", "packed"):
                        if mode == "loop":
                            with loop_backend():
                                t_fwd, t_fb = timed(forward), timed(forward_backward)
                        else:
                            t_fwd, t_fb = timed(forward), timed(forward_backward)
                        if rep:
                            times[f"fwd {mode}"].append(t_fwd)
                            times[f"fb {mode}"].append(t_fb)
                ms = {key: statistics.median(ts) for key, ts in times.items()}
                print(f"{name:>24} {hkv:>3} {str(dtype)[6:]:>8} | {ms['fwd loop']:8.2f} {ms['fwd packed']:8.2f} "
                      f"{ms['fwd loop'] / ms['fwd packed']:6.2f}x | {ms['fb loop']:8.2f} {ms['fb packed']:8.2f} "
                      f"{ms['fb loop'] / ms['fb packed']:6.2f}x", flush=True)


if __name__ == "__main__":
    main()
