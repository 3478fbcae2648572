// Residual-add + LayerNorm / RMSNorm on CPU, forward and backward (fused_attn_C::layer_norm_residual_*).
//
// Forward, one pass over each row (rows in parallel):
//     s = dropout(x) + residual          rounded to summed's dtype; stored (the prenorm output, saved
//                                        for backward) unless store_summed is false
//     LayerNorm: mean = sum(s)/d,  rstd = 1/sqrt(sum((s-mean)^2)/d + eps),  xhat = (s-mean)*rstd
//     RMSNorm:                     rstd = 1/sqrt(sum(s^2)/d + eps),         xhat = s*rstd
//     out = xhat * weight + bias
// The row is converted once into a float32 (float64 for float64 inputs) scratch row that stays
// in cache; the statistics are two vectorised reductions over it (the corrected two-pass
// variance: the second pass also sums s - mean, which corrects the mean's rounding; exact enough
// without Welford, and the row is in L1/L2 anyway). Both sums run in float32 lanes over blocks of
// 512 elements (float64 lanes for float64) whose partials add up in float64, so their error does
// not grow with d.
//
// Backward, per row, with g = dout * weight:
//     LayerNorm: ds = rstd * (g - mean(g) - xhat * mean(g * xhat))
//     RMSNorm:   ds = rstd * (g - xhat * mean(g * xhat))
//     dsum = ds + dsummed (the gradient reaching the prenorm output), in summed's dtype;
//     dx   = dsum * keep/(1-p) only with dropout (else the caller reuses dsum).
// dweight = sum_rows dout * xhat and dbias = sum_rows dout are reduced deterministically: fixed
// row chunks (independent of the thread count) each sum into their own partial row (float32,
// float64 for float64 inputs), and the partials are added in chunk order. mean and rstd are saved
// in that dtype too (stat_dtype).
#include <torch/library.h>

#include "cpu_common.h"
#include "scratch.h"

namespace fused_attn::cpu {

struct LnOptions {
  double eps;
  double dropout_p;
  bool rms;
  uint64_t seed, offset;
};

namespace isa_default {
namespace {
#include "layer_norm_kernels.h"
}  // namespace
}  // namespace isa_default
}  // namespace fused_attn::cpu

#if defined(FUSED_ATTN_AVX2_CLONES)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FUSED_ATTN_ISA_AVX2 1
namespace fused_attn::cpu::isa_avx2 {
namespace {
#include "layer_norm_kernels.h"
}  // namespace
}  // namespace fused_attn::cpu::isa_avx2
#undef FUSED_ATTN_ISA_AVX2
#pragma GCC pop_options
#endif

