"""Rotary position embedding (RoPE), FlashAttention's ``apply_rotary_emb``, forward and backward.

RoPE encodes a token's position p by turning each pair of its query/key features by an angle
p * theta_i (theta_i = base^(-2i/R)), so that q.k depends on positions only through their
difference. The caller supplies the angles' cosines and sines as (S, R/2) tables, row p for
position p, as FlashAttention's ``apply_rotary_emb`` and its ``RotaryEmbedding`` build them:

    inv_freq = 1 / base ** (torch.arange(0, R, 2) / R)        # (R/2,)
    angles = torch.outer(torch.arange(S), inv_freq)           # (S, R/2)
    cos, sin = angles.cos(), angles.sin()

A pair (x1, x2) becomes (x1 cos - x2 sin, x1 sin + x2 cos); the pairs are features (i, i + R/2)
(GPT-NeoX, Llama: ``interleaved=False``) or (2i, 2i + 1) (GPT-J: ``interleaved=True``). Only the
first R features of a head turn (partial rotary, R < D: GPT-NeoX, Phi); the rest are copied.

A rotation's transpose is its inverse, so the backward is the same kernel with sin negated: only
the tables and positions are saved. Every backend computes in float32 (float64 for float64
inputs) and rounds once; the ``cpu`` backend is ``fused_attn_C::rotary`` (csrc/cpu/rotary.cpp),
``triton`` is ``fused_attn.triton.rotary``, ``cuda`` csrc/cuda/rotary.cu, ``reference`` the
textbook formula (``fused_attn.reference.rotary``).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor
from torch._C import _autograd, _functorch

from .backends import check_backend_name, resolve_options
from .functional import (NESTED_ROTARY, _check_bool, _check_index_tensor, _check_tensor, _concrete, _dtype_name,
                         _needs_grad, _refuse_dtensor, _shown)
from .ops import RotaryFunction, inference_call_ok, rotary_inference, why_differentiated
from .ops_common import (as_int, check_cumulative, check_longest, check_traced, elements_may_overlap, exporting, is_int,
                         known_true, no_data)


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: Union[int, Tensor] = 0, cu_seqlens: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None, *, position_ids: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> Tensor:
    """Rotary position embedding of ``x`` (FlashAttention's ``apply_rotary_emb``, its arguments in
    its order), differentiable.

    Args:
        x: (B, L, H, D) queries or keys, layout (batch, seqlen, heads, dim); with ``cu_seqlens``
            a packed (total, H, D) tensor of sequences back to back (also with ``position_ids``:
            (total, H, D) tokens at the given positions). Any strides.
        cos, sin: (S, R/2) tables of the rotation angles' cosines and sines, row p for position
            p; R = 2 * cos.shape[1] <= D features of each head turn, the rest pass unchanged. Any
            floating dtype, one for both (computed in float32 whatever it is, float64 for a float64
            x). They get no gradient: tables that require grad raise while grad mode is on.
        interleaved: pairs (2i, 2i + 1) (GPT-J) instead of (i, i + R/2) (GPT-NeoX, Llama).
        inplace: write the result into x and return x (FlashAttention's): no second tensor of x's
            size. x must have no overlapping elements; under autograd x is marked modified, as by
            any in-place op (a leaf that requires grad cannot be), and its version counter is
            bumped with or without autograd (a graph that saved x raises at backward).
        seqlen_offsets: an int, or an int32/int64 (B,) tensor: token t of sequence b is at
            position ``seqlen_offsets[b] + t`` (decoding with a KV cache: the keys already there).
        cu_seqlens: int32/int64 (B + 1,) cumulative lengths of the packed sequences of a 3-D x
            (``attention_varlen``'s); positions restart at each sequence's start.
        max_seqlen: accepted for FlashAttention compatibility (an int >= the longest sequence);
            not needed here.
        position_ids: instead of the offsets, each token's position (Hugging Face's): an int
            tensor of x's leading shape ((B, L), or (total,) for a 3-D x) or one that broadcasts
            to it, e.g. (1, L). Left-padded batches take their own positions this way.
        backend: as for the other functional calls.

    Returns a new tensor of x's shape and dtype (x's layout when x is dense), or x with ``inplace``.

    Every position must index a table row, 0 <= p < S: checked on the host outside
    torch.compile when the positions come from an int offset (no device read) or live on the CPU;
    on a GPU and under torch.compile, with ``torch._assert_async`` (a device-side assert).
    """
    compiling = torch.compiler.is_compiling()
    _check_tensor("x", x, nested=NESTED_ROTARY)
    _refuse_dtensor("apply_rotary_emb", x=x, cos=cos, sin=sin)
    packed = cu_seqlens is not None
    if packed and x.dim() != 3:
        raise ValueError(f"x must be 3-D (total, H, D) with cu_seqlens, got shape {tuple(x.shape)}")
    if not packed and x.dim() != 4 and not (x.dim() == 3 and position_ids is not None):
        raise ValueError(f"x must be 4-D (B, L, H, D) (3-D (total, H, D) with cu_seqlens or position_ids), got "
                         f"shape {tuple(x.shape)}")
    half = check_tables(cos, sin, x)
    _check_bool("interleaved", interleaved)
    _check_bool("inplace", inplace)
    _check_max_seqlen(max_seqlen)  # (checked with or without cu_seqlens, though only packed calls use it)
    if inplace:
        check_inplace_write(x, compiling)
    check_backend_name(backend)
    if position_ids is not None and (packed or not _is_zero(seqlen_offsets)):
        raise ValueError("position_ids gives every token's position: it cannot be combined with seqlen_offsets "
                         "or cu_seqlens")
    x4 = x.unsqueeze(0) if x.dim() == 3 else x  # (B, L, H, D); packed or a flat (total, H, D): B = 1
    B, L = x4.shape[:2]
    int_offset = is_int(seqlen_offsets) and position_ids is None
    # An int offset is checked before the positions are formed from it (an int past int64 overflowed
    # there): known without reading a tensor, in full for (B, L, H, D) x; packed, each sequence's
    # first token must sit on a row (the rest: check_positions).
    # Under torch.compile L may be a size Dynamo cannot guard on (marked unbacked): known_true
    # leaves undecided what it cannot decide, and the bound is then asserted when the graph runs.
    if int_offset and not packed and (seqlen_offsets < 0 or (known_true(L != 0)
                                                             and known_true(seqlen_offsets + L > cos.shape[0]))):
        raise ValueError(f"seqlen_offsets = {_shown(seqlen_offsets)} puts the {L} tokens at positions "
                         f"{_shown(seqlen_offsets)}..{_shown(seqlen_offsets + L - 1)}, outside the {cos.shape[0]} rows "
                         f"of cos and sin")
    if int_offset and not packed and compiling:
        # (| rather than or: no bool of the parts; a message of constants: Dynamo converts no
        # closure over the sizes)
        check_traced((L == 0) | (seqlen_offsets + L <= cos.shape[0]),
                     "apply_rotary_emb: seqlen_offsets puts the tokens past the rows of cos and sin")
    # (packed: the positions are checked after, each sequence's first token here where it is known)
    if int_offset and packed and (seqlen_offsets < 0 or (known_true(x.shape[0] != 0)
                                                         and known_true(seqlen_offsets >= cos.shape[0]))):
        raise ValueError(f"seqlen_offsets = {_shown(seqlen_offsets)} puts each sequence's first token at position "
                         f"{_shown(seqlen_offsets)}, outside the {cos.shape[0]} rows of cos and sin")
    # Nothing is read on the host under torch.compile, nor from meta or fake tensors (shapes
    # without data), which take the compiled path: positions asserted on the device (a no-op there).
    no_read = compiling or no_data(x)
    if position_ids is not None:
        positions = _positions_from_ids(position_ids, x.shape[:-2], x.device)
    elif packed:
        positions = _packed_positions(cu_seqlens, seqlen_offsets, max_seqlen, x.shape[0], x.device, no_read)
    else:
        positions = _offset_positions(seqlen_offsets, B, L, x.device)
    if not (int_offset and not packed):
        check_positions(positions, cos.shape[0], "the positions", no_read)
    name = resolve_rotary(x, half, backend)
    if inplace:  # into x through x4 (x itself, or a view of it)
        rotate(x4, cos, sin, positions, interleaved, name, inplace=True)
        return x
    out = rotate(x4, cos, sin, positions, interleaved, name)
    return out.view(x.shape) if x.dim() == 3 else out


# torch's message for an in-place update of an inference tensor outside inference mode (its
# check_inplace, VariableTypeUtils.h), word for word
INFERENCE_INPLACE_ERROR = ("Inplace update to inference tensor outside InferenceMode is not allowed.You can make a "
                           "clone to get a normal tensor before doing inplace update.See "
                           "https://github.com/pytorch/rfcs/pull/17 for more details.")


def check_inplace_write(x: Tensor, compiling: bool, name: str = "x") -> None:
    """Every refusal of an in-place write into ``x`` (``apply_rotary_emb(inplace=True)``, and the
    FlashAttention stand-in's ``RotaryEmbedding``, which writes kv first and q's packed qkv last:
    checked before either write), raised before anything is written."""
    if not compiling and elements_may_overlap(x):
        raise ValueError(f"inplace=True writes into {name}, whose elements overlap (strides {x.stride()}, e.g. an "
                         f"expanded tensor): pass a tensor with its own storage per element, or inplace=False")
    if not compiling and x.is_inference() and not torch.is_inference_mode_enabled():
        # torch refuses an in-place op on an inference tensor outside inference mode (x.mul_()
        # raises this); the kernels write through x's data pointer, past that check, and only the
        # reference backend's torch ops raised it. (Not under torch.compile: Dynamo traces no
        # is_inference(), and a compiled x.mul_() does not refuse one either.)
        raise RuntimeError(INFERENCE_INPLACE_ERROR)
    # Autograd's refusals, with torch's own error: x a leaf that requires grad (grad mode on), a
    # view of one, or a view autograd cannot rebase (a multi-output view, ``unbind``'s; one created
    # under no_grad). Autograd checks an in-place op only when the op records itself: the kernels
    # write through x's data pointer first (and the Function's ``mark_dirty`` checks after its
    # forward), so the refused call had already turned x. Any other x passes untouched. (Not under
    # torch.compile: its trace, on fake tensors, raises torch's error before the graph runs.)
    if compiling or not (torch.is_grad_enabled() and x.requires_grad):
        return
    if x.is_leaf or (x._is_view() and (x._base.is_leaf or _autograd._get_creation_meta(x)
                                       != _autograd.CreationMeta.DEFAULT)):
        # An in-place op that writes nothing (an empty index) runs autograd's check on x itself,
        # which raises the message torch gives for this x (x.mul_(2) would give the same one)
        x.index_fill_(-1, torch.empty(0, dtype=torch.int64, device=x.device), 0)


def resolve_rotary(x: Tensor, half: int, backend: Optional[str]) -> str:
    """The backend that turns x with R = 2 * half (under torch.compile resolved at trace time, on
    the sizes specialised)."""
    D = x.shape[-1]
    if torch.compiler.is_compiling():
        D, half = _concrete(D), _concrete(half)
    return resolve_options("rotary", x.device, x.dtype, (("head_dim", D), ("rotary_dim", 2 * half)), backend)


# torch.compile before torch 2.13 (seen on 2.11) loses the backward of an autograd Function that
# marks its input dirty when the code goes on with that input rather than the Function's output
# (``RotaryFunction.apply(y, ...); return y``, as the in-place embedding does): a wrong input
# gradient, the forward right. Such calls take out of place + copy_ there, which it differentiates.
_COMPILE_DROPS_DIRTY_BACKWARD = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


def rotate(x4: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, backend: str,
           inplace: bool = False) -> Tensor:
    """The embedding of checked inputs: x4 (B, L, H, D), positions (B, L) in range, ``backend``
    resolved (also ``attention_with_kvcache``'s path, which checks its positions itself)."""
    compiling = torch.compiler.is_compiling()
    if inplace and (torch._C._are_functorch_transforms_active()
                    or (not compiling and (x4.is_neg() or torch._C._len_torch_dispatch_stack()))
                    or (compiling and _COMPILE_DROPS_DIRTY_BACKWARD and _needs_grad(x4, cos, sin))
                    or exporting()):
        # Under torch.func's transforms, out of place and then copied into x4: vmap's fallback
        # runs no out= kernel (the cpu and cuda backends write x through fused_attn_C::rotary_out),
        # and torch's generated vmap rule refuses an in-place autograd Function under vmap(grad)
        # ("marked as dirty ... not returned"); copy_ is an in-place op every transform takes.
        # So for an x4 with the negative bit (``z.conj().imag``: its memory holds -x4): the
        # dispatcher's Negative fallback cannot write such an argument of an op that does not
        # return it (fused_attn_C::rotary_out and fused_attn::rotary_ return nothing: an internal
        # assert, or "Expected Tensor but got None"), and copy_ writes the values through the bit.
        # (Not asked under torch.compile: Dynamo cannot trace is_neg(), and Inductor reads such a
        # graph input negated anyway: README, Semantics, Strides.) So while a TorchDispatchMode is
        # active (eager; a count, as cheap as is_neg()): a mode sees a registered op only after its
        # ADInplaceOrView kernel has bumped x's version, and allow_mutation_on_saved_tensors()'s
        # mode looks a mutated tensor up by its version to clone it for the graphs that saved it:
        # it found nothing, and such a graph read the turned x (a silently wrong gradient). copy_
        # reaches the mode first, as x.mul_() does. And under torch.compile before
        # torch 2.13, whose graphs dropped the Function's backward (_COMPILE_DROPS_DIRTY_BACKWARD).
        # And under torch.export, whose program is differentiated by the out-of-place op's own
        # formula (see ops, ``_register_autograd``; the mutating op has none), with or without a gradient at export.
        return x4.copy_(rotate(x4, cos, sin, positions, interleaved, backend))
    if inference_call_ok(x4, cos, sin):
        return rotary_inference(x4, cos, sin, positions, interleaved, backend, inplace)
    if inplace and not _needs_grad(x4, cos, sin):  # traced without a graph to record: the mutating op alone
        torch.ops.fused_attn.rotary_(x4, cos, sin, positions, interleaved, False, backend)
        return x4
    if exporting():  # (the Function's forward: an exported program differentiates its ops; see ops)
        return RotaryFunction.forward(x4, cos, sin, positions, interleaved, backend, inplace)
    return RotaryFunction.apply(x4, cos, sin, positions, interleaved, backend, inplace)


def rotate_token_tables(tensors, cos: Tensor, sin: Tensor, backend: Optional[str] = None) -> tuple:
    """Each (B, L, H, D) tensor (queries and keys: any head counts, one dtype) turned by per-token
    angles: cos, sin (Bc, L, D/2) with Bc = 1 or B, token (b, l) taking row (b if Bc == B else 0, l)
    (Hugging Face's cos/sin, their first halves). The rows become one (Bc * L, D/2) table, each token
    the position of its own row, found once for all the tensors: no position can fall outside, none
    is checked. The caller checks the shapes."""
    x4 = tensors[0]
    Bc, L, half = cos.shape
    positions = torch.arange(Bc * L, device=x4.device).view(Bc, L).expand(x4.shape[0], L)
    name = resolve_rotary(x4, half, backend)
    cos, sin = cos.reshape(-1, half), sin.reshape(-1, half)
    return tuple(rotate(t, cos, sin, positions, False, name) for t in tensors)


def rotate_packed(tensors, cos: Tensor, sin: Tensor, cu_seqlens: Tensor, max_seqlen: Optional[int],
                  backend: Optional[str] = None) -> tuple:
    """Each packed (total, H, D) tensor of the same sequences (queries and keys) turned by the (S,
    R/2) tables, each sequence's tokens at positions 0, 1, ...: the positions found once for all
    the tensors (``cu_seqlens`` read and checked once, outside torch.compile), then checked
    against the tables' rows (on the device on a GPU and under torch.compile)."""
    x = tensors[0]
    no_read = torch.compiler.is_compiling() or no_data(x)  # (as in apply_rotary_emb)
    _check_max_seqlen(max_seqlen)
    positions = _packed_positions(cu_seqlens, 0, max_seqlen, x.shape[0], x.device, no_read)
    check_positions(positions, cos.shape[0], "the positions", no_read)
    name = resolve_rotary(x, cos.shape[1], backend)
    return tuple(rotate(t[None], cos, sin, positions, False, name)[0] for t in tensors)


def check_tables(cos, sin, x: Tensor, names=("cos", "sin", "x")) -> int:
    """The checks of the (S, R/2) tables against x (..., D); returns R/2."""
    cname, sname, xname = names
    _check_tensor(cname, cos, ndim=2)
    _check_tensor(sname, sin, ndim=2)
    if sin.shape != cos.shape:
        raise ValueError(f"{cname} and {sname} must have the same shape (S, R/2), got {tuple(cos.shape)} and "
                         f"{tuple(sin.shape)}")
    if sin.dtype != cos.dtype:
        raise TypeError(f"{cname} and {sname} must share a dtype, got {_dtype_name(cos.dtype)} and "
                        f"{_dtype_name(sin.dtype)}")
    for name, t in ((cname, cos), (sname, sin)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but {xname} is on {x.device}")
        why = why_differentiated(t)  # (forward mode too: the tables' tangent would be silently zero)
        if why:
            raise ValueError(f"{name} {why}, but the rotary tables get no gradient (as FlashAttention's): "
                             f"pass {name}.detach(), or compute the embedding with torch ops to learn the angles")
    half, D = cos.shape[1], x.shape[-1]
    if half < 1 or 2 * half > D:
        raise ValueError(f"{cname} and {sname} must have between 1 and D/2 = {D // 2} columns (the rotary dim R "
                         f"is twice their width and at most {xname}'s head dim D = {D}), got shape "
                         f"{tuple(cos.shape)}")
    return half


def _is_zero(offsets) -> bool:
    return is_int(offsets) and known_true(offsets == 0)  # (a traced size it cannot decide: not 0)


def _offset_positions(seqlen_offsets, B: int, L: int, device) -> Tensor:
    """(B, L) positions seqlen_offsets[b] + l (an int offset: one row, expanded over the batch)."""
    steps = torch.arange(L, device=device, dtype=torch.int64)
    if isinstance(seqlen_offsets, Tensor):
        _check_index_tensor("seqlen_offsets", seqlen_offsets, B, device, ref="x")
        return seqlen_offsets.long()[:, None] + steps
    if not is_int(seqlen_offsets):
        raise TypeError(f"seqlen_offsets must be an int or an int32/int64 ({B},) tensor, got "
                        f"{type(seqlen_offsets).__name__}")
    return (steps + as_int(seqlen_offsets)).expand(B, L)


def _check_max_seqlen(max_seqlen) -> None:
    if max_seqlen is None:
        return
    if not is_int(max_seqlen):
        raise TypeError(f"max_seqlen must be None or an int >= 0, got {max_seqlen!r}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be None or an int >= 0, got {max_seqlen!r}")


def _packed_positions(cu_seqlens, seqlen_offsets, max_seqlen, total: int, device, no_read: bool) -> Tensor:
    """(1, total) positions of packed sequences: token t of the sequence s holding it is at
    t - cu_seqlens[s] + seqlen_offsets[s]. Found on the device (searchsorted), no host read; the
    boundaries are read on the host to be checked unless ``no_read`` (torch.compile, meta or fake
    tensors: ``apply_rotary_emb``)."""
    _check_index_tensor("cu_seqlens", cu_seqlens, None, device, ref="x")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
    batch = cu_seqlens.shape[0] - 1
    if not no_read:
        lengths = check_cumulative("cu_seqlens", cu_seqlens.tolist(), total, " (x.shape[0])")
        check_longest("max_seqlen", max_seqlen, lengths, "cu_seqlens")
    token = torch.arange(total, device=device, dtype=torch.int64)
    cu = cu_seqlens.long()
    # The sequence of each token: searchsorted over all B + 1 boundaries counts cu_seqlens[0] = 0 too,
    # one more than over cu[1:]. The whole tensor, not the slice: torch.export guards on a (B,)
    # slice's size being 1 (one sequence), which a dynamic number of sequences cannot satisfy.
    # (Two clamps, not max(batch - 1, 0): a Python max of a symbolic size is a guard too.)
    seq = (torch.searchsorted(cu, token, right=True) - 1).clamp_(max=batch - 1).clamp_(min=0)
    positions = token - cu[seq]
    if isinstance(seqlen_offsets, Tensor):
        _check_index_tensor("seqlen_offsets", seqlen_offsets, batch, device, ref="x")
        positions = positions + seqlen_offsets.long()[seq]
    elif not is_int(seqlen_offsets):
        raise TypeError(f"seqlen_offsets must be an int or an int32/int64 ({batch},) tensor, got "
                        f"{type(seqlen_offsets).__name__}")
    elif isinstance(seqlen_offsets, torch.SymInt) or seqlen_offsets:  # (a traced one added: no guard on it)
        positions = positions + as_int(seqlen_offsets)
    return positions[None]


def _positions_from_ids(position_ids, lead_shape, device) -> Tensor:
    """position_ids broadcast (a stride-0 view) to x's leading shape, as (B, L)."""
    _check_index_tensor("position_ids", position_ids, None, device, ref="x")
    try:
        ids = position_ids.expand(lead_shape)
    except RuntimeError:
        raise ValueError(f"position_ids must broadcast to x's leading shape {tuple(lead_shape)}, got shape "
                         f"{tuple(position_ids.shape)}") from None
    return ids if ids.dim() == 2 else ids[None]


def check_positions(positions: Tensor, rows: int, what: str, no_read: bool) -> None:
    """0 <= every position < rows: read on the host for CPU tensors, else (and with ``no_read``:
    torch.compile, meta or fake tensors) asserted on the device (no sync). (An empty tensor passes
    the assert: under torch.compile its size, perhaps unbacked, is not tested.)"""
    if not no_read and positions.numel() == 0:
        return
    if no_read or positions.device.type != "cpu":
        torch._assert_async(((positions >= 0) & (positions < rows)).all(),
                            f"apply_rotary_emb: {what} must index the rows of cos and sin")
        return
    # Under torch.func's transforms (vmap over per-sample seqlen_offsets or position_ids) the
    # positions are wrapped, and vmap refuses to read a batched value on the host: the values
    # under the wrappers, every sample's positions at once, are read instead.
    while _functorch.is_functorch_wrapped_tensor(positions):
        positions = _functorch.get_unwrapped(positions)
    low, high = int(positions.min()), int(positions.max())
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(f"{what} reach position {bad}, outside the {rows} rows of cos and sin")
