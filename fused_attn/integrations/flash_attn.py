"""FlashAttention's Python API on fused_attn's kernels, so code written for ``flash_attn`` runs
unchanged: on CPUs (the C++ backend), on GPUs where FlashAttention is not installed (the Triton
and CUDA backends), and under ``torch.compile``::

    from fused_attn.integrations.flash_attn import flash_attn_func
    out = flash_attn_func(q, k, v, causal=True)     # q (B, Lq, H, D), as FlashAttention's

    fused_attn.patch_flash_attn()                   # ``import flash_attn`` now finds this module

What is here, with FlashAttention 2.8's signatures and meaning:

- ``flash_attn_interface``: ``flash_attn_func``, ``flash_attn_qkvpacked_func``,
  ``flash_attn_kvpacked_func``, ``flash_attn_varlen_func``, ``flash_attn_varlen_qkvpacked_func``,
  ``flash_attn_varlen_kvpacked_func``, ``flash_attn_with_kvcache``;
- ``layers.rotary``: ``apply_rotary_emb`` (and ``apply_rotary_emb_func``), ``apply_rotary_emb_qkv_``,
  ``apply_rotary_emb_kv_``, ``apply_rotary_emb_torch``, ``rotate_half``, ``RotaryEmbedding`` (no xPos);
- ``ops.triton.layer_norm``: ``layer_norm_fn``, ``rms_norm_fn``, ``RMSNorm``;
- ``ops.triton.rotary``: ``apply_rotary`` (``conjugate`` included);
- ``bert_padding``: ``unpad_input``, ``unpad_input_for_concatenated_sequences``, ``pad_input``,
  ``index_first_axis``, ``index_put_first_axis``.

FlashAttention's conventions, which differ from ``fused_attn.functional``'s: tensors are (batch,
seqlen, heads, dim); ``causal`` and ``window_size`` are bottom-right aligned (the last query faces
the last key) and so is ALiBi; ``window_size=(-1, -1)`` and ``softcap=0.0`` mean off, and a
window is rewritten by FlashAttention's rules on the keys' length (see ``_window``). The output
is contiguous (B, Lq, H, Dv), as FlashAttention's. Beyond FlashAttention: any float dtype and
device fused_attn runs on, and ``softmax_lse`` is differentiable.

``deterministic`` is accepted and has no effect: every fused_attn backward is deterministic.
``num_splits`` (``flash_attn_with_kvcache``) is a scheduling hint, accepted and ignored: the
backends choose their own split of the keys. ``return_attn_probs=True`` returns ``(out,
softmax_lse, S_dmask)``; ``S_dmask`` is an empty tensor without dropout (as FlashAttention's)
and, with dropout, the probabilities with the dropped ones negated, recomputed by the float32
reference (an exact (B, H, Lq, Lk) tensor, where FlashAttention rounds the sizes up to 128: for
tests, as FlashAttention says of its own).

Norms (``layer_norm_fn``): weight and bias of another dtype than x (float32 parameters under
mixed precision) are used in x's dtype, where FlashAttention reads them in float32: one rounding
of the parameters. ``residual_out`` has the residual's dtype when a residual is given (else
float32 with ``residual_in_fp32``, else x's), as FlashAttention's. ``eps`` must be > 0 (this
library refuses 0, FlashAttention accepts it).

Arguments that fused_attn has no kernel for (``layer_norm_fn``'s ``x1``, ``weight1``, ``bias1``,
``rowscale``, ``out``, ``residual_out``) raise ``ValueError`` naming them; a name this stand-in
does not provide raises ``ImportError`` when imported from a patched ``flash_attn`` module (so
``except ImportError`` fallbacks work), naming what it does provide.
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
from torch import Tensor

from .. import _rng
from .. import reference as R
from ..functional import (_check_bool, _check_scale, _concrete, _draw_rng, _finite, _shown, apply_rotary_emb,
                          attention, attention_varlen, attention_with_kvcache, layer_norm_residual,
                          mixed_norm_operands)
from ..ops_common import as_int, check_device, is_int, known_true, no_data
from ..rotary import check_inplace_write
from ._shapes import check_shapes
from ._stand_in import StandInModules

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache",
           "apply_rotary_emb", "apply_rotary_emb_qkv_", "apply_rotary_emb_kv_", "apply_rotary_emb_func",
           "apply_rotary_emb_torch", "rotate_half", "RotaryEmbedding", "layer_norm_fn", "rms_norm_fn", "RMSNorm",
           "unpad_input", "unpad_input_for_concatenated_sequences", "pad_input", "index_first_axis",
           "index_put_first_axis", "patch_flash_attn"]

# The FlashAttention release whose Python API this module follows (its local part says who serves it).
FLASH_ATTN_VERSION = "2.8.3+fused_attn"


# ---------------------------------------------------------------------------------------------
# Argument translation
# ---------------------------------------------------------------------------------------------

def _window(window_size, seqlen_k=None, seqlen_q=None) -> Optional[tuple]:
    """FlashAttention's (left, right), -1 = unbounded, to the window fused_attn's functions apply
    for it (None: no window). ``seqlen_k``: the keys' length FlashAttention's rules use (k's
    seqlen; ``max_seqlen_k`` for varlen); None: no rule applied (the caller applies them).

    FlashAttention 2 rewrites the window before its kernels see it (csrc/flash_attn/flash_api.cpp):
    mha_fwd / mha_varlen_fwd / mha_fwd_kvcache make a side >= seqlen_k unbounded (-1), then
    set_params_fprop bounds an unbounded side by seqlen_k when the other side is bounded (>= 0).
    Neither is a no-op next to fused_attn's window, whose -1 is unbounded and whose sides are
    taken as given: bottom-right, query i faces key i + Lk - Lq, so with Lq > Lk (-1, 5) hides
    every key from the first Lq - Lk - 5 queries where FlashAttention gives full attention, and
    (2, -1) becomes (2, Lk), whose right side hides keys from the first Lq - Lk - 1 queries (all
    of them from the first Lq - 2 Lk). (A left side of seqlen_k bounds nothing: it is returned as
    FlashAttention has it.) ``attention_with_kvcache`` applies both rules itself, on the cache's
    capacity. ``seqlen_q``: the queries' length (varlen: ``max_seqlen_q``), used only when
    ``seqlen_k`` is symbolic (``_symbolic_window``)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:  # (a TypeError, as attention's)
        raise TypeError(f"window_size must be a pair (left, right), -1 for an unbounded side, got {window_size!r}")
    left, right = window_size
    if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in (left, right)):
        # (checked before the (-1, -1) test below, which (-1.0, -1.0) passed)
        raise TypeError(f"window_size must be a pair of ints (left, right), -1 for an unbounded side, got "
                        f"{window_size!r}")
    # Any negative side is unbounded, as FlashAttention reads it (its kernels test side < 0; a
    # (-2, 0) window is causal there), where fused_attn's functions take -1 only
    left, right = (-1 if side < 0 else int(side) for side in (left, right))
    if isinstance(seqlen_k, torch.SymInt) and (left, right) != (-1, -1):
        return _symbolic_window((left, right), seqlen_k, seqlen_q)
    if seqlen_k is not None:
        left, right = (-1 if side >= seqlen_k else side for side in (left, right))
        if left == -1 and right >= 0:
            left = seqlen_k
        elif right == -1 and left >= 0:
            right = seqlen_k
    if left == -1 and right == -1:
        return None
    return (left, right)


