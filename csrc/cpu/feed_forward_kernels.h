// The row kernels of feed_forward.cpp. No include guard and no namespace on purpose:
// feed_forward.cpp includes this file once per ISA, inside that ISA's namespace (see cpu_common.h).
#include "cpu_kernel_math.h"

// The scalar activation and its derivative (the base function of the gated ones: silu for
// swiglu, exact gelu for geglu). Branch-free so the row loops vectorise.
//   gelu(x)      = x * Phi(x),            gelu'(x)  = Phi(x) + x * phi(x)
//   gelu_tanh(x) = x * sigmoid(2u),       u = sqrt(2/pi) * (x + 0.044715 x^3)   (0.5(1+tanh u) = sigmoid(2u))
//                  gelu_tanh'(x) = s + x * 2 s (1-s) * u'(x)
//   silu(x)      = x * s, s = sigmoid(x), silu'(x) = s * (1 + x (1-s))
template <Act act, typename A>
inline A act_value(A x) {
  if constexpr (act == Act::Relu) {
    return x < A(0) ? A(0) : x;  // not x > 0 ? x : 0: NaN must propagate, as in torch.relu
  } else if constexpr (act == Act::Gelu || act == Act::GeGlu) {
    return x * (A(0.5) + A(0.5) * erf_f(x * A(0.7071067811865476)));
  } else if constexpr (act == Act::GeluTanh) {
    const A u = A(0.7978845608028654) * (x + A(0.044715) * x * x * x);
    return x * sigmoid_f(A(2) * u);
  } else {  // Silu, SwiGlu
    return x * sigmoid_f(x);
  }
}

template <Act act, typename A>
inline void act_value_and_grad(A x, A& value, A& grad) {
  if constexpr (act == Act::Relu) {
    value = x < A(0) ? A(0) : x;
    grad = x <= A(0) ? A(0) : A(1);  // torch's rule (relu(x) <= 0 ? 0 : 1): a NaN x passes the gradient
  } else if constexpr (act == Act::Gelu || act == Act::GeGlu) {
    const A cdf = A(0.5) + A(0.5) * erf_f(x * A(0.7071067811865476));
    const A pdf = A(0.3989422804014327) * exp_f(A(-0.5) * x * x);
    value = x * cdf;
    grad = cdf + x * pdf;
  } else if constexpr (act == Act::GeluTanh) {
    constexpr A k = A(0.7978845608028654), c = A(0.044715);
    const A x2 = x * x;
    const A s = sigmoid_f(A(2) * k * (x + c * x2 * x));
    value = x * s;
    grad = s + x * A(2) * s * (A(1) - s) * k * (A(1) + A(3) * c * x2);
  } else {  // Silu, SwiGlu
    const A s = sigmoid_f(x);
    value = x * s;
    grad = s * (A(1) + x * (A(1) - s));
  }
}


// Rows per parallel task: enough elements to amortise the task.
inline int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(cols, 1)); }

// Forward pass over the GEMM output pre_g (T, F1) in the GEMM dtype gemm_t:
//   pre_g += b1 (in place); if gemm_t != scalar_t also pre (scalar_t) = rounded pre_g;
//   h (T, d_ff) in gemm_t = dropout(act(pre)), computed from the rounded (saved) pre.
template <Act act, typename scalar_t, typename gemm_t>
void ffn_fwd_pass(at::Tensor& pre_g, const at::Tensor* b1, at::Tensor* pre_out, at::Tensor& h, const FfnOptions& opt) {
  using A = acc_t<scalar_t>;
  const int64_t T = pre_g.size(0), F1 = pre_g.size(1), dff = h.size(1);
  gemm_t* pg = pre_g.mutable_data_ptr<gemm_t>();
  scalar_t* po = pre_out ? pre_out->mutable_data_ptr<scalar_t>() : nullptr;
  gemm_t* hp = h.mutable_data_ptr<gemm_t>();
  std::vector<A> b_acc;
  if (b1) {
    b_acc.resize(F1);
    load_row(b1->const_data_ptr<scalar_t>(), b_acc.data(), F1);
  }
  const bool dropout = opt.dropout_p > 0.0;
  const uint32_t threshold = fused_attn::dropout_threshold(opt.dropout_p);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - opt.dropout_p));

  at::parallel_for(0, T, row_grain(F1), [&](int64_t t0, int64_t t1) {
    std::vector<A> scratch(F1 + 2 * dff);
    A* p = scratch.data();  // the pre row
    A* hv = p + F1;         // the h row
    A* mult = hv + dff;     // dropout multipliers
    for (int64_t t = t0; t < t1; ++t) {
      load_row(pg + t * F1, p, F1);
      if (!b_acc.empty()) {
        for (int64_t c = 0; c < F1; ++c) p[c] += b_acc[c];
        if (!po) {  // pre_g is the saved pre: store it and use its rounded value
          store_row(p, pg + t * F1, F1);
          round_row_through<gemm_t>(p, F1);
        }
      }
      if (po) {
        store_row(p, po + t * F1, F1);
        round_row_through<scalar_t>(p, F1);
      }
      if constexpr (is_gated(act)) {
        const A* up = p + dff;
        for (int64_t c = 0; c < dff; ++c) hv[c] = act_value<act>(p[c]) * up[c];
      } else {
        for (int64_t c = 0; c < dff; ++c) hv[c] = act_value<act>(p[c]);
      }
      if (dropout) {
        dropout_row_scale(mult, dff, opt.seed, opt.offset, static_cast<uint64_t>(t), threshold, keep_scale);
        for (int64_t c = 0; c < dff; ++c) hv[c] *= mult[c];
      }
      store_row(hv, hp + t * dff, dff);
    }
  });
}

