"""The fused nn.Modules: drop-in replacements for the modules in ``fused_attn.reference``.

Each fused module subclasses its reference counterpart, so the constructor arguments and
defaults, the parameter names and shapes and the initialisation (the same ``nn.Linear``s created
in the same order, hence the same random numbers drawn) are the reference's by construction; a
``state_dict`` saved from one loads into the other with ``strict=True``. Only ``forward``
differs: it calls ``fused_attn.functional`` (validation, backend choice, the registered ops)
instead of the plain-PyTorch formulas. Every module takes one extra argument, ``backend``
(None = ``use_backend`` / ``FUSED_ATTN_BACKEND`` / auto), keyword-only, so that positional
arguments bind as the reference's do; its ``extra_repr`` shows the backend a call with its
parameters' device and dtype would run on.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .rotary import rotate_packed, rotate_token_tables
from .backends import BACKENDS, Call, auto_order, check_backend_name, requested_backend
from .functional import (_check_bool, _counter_dropout, _draw_rng, apply_rotary_emb, attention, attention_varlen,
                         attention_with_kvcache, feed_forward, layer_norm_residual)
from .ops import differentiated
from .ops_common import no_data


def backend_in_use(requested: Optional[str], op: str, param: Optional[Tensor], options: dict) -> str:
    """What ``extra_repr`` shows: the requested backend and, for auto, the one it resolves to for
    a call on ``param``'s device and dtype (no warning, no error: this is a description)."""
    name = requested_backend(requested)
    if param is None or param.device.type == "meta":
        return name
    call = Call(op, param.device, param.dtype, options)
    if name != "auto":
        reasons = BACKENDS[name].call_reasons(call)
        return name if not reasons else f"{name} (cannot run: {'; '.join(reasons)})"
    for candidate in auto_order(op, param.device.type):
        if not BACKENDS[candidate].call_reasons(call):
            return f"auto -> {candidate}"
    return "auto -> none available"


