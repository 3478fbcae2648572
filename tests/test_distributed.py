"""Training steps under DistributedDataParallel and FSDP2 (fully_shard), gloo over 2 CPU processes,
equal the single-process steps; swapped norms under tensor parallelism's SequenceParallel (DTensor
inputs) equal torch's norms there; attention on DTensors (sharded on heads, batch, sequence or head
dim, every option) equals attention on the whole tensors, gradients included.

The test runs this file as a script in a subprocess (bounded by a timeout); the script spawns the
two ranks. Each rank trains on its half of the batch; rank 0 then compares the resulting
parameters with a single-process model trained on the whole batch.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WORLD, STEPS, BATCH, SEQ, D, H = 2, 2, 4, 7, 32, 4


def _build(kind):
    import fused_attn

    torch.manual_seed(0)
    if kind == "fused":
        body = fused_attn.Transformer(D, H, 2, d_ff=48, norm_first=True, num_kv_heads=2)
    else:  # a torch encoder with the fused modules swapped in
        layer = torch.nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True)
        body = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        fused_attn.swap_modules(body)
    return torch.nn.Sequential(body, torch.nn.Linear(D, 3))


def _data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, BATCH, SEQ, D, generator=gen), torch.randn(STEPS, BATCH, SEQ, 3, generator=gen)


def _train(model, xs, ys):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _rank(rank, cases, port, result_path):
    import warnings

    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = []
    try:
        for case in cases:
            results.append(f"{case} " + _case(rank, *case.split(":")))
            # Progress on stderr, so a failure message says how far each rank got.
            print(f"rank {rank}: {case} done", file=sys.stderr, flush=True)
        if rank == 0:
            Path(result_path).write_text("\n".join(results))
        # Tear down together: rank 1 finishes long before rank 0 (which also trains the
        # single-process model), and a rank destroying the group while its peer still runs aborted
        # once in gloo ("terminate called without an active exception", SIGABRT in rank 1).
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every case is done and checked in by both ranks. Leave without interpreter finalisation:
    # objects still holding gloo's threads (the device mesh FSDP caches) are otherwise destroyed in
    # arbitrary order at exit, and CI once saw rank 1 abort there after all its work ("terminate
    # called without an active exception", SIGABRT), which is torch's shutdown, not the steps.
    print(f"rank {rank}: exiting", file=sys.stderr, flush=True)
    os._exit(0)


def _case(rank, mode, kind):
    """Train the distributed model; on rank 0 also the single-process one, and return
    'max |difference| max |change| parameter-count'."""
    if mode == "sp":
        return _sequence_parallel(rank)
    if mode == "tp":
        return _attention_on_dtensors() if kind == "attention" else _dropout_on_dtensors()
    model = _build(kind)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in model[0].layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    xs, ys = _data()
    share = BATCH // WORLD
    _train(wrapped, xs[:, rank * share:(rank + 1) * share], ys[:, rank * share:(rank + 1) * share])
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters()}
    if rank != 0:
        return ""
    single = _build(kind)
    _train(single, xs, ys)
    worst = max((params[n] - p).abs().max().item() for n, p in single.named_parameters())
    changed = max((p - q).abs().max().item() for (n, p), q in zip(single.named_parameters(),
                                                                  _build(kind).parameters()))
    return f"{worst} {changed} {len(params)}"


def _sequence_parallel(rank):
    """Swapped norms under tensor parallelism's SequenceParallel (input, output and the gradients
    DTensors sharded along the sequence; the fused ops have no sharding rules, so those calls run
    the reference math): the outputs and parameter gradients of torch's norms there. Returns
    'max |difference| max |value| tensor-count' (each rank checks)."""
    import fused_attn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import SequenceParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    x = torch.randn(BATCH, SEQ, D, generator=torch.Generator().manual_seed(2))
    weights = torch.randn(BATCH, WORLD * SEQ, D, generator=torch.Generator().manual_seed(3))
    worst = largest = 0.0
    count = 0
    for make in (lambda: torch.nn.LayerNorm(D), lambda: torch.nn.RMSNorm(D)):
        results = []
        for swap in (False, True):
            torch.manual_seed(0)
            norm = make()
            with torch.no_grad():
                norm.weight.uniform_(0.5, 1.5)
            if swap:
                assert len(fused_attn.swap_modules(norm).replaced) == 1
            parallelize_module(norm, mesh, SequenceParallel())
            out = norm(x).full_tensor()
            (out * weights).sum().backward()
            results.append([out] + [p.grad.full_tensor() for p in norm.parameters()])
        for a, b in zip(*results):
            worst, largest, count = max(worst, (a - b).abs().max().item()), max(largest, a.abs().max().item()), count + 1
    return f"{worst} {largest} {count}"


def _attention_on_dtensors():
    """``attention`` (and ``scaled_dot_product_attention`` through it) given DTensors (tensor
    parallelism's heads, and the sequence, batch and head dims too), each option in turn: the
    output (and lse), as a whole, and every gradient equal the plain call's, the output sharded as
    q where the heads or the batch are. Plain masks, slopes and sinks next to DTensor q, k, v count
    as replicated. Returns 'max |difference| max |value| tensor-count' (each rank checks)."""
    import fused_attn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(4)
    B, Hq, L, E = 2, 4, 6, 8
    q, k, v = (torch.randn(B, Hq, L, E, generator=gen) for _ in range(3))
    k2, v2 = k[:, :2].clone(), v[:, :2].clone()  # two kv heads: grouped-query
    short_k, short_v = k[:, :, :4].clone(), v[:, :, :4].clone()  # Lk 4 < Lq 6
    slopes = fused_attn.get_alibi_slopes(Hq)
    sinks = torch.randn(Hq, generator=gen)
    bool_mask = torch.rand(B, 1, L, L, generator=gen) > 0.3
    float_mask = torch.randn(L, L, generator=gen)
    heads, sequence = Shard(1), Shard(2)
    # (name, q's placement, k's and v's, the call's k and v, options; a tensor option is a leaf
    # that requires grad when its name is in `learned`, passed plain or as a DTensor of `extra`)
    cases = [
        ("plain", heads, heads, (k, v), {}, ()),
        ("causal", heads, heads, (k, v), dict(causal=True), ()),
        ("window", heads, heads, (short_k, short_v), dict(window_size=(2, 0), alignment="bottom_right"), ()),
        ("softcap", heads, heads, (k, v), dict(softcap=3.0, scale=0.7), ()),
        ("alibi", heads, heads, (k, v), dict(alibi_slopes=slopes, causal=True), ()),
        ("learned_alibi", heads, heads, (k, v), dict(alibi_slopes=slopes), ("alibi_slopes",)),
        ("sinks", heads, heads, (k, v), dict(sinks=sinks, causal=True), ("sinks",)),
        ("sinks_sharded", heads, heads, (k, v), dict(sinks=sinks, extra=Shard(0)), ("sinks",)),
        ("bool_mask", heads, heads, (k, v), dict(attn_mask=bool_mask), ()),
        ("float_mask", heads, heads, (k, v), dict(attn_mask=float_mask), ("attn_mask",)),
        ("return_lse", heads, heads, (k, v), dict(return_lse=True, causal=True), ()),
        ("dropout", heads, heads, (k, v), dict(dropout_p=0.3, return_lse=True), ()),
        ("gqa", heads, heads, (k2, v2), dict(causal=True), ()),
        ("batch", Shard(0), Shard(0), (k, v), dict(attn_mask=bool_mask, causal=True), ()),
        ("sequence", sequence, sequence, (k, v), dict(causal=True, return_lse=True, dropout_p=0.2), ()),
        ("sequence_q", sequence, Replicate(), (short_k, short_v), dict(alibi_slopes=slopes, causal=True,
                                                                       alignment="bottom_right"), ()),
        ("head_dim", Shard(3), Shard(3), (k, v), dict(window_size=(1, 1), sinks=sinks, dropout_p=0.2), ()),
        ("sdpa", heads, heads, (k2, v2), dict(call=fused_attn.functional.scaled_dot_product_attention,
                                              is_causal=True, enable_gqa=True), ()),
    ]
    weights = torch.randn(B, Hq, L, E, generator=gen)
    worst = largest = 0.0
    count = 0
    for name, q_place, kv_place, (k_, v_), options, learned in cases:
        results = []
        for distributed in (False, True):
            opts = dict(options)
            extra = opts.pop("extra", None)
            args = [q, k_, v_]
            if distributed:  # (distribute_tensor gives a leaf: the gradient is the DTensor's)
                args = [distribute_tensor(t, mesh, [p]) for t, p in zip(args, (q_place, kv_place, kv_place))]
                if extra is not None:
                    opts.update((key, distribute_tensor(opts[key], mesh, [extra])) for key in learned)
            leaves = [t.detach().clone().requires_grad_() for t in args]
            args = leaves[:]
            for key in learned:
                opts[key] = opts[key].detach().clone().requires_grad_()
                leaves.append(opts[key])
            if "dropout_p" in opts:
                opts["generator"] = torch.Generator().manual_seed(5)  # the same pair for both calls
            result = opts.pop("call", fused_attn.attention)(*args, **opts)
            out, lse = result if opts.get("return_lse") else (result, None)
            if distributed:
                assert isinstance(out, DTensor), name
                if q_place.is_shard() and q_place.dim < 2 and kv_place == q_place:
                    # batch or heads: every rank's output from its own shard, no exchange
                    assert out.placements == (q_place,), (name, out.placements)
                out, lse = out.full_tensor(), None if lse is None else lse.full_tensor()
            loss = (out * weights).sum() + (0.0 if lse is None else lse.sum())
            grads = torch.autograd.grad(loss, leaves)
            grads = [g.full_tensor() if isinstance(g, DTensor) else g for g in grads]
            results.append([out] + ([] if lse is None else [lse]) + grads)
        for a, b in zip(*results):
            assert a.shape == b.shape, (name, a.shape, b.shape)
            worst, largest = max(worst, (a - b).abs().max().item()), max(largest, a.abs().max().item())
            count += 1
    # The calls that take no DTensor name it (attention_with_kvcache failed with "invalid python
    # storage", the others inside their reference math)
    import pytest

    tokens = distribute_tensor(q[0].transpose(0, 1).contiguous(), mesh, [Shard(1)])  # (L, Hq, E)
    bounds = torch.tensor([0, 2, L], dtype=torch.int32)
    steps = distribute_tensor(q.transpose(1, 2).contiguous(), mesh, [Shard(2)])  # (B, L, Hq, E)
    cache = torch.zeros(B, 2 * L, Hq, E)
    angles = torch.randn(2 * L, E // 2, generator=gen)
    refused = [("attention_varlen", "q", lambda: fused_attn.attention_varlen(tokens, tokens, tokens, bounds, bounds)),
               ("attention_with_kvcache", "q", lambda: fused_attn.attention_with_kvcache(
                    steps, cache, cache.clone(), cache_seqlens=torch.zeros(B, dtype=torch.int32))),
               ("apply_rotary_emb", "x", lambda: fused_attn.apply_rotary_emb(steps, angles.cos(), angles.sin()))]
    for function, name, call in refused:
        with pytest.raises(TypeError, match=f"{function} takes no DTensor, got one as {name}"):
            call()
    assert not cache.any()
    return f"{worst} {largest} {count}"


def _dropout_on_dtensors():
    """The counter-based dropout of a DTensor (the reference math's on DTensors) drops the elements
    it drops of the whole tensor, whatever the placement: sharded on any dim, replicated, a partial
    sum; so the norm under sequence parallelism and the feed-forward under tensor parallelism
    (colwise w1, rowwise w2) given DTensors and a dropout equal the plain calls, gradients included.
    Returns 'max |difference| max |value| tensor-count' (each rank checks)."""
    import fused_attn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from fused_attn import _rng

    mesh = init_device_mesh("cpu", (WORLD,))
    x = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(6))
    want = _rng.apply_dropout(x, 0.4, 2**40 + 17, 5)
    worst = largest = 0.0
    count = 0
    for placement in (Shard(0), Shard(1), Shard(2), Shard(3), Replicate(), Partial()):
        if placement.is_partial():  # (the ranks' halves sum to x)
            d = DTensor.from_local(x / WORLD, mesh, [placement], run_check=False)
        else:
            d = distribute_tensor(x, mesh, [placement])
        got = _rng.apply_dropout(d, 0.4, 2**40 + 17, 5)
        assert isinstance(got, DTensor), placement
        got = got.full_tensor()
        worst, largest = max(worst, (got - want).abs().max().item()), max(largest, want.abs().max().item())
        count += 1
    # the fused modules' dropout outside an op (a pre-LN layer's last residual add), the seed drawn
    # from torch's generator
    torch.manual_seed(9)
    want = fused_attn.functional._counter_dropout(x, 0.4)
    torch.manual_seed(9)
    got = fused_attn.functional._counter_dropout(distribute_tensor(x, mesh, [Shard(2)]), 0.4).full_tensor()
    worst, count = max(worst, (got - want).abs().max().item()), count + 1
    gen = torch.Generator().manual_seed(7)  # (float64: gradients of tens, compared to float64 rounding)
    x, residual = (torch.randn(2, 6, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    weight, bias = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5, torch.randn(8, generator=gen).double()
    w1, b1, w2, b2 = (torch.randn(*shape, generator=gen, dtype=torch.float64)
                      for shape in ((12, 8), (12,), (8, 12), (8,)))
    sequence, replicated = [Shard(1)], [Replicate()]
    calls = [  # (the function, its tensors and their placements, options)
        (fused_attn.layer_norm_residual, ((x, sequence), (residual, sequence), (weight, replicated),
                                          (bias, replicated)), dict(prenorm=True)),
        (fused_attn.feed_forward, ((x, replicated), (w1, [Shard(0)]), (b1, [Shard(0)]), (w2, [Shard(1)]),
                                   (b2, replicated)), dict(activation="gelu")),
    ]
    for call, tensors, options in calls:
        results = []
        for distributed in (False, True):
            leaves = [(distribute_tensor(t, mesh, p) if distributed else t).detach().requires_grad_()
                      for t, p in tensors]
            out = call(*leaves, dropout_p=0.3, generator=torch.Generator().manual_seed(8), **options)
            outs = [o.full_tensor() if distributed else o for o in (out if isinstance(out, tuple) else (out,))]
            grads = torch.autograd.grad(sum((o * (i + 1.0)).sum() for i, o in enumerate(outs)), leaves)
            results.append(outs + [g.full_tensor() if distributed else g for g in grads])
        for a, b in zip(*results):
            worst, largest = max(worst, (a - b).abs().max().item()), max(largest, a.abs().max().item())
            count += 1
    return f"{worst} {largest} {count}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = ["ddp:fused", "fsdp2:fused", "ddp:swapped_torch", "fsdp2:swapped_torch", "sp:swapped_norms", "tp:attention",
         "tp:dropout"]


def test_distributed_steps_equal_single_process(tmp_path):
    """One subprocess, one pair of ranks, every case (starting the processes is the slow part)."""
    result = tmp_path / "result.txt"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               FUSED_ATTN_TEST_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, __file__, str(result), *CASES], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = dict(line.split(" ", 1) for line in result.read_text().splitlines())
    assert sorted(results) == sorted(CASES)
    for case in CASES:
        worst, changed, count = results[case].split()
        assert int(count) >= {"sp:swapped_norms": 5, "tp:attention": 79, "tp:dropout": 19}.get(case, 10), case
        assert float(changed) > 1e-3, f"{case}: training did not change the parameters"
        assert float(worst) < 2e-5, f"{case}: parameters differ from the single-process step by {worst}"


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(sys.argv[2:], int(os.environ["FUSED_ATTN_TEST_PORT"]), sys.argv[1]), nprocs=WORLD,
             join=True)
