"""Swapping the fused ops into existing models, in place, and undoing it.

    report = fused_attn.swap_modules(model)      # attention, norms and FFNs, where exact
    print(report)                                # what was replaced, what was left and why
    fused_attn.restore_modules(model)            # back to the original classes

How: each module that can be fused exactly gets its class changed to a fused subclass of its own
class (``module.__class__ = FusedX``) that overrides ``forward`` only. Nothing is copied or
re-created: the module object, its Parameters and buffers, their names, hooks, ``training`` flag
and every other attribute stay what they were, so a ``state_dict`` round-trips, optimisers keep
their state and tied weights stay tied. Restoring sets the class back. A module that is a target
but cannot be fused exactly (an unsupported activation, norm shape, bias_k, ...) is left as it
is and listed in the report with the reason; a fused forward that meets a call it cannot run
exactly (``need_weights=True``, unbatched or nested-tensor input) calls the original forward. So
does one whose children it reads (rather than calls) were replaced or hooked since the swap
(``reads_intact``): PEFT's LoRA layers wrap a Linear and add their product in their forward,
which reading the Linear's weight would skip. A swapped ``nn.Sequential`` whose children are no longer those it
was converted with (``append``, ``insert``, ``del``) runs ``nn.Sequential``'s forward too, and so
does a call meeting a dropout p or a norm eps set since the swap to a value the fused ops refuse
(p = 1, eps = 0: read at each call, as torch reads them). Under torch.fx's symbolic tracing the
swapped torch.nn modules are leaves, as the modules they replace were (``fx_leaf``).

Targets (one converter per family, tried in order):
- ``fused_attn.reference``: MultiHeadAttention, LayerNormResidual, FeedForward -> ``fused_attn.modules``;
- ``nn.Sequential(Linear, ReLU|GELU|SiLU, [Dropout], Linear)`` (the seed's FFN) -> one fused feed_forward;
- ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``, ``nn.TransformerDecoderLayer``,
  ``nn.TransformerEncoder``, ``nn.LayerNorm``, ``nn.RMSNorm``;
- Hugging Face models (BERT family, GPT-2, Llama family): see ``fused_attn.integrations.huggingface``;
- any module whose ``forward(self, x)`` only chains its children Linear -> activation ->
  [Dropout] -> Linear -> [Dropout] (read from its source: GPT-NeoX's, Phi's, Falcon's, GPT-J's and
  CLIP's MLPs, and such modules of one's own) -> one fused feed_forward.
"""
from __future__ import annotations

import ast
import functools
import inspect
import math
import textwrap
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.fx import Proxy

from . import modules as fused_modules
from . import reference
from .backends import check_backend_name
from .functional import (_check_bool, _counter_dropout, _finite, _shown, any_nested, attention, feed_forward,
                         layer_norm_residual, scaled_dot_product_attention)

#: instance attribute holding (original class, names of the attributes the swap added)
RESTORE_ATTR = "_fused_attn_restore"


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------

