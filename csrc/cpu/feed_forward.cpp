// The feed-forward block on CPU, forward and backward (fused_attn_C::feed_forward_*).
//
//     pre = x @ w1^T + b1             (T, F1)     F1 = d_ff, or 2*d_ff = [gate | up] for swiglu/geglu
//     h   = dropout(act(pre))         (T, d_ff)   act(pre), or act(gate) * up when gated
//     out = h @ w2^T + b2             (T, d_out)
//
// The GEMMs go through ATen's CPU BLAS (MKL / oneDNN). Everything between them is ONE pass over
// the GEMM output, row by row in parallel: add b1 (stored in place: that is the saved `pre`),
// apply the activation and the dropout, write h. h is not saved: backward recomputes it.
//
// Backward, with dh = dout @ w2 (T, d_ff), ONE pass over (pre, dh) recomputes h (needed for
// dw2 = dout^T @ h) and writes dpre = dh * keep/(1-p) * act'(pre) -- for the gated ones
// d(gate) = dh' * up * act'(gate) and d(up) = dh' * act(gate) -- into dh's own buffer when the
// shapes allow, and accumulates db1 = colsum(dpre) in float32 per fixed row chunk (deterministic,
// as in layer_norm.cpp). Then dw1 = dpre^T @ x, dx = dpre @ w1, dw2, db2 = colsum(dout).
//
// bfloat16/float16 GEMMs: on CPUs without native bf16/fp16 matrix instructions (AVX2-only
// machines like this project's CI), oneDNN's half-precision GEMM is ~8x slower than converting
// to float32 and calling sgemm, so there the GEMMs run in float32 on converted operands; the
// fused pass then also rounds `pre` to the input dtype (the saved pre) and keeps h in float32
// for the next GEMM. With native support (AVX512-BF16 / AVX512-FP16, e.g. AMX machines), the
// GEMMs run in the input dtype.
#include <torch/library.h>

#include <string_view>

#include "cpu_common.h"

