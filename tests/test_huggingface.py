"""The Hugging Face integration on tiny models built from configs (no downloads)."""
import contextlib
import copy
import gc
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import fused_attn  # noqa: E402
from fused_attn.integrations import huggingface as hf  # noqa: E402
from fused_attn.testing import check_module_against_reference  # noqa: E402

VOCAB, B, L = 100, 2, 11


def _bert(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3, max_position_embeddings=64)
    cfg.update(kw)
    return transformers.BertConfig(**cfg), transformers.AutoModelForSequenceClassification


def _gpt2(**kw):
    cfg = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg.update(kw)
    return transformers.GPT2Config(**cfg), transformers.AutoModelForCausalLM


def _llama(**kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, max_position_embeddings=64)
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg), transformers.AutoModelForCausalLM


FAMILIES = {"bert": _bert, "gpt2": _gpt2, "llama": _llama}


def _build(family, attn="eager", seed=0, **kw):
    cfg, auto = FAMILIES[family](**kw)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_config(cfg, attn_implementation=attn)


def _batch(family):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, -4:] = 0  # right padding: no query row is left without keys, also under the causal mask
    return ids, mask


def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits


def _perturb_norms(model):
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
    hf.register()
    monkeypatch.setattr(hf, "GATED_MLP_MIN_TOKENS", 0)  # the tiny batches here take the fused MLP too
    yield
    # swap_modules' RoPE patch is module-level: no test leaves it behind for the next
    import sys
    for name, module in list(sys.modules.items()):
        fn = getattr(module, "apply_rotary_pos_emb", None) if name.startswith("transformers.models.") else None
        if fn is not None and hasattr(fn, "fused_attn_original"):
            module.apply_rotary_pos_emb = fn.fused_attn_original


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_attn_implementation_matches_eager(family, monkeypatch):
    ref = _build(family)
    model = _build(family, attn="fused_attn")
    model.load_state_dict(ref.state_dict())
    assert model.config._attn_implementation == "fused_attn"
    calls = []
    real = hf.attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw["attn_mask"] is not None, kw["causal"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf, "attention", spy)
    ids, mask = _batch(family)
    check_module_against_reference(model, ref, [], run=lambda m: _logits(m, ids, mask))
    assert calls, "the model did not call fused_attn's attention"
    if family == "llama":  # grouped-query heads reach the op unrepeated
        assert calls[0][:2] == (4, 2)
    calls.clear()
    check_module_against_reference(model, ref, [], run=lambda m: _logits(m, ids, None))
    if family != "bert":  # no padding: causal flag, no mask tensor
        assert calls[0][2:] == (False, True)


def test_set_attn_implementation_on_a_built_model(monkeypatch):
    model = _build("bert", attn="sdpa")
    ref = copy.deepcopy(model)
    model.set_attn_implementation("fused_attn")
    calls = []
    real = hf.attention
    monkeypatch.setattr(hf, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids, mask = _batch("bert")
    check_module_against_reference(model, ref, [], run=lambda m: _logits(m, ids, mask))
    assert len(calls) >= 2


def test_attention_function_masks_scaling_and_dropout():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    class Module(torch.nn.Module):
        is_causal = False
        num_key_value_groups = 2

    module = Module()
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(B, 4, L, 8, generator=gen)
    k, v = torch.randn(2, B, 2, L, 8, generator=gen)
    additive = torch.randn(B, 1, L, L, generator=gen)
    keep = torch.rand(B, 1, L, L, generator=gen) > 0.3
    keep[..., 0] = True
    for mask in (additive, keep, None):
        out, weights = hf.fused_attention_forward(module, q, k, v, mask, scaling=0.3)
        expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
        assert weights is None and out.shape == (B, L, 4, 8) and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out, _ = hf.fused_attention_forward(module, q, k, v, None, is_causal=True)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, is_causal=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    dropped, _ = hf.fused_attention_forward(module, q, k, v, None, dropout=0.5)
    assert not torch.allclose(dropped, hf.fused_attention_forward(module, q, k, v, None)[0])
    # a dropout of 1 (a config's, or a module's set after the swap) drops every weight, as sdpa's:
    # zeros and zero gradients (the kernels take p < 1: it raised)
    q.requires_grad_()
    for mask in (additive, None):
        out, _ = hf.fused_attention_forward(module, q, k, v, mask, dropout=1.0)
        expected, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=1.0)
        assert torch.equal(out, expected) and not out.any()
        out.sum().backward()
        assert q.grad is not None and not q.grad.any()


SWAP_EXPECTED = {
    "bert": {"FusedBertLayer", "FusedBertSelfOutput", "FusedLayerNorm"},
    "gpt2": {"FusedGPT2MLP", "FusedLayerNorm"},
    "llama": {"FusedLlamaMLP", "FusedLlamaRMSNorm", "fused_attn.apply_rotary_emb"},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_swap_modules_matches_unswapped_model(family, unswapped):
    kw = {"hidden_act": "silu"} if family == "llama" else {}
    model = _build(family, **kw)
    _perturb_norms(model)
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    report = fused_attn.swap_modules(model)
    assert {new for _, _, new, _ in report.replaced if new != type(model).__name__} == SWAP_EXPECTED[family]
    assert not report.left
    assert model.config._attn_implementation == "fused_attn"
    assert all(params[n] is p for n, p in model.named_parameters())
    model.train()  # dropout probabilities are 0: train mode is deterministic too
    ref.train()
    ids, mask = _batch(family)
    check_module_against_reference(model, ref, [], run=unswapped.run(model, lambda m: _logits(m, ids, mask)))
    fused_attn.restore_modules(model)
    assert model.config._attn_implementation == "eager"
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]


def test_llama_geglu_and_bias_and_bert_without_norm_fusion():
    model = _build("llama", hidden_act="gelu", mlp_bias=True)
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model, attention=False, norm=False, rotary=False)
    assert [note for _, _, new, note in report.replaced] == ["FFN geglu", "FFN geglu"]
    assert model.config._attn_implementation == "eager"
    ids, mask = _batch("llama")
    check_module_against_reference(model, ref, [], run=lambda m: _logits(m, ids, mask))

    model = _build("bert", hidden_act="gelu_new")
    _perturb_norms(model)
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model, attention=False, norm=False)
    assert [note for _, _, _, note in report.replaced] == ["FFN gelu_tanh", "FFN gelu_tanh"]
    # 2 self-outputs, their LayerNorms and the embeddings LayerNorm
    assert sum("norm=False" in why for _, _, why in report.left) == 5
    ids, mask = _batch("bert")
    check_module_against_reference(model, ref, [], run=lambda m: _logits(m, ids, mask))


