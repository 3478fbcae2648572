"""The ``triton`` backend: Triton kernels in fused_attn/triton, one module per op family.

On CUDA tensors it runs compiled kernels. On CPU tensors it runs only under the Triton
interpreter (``TRITON_INTERPRET=1`` set before fused_attn.triton is imported), which is how the
tests exercise the kernels on machines without a GPU; the interpreter cannot do bfloat16
arithmetic (triton-lang/triton#11584), so bfloat16 on CPU is refused.

Each kernel module (``fused_attn.triton.attention``, ``.layer_norm``, ``.feed_forward``, ``.rotary``) provides
the launchers named in ``backends.base`` and may define ``unsupported_reasons(call)``.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
import threading

import torch

from .._extension import env_get
from .base import Backend, Call

_MODULES = {"attention": "attention", "layer_norm_residual": "layer_norm", "feed_forward": "feed_forward",
            "rotary": "rotary"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


#: TRITON_INTERPRET's values that switch the interpreter on, as Triton reads them (3.6 and 3.9:
#: libtriton's getenv_bool, lowercased, not stripped); every other value, "false" / "off" / "no"
#: and empty included, leaves it off. Reading anything but "" and "0" as on (as before) made
#: TRITON_INTERPRET=false report the backend available on CPU, where Triton then failed with
#: "0 active drivers". Not _extension._env_flag: its words differ ("y" would raise, " 1" read on)
#: and this variable is Triton's, not ours to refuse.
_INTERPRET_ON = ("1", "true", "on", "yes", "y")


def interpreter_enabled() -> bool:
    """Whether Triton runs its kernels under the interpreter (TRITON_INTERPRET read as Triton does)."""
    return env_get("TRITON_INTERPRET").lower() in _INTERPRET_ON  # (os.environ's, as one lookup: every launch asks)


#: Held around every launch while the interpreter is on. Triton's interpreter is not thread-safe:
#: a launch patches triton.language's functions process-wide for the kernel's duration and
#: restores them after, so two threads launching at once saw each other's patches undone (random
#: "Did you forget to add @triton.jit?" InterpreterErrors, and outputs silently wrong: 4 threads
#: calling attention gave both). Interpreted launches take seconds anyway; serialising them costs
#: nothing that matters. Re-entrant: ``rotary`` calls itself. Compiled launches never take it.
_INTERPRETER_LOCK = threading.RLock()


def _launcher(method):
    """``method`` run under ``_INTERPRETER_LOCK`` when the interpreter is on."""
    @functools.wraps(method)
    def launch(*args, **kwargs):
        if not interpreter_enabled():
            return method(*args, **kwargs)
        with _INTERPRETER_LOCK:
            return method(*args, **kwargs)
    return launch


@functools.lru_cache(maxsize=None)
def _interpreter_numpy_clash() -> str | None:
    """Why this Triton's interpreter cannot run the kernels with this numpy, or None. Triton 3.6 and
    older turn a one-element loop bound (``tl.program_id`` is a one-element array there) into a
    Python int with ``int(array)``, which numpy 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars": every banded or ALiBi attention call failed); Triton 3.7 squeezes
    the array first. Compiled kernels never meet this."""
    try:
        import numpy
        import triton
    except ImportError as error:  # (the interpreter runs on numpy; torch and triton do not require it)
        return f"the Triton interpreter cannot run: {error}"

    def major_minor(version):  # ("2.4.0rc1", "3.7.0+git1234", "2.4rc1": the leading digits)
        found = re.match(r"(\d+)\.(\d+)", str(version))
        return (int(found[1]), int(found[2])) if found else None

    triton_version, numpy_version = major_minor(triton.__version__), major_minor(numpy.__version__)
    if triton_version and numpy_version and triton_version < (3, 7) and numpy_version >= (2, 4):
        return (f"the interpreter of triton {triton.__version__} cannot run with numpy {numpy.__version__} "
                "(it converts one-element arrays to int, which numpy 2.4 refuses; fixed in triton 3.7): "
                "install numpy<2.4 or triton>=3.7")
    return None


@functools.lru_cache(maxsize=None)
def _kernels(op: str):
    """The kernel module of ``op``, imported once (import_module on every launch cost ~5 us; a
    failed import is not cached, so it is retried and reported each time)."""
    return importlib.import_module(f"fused_attn.triton.{_MODULES[op]}")


class TritonBackend(Backend):
    name = "triton"
    dtypes = {"attention": _FLOATS, "layer_norm_residual": _FLOATS, "feed_forward": _FLOATS, "rotary": _FLOATS}
    paged_kv = True  # the varlen forward's PAGED specialisation

    @property
    def devices(self):
        return ("cuda", "cpu") if interpreter_enabled() else ("cuda",)

    def unavailable_reasons(self):
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed (pip install triton)"]
        if not torch.cuda.is_available() and not interpreter_enabled():
            value = os.environ.get("TRITON_INTERPRET")
            if value is None:
                return ["no CUDA device, and TRITON_INTERPRET=1 is not set (the interpreter runs the kernels on CPU)"]
            return [f"no CUDA device, and TRITON_INTERPRET={value!r} leaves the Triton interpreter off (set "
                    "TRITON_INTERPRET=1 to run the kernels on CPU)"]
        if interpreter_enabled() and (clash := _interpreter_numpy_clash()):
            return [clash]
        return []

    def call_reasons(self, call: Call):
        reasons = super().call_reasons(call)
        if call.device.type == "cpu" and call.dtype == torch.bfloat16:
            reasons.append("the Triton interpreter cannot do bfloat16 arithmetic (triton-lang/triton#11584)")
        if call.options.get("torch_func"):
            reasons.append("runs under a torch.func transform (vmap, grad, jacrev, ...), whose wrapped tensors the "
                           "Triton launchers cannot read (the cpu, cuda and reference backends take them)")
        if not reasons:
            try:
                module = _kernels(call.op)
            except ImportError as exc:
                return [f"fused_attn.triton.{_MODULES[call.op]} could not be imported: {exc}"]
            hook = getattr(module, "unsupported_reasons", None)
            if hook is not None:
                reasons.extend(hook(call))
        return reasons

    # Every launcher hands its tensors through _values first: the kernels read raw pointers and
    # strides, so they need each tensor's memory to hold its values (see _values).

    @_launcher
    def attention_fwd(self, *args):
        return _kernels("attention").attention_fwd(*_values(args))

    @_launcher
    def attention_bwd(self, *args):
        return _kernels("attention").attention_bwd(*_values(args))

    @_launcher
    def attention_varlen_fwd(self, *args, **kwargs):
        if kwargs:  # (block_table=: the pages of a paged cache)
            kwargs = dict(zip(kwargs, _values(tuple(kwargs.values()))))
        return _kernels("attention").attention_varlen_fwd(*_values(args), **kwargs)

    @_launcher
    def attention_varlen_bwd(self, *args):
        return _kernels("attention").attention_varlen_bwd(*_values(args))

    @_launcher
    def layer_norm_residual_fwd(self, *args):
        return _kernels("layer_norm_residual").layer_norm_residual_fwd(*_values(args))

    @_launcher
    def layer_norm_residual_bwd(self, *args):
        return _kernels("layer_norm_residual").layer_norm_residual_bwd(*_values(args))

    @_launcher
    def feed_forward_fwd(self, *args):
        return _kernels("feed_forward").feed_forward_fwd(*_values(args))

    @_launcher
    def feed_forward_bwd(self, *args):
        return _kernels("feed_forward").feed_forward_bwd(*_values(args))

    @_launcher
    def rotary(self, x, cos, sin, positions, interleaved, conjugate, out=None):
        x, cos, sin, positions = _values((x, cos, sin, positions))
        if out is not None and out.is_neg():
            # The kernel would store the values as they are into memory read negated: turn into a
            # tensor of our own and copy_ it in (copy_ writes through the bit). (rotary.rotate never
            # passes such an out: it turns a negative-bit x out of place and copies it in itself.)
            return out.copy_(self.rotary(x, cos, sin, positions, interleaved, conjugate))
        return _kernels("rotary").apply_rotary(x, cos, sin, positions, interleaved=interleaved, conjugate=conjugate,
                                               out=out)


def _values(args: tuple) -> tuple:
    """``args`` with every tensor carrying the negative bit replaced by ``t.resolve_neg()``, a
    copy whose memory holds its values; ``args`` itself (no copy) when none does.

    A view with the negative bit (``z.conj().imag`` of a complex z, ``torch._neg_view``) is a real
    float tensor whose memory holds the negation of its values; torch's own ops read it through
    the bit. The Triton launchers hand the kernels its pointer and strides, which read the memory
    as it is: -t instead of t, a wrong answer with no error (gradients too: an incoming gradient
    can be such a view). The cpu and cuda backends call their ops through torch's dispatcher, whose
    Negative fallback materialises such arguments the same way; here it is done by hand, for
    every tensor argument, inputs and incoming gradients alike. The launchers write only tensors
    they allocate (rotary's ``out`` is handled by ``rotary``), so a copy loses no write: the KV
    cache of ``attention_with_kvcache`` is written by torch's ``index_put_`` (through the bit)
    before the attention reads a resolved copy of it. The check is one ``is_neg()`` per tensor,
    ~0.1 us; the conjugate bit needs none, as only complex tensors, which no backend takes, can
    carry it."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_neg():
            return tuple(t.resolve_neg() if isinstance(t, torch.Tensor) else t for t in args)
    return args