namespace fused_attn::cpu {
namespace {

// The AVX2 copy of a kernel when the CPU has it, else the baseline one.
template <typename scalar_t, typename res_t, typename sum_t, typename... Args>
void layer_norm_fwd(Args&&... args) {
#if defined(FUSED_ATTN_AVX2_CLONES)
  if (cpu_has_avx2_fma()) return isa_avx2::layer_norm_fwd_kernel<scalar_t, res_t, sum_t>(args...);
#endif
  isa_default::layer_norm_fwd_kernel<scalar_t, res_t, sum_t>(args...);
}

template <typename scalar_t, typename sum_t, bool kHasW, bool kDw, bool kDb, typename... Args>
void layer_norm_bwd(Args&&... args) {
#if defined(FUSED_ATTN_AVX2_CLONES)
  if (cpu_has_avx2_fma()) return isa_avx2::layer_norm_bwd_kernel<scalar_t, sum_t, kHasW, kDw, kDb>(args...);
#endif
  isa_default::layer_norm_bwd_kernel<scalar_t, sum_t, kHasW, kDw, kDb>(args...);
}

// The dtype of the saved mean and rstd: the computation's, float32 (float64 for float64 inputs,
// as torch's native_layer_norm saves them), so that the float64 backward reads the forward's
// corrected statistics. (It recomputed them instead, without the variance's correction: dx was
// only ~1e-6 relative accurate on nearly constant rows such as 1e12 +- 1.)
at::ScalarType stat_dtype(at::ScalarType x_dtype) { return x_dtype == at::kDouble ? at::kDouble : at::kFloat; }

void check_rows(const at::Tensor& t, const char* name, int64_t N, int64_t d) {
  check_cpu_float(t, name);
  FA_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == d, name, " must have shape (", N, ", ", d,
              "), got ", t.sizes());
  FA_CHECK(t.stride(1) == 1 || d <= 1, name, " must have unit stride along its last dimension, got strides ",
              t.strides());
  FA_CHECK(t.stride(0) >= 0, name, " must have a non-negative row stride, got strides ", t.strides());
}

void check_param(const at::Tensor& t, const char* name, int64_t d, at::ScalarType dtype) {
  check_cpu_float(t, name);
  FA_CHECK(t.dim() == 1 && t.size(0) == d, name, " must have shape (", d, "), got ", t.sizes());
  FA_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_residual_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, double dropout_p, bool rms, bool residual_in_fp32,
    int64_t seed, int64_t offset, bool store_summed) {
  check_cpu_float(x, "x");
  FA_CHECK(x.dim() == 2, "x must be 2-D (N, d), got shape ", x.sizes());
  const int64_t N = x.size(0), d = x.size(1);
  check_rows(x, "x", N, d);
  const auto dtype = x.scalar_type();
  if (residual) {
    check_rows(*residual, "residual", N, d);
    FA_CHECK(residual->scalar_type() == dtype || (residual_in_fp32 && residual->scalar_type() == at::kFloat),
                "residual must have x's dtype ", dtype, " (or float32 with residual_in_fp32), got ",
                residual->scalar_type());
  }
  std::optional<at::Tensor> w, b;
  if (weight) {
    check_param(*weight, "weight", d, dtype);
    w = weight->contiguous();
  }
  if (bias) {
    check_param(*bias, "bias", d, dtype);
    b = bias->contiguous();
  }
  FA_CHECK(eps >= 0.0, "eps must be non-negative, got ", eps);
  check_dropout_p(dropout_p);

  // residual_in_fp32 keeps the sum in the wider of float32 and x's dtype: float64 x keeps it in
  // float64 (rounding it to float32 lost float64's precision; the flag then only lets a float32
  // residual in, read exactly).
  const bool sum_fp32 = residual_in_fp32 && dtype != at::kDouble;
  const auto sum_dtype = sum_fp32 ? at::kFloat : dtype;
  // (outputs from the scratch cache's allocator: csrc/cpu/scratch.h)
  auto out = scratch::empty({N, d}, dtype);
  // Without store_summed (inference, no prenorm) the sum stays in the row scratch: one output stream.
  auto summed = store_summed ? scratch::empty({N, d}, sum_dtype) : at::empty({0}, x.options().dtype(sum_dtype));
  auto mean = at::empty({rms ? 0 : N}, x.options().dtype(stat_dtype(dtype)));
  auto rstd = at::empty({N}, x.options().dtype(stat_dtype(dtype)));
  if (N == 0) return {out, summed, mean, rstd};
  const LnOptions opt{eps, dropout_p, rms, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  const at::Tensor* r = residual ? &*residual : nullptr;
  const at::Tensor* wp = w ? &*w : nullptr;
  const at::Tensor* bp = b ? &*b : nullptr;
  at::Tensor* sp = store_summed ? &summed : nullptr;

  FA_DISPATCH_FLOATING(dtype, "layer_norm_residual_fwd", [&] {
    const bool res_fp32 = r && r->scalar_type() == at::kFloat && dtype != at::kFloat;
    if (sum_fp32) {
      if (res_fp32)
        layer_norm_fwd<scalar_t, float, float>(x, r, wp, bp, opt, out, sp, mean, rstd);
      else
        layer_norm_fwd<scalar_t, scalar_t, float>(x, r, wp, bp, opt, out, sp, mean, rstd);
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      if (res_fp32)  // (float64 x, float32 residual, residual_in_fp32: a float64 sum)
        layer_norm_fwd<double, float, double>(x, r, wp, bp, opt, out, sp, mean, rstd);
      else
        layer_norm_fwd<double, double, double>(x, r, wp, bp, opt, out, sp, mean, rstd);
    } else {
      layer_norm_fwd<scalar_t, scalar_t, scalar_t>(x, r, wp, bp, opt, out, sp, mean, rstd);
    }
  });
  return {out, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_residual_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dsummed, const at::Tensor& summed,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, double eps, double dropout_p, bool rms, int64_t seed, int64_t offset,
    at::ScalarType x_dtype) {
  FA_CHECK(is_supported_float(x_dtype), "x_dtype must be float32, float64, bfloat16 or float16, got ", x_dtype);
  check_cpu_float(summed, "summed");
  FA_CHECK(summed.dim() == 2, "summed must be 2-D (N, d), got shape ", summed.sizes());
  const int64_t N = summed.size(0), d = summed.size(1);
  check_rows(summed, "summed", N, d);
  const auto sum_dtype = summed.scalar_type();
  FA_CHECK(sum_dtype == x_dtype || sum_dtype == at::kFloat, "summed must have dtype ", x_dtype,
              " or float32, got ", sum_dtype);
  check_rows(dout, "dout", N, d);
  FA_CHECK(dout.scalar_type() == x_dtype, "dout must have dtype ", x_dtype, ", got ", dout.scalar_type());
  if (dsummed) {
    check_rows(*dsummed, "dsummed", N, d);
    FA_CHECK(dsummed->scalar_type() == sum_dtype, "dsummed must have summed's dtype ", sum_dtype, ", got ",
                dsummed->scalar_type());
  }
  std::optional<at::Tensor> w;
  if (weight) {
    check_param(*weight, "weight", d, x_dtype);
    w = weight->contiguous();
  }
  if (bias) check_param(*bias, "bias", d, x_dtype);
  const auto stats = stat_dtype(x_dtype);
  FA_CHECK(rstd.device().is_cpu() && rstd.scalar_type() == stats && rstd.dim() == 1 && rstd.size(0) == N,
              "rstd must be a ", stats, " CPU tensor of shape (", N, "), got ", rstd.scalar_type(), " ", rstd.sizes());
  const int64_t mean_n = rms ? 0 : N;
  FA_CHECK(mean.device().is_cpu() && mean.scalar_type() == stats && mean.dim() == 1 && mean.size(0) == mean_n,
              "mean must be a ", stats, " CPU tensor of shape (", mean_n, ") (empty for rms), got ", mean.scalar_type(),
              " ", mean.sizes());
  FA_CHECK(eps >= 0.0, "eps must be non-negative, got ", eps);
  check_dropout_p(dropout_p);

  const auto opts = summed.options();
  auto dsum = scratch::empty({N, d}, summed.scalar_type());
  at::Tensor dx = dropout_p > 0.0 ? scratch::empty({N, d}, x_dtype) : at::empty({0}, opts.dtype(x_dtype));
  // Empty when absent; zeros when present (a sum over zero rows).
  at::Tensor dweight = weight ? at::zeros({d}, opts.dtype(x_dtype)) : at::empty({0}, opts);
  at::Tensor dbias = bias ? at::zeros({d}, opts.dtype(x_dtype)) : at::empty({0}, opts);
  if (N == 0) return {dsum, dx, dweight, dbias};
  const auto mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const LnOptions opt{eps, dropout_p, rms, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  const at::Tensor* ds_in = dsummed ? &*dsummed : nullptr;

  FA_DISPATCH_FLOATING(x_dtype, "layer_norm_residual_bwd", [&] {
    auto run = [&](auto sum_tag) {
      using sum_t = decltype(sum_tag);
      const at::Tensor* wp = w ? &*w : nullptr;
      at::Tensor* dxp = dropout_p > 0.0 ? &dx : nullptr;
      at::Tensor* dwp = weight ? &dweight : nullptr;
      at::Tensor* dbp = bias ? &dbias : nullptr;
      // weight present => dweight wanted; the three flags are compile-time in the row pass.
      if (weight && bias)
        layer_norm_bwd<scalar_t, sum_t, true, true, true>(dout, ds_in, summed, wp, mean_c, rstd_c, opt, dsum, dxp, dwp, dbp);
      else if (weight)
        layer_norm_bwd<scalar_t, sum_t, true, true, false>(dout, ds_in, summed, wp, mean_c, rstd_c, opt, dsum, dxp, dwp, dbp);
      else if (bias)
        layer_norm_bwd<scalar_t, sum_t, false, false, true>(dout, ds_in, summed, wp, mean_c, rstd_c, opt, dsum, dxp, dwp, dbp);
      else
        layer_norm_bwd<scalar_t, sum_t, false, false, false>(dout, ds_in, summed, wp, mean_c, rstd_c, opt, dsum, dxp, dwp, dbp);
    };
    if (sum_dtype == x_dtype)
      run(scalar_t{});
    else
      run(float{});
  });
  return {dsum, dx, dweight, dbias};
}

}  // namespace
}  // namespace fused_attn::cpu

TORCH_LIBRARY_IMPL(fused_attn_C, CPU, m) {
  m.impl("layer_norm_residual_fwd", &fused_attn::cpu::layer_norm_residual_fwd);
  m.impl("layer_norm_residual_bwd", &fused_attn::cpu::layer_norm_residual_bwd);
}
