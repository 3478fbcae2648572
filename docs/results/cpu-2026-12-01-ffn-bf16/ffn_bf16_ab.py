"""fused vs eager bfloat16 feed-forward on the cpu backend, one thread, alternating A/B, medians."""
import os, statistics, sys, time
import torch
import torch.nn.functional as TF
torch.set_num_threads(1)
from fused_attn import functional as F

def mm_rate(dtype, n=1024, reps=5):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(ts) / 1e9

print("matmul 1024^3 GFLOP/s, 1 thread: float32 %.1f  bfloat16 %.1f" % (mm_rate(torch.float32), mm_rate(torch.bfloat16)))

def run(T, d, ff, act, reps):
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(T, d, generator=g).to(dt)
    w1 = (torch.randn(ff, d, generator=g) / d ** 0.5).to(dt); b1 = torch.randn(ff, generator=g).to(dt) * 0.1
    w2 = (torch.randn(d, ff, generator=g) / ff ** 0.5).to(dt); b2 = torch.randn(d, generator=g).to(dt) * 0.1
    params = [t.clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    dout = torch.randn(T, d, generator=g).to(dt)

    def eager(xx, a, b, c, e):
        return TF.linear(TF.gelu(TF.linear(xx, a, b)), c, e)

    def fused(xx, a, b, c, e):
        return F.feed_forward(xx, a, b, c, e, activation=act, backend="cpu")

    def fused_f32(xx, a, b, c, e):
        os.environ["FUSED_ATTN_CPU_HALF_GEMM"] = "float32"
        try:
            return F.feed_forward(xx, a, b, c, e, activation=act, backend="cpu")
        finally:
            del os.environ["FUSED_ATTN_CPU_HALF_GEMM"]

    impls = {"eager": eager, "fused": fused, "fused(HALF_GEMM=float32)": fused_f32}
    for pass_ in ("fwd", "fwd+bwd"):
        times = {k: [] for k in impls}
        for r in range(reps + 1):  # first round is warm-up
            for name, fn in impls.items():
                for p in params:
                    p.grad = None
                t = time.perf_counter()
                if pass_ == "fwd":
                    with torch.no_grad():
                        fn(*params)
                else:
                    fn(*params).backward(dout)
                el = time.perf_counter() - t
                if r:
                    times[name].append(el)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        e = med["eager"]
        print(f"T{T} d{d} ff{ff} {act} {pass_}: " + "  ".join(
            f"{k} {v:.1f} ms ({e / v:.2f}x eager; per-round ratios {min(a / b for a, b in zip(times['eager'], times[k])):.2f}-"
            f"{max(a / b for a, b in zip(times['eager'], times[k])):.2f})" for k, v in med.items()), flush=True)

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 7
for shape in [(2048, 1024, 4096, "gelu"), (512, 768, 3072, "gelu")]:
    run(*shape, reps)
