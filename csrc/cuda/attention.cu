// Attention forward and backward: tiled online softmax (FlashAttention-2's schedule). Two kernel
// sets share the math below and the launchers at the end:
// - register-resident (float16/bfloat16 on sm_80+, "register-resident kernels" section): each warp
//   owns 16 rows of the result and keeps scores, probabilities and accumulators in mma.sync
//   registers; the fast path;
// - shared-memory tiles (float32, GPUs before sm_80, a backward at head dim > 128, or too little
//   shared memory per block): every tile lives in shared memory, the input tiles in the input
//   dtype, the score tiles and the accumulators in float32; each product is one `block_gemm` call
//   (WMMA fragments for 16-bit types, plain FMA for float32) and the softmax and the gradient
//   elementwise steps read and write the float tiles between the products.
// Head dims are padded with zeros in shared memory, sequence edges with zero rows whose scores are
// masked to -inf.
//
// Forward (per query block of BM rows, per (batch, head)):
//   for each key block:  S = Q K^T;  s = cap(S * scale) + alibi + mask (-inf where masked/outside the
//                        band/out of range; key blocks wholly outside the band are skipped); cap(x) =
//                        softcap tanh(x / softcap) when softcap > 0, else x; alibi_ij =
//                        -slope[b, h] |j - i - shift| when alibi_slopes is given, else 0
//                        m' = max(m, rowmax s);  p = exp(s - m');  l = l * exp(m - m') + rowsum p
//                        O = O * exp(m - m') + dropout(p) V
//   out = O / l (0 where l = 0), lse = m + log l (+inf where l = 0).
// Backward, with delta_i = sum_c dO_ic O_ic, P = exp(s - lse), Z the dropout factors:
//   dV = (P Z)^T dO,  dP = (dO V^T) Z,  dS = P (dP - delta),  dQ = scale dS' K,  dK = scale dS'^T Q,
//   dmask = dS (the additive mask's gradient), with dS' = dS (1 - t^2), t = tanh(S scale / softcap)
//   recomputed from S, when softcap > 0 (else dS' = dS). ALiBi's bias is a constant inside s: P is
//   recomputed with it (lse includes it), dS and the cap's t are those of the formulas above.
// dK/dV are computed per key block (looping over the query blocks and, for grouped-query
// attention, over the query heads that share the kv head), dQ and dmask per query block (looping
// over the key blocks): every output element has one writer, so no atomics and the result is
// deterministic, at the cost of computing S and dP twice.
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"
#include "mma_sm80.cuh"

