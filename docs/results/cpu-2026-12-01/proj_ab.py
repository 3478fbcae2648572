"""A/B in one process: MultiHeadAttention's Q/K/V projections as three matmuls on the modules'
weights (now) against one matmul over the weights concatenated at each call (before)."""
import time, torch, torch.nn.functional as F, fused_attn
from fused_attn import modules as M
torch.set_num_threads(2); torch.manual_seed(0)
new = M.MultiHeadAttention.__dict__["_project"]
def old(self, query, key, value):
    linears = (self.query_linear, self.key_linear, self.value_linear)
    w = torch.cat([l.weight for l in linears]); b = torch.cat([l.bias for l in linears])
    return F.linear(query, w, b).split([l.out_features for l in linears], dim=-1)  # (self-attention only)
d = 1024
model = fused_attn.Transformer(d, 16, 4, causal=True, num_kv_heads=4, norm_first=True, rotary=True,
                               activation="swiglu", backend="cpu")
x = torch.randn(2, 64, d)
def decode_step():
    with torch.no_grad():
        c = model.new_kv_cache(2, 128); model(x, kv_cache=c)
        t = time.perf_counter()
        for _ in range(8):
            model(x[:, -1:], kv_cache=c)
        return (time.perf_counter() - t) / 8 * 1e3
xt = torch.randn(4, 256, d)
def train_step():
    t = time.perf_counter(); model(xt).sum().backward(); return (time.perf_counter() - t) * 1e3
for name, fn in (("decode ms/token (B2, 64-token cache)", decode_step), ("train fwd+bwd ms (B4 L256)", train_step)):
    res = {"three matmuls": [], "cat + one matmul": []}
    for r in range(6):
        for label, proj in (("three matmuls", new), ("cat + one matmul", old)):
            M.MultiHeadAttention._project = proj
            res[label].append(fn())
    M.MultiHeadAttention._project = new
    med = {k: sorted(v)[len(v) // 2] for k, v in res.items()}
    print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items()),
          f"(cat/three = {med['cat + one matmul'] / med['three matmuls']:.2f})")
