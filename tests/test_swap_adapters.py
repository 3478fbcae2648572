"""Adapters on fused modules: a layer wrapped by an adapter such as LoRA (PEFT's ``lora.Linear``
holds the Linear as ``base_layer`` and adds ``B(A(x))`` in its forward, while its ``weight`` is
the base layer's) must not be read as the plain layer it wraps. The fused modules read their
linears' parameters instead of calling them, so each one checks, at every call, that the linears
are still plain (``reference.reads_as_called``, ``swap.reads_intact``) and calls them otherwise;
``swap_modules`` leaves a module whose linears are wrapped already, and says why.

Every case compares with the same model without fused modules (float64 oracle, every gradient),
with adapters whose product is not zero: an adapter skipped would change the output."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import fused_attn
from fused_attn import reference
from fused_attn.testing import check_module_against_reference


class LoraLike(nn.Module):
    """PEFT's LoRA layer in miniature: base(x) + scale * B(A(x)), ``weight``/``bias`` the base's."""

    def __init__(self, base, rank=2, seed=0):
        super().__init__()
        self.base_layer = base
        d_in, d_out = (base.weight.shape[1], base.weight.shape[0]) if isinstance(base, nn.Linear) else base.weight.shape
        gen = torch.Generator().manual_seed(seed)
        self.lora_A = nn.Parameter(torch.randn(rank, d_in, generator=gen, dtype=base.weight.dtype) * 0.3)
        self.lora_B = nn.Parameter(torch.randn(d_out, rank, generator=gen, dtype=base.weight.dtype) * 0.3)

    @property
    def weight(self):
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def forward(self, x):
        return self.base_layer(x) + (x @ self.lora_A.t()) @ self.lora_B.t()


def wrap(model, names):
    """Wrap every child called one of ``names`` (as get_peft_model's target_modules do)."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in names and not isinstance(child, LoraLike):
                setattr(module, name, LoraLike(child, seed=count))
                count += 1
    assert count, f"no child named {names}"
    return model


@pytest.fixture(autouse=True)
def _no_rotary_patch_left_behind(monkeypatch):
    """swap_modules' RoPE patch of a Hugging Face model is module-level: undo it after each test.
    (And the swapped Llama MLP fuses the tiny batches here too.)"""
    from fused_attn.integrations import huggingface
    monkeypatch.setattr(huggingface, "GATED_MLP_MIN_TOKENS", 0)
    yield
    import sys
    for name, module in list(sys.modules.items()):
        fn = getattr(module, "apply_rotary_pos_emb", None) if name.startswith("transformers.models.") else None
        if fn is not None and hasattr(fn, "fused_attn_original"):
            module.apply_rotary_pos_emb = fn.fused_attn_original


def _check(fused, plain, x, run=None):
    fused.train()
    plain.train()
    check_module_against_reference(fused, plain, [x], run=run)


# ---------------------------------------------------------------------------------------------
# fused_attn's own modules, used directly
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("names", [("query_linear",), ("key_linear", "value_linear"), ("linear1",),
                                   ("linear2", "out_linear")])
def test_fused_transformer_with_adapters_matches_reference(names):
    torch.manual_seed(0)
    fused = fused_attn.Transformer(32, 4, 2, d_ff=48, num_kv_heads=2, activation="swiglu", backend="cpu")
    plain = reference.Transformer(32, 4, 2, d_ff=48, num_kv_heads=2, activation="swiglu")
    plain.load_state_dict(fused.state_dict())
    wrap(fused, names)
    wrap(plain, names)
    _check(fused, plain, torch.randn(2, 17, 32, dtype=torch.float64).float())


def test_fused_attention_with_adapter_in_packed_and_decoding_paths():
    torch.manual_seed(0)
    fused = fused_attn.MultiHeadAttention(32, 4, causal=True, backend="cpu")
    plain = reference.MultiHeadAttention(32, 4, causal=True)
    plain.load_state_dict(fused.state_dict())
    wrap(fused, ("value_linear",))
    wrap(plain, ("value_linear",))
    tokens, cu = torch.randn(20, 32), torch.tensor([0, 7, 20], dtype=torch.int32)
    torch.testing.assert_close(fused(tokens, cu_seqlens=cu), plain(tokens, cu_seqlens=cu), atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        caches = [m.new_kv_cache(2, 16) for m in (fused, plain)]
        outs = [m(x, kv_cache=c) for m, c in zip((fused, plain), caches)]
        outs += [m(x[:, :1], kv_cache=c) for m, c in zip((fused, plain), caches)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[2], outs[3], atol=1e-5, rtol=1e-5)


def test_reads_as_called():
    lin = nn.Linear(4, 4)
    assert reference.reads_as_called(lin)
    assert reference.reads_as_called(nn.MultiheadAttention(4, 2).out_proj)  # a subclass keeping Linear's forward
    assert not reference.reads_as_called(LoraLike(nn.Linear(4, 4)))
    assert not reference.reads_as_called(None)
    handle = lin.register_forward_hook(lambda m, i, o: o * 2)
    assert not reference.reads_as_called(lin)
    handle.remove()
    assert reference.reads_as_called(lin)
    # backward hooks too: the call attaches them to its tensors, so reading the weight skips them
    for register in (lin.register_full_backward_hook, lin.register_full_backward_pre_hook):
        handle = register(lambda *args: None)
        assert not reference.reads_as_called(lin) and reference.hook_kind(lin) == "backward hooks"
        handle.remove()
    assert reference.reads_as_called(lin) and reference.hook_kind(lin) is None


# ---------------------------------------------------------------------------------------------
# swapped torch.nn models
# ---------------------------------------------------------------------------------------------

def _torch_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=48, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


def _sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32))


