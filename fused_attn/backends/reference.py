"""The ``reference`` backend: the plain-PyTorch oracle behind the op interface.

Runs anywhere torch runs. Forward calls the functions in ``fused_attn.reference``; backward
recomputes the forward under autograd and differentiates it (it stores nothing extra, as a fused
backend would not). It is the fallback of ``auto`` and the baseline of the benchmarks.
"""
from __future__ import annotations

import functools

import torch

from .. import reference as ref
from .base import Backend, Call
from ..ops_common import clamp_band, empty, lse_dtype, vjp


def _alibi(alibi_slopes, bottom_right):
    """The reference functions' ALiBi keywords (the band is given, the alignment places ALiBi)."""
    return {"alibi_slopes": alibi_slopes, "alignment": "bottom_right" if bottom_right else "top_left"}


def _rng(dropout_p, seed, offset):
    return (seed, offset) if dropout_p > 0.0 else None


def _without_autocast(method):
    """The op body with autocast off for its tensors' device. The functional layer has applied
    autocast's casting to the inputs already; under it, the reference's own torch.matmul calls were
    cast again, so the oracle computed its "float32" scores, lse and gradients in bfloat16/float16
    (and `auto`'s fallback with them): lse returned in bfloat16, errors several times the cpu
    backend's."""
    @functools.wraps(method)
    def run(self, first, *args, **kwargs):
        device = first.device.type if isinstance(first, torch.Tensor) else "meta"
        if device == "meta" or not torch.is_autocast_enabled(device):
            return method(self, first, *args, **kwargs)
        with torch.autocast(device, enabled=False):
            return method(self, first, *args, **kwargs)
    return run


