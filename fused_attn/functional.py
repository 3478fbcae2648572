"""The functional API: the contract every backend implements.

Inputs are validated here, once; a wrong rank, shape, dtype mix, device mix or option raises
``ValueError`` / ``TypeError`` naming the argument, the value and what was expected. Then the
backend is resolved (see ``fused_attn.backends``) and the autograd Function runs the registered
ops. Inputs are never modified, with one documented exception: ``attention_with_kvcache`` writes the
new keys and values into the KV cache it is given (FlashAttention's ``flash_attn_with_kvcache``).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .backends import check_backend_name, get_backend, resolve_options, resolve_values
from . import _rng, reference
from .ops import (AttentionFunction, AttentionVarlenFunction, FeedForwardFunction, LayerNormResidualFunction,
                  as_shape_of, attention_inference, attention_varlen_inference, direct_call_ok,
                  feed_forward_inference, inference_call_ok, layer_norm_residual_inference, _attention_reference,
                  _forward_mode_in, _stack, _transform_needs_autograd, differentiated, why_differentiated)
from .ops_common import (ALIGNMENTS, as_int, attention_band, check_block_table, check_traced, check_varlen_bounds,
                         elements_may_overlap, first_page_out_of_range, gather_kv_pages, grad_recording, is_int,
                         exporting, is_dtensor, known_true, no_data, pages_out_of_range, paged_layout, replicated_like,
                         tensors_may_share_memory)
from .reference import ACTIVATIONS, GATED_ACTIVATIONS, get_alibi_slopes  # noqa: F401 (public here too)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------

def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


# What to pass instead of a nested tensor, by what the op does with it (``_nested_error``). The
# kernels take dense tensors with strides; a nested one got past the checks (its dtype and dim
# are a dense one's) and failed deep inside torch, on every backend. The ops take variable-length
# sequences packed: the tokens back to back, as a jagged tensor (B, j, ...) keeps them in
# ``values()`` with the sequence boundaries in ``offsets()``.
NESTED_ATTENTION = ("for sequences of different lengths call attention_varlen on the packed (total, H, D) tokens: "
                    "{name}.values() of a (B, j, H, D) jagged tensor ({name}.transpose(1, 2).values() of a (B, H, j, "
                    "D) one), with its offsets() as the cu_seqlens (torch's scaled_dot_product_attention and "
                    "fused_attn.functional.scaled_dot_product_attention also take jagged tensors)")
NESTED_TOKENS = ("the op is per token: pass the packed (total, ..., d) tokens {name}.values() and rewrap the result "
                 "with torch.nested.nested_tensor_from_jagged(out, {name}.offsets())")
NESTED_ROTARY = ("pass the packed (total, H, D) tokens {name}.values() of a (B, j, H, D) jagged tensor with "
                 "cu_seqlens={name}.offsets() (each sequence's positions start at 0)")
NESTED_MERGE = ("merge attention_varlen's packed outputs, (total, H, Dv) tensors, with their lse.t()")
NESTED_KVCACHE = ("pass dense (B, L, H, D) tensors, the cache's lengths in cache_seqlens (sequences of different "
                  "lengths packed go to attention_varlen, which reads a paged cache through block_table)")
NESTED_MODULE = ("the module takes dense (B, L, d_model) tensors; for self-attention over sequences of different "
                 "lengths pass the packed (total_tokens, d_model) tokens {name}.values() with "
                 "cu_seqlens={name}.offsets()")
NESTED_DENSE = "pass a dense tensor"


def _nested_error(name: str, t: Tensor, use: str) -> TypeError:
    """The TypeError for a nested tensor passed as ``name``: what it is and what to pass instead
    (``use``, one of the NESTED_* hints)."""
    how = use.format(name=name)
    layout = "torch.jagged" if t.layout == torch.jagged else "torch.strided"
    if layout == "torch.strided" and "values()" in use:
        # (a strided nested tensor has no offsets(), and its values() is its flat buffer)
        how += (f" (a strided nested tensor made jagged first: {name} = torch.nested.nested_tensor("
                f"list({name}.unbind()), layout=torch.jagged))")
    return TypeError(f"{name} is a nested tensor ({layout} layout), which fused_attn's ops do not take: {how}")


def any_nested(*args) -> bool:
    """Whether any of ``args`` is a nested tensor (other arguments are not): the calls of SDPA that
    go to torch's own function (``scaled_dot_product_attention``, ``patch_sdpa``)."""
    return any(isinstance(t, Tensor) and t.is_nested for t in args)


# torch's SDPA as torch defines it, taken before fused_attn.patch_sdpa can replace it there.
_torch_sdpa = torch.nn.functional.scaled_dot_product_attention


def _refuse_nested(name: str, t: Tensor) -> None:
    """A tensor argument other than the sequences (a mask, slopes, lengths) that is nested raises."""
    if t.is_nested:
        raise _nested_error(name, t, NESTED_DENSE)


def _refuse_dtensor(function: str, **tensors) -> None:
    """The calls that take no DTensor (``attention_varlen``, ``attention_with_kvcache``,
    ``apply_rotary_emb``: their reference math reads lengths, positions and cache slots on the
    host, and writes caches in place) name it, where one failed deep inside (kvcache: "invalid
    python storage")."""
    for name, t in tensors.items():
        if t is not None and type(t) is not Tensor and _distributed(t):
            raise TypeError(f"{function} takes no DTensor, got one as {name}: call it on the local shards "
                            f"({name}.to_local()), or use attention, which takes DTensors")


def _check_tensor(name: str, t, ndim=None, min_ndim=None, nested: str = NESTED_DENSE) -> None:
    """A floating-point tensor (``ndim``-D, at least ``min_ndim``-D), not nested (``nested``: the
    hint of ``_nested_error``)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise _nested_error(name, t, nested)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {_dtype_name(t.dtype)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def _check_same(ref_name: str, ref: Tensor, others: dict) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all inputs must be on one device")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {_dtype_name(t.dtype)} but {ref_name} has {_dtype_name(ref.dtype)}; "
                            f"inputs must share one dtype")


def _check_qkv(q, k, v, ndim: int) -> None:
    """``_check_tensor`` of q, k and v (``ndim``-D) and ``_check_same`` of k and v against q.

    Fast path: the one combined test below passes only when none of those checks could raise
    (three tensors, q's dtype floating and shared by k and v, each ``ndim``-D, one device, none
    nested), and costs a third of them; when it fails they run in their usual order and raise
    the precise error."""
    if (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and q.dtype in FLOAT_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and q.dim() == ndim and k.dim() == ndim
            and v.dim() == ndim and k.device == q.device == v.device
            and not (q.is_nested or k.is_nested or v.is_nested)):
        return
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, ndim=ndim, nested=NESTED_ATTENTION)
    _check_same("q", q, {"k": k, "v": v})


def _concrete(value):
    """``value`` as a plain Python number: under torch.compile a symbolic int, float or bool is
    specialised to the value it has in this trace, under a guard (a call where it differs
    recompiles). Anything else, and everything in eager mode, is returned as is.

    With ``torch.compile(dynamic=True)`` every size is a SymInt and every float argument, defaults
    included, a SymFloat. The facts that choose the backend (head dims, hidden size, ``Hq != Hkv``,
    ``dropout_p > 0`` ...) must be constants at trace time: ``backends.resolve`` makes the choice
    once and bakes it into the graph, and takes no symbols. The float options are specialised too:
    they are checked with ``math`` (which takes no SymFloat) and are a model's fixed
    hyperparameters anyway. Batch and sequence lengths never come here and stay symbolic, so a new
    length does not recompile (the attention band, which bottom-right alignment computes from the
    lengths, goes to the ops as SymInts).

    The functional calls read ``torch.compiler.is_compiling()`` once and call this only when it is
    True (``if compiling: ...``): in eager mode it returns its argument anyway, and its own test
    cost ~0.2 us a value (eight values a call).
    """
    # Dynamo passes a symbolic number off as an int / float / bool to isinstance, hence the test
    # on is_compiling (a constant in a trace) rather than on the Sym types.
    if torch.compiler.is_compiling() and isinstance(value, (int, float, torch.SymInt, torch.SymFloat, torch.SymBool)):
        # Imported here: it costs ~0.5 s (sympy), and a trace has it loaded already. Dynamo
        # traces guard_scalar (a constant passes through); int() or bool() would stay symbolic.
        from torch.fx.experimental.symbolic_shapes import guard_scalar

        return guard_scalar(value)
    return value


def _shown(value) -> str:
    """``repr(value)`` for an error message, an int of more than 256 bits (~77 digits) as its size
    instead (the repr of a 10**400 fills lines, and one past 4300 digits raises ValueError itself)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        sign, digits = "-" if value < 0 else "", int(value.bit_length() * 0.30103)
        return f"an int of {value.bit_length()} bits (about {sign}1e{digits})"
    return repr(value)


def _finite(value) -> bool:
    """``math.isfinite``, False (not OverflowError) for an int too large to be a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_prob(name: str, p, compiling: bool = False) -> float:
    if compiling:
        p = _concrete(p)
    if type(p) is float and 0.0 <= p < 1.0:  # the common case, which the checks below pass as is
        return p
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:  # (compared before float(), which raises OverflowError on a huge int)
        raise ValueError(f"{name} must be in [0, 1), got {_shown(p)}")
    return float(p)


def _check_scale(name: str, scale) -> float:
    """A softmax scale that is given (not None): a finite real of magnitude at most MAX_SCALE, as a float.
    (``name``: the caller's name for it, ``softmax_scale`` in the FlashAttention stand-in.)"""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a finite float or None, got {type(scale).__name__}")
    if not (isinstance(scale, numbers.Integral) or math.isfinite(scale)):  # (an int is finite)
        raise ValueError(f"{name} must be a finite float or None, got {scale!r}")
    if abs(scale) > MAX_SCALE:  # (exact for an int too large to be a float)
        raise ValueError(f"{name} must be at most {MAX_SCALE:g} in magnitude (float32's max / log2(e): the kernels "
                         f"take {name} * log2(e) as float32), got {_shown(scale)}")
    return float(scale)


def _check_generator(generator, device) -> None:
    """None (torch's default CPU generator), a CPU ``torch.Generator``, or one on the inputs'
    device (``torch.Generator(q.device)``: see ``_draw_rng``). Checked whether or not the call
    drops anything, so that a wrong one is not noticed only once dropout is turned on."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__} "
                        f"{_shown(generator)}")
    where = generator.device
    if where.type != "cpu" and (where.type != device.type or where.index not in (None, device.index)):
        raise ValueError(f"generator is on {where} but the inputs are on {device}: pass a CPU generator "
                         f"(torch.Generator()) or one on the inputs' device")


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):  # (numpy's bool is named "bool" too: say whose)
        kind = type(value).__name__ if type(value).__module__ == "builtins" else \
            f"{type(value).__module__}.{type(value).__qualname__}"
        raise TypeError(f"{name} must be a bool, got {kind} {value!r}")
    return value


def _check_eps(eps) -> float:
    """A norm's eps: a positive finite number (``layer_norm_residual``, and the norm modules at
    construction)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a positive float, got {type(eps).__name__}")
    if not (eps > 0 and _finite(eps)):
        raise ValueError(f"eps must be a positive finite float, got {_shown(eps)}")
    return float(eps)


def _check_window(name: str, window):
    """None, or (left, right) ints >= -1 (-1: unbounded); (-1, -1) is the same as None."""
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in window)):
        raise TypeError(f"{name} must be None or a pair of ints (left, right), got {window!r}")
    left, right = int(window[0]), int(window[1])
    if left < -1 or right < -1:
        raise ValueError(f"{name} sides must be >= 0, or -1 for unbounded, got {window!r}")
    return None if (left, right) == (-1, -1) else (left, right)


def _needs_grad(*tensors) -> bool:
    """Whether the call must go through its autograd Function: a gradient may be wanted, or a
    forward-mode tangent (which torch computes under no_grad and inference_mode too)."""
    if not grad_recording():
        return _forward_mode_in(tensors)
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return _transform_needs_autograd(tensors)  # (torch.func transforms, forward-mode AD)


# Whether a call builds no autograd graph and may skip the registered ops (``ops.direct_call_ok``:
# eager, plain tensors, no dispatch mode): it then runs the op's implementation directly, without
# the autograd Function either (~0.1 ms a call on CPU in all, as much as a whole small attention).
# ``ops.inference_call_ok`` is ``not _needs_grad(*tensors) and direct_call_ok(*tensors)`` in one pass.
_eager_inference = inference_call_ok


def _distributed(*tensors) -> bool:
    """Whether an input is a DTensor (tensor parallelism: a norm under SequenceParallel sees its
    input sharded along the sequence). The registered ops have no sharding rules, so such a call
    runs the reference math, plain PyTorch ops that DTensor shards one by one (unfused; dropout
    from the call's [seed, offset] pair, the plain call's mask, ``_rng.apply_dropout``). Plain
    tensors return at the first type check; DTensor exists only once torch.distributed.tensor is
    imported."""
    for t in tensors:
        if t is None or type(t) is Tensor or type(t) is torch.nn.Parameter:
            continue
        if is_dtensor(t):
            return True
    return False


def _replicated(*tensors):
    """The tensors of a call with a DTensor among them, each plain one (a mask, slopes, sinks built
    on every rank alike) a DTensor replicated on the mesh of the first DTensor (``replicated_like``)."""
    mesh_of = next(t for t in tensors if _distributed(t))
    return tuple(None if t is None else replicated_like(t, mesh_of) for t in tensors)


def _distinct(*tensors):
    """The tensors, with a repeat of an earlier one replaced by a view of it. torch.compile cannot
    trace an autograd Function given one tensor twice (self-attention's ``attention(x, x, x)``,
    ``cu_seqlens_k is cu_seqlens_q``); a view is a separate input to it and costs nothing."""
    seen = []
    out = []
    for t in tensors:
        if t is not None and any(t is s for s in seen):
            t = t.view_as(t)
        seen.append(t)
        out.append(t)
    return out


def _draw_rng(dropout_p: float, generator: Optional[torch.Generator], like: Tensor) -> Optional[Tensor]:
    """[seed, offset] for the counter-based dropout RNG, an int64 CPU tensor (the ops read it on
    the host and pass the two numbers to the kernels), drawn from torch's default CPU generator or
    the given one (``_check_generator``). A generator of another device (CUDA's) is drawn from on
    its own device, as torch's ops draw from one (torch.randint takes a generator only of the
    device it draws on), and the pair copied to the host: that copy waits for the device, one
    sync a call, which a CPU generator (or none) does not cost.

    ``like``: the call's input. Shapes without data draw nothing, as torch's dropout and SDPA draw
    nothing on them: on meta a placeholder pair (a shape probe advanced the generator, so a seeded
    run after it dropped other elements); a fake tensor's pair is drawn in its FakeTensorMode,
    which advances no generator (under an active mode torch.randint does that by itself; outside
    it, a real pair next to fake tensors failed the op)."""
    if dropout_p == 0.0:
        return None
    if like.is_meta:
        return torch.zeros(2, dtype=torch.int64, device="cpu")  # (cpu: also under torch.device("meta"))
    if (type(like) is not Tensor and type(like) is not torch.nn.Parameter and not torch.compiler.is_compiling()
            and is_fake(like) and not torch._C._len_torch_dispatch_stack()):
        with like.fake_mode:
            return _draw_pair(generator)
    return _draw_pair(generator)


