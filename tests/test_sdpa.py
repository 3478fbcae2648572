"""The SDPA drop-in: ``functional.scaled_dot_product_attention`` keeps torch's signature and meaning,
and ``fused_attn.patch_sdpa`` routes ``torch.nn.functional.scaled_dot_product_attention`` through
it (torch's own function is the oracle here, run in float64 and in the input dtype)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as TF

import fused_attn
from fused_attn import functional as F
from fused_attn.testing import check_against_reference, make_inputs, runnable_backends

TORCH_SDPA = TF.scaled_dot_product_attention
BACKENDS = runnable_backends("attention")

# (name, q shape, k shape, v shape, kwargs, mask): leading dims as torch allows them
CASES = [
    ("4-D", (2, 4, 9, 16), (2, 4, 11, 16), (2, 4, 11, 8), {}, None),
    ("causal", (1, 2, 13, 16), (1, 2, 13, 16), (1, 2, 13, 16), dict(is_causal=True), None),
    ("gqa + bool mask", (2, 4, 9, 16), (2, 2, 11, 16), (2, 2, 11, 16), dict(enable_gqa=True), "bool"),
    ("additive (L, S) mask + scale", (1, 2, 9, 8), (1, 2, 5, 8), (1, 2, 5, 8), dict(scale=0.3), "additive"),
    ("3-D", (3, 9, 16), (3, 11, 16), (3, 11, 16), {}, "bool3"),
    ("5-D", (2, 3, 2, 7, 8), (2, 3, 2, 6, 8), (2, 3, 2, 6, 8), {}, "bool5"),
    # torch reads a 3-D call as (H, L, E), so grouped-query works there too
    ("3-D heads + gqa", (4, 9, 16), (2, 11, 16), (2, 11, 16), dict(enable_gqa=True), None),
    # masks and key/value batch dims broadcast from the right, as torch broadcasts them
    ("5-D + 4-D mask", (3, 2, 4, 7, 8), (3, 2, 4, 6, 8), (3, 2, 4, 6, 8), {}, "additive4"),
    ("key/value batch broadcast", (2, 4, 9, 16), (1, 4, 11, 16), (1, 4, 11, 16), {}, None),
    ("5-D key/value batch broadcast", (3, 2, 2, 7, 8), (1, 2, 2, 6, 8), (3, 1, 2, 6, 8), {}, "bool5"),
    # ranks that differ: the fewer dims left-padded with 1s and broadcast, as torch does (it
    # refused them: "same number of dims"); a broadcast key gets the summed gradient
    ("4-D query, 3-D key/value", (2, 2, 9, 16), (2, 11, 16), (2, 11, 16), {}, None),
    ("2-D query, 3-D key/value", (9, 16), (3, 11, 16), (3, 11, 8), {}, "additive"),
    ("3-D query, 2-D key/value + causal", (3, 9, 16), (11, 16), (11, 16), dict(is_causal=True), None),
    ("4-D query, 2-D key, 3-D value", (2, 3, 9, 8), (11, 8), (3, 11, 8), {}, "bool"),
    ("5-D query, 3-D key/value + gqa", (2, 2, 4, 7, 8), (2, 6, 8), (2, 6, 8), dict(enable_gqa=True), "bool5"),
    ("value alone enlarges the batch", (9, 8), (11, 8), (2, 3, 11, 8), {}, "additive"),
    # heads of one broadcast without enable_gqa, as torch broadcasts them; with it, key's and
    # value's heads each repeated to query's
    ("one key/value head broadcast", (2, 4, 9, 16), (2, 1, 11, 16), (1, 1, 11, 8), {}, "bool"),
    ("one value head broadcast", (2, 2, 9, 8), (2, 2, 11, 8), (2, 1, 11, 8), {}, None),
    ("one query head broadcast", (2, 1, 9, 8), (2, 2, 11, 8), (2, 2, 11, 8), {}, "bool"),
    ("gqa, key and value heads differ", (1, 6, 9, 8), (1, 2, 11, 8), (1, 3, 11, 8), dict(enable_gqa=True), None),
]


def _mask(kind, q, k):
    gen = torch.Generator().manual_seed(5)
    L, S = q.shape[-2], k.shape[-2]
    if kind == "bool":
        return torch.rand(q.shape[0], 1, L, S, generator=gen) > 0.2
    if kind == "additive":
        return torch.randn(L, S, generator=gen)
    if kind == "bool3":
        return torch.rand(q.shape[0], L, S, generator=gen) > 0.2
    if kind == "bool5":
        return torch.rand(1, q.shape[1], 1, L, S, generator=gen) > 0.2
    if kind == "additive4":
        return torch.randn(*q.shape[-4:-2], L, S, generator=gen)
    return None


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_matches_torch(backend, case):
    name, qs, ks, vs, kwargs, mask_kind = case
    q, k, v = make_inputs(qs, ks, vs, seed=len(qs))
    mask = _mask(mask_kind, q, k)
    inputs = [q, k, v] + ([mask] if mask is not None else [])

    def fused(q, k, v, m=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, backend=backend, **kwargs)

    def reference(q, k, v, m=None):
        return TORCH_SDPA(q, k, v, attn_mask=m, **kwargs)

    results = check_against_reference(fused, reference, inputs)
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_takes_empty_sequences_and_any_float_mask_dtype(backend):
    """Zero queries or zero keys give torch's shapes (the flattening of the batch dims once failed
    on empty tensors); an additive mask of another float dtype than the query is added as torch
    adds it (cast to the query's dtype for the kernels)."""
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    for args in [(q[:, :, :0], k, v), (q, k[:, :, :0], v[:, :, :0]), (q[:0], k[:0], v[:0])]:
        expected = TORCH_SDPA(*args)
        got = F.scaled_dot_product_attention(*args, backend=backend)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected)  # (zeros where there are no keys)
    mask = torch.randn(5, 7)
    dtypes = fused_attn.backends.get_backend(backend).dtypes["attention"]
    if torch.float64 in dtypes:
        q64, k64, v64 = q.double(), k.double(), v.double()
        torch.testing.assert_close(F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, backend=backend),
                                   TORCH_SDPA(q64, k64, v64, attn_mask=mask))
    if torch.float16 in dtypes:
        half = [t.half() for t in (q, k, v)]
        torch.testing.assert_close(F.scaled_dot_product_attention(*half, attn_mask=mask, backend=backend),
                                   TORCH_SDPA(*(t.float() for t in half), attn_mask=mask).half(), atol=2e-3, rtol=2e-3)


