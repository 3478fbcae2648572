"""xformers' ``memory_efficient_attention`` and its attention-bias classes on fused_attn's kernels,
so code written against ``xformers.ops`` runs unchanged on CPUs and on GPUs without xformers::

    from fused_attn.integrations import xformers as xops
    out = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())  # (B, M, H, K)

    fused_attn.patch_xformers()        # ``import xformers.ops`` now finds this module

xformers' conventions: tensors (B, M, H, K) (also (B, M, K) without heads, and (B, M, G, H, K)
for grouped-query attention, keys and values expanded over H); ``attn_bias`` a float tensor added
to the logits (broadcastable to (B, H, M, N), its gradient computed when it requires grad) or one
of the classes below, which the kernels apply without a mask in memory:

- ``LowerTriangularMask`` (causal, top-left: query i sees keys j <= i), ``.add_bias(t)`` ->
  ``LowerTriangularMaskWithTensorBias``; ``LowerTriangularFromBottomRightMask`` (the last query
  sees the last key); ``LowerTriangularFromBottomRightLocalAttentionMask(window_size)`` (and each
  query only its last ``window_size`` keys);
- ``BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen=None)`` / ``.from_tensor_list(tensors)`` /
  ``.from_tensor_lists_qkv(...)``: sequences packed along M of a batch of one, each attending only
  itself (``attention_varlen``), ``.split(out)`` undoing the packing; ``.make_causal()``,
  ``.make_causal_from_bottomright()``, ``.make_local_attention(w)``,
  ``.make_local_attention_from_bottomright(w)`` and the matching ``BlockDiagonalCausal*`` classes;
- ``LocalAttentionFromBottomRightMask(window_left, window_right)``: a bottom-right band;
- ``BlockDiagonalPaddedKeysMask`` / ``BlockDiagonalCausalWithOffsetPaddedKeysMask``
  ``.from_seqlens(q_seqlen, kv_padding, kv_seqlen)``: packed queries against keys in slots of
  ``kv_padding`` rows, sequence b using the first ``kv_seqlen[b]`` (the latter causal from the
  bottom right: decoding against a padded KV cache).

Every class has ``materialize(shape, dtype, device)``, the dense additive bias, for tests, and
``to(device)``; the sequence infos have xformers' ``seqstart`` / ``seqstart_py`` / ``seqlen`` /
``max_seqlen``. ``op`` is accepted and ignored (fused_attn picks its own kernel; the
``MemoryEfficientAttention*Op`` names exist so that code passing them runs); ``output_dtype``
casts the output. ``memory_efficient_attention_partial`` also returns the lse (-inf on rows
that see no key, as xformers), which ``merge_attentions`` combines. Rows that see no key give zeros, also where xformers refuses the layout (a
bottom-right block with more queries than keys). Not here: paged and "gappy" key masks,
``causal_diagonal``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import reference as R
from ..functional import _check_bool, _check_prob, attention, attention_varlen, merge_attention
from ._shapes import check_shapes
from ._stand_in import StandInModules

__all__ = ["memory_efficient_attention", "memory_efficient_attention_forward", "AttentionBias",
           "LowerTriangularMask", "LowerTriangularMaskWithTensorBias", "LowerTriangularFromBottomRightMask",
           "LowerTriangularFromBottomRightLocalAttentionMask", "BlockDiagonalMask", "BlockDiagonalCausalMask",
           "BlockDiagonalCausalFromBottomRightMask", "BlockDiagonalCausalLocalAttentionMask",
           "BlockDiagonalCausalLocalAttentionFromBottomRightMask", "BlockDiagonalPaddedKeysMask",
           "BlockDiagonalCausalWithOffsetPaddedKeysMask", "LocalAttentionFromBottomRightMask", "unbind",
           "MemoryEfficientAttentionFlashAttentionOp", "MemoryEfficientAttentionCutlassOp",
           "MemoryEfficientAttentionCutlassFwdFlashBwOp", "memory_efficient_attention_partial", "merge_attentions",
           "patch_xformers"]

XFORMERS_VERSION = "0.0.28+fused_attn"


def _count(name: str, value, minimum: int, bound: Optional[str] = None) -> int:
    """A size argument as a Python int: any int (numpy's too, as the functional calls take them),
    not a bool; another type raises TypeError, a value below ``minimum`` ValueError (``bound``:
    how the messages say the minimum)."""
    bound = bound or str(minimum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {bound}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {bound}, got {value!r}")
    return int(value)


def _window_of(window_size: int) -> tuple:
    """xformers' local ``window_size`` w (query i sees keys i - w < j <= i) as (left, right)."""
    return (_count("window_size", window_size, 1, "1 (the keys each query sees)") - 1, 0)


def _lengths(name: str, seqlens) -> list:
    try:
        items = list(seqlens)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints, got {type(seqlens).__name__}") from None
    if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in items):
        raise TypeError(f"{name} must hold ints, got {items}")
    values = [int(n) for n in items]
    if any(n < 0 for n in values):
        raise ValueError(f"{name} must hold lengths >= 0, got {values}")
    return values


