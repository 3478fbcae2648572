"""swap_modules / restore_modules on fused_attn.reference and torch.nn models."""
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fused_attn
from fused_attn import modules as M
from fused_attn import reference as R
from fused_attn import swap as S
from fused_attn.testing import check_module_against_reference, compare, make_inputs, runnable_backends

D, H, L, B = 32, 4, 11, 2


def _perturb_norms(model):
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


class SeedModel(nn.Module):
    """The seed's style: reference attention and norms, an nn.Sequential FFN, tied embeddings."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.attn = R.MultiHeadAttention(D, H)
        self.norm1 = R.LayerNormResidual(D)
        self.ffn = nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D))
        self.norm2 = R.LayerNormResidual(D)
        self.head = nn.Linear(D, 50, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        x = self.embed(ids)
        y = self.norm1(self.attn(x), x)
        return self.head(self.norm2(self.ffn(y), y))


def test_reference_transformer_swap_is_exact_and_keeps_parameters():
    torch.manual_seed(0)
    model = R.Transformer(D, H, 2, norm_first=True, activation="swiglu", num_kv_heads=2)
    _perturb_norms(model)
    ref = copy.deepcopy(model)
    params_before = {n: p for n, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    report = fused_attn.swap_modules(model)
    assert len(report.replaced) == 8 and not report.left  # per layer: mha, 2 norms, ffn
    assert type(model.layers[0].multi_head_attention) is M.MultiHeadAttention
    assert type(model.layers[0].norm2) is M.LayerNormResidual and type(model.layers[1].ffn) is M.FeedForward
    assert all(params_before[n] is p for n, p in model.named_parameters())  # the same Parameter objects
    assert list(model.state_dict()) == keys_before
    (x,) = make_inputs((B, L, D), seed=1)
    check_module_against_reference(model, ref, [x], run=lambda m, x: m(x, is_causal=True))
    restored = fused_attn.restore_modules(model)
    assert len(restored.replaced) == 8
    assert type(model.layers[0].multi_head_attention) is R.MultiHeadAttention
    assert not hasattr(model.layers[0].multi_head_attention, "backend")


def test_swapped_reference_transformer_trains_learnable_alibi_on_packed_input():
    """A reference Transformer with alibi="learnable", swapped, trains on packed input (cu_seqlens)
    as before the swap: the swapped attention raised ("alibi_slopes requires grad"), where the
    original gave the slopes their gradient."""
    torch.manual_seed(0)
    model = R.Transformer(D, H, 2, causal=True, alibi="learnable")
    _perturb_norms(model)
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model)
    assert len(report.replaced) == 8 and type(model.layers[0].multi_head_attention) is M.MultiHeadAttention
    (x,) = make_inputs((14, D), seed=2)
    cu = torch.tensor([0, 3, 3, 14], dtype=torch.int32)
    results = check_module_against_reference(model, ref, [x], run=lambda m, x: m(x, cu_seqlens=cu))
    assert all(r.ok for r in results), "\n".join(map(str, results))
    assert model.layers[1].multi_head_attention.alibi_slopes.grad.abs().sum() > 0


def test_seed_model_with_sequential_ffn_and_tied_weights():
    torch.manual_seed(0)
    model = SeedModel()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ids = torch.randint(0, 50, (B, L))
    model(ids).square().mean().backward()
    opt.step()  # momentum buffers exist now, keyed by the Parameter objects
    ref.load_state_dict(model.state_dict())
    report = fused_attn.swap_modules(model, backend="reference")
    assert {(p, new) for p, _, new, _ in report.replaced} == {
        ("attn", "MultiHeadAttention"), ("norm1", "LayerNormResidual"), ("ffn", "FusedSequentialFFN"),
        ("norm2", "LayerNormResidual")}
    assert model.head.weight is model.embed.weight
    assert all(p in opt.state for p in model.parameters())
    check_module_against_reference(model, ref, [], run=lambda m: m(ids))
    # the optimiser keeps working on the swapped model
    opt.zero_grad()
    model(ids).square().mean().backward()
    opt.step()


def test_sequential_ffn_with_dropout_and_gelu_and_unsupported_activation():
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(D, 48), nn.GELU(approximate="tanh"), nn.Dropout(0.0), nn.Linear(48, D))
    ref = copy.deepcopy(ffn)
    assert fused_attn.swap_modules(ffn).replaced[0][3] == "FFN gelu_tanh"
    (x,) = make_inputs((B, L, D), seed=2)
    check_module_against_reference(ffn, ref, [x])
    odd = nn.Sequential(nn.Linear(D, 48), nn.Tanh(), nn.Linear(48, D))
    report = fused_attn.swap_modules(odd)
    assert not report.replaced and "Tanh" in report.left[0][2]


def test_sequential_ffn_changed_after_the_swap_runs_as_it_now_reads():
    """A swapped nn.Sequential FFN grown or shrunk afterwards (``append``, ``insert``, ``del``)
    runs nn.Sequential's forward over its children as they now are. The fused forward read
    ``self[len(self) - 1]`` as the second Linear and ``self[2]`` as the dropout: after an append
    it skipped a Linear (a wrong answer) or read a Linear as a Dropout (AttributeError)."""
    torch.manual_seed(0)
    x = torch.randn(3, D)
    four = nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Dropout(0.0), nn.Linear(48, D))
    three = nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Linear(48, D))
    for ffn, change in ((four, lambda s: s.append(nn.Linear(D, D))), (three, lambda s: s.append(nn.Dropout(0.0))),
                        (three, lambda s: s.insert(2, nn.Linear(48, 48))), (four, lambda s: s.__delitem__(2))):
        ffn = copy.deepcopy(ffn)
        fused_attn.swap_modules(ffn)
        change(ffn)
        torch.testing.assert_close(ffn(x), nn.Sequential.forward(ffn, x))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("packed", [True, False])
def test_torch_multihead_attention(batch_first, packed):
    torch.manual_seed(0)
    kdim = None if packed else 24
    mha = nn.MultiheadAttention(D, H, batch_first=batch_first, kdim=kdim, vdim=kdim)
    ref = copy.deepcopy(mha)
    fused_attn.swap_modules(mha)
    assert type(mha) is S.FusedMultiheadAttention
    shape = (lambda n, e: (B, n, e)) if batch_first else (lambda n, e: (n, B, e))
    kv_dim = kdim or D
    q, k, v = make_inputs(shape(L, D), shape(7, kv_dim), shape(7, kv_dim), seed=3)
    bool_mask = torch.rand(L, 7, generator=torch.Generator().manual_seed(4)) > 0.7  # True = masked (torch)
    bool_mask[:, 0] = False
    kpm = torch.zeros(B, 7, dtype=torch.bool)
    kpm[1, -2:] = True

    def run(m, q, k, v, **kw):
        return m(q, k, v, need_weights=False, **kw)[0]
    check_module_against_reference(mha, ref, [q, k, v], run=lambda m, q, k, v: run(m, q, k, v, attn_mask=bool_mask,
                                                                                   key_padding_mask=kpm))
    float_mask = torch.randn(B * H, L, 7, generator=torch.Generator().manual_seed(5))
    check_module_against_reference(mha, ref, [q, k, v], run=lambda m, q, k, v: run(
        m, q, k, v, attn_mask=float_mask.to(q.dtype), key_padding_mask=kpm))
    if packed:  # self-attention (one packed projection), causal hint
        (x,) = make_inputs(shape(L, D), seed=6)
        causal = nn.Transformer.generate_square_subsequent_mask(L)
        check_module_against_reference(mha, ref, [x], run=lambda m, x: run(m, x, x, x, attn_mask=causal,
                                                                             is_causal=True))


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_multihead_attention_output_layout(batch_first):
    """The swapped module returns a contiguous output, as torch's seq-first module does ((L, B, E):
    ``out.view(-1, E)`` works): the seq-first path returned a transposed (B, L, E) tensor. The
    batch-first path keeps its contiguous (B, L, E) output (torch's own is a transposed view there)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=batch_first)
    ref = copy.deepcopy(mha)
    fused_attn.swap_modules(mha)
    q, kv = torch.randn(L, B, D), torch.randn(7, B, D)
    if batch_first:
        q, kv = q.transpose(0, 1), kv.transpose(0, 1)
    for query, key in ((q, q), (q, kv)):  # self- and cross-attention
        out = mha(query, key, key, need_weights=False)[0]
        assert out.is_contiguous() and out.shape == query.shape
        torch.testing.assert_close(out, ref(query, key, key, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_torch_multihead_attention_fused_path_and_fallbacks(monkeypatch):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    ref = copy.deepcopy(mha)
    fused_attn.swap_modules(mha)
    calls = []
    real = S.attention
    monkeypatch.setattr(S, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(B, L, D)
    out, weights = mha(x, x, x, need_weights=False)
    assert weights is None and calls == [1]
    # need_weights=True: torch's own forward, weights included
    out_w, weights = mha(x, x, x)
    ref_out, ref_weights = ref(x, x, x)
    assert calls == [1] and torch.allclose(weights, ref_weights) and torch.allclose(out_w, ref_out, atol=1e-6)
    assert torch.allclose(out, ref_out, atol=1e-5)


def test_unsupported_multihead_attention_is_left_with_reason():
    mha = nn.MultiheadAttention(D, H, add_bias_kv=True)
    report = fused_attn.swap_modules(mha)
    assert type(mha) is nn.MultiheadAttention and not report.replaced
    assert report.left == [("", "MultiheadAttention", "add_bias_kv=True has no fused form")]
    mha = nn.MultiheadAttention(D, H)
    report = fused_attn.swap_modules(mha, attention=False)
    assert report.left == [("", "MultiheadAttention", "attention=False")]


def _bad_masks(B, H, L, S):
    """Masks torch.nn.MultiheadAttention refuses (seq-first, batch B, L queries, S keys), with the
    exception torch raises: (name, kwargs, exception type, argument the message names)."""
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -1] = True
    return [("kpm_uint8", dict(key_padding_mask=kpm.to(torch.uint8)), AssertionError, "key_padding_mask"),
            ("kpm_transposed", dict(key_padding_mask=kpm.T.contiguous()), AssertionError, "key_padding_mask"),
            ("kpm_1d", dict(key_padding_mask=kpm[0]), AssertionError, "key_padding_mask"),
            ("mask_int64", dict(attn_mask=torch.ones(L, S, dtype=torch.long).triu(1)), AssertionError, "attn_mask"),
            ("mask_1xS", dict(attn_mask=torch.tensor([[False] * (S - 1) + [True]])), RuntimeError, "attn_mask"),
            ("mask_4d", dict(attn_mask=torch.zeros(B, H, L, S, dtype=torch.bool)), AssertionError, "attn_mask"),
            ("mask_3d_BxLxS", dict(attn_mask=torch.zeros(B, L, S, dtype=torch.bool)), RuntimeError, "attn_mask")]


@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _bad_masks(3, 2, 4, 2)])
def test_torch_multihead_attention_refuses_the_masks_torch_refuses(case):
    """A swapped nn.MultiheadAttention makes torch's checks of its masks (dtype bool or float;
    key_padding_mask (B, S); attn_mask (L, S) or (B*H, L, S)) and raises what torch raises, with a
    message naming the argument. Without them it read such masks some other way and returned a
    wrong answer: a uint8 padding mask added as +1, a (S, B) one viewed as (B, S), a (1, S) or 4-D
    attn_mask broadcast."""
    B, H, L, S = 3, 2, 4, 2
    name, kwargs, exc, arg = _bad_masks(B, H, L, S)[case]
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4 * H, H)
    ref = copy.deepcopy(mha)
    fused_attn.swap_modules(mha)
    q, kv = torch.randn(L, B, 4 * H), torch.randn(S, B, 4 * H)
    with pytest.raises(exc):
        ref(q, kv, kv, need_weights=False, **kwargs)
    with pytest.raises(exc, match=arg):
        mha(q, kv, kv, need_weights=False, **kwargs)