class MultiHeadAttention(reference.MultiHeadAttention):
    """Multi-head attention on batch-first (B, L, d_model) tensors, on the fused attention op.

    Q, K and V are projected with one matmul each (``_project`` says why not one over the
    concatenated weights). The heads go to the attention op as strided views of the projections
    (no copies), and the op's output is laid out as (B, L, H, D), so merging the heads back is a
    free view.
    """

    def __init__(self, d_model, num_heads, dropout=0.0, bias=True, num_kv_heads=None, causal=False,
                 window_size=None, device=None, dtype=None, alibi=False, sinks=False, rotary=False,
                 rotary_base=10000.0, *, backend=None):
        super().__init__(d_model, num_heads, dropout=dropout, bias=bias, num_kv_heads=num_kv_heads, causal=causal,
                         window_size=window_size, device=device, dtype=dtype, alibi=alibi, sinks=sinks,
                         rotary=rotary, rotary_base=rotary_base)
        check_backend_name(backend)
        self.backend = backend

    def _project(self, query, key, value):
        """Q, K and V, one matmul each on the module's own weights. (One matmul over the
        concatenated weights would read x once instead of three times, but it concatenates the
        weights at every call: for a decoding step, where each matmul reads its weight once, that
        copy costs more than the matmuls, and in training the concatenation is saved for backward,
        a third copy of the projection weights per layer. Reading x, (tokens, d_model), twice more
        is the smaller cost at every size; the kernels take the three outputs' layouts as they are.)"""
        return self.query_linear(query), self.key_linear(key), self.value_linear(value)

    def forward(self, query, key=None, value=None, *, attn_mask=None, key_padding_mask=None, is_causal=None,
                cu_seqlens=None, max_seqlen=None, kv_cache=None):
        """As the reference's: (B, L, d_model) tensors, or packed self-attention on (total_tokens,
        d_model) with ``cu_seqlens`` (``attention_varlen``: no padding, no mask), or a decoding step
        with ``kv_cache`` (``attention_with_kvcache``)."""
        self._place_meta_slopes()
        if kv_cache is not None:
            reference.check_kv_cache_call(self, query, key, value, attn_mask, key_padding_mask, cu_seqlens, is_causal,
                                          kv_cache)
            return reference.decode_step(self, query, kv_cache, key_padding_mask)
        if cu_seqlens is not None:
            return self._packed_forward(query, key, value, attn_mask, key_padding_mask, is_causal, cu_seqlens,
                                        max_seqlen)
        reference.check_batched_call(query, key, value, self.d_model, self.num_heads, key_padding_mask, is_causal,
                                     attn_mask)
        key = query if key is None else key
        value = key if value is None else value
        q, k, v = self._project(query, key, value)
        B, Lq, _ = query.shape
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, H, D) views
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.rotary:  # query l and key l at position l
            cos, sin = self.rotary_tables(max(q.shape[1], k.shape[1]), q.device)
            q = apply_rotary_emb(q, cos, sin, backend=self.backend)
            k = apply_rotary_emb(k, cos, sin, backend=self.backend)
        # (B, L, H, D) -> (B, H, L, D): a strided view, the op reads any strides.
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        mask = reference.merge_masks(attn_mask, key_padding_mask, q.dtype)
        causal = self.causal if is_causal is None else bool(is_causal)
        p = self.dropout if self.training else 0.0
        out = attention(q, k, v, attn_mask=mask, causal=causal, window_size=self.window_size, dropout_p=p,
                        alibi_slopes=self.alibi_slopes, sinks=self.sinks, backend=self.backend)
        # out is (B, H, Lq, D) stored as (B, Lq, H, D): this reshape is a view.
        return self.out_linear(out.transpose(1, 2).reshape(B, Lq, self.d_model))

    def _decode(self, query, kv_cache):
        """One decoding step through ``attention_with_kvcache``: the new keys and values written into
        the cache in place, RoPE (``rotary=True``) applied there at each token's position, ALiBi and
        sinks as in the full forward; then the cache's counts advance."""
        B, L, _ = query.shape
        q, k, v = self._project(query, query, query)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))  # (B, L, H, D) views: the call's layout
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        reference.check_kv_cache_dtype(q, kv_cache)  # (as the reference module names it)
        if self.rotary:
            # Turned here, token (b, i) at position seqlens[b] + i (as attention_with_kvcache's
            # rotary_cos/rotary_sin would), with tables of the step's B x L positions: those indexed
            # by cache row had to cover the cache's capacity, built at every step, so that the time
            # per token grew with max_len. In the dtype the call runs in: under autocast it casts
            # the new tokens to the cache's (checked equal above otherwise) before turning them.
            positions = kv_cache.seqlens.long()[:, None] + torch.arange(L, device=kv_cache.seqlens.device)
            cos, sin = self.rotary_tables_at(positions)
            dtype = kv_cache.k.dtype if kv_cache.k.is_floating_point() else q.dtype
            q, k = rotate_token_tables((q.to(dtype), k.to(dtype)), cos, sin, self.backend)
        try:
            out = attention_with_kvcache(q, kv_cache.k, kv_cache.v, k, v, cache_seqlens=kv_cache.seqlens, causal=True,
                                         cache_leftpad=kv_cache.leftpad if kv_cache.padded else None,
                                         window_size=self.window_size, alibi_slopes=self.alibi_slopes,
                                         sinks=self.sinks, backend=self.backend)
        except ValueError as error:
            # A full cache, said as the reference module says it: the call's message names
            # cache_seqlens and k_cache, which the caller never passed. (Read here, on the error
            # path only: a step that fits costs no second host read of the counts.)
            if torch.compiler.is_compiling() or not no_data(query):  # (meta, fake: no counts to read)
                reference.check_kv_cache_fits(kv_cache, kv_cache.seqlens.tolist(), L, error)
            raise
        kv_cache.seqlens += L
        return self.out_linear(out.reshape(B, L, self.d_model))

    def _packed_forward(self, query, key, value, attn_mask, key_padding_mask, is_causal, cu_seqlens, max_seqlen):
        reference.check_packed_call(query, key, value, attn_mask, key_padding_mask, self.d_model)
        reference.check_is_causal(is_causal)
        slopes = self.alibi_slopes
        learned = slopes is not None and differentiated(slopes)  # (a gradient, or a forward-mode tangent)
        # Checked here under the module's names (attention_varlen's errors say cu_seqlens_q and
        # max_seqlen_q), read once (None under torch.compile, unless the per-sequence path needs them)
        bounds = reference.check_packed_bounds(query, cu_seqlens, max_seqlen, read=learned)
        checked = None
        if bounds is not None:  # the keys each sequence uses, for attention_varlen not to read them again
            checked = [b - a for a, b in zip(bounds, bounds[1:])]
            max_seqlen = max(checked, default=0)
        q, k, v = self._project(query, query, query)
        # (T, H*D) -> (T, H, D) views of the projections
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_dim))
        if self.rotary:  # each sequence's tokens at positions 0, 1, ...: one table row per token at most
            rows = query.shape[0] if max_seqlen is None else max_seqlen
            cos, sin = self.rotary_tables(max(rows, 1), query.device)
            q, k = rotate_packed((q, k), cos, sin, cu_seqlens, max_seqlen, self.backend)
        causal = self.causal if is_causal is None else bool(is_causal)
        p = self.dropout if self.training else 0.0
        if learned:
            out = self._packed_learned_alibi(q, k, v, bounds, causal, p)
        else:
            out = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
                                   window_size=self.window_size, dropout_p=p, alibi_slopes=slopes,
                                   sinks=self.sinks, backend=self.backend, _checked_used_k=checked)
        return self.out_linear(out.flatten(-2))  # (T, H, D) contiguous: a view

    def _packed_learned_alibi(self, q, k, v, bounds, causal, p):
        """The packed attention with learnable slopes that are being trained (alibi="learnable",
        grad mode on; or carrying a forward-mode tangent, likewise): one ``attention`` call per
        sequence, which gives slopes requiring grad their gradient (as a learnable (H, L_s, L_s)
        bias), and their tangent. ``attention_varlen``'s kernels compute ALiBi
        inside and return no gradient for the slopes, so it refuses them, and a module user cannot
        ``.detach()`` a parameter; per sequence is exactly what the reference module computes (and
        what ``attention_varlen`` gives each sequence), at the cost of one call per sequence and
        the bias's memory. ``bounds``: cu_seqlens read on the host and checked by the caller
        (``reference.check_packed_bounds``), which breaks a torch.compile graph here. Dropout: one
        ``[seed, offset]`` pair drawn as ``attention_varlen`` draws it, and sequence s dropped with
        ``(seed, offset + H * cu_seqlens[s])``, the mask ``attention_varlen`` gives it: the two
        paths drop the same elements and draw the same from torch's generator. (Each call drew its
        own seed: an output that depended on grad mode, so reentrant checkpointing, whose first
        forward runs under no_grad, recomputed other masks and returned wrong gradients.)"""
        rng = _draw_rng(p, None, q)  # (None without dropout)
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            if a == b:  # (an empty sequence has no rows)
                continue
            # (L_s, H, D) -> (1, H, L_s, D): strided views; the output is laid out (1, L_s, H, D)
            qs, ks, vs = (t[a:b].transpose(0, 1)[None] for t in (q, k, v))
            seq_rng = None
            if rng is not None:  # (added, not written in place: under vmap the pair is batched, one per sample)
                seq_rng = rng + torch.tensor([0, self.num_heads * a], dtype=torch.int64, device=rng.device)
            out = attention(qs, ks, vs, causal=causal, window_size=self.window_size, dropout_p=p,
                            alibi_slopes=self.alibi_slopes, sinks=self.sinks, backend=self.backend, _rng=seq_rng)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs) if outs else q.new_zeros(0, self.num_heads, self.head_dim)

    def extra_repr(self) -> str:
        opts = {"head_dim": self.head_dim, "head_dim_v": self.head_dim, "causal": self.causal,
                "window": self.window_size is not None, "dropout": self.dropout > 0.0,
                "gqa": self.num_kv_heads != self.num_heads, "mask": None, "mask_grad": False, "alibi": self.alibi}
        backend = backend_in_use(self.backend, "attention", self.query_linear.weight, opts)
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"dropout={self.dropout}, causal={self.causal}"
                + ("" if self.window_size is None else f", window_size={self.window_size}")
                + (f", alibi={'learnable' if isinstance(self.alibi_slopes, nn.Parameter) else True}" if self.alibi
                   else "") + (", sinks=True" if self.sinks is not None else "")
                + (f", rotary=True, rotary_base={self.rotary_base:g}" if self.rotary else "")
                + f", backend={backend}")