@dataclass
class SwapReport:
    """What ``swap_modules`` did: ``replaced`` rows (path, original class, fused class, note) and
    ``left`` rows (path, class, reason). Paths are ``named_modules`` names ("" is the root).
    ``restore_modules`` returns one with ``action="restore_modules"``, its ``replaced`` rows what
    it restored (path, fused class, original class, note)."""

    replaced: list[tuple[str, str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)
    action: str = "swap_modules"
    #: (path, class, note) of the modules an earlier swap fused: kept as they are, backend and options
    already: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        restore = self.action == "restore_modules"
        lines = [f"fused_attn.restore_modules: {len(self.replaced)} restored" if restore else
                 f"fused_attn.swap_modules: {len(self.replaced)} replaced, {len(self.left)} left"
                 + (f", {len(self.already)} already swapped" if self.already else "")]
        for path, old, new, note in self.replaced:
            lines.append(f"  {'restored' if restore else 'replaced'} {path or '<root>'}: {old} -> {new}"
                         + (f" ({note})" if note else ""))
        for path, cls, why in self.left:
            lines.append(f"  left     {path or '<root>'}: {cls}: {why}")
        for path, cls, note in self.already:
            lines.append(f"  already  {path or '<root>'}: {cls} ({note})")
        if self.already:
            lines.append("  (modules swapped before keep their backend and options: restore_modules(model), then "
                         "swap_modules(model, ...) to change them)")
        return "\n".join(lines)


@dataclass(frozen=True)
class SwapOptions:
    attention: bool = True
    norm: bool = True
    ffn: bool = True
    backend: Optional[str] = None
    rotary: bool = True


@dataclass
class Conversion:
    """A converter's answer for a module it can fuse exactly."""

    cls: type                                   # the fused subclass of type(module)
    attrs: dict = field(default_factory=dict)   # instance attributes its forward reads
    consumed: tuple = ()                        # children its forward runs itself (not visited)
    note: str = ""                              # shown in the report
    reads: dict = field(default_factory=dict)   # child path -> the class whose forward reading its
                                                # parameters reproduces (``reference.reads_as_called``),
                                                # or None: only checked unchanged at each call


#: converter(module, options) -> Conversion (fuse it), str (a target left as it is, and why) or None
Converter = Callable[[nn.Module, SwapOptions], Union[Conversion, str, None]]


# ---------------------------------------------------------------------------------------------
# helpers shared by the converters
# ---------------------------------------------------------------------------------------------

def activation_name(act) -> Optional[str]:
    """The fused activation equal to ``act`` (a function or module), or None."""
    if act is F.relu or act is torch.relu or type(act) is nn.ReLU:
        return "relu"
    if act is F.gelu or (type(act) is nn.GELU and act.approximate == "none"):
        return "gelu"
    if type(act) is nn.GELU and act.approximate == "tanh":
        return "gelu_tanh"
    if act is F.silu or type(act) is nn.SiLU:
        return "silu"
    return None


def activation_now(act, name_of: Callable = None) -> Optional[str]:
    """At each call of a swapped FFN: the fused form of its activation as it is now, or None (run
    it unfused). The activation can change after the swap without the children's classes
    changing: a function attribute (``layer.activation = F.gelu``), a module's setting
    (``approximate``), a module put in place of a function, which may have hooks the fused op
    would skip. Identity and type checks only: about a microsecond. ``name_of``: the activation's
    fused name (default ``activation_name``; transformers' integration knows its classes too)."""
    if isinstance(act, nn.Module) and not reference.reads_as_called(act, type(act)):
        return None
    return (name_of or activation_name)(act)


def norm_reason(norm) -> Optional[str]:
    """Why ``norm`` cannot run as the fused norm (None when it can)."""
    if type(norm) not in (nn.LayerNorm, nn.RMSNorm, FusedLayerNorm, FusedRMSNorm):
        return f"norm is {type(norm).__name__}, not LayerNorm/RMSNorm"
    if len(norm.normalized_shape) != 1:
        return f"normalized_shape {tuple(norm.normalized_shape)} spans several dims"
    if not fusable_eps(norm.eps, none_ok=True):
        return f"eps={_shown(norm.eps)}: the fused norm takes a positive finite eps"
    return None


def fusable_eps(eps, none_ok: bool = False) -> bool:
    """Whether the fused norm takes ``eps``: a positive finite number (nn.RMSNorm's None too, with
    ``none_ok``). torch's norms also take eps=0 (or less), which the fused norm refuses: such a
    norm is left at the swap, and a swapped one whose eps is set so since runs torch's forward
    (``eps`` is read at each call, as torch reads it; _finite: an int too large for a float is
    not finite there, where math.isfinite raised OverflowError)."""
    if type(eps) is float:  # the common case, first: it is checked at each call
        return 0.0 < eps < math.inf
    if eps is None:
        return none_ok
    return not isinstance(eps, bool) and isinstance(eps, (int, float)) and eps > 0 and _finite(eps)


def norm_eps(norm, x: Tensor) -> float:
    if isinstance(norm, nn.RMSNorm) and norm.eps is None:
        # nn.RMSNorm's default: its docs say finfo(x.dtype).eps, but its kernel takes the eps of
        # the type it computes in (float32 for half precision: 1.2e-7 where bfloat16's is 7.8e-3,
        # which moved small activations' outputs by whole units)
        return torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    return norm.eps


def fused_norm(norm, x: Tensor, residual: Optional[Tensor] = None, *, dropout_p: float = 0.0,
               prenorm: bool = False, backend: Optional[str] = None):
    """norm(dropout(x) + residual) with the parameters of an nn.LayerNorm / nn.RMSNorm."""
    return layer_norm_residual(x, residual, norm.weight, getattr(norm, "bias", None), norm_eps(norm, x),
                               dropout_p=dropout_p, prenorm=prenorm, rms=isinstance(norm, nn.RMSNorm), backend=backend)


def in_sum_dtype(branch: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """A post-LN block's ``norm(residual + branch)`` operands in the dtype of their sum. Under
    autocast the branch (a linear's output) is half precision and the residual stream float32:
    torch adds them in float32 and its norm returns float32, so the stream stays float32 from
    layer to layer. The fused norm returns x's dtype, which would round the stream to half
    precision at every layer (about 60x the error of the original through a BERT)."""
    if branch.dtype == residual.dtype:
        return branch, residual
    dtype = torch.promote_types(branch.dtype, residual.dtype)
    return branch.to(dtype), residual.to(dtype)


def dropout_p(drop: nn.Module) -> float:
    return drop.p if drop.training else 0.0


def dropout_reason(name: str, p) -> Optional[str]:
    """Why a dropout probability cannot run fused (None when it can). torch's dropout also takes
    p = 1 (it zeroes everything); the fused ops take p in [0, 1) and would raise at every training
    call of a swapped module, so such a module is left as it is."""
    if not fusable_p(p):
        return f"{name}={_shown(p)}: the fused ops take a dropout probability in [0, 1)"
    return None


def fusable_p(p) -> bool:
    """Whether the fused ops take dropout probability ``p``: in [0, 1). At each call of a swapped
    module its effective p (``dropout_p``: 0 in eval) is checked, a p set to 1 since the swap
    sending the call to the original forward (which zeroes everything, as torch does)."""
    if type(p) is float:  # the common case, first: it is checked at each call
        return 0.0 <= p < 1.0
    return not isinstance(p, bool) and isinstance(p, (int, float)) and 0 <= p < 1


# ---------------------------------------------------------------------------------------------
# fused torch.nn classes (each a subclass of the class it replaces; forward only)
# ---------------------------------------------------------------------------------------------

def _norm_repr(norm) -> str:
    opts = {"hidden": norm.normalized_shape[0], "rms": isinstance(norm, nn.RMSNorm), "dropout": False,
            "residual_in_fp32": False}
    backend = fused_modules.backend_in_use(norm.fused_attn_backend, "layer_norm_residual", norm.weight, opts)
    return f"backend={backend}"


def fx_leaf(module: nn.Module, forward: Callable, *args, **kwargs):
    """A swapped torch.nn module's call under torch.fx's symbolic tracing (``args[0]`` a Proxy):
    one ``call_module`` node, as FX records the torch.nn module it replaced. FX makes leaves of
    the modules whose class comes from torch.nn (but Sequential) and traces through the others,
    the fused classes among them, whose ops take no Proxy, and where torch's own forward (a
    MultiheadAttention's, a layer's) branches on its inputs, which tracing refuses. The graph
    calls the module: fused, as the swapped model runs it. The root of the trace is traced
    through its original ``forward``, as FX traces any root (a root's call cannot be a node)."""
    tracer = args[0].tracer
    if module is tracer.root:
        return forward(*args, **kwargs)
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, kwargs)


class FusedLayerNorm(nn.LayerNorm):
    # (``input``: nn.LayerNorm's parameter name, so that ``norm(input=x)`` works swapped too)
    def forward(self, input):
        if not isinstance(input, Tensor) or input.is_nested or input.dim() == 0 or \
                input.shape[-1] != self.normalized_shape[0] or not fusable_eps(self.eps):
            # torch's norm takes nested tensors and eps=0, and says what it takes otherwise
            # (without weights the fused norm had no size to hold x to, and normalised a wrong x
            # over its last dim)
            if isinstance(input, Proxy):
                return fx_leaf(self, super().forward, input)
            return super().forward(input)
        return fused_norm(self, input, backend=self.fused_attn_backend)

    def extra_repr(self):
        return f"{super().extra_repr()}, {_norm_repr(self)}"


class FusedRMSNorm(nn.RMSNorm):
    def forward(self, x):
        if not isinstance(x, Tensor) or x.is_nested or x.dim() == 0 or \
                x.shape[-1] != self.normalized_shape[0] or not fusable_eps(self.eps, none_ok=True):
            # (as FusedLayerNorm's)
            if isinstance(x, Proxy):
                return fx_leaf(self, super().forward, x)
            return super().forward(x)
        return fused_norm(self, x, backend=self.fused_attn_backend)

    def extra_repr(self):
        return f"{super().extra_repr()}, {_norm_repr(self)}"


class FusedSequentialFFN(nn.Sequential):
    """Sequential(Linear, activation, [Dropout], Linear) as one fused feed_forward. A slice of it
    is an nn.Sequential of those children (``ffn[:-1]``: the hidden features), as torch's."""

    def forward(self, input):  # (nn.Sequential's parameter name: ``ffn(input=x)`` works swapped too)
        # The container as converted (the same children, in order; an append or insert since
        # would otherwise be skipped), none replaced (an adapter) or hooked since the swap.
        # Under torch.fx's tracing (a Proxy), nn.Sequential's forward: FX traces a Sequential
        # through, its children the graph's nodes, as it did before the swap.
        if (not isinstance(input, Tensor) or list(self._modules) != list(self.__dict__[READS_ATTR])
                or not reads_intact(self)):
            return super().forward(input)
        children = list(self._modules.values())
        act = activation_now(children[1])  # (its settings may have changed since the swap)
        p = dropout_p(children[2]) if len(children) == 4 else 0.0
        if act is None or not fusable_p(p):  # (a p set to 1 since the swap: torch's dropout zeroes all)
            return super().forward(input)
        first, last = children[0], children[-1]
        return feed_forward(input, first.weight, first.bias, last.weight, last.bias,
                            activation=act, dropout_p=p, backend=self.fused_attn_backend)

    def __getitem__(self, idx):
        # torch's slice is ``self.__class__(...)``: here a FusedSequentialFFN the swap never set
        # up (its forward failed on the missing attributes, and restore_modules passed it over)
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


class FusedPlainMLP:
    """A module whose forward chains Linear -> activation -> [Dropout] -> Linear -> [Dropout], as
    one fused feed_forward (the middle dropout inside it) and its own final dropout. The layout
    is read again at each call (a dict lookup for the source, cached per forward function): a
    child replaced since the swap, or given hooks, sends the call to the module's own forward.

    The forward takes what the original takes: its one input by position or under the original's
    own parameter name (GPT-NeoX's ``hidden_states``, Falcon's ``x``); any other call runs the
    original forward, which raises what it raises."""

    def forward(self, *args, **kwargs):
        # children may have been replaced since the swap. (The layout is read from the original
        # class's forward: the fused class's own __dict__ has none, so reading type(self) found
        # no chain and every call ran the unfused forward.)
        cls = self.__dict__[RESTORE_ATTR][0]
        x = _sole_input(args, kwargs, forward_input(cls))
        layout = None if x is None else _plain_mlp_layout(self, cls=cls)
        act = None if layout is None else plain_mlp_activation(self._modules[layout["act"]])
        if act is None or _hook_reason(self, tuple(n for n in layout.values() if n)) is not None:
            return super().forward(*args, **kwargs)  # the module's own forward, as it now reads
        p = dropout_p(self._modules[layout["middle"]]) if layout["middle"] else 0.0
        if not fusable_p(p):  # (set to 1 since the swap)
            return super().forward(*args, **kwargs)
        l1, l2 = self._modules[layout["first"]], self._modules[layout["second"]]
        h = feed_forward(x, l1.weight, l1.bias, l2.weight, l2.bias, activation=act, dropout_p=p,
                         backend=self.fused_attn_backend)
        return self._modules[layout["last"]](h) if layout["last"] else h


def _sole_input(args: tuple, kwargs: dict, name: Optional[str]) -> Optional[Tensor]:
    """The tensor a plain chain's ``forward(self, <name>)`` is called with: its one positional
    argument, or the keyword ``name``; None for any other call (no input, more arguments, another
    keyword, not a tensor: the original forward says what it says of it)."""
    if len(args) == 1 and not kwargs:
        x = args[0]
    elif not args and len(kwargs) == 1 and name is not None and name in kwargs:
        x = kwargs[name]
    else:
        return None
    return x if isinstance(x, Tensor) else None


#: cls -> {mixin: fused_subclass(cls, mixin)}, while that subclass lives. Weak both ways: a strong
#: entry kept every class ever swapped alive (the user's classes, made per call, with whatever their
#: methods' closures and globals hold) after its models were deleted. The subclass lives as long
#: as its instances (or whoever holds it); once none is left, a later swap or unpickling makes the
#: pair's subclass again. (Not a WeakValueDictionary keyed on (cls, mixin): its key held cls until
#: the subclass's callback ran, so a model's classes outlived the gc.collect() that freed it.)
_SUBCLASSES_LOCK = threading.Lock()
_SUBCLASSES: "weakref.WeakKeyDictionary[type, weakref.WeakValueDictionary[type, type]]" = weakref.WeakKeyDictionary()


def fused_subclass(cls: type, mixin: type) -> type:
    """``Fused<cls>``: the mixin's methods over ``cls``, one per pair while it is in use. Such classes
    exist only once a swap made them, so their instances pickle as "this pair's subclass, and this
    state" (``_rebuild_fused``): a swapped model saved with torch.save loads in a fresh process."""
    with _SUBCLASSES_LOCK:  # (threads swapping one class at once: each would make its own)
        made = _SUBCLASSES.setdefault(cls, weakref.WeakValueDictionary())
        fused = made.get(mixin)
        if fused is None:
            name = f"Fused{cls.__name__}"
            namespace = {"__module__": __name__, "__qualname__": name, "__reduce_ex__": _reduce_fused}
            if mixin is FusedPlainMLP:
                namespace["forward"] = _plain_mlp_forward(cls, name)
            fused = made[mixin] = type(name, (mixin, cls), namespace)
        return fused


def _plain_mlp_forward(cls: type, name: str):
    """FusedPlainMLP's forward (which takes any arguments: the input's name is the original's)
    under the signature of ``cls.forward``, for what reads it: ``inspect.signature``, and
    torch.export, whose ``dynamic_shapes`` name the forward's parameters (``{"x": {1: length}}``;
    with ``(*args, **kwargs)`` it wanted ``{"args": ...}``)."""
    def forward(self, *args, **kwargs):
        return FusedPlainMLP.forward(self, *args, **kwargs)

    forward.__qualname__ = f"{name}.forward"
    try:
        forward.__signature__ = inspect.signature(cls.forward)
    except (TypeError, ValueError):  # (no signature to read: the forward's own arguments still apply)
        pass
    return forward


def _reduce_fused(self, protocol):
    if type(self).__dict__.get("__reduce_ex__") is not _reduce_fused:
        # a class made over the fused one since (torch.nn.utils.parametrize's Parametrized...,
        # whose __getstate__ raises torch's "only supported through state_dict()"; it was taken
        # for the fused class, whose two bases it lacks: "not enough values to unpack"): pickled
        # as any object, which gives what pickling that class gives
        return object.__reduce_ex__(self, protocol)
    mixin, cls = type(self).__bases__
    return _rebuild_fused, (cls, mixin), self.__getstate__()


def _rebuild_fused(cls: type, mixin: type):
    if cls.__module__.startswith("transformers."):  # the loaded model's config names "fused_attn" attention
        from .integrations import huggingface
        huggingface.register()
    return object.__new__(fused_subclass(cls, mixin))


# (torch.compile runs it when tracing and keeps the answer: it reads source, which dynamo cannot trace)
@torch.compiler.assume_constant_result
def forward_chain(cls: type) -> Optional[tuple]:
    """The names of the children ``cls.forward(self, x)`` applies one after another to x, read
    from its source, when that is all it does (statements ``h = self.a(x)`` ... ``return
    self.c(h)``, calls nested or not, a docstring allowed); None for anything else, and for a
    forward the class inherits (read per function object: a forward replaced later is read anew)."""
    read = _read_forward(cls)
    return None if read is None else read[1]


@torch.compiler.assume_constant_result
def forward_input(cls: type) -> Optional[str]:
    """The name of the one parameter of ``cls.forward(self, x)`` when ``forward_chain`` reads a
    chain from it (the swapped module takes its input by that name too), else None."""
    read = _read_forward(cls)
    return None if read is None else read[0]


def _read_forward(cls: type) -> Optional[tuple]:
    fn = cls.__dict__.get("forward")
    return _chain_of(fn) if inspect.isfunction(fn) else None


def weak_cache(compute: Callable) -> Callable:
    """``compute(key)`` (key: a function or a class) remembered while ``key`` lives. For the
    answers read from a class's or a function's source: ``functools.lru_cache`` held each key
    strongly, and with it the user's classes and functions the swap inspected, and everything they
    reference (closures, globals, the tensors in them), after their models were deleted. Keyed on the
    object, not its ``__code__``: the answer also reads its ``__name__`` and ``__wrapped__``."""
    memo = weakref.WeakKeyDictionary()

    @functools.wraps(compute)
    def cached(key):
        try:
            return memo[key]
        except KeyError:
            value = memo[key] = compute(key)
            return value
        except TypeError:  # (not weakly referenceable: answered, not remembered)
            return compute(key)

    cached.cache_clear = memo.clear
    return cached


@weak_cache
def _chain_of(fn) -> Optional[tuple]:
    """(the input's parameter name, the chain of children's names) of a forward, or None."""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except Exception:  # no source (a REPL, a lambda in an expression), or source that is not the function
        return None
    if not isinstance(node, ast.FunctionDef) or node.name != fn.__name__:
        return None
    args = node.args
    if (len(args.args) != 2 or args.vararg or args.kwarg or args.kwonlyargs or args.posonlyargs or args.defaults
            or node.decorator_list):
        return None
    self_name, x_name = args.args[0].arg, args.args[1].arg
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    env = {x_name: ()}

    def chain(expr):
        if isinstance(expr, ast.Name):
            return env.get(expr.id)
        if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and len(expr.args) == 1
                and not expr.keywords and isinstance(expr.func.value, ast.Name) and expr.func.value.id == self_name):
            inner = chain(expr.args[0])
            return None if inner is None else inner + (expr.func.attr,)
        return None

    if not body or not isinstance(body[-1], ast.Return) or body[-1].value is None:
        return None
    for stmt in body[:-1]:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            return None
        value = chain(stmt.value)
        if value is None:
            return None
        env[stmt.targets[0].id] = value
    names = chain(body[-1].value)
    return None if names is None else (x_name, names)


