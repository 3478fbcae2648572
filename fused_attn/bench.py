"""python -m fused_attn.bench: how fast and how exact each op and the whole layer are, on this device.

The sweep first measures the device's ceilings (a large matmul in each dtype -> TFLOP/s, a large
copy -> GB/s), then, for every op (attention, residual-add + norm, feed-forward) and for the whole
TransformerLayer, for each shape, dtype and pass (forward, backward, forward + backward), times
every fused backend that can take the call and the baselines (eager: the library's plain-PyTorch
reference for attention, the feed-forward and the layer, and for the norms torch's
``F.layer_norm(x + residual)`` as a user writes it (RMSNorm in plain PyTorch);
``scaled_dot_product_attention`` -- each of its backends on a GPU --; ``torch.compile`` of the
eager baseline), and reports: median time, TFLOP/s or GB/s, the fraction of the measured ceiling, the
speedup over each baseline measured in the same run, the max error against the float64 reference
(and whether it meets the project's oracle), and the peak memory. Results go to DIR/bench.json
and DIR/bench.csv (with the machine's description) and to throughput-vs-sequence-length plots
DIR/attention_fwd.png and DIR/attention_fwd_bwd.png.

Work counted (explicitly, never measured): attention forward 4*B*H*Lq*Lk*D FLOPs (half when
causal), backward 2.5x that; feed-forward 2*T*d_in*d_out per GEMM, backward twice the forward;
the layer adds its four projections; residual-add + norm counts the bytes it must move (forward:
read x and the residual, write the output and, in training, the sum saved for backward -- the
no-grad forward, pass "infer", does not store it; backward: read dout and the saved sum, write
the gradient; plus the weights and the float32 row statistics).

Timing: on CUDA, events around each call after warm-up, median of many calls, the calls queued
behind a GPU sleep that outlasts issuing them, so the events measure the device's time alone
(``ms``); the host's time to issue a call is reported beside it (``host ms``): a call whose host
time exceeds its device time runs at the host's pace in a plain eager loop. On CPU,
time.perf_counter around each call, median. Inputs are rotated through several sets, enough to
exceed the last-level cache, so repeated calls do not run from a warm cache.

Errors: on a smaller case with the same inner sizes (one batch element, at most two heads; at
most 4096 rows), the output and every gradient against the reference run in float64 on the same
(upcast) inputs; "oracle ok" means error <= k * (error of the reference in the same dtype: the
eager baseline, or for the norms the library's reference, since torch's CPU layer_norm sums
half-precision weight gradients in that precision) + floor, k = 2 for outputs and 5 for gradients
(fused_attn.testing.compare). Peak memory: on CUDA torch.cuda.max_memory_allocated above what was
allocated before the call; on CPU the largest sum of the bytes torch's allocator handed out and not
yet freed during the call, from torch.profiler (profile_memory=True; tracemalloc does not see torch).

Exit status 1 when a fused backend raised or missed the oracle, or could not be checked against it
(it raised on the check's inputs, a gradient is missing on one side only, or the float64 reference
or the eager yardstick failed: the row's oracle is then FAIL with the reason). --max-minutes M: no
case starts once its op's share of M is spent, and no implementation within a case once all of M
is (the case's timed rows still get their error check). SIGTERM (e.g. `timeout`) stops the sweep
and still writes what was measured, the case in progress included (rows join the results as
they are timed; that case's fused rows then have no verdict: "n/a", not FAIL).
"""
from __future__ import annotations

import abc
import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import gc
import inspect
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as TF

from . import functional as FA
from . import reference as R
from .backends import BACKENDS, BackendUnavailableError, Call, use_backend
from .backends.triton import interpreter_enabled
from .testing import K_FORWARD, K_GRAD, compare

OPS = ("attention", "layer_norm", "feed_forward", "layer")
PASSES = ("fwd", "bwd", "fwd+bwd")
#: "infer": the forward under torch.no_grad (nothing saved for backward), on request with --passes
ALL_PASSES = PASSES + ("infer",)
SHAPE_SETS = ("tiny", "quick", "full")
DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")
BASELINES = ("eager", "sdpa", "compile")
SDPA_GPU_BACKENDS = ("flash", "efficient", "cudnn", "math")
#: share of a --max-minutes budget each op gets (unused time passes on to the next op)
OP_TIME_WEIGHTS = {"attention": 4.0, "layer_norm": 1.0, "feed_forward": 2.0, "layer": 2.0}


# =============================================================================================
# The cases: one class per op. Each knows its label, the work it does per pass, the smaller case
# its errors are checked on, the calls its fused path makes, and how to build its inputs and its
# implementations (fused backends and baselines).
# =============================================================================================

@dataclass
class Impl:
    """One way to run a case: ``fn(*inputs)`` returns the output; gradients are taken with respect
    to the inputs and ``params``; ``context`` is entered around a whole measurement."""

    name: str
    kind: str  # "fused" or "baseline"
    fn: Optional[Callable] = None
    params: list = field(default_factory=list)
    context: Callable[[], Any] = contextlib.nullcontext
    skip: Optional[str] = None  # why it does not run on this case


def _randn(shape, gen, device, dtype, scale=1.0, shift=0.0):
    """Normal random values drawn on the CPU from ``gen`` (the same numbers on any device), then
    cast; they require grad."""
    t = torch.randn(shape, generator=gen) * scale + shift
    return t.to(device=device, dtype=dtype).requires_grad_(True)


_COMPILED: dict[str, Callable] = {}


def _compiled(name: str, fn: Callable) -> Callable:
    """torch.compile of a reference function, made once per process so shapes share it (torch's
    automatic dynamic shapes recompile once when a second shape comes, not per shape)."""
    if name not in _COMPILED:
        _COMPILED[name] = _torch_compile(fn)
    return _COMPILED[name]


def _torch_compile(fn):
    _configure_compile()
    return torch.compile(fn)


def _ref_attention(q, k, v, causal, window_size=None, alibi_slopes=None, sinks=None):
    return R.attention(q, k, v, causal=causal, window_size=window_size, alibi_slopes=alibi_slopes, sinks=sinks)


def _eager_layer_norm(x, residual, weight, bias, rms, eps=1e-5):
    """The eager baseline as a user writes it (the issue's ``F.layer_norm(x + residual)``; RMSNorm
    in plain PyTorch, in float32 as F.layer_norm computes), not the reference module, whose
    statistics take extra passes to survive rows near float32's range (``ops_common.norm_stat_scale``)
    and so would flatter every "x eager" ratio."""
    summed = x + residual
    if not rms:
        return TF.layer_norm(summed, summed.shape[-1:], weight, bias, eps)
    wide = summed.to(torch.promote_types(summed.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + eps)).to(summed.dtype) * weight + bias


def _ref_feed_forward(x, w1, b1, w2, b2, activation):
    return R.feed_forward(x, w1, b1, w2, b2, activation=activation)


def _sdpa(q, k, v, causal, keep=None):
    """torch's SDPA; a sliding window or ALiBi, which it has no option for, as a mask ``keep``
    (bool, or additive: the ALiBi bias with -inf outside the causal triangle)."""
    if keep is not None:
        return TF.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return TF.scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa_with_sink_key(q, k, v, bias):
    """torch's SDPA with attention sinks, which it has no option for: one more key with a zero
    value, whose logit is the head's sink (the last column of the additive ``bias``, (H, L, L + 1),
    the mask or -inf outside the causal triangle in the others). The appended key is in its time,
    as it would be for a user."""
    zeros = q.new_zeros(q.shape[0], k.shape[1], 1, k.shape[3])
    return TF.scaled_dot_product_attention(q, torch.cat([k, zeros], 2), torch.cat([v, zeros], 2), attn_mask=bias)


