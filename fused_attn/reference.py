"""The reference: plain-PyTorch versions of every op and module, written for clarity.

This file is the numerical oracle. Every backend is tested against these functions run in
float64, and every fused module against these modules. Nothing here is optimised; each line is
the textbook formula. It is also the ``reference`` backend (``fused_attn.backends.reference``),
which is how the functional API works on any machine.

The modules are the classic post-LN Transformer encoder:

    Y = LayerNorm(X + Dropout(MultiHeadAttention(X)))
    Z = LayerNorm(Y + Dropout(FFN(Y))),     FFN = Linear(d, 4d) -> ReLU -> Dropout -> Linear(4d, d)

with options (pre-LN, RMSNorm, gated activations, grouped-query heads, causal) that the fused
modules in ``fused_attn.modules`` take too.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _rng
from .ops_common import (check_cumulative, check_device, check_longest, grad_recording, is_dtensor, no_data,
                         norm_stat_scale, replicated_like)

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu")
GATED_ACTIVATIONS = ("swiglu", "geglu")
NORMS = ("layernorm", "rmsnorm")


# --------------------------------------------------------------------------------------------
# Functions (the oracle of fused_attn.functional)
# --------------------------------------------------------------------------------------------

def visible_keys(Lq, Lk, causal=False, window_size=None, alignment="top_left", band=None, device=None):
    """The (Lq, Lk) bool matrix of keys each query may see, before any attn_mask.

    From the user's terms: query i sits at key position d = i (top_left) or i + Lk - Lq
    (bottom_right); ``causal`` keeps keys j <= d, ``window_size = (left, right)`` keeps
    d - left <= j <= d + right (-1: no limit on that side). Or, as the ops receive it, from
    ``band = (lo, hi)``: i + lo <= j <= i + hi. None when every key is visible.
    """
    i = torch.arange(Lq, device=device).unsqueeze(1)
    j = torch.arange(Lk, device=device).unsqueeze(0)
    if band is not None:
        lo, hi = band
        return (j - i >= lo) & (j - i <= hi)
    if not causal and window_size is None:
        return None
    d = i + (Lk - Lq if alignment == "bottom_right" else 0)
    keep = torch.ones(Lq, Lk, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= d
    if window_size is not None:
        left, right = window_size
        if left >= 0:
            keep &= j >= d - left
        if right >= 0:
            keep &= j <= d + right
    return keep


def get_alibi_slopes(num_heads: int, device=None) -> torch.Tensor:
    """The ALiBi paper's head slopes (Press et al. 2022; what BLOOM, MPT and FlashAttention's tests
    use): for a power of two n, ``2^(-8 (h + 1) / n)`` for head h; otherwise the n' = 2^floor(log2 n)
    slopes followed by every other slope of the 2n' sequence. float32 (num_heads,)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral):
        raise TypeError(f"num_heads must be an int from 1 to 2**20, got {type(num_heads).__name__} {num_heads!r}")
    if not 1 <= num_heads <= 1 << 20:
        raise ValueError(f"num_heads must be an int from 1 to 2**20, got {num_heads!r}")
    num_heads = int(num_heads)  # (numpy ints too)
    check_device(device)

    def powers(n):
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    base = 1 << (num_heads.bit_length() - 1)
    slopes = powers(base) + powers(2 * base)[0::2][:num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def alibi_bias(slopes, Lq, Lk, alignment="top_left", dtype=None):
    """ALiBi's additive bias (Press et al., FlashAttention's ``alibi_slopes``), broadcastable to
    (B, Hq, Lq, Lk): ``-slope[b, h] * |j - d_i|``, where query i sits at key position d_i = i
    (top_left) or i + Lk - Lq (bottom_right), as for the causal mask. slopes: (Hq,) or (B, Hq)."""
    i = torch.arange(Lq, device=slopes.device).unsqueeze(1) + (Lk - Lq if alignment == "bottom_right" else 0)
    j = torch.arange(Lk, device=slopes.device).unsqueeze(0)
    dist = replicated_like((j - i).abs().to(dtype or slopes.dtype), slopes)  # (DTensor slopes: replicated)
    return -slopes.to(dist.dtype)[..., None, None] * dist


def _batched_matmul(a, b):
    """``torch.matmul`` of (B, H, ., .) tensors. DTensors (tensor parallelism) sharded on the heads
    take the sharded dim to the front and back: torch 2.11's DTensor matmul refused to flatten
    (B, H) with H sharded ("Attempted to flatten multiple dimensions, with dimension 1 being
    sharded"), the most common placement; 2.13 takes it either way."""
    if type(a) is torch.Tensor or not hasattr(a, "placements"):
        return torch.matmul(a, b)
    dims = {p.dim for t in (a, b) for p in getattr(t, "placements", ()) if p.is_shard() and 0 < p.dim < a.dim() - 2}
    if len(dims) != 1:
        return torch.matmul(a, b)
    d = dims.pop()
    return torch.matmul(a.movedim(d, 0), b.movedim(d, 0)).movedim(0, d)


def soft_cap(scores, softcap):
    """The logit cap ``softcap * tanh(scores / softcap)``, computed in float64 (float32 scores and
    below are widened for it and the result rounded back). Its derivatives are what the formula's:
    autograd takes the product's and the quotient's in turn, ``g * softcap * (1 - t^2) / softcap``
    (forward mode ``ds / softcap ... * softcap``), whose intermediates left float32's range at the
    ends of the documented caps: ``g * 1e38`` overflowed for any |g| > 3.4 (inf and NaN gradients,
    also in every backend's create_graph backward, which differentiates this formula), and
    ``scores / 1e38`` went subnormal (logits under ~1e-7 became 0, tangents under ~1e-3 lost digits).
    float64's range holds every such intermediate for float32 values and caps in [1e-30, 2.4e38]
    (``g * softcap`` < 1e77, ``scores / softcap`` < 1e69) in plain ops, which torch differentiates to
    any order in every mode (a custom derivative would need its own forward-mode and vmap rules)."""
    wide = torch.promote_types(scores.dtype, torch.float64)
    return (torch.tanh(scores.to(wide) / softcap) * softcap).to(scores.dtype)


def attention(q, k, v, attn_mask=None, causal=False, dropout_p=0.0, scale=None, rng=None, *, window_size=None,
              alignment="top_left", band=None, softcap=None, alibi_slopes=None, sinks=None):
    """softmax(q k^T * scale + mask) v, with the conventions of ``fused_attn.functional.attention``.

    q: (B, Hq, Lq, D), k: (B, Hkv, Lk, D), v: (B, Hkv, Lk, Dv), Hq % Hkv == 0.
    attn_mask: bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk).
    causal, window_size, alignment: which keys each query sees (see ``visible_keys``);
    causal alone is top-left aligned, as scaled_dot_product_attention. ``band`` replaces them with
    the ops' (band_lo, band_hi). softcap: logits ``softcap * tanh(scores / softcap)`` before the
    mask (Gemma 2); None or 0 for none. alibi_slopes: (Hq,) or (B, Hq), adds ``alibi_bias`` (placed
    by ``alignment``, also when ``band`` is given) after the cap, as the mask is. sinks: (Hq,)
    attention-sink logits (gpt-oss): one more column of every row's softmax, holding the head's
    sink, dropped after the softmax (it has no value), as transformers' gpt-oss eager attention.
    A row with no key left to attend gives zeros (and zero gradients), not NaN.
    Dropout on the probabilities uses the shared counter RNG when ``rng = (seed, offset)`` is
    given, else torch's ``F.dropout``.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if Hq != Hkv:  # grouped-query: query head h reads kv head h // (Hq // Hkv)
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scores = _batched_matmul(q, k.transpose(-2, -1)) * scale
    if softcap:
        scores = soft_cap(scores, softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, Lq, Lk, alignment, scores.dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    keep = visible_keys(Lq, Lk, causal, window_size, alignment, band, q.device)
    if keep is not None:
        scores = scores.masked_fill(~replicated_like(keep, scores), float("-inf"))  # (DTensor scores: replicated)
    if sinks is not None:  # the sink column is finite: no row is empty, it takes a masked row whole
        sink_column = sinks.to(scores.dtype).view(1, Hq, 1, 1).expand(B, Hq, Lq, 1)
        probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :Lk]
    else:
        # Rows where every key is masked: softmax would be 0/0. Give them zero probability instead,
        # replacing their scores by 0 first so that no NaN reaches the backward pass either.
        dead = (scores == float("-inf")).all(dim=-1, keepdim=True)  # also true when Lk == 0
        scores = scores.masked_fill(dead, 0.0)
        probs = torch.softmax(scores, dim=-1).masked_fill(dead, 0.0)
    if dropout_p > 0.0:
        if rng is None:
            probs = F.dropout(probs, dropout_p)
        else:
            probs = _rng.apply_dropout(probs, dropout_p, *_rng.seed_offset(rng))
    return _batched_matmul(probs, v)


def attention_lse(q, k, attn_mask=None, causal=False, scale=None, *, window_size=None, alignment="top_left",
                  band=None, softcap=None, alibi_slopes=None, sinks=None):
    """The per-row log-sum-exp of the scaled, masked scores; +inf for rows with no key left. With
    ``sinks`` (Hq,), the log of the whole denominator, sink included (the sink alone on empty rows)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
    scores = _batched_matmul(q, k.transpose(-2, -1)) * scale
    if softcap:
        scores = soft_cap(scores, softcap)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, Lq, Lk, alignment, scores.dtype)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    keep = visible_keys(Lq, Lk, causal, window_size, alignment, band, q.device)
    if keep is not None:
        scores = scores.masked_fill(~replicated_like(keep, scores), float("-inf"))  # (DTensor scores: replicated)
    # Rows with no key get +inf, and a zero gradient: logsumexp's own would be exp(-inf - -inf) = NaN,
    # so those rows are taken out of the graph before it.
    if sinks is not None:
        sink_column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(B, Hq, Lq, 1)
        return torch.logsumexp(torch.cat([scores, sink_column], dim=-1), dim=-1)
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True)
    lse = torch.logsumexp(scores.masked_fill(dead, 0.0), dim=-1)
    return lse.masked_fill(dead.squeeze(-1), float("inf"))


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, dropout_p=0.0, scale=None, rng=None, *,
                     window_size=None, alignment="top_left", softcap=None, with_lse=False, seqused_k=None,
                     alibi_slopes=None, sinks=None):
    """Packed variable-length attention, as ``fused_attn.functional.attention_varlen``: one
    ``attention`` per sequence. q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv);
    sequence s is rows cu_seqlens_q[s]:cu_seqlens_q[s+1] of q and cu_seqlens_k[s]:cu_seqlens_k[s+1]
    of k and v, and sees only itself. Returns (total_q, Hq, Dv), and with ``with_lse`` also the
    (Hq, total_q) log-sum-exp (float32, float64 for float64 inputs). Dropout: sequence s uses
    (seed, offset + Hq * cu_seqlens_q[s]) (``ops_common.varlen_rng_offset``). ``seqused_k``: sequence
    s uses only its first seqused_k[s] keys. ``alibi_slopes``: (Hq,) or (B, Hq), row s for sequence s.
    ``sinks``: (Hq,) attention-sink logits, in every sequence. (cu_seqlens_q and cu_seqlens_k may
    also be lists, boundaries read already.)"""
    cu_q, cu_k = ([int(x) for x in (cu if isinstance(cu, list) else cu.tolist())]
                  for cu in (cu_seqlens_q, cu_seqlens_k))
    k_end = cu_k[1:] if seqused_k is None else [a + int(n) for a, n in zip(cu_k, seqused_k.tolist())]
    Hq = q.shape[1]
    outs, lses = [], []
    for s in range(len(cu_q) - 1):
        qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1).unsqueeze(0)  # (1, Hq, Lq_s, D)
        ks = k[cu_k[s]:k_end[s]].transpose(0, 1).unsqueeze(0)
        vs = v[cu_k[s]:k_end[s]].transpose(0, 1).unsqueeze(0)
        seq_rng = None if rng is None else _rng.seed_offset((rng[0], rng[1] + Hq * cu_q[s]))
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[s])
        outs.append(attention(qs, ks, vs, None, causal, dropout_p, scale, seq_rng, window_size=window_size,
                              alignment=alignment, softcap=softcap, alibi_slopes=slopes,
                              sinks=sinks)[0].transpose(0, 1))
        if with_lse:
            wide = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for the oracle
            lses.append(attention_lse(qs.to(wide), ks.to(wide), None, causal, scale, window_size=window_size,
                                      alignment=alignment, softcap=softcap, alibi_slopes=slopes,
                                      sinks=None if sinks is None else sinks.to(wide))[0])
    out = torch.cat(outs) if outs else q.new_zeros(0, Hq, v.shape[-1])
    if not with_lse:
        return out
    return out, (torch.cat(lses, dim=1) if lses else q.new_zeros(Hq, 0, dtype=torch.promote_types(q.dtype,
                                                                                                  torch.float32)))


