"""The registered torch ops and the autograd Functions over them.

The ops and Functions do not repeat ``functional``'s validation: they take their arguments as it
hands them, checked and normalised once there (shapes, dtypes and devices agreeing, GQA head
counts, a band rather than causal / window_size, an int64 CPU ``rng``, float32 (rows, Hq) ALiBi
slopes, a resolved backend name). Called directly (``torch.ops.fused_attn.*``), each op's backend
still checks what its kernels need to stay within the memory they are given, and raises an error
naming the argument and what was expected, never a segfault or an out-of-bounds read: the cpu and
cuda backends in C++ (TORCH_CHECK: RuntimeError), the triton backend at its launchers' entries
(``fused_attn/triton/_checks.py``, mirroring the cpu checks: ValueError for a shape, device or
value, TypeError for a dtype). Those checks cover the tensors' shapes, dtypes and devices and the
scalar options, host work only. Values in tensors are data: the varlen op reads and checks its
boundaries (cu_seqlens, seqused_k, a block table's pages) unless its caller passes
``checked=True``; rotary positions outside the tables raise on cpu and are clamped into them by the
triton and cuda kernels (checking them on a GPU would be a device sync; ``functional`` checks
them). The reference backend is plain PyTorch: a wrong shape there broadcasts where torch
broadcasts, or raises torch's error. A backend name that is not a resolved one ("auto", a typo)
raises a ValueError from ``backends.get_backend``, and so does a ``block_table`` for a backend
that reads no paged K/V.

Each op half is a ``torch.library.custom_op`` in the ``fused_attn`` namespace whose last
argument names the backend that runs it (resolved before the call, never "auto"); its fake
implementation gives torch.compile the output shapes, dtypes and strides, so compiled graphs
trace through without breaks. The autograd Functions never launch kernels themselves: forward
calls the ``*_fwd`` op and saves the minimum, backward calls the ``*_bwd`` op. In eager mode on
plain tensors (``direct_call_ok``) they call the ops' implementations directly, skipping the custom
ops' Python dispatch; traced, subclassed or mode-intercepted calls always use the registered ops.
Under torch.export the functional layer calls the Functions' forwards, not the Functions (the
note at ``_register_autograd``): the exported graph holds the forward ops with grad mode on, and
each forward op has its Function's setup_context and backward as its own autograd formula, so
exported programs train.

The Functions have torch.func's form (``forward`` without ctx, ``setup_context`` saving what the
backward needs, ``generate_vmap_rule``), so ``torch.func.grad``, ``vjp``, ``jacrev`` and
``vmap(grad(...))`` (per-sample gradients) run them: their forwards return the tensors the backward
needs (the lse, mean and rstd, the pre-activation) as extra non-differentiable outputs, and they
take every argument explicitly (torch.compile 2.13 mis-bound the omitted defaulted arguments of such
a Function traced a second time). A backward whose result will be differentiated (``create_graph=True``,
nested torch.func transforms: ``_create_graph``) recomputes the reference math with a graph
(``_grad_with_graph``); forward-mode AD gets its tangents from the same reference math through a
twin of each Function that defines ``jvp`` (``_Function.forward_mode``).

Attention takes the keys each query sees as a band, ``band_lo <= j - i <= band_hi``
(``ops_common.attention_band`` derives it from causal / window_size / alignment; ``NO_BAND``,
``CAUSAL_BAND``), so one kernel argument pair carries causal, sliding-window and bottom-right
attention; ``softcap`` > 0 caps the logits (``softcap * tanh(logit / softcap)``, before the mask).
``alibi_slopes`` (float32 (B, Hq), any strides; None = off) adds ALiBi's ``-slope * |j - d_i|`` where
it adds the mask, d_i being query i's key position: i, or i + Lk - Lq when ``bottom_right`` (the
band already carries the alignment; ALiBi needs it separately). Varlen: (num_sequences, Hq), each
sequence aligned on its own lengths. No gradient flows to the slopes.
The backward ops take ``dlse`` (None = zeros), the gradient of the returned lse (lse's dtype and
shape, any strides): since d lse_i / d s_ij = P_ij, it only shifts the softmax backward's row term,
dS = P (dP - (delta - dlse)) with delta = rowsum(dO * O), so every backend subtracts it from delta.
Dropout takes ``rng``, an int64 CPU tensor ``[seed, offset]`` (a tensor, not two ints, so that
drawing it stays inside a compiled graph); see ``fused_attn._rng`` for the mask it defines.
Drawn under ``vmap(..., randomness="different")`` it is batched, a pair per sample: such calls go
through the registered ops, whose vmap rule runs the samples one by one (``_per_sample``).

Output layouts (fake and real implementations agree on them):
- attention_fwd: out (B, Hq, Lq, Dv) stored as contiguous (B, Lq, Hq, Dv); lse (B, Hq, Lq) float32, float64
  for float64 inputs (``ops_common.lse_dtype``; so for every lse below).
- attention_bwd: dq, dk, dv contiguous, shaped as q, k, v; dmask contiguous (B, Hq, Lq, Lk) or (0,).
- layer_norm_residual_fwd: out, summed contiguous (N, d) (summed in x's dtype, with residual_in_fp32 in the
  wider of float32 and x's dtype); mean, rstd (N,) in the wider of float32 and x's dtype (float32, float64
  for float64 inputs, as the lse) (mean (0,) for rms).
- layer_norm_residual_bwd: dsum (N, d) in summed's dtype; dx (N, d) in x_dtype or (0,); dweight,
  dbias (d,) or (0,).
- feed_forward_fwd: out (T, d_out), pre (T, F1) contiguous: what the backward needs of the first
  linear, its output x w1^T + b1; for relu without dropout a backend may return h = relu(pre)
  instead (the cuda backend does: its GEMM applies the ReLU), since every backward computes the
  same from either (relu'(pre) = [h > 0], relu(h) = h).  feed_forward_bwd: contiguous grads.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor
from torch._C import _functorch

from . import _rng, reference
from .backends import get_backend
from .ops_common import (check_block_table, check_varlen_bounds, empty, exporting, grad_recording, known_true,
                         lse_dtype, new_attention_out, new_varlen_out, register_vmap_slice_by_slice, varlen_lse_shape,
                         vjp)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)
#: (its ``_current_level`` is read on every call: one attribute rather than torch.autograd.forward_ad's chain)
#: That level is process-wide: a ``forward_ad.dual_level()`` or ``torch.func.jvp`` open in any thread
#: sets it for every thread, so ``_current_level >= 0`` only says that tangents may exist; whether
#: this call carries any is asked of its tensors (``_tangents_in``, ``_forward_mode_in``).
_forward_ad = torch.autograd.forward_ad


def direct_call_ok(*tensors) -> bool:
    """Whether an op may run its implementation directly instead of through the registered custom
    op, whose Python dispatch layers cost ~0.06 ms a call on CPU: eager mode (not being traced by
    torch.compile), plain tensors (no subclasses) and no dispatch mode active (FakeTensorMode and
    friends need the registered ops and their fake implementations)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    for t in tensors:  # a loop, not all(genexpr): this runs on every call (twice with a backward)
        if t is not None and type(t) not in _PLAIN_TENSORS:
            return False
    return True


