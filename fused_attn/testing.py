"""The numerical oracle, one helper for every test.

For each output and gradient: ``err = max|fused - ref64|`` and ``err_lp = max|ref_lowp - ref64|``,
where ``ref64`` is the reference computed in float64 and ``ref_lowp`` the reference computed in
the input dtype. The fused result passes when ``err <= k * err_lp + floor`` (k = 2 for outputs,
k = 5 for gradients, as flash-attention's tests do) and has no NaN/inf where the reference has
none. ``floor`` absorbs the case err_lp == 0 (e.g. float64 inputs); it scales with the size of
the reference values: an output's own, and for a gradient the largest reference gradient of the
call. (A gradient can be zero by cancellation, where the float32 reference happens to be exact:
with a single key, softmax's backward gives dS = dP - rowsum(dO * O) = 0 and so dK = 0, while a
FlashAttention-style kernel, which computes the two terms along different paths, leaves their
rounding, ~1e-7 of |dO||V| summed over the queries. Measured against its own zero it fails any
floor; against the scale of the gradients the same terms build, it is float32 rounding.)

The reference *backend* is held to a fixed bound instead: ``err <= REFERENCE_RTOL[dtype] *
max(1, scale)`` (the same scale as the floor's). In float32 it runs the very computation that
gives ``ref_lowp`` (err == err_lp: ``k * err_lp + floor`` cannot fail, whatever it computes), and
in half precision a backend that computed in the input dtype rather than in float32 would equal
``ref_lowp`` again. The helpers apply it where ``backend="reference"`` is passed, or, by default,
inside ``oracle_backend("reference")`` (tests/conftest.py enters it for a test parametrised with
``backend="reference"``).
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .functional import _dtype_name

K_FORWARD = 2.0
K_GRAD = 5.0
#: absolute floor per dtype, multiplied by max(1, max|ref64|)
FLOORS = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}
#: the reference backend's fixed bound per dtype, multiplied by max(1, max|ref64|) (an output's own,
#: a gradient's the call's largest, as for FLOORS). float32: ~84 ulps of 1, 5x the largest error its
#: plain float32 arithmetic left in the tests (2e-6; an RMSNorm eps off by the statistics' scale
#: c^2 = 1/64, 3e-4, fails it). float16 / bfloat16: twice the unit roundoff: its attention computes
#: in float32 and rounds once, as does its rotary (measured: 5.5e-4 in float16, 2.5e-3 in
#: bfloat16).
REFERENCE_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}
_backend = contextvars.ContextVar("fused_attn_testing_backend", default=None)


@contextlib.contextmanager
def oracle_backend(name: Optional[str]):
    """Within the block, the oracle helpers judge results as those of backend ``name`` (where the
    call passes no ``backend=``): "reference" gets the fixed bound ``REFERENCE_RTOL``."""
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def _fixed_bound(backend: Optional[str]) -> bool:
    return (backend if backend is not None else _backend.get()) == "reference"


@dataclass
class OracleResult:
    name: str
    err: float
    err_lp: float
    bound: float
    fixed: bool = False  # (bound is the reference backend's fixed one)

    @property
    def ok(self) -> bool:
        return self.err <= self.bound

    def __str__(self):
        how = (f"the reference backend's fixed bound; err_lowp {self.err_lp:.3g}" if self.fixed
               else f"k*err_lowp with err_lowp {self.err_lp:.3g}")
        return f"{self.name}: err {self.err:.3g} vs bound {self.bound:.3g} ({how})"


def _as_tensor(x):
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def compare(name: str, actual: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, *, k: float = K_FORWARD,
            floor: Optional[float] = None, fixed_scale: Optional[float] = None) -> OracleResult:
    """Compare one tensor under the oracle; raises AssertionError with the numbers when it fails.
    ``fixed_scale``: judge ``actual`` as the reference backend's, against ``REFERENCE_RTOL[dtype]
    * max(1, fixed_scale)`` instead of ``k * err_lp + floor`` (``floor`` is then not used)."""
    actual, ref64, ref_lowp = _as_tensor(actual), _as_tensor(ref64), _as_tensor(ref_lowp)
    if actual.shape != ref64.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(ref64.shape)}")
    a, r, lp = actual.detach().double().cpu(), ref64.detach().double().cpu(), ref_lowp.detach().double().cpu()
    bad_actual, bad_ref = ~torch.isfinite(a), ~torch.isfinite(r)
    if bool((bad_actual & ~bad_ref).any()):
        n = int((bad_actual & ~bad_ref).sum())
        raise AssertionError(f"{name}: {n} NaN/inf value(s) where the float64 reference is finite")
    # Where the reference itself is non-finite, the fused result must be non-finite of the same kind.
    if bool(bad_ref.any()):
        same = (torch.isnan(a) == torch.isnan(r)) & ((a == r) | torch.isnan(r) | ~bad_ref)
        if not bool(same[bad_ref].all()):
            raise AssertionError(f"{name}: non-finite values differ from the reference's")
    finite = ~bad_ref
    err = float((a - r)[finite].abs().max()) if bool(finite.any()) else 0.0
    err_lp = float((lp - r)[finite & torch.isfinite(lp)].abs().max()) if bool((finite & torch.isfinite(lp)).any()) else 0.0
    if fixed_scale is not None:
        result = OracleResult(name, err, err_lp, REFERENCE_RTOL.get(actual.dtype, 1e-5) * max(1.0, fixed_scale),
                              fixed=True)
    else:
        if floor is None:
            floor = FLOORS.get(actual.dtype, 1e-6) * max(1.0, _scale(r))
        result = OracleResult(name, err, err_lp, k * err_lp + floor)
    if not result.ok:
        # A low-precision reference that overflowed (float16 logits beyond its range, which the
        # kernels take) has no error to scale where it is not finite: say so, where the bare
        # numbers read as a kernel k times worse than a reference that was exact
        broken = int((finite & ~torch.isfinite(lp)).sum())
        why = (f" (the {_dtype_name(ref_lowp.dtype)} reference is NaN/inf at {broken} position(s) where the "
               f"float64 one is finite: its error there is not counted, leaving the floor; judge such a call "
               f"with floor= or against a reference that does not overflow)") if broken else ""
        raise AssertionError(str(result) + why)
    return result


def _scale(ref64: torch.Tensor) -> float:
    """max|ref64| over its finite values (0 where there are none)."""
    r = ref64.detach()
    finite = torch.isfinite(r)
    return float(r[finite].abs().max()) if bool(finite.any()) else 0.0



def _prepare(x, dtype=None):
    """A fresh leaf copy of a floating tensor (in ``dtype`` if given); other values pass as they are."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(dtype or x.dtype, copy=True).requires_grad_(x.requires_grad)
    return x