def test_unsupported_activation_and_edited_code_are_left():
    model = _build("llama", hidden_act="relu2")
    report = fused_attn.swap_modules(model, attention=False)
    assert sum("has no fused form" in why for _, _, why in report.left) == 2

    from transformers.models.bert import modeling_bert

    class EditedSelfOutput(modeling_bert.BertSelfOutput):
        def forward(self, hidden_states, input_tensor):  # not BERT's code: must not be fused
            return self.LayerNorm(self.dense(hidden_states) * 2 + input_tensor)

    model = _build("bert")
    model.bert.encoder.layer[0].attention.output.__class__ = EditedSelfOutput
    report = fused_attn.swap_modules(model)
    paths = [path for path, *_ in report.replaced]
    assert "bert.encoder.layer.0.attention.output" not in paths
    assert "bert.encoder.layer.1.attention.output" in paths


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_swapped_model_compiles_fullgraph(family, unswapped):
    """A swapped BERT, and a swapped Llama (attention, RMSNorm, SwiGLU and the fused RoPE), in one
    graph, forward and backward, with the eager model's numbers. (The unswapped copy runs with the
    modeling module's own RoPE put back: it ran the fused one, patched module-level, too.)"""
    model = _build(family, num_hidden_layers=1)
    ref = copy.deepcopy(model)
    fused_attn.swap_modules(model)
    ids, mask = _batch(family)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = _logits(compiled, ids, mask)
        with unswapped.functions():
            expected = _logits(ref, ids, mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        out.sum().backward()
        expected.sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    finally:
        torch._dynamo.reset()


def _eager_and_fused(cfg):
    """An eager model and a fused_attn one with the same weights, each with its own copy of ``cfg``:
    models built from one config object share it, and the attention implementation is read from it
    at run time, so the second build would switch the first to fused_attn too (and a comparison with
    "eager" would compare fused_attn with itself)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager")
        model = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="fused_attn")
    model.load_state_dict(ref.state_dict())
    assert ref.config._attn_implementation == "eager" and model.config._attn_implementation == "fused_attn"
    return ref, model


def test_gemma2_softcap_and_sliding_window_match_eager(monkeypatch):
    """Gemma 2: logit soft-capping (a cap of 0.5 bites on these logits) and sliding-window layers
    (window 4 < the 11 tokens) reach fused_attn's attention and give eager's logits and gradients."""
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
                                    sliding_window=4, attn_logit_softcapping=0.5, final_logit_softcapping=None)
    ref, model = _eager_and_fused(cfg)
    with torch.no_grad():  # logits of a few units, so that a cap of 0.5 changes them
        for layer in ref.model.layers:
            layer.self_attn.q_proj.weight.mul_(20)
            layer.self_attn.k_proj.weight.mul_(20)
    model.load_state_dict(ref.state_dict())
    caps = []
    real = hf.attention

    def spy(q, k, v, **kw):
        caps.append(kw["softcap"])
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf, "attention", spy)
    ids, mask = _batch("llama")
    # two padded tokens, fewer than the window: every query row keeps a key to attend (eager gives a
    # row without one a uniform average of its masked keys; fused_attn zeros, as documented)
    mask[1, :-2] = 1
    check_module_against_reference(model, ref, [], run=lambda m: _logits(m, ids, mask))
    assert caps and all(c == 0.5 for c in caps)
    # without the cap the answer differs: the test can tell
    without = copy.deepcopy(model)
    without.config.attn_logit_softcapping = None
    for layer in without.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert not torch.allclose(_logits(without, ids, mask), _logits(ref, ids, mask), atol=1e-3)


def test_packed_sequences_run_varlen_and_match_separate_runs(monkeypatch):
    """Packed training input (one row of several sequences, position ids restarting, transformers'
    flash-attention kwargs cu_seq_lens_q/k and max_length_q/k, as ``DataCollatorWithFlattening``
    produces): the layers call ``attention_varlen`` and each sequence's logits and the gradients are
    those of running the sequences one by one in eager mode."""
    lens = [4, 9, 1, 6]
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lens]
    ref = _build("llama", "eager")
    model = _build("llama", "fused_attn")
    model.load_state_dict(ref.state_dict())
    calls = []
    real = hf.attention_varlen

    def spy(*args, **kw):
        calls.append(kw["causal"])
        return real(*args, **kw)

    monkeypatch.setattr(hf, "attention_varlen", spy)
    cu = torch.tensor([0, 4, 13, 14, 20], dtype=torch.int32)
    packed = model(input_ids=torch.cat(seqs, 1), position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                   cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9).logits
    assert calls and all(calls)  # every layer took the packed path, causally
    separate = torch.cat([ref(input_ids=s).logits for s in seqs], 1)
    torch.testing.assert_close(packed, separate, atol=2e-5, rtol=1e-4)
    packed.square().sum().backward()
    separate.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=name)


def test_packed_mistral_sliding_window_matches_separate_runs():
    """The packed path maps transformers' sliding_window (keys with q - k < window) to the kernels'
    window: a tiny Mistral with a window of 3, shorter than most of the packed sequences."""
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                                     sliding_window=3)
    ref, model = _eager_and_fused(cfg)
    lens = [7, 2, 10]
    gen = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lens]
    cu = torch.tensor([0, 7, 9, 19], dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs, 1), position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                       cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=10, max_length_k=10).logits
        separate = torch.cat([ref(input_ids=s).logits for s in seqs], 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg.sliding_window = None
            unwindowed = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
        unwindowed.load_state_dict(ref.state_dict())
        full = torch.cat([unwindowed(input_ids=s).logits for s in seqs], 1)
    torch.testing.assert_close(packed, separate, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(full, separate, atol=1e-3)  # the window matters here: the test can tell


def _gpt_oss_config():
    """A tiny gpt-oss: a sliding-window layer (window 4) and a full one, grouped-query heads, MoE."""
    return transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, intermediate_size=32, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"])


def test_gpt_oss_attention_sinks_match_eager(monkeypatch):
    """gpt-oss: its per-head attention sinks (``s_aux``) reach fused_attn's attention as ``sinks``,
    on sliding-window and full layers with left padding, and give eager's logits and gradients, the
    sinks' own gradients included. Sinks of a few units, so that they take much of each row."""
    ref, model = _eager_and_fused(_gpt_oss_config())
    with torch.no_grad():
        for m in (ref, model):
            for i, layer in enumerate(m.model.layers):
                layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]) + i)
    seen = []
    real = hf.attention

    def spy(q, k, v, **kw):
        seen.append(kw["sinks"])
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf, "attention", spy)
    ids, mask = _batch("llama")
    mask = mask.flip(1)  # left padding: those query rows see no key, and the sink takes them whole (zeros)
    # (float32 against eager: gpt-oss's expert GEMMs (grouped_mm) take no float64, so no float64 oracle)
    for params in (model.parameters(), ref.parameters()):
        for p in params:
            p.grad = None
    got, want = _logits(model, ids, mask), _logits(ref, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    got.backward(g)
    want.backward(g)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert all(float(layer.self_attn.sinks.grad.abs().max()) > 0 for layer in model.model.layers)
    assert seen and all(s is not None and s.shape == (4,) for s in seen)
    with torch.no_grad():  # without the sinks the answer differs: the test can tell
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)
        assert not torch.allclose(_logits(model, ids, mask), _logits(ref, ids, mask), atol=1e-3)


def test_packed_gpt_oss_sinks_match_separate_eager_runs():
    """Packed gpt-oss input (transformers' flash-attention kwargs): the sinks reach
    ``attention_varlen`` too, and each sequence's logits are eager's on it alone."""
    ref, model = _eager_and_fused(_gpt_oss_config())
    with torch.no_grad():
        for m in (ref, model):
            for layer in m.model.layers:
                layer.self_attn.sinks.copy_(torch.tensor([2.0, -1.0, 0.5, 3.0]))
    lens = [5, 1, 9]
    gen = torch.Generator().manual_seed(8)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lens]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    with torch.no_grad():
        packed = model(input_ids=torch.cat(seqs, 1), position_ids=torch.cat([torch.arange(n) for n in lens])[None],
                       cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9).logits
        separate = torch.cat([ref(input_ids=s).logits for s in seqs], 1)
    torch.testing.assert_close(packed, separate, atol=2e-5, rtol=1e-4)


def _rotary_calls(monkeypatch):
    import fused_attn.rotary as rotary
    calls = []
    original = rotary.rotate
    monkeypatch.setattr(rotary, "rotate", lambda x4, *a: (calls.append(tuple(x4.shape)), original(x4, *a))[1])
    return calls


@pytest.mark.parametrize("config", ["llama", "mistral", "qwen2", "falcon", "gpt_neox"])
def test_llama_family_rope_runs_fused_and_is_restored(config, monkeypatch, unswapped):
    """swap_modules routes the modeling module's apply_rotary_pos_emb (Llama's code in Llama,
    Mistral, Qwen2 and Falcon, whose docstring differs; GPT-NeoX's partial rotary, a quarter of each
    head here) to the fused op: the same logits, gradients and greedy generation (the decoding
    steps' one-token tables included) as the untouched model; restore_modules puts the very
    function back."""
    kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, max_position_embeddings=64, rope_theta=500.0)
    if config == "falcon":
        kw.update(new_decoder_architecture=True, num_kv_heads=2, bias=False)
    if config == "gpt_neox":
        kw.update(rotary_pct=0.25, use_parallel_residual=True)
        kw.pop("num_key_value_heads")
    cfg = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "falcon": transformers.FalconConfig,
           "gpt_neox": transformers.GPTNeoXConfig}[config](**kw)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    ref = copy.deepcopy(model)
    module = __import__(type(model).__module__, fromlist=["apply_rotary_pos_emb"])
    original = module.apply_rotary_pos_emb
    report = fused_attn.swap_modules(model, attention=False, norm=False, ffn=False)
    assert [(old, new) for _, old, new, _ in report.replaced] == [
        (f"modeling_{config}.apply_rotary_pos_emb", "fused_attn.apply_rotary_emb")]
    calls = _rotary_calls(monkeypatch)
    ids, mask = _batch("llama")
    check_module_against_reference(model, ref, [], run=unswapped.run(model, lambda m: _logits(m, ids, mask)))
    heads_k = 2 if config in ("llama", "mistral", "qwen2") else 4  # (Falcon repeats its K/V heads first)
    assert calls and calls[0] == (B, L, 4, 8) and calls[1] == (B, L, heads_k, 8)  # q, then k, as (B, L, H, D)
    calls.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        out = model.generate(ids[:, :5], attention_mask=mask[:, :5], **greedy)
        with unswapped.functions():
            assert torch.equal(out, ref.generate(ids[:, :5], attention_mask=mask[:, :5], **greedy))
    assert (B, 1, 4, 8) in calls  # the decoding steps ran fused
    fused_attn.restore_modules(model)
    assert module.apply_rotary_pos_emb is original