def inference_call_ok(*tensors) -> bool:
    """``direct_call_ok(*tensors)`` and no tensor needs a gradient (grad mode off, or none
    requires grad) nor a tangent (forward-mode AD off): the call builds no autograd graph and may
    skip the autograd Function as well as the registered op (``functional._eager_inference``).
    One pass over the tensors."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    # (grad_recording() with is_compiling() known False, inline: this runs on every call)
    grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN_TENSORS or (grad and t.requires_grad)):
            return False
    # (the common path, no forward_ad level and no torch.func transform, in two tests inline)
    if not (_forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()):
        return True
    if grad:
        return not _transform_needs_autograd(tensors)
    # Grad mode off (no_grad, inference_mode) stops reverse mode only: torch still computes jvp
    # tangents there, so under forward-mode AD the call takes the Function, whose jvp gives them
    # (the kernels would see dual or jvp-wrapped tensors: a tangent of zero, or a crash).
    return not _forward_mode_in(tensors)


def _transform_needs_autograd(tensors) -> bool:
    """Whether a gradient may be wanted that ``requires_grad`` does not show: under forward-mode
    AD (dual tensors), under ``torch.func.grad`` / ``jvp`` (their wrapped tensors), or under
    ``vmap`` of tensors whose unwrapped selves require grad (an ensemble's stacked parameters).
    Such calls go through the autograd Function, which computes the gradient or says clearly
    that the transform is not supported, never a result without its gradient."""
    if not torch._C._are_functorch_transforms_active():
        return _tangents_in(tensors)
    for level in _functorch.get_interpreter_stack() or ():
        if level.key() != _functorch.TransformType.Vmap:  # Grad, Jvp (Functionalize: traced)
            return True
    for t in tensors:
        while t is not None and _functorch.is_functorch_wrapped_tensor(t):
            t = _functorch.get_unwrapped(t)
        if t is not None and t.requires_grad:
            return True
    return _tangents_in(tensors)


_DIFFERENTIATING = (_functorch.TransformType.Grad, _functorch.TransformType.Jvp)


def _create_graph(*tensors) -> bool:
    """Whether this backward's result will itself be differentiated, so that it must be computed
    with a graph (``_grad_with_graph``) rather than by the kernels, whose gradients would be
    constants (second derivatives silently zero):
    - ``create_graph=True``: grad mode on in a backward, outside torch.func's transforms;
    - torch.func: a grad or jvp transform below the innermost one (``jacrev(jacrev(f))``,
      ``hessian``, ``grad(grad(f))``, a gradient penalty under ``grad``). The backward runs
      inside the transforms that enclose its call; the innermost is the one it serves (a
      ``grad``, or ``jacrev``'s ``vmap`` over the cotangents), any grad or jvp level under it
      differentiates the result. (``grad`` and ``vmap(grad)`` alone stay on the kernels.)
    - forward-mode AD through the backward (``torch.autograd.forward_ad`` around a backward or a
      ``torch.func.grad``): a tangent on one of ``tensors``, the backward's incoming gradients and
      the saved inputs it reads. Asked of them, not of forward_ad's level alone, which is
      process-wide: a ``dual_level`` open in another thread would send every backward of every
      thread down the reference path (slower, its (Lq, Lk) matrix, gradients off by rounding)."""
    if not torch._C._are_functorch_transforms_active():
        if torch.is_grad_enabled():
            return True
    else:
        stack = _functorch.get_interpreter_stack() or ()
        if any(level.key() in _DIFFERENTIATING for level in stack[:-1]):
            return True
    return _forward_ad._current_level >= 0 and _tangents_in(tensors)


def _jvp_through(fn, primals, tangents, layouts):
    """The forward-mode derivative of a Function whose kernels have none: the tangents of
    ``fn(*primals)`` (the reference math, plain PyTorch) by ``torch.func.jvp``. Inputs without a
    tangent (None) are held constant. Costs a reference forward (attention: the (Lq, Lk)
    probabilities), as forward-mode through ``scaled_dot_product_attention``'s math does.
    ``layouts``: the Function's outputs' strides, which forward AD wants its tangents to have."""
    moving = [i for i, (p, t) in enumerate(zip(primals, tangents)) if p is not None and t is not None]
    if not moving:  # (one output per layout: no reference forward run just to count them)
        return [None] * len(layouts)
    of_moving = _spelled_out(_of_moving(fn, primals, moving))
    if _forward_ad._current_level < 0 or _jvp_transform_active():
        _, tangents_out = torch.func.jvp(of_moving, tuple(primals[i] for i in moving),
                                         tuple(tangents[i] for i in moving))
        return list(tangents_out)
    # Inside torch.autograd.forward_ad's level (opened around the call, or inside torch.func.grad),
    # which does not nest: by reverse mode twice. The vjp u -> J^T u is linear in u, so its own
    # vjp at the tangent t is J t.
    # (``ops_common.vjp``: plain autograd outside torch.func's transforms, as inside saved-tensor hooks)
    outs, vjp_fn = vjp(of_moving, *(primals[i] for i in moving))
    _, vjp_of_vjp = vjp(lambda *cotangents: vjp_fn(cotangents), *(torch.zeros_like(o) for o in outs))
    tangents_out = vjp_of_vjp(tuple(tangents[i] for i in moving))
    return [_in_layout(t, stride) for t, stride in zip(tangents_out, layouts)]


def _in_layout(t: Tensor, stride) -> Tensor:
    """t with the strides ``stride`` of a dense layout (the Function's output's): t itself when it
    has them, else its dims permuted into the layout's order, made contiguous and permuted back, out
    of place. Not a copy into an ``empty_strided`` tensor: under ``torch.autograd.functional``'s
    vectorized forward mode (``jacobian(..., strategy="forward-mode", vectorize=True)``, ``hessian``'s
    forward-mode outer jacobian) t is batched by torch's legacy vmap, which no functorch test sees,
    and an in-place copy of it into an unbatched tensor fails ("vmap: aten::copy_ ... not possible")."""
    stride = tuple(stride)
    if t.stride() == stride:
        return t
    order = sorted(range(t.dim()), key=lambda d: stride[d], reverse=True)  # outermost first
    laid = t.permute(order).contiguous().permute(sorted(range(t.dim()), key=order.__getitem__))
    if laid.stride() == stride:
        return laid
    # (a layout that is no permutation of a contiguous one, or differs in the strides of size-1 dims)
    return torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)


def _grad_with_graph(fn, inputs, needs, grads_out):
    """A backward under ``create_graph=True`` (double backward: gradient penalties, Hessian-vector
    products), where the kernels' gradients, computed without a graph, would be constants: the
    reference math ``fn(*inputs)`` recomputed under autograd from the saved inputs and
    differentiated with a graph, so the gradient has its own. It costs what the reference costs
    (for attention the (Lq, Lk) probabilities). ``needs``: which inputs want a gradient;
    ``grads_out``: one per output of ``fn`` (None: that output's gradient is zero)."""
    moving = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None]
    grads = [None] * len(needs)
    if not moving or all(g is None for g in grads_out):
        return grads
    # ops_common.vjp: torch.func's inside its transforms (jacrev(jacrev(f)), hessian), whose result
    # keeps the graph the outer levels differentiate; plain autograd elsewhere, which also runs
    # inside saved-tensor hooks (save_on_cpu), where torch.func refuses to
    with torch.enable_grad():
        outs, vjp_fn = vjp(_spelled_out(_of_moving(fn, inputs, moving)), *(inputs[i] for i in moving))
    cotangents = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads_out))
    for i, grad in zip(moving, vjp_fn(cotangents)):
        grads[i] = grad
    return grads


def _spelled_out(fn):
    """fn run with the reference math in plain ops differentiable to any order in every mode
    (``reference.spelled_out``): a derivative is taken of what it computes."""
    def spelled_out(*args):
        with reference.spelled_out():
            return fn(*args)

    return spelled_out


def _of_moving(fn, inputs, moving):
    """fn as a function of ``inputs[i] for i in moving``, the others held at their values."""
    def of_moving(*values):
        args = list(inputs)
        for i, value in zip(moving, values):
            args[i] = value
        return fn(*args)

    return of_moving


def _seed_offset(rng: Optional[Tensor]) -> tuple:
    """``_rng.seed_offset`` of ``rng``, (0, 0) for None: ints, or, drawn per sample
    (``_per_sample``), its two batched 0-dim tensors, which only the reference math takes."""
    return (0, 0) if rng is None else _rng.seed_offset(rng)


def _per_sample(rng: Optional[Tensor]) -> bool:
    """Whether ``rng`` was drawn under ``torch.func.vmap(..., randomness="different")`` (or
    ``jacfwd``'s, ...): a batched ``[seed, offset]``, a pair per sample, which the kernels cannot
    take as two ints. Such a call goes through the registered op rather than its implementation:
    the op's vmap rule runs each sample on its own, with its own pair, so every sample gets its
    own mask, that of the pair it drew (reproducible under ``torch.manual_seed``)."""
    return rng is not None and _rng.vmapped(rng)


def _backward_op(impl, op, rng, *tensors):
    """What a Function's first-order backward calls: the implementation ``impl`` when
    ``direct_call_ok(*tensors)``, else the registered op ``torch.ops.fused_attn.<op>``; for a
    per-sample ``rng`` (``_per_sample``) the op under no_grad: under ``vmap(grad(f))`` torch.func
    runs the backward recording a graph, and the custom op's autograd layer refuses torch.func's
    transforms; under grad mode (``torch.func.grad``) under no_grad too. Nothing is lost: a
    gradient that will be differentiated never comes here (``_create_graph``). (The op is named,
    and looked up only when it is called: walking ``torch.ops`` costs ~0.2 us, on every backward.)"""
    if _per_sample(rng):
        return torch.no_grad()(getattr(torch.ops.fused_attn, op))
    call = impl if direct_call_ok(*tensors) else getattr(torch.ops.fused_attn, op)
    # Grad mode on in a first-order backward: torch.func.grad runs the backward so. No graph is
    # wanted here (``_create_graph``), and the cpu backend's out= GEMMs refused saved weights that
    # require grad of the enclosing autograd (``grad`` of a loss over nn.Parameters: "functions with
    # out=... arguments don't support automatic differentiation")
    return torch.no_grad()(call) if torch.is_grad_enabled() else call


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def _attention_fwd_impl(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend, softcap=0.0,
                        alibi_slopes=None, bottom_right=False):
    if q.numel() == 0 or k.shape[2] == 0:  # nothing to compute: every backend gives the same empties
        out = new_attention_out(q, v.shape[-1])
        out.zero_()
        return out, torch.full(q.shape[:3], float("inf"), device=q.device, dtype=lse_dtype(q))
    seed, offset = _seed_offset(rng)
    return get_backend(backend).attention_fwd(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset,
                                              softcap, alibi_slopes, bottom_right)


@torch.library.custom_op("fused_attn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], band_lo: int, band_hi: int,
                  dropout_p: float,
                  scale: float, rng: Optional[Tensor], backend: str, softcap: float = 0.0,
                  alibi_slopes: Optional[Tensor] = None, bottom_right: bool = False) -> tuple[Tensor, Tensor]:
    return _attention_fwd_impl(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend, softcap,
                               alibi_slopes, bottom_right)


@attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend, softcap=0.0,
                        alibi_slopes=None, bottom_right=False):
    return new_attention_out(q, v.shape[-1]), q.new_empty(q.shape[:3], dtype=lse_dtype(q))


def _attention_bwd_impl(dout, q, k, v, out, lse, attn_mask, band_lo, band_hi, dropout_p, scale, rng, mask_grad,
                        backend, softcap=0.0, alibi_slopes=None, bottom_right=False, dlse=None):
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0:
        dmask = attn_mask.new_zeros(q.shape[:3] + (k.shape[2],)) if mask_grad else empty(q)
        return torch.zeros_like(q, memory_format=torch.contiguous_format), torch.zeros_like(
            k, memory_format=torch.contiguous_format), torch.zeros_like(v, memory_format=torch.contiguous_format), dmask
    seed, offset = _seed_offset(rng)
    return get_backend(backend).attention_bwd(dout, q, k, v, out, lse, attn_mask, band_lo, band_hi, dropout_p, scale,
                                              seed, offset, mask_grad, softcap, alibi_slopes, bottom_right, dlse)


@torch.library.custom_op("fused_attn::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  attn_mask: Optional[Tensor], band_lo: int, band_hi: int,
                  dropout_p: float, scale: float,
                  rng: Optional[Tensor], mask_grad: bool, backend: str,
                  softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                  bottom_right: bool = False, dlse: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _attention_bwd_impl(dout, q, k, v, out, lse, attn_mask, band_lo, band_hi, dropout_p, scale, rng, mask_grad,
                               backend, softcap, alibi_slopes, bottom_right, dlse)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, attn_mask, band_lo, band_hi, dropout_p, scale, rng, mask_grad,
                        backend, softcap=0.0, alibi_slopes=None, bottom_right=False, dlse=None):
    dmask = attn_mask.new_empty(q.shape[:3] + (k.shape[2],)) if mask_grad else empty(q)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dmask


