import sys, torch, fused_attn  # noqa: F401  (loads fused_attn._C)
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
q = torch.randn(1, 2, 8, 16, device=dev, dtype=torch.float16)
k = torch.randn(1, 2, 8, 16, device=dev, dtype=torch.float16)
try:
    torch.ops.fused_attn_C.attention_fwd(q, k[..., :8], k, None, False, 0.0, 1.0, 0, 0)
    print(dev, "NO ERROR RAISED")
except RuntimeError as exc:
    print(dev, "raised OK:", str(exc)[:200])
