// Register-blocked float32 tile products for the CPU attention kernels (csrc/cpu/attention.cpp),
// AVX2 + FMA.
//
// Why not BLAS for these? Each attention tile product is small (64-256 rows, an inner dimension
// of 64-256) and a BLAS call packs both operands into its own panel layout on every call: the
// query block against every key block, the key block against every query block. Measured here
// (MKL on an AMD EPYC, one thread) the packing and scaling copies were ~15 % of the forward, and
// the whole forward ran at 48-55 GFLOP/s. Here the B operands are laid out once per call of the
// op as contiguous 16-wide panels (attention.cpp, make_panels), A operands are read in place, and
// a tile product is a sweep of a 6 x 16 register block over them: 12 accumulators, two loads of
// B and six broadcasts of A per step of the inner dimension, 12 FMAs.
//
// Causal tiles skip the work the rule makes dead, at the granularity of a register block (see
// CausalSkip): the scores are not computed above the diagonal, and products over keys stop at it.
//
// Everything here is compiled for AVX2 + FMA whatever the build flags (a target attribute), and
// is only called when the running CPU has both (cpu_has_avx2_fma()).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu_common.h"  // FUSED_ATTN_AVX2_CLONES

#if defined(FUSED_ATTN_AVX2_CLONES)
#include <immintrin.h>
#endif

namespace fused_attn::cpu_attention::tile_gemm {

constexpr int64_t kPanel = 16;  // columns of C (and of a B panel) per register block: two ymm
constexpr int64_t kRows = 6;    // rows of C per register block (6 x 2 accumulators + 2 B + 1 A = 15 ymm)

// B in 16-column panels: element (k, c) at data[(c / 16) * panel_stride + k * row_stride + c % 16].
//  - rows of a row-major matrix padded to a multiple of 16 columns: panel_stride 16, row_stride = ld;
//  - K^T panels (16 keys side by side, one row per head-dim index): panel_stride 16 * D, row_stride 16.
struct PanelB {
  const float* data;
  int64_t panel_stride, row_stride;
};

// How the causal rule (key j visible from query i iff j <= i + diag) prunes a tile product. The
// tile's query rows and key columns are numbered from 0; diag = (first query) - (first key).
enum class Causal {
  none,
  key_columns,     // C's columns are keys, its rows queries (S = Q K^T, dP = dO V^T): skip blocks
                   // whose keys are all past the last query of the block's rows
  key_inner,       // the inner dimension runs over keys, C's rows are queries (O += P V, dQ += dS K):
                   // stop at the last key the block's last query sees
  query_inner,     // the inner dimension runs over queries, C's rows are keys (dV += P^T dO,
                   // dK += dS^T Q): start at the first query that sees the block's first key
};

#if defined(FUSED_ATTN_AVX2_CLONES)

// One R x 16 block: C = alpha * A B (ACCUMULATE: C += alpha * A B) over inner indices [k0, k1).
// A(r, k) = a[r * lda + k], or a[k * lda + r] when A_TRANSPOSED (A is stored as its transpose).
template <int R, bool A_TRANSPOSED, bool ACCUMULATE>
__attribute__((target("avx2,fma"), always_inline)) inline void block(const float* a, int64_t lda, const float* b,
                                                                      int64_t b_row_stride, int64_t k0, int64_t k1,
                                                                      float* c, int64_t ldc, float alpha) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* a_rows[R];  // untransposed A: one base per row, indexed by k (one index register)
  for (int r = 0; r < R; ++r) a_rows[r] = a + r * lda;
  b += k0 * b_row_stride;
  for (int64_t k = k0; k < k1; ++k, b += b_row_stride) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    const float* a_col = a + k * lda;  // transposed A: the R values of step k are adjacent
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(A_TRANSPOSED ? a_col + r : a_rows[r] + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const __m256 s = _mm256_set1_ps(alpha);
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if constexpr (ACCUMULATE) {
      _mm256_storeu_ps(cr, _mm256_fmadd_ps(acc[r][0], s, _mm256_loadu_ps(cr)));
      _mm256_storeu_ps(cr + 8, _mm256_fmadd_ps(acc[r][1], s, _mm256_loadu_ps(cr + 8)));
    } else {
      _mm256_storeu_ps(cr, _mm256_mul_ps(acc[r][0], s));
      _mm256_storeu_ps(cr + 8, _mm256_mul_ps(acc[r][1], s));
    }
  }
}

// C[M, N] (row-major, ldc; N a multiple of 16) = alpha * A B, or += when ACCUMULATE; A is M x K
// (see block), B K x N in panels. Blocks skipped by the causal rule leave C untouched: the caller
// never reads those entries (scores), or they stay as they were (accumulators).
template <bool A_TRANSPOSED, bool ACCUMULATE>
__attribute__((target("avx2,fma"), noinline)) void product(int64_t M, int64_t N, int64_t K, const float* a,
                                                           int64_t lda, PanelB b, float* c, int64_t ldc, float alpha,
                                                           Causal causal = Causal::none, int64_t diag = 0) {
  for (int64_t p = 0; p < N / kPanel; ++p) {
    const float* bp = b.data + p * b.panel_stride;
    for (int64_t r = 0; r < M; r += kRows) {
      const int64_t rows = std::min(kRows, M - r);
      int64_t k0 = 0, k1 = K;
      if (causal == Causal::key_columns && p * kPanel > r + rows - 1 + diag) continue;
      if (causal == Causal::key_inner) k1 = std::clamp<int64_t>(r + rows + diag, 0, K);
      if (causal == Causal::query_inner) k0 = std::clamp<int64_t>(r - diag, 0, K);
      if (k0 >= k1 && !ACCUMULATE) {  // nothing visible: the block is zero
        for (int64_t i = 0; i < rows; ++i) std::fill(c + (r + i) * ldc + p * kPanel, c + (r + i) * ldc + (p + 1) * kPanel, 0.f);
        continue;
      }
      const float* ar = A_TRANSPOSED ? a + r : a + r * lda;
      float* cr = c + r * ldc + p * kPanel;
      switch (rows) {
        case 6: block<6, A_TRANSPOSED, ACCUMULATE>(ar, lda, bp, b.row_stride, k0, k1, cr, ldc, alpha); break;
        case 5: block<5, A_TRANSPOSED, ACCUMULATE>(ar, lda, bp, b.row_stride, k0, k1, cr, ldc, alpha); break;
        case 4: block<4, A_TRANSPOSED, ACCUMULATE>(ar, lda, bp, b.row_stride, k0, k1, cr, ldc, alpha); break;
        case 3: block<3, A_TRANSPOSED, ACCUMULATE>(ar, lda, bp, b.row_stride, k0, k1, cr, ldc, alpha); break;
        case 2: block<2, A_TRANSPOSED, ACCUMULATE>(ar, lda, bp, b.row_stride, k0, k1, cr, ldc, alpha); break;
        default: block<1, A_TRANSPOSED, ACCUMULATE>(ar, lda, bp, b.row_stride, k0, k1, cr, ldc, alpha); break;
      }
    }
  }
}

#endif  // FUSED_ATTN_AVX2_CLONES

}  // namespace fused_attn::cpu_attention::tile_gemm
