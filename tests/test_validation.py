"""Bad input gets a clear error naming the argument and what was expected."""
import re

import pytest
import torch

from fused_attn import functional as F


def qkv(B=1, Hq=2, Hkv=2, L=4, D=8, dtype=torch.float32):
    return torch.randn(B, Hq, L, D, dtype=dtype), torch.randn(B, Hkv, L, D, dtype=dtype), torch.randn(B, Hkv, L, D, dtype=dtype)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(q=torch.randn(2, 4, 8)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(1, 2, 4, 7)), ValueError, "head dim"),
    (dict(q=torch.randn(1, 3, 4, 8)), ValueError, "multiple of the key/value heads"),
    (dict(v=torch.randn(1, 2, 5, 8)), ValueError, "same sequence length"),
    (dict(k=torch.randn(2, 2, 4, 8)), ValueError, "batch sizes"),
    (dict(q=torch.randint(0, 3, (1, 2, 4, 8))), TypeError, "q must be a floating-point"),
    (dict(k=torch.randn(1, 2, 4, 8, dtype=torch.float64)), TypeError, "k has dtype float64"),
    (dict(q=torch.randn(1, 2, 4, 8, dtype=torch.complex64)), TypeError, "floating-point"),
    (dict(attn_mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "not broadcastable"),
    (dict(attn_mask=torch.ones(4, 4, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
    (dict(attn_mask=torch.ones(4, 4, dtype=torch.float64)), TypeError, "attn_mask must be bool"),
    (dict(attn_mask=[[1]]), TypeError, "attn_mask must be a torch.Tensor"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(window_size=4), TypeError, r"window_size must be None or a pair of ints \(left, right\), got 4"),
    (dict(window_size=(1, 2, 3)), TypeError, "window_size must be None or a pair"),
    (dict(window_size=(1.5, 0)), TypeError, "window_size must be None or a pair"),
    (dict(window_size=(True, 0)), TypeError, "window_size must be None or a pair"),
    (dict(window_size=(-2, 0)), ValueError, r"window_size sides must be >= 0, or -1 for unbounded, got \(-2, 0\)"),
    (dict(softcap=-1.0), ValueError,
     r"softcap must be 0 or None \(off\), or a number in \[1e-30, 2.35866e\+38\], got -1.0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be 0 or None"),
    # a cap so small that 1 / softcap overflows float32: the cpu kernel refused it only after
    # attention_with_kvcache had written the cache
    (dict(softcap=1e-39), ValueError, r"or a number in \[1e-30, .*\], got 1e-39"),
    # a cap beyond float32's range: inf in the kernels, and inf * tanh(s / inf) = NaN everywhere
    (dict(softcap=3.5e38), ValueError, r"or a number in \[1e-30, 2.35866e\+38\], got 3.5e\+38"),
    (dict(scale=1e39), ValueError, r"scale must be at most 2.35866e\+38 in magnitude .* got 1e\+39"),
    # within float32's range but past float32's max / log2(e): the Triton kernels take softcap *
    # log2(e) and scale * log2(e) as float32 (their base-2 logits), inf there, and returned NaN
    (dict(softcap=3e38), ValueError, r"or a number in \[1e-30, 2.35866e\+38\], got 3e\+38 .*softcap \* log2\(e\)"),
    (dict(scale=3e38), ValueError,
     r"scale must be at most 2.35866e\+38 in magnitude .*scale \* log2\(e\).* got 3e\+38"),
    (dict(scale=-2.4e38), ValueError, r"scale must be at most 2.35866e\+38 in magnitude .* got -2.4e\+38"),
    # an empty head dim: every logit 0 (the empty-input shortcut gave zeros where SDPA gives v's mean)
    (dict(q=torch.randn(1, 2, 4, 0), k=torch.randn(1, 2, 4, 0)), ValueError, "head dim .* at least 1, got 0"),
    (dict(softcap="30"), TypeError, "softcap must be a float or None, got '30'"),
    (dict(alignment="bottom-right"), ValueError, "alignment must be one of 'top_left', 'bottom_right', got 'bottom-right'"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite float or None, got nan"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
])
def test_attention_rejects(kwargs, exc, match):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args.update({key: kwargs.pop(key) for key in list(kwargs) if key in args})
    with pytest.raises(exc, match=match):
        F.attention(args["q"], args["k"], args["v"], **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(residual=torch.randn(3, 6)), ValueError, "residual must have x's shape"),
    (dict(residual=torch.randn(3, 5, dtype=torch.float64)), TypeError, "residual has dtype"),
    (dict(weight=torch.randn(6)), ValueError, r"weight must have shape \(5,\)"),
    (dict(bias=torch.randn(5, 1)), ValueError, "bias must be 1-D"),
    (dict(eps=0.0), ValueError, "eps must be a positive"),
    (dict(eps=-1e-5), ValueError, "eps"),
    (dict(dropout_p=2.0), ValueError, "dropout_p"),
    (dict(prenorm="yes"), TypeError, "prenorm must be a bool"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
])
def test_layer_norm_residual_rejects(kwargs, exc, match):
    x = torch.randn(3, 5)
    residual = kwargs.pop("residual", torch.randn(3, 5))
    with pytest.raises(exc, match=match):
        F.layer_norm_residual(x, residual, **kwargs)


def test_layer_norm_residual_fp32_residual_needs_flag():
    x, r = torch.randn(3, 5, dtype=torch.float16), torch.randn(3, 5)
    with pytest.raises(TypeError, match="residual_in_fp32"):
        F.layer_norm_residual(x, r)
    out, summed = F.layer_norm_residual(x, r, residual_in_fp32=True, prenorm=True)
    assert out.dtype == torch.float16 and summed.dtype == torch.float32


@pytest.mark.parametrize("change,exc,match", [
    (dict(w1=torch.randn(10, 7)), ValueError, r"w1 must have shape \(d_ff, 6\)"),
    (dict(w2=torch.randn(5, 9)), ValueError, "w2 must have shape"),
    (dict(b1=torch.randn(9)), ValueError, "b1 must have shape"),
    (dict(b2=torch.randn(4)), ValueError, "b2 must have shape"),
    (dict(activation="tanh"), ValueError, "activation must be one of"),
    (dict(activation="swiglu", w1=torch.randn(11, 6), b1=None), ValueError, "even first dimension"),
    (dict(x=torch.randn(2, 6, dtype=torch.float16)), TypeError, "w1 has dtype"),
])
def test_feed_forward_rejects(change, exc, match):
    args = dict(x=torch.randn(2, 6), w1=torch.randn(10, 6), b1=torch.randn(10), w2=torch.randn(5, 10), b2=torch.randn(5),
                activation="relu")
    args.update(change)
    with pytest.raises(exc, match=match):
        F.feed_forward(args["x"], args["w1"], args["b1"], args["w2"], args["b2"], activation=args["activation"])


def test_window_sides_past_int64_are_unbounded():
    """A window side wider than any length (even past int64, which the compiled ops' int
    arguments overflowed) is the same as -1, unbounded."""
    q, k, v = qkv(L=6)
    for backend in ("reference", "cpu"):
        torch.testing.assert_close(F.attention(q, k, v, window_size=(2**64, 0), backend=backend),
                                   F.attention(q, k, v, window_size=(-1, 0), backend=backend))


def _xformers():
    from fused_attn.integrations import xformers
    return xformers


def _flash():
    from fused_attn.integrations import flash_attn
    return flash_attn


@pytest.mark.parametrize("call,exc,match", [
    (lambda: F.attention(*qkv(), causal=__import__("numpy").bool_(True)), TypeError,
     "causal must be a bool, got numpy.bool"),  # (said "must be a bool, got bool")
    (lambda: F.apply_rotary_emb(torch.randn(1, 4, 2, 8), torch.ones(4, 4), torch.zeros(4, 4), max_seqlen="abc"),
     TypeError, "max_seqlen must be None or an int >= 0, got 'abc'"),  # (accepted unchecked)
    (lambda: F.apply_rotary_emb(torch.randn(1, 4, 2, 8), torch.ones(4, 4), torch.zeros(4, 4), max_seqlen=-7),
     ValueError, "max_seqlen must be None or an int >= 0, got -7"),
    (lambda: F.merge_attention(None, None), TypeError, "outs and lses must be sequences .* got NoneType"),
    (lambda: __import__("fused_attn").swap_modules(None), TypeError, "model must be a torch.nn.Module, got NoneType"),
    (lambda: __import__("fused_attn").restore_modules(None), TypeError, "model must be a torch.nn.Module"),
    (lambda: F.get_alibi_slopes(10 ** 12), ValueError, r"num_heads must be an int from 1 to 2\*\*20"),  # (OOM)
    (lambda: F.get_alibi_slopes(2.0), TypeError, r"num_heads must be an int from 1 to 2\*\*20, got float"),
    (lambda: F.get_alibi_slopes(True), TypeError, r"num_heads must be an int from 1 to 2\*\*20, got bool"),
    (lambda: F.attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                         scale=float("nan")), ValueError, "scale must be a finite float or None, got nan"),
    (lambda: F.attention(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4),
                         scale="0.5"), TypeError, "scale must be a finite float or None, got str"),
    (lambda: F.merge_attention([torch.randn(2, 4).half(), torch.randn(2, 4).bfloat16()], [torch.randn(2)] * 2),
     TypeError, r"outs\[1\] must match outs\[0\]"),
    (lambda: F.merge_attention([torch.randn(2, 4), torch.randn(3, 4)], [torch.randn(2), torch.randn(3)]),
     ValueError, r"outs\[1\] must match outs\[0\]"),
    (lambda: _xformers().memory_efficient_attention(*[torch.randn(1, 4, 2, 8)] * 3, output_dtype=torch.int32),
     TypeError, "output_dtype must be a floating torch.dtype"),  # (cast the result to int)
    (lambda: _flash().layer_norm_fn(torch.randn(3, 8), torch.ones(8), None, out_dtype=torch.int32), TypeError,
     "out_dtype must be a floating torch.dtype"),
    (lambda: _flash().unpad_input(torch.randn(2, 3, 4), None), TypeError,
     "attention_mask must be a torch.Tensor, got NoneType"),  # (AttributeError)
    (lambda: F.feed_forward([[0.0] * 4] * 3, (torch.randn(5, 4), torch.randn(5, 4)), None, torch.randn(4, 5), None,
                            activation="swiglu"), TypeError, "x must be a torch.Tensor, got list"),  # (AttributeError)
])
def test_other_bad_inputs_say_what_was_expected(call, exc, match):
    """Inputs that raised an AttributeError or IndexError from inside, a message naming the wrong
    type, or were accepted unchecked: each raises naming the argument and what it takes."""
    with pytest.raises(exc, match=match):
        call()


