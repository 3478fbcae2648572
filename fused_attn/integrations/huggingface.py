"""Hugging Face ``transformers`` integration (optional: nothing here imports transformers at load).

Attention: ``register()`` adds ``"fused_attn"`` to transformers' ``AttentionInterface`` (and the
matching mask function to ``AttentionMaskInterface``, so models build the same boolean keep-masks
as for "sdpa", or eager's for the models ``swap_modules`` marks: ``fused_attention_mask``), after which

    model = AutoModel.from_config(config, attn_implementation="fused_attn")
    model.set_attn_implementation("fused_attn")

route every attention layer of the model through ``fused_attn.functional.attention``: grouped-query
heads without repeating K/V, the model's scaling, its logit soft-capping (Gemma 2's
``attn_logit_softcapping``), its attention sinks (gpt-oss's ``s_aux``, Inkling 2's per-token ``sinks``), its dropout in
training, padding, causal and sliding-window masks as transformers passes them. What would change the answer and
is not computed is refused (``_check_kwargs``), and ``swap_modules`` leaves the models whose code treats the name
"fused_attn" otherwise than "sdpa" (``_inexact_reason``).

Norms and MLPs: ``fused_attn.swap_modules(model)`` also sets the attention implementation and fuses,
where the module's code is exactly the known one (its source is compared with the BERT / GPT-2 /
Llama original, so "copied from" classes of other models qualify and edited ones do not):
- BERT family: ``*SelfOutput``/``*Output`` (dense -> dropout -> LayerNorm(x + input)) -> dense, then
  one residual-add + LayerNorm; ``*Layer.feed_forward_chunk`` (intermediate dense -> act -> output
  dense -> dropout -> LayerNorm(+ input)) -> one fused FFN and one residual-add + LayerNorm;
- GPT-2: ``GPT2MLP`` (Conv1D weights are stored (in, out): passed transposed) -> fused FFN;
- Llama family: ``LlamaRMSNorm`` -> fused RMSNorm; ``LlamaMLP`` (down(act(gate(x)) * up(x))) ->
  fused SwiGLU/GeGLU with ``w1 = cat([gate, up])``.
The residual adds inside GPT-2's and Llama's decoder-layer forwards are left in Python.

Rotary embeddings: ``swap_modules(model)`` (``rotary=True``) also points the modeling module's
``apply_rotary_pos_emb``, where it is Llama's or GPT-NeoX's code, to the fused rotary op
(``fused_rotary_pos_emb``), as Liger-Kernel does: a module-level function, so every model of that
family in the process uses it while a model whose swap installed it or found it installed is
neither restored (``restore_modules``) nor collected (``_RotaryPatch``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import threading
import warnings
import weakref
from typing import Optional

import torch
import torch.nn as nn

from ..ops import differentiated
from ..functional import _apply_sinks, _needs_grad, attention, attention_varlen, feed_forward, layer_norm_residual
from ..swap import activation_now, fusable_eps, fusable_p, in_sum_dtype, reads_intact, weak_cache

NAME = "fused_attn"


# ---------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------

#: keyword arguments of transformers' attention interface that ``fused_attention_forward`` computes
#: with (the signature's dropout, scaling and is_causal besides). sliding_window: the masks carry the
#: window, as for sdpa; packed sequences (no mask) apply it themselves.
HANDLED_KWARGS = frozenset({"position_bias", "softcap", "s_aux", "sinks", "output_attentions", "sliding_window",
                            "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})

#: ...that change nothing it computes: the masks and tensors already hold what they say (the
#: position ids of packing, seq_idx; position ids are read only to check a causal flag's alignment),
#: or they are about outputs, caching or the loss, or pick FlashAttention's backward algorithm
#: (``deterministic``), not the answer.
IGNORED_KWARGS = frozenset({"position_ids", "seq_idx", "use_cache", "num_items_in_batch", "output_hidden_states",
                            "output_router_logits", "deterministic"})

#: ...known to change the answer and not computed here: sparse attention's selected keys, which
#: DeepSeek-V3.2-style models pass to kernels other than eager's and sdpa's instead of a mask.
#: Refused wherever they come from (the models' code need not be readable).
REFUSED_KWARGS = frozenset({"indices", "block_indices", "topk_indices"})


def _attention_code(cls) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def attention_call_keywords(tree):
    """The keyword names of each call, in a parsed module or class, of an attention function looked
    up in ``ALL_ATTENTION_FUNCTIONS`` (called through a name assigned from it, or subscripted
    directly), one name per keyword of each call."""
    import ast

    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        looked_up = {t.id for node in ast.walk(fn) if isinstance(node, (ast.Assign, ast.AnnAssign))
                     and node.value is not None and "ALL_ATTENTION_FUNCTIONS" in ast.unparse(node.value)
                     for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                     if isinstance(t, ast.Name)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and (
                    (isinstance(node.func, ast.Name) and node.func.id in looked_up)
                    or (isinstance(node.func, ast.Subscript) and "ALL_ATTENTION_FUNCTIONS" in ast.unparse(node.func))):
                yield from (k.arg for k in node.keywords if k.arg is not None)


@weak_cache  # (type(module) of any module calling the "fused_attn" implementation: the user's classes too)
def _model_kwargs(cls) -> frozenset:
    """The keyword arguments an attention class's own code gives its attention functions: the
    keywords of its calls of the function looked up in ``ALL_ATTENTION_FUNCTIONS`` (in its class and
    its transformers base classes), and the parameters of its modeling module's
    ``eager_attention_forward`` (the answer the swap reproduces). What a model passes there on
    purpose means something for its attention; what merely flows through the model's ``**kwargs``
    from the caller (a tokenizer's token_type_ids) reaches sdpa and eager unread, as it does here."""
    import ast
    import textwrap

    names = set()
    for base in cls.__mro__:
        if not base.__module__.startswith("transformers."):
            continue
        code = _attention_code(base)
        if "ALL_ATTENTION_FUNCTIONS" not in code:
            continue
        try:
            tree = ast.parse(textwrap.dedent(code))
        except SyntaxError:
            continue
        names.update(attention_call_keywords(tree))
    eager = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
    try:
        params = inspect.signature(eager).parameters.values() if eager is not None else ()
    except (TypeError, ValueError):
        params = ()
    names.update(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    return frozenset(names)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value) if len(repr(value)) <= 60 else type(value).__name__


def _where(module) -> str:
    layer = getattr(module, "layer_idx", None)
    return type(module).__name__ + (f" (layer {layer})" if layer is not None else "")


def _check_kwargs(module, kwargs) -> None:
    """Refuse the keyword arguments that would change the answer and that this function does not
    compute with: an answer computed without them would be silently another model's. None is
    absent, as every implementation takes it."""
    for name, value in kwargs.items():
        if value is None or name in HANDLED_KWARGS or name in IGNORED_KWARGS:
            continue
        if name in REFUSED_KWARGS or name in _model_kwargs(type(module)):
            raise ValueError(
                f"fused_attn: {_where(module)} passes {name}={_describe(value)} to its attention function, which "
                f"the 'fused_attn' implementation does not compute with: attention without it would be another "
                f"model's. Run this model with attn_implementation 'eager' or 'sdpa' (fused_attn.restore_modules "
                f"undoes a swap)")


def _row_sinks(module, query, kwargs):
    """(per-head sinks, per-row sinks) of the call: gpt-oss's ``s_aux`` (Hq,) logits are
    ``attention``'s ``sinks``; Inkling 2's data-dependent ``sinks`` (B, Hq, Lq, 1), one logit per
    query row (its eager attention appends them to each row's logits as one more column without
    a value), are applied to the output through the lse as ``attention`` applies its own: each row
    shrinks by sigmoid(lse - sink). Returned as a (B or 1, Hq or 1, Lq or 1) tensor."""
    B, Hq, Lq = query.shape[:3]
    per_head, per_row = None, None
    for name in ("s_aux", "sinks"):
        sinks = kwargs.get(name)
        if sinks is None:
            continue
        if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
            raise TypeError(f"fused_attn: {_where(module)} passes {name}={_describe(sinks)}; expected a floating-point "
                            "tensor of attention-sink logits")
        if sinks.shape == (Hq,) and per_head is None:
            per_head = sinks
        elif (sinks.dim() == 4 and sinks.shape[-1] == 1 and per_row is None
              and all(n in (1, m) for n, m in zip(sinks.shape[:3], (B, Hq, Lq)))):
            per_row = sinks[..., 0]
        else:
            raise ValueError(f"fused_attn: {_where(module)} passes {name}={_describe(sinks)}; the 'fused_attn' "
                             f"implementation takes attention sinks of shape (Hq,) = ({Hq},) (one logit per head) or "
                             f"broadcastable to (B, Hq, Lq, 1) = ({B}, {Hq}, {Lq}, 1) (one per query row), one of each")
    return per_head, per_row


def fused_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """transformers' attention-function signature: q (B, Hq, L, D), k/v (B, Hkv, S, D); returns
    (output (B, L, Hq, Dv), None). Mirrors ``sdpa_attention_forward``'s conventions: T5's
    ``position_bias`` (a learned additive bias, with its gradient) joins the mask as sdpa joins
    them; ``output_attentions=True`` runs the model's own eager attention, which returns them.
    Keyword arguments that would change the answer and that it does not compute with (sparse
    attention's ``indices``, ...) raise a ValueError (``HANDLED_KWARGS``, ``_check_kwargs``)."""
    _check_kwargs(module, kwargs)
    # As sdpa: the module says whether it is a decoder attention; causal only without an explicit mask.
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if _weights_requested(kwargs):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            mask = _additive_mask(attention_mask, query, key, is_causal)
            return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
        warnings.warn(f"fused_attn: output_attentions=True, but {type(module).__module__} has no "
                      "eager_attention_forward to compute the weights; they are not returned", stacklevel=2)
    if not isinstance(dropout, bool) and isinstance(dropout, (int, float)) and dropout == 1:
        # an attention dropout of 1 (a config's, or set since the swap): transformers' eager and
        # sdpa functions take it (every weight dropped: zeros, zero gradients); the kernels'
        # counter-based dropout takes p < 1, as fused_attn's scaled_dot_product_attention does it
        out, _ = fused_attention_forward(module, query, key, value, attention_mask, 0.0, scaling, is_causal, **kwargs)
        return out * 0.0, None
    position_bias = kwargs.get("position_bias")
    sinks, row_sinks = _row_sinks(module, query, kwargs)
    q_len = query.shape[2]
    varlen = [kwargs.get(name) for name in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")]
    if query.shape[0] == 1 and all(x is not None for x in varlen):
        if position_bias is not None:
            raise ValueError(f"fused_attn: {_where(module)} passes position_bias={_describe(position_bias)} with "
                             "packed sequences (cu_seq_lens_q/k), which run without a mask and a bias")
        return _packed_attention_forward(module, query, key, value, varlen, dropout, scaling, is_causal, kwargs,
                                         sinks, row_sinks)
    is_causal = bool(q_len > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_len:
        # sdpa's convention (its mask function's None): a causal flag with more keys than queries is
        # top-left aligned, which only the prefill of an empty static cache asks for: the keys after
        # the prompt are empty slots, cut here as sdpa cuts them. Position ids for other than these
        # queries say the model dropped queries after its masks were built (Gemma 4's KV-shared
        # layers do, where the implementation is not "sdpa"): their alignment is not top-left.
        positions = kwargs.get("position_ids")
        if isinstance(positions, torch.Tensor) and positions.dim() > 0 and positions.shape[-1] != q_len:
            raise ValueError(
                f"fused_attn: {_where(module)} got {q_len} queries, {key.shape[2]} keys and no mask, with position_ids "
                f"of shape {tuple(positions.shape)}: the model dropped queries after building its masks, so the "
                "causal flag cannot place them among the keys; the 'fused_attn' implementation needs the masks "
                "(fused_attn.swap_modules marks the models it knows to do this for them)")
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[2]]
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            mask = mask.to(query.dtype)
    if position_bias is not None:  # an additive mask: keep-masks hide where they are False
        bias = position_bias[:, :, :, : key.shape[2]]
        bias = bias if bias.dtype == query.dtype else bias.to(query.dtype)
        mask = bias if mask is None else (bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                                          else bias + mask)
    out = attention(query, key, value, attn_mask=mask, causal=is_causal, dropout_p=float(dropout), scale=scaling,
                    softcap=kwargs.get("softcap"), sinks=sinks, return_lse=row_sinks is not None,
                    backend=getattr(module, "fused_attn_backend", None))
    if row_sinks is not None:
        out, _ = _apply_sinks(*out, row_sinks, head_dim=1)  # attention's own sink step, a logit per row
    return out.transpose(1, 2), None  # (B, L, H, D): contiguous, the op stores its output that way


def _weights_requested(kwargs) -> bool:
    """Whether this call must return the attention weights: ``output_attentions`` passed down to
    it, or transformers recording them (its ``capture_outputs`` hooks keep each attention module's
    second output while a model call with ``output_attentions``, as an argument or in the config, is
    running). Models that take the flag out of their layers' kwargs (GPT-2) or read it from the
    config alone pass nothing down: asking the recorder is what the weights of those need (they
    came back as an empty tuple, silently)."""
    if kwargs.get("output_attentions"):
        return True
    capturing = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(capturing, "_active_collector", None)
    if collector is None:
        return False
    if torch.compiler.is_compiling():
        # A ContextVar's get() breaks a Dynamo graph. transformers' CompileableContextVar keeps the
        # collector in a plain attribute once a compiled model call has set it (compiling True);
        # a compiled part of a model (one decoder layer) sees it unset: nothing is recorded there
        wanted = getattr(collector, "global_var", None) if getattr(collector, "compiling", False) else None
    else:
        wanted = collector.get()
    return bool(wanted) and any(key.endswith("attentions") for key in wanted)


def _additive_mask(attention_mask, query, key, is_causal):
    """The mask of this call as eager attention adds it to the scores: our mask function gives
    bool keep-masks, and None where the causal flag suffices. Then the causal mask is the one
    the fused path applies, aligned top-left (sdpa's ``is_causal``): query i sees keys 0..i. The
    mask function leaves it to the flag with more keys than queries only for the prefill of an
    empty static cache (transformers' ``_ignore_causal_mask_sdpa``), whose keys after the prompt
    are empty slots; bottom-right alignment would let the prompt attend them and its own future."""
    q_len, k_len = query.shape[2], key.shape[2]
    keep = attention_mask
    if keep is None:
        if not (is_causal and q_len > 1):
            return None
        rows = torch.arange(q_len, device=query.device)[:, None]
        keep = (rows >= torch.arange(k_len, device=query.device)[None, :])[None, None]
    if keep.dtype != torch.bool:
        return keep
    return torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~keep, torch.finfo(query.dtype).min)


def _packed_attention_forward(module, query, key, value, varlen, dropout, scaling, is_causal, kwargs, sinks,
                              row_sinks):
    """Packed sequences (one batch row holding several sequences, as ``DataCollatorWithFlattening``
    makes them): with transformers' flash-attention kwargs (cu_seq_lens_q/k, max_length_q/k) the
    sequences run through ``attention_varlen`` as flash_attention_2 runs them, and the attention
    mask (block-diagonal, when transformers built one from the position ids) is not read."""
    cu_q, cu_k, max_q, max_k = varlen
    sliding = kwargs.get("sliding_window")
    window = None
    if sliding is not None and sliding > 0:  # transformers' window: keys with q - k < sliding_window
        window = (sliding - 1, 0 if is_causal else sliding - 1)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (1, H, T, D) -> (T, H, D) views
    out = attention_varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                           causal=bool(is_causal), window_size=window, alignment="bottom_right",
                           dropout_p=float(dropout), scale=scaling, softcap=kwargs.get("softcap"),
                           sinks=sinks, return_lse=row_sinks is not None,
                           backend=getattr(module, "fused_attn_backend", None))
    if row_sinks is not None:  # lse (Hq, T); the sinks (1 | Hq, T | 1) of the one batch row
        out, _ = _apply_sinks(*out, row_sinks[0], head_dim=0)
    return out.unsqueeze(0), None  # (1, T, H, Dv)