@pytest.mark.parametrize("order", ["swap_then_wrap", "wrap_then_swap"])
@pytest.mark.parametrize("case", ["encoder_linear1", "encoder_linear2", "sequential_first", "sequential_last",
                                  "reference_ffn"])
def test_swapped_torch_models_with_adapters(case, order):
    build, names = {
        "encoder_linear1": (_torch_encoder, ("linear1",)),
        "encoder_linear2": (_torch_encoder, ("linear2",)),
        "sequential_first": (_sequential, ("0",)),
        "sequential_last": (_sequential, ("2",)),
        "reference_ffn": (lambda: reference.Transformer(32, 4, 1, d_ff=48), ("linear1",)),
    }[case]
    model = build()
    plain = wrap(copy.deepcopy(model), names)
    if order == "swap_then_wrap":
        report = fused_attn.swap_modules(model)
        assert report.replaced
        wrap(model, names)
    else:
        wrap(model, names)
        report = fused_attn.swap_modules(model)
        if case.startswith("encoder"):  # the layer is swapped, its FFN left to torch with the reason
            assert any("adapter such as LoRA" in note for _, _, _, note in report.replaced), report
        elif case.startswith("sequential"):
            assert any("adapter such as LoRA" in why for _, _, why in report.left), report
    _check(model, plain, torch.randn(2, 17, 32))


# ---------------------------------------------------------------------------------------------
# swapped Hugging Face models
# ---------------------------------------------------------------------------------------------

def _hf(family):
    transformers = pytest.importorskip("transformers")
    if family == "bert":
        cfg, auto = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=48, hidden_dropout_prob=0.0,
                                            attention_probs_dropout_prob=0.0), transformers.AutoModel
        names = ("dense",)
    elif family == "gpt2":
        cfg, auto = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                            embd_pdrop=0.0, attn_pdrop=0.0), transformers.AutoModel
        names = ("c_fc",)
    else:
        cfg, auto = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=48), transformers.AutoModel
        names = ("up_proj", "down_proj")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(cfg, attn_implementation="eager")
    return model, names