def _draw_pair(generator: Optional[torch.Generator]) -> Tensor:
    """``_draw_rng``'s pair, drawn from the generator (torch's default CPU one for None)."""
    if generator is None or generator.device.type == "cpu":
        return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device="cpu")
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=generator, device=generator.device).cpu()


def _counter_dropout(t: Tensor, p) -> Tensor:
    """dropout(t) with the ops' counter-based RNG (``_rng.apply_dropout``: element (row, col) of t
    flattened to (N, t.shape[-1]), the seed drawn as the ops draw theirs, ``_draw_rng``): for the
    fused modules' dropouts outside an op (a pre-LN layer's last residual add, a feed-forward
    unfused for an adapter). torch's ``F.dropout`` there would be the one op that inductor
    replaces with its own RNG, so a compiled model dropped other elements than eager; here the
    seed is a ``torch.randint`` the graph keeps and the mask is integer math of it, the same
    elements compiled or not. A DTensor takes the same mask (each rank its shard's part), as the
    ops' reference path on DTensors does."""
    compiling = torch.compiler.is_compiling()
    p = _check_prob("dropout_p", p, compiling)  # (a module's float attribute: a symbol under Dynamo)
    if p == 0.0:
        return t
    rng = _draw_rng(p, None, t)
    if compiling or no_data(t):
        # 0-dim int64 tensors give the ints' bits (_rng.row_keys); no host read in a graph (nor of
        # a fake pair, which has no values), and on t's device (a CPU scalar next to device
        # tensors is not every compiler's case)
        rng = rng.to(t.device)
        return _rng.apply_dropout(t, p, rng[0], rng[1])
    return _rng.apply_dropout(t, p, *_rng.seed_offset(rng))  # (vmap: seed_offset reads a batched pair)


def _autocast(*tensors):
    """Under ``torch.autocast`` for the first tensor's device, the tensors as autocast's
    lower-precision ops (matmul, linear, SDPA) take them: every floating one on that device but
    float64 in the autocast dtype (float16 ones too under a bfloat16 autocast), others (float64,
    ints, None) as they are. Outside autocast, the tensors unchanged. (Differentiable: the
    gradient of a cast parameter comes back in its own dtype.)"""
    first = tensors[0]
    if not isinstance(first, Tensor) or not _autocast_on(first):
        return tensors
    device, dtype = first.device.type, torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE and t.dtype != dtype
                 and t.device.type == device else t for t in tensors)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
#: whether autocast is on for CPU, CUDA or a few other device types (not MPS); a torch._C function
#: (torch >= 2.4; without it, True: ``_autocast_on`` then asks about the tensor's device type)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_on(t: Tensor, compiling: Optional[bool] = None) -> bool:
    """``_autocast_enabled(t.device.type)``, the calls' test of autocast for their inputs' device.
    Autocast off on CPU and CUDA, the common case, is one C call: reading ``t.device.type`` cost
    ~0.3 us, several times the rest of the test. ``_any_autocast`` does not cover every device type
    (not MPS's), and under a trace the per-device test is the one Dynamo evaluates for the traced
    region (an autocast block inside the compiled function). ``compiling``:
    ``torch.compiler.is_compiling()`` where the caller has read it (None: read here)."""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if not compiling and (t.is_cpu or t.is_cuda) and not _any_autocast():
        return False
    return _autocast_enabled(t.device.type)


def _autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled(device_type)``, False for device types autocast does not know
    (meta tensors: torch raises "unknown device type for autocast" there)."""
    if device_type == "meta":
        return False
    return torch.is_autocast_enabled(device_type)

#: the smallest logit cap taken (the kernels divide by it in float32)
MIN_SOFTCAP = 1e-30
MAX_FLOAT32 = float(torch.finfo(torch.float32).max)
#: the largest softcap and |scale| taken, float32's max / log2(e) (~2.36e38): the Triton kernels
#: work in base-2 units (exp2) and take scale * log2(e) and softcap * log2(e) as float32, which a
#: larger one overflows to inf (NaN logits). Checked here, so that every backend refuses the same values.
MAX_SCALE = MAX_FLOAT32 / math.log2(math.e)


def _check_attention_options(Hq, Hkv, D, causal, window_size, alignment, dropout_p, scale, softcap, return_lse,
                             compiling=False):
    """What ``attention`` and ``attention_varlen`` check alike once the shapes agree: the head
    counts (grouped-query) and the scalar options, normalised: (window_size or None, dropout_p,
    scale, softcap as floats, 0 = off). ``compiling``: torch.compiler.is_compiling() (see
    ``_concrete``)."""
    if (Hkv == 0 and Hq != 0) or (Hkv != 0 and Hq % Hkv != 0):
        raise ValueError(f"the query heads (q.shape[1] = {Hq}) must be a multiple of the key/value heads "
                         f"(k.shape[1] = {Hkv})")
    if D == 0:  # (every logit would be 0: the kernels' empty-input shortcut gave zeros, SDPA the mean of v)
        raise ValueError("q and k must have a head dim (their last dimension) of at least 1, got 0")
    if not (type(return_lse) is bool and type(causal) is bool):  # else _check_bool passes them
        _check_bool("return_lse", return_lse)
        _check_bool("causal", causal)
    if window_size is not None:
        window_size = _check_window("window_size", window_size)
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {', '.join(map(repr, ALIGNMENTS))}, got {alignment!r}")
    dropout_p = _check_prob("dropout_p", dropout_p, compiling)
    if compiling:
        scale, softcap = _concrete(scale), _concrete(softcap)
    if scale is None:
        scale = 1.0 / math.sqrt(D) if D > 0 else 1.0
    else:
        scale = _check_scale("scale", scale)
    if softcap is None:
        softcap = 0.0
    elif isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a float or None, got {softcap!r}")
    elif not (_finite(softcap) and (softcap == 0.0 or MIN_SOFTCAP <= softcap <= MAX_SCALE)):
        raise ValueError(f"softcap must be 0 or None (off), or a number in [{MIN_SOFTCAP:g}, {MAX_SCALE:g}], got "
                         f"{_shown(softcap)} (a smaller cap flattens every logit to 0 and overflows 1 / softcap in float32; "
                         f"a larger one overflows softcap * log2(e), which the kernels take as float32)")
    return window_size, dropout_p, float(scale), float(softcap)


def _check_mask_dtype(attn_mask: Tensor, dtype: torch.dtype) -> None:
    """``attention``'s mask dtype: bool (True = attend) or additive in q's ``dtype`` (also the
    reference module's check, on its projections' dtype)."""
    if attn_mask.dtype != torch.bool and attn_mask.dtype != dtype:
        raise TypeError(f"attn_mask must be bool (True = attend) or additive with q's dtype "
                        f"{_dtype_name(dtype)}, got {_dtype_name(attn_mask.dtype)}")


def _check_alibi(alibi_slopes, rows: int, rows_name: str, Hq: int, device, learnable: str = "",
                 learned: bool = False):
    """ALiBi slopes as the ops take them: float32 (rows, Hq), a stride-0 view of (Hq,) slopes.
    ``learnable``: where slopes that require grad can go instead (named in the error).
    ``learned``: slopes going into a mask (``_learned_alibi_mask``), whose derivative is allowed."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    _refuse_nested("alibi_slopes", alibi_slopes)
    if not alibi_slopes.is_floating_point():
        raise TypeError(f"alibi_slopes must be a floating-point tensor (float32, as FlashAttention's), got "
                        f"{_dtype_name(alibi_slopes.dtype)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    # (rank first: comparing a (rows, Hq) shape with (Hq,) would compare rows with Hq, a guard that
    # a dynamic batch size fails under torch.export)
    if not (alibi_slopes.dim() == 1 and alibi_slopes.shape[0] == Hq
            or alibi_slopes.dim() == 2 and alibi_slopes.shape == (rows, Hq)):
        raise ValueError(f"alibi_slopes must have shape (Hq,) = ({Hq},) or ({rows_name}, Hq) = ({rows}, {Hq}), got "
                         f"{tuple(alibi_slopes.shape)}")
    why = None if learned else why_differentiated(alibi_slopes)  # (forward mode too: a tangent would be lost)
    if why:
        raise ValueError(f"alibi_slopes {why}, but this call's kernels give the slopes no gradient (as "
                         f"FlashAttention's); pass alibi_slopes.detach(){learnable}")
    return alibi_slopes.to(torch.float32).expand(rows, Hq)


def _learned_alibi_mask(slopes: Tensor, attn_mask: Optional[Tensor], Lq: int, Lk: int, alignment: str,
                        dtype) -> Tensor:
    """Slopes that require grad (or carry a forward-mode tangent), as an additive mask in q's dtype
    (``reference.alibi_bias``, the in-kernel bias written out, combined with attn_mask): the
    kernels return a mask's gradient, and autograd carries it to the slopes (forward mode: the
    slopes' tangent reaches the mask's, which the Function's jvp takes). (Lq, Lk) per head: what
    a learnable bias costs."""
    from .reference import alibi_bias

    # float32 at least, float64 for float64 q: rounding float64 slopes to float32 gave their
    # gradient a float32 forward (float64 gradcheck w.r.t. the slopes failed)
    wide = torch.promote_types(dtype, torch.float32)
    bias = alibi_bias(slopes.to(wide), Lq, Lk, alignment, wide)  # (Hq | B, Hq, Lq, Lk)
    if attn_mask is None:
        return bias.to(dtype)
    if attn_mask.dtype == torch.bool:
        return torch.where(attn_mask, bias, float("-inf")).to(dtype)  # (broadcast both ways)
    return (bias + attn_mask.to(wide)).to(dtype)


def _check_sinks(sinks, Hq: int, device):
    """Attention-sink logits: None, or a floating (Hq,) tensor on q's device (any dtype; used in the
    lse's dtype, float32 or float64)."""
    if sinks is None:
        return None
    if not isinstance(sinks, Tensor):
        raise TypeError(f"sinks must be a torch.Tensor or None, got {type(sinks).__name__}")
    _refuse_nested("sinks", sinks)
    if not sinks.is_floating_point():
        raise TypeError(f"sinks must be a floating-point tensor, got {_dtype_name(sinks.dtype)}")
    if sinks.device != device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {device}")
    if sinks.shape != (Hq,):
        raise ValueError(f"sinks must have shape (Hq,) = ({Hq},), got {tuple(sinks.shape)}")
    return sinks


def _apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor, head_dim: int):
    """Attention with sinks from attention without: a sink logit s_h joins every row's softmax
    denominator and has no value, so each row's output shrinks by sum / (sum + e^s), i.e. by
    sigmoid(lse - s), and its log-denominator becomes logaddexp(lse, s). Done on (out, lse) with
    autograd (the lse is differentiable), as transformers renormalises FlexAttention's output: one
    elementwise pass over the output, no kernel change. Rows that see no key (lse = +inf) keep their
    zeros (sigmoid(+inf) = 1, gradient 0) and get the sink alone as their lse. ``head_dim``: lse's
    dimension of the heads (1 dense (B, Hq, Lq), 0 varlen (Hq, total_q)); the output's is that of
    lse's rows plus one. ``sinks`` (Hq,), one logit per head, or already broadcastable to lse's
    shape, one per row (transformers' per-token sinks)."""
    if sinks.dim() == lse.dim():
        sink = sinks.to(lse.dtype)
    else:
        shape = [1] * lse.dim()
        shape[head_dim] = -1
        sink = sinks.to(lse.dtype).view(shape)
    factor = torch.sigmoid(lse - sink)  # (B, Hq, Lq) or (Hq, total_q)
    factor = factor.unsqueeze(-1) if head_dim == 1 else factor.t().unsqueeze(-1)
    out = (out * factor).to(out.dtype)
    # A row without keys has the sink alone: its lse is the sink itself. Not logaddexp(-inf, s):
    # its value is s, but its second derivative is inf/inf = NaN, and a where that discards a
    # branch still carries that branch's NaN into the gradient (0 * NaN). So both sides: such rows
    # give logaddexp a finite stand-in (0) and the outer where takes the sink for them.
    no_keys = lse == float("inf")
    keys_lse = torch.where(no_keys, 0.0, lse)
    return out, torch.where(no_keys, sink, torch.logaddexp(keys_lse, sink))


def _with_sinks(result, sinks, return_lse: bool, head_dim: int):
    """The attention call's answer: ``result`` as the op gave it (out, or (out, lse)), or, with
    ``sinks``, the op's (out, lse) through ``_apply_sinks``, the lse kept if ``return_lse``."""
    if sinks is None:
        return result
    out, lse = _apply_sinks(*result, sinks, head_dim)
    return (out, lse) if return_lse else out


#: the options of an attention call that choose its backend, sorted by name (``_attention_values``)
ATTENTION_OPTIONS = ("alibi", "causal", "dropout", "gqa", "head_dim", "head_dim_v", "mask", "mask_grad", "softcap",
                     "window")
#: those of a packed (varlen) call: one more, ``varlen`` (True)
VARLEN_OPTIONS = ATTENTION_OPTIONS[:-1] + ("varlen",) + ATTENTION_OPTIONS[-1:]


def _attention_values(D, Dv, gqa, causal, window_size, dropout_p, softcap, attn_mask=None, alibi=None,
                      varlen=False) -> tuple:
    """The facts of an attention call that choose its backend: the values of ``ATTENTION_OPTIONS``
    (``VARLEN_OPTIONS`` with ``varlen``), in that order, as ``backends.resolve_values`` takes them."""
    mask = None if attn_mask is None else ("bool" if attn_mask.dtype == torch.bool else "additive")
    if varlen:
        return (alibi is not None, causal, dropout_p > 0.0, gqa, D, Dv, mask,
                attn_mask is not None and attn_mask.requires_grad, softcap > 0.0, True, window_size is not None)
    return (alibi is not None, causal, dropout_p > 0.0, gqa, D, Dv, mask,
            attn_mask is not None and attn_mask.requires_grad, softcap > 0.0, window_size is not None)