def _additive(keep: Optional[Tensor], shape, dtype, device) -> Tensor:
    bias = torch.zeros(shape[-2:], dtype=dtype, device=device)
    if keep is not None:
        bias.masked_fill_(~keep.to(device), -math.inf)
    return bias.expand(shape)


# ---------------------------------------------------------------------------------------------
# Biases applied in the kernels over one (M, N) grid
# ---------------------------------------------------------------------------------------------

class AttentionBias:
    """Base of the bias classes: each says which keys a query sees (``causal``, ``alignment``,
    ``window``), and fused_attn's kernels apply it; ``materialize`` gives it as an additive
    tensor, for tests. ``to(device)`` returns the bias itself (the call moves what it needs)."""

    causal = False
    alignment = "top_left"
    window = None

    def to(self, *args, **kwargs) -> "AttentionBias":
        return self

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        """The additive bias (0 where a query sees a key, -inf elsewhere), shape ``(..., M, N)``."""
        keep = R.visible_keys(shape[-2], shape[-1], self.causal, self.window, self.alignment, device=device)
        return _additive(keep, shape, dtype, device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LowerTriangularMask(AttentionBias):
    """Causal, top-left aligned: query i sees keys j <= i. (xformers' is a tensor subclass whose
    constructor takes tensor arguments such as ``device``: accepted and unused here.)"""

    causal = True

    def __init__(self, *tensor_args, **tensor_kwargs):
        pass

    def add_bias(self, bias: Tensor) -> "LowerTriangularMaskWithTensorBias":
        return LowerTriangularMaskWithTensorBias(bias)


class LowerTriangularMaskWithTensorBias(LowerTriangularMask):
    """``LowerTriangularMask`` plus an additive tensor (broadcastable to (B, H, M, N))."""

    def __init__(self, bias: Tensor):
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got "
                            f"{bias.dtype if isinstance(bias, Tensor) else type(bias).__name__}")
        self._bias = bias

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        return super().materialize(shape, dtype, device) + self._bias.to(dtype=dtype, device=device)


class LowerTriangularFromBottomRightMask(AttentionBias):
    """Causal, bottom-right aligned: query i sees keys j <= i + N - M (the last query the last key)."""

    causal = True
    alignment = "bottom_right"

    def __init__(self, *tensor_args, **tensor_kwargs):
        pass

    def make_local_attention(self, window_size: int) -> "LowerTriangularFromBottomRightLocalAttentionMask":
        return LowerTriangularFromBottomRightLocalAttentionMask(window_size)


class LowerTriangularFromBottomRightLocalAttentionMask(LowerTriangularFromBottomRightMask):
    """``LowerTriangularFromBottomRightMask`` where each query sees only its last ``window_size`` keys."""

    def __init__(self, _window_size: int):
        self.window = _window_of(_window_size)
        self._window_size = self.window[0] + 1  # (a Python int)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(_window_size={self._window_size})"


class LocalAttentionFromBottomRightMask(AttentionBias):
    """Bottom-right aligned band: query i sees keys j with d_i - window_left <= j <= d_i +
    window_right, d_i = i + N - M (no causal part unless window_right is 0)."""

    alignment = "bottom_right"

    def __init__(self, window_left: int, window_right: int):
        window_left, window_right = _count("window_left", window_left, 0), _count("window_right", window_right, 0)
        self.window_left, self.window_right = window_left, window_right
        self.window = (window_left, window_right)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(window_left={self.window_left}, window_right={self.window_right})"


# ---------------------------------------------------------------------------------------------
# Block-diagonal biases: packed sequences, a batch of one
# ---------------------------------------------------------------------------------------------