namespace fused_attn_cuda {
namespace {

// The shared-memory kernels: 8 warps a block. Each phase of a key block (a tile product, the
// softmax rows, the rescale) is spread over the block's warps and separated by barriers, so the
// warps in flight are what hides each phase's latency: at ~113 KB of shared memory per block
// (D = 128, 64 x 64 tiles) an SM holds two blocks, i.e. 4 warps per scheduler with 8 warps a
// block, 2 with the 4 it had before (its forward measured 20 TFLOP/s on the H200). Every loop
// below strides by kThreads / kWarps.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T> constexpr bool kIsFloat = std::is_same<T, float>::value;
// Row padding of shared tiles: 8 elements (16 bytes) keeps WMMA's 32-byte alignment and spreads
// 16-bit rows across banks; float tiles used by the FMA path take an odd pad (no bank conflicts).
template <typename T> constexpr int kPadT = kIsFloat<T> ? 1 : 8;
template <typename T> constexpr int kPadF = kIsFloat<T> ? 1 : 4;

// ---- block-wide tile product -------------------------------------------------------------------
// C[M][N] (float, row-major, ldc) = (accumulate ? C : 0) + A[M][K] * B[K][N], where A is stored
// row-major [M][K] (A_ROW) or as its transpose [K][M], and B row-major [K][N] (B_ROW) or as its
// transpose [N][K]. M, N, K are multiples of 16. All threads of the block call it; the caller
// puts the barriers around it.
template <typename T, bool A_ROW, bool B_ROW>
__device__ __forceinline__ void block_gemm(float* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N,
                                           int K, bool accumulate) {
  if constexpr (kIsFloat<T>) {
    for (int idx = threadIdx.x; idx < M * N; idx += kThreads) {
      const int m = idx / N, n = idx - m * N;
      float acc = accumulate ? C[m * ldc + n] : 0.0f;
      for (int k = 0; k < K; ++k) {
        const float a = A_ROW ? A[m * lda + k] : A[k * lda + m];
        const float b = B_ROW ? B[k * ldb + n] : B[n * ldb + k];
        acc = fmaf(a, b, acc);
      }
      C[m * ldc + n] = acc;
    }
  } else {
    using namespace nvcuda;
    using ALayout = typename std::conditional<A_ROW, wmma::row_major, wmma::col_major>::type;
    using BLayout = typename std::conditional<B_ROW, wmma::row_major, wmma::col_major>::type;
    const int warp = threadIdx.x >> 5;
    const int tiles_n = N / 16, tiles = (M / 16) * tiles_n;
    for (int t = warp; t < tiles; t += kWarps) {
      const int tm = (t / tiles_n) * 16, tn = (t % tiles_n) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      if (accumulate) {
        wmma::load_matrix_sync(acc, C + tm * ldc + tn, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(acc, 0.0f);
      }
      for (int k = 0; k < K; k += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b;
        wmma::load_matrix_sync(a, A_ROW ? A + tm * lda + k : A + k * lda + tm, lda);
        wmma::load_matrix_sync(b, B_ROW ? B + k * ldb + tn : B + tn * ldb + k, ldb);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(C + tm * ldc + tn, acc, ldc, wmma::mem_row_major);
    }
  }
}

// ---- tile loads ----------------------------------------------------------------------------------
// dst[r][c] = src[r * row_stride + c * col_stride] for r < rows_valid, c < cols_valid, else 0, for
// r < rows, c < cols (cols a multiple of 16). 16-byte loads when the source rows allow them.
template <typename T>
__device__ __forceinline__ void load_tile(T* dst, int ld, const T* src, int64_t row_stride, int64_t col_stride,
                                          int rows, int rows_valid, int cols, int cols_valid) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = col_stride == 1 && row_stride % kVec == 0 && cols_valid % kVec == 0 &&
                   (reinterpret_cast<uintptr_t>(src) % 16) == 0;
  if (vec) {
    const int chunks = cols / kVec;
    for (int idx = threadIdx.x; idx < rows * chunks; idx += kThreads) {
      const int r = idx / chunks, c = (idx - r * chunks) * kVec;
      union { uint4 raw; T elems[kVec]; } chunk;
      if (r < rows_valid && c < cols_valid) {
        chunk.raw = *reinterpret_cast<const uint4*>(src + r * row_stride + c);
      } else {
        chunk.raw = make_uint4(0u, 0u, 0u, 0u);
      }
      if (ld % kVec == 0) {
        *reinterpret_cast<uint4*>(dst + r * ld + c) = chunk.raw;
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) dst[r * ld + c + e] = chunk.elems[e];
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
      const int r = idx / cols, c = idx - r * cols;
      dst[r * ld + c] = (r < rows_valid && c < cols_valid) ? src[r * row_stride + c * col_stride]
                                                           : from_float<T>(0.0f);
    }
  }
}

__host__ __device__ __forceinline__ int64_t imin(int64_t x, int64_t y) { return x < y ? x : y; }
__host__ __device__ __forceinline__ int64_t imax(int64_t x, int64_t y) { return x > y ? x : y; }

// ---- the visibility band ---------------------------------------------------------------------------
// Query i sees key j iff band_lo <= j - i <= band_hi (AttentionFwdArgs; both ends clamped to
// [-Lq, Lk]). A half-open index range; empty when end <= begin.
struct Range { int64_t begin, end; };

// The keys some query of [m0, m1) sees: [max(0, m0 + lo), min(Lk, (m1 - 1) + hi + 1)).
__device__ __forceinline__ Range band_keys(const AttentionFwdArgs& a, int64_t m0, int64_t m1) {
  return {imax(0, m0 + a.band_lo), imin(a.len_k, m1 + a.band_hi)};
}
// The queries that see some key of [n0, n1): [max(0, n0 - hi), min(Lq, (n1 - 1) - lo + 1)).
__device__ __forceinline__ Range band_queries(const AttentionFwdArgs& a, int64_t n0, int64_t n1) {
  return {imax(0, n0 - a.band_hi), imin(a.len_q, n1 - a.band_lo)};
}
// The range with its start aligned down to a multiple of `block`, so that the blocks
// begin, begin + block, ... (< end) cover it; end = begin (no block) when it is empty.
__device__ __forceinline__ Range block_aligned(Range r, int64_t block) {
  const int64_t begin = r.begin / block * block;
  return {begin, r.end > r.begin ? r.end : begin};
}

// exp: the fast hardware approximation for the 16-bit types, the accurate one for float32.
template <typename T> __device__ __forceinline__ float exp_(float x) { return kIsFloat<T> ? expf(x) : __expf(x); }

__device__ __forceinline__ void fill(float* dst, int n, float value) {
  for (int i = threadIdx.x; i < n; i += kThreads) dst[i] = value;
}

// ---- the scaled, masked score of one element ------------------------------------------------------
// Logit soft-capping: with a.softcap > 0, replaces the scaled score s by softcap * tanh(s / softcap)
// and returns its derivative 1 - tanh^2 (the factor the backward puts on dS on its way to dq and dk);
// with softcap 0, leaves s alone and returns 1. tanhf (accurate) in every dtype; NaN stays NaN.
// The branch is uniform (one value per launch).
__device__ __forceinline__ float cap_logit(const AttentionFwdArgs& a, float& s) {
  if (a.softcap > 0.0f) {
    const float t = tanhf(s / a.softcap);
    s = a.softcap * t;
    return 1.0f - t * t;
  }
  return 1.0f;
}

// The score from the scaled (and capped) logit s: s + additive mask, or -inf where the key is out
// of range, outside the band or masked.
template <typename T>
__device__ __forceinline__ float mask_logit(const AttentionFwdArgs& a, float s, int64_t b, int64_t h, int64_t i,
                                            int64_t j) {
  if (i >= a.len_q || j >= a.len_k || j - i < a.band_lo || j - i > a.band_hi) return -INFINITY;
  if (a.mask_kind != MaskKind::kNone) {
    const int64_t off = b * a.mask_stride[0] + h * a.mask_stride[1] + i * a.mask_stride[2] + j * a.mask_stride[3];
    if (a.mask_kind == MaskKind::kBool) {
      if (static_cast<const uint8_t*>(a.mask)[off] == 0) return -INFINITY;
    } else {
      s += to_float<T>(static_cast<const T*>(a.mask)[off]);
    }
  }
  return s;
}

// ALiBi (Press et al.; FlashAttention's alibi_slopes): the logit of query i, key j of (batch b, head h)
// gets the constant bias -slope[b, h] |j - i - shift| (shift: query i sits at key position i + shift,
// Lk - Lq under bottom-right alignment). It is added after the cap and before mask_logit, as in the
// reference (cap, + alibi, + mask): an additive mask adds to it, and the -inf of the band, of a bool
// mask or of an out-of-range element replaces it (so a non-finite slope never reaches a masked
// element). The backward recomputes P = exp(s - lse) with the same bias (the forward's lse includes
// it); dS = P (dP - delta) is unchanged, and the cap's derivative is that of the capped score before
// the bias (cap_logit returns it before the bias is added), as for the mask; the slopes get no
// gradient (FlashAttention's contract).
// Cost for plain calls: nothing. The elementwise step is compiled with the bias (kAlibi true) or without
// it, which is the code the kernels ran before ALiBi (a per-element `if` would be if-converted into
// predicated instructions that plain calls still issue, and pushed the register dK/dV kernel at
// D = 128 into spills). The register-resident (mma.sync) kernels take kAlibi as a template parameter,
// picked once per launch (*_mma_kernel_for): one kernel holding both steps behind a runtime branch
// costs every call registers (sm_90 dQ at D = 32: 164 -> 178, 3 blocks per SM -> 2), and their
// instantiations without ALiBi are the pre-ALiBi kernels. The shared-memory kernels keep one uniform
// runtime branch (with_alibi) per tile (per row in their forward), at no measurable register cost
// there. The slope pointer is tested, and the slope read, once per block (once per query head step in
// the dK/dV kernels, whose head changes). The distance is formed per row as a float at the tile's
// first column, plus a small column offset per element (per element in the register dK/dV kernel):
// exact integers while |j - i - shift| < 2^24.
struct Alibi {
  bool on;      // alibi_slopes given (uniform over the launch)
  float slope;  // of this (batch, head); 0 when off
  int64_t shift;
  __device__ __forceinline__ Alibi(const AttentionFwdArgs& a, int64_t b, int64_t h)
      : on(a.alibi_slopes != nullptr),
        slope(on ? a.alibi_slopes[b * a.alibi_stride[0] + h * a.alibi_stride[1]] : 0.0f),
        shift(a.alibi_shift) {}
  // The signed distance j - i - shift as a float.
  __device__ __forceinline__ float dist(int64_t i, int64_t j) const { return static_cast<float>(j - i - shift); }
  // s + the bias at signed distance d; s itself in the step compiled without ALiBi.
  template <bool kAlibi> __device__ __forceinline__ float add(float s, float d) const {
    return kAlibi ? fmaf(-slope, fabsf(d), s) : s;
  }
};

// Runs step(std::true_type{}) when ALiBi is on, else step(std::false_type{}): the one branch, uniform
// over the block, that picks the elementwise step with or without the bias in the shared-memory kernels
// (the step reads the flag as `constexpr bool kAlibi = decltype(flag)::value`).
template <typename Step> __device__ __forceinline__ void with_alibi(const Alibi& alibi, Step&& step) {
  if (alibi.on) {
    step(std::true_type{});
  } else {
    step(std::false_type{});
  }
}

// s = cap(raw * scale) + alibi + additive mask, or -inf where the key is out of range, outside the band
// or masked; d: the ALiBi distance j - i - shift (unused when kAlibi is false).
template <typename T, bool kAlibi>
__device__ __forceinline__ float masked_score(const AttentionFwdArgs& a, const Alibi& alibi, float raw, int64_t b,
                                              int64_t h, int64_t i, int64_t j, float d) {
  float s = raw * a.scale;
  cap_logit(a, s);
  return mask_logit<T>(a, alibi.add<kAlibi>(s, d), b, h, i, j);
}

// ---- online softmax: masked rows and non-finite inputs ---------------------------------------------
// The running maximum a row's exponents are taken against: m, or 0 while every score of the row so
// far is masked (m = -inf), so that exp(-inf - 0) = 0 gives such rows zero weight and zero output
// with no special case. The maximum itself (fmaxf) skips NaN, so a NaN score is never hidden by a
// "nothing visible" shortcut: its exp is NaN and the whole row's sum, output and lse become NaN,
// as in the reference (NaN stays in the rows that see it).
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.0f : m; }

// The log-sum-exp saved for the backward: +inf for a row with nothing visible (l = 0: the backward
// then gives it P = 0), NaN when l is NaN.
__device__ __forceinline__ float row_lse(float m, float l) { return l == 0.0f ? INFINITY : m + logf(l); }

// ---- shared-memory plans --------------------------------------------------------------------------
// Tile sizes picked at launch time: the largest of these that fits the device's shared memory.
struct Blocks { int m, n; };
constexpr Blocks kBlockChoices[] = {{64, 64}, {64, 32}, {32, 32}, {16, 16}};

// Carves shared memory into aligned buffers; with base == nullptr it only measures.
struct Carver {
  unsigned char* base;
  size_t used = 0;
  template <typename U> __host__ __device__ U* take(size_t count) {
    used = (used + 127) / 128 * 128;  // 128-byte alignment (WMMA needs 32)
    U* p = base ? reinterpret_cast<U*>(base + used) : nullptr;
    used += count * sizeof(U);
    return p;
  }
};

struct Dims {
  int bm, bn, dp, dvp;  // block sizes and padded head dims
};

template <typename T>
struct FwdSmem {
  T *q, *k, *v, *p;
  float *s, *o, *row_m, *row_l, *row_alpha;
  int ldq, ldv, lds, ldp, ldo;
  __host__ __device__ size_t carve(unsigned char* base, const Dims& d) {
    Carver c{base};
    ldq = d.dp + kPadT<T>; ldv = d.dvp + kPadT<T>; lds = d.bn + kPadF<T>; ldp = d.bn + kPadT<T>;
    ldo = d.dvp + kPadF<T>;
    q = c.take<T>(size_t(d.bm) * ldq);
    k = c.take<T>(size_t(d.bn) * ldq);
    v = c.take<T>(size_t(d.bn) * ldv);
    p = c.take<T>(size_t(d.bm) * ldp);
    s = c.take<float>(size_t(d.bm) * lds);
    o = c.take<float>(size_t(d.bm) * ldo);
    row_m = c.take<float>(d.bm);
    row_l = c.take<float>(d.bm);
    row_alpha = c.take<float>(d.bm);
    return c.used;
  }
};

// Shared by both backward kernels: q/do tiles (BM rows), k/v tiles (BN rows), the score and dP
// tiles, the P and dS tiles, and accumulators: dK/dV ([BN] rows) or dQ ([BM] rows).
template <typename T>
struct BwdSmem {
  T *q, *dout, *k, *v, *p, *ds;
  float *s, *dp, *acc_a, *acc_b, *row_lse, *row_delta;
  int ldq, ldv, lds, ldp, lda_, ldb_;
  __host__ __device__ size_t carve(unsigned char* base, const Dims& d, bool dkdv) {
    Carver c{base};
    ldq = d.dp + kPadT<T>; ldv = d.dvp + kPadT<T>; lds = d.bn + kPadF<T>; ldp = d.bn + kPadT<T>;
    q = c.take<T>(size_t(d.bm) * ldq);
    dout = c.take<T>(size_t(d.bm) * ldv);
    k = c.take<T>(size_t(d.bn) * ldq);
    v = c.take<T>(size_t(d.bn) * ldv);
    p = c.take<T>(size_t(d.bm) * ldp);
    ds = c.take<T>(size_t(d.bm) * ldp);
    s = c.take<float>(size_t(d.bm) * lds);
    dp = c.take<float>(size_t(d.bm) * lds);
    if (dkdv) {  // acc_a = dK [BN][Dp], acc_b = dV [BN][Dvp]
      lda_ = d.dp + kPadF<T>; ldb_ = d.dvp + kPadF<T>;
      acc_a = c.take<float>(size_t(d.bn) * lda_);
      acc_b = c.take<float>(size_t(d.bn) * ldb_);
    } else {     // acc_a = dQ [BM][Dp]
      lda_ = d.dp + kPadF<T>; ldb_ = 0;
      acc_a = c.take<float>(size_t(d.bm) * lda_);
      acc_b = nullptr;
    }
    row_lse = c.take<float>(d.bm);
    row_delta = c.take<float>(d.bm);
    return c.used;
  }
};

// ---- the grid ---------------------------------------------------------------------------------------
// Every kernel but the delta one runs a block per (sequence block, (batch, head) pair): the sequence
// blocks along the grid's x (up to 2^31 - 1 of them), the pairs along y and, past y's limit, z (both
// 65535 on every GPU so far), so pair = blockIdx.y + gridDim.y * blockIdx.z. The last z slice may
// end in spare blocks (pair >= the pair count), which return at once. (The sequence blocks were on
// y, which refused every call from 65536 blocks on: a 16-bit forward from ~4.2M queries, float32 at
// head dim 256 from ~2.1M, at sm_86's 16-row tiles from ~1M.) seq_grid below builds these grids.
__device__ __forceinline__ int64_t grid_pair() { return int64_t(blockIdx.z) * gridDim.y + blockIdx.y; }

// ---- forward ---------------------------------------------------------------------------------------
// grid (ceil(Lq / BM), B * Hq pairs: seq_grid), kThreads threads.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_fwd_kernel(const AttentionFwdArgs a, const Dims d) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  FwdSmem<T> sm;
  sm.carve(smem_raw, d);
  const int64_t bh = grid_pair(), b = bh / a.heads_q, h = bh % a.heads_q;
  if (bh >= a.batch * a.heads_q) return;  // a spare block of the grid's last z slice
  const int64_t hkv = h / (a.heads_q / a.heads_kv);
  const int64_t m0 = int64_t(blockIdx.x) * d.bm;
  const int rows_q = static_cast<int>(imin(d.bm, a.len_q - m0));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  const T* q = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + m0 * a.q_stride[2];
  const T* k = static_cast<const T*>(a.k) + b * a.k_stride[0] + hkv * a.k_stride[1];
  const T* v = static_cast<const T*>(a.v) + b * a.v_stride[0] + hkv * a.v_stride[1];
  const int D = static_cast<int>(a.head_dim), Dv = static_cast<int>(a.head_dim_v);

