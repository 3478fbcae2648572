"""Host time per call of the ops on tiny CPU inputs (where the Python layers dominate), this
session's code against the session's starting commit, each in its own subprocess, three rounds
alternated (five rounds here, and the smallest of each call's five medians: this VM's timing
bursts moved single medians by up to 60 %); also a swapped torch encoder layer (post-LN, seq-first self-attention) in inference and
in a training step, where this session added per-call checks. Usage from the repository root:
  python docs/results/cpu-2026-12-01c/host_ab.py OLD_CHECKOUT NEW_CHECKOUT"""
import json
import subprocess
import sys

BODY = r'''
import json, time, torch
torch.set_num_threads(1)
from fused_attn import functional as F
def med(f, n=300):
    for _ in range(30): f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e6
q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
x, r, w, b = torch.randn(16, 32), torch.randn(16, 32), torch.randn(32), torch.randn(32)
xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
w1, w2 = torch.randn(64, 32), torch.randn(32, 64)
w1g = w1.clone().requires_grad_()
import fused_attn
layer = torch.nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0)
fused_attn.swap_modules(layer)
src = torch.randn(16, 2, 32)
srcg = src.clone().requires_grad_()
res = {
  "attention inference": med(lambda: F.attention(q, k, v, causal=True)),
  "attention fwd+bwd": med(lambda: F.attention(qg, kg, vg, causal=True).sum().backward()),
  "layer_norm inference": med(lambda: F.layer_norm_residual(x, r, w, b, 1e-5)),
  "layer_norm fwd+bwd": med(lambda: F.layer_norm_residual(xg, r, wg, b, 1e-5).sum().backward()),
  "feed_forward inference": med(lambda: F.feed_forward(x, w1, None, w2, None, activation="gelu")),
  "feed_forward fwd+bwd": med(lambda: F.feed_forward(xg, w1g, None, w2, None, activation="gelu").sum().backward()),
  "swapped encoder layer, inference": med(lambda: layer(src)),
  "swapped encoder layer, fwd+bwd": med(lambda: layer(srcg).sum().backward()),
}
print(json.dumps(res))
'''


def run(path):
    out = subprocess.run([sys.executable, "-c", BODY], cwd=path, capture_output=True, text=True,
                         env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    old, new = sys.argv[1], sys.argv[2]
    rounds = {"old": [], "new": []}
    for _ in range(5):
        rounds["old"].append(run(old))
        rounds["new"].append(run(new))
    print(f"{'call (tiny CPU inputs), min of medians, us':34} {'start':>8} {'now':>8} {'now/start':>9}")
    for name in rounds["old"][0]:
        o = min(r[name] for r in rounds["old"])
        n = min(r[name] for r in rounds["new"])
        print(f"{name:34} {o:8.1f} {n:8.1f} {n / o:9.2f}")
