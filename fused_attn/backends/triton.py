"""The ``triton`` backend: Triton kernels in fused_attn/triton, one module per op family.

On CUDA tensors it runs compiled kernels. On CPU tensors it runs only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before fused_attn.triton is imported), which is how the
tests exercise the kernels on machines without a GPU; the interpreter cannot do bfloat16
arithmetic (triton-lang/triton#11584), so bfloat16 on CPU is refused.

Each kernel module (``fused_attn.triton.attention``, ``.layer_norm``, ``.feed_forward``, ``.rotary``) provides
the launchers named in ``backends.base`` and may define ``unsupported_reasons(call)``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from .base import Backend, Call

_MODULES = {"attention": "attention", "layer_norm_residual": "layer_norm", "feed_forward": "feed_forward",
            "rotary": "rotary"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels(op: str):
    """The kernel module of ``op``, imported once (import_module on every launch cost ~5 us; a
    failed import is not cached, so it is retried and reported each time)."""
    return importlib.import_module(f"fused_attn.triton.{_MODULES[op]}")


class TritonBackend(Backend):
    name = "triton"
    dtypes = {"attention": _FLOATS, "layer_norm_residual": _FLOATS, "feed_forward": _FLOATS, "rotary": _FLOATS}
    paged_kv = True  # the varlen forward's PAGED specialisation

    @property
    def devices(self):
        return ("cuda", "cpu") if interpreter_enabled() else ("cuda",)

    def unavailable_reasons(self):
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed (pip install triton)"]
        if not torch.cuda.is_available() and not interpreter_enabled():
            return ["no CUDA device, and TRITON_INTERPRET=1 is not set (the interpreter runs the kernels on CPU)"]
        return []

    def call_reasons(self, call: Call):
        reasons = super().call_reasons(call)
        if call.device.type == "cpu" and call.dtype == torch.bfloat16:
            reasons.append("the Triton interpreter cannot do bfloat16 arithmetic (triton-lang/triton#11584)")
        if call.options.get("torch_func"):
            reasons.append("runs under a torch.func transform (vmap, grad, jacrev, ...), whose wrapped tensors the "
                           "Triton launchers cannot read (the cpu, cuda and reference backends take them)")
        if not reasons:
            try:
                module = _kernels(call.op)
            except ImportError as exc:
                return [f"fused_attn.triton.{_MODULES[call.op]} could not be imported: {exc}"]
            hook = getattr(module, "unsupported_reasons", None)
            if hook is not None:
                reasons.extend(hook(call))
        return reasons

    def attention_fwd(self, *args):
        return _kernels("attention").attention_fwd(*args)

    def attention_bwd(self, *args):
        return _kernels("attention").attention_bwd(*args)

    def attention_varlen_fwd(self, *args, **kwargs):
        return _kernels("attention").attention_varlen_fwd(*args, **kwargs)

    def attention_varlen_bwd(self, *args):
        return _kernels("attention").attention_varlen_bwd(*args)

    def layer_norm_residual_fwd(self, *args):
        return _kernels("layer_norm_residual").layer_norm_residual_fwd(*args)

    def layer_norm_residual_bwd(self, *args):
        return _kernels("layer_norm_residual").layer_norm_residual_bwd(*args)

    def feed_forward_fwd(self, *args):
        return _kernels("feed_forward").feed_forward_fwd(*args)

    def feed_forward_bwd(self, *args):
        return _kernels("feed_forward").feed_forward_bwd(*args)

    def rotary(self, x, cos, sin, positions, interleaved, conjugate, out=None):
        return _kernels("rotary").apply_rotary(x, cos, sin, positions, interleaved=interleaved, conjugate=conjugate,
                                               out=out)