def test_swapped_encoder_layers_refuse_the_padding_masks_torch_refuses():
    """The same checks through a swapped seq-first TransformerEncoderLayer and TransformerEncoder,
    which hand their masks to the swapped self-attention: a padding mask given as (L, B) raises, as
    torch's does, instead of being read as (B, L); a uint8 one raises naming src_key_padding_mask
    before any layer runs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0)
    enc = nn.TransformerEncoder(copy.deepcopy(layer), 2, enable_nested_tensor=False)
    x = torch.randn(L, B, D)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -2:] = True
    for module in (layer, enc):
        ref = copy.deepcopy(module)
        fused_attn.swap_modules(module)
        for bad, exc in ((kpm.T.contiguous(), AssertionError), (kpm.to(torch.uint8), AssertionError)):
            with pytest.raises(exc):
                ref(x, src_key_padding_mask=bad)
            with pytest.raises(exc, match="key_padding_mask"):
                module(x, src_key_padding_mask=bad)
        with pytest.raises(AssertionError, match="src_key_padding_mask"):
            module(x, src_key_padding_mask=kpm.to(torch.uint8))
        torch.testing.assert_close(module(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm))


ENCODER_CASES = [(False, "relu"), (True, "gelu"), (False, nn.GELU(approximate="tanh"))]


@pytest.mark.parametrize("norm_first,activation", ENCODER_CASES, ids=["post_relu", "pre_gelu", "post_gelu_tanh"])
@pytest.mark.parametrize("train", [False, True])
def test_torch_transformer_encoder(norm_first, activation, train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    _perturb_norms(enc)
    enc.train(train)
    ref = copy.deepcopy(enc)
    report = fused_attn.swap_modules(enc)
    types = {path: new for path, _, new, _ in report.replaced}
    assert types["layers.0"] == "FusedTransformerEncoderLayer" and types["layers.1.self_attn"] == \
        "FusedMultiheadAttention" and types[""] == "FusedTransformerEncoder" and types["norm"] == "FusedLayerNorm"
    (x,) = make_inputs((B, L, D), seed=7)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[0, -4:] = True
    check_module_against_reference(enc, ref, [x], run=lambda m, x: m(x, src_key_padding_mask=kpm))
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    check_module_against_reference(enc, ref, [x], run=lambda m, x: m(x, mask=causal))


def test_encoder_inference_fast_path_is_replaced():
    """In eval + no_grad, torch takes its native fast path (nested tensors); the swapped
    encoder runs the fused modules instead and gives the same result."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, batch_first=True), 2).eval()
    ref = copy.deepcopy(enc)
    fused_attn.swap_modules(enc)
    x = torch.randn(B, L, D)
    kpm = torch.zeros(B, L, dtype=torch.bool)
    kpm[1, -3:] = True
    with torch.no_grad():
        out, expected = enc(x, src_key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm)
    # padded positions too: torch's nested path gives zeros there (then the final norm, if any)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert out[1, -3:].abs().max() == 0
    for final_norm, float_mask, train in ((True, False, False), (False, True, False), (False, False, True)):
        torch.manual_seed(1)
        enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True), 2,
                                    norm=nn.LayerNorm(D) if final_norm else None).train(train)
        ref = copy.deepcopy(enc)
        fused_attn.swap_modules(enc)
        mask = torch.zeros(B, L).masked_fill(kpm, float("-inf")) if float_mask else kpm
        with torch.no_grad():  # (in train mode torch takes its plain path: no zeros)
            torch.testing.assert_close(enc(x, src_key_padding_mask=mask), ref(x, src_key_padding_mask=mask),
                                       atol=2e-5, rtol=1e-4)


def test_nested_tensor_inputs_run_the_original_forward():
    """torch's LayerNorm, and its encoder layer and encoder on their inference fast path, take
    nested tensors (sequences of different lengths); the fused ops do not. Swapped, they run the
    original forward for such input, as the swapped MultiheadAttention does, where they raised
    "NestedTensorImpl doesn't support sizes"."""
    torch.manual_seed(0)
    nested = torch.nested.nested_tensor([torch.randn(3, D), torch.randn(5, D)])
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True)
    for module in (nn.LayerNorm(D), layer, nn.TransformerEncoder(copy.deepcopy(layer), 2)):
        module.eval()
        ref = copy.deepcopy(module)
        fused_attn.swap_modules(module)
        with torch.no_grad():
            out, expected = module(nested), ref(nested)
        assert out.is_nested
        torch.testing.assert_close(out.to_padded_tensor(0.0), expected.to_padded_tensor(0.0))


@pytest.mark.parametrize("norm_first,activation,batch_first", [(False, "relu", False), (True, "gelu", True)])
def test_torch_transformer_decoder_layer(norm_first, activation, batch_first):
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(D, H, 48, dropout=0.0, activation=activation, batch_first=batch_first,
                                     norm_first=norm_first)
    _perturb_norms(dec)
    ref = copy.deepcopy(dec)
    report = fused_attn.swap_modules(dec)
    assert len(report.replaced) == 3  # the layer, self_attn, multihead_attn
    shape = (lambda n: (B, n, D)) if batch_first else (lambda n: (n, B, D))
    x, mem = make_inputs(shape(L), shape(6), seed=8)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    mem_kpm = torch.zeros(B, 6, dtype=torch.bool)
    mem_kpm[1, -2:] = True
    check_module_against_reference(dec, ref, [x, mem], run=lambda m, x, mem: m(
        x, mem, tgt_mask=causal, tgt_is_causal=True, memory_key_padding_mask=mem_kpm))


def test_partial_swaps_and_unsupported_activation():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, activation=lambda t: F.leaky_relu(t, 0.1),
                                       batch_first=True)
    ref = copy.deepcopy(layer)
    report = fused_attn.swap_modules(layer)
    assert "FFN torch (activation" in report.replaced[0][3] and "norms fused" in report.replaced[0][3]
    (x,) = make_inputs((B, L, D), seed=9)
    check_module_against_reference(layer, ref, [x])
    fused_attn.restore_modules(layer)
    report = fused_attn.swap_modules(layer, attention=False, ffn=False)
    assert [r[0] for r in report.replaced] == [""] and report.replaced[0][3].startswith("norms fused")
    assert ("self_attn", "MultiheadAttention", "attention=False") in report.left
    check_module_against_reference(layer, ref, [x])
    fused_attn.restore_modules(layer)
    report = fused_attn.swap_modules(layer, attention=False, norm=False, ffn=False)
    assert not report.replaced and type(layer) is nn.TransformerEncoderLayer


