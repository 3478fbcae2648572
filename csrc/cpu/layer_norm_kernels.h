// The row kernels of layer_norm.cpp. No include guard and no namespace on purpose: layer_norm.cpp
// includes this file once per ISA, inside that ISA's namespace (see cpu_common.h).
#include "cpu_kernel_math.h"

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
  const A* w = w_acc.empty() ? nullptr : w_acc.data();
  const A* b = b_acc.empty() ? nullptr : b_acc.data();
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
    A* aux = buf + d;  // conversion scratch or dropout multipliers
    for (int64_t n = row0; n < row1; ++n) {
      const scalar_t* xr = x_ptr + n * x_stride;
      const res_t* rr = r_ptr ? r_ptr + n * r_stride : nullptr;
      sum_t* sr = s_ptr + n * d;
      // One loop: s = dropout(x) + residual, rounded to summed's dtype and stored; the rounded
      // value (what backward sees) goes to buf for the statistics. No row copies.
      auto sum_row = [&](const auto* src, auto has_residual) {
        for (int64_t c = 0; c < d; ++c) {
          A v = static_cast<A>(src[c]);
          if constexpr (decltype(has_residual)::value) v += static_cast<A>(rr[c]);
          const sum_t q = static_cast<sum_t>(v);
          sr[c] = q;
          buf[c] = static_cast<A>(q);
        }
      };
      if (dropout) {
        // x * keep/(1-p) in its own loop: rounded before the residual is added, as the
        // reference does (a fused multiply-add here would change the float32 sum's last bit).
        dropout_row_scale(aux, d, opt.seed, opt.offset, static_cast<uint64_t>(n), threshold, keep_scale);
        for (int64_t c = 0; c < d; ++c) aux[c] *= static_cast<A>(xr[c]);
        if (rr) sum_row(static_cast<const A*>(aux), std::true_type{});
        else sum_row(static_cast<const A*>(aux), std::false_type{});
      } else {
        if (rr) sum_row(xr, std::true_type{});
        else sum_row(xr, std::false_type{});
      }

      A mu = 0, var;
      if (opt.rms) {
        var = row_dot(buf, buf, d) * inv_d;
      } else {
        mu = row_sum(buf, d) * inv_d;
        var = row_sq_dev(buf, mu, d) * inv_d;
      }
      const A rs = A(1) / std::sqrt(var + eps);
      if (mean_ptr) mean_ptr[n] = static_cast<float>(mu);
      rstd_ptr[n] = static_cast<float>(rs);

      scalar_t* orow = out_ptr + n * d;
      if (w && b) {
        for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<scalar_t>((buf[c] - mu) * rs * w[c] + b[c]);
      } else if (w) {
        for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<scalar_t>((buf[c] - mu) * rs * w[c]);
      } else if (b) {
        for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<scalar_t>((buf[c] - mu) * rs + b[c]);
      } else {
        for (int64_t c = 0; c < d; ++c) orow[c] = static_cast<scalar_t>((buf[c] - mu) * rs);
      }
    }
  });
}

// One vectorised pass over a row of the backward (s, g_in: the summed and dout rows):
// xhat = (s - mu) * rstd, g = dout * w, dw += dout * xhat, db += dout; returns (sum g, sum g * xhat).
template <typename A, bool kHasW, bool kDw, bool kDb>
inline std::pair<A, A> ln_bwd_row_pass(const A* s, const A* g_in, A* xhat, A* g, const A* w, A* dw, A* db, A mu,
                                        A rs, int64_t d) {
  int64_t c = 0;
  A sg = 0, sgx = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
  using L = Lanes<A>;
  const auto vmu = lanes_splat<A>(mu), vrs = lanes_splat<A>(rs);
  auto sum_g = lanes_splat<A>(0), sum_gx = lanes_splat<A>(0);
  for (; c + L::size <= d; c += L::size) {
    const auto xh = (lanes_load(s + c) - vmu) * vrs;
    lanes_store(xhat + c, xh);
    auto gv = lanes_load(g_in + c);
    if constexpr (kDw) lanes_store(dw + c, lanes_load(dw + c) + gv * xh);
    if constexpr (kDb) lanes_store(db + c, lanes_load(db + c) + gv);
    if constexpr (kHasW) gv = gv * lanes_load(w + c);
    lanes_store(g + c, gv);
    sum_g += gv;
    sum_gx += gv * xh;
  }
  sg = lanes_sum<A>(sum_g);
  sgx = lanes_sum<A>(sum_gx);
#endif
  for (; c < d; ++c) {
    const A xh = (s[c] - mu) * rs;
    xhat[c] = xh;
    A gv = g_in[c];
    if constexpr (kDw) dw[c] += gv * xh;
    if constexpr (kDb) db[c] += gv;
    if constexpr (kHasW) gv *= w[c];
    g[c] = gv;
    sg += gv;
    sgx += gv * xh;
  }
  return {sg, sgx};
}

