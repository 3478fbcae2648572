"""torch.compile over the fused modules (no graph breaks, same numbers) and opcheck of every op."""
import copy
import inspect

import pytest
import torch
import torch.nn as nn

import fused_attn
from fused_attn import functional as F
from fused_attn import modules as M
from fused_attn.backends import BACKENDS, Call
from fused_attn.ops_common import CAUSAL_BAND, NO_BAND
from fused_attn.testing import make_inputs
from torch._dynamo.testing import CompileCounterWithBackend

D, H, B, L = 32, 4, 2, 9


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _run(model, x, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out = model(x, **kwargs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    out.backward(grad_out)
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


def _assert_same(compiled, eager, atol=1e-5):
    torch.testing.assert_close(compiled[0], eager[0], atol=atol, rtol=1e-4)
    torch.testing.assert_close(compiled[1], eager[1], atol=atol, rtol=1e-4)
    assert compiled[2].keys() == eager[2].keys()
    for name in eager[2]:
        torch.testing.assert_close(compiled[2][name], eager[2][name], atol=atol, rtol=1e-4, msg=name)


def test_fused_transformer_compiles_fullgraph():
    torch.manual_seed(0)
    model = M.Transformer(D, H, 2, norm_first=True, num_kv_heads=2, activation="swiglu")
    (x,) = make_inputs((B, L, D), seed=1, requires_grad=False)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, -2:] = True
    eager = _run(model, x, key_padding_mask=padding, is_causal=True)
    compiled_model = torch.compile(model, fullgraph=True, backend="aot_eager")
    # fullgraph=True raises on any graph break: one graph for the whole stack, dispatch included
    _assert_same(_run(compiled_model, x, key_padding_mask=padding, is_causal=True), eager)


@pytest.mark.parametrize("dynamic", [False, None, True])
def test_windowed_bottom_right_attention_compiles_fullgraph(dynamic):
    """The band is computed from the shapes (bottom-right: Lk - Lq), also when they are symbolic:
    with dynamic=None the second call recompiles with symbolic sequence lengths, with dynamic=True
    the first is symbolic already."""
    def fn(q, k, v):
        return fused_attn.functional.attention(q, k, v, causal=True, window_size=(4, 0), alignment="bottom_right")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for Lq, Lk in ((5, 12), (7, 19), (3, 3)):
        q, k, v = make_inputs((1, 2, Lq, 16), (1, 2, Lk, 16), (1, 2, Lk, 16), seed=Lq)
        out = compiled(q, k, v)
        out.sum().backward()
        ref = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        expected = fn(*ref)
        expected.sum().backward()
        torch.testing.assert_close(out, expected)
        for a, b in zip((q, k, v), ref):
            torch.testing.assert_close(a.grad, b.grad)


# ---------------------------------------------------------------------------------------------
# dynamic=True: every size is symbolic from the first trace. The sizes that choose the backend
# (head dims, hidden size, Hq != Hkv) and the float options are specialised
# (functional._concrete); batch and lengths stay symbolic, so a second length reuses the graph.
# The sizes below differ from the lengths on purpose: Dynamo gives equal sizes one symbol, and
# specialising a head dim of 9 would specialise a length of 9 with it.
# ---------------------------------------------------------------------------------------------

def _grads_of(fn, args):
    """fn(*args) and the gradients of every tensor in args, from fresh leaves."""
    leaves = [a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(5)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen) for o in outs])
    return [o.detach() for o in outs], [a.grad for a in leaves if isinstance(a, torch.Tensor)]


def _check_dynamic(fn, make_args, lengths=(9, 13)):
    """fn compiled with dynamic=True, fullgraph=True matches eager at each length, and only the
    first length compiles (the frame count may include a restarted analysis, so it is compared
    after the first call, not to 1)."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=counter)
    for i, n in enumerate(lengths):
        args = make_args(n)
        got, expected = _grads_of(compiled, args), _grads_of(fn, args)
        if i == 0:
            frames = counter.frame_count
            assert frames >= 1
        for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert counter.frame_count == frames, "a new length recompiled"


def test_alibi_attention_compiles_dynamic():
    """ALiBi slopes are an ordinary tensor input: no graph break, no recompile for a new length."""
    def fn(q, k, v, slopes):
        return fused_attn.functional.attention(q, k, v, causal=True, alignment="bottom_right", alibi_slopes=slopes)

    slopes = fused_attn.get_alibi_slopes(4)
    _check_dynamic(lambda q, k, v: fn(q, k, v, slopes),
                   lambda n: make_inputs((2, 4, n, 6), (2, 2, n + 3, 6), (2, 2, n + 3, 6), seed=n))


def test_attention_compiles_dynamic():
    """GQA (Hq != Hkv), causal, window, Lq != Lk, Dv != D. dynamic=True makes the float arguments
    symbolic too: scale and softcap passed in, dropout_p's default."""
    def fn(q, k, v, scale, softcap):
        return F.attention(q, k, v, causal=True, window_size=(3, 1), scale=scale, softcap=softcap)

    _check_dynamic(fn, lambda n: [*make_inputs((2, 4, n, 16), (2, 2, n + 3, 16), (2, 2, n + 3, 24), seed=n),
                                  0.3, 5.0])


def test_layer_norm_residual_compiles_dynamic():
    def fn(x, residual, weight, bias):
        return F.layer_norm_residual(x, residual, weight, bias, prenorm=True)

    _check_dynamic(fn, lambda n: make_inputs((2, n, 24), (2, n, 24), (24,), (24,), seed=n))


def test_feed_forward_compiles_dynamic():
    def fn(x, w1, b1, w2, b2):
        return F.feed_forward(x, w1, b1, w2, b2, activation="swiglu")

    _check_dynamic(fn, lambda n: make_inputs((2, n, 24), (80, 24), (80,), (24, 40), (24,), seed=n))


