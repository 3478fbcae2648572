"""What every backend declares, and the description of a call it is asked to take.

A backend is an object with a ``name``, an ``unavailable_reasons()`` (why it cannot run on this
machine at all) and a ``call_reasons(call)`` (why it cannot take this particular call), and one
launcher per op half, each with the argument list of the op schema:

    attention_fwd(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, softcap,
                  alibi_slopes, bottom_right) -> (out, lse)
    attention_bwd(dout, q, k, v, out, lse, attn_mask, band_lo, band_hi, dropout_p, scale, seed,
                  offset, mask_grad, softcap, alibi_slopes, bottom_right, dlse) -> (dq, dk, dv, dmask)
    layer_norm_residual_fwd(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32,
                            seed, offset, store_summed=True) -> (out, summed, mean, rstd)
    layer_norm_residual_bwd(dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms,
                            seed, offset, x_dtype) -> (dsum, dx, dweight, dbias)
    feed_forward_fwd(x, w1, b1, w2, b2, activation, dropout_p, seed, offset) -> (out, pre)
    feed_forward_bwd(dout, x, w1, w2, pre, activation, dropout_p, seed, offset, has_b1, has_b2)
        -> (dx, dw1, db1, dw2, db2)
    rotary(x, cos, sin, positions, interleaved, conjugate, out=None) -> out

The contract each launcher keeps (see docs in fused_attn/ops.py for the full statement):

- attention: q (B, Hq, Lq, D), k (B, Hkv, Lk, D), v (B, Hkv, Lk, Dv), any strides; attn_mask is
  None or a 4-D (B, Hq, Lq, Lk) *view* (stride 0 along broadcast dims, never materialised), bool
  (True = attend) or q's dtype (additive). Query i sees key j iff i + band_lo <= j <= i + band_hi
  and the mask lets it (unbounded ends come as +-2^62: clamp with ``ops_common.clamp_band``).
  softcap > 0 caps the scaled scores (``softcap * tanh(s / softcap)``); then the additive mask and,
  when ``alibi_slopes`` (float32 (B, Hq), any strides) is given, ``-slope[b, h] * |j - i - shift|``
  are added, shift = Lk - Lq if ``bottom_right`` else 0. The slopes get no gradient.
  ``out`` is (B, Hq, Lq, Dv) with the memory layout of a contiguous (B, Lq, Hq, Dv) tensor
  (``new_attention_out``); ``lse`` is (B, Hq, Lq) in ``lse_dtype`` (float32, float64 for float64), +inf on rows with no key left (so
  exp(s - lse) = 0 there and such rows give zeros). ``dmask`` is the (B, Hq, Lq, Lk) gradient
  of the additive mask when ``mask_grad``, else an empty tensor. ``dlse`` (None, or lse's dtype and
  shape with any strides) is the lse's gradient: it joins the backward as delta - dlse, delta
  being rowsum(dout * out) (d lse_i / d s_ij = P_ij).
- layer_norm_residual: x (N, d), residual None or (N, d), weight/bias None or (d,). ``summed``
  is dropout(x) + residual in x's dtype, with ``residual_in_fp32`` in the wider of float32 and x's
  dtype (float64 x: float64); ``mean`` (empty for rms) and ``rstd`` are (N,) in the wider of
  float32 and x's dtype (float64 x: float64, as torch's native_layer_norm saves them; the cpu
  backward reads them, and float32 ones would cost it float64's accuracy). With ``store_summed=False`` (inference without prenorm)
  ``summed`` is an empty (0,) tensor of that dtype and need not be computed to memory. Backward returns ``dsum`` (the gradient of the sum, in
  summed's dtype, which is also the residual's gradient) and ``dx`` (x's gradient in ``x_dtype``:
  dropout of dsum rounded to ``x_dtype``, as the forward's dropout(x) is in x's dtype)
  only when dropout is on; without dropout ``dx`` is empty and the caller uses ``dsum`` for both.
  dweight/dbias are empty when weight/bias are None.
- feed_forward: x (T, d), w1 (F1, d) with F1 = d_ff or 2*d_ff (gated), w2 (d, d_ff). ``pre`` is
  x @ w1^T + b1, saved for backward; the activation is recomputed from it there. db1/db2 are
  empty when absent.
- rotary: x (B, L, H, D), cos/sin (S, R/2) floats of any dtype, positions (B, L) int32/int64, all
  with any strides; every position in [0, S) (checked before the call; given others, the cpu
  launcher raises and the triton and cuda kernels clamp them into the tables). The result is
  ``torch.empty_like(x)`` (x's layout when x is dense, else contiguous); x's dtype, computed in
  float32 (float64 for float64) and rounded once; features R.. copied. ``conjugate`` negates sin
  (the inverse rotation: the backward). With ``out`` (x's shape and dtype, no overlapping
  elements, possibly x itself: the embedding in place) the result goes there and ``out`` is
  returned. See ``fused_attn.reference.rotary``.
- Empty sizes: the attention ops never reach a backend with an empty q/k/v (ops.py answers those
  itself); layer_norm_residual and feed_forward launchers must handle 0 rows (no launch).
- Outputs never alias inputs; inputs are never written (but rotary's ``out`` when given).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops_common import lse_dtype, new_varlen_out, sequence_band, varlen_lse_shape, varlen_rng_offset

OPS = ("attention", "layer_norm_residual", "feed_forward", "rotary")


@dataclass(frozen=True)
class Call:
    """The facts about one functional call that decide which backend can take it."""

    op: str
    device: torch.device
    dtype: torch.dtype
    options: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.op} on {self.device.type} {str(self.dtype).replace('torch.', '')}" + (f" ({opts})" if opts else "")


class Backend:
    """Base class: subclasses set the class attributes and implement the launchers."""

    name: str = ""
    #: device types this backend runs on
    devices: tuple[str, ...] = ()
    #: dtypes accepted, per op (missing op = op not implemented by this backend)
    dtypes: dict[str, tuple[torch.dtype, ...]] = {}
    #: whether attention_varlen_fwd takes ``block_table=`` and reads a paged KV cache in place;
    #: otherwise the pages are gathered into packed K / V for it (``ops_common.gather_kv_pages``)
    paged_kv: bool = False

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all on this machine (empty list = it can)."""
        return []

    def call_reasons(self, call: Call) -> list[str]:
        """Why this backend cannot take ``call`` (empty list = it can)."""
        reasons = list(self.unavailable_reasons())
        if call.device.type not in self.devices:
            reasons.append(f"runs on {'/'.join(self.devices)} tensors, got {call.device.type}")
        supported = self.dtypes.get(call.op)
        if supported is None:
            reasons.append(f"does not implement {call.op}")
        elif call.dtype not in supported:
            names = ", ".join(str(d).replace("torch.", "") for d in supported)
            reasons.append(f"{call.op} supports dtypes {names}, got {str(call.dtype).replace('torch.', '')}")
        return reasons

    # ---- varlen attention: one attention_fwd / attention_bwd per sequence -------------------
    # Backends without a packed kernel inherit these: each sequence runs through the backend's own
    # attention launchers on strided views of the packed tensors (no copies of q, k, v). The
    # sequence boundaries are read on the host, one sync. The Triton backend and the cpu backend
    # (fused_attn_C::attention_varlen_*, bitwise this loop's results) have packed kernels.

    def attention_varlen_fwd(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
                             bottom_right, dropout_p, scale, seed, offset, softcap=0.0, seqused_k=None,
                             alibi_slopes=None):
        out = new_varlen_out(q, v.shape[-1])
        out.zero_()  # sequences with queries but no keys give zeros
        lse = torch.full(varlen_lse_shape(q), float("inf"), device=q.device, dtype=lse_dtype(q))
        for q0, q1, o, l in self._varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, band_lo, band_hi, bottom_right,
                                                   dropout_p, scale, seed, offset, softcap, seqused_k, alibi_slopes):
            out[q0:q1] = o
            lse[:, q0:q1] = l
        return out, lse

    def _varlen_sequences(self, q, k, v, cu_seqlens_q, cu_seqlens_k, band_lo, band_hi, bottom_right, dropout_p, scale,
                          seed, offset, softcap, seqused_k, alibi_slopes):
        """(q0, q1, out rows (q1 - q0, Hq, Dv), lse (Hq, q1 - q0)) of each sequence with queries and keys."""
        cu_q, cu_k, k_end = _boundaries(cu_seqlens_q, cu_seqlens_k, seqused_k)
        q_part, k_part, v_part = _rows_of(q, cu_q), _rows_of(k, cu_k), _rows_of(v, cu_k)
        for s in range(len(cu_q) - 1):
            q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], k_end[s]
            if q1 == q0 or k1 == k0:
                continue
            lo, hi = sequence_band(band_lo, band_hi, bottom_right, q1 - q0, k1 - k0)
            o, l = self.attention_fwd(q_part(s, q1 - q0), k_part(s, k1 - k0), v_part(s, k1 - k0), None, lo, hi,
                                      dropout_p, scale, seed, varlen_rng_offset(offset, q.shape[1], q0), softcap,
                                      _row(alibi_slopes, s), bottom_right)
            yield q0, q1, o[0].transpose(0, 1), l[0]

    def attention_varlen_bwd(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             band_lo, band_hi, bottom_right, dropout_p, scale, seed, offset, softcap=0.0,
                             seqused_k=None, alibi_slopes=None, dlse=None):
        cu_q, cu_k, k_end = _boundaries(cu_seqlens_q, cu_seqlens_k, seqused_k)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for s in range(len(cu_q) - 1):
            q0, q1, k0, k1 = cu_q[s], cu_q[s + 1], cu_k[s], k_end[s]
            if q1 == q0 or k1 == k0:
                continue
            lo, hi = sequence_band(band_lo, band_hi, bottom_right, q1 - q0, k1 - k0)
            g = self.attention_bwd(_seq(dout, q0, q1), _seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1),
                                   _seq(out, q0, q1), lse[:, q0:q1].unsqueeze(0).contiguous(), None, lo, hi, dropout_p,
                                   scale, seed, varlen_rng_offset(offset, q.shape[1], q0), False, softcap,
                                   _row(alibi_slopes, s), bottom_right,
                                   None if dlse is None else dlse[:, q0:q1].unsqueeze(0))
            dq[q0:q1] = g[0][0].transpose(0, 1)
            dk[k0:k1] = g[1][0].transpose(0, 1)
            dv[k0:k1] = g[2][0].transpose(0, 1)
        return dq, dk, dv