class _SeqLenInfo:
    """Sequence lengths laid back to back: starts ``cu_seqlen_py`` (and as an int32 tensor)."""

    def __init__(self, seqlens: Sequence[int], padding: Optional[int] = None):
        self.seqlen_py = list(seqlens)
        self.max_seqlen = max(self.seqlen_py, default=0)
        if padding is None:  # packed: each starts where the previous ends
            starts = [0]
            for n in self.seqlen_py:
                starts.append(starts[-1] + n)
        else:  # padded slots of ``padding`` rows
            starts = [b * padding for b in range(len(self.seqlen_py) + 1)]
        self.padding = padding
        self.min_seqlen = min(self.seqlen_py, default=0)
        self.cu_seqlen_py = self.seqstart_py = starts  # (xformers' older and newer names)
        self.cu_seqlen = self.seqstart = torch.tensor(starts, dtype=torch.int32)
        self.seqlen = torch.tensor(self.seqlen_py, dtype=torch.int32)

    def split(self, x: Tensor, batch_sizes: Optional[Sequence[int]] = None) -> list:
        if x.dim() < 2 or x.shape[0] != 1 or x.shape[1] != self.cu_seqlen_py[-1]:
            raise ValueError(f"expected a (1, {self.cu_seqlen_py[-1]}, ...) tensor of packed sequences, got "
                             f"{tuple(x.shape)}")
        if self.padding is not None:
            return [x[:, s:s + n] for s, n in zip(self.cu_seqlen_py, self.seqlen_py)]
        batch_sizes = [1] * len(self.seqlen_py) if batch_sizes is None else list(batch_sizes)
        chunks, i = [], 0
        for size in batch_sizes:
            chunks.append(self.cu_seqlen_py[i + size] - self.cu_seqlen_py[i])
            i += size
        return [t.reshape((size, -1) + tuple(t.shape[2:])) for size, t in zip(batch_sizes, x.split(chunks, dim=1))]


class _PackedBias(AttentionBias):
    """Sequences along M of a batch of one: sequence s is query rows ``q_seqinfo``'s block s and
    key rows ``k_seqinfo``'s block s, and sees only itself (``attention_varlen``)."""

    def __init__(self, q_seqinfo: _SeqLenInfo, k_seqinfo: _SeqLenInfo, _batch_sizes=None):
        if len(q_seqinfo.seqlen_py) != len(k_seqinfo.seqlen_py):
            raise ValueError(f"q_seqlen and kv_seqlen must describe as many sequences, got "
                             f"{len(q_seqinfo.seqlen_py)} and {len(k_seqinfo.seqlen_py)}")
        self.q_seqinfo, self.k_seqinfo, self._batch_sizes = q_seqinfo, k_seqinfo, _batch_sizes

    def split_queries(self, tensor: Tensor) -> list:
        return self.q_seqinfo.split(tensor, self._batch_sizes)

    def split_kv(self, tensor: Tensor) -> list:
        return self.k_seqinfo.split(tensor, self._batch_sizes)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        q_info, k_info = self.q_seqinfo, self.k_seqinfo
        keep = torch.zeros(shape[-2:], dtype=torch.bool, device=device)
        for qs, qn, ks, kn in zip(q_info.cu_seqlen_py, q_info.seqlen_py, k_info.cu_seqlen_py, k_info.seqlen_py):
            block = R.visible_keys(qn, kn, self.causal, self.window, self.alignment, device=device)
            keep[qs:qs + qn, ks:ks + kn] = True if block is None else block
        return _additive(keep, shape, dtype, device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(q_seqlen={self.q_seqinfo.seqlen_py}, kv_seqlen={self.k_seqinfo.seqlen_py})"


class BlockDiagonalMask(_PackedBias):
    """Packed sequences along M of a batch of one, each attending only itself: query and key
    blocks laid back to back (``from_seqlens``, ``from_tensor_list``)."""

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqlen: Optional[Sequence[int]] = None, *, device=None):
        q_info = _SeqLenInfo(_lengths("q_seqlen", q_seqlen))
        k_info = q_info if kv_seqlen is None else _SeqLenInfo(_lengths("kv_seqlen", kv_seqlen))
        return cls(q_info, k_info)

    @classmethod
    def from_tensor_list(cls, tensors: Sequence[Tensor]):
        """(bias, the tensors (B_i, M_i, ...) packed into (1, sum B_i M_i, ...))."""
        seqlens = [t.shape[1] for t in tensors for _ in range(t.shape[0])]
        bias = cls.from_seqlens(seqlens)
        bias._batch_sizes = [t.shape[0] for t in tensors]
        return bias, torch.cat([t.reshape((1, -1) + tuple(t.shape[2:])) for t in tensors], dim=1)

    @classmethod
    def from_tensor_lists_qkv(cls, tensors_q, tensors_k, tensors_v=None):
        """(bias, packed q, packed k, packed v or None) of lists of (B_i, M_i, ...) tensors."""
        if len(tensors_q) != len(tensors_k) or (tensors_v is not None and len(tensors_v) != len(tensors_q)):
            raise ValueError("tensors_q, tensors_k (and tensors_v) must be lists of the same length")
        q_lens = [t.shape[1] for t in tensors_q for _ in range(t.shape[0])]
        k_lens = [t.shape[1] for t in tensors_k for _ in range(t.shape[0])]
        bias = cls.from_seqlens(q_lens, k_lens)
        bias._batch_sizes = [t.shape[0] for t in tensors_q]

        def pack(ts):
            return torch.cat([t.reshape((1, -1) + tuple(t.shape[2:])) for t in ts], dim=1)

        return bias, pack(tensors_q), pack(tensors_k), None if tensors_v is None else pack(tensors_v)

    def split(self, tensor: Tensor) -> list:
        """The inverse of ``from_tensor_list``: (1, total, ...) back to the list (queries and keys
        must share one layout; else ``split_queries`` / ``split_kv``)."""
        if self.q_seqinfo.cu_seqlen_py != self.k_seqinfo.cu_seqlen_py:
            raise ValueError("split needs queries and keys of the same lengths: use split_queries or split_kv")
        return self.q_seqinfo.split(tensor, self._batch_sizes)

    def _derive(self, cls, **kw):
        return cls(self.q_seqinfo, self.k_seqinfo, _batch_sizes=self._batch_sizes, **kw)

    def make_causal(self):
        return self._derive(BlockDiagonalCausalMask)

    def make_causal_from_bottomright(self):
        return self._derive(BlockDiagonalCausalFromBottomRightMask)

    def make_local_attention(self, window_size: int):
        return self._derive(BlockDiagonalCausalLocalAttentionMask, _window_size=window_size)

    def make_local_attention_from_bottomright(self, window_size: int):
        return self._derive(BlockDiagonalCausalLocalAttentionFromBottomRightMask, _window_size=window_size)


