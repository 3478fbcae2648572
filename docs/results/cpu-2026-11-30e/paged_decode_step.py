import torch, time, fused_attn
torch.set_num_threads(2)
B, P, page, H, D = 64, 2048, 16, 2, 64
kc = torch.randn(B * 4, page, H, D); vc = torch.randn(B * 4, page, H, D)
bt = torch.randint(0, B * 4, (B, P), dtype=torch.int32)
bt[:, :4] = torch.arange(B * 4, dtype=torch.int32).view(B, 4)
q = torch.randn(B, 1, H, D); k = torch.randn(B, 1, H, D); v = torch.randn(B, 1, H, D)
lens = torch.full((B,), 40, dtype=torch.int32)
def step():
    with torch.no_grad():
        fused_attn.attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, block_table=bt, causal=True, backend="cpu")
for _ in range(3): step()
ts = []
for _ in range(30):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
ts.sort(); print(f"paged decode step B{B} table {B}x{P}: {ts[15]*1e3:.2f} ms")
cu = torch.arange(B + 1, dtype=torch.int32) * 41
qp = q.view(B, H, D)
def varlen():
    with torch.no_grad():
        fused_attn.attention_varlen(qp, kc, vc, torch.arange(B + 1, dtype=torch.int32), cu, causal=True, block_table=bt, alignment="bottom_right", backend="cpu")
for _ in range(3): varlen()
ts = []
for _ in range(30):
    t = time.perf_counter(); varlen(); ts.append(time.perf_counter() - t)
ts.sort(); print(f"attention_varlen paged B{B} table {B}x{P}: {ts[15]*1e3:.2f} ms")
