// Residual-add + LayerNorm / RMSNorm on CPU, forward and backward (fused_attn_C::layer_norm_residual_*).
//
// Forward, one pass over each row (rows in parallel):
//     s = dropout(x) + residual          rounded to summed's dtype and stored (prenorm output, saved)
//     LayerNorm: mean = sum(s)/d,  rstd = 1/sqrt(sum((s-mean)^2)/d + eps),  xhat = (s-mean)*rstd
//     RMSNorm:                     rstd = 1/sqrt(sum(s^2)/d + eps),         xhat = s*rstd
//     out = xhat * weight + bias
// The row is converted once into a float32 (float64 for float64 inputs) scratch row that stays
// in cache; the statistics are two vectorised reductions over it (two-pass variance: exact
// enough without Welford, and the row is in L1/L2 anyway).
//
// Backward, per row, with g = dout * weight:
//     LayerNorm: ds = rstd * (g - mean(g) - xhat * mean(g * xhat))
//     RMSNorm:   ds = rstd * (g - xhat * mean(g * xhat))
//     dsum = ds + dsummed (the gradient reaching the prenorm output), in summed's dtype;
//     dx   = dsum * keep/(1-p) only with dropout (else the caller reuses dsum).
// dweight = sum_rows dout * xhat and dbias = sum_rows dout are reduced deterministically: fixed
// row chunks (independent of the thread count) each sum into their own float32 partial row, and
// the partials are added in chunk order.
#include <torch/library.h>

#include "cpu_common.h"

namespace fused_attn::cpu {
namespace {

struct LnOptions {
  double eps;
  double dropout_p;
  bool rms;
  uint64_t seed, offset;
};

template <typename scalar_t, typename res_t, typename sum_t>
void layer_norm_fwd_kernel(const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight,
                           const at::Tensor* bias, const LnOptions& opt, at::Tensor& out, at::Tensor& summed,
                           at::Tensor& mean, at::Tensor& rstd) {
  using A = acc_t<scalar_t>;
  const int64_t N = x.size(0), d = x.size(1);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const int64_t x_stride = x.stride(0);
  const res_t* r_ptr = residual ? residual->const_data_ptr<res_t>() : nullptr;
  const int64_t r_stride = residual ? residual->stride(0) : 0;
  // Weight and bias converted once to the accumulation type, shared by all threads.
  std::vector<A> w_acc, b_acc;
  if (weight) {
    w_acc.resize(d);
    load_row(weight->const_data_ptr<scalar_t>(), w_acc.data(), d);
  }
  if (bias) {
    b_acc.resize(d);
    load_row(bias->const_data_ptr<scalar_t>(), b_acc.data(), d);
  }
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();
  sum_t* s_ptr = summed.mutable_data_ptr<sum_t>();
  float* mean_ptr = opt.rms ? nullptr : mean.mutable_data_ptr<float>();
  float* rstd_ptr = rstd.mutable_data_ptr<float>();
  const bool dropout = opt.dropout_p > 0.0;
  const uint32_t threshold = fused_attn::dropout_threshold(opt.dropout_p);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - opt.dropout_p));
  const A inv_d = A(1) / static_cast<A>(std::max<int64_t>(d, 1));
  const A eps = static_cast<A>(opt.eps);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));

  at::parallel_for(0, N, grain, [&](int64_t row0, int64_t row1) {
    std::vector<A> scratch(2 * d);
    A* buf = scratch.data();
    A* aux = buf + d;  // residual row or dropout multipliers
    for (int64_t n = row0; n < row1; ++n) {
      load_row(x_ptr + n * x_stride, buf, d);
      if (dropout) {
        dropout_row_scale(aux, d, opt.seed, opt.offset, static_cast<uint64_t>(n), threshold, keep_scale);
        for (int64_t c = 0; c < d; ++c) buf[c] *= aux[c];
      }
      if (r_ptr) {
        load_row(r_ptr + n * r_stride, aux, d);
        for (int64_t c = 0; c < d; ++c) buf[c] += aux[c];
      }
      // The stored sum is what backward sees; normalise exactly that (rounded) value.
      store_row(buf, s_ptr + n * d, d);
      round_row_through<sum_t>(buf, d);

      A mu = 0, var;
      if (opt.rms) {
        var = row_dot(buf, buf, d) * inv_d;
      } else {
        mu = row_sum(buf, d) * inv_d;
        for (int64_t c = 0; c < d; ++c) aux[c] = buf[c] - mu;
        var = row_dot(aux, aux, d) * inv_d;
      }
      const A rs = A(1) / std::sqrt(var + eps);
      if (mean_ptr) mean_ptr[n] = static_cast<float>(mu);
      rstd_ptr[n] = static_cast<float>(rs);

      if (w_acc.empty() && b_acc.empty()) {
        for (int64_t c = 0; c < d; ++c) buf[c] = (buf[c] - mu) * rs;
      } else if (b_acc.empty()) {
        for (int64_t c = 0; c < d; ++c) buf[c] = (buf[c] - mu) * rs * w_acc[c];
      } else if (w_acc.empty()) {
        for (int64_t c = 0; c < d; ++c) buf[c] = (buf[c] - mu) * rs + b_acc[c];
      } else {
        for (int64_t c = 0; c < d; ++c) buf[c] = (buf[c] - mu) * rs * w_acc[c] + b_acc[c];
      }
      store_row(buf, out_ptr + n * d, d);
    }
  });
}

