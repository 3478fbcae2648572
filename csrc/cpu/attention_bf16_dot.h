// AVX512-BF16 tile products for the CPU attention (csrc/cpu/attention.cpp) on bfloat16 inputs,
// with `vdpbf16ps` (_mm512_dpbf16_ps): the forward's S = scale * Q K^T and O += P V, and the
// backward's S (recomputed), dP = dO V^T, dV += P^T dO, dK += scale * dS^T Q, dQ += scale * dS K.
//
// Why: the float32 register-blocked products (attention_tile_gemm.h) already run the forward at
// the float32 FMA ceiling of a CPU (measured here, Zen 4: torch's float32 matmul 0.19 TFLOP/s,
// the forward 0.18-0.19). On a CPU with AVX512-BF16 one vdpbf16ps does 32 multiply-adds per zmm
// (16 float32 lanes, each the sum of two bf16 x bf16 products) where an FMA does 16 (bf16 matmul
// measured 0.42 TFLOP/s here), so bfloat16 inputs can go about twice as fast if their products
// read the bf16 values as they are instead of float32 copies.
//
// What vdpbf16ps computes: for each 32-bit lane c, acc[c] += a[2c] * b[2c] + a[2c+1] * b[2c+1],
// with a and b 32 bf16 values each (one zmm). A product of two bf16 values is exact in float32
// (8 + 8 significant bits), so the only rounding is the float32 accumulation, as in the float32
// path (denormals are flushed, which moves a score by less than 1e-38). The inner dimension is
// therefore consumed in PAIRS: every operand is laid out so that the two values of one step of
// a pair sit next to each other in a 32-bit lane ("VNNI" layout):
//  - A operand (the rows of C): row r is read as 32-bit pairs (A[r][2k], A[r][2k+1]) and one pair
//    is broadcast to all 16 lanes (_mm512_set1_epi32): Q and dO rows (pairs along the head dim, D
//    padded to even with a zero), P and dS rows (pairs along the tile's keys, zero past its last
//    key: convert_rows), and, for the backward's products over queries, P^T and dS^T (rows of the
//    tile's keys, pairs along its queries, zero past its last query: convert_transposed);
//  - B operand (16 columns of C per zmm): panel row k holds, for the 16 columns c of the panel,
//    (B[2k][c], B[2k+1][c]) in lane c: 32 bf16 = 64 bytes = one zmm, one cache line.
//    Key panels (S = Q K^T, dP = dO V^T: the columns are keys): for each 16-key panel, for each
//    head-dim pair d2, 16 x (K[key][2 d2], K[key][2 d2 + 1]) (V's likewise, along Dv); D padded
//    to even, keys to 16, with zeros.
//    Column panels (O += P V, dQ += dS K: the inner dimension is keys, the columns Dv's or D's;
//    dV += P^T dO, dK += dS^T Q: the inner dimension is queries): for each 16-column panel, for
//    each row pair j2, 16 x (V[2 j2][c], V[2 j2 + 1][c]); rows padded to a multiple of 16 (so any
//    tile, which starts at a multiple of 16 keys or of the even query block, has whole pairs),
//    columns to 16, with zeros.
//  The layouts are made once per call (attention.cpp: Bf16Operands), O(L D) against the O(L^2 D)
//  products, and a panel row is read with one aligned-or-not 64-byte load.
//
// A tile product sweeps a kRows x kGroup-panel register block over C: 6 rows x 4 panels = 24
// zmm accumulators, 4 B loads and 6 broadcasts per pair step (29 of the 32 zmm registers), 24
// vdpbf16ps = 768 multiply-adds per step.
//
// The visibility band prunes as the float32 products do (attention_tile_gemm.h: Band), at the
// granularity of a 16-key panel for S and dP (key_columns) and of a key or query pair for P V,
// dS K (key_inner) and P^T dO, dS^T Q (query_inner): dead score blocks are left unwritten (the row
// loops never read them), and the other products run only over the keys (queries) some row of
// the block sees. A range starting or ending on an odd element reads a pair half outside it
// (first - 1, first) or (last, last + 1): both operands are masked to zero there (see block), so
// that an inf/NaN in a row outside the range cannot turn 0 * inf into a NaN.
//
// Everything here is compiled for avx512f/bw/vl/bf16 whatever the build flags (a target
// attribute), so the baseline build still runs on any x86-64; it is only called when the
// running CPU has AVX512-BF16 (cpu_supported()). Builds without the per-ISA copies (not GCC on
// x86-64) get stubs that raise, so the callers need no #if.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu_common.h"  // FUSED_ATTN_AVX2_CLONES
#include "attention_tile_gemm.h"  // Band

