"""The CUDA rotary kernel (csrc/cuda/rotary.cu), run on CPU threads, and the real op on a GPU.

The emulation (tests/cuda_emu, see tests/test_cuda_emulated.py) compiles the kernel with the host
compiler; tests/cuda_emu/emu_rotary.cpp calls it with the launcher's own size checks and grid
(rotary_problem, rotary_launch_config) and a block size of the test's choosing. Its float32 path
runs for real, and so do its float16/bfloat16 paths and all four table dtypes: the kernel only
converts them (the emulation's conversions are IEEE's, round to nearest even). Held to a float64
reference: both pair layouts (GPT-NeoX halves, GPT-J interleaved), the inverse rotation
(conjugate), R == D and R < D (the pass-through features bit for bit), odd sizes, several tokens
per block with a partial last group and a token wider than its block, positions with stride 0
along the batch and any values (out-of-range ones clamped) or a strided view at an offset,
non-contiguous x (a transposed view, feature stride != 1, stride 0, a misaligned start) and
tables (transposed, sliced). The
single-access path for interleaved pairs is checked to run where the layout allows it and not
elsewhere.

The tests marked ``gpu`` run torch.ops.fused_attn_C.rotary on CUDA tensors in float16/bfloat16/
float32 against the same reference; they collect everywhere and are skipped without CUDA.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from fused_attn.testing import compare, index_view
from test_cuda_emulated import _build, _i64, _ptr

gpu = pytest.mark.gpu

X_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}  # launchers.h DType
TABLE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}  # TableDType
STYLES = {"neox": False, "interleaved": True}


@pytest.fixture(scope="module")
def emu_rot(tmp_path_factory):
    return _build(tmp_path_factory, "emu_rotary.cpp")


def ref(x, cos, sin, pos, interleaved, conjugate):
    """The float64 reference."""
    half = cos.shape[1]
    c = cos.double()[pos.long()].unsqueeze(-2)
    s = sin.double()[pos.long()].unsqueeze(-2)
    s = -s if conjugate else s
    xw = x.double()
    t, rest = xw[..., :2 * half], xw[..., 2 * half:]
    x1, x2 = (t[..., 0::2], t[..., 1::2]) if interleaved else (t[..., :half], t[..., half:])
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    t = torch.stack((o1, o2), -1).flatten(-2) if interleaved else torch.cat((o1, o2), -1)
    return torch.cat((t, rest), -1)


def ref_lowp(x, cos, sin, pos, interleaved, conjugate):
    """The same in float32, rounded to x's dtype: the oracle's measure of a float32 computation's error."""
    half = cos.shape[1]
    c = cos.float()[pos.long()].unsqueeze(-2)
    s = sin.float()[pos.long()].unsqueeze(-2)
    s = -s if conjugate else s
    xw = x.float()
    t, rest = xw[..., :2 * half], xw[..., 2 * half:]
    x1, x2 = (t[..., 0::2], t[..., 1::2]) if interleaved else (t[..., :half], t[..., half:])
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    t = torch.stack((o1, o2), -1).flatten(-2) if interleaved else torch.cat((o1, o2), -1)
    return torch.cat((t, rest), -1).to(x.dtype)


