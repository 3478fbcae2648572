"""Bad input gets a clear error naming the argument and what was expected."""
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
    (dict(softcap=-1.0), ValueError, r"softcap must be 0 or None \(off\), or a number in \[1e-30, 3.40282e\+38\], got -1.0"),
    (dict(softcap=float("inf")), ValueError, "softcap must be 0 or None"),
    # a cap so small that 1 / softcap overflows float32: the cpu kernel refused it only after
    # attention_with_kvcache had written the cache
    (dict(softcap=1e-39), ValueError, r"or a number in \[1e-30, .*\], got 1e-39"),
    # a cap beyond float32's range: inf in the kernels, and inf * tanh(s / inf) = NaN everywhere
    (dict(softcap=3.5e38), ValueError, r"or a number in \[1e-30, 3.40282e\+38\], got 3.5e\+38"),
    (dict(scale=1e39), ValueError, r"scale must be within float32's range .* got 1e\+39"),
    # an empty head dim: every logit 0 (the empty-input shortcut gave zeros where SDPA gives v's mean)
    (dict(q=torch.randn(1, 2, 4, 0), k=torch.randn(1, 2, 4, 0)), ValueError, "head dim .* at least 1, got 0"),
    (dict(softcap="30"), TypeError, "softcap must be a float or None, got '30'"),
    (dict(alignment="bottom-right"), ValueError, "alignment must be one of 'top_left', 'bottom_right', got 'bottom-right'"),
    (dict(scale=float("nan")), TypeError, "scale"),
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_generator_of_the_inputs_device_draws_the_seed():
    """README's torch.Generator(q.device): on CUDA tensors a CUDA generator (torch.randint on the
    CPU refused it: "Expected a 'cpu' device type for generator but found 'cuda'"). The seed is
    drawn on its device: the same seed gives the same masks, another seed others."""
    q = torch.randn(1, 2, 16, 8, device="cuda")
    x = torch.randn(4, 32, device="cuda")
    for call in (lambda g: F.attention(q, q, q, dropout_p=0.5, generator=g),
                 lambda g: F.layer_norm_residual(x, dropout_p=0.5, generator=g)):
        a, b, c = (call(torch.Generator(q.device).manual_seed(s)) for s in (0, 0, 1))
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("call,match", [
    (lambda: F.attention(*qkv(), scale=10**400), r"scale must be within float32's range .* got an int of 1329 bits"),
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
