// The row kernels of layer_norm.cpp. No include guard and no namespace on purpose: layer_norm.cpp
// includes this file once per ISA, inside that ISA's namespace (see cpu_common.h).
#include "cpu_kernel_math.h"

// f(std::bool_constant<a>{}, std::bool_constant<b>{}, std::bool_constant<c>{}): runtime flags as
// compile-time ones, so the row loops carry no per-element branches.
template <typename F>
inline void with_flags(bool a, bool b, bool c, F&& f) {
  auto c_ = [&](auto fa, auto fb) {
    if (c) f(fa, fb, std::true_type{});
    else f(fa, fb, std::false_type{});
  };
  auto b_ = [&](auto fa) {
    if (b) c_(fa, std::true_type{});
    else c_(fa, std::false_type{});
  };
  if (a) b_(std::true_type{});
  else b_(std::false_type{});
}

// ---- blocked row sums ------------------------------------------------------------------------
//
// The row statistics (forward: sum(s), sum((s - mean)^2) or sum(s^2); backward: sum(g),
// sum(g * xhat)) are summed in vector lanes of A, but only over blocks of kSumBlock elements: each
// block's lanes are then widened to float64 and added to float64 lanes (WideSum<A>), summed across
// lanes at the end of the row. One float32 accumulator per lane over a whole row (d = 1M: 128K
// additions per lane) lost ~sqrt(d) ulps; a block's 64 float32 additions per lane and the
// float64 sum of the blocks keep the error at a few ulps for any d, at one widening add per block.
constexpr int64_t kSumBlock = 512;  // elements (a multiple of 16: two vectors of 8 floats / 4 doubles)

#if defined(FUSED_ATTN_HAVE_LANES)
// float64 lanes, as many as Lanes<A> has, as 32-byte vectors (a 64-byte vector type is lowered
// through the stack without AVX-512: a store and reloads per block, slower than the whole sum).
template <typename A>
struct WideSum;
template <>
struct WideSum<float> {
  typedef float f32x4 __attribute__((vector_size(16)));
  Lanes<double>::type lo = {}, hi = {};
  void add(Lanes<float>::type v) {
    f32x4 l, h;
    std::memcpy(&l, &v, sizeof(l));
    std::memcpy(&h, reinterpret_cast<const char*>(&v) + sizeof(l), sizeof(h));
    lo += __builtin_convertvector(l, Lanes<double>::type);
    hi += __builtin_convertvector(h, Lanes<double>::type);
  }
  // A tree, not a chain: the row's next pass waits for this sum.
  double sum() const {
    const auto s = lo + hi;
    return (s[0] + s[2]) + (s[1] + s[3]);
  }
};
template <>
struct WideSum<double> {
  Lanes<double>::type v = {};
  void add(Lanes<double>::type x) { v += x; }
  double sum() const { return (v[0] + v[2]) + (v[1] + v[3]); }
};
#endif

// sum(v - mu) and, with kSquares, sum((v - mu)^2) (else 0), blocked as above, v read in its own
// dtype and converted to A in registers. The forward's second pass of the corrected two-pass
// variance (mu is the first pass's mean; sum(v - mu) corrects both the mean and the variance), and
// without the squares the backward's corr (ln_bwd_row).
template <bool kSquares = true, typename A, typename V>
inline std::pair<double, double> row_dev_sums(const V* v, A mu, int64_t n) {
  int64_t i = 0;
  double s1 = 0, s2 = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
  if constexpr (kLaneIO<A, V>) {
    using L = Lanes<A>;
    const auto vmu = lanes_splat<A>(mu);
    const int64_t n_lanes = n - n % L::size;
    WideSum<A> w1, w2;
    while (i < n_lanes) {
      const int64_t end = std::min(i + kSumBlock, n_lanes);
      // two accumulators per sum: the loop-carried additions are the bound when the row is in L1.
      // (Without the squares one chain, a1: the order the backward's corr was always summed in,
      // so that its results stay the same bit for bit.)
      auto a1 = lanes_splat<A>(0), a2 = lanes_splat<A>(0), b1 = lanes_splat<A>(0), b2 = lanes_splat<A>(0);
      for (; i + 2 * L::size <= end; i += 2 * L::size) {
        const auto x0 = lanes_load_as<A>(v + i) - vmu, x1 = lanes_load_as<A>(v + i + L::size) - vmu;
        a1 += x0;
        if constexpr (kSquares) {
          b1 += x1;
          a2 += x0 * x0;
          b2 += x1 * x1;
        } else {
          a1 += x1;
        }
      }
      if (i < end) {  // the row's last vector when n_lanes / L::size is odd
        const auto x0 = lanes_load_as<A>(v + i) - vmu;
        a1 += x0;
        if constexpr (kSquares) a2 += x0 * x0;
        i += L::size;
      }
      w1.add(a1 + b1);
      if constexpr (kSquares) w2.add(a2 + b2);
    }
    s1 = w1.sum();
    s2 = w2.sum();
  }
#endif
  for (; i < n; ++i) {
    const A x = static_cast<A>(v[i]) - mu;
    s1 += x;
    if constexpr (kSquares) s2 += x * x;
  }
  return {s1, s2};
}

