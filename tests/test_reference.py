"""The reference is the oracle, so it is itself held to PyTorch's own implementations."""
import pytest
import torch
import torch.nn.functional as TF

from fused_attn import reference as R

torch.manual_seed(0)


def _qkv(B=2, Hq=4, Hkv=4, Lq=17, Lk=17, D=16, Dv=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    Dv = D if Dv is None else Dv
    return (torch.randn(B, Hq, Lq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Lk, Dv, generator=g, dtype=dtype))


@pytest.mark.parametrize("Lq,Lk", [(17, 17), (1, 9), (13, 5), (5, 13)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa(Lq, Lk, causal):
    q, k, v = _qkv(Lq=Lq, Lk=Lk)
    torch.testing.assert_close(R.attention(q, k, v, causal=causal), TF.scaled_dot_product_attention(q, k, v, is_causal=causal))


@pytest.mark.parametrize("mask_shape", [(17, 17), (2, 1, 17, 17), (1, 4, 1, 17), (17,)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attention_masks_match_sdpa(mask_shape, kind):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(2)
    if kind == "bool":
        mask = torch.rand(mask_shape, generator=g) > 0.3
        mask[..., 0] = True  # SDPA gives NaN for fully masked rows; we give zeros (tested separately)
    else:
        mask = torch.randn(mask_shape, generator=g, dtype=torch.float64)
    expected = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(2, 4, 17, 17))
    torch.testing.assert_close(R.attention(q, k, v, attn_mask=mask), expected)


def test_attention_gqa_and_dv_and_scale_match_sdpa():
    q, k, v = _qkv(Hq=6, Hkv=2, Lq=7, Lk=11, D=8, Dv=5)
    expected = TF.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), scale=0.3)
    torch.testing.assert_close(R.attention(q, k, v, scale=0.3), expected)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    q, k, v = (t.requires_grad_() for t in _qkv(Lq=4, Lk=6))
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    out = R.attention(q, k, v, attn_mask=mask)
    assert torch.all(out[:, :, 1] == 0) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.all(q.grad[:, :, 1] == 0) and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()


def test_lse_matches_logsumexp_and_is_inf_on_dead_rows():
    q, k, _ = _qkv(Lq=3, Lk=4)
    mask = torch.tensor([[True] * 4, [False] * 4, [True, False, False, False]])
    lse = R.attention_lse(q, k, mask)
    scores = q @ k.transpose(-1, -2) / 4.0
    torch.testing.assert_close(lse[:, :, 0], torch.logsumexp(scores[:, :, 0], -1))
    assert torch.all(lse[:, :, 1] == float("inf"))


def _copy_to_torch_layer(ours, theirs):
    mha = ours.multi_head_attention
    with torch.no_grad():
        theirs.self_attn.in_proj_weight.copy_(torch.cat([mha.query_linear.weight, mha.key_linear.weight, mha.value_linear.weight]))
        theirs.self_attn.in_proj_bias.copy_(torch.cat([mha.query_linear.bias, mha.key_linear.bias, mha.value_linear.bias]))
        theirs.self_attn.out_proj.weight.copy_(mha.out_linear.weight)
        theirs.self_attn.out_proj.bias.copy_(mha.out_linear.bias)
        for a, b in ((ours.ffn.linear1, theirs.linear1), (ours.ffn.linear2, theirs.linear2),
                     (ours.norm1, theirs.norm1), (ours.norm2, theirs.norm2)):
            b.weight.copy_(a.weight)
            b.bias.copy_(a.bias)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_layer_matches_torch_encoder_layer(norm_first, activation):
    torch.manual_seed(0)
    ours = R.TransformerLayer(32, 4, activation=activation, norm_first=norm_first).double()
    theirs = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, dropout=0.0, activation=activation,
                                              batch_first=True, norm_first=norm_first).double()
    _copy_to_torch_layer(ours, theirs)
    x = torch.randn(3, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, 7:] = True
    theirs.train()  # avoid torch's fast path, which returns zeros at padded positions
    torch.testing.assert_close(ours(x, key_padding_mask=pad), theirs(x, src_key_padding_mask=pad))


def test_transformer_512_8_6_trains_and_matches_torch_encoder():
    torch.manual_seed(0)
    ours = R.Transformer(512, 8, 6)
    layer = torch.nn.TransformerEncoderLayer(512, 8, dim_feedforward=2048, dropout=0.0, batch_first=True)
    theirs = torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
    for a, b in zip(ours.layers, theirs.layers):
        _copy_to_torch_layer(a, b)
    x = torch.randn(2, 16, 512)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
    opt = torch.optim.SGD(ours.parameters(), lr=1e-2)
    target = torch.randn(2, 16, 512)
    losses = []
    for _ in range(3):
        loss = TF.mse_loss(ours(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_reference_modules_options():
    torch.manual_seed(0)
    layer = R.TransformerLayer(24, 6, num_kv_heads=2, norm="rmsnorm", activation="swiglu", d_ff=40, causal=True,
                               bias=False)
    assert layer.multi_head_attention.key_linear.weight.shape == (8, 24)
    assert layer.ffn.linear1.weight.shape == (80, 24) and layer.norm1.bias is None
    x = torch.randn(2, 5, 24)
    out = layer(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # causal: changing a later token does not change earlier outputs
    x2 = x.clone()
    x2[:, -1] += 1.0
    torch.testing.assert_close(layer(x2)[:, :-1], out[:, :-1])


@pytest.mark.parametrize("activation", R.ACTIVATIONS)
def test_feed_forward_reference_activations(activation):
    x = torch.randn(3, 4, dtype=torch.float64)
    gated = activation in R.GATED_ACTIVATIONS
    w1 = torch.randn(12 if gated else 6, 4, dtype=torch.float64)
    w2 = torch.randn(4, 6, dtype=torch.float64)
    pre = x @ w1.t()
    expected = {
        "relu": lambda p: p.clamp_min(0), "gelu": lambda p: 0.5 * p * (1 + torch.erf(p / 2 ** 0.5)),
        "gelu_tanh": lambda p: 0.5 * p * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (p + 0.044715 * p ** 3))),
        "silu": lambda p: p * torch.sigmoid(p),
        "swiglu": lambda p: p[:, :6] * torch.sigmoid(p[:, :6]) * p[:, 6:],
        "geglu": lambda p: 0.5 * p[:, :6] * (1 + torch.erf(p[:, :6] / 2 ** 0.5)) * p[:, 6:],
    }[activation](pre)
    torch.testing.assert_close(R.feed_forward(x, w1, None, w2, None, activation), expected @ w2.t())


def test_rmsnorm_and_layernorm_reference():
    x, r = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 3, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    s = x + r
    torch.testing.assert_close(R.layer_norm_residual(x, r, w, None, rms=True),
                               s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w)
    normed, summed = R.layer_norm_residual(x, r, w, None, prenorm=True)
    torch.testing.assert_close(summed, s)
    torch.testing.assert_close(normed, TF.layer_norm(s, (8,), w, None, 1e-5))


def test_rms_norm_of_large_half_values_is_computed_in_float32():
    """RMSNorm of float16 rows with |x| > 256: the mean square is taken in float32 (as F.layer_norm
    and every kernel take it). In float16 the squares overflowed and the whole row came out zeros,
    in the oracle's reference and on the reference backend, the automatic fallback."""
    from fused_attn import functional as F
    x = (torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 300).half()
    w = torch.ones(256, dtype=torch.float16)
    expected = TF.rms_norm(x.double(), (256,), w.double(), 1e-6)
    for out in (R.layer_norm_residual(x, None, w, None, 1e-6, rms=True),
                F.layer_norm_residual(x, None, w, None, 1e-6, rms=True, backend="reference")):
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.double(), expected, atol=2e-3, rtol=2e-3)


def test_reference_backend_bias_gradients_keep_float64():
    """The reference backend's feed-forward bias gradients are summed in float64 for float64
    inputs (they were summed in float32: errors of ~1e-6 where every other gradient is exact)."""
    from fused_attn import functional as F
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=g, dtype=torch.float64) * 100
    w1, b1, w2, b2 = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                      for s in ((32, 16), (32,), (8, 32), (8,)))
    dout = torch.randn(64, 8, generator=g, dtype=torch.float64) * 100
    got = torch.autograd.grad(F.feed_forward(x, w1, b1, w2, b2, activation="gelu", backend="reference"), (b1, b2), dout)
    expected = torch.autograd.grad(TF.linear(TF.gelu(TF.linear(x, w1, b1)), w2, b2), (b1, b2), dout)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-9)