template <typename scalar_t, typename sum_t, bool kHasW, bool kDw, bool kDb>
void layer_norm_bwd_kernel(const at::Tensor& dout, const at::Tensor* dsummed, const at::Tensor& summed,
                           const at::Tensor* weight, const at::Tensor& mean, const at::Tensor& rstd,
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
  if (kHasW) {
    w_acc.resize(d);
    load_row(weight->const_data_ptr<scalar_t>(), w_acc.data(), d);
  }
  sum_t* dsum_ptr = dsum.mutable_data_ptr<sum_t>();
  scalar_t* dx_ptr = dx ? dx->mutable_data_ptr<scalar_t>() : nullptr;
  const uint32_t threshold = fused_attn::dropout_threshold(opt.dropout_p);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - opt.dropout_p));
  const A inv_d = A(1) / static_cast<A>(std::max<int64_t>(d, 1));
  const A eps = static_cast<A>(opt.eps);

  const RowChunks chunks = fixed_row_chunks(N);
  std::vector<A> dw_part(kDw ? chunks.count * d : 0, A(0));
  std::vector<A> db_part(kDb ? chunks.count * d : 0, A(0));

  at::parallel_for(0, chunks.count, 1, [&](int64_t k0, int64_t k1) {
    std::vector<A> scratch(3 * d);
    A* xhat = scratch.data();
    A* g = xhat + d;
    A* aux = g + d;
    for (int64_t k = k0; k < k1; ++k) {
      A* dw = kDw ? dw_part.data() + k * d : nullptr;
      A* db = kDb ? db_part.data() + k * d : nullptr;
      for (int64_t n = chunks.begin(k); n < chunks.end(k, N); ++n) {
        // Rows already in the accumulation type are read in place; others are converted once.
        const A* s_in;
        const A* g_in;
        if constexpr (std::is_same_v<sum_t, A>) {
          s_in = s_ptr + n * s_stride;
        } else {
          load_row(s_ptr + n * s_stride, xhat, d);
          s_in = xhat;
        }
        if constexpr (std::is_same_v<scalar_t, A>) {
          g_in = g_ptr + n * g_stride;
        } else {
          load_row(g_ptr + n * g_stride, g, d);
          g_in = g;
        }
        A mu, rs;
        if constexpr (std::is_same_v<A, double>) {
          // float64 (gradcheck): the saved float32 statistics are not exact enough; recompute.
          mu = opt.rms ? 0.0 : row_sum(s_in, d) * inv_d;
          rs = 1.0 / std::sqrt(row_sq_dev(s_in, mu, d) * inv_d + eps);
        } else {
          mu = mean_ptr ? static_cast<A>(mean_ptr[n]) : A(0);
          rs = static_cast<A>(rstd_ptr[n]);
        }
        const auto [sum_g, sum_gx] = ln_bwd_row_pass<A, kHasW, kDw, kDb>(
            s_in, g_in, xhat, g, kHasW ? w_acc.data() : nullptr, dw, db, mu, rs, d);
        const A mean_gx = sum_gx * inv_d;
        const A mean_g = opt.rms ? A(0) : sum_g * inv_d;
        // dsum = rstd * (g - mean(g) - xhat * mean(g xhat)) + dsummed, stored in summed's dtype;
        // g keeps the stored (rounded) value for dx.
        sum_t* dsr = dsum_ptr + n * d;
        if (ds_in_ptr) {
          const sum_t* dsin = ds_in_ptr + n * ds_in_stride;
          for (int64_t c = 0; c < d; ++c) {
            const sum_t q = static_cast<sum_t>(rs * (g[c] - mean_g - xhat[c] * mean_gx) + static_cast<A>(dsin[c]));
            dsr[c] = q;
            g[c] = static_cast<A>(q);
          }
        } else {
          for (int64_t c = 0; c < d; ++c) {
            const sum_t q = static_cast<sum_t>(rs * (g[c] - mean_g - xhat[c] * mean_gx));
            dsr[c] = q;
            g[c] = static_cast<A>(q);
          }
        }
        if (dx_ptr) {  // dx = dsum * keep/(1-p)
          dropout_row_scale(aux, d, opt.seed, opt.offset, static_cast<uint64_t>(n), threshold, keep_scale);
          scalar_t* dxr = dx_ptr + n * d;
          for (int64_t c = 0; c < d; ++c) dxr[c] = static_cast<scalar_t>(g[c] * aux[c]);
        }
      }
    }
  });
  if (kDw) reduce_partials(dw_part.data(), chunks.count, d, dweight->mutable_data_ptr<scalar_t>());
  if (kDb) reduce_partials(db_part.data(), chunks.count, d, dbias->mutable_data_ptr<scalar_t>());
}
