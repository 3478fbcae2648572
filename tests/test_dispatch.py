"""Backend dispatch: auto order, forcing, use_backend, the environment variable, fallbacks, reasons."""
import importlib.util
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import fused_attn
from fused_attn import backends
from fused_attn import functional as F
from fused_attn.backends import BACKENDS, BackendUnavailableError, Call, resolve, use_backend
from fused_attn.backends.triton import interpreter_enabled

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
    assert (not triton_backend.unavailable_reasons()) == interpreter_enabled()
    reasons = triton_backend.call_reasons(Call("attention", torch.device("cpu"), torch.bfloat16, {}))
    assert any("bfloat16" in r for r in reasons)


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("Yes", True), ("false", False), ("0", False),
                                       ("off", False), ("no", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    # Triton reads TRITON_INTERPRET as a yes/no flag: "false" (or off, no, empty) is off, where
    # fused_attn took every value but "" and "0" as on, reported triton available on CPU and
    # then crashed in Triton ("0 active drivers").
    monkeypatch.setenv("TRITON_INTERPRET", value)
    # (resolve() caches its answers, as what the machine has is fixed once fused_attn is imported:
    # an earlier test's triton call on this process must not answer for this variable's value)
    monkeypatch.setattr(backends, "_resolved", {})
    assert interpreter_enabled() is on
    if importlib.util.find_spec("triton") is not None:
        from triton._C.libtriton import getenv_bool  # what the installed Triton itself decides

        assert getenv_bool("TRITON_INTERPRET", False) is on
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    from fused_attn.backends.triton import _interpreter_numpy_clash

    assert (not BACKENDS["triton"].unavailable_reasons()) == (on and not _interpreter_numpy_clash())
    if not on:
        q = torch.randn(1, 1, 4, 8)
        with pytest.raises(BackendUnavailableError,
                           match=re.escape(f"TRITON_INTERPRET={value!r} leaves the Triton interpreter off")):
            F.attention(q, q, q, backend="triton")


@pytest.mark.parametrize("triton_version, numpy_version, clash", [
    ("3.6.0", "2.4.6", True), ("3.5.1", "2.4.0", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False),
    ("3.9.0", "2.4.6", False), ("3.10.0", "3.0.0", False), ("3.6.0+git1a2b", "2.4rc1", True),
    ("3.7.0+git1a2b", "2.5.0.dev0", False), ("unknown", "2.4.0", False)])
def test_triton_interpreter_that_cannot_run_with_numpy_is_unavailable(monkeypatch, triton_version, numpy_version,
                                                                         clash):
    # Triton <= 3.6's interpreter does int(one-element array) for loop bounds, which numpy 2.4
    # refuses: every banded or ALiBi attention call failed with an InterpreterError deep in
    # Triton. The backend now says so up front, with the way out.
    triton = pytest.importorskip("triton")
    import numpy

    from fused_attn.backends import triton as triton_backend_module

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setattr(triton_backend_module, "_interpreter_numpy_clash",
                        triton_backend_module._interpreter_numpy_clash.__wrapped__)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_resolved", {})
    reasons = BACKENDS["triton"].unavailable_reasons()
    if not clash:
        assert not reasons
        return
    assert reasons == [f"the interpreter of triton {triton_version} cannot run with numpy {numpy_version} (it "
                       "converts one-element arrays to int, which numpy 2.4 refuses; fixed in triton 3.7): "
                       "install numpy<2.4 or triton>=3.7"]
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(BackendUnavailableError, match=re.escape("install numpy<2.4 or triton>=3.7")):
        F.attention(q, q, q, causal=True, backend="triton")


def test_triton_interpreter_without_numpy_is_unavailable_not_a_crash(monkeypatch):
    # The interpreter runs on numpy, which neither torch nor triton requires: without it the
    # backend is unavailable and says why; automatic selection goes on to the next backend (the
    # version check's unguarded import raised from every call and from available_backends()).
    pytest.importorskip("triton")
    from fused_attn.backends import triton as triton_backend_module

    monkeypatch.setitem(sys.modules, "numpy", None)
    monkeypatch.setattr(triton_backend_module, "_interpreter_numpy_clash",
                        triton_backend_module._interpreter_numpy_clash.__wrapped__)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_resolved", {})
    (reason,) = BACKENDS["triton"].unavailable_reasons()
    assert reason.startswith("the Triton interpreter cannot run: ") and "numpy" in reason
    assert fused_attn.available_backends()["triton"]["available"] is False
    assert resolve(CPU_F32) in ("cpu", "reference")


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


# ---------------------------------------------------------------------------------------------
# use_backend is scoped to the thread and the asyncio task that enter it (a ContextVar).


def _requested():
    return backends.requested_backend(None)


def test_use_backend_is_per_thread():
    """A block in one thread selects nothing in another, and interleaved exits restore each
    thread's own selection (one process-wide stack made another thread run on 'reference', and
    thread A's exit popped thread B's 'cpu')."""
    import threading

    seen = {}
    a_in, b_checked, b_in, a_out = (threading.Event() for _ in range(4))

    def thread_a():
        with use_backend("reference"):
            a_in.set()
            b_checked.wait(10)
            seen["A inside"] = _requested()
            b_in.wait(10)
        seen["A after"] = _requested()
        a_out.set()

    def thread_b():
        a_in.wait(10)
        seen["B alone"] = _requested()
        b_checked.set()
        with use_backend("cpu"):
            b_in.set()
            a_out.wait(10)
            seen["B inside"] = _requested()
            seen["B resolves"] = resolve(CPU_F32) if not BACKENDS["cpu"].call_reasons(CPU_F32) else "cpu"
        seen["B after"] = _requested()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"A inside": "reference", "A after": "auto", "B alone": "auto", "B inside": "cpu",
                    "B resolves": "cpu", "B after": "auto"}
    assert _requested() == "auto"


