"""The ``cuda`` backend: CUDA C++ kernels in csrc/cuda, for GPUs where Triton is absent or declines."""
from __future__ import annotations

import torch

from .. import _cuda_archs
from .cpu import CompiledBackend

_GPU = (torch.float16, torch.bfloat16, torch.float32)


class CudaBackend(CompiledBackend):
    name = "cuda"
    devices = ("cuda",)
    dispatch_key = "CUDA"
    dtypes = {"attention": _GPU, "layer_norm_residual": _GPU, "feed_forward": _GPU, "rotary": _GPU}

    #: limits of the kernels in csrc/cuda (the ops raise beyond them; auto moves on to the next backend);
    #: below them, a call whose kernels do not fit the device's shared memory per block is declined too
    #: (``shared_memory_reasons``)
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
        if not reasons:  # (a device to ask, and a call inside the limits above)
            reasons.extend(architecture_reasons(call.device))
        if not reasons:
            reasons.extend(shared_memory_reasons(call, shared_memory_limit(call.device)))
        return reasons

    def unavailable_reasons(self):
        reasons = super().unavailable_reasons()
        if not torch.cuda.is_available():
            reasons.append("no CUDA device is visible to torch" if torch.version.cuda
                           else "torch is a CPU-only build")
        elif not reasons and not _extension_has_cuda():
            reasons.append("fused_attn._C was built without CUDA sources (no CUDA toolkit at install time?)")
        elif (not reasons and torch.cuda.is_initialized()
              and not any(map(_runs_on, range(torch.cuda.device_count())))):
            # (only once CUDA is up: asking a capability initialises CUDA, which available_backends()
            # must not do as a side effect, e.g. before a DataLoader forks its workers; every call on a
            # CUDA tensor is checked by call_reasons anyway)
            reasons.extend(architecture_reasons(torch.device("cuda")))
        return reasons


# ---- compute capability: the kernels hold machine code / PTX for fused_attn/_cuda_archs.py only ----
# On any other GPU every launch fails with cudaErrorNoKernelImageForDevice, so such a device is
# declined up front (auto moves on; backend="cuda" raises saying why).

#: the per-device answers of _runs_on (device index -> (capability, whether the build runs there))
_capabilities: dict[int, tuple[tuple[int, int], bool]] = {}


def _capability_of(index: int) -> tuple[tuple[int, int], bool]:
    if index not in _capabilities:
        major, minor = torch.cuda.get_device_capability(index)
        _capabilities[index] = ((major, minor), _cuda_archs.can_run(major, minor))
    return _capabilities[index]


def _runs_on(index: int) -> bool:
    return _capability_of(index)[1]


def architecture_reasons(device: torch.device) -> list[str]:
    """Why fused_attn._C's CUDA kernels cannot run on ``device`` ([]: they can), read once per
    device. Without an index (dispatch decides once per device type) every visible device must run them."""
    indices = [device.index] if device.index is not None else range(torch.cuda.device_count())
    old = []
    for index in indices:
        (major, minor), runs = _capability_of(index)
        if not runs:
            old.append(f"cuda:{index} (sm_{major}{minor})")
    if not old:
        return []
    return [f"{', '.join(old)} cannot run fused_attn._C's CUDA kernels, built as {_cuda_archs.describe()} "
            f"(fused_attn/_cuda_archs.py)"]


# ---- shared memory per block: what the kernels need, what the device gives ------------------------
# Both the forward and the backward of a call must fit, since the call does not say whether a backward
# follows (on sm_86/sm_89, 99 KB a block, float32 attention at the largest head dims only has a
# forward that fits; such a call goes to the next backend whole). The register-resident (mma.sync)
# attention kernels need not fit: where they do not, the shared-memory ones run instead.

#: the per-device answers of _shared_memory_limit_of (device index -> bytes, None when torch does not say)
_limits: dict[int, int | None] = {}


def _shared_memory_limit_of(index: int) -> int | None:
    if index not in _limits:
        props = torch.cuda.get_device_properties(index)
        _limits[index] = getattr(props, "shared_memory_per_block_optin", None)  # (torch < 2.5 may lack it)
    return _limits[index]


def shared_memory_limit(device: torch.device) -> int | None:
    """The opt-in shared memory per block (bytes; cudaDevAttrMaxSharedMemoryPerBlockOptin, what the
    kernels check) of a CUDA device, read once per device. Without an index (dispatch passes the
    device type: it decides once per type) the smallest of the visible devices'. None when unknown."""
    indices = [device.index] if device.index is not None else range(torch.cuda.device_count())
    limits = [limit for limit in map(_shared_memory_limit_of, indices) if limit is not None]
    return min(limits) if limits else None


# Mirrors of the host-side plans in csrc/cuda; change them together (tests/test_cuda_emulated.py
# holds these to the C++ through the CPU emulation of the kernels):
# - attention.cu: kBlockChoices, Carver, FwdSmem::carve, BwdSmem::carve, pick_dims/fwd_plan/bwd_plan;
# - layer_norm.cu: layer_norm_fwd_smem_bytes, layer_norm_bwd_smem_bytes.
_BLOCK_CHOICES = ((64, 64), (64, 32), (32, 32), (16, 16))  # kBlockChoices: (BM, BN), largest first