def test_norms_with_eps_the_fused_norm_refuses_are_left():
    """The fused norm takes a positive finite eps; torch's norms also take eps=0 (finite while
    the variance is positive). Such a norm, alone or in an encoder layer, is left to torch and
    listed with the reason (the layer's attention and FFN are still fused): before, it was
    swapped and every forward raised "eps must be a positive finite float"."""
    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    for norm in (nn.LayerNorm(D, eps=0.0), nn.RMSNorm(D, eps=0.0)):
        ref = copy.deepcopy(norm)
        report = fused_attn.swap_modules(norm)
        assert not report.replaced and type(norm) is type(ref) and "eps=0.0" in report.left[0][2], report
        torch.testing.assert_close(norm(x), ref(x))
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, layer_norm_eps=0.0, batch_first=True)
    ref = copy.deepcopy(layer)
    report = fused_attn.swap_modules(layer)
    assert "norms torch (eps=0.0" in report.replaced[0][3] and "FFN fused relu" in report.replaced[0][3], report
    assert {path for path, _, why in report.left if "eps=0.0" in why} == {"norm1", "norm2"}, report
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    huge = nn.LayerNorm(D)
    huge.eps = 10**400  # an int too large for a float: math.isfinite raised OverflowError
    report = fused_attn.swap_modules(huge)
    assert not report.replaced and "eps=an int of 1329 bits" in report.left[0][2], report


def test_activation_changed_after_the_swap_is_followed(monkeypatch):
    """A swapped layer's FFN reads its activation at each call: a function set after the swap
    (``layer.activation = F.gelu`` on a relu layer), a module put in its place (hooks included),
    or a module's setting changed (``approximate``) gives what the unswapped layer gives, fused
    where the new activation has a fused form. The swap used to cache the activation's fused
    form, so a new function activation was silently ignored (relu still ran)."""
    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True)  # relu
    ref = copy.deepcopy(layer)
    fused_attn.swap_modules(layer)
    calls = []
    real = S.feed_forward
    monkeypatch.setattr(S, "feed_forward", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda mod, inp, out: out * 2)
    for act, fused in ((F.gelu, "gelu"), (lambda t: F.leaky_relu(t, 0.1), None), (nn.GELU(), "gelu"),
                       (hooked, None)):
        layer.activation = ref.activation = act
        calls.clear()
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
        assert calls == ([fused] if fused else []), (act, calls)
    layer.activation, ref.activation = nn.GELU(), nn.GELU()
    layer.activation.approximate = ref.activation.approximate = "tanh"
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    ffn = nn.Sequential(nn.Linear(D, 48), nn.GELU(), nn.Linear(48, D))
    ref = copy.deepcopy(ffn)
    fused_attn.swap_modules(ffn)
    ffn[1].approximate = ref[1].approximate = "tanh"
    torch.testing.assert_close(ffn(x), ref(x), rtol=1e-5, atol=1e-5)


def test_swap_is_idempotent_restore_is_complete_and_swapped_models_pickle():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True), 2,
                                  enable_nested_tensor=False)
    ref = copy.deepcopy(model)
    first = fused_attn.swap_modules(model)
    assert len(first.replaced) == 5 and not fused_attn.swap_modules(model).replaced
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.layers[0].self_attn) is S.FusedMultiheadAttention
    clone = copy.deepcopy(model)
    x = torch.randn(B, L, D)
    torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(clone(x), model(x))
    assert len(fused_attn.restore_modules(model).replaced) == 5
    assert all(S.RESTORE_ATTR not in m.__dict__ and "fused_attn_backend" not in m.__dict__ for m in model.modules())
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]
    torch.testing.assert_close(model(x), ref(x))


def test_report_text_and_bad_backend():
    mha = nn.MultiheadAttention(D, H)
    text = str(fused_attn.swap_modules(mha))
    assert "1 replaced, 0 left" in text and "MultiheadAttention -> FusedMultiheadAttention" in text
    with pytest.raises(ValueError, match="backend"):
        fused_attn.swap_modules(nn.Linear(2, 2), backend="fastest")
    with pytest.raises(TypeError, match="backend must be one of .* got int 3"):
        fused_attn.swap_modules(nn.Linear(2, 2), backend=3)


@pytest.mark.parametrize("option", ["attention", "norm", "ffn", "rotary"])
@pytest.mark.parametrize("value", ["false", None, 1])
def test_swap_options_must_be_bools(option, value):
    """The on/off options were taken by truthiness: attention="false" fused the attention, norm=None
    left the norms, silently. Nothing is swapped when one is refused."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, dim_feedforward=16), 2, enable_nested_tensor=False)
    with pytest.raises(TypeError, match=f"^{option} must be a bool, got "):
        fused_attn.swap_modules(enc, **{option: value})
    assert not any(type(m).__module__.startswith("fused_attn") for m in enc.modules())


def test_a_model_holding_an_encoder_of_no_layers_swaps():
    """nn.Transformer(num_encoder_layers=0) and the like: an encoder of no layers raised an
    IndexError in swap_modules (it looked at its first layer); the rest is swapped and equal. (torch
    cannot run such an encoder itself: a model holds it unused, as nn.Transformer's decoder-only use.)"""
    model = nn.Sequential(nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, dim_feedforward=16,
                                                                          batch_first=True), 0,
                                                enable_nested_tensor=False),
                          nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, dim_feedforward=16,
                                                                          batch_first=True), 1,
                                                enable_nested_tensor=False)).eval()
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model)
    assert any(path == "1" for path, *_ in report.replaced), str(report)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(model[1](x), ref[1](x), atol=1e-5, rtol=1e-5)


def test_restore_report_says_restored():
    """restore_modules' report is headed by restore_modules and counts what it restored (it was
    headed "fused_attn.swap_modules: N replaced", as if the model had been swapped again)."""
    mha = nn.MultiheadAttention(D, H)
    fused_attn.swap_modules(mha)
    text = str(fused_attn.restore_modules(mha))
    assert text.splitlines() == ["fused_attn.restore_modules: 1 restored",
                                 "  restored <root>: FusedMultiheadAttention -> MultiheadAttention"], text


def test_swapping_a_swapped_model_again_says_so():
    """A second swap_modules on a swapped model changes nothing (the modules keep the backend and
    options of the first); its report lists them as already swapped, with their backend, and says
    how to change it, where it said "0 replaced, 0 left" and the new backend silently did not apply."""
    model = nn.Sequential(nn.MultiheadAttention(D, H), nn.Linear(D, D))
    fused_attn.swap_modules(model)
    report = fused_attn.swap_modules(model, backend="reference")
    assert not report.replaced and not report.left
    assert report.already == [("0", "FusedMultiheadAttention", "backend=None")]
    text = str(report)
    assert text.startswith("fused_attn.swap_modules: 0 replaced, 0 left, 1 already swapped\n"), text
    assert "restore_modules(model), then swap_modules(model, ...)" in text
    assert model[0].fused_attn_backend is None


def test_swapped_modules_show_their_backend_and_train_with_dropout():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, dropout=0.3, batch_first=True), 1,
                                norm=nn.LayerNorm(D), enable_nested_tensor=False)
    fused_attn.swap_modules(enc, backend="reference")
    text = repr(enc)
    assert "embed_dim=32, num_heads=4, batch_first=True, backend=reference" in text
    # (torch's own repr of the norm first: torch 2.13's shows bias=True, 2.11's does not)
    assert f"FusedLayerNorm({nn.LayerNorm(D).extra_repr()}, backend=reference)" in text
    x = torch.randn(B, L, D, requires_grad=True)
    enc.train()
    a, b = enc(x), enc(x)
    assert not torch.allclose(a, b)  # dropout is on in training
    a.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc.parameters())
    enc.eval()
    torch.testing.assert_close(enc(x), enc(x))


# --- modules whose forward chains Linear -> activation -> [Dropout] -> Linear -> [Dropout] ---------