def _symbolic_window(window_size, seqlen_k, seqlen_q) -> tuple:
    """``_window``'s rules where ``seqlen_k`` is a torch.SymInt (torch.export with a dynamic key
    length): comparing a side with it would guard on the length (export refuses: "Constraints
    violated") and bounding a side by it would make a symbolic window (attention refuses it). No
    rule is needed where none changes the mask. Bottom-right, query i faces key i + Lk - Lq: a
    left side >= Lk hides nothing, so neither left-side rule changes the mask; a right side r
    hides keys from query 0 only when Lq > r + 1, so the right-side rules (a side >= Lk made -1,
    a -1 made Lk) change it only when Lq > Lk + 1, and a right side of 0 only at Lk = 0, where
    there is no key to hide. Otherwise the window as FlashAttention has it depends on whether
    Lq > Lk + 1: where the example inputs have Lq <= Lk + 1 the trace guards on it
    (``known_true``), a guard q and k given one Dim satisfy (a non-strict export does not see them
    equal while tracing) and that independent Dims turn into a check of the exported program's
    inputs (torch 2.13: "Guard failed: q.size()[1] <= 1 + k.size()[1]") or an export error. Where
    they have Lq > Lk + 1: refused. (No shortcut on a right side below the traced Lk: the trace
    takes a dynamic size to be >= 2, and the program then runs at 1.)"""
    left, right = window_size
    if right == 0 or (seqlen_q is not None and is_int(seqlen_q) and known_true(seqlen_q <= seqlen_k + 1)):
        return (left, right)
    raise ValueError(
        f"window_size={tuple(window_size)!r} with a symbolic key length ({seqlen_k}) and query length "
        f"({seqlen_q}): FlashAttention rewrites the window on the keys' length, which changes the mask only "
        f"when there are more than Lk + 1 queries, as in the example inputs, and a traced program cannot follow "
        f"that rewriting with Lk symbolic. Trace with Lq <= Lk + 1 (e.g. q and k given one Dim), a right side "
        f"of 0, or no window")


def _max_seqlen(max_seqlen, cu_seqlens, window_size, q=None, k=None, block_table=None):
    """varlen's ``max_seqlen_k`` for the window rules: as given, or when None (FlashAttention
    requires it; fused_attn reads it from the boundaries) and a window is given, the longest
    sequence of ``cu_seqlens`` (one read of the boundaries); on meta or fake tensors, which have
    no boundaries to read, the keys' total (k's rows, or its pages times their rows), as
    attention_varlen bounds it there (the shapes are those of any window); None where no rule is
    needed or attention_varlen raises (not an int; None under torch.compile)."""
    if max_seqlen is None:
        if (isinstance(window_size, (tuple, list)) and tuple(window_size) != (-1, -1)
                and isinstance(cu_seqlens, Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel() > 1
                and not torch.compiler.is_compiling()):
            if isinstance(q, Tensor) and isinstance(k, Tensor) and k.dim() >= 2 and (no_data(q) or no_data(cu_seqlens)):
                return k.shape[0] * k.shape[1] if block_table is not None else k.shape[0]
            return int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        return None
    if not is_int(max_seqlen):
        return None
    return as_int(max_seqlen)  # (a torch.SymInt under export: _window's rules then take _symbolic_window)


def _softcap(softcap) -> Optional[float]:
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a float (0.0: off), got {type(softcap).__name__}")
    return None if softcap == 0.0 else softcap


def _flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
             return_attn_probs, seqlen_k, seqlen_q=None) -> dict:
    """The keyword arguments of fused_attn's attention for FlashAttention's options (``seqlen_k``:
    see ``_window``)."""
    _flag("deterministic", deterministic)  # every fused_attn backward is deterministic already
    _flag("return_attn_probs", return_attn_probs)
    if softmax_scale is not None:  # (under FlashAttention's name: attention says scale)
        _check_scale("softmax_scale", _concrete(softmax_scale))
    return dict(causal=causal, window_size=_window(window_size, seqlen_k, seqlen_q), alignment="bottom_right",
                dropout_p=dropout_p, scale=softmax_scale, softcap=_softcap(softcap), alibi_slopes=alibi_slopes,
                return_lse=return_attn_probs)