#if defined(FUSED_ATTN_AVX2_CLONES)
#include <immintrin.h>
#endif

namespace fused_attn::cpu_attention::bf16_dot {

using tile_gemm::Band;

constexpr int64_t kLanes = 16;  // float32 columns of C per zmm = columns of a B panel
constexpr int kRows = 6;        // rows of C per register block
constexpr int kGroup = 4;       // B panels per register block (6 x 4 accumulators + 4 B + 1 A = 29 zmm)

// B operand: panel p, pair row k at data[p * panel_stride + k * 32] (32 bf16 bits each).
struct PanelB16 {
  const uint16_t* data;
  int64_t panel_stride;
};

#if defined(FUSED_ATTN_AVX2_CLONES)

#define FA_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Whether the running CPU (and OS: libgcc checks the zmm state is enabled) has AVX512-BF16.
inline bool cpu_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// One pair step k of a register block: the NP panel rows k (their bf16 values outside `keep`
// zeroed), and for each of the R rows of A the pair (A[r][2k], A[r][2k+1]) as one 32-bit value
// (its bits outside a_keep zeroed) broadcast to every lane, then R x NP dot products.
template <int R, int NP>
FA_BF16_TARGET __attribute__((always_inline)) inline void step(__m512 (&acc)[R][NP], const uint16_t* a, int64_t lda,
                                                               const uint16_t* b, int64_t panel_stride, int64_t k,
                                                               __mmask32 keep, uint32_t a_keep = ~0u) {
  __m512i bv[NP];
  for (int q = 0; q < NP; ++q) {
    const uint16_t* row = b + q * panel_stride + k * 32;
    bv[q] = keep == __mmask32(~0u) ? _mm512_loadu_si512(row) : _mm512_maskz_loadu_epi16(keep, row);
  }
  for (int r = 0; r < R; ++r) {
    int32_t pair;
    std::memcpy(&pair, a + r * lda + 2 * k, sizeof(pair));
    pair &= static_cast<int32_t>(a_keep);
    const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
    for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], av, (__m512bh)bv[q]);
  }
}

// One R x (16 NP) block of C: C = alpha * A B (ACCUMULATE: C += alpha * A B) over the inner
// elements [e0, e1): the whole pair steps [(e0 + 1) / 2, e1 / 2), and a half step at either end
// that holds one element of the range: when e0 is odd, the pair (e0 - 1, e0) with its first
// element masked out of A and B; when e1 is odd, the pair (e1 - 1, e1) with its second one
// masked out. The element outside the range is outside the band of every row of the block (or
// past the tile's last key or query), so it contributes nothing, and the float32 products never
// read it: masking both operands keeps an inf or NaN there (a key or query row of q, k, v, dO
// outside the range, or the NaN dS of a row that sees no key where dO is inf) from turning
// 0 * inf into a NaN.
template <int R, int NP, bool ACCUMULATE>
FA_BF16_TARGET void block(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t panel_stride, int64_t e0,
                          int64_t e1, float* c, int64_t ldc, float alpha) {
  __m512 acc[R][NP];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NP; ++q) acc[r][q] = _mm512_setzero_ps();
  // An accumulating block's C rows (the backward's dK/dV/dQ rows) were last touched a sweep of
  // tiles ago: fetch their lines while the loop runs (as tile_gemm::block does).
  if constexpr (ACCUMULATE)
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < NP; ++q) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + q * kLanes), _MM_HINT_T0);
  // (bf16 element 2k of a pair is the low half of its 32 bits: x86 is little-endian)
  if (e0 % 2)  // the odd bf16 = element e0
    step<R, NP>(acc, a, lda, b, panel_stride, e0 / 2, __mmask32(0xAAAAAAAAu), 0xFFFF0000u);
  for (int64_t k = (e0 + 1) / 2; k < e1 / 2; ++k) step<R, NP>(acc, a, lda, b, panel_stride, k, ~__mmask32(0));
  if (e1 % 2)  // the even bf16 = element e1 - 1
    step<R, NP>(acc, a, lda, b, panel_stride, e1 / 2, __mmask32(0x55555555u), 0x0000FFFFu);
  const __m512 s = _mm512_set1_ps(alpha);
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < NP; ++q) {
      float* cr = c + r * ldc + q * kLanes;
      if constexpr (ACCUMULATE)
        _mm512_storeu_ps(cr, _mm512_fmadd_ps(acc[r][q], s, _mm512_loadu_ps(cr)));
      else
        _mm512_storeu_ps(cr, _mm512_mul_ps(acc[r][q], s));
    }
}

