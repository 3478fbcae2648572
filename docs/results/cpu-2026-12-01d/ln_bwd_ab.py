"""LayerNorm/RMSNorm backward alone (cpu backend, dx and dweight; the bias also requires grad), OLD
checkout against NEW, each in its own subprocess, ROUNDS alternated rounds, the smallest of each call's
medians. Usage from the repository root: python docs/results/cpu-2026-12-01d/ln_bwd_ab.py OLD NEW [ROUNDS]"""
import json, subprocess, sys
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
for rows, d in ((4096, 1024), (16384, 256), (64, 65536), (32768, 64), (8192, 768)):
    x, r = torch.randn(rows, d, generator=g).requires_grad_(), torch.randn(rows, d, generator=g)
    w, b = torch.randn(d, generator=g).requires_grad_(), torch.randn(d, generator=g).requires_grad_()
    dy = torch.randn(rows, d, generator=g)
    for name, kw in (("layer_norm", dict(rms=False)), ("rms_norm", dict(rms=True))):
        out = F.layer_norm_residual(x, r, w, b if not kw["rms"] else None, backend="cpu", **kw)
        res[f"{name} {rows}x{d} bwd"] = med(lambda: torch.autograd.grad(out, (x, w), dy, retain_graph=True))
print(json.dumps(res))
'''
def run(path, threads):
    out = subprocess.run([sys.executable, "-c", BODY, str(threads)], cwd=path, capture_output=True, text=True,
                         env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])
old, new = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
for threads in (1,):
    R = {"old": [], "new": []}
    for _ in range(rounds):
        R["old"].append(run(old, threads)); R["new"].append(run(new, threads))
    print(f"\n{threads} thread(s)\n{'call (CPU), min of medians, ms':34} {'old':>8} {'new':>8} {'new/old':>8}")
    for name in R["old"][0]:
        o = min(r[name] for r in R["old"]); n = min(r[name] for r in R["new"])
        print(f"{name:34} {o:8.3f} {n:8.3f} {n / o:8.2f}")