def _attention_options(D, Dv, gqa, causal, window_size, dropout_p, softcap, attn_mask=None, alibi=None,
                       varlen=False) -> tuple:
    """The facts of an attention call that choose its backend, as the (name, value) pairs of a
    ``backends.Call``'s options sorted by name (what ``backends.resolve_options`` takes).
    ``varlen`` appears only when True."""
    return tuple(zip(VARLEN_OPTIONS if varlen else ATTENTION_OPTIONS,
                     _attention_values(D, Dv, gqa, causal, window_size, dropout_p, softcap, attn_mask, alibi, varlen)))


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

def attention(q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Optional[Tensor] = None, causal: bool = False,
              window_size: Optional[tuple[int, int]] = None, alignment: str = "top_left",
              dropout_p: float = 0.0, scale: Optional[float] = None, softcap: Optional[float] = None,
              alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None, return_lse: bool = False,
              backend: Optional[str] = None, generator: Optional[torch.Generator] = None,
              _rng: Optional[Tensor] = None):
    """Scaled dot-product attention, ``softmax(q k^T * scale + mask) v``.

    Args:
        q: (B, Hq, Lq, D) queries.  k: (B, Hkv, Lk, D) keys.  v: (B, Hkv, Lk, Dv) values.
            ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention: query head h reads
            kv head ``h // (Hq // Hkv)``). Any strides.
        attn_mask: bool (True = attend) or additive float mask of q's dtype, broadcastable to
            (B, Hq, Lq, Lk); it is read through strides, never expanded in memory. An additive
            mask that requires grad gets its gradient.
        causal: query i attends keys j <= i (top-left aligned, as scaled_dot_product_attention,
            unless ``alignment`` says otherwise); combines with ``attn_mask``.
        window_size: (left, right), local (sliding-window) attention as FlashAttention's: query i
            attends keys j with i - left <= j <= i + right; -1 leaves that side unbounded.
            ``window_size=(w - 1, 0)`` with ``causal=True`` is a causal window of w keys (Mistral's
            sliding window). The kernels skip the key blocks outside the window: cost grows with
            Lq * window, not Lq * Lk.
        alignment: "top_left" (default) or "bottom_right": where query i sits among the keys for
            ``causal`` and ``window_size`` when Lq != Lk. Bottom-right puts it at key
            i + Lk - Lq, so the last query faces the last key: FlashAttention's causal convention
            and what decoding with a KV cache wants (torch's ``causal_lower_right``). Query rows
            that then see no key (Lq > Lk) return zeros.
        dropout_p: dropout on the attention probabilities (counter-based, reproducible from the
            seed drawn from ``generator`` or torch's default CPU generator). ``generator``: a
            CPU ``torch.Generator``, or one on q's device (drawn from there: one device sync a call).
        scale: logits scale, default ``1/sqrt(D)``.
        softcap: logit soft-capping (Gemma 2, FlashAttention's ``softcap``): the scaled scores
            become ``softcap * tanh(scores / softcap)`` before the mask is added. None or 0: off.
        alibi_slopes: ALiBi (Press et al.; FlashAttention's ``alibi_slopes``): (Hq,) or (B, Hq)
            slopes, used in float32, each adding ``-slope * |j - d_i|`` to query i's logit for key j
            (after the cap, with the mask), where d_i is query i's key position given by
            ``alignment`` (i, or i + Lk - Lq for bottom_right, as FlashAttention places it). Computed
            in the kernels, never as an (Lq, Lk) tensor. ``get_alibi_slopes(Hq)`` gives the paper's
            slopes. Slopes that require grad (learnable ALiBi) get their gradient: the call then
            adds them to the mask as a (.., Hq, Lq, Lk) bias in q's dtype, whose gradient the
            kernels return (the memory of a learnable bias; fixed slopes stay in the kernels).
        sinks: attention sinks (gpt-oss; transformers' ``s_aux``): (Hq,) logits, one per query head,
            each joining its head's every softmax row as one more column that has no value: query i
            attends key j with weight e^{s_ij} / (sum_j' e^{s_ij'} + e^{sink_h}). Learnable: they get
            their gradient. A row that sees no key gives zeros.
        return_lse: also return the (B, Hq, Lq) log-sum-exp (float32; float64 for float64 inputs)
            of each row's scaled, capped and masked logits (natural log; before dropout), as
            FlashAttention's ``return_softmax_lse``:
            what merging partial attentions (split keys, ring / context parallelism) needs. +inf on
            rows that see no key. It is differentiable (unlike FlashAttention's, as FlexAttention's):
            a merge of partial attentions trains under plain autograd. Its gradient costs one
            subtraction per row in the backward (d lse_i / d s_ij = P_ij); +inf rows get none.
            With ``sinks`` it is the log of the whole denominator, sink included (finite on every row).
        backend: "auto", "triton", "cuda", "cpu" or "reference"; None uses ``use_backend`` /
            ``FUSED_ATTN_BACKEND`` / auto.

    Returns (B, Hq, Lq, Dv), or (out, lse) with ``return_lse``. Same meaning as
    ``torch.nn.functional.scaled_dot_product_attention`` except that a row whose keys are all
    masked returns zeros (and zero gradients), never NaN.

    (``_rng``, internal: the dropout's ``[seed, offset]`` pair, drawn by the caller instead of
    from ``generator``: the fused module's packed path with learnable slopes runs each sequence
    through this call with the pair ``attention_varlen`` would have used for it, so that both
    paths drop the same elements and draw the same from torch's generator.)
    """
    compiling = torch.compiler.is_compiling()
    if isinstance(q, Tensor) and _autocast_on(q, compiling):
        q, k, v, attn_mask = _autocast(q, k, v, attn_mask)  # (as SDPA under autocast)
    _check_qkv(q, k, v, 4)
    device = q.device
    if generator is not None:
        _check_generator(generator, device)
    B, Hq, Lq, D = q.shape  # each .shape is a new torch.Size: read once
    k_batch, Hkv, Lk, k_dim = k.shape
    v_batch, v_heads, v_len, Dv = v.shape
    if k_batch != B or v_batch != B:
        raise ValueError(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv != v_heads:
        raise ValueError(f"k and v must have the same number of heads, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Lk != v_len:
        raise ValueError(f"k and v must have the same sequence length, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k_dim != D:
        raise ValueError(f"q and k must have the same head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    gqa = Hq != Hkv
    if compiling:  # they choose the backend (and D the default scale)
        D, Dv, gqa = _concrete(D), _concrete(Dv), _concrete(gqa)
    window_size, dropout_p, scale, softcap = _check_attention_options(Hq, Hkv, D, causal, window_size, alignment,
                                                                      dropout_p, scale, softcap, return_lse, compiling)
    learned_alibi = False
    if alibi_slopes is not None:
        # Slopes that a derivative is taken of (reverse mode, or a forward-mode tangent) are added
        # to the mask below, whose derivative the Function computes in both modes.
        learned_alibi = isinstance(alibi_slopes, Tensor) and differentiated(alibi_slopes)
        if learned_alibi:  # checked as fixed slopes, then added to the mask below
            _check_alibi(alibi_slopes, B, "B", Hq, device, learned=True)
        else:
            alibi_slopes = _check_alibi(alibi_slopes, B, "B", Hq, device)
    if sinks is not None:
        sinks = _check_sinks(sinks, Hq, device)
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
        _refuse_nested("attn_mask", attn_mask)
        _check_mask_dtype(attn_mask, q.dtype)
        if attn_mask.device != device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but q is on {device}")
        target = (B, Hq, Lq, Lk)
        if attn_mask.dim() > 4 or any(m not in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target))):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to "
                             f"(B, Hq, Lq, Lk) = {target}")
    # DTensor operands (tensor parallelism) run the reference math, DTensor's ops one by one, which
    # refuse a plain operand next to a DTensor: plain ones are taken as replicated on the mesh.
    distributed = _distributed(q, k, v, attn_mask, alibi_slopes, sinks)
    if distributed:
        q, k, v, attn_mask, alibi_slopes, sinks = _replicated(q, k, v, attn_mask, alibi_slopes, sinks)
    if learned_alibi:
        attn_mask, alibi_slopes = _learned_alibi_mask(alibi_slopes, attn_mask, Lq, Lk, alignment, q.dtype), None
    if backend is not None:
        check_backend_name(backend)
    name = resolve_values("attention", ATTENTION_OPTIONS, device, q.dtype, _attention_values(
        D, Dv, gqa, causal, window_size, dropout_p, softcap, attn_mask, alibi_slopes), backend, compiling)
    band_lo, band_hi = attention_band(Lq, Lk, causal, window_size, alignment)
    if compiling:
        q, k, v, attn_mask = _distinct(q, k, v, attn_mask)
    rng = _draw_rng(dropout_p, generator, q) if _rng is None or dropout_p == 0.0 else _rng
    args = (q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, rng, name, softcap, alibi_slopes,
            alignment == "bottom_right")
    want_lse = return_lse or sinks is not None
    if distributed:
        # The reference math with the call's [seed, offset] pair: the dropout mask is the one the
        # plain call draws (ranks seeded alike, as DTensor's own random ops want, draw one pair).
        options = (band_lo, band_hi, dropout_p, scale, name, softcap, alignment == "bottom_right")
        result = _attention_reference(options, rng, alibi_slopes)(q, k, v, attn_mask)
        result = result if want_lse else result[0]
    elif not compiling and _eager_inference(q, k, v, attn_mask):
        result = attention_inference(*args, want_lse)
    else:
        if exporting():  # (the Function's forward: an exported program differentiates its ops; see ops)
            result = AttentionFunction.forward(*args, want_lse)  # (out, lse)
        else:
            result = AttentionFunction.apply(*args, want_lse)
        result = result if want_lse else result[0]
    return result if sinks is None else _with_sinks(result, sinks, return_lse, head_dim=1)


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, *, causal: bool = False,
                     window_size: Optional[tuple[int, int]] = None, alignment: str = "top_left",
                     dropout_p: float = 0.0, scale: Optional[float] = None, softcap: Optional[float] = None,
                     alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None, return_lse: bool = False,
                     seqused_k: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                     backend: Optional[str] = None, generator: Optional[torch.Generator] = None,
                     _checked_used_k: Optional[list] = None):
    """Attention over packed sequences of different lengths, without padding (FlashAttention's
    ``flash_attn_varlen_func``; what training on packed batches and Hugging Face's
    ``DataCollatorWithFlattening`` produce).

    Args:
        q: (total_q, Hq, D), the queries of every sequence one after another. k: (total_k, Hkv, D),
            v: (total_k, Hkv, Dv), likewise. Any strides.
        cu_seqlens_q, cu_seqlens_k: int32 or int64 (B + 1,) on q's device, the cumulative sequence
            lengths: sequence s is rows ``cu_seqlens_q[s]:cu_seqlens_q[s + 1]`` of q and
            ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]`` of k and v; it attends only within itself.
            They must start at 0, never decrease, and end at total_q / total_k.
        max_seqlen_q, max_seqlen_k: the longest sequence (an upper bound is fine), or None. The
            kernels are launched for the longest length read from cu_seqlens (one device sync, by the
            call in eager mode and by the op when it runs under torch.compile / torch.export, whose
            graph holds the bound given or, for None, the total length). (Meta and fake tensors,
            shapes without data, take torch.compile's path, nothing read.)
        seqused_k: int32/int64 (B,) or None: sequence s uses only the first ``seqused_k[s]`` keys of
            its rows ``cu_seqlens_k[s]:cu_seqlens_k[s + 1]`` (FlashAttention 3's ``seqused_k``): a
            padded KV cache of B slots with ragged lengths, ``cu_seqlens_k = arange(B + 1) * slot``.
            The unused keys are not read, their gradients are zero, and bottom_right aligns on the
            used length.
        block_table: int32 (B, pages_per_seq) or None: a paged KV cache (FlashAttention's and
            vLLM's ``block_table``). k is then (num_pages, page_size, Hkv, D) and v (num_pages,
            page_size, Hkv, Dv), pages shared by all sequences: sequence s's key j is row
            ``j % page_size`` of page ``block_table[s, j // page_size]``, and its key count is
            ``cu_seqlens_k[s + 1] - cu_seqlens_k[s]`` (or ``seqused_k[s]``); cu_seqlens_k's offsets
            address nothing. Pages may be shared (a common prefix); unused table entries are never
            read. The Triton backend's forward reads the pages in place; the other backends, and
            calls whose q, k or v require grad, gather the pages in use first: the table's first
            ceil(longest / page_size) columns (all of them under torch.compile, where the lengths
            are not read); the gradient then reaches the pages, summed over the sequences sharing
            one.
        alibi_slopes: (Hq,) or (B, Hq) (row s for sequence s), as in ``attention``, each sequence
            placed on its own lengths.
        causal, window_size, alignment, dropout_p, scale, softcap, sinks, backend, generator: as in
            ``attention``, applied to each sequence with its own lengths (bottom_right aligns each
            sequence's last query with its last key, as FlashAttention's varlen causal does).

    Returns (total_q, Hq, Dv), or (out, lse) with ``return_lse`` (lse (Hq, total_q), float32 or,
    for float64 inputs, float64, as in ``attention``). Sequence s gives what ``attention`` gives
    on it alone (dropout: that call's mask at offset + Hq * cu_seqlens_q[s] of the same seed):
    bitwise on the reference and cuda backends, under the Triton interpreter and on the cpu
    backend under FUSED_ATTN_CPU_GEMM=tiles (float32, float16, bfloat16); to rounding with Triton
    on a GPU and in the cpu backend's default mode, where a sequence alone may take a decoding
    path the packed call does not (README, backend notes). Outside torch.compile the boundaries are checked (one small device-to-host
    copy); the Triton and cpu backends run every sequence in one launch (the cpu one in one
    parallel loop), the others loop over the sequences.

    (``_checked_used_k``, internal: ``attention_with_kvcache`` passes the keys each sequence uses,
    having checked them and the table itself, with boundaries it built; the values are then not
    read again, which spares a decoding step two device-to-host copies. The fused modules' packed
    self-attention passes the lengths of the cu_seqlens it checked under its own names, with
    max_seqlen_q their longest.)
    """
    compiling = torch.compiler.is_compiling()
    paged = block_table is not None
    if isinstance(q, Tensor) and _autocast_on(q, compiling):
        q, k, v = _autocast(q, k, v)
    if paged:  # pages: (num_pages, page_size, Hkv, dim)
        _check_tensor("q", q, ndim=3, nested=NESTED_ATTENTION)
        for name, t in (("k", k), ("v", v)):
            _check_tensor(name, t, ndim=4)  # (pages of a cache)
        _check_same("q", q, {"k": k, "v": v})
    else:
        _check_qkv(q, k, v, 3)
    _refuse_dtensor("attention_varlen", q=q, k=k, v=v)
    if generator is not None:
        _check_generator(generator, q.device)
    total_q, Hq, D = q.shape
    k_shape, v_shape = k.shape, v.shape
    total_k, Hkv, k_dim, Dv = k_shape[0], k_shape[-2], k_shape[-1], v_shape[-1]
    gqa = Hq != Hkv
    if compiling:  # they choose the backend (and D the default scale)
        D, Dv, gqa = _concrete(D), _concrete(Dv), _concrete(gqa)
    if v_shape[:-1] != k_shape[:-1]:
        what = "pages, page size and heads" if paged else "tokens and heads"
        raise ValueError(f"k and v must have the same {what}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k_dim != D:
        raise ValueError(f"q and k must have the same head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    window_size, dropout_p, scale, softcap = _check_attention_options(Hq, Hkv, D, causal, window_size, alignment,
                                                                      dropout_p, scale, softcap, return_lse, compiling)
    device = q.device
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, "max_seqlen_q", max_seqlen_q, device)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, "max_seqlen_k", max_seqlen_k, device)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]} entries")
    if seqused_k is not None:
        _check_seqused_k(seqused_k, cu_seqlens_k)
    if alibi_slopes is not None:
        alibi_slopes = _check_alibi(alibi_slopes, cu_seqlens_q.shape[0] - 1, "B", Hq, device,
                                    " (attention, with an (Lq, Lk) bias per head, gives learnable slopes their "
                                    "gradient)")
    if sinks is not None:
        sinks = _check_sinks(sinks, Hq, device)
    # The boundaries' values: checked here in eager mode; in a traced call the op checks them when
    # it runs (``checked`` False), since nothing can be read on the host at trace time. Meta and
    # fake tensors hold no values to read either (``no_data``): they take the traced path, shapes only.
    checked = not (compiling or no_data(q))
    trusted = checked and _checked_used_k is not None
    used_k = _checked_used_k if trusted else None  # the keys each sequence uses, once read and checked
    if paged:  # from here on the cache is seen as packed sequences of the table's rows
        _check_block_table(block_table, cu_seqlens_q.shape[0] - 1, device)
        if checked:
            if not trusted:
                used_k = check_block_table(block_table, k.shape[0], k.shape[1], cu_seqlens_k, seqused_k)
            # Only the table's first columns hold pages some sequence reads: a decoding step's
            # table is sized for the longest context, and the paths that gather the pages would
            # copy every column (64 x 2048 pages of 16 rows: ~1 GB per step, 0.7 s on the CPU).
            page_size = k.shape[1]
            # (at least one column: a kernel is never handed an empty table)
            needed = max(-(-max(used_k, default=0) // page_size) if page_size else 0, 1)
            if needed < block_table.shape[1]:
                block_table = block_table[:, :needed]
        cu_seqlens_k, seqused_k = paged_layout(block_table, k.shape[1], cu_seqlens_k, seqused_k)
    if trusted:
        max_seqlen_q, max_seqlen_k = int(max_seqlen_q), max(used_k, default=0)
    elif checked:
        max_seqlen_q, max_seqlen_k = check_varlen_bounds(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q,
                                                         max_seqlen_k, seqused_k, used_k)
    else:  # traced, or no data: a missing max_seqlen is bounded by all the rows, which is all shapes need
        # (a traced SymInt kept: int() would specialise the graph to its length). A traced call's op
        # reads the lengths when it runs, for its checks, and launches for the longest it finds.
        max_seqlen_q = total_q if max_seqlen_q is None else as_int(max_seqlen_q)
        max_seqlen_k = (block_table.shape[1] * k.shape[1] if paged else total_k) if max_seqlen_k is None else \
            as_int(max_seqlen_k)
    if backend is not None:
        check_backend_name(backend)
    name = resolve_values("attention", VARLEN_OPTIONS, device, q.dtype, _attention_values(
        D, Dv, gqa, causal, window_size, dropout_p, softcap, alibi=alibi_slopes, varlen=True), backend, compiling)
    if paged and (_needs_grad(q, k, v) or not get_backend(name).paged_kv):
        # the backward (and a backend without a paged kernel) runs on the pages gathered in the
        # packed layout: the gradient of a shared page then sums over its sequences by itself
        k, v = gather_kv_pages(k, v, block_table)
        block_table = None
    # The band relative to each sequence's top-left corner; bottom_right shifts it per sequence.
    band_lo, band_hi = attention_band(0, 0, causal, window_size, "top_left")
    if compiling:
        q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k = _distinct(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, band_lo, band_hi,
            alignment == "bottom_right", dropout_p, scale, _draw_rng(dropout_p, generator, q), name, softcap, seqused_k,
            checked, alibi_slopes)
    want_lse = return_lse or sinks is not None
    if not compiling and _eager_inference(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, block_table):
        result = attention_varlen_inference(*args, block_table, return_lse=want_lse)
    else:
        if exporting():  # (the Function's forward: an exported program differentiates its ops; see ops)
            result = AttentionVarlenFunction.forward(*args, want_lse, block_table)  # (out, lse)
        else:
            result = AttentionVarlenFunction.apply(*args, want_lse, block_table)
        result = result if want_lse else result[0]
    return result if sinks is None else _with_sinks(result, sinks, return_lse, head_dim=0)


def _check_block_table(block_table, batch, device) -> None:
    if not isinstance(block_table, Tensor):
        raise TypeError(f"block_table must be a torch.Tensor or None, got {type(block_table).__name__}")
    _refuse_nested("block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must be int32 (page numbers, as FlashAttention's), got "
                        f"{_dtype_name(block_table.dtype)}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be 2-D (sequences, pages per sequence), got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have one row per sequence ({batch}), got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.device != device:
        raise ValueError(f"block_table is on {block_table.device} but q is on {device}")


def _check_seqused_k(seqused_k, cu_seqlens_k) -> None:
    if not isinstance(seqused_k, Tensor):
        raise TypeError(f"seqused_k must be a torch.Tensor or None, got {type(seqused_k).__name__}")
    _refuse_nested("seqused_k", seqused_k)
    if seqused_k.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seqused_k must be int32 or int64, got {_dtype_name(seqused_k.dtype)}")
    if seqused_k.shape != (cu_seqlens_k.shape[0] - 1,):
        raise ValueError(f"seqused_k must have one entry per sequence, shape ({cu_seqlens_k.shape[0] - 1},), got "
                         f"{tuple(seqused_k.shape)}")
    if seqused_k.device != cu_seqlens_k.device:
        raise ValueError(f"seqused_k is on {seqused_k.device} but cu_seqlens_k is on {cu_seqlens_k.device}")


def _check_cu_seqlens(name: str, cu: Tensor, max_name: str, max_seqlen, device, ref: str = "q") -> None:
    """The checks of one cumulative-lengths tensor and its max_seqlen that need no data (the rest:
    ``ops_common.check_varlen_bounds``); ``ref`` names the tensor whose device it must share."""
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    _refuse_nested(name, cu)
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {_dtype_name(cu.dtype)}")
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D with B + 1 >= 1 entries, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but {ref} is on {device}")
    if max_seqlen is not None:
        if type(max_seqlen) is not int and not is_int(max_seqlen):  # (a plain int first: the ABC test costs ~0.4 us)
            raise TypeError(f"{max_name} must be an int or None, got {max_seqlen!r}")
        if max_seqlen < 0:
            raise ValueError(f"{max_name} must be >= 0, got {max_seqlen}")
        # (the ops take an int64; a larger one failed inside them. A traced SymInt, a size, fits,
        # and comparing it would guard on it, which torch.export refuses for an unbounded Dim)
        if not isinstance(max_seqlen, torch.SymInt) and max_seqlen > _INT64_MAX:
            raise ValueError(f"{max_name} must be at most {_INT64_MAX} (an upper bound of the longest sequence, "
                             f"passed to the kernels as int64), got {_shown(max_seqlen)}")


# ---------------------------------------------------------------------------------------------
# attention against a KV cache (decoding)
# ---------------------------------------------------------------------------------------------

def attention_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                           v: Optional[Tensor] = None, *, cache_seqlens, cache_batch_idx: Optional[Tensor] = None,
                           cache_leftpad: Optional[Tensor] = None, block_table: Optional[Tensor] = None,
                           rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                           rotary_interleaved: bool = False,
                           causal: bool = False, window_size: Optional[tuple[int, int]] = None,
                           scale: Optional[float] = None, softcap: Optional[float] = None,
                           alibi_slopes: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
                           return_lse: bool = False, backend: Optional[str] = None):
    """Decoding against a KV cache (FlashAttention's ``flash_attn_with_kvcache``): append the new
    keys and values to the cache **in place**, then attend the queries to each sequence's cached
    keys, the new ones included. Layout (batch, seqlen, heads, dim), as FlashAttention's.

    This is the one call of the library that modifies an input: with ``k`` and ``v`` given, rows
    ``cache_seqlens[b] .. cache_seqlens[b] + Lnew - 1`` of sequence b's cache are overwritten with
    ``k[b]`` and ``v[b]``, and nothing else of the cache changes. ``cache_seqlens`` itself is not
    advanced (the caller adds Lnew, as with FlashAttention). Without ``k`` and ``v`` the cache is
    only read. Aliasing changes no answer: ``k``, ``v`` or ``q`` sharing the cache's memory (a view
    of its rows) are read as they were before the write (copied first, the new tokens only); a
    ``k_cache`` and ``v_cache`` sharing memory (one tensor passed twice, overlapping views; not the
    distinct halves of a packed buffer) raise ``ValueError`` with new ``k`` and ``v``, as the
    values would land on the keys, and are taken by a read-only call. Checked in eager calls only.

    Args:
        q: (B, Lq, Hq, D) queries: Lq = 1 for plain decoding, Lq > 1 for a chunk (speculative
            decoding, chunked prefill). ``Hq`` must be a multiple of the cache's ``Hkv``.
        k_cache, v_cache: a dense cache (B_cache, Lmax, Hkv, D) / (B_cache, Lmax, Hkv, Dv), or, with
            ``block_table``, a paged one (num_pages, page_size, Hkv, D) / (..., Dv) whose sequence b's
            key j is row ``j % page_size`` of page ``block_table[b, j // page_size]``.
        k, v: (B, Lnew, Hkv, D) / (B, Lnew, Hkv, Dv) new keys and values, or None (both or neither).
        cache_seqlens: the keys already in each sequence's cache: an int32/int64 (B,) tensor on q's
            device, or a Python int for all of them. Sequence b attends its first
            ``cache_seqlens[b] + Lnew`` keys; ``cache_seqlens[b] + Lnew`` must fit the cache (Lmax,
            or the ``pages_per_seq * page_size`` rows of its table row).
        cache_batch_idx: int32/int64 (B,) or None (dense cache only, as FlashAttention's): batch row
            b uses cache row ``cache_batch_idx[b]`` (None: row b, and then ``B_cache == B``). With
            new k and v the indices must be distinct. The Triton forward reads the picked rows in
            place (as a paged cache with a page per cache row); the other backends gather the rows
            some sequence reads first (B × (max(cache_seqlens) + Lnew) rows; under torch.compile,
            where the lengths are not read, B × Lmax).
        cache_leftpad: int32/int64 (B,) or None (dense cache only, as FlashAttention's): sequence
            b's keys start at row ``cache_leftpad[b]`` of its cache row (a left-padded batch of
            prompts written as is): it attends rows ``cache_leftpad[b] .. cache_seqlens[b] + Lnew -
            1``, so ``cache_seqlens[b]`` still counts the padding (the new keys are written at row
            ``cache_seqlens[b]``) and ``0 <= cache_leftpad[b] <= cache_seqlens[b] + Lnew``: the
            padding may arrive with the new keys (a left-padded prefill of an empty cache, whose
            padded queries then see no key and give zeros; FlashAttention asks for
            ``cache_leftpad <= cache_seqlens``). Causal, window and ALiBi place the queries on the
            keys used; rotary positions stay the cache rows, ``cache_seqlens[b] + i``, as
            FlashAttention's (RoPE sees only differences).
        block_table: int32 (B, pages_per_seq) or None: a paged cache (FlashAttention's / vLLM's).
            The new keys of two sequences must not land on the same page rows.
        rotary_cos, rotary_sin: (S, R/2) tables, or None: rotary position embedding applied here,
            as FlashAttention's (``apply_rotary_emb``'s tables and ``rotary_interleaved`` pairs):
            the new keys are turned to their positions ``cache_seqlens[b] + i`` before they are
            written (the cache holds rotated keys); the queries too, to ``cache_seqlens[b] + i``
            when ``causal`` or with a window, else all to ``cache_seqlens[b]``. Only with new k
            and v; every position must be below S.
        causal, window_size: FlashAttention's, bottom-right aligned: query i sits at key position
            ``i + Lk_b - Lq`` (Lk_b = cache_seqlens[b] + Lnew), so the last query faces the last
            key; a window (left, right) keeps keys within ``left`` before and ``right`` after it,
            after FlashAttention's rules on the cache's capacity C (rows, or pages per table row
            times page size): a side >= C is unbounded (-1), then an unbounded side is C when the
            other is bounded (so (2, -1) is (2, C): with Lq > C + 1 it hides keys from the first
            queries). Queries that see no key (Lq > Lk_b with causal) return zeros.
        scale, softcap, alibi_slopes ((Hq,) or (B, Hq), placed bottom-right), sinks, backend: as in
            ``attention``.
        return_lse: also return the (B, Hq, Lq) log-sum-exp, float32 (float64 for float64 inputs)
            (FlashAttention's ``return_softmax_lse``); +inf on rows that see no key.

    Returns (B, Lq, Hq, Dv), or (out, lse) with ``return_lse``.

    An inference call, as FlashAttention's (which has no backward): it refuses, with a
    ``ValueError``, q, caches, k, v or sinks that require grad while grad mode is on (run it under
    ``torch.no_grad()`` / ``torch.inference_mode()``; ``attention_varlen`` with ``seqused_k`` or
    ``block_table`` trains on a cache). It runs as ``attention_varlen`` with ``seqused_k`` (and
    ``block_table``), on q viewed as packed rows and a dense cache viewed as B packed slots of
    Lmax rows (no copy when ``k_cache.flatten(0, 1)`` is a view, as for a contiguous cache).

    Every input is checked before the cache is written, so a refused call changes nothing. Outside
    torch.compile that includes the values of ``cache_seqlens``, ``cache_batch_idx`` and
    ``block_table`` (one small device-to-host copy, the only one of the call: ``attention_varlen``
    is handed the checked lengths and reads nothing again). Under torch.compile (and on meta or fake
    tensors, which have no values) nothing is read on the host: the cache bounds are asserted on
    the device (``torch._assert_async``: a bad call raises when it runs, on a GPU as a device-side
    assert), and duplicate write targets are not detected.
    """
    if (isinstance(q, Tensor) and isinstance(k_cache, Tensor) and k_cache.is_floating_point()
            and _autocast_enabled(q.device.type)):
        # Under autocast the cache is storage in its own dtype: the new keys, values and queries
        # are cast to it (not the cache to autocast's dtype, which would copy it every step), and
        # the call runs in that dtype.
        q, k, v = (t.to(k_cache.dtype) if isinstance(t, Tensor) and t.is_floating_point() else t for t in (q, k, v))
        with torch.autocast(q.device.type, enabled=False):
            return attention_with_kvcache(
                q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
                cache_leftpad=cache_leftpad, block_table=block_table, rotary_cos=rotary_cos, rotary_sin=rotary_sin,
                rotary_interleaved=rotary_interleaved, causal=causal, window_size=window_size, scale=scale,
                softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse, backend=backend)
    paged = block_table is not None
    _check_tensor("q", q, ndim=4, nested=NESTED_KVCACHE)
    _check_tensor("k_cache", k_cache, ndim=4, nested=NESTED_KVCACHE)
    _check_tensor("v_cache", v_cache, ndim=4, nested=NESTED_KVCACHE)
    _check_same("q", q, {"k_cache": k_cache, "v_cache": v_cache})
    _refuse_dtensor("attention_with_kvcache", q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)
    if (k is None) != (v is None):
        given, missing = ("k", "v") if v is None else ("v", "k")
        raise ValueError(f"{given} was given without {missing}: pass the new keys and values together, or neither")
    if k is not None:
        _check_tensor("k", k, ndim=4, nested=NESTED_KVCACHE)
        _check_tensor("v", v, ndim=4, nested=NESTED_KVCACHE)
        _check_same("q", q, {"k": k, "v": v})
    compiling = torch.compiler.is_compiling()
    if not compiling and torch._C._get_tracing_state() is not None:
        # An eager call reads cache_seqlens on the host (to check them, and to size the attention):
        # a torch.jit.trace would hold the lengths of the trace's inputs as constants and be wrong
        # at every other cache length (and its own check_trace fails, the cache having grown).
        raise RuntimeError("attention_with_kvcache (the modules' kv_cache decoding) cannot be traced with "
                           "torch.jit.trace: the lengths in cache_seqlens are read on the host, and the trace "
                           "would keep those of its example inputs, wrong at any other cache length. Use "
                           "torch.export or torch.compile, whose graphs keep cache_seqlens a tensor (checked "
                           "when the graph runs).")
    # Nothing is read on the host under torch.compile, nor from meta or fake tensors (shapes without
    # data: memory estimates, deferred init), which take the compiled path: the device asserts are
    # no-ops on them, and so is the cache write.
    no_read = compiling or no_data(q)
    B, Lq, Hq, D = q.shape
    slots, rows, Hkv, k_dim = k_cache.shape  # slots: cache rows or pages; rows: Lmax or the page size
    Dv = v_cache.shape[-1]
    if v_cache.shape[:3] != k_cache.shape[:3]:
        what = "pages, page size and heads" if paged else "cache rows, length and heads"
        raise ValueError(f"k_cache and v_cache must have the same {what}, got k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    if k_dim != D:
        raise ValueError(f"q and k_cache must have the same head dim, got q {tuple(q.shape)}, "
                         f"k_cache {tuple(k_cache.shape)}")
    if (Hkv == 0 and Hq != 0) or (Hkv != 0 and Hq % Hkv != 0):
        raise ValueError(f"the query heads (q.shape[2] = {Hq}) must be a multiple of the key/value heads "
                         f"(k_cache.shape[2] = {Hkv})")
    new = 0  # Lnew
    if k is not None:
        new = k.shape[1]
        if k.shape[0] != B or k.shape[2:] != (Hkv, D):
            raise ValueError(f"k must have shape (B, Lnew, Hkv, D) = ({B}, Lnew, {Hkv}, {D}) to match q and k_cache, "
                             f"got {tuple(k.shape)}")
        if v.shape != (B, new, Hkv, Dv):
            raise ValueError(f"v must have shape (B, Lnew, Hkv, Dv) = ({B}, {new}, {Hkv}, {Dv}) to match k and "
                             f"v_cache, got {tuple(v.shape)}")
    device = q.device
    if paged:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be combined with block_table (nor can it in FlashAttention): "
                             "a paged cache finds each sequence's pages through its block_table row")
        if cache_leftpad is not None:
            raise ValueError("cache_leftpad cannot be combined with block_table (nor can it in FlashAttention): a "
                             "paged sequence starts at its first page; leave the padding out of its block_table row")
        _check_block_table(block_table, B, device)
        if rows == 0:
            raise ValueError(f"the pages of k_cache must hold at least one row, got shape {tuple(k_cache.shape)}")
        capacity = block_table.shape[1] * rows
    else:
        if cache_batch_idx is not None:
            _check_index_tensor("cache_batch_idx", cache_batch_idx, B, device)
        elif slots != B:
            raise ValueError(f"k_cache has {slots} cache rows (k_cache.shape[0]) but q has batch {B}: without "
                             f"cache_batch_idx they must match (cache_batch_idx picks a cache row for each batch row)")
        capacity = rows
        if cache_leftpad is not None:
            _check_index_tensor("cache_leftpad", cache_leftpad, B, device)
    cache_seqlens = _check_cache_seqlens(cache_seqlens, B, device)
    gqa = Hq != Hkv
    if compiling:  # they choose the backend (and D the default scale)
        D, Dv, gqa = _concrete(D), _concrete(Dv), _concrete(gqa)
    window_size, _, scale, softcap = _check_attention_options(Hq, Hkv, D, causal, window_size, "bottom_right", 0.0,
                                                              scale, softcap, return_lse, compiling)
    if window_size is not None:
        # FlashAttention's rules (mha_fwd_kvcache, then set_params_fprop), seqlen_k being the cache's capacity:
        # a side at least the capacity bounds nothing and is unbounded (-1). It matters beyond the mask: only
        # a call still local after this steps the queries' RoPE positions (query i at cache_seqlens + i), so
        # (-1, 1000) must rotate as None does. Then an unbounded side facing a bounded one is bounded by the
        # capacity: (2, -1) is (2, capacity), whose right side hides keys from the first Lq - capacity - 1
        # queries (more queries than the cache holds). The same rule on the left is not applied: a left side
        # of the capacity bounds nothing, as -1 does. With a symbolic capacity or Lq (torch.export), bounding
        # by the capacity would make a symbolic window, which attention refuses: the rule changes nothing
        # where Lq <= capacity + 1 (guarded on, as the example inputs have it) and is refused otherwise.
        left, right = (-1 if side >= capacity else side for side in window_size)
        if right == -1 and left >= 0:
            if not isinstance(capacity, torch.SymInt) and not isinstance(Lq, torch.SymInt):
                right = capacity
            elif not known_true(Lq <= capacity + 1):
                raise ValueError(f"window_size={tuple(window_size)!r} with a symbolic cache capacity ({capacity}) "
                                 f"and {Lq} queries: FlashAttention bounds the right side by the capacity, which "
                                 f"hides keys when there are more than capacity + 1 queries, as in the example "
                                 f"inputs, and a traced program cannot follow it. Trace with at most capacity + 1 "
                                 f"queries, a bounded right side, or no window")
        window_size = None if (left, right) == (-1, -1) else (left, right)
    _check_alibi(alibi_slopes, B, "B", Hq, device)
    _check_sinks(sinks, Hq, device)
    # (checked with or without the tables: a bad flag was noticed only once tables were passed)
    _check_bool("rotary_interleaved", rotary_interleaved)
    rotary_backend = None
    if rotary_cos is not None or rotary_sin is not None:
        rotary_backend = _check_kvcache_rotary(rotary_cos, rotary_sin, q, k, backend)
    if grad_recording():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v), ("sinks", sinks)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad, but attention_with_kvcache is an inference call (as "
                                 f"FlashAttention's flash_attn_with_kvcache): call it under torch.no_grad() or "
                                 f"torch.inference_mode(), or train with attention_varlen (seqused_k / block_table)")
    check_backend_name(backend)
    # resolved here so that a backend that cannot take the call raises before the cache is written
    backend = resolve_options("attention", device, q.dtype, _attention_options(
        D, Dv, gqa, causal, window_size, 0.0, softcap, alibi=alibi_slopes, varlen=True), backend)
    lengths = pads = None
    if not no_read:
        lengths, pads = _check_kvcache_values(cache_seqlens, cache_batch_idx, block_table, new, capacity, slots, rows,
                                              cache_leftpad)
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            if new and cache.is_inference() and not torch.is_inference_mode_enabled():
                # torch refuses the write (an in-place update of an inference tensor outside
                # inference mode), but only at the v_cache's write, after k_cache's: refused here,
                # with torch's message, before either is written
                from .rotary import INFERENCE_INPLACE_ERROR
                raise RuntimeError(f"{name}: {INFERENCE_INPLACE_ERROR}")
            if new and elements_may_overlap(cache):  # one row written would change others
                raise ValueError(f"{name} has overlapping elements (strides {tuple(cache.stride())}, e.g. an "
                                 f"expanded tensor), but the new keys and values are written into it in place: "
                                 f"pass a cache with memory of its own (.contiguous() or .clone())")
        if new and tensors_may_share_memory(k_cache, v_cache):
            # the values would be written over the keys (or the keys over the values): FlashAttention
            # takes two caches too. A read-only call (no k and v) may pass one buffer twice.
            raise ValueError(f"k_cache and v_cache share memory (k_cache shape {tuple(k_cache.shape)} strides "
                             f"{tuple(k_cache.stride())}, v_cache shape {tuple(v_cache.shape)} strides "
                             f"{tuple(v_cache.stride())}, {v_cache.data_ptr() - k_cache.data_ptr()} bytes apart), but "
                             f"the new k and v are written into them in place: pass caches of distinct memory, or "
                             f"write the cache yourself and call without k and v")
    if rotary_backend is not None:  # RoPE on the new keys (before they are written) and the queries
        q, k = _rotate_kvcache(q, k, cache_seqlens, lengths, rotary_cos, rotary_sin, rotary_interleaved,
                               causal or window_size is not None, rotary_backend, compiling)
    if new:
        if not no_read:
            # New keys, values or queries that are views of the cache's memory (rows copied ahead,
            # a buffer reused) must be read as they were before the write: index_put_ reads its
            # source while it writes (and sees the overlap only of contiguous views), and the
            # attention reads q after it. A copy of the new tokens makes the call the one on
            # distinct tensors; the test costs a few pointer comparisons.
            q, k, v = (t.clone() if tensors_may_share_memory(t, k_cache) or tensors_may_share_memory(t, v_cache)
                       else t for t in (q, k, v))
        _write_kvcache(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, capacity, slots, rows,
                       no_read)
    elif no_read:
        _assert_kvcache_values(cache_seqlens, cache_batch_idx, 0, capacity, slots)
    if no_read and cache_leftpad is not None:
        torch._assert_async(((cache_leftpad >= 0) & (cache_leftpad <= cache_seqlens + new)).all(),
                            "attention_with_kvcache: cache_leftpad must be >= 0 and <= cache_seqlens + Lnew")
    # The attention: attention_varlen on q as B packed sequences of Lq rows, each using its first
    # cache_seqlens[b] + Lnew keys. A dense cache is B packed slots of Lmax rows (viewed, not
    # copied); with cache_batch_idx it is read as a paged cache with one page per cache row.
    host_boundaries = pads is not None  # eager with cache_leftpad: built below from the values read
    cu_seqlens_q = None if host_boundaries else _equal_boundaries(B, Lq, device, compiling)
    keys, values = k_cache, v_cache
    if cache_batch_idx is not None and rows > 0:
        if get_backend(backend).paged_kv and cache_leftpad is None:  # (Triton) reads the picked rows in place
            block_table = cache_batch_idx.to(torch.int32).view(B, 1)
        else:  # the others would gather whole pages (B x Lmax rows): gather the rows some sequence reads
            capacity = capacity if lengths is None else max(lengths, default=0) + new
            index = cache_batch_idx.long()
            keys, values = k_cache[:, :capacity].index_select(0, index), v_cache[:, :capacity].index_select(0, index)
    elif block_table is None and lengths is not None and not (_flattens_to_rows(k_cache) and
                                                              _flattens_to_rows(v_cache)):
        # a cache whose (B, Lmax) rows are not one strided run (expanded over the batch, stored
        # (Lmax, B, ...)): flattening it below copies, so copy only the rows some sequence reads
        capacity = max(lengths, default=0) + new
        keys, values = k_cache[:, :capacity], v_cache[:, :capacity]
    cu_seqlens_k = None if host_boundaries else _equal_boundaries(B, capacity, device, compiling)
    if block_table is None:
        keys, values = keys.flatten(0, 1), values.flatten(0, 1)
    used_k = cache_seqlens + new if new else cache_seqlens
    checked_used_k = None if lengths is None else [n + new for n in lengths]
    if cache_leftpad is not None:
        if alibi_slopes is not None and alibi_slopes.dim() == 2:  # the leading empty sequence's row
            alibi_slopes = torch.cat([alibi_slopes[:1], alibi_slopes])
        if not host_boundaries:  # compiled: the boundaries built on the device
            cu_seqlens_q, cu_seqlens_k, used_k = _skip_left_padding(cu_seqlens_q, cu_seqlens_k, used_k, cache_leftpad)
        else:  # eager: from the values read already, in one host-to-device copy
            checked_used_k = [0] + [n - p for n, p in zip(checked_used_k, pads)]
            boundaries = torch.tensor([0] + [b * capacity + p for b, p in enumerate(pads)] + [B * capacity] +
                                      [0] + [b * Lq for b in range(B + 1)] + checked_used_k, dtype=torch.int32)
            boundaries = boundaries.to(device, non_blocking=True)
            cu_seqlens_k, cu_seqlens_q, used_k = boundaries[:B + 2], boundaries[B + 2:2 * B + 4], boundaries[2 * B + 4:]
    result = attention_varlen(q.reshape(B * Lq, Hq, q.shape[-1]), keys, values, cu_seqlens_q, cu_seqlens_k, Lq,
                              capacity if no_read else None, causal=causal, window_size=window_size,
                              alignment="bottom_right", scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                              sinks=sinks, return_lse=return_lse, seqused_k=used_k, block_table=block_table,
                              backend=backend, _checked_used_k=checked_used_k)
    out, lse = result if return_lse else (result, None)
    out = out.view(B, Lq, Hq, out.shape[-1])
    if not return_lse:
        return out
    return out, lse.view(Hq, B, Lq).transpose(0, 1).contiguous()


def _skip_left_padding(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, used_k: Tensor, leftpad: Tensor):
    """attention_with_kvcache's ``cache_leftpad`` as varlen boundaries: sequence b's keys start
    ``leftpad[b]`` rows into its slot and it uses ``used_k[b] - leftpad[b]`` of them. Boundaries
    must start at 0, so a leading empty sequence (no queries, no keys) takes up the first slot's
    padding: cu_seqlens_k becomes [0, leftpad[0], slot + leftpad[1], ..., B * slot], cu_seqlens_q
    [0, 0, Lq, ...], seqused_k [0, used_k - leftpad] (and (B, Hq) ALiBi slopes get a first row,
    done by the caller). Each sequence's room (its start to the next one's) still holds its keys,
    since leftpad[b+1] >= 0. (The eager call builds the same boundaries on the host.)"""
    leftpad = leftpad.to(cu_seqlens_k.dtype)
    zero = cu_seqlens_k[:1]
    cu_seqlens_k = torch.cat([zero, cu_seqlens_k[:-1] + leftpad, cu_seqlens_k[-1:]])
    cu_seqlens_q = torch.cat([cu_seqlens_q[:1], cu_seqlens_q])
    used_k = torch.cat([used_k[:0].new_zeros(1), used_k - leftpad.to(used_k.dtype)])
    return cu_seqlens_q, cu_seqlens_k, used_k


def _equal_boundaries(batch: int, length: int, device, compiling: bool) -> Tensor:
    """The int32 cu_seqlens [0, length, 2 length, ..., batch * length] of equal packed sequences, in
    one op outside torch.compile (a decoding step's host time is a few such ops)."""
    if compiling or length == 0:
        return torch.arange(batch + 1, device=device, dtype=torch.int32) * length
    return torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)


