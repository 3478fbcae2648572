"""Loads the compiled extension ``fused_attn._C`` if it was built, remembering why not otherwise."""
from __future__ import annotations

import os

import torch

_C = None
ERROR: str | None = None


#: os.environ as imported, its backing dict (``os._Environ._data``: encoded keys and values, which
#: every write through os.environ updates) and the encoded keys asked so far (see ``env_get``)
_ENVIRON = os.environ
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS: dict[str, object] = {}


def env_get(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, read afresh on every call, as one dict lookup: the
    Mapping path of ``os.environ.get`` (encode the key, look it up, decode) costs ~1 us, which a
    launcher reading a switch on every launch pays on every call. Where os.environ has been
    replaced by something else (a test harness's mapping), the plain read."""
    if os.environ is _ENVIRON and _ENV_DATA is not None:
        key = _ENV_KEYS.get(name)
        if key is None:  # (the package reads a handful of names: a few entries)
            key = _ENV_KEYS[name] = _ENVIRON.encodekey(name)
        value = _ENV_DATA.get(key)
        return default if value is None else _ENVIRON.decodevalue(value)
    return os.environ.get(name, default)


def _env_flag(name: str, default: bool = False) -> bool:
    """A yes/no environment variable: 1/true/yes/on or 0/false/no/off (any case; unset or empty
    is ``default``); anything else raises, naming the variable (``=false`` must not read as on).
    The one parser of the package's run-time switches, so that they all take the same words
    (setup.py keeps a copy: it runs before the package can be imported)."""
    value = os.environ.get(name, "")
    word = value.strip().lower()
    if not word:
        return default
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} is not a yes/no value (use 1, true, yes, on or 0, false, no, off)")


if _env_flag("FUSED_ATTN_DISABLE_EXTENSION"):
    ERROR = "fused_attn._C is disabled by FUSED_ATTN_DISABLE_EXTENSION"
else:
    import importlib.util

    try:
        if importlib.util.find_spec("fused_attn._C") is None:
            ERROR = ("fused_attn._C was not built (installed with FUSED_ATTN_NO_EXTENSION=1, or its build failed: "
                     "reinstall with `pip install --no-build-isolation -e .` and read the build log)")
        else:
            from . import _C  # noqa: F401  (registers the fused_attn_C::* ops)
    except Exception as exc:  # built against another torch, missing symbols, ...
        ERROR = f"fused_attn._C failed to load: {type(exc).__name__}: {exc}"


_HAS_KERNEL: dict[tuple[str, str], bool] = {}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered ``fused_attn_C::op`` with a kernel for ``dispatch_key``
    (asked of the dispatcher once per pair: registrations do not change once the library loaded,
    and the question costs as much as a small kernel's launch)."""
    if _C is None:
        return False
    key = (op, dispatch_key)
    found = _HAS_KERNEL.get(key)
    if found is None:
        try:
            found = torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_attn_C::{op}", dispatch_key)
        except RuntimeError:  # no such op
            found = False
        _HAS_KERNEL[key] = found
    return found