def wrapped_linear(module) -> bool:
    """A Linear wrapped by an adapter, PEFT's way (the Linear as ``base_layer``): a target to
    report as left, not to fuse."""
    return type(getattr(module, "base_layer", None)) is nn.Linear


def linear_like(module) -> bool:
    """Whether calling ``module`` computes nn.Linear's forward from its ``weight`` and ``bias``, so
    that a fused op may read them instead: an nn.Linear, a subclass that keeps nn.Linear's forward
    (torch's NonDynamicallyQuantizableLinear, a parametrized Linear: its hooks and
    parametrizations are checked apart), or one whose forward is a known equivalent (transformers'
    FalconLinear: ``x @ W.T``, then ``+ b``). Not a subclass with another forward (a quantized
    linear, a router): reading its weight would skip that forward."""
    if not isinstance(module, nn.Linear):
        return False
    return type(module).forward is nn.Linear.forward or _equivalent_linear_forward(type(module))


# (torch.compile runs it when tracing and keeps the answer: it reads source)
@torch.compiler.assume_constant_result
def _equivalent_linear_forward(cls: type) -> bool:
    if not cls.__module__.startswith("transformers."):
        return False
    from .integrations.huggingface import linear_forward_equivalent
    return linear_forward_equivalent(cls)


def _linear_reads(module: nn.Module, names) -> dict:
    """``Conversion.reads`` of the linears a fused FFN reads: each one's own class where it is
    ``linear_like`` (kept checked at each call), else nn.Linear, which ``_read_reason`` then
    reports as a forward the fused op would skip (an adapter's, a quantized linear's)."""
    return {n: type(module._modules[n]) if linear_like(module._modules[n]) else nn.Linear for n in names}