  load_tile<T>(sm.q, sm.ldq, q, a.q_stride[2], a.q_stride[3], d.bm, rows_q, d.dp, D);
  fill(sm.o, d.bm * sm.ldo, 0.0f);
  for (int r = threadIdx.x; r < d.bm; r += kThreads) {
    sm.row_m[r] = -INFINITY;
    sm.row_l[r] = 0.0f;
  }
  const Range keys = block_aligned(band_keys(a, m0, m0 + rows_q), d.bn);  // the key blocks the band leaves
  const int64_t row_base = (b * a.heads_q + h) * a.len_q;  // dropout row of query 0 of this head
  const Alibi alibi(a, b, h);

  for (int64_t n0 = keys.begin; n0 < keys.end; n0 += d.bn) {
    const int rows_k = static_cast<int>(imin(d.bn, a.len_k - n0));
    __syncthreads();  // the previous iteration is done with the k, v and p tiles
    load_tile<T>(sm.k, sm.ldq, k + n0 * a.k_stride[2], a.k_stride[2], a.k_stride[3], d.bn, rows_k, d.dp, D);
    load_tile<T>(sm.v, sm.ldv, v + n0 * a.v_stride[2], a.v_stride[2], a.v_stride[3], d.bn, rows_k, d.dvp, Dv);
    __syncthreads();
    block_gemm<T, true, false>(sm.s, sm.lds, sm.q, sm.ldq, sm.k, sm.ldq, d.bm, d.bn, d.dp, false);
    __syncthreads();
    // Online softmax, one warp per row.
    for (int r = warp; r < d.bm; r += kWarps) {
      const int64_t i = m0 + r;
      float* srow = sm.s + r * sm.lds;
      float row_max = -INFINITY;
      with_alibi(alibi, [&](auto flag) {
        constexpr bool kAlibi = decltype(flag)::value;
        const float d0 = kAlibi ? alibi.dist(i, n0) : 0.0f;  // the ALiBi distance at column 0
        for (int c = lane; c < d.bn; c += 32) {
          const float s = masked_score<T, kAlibi>(a, alibi, srow[c], b, h, i, n0 + c, d0 + static_cast<float>(c));
          srow[c] = s;
          row_max = fmaxf(row_max, s);
        }
      });
      row_max = warp_max(row_max);
      const float m_old = sm.row_m[r];
      const float m_new = fmaxf(m_old, row_max);
      const float m_safe = safe_max(m_new);
      const uint32_t key = a.dropout.enabled ? dropout_row_key(a.dropout, row_base + i) : 0u;
      float row_sum = 0.0f;
      for (int c = lane; c < d.bn; c += 32) {
        const float p = exp_<T>(srow[c] - m_safe);
        row_sum += p;
        const float z = a.dropout.enabled ? dropout_factor(a.dropout, key, n0 + c) : 1.0f;
        sm.p[r * sm.ldp + c] = from_float<T>(p * z);
      }
      row_sum = warp_sum(row_sum);
      // Every lane read row_m[r] above; lane 0 rewrites it below. The shuffles of warp_sum already
      // order the two, but racecheck does not model that: the explicit warp barrier says it.
      __syncwarp();
      if (lane == 0) {
        const float alpha = exp_<T>(m_old - m_safe);
        sm.row_alpha[r] = alpha;
        sm.row_m[r] = m_new;
        sm.row_l[r] = sm.row_l[r] * alpha + row_sum;
      }
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < d.bm * d.dvp; idx += kThreads) {
      const int r = idx / d.dvp, c = idx - r * d.dvp;
      sm.o[r * sm.ldo + c] *= sm.row_alpha[r];
    }
    __syncthreads();
    block_gemm<T, true, true>(sm.o, sm.ldo, sm.p, sm.ldp, sm.v, sm.ldv, d.bm, d.dvp, d.bn, true);
  }
  __syncthreads();
  T* out = static_cast<T*>(a.out) + b * a.out_stride[0] + h * a.out_stride[1] + m0 * a.out_stride[2];
  for (int idx = threadIdx.x; idx < rows_q * Dv; idx += kThreads) {
    const int r = idx / Dv, c = idx - r * Dv;
    const float l = sm.row_l[r];
    out[r * a.out_stride[2] + c * a.out_stride[3]] = from_float<T>(l == 0.0f ? 0.0f : sm.o[r * sm.ldo + c] / l);
  }
  for (int r = threadIdx.x; r < rows_q; r += kThreads) {
    const float l = sm.row_l[r];
    a.lse[row_base + m0 + r] = row_lse(sm.row_m[r], l);
  }
}

// ---- register-resident kernels (16-bit types, sm_80+): FlashAttention-2's layout ------------------
// A block of kMmaWarps warps; each warp owns 16 rows of the block's output end to end (16 queries in
// the forward and dQ kernels, 16 keys in the dK/dV kernel), so no barrier separates the steps of one
// tile pair. The tile products are `mma.sync` m16n8k16 (mma_sm80.cuh) with float32 accumulators in
// registers; an accumulator row's values sit in the 4 lanes of a quad (row reductions are two
// shuffles). The accumulator layout of two adjacent n8 tiles is the A-operand layout of one k16
// slice, so a product's result (P, dS) becomes the next product's A operand without shared memory.
// Shared memory holds only input tiles, the streamed ones double-buffered and filled by cp.async
// while the previous stage is used. Head dims are padded with zeros up to the compile-time kD,
// sequence edges with zero rows whose scores are masked to -inf.
constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;
constexpr int kMmaRows = 16 * kMmaWarps;  // the rows a block owns (queries, or keys for dK/dV)
// Streamed tile rows: keys in the forward (32 at kD = 256 keeps two stages of K and V in ~100 KB
// and the S accumulators small beside O's 128 registers a thread), keys in dQ, queries in dK/dV
// (where dK and dV accumulate in registers: 2 * kD / 2 of them a thread).
template <int kD> constexpr int kMmaFwdBlockN = kD <= 128 ? 64 : 32;
constexpr int kMmaDqBlockN = 64;
constexpr int kMmaDkdvBlockM = 32;
// Largest head dim of the backward kernels (dK and dV accumulators: kD registers a thread).
constexpr int kMmaBwdMaxHeadDim = 128;
// Row pitch of the shared tiles: 8 elements (16 bytes) of padding keep every row 16-byte aligned
// (cp.async, ldmatrix) and put the 8 rows an ldmatrix phase reads in 8 distinct bank groups.
template <int kD> constexpr int kMmaPitch = kD + 8;

template <typename T, int kD> constexpr size_t mma_fwd_smem_bytes() {
  return sizeof(T) * size_t(kMmaPitch<kD>) * (kMmaRows + 4 * kMmaFwdBlockN<kD>);
}
// dQ: q and dout tiles (kMmaRows) once, two stages of k and v (kMmaDqBlockN each)
template <typename T, int kD> constexpr size_t mma_dq_smem_bytes() {
  return sizeof(T) * size_t(kMmaPitch<kD>) * (2 * kMmaRows + 4 * kMmaDqBlockN);
}
// dK/dV: k and v tiles (kMmaRows) once, two stages of q and dout (kMmaDkdvBlockM each), and two
// stages of the block's lse and delta values
template <typename T, int kD> constexpr size_t mma_dkdv_smem_bytes() {
  return sizeof(T) * size_t(kMmaPitch<kD>) * (2 * kMmaRows + 4 * kMmaDkdvBlockM) +
         sizeof(float) * 4 * kMmaDkdvBlockM;
}

// Rows [0, kRows) x cols [0, kD) of a shared tile (pitch kMmaPitch<kD>): src[r * row_stride + c] for
// r < rows_valid and c < cols_valid, zeros elsewhere. `vec`: 16-byte cp.async copies (unit column
// stride, 16-byte aligned rows, cols_valid a multiple of 8); else element loads, complete at once.
template <typename T, int kRows, int kD>
__device__ __forceinline__ void mma_load_tile(T* dst, const T* src, int64_t row_stride, int64_t col_stride,
                                              int rows_valid, int cols_valid, bool vec) {
  constexpr int kPitch = kMmaPitch<kD>;
  if (vec) {
    constexpr int kChunks = kD / 8;
    for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kMmaThreads) {
      const int r = idx / kChunks, c = (idx % kChunks) * 8;
      const bool valid = r < rows_valid && c < cols_valid;
      cp_async_16(dst + r * kPitch + c, valid ? src + r * row_stride + c : src, valid);
    }
  } else {
    for (int idx = threadIdx.x; idx < kRows * kD; idx += kMmaThreads) {
      const int r = idx / kD, c = idx % kD;
      dst[r * kPitch + c] =
          (r < rows_valid && c < cols_valid) ? src[r * row_stride + c * col_stride] : from_float<T>(0.0f);
    }
  }
}

