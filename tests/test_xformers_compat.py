"""xformers' ``memory_efficient_attention`` on fused_attn (``fused_attn.integrations.xformers``).

The oracle takes each bias as the dense additive tensor its ``materialize`` gives (written from
xformers' definitions, independently of the kernels' band arithmetic) and runs
``reference.attention`` on the (B, H, M, N) problem in float64, block-diagonal ones on the whole
packed batch of one, so a block boundary, alignment or window off by one shows up. Every backend
of this machine runs through ``use_backend``.
"""
import pytest
import torch

import fused_attn
from fused_attn import reference as R
from fused_attn.integrations import xformers as X
from fused_attn.testing import backend_cases, check_against_reference, make_inputs


def cases():
    """The CPU backends only (as tests/test_flash_attn_compat.py: the kernels' GPU cases live in the
    core test files)."""
    return [c for c in backend_cases("attention", torch.float32, varlen=True) if c.values[0] == "cpu"]


def oracle(q, k, v, bias_tensor=None, scale=None):
    """softmax(q k^T scale + bias) v on (B, M, H, K) tensors; rows with no key give zeros."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    mask = None if bias_tensor is None else bias_tensor.to(q.dtype)
    return R.attention(qh, kh, vh, mask, scale=scale).transpose(1, 2)


DENSE = [
    ("none", lambda: None),
    ("LowerTriangularMask", X.LowerTriangularMask),
    ("LowerTriangularFromBottomRightMask", X.LowerTriangularFromBottomRightMask),
    ("LowerTriangularFromBottomRightLocalAttentionMask(4)", lambda: X.LowerTriangularFromBottomRightLocalAttentionMask(4)),
    ("FromBottomRight.make_local_attention(2)", lambda: X.LowerTriangularFromBottomRightMask().make_local_attention(2)),
    ("LocalAttentionFromBottomRightMask(3, 1)", lambda: X.LocalAttentionFromBottomRightMask(3, 1)),
]


@pytest.mark.parametrize("MN", [(17, 17), (9, 23), (23, 9)], ids=["M=N", "M<N", "M>N"])
@pytest.mark.parametrize("name,make", DENSE, ids=[n for n, _ in DENSE])
@pytest.mark.parametrize("device,backend", cases())
def test_dense_biases_match_their_materialized_mask(device, backend, name, make, MN):
    M, N = MN
    bias = make()
    q, k, v = make_inputs((2, M, 4, 40), (2, N, 4, 40), (2, N, 4, 24), device=device, seed=1)
    dense = None if bias is None else bias.materialize((2, 4, M, N), dtype=torch.float64, device=device)

    def fused(q, k, v):
        with fused_attn.use_backend(backend):
            out = X.memory_efficient_attention(q, k, v, attn_bias=bias)
        assert out.shape == (2, M, 4, 24) and out.is_contiguous()
        return out

    results = check_against_reference(fused, lambda q, k, v: oracle(q, k, v, dense), [q, k, v],
                                      names=["query", "key", "value"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("device,backend", cases())
def test_tensor_bias_and_causal_with_tensor_bias_get_their_gradient(device, backend):
    q, k, v, bias = make_inputs((2, 11, 2, 16), (2, 11, 2, 16), (2, 11, 2, 16), (2, 2, 11, 11), device=device, seed=2)

    def fused(q, k, v, bias):
        with fused_attn.use_backend(backend):
            return (X.memory_efficient_attention(q, k, v, attn_bias=bias, scale=0.3),
                    X.memory_efficient_attention(q, k, v, attn_bias=X.LowerTriangularMask().add_bias(bias)))

    def ref(q, k, v, bias):
        causal = X.LowerTriangularMask().materialize((11, 11), dtype=bias.dtype, device=bias.device)
        return oracle(q, k, v, bias, scale=0.3), oracle(q, k, v, bias + causal)

    results = check_against_reference(fused, ref, [q, k, v, bias], names=["query", "key", "value", "attn_bias"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


# (query shape, bias shape): tensor biases that broadcast to the logits in xformers' layout,
# (B, G, H, M, N) for a (B, M, G, H, K) query, (B, H, M, N) for (B, M, H, K), (B, M, N) for (B, M, K)
BROADCAST_BIASES = [
    ((2, 7, 2, 3, 8), (2, 2, 3, 7, 9)),  # full size
    ((2, 7, 2, 3, 8), (2, 3, 7, 9)),  # (G, H, M, N)
    # broadcast over G or H: "attn_mask of shape (3, 7, 9) is not broadcastable to (B, Hq, Lq, Lk)",
    # the heads (G, H) were flattened without being broadcast first
    ((2, 7, 2, 3, 8), (3, 7, 9)),  # (H, M, N): over B and G
    ((2, 7, 2, 3, 8), (1, 2, 1, 7, 9)),  # over B and H
    ((2, 7, 2, 3, 8), (2, 1, 3, 7, 9)),  # over G
    ((2, 7, 2, 3, 8), (2, 1, 7, 1)),  # over H and N
    ((2, 7, 2, 3, 8), (2, 1, 1, 7, 9)),  # over G and H
    ((2, 7, 2, 3, 8), (1, 7, 9)),
    ((2, 7, 2, 3, 8), (9,)),
    ((2, 7, 3, 8), (3, 7, 9)),  # (B, M, H, K): (H, M, N), for comparison
    ((2, 7, 3, 8), (2, 1, 7, 9)),
    ((2, 7, 8), (2, 7, 9)),  # (B, M, K)
    ((2, 7, 8), (9,)),  # (an IndexError: a head dim was added to the bias at dim -3)
]


@pytest.mark.parametrize("q_shape,bias_shape", BROADCAST_BIASES, ids=[f"{q}-{b}" for q, b in BROADCAST_BIASES])
@pytest.mark.parametrize("device,backend", cases())
def test_tensor_bias_broadcasts_as_xformers_layout_says(device, backend, q_shape, bias_shape):
    """A tensor bias broadcasting to the logits in the query's layout gives the reference math,
    its gradient summed over what it broadcast over."""
    kv_shape = (q_shape[0], 9, *q_shape[2:])
    q, k, v, bias = make_inputs(q_shape, kv_shape, kv_shape, bias_shape, device=device, seed=4)

    def fused(q, k, v, bias):
        with fused_attn.use_backend(backend):
            return X.memory_efficient_attention(q, k, v, attn_bias=bias)

    def ref(q, k, v, bias):  # on (B, M, heads, K), the bias broadcast to (B, heads, M, N)
        heads = q.shape[2:-1]
        as4 = [t.reshape(*t.shape[:2], -1, t.shape[-1]) for t in (q, k, v)]
        full = torch.broadcast_to(bias, (q.shape[0], *heads, q.shape[1], k.shape[1]))
        out = oracle(*as4, full.reshape(q.shape[0], -1, q.shape[1], k.shape[1]))
        return out.reshape(*q.shape[:-1], v.shape[-1])

    results = check_against_reference(fused, ref, [q, k, v, bias], names=["query", "key", "value", "attn_bias"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_three_and_five_dim_layouts():
    """(B, M, K) is one head; (B, M, G, H, K) is grouped-query with k and v expanded over H (read
    without a copy) or given per head; both equal the four-dim call they stand for."""
    q, k, v = make_inputs((2, 13, 24), (2, 7, 24), (2, 7, 16), requires_grad=False, seed=3)
    out = X.memory_efficient_attention(q, k, v, attn_bias=X.LowerTriangularFromBottomRightMask())
    ref = X.memory_efficient_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                       attn_bias=X.LowerTriangularFromBottomRightMask())[:, :, 0]
    assert out.shape == (2, 13, 16) and torch.equal(out, ref)
    G, H = 2, 3
    q5 = torch.randn(2, 13, G, H, 24)
    k4, v4 = torch.randn(2, 7, G, 24), torch.randn(2, 7, G, 16)
    k5, v5 = k4[:, :, :, None].expand(2, 7, G, H, 24), v4[:, :, :, None].expand(2, 7, G, H, 16)
    out5 = X.memory_efficient_attention(q5, k5, v5, attn_bias=X.LowerTriangularMask())
    assert out5.shape == (2, 13, G, H, 16)
    expected = oracle(q5.flatten(2, 3).double(), k5.flatten(2, 3).double(), v5.flatten(2, 3).double(),
                      X.LowerTriangularMask().materialize((13, 7), dtype=torch.float64)).unflatten(2, (G, H))
    torch.testing.assert_close(out5.double(), expected, rtol=1e-5, atol=1e-5)
    full = X.memory_efficient_attention(q5, k5.contiguous(), v5.contiguous(), attn_bias=X.LowerTriangularMask())
    torch.testing.assert_close(full, out5, rtol=1e-5, atol=1e-6)


BLOCKS = [
    ("BlockDiagonalMask", lambda q, k: X.BlockDiagonalMask.from_seqlens(q, k)),
    ("make_causal", lambda q, k: X.BlockDiagonalMask.from_seqlens(q, k).make_causal()),
    ("make_causal_from_bottomright", lambda q, k: X.BlockDiagonalMask.from_seqlens(q, k).make_causal_from_bottomright()),
    ("make_local_attention(3)", lambda q, k: X.BlockDiagonalMask.from_seqlens(q, k).make_local_attention(3)),
    ("make_local_attention_from_bottomright(2)",
     lambda q, k: X.BlockDiagonalMask.from_seqlens(q, k).make_local_attention_from_bottomright(2)),
]


@pytest.mark.parametrize("name,make", BLOCKS, ids=[n for n, _ in BLOCKS])
@pytest.mark.parametrize("device,backend", cases())
def test_block_diagonal_biases_match_their_materialized_mask(device, backend, name, make):
    """Packed sequences of different query and key lengths (one empty, one query longer than its
    keys): the whole (1, total) problem under the materialized block-diagonal mask."""
    q_lens, k_lens = [5, 1, 0, 9], [5, 7, 3, 4]
    bias = make(q_lens, k_lens)
    q, k, v = make_inputs((1, sum(q_lens), 2, 16), (1, sum(k_lens), 1, 16), (1, sum(k_lens), 1, 16), device=device,
                          seed=4)
    dense = bias.materialize((1, 2, sum(q_lens), sum(k_lens)), dtype=torch.float64, device=device)

    def fused(q, k, v):
        with fused_attn.use_backend(backend):
            return X.memory_efficient_attention(q, k, v, attn_bias=bias)

    def ref(q, k, v):  # grouped-query: the oracle's keys repeated per query head
        return oracle(q, k.expand(-1, -1, 2, -1), v.expand(-1, -1, 2, -1), dense)

    results = check_against_reference(fused, ref, [q, k, v], names=["query", "key", "value"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


@pytest.mark.parametrize("causal", [True, False], ids=["causal with offset", "not causal"])
@pytest.mark.parametrize("device,backend", cases())
def test_padded_keys_mask_is_decoding_against_a_padded_cache(device, backend, causal):
    q_lens, k_lens, padding = [1, 2, 1], [4, 9, 0], 10
    cls = X.BlockDiagonalCausalWithOffsetPaddedKeysMask if causal else X.BlockDiagonalPaddedKeysMask
    bias = cls.from_seqlens(q_lens, padding, k_lens)
    q, k, v = make_inputs((1, 4, 2, 16), (1, 3 * padding, 2, 16), (1, 3 * padding, 2, 16), requires_grad=False,
                          device=device, seed=5)
    k[:, 4:10] = float("nan")  # the rows past each sequence's keys are never read
    k[:, 19:] = float("nan")
    with fused_attn.use_backend(backend):
        out = X.memory_efficient_attention(q, k, v, attn_bias=bias)
    dense = bias.materialize((1, 2, 4, 3 * padding), dtype=torch.float64, device=device)
    expected = oracle(q.double(), k.nan_to_num().double(), v.double(), dense)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    assert not out[0, 3].any()  # the sequence with no keys: zeros


def test_from_tensor_list_and_split():
    xs = [torch.randn(2, 3, 4), torch.randn(1, 5, 4), torch.randn(3, 1, 4)]
    bias, packed = X.BlockDiagonalMask.from_tensor_list(xs)
    assert packed.shape == (1, 14, 4) and bias.q_seqinfo.seqlen_py == [3, 3, 5, 1, 1, 1]
    for a, b in zip(bias.split(packed), xs):
        assert torch.equal(a, b)
    qs, ks = [torch.randn(2, 3, 4), torch.randn(1, 2, 4)], [torch.randn(2, 6, 4), torch.randn(1, 1, 4)]
    bias, q, k, v = X.BlockDiagonalMask.from_tensor_lists_qkv(qs, ks)
    assert v is None and q.shape == (1, 8, 4) and k.shape == (1, 13, 4)
    for a, b in zip(bias.split_kv(k), ks):
        assert torch.equal(a, b)
    causal = bias.make_causal()
    assert isinstance(causal, X.BlockDiagonalCausalMask) and causal.split_queries(q)[1].shape == (1, 2, 4)


def test_dropout_seed_and_output_dtype():
    q, k, v = make_inputs((1, 9, 2, 16), (1, 9, 2, 16), (1, 9, 2, 16), requires_grad=False)
    torch.manual_seed(1)
    a = X.memory_efficient_attention(q, k, v, p=0.5)
    torch.manual_seed(1)
    b = X.memory_efficient_attention_forward(q, k, v, p=0.5)
    assert torch.equal(a, b) and not torch.equal(a, X.memory_efficient_attention(q, k, v))
    assert X.memory_efficient_attention(q, k, v, output_dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("call,error,match", [
    (lambda q: X.memory_efficient_attention(q, q[..., 0, :], q), ValueError, "key has shape"),
    (lambda q: X.memory_efficient_attention(q[0, 0], q, q), ValueError, r"query must be \(B, M, K\)"),
    (lambda q: X.memory_efficient_attention(q, q, q, attn_bias="causal"), TypeError, "attn_bias must be None"),
    (lambda q: X.memory_efficient_attention(q, q, q, attn_bias=torch.zeros(1, 2, 5, 5, dtype=torch.float64)),
     TypeError, "attn_bias tensor must have query's dtype"),
    (lambda q: X.memory_efficient_attention(q, q, q, attn_bias=X.BlockDiagonalMask.from_seqlens([2, 3])), ValueError,
     r"a batch of one"),
    (lambda q: X.memory_efficient_attention(q[:1], q[:1], q[:1], attn_bias=X.BlockDiagonalMask.from_seqlens([2, 2])),
     ValueError, "query has 5 rows but BlockDiagonalMask describes 4"),
    # (a value of another batch was read at value[0] alone, or failed with an IndexError; now refused
    # by the batch check of any call)
    (lambda q: X.memory_efficient_attention(q[:1], q[:1], q, attn_bias=X.BlockDiagonalMask.from_seqlens([2, 3])),
     ValueError, r"query, key and value must have the same batch size \(dim 0\).*value \(2, 5, 2, 8\)"),
    (lambda q: X.LowerTriangularFromBottomRightLocalAttentionMask(0), ValueError, "window_size must be an int >= 1"),
    (lambda q: X.BlockDiagonalMask.from_seqlens([1, 2], [3]), ValueError, "as many sequences"),
    (lambda q: X.BlockDiagonalMask.from_seqlens([1, -2]), ValueError, "lengths >= 0"),
    (lambda q: X.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1], 3, [4]), ValueError,
     "kv_padding must be an int >= every kv_seqlen"),
    # (under xformers' name: the error said dropout_p, attention's name)
    (lambda q: X.memory_efficient_attention(q, q, q, p=1.5), ValueError, r"^p must be in \[0, 1\), got 1.5"),
    (lambda q: X.memory_efficient_attention_partial(q, q, q, p="0.1"), TypeError, r"^p must be a float"),
    (lambda q: X.BlockDiagonalMask.from_seqlens([1, 2], [2, 2]).split(q[:1, :3]), ValueError,
     "split needs queries and keys of the same lengths"),
    (lambda q: X.BlockDiagonalPaddedKeysMask.from_seqlens([1], 4, [2], causal_diagonal=torch.zeros(1)), ValueError,
     "causal_diagonal is not supported"),
    (lambda q: X.LocalAttentionFromBottomRightMask(-1, 0), ValueError, "window_left must be an int >= 0"),
    # a type that is not an int: TypeError (was ValueError), as the functional calls raise
    (lambda q: X.LocalAttentionFromBottomRightMask(1, 2.0), TypeError, "window_right must be an int >= 0, got float"),
    (lambda q: X.LowerTriangularFromBottomRightLocalAttentionMask(2.0), TypeError,
     r"window_size must be an int >= 1 \(the keys each query sees\), got float 2.0"),
    (lambda q: X.BlockDiagonalMask.from_seqlens([2, 3]).make_local_attention("2"), TypeError,
     "window_size must be an int >= 1"),
    (lambda q: X.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1], 4.0, [4]), TypeError,
     r"kv_padding must be an int >= every kv_seqlen \(4\), got float"),
])
def test_bad_input_says_what_was_expected(call, error, match):
    q = torch.randn(2, 5, 2, 8)
    with pytest.raises(error, match=match):
        call(q)


def test_numpy_ints_are_ints():
    """numpy ints, which the functional calls take (``is_int``), were refused by the bias
    constructors ("must be an int"); they are taken as the Python ints they hold."""
    import numpy as np
    q = torch.randn(1, 9, 2, 8)
    pairs = [(X.LowerTriangularFromBottomRightLocalAttentionMask(np.int64(3)),
              X.LowerTriangularFromBottomRightLocalAttentionMask(3)),
             (X.LocalAttentionFromBottomRightMask(np.int64(2), np.int32(1)), X.LocalAttentionFromBottomRightMask(2, 1)),
             (X.BlockDiagonalMask.from_seqlens([4, 5]).make_local_attention(np.int64(2)),
              X.BlockDiagonalMask.from_seqlens([4, 5]).make_local_attention(2)),
             (X.BlockDiagonalMask.from_seqlens([4, 5]).make_local_attention_from_bottomright(np.int64(2)),
              X.BlockDiagonalMask.from_seqlens([4, 5]).make_local_attention_from_bottomright(2))]
    for given, expected in pairs:
        assert given.window == expected.window and all(type(w) is int for w in given.window)
        torch.testing.assert_close(X.memory_efficient_attention(q, q, q, attn_bias=given),
                                   X.memory_efficient_attention(q, q, q, attn_bias=expected))
    padded = X.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1], np.int64(4), [4])
    assert padded.k_seqinfo.padding == 4 and type(padded.k_seqinfo.padding) is int


def test_compiles_without_graph_breaks():
    q, k, v = make_inputs((2, 17, 4, 16), (2, 17, 4, 16), (2, 17, 4, 16), seed=6)
    bias = X.BlockDiagonalMask.from_seqlens([7, 10]).make_causal()
    f = torch.compile(lambda q, k, v: (X.memory_efficient_attention(q, k, v, attn_bias=X.LowerTriangularMask()),
                                       X.memory_efficient_attention(q[:1], k[:1], v[:1], attn_bias=bias)),
                      fullgraph=True, backend="aot_eager")
    out, packed = f(q, k, v)
    torch.testing.assert_close(out, X.memory_efficient_attention(q, k, v, attn_bias=X.LowerTriangularMask()))
    torch.testing.assert_close(packed, X.memory_efficient_attention(q[:1], k[:1], v[:1], attn_bias=bias))
    (out.sum() + packed.sum()).backward()
    assert q.grad is not None


def test_patch_xformers_serves_the_imports_and_undoes():
    import sys

    with fused_attn.patch_xformers():
        import xformers
        import xformers.ops as xops
        from xformers.ops import fmha
        from xformers.ops.fmha.attn_bias import BlockDiagonalCausalWithOffsetPaddedKeysMask

        assert xops.memory_efficient_attention is X.memory_efficient_attention
        assert fmha.BlockDiagonalMask is X.BlockDiagonalMask and xops.LowerTriangularMask is X.LowerTriangularMask
        assert BlockDiagonalCausalWithOffsetPaddedKeysMask is X.BlockDiagonalCausalWithOffsetPaddedKeysMask
        assert xformers.__version__.endswith("+fused_attn")
        q = torch.randn(1, 6, 2, 8)
        out = xops.memory_efficient_attention(q, q, q, attn_bias=fmha.BlockDiagonalMask.from_seqlens([2, 4]))
        assert out.shape == (1, 6, 2, 8)
    assert not any(name == "xformers" or name.startswith("xformers.") for name in sys.modules)


def test_materialize_is_xformers_definition():
    """The biases' meaning, written out as xformers documents it (0 = seen, -inf = not)."""
    inf = float("-inf")

    def seen(bias, shape):
        return (bias.materialize(shape) == 0).int().tolist()

    assert seen(X.LowerTriangularMask(), (2, 4)) == [[1, 0, 0, 0], [1, 1, 0, 0]]  # top-left: torch.triu(-inf, 1)
    assert torch.equal(X.LowerTriangularMask().materialize((3, 3)), torch.full((3, 3), inf).triu(1))
    assert seen(X.LowerTriangularFromBottomRightMask(), (2, 4)) == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert seen(X.LowerTriangularFromBottomRightMask(), (3, 2)) == [[0, 0], [1, 0], [1, 1]]
    assert seen(X.LowerTriangularFromBottomRightLocalAttentionMask(2), (2, 4)) == [[0, 1, 1, 0], [0, 0, 1, 1]]
    assert seen(X.LocalAttentionFromBottomRightMask(1, 1), (2, 4)) == [[0, 1, 1, 1], [0, 0, 1, 1]]
    block = X.BlockDiagonalMask.from_seqlens([2, 1], [1, 3])
    assert seen(block, (3, 4)) == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 1]]
    assert seen(block.make_causal(), (3, 4)) == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]]
    assert seen(block.make_causal_from_bottomright(), (3, 4)) == [[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 1]]
    padded = X.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1, 2], 3, [2, 3])
    assert seen(padded, (3, 6)) == [[1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_bias_api_details():
    """xformers' spellings: seqstart / seqstart_py (and the older cu_seqlen), .to(device),
    device= keywords, _window_size, the padded-keys masks outside BlockDiagonalMask (no
    make_causal there), op= accepted and ignored."""
    bias = X.BlockDiagonalMask.from_seqlens([2, 3], [4, 1], device="cpu")
    assert bias.q_seqinfo.seqstart_py == [0, 2, 5] and bias.k_seqinfo.seqstart.tolist() == [0, 4, 5]
    assert bias.q_seqinfo.max_seqlen == 3 and bias.q_seqinfo.min_seqlen == 2 and bias.to("cpu") is bias
    assert X.LowerTriangularMask(device="cpu").causal and X.LowerTriangularFromBottomRightMask().to("cpu").causal
    local = X.LowerTriangularFromBottomRightLocalAttentionMask(_window_size=3)
    assert local._window_size == 3 and bias.make_local_attention(2)._window_size == 2
    padded = X.BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1, 1], 4, [2, 3], device="cpu")
    assert not isinstance(padded, X.BlockDiagonalMask) and not hasattr(padded, "make_causal")
    assert padded.k_seqinfo.seqstart_py == [0, 4, 8] and padded.k_seqinfo.seqlen.tolist() == [2, 3]
    q = torch.randn(1, 5, 2, 8)
    out = X.memory_efficient_attention(q, q, q, attn_bias=X.BlockDiagonalMask.from_seqlens([2, 3]),
                                       op=X.MemoryEfficientAttentionFlashAttentionOp)
    assert out.shape == q.shape
    a, b, c = X.unbind(torch.randn(2, 3, 4), 1)
    assert a.shape == (2, 4)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_KINDS = {"block": lambda b: b, "causal": lambda b: b.make_causal(),
          "bottom-right": lambda b: b.make_causal_from_bottomright(), "local 2": lambda b: b.make_local_attention(2),
          "local bottom-right 3": lambda b: b.make_local_attention_from_bottomright(3)}


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(lens=st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=4),
       kind=st.sampled_from(sorted(_KINDS)), heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       head_dim=st.sampled_from([8, 13]))
