"""No crash from the compiled ops: calling ``torch.ops.fused_attn_C.*`` directly, bypassing the
Python validation, with bad ranks, shapes, dtypes, strides or options raises an error
(TORCH_CHECK), never a segfault. The calls run in a subprocess, so a crash fails the test
instead of killing pytest."""
import json
import os
import subprocess
import sys

import pytest

import fused_attn
from fused_attn.ops_common import NO_BAND

pytestmark = pytest.mark.skipif(fused_attn.extension_error() is not None,
                                reason=f"fused_attn._C not available: {fused_attn.extension_error()}")

FUZZ = r'''
import json, math, random, torch
import fused_attn  # loads fused_attn._C
from fused_attn.ops_common import CAUSAL_BAND, NO_BAND
ops = torch.ops.fused_attn_C
f32, f64 = torch.float32, torch.float64
def t(*shape, dtype=f32):
    return torch.randn(*shape, dtype=dtype) if dtype.is_floating_point else torch.zeros(*shape, dtype=dtype)
q, k, v = t(1, 2, 5, 8), t(1, 2, 6, 8), t(1, 2, 6, 8)
out = torch.empty(1, 5, 2, 8).transpose(1, 2); lse = t(1, 2, 5)
x, r, w = t(4, 16), t(4, 16), t(16)
mean, rstd = t(4), t(4)
w1, w2, pre = t(32, 16), t(16, 32), t(4, 32)
def alibi_fwd(slopes, bottom_right=False):  # otherwise valid calls with these alibi_slopes
    return ops.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 1.0, 0, 0, 0.0, slopes, bottom_right)
def alibi_bwd(slopes, bottom_right=False):
    return ops.attention_bwd(out, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0, slopes, bottom_right)
# varlen: two sequences of (4, 5) queries and (5, 6) keys, packed
i32, i64 = torch.int32, torch.int64
def cu(*values, dtype=i32):
    return torch.tensor(values, dtype=dtype)
vq, vk, vv = t(9, 2, 8), t(11, 1, 8), t(11, 1, 6)
vout, vlse = t(9, 2, 6), t(2, 9)
def vfwd(q=vq, k=vk, v=vv, cq=cu(0, 4, 9), ck=cu(0, 5, 11), used=None, slopes=None, band=NO_BAND, p=0.0, softcap=0.0):
    return ops.attention_varlen_fwd(q, k, v, cq, ck, 5, 6, *band, False, p, 1.0, 0, 0, softcap, used, slopes)
def vbwd(dout=vout, out=vout, lse=vlse, cq=cu(0, 4, 9), ck=cu(0, 5, 11), used=None, slopes=None, dlse=None):
    return ops.attention_varlen_bwd(dout, vq, vk, vv, out, lse, cq, ck, 5, 6, *NO_BAND, False, 0.0, 1.0, 0, 0, 0.0,
                                    used, slopes, dlse)
cases = {
  "attn q 3-D": lambda: ops.attention_fwd(t(2, 5, 8), k, v, None, *NO_BAND, 0.0, 1.0, 0, 0),
  "attn mixed dtypes": lambda: ops.attention_fwd(q, k.double(), v, None, *NO_BAND, 0.0, 1.0, 0, 0),
  "attn head dim mismatch": lambda: ops.attention_fwd(q, t(1, 2, 6, 7), v, None, *NO_BAND, 0.0, 1.0, 0, 0),
  "attn kv length mismatch": lambda: ops.attention_fwd(q, k, t(1, 2, 7, 8), None, *NO_BAND, 0.0, 1.0, 0, 0),
  "attn batch mismatch": lambda: ops.attention_fwd(q, t(2, 2, 6, 8), t(2, 2, 6, 8), None, *NO_BAND, 0.0, 1.0, 0, 0),
  "attn heads not a multiple": lambda: ops.attention_fwd(t(1, 3, 5, 8), k, v, None, *NO_BAND, 0.0, 1.0, 0, 0),
  "attn integer inputs": lambda: ops.attention_fwd(q.int(), k.int(), v.int(), None, *NO_BAND, 0.0, 1.0, 0, 0),
  "attn mask wrong shape": lambda: ops.attention_fwd(q, k, v, t(1, 2, 5, 5), *NO_BAND, 0.0, 1.0, 0, 0),
  "attn mask 2-D": lambda: ops.attention_fwd(q, k, v, t(5, 6), *NO_BAND, 0.0, 1.0, 0, 0),
  "attn mask int dtype": lambda: ops.attention_fwd(q, k, v, torch.zeros(1, 2, 5, 6, dtype=torch.int32), *NO_BAND, 0.0, 1.0, 0, 0),
  "attn dropout 1.5": lambda: ops.attention_fwd(q, k, v, None, *NO_BAND, 1.5, 1.0, 0, 0),
  "attn band past int64": lambda: ops.attention_fwd(q, k, v, None, -2**63, 2**63, 0.0, 1.0, 0, 0),
  "attn band not an int": lambda: ops.attention_fwd(q, k, v, None, 0.5, 2, 0.0, 1.0, 0, 0),
  "attn softcap negative": lambda: ops.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 1.0, 0, 0, -1.0),
  "attn softcap nan": lambda: ops.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 1.0, 0, 0, float("nan")),
  "attn softcap inf": lambda: ops.attention_fwd(q, k, v, None, *NO_BAND, 0.0, 1.0, 0, 0, float("inf")),
  "attn alibi 1-D (Hq,)": lambda: alibi_fwd(t(2)),
  "attn alibi 3-D": lambda: alibi_fwd(t(1, 2, 1)),
  "attn alibi 0-D": lambda: alibi_fwd(t()),
  "attn alibi wrong heads": lambda: alibi_fwd(t(1, 3)),
  "attn alibi wrong batch": lambda: alibi_fwd(t(2, 2)),
  "attn alibi transposed shape": lambda: alibi_fwd(t(2, 1)),
  "attn alibi empty": lambda: alibi_fwd(t(0, 2)),
  "attn alibi float64": lambda: alibi_fwd(t(1, 2, dtype=f64)),
  "attn alibi float16": lambda: alibi_fwd(t(1, 2, dtype=torch.float16)),
  "attn alibi int64": lambda: alibi_fwd(t(1, 2, dtype=torch.int64)),
  "attn alibi bool": lambda: alibi_fwd(t(1, 2, dtype=torch.bool), True),
  "attn alibi meta": lambda: alibi_fwd(torch.empty(1, 2, device="meta")),
  "attn bwd alibi wrong shape": lambda: alibi_bwd(t(1, 3)),
  "attn bwd alibi wrong dtype": lambda: alibi_bwd(t(1, 2, dtype=f64), True),
  "attn bwd alibi 1-D": lambda: alibi_bwd(t(2)),
  "attn bwd dlse wrong shape": lambda: ops.attention_bwd(out, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0, None, False, t(1, 2, 4)),
  "attn bwd dlse float64": lambda: ops.attention_bwd(out, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0, None, False, t(1, 2, 5, dtype=f64)),
  "attn bwd dlse int64": lambda: ops.attention_bwd(out, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0, None, False, t(1, 2, 5, dtype=torch.int64)),
  "attn bwd dlse meta": lambda: ops.attention_bwd(out, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0, None, False, torch.empty(1, 2, 5, device="meta")),
  "attn bwd softcap negative": lambda: ops.attention_bwd(out, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False, -1.0),
  "attn bwd lse wrong shape": lambda: ops.attention_bwd(out, q, k, v, out, t(1, 2, 4), None, *NO_BAND, 0.0, 1.0, 0, 0, False),
  "attn bwd dout wrong shape": lambda: ops.attention_bwd(t(1, 2, 5, 7), q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False),
  "attn bwd out wrong dtype": lambda: ops.attention_bwd(out, q, k, v, out.double(), lse, None, *NO_BAND, 0.0, 1.0, 0, 0, False),
  "attn bwd mask_grad without mask": lambda: ops.attention_bwd(out, q, k, v, out, lse, None, *NO_BAND, 0.0, 1.0, 0, 0, True),
  "varlen q 4-D": lambda: vfwd(q=t(1, 9, 2, 8)),
  "varlen q 2-D": lambda: vfwd(q=t(9, 16)),
  "varlen mixed dtypes": lambda: vfwd(k=vk.double()),
  "varlen head dim mismatch": lambda: vfwd(k=t(11, 1, 7)),
  "varlen kv rows mismatch": lambda: vfwd(v=t(10, 1, 6)),
  "varlen kv heads mismatch": lambda: vfwd(v=t(11, 2, 6)),
  "varlen heads not a multiple": lambda: vfwd(q=t(9, 3, 8), k=t(11, 2, 8), v=t(11, 2, 6)),
  "varlen integer inputs": lambda: vfwd(vq.int(), vk.int(), vv.int()),
  "varlen meta q": lambda: vfwd(q=torch.empty(9, 2, 8, device="meta")),
  "varlen dropout 1.5": lambda: vfwd(p=1.5),
  "varlen softcap negative": lambda: vfwd(softcap=-1.0),
  "varlen cu float": lambda: vfwd(cq=cu(0, 4, 9).float()),
  "varlen cu bool": lambda: vfwd(cq=cu(0, 4, 9).bool()),
  "varlen cu 2-D": lambda: vfwd(cq=cu(0, 4, 9)[None]),
  "varlen cu 0-D": lambda: vfwd(cq=torch.tensor(0, dtype=i32)),
  "varlen cu empty": lambda: vfwd(cq=cu(), ck=cu()),
  "varlen cu meta": lambda: vfwd(cq=torch.empty(3, dtype=i32, device="meta")),
  "varlen cu lengths differ": lambda: vfwd(ck=cu(0, 11)),
  "varlen cu not from 0": lambda: vfwd(cq=cu(1, 4, 9)),
  "varlen cu decreasing": lambda: vfwd(cq=cu(0, 10, 9)),
  "varlen cu negative": lambda: vfwd(ck=cu(0, -5, 11, dtype=i64)),
  "varlen cu past total": lambda: vfwd(cq=cu(0, 4, 10)),
  "varlen cu short of total": lambda: vfwd(ck=cu(0, 5, 10)),
  "varlen cu huge": lambda: vfwd(ck=cu(0, 2**40, 11, dtype=i64)),
  "varlen seqused too long": lambda: vfwd(used=cu(6, 1)),
  "varlen seqused negative": lambda: vfwd(used=cu(1, -1)),
  "varlen seqused wrong length": lambda: vfwd(used=cu(1)),
  "varlen seqused float": lambda: vfwd(used=cu(1, 1).float()),
  "varlen seqused 2-D": lambda: vfwd(used=cu(1, 1)[None]),
  "varlen alibi (Hq,)": lambda: vfwd(slopes=t(2)),
  "varlen alibi one row": lambda: vfwd(slopes=t(1, 2)),
  "varlen alibi wrong heads": lambda: vfwd(slopes=t(2, 3)),
  "varlen alibi float64": lambda: vfwd(slopes=t(2, 2, dtype=f64)),
  "varlen alibi meta": lambda: vfwd(slopes=torch.empty(2, 2, device="meta")),
  "varlen bwd lse (total, Hq)": lambda: vbwd(lse=t(9, 2)),
  "varlen bwd lse float64": lambda: vbwd(lse=t(2, 9, dtype=f64)),
  "varlen bwd lse 3-D": lambda: vbwd(lse=t(1, 2, 9)),
  "varlen bwd dout wrong shape": lambda: vbwd(dout=t(9, 2, 8)),
  "varlen bwd out wrong dtype": lambda: vbwd(out=vout.double()),
  "varlen bwd out 4-D": lambda: vbwd(out=t(1, 9, 2, 6)),
  "varlen bwd dlse wrong shape": lambda: vbwd(dlse=t(2, 8)),
  "varlen bwd dlse float64": lambda: vbwd(dlse=t(2, 9, dtype=f64)),
  "varlen bwd dlse meta": lambda: vbwd(dlse=torch.empty(2, 9, device="meta")),
  "varlen bwd cu decreasing": lambda: vbwd(cq=cu(0, 10, 9)),
  "varlen bwd cu short of total": lambda: vbwd(ck=cu(0, 5, 10)),
  "varlen bwd seqused too long": lambda: vbwd(used=cu(5, 7)),
  "varlen bwd alibi wrong shape": lambda: vbwd(slopes=t(2, 1)),
  "ln x 1-D": lambda: ops.layer_norm_residual_fwd(t(16), None, None, None, 1e-5, 0.0, False, False, 0, 0),
  "ln x 3-D": lambda: ops.layer_norm_residual_fwd(t(2, 4, 16), None, None, None, 1e-5, 0.0, False, False, 0, 0),
  "ln residual shape": lambda: ops.layer_norm_residual_fwd(x, t(4, 15), w, None, 1e-5, 0.0, False, False, 0, 0),
  "ln weight size": lambda: ops.layer_norm_residual_fwd(x, r, t(15), None, 1e-5, 0.0, False, False, 0, 0),
  "ln bias dtype": lambda: ops.layer_norm_residual_fwd(x, r, w, t(16, dtype=f64), 1e-5, 0.0, False, False, 0, 0),
  "ln integer x": lambda: ops.layer_norm_residual_fwd(x.int(), None, None, None, 1e-5, 0.0, False, False, 0, 0),
  "ln non-unit column stride": lambda: ops.layer_norm_residual_fwd(t(16, 4).t(), None, None, None, 1e-5, 0.0, False, False, 0, 0),
  "ln bwd rstd size": lambda: ops.layer_norm_residual_bwd(x, None, x, w, None, mean, t(3), 1e-5, 0.0, False, 0, 0, f32),
  "ln bwd dout shape": lambda: ops.layer_norm_residual_bwd(t(4, 15), None, x, w, None, mean, rstd, 1e-5, 0.0, False, 0, 0, f32),
  "ln bwd dsummed shape": lambda: ops.layer_norm_residual_bwd(x, t(3, 16), x, w, None, mean, rstd, 1e-5, 0.0, False, 0, 0, f32),
  "ffn unknown activation": lambda: ops.feed_forward_fwd(x, w1, None, w2, None, "tanh", 0.0, 0, 0),
  "ffn w1 shape": lambda: ops.feed_forward_fwd(x, t(32, 15), None, w2, None, "relu", 0.0, 0, 0),
  "ffn w2 shape": lambda: ops.feed_forward_fwd(x, w1, None, t(16, 31), None, "relu", 0.0, 0, 0),
  "ffn b1 shape": lambda: ops.feed_forward_fwd(x, w1, t(31), w2, None, "relu", 0.0, 0, 0),
  "ffn gated odd width": lambda: ops.feed_forward_fwd(x, t(31, 16), None, t(16, 15), None, "swiglu", 0.0, 0, 0),
  "ffn mixed dtypes": lambda: ops.feed_forward_fwd(x, w1.double(), None, w2, None, "relu", 0.0, 0, 0),
  "ffn x 1-D": lambda: ops.feed_forward_fwd(t(16), w1, None, w2, None, "relu", 0.0, 0, 0),
  "ffn bwd pre shape": lambda: ops.feed_forward_bwd(t(4, 16), x, w1, w2, t(4, 31), "relu", 0.0, 0, 0, False, False),
  "ffn bwd dout shape": lambda: ops.feed_forward_bwd(t(4, 15), x, w1, w2, pre, "relu", 0.0, 0, 0, False, False),
}
# Valid inputs with extreme bands (unbounded ends, int64's limits, lo > hi, bands outside the keys):
# accepted, finite gradients, and the rows the band leaves without a key give zeros and lse = +inf.
U, I64 = 2**62, 2**63 - 1
EXTREME_BANDS = [NO_BAND, CAUSAL_BAND, (-U, -U), (U, U), (U, -U), (-I64 - 1, I64), (I64, -I64 - 1), (0, 0),
                 (-I64 - 1, -1), (1, I64), (5, 2), (-3, -7), (-2, 3), (4, 4), (-U, 1 - 6), (6, U)]
def banded(lo, hi, Lq, Lk, mask, alibi=None):
    qq, kk, vv = t(1, 2, Lq, 8), t(1, 1, Lk, 8), t(1, 1, Lk, 8)
    m = None if mask is None else (t(1, 2, Lq, Lk) if mask == "add" else torch.rand(1, 2, Lq, Lk) > 0.3)
    # alibi: "tl" / "br", slopes (one negative) aligned top-left / bottom-right
    slopes = None if alibi is None else torch.tensor([[0.5, -0.2]])
    o, l = ops.attention_fwd(qq, kk, vv, m, lo, hi, 0.2, 0.5, 7, 0, 0.0, slopes, alibi == "br")
    g = ops.attention_bwd(torch.randn_like(o), qq, kk, vv, o, l, m, lo, hi, 0.2, 0.5, 7, 0, mask == "add", 0.0, slopes,
                          alibi == "br")
    i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None]
    dead = ~((j - i >= max(lo, -Lq)) & (j - i <= min(hi, Lk))).any(1)
    assert all(bool(torch.isfinite(x).all()) for x in g), "non-finite gradient"
    assert bool(torch.isfinite(o).all()) and bool((o[:, :, dead] == 0).all()), "dead rows not zero"
    assert bool((l[:, :, dead] == math.inf).all()), "dead rows' lse not +inf"
# Valid varlen calls with extreme bands, an empty sequence, one without keys and seqused_k: finite
# results, and rows with no key (none in the sequence, or none in the band) zeros with lse = +inf.
def varlen_banded(lo, hi, bottom_right, used):
    lens_q, lens_k = [5, 0, 3, 19, 2], [6, 4, 0, 33, 2]
    cq, ck = (torch.tensor([0] + lens, dtype=i32).cumsum(0, dtype=i32) for lens in (lens_q, lens_k))
    qq, kk, vv = t(sum(lens_q), 2, 8), t(sum(lens_k), 1, 8), t(sum(lens_k), 1, 8)
    seqused = cu(*used) if used else None
    slopes = torch.tensor([[0.5, -0.2]]).expand(5, 2)
    o, l = ops.attention_varlen_fwd(qq, kk, vv, cq, ck, 19, 33, lo, hi, bottom_right, 0.2, 0.5, 7, 0, 0.0, seqused,
                                    slopes)
    g = ops.attention_varlen_bwd(torch.randn_like(o), qq, kk, vv, o, l, cq, ck, 19, 33, lo, hi, bottom_right, 0.2,
                                 0.5, 7, 0, 0.0, seqused, slopes, torch.randn_like(l))
    assert all(bool(torch.isfinite(x).all()) for x in g), "non-finite gradient"
    dead = torch.zeros(sum(lens_q), dtype=torch.bool)
    for s, (q0, Lq, Lk) in enumerate(zip(cq.tolist(), lens_q, used or lens_k)):
        i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None]
        d = Lk - Lq if bottom_right else 0
        lo_s, hi_s = (min(max(x + d, -Lq), Lk) for x in (lo, hi))
        dead[q0:q0 + Lq] = ~((j - i >= lo_s) & (j - i <= hi_s)).any(1)
    assert bool(torch.isfinite(o).all()) and bool((o[dead] == 0).all()), "dead rows not zero"
    assert bool((l[:, dead] == math.inf).all()) and bool(torch.isfinite(l[:, ~dead]).all()), "wrong lse +inf rows"
valid = {}
for lo, hi in EXTREME_BANDS:
    for bottom_right, used in [(False, None), (True, [6, 0, 0, 20, 1])]:
        valid[f"varlen band {lo} {hi} {bottom_right} {used}"] = (
            lambda lo=lo, hi=hi, br=bottom_right, used=used: varlen_banded(lo, hi, br, used))
for lo, hi in EXTREME_BANDS:
    for Lq, Lk, mask, alibi in [(5, 6, None, None), (1, 1, "add", None), (6, 0, None, None), (33, 19, "bool", None),
                                (19, 33, "add", "br"), (33, 19, None, "tl")]:
        valid[f"band {lo} {hi} {Lq}x{Lk} {mask} {alibi}"] = (
            lambda lo=lo, hi=hi, Lq=Lq, Lk=Lk, mask=mask, alibi=alibi: banded(lo, hi, Lq, Lk, mask, alibi))
# random garbage on top of the listed cases: random ranks and sizes for every argument
rng = random.Random(0)
RANDOM_BANDS = EXTREME_BANDS + [(-rng.randrange(0, 7), rng.randrange(0, 7)) for _ in range(8)]
def rand_tensor():
    shape = [rng.choice([0, 1, 2, 3, 5]) for _ in range(rng.choice([0, 1, 2, 3, 4, 5]))]
    dtype = rng.choice([f32, f64, torch.float16, torch.bfloat16, torch.int64, torch.bool])
    return torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype)
for i in range(60):
    cases[f"random attention {i}"] = (lambda a=[rand_tensor() for _ in range(3)]:
        ops.attention_fwd(a[0], a[1], a[2], None, *rng.choice(RANDOM_BANDS), 0.0, 1.0, 0, 0))
    cases[f"random layer_norm {i}"] = (lambda a=[rand_tensor() for _ in range(3)]:
        ops.layer_norm_residual_fwd(a[0], a[1], a[2], None, 1e-5, 0.0, False, False, 0, 0))
    cases[f"random feed_forward {i}"] = (lambda a=[rand_tensor() for _ in range(3)]:
        ops.feed_forward_fwd(a[0], a[1], None, a[2], None, "gelu", 0.0, 0, 0))
    # valid q, k, v with random slopes (the forward and, when it passes, the backward)
    def random_alibi(a=rand_tensor(), br=rng.random() < 0.5, band=rng.choice(RANDOM_BANDS)):
        o, l = ops.attention_fwd(q, k, v, None, *band, 0.0, 1.0, 0, 0, 0.0, a, br)
        ops.attention_bwd(torch.randn_like(o), q, k, v, o, l, None, *band, 0.0, 1.0, 0, 0, False, 0.0, a, br)
    cases[f"random alibi {i}"] = random_alibi
    cases[f"random dlse {i}"] = (lambda a=rand_tensor(): ops.attention_bwd(
        out, q, k, v, out, lse, None, *CAUSAL_BAND, 0.0, 1.0, 0, 0, False, 0.0, None, False, a))
    # varlen: random q, k, v with random boundaries (int32 or int64, in or out of range)
    def random_cu(n):
        values = sorted(rng.randrange(-2, 12) for _ in range(n)) if rng.random() < 0.7 else [
            rng.randrange(-3, 12) for _ in range(n)]
        return torch.tensor(values, dtype=rng.choice([i32, i64]))
    cases[f"random varlen {i}"] = (lambda a=[rand_tensor() for _ in range(3)], n=rng.randrange(0, 4):
        ops.attention_varlen_fwd(a[0], a[1], a[2], random_cu(n), random_cu(n), 5, 5, *rng.choice(RANDOM_BANDS),
                                 False, 0.0, 1.0, 0, 0))
    cases[f"random varlen boundaries {i}"] = (lambda n=rng.randrange(1, 5), br=rng.random() < 0.5: (
        lambda o, l: ops.attention_varlen_bwd(torch.randn_like(o), vq, vk, vv, o, l, *cb, 5, 6,
                                              *CAUSAL_BAND, br, 0.1, 1.0, 0, 0, 0.0, None, None, None))(
        *ops.attention_varlen_fwd(vq, vk, vv, *(cb := (random_cu(n), random_cu(n))), 5, 6, *CAUSAL_BAND, br,
                                  0.1, 1.0, 0, 0)))
# rotary: x (B, L, H, D), (S, R/2) tables, (B, L) positions
rx, rc, rpos = t(2, 3, 2, 8), t(4, 3), torch.zeros(2, 3, dtype=i64)
for name, call in {
    "rotary x 3-D": lambda: ops.rotary(t(3, 2, 8), rc, rc, rpos, False, False),
    "rotary x int": lambda: ops.rotary(rx.int(), rc, rc, rpos, False, False),
    "rotary tables 1-D": lambda: ops.rotary(rx, t(4), t(4), rpos, False, False),
    "rotary tables differ": lambda: ops.rotary(rx, rc, t(4, 2), rpos, True, False),
    "rotary tables too wide": lambda: ops.rotary(rx, t(4, 5), t(4, 5), rpos, False, True),
    "rotary tables empty": lambda: ops.rotary(rx, t(4, 0), t(4, 0), rpos, False, False),
    "rotary position past the table": lambda: ops.rotary(rx, rc, rc, rpos + 4, False, False),
    "rotary position negative": lambda: ops.rotary(rx, rc, rc, rpos - 1, True, False),
    "rotary positions float": lambda: ops.rotary(rx, rc, rc, rpos.float(), False, False),
    "rotary positions wrong shape": lambda: ops.rotary(rx, rc, rc, rpos[:, :2], False, False),
    "rotary_out out wrong shape": lambda: ops.rotary_out(rx, rc, rc, rpos, False, False, t(2, 3, 2, 4)),
    "rotary_out out int": lambda: ops.rotary_out(rx, rc, rc, rpos, False, False, rpos),
    "rotary_out out overlapping": lambda: ops.rotary_out(rx, rc, rc, rpos, False, False, t(1, 3, 2, 8).expand(2, 3, 2, 8)),
    "rotary_out position past the table": lambda: ops.rotary_out(rx, rc, rc, rpos + 4, False, False, rx.clone()),
}.items():
    cases[name] = call
for i in range(60):
    cases[f"random rotary {i}"] = (lambda a=[rand_tensor() for _ in range(4)], inter=rng.random() < 0.5:
        ops.rotary(a[0], a[1], a[2], a[3].long() if a[3].dtype == torch.bool else a[3], inter, not inter))
results = {}
for name, call in cases.items():
    try:
        call()
        results[name] = "accepted"
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        results[name] = "error: " + str(exc).splitlines()[0][:200]
for name, call in valid.items():
    try:
        call()
        results[name] = "ok"
    except Exception as exc:
        results[name] = f"{type(exc).__name__}: " + (str(exc).splitlines() or [""])[0][:200]
print(json.dumps(results))
'''


