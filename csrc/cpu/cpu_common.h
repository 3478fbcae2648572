// Helpers shared by the C++ CPU kernels (csrc/cpu/*.cpp): the accumulation type,
// the input checks every entry point makes, fixed-chunk deterministic column sums, and the
// per-ISA compilation of the kernels (below). The vectorisable row helpers the kernels use live
// in cpu_kernel_math.h.
//
// Per-ISA kernels. An extension is compiled for the baseline x86-64 ISA (SSE2; no -march=native,
// so the wheel runs anywhere), and ATen's CPU-capability dispatch (which builds its own kernels
// for AVX2/AVX-512) is not available to extensions: `at::vec` in an extension is its generic,
// array-of-lanes implementation. So each kernel file includes its kernel header twice: once in a
// namespace `isa_default`, and once, on GCC/x86-64, under `#pragma GCC target("avx2,fma,f16c")` in a
// namespace `isa_avx2`, where the same loops (and the vector-extension lanes of cpu_kernel_math.h)
// compile to 256-bit AVX2/FMA code. The entry points pick the AVX2 copy when the running CPU has
// AVX2, FMA and F16C (cpu_has_avx2_fma()). The including file defines FUSED_ATTN_ISA_AVX2 around
// the AVX2 copy so the kernels may use intrinsics there (GCC defines no ISA macros for a pragma
// target). The two copies live in different namespaces, so nothing compiled for AVX2 can be
// picked by the linker for a baseline caller.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#if defined(__x86_64__)
#include <immintrin.h>  // the F16C conversions of the AVX2 kernel copies
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/check.h"
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

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSED_ATTN_AVX2_CLONES 1
#endif

inline bool cpu_has_avx2_fma() {
#if defined(FUSED_ATTN_AVX2_CLONES)
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  FA_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  FA_CHECK(is_supported_float(t.scalar_type()), name,
              " must be float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

inline void check_dropout_p(double p) {
  FA_CHECK(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
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

}  // namespace fused_attn::cpu