class ReferenceBackend(Backend):
    name = "reference"
    devices = ("cpu", "cuda", "meta")  # (its plain PyTorch runs on meta tensors: shapes without data)
    _all = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    dtypes = {"attention": _all, "layer_norm_residual": _all, "feed_forward": _all, "rotary": _all}

    # ---- attention -------------------------------------------------------------------------
    @_without_autocast
    def attention_fwd(self, q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, softcap=0.0,
                      alibi_slopes=None, bottom_right=False):
        band = clamp_band(band_lo, band_hi, q.shape[2], k.shape[2])
        alibi = _alibi(alibi_slopes, bottom_right)
        o = _attention_in_float32(q, k, v, attn_mask, dropout_p, scale, _rng(dropout_p, seed, offset), band, softcap,
                                  alibi)
        # the op's layout, (B, Hq, Lq, Dv) stored as (B, Lq, Hq, Dv), made without writing into a
        # new tensor (an in-place copy into an unbatched tensor fails under torch.func.vmap)
        out = o.transpose(1, 2).contiguous().transpose(1, 2)
        wide = lse_dtype(q)
        lse = ref.attention_lse(q.to(wide), k.to(wide), attn_mask if attn_mask is None or attn_mask.dtype == torch.bool
                                else attn_mask.to(wide), False, scale, band=band, softcap=softcap, **alibi)
        return out, lse.contiguous()

    @_without_autocast
    def attention_bwd(self, dout, q, k, v, out, lse, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset,
                      mask_grad, softcap=0.0, alibi_slopes=None, bottom_right=False, dlse=None):
        # ops_common.vjp: plain autograd (it runs inside saved-tensor hooks, torch.func does not),
        # torch.func.vjp where autograd cannot record (below the autograd key: a registered op's
        # implementation; under torch.func's transforms).
        rng = _rng(dropout_p, seed, offset)
        band = clamp_band(band_lo, band_hi, q.shape[2], k.shape[2])
        alibi = _alibi(alibi_slopes, bottom_right)
        wide = lse_dtype(q)

        def outputs(q_, k_, v_, m_):
            out = _attention_in_float32(q_, k_, v_, m_, dropout_p, scale, rng, band, softcap, alibi)
            if dlse is None:
                return (out,)
            # and the lse, for its own gradient: the oracle's, in the dtype the forward returns it in
            m_wide = m_ if m_ is None or m_.dtype == torch.bool else m_.to(wide)
            return out, ref.attention_lse(q_.to(wide), k_.to(wide), m_wide, False, scale, band=band,
                                          softcap=softcap, **alibi)

        grads_out = (dout,) if dlse is None else (dout, dlse.to(wide))
        if mask_grad:
            _, vjp_fn = vjp(outputs, q, k, v, attn_mask)
            dq, dk, dv, dmask = vjp_fn(grads_out)
        else:
            _, vjp_fn = vjp(lambda q_, k_, v_: outputs(q_, k_, v_, attn_mask), q, k, v)
            (dq, dk, dv), dmask = vjp_fn(grads_out), empty(q)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), dmask.contiguous()

    @_without_autocast
    def attention_varlen_fwd(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
                             bottom_right, dropout_p, scale, seed, offset, softcap=0.0, seqused_k=None,
                             alibi_slopes=None):
        # The base class's loop, its sequences joined rather than written into a buffer: the
        # reference is differentiated by torch.func (jacfwd, hessian through the varlen Function),
        # under whose vmap an in-place write into an unbatched tensor fails. Rows of no sequence,
        # and sequences with queries but no keys, give zeros and an lse of +inf.
        hq, dv = q.shape[1], v.shape[-1]
        outs, lses, done = [], [], 0

        def rows_without_keys(n):
            outs.append(q.new_zeros(n, hq, dv))
            lses.append(torch.full((hq, n), float("inf"), device=q.device, dtype=lse_dtype(q)))

        for q0, q1, o, l in self._varlen_sequences(q, k, v, cu_seqlens_q, cu_seqlens_k, band_lo, band_hi, bottom_right,
                                                   dropout_p, scale, seed, offset, softcap, seqused_k, alibi_slopes):
            rows_without_keys(q0 - done)
            outs.append(o)
            lses.append(l)
            done = q1
        rows_without_keys(q.shape[0] - done)
        return torch.cat(outs).contiguous(), torch.cat(lses, dim=1).contiguous()

    @_without_autocast
    def attention_varlen_bwd(self, dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                             band_lo, band_hi, bottom_right, dropout_p, scale, seed, offset, softcap=0.0,
                             seqused_k=None, alibi_slopes=None, dlse=None):
        # the forward above differentiated whole (no per-sequence writes, for vmap, as there)
        def outputs(q_, k_, v_):
            o, l = self.attention_varlen_fwd(q_, k_, v_, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             band_lo, band_hi, bottom_right, dropout_p, scale, seed, offset, softcap,
                                             seqused_k, alibi_slopes)
            return (o,) if dlse is None else (o, l)

        _, vjp_fn = vjp(outputs, q, k, v)
        dq, dk, dv = vjp_fn((dout,) if dlse is None else (dout, dlse.to(lse_dtype(q))))
        return dq.contiguous(), dk.contiguous(), dv.contiguous()

    # ---- residual-add + norm ----------------------------------------------------------------
    @_without_autocast
    def layer_norm_residual_fwd(self, x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, seed, offset,
                                store_summed=True):
        out, summed = ref.layer_norm_residual(x, residual, weight, bias, eps, dropout_p, prenorm=True, rms=rms,
                                              residual_in_fp32=residual_in_fp32, rng=_rng(dropout_p, seed, offset))
        s = summed.to(torch.promote_types(x.dtype, torch.float32))  # the statistics' dtype (base.py)
        rstd_src = s.pow(2).mean(-1) if rms else (s - s.mean(-1, keepdim=True)).pow(2).mean(-1)
        rstd = torch.rsqrt(rstd_src + eps)
        mean = empty(x, s.dtype) if rms else s.mean(-1)
        if not store_summed:
            summed = summed.new_empty((0,))
        elif summed is x or summed is residual:  # no dropout and no residual: never alias an input
            summed = summed.clone()
        return out, summed, mean, rstd

    @_without_autocast
    def layer_norm_residual_bwd(self, dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms, seed, offset, x_dtype):
        params = [p for p in (weight, bias) if p is not None]

        def norm(s, *ps):
            w = ps[0] if weight is not None else None
            b = ps[-1] if bias is not None else None
            return ref.layer_norm_residual(s, None, w, b, eps, rms=rms).to(dout.dtype)

        _, vjp_fn = vjp(norm, summed, *params)
        dsum, *dparams = vjp_fn(dout)
        dweight = dparams[0] if weight is not None else empty(summed)
        dbias = dparams[-1] if bias is not None else empty(summed)
        if dsummed is not None:
            dsum = dsum + dsummed
        dsum = dsum.to(summed.dtype).contiguous()
        dx = empty(summed, x_dtype)
        if dropout_p > 0.0:
            dx = ref._rng.apply_dropout(dsum.to(x_dtype), dropout_p, seed, offset).contiguous()
        return dsum, dx, dweight, dbias

    # ---- feed-forward -----------------------------------------------------------------------
    @_without_autocast
    def feed_forward_fwd(self, x, w1, b1, w2, b2, activation, dropout_p, seed, offset):
        pre = torch.nn.functional.linear(x, w1, b1)
        h = ref.activation_fn(pre, activation)
        if dropout_p > 0.0:
            h = ref._rng.apply_dropout(h, dropout_p, seed, offset)
        return torch.nn.functional.linear(h, w2, b2), pre

    @_without_autocast
    def feed_forward_bwd(self, dout, x, w1, w2, pre, activation, dropout_p, seed, offset, has_b1, has_b2):
        def act(p):
            h = ref.activation_fn(p, activation)
            return ref._rng.apply_dropout(h, dropout_p, seed, offset) if dropout_p > 0.0 else h
        h, vjp_fn = vjp(act, pre)
        (dpre,) = vjp_fn(dout @ w2)
        dw2 = dout.t() @ h
        wide = torch.promote_types(dout.dtype, torch.float32)  # (float64 stays float64)
        db2 = dout.to(wide).sum(0).to(dout.dtype) if has_b2 else empty(x)
        dw1 = dpre.t() @ x
        db1 = dpre.to(wide).sum(0).to(dpre.dtype) if has_b1 else empty(x)
        dx = dpre @ w1
        return dx.contiguous(), dw1.contiguous(), db1, dw2.contiguous(), db2

    # ---- rotary embedding -------------------------------------------------------------------
    @_without_autocast
    def rotary(self, x, cos, sin, positions, interleaved, conjugate, out=None):
        result = ref.rotary(x, cos, sin, positions, interleaved, conjugate)
        if out is None and torch._C._are_functorch_transforms_active():
            return result  # (under vmap a copy into an unbatched tensor fails; the layout is the caller's)
        out = torch.empty_like(x) if out is None else out
        out.copy_(result)
        return out


def _attention_in_float32(q, k, v, attn_mask, dropout_p, scale, rng, band, softcap, alibi):
    """The reference attention computed in float32 at least, returned in q's dtype: as the kernels
    and SDPA's math backend compute half-precision inputs (scores, softmax and the probabilities'
    product in bfloat16 were ~40x less accurate than SDPA). ``fused_attn.reference.attention``
    itself stays in the input dtype: the oracle's low-precision reference."""
    wide = torch.promote_types(q.dtype, torch.float32)
    if q.dtype == wide:
        return ref.attention(q, k, v, attn_mask, False, dropout_p, scale, rng, band=band, softcap=softcap, **alibi)
    mask = attn_mask if attn_mask is None or attn_mask.dtype == torch.bool else attn_mask.to(wide)
    out = ref.attention(q.to(wide), k.to(wide), v.to(wide), mask, False, dropout_p, scale, rng, band=band,
                        softcap=softcap, **alibi)
    return out.to(q.dtype)