def test_compiled_ops_reject_bad_input_without_crashing():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", FUZZ], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"the compiled ops crashed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    listed = {name: res for name, res in results.items() if not name.startswith(("random", "band"))}
    accepted = [name for name, res in listed.items() if res == "accepted"]
    assert not accepted, f"bad input accepted without an error: {accepted}"
    # valid calls with extreme visibility bands: accepted, and their results as the contract says
    bands = {name: res for name, res in results.items() if name.startswith("band")}
    failed = {name: res for name, res in bands.items() if res != "ok"}
    assert len(bands) == 96 and not failed, f"valid calls with extreme bands failed: {failed}"
    # the random cases may be valid by chance; they must only never crash (checked above)
    assert len(results) == len(listed) + len(bands) + 480
    # valid varlen calls with extreme bands, empty sequences and seqused_k: as the contract says
    varlen_bands = {name: res for name, res in listed.items() if name.startswith("varlen band")}
    failed = {name: res for name, res in varlen_bands.items() if res != "ok"}
    assert len(varlen_bands) == 32 and not failed, f"valid varlen calls with extreme bands failed: {failed}"


def test_error_messages_format_their_values():
    """The C++ checks assemble their messages themselves (csrc/common/check.h: no std::ostream,
    which crashed in one toolchain's build): shapes, numbers, dtypes and strings come out as
    TORCH_CHECK printed them."""
    import torch
    ops = torch.ops.fused_attn_C
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 6, 8)
    with pytest.raises(RuntimeError, match=r"same head dim, got q \[1, 2, 5, 8\], k \[1, 2, 6, 7\]"):
        ops.attention_fwd(q, torch.randn(1, 2, 6, 7), k, None, *NO_BAND, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\), got 1\.5"):
        ops.attention_fwd(q, k, k, None, *NO_BAND, 1.5, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"softcap must be finite and >= 0 .*got -2\.5"):
        ops.attention_fwd(q, k, k, None, *NO_BAND, 0.0, 1.0, 0, 0, -2.5)
    # beyond float32's range: inf in a float32 computation (inf * tanh(s / inf) = NaN everywhere);
    # float64 computes with it
    with pytest.raises(RuntimeError, match=r"softcap 3\.5e\+38 is out of the computation's range \(float32\)"):
        ops.attention_fwd(q, k, k, None, *NO_BAND, 0.0, 1.0, 0, 0, 3.5e38)
    with pytest.raises(RuntimeError, match=r"scale 1e\+39 is out of the computation's range \(float32\)"):
        ops.attention_fwd(q, k, k, None, *NO_BAND, 0.0, 1e39, 0, 0)
    out, _ = ops.attention_fwd(q.double(), k.double(), k.double(), None, *NO_BAND, 0.0, 1.0, 0, 0, 3.5e38)
    assert bool(torch.isfinite(out).all())
    with pytest.raises(RuntimeError, match=r"alibi_slopes must be a \(B, Hq\) = \(1, 2\) tensor .*got shape \[2\]"):
        ops.attention_fwd(q, k, k, None, *NO_BAND, 0.0, 1.0, 0, 0, 0.0, torch.ones(2))
    with pytest.raises(RuntimeError, match="alibi_slopes must be float32, got Double"):
        ops.attention_bwd(q, q, k, k, q, torch.zeros(1, 2, 5), None, *NO_BAND, 0.0, 1.0, 0, 0, False, 0.0,
                          torch.ones(1, 2, dtype=torch.float64))
    x, w = torch.randn(4, 16), torch.randn(16)
    with pytest.raises(RuntimeError, match="bias must have dtype Float, got Double"):
        ops.layer_norm_residual_fwd(x, x, w, w.double(), 1e-5, 0.0, False, False, 0, 0)
    with pytest.raises(RuntimeError, match="activation must be one of relu, .*, got 'tanh'"):
        ops.feed_forward_fwd(x, torch.randn(32, 16), None, torch.randn(16, 32), None, "tanh", 0.0, 0, 0)