def test_reference_backend_computes_half_precision_attention_in_float32():
    """The reference backend (the automatic fallback) computes bfloat16 attention in float32, as
    the kernels and SDPA's math backend do: its error against float64 is SDPA's, where the scores
    and softmax in bfloat16 gave ~40x more. (``fused_attn.reference.attention`` stays in the input
    dtype: the oracle's low-precision reference.)"""
    from fused_attn import functional as F
    q, k, v = (t.bfloat16().requires_grad_() for t in _qkv(Lq=64, Lk=64, D=32, dtype=torch.float32))
    mask = torch.randn(64, 64, dtype=torch.bfloat16, requires_grad=True)
    exact = TF.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    sdpa_err = (TF.scaled_dot_product_attention(q, k, v, attn_mask=mask).double() - exact).abs().max()
    out = F.attention(q, k, v, attn_mask=mask, backend="reference")
    assert out.dtype == torch.bfloat16
    assert (out.double() - exact).abs().max() <= 1.5 * sdpa_err
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, mask))
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("spread,mean", [(1e-4, 1e8), (1.0, 1e12)])
def test_float64_layer_norm_of_nearly_constant_rows_is_exact(spread, mean):
    """The float64 reference is the oracle's truth: on rows whose spread is ~1e-12 of their mean
    it gave torch's float64 layer_norm, whose mean rounds away digits of the spread (1e8 +- 1e-4:
    out 2e-5 and dx 1e-4 off; 1e12 +- 1: 6e-4), and the oracle failed a kernel more accurate than
    it. It shifts such rows by their mean now, as in float32: held to the same rows shifted by
    their first element (an exact subtraction), where torch's layer_norm is exact."""
    gen = torch.Generator().manual_seed(0)
    d = 1024
    x = torch.randn(8, d, generator=gen, dtype=torch.float64) * spread + mean
    w, b, dy = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((d,), (d,), (8, d)))

    def run(fn, x):
        x = x.clone().requires_grad_()
        out = fn(x)
        out.backward(dy)
        return out.detach(), x.grad

    truth = run(lambda x: TF.layer_norm(x, (d,), w, b), x - x[:, :1])
    got = run(lambda x: R.layer_norm_residual(x, None, w, b), x)
    for t, g in zip(truth, got):
        torch.testing.assert_close(g, t, rtol=1e-10, atol=1e-10 * t.abs().max().item())


