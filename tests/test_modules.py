"""The fused modules against the reference modules: same parameters, same init, same numbers."""
import pytest
import torch

import fused_attn
from fused_attn import modules as M
from fused_attn import reference as R
from fused_attn.testing import check_module_against_reference, make_inputs

B, L, D_MODEL, HEADS = 2, 17, 32, 4


def _pair(cls_name, *args, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = getattr(R, cls_name)(*args, **kwargs)
    torch.manual_seed(seed)
    fused = getattr(M, cls_name)(*args, **kwargs)
    return fused, ref


def _perturb_norms(*models):
    """Norm weights start at ones and biases at zeros; make them generic so their gradients and
    effect are tested, identically in every model."""
    gen = torch.Generator().manual_seed(7)
    for model in models:
        gen.manual_seed(7)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def test_exports():
    for name in ("MultiHeadAttention", "LayerNormResidual", "FeedForward", "TransformerLayer", "Transformer",
                 "swap_modules", "restore_modules"):
        assert hasattr(fused_attn, name), name


@pytest.mark.parametrize("cls_name,args,kwargs", [
    ("MultiHeadAttention", (D_MODEL, HEADS), dict(num_kv_heads=2, bias=False)),
    ("LayerNormResidual", (D_MODEL,), dict(norm="rmsnorm", bias=False)),
    ("FeedForward", (D_MODEL,), dict(activation="swiglu", d_ff=40)),
    ("TransformerLayer", (D_MODEL, HEADS), dict(norm_first=True, num_kv_heads=1)),
    ("Transformer", (D_MODEL, HEADS, 2), dict(activation="gelu")),
])
def test_same_parameters_init_and_state_dict(cls_name, args, kwargs):
    fused, ref = _pair(cls_name, *args, **kwargs)
    sd_f, sd_r = fused.state_dict(), ref.state_dict()
    assert list(sd_f) == list(sd_r)
    for name in sd_r:
        assert sd_f[name].shape == sd_r[name].shape
        assert torch.equal(sd_f[name], sd_r[name]), f"{name} initialised differently"
    # strict loading both ways
    torch.manual_seed(123)
    other = getattr(R, cls_name)(*args, **kwargs)
    fused.load_state_dict(other.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)


def test_same_forward_signature():
    import inspect
    for name in ("MultiHeadAttention", "LayerNormResidual", "FeedForward", "TransformerLayer", "Transformer"):
        f, r = inspect.signature(getattr(M, name).forward), inspect.signature(getattr(R, name).forward)
        assert f == r, name


def test_constructor_arguments_bind_as_the_reference_s():
    """Every fused module's constructor has the reference's parameters, in the same positions with
    the same kinds and defaults, and one more, ``backend``, keyword-only: a positional call binds
    the same on both. (MultiHeadAttention and TransformerLayer had backend between dtype and
    alibi, and Transformer after num_layers: the reference's alibi=True, passed positionally, was
    taken as the fused module's backend and refused.)"""
    import inspect
    for name in ("MultiHeadAttention", "LayerNormResidual", "FeedForward", "TransformerLayer", "Transformer"):
        fused, ref = (inspect.signature(getattr(mod, name).__init__).parameters for mod in (M, R))
        assert [p for p in fused.values() if p.name != "backend"] == list(ref.values()), name
        assert fused["backend"].kind is inspect.Parameter.KEYWORD_ONLY and fused["backend"].default is None, name
    # the reporter's call: alibi=True as the 10th positional argument
    args = (D_MODEL, HEADS, 0.0, True, None, False, None, None, None, True)
    assert R.MultiHeadAttention(*args).alibi is True and M.MultiHeadAttention(*args).alibi is True


MHA_CASES = {
    "self": dict(kwargs={}, mask=None),
    "gqa_causal": dict(kwargs=dict(num_kv_heads=2, causal=True), mask=None),
    "gqa_causal_sliding_window": dict(kwargs=dict(num_kv_heads=2, causal=True, window_size=(3, 0)), mask="bool"),
    "mqa_nobias": dict(kwargs=dict(num_kv_heads=1, bias=False), mask=None),
    "bool_mask_padding": dict(kwargs={}, mask="bool"),
    "additive_mask": dict(kwargs=dict(num_kv_heads=2), mask="additive"),
}


@pytest.mark.parametrize("case", sorted(MHA_CASES))
@pytest.mark.parametrize("train", [False, True])
def test_multi_head_attention_matches_reference(case, train):
    spec = MHA_CASES[case]
    fused, ref = _pair("MultiHeadAttention", D_MODEL, HEADS, **spec["kwargs"])
    fused.train(train), ref.train(train)
    (x,) = make_inputs((B, L, D_MODEL), seed=1)
    attn_mask = key_padding_mask = None
    if spec["mask"] == "bool":
        attn_mask = torch.rand(L, L, generator=torch.Generator().manual_seed(2)) > 0.3
        key_padding_mask = torch.zeros(B, L, dtype=torch.bool)
        key_padding_mask[1, -5:] = True
    elif spec["mask"] == "additive":
        attn_mask = torch.randn(B, 1, L, L, generator=torch.Generator().manual_seed(3))
    check_module_against_reference(
        fused, ref, [x],
        run=lambda m, x: m(x, attn_mask=None if attn_mask is None else (attn_mask if attn_mask.dtype == torch.bool
                                                                        else attn_mask.to(x.dtype)),
                           key_padding_mask=key_padding_mask))


def test_multi_head_attention_cross_attention_and_is_causal_override():
    fused, ref = _pair("MultiHeadAttention", D_MODEL, HEADS, num_kv_heads=2)
    x, mem = make_inputs((B, L, D_MODEL), (B, 9, D_MODEL), seed=4)
    # key is value (a memory): the packed K/V path
    check_module_against_reference(fused, ref, [x, mem], run=lambda m, x, mem: m(x, mem))
    # separate key and value
    x, k, v = make_inputs((B, L, D_MODEL), (B, 9, D_MODEL), (B, 9, D_MODEL), seed=5)
    check_module_against_reference(fused, ref, [x, k, v], run=lambda m, x, k, v: m(x, k, v))
    # is_causal overrides the module's causal flag
    (x,) = make_inputs((B, L, D_MODEL), seed=6)
    check_module_against_reference(fused, ref, [x], run=lambda m, x: m(x, is_causal=True))


@pytest.mark.parametrize("module", [M, R], ids=["fused", "reference"])
def test_additive_mask_and_key_padding_match_torch_multihead_attention(module):
    """An additive float attn_mask per (batch, head) together with a bool key_padding_mask (True =
    padding) gives torch.nn.MultiheadAttention's output and gradients (inputs, mask, weights), with
    the same weights, in float64, cross-attention (Lq != Lk). The two masks are combined by
    reference.merge_masks, which the fused and the reference module share: comparing the two
    modules cannot catch a mistake there (the padding dropped from a float mask, a transposed
    padding mask)."""
    b, lq, lk, e, h = 3, 5, 7, 16, 2
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(e, h, batch_first=True, dtype=torch.float64)
    ours = module.MultiHeadAttention(e, h, dtype=torch.float64)
    projections = (ours.query_linear, ours.key_linear, ours.value_linear)
    with torch.no_grad():
        for lin, w, bias in zip(projections, theirs.in_proj_weight.chunk(3), theirs.in_proj_bias.chunk(3)):
            lin.weight.copy_(w)
            lin.bias.copy_(bias)
        ours.out_linear.weight.copy_(theirs.out_proj.weight)
        ours.out_linear.bias.copy_(theirs.out_proj.bias)
    g = torch.Generator().manual_seed(1)
    x, mem = (torch.randn(b, n, e, generator=g, dtype=torch.float64) for n in (lq, lk))
    mask = torch.randn(b, h, lq, lk, generator=g, dtype=torch.float64) * 2
    pad = torch.zeros(b, lk, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, :3] = True  # (every query keeps some key: torch gives NaN for a row with none)
    dout = torch.randn(b, lq, e, generator=g, dtype=torch.float64)

    def run(m, call):
        inputs = [t.clone().requires_grad_() for t in (x, mem, mask)]
        m.zero_grad(set_to_none=True)
        out = call(m, *inputs)
        out.backward(dout)
        return out.detach(), [t.grad for t in inputs]

    out, grads = run(ours, lambda m, x, mem, mask: m(x, mem, attn_mask=mask, key_padding_mask=pad))
    pad_additive = torch.zeros(b, lk, dtype=torch.float64).masked_fill(pad, float("-inf"))  # (torch: one mask type)
    want, want_grads = run(theirs, lambda m, x, mem, mask: m(x, mem, mem, attn_mask=mask.reshape(b * h, lq, lk),
                                                             key_padding_mask=pad_additive, need_weights=False)[0])
    assert bool(out.isfinite().all())
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    for name, got, expected in zip(["x", "memory", "mask"], grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")
    assert bool((grads[2][pad[:, None, None, :].expand(b, h, lq, lk)] == 0).all())  # (no gradient where padded)
    ours_w = torch.cat([lin.weight.grad for lin in projections])
    ours_b = torch.cat([lin.bias.grad for lin in projections])
    for name, got, expected in (("in_proj_weight", ours_w, theirs.in_proj_weight.grad),
                                ("in_proj_bias", ours_b, theirs.in_proj_bias.grad),
                                ("out_proj.weight", ours.out_linear.weight.grad, theirs.out_proj.weight.grad),
                                ("out_proj.bias", ours.out_linear.bias.grad, theirs.out_proj.bias.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


def test_projections_copy_no_weights_and_pass_views(monkeypatch):
    """Q, K and V are projected with the modules' own weights (no concatenation of them at each
    call, which a decoding step would pay more for than for its matmuls), and the op gets strided
    views of the projections."""
    fused, _ = _pair("MultiHeadAttention", D_MODEL, HEADS, num_kv_heads=2)
    calls = []
    real_linear = torch.nn.functional.linear
    params = {id(p) for p in fused.parameters()}

    def counting_linear(x, w, b=None):
        assert id(w) in params, "a projection's weight was copied"
        calls.append(tuple(w.shape))
        return real_linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    seen = {}
    real_attention = M.attention

    def spy(q, k, v, **kw):
        seen.update(q=q, k=k, v=v)
        out = real_attention(q, k, v, **kw)
        seen["out"] = out
        return out

    monkeypatch.setattr(M, "attention", spy)
    x = torch.randn(B, L, D_MODEL)
    fused(x)
    kv = 2 * D_MODEL // HEADS
    assert calls == [(D_MODEL, D_MODEL), (kv, D_MODEL), (kv, D_MODEL), (D_MODEL, D_MODEL)]  # q, k, v, out
    assert not seen["q"].is_contiguous() and seen["q"]._base is not None  # views, not copies
    assert seen["out"].transpose(1, 2).is_contiguous()  # merging heads back is a view


@pytest.mark.parametrize("norm,bias", [("layernorm", True), ("rmsnorm", False)])
@pytest.mark.parametrize("prenorm", [False, True])
def test_layer_norm_residual_matches_reference(norm, bias, prenorm):
    fused, ref = _pair("LayerNormResidual", D_MODEL, norm=norm, bias=bias, eps=1e-6)
    _perturb_norms(fused, ref)
    x, r = make_inputs((B, L, D_MODEL), (B, L, D_MODEL), seed=8)
    check_module_against_reference(fused, ref, [x, r], run=lambda m, x, r: m(x, r, prenorm=prenorm))
    (x,) = make_inputs((3, D_MODEL), seed=9)
    check_module_against_reference(fused, ref, [x])


@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh", "silu", "swiglu", "geglu"])
def test_feed_forward_matches_reference(activation):
    fused, ref = _pair("FeedForward", D_MODEL, d_ff=40, activation=activation, bias=activation != "silu")
    (x,) = make_inputs((B, L, D_MODEL), seed=10)
    check_module_against_reference(fused, ref, [x])


LAYER_CASES = {
    "post_ln_relu": dict(),
    "pre_ln_gelu": dict(norm_first=True, activation="gelu"),
    "pre_ln_rms_swiglu_gqa_causal": dict(norm_first=True, norm="rmsnorm", activation="swiglu", num_kv_heads=2,
                                         causal=True, bias=False),
    "post_ln_rms_geglu_mqa": dict(norm="rmsnorm", activation="geglu", num_kv_heads=1, d_ff=24, eps=1e-6),
    "pre_ln_local_window": dict(norm_first=True, window_size=(2, 2)),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
@pytest.mark.parametrize("train", [False, True])
def test_transformer_layer_matches_reference(case, train):
    fused, ref = _pair("TransformerLayer", D_MODEL, HEADS, **LAYER_CASES[case])
    _perturb_norms(fused, ref)
    fused.train(train), ref.train(train)
    (x,) = make_inputs((B, L, D_MODEL), seed=11)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, -3:] = True
    check_module_against_reference(fused, ref, [x], run=lambda m, x: m(x, key_padding_mask=padding))


def test_transformer_layer_calls_fused_norm_with_the_residual(monkeypatch):
    """No norm(x + y) in Python: every norm gets its residual (and pre-LN norm2 returns the sum)."""
    calls = []
    real = M.layer_norm_residual

    def spy(x, residual=None, *args, **kwargs):
        calls.append((residual is not None, kwargs.get("prenorm", False)))
        return real(x, residual, *args, **kwargs)

    monkeypatch.setattr(M, "layer_norm_residual", spy)
    x = torch.randn(B, L, D_MODEL)
    M.TransformerLayer(D_MODEL, HEADS)(x)
    assert calls == [(True, False), (True, False)]
    calls.clear()
    M.TransformerLayer(D_MODEL, HEADS, norm_first=True)(x)
    assert calls == [(False, False), (True, True)]


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_stack_matches_reference(norm_first):
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 3, norm_first=norm_first, d_ff=48)
    _perturb_norms(fused, ref)
    (x,) = make_inputs((B, 13, D_MODEL), seed=12)
    check_module_against_reference(fused, ref, [x], run=lambda m, x: m(x, is_causal=True))


def test_dropout_in_training_is_active_and_off_in_eval():
    torch.manual_seed(0)
    layer = M.TransformerLayer(D_MODEL, HEADS, dropout=0.5)
    x = torch.randn(B, L, D_MODEL)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.allclose(layer(x), layer(x))


@pytest.mark.parametrize("module", [M, R], ids=["fused", "reference"])
def test_pre_ln_layer_drops_the_ffn_branch_before_the_last_add(module):
    """pre-LN: out = x1 + dropout(ffn(norm2(x1))), the last add's dropout at the layer's p. With the
    attention branch zeroed (out_linear = 0: x1 = x) and the FFN's inner dropout off, out - x is
    the FFN branch with each element dropped (0) or kept and scaled by 1/(1-p) (2 at p = 0.5):
    about half of each. test_dropout_in_training_is_active_and_off_in_eval saw the layer's other
    dropouts and not this one."""
    torch.manual_seed(0)
    layer = module.TransformerLayer(D_MODEL, HEADS, norm_first=True, dropout=0.5)
    with torch.no_grad():
        layer.multi_head_attention.out_linear.weight.zero_()
        layer.multi_head_attention.out_linear.bias.zero_()
    layer.ffn.dropout = 0.0
    x = torch.randn(B, L, D_MODEL)
    with torch.no_grad():
        branch = layer.eval()(x) - x
        dropped = layer.train()(x) - x
    kept = dropped != 0
    assert (branch != 0).all()
    torch.testing.assert_close(dropped[kept], 2 * branch[kept], atol=1e-5, rtol=1e-5)
    assert 0.4 < kept.float().mean() < 0.6, kept.float().mean()


def test_extra_repr_shows_the_backend():
    mha = M.MultiHeadAttention(D_MODEL, HEADS)
    assert "backend=auto -> " in repr(mha)
    assert "backend=reference" in repr(M.FeedForward(D_MODEL, backend="reference"))
    assert "backend=reference" in repr(M.TransformerLayer(D_MODEL, HEADS, backend="reference"))
    with fused_attn.use_backend("reference"):
        assert "backend=reference" in repr(M.LayerNormResidual(D_MODEL))


def test_backend_argument_is_validated_and_used():
    with pytest.raises(ValueError, match="backend"):
        M.FeedForward(D_MODEL, backend="nope")
    ffn = M.FeedForward(D_MODEL, backend="reference")
    x = torch.randn(2, D_MODEL)
    assert torch.allclose(ffn(x), R.FeedForward.forward(ffn, x))


PACKED_LENS = [5, 1, 13, 7]


def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("norm_first", [False, True])
def test_packed_transformer_matches_reference(norm_first):
    """Packed sequences through the whole stack ((total_tokens, d_model) with cu_seqlens): the fused
    modules against the reference modules, output and every gradient."""
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 2, norm_first=norm_first, d_ff=48, num_kv_heads=2, causal=True)
    _perturb_norms(fused, ref)
    (x,) = make_inputs((sum(PACKED_LENS), D_MODEL), seed=13)
    cu = _cu(PACKED_LENS)
    results = check_module_against_reference(fused, ref, [x], run=lambda m, x: m(x, cu_seqlens=cu))
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_packed_is_each_sequence_alone():
    """A packed batch gives each sequence's rows as a (1, L, d_model) call on it alone gives them,
    with max_seqlen given or read from cu_seqlens."""
    torch.manual_seed(0)
    model = M.Transformer(D_MODEL, HEADS, 2, window_size=(4, 1)).eval()
    (x,) = make_inputs((sum(PACKED_LENS), D_MODEL), seed=14, requires_grad=False)
    cu = _cu(PACKED_LENS)
    packed = model(x, cu_seqlens=cu)
    torch.testing.assert_close(packed, model(x, cu_seqlens=cu, max_seqlen=max(PACKED_LENS)), rtol=0, atol=0)
    for s in range(len(PACKED_LENS)):
        a, b = int(cu[s]), int(cu[s + 1])
        torch.testing.assert_close(packed[a:b], model(x[None, a:b])[0], rtol=1e-5, atol=1e-5)


def test_packed_call_errors():
    x = torch.randn(10, D_MODEL)
    cu = _cu([4, 6])
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        mha = cls(D_MODEL, HEADS)
        with pytest.raises(ValueError, match="takes no attn_mask or key_padding_mask"):
            mha(x, cu_seqlens=cu, key_padding_mask=torch.zeros(2, 6, dtype=torch.bool))
        with pytest.raises(ValueError, match="is for self-attention"):
            mha(x, torch.randn(10, D_MODEL), cu_seqlens=cu)
        with pytest.raises(ValueError, match=r"must be \(total_tokens, d_model=32\)"):
            mha(x[None], cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        M.MultiHeadAttention(D_MODEL, HEADS)(x, cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32))


PACKED_MISTAKES = [  # (cu_seqlens, max_seqlen, error, the message) of a (10, d_model) input
    ([1, 4, 10], None, ValueError, r"cu_seqlens must start at 0, never decrease and end at the total length 10 "
                                   r"\(the input's tokens\), got \[1, 4, 10\]"),
    ([0, 4, 9], None, ValueError, r"cu_seqlens must start at 0, .* got \[0, 4, 9\]"),
    ([0, 6, 4, 10], None, ValueError, r"cu_seqlens must start at 0, .* got \[0, 6, 4, 10\]"),
    ([0, 4, 10], 5, ValueError, r"^max_seqlen = 5 is shorter than the longest sequence in cu_seqlens \(6\)$"),
    ([0, 4, 10], 6.0, TypeError, r"^max_seqlen must be an int or None, got 6.0$"),
    ([0, 4, 10], -1, ValueError, r"^max_seqlen must be >= 0, got -1$"),
    (torch.tensor([0.0, 4.0, 10.0]), None, TypeError, r"^cu_seqlens must be int32 or int64, got float32$"),
    (torch.tensor([[0, 4, 10]], dtype=torch.int32), None, ValueError, r"^cu_seqlens must be 1-D"),
    ([0, 4, 10], "list", TypeError, r"^cu_seqlens must be a torch.Tensor, got list$"),
]


@pytest.mark.parametrize("kwargs", [dict(), dict(rotary=True), dict(alibi="learnable"),
                                    dict(alibi="learnable", rotary=True)], ids=["plain", "rotary", "learnable",
                                                                                 "learnable rotary"])
@pytest.mark.parametrize("mistake", range(len(PACKED_MISTAKES)))
def test_packed_call_errors_name_the_modules_arguments(kwargs, mistake):
    """A packed call's mistakes are named as the caller passed them, cu_seqlens and max_seqlen, the
    same message from the fused and the reference modules, with or without rotary, on either
    learnable-slope path. The fused module said cu_seqlens_q / max_seqlen_q (attention_varlen's
    names) without rotary and max_seqlen (rotary's) with it; the reference checked nothing
    (a wrong answer, or an error from inside torch)."""
    cu, max_seqlen, error, match = PACKED_MISTAKES[mistake]
    if max_seqlen == "list":
        max_seqlen = None
    elif isinstance(cu, list):
        cu = torch.tensor(cu, dtype=torch.int32)
    x = torch.randn(10, D_MODEL)
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        mha = cls(D_MODEL, HEADS, **kwargs)
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pytest.raises(error, match=match):
                mha(x, cu_seqlens=cu, max_seqlen=max_seqlen)


def test_packed_call_reads_the_boundaries_once(monkeypatch):
    """Checking cu_seqlens in the module costs no second device-to-host read: attention_varlen is
    handed the lengths checked. One read per forward, where attention_varlen read the one tensor
    twice, as cu_seqlens_q and as cu_seqlens_k."""
    mha = M.MultiHeadAttention(D_MODEL, HEADS, alibi=True)
    cu = _cu([4, 6])
    x = torch.randn(10, D_MODEL)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t is cu) or tolist(t))
    mha(x, cu_seqlens=cu, max_seqlen=64)
    assert reads.count(True) == 1