def test_rotary_out_takes_a_strided_x_with_out_in_other_memory():
    """rotary_out's overlap check asks torch only of tensors sharing a storage: torch answers "too
    hard" for any non-dense tensor, so a strided x (every other feature) with an out of its own
    was refused ("out must be x itself or not overlap it"). A partly overlapping out is still."""
    import torch
    ops = torch.ops.fused_attn_C
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 16, generator=gen)[..., ::2]
    angles = torch.randn(8, 4, generator=gen)
    positions = torch.arange(5).expand(2, 5).contiguous()
    out = torch.empty(2, 5, 3, 8)
    ops.rotary_out(x, angles.cos(), angles.sin(), positions, False, False, out)
    expected = fused_attn.reference.rotary(x, angles.cos(), angles.sin(), positions, False)
    torch.testing.assert_close(out, expected)
    base = torch.randn(2, 5, 3, 16, generator=gen)
    with pytest.raises(RuntimeError, match="out must be x itself or not overlap it"):
        ops.rotary_out(base[..., ::2], angles.cos(), angles.sin(), positions, False, False, base[..., 4:12])


def _stream_users(disassembly: str) -> dict:
    """Functions of the disassembly (``objdump -d -C``) that call into std::ostream formatting:
    an ostringstream, c10::str's stream wrapper, or an ostream inserter; name -> callees."""
    users: dict = {}
    current = None
    markers = ("basic_ostringstream", "c10::detail::_str_wrapper", "std::ostream::_M_insert", "__ostream_insert")
    for line in disassembly.splitlines():
        if line.endswith(">:") and " <" in line:
            current = line.split(" <", 1)[1][:-2]
        elif current is not None and "call" in line:
            target = line.split("<", 1)[1] if "<" in line else ""
            if any(m in target for m in markers):
                users.setdefault(current, set()).add(target.rstrip(">")[:80])
    return users