def test_llama_rope_with_per_row_position_ids_matches_unswapped(monkeypatch):
    """Per-row position_ids make Hugging Face's cos/sin (B, L, D) tables, one per batch row: the
    fused RoPE turns each row by its own table rows, and the logits equal the unswapped model's.
    Row 1 restarts its positions mid-row (two documents packed in one row): a row shifted as a
    whole would not tell (RoPE sees only relative positions), so reading the first row's tables
    for every row went unnoticed with (1, L, D) tables, rows that agree, or left padding."""
    model = _build("llama")
    ids, _ = _batch("llama")
    position_ids = torch.stack([torch.arange(L), torch.cat([torch.arange(5), torch.arange(L - 5)])])
    with torch.no_grad():  # before the swap: the swap patches the modeling module, every Llama's RoPE
        expected = model(input_ids=ids, position_ids=position_ids).logits
        shifted = model(input_ids=ids, position_ids=torch.arange(L).expand(B, L)).logits
    assert (shifted[1] - expected[1]).abs().max() > 1e-4  # the positions matter at this size
    fused_attn.swap_modules(model, attention=False, norm=False, ffn=False)
    calls = _rotary_calls(monkeypatch)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=position_ids).logits
    assert calls  # the fused rotation ran
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_rope_swap_is_module_level_and_other_layouts_are_left(monkeypatch):
    """The fused function belongs to the modeling module: a second model of the family finds it
    fused (and its restore leaves it to the first, which holds it too); rotary=False leaves it; calls outside the
    covered shapes run the original; Cohere's form (interleaved pairs, computed in float32) is
    left."""
    from transformers.models.llama import modeling_llama
    original = modeling_llama.apply_rotary_pos_emb
    first, second = _build("llama"), _build("llama")
    assert not [r for r in fused_attn.swap_modules(first, rotary=False).replaced if "rotary" in r[1]]
    assert modeling_llama.apply_rotary_pos_emb is original
    fused_attn.swap_modules(first)
    fused = modeling_llama.apply_rotary_pos_emb
    assert fused is not original and fused.fused_attn_original is original
    report = fused_attn.swap_modules(second)
    assert ("", "modeling_llama.apply_rotary_pos_emb", "fused rotary, by another model's swap_modules: "
            "module-level, it runs on backend=None while that model holds it") in report.already
    fused_attn.restore_modules(second)
    assert modeling_llama.apply_rotary_pos_emb is fused
    calls = _rotary_calls(monkeypatch)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    for args, kwargs in (((q, k, cos.requires_grad_(), sin), {}), ((q, k, cos[:, :3], sin[:, :3]), {}),
                         ((q, k, cos, sin), {"unsqueeze_dim": 0}),
                         ((q, k, cos.detach().double(), sin.double()), {})):  # promoted by transformers' formula
        try:
            expected = original(*args, **kwargs)
        except RuntimeError:
            with pytest.raises(RuntimeError):
                fused(*args, **kwargs)
            continue
        for a, b in zip(fused(*args, **kwargs), expected):
            assert torch.equal(a, b)
    # tables carrying a forward-mode tangent (jvp over the angles) are left to transformers' formula
    # too, which differentiates them (the fused op would refuse them)
    tangent = torch.randn_like(sin)
    got = torch.func.jvp(lambda s: fused(q, k, cos.detach(), s), (sin,), (tangent,))
    expected = torch.func.jvp(lambda s: original(q, k, cos.detach(), s), (sin,), (tangent,))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert calls == []  # all five ran transformers' own function
    fused_attn.restore_modules(first)
    assert modeling_llama.apply_rotary_pos_emb is original

    cfg = transformers.CohereConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=48, max_position_embeddings=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cohere = transformers.AutoModelForCausalLM.from_config(cfg)
    report = fused_attn.swap_modules(cohere, attention=False, norm=False, ffn=False)
    assert [row for row in report.left if "rotary" in row[1]] == [
        ("", "modeling_cohere.apply_rotary_pos_emb", "not Llama's or GPT-NeoX's apply_rotary_pos_emb (another layout "
                                                     "or rounding)")]


def _rotary_backends(monkeypatch):
    """The backends the fused RoPE ran on, call by call."""
    import fused_attn.rotary as rotary
    ran = []
    original = rotary.rotate
    monkeypatch.setattr(rotary, "rotate", lambda x4, cos, sin, pos, inter, backend, *a:
                        (ran.append(backend), original(x4, cos, sin, pos, inter, backend, *a))[1])
    return ran


def test_rope_patch_is_held_by_each_model_that_swapped_it_and_goes_with_the_last(monkeypatch):
    """The module-level RoPE function is held by every model whose swap installed it or found it
    installed: it runs on the backend of the first one still alive, and it is put back when the last
    one is restored or garbage-collected. Before, a second model's swap found it fused and did not
    hold it: once the first was collected unrestored, the second kept running on the dead model's
    backend, and its restore left the function in place for good (as did the first's death alone)."""
    from transformers.models.llama import modeling_llama
    original = modeling_llama.apply_rotary_pos_emb
    ids, mask = _batch("llama")
    ran = _rotary_backends(monkeypatch)

    def run(model):
        ran.clear()
        with torch.no_grad():
            _logits(model, ids, mask)
        return set(ran)

    def swap(model, backend=None):
        return fused_attn.swap_modules(model, attention=False, norm=False, ffn=False, backend=backend)

    first, second = _build("llama", num_hidden_layers=1), _build("llama", num_hidden_layers=1)
    swap(first, "reference")
    report = swap(second, "cpu")
    rows = [row for row in report.already + report.left if "rotary" in row[1]]
    assert len(rows) == 1 and rows[0] in report.already and "backend='reference'" in rows[0][2], report
    assert run(second) == {"reference"}  # module-level: the first holder's backend, as said
    del first
    gc.collect()
    assert modeling_llama.apply_rotary_pos_emb is not original  # the second still holds it
    assert run(second) == {"cpu"}  # ...on its own backend now, not the dead model's
    restored = fused_attn.restore_modules(second)
    assert modeling_llama.apply_rotary_pos_emb is original
    assert ("", "modeling_llama.apply_rotary_pos_emb", "apply_rotary_pos_emb", "transformers' own") in restored.replaced

    # the last holder collected unrestored takes the patch with it
    lone = _build("llama", num_hidden_layers=1)
    swap(lone)
    assert modeling_llama.apply_rotary_pos_emb is not original
    del lone
    gc.collect()
    assert modeling_llama.apply_rotary_pos_emb is original

    # restoring one of two holders leaves it to the other; a restored model swapped again holds it again
    a, b = _build("llama", num_hidden_layers=1), _build("llama", num_hidden_layers=1)
    swap(a, "cpu")
    swap(b, "reference")
    kept = fused_attn.restore_modules(a)
    assert modeling_llama.apply_rotary_pos_emb is not original and run(b) == {"reference"}
    assert [row for row in kept.left if "rotary" in row[1]], kept  # said why it stays
    swap(a, "cpu")
    fused_attn.restore_modules(b)
    assert modeling_llama.apply_rotary_pos_emb is not original and run(a) == {"cpu"}
    # a copy lists the function but does not hold it: its restore leaves it to the model
    clone = copy.deepcopy(a)
    fused_attn.restore_modules(clone)
    assert modeling_llama.apply_rotary_pos_emb is not original
    fused_attn.restore_modules(a)
    assert modeling_llama.apply_rotary_pos_emb is original


def test_rope_holder_collected_during_a_swap_is_synced_after_it():
    """A holder's collection may run its callback while a swap or restore holds the patches' lock
    (on this thread, any allocation can collect): it is queued, not run there (taking the lock
    again would deadlock), and the patch is synced once the lock is released."""
    from transformers.models.llama import modeling_llama
    original = modeling_llama.apply_rotary_pos_emb
    lone = _build("llama", num_hidden_layers=1)
    fused_attn.swap_modules(lone, attention=False, norm=False, ffn=False)
    with hf._rotary_locked():
        del lone
        gc.collect()
        assert modeling_llama.apply_rotary_pos_emb is not original  # queued
    assert modeling_llama.apply_rotary_pos_emb is original


PLAIN_MLP_MODELS = {
    # config, auto class, the MLP class swap_modules reads as Linear -> act -> [Dropout] -> Linear -> [Dropout]
    "gpt_neox": (lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=72,
                                                     max_position_embeddings=64, hidden_act="gelu"),
                 transformers.AutoModelForCausalLM, "FusedGPTNeoXMLP"),
    "phi": (lambda: transformers.PhiConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=72, max_position_embeddings=64, hidden_act="gelu_new",
                                           resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
            transformers.AutoModelForCausalLM, "FusedPhiMLP"),
    "gptj": (lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                             rotary_dim=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
             transformers.AutoModelForCausalLM, "FusedGPTJMLP"),
    # GPT-2's MLP forward over nn.Linear children (not Conv1D): read as a plain chain, weights untransposed
    "gpt_bigcode": (lambda: transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                          n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                                                          attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
                    transformers.AutoModelForCausalLM, "FusedGPTBigCodeMLP"),
    # over FalconLinear, an nn.Linear subclass whose forward is nn.Linear's product and sum
    # (``x @ W.T + b``): it was read as an activation, so the MLP was neither fused nor listed
    "falcon": (lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=4, max_position_embeddings=64,
                                                 hidden_dropout=0.0, attention_dropout=0.0),
               transformers.AutoModelForCausalLM, "FusedFalconMLP"),
}


