"""Activation checkpointing (torch.utils.checkpoint, Hugging Face's gradient_checkpointing_enable)
over the fused modules, with dropout on.

A checkpointed segment runs its forward twice: once without saving activations, once again in
the backward to rebuild them. Every fused op draws its dropout seed from torch's CPU generator at
call time, and torch.utils.checkpoint restores that generator's state for the recomputation, so
the recomputed forward must drop exactly the elements the first one dropped: the loss and every
gradient equal, bit for bit, those of the same step without checkpointing. A kernel that drew its
randomness elsewhere (a device generator that checkpoint does not stash, a counter advanced per
call) would give the backward a different mask, and these tests would see it.
"""
import pytest
import torch
import torch.utils.checkpoint as checkpoint

from fused_attn import modules as M
from fused_attn.testing import make_inputs


def _step(model, x, segments):
    """One training step's loss and gradients, each layer checkpointed with ``segments`` (None: not)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    h = x
    for layer in model.layers:
        if segments is None:
            h = layer(h, is_causal=True)
        else:
            h = checkpoint.checkpoint(lambda t, layer=layer: layer(t, is_causal=True), h, use_reentrant=segments)
    loss = (h * torch.linspace(-1, 1, h.shape[-1])).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kw", [dict(), dict(norm_first=True, norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                                              rotary=True, sinks=True)], ids=["post-LN", "pre-LN rotary swiglu sinks"])
def test_checkpointed_layers_give_the_same_step(kw, use_reentrant):
    """Attention dropout, the norms' residual dropout and the FFN dropout all recompute their masks."""
    torch.manual_seed(0)
    model = M.Transformer(32, 4, 2, d_ff=64, dropout=0.2, **kw).train()
    (x,) = make_inputs((2, 17, 32), seed=1, requires_grad=True)
    plain_loss, plain = _step(model, x, None)
    x_grad = x.grad.clone()
    x.grad = None
    loss, grads = _step(model, x, use_reentrant)
    assert torch.equal(loss, plain_loss)
    for name, g in plain.items():
        assert torch.equal(grads[name], g), name
    assert torch.equal(x.grad, x_grad)


def test_dropout_is_live_in_the_checkpointed_step():
    """The equality above is not the trivial one: with two seeds the same step differs."""
    torch.manual_seed(0)
    model = M.Transformer(32, 4, 1, d_ff=64, dropout=0.2).train()
    (x,) = make_inputs((2, 17, 32), seed=1, requires_grad=False)
    torch.manual_seed(1)
    a = checkpoint.checkpoint(model, x, use_reentrant=False)
    torch.manual_seed(2)
    b = checkpoint.checkpoint(model, x, use_reentrant=False)
    assert not torch.equal(a, b)


def test_huggingface_gradient_checkpointing_on_a_swapped_bert():
    """A swapped BERT with every dropout on, trained one step with transformers' own gradient
    checkpointing: the same loss and gradients as without it."""
    transformers = pytest.importorskip("transformers")
    import warnings

    import fused_attn

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.2,
                                  num_labels=3, max_position_embeddings=64)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")
    fused_attn.swap_modules(model)
    model.train()
    ids = torch.randint(0, 100, (2, 13), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2])

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain = step()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        assert model.is_activation_checkpointing
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        assert model.is_gradient_checkpointing
    loss, grads = step()
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain.keys()
    for name, g in plain.items():
        assert torch.equal(grads[name], g), name


# ---------------------------------------------------------------------------------------------
# What a checkpointed segment does not recompute by itself, and the ways docs/backends.md gives
# (Dropout): an explicit generator=, and the backend use_backend selected.


def _attention_step(fn, q, k, v):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.square().sum().backward()
    return [out.detach()] + [t.grad.clone() for t in (q, k, v)]


def test_a_generator_made_inside_the_checkpointed_function_recomputes_its_masks():
    """checkpoint restores torch's default generators, not a generator= passed in; one made from
    a seed inside the checkpointed function draws the same in the recomputation."""
    from fused_attn import functional as F

    q, k, v = make_inputs((1, 2, 16, 8), (1, 2, 16, 8), (1, 2, 16, 8), seed=0, requires_grad=True)

    def seeded(q, k, v, seed=123):
        return F.attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(seed))

    plain = _attention_step(seeded, q, k, v)
    for use_reentrant in (False, True):
        got = _attention_step(lambda *t: checkpoint.checkpoint(seeded, *t, use_reentrant=use_reentrant), q, k, v)
        assert all(torch.equal(a, b) for a, b in zip(got, plain)), use_reentrant