def _boundaries(cu_seqlens_q, cu_seqlens_k, seqused_k):
    """The sequence bounds on the host: (cu_q, cu_k, where each sequence's keys end)."""
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    k_end = cu_k[1:] if seqused_k is None else [a + n for a, n in zip(cu_k, seqused_k.tolist())]
    return cu_q, cu_k, k_end


def _row(alibi_slopes, s: int):
    """Sequence s's (1, Hq) slopes of the varlen (num_sequences, Hq) ones, or None."""
    return None if alibi_slopes is None else alibi_slopes[s:s + 1]


def _rows_of(t: torch.Tensor, bounds: list):
    """``part(s, n)``: the first n rows of sequence s (rows ``bounds[s]:bounds[s + 1]`` of a packed
    (total, heads, dim) tensor) as a (1, heads, n, dim) view. Sorted bounds within t are cut by one
    ``torch.split``, whose backward is one cat: slicing each sequence out of t would give each
    slice's backward a gradient of t's full size, quadratic in the number of sequences for the
    reference backend's differentiated forward (400 sequences of 64 tokens: 18 s). Other bounds
    (not sorted) are sliced."""
    total = t.shape[0]
    if bounds and 0 <= bounds[0] and bounds[-1] <= total and all(a <= b for a, b in zip(bounds, bounds[1:])):
        sizes = [bounds[0]] + [b - a for a, b in zip(bounds, bounds[1:])] + [total - bounds[-1]]
        pieces = torch.split(t, sizes)[1:]
        return lambda s, n: pieces[s][:n].transpose(0, 1).unsqueeze(0)
    return lambda s, n: _seq(t, bounds[s], bounds[s] + n)


def _seq(t: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start:end of a packed (total, heads, dim) tensor as a (1, heads, len, dim) view."""
    return t[start:end].transpose(0, 1).unsqueeze(0)