@pytest.mark.parametrize("name", sorted(PLAIN_MLP_MODELS))
def test_plain_chain_mlps_of_hugging_face_models_are_fused(name, monkeypatch, unswapped):
    """GPT-NeoX's, Phi's, GPT-J's, GPTBigCode's and Falcon's MLPs are read from their forward (Linear ->
    activation -> Linear [-> Dropout]) and fused (each call runs the fused op: the swapped MLP
    read its layout from its fused class, found none and ran its own forward); the swapped model
    gives the untouched model's logits and gradients. GPTBigCode's has GPT-2's forward code over
    nn.Linear children: GPT-2's own conversion (Conv1D weights, passed transposed) must not claim it."""
    make_config, auto, fused_name = PLAIN_MLP_MODELS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = auto.from_config(make_config(), attn_implementation="eager")
    _perturb_norms(model)
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model)
    assert sum(new == fused_name for _, _, new, _ in report.replaced) == 2, str(report)
    model.eval()
    ref.eval()
    ids, mask = _batch("llama")
    from fused_attn import swap
    calls = []
    real = swap.feed_forward
    monkeypatch.setattr(swap, "feed_forward", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    with torch.no_grad():
        _logits(model, ids, mask)
    assert len(calls) == 2, calls  # one per layer
    monkeypatch.setattr(swap, "feed_forward", real)
    # (GPT-NeoX's and Falcon's RoPE is fused module-level: the reference runs the original)
    check_module_against_reference(model, ref, [], run=unswapped.run(model, lambda m: _logits(m, ids, mask)))
    fused_attn.restore_modules(model)
    assert [type(m) for m in model.modules()] == [type(m) for m in ref.modules()]


def test_swapped_modules_take_the_original_arguments(monkeypatch):
    """The swapped transformers modules take the original forward's arguments under its names:
    GPT-NeoX's MLP its ``hidden_states`` (the plain MLP's fused forward took ``x``, and
    ``mlp(hidden_states=h)`` raised TypeError), BERT's, GPT-2's and Llama's fused classes theirs."""
    import inspect

    from fused_attn import swap
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXMLP

    mlp = GPTNeoXMLP(transformers.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4))
    ref = copy.deepcopy(mlp)
    assert len(fused_attn.swap_modules(mlp, backend="cpu").replaced) == 1
    calls = []
    real = swap.feed_forward
    monkeypatch.setattr(swap, "feed_forward", lambda *a, **k: calls.append(k["activation"]) or real(*a, **k))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(hidden_states=x), ref(hidden_states=x), rtol=1e-5, atol=1e-5)
    assert calls == ["gelu"]
    with pytest.raises(TypeError, match="unexpected keyword argument 'x'"):
        mlp(x=x)

    def parameters(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]
    bert, gpt2, llama = hf._known()
    for mixin, cls, method in ((hf.FusedDenseDropoutNorm, bert.BertSelfOutput, "forward"),
                               (hf.FusedBertFeedForward, bert.BertLayer, "feed_forward_chunk"),
                               (hf.FusedGPT2MLP, gpt2.GPT2MLP, "forward"), (hf.FusedLlamaMLP, llama.LlamaMLP, "forward"),
                               (hf.FusedLlamaRMSNorm, llama.LlamaRMSNorm, "forward"),
                               (swap.FusedPlainMLP, GPTNeoXMLP, "forward")):
        fused = swap.fused_subclass(cls, mixin)
        assert parameters(getattr(fused, method)) == parameters(getattr(cls, method)), (mixin, cls)


def test_code_comparison_survives_source_lines_that_are_not_the_function(monkeypatch):
    """inspect.getsource reads a function's file as it is now: a file edited after its import (or
    lines that moved) gives other statements, and the comparison then answers "not the known
    code" rather than raising AttributeError from the swap."""
    import inspect

    from fused_attn.integrations import huggingface as hf

    def known(input):
        return input

    monkeypatch.setattr(inspect, "getsource", lambda f: "x = 1\n")
    assert hf._same_body(known, known) is False


def test_falcon_linear_is_read_as_a_linear_by_its_code():
    """FalconLinear counts as nn.Linear because its forward's code is the known one (``input @
    W.T``, then ``+ bias``): an nn.Linear subclass of transformers with other code is not."""
    from transformers.models.falcon.modeling_falcon import FalconLinear

    from fused_attn import swap

    class OtherLinear(torch.nn.Linear):
        def forward(self, input):
            return (input @ self.weight.T) * 2

    OtherLinear.__module__ = "transformers.models.other.modeling_other"
    assert swap.linear_like(FalconLinear(4, 4)) and not swap.linear_like(OtherLinear(4, 4))
    layer = FalconLinear(32, 48)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_swapped_model_saved_whole_loads_in_a_fresh_process(tmp_path):
    """torch.save of a whole swapped model (BERT's fused blocks, GPT-NeoX's plain MLP: classes a
    swap makes at run time) loads in a process that never swapped anything, still fused, and
    gives the saved logits."""
    import subprocess
    import sys

    for name, (make_config, auto) in {"bert": (lambda: _bert()[0], transformers.AutoModelForSequenceClassification),
                                      "gpt_neox": PLAIN_MLP_MODELS["gpt_neox"][:2]}.items():
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto.from_config(make_config(), attn_implementation="eager").eval()
        fused_attn.swap_modules(model)
        ids, mask = _batch("bert")
        with torch.no_grad():
            expected = _logits(model, ids, mask)
        torch.save({"model": model, "ids": ids, "mask": mask, "logits": expected}, tmp_path / f"{name}.pt")
        script = (
            "import sys, torch, fused_attn.swap as S\n"
            f"saved = torch.load(sys.argv[1], weights_only=False)\n"
            "m = saved['model']\n"
            "fused = sorted({type(x).__name__ for x in m.modules() if type(x).__module__ == 'fused_attn.swap'})\n"
            "with torch.no_grad():\n"
            "    out = m(input_ids=saved['ids'], attention_mask=saved['mask']).logits\n"
            "assert fused, 'nothing fused after loading'\n"
            "assert torch.allclose(out, saved['logits'], rtol=1e-5, atol=1e-6), (out - saved['logits']).abs().max()\n"
            "print(' '.join(fused))\n")
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{name}.pt")], capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("FusedBertLayer" if name == "bert" else "FusedGPTNeoXMLP") in done.stdout.split()


def test_attention_only_swap_saved_whole_runs_in_a_fresh_process(tmp_path):
    """A model whose only swap is its attention implementation (no fused class in the pickle)
    still finds "fused_attn" registered after torch.load in a fresh process."""
    import subprocess
    import sys

    model = _build("llama").eval()
    fused_attn.swap_modules(model, norm=False, ffn=False, rotary=False)
    ids, mask = _batch("llama")
    with torch.no_grad():
        expected = _logits(model, ids, mask)
    torch.save({"model": model, "ids": ids, "mask": mask, "logits": expected}, tmp_path / "m.pt")
    script = ("import sys, torch\n"
              "saved = torch.load(sys.argv[1], weights_only=False)\n"
              "m = saved['model']\n"
              "assert m.config._attn_implementation == 'fused_attn'\n"
              "with torch.no_grad():\n"
              "    out = m(input_ids=saved['ids'], attention_mask=saved['mask']).logits\n"
              "assert torch.allclose(out, saved['logits'], rtol=1e-5, atol=1e-6), (out - saved['logits']).abs().max()\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pt")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_second_llama_family_model_gets_its_rope_fused_and_reswaps_report_nothing_false():
    first = _build("llama")
    fused_attn.swap_modules(first)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=48)
    second = transformers.AutoModelForCausalLM.from_config(cfg)
    report = fused_attn.swap_modules(second)
    assert any(where == "modeling_mistral.apply_rotary_pos_emb" for _, where, _, _ in report.replaced), report
    assert not report.left, report
    again = fused_attn.swap_modules(second)  # swapping a swapped model: nothing to do, nothing blamed
    assert not again.replaced and not again.left, again
    # but said: the attention implementation and the rotary function are listed as swapped already
    assert ("", "MistralForCausalLM", "attn_implementation 'fused_attn'") in again.already, again
    assert ("", "modeling_mistral.apply_rotary_pos_emb", "fused rotary") in again.already, again


def _t5(**kw):
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                dropout_rate=0.0, decoder_start_token_id=0, **kw)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.T5ForConditionalGeneration._from_config(cfg, attn_implementation="eager")


def test_t5_relative_position_bias_matches_eager_with_its_gradient():
    """T5 passes its learned relative position bias to the attention function: it joins the
    mask as an additive bias (its gradient flows to relative_attention_bias), in the encoder,
    the causal decoder and the cross attention, and in generation with a cache."""
    model = _t5()
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model)
    assert model.config._attn_implementation == "fused_attn", report
    ids, mask = _batch("bert")
    dec = torch.randint(0, VOCAB, (B, 5), generator=torch.Generator().manual_seed(2))
    model.train()
    ref.train()
    check_module_against_reference(model, ref, [],
                                   run=lambda m: m(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits)
    model.eval()
    ref.eval()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        expected = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, expected)


