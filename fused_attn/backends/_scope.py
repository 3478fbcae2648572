"""Where ``use_backend`` keeps its selection: a ``contextvars.ContextVar``, so that each thread and
each asyncio task has its own (a task starts with a copy of its creator's), as torch's own modes
are per thread.

``requested`` is this module's one computed attribute (PEP 562 ``__getattr__``): the backend the
current context requests when a call names none: the innermost ``use_backend``, else the
``FUSED_ATTN_BACKEND`` environment variable (unchecked here), else ``"auto"``. It exists for
``torch.compile``: Dynamo cannot trace ``ContextVar.get``, but it reads a module attribute with
``getattr`` and guards on the value it got, and that guard calls this ``__getattr__`` again, in the
calling thread and task, before every run of the compiled code. So a function compiled under one
selection recompiles (once per distinct selection, then each is cached) when it is called under
another, in any thread or task (``backends.resolve_options``).
"""
from __future__ import annotations

import contextvars
import os

#: the names of the use_backend blocks this context is in, innermost last
selection: contextvars.ContextVar[tuple] = contextvars.ContextVar("fused_attn_use_backend", default=())
#: the tokens of those blocks' ``selection.set``, in the same order: each __exit__ resets its own
#: enter's token. Kept in the context rather than on the use_backend object, so that one object
#: may be entered by several threads or tasks at once.
tokens: contextvars.ContextVar[tuple] = contextvars.ContextVar("fused_attn_use_backend_tokens", default=())

#: os.environ as imported, its backing dict (``os._Environ._data``, encoded keys and values, which
#: every write through os.environ updates) and FUSED_ATTN_BACKEND's key in it (see ``env_backend``)
_ENVIRON = os.environ
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("FUSED_ATTN_BACKEND") if hasattr(os.environ, "encodekey") else None


def env_backend() -> str:
    """``os.environ.get("FUSED_ATTN_BACKEND", "")``, read afresh on every call (the README
    promises a change takes effect at the next call), but as one dict lookup: the Mapping path of
    ``os.environ.get`` (encode the key, look up, decode) cost ~1 us, a tenth of a small call's
    whole host time. Where os.environ has been replaced by something else, the plain read."""
    if os.environ is _ENVIRON and _ENV_DATA is not None:
        value = _ENV_DATA.get(_ENV_KEY)
        return "" if value is None else _ENVIRON.decodevalue(value)
    return os.environ.get("FUSED_ATTN_BACKEND", "")


def __getattr__(name):
    if name == "requested":
        selected = selection.get()
        if selected:
            return selected[-1]
        return env_backend() or "auto"
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
