"""CPU decoding steps: one query (or a few) per head against a KV cache, fused_attn's cpu backend
against torch's SDPA, float32 and bfloat16, median ms of 30 calls on 2 threads.

    python benchmarks/bench_cpu_decode.py
"""
from _script_args import parse  # before torch's import: --help answers at once
parse(__doc__)
import torch, time, fused_attn, torch.nn.functional as TF
torch.set_num_threads(2)
def bench(f, n=30):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e3
for (B,Hq,Hkv,Lq,Lk,D) in [(4,8,2,1,4096,64),(1,32,8,1,8192,128),(16,32,8,1,1024,128),(4,8,8,1,4096,64),(4,8,2,4,4096,64),(2,8,8,16,2048,64)]:
    q=torch.randn(B,Hq,Lq,D); k=torch.randn(B,Hkv,Lk,D); v=torch.randn(B,Hkv,Lk,D)
    row=[]
    for dt in (torch.float32, torch.bfloat16):
        qq,kk,vv=(t.to(dt) for t in (q,k,v))
        with torch.no_grad():
            a=bench(lambda: fused_attn.attention(qq,kk,vv,causal=True,alignment="bottom_right"))
            s=bench(lambda: TF.scaled_dot_product_attention(qq,kk,vv,enable_gqa=Hq!=Hkv, is_causal=False))
        row.append(f"{str(dt)[6:]}: fused {a:.2f} sdpa {s:.2f} (x{s/a:.2f})")
    print((B,Hq,Hkv,Lq,Lk,D), " | ".join(row), flush=True)