def layer_norm_residual(x, residual=None, weight=None, bias=None, eps=1e-5, dropout_p=0.0,
                        prenorm=False, rms=False, residual_in_fp32=False, rng=None):
    """norm(dropout(x) + residual) over the last dim; with prenorm, also returns the sum.

    The sum is kept in float32 when ``residual_in_fp32`` (float64 for float64 x); the normalised
    output has x's dtype.
    """
    if dropout_p > 0.0:
        x_dropped = F.dropout(x, dropout_p) if rng is None else _rng.apply_dropout(x, dropout_p, *_rng.seed_offset(rng))
    else:
        x_dropped = x
    if residual_in_fp32:
        # in the wider of float32 and x's dtype, as the kernels keep it: both operands exact in
        # it, one rounding of the add (float64 x keeps a float64 sum)
        wide = torch.promote_types(x.dtype, torch.float32)
        summed = x_dropped.to(wide) + (residual.to(wide) if residual is not None else 0.0)
    else:
        summed = x_dropped + residual if residual is not None else x_dropped
    # In float32 at least, as F.layer_norm computes internally and every kernel does (the squares
    # of half-precision values overflow float16 above 256: the row came out zeros); float64 sums
    # stay float64 and are taken as they are.
    acc = torch.promote_types(summed.dtype, torch.float32)
    wide = summed.to(acc)
    # The statistics are those of c * s, c a power of two with c^2 <= 1/d (norm_stat_scale): no term
    # or partial sum of c * s or of its squares exceeds the mean, the mean square or the variance of
    # s, so they overflow float32 only where those do (a plain float32 sum of squares overflowed at
    # +-1e18 over 1024 columns, variance 1e36, and gave a silent row of bias). Scaling by a power of
    # two rounds nothing, and both norms are invariant under it with eps * c^2: LayerNorm gives
    # the unscaled F.layer_norm's results, bit for bit, wherever that did not overflow.
    c = norm_stat_scale(summed.shape[-1]) if acc != torch.float64 else 1.0
    if rms:
        scaled = wide * c
        mean_sq = scaled.pow(2).mean(dim=-1, keepdim=True)
        # s / sqrt(mean(s^2) + eps) as (c * s) / sqrt(c^2 * (mean(s^2) + eps)), which autograd
        # differentiates without underflow (through rsqrt it took rstd^3: 1e-57 at s ~ 1e19, a
        # wrong dx); a mean square beyond float32's range gives rstd 0 (out = bias), as
        # torch's rms_norm and every kernel do.
        root = torch.where((mean_sq / (c * c)).isinf(), math.inf, torch.sqrt(mean_sq + eps * c * c))
        normed = (scaled / root).to(summed.dtype)
        if weight is not None:
            normed = normed * weight
        if bias is not None:
            normed = normed + bias
    else:
        # weight/bias in the computation's dtype: with residual_in_fp32 the sum is float32 while
        # the parameters may be half precision (CPU layer_norm refuses that mix)
        w = weight.to(acc) if weight is not None else None
        b = bias.to(acc) if bias is not None else None
        if wide.numel():  # (no row to shift with no rows or hidden size 0: var_mean warned there)
            wide = wide * c  # (c = 1 in float64)
            # Each row shifted by a constant (LayerNorm is invariant under it; no gradient flows
            # through it), computed from Welford's statistics (torch.var_mean: exact for a constant
            # row, where torch's var gave 4.7e21 at 1e18):
            # - NaN where the variance overflows float32, as on every backend (out, dx and dweight
            #   NaN; dbias is sum(dout), finite). torch's layer_norm gave NaN for some such rows and
            #   rstd 0, a silent row of bias, for others.
            # - the row's mean where it is beyond 2^60: torch's layer_norm gives NaN from a mean of
            #   ~2e19 on, whatever the variance (a constant row of 3e19), and those rows'
            #   deviations, small against the mean where the variance is representable, keep it.
            # - the row's mean where the row is constant to float32's resolution (|mean| > 2^22
            #   std: deviations of a few ulps of the mean): torch's layer_norm backward loses them
            #   to the mean's rounding (a constant row of 1e12 gave dx = 0 and |dweight| 1.5e8, of
            #   1e6 |dweight| 108, for 0 and 0). Rows of a large mean and a resolvable spread (300
            #   +- 0.01) are not shifted: there the reference keeps torch's float32 accuracy, the
            #   oracle's yardstick the kernels are held to.
            # - else 0: the row as it is, bit for bit (ordinary rows).
            # In float64 (the oracle's truth) only the nearly constant rows are shifted: float64's
            # mean rounds there too, relative to the spread (1e8 +- 1e-4: out 2.3e-5 and dweight
            # 2.8e-4 off, where the kernels' pair (mean, corr) was within 1e-8), and its other
            # rows are left as torch's float64 layer_norm computes them.
            with torch.no_grad():
                var, mean = _row_var_mean(wide)
                nearly_constant = mean.abs() > 2.0 ** 22 * var.sqrt()
                if acc == torch.float64:
                    shift = torch.where(nearly_constant, mean, 0.0)
                else:
                    shift = torch.where((var / (c * c)).isinf(), math.nan,
                                        torch.where((mean.abs() > 2.0 ** 60) | nearly_constant, mean, 0.0))
            wide = wide - shift
        if _is_spelled_out():  # (by its definition: see spelled_out)
            centered = wide - wide.mean(dim=-1, keepdim=True)
            # (a division by the root, not a product with rsqrt, whose derivative forms rstd^3: it
            # underflowed float32 at rows of 1e17, a gradient 5-25 % off; as the RMS norm above)
            normed = centered / torch.sqrt(centered.square().mean(dim=-1, keepdim=True) + eps * c * c)
            if w is not None:
                normed = normed * w
            if b is not None:
                normed = normed + b
        else:
            normed = F.layer_norm(wide, wide.shape[-1:], w, b, eps * c * c)
    normed = normed.to(x.dtype)
    return (normed, summed) if prenorm else normed


