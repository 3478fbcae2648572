"""The checks at the Triton launchers' entries.

The kernels read and write raw pointers with the sizes and strides the launchers hand them: an
argument of the wrong shape (a mask not expanded to (B, Hq, Lq, Lk), a weight or an lse too short,
positions of the wrong shape), of a dtype the kernel reads as another, or a head count that does
not divide, reads or writes outside its memory (a segfault; on a GPU an illegal address, or other
memory read as values: a wrong answer with no error). The functional API checks all of this before
it calls the ops; these checks are for direct calls of the registered ops
(``torch.ops.fused_attn.*`` with backend "triton"), and mirror the cpu backend's TORCH_CHECKs
(csrc/cpu/*.cpp), with messages naming the argument and what was expected: ValueError for a shape,
a device or a value, TypeError for a dtype (the functional API's convention).

Host work only, a few comparisons of sizes and dtypes per tensor (every launch pays them): no
tensor's values are read (on a GPU that would be a device sync). The data-dependent checks of a
varlen or paged call (cu_seqlens, seqused_k, page numbers) are the op's (``ops_common``), run
unless the caller passes ``checked=True``; rotary positions outside the tables are clamped by the
kernel (``rotary.py``).
"""
from __future__ import annotations

import math

import torch

from ..ops_common import elements_may_overlap

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
#: FLOATS as a set: ``dtype in`` it hashes once, where the tuple compares up to three times (the
#: fast paths below run on every launch; dtypes are singletons, so they also compare with ``is``)
FLOAT_SET = frozenset(FLOATS)
_INDEX_DTYPES = (torch.int32, torch.int64)