class ChainedMLP(nn.Module):
    """Statements, one child each (GPT-NeoX's style)."""

    def __init__(self, act=None):
        super().__init__()
        self.up = nn.Linear(D, 3 * D + 1)
        self.act = act if act is not None else nn.GELU(approximate="tanh")
        self.down = nn.Linear(3 * D + 1, D)

    def forward(self, hidden_states):
        hidden_states = self.up(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.down(hidden_states)
        return hidden_states


class NestedMLP(nn.Module):
    """Nested calls, a dropout between and one after (GPT-J's and T5's layouts)."""

    def __init__(self, p_mid=0.0, p_end=0.0):
        super().__init__()
        self.fc_in, self.act, self.mid = nn.Linear(D, 50, bias=False), nn.SiLU(), nn.Dropout(p_mid)
        self.fc_out, self.drop = nn.Linear(50, D), nn.Dropout(p_end)

    def forward(self, x):
        """A docstring is allowed."""
        h = self.mid(self.act(self.fc_in(x)))
        return self.drop(self.fc_out(h))


class ResidualMLP(nn.Module):
    """Not a plain chain (a residual add): left alone, and not listed."""

    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)

    def forward(self, x):
        return x + self.b(self.act(self.a(x)))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)

    def forward(self, x, scale):
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize("make", [lambda: ChainedMLP(), lambda: NestedMLP()], ids=["statements", "nested"])
def test_plain_chain_mlps_are_fused_exactly(make, monkeypatch):
    """...and run the fused op: the swapped MLP read its layout from its fused class, which has no
    forward of its own, found no chain and ran the module's own forward at every call."""
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.LayerNorm(D))
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model)
    assert type(model[0]).__name__ == f"Fused{type(ref[0]).__name__}" and "read from its forward" in str(report)
    (x,) = make_inputs((B, L, D), seed=2)
    calls = []
    real = S.feed_forward
    monkeypatch.setattr(S, "feed_forward", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    model(x)
    assert calls == [S.activation_name(ref[0].act)]
    check = check_module_against_reference(model, ref, [x])
    assert all(r.ok for r in check), "\n".join(map(str, check))
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    restored = fused_attn.restore_modules(model)
    assert type(model[0]) is type(ref[0]) and len(restored.replaced) == 2


def _parameters(fn):
    """A forward's parameters as a caller sees them: names, kinds, defaults (not annotations)."""
    import inspect
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_fused_classes_take_the_arguments_of_the_classes_they_replace():
    """Each class the swap puts in place of another takes the same arguments, under the same
    names, as the original's forward: the swapped LayerNorm and Sequential took ``x`` where torch's
    take ``input`` (``norm(input=x)`` raised TypeError once swapped), the swapped plain MLP took
    ``x`` whatever the original's name (GPT-NeoX's ``mlp(hidden_states=h)`` raised)."""
    import inspect

    fused = [getattr(S, n) for n in S.__all__ if n.startswith("Fused") and inspect.isclass(getattr(S, n))]
    fused += [M.MultiHeadAttention, M.LayerNormResidual, M.FeedForward]
    fused += [S.fused_subclass(cls, S.FusedPlainMLP) for cls in (ChainedMLP, NestedMLP)]
    assert len(fused) >= 12
    for cls in fused:
        original = next(c for c in cls.__mro__[1:] if c.__module__ != "fused_attn.swap")
        assert _parameters(cls.forward) == _parameters(original.forward), (cls, original)


def test_swapped_modules_take_their_input_by_keyword(monkeypatch):
    """A swapped module takes its input under the original's parameter name and runs fused; a
    call the original refuses (another name, another argument) raises the original's TypeError."""
    torch.manual_seed(0)
    calls = []
    real = S.feed_forward
    monkeypatch.setattr(S, "feed_forward", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    x = torch.randn(B, L, D)
    norm, seq, mlp = nn.LayerNorm(D), nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, D)), ChainedMLP()
    refs = [copy.deepcopy(m) for m in (norm, seq, mlp)]
    for module, ref, name in zip((norm, seq, mlp), refs, ("input", "input", "hidden_states")):
        assert len(fused_attn.swap_modules(module).replaced) == 1
        torch.testing.assert_close(module(**{name: x}), ref(**{name: x}), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-5)
    assert calls == ["relu", "relu", "gelu_tanh", "gelu_tanh"]  # positional and keyword calls fused
    for call in (lambda m: m(x=x), lambda m: m(x, x), lambda m: m(), lambda m: m(x, hidden_states=x)):
        with pytest.raises(TypeError) as swapped_error:
            call(mlp)
        with pytest.raises(TypeError) as original_error:
            call(refs[2])
        assert str(swapped_error.value) == str(original_error.value)


class ScaledLinear(nn.Linear):
    """An nn.Linear subclass with a forward of its own (as a quantized linear has)."""

    def forward(self, input):
        return 2 * super().forward(input)


class KeptLinear(nn.Linear):
    """An nn.Linear subclass that keeps nn.Linear's forward."""


def test_plain_chain_over_linear_subclasses(monkeypatch):
    """A Linear slot holding an nn.Linear subclass: one that keeps nn.Linear's forward is fused;
    one with a forward of its own is left, with the reason, in a chain and in an nn.Sequential
    (it was read as the activation: no chain was found, and the MLP was neither fused nor
    listed). One put in after the swap sends the call to the module's own forward."""
    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    kept = ChainedMLP()
    kept.up = KeptLinear(D, 3 * D + 1)
    ref = copy.deepcopy(kept)
    assert len(fused_attn.swap_modules(kept).replaced) == 1
    calls = []
    real = S.feed_forward
    monkeypatch.setattr(S, "feed_forward", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    torch.testing.assert_close(kept(x), ref(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    kept.down = ref.down = ScaledLinear(3 * D + 1, D)  # after the swap: the module's own forward
    torch.testing.assert_close(kept(x), ref(x))
    assert len(calls) == 1
    scaled = ChainedMLP()
    scaled.down = ScaledLinear(3 * D + 1, D)
    report = fused_attn.swap_modules(scaled)
    assert not report.replaced and len(report.left) == 1
    assert "child 'down' is" in report.left[0][2] and "ScaledLinear, whose forward is not Linear's" in report.left[0][2]
    seq = nn.Sequential(ScaledLinear(D, 8), nn.ReLU(), nn.Linear(8, D))
    report = fused_attn.swap_modules(seq)
    assert not report.replaced and "child '0' is" in report.left[0][2], str(report)
    seq = nn.Sequential(KeptLinear(D, 8), nn.ReLU(), nn.Linear(8, D))
    ref = copy.deepcopy(seq)
    assert len(fused_attn.swap_modules(seq).replaced) == 1
    torch.testing.assert_close(seq(x), ref(x), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


def test_plain_chain_mlp_dropouts_and_pickling():
    """The middle dropout runs inside the fused op (train mode drops, eval does not), the last one
    is the module's own; a swapped model pickles in the process that swapped it."""
    torch.manual_seed(0)
    model = NestedMLP(p_mid=0.5, p_end=0.0)
    ref = copy.deepcopy(model).eval()
    fused_attn.swap_modules(model)
    x = torch.randn(4, D)
    model.eval()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    assert torch.equal(a, model(x)) and not torch.allclose(a, ref(x))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False).eval()
    assert type(loaded) is type(model)
    torch.testing.assert_close(loaded(x), ref(x), rtol=1e-5, atol=1e-5)


def test_what_is_not_a_plain_chain_is_left():
    model = nn.ModuleDict({"res": ResidualMLP(), "two": TwoInputs(), "act": ChainedMLP(act=nn.Tanh()),
                           "off": ChainedMLP()})
    report = fused_attn.swap_modules(model.res)
    assert not report.replaced and not report.left
    assert not fused_attn.swap_modules(model.two).replaced
    report = fused_attn.swap_modules(model.act)
    assert not report.replaced and report.left == [("", "ChainedMLP", "activation Tanh has no fused form")]
    report = fused_attn.swap_modules(model.off, ffn=False)
    assert report.left == [("", "ChainedMLP", "ffn=False")]
    assert S.forward_chain(ChainedMLP) == ("up", "act", "down") and S.forward_chain(ResidualMLP) is None


def test_swapped_model_trains_under_autocast():
    """Mixed precision (torch.autocast, bfloat16 on the CPU): a swapped model (a plain MLP, a torch
    encoder layer, a LayerNorm, all with float32 parameters) runs forward and backward as the
    original does, in the same output dtype, to bfloat16 accuracy: the output and each parameter's
    gradient (float32; the attention's packed input projection as its q, k and v parts) are as
    close to the float64 model's as the original's under the same autocast, relative to their norms
    (k = 2 as the oracle's, + 1e-3). Both are ~1 % off here (over six seeds the swapped ones are
    0.1-1.6x the original's error, at most 0.76 of the bound). The loss weighs the output by
    random numbers: its plain sum, the sum of a LayerNorm's output (the encoder layer's last), has a
    gradient of ~0 for every parameter but that norm's bias, and the check could not fail."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), ChainedMLP(), nn.LayerNorm(D),
                          nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True))
    ref = copy.deepcopy(model)
    exact = copy.deepcopy(model).double()
    assert len(fused_attn.swap_modules(model).replaced) == 4
    x, weights = torch.randn(B, L, D), torch.randn(B, L, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, original = model(x), ref(x)
    assert out.dtype == original.dtype
    truth = exact(x.double())
    (out.float() * weights).sum().backward()
    (original.float() * weights).sum().backward()
    (truth * weights.double()).sum().backward()

    def off(t, want):
        return ((t.double() - want).norm() / want.norm()).item()

    ref_params, exact_params = dict(ref.named_parameters()), dict(exact.named_parameters())
    checks = [("output", out, original, truth)]
    for name, p in model.named_parameters():
        grads = (p.grad, ref_params[name].grad, exact_params[name].grad)
        if "in_proj" in name:  # (the q, k and v projections each: dq is a small part of the whole)
            checks += [(f"{name}[{part}]", *(g.chunk(3)[i] for g in grads)) for i, part in enumerate("qkv")]
        else:
            checks.append((name, *grads))
    for name, got, theirs, want in checks:
        assert got.dtype == theirs.dtype, name
        err, their_err = off(got, want), off(theirs, want)
        assert err <= 2 * their_err + 1e-3, f"{name}: {err:.3g} off float64, the original {their_err:.3g}"


@pytest.mark.parametrize("model", ["encoder layer", "transformer"])
def test_post_ln_stream_stays_float32_under_autocast(model):
    """Post-LN under autocast: torch adds the half-precision branch to the float32 residual stream
    in float32 and its LayerNorm returns float32, so the stream stays float32 through the layers.
    The swapped layers do the same: float32 out and the original's accuracy against float64. (The
    fused norm returned the branch's bfloat16, rounding the stream at every layer.)"""
    torch.manual_seed(0)
    net = (nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True), 3,
                                 enable_nested_tensor=False) if model == "transformer"
           else nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True))
    exact = copy.deepcopy(net).double()
    swapped = copy.deepcopy(net)
    fused_attn.swap_modules(swapped)
    x = torch.randn(B, L, D) * 3
    expected = exact(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        original, out = net(x), swapped(x)
    assert original.dtype == out.dtype == torch.float32
    original_err, err = ((t.double() - expected).abs().max().item() for t in (original, out))
    assert err <= 2 * original_err + 1e-3, (err, original_err)


@pytest.mark.parametrize("backend", [b for b in runnable_backends("layer_norm_residual", dtype=torch.float16)
                                     if b in ("cpu", "reference")])
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
@pytest.mark.parametrize("stream, autocast", [(torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16)],
                         ids=["bfloat16-under-float16", "float16-under-bfloat16"])
def test_stream_of_the_other_half_dtype_under_autocast(backend, norm_first, stream, autocast):
    """A residual stream in the half dtype autocast does not use (bfloat16 input under a float16
    autocast): torch adds the branch to it in float32 (bfloat16 + float16 promote to float32) and
    returns float32. The swapped layers do the same: torch's dtype, finite, and within the oracle
    of torch's own error against float64. (The fused pre-LN norm cast the stream to the branch's
    dtype: float16 out, off by units at 1e4, inf and NaN at 1e5.)"""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True, norm_first=norm_first)
    swapped = copy.deepcopy(layer)
    fused_attn.swap_modules(swapped, backend=backend)
    x = (torch.randn(B, L, D) * 1e4).to(stream)
    expected = copy.deepcopy(layer).double()(x.double())
    with torch.autocast("cpu", dtype=autocast):
        original, out = layer(x), swapped(x)
    assert out.dtype == original.dtype == torch.float32
    compare("out", out, expected, original)