def test_block_diagonal_property(lens, kind, heads, head_dim):
    """Random packed layouts (empty sequences, more queries than keys and the reverse) and block
    kinds on the CPU backend, against the materialized mask, forward and gradients."""
    q_lens, k_lens = [a for a, _ in lens], [b for _, b in lens]
    bias = _KINDS[kind](X.BlockDiagonalMask.from_seqlens(q_lens, k_lens))
    Hq, Hkv = heads
    q, k, v = make_inputs((1, sum(q_lens), Hq, head_dim), (1, sum(k_lens), Hkv, head_dim),
                          (1, sum(k_lens), Hkv, head_dim), seed=sum(q_lens) * 7 + sum(k_lens))
    dense = bias.materialize((1, Hq, sum(q_lens), sum(k_lens)), dtype=torch.float64)

    def ref(q, k, v):
        g = Hq // Hkv
        return oracle(q, k.repeat_interleave(g, 2), v.repeat_interleave(g, 2), dense)

    results = check_against_reference(lambda q, k, v: X.memory_efficient_attention(q, k, v, attn_bias=bias), ref,
                                      [q, k, v], names=["query", "key", "value"])
    assert all(r.ok for r in results), "\n".join(map(str, results))


def test_five_dim_keys_must_have_the_query_groups_and_heads():
    q = torch.randn(1, 3, 2, 2, 8)
    for k, v in ((torch.randn(1, 4, 1, 2, 8), torch.randn(1, 4, 1, 2, 8)),
                 (torch.randn(1, 4, 2, 1, 8), torch.randn(1, 4, 2, 2, 8))):
        with pytest.raises(ValueError, match=r"must be \(B, N, G, H, K\) with query's B, G and H"):
            X.memory_efficient_attention(q, k, v)
    with pytest.raises(TypeError, match="q_seqlen must hold ints"):
        X.BlockDiagonalMask.from_seqlens([3.5, 1])


