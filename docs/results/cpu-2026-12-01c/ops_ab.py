"""CPU time per call of the kernels this session changed (LayerNorm/RMSNorm's block sums and
corrected variance, the feed-forward's activations at the ends of exp), this session's code
against its start, each in its own subprocess, five rounds alternated, the smallest of each
call's five medians (this VM's timing bursts). One thread and two. Usage from the repository root:
  python docs/results/cpu-2026-12-01c/ops_ab.py OLD_CHECKOUT NEW_CHECKOUT"""
import json
import subprocess
import sys

BODY = r'''
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from fused_attn import functional as F
def med(f, n=15):
    for _ in range(3): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3
g = torch.Generator().manual_seed(0)
res = {}
for rows, d in ((4096, 1024), (16384, 256), (64, 65536), (32768, 64)):
    x, r = torch.randn(rows, d, generator=g), torch.randn(rows, d, generator=g)
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    xg = x.clone().requires_grad_()
    res[f"layer_norm {rows}x{d} fwd"] = med(lambda: F.layer_norm_residual(x, r, w, b, backend="cpu"))
    res[f"layer_norm {rows}x{d} fwd+bwd"] = med(lambda: F.layer_norm_residual(xg, r, w, b, backend="cpu").sum().backward())
    res[f"rms_norm {rows}x{d} fwd"] = med(lambda: F.layer_norm_residual(x, r, w, None, rms=True, backend="cpu"))
x = torch.randn(2048, 256, generator=g)
w1, w2 = torch.randn(1024, 256, generator=g), torch.randn(256, 1024, generator=g)
w1s = torch.randn(2048, 256, generator=g)
for act in ("gelu", "gelu_tanh", "silu", "relu"):
    res[f"feed_forward {act} 2048x256x1024 fwd"] = med(lambda: F.feed_forward(x, w1, None, w2, None, activation=act, backend="cpu"))
res["feed_forward swiglu 2048x256x1024 fwd"] = med(lambda: F.feed_forward(x, w1s, None, w2, None, activation="swiglu", backend="cpu"))
print(json.dumps(res))
'''


def run(path, threads):
    out = subprocess.run([sys.executable, "-c", BODY, str(threads)], cwd=path, capture_output=True, text=True,
                         env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    old, new = sys.argv[1], sys.argv[2]
    for threads in (1, 2):
        rounds = {"old": [], "new": []}
        for _ in range(5):
            rounds["old"].append(run(old, threads))
            rounds["new"].append(run(new, threads))
        print(f"\n{threads} thread(s)\n{'call (CPU), min of medians, ms':42} {'start':>8} {'now':>8} {'now/start':>9}")
        for name in rounds["old"][0]:
            o = min(r[name] for r in rounds["old"])
            n = min(r[name] for r in rounds["new"])
            print(f"{name:42} {o:8.3f} {n:8.3f} {n / o:9.2f}")