def test_unpacked_call_errors():
    """Without cu_seqlens (or kv_cache) the modules take (B, L, d_model) tensors: a 2-D input, a
    key of other rank or a wrong width raises a ValueError naming the argument and the shapes
    expected, where a 2-D input raised "not enough values to unpack (expected 3, got 2)"."""
    x = torch.randn(B, L, D_MODEL)
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        mha = cls(D_MODEL, HEADS)
        with pytest.raises(ValueError, match=r"query must be \(batch, length, d_model=32\) "
                                             r"\(or \(total_tokens, d_model\) with cu_seqlens.*got \(17, 32\)"):
            mha(x[0])
        with pytest.raises(ValueError, match=r"key must be \(batch, length, d_model=32\), got \(17, 32\)"):
            mha(x, x[0])
        with pytest.raises(ValueError, match=r"value must be \(batch, length, d_model=32\), got \(2, 17, 31\)"):
            mha(x, x, x[..., :-1])


def test_call_arguments_are_checked():
    """A key_padding_mask of another shape or type (it failed indexing, or was blamed on attn_mask),
    an is_causal that is not a bool (a string was read as True), a query or attn_mask that is not
    a tensor (AttributeError): each raises naming the argument and what was expected."""
    x = torch.randn(B, L, D_MODEL)
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        mha = cls(D_MODEL, HEADS)
        for mask in (torch.zeros(L, dtype=torch.bool), torch.zeros(B, L + 1, dtype=torch.bool)):
            with pytest.raises(ValueError, match=rf"key_padding_mask must be \(batch, key length\) = \({B}, {L}\)"):
                mha(x, key_padding_mask=mask)
        with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor .* got list"):
            mha(x, key_padding_mask=[[False] * L] * B)
        with pytest.raises(TypeError, match="is_causal must be None or a bool, got 'no'"):
            mha(x, is_causal="no")
        with pytest.raises(TypeError, match="query must be a torch.Tensor, got list"):
            mha(x.tolist())
        with pytest.raises(TypeError, match="attn_mask must be a torch.Tensor or None, got list"):
            mha(x, attn_mask=[[True]])


