"""Backends and the dispatch between them (xformers-style: each backend says why it refuses).

``auto`` tries, in order, on CUDA tensors: triton -> cuda -> reference (for the feed-forward
cuda -> triton -> reference, see ``AUTO_ORDER_BY_OP``); on CPU tensors: cpu -> reference. A
call's ``backend=`` wins over ``use_backend(...)``, which wins over the
``FUSED_ATTN_BACKEND`` environment variable. ``use_backend`` is scoped to the thread and asyncio
task that enters it (a ``contextvars.ContextVar``, see ``_scope``). Forcing a backend that
cannot take a call raises a ``BackendUnavailableError`` listing its reasons; ``auto`` falling
back to ``reference`` warns once per reason. On meta tensors every request, forced or not, gives
``reference``, whose plain PyTorch gives the shapes there (``_resolve``).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings

import torch

from . import _scope
from .base import OPS, Backend, Call
from .cpu import CpuBackend
from .cuda import CudaBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

BACKENDS: dict[str, Backend] = {b.name: b for b in (TritonBackend(), CudaBackend(), CpuBackend(), ReferenceBackend())}
BACKEND_NAMES = tuple(BACKENDS) + ("auto",)
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
#: Measured exceptions to AUTO_ORDER, (device type, op) -> order. Feed-forward on a GPU: the CUDA
#: backend (cuBLAS GEMMs + one fused epilogue pass each way) beat the Triton GEMMs with fused
#: epilogues on the H200 (bf16, T8192 d1024 ff4096 relu: forward 0.258 vs 0.339 ms, backward 0.507
#: vs 1.685 ms; eager 0.218 / 0.465 ms; docs/results/gpu-2026-11-29), so it goes first there.
AUTO_ORDER_BY_OP = {("cuda", "feed_forward"): ("cuda", "triton", "reference")}


def auto_order(op: str, device_type: str) -> tuple[str, ...]:
    """The backends ``auto`` tries for ``op`` on ``device_type`` tensors, in order."""
    return AUTO_ORDER_BY_OP.get((device_type, op)) or AUTO_ORDER.get(device_type, ("reference",))

#: use_backend blocks entered inside code Dynamo traces (torch.compile): there a ContextVar cannot
#: be set, so __enter__ pushes onto this list instead, a mutation Dynamo tracks (the traced calls
#: in the block see it, and the list is left as it was once the block is exited). Always empty
#: outside a trace. The selection made outside compiled code lives in ``_scope.selection``.
_traced: list[str] = []
_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
_warned: set[str] = set()
#: resolve()'s answers, (op, device type, dtype, options, requested backend) -> backend name (and
#: resolve_options()'s eager ones, keyed on the torch.device instead of its type). A
#: backend's refusals depend only on these and on what this machine has, which is fixed once
#: fused_attn is imported; caching them saves ~25 us of every call (half of the functional API's
#: own overhead on a small input). Refusals are not cached: they raise every time. A test that
#: patches a backend's ``call_reasons`` must also replace this dict. Bounded (``_remember``).
_resolved: dict = {}


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot take the call (the message lists why)."""


def check_backend_name(name, argname="backend"):
    if name is None:
        return
    if not isinstance(name, str):  # (a wrong type: a TypeError, as every argument's)
        raise TypeError(f"{argname} must be one of {', '.join(BACKEND_NAMES)} (or None), got {type(name).__name__} "
                        f"{name!r}")
    if name not in BACKEND_NAMES:
        raise ValueError(f"{argname} must be one of {', '.join(BACKEND_NAMES)} (or None), got {name!r}")


def requested_backend(explicit: str | None) -> str:
    """The backend a call asks for: ``explicit`` (its ``backend=``), else the innermost
    ``use_backend`` of this thread / asyncio task, else ``FUSED_ATTN_BACKEND``, else "auto"."""
    if explicit is not None:
        return explicit
    selected = _scope.selection.get()
    if selected:
        return selected[-1]
    env = _scope.env_backend() or "auto"
    if env not in BACKEND_NAMES:
        check_backend_name(env, "FUSED_ATTN_BACKEND")
    return env