// The row's sums again, in float64 element by element, for a row whose blocked sums above came
// out inf or NaN. Their float32 terms and block sums overflow before the statistics do: the
// square of 2e19 (4e38) in a row of +-1e19 whose variance, 1.2e38, is representable; 32 squares
// of +-3.3e18 in one lane's block; the deviations of a constant row of 1e25 from its mean's
// rounding. Those rows came out NaN. In float64 any float32 square and any sum of them is in
// range, so the statistics, cast to A, overflow only where they do themselves (as in the
// reference and the Triton kernel). Such rows are rare (or hold an inf or a NaN, which this
// leaves as it was), so the vector loops above keep their float32 lanes.
template <typename A>
inline double row_total_wide(const A* v, int64_t n, bool squares) {
  double total = 0;
  for (int64_t i = 0; i < n; ++i) total += squares ? static_cast<double>(v[i]) * v[i] : static_cast<double>(v[i]);
  return total;
}

template <typename A>
inline std::pair<double, double> row_dev_sums_wide(const A* v, A mu, int64_t n) {
  double s1 = 0, s2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = static_cast<double>(v[i]) - static_cast<double>(mu);
    s1 += x;
    s2 += x * x;
  }
  return {s1, s2};
}

// out = ((s - mu) - corr) * rstd [* w] [+ b], converted to out's dtype in registers. The row's mean
// is the pair mu + corr (see layer_norm_fwd_kernel): s - mu is exact on the rows where it matters,
// and corr, the part of the mean a float32 mu cannot hold, is taken off the small difference.
// (RMSNorm: mu = corr = 0.)
template <bool kW, bool kB, typename A, typename T>
inline void ln_fwd_out_row(const A* s, const A* w, const A* b, A mu, A corr, A rs, T* out, int64_t d) {
  int64_t c = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
  using L = Lanes<A>;
  const auto vmu = lanes_splat<A>(mu), vcorr = lanes_splat<A>(corr), vrs = lanes_splat<A>(rs);
  for (; c + L::size <= d; c += L::size) {
    auto o = ((lanes_load(s + c) - vmu) - vcorr) * vrs;
    if constexpr (kW) o = o * lanes_load(w + c);
    if constexpr (kB) o = o + lanes_load(b + c);
    lanes_store_as<A>(out + c, o);
  }
#endif
  for (; c < d; ++c) {
    A o = ((s[c] - mu) - corr) * rs;
    if constexpr (kW) o = o * w[c];
    if constexpr (kB) o = o + b[c];
    out[c] = static_cast<T>(o);
  }
}