@pytest.mark.parametrize("q_shape,bias_shape,match", [
    # (reported as "attn_mask of shape (1, 6, 3, 3)": attention's name and the reshaped 4-D shape)
    ((1, 3, 2, 3, 4), (1, 2, 3, 3, 5), r"attn_bias of shape \(1, 2, 3, 3, 5\) must broadcast to \(B, G, H, M, N\) = "
                                       r"\(1, 2, 3, 3, 3\) for query \(1, 3, 2, 3, 4\)"),
    ((1, 3, 6, 4), (1, 6, 3, 5),
     r"attn_bias of shape \(1, 6, 3, 5\) must broadcast to \(B, H, M, N\) = \(1, 6, 3, 3\)"),
    ((2, 3, 4), (2, 3, 5), r"attn_bias of shape \(2, 3, 5\) must broadcast to \(B, M, N\) = \(2, 3, 3\)"),
])
def test_a_wrong_tensor_bias_is_reported_as_given(q_shape, bias_shape, match):
    q = torch.randn(q_shape)
    with pytest.raises(ValueError, match=match):
        X.memory_efficient_attention(q, q, q, attn_bias=torch.randn(bias_shape))
    with pytest.raises(ValueError, match=match.replace("attn_bias of", "attn_bias's tensor bias of")):
        X.memory_efficient_attention(q, q, q, attn_bias=X.LowerTriangularMask().add_bias(torch.randn(bias_shape)))