def check_against_reference(fused: Callable, reference: Callable, inputs: Sequence, *, grad_out_seed: int = 0,
                            names: Optional[Sequence[str]] = None, k_forward: float = K_FORWARD,
                            k_grad: float = K_GRAD, floor: Optional[float] = None,
                            backend: Optional[str] = None) -> list[OracleResult]:
    """Run ``fused(*inputs)`` and ``reference(*inputs)`` (the latter in float64 and in the input
    dtype) and hold the outputs and the gradients of every input that requires grad to the oracle.

    ``inputs`` may mix tensors and other values; floating tensors are cast for the reference runs,
    bool/int tensors pass as they are. Outputs may be a tensor or a tuple of tensors.

    ``reference`` should compute in the dtype it is given, as ``fused_attn.reference.attention``
    does (torch's own arithmetic in that dtype sets the bound). Not ``fused_attn.attention(...,
    backend="reference")``: that backend computes half-precision inputs in float32 and rounds once,
    so its float16/bfloat16 error, and the bound with it, is float32-sized, and every fused kernel
    (ours, FlashAttention's, SDPA's, which take delta = rowsum(dO * O) from the rounded output)
    then fails ~5 % of sharp-softmax gradient cases.

    ``backend``: the backend ``fused`` runs (default: ``oracle_backend``'s); "reference" is held to
    the fixed bound ``REFERENCE_RTOL`` (module docstring).
    """
    fixed = _fixed_bound(backend)
    results = []
    runs = {}
    for label, dtype in (("fused", None), ("ref64", torch.float64), ("reflp", None)):
        args = [_prepare(x, dtype) for x in inputs]
        fn = fused if label == "fused" else reference
        outs = fn(*args)
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        runs[label] = (args, outs)
    fused_args, fused_outs = runs["fused"]
    names = list(names) if names is not None else [f"input{i}" for i in range(len(inputs))]
    for i, (f, r64, rlp) in enumerate(zip(fused_outs, runs["ref64"][1], runs["reflp"][1])):
        results.append(compare(f"output{i}", f, r64, rlp, k=k_forward, floor=floor,
                               fixed_scale=_scale(r64) if fixed else None))
    grad_idx = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
    if not grad_idx:
        return results
    gen = torch.Generator().manual_seed(grad_out_seed)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in fused_outs]
    if fixed:  # (the float64 run gets the rounded dout the others get: its rounding is no error of theirs)
        grads_out = [g.to(o.dtype).double() for g, o in zip(grads_out, fused_outs)]
    for label in ("fused", "ref64", "reflp"):
        args, outs = runs[label]
        diff = [(o, g.to(o.dtype).to(o.device)) for o, g in zip(outs, grads_out) if o.requires_grad]
        torch.autograd.backward([o for o, _ in diff], [g for _, g in diff])
    grads = []
    for i in grad_idx:
        g = runs["fused"][0][i].grad
        g64 = runs["ref64"][0][i].grad
        glp = runs["reflp"][0][i].grad
        if g is None or g64 is None:
            raise AssertionError(f"grad of {names[i]}: fused {'None' if g is None else 'present'}, reference "
                                 f"{'None' if g64 is None else 'present'}")
        grads.append((i, g, g64, glp))
    finite_max = [float(g64[torch.isfinite(g64)].abs().max()) for _, _, g64, _ in grads
                  if bool(torch.isfinite(g64).any())]
    grad_scale = max([1.0] + finite_max)
    for i, g, g64, glp in grads:
        grad_floor = floor if floor is not None else FLOORS.get(g.dtype, 1e-6) * grad_scale
        results.append(compare(f"grad of {names[i]}", g, g64, glp, k=k_grad, floor=grad_floor,
                               fixed_scale=grad_scale if fixed else None))
    return results


