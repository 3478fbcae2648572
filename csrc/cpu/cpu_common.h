// Helpers shared by the C++ CPU kernels (csrc/cpu/*.cpp): dtype dispatch, the accumulation type,
// row conversion to/from the accumulation type, branch-free float math that the compiler can
// vectorise, fixed-chunk deterministic column sums, and the input checks every entry point makes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../common/dropout_hash.h"

namespace fused_attn::cpu {

// float32, bfloat16, float16 compute in float32; float64 (for gradcheck) in float64.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccType<T>::type;

// The four dtypes every CPU kernel accepts.
#define FUSED_ATTN_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
}

// ---- rows to and from the accumulation type ---------------------------------------------------

template <typename T, typename A>
inline void load_row(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(dst, src, n * sizeof(A));
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename A, typename T>
inline void store_row(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    std::memcpy(dst, src, n * sizeof(A));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Round a row of A values to T and back (what storing in T then reading it again gives).
template <typename T, typename A>
inline void round_row_through(A* buf, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<A>(static_cast<T>(buf[i]));
  }
}

// ---- dropout ----------------------------------------------------------------------------------

// Dropout multipliers of one logical row: keep/(1-p), i.e. 0 or 1/(1-p), for columns
// [0, n) of row `row` (fused_attn/_rng.py numbering). The hash is 32-bit integer math only.
template <typename A>
inline void dropout_row_scale(A* mult, int64_t n, uint64_t seed, uint64_t offset, uint64_t row, uint32_t threshold,
                              A scale) {
  const uint32_t key = fused_attn::dropout_row_key(seed, offset, row);
  for (int64_t c = 0; c < n; ++c) {
    mult[c] = fused_attn::dropout_bits(key, static_cast<uint32_t>(c)) >= threshold ? scale : A(0);
  }
}

// ---- branch-free float math (vectorisable; float64 uses libm for full accuracy) ------------------

// exp(x) for float: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6
// polynomial for e^r (Cephes expf coefficients, ~1 ulp), and 2^n put into the exponent bits.
// Inputs are clamped to [-87.3, 88] so no inf/denormal is produced (e^-87.3 ~ 1.2e-38,
// e^88 ~ 1.7e38).
inline float exp_f(float x) {
  x = std::min(std::max(x, -87.3f), 88.0f);
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  int32_t ni;
  std::memcpy(&ni, &t, sizeof(ni));
  ni -= 0x4B400000;  // the bits of kRound: what remains is n as an integer
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = (p * r * r + r) + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return er * two_n;
}
inline double exp_f(double x) { return std::exp(x); }

// erf for float: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the formula ATen's own AVX2
// erf uses; float64 uses std::erf.
inline float erf_f(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * exp_f(-ax * ax);
  return std::copysign(y, x);
}
inline double erf_f(double x) { return std::erf(x); }

template <typename A>
inline A sigmoid_f(A x) {
  return A(1) / (A(1) + exp_f(-x));
}

// ---- deterministic column sums ------------------------------------------------------------------

// Rows are split into chunks whose boundaries depend on the row count only (never on the thread
// count): each chunk sums its rows into its own partial row, in row order, and the partials are
// then added in chunk order. So the result is the same bit for bit under any torch.set_num_threads.
struct RowChunks {
  int64_t count;           // number of chunks
  int64_t rows_per_chunk;  // the last chunk may hold fewer
  int64_t begin(int64_t k) const { return k * rows_per_chunk; }
  int64_t end(int64_t k, int64_t rows) const { return std::min(rows, (k + 1) * rows_per_chunk); }
};

inline RowChunks fixed_row_chunks(int64_t rows) {
  constexpr int64_t kMinRowsPerChunk = 4, kMaxChunks = 64;
  if (rows <= 0) return {0, 1};
  const int64_t count = std::min(kMaxChunks, (rows + kMinRowsPerChunk - 1) / kMinRowsPerChunk);
  const int64_t per = (rows + count - 1) / count;
  return {(rows + per - 1) / per, per};
}

// out[c] = sum over k in order of partials[k * cols + c], parallel over columns.
template <typename A, typename T>
inline void reduce_partials(const A* partials, int64_t n_chunks, int64_t cols, T* out) {
  at::parallel_for(0, cols, 1024, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      A s = 0;
      for (int64_t k = 0; k < n_chunks; ++k) s += partials[k * cols + c];
      out[c] = static_cast<T>(s);
    }
  });
}

// Vectorised sum of a row.
template <typename A>
inline A row_sum(const A* v, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  Vec acc0(A(0)), acc1(A(0));
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    acc0 = acc0 + Vec::loadu(v + i);
    acc1 = acc1 + Vec::loadu(v + i + Vec::size());
  }
  for (; i + Vec::size() <= n; i += Vec::size()) acc0 = acc0 + Vec::loadu(v + i);
  A s = at::vec::vec_reduce_all<A>([](Vec a, Vec b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) s += v[i];
  return s;
}

// Vectorised dot product of two rows.
template <typename A>
inline A row_dot(const A* a, const A* b, int64_t n) {
  using Vec = at::vec::Vectorized<A>;
  Vec acc0(A(0)), acc1(A(0));
  int64_t i = 0;
  for (; i + 2 * Vec::size() <= n; i += 2 * Vec::size()) {
    acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
    acc1 = at::vec::fmadd(Vec::loadu(a + i + Vec::size()), Vec::loadu(b + i + Vec::size()), acc1);
  }
  for (; i + Vec::size() <= n; i += Vec::size()) acc0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc0);
  A s = at::vec::vec_reduce_all<A>([](Vec x, Vec y) { return x + y; }, acc0 + acc1);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace fused_attn::cpu