class SiLUActivation(nn.Module):
    """A user's class that shares a transformers activation's name but is not it."""

    def forward(self, x):
        return torch.relu(x)


class LambdaForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D)

    forward = lambda self, x: self.b(self.act(self.a(x)))  # noqa: E731


def test_plain_chain_guards():
    """What the fused forward would get wrong is left or sent to the module's own forward: a
    lambda forward (not read), an activation known only by a transformers class name, children
    with hooks or weight_norm (left, with the reason) or parametrizations, a child replaced after
    the swap (the call runs the module's forward), a forward replaced on the class (read anew)."""
    import torch.nn.utils.parametrize as parametrize

    x = torch.randn(3, D)
    assert not fused_attn.swap_modules(LambdaForward()).replaced
    named = ChainedMLP(act=SiLUActivation())
    report = fused_attn.swap_modules(named)
    assert report.left == [("", "ChainedMLP", "activation SiLUActivation has no fused form")]
    hooked = ChainedMLP()
    hooked.up.register_forward_hook(lambda mod, inp, out: out * 0)
    assert "child 'up' has forward hooks" in fused_attn.swap_modules(hooked).left[0][2]
    normed = ChainedMLP()
    normed.down = torch.nn.utils.weight_norm(normed.down)
    assert "child 'down' has forward hooks" in fused_attn.swap_modules(normed).left[0][2]
    param = ChainedMLP()
    parametrize.register_parametrization(param.up, "weight", nn.Identity())
    assert not fused_attn.swap_modules(param).replaced  # (a parametrized Linear is another class)
    swapped = ChainedMLP()
    ref = copy.deepcopy(swapped)
    fused_attn.swap_modules(swapped)
    swapped.act = ref.act = nn.Tanh()  # no fused form: the module's own forward runs
    torch.testing.assert_close(swapped(x), ref(x))
    swapped.act = ref.act = nn.ReLU()  # a fused form again
    torch.testing.assert_close(swapped(x), ref(x), rtol=1e-5, atol=1e-6)
    swapped.up.register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
    ref.up.register_forward_pre_hook(lambda mod, inp: (inp[0] * 2,))
    torch.testing.assert_close(swapped(x), ref(x), rtol=1e-5, atol=1e-6)


class Rechained(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(D, D), nn.GELU(), nn.Linear(D, D)

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def test_forward_replaced_on_the_class_is_read_anew():
    def scaled(self, x):
        return self.b(self.act(self.a(x))) * 3

    original = Rechained.forward
    try:
        assert S.forward_chain(Rechained) == ("a", "act", "b")
        Rechained.forward = scaled
        assert S.forward_chain(Rechained) is None
        assert not fused_attn.swap_modules(Rechained()).replaced
    finally:
        Rechained.forward = original


def test_restore_keeps_a_class_made_over_the_swapped_one():
    """A parametrization registered after the swap makes a class over the fused one
    (ParametrizedFusedLayerNorm): restore_modules gives the module that class made over
    LayerNorm, so the parametrization still works and can be removed. (It set LayerNorm back, and
    the forward then failed: 'LayerNorm' object has no attribute 'weight'.) A mixin class made
    over the fused one (as FSDP2's fully_shard makes) is kept the same way."""
    import torch.nn.utils.parametrize as P

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    norm, plain = nn.LayerNorm(D), nn.LayerNorm(D)
    fused_attn.swap_modules(norm)
    P.register_parametrization(norm, "weight", Double())
    P.register_parametrization(plain, "weight", Double())
    fused_attn.restore_modules(norm)
    assert type(norm).__name__ == "ParametrizedLayerNorm" and P.is_parametrized(norm, "weight")
    assert not any(c.__module__ == "fused_attn.swap" for c in type(norm).__mro__)
    x = torch.randn(B, L, D)
    torch.testing.assert_close(norm(x), plain(x))
    P.remove_parametrizations(norm, "weight")
    assert type(norm) is nn.LayerNorm

    class Sharded:  # a mixin made over the module's class, as fully_shard makes one
        def shard_marker(self):
            return True

    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True)
    fused_attn.swap_modules(layer)
    layer.__class__ = type("Sharded" + type(layer).__name__, (Sharded, type(layer)), {})
    fused_attn.restore_modules(layer)
    assert layer.shard_marker() and isinstance(layer, nn.TransformerEncoderLayer)
    assert type(layer).__name__ == "ShardedTransformerEncoderLayer"
    assert not any(c.__module__ == "fused_attn.swap" for c in type(layer).__mro__)


def test_subclasses_of_swapped_torch_classes_are_listed_left():
    """A parametrized LayerNorm (class ParametrizedLayerNorm) or a user's subclass of a torch
    layer is not swapped (only the exact classes are, whose forward the fused one reproduces),
    and the report says so; it used to pass them over in silence ('0 replaced, 0 left')."""
    import torch.nn.utils.parametrize as P

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    class MyLayer(nn.TransformerEncoderLayer):
        pass

    norm = nn.LayerNorm(D)
    P.register_parametrization(norm, "weight", Double())
    model = nn.Sequential(norm, MyLayer(D, H, 48, dropout=0.0, batch_first=True))
    report = fused_attn.swap_modules(model)
    left = {path: (cls, why) for path, cls, why in report.left}
    assert left["0"][0] == "ParametrizedLayerNorm" and "a subclass of LayerNorm" in left["0"][1]
    assert left["1"][0] == "MyLayer" and "a subclass of TransformerEncoderLayer" in left["1"][1]
    assert type(model[0]).__name__ == "ParametrizedLayerNorm" and type(model[1]) is MyLayer


