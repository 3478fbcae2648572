"""Ahead-of-time compilation of the Triton attention kernels for sm_90 and sm_80 (no GPU needed).

Every configuration the autotuner may try (``all_configs`` filtered by ``config_ok``) must compile,
fit the chip's shared memory, spill nothing to local memory inside its loops (no LDL/STL in a loop
body of the SASS; a spill around the loop, saved before and restored after, is allowed:
``AotResult.problems(spills_around_loops_ok=True)``) and, on sm_90 in half precision, run its main
loop on ``HGMMA`` (wgmma). The configurations found spilling in their loops for a feature set are
left out of its candidates (HEAVY_SPILLS, ALIBI_SPILLS, PLAIN_ONLY) unless nothing else is left
(docs/backends.md, Backend notes, lists those). Compilation needs
TRITON_INTERPRET unset, so the work runs in a subprocess (``fused_attn.triton._aot.run_isolated``).

The arguments compiled are exactly those the launchers pass (``fwd_launch_args`` /
``bwd_launch_args`` on CPU tensors of a typical contiguous layout), specialised the way the JIT
specialises them (16-divisible pointers and strides, unit strides as constants).

Each compile takes 10-60 s on two shared cores, so each test run checks a representative subset;
the sweep over every configuration is run by hand with
``python tests/test_triton_attention_aot.py [--arch 90] [--dtype float16] [--features all] [--out r.json]``.
"""
from __future__ import annotations

import json
import os
import sys

import pytest

pytest.importorskip("triton")

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = ("fwd", "dkdv", "dq")
#: feature sets: the plain fast path and the heaviest one (every option on at once)
FEATURES = {
    "plain": dict(causal=False, mask=None, dropout=False, mask_grad=False),
    "causal": dict(causal=True, mask=None, dropout=False, mask_grad=False),
    "all": dict(causal=True, mask="additive", dropout=True, mask_grad=True, softcap=True),
    "dropout": dict(causal=False, mask=None, dropout=True, mask_grad=False),
    "mask_grad": dict(causal=False, mask="additive", dropout=False, mask_grad=True),
    "bool_mask": dict(causal=False, mask="bool", dropout=False, mask_grad=False),
    # packed sequences (attention_varlen): bottom-right causal, then with dropout and softcap
    "varlen": dict(causal=True, mask=None, dropout=False, mask_grad=False, varlen=True),
    "varlen_all": dict(causal=True, mask=None, dropout=True, mask_grad=False, softcap=True, varlen=True),
    # ALiBi (per-head slopes, a stride-0 expand to (B, Hq)): alone, in a causal model (top-left, as
    # in training), with every other option on and bottom-right (the distance's shift Lk - Lq a
    # runtime value), and in packed sequences (each shifted by its own lengths)
    "alibi": dict(causal=False, mask=None, dropout=False, mask_grad=False, alibi=True),
    "alibi_causal": dict(causal=True, mask=None, dropout=False, mask_grad=False, alibi=True),
    "alibi_all": dict(causal=True, mask="additive", dropout=True, mask_grad=True, softcap=True, alibi=True,
                      bottom_right=True),
    "varlen_alibi": dict(causal=True, mask=None, dropout=True, mask_grad=False, softcap=True, varlen=True,
                         alibi=True),
    # split-KV decoding (the forward's SPLIT_KV: partial results to float32 scratch): with a padding
    # mask (a batch of prompts of different lengths), and in packed sequences
    "split": dict(causal=False, mask="bool", dropout=False, mask_grad=False, split=True),
    "varlen_split": dict(causal=True, mask=None, dropout=False, mask_grad=False, varlen=True, split=True),
    # a paged KV cache (block_table, 16-row pages as vLLM's), decoding with split keys
    "varlen_paged": dict(causal=True, mask=None, dropout=False, mask_grad=False, varlen=True, split=True,
                         paged=True),
}


def _split_scratch(features, lse_shape, head_dim_v):
    """(KvSplit, out, lse) of a split-KV forward (4 splits of 256 keys), split 0's views of the
    float32 scratch as ``attention._launch_forward`` passes them, or (None, None, None)."""
    import torch

    from fused_attn.triton import attention as A

    if not features.get("split"):
        return None, None, None
    out_part = torch.empty(4, *lse_shape, head_dim_v, dtype=torch.float32)
    lse_part = torch.empty(4, *lse_shape, dtype=torch.float32)
    return A.KvSplit(4, 0, 256, out_part.stride(0), lse_part.stride(0)), out_part[0], lse_part[0]



def _heavy(features):
    """Whether a feature set is "heavy" as the autotuner's prune (``attention._make_prune``) counts it:
    an attn_mask, its gradient, dropout or the soft cap (HEAVY_SPILLS and ALIBI_HEAVY_SPILLS skipped)."""
    return bool(features["mask"] or features["dropout"] or features["mask_grad"] or features.get("softcap"))


