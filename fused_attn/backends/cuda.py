"""The ``cuda`` backend: CUDA C++ kernels in csrc/cuda, for GPUs where Triton is absent or declines."""
from __future__ import annotations

import torch

from .cpu import CompiledBackend

_GPU = (torch.float16, torch.bfloat16, torch.float32)


class CudaBackend(CompiledBackend):
    name = "cuda"
    devices = ("cuda",)
    dispatch_key = "CUDA"
    dtypes = {"attention": _GPU, "layer_norm_residual": _GPU, "feed_forward": _GPU, "rotary": _GPU}

    #: limits of the kernels in csrc/cuda (the ops raise beyond them; auto moves on to the next backend)
    max_head_dim = 256
    max_hidden = 16384  # layer_norm_residual keeps a row (forward) / 2 rows of partials (backward) in shared memory

    def call_reasons(self, call):
        reasons = super().call_reasons(call)
        opts = call.options
        if call.op == "attention":
            for key in ("head_dim", "head_dim_v"):
                if opts.get(key, 0) > self.max_head_dim:
                    reasons.append(f"{key} {opts[key]} > {self.max_head_dim}")
        elif call.op == "layer_norm_residual" and opts.get("hidden", 0) > self.max_hidden:
            reasons.append(f"hidden size {opts['hidden']} > {self.max_hidden}")
        return reasons

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