namespace fused_attn::cpu {
namespace {

enum class Act { Relu, Gelu, GeluTanh, Silu, SwiGlu, GeGlu };

Act parse_activation(std::string_view name) {
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  if (name == "swiglu") return Act::SwiGlu;
  if (name == "geglu") return Act::GeGlu;
  TORCH_CHECK(false, "activation must be one of relu, gelu, gelu_tanh, silu, swiglu, geglu, got '", name, "'");
}

constexpr bool is_gated(Act a) { return a == Act::SwiGlu || a == Act::GeGlu; }

// The scalar activation and its derivative (the base function of the gated ones: silu for
// swiglu, exact gelu for geglu). Branch-free so the row loops vectorise.
//   gelu(x)      = x * Phi(x),            gelu'(x)  = Phi(x) + x * phi(x)
//   gelu_tanh(x) = x * sigmoid(2u),       u = sqrt(2/pi) * (x + 0.044715 x^3)   (0.5(1+tanh u) = sigmoid(2u))
//                  gelu_tanh'(x) = s + x * 2 s (1-s) * u'(x)
//   silu(x)      = x * s, s = sigmoid(x), silu'(x) = s * (1 + x (1-s))
template <Act act, typename A>
inline A act_value(A x) {
  if constexpr (act == Act::Relu) {
    return x > A(0) ? x : A(0);
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
    value = x > A(0) ? x : A(0);
    grad = x > A(0) ? A(1) : A(0);
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

struct FfnOptions {
  double dropout_p;
  uint64_t seed, offset;
};

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

template <typename F>
void dispatch_activation(Act act, F&& f) {
  switch (act) {
    case Act::Relu: return f(std::integral_constant<Act, Act::Relu>{});
    case Act::Gelu: return f(std::integral_constant<Act, Act::Gelu>{});
    case Act::GeluTanh: return f(std::integral_constant<Act, Act::GeluTanh>{});
    case Act::Silu: return f(std::integral_constant<Act, Act::Silu>{});
    case Act::SwiGlu: return f(std::integral_constant<Act, Act::SwiGlu>{});
    case Act::GeGlu: return f(std::integral_constant<Act, Act::GeGlu>{});
  }
}

// The dtype the GEMMs run in (see the file comment).
at::ScalarType gemm_dtype(at::ScalarType t) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool native_bf16 = __builtin_cpu_supports("avx512bf16");
  static const bool native_fp16 = __builtin_cpu_supports("avx512fp16");
  if (t == at::kBFloat16 && !native_bf16) return at::kFloat;
  if (t == at::kHalf && !native_fp16) return at::kFloat;
#endif
  return t;
}

void check_matrix(const at::Tensor& t, const char* name, at::ScalarType dtype) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  check_cpu_float(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, "), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

// Shapes shared by both halves: returns d_ff.
int64_t check_weights(const at::Tensor& w1, const at::Tensor& w2, Act act, int64_t d, at::ScalarType dtype) {
  check_matrix(w1, "w1", dtype);
  check_matrix(w2, "w2", dtype);
  TORCH_CHECK(w1.size(1) == d, "w1 must have shape (F1, ", d, "), got ", w1.sizes());
  const int64_t F1 = w1.size(0);
  if (is_gated(act)) TORCH_CHECK(F1 % 2 == 0, "gated activations need an even w1.shape[0], got ", w1.sizes());
  const int64_t dff = is_gated(act) ? F1 / 2 : F1;
  TORCH_CHECK(w2.size(1) == dff, "w2 must have shape (d_out, ", dff, "), got ", w2.sizes());
  return dff;
}

inline at::Tensor to_gemm(const at::Tensor& t, at::ScalarType g) {
  return t.scalar_type() == g ? t : t.to(g);
}

std::tuple<at::Tensor, at::Tensor> feed_forward_fwd(const at::Tensor& x, const at::Tensor& w1,
                                                    const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                                    const std::optional<at::Tensor>& b2, c10::string_view activation,
                                                    double dropout_p, int64_t seed, int64_t offset) {
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()));
  check_matrix(x, "x", x.scalar_type());
  const auto dtype = x.scalar_type();
  const int64_t d = x.size(1);
  const int64_t dff = check_weights(w1, w2, act, d, dtype);
  const int64_t F1 = w1.size(0), d_out = w2.size(0);
  if (b1) check_vector(*b1, "b1", F1, dtype);
  if (b2) check_vector(*b2, "b2", d_out, dtype);
  check_dropout_p(dropout_p);
  const FfnOptions opt{dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};

  const auto g = gemm_dtype(dtype);
  const auto b1c = b1 ? b1->contiguous() : at::Tensor();
  // pre_g: x @ w1^T in the GEMM dtype; the pass adds b1 in place (it is then the saved pre when
  // g == dtype) or writes the rounded pre separately.
  at::Tensor pre_g = at::mm(to_gemm(x, g), to_gemm(w1, g).t());
  at::Tensor pre = g == dtype ? pre_g : at::empty({x.size(0), F1}, x.options());
  at::Tensor h = at::empty({x.size(0), dff}, x.options().dtype(g));
  FUSED_ATTN_DISPATCH_FLOATING(dtype, "feed_forward_fwd", [&] {
    dispatch_activation(act, [&](auto act_c) {
      if (g == dtype)
        ffn_fwd_pass<decltype(act_c)::value, scalar_t, scalar_t>(pre_g, b1 ? &b1c : nullptr, nullptr, h, opt);
      else
        ffn_fwd_pass<decltype(act_c)::value, scalar_t, float>(pre_g, b1 ? &b1c : nullptr, &pre, h, opt);
    });
  });
  at::Tensor out = b2 ? at::addmm(to_gemm(*b2, g), h, to_gemm(w2, g).t()) : at::mm(h, to_gemm(w2, g).t());
  if (g != dtype) out = out.to(dtype);
  return {out.contiguous(), pre.contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feed_forward_bwd(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& pre,
    c10::string_view activation, double dropout_p, int64_t seed, int64_t offset, bool has_b1, bool has_b2) {
  const Act act = parse_activation(std::string_view(activation.data(), activation.size()));
  check_matrix(x, "x", x.scalar_type());
  const auto dtype = x.scalar_type();
  const int64_t T = x.size(0), d = x.size(1);
  const int64_t dff = check_weights(w1, w2, act, d, dtype);
  const int64_t F1 = w1.size(0), d_out = w2.size(0);
  check_matrix(dout, "dout", dtype);
  TORCH_CHECK(dout.size(0) == T && dout.size(1) == d_out, "dout must have shape (", T, ", ", d_out, "), got ",
              dout.sizes());
  check_matrix(pre, "pre", dtype);
  TORCH_CHECK(pre.size(0) == T && pre.size(1) == F1, "pre must have shape (", T, ", ", F1, "), got ", pre.sizes());
  check_dropout_p(dropout_p);
  const FfnOptions opt{dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};

  const auto g = gemm_dtype(dtype);
  const at::Tensor dout_g = to_gemm(dout, g), x_g = to_gemm(x, g);
  const at::Tensor pre_c = pre.contiguous();
  at::Tensor dh = at::mm(dout_g, to_gemm(w2, g));  // (T, d_ff), fresh and contiguous
  at::Tensor h = at::empty({T, dff}, x.options().dtype(g));
  // Not gated: dpre has dh's shape and overwrites it row by row (each row is read first).
  at::Tensor dpre = is_gated(act) ? at::empty({T, F1}, x.options().dtype(g)) : dh;
  at::Tensor db1 = has_b1 ? at::zeros({F1}, x.options()) : at::empty({0}, x.options());
  FUSED_ATTN_DISPATCH_FLOATING(dtype, "feed_forward_bwd", [&] {
    dispatch_activation(act, [&](auto act_c) {
      if (g == dtype)
        ffn_bwd_pass<decltype(act_c)::value, scalar_t, scalar_t>(pre_c, dh, h, dpre, has_b1 ? &db1 : nullptr, opt);
      else
        ffn_bwd_pass<decltype(act_c)::value, scalar_t, float>(pre_c, dh, h, dpre, has_b1 ? &db1 : nullptr, opt);
    });
  });
  at::Tensor dw2 = at::mm(dout_g.t(), h);
  at::Tensor dw1 = at::mm(dpre.t(), x_g);
  at::Tensor dx = at::mm(dpre, to_gemm(w1, g));
  at::Tensor db2 = has_b2 ? at::sum(dout, {0}, false, dtype == at::kDouble ? at::kDouble : at::kFloat).to(dtype)
                          : at::empty({0}, x.options());
  if (g != dtype) {
    dx = dx.to(dtype);
    dw1 = dw1.to(dtype);
    dw2 = dw2.to(dtype);
  }
  return {dx.contiguous(), dw1.contiguous(), db1, dw2.contiguous(), db2.contiguous()};
}

}  // namespace
}  // namespace fused_attn::cpu

TORCH_LIBRARY_IMPL(fused_attn_C, CPU, m) {
  m.impl("feed_forward_fwd", &fused_attn::cpu::feed_forward_fwd);
  m.impl("feed_forward_bwd", &fused_attn::cpu::feed_forward_bwd);
}