template <typename scalar_t, typename res_t, typename sum_t>
void layer_norm_fwd_kernel(const at::Tensor& x, const at::Tensor* residual, const at::Tensor* weight,
                           const at::Tensor* bias, const LnOptions& opt, at::Tensor& out, at::Tensor* summed,
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
  sum_t* s_ptr = summed ? summed->mutable_data_ptr<sum_t>() : nullptr;  // null: the sum is not wanted
  // the statistics are saved in A (float32, float64 for float64 inputs), as computed
  A* mean_ptr = opt.rms ? nullptr : mean.mutable_data_ptr<A>();
  A* rstd_ptr = rstd.mutable_data_ptr<A>();
  const bool dropout = opt.dropout_p > 0.0;
  const uint32_t threshold = fused_attn::dropout_threshold(opt.dropout_p);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - opt.dropout_p));
  const double inv_d = 1.0 / static_cast<double>(std::max<int64_t>(d, 1));
  const A eps = static_cast<A>(opt.eps);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(d, 1));

  // The residual, the stored sum and RMS are compile-time flags of the row loops.
  with_flags(r_ptr != nullptr, s_ptr != nullptr, opt.rms, [&](auto has_res, auto store, auto rms_flag) {
    constexpr bool kRes = decltype(has_res)::value, kStore = decltype(store)::value;
    constexpr bool kRms = decltype(rms_flag)::value;
    at::parallel_for(0, N, grain, [&](int64_t row0, int64_t row1) {
      std::vector<A> scratch(2 * d);
      A* sum = scratch.data();  // the row's sum as stored (rounded to summed's dtype), in A
      A* aux = sum + d;         // dropout multipliers
      for (int64_t n = row0; n < row1; ++n) {
        const scalar_t* xr = x_ptr + n * x_stride;
        const res_t* rr = kRes ? r_ptr + n * r_stride : nullptr;
        sum_t* sr = kStore ? s_ptr + n * d : nullptr;
        // One loop: sum = dropout(x) + residual, converted from the inputs' dtypes in registers,
        // rounded to summed's dtype (the statistics see exactly what backward will read), kept in
        // the scratch row, stored when wanted, and summed (LayerNorm) or squared and summed (RMS).
        auto sum_row = [&](const auto* xs) {
          using X = std::remove_cv_t<std::remove_pointer_t<decltype(xs)>>;
          int64_t c = 0;
          double total = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
          if constexpr (kLaneIO<A, X> && kLaneIO<A, res_t> && kLaneIO<A, sum_t>) {
            using L = Lanes<A>;
            const int64_t d_lanes = d - d % L::size;
            WideSum<A> wide;
            while (c < d_lanes) {  // blocks of kSumBlock (see row_dev_sums)
              const int64_t end = std::min(c + kSumBlock, d_lanes);
              // two accumulators: one chain of dependent adds (FMAs for RMS) bounds the loop when
              // the row is in cache (a d = 1024 row: half the time)
              auto acc0 = lanes_splat<A>(0), acc1 = lanes_splat<A>(0);
              const auto step = [&](int64_t at, auto& acc) {
                auto v = lanes_load_as<A>(xs + at);
                if constexpr (kRes) v = v + lanes_load_as<A>(rr + at);
                v = lanes_round_through<sum_t, A>(v);
                lanes_store(sum + at, v);
                if constexpr (kStore) lanes_store_as<A>(sr + at, v);
                if constexpr (kRms) acc += v * v;
                else acc += v;
              };
              for (; c + 2 * L::size <= end; c += 2 * L::size) {
                step(c, acc0);
                step(c + L::size, acc1);
              }
              if (c < end) {  // the block's last vector when its vector count is odd
                step(c, acc0);
                c += L::size;
              }
              wide.add(acc0 + acc1);
            }
            total = wide.sum();
          }
#endif
          for (; c < d; ++c) {
            A v = static_cast<A>(xs[c]);
            if constexpr (kRes) v = v + static_cast<A>(rr[c]);
            const sum_t q = static_cast<sum_t>(v);
            if constexpr (kStore) sr[c] = q;
            v = static_cast<A>(q);
            sum[c] = v;
            total += kRms ? v * v : v;
          }
          return total;
        };
        double total;  // the row's sum (RMSNorm: of squares)
        if (dropout) {
          // x * keep/(1-p) in its own loop, so it is rounded before the residual is added, as the
          // reference does (GCC contracts a multiply and an add in one loop into an FMA, which
          // would change the float32 sum's last bit), and rounded to x's dtype: dropout(x) is a
          // tensor of x's dtype in the reference and the CUDA kernel, and the contract's summed
          // is dropout(x) + residual. (Kept in float32, a 16-bit x's product differed from theirs
          // in its low bits, and so did about a fifth of the sums.)
          dropout_row_scale(aux, d, opt.seed, opt.offset, static_cast<uint64_t>(n), threshold, keep_scale);
          for (int64_t c = 0; c < d; ++c) aux[c] *= static_cast<A>(xr[c]);
          round_row_through<scalar_t>(aux, d);
          total = sum_row(static_cast<const A*>(aux));
        } else {
          total = sum_row(xr);
        }
        if (!std::isfinite(total)) total = row_total_wide(sum, d, kRms);  // (see row_total_wide)

        A mu = 0, corr = 0, var;
        if constexpr (kRms) {
          var = static_cast<A>(total * inv_d);
        } else {
          // The corrected two-pass statistics, over the row in L1/L2: with mu0 the first pass's
          // mean and e = s - mu0, mean = mu0 + sum(e)/d and var = (sum(e^2) - sum(e)^2/d)/d
          // (sum(e)^2/d <= sum(e^2) exactly, the max only guards rounding and lets a NaN through).
          // The mean is held as a pair: mu, the corrected mean rounded to A (what is saved), and
          // corr = mean - mu = sum(s - mu)/d, the part of it mu cannot hold. A single float32 mean
          // fails where the row's spread is only a few float32 ulps of its mean (|mean|/std beyond
          // ~2^22, 1e4 +- 2e-3): its rounding, up to ulp(mean)/2, shifted every xhat by up to
          // ulp(mean)/(2 std) (out off by 0.05, dx by 0.25 %). With the pair, s - mu is exact on
          // such rows (Sterbenz: s and mu within a factor of 2 of each other) and
          // xhat = ((s - mu) - corr) * rstd rounds only that small difference. corr = sum(e - hi)/d
          // with hi = mu - mu0, formed in float64 as (sum(e) - d hi)/d: for a constant row d hi is
          // sum(e) exactly and corr exactly 0 (out exactly the bias), where sum(e)/d - hi would keep
          // the division's rounding. The backward recomputes corr from the row and the saved mu
          // (ln_bwd_row).
          const A mu0 = static_cast<A>(total * inv_d);
          std::pair<double, double> dev = row_dev_sums(sum, mu0, d);
          if (!(std::isfinite(dev.first) && std::isfinite(dev.second))) dev = row_dev_sums_wide(sum, mu0, d);
          const auto [e1, e2] = dev;
          const double shift = e1 * inv_d;  // mean - mu0
          mu = static_cast<A>(static_cast<double>(mu0) + shift);
          const double hi = static_cast<double>(mu) - static_cast<double>(mu0);
          corr = static_cast<A>((e1 - static_cast<double>(d) * hi) * inv_d);
          var = static_cast<A>(std::max(e2 - e1 * shift, 0.0) * inv_d);
        }
        A rs = A(1) / std::sqrt(var + eps);
        // A LayerNorm variance beyond A's range (|s| ~ 1e19 and up in float32) gave rstd 0 and a
        // row of zeros (out = bias, dx = 0); torch gives NaN there, and so does this. (RMSNorm
        // keeps rstd 0, as torch's rms_norm does: out = s * 0.)
        if constexpr (!kRms) rs = std::isinf(var) ? std::numeric_limits<A>::quiet_NaN() : rs;
        if (mean_ptr) mean_ptr[n] = mu;
        rstd_ptr[n] = rs;

        if (w && b) ln_fwd_out_row<true, true>(sum, w, b, mu, corr, rs, out_ptr + n * d, d);
        else if (w) ln_fwd_out_row<true, false>(sum, w, b, mu, corr, rs, out_ptr + n * d, d);
        else if (b) ln_fwd_out_row<false, true>(sum, w, b, mu, corr, rs, out_ptr + n * d, d);
        else ln_fwd_out_row<false, false>(sum, w, b, mu, corr, rs, out_ptr + n * d, d);
      }
    });
  });
}