def _plain_mlp_layout(module: nn.Module, wrapped_ok: bool = False, cls: Optional[type] = None) -> Optional[dict]:
    """The names of the children a forward chains as Linear, activation, [Dropout], Linear,
    [Dropout] (keys first, act, middle, second, last; the dropouts None when absent), or None.
    Linears: ``linear_like`` children. ``wrapped_ok``: Linears wrapped by an adapter and nn.Linear
    subclasses with a forward of their own count too (to say why it is left, rather than pass
    over a quantized or adapted MLP in silence). ``cls``: the class whose forward is read
    (default: the module's)."""
    names = forward_chain(cls or type(module))
    if names is None or len(set(names)) != len(names):
        return None
    children = [module._modules.get(n) for n in names]
    pattern = "".join("L" if linear_like(c) or (wrapped_ok and (isinstance(c, nn.Linear) or wrapped_linear(c)))
                      else "D" if type(c) is nn.Dropout else "A" if c is not None else "?" for c in children)
    if pattern not in ("LAL", "LADL", "LALD", "LADLD"):
        return None
    middle = names[2] if pattern.startswith("LAD") else None
    return {"first": names[0], "act": names[1], "middle": middle, "second": names[3] if middle else names[2],
            "last": names[-1] if pattern.endswith("LD") else None}


def plain_mlp_activation(act_module) -> Optional[str]:
    """The fused activation of a plain MLP's activation child: torch's modules, and transformers'
    activation classes when the module comes from transformers (those are known by name)."""
    if type(act_module).__module__.startswith("transformers."):
        from .integrations.huggingface import activation_name as transformers_activation_name
        return transformers_activation_name(act_module)
    return activation_name(act_module)


def _hook_reason(module: nn.Module, names: tuple) -> Optional[str]:
    """Why the fused forward, which reads these children's parameters without calling them,
    would skip something they do: forward or backward hooks (weight_norm's pre-hook among them:
    ``reference.hook_kind``) or parametrizations. None when they have none."""
    for name in names:
        child = module._modules.get(name)
        if child is None:
            continue
        kind = reference.hook_kind(child)
        if kind:
            return f"child {name!r} has {kind}, which the fused forward would skip"
        if hasattr(child, "parametrizations"):
            return f"child {name!r} is parametrized, which the fused forward would skip"
    return None


#: instance attribute: {child path: class} of the children a fused forward reads, as the swap saw them
READS_ATTR = "_fused_attn_reads"


def _child(module: nn.Module, path: str) -> Optional[nn.Module]:
    for part in path.split("."):
        module = None if module is None else module._modules.get(part)
    return module


def _read_reason(module: nn.Module, reads: dict) -> Optional[str]:
    """Why the fused forward could not read these children's parameters in place of calling
    them (None when it can): a child whose forward is not the expected class's (an adapter
    such as PEFT's LoRA, which wraps the layer and adds its product; a quantized layer), or one
    with hooks (``reference.hook_kind``), which ``reads_intact`` would send every call of the
    fused forward to the unfused one for: the report says so rather than call it fused."""
    for path, cls in reads.items():
        child = _child(module, path)
        if child is None:
            continue
        if cls is not None and getattr(type(child), "forward", None) is not cls.forward:
            return (f"child {path!r} is {type(child).__module__}.{type(child).__qualname__}, whose forward is not "
                    f"{cls.__name__}'s (an adapter such as LoRA, or a quantized layer): the fused forward reads its "
                    f"parameters and would skip it")
        kind = reference.hook_kind(child)
        if kind:
            return f"child {path!r} has {kind}, which the fused forward would skip"
    return None


def reads_intact(module: nn.Module, *paths: str) -> bool:
    """At each call: whether the children a fused forward reads (``paths``, or all it reads)
    are still of the classes the swap saw, without hooks (forward or backward:
    ``reference.hook_kind``). A child replaced since, as PEFT's
    ``get_peft_model`` replaces a targeted Linear by its LoRA layer after a swap, or given a hook,
    sends the call to the unfused forward, which calls it."""
    seen = module.__dict__.get(READS_ATTR, {})
    for path in paths or seen:
        child = _child(module, path)
        if type(child) is not seen[path] or (child is not None and not reference.reads_as_called(child, type(child))):
            return False
    return True


def _convert_plain_mlp(module, opts):
    layout = _plain_mlp_layout(module, wrapped_ok=True)
    if layout is None:
        return None
    act_module = module._modules[layout["act"]]
    act = plain_mlp_activation(act_module)
    if act is None:
        return f"activation {type(act_module).__name__} has no fused form"
    if not opts.ffn:
        return "ffn=False"
    # (the last dropout is called as it is; the middle one runs inside the fused op)
    why = dropout_reason(f"{layout['middle']} p", module._modules[layout["middle"]].p) if layout["middle"] else None
    if why:
        return why
    return Conversion(fused_subclass(type(module), FusedPlainMLP), {"fused_attn_backend": opts.backend},
                      consumed=tuple(n for n in layout.values() if n),
                      reads=_linear_reads(module, (layout["first"], layout["second"])),
                      note=f"FFN {act} ({layout['first']} -> {layout['second']}, read from its forward)")