def _same_outcome(fused_call, ref_call):
    """Both calls raise the same error (type and message), or both return."""
    outcomes = []
    for call in (fused_call, ref_call):
        try:
            call()
            outcomes.append(None)
        except Exception as error:  # noqa: BLE001 (compared below)
            outcomes.append((type(error), str(error)))
    assert outcomes[0] == outcomes[1], outcomes
    return outcomes[0]


def test_reference_modules_refuse_what_the_fused_ones_refuse():
    """The reference modules ran none of the fused modules' checks: a string prenorm returned a
    tuple, an int x and a float64 x next to float32 parameters were taken, a wrong size or a 0-d x
    failed inside torch (layer_norm, linear), a float64 attn_mask or KV cache gave "expected scalar
    type". Each raises the fused module's error now; what the fused module takes (float64 x with
    float64 parameters, half x next to float32 norm parameters) the reference still takes."""
    x = torch.randn(B, L, D_MODEL)
    norm, norm_ref = _pair("LayerNormResidual", D_MODEL)
    ffn, ffn_ref = _pair("FeedForward", D_MODEL)
    refused = [((norm, norm_ref), (x,), dict(prenorm="no")),
               ((norm, norm_ref), (x.long(),), {}),
               ((norm, norm_ref), (x.double(),), {}),
               ((norm, norm_ref), (x, x.double()), {}),
               ((norm, norm_ref), (x[..., :-1],), {}),
               ((norm, norm_ref), (torch.tensor(1.0),), {}),
               ((ffn, ffn_ref), (x[..., :-1],), {}),
               ((ffn, ffn_ref), (x.long(),), {}),
               ((ffn, ffn_ref), (x.double(),), {}),
               ((ffn, ffn_ref), (torch.tensor(1.0),), {})]
    for (fused, ref), args, kwargs in refused:
        assert _same_outcome(lambda: fused(*args, **kwargs), lambda: ref(*args, **kwargs)) is not None
    mha, mha_ref = _pair("MultiHeadAttention", D_MODEL, HEADS)
    for dtype in (torch.float64, torch.float16):
        mask = torch.zeros(L, L, dtype=dtype)
        error = _same_outcome(lambda: mha(x, attn_mask=mask), lambda: mha_ref(x, attn_mask=mask))
        assert error[0] is TypeError and "attn_mask must be bool (True = attend) or additive" in error[1]
    mha.eval(), mha_ref.eval()
    with torch.no_grad():
        for dtype in (torch.float64, torch.float16):
            caches = [m.new_kv_cache(B, 32, dtype=dtype) for m in (mha, mha_ref)]
            error = _same_outcome(lambda: mha(x, kv_cache=caches[0], is_causal=True),
                                  lambda: mha_ref(x, kv_cache=caches[1], is_causal=True))
            assert error[0] is TypeError and "kv_cache.k has dtype" in error[1]
            assert not any(c.k.any() or c.seqlens.any() for c in caches)  # (refused before the write)
    # taken by both: float64 everywhere, and half x next to float32 norm parameters
    norm64, norm64_ref = _pair("LayerNormResidual", D_MODEL, dtype=torch.float64)
    ffn64, ffn64_ref = _pair("FeedForward", D_MODEL, dtype=torch.float64)
    for fused, ref, inputs in ((norm64, norm64_ref, (x.double(),)), (ffn64, ffn64_ref, (x.double(),)),
                               (norm, norm_ref, (x.half(), x.half()))):
        assert _same_outcome(lambda: fused(*inputs), lambda: ref(*inputs)) is None
    assert norm_ref(x, prenorm=True)[1].shape == x.shape


@pytest.mark.parametrize("with_padding", [False, True])
def test_attn_mask_is_checked_before_it_meets_key_padding_mask(with_padding):
    """With a key_padding_mask the two masks are merged before ``attention`` sees them: an int
    mask, a mask of another shape or on another device failed inside torch ("cannot be converted
    to type int without overflow", "size of tensor a (2) must match", a device error), a padding
    mask on another device was blamed on attn_mask, and a shape error quoted the merged
    (B, 1, Lq, Lk) shape. Each now raises naming the caller's argument and shape, with or without
    the padding mask alike."""
    x = torch.randn(B, L, D_MODEL)
    pad = torch.zeros(B, L, dtype=torch.bool) if with_padding else None
    target = rf"\(batch, num_heads, query length, key length\) = \({B}, {HEADS}, {L}, {L}\)"
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        mha = cls(D_MODEL, HEADS)
        with pytest.raises(TypeError, match="attn_mask must be bool .* or a floating-point additive mask, got int32"):
            mha(x, attn_mask=torch.ones(L, L, dtype=torch.int32), key_padding_mask=pad)
        for shape in ((L, 2), (L + 1, L), (3, 1, L, L), (1, 1, 1, L, L)):
            with pytest.raises(ValueError, match=rf"attn_mask of shape \({', '.join(map(str, shape))}\) is not "
                                                 rf"broadcastable to {target}"):
                mha(x, attn_mask=torch.ones(shape, dtype=torch.bool), key_padding_mask=pad)
        with pytest.raises(ValueError, match="attn_mask is on meta but query is on cpu"):
            mha(x, attn_mask=torch.ones(L, L, dtype=torch.bool, device="meta"), key_padding_mask=pad)
        if with_padding:
            for mask in (None, torch.ones(L, L, dtype=torch.bool)):
                with pytest.raises(ValueError, match="key_padding_mask is on meta but query is on cpu"):
                    mha(x, attn_mask=mask, key_padding_mask=pad.to("meta"))
        # cross-attention: the key's length is the mask's last dimension
        kv = torch.randn(B, L + 3, D_MODEL)
        cross_pad = None if pad is None else torch.zeros(B, L + 3, dtype=torch.bool)
        assert mha(x, kv, attn_mask=torch.ones(L, L + 3, dtype=torch.bool), key_padding_mask=cross_pad).shape == x.shape
        with pytest.raises(ValueError, match=rf"attn_mask of shape \({L}, {L}\) .* = \({B}, {HEADS}, {L}, {L + 3}\)"):
            mha(x, kv, attn_mask=torch.ones(L, L, dtype=torch.bool), key_padding_mask=cross_pad)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(sinks="no"), TypeError, "sinks must be a bool, got str 'no'"),  # (a truthy string turned them on)
    (dict(rotary="no"), TypeError, "rotary must be a bool, got str 'no'"),
    (dict(causal="no"), TypeError, "causal must be a bool, got str 'no'"),
    (dict(bias=None), TypeError, "bias must be a bool, got NoneType None"),
    (dict(alibi=1), ValueError, "alibi must be False, True or 'learnable', got 1"),
    (dict(window_size=5), TypeError, r"window_size must be None or a pair of ints \(left, right\), got 5"),
    (dict(window_size=(-3, 0)), ValueError, r"window_size sides must be >= 0, or -1 for unbounded, got \(-3, 0\)"),
    (dict(dropout=1.5), ValueError, r"dropout must be in \[0, 1\), got 1.5"),  # (eval never said)
    (dict(dropout=1.0), ValueError, r"dropout must be in \[0, 1\), got 1.0"),  # (as attention's dropout_p)
    (dict(dropout="a"), TypeError, r"dropout must be a float in \[0, 1\), got str"),  # (repr raised)
    (dict(d_model=16.0), TypeError, "d_model must be an int >= 1, got float 16.0"),
])
def test_attention_flags_and_options_are_checked_at_construction(kwargs, error, match):
    """Each argument as ``attention`` would take it, checked when the module is built (not at its
    first forward, or in training only), naming the module's argument."""
    args = dict(d_model=16, num_heads=2)
    args.update(kwargs)
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention, M.TransformerLayer, R.TransformerLayer):
        with pytest.raises(error, match=match):
            cls(**args)


