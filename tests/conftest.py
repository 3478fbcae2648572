"""Test configuration shared by every test file.

Without a GPU, the Triton kernels run under the interpreter, which must be switched on before
any module defining kernels is imported: this file sets TRITON_INTERPRET=1 first thing. The
ahead-of-time compilation checks need it off and therefore run in subprocesses
(see tests/aot.py).
"""
import contextlib
import os
import sys
import types

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _oracle_backend(request):
    """A test parametrised with ``backend`` judges its oracle calls as that backend's: the
    reference backend gets the oracle's fixed bound (fused_attn.testing.REFERENCE_RTOL), where
    ``k * err_lowp`` would compare it with itself."""
    from fused_attn.testing import oracle_backend

    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    with oracle_backend(backend if isinstance(backend, str) else None):
        yield


@pytest.fixture
def device():
    return "cuda" if HAS_CUDA else "cpu"


# --- references that are really unfused ------------------------------------------------------
# swap_modules changes a swapped model's modules one by one (their class), and a copy taken
# before the swap keeps the originals; but some of what it replaces is module-level (a Hugging
# Face modeling module's apply_rotary_pos_emb: every model of that family in the process), and a
# copy of the model runs that fused code too. A reference run while those functions are fused
# compares the fused code with itself (a sign-flipped sin passed). The module-level replacements
# carry the function they replaced as ``fused_attn_original``: these run a reference with it.


@contextlib.contextmanager
def modeling_originals():
    """Within the block, every module-level function that a swap replaced in transformers'
    modeling modules is the original again (put back as fused after)."""
    patched = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("transformers.models."):
            continue
        for attr, fn in list(vars(module).items()):
            original = getattr(fn, "fused_attn_original", None) if isinstance(fn, types.FunctionType) else None
            if original is not None:
                patched.append((module, attr, fn))
                setattr(module, attr, original)
    try:
        yield
    finally:
        for module, attr, fn in reversed(patched):
            setattr(module, attr, fn)


def unfused_run(fused, run):
    """``run(module, *args)`` for check_module_against_reference in which every module but
    ``fused`` (the reference and the float64 copy it makes of it) runs under ``modeling_originals``."""
    def call(module, *args):
        if module is fused:
            return run(module, *args)
        with modeling_originals():
            return run(module, *args)
    return call


@pytest.fixture
def unswapped():
    """``unswapped.run(fused, run)`` (``unfused_run``) and ``with unswapped.functions():``
    (``modeling_originals``): run a reference model with the functions a swap replaced module-level
    put back, so that it is the unfused original."""
    return types.SimpleNamespace(run=unfused_run, functions=modeling_originals)


@pytest.fixture
def norm_forward_backends(monkeypatch):
    """The backends the layer_norm_residual forwards ran on, in order: spies set on the cpu and
    reference backend objects, each calling the real launcher."""
    from fused_attn.backends import BACKENDS

    ran = []
    for name in ("cpu", "reference"):
        real = BACKENDS[name].layer_norm_residual_fwd

        def spy(*args, _real=real, _name=name):
            ran.append(_name)
            return _real(*args)

        monkeypatch.setattr(BACKENDS[name], "layer_norm_residual_fwd", spy)
    return ran
