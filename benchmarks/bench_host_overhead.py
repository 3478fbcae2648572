"""Host (Python) time per call of the functional API on tiny tensors, where the kernels cost
next to nothing and what is left is fused_attn's own overhead: validation, backend resolution,
the autograd Function, the launchers' argument handling.

    python benchmarks/bench_host_overhead.py [--calls 2000] [--runs 5]

One CPU thread; each number is the median over ``--runs`` runs of ``--calls`` calls, in us per
call, of the process's CPU time (``time.process_time``: on a shared machine other jobs'
preemptions then do not count; ``--wall`` times with ``time.perf_counter`` instead). Rows:

- ``<op> no-grad``: the cpu backend on inputs that need no gradient (the inference fast path);
  ``<op> eager``: the torch baseline (``F.layer_norm(x + r)``, SDPA, two ``F.linear``);
  ``<op> op only``: the ``torch.ops.fused_attn_C`` kernel called directly (the floor);
- ``grad fwd``: the forward on inputs that require grad (builds the graph);
  ``grad fwd+bwd``: that plus ``torch.autograd.backward`` with a prepared gradient;
- ``triton <op> fwd/bwd (stubbed)``: the Triton launchers of ``fused_attn.triton.layer_norm`` and
  ``.feed_forward`` called directly on CPU tensors with their kernels replaced by no-ops, i.e. the
  launchers' host work alone (allocations, configuration, argument lists), minus Triton's own
  launch path (the feed-forward backward's torch.mm GEMMs still run, on tiny shapes).

Not a pytest benchmark (benchmarks/conftest.py collects ``bench_*.py``; this file defines no
tests, and runs only as a script).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as TF


def _time(fn, calls: int, runs: int, clock=time.process_time) -> float:
    for _ in range(min(200, calls)):
        fn()
    samples = []
    for _ in range(runs):
        t0 = clock()
        for _ in range(calls):
            fn()
        samples.append((clock() - t0) / calls * 1e6)
    return statistics.median(samples)


class _NoLaunch:
    """Stands in for a ``@triton.jit`` / autotuned kernel: ``kernel[grid](...)`` does nothing."""

    arg_names = ()

    def __getitem__(self, grid):
        return self._launch

    @staticmethod
    def _launch(*args, **kwargs):
        return None


def _triton_cases(g):
    try:
        from fused_attn.triton import feed_forward as tff
        from fused_attn.triton import layer_norm as tln
    except Exception as exc:  # no triton installed
        print(f"(Triton launchers skipped: {exc})")
        return {}
    stub = _NoLaunch()
    for module, names in ((tln, ("_ln_fwd_kernel", "_ln_bwd_kernel", "_sum_partials_kernel")),
                          (tff, ("_ffn_gemm", "_ffn_gemm_tuned"))):
        for name in names:
            setattr(module, name, stub)
    x, r, w, b = (g(4, 64), g(4, 64), g(64), g(64))
    out, summed, mean, rstd = tln.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, False, 0, 0, True)
    dout = g(4, 64)
    fx, w1, b1, w2, b2 = g(4, 32), g(64, 32), g(64), g(32, 64), g(32)
    fout, pre = tff.feed_forward_fwd(fx, w1, b1, w2, b2, "relu", 0.0, 0, 0)
    fdout = g(4, 32)
    return {
        "triton LN fwd (stubbed)": lambda: tln.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, False, 0, 0,
                                                                       True),
        "triton LN fwd no-sum (stubbed)": lambda: tln.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, False, 0,
                                                                              0, False),
        "triton LN bwd (stubbed)": lambda: tln.layer_norm_residual_bwd(dout, None, summed, w, b, mean, rstd, 1e-5, 0.0,
                                                                       False, 0, 0, torch.float32),
        "triton FFN fwd (stubbed)": lambda: tff.feed_forward_fwd(fx, w1, b1, w2, b2, "relu", 0.0, 0, 0),
        "triton FFN bwd (stubbed)": lambda: tff.feed_forward_bwd(fdout, fx, w1, w2, pre, "relu", 0.0, 0, 0, True,
                                                                 True),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="", help="run only the rows whose name contains this")
    parser.add_argument("--wall", action="store_true", help="wall-clock time instead of CPU time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    import fused_attn
    import fused_attn._extension  # noqa: F401  (loads fused_attn_C)

    def g(*shape, grad=False):
        return torch.randn(*shape).requires_grad_(grad)

    C = torch.ops.fused_attn_C
    cases = {}

    # ---- attention: B1 H2 L16 D16 ------------------------------------------------------------
    q = g(1, 2, 16, 16)
    qg, kg, vg = g(1, 2, 16, 16, grad=True), g(1, 2, 16, 16, grad=True), g(1, 2, 16, 16, grad=True)
    dq = g(1, 2, 16, 16)
    cases["attention no-grad"] = lambda: fused_attn.attention(q, q, q)
    cases["attention causal no-grad"] = lambda: fused_attn.attention(q, q, q, causal=True)
    cases["attention sdpa"] = lambda: TF.scaled_dot_product_attention(q, q, q)
    cases["attention op only"] = lambda: C.attention_fwd(q, q, q, None, -(1 << 62), 1 << 62, 0.0, 0.25, 0, 0, 0.0,
                                                         None, False)
    cases["attention grad fwd"] = lambda: fused_attn.attention(qg, kg, vg)
    cases["attention sdpa grad fwd"] = lambda: TF.scaled_dot_product_attention(qg, kg, vg)
    cases["attention grad fwd+bwd"] = lambda: torch.autograd.backward(fused_attn.attention(qg, kg, vg), dq)
    cases["attention sdpa grad fwd+bwd"] = lambda: torch.autograd.backward(
        TF.scaled_dot_product_attention(qg, kg, vg), dq)

    # ---- varlen: two sequences of 8, H2 D16 ---------------------------------------------------
    vq = g(16, 2, 16)
    vqg = g(16, 2, 16, grad=True)
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    dvq = g(16, 2, 16)
    cases["varlen no-grad"] = lambda: fused_attn.attention_varlen(vq, vq, vq, cu, cu, 8, 8)
    cases["varlen grad fwd+bwd"] = lambda: torch.autograd.backward(
        fused_attn.attention_varlen(vqg, vqg, vqg, cu, cu, 8, 8), dvq)

    # ---- layer_norm_residual: (4, 64) ---------------------------------------------------------
    x, r, w, b = g(4, 64), g(4, 64), g(64), g(64)
    xg, rg, wg, bg = g(4, 64, grad=True), g(4, 64, grad=True), g(64, grad=True), g(64, grad=True)
    dx = g(4, 64)
    cases["layer_norm no-grad"] = lambda: fused_attn.layer_norm_residual(x, r, w, b)
    cases["layer_norm prenorm no-grad"] = lambda: fused_attn.layer_norm_residual(x, r, w, b, prenorm=True)
    cases["layer_norm eager"] = lambda: TF.layer_norm(x + r, (64,), w, b)
    cases["layer_norm op only"] = lambda: C.layer_norm_residual_fwd(x, r, w, b, 1e-5, 0.0, False, False, 0, 0, False)
    cases["layer_norm grad fwd"] = lambda: fused_attn.layer_norm_residual(xg, rg, wg, bg)
    cases["layer_norm eager grad fwd"] = lambda: TF.layer_norm(xg + rg, (64,), wg, bg)
    cases["layer_norm grad fwd+bwd"] = lambda: torch.autograd.backward(fused_attn.layer_norm_residual(xg, rg, wg, bg),
                                                                       dx)
    cases["layer_norm eager grad fwd+bwd"] = lambda: torch.autograd.backward(TF.layer_norm(xg + rg, (64,), wg, bg), dx)

    # ---- feed_forward: T4 d32 ff64 relu -------------------------------------------------------
    fx, w1, b1, w2, b2 = g(4, 32), g(64, 32), g(64), g(32, 64), g(32)
    fxg, w1g, b1g, w2g, b2g = (g(4, 32, grad=True), g(64, 32, grad=True), g(64, grad=True), g(32, 64, grad=True),
                               g(32, grad=True))
    fdx = g(4, 32)
    cases["feed_forward no-grad"] = lambda: fused_attn.feed_forward(fx, w1, b1, w2, b2)
    cases["feed_forward eager"] = lambda: TF.linear(TF.relu(TF.linear(fx, w1, b1)), w2, b2)
    cases["feed_forward op only"] = lambda: C.feed_forward_fwd(fx, w1, b1, w2, b2, "relu", 0.0, 0, 0)
    cases["feed_forward grad fwd"] = lambda: fused_attn.feed_forward(fxg, w1g, b1g, w2g, b2g)
    cases["feed_forward eager grad fwd"] = lambda: TF.linear(TF.relu(TF.linear(fxg, w1g, b1g)), w2g, b2g)
    cases["feed_forward grad fwd+bwd"] = lambda: torch.autograd.backward(fused_attn.feed_forward(fxg, w1g, b1g, w2g,
                                                                                                 b2g), fdx)
    cases["feed_forward eager grad fwd+bwd"] = lambda: torch.autograd.backward(
        TF.linear(TF.relu(TF.linear(fxg, w1g, b1g)), w2g, b2g), fdx)

    cases.update(_triton_cases(g))

    clock = time.perf_counter if args.wall else time.process_time
    print(f"torch {torch.__version__}, 1 thread, median of {args.runs} x {args.calls} calls, us per call "
          f"({'wall' if args.wall else 'CPU'} time)")
    width = max(len(n) for n in cases)
    for name, fn in cases.items():
        if args.only and args.only not in name:
            continue
        print(f"{name:<{width}}  {_time(fn, args.calls, args.runs, clock):8.2f}", flush=True)


if __name__ == "__main__":
    main()
