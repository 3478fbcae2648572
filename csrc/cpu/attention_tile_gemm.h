// Register-blocked float32 tile products for the CPU attention kernels (csrc/cpu/attention.cpp),
// AVX2 + FMA.
//
// Why not BLAS for these? Each attention tile product is small (64-256 rows, an inner dimension
// of 64-256) and a BLAS call packs both operands into its own panel layout on every call: the
// query block against every key block, the key block against every query block. Measured here
// (MKL on an AMD EPYC, one thread) the packing and scaling copies were ~15 % of the forward, and
// the whole forward ran at 48-55 GFLOP/s. Here the B operands are laid out once (per call, or per
// kv head in the backward) as contiguous 16-wide panels (attention.cpp, PanelSource), A operands
// are read in place, and a tile product is a sweep of a 6 x 16 register block over them: 12
// accumulators, two loads of B and six broadcasts of A per step of the inner dimension, 12 FMAs.
// In the op, the forward's products ran at ~100 GFLOP/s on one core (of ~140 for FMA alone) and
// the forward as a whole 1.08-1.12x SDPA there (interleaved runs, L = 2048, D = 64 and 128).
//
// Tiles cut by the visibility band (query i sees key j iff i + lo <= j <= i + hi: causal, sliding
// windows) skip the work it makes dead, at the granularity of a register block (see Band): scores
// are not computed outside the band, and products over keys or queries run only across it.
//
// Everything here is compiled for AVX2 + FMA whatever the build flags (a target attribute), and
// is only called when the running CPU has both (cpu_has_avx2_fma()). Builds without the per-ISA
// copies (not GCC on x86-64) get stubs that raise, so the callers need no #if.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// How the visibility band prunes a tile product: key column c visible from query row r iff
// r + lo <= c <= r + hi, the tile's query rows and key columns numbered from 0 (so lo and hi are
// the op's band plus (first query) - (first key)). A register block of rows [r, r + R) and key
// columns [c, c + 16) is dead when c > r + R - 1 + hi (past the upper edge for every row) or
// c + 15 < r + lo (before the lower edge for every row); the keys row range [r, r + R) sees are
// [r + lo, r + R - 1 + hi], and the queries key range [c, c + R) is seen by are [c - hi, c + R - 1 - lo].
enum class Band {
  none,
  key_columns,     // C's columns are keys, its rows queries (S = Q K^T, dP = dO V^T): skip blocks
                   // whose keys are all outside the band of every row of the block
  key_inner,       // the inner dimension runs over keys, C's rows are queries (O += P V, dQ += dS K):
                   // only the keys some row of the block sees
  query_inner,     // the inner dimension runs over queries, C's rows are keys (dV += P^T dO,
                   // dK += dS^T Q): only the queries that see some key of the block
};

#if defined(FUSED_ATTN_AVX2_CLONES)