def test_merge_attentions_checks_its_parts_in_xformers_terms():
    """Lists of unequal parts failed in torch.stack (RuntimeError); a wrong lse shape was reported
    as fused_attn's ``lses[0]`` with advice about attention_varlen; write_lse="n" meant True."""
    o, lse = X.memory_efficient_attention_partial(*(torch.randn(1, 3, 6, 4),) * 3)  # lse (1, 6, 3)
    with pytest.raises(ValueError,
                       match=r"the parts of attn_split must share one shape .* attn_split\[1\] \(1, 2, 6, 4\)"):
        X.merge_attentions([o, o[:, :2]], [lse, lse])
    with pytest.raises(ValueError, match=r"lse_split\[1\] must be \(B, \[G,\] H, M\) = \(1, 6, 3\) to match "
                                         r"attn_split\[1\] of shape \(1, 3, 6, 4\) .* got \(1, 6, 2\)"):
        X.merge_attentions([o, o], [lse, lse[..., :2]])
    with pytest.raises(ValueError, match=r"lse_split must be \(n, B, \[G,\] H, M\) = \(2, 1, 6, 3\) .* got "
                                         r"\(2, 1, 3, 6\)"):
        X.merge_attentions(torch.stack([o, o]), torch.stack([lse, lse]).transpose(-1, -2))
    with pytest.raises(TypeError, match=r"lse_split\[0\] must be a floating-point tensor"):
        X.merge_attentions([o, o], [lse.long(), lse.long()])
    with pytest.raises(TypeError, match="write_lse must be a bool, got str 'n'"):
        X.merge_attentions([o, o], [lse, lse], write_lse="n")
    # output_dtype as memory_efficient_attention checks it (an int dtype was applied, "cpu" taken as a device)
    for bad in (torch.int32, "cpu"):
        for call in (lambda: X.merge_attentions([o, o], [lse, lse], True, bad),
                     lambda: X.memory_efficient_attention(o, o, o, output_dtype=bad)):
            with pytest.raises(TypeError, match=f"output_dtype must be a floating torch.dtype or None, got {bad!r}"):
                call()
    assert X.merge_attentions([o, o], [lse, lse], True, torch.float64)[0].dtype == torch.float64


