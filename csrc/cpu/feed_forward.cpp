// The feed-forward block on CPU, forward and backward (fused_attn_C::feed_forward_*).
//
//     pre = x @ w1^T + b1             (T, F1)     F1 = d_ff, or 2*d_ff = [gate | up] for swiglu/geglu
//     h   = dropout(act(pre))         (T, d_ff)   act(pre), or act(gate) * up when gated
//     out = h @ w2^T + b2             (T, d_out)
//
// The GEMMs go through ATen's CPU BLAS (MKL / oneDNN). Everything between them is ONE pass over
// the GEMM output, row by row in parallel: add b1 when the GEMM did not (float32 GEMMs on
// converted half operands; then it also writes the rounded `pre`), apply the activation and the
// dropout, write h. h is not saved: backward recomputes it.
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

#include <cstdlib>
#include <string>
#include <string_view>

#include "cpu_common.h"
#include "scratch.h"

namespace fused_attn::cpu {

enum class Act { Relu, Gelu, GeluTanh, Silu, SwiGlu, GeGlu };

inline Act parse_activation(std::string_view name) {
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  if (name == "swiglu") return Act::SwiGlu;
  if (name == "geglu") return Act::GeGlu;
  FA_CHECK(false, "activation must be one of relu, gelu, gelu_tanh, silu, swiglu, geglu, got '", name, "'");
}

constexpr bool is_gated(Act a) { return a == Act::SwiGlu || a == Act::GeGlu; }

struct FfnOptions {
  double dropout_p;
  uint64_t seed, offset;
};

namespace isa_default {
namespace {
#include "feed_forward_kernels.h"
}  // namespace
}  // namespace isa_default
}  // namespace fused_attn::cpu

#if defined(FUSED_ATTN_AVX2_CLONES)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FUSED_ATTN_ISA_AVX2 1
namespace fused_attn::cpu::isa_avx2 {
namespace {
#include "feed_forward_kernels.h"
}  // namespace
}  // namespace fused_attn::cpu::isa_avx2
#undef FUSED_ATTN_ISA_AVX2
#pragma GCC pop_options
#endif