def _row_var_mean(x: torch.Tensor):
    """``torch.var_mean(x, dim=-1, correction=0, keepdim=True)``, DTensors included (a norm under
    sequence parallelism): torch 2.11's DTensor has no sharding rule for var_mean (a
    NotImplementedError), and torch.var and torch.mean apart are not var_mean bit for bit (var gave
    4.7e21 for a constant row of 1e18). So a DTensor's statistics are var_mean's on each local
    shard, its rows first made whole where the mesh splits or sums them: the values torch 2.13's
    DTensor gives, on every torch."""
    if not is_dtensor(x):
        return torch.var_mean(x, dim=-1, correction=0, keepdim=True)
    from torch.distributed.tensor import DTensor, Replicate

    placements = tuple(Replicate() if p.is_partial() or (p.is_shard() and p.dim % x.ndim == x.ndim - 1) else p
                       for p in x.placements)
    if placements != tuple(x.placements):
        x = x.redistribute(x.device_mesh, placements)
    var, mean = torch.var_mean(x.to_local(), dim=-1, correction=0, keepdim=True)
    shape = x.shape[:-1] + (1,)
    stride = torch.empty(shape, device="meta").stride()
    return tuple(DTensor.from_local(t, x.device_mesh, placements, shape=shape, stride=stride) for t in (var, mean))


_SPELLED_OUT = threading.local()


@contextlib.contextmanager
def spelled_out():
    """Within it (this thread only), the reference math is written in plain ops that torch
    differentiates to any order in every mode, where two of torch's own ops fall short:
    - ``F.layer_norm``'s derivative formulas read its saved mean and rstd as constants, so a
      derivative taken through one of them misses their dependence on the input: against central
      differences (torch 2.13, float64) it was wrong forward over forward (``jvp(jvp)``), reverse
      over forward (a ``dual_level`` inside ``torch.func.grad``) and at the third order in reverse;
    - ``F.silu``'s backward (``silu_backward``) has no forward-mode formula: a backward under an
      open ``forward_ad.dual_level`` raised NotImplementedError.
    The fused ops' autograd Functions run their reference math inside it wherever a derivative will
    be taken of it (``ops._jvp_through``, ``ops._grad_with_graph``, nested forward mode). Outside it
    the reference keeps torch's ops: the values torch's modules give, bit for bit."""
    before = getattr(_SPELLED_OUT, "on", False)
    _SPELLED_OUT.on = True
    try:
        yield
    finally:
        _SPELLED_OUT.on = before


def _is_spelled_out() -> bool:
    return getattr(_SPELLED_OUT, "on", False)


def _silu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x) if _is_spelled_out() else F.silu(x)


def activation_fn(pre: torch.Tensor, activation: str) -> torch.Tensor:
    """The FFN activation; gated ones split ``pre`` into (gate, up) halves: act(gate) * up."""
    if activation in GATED_ACTIVATIONS:
        gate, up = pre.chunk(2, dim=-1)
        return (_silu(gate) if activation == "swiglu" else F.gelu(gate)) * up
    if activation == "relu":
        return F.relu(pre)
    if activation == "gelu":
        return F.gelu(pre)
    if activation == "gelu_tanh":
        return F.gelu(pre, approximate="tanh")
    if activation == "silu":
        return _silu(pre)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def hook_kind(module: nn.Module) -> Optional[str]:
    """What calling ``module`` runs besides its class's forward, which reading its parameters
    instead of calling it would skip: "forward hooks" (forward hooks or pre-hooks, weight_norm's
    among them, or a forward replaced on the instance, as accelerate's offloading hooks do) or
    "backward hooks" (``register_full_backward_hook``, ``register_full_backward_pre_hook``,
    ``register_backward_hook``: the call attaches them to the tensors it takes and returns, so
    without the call they never run and the gradients they would change come out unchanged).
    None when it has none. The module's own hooks only: torch's global module hooks
    (``register_module_forward_hook``, ...) are not looked at. (Its state_dict hooks change no
    result.)"""
    if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
        return "forward hooks"
    if module._backward_hooks or module._backward_pre_hooks:
        return "backward hooks"
    return None


def reads_as_called(module: Optional[nn.Module], cls: type = nn.Linear) -> bool:
    """Whether reading ``module``'s parameters computes what calling it computes, as the fused
    feed-forward does with its linears' weights (and the swapped modules with their children's):
    its class's forward is ``cls``'s (subclasses that keep it count, such as
    MultiheadAttention's ``out_proj``) and it has no hooks (``hook_kind``: forward or backward).
    A module that wraps the layer (PEFT's LoRA layers: ``lora.Linear`` holds the Linear as
    ``base_layer`` and adds the adapter's product in its forward, while its ``weight`` is the base
    layer's), a quantized linear (its own forward), weight_norm's pre-hook, a backward hook, or a
    forward replaced on the instance (accelerate's offloading hooks, which bring the weights in
    before the call) read False: callers then call the module instead, unfused but right."""
    return (module is not None and getattr(type(module), "forward", None) is cls.forward
            and hook_kind(module) is None)


def feed_forward(x, w1, b1=None, w2=None, b2=None, activation="relu", dropout_p=0.0, rng=None):
    """Linear(w1, b1) -> activation -> dropout -> Linear(w2, b2), nn.Linear weight layout.

    For swiglu/geglu, w1 is (2*d_ff, d): the gate rows first, then the up rows.
    """
    h = activation_fn(F.linear(x, w1, b1), activation)
    if dropout_p > 0.0:
        h = F.dropout(h, dropout_p) if rng is None else _rng.apply_dropout(h, dropout_p, *_rng.seed_offset(rng))
    return F.linear(h, w2, b2)


