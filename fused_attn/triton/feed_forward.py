"""Triton kernels for the feed-forward block: GEMMs with fused bias / activation / dropout epilogues.

One kernel family, ``_ffn_gemm``, computes a tile ``C[m, n] = sum_k A[m, k] * B[k, n]`` in float32
(any strides for A and B, so weight matrices are read "transposed" without copies) and then runs
one of three epilogues chosen by the constexpr ``EPILOGUE``:

* ``EPI_BIAS`` (forward, second linear):  ``out = h @ w2^T + b2``.
* ``EPI_ACT_FWD`` (forward, first linear): ``pre = x @ w1^T + b1`` is stored (the op contract
  saves it for backward) and, still in registers, ``h = dropout(act(pre))`` is stored for the
  second GEMM. For the gated activations (swiglu = silu(gate) * up, geglu = gelu(gate) * up)
  w1 stacks ``[gate; up]`` rows, and the kernel keeps *two* accumulators over the same x tile --
  one for the gate columns ``n`` and one for the up columns ``d_ff + n`` -- so ``act(gate) * up``
  is formed in registers and the halves never round-trip through memory.
* ``EPI_ACT_BWD`` (backward, ``dh = dout @ w2``): the epilogue loads the saved ``pre`` tile and
  turns dh into ``dpre = dh * keep / (1 - p) * act'(pre)`` directly (for gated: ``d gate = dh' *
  up * act'(gate)`` and ``d up = dh' * act(gate)``), so the activation derivative is never a
  separate pass. The same epilogue already holds ``act(pre)``, so it also writes the recomputed
  ``h = dropout(act(pre))`` that ``dw2 = dout^T @ h`` needs (see ``feed_forward_bwd`` for why
  here rather than in an elementwise kernel or a GEMM prologue), and per-row-block float32
  column sums of dpre for ``db1`` (deterministic: no atomics; a tiny torch sum finishes them).

The remaining backward products (``dw2 = dout^T h``, ``dw1 = dpre^T x``, ``dx = dpre w1``) have
no epilogue to fuse, so they go to torch.matmul (cuBLAS on GPU).

All epilogue math is float32; ``pre`` is rounded to the storage dtype *before* the activation is
applied, so forward and backward compute the activation from the same (stored) values, as the
unfused reference does. Tiles are visited in GROUP_M-grouped order so consecutive programs share
A row-blocks and B column-blocks in L2. float32 inputs use ``input_precision="ieee"`` so TF32
never degrades them.

Hopper (sm_90+): each configuration has a TMA twin (``AB_TMA``) that loads the A and B tiles
through host-side tensor descriptors (``gemm_descriptors``; a weight read transposed is described
as the (N, K) matrix it is, ``B_NK``, and its tile transposed in shared memory), zero-filled by the
copy engine at the edges; the autotuner times both (``fused_attn.triton._tma``).

Dropout is the shared counter hash of ``fused_attn._rng``: element ``(t, c)`` of the (T, d_ff)
activation has ``row = t``, ``col = c``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..backends.triton import interpreter_enabled
from . import _checks
from ..ops_common import empty
from ._rng import dropout_args, dropout_keep, dropout_row_key
from ._tma import DESCRIPTOR_TYPES, descriptors, tma_wanted
from ._host import cdiv
from ._tuning import LAUNCH_OPTIONS, pick

# constexpr codes ------------------------------------------------------------------------------
ACT_RELU, ACT_GELU, ACT_GELU_TANH, ACT_SILU = 0, 1, 2, 3
EPI_BIAS, EPI_ACT_FWD, EPI_ACT_BWD = 0, 1, 2

#: activation name -> (elementwise activation code, gated)
ACTIVATION_CODES = {
    "relu": (ACT_RELU, False),
    "gelu": (ACT_GELU, False),
    "gelu_tanh": (ACT_GELU_TANH, False),
    "silu": (ACT_SILU, False),
    "swiglu": (ACT_SILU, True),
    "geglu": (ACT_GELU, True),
}


def _interpreting() -> bool:
    return interpreter_enabled()


# ---------------------------------------------------------------------------------------------
# elementwise helpers (float32 in, float32 out)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _dropout_factor(rows, cols, seed_lo, seed_hi_mix, offset, threshold, drop_scale):
    """1/(1-p) where element (row, col) of the (T, d_ff) activation is kept, else 0 (fused_attn._rng)."""
    row_key = dropout_row_key(seed_lo, seed_hi_mix, rows.to(tl.int64) + offset)
    keep = dropout_keep(row_key[:, None], cols[None, :], threshold)
    return tl.where(keep, drop_scale, 0.0)


@triton.jit
def _sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _activation(z, ACT: tl.constexpr, WITH_GRAD: tl.constexpr):
    """act(z) and, when WITH_GRAD, act'(z) (else the second value is a dummy 0-like tensor).

    gelu (exact):  0.5 z (1 + erf(z / sqrt 2));        act' = Phi(z) + z phi(z)
    gelu_tanh:     0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3)
                   act' = 0.5 (1 + tanh u) + 0.5 z (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 z^2)
                   tanh u = 2 sigmoid(2u) - 1 (exact at both tails; no tanh in core tl)
    silu:          z sigmoid(z);                        act' = s (1 + z (1 - s))
    relu:          max(z, 0);                           act' = [not z <= 0] (torch's: 0 at 0, 1 at NaN)
    """
    if ACT == 0:
        a = tl.where(z < 0.0, 0.0, z)  # not tl.maximum: NaN must propagate, as torch.relu does
        da = tl.where(z <= 0.0, 0.0, 1.0)  # torch's rule: a NaN z passes the gradient, as relu(z) <= 0 is false
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        a = z * cdf
        da = cdf + z * (0.3989422804014327 * tl.exp(-0.5 * z * z))
    elif ACT == 2:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * _sigmoid(2.0 * u) - 1.0
        a = 0.5 * z * (1.0 + t)
        da = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        s = _sigmoid(z)
        a = z * s
        da = s * (1.0 + z * (1.0 - s))
    if not WITH_GRAD:
        da = a  # unused; keeps one return signature
    return a, da


# ---------------------------------------------------------------------------------------------
# the GEMM kernel family
# ---------------------------------------------------------------------------------------------

@triton.jit
def _ffn_gemm(
    a_ptr, b_ptr, a_desc, b_desc, bias_ptr, pre_ptr, out_ptr, h_ptr, colsum_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, up_offset_b,
    stride_pre_m, stride_out_m, stride_h_m, stride_colsum_m, up_col, col0,
    seed_lo, seed_hi_mix, offset, threshold, drop_scale,
    TMA_KEY,  # autotuning key only (fused_attn.triton._tma.descriptors)
    EPILOGUE: tl.constexpr, ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, B_NK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    AB_TMA: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of C = A @ B plus the epilogue selected by EPILOGUE.

    Pointer roles per epilogue (unused ones are dummies):
      EPI_BIAS:    out = C + bias                                         (M, N)
      EPI_ACT_FWD: out = pre = C + bias  (gated: [gate | up]);   h = dropout(act(pre))  (M, N)
      EPI_ACT_BWD: C = dh; pre_ptr = saved pre; out = dpre (gated: [d gate | d up]); h = recomputed
                   dropout(act(pre)); colsum[pid_m, :] = column sums of dpre (float32) when HAS_BIAS
    For GATED, a second accumulator reads the B columns ``up_offset_b`` elements further on, and
    the up half of bias / pre / colsum lies ``up_col`` columns after the gate half, and that of
    out (pre, or a chunk of dpre: the backward writes dpre chunk-wise) N columns after it.
    AB_TMA (sm_90+): the A and B tiles come through the TMA descriptors ``a_desc`` (A as (M, K))
    and ``b_desc`` (B_NK: B stored as its (N, K) transpose, a weight read as is, whose up rows
    then start ``up_col`` rows down; else as (K, N)); the copy engine zero-fills past the edges.
    The pointers may address a column block of wider matrices (the backward runs d_ff in chunks):
    ``col0`` is the block's first column in the (T, d_ff) activation, for the dropout hash.
    """
    # -- grouped tile order: GROUP_M row-blocks sweep the column-blocks together (L2 reuse) --
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/cols wrap onto valid ones for the loads (no masks in the hot loop
    # except along K); their results are masked at the store.
    rows_a = (offs_m % M).to(tl.int64)
    cols_b = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + rows_a[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + cols_b[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED and EPILOGUE == 1:
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if AB_TMA:
            a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
            if B_NK:
                b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K]).T
            else:
                b = b_desc.load([k * BLOCK_K, pid_n * BLOCK_N])
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATED and EPILOGUE == 1:
            if AB_TMA:
                b_up = b_desc.load([up_col + pid_n * BLOCK_N, k * BLOCK_K]).T
            else:
                b_up = tl.load(b_ptrs + up_offset_b, mask=offs_k[:, None] < k_left, other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    # -- epilogue ---------------------------------------------------------------------------
    # The backward one sits at the edge of the register file (up to five live tiles beside the
    # accumulator), so pointers are formed at their use from a per-tile base pointer (int64
    # scalar) plus int32 in-tile offsets, and each result is stored as soon as it exists.
    m_in = offs_m < M
    n_in = offs_n < N
    tile_mask = m_in[:, None] & n_in[None, :]
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    local_m = tl.arange(0, BLOCK_M)[:, None]
    out_base = out_ptr + row0 * stride_out_m
    h_base = h_ptr + row0 * stride_h_m

    if EPILOGUE == 0:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
        tl.store(out_base + local_m * stride_out_m + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=tile_mask)

    elif EPILOGUE == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
        pre_gate = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_base + local_m * stride_out_m + offs_n[None, :], pre_gate, mask=tile_mask)
        # activation of the *stored* (rounded) pre, exactly what backward recomputes from
        h, _unused = _activation(pre_gate.to(tl.float32), ACT, False)
        if GATED:
            if HAS_BIAS:
                acc_up += tl.load(bias_ptr + up_col + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
            pre_up = acc_up.to(out_ptr.dtype.element_ty)
            tl.store(out_base + local_m * stride_out_m + (N + offs_n)[None, :], pre_up, mask=tile_mask)
            h = h * pre_up.to(tl.float32)
        if DROPOUT:
            h *= _dropout_factor(offs_m, col0 + offs_n, seed_lo, seed_hi_mix, offset, threshold, drop_scale)
        tl.store(h_base + local_m * stride_h_m + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=tile_mask)

    else:
        pre_base = pre_ptr + row0 * stride_pre_m
        gate = tl.load(pre_base + local_m * stride_pre_m + offs_n[None, :], mask=tile_mask, other=0.0)
        a_gate, da_gate = _activation(gate.to(tl.float32), ACT, True)
        dh = acc
        if DROPOUT:
            factor = _dropout_factor(offs_m, col0 + offs_n, seed_lo, seed_hi_mix, offset, threshold, drop_scale)
            dh = dh * factor
            a_drop = a_gate * factor  # h before the up factor, dropout applied
        else:
            a_drop = a_gate
        if GATED:
            d_up = dh * a_gate
            tl.store(out_base + local_m * stride_out_m + (N + offs_n)[None, :], d_up.to(out_ptr.dtype.element_ty),
                     mask=tile_mask)
            if HAS_BIAS:
                tl.store(colsum_ptr + pid_m * stride_colsum_m + up_col + offs_n,
                         tl.sum(tl.where(tile_mask, d_up, 0.0), axis=0), mask=n_in)
            up = tl.load(pre_base + local_m * stride_pre_m + (up_col + offs_n)[None, :], mask=tile_mask,
                         other=0.0).to(tl.float32)
            h = a_drop * up
            d_gate = dh * up * da_gate
        else:
            h = a_drop
            d_gate = dh * da_gate
        tl.store(h_base + local_m * stride_h_m + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=tile_mask)
        tl.store(out_base + local_m * stride_out_m + offs_n[None, :], d_gate.to(out_ptr.dtype.element_ty),
                 mask=tile_mask)
        if HAS_BIAS:
            tl.store(colsum_ptr + pid_m * stride_colsum_m + offs_n,
                     tl.sum(tl.where(tile_mask, d_gate, 0.0), axis=0), mask=n_in)


# ---------------------------------------------------------------------------------------------
# tile configurations
# ---------------------------------------------------------------------------------------------

def _descriptor_blocks(nargs):
    """Configuration pre-hook: size the TMA descriptors' boxes to the config's tiles."""
    if isinstance(nargs["a_desc"], DESCRIPTOR_TYPES):
        nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    if isinstance(nargs["b_desc"], DESCRIPTOR_TYPES):
        bk, bn = nargs["BLOCK_K"], nargs["BLOCK_N"]
        nargs["b_desc"].block_shape = [bn, bk] if nargs["B_NK"] else [bk, bn]


def _config(bm, bn, bk, stages, warps, group_m=8, tma=False):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group_m, "AB_TMA": tma},
                         num_stages=stages, num_warps=warps, pre_hook=_descriptor_blocks if tma else None)