def test_no_stream_formatting_in_our_code():
    """The device build crashed while a C++ check formatted its message through std::ostream
    (csrc/common/check.h). None of our own functions may reach that code: every check goes
    through FA_CHECK, every dtype dispatch through FA_DISPATCH_FLOATING. Read off the
    disassembly of the built extension, so a TORCH_CHECK or AT_DISPATCH slipping back in fails
    here on any machine with binutils."""
    import shutil
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    import fused_attn._C as ext
    out = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", ext.__file__], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    users = _stream_users(out)
    # c10::str's own instantiations and torch's inline helpers (boxing, fromIntArrayRefSlow)
    # may remain; they fire only on conditions the schema and our checks rule out first.
    ours = {fn: callees for fn, callees in users.items() if "fused_attn" in fn}
    assert not ours, "functions of ours that format through std::ostream:\n" + "\n".join(
        f"  {fn[:150]} -> {sorted(c)}" for fn, c in ours.items())
    # The parser itself finds such a call (a stale parser would pass vacuously).
    sample = ("0000000000012340 <fused_attn::cpu::(anonymous namespace)::check_rows(at::Tensor const&)>:\n"
              "   12345:\tcall   6ced0 <c10::detail::_str_wrapper<std::string const&>::call(std::string const&)>\n")
    assert list(_stream_users(sample)) == ["fused_attn::cpu::(anonymous namespace)::check_rows(at::Tensor const&)"]
