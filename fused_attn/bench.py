"""python -m fused_attn.bench: times every available backend of each op against the reference
and prints the max error against the float64 reference (placeholder until the full sweep lands)."""
from __future__ import annotations

import argparse
import time

import torch

from . import functional as F
from . import reference as R
from .backends import BACKENDS, Call


def _time(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 256, 64) for _ in range(3))
    ref64 = R.attention(q.double(), k.double(), v.double())
    call = Call("attention", q.device, q.dtype, {})
    for name, backend in BACKENDS.items():
        if backend.call_reasons(call):
            continue
        t = _time(lambda: F.attention(q, k, v, backend=name))
        err = (F.attention(q, k, v, backend=name).double() - ref64).abs().max().item()
        print(f"attention fwd  {name:10s} {t * 1e3:8.2f} ms  max err {err:.2e}")


if __name__ == "__main__":
    main()
