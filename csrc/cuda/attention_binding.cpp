// CUDA implementations of fused_attn_C::attention_fwd / attention_bwd: check the tensors, allocate
// the outputs, and launch the kernels of attention.cu on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "binding_utils.h"
#include "launchers.h"

namespace fused_attn_cuda {
namespace {

void copy_strides(const at::Tensor& t, int64_t (&out)[4]) {
  for (int i = 0; i < 4; ++i) out[i] = t.stride(i);
}

// Checks q, k, v, the mask and the ALiBi slopes and fills everything of the forward's arguments but
// the outputs; the band (query i sees key j iff band_lo <= j - i <= band_hi) is clamped to
// [-Lq, Lk] first: the same visible keys, but small numbers (the kernels form i + band and
// n0 - band in int64 without overflow worries, and callers pass unbounded ends as +-2^62).
AttentionFwdArgs forward_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& attn_mask, int64_t band_lo, int64_t band_hi,
                              double dropout_p, double scale, int64_t seed, int64_t offset, double softcap,
                              const std::optional<at::Tensor>& alibi_slopes, bool bottom_right) {
  check_tensor(q, q, 4, op, "q");
  check_tensor(k, q, 4, op, "k");
  check_tensor(v, q, 4, op, "v");
  AttentionFwdArgs a{};
  a.dtype = dtype_of(q, op, "q");
  check_dtype(k, q.scalar_type(), op, "k");
  check_dtype(v, q.scalar_type(), op, "v");
  a.batch = q.size(0);
  a.heads_q = q.size(1);
  a.len_q = q.size(2);
  a.head_dim = q.size(3);
  a.heads_kv = k.size(1);
  a.len_k = k.size(2);
  a.head_dim_v = v.size(3);
  FA_CHECK(k.size(0) == a.batch && v.size(0) == a.batch, "fused_attn_C::", op,
              " (cuda): q, k, v must have the same batch size, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  FA_CHECK(k.size(3) == a.head_dim, "fused_attn_C::", op, " (cuda): k must have q's head dim ", a.head_dim,
              ", got shape ", k.sizes());
  FA_CHECK(v.size(1) == a.heads_kv && v.size(2) == a.len_k, "fused_attn_C::", op,
              " (cuda): v must have k's heads and length, got k ", k.sizes(), ", v ", v.sizes());
  FA_CHECK(a.heads_kv > 0 && a.heads_q % a.heads_kv == 0, "fused_attn_C::", op,
              " (cuda): q's heads must be a multiple of k's heads, got ", a.heads_q, " and ", a.heads_kv);
  FA_CHECK(a.head_dim <= kMaxHeadDim && a.head_dim_v <= kMaxHeadDim, "fused_attn_C::", op,
              " (cuda): head dims up to ", kMaxHeadDim, " are supported, got q ", a.head_dim, ", v ", a.head_dim_v);
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  copy_strides(q, a.q_stride);
  copy_strides(k, a.k_stride);
  copy_strides(v, a.v_stride);
  a.mask_kind = MaskKind::kNone;
  a.mask = nullptr;
  if (attn_mask.has_value() && attn_mask->defined()) {
    const at::Tensor& m = *attn_mask;
    check_tensor(m, q, 4, op, "attn_mask");
    FA_CHECK(m.size(0) == a.batch && m.size(1) == a.heads_q && m.size(2) == a.len_q && m.size(3) == a.len_k,
                "fused_attn_C::", op, " (cuda): attn_mask must be a (B, Hq, Lq, Lk) = (", a.batch, ", ", a.heads_q,
                ", ", a.len_q, ", ", a.len_k, ") view, got shape ", m.sizes());
    FA_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(), "fused_attn_C::", op,
                " (cuda): attn_mask must be bool or have q's dtype ", q.scalar_type(), ", got ", m.scalar_type());
    a.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
    a.mask = m.data_ptr();
    copy_strides(m, a.mask_stride);
  } else {
    for (int i = 0; i < 4; ++i) a.mask_stride[i] = 0;
  }
  const auto clamp_band = [&](int64_t x) { return std::min(std::max(x, -a.len_q), a.len_k); };
  a.band_lo = clamp_band(band_lo);
  a.band_hi = clamp_band(band_hi);
  // The kernels take scale as a float: a non-finite scale, or one that overflows float32, made
  // every score inf or NaN (the cpu backend refuses both, with these messages).
  FA_CHECK(std::isfinite(scale), "fused_attn_C::", op, " (cuda): scale must be finite, got ", scale);
  a.scale = static_cast<float>(scale);
  FA_CHECK(std::isfinite(a.scale), "fused_attn_C::", op, " (cuda): scale ", scale,
           " is out of the computation's range (float32)");
  // The kernels take softcap as a float: above float32's max it would become inf, and cap_logit's
  // inf * tanh(s / inf) = inf * 0 = NaN everywhere (fused_attn.functional refuses it too).
  FA_CHECK(softcap >= 0.0 && softcap <= static_cast<double>(std::numeric_limits<float>::max()),
           "fused_attn_C::", op, " (cuda): softcap must be >= 0 (0 turns it off) and at most float32's max "
           "3.4028234663852886e+38, got ", softcap);
  a.softcap = static_cast<float>(softcap);
  // A positive cap that rounds to 0 in float32 (1e-50) would turn the cap off silently (cap_logit
  // tests softcap > 0): refused, as the cpu backend refuses it.
  FA_CHECK(softcap == 0.0 || a.softcap > 0.0f, "fused_attn_C::", op, " (cuda): softcap ", softcap,
           " is out of the computation's range (float32)");
  // ALiBi: a float32 (B, Hq) view with any strides (fused_attn.functional passes a stride-0 expand of
  // (Hq,) slopes); the kernels read one slope per (batch, head) through its two strides. The shift
  // places query i at key position i + Lk - Lq under bottom-right alignment (the band already has it).
  a.alibi_slopes = nullptr;
  a.alibi_stride[0] = a.alibi_stride[1] = 0;
  a.alibi_shift = 0;
  if (alibi_slopes.has_value()) {
    const at::Tensor& s = *alibi_slopes;
    check_tensor(s, q, 2, op, "alibi_slopes");
    check_dtype(s, at::kFloat, op, "alibi_slopes");
    FA_CHECK(s.size(0) == a.batch && s.size(1) == a.heads_q, "fused_attn_C::", op,
             " (cuda): alibi_slopes must be a (B, Hq) = (", a.batch, ", ", a.heads_q, ") view, got shape ",
             s.sizes());
    a.alibi_slopes = s.data_ptr<float>();
    a.alibi_stride[0] = s.stride(0);
    a.alibi_stride[1] = s.stride(1);
    a.alibi_shift = bottom_right ? a.len_k - a.len_q : 0;
  }
  a.dropout = dropout_args(dropout_p, seed, offset, op);
  return a;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& attn_mask, int64_t band_lo,
                                                      int64_t band_hi, double dropout_p, double scale, int64_t seed,
                                                      int64_t offset, double softcap,
                                                      const std::optional<at::Tensor>& alibi_slopes,
                                                      bool bottom_right) {
  const char* op = "attention_fwd";
  AttentionFwdArgs a =
      forward_args(op, q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, softcap, alibi_slopes,
                   bottom_right);
  const DeviceGuard guard(q.device());
  // out is (B, Hq, Lq, Dv) stored as a contiguous (B, Lq, Hq, Dv) (fused_attn.ops_common.new_attention_out).
  at::Tensor out = at::empty({a.batch, a.len_q, a.heads_q, a.head_dim_v}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({a.batch, a.heads_q, a.len_q}, q.options().dtype(at::kFloat));
  a.out = out.data_ptr();
  copy_strides(out, a.out_stride);
  a.lse = lse.data_ptr<float>();
  check_status(attention_fwd(a, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, int64_t band_lo, int64_t band_hi,
    double dropout_p, double scale, int64_t seed, int64_t offset, bool mask_grad, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, bool bottom_right, const std::optional<at::Tensor>& dlse) {
  const char* op = "attention_bwd";
  AttentionBwdArgs a{};
  a.fwd = forward_args(op, q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed, offset, softcap,
                       alibi_slopes, bottom_right);
  const AttentionFwdArgs& f = a.fwd;
  check_tensor(dout, q, 4, op, "dout");
  check_tensor(out, q, 4, op, "out");
  check_tensor(lse, q, 3, op, "lse");
  check_dtype(dout, q.scalar_type(), op, "dout");
  check_dtype(out, q.scalar_type(), op, "out");
  check_dtype(lse, at::kFloat, op, "lse");
  const std::vector<int64_t> out_shape{f.batch, f.heads_q, f.len_q, f.head_dim_v};
  FA_CHECK(dout.sizes() == at::IntArrayRef(out_shape), "fused_attn_C::", op, " (cuda): dout must have shape ",
              at::IntArrayRef(out_shape), ", got ", dout.sizes());
  FA_CHECK(out.sizes() == at::IntArrayRef(out_shape), "fused_attn_C::", op, " (cuda): out must have shape ",
              at::IntArrayRef(out_shape), ", got ", out.sizes());
  FA_CHECK(lse.size(0) == f.batch && lse.size(1) == f.heads_q && lse.size(2) == f.len_q, "fused_attn_C::", op,
              " (cuda): lse must have shape (", f.batch, ", ", f.heads_q, ", ", f.len_q, "), got ", lse.sizes());
  FA_CHECK(!mask_grad || f.mask_kind == MaskKind::kAdditive, "fused_attn_C::", op,
              " (cuda): mask_grad needs an additive (floating-point) attn_mask");
  const bool has_dlse = dlse.has_value() && dlse->defined();
  if (has_dlse) {
    check_tensor(*dlse, q, 3, op, "dlse");
    check_dtype(*dlse, at::kFloat, op, "dlse");
    FA_CHECK(dlse->sizes() == lse.sizes(), "fused_attn_C::", op, " (cuda): dlse must have lse's shape ", lse.sizes(),
                ", got ", dlse->sizes());
  }
  const DeviceGuard guard(q.device());
  const at::Tensor dlse_c = has_dlse ? dlse->contiguous() : at::Tensor();
  const at::Tensor lse_c = lse.contiguous();
  a.fwd.out = const_cast<void*>(out.data_ptr());  // read only: the kernels take it through a const pointer
  copy_strides(out, a.fwd.out_stride);
  a.fwd.lse = const_cast<float*>(lse_c.data_ptr<float>());  // read only in the backward
  a.dout = dout.data_ptr();
  copy_strides(dout, a.dout_stride);

  const bool q_side_empty = f.batch * f.heads_q == 0 || f.len_q == 0;  // then no kernel writes dk, dv
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = q_side_empty ? at::zeros(k.sizes(), k.options()) : at::empty(k.sizes(), k.options());
  at::Tensor dv = q_side_empty ? at::zeros(v.sizes(), v.options()) : at::empty(v.sizes(), v.options());
  // dmask: elements of the key blocks the band skips (every block outside a query block's band: a
  // causal or windowed band, a dead row) are never written, hence zeros, whatever the band.
  at::Tensor dmask = mask_grad ? at::zeros({f.batch, f.heads_q, f.len_q, f.len_k}, q.options())
                               : at::empty({0}, q.options());
  at::Tensor delta = at::empty({f.batch * f.heads_q * f.len_q}, q.options().dtype(at::kFloat));
  a.dq = dq.data_ptr();
  a.dk = dk.data_ptr();
  a.dv = dv.data_ptr();
  a.dmask = mask_grad ? dmask.data_ptr() : nullptr;
  a.delta = delta.data_ptr<float>();
  a.dlse = has_dlse ? dlse_c.const_data_ptr<float>() : nullptr;
  check_status(attention_bwd(a, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {dq, dk, dv, dmask};
}

}  // namespace
}  // namespace fused_attn_cuda

TORCH_LIBRARY_IMPL(fused_attn_C, CUDA, m) {
  m.impl("attention_fwd", &fused_attn_cuda::attention_fwd_cuda);
  m.impl("attention_bwd", &fused_attn_cuda::attention_bwd_cuda);
}