class BlockDiagonalCausalMask(BlockDiagonalMask):
    """``BlockDiagonalMask`` with each block causal, top-left aligned."""

    causal = True


class BlockDiagonalCausalFromBottomRightMask(BlockDiagonalMask):
    """``BlockDiagonalMask`` with each block causal, bottom-right aligned."""

    causal = True
    alignment = "bottom_right"


class BlockDiagonalCausalLocalAttentionMask(BlockDiagonalCausalMask):
    """``BlockDiagonalCausalMask`` where each query sees only its last ``window_size`` keys."""

    def __init__(self, q_seqinfo, k_seqinfo, _batch_sizes=None, _window_size: int = 1):
        super().__init__(q_seqinfo, k_seqinfo, _batch_sizes)
        self.window = _window_of(_window_size)
        self._window_size = self.window[0] + 1  # (a Python int)


class BlockDiagonalCausalLocalAttentionFromBottomRightMask(BlockDiagonalCausalFromBottomRightMask):
    """``BlockDiagonalCausalFromBottomRightMask`` where each query sees only its last ``window_size`` keys."""

    def __init__(self, q_seqinfo, k_seqinfo, _batch_sizes=None, _window_size: int = 1):
        super().__init__(q_seqinfo, k_seqinfo, _batch_sizes)
        self.window = _window_of(_window_size)
        self._window_size = self.window[0] + 1  # (a Python int)


class BlockDiagonalPaddedKeysMask(_PackedBias):
    """Packed queries against keys in slots of ``kv_padding`` rows (a padded KV cache, a batch of
    one of B * kv_padding key rows): sequence b uses the first ``kv_seqlen[b]`` rows of its slot
    (``attention_varlen`` with ``seqused_k``); the rows past them are never read."""

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_padding: int, kv_seqlen: Sequence[int],
                     causal_diagonal=None, *, device=None):
        if causal_diagonal is not None:
            raise ValueError("causal_diagonal is not supported by fused_attn's padded-keys masks: pass None")
        q_lens, k_lens = _lengths("q_seqlen", q_seqlen), _lengths("kv_seqlen", kv_seqlen)
        longest = max(k_lens, default=0)
        kv_padding = _count("kv_padding", kv_padding, longest, f"every kv_seqlen ({longest})")
        return cls(_SeqLenInfo(q_lens), _SeqLenInfo(k_lens, padding=kv_padding))


