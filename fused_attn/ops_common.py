"""Small helpers every backend and the fake (meta) implementations share."""
from __future__ import annotations

import torch


def empty(like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The placeholder for an absent output (an op cannot return None)."""
    return torch.empty(0, device=like.device, dtype=like.dtype if dtype is None else dtype)


def new_attention_out(q: torch.Tensor, dv: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Attention output (B, Hq, Lq, Dv) laid out in memory as a contiguous (B, Lq, Hq, Dv).

    That is the layout a module wants next: ``out.transpose(1, 2).reshape(B, Lq, Hq * Dv)`` is
    then a free view, not a copy (FlashAttention stores its output the same way).
    """
    B, H, L, _ = q.shape
    return torch.empty(B, L, H, dv, device=q.device, dtype=q.dtype if dtype is None else dtype).transpose(1, 2)


def attention_lse_shape(q: torch.Tensor) -> tuple[int, int, int]:
    return tuple(q.shape[:3])