@pytest.mark.parametrize("make", [
    lambda: M.MultiHeadAttention(D, H, num_kv_heads=2, causal=True, window_size=(3, 0)),
    lambda: M.TransformerLayer(D, H, 48, norm_first=True, num_kv_heads=2, activation="swiglu"),
], ids=["mha", "layer"])
def test_module_compiles_dynamic(make):
    """The modules' float attributes (eps, dropout) come through Dynamo as symbols too; with a key
    padding mask, whose length is the keys'."""
    torch.manual_seed(0)
    model = make()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, dynamic=True, fullgraph=True, backend=counter)
    for i, n in enumerate((L, L + 4)):
        (x,) = make_inputs((B, n, D), seed=n, requires_grad=False)
        padding = torch.zeros(B, n, dtype=torch.bool)
        padding[1, -2:] = True
        _assert_same(_run(compiled, x, key_padding_mask=padding), _run(model, x, key_padding_mask=padding))
        if i == 0:
            frames = counter.frame_count
    assert counter.frame_count == frames, "a new length recompiled"


def test_swapped_torch_encoder_compiles_fullgraph():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True), 2,
                                norm=nn.LayerNorm(D), enable_nested_tensor=False)
    ref = copy.deepcopy(enc)
    fused_attn.swap_modules(enc)
    (x,) = make_inputs((B, L, D), seed=2, requires_grad=False)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, -3:] = True
    eager = _run(ref, x, src_key_padding_mask=padding)
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    _assert_same(_run(compiled, x, src_key_padding_mask=padding), eager)
    # an attention mask without is_causal: torch's causal-mask detection reads the mask on the host
    # (fullgraph failed on a data-dependent guard); compiled, the mask is applied as given
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    for mask in (causal, causal.isinf(), torch.randn(L, L)):
        for kwargs in (dict(mask=mask), dict(mask=mask, src_key_padding_mask=padding)):
            _assert_same(_run(compiled, x, **kwargs), _run(ref, x, **kwargs))
    enc.eval()  # inference: the fused encoder has no nested-tensor path to break the graph
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref.eval()(x), atol=1e-5, rtol=1e-4)


class ChainMLP(nn.Module):
    """A plain chain, read from its forward by the swap (as GPT-NeoX's MLP)."""

    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(D, 48), nn.GELU(), nn.Linear(48, D)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def test_swapped_plain_mlp_compiles_fullgraph():
    """The swapped plain MLP reads its layout from its class's source at each call: under
    torch.compile that read runs when tracing (dynamo cannot trace inspect.getsource), and the
    graph holds the fused op."""
    torch.manual_seed(0)
    model = ChainMLP()
    ref = copy.deepcopy(model)
    fused_attn.swap_modules(model)
    (x,) = make_inputs((B, L, D), seed=3, requires_grad=False)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append("".join(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule)))
        return gm
    _assert_same(_run(torch.compile(model, fullgraph=True, backend=backend), x), _run(ref, x))
    assert len(graphs) == 1 and "feed_forward" in graphs[0], graphs


def test_swapped_plain_mlp_exports_with_dynamic_shapes_by_name():
    """The swapped plain MLP's forward takes its input by the original's name (``*args,
    **kwargs`` underneath) and shows the original's signature: torch.export's ``dynamic_shapes``
    name its parameter, positional or keyword call, and the program holds the fused op."""
    from torch.export import Dim

    torch.manual_seed(0)
    model = ChainMLP()
    ref = copy.deepcopy(model)
    fused_attn.swap_modules(model)
    length = Dim("length", min=2, max=64)
    (x,) = make_inputs((B, L, D), seed=5, requires_grad=False)
    (y,) = make_inputs((B, 7, D), seed=6, requires_grad=False)
    for args, kwargs in (((x,), {}), ((), {"x": x})):
        program = torch.export.export(model, args, kwargs, dynamic_shapes={"x": {1: length}})
        assert "fused_attn.feed_forward_fwd.default" in {str(n.target) for n in program.graph.nodes}
        with torch.no_grad():
            out = program.module()(y) if args else program.module()(x=y)
            torch.testing.assert_close(out, ref(y), rtol=1e-5, atol=1e-5)