def _split(packed: Tensor, name: str, dim: int, count: int) -> tuple:
    """q, k, v (or k, v) as views of a packed tensor; ``unbind``'s backward stacks the three
    gradients into one tensor of the packed layout, as FlashAttention's packed backward writes it."""
    if not isinstance(packed, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dim() != dim + 3 or packed.shape[dim] != count:
        layout = {(2, 3): "(B, L, 3, H, D)", (2, 2): "(B, L, 2, Hkv, D)", (1, 3): "(total, 3, H, D)",
                  (1, 2): "(total, 2, Hkv, D)"}[(dim, count)]
        raise ValueError(f"{name} must have shape {layout}, got {tuple(packed.shape)}")
    return packed.unbind(dim)


def _check_varlen_shapes(q, k, v, block_table, names=("q", "k", "v"), shown=None) -> None:
    """``check_shapes`` in varlen's layout: q (total_q, Hq, D), k and v (total_k, Hkv, D/Dv), or
    pages (num_pages, page_size, Hkv, D/Dv) with a block_table (attention_varlen's own errors name
    a paged k's heads k.shape[1], and a packed form's views)."""
    kv_lead = ("number of pages", "page size") if block_table is not None else ("number of tokens",)
    check_shapes(q, k, v, names, shown, q_lead=1, kv_lead=kv_lead, batched=False)


def _bhld(t: Tensor) -> Tensor:
    """(B, L, H, D) <-> (B, H, L, D), a view."""
    return t.transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# S_dmask: what return_attn_probs returns with dropout
# ---------------------------------------------------------------------------------------------

def _dropout_probs(q, k, opts: dict, rng: Tensor, offset: int = 0) -> Tensor:
    """The attention probabilities (B, Hq, Lq, Lk) of one call, in float32 from the reference, with
    the elements that call's dropout dropped negated (FlashAttention's ``S_dmask`` encoding). The
    probabilities are attention with the identity as values; the keep mask is the counter RNG's
    for the call's (seed, offset), rows (b, h, i) flattened, as every backend draws it."""
    with torch.no_grad():
        q32, k32 = q.detach().float(), k.detach().float()
        B, Hq, Lq, _ = q32.shape
        Hkv, Lk = k32.shape[1], k32.shape[2]
        eye = torch.eye(Lk, device=q.device).expand(B, Hkv, Lk, Lk)
        slopes = opts["alibi_slopes"]
        probs = R.attention(q32, k32, eye, None, opts["causal"], 0.0, opts["scale"], None,
                            window_size=opts["window_size"], alignment="bottom_right", softcap=opts["softcap"],
                            alibi_slopes=None if slopes is None else slopes.float())
        keep = _rng.keep_mask(int(rng[0]), int(rng[1]) + offset, opts["dropout_p"], B * Hq * Lq, Lk,
                              device=q.device).view(B, Hq, Lq, Lk)
        return torch.where(keep, probs, -probs)


def _rng_state():
    """torch's default CPU generator state before a call, from which the call draws its dropout
    seed (``functional._draw_rng``): the call itself is made as with the flag off, so the same
    seed gives the same mask whether or not the mask is asked for."""
    return torch.random.get_rng_state()


def _redraw(state, dropout_p, like: Tensor) -> Tensor:
    """The (seed, offset) the call on ``like`` drew from ``state``, redrawn; the generator is left as
    the call left it."""
    after = torch.random.get_rng_state()
    torch.random.set_rng_state(state)
    try:
        return _draw_rng(dropout_p, None, like)
    finally:
        torch.random.set_rng_state(after)


# ---------------------------------------------------------------------------------------------
# flash_attn.flash_attn_interface
# ---------------------------------------------------------------------------------------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """FlashAttention's ``flash_attn_func``: q (B, Lq, Hq, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv),
    ``Hq % Hkv == 0``; returns (B, Lq, Hq, Dv), or ``(out, softmax_lse (B, Hq, Lq), S_dmask)`` with
    ``return_attn_probs``. causal, window and ALiBi bottom-right aligned; the window as
    FlashAttention applies it (``_window``)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (batch, seqlen, heads, dim) tensor, got {tuple(t.shape)}")
    check_shapes(q, k, v)  # here, in (B, L, H, D): attention's errors would quote the transposed views
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs, k.shape[1], q.shape[1])
    qh, kh, vh = _bhld(q), _bhld(k), _bhld(v)
    probs_wanted = return_attn_probs and isinstance(dropout_p, numbers.Real) and dropout_p > 0.0
    state = _rng_state() if probs_wanted else None
    result = attention(qh, kh, vh, **opts)
    if not return_attn_probs:
        return _bhld(result)
    out, lse = result
    s_dmask = _dropout_probs(qh, kh, opts, _redraw(state, dropout_p, qh)) if probs_wanted else q.new_empty(0)
    return _bhld(out), lse, s_dmask


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` on qkv (B, L, 3, H, D); its gradient is one (B, L, 3, H, D) tensor."""
    q, k, v = _split(qkv, "qkv", 2, 3)
    check_shapes(q, k, v, ("qkv",) * 3, (qkv,) * 3)  # (errors in qkv's name and shape, not its views')
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_func`` on q (B, Lq, Hq, D) and kv (B, Lk, 2, Hkv, D)."""
    k, v = _split(kv, "kv", 2, 2)
    if isinstance(q, Tensor):  # (errors in kv's name and shape, not its views'; flash_attn_func checks q itself)
        check_shapes(q, k, v, ("q", "kv", "kv"), (q, kv, kv))
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """FlashAttention's ``flash_attn_varlen_func``: packed q (total_q, Hq, D), k, v (total_k, Hkv,
    D/Dv) (or a paged cache with ``block_table``) and int32 ``cu_seqlens``; returns (total_q, Hq,
    Dv), or ``(out, softmax_lse (Hq, total_q), S_dmask (B, Hq, max_seqlen_q, max_seqlen_k))``.
    The window as FlashAttention applies it, its rules on ``max_seqlen_k`` (``_window``)."""
    if isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor):
        _check_varlen_shapes(q, k, v, block_table)
    opts = _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                    return_attn_probs, _max_seqlen(max_seqlen_k, cu_seqlens_k, window_size, q, k, block_table),
                    max_seqlen_q)
    probs_wanted = return_attn_probs and isinstance(dropout_p, numbers.Real) and dropout_p > 0.0
    state = _rng_state() if probs_wanted else None
    result = attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table=block_table,
                              **opts)
    if not return_attn_probs:
        return result
    out, lse = result
    s_dmask = q.new_empty(0)
    if probs_wanted:
        if block_table is not None:
            raise ValueError("return_attn_probs with dropout_p > 0 and a block_table: S_dmask is a test aid of "
                             "packed (unpaged) calls")
        rng = _redraw(state, dropout_p, q)
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        Hq = q.shape[1]
        s_dmask = q.new_zeros(len(cu_q) - 1, Hq, int(max_seqlen_q), int(max_seqlen_k), dtype=torch.float32)
        for s in range(len(cu_q) - 1):
            qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1).unsqueeze(0)
            ks = k[cu_k[s]:cu_k[s + 1]].transpose(0, 1).unsqueeze(0)
            slopes = opts["alibi_slopes"]
            seq_opts = dict(opts, alibi_slopes=slopes if slopes is None or slopes.dim() == 1 else slopes[s])
            s_dmask[s, :, :qs.shape[2], :ks.shape[2]] = _dropout_probs(qs, ks, seq_opts, rng, Hq * cu_q[s])[0]
    return out, lse, s_dmask


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """``flash_attn_varlen_func`` on qkv (total, 3, H, D), one ``cu_seqlens`` for queries and keys."""
    q, k, v = _split(qkv, "qkv", 1, 3)
    _check_varlen_shapes(q, k, v, None, ("qkv",) * 3, (qkv,) * 3)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """``flash_attn_varlen_func`` on q (total_q, Hq, D) and kv (total_k, 2, Hkv, D)."""
    k, v = _split(kv, "kv", 1, 2)
    if isinstance(q, Tensor):
        _check_varlen_shapes(q, k, v, None, ("q", "kv", "kv"), (q, kv, kv))
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens: Optional[Union[int, Tensor]] = None, cache_batch_idx=None,
                            cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False):
    """FlashAttention's ``flash_attn_with_kvcache`` (see ``fused_attn.attention_with_kvcache``, which
    it calls): k and v, when given, are written into the cache in place. ``rotary_interleaved``
    defaults to True, as FlashAttention's. ``cache_seqlens=None`` reads the whole cache (every
    row of a dense cache, every page of each block_table row), and needs no new k and v.
    ``num_splits`` is accepted and ignored. The window as FlashAttention applies it, its rules
    on the cache's capacity (``attention_with_kvcache`` applies them)."""
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral):
        raise TypeError(f"num_splits must be an int >= 0 (0: the library's choice), got {type(num_splits).__name__}")
    if num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: the library's choice), got {num_splits!r}")
    if softmax_scale is not None:
        _check_scale("softmax_scale", _concrete(softmax_scale))
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("cache_seqlens is needed with new k and v (as FlashAttention): it says where each "
                             "sequence's new keys go")
        if isinstance(k_cache, Tensor) and k_cache.dim() == 4:
            cache_seqlens = (k_cache.shape[1] if block_table is None or not isinstance(block_table, Tensor)
                             else block_table.shape[-1] * k_cache.shape[1])
    return attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens,
                                  cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                                  block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                                  rotary_interleaved=rotary_interleaved, causal=causal,
                                  window_size=_window(window_size), scale=softmax_scale, softcap=_softcap(softcap),
                                  alibi_slopes=alibi_slopes, return_lse=return_softmax_lse)


# ---------------------------------------------------------------------------------------------
# flash_attn.layers.rotary
# ---------------------------------------------------------------------------------------------

def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False, seqlen_offsets=0,
                          num_heads_q=None):
    """Turns q and k of a packed qkv in place and returns qkv: (B, L, 3, H, D), or (B, L, Hq + 2 Hkv,
    D) with ``num_heads_q`` = Hq (grouped-query). ``cos_k``/``sin_k``: other tables for k (default
    cos/sin)."""
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    if qkv.dim() == 5:
        if qkv.shape[2] != 3:
            raise ValueError(f"qkv must have shape (B, L, 3, H, D), got {tuple(qkv.shape)}")
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    elif qkv.dim() == 4:
        if num_heads_q is None:
            raise ValueError(f"qkv of shape {tuple(qkv.shape)} (B, L, Hq + 2 Hkv, D) needs num_heads_q")
        if not is_int(num_heads_q):
            raise TypeError(f"num_heads_q must be an int >= 1, got {type(num_heads_q).__name__} {num_heads_q!r}")
        if num_heads_q < 1:
            raise ValueError(f"num_heads_q must be an int >= 1, got {num_heads_q!r}")
        num_heads_q = int(num_heads_q)
        kv_heads = qkv.shape[2] - num_heads_q
        if kv_heads <= 0 or kv_heads % 2:
            raise ValueError(f"qkv has {qkv.shape[2]} heads: num_heads_q = {num_heads_q} leaves no even number "
                             f"of key and value heads")
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + kv_heads // 2]
    else:
        raise ValueError(f"qkv must be (B, L, 3, H, D) or (B, L, Hq + 2 Hkv, D), got {tuple(qkv.shape)}")
    # q turned out of place first: a call refused for k's tables or positions changes nothing
    q_turned = apply_rotary_emb(q, cos, sin, interleaved=interleaved, seqlen_offsets=seqlen_offsets)
    apply_rotary_emb(k, cos_k, sin_k, interleaved=interleaved, inplace=True, seqlen_offsets=seqlen_offsets)
    q.copy_(q_turned)
    return qkv


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """Turns k of a packed kv (B, L, 2, Hkv, D) in place and returns kv."""
    if not isinstance(kv, Tensor):
        raise TypeError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv must have shape (B, L, 2, Hkv, D), got {tuple(kv.shape)}")
    apply_rotary_emb(kv[:, :, 0], cos, sin, interleaved=interleaved, inplace=True, seqlen_offsets=seqlen_offsets)
    return kv


apply_rotary_emb_func = apply_rotary_emb  # FlashAttention's other name for it


# ---------------------------------------------------------------------------------------------
# flash_attn.ops.triton.rotary
# ---------------------------------------------------------------------------------------------

def apply_rotary(x, cos, sin, seqlen_offsets=0, cu_seqlens=None, max_seqlen=None, interleaved=False, inplace=False,
                 conjugate=False):
    """FlashAttention's ``ops.triton.rotary.apply_rotary``, the function under ``apply_rotary_emb``
    (its arguments in its order): x (B, L, H, D), or (total, H, D) with ``cu_seqlens``, turned by
    the (S, R/2) tables; ``conjugate=True`` turns the other way (sin negated: the inverse rotation,
    which FlashAttention's backward applies). Returns the result (x itself with ``inplace``).
    Beyond FlashAttention's, which is not recorded by autograd: differentiable in x."""
    if not isinstance(conjugate, bool):
        raise TypeError(f"conjugate must be a bool (True: the inverse rotation), got {conjugate!r} "
                        f"({type(conjugate).__name__})")
    if conjugate and isinstance(sin, Tensor):  # (other values: apply_rotary_emb names what sin must be)
        sin = -sin
    return apply_rotary_emb(x, cos, sin, interleaved=interleaved, inplace=inplace, seqlen_offsets=seqlen_offsets,
                            cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def rotate_half(x: Tensor, interleaved: bool = False) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the halves of the last dim, or over each (2i, 2i+1) pair."""
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary_emb_torch(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> Tensor:
    """The plain-PyTorch rotary embedding (FlashAttention's reference): x (B, L, H, D), token t at
    position t of the (>= L, R/2) tables, the first R features turned."""
    positions = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    return R.rotary(x, cos, sin, positions, interleaved)


class RotaryEmbedding(torch.nn.Module):
    """FlashAttention's ``RotaryEmbedding`` module (without xPos): ``forward(qkv, kv=None,
    seqlen_offset=0, max_seqlen=None, num_heads_q=None)`` turns q and k **in place** with the
    angles ``t * base^(-2i/dim)`` (``dim`` rotary features per head, computed in float32 whatever
    the module's dtype, as FlashAttention's; the tables cached in qkv's dtype and grown as needed)
    and returns qkv, or (q, kv) with ``kv``; ``seqlen_offset`` an int or a (B,) tensor (then
    ``max_seqlen`` sizes the tables)."""

    def __init__(self, dim: int, base=10000.0, interleaved=False, scale_base=None, pos_idx_in_fp32=True,
                 device=None):
        super().__init__()
        if scale_base is not None:
            raise ValueError("scale_base (xPos) is not supported by fused_attn's RotaryEmbedding: pass None")
        if not is_int(dim):  # (numpy's ints too, as a Python int; a float is a TypeError)
            raise TypeError(f"dim must be an even int >= 2 (the rotary features of a head), got {type(dim).__name__} "
                            f"{dim!r}")
        if dim < 2 or dim % 2:
            raise ValueError(f"dim must be an even int >= 2 (the rotary features of a head), got {dim!r}")
        dim = int(dim)
        if isinstance(base, bool) or not isinstance(base, numbers.Real):
            raise TypeError(f"base must be a finite number > 0, got {type(base).__name__}")
        if not (base > 0 and _finite(base)):  # (0 or less gave NaN angles)
            raise ValueError(f"base must be a finite number > 0 (the angles are t * base ** (-2i / dim)), got "
                             f"{_shown(base)}")
        check_device(device)
        # (a non-bool flag was kept, read as its truth value: "x" turned interleaved pairs)
        _check_bool("interleaved", interleaved)
        _check_bool("pos_idx_in_fp32", pos_idx_in_fp32)
        self.dim, self.base, self.interleaved, self.scale_base = dim, float(base), interleaved, None
        self.pos_idx_in_fp32 = pos_idx_in_fp32
        self.register_buffer("inv_freq", self._frequencies(device), persistent=False)
        self._seq_len_cached = 0
        self._cos_cached = self._sin_cached = None

    def _frequencies(self, device=None) -> Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def reset_parameters(self) -> None:
        """Recompute the (non-persistent) ``inv_freq`` buffer in its dtype and device, and drop the
        cached tables: for a module built on meta (see ``_apply``)."""
        with torch.no_grad():
            self.inv_freq.copy_(self._frequencies(self.inv_freq.device))
        self._seq_len_cached, self._cos_cached, self._sin_cached = 0, None, None

    def _apply(self, fn, recurse=True):
        # inv_freq is a function of dim and base and in no state dict: recomputed after a move off
        # meta, so that ``to_empty`` after construction on meta does not leave it uninitialised
        # memory (the tables would have been garbage, silently). Only then: other moves keep the
        # buffer as it is, a user's edit included (position interpolation's inv_freq /= factor),
        # as FlashAttention's module keeps it. Its tables use that edit only while the buffer is
        # float32: a cast one is ignored (see _update_cos_sin_cache).
        was_meta = self.inv_freq.is_meta
        module = super()._apply(fn, recurse)
        if was_meta and not self.inv_freq.is_meta:
            self.reset_parameters()
        return module

    def _update_cos_sin_cache(self, seqlen: int, device=None, dtype=None) -> None:
        if self.inv_freq.is_meta and device is not None and torch.device(device).type != "meta":
            # built on meta and never moved (it holds no state to load): computed where it is used
            self.inv_freq = self._frequencies(device).to(self.inv_freq.dtype)
        cached = self._cos_cached
        if (seqlen > self._seq_len_cached or cached is None or cached.device != device or cached.dtype != dtype
                or (self.training and cached.is_inference())):
            self._seq_len_cached = seqlen
            t = torch.arange(seqlen, device=device, dtype=torch.float32)
            # As FlashAttention's _update_cos_sin_cache: a buffer cast by the module's
            # .half()/.bfloat16()/.double() is not used but recomputed in float32 from dim and
            # base (edit or not). Rounded to bfloat16, inv_freq is off by up to 2^-9 relative, so
            # the angle t * inv_freq by several radians at t ~ 2000: wrong tables. A float32
            # buffer is used as it is (a user's edit of it kept). (FlashAttention recomputes its
            # xPos ``scale`` the same way; this module has no xPos.)
            if self.inv_freq.dtype != torch.float32:
                inv_freq = self._frequencies(device)
            else:
                inv_freq = self.inv_freq.to(device=device)
            freqs = torch.outer(t, inv_freq)
            self._cos_cached, self._sin_cached = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)

    def forward(self, qkv: Tensor, kv: Optional[Tensor] = None, seqlen_offset: Union[int, Tensor] = 0,
                max_seqlen: Optional[int] = None, num_heads_q: Optional[int] = None):
        if kv is not None and (not isinstance(kv, Tensor) or kv.dim() != 5 or kv.shape[2] != 2):
            raise ValueError(f"kv must have shape (B, L, 2, Hkv, D), got "
                             f"{tuple(kv.shape) if isinstance(kv, Tensor) else type(kv).__name__}")
        if is_int(seqlen_offset):  # (numpy ints too; a traced SymInt kept: int() would specialise it)
            seqlen_offset = as_int(seqlen_offset)
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            self._update_cos_sin_cache(max_seqlen, device=qkv.device, dtype=qkv.dtype)
        elif is_int(seqlen_offset):
            self._update_cos_sin_cache(seqlen + seqlen_offset, device=qkv.device, dtype=qkv.dtype)
        elif self._cos_cached is None:
            raise ValueError("seqlen_offset as a tensor needs max_seqlen (the tables' length) on the first call")
        cos, sin = self._cos_cached, self._sin_cached
        if kv is None:
            return apply_rotary_emb_qkv_(qkv, cos, sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offset,
                                         num_heads_q=num_heads_q)
        # As apply_rotary_emb_qkv_: q turned out of place first and written last, once kv is, so that
        # a call refused for kv (its positions, an in-place write autograd refuses) changes nothing;
        # q's own write checked (overlap, inference tensor, autograd) before kv's
        check_inplace_write(qkv, torch.compiler.is_compiling(), "qkv")
        q_turned = apply_rotary_emb(qkv, cos, sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offset)
        apply_rotary_emb_kv_(kv, cos, sin, interleaved=self.interleaved, seqlen_offsets=seqlen_offset)
        return qkv.copy_(q_turned), kv


# ---------------------------------------------------------------------------------------------
# flash_attn.ops.triton.layer_norm
# ---------------------------------------------------------------------------------------------

def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                  rowscale=None, prenorm=False, residual_in_fp32=False, zero_centered_weight=False,
                  is_rms_norm=False, return_dropout_mask=False, out_dtype=None, out=None, residual_out=None):
    """FlashAttention's fused ``norm(dropout(x) + residual)``: ``y``, or ``(y, residual_out)`` with
    ``prenorm`` (the sum, float32 with ``residual_in_fp32``), then the dropout mask and None (the
    ``x1`` mask) with ``return_dropout_mask`` (the mask None without dropout).
    ``zero_centered_weight`` scales by ``1 + weight``; ``out_dtype`` is y's dtype (a wider one than
    x's computed without rounding to x's dtype first, as FlashAttention's kernel). The second branch
    (``x1``, ``weight1``, ``bias1``), ``rowscale`` and preallocated ``out`` / ``residual_out`` have
    no fused_attn kernel and raise."""
    for name, value in (("x1", x1), ("weight1", weight1), ("bias1", bias1), ("rowscale", rowscale), ("out", out),
                        ("residual_out", residual_out)):
        if value is not None:
            raise ValueError(f"{name} is not supported by fused_attn's layer_norm_fn (no kernel for it): pass None, "
                             f"or compute that part in PyTorch")
    for name, value in (("prenorm", prenorm), ("residual_in_fp32", residual_in_fp32),
                        ("zero_centered_weight", zero_centered_weight), ("is_rms_norm", is_rms_norm),
                        ("return_dropout_mask", return_dropout_mask)):
        _flag(name, value)
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating torch.dtype or None, got {out_dtype!r}")
    if zero_centered_weight and weight is not None:
        weight = weight + 1.0
    # FlashAttention's dtypes: parameters of any float dtype (here used in x's), and the summed
    # stream in the residual's dtype when a residual is given (the flag then says nothing), else
    # float32 with residual_in_fp32 (also for float64 x, where fused_attn's flag keeps float64),
    # else x's.
    stream_dtype = None  # the dtype residual_out must be given back in
    y_dtype = out_dtype  # y's: out_dtype, else x's (a float64 residual widens x for the sum)
    if isinstance(x, Tensor) and x.is_floating_point():
        y_dtype = out_dtype or x.dtype
        if isinstance(residual, Tensor) and residual.is_floating_point():
            stream_dtype, residual_in_fp32 = residual.dtype, False
        elif residual_in_fp32 is True:
            stream_dtype = torch.float32
        if out_dtype is not None and out_dtype.is_floating_point and out_dtype.itemsize > x.dtype.itemsize:
            # FlashAttention's kernel computes in float32 and writes y in out_dtype: no rounding to
            # x's dtype on the way (the sum still comes back in its own dtype)
            if stream_dtype is None:
                stream_dtype = torch.float32 if residual_in_fp32 else x.dtype
            x = x.to(out_dtype)
        x, residual, weight, bias, residual_in_fp32 = mixed_norm_operands(x, residual, weight, bias,
                                                                          residual_in_fp32)
    mask_wanted = return_dropout_mask and isinstance(dropout_p, numbers.Real) and dropout_p > 0.0
    state = _rng_state() if mask_wanted else None
    result = layer_norm_residual(x, residual, weight, bias, eps, dropout_p=dropout_p, prenorm=prenorm,
                                 rms=is_rms_norm, residual_in_fp32=residual_in_fp32)
    y, summed = result if prenorm else (result, None)
    if y_dtype is not None:
        y = y.to(y_dtype)  # (out_dtype was checked to be a dtype before the call)
    if summed is not None and stream_dtype is not None:
        summed = summed.to(stream_dtype)  # (a no-op unless the residual's dtype was neither x's nor float32)
    outputs = (y, summed) if prenorm else (y,)
    if return_dropout_mask:
        mask = None
        if mask_wanted:
            rng = _redraw(state, dropout_p, x)
            d = x.shape[-1]
            mask = _rng.keep_mask(int(rng[0]), int(rng[1]), dropout_p, x.numel() // max(d, 1), d,
                                  device=x.device).view(x.shape)
        outputs = outputs + (mask, None)
    return outputs[0] if len(outputs) == 1 else outputs


def rms_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6, dropout_p=0.0,
                rowscale=None, prenorm=False, residual_in_fp32=False, zero_centered_weight=False,
                return_dropout_mask=False, out_dtype=None, out=None, residual_out=None):
    """``layer_norm_fn`` with ``is_rms_norm=True``."""
    return layer_norm_fn(x, weight, bias, residual, x1, weight1, bias1, eps, dropout_p, rowscale, prenorm,
                         residual_in_fp32, zero_centered_weight, True, return_dropout_mask, out_dtype, out,
                         residual_out)


class RMSNorm(torch.nn.Module):
    """FlashAttention's ``RMSNorm`` module: ``forward(x, residual=None, prenorm=False,
    residual_in_fp32=False)``, dropout on x in training."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.drop = torch.nn.Dropout(dropout_p) if dropout_p > 0.0 else None  # FlashAttention's attribute
        self.zero_centered_weight = zero_centered_weight
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.zero_centered_weight:
            torch.nn.init.zeros_(self.weight)
        else:
            torch.nn.init.ones_(self.weight)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps,
                           dropout_p=self.drop.p if self.drop is not None and self.training else 0.0, prenorm=prenorm,
                           residual_in_fp32=residual_in_fp32, zero_centered_weight=self.zero_centered_weight)


# ---------------------------------------------------------------------------------------------
# flash_attn.bert_padding
# ---------------------------------------------------------------------------------------------

def _check_indices(indices) -> None:
    """Row indices: an int64 or int32 tensor (FlashAttention's indexing refuses floats; ``.long()``
    would truncate them, and bool or uint8 ones would be masks to torch's indexing)."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be an integer tensor (int64, as unpad_input gives them, or int32), got "
                        f"{indices.dtype}")


def index_first_axis(x: Tensor, indices: Tensor) -> Tensor:
    """Rows ``indices`` of x's first axis (x (N, ...) -> (len(indices), ...)); differentiable."""
    _check_indices(indices)
    return x.index_select(0, indices)


def index_put_first_axis(values: Tensor, indices: Tensor, first_axis_dim: int) -> Tensor:
    """A zero (first_axis_dim, ...) tensor with ``values`` at rows ``indices``; differentiable."""
    _check_indices(indices)
    out = values.new_zeros((first_axis_dim,) + tuple(values.shape[1:]))
    return out.index_copy(0, indices.long(), values)  # (int32 indices too, as FlashAttention's indexing takes)


def unpad_input(hidden_states: Tensor, attention_mask: Tensor, unused_mask: Optional[Tensor] = None):
    """(B, L, ...) with a (B, L) mask (1 = token) to the packed layout of the varlen functions:
    ``(hidden (total, ...), indices (total,), cu_seqlens int32 (B + 1,), max_seqlen int, seqused
    int32 (B,))``, as FlashAttention 2.8's. ``unused_mask`` (1 = allocated but unused rows, kept in
    the packing after each sequence's tokens): cu_seqlens counts them, seqused does not."""
    for name, t in (("hidden_states", hidden_states), ("attention_mask", attention_mask), ("unused_mask", unused_mask)):
        if (t is not None or name != "unused_mask") and not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if attention_mask.shape != hidden_states.shape[:2]:
        raise ValueError(f"attention_mask must have shape (B, L) = {tuple(hidden_states.shape[:2])}, got "
                         f"{tuple(attention_mask.shape)}")
    kept = attention_mask.bool() if unused_mask is None else (attention_mask.bool() | unused_mask.bool())
    seqused = attention_mask.sum(dim=-1, dtype=torch.int32)
    seqlens = kept.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(kept.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return index_first_axis(hidden_states.flatten(0, 1), indices), indices, cu_seqlens, max_seqlen, seqused


def unpad_input_for_concatenated_sequences(hidden_states: Tensor, attention_mask_in_length: Tensor):
    """Rows of several samples concatenated per batch row: ``attention_mask_in_length`` (B, L) lists
    each row's sample lengths, zeros skipped (e.g. [2, 3, 0, ...]: two samples of 2 and 3 tokens
    from the row's start). Returns ``(hidden (total, ...), indices, cu_seqlens int32, max_seqlen)``
    with one varlen sequence per sample."""
    lengths = attention_mask_in_length
    if not isinstance(hidden_states, Tensor) or not isinstance(lengths, Tensor):
        raise TypeError("hidden_states and attention_mask_in_length must be torch.Tensors")
    if lengths.shape != hidden_states.shape[:2] or lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"attention_mask_in_length must be an int (B, L) = {tuple(hidden_states.shape[:2])} tensor, "
                         f"got {lengths.dtype} {tuple(lengths.shape)}")
    seqlen = lengths.shape[-1]
    for b, row in enumerate(lengths.tolist()):  # each row: its samples' lengths (zeros skipped, as FlashAttention)
        if any(n < 0 for n in row) or sum(row) > seqlen:
            raise ValueError(f"attention_mask_in_length[{b}] must hold its samples' lengths (>= 0; zeros are "
                             f"skipped), adding up to at most {seqlen}; got {row}")
    used = lengths.sum(dim=-1)
    keep = torch.arange(seqlen, device=lengths.device)[None] < used[:, None]
    sample_lengths = lengths.flatten()[lengths.flatten() > 0].to(torch.int32)
    indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
    max_seqlen = int(sample_lengths.max()) if sample_lengths.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(sample_lengths, dim=0, dtype=torch.int32), (1, 0))
    return index_first_axis(hidden_states.flatten(0, 1), indices), indices, cu_seqlens, max_seqlen


def pad_input(hidden_states: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """The inverse of ``unpad_input``: (total, ...) back to (batch, seqlen, ...), zeros elsewhere."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view((batch, seqlen) + tuple(hidden_states.shape[1:]))


# ---------------------------------------------------------------------------------------------
# import flash_attn
# ---------------------------------------------------------------------------------------------

# The modules of the flash_attn package this stand-in provides, and the names each holds.
_MODULES = {
    "flash_attn": ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
                   "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
                   "flash_attn_with_kvcache"],
    "flash_attn.flash_attn_interface": ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
                                        "flash_attn_varlen_func", "flash_attn_varlen_qkvpacked_func",
                                        "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"],
    "flash_attn.bert_padding": ["unpad_input", "pad_input", "index_first_axis", "index_put_first_axis",
                                "unpad_input_for_concatenated_sequences"],
    "flash_attn.layers": [],
    "flash_attn.layers.rotary": ["apply_rotary_emb", "apply_rotary_emb_qkv_", "apply_rotary_emb_kv_",
                                 "apply_rotary_emb_func", "apply_rotary_emb_torch", "rotate_half", "RotaryEmbedding"],
    "flash_attn.ops": [],
    "flash_attn.ops.triton": [],
    "flash_attn.ops.triton.layer_norm": ["layer_norm_fn", "rms_norm_fn", "RMSNorm"],
    "flash_attn.ops.triton.rotary": ["apply_rotary"],
}
_PACKAGES = {"flash_attn", "flash_attn.layers", "flash_attn.ops", "flash_attn.ops.triton"}


class patch_flash_attn(StandInModules):
    """Make ``import flash_attn`` (and its submodules listed in this module's docstring) find
    fused_attn's implementations, for code written against FlashAttention::

        handle = fused_attn.patch_flash_attn()        # until handle.undo()
        with fused_attn.patch_flash_attn():            # or for a block
            from flash_attn import flash_attn_func     # fused_attn's

    Modules are put in ``sys.modules``; ``undo`` puts back whatever was there. A FlashAttention
    already installed is not shadowed unless ``force=True`` (RuntimeError otherwise). Code that
    imported the real functions before the patch keeps them.
    """

    def __init__(self, force: bool = False):
        modules = {name: {attr: globals()[attr] for attr in attrs} for name, attrs in _MODULES.items()}
        super().__init__("flash_attn", modules, _PACKAGES, FLASH_ATTN_VERSION, force)