def test_sdpa_refuses_what_torch_refuses_and_gives_zeros_on_dead_rows():
    q = torch.randn(1, 2, 4, 8)
    refused = [  # (args, kwargs, match): each refused by torch too (its errors: RuntimeError, IndexError)
        # (torch 2.13's CPU flash kernel takes both on 4-D inputs, its math kernel refuses them)
        ((q[0], q[0], q[0]), dict(attn_mask=torch.ones(4, 4, dtype=torch.bool), is_causal=True),
         "attn_mask must be None when is_causal=True"),
        # 4 query heads over 2 key heads need enable_gqa (1 key head broadcasts, as torch's does)
        ((torch.randn(1, 4, 4, 8), q, q), {}, "pass enable_gqa=True"),
        # enable_gqa reads dim -3 of each as its heads: a 2-D one has none
        ((q, q[0, 0], q[0, 0]), dict(enable_gqa=True),
         r"enable_gqa=True needs query, key and value of at least 3 dims"),
        # ranks may differ, batch dims must still broadcast
        ((q, torch.randn(3, 4, 8), torch.randn(3, 4, 8)), {}, "batch dims .* must broadcast"),
        # the mask must fit the weights (query's and key's dims), which torch adds it to in place
        ((q[0, 0], q[0, 0], torch.randn(3, 4, 8)), dict(attn_mask=torch.ones(3, 4, 4, dtype=torch.bool)),
         r"does not broadcast to the attention weights' shape \(\.\.\., L, S\) = \(4, 4\)"),
    ]
    for args, kwargs, match in refused:
        with pytest.raises((RuntimeError, IndexError)):
            TORCH_SDPA(*args, **kwargs)
        with pytest.raises(ValueError, match=match):
            F.scaled_dot_product_attention(*args, **kwargs)
    dead = torch.ones(4, 4, dtype=torch.bool)
    dead[1] = False  # query 1 sees no key: zeros here (torch: NaN or zeros, by version and kernel)
    ours = F.scaled_dot_product_attention(q, q, q, attn_mask=dead)
    theirs = TORCH_SDPA(q, q, q, attn_mask=dead)
    assert torch.equal(ours[:, :, 1], torch.zeros_like(ours[:, :, 1]))
    torch.testing.assert_close(ours[:, :, [0, 2, 3]], theirs[:, :, [0, 2, 3]])