def test_torch_export_with_dynamic_lengths():
    """torch.export: the fused stack (padding mask, GQA, SwiGLU) and a swapped torch encoder export
    with a symbolic sequence length; the exported programs give the eager outputs at other lengths,
    and their graphs hold the fused ops (the backend chosen at export time is baked in)."""
    from torch.export import Dim

    torch.manual_seed(0)
    fused = M.Transformer(D, H, 2, norm_first=True, num_kv_heads=2, activation="swiglu").eval()
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True), 2,
                                enable_nested_tensor=False)
    fused_attn.swap_modules(enc)
    enc.eval()
    length = Dim("length", min=2, max=256)
    (x,) = make_inputs((B, L, D), seed=4, requires_grad=False)
    padding = torch.zeros(B, L, dtype=torch.bool)
    for model, kwarg in ((fused, "key_padding_mask"), (enc, "src_key_padding_mask")):
        first = next(iter(inspect.signature(model.forward).parameters))
        program = torch.export.export(model, (x,), {kwarg: padding},
                                      dynamic_shapes={first: {1: length}, kwarg: {1: length}})
        ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert {"fused_attn.attention_fwd.default", "fused_attn.layer_norm_residual_fwd.default",
                "fused_attn.feed_forward_fwd.default"} <= ops, ops
        for n in (3, 17):
            (y,) = make_inputs((B, n, D), seed=n, requires_grad=False)
            pad = torch.zeros(B, n, dtype=torch.bool)
            pad[1, n // 2:] = True
            with torch.no_grad():
                torch.testing.assert_close(program.module()(y, **{kwarg: pad}), model(y, **{kwarg: pad}))



def test_torchscript_as_documented():
    """README: torch.jit.script is not supported (it fails, with TorchScript's own error, not
    silently); a torch.jit.trace taken and run under no_grad gives the eager outputs at another
    length, also after a save/load round trip."""
    import io
    import warnings

    torch.manual_seed(0)
    model = M.Transformer(D, H, 1).eval()
    with pytest.raises(Exception):
        torch.jit.script(model)
    (x,) = make_inputs((B, L, D), seed=1, requires_grad=False)
    (y,) = make_inputs((B + 1, L + 5, D), seed=2, requires_grad=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (x,))
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        for program in (traced, loaded):
            torch.testing.assert_close(program(y), model(y))

@pytest.mark.slow
def test_fused_layer_compiles_with_inductor():
    """The default backend (inductor) once, on a small module (compile time is the cost)."""
    torch.manual_seed(0)
    ffn = M.FeedForward(D, 48, activation="swiglu")
    (x,) = make_inputs((B, L, D), seed=3, requires_grad=False)
    eager = _run(ffn, x)
    _assert_same(_run(torch.compile(ffn, fullgraph=True), x), eager)


# ---------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) implementations, aot dispatch, for every registered op
# ---------------------------------------------------------------------------------------------

def _op_samples(backend):
    gen = torch.Generator().manual_seed(4)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    rng = torch.tensor([1234, 5], dtype=torch.int64)
    q, k, v = rnd(2, 4, 9, 8), rnd(2, 2, 7, 8), rnd(2, 2, 7, 8)
    keep = (torch.rand(1, 1, 9, 7, generator=gen) > 0.3).expand(2, 4, 9, 7)
    additive = rnd(2, 1, 9, 7).expand(2, 4, 9, 7)
    samples = {"attention_fwd": [], "attention_bwd": [], "attention_varlen_fwd": [], "attention_varlen_bwd": [],
               "layer_norm_residual_fwd": [],
               "layer_norm_residual_bwd": [], "feed_forward_fwd": [], "feed_forward_bwd": [], "rotary": [],
               "rotary_": []}
    slopes = torch.tensor([0.5, -0.25, 0.125, 0.0]).expand(2, 4)  # ALiBi, a stride-0 (B, Hq) view
    for mask, band, p, cap, alibi in ((None, CAUSAL_BAND, 0.0, 0.0, None), (keep, NO_BAND, 0.0, 2.5, slopes),
                                      (additive, (-3, 1), 0.2, 0.0, slopes)):
        args = (q, k, v, mask, *band, p, 0.35, rng if p else None, backend, cap, alibi, alibi is not None)
        samples["attention_fwd"].append(args)
        out, lse = torch.ops.fused_attn.attention_fwd(*args)
        mask_grad = mask is not None and mask.dtype != torch.bool
        dlse = rnd(*lse.shape) if alibi is not None else None  # the lse's gradient
        samples["attention_bwd"].append((rnd(*out.shape), q, k, v, out, lse, mask, *band, p, 0.35,
                                         rng if p else None, mask_grad, backend, cap, alibi, alibi is not None, dlse))
    cu_q, cu_k = torch.tensor([0, 4, 4, 9], dtype=torch.int32), torch.tensor([0, 3, 5, 7], dtype=torch.int32)
    q, k, v = rnd(9, 4, 8), rnd(7, 2, 8), rnd(7, 2, 8)
    used = torch.tensor([2, 1, 2], dtype=torch.int32)
    slopes = torch.rand(3, 4, generator=gen)
    for band, bottom_right, p, cap, seqused, alibi in ((CAUSAL_BAND, True, 0.0, 0.0, used, slopes),
                                                       (NO_BAND, False, 0.2, 2.5, None, None)):
        args = (q, k, v, cu_q, cu_k, 5, 3, *band, bottom_right, p, 0.35, rng if p else None, backend, cap, seqused,
                False, alibi)
        samples["attention_varlen_fwd"].append(args)
        out, lse = torch.ops.fused_attn.attention_varlen_fwd(*args)
        samples["attention_varlen_bwd"].append((rnd(*out.shape), q, k, v, out, lse, cu_q, cu_k, 5, 3, *band,
                                                bottom_right, p, 0.35, rng if p else None, backend, cap, seqused,
                                                alibi, rnd(*lse.shape) if p else None))
    x, r, w, b = rnd(6, 16), rnd(6, 16), rnd(16), rnd(16)
    cases = [(x, r, w, b, 0.0, False), (x, None, w, None, 0.0, True), (x, r, None, b, 0.3, False)]
    if backend in ("reference", "cpu"):  # the backends that take float64, whose mean and rstd are float64
        cases.append((x.double(), r.double(), w.double(), b.double(), 0.0, False))
    for x_, residual, weight, bias, p, rms in cases:
        args = (x_, residual, weight, bias, 1e-5, p, rms, False, rng if p else None, backend)
        samples["layer_norm_residual_fwd"].append(args)
        out, summed, mean, rstd = torch.ops.fused_attn.layer_norm_residual_fwd(*args)
        samples["layer_norm_residual_bwd"].append((rnd(6, 16).to(x_.dtype), rnd(6, 16).to(x_.dtype), summed, weight,
                                                   bias, mean, rstd, 1e-5, p, rms, rng if p else None, x_.dtype,
                                                   backend))
    x = rnd(5, 16)
    for act, width, b1, p in (("relu", 24, True, 0.0), ("swiglu", 48, False, 0.0), ("gelu", 24, True, 0.25)):
        w1, w2 = rnd(width, 16), rnd(16, 24)
        bias1, bias2 = (rnd(width) if b1 else None), rnd(16)
        args = (x, w1, bias1, w2, bias2, act, p, rng if p else None, backend)
        samples["feed_forward_fwd"].append(args)
        _, pre = torch.ops.fused_attn.feed_forward_fwd(*args)
        samples["feed_forward_bwd"].append((rnd(5, 16), x, w1, w2, pre, act, p, rng if p else None, b1, True,
                                            backend))
    angles = torch.outer(torch.arange(12.0), torch.rand(3, generator=gen))
    x = rnd(2, 5, 3, 8)
    for xs, positions, interleaved, conjugate in (
            (x, torch.arange(5).expand(2, 5), False, False),  # stride-0 positions, R = 6 < D
            (x.transpose(1, 2).contiguous().transpose(1, 2), torch.tensor([[0, 2, 4, 6, 8], [11, 1, 0, 3, 3]]),
             True, True)):  # a (B, H, L, D) layout: the output keeps it
        samples["rotary"].append((xs, angles.cos(), angles.sin(), positions, interleaved, conjugate, backend))
        samples["rotary_"].append((xs.clone(), angles.cos(), angles.sin(), positions, interleaved, conjugate, backend))
    return samples


def _registered_ops():
    return sorted(name for name in dir(torch.ops.fused_attn)
                  if isinstance(getattr(torch.ops.fused_attn, name), torch._ops.OpOverloadPacket))


def _backend_can_run_all(backend):
    calls = [Call("attention", torch.device("cpu"), torch.float32,
                  {"head_dim": 8, "head_dim_v": 8, "causal": True, "dropout": True, "gqa": True, "mask": "additive",
                   "mask_grad": True, "alibi": True}),
             Call("layer_norm_residual", torch.device("cpu"), torch.float32,
                  {"hidden": 16, "rms": True, "dropout": True, "residual_in_fp32": False}),
             Call("feed_forward", torch.device("cpu"), torch.float32, {"activation": "swiglu", "dropout": True})]
    return [r for c in calls for r in BACKENDS[backend].call_reasons(c)]


# The reference backend's backward launchers differentiate the reference with torch.func.vjp;
# functorch's wrapped tensors cannot pass through the dispatch modes that opcheck's schema,
# fake-tensor cross-reference and aot-dispatch tests install ("Cannot access storage of
# TensorWrapper"). For those ops the fake implementations are checked against the real outputs
# directly instead (and compiled backward graphs run them in the tests above).
FUNCTORCH_BWD = {("reference", "attention_bwd"), ("reference", "attention_varlen_bwd"),
                 ("reference", "layer_norm_residual_bwd"), ("reference", "feed_forward_bwd")}


def _check_fake_matches_real(op, args):
    from torch._subclasses.fake_tensor import FakeTensorMode

    real = op(*args)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = op(*fake_args)
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), f"{op} output {i}"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_opcheck_every_registered_op(backend):
    reasons = _backend_can_run_all(backend)
    if reasons:
        pytest.skip(f"{backend} cannot run these calls here: {'; '.join(reasons)}")
    import fused_attn.ops  # noqa: F401  (registers the ops)

    samples = _op_samples(backend)
    assert _registered_ops() == sorted(samples), "an op without opcheck samples"
    for name, cases in samples.items():
        op = getattr(torch.ops.fused_attn, name).default
        for args in cases:
            if (backend, name) in FUNCTORCH_BWD:
                torch.library.opcheck(op, args, test_utils=("test_autograd_registration",))
                _check_fake_matches_real(op, args)
            else:
                torch.library.opcheck(op, args)