def rotary(x, cos, sin, positions, interleaved=False, conjugate=False):
    """Rotary position embedding (RoPE) of the first R = 2 * cos.shape[1] features of each head.

    x (B, L, H, D); cos, sin (S, R/2) tables; positions (B, L) ints: token (b, l) sits at position
    positions[b, l] and takes that row of the tables. Each pair (x1, x2) — features (i, i + R/2),
    GPT-NeoX's halves, or (2i, 2i + 1) with ``interleaved``, GPT-J's — turns by the angle whose
    cosine and sine the tables hold: (x1 c - x2 s, x1 s + x2 c). ``conjugate`` turns it back
    (s -> -s: the inverse rotation, which is also the backward). Features R.. pass unchanged.
    Computed in float32 (float64 for float64 x) and rounded once to x's dtype."""
    half = cos.shape[1]
    wide = torch.promote_types(x.dtype, torch.float32)
    index = positions.long()
    c, s = cos.to(wide)[index].unsqueeze(-2), sin.to(wide)[index].unsqueeze(-2)  # (B, L, 1, R/2)
    if conjugate:
        s = -s
    xw = x.to(wide)
    # Sliced only for a partial rotary (R < D): the slice of a whole dimension is an aten::alias,
    # which has no batching rule, and torch.autograd.functional.jacobian(vectorize=True) (forward
    # mode, or with create_graph), autograd.grad(is_grads_batched=True) and gradcheck's batched
    # gradients raised "Batching rule not implemented for aten::alias".
    partial = 2 * half < x.shape[-1]
    turned = xw[..., :2 * half] if partial else xw
    x1, x2 = (turned[..., 0::2], turned[..., 1::2]) if interleaved else (turned[..., :half], turned[..., half:])
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    turned = torch.stack((o1, o2), dim=-1).flatten(-2) if interleaved else torch.cat((o1, o2), dim=-1)
    return (torch.cat((turned, xw[..., 2 * half:]), dim=-1) if partial else turned).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Modules (the oracle of fused_attn.modules)
# --------------------------------------------------------------------------------------------

def check_count(name: str, value, minimum: int = 1) -> int:
    """A size or count constructor argument: an int (not a bool) >= ``minimum``, returned as a
    Python int (numpy's ints too, as the functional calls take them: they were refused here). (A
    float, or a negative size, failed inside torch's tensor factories without naming the argument;
    a negative count built an empty model.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def functional_checks():
    """``fused_attn.functional``, whose argument checks (``_check_bool``, ``_check_prob``, ...) the
    module constructors reuse: a module refuses at construction what its forward's calls would
    refuse (``dropout`` in [0, 1), as ``dropout_p``). Imported at call time: it imports this module."""
    from . import functional

    return functional


def merge_masks(attn_mask, key_padding_mask, dtype):
    """One mask from ``attn_mask`` (bool keep-mask or additive) and ``key_padding_mask``
    ((B, Lk), True = padding, as in torch.nn.MultiheadAttention), broadcastable to (B, H, Lq, Lk)."""
    if key_padding_mask is None:
        return attn_mask
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
    keep = ~key_padding_mask[:, None, None, :]
    if attn_mask is None:
        return keep
    if attn_mask.dtype == torch.bool:
        return attn_mask & keep
    return attn_mask.masked_fill(~keep, float("-inf"))


class KVCache:
    """One attention layer's keys and values for incremental decoding (``kv_cache=`` of the
    modules' forward): preallocated ``k`` and ``v`` (B, max_len, num_kv_heads, head_dim), in the
    layout ``fused_attn.attention_with_kvcache`` reads, and ``seqlens``, the int32 (B,) count of
    tokens each sequence holds. A forward with ``kv_cache`` appends its tokens and advances
    ``seqlens``; ``reset()`` empties the cache for the next batch. Inference only.

    A batch of prompts of different lengths is prefilled left-padded, with ``key_padding_mask``
    (True = padding) on the first call: ``leftpad`` (int32 (B,)) then holds each sequence's padding,
    rows the attention never reads (``attention_with_kvcache``'s ``cache_leftpad``), ``padded``
    says whether any was given, and later calls append every sequence's next token alike."""

    def __init__(self, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, device=None, dtype=None):
        # (a negative or float size failed inside torch.zeros without naming the argument; an empty
        # batch is a valid call of the modules, a cache of no tokens holds no step)
        batch = check_count("batch", batch, minimum=0)
        max_len, num_kv_heads, head_dim = (check_count(name, value) for name, value in (
            ("max_len", max_len), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)))
        check_device(device)
        self.k = torch.zeros(batch, max_len, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch, max_len, num_kv_heads, head_dim, device=device, dtype=dtype)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.leftpad = torch.zeros(batch, dtype=torch.int32, device=device)
        self.padded = False

    def reset(self) -> None:
        self.seqlens.zero_()
        self.leftpad.zero_()
        self.padded = False

    def _start_padded(self, key_padding_mask: torch.Tensor) -> None:
        """Record a left-padded prefill's padding (the call has checked the mask)."""
        self.leftpad.copy_(key_padding_mask.sum(dim=1))
        self.padded = True

    def __repr__(self) -> str:
        B, max_len, H, D = self.k.shape
        return f"KVCache(batch={B}, max_len={max_len}, num_kv_heads={H}, head_dim={D}, dtype={self.k.dtype})"


def check_kv_cache_call(module, query, key, value, attn_mask, key_padding_mask, cu_seqlens, is_causal, kv_cache):
    """A decoding call (``kv_cache``): causal self-attention on (B, L, d_model), no attn_mask, no
    packing, on a cache of this module's shape and batch; a ``key_padding_mask`` only to prefill an
    empty cache with left-padded prompts (checked here: one host read outside torch.compile, a
    device assert under it)."""
    if not isinstance(kv_cache, KVCache):
        raise TypeError(f"kv_cache must be a KVCache (module.new_kv_cache(batch, max_len)), got "
                        f"{type(kv_cache).__name__}")
    if key is not None and key is not query or value is not None and value is not query:
        raise ValueError("kv_cache is for self-attention: leave key and value out")
    if attn_mask is not None or cu_seqlens is not None:
        raise ValueError("kv_cache takes no attn_mask or cu_seqlens: each sequence attends its cached tokens and the "
                         "new ones, causally (a key_padding_mask may left-pad the prompts of the first call)")
    check_not_nested("query", query)
    check_is_causal(is_causal)  # (bool() took "False", 1 or [0] for True: a non-causal module decoded)
    if not (module.causal if is_causal is None else is_causal):
        raise ValueError("kv_cache decoding needs causal attention (causal=True, or is_causal=True): without it "
                         "earlier tokens would see later ones")
    if not isinstance(query, torch.Tensor) or query.dim() != 3 or query.shape[-1] != module.d_model:
        raise ValueError(f"with kv_cache, query must be (B, L, d_model={module.d_model}), got "
                         f"{tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__}")
    check_decoding_is_inference(module, query)
    want = (query.shape[0], module.num_kv_heads, module.head_dim)
    got = (kv_cache.k.shape[0], kv_cache.k.shape[2], kv_cache.k.shape[3])
    if got != want:
        raise ValueError(f"kv_cache holds (batch, kv heads, head dim) = {got}, but this call needs {want}")
    if key_padding_mask is not None:
        _check_left_padding(key_padding_mask, query, kv_cache)


def check_decoding_is_inference(module, query) -> None:
    """A decoding call records no gradient: asked of each attention module and, before its first
    layer writes, of a whole Transformer (a stack whose lower layers are frozen passed layer 0's
    check, which wrote into its cache, and was refused at the first trainable layer)."""
    if grad_recording() and (query.requires_grad or any(p.requires_grad for p in module.parameters())):
        raise ValueError("kv_cache decoding is inference (as FlashAttention's flash_attn_with_kvcache): run it under "
                         "torch.no_grad() or torch.inference_mode()")


def decode_step(module, query, kv_cache, key_padding_mask):
    """``module._decode`` after ``check_kv_cache_call``; a left-padded prefill records its padding
    first and, should the step be refused (it raises before writing), leaves the cache empty again."""
    if key_padding_mask is None:
        return module._decode(query, kv_cache)
    kv_cache._start_padded(key_padding_mask)
    try:
        return module._decode(query, kv_cache)
    except Exception:
        kv_cache.reset()
        raise