// Whether rows starting at `base` (every block's first row: base + n0 * row_stride) can be copied
// in 16-byte chunks.
template <typename T>
__device__ __forceinline__ bool cp_async_ok(const T* base, int64_t row_stride, int64_t col_stride, int cols_valid) {
  return col_stride == 1 && row_stride % 8 == 0 && cols_valid % 8 == 0 &&
         reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// Whether every score of the block pair (queries [m0, m0 + bm), keys [n0, n0 + bn)) is in range and
// visible, so that it needs only the scale: no mask, both ranges inside their sequences and the
// whole block inside the band (min j - i = n0 - (m0 + bm - 1) >= lo, max j - i = n0 + bn - 1 - m0
// <= hi). Elsewhere mask_logit runs per element (the cap and the ALiBi bias run on both paths).
__device__ __forceinline__ bool block_unmasked(const AttentionFwdArgs& a, int64_t m0, int bm, int64_t n0, int bn) {
  return a.mask_kind == MaskKind::kNone && m0 + bm <= a.len_q && n0 + bn <= a.len_k &&
         n0 - (m0 + bm - 1) >= a.band_lo && n0 + bn - 1 - m0 <= a.band_hi;
}

// The K and V rows of one (batch, kv head), streamed kBN keys at a time into two shared stages
// (block blk into stage blk % 2) for the kernels whose warps own queries.
template <typename T, int kD, int kBN>
struct KvStream {
  const AttentionFwdArgs& a;
  T* k_tiles;  // [2][kBN][kMmaPitch<kD>]
  T* v_tiles;  // [2][kBN][kMmaPitch<kD>]
  const T* k;
  const T* v;
  bool k_vec, v_vec;

  __device__ __forceinline__ KvStream(const AttentionFwdArgs& args, T* k_smem, T* v_smem, int64_t b, int64_t hkv)
      : a(args), k_tiles(k_smem), v_tiles(v_smem),
        k(static_cast<const T*>(args.k) + b * args.k_stride[0] + hkv * args.k_stride[1]),
        v(static_cast<const T*>(args.v) + b * args.v_stride[0] + hkv * args.v_stride[1]) {
    // Block n0 starts n0 * stride elements on: 16-byte aligned for all blocks when the head's base is.
    k_vec = cp_async_ok(k, a.k_stride[2], a.k_stride[3], static_cast<int>(a.head_dim));
    v_vec = cp_async_ok(v, a.v_stride[2], a.v_stride[3], static_cast<int>(a.head_dim_v));
  }
  // The key blocks [first, last) holding the keys the queries [m0, m0 + rows) see (none when the
  // band leaves them no key: first = last).
  __device__ __forceinline__ void blocks(int64_t m0, int rows, int* first, int* last) const {
    const Range keys = block_aligned(band_keys(a, m0, imin(a.len_q, m0 + rows)), kBN);
    *first = static_cast<int>(keys.begin / kBN);
    *last = static_cast<int>((keys.end + kBN - 1) / kBN);
  }
  // Issues block blk's copies (cp.async where possible) and commits them as one group.
  __device__ __forceinline__ void load(int blk) const {
    const int64_t n0 = int64_t(blk) * kBN;
    const int rows_k = static_cast<int>(imin(kBN, a.len_k - n0));
    mma_load_tile<T, kBN, kD>(k_stage(blk), k + n0 * a.k_stride[2], a.k_stride[2], a.k_stride[3], rows_k,
                              static_cast<int>(a.head_dim), k_vec);
    mma_load_tile<T, kBN, kD>(v_stage(blk), v + n0 * a.v_stride[2], a.v_stride[2], a.v_stride[3], rows_k,
                              static_cast<int>(a.head_dim_v), v_vec);
    cp_async_commit();
  }
  __device__ __forceinline__ T* k_stage(int blk) const { return k_tiles + (blk & 1) * kBN * kMmaPitch<kD>; }
  __device__ __forceinline__ T* v_stage(int blk) const { return v_tiles + (blk & 1) * kBN * kMmaPitch<kD>; }
};

// The A fragment of k16 slice kk of 16 rows of a shared tile: ldmatrix.x4 with lane l pointing at
// row l % 16, column half l / 16.
template <typename T>
__device__ __forceinline__ void load_a_slice(uint32_t (&a)[4], const T* rows16, int pitch, int kk) {
  const int lane = threadIdx.x & 31;
  ldmatrix_x4<false>(a, rows16 + (lane & 15) * pitch + kk * 16 + (lane >> 4) * 8);
}

// The A fragment of k16 slice kk made from accumulator tiles 2 kk (its columns 0..7) and 2 kk + 1.
template <typename T, int kTiles>
__device__ __forceinline__ void acc_to_a_slice(uint32_t (&a)[4], const float (&acc)[kTiles][4], int kk) {
  a[0] = pack2<T>(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack2<T>(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack2<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack2<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// acc (16 x 8 kTiles) += A_slice (16 x 16, k slice kk) B_slice, B read from a shared tile stored
// either with rows = n ([n][k], kBRowsK false: ldmatrix, e.g. K in S = Q K^T) or rows = k ([k][n],
// true: ldmatrix.trans, e.g. V in O = P V). One ldmatrix.x4 gives two n8 tiles' fragments.
template <typename T, int kTiles, bool kBRowsK>
__device__ __forceinline__ void mma_slice(float (&acc)[kTiles][4], const uint32_t (&a)[4], const T* b, int pitch,
                                          int kk) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < kTiles; j += 2) {
    uint32_t f[4];  // f[0..1]: n8 tile j, f[2..3]: tile j + 1
    if constexpr (kBRowsK) {  // k row kk * 16 + l % 16, n half l / 16
      ldmatrix_x4<true>(f, b + (kk * 16 + (lane & 15)) * pitch + j * 8 + (lane >> 4) * 8);
    } else {                  // n row (l / 16) * 8 + l % 8, k half (l / 8) % 2
      ldmatrix_x4<false>(f, b + (j * 8 + ((lane >> 4) << 3) + (lane & 7)) * pitch + kk * 16 + ((lane >> 3) & 1) * 8);
    }
    mma_16816<T>(acc[j], a, f);
    mma_16816<T>(acc[j + 1], a, f + 2);
  }
}

template <int kTiles> __device__ __forceinline__ void zero_acc(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
}

// Accumulator element e of tile j sits at row g + 8 (e / 2), column 8 j + 2 t + e % 2 of the
// warp's 16 x 8 kTiles result (lane = 4 g + t).
__device__ __forceinline__ int acc_row(int e) { return ((threadIdx.x & 31) >> 2) + (e >> 1) * 8; }
__device__ __forceinline__ int acc_col(int j, int e) { return j * 8 + 2 * (threadIdx.x & 3) + (e & 1); }

// Stores the warp's 16 x kD accumulator rows, times `mul`, to rows row0 + r (< rows_valid) of a
// contiguous T matrix with `cols` columns.
template <typename T, int kTiles>
__device__ __forceinline__ void store_acc_rows(T* dst, const float (&acc)[kTiles][4], int64_t row0, int64_t rows_valid,
                                               int cols, float mul) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int64_t r = row0 + acc_row(e);
      const int c = acc_col(j, e);
      if (r < rows_valid && c < cols) dst[r * cols + c] = from_float<T>(acc[j][e] * mul);
    }
  }
}

// grid (ceil(Lq / kMmaRows), B * Hq pairs: seq_grid), kMmaThreads threads.
//   S = Q K^T; online softmax on the registers (the row sum stays a per-lane partial: every lane of
//   a quad rescales by the same factor; it is reduced once at the end); O = O alpha + P V.
template <typename T, int kD, bool kAlibi>
__global__ void __launch_bounds__(kMmaThreads, 1) attention_fwd_mma_kernel(const AttentionFwdArgs a) {
  constexpr int kBN = kMmaFwdBlockN<kD>, kPitch = kMmaPitch<kD>;
  constexpr int kKSlices = kD / 16;   // k16 slices of the head dim in S = Q K^T
  constexpr int kNTiles = kBN / 8;    // n8 tiles of S (keys)
  constexpr int kPSlices = kBN / 16;  // k16 slices of the key block in O += P V
  constexpr int kOTiles = kD / 8;     // n8 tiles of O (value columns)
  // Q's A fragments stay in registers up to kD = 128 (32 registers); at 256 O's accumulators
  // already take 128, so they are re-read from shared memory for every key block.
  constexpr bool kQInRegisters = kD <= 128;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_tile = reinterpret_cast<T*>(smem_raw);  // [kMmaRows][kPitch]
  T* k_tiles = q_tile + kMmaRows * kPitch;      // [2][kBN][kPitch]
  T* v_tiles = k_tiles + 2 * kBN * kPitch;      // [2][kBN][kPitch]

  const int64_t bh = grid_pair(), b = bh / a.heads_q, h = bh % a.heads_q;
  if (bh >= a.batch * a.heads_q) return;  // a spare block of the grid's last z slice
  const int64_t hkv = h / (a.heads_q / a.heads_kv);
  const int64_t m0 = int64_t(blockIdx.x) * kMmaRows;
  const int warp = threadIdx.x >> 5, t = threadIdx.x & 3;
  const int D = static_cast<int>(a.head_dim), Dv = static_cast<int>(a.head_dim_v);
  const int rows_q = static_cast<int>(imin(kMmaRows, a.len_q - m0));

  const T* q = static_cast<const T*>(a.q) + b * a.q_stride[0] + h * a.q_stride[1] + m0 * a.q_stride[2];
  const KvStream<T, kD, kBN> kv(a, k_tiles, v_tiles, b, hkv);
  int blk_first, blk_last;
  kv.blocks(m0, kMmaRows, &blk_first, &blk_last);

  mma_load_tile<T, kMmaRows, kD>(q_tile, q, a.q_stride[2], a.q_stride[3], rows_q, D,
                                 cp_async_ok(q, a.q_stride[2], a.q_stride[3], D));
  cp_async_commit();
  if (blk_first < blk_last) kv.load(blk_first);

  const T* q_warp = q_tile + warp * 16 * kPitch;
  uint32_t q_frag[kQInRegisters ? kKSlices : 1][4];
  if (blk_first < blk_last) cp_async_wait<1>(); else cp_async_wait<0>();
  __syncthreads();
  if constexpr (kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < kKSlices; ++kk) load_a_slice<T>(q_frag[kk], q_warp, kPitch, kk);
  }

  float o[kOTiles][4];
  zero_acc(o);
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};  // row r: acc elements 2r, 2r+1
  const int64_t row_base = (b * a.heads_q + h) * a.len_q;  // dropout / lse row of query 0 of this head
  const int64_t rows_i[2] = {m0 + warp * 16 + acc_row(0), m0 + warp * 16 + acc_row(2)};
  uint32_t drop_key[2] = {0u, 0u};
  if (a.dropout.enabled) {
    for (int r = 0; r < 2; ++r) drop_key[r] = dropout_row_key(a.dropout, row_base + rows_i[r]);
  }
  const Alibi alibi(a, b, h);

  for (int blk = blk_first; blk < blk_last; ++blk) {
    if (blk + 1 < blk_last) {
      kv.load(blk + 1);  // the stage it fills was released by the barrier closing the last block
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_tile = kv.k_stage(blk);
    const T* v_tile = kv.v_stage(blk);
    const int64_t n0 = int64_t(blk) * kBN;

    float s[kNTiles][4];
    zero_acc(s);
#pragma unroll
    for (int kk = 0; kk < kKSlices; ++kk) {
      uint32_t a_frag[4];
      if constexpr (kQInRegisters) {
#pragma unroll
        for (int e = 0; e < 4; ++e) a_frag[e] = q_frag[kk][e];
      } else {
        load_a_slice<T>(a_frag, q_warp, kPitch, kk);
      }
      mma_slice<T, kNTiles, false>(s, a_frag, k_tile, kPitch, kk);
    }

    const bool plain = block_unmasked(a, m0, kMmaRows, n0, kBN);
    // The ALiBi distance at the lane's first column acc_col(0, 0) = 2t of each of its rows; element
    // (j, e) is acc_col(j, e) - 2t = 8 j + e % 2 columns on (a constant in the unrolled loop).
    float alibi_d0[2] = {0.0f, 0.0f};
    if constexpr (kAlibi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) alibi_d0[r] = alibi.dist(rows_i[r], n0 + acc_col(0, 0));
    }
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float sc = s[j][e] * a.scale;
        cap_logit(a, sc);  // softcap > 0: the capped score is formed explicitly, also on the plain path
        sc = alibi.add<kAlibi>(sc, alibi_d0[e >> 1] + static_cast<float>(8 * j + (e & 1)));  // both paths too
        s[j][e] = plain ? sc : mask_logit<T>(a, sc, b, h, rows_i[e >> 1], n0 + acc_col(j, e));
      }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float block_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) block_max = fmaxf(block_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(block_max));
      const float m_safe = safe_max(new_max);
      const float alpha = exp_<T>(row_max[r] - m_safe);
      row_max[r] = new_max;
      float part = 0.0f;
