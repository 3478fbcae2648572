"""The ``cuda`` backend: CUDA C++ kernels in csrc/cuda, for GPUs where Triton is absent or declines."""
from __future__ import annotations

import torch

from .cpu import CompiledBackend

_GPU = (torch.float16, torch.bfloat16, torch.float32)


class CudaBackend(CompiledBackend):
    name = "cuda"
    devices = ("cuda",)
    dispatch_key = "CUDA"
    dtypes = {"attention": _GPU, "layer_norm_residual": _GPU, "feed_forward": _GPU}

    def unavailable_reasons(self):
        reasons = super().unavailable_reasons()
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is visible to torch" if torch.version.cuda
                           else "torch is a CPU-only build")
        elif not reasons and not _extension_has_cuda():
            reasons.append("fused_attn._C was built without CUDA sources (no CUDA toolkit at install time?)")
        return reasons


def _extension_has_cuda() -> bool:
    from .. import _extension
    return _extension.has_kernel("attention_fwd", "CUDA") or _extension.has_kernel("layer_norm_residual_fwd", "CUDA")
