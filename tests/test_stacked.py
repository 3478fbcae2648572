"""Co-located weights (``fused_attn._stacked``): one matmul over several linears reads their
weights as one view instead of a copy per call, with the gradient split back exactly."""
import copy

import pytest
import torch
import torch.nn as nn

import fused_attn
from fused_attn import _stacked, reference


def _linears(*rows, d=8, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    out = []
    for r in rows:
        lin = nn.Linear(d, r, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(r, d, generator=gen, dtype=dtype))
        out.append(lin)
    return out


def _shares_storage(t, params):
    return all(t.untyped_storage().data_ptr() == p.untyped_storage().data_ptr() for p in params)


def test_colocate_keeps_parameters_and_values_and_stacks_without_copy():
    lins = _linears(8, 4, 4)
    weights = [lin.weight for lin in lins]
    values = [w.detach().clone() for w in weights]
    assert not _stacked.adjacent(weights)
    assert _stacked.colocate(weights)
    assert [lin.weight for lin in lins] == weights  # the same Parameter objects
    assert all(torch.equal(w, v) for w, v in zip(weights, values))
    assert _stacked.adjacent(weights)
    view = _stacked.stacked(weights)
    assert torch.equal(view, torch.cat(values)) and _shares_storage(view, weights)
    assert not _stacked.adjacent(weights[::-1])  # order matters
    assert not _stacked.adjacent(weights[:1] + weights[2:])  # a gap


def test_stacked_gradient_is_split_back_exactly():
    lins = _linears(8, 4, 4)
    ref = copy.deepcopy(lins)
    _stacked.colocate([lin.weight for lin in lins])
    _stacked.colocate([lin.bias for lin in lins])
    x = torch.randn(5, 8)
    w = _stacked.stacked([lin.weight for lin in lins])
    b = _stacked.stacked([lin.bias for lin in lins])
    assert _shares_storage(w, [lins[0].weight])
    out = torch.nn.functional.linear(x, w, b)
    expected = torch.cat([lin(x) for lin in ref], dim=-1)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    for lin, r in zip(lins, ref):
        torch.testing.assert_close(lin.weight.grad, r.weight.grad)
        torch.testing.assert_close(lin.bias.grad, r.bias.grad)


def test_stacked_falls_back_to_a_copy_when_apart():
    lins = _linears(4, 4)
    weights = [lin.weight for lin in lins]
    out = _stacked.stacked(weights)
    assert torch.equal(out, torch.cat(weights)) and not _shares_storage(out, weights[:1])
    assert not _stacked.colocate([weights[0], None])
    assert not _stacked.colocate([weights[0], nn.Parameter(torch.randn(4, 8, dtype=torch.float64))])  # dtypes differ


@pytest.mark.parametrize("move", ["double", "to_float64", "load_assign", "none"])
def test_multi_head_attention_keeps_projections_colocated(move):
    torch.manual_seed(0)
    fused = fused_attn.MultiHeadAttention(32, 4, num_kv_heads=2, backend="cpu")
    plain = reference.MultiHeadAttention(32, 4, num_kv_heads=2)
    plain.load_state_dict(fused.state_dict())
    weights = lambda m: [m.query_linear.weight, m.key_linear.weight, m.value_linear.weight]  # noqa: E731
    assert _stacked.adjacent(weights(fused))
    if move == "double":
        fused, plain = fused.double(), plain.double()
    elif move == "to_float64":
        fused, plain = fused.to(torch.float64), plain.to(torch.float64)
    elif move == "load_assign":  # new Parameter objects: apart, and the projection copies (still right)
        fused.load_state_dict({k: v.clone() for k, v in fused.state_dict().items()}, assign=True)
    assert _stacked.adjacent(weights(fused)) == (move != "load_assign")
    x = torch.randn(2, 9, 32, dtype=fused.query_linear.weight.dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, ref = fused(x), plain(x2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (n, p), (_, q) in zip(fused.named_parameters(), plain.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=n)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_swapped_reference_attention_and_llama_mlp_are_colocated():
    model = reference.Transformer(32, 4, 1, d_ff=48)
    fused_attn.swap_modules(model)
    mha = model.layers[0].multi_head_attention
    assert _stacked.adjacent([mha.query_linear.weight, mha.key_linear.weight, mha.value_linear.weight])
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=48)
    llama = transformers.AutoModel.from_config(cfg)
    fused_attn.swap_modules(llama)
    mlp = llama.layers[0].mlp
    assert _stacked.adjacent([mlp.gate_proj.weight, mlp.up_proj.weight])
    llama.to(torch.float64)  # a move separates them; the fused MLP puts them together again
    assert _stacked.adjacent([mlp.gate_proj.weight, mlp.up_proj.weight])
