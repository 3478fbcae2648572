"""Backend dispatch: auto order, forcing, use_backend, the environment variable, fallbacks, reasons."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fused_attn
from fused_attn import backends
from fused_attn import functional as F
from fused_attn.backends import BACKENDS, BackendUnavailableError, Call, resolve, use_backend

CPU_F32 = Call("attention", torch.device("cpu"), torch.float32, {})


def test_available_backends_reports_every_backend_with_reasons():
    report = fused_attn.available_backends()
    assert list(report) == ["triton", "cuda", "cpu", "reference"]
    assert report["reference"]["available"] and not report["reference"]["reasons"]
    for name, entry in report.items():
        assert entry["available"] == (not entry["reasons"]), name
    if not torch.cuda.is_available():
        assert not report["cuda"]["available"]
        assert any("CPU-only" in r or "no CUDA device" in r for r in report["cuda"]["reasons"])
    if fused_attn.extension_error() is None:
        assert report["cpu"]["available"]
    else:
        assert fused_attn.extension_error() in report["cpu"]["reasons"]


def test_triton_availability_follows_the_interpreter_flag():
    triton_backend = BACKENDS["triton"]
    if torch.cuda.is_available():
        return
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert (not triton_backend.unavailable_reasons()) == interpret
    reasons = triton_backend.call_reasons(Call("attention", torch.device("cpu"), torch.bfloat16, {}))
    assert any("bfloat16" in r for r in reasons)


def test_auto_on_cpu_picks_cpu_or_reference():
    name = resolve(CPU_F32)
    assert name in ("cpu", "reference")
    assert name == ("cpu" if not BACKENDS["cpu"].call_reasons(CPU_F32) else "reference")


def test_forcing_an_unavailable_backend_lists_reasons():
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' cannot run attention on cpu float32: .*cuda"):
        resolve(CPU_F32, "cuda")
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        F.attention(q, q, q, backend="cuda")


def test_use_backend_and_environment_variable(monkeypatch):
    assert resolve(CPU_F32, "reference") == "reference"
    with use_backend("reference"):
        assert resolve(CPU_F32) == "reference"
        assert resolve(CPU_F32, "auto") in ("cpu", "reference")  # a call's backend= wins
        with use_backend("auto"):
            assert resolve(CPU_F32) == resolve(CPU_F32, "auto")
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "reference")
    assert resolve(CPU_F32) == "reference"
    with pytest.raises(BackendUnavailableError):
        with use_backend("cuda"):
            resolve(CPU_F32)
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FUSED_ATTN_BACKEND"):
        resolve(CPU_F32)
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("nonsense"):
            pass
    # checked when made, not only when entered: a plain statement selects nothing and raised nothing
    with pytest.raises(ValueError, match="backend must be one of"):
        use_backend("refrence")
    with pytest.raises(ValueError, match="use_backend needs a backend name"):
        use_backend(None)  # (every call in the block then failed with KeyError: None)

    @use_backend("reference")
    def decorated():
        return resolve(CPU_F32)

    monkeypatch.delenv("FUSED_ATTN_BACKEND")
    assert decorated() == "reference" and resolve(CPU_F32) in ("cpu", "reference")


def test_auto_fallback_to_reference_warns_once(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())
    call = Call("feed_forward", torch.device("cpu"), torch.float32, {"activation": "relu"})
    monkeypatch.setattr(BACKENDS["cpu"], "call_reasons", lambda c: ["planted reason"])
    monkeypatch.setattr(backends, "_resolved", {})  # forget choices made before the patch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve(call) == "reference"
        assert resolve(call) == "reference"
    messages = [str(w.message) for w in caught if "falls back" in str(w.message)]
    assert len(messages) == 1 and "planted reason" in messages[0]


def test_import_works_without_the_extension():
    code = ("import fused_attn, torch; r = fused_attn.available_backends(); "
            "assert not r['cpu']['available'], r; print(r['cpu']['reasons'][0]); "
            "q = torch.randn(1, 1, 3, 4); print(fused_attn.attention(q, q, q).shape)")
    env = dict(os.environ, FUSED_ATTN_DISABLE_EXTENSION="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "FUSED_ATTN_DISABLE_EXTENSION" in out.stdout and "torch.Size([1, 1, 3, 4])" in out.stdout


def test_auto_order_on_cuda_is_per_op(monkeypatch):
    """auto on CUDA tensors tries triton first, except for the feed-forward, where the cuda
    backend goes first (measured faster on the H200: backends.AUTO_ORDER_BY_OP); each falls back
    to the other when it refuses."""
    monkeypatch.setattr(backends, "_resolved", {})
    accept = lambda call: []  # noqa: E731
    monkeypatch.setattr(BACKENDS["triton"], "call_reasons", accept)
    monkeypatch.setattr(BACKENDS["cuda"], "call_reasons", accept)
    dev = torch.device("cuda")
    ffn = Call("feed_forward", dev, torch.bfloat16, {"activation": "relu"})
    attn = Call("attention", dev, torch.bfloat16, {"head_dim": 64})
    assert resolve(ffn) == "cuda" and resolve(attn) == "triton"
    monkeypatch.setattr(backends, "_resolved", {})
    monkeypatch.setattr(BACKENDS["cuda"], "call_reasons", lambda call: ["no CUDA extension"])
    assert resolve(ffn) == "triton"


def test_functional_calls_resolve_with_sorted_options(monkeypatch):
    """The functional API hands backends.resolve_options its options written out in name order
    (not sorted on every call); resolve() sorts a Call's. Both must give the same cache keys and
    the same error messages (which list the options in that order)."""
    from fused_attn import functional

    seen = []
    real = functional.resolve_options

    def spy(op, device, dtype, options, backend=None):
        seen.append((op, options))
        return real(op, device, dtype, options, backend)

    monkeypatch.setattr(functional, "resolve_options", spy)
    q = torch.randn(1, 2, 3, 4)
    F.attention(q, q, q, attn_mask=torch.ones(3, 3, dtype=torch.bool), alibi_slopes=torch.ones(2), causal=True)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    F.attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu, window_size=(1, 0))
    x = torch.randn(3, 8)
    F.layer_norm_residual(x, x, torch.ones(8), None, rms=True)
    F.feed_forward(x, torch.randn(16, 8), None, torch.randn(8, 8), None, activation="swiglu")
    assert [op for op, _ in seen] == ["attention", "attention", "layer_norm_residual", "feed_forward"]
    for op, options in seen:
        assert [name for name, _ in options] == sorted(name for name, _ in options), op
    assert dict(seen[1][1])["varlen"] is True and "varlen" not in dict(seen[0][1])
    with pytest.raises(BackendUnavailableError, match=r"\(alibi=False, causal=False, dropout=False, gqa=False, "
                                                      r"head_dim=4, head_dim_v=4, mask=None, mask_grad=False, "
                                                      r"softcap=False, window=False\)"):
        F.attention(q, q, q, backend="cuda")