#: Hopper (sm_90, 227 KiB shared memory per block): large tiles feed wgmma; BLOCK_K 64 for 16-bit.
HOPPER_CONFIGS = [
    _config(128, 256, 64, 3, 8),  # bias-only epilogue (the second forward GEMM)
    _config(128, 128, 64, 4, 8),
    _config(128, 64, 64, 4, 8),   # gated forward: two 128x64 accumulators
    _config(64, 128, 64, 4, 4),
    _config(128, 128, 32, 3, 8),  # float32 (4-byte) inputs
    _config(128, 64, 32, 3, 8),
    _config(64, 64, 64, 4, 8),    # gated backward on Triton < 3.9 (see BWD_CONFIG)
    _config(64, 64, 32, 4, 4),    # small problems
    # 96 KB of pipeline and ~112 registers a thread: two CTAs per SM, so one tile's pipeline fill
    # and epilogue (pre and h stores) overlap the other's main loop; the 4-stage 128x128 config
    # (128 KB) leaves one CTA per SM, each tile paying ~2k cycles of fill and its epilogue alone
    _config(128, 128, 64, 3, 8),
]
#: Ampere (sm_80, 163 KiB shared memory per block): mma.sync tiles, BLOCK_K 32.
AMPERE_CONFIGS = [
    _config(128, 256, 32, 3, 8),  # bias-only epilogue
    _config(128, 128, 32, 4, 4),  # bias-only epilogue
    _config(128, 128, 32, 3, 8),
    _config(128, 64, 32, 4, 8),   # gated forward
    _config(64, 128, 32, 4, 4),
    _config(64, 64, 32, 4, 8),    # gated backward on Triton < 3.9 (see BWD_CONFIG)
    _config(64, 64, 32, 4, 4),
]
#: The Hopper list again with the A and B tiles through TMA descriptors (``AB_TMA``), same order
#: (BWD_CONFIG indexes both). The AOT test compiles every one of them for sm_90 (HGMMA, UTMALDG,
#: no spills) under Triton 3.6 and 3.9; the autotuner times them beside the pointer configs.
HOPPER_TMA_CONFIGS = [_config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
                              c.num_warps, c.kwargs["GROUP_M"], tma=True) for c in HOPPER_CONFIGS]
