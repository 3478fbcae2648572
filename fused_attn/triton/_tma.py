"""Tensor-memory-accelerator (TMA) descriptors for the Triton kernels' Hopper path.

On sm_90 and newer a kernel can copy a whole tile from global to shared memory with one
instruction of the copy engine (``UTMALDG``), described by a *tensor descriptor*: base address,
shape, strides and the box (tile) shape. The kernels here take host-side descriptors
(``triton.tools.tensor_descriptor.TensorDescriptor``, Triton >= 3.4) next to the plain pointers
of the same tensors and a constexpr that says which to read; a configuration's pre-hook sets the
box to its tiles. The copy engine zero-fills a box where it runs past the tensor, so the loads
need neither masks nor per-thread address arithmetic.

``FUSED_ATTN_TRITON_TMA`` selects the use: "off" (the default: pointer loads only), "auto" (on
sm_90+ the autotuners time the TMA configurations beside the pointer ones and keep the faster)
or "on" (TMA wherever the operands allow it, also under the interpreter, which runs descriptor
loads too: that is how the CPU tests cover the path).

Why "off" by default: measured on an H200 (Triton 3.6, bf16, 2026-11-29), "auto" was never
clearly faster and often slower than the pointer path: attention forward B32 H16 L512 D128
0.281 vs 0.192 ms, B16 L1024 0.416 vs 0.309 ms, B4 L4096 1.133 vs 1.155 ms (forward + backward
5.62 vs 5.45 ms); feed-forward T8192 d1024 ff4096 forward 0.756 vs 0.339 ms, backward 2.36 vs
1.69 ms (docs/results/gpu-2026-11-29). The autotuner's own timings picked TMA configurations
that then ran slower, and every call pays for building the descriptors on the host.
"""
from __future__ import annotations

import torch

from .._extension import env_get
from ..backends.triton import interpreter_enabled

try:  # host-side descriptors (Triton >= 3.4); without them only the pointer paths exist
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - old Triton
    TensorDescriptor = None

#: for isinstance checks (empty when this Triton has no descriptors: nothing matches)
DESCRIPTOR_TYPES = (TensorDescriptor,) if TensorDescriptor is not None else ()


def _interpreting() -> bool:
    return interpreter_enabled()


_TMA_MODES: dict = {}  # raw setting -> mode: the variable is read on every launch, parsed once per value


def tma_mode() -> str:
    """"off" (default), "auto" or "on", from ``FUSED_ATTN_TRITON_TMA`` (also 1/0, true/false); a
    change takes effect on the next launch."""
    raw = env_get("FUSED_ATTN_TRITON_TMA", "off")  # (os.environ's, as one lookup: every launch asks)
    mode = _TMA_MODES.get(raw)
    if mode is None:
        value = raw.strip().lower()
        mode = {"1": "on", "true": "on", "0": "off", "false": "off", "": "off"}.get(value, value)
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"FUSED_ATTN_TRITON_TMA must be one of auto, on, off (or 1/0); got {raw!r}")
        _TMA_MODES[raw] = mode
    return mode


def tma_wanted(t: torch.Tensor) -> bool:
    """Whether kernels reading ``t`` should be given descriptors: a CUDA device of compute
    capability 9.0 or newer (or the interpreter with the mode "on"), unless the mode is "off"."""
    mode = tma_mode()
    if mode == "off" or TensorDescriptor is None:
        return False
    if _interpreting():
        return mode == "on"
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def descriptor(t: torch.Tensor):
    """A descriptor over ``t`` (rank 1-5), or None when the copy engine cannot address it. TMA
    needs a 16-byte aligned base, a unit stride along the last dim and the other strides positive
    multiples of 16 bytes; only 16-bit floats qualify here (float32 runs IEEE dots off the tensor
    cores, where TMA buys nothing). Dims of size 1 are never stepped, so their stride (anything,
    after a slice or an expand) is replaced by a well-formed one. The box is a placeholder until a
    configuration's pre-hook sets it."""
    if TensorDescriptor is None or t.dtype not in (torch.float16, torch.bfloat16) or not 1 <= t.dim() <= 5:
        return None
    if t.numel() == 0 or t.stride(-1) != 1 or t.data_ptr() % 16:
        return None
    elem = t.element_size()
    strides = list(t.stride())
    for i in range(t.dim() - 2, -1, -1):
        if t.shape[i] == 1:
            span = max(strides[j] * t.shape[j] for j in range(i + 1, t.dim()))
            strides[i] = -(-span // (16 // elem)) * (16 // elem)
        if strides[i] <= 0 or (strides[i] * elem) % 16:
            return None
    return TensorDescriptor(t, list(t.shape), strides, [1] * (t.dim() - 1) + [16])


def descriptors(*tensors, tma=None):
    """(descriptor or tensor, ..., TMA_KEY): descriptors of all ``tensors`` when TMA is wanted
    (``tma`` None: ``tma_wanted`` of the first) and each can have one; else the tensors themselves
    (placeholders the kernel does not read). TMA_KEY, an autotuning key, tells the configuration
    prune what it may keep: 0 pointer configurations, 1 both kinds, 2 TMA ones only (mode "on");
    keying on it keeps a choice made for descriptors from being replayed on a call without them."""
    if tma is None:
        tma = tma_wanted(tensors[0])
    if tma:
        descs = [descriptor(t) for t in tensors]
        if all(d is not None for d in descs):
            return (*descs, 2 if tma_mode() == "on" else 1)
    return (*tensors, 0)