def _attention_forward(fwd, q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend, softcap,
                       alibi_slopes, bottom_right):
    mask4 = None
    if attn_mask is not None:  # a stride-0 view, never materialised
        mask4 = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return fwd(q, k, v, mask4, band_lo, band_hi, dropout_p, scale, rng, backend, softcap, alibi_slopes, bottom_right)


def attention_inference(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend, softcap=0.0,
                        alibi_slopes=None, bottom_right=False, return_lse=False):
    """AttentionFunction's output for eager calls that build no autograd graph, without its Python
    layers (see ``functional._eager_inference``)."""
    fwd = torch.ops.fused_attn.attention_fwd if _per_sample(rng) else _attention_fwd_impl
    out, lse = _attention_forward(fwd, q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng,
                                  backend, softcap, alibi_slopes, bottom_right)
    return (out, lse) if return_lse else out


class _Function(torch.autograd.Function):
    """An autograd Function in torch.func's form whose ``apply`` skips binding its arguments to
    ``forward``'s signature (``inspect.signature`` at every call: ~40 us of host time on the CI
    VM, as much as a small op's whole call): every caller passes every argument positionally.
    Under torch.func's transforms and torch.compile, torch's own ``apply``.

    Forward-mode AD: a subclass's ``forward_tangents(ctx, *input_tangents)`` becomes the ``jvp``
    of a twin class (``cls.forward_mode``), which ``apply`` runs only for calls that forward-mode AD
    reaches (``torch.func.jvp``, ``jacfwd``, ``hessian`` on the thread's transform stack, or an
    argument carrying a ``torch.autograd.forward_ad`` tangent: ``_forward_mode_in``): torch.compile
    refuses to trace a Function that defines ``jvp`` (a graph break at every call), and the
    transforms' tangents are never traced. The twin's ``setup_context`` is the subclass's with
    ``forward_mode=True``: it saves what the jvp reads, which the subclass itself never needs.
    (Decided by the class that runs, not by asking whether forward mode is on: torch.func calls
    ``setup_context`` below the jvp level, on unwrapped inputs that show no tangent, and
    forward_ad's level, open in any thread, says nothing of this call.)"""

    forward_mode = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward_tangents" in cls.__dict__:
            cls.forward_mode = type(cls)(f"{cls.__name__}ForwardMode", (cls,), {
                "jvp": cls.__dict__["forward_tangents"], "__module__": cls.__module__,
                "setup_context": staticmethod(functools.partial(cls.setup_context, forward_mode=True)),
                "__doc__": f"{cls.__name__} with its jvp, for calls under forward-mode AD."})

    @classmethod
    def apply(cls, *args):
        # (torch's apply named, not reached by a zero-argument super(): when torch.compile cannot
        # trace a call as a Function and falls back to tracing this method, it fails on super())
        if torch.compiler.is_compiling():
            return _TORCH_APPLY(cls, *args)
        twin = cls.forward_mode
        if torch._C._are_functorch_transforms_active():
            if twin is not None and twin is not cls and _forward_mode_in(args):
                if _nested_forward_mode():  # the twin's jvp would drop the outer levels' tangents
                    with reference.spelled_out():
                        return cls.reference(*args)
                return twin.apply(*args)
            return _TORCH_APPLY(cls, *args)
        # (no transform: forward mode reaches the call only through forward_ad, as a tangent on an argument)
        if twin is not None and twin is not cls and _forward_ad._current_level >= 0 and _tangents_in(args):
            return twin.apply(*args)
        return _C_APPLY(cls, *args)  # torch._C._FunctionBase.apply (super(torch.autograd.Function, cls).apply)


_TORCH_APPLY = torch.autograd.Function.apply.__func__
#: torch._C._FunctionBase's apply, a classmethod descriptor called with the class: what
#: ``super(torch.autograd.Function, cls).apply`` binds, without building the super object every call
_C_APPLY = torch._C._FunctionBase.__dict__["apply"]


def _no_zero_grads_for_non_differentiable(ctx) -> None:
    """Have autograd hand the backward None, not zeros, for the outputs marked non-differentiable
    (the tensors a Function returns only for its own backward: attention's lse without return_lse,
    the feed-forward's pre-activation and rows): torch fills a zero tensor of each one's shape on
    every backward otherwise (``materialize_grads``), which nothing reads (for the feed-forward a
    (T, d_ff) fill). The differentiable outputs keep theirs. Eager only: Dynamo refuses the
    attribute's mutation (a graph break), and a compiled graph's backward is AOTAutograd's, which
    sets it itself."""
    if not torch.compiler.is_compiling():
        ctx._materialize_non_diff_grads = False


def _forward_mode_in(tensors) -> bool:
    """Whether tangents may flow into a call of ``tensors`` (other arguments are skipped): torch.func's
    jvp transform (``jvp``, ``jacfwd``, ``hessian``) is on this thread's stack (the call then takes
    the Function even for inputs without a tangent, whose jvp-wrapped tensors the kernels cannot
    take), or one of them carries a tangent (``_tangents_in``)."""
    if _forward_ad._current_level < 0:  # (no level anywhere: torch.func.jvp opens one too)
        return False
    if _jvp_transform_active():
        return True
    return _tangents_in(tensors)


def _jvp_transform_active() -> bool:
    """Whether torch.func's jvp transform (``jvp``, ``jacfwd``, ``hessian``) is on this thread's stack."""
    return torch._C._are_functorch_transforms_active() and any(
        level.key() == _functorch.TransformType.Jvp for level in _functorch.get_interpreter_stack() or ())


def _tangents_in(tensors) -> bool:
    """Whether one of ``tensors`` (other values are skipped) carries a forward-mode tangent
    (``carries_tangent``). Asked only while a forward_ad level is open somewhere in the process."""
    if _forward_ad._current_level < 0:
        return False
    for t in tensors:
        if isinstance(t, Tensor) and carries_tangent(t):
            return True
    return False


def _nested_forward_mode() -> bool:
    """Whether forward mode is nested around this call in a way the twin's ``jvp`` cannot serve:
    two torch.func jvp levels (``jvp(jvp(f))``, ``jacfwd(jacfwd(f))``), a vmap level inside a jvp
    level (``jvp(vmap(f))``), or a vmap level under a ``forward_ad`` dual tensor (one handed to
    ``torch.func.vmap``). (torch.func.jvp itself opens a forward_ad dual level, and torch refuses
    to nest its jvp with a user's ``forward_ad.dual_level``: no other combination reaches here.)
    The twin's tangent is computed from the saved primals at the innermost level only: it carries
    no tangent of the enclosing jvp level (second-order tangents came back exactly zero), under
    ``jvp(vmap(f))`` torch's custom-Function jvp rule hit an internal assert, and under a dual
    tensor's vmap the tangent's reverse-mode computation failed inside torch (a batched tangent
    copied into the result's layout: "vmap: inplace arithmetic"). Such calls run the
    Function's reference math (``reference``) directly under the transforms instead, which torch
    differentiates to any order, as ``_create_graph`` does for nested reverse mode."""
    if not torch._C._are_functorch_transforms_active():
        return False
    keys = [level.key() for level in _functorch.get_interpreter_stack() or ()]
    if _functorch.TransformType.Jvp not in keys:  # (the tangent is forward_ad's)
        return _functorch.TransformType.Vmap in keys
    inside = keys[keys.index(_functorch.TransformType.Jvp) + 1:]  # (the stack: outermost first)
    return _functorch.TransformType.Jvp in inside or _functorch.TransformType.Vmap in inside


def carries_tangent(t) -> bool:
    """Whether forward-mode AD carries a tangent on tensor t: a dual tensor of the open
    ``torch.autograd.forward_ad`` level (under torch.func's other transforms, beneath their
    wrappers), or, under torch.func's jvp (``jvp``, ``jacfwd``, ``hessian``), a tensor with a
    tangent at some jvp level (an outer one's too). False at once when no level is open. (A
    detached tensor carries none: ``t.detach()`` opts out.)"""
    if _forward_ad._current_level < 0:
        return False
    if not torch._C._are_functorch_transforms_active():
        return _forward_ad.unpack_dual(t).tangent is not None
    jvp_levels = [level.level() for level in _functorch.get_interpreter_stack() or ()
                  if level.key() == _functorch.TransformType.Jvp]
    # Each jvp level's tangent sits on t's wrapper of that level, which unpack_dual sees only with
    # that level innermost (asked from a deeper one it misses it; under vmap it raises).
    while jvp_levels and _functorch.is_functorch_wrapped_tensor(t):
        level = _functorch.maybe_get_level(t)
        if not _functorch.is_batchedtensor(t) and level in jvp_levels and _tangent_at(t, level):
            return True
        t = _functorch.get_unwrapped(t)
    if jvp_levels:  # the forward_ad level is torch.func.jvp's own (torch nests no other level with it)
        return False
    # No jvp transform: the tangent of a forward_ad.dual_level sits on the wrapper of the level
    # the dual tensor was made at: opened inside torch.func.grad (make_dual of a grad-tracking
    # tensor) on that level's wrapper, opened around the transforms (forward-over-reverse: a dual
    # tensor handed to torch.func.grad) on t beneath every wrapper. (vmap's wrappers carry none:
    # make_dual under vmap puts the tangent on the tensor beneath.)
    while _functorch.is_functorch_wrapped_tensor(t):
        if not _functorch.is_batchedtensor(t) and _tangent_at(t, _functorch.maybe_get_level(t)):
            return True
        t = _functorch.get_unwrapped(t)
    return _tangent_at(t, 0)


