"""``feed_forward``'s gated weights as a (w_gate, w_up) pair (Llama's gate_proj and up_proj): the
same numbers and gradients as the stacked w1, on every CPU-runnable backend, without saving the
stacked weight for backward."""
import pytest
import torch

import fused_attn
from fused_attn import reference as R
from fused_attn.testing import check_against_reference, make_inputs

BACKENDS = ["reference"] + (["cpu"] if fused_attn.extension_error() is None else [])


def _inputs(tokens, d, d_ff, bias, dtype=torch.float32, seed=0):
    x, wg, wu, bg, bu, w2, b2 = make_inputs((tokens, d), (d_ff, d), (d_ff, d), (d_ff,), (d_ff,), (d, d_ff), (d,),
                                            dtype=dtype, seed=seed)
    with torch.no_grad():
        for w in (wg, wu):
            w.mul_(d ** -0.5)
        w2.mul_(d_ff ** -0.5)
    return (x, wg, wu, bg, bu, w2, b2) if bias else (x, wg, wu, None, None, w2, None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["swiglu", "geglu"])
@pytest.mark.parametrize("bias", [True, False])
def test_pair_meets_the_oracle_and_equals_the_stacked_form(backend, activation, bias):
    x, wg, wu, bg, bu, w2, b2 = _inputs(17, 40, 50, bias)
    names = ["x", "w_gate", "w_up", "w2"] + (["b_gate", "b_up", "b2"] if bias else [])
    tensors = [x, wg, wu, w2] + ([bg, bu, b2] if bias else [])

    def unpack(args):
        x, wg, wu, w2, *biases = args
        bg, bu, b2 = biases if biases else (None, None, None)
        return x, wg, wu, bg, bu, w2, b2

    def fused(*args):
        x, wg, wu, bg, bu, w2, b2 = unpack(args)
        return fused_attn.feed_forward(x, (wg, wu), None if bg is None else (bg, bu), w2, b2, activation=activation,
                                       backend=backend)

    def ref(*args):
        x, wg, wu, bg, bu, w2, b2 = unpack(args)
        b1 = None if bg is None else torch.cat([bg, bu])
        return R.feed_forward(x, torch.cat([wg, wu]), b1, w2, b2, activation)

    check_against_reference(fused, ref, tensors, names=names)
    with torch.no_grad():  # bit for bit the stacked call's output (the same kernel on the same stack)
        stacked = fused_attn.feed_forward(x, torch.cat([wg, wu]), None if bg is None else torch.cat([bg, bu]), w2, b2,
                                          activation=activation, backend=backend)
        assert torch.equal(fused(*tensors), stacked)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pair_saves_no_stacked_weight(backend):
    x, wg, wu, bg, bu, w2, b2 = _inputs(8, 16, 24, True)
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_attn.feed_forward(x, (wg, wu), (bg, bu), w2, b2, activation="swiglu", backend=backend)
    assert (48, 16) not in shapes, shapes  # the (2·d_ff, d) stack is made per kernel call, not saved


def test_pair_under_autocast_and_dropout_runs_backward():
    x, wg, wu, bg, bu, w2, b2 = _inputs(8, 16, 24, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_attn.feed_forward(x, (wg, wu), (bg, bu), w2, b2, activation="swiglu", dropout_p=0.3)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (wg, wu, bg, bu))


@pytest.mark.parametrize("call, error, match", [
    (lambda x, wg, wu, bg, bu, w2, b2: fused_attn.feed_forward(x, (wg, wu), None, w2, b2, activation="relu"),
     ValueError, "gated activations"),
    (lambda x, wg, wu, bg, bu, w2, b2: fused_attn.feed_forward(x, (wg,), None, w2, b2, activation="swiglu"),
     ValueError, "w_gate, w_up"),
    (lambda x, wg, wu, bg, bu, w2, b2: fused_attn.feed_forward(x, (wg, wu[:5]), None, w2, b2, activation="swiglu"),
     ValueError, "same shape"),
    (lambda x, wg, wu, bg, bu, w2, b2: fused_attn.feed_forward(x, (wg, wu), torch.cat([bg, bu]), w2, b2,
                                                               activation="swiglu"), TypeError, "b_gate, b_up"),
    (lambda x, wg, wu, bg, bu, w2, b2: fused_attn.feed_forward(x, torch.cat([wg, wu]), (bg, bu), w2, b2,
                                                               activation="swiglu"), TypeError, "pair"),
    (lambda x, wg, wu, bg, bu, w2, b2: fused_attn.feed_forward(x, (wg, wu.double()), None, w2, b2,
                                                               activation="swiglu"), TypeError, r"w1\[1\]"),
    (lambda x, wg, wu, bg, bu, w2, b2: fused_attn.feed_forward(x, (wg, wu), (bg, bu[:3]), w2, b2,
                                                               activation="swiglu"), ValueError, "gate and up biases"),
])
def test_bad_pairs_raise(call, error, match):
    with pytest.raises(error, match=match):
        call(*_inputs(4, 8, 12, True))


def test_swapped_llama_mlp_fuses_from_the_hidden_size_on(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from fused_attn.integrations import huggingface as hf
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, intermediate_size=24)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg)
    mlp = model.layers[0].mlp
    plain = type(mlp)(cfg)
    plain.load_state_dict(mlp.state_dict())
    fused_attn.swap_modules(model)
    calls = []
    real = hf.feed_forward
    monkeypatch.setattr(hf, "feed_forward", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    for tokens, fused in ((15, False), (16, True), (40, True)):
        x = torch.randn(1, tokens, 16)
        calls.clear()
        torch.testing.assert_close(mlp(x), plain(x), atol=1e-5, rtol=1e-5)
        assert bool(calls) == fused, tokens
        if fused:
            assert isinstance(calls[0], tuple) and calls[0][0] is mlp.gate_proj.weight  # the pair, no copy