@pytest.mark.skipif(BACKENDS["triton"].unavailable_reasons() != [] or not interpreter_enabled(),
                    reason="needs the Triton interpreter")
def test_interpreted_triton_launches_from_several_threads():
    """Triton's interpreter patches triton.language process-wide during a launch: four threads
    launching at once raised "Did you forget to add @triton.jit?" InterpreterErrors and returned
    wrong outputs, silently. The backend serialises interpreted launches."""
    import threading

    results, errors = [], []
    start = threading.Barrier(4, timeout=30)

    def work(seed):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, 2, 33, 16, generator=g) for _ in range(3))
        x, res, w = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g), torch.randn(24, generator=g)
        start.wait()
        try:
            for _ in range(2):
                results.append((F.attention(q, k, v, backend="triton"), F.attention(q, k, v, backend="reference")))
                results.append((F.layer_norm_residual(x, res, w, backend="triton"),
                                F.layer_norm_residual(x, res, w, backend="reference")))
        except Exception as error:  # (collected: an exception in a thread does not fail the test)
            errors.append(repr(error))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert errors == []
    assert len(results) == 16
    for got, expected in results:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_use_backend_is_per_asyncio_task():
    """A task's block does not reach another task that runs while it awaits; a task created
    inside a block starts with that selection."""
    import asyncio

    async def holds(name, delay):
        with use_backend(name):
            await asyncio.sleep(delay)
            return _requested()

    async def looks(delay):
        await asyncio.sleep(delay)
        return _requested()

    async def main():
        first = await asyncio.gather(holds("reference", 0.05), looks(0.01))
        # task 1 enters 'reference', task 2 enters 'cpu', task 1 exits first: task 2 keeps 'cpu'
        second = await asyncio.gather(holds("reference", 0.01), asyncio.sleep(0.005), holds("cpu", 0.03))
        with use_backend("reference"):
            inherited = await asyncio.create_task(looks(0))
        return first, second, inherited, _requested()

    first, second, inherited, after = asyncio.run(main())
    assert first == ["reference", "auto"]
    assert second[0] == "reference" and second[2] == "cpu"
    assert inherited == "reference" and after == "auto"