// The backward of one row, in vectorised passes over the row's inputs (s: the summed row, dy: the
// dout row, both read in their own dtypes and converted in registers; later passes re-read them
// from L1/L2 instead of keeping xhat in a scratch row). The row's mean is the pair (mu, corr) of
// the forward: mu the saved mean (in A: float32, float64 for float64 inputs), corr = sum(s - mu)/d
// the part of the mean mu cannot hold (see layer_norm_fwd_kernel), and
// xhat = ((s - mu) - corr) * rstd, s - mu exact on the rows where corr matters (RMSNorm:
// mu = corr = 0).
//   pass 0 (LayerNorm, rows whose mean is at least their std): corr, one read of s (row_dev_sums
//           without the squares). corr is within ~ulp(mu) of 0, so it moves xhat by at most
//           ~|mu| * rstd * eps(A): below xhat's own rounding where |mu| * rstd < 1, which is most
//           rows (mean near 0 against the spread), and those skip the pass. (Taken apart rather
//           than with pass 1's sums, which would move dw's sum to pass 2 and re-read dy there.)
//   pass 1: xhat, g = dy * w (kept in gbuf: recomputing it in pass 2 would let the compiler fuse
//           dy * w - mean(g) into an FMA, whose unrounded product differs from the g summed
//           here); dw += dy * xhat, db += dy; sums of g and g * xhat (blocked)
//   pass 2: ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) (+ dsummed), rounded to summed's
//           dtype and stored; with dropout dx = ds * keep/(1-p) (mult: the row's multipliers),
//           with ds rounded to x's dtype first: the reference and the CUDA kernel apply dropout
//           to dsum in x's dtype, which differs from rounding once where summed is float32
//           (residual_in_fp32 with a 16-bit x).
// A float32 sum of s - mu overflows only where the row's variance does (a deviation beyond
// ~5e36), where rstd is NaN anyway.
template <bool kHasW, bool kDw, bool kDb, typename A, typename S, typename G>
inline void ln_bwd_row(const S* s, const G* dy, const S* ds_in, const A* w, A* dw, A* db, A mu, A rs, bool rms,
                       S* ds_out, G* dx_out, const A* mult, A* gbuf, int64_t d) {
  const double d_f64 = static_cast<double>(std::max<int64_t>(d, 1));
  const A corr = !rms && std::abs(mu) * rs >= A(1) ? static_cast<A>(row_dev_sums<false>(s, mu, d).first / d_f64) : A(0);
  double sum_g = 0, sum_gx = 0;
  int64_t c = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
  constexpr bool kLanes = kLaneIO<A, S> && kLaneIO<A, G>;
  using L = Lanes<A>;
  const auto vmu = lanes_splat<A>(mu), vcorr = lanes_splat<A>(corr), vrs = lanes_splat<A>(rs);
  if constexpr (kLanes) {
    const int64_t d_lanes = d - d % L::size;
    WideSum<A> wide_g, wide_gx;
    while (c < d_lanes) {  // blocks of kSumBlock, as the forward's sums
      const int64_t end = std::min(c + kSumBlock, d_lanes);
      auto acc_g = lanes_splat<A>(0), acc_gx = lanes_splat<A>(0);
      for (; c < end; c += L::size) {
        const auto xh = ((lanes_load_as<A>(s + c) - vmu) - vcorr) * vrs;
        auto g = lanes_load_as<A>(dy + c);
        if constexpr (kDw) lanes_store(dw + c, lanes_load(dw + c) + g * xh);
        if constexpr (kDb) lanes_store(db + c, lanes_load(db + c) + g);
        if constexpr (kHasW) {
          g = g * lanes_load(w + c);
          lanes_store(gbuf + c, g);
        }
        acc_g += g;
        acc_gx += g * xh;
      }
      wide_g.add(acc_g);
      wide_gx.add(acc_gx);
    }
    sum_g = wide_g.sum();
    sum_gx = wide_gx.sum();
  }
#endif
  for (; c < d; ++c) {
    const A xh = ((static_cast<A>(s[c]) - mu) - corr) * rs;
    A g = static_cast<A>(dy[c]);
    if constexpr (kDw) dw[c] += g * xh;
    if constexpr (kDb) db[c] += g;
    if constexpr (kHasW) {
      g *= w[c];
      gbuf[c] = g;
    }
    sum_g += g;
    sum_gx += g * xh;
  }
  const double inv_d = 1.0 / d_f64;
  const A mean_gx = static_cast<A>(sum_gx * inv_d);
  const A mean_g = rms ? A(0) : static_cast<A>(sum_g * inv_d);

  c = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
  if constexpr (kLanes) {
    const auto vmg = lanes_splat<A>(mean_g), vmgx = lanes_splat<A>(mean_gx);
    for (; c + L::size <= d; c += L::size) {
      const auto xh = ((lanes_load_as<A>(s + c) - vmu) - vcorr) * vrs;
      const auto g = kHasW ? lanes_load(gbuf + c) : lanes_load_as<A>(dy + c);
      auto ds = vrs * (g - vmg - xh * vmgx);
      if (ds_in) ds = ds + lanes_load_as<A>(ds_in + c);
      ds = lanes_round_through<S, A>(ds);
      lanes_store_as<A>(ds_out + c, ds);
      if (dx_out) lanes_store_as<A>(dx_out + c, lanes_round_through<G, A>(ds) * lanes_load(mult + c));
    }
  }
#endif
  for (; c < d; ++c) {
    const A xh = ((static_cast<A>(s[c]) - mu) - corr) * rs;
    const A g = kHasW ? gbuf[c] : static_cast<A>(dy[c]);
    A ds = rs * (g - mean_g - xh * mean_gx);
    if (ds_in) ds += static_cast<A>(ds_in[c]);
    const S q = static_cast<S>(ds);
    ds_out[c] = q;
    if (dx_out) dx_out[c] = static_cast<G>(static_cast<A>(static_cast<G>(q)) * mult[c]);
  }
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
  const A* mean_ptr = opt.rms ? nullptr : mean.const_data_ptr<A>();  // (the forward's, in A)
  const A* rstd_ptr = rstd.const_data_ptr<A>();
  std::vector<A> w_acc;
  if (kHasW) {
    w_acc.resize(d);
    load_row(weight->const_data_ptr<scalar_t>(), w_acc.data(), d);
  }
  sum_t* dsum_ptr = dsum.mutable_data_ptr<sum_t>();
  scalar_t* dx_ptr = dx ? dx->mutable_data_ptr<scalar_t>() : nullptr;
  const uint32_t threshold = fused_attn::dropout_threshold(opt.dropout_p);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - opt.dropout_p));

  const RowChunks chunks = fixed_row_chunks(N);
  std::vector<A> dw_part(kDw ? chunks.count * d : 0, A(0));
  std::vector<A> db_part(kDb ? chunks.count * d : 0, A(0));

  at::parallel_for(0, chunks.count, 1, [&](int64_t k0, int64_t k1) {
    std::vector<A> mult(dx_ptr ? d : 0);  // the row's dropout multipliers
    std::vector<A> gbuf(kHasW ? d : 0);   // dout * weight
    for (int64_t k = k0; k < k1; ++k) {
      A* dw = kDw ? dw_part.data() + k * d : nullptr;
      A* db = kDb ? db_part.data() + k * d : nullptr;
      for (int64_t n = chunks.begin(k); n < chunks.end(k, N); ++n) {
        const sum_t* sr = s_ptr + n * s_stride;
        const A mu = mean_ptr ? mean_ptr[n] : A(0), rs = rstd_ptr[n];
        if (dx_ptr)
          dropout_row_scale(mult.data(), d, opt.seed, opt.offset, static_cast<uint64_t>(n), threshold, keep_scale);
        ln_bwd_row<kHasW, kDw, kDb>(sr, g_ptr + n * g_stride, ds_in_ptr ? ds_in_ptr + n * ds_in_stride : nullptr,
                                    kHasW ? w_acc.data() : nullptr, dw, db, mu, rs, opt.rms,
                                    dsum_ptr + n * d, dx_ptr ? dx_ptr + n * d : nullptr, mult.data(), gbuf.data(), d);
      }
    }
  });
  if (kDw) reduce_partials(dw_part.data(), chunks.count, d, dweight->mutable_data_ptr<scalar_t>());
  if (kDb) reduce_partials(db_part.data(), chunks.count, d, dbias->mutable_data_ptr<scalar_t>());
}