def _tangent_at(wrapper, level: int) -> bool:
    """Whether ``wrapper`` (a torch.func wrapper of jvp level ``level``; level 0: a tensor beneath
    every wrapper) has a tangent there: asked with the transforms inside that level set aside for
    the moment."""
    popped = []
    try:
        while _functorch.peek_interpreter_stack() is not None and _functorch.peek_interpreter_stack().level() > level:
            popped.append(_functorch.pop_dynamic_layer_stack())
        return torch.autograd.forward_ad.unpack_dual(wrapper).tangent is not None
    finally:
        while popped:
            _functorch.push_dynamic_layer_stack(popped.pop())


def why_differentiated(t) -> Optional[str]:
    """Why a derivative is taken with respect to tensor t, for an error message, or None: it
    requires grad while autograd records (reverse mode), or it carries a forward-mode tangent
    (``carries_tangent``), which torch computes under no_grad and inference_mode too. For inputs
    the kernels give no derivative (ALiBi slopes, rotary tables): such a call must take another
    path or refuse."""
    if t.requires_grad and grad_recording():
        return "requires grad"
    if carries_tangent(t):
        return "carries a forward-mode tangent (torch.func.jvp, jacfwd, torch.autograd.forward_ad)"
    return None


def differentiated(t) -> bool:
    """Whether a derivative is taken with respect to tensor t (``why_differentiated``)."""
    return why_differentiated(t) is not None


def _not_a_view(t: Tensor) -> Tensor:
    """An output of an attention Function as autograd should see it: t itself, or, where t is a view
    (attention's output is a transposed view of the contiguous (B, Lq, Hq, Dv) buffer the kernels
    write, ``new_attention_out``), t detached: the same memory, strides and version counter, no
    copy, but no view. Autograd refuses any in-place change of a view made inside a custom Function
    ("Output 0 of AttentionFunction is a view ... created inside a custom Function"), even after
    the backward; of a plain output it refuses one only if the backward still needs it, as for
    SDPA's: ``out.mul_(2)`` after ``backward()`` works, before it the backward raises torch's
    version-counter error ("modified by an inplace operation"). Traced calls (torch.compile,
    torch.export) keep t: Dynamo cannot ask ``_is_view``, and a traced graph's outputs are torch's
    to lay out (an exported graph, which differentiates the forward itself, must not detach)."""
    if torch.compiler.is_compiling() or exporting():
        return t
    return t.detach() if t._is_view() else t


class AttentionFunction(_Function):
    """softmax(q k^T * scale + mask) v; backward recomputes probabilities from the log-sum-exp.

    Returns (out, lse) always (the lse non-differentiable unless ``return_lse``): torch.func's
    transforms need the saved tensors among the outputs (``setup_context``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend, softcap, alibi_slopes,
                bottom_right, return_lse):
        direct = direct_call_ok(q, k, v, attn_mask, alibi_slopes) and not _per_sample(rng)
        fwd = _attention_fwd_impl if direct else torch.ops.fused_attn.attention_fwd
        out, lse = _attention_forward(fwd, q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend,
                                      softcap, alibi_slopes, bottom_right)
        return _not_a_view(out), _not_a_view(lse)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_mode=False):
        (q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend, softcap, alibi_slopes, bottom_right,
         return_lse) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, attn_mask, rng, alibi_slopes)
        ctx.options = (band_lo, band_hi, dropout_p, scale, backend, softcap, bottom_right)
        ctx.return_lse = return_lse
        if forward_mode:  # the forward_mode twin runs: save for its jvp
            ctx.save_for_forward(q, k, v, attn_mask, rng, alibi_slopes)
            ctx.layouts = (out.stride(), lse.stride())
        if not return_lse:
            ctx.mark_non_differentiable(lse)
            _no_zero_grads_for_non_differentiable(ctx)

    @staticmethod
    def backward(ctx, dout, dlse=None):
        # dlse: the lse's gradient when it was returned (autograd gives zeros when it went unused)
        dlse = dlse if ctx.return_lse else None
        q, k, v, out, lse, attn_mask, rng, alibi_slopes = ctx.saved_tensors
        band_lo, band_hi, dropout_p, scale, backend, softcap, bottom_right = ctx.options
        if _create_graph(dout, dlse, q, k, v, attn_mask, alibi_slopes):  # the gradient will be differentiated
            outputs = _attention_reference(ctx.options, rng, alibi_slopes)
            return tuple(_grad_with_graph(outputs, (q, k, v, attn_mask), ctx.needs_input_grad[:4],
                                          (dout, dlse))) + (None,) * 10
        mask4 = None
        if attn_mask is not None:
            mask4 = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        mask_grad = bool(ctx.needs_input_grad[3])
        bwd = _backward_op(_attention_bwd_impl, "attention_bwd", rng, dout, q, k, v, attn_mask,
                           alibi_slopes, dlse)
        dq, dk, dv, dmask = bwd(dout, q, k, v, out, lse, mask4, band_lo, band_hi, dropout_p, scale, rng, mask_grad,
                                backend, softcap, alibi_slopes, bottom_right, dlse)
        dmask = dmask.sum_to_size(attn_mask.shape) if mask_grad else None
        return (dq, dk, dv, dmask) + (None,) * 10

    @staticmethod
    def reference(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, backend, softcap, alibi_slopes,
                  bottom_right, return_lse):
        """(out, lse) by the reference math, differentiable to any order (``_nested_forward_mode``)."""
        options = (band_lo, band_hi, dropout_p, scale, backend, softcap, bottom_right)
        return _attention_reference(options, rng, alibi_slopes)(q, k, v, attn_mask)

    @staticmethod
    def forward_tangents(ctx, tq, tk, tv, tmask, *_):
        q, k, v, attn_mask, rng, alibi_slopes = ctx.saved_tensors
        outputs = _attention_reference(ctx.options, rng, alibi_slopes)
        tout, tlse = _jvp_through(outputs, (q, k, v, attn_mask), (tq, tk, tv, tmask), ctx.layouts)
        return tout, tlse if ctx.return_lse else None


def _attention_reference(options, rng, alibi_slopes):
    """(out, lse) of q, k, v and the mask by the reference backend's forward (plain PyTorch,
    differentiable in both modes), with the call's options and dropout mask."""
    band_lo, band_hi, dropout_p, scale, backend, softcap, bottom_right = options
    seed, offset = _seed_offset(rng)

    def outputs(q, k, v, mask):
        return get_backend("reference").attention_fwd(q, k, v, mask, band_lo, band_hi, dropout_p, scale, seed, offset,
                                                      softcap, alibi_slopes, bottom_right)

    return outputs


# ---------------------------------------------------------------------------------------------
# varlen (packed) attention
# ---------------------------------------------------------------------------------------------

def _attention_varlen_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
                               bottom_right, dropout_p, scale, rng, backend, softcap=0.0, seqused_k=None,
                               checked=False, alibi_slopes=None, block_table=None):
    """``block_table``: k and v are the pages of a paged cache (``ops_common.paged_layout``; only
    for a backend with ``paged_kv``), cu_seqlens_k / seqused_k their packed view's boundaries."""
    if block_table is not None and not get_backend(backend).paged_kv:
        # (functional.attention_varlen gathers the pages first for such a backend; a direct call
        # reached the backend's method with an argument it does not take, a bare TypeError)
        raise ValueError(f"block_table is given but the {backend!r} backend reads no paged K/V (it takes packed k "
                         f"and v): gather the pages first (ops_common.gather_kv_pages, as "
                         f"fused_attn.attention_varlen does), or run a backend with paged_kv (triton)")
    if q.is_meta:
        # Shapes without data (functional.attention_varlen takes the traced path for them): the
        # backends loop over the sequences, whose boundaries a meta tensor does not hold; the fake
        # implementation gives the outputs' shapes, as the registered op does on meta.
        return _attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo,
                                          band_hi, bottom_right, dropout_p, scale, rng, backend)
    if not checked:  # a traced call: the boundaries were not readable when it was built
        used_k = None if block_table is None else check_block_table(block_table, k.shape[0], k.shape[1],
                                                                    cu_seqlens_k, seqused_k)
        # (read for the checks, the lengths also give the longest sequences: the launch is sized by
        # them, not by a loose bound such as the total that a call without max_seqlen traces with)
        max_seqlen_q, max_seqlen_k = check_varlen_bounds(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                                                         max_seqlen_q, max_seqlen_k, seqused_k, used_k)
    if q.numel() == 0 or k.shape[0] == 0:
        out = new_varlen_out(q, v.shape[-1])
        out.zero_()
        return out, torch.full(varlen_lse_shape(q), float("inf"), device=q.device, dtype=lse_dtype(q))
    seed, offset = _seed_offset(rng)
    if block_table is None:
        return get_backend(backend).attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                         max_seqlen_k, band_lo, band_hi, bottom_right, dropout_p,
                                                         scale, seed, offset, softcap, seqused_k, alibi_slopes)
    return get_backend(backend).attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                     band_lo, band_hi, bottom_right, dropout_p, scale, seed, offset,
                                                     softcap, seqused_k, alibi_slopes, block_table=block_table)


@torch.library.custom_op("fused_attn::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, band_lo: int, band_hi: int, bottom_right: bool,
                         dropout_p: float, scale: float, rng: Optional[Tensor], backend: str,
                         softcap: float = 0.0, seqused_k: Optional[Tensor] = None,
                         checked: bool = False, alibi_slopes: Optional[Tensor] = None,
                         block_table: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _attention_varlen_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo,
                                      band_hi, bottom_right, dropout_p, scale, rng, backend, softcap, seqused_k,
                                      checked, alibi_slopes, block_table)


@attention_varlen_fwd.register_fake
def _attention_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
                               bottom_right, dropout_p, scale, rng, backend, softcap=0.0, seqused_k=None,
                               checked=False, alibi_slopes=None, block_table=None):
    return new_varlen_out(q, v.shape[-1]), q.new_empty(varlen_lse_shape(q), dtype=lse_dtype(q))