def _check_kvcache_rotary(cos, sin, q, k, backend) -> str:
    """The checks of attention_with_kvcache's rotary tables; returns the backend that rotates."""
    if cos is None or sin is None:
        given, missing = ("rotary_cos", "rotary_sin") if sin is None else ("rotary_sin", "rotary_cos")
        raise ValueError(f"{given} was given without {missing}: pass both tables, or neither")
    if k is None:
        raise ValueError("rotary_cos and rotary_sin turn the new keys (and the queries) to their positions: pass the "
                         "new k and v too (as FlashAttention, which applies them only then), or rotate q with "
                         "apply_rotary_emb")
    half = check_tables(cos, sin, q, names=("rotary_cos", "rotary_sin", "q"))
    return resolve_rotary(q, half, backend)


def _flattens_to_rows(cache: Tensor) -> bool:
    """Whether a dense cache's (B, Lmax) dims flatten into one dim as a view (no copy)."""
    return cache.shape[0] <= 1 or cache.shape[1] <= 1 or cache.stride(0) == cache.shape[1] * cache.stride(1)


def _rotate_kvcache(q, k, cache_seqlens, lengths, cos, sin, interleaved, query_steps: bool, backend, compiling):
    """FlashAttention's positions: new key i of sequence b at cache_seqlens[b] + i; query i there
    too when the attention is causal or local, else every query at cache_seqlens[b]. Checked
    against the tables' rows on the host (``lengths``, read already) or, compiled, on the device."""
    (B, Lq), new = q.shape[:2], k.shape[1]
    rows = cos.shape[0]
    start = cache_seqlens.long()[:, None]
    k_positions = start + torch.arange(new, device=q.device)
    q_positions = start + torch.arange(Lq, device=q.device) if query_steps else start.expand(B, Lq)
    if lengths is None:
        check_positions(k_positions, rows, "the new keys' positions", True)
        check_positions(q_positions, rows, "the queries' positions", True)
    elif lengths:
        last = max(lengths) + max(new, Lq if query_steps else 1) - 1
        if last >= rows:
            raise ValueError(f"rotary_cos and rotary_sin have {rows} rows, but cache_seqlens = {max(lengths)} puts a "
                             f"new key or query at position {last}")
    return (rotate(q, cos, sin, q_positions, interleaved, backend),
            rotate(k, cos, sin, k_positions, interleaved, backend))


