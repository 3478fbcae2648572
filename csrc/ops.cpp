// The schemas of the compiled ops, declared once. Kernels register implementations for them per
// dispatch key: csrc/cpu/*.cpp for CPU, csrc/cuda/*_binding.cpp for CUDA. The Python front ops
// (fused_attn/ops.py) call these through the `cpu` and `cuda` backends; the argument lists are
// the launcher signatures documented in fused_attn/backends/base.py.
//
// Attention's visibility band: query i sees key j iff i + band_lo <= j <= i + band_hi (then also
// the attn_mask). fused_attn.functional derives it from causal / window_size / alignment
// (fused_attn/ops_common.py: attention_band); no band is (-2^62, 2^62), top-left causal
// (-2^62, 0). Every implementation first clamps both to [-Lq, Lk], where i + band stays small.
// softcap > 0 caps the logits as Gemma 2 / FlashAttention do: s = softcap * tanh(scale q.k / softcap),
// before the mask is added; the backward multiplies dS by 1 - tanh^2 on its way to dq and dk (the
// mask's gradient is dS itself). 0 turns it off.
// alibi_slopes (None, or float32 (B, Hq), any strides) adds ALiBi's -slope[b, h] * |j - i - shift| to
// the logits where the additive mask is added (after the cap), shift = Lk - Lq if bottom_right else
// 0 (the band already carries the alignment; ALiBi needs it separately). Nothing else changes in
// the backward: the bias is a constant, so dS is the same and no gradient flows to the slopes.
// attention_bwd's dlse (None, or float32 shaped as lse) is the returned lse's gradient: as
// d lse_i / d s_ij = P_ij, it only shifts the row term, dS = P (dP - (delta - dlse)).
// attention_varlen_fwd / _bwd: packed sequences (fused_attn.functional.attention_varlen), the
// argument lists of the backends' attention_varlen_fwd / _bwd launchers (fused_attn/backends/base.py):
// q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); int32/int64 cu_seqlens_q/k
// (B + 1,) starting at 0, never decreasing, ending at the totals; seqused_k (B,) (sequence s uses
// its first seqused_k[s] keys); alibi_slopes float32 (B, Hq); out (total_q, Hq, Dv), lse and dlse
// float32 (Hq, total_q). Each sequence is attention_fwd / _bwd on that sequence alone, its band
// shifted by its own Lk - Lq when bottom_right, its dropout mask that of offset + Hq * cu_seqlens_q[s].
// max_seqlen_q/k bound the lengths (they size a GPU grid; the CPU kernel reads the boundaries).
// CPU kernels only: the cuda backend runs varlen as a loop of attention_fwd / _bwd.
// rotary: RoPE (fused_attn.functional.apply_rotary_emb), the backends' rotary launcher: x (B, L, H, D),
// cos / sin (S, R/2) of any float dtype, positions int32/int64 (B, L), all with any strides; token
// (b, l) takes row positions[b, l] (in [0, S): fused_attn.rotary checks them; the CPU kernel raises
// on others, the CUDA kernel clamps them, never reading outside the tables) and each feature pair (x1, x2) -- features
// (i, i + R/2), or (2i, 2i + 1) when interleaved -- becomes (x1 c - x2 s, x1 s + x2 c), s negated when
// conjugate (the inverse rotation: the backward); features R.. are copied. In float32 (float64 for
// float64), rounded once; out is at::empty_like(x) (x's layout when x is dense). rotary_out writes the
// result into `out` instead (x's shape and dtype, no overlapping elements; out = x: in place).
// One more op, fused_attn_C::cpu_scratch_release() -> int (fused_attn.empty_cpu_cache()), is
// declared with its kernel in csrc/cpu/scratch.cpp: it takes no tensor, so it has no dispatch key.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fused_attn_C, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, int band_lo, int band_hi, "
      "float dropout_p, float scale, int seed, int offset, float softcap=0.0, Tensor? alibi_slopes=None, "
      "bool bottom_right=False) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? attn_mask, "
      "int band_lo, int band_hi, float dropout_p, float scale, int seed, int offset, bool mask_grad, "
      "float softcap=0.0, Tensor? alibi_slopes=None, bool bottom_right=False, Tensor? dlse=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  m.def(
      "attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, int band_lo, int band_hi, bool bottom_right, float dropout_p, "
      "float scale, int seed, int offset, float softcap=0.0, Tensor? seqused_k=None, Tensor? alibi_slopes=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int band_lo, int band_hi, bool bottom_right, "
      "float dropout_p, float scale, int seed, int offset, float softcap=0.0, Tensor? seqused_k=None, "
      "Tensor? alibi_slopes=None, Tensor? dlse=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "layer_norm_residual_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, "
      "float dropout_p, bool rms, bool residual_in_fp32, int seed, int offset, bool store_summed=True) "
      "-> (Tensor out, Tensor summed, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_residual_bwd(Tensor dout, Tensor? dsummed, Tensor summed, Tensor? weight, Tensor? bias, "
      "Tensor mean, Tensor rstd, float eps, float dropout_p, bool rms, int seed, int offset, ScalarType x_dtype) "
      "-> (Tensor dsum, Tensor dx, Tensor dweight, Tensor dbias)");
  m.def(
      "feed_forward_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, str activation, "
      "float dropout_p, int seed, int offset) -> (Tensor out, Tensor pre)");
  m.def(
      "feed_forward_bwd(Tensor dout, Tensor x, Tensor w1, Tensor w2, Tensor pre, str activation, "
      "float dropout_p, int seed, int offset, bool has_b1, bool has_b2) "
      "-> (Tensor dx, Tensor dw1, Tensor db1, Tensor dw2, Tensor db2)");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool conjugate) -> Tensor");
  m.def(
      "rotary_out(Tensor x, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool conjugate, "
      "Tensor(a!) out) -> ()");
}

// `import fused_attn._C` loads this library, which runs the registrations above; the module
// itself is empty (no pybind11 needed, which keeps the build fast).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