@pytest.mark.parametrize("make,error,match", [
    (lambda m: m.LayerNormResidual(-1), ValueError, "d_model must be an int >= 1, got -1"),
    (lambda m: m.LayerNormResidual(8.5), TypeError, "d_model must be an int >= 1, got float 8.5"),
    (lambda m: m.LayerNormResidual(8, eps=-1), ValueError, "eps must be a positive finite float, got -1"),
    (lambda m: m.LayerNormResidual(8, eps="1e-5"), TypeError, "eps must be a positive float, got str"),
    (lambda m: m.LayerNormResidual(8, dropout=1.5), ValueError, r"dropout must be in \[0, 1\), got 1.5"),
    (lambda m: m.LayerNormResidual(8, bias="no"), TypeError, "bias must be a bool, got str 'no'"),
    (lambda m: m.FeedForward(8, d_ff=-1), ValueError, "d_ff must be an int >= 1, got -1"),
    (lambda m: m.FeedForward(8, d_ff=0), ValueError, "d_ff must be an int >= 1, got 0"),
    (lambda m: m.FeedForward(0), ValueError, "d_model must be an int >= 1, got 0"),
    (lambda m: m.FeedForward(8, dropout=-0.1), ValueError, r"dropout must be in \[0, 1\), got -0.1"),
    (lambda m: m.FeedForward(8, bias=1), TypeError, "bias must be a bool, got int 1"),
    (lambda m: m.TransformerLayer(8, 2, norm_first="no"), TypeError, "norm_first must be a bool, got str 'no'"),
    (lambda m: m.TransformerLayer(8, 2, d_ff=-1), ValueError, "d_ff must be an int >= 1, got -1"),
    (lambda m: m.TransformerLayer(8, 2, eps=0.0), ValueError, "eps must be a positive finite float, got 0.0"),
    (lambda m: m.Transformer(8, 2, num_layers=-1), ValueError, "num_layers must be an int >= 1, got -1"),
    (lambda m: m.Transformer(8, 2, num_layers=0), ValueError, "num_layers must be an int >= 1, got 0"),
    (lambda m: m.Transformer(8, 2, num_layers=2.0), TypeError, "num_layers must be an int >= 1, got float 2.0"),
    (lambda m: m.Transformer(8, 2, 1, dropout=1.5), ValueError, r"dropout must be in \[0, 1\), got 1.5"),
])
def test_module_constructor_arguments_are_checked(make, error, match):
    """A negative or float size failed inside torch's factories (negative dimension, ones() of a
    float); a bad eps or dropout was accepted until forward (dropout: until training); a truthy
    string flag was read as True; num_layers=-1 built an empty model that returned its input
    (torch's TransformerEncoder builds 0 layers, but its forward then fails: 0 is refused too)."""
    for m in (M, R):
        with pytest.raises(error, match=match):
            make(m)


def test_valid_constructor_arguments_keep_their_meaning():
    """The checks refuse nothing that worked: an int dropout of 0, a (-1, -1) window given as a
    list, learnable ALiBi, sinks; the stored values are the ones given (dropout and eps as floats)."""
    for m in (M, R):
        mha = m.MultiHeadAttention(16, 2, dropout=0, window_size=[-1, -1], alibi="learnable", sinks=True)
        assert mha.dropout == 0.0 and isinstance(mha.dropout, float) and mha.window_size == (-1, -1)
        assert m.LayerNormResidual(8, eps=1).eps == 1.0
        assert m.FeedForward(8, dropout=0.5).dropout == 0.5
        assert len(m.Transformer(8, 2, 1).layers) == 1
        repr(mha)


def test_numpy_ints_are_taken_as_ints():
    """numpy ints, which the functional calls take (``is_int``), were refused by the module
    constructors, KVCache and rotary_base ("d_model must be an int >= 1, got int64"): taken now, and
    kept as the Python ints they hold. A rotary_base that is not a number is a TypeError."""
    import numpy as np
    for m in (M, R):
        mha = m.MultiHeadAttention(np.int64(16), np.int64(2), num_kv_heads=np.int32(1), rotary=True,
                                   rotary_base=np.int64(500))
        assert (mha.d_model, mha.num_heads, mha.num_kv_heads, mha.head_dim, mha.rotary_base) == (16, 2, 1, 8, 500.0)
        assert all(type(n) is int for n in (mha.d_model, mha.num_heads, mha.num_kv_heads, mha.head_dim))
        norm, ffn = m.LayerNormResidual(np.int64(16)), m.FeedForward(np.int64(16), np.int64(24))
        assert type(norm.d_model) is int and (type(ffn.d_model), type(ffn.d_ff)) == (int, int)
        assert len(m.Transformer(np.int64(16), np.int64(2), np.int64(2)).layers) == 2
        cache = mha.new_kv_cache(np.int64(2), np.int64(5))
        assert cache.k.shape == (2, 5, 1, 8)
        with pytest.raises(TypeError, match="rotary_base must be a finite number > 0, got str '1e4'"):
            m.MultiHeadAttention(16, 2, rotary=True, rotary_base="1e4")
    cache = fused_attn.KVCache(np.int64(2), np.int64(5), np.int64(1), np.int64(8))
    assert cache.k.shape == (2, 5, 1, 8) and repr(cache).startswith("KVCache(batch=2, max_len=5")
    from fused_attn.integrations import flash_attn as FA
    assert FA.RotaryEmbedding(np.int64(8)).dim == 8 and type(FA.RotaryEmbedding(np.int64(8)).dim) is int
    with pytest.raises(TypeError, match="dim must be an even int >= 2 .* got float 8.0"):
        FA.RotaryEmbedding(8.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=0), "num_heads must be an int >= 1, got 0"),
    (dict(num_heads=-2), "num_heads must be an int >= 1, got -2"),
    (dict(num_kv_heads=0), "num_kv_heads must be an int >= 1, got 0"),
    (dict(d_model=-16), "d_model must be an int >= 1, got -16"),
    (dict(rotary=True, rotary_base=0.0), "rotary_base must be a finite number > 0"),
    (dict(rotary=True, rotary_base=float("nan")), "rotary_base must be a finite number > 0"),
    # (too large for a float: float() raised OverflowError)
    (dict(rotary=True, rotary_base=10**400), r"rotary_base must be a finite number > 0 .*got an int of 1329 bits"),
])
def test_constructor_arguments_are_checked(kwargs, match):
    """Head counts below 1 (ZeroDivisionError, or a module whose forward failed in unflatten) and a
    RoPE base that is not a positive finite number (a module whose every output was NaN)."""
    args = dict(d_model=16, num_heads=2)
    args.update(kwargs)
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        with pytest.raises(ValueError, match=match):
            cls(**args)


def test_packed_training_example_runs(monkeypatch, capsys):
    """examples/packed_training.py: packed equals one document at a time, and it trains."""
    import os
    import runpy
    import sys
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "packed_training.py")
    monkeypatch.setattr(sys, "argv", [path, "--steps", "2", "--docs", "3"])
    runpy.run_path(path, run_name="__main__")
    out = capsys.readouterr().out
    diff = float(out.split("max |difference| = ")[1].split()[0])
    assert diff < 1e-5, out
    assert "step   1  loss" in out and "packed step:" in out and "padded step:" in out
    assert "packed logits: err" in out


def test_packed_training_example_fails_on_a_packing_bug(monkeypatch):
    """The example's check is an assertion: attention leaking across the packed documents (the
    batch taken as one sequence) stops the script, not just prints a difference."""
    import os
    import runpy
    import sys

    import fused_attn
    path = os.path.join(os.path.dirname(__file__), "..", "examples", "packed_training.py")
    forward = fused_attn.Transformer.forward

    def one_sequence(self, x, *args, cu_seqlens=None, **kwargs):
        if cu_seqlens is not None:
            cu_seqlens = torch.tensor([0, x.shape[0]], dtype=cu_seqlens.dtype)
        return forward(self, x, *args, cu_seqlens=cu_seqlens, **kwargs)

    monkeypatch.setattr(fused_attn.Transformer, "forward", one_sequence)
    monkeypatch.setattr(sys, "argv", [path, "--steps", "1", "--docs", "3"])
    with pytest.raises(AssertionError, match="packed logits"):
        runpy.run_path(path, run_name="__main__")


def test_alibi_transformer_matches_reference_and_is_position_aware():
    """``alibi=True`` through the whole stack (padded and packed), fused against reference, and
    the bias really is there: the same weights without it give a different answer."""
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 2, d_ff=48, num_kv_heads=2, causal=True, alibi=True)
    _perturb_norms(fused, ref)
    assert fused.layers[0].multi_head_attention.alibi_slopes.tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6,
                                                                          2.0 ** -8]
    assert "alibi=True" in repr(fused)
    (x,) = make_inputs((2, 19, D_MODEL), seed=15)
    results = check_module_against_reference(fused, ref, [x])
    assert all(r.ok for r in results), "\n".join(map(str, results))
    (xp,) = make_inputs((sum(PACKED_LENS), D_MODEL), seed=16)
    cu = _cu(PACKED_LENS)
    results = check_module_against_reference(fused, ref, [xp], run=lambda m, x: m(x, cu_seqlens=cu))
    assert all(r.ok for r in results), "\n".join(map(str, results))
    with torch.no_grad():
        plain = M.Transformer(D_MODEL, HEADS, 2, d_ff=48, num_kv_heads=2, causal=True)
        plain.load_state_dict(fused.state_dict())  # the slopes are not in the state dict
        y = fused(x)
        assert (plain(x) - y).abs().max() > 1e-3


def test_sinks_transformer_matches_reference():
    """``sinks=True`` (gpt-oss's learnable per-head sink logits) through the whole stack, padded and
    packed, fused against reference, the sinks' gradients included; they matter: the same weights
    with sinks of -1e4 (no sink) answer differently."""
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 2, d_ff=48, num_kv_heads=2, causal=True, sinks=True,
                       norm_first=True)
    assert "sinks=True" in repr(fused)
    assert [n for n, _ in fused.named_parameters() if n.endswith("sinks")] == [
        "layers.0.multi_head_attention.sinks", "layers.1.multi_head_attention.sinks"]
    with torch.no_grad():
        for model in (fused, ref):
            for i, layer in enumerate(model.layers):
                layer.multi_head_attention.sinks.copy_(torch.tensor([1.0, -0.5, 2.0, 0.0]) + i)
    (x,) = make_inputs((2, 19, D_MODEL), seed=17)
    padding = torch.zeros(2, 19, dtype=torch.bool)
    padding[1, -5:] = True
    results = check_module_against_reference(fused, ref, [x], run=lambda m, x: m(x, key_padding_mask=padding))
    assert all(r.ok for r in results), "\n".join(map(str, results))
    assert any("sinks" in r.name for r in results), [r.name for r in results]
    (xp,) = make_inputs((sum(PACKED_LENS), D_MODEL), seed=18)
    cu = _cu(PACKED_LENS)
    results = check_module_against_reference(fused, ref, [xp], run=lambda m, x: m(x, cu_seqlens=cu))
    assert all(r.ok for r in results), "\n".join(map(str, results))
    with torch.no_grad():
        y = fused(x)
        for layer in fused.layers:
            layer.multi_head_attention.sinks.fill_(-1e4)
        assert (fused(x) - y).abs().max() > 1e-3