class FusedMultiheadAttention(nn.MultiheadAttention):
    """torch's MultiheadAttention on the fused attention op (the ``need_weights=False`` path;
    calls asking for the weights, unbatched or nested inputs run torch's own forward).

    Masks keep torch's meaning: a bool ``attn_mask``/``key_padding_mask`` marks with True the
    positions NOT to attend (the opposite of fused_attn's keep-masks, so they are inverted here);
    float masks are added to the scores. ``is_causal`` is the same hint as in torch: with no key
    padding mask, the causal flag replaces ``attn_mask``. Masks torch refuses (other dtypes or
    shapes) raise as in torch (``check_torch_mha_masks``).
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if isinstance(query, Proxy):  # torch.fx's tracing
            return fx_leaf(self, super().forward, query, key, value, key_padding_mask=key_padding_mask,
                           need_weights=need_weights, attn_mask=attn_mask,
                           average_attn_weights=average_attn_weights, is_causal=is_causal)
        p = self.dropout if self.training else 0.0
        if (need_weights or query.dim() != 3 or query.is_nested or key.is_nested or value.is_nested
                or not fusable_p(p)):  # (a dropout set to 1 since the swap: torch's zeroes all)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        check_torch_mha_inputs(query, key, value, self.batch_first, self._qkv_same_embed_dim)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as torch.nn.MultiheadAttention)")
        same_qkv, same_kv = query is key and key is value, key is value
        if not self.batch_first:  # (L, B, E) -> (B, L, E) views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, Lq, E = query.shape
        Lk = key.shape[1]
        if E != self.embed_dim:  # torch's check and message (the projection failed: "mat1 and mat2 shapes ...")
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {E}")
        # with the is_causal hint and no padding mask torch drops attn_mask unread (but its dtype and dims)
        causal = bool(is_causal) and key_padding_mask is None
        check_torch_mha_masks(attn_mask, key_padding_mask, B, self.num_heads, Lq, Lk, attn_mask_used=not causal)
        q, k, v = self._in_projection(query, key, value, same_qkv, same_kv)
        H, D = self.num_heads, self.head_dim
        q = q.unflatten(-1, (H, D)).transpose(1, 2)
        k = k.unflatten(-1, (H, D)).transpose(1, 2)
        v = v.unflatten(-1, (H, D)).transpose(1, 2)
        mask = None if causal else torch_masks_to_keep_or_additive(attn_mask, key_padding_mask, B, H, Lq, Lk, q.dtype)
        out = attention(q, k, v, attn_mask=mask, causal=causal, dropout_p=p, backend=self.fused_attn_backend)
        out = out.transpose(1, 2)  # (B, H, Lq, D) stored as (B, Lq, H, D): a view
        # seq-first: into torch's contiguous (Lq, B, E) layout before the projection (one copy of
        # its input, where transposing its output would return a non-contiguous tensor)
        out = out.reshape(B, Lq, E) if self.batch_first else out.transpose(0, 1).reshape(Lq, B, E)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), None

    def extra_repr(self) -> str:
        opts = {"head_dim": self.head_dim, "head_dim_v": self.head_dim, "causal": False, "dropout": self.dropout > 0,
                "gqa": False, "mask": None, "mask_grad": False}
        weight = self.in_proj_weight if self.in_proj_weight is not None else self.q_proj_weight
        backend = fused_modules.backend_in_use(self.fused_attn_backend, "attention", weight, opts)
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, " \
               f"backend={backend}"

    def _in_projection(self, query, key, value, same_qkv, same_kv):
        """torch's in-projection: one matmul for Q, K, V of one tensor, one for K, V of one memory."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(E)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if same_qkv:
            return F.linear(query, w, b).split(E, dim=-1)
        wq, wk, wv = w.split(E)
        if same_kv:
            k, v = F.linear(key, w[E:], None if b is None else b[E:]).split(E, dim=-1)
            return F.linear(query, wq, bq), k, v
        return F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)


def check_torch_mha_inputs(query: Tensor, key: Tensor, value: Tensor, batch_first: bool, same_embed_dim: bool) -> None:
    """torch's checks of a batched call's key and value (``F._mha_shape_check`` and
    ``F.multi_head_attention_forward``: their AssertionErrors and texts, on the (L, B, E) shapes
    torch quotes), and one torch lacks: a key whose batch is not the query's failed in torch's
    reshape of the projected key ("shape '[7, 8, 4]' is invalid"), past the head split here."""
    if key.dim() != 3 or value.dim() != 3:
        raise AssertionError(f"For batched (3-D) `query`, expected `key` and `value` to be 3-D but found "
                             f"{key.dim()}-D and {value.dim()}-D tensors respectively")
    passed = tuple(key.shape)
    if batch_first:
        key, value = key.transpose(0, 1), value.transpose(0, 1)
    if same_embed_dim and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    if key.shape[:2] != value.shape[:2]:
        raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
    batch = query.shape[0 if batch_first else 1]
    if key.shape[1] != batch:
        raise ValueError(f"key and value must have query's batch size {batch}, got {key.shape[1]} (key {passed}, "
                         f"query {tuple(query.shape)}, batch_first={batch_first})")


def check_mask_dtype(mask: Optional[Tensor], name: str) -> None:
    """torch's check of a mask's dtype (``F._canonical_mask``, with its AssertionError): bool or
    floating. Another dtype (an old-style uint8 mask, int64) would be read as an additive mask."""
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise AssertionError(f"only bool and floating types of {name} are supported, got {mask.dtype}")


def check_torch_mha_masks(attn_mask, key_padding_mask, B, H, Lq, Lk, attn_mask_used=True) -> None:
    """The checks torch.nn.MultiheadAttention makes of its masks (``F._canonical_mask``,
    ``F._mha_shape_check``, ``F.multi_head_attention_forward``), raising the exception types torch
    raises. Without them the swapped module read masks torch refuses some other way and gave a
    wrong answer: a (S, B) key_padding_mask viewed as (B, S), a (1, S) or 4-D attn_mask broadcast.
    ``attn_mask_used=False`` where torch drops attn_mask for the is_causal hint: its dtype and
    dims are still checked, not its shape (as torch does)."""
    check_mask_dtype(key_padding_mask, "key_padding_mask")
    check_mask_dtype(attn_mask, "attn_mask")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, Lk):
        raise AssertionError(f"key_padding_mask must be (batch, source length) = {(B, Lk)}, got "
                             f"{tuple(key_padding_mask.shape)}")
    if attn_mask is None:
        return
    if attn_mask.dim() not in (2, 3):
        raise AssertionError(f"attn_mask must be 2-D (target length, source length) = {(Lq, Lk)} or 3-D "
                             f"(batch * num_heads, target length, source length) = {(B * H, Lq, Lk)}, got "
                             f"{attn_mask.dim()}-D {tuple(attn_mask.shape)}")
    expected = (Lq, Lk) if attn_mask.dim() == 2 else (B * H, Lq, Lk)
    if attn_mask_used and tuple(attn_mask.shape) != expected:
        raise RuntimeError(f"the shape of the {attn_mask.dim()}-D attn_mask is {tuple(attn_mask.shape)}, but should "
                           f"be {expected}")


