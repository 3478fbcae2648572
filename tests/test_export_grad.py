"""torch.export of the fused ops for training: the exported program's backward gives the eager
gradients. Each fused call is recorded as its forward op with grad mode on (the functional layer
calls the Functions' forwards while exporting), and the op's autograd formula is its Function's
(``ops._register_autograd``); before, strict export ran the calls under no_grad (the inputs got
no gradient, silently) and non-strict export's backward raised."""
import pytest
import torch
from torch import nn

import fused_attn.modules as M
from fused_attn import functional as F

BACKENDS = ("reference", "cpu")


def _parameters(generator, **shapes):
    return {name: nn.Parameter(torch.randn(*shape, generator=generator)) for name, shape in shapes.items()}


class EveryOp(nn.Module):
    """One call of each fused op, every tensor a parameter (x, the norm's input, an argument)."""

    def __init__(self, backend):
        super().__init__()
        self.backend = backend
        g = torch.Generator().manual_seed(0)
        self.p = nn.ParameterDict(_parameters(
            g, q=(2, 4, 5, 8), k=(2, 2, 6, 8), v=(2, 2, 6, 8), mask=(1, 1, 5, 6),  # GQA, Lq != Lk, learned mask
            vq=(9, 4, 8), vk=(11, 2, 8), vv=(11, 2, 8), residual=(3, 5, 16), weight=(16,), bias=(16,),
            w1=(64, 16), b1=(64,), w2=(16, 32), b2=(16,), rot=(2, 5, 4, 8)))
        self.register_buffer("cu_q", torch.tensor([0, 4, 9], dtype=torch.int32))
        self.register_buffer("cu_k", torch.tensor([0, 5, 11], dtype=torch.int32))
        angles = torch.arange(5.0)[:, None] * torch.linspace(0.1, 1.0, 4)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, x):
        p, backend = self.p, self.backend
        attn = F.attention(p["q"], p["k"], p["v"], attn_mask=p["mask"], causal=True, backend=backend)
        plain, lse = F.attention(p["q"], p["k"], p["v"], return_lse=True, backend=backend)
        varlen = F.attention_varlen(p["vq"], p["vk"], p["vv"], self.cu_q, self.cu_k, 5, 6, causal=True,
                                    backend=backend)
        normed, summed = F.layer_norm_residual(x, p["residual"], p["weight"], p["bias"], prenorm=True,
                                               backend=backend)
        rms = F.layer_norm_residual(x, None, p["weight"], None, rms=True, backend=backend)
        ffn = F.feed_forward(x, p["w1"], p["b1"], p["w2"], p["b2"], activation="swiglu", backend=backend)
        rotated = F.apply_rotary_emb(p["rot"], self.cos, self.sin, backend=backend)
        return attn, plain, lse, varlen, normed, summed, rms, ffn, rotated


class Layers(nn.Module):
    """MultiHeadAttention (GQA, causal, rotary) under a pre-norm TransformerLayer."""

    def __init__(self, backend):
        super().__init__()
        torch.manual_seed(0)
        self.attn = M.MultiHeadAttention(16, 4, num_kv_heads=2, causal=True, rotary=True, backend=backend)
        self.layer = M.TransformerLayer(16, 4, 32, norm_first=True, backend=backend)

    def forward(self, x):
        return self.layer(self.attn(x)), self.attn(x, is_causal=False)


def _gradients(module, x):
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    outputs = module(x)
    g = torch.Generator().manual_seed(1)
    loss = sum((out * torch.randn(out.shape, generator=g).to(out.device)).sum() for out in outputs)
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["input"] = x.grad
    return outputs, grads


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [EveryOp, Layers], ids=["ops", "modules"])
def test_exported_program_backward_matches_eager(make, backend, strict):
    model = make(backend)
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    exported = torch.export.export(model, (x,), strict=strict).module()
    want_out, want = _gradients(model, x)
    got_out, got = _gradients(exported, x)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for name, grad in want.items():
        assert grad is not None, name
        assert got[name] is not None, f"{name} got no gradient through the exported program"
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("make", [EveryOp, Layers], ids=["ops", "modules"])
def test_exported_program_backward_matches_eager_on_the_gpu(make, backend, strict):
    """The GPU backends' forward ops carry the same formulas: on a CUDA device (gpu_check.sh's
    GPU tests), the exported program's outputs and gradients are the eager ones."""
    from fused_attn.testing import runnable_backends

    if backend not in runnable_backends("attention", device="cuda"):
        pytest.skip(f"the {backend} backend cannot run here")
    model = make(backend).cuda()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2)).cuda()
    exported = torch.export.export(model, (x,), strict=strict).module()
    want_out, want = _gradients(model, x)
    got_out, got = _gradients(exported, x)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-6)
    for name, grad in want.items():
        assert got[name] is not None, f"{name} got no gradient through the exported program"
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
def test_exported_program_gradient_penalty_and_dropout_match_eager(strict):
    """create_graph=True through the exported program (a gradient penalty: the ops' formulas are
    the Functions' backwards, which recompute with a graph), and dropout: the exported program
    draws its seed in the graph, so under the same torch seed it drops what eager drops, in the
    backward too. float64, on cpu."""
    torch.manual_seed(0)
    model = M.TransformerLayer(16, 4, 32, dropout=0.25, backend="cpu", dtype=torch.float64)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    exported = torch.export.export(model, (x,), strict=strict).module()

    def penalised(module):
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        torch.manual_seed(3)
        out = module(leaf)
        (dx,) = torch.autograd.grad(out.square().sum(), leaf, create_graph=True)
        (out.sum() + dx.square().sum()).backward()
        return out.detach(), {name: p.grad for name, p in module.named_parameters()}

    want_out, want = penalised(model)
    got_out, got = penalised(exported)
    torch.testing.assert_close(got_out, want_out, rtol=1e-10, atol=1e-10)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 8)
        self.slopes = nn.Parameter(torch.rand(1, 2))

    def forward(self, x):
        q = self.linear(x).view(1, 2, 2, 8)  # (B, H, L, D)
        return F.layer_norm_residual(F.attention(q, q, q, alibi_slopes=self.slopes), None, None, None)


def test_exported_program_refuses_gradients_it_was_not_traced_for():
    """What a traced call decides by whether a gradient is wanted stays decided: a program exported
    without gradients runs forward with grad mode on, and its backward raises rather than giving
    a gradient without the norm's sum, or none for ALiBi slopes traced as fixed."""
    x = torch.randn(4, 8)
    model = Norm()
    model.slopes.requires_grad_(False)
    with torch.no_grad():
        exported = torch.export.export(model, (x,), strict=False).module()
    out = exported(x)  # inference with grad mode on: as before
    with pytest.raises(RuntimeError, match=r"was recorded \(a torch.export trace, or a direct call of the op "
                                           r"with store_summed=False\) with no gradient wanted"):
        out.sum().backward()
    exported = torch.export.export(model, (x,), strict=False).module()
    exported.slopes.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no gradient for its argument 'alibi_slopes'"):
        exported(x).sum().backward()