#pragma unroll
      for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          const float p = exp_<T>(s[j][e] - m_safe);
          part += p;
          s[j][e] = a.dropout.enabled ? p * dropout_factor(a.dropout, drop_key[r], n0 + acc_col(j, e)) : p;
        }
      }
      row_sum[r] = row_sum[r] * alpha + part;
#pragma unroll
      for (int j = 0; j < kOTiles; ++j) {
        o[j][2 * r] *= alpha;
        o[j][2 * r + 1] *= alpha;
      }
    }

#pragma unroll
    for (int kk = 0; kk < kPSlices; ++kk) {
      uint32_t p_frag[4];
      acc_to_a_slice<T>(p_frag, s, kk);
      mma_slice<T, kOTiles, true>(o, p_frag, v_tile, kPitch, kk);
    }
    __syncthreads();  // every warp is done with this stage before the next load overwrites it
  }

  T* out = static_cast<T*>(a.out) + b * a.out_stride[0] + h * a.out_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    const int64_t i = rows_i[r];
    if (i >= a.len_q) continue;
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
#pragma unroll
    for (int j = 0; j < kOTiles; ++j) {
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) {
        const int c = acc_col(j, e);
        if (c < Dv) out[i * a.out_stride[2] + c * a.out_stride[3]] = from_float<T>(o[j][e] * inv);
      }
    }
    if (t == 0) a.lse[row_base + i] = row_lse(row_max[r], l);
  }
}

// The two score-side products of a backward step, for the warp's 16 rows: x = A1 B1^T and
// y = A2 B2^T over the (padded) head dim, A tiles stored [rows][kD] (16 rows from a1 / a2), B tiles
// [n][kD]. The dQ kernel forms S = Q K^T and dP = dO V^T with them, the dK/dV kernel
// S^T = K Q^T and dP^T = V dO^T.
template <typename T, int kD, int kTiles>
__device__ __forceinline__ void two_products(float (&x)[kTiles][4], const T* a1, const T* b1, float (&y)[kTiles][4],
                                             const T* a2, const T* b2) {
  zero_acc(x);
  zero_acc(y);
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    uint32_t frag[4];
    load_a_slice<T>(frag, a1, kMmaPitch<kD>, kk);
    mma_slice<T, kTiles, false>(x, frag, b1, kMmaPitch<kD>, kk);
    load_a_slice<T>(frag, a2, kMmaPitch<kD>, kk);
    mma_slice<T, kTiles, false>(y, frag, b2, kMmaPitch<kD>, kk);
  }
}