#: config attribute: the configs of models that get eager's masks (``_explicit_masks``)
EXPLICIT_MASKS = "_fused_attn_explicit_masks"


def fused_attention_mask(*args, config=None, **kwargs):
    """The mask function of ``"fused_attn"``: sdpa's boolean keep-masks, None where the causal
    flag suffices (no padding) and the attention module's ``is_causal`` then says what the mask
    is, as sdpa's attention reads it. For the configs of models whose modules do not declare
    is_causal as that needs (``EXPLICIT_MASKS``), the masks eager gets, never None."""
    from transformers.masking_utils import sdpa_mask

    if getattr(config, EXPLICIT_MASKS, False):
        kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, config=config, **kwargs)


def register() -> None:
    """Register ``"fused_attn"`` with transformers' attention and attention-mask interfaces."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, fused_attention_forward)
    AttentionMaskInterface.register(NAME, fused_attention_mask)


class _PreviousImplementation(str):
    """The attention implementation a swap replaced, kept on the model: a str that registers
    ``"fused_attn"`` with transformers when it is unpickled, so that a model saved whole with
    ``torch.save`` runs in a fresh process whatever else its swap replaced."""

    def __reduce__(self):
        return _previous_implementation, (str(self),)


def _previous_implementation(name: str) -> "_PreviousImplementation":
    register()
    return _PreviousImplementation(name)


def _uses_attention_interface(cls) -> bool:
    """transformers' own test (5.x): whether the class's modeling module runs its attention
    through the attention interface, so that ``set_attn_implementation`` reaches it."""
    can_set = getattr(cls, "_can_set_attn_implementation", None)
    return True if can_set is None else bool(can_set())


def _no_interface_reason(cls) -> str:
    """Why a model's attention stays its own: its modeling module computes attention itself."""
    try:
        calls_sdpa = "scaled_dot_product_attention" in inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        calls_sdpa = False
    how = ("call torch's scaled_dot_product_attention when attn_implementation is 'sdpa', which "
           "fused_attn.patch_sdpa() routes to the fused kernels" if calls_sdpa else "compute attention themselves")
    return (f"attention not switched: the model's attention modules do not use transformers' attention interface "
            f"(they {how})")