@pytest.mark.parametrize("shapes,expected", [
    (((2, 5, 6, 8), (3, 7, 6, 8), (3, 7, 6, 8)),
     "query, key and value must have the same batch size (dim 0), got query (2, 5, 6, 8), key (3, 7, 6, 8), "
     "value (3, 7, 6, 8)"),
    (((2, 5, 6, 8), (2, 7, 6, 8), (2, 6, 6, 8)),
     "key and value must have the same sequence length (dim 1), got query (2, 5, 6, 8), key (2, 7, 6, 8), "
     "value (2, 6, 6, 8)"),
    (((2, 5, 6, 8), (2, 7, 4, 8), (2, 7, 4, 8)),
     "query's number of heads (6) must be a multiple of key's and value's (4) (grouped-query attention), got query "
     "(2, 5, 6, 8), key (2, 7, 4, 8), value (2, 7, 4, 8)"),
    (((2, 5, 6, 8), (2, 7, 6, 8), (2, 7, 3, 8)),
     "key and value must have the same number of heads, got query (2, 5, 6, 8), key (2, 7, 6, 8), value (2, 7, 3, 8)"),
    # (said "q and k must have the same head dim, got q (2, 6, 5, 8), k (2, 6, 7, 4)": the transposed views)
    (((2, 5, 6, 8), (2, 7, 6, 4), (2, 7, 6, 8)),
     "query and key must have the same head dim (last dim), got query (2, 5, 6, 8), key (2, 7, 6, 4), "
     "value (2, 7, 6, 8)"),
    (((2, 5, 8), (2, 7, 8), (2, 6, 8)),
     "key and value must have the same sequence length (dim 1), got query (2, 5, 8), key (2, 7, 8), value (2, 6, 8)"),
    (((2, 5, 8), (2, 7, 4), (2, 7, 8)),
     "query and key must have the same head dim (last dim), got query (2, 5, 8), key (2, 7, 4), value (2, 7, 8)"),
    # BMGHK: (said "value must be (B, N, G, H, K) with query's B, G and H" for a length that differed from key's)
    (((2, 5, 2, 3, 8), (2, 7, 2, 3, 8), (2, 6, 2, 3, 8)),
     "key and value must have the same sequence length (dim 1), got query (2, 5, 2, 3, 8), key (2, 7, 2, 3, 8), "
     "value (2, 6, 2, 3, 8)"),
    # (said "q and k must have the same head dim, got q (2, 6, 5, 8), ...": G and H flattened, transposed)
    (((2, 5, 2, 3, 8), (2, 7, 2, 3, 4), (2, 7, 2, 3, 8)),
     "query and key must have the same head dim (last dim), got query (2, 5, 2, 3, 8), key (2, 7, 2, 3, 4), "
     "value (2, 7, 2, 3, 8)"),
    (((2, 5, 2, 3, 8), (3, 7, 2, 3, 8), (3, 7, 2, 3, 8)),
     "with a (B, M, G, H, K) query, key must be (B, N, G, H, K) with query's B, G and H (expand it over H for "
     "grouped-query attention), got (3, 7, 2, 3, 8) for query (2, 5, 2, 3, 8)"),
])
def test_shape_errors_name_query_key_value_in_xformers_layout(shapes, expected):
    """Shape errors came from attention on the transposed views and said q, k, v; they now name
    query, key and value and quote the shapes as passed (BMK, BMHK and BMGHK)."""
    with pytest.raises(ValueError) as info:
        X.memory_efficient_attention(*(torch.randn(s) for s in shapes))
    assert str(info.value) == expected