#: The interpreter (CPU) runs one small config: it is slow per element, not per tile.
INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
_MIN_BLOCK_M = 64  # smallest BLOCK_M of any config: sizes the db1 partial-sum buffer
#: float32 accumulator registers per thread each epilogue can afford out of 255 without spilling
#: (measured by AOT compilation, tests/test_triton_feed_forward_aot.py). float32 inputs (FMA
#: dots, operands in registers) keep BLOCK_K at 32.
ACC_REGISTER_BUDGET = {EPI_BIAS: 128, EPI_ACT_FWD: 64}
#: The backward epilogue holds dh, the pre (and up) tiles, act, act' and the dropout factor at
#: once and sits at the edge of the register file, so it is not autotuned: each entry is the
#: largest config that compiled without a single spill (tests/test_triton_feed_forward_aot.py,
#: gated gelu with dropout and bias sums, the heaviest variant), as
#: (major, element bytes, gated) -> index in the arch's list.
#: Triton >= 3.9: 128x64 tiles on 8 warps (64x64 on 4 warps and 128x64x32 on sm_90 spilled a few).
#: Triton 3.6 (the GPU machine's) allocates more registers to the same epilogue. Gated: 128x64
#: spills 118 LDL/STL on sm_90 (6 for swiglu without dropout) and 18 on sm_80 (2 with float32
#: inputs on sm_80), so the gated backward keeps 64x64 tiles on 8 warps (16 accumulator registers
#: per thread), clean, with wgmma on sm_90. Not gated (relu, gelu, gelu_tanh, silu; with or without
#: dropout): 128x64 compiles clean under 3.6 too (94-170 registers on sm_90, 109-171 on sm_80),
#: and takes it: the 64x64 tiles were what left the H200's backward GEMM at ~0.3x cuBLAS.
#: Versions between were not measured and get the 3.6 choice.
BWD_CONFIG_NEW = {(90, 2, False): 2, (90, 2, True): 2, (90, 4, False): 7, (90, 4, True): 7,
                  (80, 2, False): 3, (80, 2, True): 3, (80, 4, False): 3, (80, 4, True): 3}