def test_self_attention_with_one_tensor_compiles_fullgraph():
    """``attention(x, x, x)``: the same tensor as q, k and v (Dynamo refuses an autograd Function
    given one tensor twice; functional passes views), forward and gradient as in eager."""
    x = torch.randn(1, 2, 9, 16, requires_grad=True)
    compiled = torch.compile(lambda x: fused_attn.attention(x, x, x, causal=True).sum(), fullgraph=True,
                             backend="aot_eager")
    loss = compiled(x)
    loss.backward()
    grad = x.grad.clone()
    x.grad = None
    eager = fused_attn.attention(x, x, x, causal=True).sum()
    eager.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grad, x.grad)


@pytest.mark.parametrize("call", ["norm(x, x)", "norm(x, None, b, b)", "ffn(x, w, None, w, None)"])
def test_one_tensor_twice_compiles_fullgraph(call):
    """The norm and the feed-forward given one tensor twice (a residual that is x, a weight shared
    by both linears) compile as ``attention(x, x, x)`` does: Dynamo refuses an autograd Function
    given one tensor twice, so the functional passes a view."""
    x, b, w = torch.randn(5, 8, requires_grad=True), torch.randn(8, requires_grad=True), torch.randn(8, 8, requires_grad=True)
    fn = {"norm(x, x)": lambda x, b, w: F.layer_norm_residual(x, x),
          "norm(x, None, b, b)": lambda x, b, w: F.layer_norm_residual(x, None, b, b),
          "ffn(x, w, None, w, None)": lambda x, b, w: F.feed_forward(x, w, None, w, None)}[call]
    compiled = torch.compile(lambda *a: fn(*a).square().sum(), fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, b, w), (x, b, w), allow_unused=True)
    expected = torch.autograd.grad(fn(x, b, w).square().sum(), (x, b, w), allow_unused=True)
    for g, e in zip(got, expected):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e)


def test_a_call_that_breaks_the_graph_runs_eagerly_under_default_compile():
    """Without fullgraph, a fused call Dynamo cannot trace (here varlen attention drawing its
    dropout seed from a torch.Generator, which Dynamo does not trace) breaks the graph inside the
    call and runs the rest eagerly. Before, Dynamo then traced the Functions' ``apply`` and failed
    inside it with an internal error."""
    q = torch.randn(9, 2, 8, requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)

    def fn(q, gen):
        return F.attention_varlen(q, q, q, cu, cu, causal=True, dropout_p=0.25, generator=gen).square().sum()

    got = torch.autograd.grad(torch.compile(fn, backend="aot_eager")(q, torch.Generator().manual_seed(2)), q)[0]
    torch.testing.assert_close(got, torch.autograd.grad(fn(q, torch.Generator().manual_seed(2)), q)[0])
    torch._dynamo.reset()  # (else the code compiled above, with its graph break, is reused)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(fn, backend="aot_eager", fullgraph=True)(q, torch.Generator().manual_seed(2))