# (name, B, Hq, Hkv, Lq, Lk, D, options)
ROUNDED_ONCE_CASES = [
    ("plain", 2, 2, 2, 17, 23, 16, {}),
    ("causal gqa alibi", 1, 4, 2, 33, 33, 24, {"causal": True, "alibi": True}),
    ("window softcap additive mask", 1, 2, 1, 29, 41, 8, {"window_size": (7, 3), "alignment": "bottom_right",
                                                          "softcap": 2.0, "mask": True}),
    ("dropout", 1, 2, 2, 19, 19, 16, {"dropout_p": 0.25}),
]


@pytest.mark.parametrize("case", ROUNDED_ONCE_CASES, ids=[c[0] for c in ROUNDED_ONCE_CASES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reference_backend_rounds_half_precision_attention_once(dtype, case):
    """The reference backend computes half-precision attention in float32 and rounds each output
    and gradient once (backends/reference.py, _attention_in_float32): every element is within the
    unit roundoff u of its float64 value (attention of the same half-precision inputs, backward of
    the same dout), plus float32's own error (1e-5 of the largest value; measured: up to 0.98 of
    this bound). Computed in the input dtype, as ``fused_attn.reference.attention`` (the oracle's
    low-precision reference) does, it is 11 to 20 times the bound in float16 here, 56 to 104 in
    bfloat16. A max-abs bound barely separates the two (the float16 oracle tests: 5.5e-4 of the
    largest value, against 4e-4 to 1.3e-3 computed in float16). Unlike the bfloat16 test above it
    checks the gradients too, and the options the float32 path must pass on (ALiBi, window,
    softcap, mask, dropout)."""
    from fused_attn import functional as F

    name, B, Hq, Hkv, Lq, Lk, D, opts = case
    opts = dict(opts)
    g = torch.Generator().manual_seed(Lq * Lk)
    q, k, v = (torch.randn(*s, generator=g).to(dtype).requires_grad_()
               for s in ((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D)))
    inputs = [q, k, v]
    mask = None
    if opts.pop("mask", False):
        mask = torch.randn(1, Hq, Lq, Lk, generator=g).to(dtype).requires_grad_()
        inputs.append(mask)
    slopes = R.get_alibi_slopes(Hq) * 4 if opts.pop("alibi", False) else None
    p = opts.pop("dropout_p", 0.0)
    causal, window, alignment, softcap = (opts.pop("causal", False), opts.pop("window_size", None),
                                          opts.pop("alignment", "top_left"), opts.pop("softcap", None))
    assert not opts

    def seeded():
        return torch.Generator().manual_seed(5)

    out = F.attention(q, k, v, attn_mask=mask, causal=causal, window_size=window, alignment=alignment,
                      dropout_p=p, softcap=softcap, alibi_slopes=slopes, backend="reference", generator=seeded())
    assert out.dtype == dtype
    dout = torch.randn(out.shape, generator=g).to(dtype)
    got = [out] + list(torch.autograd.grad(out, inputs, dout))

    wide = [t.detach().double().requires_grad_() for t in inputs]
    rng = tuple(torch.randint(0, 2**62, (2,), dtype=torch.int64, generator=seeded()).tolist()) if p else None
    exact = R.attention(wide[0], wide[1], wide[2], wide[3] if mask is not None else None, causal, p, None, rng,
                        window_size=window, alignment=alignment, softcap=softcap,
                        alibi_slopes=None if slopes is None else slopes.double())
    want = [exact] + list(torch.autograd.grad(exact, wide, dout.double()))

    u = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    for label, a, e in zip(["out", "dq", "dk", "dv", "dmask"], got, want):
        assert a.dtype == dtype, label
        bound = u * e.abs() + 1e-5 * max(1.0, e.abs().max().item())
        worst = ((a.double() - e).abs() / bound).max().item()
        assert worst <= 1.0, f"{label}: {worst:.3g} times the bound (u = {u:.3g})"