def test_numpy_ints_and_patched_sdpa_non_tensors():
    """get_alibi_slopes takes numpy ints as ints; torch's SDPA, patched, gives torch's own TypeError
    for a non-tensor query (it raised AttributeError: 'list' object has no attribute 'is_nested')."""
    import numpy as np

    import fused_attn
    torch.testing.assert_close(F.get_alibi_slopes(np.int64(8)), F.get_alibi_slopes(8))
    with fused_attn.patch_sdpa():
        with pytest.raises(TypeError, match="must be Tensor, not list"):
            torch.nn.functional.scaled_dot_product_attention([[0.0]], torch.zeros(1, 1), torch.zeros(1, 1))


def _generator_calls(generator, dropout_p):
    """Each call taking ``generator=``, on small CPU inputs."""
    q, k, v = qkv()
    x, w = torch.randn(3, 8), torch.randn(8, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    return [
        lambda: F.attention(q, k, v, dropout_p=dropout_p, generator=generator),
        lambda: F.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, cu,
                                   dropout_p=dropout_p, generator=generator),
        lambda: F.layer_norm_residual(x, dropout_p=dropout_p, generator=generator),
        lambda: F.feed_forward(x, w, None, w, None, dropout_p=dropout_p, generator=generator),
    ]


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_generator_must_be_a_torch_generator(dropout_p):
    """generator=42 reached torch.randint, whose TypeError did not name generator, and with
    dropout_p = 0 it was ignored unchecked: every call taking generator= now says what it takes."""
    for call in _generator_calls(42, dropout_p):
        with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int 42"):
            call()