def test_output_attentions_runs_the_models_eager_attention(unswapped):
    model = _build("llama").eval()
    ref = copy.deepcopy(model)
    fused_attn.swap_modules(model)
    ids, mask = _batch("llama")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        with unswapped.functions():  # (the RoPE the swap fused module-level: the copy runs the original)
            expected = ref(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(out.attentions) == len(expected.attentions) == 2
    for a, b in zip(out.attentions, expected.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family,how", [("gpt2", "argument"), ("llama", "config"), ("bert", "config")])
def test_output_attentions_the_layers_are_not_told_of(unswapped, family, how):
    """GPT-2 takes output_attentions out of its layers' kwargs, and a config's output_attentions is
    never passed down: transformers' output recorder asks for the weights then, and the fused
    attention gave None, an empty tuple of attentions with no warning. It now runs the model's
    eager attention whenever the recorder wants them."""
    model = _build(family).eval()
    if how == "config":  # (set before the swap: transformers refuses it on a model that is not eager)
        model.config.output_attentions = True
    ref = copy.deepcopy(model)
    fused_attn.swap_modules(model)
    ids, mask = _batch(family)
    flag = {"output_attentions": True} if how == "argument" else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **flag)
        with unswapped.functions():
            expected = ref(input_ids=ids, attention_mask=mask, **flag)
    assert len(out.attentions) == len(expected.attentions) == 2
    for a, b in zip(out.attentions, expected.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if how == "config":  # and a call that does not ask runs the fused path
        model.config.output_attentions = False
        with torch.no_grad():
            assert model(input_ids=ids, attention_mask=mask).attentions is None


def test_a_compiled_decoder_layer_traces_whole_and_a_compiled_model_still_records_weights():
    """Asking transformers' output recorder whether weights are wanted (a ContextVar) broke the
    graph of a layer compiled alone: fullgraph raised "ContextVar.get" (Unsupported). It is read
    only where a compiled model call set it; under a whole compiled model output_attentions still
    returns the eager attention's weights."""
    model = _build("llama", attn="fused_attn").eval()
    ids, mask = _batch("llama")
    with torch.no_grad():
        # (before any output_attentions call: that installs transformers' own capture hooks, which
        # read the ContextVar themselves and so break a layer's graph whatever the attention)
        plain = model(input_ids=ids, attention_mask=mask)
        layer = model.model.layers[0]
        torch._dynamo.reset()
        layer.forward = torch.compile(layer.forward, fullgraph=True, backend="eager")
        try:
            out = model(input_ids=ids, attention_mask=mask)
        finally:
            del layer.forward  # (the instance attribute: the class's forward again)
        torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)
        expected = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="eager")(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert len(compiled.attentions) == len(expected.attentions) == 2
    for a, b in zip(compiled.attentions, expected.attentions):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_output_attentions_with_an_empty_static_cache_matches_eager():
    """output_attentions=True with a StaticCache: the prefill's keys are the cache's whole length,
    of which only the first q_len are filled, and the mask function leaves the mask to the causal
    flag (None). The eager call then needs the causal mask over those keys aligned top-left (query
    i sees keys 0..i, not the empty slots after the prompt), as the fused path's causal flag is:
    the same logits, attentions and greedy tokens as the eager model."""
    model = _build("llama").eval()
    ref = copy.deepcopy(model)
    fused_attn.swap_modules(model, norm=False, ffn=False, rotary=False)
    ids = _batch("llama")[0][:1, :6]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, expected = (m(input_ids=ids, past_key_values=transformers.StaticCache(config=m.config, max_cache_len=16),
                           use_cache=True, output_attentions=True) for m in (model, ref))
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
        for a, b in zip(out.attentions, expected.attentions, strict=True):
            assert a.shape[-1] == 16 and float(a[..., 6:].abs().max()) == 0  # no weight on the empty slots
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static",
                      output_attentions=True, return_dict_in_generate=True)
        assert torch.equal(model.generate(ids, **greedy).sequences, ref.generate(ids, **greedy).sequences)


def test_restore_gives_each_sub_model_its_own_attention_implementation():
    """A composite model whose sub-models ran different implementations (CLIP: text "eager",
    vision "sdpa") gets each one back from restore_modules, not the top-level one everywhere."""
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=48),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                           image_size=16, patch_size=8), projection_dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.CLIPModel._from_config(
            cfg, attn_implementation={"": "eager", "text_config": "eager", "vision_config": "sdpa"})

    def implementations():
        return tuple(m.config._attn_implementation for m in (model, model.text_model, model.vision_model))

    assert implementations() == ("eager", "eager", "sdpa")
    fused_attn.swap_modules(model)
    assert implementations() == ("fused_attn",) * 3
    fused_attn.restore_modules(model)
    assert implementations() == ("eager", "eager", "sdpa")


@pytest.mark.parametrize("kind", ["local", "transient-global"])
def test_attention_classes_outside_the_interface_are_reported_left(kind, monkeypatch):
    """LongT5's encoder attention (local or transient-global) computes attention itself, in a
    modeling module whose decoder attention uses transformers' attention interface. transformers
    switches such a model (its test reads the module, not each class): the report says the
    decoder's attention is switched and lists the encoder's class as left, with the reason, and
    a forward bears both out (no fused call from the encoder, some from the decoder). The
    encoder-only model, none of whose attention uses the interface, is not switched at all."""
    cfg = transformers.LongT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                    local_radius=3, global_block_size=4, encoder_attention_type=kind,
                                    decoder_start_token_id=0)
    own = {"local": "LongT5LocalAttention", "transient-global": "LongT5TransientGlobalAttention"}[kind]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation="eager").eval()
        encoder_only = transformers.LongT5EncoderModel._from_config(copy.deepcopy(cfg),  # (a config of its own)
                                                                    attn_implementation="eager").eval()
    report = fused_attn.swap_modules(model)
    assert model.config._attn_implementation == "fused_attn"
    assert [cls for _, cls, why in report.left if "attention interface" in why] == [own], report
    calls = []
    real = hf.attention
    monkeypatch.setattr(hf, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = _batch("bert")[0]
    with torch.no_grad():
        model.encoder(input_ids=ids)
        assert not calls
        model(input_ids=ids, decoder_input_ids=ids[:, :4])
        assert calls  # the decoder's self- and cross-attention

    report = fused_attn.swap_modules(encoder_only)
    assert encoder_only.config._attn_implementation == "eager"
    assert not any("attn_implementation" in note for *_, note in report.replaced), report
    assert [(path, cls) for path, cls, why in report.left if "attention interface" in why] == [
        ("", "LongT5EncoderModel")], report


def _seq2seq(name):
    C = transformers
    common = dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, dropout=0.0,
                  attention_dropout=0.0, activation_dropout=0.0, max_position_embeddings=64)
    cfg = {"pegasus_x": lambda: C.PegasusXConfig(num_global_tokens=4, block_size=4, pad_token_id=0,
                                                 decoder_start_token_id=0, **common),
           "nllb_moe": lambda: C.NllbMoeConfig(num_experts=2, expert_capacity=16, pad_token_id=1,
                                               decoder_start_token_id=2, **common)}[name]()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return C.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation="eager")


@pytest.mark.parametrize("name", ["pegasus_x", "nllb_moe"])
def test_models_not_marked_for_sdpa_get_eager_masks(name, monkeypatch):
    """PegasusX and NLLB-MoE, which transformers does not mark _supports_sdpa, build their decoder
    self-attention with is_causal=False and rely on eager's explicit causal mask, while the masks
    the "fused_attn" implementation gets are sdpa's: None where the causal flag would do (no
    padding). swap_modules gives such models eager's masks: the decoder stays causal (a later
    decoder token does not change the first position's logits), with eager's logits and
    gradients. Gemma 2, not marked either (sdpa has no soft-capping) but whose attention declares
    is_causal=True, keeps the causal flag and no mask tensor."""
    model = _seq2seq(name)
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model, norm=False, ffn=False)
    assert model.config._attn_implementation == "fused_attn", report
    ids = _batch("bert")[0]
    dec = ids[:, :5].clone()
    changed = dec.clone()
    changed[:, -1] = (changed[:, -1] + 1) % VOCAB
    model.eval()  # (NLLB-MoE's experts' capacity in training depends on the eval calls before)
    ref.eval()
    with torch.no_grad():
        first, second = (model(input_ids=ids, decoder_input_ids=d).logits[:, 0] for d in (dec, changed))
    assert torch.equal(first, second)
    check_module_against_reference(model, ref, [], run=lambda m: m(input_ids=ids, decoder_input_ids=dec).logits)

    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8, intermediate_size=48, max_position_embeddings=64,
                                    sliding_window=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gemma = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    fused_attn.swap_modules(gemma)
    masks = []
    real = hf.attention
    monkeypatch.setattr(hf, "attention", lambda *a, **k: masks.append((k["attn_mask"], k["causal"])) or real(*a, **k))
    with torch.no_grad():
        gemma(input_ids=ids)
    assert masks and all(mask is None and causal for mask, causal in masks)


def test_bert_residual_stream_stays_float32_under_autocast():
    """A swapped BERT under bfloat16 autocast: its post-LN add + norm keeps the residual stream in
    float32 as the original's LayerNorm(bf16 branch + float32 stream) does, so the output is
    float32 with the original's accuracy against float64 (the fused norm returned bfloat16: about
    60x the error)."""
    config, _ = _bert()
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    swapped = copy.deepcopy(model)
    fused_attn.swap_modules(swapped)
    ids = torch.randint(0, VOCAB, (B, L))
    exact = copy.deepcopy(model).double()(input_ids=ids).last_hidden_state
    with torch.autocast("cpu", dtype=torch.bfloat16):
        original = model(input_ids=ids).last_hidden_state
        out = swapped(input_ids=ids).last_hidden_state
    assert original.dtype == out.dtype == torch.float32
    assert (out.double() - exact).abs().max() <= 2 * (original.double() - exact).abs().max() + 1e-4


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                              (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_llama_rms_norm_keeps_the_promoted_dtype_of_a_weight_of_another_dtype(name, x_dtype, w_dtype, autocast):
    """Llama's RMSNorm returns ``weight * normed.to(x.dtype)``: promote(weight, x), float32 for a
    float32 weight next to half-precision x (an fp32 model under autocast: Qwen3's q_norm/k_norm
    over half projections). The swapped norm returned x's dtype; now the original's dtype, values
    and gradients, with autocast or without."""
    cls = getattr(_modeling(name), name.capitalize() + "RMSNorm")
    torch.manual_seed(0)
    norm = cls(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(32))
    norm.to(w_dtype)
    swapped = copy.deepcopy(norm)
    fused_attn.swap_modules(swapped)
    assert type(swapped).__name__ == "Fused" + cls.__name__
    x = (3 * torch.randn(4, 5, 32)).to(x_dtype)
    g = torch.randn(4, 5, 32)
    results = []
    for module in (norm, swapped):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16 if x_dtype == torch.float32 else x_dtype, enabled=autocast):
            out = module(xi)
        out.backward(g.to(out.dtype))
        results.append((out, xi.grad, module.weight.grad))
    (want, want_dx, want_dw), (out, dx, dw) = results
    assert out.dtype == want.dtype == torch.promote_types(x_dtype, w_dtype)
    assert dx.dtype == x_dtype and dw.dtype == w_dtype
    tol = dict(atol=1e-3, rtol=1e-2)  # (a half-precision rounding of the normalised row may differ by an ulp)
    torch.testing.assert_close(out, want, **tol)
    torch.testing.assert_close(dx, want_dx, **tol)
    torch.testing.assert_close(dw, want_dw, **tol)