template <bool ACCUMULATE>
using BlockFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t, float);

template <bool ACCUMULATE, int R, int... NP>
constexpr std::array<BlockFn<ACCUMULATE>, kGroup> row_of_blocks(std::integer_sequence<int, NP...>) {
  return {&block<R, NP + 1, ACCUMULATE>...};
}
template <bool ACCUMULATE, int... R>
constexpr std::array<std::array<BlockFn<ACCUMULATE>, kGroup>, kRows> block_table(std::integer_sequence<int, R...>) {
  return {row_of_blocks<ACCUMULATE, R + 1>(std::make_integer_sequence<int, kGroup>{})...};
}

// C[M, 16 n_panels] (row-major, ldc) = alpha * A B, or += when ACCUMULATE, over an inner dimension
// of K elements (K odd: the last pair is half, see block). A: bf16 rows of at least K rounded up
// to even readable elements (zero past K), lda apart; B: bf16 VNNI panels from the first column.
// Band (lo, hi in the tile's numbering, as tile_gemm::product): key_columns, the columns are keys
// and score blocks past the band are left unwritten; key_inner, the inner dimension is keys and
// runs only over those some row of the block sees; query_inner, the rows of C are keys and the
// inner dimension queries (dV += P^T dO, dK += dS^T Q), run only over the queries that see some
// key of the block (an empty range, with key_inner or query_inner, leaves an accumulator as it is).
template <bool ACCUMULATE>
FA_BF16_TARGET __attribute__((noinline)) void product(int64_t M, int64_t n_panels, int64_t K, const uint16_t* a,
                                                      int64_t lda, PanelB16 b, float* c, int64_t ldc, float alpha,
                                                      Band band = Band::none, int64_t lo = 0, int64_t hi = 0) {
  static constexpr auto table = block_table<ACCUMULATE>(std::make_integer_sequence<int, kRows>{});
  for (int64_t r = 0; r < M; r += kRows) {
    const int64_t rows = std::min<int64_t>(kRows, M - r);
    int64_t p0 = 0, p1 = n_panels;  // live panels: keys [16 p0, 16 p1) meet the rows' band
    int64_t e0 = 0, e1 = K;         // inner elements
    if (band == Band::key_columns) {
      p0 = r + lo <= 0 ? 0 : std::min<int64_t>((r + lo) / kLanes, n_panels);  // the panel of the first key seen
      const int64_t last = r + rows - 1 + hi;  // the last key some row sees
      p1 = last < 0 ? 0 : std::clamp<int64_t>(last / kLanes + 1, 0, n_panels);
      if (p0 >= p1) continue;
    }
    if (band == Band::key_inner) {  // the keys rows [r, r + rows) see: [r + lo, r + rows - 1 + hi]
      e0 = std::clamp<int64_t>(r + lo, 0, K);
      e1 = std::clamp<int64_t>(r + rows + hi, 0, K);
    }
    if (band == Band::query_inner) {  // the queries keys [r, r + rows) are seen by: [r - hi, r + rows - 1 - lo]
      e0 = std::clamp<int64_t>(r - hi, 0, K);
      e1 = std::clamp<int64_t>(r + rows - lo, 0, K);
    }
    // nothing visible: the accumulator rows stay as they are (Band::none and Band::key_columns
    // with K = 0, a head dim of 0, still write their zero block: the row loops read those scores)
    if ((band == Band::key_inner || band == Band::query_inner) && e0 >= e1) continue;
    const uint16_t* ar = a + r * lda;
    for (int64_t p = p0; p < p1; p += kGroup) {
      const int64_t np = std::min<int64_t>(kGroup, p1 - p);
      table[rows - 1][np - 1](ar, lda, b.data + p * b.panel_stride, b.panel_stride, e0, e1, c + r * ldc + p * kLanes,
                              ldc, alpha);
    }
  }
}

