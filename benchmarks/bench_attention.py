"""Benchmarks of scaled dot-product attention (fused_attn.functional.attention): forward, backward, forward + backward.

Shapes, dtypes and implementations are parametrised in benchmarks/conftest.py. Run with
``pytest benchmarks/bench_attention.py --benchmark-only --benchmark-group-by=group``.
"""
OP = "attention"


def test_fwd(run_bench, point):
    run_bench(point, "fwd")


def test_bwd(run_bench, point):
    run_bench(point, "bwd")


def test_fwd_bwd(run_bench, point):
    run_bench(point, "fwd+bwd")
