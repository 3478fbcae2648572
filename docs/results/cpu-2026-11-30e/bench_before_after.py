import torch, time, fused_attn, sys
torch.set_num_threads(2)
def bench(f, n=15):
    for _ in range(3): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e3
cases=[(4,8,8,128,4096,64,False),(4,8,8,16,4096,64,False),(1,8,8,512,4096,64,False),(2,8,8,2048,2048,64,False),(2,8,8,2048,2048,64,True),(8,12,12,512,512,64,True)]
for dt in (torch.float32, torch.bfloat16):
  for (B,Hq,Hkv,Lq,Lk,D,bw) in cases:
    q=torch.randn(B,Hq,Lq,D,dtype=dt); k=torch.randn(B,Hkv,Lk,D,dtype=dt); v=torch.randn(B,Hkv,Lk,D,dtype=dt)
    if bw:
        q.requires_grad_(); k.requires_grad_(); v.requires_grad_()
        go=torch.randn(B,Hq,Lq,D,dtype=dt)
        def f():
            o=fused_attn.attention(q,k,v,causal=True,backend="cpu"); o.backward(go)
    else:
        def f():
            with torch.no_grad(): fused_attn.attention(q,k,v,causal=True,alignment="bottom_right",backend="cpu")
    print(str(dt)[6:], (B,Hq,Hkv,Lq,Lk,D,"fwd+bwd" if bw else "fwd"), f"{bench(f):.2f} ms", flush=True)