class BlockDiagonalCausalWithOffsetPaddedKeysMask(BlockDiagonalPaddedKeysMask):
    """``BlockDiagonalPaddedKeysMask``, causal from the bottom right: each sequence's last query
    sees its last key (decoding against a padded KV cache)."""

    causal = True
    alignment = "bottom_right"


# ---------------------------------------------------------------------------------------------
# memory_efficient_attention
# ---------------------------------------------------------------------------------------------

def _to_bmhk(name: str, t, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"query, key and value must all be (B, M, K), (B, M, H, K) or (B, M, G, H, K); {name} has "
                         f"shape {tuple(t.shape)} and query {ndim} dims")
    return t


def _check_tensor_bias(bias: Tensor, query: Tensor, key: Tensor, name: str) -> None:
    """A tensor bias broadcasts to the logits, in xformers' layout: (B, M, N) for (B, M, K)
    inputs, (B, H, M, N) for (B, M, H, K), (B, G, H, M, N) for (B, M, G, H, K); on query's device."""
    B, M, N = query.shape[0], query.shape[1], key.shape[1]
    layout, target = {3: ("(B, M, N)", (B, M, N)), 4: ("(B, H, M, N)", (B, query.shape[2], M, N)),
                      5: ("(B, G, H, M, N)", (B, *query.shape[2:4], M, N))}[query.dim()]
    if bias.dim() > len(target) or any(b not in (1, t) for b, t in zip(reversed(bias.shape), reversed(target))):
        raise ValueError(f"{name} of shape {tuple(bias.shape)} must broadcast to {layout} = {target} for query "
                         f"{tuple(query.shape)} and key {tuple(key.shape)}")
    if bias.device != query.device:
        raise ValueError(f"{name} is on {bias.device} but query is on {query.device}")


def _check_output_dtype(output_dtype) -> None:
    """``output_dtype`` of ``memory_efficient_attention`` and ``merge_attentions``: None or a
    floating torch.dtype (the output is cast to it)."""
    if output_dtype is not None and not (isinstance(output_dtype, torch.dtype) and output_dtype.is_floating_point):
        raise TypeError(f"output_dtype must be a floating torch.dtype or None, got {output_dtype!r}")