class CallsSdpa(nn.Module):
    """A model written against torch's SDPA, looked up at call time (as most code does)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 4, 8)).permute(2, 0, 3, 1, 4)
        return TF.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("order", ["last first", "first first"])
def test_patch_sdpa_handles_undone_in_any_order_restore_torch(order):
    """Two patches undone in either order leave torch's own function. (Undoing the first while
    the second was on top, then the second, put the first back: a patch its handle had undone.)"""
    original = TF.scaled_dot_product_attention
    first = fused_attn.patch_sdpa(backend="reference")
    second = fused_attn.patch_sdpa(backend="reference")
    try:
        assert TF.scaled_dot_product_attention is second.patched
        handles = [second, first] if order == "last first" else [first, second]
        handles[0].undo()
        assert TF.scaled_dot_product_attention is (first.patched if order == "last first" else second.patched)
        handles[1].undo()
        assert TF.scaled_dot_product_attention is original
    finally:
        TF.scaled_dot_product_attention = original


def test_patch_sdpa_routes_torch_callers(monkeypatch):
    """Inside the patch, a model calling TF.scaled_dot_product_attention and nn.MultiheadAttention's
    Python path run fused_attn (seen by a spy), with torch's answer; undo restores torch's."""
    calls = []
    real = F.attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "attention", spy)
    torch.manual_seed(0)
    model, mha = CallsSdpa(), nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 7, 32)
    expected = (model(x), mha(x, x, x, need_weights=False)[0])
    assert not calls
    with fused_attn.patch_sdpa(backend="reference") as handle:
        assert TF.scaled_dot_product_attention is handle.patched
        got = (model(x), mha(x, x, x, need_weights=False)[0])
    assert TF.scaled_dot_product_attention is TORCH_SDPA
    assert calls == ["reference", "reference"]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    handle = fused_attn.patch_sdpa()
    inner = fused_attn.patch_sdpa()
    inner.undo()
    assert TF.scaled_dot_product_attention is handle.patched  # nested patches undo in order
    handle.undo()
    assert TF.scaled_dot_product_attention is TORCH_SDPA


def test_patched_model_compiles_fullgraph():
    torch.manual_seed(0)
    model = CallsSdpa()
    x = torch.randn(2, 7, 32)
    expected = model(x)
    with fused_attn.patch_sdpa():
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("args,kwargs,exc,match", [
    # a mask whose batch dims do not broadcast: a RuntimeError from expand inside
    ((torch.randn(2, 3, 2, 3, 4),) * 3, dict(attn_mask=torch.ones(4, 1, 1, 3, 3, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(4, 1, 1, 3, 3\) does not broadcast to the attention weights' shape \(\.\.\., L, S\) = "
     r"\(2, 3, 2, 3, 3\)"),
    ((torch.randn(2, 3, 4),) * 3, dict(attn_mask=torch.ones(2, 2, 3, 3, dtype=torch.bool)), ValueError,
     r"attn_mask of shape \(2, 2, 3, 3\) does not broadcast .* \(2, 3, 3\)"),
    # the errors of attention's 4-D call named q, k, v and the reshaped shapes
    ((torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 5), torch.randn(1, 2, 3, 4)), {}, ValueError,
     r"query and key must have the same embedding dim E \(their last dim\), got query \(1, 2, 3, 4\), key "
     r"\(1, 2, 3, 5\)"),
    ((torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 3, 4)), {}, ValueError,
     r"key and value must have the same sequence length S \(dim -2\), got key \(1, 2, 4, 4\), value \(1, 2, 3, 4\)"),
    ((torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4), torch.randn(2, 3, 3, 4)), {}, ValueError,
     r"the batch dims \(all but the last two\) of query, key and value must broadcast, got query \(2, 2, 3, 4\), "
     r"key \(2, 2, 3, 4\), value \(2, 3, 3, 4\)"),
    ((torch.randn(3, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), dict(enable_gqa=True), ValueError,
     r"query's heads \(dim -3, 3\) must be a multiple of key's and value's \(2\)"),
    ((torch.randn(6, 3, 4), torch.randn(2, 3, 4), torch.randn(4, 3, 4)), dict(enable_gqa=True), ValueError,
     r"query's heads \(dim -3, 6\) must be a multiple of key's and value's \(2 and 4\)"),
    ((torch.randn(2, 3, 0), torch.randn(2, 3, 0), torch.randn(2, 3, 4)), {}, ValueError,
     "query and key must have an embedding dim E .* at least 1"),
    ((torch.randn(2, 3, 4), torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4)), {}, TypeError,
     "key has dtype float64 but query has float32"),
    ((torch.randn(2, 3, 4),) * 3, dict(attn_mask=torch.ones(3, 3, dtype=torch.int64)), TypeError,
     "attn_mask must be bool .* or floating .* got int64"),
    ((torch.randn(2, 3, 4),) * 3, dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\], got 1.5"),
])
def test_sdpa_errors_name_sdpa_arguments_and_shapes(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        F.scaled_dot_product_attention(*args, **kwargs)


def test_patched_sdpa_broadcasts_ranks_without_copies(monkeypatch):
    """torch broadcasts query, key and value of different ranks (a 3-D key set shared by every
    head); the patched SDPA refused them ("same number of dims"), breaking code torch runs. The
    kernels read the broadcast key and value through stride-0 views of the caller's tensors."""
    q, k = torch.randn(2, 2, 3, 4), torch.randn(2, 5, 4)
    mask = torch.rand(3, 5) > 0.3
    expected = TORCH_SDPA(q, k, k, attn_mask=mask)
    seen = []
    real = F.attention

    def spy(q, k, v, **kwargs):
        seen.append((k, v))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(F, "attention", spy)
    with fused_attn.patch_sdpa(backend="reference"):
        got = TF.scaled_dot_product_attention(q, k, k, attn_mask=mask)
    torch.testing.assert_close(got, expected)
    assert all(t.data_ptr() == k.data_ptr() and t.stride(0) == 0 for t in seen[0])  # (2, 2, 5, 4) views of k
    for dropout_p in (0.5, 1.0):  # (other rank mixes, through dropout: torch's shapes)
        assert F.scaled_dot_product_attention(q[0, 0], k, k[:1], dropout_p=dropout_p).shape == (2, 3, 4)


