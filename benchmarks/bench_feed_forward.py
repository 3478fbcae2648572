"""Benchmarks of the feed-forward block (fused_attn.functional.feed_forward): forward, backward, forward + backward.

Shapes, dtypes and implementations are parametrised in benchmarks/conftest.py. Run with
``pytest benchmarks/bench_feed_forward.py --benchmark-only --benchmark-group-by=group``.
"""
OP = "feed_forward"


def test_fwd(run_bench, point):
    run_bench(point, "fwd")


def test_bwd(run_bench, point):
    run_bench(point, "bwd")


def test_fwd_bwd(run_bench, point):
    run_bench(point, "fwd+bwd")