def _traced_requested(explicit: str | None) -> str:
    """``requested_backend`` as code that Dynamo traces reads it (under ``torch.compile``; eager
    code may call it too). ``_resolve_constant`` is called at trace time and its answer baked in
    without a guard, so what it depends on must be read here, in the traced code: a
    ``use_backend`` block entered inside the compiled function is on ``_traced`` (Dynamo's pending
    mutation of the list), and the selection outside it is the module attribute
    ``_scope.requested``, which Dynamo guards on: a later call under another ``use_backend`` or
    ``FUSED_ATTN_BACKEND`` value, in any thread or task, recompiles instead of reusing the graph
    built for this one."""
    if explicit is not None:
        return explicit
    if _traced:
        return _traced[-1]
    requested = _scope.requested
    if requested not in BACKEND_NAMES:  # (only FUSED_ATTN_BACKEND comes here unchecked)
        check_backend_name(requested, "FUSED_ATTN_BACKEND")
    return requested


def resolve(call: Call, backend: str | None = None) -> str:
    """The name of the backend that will run ``call``.

    Under torch.compile the choice is made once, at trace time, and baked into the graph (the
    inputs' device and dtype are guarded by the compiler anyway), so dispatch never breaks a graph.
    The options must then be plain constants, not symbols: ``functional._concrete`` specialises
    the sizes and floats they come from under ``dynamic=True``.
    """
    options = tuple(sorted(call.options.items()))
    requested = _traced_requested(backend) if torch.compiler.is_compiling() else requested_backend(backend)
    return _resolve_constant(call.op, call.device.type, call.dtype, options, requested)


def resolve_options(op: str, device: torch.device, dtype: torch.dtype, options: tuple, backend: str | None = None,
                    compiling: bool | None = None) -> str:
    """``resolve(Call(op, device, dtype, dict(options)), backend)`` without building the Call:
    what the functional API calls. ``options`` must be the (name, value) pairs sorted by name, as
    ``resolve`` sorts them (the callers write them out in that order; error messages list them so).
    ``compiling``: ``torch.compiler.is_compiling()`` when the caller has read it already (None:
    read here).

    In eager mode a choice made before is one dict lookup, keyed on the device object (its
    ``.type`` costs ~0.3 us; a device hashes in C) and on the requested backend, so that
    ``use_backend`` and a changed ``FUSED_ATTN_BACKEND`` take effect at once (the variable is read
    on every call; an unknown value is refused by ``_resolve_constant`` on every call, as it is
    never cached). Those keys live in ``_resolved`` too: replacing it forgets them.
    """
    if torch._C._are_functorch_transforms_active() and _wrapping_transform():
        # (vmap, grad, jacrev, ...: backends whose launchers read tensors' memory directly refuse
        # the wrapped tensors those pass; TritonBackend.call_reasons)
        options = tuple(sorted(options + (("torch_func", True),)))
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if compiling:
        return _resolve_constant(op, device.type, dtype, options, _traced_requested(backend))
    return _eager_choice(op, device, dtype, options, None, backend)


def resolve_values(op: str, names: tuple, device: torch.device, dtype: torch.dtype, values: tuple,
                   backend: str | None = None, compiling: bool | None = None) -> str:
    """``resolve_options(op, device, dtype, tuple(zip(names, values)), backend, compiling)``:
    ``names`` are the option names sorted (a constant of the caller), ``values`` theirs, in that
    order. In eager mode outside torch.func's transforms, the answer is cached on the values
    themselves: a flat tuple, built and hashed in half the time of the (name, value) pairs, which
    are made only on a miss. (Those keys share ``_resolved`` with ``resolve_options``'s: a values
    tuple holds no pairs, so the two never collide.)"""
    if compiling is None:
        compiling = torch.compiler.is_compiling()
    if compiling or torch._C._are_functorch_transforms_active():
        return resolve_options(op, device, dtype, tuple(zip(names, values)), backend, compiling)
    return _eager_choice(op, device, dtype, values, names, backend)


def _eager_choice(op: str, device: torch.device, dtype: torch.dtype, options: tuple, names, backend) -> str:
    """The eager choice of ``resolve_options`` (``names`` None: ``options`` are the (name, value)
    pairs) and ``resolve_values`` (``options`` the values of ``names``), cached on ``options`` as
    given and on the requested backend, read here on every call (``requested_backend(None)``
    inline; an unknown one is refused by ``_resolve_constant`` on a miss, and a refusal is never
    cached)."""
    if backend is None:
        selected = _scope.selection.get()
        backend = selected[-1] if selected else (_scope.env_backend() or "auto")
    key = (op, device, dtype, options, backend)
    name = _resolved.get(key)
    if name is None:
        pairs = options if names is None else tuple(zip(names, options))
        name = _remember(key, _resolve_constant(op, device.type, dtype, pairs, backend))
    return name


#: at most this many answers are kept in ``_resolved`` (a model has a few configurations; a sweep
#: over many head dims or hidden sizes must not grow the dict without end): past it, it is cleared
_RESOLVED_MAX = 1024