def test_use_backend_nests_and_one_object_can_be_reentered():
    ref = use_backend("reference")
    with ref:
        with use_backend("cpu"):
            with ref:  # the same object entered again inside itself
                assert _requested() == "reference"
            assert _requested() == "cpu"
        assert _requested() == "reference"
    assert _requested() == "auto"
    with pytest.raises(KeyError):
        with ref:
            with use_backend("cpu"):
                raise KeyError("an exception leaves every block")
    assert _requested() == "auto"

    # one object (a decorator's, or a module-level constant) entered by two threads at once
    import threading

    inside, release, seen = threading.Barrier(2, timeout=10), threading.Event(), []

    def worker(wait):
        with ref:
            inside.wait()
            if wait:
                release.wait(10)
            seen.append(_requested())
        if not wait:
            release.set()  # this thread exits first: the other must keep its selection
        seen.append(_requested())

    threads = [threading.Thread(target=worker, args=(w,)) for w in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(seen) == ["auto", "auto", "reference", "reference"]


def test_use_backend_decorates_generators_and_coroutines():
    """As a decorator, the selection applies while the body runs: each step of a generator
    (not between them, in the caller), a coroutine while it runs (it applied to neither: the
    block was left when the generator / coroutine object was made, before the body ran)."""
    import asyncio

    @use_backend("reference")
    def gen():
        sent = yield _requested()
        assert sent == "to the generator"
        try:
            yield _requested()
        except ZeroDivisionError:
            yield "thrown: " + _requested()
        return "done"

    g = gen()
    assert _requested() == "auto"
    assert next(g) == "reference" and _requested() == "auto"
    assert g.send("to the generator") == "reference" and _requested() == "auto"
    assert g.throw(ZeroDivisionError()) == "thrown: reference"
    with pytest.raises(StopIteration) as stop:
        next(g)
    assert stop.value.value == "done" and _requested() == "auto"
    closed = []

    @use_backend("cpu")
    def closing():
        try:
            yield 1
        finally:
            closed.append(_requested())

    c = closing()
    next(c)
    c.close()
    assert closed == ["cpu"] and _requested() == "auto"

    @use_backend("reference")
    async def coro():
        await asyncio.sleep(0)
        return _requested()

    @use_backend("reference")
    async def agen():
        await asyncio.sleep(0)
        yield _requested()
        yield _requested()

    async def main():
        steps = []
        async for value in agen():
            steps.append((value, _requested()))
        return await coro(), steps, _requested()

    assert asyncio.run(main()) == ("reference", [("reference", "auto"), ("reference", "auto")], "auto")

    @use_backend("reference")
    def plain():
        return _requested()

    assert plain() == "reference" and plain.__name__ == "plain"


# ---------------------------------------------------------------------------------------------
# use_backend and torch.compile: the selection is read in the traced code and guarded on.


@pytest.fixture
def ran_norm_on(norm_forward_backends):
    """The backends the layer_norm_residual forwards ran on (conftest's spies), in order, with
    Dynamo's caches reset around the test."""
    torch._dynamo.reset()
    yield norm_forward_backends
    torch._dynamo.reset()


def _norm(x):
    return F.layer_norm_residual(x, None, None, None)


def _auto_cpu():
    return resolve(Call("layer_norm_residual", torch.device("cpu"), torch.float32,
                        {"dropout": False, "hidden": 16, "residual_in_fp32": False, "rms": False}))


def test_use_backend_inside_a_compiled_function(ran_norm_on):
    """A block written inside the compiled function applies to the calls traced in it (it was
    ignored: the traced calls ran on auto's choice), with fullgraph=True and nested blocks."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def fn(x):
        y = _norm(x)
        with use_backend("reference"):
            y = _norm(y)
            with use_backend("auto"):
                y = _norm(y)
        return _norm(y)

    x = torch.randn(4, 16)
    auto = _auto_cpu()
    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    compiled(x)
    assert ran_norm_on == [auto, "reference", auto, auto] and counter.frame_count == 1
    ran_norm_on.clear()
    with use_backend("reference"):  # the blocks outside and inside the compiled code together
        compiled(x)
    assert ran_norm_on == ["reference", "reference", auto, "reference"] and counter.frame_count == 2
    assert backends._traced == [] and _requested() == "auto"

    @use_backend("reference")
    def decorated(x):
        return _norm(x)

    ran_norm_on.clear()
    torch.compile(decorated, backend="eager", fullgraph=True)(x)
    assert ran_norm_on == ["reference"]


def test_compiled_function_follows_use_backend_and_the_environment(ran_norm_on, monkeypatch):
    """A function compiled under one selection is compiled again when called under another
    (use_backend, FUSED_ATTN_BACKEND), once per distinct selection, then reused (it kept the
    backend it was first traced with)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    compiled = torch.compile(_norm, backend=counter, fullgraph=True)
    x = torch.randn(4, 16)
    auto = _auto_cpu()
    for _ in range(3):
        compiled(x)
        with use_backend("reference"):
            compiled(x)
    assert ran_norm_on == [auto, "reference"] * 3
    assert counter.frame_count == 2  # one per selection, none after
    ran_norm_on.clear()
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "reference")
    compiled(x)
    with use_backend("auto"):
        compiled(x)
    # (the same two requests as before, whichever way they are made: nothing new to compile)
    assert ran_norm_on == ["reference", auto] and counter.frame_count == 2
    if fused_attn.extension_error() is None:
        ran_norm_on.clear()
        monkeypatch.setenv("FUSED_ATTN_BACKEND", "cpu")
        compiled(x)
        assert ran_norm_on == ["cpu"] and counter.frame_count == 3
    monkeypatch.setenv("FUSED_ATTN_BACKEND", "nonsense")
    with pytest.raises(Exception, match="FUSED_ATTN_BACKEND must be one of"):
        compiled(x)