// Backward pass over (pre, dh): writes h (T, d_ff) and dpre (T, F1) in gemm_t (dpre may be dh's
// own buffer when not gated) and, when db1 is wanted, its column sums.
template <Act act, typename scalar_t, typename gemm_t>
void ffn_bwd_pass(const at::Tensor& pre, const at::Tensor& dh, at::Tensor& h, at::Tensor& dpre, at::Tensor* db1,
                  const FfnOptions& opt) {
  using A = acc_t<scalar_t>;
  const int64_t T = pre.size(0), F1 = pre.size(1), dff = dh.size(1);
  const scalar_t* pp = pre.const_data_ptr<scalar_t>();
  const gemm_t* dhp = dh.const_data_ptr<gemm_t>();
  gemm_t* hp = h.mutable_data_ptr<gemm_t>();
  gemm_t* dpp = dpre.mutable_data_ptr<gemm_t>();
  const bool dropout = opt.dropout_p > 0.0;
  const uint32_t threshold = fused_attn::dropout_threshold(opt.dropout_p);
  const A keep_scale = static_cast<A>(1.0 / (1.0 - opt.dropout_p));
  const RowChunks chunks = fixed_row_chunks(T);
  std::vector<A> db_part(db1 ? chunks.count * F1 : 0, A(0));

  at::parallel_for(0, chunks.count, 1, [&](int64_t k0, int64_t k1) {
    std::vector<A> scratch(2 * F1 + 2 * dff);
    A* p = scratch.data();   // pre row, then overwritten by dpre
    A* g = p + F1;           // dh row, then h
    A* mult = g + dff;       // dropout multipliers
    A* dp = mult + dff;      // dpre row
    for (int64_t k = k0; k < k1; ++k) {
      A* db = db1 ? db_part.data() + k * F1 : nullptr;
      for (int64_t t = chunks.begin(k); t < chunks.end(k, T); ++t) {
        load_row(pp + t * F1, p, F1);
        load_row(dhp + t * dff, g, dff);
        if (dropout) {
          dropout_row_scale(mult, dff, opt.seed, opt.offset, static_cast<uint64_t>(t), threshold, keep_scale);
          for (int64_t c = 0; c < dff; ++c) g[c] *= mult[c];  // dh * keep/(1-p)
        }
        if constexpr (is_gated(act)) {
          const A* up = p + dff;
          for (int64_t c = 0; c < dff; ++c) {
            A a, da;
            act_value_and_grad<act>(p[c], a, da);
            dp[c] = g[c] * up[c] * da;  // d gate
            dp[dff + c] = g[c] * a;     // d up
            g[c] = a * up[c];           // h before dropout
          }
        } else {
          for (int64_t c = 0; c < dff; ++c) {
            A a, da;
            act_value_and_grad<act>(p[c], a, da);
            dp[c] = g[c] * da;
            g[c] = a;
          }
        }
        if (dropout) {
          for (int64_t c = 0; c < dff; ++c) g[c] *= mult[c];
        }
        store_row(g, hp + t * dff, dff);
        if constexpr (!std::is_same_v<gemm_t, A>) round_row_through<gemm_t>(dp, F1);
        store_row(dp, dpp + t * F1, F1);
        if (db) {
          for (int64_t c = 0; c < F1; ++c) db[c] += dp[c];
        }
      }
    }
  });
  if (db1) reduce_partials(db_part.data(), chunks.count, F1, db1->mutable_data_ptr<scalar_t>());
}