def memory_efficient_attention(query: Tensor, key: Tensor, value: Tensor, attn_bias=None, p: float = 0.0,
                               scale: Optional[float] = None, *, op=None, output_dtype=None, return_lse: bool = False):
    """xformers' ``memory_efficient_attention``: ``softmax(q k^T * scale + bias) v`` on (B, M, H, K)
    tensors (or (B, M, K), or (B, M, G, H, K) grouped-query, the keys and values expanded over H);
    returns query's layout with value's last dim. Differentiable in q, k, v and a tensor bias.
    (``return_lse``, not xformers': also the lse, float32 (float64 for a float64 query), as ``memory_efficient_attention_partial``.)"""
    if not isinstance(query, Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    _check_output_dtype(output_dtype)
    ndim = query.dim()
    if ndim not in (3, 4, 5):
        raise ValueError(f"query must be (B, M, K), (B, M, H, K) or (B, M, G, H, K), got shape {tuple(query.shape)}")
    key, value = _to_bmhk("key", key, ndim), _to_bmhk("value", value, ndim)
    # The shapes are checked here, in xformers' layout and names: attention's errors would say q,
    # k, v and quote the (B, H, M, K) views (heads flattened from (G, H), a head added to BMK).
    if ndim == 5:  # (B, M, G, H, K): G kv groups of H query heads each
        G, H = query.shape[2], query.shape[3]
        for name, t in (("key", key), ("value", value)):  # xformers' layout: k and v (B, N, G, H, K), expanded over H
            if t.shape[0] != query.shape[0] or t.shape[2:4] != (G, H):
                raise ValueError(f"with a (B, M, G, H, K) query, {name} must be (B, N, G, H, K) with query's B, G "
                                 f"and H (expand it over H for grouped-query attention), got {tuple(t.shape)} "
                                 f"for query {tuple(query.shape)}")
    check_shapes(query, key, value, ("query", "key", "value"))
    p = _check_prob("p", p, torch.compiler.is_compiling())  # (checked under xformers' name: attention says dropout_p)
    tensor_bias = None
    if isinstance(attn_bias, Tensor):
        tensor_bias, attn_bias = attn_bias, None
    elif isinstance(attn_bias, LowerTriangularMaskWithTensorBias):
        tensor_bias = attn_bias._bias
    elif attn_bias is not None and not isinstance(attn_bias, AttentionBias):
        raise TypeError(f"attn_bias must be None, a tensor or an xformers attention bias (fused_attn's "
                        f"integrations.xformers classes), got {type(attn_bias).__name__}")
    if tensor_bias is not None and tensor_bias.dtype != query.dtype:
        raise TypeError(f"attn_bias tensor must have query's dtype {query.dtype}, got {tensor_bias.dtype}")
    if tensor_bias is not None:  # checked as given: the reshapes below would show attention's names and shapes
        _check_tensor_bias(tensor_bias, query, key, "attn_bias" if attn_bias is None else "attn_bias's tensor bias")
    q, k, v = query, key, value
    if ndim == 3:  # no heads: one (a bias of fewer than 3 dims broadcasts over it as it is)
        q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
        if tensor_bias is not None and tensor_bias.dim() == 3:
            tensor_bias = tensor_bias.unsqueeze(-3)
    elif ndim == 5:  # (checked above)
        q = q.flatten(2, 3)
        if H == 1 or (k.stride(3) == 0 and v.stride(3) == 0):  # expanded over H: G kv heads, no copy
            k, v = k[:, :, :, 0], v[:, :, :, 0]
        else:
            k, v = k.flatten(2, 3), v.flatten(2, 3)
        if tensor_bias is not None and any(n != 1 for n in tensor_bias.shape[-4:-2]):
            # (..., G, H, M, N) to the (..., G * H, M, N) of the flattened heads: a bias over H
            # alone (G missing or 1) or over G alone (H 1) is first broadcast to both (a stride-0
            # view; the merge then copies it, G * H biases); one over neither merges as it is, and
            # its gradient is summed back through both either way
            tensor_bias = tensor_bias.expand(*tensor_bias.shape[:-4], G, H, *tensor_bias.shape[-2:])
        if tensor_bias is not None and tensor_bias.dim() >= 4:
            tensor_bias = tensor_bias.flatten(-4, -3)
    out, lse = _attend(q, k, v, attn_bias, tensor_bias, p, scale, return_lse)
    if ndim == 3:
        out = out.squeeze(2)
    elif ndim == 5:
        out = out.unflatten(2, (G, H))
        lse = None if lse is None else lse.unflatten(1, (G, H))
    out = out if output_dtype is None else out.to(output_dtype)
    if not return_lse:
        return out
    # xformers' lse of a row with no key is -inf (the log of an empty sum; fused_attn's is +inf)
    return out, lse.masked_fill(lse == float("inf"), float("-inf"))


def memory_efficient_attention_forward(query, key, value, attn_bias=None, p: float = 0.0,
                                       scale: Optional[float] = None, *, op=None, output_dtype=None) -> Tensor:
    """``memory_efficient_attention`` for inference (the same call; no gradient is needed)."""
    return memory_efficient_attention(query, key, value, attn_bias, p, scale, op=op, output_dtype=output_dtype)


def memory_efficient_attention_partial(query, key, value, attn_bias=None, p: float = 0.0,
                                       scale: Optional[float] = None, *, op=None, output_dtype=None) -> tuple:
    """``memory_efficient_attention`` that also returns the log-sum-exp of each row, (B, H,
    M), float32 (float64 for a float64 query) (or (B, G, H, M); -inf on rows that see no key), for ``merge_attentions``. The output is
    float32 unless ``output_dtype`` says otherwise (float64 for a float64 query), as xformers
    returns partial outputs; the kernels compute it in the query's dtype, so its precision is that
    dtype's (xformers' accumulate in float32: a merge of bfloat16 parts is ~bfloat16-accurate)."""
    if output_dtype is None and isinstance(query, Tensor) and query.dtype != torch.float64:
        output_dtype = torch.float32
    return memory_efficient_attention(query, key, value, attn_bias, p, scale, op=op, output_dtype=output_dtype,
                                      return_lse=True)


def merge_attentions(attn_split: Tensor, lse_split: Tensor, write_lse: bool = True,
                     output_dtype: Optional[torch.dtype] = None) -> tuple:
    """xformers' ``merge_attentions``: outputs of one query set against parts of the keys, stacked
    on dim 0 (``attn_split`` (n, B, M, [G,] H, K), ``lse_split`` (n, B, [G,] H, M)), merged as
    attention over all the keys (``fused_attn.merge_attention``): ``(out (B, M, [G,] H, K), lse
    (B, [G,] H, M) or None without write_lse)``. Differentiable."""
    _check_bool("write_lse", write_lse)
    _check_output_dtype(output_dtype)  # (an int dtype was applied to the merge; "cpu" moved it)
    if isinstance(attn_split, (list, tuple)) and isinstance(lse_split, (list, tuple)):
        if not attn_split or len(attn_split) != len(lse_split):
            raise ValueError(f"attn_split and lse_split must list the same number of parts (at least one), got "
                             f"{len(attn_split)} and {len(lse_split)}")
        # each part checked here, before torch.stack (whose error names no argument)
        first = attn_split[0]
        for i, (attn, lse) in enumerate(zip(attn_split, lse_split)):
            if not isinstance(attn, Tensor) or not isinstance(lse, Tensor):
                raise TypeError(f"attn_split[{i}] and lse_split[{i}] must be tensors, got {type(attn).__name__} and "
                                f"{type(lse).__name__}")
            if attn.shape != first.shape or attn.device != first.device:
                raise ValueError(f"the parts of attn_split must share one shape (B, M, [G,] H, K) and device: "
                                 f"attn_split[0] is {tuple(first.shape)} on {first.device}, attn_split[{i}] "
                                 f"{tuple(attn.shape)} on {attn.device}")
            _check_merge_lse(f"lse_split[{i}]", lse, f"attn_split[{i}]", attn, "")
        attn_split, lse_split = torch.stack(list(attn_split)), torch.stack(list(lse_split))  # (newer xformers' form)
    elif not isinstance(attn_split, Tensor) or not isinstance(lse_split, Tensor):
        raise TypeError("attn_split and lse_split must be tensors, the parts stacked on dim 0, or lists of the parts")
    if attn_split.dim() not in (5, 6) or lse_split.dim() != attn_split.dim() - 1:
        raise ValueError(f"attn_split must be (n, B, M, [G,] H, K) and lse_split (n, B, [G,] H, M), got "
                         f"{tuple(attn_split.shape)} and {tuple(lse_split.shape)}")
    _check_merge_lse("lse_split", lse_split, "attn_split", attn_split, "n, ")
    if not attn_split.is_floating_point():
        raise TypeError(f"attn_split must be a floating-point tensor, got {attn_split.dtype}")
    lses = lse_split.movedim(-1, 2)  # (n, B, M, [G,] H): aligned with the outputs
    out, lse = merge_attention(list(attn_split.unbind(0)), list(lses.unbind(0)))
    out = out if output_dtype is None else out.to(output_dtype)
    if not write_lse:
        return out, None
    lse = lse.masked_fill(lse == float("inf"), float("-inf"))
    return out, lse.movedim(1, -1)


def _check_merge_lse(name: str, lse: Tensor, attn_name: str, attn: Tensor, lead: str) -> None:
    """``merge_attentions``' lse of an output: attn ([n,] B, M, [G,] H, K) -> lse ([n,] B, [G,] H, M),
    floating, on attn's device (``lead``: "n, " for the stacked form, "" for a part)."""
    stacked = bool(lead)
    core = attn.shape[1:] if stacked else attn.shape  # (B, M, [G,] H, K)
    if len(core) not in (4, 5):
        raise ValueError(f"{attn_name} must be ({lead}B, M, [G,] H, K), got {tuple(attn.shape)}")
    expected = (*attn.shape[:1 + stacked], *core[2:-1], core[1])
    if not lse.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (the log-sum-exp), got {lse.dtype}")
    if tuple(lse.shape) != expected:
        raise ValueError(f"{name} must be ({lead}B, [G,] H, M) = {expected} to match {attn_name} of shape "
                         f"{tuple(attn.shape)} ({lead}B, M, [G,] H, K), got {tuple(lse.shape)}")
    if lse.device != attn.device:
        raise ValueError(f"{name} is on {lse.device} but {attn_name} is on {attn.device}")


class _Op:
    """Stand-in for xformers' kernel choices (``op=``): accepted and ignored, fused_attn picks its
    kernel by device, dtype and options."""

    def __init__(self, name: str):
        self.NAME = name

    def __repr__(self) -> str:
        return f"fused_attn stand-in for xformers' {self.NAME}"


MemoryEfficientAttentionFlashAttentionOp = (_Op("flash.FwOp"), _Op("flash.BwOp"))
MemoryEfficientAttentionCutlassOp = (_Op("cutlass.FwOp"), _Op("cutlass.BwOp"))
MemoryEfficientAttentionCutlassFwdFlashBwOp = (_Op("cutlass.FwOp"), _Op("flash.BwOp"))


def unbind(x: Tensor, dim: int) -> tuple:
    """xformers' ``unbind`` (a backward that stacks the gradients): ``torch.unbind``, whose backward does."""
    return torch.unbind(x, dim)


def _attend(q, k, v, bias: Optional[AttentionBias], tensor_bias, p, scale, return_lse: bool) -> tuple:
    """q (B, M, Hq, K), k (B, N, Hkv, K), v (B, N, Hkv, Kv) through attention or attention_varlen:
    (out (B, M, Hq, Kv), lse (B, Hq, M) with ``return_lse``, else None)."""
    if isinstance(bias, _PackedBias):
        if q.shape[0] != 1 or k.shape[0] != 1 or v.shape[0] != 1:
            raise ValueError(f"a {type(bias).__name__} packs the sequences along M of a batch of one: query, key "
                             f"and value must be (1, M, ...), got {tuple(q.shape)}, {tuple(k.shape)} and "
                             f"{tuple(v.shape)}")
        q_info, k_info = bias.q_seqinfo, bias.k_seqinfo
        for name, t, info in (("query", q, q_info), ("key", k, k_info)):
            if t.shape[1] != info.cu_seqlen_py[-1]:
                raise ValueError(f"{name} has {t.shape[1]} rows but {type(bias).__name__} describes "
                                 f"{info.cu_seqlen_py[-1]}")
        device = q.device
        seqused = None
        if k_info.padding is not None:
            seqused = torch.tensor(k_info.seqlen_py, dtype=torch.int32, device=device)
        result = attention_varlen(q[0], k[0], v[0], q_info.cu_seqlen.to(device), k_info.cu_seqlen.to(device),
                                  q_info.max_seqlen, k_info.padding or k_info.max_seqlen, causal=bias.causal,
                                  window_size=bias.window, alignment=bias.alignment, dropout_p=p, scale=scale,
                                  seqused_k=seqused, return_lse=return_lse)
        out, lse = result if return_lse else (result, None)
        return out[None], None if lse is None else lse[None]
    causal = bias is not None and bias.causal
    window = None if bias is None else bias.window
    alignment = "top_left" if bias is None else bias.alignment
    result = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=tensor_bias, causal=causal,
                       window_size=window, alignment=alignment, dropout_p=p, scale=scale, return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    return out.transpose(1, 2), lse


# ---------------------------------------------------------------------------------------------
# import xformers.ops
# ---------------------------------------------------------------------------------------------

_BIASES = ["AttentionBias", "LowerTriangularMask", "LowerTriangularMaskWithTensorBias",
           "LowerTriangularFromBottomRightMask", "LowerTriangularFromBottomRightLocalAttentionMask",
           "BlockDiagonalMask", "BlockDiagonalCausalMask", "BlockDiagonalCausalFromBottomRightMask",
           "BlockDiagonalCausalLocalAttentionMask", "BlockDiagonalCausalLocalAttentionFromBottomRightMask",
           "BlockDiagonalPaddedKeysMask", "BlockDiagonalCausalWithOffsetPaddedKeysMask",
           "LocalAttentionFromBottomRightMask"]
_MODULES = {
    "xformers": [],
    "xformers.ops": ["memory_efficient_attention", "memory_efficient_attention_forward", "AttentionBias",
                     "LowerTriangularMask", "LowerTriangularMaskWithTensorBias", "BlockDiagonalMask", "unbind",
                     "MemoryEfficientAttentionFlashAttentionOp", "MemoryEfficientAttentionCutlassOp",
                     "MemoryEfficientAttentionCutlassFwdFlashBwOp"],
    "xformers.ops.fmha": ["memory_efficient_attention", "memory_efficient_attention_forward",
                          "memory_efficient_attention_partial", "merge_attentions"] + _BIASES,
    "xformers.ops.fmha.attn_bias": _BIASES,
}
_PACKAGES = {"xformers", "xformers.ops", "xformers.ops.fmha"}


class patch_xformers(StandInModules):
    """Make ``import xformers.ops`` (``xformers.ops.fmha``, ``xformers.ops.fmha.attn_bias``) find
    this module's ``memory_efficient_attention`` and bias classes, for code written against
    xformers::

        with fused_attn.patch_xformers():
            import xformers.ops as xops
            out = xops.memory_efficient_attention(q, k, v, attn_bias=xops.LowerTriangularMask())

    As ``patch_flash_attn``: ``undo()`` (or the end of the ``with`` block) puts back what was
    there, and an installed xformers is not shadowed unless ``force=True``."""

    def __init__(self, force: bool = False):
        modules = {name: {attr: globals()[attr] for attr in attrs} for name, attrs in _MODULES.items()}
        super().__init__("xformers", modules, _PACKAGES, XFORMERS_VERSION, force)
