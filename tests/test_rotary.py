"""Rotary position embedding (``apply_rotary_emb``): every backend that runs here against the float64
reference, forward and gradient; the conventions of the models that use it (Llama's rotate-half,
GPT-J's rotate-every-two); positions from offsets, packed sequences and position ids; layouts;
torch.compile; bad input."""
import math

import pytest
import torch

import fused_attn
from fused_attn import reference as R
from fused_attn.testing import backend_cases, check_against_reference, index_view, runnable_backends

BACKENDS = runnable_backends("rotary")


def tables(S, half, base=10000.0, dtype=torch.float32):
    """FlashAttention's / Llama's tables: angle p * base^(-2i/R) for position p, pair i."""
    inv_freq = 1.0 / base ** (torch.arange(0, half, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(S, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def offset_positions(offsets, B, L):
    offsets = torch.as_tensor(offsets).long().reshape(-1).expand(B)
    return offsets[:, None] + torch.arange(L)


def dtypes_for(backend, device="cpu"):
    if device == "cuda":  # the GPU backends: no float64
        return [torch.float32, torch.float16, torch.bfloat16]
    if backend == "triton":  # the interpreter: no bfloat16 arithmetic, float64 is not a Triton dtype here
        return [torch.float32, torch.float16]
    return [torch.float32, torch.float16, torch.bfloat16, torch.float64]


CASES = [  # B, L, H, D, R/2, interleaved, offsets
    (2, 17, 3, 64, 32, False, 0),
    (2, 17, 3, 64, 16, True, [5, 0]),
    (1, 97, 1, 59, 20, False, 7),
    (3, 1, 2, 40, 20, True, [0, 3, 60]),
    (1, 5, 2, 16, 1, False, [2]),
]


@pytest.mark.parametrize("device,backend", backend_cases("rotary"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}L{}H{}D{}h{}{}".format(*c[:5], "i" if c[5] else ""))
def test_matches_reference(device, backend, case):
    """Forward and gradient against the float64 formula; on a GPU (gpu-marked cases) the Triton
    and CUDA kernels in float32, float16 and bfloat16, the positions checked on the device."""
    B, L, H, D, half, interleaved, offsets = case
    S = 64 + L
    for dtype in dtypes_for(backend, device):
        g = torch.Generator().manual_seed(B * 100 + L)
        x = torch.randn(B, L, H, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
        cos, sin = (t.to(device) for t in tables(S, half, dtype=torch.float32))
        off = offsets if isinstance(offsets, int) else torch.tensor(offsets, dtype=torch.int32, device=device)
        positions = offset_positions(offsets, B, L).to(device)
        check_against_reference(
            lambda x_, c_, s_: fused_attn.apply_rotary_emb(x_, c_, s_, interleaved=interleaved, seqlen_offsets=off,
                                                           backend=backend),
            lambda x_, c_, s_: R.rotary(x_, c_, s_, positions, interleaved),
            [x, cos, sin], names=["x", "cos", "sin"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_llama_and_gptj_conventions(backend):
    """interleaved=False is Llama's / GPT-NeoX's x*cos + rotate_half(x)*sin with duplicated
    tables; interleaved=True is GPT-J's rotate_every_two with repeat-interleaved tables."""
    B, L, H, D = 2, 9, 2, 16
    x = torch.randn(B, L, H, D, dtype=torch.float64 if backend != "triton" else torch.float32)
    cos, sin = tables(L, D // 2, dtype=x.dtype)
    c, s = cos[None, :, None], sin[None, :, None]  # (1, L, 1, D/2)

    def rotate_half(t):
        t1, t2 = t[..., : D // 2], t[..., D // 2:]
        return torch.cat((-t2, t1), dim=-1)

    def rotate_every_two(t):
        return torch.stack((-t[..., 1::2], t[..., 0::2]), dim=-1).flatten(-2)

    llama = x * torch.cat((c, c), -1) + rotate_half(x) * torch.cat((s, s), -1)
    gptj = x * c.repeat_interleave(2, -1) + rotate_every_two(x) * s.repeat_interleave(2, -1)
    tol = dict(atol=1e-12, rtol=0) if x.dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_attn.apply_rotary_emb(x, cos, sin, backend=backend), llama, **tol)
    torch.testing.assert_close(fused_attn.apply_rotary_emb(x, cos, sin, interleaved=True, backend=backend), gptj,
                               **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_positions(backend):
    """What RoPE is for: q.k after the embedding depends only on the distance between positions."""
    D = 32
    q, k = torch.randn(1, 1, 1, D, dtype=torch.float32), torch.randn(1, 1, 1, D, dtype=torch.float32)
    cos, sin = tables(200, D // 2)

    def score(pq, pk):
        rq = fused_attn.apply_rotary_emb(q, cos, sin, seqlen_offsets=pq, backend=backend)
        rk = fused_attn.apply_rotary_emb(k, cos, sin, seqlen_offsets=pk, backend=backend)
        return float((rq * rk).sum())

    assert score(10, 3) == pytest.approx(score(110, 103), abs=1e-4)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_restart_positions(backend):
    """cu_seqlens: each sequence is the (1, len) call with its own offset, bitwise."""
    lens, offsets = [0, 1, 17, 5], torch.tensor([4, 0, 9, 30], dtype=torch.int64)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    x = torch.randn(int(cu[-1]), 3, 40)
    cos, sin = tables(64, 12)
    out = fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets, cu_seqlens=cu, max_seqlen=17,
                                      backend=backend)
    assert out.shape == x.shape
    for s, n in enumerate(lens):
        a, b = int(cu[s]), int(cu[s + 1])
        alone = fused_attn.apply_rotary_emb(x[a:b][None], cos, sin, seqlen_offsets=int(offsets[s]), backend=backend)
        assert torch.equal(out[a:b], alone[0])
    # an int offset is every sequence's; no offset restarts each at 0
    first = fused_attn.apply_rotary_emb(x, cos, sin, cu_seqlens=cu, backend=backend)
    assert torch.equal(first[1:18], fused_attn.apply_rotary_emb(x[1:18][None], cos, sin, backend=backend)[0])
    shifted = fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=3, cu_seqlens=cu, backend=backend)
    assert not torch.equal(shifted, first)
    for s in range(len(lens)):
        a, b = int(cu[s]), int(cu[s + 1])
        alone = fused_attn.apply_rotary_emb(x[a:b][None], cos, sin, seqlen_offsets=3, backend=backend)
        assert torch.equal(shifted[a:b], alone[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_position_ids(backend):
    """Hugging Face's position ids: per token, broadcast over the batch, or left-padded rows."""
    B, L, H, D = 2, 6, 2, 16
    x = torch.randn(B, L, H, D)
    cos, sin = tables(32, 8)
    by_offset = fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=3, backend=backend)
    ids = torch.arange(3, 3 + L)
    assert torch.equal(fused_attn.apply_rotary_emb(x, cos, sin, position_ids=ids[None], backend=backend), by_offset)
    assert torch.equal(fused_attn.apply_rotary_emb(x, cos, sin, position_ids=ids, backend=backend), by_offset)
    left_padded = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
    out = fused_attn.apply_rotary_emb(x, cos, sin, position_ids=left_padded, backend=backend)
    torch.testing.assert_close(out.double(), R.rotary(x.double(), cos.double(), sin.double(), left_padded),
                               atol=1e-6, rtol=0)
    flat = fused_attn.apply_rotary_emb(x[0], cos, sin, position_ids=left_padded[0], backend=backend)  # (L, H, D)
    assert torch.equal(flat, out[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Bc", [1, 2])
def test_rotate_token_tables_per_batch_rows(backend, Bc):
    """rotate_token_tables (Hugging Face's per-token cos/sin, (Bc, L, D/2)): with Bc == B each batch
    row turns by its own table rows (left padding, per-row position_ids), with Bc == 1 every row
    by the one table; against the closed-form rotate-half rotation, q and k (other head counts)."""
    from fused_attn.rotary import rotate_token_tables

    B, L, D = 2, 5, 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(B, L, 3, D, generator=g), torch.randn(B, L, 1, D, generator=g)
    angles = torch.randn(Bc, L, D // 2, generator=g) * 3

    def closed_form(t):
        c, s = angles.cos()[:, :, None].double(), angles.sin()[:, :, None].double()
        t1, t2 = t.double()[..., :D // 2], t.double()[..., D // 2:]
        return torch.cat([t1 * c - t2 * s, t1 * s + t2 * c], -1).float()

    outs = rotate_token_tables((q, k), angles.cos(), angles.sin(), backend)
    for t, out in zip((q, k), outs):
        torch.testing.assert_close(out, closed_form(t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_views_equal_dense(backend):
    """seqlen_offsets, cu_seqlens and position_ids as strided views at an offset (``index_view``; the
    ids (B, L) stored transposed) and a column of a 2-D tensor: the output and x's gradient bitwise
    those of dense ones (the kernels read the positions through their strides and offset)."""
    cos, sin = tables(32, 8)
    x, packed = torch.randn(2, 5, 2, 16), torch.randn(7, 2, 16)
    offsets = torch.tensor([3, 9], dtype=torch.int32)
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    ids = torch.tensor([[0, 4, 2, 7, 1], [5, 5, 0, 3, 9]])
    column = torch.zeros(5, 3, dtype=torch.int64)
    column[:, 1] = ids[1]
    calls = {  # name: (x, dense keyword arguments, the same as views)
        "seqlen_offsets": (x, dict(seqlen_offsets=offsets), dict(seqlen_offsets=index_view(offsets))),
        "cu_seqlens": (packed, dict(cu_seqlens=cu, seqlen_offsets=offsets),
                       dict(cu_seqlens=index_view(cu), seqlen_offsets=index_view(offsets))),
        "position_ids": (x, dict(position_ids=ids), dict(position_ids=index_view(ids))),
        "position_ids column": (x, dict(position_ids=ids[1:]), dict(position_ids=column[:, 1][None])),
    }
    for name, (x_, dense, views) in calls.items():
        results = []
        for kwargs in (dense, views):
            leaf = x_.clone().requires_grad_()
            out = fused_attn.apply_rotary_emb(leaf, cos, sin, backend=backend, **kwargs)
            (out * x_).sum().backward()
            results.append((out, leaf.grad))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_and_inputs_untouched(backend):
    """A (B, H, L, D) tensor viewed as (B, L, H, D) (Hugging Face's layout) keeps its layout; odd
    strides and non-contiguous tables read through strides; nothing passed in changes."""
    B, H, L, D = 2, 3, 17, 40
    x_bhld = torch.randn(B, H, L, D)
    x = x_bhld.transpose(1, 2)
    table = torch.randn(2, 64, 40)
    cos, sin = tables(64, 20)
    cos_nc = torch.stack((cos, cos), -1)[..., 0]  # stride 2 along the columns
    keep = [t.clone() for t in (x, cos, sin)]
    out = fused_attn.apply_rotary_emb(x, cos_nc, sin, seqlen_offsets=2, backend=backend)
    assert out.stride() == x.stride()
    positions = offset_positions(2, B, L)
    torch.testing.assert_close(out.double(), R.rotary(x.double(), cos.double(), sin.double(), positions),
                               atol=1e-6, rtol=0)
    strided = torch.randn(B, L, H, 2 * D)[..., ::2]  # last-dim stride 2
    torch.testing.assert_close(fused_attn.apply_rotary_emb(strided, cos, sin, backend=backend).double(),
                               R.rotary(strided.double(), cos.double(), sin.double(), offset_positions(0, B, L)),
                               atol=1e-6, rtol=0)
    for before, after in zip(keep, (x, cos, sin)):
        assert torch.equal(before, after)
    del table


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    cos, sin = tables(8, 4)
    for shape in ((0, 3, 2, 8), (2, 0, 2, 8), (2, 3, 0, 8)):
        x = torch.randn(shape, requires_grad=True)
        out = fused_attn.apply_rotary_emb(x, cos, sin, backend=backend)
        assert out.shape == x.shape
        out.sum().backward()
        assert x.grad.shape == x.shape
    cu = torch.tensor([0, 0], dtype=torch.int32)
    assert fused_attn.apply_rotary_emb(torch.randn(0, 2, 8), cos, sin, cu_seqlens=cu, backend=backend).shape == (0, 2, 8)


def test_cpu_is_auto_on_cpu(monkeypatch):
    """auto on CPU tensors runs the C++ kernel (no fallback warning)."""
    if "cpu" not in BACKENDS:
        pytest.skip("fused_attn._C is not built")
    from fused_attn.backends import BACKENDS as ALL

    calls = []
    original = type(ALL["cpu"]).rotary
    monkeypatch.setattr(type(ALL["cpu"]), "rotary", lambda self, *a: (calls.append(a[0].shape), original(self, *a))[1])
    x = torch.randn(1, 4, 2, 8)
    cos, sin = tables(8, 4)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_attn.apply_rotary_emb(x, cos, sin)
    assert calls == [(1, 4, 2, 8)]


def test_compiled_fullgraph():
    """One graph, forward and backward, with tensor offsets (the positions stay on the device)."""
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    cos, sin = tables(64, 8)

    def f(x, off):
        return fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=off, backend=backend).square().sum()

    x = torch.randn(2, 7, 2, 16, requires_grad=True)
    off = torch.tensor([1, 30])
    eager = f(x, off)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, off)
    (g,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, g_eager)


def _bad_calls():
    x = torch.randn(2, 5, 2, 16)
    cos, sin = tables(8, 4)
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    flat = torch.randn(5, 2, 16)
    return [
        ("x must be 4-D", lambda: fused_attn.apply_rotary_emb(x[0, 0], cos, sin), ValueError),
        ("x must be 3-D", lambda: fused_attn.apply_rotary_emb(x, cos, sin, cu_seqlens=cu), ValueError),
        ("x must be a floating", lambda: fused_attn.apply_rotary_emb(x.long(), cos, sin), TypeError),
        ("cos must be 2-D", lambda: fused_attn.apply_rotary_emb(x, cos[0], sin), ValueError),
        ("same shape", lambda: fused_attn.apply_rotary_emb(x, cos, sin[:, :2]), ValueError),
        ("share a dtype", lambda: fused_attn.apply_rotary_emb(x, cos, sin.double()), TypeError),
        ("between 1 and D/2", lambda: fused_attn.apply_rotary_emb(x, *tables(8, 9)), ValueError),
        ("between 1 and D/2", lambda: fused_attn.apply_rotary_emb(x, cos[:, :0], sin[:, :0]), ValueError),
        ("outside the 8 rows", lambda: fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=4), ValueError),
        ("outside the 8 rows", lambda: fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=-1), ValueError),
        ("outside the 8 rows", lambda: fused_attn.apply_rotary_emb(x, cos, sin,
                                                                   seqlen_offsets=torch.tensor([0, 4])), ValueError),
        ("outside the 8 rows", lambda: fused_attn.apply_rotary_emb(x, cos, sin,
                                                                   position_ids=torch.tensor([0, 1, 2, 3, 8])),
         ValueError),
        ("outside the 8 rows", lambda: fused_attn.apply_rotary_emb(flat, cos, sin, cu_seqlens=cu,
                                                                   seqlen_offsets=torch.tensor([0, 6])), ValueError),
        ("seqlen_offsets must have one entry per batch row", lambda: fused_attn.apply_rotary_emb(
            x, cos, sin, seqlen_offsets=torch.tensor([0, 1, 2])), ValueError),
        ("seqlen_offsets must be int32 or int64", lambda: fused_attn.apply_rotary_emb(
            x, cos, sin, seqlen_offsets=torch.tensor([0.0, 1.0])), TypeError),
        ("seqlen_offsets must be an int", lambda: fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=1.5),
         TypeError),
        ("cannot be combined", lambda: fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=1,
                                                                   position_ids=torch.arange(5)), ValueError),
        ("must broadcast", lambda: fused_attn.apply_rotary_emb(x, cos, sin, position_ids=torch.arange(4)),
         ValueError),
        ("position_ids must be int32 or int64", lambda: fused_attn.apply_rotary_emb(
            x, cos, sin, position_ids=torch.zeros(5)), TypeError),
        ("cu_seqlens must start at 0", lambda: fused_attn.apply_rotary_emb(
            flat, cos, sin, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32)), ValueError),
        ("cu_seqlens must start at 0", lambda: fused_attn.apply_rotary_emb(
            flat, cos, sin, cu_seqlens=torch.tensor([0, 3, 2, 5], dtype=torch.int32)), ValueError),
        ("max_seqlen = 2 is shorter than the longest sequence in cu_seqlens (3)", lambda: fused_attn.apply_rotary_emb(flat, cos, sin, cu_seqlens=cu,
                                                                            max_seqlen=2), ValueError),
        ("interleaved must be a bool", lambda: fused_attn.apply_rotary_emb(x, cos, sin, interleaved=1), TypeError),
        ("backend must be one of", lambda: fused_attn.apply_rotary_emb(x, cos, sin, backend="fast"), ValueError),
        ("cos requires grad", lambda: fused_attn.apply_rotary_emb(x, cos.requires_grad_(), sin), ValueError),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_clearly(case):
    message, call, error = _bad_calls()[case]
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


def test_compiled_op_checks_its_inputs():
    """fused_attn_C::rotary called directly: a RuntimeError, never a crash or a wild read."""
    if "cpu" not in BACKENDS:
        pytest.skip("fused_attn._C is not built")
    op = torch.ops.fused_attn_C.rotary
    x = torch.randn(2, 3, 2, 8)
    cos, sin = tables(4, 4)
    pos = torch.zeros(2, 3, dtype=torch.int64)
    for args, msg in (((x, cos, sin, pos + 4), "outside the 4 rows"),
                      ((x, cos, sin, pos - 1), "outside the 4 rows"),
                      ((x, cos, sin, pos[:1]), "positions must have shape"),
                      ((x, cos, sin, pos.float()), "positions must be int32 or int64"),
                      ((x[0], cos, sin, pos), "x must be 4-D"),
                      ((x, *tables(4, 5), pos), "between 1 and D/2"),
                      ((x, cos, sin.double(), pos), "share a dtype"),
                      ((x.int(), cos, sin, pos), "x must")):
        with pytest.raises(RuntimeError, match=msg):
            op(*args, False, False)
    out_op = torch.ops.fused_attn_C.rotary_out
    buf = torch.randn(2 * 3 * 2 * 8 + 1)
    shifted_x, shifted_out = buf[:-1].view(2, 3, 2, 8), buf[1:].view(2, 3, 2, 8)  # overlapping, not the same
    for x_, out, msg in ((x, torch.empty(2, 3, 2, 4), "out must be a CPU tensor of x's shape"),
                         (x, torch.empty(2, 3, 2, 8, dtype=torch.float64), "out must be a CPU tensor of x's shape"),
                         (x, torch.empty(1, 3, 2, 8).expand(2, 3, 2, 8), "out must not have overlapping elements"),
                         (shifted_x, shifted_out, "out must be x itself or not overlap it")):
        with pytest.raises(RuntimeError, match=msg):
            out_op(x_, cos, sin, pos, False, False, out)
    out_op(x, cos, sin, pos, False, False, x)  # in place: allowed


def test_norm_preserved_and_inverse():
    """A rotation keeps each pair's length; the backward's conjugate turn undoes the forward."""
    x = torch.randn(2, 11, 3, 24, dtype=torch.float64)
    cos, sin = tables(16, 12, dtype=torch.float64)
    for backend in BACKENDS:
        if backend == "triton":
            continue
        out = fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=5, backend=backend)
        torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))
        back = torch.ops.fused_attn.rotary(out, cos, sin, offset_positions(5, 2, 11), False, True, backend)
        torch.testing.assert_close(back, x)
    assert math.isfinite(float(x.sum()))


def test_compiled_dynamic_lengths_and_module():
    """torch.compile(dynamic=True): new lengths and offsets reuse the graph's symbols; the
    rotary MultiHeadAttention compiles in one graph too."""
    cos, sin = tables(128, 8)

    def f(x, off):
        return fused_attn.apply_rotary_emb(x, cos, sin, seqlen_offsets=off).sum()

    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
    for L in (5, 9, 17):
        x = torch.randn(2, L, 2, 16)
        for off in (0, 3, torch.tensor([1, 2])):
            torch.testing.assert_close(compiled(x, off), f(x, off))
    mha = fused_attn.MultiHeadAttention(32, 4, rotary=True, causal=True)
    compiled_mha = torch.compile(mha, dynamic=True, fullgraph=True, backend="aot_eager")
    for L in (5, 9):
        x = torch.randn(2, L, 32)
        torch.testing.assert_close(compiled_mha(x), mha(x))


@pytest.mark.parametrize("device,backend", backend_cases("rotary"))
def test_inplace_writes_into_x(device, backend):
    """inplace=True (FlashAttention's, positional in its order): the very x comes back holding
    exactly what the out-of-place call returns; dense, transposed-view and packed x, and a head
    of 2100 features turned in two 1024-pair chunks of the Triton kernel (on a GPU, the gpu-marked
    cases: each kernel reads what it overwrites)."""
    small, wide = ((t.to(device) for t in tables(64, half)) for half in (12, 1040))
    small, wide = tuple(small), tuple(wide)
    cu = torch.tensor([0, 5, 17], dtype=torch.int32, device=device)
    for interleaved in (False, True):
        cases = [(torch.randn(2, 17, 3, 40, device=device), {}, small),
                 (torch.randn(2, 3, 17, 40, device=device).transpose(1, 2),
                  {"seqlen_offsets": torch.tensor([4, 30], device=device)}, small),
                 (torch.randn(17, 3, 40, device=device), {"cu_seqlens": cu, "seqlen_offsets": 2}, small),
                 (torch.randn(2, 3, 2, 2100, device=device), {}, wide),
                 (torch.randn(2, 17, 3, 3, 40, device=device)[:, :, 1], {}, small)]  # k of a packed qkv
        for x, kwargs, (cos, sin) in cases:
            expected = fused_attn.apply_rotary_emb(x, cos, sin, interleaved, backend=backend, **kwargs)
            before = x.data_ptr()
            out = fused_attn.apply_rotary_emb(x, cos, sin, interleaved, True, backend=backend, **kwargs)
            assert out is x and x.data_ptr() == before
            assert torch.equal(x, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_under_autograd(backend):
    """In place on a non-leaf (marked modified): the same gradient as out of place; on a leaf that
    requires grad, torch's in-place error; on overlapping elements, a clear error."""
    cos, sin = tables(32, 8)
    w = torch.randn(2, 9, 2, 16, requires_grad=True)
    dout = torch.randn(2, 9, 2, 16)
    (fused_attn.apply_rotary_emb(w * 2, cos, sin, backend=backend) * 3).backward(dout)
    expected, w.grad = w.grad, None
    h = w * 2
    out = fused_attn.apply_rotary_emb(h, cos, sin, inplace=True, backend=backend)
    assert out is h
    (out * 3).backward(dout)
    torch.testing.assert_close(w.grad, expected)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        fused_attn.apply_rotary_emb(w, cos, sin, inplace=True, backend=backend)
    with pytest.raises(ValueError, match="inplace=True writes into x, whose elements overlap"):
        fused_attn.apply_rotary_emb(torch.randn(1, 9, 2, 16).expand(2, 9, 2, 16), cos, sin, inplace=True,
                                    backend=backend)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        fused_attn.apply_rotary_emb(h.detach(), cos, sin, inplace="yes", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refused_by_autograd_raises_before_writing(backend):
    """In place on what autograd refuses to modify (grad mode on): a leaf that requires grad, a
    view of one, a view of a multi-output op (split's) and one made under no_grad: torch's own
    error, as x.mul_() gives, and x unchanged (the kernels had written x, and only then did the
    Function's mark_dirty raise, "has been used"). Under no_grad the leaf is written."""
    cos, sin = tables(8, 2)
    leaf = torch.randn(1, 3, 2, 4, requires_grad=True)
    doubled = leaf * 2
    with torch.no_grad():
        no_grad_view = doubled[:, :]
    for x in (leaf, leaf[:, 1:], doubled.split(1, dim=1)[0], no_grad_view):
        before = x.detach().clone()
        with pytest.raises(RuntimeError) as torch_error:
            x.mul_(1)
        with pytest.raises(RuntimeError) as error:
            fused_attn.apply_rotary_emb(x, cos, sin, inplace=True, backend=backend)
        assert str(error.value) == str(torch_error.value) and torch.equal(x.detach(), before)
    expected = fused_attn.apply_rotary_emb(leaf, cos, sin, backend=backend)
    with torch.no_grad():
        assert fused_attn.apply_rotary_emb(leaf, cos, sin, inplace=True, backend=backend) is leaf
    assert torch.equal(leaf.detach(), expected.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_refuses_an_inference_tensor_outside_inference_mode(backend):
    """In place on an inference tensor outside inference mode: torch's own error, as x.mul_()
    gives (the cpu and triton kernels wrote into x past torch's check; only reference raised),
    and x unchanged. Inside inference mode the call writes into it."""
    cos, sin = tables(8, 2)
    with torch.inference_mode():
        x = torch.randn(1, 3, 2, 4)
    before = x.clone()
    with pytest.raises(RuntimeError) as torch_error:
        x.mul_(1)
    with pytest.raises(RuntimeError) as error:
        fused_attn.apply_rotary_emb(x, cos, sin, inplace=True, backend=backend)
    assert str(error.value) == str(torch_error.value) and torch.equal(x, before)
    expected = fused_attn.apply_rotary_emb(x, cos, sin, backend=backend)  # (out of place: allowed)
    with torch.inference_mode():
        assert fused_attn.apply_rotary_emb(x, cos, sin, inplace=True, backend=backend) is x
    assert torch.equal(x, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_bumps_the_version_counter(backend):
    """In place on an x that needs no gradient (or under no_grad), saved by another op of a graph
    (mul saves x for w's gradient): torch's "modified by an inplace operation" at backward, as
    x.mul_() gives. The cpu and triton kernels wrote through x's data pointer without bumping its
    version, and that backward read the turned x: a silently wrong gradient of w."""
    cos, sin = tables(16, 4)
    for no_grad in (False, True):
        x = torch.randn(1, 5, 2, 8)
        w = torch.randn(1, 5, 2, 8, requires_grad=True)
        loss = (x * w).sum()
        version = x._version
        with torch.set_grad_enabled(not no_grad):
            assert fused_attn.apply_rotary_emb(x, cos, sin, inplace=True, backend=backend) is x
        assert x._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_under_allow_mutation_on_saved_tensors(backend):
    """Under torch.autograd.graph.allow_mutation_on_saved_tensors() an in-place embedding of a
    tensor another op saved leaves that op the tensor as saved (the context clones it first), as
    x.mul_() does: the same gradients as writing the out-of-place result with copy_. Before, the
    mutating op's version counter was bumped before the context's dispatch mode saw it: no clone,
    and w's gradient was taken against the turned x (with or without a gradient for x)."""
    cos, sin = tables(16, 4)
    gen = torch.Generator().manual_seed(0)
    a, w = (torch.randn(1, 5, 2, 8, generator=gen, requires_grad=True) for _ in range(2))
    u = torch.randn(1, 5, 2, 8, generator=gen)

    def grads(turn, x_requires_grad):
        a.grad = w.grad = None
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            x = a * 1 if x_requires_grad else a.detach().clone()
            loss = (x * w).sum()  # mul saves x for w's gradient (and w for x's)
            out = turn(x)
            (loss + (out * u).sum()).backward()
        return a.grad, w.grad

    def in_place(x):
        return fused_attn.apply_rotary_emb(x, cos, sin, inplace=True, backend=backend)

    def copied(x):
        return x.copy_(fused_attn.apply_rotary_emb(x, cos, sin, backend=backend))

    for x_requires_grad in (False, True):
        got, expected = grads(in_place, x_requires_grad), grads(copied, x_requires_grad)
        torch.testing.assert_close(got[1], a.detach())  # w's gradient: x as mul saw it
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("half", [4, 3])  # R = D (the whole head turns) and R < D
def test_batched_jacobians_and_gradients(backend, half):
    """torch.autograd.functional.jacobian(vectorize=True) in forward mode and with create_graph,
    autograd.grad(is_grads_batched=True) and gradcheck's batched gradients (all vmap over the
    forward-mode or backward formulas): the unbatched answers. With R = D they raised "Batching
    rule not implemented for aten::alias" (the reference math sliced the whole head)."""
    dtype = torch.float32 if backend == "triton" else torch.float64  # (triton: no float64 here)
    cos, sin = tables(8, half, dtype=dtype)
    x = torch.randn(1, 3, 1, 8, dtype=dtype, generator=torch.Generator().manual_seed(0))

    def f(t):
        return fused_attn.apply_rotary_emb(t, cos, sin, backend=backend)

    expected = torch.autograd.functional.jacobian(f, x)
    jacobian = torch.autograd.functional.jacobian
    for options in ({"strategy": "forward-mode"}, {"create_graph": True}):  # (both by the reference math)
        torch.testing.assert_close(jacobian(f, x, vectorize=True, **options), expected)
    if backend == "triton":
        return  # (vmap over its kernels' backward: the triton launchers take no batched tensor, any op)
    torch.testing.assert_close(jacobian(f, x, vectorize=True), expected)
    x.requires_grad_(True)
    y = f(x)
    grads = torch.randn(3, *y.shape, dtype=dtype)
    (batched,) = torch.autograd.grad(y, x, grads, is_grads_batched=True, retain_graph=True)
    torch.testing.assert_close(batched, torch.stack([torch.autograd.grad(y, x, g, retain_graph=True)[0]
                                                     for g in grads]))
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(f, (x,), check_batched_grad=True, check_forward_ad=True)


@pytest.mark.parametrize("backend", [None] + [b for b in BACKENDS if b in ("reference", "cpu")])
def test_inplace_under_vmap_and_per_sample_grad(backend):
    """inplace=True under torch.func.vmap (auto is cpu here) and vmap(grad) per-sample gradients:
    vmap's fallback ran no out= kernel (cpu raised "Batching rule not implemented for
    fused_attn_C::rotary_out") and torch's generated vmap rule refused the in-place Function under
    vmap(grad) (every backend). Each sample as the out-of-place call on it, written into x."""
    cos, sin = tables(16, 4)
    xs = torch.randn(3, 2, 5, 2, 8, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([fused_attn.apply_rotary_emb(x, cos, sin, backend=backend) for x in xs])
    x = xs.clone()
    out = torch.func.vmap(lambda t: fused_attn.apply_rotary_emb(t, cos, sin, inplace=True, backend=backend))(x)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(x, out)  # written into the vmapped x, as out of vmap

    weights = torch.randn(2, 5, 2, 8, generator=torch.Generator().manual_seed(1))

    def loss(inplace):
        return lambda t: (fused_attn.apply_rotary_emb(t * 2, cos, sin, inplace=inplace, backend=backend)
                          * weights).sum()

    grads = torch.func.vmap(torch.func.grad(loss(True)))(xs)
    torch.testing.assert_close(grads, torch.func.vmap(torch.func.grad(loss(False)))(xs), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend", [None] + [b for b in BACKENDS if b in ("reference", "cpu")])
def test_per_sample_positions_under_vmap(backend):
    """vmap over per-sample seqlen_offsets / position_ids (dense and packed, and under vmap(grad)):
    each sample as the call on it alone. Before, checking the positions read a batched tensor on
    the host inside PyTorch (``.item()`` under vmap); now the values under vmap's wrapper, every
    sample's at once, are checked, and one out of range is the usual ValueError."""
    cos, sin = tables(10, 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 5, 2, 4, generator=gen)
    offsets = torch.tensor([[0, 1], [2, 3], [4, 5]])
    ids = offsets[:, :, None] + torch.arange(5)
    cu = torch.tensor([0, 2, 5])
    packed = x[:, 0]  # (3, total = 5, H, D): two sequences of 2 and 3 tokens per sample

    def rope(**kw):
        return lambda x, p: fused_attn.apply_rotary_emb(x, cos, sin, backend=backend, **{
            name: p if value is None else value for name, value in kw.items()})

    for f, xs, ps in ((rope(seqlen_offsets=None), x, offsets), (rope(position_ids=None), x, ids),
                      (rope(seqlen_offsets=None, cu_seqlens=cu), packed, offsets)):
        expected = torch.stack([f(xi, pi) for xi, pi in zip(xs, ps)])
        torch.testing.assert_close(torch.func.vmap(f)(xs, ps), expected, atol=0, rtol=0)
        grads = torch.func.vmap(torch.func.grad(lambda xi, pi: f(xi, pi).square().sum()))(xs, ps)
        torch.testing.assert_close(grads, torch.stack([torch.func.grad(lambda xi: f(xi, pi).square().sum())(xi)
                                                       for xi, pi in zip(xs, ps)]))
        with pytest.raises(ValueError, match="the positions reach position 1[0-9], outside the 10 rows"):
            torch.func.vmap(f)(xs, ps + 5)


def test_inplace_compiles_fullgraph():
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    cos, sin = tables(32, 8)

    def f(x):
        y = x * 1.0
        fused_attn.apply_rotary_emb(y, cos, sin, inplace=True, seqlen_offsets=3, backend=backend)
        return y.square().sum()

    x = torch.randn(2, 7, 2, 16, requires_grad=True)
    eager = f(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    (g,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, g_eager)
    with torch.no_grad():
        y = torch.randn(2, 7, 2, 16)
        expected = fused_attn.apply_rotary_emb(y, cos, sin, backend=backend)
        g = torch.compile(lambda t: fused_attn.apply_rotary_emb(t, cos, sin, inplace=True, backend=backend),
                          fullgraph=True, backend="aot_eager")
        g(y)
        torch.testing.assert_close(y, expected)


def test_elements_may_overlap_against_brute_force():
    """rotary.elements_may_overlap (and csrc/common/overlap.h, the same test, behind the C++ out
    checks): never False for a view whose elements share memory, and False for the slices,
    transposes and sub-views of dense tensors (torch._debug_has_internal_overlap gives up on most)."""
    from fused_attn.rotary import elements_may_overlap

    gen = torch.Generator().manual_seed(0)
    base = torch.arange(4000)
    for _ in range(400):
        ndim = int(torch.randint(1, 4, (1,), generator=gen))
        shape = [int(s) for s in torch.randint(1, 5, (ndim,), generator=gen)]
        strides = [int(s) for s in torch.randint(0, 25, (ndim,), generator=gen)]
        view = base.as_strided(shape, strides)
        distinct = view.flatten().unique().numel() == view.numel()
        if not distinct:
            assert elements_may_overlap(view), (shape, strides)
    dense = torch.randn(2, 5, 3, 4, 6)
    for view in (dense[:, :, 0], dense[:, 1:4, :, ::2], dense.transpose(1, 3), dense[1, :, 2, 1].t(), dense[..., :0]):
        assert not elements_may_overlap(view)
    assert elements_may_overlap(torch.randn(1, 4).expand(3, 4))