def _check_left_padding(pad, query, kv_cache) -> None:
    """A decoding call's key_padding_mask: bool (B, L), True = padding, only before each row's first
    token (left padding), and only on an empty cache (the prefill)."""
    shape = tuple(query.shape[:2])
    if not isinstance(pad, torch.Tensor) or pad.dtype != torch.bool or tuple(pad.shape) != shape:
        raise ValueError(f"with kv_cache, key_padding_mask must be a bool (B, L) = {shape} tensor (True = padding), "
                         f"got {pad.dtype if isinstance(pad, torch.Tensor) else type(pad).__name__} "
                         f"{tuple(pad.shape) if isinstance(pad, torch.Tensor) else ''}")
    if pad.device != query.device:
        raise ValueError(f"key_padding_mask is on {pad.device} but the input is on {query.device}")
    not_left = (pad[:, 1:] & ~pad[:, :-1]).any()  # a pad after a token
    not_empty = (kv_cache.seqlens != 0).any()
    if torch.compiler.is_compiling() or no_data(pad):  # (meta, fake: nothing to read; a no-op there)
        torch._assert_async(~(not_left | not_empty), "kv_cache: key_padding_mask must pad on the left, on the prefill "
                                                     "of an empty cache")
        return
    not_left, not_empty = torch.stack([not_left, not_empty]).tolist()
    if not_left:
        raise ValueError("with kv_cache, key_padding_mask must pad on the left (True only before a row's first "
                         "token): later tokens are appended after every sequence's last one")
    if not_empty:
        raise ValueError("with kv_cache, key_padding_mask is for the prefill of an empty cache (reset() it first): "
                         "the padding must come before every cached token")


class MultiHeadAttention(nn.Module):
    """Multi-head attention on batch-first (B, L, d_model) tensors.

    Heads are split from the projections, attend by scaled dot product and are concatenated
    before the output projection. ``num_kv_heads`` < ``num_heads`` gives grouped-query attention;
    ``window_size`` (left, right) local attention (see ``fused_attn.functional.attention``);
    ``alibi=True`` ALiBi position biases with the paper's slopes (``get_alibi_slopes``, kept in the
    non-persistent buffer ``alibi_slopes``, which ``module.to(dtype)`` rounds like any buffer:
    exact in bfloat16 for power-of-two head counts), or ``alibi="learnable"``: the same slopes as
    the (num_heads,) float32 parameter ``alibi_slopes``, trained with the rest on (B, L, d_model)
    and packed inputs alike (while the slopes take a gradient, the fused module runs each packed
    sequence through ``attention``, whose kernels return it, instead of one ``attention_varlen``
    call, whose kernels do not), and used as they are in decoding; ``sinks=True`` learnable
    attention sinks (gpt-oss: the (num_heads,) parameter ``sinks``, one logit per head joining
    every softmax row; initialised to zeros, so a new layer starts with each row sharing its
    weight with the sink);
    ``rotary=True`` rotary position embeddings (RoPE, Llama's / GPT-NeoX's halves, base
    ``rotary_base``) on the queries and keys, token l at position l (each packed sequence from 0):
    the angles are computed in float32 at each call, so ``module.to(dtype)`` does not round them.
    """

    def __init__(self, d_model, num_heads, dropout=0.0, bias=True, num_kv_heads=None, causal=False,
                 window_size=None, device=None, dtype=None, alibi=False, sinks=False, rotary=False,
                 rotary_base=10000.0):
        super().__init__()
        checks = functional_checks()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        d_model, num_heads, num_kv_heads = (check_count(name, value) for name, value in (
            ("d_model", d_model), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)))
        check_device(device)
        if d_model % num_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim = d_model // num_heads
        # (a string flag was read as True; a bad window or dropout failed only in forward, a dropout
        # of 1.5 only in training)
        for name, flag in (("bias", bias), ("causal", causal), ("sinks", sinks), ("rotary", rotary)):
            checks._check_bool(name, flag)
        self.dropout, self.causal = checks._check_prob("dropout", dropout), causal
        checks._check_window("window_size", window_size)
        self.window_size = None if window_size is None else tuple(window_size)
        kv_dim = num_kv_heads * self.head_dim
        factory = dict(device=device, dtype=dtype)
        self.query_linear = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.key_linear = nn.Linear(d_model, kv_dim, bias=bias, **factory)
        self.value_linear = nn.Linear(d_model, kv_dim, bias=bias, **factory)
        self.out_linear = nn.Linear(d_model, d_model, bias=bias, **factory)
        if not (isinstance(alibi, bool) or isinstance(alibi, str) and alibi == "learnable"):  # (not 0 / 1)
            raise ValueError(f"alibi must be False, True or 'learnable', got {alibi!r}")
        self.alibi = bool(alibi)
        # (filled by reset_parameters below, the one place that says how they start)
        if alibi == "learnable":  # (float32 at first; the call uses any float dtype in float32)
            self.alibi_slopes = nn.Parameter(torch.empty(num_heads, device=device, dtype=torch.float32))
        else:
            self.register_buffer("alibi_slopes", torch.empty(num_heads, device=device, dtype=torch.float32)
                                 if self.alibi else None, persistent=False)
            # a state dict does not hold the fixed slopes: loaded with assign=True into a module built
            # on meta, the weights arrive but the buffer would stay on meta (see the hook)
            self.register_load_state_dict_post_hook(_materialize_alibi_slopes)
        self.sinks = nn.Parameter(torch.empty(num_heads, **factory)) if sinks else None
        # (_finite: an int too large for a float is not finite; float() overflowed. Any real: numpy's
        # ints were refused, its floats taken)
        if isinstance(rotary_base, bool) or not isinstance(rotary_base, numbers.Real):
            raise TypeError(f"rotary_base must be a finite number > 0, got {type(rotary_base).__name__} "
                            f"{rotary_base!r}")
        if not (rotary_base > 0 and checks._finite(rotary_base)):
            raise ValueError(f"rotary_base must be a finite number > 0 (RoPE's angles are position / base ** "
                             f"(2i / head_dim)), got {checks._shown(rotary_base)}")
        self.rotary, self.rotary_base = bool(rotary), float(rotary_base)
        if self.rotary and self.head_dim % 2:
            raise ValueError(f"rotary=True turns pairs of features: the head dim (d_model / num_heads = "
                             f"{self.head_dim}) must be even")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise what this module holds itself, as the constructor does: ``sinks`` zeros,
        ``alibi_slopes`` (learnable or fixed) the paper's slopes (``get_alibi_slopes``), in their
        current dtype and device. The four projections are ``nn.Linear`` children with their own
        ``reset_parameters``, which this does not call: torch's convention (FSDP's meta-device
        init), each module initialising only its own tensors, so that calling ``reset_parameters``
        on every module of a model built on meta and ``to_empty``-ed gives a fresh construction's
        initialisation (the same random numbers, drawn in the same order, under the same seed)
        rather than drawing the projections twice."""
        with torch.no_grad():
            if self.sinks is not None:
                self.sinks.zero_()
            if self.alibi_slopes is not None:
                self.alibi_slopes.copy_(get_alibi_slopes(self.num_heads, self.alibi_slopes.device))

    def _apply(self, fn, recurse=True):
        slopes = self.alibi_slopes
        on_meta = self.alibi and not isinstance(slopes, nn.Parameter) and slopes.is_meta
        module = super()._apply(fn, recurse)
        slopes = self.alibi_slopes
        if on_meta and not slopes.is_meta:
            # Fixed slopes that had no values (built on meta) and now have memory (``to_empty``,
            # deferred initialisation): the state dict does not hold them, so they would stay
            # uninitialised; they are a function of the head count, recomputed in the buffer's new
            # dtype and device. Slopes that had values are converted by ``fn`` like any buffer
            # (``.to(dtype)`` rounds them; ``.float()``, ``.to(device)`` keep edited values):
            # recomputing them at every move reset slopes a user had set.
            self.alibi_slopes = get_alibi_slopes(self.num_heads, slopes.device).to(slopes.dtype)
        return module

    def _place_meta_slopes(self) -> None:
        """The fixed ALiBi slopes rebuilt if they are still on meta while the weights are
        not (a model built on meta whose weights were put in place some other way than
        ``load_state_dict`` or ``to_empty``, as by assigning parameters): the slopes are a function
        of the head count, so there is nothing to lose. Checked on each forward; ``is_meta`` is a
        property of the tensor, fixed when torch.compile traces, so the usual case adds no guard
        beyond the device's and no graph break."""
        slopes = self.alibi_slopes
        if slopes is not None and slopes.is_meta:
            _materialize_alibi_slopes(self)

    def new_kv_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        """An empty cache of ``max_len`` tokens for this layer (the parameters' device and dtype)."""
        weight = self.key_linear.weight
        return KVCache(batch, max_len, self.num_kv_heads, self.head_dim, device=device or weight.device,
                       dtype=dtype or weight.dtype)

    def rotary_tables(self, length: int, device) -> tuple:
        """The (length, head_dim/2) float32 cos and sin of the angles l * base^(-2i/head_dim)."""
        return self.rotary_tables_at(torch.arange(length, device=device))

    def rotary_tables_at(self, positions: torch.Tensor) -> tuple:
        """The float32 cos and sin of the angles p * base^(-2i/head_dim) of the integer
        ``positions`` (any shape; positions.shape + (head_dim/2,)): ``rotary_tables``' rows at
        those positions, the same float32 products, computed for them alone. A decoding step
        turns its L new tokens with these: tables of the cache's capacity, built at every step,
        made the time per token grow with max_len."""
        half = self.head_dim // 2
        inv_freq = self.rotary_base ** -(torch.arange(half, device=positions.device, dtype=torch.float32) / half)
        angles = positions.to(torch.float32)[..., None] * inv_freq
        return angles.cos(), angles.sin()

    def _decode(self, query, kv_cache):
        return _decode_reference(self, query, kv_cache)

    def split_heads(self, x, heads):
        B, L, _ = x.shape
        return x.view(B, L, heads, self.head_dim).transpose(1, 2)

    def forward(self, query, key=None, value=None, *, attn_mask=None, key_padding_mask=None, is_causal=None,
                cu_seqlens=None, max_seqlen=None, kv_cache=None):
        """query/key/value (B, L, d_model); or packed self-attention: query (total_tokens, d_model)
        holding sequences back to back, ``cu_seqlens`` their (B + 1,) cumulative lengths (see
        ``fused_attn.functional.attention_varlen``), ``max_seqlen`` the longest (optional); or
        incremental decoding with ``kv_cache`` (a ``KVCache``, ``new_kv_cache``): causal
        self-attention of the new tokens to the cached ones and themselves, token i of sequence b
        at position ``kv_cache.seqlens[b] + i``; the call appends them and advances the count. A
        ``key_padding_mask`` with ``kv_cache`` left-pads the prompts of the prefill (see ``KVCache``)."""
        self._place_meta_slopes()
        if kv_cache is not None:
            check_kv_cache_call(self, query, key, value, attn_mask, key_padding_mask, cu_seqlens, is_causal, kv_cache)
            return decode_step(self, query, kv_cache, key_padding_mask)
        if cu_seqlens is not None:
            check_packed_call(query, key, value, attn_mask, key_padding_mask, self.d_model)
            check_is_causal(is_causal)  # (as the fused module's: a string ran causal)
            bounds = check_packed_bounds(query, cu_seqlens, max_seqlen)
            q, k, v = (lin(query).unflatten(-1, (heads, self.head_dim)) for lin, heads in (
                (self.query_linear, self.num_heads), (self.key_linear, self.num_kv_heads),
                (self.value_linear, self.num_kv_heads)))
            if self.rotary:  # each sequence's tokens at positions 0, 1, ...
                positions = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])] +
                                      [torch.zeros(0, dtype=torch.int64)]).to(query.device)[None]
                cos, sin = self.rotary_tables(max([b - a for a, b in zip(bounds, bounds[1:])], default=0) + 1,
                                              query.device)
                q, k = (rotary(t[None], cos, sin, positions)[0] for t in (q, k))
            causal = self.causal if is_causal is None else is_causal
            p = self.dropout if self.training else 0.0
            out = attention_varlen(q, k, v, bounds, bounds, causal, p, window_size=self.window_size,
                                   alibi_slopes=self.alibi_slopes, sinks=self.sinks)
            return self.out_linear(out.flatten(-2))
        check_batched_call(query, key, value, self.d_model, self.num_heads, key_padding_mask, is_causal, attn_mask)
        key = query if key is None else key
        value = key if value is None else value
        B, Lq, _ = query.shape
        q = self.split_heads(self.query_linear(query), self.num_heads)
        k = self.split_heads(self.key_linear(key), self.num_kv_heads)
        v = self.split_heads(self.value_linear(value), self.num_kv_heads)
        if self.rotary:  # query l and key l at position l
            cos, sin = self.rotary_tables(max(q.shape[2], k.shape[2]), q.device)
            q, k = (rotary(t.transpose(1, 2), cos, sin, torch.arange(t.shape[2], device=t.device).expand(
                t.shape[0], -1)).transpose(1, 2) for t in (q, k))
        if attn_mask is not None:  # (the dtype as the fused module's call checks it, its autocast included)
            checks = functional_checks()
            checks._check_mask_dtype(checks._autocast(q, attn_mask)[1], q.dtype)
        mask = merge_masks(attn_mask, key_padding_mask, q.dtype)
        causal = self.causal if is_causal is None else is_causal
        p = self.dropout if self.training else 0.0
        out = attention(q, k, v, attn_mask=mask, causal=causal, dropout_p=p, window_size=self.window_size,
                        alibi_slopes=self.alibi_slopes, sinks=self.sinks)
        return self.out_linear(out.transpose(1, 2).reshape(B, Lq, self.d_model))