def torch_masks_to_keep_or_additive(attn_mask, key_padding_mask, B, H, Lq, Lk, dtype):
    """torch.nn.MultiheadAttention's masks (bool True = masked, or additive; attn_mask (Lq, Lk) or
    (B*H, Lq, Lk); key_padding_mask (B, Lk)) as one fused_attn mask broadcastable to (B, H, Lq, Lk):
    a bool keep-mask when both are bool, else an additive mask in ``dtype``."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.view(B, H, Lq, Lk) if attn_mask.dim() == 3 else attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(B, 1, 1, Lk))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        for m in masks[1:]:
            keep = keep & ~m
        return keep
    additive = [torch.zeros((), dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
                if m.dtype == torch.bool else m.to(dtype) for m in masks]
    total = additive[0]
    for m in additive[1:]:
        total = total + m
    return total


class _FusedResidualLayer:
    """The residual blocks of torch's encoder/decoder layers with the fused norms and FFN.

    post-LN:  x = norm_i(x + dropout_i(branch_i(x)))       -> layer_norm_residual(branch, x)
    pre-LN:   x = x + dropout_i(branch_i(norm_i(x)))       -> the add and the next norm in one
              layer_norm_residual(branch, x, prenorm=True); the last add is a plain add.
    Set on the instance by the swap: fused_attn_norm (bool), fused_attn_activation (str, the
    activation's fused form at the swap, or None: the FFN stays torch's; the activation itself is
    read again at each call), fused_attn_backend.
    """

    def _fused_blocks(self, x, blocks):
        backend = self.fused_attn_backend
        # (an eps set to 0 or a p to 1 since the swap: torch's norms and dropouts, as a swap then
        # would have left them)
        fuse = (self.fused_attn_norm and reads_intact(self, *self.fused_attn_norm_reads)
                and all(fusable_eps(norm.eps) and fusable_p(dropout_p(drop)) for _, norm, drop in blocks))
        if not self.norm_first:
            for branch, norm, drop in blocks:
                b = branch(x)
                if fuse:
                    b, x = in_sum_dtype(b, x)
                x = fused_norm(norm, b, x, dropout_p=dropout_p(drop), backend=backend) if fuse else norm(x + drop(b))
            return x
        if not fuse:
            for branch, norm, drop in blocks:
                x = x + drop(branch(norm(x)))
            return x
        h = fused_norm(blocks[0][1], x, backend=backend)
        for i, (branch, _, drop) in enumerate(blocks):
            b = branch(h)
            if i + 1 < len(blocks):
                h, x = fused_norm(blocks[i + 1][1], b, x, dropout_p=dropout_p(drop), prenorm=True, backend=backend)
            else:
                # the ops' RNG, as the dropouts fused into the norms: torch's dropout module would
                # be replaced by inductor's RNG, and the compiled layer drop other elements here
                x = x + _counter_dropout(b, dropout_p(drop))
        return x

    def _fused_ff(self, x):
        # the activation is read now: it may have been set since the swap (often a function, F.relu)
        act = activation_now(self.activation) if self.fused_attn_activation is not None else None
        p = dropout_p(self.dropout)
        if act is None or not reads_intact(self, *self.fused_attn_ffn_reads) or not fusable_p(p):  # (p: set to 1 since)
            return self.linear2(self.dropout(self.activation(self.linear1(x))))
        return feed_forward(x, self.linear1.weight, self.linear1.bias, self.linear2.weight, self.linear2.bias,
                            activation=act, dropout_p=p, backend=self.fused_attn_backend)


class FusedTransformerEncoderLayer(_FusedResidualLayer, nn.TransformerEncoderLayer):
    """TransformerEncoderLayer with fused norms/FFN; its self_attn is swapped on its own. It never
    takes torch's inference fast path (which would bypass the fused modules), but for nested-tensor
    input, which only that path takes."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if isinstance(src, Proxy):  # torch.fx's tracing
            return fx_leaf(self, super().forward, src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                           is_causal=is_causal)
        if src.is_nested:  # nested tensors go to torch's forward (its inference fast path takes them)
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        # torch's layer checks these dtypes first, under these names (shapes: in self_attn)
        check_mask_dtype(src_key_padding_mask, "src_key_padding_mask")
        check_mask_dtype(src_mask, "src_mask")

        def self_attention(h):
            return self.self_attn(h, h, h, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                  need_weights=False, is_causal=is_causal)[0]
        return self._fused_blocks(src, [(self_attention, self.norm1, self.dropout1),
                                        (self._fused_ff, self.norm2, self.dropout2)])


class FusedTransformerDecoderLayer(_FusedResidualLayer, nn.TransformerDecoderLayer):
    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=False, memory_is_causal=False):
        if isinstance(tgt, Proxy):  # torch.fx's tracing
            return fx_leaf(self, super().forward, tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                           tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                           memory_is_causal=memory_is_causal)

        def self_attention(h):
            return self.self_attn(h, h, h, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                  is_causal=tgt_is_causal, need_weights=False)[0]

        def cross_attention(h):
            return self.multihead_attn(h, memory, memory, attn_mask=memory_mask,
                                       key_padding_mask=memory_key_padding_mask, is_causal=memory_is_causal,
                                       need_weights=False)[0]
        return self._fused_blocks(tgt, [(self_attention, self.norm1, self.dropout1),
                                        (cross_attention, self.norm2, self.dropout2),
                                        (self._fused_ff, self.norm3, self.dropout3)])


class FusedTransformerEncoder(nn.TransformerEncoder):
    """TransformerEncoder without the nested-tensor inference path (which would feed nested
    tensors to the fused layers); otherwise torch's forward: causal-mask detection, layers, norm.
    Input that is nested already runs torch's forward (the swapped layers and norms pass it on to
    torch's)."""

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        from torch.nn.modules.transformer import _detect_is_causal_mask, _get_seq_len

        if isinstance(src, Proxy):  # torch.fx's tracing
            return fx_leaf(self, super().forward, src, mask=mask, src_key_padding_mask=src_key_padding_mask,
                           is_causal=is_causal)
        if src.is_nested:  # already nested: torch's forward, whose layers (swapped) pass it to torch's
            return super().forward(src, mask, src_key_padding_mask, is_causal)

        check_mask_dtype(src_key_padding_mask, "src_key_padding_mask")  # torch's first check (before the layers)
        # torch detects a causal mask on the canonical (float) form of ``mask``.
        canonical = F._canonical_mask(mask=mask, mask_name="mask", other_type=None, other_name="",
                                      target_type=src.dtype, check_other=False)
        if is_causal is None and canonical is not None and torch.compiler.is_compiling():
            # torch's detection compares the mask with a causal one on the host: under torch.compile a
            # data-dependent guard (fullgraph failed: "Could not guard on data-dependent expression").
            # The hint only lets the layers skip reading the mask, which they apply either way.
            is_causal = False
        else:
            is_causal = _detect_is_causal_mask(canonical, is_causal,
                                               _get_seq_len(src, self.layers[0].self_attn.batch_first))
        out = src
        for layer in self.layers:
            out = layer(out, src_mask=mask, is_causal=is_causal, src_key_padding_mask=src_key_padding_mask)
        if src_key_padding_mask is not None:
            padding = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=None,
                                        other_name="", target_type=src.dtype, check_other=False) != 0
            if self._torch_would_take_nested_path(src, mask, padding):
                # torch's nested path gives exact zeros at the padded positions (before the final
                # norm); the real positions are the same either way
                out = out.masked_fill(padding.unsqueeze(-1), 0.0)
        return out if self.norm is None else self.norm(out)

    def _torch_would_take_nested_path(self, src, mask, padding) -> bool:
        """The conditions of nn.TransformerEncoder.forward's nested-tensor ("sparsity") path, for
        a call with a key padding mask (``padding``: True at padded positions)."""
        if (mask is not None or not getattr(self, "use_nested_tensor", False)
                or not torch.backends.mha.get_fastpath_enabled() or self.layers[0].training or src.dim() != 3
                or src.is_nested or torch.is_autocast_enabled()):
            return False
        if getattr(self, "mask_check", True):
            if torch.compiler.is_compiling():
                return False
            if not torch._nested_tensor_from_mask_left_aligned(src, padding.logical_not()):
                return False
        layer = self.layers[0]
        tensors = (src, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias, layer.self_attn.out_proj.weight,
                   layer.self_attn.out_proj.bias, layer.norm1.weight, layer.norm1.bias, layer.norm2.weight,
                   layer.norm2.bias, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight, layer.linear2.bias)
        if torch.overrides.has_torch_function(tensors) or src.device.type not in ("cpu", "cuda", "xpu"):
            return False
        return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


# ---------------------------------------------------------------------------------------------
# converters
# ---------------------------------------------------------------------------------------------