def _attention_varlen_bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               band_lo, band_hi, bottom_right, dropout_p, scale, rng, backend, softcap=0.0,
                               seqused_k=None, alibi_slopes=None, dlse=None, checked=True):
    """``checked`` False: a traced call's backward, whose max_seqlens may be the loose bounds it was
    traced with (its forward read the true ones inside the op): read again, to size the launch."""
    if q.numel() == 0 or k.numel() == 0 or v.numel() == 0 or q.is_meta:  # (meta: shapes only, as forward)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if not checked:
        max_seqlen_q, max_seqlen_k = check_varlen_bounds(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0],
                                                         max_seqlen_q, max_seqlen_k, seqused_k)
    seed, offset = _seed_offset(rng)
    return get_backend(backend).attention_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                     max_seqlen_q, max_seqlen_k, band_lo, band_hi, bottom_right,
                                                     dropout_p, scale, seed, offset, softcap, seqused_k, alibi_slopes,
                                                     dlse)


@torch.library.custom_op("fused_attn::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                         cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                         band_lo: int, band_hi: int, bottom_right: bool, dropout_p: float, scale: float,
                         rng: Optional[Tensor], backend: str, softcap: float = 0.0,
                         seqused_k: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                         dlse: Optional[Tensor] = None, checked: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    return _attention_varlen_bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      band_lo, band_hi, bottom_right, dropout_p, scale, rng, backend, softcap,
                                      seqused_k, alibi_slopes, dlse, checked)


@attention_varlen_bwd.register_fake
def _attention_varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               band_lo, band_hi, bottom_right, dropout_p, scale, rng, backend, softcap=0.0,
                               seqused_k=None, alibi_slopes=None, dlse=None, checked=True):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def attention_varlen_inference(*args, return_lse=False):
    """AttentionVarlenFunction's output for eager calls that build no autograd graph."""
    fwd = torch.ops.fused_attn.attention_varlen_fwd if _per_sample(args[12]) else _attention_varlen_fwd_impl  # (rng)
    out, lse = fwd(*args)
    return (out, lse) if return_lse else out


class AttentionVarlenFunction(_Function):
    """Packed variable-length attention; saves q, k, v, out and the (Hq, total_q) log-sum-exp.
    Returns (out, lse), as ``AttentionFunction``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi, bottom_right,
                dropout_p, scale, rng, backend, softcap, seqused_k, checked, alibi_slopes, return_lse, block_table):
        # block_table (pages read in place) comes only with inputs that need no gradient: a call
        # that trains gathers the pages first (functional.attention_varlen)
        direct = (direct_call_ok(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, block_table)
                  and not _per_sample(rng))
        fwd = _attention_varlen_fwd_impl if direct else torch.ops.fused_attn.attention_varlen_fwd
        out, lse = fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
                       bottom_right, dropout_p, scale, rng, backend, softcap, seqused_k, checked, alibi_slopes,
                       block_table)
        return _not_a_view(out), _not_a_view(lse)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_mode=False):
        (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi, bottom_right, dropout_p,
         scale, rng, backend, softcap, seqused_k, checked, alibi_slopes, return_lse, _) = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng, seqused_k, alibi_slopes)
        ctx.options = (max_seqlen_q, max_seqlen_k, band_lo, band_hi, bottom_right, dropout_p, scale, backend, softcap)
        ctx.return_lse, ctx.checked = return_lse, checked
        if forward_mode:  # the forward_mode twin runs: save for its jvp
            ctx.save_for_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, rng, seqused_k, alibi_slopes)
            ctx.layouts = (out.stride(), lse.stride())
        if not return_lse:
            ctx.mark_non_differentiable(lse)
            _no_zero_grads_for_non_differentiable(ctx)

    @staticmethod
    def backward(ctx, dout, dlse=None):
        dlse = dlse if ctx.return_lse else None
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, rng, seqused_k, alibi_slopes = ctx.saved_tensors
        if _create_graph(dout, dlse, q, k, v, alibi_slopes):  # differentiated: the reference, a sequence at a time
            outputs = _varlen_reference(ctx.options, cu_seqlens_q, cu_seqlens_k, rng, seqused_k, alibi_slopes)
            return tuple(_grad_with_graph(outputs, (q, k, v), ctx.needs_input_grad[:3], (dout, dlse))) + (None,) * 17
        bwd = _backward_op(_attention_varlen_bwd_impl, "attention_varlen_bwd", rng, dout, q, k, v,
                           alibi_slopes, dlse)
        dq, dk, dv = bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.options[:7], rng,
                         *ctx.options[7:], seqused_k, alibi_slopes, dlse, ctx.checked)
        return (dq, dk, dv) + (None,) * 17

    @staticmethod
    def reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi, bottom_right,
                  dropout_p, scale, rng, backend, softcap, seqused_k, checked, alibi_slopes, return_lse, block_table):
        """(out, lse) by the reference math, differentiable to any order (``_nested_forward_mode``).
        (A block_table never comes with tangents: a differentiated call gathers its pages first.)"""
        options = (max_seqlen_q, max_seqlen_k, band_lo, band_hi, bottom_right, dropout_p, scale, backend, softcap)
        return _varlen_reference(options, cu_seqlens_q, cu_seqlens_k, rng, seqused_k, alibi_slopes)(q, k, v)

    @staticmethod
    def forward_tangents(ctx, tq, tk, tv, *_):
        q, k, v, cu_seqlens_q, cu_seqlens_k, rng, seqused_k, alibi_slopes = ctx.saved_tensors
        outputs = _varlen_reference(ctx.options, cu_seqlens_q, cu_seqlens_k, rng, seqused_k, alibi_slopes)
        tout, tlse = _jvp_through(outputs, (q, k, v), (tq, tk, tv), ctx.layouts)
        return tout, tlse if ctx.return_lse else None


def _varlen_reference(options, cu_seqlens_q, cu_seqlens_k, rng, seqused_k, alibi_slopes):
    """(out, lse) of q, k, v by the reference backend's forward (one plain-PyTorch attention per
    sequence), with the call's options and dropout mask."""
    seed, offset = _seed_offset(rng)

    def outputs(q, k, v):
        return get_backend("reference").attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, *options[:7], seed,
                                                             offset, options[8], seqused_k, alibi_slopes)

    return outputs


# ---------------------------------------------------------------------------------------------
# residual-add + LayerNorm / RMSNorm
# ---------------------------------------------------------------------------------------------

def _layer_norm_residual_fwd_impl(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend,
                                  store_summed=True):
    seed, offset = _seed_offset(rng)
    return get_backend(backend).layer_norm_residual_fwd(x, residual, weight, bias, eps, dropout_p, rms,
                                                        residual_in_fp32, seed, offset, store_summed)


@torch.library.custom_op("fused_attn::layer_norm_residual_fwd", mutates_args=())
def layer_norm_residual_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                            eps: float, dropout_p: float, rms: bool, residual_in_fp32: bool,
                            rng: Optional[Tensor], backend: str,
                            store_summed: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _layer_norm_residual_fwd_impl(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng,
                                         backend, store_summed)


@layer_norm_residual_fwd.register_fake
def _layer_norm_residual_fwd_fake(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend,
                                  store_summed=True):
    n = x.shape[0]
    wide = torch.promote_types(x.dtype, torch.float32)
    summed_dtype = wide if residual_in_fp32 else x.dtype
    mean = x.new_empty((0,) if rms else (n,), dtype=wide)
    summed = x.new_empty(x.shape if store_summed else (0,), dtype=summed_dtype)
    return x.new_empty(x.shape), summed, mean, x.new_empty((n,), dtype=wide)


def _layer_norm_residual_bwd_impl(dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms, rng, x_dtype,
                                  backend):
    seed, offset = _seed_offset(rng)
    return get_backend(backend).layer_norm_residual_bwd(dout, dsummed, summed, weight, bias, mean, rstd, eps,
                                                        dropout_p, rms, seed, offset, x_dtype)