// Rows of P (float32, lds apart) as bf16 rows (ldp apart, ldp even and >= n): dst[r][c] =
// round-to-nearest-even(src[r][c]) for c < n, 0 for n <= c < ldp, so a pair step of P V never
// reads a value past the tile's last key.
FA_BF16_TARGET __attribute__((noinline)) inline void convert_rows(const float* src, int64_t lds, int64_t rows,
                                                                  int64_t n, uint16_t* dst, int64_t ldp) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * lds;
    uint16_t* d = dst + r * ldp;
    for (int64_t c = 0; c < ldp; c += 32) {
      // masks of the lanes before column n
      const int64_t m0 = std::clamp<int64_t>(n - c, 0, 16), m1 = std::clamp<int64_t>(n - c - 16, 0, 16);
      const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m0) - 1), s + c);
      const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << m1) - 1), s + c + 16);
      // _mm512_cvtne2ps_pbh(a, b): elements 0-15 from b, 16-31 from a, each rounded to nearest even
      const __m512i pbh = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
      const int64_t m = std::min<int64_t>(32, ldp - c);
      _mm512_mask_storeu_epi16(d + c, static_cast<__mmask32>(m >= 32 ? 0xFFFFFFFFu : (1u << m) - 1), pbh);
    }
  }
}

// x[i] = row i of a 16 x 16 matrix of 32-bit values; on return x[j] = column j. Four stages:
// unpack 32-bit pairs, then 64-bit pairs (lane L of the j-th result of rows 4g..4g+3 then holds
// column 4L + j of those rows), then two rounds of 128-bit lane shuffles gathering the lanes L of
// the four row groups.
FA_BF16_TARGET __attribute__((always_inline)) inline void transpose16(__m512i (&x)[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(x[i], x[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(x[i], x[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // rows 4g'..4g'+3: u[g + j] lane L = column 4L + j
    u[g + 0] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    // lanes (L0, L2) and (L1, L3) of row groups 0, 1 (v) and 2, 3 (w)
    const __m512i v0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);
    const __m512i w0 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    x[j] = _mm512_shuffle_i32x4(v0, w0, 0x88);       // column j:      lane 0 of each group
    x[8 + j] = _mm512_shuffle_i32x4(v0, w0, 0xDD);   // column 8 + j:  lane 2
    x[4 + j] = _mm512_shuffle_i32x4(v1, w1, 0x88);   // column 4 + j:  lane 1
    x[12 + j] = _mm512_shuffle_i32x4(v1, w1, 0xDD);  // column 12 + j: lane 3
  }
}

// The transpose of P (or dS; float32, rows x n, lds apart) as bf16 rows of queries in pairs, the
// A operand of dV += P^T dO and dK += dS^T Q: dst[c * ldt + r] = round-to-nearest-even(src[r][c])
// for c < n, r < rows, and dst[c * ldt + rows] = 0 when rows is odd (the second half of the last
// pair; ldt even and > rows then). Blocks of 16 row pairs x 16 columns: for each pair (r, r + 1),
// 16 columns of both rows rounded into one zmm (row r in bf16 elements 0-15, row r + 1 in 16-31)
// and interleaved so that dword d holds the pair (src[r][c + d], src[r + 1][c + d]); the 16 x 16
// dwords transposed (transpose16), and each column's 16 pairs stored as one row segment of dst.
FA_BF16_TARGET __attribute__((noinline)) inline void convert_transposed(const float* src, int64_t lds, int64_t rows,
                                                                        int64_t n, uint16_t* dst, int64_t ldt) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                           8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  const int64_t rows_even = (rows + 1) / 2 * 2;
  for (int64_t r0 = 0; r0 < rows; r0 += 32) {
    // the bf16 elements of a dst row this block writes (32 but at the last block)
    const int64_t width = std::min<int64_t>(32, rows_even - r0);
    const __mmask32 store_mask = width >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << width) - 1);
    for (int64_t c = 0; c < n; c += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - c)) - 1);
      __m512i x[16];
      for (int i = 0; i < 16; ++i) {
        const int64_t r = r0 + 2 * i;
        if (r >= rows) {
          x[i] = _mm512_setzero_si512();
          continue;
        }
        const __m512 lo = _mm512_maskz_loadu_ps(m, src + r * lds + c);
        const __m512 hi = r + 1 < rows ? _mm512_maskz_loadu_ps(m, src + (r + 1) * lds + c) : _mm512_setzero_ps();
        x[i] = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
      }
      transpose16(x);
      const int64_t cols = std::min<int64_t>(16, n - c);
      for (int64_t j = 0; j < cols; ++j) _mm512_mask_storeu_epi16(dst + (c + j) * ldt + r0, store_mask, x[j]);
    }
  }
}