def test_qwen3_q_norm_under_autocast_returns_the_original_dtype():
    """A tiny float32 Qwen3 under bfloat16 autocast: its q_norm normalises the bfloat16 q_proj
    output with a float32 weight and returns float32; the swapped one returned bfloat16."""
    modeling = _modeling("qwen3")
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = modeling.Qwen3ForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    _perturb_norms(model)
    swapped = copy.deepcopy(model)
    ids, mask = _batch("llama")
    outputs = []
    for m in (model, swapped):  # (the original first: the swap's RoPE patch is module-level)
        if m is swapped:
            fused_attn.swap_modules(m)
            assert type(m.model.layers[0].self_attn.q_norm).__name__ == "FusedQwen3RMSNorm"
        seen = []
        hook = m.model.layers[0].self_attn.q_norm.register_forward_hook(lambda mod, args, out: seen.append(out))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = _logits(m, ids, mask)
        hook.remove()
        outputs.append((seen[0], logits))
    (want, want_logits), (out, logits) = outputs
    assert out.dtype == want.dtype == torch.float32
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    assert logits.dtype == want_logits.dtype
    torch.testing.assert_close(logits, want_logits, atol=5e-2, rtol=5e-2)


def test_swapped_llama_exports_with_a_dynamic_length(monkeypatch):
    """torch.export of a swapped Llama with a dynamic sequence length (min 4, max 60 around the
    hidden size 32): the gated MLP chooses its path by whether a gradient is wanted, not by the
    token count, which became a guard export refused ("Constraints violated"). The exported
    program gives the eager swapped model's output on both sides of the old threshold."""
    from torch.export import Dim

    monkeypatch.setattr(hf, "GATED_MLP_MIN_TOKENS", None)  # (the eager threshold: the hidden size)
    config, _ = _llama(use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaModel(config).eval()
    fused_attn.swap_modules(model)

    class Wrap(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).last_hidden_state

    wrapped = Wrap(model)
    exported = torch.export.export(wrapped, (torch.randint(0, VOCAB, (2, 8)),),
                                   dynamic_shapes={"ids": {1: Dim("L", min=4, max=60)}})
    for length in (5, 40):
        ids = torch.randint(0, VOCAB, (2, length))
        torch.testing.assert_close(exported.module()(ids), wrapped(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_norms_with_an_eps_the_fused_norm_refuses_are_left(family, unswapped):
    """layer_norm_eps=0 / rms_norm_eps=0, which torch takes and the fused norm refuses: those norms
    are left (with the reason in the report) and the model runs as before, where each forward
    of the swapped model raised."""
    config, auto = (_bert(layer_norm_eps=0.0) if family == "bert" else _llama(rms_norm_eps=0.0))
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    swapped = copy.deepcopy(model)
    report = fused_attn.swap_modules(swapped)
    assert any("eps=0.0" in why for _, _, why in report.left), str(report)
    ids = torch.randint(0, VOCAB, (B, L))
    with unswapped.functions():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(swapped(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_activation_changed_after_the_swap_is_followed(family, unswapped):
    """An MLP's activation set to torch's GELU before the swap, its ``approximate`` changed after:
    the swapped MLP reads its activation at each call (as the swapped torch layers do), so it
    computes what the unswapped model computes (it ran the activation fused at swap time)."""
    config, auto = FAMILIES[family](**({"hidden_act": "gelu"} if family == "llama" else {}))
    torch.manual_seed(0)
    model = auto.from_config(config).eval()
    attr = {"bert": "intermediate.intermediate_act_fn", "gpt2": "act", "llama": "act_fn"}[family]
    for mlp in [m for m in model.modules() if type(m).__name__ in ("BertLayer", "GPT2MLP", "LlamaMLP")]:
        owner, name = (mlp.intermediate, "intermediate_act_fn") if family == "bert" else (mlp, attr)
        setattr(owner, name, torch.nn.GELU())
    model.double()  # (float64: the two GELUs' difference, ~1e-5 at the logits here, stands far above rounding)
    swapped = copy.deepcopy(model)
    report = fused_attn.swap_modules(swapped, attention=False, norm=False)  # (Llama's own RMSNorm rounds to float32)
    assert any("FFN" in note for *_, note in report.replaced), str(report)
    for m in list(model.modules()) + list(swapped.modules()):
        if isinstance(m, torch.nn.GELU):
            m.approximate = "tanh"
    ids = torch.randint(0, VOCAB, (B, L))
    with unswapped.functions():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(swapped(input_ids=ids).logits, expected, atol=1e-11, rtol=1e-9)


def _zeroing_forward_hook(module):
    module.register_forward_hook(lambda mod, inputs, out: out * 0)


def _tripling_backward_hook(module):
    module.register_full_backward_hook(lambda mod, gin, gout: tuple(None if g is None else 3 * g for g in gin))


def _tripling_backward_pre_hook(module):
    module.register_full_backward_pre_hook(lambda mod, gout: tuple(None if g is None else 3 * g for g in gout))


def _doubled_intermediate(module):
    """Another class over BERT's intermediate, with the same children (its forward doubles)."""
    from transformers.models.bert import modeling_bert

    class DoubledIntermediate(modeling_bert.BertIntermediate):
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)
    module.__class__ = DoubledIntermediate


#: (family, the path under each layer of the module changed, the change)
SKIPPED_CHILD_CASES = {
    "bert_intermediate_forward_hook": ("bert", "intermediate", _zeroing_forward_hook),
    "bert_output_forward_hook": ("bert", "output", _zeroing_forward_hook),
    "bert_output_backward_hook": ("bert", "output", _tripling_backward_hook),
    "bert_intermediate_replaced": ("bert", "intermediate", _doubled_intermediate),
    "bert_intermediate_dense_backward_hook": ("bert", "intermediate.dense", _tripling_backward_hook),
    "bert_self_output_layer_norm_backward_pre_hook": ("bert", "attention.output.LayerNorm", _tripling_backward_pre_hook),
    "gpt2_c_fc_backward_hook": ("gpt2", "mlp.c_fc", _tripling_backward_hook),
    "llama_up_proj_backward_pre_hook": ("llama", "mlp.up_proj", _tripling_backward_pre_hook),
}


@pytest.mark.parametrize("order", ["change_then_swap", "swap_then_change"])
@pytest.mark.parametrize("case", sorted(SKIPPED_CHILD_CASES))
def test_hooked_or_replaced_children_of_fused_blocks_are_not_skipped(case, order, unswapped):
    """A module whose forward a fused block does not run (BERT's intermediate and output under the
    fused FFN chunk; the linears and norms the fused forwards read) given forward or backward
    hooks, or replaced by another class, before or after the swap: the swapped model computes
    what the unswapped one does, its gradients included. A forward hook on BERT's intermediate
    added after the swap was skipped (the fused chunk checked only its children), and backward
    hooks anywhere were dropped."""
    family, path, change = SKIPPED_CHILD_CASES[case]
    model = _build(family, **({"hidden_act": "silu"} if family == "llama" else {}))
    _perturb_norms(model)
    ref = copy.deepcopy(model)

    def apply(m):
        layers = [mod for name, mod in m.named_modules() if name.endswith(".h") or name.endswith(".layer")
                  or name.endswith(".layers")]
        assert len(layers) == 1, [name for name, _ in m.named_modules()]
        for layer in layers[0]:
            change(layer.get_submodule(path))
    apply(ref)
    if order == "change_then_swap":
        apply(model)
        fused_attn.swap_modules(model)
    else:
        fused_attn.swap_modules(model)
        apply(model)
    model.train()  # dropout probabilities are 0: train mode is deterministic too
    ref.train()
    ids, mask = _batch(family)
    out = _logits(model, ids, mask)
    with unswapped.functions():
        expected = _logits(ref, ids, mask)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    weight = torch.linspace(-1.0, 2.0, out.numel()).view_as(out)
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    grads = {name: p.grad for name, p in ref.named_parameters()}
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------
# models whose code does for "fused_attn" what it does for neither eager nor sdpa
# ---------------------------------------------------------------------------------------------

def _modeling(name):
    """transformers' modeling module ``name`` (deepseek_v32, ...), or a skip where it is absent."""
    return pytest.importorskip(f"transformers.models.{name}.modeling_{name}")


def _left_reason(report, cls_name):
    return next((reason for _, name, reason in report.left if name == cls_name), None)


def test_sparse_attention_models_are_left_and_their_indices_refused():
    """DeepSeek-V3.2 turns its indexer's top-k keys into a mask only for "eager" and "sdpa" and
    passes them as ``indices=`` to other implementations: fused_attn computed dense attention
    from them (0.49 off). swap_modules now leaves such a model, saying why, and the attention
    function refuses ``indices`` where a model is set to "fused_attn" directly."""
    modeling = _modeling("deepseek_v32")
    cfg = transformers.DeepseekV32Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, n_group=1, topk_group=1,
        num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=8, head_dim=8, index_topk=4, index_head_dim=16, index_n_heads=2, first_k_dense_replace=1,
        attn_implementation="eager")
    torch.manual_seed(0)
    model = modeling.DeepseekV32ForCausalLM(cfg).eval()
    swapped = copy.deepcopy(model)
    report = fused_attn.swap_modules(swapped, norm=False, ffn=False, rotary=False)
    reason = _left_reason(report, "DeepseekV32ForCausalLM")
    assert reason is not None and "DeepseekV32Attention.forward" in reason and "'sdpa'" in reason, str(report)
    assert swapped.config._attn_implementation == "eager"
    assert "indices" in hf._model_kwargs(modeling.DeepseekV32Attention)  # (refused by its code, not only listed)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(swapped(ids).logits, model(ids).logits, atol=0, rtol=0)
        swapped.set_attn_implementation("fused_attn")
        with pytest.raises(ValueError, match=r"DeepseekV32Attention \(layer \d\) passes indices=a tensor"):
            swapped(ids)


def _eager_rows_with_sinks(q, k, v, mask, sinks, scale):
    """Inkling 2's eager attention in float64: each row's sink logit joins its softmax as one more
    column without a value. q (B, H, L, D), k/v (B, Hkv, S, D), keep-mask (.., L, S), sinks (B, H, L, 1)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(torch.cat([logits, sinks.expand(*logits.shape[:-1], 1)], -1), -1)[..., :-1]
    return (weights @ v).transpose(1, 2)


def test_per_row_attention_sinks_match_eager_with_their_gradients():
    """Inkling 2 passes data-dependent sinks, one logit per query row, as ``sinks`` (B, Hq, L, 1):
    fused_attn read only gpt-oss's ``s_aux`` and dropped them (0.08-0.16 off, no gradient for the
    projection that makes them). They now shrink each row through the lse, as ``attention`` applies
    its per-head sinks, on padded and packed batches, with their gradients; other shapes raise."""
    gen = torch.Generator().manual_seed(0)
    Bq, H, Hkv, Lq, D = 2, 4, 2, 7, 8
    q, k, v = (torch.randn(Bq, h, Lq, D, generator=gen, dtype=torch.float64) for h in (H, Hkv, Hkv))
    sinks = 2 * torch.randn(Bq, H, Lq, 1, generator=gen, dtype=torch.float64)
    keep = torch.ones(Lq, Lq, dtype=torch.bool).tril().expand(Bq, 1, Lq, Lq).clone()
    keep[1, :, :, :2] = False  # left padding: row 0 and 1 of sequence 1 see no key, the sink takes them whole
    module = torch.nn.Module()
    inputs = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    got, _ = hf.fused_attention_forward(module, *inputs[:3], keep, scaling=0.3, sinks=inputs[3])
    want = _eager_rows_with_sinks(q, k, v, keep, sinks, 0.3).nan_to_num()
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, inputs, torch.ones_like(got))
    ref = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    want_grads = torch.autograd.grad(_eager_rows_with_sinks(*ref[:3], keep, ref[3], 0.3).nan_to_num(), ref,
                                     torch.ones_like(got))
    for name, g, w in zip("q k v sinks".split(), grads, want_grads):
        torch.testing.assert_close(g, w.nan_to_num(), msg=name)
    assert float(grads[3].abs().max()) > 0
    # packed (cu_seq_lens): sequences of 3 and 4 tokens in one row, each with its own causal rows
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed, _ = hf.fused_attention_forward(module, q[:1], k[:1], v[:1], None, scaling=0.3, sinks=sinks[:1],
                                           cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    for lo, hi in ((0, 3), (3, 7)):
        n = hi - lo
        alone = _eager_rows_with_sinks(q[:1, :, lo:hi], k[:1, :, lo:hi], v[:1, :, lo:hi],
                                       torch.ones(n, n, dtype=torch.bool).tril(), sinks[:1, :, lo:hi], 0.3)
        torch.testing.assert_close(packed[:, lo:hi], alone)
    with pytest.raises(ValueError, match=r"sinks=a tensor of shape \(2, 4, 7, 2\)"):
        hf.fused_attention_forward(module, q, k, v, keep, sinks=sinks.expand(-1, -1, -1, 2))


def test_inkling2_is_left_by_its_opt_out_and_exact_when_set_directly():
    """Inkling 2 (transformers sets ``_supports_attention_backend = False`` for its per-token
    sinks): swap_modules leaves it, saying so; set to "fused_attn" directly, it now gives eager's
    logits and its sink projections eager's gradients (it dropped the sinks before)."""
    modeling = _modeling("inkling2")
    config = pytest.importorskip("transformers.models.inkling2.configuration_inkling2")
    cfg = config.Inkling2TextConfig(
        vocab_size=97, unpadded_vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
        sliding_window_size=5, d_rel=4, rel_extent=16, moe_intermediate_size=32, n_routed_experts=4,
        num_experts_per_tok=2, n_layers_per_attn_res_block=1)
    torch.manual_seed(0)
    model = modeling.Inkling2ForCausalLM(cfg).eval()
    assert model.config._attn_implementation == "eager"
    swapped = copy.deepcopy(model)
    report = fused_attn.swap_modules(swapped, norm=False, ffn=False, rotary=False)
    reason = _left_reason(report, "Inkling2ForCausalLM")
    assert reason is not None and "_supports_attention_backend = False" in reason, str(report)
    assert swapped.config._attn_implementation == "eager"
    swapped.set_attn_implementation("fused_attn")
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    got, want = swapped(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got[1, :9], want[1, :9], atol=1e-5, rtol=1e-4)
    g = torch.randn(got.shape, generator=torch.Generator().manual_seed(1))
    g[1, 9:] = 0
    got.backward(g)
    want.backward(g)
    sink_grads = [(p.grad, q.grad) for (name, p), q in zip(swapped.named_parameters(), model.parameters())
                  if "sink_proj" in name]
    assert sink_grads
    for mine, theirs in sink_grads:
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


def _gemma4(kv_shared_layers):
    modeling = _modeling("gemma4")
    config = pytest.importorskip("transformers.models.gemma4.configuration_gemma4")
    cfg = config.Gemma4TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=kv_shared_layers, vocab_size_per_layer_input=97, hidden_size_per_layer_input=8)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return modeling.Gemma4ForCausalLM(cfg).eval()


def test_gemma4_kv_shared_layers_get_eager_masks_and_keep_their_queries_placed():
    """Gemma 4 cuts its KV-shared layers' queries to the last logits_to_keep after building the
    masks, unless the implementation is "sdpa" and a mask is None: under "fused_attn" its 3 queries
    met 12 keys with a None mask, whose causal flag placed them at the start (0.56-0.72 off). Now
    such a model gets eager's masks (cut with the queries), and a call that still meets cut queries
    without a mask (the model set to "fused_attn" directly) raises instead of guessing their place.
    A Gemma 4 without KV-shared layers keeps sdpa's masks."""
    model = _gemma4(kv_shared_layers=2)
    swapped = copy.deepcopy(model)
    report = fused_attn.swap_modules(swapped, norm=False, ffn=False, rotary=False)
    row = next(note for *_, note in report.replaced if "attn_implementation" in note)
    assert "eager's masks" in row and "_maybe_slice_kv_shared_inputs" in row, row
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    with torch.no_grad():
        for keep in (1, 3):
            for mask in (None, padded):
                got = swapped(ids, attention_mask=mask, logits_to_keep=keep).logits
                want = model(ids, attention_mask=mask, logits_to_keep=keep).logits
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=f"logits_to_keep={keep}")
        direct = copy.deepcopy(model)
        direct.set_attn_implementation("fused_attn")
        torch.testing.assert_close(direct(ids, logits_to_keep=1).logits, model(ids, logits_to_keep=1).logits,
                                   atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError, match="dropped queries after building its masks"):
            direct(ids, logits_to_keep=3)
    plain = _gemma4(kv_shared_layers=0)
    report = fused_attn.swap_modules(plain, norm=False, ffn=False, rotary=False)
    row = next(note for *_, note in report.replaced if "attn_implementation" in note)
    assert "eager's masks" not in row, row