def test_dropout_under_fullgraph_seeds_from_torch_not_a_generator():
    """docs/backends.md (Dropout): under fullgraph=True seed torch; Dynamo cannot trace torch.randint with a
    generator (torch's own limit), so generator= fails there and breaks the graph without fullgraph."""
    q = torch.randn(1, 2, 8, 16, generator=torch.Generator().manual_seed(1))

    def seeded(q):
        return F.attention(q, q, q, dropout_p=0.3)

    def with_generator(q, gen):
        return F.attention(q, q, q, dropout_p=0.3, generator=gen)

    torch.manual_seed(5)
    eager = seeded(q)
    torch.manual_seed(5)
    assert torch.equal(torch.compile(seeded, fullgraph=True, backend="aot_eager")(q), eager)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(with_generator, fullgraph=True, backend="aot_eager")(q, torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    eager = with_generator(q, torch.Generator().manual_seed(3))
    compiled = torch.compile(with_generator, backend="aot_eager")(q, torch.Generator().manual_seed(3))
    assert torch.equal(compiled, eager)


# ---------------------------------------------------------------------------------------------
# Dropout outside the ops: the fused modules' own dropouts drop what eager drops when compiled
# ---------------------------------------------------------------------------------------------

def _seeded_ops_backend(seen):
    """aot_eager that records the random (nondeterministic_seeded) aten ops of the forward and
    backward graphs: inductor replaces torch's dropout (native_dropout, bernoulli, rand) with its
    own RNG, so a compiled model holding one drops other elements than eager. The ops' seed draw,
    a torch.randint, it keeps (inductor has no replacement for randint.low_generator)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def record(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)
                    and torch.Tag.nondeterministic_seeded in n.target.tags)
        return make_boxed_func(gm)

    return lambda gm, example_inputs: aot_module_simplified(gm, example_inputs, fw_compiler=record, bw_compiler=record)


def _train_step(model, x, seed=7, **kwargs):
    torch.manual_seed(seed)
    out = model(x.detach().clone().requires_grad_(True), **kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    return (out, *torch.autograd.grad(out.square().sum(), params))


def _hooked_ffn():
    """A fused FeedForward whose linear1 has a forward hook (as an adapter's): called as a module,
    the unfused path, with its dropout outside the op."""
    ffn = M.FeedForward(D, 48, activation="gelu", dropout=0.3)
    ffn.linear1.register_forward_hook(lambda module, args, out: out)
    return ffn


def _swapped_pre_ln_encoder_layer():
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.2, batch_first=True, norm_first=True)
    fused_attn.swap_modules(layer)
    return layer


@pytest.mark.parametrize("make", [
    lambda: M.Transformer(D, H, 2, norm_first=True, d_ff=48, dropout=0.2),
    lambda: M.Transformer(D, H, 2, norm_first=False, d_ff=48, dropout=0.2),
    _hooked_ffn,
    _swapped_pre_ln_encoder_layer,
], ids=["pre_ln", "post_ln", "unfused_ffn", "swapped_torch_pre_ln"])
def test_module_dropout_compiled_drops_what_eager_drops(make):
    """docs/backends.md (Dropout): the compiled call drops what eager drops, bit for bit. A pre-LN layer's
    last residual add (no op follows it), the FFN an adapter unfuses and a swapped torch pre-LN
    layer's last add dropped with torch's dropout: the graph held native_dropout, which inductor
    draws from its own RNG (a compiled pre-LN Transformer differed from eager by ~1). Now every
    dropout is the ops' counter RNG: the graphs hold only its seed draw, and forward and
    gradients equal eager's exactly."""
    torch.manual_seed(0)
    model = make().train()
    (x,) = make_inputs((B, L, D), seed=4, requires_grad=False)
    eager = _train_step(model, x)
    seen = set()
    compiled = _train_step(torch.compile(model, fullgraph=True, backend=_seeded_ops_backend(seen)), x)
    assert seen <= {"aten.randint.low_generator"}, seen
    for c, e in zip(compiled, eager):
        assert torch.equal(c, e)
    assert not torch.equal(eager[0], _train_step(model, x, seed=8)[0])  # (dropout is on)


def test_unfused_ffn_drops_the_elements_the_fused_op_drops():
    """The unfused FFN's dropout (a hooked or adapted linear) is the op's own mask: for one seed
    it matches the fused call to rounding (torch's dropout dropped other elements)."""
    torch.manual_seed(0)
    ffn = M.FeedForward(D, 48, activation="gelu", dropout=0.3)
    (x,) = make_inputs((B, L, D), seed=5, requires_grad=False)
    fused = _train_step(ffn, x)
    ffn.linear1.register_forward_hook(lambda module, args, out: out)
    for u, f in zip(_train_step(ffn, x), fused):
        torch.testing.assert_close(u, f, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_dropout_under_inductor_equals_eager(norm_first):
    """The issue's case under inductor itself: pre-LN differed from eager by ~1 (post-LN did not)."""
    torch.manual_seed(0)
    model = M.Transformer(D, H, 1, norm_first=norm_first, d_ff=48, dropout=0.2)
    (x,) = make_inputs((B, 7, D), seed=4, requires_grad=False)
    eager = _train_step(model, x)
    for c, e in zip(_train_step(torch.compile(model, fullgraph=True), x), eager):
        assert torch.equal(c, e)


# ---------------------------------------------------------------------------------------------
# Unbacked token counts (torch._dynamo.decorators.mark_unbacked): no guard on the length
# ---------------------------------------------------------------------------------------------

_ROT_COS, _ROT_SIN = make_inputs((16, 4), (16, 4), seed=9, requires_grad=False)
_UNBACKED_CALLS = {
    "feed_forward": (lambda x, w1, b1, w2, b2: F.feed_forward(x, w1, b1, w2, b2, activation="swiglu"),
                     lambda n: make_inputs((2, n, 24), (80, 24), (80,), (24, 40), (24,), seed=n)),
    "feed_forward_strided": (lambda x, w1, w2: F.feed_forward(x.transpose(0, 1), w1, None, w2, None),
                             lambda n: make_inputs((n, 2, 24), (40, 24), (24, 40), seed=n)),
    "layer_norm_residual": (lambda x, r, w, b: F.layer_norm_residual(x, r, w, b, prenorm=True),
                            lambda n: make_inputs((2, n, 24), (2, n, 24), (24,), (24,), seed=n)),
    "rms_norm": (lambda x, w: F.layer_norm_residual(x, None, w, rms=True),
                 lambda n: make_inputs((2, n, 24), (24,), seed=n)),
    "rotary": (lambda x: F.apply_rotary_emb(x, _ROT_COS, _ROT_SIN, seqlen_offsets=3),
               lambda n: make_inputs((2, n, 2, 8), seed=n)),
    "rotary_inplace": (lambda x: F.apply_rotary_emb(x * 1, _ROT_COS, _ROT_SIN, interleaved=True, inplace=True),
                       lambda n: make_inputs((2, n, 2, 8), seed=n)),
    "transformer": (lambda x: _UNBACKED_MODEL(x), lambda n: make_inputs((2, n, D), seed=n)),
}
with torch.random.fork_rng():  # (at import: torch's generator left as it was)
    torch.manual_seed(0)
    _UNBACKED_MODEL = M.Transformer(D, H, 1, d_ff=48, norm_first=True, rotary=True, causal=True)


def _outputs_and_grads(fn, inputs):
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.arange(o.numel()).reshape(o.shape).sin()).sum() for o in outs)
    return (*outs, *torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("name", list(_UNBACKED_CALLS))
def test_unbacked_token_count_compiles_fullgraph(name):
    """mark_unbacked on the token dim (what Dynamo's message on 0/1 specialisation recommends):
    the row wrapper's ``numel() == 0`` test (and ``as_shape_of``'s, the FFN's saved-copy test),
    rotary's offset bound and the norm's residual-shape check guarded on it and failed the trace
    ("Could not guard on data-dependent expression Eq(64*u0, 0)"). Now they leave an unbacked
    count alone: one graph for every length, forward and input gradients equal to eager's."""
    fn, make = _UNBACKED_CALLS[name]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    token_dim = 0 if name == "feed_forward_strided" else 1
    for n in (7, 1, 12):
        inputs = make(n)
        for t in inputs[:2] if name.startswith("layer_norm") else inputs[:1]:
            torch._dynamo.decorators.mark_unbacked(t, token_dim)
        eager = _outputs_and_grads(fn, [t.detach().clone().requires_grad_(True) for t in inputs])
        for c, e in zip(_outputs_and_grads(compiled, inputs), eager, strict=True):
            torch.testing.assert_close(c, e, atol=0, rtol=0)
    assert counter.frame_count == 1


def test_unbacked_rotary_offset_bound_is_asserted_when_the_graph_runs():
    """With an unbacked length the offset + length <= rows bound cannot be checked when tracing:
    it is asserted when the graph runs (an empty x fits anywhere, as in eager)."""
    fn = torch.compile(lambda x, off: F.apply_rotary_emb(x, _ROT_COS, _ROT_SIN, seqlen_offsets=off),
                       fullgraph=True, backend="aot_eager")
    for n, off in ((7, 9), (0, 20), (17, 0), (8, 9)):
        (x,) = make_inputs((2, n, 2, 8), seed=n, requires_grad=False)
        torch._dynamo.decorators.mark_unbacked(x, 1)
        if n and off + n > 16:
            with pytest.raises(RuntimeError):
                fn(x, off)
        else:
            assert torch.equal(fn(x, off), F.apply_rotary_emb(x, _ROT_COS, _ROT_SIN, seqlen_offsets=off))


def test_swapped_encoder_padded_positions_under_compile_are_torchs():
    """docs/modules.md (swap table): torch's nested-tensor inference path (zeros at padded positions) is
    off under torch.compile with mask_check=True, in torch's encoder and so in the swapped one:
    compiled, the padded positions hold values, as torch's compiled encoder gives them."""
    torch.manual_seed(0)
    ref = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True), 2).eval()
    enc = copy.deepcopy(ref)
    fused_attn.swap_modules(enc)
    (x,) = make_inputs((B, 7, D), seed=6, requires_grad=False)
    padding = torch.zeros(B, 7, dtype=torch.bool)
    padding[1, 4:] = True
    with torch.no_grad():
        assert not enc(x, src_key_padding_mask=padding)[1, 4:].any()  # eager: the nested path's zeros
        torch._dynamo.reset()
        torch_compiled = torch.compile(ref, backend="aot_eager")(x, src_key_padding_mask=padding)
        torch._dynamo.reset()
        fused_compiled = torch.compile(enc, backend="aot_eager", fullgraph=True)(x, src_key_padding_mask=padding)
    assert fused_compiled[1, 4:].abs().min() > 0
    torch.testing.assert_close(fused_compiled, torch_compiled, atol=1e-5, rtol=1e-4)