def _materialize_alibi_slopes(mha, incompatible_keys=None) -> None:
    """A ``load_state_dict`` post-hook of a ``MultiHeadAttention`` with fixed ALiBi slopes (also
    called from forward): slopes left on meta while the module's parameters are on a device
    (``load_state_dict(assign=True)`` into a module built on meta: the state dict holds the
    weights but not the non-persistent slopes) are recomputed there, in the buffer's dtype (what
    it would be had the module been built on that device and moved the same way). Otherwise the
    first forward failed naming ``alibi_slopes``, which the user never passed, ``.to(device)``
    failed copying out of meta, and ``to_empty`` would have discarded the loaded weights."""
    slopes = mha.alibi_slopes
    if slopes is None or isinstance(slopes, nn.Parameter) or not slopes.is_meta:
        return
    placed = next((p for p in mha.parameters() if not p.is_meta), None)
    if placed is not None:
        mha.alibi_slopes = get_alibi_slopes(mha.num_heads, placed.device).to(slopes.dtype)


def _decode_reference(mha, query, kv_cache):
    """The reference's decoding step: write the new keys and values after each sequence's cached
    ones, then each sequence alone through ``attention``, bottom-right causal, on its keys past its
    left padding (RoPE positions count the padding: they are the cache rows)."""
    B, L, _ = query.shape
    q = mha.query_linear(query).unflatten(-1, (mha.num_heads, mha.head_dim))  # (B, L, H, D)
    k = mha.key_linear(query).unflatten(-1, (mha.num_kv_heads, mha.head_dim))
    v = mha.value_linear(query).unflatten(-1, (mha.num_kv_heads, mha.head_dim))
    check_kv_cache_dtype(q, kv_cache)
    if torch.compiler.is_compiling() or not no_data(query):
        lengths, pads = kv_cache.seqlens.tolist(), kv_cache.leftpad.tolist()
    else:  # shapes without data (meta, fake): no counts to read; the step as on an empty cache has its shapes
        lengths, pads = [0] * B, [0] * B
    check_kv_cache_fits(kv_cache, lengths, L)
    if mha.rotary:  # token (b, i) at position lengths[b] + i: a table row for each, row b * L + i
        positions = torch.tensor(lengths, device=query.device)[:, None] + torch.arange(L, device=query.device)
        cos, sin = (t.flatten(0, 1) for t in mha.rotary_tables_at(positions))
        rows = torch.arange(B * L, device=query.device).view(B, L)
        q, k = rotary(q, cos, sin, rows), rotary(k, cos, sin, rows)
    outs = []
    for b, n in enumerate(lengths):
        kv_cache.k[b, n:n + L] = k[b]
        kv_cache.v[b, n:n + L] = v[b]
        keys, values = (t[b, pads[b]:n + L].transpose(0, 1)[None] for t in (kv_cache.k, kv_cache.v))
        outs.append(attention(q[b].transpose(0, 1)[None], keys, values, causal=True, window_size=mha.window_size,
                              alignment="bottom_right", alibi_slopes=mha.alibi_slopes,
                              sinks=mha.sinks)[0].transpose(0, 1))
    kv_cache.seqlens += L
    out = torch.stack(outs) if outs else q.new_zeros(0, L, mha.num_heads, mha.head_dim)  # (an empty batch)
    return mha.out_linear(out.reshape(B, L, mha.d_model))


def check_kv_cache_dtype(q, kv_cache) -> None:
    """A decoding step's cache against its query projections ``q``: one dtype and device, as
    ``attention_with_kvcache`` requires of q and the cache (outside autocast, under which that
    call casts the new tokens to the cache's dtype), checked under the names the modules' caller
    knows (the reference's torch ops failed on a float64 cache with "expected scalar type")."""
    checks = functional_checks()
    if not checks._autocast_enabled(q.device.type):
        checks._check_same("the query projection", q, {"kv_cache.k": kv_cache.k, "kv_cache.v": kv_cache.v})