def test_causal_flag_with_more_keys_cuts_them_only_for_the_prompts_own_positions():
    """No mask, a causal flag, more keys than queries: sdpa's convention (transformers' mask
    function gives None there only for the prefill of an empty static cache) is top-left, the keys
    after the queries being empty slots; position ids for more tokens than the queries say the
    queries were cut after the masks were built, and the call raises rather than misplace them."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 8, generator=gen), torch.randn(1, 2, 12, 8, generator=gen), \
        torch.randn(1, 2, 12, 8, generator=gen)
    module = torch.nn.Module()
    got, _ = hf.fused_attention_forward(module, q, k, v, None, position_ids=torch.arange(3)[None])
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :3], v[:, :, :3], is_causal=True)
    torch.testing.assert_close(got, want.transpose(1, 2))
    with pytest.raises(ValueError, match=r"3 queries, 12 keys and no mask, with position_ids of shape \(1, 12\)"):
        hf.fused_attention_forward(module, q, k, v, None, position_ids=torch.arange(12)[None])


def _interface_keywords():
    """{keyword: {(modeling module, class)}} of every call of an attention function looked up in
    ``ALL_ATTENTION_FUNCTIONS`` in the installed transformers' modeling sources (read, not imported)."""
    import ast
    import pathlib

    found = {}
    root = pathlib.Path(transformers.__file__).parent / "models"
    for path in sorted(root.glob("*/modeling_*.py")):
        text = path.read_text()
        if "ALL_ATTENTION_FUNCTIONS" not in text:
            continue
        module = f"transformers.models.{path.parent.name}.{path.stem}"
        for cls in ast.parse(text).body:
            if not isinstance(cls, ast.ClassDef):
                continue
            for keyword in hf.attention_call_keywords(cls):  # (the scanner the swap uses)
                found.setdefault(keyword, set()).add((module, cls.name))
    return found