template <typename scalar_t, typename sum_t>
void layer_norm_bwd_kernel(const at::Tensor& dout, const at::Tensor* dsummed, const at::Tensor& summed,
                           const at::Tensor* weight, bool has_bias, const at::Tensor& mean, const at::Tensor& rstd,
                           const LnOptions& opt, at::Tensor& dsum, at::Tensor* dx, at::Tensor* dweight,
                           at::Tensor* dbias) {
  using A = acc_t<scalar_t>;
  const int64_t N = summed.size(0), d = summed.size(1);
  const scalar_t* g_ptr = dout.const_data_ptr<scalar_t>();
  const int64_t g_stride = dout.stride(0);
  const sum_t* ds_in_ptr = dsummed ? dsummed->const_data_ptr<sum_t>() : nullptr;
  const int64_t ds_in_stride = dsummed ? dsummed->stride(0) : 0;
  const sum_t* s_ptr = summed.const_data_ptr<sum_t>();
  const int64_t s_stride = summed.stride(0);
  const float* mean_ptr = opt.rms ? nullptr : mean.const_data_ptr<float>();
  const float* rstd_ptr = rstd.const_data_ptr<float>();
  std::vector<A> w_acc;
  if (weight) {
    w_acc.resize(d);
    load_row(weight->const_data_ptr<scalar_t>(), w_acc.data(), d);
  }
  sum_t* dsum_ptr = dsum.mutable_data_ptr<sum_t>();
  scalar_t* dx_ptr = dx ? dx->mutable_data_ptr<scalar_t>() : nullptr;
  const bool want_dw = dweight != nullptr, want_db = has_bias;
  const uint32_t threshold = fused_attn::dropout_threshold(opt.dropout_p);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - opt.dropout_p));
  const A inv_d = A(1) / static_cast<A>(std::max<int64_t>(d, 1));
  const A eps = static_cast<A>(opt.eps);

  const RowChunks chunks = fixed_row_chunks(N);
  std::vector<A> dw_part(want_dw ? chunks.count * d : 0, A(0));
  std::vector<A> db_part(want_db ? chunks.count * d : 0, A(0));

  at::parallel_for(0, chunks.count, 1, [&](int64_t k0, int64_t k1) {
    std::vector<A> scratch(3 * d);
    A* xhat = scratch.data();
    A* g = xhat + d;
    A* aux = g + d;
    for (int64_t k = k0; k < k1; ++k) {
      A* dw = want_dw ? dw_part.data() + k * d : nullptr;
      A* db = want_db ? db_part.data() + k * d : nullptr;
      for (int64_t n = chunks.begin(k); n < chunks.end(k, N); ++n) {
        load_row(s_ptr + n * s_stride, xhat, d);
        load_row(g_ptr + n * g_stride, g, d);
        A mu, rs;
        if constexpr (std::is_same_v<A, double>) {
          // float64 (gradcheck): the saved float32 statistics are not exact enough; recompute.
          mu = opt.rms ? 0.0 : row_sum(xhat, d) * inv_d;
          for (int64_t c = 0; c < d; ++c) aux[c] = xhat[c] - mu;
          rs = 1.0 / std::sqrt(row_dot(aux, aux, d) * inv_d + eps);
        } else {
          mu = mean_ptr ? static_cast<A>(mean_ptr[n]) : A(0);
          rs = static_cast<A>(rstd_ptr[n]);
        }
        for (int64_t c = 0; c < d; ++c) xhat[c] = (xhat[c] - mu) * rs;
        if (dw) {
          for (int64_t c = 0; c < d; ++c) dw[c] += g[c] * xhat[c];
        }
        if (db) {
          for (int64_t c = 0; c < d; ++c) db[c] += g[c];
        }
        if (!w_acc.empty()) {
          for (int64_t c = 0; c < d; ++c) g[c] *= w_acc[c];
        }
        const A mean_gx = row_dot(g, xhat, d) * inv_d;
        if (opt.rms) {
          for (int64_t c = 0; c < d; ++c) g[c] = rs * (g[c] - xhat[c] * mean_gx);
        } else {
          const A mean_g = row_sum(g, d) * inv_d;
          for (int64_t c = 0; c < d; ++c) g[c] = rs * (g[c] - mean_g - xhat[c] * mean_gx);
        }
        if (ds_in_ptr) {
          load_row(ds_in_ptr + n * ds_in_stride, aux, d);
          for (int64_t c = 0; c < d; ++c) g[c] += aux[c];
        }
        store_row(g, dsum_ptr + n * d, d);
        if (dx_ptr) {
          // dx = dsum (as stored) * keep/(1-p)
          round_row_through<sum_t>(g, d);
          dropout_row_scale(aux, d, opt.seed, opt.offset, static_cast<uint64_t>(n), threshold, keep_scale);
          for (int64_t c = 0; c < d; ++c) g[c] *= aux[c];
          store_row(g, dx_ptr + n * d, d);
        }
      }
    }
  });
  if (want_dw) reduce_partials(dw_part.data(), chunks.count, d, dweight->mutable_data_ptr<scalar_t>());
  if (want_db) reduce_partials(db_part.data(), chunks.count, d, dbias->mutable_data_ptr<scalar_t>());
}

