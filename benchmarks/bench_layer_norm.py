"""Benchmarks of residual-add + LayerNorm/RMSNorm (fused_attn.functional.layer_norm_residual): forward, backward, forward + backward.

Shapes, dtypes and implementations are parametrised in benchmarks/conftest.py. Run with
``pytest benchmarks/bench_layer_norm.py --benchmark-only --benchmark-group-by=group``.
"""
OP = "layer_norm"


def test_fwd(run_bench, point):
    run_bench(point, "fwd")


def test_bwd(run_bench, point):
    run_bench(point, "bwd")


def test_fwd_bwd(run_bench, point):
    run_bench(point, "fwd+bwd")