def _check_index_tensor(name: str, t, batch: Optional[int], device, ref: str = "q") -> None:
    """An int32/int64 tensor on ``ref``'s device, of shape (batch,) unless batch is None."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    _refuse_nested(name, t)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {_dtype_name(t.dtype)}")
    if batch is not None and t.shape != (batch,):
        raise ValueError(f"{name} must have one entry per batch row, shape ({batch},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but {ref} is on {device}")


def _check_cache_seqlens(cache_seqlens, batch: int, device) -> Tensor:
    """cache_seqlens as a (B,) int tensor on q's device (a Python int: the same for every sequence)."""
    if is_int(cache_seqlens):  # (a traced SymInt too: a past length, past.shape[1])
        if cache_seqlens < 0:
            raise ValueError(f"cache_seqlens must be >= 0 (the keys already in each cache), got {cache_seqlens}")
        # (no cache holds as many; torch.full raised a RuntimeError converting it. A traced SymInt is
        # not compared: a guard on it, which torch.export refuses for an unbounded Dim)
        if not isinstance(cache_seqlens, torch.SymInt) and cache_seqlens > _INT32_MAX:
            raise ValueError(f"cache_seqlens must be at most {_INT32_MAX} (the lengths are int32, as "
                             f"FlashAttention's), got {_shown(cache_seqlens)}")
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens must be an int or an int32/int64 tensor of shape ({batch},), got "
                        f"{type(cache_seqlens).__name__}")
    _check_index_tensor("cache_seqlens", cache_seqlens, batch, device)
    return cache_seqlens