def test_every_keyword_transformers_models_pass_to_attention_is_handled_or_refused():
    """Each keyword argument the installed transformers' models give their attention functions is
    one fused_attention_forward computes with (its signature, ``HANDLED_KWARGS``), one that changes
    nothing it computes (``IGNORED_KWARGS``), or one it refuses: listed (``REFUSED_KWARGS``) or
    found in the passing class's own code (``_model_kwargs``), where a non-None value raises."""
    import importlib
    import inspect

    found = _interface_keywords()
    assert {"dropout", "scaling", "s_aux", "position_bias"} <= set(found)  # (the scan reads the calls)
    signature = set(inspect.signature(hf.fused_attention_forward).parameters) - {"kwargs"}
    unclassified = {}
    for name, where in found.items():
        if name in signature or name in hf.HANDLED_KWARGS or name in hf.IGNORED_KWARGS or name in hf.REFUSED_KWARGS:
            continue
        unclassified[name] = where
    for name, where in unclassified.items():
        for module_name, cls_name in sorted(where)[:3]:
            try:
                cls = getattr(importlib.import_module(module_name), cls_name)
            except Exception:  # (a model whose optional dependencies are missing here)
                continue
            module = object.__new__(cls)  # (never initialised: only its class is read)
            torch.nn.Module.__init__(module)
            with pytest.raises(ValueError, match=f"passes {name}="):
                hf._check_kwargs(module, {name: torch.zeros(1)})
    # and a value that a caller's **kwargs carry through the model unread (sdpa and eager ignore it) passes
    model = _build("llama", attn="fused_attn")
    ids, mask = _batch("llama")
    model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


def test_name_checks_find_the_sparse_models_and_spare_the_common_ones():
    """swap_modules reads each modeling module for comparisons of the implementation's name with
    one naming "sdpa" (those branches do for "fused_attn" what they do for neither): found in the
    sparse-attention models, none in the common families, which also declare no backend opt-out."""
    import importlib

    for name in ("deepseek_v32", "glm_moe_dsa", "mistral_large4"):
        try:
            module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:
            continue
        assert hf._name_checks(module.__name__), name
    common = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt2", "bert", "t5", "gpt_oss", "modernbert",
              "whisper", "bart", "phi", "gpt_neox"]
    for name in common:
        try:
            module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        except ImportError:
            continue
        assert hf._name_checks(module.__name__) == (), name
        for cls in vars(module).values():
            if isinstance(cls, type) and hasattr(cls, "set_attn_implementation"):
                assert hf._backend_opt_out(cls) is None, cls.__name__


def test_class_caches_keep_no_class_alive():
    """The answers read from a class's code are remembered while the class lives, not after: the
    keyword check runs on the class of any module calling the "fused_attn" implementation, the
    user's own too (a class made per call stayed alive, with what it references, forever)."""
    import gc
    import weakref

    def make():
        class OwnAttention(torch.nn.Module):
            held = torch.ones(4)

        return OwnAttention

    held = []
    for _ in range(2):
        cls = make()
        hf._check_kwargs(cls(), {"some_flag": torch.zeros(1)})  # (not the class's own keyword: passes)
        assert hf._code(cls) == "" and hf.linear_forward_equivalent(cls) is False
        held += [weakref.ref(cls), weakref.ref(cls.held)]
        del cls
    gc.collect()
    assert [r() for r in held] == [None] * len(held)


def test_swapped_llama_in_float64_gives_the_original_numbers(unswapped):
    """transformers' LlamaRMSNorm normalises in float32 even for float64 x (``x.to(float32)``);
    the fused norm normalised in float64, so a swapped tiny float64 Llama was 4e-7 away from the
    original (0 with norm=False). float64 x now runs the original's forward: the same numbers."""
    modeling = _modeling("llama")
    torch.manual_seed(0)
    norm = modeling.LlamaRMSNorm(32, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(32))
    swapped = copy.deepcopy(norm)
    fused_attn.swap_modules(swapped)
    assert type(swapped).__name__ == "FusedLlamaRMSNorm"
    x = 3 * torch.randn(4, 5, 32, dtype=torch.float64)
    assert torch.equal(swapped(x), norm(x))
    torch.testing.assert_close(swapped(x.float()), norm(x.float()))  # (float32 still runs the fused norm)

    # (sdpa's attention, the fused attention's reference: eager's softmax rounds to float32 too)
    model = _build("llama", attn="sdpa").double().eval()
    _perturb_norms(model)
    ref = copy.deepcopy(model)
    report = fused_attn.swap_modules(model)
    assert "FusedLlamaRMSNorm" in {new for _, _, new, _ in report.replaced}, report
    ids, mask = _batch("llama")
    with torch.no_grad():
        out = _logits(model, ids, mask)
        with unswapped.functions():
            expected = _logits(ref, ids, mask)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    fused_attn.restore_modules(model)


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def test_a_parametrized_swapped_module_pickles_as_torch_says():
    """torch refuses to pickle a parametrized module ("only supported through state_dict()");
    a swapped transformers module parametrized after the swap raised "not enough values to
    unpack (expected 2, got 1)" instead (the fused class's pickling took torch's Parametrized
    class for the fused one). Now torch's error; deepcopy still works, and an unparametrized
    swapped module still pickles."""
    import pickle

    import torch.nn.utils.parametrize as parametrize

    modeling = _modeling("llama")
    plain = modeling.LlamaRMSNorm(16)
    parametrize.register_parametrization(plain, "weight", _Identity())
    with pytest.raises(RuntimeError, match="only supported through state_dict"):  # (torch's, unswapped)
        pickle.dumps(plain)
    norm = modeling.LlamaRMSNorm(16)
    fused_attn.swap_modules(norm)
    again = pickle.loads(pickle.dumps(norm))
    assert type(again) is type(norm)
    parametrize.register_parametrization(norm, "weight", _Identity())
    with pytest.raises(RuntimeError, match="only supported through state_dict"):
        pickle.dumps(norm)
    copied = copy.deepcopy(norm)
    assert parametrize.is_parametrized(copied, "weight") and isinstance(copied, type(again))
    x = torch.randn(3, 16)
    assert torch.equal(copied(x), norm(x))


@pytest.mark.parametrize("family, setting", [("bert", "eps"), ("bert", "p"), ("llama", "eps")])
def test_values_the_fused_ops_refuse_set_after_the_swap_run_the_original(family, setting, unswapped):
    """A norm's eps set to 0 or an output dropout's p to 1 after the swap (values torch takes and
    the swap leaves to torch when it finds them, ``test_norms_with_an_eps_the_fused_norm_refuses_
    are_left``): every call of the swapped model raised. They are read at each call now: such a
    call runs the original's norm (p = 1 zeroes the branch: training stays deterministic)."""
    model = _build(family).train()
    swapped = copy.deepcopy(model)
    fused_attn.swap_modules(swapped)
    for m in (model, swapped):
        for name, module in m.named_modules():
            if setting == "eps" and isinstance(module, torch.nn.LayerNorm):
                module.eps = 0.0
            elif setting == "eps" and type(module).__name__.endswith("RMSNorm"):
                module.variance_epsilon = 0
            elif setting == "p" and name.endswith("output.dropout"):  # (BERT's *SelfOutput's and *Output's)
                module.p = 1.0
    ids, mask = _batch(family)
    with unswapped.functions():
        expected = _logits(model, ids, mask)
    torch.testing.assert_close(_logits(swapped, ids, mask), expected, atol=1e-4, rtol=1e-4)


def test_restoring_a_copy_of_a_swapped_llama_leaves_the_original_its_rope():
    """The fused RoPE is module-level; a copy of a swapped model (deepcopy) lists it too, and
    restoring the copy put transformers' function back under the original, still swapped, which
    silently ran unfused RoPE. Now the function is put back by the model whose swap installed it
    (or by another once that one is gone)."""
    import gc

    modeling = _modeling("llama")
    with unswapped_module(modeling):
        original = modeling.apply_rotary_pos_emb
        model = _build("llama")
        report = fused_attn.swap_modules(model)
        assert any(where == "modeling_llama.apply_rotary_pos_emb" for _, where, _, _ in report.replaced), report
        fused = modeling.apply_rotary_pos_emb
        twin = copy.deepcopy(model)
        fused_attn.restore_modules(twin)
        assert modeling.apply_rotary_pos_emb is fused
        fused_attn.restore_modules(model)
        assert modeling.apply_rotary_pos_emb is original
        # the model that swapped it gone: a copy puts it back
        fused_attn.swap_modules(model)
        twin = copy.deepcopy(model)
        del model
        gc.collect()
        report = fused_attn.restore_modules(twin)
        assert modeling.apply_rotary_pos_emb is original, report


@contextlib.contextmanager
def unswapped_module(module):
    """Within the block, the module's apply_rotary_pos_emb is transformers' own (an earlier test's
    model may have left it fused); as it was after."""
    before = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = getattr(before, "fused_attn_original", before)
    try:
        yield
    finally:
        module.apply_rotary_pos_emb = before