class LayerNormResidual(reference.LayerNormResidual):
    """norm(dropout(x) + residual) in one fused op (LayerNorm or RMSNorm); with ``prenorm=True``
    it also returns the sum, the residual stream of a pre-LN stack."""

    def __init__(self, d_model, eps=1e-5, norm="layernorm", bias=True, dropout=0.0, device=None, dtype=None, *,
                 backend=None):
        super().__init__(d_model, eps=eps, norm=norm, bias=bias, dropout=dropout, device=device, dtype=dtype)
        check_backend_name(backend)
        self.backend = backend

    def forward(self, x, residual=None, prenorm=False):
        p = self.dropout if self.training else 0.0
        return layer_norm_residual(x, residual, self.weight, self.bias, self.eps, dropout_p=p, prenorm=prenorm,
                                   rms=self.norm == "rmsnorm", backend=self.backend)

    def extra_repr(self) -> str:
        opts = {"hidden": self.d_model, "rms": self.norm == "rmsnorm", "dropout": self.dropout > 0.0,
                "residual_in_fp32": False}
        backend = backend_in_use(self.backend, "layer_norm_residual", self.weight, opts)
        return f"{self.d_model}, norm={self.norm}, eps={self.eps}, dropout={self.dropout}, backend={backend}"


class FeedForward(reference.FeedForward):
    """Linear -> activation -> dropout -> Linear as one fused op (gated activations included)."""

    # The unfused path's dropout (an adapter's FFN) drops the elements the op would: the ops' RNG,
    # which torch.compile keeps (inductor replaces torch's dropout with its own RNG).
    _dropout = staticmethod(_counter_dropout)

    def __init__(self, d_model, d_ff=None, activation="relu", dropout=0.0, bias=True, device=None, dtype=None, *,
                 backend=None):
        super().__init__(d_model, d_ff, activation=activation, dropout=dropout, bias=bias, device=device, dtype=dtype)
        check_backend_name(backend)
        self.backend = backend

    def forward(self, x):
        p = self.dropout if self.training else 0.0
        if not (reference.reads_as_called(self.linear1) and reference.reads_as_called(self.linear2)):
            return self.unfused_forward(x)  # a linear wrapped by an adapter (LoRA): called, not read
        return feed_forward(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                            activation=self.activation, dropout_p=p, backend=self.backend)

    def extra_repr(self) -> str:
        opts = {"activation": self.activation, "dropout": self.dropout > 0.0}
        backend = backend_in_use(self.backend, "feed_forward", self.linear1.weight, opts)
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}, dropout={self.dropout}, "
                f"backend={backend}")