def name_of(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def shape_of(t) -> tuple:
    return tuple(t.shape)


def same_device(what: str, ref_name: str, ref: torch.Tensor, tensors: dict) -> None:
    """Every tensor of ``tensors`` (None skipped) on ``ref``'s device (a kernel handed a pointer
    into another device's memory reads garbage or faults)."""
    device = ref.device
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{what}: {name} is on {t.device} but {ref_name} is on {device}")


def on_device(device: int, tensors: dict) -> bool:
    """Whether every tensor of ``tensors`` (None skipped) is on ``device`` (a ``get_device()``)."""
    for t in tensors.values():
        if t is not None and t.get_device() != device:
            return False
    return True


def float_dtype(what: str, name: str, dtype: torch.dtype) -> None:
    if dtype not in FLOATS:
        raise TypeError(f"{what}: {name} must be float16, bfloat16 or float32, got {name_of(dtype)}")


def dropout(what: str, dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{what}: dropout_p must be in [0, 1), got {dropout_p}")


def rows_like(what: str, name: str, t, shape: tuple, shape_name: str, dtype=None, dtype_name: str = "") -> None:
    """``t`` has exactly ``shape`` (named ``shape_name``, e.g. "(B, Hq, Lq, Dv)") and, when
    ``dtype`` is given, that dtype (``dtype_name`` says whose it is, e.g. "q's")."""
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{what}: {name} must have {dtype_name}dtype {name_of(dtype)}, got {name_of(t.dtype)}")
    if t.shape != shape:
        raise ValueError(f"{what}: {name} must have shape {shape_name}{' = ' if shape_name else ''}{tuple(shape)}, got "
                         f"{shape_of(t)}")


def float32_rows(what: str, name: str, t, shape: tuple, shape_name: str, note: str = "") -> None:
    """A float32 tensor of ``shape`` (the lse, the saved statistics)."""
    if t.dtype != torch.float32 or t.shape != shape:
        error = TypeError if t.dtype != torch.float32 else ValueError
        raise error(f"{what}: {name} must be a float32 tensor of shape {shape_name}{' = ' if shape_name else ''}"
                    f"{shape}{note}, got {name_of(t.dtype)} {shape_of(t)}")


def dlse(what: str, dlse_t, lse_shape: tuple) -> None:
    if dlse_t is not None and (dlse_t.dtype != torch.float32 or dlse_t.shape != lse_shape):
        error = TypeError if dlse_t.dtype != torch.float32 else ValueError
        raise error(f"{what}: dlse must be None or a float32 tensor of lse's shape {lse_shape}, got "
                    f"{name_of(dlse_t.dtype)} {shape_of(dlse_t)}")


def options(what: str, dropout_p: float, scale: float, softcap: float) -> None:
    """The scalar options of an attention call (csrc/cpu/attention.cpp's check_options)."""
    dropout(what, dropout_p)
    if not math.isfinite(scale):
        raise ValueError(f"{what}: scale must be finite, got {scale}")
    if not (math.isfinite(softcap) and softcap >= 0.0):
        raise ValueError(f"{what}: softcap must be finite and >= 0 (0 turns the logit cap off), got {softcap}")


def attention_heads(what: str, q, k, v, Hq: int, Hkv: int, max_head_dim: int) -> None:
    """What dense, varlen and paged calls share, once the dims are known to be there: the head
    dims (the last dim of each) against each other and the kernels' limit, and the head counts."""
    D, Dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != D:
        raise ValueError(f"{what}: q and k must have the same head dim, got q {shape_of(q)}, k {shape_of(k)}")
    if Hkv <= 0 or Hq % Hkv:
        raise ValueError(f"{what}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if D > max_head_dim:
        raise ValueError(f"{what}: head dim {D} is above the {max_head_dim} the Triton kernels take (they keep a "
                         f"head in registers)")
    if Dv > max_head_dim:
        raise ValueError(f"{what}: head dim of v {Dv} is above the {max_head_dim} the Triton kernels take (they keep "
                         f"a head in registers)")


def qkv_tensors(what: str, q, k, v, ndim, layout: str = "") -> None:
    """q, k, v ``ndim``-D (``layout`` names their dims; None: checked by the caller), of one
    supported dtype, on one device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if ndim is not None and t.dim() != ndim:
            raise ValueError(f"{what}: {name} must be {ndim}-D {layout}, got shape {shape_of(t)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{what}: {name} has dtype {name_of(t.dtype)} but q has {name_of(q.dtype)}")
    if q.dtype not in FLOATS:
        raise TypeError(f"{what}: q/k/v must be float16, bfloat16 or float32, got {name_of(q.dtype)}")
    same_device(what, "q", q, {"k": k, "v": v})


def alibi(what: str, slopes, shape: tuple, shape_name: str, q) -> None:
    if slopes is None:
        return
    same_device(what, "q", q, {"alibi_slopes": slopes})
    if slopes.dtype != torch.float32:
        raise TypeError(f"{what}: alibi_slopes must be float32, got {name_of(slopes.dtype)}")
    if slopes.shape != shape:
        raise ValueError(f"{what}: alibi_slopes must be a {shape_name} = {shape} tensor (expand a (Hq,) one), got "
                         f"shape {shape_of(slopes)}")


def index_tensor(what: str, name: str, t, n: int, expect: str, ref) -> None:
    """An int32 / int64 1-D tensor of ``n`` entries (n < 0: at least one) on ``ref``'s device."""
    same_device(what, "q", ref, {name: t})
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{what}: {name} must be int32 or int64, got {name_of(t.dtype)}")
    if t.dim() != 1 or (t.shape[0] != n if n >= 0 else t.shape[0] < 1):
        raise ValueError(f"{what}: {name} must be 1-D with {expect} entries, got shape {shape_of(t)}")


def no_overlap(what: str, name: str, t) -> None:
    """``t``, an output written in place, has no two elements in one memory location (programs
    writing one element with different values race)."""
    if not t.is_contiguous() and elements_may_overlap(t):  # (a contiguous tensor never overlaps: one C call)
        raise ValueError(f"{what}: {name} must not have overlapping elements (stride 0 or overlapping strides), got "
                         f"strides {t.stride()}")