def check_batched_call(query, key, value, d_model, num_heads, key_padding_mask=None, is_causal=None, attn_mask=None):
    """A module call without cu_seqlens or kv_cache is on (B, L, d_model) tensors: a 2-D input
    would otherwise fail unpacking its shape, without saying which argument or what it needs; a
    key_padding_mask is a bool (B, Lk) tensor on the input's device (another shape failed
    indexing, or was blamed on attn_mask), is_causal None or a bool (a string was read as True).
    attn_mask is checked here too, before ``merge_masks`` combines it with key_padding_mask: that
    merge failed inside torch on an int mask, a mask of another shape or device (or the error came
    from ``attention`` quoting the merged (B, 1, Lq, Lk) shape, not the caller's)."""
    check_is_causal(is_causal)
    if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_not_nested(name, t)
        if t is not None and (t.dim() != 3 or t.shape[-1] != d_model):
            packed = " (or (total_tokens, d_model) with cu_seqlens: packed sequences)" if name == "query" else ""
            raise ValueError(f"{name} must be (batch, length, d_model={d_model}){packed}, got {tuple(t.shape)}")
    # Compared here, under the caller's names and shapes: past the projections the kernels' own
    # checks quoted the head-split (B, H, L, D) shapes as q, k and v
    key_ = query if key is None else key
    value_ = key_ if value is None else value
    for name, t in (("key", key_), ("value", value_)):
        if t.shape[0] != query.shape[0]:
            raise ValueError(f"{name} must have query's batch size {query.shape[0]}, got {name} {tuple(t.shape)} "
                             f"and query {tuple(query.shape)}")
    if value_.shape[1] != key_.shape[1]:
        raise ValueError(f"key and value must have the same length, got key {tuple(key_.shape)} and value "
                         f"{tuple(value_.shape)}")
    if key_padding_mask is not None:
        expected = (query.shape[0], (query if key is None else key).shape[1])
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (batch, key length) = {expected}, True = "
                            f"padding, got {getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must be (batch, key length) = {expected} (True = padding), got "
                             f"{tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != query.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but query is on {query.device}")
    if attn_mask is not None:
        # (a floating mask of another dtype than the projections' passes the merge, which keeps its
        # dtype, and ``attention`` names it: under autocast the dtype it needs is not query's)
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = attend) or a floating-point additive mask, got "
                            f"{functional_checks()._dtype_name(attn_mask.dtype)}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        target = (query.shape[0], num_heads, query.shape[1], (query if key is None else key).shape[1])
        if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to (batch, num_heads, "
                             f"query length, key length) = {target}")


def check_is_causal(is_causal) -> None:
    if is_causal is not None and not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be None or a bool, got {is_causal!r}")


def check_not_nested(name: str, t) -> None:
    """A module's attention input that is a nested tensor raises TypeError saying what to pass (the
    shapes are not read first: a strided nested tensor has none, and raised torch's internal error)."""
    if isinstance(t, torch.Tensor) and t.is_nested:
        checks = functional_checks()
        raise checks._nested_error(name, t, checks.NESTED_MODULE)


def check_packed_call(query, key, value, attn_mask, key_padding_mask, d_model):
    """A packed (cu_seqlens) module call is self-attention on a (total_tokens, d_model) input."""
    if key is not None and key is not query or value is not None and value is not query:
        raise ValueError("cu_seqlens (packed sequences) is for self-attention: leave key and value out")
    if attn_mask is not None or key_padding_mask is not None:
        raise ValueError("cu_seqlens (packed sequences) takes no attn_mask or key_padding_mask: the "
                         "sequence boundaries are the mask")
    check_not_nested("query", query)
    if not isinstance(query, torch.Tensor) or query.dim() != 2 or query.shape[1] != d_model:
        raise ValueError(f"with cu_seqlens, the input must be (total_tokens, d_model={d_model}), got "
                         f"{tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__}")


def check_packed_bounds(query, cu_seqlens, max_seqlen, read: bool = True) -> Optional[list]:
    """A packed module call's ``cu_seqlens`` and ``max_seqlen``, checked under those names (the
    calls they go to name them otherwise: ``cu_seqlens_q`` / ``max_seqlen_q`` in
    ``attention_varlen``), the same in the fused and the reference modules: the checks that need no
    data as ``attention_varlen``'s, then the boundaries read to the host once (one device-to-host
    copy) and returned, for the caller to use without reading them again. Under torch.compile,
    where the host cannot read them, nothing is read unless ``read`` (the call breaks the graph
    there anyway): None, and the op checks them when it runs. Meta and fake tensors (shapes without
    data) have nothing to read: None, or with ``read`` the boundaries of one sequence of every
    token, [0, total], which give the per-sequence paths the shapes of the real call."""
    compiling = torch.compiler.is_compiling()
    functional_checks()._check_cu_seqlens("cu_seqlens", cu_seqlens, "max_seqlen", max_seqlen, query.device,
                                          ref="query")
    if compiling and not read:
        return None
    if not compiling and no_data(query):
        return [0, query.shape[0]] if read else None
    bounds = cu_seqlens.tolist()
    lengths = check_cumulative("cu_seqlens", bounds, query.shape[0], " (the input's tokens)")
    check_longest("max_seqlen", max_seqlen, lengths, "cu_seqlens")
    return bounds


def check_kv_cache_fits(kv_cache, lengths: list, new: int, cause: Optional[BaseException] = None) -> None:
    """A decoding step's ``new`` tokens fit after each sequence's ``lengths`` cached ones; raised
    ``from cause`` (the fused module checks only when ``attention_with_kvcache`` refused the call,
    whose message names its own arguments, cache_seqlens and k_cache: no extra host read per step)."""
    capacity = kv_cache.k.shape[1]
    longest = max(lengths, default=0)
    if longest + new > capacity:
        raise ValueError(f"kv_cache holds {capacity} tokens a sequence; {longest} + {new} do not fit (sequence "
                         f"{lengths.index(longest)}): reset() it, or make a longer one with new_kv_cache") from cause