// ---- decoding: K and V read as they are ---------------------------------------------------------
//
// A forward with few query rows per kv head (a decoding step) uses each K and V row once or a few
// times, so laying them out as pair panels first (a scalar shuffle of the whole cache on every
// call) cost several times the products (measured: B1 H16 Lk1024 D128, one query, 5.8 ms against
// eager's 1.1). These two read the rows in place instead (unit stride along the head dim): a
// score is one dot product of a q row and a k row (vdpbf16ps on 32-element chunks, the pairs
// adjacent in both rows, then a horizontal sum), and P V adds p * v_j for each key j, v_j
// converted to float32 (a shift) and P kept in float32.

// The bf16 elements [d, d + 32) of a row of n, as a mask (all ones but at the row's end).
FA_BF16_TARGET __attribute__((always_inline)) inline __mmask32 chunk_mask(int64_t d, int64_t n) {
  return n - d >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (n - d)) - 1);
}

// S[r][c] = alpha * sum_d a[r][d] * k[c][d] for rows r < M, keys c < N, d < D: a's rows lda apart,
// k's rows ldk apart, both of unit element stride (no element past D is read).
FA_BF16_TARGET __attribute__((noinline)) inline void row_scores(int64_t M, int64_t N, int64_t D, const uint16_t* a,
                                                                int64_t lda, const uint16_t* k, int64_t ldk, float* s,
                                                                int64_t lds, float alpha) {
  for (int64_t c = 0; c < N; ++c) {
    const uint16_t* kr = k + c * ldk;
    for (int64_t r = 0; r < M; ++r) {
      const uint16_t* ar = a + r * lda;
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  // two chains
      int64_t d = 0;
      for (; d + 64 <= D; d += 64) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(ar + d), (__m512bh)_mm512_loadu_si512(kr + d));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(ar + d + 32),
                                (__m512bh)_mm512_loadu_si512(kr + d + 32));
      }
      for (; d < D; d += 32) {
        const __mmask32 m = chunk_mask(d, D);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(m, ar + d),
                                (__m512bh)_mm512_maskz_loadu_epi16(m, kr + d));
      }
      s[r * lds + c] = alpha * _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
  }
}