def _carve(*buffers: tuple[int, int]) -> int:
    """Carver: (count, element size) buffers one after the other, each 128-byte aligned."""
    used = 0
    for count, size in buffers:
        used = (used + 127) // 128 * 128 + count * size
    return used


def attention_tile_bytes(dtype: torch.dtype, head_dim: int, head_dim_v: int, bm: int, bn: int, kernel: str) -> int:
    """The dynamic shared memory of the shared-memory attention kernel ``kernel`` ("fwd", "dkdv" or
    "dq") with BM x BN tiles: FwdSmem<T>::carve / BwdSmem<T>::carve."""
    t = dtype.itemsize
    pad_t, pad_f = (1, 1) if dtype == torch.float32 else (8, 4)  # kPadT<T>, kPadF<T>
    dp, dvp = -(-head_dim // 16) * 16, -(-head_dim_v // 16) * 16
    ldq, ldv, lds, ldp = dp + pad_t, dvp + pad_t, bn + pad_f, bn + pad_t
    if kernel == "fwd":  # q, k, v, p; s, o, row_m, row_l, row_alpha
        return _carve((bm * ldq, t), (bn * ldq, t), (bn * ldv, t), (bm * ldp, t), (bm * lds, 4),
                      (bm * (dvp + pad_f), 4), (bm, 4), (bm, 4), (bm, 4))
    # q, dout, k, v, p, ds; s, dp; the accumulators (dK and dV: BN rows; dQ: BM rows); row_lse, row_delta
    acc = ((bn * (dp + pad_f), 4), (bn * (dvp + pad_f), 4)) if kernel == "dkdv" else ((bm * (dp + pad_f), 4),)
    return _carve((bm * ldq, t), (bm * ldv, t), (bn * ldq, t), (bn * ldv, t), (bm * ldp, t), (bm * ldp, t),
                  (bm * lds, 4), (bm * lds, 4), *acc, (bm, 4), (bm, 4))


def attention_plan(dtype: torch.dtype, head_dim: int, head_dim_v: int, limit: int, backward: bool):
    """fwd_plan / bwd_plan: ((bytes of each kernel launched), (BM, BN)) for the largest tiles whose
    kernels all fit ``limit`` bytes, or None when none do (the kernels raise then)."""
    kernels = ("dkdv", "dq") if backward else ("fwd",)
    for bm, bn in _BLOCK_CHOICES:
        sizes = tuple(attention_tile_bytes(dtype, head_dim, head_dim_v, bm, bn, k) for k in kernels)
        if max(sizes) <= limit:
            return sizes, (bm, bn)
    return None


def attention_shared_memory(dtype: torch.dtype, head_dim: int, head_dim_v: int) -> tuple[int, int]:
    """The fewest bytes of shared memory per block with which (forward, backward) plan at all: the
    largest kernel of the smallest tiles."""
    def need(kernels):
        return min(max(attention_tile_bytes(dtype, head_dim, head_dim_v, bm, bn, k) for k in kernels)
                   for bm, bn in _BLOCK_CHOICES)
    return need(("fwd",)), need(("dkdv", "dq"))


def layer_norm_shared_memory(hidden: int) -> tuple[int, int]:
    """(forward, backward) bytes of the layer-norm kernels: the row / 2 rows of partials, 32 floats more."""
    return (hidden + 32) * 4, (2 * hidden + 32) * 4


def shared_memory_reasons(call, limit: int | None) -> list[str]:
    """Why the kernels of ``call`` cannot fit ``limit`` bytes of shared memory per block ([]: they can,
    or the limit is unknown)."""
    if limit is None:
        return []
    opts = call.options
    if call.op == "attention":
        dims = (opts.get("head_dim", 0), opts.get("head_dim_v", 0))
        fwd, bwd = attention_shared_memory(call.dtype, *dims)
        what = f"{str(call.dtype).replace('torch.', '')} attention at head dims {dims[0]}/{dims[1]}"
        tiles = ", at the smallest tiles"
    elif call.op == "layer_norm_residual":
        fwd, bwd = layer_norm_shared_memory(opts.get("hidden", 0))
        what, tiles = f"layer_norm_residual at hidden size {opts.get('hidden', 0)}", ""
    else:
        return []
    if max(fwd, bwd) <= limit:
        return []
    where = f"cuda:{call.device.index}" if call.device.index is not None else "the smallest visible CUDA device"
    return [f"{what} needs {max(fwd, bwd)} bytes of shared memory per block (forward {fwd}, backward {bwd}"
            f"{tiles}), more than the {limit} a block may opt in to on {where}"]


def _extension_has_cuda() -> bool:
    from .. import _extension
    return _extension.has_kernel("attention_fwd", "CUDA") or _extension.has_kernel("layer_norm_residual_fwd", "CUDA")