@weak_cache
def _code(cls) -> str:
    """The source of a class and of its base classes from transformers' modeling modules."""
    parts = []
    for base in cls.__mro__:
        if base.__module__.startswith("transformers.models."):
            try:
                parts.append(inspect.getsource(base))
            except (OSError, TypeError):
                pass
    return "\n".join(parts)


def _calls_interface(cls) -> bool:
    """Whether the class's code looks its attention function up in transformers' attention
    interface: transformers' own marker, read per class (transformers reads the whole modeling
    module, where one such class suffices)."""
    return "ALL_ATTENTION_FUNCTIONS" in _code(cls)


def _own_attention(model, path: str = "") -> dict:
    """{class: [paths]} of the model's attention modules that compute attention themselves, in
    modeling modules that transformers switches (LongT5's and BigBirdPegasus's encoder attention,
    GIT's text attention, SAM's vision attention, ...): classes of transformers' modeling code named
    *Attention* whose code computes a softmax (or calls torch's SDPA) without the attention
    interface, and that hold no other attention module (of a wrapper and the attention inside
    it, the inner one counts; MLPs and bias tables named after attention have no softmax)."""
    found = {}
    for name, module in model.named_modules():
        cls = type(module)
        if (not cls.__module__.startswith("transformers.models.") or "Attention" not in cls.__name__
                or _calls_interface(cls)):
            continue
        code = _code(cls)
        if "softmax" not in code and "scaled_dot_product_attention" not in code:
            continue
        if any("Attention" in type(m).__name__ or _calls_interface(type(m)) for m in list(module.modules())[1:]):
            continue
        found.setdefault(cls, []).append(f"{path}.{name}" if path and name else path or name)
    return found


def _own_attention_how(cls) -> str:
    if "scaled_dot_product_attention" in _code(cls):
        return ("calls torch's scaled_dot_product_attention itself, which fused_attn.patch_sdpa() routes to the "
                "fused kernels")
    return "computes attention itself"