def _band(features):
    """The ops' (band_lo, band_hi) of a feature set: causal compiles the banded kernels, whose code
    is the same for any band (causal, sliding window, bottom-right): only the values differ."""
    from fused_attn.ops_common import CAUSAL_BAND, NO_BAND
    return CAUSAL_BAND if features["causal"] else NO_BAND


# ---------------------------------------------------------------------------------------------
# the compile driver (runs in the subprocess, without TRITON_INTERPRET)
# ---------------------------------------------------------------------------------------------

def _alibi_slopes(features, rows, Hq):
    """The ALiBi slopes of a feature set as functional.attention passes them: (Hq,) float32
    expanded to (rows, Hq) (batch stride 0), or None."""
    import torch

    return torch.empty(Hq, dtype=torch.float32).expand(rows, Hq) if features.get("alibi") else None


def _launch(kernel, dtype_name, head_dim, head_dim_v, features, tma=False):
    """(fn, args, constexprs) of one kernel as the launcher would call it on a GPU (``tma``: with
    the streamed operands' TMA descriptors)."""
    import torch

    from fused_attn.triton import attention as A

    dtype = getattr(torch, dtype_name)
    B, Hq, Hkv, L = 2, 8, 4, 1024
    if features.get("varlen"):
        return _launch_varlen(A, kernel, dtype, head_dim, head_dim_v, features)
    q = torch.empty(B, Hq, L, head_dim, dtype=dtype)
    k = torch.empty(B, Hkv, L, head_dim, dtype=dtype)
    v = torch.empty(B, Hkv, L, head_dim_v, dtype=dtype)
    mask = None
    if features["mask"] == "additive":
        mask = torch.empty(1, 1, L, L, dtype=dtype).expand(B, Hq, L, L)
    elif features["mask"] == "bool":
        mask = torch.empty(B, 1, 1, L, dtype=torch.bool).expand(B, Hq, L, L)
    p = 0.1 if features["dropout"] else 0.0
    lse = torch.empty(B, Hq, L, dtype=torch.float32)
    alibi = dict(alibi_slopes=_alibi_slopes(features, B, Hq), bottom_right=features.get("bottom_right", False))
    if kernel == "fwd":
        out = A.new_attention_out(q, head_dim_v)
        split, split_out, split_lse = _split_scratch(features, lse.shape, head_dim_v)
        if split is not None:
            out, lse = split_out, split_lse
        _, _, args, constexprs = A.fwd_launch_args(q, k, v, mask, *_band(features), p, 0.125, 123, 456, out, lse,
                                                   tma=tma, softcap=30.0 if features.get("softcap") else 0.0,
                                                   split=split, **alibi)
    else:
        dout = A.new_attention_out(q, head_dim_v)
        dmask = torch.empty(B, Hq, L, L, dtype=dtype) if features["mask_grad"] else torch.empty(0, dtype=dtype)
        launches = A.bwd_launch_args(dout, q, k, v, lse, torch.empty_like(lse), mask, *_band(features), p, 0.125,
                                     123, 456, features["mask_grad"], torch.empty_like(q), torch.empty_like(k),
                                     torch.empty_like(v), dmask, tma=tma,
                                     softcap=30.0 if features.get("softcap") else 0.0, **alibi)
        _, _, args, constexprs = launches[kernel]
    return A._KERNELS[kernel], args, constexprs