class _DeviceGenerator(torch.Generator):
    """A CPU generator that says it lives on cuda:0 (no other device exists on a CPU-only machine)."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_generator_of_another_device_than_the_inputs_is_refused():
    for call in _generator_calls(_DeviceGenerator(), 0.1):
        with pytest.raises(ValueError, match=r"generator is on cuda:0 but the inputs are on cpu: pass a CPU "
                                             r"generator \(torch.Generator\(\)\) or one on the inputs' device"):
            call()


@pytest.mark.gpu  # (skipped without CUDA by conftest; the mark puts it in gpu_check.sh's pytest -m gpu)
def test_a_generator_of_the_inputs_device_draws_the_seed():
    """docs/backends.md's torch.Generator(q.device) (Dropout): on CUDA tensors a CUDA generator (torch.randint on the
    CPU refused it: "Expected a 'cpu' device type for generator but found 'cuda'"). The seed is
    drawn on its device: the same seed gives the same masks, another seed others."""
    q = torch.randn(1, 2, 16, 8, device="cuda")
    x = torch.randn(4, 32, device="cuda")
    for call in (lambda g: F.attention(q, q, q, dropout_p=0.5, generator=g),
                 lambda g: F.layer_norm_residual(x, dropout_p=0.5, generator=g)):
        a, b, c = (call(torch.Generator(q.device).manual_seed(s)) for s in (0, 0, 1))
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("call,match", [
    (lambda: F.attention(*qkv(), scale=10**400),
     r"scale must be at most 2.35866e\+38 in magnitude .* got an int of 1329 bits"),
    (lambda: F.attention(*qkv(), softcap=10**400), r"softcap must be 0 or None .* got an int of 1329 bits"),
    (lambda: F.attention(*qkv(), dropout_p=10**400), r"dropout_p must be in \[0, 1\), got an int of 1329 bits"),
    (lambda: F.layer_norm_residual(torch.randn(3, 5), eps=10**400), "eps must be a positive finite float, got an int"),
    (lambda: F.layer_norm_residual(torch.randn(3, 5), dropout_p=10**400), r"dropout_p must be in \[0, 1\)"),
    (lambda: F.apply_rotary_emb(torch.randn(1, 3, 2, 8), torch.ones(8, 4), torch.zeros(8, 4), seqlen_offsets=2**70),
     "seqlen_offsets = 1180591620717411303424 puts the 3 tokens at positions 1180591620717411303424"),
    (lambda: F.apply_rotary_emb(torch.randn(3, 2, 8), torch.ones(8, 4), torch.zeros(8, 4), seqlen_offsets=2**70,
                                cu_seqlens=torch.tensor([0, 3])), "seqlen_offsets = 1180591620717411303424 puts"),
    (lambda: F.attention_with_kvcache(torch.randn(1, 1, 2, 8), torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8),
                                      cache_seqlens=2**40), "cache_seqlens must be at most 2147483647"),
    (lambda: F.attention_varlen(*(torch.randn(3, 2, 8) for _ in range(3)), torch.tensor([0, 3]), torch.tensor([0, 3]),
                                max_seqlen_q=2**70), "max_seqlen_q must be at most 9223372036854775807"),
    (lambda: F.attention_varlen(*(torch.randn(3, 2, 8) for _ in range(3)), torch.tensor([0, 3]), torch.tensor([0, 3]),
                                max_seqlen_k=2**70), "max_seqlen_k must be at most 9223372036854775807"),
])
def test_ints_too_large_for_a_float_or_an_int64_are_value_errors(call, match):
    """Python ints past a float's or int64's range raised OverflowError (float(), math.isfinite,
    torch.arange) or a RuntimeError from torch.full or the C++ op: a ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        call()