def _explicit_masks(model) -> dict:
    """{(sub-)model: why} of the (sub-)models that need eager's masks, never None
    (``fused_attention_mask``). sdpa's mask function leaves a mask to the attention module's
    ``is_causal`` where no padding needs one, a convention transformers holds to the models it
    marks ``_supports_sdpa``. A model it does not mark whose attention modules do not all
    declare is_causal=True may build them with the flag eager never reads: PegasusX's, NLLB-MoE's
    and BigBirdPegasus's decoder self-attention say False and rely on eager's explicit causal
    mask. (Gemma 2 and gpt-oss, unmarked as sdpa has no soft-capping or sinks, declare it and
    keep the causal flag.)"""
    found, paths = {}, []
    for path, sub in model.named_modules():
        if (not hasattr(type(sub), "_supports_sdpa") or type(sub)._supports_sdpa
                or any(path.startswith(f"{outer}.") or not outer for outer in paths)):  # (one of its sub-models)
            continue
        names = sorted({type(m).__name__ for m in sub.modules()
                        if _calls_interface(type(m)) and getattr(m, "is_causal", None) is not True})
        if names:
            paths.append(path)
            found[sub] = (f"eager's masks: transformers does not mark {type(sub).__name__} _supports_sdpa, and "
                          f"{', '.join(names)} do{'es' if len(names) == 1 else ''} not declare is_causal=True")
    why = _masks_for_name_checks(model)
    if why is not None:
        found[model] = why
    return found


def _has_kv_shared_layers(model) -> bool:
    return any(getattr(m, "is_kv_shared_layer", False) is True for m in model.modules())


#: The branches on the implementation's name "sdpa" reviewed to be exact under "fused_attn", by
#: (modeling module, function): for which models they need eager's masks (``EXPLICIT_MASKS``,
#: never None) to be. Gemma 4 cuts its KV-shared layers' queries to the last logits_to_keep after
#: the masks were built, except under "sdpa" with a None mask (a causal flag over cut queries is
#: wrong); eager's masks are cut with the queries. Only models with KV-shared layers cut them.
REVIEWED_NAME_CHECKS = {
    ("transformers.models.gemma4.modeling_gemma4", "Gemma4TextModel._maybe_slice_kv_shared_inputs"):
        _has_kv_shared_layers,
    ("transformers.models.gemma4_unified.modeling_gemma4_unified",
     "Gemma4UnifiedTextModel._maybe_slice_kv_shared_inputs"): _has_kv_shared_layers,
}


@functools.lru_cache(maxsize=None)
def _name_checks(module_name: str) -> tuple:
    """(function, line) of each place a modeling module compares its attention implementation's
    name with one naming "sdpa" (``== "sdpa"``, ``in ("eager", "sdpa")``, ...). "fused_attn" gets
    sdpa's masks and conventions everywhere else, so these are the branches where the model does
    for "fused_attn" what it does for neither eager nor sdpa: DeepSeek-V3.2's sparse attention
    passes its selected keys as indices= to other implementations instead of a mask; Gemma 4 cuts
    queries after the masks were built. Comparisons with "eager" alone, "flash..." or
    "flex_attention" leave "fused_attn" on sdpa's side. Read from the source, as parsed, so a new
    model with such a branch is found without a list; a maintained list would miss it silently."""
    import ast

    module = sys.modules.get(module_name)
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return ()
    found = []

    def visit(node, scope, aliases):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + (node.name,)
            aliases = set(aliases)
        if isinstance(node, ast.Assign) and "_attn_implementation" in ast.unparse(node.value):
            aliases |= {t.id for t in node.targets if isinstance(t, ast.Name)}  # impl = config._attn_implementation
        if isinstance(node, ast.Compare):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if (("_attn_implementation" in ast.unparse(node) or names & aliases)
                    and any(isinstance(c, ast.Constant) and isinstance(c.value, str) and "sdpa" in c.value
                            for c in ast.walk(node))):
                found.append((".".join(scope), node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, aliases)

    visit(tree, (), set())
    return tuple(found)


def _modeling_module_names(model) -> list:
    """The transformers modeling modules of the model's classes and of their base classes."""
    return sorted({base.__module__ for m in model.modules() for base in type(m).__mro__
                   if base.__module__.startswith("transformers.models.")})


def _backend_opt_out(cls) -> Optional[type]:
    """The class of a model's modeling code that sets ``_supports_attention_backend = False`` for it
    (Inkling 2's per-token sinks, ...), or None: PreTrainedModel's own False is the default, not a
    statement about the model."""
    owner = next((base for base in cls.__mro__ if "_supports_attention_backend" in base.__dict__), None)
    if owner is not None and owner.__module__.startswith("transformers.models.") and \
            not owner.__dict__["_supports_attention_backend"]:
        return owner
    return None


def _inexact_reason(model) -> Optional[str]:
    """Why "fused_attn" would not compute what the model computes, or None: transformers marks a
    (sub-)model whose attention runs through the interface ``_supports_attention_backend = False``
    (set by the model's own class: PreTrainedModel's default False means "not declared", and T5,
    BART or Whisper leave it so), or the model's code branches on the name "sdpa" in a way not
    reviewed to be exact (``_name_checks``, ``REVIEWED_NAME_CHECKS``)."""
    for sub in model.modules():
        cls = type(sub)
        owner = _backend_opt_out(cls) if hasattr(cls, "set_attn_implementation") else None
        if owner is not None and any(_calls_interface(type(m)) for m in sub.modules()):
            return (f"transformers marks {cls.__name__} _supports_attention_backend = False (in {owner.__name__}): "
                    "its attention is exact only in the implementations it names")
    for name in _modeling_module_names(model):
        for function, line in _name_checks(name):
            if (name, function) not in REVIEWED_NAME_CHECKS:
                return (f"{name.rsplit('.', 1)[-1]}.{function} (line {line}) compares the attention implementation "
                        "with 'sdpa' and takes another path for other names (for 'fused_attn' too), not reviewed "
                        "to be exact")
    return None


def _masks_for_name_checks(model) -> Optional[str]:
    """Why the model needs eager's masks for its branches on "sdpa" (``REVIEWED_NAME_CHECKS``), or None."""
    for name in _modeling_module_names(model):
        for function, line in _name_checks(name):
            needs_masks = REVIEWED_NAME_CHECKS.get((name, function))
            if needs_masks is not None and needs_masks(model):
                return (f"eager's masks: {name.rsplit('.', 1)[-1]}.{function} cuts queries after the masks are "
                        "built where the implementation is not 'sdpa'")
    return None


def _mark_explicit_masks(models, on: bool) -> None:
    """Mark (or unmark) the configs of these models' modules: ``fused_attention_mask`` reads it."""
    for model in models:
        for module in model.modules():
            config = getattr(module, "config", None)
            if on and config is not None:
                setattr(config, EXPLICIT_MASKS, True)
            elif config is not None and EXPLICIT_MASKS in getattr(config, "__dict__", {}):
                delattr(config, EXPLICIT_MASKS)


def swap_attention_implementation(model, opts, report, path: str = "") -> None:
    """Switch a transformers model's attention implementation to ``"fused_attn"`` where its
    modeling code runs attention through transformers' interface. Models whose attention
    modules compute attention themselves (BLOOM, MPT, Falcon, ...: transformers refuses to
    switch them, with a warning) are listed as left, with the reason; so are the attention
    classes that compute attention themselves in a model that is switched (transformers switches
    a model when one class of its modeling module uses the interface: LongT5's decoder does, its
    encoder's local attention does not), one row per class, and sub-models of a composite model
    that stayed on another implementation. A model none of whose attention modules use the
    interface is not switched."""
    if not hasattr(model, "set_attn_implementation") or not hasattr(model, "config"):
        return
    previous = getattr(model.config, "_attn_implementation", None)
    explicit = _explicit_masks(model)
    if previous == NAME:
        register()  # (a model loaded whole, whose attention was the only thing swapped, needs it again)
        report.already.append((path, type(model).__name__, f"attn_implementation {NAME!r}"))
        _mark_explicit_masks(explicit, True)  # (a model built with "fused_attn")
        reason = _inexact_reason(model)
        if reason is not None:  # (built so by its user: said, though not undone)
            report.left.append((path, type(model).__name__, f"attn_implementation is {NAME!r} (set before this swap), "
                                f"but {reason}: set 'eager' or 'sdpa'"))
        return
    if not _uses_attention_interface(type(model)):
        report.left.append((path, type(model).__name__, _no_interface_reason(type(model))))
        return
    reason = _inexact_reason(model)
    if reason is not None:
        report.left.append((path, type(model).__name__, f"attention not switched: {reason}"))
        return
    own = _own_attention(model, path)
    if own and not any(_calls_interface(type(m)) for m in model.modules()):  # (LongT5's encoder-only model)
        report.left.append((path, type(model).__name__, "attention not switched: none of the model's attention "
                            "modules use transformers' attention interface (" + "; ".join(
                                f"{cls.__name__} {_own_attention_how(cls)}" for cls in own) + ")"))
        return
    register()
    before = _implementations(model.config)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, ImportError) as exc:
        report.left.append((path, type(model).__name__, f"attention implementation not switched: {exc}"))
        return
    if getattr(model.config, "_attn_implementation", None) != NAME:  # declined without raising
        model.set_attn_implementation(previous)
        report.left.append((path, type(model).__name__, "attention implementation not switched: transformers kept "
                                                        f"{model.config._attn_implementation!r}"))
        return
    _mark_explicit_masks(explicit, True)
    # (each sub-config's own implementation, as ``before`` read them, to restore them one by one)
    model.__dict__["_fused_attn_previous_attn"] = {**before, "": _PreviousImplementation(previous)}
    if opts.backend is not None:
        for module in model.modules():
            module.__dict__["fused_attn_backend"] = opts.backend
    report.replaced.append((path, type(model).__name__, type(model).__name__,
                            f"attn_implementation {previous!r} -> {NAME!r}"
                            + (f" ({'; '.join(explicit.values())})" if explicit else "")))
    for cls, paths in own.items():  # the implementation does not reach them: they stay as they are
        report.left.append((paths[0], cls.__name__, f"attention not switched: {cls.__name__} does not use "
                            f"transformers' attention interface (it {_own_attention_how(cls)}); "
                            f"{len(paths)} module{'s' if len(paths) > 1 else ''} of this class"))
    for name, sub in model.named_modules():  # sub-models of a composite model that transformers skipped
        config = getattr(sub, "config", None)
        if (sub is not model and hasattr(sub, "set_attn_implementation") and config is not None
                and getattr(config, "_attn_implementation", NAME) != NAME):
            report.left.append((f"{path}.{name}" if path else name, type(sub).__name__,
                                _no_interface_reason(type(sub)) if not _uses_attention_interface(type(sub)) else
                                f"attention implementation stayed {config._attn_implementation!r}"))


