"""Several linears' weights as one tensor without a copy per call.

One matmul for Q, K and V (``modules.MultiHeadAttention``), or one GEMM over Llama's gate and up
rows (the fused gated FFN), needs the weights stacked. ``torch.cat`` of them at every call copies
them all: for a decoding step, where the matmul itself reads each weight once, that copy costs
more than the matmul (reads and writes every weight again), and in a forward over T tokens it
costs as much memory traffic as the fusion saves until T is about d_model.

So the modules keep such weights *co-located*: ``colocate`` moves their data, in order, into one
buffer (the Parameter objects stay, so optimisers, state dicts and tied names are unaffected),
and ``stacked`` then returns a view of that buffer, with an autograd node that splits the
gradient back into the parameters. Anything that separates them again (``load_state_dict(...,
assign=True)``, FSDP's sharding, a tensor subclass) just makes ``stacked`` fall back to
``torch.cat``: slower, never wrong.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor


def _plain(t) -> bool:
    return type(t) in (Tensor, nn.Parameter) and t.device.type != "meta" and t.is_contiguous()


def adjacent(tensors: Sequence[Tensor]) -> bool:
    """Whether the tensors (contiguous, same dtype, device and trailing shape) lie back to back
    in one storage, in order: then their concatenation along dim 0 is a view of it."""
    first = tensors[0]
    if not all(_plain(t) and t.dtype == first.dtype and t.shape[1:] == first.shape[1:] for t in tensors):
        return False
    base = first.untyped_storage().data_ptr()
    offset = first.storage_offset()
    for t in tensors:
        if t.untyped_storage().data_ptr() != base or t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def colocate(params: Sequence[Optional[Tensor]]) -> bool:
    """Move the data of ``params`` into one contiguous buffer, in order, unless they already lie so
    (values unchanged; the Parameter objects keep their identity). Returns whether they now do.
    Nothing moves when any is None, when they differ in dtype, device or trailing shape, or when
    one is not a plain tensor (a tensor subclass, a meta tensor)."""
    if not params or any(p is None for p in params):
        return False
    first = params[0]
    if not all(type(p) in (Tensor, nn.Parameter) and p.device.type != "meta" and p.dtype == first.dtype
               and p.device == first.device and p.shape[1:] == first.shape[1:] for p in params):
        return False
    if adjacent(params):
        return True
    with torch.no_grad():
        buffer = torch.cat([p.detach().reshape(p.shape) for p in params])
        row = 0
        for p in params:
            p.data = buffer[row:row + p.shape[0]]
            row += p.shape[0]
    return True


class _StackedView(torch.autograd.Function):
    """Forward: the view of the co-located tensors as one (no copy). Backward: the gradient split
    back into theirs (views of it)."""

    @staticmethod
    def forward(ctx, *tensors):
        ctx.rows = [t.shape[0] for t in tensors]
        return _view(tensors)

    @staticmethod
    def backward(ctx, grad):
        return tuple(grad.split(ctx.rows))


def _view(tensors):
    first = tensors[0]
    shape = (sum(t.shape[0] for t in tensors),) + tuple(first.shape[1:])
    return first.as_strided(shape, first.stride() if first.dim() > 1 else (1,), first.storage_offset())


def stacked(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat(tensors)`` (dim 0), as a view when they are ``adjacent`` (no copy)."""
    if len(tensors) == 1:
        return tensors[0]
    if torch.compiler.is_compiling() or not adjacent(tensors):
        return torch.cat(list(tensors))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _StackedView.apply(*tensors)
    return _view(tensors)


__all__ = ["adjacent", "colocate", "stacked"]
