"""GPU readiness of the feed-forward GEMM kernel without a GPU: ahead-of-time compilation.

Every tile configuration the autotuner may pick on sm_90 (Hopper) and sm_80 (Ampere) is
compiled in a fresh Python without TRITON_INTERPRET (fused_attn.triton._aot.run_isolated) and
must fit shared memory, spill nothing (no LDL/STL in the SASS) and, on sm_90 with 16-bit
inputs, run its main loop on wgmma (HGMMA in the SASS).

Each config is compiled in the heaviest variant it can be given (the most live registers):
the gated forward epilogue (two accumulators) where the config is offered to it, else the gated
backward epilogue (pre loads, activation and derivative, dropout hash, bias sums). The lighter
variants (bias-only epilogue, float32 inputs) are compiled on the largest config.
``FUSED_ATTN_AOT_ALL=1`` widens this to every variant x config x dtype (several minutes), and
``python tests/test_triton_feed_forward_aot.py [--all]`` prints the table.
"""
import json
import os
import sys

import pytest

pytest.importorskip("triton")

ALL = os.environ.get("FUSED_ATTN_AOT_ALL", "0") not in ("", "0")

# The compile job, run in the subprocess. ``jobs`` is a list of
# (arch, config_index_in_arch_list, variant, dtype[, tma]) and it prints one JSON list of results.
# ``tma``: the config's TMA twin (HOPPER_TMA_CONFIGS), A and B as descriptors (B as the (N, K)
# weight forward, as (K, N) in the backward GEMM, as the launcher describes them).
_COMPILE = r'''
import json, sys
from fused_attn.triton import feed_forward as ff
from fused_attn.triton._aot import aot_compile

jobs = json.loads(sys.argv[1]) if len(sys.argv) > 1 else JOBS
VARIANTS = {  # variant -> constexpr flags (the gated gelu flavours carry the most code)
    "fwd_gated": dict(EPILOGUE=ff.EPI_ACT_FWD, ACT=ff.ACT_GELU, GATED=True, HAS_BIAS=True, DROPOUT=True),
    "fwd": dict(EPILOGUE=ff.EPI_ACT_FWD, ACT=ff.ACT_GELU, GATED=False, HAS_BIAS=True, DROPOUT=True),
    "bwd_gated": dict(EPILOGUE=ff.EPI_ACT_BWD, ACT=ff.ACT_GELU, GATED=True, HAS_BIAS=True, DROPOUT=True),
    "bwd": dict(EPILOGUE=ff.EPI_ACT_BWD, ACT=ff.ACT_GELU_TANH, GATED=False, HAS_BIAS=True, DROPOUT=True),
    "bias": dict(EPILOGUE=ff.EPI_BIAS, ACT=ff.ACT_RELU, GATED=False, HAS_BIAS=True, DROPOUT=False),
}
INTS = ["M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn", "up_offset_b", "stride_pre_m",
        "stride_out_m", "stride_h_m", "stride_colsum_m", "up_col", "col0"]
out = []
for arch, index, variant, dtype, *tma in jobs:
    tma = bool(tma and tma[0])
    flags = VARIANTS[variant]
    cfg = (ff.HOPPER_TMA_CONFIGS if tma else ff.HOPPER_CONFIGS if arch == 90 else ff.AMPERE_CONFIGS)[index]
    p = "*" + dtype
    b_nk = flags["EPILOGUE"] != ff.EPI_ACT_BWD
    bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    sig = {"a_ptr": p, "b_ptr": p, "a_desc": p, "b_desc": p, "bias_ptr": p, "pre_ptr": p, "out_ptr": p, "h_ptr": p,
           "colsum_ptr": "*fp32"}
    if tma:
        sig["a_desc"] = f"tensordesc<{dtype}[{bm}, {bk}]>"
        sig["b_desc"] = f"tensordesc<{dtype}[{bn}, {bk}]>" if b_nk else f"tensordesc<{dtype}[{bk}, {bn}]>"
    sig.update({name: "i32" for name in INTS})
    sig.update(seed_lo="i64", seed_hi_mix="i64", offset="i64", threshold="i64", drop_scale="fp32", TMA_KEY="i32")
    constexprs = dict(flags, DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", B_NK=tma and b_nk, **cfg.kwargs)
    # unit strides are specialised to constants by the runtime: A is always row-major (K contiguous);
    # B is w^T (K contiguous) forward and w2 itself (N contiguous) in the backward GEMM
    constexprs["stride_ak"] = 1
    constexprs["stride_bn" if flags["EPILOGUE"] == ff.EPI_ACT_BWD else "stride_bk"] = 1
    for name in constexprs:
        sig.pop(name, None)
    aligned = tuple(n for n in sig if n.endswith("_ptr") or n in INTS)  # aligned tensors, sizes % 16 == 0
    aligned += tuple(n for n in ("a_desc", "b_desc") if not tma)
    r = aot_compile(ff._ffn_gemm, sig, constexprs, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                    divisible_by_16=aligned)
    elem = 4 if dtype == "fp32" else 2
    gated = variant == "fwd_gated"  # two B tiles in the pipeline
    out.append(dict(arch=arch, index=index, variant=variant, dtype=dtype, block=[cfg.kwargs[k] for k in
                    ("BLOCK_M", "BLOCK_N", "BLOCK_K")], stages=cfg.num_stages, warps=cfg.num_warps,
                    shared=r.shared, estimate=ff.shared_memory_estimate(cfg, elem, gated), registers=r.registers,
                    spills=r.spills, hgmma=r.hgmma, tma=tma, tma_loads=r.tma_loads,
                    problems=r.problems(require_hgmma=dtype != "fp32")
                    + (["no UTMALDG in the TMA variant"] if tma and not r.tma_loads else [])))
print(json.dumps(out))
'''