# name: (B, L, H, D, R, S, options). Options: x / table / pos dtypes, "x" layout, "tables" layout,
# "pos" ("stride0": one row expanded over the batch, values in any order, repeats, 0 and S - 1; "view":
# every stride != 1 and an offset, fused_attn.testing.index_view),
# "threads" (the emulated block size; the launcher's is 256), "vec": whether the interleaved
# pairs are single accesses in this layout (x86 takes a misaligned pair access silently, a GPU does
# not: the decision itself is checked).
CASES = {
    "d64_r32": (2, 17, 3, 64, 32, 40, {"vec": True}),
    "d59_r40_l97_h1_int32_pos": (1, 97, 1, 59, 40, 128, {"pos_dtype": torch.int32}),  # D odd: no pair accesses
    "d40_r40_l1": (3, 1, 3, 40, 40, 5, {"vec": True}),
    "r2_groups_of_5_partial_last_256_threads": (2, 17, 3, 16, 2, 9, {"threads": 256, "vec": True}),
    "pos_stride0_any_values_groups_of_2": (3, 17, 2, 32, 32, 50, {"pos": "stride0", "vec": True}),
    "pos_strided_view_at_an_offset_int32": (2, 9, 2, 32, 16, 20, {"pos": "view", "pos_dtype": torch.int32,
                                                                 "vec": True}),
    "wide_token_over_block": (1, 3, 5, 128, 64, 7, {"vec": True}),  # 480 items > 64 threads
    "x_transposed_view": (2, 13, 3, 48, 32, 20, {"x": "transposed", "vec": True}),
    "x_feature_stride_h_dense": (2, 9, 3, 24, 16, 11, {"x": "feature_stride"}),
    "x_sliced_non_dense_int32_pos": (2, 9, 2, 20, 12, 11, {"x": "sliced", "pos_dtype": torch.int32}),
    "x_stride0_batch": (3, 7, 2, 32, 20, 9, {"x": "batch_stride0", "vec": True}),
    "x_misaligned_start": (1, 11, 2, 32, 32, 16, {"x": "misaligned"}),
    "x_odd_head_stride": (2, 5, 2, 32, 32, 16, {"x": "odd_head_stride"}),  # batch/token strides even: no pairs
    "tables_transposed_and_sliced": (2, 11, 2, 40, 24, 30, {"tables": "strided", "vec": True}),
    "tables_float64": (2, 11, 2, 64, 64, 30, {"table_dtype": torch.float64, "vec": True}),
    "tables_float16": (2, 11, 2, 64, 48, 30, {"table_dtype": torch.float16, "vec": True}),
    "tables_bfloat16_pos_stride0": (2, 11, 2, 64, 32, 30, {"table_dtype": torch.bfloat16, "pos": "stride0",
                                                          "vec": True}),
    "x_float16": (2, 13, 3, 64, 32, 30, {"x_dtype": torch.float16, "vec": True}),
    "x_bfloat16_tables_float64_transposed": (2, 13, 3, 48, 48, 30, {"x_dtype": torch.bfloat16,
                                                                   "table_dtype": torch.float64,
                                                                   "x": "transposed", "vec": True}),
}