@torch.library.custom_op("fused_attn::layer_norm_residual_bwd", mutates_args=())
def layer_norm_residual_bwd(dout: Tensor, dsummed: Optional[Tensor], summed: Tensor, weight: Optional[Tensor],
                            bias: Optional[Tensor], mean: Tensor, rstd: Tensor, eps: float, dropout_p: float,
                            rms: bool, rng: Optional[Tensor], x_dtype: torch.dtype,
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _layer_norm_residual_bwd_impl(dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms, rng,
                                         x_dtype, backend)


@layer_norm_residual_bwd.register_fake
def _layer_norm_residual_bwd_fake(dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms, rng,
                                  x_dtype, backend):
    dx = summed.new_empty(summed.shape, dtype=x_dtype) if dropout_p > 0.0 else empty(summed, x_dtype)
    dweight = weight.new_empty(weight.shape) if weight is not None else empty(summed)
    dbias = bias.new_empty(bias.shape) if bias is not None else empty(summed)
    return summed.new_empty(summed.shape), dx, dweight, dbias


def _layer_norm_forward(fwd, x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend,
                        store_summed):
    """(out, summed) as (N, d) rows (summed empty without store_summed), mean, rstd."""
    d = x.shape[-1]
    r2 = None if residual is None else _rows(residual, d)
    return fwd(_rows(x, d), r2, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend, store_summed)


def as_shape_of(t: Tensor, x: Tensor) -> Tensor:
    """Rows (N, d) viewed in x's leading shape: (..., d). The autograd Functions return rows and
    the callers view them, outside the Function, so that an output is never a view made inside a
    custom Function, which autograd would refuse to let the user modify in place (``h = ffn(x);
    h += x`` works as it does after ``nn.Linear``)."""
    if t.dim() == x.dim() or t.dim() == 1 and t.numel() == 0:  # already shaped; or summed not stored
        return t
    return t.view(*x.shape[:-1], t.shape[-1])


def _layer_norm_direct(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend,
                       store_summed):
    """``_layer_norm_forward(_layer_norm_residual_fwd_impl, ...)`` written out, for the calls that
    may skip the registered op (``direct_call_ok``, an rng that is not per sample): one layer of
    Python calls instead of four, host time on every step of a decode loop."""
    seed, offset = _seed_offset(rng)
    d = x.shape[-1]
    return get_backend(backend).layer_norm_residual_fwd(
        _rows_direct(x, d), None if residual is None else _rows_direct(residual, d), weight, bias, eps, dropout_p,
        rms, residual_in_fp32, seed, offset, store_summed)


def layer_norm_residual_inference(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend,
                                  store_summed=True):
    """LayerNormResidualFunction's outputs for eager calls that build no autograd graph, as rows."""
    if _per_sample(rng):
        return _layer_norm_forward(torch.ops.fused_attn.layer_norm_residual_fwd, x, residual, weight, bias, eps,
                                   dropout_p, rms, residual_in_fp32, rng, backend, store_summed)[:2]
    out, summed, _, _ = _layer_norm_direct(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng,
                                           backend, store_summed)
    return out, summed


class LayerNormResidualFunction(_Function):
    """(norm(dropout(x) + residual), dropout(x) + residual) over the last dim, as (N, d) rows
    (``as_shape_of`` gives them x's shape).

    Without dropout the gradients of x and residual are the same tensor: the backward op writes
    it once (``dsum``) and it is returned for both, never copied.

    ``store_summed=False`` (the caller's promise that neither the sum nor a backward is wanted:
    inference without prenorm) writes the normalised rows alone, one output stream instead of
    two; the second output is then an empty tensor.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend, store_summed):
        """(out, summed, mean, rstd): the last two (non-differentiable) for the backward only."""
        if direct_call_ok(x, residual, weight, bias) and not _per_sample(rng):
            return _layer_norm_direct(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend,
                                      store_summed)
        return _layer_norm_forward(torch.ops.fused_attn.layer_norm_residual_fwd, x, residual, weight, bias, eps,
                                   dropout_p, rms, residual_in_fp32, rng, backend, store_summed)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_mode=False):
        x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend, _ = inputs
        out, summed, mean, rstd = output
        # Save the output object itself, never a view made of it here: a saved view of an output
        # references the output, whose grad_fn is this node, which holds the view: a cycle
        # through C++ that Python's gc cannot see, so every 2-D call leaked its graph and the
        # saved tensors (tests/test_robustness.py::test_no_graph_outlives_its_outputs). (The
        # outputs are rows: the caller views them in x's shape.)
        ctx.save_for_backward(summed, weight, bias, mean, rstd, rng)
        ctx.options = (eps, dropout_p, rms, backend, x.dtype, None if residual is None else residual.dtype, x.shape)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, rstd)
        if forward_mode:  # the forward_mode twin runs: save for its jvp
            ctx.save_for_forward(x, residual, weight, bias, rng)
            ctx.jvp_options = (residual_in_fp32, inputs[10], (out.stride(), summed.stride()))

    @staticmethod
    def backward(ctx, dout, dsummed, _dmean=None, _drstd=None):
        summed, weight, bias, mean, rstd, rng = ctx.saved_tensors
        eps, dropout_p, rms, backend, x_dtype, residual_dtype, shape = ctx.options
        d = shape[-1]
        if _create_graph(dout, dsummed, summed, weight, bias):  # the gradient will be differentiated
            return _layer_norm_grad_with_graph(ctx, summed, weight, bias, rng, dout, dsummed)
        # (dout and dsummed are the rows' gradients; _rows only makes their last dim unit-stride)
        dout = torch.zeros(summed.shape, dtype=x_dtype, device=summed.device) if dout is None else _rows(dout, d)
        dsummed = None if dsummed is None else _rows(dsummed, d)
        bwd = _backward_op(_layer_norm_residual_bwd_impl, "layer_norm_residual_bwd", rng, dout,
                           dsummed, summed, weight, bias)
        dsum, dx, dweight, dbias = bwd(dout, dsummed, summed, weight, bias, mean, rstd, eps, dropout_p, rms, rng,
                                       x_dtype, backend)
        if dropout_p == 0.0:
            dx = dsum if dsum.dtype == x_dtype else dsum.to(x_dtype)
        # view(*shape), not view(shape): given a torch.Size, view parses it ~1.5 us slower than the
        # same sizes as separate ints (torch 2.13, CPU)
        dx = dx.view(*shape)
        dres = None
        if residual_dtype is not None:
            if dropout_p == 0.0 and residual_dtype == x_dtype:
                # dx itself, not a second view of its buffer: autograd copies a gradient it hands
                # to two leaves only when it sees the one tensor twice; two views of one storage
                # became x.grad and residual.grad sharing memory (a second backward accumulated
                # into both twice, clipping scaled both twice). Non-leaf inputs still get no copy.
                dres = dx
            else:
                dres = (dsum if dsum.dtype == residual_dtype else dsum.to(residual_dtype)).view(*shape)
        return (dx, dres, dweight if weight is not None else None, dbias if bias is not None else None,
                None, None, None, None, None, None, None)

    @staticmethod
    def reference(x, residual, weight, bias, eps, dropout_p, rms, residual_in_fp32, rng, backend, store_summed):
        """(out, summed, mean, rstd) rows by the reference math, differentiable to any order
        (``_nested_forward_mode``, which runs it under ``reference.spelled_out``), with the call's
        dropout mask."""
        seed, offset = _seed_offset(rng)
        d = x.shape[-1]
        return get_backend("reference").layer_norm_residual_fwd(
            _rows(x, d), None if residual is None else _rows(residual, d), weight, bias, eps, dropout_p, rms,
            residual_in_fp32, seed, offset, True)

    @staticmethod
    def forward_tangents(ctx, tx, tresidual, tweight, tbias, *_):
        x, residual, weight, bias, rng = ctx.saved_tensors
        eps, dropout_p, rms, backend, x_dtype, residual_dtype, shape = ctx.options
        residual_in_fp32, store_summed, layouts = ctx.jvp_options
        seed, offset = _seed_offset(rng)

        def outputs(x, residual, weight, bias):  # the Function's rows (out, summed)
            d = shape[-1]
            return get_backend("reference").layer_norm_residual_fwd(
                _rows(x, d), None if residual is None else _rows(residual, d), weight, bias, eps, dropout_p, rms,
                residual_in_fp32, seed, offset, store_summed)[:2]

        tout, tsummed = _jvp_through(outputs, (x, residual, weight, bias), (tx, tresidual, tweight, tbias), layouts)
        return tout, tsummed, None, None


def _layer_norm_grad_with_graph(ctx, summed, weight, bias, rng, dout, dsummed):
    """The norm recomputed from the saved sum (an output of the forward, so a graph through it
    leads back to x and the residual by this Function's own backward)."""
    eps, dropout_p, rms, backend, x_dtype, residual_dtype, shape = ctx.options
    dout = None if dout is None else dout.reshape(summed.shape)

    def outputs(s, w, b):
        return (reference.layer_norm_residual(s, None, w, b, eps, rms=rms).to(x_dtype),)

    needs = (True, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
    dsum, dweight, dbias = _grad_with_graph(outputs, (summed, weight, bias), needs, (dout,))
    dsum = torch.zeros_like(summed) if dsum is None else dsum
    if dsummed is not None:
        dsum = dsum + dsummed.reshape(summed.shape)
    dx = dsum.to(x_dtype)
    if dropout_p > 0.0:
        seed, offset = _seed_offset(rng)
        dx = reference._rng.apply_dropout(dx, dropout_p, seed, offset)
    dx = dx.reshape(shape)
    dres = None
    if residual_dtype is not None:  # dx itself when they are equal, as in LayerNormResidualFunction.backward
        dres = dx if dropout_p == 0.0 and residual_dtype == x_dtype else dsum.to(residual_dtype).reshape(shape)
    return dx, dres, dweight, dbias, None, None, None, None, None, None, None


def _rows(t: Tensor, d: int) -> Tensor:
    """(..., d) -> (N, d) with unit stride along d (a view whenever the layout allows)."""
    # (the row count written out: reshape(-1, 0) of an empty tensor is ambiguous, and raises)
    t2 = t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), d)
    # (contiguous() keeps an empty tensor's strides, e.g. an expanded (0, 0); an unbacked row count
    # under torch.compile, not known to be 0, takes the general path)
    if known_true(t2.numel() == 0):
        return t2.new_empty(t2.shape)
    return t2 if t2.stride(-1) == 1 or d <= 1 else t2.contiguous()


def _rows_direct(t: Tensor, d: int) -> Tensor:
    """``_rows(t, d)`` for the direct (eager, plain tensor) paths, where sizes are ints: the same
    tensor, tested by ``is_contiguous()`` first (``stride(-1)`` parses its argument: ~0.1 us more,
    on every call). A contiguous tensor has a unit last stride, or a last size of at most 1."""
    t2 = t if t.dim() == 2 else t.reshape(math.prod(t.shape[:-1]), d)
    if t2.numel() == 0:
        return t2.new_empty(t2.shape)
    return t2 if t2.is_contiguous() or t2.stride(-1) == 1 or d <= 1 else t2.contiguous()


# ---------------------------------------------------------------------------------------------
# feed-forward
# ---------------------------------------------------------------------------------------------

def _feed_forward_fwd_impl(x, w1, b1, w2, b2, activation, dropout_p, rng, backend):
    seed, offset = _seed_offset(rng)
    return get_backend(backend).feed_forward_fwd(x, w1, b1, w2, b2, activation, dropout_p, seed, offset)


@torch.library.custom_op("fused_attn::feed_forward_fwd", mutates_args=())
def feed_forward_fwd(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], activation: str,
                     dropout_p: float, rng: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    return _feed_forward_fwd_impl(x, w1, b1, w2, b2, activation, dropout_p, rng, backend)


@feed_forward_fwd.register_fake
def _feed_forward_fwd_fake(x, w1, b1, w2, b2, activation, dropout_p, rng, backend):
    return x.new_empty((x.shape[0], w2.shape[0])), x.new_empty((x.shape[0], w1.shape[0]))


def _feed_forward_bwd_impl(dout, x, w1, w2, pre, activation, dropout_p, rng, has_b1, has_b2, backend):
    seed, offset = _seed_offset(rng)
    return get_backend(backend).feed_forward_bwd(dout, x, w1, w2, pre, activation, dropout_p, seed, offset,
                                                 has_b1, has_b2)


@torch.library.custom_op("fused_attn::feed_forward_bwd", mutates_args=())
def feed_forward_bwd(dout: Tensor, x: Tensor, w1: Tensor, w2: Tensor, pre: Tensor, activation: str, dropout_p: float,
                     rng: Optional[Tensor], has_b1: bool, has_b2: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _feed_forward_bwd_impl(dout, x, w1, w2, pre, activation, dropout_p, rng, has_b1, has_b2, backend)


@feed_forward_bwd.register_fake
def _feed_forward_bwd_fake(dout, x, w1, w2, pre, activation, dropout_p, rng, has_b1, has_b2, backend):
    db1 = x.new_empty((w1.shape[0],)) if has_b1 else empty(x)
    db2 = x.new_empty((w2.shape[0],)) if has_b2 else empty(x)
    return x.new_empty(x.shape), w1.new_empty(w1.shape), db1, w2.new_empty(w2.shape), db2


def _feed_forward_forward(fwd, x, w1, b1, w2, b2, activation, dropout_p, rng, backend):
    """(out as rows, x as contiguous rows, pre)."""
    x2 = _rows(x, x.shape[-1]).contiguous()
    out, pre = fwd(x2, w1, b1, w2, b2, activation, dropout_p, rng, backend)
    return out, x2, pre


def _feed_forward_reference(options, rng):
    """The Function's output rows of (x, w1, b1, w2, b2, w1_up, b1_up) by the reference backend's
    forward (plain PyTorch, differentiable in both modes), with the call's dropout mask."""
    activation, dropout_p, backend, has_b1, has_b2, shape = options
    seed, offset = _seed_offset(rng)

    def outputs(x, w1, b1, w2, b2, w1_up, b1_up):
        return get_backend("reference").feed_forward_fwd(x.reshape(math.prod(shape[:-1]), shape[-1]), _stack(w1, w1_up),
                                                         _stack(b1, b1_up), w2, b2, activation, dropout_p, seed,
                                                         offset)[:1]

    return outputs


def _stack(first, second):
    """The gated FFN's w1 (or b1) from its (gate, up) pair, for one kernel call: a transient copy,
    never saved (``FeedForwardFunction`` saves the pair)."""
    return first if second is None else torch.cat([first, second])


def _feed_forward_direct(x, w1, b1, w2, b2, activation, dropout_p, rng, backend):
    """``_feed_forward_forward(_feed_forward_fwd_impl, ...)`` written out, for the calls that may
    skip the registered op (``direct_call_ok``, an rng that is not per sample; w1 and b1 stacked):
    one layer of Python calls instead of three, host time on every step of a decode loop."""
    seed, offset = _seed_offset(rng)
    x2 = _rows_direct(x, x.shape[-1]).contiguous()
    out, pre = get_backend(backend).feed_forward_fwd(x2, w1, b1, w2, b2, activation, dropout_p, seed, offset)
    return out, x2, pre


def feed_forward_inference(x, w1, b1, w2, b2, activation, dropout_p, rng, backend, w1_up=None, b1_up=None):
    """FeedForwardFunction's output for eager calls that build no autograd graph, as rows."""
    if w1_up is not None:
        w1, b1 = _stack(w1, w1_up), _stack(b1, b1_up)
    if _per_sample(rng):
        return _feed_forward_forward(torch.ops.fused_attn.feed_forward_fwd, x, w1, b1, w2, b2, activation, dropout_p,
                                     rng, backend)[0]
    return _feed_forward_direct(x, w1, b1, w2, b2, activation, dropout_p, rng, backend)[0]


class FeedForwardFunction(_Function):
    """Linear -> activation -> dropout -> Linear, as (N, d_out) rows (``as_shape_of`` gives them
    x's leading shape); saves x, the weights and the pre-activation only. ``w1_up``/``b1_up``: a
    gated w1 given as its (gate, up) pair (``w1``/``b1`` the gate halves), stacked for each kernel
    call and its gradient split back."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w1, b1, w2, b2, activation, dropout_p, rng, backend, w1_up, b1_up):
        """(out, pre, x's rows when the kernel read a copy of them, else an empty tensor): the last
        two (non-differentiable) for the backward only."""
        direct = direct_call_ok(x, w1, b1, w2, b2, w1_up, b1_up) and not _per_sample(rng)
        if w1_up is not None:
            w1, b1 = _stack(w1, w1_up), _stack(b1, b1_up)
        if direct:
            out, x2, pre = _feed_forward_direct(x, w1, b1, w2, b2, activation, dropout_p, rng, backend)
        else:
            out, x2, pre = _feed_forward_forward(torch.ops.fused_attn.feed_forward_fwd, x, w1, b1, w2, b2, activation,
                                                 dropout_p, rng, backend)
        copied = x2 is not x and x2._base is not (x if x._base is None else x._base)
        return out, pre, x2 if copied else x.new_empty(0)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_mode=False):
        x, w1, b1, w2, b2, activation, dropout_p, rng, backend, w1_up, b1_up = inputs
        out, pre, x2 = output
        # x itself (for a backward with a graph) and, when x was strided, the copy the kernel read
        # (x2 is 2-D rows or the 1-D placeholder: told by its dim, which an unbacked size leaves known)
        ctx.save_for_backward(x, x2 if x2.dim() == 2 else None, w1, w1_up, w2, pre, rng, b1, b1_up, b2)
        ctx.options = (activation, dropout_p, backend, b1 is not None, b2 is not None, x.shape)
        ctx.mark_non_differentiable(pre, x2)
        _no_zero_grads_for_non_differentiable(ctx)
        if forward_mode:  # the forward_mode twin runs: save for its jvp
            ctx.save_for_forward(x, w1, b1, w2, b2, w1_up, b1_up, rng)
            ctx.layouts = (out.stride(),)

    @staticmethod
    def reference(x, w1, b1, w2, b2, activation, dropout_p, rng, backend, w1_up, b1_up):
        """(out,) rows by the reference math, differentiable to any order (``_nested_forward_mode``),
        with the call's dropout mask (callers read the first output only)."""
        options = (activation, dropout_p, backend, b1 is not None, b2 is not None, x.shape)
        return _feed_forward_reference(options, rng)(x, w1, b1, w2, b2, w1_up, b1_up)

    @staticmethod
    def forward_tangents(ctx, tx, tw1, tb1, tw2, tb2, _activation, _dropout_p, _rng, _backend, tw1_up, tb1_up):
        x, w1, b1, w2, b2, w1_up, b1_up, rng = ctx.saved_tensors
        (tout,) = _jvp_through(_feed_forward_reference(ctx.options, rng), (x, w1, b1, w2, b2, w1_up, b1_up),
                               (tx, tw1, tb1, tw2, tb2, tw1_up, tb1_up), ctx.layouts)
        return tout, None, None

    @staticmethod
    def backward(ctx, dout, _dpre=None, _dx2=None):
        x, x2, w1, w1_up, w2, pre, rng, b1, b1_up, b2 = ctx.saved_tensors
        activation, dropout_p, backend, has_b1, has_b2, shape = ctx.options
        if _create_graph(dout, x, w1, b1, w2, b2, w1_up, b1_up):  # the gradient will be differentiated
            n = ctx.needs_input_grad
            dx, dw1, db1, dw2, db2, dw1_up, db1_up = _grad_with_graph(
                _feed_forward_reference(ctx.options, rng), (x, w1, b1, w2, b2, w1_up, b1_up),
                (n[0], n[1], n[2], n[3], n[4], n[9], n[10]), (dout,))
            return dx, dw1, db1, dw2, db2, None, None, None, None, dw1_up, db1_up
        x2 = _rows(x, shape[-1]) if x2 is None else x2
        dout2 = dout.contiguous()  # the rows' gradient
        w1 = _stack(w1, w1_up)
        bwd = _backward_op(_feed_forward_bwd_impl, "feed_forward_bwd", rng, dout2, x2, w1, w2)
        dx, dw1, db1, dw2, db2 = bwd(dout2, x2, w1, w2, pre, activation, dropout_p, rng, has_b1, has_b2, backend)
        dx = dx if len(shape) == 2 else dx.view(*shape)  # a 2-D x: dx has its shape already
        db1 = db1 if has_b1 else None
        if w1_up is None:
            return dx, dw1, db1, dw2, db2 if has_b2 else None, None, None, None, None, None, None
        dw_gate, dw_up = dw1.chunk(2)
        db_gate, db_up = db1.chunk(2) if db1 is not None else (None, None)
        return dx, dw_gate, db_gate, dw2, db2 if has_b2 else None, None, None, None, None, dw_up, db_up


# ---------------------------------------------------------------------------------------------
# rotary position embedding
# ---------------------------------------------------------------------------------------------

def _rotary_impl(x, cos, sin, positions, interleaved, conjugate, backend):
    if x.numel() == 0:
        return torch.empty_like(x)
    return get_backend(backend).rotary(x, cos, sin, positions, interleaved, conjugate)


def _rotary_inplace_impl(x, cos, sin, positions, interleaved, conjugate, backend):
    if x.numel():
        get_backend(backend).rotary(x, cos, sin, positions, interleaved, conjugate, out=x)


@torch.library.custom_op("fused_attn::rotary_", mutates_args=("x",))
def rotary_(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, conjugate: bool,
            backend: str) -> None:
    """The embedding written into x (``apply_rotary_emb(inplace=True)``)."""
    _rotary_inplace_impl(x, cos, sin, positions, interleaved, conjugate, backend)


@rotary_.register_fake
def _rotary_inplace_fake(x, cos, sin, positions, interleaved, conjugate, backend):
    return None


@torch.library.custom_op("fused_attn::rotary", mutates_args=())
def rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, interleaved: bool, conjugate: bool,
           backend: str) -> Tensor:
    return _rotary_impl(x, cos, sin, positions, interleaved, conjugate, backend)


@rotary.register_fake
def _rotary_fake(x, cos, sin, positions, interleaved, conjugate, backend):
    return torch.empty_like(x)


# Under vmap each registered op runs sample by sample, as torch's fallback would, without its
# warning on every call (``register_vmap_slice_by_slice``). Calls come here under vmap with a
# per-sample rng (``_per_sample``: randomness="different"); others run the implementations, whose
# fused_attn_C ops have the same rule (``backends.cpu``). (rotary_, which mutates x, never gets
# vmapped tensors: ``rotary.rotate`` computes out of place under the transforms.)
for _op in (attention_fwd, attention_bwd, attention_varlen_fwd, attention_varlen_bwd, layer_norm_residual_fwd,
            layer_norm_residual_bwd, feed_forward_fwd, feed_forward_bwd, rotary):
    register_vmap_slice_by_slice(_op, _op._qualname)
del _op


class RotaryFunction(_Function):
    """RoPE on (B, L, H, D): the forward turns each feature pair by its position's angle, the
    backward turns the gradient back (a rotation's transpose is its inverse). Saves the tables and
    the positions only; cos and sin get no gradient. ``inplace``: the forward writes into x (marked
    dirty, as FlashAttention's); the backward always writes a new gradient (the one it is handed
    may be shared or broadcast)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, cos, sin, positions, interleaved, backend, inplace):
        direct = direct_call_ok(x, cos, sin, positions)
        if inplace:
            (_rotary_inplace_impl if direct else torch.ops.fused_attn.rotary_)(x, cos, sin, positions, interleaved,
                                                                               False, backend)
            return x
        op = _rotary_impl if direct else torch.ops.fused_attn.rotary
        return op(x, cos, sin, positions, interleaved, False, backend)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_mode=False):
        x, cos, sin, positions, interleaved, backend, inplace = inputs
        ctx.save_for_backward(cos, sin, positions)
        ctx.options = (interleaved, backend)
        if forward_mode:  # the forward_mode twin runs: save for its jvp
            ctx.save_for_forward(cos, sin, positions)
            ctx.inplace = inplace
        if inplace:
            ctx.mark_dirty(x)

    @staticmethod
    def reference(x, cos, sin, positions, interleaved, backend, inplace):
        """The rotation by the reference math, differentiable to any order (``_nested_forward_mode``)."""
        turned = reference.rotary(x, cos, sin, positions, interleaved)
        return x.copy_(turned) if inplace else turned

    @staticmethod
    def forward_tangents(ctx, tx, *_):
        # linear in x: the tangent turns as x does (in place with x, as autograd wants of a dirty input)
        cos, sin, positions = ctx.saved_tensors
        interleaved, backend = ctx.options
        turned = reference.rotary(tx, cos, sin, positions, interleaved)
        return tx.copy_(turned) if ctx.inplace else turned

    @staticmethod
    def backward(ctx, dout):
        cos, sin, positions = ctx.saved_tensors
        interleaved, backend = ctx.options
        if _create_graph(dout, cos, sin):  # differentiated: the rotation is linear, so is its backward
            dx = reference.rotary(dout, cos, sin, positions, interleaved, conjugate=True)
            return dx, None, None, None, None, None, None
        op = _rotary_impl if direct_call_ok(dout, cos, sin, positions) else torch.ops.fused_attn.rotary
        return op(dout, cos, sin, positions, interleaved, True, backend), None, None, None, None, None, None


def rotary_inference(x, cos, sin, positions, interleaved, backend, inplace=False):
    """RotaryFunction's output for eager calls that build no autograd graph."""
    if inplace:
        _rotary_inplace_impl(x, cos, sin, positions, interleaved, False, backend)
        # The kernels write through x's data pointer, past the dispatcher's ADInplaceOrView key
        # that bumps an in-place op's version counter (as do the registered op rotary_ and the
        # Function's mark_dirty, the other in-place paths). Without the bump, a graph that saved x
        # before (``(x * w).sum()``: mul saves x for w's gradient) read the turned x at backward,
        # a silently wrong gradient, where torch raises "modified by an inplace operation".
        torch.autograd.graph.increment_version(x)
        return x
    return _rotary_impl(x, cos, sin, positions, interleaved, False, backend)


# ---------------------------------------------------------------------------------------------
# torch.export: the forward ops differentiable on their own
# ---------------------------------------------------------------------------------------------

# Under torch.export the functional layer calls each Function's ``forward`` itself (``if
# exporting(): X.forward(...) else: X.apply(...)`` at each call, ``ops_common.exporting``), which
# calls the registered forward op (``direct_call_ok`` is False there), so that the exported graph
# records the op with grad mode on and the exported program is differentiated by the op's own
# autograd formula (``_register_autograd``). Traced as a Function, the graph kept the forward
# alone: strict export ran it under ``wrap_with_set_grad_enabled(False, ...)``, so the inputs got no
# gradient, silently; non-strict export recorded an op without a formula, whose backward raised.
# (Not under torch.compile and torch.func: their Functions keep the fast paths and the higher
# derivatives. The choice is written out at each call: torch 2.11's Dynamo, reaching X.apply
# through a helper function after a graph break, traced the Function's forward as plain code and
# gave a wrong gradient.)


def _register_autograd(op, function, to_function, from_function, outputs=lambda output: output, check=None):
    """Give the forward custom op ``op`` the autograd formula of ``function``: its ``setup_context``
    and ``backward``, on the op's inputs seen as the Function's. ``to_function`` maps the op's
    inputs (and its ``needs_input_grad``) into the Function's arguments, ``from_function`` the
    Function's input gradients back to the op's, ``outputs`` the op's outputs to the Function's;
    ``check(inputs)`` says why a call traced without what a backward needs cannot be differentiated
    (None: it can), raised at backward. The formula runs only where the op is called with grad
    mode on and an input requiring grad, outside the Function (whose forward runs under no_grad):
    in exported programs (the note above). An input that requires grad but gets none (ALiBi slopes
    traced as fixed, which the kernels do not differentiate) raises at backward, never a silently
    missing gradient."""
    names = [a.name for a in op._opoverload._schema.arguments]

    def setup_context(ctx, inputs, output):
        # (refused at backward, not here: a program traced without gradients still runs forward
        # with grad mode on, for inference, as it did)
        ctx.refusal = None if check is None else check(inputs)
        function.setup_context(ctx, to_function(inputs), outputs(output))

    def backward(ctx, *grads):
        if ctx.refusal is not None:
            raise RuntimeError(ctx.refusal)
        given = ctx.needs_input_grad
        # The dispatcher drops trailing arguments equal to their defaults: flags for the op's
        # full argument list, gradients for the arguments given.
        needs = (*given, *(False,) * (len(names) - len(given)))
        ctx.needs_input_grad = to_function(needs)  # (the Function reads its own arguments' flags)
        try:
            result = from_function(function.backward(ctx, *grads))
        finally:
            ctx.needs_input_grad = given
        for name, need, grad in zip(names, needs, result):
            if need and grad is None:
                raise RuntimeError(f"{op._qualname} has no gradient for its argument {name!r}, which requires grad "
                                   f"now but did not when the call was recorded (a torch.export trace, or a direct "
                                   f"call of the op): the recorded call took a path that does not differentiate "
                                   f"{name}. Trace or call it with {name} requiring grad, or detach {name}")
        return result[:len(given)]

    op.register_autograd(backward, setup_context=setup_context)


def _summed_not_stored(inputs):
    if not inputs[10]:  # store_summed
        return ("fused_attn.layer_norm_residual was recorded (a torch.export trace, or a direct call of the op with "
                "store_summed=False) with no gradient wanted, so the call keeps no sum for a backward; trace it with "
                "the inputs or parameters requiring grad (outside torch.no_grad) to differentiate the exported "
                "program")
    return None


def _paged(inputs):
    if inputs[18] is not None:  # block_table
        return ("fused_attn.attention_varlen was recorded (a torch.export trace, or a direct call of the op with a "
                "block_table) with no gradient wanted, so the call reads the paged K/V cache in place, which has no "
                "backward; trace it with q, k or v requiring grad (outside torch.no_grad) to differentiate the "
                "exported program")
    return None


# The Functions' arguments are the ops' with these differences: AttentionFunction and
# AttentionVarlenFunction take return_lse (True here: the op's lse is differentiable, its gradient
# zeros where it went unused), FeedForwardFunction the gated pair's up halves (None: the op takes w1
# and b1 stacked) and returns x's rows as a third output (a placeholder: the op's x is its rows).
_register_autograd(attention_fwd, AttentionFunction, lambda a: (*a, True), lambda g: g[:13])
_register_autograd(attention_varlen_fwd, AttentionVarlenFunction, lambda a: (*a[:18], True, a[18]),
                   lambda g: g[:18] + g[19:], check=_paged)
_register_autograd(layer_norm_residual_fwd, LayerNormResidualFunction, lambda a: a, lambda g: g,
                   check=_summed_not_stored)
_register_autograd(feed_forward_fwd, FeedForwardFunction, lambda a: (*a, None, None), lambda g: g[:9],
                   outputs=lambda out: (*out, out[0].new_empty(0)))


def _rotary_setup_context(ctx, inputs, output):
    x, cos, sin, positions, interleaved, conjugate, backend = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.options = (interleaved, conjugate, backend)


def _rotary_backward(ctx, dout):
    """The rotation's transpose, its inverse: the op turning the other way (``RotaryFunction``'s
    backward), which is differentiable in turn (a backward with ``create_graph=True``)."""
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("fused_attn::rotary gives no gradient for cos and sin, which require grad: detach them")
    cos, sin, positions = ctx.saved_tensors
    interleaved, conjugate, backend = ctx.options
    dx = torch.ops.fused_attn.rotary(dout, cos, sin, positions, interleaved, not conjugate, backend)
    return dx, None, None, None, None, None, None


rotary.register_autograd(_rotary_backward, setup_context=_rotary_setup_context)