// 16 bf16 values as float32 lanes (a bf16 is the top half of its float32).
FA_BF16_TARGET __attribute__((always_inline)) inline __m512 load16_bf16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// acc[d] += sum_{c < N} p[c] * v[c][d] for d in [d0, d0 + 16 NV) (within Dv): NV zmm of acc in
// registers across the keys.
template <int NV>
FA_BF16_TARGET __attribute__((always_inline)) inline void accumulate_block(int64_t N, const float* p,
                                                                          const uint16_t* v, int64_t ldv, int64_t d0,
                                                                          int64_t Dv, float* acc) {
  __m512 sum[NV];
  __mmask16 mask[NV];
  for (int q = 0; q < NV; ++q) {
    const int64_t left = Dv - d0 - 16 * q;
    mask[q] = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    sum[q] = _mm512_maskz_loadu_ps(mask[q], acc + d0 + 16 * q);
  }
  for (int64_t c = 0; c < N; ++c) {
    const __m512 pc = _mm512_set1_ps(p[c]);
    const uint16_t* vr = v + c * ldv + d0;
    for (int q = 0; q < NV; ++q) sum[q] = _mm512_fmadd_ps(pc, load16_bf16(vr + 16 * q, mask[q]), sum[q]);
  }
  for (int q = 0; q < NV; ++q) _mm512_mask_storeu_ps(acc + d0 + 16 * q, mask[q], sum[q]);
}

// One query row's P V: acc[d] += sum_{c < N} p[c] * v[c][d], d < Dv, v's rows ldv apart (unit
// element stride; no element past Dv is read). 128 columns (8 zmm) per sweep of the keys.
FA_BF16_TARGET __attribute__((noinline)) inline void row_accumulate(int64_t N, const float* p, const uint16_t* v,
                                                                    int64_t ldv, int64_t Dv, float* acc) {
  for (int64_t d0 = 0; d0 < Dv; d0 += 128) {
    switch ((std::min<int64_t>(128, Dv - d0) + 15) / 16) {
      case 1: accumulate_block<1>(N, p, v, ldv, d0, Dv, acc); break;
      case 2: accumulate_block<2>(N, p, v, ldv, d0, Dv, acc); break;
      case 3: accumulate_block<3>(N, p, v, ldv, d0, Dv, acc); break;
      case 4: accumulate_block<4>(N, p, v, ldv, d0, Dv, acc); break;
      case 5: accumulate_block<5>(N, p, v, ldv, d0, Dv, acc); break;
      case 6: accumulate_block<6>(N, p, v, ldv, d0, Dv, acc); break;
      case 7: accumulate_block<7>(N, p, v, ldv, d0, Dv, acc); break;
      default: accumulate_block<8>(N, p, v, ldv, d0, Dv, acc); break;
    }
  }
}

#undef FA_BF16_TARGET

#else  // not FUSED_ATTN_AVX2_CLONES: the callers compile, and never get here (cpu_supported() is false)

inline bool cpu_supported() { return false; }

template <bool ACCUMULATE>
void product(int64_t, int64_t, int64_t, const uint16_t*, int64_t, PanelB16, float*, int64_t, float,
             Band = Band::none, int64_t = 0, int64_t = 0) {
  FA_CHECK(false, "fused_attn: the AVX512-BF16 attention products need the GCC x86-64 build");
}
inline void convert_rows(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {
  FA_CHECK(false, "fused_attn: the AVX512-BF16 attention products need the GCC x86-64 build");
}
inline void convert_transposed(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {
  FA_CHECK(false, "fused_attn: the AVX512-BF16 attention products need the GCC x86-64 build");
}
inline void row_scores(int64_t, int64_t, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t,
                       float) {
  FA_CHECK(false, "fused_attn: the AVX512-BF16 attention products need the GCC x86-64 build");
}
inline void row_accumulate(int64_t, const float*, const uint16_t*, int64_t, int64_t, float*) {
  FA_CHECK(false, "fused_attn: the AVX512-BF16 attention products need the GCC x86-64 build");
}

#endif  // FUSED_ATTN_AVX2_CLONES

}  // namespace fused_attn::cpu_attention::bf16_dot