namespace fused_attn::cpu {
namespace {

// The AVX2 copy of a kernel when the CPU has it, else the baseline one.
template <Act act, typename scalar_t, typename gemm_t, typename... Args>
void ffn_fwd(Args&&... args) {
#if defined(FUSED_ATTN_AVX2_CLONES)
  if (cpu_has_avx2_fma()) return isa_avx2::ffn_fwd_pass<act, scalar_t, gemm_t>(args...);
#endif
  isa_default::ffn_fwd_pass<act, scalar_t, gemm_t>(args...);
}

template <Act act, typename scalar_t, typename gemm_t, typename... Args>
void ffn_bwd(Args&&... args) {
#if defined(FUSED_ATTN_AVX2_CLONES)
  if (cpu_has_avx2_fma()) return isa_avx2::ffn_bwd_pass<act, scalar_t, gemm_t>(args...);
#endif
  isa_default::ffn_bwd_pass<act, scalar_t, gemm_t>(args...);
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

// The dtype the GEMMs run in (see the file comment). FUSED_ATTN_CPU_HALF_GEMM = native / float32
// forces one of the two paths for half-precision inputs on any CPU (unset or "auto": by the CPU),
// so that the tests run both wherever they run; any other value is a ValueError naming the variable.
at::ScalarType gemm_dtype(at::ScalarType t) {
  if (t != at::kBFloat16 && t != at::kHalf) return t;
  const char* env = std::getenv("FUSED_ATTN_CPU_HALF_GEMM");
  const std::string mode = env ? env : "auto";
  if (mode == "native") return t;
  if (mode == "float32") return at::kFloat;
  FA_CHECK_VALUE(mode == "auto" || mode.empty(), "FUSED_ATTN_CPU_HALF_GEMM must be one of auto, native, float32; got '",
           mode, "'");
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
  FA_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  FA_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

void check_vector(const at::Tensor& t, const char* name, int64_t n, at::ScalarType dtype) {
  check_cpu_float(t, name);
  FA_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, "), got ", t.sizes());
  FA_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
}

// Shapes shared by both halves: returns d_ff.
int64_t check_weights(const at::Tensor& w1, const at::Tensor& w2, Act act, int64_t d, at::ScalarType dtype) {
  check_matrix(w1, "w1", dtype);
  check_matrix(w2, "w2", dtype);
  FA_CHECK(w1.size(1) == d, "w1 must have shape (F1, ", d, "), got ", w1.sizes());
  const int64_t F1 = w1.size(0);
  if (is_gated(act)) FA_CHECK(F1 % 2 == 0, "gated activations need an even w1.shape[0], got ", w1.sizes());
  const int64_t dff = is_gated(act) ? F1 / 2 : F1;
  FA_CHECK(w2.size(1) == dff, "w2 must have shape (d_out, ", dff, "), got ", w2.sizes());
  return dff;
}

inline at::Tensor to_gemm(const at::Tensor& t, at::ScalarType g) {
  return t.scalar_type() == g ? t : t.to(g);
}

// The GEMMs write into outputs from the scratch cache's allocator (csrc/cpu/scratch.h: kept and
// taken back from step to step instead of being faulted in afresh), as does the conversion back
// to the input dtype.
at::Tensor product(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = scratch::empty({a.size(0), b.size(1)}, a.scalar_type());
  return at::mm_out(out, a, b);
}

at::Tensor product_plus(const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = scratch::empty({a.size(0), b.size(1)}, a.scalar_type());
  return at::addmm_out(out, bias, a, b);
}

at::Tensor converted(const at::Tensor& t, at::ScalarType dtype) {
  if (t.scalar_type() == dtype) return t;
  at::Tensor out = scratch::empty(t.sizes(), dtype);
  out.copy_(t);
  return out;
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
  // pre_g: x @ w1^T + b1. In float32 on converted operands (g != dtype) the pass adds b1 and
  // writes the rounded pre separately. In the input dtype (g == dtype) the GEMM adds b1 itself
  // (addmm, float32 accumulation, one rounding, as nn.Linear does): adding it after the GEMM's
  // rounding would round twice, and ReLU's derivative, a step at 0, flips for every pre within
  // one bfloat16 rounding of 0 (the AVX512-BF16 machines' oracle test caught dx 18x off the bound).
  const bool bias_in_gemm = g == dtype && b1.has_value();
  at::Tensor pre_g = bias_in_gemm ? product_plus(b1c, x, w1.t()) : product(to_gemm(x, g), to_gemm(w1, g).t());
  at::Tensor pre = g == dtype ? pre_g : scratch::empty({x.size(0), F1}, dtype);
  at::Tensor h = scratch::empty({x.size(0), dff}, g);
  FA_DISPATCH_FLOATING(dtype, "feed_forward_fwd", [&] {
    dispatch_activation(act, [&](auto act_c) {
      if (g == dtype)
        ffn_fwd<decltype(act_c)::value, scalar_t, scalar_t>(pre_g, nullptr, nullptr, h, opt);
      else
        ffn_fwd<decltype(act_c)::value, scalar_t, float>(pre_g, b1 ? &b1c : nullptr, &pre, h, opt);
    });
  });
  at::Tensor out = b2 ? product_plus(to_gemm(*b2, g), h, to_gemm(w2, g).t()) : product(h, to_gemm(w2, g).t());
  out = converted(out, dtype);
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
  FA_CHECK(dout.size(0) == T && dout.size(1) == d_out, "dout must have shape (", T, ", ", d_out, "), got ",
              dout.sizes());
  check_matrix(pre, "pre", dtype);
  FA_CHECK(pre.size(0) == T && pre.size(1) == F1, "pre must have shape (", T, ", ", F1, "), got ", pre.sizes());
  check_dropout_p(dropout_p);
  const FfnOptions opt{dropout_p, static_cast<uint64_t>(seed), static_cast<uint64_t>(offset)};

  const auto g = gemm_dtype(dtype);
  const at::Tensor dout_g = to_gemm(dout, g), x_g = to_gemm(x, g);
  const at::Tensor pre_c = pre.contiguous();
  at::Tensor dh = product(dout_g, to_gemm(w2, g));  // (T, d_ff), fresh and contiguous
  at::Tensor h = scratch::empty({T, dff}, g);
  // Not gated: dpre has dh's shape and overwrites it row by row (each row is read first).
  at::Tensor dpre = is_gated(act) ? scratch::empty({T, F1}, g) : dh;
  at::Tensor db1 = has_b1 ? at::zeros({F1}, x.options()) : at::empty({0}, x.options());
  FA_DISPATCH_FLOATING(dtype, "feed_forward_bwd", [&] {
    dispatch_activation(act, [&](auto act_c) {
      if (g == dtype)
        ffn_bwd<decltype(act_c)::value, scalar_t, scalar_t>(pre_c, dh, h, dpre, has_b1 ? &db1 : nullptr, opt);
      else
        ffn_bwd<decltype(act_c)::value, scalar_t, float>(pre_c, dh, h, dpre, has_b1 ? &db1 : nullptr, opt);
    });
  });
  at::Tensor dw2 = product(dout_g.t(), h);
  at::Tensor dw1 = product(dpre.t(), x_g);
  at::Tensor dx = product(dpre, to_gemm(w1, g));
  at::Tensor db2 = has_b2 ? at::sum(dout, {0}, false, dtype == at::kDouble ? at::kDouble : at::kFloat).to(dtype)
                          : at::empty({0}, x.options());
  dx = converted(dx, dtype);
  dw1 = converted(dw1, dtype);
  dw2 = converted(dw2, dtype);
  return {dx.contiguous(), dw1.contiguous(), db1, dw2.contiguous(), db2.contiguous()};
}

}  // namespace
}  // namespace fused_attn::cpu

TORCH_LIBRARY_IMPL(fused_attn_C, CPU, m) {
  m.impl("feed_forward_fwd", &fused_attn::cpu::feed_forward_fwd);
  m.impl("feed_forward_bwd", &fused_attn::cpu::feed_forward_bwd);
}
