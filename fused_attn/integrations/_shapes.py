"""Shape checks of q, k and v in a front-end's own layout and argument names.

The FlashAttention and xformers front-ends hand fused_attn's ``attention`` transposed views
((B, L, H, D) -> (B, H, L, D)), and the packed forms views of one tensor: ``attention``'s errors
would name q, k, v and quote those views' shapes (``q.shape[1]`` for what the caller passed as
dim 2). As ``functional.scaled_dot_product_attention`` does for SDPA, the front-ends check the
shapes here first, in the caller's terms; a call that passes costs one combined test.
"""
from __future__ import annotations

from torch import Tensor


def check_shapes(q: Tensor, k: Tensor, v: Tensor, names=("q", "k", "v"), shown=None, *, q_lead: int = 2,
                 kv_lead=("batch size", "sequence length"), batched: bool = True) -> None:
    """q (*q_lead dims, *heads, D), k (*kv_lead dims, *kv heads, D), v (*kv_lead dims, *kv heads,
    Dv), as the caller laid them out: (B, L, H, D) has ``q_lead`` 2 and ``kv_lead`` (batch,
    sequence); varlen's (total, H, D) 1 and ("number of tokens",); a paged cache (pages,
    page_size, H, D) ("number of pages", "page size"). ``batched``: dim 0 is a batch that q, k
    and v share. k and v must agree on every dim but the last, k's head dim must be q's (at least
    1), and a single query head dim must be a multiple of the kv heads' (grouped-query; several
    head dims, xformers' (G, H), are left to the caller). ``names`` / ``shown``: the caller's
    arguments the errors name and whose shapes they quote (a packed tensor for views of it;
    default q, k, v themselves). Ranks other than these are not checked here (the call's own
    checks report them)."""
    qs, ks, vs = q.shape, k.shape, v.shape
    nk = len(kv_lead)
    n_heads = len(qs) - q_lead - 1  # head dims: 1, none (xformers' BMK) or 2 (its BMGHK)
    if len(ks) != len(vs) or len(ks) - nk - 1 != n_heads or n_heads < 0:
        return
    D = qs[-1]
    grouped_ok = True
    if n_heads == 1:
        Hq, Hkv = qs[q_lead], ks[nk]
        grouped_ok = Hq % Hkv == 0 if Hkv else Hq == 0
    if grouped_ok and ks[:-1] == vs[:-1] and ks[-1] == D and D > 0 and (not batched or ks[0] == qs[0]):
        return  # the common case: one test
    qn, kn, vn = names
    shown = (q, k, v) if shown is None else shown
    seen = {}
    for name, t in zip(names, shown):
        seen.setdefault(name, tuple(t.shape))
    got = "got " + ", ".join(f"{name} {shape}" for name, shape in seen.items())
    kv = kn if kn == vn else f"{kn} and {vn}"
    if batched and not ks[0] == vs[0] == qs[0]:
        *most, last = seen  # (at least two names: a packed tensor has one batch size)
        raise ValueError(f"{', '.join(most)} and {last} must have the same batch size (dim 0), {got}")
    for i, what in enumerate(kv_lead):
        if ks[i] != vs[i]:
            raise ValueError(f"{kv} must have the same {what} (dim {i}), {got}")
    if ks[nk:-1] != vs[nk:-1]:
        raise ValueError(f"{kv} must have the same number of heads, {got}")
    qk = qn if qn == kn else f"{qn} and {kn}"
    if ks[-1] != D:
        raise ValueError(f"{qk} must have the same head dim (last dim), {got}")
    if D == 0:  # (every logit would be 0)
        raise ValueError(f"{qk} must have a head dim (last dim) of at least 1, {got}")
    if not grouped_ok:
        owners = f"{kn}'s" if kn == vn else f"{kn}'s and {vn}'s"
        raise ValueError(f"{qn}'s number of heads ({Hq}) must be a multiple of {owners} ({Hkv}) "
                         f"(grouped-query attention), {got}")