// dQ (and dmask) for kMmaRows queries of one (batch, head): grid (ceil(Lq / kMmaRows), B * Hq pairs:
// seq_grid).
// Per key block: S = Q K^T and dP = dO V^T in accumulators; P = exp(s - lse) (0 where masked),
// dS = P (dP Z - delta) in place of dP; dmask = dS; dQ += dS K with dS as A fragments.
template <typename T, int kD, bool kAlibi>
__global__ void __launch_bounds__(kMmaThreads, 1) attention_bwd_dq_mma_kernel(const AttentionBwdArgs a) {
  const AttentionFwdArgs& f = a.fwd;
  constexpr int kBN = kMmaDqBlockN, kPitch = kMmaPitch<kD>;
  constexpr int kNTiles = kBN / 8, kSSlices = kBN / 16, kDTiles = kD / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* q_tile = reinterpret_cast<T*>(smem_raw);  // [kMmaRows][kPitch]
  T* do_tile = q_tile + kMmaRows * kPitch;      // [kMmaRows][kPitch]
  T* k_tiles = do_tile + kMmaRows * kPitch;     // [2][kBN][kPitch]
  T* v_tiles = k_tiles + 2 * kBN * kPitch;      // [2][kBN][kPitch]

  const int64_t bh = grid_pair(), b = bh / f.heads_q, h = bh % f.heads_q;
  if (bh >= f.batch * f.heads_q) return;  // a spare block of the grid's last z slice
  const int64_t hkv = h / (f.heads_q / f.heads_kv);
  const int64_t m0 = int64_t(blockIdx.x) * kMmaRows;
  const int warp = threadIdx.x >> 5;
  const int D = static_cast<int>(f.head_dim), Dv = static_cast<int>(f.head_dim_v);
  const int rows_q = static_cast<int>(imin(kMmaRows, f.len_q - m0));

  const T* q = static_cast<const T*>(f.q) + b * f.q_stride[0] + h * f.q_stride[1] + m0 * f.q_stride[2];
  const T* dout = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1] + m0 * a.dout_stride[2];
  const KvStream<T, kD, kBN> kv(f, k_tiles, v_tiles, b, hkv);
  int blk_first, blk_last;
  kv.blocks(m0, kMmaRows, &blk_first, &blk_last);

  mma_load_tile<T, kMmaRows, kD>(q_tile, q, f.q_stride[2], f.q_stride[3], rows_q, D,
                                 cp_async_ok(q, f.q_stride[2], f.q_stride[3], D));
  mma_load_tile<T, kMmaRows, kD>(do_tile, dout, a.dout_stride[2], a.dout_stride[3], rows_q, Dv,
                                 cp_async_ok(dout, a.dout_stride[2], a.dout_stride[3], Dv));
  cp_async_commit();
  if (blk_first < blk_last) kv.load(blk_first);

  const int64_t row_base = (b * f.heads_q + h) * f.len_q;
  const int64_t rows_i[2] = {m0 + warp * 16 + acc_row(0), m0 + warp * 16 + acc_row(2)};
  float lse[2], delta[2];
  uint32_t drop_key[2] = {0u, 0u};
  for (int r = 0; r < 2; ++r) {
    const bool in = rows_i[r] < f.len_q;
    lse[r] = in ? f.lse[row_base + rows_i[r]] : INFINITY;  // rows past Lq: P = 0
    delta[r] = in ? a.delta[row_base + rows_i[r]] : 0.0f;
    if (f.dropout.enabled) drop_key[r] = dropout_row_key(f.dropout, row_base + rows_i[r]);
  }
  float dq[kDTiles][4];
  zero_acc(dq);
  const Alibi alibi(f, b, h);
  const T* q_warp = q_tile + warp * 16 * kPitch;
  const T* do_warp = do_tile + warp * 16 * kPitch;
  T* dmask = static_cast<T*>(a.dmask);

  for (int blk = blk_first; blk < blk_last; ++blk) {
    if (blk + 1 < blk_last) {
      kv.load(blk + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_tile = kv.k_stage(blk);
    const T* v_tile = kv.v_stage(blk);
    const int64_t n0 = int64_t(blk) * kBN;

    float s[kNTiles][4], dp[kNTiles][4];
    two_products<T, kD>(s, q_warp, k_tile, dp, do_warp, v_tile);
    const bool plain = block_unmasked(f, m0, kMmaRows, n0, kBN);
    float alibi_d0[2] = {0.0f, 0.0f};  // as in the forward: the distance at column acc_col(0, 0)
    if constexpr (kAlibi) {
#pragma unroll
      for (int r = 0; r < 2; ++r) alibi_d0[r] = alibi.dist(rows_i[r], n0 + acc_col(0, 0));
    }
#pragma unroll
    for (int j = 0; j < kNTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        const int64_t i = rows_i[r], jj = n0 + acc_col(j, e);
        float logit = s[j][e] * f.scale;
        const float dcap = cap_logit(f, logit);  // t recomputed from the raw S: 1 - t^2 (before the bias)
        logit = alibi.add<kAlibi>(logit, alibi_d0[r] + static_cast<float>(8 * j + (e & 1)));  // P as forward's
        const float sc = plain ? logit : mask_logit<T>(f, logit, b, h, i, jj);
        const float p = sc == -INFINITY ? 0.0f : exp_<T>(sc - lse[r]);  // lse = +inf on dead rows: 0
        const float z = f.dropout.enabled ? dropout_factor(f.dropout, drop_key[r], jj) : 1.0f;
        const float ds = p * (dp[j][e] * z - delta[r]);
        dp[j][e] = ds * dcap;  // towards dq: through the cap
        if (dmask != nullptr && i < f.len_q && jj < f.len_k) {
          dmask[(row_base + i) * f.len_k + jj] = from_float<T>(ds);
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < kSSlices; ++kk) {
      uint32_t ds_frag[4];
      acc_to_a_slice<T>(ds_frag, dp, kk);
      mma_slice<T, kDTiles, true>(dq, ds_frag, k_tile, kPitch, kk);
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // (no key blocks: the Q/dO copies must still land before the block exits)
  // dq is contiguous (B, Hq, Lq, D)
  store_acc_rows<T>(static_cast<T*>(a.dq) + row_base * f.head_dim, dq, m0 + warp * 16, f.len_q, D, f.scale);
}

// dK, dV for kMmaRows keys of one (batch, kv head): grid (ceil(Lk / kMmaRows), B * Hkv pairs:
// seq_grid). The warp's 16 keys are the rows of every product: per query block (of each query head
// sharing the kv head)
//   S^T = K Q^T, dP^T = V dO^T; P^T = exp(s - lse) (lse per column), dS^T = P^T (dP^T Z - delta);
//   dV += (P^T Z) dO, dK += dS^T Q (the two results as A fragments).
template <typename T, int kD, bool kAlibi>
__global__ void __launch_bounds__(kMmaThreads, 1) attention_bwd_dkdv_mma_kernel(const AttentionBwdArgs a) {
  const AttentionFwdArgs& f = a.fwd;
  constexpr int kBM = kMmaDkdvBlockM, kPitch = kMmaPitch<kD>;
  constexpr int kMTiles = kBM / 8, kMSlices = kBM / 16, kDTiles = kD / 8;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* k_tile = reinterpret_cast<T*>(smem_raw);  // [kMmaRows][kPitch]
  T* v_tile = k_tile + kMmaRows * kPitch;       // [kMmaRows][kPitch]
  T* q_tiles = v_tile + kMmaRows * kPitch;      // [2][kBM][kPitch]
  T* do_tiles = q_tiles + 2 * kBM * kPitch;     // [2][kBM][kPitch]
  float* lse_rows = reinterpret_cast<float*>(do_tiles + 2 * kBM * kPitch);  // [2][kBM]
  float* delta_rows = lse_rows + 2 * kBM;                                   // [2][kBM]

  const int64_t bhkv = grid_pair(), b = bhkv / f.heads_kv, hkv = bhkv % f.heads_kv;
  if (bhkv >= f.batch * f.heads_kv) return;  // a spare block of the grid's last z slice
  const int64_t group = f.heads_q / f.heads_kv;
  const int64_t n0 = int64_t(blockIdx.x) * kMmaRows;
  const int warp = threadIdx.x >> 5;
  const int D = static_cast<int>(f.head_dim), Dv = static_cast<int>(f.head_dim_v);
  const int rows_k = static_cast<int>(imin(kMmaRows, f.len_k - n0));

  const T* k = static_cast<const T*>(f.k) + b * f.k_stride[0] + hkv * f.k_stride[1] + n0 * f.k_stride[2];
  const T* v = static_cast<const T*>(f.v) + b * f.v_stride[0] + hkv * f.v_stride[1] + n0 * f.v_stride[2];
  mma_load_tile<T, kMmaRows, kD>(k_tile, k, f.k_stride[2], f.k_stride[3], rows_k, D,
                                 cp_async_ok(k, f.k_stride[2], f.k_stride[3], D));
  mma_load_tile<T, kMmaRows, kD>(v_tile, v, f.v_stride[2], f.v_stride[3], rows_k, Dv,
                                 cp_async_ok(v, f.v_stride[2], f.v_stride[3], Dv));
  cp_async_commit();

  // The query blocks (of kBM) holding the queries that see some key of the block, in each head.
  const Range queries = block_aligned(band_queries(f, n0, n0 + rows_k), kBM);
  const int64_t m_start = queries.begin;
  const int64_t per_head = (queries.end - m_start + kBM - 1) / kBM;
  const int steps = static_cast<int>(group * per_head);
  auto step_head = [&](int step) { return hkv * group + step / per_head; };
  auto step_m0 = [&](int step) { return m_start + (step % per_head) * kBM; };
  auto load_q = [&](int step) {
    const int64_t h = step_head(step), m0 = step_m0(step);
    const int rows_q = static_cast<int>(imin(kBM, f.len_q - m0));
    const int stage = step & 1;
    const T* q = static_cast<const T*>(f.q) + b * f.q_stride[0] + h * f.q_stride[1] + m0 * f.q_stride[2];
    const T* dout =
        static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1] + m0 * a.dout_stride[2];
    mma_load_tile<T, kBM, kD>(q_tiles + stage * kBM * kPitch, q, f.q_stride[2], f.q_stride[3], rows_q, D,
                              cp_async_ok(q, f.q_stride[2], f.q_stride[3], D));
    mma_load_tile<T, kBM, kD>(do_tiles + stage * kBM * kPitch, dout, a.dout_stride[2], a.dout_stride[3], rows_q, Dv,
                              cp_async_ok(dout, a.dout_stride[2], a.dout_stride[3], Dv));
    const int64_t row0 = (b * f.heads_q + h) * f.len_q + m0;
    for (int r = threadIdx.x; r < kBM; r += kMmaThreads) {
      lse_rows[stage * kBM + r] = r < rows_q ? f.lse[row0 + r] : INFINITY;  // rows past Lq: P = 0
      delta_rows[stage * kBM + r] = r < rows_q ? a.delta[row0 + r] : 0.0f;
    }
    cp_async_commit();
  };
  if (steps > 0) load_q(0);

  float dk[kDTiles][4], dv[kDTiles][4];
  zero_acc(dk);
  zero_acc(dv);
  const T* k_warp = k_tile + warp * 16 * kPitch;
  const T* v_warp = v_tile + warp * 16 * kPitch;
  const int64_t keys_j[2] = {n0 + warp * 16 + acc_row(0), n0 + warp * 16 + acc_row(2)};

  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) {
      load_q(step + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int stage = step & 1;
    const T* q_tile = q_tiles + stage * kBM * kPitch;
    const T* do_tile = do_tiles + stage * kBM * kPitch;
    const int64_t h = step_head(step), m0 = step_m0(step);
    const int64_t row_base = (b * f.heads_q + h) * f.len_q;
    const Alibi alibi(f, b, h);  // the step's query head: its slope

    float st[kMTiles][4], dpt[kMTiles][4];  // S^T and dP^T: rows = the warp's keys, columns = queries
    two_products<T, kD>(st, k_warp, q_tile, dpt, v_warp, do_tile);
    const bool plain = block_unmasked(f, m0, kBM, n0, kMmaRows);
#pragma unroll
    for (int j = 0; j < kMTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = acc_col(j, e);
        const int64_t i = m0 + col, jj = keys_j[e >> 1];
        float logit = st[j][e] * f.scale;
        const float dcap = cap_logit(f, logit);  // t recomputed from the raw S^T: 1 - t^2 (before the bias)
        // P as the forward's; the distance per element (a per-row base, as in the other kernels, made the
        // ALiBi instantiation at D = 128 spill on sm_90)
        logit = alibi.add<kAlibi>(logit, alibi.dist(i, jj));
        const float sc = plain ? logit : mask_logit<T>(f, logit, b, h, i, jj);
        const float p = sc == -INFINITY ? 0.0f : exp_<T>(sc - lse_rows[stage * kBM + col]);
        const float z =
            f.dropout.enabled ? dropout_factor(f.dropout, dropout_row_key(f.dropout, row_base + i), jj) : 1.0f;
        dpt[j][e] = p * (dpt[j][e] * z - delta_rows[stage * kBM + col]) * dcap;  // dS^T through the cap
        st[j][e] = p * z;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kMSlices; ++kk) {
      uint32_t frag[4];
      acc_to_a_slice<T>(frag, st, kk);
      mma_slice<T, kDTiles, true>(dv, frag, do_tile, kPitch, kk);
      acc_to_a_slice<T>(frag, dpt, kk);
      mma_slice<T, kDTiles, true>(dk, frag, q_tile, kPitch, kk);
    }
    __syncthreads();
  }
  cp_async_wait<0>();  // (no query block: the K/V copies must still land before the block exits)
  // dk, dv are contiguous (B, Hkv, Lk, .)
  const int64_t first = (b * f.heads_kv + hkv) * f.len_k;
  store_acc_rows<T>(static_cast<T*>(a.dk) + first * f.head_dim, dk, n0 + warp * 16, f.len_k, D, f.scale);
  store_acc_rows<T>(static_cast<T*>(a.dv) + first * f.head_dim_v, dv, n0 + warp * 16, f.len_k, Dv, 1.0f);
}

// The instantiation of a register-resident kernel for a launch: ALiBi is their template flag kAlibi,
// picked here once from alibi_slopes, so that the instantiation without it compiles to the kernel as it
// was before ALiBi (a runtime branch between the two elementwise steps cost every call registers).
// Used by the launchers below and by tests/cuda_emu.
template <typename T, int kD> auto fwd_mma_kernel_for(const AttentionFwdArgs& a) {
  return a.alibi_slopes != nullptr ? attention_fwd_mma_kernel<T, kD, true> : attention_fwd_mma_kernel<T, kD, false>;
}
template <typename T, int kD> auto bwd_dq_mma_kernel_for(const AttentionBwdArgs& a) {
  return a.fwd.alibi_slopes != nullptr ? attention_bwd_dq_mma_kernel<T, kD, true>
                                       : attention_bwd_dq_mma_kernel<T, kD, false>;
}
template <typename T, int kD> auto bwd_dkdv_mma_kernel_for(const AttentionBwdArgs& a) {
  return a.fwd.alibi_slopes != nullptr ? attention_bwd_dkdv_mma_kernel<T, kD, true>
                                       : attention_bwd_dkdv_mma_kernel<T, kD, false>;
}

// ---- backward ----------------------------------------------------------------------------------------
// delta[row] = sum_c dout[row, c] * out[row, c] - dlse[row], one warp per (b, h, i) row. dlse, the
// returned lse's gradient, enters only here: d lse_i / d s_ij = P_ij folds into dS = P (dP - delta).
template <typename T>
__global__ void __launch_bounds__(kThreads) attention_bwd_delta_kernel(const AttentionBwdArgs a) {
  const AttentionFwdArgs& f = a.fwd;
  const int64_t rows = f.batch * f.heads_q * f.len_q;
  const int64_t row = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= rows) return;
  const int64_t i = row % f.len_q, bh = row / f.len_q, h = bh % f.heads_q, b = bh / f.heads_q;
  const T* dout = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1] + i * a.dout_stride[2];
  const T* out = static_cast<const T*>(f.out) + b * f.out_stride[0] + h * f.out_stride[1] + i * f.out_stride[2];
  float acc = 0.0f;
  for (int64_t c = threadIdx.x & 31; c < f.head_dim_v; c += 32) {
    acc += to_float<T>(dout[c * a.dout_stride[3]]) * to_float<T>(out[c * f.out_stride[3]]);
  }
  acc = warp_sum(acc);
  if ((threadIdx.x & 31) == 0) a.delta[row] = a.dlse != nullptr ? acc - a.dlse[row] : acc;
}

// The shared middle of both backward kernels, for one (query block, key block) pair whose q, dout,
// k, v tiles and row_lse/row_delta are loaded: S = Q K^T, dP = dO V^T, then
//   P = exp(s - lse) (0 where masked), p tile = P Z, ds tile = P (dP Z - delta),
// and dS into dmask when requested. Ends with a barrier.
// The dK/dV kernel wants the P Z tile; the dQ kernel writes dmask (each element has one writer).
template <typename T, bool kDkDv>
__device__ __forceinline__ void bwd_scores(const AttentionBwdArgs& a, BwdSmem<T>& sm, const Dims& d, int64_t b,
                                           int64_t h, int64_t m0, int64_t n0) {
  const AttentionFwdArgs& f = a.fwd;
  block_gemm<T, true, false>(sm.s, sm.lds, sm.q, sm.ldq, sm.k, sm.ldq, d.bm, d.bn, d.dp, false);
  block_gemm<T, true, false>(sm.dp, sm.lds, sm.dout, sm.ldv, sm.v, sm.ldv, d.bm, d.bn, d.dvp, false);
  __syncthreads();
  const int64_t row_base = (b * f.heads_q + h) * f.len_q;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const Alibi alibi(f, b, h);  // once per block pair (the dK/dV kernel's head changes between calls)
  with_alibi(alibi, [&](auto flag) {
    constexpr bool kAlibi = decltype(flag)::value;
    for (int r = warp; r < d.bm; r += kWarps) {  // one warp per row: one row key per warp
      const int64_t i = m0 + r;
      const uint32_t key = f.dropout.enabled ? dropout_row_key(f.dropout, row_base + i) : 0u;
      const float lse = sm.row_lse[r], delta = sm.row_delta[r];
      const float d0 = kAlibi ? alibi.dist(i, n0) : 0.0f;  // the ALiBi distance at column 0
      for (int c = lane; c < d.bn; c += 32) {
        const int64_t j = n0 + c;
        float logit = sm.s[r * sm.lds + c] * f.scale;
        const float dcap = cap_logit(f, logit);  // t recomputed from the raw S: 1 - t^2 (before the bias)
        logit = alibi.add<kAlibi>(logit, d0 + static_cast<float>(c));  // P as the forward's (its lse has it)
        const float s = mask_logit<T>(f, logit, b, h, i, j);
        const float p = s == -INFINITY ? 0.0f : exp_<T>(s - lse);  // lse = +inf on dead rows gives 0
        const float z = f.dropout.enabled ? dropout_factor(f.dropout, key, j) : 1.0f;
        const float ds = p * (sm.dp[r * sm.lds + c] * z - delta);
        if (kDkDv) sm.p[r * sm.ldp + c] = from_float<T>(p * z);
        sm.ds[r * sm.ldp + c] = from_float<T>(ds * dcap);  // towards dq and dk: through the cap
        if (!kDkDv && a.dmask != nullptr && i < f.len_q && j < f.len_k) {
          static_cast<T*>(a.dmask)[(row_base + i) * f.len_k + j] = from_float<T>(ds);
        }
      }
    }
  });
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void load_query_side(const AttentionBwdArgs& a, BwdSmem<T>& sm, const Dims& d, int64_t b,
                                                int64_t h, int64_t m0) {
  const AttentionFwdArgs& f = a.fwd;
  const int rows_q = static_cast<int>(imin(d.bm, f.len_q - m0));
  const T* q = static_cast<const T*>(f.q) + b * f.q_stride[0] + h * f.q_stride[1] + m0 * f.q_stride[2];
  const T* dout = static_cast<const T*>(a.dout) + b * a.dout_stride[0] + h * a.dout_stride[1] + m0 * a.dout_stride[2];
  load_tile<T>(sm.q, sm.ldq, q, f.q_stride[2], f.q_stride[3], d.bm, rows_q, d.dp, static_cast<int>(f.head_dim));
  load_tile<T>(sm.dout, sm.ldv, dout, a.dout_stride[2], a.dout_stride[3], d.bm, rows_q, d.dvp,
               static_cast<int>(f.head_dim_v));
  const int64_t row_base = (b * f.heads_q + h) * f.len_q + m0;
  for (int r = threadIdx.x; r < d.bm; r += kThreads) {
    sm.row_lse[r] = r < rows_q ? f.lse[row_base + r] : INFINITY;  // rows past Lq: P = 0
    sm.row_delta[r] = r < rows_q ? a.delta[row_base + r] : 0.0f;
  }
}

template <typename T>
__device__ __forceinline__ void load_key_side(const AttentionBwdArgs& a, BwdSmem<T>& sm, const Dims& d, int64_t b,
                                              int64_t hkv, int64_t n0) {
  const AttentionFwdArgs& f = a.fwd;
  const int rows_k = static_cast<int>(imin(d.bn, f.len_k - n0));
  const T* k = static_cast<const T*>(f.k) + b * f.k_stride[0] + hkv * f.k_stride[1] + n0 * f.k_stride[2];
  const T* v = static_cast<const T*>(f.v) + b * f.v_stride[0] + hkv * f.v_stride[1] + n0 * f.v_stride[2];
  load_tile<T>(sm.k, sm.ldq, k, f.k_stride[2], f.k_stride[3], d.bn, rows_k, d.dp, static_cast<int>(f.head_dim));
  load_tile<T>(sm.v, sm.ldv, v, f.v_stride[2], f.v_stride[3], d.bn, rows_k, d.dvp, static_cast<int>(f.head_dim_v));
}

// Stores rows [0, rows) x cols [0, cols) of a float accumulator, times `mul`, to a contiguous T
// matrix with `cols` columns.
template <typename T>
__device__ __forceinline__ void store_acc(T* dst, const float* acc, int ld, int rows, int cols, float mul) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, c = idx - r * cols;
    dst[int64_t(r) * cols + c] = from_float<T>(acc[r * ld + c] * mul);
  }
}