// acc += A(rows, [k0, k1)) B([k0, k1), 16 columns), one FMA chain per accumulator; b points at
// B's row k0. A(r, k) = a[r * lda + k], or a[k * lda + r] when A_TRANSPOSED (A is stored as its
// transpose).
template <int R, bool A_TRANSPOSED>
__attribute__((target("avx2,fma"), always_inline)) inline void sweep(__m256 (&acc)[R][2], const float* a, int64_t lda,
                                                                      const float* b, int64_t b_row_stride, int64_t k0,
                                                                      int64_t k1) {
  const float* a_rows[R];  // untransposed A: one base per row, indexed by k (one index register)
  for (int r = 0; r < R; ++r) a_rows[r] = a + r * lda;
  for (int64_t k = k0; k < k1; ++k, b += b_row_stride) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    const float* a_col = a + k * lda;  // transposed A: the R values of step k are adjacent
    for (int r = 0; r < R; ++r) {
      const __m256 av = _mm256_broadcast_ss(A_TRANSPOSED ? a_col + r : a_rows[r] + k);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
}

// The steps of the inner dimension that one FMA chain of a non-accumulating product sums (block).
constexpr int64_t kChunk = 16;

// One R x 16 block: C = alpha * A B (ACCUMULATE: C += alpha * A B) over inner indices [k0, k1).
// A(r, k) = a[r * lda + k], or a[k * lda + r] when A_TRANSPOSED (A is stored as its transpose).
template <int R, bool A_TRANSPOSED, bool ACCUMULATE>
__attribute__((target("avx2,fma"), always_inline)) inline void block(const float* a, int64_t lda, const float* b,
                                                                      int64_t b_row_stride, int64_t k0, int64_t k1,
                                                                      float* c, int64_t ldc, float alpha) {
  __m256 acc[R][2];
  // (alpha's splat is made after the loops: held across them, it took the register the
  // accumulators leave free, and B's second half spilled to the stack, a load per FMA)
  if constexpr (!ACCUMULATE) {
    // The products that write C (S = Q K^T and dP = dO V^T) sum over the head dimension, and a
    // sharp softmax amplifies their rounding: a logit of 30-90 off by an ulp moves its exp by
    // ~5e-6 relative, and the output with it. One FMA chain over all D steps rounds the partial
    // sum at every step as it grows: 1.5x the mean error of the kernels BLAS runs for one to
    // three rows (vectorised over D; the float32 reference takes them for decoding shapes), and
    // ~2 % of sharp float32 decoding cases failed the oracle's forward bound (2x the reference's
    // error) by up to 2.3x. Each chain now sums kChunk steps, from zero, and the chains' sums are
    // added up in C: those cases' output errors are 3-15x smaller, and a fuzz of sharp decoding
    // shapes puts the median error/bound at 0.18-0.20 (BLAS 0.22-0.26, one chain 0.35). The
    // scores stay a function of the inputs alone (the chunks start at k = 0 whatever the tile),
    // so the backward's recomputed P still matches the forward's lse bit for bit. Cost: a load,
    // an add and a store of the C block (in L1) per kChunk steps, within the noise (one thread,
    // prefill and decoding, forward and backward); 8-step chunks cost ~2 % on prefill.
    int64_t kc = k0;
    for (; kc + kChunk < k1; kc += kChunk) {  // every chunk but the last: C (+)= its sum
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
      sweep<R, A_TRANSPOSED>(acc, a, lda, b + kc * b_row_stride, b_row_stride, kc, kc + kChunk);
      for (int r = 0; r < R; ++r) {
        float* cr = c + r * ldc;
        _mm256_storeu_ps(cr, kc == k0 ? acc[r][0] : _mm256_add_ps(_mm256_loadu_ps(cr), acc[r][0]));
        _mm256_storeu_ps(cr + 8, kc == k0 ? acc[r][1] : _mm256_add_ps(_mm256_loadu_ps(cr + 8), acc[r][1]));
      }
    }
    // the last chunk (the only one when K <= kChunk): C = alpha * (C + its sum)
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    sweep<R, A_TRANSPOSED>(acc, a, lda, b + kc * b_row_stride, b_row_stride, kc, k1);
    const __m256 s = _mm256_set1_ps(alpha);
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc;
      const __m256 c0 = kc == k0 ? acc[r][0] : _mm256_add_ps(_mm256_loadu_ps(cr), acc[r][0]);
      const __m256 c1 = kc == k0 ? acc[r][1] : _mm256_add_ps(_mm256_loadu_ps(cr + 8), acc[r][1]);
      _mm256_storeu_ps(cr, _mm256_mul_ps(c0, s));
      _mm256_storeu_ps(cr + 8, _mm256_mul_ps(c1, s));
    }
  } else {
    // An accumulating product reads its C block only after the K-step loop, and in the backward
    // that block (dK/dV rows of the key block, dQ rows) was last touched a whole sweep of tiles
    // ago: its loads missed cache and stalled the epilogue (perf: ~40 % of the dK/dV products'
    // samples on the epilogue's FMAs at L = 2048, D = 128). Prefetching the block's lines here
    // hides that behind the loop: the dK/dV products 18 % faster, forward + backward there 12-14 %
    // (interleaved runs). Both halves of each row, as a 16-float row may straddle two lines.
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 15), _MM_HINT_T0);
    }
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    sweep<R, A_TRANSPOSED>(acc, a, lda, b + k0 * b_row_stride, b_row_stride, k0, k1);
    const __m256 s = _mm256_set1_ps(alpha);
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc;
      _mm256_storeu_ps(cr, _mm256_fmadd_ps(acc[r][0], s, _mm256_loadu_ps(cr)));
      _mm256_storeu_ps(cr + 8, _mm256_fmadd_ps(acc[r][1], s, _mm256_loadu_ps(cr + 8)));
    }
  }
}

