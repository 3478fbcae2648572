"""Benchmarks of the whole TransformerLayer (fused_attn.TransformerLayer when it exists, else the reference layer on the fused functional ops): forward, backward, forward + backward.

Shapes, dtypes and implementations are parametrised in benchmarks/conftest.py. Run with
``pytest benchmarks/bench_layer.py --benchmark-only --benchmark-group-by=group``.
"""
OP = "layer"


def test_fwd(run_bench, point):
    run_bench(point, "fwd")


def test_bwd(run_bench, point):
    run_bench(point, "bwd")


def test_fwd_bwd(run_bench, point):
    run_bench(point, "fwd+bwd")