def _implementations(config) -> dict:
    """The attention implementation of a config and of each of its sub-configs, nested as
    ``set_attn_implementation`` takes them: {"": top, "text_config": {"": ..., ...}, ...}."""
    found = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            found[key] = _implementations(sub)
    return found


def restore_attention_implementation(model, report, path: str = "") -> None:
    """Put back the implementation of the model and of each sub-model (a composite model's
    sub-models may have run different ones: CLIP's text tower "eager", its vision tower "sdpa")."""
    previous = model.__dict__.pop("_fused_attn_previous_attn", None)
    if previous is None:
        return
    model.set_attn_implementation(previous)  # (a str where an earlier version saved the top level only)
    _mark_explicit_masks([model], False)
    for module in model.modules():
        module.__dict__.pop("fused_attn_backend", None)
    top = previous[""] if isinstance(previous, dict) else previous
    report.replaced.append((path, type(model).__name__, type(model).__name__, f"attn_implementation {NAME!r} -> "
                                                                              f"{str(top)!r}"))


# ---------------------------------------------------------------------------------------------
# rotary position embeddings
# ---------------------------------------------------------------------------------------------

def _rotary_reason(q, k, cos, sin, unsqueeze_dim, partial: bool) -> Optional[str]:
    """Why a call of the known apply_rotary_pos_emb is not one the fused version computes, or None."""
    if unsqueeze_dim not in (1, 2):
        return f"unsqueeze_dim={unsqueeze_dim}"
    tensors = (q, k, cos, sin)
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
        return "non-floating inputs"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return "shapes"
    R, D = cos.shape[-1], q.shape[-1]
    batch, length = q.shape[0], q.shape[3 - unsqueeze_dim]
    if (R % 2 or R == 0 or k.shape[-1] != D or (R > D if partial else R != D) or cos.shape[0] not in (1, batch)
            or k.shape[0] != batch or cos.shape[1] != length or k.shape[3 - unsqueeze_dim] != length):
        return "shapes"
    if len({t.device for t in tensors}) != 1 or len({t.dtype for t in tensors}) != 1:
        return "devices or dtypes"  # (other dtypes: transformers' formula promotes, the fused op keeps q's)
    if differentiated(cos) or differentiated(sin):  # (a gradient, or a forward-mode tangent)
        return "tables that require grad"
    return None


class _RotaryPatch:
    """A fused ``apply_rotary_pos_emb`` (``fn``) and the state it reads at each call: the function
    it replaced, its form, the backend it runs on. Installed by ``swap_rotary`` in ``module``, it is
    held by every model whose swap installed it or found it installed (weak references, in swap
    order, each with the backend its swap asked for): it runs on the first live holder's backend,
    and is put back once no holder is left, each restored (``restore_rotary``) or garbage-collected
    (the weak reference's callback). (Held by the installing model alone, as it was, one collected
    unrestored left the function, on its backend, to every later model of the family, and none of
    them could put it back.)"""

    def __init__(self, original, backend, partial: bool, module=None):
        self.original, self.backend, self.partial, self.module = original, backend, partial, module
        self.fn = None
        self.holders: list = []  # [(weakref.ref(model), backend)]

    def holds(self, model) -> bool:
        return any(ref() is model for ref, _ in self.holders)

    def join(self, model, backend) -> None:
        self.holders.append((weakref.ref(model, self._gone), backend))
        self.sync()

    def leave(self, model) -> None:
        self.holders = [(ref, b) for ref, b in self.holders if ref() is not model]
        self.sync()

    def sync(self) -> None:
        """Drop the dead holders; follow the first live one's backend, or put the original back."""
        self.holders = [(ref, b) for ref, b in self.holders if ref() is not None]
        if self.holders:
            self.backend = self.holders[0][1]
        elif self.module is not None and getattr(self.module, "apply_rotary_pos_emb", None) is self.fn:
            self.module.apply_rotary_pos_emb = self.original  # (unless replaced since by something else)

    def _gone(self, _ref) -> None:
        _ROTARY_PENDING.append(self)
        _sync_pending()