#: variant -> (epilogue code, gated), to ask configs_for which configs the variant may get
_VARIANT_KIND = {"fwd_gated": (1, True), "fwd": (1, False), "bwd_gated": (2, True), "bwd": (2, False),
                 "bias": (0, False)}


def _configs(arch, elem_bytes, variant):
    from fused_attn.triton import feed_forward as ff
    arch_list = ff.HOPPER_CONFIGS if arch == 90 else ff.AMPERE_CONFIGS
    epilogue, gated = _VARIANT_KIND[variant]
    return [arch_list.index(c) for c in ff.configs_for(arch // 10, elem_bytes, epilogue, gated)]


def jobs_for(arch, everything=False):
    """(arch, config index, variant, dtype) to compile for ``arch``.

    Default: every config of the arch's list once, in the heaviest variant it is offered to
    (gated backward > gated forward > forward > bias-only), then each variant on its largest
    config if not yet compiled, in bfloat16; plus one float32 backward.
    ``everything``: every (variant, config) pair the pruning allows, for bf16, fp16 and fp32.
    """
    if everything:
        return [(arch, i, v, dtype) for dtype, elem in (("bf16", 2), ("fp16", 2), ("fp32", 4))
                for v in _VARIANT_KIND for i in _configs(arch, elem, v)]
    order = ("bwd_gated", "fwd_gated", "fwd", "bias")
    jobs, done = [], set()
    for variant in order:
        for i in _configs(arch, 2, variant):
            if i not in done:
                jobs.append((arch, i, variant, "bf16"))
                done.add(i)
    for variant in order:
        if not any(v == variant for _, _, v, _ in jobs):
            jobs.append((arch, _configs(arch, 2, variant)[0], variant, "bf16"))
    jobs.append((arch, _configs(arch, 4, "bwd_gated")[0], "bwd_gated", "fp32"))
    return jobs


def compile_jobs(jobs):
    from fused_attn.triton._aot import run_isolated
    return run_isolated(f"import json\nJOBS = json.loads({json.dumps(jobs)!r})\n" + _COMPILE, timeout=3600)


@pytest.mark.parametrize("arch", [90, 80], ids=["sm_90", "sm_80"])
def test_every_config_compiles_fits_and_does_not_spill(arch):
    results = compile_jobs(jobs_for(arch, ALL))
    assert results, "nothing was compiled"
    bad = [f"{r['variant']} {r['dtype']} block {r['block']} stages {r['stages']} warps {r['warps']}: "
           + "; ".join(r["problems"]) for r in results if r["problems"]]
    assert not bad, "\n".join(bad)
    from fused_attn.triton import feed_forward as ff
    n_configs = len(ff.HOPPER_CONFIGS if arch == 90 else ff.AMPERE_CONFIGS)
    assert {r["index"] for r in results} == set(range(n_configs)), "a config was not compiled"
    for r in results:
        if arch == 90 and r["dtype"] != "fp32":
            assert r["hgmma"] > 0, r


def tma_jobs():
    """Every TMA twin (sm_90, bf16) in the heaviest variant its pointer config is offered to."""
    jobs, done = [], set()
    for arch, index, variant, dtype in jobs_for(90):
        if dtype == "bf16" and index not in done:
            jobs.append((90, index, variant, "bf16", True))
            done.add(index)
    return jobs


def test_tma_twins_compile_with_the_copy_engine():
    """The TMA configurations: they compile for sm_90 with HGMMA and UTMALDG (the A and B tiles
    through the copy engine), fit, and spill nothing, in their heaviest epilogue."""
    results = compile_jobs(tma_jobs())
    from fused_attn.triton import feed_forward as ff
    assert {r["index"] for r in results} == set(range(len(ff.HOPPER_TMA_CONFIGS)))
    bad = [f"{r['variant']} block {r['block']} stages {r['stages']} warps {r['warps']}: " + "; ".join(r["problems"])
           for r in results if r["problems"]]
    assert not bad, "\n".join(bad)
    for r in results:
        assert r["tma"] and r["tma_loads"] > 0 and r["hgmma"] > 0, r


@pytest.mark.parametrize("tma_key", [0, 1, 2])
def test_configs_for_offers_tma_twins_on_hopper(tma_key):
    from fused_attn.triton import feed_forward as ff
    for epilogue, gated in _VARIANT_KIND.values():
        plain = ff.configs_for(9, 2, epilogue, gated)
        got = ff.configs_for(9, 2, epilogue, gated, tma_key)
        twins = [ff.HOPPER_TMA_CONFIGS[ff.HOPPER_CONFIGS.index(c)] for c in plain]
        assert got == {0: plain, 1: plain + twins, 2: twins}[tma_key]
        assert ff.configs_for(8, 2, epilogue, gated, tma_key) == ff.configs_for(8, 2, epilogue, gated)


def test_shared_memory_pruning_keeps_every_config_within_the_chip():
    from fused_attn.triton import feed_forward as ff
    # the db1 partial-sum buffer has one row per BLOCK_M rows, sized for the smallest BLOCK_M
    assert min(c.kwargs["BLOCK_M"] for c in ff.HOPPER_CONFIGS + ff.AMPERE_CONFIGS) >= ff._MIN_BLOCK_M
    for major, limit in ((9, ff.SMEM_LIMIT[90]), (8, ff.SMEM_LIMIT[80])):
        for elem in (2, 4):
            for epilogue, gated in _VARIANT_KIND.values():
                configs = ff.configs_for(major, elem, epilogue, gated)
                assert configs
                two_b = gated and epilogue == ff.EPI_ACT_FWD
                for c in configs:
                    assert ff.shared_memory_estimate(c, elem, two_b) <= limit
                    assert ff.accumulator_registers(c, two_b) <= ff.ACC_REGISTER_BUDGET.get(epilogue, 32)



def test_backward_config_follows_the_triton_version():
    """Triton 3.6 spills the gated backward epilogue at 128x64 tiles (measured by this file's
    compile under 3.6): versions before 3.9 get 64x64 tiles there (not gated: 128x64 under both);
    both tables cover every (arch, element size, gated) and name configs that
    fit the chip and keep BLOCK_M >= _MIN_BLOCK_M (the db1 buffer's row count)."""
    from fused_attn.triton import feed_forward as ff
    assert ff._triton_version("3.6.0") == (3, 6) and ff._triton_version("3.10.0rc1") == (3, 10)
    expected = ff.BWD_CONFIG_NEW if ff._triton_version() >= (3, 9) else ff.BWD_CONFIG_OLD
    assert ff.BWD_CONFIG is expected
    for table in (ff.BWD_CONFIG_NEW, ff.BWD_CONFIG_OLD):
        assert {(major, elem, gated) for major, elem, gated in table} == {
            (m, e, g) for m in (80, 90) for e in (2, 4) for g in (False, True)}
        for (major, elem, gated), index in table.items():
            cfg = (ff.HOPPER_CONFIGS if major == 90 else ff.AMPERE_CONFIGS)[index]
            assert ff.shared_memory_estimate(cfg, elem, False) <= ff.SMEM_LIMIT[major]
            assert cfg.kwargs["BLOCK_M"] >= ff._MIN_BLOCK_M
            assert elem == 2 or cfg.kwargs["BLOCK_K"] <= 32


if __name__ == "__main__":
    everything = "--all" in sys.argv
    rows = compile_jobs(jobs_for(90, everything) + jobs_for(80, everything) + tma_jobs())
    print("| arch | variant | dtype | BLOCK M,N,K | stages | warps | shared (B) | regs | spills | HGMMA | problems |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| sm_{r['arch']}{' tma' if r['tma'] else ''} | {r['variant']} | {r['dtype']} | {','.join(map(str, r['block']))} | {r['stages']} | "
              f"{r['warps']} | {r['shared']} | {r['registers']} | {r['spills']} | {r['hgmma']} | "
              f"{'; '.join(r['problems']) or 'ok'} |")