def _launch_varlen(A, kernel, dtype, head_dim, head_dim_v, features):
    """As ``_launch`` for the packed-sequence launch of ``attention_varlen_fwd`` / ``_bwd``."""
    import torch

    from fused_attn.ops_common import CAUSAL_BAND

    T, Hq, Hkv = 4096, 8, 4
    cu = torch.tensor([0, 1000, 3000, T], dtype=torch.int32)
    block_table = torch.empty(3, 128, dtype=torch.int32) if features.get("paged") else None
    varlen = A.Varlen(cu, cu, 2000, 2000, True, block_table=block_table)
    q, k, v = (A.Varlen.as_batch(torch.empty(T, h, d, dtype=dtype))
               for h, d in ((Hq, head_dim), (Hkv, head_dim), (Hkv, head_dim_v)))
    if block_table is not None:  # pages of 16 rows
        k, v = (torch.empty(T // 16, 16, Hkv, d, dtype=dtype) for d in (head_dim, head_dim_v))
    p = 0.1 if features["dropout"] else 0.0
    cap = 30.0 if features.get("softcap") else 0.0
    lse = torch.empty(Hq, T, dtype=torch.float32)
    slopes = _alibi_slopes(features, cu.shape[0] - 1, Hq)
    if kernel == "fwd":
        out = A.Varlen.as_batch(torch.empty(T, Hq, head_dim_v, dtype=dtype))
        split, split_out, split_lse = _split_scratch(features, lse.shape, head_dim_v)
        if split is not None:
            out, lse = split_out.unsqueeze(0), split_lse
        _, _, args, constexprs = A.fwd_launch_args(q, k, v, None, *CAUSAL_BAND, p, 0.125, 123, 456, out, lse,
                                                   softcap=cap, varlen=varlen, alibi_slopes=slopes, split=split)
    else:
        dout = A.Varlen.as_batch(torch.empty(T, Hq, head_dim_v, dtype=dtype))
        launches = A.bwd_launch_args(dout, q, k, v, lse, torch.empty_like(lse), None, *CAUSAL_BAND, p, 0.125, 123,
                                     456, False, torch.empty(T, Hq, head_dim, dtype=dtype),
                                     torch.empty(T, Hkv, head_dim, dtype=dtype),
                                     torch.empty(T, Hkv, head_dim_v, dtype=dtype), torch.empty(0, dtype=dtype),
                                     softcap=cap, varlen=varlen, alibi_slopes=slopes)
        _, _, args, constexprs = launches[kernel]
    return A._KERNELS[kernel], args, constexprs


def _specialise(fn, args):
    """Signature, constants and 16-divisible argument names, as the JIT derives them."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    signature, constants, divisible = {}, {}, []
    for name, arg in zip(fn.arg_names, args):
        specialise = name not in fn.do_not_specialize
        ty, spec = native_specialize_impl(BaseBackend, arg, False, specialise, specialise)
        if ty == "constexpr":
            constants[name] = spec
        else:
            signature[name] = ty
            if spec == "D":
                divisible.append(name)
    return signature, constants, divisible


def compile_one(kernel, arch, dtype_name, head_dim, head_dim_v, outer, inner, num_warps, num_stages, features,
                tma=False):
    """Compile one configuration; returns the AotResult as a dict plus its problems. ``tma``: the
    TMA-streamed variant (STREAM_TMA, descriptors sized by the configuration's pre-hook), which
    must also load through the copy engine (UTMALDG in the SASS).

    dK/dV at head dims above 128 is launched as two passes (``attention.dkdv_passes``): both are
    compiled and the result is the worse of the two (most shared memory and registers, spills
    added up, fewest HGMMA), with each pass's problems named; ``passes`` holds each one's result."""
    from fused_attn.triton import _aot
    from fused_attn.triton import attention as A

    fn, args, constexprs = _launch(kernel, dtype_name, head_dim, head_dim_v, FEATURES[features], tma)
    outer_name, inner_name = A.OUTER_INNER[kernel]
    blocks = {outer_name: outer, inner_name: inner}
    A._descriptor_blocks_hook(kernel)(dict(zip(fn.arg_names, args), **constexprs, **blocks))
    if tma:
        assert isinstance(args[fn.arg_names.index(A.STREAM_DESCRIPTORS[kernel][0])], A._DESCRIPTOR_TYPES)
    signature, constants, divisible = _specialise(fn, args)
    constants.update(constexprs, STREAM_TMA=bool(tma), **blocks)
    passes = A.dkdv_passes(constants["HEAD_DIM"], constants["HEAD_DIM_V"]) if kernel == "dkdv" else (None,)
    half = dtype_name in ("float16", "bfloat16")
    per_pass, problems = [], []
    for dkdv_pass in passes:
        if dkdv_pass is not None:
            constants["DKDV_PASS"] = dkdv_pass
        res = _aot.aot_compile(fn, signature, dict(constants), arch=arch, num_warps=num_warps,
                               num_stages=num_stages, divisible_by_16=divisible)
        per_pass.append(res.to_dict())
        label = "" if len(passes) == 1 else f"pass {dkdv_pass} ({'dK' if dkdv_pass == A.DKDV_DK else 'dV'}): "
        problems += [label + p for p in res.problems(require_hgmma=half, spills_around_loops_ok=True)]
        if tma and not res.tma_loads:
            problems.append(label + "no UTMALDG: the streamed tiles do not come through the copy engine")
    out = dict(per_pass[0])
    out.update(shared=max(r["shared"] for r in per_pass), registers=max(r["registers"] for r in per_pass),
               spills=sum(r["spills"] for r in per_pass), loop_spills=sum(r["loop_spills"] for r in per_pass),
               hgmma=min(r["hgmma"] for r in per_pass))
    out.update(kernel=kernel, dtype=dtype_name, head_dim=head_dim, head_dim_v=head_dim_v, outer=outer, inner=inner,
               features=features, tma=bool(tma), problems=problems, passes=per_pass if len(passes) > 1 else [])
    return out


def candidate_configs(kernel, arch, dtype_name, head_dim, head_dim_v, features="plain", tma=False):
    """The (outer, inner, warps, stages) the autotuner may try for this case: all_configs filtered
    by config_ok (what ``_make_prune`` does on the GPU, HEAVY_SPILLS skipped for the heavy feature
    sets (``_heavy``: a mask, its gradient, dropout or the soft cap) and ALIBI_SPILLS for the ALiBi
    ones unless nothing else is left)."""
    import torch

    from fused_attn.triton import attention as A

    elem = torch.empty(0, dtype=getattr(torch, dtype_name)).element_size()
    outer_name, inner_name = A.OUTER_INNER[kernel]
    f = FEATURES[features]
    mask_bytes = {None: 0, "bool": 1, "additive": 2}[f["mask"]]
    heavy = _heavy(f)
    args = (A._pow2(head_dim), A._pow2(head_dim_v), elem, arch, mask_bytes)
    mode = "only" if tma else "off"
    kept = [c for c in A.all_configs(kernel)
            if A.config_ok(kernel, c, *args, heavy, mode, f["causal"], f.get("alibi", False))]
    kept = kept or [c for c in A.all_configs(kernel) if A.config_ok(kernel, c, *args, False, mode)]
    return [(c.kwargs[outer_name], c.kwargs[inner_name], c.num_warps, c.num_stages) for c in kept]


def compile_many(cases):
    """Compile each case (a tuple of compile_one's arguments); a failure is recorded, not raised."""
    results = []
    for case in cases:
        try:
            results.append(compile_one(*case))
        except Exception as exc:  # noqa: BLE001 - reported per configuration
            keys = ("kernel", "arch", "dtype", "head_dim", "head_dim_v", "outer", "inner", "num_warps", "num_stages",
                    "features")
            results.append(dict(zip(keys, case), problems=[f"compile error: {type(exc).__name__}: {str(exc)[:300]}"]))
    return results


def _run(cases, timeout=1500):
    from fused_attn.triton._aot import run_isolated

    code = (f"import sys, json; sys.path.insert(0, {HERE!r}); sys.path.insert(0, {os.path.dirname(HERE)!r})\n"
            "import test_triton_attention_aot as m\n"
            f"print(json.dumps(m.compile_many({[tuple(c) for c in cases]!r})))")
    return run_isolated(code, timeout=timeout)


def _describe(r):
    return (f"{r['kernel']} sm_{r['arch']} {r['dtype']} D={r['head_dim']}/{r['head_dim_v']} "
            f"outer={r['outer']} inner={r['inner']} w={r['num_warps']} s={r['num_stages']} {r['features']}"
            + (" tma" if r.get("tma") else ""))


# ---------------------------------------------------------------------------------------------
# tests: a representative subset per run
# ---------------------------------------------------------------------------------------------

# The largest tiles the autotuner keeps per head dim carry the most shared memory and registers;
# each case is (kernel, arch, dtype, D, Dv, outer, inner, warps, stages, features).
SUBSET = [
    ("fwd", 90, "bfloat16", 128, 128, 128, 64, 8, 3, "plain"),
    ("dkdv", 90, "bfloat16", 128, 128, 128, 16, 8, 3, "all"),
    # the wide-query dK/dV tiles at D = 128: spills only around the loops (PLAIN_ONLY / HEAVY_SPILLS)
    ("dkdv", 90, "bfloat16", 128, 128, 128, 64, 8, 2, "plain"),
    ("dkdv", 90, "float16", 128, 128, 128, 32, 8, 2, "causal"),
    ("fwd", 90, "bfloat16", 256, 256, 128, 64, 8, 2, "causal"),
    ("dq", 90, "float16", 64, 64, 128, 64, 8, 3, "causal"),
    ("fwd", 80, "float16", 64, 64, 128, 128, 8, 3, "plain"),
    ("dkdv", 80, "bfloat16", 128, 128, 64, 32, 8, 2, "plain"),
    ("dkdv", 80, "bfloat16", 128, 128, 32, 32, 4, 2, "all"),
    # head dim 256: dK and dV in two passes, each compiled (the heavy config with every feature on)
    ("dkdv", 90, "bfloat16", 256, 256, 128, 16, 8, 2, "all"),
    ("dkdv", 90, "bfloat16", 256, 256, 64, 32, 8, 2, "causal"),
    ("dkdv", 80, "bfloat16", 256, 256, 64, 32, 8, 2, "causal"),
    ("dq", 90, "bfloat16", 256, 256, 64, 32, 8, 2, "causal"),
    # the TMA-streamed variants (sm_90): K/V, or Q/dO, through the copy engine
    ("fwd", 90, "bfloat16", 128, 128, 128, 64, 8, 3, "causal", True),
    ("dkdv", 90, "float16", 128, 128, 128, 16, 8, 2, "all", True),
    ("dq", 90, "bfloat16", 64, 64, 128, 64, 8, 3, "plain", True),
    # packed sequences: per-program sequence bounds and band, on the heaviest tiles kept
    ("fwd", 90, "bfloat16", 128, 128, 128, 64, 8, 2, "varlen_all"),
    ("dkdv", 90, "bfloat16", 128, 128, 128, 16, 8, 3, "varlen_all"),
    ("dq", 80, "float16", 128, 128, 128, 32, 8, 3, "varlen"),
    # ALiBi: the distance and slope beside the largest tiles kept for it, alone, causal, with every
    # other option, through TMA, on sm_80 and in packed sequences
    ("fwd", 90, "bfloat16", 64, 64, 128, 64, 8, 3, "alibi"),
    ("fwd", 90, "bfloat16", 128, 128, 128, 64, 8, 3, "alibi_causal"),
    ("dq", 90, "float16", 128, 128, 128, 32, 8, 3, "alibi_all"),
    ("dkdv", 90, "bfloat16", 128, 128, 128, 16, 8, 3, "alibi_all"),
    ("dkdv", 90, "bfloat16", 256, 256, 128, 16, 8, 2, "alibi_all"),
    ("fwd", 90, "bfloat16", 128, 128, 128, 64, 8, 3, "alibi_causal", True),
    ("dq", 80, "bfloat16", 128, 128, 128, 32, 8, 3, "alibi_causal"),
    ("dq", 90, "bfloat16", 128, 128, 128, 32, 8, 3, "varlen_alibi"),
    # split-KV decoding on the 64-query tiles short query blocks get
    ("fwd", 90, "bfloat16", 128, 128, 64, 32, 4, 3, "split"),
    ("fwd", 90, "float16", 128, 128, 64, 64, 4, 3, "varlen_split"),
    ("fwd", 90, "bfloat16", 128, 128, 64, 64, 4, 3, "varlen_paged"),
    ("fwd", 80, "bfloat16", 64, 64, 64, 32, 4, 4, "varlen_paged"),
]


@pytest.fixture(scope="module")
def subset_results():
    return _run(SUBSET)


def test_subset_cases_are_configs_the_autotuner_keeps():
    pytest.importorskip("torch")
    from fused_attn.triton import attention as A

    for kernel, arch, dtype, d, dv, outer, inner, warps, stages, features, *tma in SUBSET:
        import torch

        tma = bool(tma and tma[0])
        elem = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
        outer_name, inner_name = A.OUTER_INNER[kernel]
        cfg = next(c for c in A.all_configs(kernel) if (c.kwargs[outer_name], c.kwargs[inner_name], c.num_warps,
                                                         c.num_stages, c.kwargs["STREAM_TMA"]) ==
                   (outer, inner, warps, stages, tma))
        f = FEATURES[features]
        mask_bytes = {None: 0, "bool": 1, "additive": 2}[f["mask"]]
        heavy = _heavy(f)
        assert A.config_ok(kernel, cfg, A._pow2(d), A._pow2(dv), elem, arch, mask_bytes, heavy,
                           "only" if tma else "off", f["causal"], f.get("alibi", False))


@pytest.mark.parametrize("index", range(len(SUBSET)), ids=lambda i: "-".join(map(str, SUBSET[i])))
def test_aot_subset(subset_results, index):
    from fused_attn.triton import attention as A

    r = subset_results[index]
    assert not r["problems"], f"{_describe(r)}: {r['problems']}"
    if r["arch"] == 90 and r["dtype"] in ("float16", "bfloat16"):
        assert r["hgmma"] > 0
    assert (r["tma_loads"] > 0) == r["tma"]
    assert r["constexprs"]["HAS_ALIBI"] == bool(FEATURES[r["features"]].get("alibi"))  # the ALiBi path compiled
    assert 0 < r["registers"] <= 255
    # the autotuner's shared-memory estimate (used to prune configs) covers what the compiler allocates
    mask_bytes = {None: 0, "bool": 1, "additive": 2}[FEATURES[r["features"]]["mask"]]
    predicted = A.shared_bytes(r["kernel"], r["outer"], r["inner"], r["num_stages"], r["head_dim"],
                               r["head_dim_v"], 2, mask_bytes)
    assert 0 < r["shared"] <= predicted + 1024, (r["shared"], predicted)


def test_config_filter_is_conservative():
    """config_ok keeps at least one config for every half-precision dtype, head dim up to 256,
    kernel and arch, and none whose estimated shared memory exceeds the chip's. (float32 at large
    head dims may keep none: the autotuner's prune then falls back to the smallest tiles.)"""
    import torch

    from fused_attn.triton import attention as A

    for kernel in KERNELS:
        for arch in (80, 90):
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                elem = torch.empty(0, dtype=dtype).element_size()
                for hd in (16, 32, 64, 128, 256):
                    kept = [c for c in A.all_configs(kernel) if A.config_ok(kernel, c, hd, hd, elem, arch)]
                    assert kept or dtype == torch.float32, (kernel, arch, dtype, hd)
                    outer_name, inner_name = A.OUTER_INNER[kernel]
                    for c in kept:
                        need = A.shared_bytes(kernel, c.kwargs[outer_name], c.kwargs[inner_name], c.num_stages,
                                              hd, hd, elem)
                        assert need <= A.SHARED_BYTES[arch], (kernel, arch, dtype, hd, c)


# ---------------------------------------------------------------------------------------------
# the exhaustive sweep, by hand
# ---------------------------------------------------------------------------------------------

def sweep_cases(archs=(90, 80), dtypes=("bfloat16",), head_dims=(64, 128, 256), features=("causal",),
                kernels=KERNELS, tma=False):
    cases = []
    for arch in archs:
        for dtype in dtypes:
            for hd in head_dims:
                for kernel in kernels:
                    for feat in features:
                        for outer, inner, warps, stages in candidate_configs(kernel, arch, dtype, hd, hd, feat, tma):
                            cases.append((kernel, arch, dtype, hd, hd, outer, inner, warps, stages, feat, tma))
    return cases


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append")
    parser.add_argument("--dtype", action="append")
    parser.add_argument("--head-dim", type=int, action="append")
    parser.add_argument("--features", action="append")
    parser.add_argument("--kernel", action="append", choices=KERNELS)
    parser.add_argument("--out", default="aot_sweep.json")
    parser.add_argument("--tma", action="store_true", help="the TMA-streamed configurations (sm_90)")
    parser.add_argument("--list", action="store_true", help="only list the cases")
    a = parser.parse_args()
    sys.path.insert(0, os.path.dirname(HERE))
    cases = sweep_cases(tuple(a.arch or (90, 80)), tuple(a.dtype or ("bfloat16",)),
                        tuple(a.head_dim or (64, 128, 256)), tuple(a.features or ("causal",)),
                        tuple(a.kernel or KERNELS), a.tma)
    print(f"{len(cases)} cases", file=sys.stderr)
    if a.list:
        for c in cases:
            print(c)
        sys.exit(0)
    os.environ.pop("TRITON_INTERPRET", None)
    results = []
    for i, case in enumerate(cases):
        r = compile_many([case])[0]
        results.append(r)
        status = "ok" if not r["problems"] else "; ".join(r["problems"])
        print(f"[{i + 1}/{len(cases)}] {_describe(r)} shared={r.get('shared')} regs={r.get('registers')} "
              f"hgmma={r.get('hgmma')}: {status}", flush=True)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


def test_heavy_features_keep_a_config():
    """Skipping HEAVY_SPILLS (and with ALiBi ALIBI_SPILLS, banded or with any feature PLAIN_ONLY)
    never leaves a (kernel, head dim) without pointer configurations, nor without TMA ones on sm_90
    for the feature sets without ALiBi."""
    from fused_attn.triton import attention as A

    for arch in (90, 80):
        for kernel in KERNELS:
            for hd in (64, 128, 256):
                for heavy, alibi, banded in ((True, False, False), (False, True, False), (True, True, False),
                                             (False, False, True), (True, False, True), (True, True, True)):
                    for tma in (("off", "only") if arch >= 90 and not alibi else ("off",)):
                        kept = [c for c in A.all_configs(kernel)
                                if A.config_ok(kernel, c, hd, hd, 2, arch, 2, heavy=heavy, alibi=alibi, tma=tma,
                                               banded=banded)]
                        assert kept, (arch, kernel, hd, heavy, alibi, banded, tma)


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)])
def test_autotune_prune_on_gpu_arguments(monkeypatch, capability):
    """The autotuner's early prune (it only runs on a GPU) picks from the per-arch lists, honours
    short sequences and heavy features, and never returns nothing."""
    import torch

    from fused_attn.triton import attention as A

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    arch = capability[0] * 10 + capability[1]
    q = torch.empty(1, dtype=torch.bfloat16)
    for kernel in KERNELS:
        prune = A._make_prune(kernel)
        outer_name, inner_name = A.OUTER_INNER[kernel]
        for hd in (64, 128, 256):
            for heavy, causal, alibi in ((False, False, False), (False, True, False), (True, False, False),
                                         (False, False, True), (True, True, True)):
                for length in (1, 4096):
                    args = dict(Q=q, Mask=q, HEAD_DIM=hd, HEAD_DIM_V=hd, MASK_KIND=2 if heavy else 0,
                                DROPOUT=heavy, MASK_GRAD=heavy, LQ_KEY=length, LK_KEY=length, BANDED=causal,
                                HAS_ALIBI=alibi)
                    kept = prune(A.all_configs(kernel), args)
                    assert kept, (kernel, hd, heavy, length)
                    table = A.CONFIGS if arch >= 90 else A.CONFIGS_SM80
                    skipped = (A.heavy_spills(arch) if heavy else set()) | (
                        A.alibi_spills(arch, heavy=heavy) if alibi else set())
                    has_small = any(cfg[0] <= 64 for cfg in table[kernel][hd] if (kernel, hd, cfg) not in skipped)
                    for c in kept:
                        key = (c.kwargs[outer_name], c.kwargs[inner_name], c.num_warps, c.num_stages)
                        assert key in table[kernel][hd]
                        assert (kernel, hd, key) not in skipped
                        if heavy or causal or alibi:
                            assert (kernel, hd, key) not in A.plain_only(arch)
                        if length == 1 and has_small:  # one-row sequences: blocks of <= 64 rows when listed (and kept)
                            assert key[0] <= 64


@pytest.mark.parametrize("mode", ["auto", "on"])
@pytest.mark.parametrize("capability", [(9, 0), (8, 0)])
def test_autotune_prune_with_descriptors(monkeypatch, capability, mode):
    """With TMA descriptors among the arguments (TMA_KEY 1, or 2 under FUSED_ATTN_TRITON_TMA=on) the
    prune keeps, on sm_90, the TMA configurations beside the pointer ones or only them; on sm_80
    only pointer configurations."""
    import torch

    from fused_attn.triton import attention as A

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setenv("FUSED_ATTN_TRITON_TMA", mode)
    t = torch.empty(1, 2, 64, 64, dtype=torch.bfloat16)
    desc_a, desc_b, tma_key = A.descriptors(t, t, tma=True)
    assert isinstance(desc_a, A._DESCRIPTOR_TYPES) and tma_key == {"auto": 1, "on": 2}[mode]
    assert A.descriptors(t, t, tma=False) == (t, t, 0)
    for kernel in KERNELS:
        first, second = A.STREAM_DESCRIPTORS[kernel]
        for hd in (64, 128, 256):
            args = {"Q": t, "Mask": t, first: desc_a, second: desc_b, "HEAD_DIM": hd, "HEAD_DIM_V": hd,
                    "MASK_KIND": 0, "DROPOUT": False, "MASK_GRAD": False, "LQ_KEY": 4096, "LK_KEY": 4096,
                    "TMA_KEY": tma_key}
            kinds = {c.kwargs["STREAM_TMA"] for c in A._make_prune(kernel)(A.all_configs(kernel), args)}
            if capability[0] < 9:
                assert kinds == {False}
            elif A.TMA_CONFIGS[kernel][hd]:
                assert kinds == ({True, False} if mode == "auto" else {True}), (kernel, hd)


def test_autotune_off_keeps_the_first_config(monkeypatch):
    """FUSED_ATTN_TRITON_AUTOTUNE=0 (the GPU check's correctness runs): each prune hands the
    autotuner one configuration, the first it would have timed, so nothing is benchmarked."""
    import torch

    from fused_attn.triton import _tuning
    from fused_attn.triton import attention as A
    from fused_attn.triton import feed_forward as ff

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    q = torch.empty(1, dtype=torch.bfloat16)
    args = dict(Q=q, Mask=q, HEAD_DIM=64, HEAD_DIM_V=64, MASK_KIND=0, DROPOUT=False, MASK_GRAD=False, LQ_KEY=4096,
                LK_KEY=4096)
    ffn_args = ({"a_ptr": q, "TMA_KEY": 0}, dict(EPILOGUE=ff.EPI_BIAS, GATED=False))
    monkeypatch.setenv("FUSED_ATTN_TRITON_AUTOTUNE", "1")
    timed = A._make_prune("fwd")(A.all_configs("fwd"), args)
    timed_ffn = ff._prune(ff._ffn_gemm_tuned.configs, ffn_args[0], **ffn_args[1])
    assert len(timed) > 1 and len(timed_ffn) > 1
    monkeypatch.setenv("FUSED_ATTN_TRITON_AUTOTUNE", "0")
    key = lambda cs: [(c.kwargs, c.num_warps, c.num_stages) for c in cs]  # noqa: E731
    assert key(A._make_prune("fwd")(A.all_configs("fwd"), args)) == key(timed[:1])
    assert ff._prune(ff._ffn_gemm_tuned.configs, ffn_args[0], **ffn_args[1]) == timed_ffn[:1]
    monkeypatch.setenv("FUSED_ATTN_TRITON_AUTOTUNE", "sometimes")
    with pytest.raises(ValueError, match="FUSED_ATTN_TRITON_AUTOTUNE='sometimes' is not a yes/no value"):
        _tuning.autotune_enabled()


@pytest.mark.parametrize("value, expected", [(None, True), ("", True), ("1", True), ("true", True), ("Yes", True),
                                             ("on", True), ("0", False), ("FALSE", False), ("no", False),
                                             ("off", False)])
def test_autotune_switch_takes_the_extension_switches_words(monkeypatch, value, expected):
    """FUSED_ATTN_TRITON_AUTOTUNE reads 1/true/yes/on and 0/false/no/off like every other switch
    (it refused yes/no, which the build and extension switches take); unset or empty is on."""
    from fused_attn.triton import _tuning

    if value is None:
        monkeypatch.delenv("FUSED_ATTN_TRITON_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("FUSED_ATTN_TRITON_AUTOTUNE", value)
    assert _tuning.autotune_enabled() is expected


def test_loop_spills_are_told_from_spills_around_loops():
    """``loop_spill_count`` counts LDL/STL between a backward branch and its target (nested loops
    too) and not those before or after: a register saved before the main loop and restored after
    it is allowed, a spill in the loop is a problem (``AotResult.problems``)."""
    from fused_attn.triton._aot import AotResult, loop_spill_count

    def sass(*lines):
        return "\n".join(f"        /*{addr:04x}*/                   {text} ;   /* 0x0000 */" for addr, text in lines)

    around = sass((0x10, "STL [R1], R192"), (0x20, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24"),
                  (0x30, "@P0 BRA 0x20"), (0x40, "LDL.LU R2, [R1]"), (0x50, "BRA 0x50"))
    assert loop_spill_count(around) == 0
    inside = sass((0x10, "MOV R1, R2"), (0x20, "STL [R1+0x4], R3"), (0x30, "LDL R3, [R1+0x4]"),
                  (0x40, "@!P2 BRA 0x30"), (0x50, "@P1 BRA 0x10"), (0x60, "STL [R1], R4"),
                  (0x70, "@P3 BRA 0x80"))  # a forward branch is no loop
    assert loop_spill_count(inside) == 2
    base = dict(kernel="k", arch=90, num_warps=8, num_stages=2, shared=1024, registers=255, hgmma=4, tma_loads=0,
                vector_loads=0, constexprs={})
    assert AotResult(spills=14, loop_spills=0, **base).problems(require_hgmma=True, spills_around_loops_ok=True) == []
    assert AotResult(spills=14, loop_spills=0, **base).problems() == [
        "14 local-memory spill instructions (LDL/STL)"]  # GEMM epilogues, norms: every spill counts
    assert "2 local-memory spill instructions (LDL/STL) inside loops (3 in all)" in \
        AotResult(spills=3, loop_spills=2, **base).problems(spills_around_loops_ok=True)


DELTA_SCRIPT = r"""
import json
import os
os.environ.pop("TRITON_INTERPRET", None)
from fused_attn.triton import attention as A
from fused_attn.triton._aot import aot_compile

STRIDES = ("stride_ob", "stride_oh", "stride_om", "stride_gb", "stride_gh", "stride_gm", "stride_lb", "stride_lh",
           "stride_lm", "Hq", "Lq")
results = []
for head_dim_v, dtype, has_dlse in ((40, "fp16", True), (64, "bf16", False), (128, "bf16", True),
                                    (128, "fp16", False), (256, "fp32", True), (256, "bf16", False)):
    sig = dict(Out="*" + dtype, dOut="*" + dtype, Delta="*fp32", dLse="*fp32", stride_od="i32", stride_gd="i32",
               **{name: "i32" for name in STRIDES})
    const = dict(DV=head_dim_v, HEAD_DIM_V=A._pow2(head_dim_v), BLOCK_M=A.delta_block_m(head_dim_v),
                 HAS_DLSE=has_dlse)
    r = aot_compile(A._attn_bwd_delta, sig, const, arch=90, num_warps=4, num_stages=3,
                    divisible_by_16=("Out", "dOut", "Delta", "dLse", "stride_om", "stride_gm"))
    results.append(dict(r.to_dict(), problems=r.problems()))
print(json.dumps(results))
"""


def test_delta_kernel_compiles_clean():
    """The backward's delta kernel (rowsum(dO * O) - dlse) for sm_90 at every head-dim size class,
    with and without the lse's gradient: no spill (its program is one pass, every spill counts) and
    few enough registers that its memory-bound programs keep the SM full (``delta_block_m`` sizes
    the rows so; 64 rows took up to 255 registers and spilled at Dv = 256)."""
    from fused_attn.triton._aot import run_isolated

    for r in run_isolated(DELTA_SCRIPT):
        assert not r["problems"], r
        assert r["registers"] <= 96, r


COMBINE_SCRIPT = r"""
import json
import os
os.environ.pop("TRITON_INTERPRET", None)
from fused_attn.triton import attention as A
from fused_attn.triton._aot import aot_compile

results = []
for head_dim_v, dtype in ((40, "fp16"), (64, "bf16"), (128, "bf16"), (256, "fp32")):
    sig = dict(OutPart="*fp32", LsePart="*fp32", Out="*" + dtype, Lse="*fp32", stride_od="i32",
               **{name: "i32" for name in ("num_splits", "stride_split_o", "stride_split_lse", "rows", "Hq", "Lq",
                                           "stride_ob", "stride_oh", "stride_om")})
    const = dict(DV=head_dim_v, HEAD_DIM_V=A._pow2(head_dim_v), BLOCK_M=A.delta_block_m(head_dim_v))
    r = aot_compile(A._attn_fwd_combine, sig, const, arch=90, num_warps=A.COMBINE_WARPS, num_stages=3,
                    divisible_by_16=("OutPart", "LsePart", "Out", "Lse", "stride_split_o", "stride_om"))
    results.append(dict(r.to_dict(), problems=r.problems()))
print(json.dumps(results))
"""


def test_split_kv_combine_compiles_clean():
    """The split-KV merge (``_attn_fwd_combine``) for sm_90 at every head-dim size class: no spill
    and, like the delta kernel it is sized as, few registers (a memory-bound pass over the partials)."""
    from fused_attn.triton._aot import run_isolated

    for r in run_isolated(COMBINE_SCRIPT):
        assert not r["problems"], r
        assert r["registers"] <= 64, r
