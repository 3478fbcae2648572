"""Stand-in modules for another library's import paths (``patch_flash_attn``, ``patch_xformers``):
code written against that library finds fused_attn's implementations of its API when it imports
it, until the patch is undone."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


class StandInModules:
    """Put modules named ``modules``' keys in ``sys.modules``, each holding the objects its value
    maps names to (packages, those listed in ``packages``, get an empty ``__path__``); the top
    module's ``__version__`` is ``version`` (ending in "+fused_attn"). An installed library of
    that name is not shadowed unless ``force=True`` (RuntimeError). ``undo()`` (or leaving a
    ``with`` block) puts back what was there."""

    def __init__(self, top: str, modules: dict, packages: set, version: str, force: bool):
        if not isinstance(force, bool):
            raise TypeError(f"force must be a bool, got {type(force).__name__}")
        if not force and _installed(top):
            raise RuntimeError(f"{top} is installed: this patch would shadow it. Pass force=True to route it to "
                               f"fused_attn anyway, or import fused_attn.integrations.{top}")
        self.saved = {name: sys.modules.get(name) for name in modules}
        self.installed = {name: _module(name, attrs, name in packages) for name, attrs in modules.items()}
        self.installed[top].__version__ = version
        for name, module in self.installed.items():
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(self.installed[parent], child, module)
        for name, module in self.installed.items():
            module.__dict__["_fused_attn_saved"] = self.saved[name]
        sys.modules.update(self.installed)

    def undo(self) -> None:
        """Put back the modules that were there before this patch (where this patch's are still in
        place). Patches undone out of order end the same: a stand-in put back is one whose own patch
        is still on, else what that patch had found."""
        for name, module in self.installed.items():
            module.__dict__["_fused_attn_undone"] = True
            if sys.modules.get(name) is not module:
                continue
            previous = self.saved[name]
            while previous is not None and previous.__dict__.get("_fused_attn_undone"):
                previous = previous.__dict__["_fused_attn_saved"]
            if previous is None:
                del sys.modules[name]
            else:
                sys.modules[name] = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.undo()
        return False


def _installed(top: str) -> bool:
    """Whether the real library is importable (or imported): a stand-in of ours does not count."""
    existing = sys.modules.get(top)
    if existing is not None:
        return not getattr(existing, "__version__", "").endswith("+fused_attn")
    try:
        return importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        return False


def _module(name: str, attrs: dict, package: bool) -> types.ModuleType:
    module = types.ModuleType(name, f"fused_attn's stand-in for {name}")
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=package)
    if package:
        module.__path__ = []
    for attr, value in attrs.items():
        setattr(module, attr, value)
    module.__all__ = list(attrs)
    provided = ", ".join(attrs) or "only submodules"

    def missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise AttributeError(f"module {name!r} (fused_attn's stand-in) has no attribute {attr!r}: it provides "
                             f"{provided}")

    module.__getattr__ = missing
    return module