def test_sdpa_takes_dropout_p_one_as_torch_does():
    """torch's SDPA takes dropout_p=1.0 (every weight dropped: zeros, zero gradients); the patched
    SDPA refused it ("dropout_p must be in [0, 1)"), breaking models torch runs."""
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    expected = TORCH_SDPA(q, q, q, dropout_p=1.0)
    (grad_expected,) = torch.autograd.grad(expected.sum(), q)
    with fused_attn.patch_sdpa(backend="reference"):
        got = TF.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
    (grad,) = torch.autograd.grad(got.sum(), q)
    assert torch.equal(got, expected) and torch.equal(grad, grad_expected)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("backend", [None, "reference"])
def test_sdpa_takes_jagged_nested_tensors_as_torch_does(backend):
    """torch's SDPA takes jagged (B, H, j, E) nested tensors; functional.scaled_dot_product_attention
    (documented as torch's meaning) raised NotImplementedError from inside torch on them: they go
    to torch's function, as the patched SDPA sends them (also under patch_sdpa), whatever the backend."""
    offsets = torch.tensor([0, 3, 8])
    q, k, v = (torch.nested.nested_tensor_from_jagged(torch.randn(8, 2, 4), offsets).transpose(1, 2)
               for _ in range(3))
    expected = TORCH_SDPA(q, k, v, scale=0.3)
    got = F.scaled_dot_product_attention(q, k, v, scale=0.3, backend=backend)
    assert got.is_nested and torch.equal(got.values(), expected.values())
    with fused_attn.patch_sdpa(backend="reference"):
        got = F.scaled_dot_product_attention(q, k, v, scale=0.3, backend=backend)
        patched = TF.scaled_dot_product_attention(q, k, v, scale=0.3)
    assert torch.equal(got.values(), expected.values()) and torch.equal(patched.values(), expected.values())
    # each sequence alone, dense, on the kernels: the same attention
    for b, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        dense = [t.transpose(1, 2).values()[lo:hi].transpose(0, 1)[None] for t in (q, k, v)]
        torch.testing.assert_close(got.unbind()[b][None], F.attention(*dense, scale=0.3, backend="reference"))
    with pytest.raises(ValueError, match="backend must be one of"):
        F.scaled_dot_product_attention(q, k, v, backend="fast")