def check_module_against_reference(fused: torch.nn.Module, reference: torch.nn.Module, inputs: Sequence, *,
                                   run: Optional[Callable] = None, grad_out_seed: int = 0,
                                   k_forward: float = K_FORWARD, k_grad: float = K_GRAD,
                                   floor: Optional[float] = None, backend: Optional[str] = None) -> list[OracleResult]:
    """The oracle for whole modules: ``fused`` against ``reference`` run in float64 (a deep copy
    cast with ``.double()``) and as given (the low-precision reference), on the same ``inputs``.

    Compares the outputs, the gradient of every parameter (matched by name: both modules must have
    the same parameter names) and of every input that requires grad. ``run(module, *inputs)``
    returns a tensor or a tuple of tensors (default: ``module(*inputs)``); use it to pick the
    logits out of a model's output object or to pass keyword arguments.

    ``backend``: the backend ``fused`` runs (default: ``oracle_backend``'s); "reference" is held to
    the fixed bound ``REFERENCE_RTOL``, each gradient at the scale of the call's largest one.
    """
    import copy

    fixed = _fixed_bound(backend)
    run = run or (lambda module, *args: module(*args))
    ref64 = copy.deepcopy(reference).double()
    fused_names = [n for n, _ in fused.named_parameters()]
    ref_names = [n for n, _ in reference.named_parameters()]
    if sorted(fused_names) != sorted(ref_names):
        raise AssertionError(f"parameter names differ: fused only {sorted(set(fused_names) - set(ref_names))}, "
                             f"reference only {sorted(set(ref_names) - set(fused_names))}")
    runs = {}
    for label, module, dtype in (("fused", fused, None), ("ref64", ref64, torch.float64), ("reflp", reference, None)):
        module.zero_grad(set_to_none=True)
        args = [_prepare(x, dtype) for x in inputs]
        outs = run(module, *args)
        runs[label] = (module, args, tuple(outs) if isinstance(outs, (tuple, list)) else (outs,))
    results = [compare(f"output{i}", f, r64, rlp, k=k_forward, floor=floor, fixed_scale=_scale(r64) if fixed else None)
               for i, (f, r64, rlp) in enumerate(zip(runs["fused"][2], runs["ref64"][2], runs["reflp"][2]))]
    gen = torch.Generator().manual_seed(grad_out_seed)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in runs["fused"][2]]
    if fixed:  # (as in check_against_reference)
        grads_out = [g.to(o.dtype).double() for g, o in zip(grads_out, runs["fused"][2])]
    for label, (module, args, outs) in runs.items():
        diff = [(o, g.to(o.dtype).to(o.device)) for o, g in zip(outs, grads_out) if o.requires_grad]
        torch.autograd.backward([o for o, _ in diff], [g for _, g in diff])
    params = {label: dict(module.named_parameters()) for label, (module, _, _) in runs.items()}
    grads = []
    for name in fused_names:
        g, g64, glp = (params[label][name].grad for label in ("fused", "ref64", "reflp"))
        if (g is None) != (g64 is None):
            raise AssertionError(f"grad of {name}: fused {'None' if g is None else 'present'}, reference "
                                 f"{'None' if g64 is None else 'present'}")
        if g is not None:
            grads.append((f"grad of {name}", g, g64, glp))
    for i, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            grads.append((f"grad of input{i}", runs["fused"][1][i].grad, runs["ref64"][1][i].grad,
                          runs["reflp"][1][i].grad))
    grad_scale = max([0.0] + [_scale(g64) for _, _, g64, _ in grads if g64 is not None])
    for name, g, g64, glp in grads:
        results.append(compare(name, g, g64, glp, k=k_grad, floor=floor, fixed_scale=grad_scale if fixed else None))
    return results