void check_rows(const at::Tensor& t, const char* name, int64_t N, int64_t d) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(0) == N && t.size(1) == d, name, " must have shape (", N, ", ", d,
              "), got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1 || d <= 1, name, " must have unit stride along its last dimension, got strides ",
              t.strides());
  TORCH_CHECK(t.stride(0) >= 0, name, " must have a non-negative row stride, got strides ", t.strides());
}

void check_param(const at::Tensor& t, const char* name, int64_t d, at::ScalarType dtype) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == d, name, " must have shape (", d, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_residual_fwd(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, double dropout_p, bool rms, bool residual_in_fp32,
    int64_t seed, int64_t offset) {
  check_cpu_float(x, "x");
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (N, d), got shape ", x.sizes());
  const int64_t N = x.size(0), d = x.size(1);
  check_rows(x, "x", N, d);
  const auto dtype = x.scalar_type();
  if (residual) {
    check_rows(*residual, "residual", N, d);
    TORCH_CHECK(residual->scalar_type() == dtype || (residual_in_fp32 && residual->scalar_type() == at::kFloat),
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
  TORCH_CHECK(eps >= 0.0, "eps must be non-negative, got ", eps);
  check_dropout_p(dropout_p);

  const auto sum_dtype = residual_in_fp32 ? at::kFloat : dtype;
  auto out = at::empty({N, d}, x.options());
  auto summed = at::empty({N, d}, x.options().dtype(sum_dtype));
  auto mean = at::empty({rms ? 0 : N}, x.options().dtype(at::kFloat));
  auto rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {out, summed, mean, rstd};
  const LnOptions opt{eps, dropout_p, rms, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  const at::Tensor* r = residual ? &*residual : nullptr;
  const at::Tensor* wp = w ? &*w : nullptr;
  const at::Tensor* bp = b ? &*b : nullptr;

  FUSED_ATTN_DISPATCH_FLOATING(dtype, "layer_norm_residual_fwd", [&] {
    const bool res_fp32 = r && r->scalar_type() == at::kFloat && dtype != at::kFloat;
    if (residual_in_fp32) {
      if (res_fp32)
        layer_norm_fwd_kernel<scalar_t, float, float>(x, r, wp, bp, opt, out, summed, mean, rstd);
      else
        layer_norm_fwd_kernel<scalar_t, scalar_t, float>(x, r, wp, bp, opt, out, summed, mean, rstd);
    } else {
      layer_norm_fwd_kernel<scalar_t, scalar_t, scalar_t>(x, r, wp, bp, opt, out, summed, mean, rstd);
    }
  });
  return {out, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_residual_bwd(
    const at::Tensor& dout, const std::optional<at::Tensor>& dsummed, const at::Tensor& summed,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& mean,
    const at::Tensor& rstd, double eps, double dropout_p, bool rms, int64_t seed, int64_t offset,
    at::ScalarType x_dtype) {
  TORCH_CHECK(is_supported_float(x_dtype), "x_dtype must be float32, float64, bfloat16 or float16, got ", x_dtype);
  check_cpu_float(summed, "summed");
  TORCH_CHECK(summed.dim() == 2, "summed must be 2-D (N, d), got shape ", summed.sizes());
  const int64_t N = summed.size(0), d = summed.size(1);
  check_rows(summed, "summed", N, d);
  const auto sum_dtype = summed.scalar_type();
  TORCH_CHECK(sum_dtype == x_dtype || sum_dtype == at::kFloat, "summed must have dtype ", x_dtype,
              " or float32, got ", sum_dtype);
  check_rows(dout, "dout", N, d);
  TORCH_CHECK(dout.scalar_type() == x_dtype, "dout must have dtype ", x_dtype, ", got ", dout.scalar_type());
  if (dsummed) {
    check_rows(*dsummed, "dsummed", N, d);
    TORCH_CHECK(dsummed->scalar_type() == sum_dtype, "dsummed must have summed's dtype ", sum_dtype, ", got ",
                dsummed->scalar_type());
  }
  std::optional<at::Tensor> w;
  if (weight) {
    check_param(*weight, "weight", d, x_dtype);
    w = weight->contiguous();
  }
  if (bias) check_param(*bias, "bias", d, x_dtype);
  TORCH_CHECK(rstd.device().is_cpu() && rstd.scalar_type() == at::kFloat && rstd.dim() == 1 && rstd.size(0) == N,
              "rstd must be a float32 CPU tensor of shape (", N, "), got ", rstd.scalar_type(), " ", rstd.sizes());
  const int64_t mean_n = rms ? 0 : N;
  TORCH_CHECK(mean.device().is_cpu() && mean.scalar_type() == at::kFloat && mean.dim() == 1 &&
                  mean.size(0) == mean_n,
              "mean must be a float32 CPU tensor of shape (", mean_n, ") (empty for rms), got ", mean.scalar_type(),
              " ", mean.sizes());
  TORCH_CHECK(eps >= 0.0, "eps must be non-negative, got ", eps);
  check_dropout_p(dropout_p);

  const auto opts = summed.options();
  auto dsum = at::empty({N, d}, opts);
  at::Tensor dx = dropout_p > 0.0 ? at::empty({N, d}, opts.dtype(x_dtype)) : at::empty({0}, opts.dtype(x_dtype));
  // Empty when absent; zeros when present (a sum over zero rows).
  at::Tensor dweight = weight ? at::zeros({d}, opts.dtype(x_dtype)) : at::empty({0}, opts);
  at::Tensor dbias = bias ? at::zeros({d}, opts.dtype(x_dtype)) : at::empty({0}, opts);
  if (N == 0) return {dsum, dx, dweight, dbias};
  const auto mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const LnOptions opt{eps, dropout_p, rms, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};
  const at::Tensor* ds_in = dsummed ? &*dsummed : nullptr;

  FUSED_ATTN_DISPATCH_FLOATING(x_dtype, "layer_norm_residual_bwd", [&] {
    auto run = [&](auto sum_tag) {
      using sum_t = decltype(sum_tag);
      layer_norm_bwd_kernel<scalar_t, sum_t>(dout, ds_in, summed, w ? &*w : nullptr, bias.has_value(), mean_c,
                                             rstd_c, opt, dsum, dropout_p > 0.0 ? &dx : nullptr,
                                             weight ? &dweight : nullptr, bias ? &dbias : nullptr);
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