def test_rotary_transformer_matches_reference_and_encodes_positions():
    """``rotary=True`` through the whole stack, padded (with cross-attention lengths) and packed
    (each sequence from position 0), fused against the reference's textbook formula; without a
    mask or causality, plain attention is blind to token order and RoPE is not: permuting the
    tokens permutes a plain layer's output, not a rotary one's."""
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 2, d_ff=48, num_kv_heads=2, causal=True, rotary=True,
                       rotary_base=500.0)
    _perturb_norms(fused, ref)
    assert "rotary=True, rotary_base=500" in repr(fused)
    (x,) = make_inputs((2, 19, D_MODEL), seed=19)
    results = check_module_against_reference(fused, ref, [x])
    assert all(r.ok for r in results), "\n".join(map(str, results))
    (xp,) = make_inputs((sum(PACKED_LENS), D_MODEL), seed=20)
    cu = _cu(PACKED_LENS)
    for max_seqlen in (None, max(PACKED_LENS)):
        results = check_module_against_reference(fused, ref, [xp],
                                                 run=lambda m, x: m(x, cu_seqlens=cu, max_seqlen=max_seqlen))
        assert all(r.ok for r in results), "\n".join(map(str, results))
    # packed = each sequence alone, padded
    with torch.no_grad():
        packed = fused(xp, cu_seqlens=cu)
        start = PACKED_LENS[0]
        alone = fused(xp[start:start + PACKED_LENS[1]][None])[0]
        torch.testing.assert_close(packed[start:start + PACKED_LENS[1]], alone, rtol=1e-5, atol=1e-5)
    # cross-attention: queries and keys of different lengths, each at its own positions
    mha_f, mha_r = _pair("MultiHeadAttention", D_MODEL, HEADS, num_kv_heads=2, rotary=True)
    q_in, kv_in = make_inputs((2, 5, D_MODEL), (2, 11, D_MODEL), seed=21)
    results = check_module_against_reference(mha_f, mha_r, [q_in, kv_in], run=lambda m, q, kv: m(q, kv))
    assert all(r.ok for r in results), "\n".join(map(str, results))
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    plain = M.MultiHeadAttention(D_MODEL, HEADS)
    rope = M.MultiHeadAttention(D_MODEL, HEADS, rotary=True)
    rope.load_state_dict(plain.state_dict())
    with torch.no_grad():
        (z,) = make_inputs((1, 11, D_MODEL), seed=22, requires_grad=False)
        torch.testing.assert_close(plain(z)[:, perm], plain(z[:, perm]), rtol=1e-5, atol=1e-5)
        assert (rope(z)[:, perm] - rope(z[:, perm])).abs().max() > 1e-3
    with pytest.raises(ValueError, match="head dim .* must be even"):
        R.MultiHeadAttention(30, 2, rotary=True)