def test_torch_multihead_attention_checks_the_embedding_dim_as_torch():
    """A query of another width than embed_dim raises torch's AssertionError and message (the
    swapped module failed inside its projection: 'mat1 and mat2 shapes cannot be multiplied')."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    swapped = copy.deepcopy(mha)
    fused_attn.swap_modules(swapped)
    x = torch.randn(2, 5, 6)
    with pytest.raises(AssertionError, match="was expecting embedding dimension of 8, but got 6") as torch_error:
        mha(x, x, x, need_weights=False)
    with pytest.raises(AssertionError, match=str(torch_error.value)):
        swapped(x, x, x, need_weights=False)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 12])
def test_torch_multihead_attention_checks_key_and_value_as_torch(batch_first, kdim):
    """A key and value of other lengths or batches, or not 3-D, raise torch's AssertionError and
    message (the swapped module reported them from its kernels' check, with the head-split
    (B, H, L, D) shapes and the names q, k, v). A key batch other than the query's, which torch
    reports from a reshape inside ("shape '[7, 8, 4]' is invalid"), is a ValueError naming key."""
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim)
    swapped = copy.deepcopy(mha)
    fused_attn.swap_modules(swapped)
    E = kdim or 16

    def t(batch, length, width=E):
        return torch.randn(batch, length, width) if batch_first else torch.randn(length, batch, width)

    q = t(2, 5, 16)
    for k, v in ((t(2, 7), t(2, 8)), (t(2, 7), t(3, 7)), (torch.randn(2, 7), t(2, 7))):
        with pytest.raises(AssertionError) as torch_error:
            mha(q, k, v, need_weights=False)
        with pytest.raises(AssertionError) as error:
            swapped(q, k, v, need_weights=False)
        assert str(error.value) == str(torch_error.value)
    with pytest.raises(ValueError, match=r"key and value must have query's batch size 2, got 3"):
        swapped(q, t(3, 7), t(3, 7), need_weights=False)


def test_fused_multi_head_attention_names_key_and_value_shapes():
    """MultiHeadAttention (and the reference's) compares query, key and value before projecting:
    the error quoted the kernels' head-split shapes under the names q, k, v."""
    for cls in (M.MultiHeadAttention, R.MultiHeadAttention):
        m = cls(16, 4)
        q = torch.randn(2, 5, 16)
        with pytest.raises(ValueError, match=r"key and value must have the same length, got key \(2, 7, 16\) "
                                             r"and value \(2, 8, 16\)"):
            m(q, torch.randn(2, 7, 16), torch.randn(2, 8, 16))
        with pytest.raises(ValueError, match=r"key must have query's batch size 2, got key \(3, 7, 16\)"):
            m(q, torch.randn(3, 7, 16))
        with pytest.raises(ValueError, match=r"value must have query's batch size 2, got value \(1, 5, 16\)"):
            m(q, None, torch.randn(1, 5, 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swapped_rms_norm_default_eps_in_half_precision(dtype):
    """nn.RMSNorm's eps=None: torch's kernel adds the eps of its float32 compute type (its docs
    say finfo(x.dtype).eps). The swapped norm added bfloat16's 7.8e-3, which moved outputs of
    small activations by whole units (1.09 at rms 0.1); also under autocast."""
    torch.manual_seed(0)
    norm = nn.RMSNorm(64, dtype=dtype)
    ref = copy.deepcopy(norm)
    fused_attn.swap_modules(norm)
    x = (torch.randn(256, 64) * 0.1).to(dtype)
    torch.testing.assert_close(norm(x), ref(x))
    model = nn.Sequential(nn.Linear(64, 64), nn.RMSNorm(64))
    ref = copy.deepcopy(model)
    fused_attn.swap_modules(model)
    with torch.autocast("cpu", dtype=dtype):
        out, expected = model(x.float() * 0.1), ref(x.float() * 0.1)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cls", [nn.LayerNorm, nn.RMSNorm])
def test_swapped_norm_without_weights_checks_the_size(cls):
    """A norm built with elementwise_affine=False has no weight for the fused op to hold x's last
    dim to: the swapped norm normalised a (2, 16) x over 16 where the norm is of size 17. It
    raises torch's own error now."""
    norm = cls(17, elementwise_affine=False)
    ref = copy.deepcopy(norm)
    fused_attn.swap_modules(norm)
    assert type(norm) is not cls
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError) as torch_error:
        ref(x)
    with pytest.raises(RuntimeError) as error:
        norm(x)
    assert str(error.value) == str(torch_error.value)
    x = torch.randn(2, 17)
    torch.testing.assert_close(norm(x), ref(x))


def test_modules_with_dropout_one_are_left():
    """torch's dropout takes p = 1 (it zeroes everything); the fused ops take p in [0, 1). Such
    modules were swapped ("2 replaced, 0 left" for an encoder layer) and then raised "dropout_p
    must be in [0, 1), got 1.0" at every training call. Now the attention, layer, Sequential FFN
    and plain MLP are left to torch, with the reason, and train as torch trains them."""
    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    mha = nn.MultiheadAttention(D, H, dropout=1.0, batch_first=True)
    models = {"layer": nn.TransformerEncoderLayer(D, H, 48, dropout=1.0, batch_first=True),
              "decoder": nn.TransformerDecoderLayer(D, H, 48, dropout=1.0, batch_first=True),
              "mha": mha, "seq": nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Dropout(1.0), nn.Linear(48, D)),
              "mlp": NestedMLP(p_mid=1.0)}
    for name, model in models.items():
        report = fused_attn.swap_modules(model)
        assert S.RESTORE_ATTR not in model.__dict__, (name, report)
        assert not [r for r in report.replaced if r[0] in ("self_attn", "multihead_attn")], (name, report)
        assert any("p=1.0: the fused ops take a dropout probability in [0, 1)" in why or
                   "dropout=1.0: the fused ops" in why for _, _, why in report.left), (name, report)
        model.train()
        if name == "mha":
            out = model(x, x, x, need_weights=False)[0]
        elif name == "decoder":
            out = model(x, x)
        else:
            out = model(x)
        assert torch.isfinite(out).all(), name
    # a dropout below 1 in the same layer is still fused
    report = fused_attn.swap_modules(nn.TransformerEncoderLayer(D, H, 48, dropout=0.5, batch_first=True))
    assert not report.left and "FFN fused relu" in report.replaced[0][3], report


def _tripling_backward_hook(kind):
    """Registers a backward hook of ``kind`` that triples the gradient it passes on: a hook the
    swapped module skipped would leave the gradients unchanged."""
    if kind == "full_backward_hook":
        return lambda m: m.register_full_backward_hook(lambda mod, gin, gout: tuple(
            None if g is None else 3 * g for g in gin))
    if kind == "full_backward_pre_hook":
        return lambda m: m.register_full_backward_pre_hook(lambda mod, gout: tuple(
            None if g is None else 3 * g for g in gout))
    return lambda m: m.register_backward_hook(lambda mod, gin, gout: tuple(  # the old-style hook
        None if g is None else 3 * g for g in gin))


def _encoder_layer(norm_first=False):
    return nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True, norm_first=norm_first)


#: (model, the module that gets the hook: a child a fused forward reads, or "" for the swapped module itself)
BACKWARD_HOOK_CASES = {
    "sequential_first": (lambda: nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Linear(48, D)), "0"),
    "sequential_act": (lambda: nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Linear(48, D)), "1"),
    "sequential_last": (lambda: nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Linear(48, D)), "2"),
    "encoder_norm1": (_encoder_layer, "norm1"),
    "encoder_linear1": (_encoder_layer, "linear1"),
    "encoder_dropout2": (_encoder_layer, "dropout2"),
    "pre_ln_encoder_norm2": (lambda: _encoder_layer(norm_first=True), "norm2"),
    "pre_ln_encoder_linear2": (lambda: _encoder_layer(norm_first=True), "linear2"),
    "plain_mlp_down": (ChainedMLP, "down"),
    "sequential_itself": (lambda: nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Linear(48, D)), ""),
    "encoder_itself": (_encoder_layer, ""),
    "layer_norm_itself": (lambda: nn.LayerNorm(D), ""),
}


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook")
@pytest.mark.parametrize("order", ["hook_then_swap", "swap_then_hook"])
@pytest.mark.parametrize("kind", ["full_backward_hook", "full_backward_pre_hook", "backward_hook"])
@pytest.mark.parametrize("case", sorted(BACKWARD_HOOK_CASES))
def test_backward_hooks_are_kept(case, kind, order):
    """Backward hooks (full, pre, old-style) on a child a fused forward reads instead of calling
    it run only when the child is called: the swap leaves such a module (or the part of it that
    reads the child) with the reason, and a hook added after the swap sends the call to the
    unfused forward. They were silently dropped, as forward hooks were before: gradients came out
    unscaled. Hooks on the swapped module itself run as on any module."""
    build, path = BACKWARD_HOOK_CASES[case]
    if kind == "backward_hook" and not path:
        pytest.skip("old-style backward hooks on a multi-op module are torch's own broken case")
    torch.manual_seed(0)
    ref = build()
    model = copy.deepcopy(ref)
    register = _tripling_backward_hook(kind)
    if order == "hook_then_swap":
        register(ref.get_submodule(path))
        register(model.get_submodule(path))
        report = fused_attn.swap_modules(model)
        if path:  # the report says which child and why
            assert f"child {path!r} has backward hooks, which the fused forward would skip" in str(report), report
    else:
        report = fused_attn.swap_modules(model)
        register(ref.get_submodule(path))
        register(model.get_submodule(path))
    if not path:
        assert report.replaced and not report.left, report
    x = torch.randn(B, L, D)
    weight = torch.linspace(-1.0, 2.0, B * L * D).view(B, L, D)  # (a LayerNorm's output has zero sum of squares' grad)
    grads = []
    for m in (model, ref):
        xx = x.clone().requires_grad_(True)
        out = m(xx)
        (out * weight).sum().backward()
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
        grads.append([xx.grad] + [p.grad for p in m.parameters()])
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated")
def test_hooked_children_of_a_torch_layer_leave_that_part_with_the_reason():
    """weight_norm's forward pre-hook (or a backward hook) on an encoder layer's linear before the
    swap: the report said "FFN fused relu" while every call ran torch's FFN (``reads_intact``
    refused the hooked child). Now the FFN is reported left, with the reason, and the norms stay
    fused; a hooked norm leaves the norms. A parametrized linear (torch.nn.utils.parametrize, whose
    ``weight`` the fused FFN reads) stays fused."""
    import torch.nn.utils.parametrize as parametrize

    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    layer = _encoder_layer()
    ref = copy.deepcopy(layer)
    layer.linear1 = torch.nn.utils.weight_norm(layer.linear1)
    ref.linear1 = torch.nn.utils.weight_norm(ref.linear1)
    report = fused_attn.swap_modules(layer)
    (note,) = [note for path, *_, note in report.replaced if path == ""]
    assert note == ("norms fused, FFN torch (child 'linear1' has forward hooks, which the fused forward would "
                    "skip)"), report
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)

    layer = _encoder_layer()
    layer.norm2.register_full_backward_hook(lambda mod, gin, gout: None)
    report = fused_attn.swap_modules(layer)
    (note,) = [note for path, *_, note in report.replaced if path == ""]
    assert note == ("norms torch (child 'norm2' has backward hooks, which the fused forward would skip), "
                    "FFN fused relu"), report

    layer = _encoder_layer()
    ref = copy.deepcopy(layer)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w
    for m in (layer, ref):
        parametrize.register_parametrization(m.linear1, "weight", Double())
    report = fused_attn.swap_modules(layer)
    (note,) = [note for path, *_, note in report.replaced if path == ""]
    assert note == "norms fused, FFN fused relu", report
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)