class LayerNormResidual(nn.Module):
    """norm(dropout(x) + residual): LayerNorm or RMSNorm with the residual add in front."""

    def __init__(self, d_model, eps=1e-5, norm="layernorm", bias=True, dropout=0.0, device=None, dtype=None):
        super().__init__()
        checks = functional_checks()
        d_model = check_count("d_model", d_model)
        check_device(device)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        checks._check_bool("bias", bias)
        self.d_model, self.eps, self.norm = d_model, checks._check_eps(eps), norm
        self.dropout = checks._check_prob("dropout", dropout)
        self.weight = nn.Parameter(torch.empty(d_model, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(d_model, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)initialise the norm, as the constructor does (and as ``nn.LayerNorm``'s): weight
        ones, bias zeros (for a model built on meta, then ``to_empty``)."""
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x, residual=None, prenorm=False):
        p = self.dropout if self.training else 0.0
        # The fused module's checks (its call's), so that both refuse the same inputs: torch's ops
        # here took an int x, a float64 x next to float32 parameters and a string prenorm, and
        # failed deep inside torch on a wrong size. The math below takes the operands as given.
        functional_checks()._check_norm_call(x, residual, self.weight, self.bias, self.eps, p, prenorm,
                                             self.norm == "rmsnorm", False, torch.compiler.is_compiling())
        return layer_norm_residual(x, residual, self.weight, self.bias, self.eps, dropout_p=p,
                                   prenorm=prenorm, rms=self.norm == "rmsnorm")


class FeedForward(nn.Module):
    """Linear(d, d_ff) -> activation -> dropout -> Linear(d_ff, d); gated activations double linear1."""

    def __init__(self, d_model, d_ff=None, activation="relu", dropout=0.0, bias=True, device=None, dtype=None):
        super().__init__()
        checks = functional_checks()
        d_model = check_count("d_model", d_model)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        d_ff = 4 * d_model if d_ff is None else check_count("d_ff", d_ff)
        check_device(device)
        checks._check_bool("bias", bias)
        self.d_model, self.d_ff, self.activation = d_model, d_ff, activation
        self.dropout = checks._check_prob("dropout", dropout)
        factory = dict(device=device, dtype=dtype)
        width = 2 * d_ff if activation in GATED_ACTIVATIONS else d_ff
        self.linear1 = nn.Linear(d_model, width, bias=bias, **factory)
        self.linear2 = nn.Linear(d_ff, d_model, bias=bias, **factory)

    def forward(self, x):
        p = self.dropout if self.training else 0.0
        if not (reads_as_called(self.linear1) and reads_as_called(self.linear2)):
            return self.unfused_forward(x)
        # The fused module's checks (its call's), so that both refuse the same inputs (here torch's
        # linear raised its own errors, naming no argument, on a wrong size or dtype)
        functional_checks()._check_ffn_call(x, self.linear1.weight, self.linear1.bias, self.linear2.weight,
                                            self.linear2.bias, self.activation, p, torch.compiler.is_compiling())
        return feed_forward(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                            activation=self.activation, dropout_p=p)

    # The dropouts applied outside the ops (the reference: torch's; the fused modules override
    # it with the ops' counter-based RNG, ``functional._counter_dropout``).
    _dropout = staticmethod(F.dropout)

    def unfused_forward(self, x):
        """The linears called as modules: for linears that are not plain (``reads_as_called``),
        an adapter's (LoRA's) product included. Dropout from ``_dropout`` (here torch's)."""
        p = self.dropout if self.training else 0.0
        return self.linear2(self._dropout(activation_fn(self.linear1(x), self.activation), p))


class TransformerLayer(nn.Module):
    """One encoder layer; post-LN by default, pre-LN with ``norm_first=True``.

    post-LN:  y = norm1(dropout(mha(x)) + x);           z = norm2(dropout(ffn(y)) + y)
    pre-LN:   y = x + dropout(mha(norm1(x)));           z = y + dropout(ffn(norm2(y)))
    """

    # pre-LN's last dropout, the one no op applies: torch's here (see FeedForward._dropout)
    _dropout = staticmethod(F.dropout)

    def __init__(self, d_model, num_heads, d_ff=None, dropout=0.0, activation="relu", bias=True,
                 norm_first=False, norm="layernorm", eps=1e-5, num_kv_heads=None, causal=False,
                 window_size=None, device=None, dtype=None, alibi=False, sinks=False, rotary=False,
                 rotary_base=10000.0):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.norm_first = functional_checks()._check_bool("norm_first", norm_first)
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

    def new_kv_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        return self.multi_head_attention.new_kv_cache(batch, max_len, device=device, dtype=dtype)

    def forward(self, x, *, attn_mask=None, key_padding_mask=None, is_causal=None, cu_seqlens=None,
                max_seqlen=None, kv_cache=None):
        """x (B, L, d_model), or packed sequences (total_tokens, d_model) with ``cu_seqlens``; with
        ``kv_cache`` (``new_kv_cache``) a decoding step (see ``MultiHeadAttention.forward``)."""
        attend = lambda h: self.multi_head_attention(h, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                                     is_causal=is_causal, cu_seqlens=cu_seqlens,
                                                     max_seqlen=max_seqlen, kv_cache=kv_cache)
        if self.norm_first:
            # The residual stream x passes the norms untouched: norm(0 + x), then x + dropout(branch)
            # (norm2 adds the attention branch to the stream and normalises the sum in one step).
            h = self.norm1(x)
            normed, x = self.norm2(attend(h), x, prenorm=True)
            p = self.norm2.dropout if self.training else 0.0
            return x + self._dropout(self.ffn(normed), p)
        y = self.norm1(attend(x), x)
        return self.norm2(self.ffn(y), y)


def _check_layer_caches(caches) -> None:
    """The layers' caches must agree (as ``Transformer.new_kv_cache`` makes them): each layer checks
    its own cache and writes into it, so a later layer refusing a cache of another shape or kind
    would leave the earlier layers' caches holding the step and the later ones not. Their counts
    too (``seqlens``, ``leftpad``, ``padded``): caches at other fill levels were accepted, the layers
    decoding at other positions, and a step that fit layer 0's cache but not a fuller later one was
    refused there, after layer 0 had written and advanced. With equal shapes and counts, layer 0's
    own checks (the step fits, a padded prefill goes into an empty cache) refuse before its write
    exactly the steps every later layer's would, so the whole step is refused or none of it.
    The counts are read on the host once a step (one sync; ``attention_with_kvcache`` reads each
    layer's anyway); under torch.compile, and on tensors without data, a device assert instead (as
    ``_check_left_padding``): no graph break, and the compiled step fails before its writes."""
    for i, cache in enumerate(caches):
        if not isinstance(cache, KVCache):
            raise TypeError(f"kv_cache[{i}] must be a KVCache (Transformer.new_kv_cache), got {type(cache).__name__}")
    first = caches[0]
    index_of = {id(first): 0}  # (one pass: a scan of the earlier layers was quadratic in the depth)
    for i, cache in enumerate(caches[1:], 1):
        shared = index_of.setdefault(id(cache), i)
        if shared != i:  # (layer i would write after layer j's new tokens, or overflow after j wrote)
            raise ValueError(f"kv_cache[{i}] is kv_cache[{shared}]: every layer needs a cache of its own "
                             f"(Transformer.new_kv_cache)")
        for name in ("k", "v", "seqlens", "leftpad"):
            a, b = getattr(first, name), getattr(cache, name)
            if (a.shape, a.dtype, a.device) != (b.shape, b.dtype, b.device):
                raise ValueError(f"kv_cache[{i}].{name} is {b.dtype} {tuple(b.shape)} on {b.device} but kv_cache[0]."
                                 f"{name} is {a.dtype} {tuple(a.shape)} on {a.device}: every layer's cache must have "
                                 f"the same shape, dtype and device (Transformer.new_kv_cache)")
        if cache.padded != first.padded:
            raise ValueError(f"kv_cache[{i}].padded is {cache.padded} but kv_cache[0].padded is {first.padded}: every "
                             f"layer's cache must hold the same left-padded prompts (reset() them all, or make new "
                             f"ones with Transformer.new_kv_cache)")
    if len(caches) == 1:
        return
    seqlens, leftpad = (torch.stack([getattr(c, name) for c in caches]) for name in ("seqlens", "leftpad"))
    if torch.compiler.is_compiling() or no_data(seqlens):  # (meta, fake: nothing to read; a no-op there)
        torch._assert_async((seqlens == seqlens[0]).all() & (leftpad == leftpad[0]).all(),
                            "kv_cache: every layer's cache must hold the same tokens (seqlens and leftpad)")
        return
    counts = torch.stack([seqlens, leftpad.to(seqlens.dtype)], dim=1).tolist()  # (layers, 2, B): one read
    for i, (lengths, pads) in enumerate(counts[1:], 1):
        for name, a, b in (("seqlens", counts[0][0], lengths), ("leftpad", counts[0][1], pads)):
            if a != b:
                raise ValueError(f"kv_cache[{i}].{name} is {b} but kv_cache[0].{name} is {a}: every layer's cache "
                                 f"must hold the same tokens, one Transformer call steps them all (reset() them all, "
                                 f"or make new ones with Transformer.new_kv_cache)")


class Transformer(nn.Module):
    """A stack of ``num_layers`` TransformerLayers (``layers``, a ModuleList)."""

    def __init__(self, d_model, num_heads, num_layers, **layer_kwargs):
        super().__init__()
        num_layers = check_count("num_layers", num_layers)
        self.layers = nn.ModuleList(TransformerLayer(d_model, num_heads, **layer_kwargs) for _ in range(num_layers))

    def new_kv_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> list:
        """One empty ``KVCache`` per layer, for ``forward(..., kv_cache=caches)``."""
        return [layer.new_kv_cache(batch, max_len, device=device, dtype=dtype) for layer in self.layers]

    def forward(self, x, *, attn_mask=None, key_padding_mask=None, is_causal=None, cu_seqlens=None,
                max_seqlen=None, kv_cache=None):
        """As a layer's; ``kv_cache``: a list of one KVCache per layer (``new_kv_cache``)."""
        if kv_cache is not None and (not isinstance(kv_cache, (list, tuple)) or len(kv_cache) != len(self.layers)):
            raise ValueError(f"kv_cache must be a list of {len(self.layers)} KVCaches, one per layer "
                             f"(Transformer.new_kv_cache), got {type(kv_cache).__name__}")
        if kv_cache is not None:
            _check_layer_caches(kv_cache)
            if isinstance(x, torch.Tensor):  # (else layer 0's own checks say what x must be)
                check_decoding_is_inference(self, x)
        for i, layer in enumerate(self.layers):
            x = layer(x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                      cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, kv_cache=None if kv_cache is None else kv_cache[i])
        return x
