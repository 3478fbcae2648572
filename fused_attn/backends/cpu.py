"""The ``cpu`` backend: C++ kernels in csrc/cpu, registered as ``fused_attn_C::*`` ops."""
from __future__ import annotations

import torch

from .. import _extension
from ..ops_common import register_vmap_slice_by_slice
from .base import Backend, Call

_ALL = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OP_HALVES = {"attention": "attention_fwd", "layer_norm_residual": "layer_norm_residual_fwd",
              "feed_forward": "feed_forward_fwd", "rotary": "rotary"}


class _Entries:
    """The ``fused_attn_C`` ops as the launchers call them: each op's C++ entry point, the
    builtin that ``torch.ops.fused_attn_C.<op>``'s Python ``__call__`` forwards to (``_op``; the
    packet itself where a torch has no such attribute), looked up on first use and then a plain
    attribute. The same dispatch (modes, autograd, vmap; the packet's own test before it is for
    TorchBind arguments, which these ops do not take), without the ~0.2 us of walking
    ``torch.ops`` and the ~0.4 us of that ``__call__`` on every launch, which for a decode-sized
    call is a tenth of the op."""

    def __getattr__(self, name):
        if name.startswith("__"):  # (copy / pickle probing for hooks: not ops)
            raise AttributeError(name)
        packet = getattr(torch.ops.fused_attn_C, name)
        entry = getattr(packet, "_op", packet)
        setattr(self, name, entry)
        return entry


_C_OPS = _Entries()

# The ops that calls under torch.func.vmap hand vmapped tensors to (rotary_out never gets them:
# rotary.rotate computes out of place under the transforms), each given a rule that runs it sample
# by sample as torch's fallback did, without the warning the fallback prints from C++ on every call
# ("There is a performance drop because we have not yet implemented the batching rule for
# fused_attn_C::attention_fwd"), which Python's warnings filters cannot silence.
_VMAPPED_OPS = ("attention_fwd", "attention_bwd", "attention_varlen_fwd", "attention_varlen_bwd",
                "layer_norm_residual_fwd", "layer_norm_residual_bwd", "feed_forward_fwd", "feed_forward_bwd", "rotary")
if _extension._C is not None:
    for _name in _VMAPPED_OPS:
        if hasattr(torch.ops.fused_attn_C, _name):  # (an extension built before the varlen ops has none)
            register_vmap_slice_by_slice(getattr(_C_OPS, _name), f"fused_attn_C::{_name}")


class CompiledBackend(Backend):
    """Shared by ``cpu`` and ``cuda``: both launch the ``fused_attn_C`` ops; the dispatcher picks
    the kernel by the tensors' device."""

    dispatch_key = ""

    def unavailable_reasons(self):
        return [] if _extension._C is not None else [_extension.ERROR or "fused_attn._C is not loaded"]

    def call_reasons(self, call: Call):
        reasons = super().call_reasons(call)
        if not reasons and not _extension.has_kernel(_OP_HALVES[call.op], self.dispatch_key):
            reasons.append(f"fused_attn._C was built without a {self.dispatch_key} kernel for {call.op}")
        return reasons

    def attention_fwd(self, *args):
        return _C_OPS.attention_fwd(*args)

    def attention_bwd(self, *args):
        return _C_OPS.attention_bwd(*args)

    def layer_norm_residual_fwd(self, *args):
        return _C_OPS.layer_norm_residual_fwd(*args)

    def layer_norm_residual_bwd(self, *args):
        return _C_OPS.layer_norm_residual_bwd(*args)

    def feed_forward_fwd(self, *args):
        return _C_OPS.feed_forward_fwd(*args)

    def feed_forward_bwd(self, *args):
        return _C_OPS.feed_forward_bwd(*args)

    def rotary(self, x, cos, sin, positions, interleaved, conjugate, out=None):
        if out is None:
            return _C_OPS.rotary(x, cos, sin, positions, interleaved, conjugate)
        _C_OPS.rotary_out(x, cos, sin, positions, interleaved, conjugate, out)
        return out


class CpuBackend(CompiledBackend):
    name = "cpu"
    devices = ("cpu",)
    dispatch_key = "CPU"
    dtypes = {"attention": _ALL, "layer_norm_residual": _ALL, "feed_forward": _ALL, "rotary": _ALL}

    # Varlen attention: the packed kernels fused_attn_C::attention_varlen_fwd/bwd (csrc/cpu/attention.cpp),
    # every sequence's tiles in one parallel loop, rather than the base class's per-sequence loop, which
    # an extension built before those ops still takes. Only here: the cuda backend (which shares
    # CompiledBackend) has no such kernel and keeps the loop.

    def attention_varlen_fwd(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
                             bottom_right, dropout_p, scale, seed, offset, softcap=0.0, seqused_k=None,
                             alibi_slopes=None):
        args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi, bottom_right,
                dropout_p, scale, seed, offset, softcap, seqused_k, alibi_slopes)
        if not _extension.has_kernel("attention_varlen_fwd", self.dispatch_key):
            return super().attention_varlen_fwd(*args)
        return _C_OPS.attention_varlen_fwd(*args)

    def attention_varlen_bwd(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             band_lo, band_hi, bottom_right, dropout_p, scale, seed, offset, softcap=0.0,
                             seqused_k=None, alibi_slopes=None, dlse=None):
        args = (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
                bottom_right, dropout_p, scale, seed, offset, softcap, seqused_k, alibi_slopes, dlse)
        if not _extension.has_kernel("attention_varlen_bwd", self.dispatch_key):
            return super().attention_varlen_bwd(*args)
        return tuple(_C_OPS.attention_varlen_bwd(*args))
