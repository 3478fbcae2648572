"""fused_attn: fused Transformer kernels for PyTorch.

    import fused_attn
    out = fused_attn.functional.attention(q, k, v, causal=True)
    fused_attn.available_backends()
"""
from __future__ import annotations

from . import _extension, functional, reference
from .backends import BackendUnavailableError, available_backends, use_backend
from .integrations.flash_attn import patch_flash_attn
from .integrations.xformers import patch_xformers
from .functional import (apply_rotary_emb, attention, attention_varlen, attention_with_kvcache, feed_forward,
                         get_alibi_slopes, layer_norm_residual, merge_attention)
from .modules import FeedForward, KVCache, LayerNormResidual, MultiHeadAttention, Transformer, TransformerLayer
from .swap import SwapReport, patch_sdpa, restore_modules, swap_modules

__version__ = "0.1.0"

__all__ = ["functional", "reference", "attention", "attention_varlen", "attention_with_kvcache", "merge_attention",
           "get_alibi_slopes",
           "apply_rotary_emb", "layer_norm_residual", "feed_forward",
           "available_backends", "use_backend", "BackendUnavailableError", "extension_error", "empty_cpu_cache",
           "__version__",
           "MultiHeadAttention", "LayerNormResidual", "FeedForward", "TransformerLayer", "Transformer", "KVCache",
           "swap_modules", "restore_modules", "patch_sdpa", "patch_flash_attn", "patch_xformers",
           "SwapReport"]


def extension_error() -> str | None:
    """Why ``fused_attn._C`` is not loaded, or None when it is."""
    return _extension.ERROR


def empty_cpu_cache() -> int:
    """Frees the scratch buffers the ``cpu`` backend keeps between calls; returns the bytes freed.

    The C++ attention kernels lay their operands out in buffers as large as K and V (and, backward,
    Q and dO); buffers of a MiB and more are kept after a call, up to ``FUSED_ATTN_CPU_SCRATCH_MB``
    MiB in all (default 256; 0 keeps none), so the next call does not fault fresh pages in. As
    ``torch.cuda.empty_cache()``, this only returns memory to the system: the next call allocates
    again. 0 without the extension."""
    if _extension._C is None:
        return 0
    import torch

    return int(torch.ops.fused_attn_C.cpu_scratch_release())
