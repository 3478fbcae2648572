"""GPU readiness of the Triton rotary kernel, checked without a GPU (benchmarks/gpu_check.sh skips
the *_aot.py files: on a GPU the kernels run for real in test_triton_rotary.py).

Every configuration the launcher may pick (``fused_attn.triton.rotary.possible_configs``) is
compiled ahead of time for sm_90 (bf16 x, float32 tables) and sm_80 (float32), interleaved or not,
in the conjugate variant, as a launch on the usual sizes sees it (16-byte aligned bases, strides
divisible by 16): it must fit, spill nothing, and load 16-byte vectors.
"""
import concurrent.futures

import pytest

from fused_attn.triton import rotary as ROT

AOT_SCRIPT = r"""
import json
from fused_attn.triton import rotary as M
from fused_attn.triton._aot import aot_compile

ARCH = {arch}
XT = {{90: "bf16", 80: "fp32"}}[ARCH]  # cos/sin float32 on both
sig = dict(X="*" + XT, COS="*fp32", SIN="*fp32", OUT="*" + XT, POS="*i64",
           seqlen="i32", nheads="i32", half="i32", head_dim="i32", tiles="i32", table_rows="i32",
           stride_xb="i64", stride_xl="i64", stride_xh="i64", stride_ob="i64", stride_ol="i64", stride_oh="i64",
           stride_pb="i64", stride_pl="i64", stride_cl="i64", stride_sl="i64")
# what a launch on the usual sizes sees: 16-byte aligned bases and strides divisible by 16
div = ("X", "COS", "SIN", "OUT", "POS", "half", "head_dim", "stride_xb", "stride_xl", "stride_xh",
       "stride_ob", "stride_ol", "stride_oh", "stride_cl", "stride_sl")
results = []
for cfg in M.possible_configs():
    for interleaved in (False, True):
        # conjugate (one more negation), unit feature strides (the usual layouts)
        const = dict(ROWS=cfg["ROWS"], BLOCK_K=cfg["BLOCK_K"], BLOCK_P=cfg["BLOCK_P"], INTERLEAVED=interleaved,
                     CONJUGATE=True, stride_xd=1, stride_od=1, stride_ck=1, stride_sk=1)
        r = aot_compile(M._rotary_kernel, sig, const, arch=ARCH, num_warps=cfg["num_warps"], num_stages=1,
                        divisible_by_16=div)
        results.append(dict(r.to_dict(), problems=r.problems()))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled():
    from fused_attn.triton._aot import run_isolated

    # one subprocess per arch, side by side
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_isolated, AOT_SCRIPT.format(arch=arch), 600) for arch in (90, 80)]
        return [r for run in runs for r in run.result()]


def _label(r):
    return f"sm_{r['arch']} warps={r['num_warps']} {r['constexprs']}"


def test_aot_every_config_compiles_for_both_arches(compiled):
    assert len(compiled) == 2 * 2 * len(ROT.possible_configs())
    assert {r["arch"] for r in compiled} == {80, 90}


def test_aot_fits_and_does_not_spill(compiled):
    bad = [f"{_label(r)}: {'; '.join(r['problems'])}" for r in compiled if r["problems"]]
    assert not bad, "\n".join(bad)


def test_aot_16_byte_vector_loads(compiled):
    # BLOCK_K >= 8: a chunk row is at least 16 bytes of bf16 / 32 of float32
    missing = [_label(r) for r in compiled if r["vector_loads"] == 0]
    assert not missing, "no ld.global.v4/v8 in:\n" + "\n".join(missing)