def test_compiled_function_follows_each_threads_use_backend(ran_norm_on):
    """The guard reads the selection of the calling thread: two threads calling one compiled
    function at the same time, one inside use_backend, each run their own backend."""
    import threading

    compiled = torch.compile(_norm, backend="eager", fullgraph=True)
    x = torch.randn(4, 16)
    compiled(x)
    with use_backend("reference"):
        compiled(x)  # both compiled before the threads start
    ran_norm_on.clear()
    results, a_in, b_done = {}, threading.Event(), threading.Event()

    def thread_a():
        with use_backend("reference"):
            a_in.set()
            b_done.wait(10)
            compiled(x)
            results["A"] = ran_norm_on[-1]

    def thread_b():
        a_in.wait(10)
        compiled(x)
        results["B"] = ran_norm_on[-1]
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {"A": "reference", "B": _auto_cpu()}


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
    """The functional API hands backends.resolve_values its option names written out in name
    order (not sorted on every call), with a value for each; resolve() sorts a Call's. Both must
    give the same cache keys and the same error messages (which list the options in that order)."""
    from fused_attn import functional

    seen = []
    real = functional.resolve_values

    def spy(op, names, device, dtype, values, backend=None, compiling=None):
        assert len(names) == len(values), op
        seen.append((op, tuple(zip(names, values))))
        return real(op, names, device, dtype, values, backend, compiling)

    monkeypatch.setattr(functional, "resolve_values", spy)
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


def test_the_ops_and_functions_name_an_unresolved_backend():
    """The autograd Functions and ops take a resolved backend name (the functional calls resolve
    "auto"); "auto" or a typo raised a bare KeyError: 'auto' from inside them."""
    from fused_attn.backends import get_backend
    from fused_attn.ops import AttentionFunction
    from fused_attn.ops_common import NO_BAND

    q = torch.randn(1, 2, 3, 4)
    for name, match in (("auto", r"got 'auto' \('auto' is resolved by the functional calls"), ("cpp", "got 'cpp'")):
        with pytest.raises(ValueError, match="backend must be a resolved backend name, one of 'triton', 'cuda', "
                                             "'cpu', 'reference', " + match):
            AttentionFunction.apply(q, q, q, None, *NO_BAND, 0.0, 0.5, None, name, 0.0, None, False, False)
        with pytest.raises(ValueError, match=match):
            torch.ops.fused_attn.attention_fwd(q, q, q, None, *NO_BAND, 0.0, 0.5, None, name, 0.0, None, False)
    with pytest.raises(ValueError, match=r"got \['cpu'\]"):
        get_backend(["cpu"])