def _convert_reference(module, opts):
    pairs = {reference.MultiHeadAttention: (fused_modules.MultiHeadAttention, "attention"),
             reference.LayerNormResidual: (fused_modules.LayerNormResidual, "norm"),
             reference.FeedForward: (fused_modules.FeedForward, "ffn")}
    if type(module) not in pairs:
        return None
    cls, flag = pairs[type(module)]
    if not getattr(opts, flag):
        return f"{flag}=False"
    return Conversion(cls, {"backend": opts.backend})


def _convert_norm(module, opts):
    if type(module) not in (nn.LayerNorm, nn.RMSNorm):
        return None
    if not opts.norm:
        return "norm=False"
    why = norm_reason(module)
    if why:
        return why
    return Conversion(FusedLayerNorm if type(module) is nn.LayerNorm else FusedRMSNorm,
                      {"fused_attn_backend": opts.backend})


def _convert_sequential_ffn(module, opts):
    if type(module) is not nn.Sequential or len(module) not in (3, 4):
        return None
    parts = list(module)
    # (any nn.Linear: a subclass with another forward is left with the reason, by _read_reason)
    if not all(isinstance(p, nn.Linear) or wrapped_linear(p) for p in (parts[0], parts[-1])):
        return None
    if len(parts) == 4 and type(parts[2]) is not nn.Dropout:
        return None
    act = activation_name(parts[1])
    if act is None:
        return None if not isinstance(parts[1], nn.Module) else f"activation {type(parts[1]).__name__} has no fused form"
    if not opts.ffn:
        return "ffn=False"
    why = dropout_reason("dropout p", parts[2].p) if len(parts) == 4 else None
    if why:
        return why
    return Conversion(FusedSequentialFFN, {"fused_attn_backend": opts.backend},
                      consumed=tuple(str(i) for i in range(len(parts))), note=f"FFN {act}",
                      reads={**{str(i): None for i in range(len(parts))},
                             **_linear_reads(module, ("0", str(len(parts) - 1)))})


def _mha_reason(module) -> Optional[str]:
    if module.bias_k is not None or module.bias_v is not None:
        return "add_bias_kv=True has no fused form"
    if module.add_zero_attn:
        return "add_zero_attn=True has no fused form"
    return dropout_reason("dropout", module.dropout)


def _convert_mha(module, opts):
    if type(module) is not nn.MultiheadAttention:
        return None
    if not opts.attention:
        return "attention=False"
    why = _mha_reason(module)
    if why:
        return why
    return Conversion(FusedMultiheadAttention, {"fused_attn_backend": opts.backend},
                      note="need_weights=False path; calls asking for weights run torch's forward")


def _convert_torch_layer(module, opts):
    if type(module) not in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer):
        return None
    norms = [module.norm1, module.norm2] + ([module.norm3] if hasattr(module, "norm3") else [])
    norm_why = "norm=False" if not opts.norm else next((w for w in map(norm_reason, norms) if w), None)
    norm_reads = {f"{kind}{i + 1}": cls for i in range(len(norms)) for kind, cls in (("norm", None), ("dropout", nn.Dropout))}
    norm_why = norm_why or _read_reason(module, norm_reads) or next(
        (w for i in range(len(norms)) if (w := dropout_reason(f"dropout{i + 1} p", module._modules[f"dropout{i + 1}"].p))),
        None)
    act = activation_name(module.activation) if opts.ffn else None
    ffn_why = "ffn=False" if not opts.ffn else (None if act else f"activation {module.activation!r} has no fused form")
    ffn_reads = {"linear1": nn.Linear, "linear2": nn.Linear, "dropout": nn.Dropout}
    if isinstance(module.activation, nn.Module):
        ffn_reads["activation"] = None
    ffn_why = ffn_why or _read_reason(module, ffn_reads) or dropout_reason("dropout p", module.dropout.p)
    act = None if ffn_why else act
    attns = [module.self_attn] + ([module.multihead_attn] if hasattr(module, "multihead_attn") else [])
    attn_fused = opts.attention and all(type(a) is nn.MultiheadAttention and _mha_reason(a) is None for a in attns)
    if norm_why and ffn_why and not attn_fused:
        return f"nothing to fuse: {norm_why}; {ffn_why}"
    cls = FusedTransformerEncoderLayer if type(module) is nn.TransformerEncoderLayer else FusedTransformerDecoderLayer
    note = ", ".join([f"norms {'torch (' + norm_why + ')' if norm_why else 'fused'}",
                      f"FFN {'torch (' + ffn_why + ')' if ffn_why else 'fused ' + act}"])
    consumed = tuple(f"norm{i + 1}" for i in range(len(norms))) if not norm_why else ()
    reads = {**({} if norm_why else norm_reads), **({} if ffn_why else ffn_reads)}
    return Conversion(cls, {"fused_attn_norm": norm_why is None, "fused_attn_activation": act,
                            "fused_attn_backend": opts.backend, "fused_attn_norm_reads": tuple(norm_reads),
                            "fused_attn_ffn_reads": tuple(ffn_reads)},
                      consumed=consumed, note=note, reads=reads)


def _convert_huggingface(module, opts):
    if not type(module).__module__.startswith("transformers."):
        return None
    from .integrations import huggingface
    return huggingface.convert(module, opts)


CONVERTERS: list[Converter] = [_convert_reference, _convert_sequential_ffn, _convert_mha, _convert_torch_layer,
                               _convert_norm, _convert_huggingface, _convert_plain_mlp]


# ---------------------------------------------------------------------------------------------
# the walk
# ---------------------------------------------------------------------------------------------

def _apply(module: nn.Module, conv: Conversion) -> None:
    if not issubclass(conv.cls, type(module)):
        raise TypeError(f"{conv.cls.__name__} is not a subclass of {type(module).__name__}")
    attrs = {**conv.attrs, READS_ATTR: {path: type(_child(module, path)) for path in conv.reads}}
    module.__dict__[RESTORE_ATTR] = (type(module), tuple(attrs), tuple(conv.consumed))
    module.__dict__.update(attrs)
    module.__class__ = conv.cls