def test_packed_transformer_exports_non_strict_with_a_symbolic_max_seqlen():
    """Default (non-strict) torch.export hands ``max_seqlen=x.shape[0]`` over as a torch.SymInt,
    which is no numbers.Integral: the int checks refused it ("max_seqlen must be an int or None,
    got s77") where strict export, whose sizes pass for ints, took it. The exported program gives
    the eager output at a new total length."""
    from torch.export import Dim

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.model = M.Transformer(D, H, 1, causal=True).eval()

        def forward(self, x, cu):
            return self.model(x, cu_seqlens=cu, max_seqlen=x.shape[0])

    model = Packed()
    (x,) = make_inputs((9, D), seed=1, requires_grad=False)
    program = torch.export.export(model, (x, torch.tensor([0, 4, 9], dtype=torch.int32)),
                                  dynamic_shapes=({0: Dim("total")}, None))
    (y,) = make_inputs((13, D), seed=2, requires_grad=False)
    cu = torch.tensor([0, 6, 13], dtype=torch.int32)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(y, cu), model(y, cu))


def test_symbolic_offsets_and_lengths_export_non_strict():
    """Sizes of a non-strict export are torch.SymInts: ``apply_rotary_emb(seqlen_offsets=
    past.shape[1])`` and ``attention_with_kvcache(cache_seqlens=past.shape[1])`` refused them
    ("must be an int ... got SymInt"), and a decoding step with a symbolic query length failed
    though the caller passed no max_seqlen (attention_with_kvcache handed its own Lq to
    attention_varlen). Now they export, nothing specialised: right at other lengths."""
    from torch.export import Dim

    class Rotary(nn.Module):
        def forward(self, x, past):
            return F.apply_rotary_emb(x, _ROT_COS, _ROT_SIN, seqlen_offsets=past.shape[1])

    class Decode(nn.Module):
        def forward(self, q, k_cache, v_cache, k, v, past):
            return F.attention_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=past.shape[1], causal=True)

    length, offset = Dim("length", max=6), Dim("offset", max=10)
    x, past = torch.randn(2, 3, 2, 8), torch.zeros(1, 5)
    program = torch.export.export(Rotary(), (x, past), dynamic_shapes=({1: length}, {1: offset}))
    for n, p in ((6, 10), (2, 0)):  # (an offset of 0: the export saw 5, and specialised nothing)
        x, past = torch.randn(2, n, 2, 8), torch.zeros(1, p)
        assert torch.equal(program.module()(x, past), Rotary()(x, past))

    def decode_inputs(n, seed):
        return make_inputs((2, n, 4, 8), (2, 16, 2, 8), (2, 16, 2, 8), (2, n, 2, 8), (2, n, 2, 8), seed=seed,
                           requires_grad=False)

    with torch.no_grad():
        program = torch.export.export(Decode(), (*decode_inputs(3, 0), torch.zeros(1, 5)),
                                      dynamic_shapes=({1: length}, None, None, {1: length}, {1: length}, {1: offset}))
        for n, p in ((1, 10), (4, 2)):
            inputs, expected = decode_inputs(n, n), decode_inputs(n, n)
            torch.testing.assert_close(program.module()(*inputs, torch.zeros(1, p)),
                                       Decode()(*expected, torch.zeros(1, p)), atol=0, rtol=0)
            assert torch.equal(inputs[1], expected[1]) and torch.equal(inputs[2], expected[2])  # the caches written