@pytest.mark.parametrize("module", [M, R], ids=["fused", "reference"])
@pytest.mark.parametrize("base", [None, 500.0, 1e6], ids=["default", "500", "1e6"])
def test_rotary_tables_are_the_rope_formula(module, base):
    """The modules' RoPE tables are cos and sin of l * base^(-2i / head_dim), computed here in
    float64 from the formula, for every position l (odd ones included) and frequency i < head_dim / 2,
    with the default base (10000) and others. Both modules build their tables with this one method
    (the reference's), so comparing the modules cannot catch a wrong frequency or position (a shift
    of every position does not even change attention, which sees only their differences). The
    float32 tables are within float32's rounding of each angle (power, product, cos and sin:
    measured under 1e-7 (1 + angle), a tenth of the bound); frequencies rounded to float16 are
    50-190 times the bound off, an exponent over head_dim instead of head_dim / 2 far more."""
    head_dim, length = 12, 37
    kwargs = {} if base is None else {"rotary_base": base}
    mha = module.MultiHeadAttention(head_dim * 2, 2, rotary=True, **kwargs)
    cos, sin = mha.rotary_tables(length, torch.device("cpu"))
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == sin.shape == (length, head_dim // 2)
    b = 10000.0 if base is None else base
    angles = torch.tensor([[l * b ** (-2 * i / head_dim) for i in range(head_dim // 2)] for l in range(length)],
                          dtype=torch.float64)
    tol = 1e-6 * (1 + angles)
    assert bool(((cos.double() - angles.cos()).abs() <= tol).all()), (cos.double() - angles.cos()).abs().max()
    assert bool(((sin.double() - angles.sin()).abs() <= tol).all()), (sin.double() - angles.sin()).abs().max()


DECODE_OPTIONS = {
    "rotary gqa": dict(num_kv_heads=2, rotary=True),
    "alibi window sinks pre-LN": dict(alibi=True, window_size=(3, 0), sinks=True, norm_first=True),
    "plain rmsnorm swiglu": dict(norm="rmsnorm", activation="swiglu"),
}


@pytest.mark.parametrize("options", list(DECODE_OPTIONS))
def test_kv_cache_decoding_matches_the_full_forward(options):
    """Prefill then token by token through ``kv_cache`` (the fused modules: attention_with_kvcache;
    the reference: its own cache writes and bottom-right attention) gives the full causal
    forward's rows, both modules alike, and leaves the caches holding every token."""
    kw = dict(d_ff=48, causal=True, **DECODE_OPTIONS[options])
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 2, **kw)
    _perturb_norms(fused, ref)
    if kw.get("sinks"):
        with torch.no_grad():
            for model in (fused, ref):
                for layer in model.layers:
                    layer.multi_head_attention.sinks.copy_(torch.tensor([0.5, -1.0, 1.5, 0.0]))
    fused.eval()
    ref.eval()
    (x,) = make_inputs((2, 11, D_MODEL), seed=23, requires_grad=False)
    with torch.no_grad():
        full = ref(x)
        for model in (fused, ref):
            caches = model.new_kv_cache(2, 16)
            steps = [model(x[:, :5], kv_cache=caches)] + [model(x[:, t:t + 1], kv_cache=caches) for t in range(5, 9)]
            steps.append(model(x[:, 9:], kv_cache=caches))  # a two-token chunk
            torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
            assert caches[0].seqlens.tolist() == [11, 11]
            layer = model.layers[0].multi_head_attention
            k_rows = layer.key_linear(model.layers[0].norm1(x) if kw.get("norm_first") else x)
            if not kw.get("rotary"):  # the cache holds the layer's keys (turned ones with rotary)
                torch.testing.assert_close(caches[0].k[:, :11].flatten(-2), k_rows, rtol=1e-5, atol=1e-5)
            caches[0].reset()
            assert caches[0].seqlens.tolist() == [0, 0]


class _TrigSizes(torch.overrides.TorchFunctionMode):
    """The element counts of the cos and sin computed under it (the RoPE tables)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.cos, torch.sin, torch.Tensor.cos, torch.Tensor.sin):
            self.sizes.append(out.numel())
        return out


@pytest.mark.parametrize("lib", ["fused", "reference"])
def test_kv_cache_rope_tables_cover_the_step_not_the_cache(lib):
    """A decoding step with rotary=True built the cos and sin of every row of the cache (its
    capacity, max_len) to turn its few new tokens, so the time per token grew with max_len. It
    builds the step's rows alone now (B x L of them, whatever the capacity), and a step near the
    end of a large cache, each batch row at its own position, still gives each sequence's full
    forward rows."""
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 1, d_ff=48, num_kv_heads=2, causal=True, rotary=True,
                       rotary_base=500.0)
    _perturb_norms(fused, ref)
    model = (fused if lib == "fused" else ref).eval()
    max_len, lens, new = 2001, (1500, 1998), 3
    (x,) = make_inputs((2, max_len, D_MODEL), seed=29, requires_grad=False)
    caches = model.new_kv_cache(2, max_len)
    with torch.no_grad():
        for b, n in enumerate(lens):  # each prompt alone, then into its row of the batch's caches
            alone = model.new_kv_cache(1, max_len)
            model(x[b:b + 1, :n], kv_cache=alone)
            for cache, one in zip(caches, alone):
                cache.k[b], cache.v[b] = one.k[0], one.v[0]
                cache.seqlens[b] = n
        step = torch.stack([x[b, n:n + new] for b, n in enumerate(lens)])
        with _TrigSizes() as trig:
            out = model(step, kv_cache=caches)
        half = D_MODEL // HEADS // 2
        assert trig.sizes and max(trig.sizes) <= 2 * new * half, trig.sizes  # (B x L rows; was max_len rows)
        assert [c.seqlens.tolist() for c in caches] == [[n + new for n in lens]]
        # the step's tables are the whole cache's tables' rows at those positions, to the bit
        layer = model.layers[0].multi_head_attention
        positions = torch.tensor(lens)[:, None] + torch.arange(new)
        for part, whole in zip(layer.rotary_tables_at(positions), layer.rotary_tables(max_len, "cpu")):
            assert torch.equal(part, whole[positions])
        for b, n in enumerate(lens):
            full = ref(x[b:b + 1, :n + new])[0, n:]
            torch.testing.assert_close(out[b], full, rtol=1e-5, atol=1e-5)


def test_kv_cache_bad_calls_say_why():
    fused = M.MultiHeadAttention(D_MODEL, HEADS, causal=True)
    fused.eval()
    x = torch.randn(2, 3, D_MODEL)
    cache = fused.new_kv_cache(2, 4)
    assert "KVCache(batch=2, max_len=4, num_kv_heads=4, head_dim=8" in repr(cache)
    with torch.no_grad():
        for kwargs, error, match in (
                (dict(kv_cache="cache"), TypeError, "kv_cache must be a KVCache"),
                (dict(kv_cache=cache, attn_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, "takes no attn_mask"),
                (dict(kv_cache=cache, is_causal=False), ValueError, "needs causal attention"),
                (dict(kv_cache=M.MultiHeadAttention(D_MODEL, 2).new_kv_cache(2, 4)), ValueError,
                 r"holds \(batch, kv heads, head dim\) = \(2, 2, 16\)")):
            with pytest.raises(error, match=match):
                fused(x, **kwargs)
        with pytest.raises(ValueError, match="leave key and value out"):
            fused(x, x.clone(), kv_cache=cache)
        fused(x, kv_cache=cache)
        with pytest.raises(ValueError, match=r"kv_cache holds 4 tokens a sequence; 3 \+ 3 do not fit"):
            fused(x, kv_cache=cache)
        assert cache.seqlens.tolist() == [3, 3]  # the refused call wrote and advanced nothing
    with pytest.raises(ValueError, match="kv_cache decoding is inference"):
        fused(x, kv_cache=cache)
    with pytest.raises(ValueError, match="kv_cache must be a list of 2 KVCaches"):
        M.Transformer(D_MODEL, HEADS, 2, causal=True)(x, kv_cache=cache)


@pytest.mark.parametrize("rotary", [False, True])
def test_kv_cache_overflow_is_named_as_the_modules_argument(rotary):
    """A step that would overflow the cache: the fused module said ``cache_seqlens[0] = 10 plus the
    3 new keys of k ... (k_cache.shape[1])``, arguments of attention_with_kvcache the caller never
    passed; now the reference module's message (the functional one kept as the cause), and the
    cache unchanged."""
    messages = []
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        mha = cls(D_MODEL, HEADS, causal=True, rotary=rotary).eval()
        cache = mha.new_kv_cache(2, 12)
        with torch.no_grad():
            mha(torch.randn(2, 10, D_MODEL), kv_cache=cache)
            with pytest.raises(ValueError, match=r"^kv_cache holds 12 tokens a sequence; 10 \+ 3 do not fit") as info:
                mha(torch.randn(2, 3, D_MODEL), kv_cache=cache)
        assert cache.seqlens.tolist() == [10, 10]
        messages.append(str(info.value))
        if cls is M.MultiHeadAttention:
            assert "cache_seqlens[0] = 10" in str(info.value.__cause__)
    assert messages[0] == messages[1]


@pytest.mark.parametrize("second", ["shorter", "other dtype", "not a cache"])
def test_transformer_refuses_mismatched_layer_caches_before_writing(second):
    """Per-layer caches that disagree are refused before the first layer writes into its own (a
    later layer's refusal would otherwise leave layer 0's cache a step ahead)."""
    model = M.Transformer(D_MODEL, HEADS, 2, causal=True).eval()
    caches = model.new_kv_cache(2, 8)
    caches[1] = {"shorter": model.new_kv_cache(2, 2)[1], "other dtype": model.new_kv_cache(2, 8, dtype=torch.float64)[1],
                 "not a cache": (caches[1].k, caches[1].v)}[second]
    error, match = (TypeError, r"kv_cache\[1\] must be a KVCache") if second == "not a cache" else (
        ValueError, r"kv_cache\[1\]\.k is .* but kv_cache\[0\]\.k is")
    with torch.no_grad(), pytest.raises(error, match=match):
        model(torch.randn(2, 3, D_MODEL), kv_cache=caches)
    assert caches[0].seqlens.tolist() == [0, 0] and not caches[0].k.any()


def _decoder(module, cls_name, *args, **kwargs):
    """A fused module on the cpu backend, or the reference one."""
    return getattr(M, cls_name)(*args, backend="cpu", **kwargs) if module == "fused" else getattr(R, cls_name)(
        *args, **kwargs)


def _cache_state(caches):
    return [(c.seqlens.clone(), c.leftpad.clone(), c.padded, c.k.clone(), c.v.clone()) for c in caches]


def _same_cache_state(a, b):
    return all(sa == sb if isinstance(sa, bool) else torch.equal(sa, sb) for x, y in zip(a, b) for sa, sb in zip(x, y))


@pytest.mark.parametrize("case", ["layer 1 ahead", "layer 1 would overflow", "other leftpad", "other padded",
                                  "one cache twice", "layer 0 frozen, grad mode"])
@pytest.mark.parametrize("module", ["fused", "reference"])
def test_transformer_refuses_a_step_whole_when_the_layer_caches_disagree(module, case):
    """Per-layer caches of one shape but at other fill levels (seqlens, leftpad, padded) were
    accepted, each layer decoding at its own positions, and a step that fit layer 0 but not a
    fuller layer 1 (or one cache passed for two layers, or a frozen layer 0 under grad mode) was
    refused by layer 1 after layer 0 had written and advanced. Now the step is refused before any
    layer writes: every cache as it was."""
    model = _decoder(module, "Transformer", D_MODEL, HEADS, 2, d_ff=48, causal=True).eval()
    x = torch.randn(2, 3, D_MODEL)
    caches = model.new_kv_cache(2, 4)
    step, match, grad = x[:, :1], r"kv_cache\[1\]\.seqlens is \[2, 2\] but kv_cache\[0\]\.seqlens is \[1, 1\]", False
    with torch.no_grad():
        model(x[:, :1], kv_cache=caches, key_padding_mask=torch.tensor([[True], [False]])
              if case == "other leftpad" else None)
    if case in ("layer 1 ahead", "layer 1 would overflow"):
        caches[1].seqlens.fill_(2)
        step = x if case == "layer 1 would overflow" else step
    elif case == "other leftpad":
        caches[1].leftpad.zero_()
        match = r"kv_cache\[1\]\.leftpad is \[0, 0\] but kv_cache\[0\]\.leftpad is \[1, 0\]"
    elif case == "other padded":
        caches[1].padded = True
        match = r"kv_cache\[1\]\.padded is True but kv_cache\[0\]\.padded is False"
    elif case == "one cache twice":
        caches[1] = caches[0]
        step, match = x, r"kv_cache\[1\] is kv_cache\[0\]: every layer needs a cache of its own"
    else:
        model.layers[0].requires_grad_(False)
        step, match, grad = x, "kv_cache decoding is inference", True
    before = _cache_state(caches)
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=match):
        model(step, kv_cache=caches)
    assert _same_cache_state(_cache_state(caches), before)


@pytest.mark.parametrize("module", ["fused", "reference"])
def test_is_causal_is_checked_on_the_decoding_and_packed_paths(module):
    """is_causal must be None or a bool on every path: with kv_cache it went through bool() ("False",
    1 and [0] decoded, a non-causal module's too, the cache advancing), and the reference module's
    packed path ran is_causal="no" causal. Now TypeError, before anything is written."""
    x = torch.randn(2, 3, D_MODEL)
    for causal in (True, False):
        mha = _decoder(module, "MultiHeadAttention", D_MODEL, HEADS, causal=causal).eval()
        cache = mha.new_kv_cache(2, 8)
        for bad in ("False", 1, [0]):
            with torch.no_grad(), pytest.raises(TypeError, match=r"is_causal must be None or a bool, got"):
                mha(x, kv_cache=cache, is_causal=bad)
        assert cache.seqlens.tolist() == [0, 0] and not cache.k.any()
        with pytest.raises(TypeError, match=r"is_causal must be None or a bool, got 'no'"):
            mha(x.flatten(0, 1), cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32), is_causal="no")
    model = _decoder(module, "Transformer", D_MODEL, HEADS, 2, causal=True).eval()
    caches = model.new_kv_cache(2, 8)
    with torch.no_grad(), pytest.raises(TypeError, match=r"is_causal must be None or a bool, got 'False'"):
        model(x, kv_cache=caches, is_causal="False")
    assert all(c.seqlens.tolist() == [0, 0] and not c.k.any() for c in caches)


def test_kv_cache_decoding_compiles_fullgraph():
    """A decoding step of the fused Transformer in one graph (the cache written in place, its counts
    advanced inside the graph): the compiled steps give the full forward's rows."""
    torch.manual_seed(0)
    model = M.Transformer(D_MODEL, HEADS, 2, d_ff=48, num_kv_heads=2, causal=True, rotary=True).eval()
    (x,) = make_inputs((2, 9, D_MODEL), seed=24, requires_grad=False)
    with torch.no_grad():
        full = model(x)
        caches = model.new_kv_cache(2, 16)
        step = torch.compile(lambda t: model(t, kv_cache=caches), fullgraph=True, backend="aot_eager")
        outs = [step(x[:, :4])] + [step(x[:, t:t + 1]) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert caches[1].seqlens.tolist() == [9, 9]


def test_kv_cache_layers_out_of_step_refused_by_a_compiled_step():
    """Under torch.compile the layers' counts are compared by a device assert (no graph break: the
    step still compiles fullgraph), which fails the compiled step before any layer's write."""
    model = M.Transformer(D_MODEL, HEADS, 2, d_ff=48, causal=True, backend="cpu").eval()
    caches = model.new_kv_cache(2, 8)
    step = torch.compile(lambda t: model(t, kv_cache=caches), fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        step(torch.randn(2, 1, D_MODEL))
        caches[1].seqlens.fill_(3)
        before = _cache_state(caches)
        with pytest.raises(RuntimeError, match="every layer's cache must hold the same tokens"):
            step(torch.randn(2, 1, D_MODEL))
    assert _same_cache_state(_cache_state(caches), before)


@pytest.mark.parametrize("options", list(DECODE_OPTIONS))
def test_kv_cache_left_padded_prompts_decode_as_each_alone(options):
    """Prompts of 7, 3 and 1 tokens prefilled as one left-padded batch (key_padding_mask), then
    four tokens decoded for all three at once: every real token's output is the one its sequence
    gives decoded alone, unpadded (RoPE positions count the padding, and RoPE sees only position
    differences, hence the tolerance); the fused and the reference modules alike."""
    kw = dict(d_ff=48, causal=True, **DECODE_OPTIONS[options])
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 2, **kw)
    _perturb_norms(fused, ref)
    fused.eval()
    ref.eval()
    lengths, steps = [7, 3, 1], 4
    seqs = [make_inputs((1, n + steps, D_MODEL), seed=30 + i, requires_grad=False)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    prompts = torch.stack([torch.cat([torch.full((width - n, D_MODEL), 9.0), s[0, :n]]) for n, s in zip(lengths, seqs)])
    pad = torch.arange(width)[None] < torch.tensor([width - n for n in lengths])[:, None]
    with torch.no_grad():
        for model in (fused, ref):
            alone = []
            for n, s in zip(lengths, seqs):
                cache = model.new_kv_cache(1, 16)
                alone.append([model(s[:, :n], kv_cache=cache)] + [model(s[:, t:t + 1], kv_cache=cache)
                                                                   for t in range(n, n + steps)])
            caches = model.new_kv_cache(3, 16)
            first = model(prompts, kv_cache=caches, key_padding_mask=pad)
            assert caches[0].leftpad.tolist() == [0, 4, 6] and caches[1].padded
            later = [model(torch.cat([s[:, n + i:n + i + 1] for n, s in zip(lengths, seqs)]), kv_cache=caches)
                     for i in range(steps)]
            for b, n in enumerate(lengths):
                torch.testing.assert_close(first[b, width - n:], alone[b][0][0], rtol=1e-4, atol=1e-4)
                for i in range(steps):
                    torch.testing.assert_close(later[i][b], alone[b][1 + i][0], rtol=1e-4, atol=1e-4)
            assert first[~pad].isfinite().all()
            caches[0].reset()
            assert caches[0].leftpad.tolist() == [0, 0, 0] and not caches[0].padded


def test_kv_cache_padding_bad_calls_say_why():
    fused = M.MultiHeadAttention(D_MODEL, HEADS, causal=True).eval()
    x = torch.randn(2, 3, D_MODEL)
    with torch.no_grad():
        for pad, match in ((torch.tensor([[False, True, False], [False] * 3]), "must pad on the left"),
                           (torch.zeros(2, 3), "must be a bool"), (torch.zeros(2, 4, dtype=torch.bool), "must be a bool")):
            cache = fused.new_kv_cache(2, 8)
            with pytest.raises(ValueError, match=match):
                fused(x, kv_cache=cache, key_padding_mask=pad)
        cache = fused.new_kv_cache(2, 8)
        fused(x, kv_cache=cache)
        with pytest.raises(ValueError, match="for the prefill of an empty cache"):
            fused(x, kv_cache=cache, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
        small = fused.new_kv_cache(2, 2)  # refused for its size: the cache stays empty, padding forgotten
        with pytest.raises(ValueError, match=r"kv_cache holds 2 tokens a sequence; 0 \+ 3 do not fit"):
            fused(x, kv_cache=small, key_padding_mask=torch.tensor([[True, False, False]] * 2))
        assert small.seqlens.tolist() == [0, 0] and small.leftpad.tolist() == [0, 0] and not small.padded


def test_kv_cache_left_padded_prefill_compiles_fullgraph():
    """The padded prefill traces too (the mask checked by a device assert, the padding recorded in
    the graph) and gives the eager answer; the steps after it reuse one compiled step."""
    torch.manual_seed(0)
    model = M.Transformer(D_MODEL, HEADS, 2, d_ff=48, causal=True, rotary=True).eval()
    (x,) = make_inputs((2, 6, D_MODEL), seed=25, requires_grad=False)
    pad = torch.tensor([[True, True, False, False, False, False], [False] * 6])
    with torch.no_grad():
        eager_caches, caches = model.new_kv_cache(2, 12), model.new_kv_cache(2, 12)
        eager = [model(x, kv_cache=eager_caches, key_padding_mask=pad)] + [
            model(x[:, t:t + 1], kv_cache=eager_caches) for t in range(3)]
        prefill = torch.compile(lambda t, p: model(t, kv_cache=caches, key_padding_mask=p), fullgraph=True,
                                backend="aot_eager")
        step = torch.compile(lambda t: model(t, kv_cache=caches), fullgraph=True, backend="aot_eager")
        outs = [prefill(x, pad)] + [step(x[:, t:t + 1]) for t in range(3)]
    for a, b in zip(outs, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert caches[0].leftpad.tolist() == [2, 0] and caches[0].padded


def test_kv_cache_decoding_of_an_empty_batch():
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        mha = cls(D_MODEL, HEADS, causal=True).eval()
        with torch.no_grad():
            out = mha(torch.randn(0, 2, D_MODEL), kv_cache=mha.new_kv_cache(0, 8))
        assert out.shape == (0, 2, D_MODEL)


def test_learnable_alibi_slopes_train_as_the_reference():
    """alibi="learnable": the slopes are a parameter (in the state dict, initialised to the paper's),
    and the fused Transformer's output and every parameter's gradient, the slopes' included, meet
    the oracle against the reference; decoding with a cache still equals the full forward."""
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 2, d_ff=48, causal=True, alibi="learnable")
    layer = fused.layers[0].multi_head_attention
    assert isinstance(layer.alibi_slopes, torch.nn.Parameter) and "layers.0.multi_head_attention.alibi_slopes" in \
        fused.state_dict()
    torch.testing.assert_close(layer.alibi_slopes.detach(), fused_attn.get_alibi_slopes(HEADS))
    assert "alibi=learnable" in repr(layer)
    (x,) = make_inputs((2, 11, D_MODEL), seed=26)
    results = check_module_against_reference(fused, ref, [x])
    assert all(r.ok for r in results), "\n".join(map(str, results))
    fused.eval()
    with torch.no_grad():
        full = fused(x)
        caches = fused.new_kv_cache(2, 16)
        steps = [fused(x[:, :6], kv_cache=caches)] + [fused(x[:, t:t + 1], kv_cache=caches) for t in range(6, 11)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="alibi must be False, True or 'learnable'"):
        M.MultiHeadAttention(D_MODEL, HEADS, alibi="yes")


LEARNED_PACKED_LENS = [5, 0, 13, 1, 7]  # (an empty sequence and a single token too)


def _float32_grads_agree(fused, ref, run, seed=0):
    """The fused and reference modules' outputs and every parameter's gradient, float32 against
    float32 (the same weights), to a tight tolerance."""
    outs = []
    for model in (fused, ref):
        model.zero_grad(set_to_none=True)
        out = run(model)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        (out * g).sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    ref_params = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None and ref_params[name].grad is not None, name
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kwargs", [dict(norm_first=False), dict(norm_first=True, num_kv_heads=2, sinks=True,
                                                                  rotary=True, window_size=(4, 0))],
                         ids=["post_ln", "pre_ln_gqa_sinks_rotary_window"])
def test_packed_learnable_alibi_trains_as_the_reference(kwargs):
    """alibi="learnable" on packed input (cu_seqlens) with grad mode on: the fused modules raised
    ("alibi_slopes requires grad ... pass alibi_slopes.detach()", which a module user cannot do)
    where the reference trains the slopes. Now each sequence goes through ``attention``, whose
    learnable slopes get their gradient: output and every parameter's gradient (the slopes'
    included) meet the float64 oracle and the float32 reference, in train and in eval mode."""
    fused, ref = _pair("Transformer", D_MODEL, HEADS, 2, d_ff=48, causal=True, alibi="learnable", **kwargs)
    _perturb_norms(fused, ref)
    (x,) = make_inputs((sum(LEARNED_PACKED_LENS), D_MODEL), seed=28)
    cu = _cu(LEARNED_PACKED_LENS)
    results = check_module_against_reference(fused, ref, [x], run=lambda m, x: m(x, cu_seqlens=cu))
    assert all(r.ok for r in results), "\n".join(map(str, results))
    x = x.detach()
    for train in (True, False):  # (eval with grad mode on: the slopes still require grad)
        fused.train(train), ref.train(train)
        _float32_grads_agree(fused, ref, lambda m: m(x, cu_seqlens=cu, max_seqlen=13))
        assert fused.layers[0].multi_head_attention.alibi_slopes.grad.abs().sum() > 0


def test_packed_learnable_alibi_without_grad_mode_runs_varlen(monkeypatch):
    """Slopes that get no gradient (torch.no_grad(), inference_mode, or frozen) keep the fast
    packed path (one ``attention_varlen`` call), with the reference's answer; the per-sequence
    path (grad mode on) gives the same numbers."""
    torch.manual_seed(0)
    fused = M.Transformer(D_MODEL, HEADS, 1, causal=True, alibi="learnable")
    ref = R.Transformer(D_MODEL, HEADS, 1, causal=True, alibi="learnable")
    ref.load_state_dict(fused.state_dict())
    with torch.no_grad():
        fused.layers[0].multi_head_attention.alibi_slopes.mul_(1.5)
        ref.layers[0].multi_head_attention.alibi_slopes.mul_(1.5)
    (x,) = make_inputs((sum(LEARNED_PACKED_LENS), D_MODEL), seed=29, requires_grad=False)
    cu = _cu(LEARNED_PACKED_LENS)
    with torch.no_grad():
        expected = ref(x, cu_seqlens=cu)
    learned = fused(x, cu_seqlens=cu)  # grad mode: per sequence
    torch.testing.assert_close(learned, expected, rtol=1e-5, atol=1e-5)
    calls = []
    varlen = M.attention_varlen
    monkeypatch.setattr(M, "attention_varlen", lambda *a, **k: calls.append(1) or varlen(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(fused(x, cu_seqlens=cu), expected, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x, cu_seqlens=cu), expected, rtol=1e-5, atol=1e-5)
    fused.layers[0].multi_head_attention.alibi_slopes.requires_grad_(False)
    frozen = fused(x, cu_seqlens=cu)
    torch.testing.assert_close(frozen, expected, rtol=1e-5, atol=1e-5)
    assert frozen.requires_grad and len(calls) == 3


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_packed_learnable_alibi_per_sequence_dropout_is_varlens(backend):
    """What the per-sequence path relies on: ``attention`` on sequence s alone with the pair
    (seed, offset + Hq * cu_seqlens[s]) drops exactly the elements ``attention_varlen`` drops there
    with (seed, offset): bit for bit with the same (fixed) slopes. The module draws one pair as
    attention_varlen does and hands each sequence its shifted pair."""
    from fused_attn import functional as F

    cu, Hq = _cu(LEARNED_PACKED_LENS), HEADS
    q, k, v = make_inputs((sum(LEARNED_PACKED_LENS), Hq, 8), (sum(LEARNED_PACKED_LENS), 2, 8),
                          (sum(LEARNED_PACKED_LENS), 2, 8), seed=30, requires_grad=False)
    slopes = fused_attn.get_alibi_slopes(Hq)
    options = dict(causal=True, dropout_p=0.4, alibi_slopes=slopes, backend=backend)
    torch.manual_seed(3)
    expected = F.attention_varlen(q, k, v, cu, cu, **options)
    torch.manual_seed(3)
    rng = F._draw_rng(0.4, None, q)
    bounds = cu.tolist()
    outs = [F.attention(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), _rng=rng + torch.tensor([0, Hq * a]),
                        **options)[0].transpose(0, 1) for a, b in zip(bounds, bounds[1:]) if a < b]
    assert torch.equal(torch.cat(outs), expected)


def test_packed_learnable_alibi_checks_the_boundaries_as_varlen():
    """The per-sequence path refuses what the ``attention_varlen`` path refuses, with the same
    errors, named as the module's arguments."""
    mha = M.MultiHeadAttention(D_MODEL, HEADS, alibi="learnable")
    x = torch.randn(10, D_MODEL)
    for cu, max_seqlen, error, match in (
            (torch.tensor([1, 4, 10], dtype=torch.int32), None, ValueError, "cu_seqlens must start at 0"),
            (torch.tensor([0, 4, 9], dtype=torch.int32), None, ValueError, "end at the total length 10"),
            (torch.tensor([0, 4, 10]), 3, ValueError, r"max_seqlen = 3 is shorter"),
            (torch.tensor([0.0, 4.0, 10.0]), None, TypeError, "cu_seqlens must be int32 or int64")):
        with pytest.raises(error, match=match):
            mha(x, cu_seqlens=cu, max_seqlen=max_seqlen)
        with torch.no_grad(), pytest.raises(error, match=match):
            mha(x, cu_seqlens=cu, max_seqlen=max_seqlen)


def test_packed_learnable_alibi_reads_the_boundaries_once(monkeypatch):
    """The per-sequence path read cu_seqlens to the host three times per forward (the bounds check
    read it as cu_seqlens_q and as cu_seqlens_k, then the loop read it again): three device-to-host
    syncs per layer per step on a GPU. Now it is read once, and the same list is checked and used."""
    mha = M.MultiHeadAttention(D_MODEL, HEADS, alibi="learnable")
    cu = _cu(LEARNED_PACKED_LENS)
    x = torch.randn(sum(LEARNED_PACKED_LENS), D_MODEL)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t is cu) or tolist(t))
    mha(x, cu_seqlens=cu)
    assert reads.count(True) == 1


def test_packed_learnable_alibi_on_an_empty_batch():
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        mha = cls(D_MODEL, HEADS, alibi="learnable")
        out = mha(torch.randn(0, D_MODEL), cu_seqlens=torch.zeros(1, dtype=torch.int32))
        assert out.shape == (0, D_MODEL)


@pytest.mark.parametrize("args,error,match", [
    ((-1, 4, 2, 8), ValueError, "batch must be an int >= 0, got -1"),
    ((2.0, 4, 2, 8), TypeError, "batch must be an int >= 0, got float 2.0"),
    ((2, -4, 2, 8), ValueError, "max_len must be an int >= 1, got -4"),
    ((2, 0, 2, 8), ValueError, "max_len must be an int >= 1, got 0"),
    ((2, True, 2, 8), TypeError, "max_len must be an int >= 1, got bool True"),
    ((2, 4, 0, 8), ValueError, "num_kv_heads must be an int >= 1, got 0"),
    ((2, 4, 2, -8), ValueError, "head_dim must be an int >= 1, got -8"),
    ((2, 4, 2, "8"), TypeError, "head_dim must be an int >= 1, got str '8'"),
])
def test_kv_cache_sizes_are_checked(args, error, match):
    """``fused_attn.KVCache`` (exported) and ``new_kv_cache`` name a bad size (a negative one
    failed inside torch.zeros, "Trying to create tensor with negative dimension"); an empty
    batch stays valid."""
    with pytest.raises(error, match=match):
        fused_attn.KVCache(*args)
    if match.startswith(("batch", "max_len")):  # the arguments new_kv_cache passes on
        for m in (M, R):
            with pytest.raises(error, match=match):
                m.Transformer(16, 2, 1).new_kv_cache(*args[:2])
    assert repr(fused_attn.KVCache(0, 4, 2, 8)).startswith("KVCache(batch=0, max_len=4")


def test_kv_cache_decoding_under_autocast():
    """Under torch.autocast the cache keeps its dtype (float32 here): the new keys, values and
    queries are cast to it, not the cache to bfloat16 each step, and decoding gives the full
    forward's rows to bfloat16 accuracy."""
    torch.manual_seed(0)
    model = M.Transformer(D_MODEL, HEADS, 2, d_ff=48, num_kv_heads=2, causal=True, rotary=True).eval()
    (x,) = make_inputs((2, 9, D_MODEL), seed=27, requires_grad=False)
    with torch.no_grad():
        full = model(x)
        caches = model.new_kv_cache(2, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            steps = [model(x[:, :5], kv_cache=caches)] + [model(x[:, t:t + 1], kv_cache=caches) for t in range(5, 9)]
    out = torch.cat(steps, 1)
    assert out.dtype == torch.bfloat16 and caches[0].k.dtype == torch.float32
    torch.testing.assert_close(out.float(), full, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("cls", ["reference", "fused"])
def test_edited_fixed_alibi_slopes_survive_moves(cls):
    """Fixed slopes set by the user are a buffer like any other: every move (``.float()``, even a
    no-op, ``.to("cpu")``, ``.double()``, ``.half()``, a deepcopy, a parent's move) converts the
    values it holds. ``_apply`` recomputed the paper's slopes at each move: a silent reset that
    changed the output by 0.22 here. (Off meta they are recomputed: see the deferred-init tests.)"""
    import copy

    make = M.MultiHeadAttention if cls == "fused" else R.MultiHeadAttention
    edited = torch.tensor([1.0, 0.5, 0.25, 0.0])
    m = make(D_MODEL, HEADS, alibi=True, causal=True)
    with torch.no_grad():
        m.alibi_slopes.copy_(edited)
    x = torch.randn(1, 6, D_MODEL)
    with torch.no_grad():
        before = m(x)
        for move in (lambda m: m.float(), lambda m: m.to("cpu"), lambda m: m.cpu(), copy.deepcopy):
            m = move(m)
            assert m.alibi_slopes.dtype == torch.float32 and torch.equal(m.alibi_slopes, edited)
            assert torch.equal(m(x), before)
        assert torch.equal(m.double().alibi_slopes, edited.double())
        assert torch.equal(m.half().alibi_slopes, edited.half())
    layer = (M if cls == "fused" else R).TransformerLayer(D_MODEL, HEADS, alibi=True)
    with torch.no_grad():
        layer.multi_head_attention.alibi_slopes.copy_(edited)
    assert torch.equal(layer.to(torch.float64).multi_head_attention.alibi_slopes, edited.double())
    layer.to("meta").to_empty(device="cpu")  # (the values gone on meta: back off it, the paper's slopes)
    assert torch.equal(layer.multi_head_attention.alibi_slopes, fused_attn.get_alibi_slopes(HEADS).double())


@pytest.mark.parametrize("cls", ["reference", "fused"])
def test_meta_device_construction_then_to_empty_and_load(cls):
    """Built on the meta device (no memory), moved with to_empty and loaded: the same module as
    one built directly; the fixed ALiBi slopes, in no state dict, are recomputed by the move."""
    make = fused_attn.Transformer if cls == "fused" else fused_attn.reference.Transformer
    torch.manual_seed(0)
    direct = make(32, 4, 2, d_ff=48, causal=True, alibi=True)
    with torch.device("meta"):
        lazy = make(32, 4, 2, d_ff=48, causal=True, alibi=True)
    lazy.to_empty(device="cpu")
    lazy.load_state_dict(direct.state_dict())
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(lazy(x), direct(x))
    slopes = lazy.layers[0].multi_head_attention.alibi_slopes
    assert torch.equal(slopes, fused_attn.get_alibi_slopes(4))
    lazy.to(torch.bfloat16)  # rounded like any buffer in a dtype move
    assert torch.equal(lazy.layers[0].multi_head_attention.alibi_slopes,
                       fused_attn.get_alibi_slopes(4).to(torch.bfloat16))


@pytest.mark.parametrize("cls", ["reference", "fused"])
def test_meta_device_construction_then_load_with_assign(cls):
    """Built on meta and loaded with load_state_dict(assign=True) (the weights become the state
    dict's tensors, no copy): the fixed ALiBi slopes, in no state dict, were left on meta, so the
    forward failed naming alibi_slopes and .to(device) could not copy out of meta. The load now
    places them with the weights, in the buffer's dtype."""
    make = fused_attn.Transformer if cls == "fused" else fused_attn.reference.Transformer
    torch.manual_seed(0)
    direct = make(16, 4, 2, alibi=True)
    with torch.device("meta"):
        lazy = make(16, 4, 2, alibi=True)
    lazy.load_state_dict(direct.state_dict(), assign=True)
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(lazy(x), direct(x))
    for layer in lazy.layers:
        slopes = layer.multi_head_attention.alibi_slopes
        assert slopes.device.type == "cpu" and torch.equal(slopes, fused_attn.get_alibi_slopes(4))
    lazy.to("cpu")  # (raised: Cannot copy out of meta tensor)
    # a buffer moved to bfloat16 while on meta comes back in bfloat16, as a built module's would
    with torch.device("meta"):
        lazy = make(16, 4, 1, alibi=True).to(torch.bfloat16)
    lazy.load_state_dict(make(16, 4, 1, alibi=True).to(torch.bfloat16).state_dict(), assign=True)
    assert torch.equal(lazy.layers[0].multi_head_attention.alibi_slopes,
                       fused_attn.get_alibi_slopes(4).to(torch.bfloat16))
    # weights put in place without load_state_dict: the forward places the slopes
    with torch.device("meta"):
        lazy = make(16, 4, 1, alibi=True)
    for module in lazy.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(torch.zeros(p.shape)))
    assert lazy(x).shape == x.shape
    assert torch.equal(lazy.layers[0].multi_head_attention.alibi_slopes, fused_attn.get_alibi_slopes(4))


@pytest.mark.parametrize("cls", ["reference", "fused"])
@pytest.mark.parametrize("kwargs", [dict(sinks=True, alibi="learnable"), dict(alibi=True, norm="rmsnorm"),
                                    dict(bias=False, activation="swiglu", num_kv_heads=2)])
def test_meta_device_to_empty_then_reset_parameters_is_a_fresh_construction(cls, kwargs):
    """The deferred-init recipe (build on meta, to_empty, reset_parameters on every module that
    has one, as FSDP does): every module holding parameters of its own has reset_parameters (the
    norms, sinks and learnable slopes were left as uninitialised memory), each resets only its
    own (the linears are modules of their own), so under the same seed the model is exactly a
    freshly built one, random projections included."""
    make = fused_attn.Transformer if cls == "fused" else fused_attn.reference.Transformer
    torch.manual_seed(3)
    direct = make(16, 4, 2, **kwargs)
    with torch.device("meta"):
        lazy = make(16, 4, 2, **kwargs)
    lazy = lazy.to_empty(device="cpu")
    for module in lazy.modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert hasattr(module, "reset_parameters"), type(module).__name__
    with torch.no_grad():  # garbage in every tensor first: reset_parameters must write them all
        for t in list(lazy.parameters()) + list(lazy.buffers()):
            t.fill_(float("nan"))
    torch.manual_seed(3)
    for module in lazy.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    expected = dict(direct.named_parameters()) | dict(direct.named_buffers())
    got = dict(lazy.named_parameters()) | dict(lazy.named_buffers())
    assert got.keys() == expected.keys()
    for name, t in expected.items():
        assert torch.equal(got[name], t), name
    # and reset_parameters on a trained module restores the constructor's deterministic values
    for name in ("multi_head_attention", "norm1"):
        module, fresh = getattr(lazy.layers[0], name), getattr(direct.layers[0], name)
        with torch.no_grad():
            for p in module.parameters(recurse=False):
                p.add_(1.0)
        module.reset_parameters()
        for pname, p in module.named_parameters(recurse=False):
            assert torch.equal(p, getattr(fresh, pname)), (name, pname)


@pytest.mark.parametrize("cls", ["reference", "fused"])
def test_alibi_module_compiles_fullgraph(cls):
    """The forward's check for slopes still on meta is a property of the buffer, fixed when
    torch.compile traces: no graph break in the usual case."""
    make = M.MultiHeadAttention if cls == "fused" else R.MultiHeadAttention
    mha = make(16, 4, alibi=True).eval()
    x = torch.randn(2, 5, 16)
    torch._dynamo.reset()
    try:
        torch.testing.assert_close(torch.compile(mha, fullgraph=True, backend="eager")(x), mha(x))
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("module", [M, R], ids=["fused", "reference"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_pre_ln_layer_attends_to_the_undropped_normalised_stream(module, norm):
    """pre-LN: y = x + dropout(mha(norm1(x))). norm1 normalises the stream itself, so in training
    the attention's input is norm1(x) with no dropout on x (norm1 used to apply the layer's dropout
    to x, as a LayerNormResidual without residual does: norm(dropout(x)), unlike torch's layer)."""
    torch.manual_seed(0)
    layer = module.TransformerLayer(D_MODEL, HEADS, norm_first=True, norm=norm, dropout=0.5).train()
    with torch.no_grad():
        layer.norm1.weight.uniform_(0.5, 1.5)
    seen = []
    layer.multi_head_attention.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    x = torch.randn(2, 5, D_MODEL)
    layer(x)
    n1 = layer.norm1
    if norm == "layernorm":
        want = torch.nn.functional.layer_norm(x, (D_MODEL,), n1.weight, n1.bias, n1.eps)
    else:
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n1.eps) * n1.weight + n1.bias
    torch.testing.assert_close(seen[0], want.detach())
    assert layer.norm2.dropout == 0.5 and layer.ffn.dropout == 0.5  # the branches' dropouts stay
