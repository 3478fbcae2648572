import torch, time, fused_attn, sys
torch.set_num_threads(2)
def bench(f, n=400):
    for _ in range(30): f()
    ts=[]
    for _ in range(n):
        t=time.perf_counter(); f(); ts.append(time.perf_counter()-t)
    ts.sort(); return ts[len(ts)//2]*1e6
B,Hq,Hkv,D,L=2,8,2,64,256
q=torch.randn(B,1,Hq,D); kc=torch.randn(B,L,Hkv,D); vc=torch.randn(B,L,Hkv,D)
kn=torch.randn(B,1,Hkv,D); vn=torch.randn(B,1,Hkv,D)
sl=torch.tensor([10,100],dtype=torch.int32)
with torch.inference_mode():
    r=bench(lambda: fused_attn.attention_with_kvcache(q,kc,vc,cache_seqlens=sl,causal=True))
    w=bench(lambda: fused_attn.attention_with_kvcache(q,kc,vc,kn,vn,cache_seqlens=sl,causal=True))
print(f"{sys.argv[1]} read {r:.1f} write {w:.1f}")