BWD_CONFIG_OLD = {(90, 2, False): 2, (90, 2, True): 6, (90, 4, False): 7, (90, 4, True): 7,
                  (80, 2, False): 3, (80, 2, True): 5, (80, 4, False): 6, (80, 4, True): 6}


def _triton_version(version: str = triton.__version__) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


BWD_CONFIG = BWD_CONFIG_NEW if _triton_version() >= (3, 9) else BWD_CONFIG_OLD


def shared_memory_estimate(config: triton.Config, elem_bytes: int, gated: bool) -> int:
    """Bytes of the multi-stage A/B pipeline buffers (what decides whether a config fits)."""
    kw = config.kwargs
    b_tiles = 2 if gated else 1
    return config.num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + b_tiles * kw["BLOCK_K"] * kw["BLOCK_N"]) * elem_bytes


def accumulator_registers(config: triton.Config, gated: bool) -> int:
    """float32 accumulator registers per thread (two accumulators for the gated forward)."""
    kw = config.kwargs
    return (2 if gated else 1) * kw["BLOCK_M"] * kw["BLOCK_N"] // (32 * config.num_warps)


def configs_for(capability_major: int, elem_bytes: int, epilogue: int, gated: bool, tma_key: int = 0
                ) -> list[triton.Config]:
    """The configs worth timing on this architecture for this dtype and epilogue: they fit
    shared memory and the epilogue's accumulator register budget. ``tma_key`` (sm_90+; see
    ``_tma.descriptors``): 0 pointer configs, 1 those and their TMA twins, 2 the TMA twins only."""
    major = 90 if capability_major >= 9 else 80
    candidates = HOPPER_CONFIGS if major == 90 else AMPERE_CONFIGS
    if epilogue == EPI_ACT_BWD:
        index = BWD_CONFIG[(major, 4 if elem_bytes == 4 else 2, bool(gated))]
        picked = [index]
    else:
        two_b = gated and epilogue == EPI_ACT_FWD  # the gated forward loads two B tiles
        picked = [i for i, c in enumerate(candidates)
                  if shared_memory_estimate(c, elem_bytes, two_b) <= SMEM_LIMIT[major]
                  and accumulator_registers(c, two_b) <= ACC_REGISTER_BUDGET[epilogue]
                  and not (elem_bytes == 4 and c.kwargs["BLOCK_K"] > 32)] or [len(candidates) - 1]
    if major < 90 or not tma_key:
        return [candidates[i] for i in picked]
    twins = [HOPPER_TMA_CONFIGS[i] for i in picked]
    return twins if tma_key == 2 else [candidates[i] for i in picked] + twins