def swap_modules(model: nn.Module, *, attention: bool = True, norm: bool = True, ffn: bool = True,
                 backend: Optional[str] = None, rotary: bool = True) -> SwapReport:
    """Swap the fused ops into ``model`` in place, where they compute exactly what it computes.

    Args:
        attention / norm / ffn: which kinds of module to fuse.
        rotary: for Hugging Face models, also route the modeling module's ``apply_rotary_pos_emb``
            (where it is Llama's) to the fused rotary op (module-level: see
            ``fused_attn.integrations.huggingface.swap_rotary``).
        backend: the backend the swapped modules ask for (None: ``use_backend`` / env / auto).

    Returns a ``SwapReport`` listing each module replaced (path, classes) and each target left
    as it is, with the reason. Parameters are not copied or moved to new objects: the modules
    keep them (and their names), so optimisers, tied weights and state_dicts are unaffected.
    Swapping a swapped model changes nothing (its report lists those modules as ``already``
    swapped, with their backend): to swap with another backend or options, ``restore_modules``
    first. ``restore_modules`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    for name, value in (("attention", attention), ("norm", norm), ("ffn", ffn), ("rotary", rotary)):
        _check_bool(name, value)  # ("false" was truthy and fused; None was falsy and left)
    opts = SwapOptions(attention, norm, ffn, backend, rotary)
    report = SwapReport()
    for path, hf_model in _transformers_models(model):
        from .integrations import huggingface
        if attention:
            huggingface.swap_attention_implementation(hf_model, opts, report, path)
        if rotary:
            huggingface.swap_rotary(hf_model, opts, report, path)
    _walk(model, "", opts, report)
    # torch's TransformerEncoder feeds nested tensors to its layers on its inference fast path:
    # swap the encoders whose layers are fused.
    for path, module in model.named_modules():
        # (an encoder of no layers, as nn.Transformer(num_encoder_layers=0) builds, has none to fuse)
        if type(module) is nn.TransformerEncoder and len(module.layers) and RESTORE_ATTR in module.layers[0].__dict__:
            _apply(module, Conversion(FusedTransformerEncoder))
            report.replaced.append((path, "TransformerEncoder", "FusedTransformerEncoder", "no nested-tensor path"))
    return report


def _transformers_models(model: nn.Module):
    """(path, module) of the outermost transformers models in ``model``: the model itself, or the
    ones it wraps (PEFT's PeftModel holds the transformers model at ``base_model.model``)."""
    found = []
    for path, module in model.named_modules():
        if (type(module).__module__.startswith("transformers.") and hasattr(module, "set_attn_implementation")
                and not any(path.startswith(f"{outer}.") or not outer for outer, _ in found)):
            found.append((path, module))
    return found


def _walk(module: nn.Module, path: str, opts: SwapOptions, report: SwapReport) -> None:
    if RESTORE_ATTR in module.__dict__:  # swapped before: skip it and what it runs itself
        _, added, consumed = module.__dict__[RESTORE_ATTR]
        # said in the report: a second swap with another backend or options would otherwise
        # silently keep the first one's
        backend = next((module.__dict__.get(name) for name in added if name in ("backend", "fused_attn_backend")), None)
        report.already.append((path, type(module).__name__, f"backend={backend}"))
    else:
        consumed = ()
        for converter in CONVERTERS:
            result = converter(module, opts)
            if result is None:
                continue
            if not isinstance(result, str):  # (children whose hooks or adapters the fused forward would skip)
                result = _hook_reason(module, result.consumed) or _read_reason(module, result.reads) or result
            if isinstance(result, str):
                report.left.append((path, type(module).__name__, result))
            else:
                old = type(module).__name__
                _apply(module, result)
                report.replaced.append((path, old, result.cls.__name__, result.note))
                consumed = result.consumed
            break
        else:
            subclassed = _subclassed_target(type(module))
            if subclassed is not None:
                report.left.append((path, type(module).__name__, f"a subclass of {subclassed.__name__} (parametrized, "
                                    f"sharded or the user's own): only the exact class is swapped, whose forward "
                                    f"the fused one reproduces"))
    for name, child in module.named_children():
        if name not in consumed:
            _walk(child, f"{path}.{name}" if path else name, opts, report)


#: torch.nn classes swapped by exact type; a subclass of one is left and listed (``_subclassed_target``)
_EXACT_TARGETS = (nn.MultiheadAttention, nn.LayerNorm, nn.RMSNorm, nn.TransformerEncoderLayer,
                  nn.TransformerDecoderLayer, nn.TransformerEncoder)


def _subclassed_target(cls: type) -> Optional[type]:
    """The torch class ``cls`` strictly subclasses among those the converters swap by exact type
    (a Parametrized..., FSDP... or user subclass, whose forward may differ), or None: such a
    module is left as it is, and said so in the report rather than passed over in silence."""
    if cls in _EXACT_TARGETS or cls.__module__ == __name__:
        return None
    return next((target for target in _EXACT_TARGETS if issubclass(cls, target)), None)


def restore_modules(model: nn.Module) -> SwapReport:
    """Undo ``swap_modules``: every swapped module gets its original class back (and loses the
    attributes the swap added). Returns a report of what was restored (in ``replaced``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    report = SwapReport(action="restore_modules")
    for path, module in model.named_modules():
        info = module.__dict__.pop(RESTORE_ATTR, None)
        if info is None:
            continue
        cls, added, _ = info
        for name in added:
            module.__dict__.pop(name, None)
        report.replaced.append((path, type(module).__name__, cls.__name__, ""))
        module.__class__ = _unfused_class(type(module), cls)
    for path, hf_model in _transformers_models(model):
        from .integrations import huggingface
        huggingface.restore_attention_implementation(hf_model, report, path)
        huggingface.restore_rotary(hf_model, report, path)
    return report


def _unfused_class(current: type, original: type) -> type:
    """The class a restored module gets: ``original`` in place of the swap's class. That is
    ``original`` itself unless a class was made over the swap's since (torch.nn.utils.parametrize's
    ``Parametrized...``, FSDP2's ``FSDP...``: setting ``original`` back would drop the
    parametrization or the sharding); such a class is made again over ``original``, its own
    attributes (a parametrization's properties) copied."""
    fused = next((c for c in current.__mro__ if c.__module__ == __name__ and c is not original
                  and issubclass(c, original)), None)
    if fused is None or fused is current:
        return original

    def rebuilt(cls):
        if cls is fused:
            return original
        if not issubclass(cls, fused):
            return cls
        own = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        return type(cls)(cls.__name__.replace(fused.__name__, original.__name__),
                         tuple(rebuilt(base) for base in cls.__bases__), own)

    return rebuilt(current)


__all__ = ["swap_modules", "restore_modules", "patch_sdpa", "SwapReport", "SwapOptions", "Conversion", "CONVERTERS",
           "FusedMultiheadAttention", "FusedTransformerEncoderLayer", "FusedTransformerDecoderLayer",
           "FusedTransformerEncoder", "FusedLayerNorm", "FusedRMSNorm", "FusedSequentialFFN"]


# ---------------------------------------------------------------------------------------------
# torch.nn.functional.scaled_dot_product_attention
# ---------------------------------------------------------------------------------------------

class patch_sdpa:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to fused_attn, for models that
    call SDPA themselves (and ``nn.MultiheadAttention``'s Python path, which looks it up there)::

        handle = fused_attn.patch_sdpa()          # until handle.undo()
        with fused_attn.patch_sdpa(backend="cpu"):  # or for a block
            ...

    Calls keep torch's meaning (``functional.scaled_dot_product_attention``; a fully masked row
    gives zeros). Nested tensors and non-floating inputs go to torch's own
    function. Code that imported the function by name before the patch (``from
    torch.nn.functional import scaled_dot_product_attention``) keeps torch's. The patch is
    process-wide (every thread's SDPA calls take it, with its ``backend``, while it is
    installed); for a backend per thread, patch with ``backend=None`` and use ``use_backend``.
    """

    def __init__(self, backend: Optional[str] = None):
        check_backend_name(backend)
        self.original = F.scaled_dot_product_attention
        original = self.original

        def fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       enable_gqa=False):
            tensors = (query, key, value) + ((attn_mask,) if isinstance(attn_mask, Tensor) else ())
            if (not all(isinstance(t, Tensor) for t in tensors) or any_nested(*tensors)
                    or not all(t.is_floating_point() for t in (query, key, value))):  # torch's (and its errors)
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, enable_gqa=enable_gqa)
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                                backend=backend)

        fused_sdpa.__wrapped__ = original
        fused_sdpa.fused_attn_patch = self
        self.patched = fused_sdpa
        self.undone = False
        F.scaled_dot_product_attention = fused_sdpa

    def undo(self) -> None:
        """Take this patch away. When it is the installed function, the one before it comes back,
        skipping patches undone already (handles undone out of order: a patch undone while a later
        one was on top must not come back when that one goes); otherwise the patch is only marked,
        and leaves when the patches above it do."""
        self.undone = True
        if F.scaled_dot_product_attention is not self.patched:
            return
        previous = self.original
        while getattr(previous, "fused_attn_patch", None) is not None and previous.fused_attn_patch.undone:
            previous = previous.fused_attn_patch.original
        F.scaled_dot_product_attention = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False