# --- nested tensors ---------------------------------------------------------------------------
# A nested tensor's dtype and dim are a dense one's, so it passed the checks and failed deep
# inside torch on every backend (NotImplementedError fused_attn.attention_fwd.default, "view():
# cannot view shape (2, j1, 8)", "NestedTensorImpl doesn't support sizes", a k/v length mismatch
# between two jagged dims, an AttributeError of NestedIntNode, ...). Each entry now refuses one
# with a TypeError naming the argument and saying what to pass.

def _nested(layout, tail, ragged_dim=1):
    """A nested batch of two sequences of 3 and 5 tokens, each (L, *tail); the ragged dim moved
    to ``ragged_dim`` (2: attention's (B, H, j, D) from (B, j, H, D))."""
    parts = [torch.randn(n, *tail) for n in (3, 5)]
    if layout == "jagged":
        nt = torch.nested.nested_tensor_from_jagged(torch.cat(parts), torch.tensor([0, 3, 8]))
        return nt.transpose(1, 2) if ragged_dim == 2 else nt
    return torch.nested.nested_tensor([p.transpose(0, 1) if ragged_dim == 2 else p for p in parts])


def _nested_calls(nt):
    """(call, argument name, a word of the hint) for each entry point, ``nt(tail, ragged_dim)``
    making the nested argument."""
    q, k, v = qkv(B=2, L=5, D=4)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    packed = torch.randn(8, 2, 4)
    cache, seqlens = torch.randn(2, 8, 2, 4), torch.tensor([2, 3], dtype=torch.int32)
    x, w1, w2 = torch.randn(2, 5, 8), torch.randn(16, 8), torch.randn(8, 16)
    cos, sin = torch.ones(8, 2), torch.zeros(8, 2)
    import fused_attn
    return [
        (lambda: F.attention(nt((2, 4), 2), k, v), "q", "attention_varlen"),
        (lambda: F.attention(q, nt((2, 4), 2), v), "k", "attention_varlen"),
        (lambda: F.attention(q, k, nt((2, 4), 2), backend="reference"), "v", "attention_varlen"),
        (lambda: F.attention_varlen(nt((2, 4)), packed, packed, cu, cu), "q", "offsets()"),
        (lambda: F.attention_varlen(packed, packed, nt((2, 4)), cu, cu), "v", "offsets()"),
        (lambda: F.attention_with_kvcache(nt((2, 4)), cache, cache, cache_seqlens=seqlens), "q", "cache_seqlens"),
        (lambda: F.attention_with_kvcache(q.transpose(1, 2), nt((2, 4)), cache, cache_seqlens=seqlens), "k_cache",
         "cache_seqlens"),
        (lambda: F.layer_norm_residual(nt((8,))), "x", "per token"),
        (lambda: F.layer_norm_residual(x, nt((8,)), torch.ones(8)), "residual", "per token"),
        (lambda: F.feed_forward(nt((8,)), w1, None, w2, None), "x", "per token"),
        (lambda: F.feed_forward(nt((8,)), (w1, w1), None, w2, None, activation="swiglu"), "x", "per token"),
        (lambda: F.apply_rotary_emb(nt((2, 4)), cos, sin), "x", "cu_seqlens="),
        (lambda: F.apply_rotary_emb(nt((2, 4)), cos, sin, inplace=True), "x", "cu_seqlens="),
        (lambda: F.merge_attention([nt((2, 4), 2)], [torch.zeros(2, 2, 8)]), r"outs\[0\]", "lse.t()"),
        (lambda: F.merge_attention([torch.randn(2, 2, 8, 4)], [nt((2,), 2)]), r"lses\[0\]", "lse.t()"),
        (lambda: fused_attn.MultiHeadAttention(8, 2)(nt((8,))), "query", "cu_seqlens="),
        (lambda: fused_attn.MultiHeadAttention(8, 2)(x, nt((8,))), "key", "cu_seqlens="),
        (lambda: fused_attn.MultiHeadAttention(8, 2)(nt((8,)), cu_seqlens=cu), "query", "cu_seqlens="),
        (lambda: fused_attn.LayerNormResidual(8)(nt((8,))), "x", "per token"),
        (lambda: fused_attn.FeedForward(8, 16)(nt((8,))), "x", "per token"),
        (lambda: fused_attn.TransformerLayer(8, 2)(nt((8,))), "query", "cu_seqlens="),
        # the other tensor arguments (which failed alike)
        (lambda: F.attention(q, k, v, attn_mask=nt((5,))), "attn_mask", "pass a dense tensor"),
        (lambda: F.attention(q, k, v, alibi_slopes=nt((2,))), "alibi_slopes", "pass a dense tensor"),
        (lambda: F.attention(q, k, v, sinks=nt((2,))), "sinks", "pass a dense tensor"),
        (lambda: F.attention_varlen(packed, packed, packed, nt((1,)).int(), cu), "cu_seqlens_q", "pass a dense tensor"),
        (lambda: F.attention_with_kvcache(q.transpose(1, 2), cache, cache, cache_seqlens=nt((1,)).int()),
         "cache_seqlens", "pass a dense tensor"),
        (lambda: F.apply_rotary_emb(q.transpose(1, 2), nt((2,)), sin), "cos", "pass a dense tensor"),
        (lambda: F.apply_rotary_emb(packed, cos, sin, position_ids=nt((1,)).long()), "position_ids",
         "pass a dense tensor"),
        (lambda: F.layer_norm_residual(x, weight=nt((8,))), "weight", "pass a dense tensor"),
        (lambda: F.feed_forward(x, nt((8,)), None, w2, None), "w1", "pass a dense tensor"),
        (lambda: F.feed_forward(x, w1, nt((1,)), w2, None), "b1", "pass a dense tensor"),
    ]


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("layout", ["jagged", "strided"])
@pytest.mark.parametrize("case", range(len(_nested_calls(None))))
def test_nested_tensors_are_refused_naming_the_argument(layout, case):
    call, name, hint = _nested_calls(lambda tail, ragged_dim=1: _nested(layout, tail, ragged_dim))[case]
    with pytest.raises(TypeError, match=rf"^{name} is a nested tensor \(torch\.{layout} layout\), which fused_attn's "
                                        rf"ops do not take: .*{re.escape(hint)}"):
        call()


def test_nested_tensor_hints_work():
    """What the messages say to pass gives the nested call's result: attention_varlen on the
    values() and offsets() of jagged (B, H, j, D) q, k, v (torch's SDPA on them as the oracle), a
    norm on values() (per token), the rotary embedding with cu_seqlens=offsets()."""
    q, k, v = (_nested("jagged", (2, 4), 2) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    cu = q.offsets()
    out = F.attention_varlen(*(t.transpose(1, 2).values() for t in (q, k, v)), cu, cu, backend="reference")
    torch.testing.assert_close(out, expected.transpose(1, 2).values())
    x = _nested("jagged", (8,))
    torch.testing.assert_close(F.layer_norm_residual(x.values()), torch.nn.functional.layer_norm(x, (8,)).values())
    cos, sin = torch.randn(8, 2), torch.randn(8, 2)
    x = _nested("jagged", (2, 4))
    parts = [F.apply_rotary_emb(p[None], cos, sin)[0] for p in x.unbind()]
    torch.testing.assert_close(F.apply_rotary_emb(x.values(), cos, sin, cu_seqlens=x.offsets()), torch.cat(parts))