def _prune(configs, named_args, **kwargs):
    a = named_args["a_ptr"]
    major = torch.cuda.get_device_capability(a.device)[0]
    elem_bytes = a.element_size()
    keep = {id(c) for c in configs_for(major, elem_bytes, kwargs["EPILOGUE"], bool(kwargs["GATED"]),
                                       named_args.get("TMA_KEY", 0))}
    return pick([c for c in configs if id(c) in keep])


_ffn_gemm_tuned = triton.autotune(
    configs=HOPPER_CONFIGS + AMPERE_CONFIGS + HOPPER_TMA_CONFIGS,
    key=["M", "N", "K", "TMA_KEY", "EPILOGUE", "ACT", "GATED", "HAS_BIAS", "DROPOUT", "B_NK"],
    prune_configs_by={"early_config_prune": _prune},
    # No reset_to_zero: every launch *stores* each colsum entry it owns (never accumulates), so the
    # autotuner's timing runs are idempotent. Resetting would also be wrong: the backward passes
    # colsum[:, c0:] for chunk c, a view that reaches into the up-half columns of the chunks before
    # it, so a new autotuning key at a later chunk (a narrower last chunk) zeroed their db1 sums
    # (seen on the H200: gated db1 off by 50-4800x while every interpreter test passed).
)(_ffn_gemm)


# ---------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------

#: ``_dropout_args`` without dropout (``_launch`` uses it without the call)
_NO_DROPOUT = (0, 0, 0, 0, 1.0)


def _dropout_args(dropout_p: float, seed: int, offset: int):
    """(seed_lo, mix32(seed_hi), offset, threshold, 1/(1-p)) as kernel scalars."""
    if dropout_p <= 0.0:
        return _NO_DROPOUT
    seed_lo, seed_hi_mix, threshold = dropout_args(dropout_p, seed)
    return seed_lo, seed_hi_mix, int(offset), threshold, 1.0 / (1.0 - dropout_p)


def gemm_descriptors(a, b_km, tma=None):
    """(a_desc, b_desc, B_NK, TMA_KEY) for ``_ffn_gemm``: TMA descriptors of A as (M, K) and of B
    as stored (a weight read transposed is described as its (N, K) self: B_NK), when TMA is wanted
    and both can have one (``_tma.descriptors``); else (a, b_km, False, 0)."""
    if tma is None:
        tma = tma_wanted(a)
    if not tma:  # the default: skip the transposed view below (a dispatcher call), unused then
        return a, b_km, False, 0
    b_nk = b_km.stride(0) == 1 and b_km.stride(1) != 1
    a_desc, b_desc, tma_key = descriptors(a, b_km.t() if b_nk else b_km, tma=tma)
    return (a_desc, b_desc, b_nk, tma_key) if tma_key else (a, b_km, False, 0)