def test_sequential_ffn_dropout_is_the_fused_ops_dropout():
    """A swapped Sequential(Linear, GELU, Dropout(p), Linear) in training is F.feed_forward with
    dropout_p = p, the same elements dropped (the seed drawn from torch's generator as the op
    draws it); in eval it drops nothing. Every other swapped-FFN test had p = 0."""
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(D, 48), nn.GELU(), nn.Dropout(0.3), nn.Linear(48, D))
    fused_attn.swap_modules(ffn)
    x = torch.randn(B, L, D)
    first, last = ffn[0], ffn[3]

    def functional(p):
        torch.manual_seed(5)
        return fused_attn.functional.feed_forward(x, first.weight, first.bias, last.weight, last.bias,
                                                  activation="gelu", dropout_p=p)

    ffn.train()
    torch.manual_seed(5)
    assert torch.equal(ffn(x), functional(0.3))
    ffn.eval()
    assert torch.equal(ffn(x), functional(0.0))
    assert not torch.equal(functional(0.3), functional(0.0))


def _layer_by_hand(layer, x, memory=None):
    """A swapped TransformerEncoderLayer's forward (``memory`` None) or TransformerDecoderLayer's
    from the functional ops, each dropout at its module's p (p = 0 in eval): post-LN
    norm_i(x + dropout_i(branch_i(x))), pre-LN x + dropout_i(branch_i(norm_i(x))) with the add and
    the next norm in one op, the last add a plain add. Branches: self-attention, the decoder's
    cross-attention over ``memory``, the FFN (its inner dropout in the op). The attentions' own
    dropout must be 0 here (their calls are the layer's own modules)."""
    from fused_attn import functional as FA

    def p(drop):
        return drop.p if layer.training else 0.0

    def sa(h):
        return layer.self_attn(h, h, h, need_weights=False)[0]

    def ca(h):
        return layer.multihead_attn(h, memory, memory, need_weights=False)[0]

    def ff(h):
        return FA.feed_forward(h, layer.linear1.weight, layer.linear1.bias, layer.linear2.weight,
                               layer.linear2.bias, activation="relu", dropout_p=p(layer.dropout))

    decoder = memory is not None
    branches = [sa, ca, ff] if decoder else [sa, ff]
    norms = [layer.norm1, layer.norm2] + ([layer.norm3] if decoder else [])
    drops = [layer.dropout1, layer.dropout2] + ([layer.dropout3] if decoder else [])
    if not layer.norm_first:
        for branch, n, drop in zip(branches, norms, drops):
            x = FA.layer_norm_residual(branch(x), x, n.weight, n.bias, n.eps, dropout_p=p(drop))
        return x
    h = FA.layer_norm_residual(x, None, norms[0].weight, norms[0].bias, norms[0].eps)
    for branch, n, drop in zip(branches[:-1], norms[1:], drops[:-1]):
        h, x = FA.layer_norm_residual(branch(h), x, n.weight, n.bias, n.eps, dropout_p=p(drop), prenorm=True)
    return x + FA._counter_dropout(branches[-1](h), p(drops[-1]))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("which", ["dropout1", "dropout2", "dropout"])