def make_inputs(*shapes, dtype=torch.float32, device=None, seed=0, requires_grad=True, scale=1.0):
    """Random normal tensors (deterministic from ``seed``, drawn on the CPU) for tests and
    benchmarks, on ``device`` (default: torch's default device)."""
    device = torch.get_default_device() if device is None else device
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64, device="cpu") * scale).to(device=device, dtype=dtype)
            .requires_grad_(requires_grad) for s in shapes]


def index_view(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """t's values (a 1-D or 2-D index tensor: cu_seqlens, seqused_k, a block table, positions) in a
    view that is neither contiguous nor at the start of its storage, every stride != 1: a 1-D t as
    the middle column of a (n, 3) buffer, a 2-D t as every other column of its transpose stored
    one row in. The rest of the buffer holds ``fill``, read only by a kernel that ignores a stride
    or the offset. Tests pass it where a contiguous tensor would do and expect the same answer."""
    if t.dim() == 1:
        buf = torch.full((t.shape[0], 3), fill, dtype=t.dtype, device=t.device)
        view = buf[:, 1]
    elif t.dim() == 2:
        buf = torch.full((t.shape[1] + 1, 2 * t.shape[0]), fill, dtype=t.dtype, device=t.device)
        view = buf[1:, ::2].t()
    else:
        raise ValueError(f"index_view takes a 1-D or 2-D tensor, got shape {tuple(t.shape)}")
    view.copy_(t)
    return view


def cpu_has_avx512bf16() -> bool:
    """Whether this CPU has the AVX512-BF16 dot products (with AVX512BW/VL) the cpu backend's
    bfloat16 attention paths use (read from /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags and "avx512bw" in flags and "avx512vl" in flags


def reconstruct_dropout_mask(seed: int, offset: int, p: float, n_rows: int, n_cols: int) -> torch.Tensor:
    """The keep-mask every backend uses for (seed, offset) (see fused_attn._rng)."""
    from . import _rng
    return _rng.keep_mask(seed, offset, p, n_rows, n_cols)


__all__ = ["backend_cases", "compare", "check_against_reference", "check_module_against_reference", "index_view",
           "make_inputs", "oracle_backend", "reconstruct_dropout_mask", "OracleResult", "runnable_backends",
           "K_FORWARD", "K_GRAD", "FLOORS", "REFERENCE_RTOL"]


def backend_cases(op: str, dtype=torch.float32, *, reference_on_gpu: bool = False, **options) -> list:
    """pytest parameters ``(device, backend)`` for every backend that takes ``op`` in ``dtype`` (and
    the dispatch facts ``options``, e.g. ``alibi=True``, ``varlen=True``) on each device of this
    machine: every backend on the CPU; on a GPU the fused ones (the reference backend is the oracle
    itself, already run on the CPU) unless ``reference_on_gpu``. The GPU cases carry the ``gpu``
    mark, so benchmarks/gpu_check.sh (``pytest -m gpu``) runs them."""
    import pytest

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pytest.param(device, backend, id=f"{device}-{backend}", marks=(pytest.mark.gpu,) if device == "cuda" else ())
            for device in devices for backend in runnable_backends(op, device=device, dtype=dtype, **options)
            if reference_on_gpu or not (device == "cuda" and backend == "reference")]


def union_cases(*case_lists) -> list:
    """The ``backend_cases`` of several ops, each (device, backend) once, sorted by id. By id, not
    through a set: the GPU cases' marks (pytest's MarkDecorator) are unhashable, so a set of them
    fails to collect on a machine with a GPU, while the CPU cases (no marks) hash."""
    return sorted({case.id: case for cases in case_lists for case in cases}.values(), key=lambda case: case.id)


def runnable_backends(op: str, device="cpu", dtype=torch.float32, **options) -> list[str]:
    """The backends that can take ``op`` on this machine for ``device``/``dtype`` (tests parametrise on it)."""
    from .backends import BACKENDS, Call

    call = Call(op, torch.device(device), dtype, options)
    return [name for name, backend in BACKENDS.items() if not backend.call_reasons(call)]