def _check_kvcache_values(cache_seqlens, cache_batch_idx, block_table, new: int, capacity: int, slots: int,
                          rows: int, cache_leftpad=None) -> tuple[list, Optional[list]]:
    """The data-dependent checks of ``attention_with_kvcache``, before anything is written (one
    device-to-host copy): 0 <= cache_seqlens[b] and cache_seqlens[b] + Lnew <= the cache's room;
    cache_batch_idx within the cache rows (and distinct when written to); the pages a sequence uses
    exist, and no two sequences write the same page rows. The pages are checked on the device (a
    flag per sequence), and only the table entries the new keys land on are copied, not the table.
    0 <= cache_leftpad[b] <= cache_seqlens[b] + Lnew. Returns cache_seqlens and cache_leftpad (or None)
    as lists."""
    batch = cache_seqlens.shape[0]
    if cache_batch_idx is None and block_table is None and cache_leftpad is None:  # one copy, no conversion
        return _check_lengths(cache_seqlens.tolist(), new, capacity, block_table, rows), None
    lengths_dev = cache_seqlens.long()
    parts = [lengths_dev]
    if cache_leftpad is not None:
        parts.append(cache_leftpad.long())
    if cache_batch_idx is not None:
        parts.append(cache_batch_idx.long())
    per_seq = 0 if block_table is None else block_table.shape[1]
    spread = -(-new // rows) + 1 if rows else 0  # the most table entries one sequence's new keys reach
    if block_table is not None:
        parts.append(pages_out_of_range(block_table, lengths_dev + new, rows, slots).long())
        if new and per_seq:
            entries = (lengths_dev.clamp(0, capacity) // rows)[:, None] + torch.arange(spread, device=block_table.device)
            parts.append(block_table.long().gather(1, entries.clamp(max=per_seq - 1)).flatten())
    values = torch.cat(parts).tolist()
    lengths, rest = _check_lengths(values[:batch], new, capacity, block_table, rows), values[batch:]
    pads = None
    if cache_leftpad is not None:
        pads, rest = _check_leftpad(rest[:batch], lengths, new), rest[batch:]
    if cache_batch_idx is not None:
        owner = {}
        for b, i in enumerate(rest[:batch]):
            if not 0 <= i < slots:
                raise ValueError(f"cache_batch_idx[{b}] = {i} is outside the {slots} cache rows of k_cache "
                                 f"(k_cache.shape[0])")
            if new and i in owner:
                raise ValueError(f"cache_batch_idx[{owner[i]}] and cache_batch_idx[{b}] both name cache row {i}: with "
                                 f"new k and v each batch row must write its own cache row")
            owner[i] = b
    if block_table is not None:
        bad_rows, landing = rest[:batch], rest[batch:]
        for b, n in enumerate(lengths):
            if bad_rows[b]:
                page, entries = first_page_out_of_range(block_table, b, n + new, rows, slots)
                raise ValueError(f"block_table[{b}] names page {page}, outside the {slots} pages of k_cache "
                                 f"(sequence {b} uses its first {entries} entries for {n + new} keys)")
        written = []  # (page, first row, end row, sequence) of the new keys
        for b, n in enumerate(lengths):
            first = n // rows
            for j in range(first, -(-(n + new) // rows) if new else first):
                page = landing[b * spread + j - first]
                written.append((page, max(n - j * rows, 0), min(n + new - j * rows, rows), b))
        written.sort()
        for (page, _, end, b), (next_page, start, next_end, c) in zip(written, written[1:]):
            if page == next_page and start < end:  # sorted by first row: an overlap shows between neighbours
                raise ValueError(f"block_table rows {b} and {c} both place new keys on rows {start}.."
                                 f"{min(end, next_end) - 1} of page {page}: the new keys of two sequences cannot "
                                 f"share cache rows")
    return lengths, pads


def _check_leftpad(pads: list, lengths: list, new: int) -> list:
    """0 <= cache_leftpad[b] <= cache_seqlens[b] + Lnew; returns the padding."""
    for b, (p, n) in enumerate(zip(pads, lengths)):
        if not 0 <= p <= n + new:
            plus = f" + Lnew = {n + new}" if new else f" = {n}"
            raise ValueError(f"cache_leftpad[{b}] = {p} must be >= 0 and <= cache_seqlens[{b}]{plus}: the padding "
                             f"rows come before the sequence's keys")
    return pads


def _check_lengths(lengths: list, new: int, capacity: int, block_table, rows: int) -> list:
    """0 <= cache_seqlens[b] and cache_seqlens[b] + Lnew <= the cache's room; returns the lengths."""
    for b, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"cache_seqlens[{b}] = {n} is negative: it counts the keys already in sequence {b}'s "
                             f"cache")
        if n + new > capacity:
            plus = f" plus the {new} new keys of k" if new else ""
            room = (f"keys its block_table row addresses ({block_table.shape[1]} pages of {rows} rows)"
                    if block_table is not None else "rows of a cache row (k_cache.shape[1])")
            raise ValueError(f"cache_seqlens[{b}] = {n}{plus} makes {n + new} keys, more than the {capacity} {room}")
    return lengths


def _assert_kvcache_values(cache_seqlens, cache_batch_idx, new, capacity: int, slots: int) -> None:
    """Under torch.compile, where nothing is read on the host: the bounds of the cache write,
    asserted on the device (a bad call raises when it runs)."""
    ok = ((cache_seqlens >= 0) & (cache_seqlens + new <= capacity)).all()
    if cache_batch_idx is not None:
        ok = ok & ((cache_batch_idx >= 0) & (cache_batch_idx < slots)).all()
    torch._assert_async(ok, "attention_with_kvcache: cache_seqlens must be >= 0, cache_seqlens + k.shape[1] must fit "
                            "the cache, and cache_batch_idx must name cache rows of k_cache")


def _write_kvcache(k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, block_table, capacity: int, slots: int,
                   rows: int, no_read: bool) -> None:
    """Sequence b's new key i goes to its position cache_seqlens[b] + i: row that of cache row b
    (or cache_batch_idx[b]), or row position % page_size of page block_table[b, position // page_size].
    ``no_read``: the bounds were not read on the host (torch.compile, meta or fake tensors): they are
    asserted on the device."""
    batch, new = k.shape[:2]
    position = cache_seqlens.long()[:, None] + torch.arange(new, device=k.device)  # (B, Lnew)
    if no_read:
        _assert_kvcache_values(cache_seqlens, cache_batch_idx, new, capacity, slots)
    if block_table is not None:
        pages = block_table.long().gather(1, (position // rows).clamp(0, block_table.shape[1] - 1))
        if no_read:
            torch._assert_async(((pages >= 0) & (pages < slots)).all(),
                                "attention_with_kvcache: block_table names a page outside k_cache for the new keys")
        index = (pages, position % rows)
    else:
        row = torch.arange(batch, device=k.device) if cache_batch_idx is None else cache_batch_idx.long()
        index = (row[:, None], position)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


def merge_attention(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Attention over the union of several key sets, from attention over each set: the outputs of
    one query set against disjoint parts of the keys (split keys, ring / context parallelism,
    a cache read in chunks) and their ``return_lse`` log-sum-exps, merged as the softmax over all
    the keys would have weighted them::

        lse = log(sum_i exp(lse_i)),  out = sum_i exp(lse_i - lse) * out_i

    Args:
        outs: n >= 1 tensors of one shape (..., Dv), e.g. ``attention``'s (B, Hq, Lq, Dv).
        lses: n float tensors of shape (...) (each out's shape without Dv), e.g. ``attention``'s
            (B, Hq, Lq); for ``attention_varlen``'s (Hq, total_q) pass ``lse.t()``. A row's lse
            of +inf (this library's "saw no key") or -inf adds nothing.

    Returns (out in the outs' dtype, lse float32 (float64 for float64 outs or lses)), +inf on rows no
    part saw a key for (their out is 0). Plain differentiable torch ops: with the
    differentiable lse of ``attention``, a merge trains (its gradients reach every part's q, k,
    v), and it traces under torch.compile."""
    if isinstance(outs, Tensor) or isinstance(lses, Tensor) or not (isinstance(outs, Sequence)
                                                                    and isinstance(lses, Sequence)):
        raise TypeError(f"outs and lses must be sequences (lists or tuples) of tensors, one per key part, got "
                        f"{type(outs).__name__} and {type(lses).__name__}")
    outs, lses = list(outs), list(lses)
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of one length, got {len(outs)} and {len(lses)}")
    for i, (out, lse) in enumerate(zip(outs, lses)):
        _check_tensor(f"outs[{i}]", out, min_ndim=1, nested=NESTED_MERGE)
        if not isinstance(lse, Tensor) or not lse.is_floating_point():
            raise TypeError(f"lses[{i}] must be a floating-point tensor, got "
                            f"{lse.dtype if isinstance(lse, Tensor) else type(lse).__name__}")
        if lse.is_nested:
            raise _nested_error(f"lses[{i}]", lse, NESTED_MERGE)
        if out.shape != outs[0].shape or out.dtype != outs[0].dtype or out.device != outs[0].device:
            # (a dtype apart is a TypeError, as everywhere in the API; a shape or device a ValueError)
            error = TypeError if out.shape == outs[0].shape and out.device == outs[0].device else ValueError
            raise error(f"outs[{i}] must match outs[0] (shape {tuple(outs[0].shape)}, {outs[0].dtype}, "
                        f"{outs[0].device}), got {tuple(out.shape)}, {out.dtype}, {out.device}")
        if lse.shape != out.shape[:-1] or lse.device != out.device:
            raise ValueError(f"lses[{i}] must have outs[{i}]'s shape without its last dim, {tuple(out.shape[:-1])}, "
                             f"on its device, got {tuple(lse.shape)} on {lse.device} (attention_varlen's lse: "
                             f"pass lse.t())")
    wide = torch.float64 if any(t.dtype == torch.float64 for t in lses + outs[:1]) else torch.float32
    parts = torch.stack([lse.to(wide) for lse in lses])  # (n, ...)
    empty = torch.isinf(parts)  # +inf (no key here) or -inf: contributes nothing
    none_seen = empty.all(dim=0)
    # logsumexp over the parts that saw keys; rows where none did are given zeros first, so that
    # neither the value nor the gradient becomes NaN (exp(-inf - -inf))
    safe = torch.where(empty, torch.where(none_seen, 0.0, float("-inf")), parts)
    # The weights exp(lse_i - total) are formed as exp(lse_i - max) / sum: with lses so large that
    # log(sum) is below their rounding step (rows every key of which a -1e30 mask hides), exp(lse_i
    # - total) would be 1 for every part rather than 1/n. The max is a constant to autograd (the
    # weights and the total do not depend on it).
    top = safe.amax(dim=0).detach()
    scaled = torch.exp(safe - top)  # (exp(-inf) = 0 for the empty parts)
    norm = scaled.sum(dim=0)
    total = top + torch.log(norm)
    weights = torch.where(empty, 0.0, scaled / norm)
    out = sum(w[..., None] * o.to(wide) for w, o in zip(weights, outs))
    lse = torch.where(none_seen, float("inf"), total)
    return out.to(outs[0].dtype), lse


def _broadcast_dims(a: Sequence[int], b: Sequence[int]) -> Optional[tuple]:
    """``torch.broadcast_shapes(a, b)``, or None where they do not broadcast (torch's takes ~50 us
    in eager mode, several times the SDPA wrapper's own cost)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _qkv_shapes(query: Tensor, key: Tensor, value: Tensor) -> str:
    """The three shapes as SDPA's errors quote them (formed only when one is raised)."""
    return f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False, *, backend: Optional[str] = None) -> Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``'s signature and meaning on fused_attn's
    kernels, for code that calls SDPA (see also ``fused_attn.patch_sdpa``).

    query (..., L, E), key (..., S, E), value (..., S, Ev), each of at least 2 dims: as in torch,
    every dim before the last two is a batch dim, and those of query, key and value broadcast
    against each other, the fewer dims left-padded with 1s (a 2-D key with a 4-D query is one key
    set for every batch and head; a broadcast one gets the gradient summed over the copies, as in
    torch), read through expanded views. With ``enable_gqa=True`` dim -3 of each is its heads
    (all three need one, as in torch), and key's and value's heads, where they differ from query's,
    must divide query's: query head h reads their head ``h // (Hq // Hkv)`` (torch's
    ``repeat_interleave``), the kernels' grouped-query attention; without it the heads are a batch
    dim like the others (equal, or 1). ``attn_mask`` broadcasts against the attention weights
    (..., L, S), query's and key's batch dims broadcast, from the right, without enlarging them (as
    torch adds it to them in place), and a float mask of another dtype than query's is cast to it.
    ``attn_mask`` with ``is_causal=True`` is refused, as torch's math kernel does. A row whose keys
    are all masked gives zeros (torch gives NaN or zeros, depending on its version and kernel).

    Nested tensors (torch's jagged (B, H, j, E) ones, which torch's SDPA takes) go to torch's
    function, whatever ``backend``: the kernels take dense tensors (``attention_varlen`` takes the
    packed tokens of such a batch).
    """
    if any_nested(query, key, value, attn_mask):
        check_backend_name(backend)
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    for name, t in (("query", query), ("key", key), ("value", value)):
        _check_tensor(name, t, min_ndim=2)
    _check_bool("is_causal", is_causal)
    _check_bool("enable_gqa", enable_gqa)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask must be None when is_causal=True (as in torch's scaled_dot_product_attention)")
    if torch.compiler.is_compiling():
        dropout_p = _concrete(dropout_p)
    if not isinstance(dropout_p, bool) and isinstance(dropout_p, numbers.Real) and not 0 <= dropout_p < 1:
        if dropout_p != 1:
            raise ValueError(f"dropout_p must be in [0, 1], got {_shown(dropout_p)}")
        # torch takes p = 1 (its dropout zeroes every weight: zeros, NaN where the attention is NaN,
        # and zero gradients); the kernels' counter-based dropout takes p < 1 (it scales by 1 / (1 - p))
        return scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa,
                                            backend=backend) * 0.0
    # The shapes are checked here, in SDPA's terms (the names query, key, value and the caller's
    # shapes), before the call is reshaped to attention's 4-D one, whose errors say q, k, v.
    _check_same("query", query, {"key": key, "value": value})
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"query and key must have the same embedding dim E (their last dim), got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    if query.shape[-1] == 0:
        raise ValueError(f"query and key must have an embedding dim E (their last dim) of at least 1, got query "
                         f"{tuple(query.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"key and value must have the same sequence length S (dim -2), got key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    grouped = False  # key's or value's heads repeated to query's (enable_gqa, and they differ)
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:  # (torch: an IndexError reading dim -3)
            raise ValueError(f"enable_gqa=True needs query, key and value of at least 3 dims (dim -3 is the heads), "
                             f"got {_qkv_shapes(query, key, value)}")
        Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
        grouped = not Hq == Hk == Hv
        if grouped and any((h == 0 and Hq != 0) or (h != 0 and Hq % h != 0) for h in (Hk, Hv)):
            raise ValueError(f"query's heads (dim -3, {Hq}) must be a multiple of key's and value's "
                             f"({Hk if Hk == Hv else f'{Hk} and {Hv}'}), got {_qkv_shapes(query, key, value)}")
    # The batch dims as torch broadcasts them: key's and value's heads count as query's when they
    # are repeated to them; the attention weights (..., L, S) broadcast query's and key's (the mask
    # must fit them), the output those and value's.
    q_dims = query.shape[:-2]
    k_dims, v_dims = ((*t.shape[:-3], q_dims[-1]) if grouped else t.shape[:-2] for t in (key, value))
    weights_dims = _broadcast_dims(q_dims, k_dims)
    batch = None if weights_dims is None else _broadcast_dims(weights_dims, v_dims)
    if batch is None:
        hint = ""
        if not enable_gqa and min(query.dim(), key.dim()) >= 3 and key.shape[-3] not in (0, 1, query.shape[-3]) \
                and query.shape[-3] % key.shape[-3] == 0:
            hint = (f" (query has {query.shape[-3]} heads and key {key.shape[-3]}: pass enable_gqa=True for "
                    f"grouped-query attention, as torch's scaled_dot_product_attention requires)")
        raise ValueError(f"the batch dims (all but the last two) of query, key and value must broadcast, got "
                         f"{_qkv_shapes(query, key, value)}{hint}") from None
    # To attention's 4-D (B, H, L, E) call: the last batch dim is the heads (a 1 put before the
    # batch dims of a 2-D call), the others flattened into B. Key and value keep heads that divide
    # H (the kernels' grouped-query attention reads them without a copy): their own count under
    # grouping (both brought to the least common multiple when they differ), else 1 or H.
    full = (1,) * max(0, 2 - len(batch)) + tuple(batch)
    H, outer = full[-1], full[:-1]
    if grouped:
        Hk, Hv = key.shape[-3], value.shape[-3]
        kv_heads = Hk if Hk == Hv else math.lcm(Hk, Hv)
    else:
        kv_heads = 1 if all(t.dim() < 3 or t.shape[-3] == 1 for t in (key, value)) else H

    def to_4d(t, heads):
        t = t[(None,) * (len(full) + 2 - t.dim())]  # left-padded to (*outer, h, L, E)
        if t.shape[-3] != heads:  # 1 -> heads (a stride-0 view), or h -> heads, each repeated
            r = heads // t.shape[-3]
            t = t.unsqueeze(-3).expand(*t.shape[:-2], r, *t.shape[-2:]).flatten(-4, -3)
        if t.shape[:-3] != outer:
            t = t.expand(*outer, *t.shape[-3:])
        if len(outer) == 1:
            return t
        n = math.prod(outer)  # (explicit: a reshape(-1, ...) of an empty tensor is ambiguous)
        return t.reshape(n, *t.shape[-3:])  # (a view unless broadcast dims must be merged)

    four_d = (query.dim() == key.dim() == 4 and key.shape[:-1] == value.shape[:-1]
              and query.shape[0] == key.shape[0] and query.shape[1] == H and key.shape[1] == kv_heads)
    if four_d:  # attention's own layout: nothing to lift or flatten (~10 us of views and shapes saved)
        q, k, v = query, key, value
    else:
        q, k, v = to_4d(query, H), to_4d(key, kv_heads), to_4d(value, kv_heads)
    mask = attn_mask
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = attend) or floating (added to the logits), got "
                            f"{_dtype_name(mask.dtype)}")
        if mask.device != query.device:
            raise ValueError(f"attn_mask is on {mask.device} but query is on {query.device}")
        weights = (*weights_dims, query.shape[-2], key.shape[-2])
        if mask.dim() > len(weights) or any(m not in (1, w) for m, w in zip(reversed(mask.shape), reversed(weights))):
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to the attention weights' "
                             f"shape (..., L, S) = {tuple(weights)} (query {tuple(query.shape)}, key "
                             f"{tuple(key.shape)})")
        if mask.is_floating_point() and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)  # torch adds any float mask; the kernels read q's dtype
        if not four_d:  # (a 4-D call's mask has at most 4 dims, which attention broadcasts)
            # broadcast from the right against (*outer, H, L, S), as torch does, then flattened as q
            mask = mask[(None,) * (len(full) + 2 - mask.dim())]
            if len(outer) != 1:
                if any(n != 1 for n in mask.shape[:-3]):
                    mask = mask.expand(*outer, *mask.shape[-3:])
                mask = mask.reshape(math.prod(mask.shape[:-3]), *mask.shape[-3:])  # (size-1 dims: a view)
    out = attention(q, k, v, attn_mask=mask, causal=is_causal, dropout_p=dropout_p, scale=scale, backend=backend)
    return out if four_d else out.reshape(*batch, *out.shape[-2:])


# ---------------------------------------------------------------------------------------------
# residual-add + norm
# ---------------------------------------------------------------------------------------------

def layer_norm_residual(x: Tensor, residual: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None, eps: float = 1e-5, *, dropout_p: float = 0.0,
                        prenorm: bool = False, rms: bool = False, residual_in_fp32: bool = False,
                        backend: Optional[str] = None, generator: Optional[torch.Generator] = None):
    """``norm(dropout(x) + residual)`` over the last dimension (LayerNorm, or RMSNorm with ``rms``).

    Args:
        x: (..., d) the branch output.  residual: (..., d) or None (plain norm of dropout(x)).
        weight, bias: (d,) or None.  eps: > 0.
        prenorm: also return the sum ``dropout(x) + residual`` (the residual stream of a pre-LN
            stack), as ``(normed, summed)``.
        residual_in_fp32: keep the sum in float32, float64 for float64 x (``residual`` may then be
            float32 while x is half precision or float64); the normalised output keeps x's dtype.
    """
    compiling = torch.compiler.is_compiling()
    x, residual, weight, bias, residual_in_fp32, d, eps, dropout_p = _check_norm_call(
        x, residual, weight, bias, eps, dropout_p, prenorm, rms, residual_in_fp32, compiling)
    if generator is not None:
        _check_generator(generator, x.device)
    if backend is not None:
        check_backend_name(backend)
    name = resolve_values("layer_norm_residual", _NORM_OPTIONS, x.device, x.dtype,
                          (dropout_p > 0.0, d, residual_in_fp32, rms), backend, compiling)
    rng = _draw_rng(dropout_p, generator, x)
    if not compiling and _eager_inference(x, residual, weight, bias):
        # No graph is built (plain tensors, nothing needs a gradient): the sum is written out
        # only when returned (prenorm)
        out, summed = layer_norm_residual_inference(x, residual, weight, bias, float(eps), dropout_p, rms,
                                                    residual_in_fp32, rng, name, prenorm)
    elif _distributed(x, residual, weight, bias):
        # (with the call's pair: the plain call's dropout mask, as attention's on DTensors)
        return reference.layer_norm_residual(x, residual, weight, bias, float(eps), dropout_p, prenorm, rms,
                                             residual_in_fp32, rng)
    else:
        # The sum is written out only when returned (prenorm) or needed by a backward.
        store_summed = prenorm or _needs_grad(x, residual, weight, bias)
        if compiling:
            x, residual, weight, bias = _distinct(x, residual, weight, bias)
        args = (x, residual, weight, bias, float(eps), dropout_p, rms, residual_in_fp32, rng, name, store_summed)
        if exporting():  # (the Function's forward: an exported program differentiates its ops; see ops)
            out, summed = LayerNormResidualFunction.forward(*args)[:2]
        else:
            out, summed = LayerNormResidualFunction.apply(*args)[:2]
    return (as_shape_of(out, x), as_shape_of(summed, x)) if prenorm else as_shape_of(out, x)


_HALF_DTYPES = (torch.float16, torch.bfloat16)
#: the options of a norm call that choose its backend, sorted by name
_NORM_OPTIONS = ("dropout", "hidden", "residual_in_fp32", "rms")


def _check_norm_call(x, residual, weight, bias, eps, dropout_p, prenorm, rms, residual_in_fp32, compiling: bool):
    """``layer_norm_residual``'s checks of its tensors and options (the reference module runs them
    too: both modules refuse the same inputs). Returns the operands as the ops take them (under
    autocast, ``mixed_norm_operands``; float32 parameters next to half-precision x used in x's
    dtype), ``residual_in_fp32``, the hidden size d, eps and dropout_p."""
    if isinstance(x, Tensor):
        if _autocast_on(x, compiling):
            x, residual, weight, bias, residual_in_fp32 = mixed_norm_operands(x, residual, weight, bias,
                                                                              residual_in_fp32)
        elif x.dtype in _HALF_DTYPES:
            # float32 parameters next to half-precision x, as torch's layer_norm and rms_norm take
            # them (models that keep their norms in float32), used in x's dtype
            weight, bias = (p.to(x.dtype) if isinstance(p, Tensor) and p.dtype == torch.float32 else p
                            for p in (weight, bias))
    d = None if compiling else _norm_tensors_match(x, residual, weight, bias)
    if d is None:
        d = _check_norm_tensors(x, residual, weight, bias, residual_in_fp32)
    if compiling:
        eps = _concrete(eps)
    if not (type(eps) is float and 0.0 < eps < math.inf):  # else _check_eps passes it (the common case)
        _check_eps(eps)
    dropout_p = _check_prob("dropout_p", dropout_p, compiling)
    if not (type(prenorm) is bool and type(rms) is bool and type(residual_in_fp32) is bool):
        for name, flag in (("prenorm", prenorm), ("rms", rms), ("residual_in_fp32", residual_in_fp32)):
            _check_bool(name, flag)
    return x, residual, weight, bias, residual_in_fp32, d, eps, dropout_p


def mixed_norm_operands(x, residual, weight, bias, residual_in_fp32):
    """A norm's operands of mixed dtypes (autocast's half activations with float32 parameters and
    a float32 residual stream; FlashAttention's layer_norm_fn allows the same) made ones the ops
    take. The residual add follows torch's type promotion, as ``x + residual`` does: where the
    promoted dtype is float32 next to half-precision x (a float32 residual, or one of the other
    half dtype: bfloat16 + float16 is float32) the residual is used in float32 and the sum kept in
    float32 (``residual_in_fp32``); otherwise x and the residual are used in the promoted dtype (a
    narrower residual widened to x's, or x widened to a float64 residual's). Every cast widens:
    nothing is rounded (a residual of the other half dtype was cast to x's, 1e5 in bfloat16 to
    float16's inf). The parameters are then used in x's dtype. The norm itself computes in
    float32 and returns x's dtype, as CPU autocast's layer_norm does."""
    if not x.is_floating_point():
        return x, residual, weight, bias, residual_in_fp32
    if isinstance(residual, Tensor) and residual.is_floating_point() and residual.dtype != x.dtype:
        promoted = torch.promote_types(x.dtype, residual.dtype)
        if promoted == torch.float32 and x.dtype in _HALF_DTYPES:
            residual, residual_in_fp32 = residual.to(torch.float32), True
        elif not (residual_in_fp32 and residual.dtype == torch.float32):  # (float64 x: the sum in float64)
            x, residual = x.to(promoted), residual.to(promoted)
    weight, bias = (p.to(x.dtype) if isinstance(p, Tensor) and p.is_floating_point() and p.dtype != x.dtype else p
                    for p in (weight, bias))
    return x, residual, weight, bias, residual_in_fp32


def _norm_tensors_match(x, residual, weight, bias) -> Optional[int]:
    """The fast path of ``_check_norm_tensors`` in eager mode: x's last size d when x is a
    floating tensor of at least one dim and residual (x's shape), weight and bias ((d,)) are None
    or tensors of x's dtype on x's device, none nested, which every check there passes. None: run
    those checks (a float32 residual with residual_in_fp32 lands there too, and passes).
    (is_nested is tested before a shape is read: a strided nested tensor has none, and raises
    when asked.)"""
    if not isinstance(x, Tensor) or x.is_nested:
        return None
    dtype = x.dtype
    if dtype not in FLOAT_DTYPES or x.dim() == 0:
        return None
    device, shape = x.device, x.shape
    if residual is not None and not (isinstance(residual, Tensor) and not residual.is_nested
                                     and residual.dtype == dtype and residual.device == device
                                     and residual.shape == shape):
        return None
    hidden = shape[-1:]  # (d,): a parameter's shape, 1-D of x's last size (one compare)
    for p in (weight, bias):
        if p is not None and not (isinstance(p, Tensor) and not p.is_nested and p.dtype == dtype
                                  and p.device == device and p.shape == hidden):
            return None
    return hidden[0]


def _shapes_differ(a: Tensor, b: Tensor, message: str) -> bool:
    """``a.shape != b.shape``. Under torch.compile two lengths Dynamo cannot guard on (each marked
    unbacked: ``torch._dynamo.decorators.mark_unbacked``) cannot be compared when tracing, which
    failed the trace; they count as equal and are asserted equal when the graph runs (``message``),
    as torch's own elementwise ops treat them."""
    if not torch.compiler.is_compiling():
        return a.shape != b.shape
    if a.dim() != b.dim() or any(known_true(m != n) for m, n in zip(a.shape, b.shape)):
        return True
    for m, n in zip(a.shape, b.shape):
        check_traced(m == n, message)
    return False


def _check_norm_tensors(x, residual, weight, bias, residual_in_fp32) -> int:
    """``layer_norm_residual``'s tensor checks; returns the hidden size d (a constant under
    torch.compile, see ``_concrete``: it chooses the backend)."""
    _check_tensor("x", x, min_ndim=1, nested=NESTED_TOKENS)
    d = _concrete(x.shape[-1])
    if residual is not None:
        _check_tensor("residual", residual, nested=NESTED_TOKENS)
        if _shapes_differ(residual, x, "layer_norm_residual: residual must have x's shape"):
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if residual.dtype != x.dtype and not (residual_in_fp32 and residual.dtype == torch.float32):
            raise TypeError(f"residual has dtype {_dtype_name(residual.dtype)} but x has {_dtype_name(x.dtype)}; "
                            f"they must match (or residual may be float32 with residual_in_fp32=True)")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _check_tensor(name, p, ndim=1)
            if p.shape[0] != d:
                raise ValueError(f"{name} must have shape ({d},) to match x's last dimension, got {tuple(p.shape)}")
    _check_same("x", x, {"weight": weight, "bias": bias})
    return d


# ---------------------------------------------------------------------------------------------
# feed-forward
# ---------------------------------------------------------------------------------------------

def feed_forward(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], *,
                 activation: str = "relu", dropout_p: float = 0.0, backend: Optional[str] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
    """``Linear(w1, b1) -> activation -> dropout -> Linear(w2, b2)`` with nn.Linear weight layout.

    Args:
        x: (..., d).  w1: (d_ff, d), or (2*d_ff, d) for swiglu/geglu holding the gate rows first,
            then the up rows, or for those the pair ``(w_gate, w_up)`` of (d_ff, d) weights
            (Llama's ``gate_proj`` and ``up_proj``: stacked inside the op for each kernel call,
            so the stack is never saved for backward; the gradients come back to each).
            b1: (w1.shape[0],) or None (a pair ``(b_gate, b_up)`` with a pair w1).
            w2: (d_out, d_ff).  b2: (d_out,) or None.
        activation: relu, gelu (exact), gelu_tanh, silu, swiglu (silu(gate) * up), geglu
            (gelu(gate) * up).
    """
    compiling = torch.compiler.is_compiling()
    x, w1, b1, w2, b2, w1_up, b1_up, dropout_p = _check_ffn_call(x, w1, b1, w2, b2, activation, dropout_p,
                                                                  compiling)
    if generator is not None:
        _check_generator(generator, x.device)
    if backend is not None:
        check_backend_name(backend)
    name = resolve_values("feed_forward", _FFN_OPTIONS, x.device, x.dtype, (activation, dropout_p > 0.0), backend,
                          compiling)
    if compiling:
        x, w1, b1, w2, b2, w1_up, b1_up = _distinct(x, w1, b1, w2, b2, w1_up, b1_up)
    rng = _draw_rng(dropout_p, generator, x)
    args = (x, w1, b1, w2, b2, activation, dropout_p, rng, name)
    # (plain tensors only pass _eager_inference: a DTensor goes on to the _distributed test)
    if not compiling:
        if w1_up is None:
            if _eager_inference(x, w1, b1, w2, b2):
                return as_shape_of(feed_forward_inference(*args), x)
        elif _eager_inference(x, w1, b1, w2, b2, w1_up, b1_up):
            return as_shape_of(feed_forward_inference(*args, w1_up, b1_up), x)
    if _distributed(x, w1, b1, w2, b2, w1_up, b1_up):
        # (with the call's pair: the plain call's dropout mask, as attention's on DTensors)
        return reference.feed_forward(x, _stack(w1, w1_up), _stack(b1, b1_up), w2, b2, activation, dropout_p, rng)
    if exporting():  # (the Function's forward: an exported program differentiates its ops; see ops)
        return as_shape_of(FeedForwardFunction.forward(*args, w1_up, b1_up)[0], x)
    return as_shape_of(FeedForwardFunction.apply(*args, w1_up, b1_up)[0], x)  # (every argument given: see ops)


#: the options of a feed-forward call that choose its backend, sorted by name
_FFN_OPTIONS = ("activation", "dropout")


def _check_ffn_call(x, w1, b1, w2, b2, activation, dropout_p, compiling: bool):
    """``feed_forward``'s checks of its tensors and options (the reference module runs them too:
    both modules refuse the same inputs). Returns the operands as the ops take them (under
    autocast, cast as ``nn.Linear`` casts them; a ``(w_gate, w_up)`` pair split: ``w1_up`` and
    ``b1_up`` None otherwise) and dropout_p: (x, w1, b1, w2, b2, w1_up, b1_up, dropout_p)."""
    w1_up = b1_up = None
    if isinstance(w1, (tuple, list)):
        w1, w1_up, b1, b1_up = _split_gated_weights(w1, b1, activation)
        x, w1, b1, w2, b2, w1_up, b1_up = _autocast(x, w1, b1, w2, b2, w1_up, b1_up)
        # (before comparing the halves' device and dtype with it)
        _check_tensor("x", x, min_ndim=1, nested=NESTED_TOKENS)
        _check_same("x", x, {"w1[0]": w1, "w1[1]": w1_up, "b1[0]": b1, "b1[1]": b1_up})
    else:
        if isinstance(x, Tensor) and _autocast_on(x, compiling):
            x, w1, b1, w2, b2 = _autocast(x, w1, b1, w2, b2)  # (as nn.Linear under autocast)
        if isinstance(b1, (tuple, list)):
            raise TypeError("b1 as a (b_gate, b_up) pair goes with w1 as a (w_gate, w_up) pair; got a tensor w1")
    if not _ffn_tensors_match(x, w1, b1, w2, b2):
        _check_tensor("x", x, min_ndim=1, nested=NESTED_TOKENS)
        _check_tensor("w1", w1, ndim=2)
        _check_tensor("w2", w2, ndim=2)
        if b1 is not None:
            _check_tensor("b1", b1, ndim=1)
        if b2 is not None:
            _check_tensor("b2", b2, ndim=1)
        _check_same("x", x, {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    d = x.shape[-1]
    F1, w1_in = w1.shape
    F1 = 2 * F1 if w1_up is not None else F1  # (the pair's halves were checked alike)
    d_out, w2_in = w2.shape
    if w1_in != d:
        raise ValueError(f"w1 must have shape (d_ff, {d}) to match x's last dimension, got {tuple(w1.shape)}")
    gated = activation in GATED_ACTIVATIONS
    if gated and F1 % 2 != 0:
        raise ValueError(f"for {activation}, w1 must stack (gate; up) rows: an even first dimension, got {tuple(w1.shape)}")
    d_ff = F1 // 2 if gated else F1
    if w2_in != d_ff:
        raise ValueError(f"w2 must have shape (d_out, {d_ff}) to take the activation of width {d_ff}, got {tuple(w2.shape)}")
    if b1 is not None and w1_up is None and b1.shape[0] != F1:  # (a pair's biases: _split_gated_weights)
        raise ValueError(f"b1 must have shape ({F1},), got {tuple(b1.shape)}")
    if b2 is not None and b2.shape[0] != d_out:
        raise ValueError(f"b2 must have shape ({d_out},), got {tuple(b2.shape)}")
    return x, w1, b1, w2, b2, w1_up, b1_up, _check_prob("dropout_p", dropout_p, compiling)


def _split_gated_weights(w1, b1, activation):
    """``feed_forward``'s pair form: (w_gate, w_up, b_gate, b_up), checked to be two halves alike."""
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"w1 as a (w_gate, w_up) pair is for the gated activations ({', '.join(GATED_ACTIVATIONS)}), "
                         f"got activation={activation!r}")
    if len(w1) != 2:
        raise ValueError(f"w1 as a pair must be (w_gate, w_up), got {len(w1)} items")
    w_gate, w_up = w1
    _check_tensor("w1[0]", w_gate, ndim=2)
    _check_tensor("w1[1]", w_up, ndim=2)
    if w_gate.shape != w_up.shape:
        raise ValueError(f"w1's gate and up weights must have the same shape, got {tuple(w_gate.shape)} and "
                         f"{tuple(w_up.shape)}")
    if b1 is None:
        return w_gate, w_up, None, None
    if not isinstance(b1, (tuple, list)) or len(b1) != 2 or (b1[0] is None) != (b1[1] is None):
        raise TypeError("with w1 as a (w_gate, w_up) pair, b1 must be None or a (b_gate, b_up) pair of tensors")
    if b1[0] is None:
        return w_gate, w_up, None, None
    _check_tensor("b1[0]", b1[0], ndim=1)
    _check_tensor("b1[1]", b1[1], ndim=1)
    if b1[0].shape != (w_gate.shape[0],) or b1[1].shape != (w_gate.shape[0],):
        raise ValueError(f"b1's gate and up biases must have shape ({w_gate.shape[0]},), got {tuple(b1[0].shape)} "
                         f"and {tuple(b1[1].shape)}")
    return w_gate, w_up, b1[0], b1[1]


def _ffn_tensors_match(x, w1, b1, w2, b2) -> bool:
    """The fast path of ``feed_forward``'s tensor checks: True when x (at least 1-D), w1, w2 (2-D)
    and b1, b2 (None or 1-D) are tensors of x's floating dtype on x's device, none nested, which
    every one of those checks passes (False: run them, they raise the precise error)."""
    if not (isinstance(x, Tensor) and isinstance(w1, Tensor) and isinstance(w2, Tensor)):
        return False
    dtype, device = x.dtype, x.device
    if not (dtype in FLOAT_DTYPES and x.dim() >= 1 and w1.dtype == dtype and w2.dtype == dtype and w1.dim() == 2
            and w2.dim() == 2 and w1.device == device and w2.device == device
            and not (x.is_nested or w1.is_nested or w2.is_nested)):
        return False
    for b in (b1, b2):
        if b is not None and not (isinstance(b, Tensor) and not b.is_nested and b.dtype == dtype and b.dim() == 1
                                  and b.device == device):
            return False
    return True


__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "merge_attention",
           "scaled_dot_product_attention", "layer_norm_residual", "feed_forward", "apply_rotary_emb",
           "get_alibi_slopes"]


# RoPE lives in its own module, which takes this module's checks (so it is imported last).
from .rotary import apply_rotary_emb, check_positions, check_tables, resolve_rotary, rotate  # noqa: E402