def test_torch_encoder_layer_dropouts_run_fused(norm_first, which):
    """Each residual dropout (dropout1 after attention, dropout2 after the FFN) and the FFN's inner
    dropout of a swapped TransformerEncoderLayer drops in training, exactly the elements its fused
    op draws (one dropout on at a time, so one seed is drawn), and nothing in eval. Every other
    swapped-layer test ran dropout=0.0, so a dropout fused at p = 0 went unnoticed."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True, norm_first=norm_first)
    _perturb_norms(layer)
    getattr(layer, which).p = 0.4
    fused_attn.swap_modules(layer)
    x = torch.randn(B, L, D)
    layer.eval()
    with torch.no_grad():
        plain = layer(x)
        torch.testing.assert_close(plain, _layer_by_hand(layer, x), atol=1e-6, rtol=1e-6)
        layer.train()
        torch.manual_seed(3)
        dropped = layer(x)
        torch.manual_seed(3)
        expected = _layer_by_hand(layer, x)
    torch.testing.assert_close(dropped, expected, atol=1e-6, rtol=1e-6)
    changed = ((dropped - plain).abs() > 1e-4).float().mean()
    assert changed > 0.2, changed  # the dropout is on (p = 0.4; a norm after it spreads a drop over its row)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
@pytest.mark.parametrize("which", ["dropout1", "dropout2", "dropout3", "dropout"])
def test_torch_decoder_layer_dropouts_run_fused(norm_first, which):
    """The same for a swapped TransformerDecoderLayer: dropout1 (after self-attention), dropout2
    (after cross-attention), dropout3 (after the FFN; pre-LN: the last add's) and the FFN's inner
    dropout each drop in training exactly the elements their fused op draws, and nothing in eval.
    The decoder-layer tests ran dropout=0.0 only."""
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(D, H, 48, dropout=0.0, batch_first=True, norm_first=norm_first)
    _perturb_norms(layer)
    getattr(layer, which).p = 0.4
    report = fused_attn.swap_modules(layer)
    assert type(layer) is S.FusedTransformerDecoderLayer and "norms fused, FFN fused relu" in report.replaced[0][3]
    x, memory = torch.randn(B, L, D), torch.randn(B, 6, D)
    layer.eval()
    with torch.no_grad():
        plain = layer(x, memory)
        torch.testing.assert_close(plain, _layer_by_hand(layer, x, memory), atol=1e-6, rtol=1e-6)
        layer.train()
        torch.manual_seed(3)
        dropped = layer(x, memory)
        torch.manual_seed(3)
        expected = _layer_by_hand(layer, x, memory)
    torch.testing.assert_close(dropped, expected, atol=1e-6, rtol=1e-6)
    changed = ((dropped - plain).abs() > 1e-4).float().mean()
    assert changed > 0.2, changed  # the dropout is on (p = 0.4; a norm after it spreads a drop over its row)


def _model_of_a_class_made_per_call(chain: bool):
    """A model of a class defined in a function call (made anew at each one), whose forward's
    closure holds a tensor; with ``chain`` its forward is a plain chain, which the swap fuses
    (the tensor then held by the class), else one the swap inspects and leaves."""
    table = torch.ones(4)

    class PerCallMLP(nn.Module):
        held = table

        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(D, 8), nn.GELU(), nn.Linear(8, D)

        if chain:
            def forward(self, x):
                return self.fc2(self.act(self.fc1(x)))
        else:
            def forward(self, x):
                return self.fc2(self.act(self.fc1(x * table[0])))

    return nn.Sequential(PerCallMLP()), table


@pytest.mark.parametrize("chain", [False, True], ids=["inspected", "replaced"])
def test_swap_keeps_nothing_of_a_deleted_model_alive(chain):
    """Once a swapped model is deleted (and its copies, and a restored one), its classes, their
    forward functions and what those reference are freed by one gc.collect(). The swap kept them
    forever: the source reader's cache held every forward function it inspected (with its closure,
    the user's tensors in it), fused or not, and the fused subclasses' table held each swapped
    class."""
    import gc
    import weakref

    held = []
    for restore in (False, True):
        model, table = _model_of_a_class_made_per_call(chain)
        x = torch.randn(B, L, D)
        ref = model(x)
        report = fused_attn.swap_modules(model)
        assert [r[1:3] for r in report.replaced] == ([("PerCallMLP", "FusedPerCallMLP")] if chain else [])
        clone = copy.deepcopy(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(clone(x), ref, rtol=1e-5, atol=1e-5)
        if restore:
            fused_attn.restore_modules(model)
        held += [weakref.ref(table), weakref.ref(type(model[0])), weakref.ref(type(model[0]).forward)]
        del model, clone, table, ref, report
    gc.collect()
    assert [r() for r in held] == [None] * len(held)


def test_fused_subclass_is_made_again_once_freed():
    """The fused subclass of a class lives while something holds it (a swapped module, a loaded
    one); once freed, a swap or an unpickling makes it again, and a swapped model saved before still
    loads and runs fused."""
    import gc
    import weakref

    torch.manual_seed(0)
    x = torch.randn(B, L, D)
    model = ChainedMLP()
    ref = copy.deepcopy(model)
    fused_attn.swap_modules(model)
    fused = weakref.ref(type(model))
    assert S.fused_subclass(ChainedMLP, S.FusedPlainMLP) is fused()  # one per pair while it lives
    buf = io.BytesIO()
    torch.save(model, buf)
    del model
    gc.collect()
    assert fused() is None
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    again = ChainedMLP()
    again.load_state_dict(ref.state_dict())
    fused_attn.swap_modules(again)
    assert type(loaded) is type(again) is S.fused_subclass(ChainedMLP, S.FusedPlainMLP)
    assert type(loaded).__bases__ == (S.FusedPlainMLP, ChainedMLP)
    for module in (loaded, again):
        torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-5)
    fused_attn.restore_modules(loaded)
    assert type(loaded) is ChainedMLP


def test_fused_subclass_is_one_class_when_threads_swap_at_once(monkeypatch):
    """Threads that swap the same class at once get one fused subclass. Before, each could find none
    made and make its own: two ``FusedChainedMLP`` classes, one of them dropped from the cache, so
    ``type(a) is type(b)`` failed for two swapped copies. (The class's making is slowed down here
    to open the window a thread switch falls into.)"""
    import threading
    import time

    class Fresh(ChainedMLP):  # (a class no other test made a subclass of)
        pass

    made_forward = S._plain_mlp_forward

    def slow(*args):
        time.sleep(0.05)
        return made_forward(*args)

    monkeypatch.setattr(S, "_plain_mlp_forward", slow)
    barrier = threading.Barrier(4)
    got = []

    def swap():
        barrier.wait()
        got.append(S.fused_subclass(Fresh, S.FusedPlainMLP))

    threads = [threading.Thread(target=swap) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 4 and all(fused is got[0] for fused in got)
    assert S.fused_subclass(Fresh, S.FusedPlainMLP) is got[0]


def test_slices_of_a_swapped_sequential_ffn_are_torch_sequentials():
    """torch's Sequential slice is ``self.__class__(...)``: of a swapped FFN, a FusedSequentialFFN
    the swap never set up, whose forward raised KeyError '_fused_attn_reads' (``ffn[:2]``, the
    hidden features, and ``ffn[:]``) and which restore_modules passed over. A slice is now an
    nn.Sequential of the same children, running as torch's; the FFN itself stays fused, and
    copies and pickles as before."""
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Dropout(0.0), nn.Linear(48, D))
    ref = copy.deepcopy(ffn)
    fused_attn.swap_modules(ffn)
    x = torch.randn(B, L, D)
    for idx, width in ((slice(None, 2), D), (slice(None), D), (slice(None, -1), D), (slice(2, None), 48)):
        part = ffn[idx]
        assert type(part) is nn.Sequential and list(part) == list(ffn)[idx], idx
        xi = torch.randn(B, L, width)
        assert torch.equal(part(xi), ref[idx](xi)), idx
        report = fused_attn.restore_modules(part)
        assert not report.replaced and type(part) is nn.Sequential
    assert type(ffn[1]) is nn.ReLU and type(ffn[-1]) is nn.Linear
    assert type(ffn) is S.FusedSequentialFFN
    expected = fused_attn.functional.feed_forward(x, ffn[0].weight, ffn[0].bias, ffn[3].weight, ffn[3].bias,
                                                  activation="relu")
    assert torch.equal(ffn(x), expected)
    buffer = io.BytesIO()
    torch.save(ffn, buffer)
    buffer.seek(0)
    for again in (copy.deepcopy(ffn), torch.load(buffer, weights_only=False)):
        assert type(again) is S.FusedSequentialFFN and torch.equal(again(x), expected)
        assert type(again[:3]) is nn.Sequential


class _AttentionAndNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)
        self.norm = nn.LayerNorm(D)
        self.rms = nn.RMSNorm(D)

    def forward(self, x):
        return self.rms(self.norm(x + self.mha(x, x, x, need_weights=False)[0]))


class _DecoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = nn.TransformerDecoderLayer(D, H, 48, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.decoder(x, 2 * x)


FX_MODELS = {
    "sequential_ffn": lambda: nn.Sequential(nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Linear(48, D)),
                                            nn.Linear(D, D)),
    "encoder_layer": lambda: nn.Sequential(nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True)),
    "encoder": lambda: nn.Sequential(nn.TransformerEncoder(
        nn.TransformerEncoderLayer(D, H, 48, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False)),
    "decoder_layer": _DecoderBlock,
    "attention_and_norms": _AttentionAndNorms,
}


@pytest.mark.parametrize("name", sorted(FX_MODELS))
def test_torch_fx_traces_swapped_models_as_it_traced_them(name):
    """torch.fx.symbolic_trace of a model traced before the swap failed after it ("x must be a
    torch.Tensor, got Proxy"; a swapped encoder layer: "symbolically traced variables cannot be
    used as inputs to control flow"): FX makes leaves of torch.nn's modules only, and traced
    through the fused classes. Now the graph has the nodes it had before the swap (the swapped
    torch.nn modules leaves, a Sequential FFN traced through to its children), and the leaves
    it calls are the swapped modules: the GraphModule computes what the swapped model does."""
    import torch.fx as fx

    torch.manual_seed(0)
    model = FX_MODELS[name]().eval()
    x = torch.randn(B, L, D)

    def calls(graph_module):
        return [(n.op, n.target) for n in graph_module.graph.nodes]

    before = calls(fx.symbolic_trace(model))
    report = fused_attn.swap_modules(model)
    assert report.replaced and not report.left, report
    traced = fx.symbolic_trace(model)
    assert calls(traced) == before
    with torch.no_grad():
        if name == "sequential_ffn":  # (traced through: torch's Linear, ReLU, Linear, as before the swap)
            torch.testing.assert_close(traced(x), model(x))
        else:  # (the swapped modules themselves, called by the graph)
            assert torch.equal(traced(x), model(x))
    leaves = {target for op, target in before if op == "call_module"}
    for path, module in model.named_modules():
        if path in leaves:
            assert traced.get_submodule(path) is module


def test_torch_fx_traces_a_swapped_root_through_as_before():
    """The root of a trace is traced through (never a leaf): a swapped LayerNorm's, as its torch
    forward was before the swap."""
    import torch.fx as fx

    norm = nn.LayerNorm(D)
    fused_attn.swap_modules(norm)
    traced = fx.symbolic_trace(norm)
    x = torch.randn(B, L, D)
    torch.testing.assert_close(traced(x), norm(x))


def _set_after_swap(setting):
    """(model, the call) for a value set after the swap that the fused ops refuse and torch takes."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=True)
    models = {
        "sequential_dropout": (nn.Sequential(nn.Linear(D, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, D)), "2.p"),
        "plain_mlp_dropout": (NestedMLP(p_mid=0.1), "mid.p"),
        "layer_norm_eps": (nn.LayerNorm(D), "eps"),
        "rms_norm_eps": (nn.RMSNorm(D), "eps"),
        "mha_dropout": (mha, "dropout"),
        "encoder_ffn_dropout": (_encoder_layer(), "dropout.p"),
        "encoder_dropout1": (_encoder_layer(), "dropout1.p"),
        "pre_ln_encoder_dropout2": (_encoder_layer(norm_first=True), "dropout2.p"),
        "encoder_norm2_eps": (_encoder_layer(), "norm2.eps"),
        "pre_ln_encoder_norm1_eps": (_encoder_layer(norm_first=True), "norm1.eps"),
        "encoder_attention_dropout": (_encoder_layer(), "self_attn.dropout"),
        "decoder_norm3_eps": (nn.TransformerDecoderLayer(D, H, 48, dropout=0.0, batch_first=True), "norm3.eps"),
        "decoder_dropout2": (nn.TransformerDecoderLayer(D, H, 48, dropout=0.0, batch_first=True), "dropout2.p"),
    }
    return models[setting]


@pytest.mark.parametrize("setting", ["sequential_dropout", "plain_mlp_dropout", "layer_norm_eps", "rms_norm_eps",
                                     "mha_dropout", "encoder_ffn_dropout", "encoder_dropout1",
                                     "pre_ln_encoder_dropout2", "encoder_norm2_eps", "pre_ln_encoder_norm1_eps",
                                     "encoder_attention_dropout", "decoder_norm3_eps", "decoder_dropout2"])
def test_values_the_fused_ops_refuse_set_after_the_swap_run_torch(setting):
    """A dropout's p set to 1 or a norm's eps to 0 after the swap (values torch takes, and the
    swap leaves to torch when it finds them): every call raised "dropout_p must be in [0, 1)" or
    "eps must be a positive finite float". They are read at each call now, as the activation is:
    such a call runs torch's forward for that part, the rest stays fused (p = 1 zeroes all, so
    training is deterministic here)."""
    model, where = _set_after_swap(setting)
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model)
    assert report.replaced and not report.left, report
    owner, attr = where.rsplit(".", 1) if "." in where else ("", where)
    value = 0.0 if attr == "eps" else 1.0
    for m in (model, ref):
        setattr(m.get_submodule(owner), attr, value)
    model.train()
    ref.train()
    x = torch.randn(B, L, D)
    if isinstance(ref, nn.MultiheadAttention):
        run = lambda m: m(x, x, x, need_weights=False)[0]  # noqa: E731
    elif isinstance(ref, nn.TransformerDecoderLayer):
        run = lambda m: m(x, 2 * x)  # noqa: E731
    else:
        run = lambda m: m(x)  # noqa: E731
    torch.testing.assert_close(run(model), run(ref), atol=1e-5, rtol=1e-5)