// C[M, N] (row-major, ldc; N a multiple of 16) = alpha * A B, or += when ACCUMULATE; A is M x K
// (see block), B K x N in panels. Blocks skipped by the band (see Band; lo, hi in the tile's
// numbering) leave C untouched: the caller never reads those entries (scores), or they stay as
// they were (accumulators).
template <bool A_TRANSPOSED, bool ACCUMULATE>
__attribute__((target("avx2,fma"), noinline)) void product(int64_t M, int64_t N, int64_t K, const float* a,
                                                           int64_t lda, PanelB b, float* c, int64_t ldc, float alpha,
                                                           Band band = Band::none, int64_t lo = 0, int64_t hi = 0) {
  for (int64_t p = 0; p < N / kPanel; ++p) {
    const float* bp = b.data + p * b.panel_stride;
    for (int64_t r = 0; r < M; r += kRows) {
      const int64_t rows = std::min(kRows, M - r);
      int64_t k0 = 0, k1 = K;
      if (band == Band::key_columns && (p * kPanel > r + rows - 1 + hi || p * kPanel + kPanel - 1 < r + lo)) continue;
      if (band == Band::key_inner) {
        k0 = std::clamp<int64_t>(r + lo, 0, K);
        k1 = std::clamp<int64_t>(r + rows + hi, 0, K);
      }
      if (band == Band::query_inner) {
        k0 = std::clamp<int64_t>(r - hi, 0, K);
        k1 = std::clamp<int64_t>(r + rows - lo, 0, K);
      }
      if (k0 >= k1) {  // nothing visible: the block is zero (an accumulator stays as it is)
        if constexpr (!ACCUMULATE)
          for (int64_t i = 0; i < rows; ++i)
            std::fill(c + (r + i) * ldc + p * kPanel, c + (r + i) * ldc + (p + 1) * kPanel, 0.f);
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

// ---- laying out B operands (see PanelSource in attention.cpp) ----------------------------------

// 8 consecutive elements from p as float32 (bfloat16: the bits shifted up; float16: F16C).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 load8_as_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "float, bfloat16 or float16");
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}

// dst[r * 16 + c] = src[c * ld + r] for c < 8, r < 8 (an 8 x 8 transpose into half a panel).
__attribute__((target("avx2,fma"), always_inline)) inline void transpose8_into_panel(const __m256 (&row)[8],
                                                                                     float* dst) {
  const __m256 t0 = _mm256_unpacklo_ps(row[0], row[1]), t1 = _mm256_unpackhi_ps(row[0], row[1]);
  const __m256 t2 = _mm256_unpacklo_ps(row[2], row[3]), t3 = _mm256_unpackhi_ps(row[2], row[3]);
  const __m256 t4 = _mm256_unpacklo_ps(row[4], row[5]), t5 = _mm256_unpackhi_ps(row[4], row[5]);
  const __m256 t6 = _mm256_unpacklo_ps(row[6], row[7]), t7 = _mm256_unpackhi_ps(row[6], row[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * 16, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(dst + 1 * 16, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(dst + 2 * 16, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(dst + 3 * 16, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(dst + 4 * 16, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(dst + 5 * 16, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(dst + 6 * 16, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(dst + 7 * 16, _mm256_permute2f128_ps(u3, u7, 0x31));
}

// A key panel from 16 full rows of unit column stride: panel[r * 16 + c] = row c's element r,
// for r < D8 (a multiple of 8; the caller fills the rest).
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"), noinline)) void pack_key_panel(const scalar_t* rows, int64_t ld,
                                                                       int64_t D8, float* panel) {
  for (int64_t r0 = 0; r0 < D8; r0 += 8)
    for (int64_t c0 = 0; c0 < 16; c0 += 8) {
      __m256 row[8];
      for (int i = 0; i < 8; ++i) row[i] = load8_as_float(rows + (c0 + i) * ld + r0);
      transpose8_into_panel(row, panel + r0 * 16 + c0);
    }
}

// A column panel from rows of unit column stride, all 16 columns present: panel[r * 16 + c] = rows[r * ld + c].
template <typename scalar_t>
__attribute__((target("avx2,fma,f16c"), noinline)) void pack_column_panel(const scalar_t* rows, int64_t ld,
                                                                          int64_t n_rows, float* panel) {
  for (int64_t r = 0; r < n_rows; ++r) {
    _mm256_storeu_ps(panel + r * 16, load8_as_float(rows + r * ld));
    _mm256_storeu_ps(panel + r * 16 + 8, load8_as_float(rows + r * ld + 8));
  }
}

#else  // not FUSED_ATTN_AVX2_CLONES: the callers compile, and never get here (use_tile_kernels())

template <bool A_TRANSPOSED, bool ACCUMULATE>
void product(int64_t, int64_t, int64_t, const float*, int64_t, PanelB, float*, int64_t, float,
             Band = Band::none, int64_t = 0, int64_t = 0) {
  FA_CHECK(false, "fused_attn: register-blocked attention products need the AVX2 build");
}
template <typename scalar_t>
void pack_key_panel(const scalar_t*, int64_t, int64_t, float*) {
  FA_CHECK(false, "fused_attn: register-blocked attention products need the AVX2 build");
}
template <typename scalar_t>
void pack_column_panel(const scalar_t*, int64_t, int64_t, float*) {
  FA_CHECK(false, "fused_attn: register-blocked attention products need the AVX2 build");
}

#endif  // FUSED_ATTN_AVX2_CLONES

}  // namespace fused_attn::cpu_attention::tile_gemm