# The holders change under this lock. A holder's collection can run its callback anywhere: in the
# middle of a swap or restore on this thread (where taking the lock again would deadlock, and
# syncing would act on half-made changes) or another (where waiting could deadlock on whatever
# that thread holds); so the callback only queues the patch and syncs it if the lock is free, and
# whoever holds the lock syncs the queue after releasing it.
_ROTARY_LOCK = threading.Lock()
_ROTARY_PENDING: list = []


def _sync_pending() -> None:
    while _ROTARY_PENDING and _ROTARY_LOCK.acquire(blocking=False):
        try:
            while _ROTARY_PENDING:
                _ROTARY_PENDING.pop().sync()
        finally:
            _ROTARY_LOCK.release()


@contextlib.contextmanager
def _rotary_locked():
    with _ROTARY_LOCK:
        yield
    _sync_pending()


def fused_rotary_pos_emb(original, backend=None, partial: bool = False):
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` on the fused rotary
    op: ``q * cos + rotate_half(q) * sin`` with per-token (B, L, R) tables whose two halves are
    equal (every such rotary embedding builds them as cat(freqs, freqs)), so the first halves are
    the angles. Llama's form turns all D features (R = D); GPT-NeoX's (``partial``) the first R and
    passes the rest, as the fused op does by itself. One read and one write of q and of k, in
    float32, rounded once (transformers' formula rounds three times in half precision). Calls it
    does not cover (other layouts or shapes, tables that require grad, mixed dtypes) run
    ``original``. Its state (``fused_attn_patch``, a ``_RotaryPatch``) is read at each call:
    ``swap_rotary`` sets the backend its holders ask for."""
    from ..rotary import rotate_token_tables

    patch = _RotaryPatch(original, backend, partial)

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if _rotary_reason(q, k, cos, sin, unsqueeze_dim, partial) is not None:
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        if unsqueeze_dim == 1:  # (B, H, L, D): the (B, L, H, D) views and back
            return tuple(t.transpose(1, 2) for t in rotate_token_tables((q.transpose(1, 2), k.transpose(1, 2)), c, s,
                                                                        patch.backend))
        return rotate_token_tables((q, k), c, s, patch.backend)

    patch.fn = apply_rotary_pos_emb
    apply_rotary_pos_emb.fused_attn_original = original
    apply_rotary_pos_emb.fused_attn_patch = patch
    return apply_rotary_pos_emb


def _modeling_modules(model):
    """The transformers modeling modules the model's modules come from."""
    names = {type(m).__module__ for m in model.modules()}
    return [sys.modules[n] for n in sorted(names) if n.startswith("transformers.models.") and n in sys.modules]


def _known_rotary():
    """(module, partial) of the apply_rotary_pos_emb forms the fused op computes: Llama's (all D
    features) and GPT-NeoX's (the first R = cos.shape[-1], the rest passed)."""
    from transformers.models.gpt_neox import modeling_gpt_neox as gpt_neox
    return [(_known()[2], False), (gpt_neox, True)]


def _rotary_form(module) -> Optional[bool]:
    """``partial`` of the known form the module's apply_rotary_pos_emb and rotate_half have (the
    same code but for docstrings and decorators), or None."""
    for known, partial in _known_rotary():
        if (_same_body(module.apply_rotary_pos_emb, known.apply_rotary_pos_emb)
                and _same_body(getattr(module, "rotate_half", None), known.rotate_half)):
            return partial
    return None


def swap_rotary(model, opts, report, path: str = "") -> None:
    """Point each of the model's modeling modules whose ``apply_rotary_pos_emb`` (and the
    ``rotate_half`` it calls) is Llama's or GPT-NeoX's, the same code but for docstrings and
    decorators (Llama, Mistral, Mixtral, Qwen2/3, Gemma/2/3, Granite, Falcon, StableLM, GPT-NeoX,
    ...), to ``fused_rotary_pos_emb``. The function belongs to the module, not to the model: every
    model of that family in the process uses it. The model holds it (``_RotaryPatch``), as does
    each other model whose swap found it installed, until restored (``restore_rotary``) or
    collected; the last one gone puts the original back."""
    patched = model.__dict__.setdefault("_fused_attn_rotary", [])  # module names (the model pickles)
    with _rotary_locked():
        for module in _modeling_modules(model):
            fn = getattr(module, "apply_rotary_pos_emb", None)
            if fn is None:
                continue
            where = f"{module.__name__.rsplit('.', 1)[-1]}.apply_rotary_pos_emb"
            patch = getattr(fn, "fused_attn_patch", None)
            if patch is not None and patch.module is module:
                if patch.holds(model):
                    report.already.append((path, where, "fused rotary"))  # this model's own earlier swap
                else:
                    # another model's swap installed it: this one holds it too, so that the function does
                    # not outlive it, and runs on the first holder's backend (it is one function)
                    runs_on = patch.backend
                    patch.join(model, opts.backend)
                    report.already.append((path, where, f"fused rotary, by another model's swap_modules: "
                                           f"module-level, it runs on backend={runs_on!r} while that model "
                                           f"holds it"))
                if module.__name__ not in patched:
                    patched.append(module.__name__)
                continue
            if hasattr(fn, "fused_attn_original"):
                report.left.append((path, where, "already fused (not by swap_modules)"))
                continue
            partial = _rotary_form(module)
            if partial is None:
                report.left.append((path, where, "not Llama's or GPT-NeoX's apply_rotary_pos_emb (another layout or "
                                                 "rounding)"))
                continue
            fused = fused_rotary_pos_emb(fn, opts.backend, partial)
            fused.fused_attn_patch.module = module
            fused.fused_attn_patch.join(model, opts.backend)
            module.apply_rotary_pos_emb = fused
            if module.__name__ not in patched:
                patched.append(module.__name__)
            report.replaced.append((path, where, "fused_attn.apply_rotary_emb",
                                    ("partial " if partial else "") + "RoPE; module-level: every model of this family "
                                    "in the process"))
    if not patched:
        model.__dict__.pop("_fused_attn_rotary")


def restore_rotary(model, report, path: str = "") -> None:
    """Let go of the functions this model's swap installed or found installed; those no other live
    model holds are put back (the wrappers hold the originals). A copy of a swapped model
    (``copy.deepcopy``, or one loaded in the same process) lists them too, but holds none: its
    restore puts one back only where no model holds it any more. A model loaded in another process
    finds nothing patched there."""
    with _rotary_locked():
        for name in model.__dict__.pop("_fused_attn_rotary", []):
            module = sys.modules.get(name)
            patch = getattr(getattr(module, "apply_rotary_pos_emb", None), "fused_attn_patch", None)
            if patch is None or patch.module is not module:
                continue  # put back already (or replaced since by something else)
            patch.leave(model)
            where = f"{name.rsplit('.', 1)[-1]}.apply_rotary_pos_emb"
            if module.apply_rotary_pos_emb is patch.original:
                report.replaced.append((path, where, "apply_rotary_pos_emb", "transformers' own"))
            else:
                n = len(patch.holders)
                report.left.append((path, where, f"kept fused: {n} other model{'s' if n > 1 else ''} swapped it and "
                                                 f"hold{'' if n > 1 else 's'} it (put back when the last is restored "
                                                 f"or collected)"))


def _same_body(fn, known) -> bool:
    """Whether function ``fn`` has the known function's code: its signature and statements, as
    parsed, without docstrings and decorators (which differ between "copied from" models)."""
    import ast
    import textwrap

    def body(f):
        f = inspect.unwrap(getattr(f, "fused_attn_original", f))  # (a module another swap already fused)
        tree = ast.parse(textwrap.dedent(inspect.getsource(f)))
        node = tree.body[0]
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            # (getsource reads the file as it is now: one edited since its import gives other lines)
            raise TypeError("the source found is not the function's")
        node.decorator_list = []
        if node.body and isinstance(node.body[0], ast.Expr) and isinstance(getattr(node.body[0], "value", None),
                                                                         ast.Constant):
            node.body = node.body[1:]  # the docstring
        return ast.dump(node, annotate_fields=False)

    try:
        return fn is not None and body(fn) == body(known)
    except (OSError, TypeError, SyntaxError, IndexError):
        return False


# ---------------------------------------------------------------------------------------------
# norms and MLPs
# ---------------------------------------------------------------------------------------------

def activation_name(act) -> Optional[str]:
    """The fused activation equal to a transformers activation module, or None."""
    from ..swap import activation_name as torch_activation_name

    name = type(act).__name__
    if name == "GELUActivation":
        return "gelu"  # F.gelu, or its erf formula in Python
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"  # the same tanh formula (NewGELU spells it out in Python)
    if name == "SiLUActivation":
        return "silu"
    return torch_activation_name(act)


class _FalconLinear:
    """transformers' FalconLinear.forward (5.x), as read by ``linear_forward_equivalent``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        hidden_states = input @ self.weight.T
        if self.bias is None:
            return hidden_states
        return hidden_states + self.bias


@weak_cache
def linear_forward_equivalent(cls) -> bool:
    """Whether transformers' nn.Linear subclass ``cls`` has a forward known to compute nn.Linear's:
    FalconLinear's code (``input @ W.T``, then ``+ bias``: nn.Linear's product and sum, only
    rounded differently, the product rounded to the input's dtype before the bias is added).
    Read from the source, so that other code under that name (another transformers) is not
    taken for it."""
    return _same_body(getattr(cls, "forward", None), _FalconLinear.forward)


def _same_code(cls, method: str, known) -> bool:
    """Whether ``cls.method`` is, line for line, the known transformers implementation."""
    try:
        return inspect.getsource(getattr(cls, method)) == inspect.getsource(known)
    except (OSError, TypeError, AttributeError):
        return False


def _known():
    from transformers.models.bert import modeling_bert as bert
    from transformers.models.gpt2 import modeling_gpt2 as gpt2
    from transformers.models.llama import modeling_llama as llama
    return bert, gpt2, llama


def _dropout_p(drop) -> float:
    return drop.p if drop.training else 0.0


def _layer_norm(norm, x, residual, p, backend):
    x, residual = in_sum_dtype(x, residual)  # (post-LN: under autocast the stream stays float32)
    return layer_norm_residual(x, residual, norm.weight, norm.bias, norm.eps, dropout_p=p, backend=backend)


class FusedDenseDropoutNorm:
    """BERT's *SelfOutput / *Output: LayerNorm(dropout(dense(h)) + input) -> one fused add + norm."""

    def forward(self, hidden_states, input_tensor):
        # a child replaced (an adapter) or hooked since the swap, or an eps set to 0 or a p to 1
        # since (which torch takes and the fused norm refuses)
        p = _dropout_p(self.dropout)
        if not reads_intact(self) or not (fusable_eps(self.LayerNorm.eps) and fusable_p(p)):
            return super().forward(hidden_states, input_tensor)
        return _layer_norm(self.LayerNorm, self.dense(hidden_states), input_tensor, p, self.fused_attn_backend)


class FusedBertFeedForward:
    """BERT's *Layer.feed_forward_chunk: the FFN as one fused op, then one fused add + norm."""

    def feed_forward_chunk(self, attention_output):
        inter, out = self.intermediate, self.output
        act = activation_now(inter.intermediate_act_fn, activation_name)  # (as it is now: it may have changed)
        if act is None or not reads_intact(self):
            return super().feed_forward_chunk(attention_output)
        h = feed_forward(attention_output, inter.dense.weight, inter.dense.bias, out.dense.weight, out.dense.bias,
                         activation=act, backend=self.fused_attn_backend)
        p = _dropout_p(out.dropout)
        if self.fused_attn_norm and fusable_eps(out.LayerNorm.eps) and fusable_p(p):  # (either set so since the swap)
            return _layer_norm(out.LayerNorm, h, attention_output, p, self.fused_attn_backend)
        return out.LayerNorm(out.dropout(h) + attention_output)


class FusedGPT2MLP:
    """GPT-2's MLP; Conv1D stores weights as (in, out), nn.Linear's transpose."""

    def forward(self, hidden_states):
        act = activation_now(self.act, activation_name)
        if act is None or not reads_intact(self):
            return super().forward(hidden_states)
        h = feed_forward(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(), self.c_proj.bias,
                         activation=act, backend=self.fused_attn_backend)
        return self.dropout(h)


#: the gated activation of a Llama-family MLP's act_fn (its fused form), as feed_forward names it
GATED = {"silu": "swiglu", "gelu": "geglu"}

#: FusedLlamaMLP runs its module's own forward below this many tokens (None: the hidden size)
GATED_MLP_MIN_TOKENS: Optional[int] = None


class FusedLlamaMLP:
    """Llama's gated MLP as one fused FFN, activation swiglu (silu) or geglu (gelu), its gate and
    up weights passed as ``feed_forward``'s (w_gate, w_up) pair (stacked for each kernel call,
    not saved).

    Calls over fewer tokens than the hidden size (a decoding step, a short prompt) run the
    module's own forward: stacking the weights reads and writes 2·d_ff·d elements, more than the
    fusion saves on the activations (a few passes over tokens·d_ff elements) below tokens ≈ d.
    (``GATED_MLP_MIN_TOKENS`` sets another bound; None: the hidden size.) Under torch.compile and
    torch.export the choice is by whether a gradient is wanted instead: a branch on the token
    count would become a guard on the sequence length (export refused dynamic lengths across it,
    compile recompiled there). Training takes the fused op (its saved memory is the point);
    inference the module's own forward, whose activation the compiler fuses itself.
    """

    def forward(self, x):
        act = GATED.get(activation_now(self.act_fn, activation_name))
        if act is None or not reads_intact(self):
            return super().forward(x)
        if torch.compiler.is_compiling():
            if not _needs_grad(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight):
                return super().forward(x)
        else:
            d = x.shape[-1]
            min_tokens = d if GATED_MLP_MIN_TOKENS is None else GATED_MLP_MIN_TOKENS
            if x.numel() < d * min_tokens:
                return super().forward(x)
        w1 = (self.gate_proj.weight, self.up_proj.weight)
        b1 = None if self.gate_proj.bias is None else (self.gate_proj.bias, self.up_proj.bias)
        return feed_forward(x, w1, b1, self.down_proj.weight, self.down_proj.bias, activation=act,
                            backend=self.fused_attn_backend)


class FusedLlamaRMSNorm:
    """Llama's RMSNorm, ``weight * normalise(x in float32).to(x.dtype)``, as the fused norm.

    Its result has the dtype promote(weight, x), not x's: float32 for a float32 weight next to
    half-precision x (an fp32 model under autocast, whose q_norm/k_norm see half projections).
    The fused norm returns x's dtype, so where the dtypes differ it normalises without the weight
    (in x's dtype: the original's own rounding of the normalised row) and the weight multiplies
    that in PyTorch, as in the original, in the promoted dtype, with the original's gradients.

    float64 x runs the original forward: it normalises in float32 (rounding a float64 model's
    rows to float32 at every norm), where the fused norm computes in float64, 4e-7 away from the
    original at a tiny float64 Llama's output. So does a call the fused norm cannot take: an eps
    set to 0 since the swap, an input that is not a tensor (torch.fx's Proxy: traced through,
    as before the swap)."""

    def forward(self, hidden_states):
        if (not isinstance(hidden_states, torch.Tensor) or hidden_states.dtype == torch.float64
                or not fusable_eps(self.variance_epsilon)):
            return super().forward(hidden_states)
        if self.weight.dtype != hidden_states.dtype:
            return self.weight * layer_norm_residual(hidden_states, None, None, None, self.variance_epsilon,
                                                     rms=True, backend=self.fused_attn_backend)
        return layer_norm_residual(hidden_states, None, self.weight, None, self.variance_epsilon, rms=True,
                                   backend=self.fused_attn_backend)


def convert(module: nn.Module, opts):
    """swap_modules' converter for transformers modules (see ``fused_attn.swap``)."""
    from ..swap import Conversion, fused_subclass, norm_reason, wrapped_linear

    cls = type(module)
    bert, gpt2, llama = _known()
    backend = {"fused_attn_backend": opts.backend}
    children = dict(module.named_children())

    # BERT family: dense -> dropout -> LayerNorm(x + input)
    if (_same_code(cls, "forward", bert.BertSelfOutput.forward) and type(children.get("LayerNorm")) is nn.LayerNorm
            and type(children.get("dropout")) is nn.Dropout):
        if not opts.norm:
            return "norm=False"
        if norm_reason(children["LayerNorm"]):  # (an eps the fused norm refuses: layer_norm_eps=0)
            return norm_reason(children["LayerNorm"])
        return Conversion(fused_subclass(cls, FusedDenseDropoutNorm), backend, consumed=("LayerNorm",),
                          note="residual-add + LayerNorm", reads={"LayerNorm": nn.LayerNorm, "dropout": nn.Dropout})

    # BERT family: intermediate -> output, as one FFN
    if _same_code(cls, "feed_forward_chunk", bert.BertLayer.feed_forward_chunk):
        inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
        if not (_same_code(type(inter), "forward", bert.BertIntermediate.forward)
                and _same_code(type(out), "forward", bert.BertOutput.forward)):
            return "intermediate/output are not BERT's"
        if not opts.ffn:
            return "ffn=False"
        act = activation_name(inter.intermediate_act_fn)
        if act is None:
            return f"activation {type(inter.intermediate_act_fn).__name__} has no fused form"
        fuse_norm = (opts.norm and type(out.LayerNorm) is nn.LayerNorm and type(out.dropout) is nn.Dropout
                     and norm_reason(out.LayerNorm) is None)
        # (intermediate and output themselves too: the fused chunk runs neither one's forward, so
        # one replaced or given hooks since the swap must send the call to the unfused chunk)
        reads = {"intermediate": None, "output": None, "intermediate.dense": nn.Linear, "output.dense": nn.Linear,
                 "intermediate.intermediate_act_fn": None}
        if fuse_norm:
            reads.update({"output.LayerNorm": nn.LayerNorm, "output.dropout": nn.Dropout})
        return Conversion(fused_subclass(cls, FusedBertFeedForward),
                          {**backend, "fused_attn_norm": fuse_norm},
                          consumed=("intermediate", "output"), reads=reads,
                          note=f"FFN {act}" + (" + residual-add + LayerNorm" if fuse_norm else ""))

    # GPT-2's MLP over Conv1D children. The same forward over nn.Linear children (GPTBigCode's MLP)
    # is a plain chain whose weights need no transposing: the plain-MLP converter takes it.
    if _same_code(cls, "forward", gpt2.GPT2MLP.forward) and not any(
            type(c) is nn.Linear or wrapped_linear(c) for c in (children.get("c_fc"), children.get("c_proj"))):
        if not opts.ffn:
            return "ffn=False"
        act = activation_name(module.act)
        if act is None:
            return f"activation {type(module.act).__name__} has no fused form"
        return Conversion(fused_subclass(cls, FusedGPT2MLP), backend,
                          consumed=("c_fc", "c_proj"), note=f"FFN {act}, Conv1D weights transposed",
                          reads={"c_fc": gpt2.Conv1D, "c_proj": gpt2.Conv1D, "act": None})

    if _same_code(cls, "forward", llama.LlamaMLP.forward):
        if not opts.ffn:
            return "ffn=False"
        gated = GATED.get(activation_name(module.act_fn))
        if gated is None:
            return f"gated activation {type(module.act_fn).__name__} has no fused form"
        return Conversion(fused_subclass(cls, FusedLlamaMLP), backend,
                          consumed=("gate_proj", "up_proj", "down_proj"), note=f"FFN {gated}",
                          reads={"gate_proj": nn.Linear, "up_proj": nn.Linear, "down_proj": nn.Linear,
                                 "act_fn": None})

    if _same_code(cls, "forward", llama.LlamaRMSNorm.forward):
        if not opts.norm:
            return "norm=False"
        eps = module.variance_epsilon  # torch takes 0; the fused norm would raise at every call
        if not fusable_eps(eps):
            return f"eps={eps}: the fused norm takes a positive finite eps"
        return Conversion(fused_subclass(cls, FusedLlamaRMSNorm), backend, note="RMSNorm")
    return None


__all__ = ["register", "fused_attention_forward", "fused_attention_mask", "convert", "NAME"]