def make_case(name, device="cpu", x_dtype=None):
    """(x, cos, sin, positions) for a case: drawn on the CPU from a generator seeded by the name,
    then moved to ``device`` before the views are taken (so a GPU run sees the same layouts)."""
    B, L, H, D, R, S, o = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    x_dtype = x_dtype or o.get("x_dtype", torch.float32)
    t_dtype = o.get("table_dtype", torch.float32)
    randn = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device)
    layout = o.get("x")
    if layout == "transposed":  # (B, H, L, D) storage seen as (B, L, H, D)
        x = randn(B, H, L, D).to(x_dtype).transpose(1, 2)
    elif layout == "feature_stride":  # (B, L, D, H) storage: feature stride H, dense (out keeps the layout)
        x = randn(B, L, D, H).to(x_dtype).transpose(2, 3)
    elif layout == "sliced":  # every other feature of a wider row: not dense, out is contiguous
        x = randn(B, L, H, 2 * D + 3).to(x_dtype)[..., 1::2][..., :D]
    elif layout == "batch_stride0":
        x = randn(1, L, H, D).to(x_dtype).expand(B, L, H, D)
    elif layout == "odd_head_stride":  # rows of D + 1 features: every other head's row starts at an odd element
        x = randn(B, L, H, D + 1).to(x_dtype)[..., :D]
    elif layout == "misaligned":  # one element in: strides even, the start not pair-aligned
        x = randn(B * L * H * D + 1).to(x_dtype)[1:].view(B, L, H, D)
    else:
        x = randn(B, L, H, D).to(x_dtype)
    angle = randn(S, R // 2) * 3.0
    cos, sin = angle.cos(), angle.sin()
    if o.get("tables") == "strided":  # cos stored transposed (strides (1, S)), sin a slice of a wider table
        cos = cos.t().contiguous().t()
        wide = randn(2 * S, R)
        wide[::2, 1::2] = sin
        sin = wide[::2, 1::2]
    cos, sin = cos.to(t_dtype), sin.to(t_dtype)
    pos_dtype = o.get("pos_dtype", torch.int64)
    if o.get("pos") == "stride0":
        row = torch.randint(0, S, (1, L), generator=gen)
        row[0, :3] = torch.tensor([S - 1, 0, S - 1])
        pos = row.to(device, pos_dtype).expand(B, L)
    elif o.get("pos") == "view":  # every stride != 1 and an offset into the storage (index_view)
        pos = index_view(torch.randint(0, S, (B, L), generator=gen).to(device, pos_dtype))
    else:
        pos = torch.randint(0, S, (B, L), generator=gen).to(device, pos_dtype)
    return x, cos, sin, pos


def emulated_rotary(lib, x, cos, sin, pos, interleaved, conjugate, threads=64, out=None):
    """(out, config): the emulated kernel's output in torch.empty_like(x) (as the binding allocates
    it; or in ``out``, x itself for rotary_out in place) and its launch config [tokens_per_block,
    blocks, pair_vec]."""
    out = torch.empty_like(x) if out is None else out
    config = (ctypes.c_int64 * 3)()
    sizes = _i64([*x.shape, cos.shape[1], cos.shape[0]])
    rc = lib.emu_rotary(X_CODES[x.dtype], TABLE_CODES[cos.dtype], int(pos.dtype == torch.int64), sizes, _ptr(x),
                        _i64(x.stride()), _ptr(cos), _i64(cos.stride()), _ptr(sin), _i64(sin.stride()), _ptr(pos),
                        _i64(pos.stride()), int(interleaved), int(conjugate), _ptr(out), _i64(out.stride()), threads,
                        config)
    assert rc == 0, "rotary_problem refused the sizes"
    return out, list(config)


def check_output(out, x, cos, sin, pos, interleaved, conjugate):
    R = 2 * cos.shape[1]
    assert out.shape == x.shape and out.dtype == x.dtype
    compare("rotary out", out, ref(x, cos, sin, pos, interleaved, conjugate),
            ref_lowp(x, cos, sin, pos, interleaved, conjugate))
    assert torch.equal(out[..., R:], x[..., R:]), "features R.. must be copied bit for bit"


@pytest.mark.parametrize("conjugate", [False, True], ids=["forward", "conjugate"])
@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_rotary_matches_reference(emu_rot, name, style, conjugate):
    B, L, H, D, R, S, o = CASES[name]
    interleaved = STYLES[style]
    x, cos, sin, pos = make_case(name)
    threads = o.get("threads", 64)
    out, (per_block, blocks, pair_vec) = emulated_rotary(emu_rot, x, cos, sin, pos, interleaved, conjugate, threads)
    check_output(out, x, cos, sin, pos, interleaved, conjugate)
    per_token = H * (D - R // 2)
    assert per_block == max(1, threads // per_token) and blocks == -(-B * L // per_block)
    assert bool(pair_vec) == (interleaved and o.get("vec", False))
    if o.get("x") in ("transposed", "feature_stride"):  # out keeps x's dense layout: written through its strides
        assert out.stride() == x.stride() and not out.is_contiguous()


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("name", list(CASES))
def test_emulated_rotary_in_place(emu_rot, name, style):
    """rotary_out with out = x (apply_rotary_emb(inplace=True)): bit for bit the out-of-place
    result, the single-access pair path included (each thread reads what it overwrites)."""
    B, L, H, D, R, S, o = CASES[name]
    x, cos, sin, pos = make_case(name)
    if torch._debug_has_internal_overlap(x) != 0:
        pytest.skip("x has overlapping elements: in place is refused for it")
    expected, _ = emulated_rotary(emu_rot, x, cos, sin, pos, STYLES[style], False, o.get("threads", 64))
    inplace = x.clone() if x.is_contiguous() else x.detach().clone(memory_format=torch.preserve_format)
    inplace.copy_(x)
    emulated_rotary(emu_rot, inplace, cos, sin, pos, STYLES[style], False, o.get("threads", 64), out=inplace)
    assert torch.equal(inplace, expected)


def test_emulated_rotary_conjugate_inverts(emu_rot):
    """conjugate turns back: the forward then the conjugate gives x again (to rounding)."""
    x, cos, sin, pos = make_case("tables_bfloat16_pos_stride0")
    for interleaved in (False, True):
        y, _ = emulated_rotary(emu_rot, x, cos, sin, pos, interleaved, False)
        back, _ = emulated_rotary(emu_rot, y, cos, sin, pos, interleaved, True)
        # bfloat16 tables: c^2 + s^2 = 1 only to bfloat16's precision
        torch.testing.assert_close(back, x, atol=2e-2, rtol=2e-2)
        assert (y - x).abs().max() > 0.1  # the rotation did something


def test_emulated_rotary_out_of_range_positions_are_clamped(emu_rot):
    x, cos, sin, pos = make_case("d64_r32")
    S = cos.shape[0]
    pos = pos.clone()
    pos[0, :4] = torch.tensor([-1, -(2**40), S, 2**40 + 3])
    for interleaved in (False, True):
        out, _ = emulated_rotary(emu_rot, x, cos, sin, pos, interleaved, False)
        check_output(out, x, cos, sin, pos.clamp(0, S - 1), interleaved, False)


def test_emulated_rotary_empty_and_refused_sizes(emu_rot):
    x, cos, sin, pos = make_case("d64_r32")
    for empty in (x[:0], x[:, :0], x[:, :, :0]):  # no tokens / no heads: no launch
        out, config = emulated_rotary(emu_rot, empty, cos, sin, pos[: empty.shape[0], : empty.shape[1]], True, False)
        assert out.shape == empty.shape and config == [0, 0, 0]
    config = (ctypes.c_int64 * 3)()

    def refused(sizes):
        return emu_rot.emu_rotary(2, 2, 1, _i64(sizes), _ptr(x), _i64(x.stride()), _ptr(cos), _i64(cos.stride()),
                                  _ptr(sin), _i64(sin.stride()), _ptr(pos), _i64(pos.stride()), 0, 0, _ptr(x),
                                  _i64(x.stride()), 64, config) == 1

    B, L, H, D = x.shape
    assert refused([B, L, H, D, 0, 40])             # R = 0
    assert refused([B, L, H, D, D // 2 + 1, 40])    # R > D
    assert refused([B, L, H, D, 16, 0])             # tokens but no table rows
    assert refused([2**16, 2**15, H, D, 16, 40])    # B * L over 32 bits
    assert refused([B, L, 2**16, 2**15, 16, 40])    # H * D over 32 bits


# ---------------------------------------------------------------------------------------------
# the real op on a GPU
# ---------------------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
DTYPE_IDS = ["fp16", "bf16", "fp32"]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conjugate", [False, True], ids=["forward", "conjugate"])
@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("name", list(CASES))
def test_rotary_op_matches_reference(name, style, conjugate, dtype):
    x, cos, sin, pos = make_case(name, device="cuda", x_dtype=dtype)
    interleaved = STYLES[style]
    out = torch.ops.fused_attn_C.rotary(x, cos, sin, pos, interleaved, conjugate)
    check_output(out, x, cos, sin, pos, interleaved, conjugate)
    assert out.device == x.device
    assert out.stride() == torch.empty_like(x).stride()  # x's layout when dense, else contiguous


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_rotary_op_large_and_empty(dtype):
    # many tokens and blocks, a decoding-like shape, and empty inputs (no launch)
    gen = torch.Generator().manual_seed(7)
    for B, L, H, D, R in ((4, 1000, 8, 128, 128), (3, 1, 32, 128, 64), (1, 2048, 2, 80, 32)):
        x = torch.randn(B, L, H, D, generator=gen).to("cuda", dtype)
        angle = torch.randn(4096, R // 2, generator=gen, dtype=torch.float64).cuda()
        pos = torch.randint(0, 4096, (B, L), generator=gen).cuda()
        for interleaved in (False, True):
            out = torch.ops.fused_attn_C.rotary(x, angle.cos().float(), angle.sin().float(), pos, interleaved, False)
            check_output(out, x, angle.cos().float(), angle.sin().float(), pos, interleaved, False)
    cos = torch.ones(4, 8, device="cuda")
    for shape in ((0, 3, 2, 16), (2, 0, 2, 16), (2, 3, 0, 16)):
        x = torch.empty(shape, device="cuda", dtype=dtype)
        pos = torch.zeros(shape[:2], dtype=torch.int64, device="cuda")
        out = torch.ops.fused_attn_C.rotary(x, cos, cos, pos, False, False)
        assert out.shape == shape and out.dtype == dtype


@gpu
def test_rotary_op_rejects_bad_input():
    op = torch.ops.fused_attn_C.rotary
    x = torch.randn(2, 5, 3, 16, device="cuda")
    cos, sin = torch.randn(9, 8, device="cuda"), torch.randn(9, 8, device="cuda")
    pos = torch.zeros(2, 5, dtype=torch.int64, device="cuda")
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        op(x[0], cos, sin, pos, False, False)
    with pytest.raises(RuntimeError, match="x must be float16, bfloat16 or float32"):
        op(x.double(), cos, sin, pos, False, False)
    with pytest.raises(RuntimeError, match="rotary dim"):
        op(x, torch.randn(9, 9, device="cuda"), torch.randn(9, 9, device="cuda"), pos, False, False)
    with pytest.raises(RuntimeError, match="rotary dim"):
        op(x, cos[:, :0], sin[:, :0], pos, False, False)
    with pytest.raises(RuntimeError, match="one shape"):
        op(x, cos, sin[:, :4], pos, False, False)
    with pytest.raises(RuntimeError, match="sin must have dtype"):
        op(x, cos, sin.half(), pos, False, False)
    with pytest.raises(RuntimeError, match="cos must be float16, bfloat16, float32 or float64"):
        op(x, cos.int(), sin.int(), pos, False, False)
    with pytest.raises(RuntimeError, match="positions must be int32 or int64"):
        op(x, cos, sin, pos.float(), False, False)
    with pytest.raises(RuntimeError, match="positions must have shape"):
        op(x, cos, sin, pos[:, :4], False, False)
    with pytest.raises(RuntimeError, match="positions must be a CUDA tensor"):
        op(x, cos, sin, pos.cpu(), False, False)
    with pytest.raises(RuntimeError, match="cos must be a CUDA tensor"):
        op(x, cos.cpu(), sin, pos, False, False)
    with pytest.raises(RuntimeError, match="no rows"):
        op(x, cos[:0], sin[:0], pos, False, False)