def _remember(key, name: str) -> str:
    """``_resolved[key] = name``, the dict cleared first when full. (Threads may race here: each
    dict operation is atomic, and a lost or repeated entry only costs a later lookup a miss.)"""
    cache = _resolved
    if len(cache) >= _RESOLVED_MAX:
        cache.clear()
    cache[key] = name
    return name


def _wrapping_transform() -> bool:
    """Whether a torch.func transform on the stack hands the ops wrapped tensors: vmap's batched
    ones, grad's (and vjp's, jacrev's) tracking ones. jvp alone hands the Functions plain tensors."""
    from torch._C import _functorch

    wrapping = (_functorch.TransformType.Vmap, _functorch.TransformType.Grad)
    return any(level.key() in wrapping for level in _functorch.get_interpreter_stack() or ())


def _assume_constant_result(fn):
    """What ``torch.compiler.assume_constant_result`` does (mark ``fn`` so Dynamo calls it at
    trace time and bakes in the result), without importing torch._dynamo at import time, which
    costs seconds. tests/test_compile.py checks that dispatch still traces with fullgraph=True."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _resolve_constant(op, device_type, dtype, options, requested):
    """The backend for the call, ``requested`` being what ``requested_backend`` /
    ``_traced_requested`` answered (never None). A constant to Dynamo: everything it depends on
    is an argument, read by the traced code (see ``_traced_requested``)."""
    if requested not in BACKEND_NAMES:  # (only FUSED_ATTN_BACKEND comes here unchecked)
        check_backend_name(requested, "FUSED_ATTN_BACKEND")
    key = (op, device_type, dtype, options, requested)
    name = _resolved.get(key)
    if name is None:
        name = _remember(key, _resolve(Call(op, torch.device(device_type), dtype, dict(options)), requested))
    return name


def _resolve(call: Call, backend: str | None) -> str:
    name = requested_backend(backend)
    if call.device.type == "meta":
        # Meta tensors hold shapes, no data: no kernel has anything to read, and the reference
        # math (plain PyTorch) runs on meta, forward and backward, giving every backend's output
        # shapes. So any request, forced or auto, runs it there (a forced backend refused meta
        # tensors, which broke building or probing a model on meta under use_backend). Reached
        # only on a cache miss (the answer is cached per device type): no cost on the hot path.
        return "reference"
    if name != "auto":
        reasons = BACKENDS[name].call_reasons(call)
        if reasons:
            raise BackendUnavailableError(f"backend {name!r} cannot run {call.describe()}: " + "; ".join(reasons))
        return name
    order = auto_order(call.op, call.device.type)
    refused = {}
    for candidate in order:
        reasons = BACKENDS[candidate].call_reasons(call)
        if not reasons:
            if candidate == "reference" and len(order) > 1:
                _warn_fallback(call, refused)
            return candidate
        refused[candidate] = reasons
    raise BackendUnavailableError(f"no backend can run {call.describe()}: " +
                                  " | ".join(f"{n}: {'; '.join(r)}" for n, r in refused.items()))


def _warn_fallback(call: Call, refused: dict[str, list[str]]):
    why = " | ".join(f"{n}: {'; '.join(r)}" for n, r in refused.items())
    key = f"{call.op}|{why}"
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"fused_attn: {call.describe()} falls back to the reference backend ({why})", stacklevel=5)


class use_backend(contextlib.ContextDecorator):
    """Run the enclosed calls on backend ``name`` ('auto' restores automatic choice): ``with
    use_backend("cpu"): ...``, or as a decorator. The name is checked here, so that a misspelt
    one raises even where the object is never entered (``use_backend("refrence")`` as a plain
    statement, which selects nothing).

    The selection is scoped to the thread and the asyncio task that enter the block (it lives in
    a ``contextvars.ContextVar``; a new task starts with its creator's selection, a new thread
    with none), like torch's own modes (``torch.no_grad``) are per thread: other threads and
    tasks keep theirs. Blocks nest, and one object may be entered again inside itself or by
    several threads at once. Autograd runs the backward of CUDA tensors in threads of its own,
    which see no selection: the fused ops' backward uses the backend its forward ran on anyway,
    but a recomputation there (activation checkpointing) resolves again: see the README's
    Dropout paragraph for checkpointing under use_backend.

    As a decorator it applies while the function runs; for a generator function while each
    step of the generator runs, for an ``async def`` function while its coroutine runs (and an
    async generator's steps), not while the caller holds the generator between steps.

    Under ``torch.compile`` a block inside the compiled function applies to the calls traced
    in it, and a compiled function called under another selection than the one it was traced
    under is compiled again for it (once per distinct selection; Dynamo's recompile limit,
    8 by default, applies).
    """

    def __init__(self, name: str):
        if name is None:  # (check_backend_name takes None, "not given", which means nothing here)
            raise ValueError(f"use_backend needs a backend name, one of {', '.join(BACKEND_NAMES)}; got None")
        check_backend_name(name)
        self.name = name

    def __enter__(self):
        if _dynamo_compiling():
            _traced.append(self.name)
        else:
            token = _scope.selection.set(_scope.selection.get() + (self.name,))
            _scope.tokens.set(_scope.tokens.get() + (token,))
        return self

    def __exit__(self, *exc):
        if _dynamo_compiling():
            _traced.pop()
            return False
        tokens = _scope.tokens.get()
        if not tokens:
            raise RuntimeError("use_backend exited in a thread or asyncio task that has not entered it")
        _scope.tokens.set(tokens[:-1])
        _scope.selection.reset(tokens[-1])
        return False

    def __call__(self, func):
        """Decorate ``func``: plain functions as contextlib.ContextDecorator does; generator
        functions, coroutine functions and async generator functions so that the selection is
        active while their body runs (each step), and only then."""
        if inspect.isgeneratorfunction(func):
            return _wrap_generator(self, func)
        if inspect.iscoroutinefunction(func):
            @functools.wraps(func)
            async def coroutine_in_scope(*args, **kwargs):
                with self:
                    return await func(*args, **kwargs)
            return coroutine_in_scope
        if inspect.isasyncgenfunction(func):
            return _wrap_async_generator(self, func)
        return super().__call__(func)

    def _recreate_cm(self):
        # (ContextDecorator's hook: a decorated function enters a new object, made inside
        # it, which Dynamo can trace when the function is compiled; one made outside, as a
        # decorator's, it refuses to enter)
        return type(self)(self.name)


def _wrap_generator(cm, func):
    """``func``, a generator function, with ``cm`` entered around each step of its generators
    (as torch.utils._contextlib._wrap_generator does for torch.no_grad)."""
    @functools.wraps(func)
    def generator_in_scope(*args, **kwargs):
        gen = func(*args, **kwargs)  # (runs nothing of the body yet)
        try:
            with cm:
                response = gen.send(None)
            while True:
                try:
                    request = yield response
                except GeneratorExit:
                    with cm:
                        gen.close()
                    raise
                except BaseException:
                    with cm:
                        response = gen.throw(*sys.exc_info()[1:2])
                else:
                    with cm:
                        response = gen.send(request)
        except StopIteration as e:
            return e.value
    return generator_in_scope


def _wrap_async_generator(cm, func):
    """``func``, an async generator function, with ``cm`` entered around each step (``asend``,
    ``athrow``, ``aclose``) of its generators."""
    @functools.wraps(func)
    async def async_generator_in_scope(*args, **kwargs):
        agen = func(*args, **kwargs)
        try:
            with cm:
                response = await agen.asend(None)
            while True:
                try:
                    request = yield response
                except GeneratorExit:
                    with cm:
                        await agen.aclose()
                    raise
                except BaseException:
                    with cm:
                        response = await agen.athrow(*sys.exc_info()[1:2])
                else:
                    with cm:
                        response = await agen.asend(request)
        except StopAsyncIteration:
            return
    return async_generator_in_scope


def available_backends() -> dict[str, dict]:
    """Each backend: whether it can run on this machine, the devices it runs on and why not."""
    report = {}
    for name, backend in BACKENDS.items():
        reasons = backend.unavailable_reasons()
        report[name] = {"available": not reasons, "devices": tuple(backend.devices), "reasons": reasons}
    return report


def get_backend(name: str) -> Backend:
    """The backend of a resolved name (what ``resolve`` returns and the ops and autograd Functions
    take): "auto" and unknown names are a ValueError (they were a bare KeyError)."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):  # (TypeError: an unhashable name)
        raise ValueError(f"backend must be a resolved backend name, one of {', '.join(map(repr, BACKENDS))}, got "
                         f"{name!r}" + (" ('auto' is resolved by the functional calls: fused_attn.backends.resolve)"
                                        if name == "auto" else "")) from None


__all__ = ["BACKENDS", "BACKEND_NAMES", "Backend", "Call", "OPS", "BackendUnavailableError", "resolve",
           "resolve_options", "resolve_values", "use_backend", "available_backends", "get_backend",
           "check_backend_name"]