def _sdpa_context(which: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[which]
    return lambda: sdpa_kernel([backend])


def _sdpa_impls(fn, device, gpu_backends=SDPA_GPU_BACKENDS) -> list:
    """The SDPA baselines of ``fn``: one per SDPA backend on a GPU (each forced by its context),
    one ("sdpa", torch's choice) on the CPU."""
    if torch.device(device).type == "cuda":
        return [Impl(f"sdpa-{which}", "baseline", fn, context=_sdpa_context(which)) for which in gpu_backends]
    return [Impl("sdpa", "baseline", fn)]


class Case(abc.ABC):
    """One benchmark case of an op; subclasses implement the abstract methods."""

    op = ""
    unit = "TFLOP/s"  # or "GB/s"
    has_sdpa = False

    @abc.abstractmethod
    def label(self) -> str:
        ...

    def params(self) -> dict:
        return dataclasses.asdict(self)

    @abc.abstractmethod
    def work(self, pass_: str, dtype: torch.dtype) -> float:
        """FLOPs (unit TFLOP/s) or bytes (unit GB/s) of one call of ``pass_`` (fwd, bwd, fwd+bwd, or
        infer: the forward under torch.no_grad, which may move fewer bytes than the training one)."""
        ...

    def check_case(self) -> "Case":
        """The (smaller) case whose errors stand for this one's: same inner sizes, fewer rows."""
        return self

    def passes(self, requested: list) -> list:
        """The requested passes this case is timed in (all of them, unless it has no use for some)."""
        return list(requested)

    @abc.abstractmethod
    def calls(self, device, dtype) -> list[Call]:
        """The functional calls the fused path makes (a backend runs the case if it takes them all)."""
        ...

    def eager_bytes(self, dtype) -> int:
        """A rough upper bound of the memory the eager reference needs for forward + backward."""
        return 0

    @abc.abstractmethod
    def make_inputs(self, device, dtype, seed) -> list:
        ...

    @abc.abstractmethod
    def impls(self, device, dtype, backends, baselines, seed) -> list[Impl]:
        ...

    def oracle_fn(self):
        """The function whose float64 run is the error check's reference and whose run in the
        case's dtype is the oracle's yardstick; None: the eager baseline's."""
        return None


def _fused_impl(name, fn, skip=None, **kw):
    return Impl(name, "fused", fn, skip=skip, **kw)


@contextlib.contextmanager
def _tma_auto():
    previous = os.environ.get("FUSED_ATTN_TRITON_TMA")
    os.environ["FUSED_ATTN_TRITON_TMA"] = "auto"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("FUSED_ATTN_TRITON_TMA", None)
        else:
            os.environ["FUSED_ATTN_TRITON_TMA"] = previous


#: set by ``--tma-twin``
TMA_TWIN = False
#: the twin's name -> the backend it runs (with FUSED_ATTN_TRITON_TMA=auto)
TMA_TWIN_OF = {"triton-tma": "triton"}


def _with_tma_twin(impls: list, device) -> list:
    """With ``--tma-twin``, on sm_90+ GPUs, "triton" (pointer loads: TMA is off by default) gets a
    twin "triton-tma" that runs with FUSED_ATTN_TRITON_TMA=auto (the autotuner may then pick TMA
    configurations): the two lines of the summary measure what the TMA path would buy. Opt-in,
    because the twin doubles the Triton configurations compiled per shape, which is most of a
    GPU sweep's time."""
    device = torch.device(device)
    if not TMA_TWIN or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
        return impls
    twins = [dataclasses.replace(i, name="triton-tma", context=_tma_auto) for i in impls
             if i.name == "triton" and i.skip is None]
    return impls + twins


@dataclass(frozen=True)
class AttentionCase(Case):
    B: int
    H: int
    L: int
    D: int
    causal: bool = False
    window: int = 0  # > 0: causal sliding window of this many keys (window_size=(window - 1, 0))
    alibi: bool = False  # ALiBi with the paper's slopes (SDPA gets the bias as an (H, L, L) mask)
    sinks: bool = False  # gpt-oss attention sinks, fixed logits per head (SDPA: one more key, see _sdpa_with_sink_key)
    op = "attention"
    has_sdpa = True

    def label(self):
        return (f"B{self.B} H{self.H} L{self.L} D{self.D}" + (" causal" if self.causal else "")
                + (f" window {self.window}" if self.window else "") + (" alibi" if self.alibi else "")
                + (" sinks" if self.sinks else ""))

    def window_size(self):
        return (self.window - 1, 0) if self.window else None

    def fwd_flops(self):
        if self.window:  # the (query, key) pairs inside the window: sum over i of min(i + 1, w)
            w = min(self.window, self.L)
            return 4 * self.B * self.H * self.D * (w * self.L - w * (w - 1) // 2)
        flops = 4 * self.B * self.H * self.L * self.L * self.D
        return flops / 2 if self.causal else flops

    def work(self, pass_, dtype):
        return {"fwd": 1.0, "infer": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_] * self.fwd_flops()

    def check_case(self):
        # one batch element and at most two heads (one at long sequences: the float64 reference
        # holds several (H, L, L) float64 tensors)
        return dataclasses.replace(self, B=1, H=1 if self.L >= 8192 else min(self.H, 2))

    def calls(self, device, dtype):
        return [Call("attention", torch.device(device), dtype, {
            "head_dim": self.D, "head_dim_v": self.D, "causal": self.causal, "window": bool(self.window),
            "dropout": False, "gqa": False, "mask": None, "mask_grad": False, "alibi": self.alibi})]

    def eager_bytes(self, dtype):
        # scores, scaled scores, masked scores, probabilities, their gradients: ~8 (B, H, L, L) tensors
        return 8 * self.B * self.H * self.L * self.L * max(4, _itemsize(dtype))

    def make_inputs(self, device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        return [_randn((self.B, self.H, self.L, self.D), gen, device, dtype) for _ in range(3)]

    def impls(self, device, dtype, backends, baselines, seed):
        causal, window = self.causal, self.window_size()
        slopes = FA.get_alibi_slopes(self.H, device) if self.alibi else None
        sinks = torch.linspace(-1.0, 2.0, self.H, device=device) if self.sinks else None
        out = _with_tma_twin([_fused_impl(name, lambda q, k, v, name=name: FA.attention(
            q, k, v, causal=causal, window_size=window, alibi_slopes=slopes, sinks=sinks, backend=name), skip=skip)
            for name, skip in backends], device)
        if "eager" in baselines:
            out.append(Impl("eager", "baseline",
                            lambda q, k, v: _ref_attention(q, k, v, causal, window, slopes, sinks)))
        if "sdpa" in baselines:
            # SDPA has no window or ALiBi option: it gets the window as an (L, L) keep-mask, ALiBi
            # as an (H, L, L) additive one (which its flash backend refuses; the others read them)
            keep = None if window is None else R.visible_keys(self.L, self.L, causal, window, device=device)
            if slopes is not None:
                keep = R.alibi_bias(slopes, self.L, self.L, dtype=dtype)
                if causal:
                    visible = R.visible_keys(self.L, self.L, True, window, device=device)
                    keep = keep.masked_fill(~visible, float("-inf"))
            if sinks is not None:  # one more key: the sink's logit in the last column of an (H, L, L + 1) bias
                if keep is None or keep.dtype == torch.bool:
                    visible = keep if keep is not None else R.visible_keys(self.L, self.L, causal, device=device)
                    keep = torch.zeros(self.L, self.L, device=device, dtype=dtype)
                    if visible is not None:
                        keep = keep.masked_fill(~visible, float("-inf"))
                keep = keep.reshape(-1, self.L, self.L).expand(self.H, self.L, self.L)
                bias = torch.cat([keep, sinks.to(dtype).view(self.H, 1, 1).expand(self.H, self.L, 1)], -1)
                sdpa = lambda q, k, v: _sdpa_with_sink_key(q, k, v, bias)  # noqa: E731
            else:
                sdpa = lambda q, k, v: _sdpa(q, k, v, causal, keep)  # noqa: E731
            out += _sdpa_impls(sdpa, device)
        if "compile" in baselines:
            compiled = _compiled("attention", _ref_attention)
            out.append(Impl("compile", "baseline", lambda q, k, v: compiled(q, k, v, causal, window, slopes, sinks)))
        return out


@dataclass(frozen=True)
class DecodeAttentionCase(Case):
    """One decoding step: a new query per sequence and head against a KV cache of Lk keys, with
    grouped-query attention (bottom-right causal: the query sees the whole cache). Reading the
    cache is the work, so it is counted in bytes (K and V once, plus q and the output), and only
    the forward is timed. SDPA gets the grouped heads with ``enable_gqa``."""
    B: int
    Hq: int
    Hkv: int
    Lk: int
    D: int
    op = "attention"
    unit = "GB/s"
    has_sdpa = True

    def label(self):
        return f"decode B{self.B} Hq{self.Hq} Hkv{self.Hkv} Lk{self.Lk} D{self.D}"

    def passes(self, requested):
        return [p for p in requested if p in ("fwd", "infer")]

    def work(self, pass_, dtype):
        return _itemsize(dtype) * (2 * self.B * self.Hkv * self.Lk * self.D + 2 * self.B * self.Hq * self.D)

    def check_case(self):
        return dataclasses.replace(self, B=1, Lk=min(self.Lk, 4096))

    def calls(self, device, dtype):
        return [Call("attention", torch.device(device), dtype, {
            "head_dim": self.D, "head_dim_v": self.D, "causal": True, "window": False, "dropout": False,
            "gqa": self.Hq != self.Hkv, "mask": None, "mask_grad": False, "alibi": False})]

    def eager_bytes(self, dtype):
        return 8 * self.B * self.Hq * self.Lk * max(4, _itemsize(dtype))

    def make_inputs(self, device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        return [_randn(shape, gen, device, dtype) for shape in ((self.B, self.Hq, 1, self.D),
                                                                 (self.B, self.Hkv, self.Lk, self.D),
                                                                 (self.B, self.Hkv, self.Lk, self.D))]

    def impls(self, device, dtype, backends, baselines, seed):
        out = [_fused_impl(name, lambda q, k, v, name=name: FA.attention(
            q, k, v, causal=True, alignment="bottom_right", backend=name), skip=skip) for name, skip in backends]
        if "eager" in baselines:
            out.append(Impl("eager", "baseline",
                            lambda q, k, v: R.attention(q, k, v, causal=True, alignment="bottom_right")))
        if "sdpa" in baselines:
            def sdpa(q, k, v):  # one query seeing every key: no mask
                return TF.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])
            out += _sdpa_impls(sdpa, device)
        return out


@dataclass(frozen=True)
class VarlenAttentionCase(Case):
    """Packed sequences of different lengths (``attention_varlen``), causal: the fused backends on
    the packed tensors against SDPA on the same sequences padded to the longest (a key-padding
    mask; the pad and unpad copies are in its time, as for a user whose data is packed) and the
    eager reference run sequence by sequence."""
    lengths: tuple
    H: int
    D: int
    causal: bool = True
    op = "attention"
    has_sdpa = True

    def label(self):
        return (f"varlen {len(self.lengths)} seqs {sum(self.lengths)} tok max {max(self.lengths)} H{self.H} "
                f"D{self.D}" + (" causal" if self.causal else ""))

    def cu(self, device):
        return torch.tensor([0] + list(itertools.accumulate(self.lengths)), dtype=torch.int32, device=device)

    def fwd_flops(self):  # only the pairs inside each sequence count
        return sum(4 * self.H * n * n * self.D / (2 if self.causal else 1) for n in self.lengths)

    def work(self, pass_, dtype):
        return {"fwd": 1.0, "infer": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[pass_] * self.fwd_flops()

    def check_case(self):
        return dataclasses.replace(self, lengths=tuple(min(n, 1024) for n in self.lengths[:4]), H=min(self.H, 2))

    def calls(self, device, dtype):
        return [Call("attention", torch.device(device), dtype, {
            "head_dim": self.D, "head_dim_v": self.D, "causal": self.causal, "window": False, "dropout": False,
            "gqa": False, "softcap": False, "mask": None, "mask_grad": False, "varlen": True})]

    def eager_bytes(self, dtype):
        return 8 * self.H * max(self.lengths) ** 2 * max(4, _itemsize(dtype))

    def make_inputs(self, device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        return [_randn((sum(self.lengths), self.H, self.D), gen, device, dtype) for _ in range(3)]

    def impls(self, device, dtype, backends, baselines, seed):
        causal, cu, longest = self.causal, self.cu(device), max(self.lengths)
        out = [_fused_impl(name, lambda q, k, v, name=name: FA.attention_varlen(
            q, k, v, cu, cu, longest, longest, causal=causal, backend=name), skip=skip) for name, skip in backends]
        if "eager" in baselines:
            out.append(Impl("eager", "baseline", lambda q, k, v: R.attention_varlen(q, k, v, cu, cu, causal)))
        if "sdpa" in baselines:
            lengths = self.lengths
            # which padded slot each packed token goes to, and the (B, 1, L, L) keep-mask
            slots = torch.cat([torch.arange(n, device=device) + s * longest for s, n in enumerate(lengths)])
            real = torch.arange(longest, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
            keep = real[:, None, None, :]
            if causal:
                keep = keep & torch.ones(longest, longest, dtype=torch.bool, device=device).tril()
            # padding rows attend to everything (not to nothing, which gives SDPA NaN rows whose
            # backward poisons dK, dV); unpad drops them, so their gradient is zero
            keep = keep | ~real[:, None, :, None]

            def padded_sdpa(q, k, v):
                def pad(t):
                    out = t.new_zeros(len(lengths) * longest, *t.shape[1:]).index_copy(0, slots, t)
                    return out.view(len(lengths), longest, *t.shape[1:]).transpose(1, 2)
                o = TF.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep)
                return o.transpose(1, 2).reshape(len(lengths) * longest, *o.shape[1:2], o.shape[-1])[slots]

            out += _sdpa_impls(padded_sdpa, device, ("efficient", "cudnn"))  # flash takes no mask
        return out


@dataclass(frozen=True)
class LayerNormCase(Case):
    N: int
    d: int
    rms: bool = False
    op = "layer_norm"
    unit = "GB/s"

    def label(self):
        return f"N{self.N} d{self.d}" + (" rms" if self.rms else "")

    def work(self, pass_, dtype):
        es = _itemsize(dtype)
        rows = self.N * self.d * es
        # The bytes the fused kernels must move (functional.layer_norm_residual stores the sum only
        # for prenorm or a backward: store_summed of fused_attn.ops.layer_norm_residual_fwd):
        # inference (no grad, no prenorm): read x and residual, write out -- the sum is not stored;
        # training forward (the inputs require grad): also write the sum, saved for backward;
        # backward: read dout and the saved sum, write the gradient (x's and the residual's are the
        # same tensor). The forwards read the weights and write the row statistics, mean and rstd
        # (rstd only for RMSNorm; written in both modes; float32, float64 for float64), which the
        # backward reads; it also writes the weights' gradients.
        stats = (1 if self.rms else 2) * _itemsize(torch.promote_types(dtype, torch.float32)) * self.N
        infer = 3 * rows + 2 * self.d * es + stats
        fwd = infer + rows
        bwd = 3 * rows + 4 * self.d * es + stats
        return {"infer": infer, "fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]

    def check_case(self):
        return dataclasses.replace(self, N=min(self.N, 4096))

    def calls(self, device, dtype):
        return [Call("layer_norm_residual", torch.device(device), dtype, {
            "hidden": self.d, "rms": self.rms, "dropout": False, "residual_in_fp32": False})]

    def eager_bytes(self, dtype):
        return 12 * self.N * self.d * max(4, _itemsize(dtype))

    def make_inputs(self, device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        return [_randn((self.N, self.d), gen, device, dtype), _randn((self.N, self.d), gen, device, dtype),
                _randn((self.d,), gen, device, dtype, 0.1, 1.0), _randn((self.d,), gen, device, dtype, 0.1)]

    def impls(self, device, dtype, backends, baselines, seed):
        rms = self.rms
        out = [_fused_impl(name, lambda x, r, w, b, name=name: FA.layer_norm_residual(x, r, w, b, 1e-5, rms=rms,
                                                                                        backend=name), skip=skip)
               for name, skip in backends]
        if "eager" in baselines:
            out.append(Impl("eager", "baseline", lambda x, r, w, b: _eager_layer_norm(x, r, w, b, rms)))
        if "compile" in baselines:
            compiled = _compiled("layer_norm", _eager_layer_norm)
            out.append(Impl("compile", "baseline", lambda x, r, w, b: compiled(x, r, w, b, rms)))
        return out

    def oracle_fn(self):
        # The library's reference, not the eager baseline: torch's CPU layer_norm sums the weight
        # and bias gradients of bfloat16 / float16 in that dtype, so a yardstick of it let a dw 20 %
        # off pass (err ~25 against a bound of 53 at N 2048, d 512, bfloat16; the reference's
        # error gives a bound of ~2).
        rms = self.rms
        return lambda x, r, w, b: R.layer_norm_residual(x, r, w, b, 1e-5, rms=rms)


@dataclass(frozen=True)
class FeedForwardCase(Case):
    T: int
    d: int
    d_ff: int
    activation: str = "relu"
    op = "feed_forward"

    def label(self):
        return f"T{self.T} d{self.d} ff{self.d_ff} {self.activation}"

    def width1(self):
        return 2 * self.d_ff if self.activation in R.GATED_ACTIVATIONS else self.d_ff

    def fwd_flops(self):
        return 2 * self.T * self.d * self.width1() + 2 * self.T * self.d_ff * self.d

    def work(self, pass_, dtype):
        # backward: for each GEMM one product for the input gradient and one for the weight's
        return {"fwd": 1.0, "infer": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}[pass_] * self.fwd_flops()

    def check_case(self):
        return dataclasses.replace(self, T=min(self.T, 1024))

    def calls(self, device, dtype):
        return [Call("feed_forward", torch.device(device), dtype, {"activation": self.activation, "dropout": False})]

    def eager_bytes(self, dtype):
        return 8 * self.T * self.width1() * max(4, _itemsize(dtype))

    def make_inputs(self, device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        w = self.width1()
        return [_randn((self.T, self.d), gen, device, dtype),
                _randn((w, self.d), gen, device, dtype, self.d ** -0.5), _randn((w,), gen, device, dtype, 0.1),
                _randn((self.d, self.d_ff), gen, device, dtype, self.d_ff ** -0.5),
                _randn((self.d,), gen, device, dtype, 0.1)]

    def impls(self, device, dtype, backends, baselines, seed):
        act = self.activation
        out = _with_tma_twin([_fused_impl(name, lambda x, w1, b1, w2, b2, name=name:
                                              FA.feed_forward(x, w1, b1, w2, b2, activation=act, backend=name),
                                              skip=skip) for name, skip in backends], device)
        if "eager" in baselines:
            out.append(Impl("eager", "baseline", lambda x, w1, b1, w2, b2: _ref_feed_forward(x, w1, b1, w2, b2, act)))
        if "compile" in baselines:
            compiled = _compiled("feed_forward", _ref_feed_forward)
            out.append(Impl("compile", "baseline", lambda x, w1, b1, w2, b2: compiled(x, w1, b1, w2, b2, act)))
        return out


def fused_layer_class():
    """``fused_attn.TransformerLayer`` (the fused modules) when it exists, else None."""
    import fused_attn
    cls = getattr(fused_attn, "TransformerLayer", None)
    return cls if cls is not None and cls is not R.TransformerLayer else None


def functional_layer_forward(layer: R.TransformerLayer, x, attention, layer_norm, feed_forward):
    """The post-LN reference layer written with the given op functions (same parameters):
    y = norm1(mha(x) + x); z = norm2(ffn(y) + y). Used for the layer with SDPA, and for the fused
    layer when ``fused_attn.TransformerLayer`` does not exist yet."""
    mha = layer.multi_head_attention
    B, L, d = x.shape
    q = mha.split_heads(mha.query_linear(x), mha.num_heads)
    k = mha.split_heads(mha.key_linear(x), mha.num_kv_heads)
    v = mha.split_heads(mha.value_linear(x), mha.num_kv_heads)
    a = mha.out_linear(attention(q, k, v, mha.causal).transpose(1, 2).reshape(B, L, d))
    rms = layer.norm1.norm == "rmsnorm"
    y = layer_norm(a, x, layer.norm1.weight, layer.norm1.bias, layer.norm1.eps, rms)
    f = feed_forward(y, layer.ffn.linear1.weight, layer.ffn.linear1.bias, layer.ffn.linear2.weight,
                     layer.ffn.linear2.bias, layer.ffn.activation)
    return layer_norm(f, y, layer.norm2.weight, layer.norm2.bias, layer.norm2.eps, rms)


@dataclass(frozen=True)
class LayerCase(Case):
    B: int
    L: int
    d: int
    H: int
    d_ff: int
    causal: bool = False
    op = "layer"
    has_sdpa = True

    def label(self):
        return f"B{self.B} L{self.L} d{self.d} H{self.H} ff{self.d_ff}" + (" causal" if self.causal else "")

    def flops(self):
        T = self.B * self.L
        gemm = 2 * T * self.d * self.d * 4 + 2 * T * self.d * self.d_ff * 2
        attn = 4 * self.B * self.L * self.L * self.d / (2 if self.causal else 1)
        return gemm, attn

    def work(self, pass_, dtype):
        gemm, attn = self.flops()
        return {"fwd": gemm + attn, "infer": gemm + attn, "bwd": 2 * gemm + 2.5 * attn,
                "fwd+bwd": 3 * gemm + 3.5 * attn}[pass_]

    def check_case(self):
        return dataclasses.replace(self, B=1)

    def calls(self, device, dtype):
        device = torch.device(device)
        return (AttentionCase(self.B, self.H, self.L, self.d // self.H, self.causal).calls(device, dtype)
                + LayerNormCase(self.B * self.L, self.d).calls(device, dtype)
                + FeedForwardCase(self.B * self.L, self.d, self.d_ff).calls(device, dtype))

    def eager_bytes(self, dtype):
        return (AttentionCase(self.B, self.H, self.L, self.d // self.H).eager_bytes(dtype)
                + 16 * self.B * self.L * self.d_ff * max(4, _itemsize(dtype)))

    def reference_layer(self, device, dtype, seed):
        torch.manual_seed(seed)  # the reference's own initialisation, the same for every dtype
        layer = R.TransformerLayer(self.d, self.H, d_ff=self.d_ff, causal=self.causal)
        return layer.to(device=device, dtype=dtype)

    def make_inputs(self, device, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        return [_randn((self.B, self.L, self.d), gen, device, dtype)]

    def impls(self, device, dtype, backends, baselines, seed):
        ref = self.reference_layer(device, dtype, seed)
        ref_params = [p for _, p in ref.named_parameters()]
        fused_cls = fused_layer_class()
        out = []
        for name, skip in backends:
            if fused_cls is not None:
                # the backend by the module's own argument where it has one, and by use_backend around it
                chosen = {"backend": name} if "backend" in inspect.signature(fused_cls).parameters else {}
                module = fused_cls(self.d, self.H, d_ff=self.d_ff, causal=self.causal, device=device, dtype=dtype,
                                   **chosen)
                module.load_state_dict(ref.state_dict())
                named = dict(module.named_parameters())
                params = [named[n] for n, _ in ref.named_parameters()]
                out.append(_fused_impl(name, module, skip=skip, params=params,
                                       context=lambda name=name: use_backend(name)))
            else:
                fa = lambda q, k, v, causal, name=name: FA.attention(q, k, v, causal=causal, backend=name)
                ln = lambda x, r, w, b, eps, rms, name=name: FA.layer_norm_residual(x, r, w, b, eps, rms=rms,
                                                                                     backend=name)
                ff = lambda x, w1, b1, w2, b2, act, name=name: FA.feed_forward(x, w1, b1, w2, b2, activation=act,
                                                                               backend=name)
                out.append(_fused_impl(name, lambda x, fa=fa, ln=ln, ff=ff: functional_layer_forward(ref, x, fa, ln, ff),
                                       skip=skip, params=ref_params))
        # "eager" is the reference layer itself (the library's reference Transformer, also the
        # oracle's float64 yardstick); the SDPA layer's norms are plain PyTorch (_eager_layer_norm)
        eager_ln = lambda x, r, w, b, eps, rms: _eager_layer_norm(x, r, w, b, rms, eps)
        if "eager" in baselines:
            out.append(Impl("eager", "baseline", ref, params=ref_params))
        if "sdpa" in baselines:
            out.append(Impl("sdpa", "baseline", lambda x: functional_layer_forward(ref, x, _sdpa, eager_ln, R.feed_forward),
                            params=ref_params))
        if "compile" in baselines:
            out.append(Impl("compile", "baseline", _torch_compile(ref), params=ref_params))
        return out


def _itemsize(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# the shape sets
# ---------------------------------------------------------------------------------------------

#: packed-sequence sweeps: fixed, uneven lengths (a packed training batch: a few long documents,
#: many short ones); 16 384 tokens on the GPU as the dense rows
VARLEN_QUICK_CPU = (37, 300, 128, 511, 64)
VARLEN_FULL_CPU = (700, 33, 1500, 256, 96, 1024, 450)
VARLEN_GPU = (4096, 1000, 2048, 300, 3000, 512, 77, 1600, 2600, 1151)


def shape_set(op: str, which: str, device_type: str) -> list[Case]:
    """The cases of ``op`` for a sweep size (tiny: a smoke test; quick: < 2 min on 2 CPU cores;
    full: the real sweep, sized per device type)."""
    if which not in SHAPE_SETS:  # the branches below would read any other name as "full"
        raise ValueError(f"shape_set: which={which!r} is not a shape set (expected one of {', '.join(SHAPE_SETS)})")
    gpu = device_type == "cuda"
    if which == "tiny":
        return {"attention": [AttentionCase(1, 2, 16, 16), AttentionCase(1, 2, 32, 16, causal=True),
                              VarlenAttentionCase((5, 16, 1), 2, 16), DecodeAttentionCase(2, 4, 2, 40, 16)],
                "layer_norm": [LayerNormCase(64, 32)],
                "feed_forward": [FeedForwardCase(16, 32, 64)],
                "layer": [LayerCase(1, 16, 32, 2, 64)]}[op]
    if which == "quick" and not gpu:
        return {"attention": [AttentionCase(1, 4, L, 64, causal) for causal in (False, True) for L in (128, 256, 512)]
                + [AttentionCase(1, 4, 1024, 64, True, window=128), AttentionCase(1, 4, 512, 64, True, alibi=True),
                   AttentionCase(1, 4, 512, 64, True, sinks=True), VarlenAttentionCase(VARLEN_QUICK_CPU, 4, 64),
                   DecodeAttentionCase(4, 8, 2, 4096, 64)],
                "layer_norm": [LayerNormCase(2048, 512), LayerNormCase(2048, 1024), LayerNormCase(2048, 1024, rms=True)],
                "feed_forward": [FeedForwardCase(256, 256, 1024), FeedForwardCase(256, 256, 688, "swiglu")],
                "layer": [LayerCase(2, 128, 256, 4, 1024)]}[op]
    if which == "quick":  # on a GPU: a few points of each, the rows docs/gpu-notes.md predicts first
        # (benchmarks/gpu_check.sh runs this set under --max-minutes: a sweep cut short still
        # reaches them; each row's comparison row follows it)
        return {"attention": [AttentionCase(4, 16, 4096, 128),  # Triton tiles, CUDA mma kernel
                              DecodeAttentionCase(1, 32, 8, 32768, 128),  # split-KV decoding
                              AttentionCase(1, 16, 16384, 128, True, window=4096),  # the band
                              AttentionCase(1, 16, 16384, 128, True),  # the window row's comparison
                              AttentionCase(4, 16, 4096, 128, True),  # causal, the ALiBi row's comparison
                              AttentionCase(4, 16, 4096, 128, True, alibi=True),
                              VarlenAttentionCase(VARLEN_GPU, 16, 128),
                              AttentionCase(32, 16, 512, 128),  # the CUDA forward's row
                              DecodeAttentionCase(16, 32, 8, 4096, 128),  # packed query groups, no split
                              AttentionCase(4, 16, 4096, 128, True, sinks=True),
                              AttentionCase(16, 16, 1024, 128), AttentionCase(16, 16, 1024, 128, True)],
                "layer_norm": [LayerNormCase(16384, 1024), LayerNormCase(65536, 1024), LayerNormCase(16384, 4096)],
                "feed_forward": [FeedForwardCase(8192, 1024, 4096), FeedForwardCase(8192, 2048, 8192)],
                "layer": [LayerCase(4, 1024, 1024, 16, 4096)]}[op]
    if not gpu:  # full, CPU
        return {"attention": [AttentionCase(2, 8, L, 64, causal) for causal in (False, True)
                              for L in (256, 512, 1024, 2048)]
                + [AttentionCase(2, 8, L, 128, causal) for causal in (False, True) for L in (1024, 2048)]
                + [AttentionCase(2, 8, 2048, 64, True, window=256), AttentionCase(2, 8, 1024, 64, True, alibi=True),
                   AttentionCase(2, 8, 1024, 64, True, sinks=True), VarlenAttentionCase(VARLEN_FULL_CPU, 8, 64),
                   DecodeAttentionCase(8, 32, 8, 8192, 64)],
                "layer_norm": [LayerNormCase(8192, d) for d in (512, 1024, 4096)] + [LayerNormCase(8192, 1024, rms=True)],
                "feed_forward": [FeedForwardCase(2048, 512, 2048), FeedForwardCase(2048, 1024, 4096),
                                 FeedForwardCase(2048, 1024, 2736, "swiglu")],
                "layer": [LayerCase(4, 512, 512, 8, 2048)]}[op]
    # full, GPU: FlashAttention's chart shapes (16k tokens per batch, hidden 2048) and LLM-like sizes
    return {"attention": [AttentionCase(16384 // L, 2048 // D, L, D, causal) for D in (128, 64)
                          for causal in (False, True) for L in (512, 1024, 2048, 4096, 8192, 16384)]
            + [AttentionCase(1, 16, 16384, 128, True, window=w) for w in (1024, 4096)]
            + [AttentionCase(16384 // L, 16, L, 128, causal, alibi=True)
               for causal in (False, True) for L in (2048, 8192)]
            + [AttentionCase(4, 16, 4096, 128, True, sinks=True)]
            + [VarlenAttentionCase(VARLEN_GPU, 16, D) for D in (128, 64)]
            # decoding (Llama-3-8B's heads: 32 query heads on 8 KV heads): one long cache, a batch of
            # shorter ones, a large batch, and a 70B-like 64-on-8 grouping
            + [DecodeAttentionCase(1, 32, 8, Lk, 128) for Lk in (4096, 32768, 131072)]
            + [DecodeAttentionCase(16, 32, 8, 8192, 128), DecodeAttentionCase(128, 32, 8, 2048, 128),
               DecodeAttentionCase(1, 64, 8, 32768, 128)],
            "layer_norm": [LayerNormCase(16384, d) for d in (1024, 2048, 4096, 8192)] + [LayerNormCase(16384, 4096, rms=True)],
            "feed_forward": [FeedForwardCase(8192, d, 4 * d) for d in (1024, 2048, 4096)]
            + [FeedForwardCase(8192, 4096, 11008, "swiglu")],
            "layer": [LayerCase(8, 1024, 1024, 16, 4096), LayerCase(2, 4096, 2048, 16, 8192)]}[op]


# =============================================================================================
# timing, memory and errors
# =============================================================================================

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: ``times`` as the device ran them (CUDA: between two events, with the
    queue filled ahead of the GPU; CPU: wall clock), ``host`` the host's own time to issue each
    call (CUDA; on CPU the same as ``times``). ``prefilled``: the GPU never waited for the host
    during the timed calls (CUDA), so ``times`` hold no launch gaps."""

    times: list
    host: list
    prefilled: bool = True


#: longest GPU sleep put in front of the timed calls (seconds); fewer calls are timed when issuing
#: them would take longer
MAX_PREFILL_S = 1.0
_GPU_CYCLES_PER_S: dict = {}


def _gpu_cycles_per_s(device: torch.device) -> float:
    """Clock cycles per second of ``torch.cuda._sleep`` on this GPU, measured once (events around a
    20-million-cycle sleep; the faster of two, the first may include a clock ramp)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _GPU_CYCLES_PER_S:
        rates = []
        for _ in range(2):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            torch.cuda._sleep(20_000_000)
            end.record()
            end.synchronize()
            rates.append(20_000_000 / max(begin.elapsed_time(end) / 1e3, 1e-6))
        _GPU_CYCLES_PER_S[key] = max(rates)
    return _GPU_CYCLES_PER_S[key]


def prefill_plan(host_s: float, reps: int, min_reps: int) -> tuple[int, float]:
    """(calls to time, seconds of GPU sleep to queue them behind): the sleep must outlast issuing
    every timed call (``host_s`` each, with a 25 % margin and 2 ms to spare), so that the GPU, once
    awake, finds the whole queue waiting and runs the calls back to back; at most MAX_PREFILL_S,
    fewer calls (never under ``min_reps``) where that is too short."""
    per_call = 1.25 * max(host_s, 1e-6)
    reps = max(min(reps, int((MAX_PREFILL_S - 2e-3) / per_call)), min_reps)
    return reps, min(reps * per_call + 2e-3, MAX_PREFILL_S)


def time_calls(call: Callable[[int], Any], n_sets: int, device: torch.device, budget_s: float,
               min_reps: int, max_reps: int) -> Timing:
    """Times ``call(i)`` (i cycles through the input sets) after warm-up.

    Warm-up runs at least two calls (the first may compile) and until a quarter of the budget
    is spent; the number of timed calls then fits the budget, within [min_reps, max_reps]. On
    CPU each call is timed with time.perf_counter. On CUDA each call sits between two events,
    and the timed calls are queued behind a GPU sleep that outlasts issuing them (``prefill_plan``):
    the events then measure the device's time for the call alone. Without the sleep a call whose
    kernels finish before the host has issued the next one is timed at the host's pace (Python,
    autograd and launch overhead, ~0.06-0.2 ms a call on the H200 machine), which hid the kernels
    of every short call; that host time is reported beside it (``Timing.host``).
    """
    cuda = device.type == "cuda"
    i = 0
    start = time.perf_counter()
    while True:
        call(i % n_sets)
        i += 1
        if i >= 2:
            _sync(device)
            if time.perf_counter() - start > budget_s / 4 or i >= 50:
                break
    t0 = time.perf_counter()
    call(i % n_sets)
    _sync(device)
    estimate = max(time.perf_counter() - t0, 1e-7)
    i += 1
    reps = int(min(max(budget_s / estimate, min_reps), max_reps))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if cuda:
            rate = _gpu_cycles_per_s(device)
            # the host's time to issue one call, measured while the GPU is kept busy (so that
            # nothing the call does waits for the device unless it synchronises)
            torch.cuda._sleep(int(0.05 * rate))
            issue = []
            for _ in range(3):
                t0 = time.perf_counter()
                call(i % n_sets)
                issue.append(time.perf_counter() - t0)
                i += 1
            _sync(device)
            reps, sleep_s = prefill_plan(statistics.median(issue), reps, min_reps)
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            host = []
            torch.cuda._sleep(int(sleep_s * rate))
            t_issue = time.perf_counter()
            for r, (begin, end) in enumerate(events):
                t0 = time.perf_counter()
                begin.record()
                call((i + r) % n_sets)
                end.record()
                host.append(time.perf_counter() - t0)
            issued_in = time.perf_counter() - t_issue
            _sync(device)
            return Timing([begin.elapsed_time(end) / 1e3 for begin, end in events], host, issued_in < sleep_s)
        times = []
        for r in range(reps):
            t0 = time.perf_counter()
            call((i + r) % n_sets)
            times.append(time.perf_counter() - t0)
        return Timing(times, times)
    finally:
        if gc_was_enabled:
            gc.enable()


class CpuMemoryProbe:
    """Peak CPU memory of several labelled regions, in one torch.profiler session.

    tracemalloc does not see torch's allocations; the profiler (profile_memory=True) records
    every allocation and free of torch's CPU allocator. The peak of a region is the largest sum
    of the bytes allocated and not yet freed since the region began (memory held before the
    region is not counted)."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile
        self.profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.labels: list[str] = []

    def __enter__(self):
        self.profile.__enter__()
        return self

    def __exit__(self, *exc):
        self.profile.__exit__(*exc)

    def region(self, label):
        self.labels.append(label)
        return torch.profiler.record_function(label)

    def peaks(self) -> dict[str, int]:
        events = list(self.profile.profiler.kineto_results.events())
        spans = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.name() in self.labels}
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        result = {}
        for label, (begin, end) in spans.items():
            live = peak = 0
            for t, nbytes in memory:
                if begin <= t <= end:
                    live += nbytes
                    peak = max(peak, live)
            result[label] = peak
        return result


def _grads(out, inputs, dout, retain=False):
    return torch.autograd.grad(out, inputs, dout, retain_graph=retain, allow_unused=True)


def _max_abs(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max()) if a.numel() else 0.0


# =============================================================================================
# the sweep
# =============================================================================================

@dataclass
class Options:
    device: torch.device
    dtypes: list
    ops: list
    passes: list
    backends: Optional[list]  # None: every backend that takes the call
    baselines: list
    shapes: str
    budget_s: float
    min_reps: int
    max_reps: int
    memory: bool
    seed: int


def cache_bytes(device: torch.device) -> int:
    """The last-level cache the input rotation must exceed."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    for index in range(4, -1, -1):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * mult
    return 32 << 20


def memory_limit(device: torch.device) -> int:
    if device.type == "cuda":
        return int(0.6 * torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 8 << 30


def backend_choices(case: Case, device, dtype, requested: Optional[list] = None) -> list[tuple[str, Optional[str]]]:
    """(name, why it cannot run or None) for each fused backend considered on this case.

    A backend runs the case when it takes every call the case makes (``call_reasons`` empty);
    new backends in ``fused_attn.backends.BACKENDS`` show up here by themselves. With
    ``requested`` None (every backend): the ones that refuse are left out silently,
    ``reference`` is left out where another fused backend runs the case (the eager baseline is
    the same math), and the Triton *interpreter* is never timed (its timings mean nothing).
    Backends named in ``requested`` are all listed, with their reasons when they refuse."""
    device = torch.device(device)
    calls = case.calls(device, dtype)
    chosen, refused = [], []
    for name, backend in BACKENDS.items():
        if requested is not None and name not in requested:
            continue
        reasons = [r for call in calls for r in backend.call_reasons(call)]
        if name == "triton" and device.type == "cpu" and interpreter_enabled():
            reasons.append("the Triton interpreter (TRITON_INTERPRET=1) is not timed")
        (refused if reasons else chosen).append((name, "; ".join(dict.fromkeys(reasons)) or None))
    if requested is None:
        if len(chosen) > 1:
            chosen = [(n, r) for n, r in chosen if n != "reference"]
        return chosen
    return chosen + refused


def make_sets(case: Case, device, dtype, seed: int) -> list[list]:
    """Input sets for rotation: enough of them that together they exceed the last-level cache
    twice (at most 8, and at most 2 GiB), so repeated calls do not run from a warm cache."""
    device = torch.device(device)
    first = case.make_inputs(device, dtype, seed)
    set_bytes = max(1, sum(t.numel() * t.element_size() for t in first))
    n_sets = max(1, min(8, math.ceil(2 * cache_bytes(device) / set_bytes), (2 << 30) // set_bytes))
    return [first] + [case.make_inputs(device, dtype, seed + 1 + i) for i in range(n_sets - 1)]


def make_douts(out, n_sets: int, seed: int) -> list:
    """One random output gradient per input set (never ones: real gradients are not constant)."""
    gen = torch.Generator().manual_seed(seed + 1000)
    return [torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
            for _ in range(n_sets)]


def single_impl(case: Case, device, dtype, name: str, seed: int = 0) -> Optional[Impl]:
    """The implementation ``name`` (a fused backend or a baseline) of ``case``; None when ``name``
    is no implementation of this op here. Its ``skip`` says why it cannot run."""
    if name in BACKENDS:
        impls = case.impls(device, dtype, backend_choices(case, device, dtype, [name]), [], seed)
    else:
        base = "sdpa" if name.startswith("sdpa") else name
        impls = case.impls(device, dtype, [], [base], seed) if base in BASELINES else []
    return next((i for i in impls if i.name == name), None)


def baseline_names(op: str, device_type: str) -> list[str]:
    """The baselines of ``op`` on a device type, by name."""
    names = ["eager"]
    if op in ("attention", "layer"):
        names += [f"sdpa-{w}" for w in SDPA_GPU_BACKENDS] if device_type == "cuda" and op == "attention" else ["sdpa"]
    return names + ["compile"]


def _row(case, dtype, impl, pass_, **kw):
    row = {"op": case.op, "pass": pass_, "shape": case.label(), "params": case.params(), "dtype": _dt(dtype),
           "impl": impl.name, "kind": impl.kind, "status": "ok", "reason": "", "median_ms": None, "min_ms": None,
           "reps": 0, "n_sets": 0, "host_ms": None, "prefilled": None, "work": case.work(pass_, dtype),
           "unit": case.unit, "throughput": None,
           "ceiling": None, "ceiling_frac": None, "speedup": {}, "err_out": None, "err_grad": None,
           "oracle": "", "oracle_detail": "", "peak_mem_mib": None}
    row.update(kw)
    return row


def _dt(dtype):
    return str(dtype).replace("torch.", "")


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _is_refusal(exc: BaseException) -> bool:
    """A baseline that cannot take a call (an SDPA kernel that refuses a shape or dtype)."""
    text = str(exc)
    return isinstance(exc, (BackendUnavailableError, NotImplementedError)) or "No available kernel" in text \
        or "not supported" in text.lower()


def run_case(case: Case, dtype, opts: Options, ceilings: dict, publish: Optional[Callable[[dict], Any]] = None,
             deadline: Optional[float] = None) -> list[dict]:
    """Time every implementation of ``case`` in every pass; then its memory and its errors.

    ``publish(row)`` is called with each row as soon as it is timed (or skipped, or failed), so a
    case cut short (SIGTERM) still leaves what it timed with the caller; the memory and error
    columns are filled into the same row objects later. No implementation is started once
    ``deadline`` (time.monotonic()) has passed: its rows are skipped, "time limit"; the memory and
    error checks of what was timed still run (a timed fused row needs its verdict)."""
    opts = dataclasses.replace(opts, passes=case.passes(opts.passes))
    if not opts.passes:
        return []
    device = opts.device
    impls = case.impls(device, dtype, backend_choices(case, device, dtype, opts.backends), opts.baselines, opts.seed)
    rows: dict[tuple[str, str], dict] = {}
    too_big = case.eager_bytes(dtype) > memory_limit(device)
    for impl in impls:
        if impl.skip is None and too_big and (impl.kind == "baseline" and impl.name in ("eager", "compile", "sdpa-math")
                                              or impl.name == "reference"):
            impl.skip = f"would need ~{case.eager_bytes(dtype) / 2**30:.0f} GiB (materialises the score matrix)"
    sets = make_sets(case, device, dtype, opts.seed)
    n_sets = len(sets)
    douts: list = []

    published: set = set()

    def land(name, passes):
        for pass_ in passes:
            if publish is not None and (name, pass_) not in published:
                published.add((name, pass_))
                publish(rows[name, pass_])

    ceiling = ceilings.get("matmul_tflops", {}).get(_dt(dtype)) if case.unit == "TFLOP/s" else ceilings.get("copy_gbs")
    for impl in impls:
        for pass_ in opts.passes:
            rows[impl.name, pass_] = _row(case, dtype, impl, pass_, n_sets=n_sets, ceiling=ceiling)
        if impl.skip is None and deadline is not None and time.monotonic() >= deadline:
            impl.skip = "time limit (--max-minutes)"
        if impl.skip is not None:
            for pass_ in opts.passes:
                rows[impl.name, pass_].update(status="skipped", reason=impl.skip)
            land(impl.name, opts.passes)
            continue
        try:
            with impl.context():
                out0 = impl.fn(*sets[0])
                if not douts:
                    douts.extend(make_douts(out0, n_sets, opts.seed))
                dts = douts
                del out0
                for pass_ in opts.passes:
                    call = _make_call(impl, sets, dts, pass_)
                    timing = time_calls(call, n_sets, device, opts.budget_s, opts.min_reps, opts.max_reps)
                    del call
                    times = timing.times
                    median = statistics.median(times)
                    work = case.work(pass_, dtype)
                    scale = 1e12 if case.unit == "TFLOP/s" else 1e9
                    throughput = work / median / scale
                    cuda = device.type == "cuda"  # on CPU the host time is the time
                    rows[impl.name, pass_].update(median_ms=median * 1e3, min_ms=min(times) * 1e3, reps=len(times),
                                                  host_ms=statistics.median(timing.host) * 1e3 if cuda else None,
                                                  prefilled=timing.prefilled if cuda else None,
                                                  throughput=throughput,
                                                  ceiling_frac=throughput / ceiling if ceiling else None)
                    land(impl.name, [pass_])
        except Exception as exc:  # noqa: BLE001 - a failing implementation must not stop the sweep
            status = "skipped" if impl.kind == "baseline" and _is_refusal(exc) else \
                "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
            for pass_ in opts.passes:
                if rows[impl.name, pass_]["median_ms"] is None:
                    rows[impl.name, pass_].update(status=status, reason=_short(exc))
            if status == "error":
                rows[impl.name, opts.passes[0]]["traceback"] = traceback.format_exc(limit=6)
            impl.skip = _short(exc)
            _free(device)
        land(impl.name, opts.passes)
    if opts.memory:
        _measure_memory(impls, sets, douts, rows, opts)
    del sets
    _free(device)
    _measure_errors(case, dtype, impls, rows, opts)
    return list(rows.values())


def _make_call(impl: Impl, sets, douts, pass_) -> Callable[[int], Any]:
    fn, params = impl.fn, impl.params
    if pass_ == "fwd":
        return lambda i: fn(*sets[i])
    if pass_ == "infer":
        def infer(i):
            with torch.no_grad():
                return fn(*sets[i])
        return infer
    if pass_ == "fwd+bwd":
        return lambda i: _grads(fn(*sets[i]), list(sets[i]) + params, douts[i])
    # backward alone: one retained graph per input set, differentiated again and again
    outs = [fn(*s) for s in sets]
    return lambda i: _grads(outs[i], list(sets[i]) + params, douts[i], retain=True)


def _measure_memory(impls, sets, douts, rows, opts):
    device = opts.device
    jobs = [(impl, pass_) for impl in impls if impl.skip is None for pass_ in opts.passes]
    if not jobs or not douts:
        return
    if device.type == "cuda":
        for impl, pass_ in jobs:
            try:
                with impl.context():
                    call = _make_call(impl, sets, douts, pass_)
                    _sync(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                    call(0)
                    _sync(device)
                    rows[impl.name, pass_]["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                    del call
            except Exception:  # noqa: BLE001 - memory is reported n/a then
                _free(device)
        return
    try:
        with CpuMemoryProbe() as probe:
            for impl, pass_ in jobs:
                with impl.context():
                    call = _make_call(impl, sets, douts, pass_)
                    with probe.region(f"{impl.name}|{pass_}"):
                        call(0)
                    del call
        for label, peak in probe.peaks().items():
            name, pass_ = label.split("|")
            rows[name, pass_]["peak_mem_mib"] = peak / 2**20
    except Exception as exc:  # noqa: BLE001 - the profiler is optional; memory is then n/a
        print(f"fused_attn.bench: CPU memory profiling failed ({_short(exc)}); peak memory n/a", file=sys.stderr)


#: the name of a case's own oracle yardstick (``Case.oracle_fn``) in the error check: no row has it
ORACLE = "oracle-reference"


def _reference64(eager: Impl):
    """The eager reference in float64: the same function, or a float64 copy of the same module."""
    if isinstance(eager.fn, torch.nn.Module):
        module = copy.deepcopy(eager.fn).double()
        return module, [p for _, p in module.named_parameters()]
    return eager.fn, []


def _measure_errors(case, dtype, impls, rows, opts):
    """Max |impl - float64 reference| of the output and of every gradient, on ``case.check_case()``
    (the same inner sizes with fewer rows), and the project's oracle (testing.compare): error
    <= k * error of the reference in ``dtype`` (the eager baseline, or the case's ``oracle_fn``)
    + floor, k = 2 for outputs and 5 for gradients."""
    device = opts.device
    check = case.check_case()
    runnable = [i for i in impls if i.skip is None]
    if not runnable:
        return
    # torch.compile would compile again for the check's shape: check it only where the shape is the
    # same. The eager reference in the low precision is always run: the oracle's yardstick.
    names = {i.name for i in runnable if not (i.name == "compile" and check != case)} | {"eager"}
    # the impls are built by backend name; "triton-tma" (--tma-twin) is built with its base, "triton"
    bases = {TMA_TWIN_OF.get(n, n) for n in names}
    try:
        check_impls = {i.name: i for i in check.impls(device, dtype, [(n, None) for n in bases if n in BACKENDS],
                                                      sorted(set(opts.baselines) | {"eager"}), opts.seed)
                       if i.name in names}
        # the float64 reference runs on exactly the low-precision inputs (and weights), upcast, as
        # testing.check_against_reference does: the error is the computation's, not the inputs' rounding
        oracle_fn = check.oracle_fn()
        yardstick = check_impls["eager"] if oracle_fn is None else Impl(ORACLE, "baseline", oracle_fn)
        yard_label = "eager reference" if oracle_fn is None else "library's reference"
        ref_fn, ref_params = _reference64(yardstick)
        inputs64 = [t.detach().double().requires_grad_(True) for t in check.make_inputs(device, dtype, opts.seed)]
        out64 = ref_fn(*inputs64)
        gen = torch.Generator().manual_seed(opts.seed + 2000)
        dout = torch.randn(out64.shape, generator=gen).to(device=device, dtype=dtype)
        grads64 = _grads(out64, inputs64 + ref_params, dout.double())
    except Exception as exc:  # noqa: BLE001
        # without the float64 reference no fused row that ran can be judged: that is a failure of
        # the run (exit status 1), not a silent pass
        _no_verdict(rows, names, opts.passes, f"error check failed: float64 reference: {_short(exc)}")
        return
    results = {}
    impl_kinds = {name: impl.kind for name, impl in check_impls.items()}
    low_error = "not built"
    for name, impl in list(check_impls.items()) + ([(ORACLE, yardstick)] if oracle_fn is not None else []):
        try:
            with impl.context():
                inputs = check.make_inputs(device, dtype, opts.seed)
                out = impl.fn(*inputs)
                grads = _grads(out, inputs + impl.params, dout.to(out.dtype))
                out_infer = None
                if "infer" in opts.passes:  # the no-grad forward may take another path (LayerNorm does)
                    with torch.no_grad():
                        out_infer = impl.fn(*inputs)
            results[name] = (out.detach(), [g for g in grads], out_infer)
        except Exception as exc:  # noqa: BLE001
            # a fused backend that raises on the check's inputs fails the oracle (it ran the timed
            # shape, so the error check is the only place this shows)
            _no_verdict(rows, [name], opts.passes, f"error check failed: {_short(exc)}")
            if name == yardstick.name:
                low_error = _short(exc)
    low = results.get(yardstick.name)
    if low is None:  # the oracle's yardstick is missing: no fused row can be judged
        _no_verdict(rows, [n for n in names if n != "eager"], opts.passes,
                    f"error check failed: the {yard_label} in {_dt(dtype)}: {low_error}")
    for name, (out, grads, out_infer) in results.items():
        if (name, opts.passes[0]) not in rows:
            continue
        err_out = _max_abs(out, out64)
        err_infer = None if out_infer is None else _max_abs(out_infer, out64)
        pairs = [(g, g64) for g, g64 in zip(grads, grads64) if g is not None and g64 is not None]
        err_grad = max((_max_abs(g, g64) for g, g64 in pairs), default=0.0)
        fused = impl_kinds.get(name) == "fused"  # by the impl's kind: the TMA twin is no BACKENDS key
        verdict, detail = "", ""
        if low is not None and fused:
            try:
                compare("output", out, out64, low[0], k=K_FORWARD)
                if out_infer is not None:
                    compare("no-grad output", out_infer, out64, low[0], k=K_FORWARD)
                for j, (g, g64, glow) in enumerate(zip(grads, grads64, low[1])):
                    # autograd.grad(allow_unused=True) gives None for an input the output does not
                    # depend on: a gradient missing on one side only is a wrong backward
                    if (g is None) != (g64 is None):
                        raise AssertionError(f"grad of input {j}: {'none' if g is None else 'a gradient'} where "
                                             f"the float64 reference gives {'none' if g64 is None else 'one'}")
                    if g is None:
                        continue
                    if glow is None:
                        raise AssertionError(f"grad of input {j}: the {yard_label} in {_dt(dtype)} gives none "
                                             "(no yardstick)")
                    compare(f"grad of input {j}", g, g64, glow, k=K_GRAD)
                verdict = "ok"
            except AssertionError as exc:
                verdict, detail = "FAIL", str(exc)
        for pass_ in opts.passes:
            rows[name, pass_].update(err_out=err_infer if pass_ == "infer" else err_out, err_grad=err_grad)
            if low is not None:  # else _no_verdict above said why
                rows[name, pass_].update(oracle=verdict, oracle_detail=detail)
        if verdict == "FAIL":
            rows[name, opts.passes[0]]["status_note"] = detail
    # a fused row that ran leaves with a verdict, whatever path above missed it
    for name in names:
        for pass_ in opts.passes:
            row = rows.get((name, pass_))
            if row is not None and row["kind"] == "fused" and not row["oracle"]:
                row.update(oracle="FAIL", oracle_detail="error check failed: no verdict reached")


def _no_verdict(rows, names, passes, detail):
    """The error check could not judge ``names``: their fused rows FAIL the oracle with ``detail``
    (the run's exit status is then 1); a baseline's rows only record the detail."""
    for name in names:
        for pass_ in passes:
            row = rows.get((name, pass_))
            if row is None:
                continue
            if row["kind"] == "fused":
                row.update(oracle="FAIL", oracle_detail=detail)
            else:
                row["oracle_detail"] = detail


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def triton_autotuner_choices() -> dict:
    """What each Triton autotuner picked in this process: {kernel: [{"key": ..., "config": ...}]},
    the configuration kept for every key (shapes rounded, flags) it was called with. Written to
    bench.json so that a GPU run says which tiles its rows ran on."""
    try:
        from .triton import attention as triton_attention
        from .triton import feed_forward as triton_feed_forward
    except Exception:  # noqa: BLE001 - no Triton: nothing was tuned
        return {}
    tuners = {f"attention_{name}": fn for name, fn in triton_attention._tuned.items()}
    tuners["feed_forward_gemm"] = triton_feed_forward._ffn_gemm_tuned
    out = {}
    for name, tuner in tuners.items():
        cache = getattr(tuner, "cache", None) or {}
        if cache:
            out[name] = [{"key": [str(k) for k in key], "config": str(cfg)} for key, cfg in cache.items()]
    return out


def add_speedups(rows: list[dict]):
    """speedup[b] = time of baseline b / time of the row, for the baselines of the same case."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["kind"] == "baseline" and r["median_ms"]:
            groups.setdefault((r["op"], r["pass"], r["shape"], r["dtype"]), {})[r["impl"]] = r["median_ms"]
    for r in rows:
        base = groups.get((r["op"], r["pass"], r["shape"], r["dtype"]), {})
        r["speedup"] = {b: t / r["median_ms"] for b, t in base.items()} if r["median_ms"] else {}


# =============================================================================================
# ceilings and the machine
# =============================================================================================

def measure_ceilings(device: torch.device, dtypes, shapes: str, budget_s: float) -> dict:
    """The device's measured ceilings: TFLOP/s of a large square matmul per dtype (random
    operands, rotated), GB/s of a large device copy (bytes read + bytes written)."""
    cuda = device.type == "cuda"
    result = {"matmul_tflops": {}, "matmul_n": {}, "copy_gbs": None, "copy_bytes": None}
    for dtype in dtypes:
        n = (8192 if _itemsize(dtype) <= 2 else 4096) if cuda else \
            {"tiny": 256, "quick": 1024, "full": 2048}[shapes] // (1 if dtype in (torch.float32, torch.float64) else 2)
        gen = torch.Generator().manual_seed(0)
        mats = [torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(4)]
        try:
            times = time_calls(lambda i: mats[2 * (i % 2)] @ mats[2 * (i % 2) + 1], 2, device, budget_s, 3, 100).times
            result["matmul_tflops"][_dt(dtype)] = 2 * n**3 / statistics.median(times) / 1e12
            result["matmul_n"][_dt(dtype)] = n
        except Exception as exc:  # noqa: BLE001
            print(f"fused_attn.bench: matmul ceiling for {_dt(dtype)} failed: {_short(exc)}", file=sys.stderr)
        del mats
    numel = (1 << 29) if cuda else {"tiny": 1 << 20, "quick": 1 << 25, "full": 1 << 26}[shapes]
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda i: dst.copy_(src), 1, device, budget_s, 3, 100).times
    result["copy_bytes"] = 2 * numel * 4
    result["copy_gbs"] = 2 * numel * 4 / statistics.median(times) / 1e9
    del src, dst
    _free(device)
    return result


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": str(device), "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    from . import __version__, available_backends, extension_error
    info["fused_attn"] = __version__
    info["extension_error"] = extension_error()
    info["backends"] = {n: ("available" if b["available"] else "; ".join(b["reasons"]))
                        for n, b in available_backends().items()}
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                            cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        info["git_commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_sms=props.multi_processor_count, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    info["device_name"] = info.get("gpu") or info["cpu"]
    return info


# =============================================================================================
# output: table, JSON, CSV, plots
# =============================================================================================

def _fmt(value, spec):
    return "" if value is None else format(value, spec)


def format_table(rows: list[dict], op: str) -> str:
    """One op's rows: shape, dtype, pass, impl, time, throughput, % of ceiling, speedups, error,
    memory (the best SDPA backend stands for SDPA on GPUs; the JSON/CSV have each)."""
    rows = [r for r in rows if r["op"] == op]
    if not rows:
        return ""
    unit = rows[0]["unit"]
    has_sdpa = any(r["impl"].startswith("sdpa") for r in rows)
    has_host = any(r.get("host_ms") is not None for r in rows)
    has_compile = any(r["impl"] == "compile" for r in rows)  # --quick and --baselines may leave it out
    head = ["shape", "dtype", "pass", "impl", "ms"] + (["host ms"] if has_host else []) + [unit, "%ceil", "x eager"] + \
        (["x sdpa"] if has_sdpa else []) + (["x compile"] if has_compile else []) + ["err", "oracle", "MiB", "note"]
    lines = []
    for r in rows:
        sp = r["speedup"]
        sdpa = [v for k, v in sp.items() if k.startswith("sdpa")]
        err = r["err_out"] if r["pass"] in ("fwd", "infer") else r["err_grad"]
        note = "" if r["status"] == "ok" else f"{r['status']}: {r['reason']}"[:60]
        if r["status"] == "ok" and r.get("prefilled") is False:
            note = "GPU idled between calls: ms includes host time"
        cells = [r["shape"], r["dtype"], r["pass"], r["impl"], _fmt(r["median_ms"], ".3f")] + \
            ([_fmt(r.get("host_ms"), ".3f")] if has_host else []) + [
                 _fmt(r["throughput"], ".3g"),
                 _fmt(None if r["ceiling_frac"] is None else 100 * r["ceiling_frac"], ".0f"),
                 _fmt(sp.get("eager"), ".2f")] + ([_fmt(min(sdpa) if sdpa else None, ".2f")] if has_sdpa else []) + \
            ([_fmt(sp.get("compile"), ".2f")] if has_compile else []) + [_fmt(err, ".1e"), r["oracle"],
             _fmt(r["peak_mem_mib"], ".3g"), note]
        lines.append(cells)
    return _render(head, lines, title=f"== {op} ==")


def _render(head, lines, title=None):
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    out = [title] if title else []
    out.append("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines)
    return "\n".join(out)


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def implausible_timings(rows: list[dict]) -> list[str]:
    """Rows whose timings cannot be right, which a noisy machine produces (a thread waking late in
    one call, the clock's steps): faster than the measured ceiling by over 10 %, or a forward +
    backward faster than its forward or its backward alone (same case, dtype and implementation)."""
    out = [f"{r['op']} {r['shape']} {r['pass']} {r['impl']}: {100 * r['ceiling_frac']:.0f} % of the ceiling"
           for r in rows if r["status"] == "ok" and r.get("ceiling_frac") and r["ceiling_frac"] > 1.1]
    ms = {(r["op"], r["shape"], r["dtype"], r["impl"], r["pass"]): r["median_ms"] for r in rows
          if r["status"] == "ok" and r.get("median_ms")}
    for (op, shape, dtype, impl, pass_), both in ms.items():
        if pass_ != "fwd+bwd":
            continue
        parts = [ms.get((op, shape, dtype, impl, p)) for p in ("fwd", "bwd")]
        slower = [t for t in parts if t is not None and t > 1.1 * both]
        if slower:
            out.append(f"{op} {shape} {impl}: fwd+bwd {both:.3g} ms below a single pass's {max(slower):.3g} ms")
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Per op, pass, dtype and implementation: shapes run, geometric-mean speedup over the eager
    reference and over the fastest baseline of each shape, median fraction of the ceiling,
    the largest error and the oracle failures."""
    keys = []
    for r in rows:
        key = (r["op"], r["pass"], r["dtype"], r["impl"])
        if key not in keys:
            keys.append(key)
    summary = []
    for op, pass_, dtype, impl in keys:
        mine = [r for r in rows if (r["op"], r["pass"], r["dtype"], r["impl"]) == (op, pass_, dtype, impl)]
        ok = [r for r in mine if r["status"] == "ok"]
        vs_best = []
        for r in ok:
            others = [v for k, v in r["speedup"].items() if k != impl]
            if others:
                vs_best.append(min(others))
        errs = [r["err_out"] if pass_ in ("fwd", "infer") else r["err_grad"] for r in ok]
        errs = [e for e in errs if e is not None]
        fracs = [r["ceiling_frac"] for r in ok if r["ceiling_frac"] is not None]
        summary.append({"op": op, "pass": pass_, "dtype": dtype, "impl": impl, "kind": mine[0]["kind"],
                        "shapes": len(mine), "ok": len(ok),
                        "speedup_vs_eager": _geomean([r["speedup"].get("eager") for r in ok]) if impl != "eager" else None,
                        "speedup_vs_best_baseline": _geomean(vs_best),
                        "ceiling_frac": statistics.median(fracs) if fracs else None,
                        "host_bound": sum(1 for r in ok if r.get("host_ms") and r["host_ms"] > r["median_ms"]),
                        "max_err": max(errs) if errs else None,
                        "oracle_fails": sum(r["oracle"] == "FAIL" for r in mine),
                        "oracle_ok": sum(r["oracle"] == "ok" for r in ok),
                        "errors": sum(r["status"] in ("error", "oom") for r in mine)})
    return summary


def _oracle_cell(s: dict) -> str:
    """The summary's oracle column of a fused line: "ok" only when every shape that ran met the
    oracle; "n/a" when some ran without a verdict (or none ran)."""
    if s["oracle_fails"]:
        return f"{s['oracle_fails']} FAIL"
    ok = s.get("oracle_ok")  # summaries written before the count existed have none
    return "ok" if s["ok"] and (ok is None or ok == s["ok"]) else "n/a"


def format_summary(summary: list[dict], ceilings: dict, machine: dict) -> str:
    gpu = str(machine.get("device", "")).startswith("cuda")
    head = ["op", "pass", "dtype", "impl", "ran", "x eager", "x best baseline", "%ceil"] + \
        (["host-bound"] if gpu else []) + ["max err", "oracle", "errors"]
    lines = []
    for s in summary:
        if s["kind"] != "fused" and s["impl"] != "eager":
            continue  # the summary shows the fused backends (and the eager line for its error)
        lines.append([s["op"], s["pass"], s["dtype"], s["impl"], f"{s['ok']}/{s['shapes']}",
                      _fmt(s["speedup_vs_eager"], ".2f"), _fmt(s["speedup_vs_best_baseline"], ".2f"),
                      _fmt(None if s["ceiling_frac"] is None else 100 * s["ceiling_frac"], ".0f")] +
                     ([f"{s.get('host_bound', 0)}/{s['ok']}"] if gpu else []) +
                     [_fmt(s["max_err"], ".1e"),
                      "" if s["kind"] != "fused" else _oracle_cell(s),
                      str(s["errors"] or "")])
    mm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in ceilings.get("matmul_tflops", {}).items())
    title = (f"== summary: {machine['device_name']} | torch {machine['torch']} | triton {machine.get('triton')} | "
             f"{machine['date']} ==\nceilings: matmul {mm}; copy {_fmt(ceilings.get('copy_gbs'), '.3g')} GB/s\n"
             "x eager / x best baseline: geometric mean over shapes of the speedup over the eager reference / over "
             "the fastest baseline of each shape; %ceil: median fraction of the measured ceiling" +
             ("; host-bound: shapes whose host time per call exceeds the device time (times are device times)"
              if gpu else ""))
    if not lines:
        return title + "\n(no fused backend ran)"
    return _render(head, lines, title=title)


CSV_FIELDS = ["op", "pass", "shape", "dtype", "impl", "kind", "status", "median_ms", "min_ms", "host_ms", "prefilled",
              "reps", "n_sets", "work", "unit", "throughput", "ceiling", "ceiling_frac"]
CSV_TAIL = ["err_out", "err_grad", "oracle", "peak_mem_mib", "reason", "device_name", "torch", "triton", "date"]


def write_csv(path, rows, machine):
    baselines = sorted({b for r in rows for b in r["speedup"]})
    fields = CSV_FIELDS + [f"speedup_vs_{b}" for b in baselines] + CSV_TAIL
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            flat = dict(r)
            flat.update({f"speedup_vs_{b}": v for b, v in r["speedup"].items()})
            flat.update({k: machine.get(k) for k in ("device_name", "torch", "triton", "date")})
            writer.writerow(flat)


def write_json(path, payload):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)


def plain_attention_rows(rows, pass_) -> list:
    """The rows the attention plots draw: dense attention without a window, ALiBi or sinks (those
    cases share the plain rows' (dtype, D, causal, L) and would land on their curves; windowed,
    ALiBi, sink and packed (varlen) cases are left to the tables)."""
    return [r for r in rows if r["op"] == "attention" and r["pass"] == pass_ and r["status"] == "ok"
            and "L" in r["params"] and not any(r["params"].get(k) for k in ("window", "alibi", "sinks"))]


def plot_attention(rows, out_dir) -> list[str]:
    """Throughput vs sequence length, one line per implementation, one panel per
    (dtype, head dim, causal); one PNG for the forward and one for forward + backward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for pass_, fname in (("fwd", "attention_fwd.png"), ("fwd+bwd", "attention_fwd_bwd.png")):
        mine = plain_attention_rows(rows, pass_)
        if not mine:
            continue
        panels = sorted({(r["dtype"], r["params"]["D"], r["params"]["causal"]) for r in mine})
        cols = min(2, len(panels))
        nrows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(6.4 * cols, 4.2 * nrows), squeeze=False)
        fused = {r["impl"] for r in mine if r["kind"] == "fused"}  # "triton-tma" too, which is no BACKENDS key
        impls = sorted({r["impl"] for r in mine}, key=lambda n: (n not in fused, n))
        for ax, (dtype, D, causal) in zip(axes.flat, panels):
            for impl in impls:
                pts = sorted((r["params"]["L"], r["throughput"]) for r in mine
                             if r["impl"] == impl and (r["dtype"], r["params"]["D"], r["params"]["causal"]) == (dtype, D, causal))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            linewidth=2.2 if impl in fused else 1.2, label=impl)
            ax.set_xscale("log", base=2)
            lengths = sorted({r["params"]["L"] for r in mine})
            ax.set_xticks(lengths, [f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n) for n in lengths])
            ax.minorticks_off()
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"{dtype}, head dim {D}, {'causal' if causal else 'not causal'}")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        device_name = mine[0].get("device_name", "")
        fig.suptitle(f"attention {'forward' if pass_ == 'fwd' else 'forward + backward'}: {device_name}, "
                     f"torch {torch.__version__}, {datetime.date.today().isoformat()}")
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# =============================================================================================
# main
# =============================================================================================

def _split(text):
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    intro, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="python -m fused_attn.bench", description=intro, epilog=rest,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="quick sweep: few shapes, short timing budget, no torch.compile (< 2 min on 2 CPU cores)")
    p.add_argument("--shapes", choices=SHAPE_SETS, default=None,
                   help="shape set (default: quick with --quick, else full; tiny is a smoke test)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)}")
    p.add_argument("--dtype", default=None, help="comma list (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--backend", default="all",
                   help="comma list of fused backends to time (default all: every backend that takes the call; "
                        "'reference' only where nothing else does); 'none' for baselines only")
    p.add_argument("--baselines", default=None,
                   help="comma list of eager, sdpa, compile (default: all; compile is left out with --quick)")
    p.add_argument("--passes", default=",".join(PASSES),
                   help="comma list of fwd, bwd, fwd+bwd, infer (the forward under torch.no_grad)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", default="bench_out", help="output folder (default bench_out)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed calls per measurement")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting new cases after this long (each op gets a share), and new implementations "
                        "within a case once it is all spent; the outputs are still written")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice); 1 gives steadier numbers on a busy machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tma-twin", action="store_true",
                   help="on sm_90+ also time 'triton-tma' (the Triton backend with FUSED_ATTN_TRITON_TMA=auto)")
    return p.parse_args(argv)


def _usage_error(message: str) -> SystemExit:
    """A bad command-line value, as argparse treats its own: the one-line message on stderr and
    exit status 2. The SystemExit also carries the message, for callers of main() that catch it."""
    print(message, file=sys.stderr, flush=True)
    exc = SystemExit(message)
    exc.code = 2  # an int code: the interpreter exits with it and prints nothing more
    return exc


def _device_from_flag(value: str | None) -> torch.device:
    if value is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise _usage_error(f"--device {value}: unknown device (expected cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("torch is a CPU-only build" if torch.version.cuda is None and torch.version.hip is None
                   else "torch.cuda.is_available() is False")
            raise _usage_error(f"--device {value}: no CUDA device ({why})")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise _usage_error(f"--device {value}: no such device (expected an index below {count})")
    return device


def main(argv=None) -> int:
    args = parse_args(argv)
    global TMA_TWIN
    TMA_TWIN = args.tma_twin
    device = _device_from_flag(args.device)
    if args.threads is not None:
        if args.threads < 1:
            raise _usage_error(f"--threads {args.threads}: expected a positive number of threads")
        torch.set_num_threads(args.threads)
    shapes = args.shapes or ("quick" if args.quick else "full")
    dtype_names = _split(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    bad = [d for d in dtype_names if d not in DTYPE_NAMES]
    if bad:
        raise _usage_error(f"--dtype: unknown {', '.join(bad)} (choose from {', '.join(DTYPE_NAMES)})")
    dtypes = [getattr(torch, d) for d in dtype_names]
    ops = _split(args.ops)
    passes = _split(args.passes)
    for name, values, allowed in (("--ops", ops, OPS), ("--passes", passes, ALL_PASSES)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise _usage_error(f"{name}: unknown {', '.join(bad)} (choose from {', '.join(allowed)})")
    backends = None if args.backend == "all" else ([] if args.backend == "none" else _split(args.backend))
    unknown = [b for b in backends or [] if b not in BACKENDS]
    if unknown:
        raise _usage_error(f"--backend: unknown {', '.join(unknown)} (choose from {', '.join(BACKENDS)}, all, none)")
    if backends:  # asked for fused backends only this machine cannot run: say so, rather than time baselines alone
        from .backends import available_backends
        status = available_backends()
        if not any(status[b]["available"] for b in backends):
            raise _usage_error("--backend: " + "; ".join(f"{b} cannot run here: {', '.join(status[b]['reasons'])}"
                                                       for b in backends))
    if args.baselines is None:
        baselines = [b for b in BASELINES if not (b == "compile" and (args.quick or shapes == "tiny"))]
    else:
        baselines = [] if args.baselines == "none" else _split(args.baselines)
        bad = [b for b in baselines if b not in BASELINES]
        if bad:
            raise _usage_error(f"--baselines: unknown {', '.join(bad)} (choose from {', '.join(BASELINES)}, none)")
    quickish = args.quick or shapes in ("tiny", "quick")
    gpu = device.type == "cuda"
    budget = args.budget if args.budget is not None else (0.1 if gpu else 0.2 if quickish else 0.6)
    opts = Options(device=device, dtypes=dtypes, ops=ops, passes=passes, backends=backends, baselines=baselines,
                   shapes=shapes, budget_s=budget, min_reps=10 if gpu else 3, max_reps=1000 if gpu else 200,
                   memory=not args.no_memory, seed=args.seed)
    os.makedirs(args.out, exist_ok=True)
    started = time.monotonic()
    machine = machine_info(device)
    print(f"fused_attn.bench on {machine['device_name']} ({device}), torch {machine['torch']}, "
          f"triton {machine['triton']}; shapes {shapes}, dtypes {', '.join(map(_dt, dtypes))}, "
          f"baselines {', '.join(baselines) or 'none'}", flush=True)
    ceilings = measure_ceilings(device, dtypes, shapes, min(budget * 2, 1.0))
    mm = ", ".join(f"{k} {v:.3g} TFLOP/s" for k, v in ceilings["matmul_tflops"].items())
    print(f"ceilings: matmul {mm}; copy {ceilings['copy_gbs']:.3g} GB/s", flush=True)

    plan = [(op, case, dtype) for op in ops for case in shape_set(op, shapes, device.type) for dtype in dtypes]
    rows: list[dict] = []
    not_run: list[str] = []
    payload = {"machine": machine, "ceilings": ceilings, "config": vars(args) | {"shapes": shapes,
               "baselines": baselines, "budget_s": budget}, "rows": rows, "not_run": not_run, "summary": []}
    if "layer" in ops:
        payload["config"]["fused_layer"] = ("fused_attn.TransformerLayer" if fused_layer_class() is not None else
                                            "the reference TransformerLayer on the fused functional ops")
        print(f"layer: fused rows run {payload['config']['fused_layer']}", flush=True)
    json_path, csv_path = os.path.join(args.out, "bench.json"), os.path.join(args.out, "bench.csv")
    op_deadline = None
    # --max-minutes: no case starts after its op's share of the time is spent (op_deadline), and
    # no implementation within a case after the whole budget is (sweep_deadline)
    sweep_deadline = None if args.max_minutes is None else started + args.max_minutes * 60
    progress = _progress(len(plan))
    current_op = None
    case_rows: list[dict] = []

    def publish(row):  # run_case's rows join the payload as they are timed: SIGTERM keeps them
        row["device_name"] = machine["device_name"]
        rows.append(row)
        case_rows.append(row)

    with _stop_on_sigterm():
        index = 0
        try:
            for index, (op, case, dtype) in enumerate(plan):
                case_rows = []
                now = time.monotonic()
                if op != current_op:
                    if current_op is not None:
                        progress.write(format_table(rows, current_op))
                    current_op = op
                    if sweep_deadline is not None:
                        left = sweep_deadline - now
                        weights = [OP_TIME_WEIGHTS[o] for o in ops[ops.index(op):]]
                        op_deadline = now + max(0.0, left) * weights[0] / sum(weights)
                # >=: with the budget already spent the op's deadline is now itself
                if op_deadline is not None and now >= op_deadline:
                    not_run.append(f"{op} {case.label()} {_dt(dtype)}: time limit (--max-minutes)")
                    progress.update(f"{op} {case.label()} (skipped: time limit)")
                    continue
                progress.update(f"{op} {case.label()} {_dt(dtype)}")
                try:
                    run_case(case, dtype, opts, ceilings, publish=publish, deadline=sweep_deadline)
                except Exception as exc:  # noqa: BLE001 - building a case failed: record it, go on
                    publish(_row(case, dtype, Impl("(case)", "fused"), PASSES[0], status="error", reason=_short(exc),
                                 traceback=traceback.format_exc(limit=8)))
                    _free(device)
                add_speedups(rows)
                write_json(json_path, payload)
                write_csv(csv_path, rows, machine)
        except _Interrupted:
            # the case in progress keeps the rows it timed; its fused rows never reached the error
            # check: no verdict ("n/a" in the summary), and the reason says so
            for r in case_rows:
                if r["kind"] == "fused" and r["status"] == "ok" and not r["oracle"]:
                    r["oracle_detail"] = "not checked: interrupted (SIGTERM) before the error check"
            kept = f", {len(case_rows)} row(s) kept" if case_rows else ""
            not_run.extend(f"{o} {c.label()} {_dt(d)}: interrupted (SIGTERM){'' if j else kept}"
                           for j, (o, c, d) in enumerate(plan[index:]))
            print("fused_attn.bench: SIGTERM: stopping, writing what was measured", file=sys.stderr, flush=True)
    progress.close()
    if current_op is not None:
        print(format_table(rows, current_op), flush=True)
    add_speedups(rows)
    payload["summary"] = summarize(rows)
    payload["triton_autotuner_choices"] = triton_autotuner_choices()
    payload["elapsed_s"] = round(time.monotonic() - started, 1)
    write_json(json_path, payload)
    write_csv(csv_path, rows, machine)
    written = [json_path, csv_path]
    if not args.no_plots:
        try:
            written += plot_attention(rows, args.out)
        except Exception as exc:  # noqa: BLE001
            print(f"fused_attn.bench: plotting failed: {_short(exc)}", file=sys.stderr)
    failures = [r for r in rows if r["kind"] == "fused" and (r["status"] in ("error", "oom") or r["oracle"] == "FAIL")]
    for r in failures:
        if r.get("traceback"):
            print(f"\n{r['op']} {r['shape']} {r['impl']}: {r['traceback']}", file=sys.stderr)
    print(f"\nwrote {', '.join(written)} in {payload['elapsed_s']:.0f} s", flush=True)
    if not_run:
        print(f"not run: {len(not_run)} case(s) ({not_run[0].split(': ')[-1]})")
    print()
    print(format_summary(payload["summary"], ceilings, machine))
    suspect = implausible_timings(rows)
    payload["implausible_timings"] = suspect
    if suspect:
        write_json(json_path, payload)
        print(f"\nwarning: {len(suspect)} timing(s) are implausible ({suspect[0]}{'; ...' if len(suspect) > 1 else ''}): "
              f"this machine's timings are noisy; compare ratios measured alternately, or rerun with --threads 1")
    if failures:
        def why(r):
            if r["status"] != "ok":
                return f"{r['status']}: {r['reason']}"
            return f"oracle FAIL: {' '.join(r['oracle_detail'].split())[:200]}"
        print(f"\n{len(failures)} fused row(s) failed (error or oracle FAIL): "
              + "; ".join(f"{r['op']} {r['shape']} {r['pass']} {r['impl']}: {why(r)}" for r in failures[:8]))
        return 1
    return 0


class _Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop measuring, write the outputs."""


@contextlib.contextmanager
def _stop_on_sigterm():
    """Within: the first SIGTERM raises _Interrupted (so what was measured is still written); the
    previous handler is restored on the way out."""
    import signal
    state = {"stop": False}

    def handler(signum, frame):
        if not state["stop"]:
            state["stop"] = True
            raise _Interrupted()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _configure_compile():
    """Settings for the torch.compile baselines: shapes and flags each make compile guard anew,
    so let them recompile; and turn off donated buffers, which forbid ``retain_graph=True`` --
    the backward pass is timed by differentiating one retained graph again and again."""
    try:
        from torch._dynamo import config
        for attr in ("cache_size_limit", "recompile_limit"):
            if hasattr(config, attr):
                setattr(config, attr, max(64, getattr(config, attr)))
        from torch._functorch import config as functorch_config
        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
    except Exception:  # noqa: BLE001 - compile still works without these
        pass


class _progress:
    """A tqdm bar on a terminal; plain lines on stderr otherwise (logs)."""

    def __init__(self, total):
        self.total, self.count, self.bar = total, 0, None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="case", dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def update(self, text):
        self.count += 1
        if self.bar is not None:
            self.bar.set_description_str(text[:60])
            self.bar.update(1)
        else:
            print(f"[{self.count}/{self.total}] {text}", file=sys.stderr, flush=True)

    def write(self, text):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