// dK, dV for one key block of one (batch, kv head): grid (ceil(Lk / BN), B * Hkv pairs: seq_grid).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dkdv_kernel(const AttentionBwdArgs a, const Dims d) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const AttentionFwdArgs& f = a.fwd;
  BwdSmem<T> sm;
  sm.carve(smem_raw, d, true);
  const int64_t bhkv = grid_pair(), b = bhkv / f.heads_kv, hkv = bhkv % f.heads_kv;
  if (bhkv >= f.batch * f.heads_kv) return;  // a spare block of the grid's last z slice
  const int64_t group = f.heads_q / f.heads_kv;
  const int64_t n0 = int64_t(blockIdx.x) * d.bn;
  load_key_side<T>(a, sm, d, b, hkv, n0);
  fill(sm.acc_a, d.bn * sm.lda_, 0.0f);
  fill(sm.acc_b, d.bn * sm.ldb_, 0.0f);
  // The query blocks holding the queries that see some key of the block.
  const Range queries = block_aligned(band_queries(f, n0, imin(f.len_k, n0 + d.bn)), d.bm);
  for (int64_t h = hkv * group; h < (hkv + 1) * group; ++h) {
    for (int64_t m0 = queries.begin; m0 < queries.end; m0 += d.bm) {
      __syncthreads();  // the previous step is done with the q, dout, p and ds tiles
      load_query_side<T>(a, sm, d, b, h, m0);
      __syncthreads();
      bwd_scores<T, true>(a, sm, d, b, h, m0, n0);
      // dV += (P Z)^T dO, dK += dS^T Q   (the accumulators are [BN] rows: A is stored transposed)
      block_gemm<T, false, true>(sm.acc_b, sm.ldb_, sm.p, sm.ldp, sm.dout, sm.ldv, d.bn, d.dvp, d.bm, true);
      block_gemm<T, false, true>(sm.acc_a, sm.lda_, sm.ds, sm.ldp, sm.q, sm.ldq, d.bn, d.dp, d.bm, true);
    }
  }
  __syncthreads();
  const int rows_k = static_cast<int>(imin(d.bn, f.len_k - n0));
  const int64_t first = (b * f.heads_kv + hkv) * f.len_k + n0;  // dk, dv are contiguous (B, Hkv, Lk, .)
  store_acc<T>(static_cast<T*>(a.dk) + first * f.head_dim, sm.acc_a, sm.lda_, rows_k,
               static_cast<int>(f.head_dim), f.scale);
  store_acc<T>(static_cast<T*>(a.dv) + first * f.head_dim_v, sm.acc_b, sm.ldb_, rows_k,
               static_cast<int>(f.head_dim_v), 1.0f);
}

// dQ (and dmask) for one query block of one (batch, head): grid (ceil(Lq / BM), B * Hq pairs: seq_grid).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) attention_bwd_dq_kernel(const AttentionBwdArgs a, const Dims d) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const AttentionFwdArgs& f = a.fwd;
  BwdSmem<T> sm;
  sm.carve(smem_raw, d, false);
  const int64_t bh = grid_pair(), b = bh / f.heads_q, h = bh % f.heads_q;
  if (bh >= f.batch * f.heads_q) return;  // a spare block of the grid's last z slice
  const int64_t hkv = h / (f.heads_q / f.heads_kv);
  const int64_t m0 = int64_t(blockIdx.x) * d.bm;
  load_query_side<T>(a, sm, d, b, h, m0);
  fill(sm.acc_a, d.bm * sm.lda_, 0.0f);
  const Range keys = block_aligned(band_keys(f, m0, imin(f.len_q, m0 + d.bm)), d.bn);
  for (int64_t n0 = keys.begin; n0 < keys.end; n0 += d.bn) {
    __syncthreads();  // the previous step is done with the k, v and ds tiles
    load_key_side<T>(a, sm, d, b, hkv, n0);
    __syncthreads();
    bwd_scores<T, false>(a, sm, d, b, h, m0, n0);
    block_gemm<T, true, true>(sm.acc_a, sm.lda_, sm.ds, sm.ldp, sm.k, sm.ldq, d.bm, d.dp, d.bn, true);  // dQ += dS K
  }
  __syncthreads();
  const int rows_q = static_cast<int>(imin(d.bm, f.len_q - m0));
  const int64_t first = (b * f.heads_q + h) * f.len_q + m0;  // dq is contiguous (B, Hq, Lq, D)
  store_acc<T>(static_cast<T*>(a.dq) + first * f.head_dim, sm.acc_a, sm.lda_, rows_q, static_cast<int>(f.head_dim),
               f.scale);
}

// ---- tile plans ---------------------------------------------------------------------------------------
// The shared-memory kernels' tiles on a device that gives a block at most `limit` bytes of (opt-in)
// shared memory: the largest of kBlockChoices whose buffers fit. fused_attn/backends/cuda.py mirrors
// these plans (_attention_shared_memory) to decline up front the calls a device cannot take, and
// tests/test_cuda_emulated.py checks that the two agree: change them together.

// The largest tile choice for which bytes_for(dims) <= limit (*bytes: that size); 0 bytes when none.
template <typename Plan>
Dims pick_dims(int64_t head_dim, int64_t head_dim_v, size_t limit, Plan&& bytes_for, size_t* bytes) {
  Dims d{};
  d.dp = static_cast<int>(round_up(head_dim, 16));
  d.dvp = static_cast<int>(round_up(head_dim_v, 16));
  for (const Blocks& choice : kBlockChoices) {
    d.bm = choice.m;
    d.bn = choice.n;
    *bytes = bytes_for(d);
    if (*bytes <= limit) return d;
  }
  *bytes = 0;
  return d;
}

template <typename T>
Dims fwd_plan(int64_t head_dim, int64_t head_dim_v, size_t limit, size_t* bytes) {
  return pick_dims(head_dim, head_dim_v, limit, [](const Dims& dd) { FwdSmem<T> s; return s.carve(nullptr, dd); },
                   bytes);
}

// One tile choice for both backward kernels, which must fit both: the dK/dV kernel keeps two
// accumulators of BN rows, the dQ kernel one of BM rows (more, for BM > BN and Dv < D).
// *smem_kv = *smem_q = 0 when no choice fits.
template <typename T>
Dims bwd_plan(int64_t head_dim, int64_t head_dim_v, size_t limit, size_t* smem_kv, size_t* smem_q) {
  size_t both = 0;
  const Dims d = pick_dims(head_dim, head_dim_v, limit, [](const Dims& dd) {
    BwdSmem<T> s;
    const size_t kv = s.carve(nullptr, dd, true), q = s.carve(nullptr, dd, false);
    return kv > q ? kv : q;
  }, &both);
  *smem_kv = *smem_q = 0;
  if (both != 0) {
    BwdSmem<T> s;
    *smem_kv = s.carve(nullptr, d, true);
    *smem_q = s.carve(nullptr, d, false);
  }
  return d;
}