def test_checkpointing_under_use_backend_recomputes_on_the_selected_backend(monkeypatch):
    """use_backend is per thread and read when the recomputation runs: with the backward inside
    the block on CPU tensors (the calling thread runs it), or with context_fn selecting the
    backend for the recomputation, the segment recomputes on the forward's backend and the step
    equals the plain one bit for bit."""
    from fused_attn import functional as F
    from fused_attn import use_backend
    from fused_attn.backends import BACKENDS

    ran = []
    for name in ("cpu", "reference"):
        real = BACKENDS[name].attention_fwd
        monkeypatch.setattr(BACKENDS[name], "attention_fwd",
                            lambda *a, _real=real, _name=name: (ran.append(_name), _real(*a))[1])
    q, k, v = make_inputs((2, 4, 64, 32), (2, 4, 64, 32), (2, 4, 64, 32), seed=0, requires_grad=True)

    def fn(q, k, v):
        return F.attention(q, k, v, causal=True)

    with use_backend("reference"):
        plain = _attention_step(fn, q, k, v)
    assert ran == ["reference"]
    for use_reentrant in (False, True):
        ran.clear()
        with use_backend("reference"):
            got = _attention_step(lambda *t: checkpoint.checkpoint(fn, *t, use_reentrant=use_reentrant), q, k, v)
        assert ran == ["reference", "reference"], use_reentrant
        assert all(torch.equal(a, b) for a, b in zip(got, plain)), use_reentrant
    ran.clear()
    with use_backend("reference"):
        out = checkpoint.checkpoint(fn, q, k, v, use_reentrant=False,
                                    context_fn=lambda: (use_backend("reference"), use_backend("reference")))
    for t in (q, k, v):
        t.grad = None
    out.square().sum().backward()  # outside the block: context_fn selects the backend again
    assert ran == ["reference", "reference"]
    assert all(torch.equal(a, b) for a, b in zip([out.detach(), q.grad, k.grad, v.grad], plain))


# ---------------------------------------------------------------------------------------------
# Packed input with learnable ALiBi slopes: with grad mode on the fused module runs each sequence
# through ``attention`` (whose kernels return the slopes' gradient), under no_grad one
# ``attention_varlen`` call. Reentrant checkpointing runs the first forward under no_grad and the
# recomputation with grad, so the two paths must drop the same elements.

PACKED_CU = torch.tensor([0, 4, 4, 18, 19, 26], dtype=torch.int32)  # (an empty and a one-token sequence)


def _packed_learnable_layer(**kw):
    torch.manual_seed(0)
    return M.TransformerLayer(32, 4, dropout=0.3, alibi="learnable", causal=True, **kw).train()


@pytest.mark.parametrize("kw", [dict(), dict(norm_first=True, num_kv_heads=2, sinks=True, rotary=True)],
                         ids=["post-LN", "pre-LN gqa sinks rotary"])
def test_packed_learnable_alibi_checkpointed_reentrant_or_not_gives_the_same_step(kw):
    """The reviewer's case: each per-sequence call drew its own seed while attention_varlen draws
    one, so the reentrant step's output was off by 1.26 and x's gradient by 3.3, silently."""
    layer = _packed_learnable_layer(**kw)
    (x,) = make_inputs((26, 32), seed=1, requires_grad=True)

    def step(use_reentrant):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)
        out = checkpoint.checkpoint(lambda t: layer(t, cu_seqlens=PACKED_CU), x, use_reentrant=use_reentrant)
        out.pow(2).sum().backward()
        return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    plain, reentrant = step(False), step(True)
    assert layer.multi_head_attention.alibi_slopes.grad.abs().sum() > 0
    for a, b in zip(plain, reentrant):  # (the two paths' kernels round the bias differently: to rounding)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_packed_learnable_alibi_drops_the_same_elements_with_and_without_grad_mode():
    """Grad mode (per sequence) and no_grad (attention_varlen) give the same output and leave
    torch's generator in the same state (one [seed, offset] pair drawn either way)."""
    layer = _packed_learnable_layer()
    (x,) = make_inputs((26, 32), seed=1, requires_grad=False)
    runs = []
    for grad in (True, False):
        torch.manual_seed(1)
        with torch.set_grad_enabled(grad):
            out = layer.multi_head_attention(x, cu_seqlens=PACKED_CU)
        runs.append((out.detach(), torch.randint(0, 2**62, (4,))))
    (with_grad, next_with), (without, next_without) = runs
    torch.testing.assert_close(with_grad, without, rtol=1e-5, atol=1e-5)
    assert torch.equal(next_with, next_without)
    torch.manual_seed(2)  # (and the dropout is live: another seed, another output)
    assert not torch.allclose(layer.multi_head_attention(x, cu_seqlens=PACKED_CU), with_grad, atol=1e-2)