def test_export_with_a_dynamic_number_of_sequences_or_batch_under_rotary_and_alibi():
    """A Dim on the number of packed sequences (or the batch) failed to export: rotary's packed
    positions sliced the (B+1,) boundaries to (B,), whose size-1 case (one sequence) export guards
    on ("Guard failed: -1 + cu.size()[0] >= 2"), and ALiBi's shape check compared (B, Hq) slopes
    with (Hq,) element by element, a guard B != Hq that a batch Dim covering Hq violates. Now both
    export, and the program gives the eager output at one sequence, at B = Hq and at other counts."""
    from torch.export import Dim

    heads, dim = 4, 8
    angles = torch.rand(32, dim // 2) * 6
    cos, sin = angles.cos(), angles.sin()

    class Rotary(nn.Module):
        def forward(self, x, cu):
            return F.apply_rotary_emb(x, cos, sin, cu_seqlens=cu, max_seqlen=32)

    class Varlen(nn.Module):
        def forward(self, q, k, v, cu, slopes):
            return F.attention_varlen(q, k, v, cu, cu, 32, 32, causal=True, alibi_slopes=slopes)

    class Dense(nn.Module):
        def forward(self, q, k, v, slopes):
            return F.attention(q, k, v, causal=True, alibi_slopes=slopes)

    torch.manual_seed(0)
    count, total = Dim("count", min=1, max=64), Dim("total", min=1, max=4096)
    packed = [torch.randn(20, heads, dim) for _ in range(3)]
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    rotary = torch.export.export(Rotary(), (packed[0], cu), dynamic_shapes=({0: total}, {0: count + 1}))
    varlen = torch.export.export(Varlen(), (*packed, cu, torch.rand(3, heads)),
                                 dynamic_shapes=({0: total},) * 3 + ({0: count + 1}, {0: count}))
    for bounds in ([0, 20], [0, 1, 2, 3, 20], [0, 0, 4, 9, 11, 20]):  # 1 sequence, B = Hq, 5
        cu = torch.tensor(bounds, dtype=torch.int32)
        slopes = torch.rand(len(bounds) - 1, heads)
        assert torch.equal(rotary.module()(packed[0], cu), Rotary()(packed[0], cu))
        assert torch.equal(varlen.module()(*packed, cu, slopes), Varlen()(*packed, cu, slopes))
    batch = Dim("batch", min=1, max=64)
    dense = torch.export.export(Dense(), (*[torch.randn(3, heads, 9, dim) for _ in range(3)], torch.rand(3, heads)),
                                dynamic_shapes=({0: batch},) * 4)
    for b in (1, heads, 5):
        inputs = [torch.randn(b, heads, 9, dim) for _ in range(3)] + [torch.rand(b, heads)]
        assert torch.equal(dense.module()(*inputs), Dense()(*inputs))


def test_rotary_exports_strict_with_a_dynamic_length():
    """Strict export (Dynamo) of apply_rotary_emb with a symbolic length crashed on the offset
    bound's ``torch._check(..., lambda: message)`` (a callable message of an undecided condition:
    "'function' object has no attribute 'is_quantized'"); the bound is now asserted without it
    under export, and the program is right at another length."""
    from torch.export import Dim

    class Rotary(nn.Module):
        def forward(self, x, cos, sin):
            return F.apply_rotary_emb(x, cos, sin)

    x = torch.randn(2, 9, 2, 8)
    program = torch.export.export(Rotary(), (x, _ROT_COS, _ROT_SIN), dynamic_shapes=({1: Dim("length", max=16)},
                                                                                         None, None), strict=True)
    x = torch.randn(2, 13, 2, 8)
    assert torch.equal(program.module()(x, _ROT_COS, _ROT_SIN), Rotary()(x, _ROT_COS, _ROT_SIN))


def test_jit_trace_of_a_decoding_step_refuses_clearly():
    """torch.jit.trace of a kv_cache decoding step failed with "max_seqlen_q must be an int or None,
    got tensor(1)", an argument the caller never passed; past it, the trace would hold the cache
    lengths read on the host at trace time (wrong at any other cache length, on the reference
    backend for one). It now refuses, saying why and what to use (docs/modules.md, TorchScript)."""
    import warnings

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.attention = M.MultiHeadAttention(D, H, causal=True).eval()

        def forward(self, x, k, v, seqlens):
            cache = fused_attn.KVCache.__new__(fused_attn.KVCache)
            cache.k, cache.v, cache.seqlens = k, v, seqlens
            cache.leftpad, cache.padded = torch.zeros_like(seqlens), False
            return self.attention(x, kv_cache=cache)

    inputs = (torch.randn(2, 1, D), torch.zeros(2, 16, H, D // H), torch.zeros(2, 16, H, D // H),
              torch.tensor([3, 3], dtype=torch.int32))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="cannot be traced with torch.jit.trace.*torch.export"):
            torch.jit.trace(Step(), inputs)


def test_flash_attn_window_exports_with_a_symbolic_key_length():
    """FlashAttention's window rules compare a side with the keys' length and bound a side by it:
    with a symbolic length (non-strict export) flash_attn_func's (-1, 1) made a symbolic window
    that attention refused ("window_size must be None or a pair of ints, got (s25, 1)") and (-1, 5)
    guarded on the length ("Constraints violated"), and flash_attn_varlen_func, whose SymInt
    max_seqlen_k failed an Integral test, skipped the rules and was wrong (2.1 off eager with
    Lq > Lk). With q and k given one Dim no rule changes the mask and the window exports; where
    the example inputs have Lq > Lk + 1 the rules would, and a symbolic Lk cannot follow them:
    refused with a ValueError."""
    from torch.export import Dim

    from fused_attn.integrations import flash_attn as FA

    class Windowed(nn.Module):
        def __init__(self, window, varlen=False):
            super().__init__()
            self.window, self.varlen = window, varlen

        def forward(self, q, k, v, cu_q=None, cu_k=None):
            if self.varlen:
                return FA.flash_attn_varlen_func(q, k, v, cu_q, cu_k, q.shape[0], k.shape[0], window_size=self.window)
            return FA.flash_attn_func(q, k, v, window_size=self.window)

    torch.manual_seed(0)
    for window in ((-1, 1), (-1, 5)):
        length = Dim("length", max=64)
        qkv = [torch.randn(1, 5, 2, 8) for _ in range(3)]
        program = torch.export.export(Windowed(window), tuple(qkv), dynamic_shapes=({1: length},) * 3)
        other = [torch.randn(1, 9, 2, 8) for _ in range(3)]
        torch.testing.assert_close(program.module()(*other), Windowed(window)(*other))
    q, k = torch.randn(9, 1, 8), torch.randn(3, 1, 8)
    cu_q, cu_k = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"window_size=\(-1, 5\) with a symbolic key length.*Lq <= Lk \+ 1"):
        torch.export.export(Windowed((-1, 5), varlen=True), (q, k, k, cu_q, cu_k),
                            dynamic_shapes=({0: Dim("tq")}, {0: Dim("tk")}, {0: Dim("tk")}, None, None))