def test_environment_variable_is_read_on_every_call_however_it_is_changed(monkeypatch):
    """FUSED_ATTN_BACKEND is read on every call (README), now from os.environ's backing dict
    (``_scope.env_backend``): every way of changing os.environ shows at the next call, and an
    os.environ replaced by another mapping is read as a mapping."""
    from fused_attn.backends import _scope

    monkeypatch.delenv("FUSED_ATTN_BACKEND", raising=False)
    x = torch.randn(3, 16)
    ran = []
    for name in ("cpu", "reference"):
        real = BACKENDS[name].layer_norm_residual_fwd
        monkeypatch.setattr(BACKENDS[name], "layer_norm_residual_fwd",
                            lambda *a, _real=real, _name=name: ran.append(_name) or _real(*a))

    def requested():
        ran.clear()
        _norm(x)
        assert backends.requested_backend(None) == _scope.requested
        return backends.requested_backend(None), ran[0]

    auto = requested()
    assert auto[0] == "auto"
    os.environ["FUSED_ATTN_BACKEND"] = "reference"
    try:
        assert requested() == ("reference", "reference")
        os.environ.update(FUSED_ATTN_BACKEND="")  # empty: auto
        assert requested() == auto
        os.environ.setdefault("FUSED_ATTN_BACKEND", "cpu")  # (set already: unchanged)
        assert requested() == auto
        os.environ["FUSED_ATTN_BACKEND"] = "refrence"
        with pytest.raises(ValueError, match="FUSED_ATTN_BACKEND must be one of"):
            _norm(x)
        os.environ["FUSED_ATTN_BACKEND"] = "reference"
    finally:
        os.environ.pop("FUSED_ATTN_BACKEND")
    assert requested() == auto
    # a mapping in os.environ's place (as some test harnesses install) is read as one
    monkeypatch.setattr(os, "environ", {"FUSED_ATTN_BACKEND": "reference"})
    assert requested() == ("reference", "reference")
    os.environ["FUSED_ATTN_BACKEND"] = ""
    assert requested() == auto


def test_cpu_launchers_dispatch_the_extension_ops_as_torch_ops_do():
    """The cpu backend's launchers call the fused_attn_C ops' C++ entry points (``cpu._C_OPS``,
    looked up once) rather than through ``torch.ops``' Python ``__call__``: the same dispatch, so
    a TorchDispatchMode still sees each launch as the op's default overload."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fused_attn.backends import cpu
    from fused_attn.ops_common import NO_BAND

    if not BACKENDS["cpu"].call_reasons(Call("attention", torch.device("cpu"), torch.float32)) == []:
        pytest.skip("the cpu backend is not available")

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func)
            return func(*args, **(kwargs or {}))

    assert cpu._C_OPS.attention_fwd is torch.ops.fused_attn_C.attention_fwd._op
    q = torch.randn(1, 2, 3, 4)
    with Seen() as seen:
        out, lse = BACKENDS["cpu"].attention_fwd(q, q, q, None, *NO_BAND, 0.0, 0.5, 0, 0, 0.0, None, False)
    assert seen.ops == [torch.ops.fused_attn_C.attention_fwd.default]
    expected = torch.ops.fused_attn_C.attention_fwd(q, q, q, None, *NO_BAND, 0.0, 0.5, 0, 0, 0.0, None, False)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1])
    with pytest.raises(AttributeError):
        cpu._C_OPS.__deepcopy__  # (not an op: copy's and pickle's probes are told so)