// ---- host side ------------------------------------------------------------------------------------------
// (Compiled under the CPU emulation too: tests/cuda_emu runs these launchers, their grids and their
// shared-memory opt-ins against an emulated device; `launch` runs the kernels there.)
const char* check_sizes(const AttentionFwdArgs& a) {
  if (a.batch < 0 || a.heads_q < 0 || a.heads_kv <= 0 || a.len_q < 0 || a.len_k < 0 || a.head_dim < 0 ||
      a.head_dim_v < 0)
    return "attention: negative size or zero kv heads";
  if (a.heads_q % a.heads_kv != 0) return "attention: heads_q must be a multiple of heads_kv";
  if (a.head_dim > kMaxHeadDim || a.head_dim_v > kMaxHeadDim)
    return "attention: the cuda backend supports head dims up to 256";
  if (a.batch * a.heads_q > 0x7fffffffLL) return "attention: batch * heads too large for the grid";
  return nullptr;
}

// The grid of a kernel over `len` rows (`what`: len_q or len_k) in blocks of `rows`, for `pairs`
// (batch, head) pairs (both counts > 0): (ceil(len / rows), y, z) with y * z >= pairs (grid_pair), or
// why the device's grid cannot hold it.
const char* seq_grid(const char* what, int64_t len, int64_t rows, int64_t pairs, dim3* grid) {
  const GridLimits lim = grid_limits();
  const int64_t blocks = ceil_div(len, rows);
  if (blocks > lim.x)
    return format_message("attention: %s = %lld needs %lld blocks of %lld rows, more than the %lld the grid takes", what,
                          static_cast<long long>(len), static_cast<long long>(blocks), static_cast<long long>(rows),
                          static_cast<long long>(lim.x));
  const int64_t z = ceil_div(pairs, lim.y);
  if (z > lim.z)
    return format_message("attention: batch * heads = %lld is more than the grid's %lld x %lld blocks",
                          static_cast<long long>(pairs), static_cast<long long>(lim.y), static_cast<long long>(lim.z));
  *grid = dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(ceil_div(pairs, z)), static_cast<unsigned>(z));
  return nullptr;
}

// The register-resident forward for kD; *taken false (nothing launched) when its shared memory does
// not fit this device (kD = 256 needs the most, 101,376 bytes for 16-bit inputs: exactly the 99 KB
// that sm_86/sm_89 give a block at most (opt-in), so it fits there and on every sm_80+ device).
template <typename T, int kD>
const char* attention_fwd_mma_launch(const AttentionFwdArgs& a, cudaStream_t stream, bool* taken) {
  constexpr size_t smem = mma_fwd_smem_bytes<T, kD>();
  *taken = smem <= static_cast<size_t>(max_shared_memory_per_block());
  if (!*taken) return nullptr;
  dim3 grid;
  if (const char* err = seq_grid("len_q", a.len_q, kMmaRows, a.batch * a.heads_q, &grid)) return err;
  return launch(fwd_mma_kernel_for<T, kD>(a), grid, kMmaThreads, smem, stream, a);
}

// 16-bit inputs on sm_80+: the register-resident kernel for the smallest compiled head dim that
// holds both head dims. *taken false when it does not apply (then the shared-memory kernel runs).
template <typename T>
const char* attention_fwd_mma(const AttentionFwdArgs& a, cudaStream_t stream, bool* taken) {
  *taken = false;
  if (kIsFloat<T> || compute_capability_major() < 8) return nullptr;
  const int64_t dim = a.head_dim > a.head_dim_v ? a.head_dim : a.head_dim_v;
  if (dim <= 32) return attention_fwd_mma_launch<T, 32>(a, stream, taken);
  if (dim <= 64) return attention_fwd_mma_launch<T, 64>(a, stream, taken);
  if (dim <= 96) return attention_fwd_mma_launch<T, 96>(a, stream, taken);
  if (dim <= 128) return attention_fwd_mma_launch<T, 128>(a, stream, taken);
  return attention_fwd_mma_launch<T, 256>(a, stream, taken);
}

template <typename T>
const char* attention_fwd_typed(const AttentionFwdArgs& a, cudaStream_t stream) {
  if constexpr (!kIsFloat<T>) {
    bool taken = false;
    const char* err = attention_fwd_mma<T>(a, stream, &taken);
    if (taken || err != nullptr) return err;
  }
  size_t smem = 0;
  const Dims d = fwd_plan<T>(a.head_dim, a.head_dim_v, static_cast<size_t>(max_shared_memory_per_block()), &smem);
  if (smem == 0) return "attention: head dims too large for this device's shared memory";
  dim3 grid;
  if (const char* err = seq_grid("len_q", a.len_q, d.bm, a.batch * a.heads_q, &grid)) return err;
  return launch(attention_fwd_kernel<T>, grid, kThreads, smem, stream, a, d);
}

// The dK/dV kernel then the dQ kernel over `rows_k` / `rows_q` rows a block: both grids are built
// before either launches, so a call the grid cannot hold launches nothing. No dK/dV launch without
// keys or kv heads (the binding zeroes dk and dv).
template <typename KernelKv, typename KernelQ, typename... Args>
const char* launch_bwd_pair(const AttentionFwdArgs& f, KernelKv kernel_kv, KernelQ kernel_q, int threads,
                            int64_t rows_k, int64_t rows_q, size_t smem_kv, size_t smem_q, cudaStream_t stream,
                            const Args&... args) {
  const bool keys = f.len_k > 0 && f.batch * f.heads_kv > 0;
  dim3 grid_kv, grid_q;
  if (keys) {
    if (const char* err = seq_grid("len_k", f.len_k, rows_k, f.batch * f.heads_kv, &grid_kv)) return err;
  }
  if (const char* err = seq_grid("len_q", f.len_q, rows_q, f.batch * f.heads_q, &grid_q)) return err;
  if (keys) {
    if (const char* err = launch(kernel_kv, grid_kv, threads, smem_kv, stream, args...)) return err;
  }
  return launch(kernel_q, grid_q, threads, smem_q, stream, args...);
}

// The register-resident dK/dV and dQ kernels for kD (after the delta kernel); *taken false (nothing
// launched) when their shared memory does not fit this device.
template <typename T, int kD>
const char* attention_bwd_mma_launch(const AttentionBwdArgs& a, cudaStream_t stream, bool* taken) {
  constexpr size_t smem_dq = mma_dq_smem_bytes<T, kD>(), smem_kv = mma_dkdv_smem_bytes<T, kD>();
  const size_t limit = static_cast<size_t>(max_shared_memory_per_block());
  *taken = smem_dq <= limit && smem_kv <= limit;
  if (!*taken) return nullptr;
  return launch_bwd_pair(a.fwd, bwd_dkdv_mma_kernel_for<T, kD>(a), bwd_dq_mma_kernel_for<T, kD>(a), kMmaThreads,
                         kMmaRows, kMmaRows, smem_kv, smem_dq, stream, a);
}

// 16-bit inputs on sm_80+ with head dims up to kMmaBwdMaxHeadDim: the register-resident backward.
// *taken false when it does not apply (then the shared-memory kernels run).
template <typename T>
const char* attention_bwd_mma(const AttentionBwdArgs& a, cudaStream_t stream, bool* taken) {
  *taken = false;
  const AttentionFwdArgs& f = a.fwd;
  const int64_t dim = f.head_dim > f.head_dim_v ? f.head_dim : f.head_dim_v;
  if (kIsFloat<T> || dim > kMmaBwdMaxHeadDim || compute_capability_major() < 8) return nullptr;
  if (dim <= 32) return attention_bwd_mma_launch<T, 32>(a, stream, taken);
  if (dim <= 64) return attention_bwd_mma_launch<T, 64>(a, stream, taken);
  if (dim <= 96) return attention_bwd_mma_launch<T, 96>(a, stream, taken);
  return attention_bwd_mma_launch<T, 128>(a, stream, taken);
}

template <typename T>
const char* attention_bwd_typed(const AttentionBwdArgs& a, cudaStream_t stream) {
  const AttentionFwdArgs& f = a.fwd;
  // The delta kernel: a warp per row of all B * Hq * Lq, along the grid's x (beyond its 2^31 - 1 blocks
  // of kWarps rows, 1.7e10 rows: their lse and delta alone would take 137 GB).
  const int64_t rows = f.batch * f.heads_q * f.len_q, delta_blocks = ceil_div(rows, kWarps);
  const int64_t max_x = grid_limits().x;
  if (delta_blocks > max_x)
    return format_message("attention: batch * heads * len_q = %lld rows need %lld blocks of %d, more than the %lld the "
                          "grid takes", static_cast<long long>(rows), static_cast<long long>(delta_blocks), kWarps,
                          static_cast<long long>(max_x));
  if (const char* err = launch(attention_bwd_delta_kernel<T>, dim3(static_cast<unsigned>(delta_blocks)), kThreads, 0,
                               stream, a))
    return err;
  if constexpr (!kIsFloat<T>) {
    bool taken = false;
    const char* err = attention_bwd_mma<T>(a, stream, &taken);
    if (taken || err != nullptr) return err;
  }

  size_t smem_kv = 0, smem_q = 0;
  const Dims d = bwd_plan<T>(f.head_dim, f.head_dim_v, static_cast<size_t>(max_shared_memory_per_block()), &smem_kv,
                             &smem_q);
  if (smem_kv == 0) return "attention: head dims too large for this device's shared memory";
  return launch_bwd_pair(f, attention_bwd_dkdv_kernel<T>, attention_bwd_dq_kernel<T>, kThreads, d.bn, d.bm, smem_kv,
                         smem_q, stream, a, d);
}

}  // namespace

const char* attention_fwd(const AttentionFwdArgs& args, cudaStream_t stream) {
  if (const char* err = check_sizes(args)) return err;
  if (args.batch * args.heads_q == 0 || args.len_q == 0) return nullptr;  // nothing to write
  return dispatch_dtype(args.dtype, [&](auto zero) {
    using T = decltype(zero);
    return attention_fwd_typed<T>(args, stream);
  });
}

const char* attention_bwd(const AttentionBwdArgs& args, cudaStream_t stream) {
  if (const char* err = check_sizes(args.fwd)) return err;
  // Empty q side: dq is empty and dk/dv are zeros (the binding allocates them zeroed).
  if (args.fwd.batch * args.fwd.heads_q == 0 || args.fwd.len_q == 0) return nullptr;
  return dispatch_dtype(args.fwd.dtype, [&](auto zero) {
    using T = decltype(zero);
    return attention_bwd_typed<T>(args, stream);
  });
}

}  // namespace fused_attn_cuda