@pytest.mark.parametrize("workaround", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_compiled_inplace_rotary_gradient_when_the_input_is_used_after(packed, workaround, monkeypatch):
    """The in-place embedding of an intermediate, compiled, the code going on with that tensor (as
    FlashAttention's callers do): its input gradient is eager's. torch 2.11's graphs dropped the
    rotation's backward (the autograd Function marks x dirty, and x rather than its output flowed
    on): a wrong gradient, the forward right. ``workaround``: the out-of-place + copy_ path those
    torch versions take, forced here on any torch (CI's 2.13 would not reach it), must give eager's
    values, gradient and the input object itself."""
    import fused_attn.rotary

    if workaround:
        monkeypatch.setattr(fused_attn.rotary, "_COMPILE_DROPS_DIRTY_BACKWARD", True)
    elif fused_attn.rotary._COMPILE_DROPS_DIRTY_BACKWARD:
        pytest.skip("this torch's compiled graphs drop the in-place Function's backward (the workaround runs)")
    gen = torch.Generator().manual_seed(0)
    cos, sin = torch.randn(2, 16, 4, generator=gen).unbind(0)
    x0 = torch.randn(7, 2, 8, generator=gen) if packed else torch.randn(2, 7, 2, 8, generator=gen)
    kw = dict(cu_seqlens=torch.tensor([0, 3, 7]), max_seqlen=4) if packed else {}

    def fn(x):
        y = x * 2
        returned = F.apply_rotary_emb(y, cos, sin, interleaved=True, inplace=True, **kw)
        return y * y.detach(), returned is y

    torch._dynamo.reset()  # (the flag is read when tracing: no graph of the other setting is reused)
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        x = x0.clone().requires_grad_()
        out, same = f(x)
        out.sum().backward()
        results.append((out.detach(), x.grad, same))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    assert results[0][2] and results[1][2]