@pytest.mark.parametrize("order", ["swap_then_wrap", "wrap_then_swap"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_swapped_hugging_face_models_with_adapters(family, order, unswapped):
    model, names = _hf(family)
    plain = wrap(copy.deepcopy(model), names)
    if order == "swap_then_wrap":
        fused_attn.swap_modules(model)
        wrap(model, names)
    else:
        wrap(model, names)
        report = fused_attn.swap_modules(model)
        assert any("adapter such as LoRA" in why for _, _, why in report.left), report
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    model.train()
    plain.train()
    # (Llama's RoPE is fused module-level: the plain copy runs the original, put back for its calls)
    check_module_against_reference(model, plain, [],
                                   run=unswapped.run(model, lambda m: m(input_ids=ids).last_hidden_state))


def test_hooks_added_after_the_swap_send_calls_to_the_unfused_forward():
    model = _sequential()
    plain = copy.deepcopy(model)
    fused_attn.swap_modules(model)
    for m in (model, plain):
        m[2].register_forward_hook(lambda mod, inputs, out: out * 2.0)
    x = torch.randn(3, 32)
    torch.testing.assert_close(model(x), plain(x))


# ---------------------------------------------------------------------------------------------
# PEFT itself (a test dependency: ``pip install -e '.[hf]'``)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["swap_then_peft", "peft_then_swap"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_peft_lora_on_swapped_models(family, order, unswapped):
    peft = pytest.importorskip("peft")
    model, _ = _hf(family)
    targets = ["query", "value", "dense"] if family == "bert" else ["q_proj", "v_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False)  # random B: not a no-op
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(5)
        plain = peft.get_peft_model(copy.deepcopy(model), config)
        if order == "swap_then_peft":
            fused_attn.swap_modules(model)
            torch.manual_seed(5)
            peft_model = peft.get_peft_model(model, config)
        else:
            torch.manual_seed(5)
            peft_model = peft.get_peft_model(model, config)
            report = fused_attn.swap_modules(peft_model)
            # the transformers model inside PeftModel gets the fused attention
            assert any(new == type(peft_model.base_model.model).__name__ and "fused_attn" in note
                       for _, _, new, note in report.replaced), report
            assert any("peft.tuners.lora" in why for _, _, why in report.left), report
    peft_model.load_state_dict(plain.state_dict())
    inner = peft_model.base_model.model
    assert inner.config._attn_implementation == "fused_attn"
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    for m in (peft_model, plain):
        m.train()
    out = peft_model(input_ids=ids).last_hidden_state
    with unswapped.functions():  # (the RoPE swapped module-level: the plain model runs the original)
        ref = plain(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    grads = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)  # PEFT trains the adapters only
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-4, rtol=1e-4)
    fused_attn.restore_modules(peft_model)
    assert inner.config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------------------
# models whose attention does not go through transformers' interface
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["BloomConfig", "FalconConfig", "MptConfig"])
def test_models_with_their_own_attention_are_reported_left(name):
    transformers = pytest.importorskip("transformers")
    cfg = getattr(transformers, name)()
    for key, value in dict(hidden_size=32, n_embed=32, d_model=32, n_layer=1, num_hidden_layers=1, n_layers=1,
                           n_head=4, num_attention_heads=4, n_heads=4, vocab_size=100).items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg).eval()
    before = model.config._attn_implementation
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        report = fused_attn.swap_modules(model)
        out = model(input_ids=ids).last_hidden_state
    assert model.config._attn_implementation == before
    assert not any("attn_implementation" in note for _, _, _, note in report.replaced), report
    (why,) = [why for path, _, why in report.left if "attention interface" in why]
    assert ("patch_sdpa" in why) == (name == "FalconConfig")  # Falcon calls SDPA itself
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_offloaded_swapped_model_reads_weights_its_hooks_bring_in():
    """accelerate's cpu_offload keeps the weights on the meta device and replaces each module's
    forward on the instance with one that brings them in first: the fused forwards must call
    such children rather than read their (meta) weights."""
    accelerate = pytest.importorskip("accelerate")
    model, _ = _hf("llama")
    model.eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        fused_attn.swap_modules(model)
        model = accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
        assert {p.device.type for p in model.parameters()} == {"meta"}
        out = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
