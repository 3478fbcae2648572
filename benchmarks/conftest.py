"""pytest-benchmark suites for fused_attn: ``pytest benchmarks/ --benchmark-only``.

Not part of ``make test`` (tests/ is the test path). Each file ``bench_<op>.py`` has one test per
pass (forward, backward, forward + backward), parametrised here over the op's shapes, the dtypes
and the implementations: every fused backend in ``fused_attn.backends.BACKENDS`` (a backend
that cannot take the call is skipped with its reasons, so new backends appear by themselves) and
the baselines (the eager reference, ``scaled_dot_product_attention`` -- each of its backends on
a GPU --, ``torch.compile`` of the reference).

Each benchmark's group is ``op-pass-shape-dtype`` and its name the implementation, so
``--benchmark-group-by=group`` lines the implementations of one case up, and the test ids (which
``--benchmark-compare`` matches on) stay the same across runs and machines.

Environment: FUSED_ATTN_BENCH_SHAPES = tiny | quick (default) | full (the shape sets of
``python -m fused_attn.bench``); FUSED_ATTN_BENCH_DTYPES = comma list of float16, bfloat16, float32,
float64 (default float32 on CPU, bfloat16 on CUDA); an unknown shape set or dtype stops collection; FUSED_ATTN_BENCH_DEVICE = cpu | cuda; FUSED_ATTN_BENCH_THREADS = torch CPU threads.

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-save=base
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --benchmark-compare=0001
"""
import itertools
import os

import pytest
import torch

from fused_attn import bench
from fused_attn.backends import BACKENDS

DEVICE = torch.device(os.environ.get("FUSED_ATTN_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
SHAPES = os.environ.get("FUSED_ATTN_BENCH_SHAPES") or "quick"
if SHAPES not in bench.SHAPE_SETS:  # refused here, naming the variable, before any suite collects
    raise ValueError(f"FUSED_ATTN_BENCH_SHAPES={SHAPES!r} is not a shape set "
                     f"(expected one of {', '.join(bench.SHAPE_SETS)})")
_DTYPES_TEXT = os.environ.get("FUSED_ATTN_BENCH_DTYPES") or ("bfloat16" if DEVICE.type == "cuda" else "float32")
_DTYPE_NAMES = [d.strip() for d in _DTYPES_TEXT.split(",") if d.strip()]
if not _DTYPE_NAMES or any(d not in bench.DTYPE_NAMES for d in _DTYPE_NAMES):
    raise ValueError(f"FUSED_ATTN_BENCH_DTYPES={_DTYPES_TEXT!r} is not a comma list of "
                     f"dtypes (expected names among {', '.join(bench.DTYPE_NAMES)})")
DTYPES = [getattr(torch, d) for d in _DTYPE_NAMES]
SEED = 0
if os.environ.get("FUSED_ATTN_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["FUSED_ATTN_BENCH_THREADS"]))


def pytest_collect_file(file_path, parent):
    """Collect the suites, the bench_*.py files that name their ``OP`` (pytest's default pattern is
    test_*.py), unless named on the command line, where pytest collects them already. The other
    bench_*.py files are standalone scripts (``python benchmarks/bench_rotary.py``), not suites."""
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path)
            and any(line.startswith("OP = ") for line in file_path.read_text().splitlines())):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and DEVICE.type != "cuda":
            item.add_marker(skip_gpu)


def _case_id(case):
    return case.label().replace(" ", "")


def pytest_generate_tests(metafunc):
    """Parametrise ``point`` = (case, dtype, implementation) from the module's ``OP``."""
    if "point" not in metafunc.fixturenames:
        return
    op = metafunc.module.OP
    impls = list(BACKENDS) + bench.baseline_names(op, DEVICE.type)
    points, ids = [], []
    for case, dtype, impl in itertools.product(bench.shape_set(op, SHAPES, DEVICE.type), DTYPES, impls):
        points.append((case, dtype, impl))
        ids.append(f"{_case_id(case)}-{bench._dt(dtype)}-{impl}")
    metafunc.parametrize("point", points, ids=ids)


@pytest.fixture
def run_bench(benchmark):
    """run_bench(point, pass_): time one implementation of one case in one pass."""

    def run(point, pass_):
        case, dtype, name = point
        impl = bench.single_impl(case, DEVICE, dtype, name, SEED)
        if impl is None:
            pytest.skip(f"{name} is not an implementation of {case.op} on {DEVICE.type}")
        if impl.skip:
            pytest.skip(f"{name}: {impl.skip}")
        if pass_ not in case.passes([pass_]):
            pytest.skip(f"{case.label()} is timed in {', '.join(case.passes(list(bench.PASSES)))} only")
        if impl.name in ("eager", "compile", "sdpa-math", "reference") and case.eager_bytes(dtype) > bench.memory_limit(DEVICE):
            pytest.skip(f"{name} would need ~{case.eager_bytes(dtype) / 2**30:.0f} GiB")
        sets = bench.make_sets(case, DEVICE, dtype, SEED)
        with impl.context():
            try:
                out = impl.fn(*sets[0])
            except Exception as exc:  # a baseline kernel that refuses this shape or dtype
                if impl.kind == "baseline" and bench._is_refusal(exc):
                    pytest.skip(f"{name}: {bench._short(exc)}")
                raise
            douts = bench.make_douts(out, len(sets), SEED)
            del out
            call = bench._make_call(impl, sets, douts, pass_)
            counter = itertools.count()

            def step():
                call(next(counter) % len(sets))
                if DEVICE.type == "cuda":
                    torch.cuda.synchronize(DEVICE)

            benchmark.group = f"{case.op}-{pass_}-{_case_id(case)}-{bench._dt(dtype)}"
            benchmark.name = name
            work = case.work(pass_, dtype)
            benchmark.extra_info.update(op=case.op, pass_=pass_, shape=case.label(), dtype=bench._dt(dtype), impl=name,
                                        kind=impl.kind, work=work, unit=case.unit, n_sets=len(sets))
            benchmark(step)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and stats.median:
            scale = 1e12 if case.unit == "TFLOP/s" else 1e9
            benchmark.extra_info["throughput"] = work / stats.median / scale

    return run