class TransformerLayer(reference.TransformerLayer):
    """One encoder layer built from the fused modules; post-LN by default, pre-LN with ``norm_first``.

    post-LN:  y = norm1(dropout(mha(x)) + x);      z = norm2(dropout(ffn(y)) + y)
    pre-LN:   y = x + dropout(mha(norm1(x)));      z = y + dropout(ffn(norm2(y)))

    Each residual add goes into the fused norm that follows it (never ``norm(x + y)`` in Python):
    in pre-LN, norm2 takes the attention branch and the stream and returns both the normalised
    sum and the sum itself (``prenorm=True``). Only the last add of a pre-LN layer, which no norm
    follows, is a plain add; its dropout uses the ops' counter-based RNG, as every other dropout of
    the layer: torch's ``F.dropout`` is replaced by inductor's own RNG, so a compiled layer dropped
    other elements there than eager.
    """

    _dropout = staticmethod(_counter_dropout)

    def __init__(self, d_model, num_heads, d_ff=None, dropout=0.0, activation="relu", bias=True,
                 norm_first=False, norm="layernorm", eps=1e-5, num_kv_heads=None, causal=False,
                 window_size=None, device=None, dtype=None, alibi=False, sinks=False, rotary=False,
                 rotary_base=10000.0, *, backend=None):
        nn.Module.__init__(self)  # the children are the fused ones, created in the reference's order
        check_backend_name(backend)
        factory = dict(device=device, dtype=dtype, backend=backend)
        self.norm_first = _check_bool("norm_first", norm_first)
        self.multi_head_attention = MultiHeadAttention(d_model, num_heads, dropout=dropout, bias=bias,
                                                       num_kv_heads=num_kv_heads, causal=causal,
                                                       window_size=window_size, alibi=alibi, sinks=sinks,
                                                       rotary=rotary, rotary_base=rotary_base, **factory)
        # pre-LN's norm1 normalises the stream itself (norm1(x), no residual): no dropout there,
        # or the layer would drop elements of x before attending (torch's layer does not)
        self.norm1 = LayerNormResidual(d_model, eps=eps, norm=norm, bias=bias,
                                       dropout=0.0 if self.norm_first else dropout, **factory)
        self.ffn = FeedForward(d_model, d_ff, activation=activation, dropout=dropout, bias=bias, **factory)
        self.norm2 = LayerNormResidual(d_model, eps=eps, norm=norm, bias=bias, dropout=dropout, **factory)

    # forward is the reference's: with the fused children it already hands every residual to a
    # fused norm (norm1(attn, x); norm2(branch, stream, prenorm=True) in pre-LN).


class Transformer(reference.Transformer):
    """A stack of ``num_layers`` fused TransformerLayers (``layers``, a ModuleList)."""

    def __init__(self, d_model, num_heads, num_layers, *, backend=None, **layer_kwargs):
        nn.Module.__init__(self)
        check_backend_name(backend)
        num_layers = reference.check_count("num_layers", num_layers)
        self.layers = nn.ModuleList(TransformerLayer(d_model, num_heads, backend=backend, **layer_kwargs)
                                    for _ in range(num_layers))


KVCache = reference.KVCache  # one class for both: a cache fills the same in either module

__all__ = ["MultiHeadAttention", "LayerNormResidual", "FeedForward", "TransformerLayer", "Transformer", "KVCache",
           "backend_in_use"]
