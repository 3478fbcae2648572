"""GPU readiness of the Triton LayerNorm kernels, checked without a GPU.

Every configuration the launchers may pick (``fused_attn.triton.layer_norm.possible_configs``)
is compiled ahead of time for sm_90 and sm_80 in a subprocess without TRITON_INTERPRET, with
every feature on (residual, weight, bias, dropout, the pre-LN gradient), which is the variant
with the most live values. Each must fit shared memory, spill nothing (no LDL/STL in the SASS)
and load with 16-byte vectors (``ld.global.v4``) when the row allows it (16-byte aligned rows:
pointers aligned and hidden size / row strides divisible by 16, as Triton specialises them).

The dtypes alternate so that both arches see half and single precision: sm_90 compiles bf16
inputs with a float32 residual stream (residual_in_fp32), sm_80 compiles float32 throughout.
"""
import pytest

from fused_attn.triton._aot import run_isolated

SCRIPT = r"""
import json
import triton.language as tl
from fused_attn.triton import layer_norm as L
from fused_attn.triton._aot import aot_compile

DTYPES = {90: ("bf16", "fp32", tl.bfloat16), 80: ("fp32", "fp32", tl.float32)}  # x, summed

def fwd(arch, cfg):
    xt, st, _ = DTYPES[arch]
    sig = dict(X="*" + xt, RES="*" + st, W="*" + xt, B="*" + xt, OUT="*" + xt, SUMMED="*" + st,
               MEAN="*fp32", RSTD="*fp32", n_rows="i32", n_cols="i32", stride_x="i32", stride_res="i32",
               stride_out="i32", stride_s="i32", eps="fp32", stat_scale="fp32", drop_threshold="i64", drop_scale="fp32",
               seed_lo="i64", seed_hi_mix="i64", offset_lo="i64", offset_hi="i64")
    const = dict(ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"], SINGLE=cfg["SINGLE"], HAS_RES=True, HAS_W=True,
                 HAS_B=True, RMS=False, DROPOUT=True, STORE_SUM=True)
    div = ("X", "RES", "W", "B", "OUT", "SUMMED", "MEAN", "RSTD", "n_cols", "stride_x", "stride_res",
           "stride_out", "stride_s")
    return aot_compile(L._ln_fwd_kernel, sig, const, arch=arch, num_warps=cfg["num_warps"], num_stages=1,
                       divisible_by_16=div)

def bwd(arch, cfg):
    xt, st, x_tl = DTYPES[arch]
    sig = dict(DOUT="*" + xt, DSUMMED="*" + st, SUMMED="*" + st, W="*" + xt, MEAN="*fp32", RSTD="*fp32",
               DSUM="*" + st, DX="*" + xt, DW_PART="*fp32", DB_PART="*fp32", ROW_C1="*fp32", ROW_C2="*fp32",
               ROW_CORR="*fp32",
               n_rows="i32", n_cols="i32", rows_per_program="i32", stride_dout="i32", stride_dsummed="i32",
               stride_s="i32", stride_ds="i32", stride_dx="i32", drop_threshold="i64", drop_scale="fp32",
               seed_lo="i64", seed_hi_mix="i64", offset_lo="i64", offset_hi="i64")
    const = dict(ROWS=cfg["ROWS"], BLOCK_D=cfg["BLOCK_D"], SINGLE=cfg["SINGLE"], HAS_W=True, HAS_B=True,
                 HAS_DSUMMED=True, RMS=False, DROPOUT=True, X_DTYPE=x_tl)
    div = ("DOUT", "DSUMMED", "SUMMED", "W", "MEAN", "RSTD", "DSUM", "DX", "DW_PART", "DB_PART", "ROW_C1",
           "ROW_C2", "ROW_CORR", "n_cols", "stride_dout", "stride_dsummed", "stride_s", "stride_ds", "stride_dx")
    return aot_compile(L._ln_bwd_kernel, sig, const, arch=arch, num_warps=cfg["num_warps"], num_stages=1,
                       divisible_by_16=div)

def partials(arch):
    out = "*" + DTYPES[arch][0]
    return aot_compile(L._sum_partials_kernel, dict(PART="*fp32", OUT0=out, OUT1=out, n_parts="i32", n_cols="i32"),
                       dict(BLOCK_P=L._SUM_BLOCK_P, BLOCK_C=L._SUM_BLOCK_C), arch=arch, num_warps=4, num_stages=1,
                       divisible_by_16=("PART", "OUT0", "OUT1", "n_cols"))

results = []
for arch in (90, 80):
    for cfg in L.possible_configs():
        r = (bwd if cfg["backward"] else fwd)(arch, cfg)
        results.append(dict(r.to_dict(), problems=r.problems()))
    r = partials(arch)
    results.append(dict(r.to_dict(), problems=r.problems()))
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def compiled():
    return run_isolated(SCRIPT, timeout=900)


def _label(r):
    return f"{r['kernel']} sm_{r['arch']} warps={r['num_warps']} {r['constexprs']}"


def test_every_config_compiles_for_both_arches(compiled):
    from fused_attn.triton.layer_norm import possible_configs

    assert len(compiled) == 2 * (len(possible_configs()) + 1)
    assert {r["arch"] for r in compiled} == {80, 90}


def test_fits_and_does_not_spill(compiled):
    bad = [f"{_label(r)}: {'; '.join(r['problems'])}" for r in compiled if r["problems"]]
    assert not bad, "\n".join(bad)


def test_16_byte_vector_loads(compiled):
    # every configuration has BLOCK_D >= 64, so its rows always allow 16-byte loads
    missing = [_label(r) for r in compiled if r["vector_loads"] == 0]
    assert not missing, "no ld.global.v4/v8 in:\n" + "\n".join(missing)