def _launch(a, b_km, M, N, K, *, epilogue, act=ACT_RELU, gated=False, bias=None, pre=None, out, h=None,
            colsum=None, up_offset_b=0, up_col=0, col0=0, dropout=(0.0, 0, 0)):
    """Launch one ``_ffn_gemm``: ``a`` is (M, K); ``b_km`` is a (K, N) view (any strides)."""
    if M == 0 or N == 0:
        return
    dropout_p, seed, offset = dropout
    seed_lo, seed_hi, off, threshold, scale = _NO_DROPOUT if dropout_p <= 0.0 else _dropout_args(dropout_p, seed,
                                                                                                 offset)
    dummy = out
    colsum_t = colsum if colsum is not None else _no_colsum(out.device)
    a_desc, b_desc, b_nk, tma_key = gemm_descriptors(a, b_km)
    # (strides read as stride() tuples: stride(i) parses its argument, ~0.07 us more each, on every launch)
    a_strides, b_strides = a.stride(), b_km.stride()
    args = (a, b_km, a_desc, b_desc, bias if bias is not None else dummy, pre if pre is not None else dummy, out,
            h if h is not None else dummy, colsum_t,
            M, N, K,
            a_strides[0], a_strides[1], b_strides[0], b_strides[1], up_offset_b,
            pre.stride()[0] if pre is not None else 0, out.stride()[0], h.stride()[0] if h is not None else 0,
            colsum.stride()[0] if colsum is not None else 0, up_col, col0,
            seed_lo, seed_hi, off, threshold, scale, tma_key)
    flags = dict(EPILOGUE=epilogue, ACT=act, GATED=gated, HAS_BIAS=bias is not None or colsum is not None,
                 DROPOUT=dropout_p > 0.0, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", B_NK=b_nk)
    if _interpreting():
        cfg = dict(INTERPRETER_CONFIG, AB_TMA=bool(tma_key))
        _descriptor_blocks(dict(zip(_ffn_gemm.arg_names, args), **flags, **cfg))
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
        _ffn_gemm[grid](*args, **flags, **cfg, num_warps=4, num_stages=1, **LAUNCH_OPTIONS)
    else:
        grid = lambda meta: (cdiv(M, meta["BLOCK_M"]) * cdiv(N, meta["BLOCK_N"]),)
        _ffn_gemm_tuned[grid](*args, **flags, **LAUNCH_OPTIONS)


@functools.lru_cache(maxsize=None)
def _no_colsum(device: torch.device) -> torch.Tensor:
    """The float32 placeholder passed as COLSUM to launches without one, made once per device: it
    has no elements (nothing can write it) and saves a torch.empty on every launch."""
    return torch.empty(0, device=device, dtype=torch.float32)


def _colsum_rows(M: int) -> int:
    block_m = INTERPRETER_CONFIG["BLOCK_M"] if _interpreting() else _MIN_BLOCK_M
    return max(1, cdiv(M, block_m))


def _check(what, x, w1, w2, activation, dropout_p, tensors):
    """The inputs both halves share (the cpu backend's check_matrix / check_weights; ``_checks``):
    x (T, d), w1 (F1, d), w2 (d_out, d_ff) of x's dtype, F1 even for a gated activation; every
    tensor of ``tensors`` on x's device. Returns (act, gated)."""
    codes = ACTIVATION_CODES.get(activation)
    if codes is not None:  # the common case in one expression; else the checks below name what is wrong
        xs, w1s, w2s, dtype, device, gated = x.shape, w1.shape, w2.shape, x.dtype, x.get_device(), codes[1]
        if (len(xs) == 2 and len(w1s) == 2 and len(w2s) == 2 and dtype in _checks.FLOAT_SET and w1.dtype is dtype
                and w2.dtype is dtype and w1s[1] == xs[1] and (not gated or w1s[0] % 2 == 0)
                and w2s[1] == (w1s[0] // 2 if gated else w1s[0]) and 0.0 <= dropout_p < 1.0
                and _checks.on_device(device, tensors)):
            return codes
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"{what}: activation must be one of {', '.join(ACTIVATION_CODES)}, got {activation!r}")
    act, gated = ACTIVATION_CODES[activation]
    _checks.float_dtype(what, "x", x.dtype)
    _checks.same_device(what, "x", x, tensors)
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        if t.dim() != 2:
            raise ValueError(f"{what}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype != x.dtype:
            raise TypeError(f"{what}: {name} must have dtype {_checks.name_of(x.dtype)}, got "
                            f"{_checks.name_of(t.dtype)}")
    d, F1 = x.shape[1], w1.shape[0]
    if w1.shape[1] != d:
        raise ValueError(f"{what}: w1 must have shape (F1, {d}), got {tuple(w1.shape)}")
    if gated and F1 % 2:
        raise ValueError(f"{what}: gated activations need an even w1.shape[0], got {tuple(w1.shape)}")
    d_ff = F1 // 2 if gated else F1
    if w2.shape[1] != d_ff:
        raise ValueError(f"{what}: w2 must have shape (d_out, {d_ff}), got {tuple(w2.shape)}")
    _checks.dropout(what, dropout_p)
    return act, gated


def feed_forward_fwd(x, w1, b1, w2, b2, activation, dropout_p, seed, offset):
    """(out, pre): pre = x @ w1^T + b1 (T, F1); out = dropout(act(pre)) @ w2^T + b2 (T, d_out)."""
    what = "feed_forward (triton)"
    act, gated = _check(what, x, w1, w2, activation, dropout_p, {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    for name, b, n in (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0])):
        if b is not None:
            _checks.rows_like(what, name, b, (n,), "", x.dtype)
    T, d = x.shape
    F1 = w1.shape[0]
    d_ff = F1 // 2 if gated else F1
    d_out = w2.shape[0]
    # The epilogue reads bias[n] at bias_ptr + n: the biases may be any 1-D view (a slice b[::2],
    # an expanded scalar of stride 0, ...), so give the kernel unit-stride copies (a no-op for
    # the usual contiguous bias; a d_ff-element copy otherwise).
    b1 = b1.contiguous() if b1 is not None else None
    b2 = b2.contiguous() if b2 is not None else None
    device, dtype = x.device, x.dtype
    # (sizes as ints: torch.empty parses them ~0.3 us faster than a tuple, on every call)
    pre = torch.empty(T, F1, device=device, dtype=dtype)
    h = torch.empty(T, d_ff, device=device, dtype=dtype)
    # GEMM 1: A = x (T, d), B[k, n] = w1[n, k]; up rows start d_ff rows further down w1.
    _launch(x, w1.t(), T, d_ff, d, epilogue=EPI_ACT_FWD, act=act, gated=gated, bias=b1, out=pre, h=h,
            up_offset_b=d_ff * w1.stride()[0], up_col=d_ff, dropout=(dropout_p, seed, offset))
    out = torch.empty(T, d_out, device=device, dtype=dtype)
    if d_ff == 0:  # nothing to reduce over: out is b2 (or zeros)
        out.copy_(b2.expand(T, d_out) if b2 is not None else torch.zeros_like(out))
    else:
        # GEMM 2: A = h (T, d_ff), B[k, n] = w2[n, k].
        _launch(h, w2.t(), T, d_out, d_ff, epilogue=EPI_BIAS, bias=b2, out=out)
    return out, pre


#: the backward walks d_ff in column chunks of at least this many columns ...
BWD_CHUNK_MIN_COLS = 1024
#: ... and in at most this many chunks, so its (T, d_ff)-sized temporaries (dpre, h) shrink to a
#: quarter. Chunk widths are multiples of BWD_CHUNK_ALIGN (the largest BLOCK_N: chunk borders are
#: tile borders and chunk pointers stay 16-byte aligned).
BWD_CHUNKS = 4
BWD_CHUNK_ALIGN = 256


def _bwd_chunks(d_ff: int) -> list[tuple[int, int]]:
    if d_ff < 2 * BWD_CHUNK_MIN_COLS:
        return [(0, d_ff)] if d_ff else []
    width = max(BWD_CHUNK_MIN_COLS, cdiv(cdiv(d_ff, BWD_CHUNKS), BWD_CHUNK_ALIGN) * BWD_CHUNK_ALIGN)
    return [(c0, min(c0 + width, d_ff)) for c0 in range(0, d_ff, width)]


def feed_forward_bwd(dout, x, w1, w2, pre, activation, dropout_p, seed, offset, has_b1, has_b2):
    """(dx, dw1, db1, dw2, db2).

    One fused GEMM ``dh = dout @ w2`` whose epilogue produces dpre (activation derivative and
    dropout applied in registers), the recomputed ``h`` and db1's partial column sums.

    Where h is recomputed: *in that epilogue*, which already holds pre and act(pre) in registers,
    so h costs one store and no extra reads. The alternatives are worse: a separate elementwise
    kernel reads pre a second time; recomputing in the dw2 GEMM's prologue redoes the
    transcendental activation once per d_model tile (dozens of times per element) and keeps the
    operand from flowing straight from global to shared memory into wgmma.

    Memory: whole (T, d_ff) dpre and h would sit beside pre. So for wide layers the backward walks
    d_ff in up to ``BWD_CHUNKS`` column chunks c, reusing one dpre and one h buffer of chunk width:
    the fused GEMM writes dpre_c (gate and up halves for gated) and h_c, then the plain products
    consume them on torch.matmul (cuBLAS), each writing straight into its block of the result:
    ``dw2[:, c] = dout^T h_c``, ``dw1[c rows] = dpre_c^T x`` and ``dx += dpre_c w1[c rows]``
    (addmm into dx; with 16-bit dtypes dx is thus rounded once per chunk, at most 4 times).
    """
    what = "feed_forward_bwd (triton)"
    act, gated = _check(what, x, w1, w2, activation, dropout_p, {"dout": dout, "w1": w1, "w2": w2, "pre": pre})
    _checks.rows_like(what, "dout", dout, (x.shape[0], w2.shape[0]), "", x.dtype)
    _checks.rows_like(what, "pre", pre, (x.shape[0], w1.shape[0]), "", x.dtype)
    T, d = x.shape
    F1 = w1.shape[0]
    d_ff = F1 // 2 if gated else F1
    d_out = w2.shape[0]
    halves = 2 if gated else 1
    pre = pre.contiguous()
    chunks = _bwd_chunks(d_ff)
    device, dtype = x.device, x.dtype
    # (sizes as ints: torch.empty parses them ~0.3 us faster than a tuple, on every call)
    dx = torch.zeros(T, d, device=device, dtype=dtype)  # accumulated over the chunks (addmm_)
    # dw1 and dw2 are written whole by the chunks' GEMMs (out=, which never reads it; with T = 0
    # they write zeros): zero-filled only when there is no chunk (d_ff = 0). A fill is one more
    # kernel launch each on a GPU.
    new_grad = torch.empty if chunks else torch.zeros
    dw1 = new_grad(F1, d, device=device, dtype=dtype)
    dw2 = new_grad(d_out, d_ff, device=device, dtype=dtype)
    colsum = None
    if has_b1:
        colsum = torch.zeros(_colsum_rows(T), F1, device=device, dtype=torch.float32)
    width = max((c1 - c0 for c0, c1 in chunks), default=0)
    dpre_buffer = torch.empty(T, halves * width, device=device, dtype=dtype)
    h_buffer = torch.empty(T, width, device=device, dtype=dtype)
    dout_t = dout.t()
    for i, (c0, c1) in enumerate(chunks):
        w = c1 - c0
        # dpre_c = [d gate | d up]
        dpre_c, h_c = _col_slice(dpre_buffer, 0, halves * w), _col_slice(h_buffer, 0, w)
        # dh[:, c] = dout @ w2[:, c]: A = dout (T, d_out), B[k, n] = w2[k, c0 + n].
        _launch(dout, _col_slice(w2, c0, c1), T, w, d_out, epilogue=EPI_ACT_BWD, act=act, gated=gated,
                pre=_col_slice(pre, c0, F1), out=dpre_c, h=h_c,
                colsum=None if colsum is None else _col_slice(colsum, c0, F1),
                up_col=d_ff, col0=c0, dropout=(dropout_p, seed, offset))
        torch.mm(dout_t, h_c, out=_col_slice(dw2, c0, c1))
        for half in range(halves):
            d_half = _col_slice(dpre_c, half * w, (half + 1) * w)
            r0 = half * d_ff + c0  # this half's rows of w1
            torch.mm(d_half.t(), x, out=_row_slice(dw1, r0, r0 + w))
            dx.addmm_(d_half, _row_slice(w1, r0, r0 + w))
    del dpre_buffer, h_buffer
    db1 = colsum.sum(0).to(x.dtype) if has_b1 else empty(x)
    db2 = dout.sum(0, dtype=torch.float32).to(x.dtype) if has_b2 else empty(x)
    return dx, dw1, db1, dw2, db2


def _col_slice(t: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """``t[:, c0:c1]`` of a 2-D tensor, or ``t`` itself when that is all of it: each slice is a
    dispatcher call (~1 us of host time), and a backward of one chunk would make nine of them for
    nothing (the same pointer, shape and strides reach the kernels and GEMMs either way)."""
    return t if c0 == 0 and c1 == t.shape[1] else t[:, c0:c1]


def _row_slice(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """``t[r0:r1]``, or ``t`` itself when that is all of it (see ``_col_slice``)."""
    return t if r0 == 0 and r1 == t.shape[0] else t[r0:r1]


def unsupported_reasons(call) -> list[str]:
    """Every activation, dropout, dtype and size is supported; only unknown activations are refused."""
    activation = call.options.get("activation")
    if activation is not None and activation not in ACTIVATION_CODES:
        return [f"activation {activation!r} is not one of {', '.join(ACTIVATION_CODES)}"]
    return []
