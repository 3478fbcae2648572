// CPU kernels of fused_attn_C::attention_fwd / attention_bwd and of their packed variable-length
// forms attention_varlen_fwd / _bwd (schemas in csrc/ops.cpp, contract in
// fused_attn/backends/base.py). The kernels below take a list of parts, each an attention problem
// with its own shapes, band, operands and output pointers: a dense call is one part of B batch
// rows, a varlen call one part per sequence (the varlen section at the end), and the units of
// every part share one at::parallel_for.
//
// Forward: tiled online-softmax attention (FlashAttention-2's loop). Work is split into units of
// (batch, query head, block of BLOCK_M queries), spread over threads with at::parallel_for. A unit
// walks the keys in blocks of BLOCK_N: S = scale * Q K^T, mask, running row max m and sum
// l, P = exp(S - m), O = O * exp(m_old - m_new) + P V. At the end out = O / l and
// lse = m + log l. Only BLOCK_M x BLOCK_N scores exist at any time; no Lq x Lk buffer.
//
// Backward recomputes P = exp(S - lse) tile by tile and, with D = rowsum(dO * O):
//   dV += P_drop^T dO,  dP = dO V^T (dropped like P),  dS = P * (dP - D),
//   dK += scale * dS^T Q,  dQ += scale * dS K,  dmask = dS (the additive mask's gradient).
// Two race-free schedules, chosen by how much parallelism the heads give:
//  - per kv head: a unit owns (batch, kv head), loops over its query heads, query blocks and key
//    blocks, doing all five products per tile once (dK/dV/dQ rows it writes belong to it alone);
//  - two passes, for few heads: pass 1 parallel over (batch, kv head, key block) accumulates
//    dK/dV, pass 2 parallel over (batch, query head, query block) accumulates dQ (two extra
//    products per tile, but every thread busy even at batch = heads = 1).
//
// All arithmetic is in float32 for float16/bfloat16/float32 inputs and in float64 for float64.
// Half-precision q/k/v are converted to float32 once (O(L * D), not O(L^2)) so that every product
// runs in float32, the fastest path on CPUs without native bf16 dot products.
//
// The tile products: in float32 on CPUs with AVX2 + FMA, register-blocked kernels
// (attention_tile_gemm.h) over operands laid out as 16-wide panels (once per call, or per kv
// head by the unit that owns it in the backward's per-head schedule), which skip the
// blocks the visibility band makes dead; otherwise (float64, other CPUs, FUSED_ATTN_CPU_GEMM=blas or
// aten) BLAS calls on the tiles. Both paths share everything else below.
// bfloat16 inputs on CPUs with AVX512-BF16: the forward's two products and the backward's five
// instead run as bf16 dot products (vdpbf16ps, attention_bf16_dot.h) on bf16 pair layouts of q,
// k, v (and dO), with P rounded to bf16 for P V and P_drop^T dO, dS for dS^T Q and dS K (forward
// ~1.5-2x the float32 panels here, backward ~1.4-1.6x); FUSED_ATTN_CPU_BF16_DOT=auto|on|off
// (below). The softmax, masks, band, dropout, delta, cap, ALiBi, lse, dmask, the output and the
// gradient accumulators stay the float32 code (the scores are exact bf16 products summed in
// float32 in both passes: the backward's recomputed P matches the forward's lse).
//
// The visibility band (csrc/ops.cpp): query i sees key j iff i + lo <= j <= i + hi (and the
// attn_mask), lo and hi clamped to [-Lq, Lk] on entry (Problem::set_band). No band is (-Lq, Lk),
// top-left causal (-Lq, 0), a sliding window (d - left, d + right) with the diagonal d = 0
// (top-left) or Lk - Lq (bottom-right). Work outside the band is skipped at three levels:
//  - blocks: a query block [m0, m1) sees keys [max(0, m0 + lo), min(Lk, m1 - 1 + hi + 1)) (the
//    forward and the dQ pass walk only those key blocks); a key block [n0, n1) is seen by
//    queries [max(0, n0 - hi), min(Lq, n1 - lo)) (the dK/dV pass walks only those);
//  - tiles: a tile is fully visible iff n0 >= m1 - 1 + lo and n1 - 1 <= m0 + hi; only tiles that
//    straddle an edge get the per-element treatment below (and the register-blocked products
//    prune their register blocks, attention_tile_gemm.h: Band);
//  - rows: row i of a tile from key n0 sees the columns [i + lo - n0, i + hi + 1 - n0) (clamped
//    to the tile): the mask, max, exp and dropout run on those, the rest of the row is zero.
// A row that sees no key (lo > hi, or a band outside [0, Lk) for that row) is an empty row: zero
// output, lse = +inf, zero gradients, as rows the attn_mask empties.
//
// Logit soft-capping (softcap > 0, csrc/ops.cpp): the row loops replace a row's visible scaled
// scores s by softcap * tanh(s / softcap) before the mask (so the lse is of the capped logits);
// the backward keeps the tanh values t of its tile and, once dS (= dmask) is formed, multiplies
// it by 1 - t^2 before the dK and dQ products. softcap = 0 skips both (one test per row).
//
// ALiBi (alibi_slopes, csrc/ops.cpp): the logit of query i and key j gains -slope[b, h] *
// |j - i - shift| (shift = Lk - Lq for bottom-right alignment, else 0; the band carries the
// alignment of causal and windows, ALiBi needs it on its own), added right after the mask, so
// after the cap: the running max, the sum and the lse are those of the biased logits. The row
// loops add it on a row's visible columns (row_alibi, from the row's diagonal in the tile's column
// numbering: an integer distance per column, never an Lq x Lk tensor). The bias is a constant: the
// backward recomputes P = exp(S + mask + bias - lse) with it and nothing else changes (dS =
// P * (dP - D) is the gradient of the biased logit and of the mask alike; the cap's 1 - t^2 uses
// the tanh saved before the mask and the bias). No gradient for the slopes. Without slopes the
// rows skip it (one test per row).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/check.h"
#include "../common/dropout_hash.h"
#include "attention_bf16_dot.h"
#include "attention_rowops.h"
#include "attention_tile_gemm.h"
#include "scratch.h"

namespace fused_attn::cpu_attention {
namespace {

using at::Tensor;
namespace scratch = fused_attn::cpu::scratch;

// Tile sizes. Two ways to run the tile products (below): register-blocked AVX2 + FMA kernels on
// operands laid out as panels (attention_tile_gemm.h; float32 compute on CPUs with AVX2 and FMA),
// or BLAS calls (float64, other CPUs, or FUSED_ATTN_CPU_GEMM=blas).
//  - Register-blocked: 96 x 256 forward tiles (Q block, K and V panels, scores, accumulator:
//    ~270 KB at D = 64, in L2), banded or not (dead register blocks outside the band are
//    skipped inside a tile, so smaller banded tiles buy nothing); backward 64 x 128. Other
//    splits (48-192 x 128-512 forward, 64-192 x 64-256 backward) measured within the noise.
//  - BLAS, forward non-causal: a 256 x 512 score tile (512 KB in float32; with the O accumulator
//    and one K block it about fills a 1 MB L2), the split ATen's own CPU flash kernel uses: the
//    bigger products run nearer MKL's peak (measured here, one thread: 0.90-0.96x SDPA with
//    128 x 256 tiles, 0.97-1.03x with 256 x 512). Banded (causal, windows): 128 x 256, so that
//    fewer tiles straddle the diagonal (causal: 1.3x SDPA against 1.2x with the bigger tiles).
//    Backward keeps three 64 x 128 tiles (S/P, dP, dropped P).
// The FUSED_ATTN_CPU_{FWD,BWD}_{BM,BN} environment variables override them (for tuning on other
// CPUs; BN is rounded up to a multiple of 16). Read once, at the first call that needs them (not
// at load, where an error could not be raised), each a whole number in [1, 65536]; anything else
// is an error naming the variable (a value read as 1 would run, just many times slower).
int64_t env_block(const char* name) {  // 0: unset
  const long long n = check::env_whole_number(name, 1, 65536, "in [1, 65536] (a tile size)");
  return n < 0 ? 0 : n;
}
struct Blocks {
  int64_t m, n;
};
Blocks blocks(const char* env_m, const char* env_n, Blocks fallback) {
  const int64_t m = env_block(env_m), n = env_block(env_n);
  return {m ? m : fallback.m, n ? n : fallback.n};
}
// (function statics: a bad value raises at every call, as the initialiser never completes)
const Blocks& fwd_tile_blocks() {
  static const Blocks b = blocks("FUSED_ATTN_CPU_FWD_BM", "FUSED_ATTN_CPU_FWD_BN", {96, 256});
  return b;
}
const Blocks& bwd_tile_blocks() {
  static const Blocks b = blocks("FUSED_ATTN_CPU_BWD_BM", "FUSED_ATTN_CPU_BWD_BN", {64, 128});
  return b;
}
const Blocks& fwd_blas_blocks() {
  static const Blocks b = blocks("FUSED_ATTN_CPU_FWD_BM", "FUSED_ATTN_CPU_FWD_BN", {256, 512});
  return b;
}
const Blocks& fwd_blas_banded_blocks() {
  static const Blocks b = blocks("FUSED_ATTN_CPU_FWD_BM", "FUSED_ATTN_CPU_FWD_BN", {128, 256});
  return b;
}
const Blocks& bwd_blas_blocks() {
  static const Blocks b = blocks("FUSED_ATTN_CPU_BWD_BM", "FUSED_ATTN_CPU_BWD_BN", {64, 128});
  return b;
}

// ---- BLAS -------------------------------------------------------------------------------------
//
// The tile products go to the BLAS that torch links (MKL here) through its Fortran entry points
// sgemm_/dgemm_, which libtorch_cpu exports; ATen's own C++ wrapper (at::native::cpublas::gemm)
// is not exported to extensions. The symbols are weak: on a torch build without them (or with
// FUSED_ATTN_CPU_GEMM=aten, for comparison) the products go through at::addmm on tile views,
// which reaches the same BLAS with a few microseconds more overhead per call.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

// MKL's per-thread thread count: each tile product runs on the thread that calls it (the
// parallelism is ours, over tiles). Without this, a kernel that runs serially (a small problem,
// or one unit of work) would hand each small product to MKL's own thread team, whose start-up
// per call costs more than the product.
// (mkl_service.h's mkl_set_num_threads_local is a macro for this C entry point; the lower-case
// exported symbol is the Fortran one, which takes a pointer.)
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

struct SequentialBlas {
  int previous = 0;
  SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(previous);  // 0 = back to the global setting
  }
  SequentialBlas(const SequentialBlas&) = delete;
  SequentialBlas& operator=(const SequentialBlas&) = delete;
};

// Grain for at::parallel_for: enough units to make ~1 MFLOP per chunk, so tiny problems (decode
// steps, gradcheck) run on the calling thread instead of waking the thread pool.
inline int64_t grain_for(double flops_per_unit) {
  constexpr double kMinChunkFlops = 1 << 20;
  return std::max<int64_t>(1, static_cast<int64_t>(kMinChunkFlops / std::max(flops_per_unit, 1.0)));
}

// FUSED_ATTN_CPU_GEMM picks how the tile products run: unset (or "auto"), the register-blocked
// kernels for float32 compute where the CPU has AVX2 + FMA (BLAS otherwise), except for a call
// with few query rows per kv head (decoding: BLAS, forward and backward, few_query_rows and
// decode_takes_blas; bfloat16 on the AVX512-BF16 dot products reads K and V as rows in the
// forward, decode_rows); "tiles", the register-blocked kernels always;
// "blas", BLAS through its Fortran entry points; "aten", BLAS through at::addmm.
// Read at every call (a getenv, against milliseconds of work), so a benchmark or a test can
// compare the paths in one process; anything else is a ValueError naming the variable (as the
// tile sizes' and the other settings' bad values are).
enum class GemmMode { automatic, tiles, blas, aten };
GemmMode gemm_mode() {
  const char* s = std::getenv("FUSED_ATTN_CPU_GEMM");
  const std::string mode = s ? s : "";
  if (mode.empty() || mode == "auto") return GemmMode::automatic;
  if (mode == "tiles") return GemmMode::tiles;
  if (mode == "blas") return GemmMode::blas;
  if (mode == "aten") return GemmMode::aten;
  FA_CHECK_VALUE(false, "FUSED_ATTN_CPU_GEMM must be one of auto, tiles, blas, aten; got '", mode, "'");
}

// The register-blocked float32 products first lay out K and V as panels, a pass over the whole KV
// cache per call; the products then reuse each panel for every query row of its kv head. With
// few such rows (a decoding step: one query per head, times the group) the layout costs more
// than it saves, and BLAS on the tiles as they are is faster, so the automatic mode takes it for
// calls where every query sees every key (decoding against a cache; the packed varlen op too, for
// float32 inputs, when every sequence's queries do), in the forward and in the backward alike
// (decode_takes_blas). Measured here (2 cores,
// Zen 4, float32, one query per head, benchmarks/bench_cpu_decode.py): B4 Hq8 Hkv2 Lk4096 D64
// 8.1 -> 0.83 ms (SDPA 0.87), B1 Hq32 Hkv8 Lk8192 D128 33 -> 12.2 ms (SDPA 12.3). bfloat16 on
// the AVX512-BF16 dot products does not take BLAS, which converts K and V to float32 (it was
// 2-4x slower than their panels there), but reads K and V as rows (decode_rows, below). The
// crossover sits near 64 rows per kv head (non-causal float32, median ms, tiles against BLAS): Hq
// = Hkv, B2 H8 Lk2048 D64: 16 queries 2.18 / 1.19, 32 2.89 / 2.01, 64 4.41 / 3.88, 96 5.97 / 5.61
// (B4 Lk4096: 16 10.6 / 7.7, 64 20.1 / 17.1); grouped, where BLAS multiplies each query head on
// its own, B4 Hq8 Hkv2 Lk4096: 8 queries (32 rows) 2.98 / 2.73, 16 (64 rows) 4.33 / 4.36; B1 Hq32
// Hkv8 Lk8192 D128, 16 queries (64 rows) 22.1 / 23.6.
constexpr int64_t kMinPanelRows = 64;
bool few_query_rows(int64_t query_rows, int64_t heads_q, int64_t heads_kv) {
  return query_rows * (heads_q / std::max<int64_t>(heads_kv, 1)) < kMinPanelRows;
}

// bfloat16 on the AVX512-BF16 dot products: laying out K and V as pair panels (Bf16PanelSource)
// is a scalar shuffle of the whole cache on every call, which with few query rows per kv head
// cost several times the products; with fewer than kMinBf16PanelRows such rows (a decoding step)
// the automatic mode's forward reads K and V as rows instead (bf16_dot::row_scores /
// row_accumulate: each row of the unit dots every key and sweeps every value row, from cache after
// the first). Measured here (2 cores, Zen 4, one thread, median ms, rows against panels, Lk 2048
// D128 Hq = Hkv): 1 row 0.41 / 4.9 (Lk 1024 H16), 4 rows 0.84 / 5.6, 16 rows 2.7 / 4.8, 24 rows
// 4.1-4.6 / 5.3-5.9, 32 rows 0.8-1.15x the panels, 48 rows 1.0-1.8x; grouped (B1 Hq32 Lk4096
// D128, one query): Hkv 2 (16 rows) 1.3-1.7 / 3.3-3.5, Hkv 1 (32 rows) 1.7-1.9 / 2.2-2.3.
constexpr int64_t kMinBf16PanelRows = 32;
bool decode_rows(int64_t query_rows, int64_t heads_q, int64_t heads_kv) {
  return query_rows * (heads_q / std::max<int64_t>(heads_kv, 1)) < kMinBf16PanelRows;
}

// BLAS through its Fortran entry points, when torch exports them and the mode is not "aten".
bool use_fortran_blas(GemmMode mode) { return sgemm_ != nullptr && dgemm_ != nullptr && mode != GemmMode::aten; }

// (false on builds without the AVX2 copies: cpu_has_avx2_fma() says no there)
bool use_tile_kernels(GemmMode mode) {
  return (mode == GemmMode::tiles || mode == GemmMode::automatic) && fused_attn::cpu::cpu_has_avx2_fma();
}

// FUSED_ATTN_CPU_BF16_DOT picks how the register-blocked products of the forward and the backward
// run for bfloat16 inputs: unset or "auto", with AVX512-BF16 dot products (attention_bf16_dot.h)
// where the CPU has them, else on float32 panels; "on", the bf16 dot products (an error on a CPU
// without AVX512-BF16); "off", the float32 panels. It only concerns bfloat16 inputs on the
// register-blocked path (FUSED_ATTN_CPU_GEMM=blas|aten keep their BLAS products). Read at every
// call, like FUSED_ATTN_CPU_GEMM, so that tests compare both paths in one process; any other value
// is a ValueError naming the variable, whatever the dtype.
enum class Bf16DotMode { automatic, on, off };
Bf16DotMode bf16_dot_mode() {
  const char* s = std::getenv("FUSED_ATTN_CPU_BF16_DOT");
  const std::string mode = s ? s : "auto";
  if (mode == "auto" || mode.empty()) return Bf16DotMode::automatic;
  if (mode == "on") return Bf16DotMode::on;
  if (mode == "off") return Bf16DotMode::off;
  FA_CHECK_VALUE(false, "FUSED_ATTN_CPU_BF16_DOT must be one of auto, on, off; got '", mode, "'");
}

// Whether a call (forward or backward) in dtype t on the register-blocked path (tiles) runs its
// products as AVX512-BF16 dot products.
bool use_bf16_dot(at::ScalarType t, bool tiles) {
  const Bf16DotMode mode = bf16_dot_mode();  // checked on every call
  if (t != at::kBFloat16 || mode == Bf16DotMode::off) return false;
  const bool supported = bf16_dot::cpu_supported();
  FA_CHECK(supported || mode != Bf16DotMode::on,
           "FUSED_ATTN_CPU_BF16_DOT=on: this CPU (or this build: it needs GCC on x86-64) has no AVX512-BF16 "
           "dot products; use auto or off");
  return supported && tiles;
}

inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                         const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                         const int* ldc) {
  sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void fortran_gemm(const char* ta, const char* tb, const int* m, const int* n, const int* k,
                         const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                         const double* beta, double* c, const int* ldc) {
  dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// A row-major (rows, cols) matrix with leading dimension ld, as a tensor view (transposed if asked).
template <typename T>
Tensor tile_view(const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
  Tensor t = at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1},
                           at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return trans ? t.t() : t;
}

// Row-major C[M, N] = alpha * op(A) op(B) + beta * C, where op(A) is [M, K] (A stored [M, K], or
// [K, M] when trans_a) and op(B) is [K, N] (B stored [K, N], or [N, K] when trans_b). BLAS is
// column-major, and a row-major matrix is its column-major transpose, so this computes
// C^T = op(B)^T op(A)^T with the operands swapped.
template <typename T>
void gemm_rm(bool fortran, bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (K == 0) {  // BLAS would only scale C; do it here rather than rely on every BLAS's k = 0 path
    for (int64_t r = 0; r < M; ++r)
      for (int64_t c = 0; c < N; ++c) C[r * ldc + c] = beta == T(0) ? T(0) : beta * C[r * ldc + c];
    return;
  }
  if (fortran) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    fortran_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  Tensor c = tile_view(C, M, N, ldc, false);
  Tensor a = trans_a ? tile_view(A, K, M, lda, true) : tile_view(A, M, K, lda, false);
  Tensor b = trans_b ? tile_view(B, N, K, ldb, true) : tile_view(B, K, N, ldb, false);
  c.addmm_(a, b, beta, alpha);  // beta = 0 ignores C's old contents (NaN included)
}

// ---- problem description ----------------------------------------------------------------------

// A (B, H, L, D) tensor seen as one row-major (L, D) matrix per (b, h): unit stride along D and
// a leading dimension the BLAS accepts (batch and head strides are free, even 0).
template <typename T>
struct Matrices {
  const T* data = nullptr;
  int64_t stride_b = 0, stride_h = 0, ld = 1;
  const T* at(int64_t b, int64_t h) const { return data + b * stride_b + h * stride_h; }
};

// (rows more than INT_MAX elements apart are copied: the BLAS takes 32-bit leading dimensions)
bool blas_ready(const Tensor& t) {
  const int64_t L = t.size(2), D = t.size(3);
  return (D <= 1 || t.stride(3) == 1) &&
         (L <= 1 || (t.stride(2) >= std::max<int64_t>(D, 1) && t.stride(2) <= std::numeric_limits<int>::max()));
}

// t in the accumulation dtype, copied only when the dtype or the layout requires it.
Tensor as_blas_operand(const Tensor& t, at::ScalarType acc) {
  Tensor r = t.to(acc);
  return blas_ready(r) ? r : r.contiguous();
}

template <typename T>
Matrices<T> matrices(const Tensor& t) {
  Matrices<T> m;
  m.data = t.const_data_ptr<T>();
  m.stride_b = t.stride(0);
  m.stride_h = t.stride(1);
  m.ld = t.size(2) <= 1 ? std::max<int64_t>(t.size(3), 1) : t.stride(2);
  FA_CHECK(m.ld <= std::numeric_limits<int>::max() && t.size(3) <= std::numeric_limits<int>::max(),
              "attention (cpu): row stride ", m.ld, " too large for the 32-bit BLAS interface");
  return m;
}

// ---- operands of the register-blocked products -----------------------------------------------
//
// A B operand is read 16 columns at a time, one row per step of the inner dimension. Read in
// place from a (L, D) row matrix, those rows sit D floats apart: a power-of-two stride that maps
// a 16-column panel onto a few L1 sets, so a panel of a few hundred rows thrashed L1 (measured:
// a quarter of the P V product's samples on one load). So every B operand is laid out once (per
// call, or per kv head in the backward's per-head schedule: O(L * D) work against the
// O(L^2 * D) of the products) as contiguous 16-wide panels, zero past the matrix's edge:
//  - key panels, for the products whose columns are keys (S = Q K^T, dP = dO V^T): per (b, h),
//    [L16 / 16][D][16] = 16 keys side by side for each head-dim index (panels of K^T);
//  - column panels, for the products whose inner dimension runs along the matrix's rows
//    (O += P V, dV += P^T dO, dK += dS^T Q, dQ += dS K): per (b, h), [D16 / 16][L][16].
// Half-precision inputs are converted to float32 on the way, so they cost no extra copy. A
// operands (broadcast one element at a time) are read in place.

using tile_gemm::PanelB;

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// A (B, H, L, D) tensor laid out as float32 panels, contiguous (B, H, n_panels, rows, 16).
struct Panels {
  Tensor storage;
  const float* data = nullptr;
  int64_t stride_h = 0, stride_b = 0, panel_stride = 0;
  int64_t h_base = 0;  // the head data starts at (a buffer holding some heads of one batch row)
  const float* head(int64_t b, int64_t h) const { return data + b * stride_b + (h - h_base) * stride_h; }
  // key panels: the panels from key j0 (a multiple of 16) on
  PanelB keys_from(int64_t b, int64_t h, int64_t j0) const {
    return {head(b, h) + j0 / 16 * panel_stride, panel_stride, 16};
  }
  // column panels: every column, from row i0 on
  PanelB rows_from(int64_t b, int64_t h, int64_t i0) const { return {head(b, h) + i0 * 16, panel_stride, 16}; }
};

// A (B, H, L, D) tensor to be laid out as key panels (keys = true) or column panels: panel p,
// row r, lane c holds t[b, h, row, col] with (row, col) = keys ? (16 p + c, r) : (r, 16 p + c).
template <typename scalar_t>
struct PanelSource {
  const scalar_t* data;
  int64_t sb, sh, sl, sd, L, D;
  bool keys;

  PanelSource(const Tensor& t, bool keys_)
      : data(t.const_data_ptr<scalar_t>()), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)), sd(t.stride(3)),
        L(t.size(2)), D(t.size(3)), keys(keys_) {}
  // one varlen sequence: rows [0, L) of each head from `data` on (B = 1)
  PanelSource(const scalar_t* data_, int64_t sh_, int64_t sl_, int64_t sd_, int64_t L_, int64_t D_, bool keys_)
      : data(data_), sb(0), sh(sh_), sl(sl_), sd(sd_), L(L_), D(D_), keys(keys_) {}
  int64_t n_panels() const { return (keys ? round16(L) : round16(D)) / 16; }
  int64_t rows() const { return keys ? D : L; }
  int64_t panel_size() const { return rows() * 16; }
  int64_t head_floats() const { return n_panels() * rows() * 16; }

  void pack(int64_t b, int64_t h, int64_t p, float* panel) const {
    const scalar_t* base = data + b * sb + h * sh;
    const int64_t n_rows = rows();
    // the vectorised copies: unit column stride, and (keys) 16 whole rows, (columns) 16 whole columns
    // (float64 never takes the register-blocked path: its copies are not instantiated for it)
    const bool fast = sd == 1 && 16 * p + 16 <= (keys ? L : D);
    if (keys) {  // lane c <- key 16 p + c: one source row per lane
      int64_t r_done = 0;
      if constexpr (!std::is_same_v<scalar_t, double>) {
        if (fast) {
          r_done = n_rows / 8 * 8;
          tile_gemm::pack_key_panel<scalar_t>(base + 16 * p * sl, sl, r_done, panel);
        }
      }
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t row = 16 * p + c;
        if (row >= L) {
          for (int64_t r = r_done; r < n_rows; ++r) panel[r * 16 + c] = 0.f;
          continue;
        }
        const scalar_t* src_row = base + row * sl;
        for (int64_t r = r_done; r < n_rows; ++r) panel[r * 16 + c] = static_cast<float>(src_row[r * sd]);
      }
      return;
    }
    // row r <- columns 16 p .. 16 p + 15 of source row r
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (fast) {
        tile_gemm::pack_column_panel<scalar_t>(base + 16 * p, sl, n_rows, panel);
        return;
      }
    }
    const int64_t width = std::min<int64_t>(16, D - 16 * p);
    for (int64_t r = 0; r < n_rows; ++r) {
      const scalar_t* src_cols = base + r * sl + 16 * p * sd;
      float* dst_row = panel + r * 16;
      for (int64_t c = 0; c < width; ++c) dst_row[c] = static_cast<float>(src_cols[c * sd]);
      for (int64_t c = width; c < 16; ++c) dst_row[c] = 0.f;
    }
  }

  // Heads [h0, h0 + n) of batch row b into dst (n * head_floats() floats), on the calling thread;
  // the Panels over them.
  Panels pack_heads(int64_t b, int64_t h0, int64_t n, float* dst) const {
    Panels out;
    out.data = dst;
    out.panel_stride = rows() * 16;
    out.stride_h = head_floats();
    out.h_base = h0;
    for (int64_t h = h0; h < h0 + n; ++h)
      for (int64_t p = 0; p < n_panels(); ++p) pack(b, h, p, dst + (h - h0) * out.stride_h + p * out.panel_stride);
    return out;
  }
};

// Every head of t laid out at once (in parallel): keys = true, key panels; false, column panels.
template <typename scalar_t>
Panels make_panels(const Tensor& t, bool keys) {
  const PanelSource<scalar_t> src(t, keys);
  const int64_t B = t.size(0), H = t.size(1), n_panels = src.n_panels();
  Panels out;
  out.storage = scratch::empty({B, H, n_panels, src.rows(), 16}, at::kFloat);
  out.data = out.storage.const_data_ptr<float>();
  out.panel_stride = src.rows() * 16;
  out.stride_h = n_panels * out.panel_stride;
  out.stride_b = H * out.stride_h;
  float* dst = out.storage.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(out.panel_stride, 1));
  at::parallel_for(0, B * H * n_panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) src.pack(u / n_panels / H, u / n_panels % H, u % n_panels, dst + u * out.panel_stride);
  });
  return out;
}

// ---- operands of the AVX512-BF16 products (attention_bf16_dot.h) -----------------------------
//
// bfloat16 inputs on a CPU with AVX512-BF16: the products read bf16 values in pairs along their
// inner dimension (one vdpbf16ps lane = the sum of two bf16 products), so the operands are laid
// out, once per call, with the two values of a pair adjacent. Three layouts of a (B, H, L, D)
// tensor t:
//  - rows (A operands, pairs along D): t's rows as they are when D is even and the head dim has
//    unit stride (a pair is two adjacent elements of a row), else copied into rows of D rounded
//    up to even, the padding zero. Forward: q (S = Q K^T); backward: q, and dO (dP = dO V^T);
//  - key panels (B operands whose columns are t's rows, pairs along D), per (b, h):
//    [round16(L) / 16][D2][16 rows x 2] with D2 = ceil(D / 2): panel p, pair row d2, lane c holds
//    (t[16 p + c][2 d2], t[16 p + c][2 d2 + 1]), zero past L and past D. k (S = Q K^T), and in the
//    backward v (dP = dO V^T, pairs along Dv);
//  - column panels (B operands whose inner dimension runs along t's rows), per (b, h):
//    [round16(D) / 16][round16(L) / 2][16 columns x 2]: panel p, pair row l2, lane c holds
//    (t[2 l2][16 p + c], t[2 l2 + 1][16 p + c]), zero past L and past D. Rows are padded to 16 so
//    that the pairs of any tile starting at an even row exist: key tiles start at multiples of 16,
//    the backward's query tiles at multiples of its (even) query block. v (O += P V, pairs of
//    keys) in the forward; in the backward dO (dV += P^T dO, pairs of queries), q (dK += dS^T Q,
//    pairs of queries) and k (dQ += dS K, pairs of keys).
// (bf16 values handled as their 16 bits: the layouts only move them.)
inline const uint16_t* bf16_bits(const Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.const_data_ptr<c10::BFloat16>());
}

struct Bf16Rows {
  Tensor store;  // owner, undefined when t is read in place
  const uint16_t* data = nullptr;
  int64_t sb = 0, sh = 0, ld = 0;
  int64_t even = 0;  // the inner dimension: D rounded up to even
  const uint16_t* rows(int64_t b, int64_t h, int64_t i0) const { return data + b * sb + h * sh + i0 * ld; }
};

Bf16Rows bf16_rows(const Tensor& t) {
  Bf16Rows out;
  const int64_t D = t.size(3);
  out.even = (D + 1) / 2 * 2;
  if (D % 2 == 0 && (D <= 1 || t.stride(3) == 1)) {
    out.data = bf16_bits(t);
    out.sb = t.stride(0);
    out.sh = t.stride(1);
    out.ld = t.size(2) <= 1 ? D : t.stride(2);
  } else {
    out.store = scratch::empty({t.size(0), t.size(1), t.size(2), out.even}, at::kBFloat16);
    out.store.narrow(3, out.even - 1, 1).zero_();  // the padding column (written over when D is even)
    out.store.narrow(3, 0, D).copy_(t);
    out.data = bf16_bits(out.store);
    out.sb = out.store.stride(0);
    out.sh = out.store.stride(1);
    out.ld = out.even;
  }
  return out;
}

struct Bf16Panels {
  Tensor store;
  const uint16_t* data = nullptr;
  int64_t sb = 0, sh = 0, panel = 0;  // panel: the bf16 elements of one panel
  // key panels: the panels from row (key) j0 on, j0 a multiple of 16
  bf16_dot::PanelB16 keys_from(int64_t b, int64_t h, int64_t j0) const {
    return {data + b * sb + h * sh + j0 / 16 * panel, panel};
  }
  // column panels: every column, from the pair of row i0 on, i0 even
  bf16_dot::PanelB16 rows_from(int64_t b, int64_t h, int64_t i0) const {
    return {data + b * sb + h * sh + i0 / 2 * 32, panel};
  }
};

// A (B, H, L, D) bfloat16 tensor to be laid out as key panels (keys = true) or column panels.
struct Bf16PanelSource {
  const uint16_t* data;
  int64_t sb, sh, sl, sd, L, D;
  bool keys;

  Bf16PanelSource(const Tensor& t, bool keys_)
      : data(bf16_bits(t)), sb(t.stride(0)), sh(t.stride(1)), sl(t.stride(2)), sd(t.stride(3)), L(t.size(2)),
        D(t.size(3)), keys(keys_) {}
  // one varlen sequence: rows [0, L) of each head from `data` on (B = 1)
  Bf16PanelSource(const uint16_t* data_, int64_t sh_, int64_t sl_, int64_t sd_, int64_t L_, int64_t D_, bool keys_)
      : data(data_), sb(0), sh(sh_), sl(sl_), sd(sd_), L(L_), D(D_), keys(keys_) {}
  int64_t n_panels() const { return keys ? round16(L) / 16 : round16(D) / 16; }
  // bf16 elements of one panel
  int64_t panel_size() const { return keys ? (D + 1) / 2 * 32 : round16(L) / 2 * 32; }

  void pack(int64_t b, int64_t h, int64_t p, uint16_t* dst) const {
    const int64_t D2 = (D + 1) / 2, L16 = round16(L);
    if (keys) {  // lane c <- row 16 p + c, pair row d2 <- head-dim indices 2 d2, 2 d2 + 1
      for (int64_t c = 0; c < 16; ++c) {
        const int64_t row_index = 16 * p + c;
        if (row_index >= L) {
          for (int64_t d2 = 0; d2 < D2; ++d2) dst[d2 * 32 + 2 * c] = dst[d2 * 32 + 2 * c + 1] = 0;
          continue;
        }
        const uint16_t* row = data + b * sb + h * sh + row_index * sl;
        for (int64_t d = 0; d < D; ++d) dst[d / 2 * 32 + 2 * c + d % 2] = row[d * sd];
        if (D % 2) dst[D / 2 * 32 + 2 * c + 1] = 0;  // the odd head dim's padding
      }
    } else {  // lane c <- column 16 p + c, pair row l2 <- rows 2 l2, 2 l2 + 1
      const int64_t width = std::min<int64_t>(16, D - 16 * p);
      const uint16_t* base = data + b * sb + h * sh + 16 * p * sd;
      for (int64_t l = 0; l < L16; ++l) {
        uint16_t* out_row = dst + l / 2 * 32 + l % 2;
        if (l >= L) {
          for (int64_t c = 0; c < 16; ++c) out_row[2 * c] = 0;
          continue;
        }
        const uint16_t* row = base + l * sl;
        for (int64_t c = 0; c < width; ++c) out_row[2 * c] = row[c * sd];
        for (int64_t c = width; c < 16; ++c) out_row[2 * c] = 0;
      }
    }
  }
};

// t's key panels (keys = true) or column panels, laid out in parallel.
Bf16Panels bf16_panels(const Tensor& t, bool keys) {
  const Bf16PanelSource src(t, keys);
  Bf16Panels out;
  const int64_t B = t.size(0), H = t.size(1);
  const int64_t n_panels = src.n_panels();
  out.panel = src.panel_size();
  out.store = scratch::empty({B, H, n_panels * out.panel}, at::kBFloat16);
  out.sh = n_panels * out.panel;
  out.sb = H * out.sh;
  uint16_t* dst_all = reinterpret_cast<uint16_t*>(out.store.data_ptr<c10::BFloat16>());
  out.data = dst_all;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(keys ? (src.D + 1) / 2 : round16(src.L), 1));
  at::parallel_for(0, B * H * n_panels, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u)
      src.pack(u / n_panels / H, u / n_panels % H, u % n_panels, dst_all + u * out.panel);
  });
  return out;
}

// t's rows read in place (no copy: the head dim must have unit stride, can_read_rows).
bool can_read_rows(const Tensor& t) { return t.size(3) <= 1 || t.stride(3) == 1; }
Bf16Rows bf16_rows_in_place(const Tensor& t) {
  Bf16Rows out;
  out.data = bf16_bits(t);
  out.sb = t.stride(0);
  out.sh = t.stride(1);
  out.ld = t.stride(2);
  out.even = t.size(3);  // (unused: the decoding products read exactly D elements of a row)
  return out;
}

// The bf16 operands of a call: the forward's (q rows, k key panels, v column panels), and the
// backward's (q and dO rows, k and v key panels, dO, q and k column panels). A decoding forward
// (decode_rows) reads k and v as rows instead (bf16_dot::row_scores / row_accumulate).
struct Bf16Operands {
  Bf16Rows q;
  Bf16Panels k_keys, v_columns;
  bool rows = false;  // k_rows and v_rows, not the panels
  Bf16Rows k_rows, v_rows;
  // backward
  Bf16Rows dout;
  Bf16Panels v_keys, dout_columns, q_columns, k_columns;
};

std::unique_ptr<Bf16Operands> make_bf16_operands(const Tensor& q, const Tensor& k, const Tensor& v, bool rows) {
  auto ops = std::make_unique<Bf16Operands>();
  ops->q = bf16_rows(q);
  ops->rows = rows;
  if (rows) {
    ops->k_rows = bf16_rows_in_place(k);
    ops->v_rows = bf16_rows_in_place(v);
  } else {
    ops->k_keys = bf16_panels(k, true);
    ops->v_columns = bf16_panels(v, false);
  }
  return ops;
}

std::unique_ptr<Bf16Operands> make_bf16_backward_operands(const Tensor& q, const Tensor& k, const Tensor& v,
                                                          const Tensor& dout) {
  auto ops = std::make_unique<Bf16Operands>();
  ops->q = bf16_rows(q);
  ops->dout = bf16_rows(dout);
  ops->k_keys = bf16_panels(k, true);
  ops->v_keys = bf16_panels(v, true);
  ops->dout_columns = bf16_panels(dout, false);
  ops->q_columns = bf16_panels(q, false);
  ops->k_columns = bf16_panels(k, false);
  return ops;
}

// Everything the register-blocked products read besides Problem's A-operand rows.
struct TileOperands {
  Panels k_keys;     // S = Q K^T
  Panels v_columns;  // O += P V (forward)
  // backward
  Panels v_keys;       // dP = dO V^T
  Panels dout_columns; // dV += P^T dO
  Panels q_columns;    // dK += dS^T Q
  Panels k_columns;    // dQ += dS K
  // bfloat16 inputs with AVX512-BF16 dot products: the bf16 layouts (the float32 panels above
  // unused then), or null
  const Bf16Operands* bf16 = nullptr;
};

// The backward's B operands for the per-kv-head schedule: rather than laying out every head up
// front (five float32 copies of the inputs, faulted in fresh on every call), the unit that owns a
// kv head lays out that head and its query heads into its own buffer, reused from head to head,
// and reads them while they are still in cache.
template <typename scalar_t>
struct HeadSources {
  PanelSource<scalar_t> k_keys, v_keys, k_columns, q_columns, dout_columns;

  HeadSources(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout)
      : k_keys(k, true), v_keys(v, true), k_columns(k, false), q_columns(q, false), dout_columns(dout, false) {}
  HeadSources(PanelSource<scalar_t> k_keys_, PanelSource<scalar_t> v_keys_, PanelSource<scalar_t> k_columns_,
              PanelSource<scalar_t> q_columns_, PanelSource<scalar_t> dout_columns_)
      : k_keys(k_keys_), v_keys(v_keys_), k_columns(k_columns_), q_columns(q_columns_), dout_columns(dout_columns_) {}

  // The operands of kv head hk of batch row b (query heads hk * G .. hk * G + G - 1), laid out in buf.
  TileOperands pack(int64_t b, int64_t hk, int64_t G, scratch::Block& buf) const {
    const int64_t per_kv = k_keys.head_floats() + v_keys.head_floats() + k_columns.head_floats();
    const int64_t per_q = q_columns.head_floats() + dout_columns.head_floats();
    buf.reserve(sizeof(float) * (per_kv + G * per_q));
    float* p = buf.as<float>();
    TileOperands ops;
    ops.k_keys = k_keys.pack_heads(b, hk, 1, p);
    p += k_keys.head_floats();
    ops.v_keys = v_keys.pack_heads(b, hk, 1, p);
    p += v_keys.head_floats();
    ops.k_columns = k_columns.pack_heads(b, hk, 1, p);
    p += k_columns.head_floats();
    ops.q_columns = q_columns.pack_heads(b, hk * G, G, p);
    p += G * q_columns.head_floats();
    ops.dout_columns = dout_columns.pack_heads(b, hk * G, G, p);
    return ops;
  }
};

// The attention mask as a strided (B, Hq, Lq, Lk) view: bool (true = attend) or additive in
// the input dtype `scalar_t`.
struct MaskView {
  const void* data = nullptr;
  bool is_bool = false;
  int64_t sb = 0, sh = 0, si = 0, sj = 0;
};

template <typename T>  // T: accumulation type
struct Problem {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  Matrices<T> q, k, v;
  std::optional<MaskView> mask;
  int64_t lo = 0, hi = 0;  // the visibility band, clamped (set_band)
  T scale;
  T softcap = 0, inv_softcap = 0;  // the logit cap (0: off) and its reciprocal
  // ALiBi: the slope of (b, h) at alibi[b * alibi_sb + h * alibi_sh] (a float32 (B, Hq) tensor of
  // any strides, often a stride-0 expand of (Hq,)); null: off. alibi_shift: where query 0 sits
  // among the keys (Lk - Lq bottom-right, 0 top-left).
  const float* alibi = nullptr;
  int64_t alibi_sb = 0, alibi_sh = 0, alibi_shift = 0;
  double dropout_p;
  uint64_t seed, offset;
  bool fortran_blas = false;  // BLAS products through sgemm_/dgemm_ rather than at::addmm

  int64_t group() const { return Hq / Hkv; }

  // The band (query i sees key j iff i + lo <= j <= i + hi) with both ends clamped to [-Lq, Lk]:
  // the same visible keys (i - Lq < 0 <= j and j <= Lk - 1 < i + Lk), but every index sum below
  // stays within (-2 Lq, Lq + Lk]. An empty band (lo > hi) becomes (Lk, -Lq), whose block ranges
  // below come out empty for every block (a row-by-row test would find nothing visible anyway).
  void set_band(int64_t band_lo, int64_t band_hi) {
    lo = std::clamp<int64_t>(band_lo, -Lq, Lk);
    hi = std::clamp<int64_t>(band_hi, -Lq, Lk);
    if (lo > hi) lo = Lk, hi = -Lq;
  }
  // Whether the band hides any (query, key) pair at all: some j < i + lo (the lower edge cuts
  // when lo > 1 - Lq: the last query) or some j > i + hi (the upper edge cuts when hi < Lk - 1:
  // the first query). No band (and causal with Lq = Lk = 1) says no: nothing to prune or test.
  bool banded() const { return lo > 1 - Lq || hi < Lk - 1; }
  // Keys [first, second) that some query of [i0, i1) sees; empty (first >= second) if none.
  std::pair<int64_t, int64_t> keys_seen(int64_t i0, int64_t i1) const {
    return {std::clamp<int64_t>(i0 + lo, 0, Lk), std::clamp<int64_t>(i1 - 1 + hi + 1, 0, Lk)};
  }
  // Queries [first, second) that see some key of [j0, j1); empty (first >= second) if none.
  std::pair<int64_t, int64_t> queries_seeing(int64_t j0, int64_t j1) const {
    return {std::clamp<int64_t>(j0 - hi, 0, Lq), std::clamp<int64_t>(j1 - 1 - lo + 1, 0, Lq)};
  }
  // Whether the tile of queries [i0, i0 + bm) and keys [j0, j0 + bn) has an invisible pair: its
  // first key before the last query's lower edge, or its last key past the first query's upper edge.
  bool straddles(int64_t i0, int64_t bm, int64_t j0, int64_t bn) const {
    return j0 < i0 + bm - 1 + lo || j0 + bn - 1 > i0 + hi;
  }
  // The columns [first, second) of a tile starting at key j0, n wide, that query i sees.
  std::pair<int64_t, int64_t> visible(int64_t i, int64_t j0, int64_t n) const {
    const int64_t c0 = std::clamp<int64_t>(i + lo - j0, 0, n);
    return {c0, std::clamp<int64_t>(i + hi + 1 - j0, c0, n)};
  }
  T alibi_slope(int64_t b, int64_t h) const { return static_cast<T>(alibi[b * alibi_sb + h * alibi_sh]); }
  // The column of a tile starting at key j0 where query i's ALiBi distance |j - i - shift| is 0
  // (possibly outside the tile): the distance of column c is |c - alibi_diagonal(i, j0)|.
  int64_t alibi_diagonal(int64_t i, int64_t j0) const { return i + alibi_shift - j0; }
  uint32_t dropout_key(int64_t b, int64_t h, int64_t i) const {
    return fused_attn::dropout_row_key(seed, offset, static_cast<uint64_t>((b * Hq + h) * Lq + i));
  }
};

// Adds the mask to one row of scores: s[c] (key j0 + c) += mask, or = -inf where a bool mask is false.
template <typename T, typename scalar_t>
void apply_mask_row(T* s, int64_t n, const MaskView& mk, int64_t b, int64_t h, int64_t i, int64_t j0) {
  const int64_t base = b * mk.sb + h * mk.sh + i * mk.si + j0 * mk.sj;
  if (mk.is_bool) {
    const bool* m = static_cast<const bool*>(mk.data) + base;
    const T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < n; ++c)
      if (!m[c * mk.sj]) s[c] = ninf;
  } else {
    const scalar_t* m = static_cast<const scalar_t*>(mk.data) + base;
    if (mk.sj == 1) {
      for (int64_t c = 0; c < n; ++c) s[c] += static_cast<T>(m[c]);
    } else {
      for (int64_t c = 0; c < n; ++c) s[c] += static_cast<T>(m[c * mk.sj]);
    }
  }
}

// Balanced order of blocks for contiguous chunks of units: 0, n-1, 1, n-2, ... so that under
// a causal band (work grows with the block index) each thread's chunk mixes short and long units.
inline int64_t zigzag(int64_t idx, int64_t n) { return (idx % 2 == 0) ? idx / 2 : n - 1 - idx / 2; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- forward ----------------------------------------------------------------------------------

// One attention problem of a forward call, and where its results go: a dense call is one part of
// B batch rows; a varlen call one part per sequence (B = 1), its Problem, operands and output
// pointers starting at the sequence's rows. out row i of (b, h) is at out + b * out_sb + h * out_sh
// + i * out_si, its lse at lse[b * lse_sb + h * lse_sh + i].
// The register-blocked products' K and V panels come laid out up front (ops), or, with `sources`,
// each thread lays out the (b, kv head) its units need when they reach it, into its own buffer
// (consecutive units share it), and reads them while they are in cache: a varlen call's panels
// of every sequence laid out first (megabytes) would be read back from memory.
template <typename scalar_t>
struct ForwardSources {
  PanelSource<scalar_t> k_keys, v_columns;
};
template <typename T, typename scalar_t>
struct ForwardPart {
  const Problem<T>* pb;
  const TileOperands* ops;  // the register-blocked products' operands (else null)
  scalar_t* out;
  int64_t out_sb, out_sh, out_si;
  T* lse;  // in the compute type: float32, float64 for float64 inputs (the op's lse dtype)
  int64_t lse_sb, lse_sh;
  const ForwardSources<scalar_t>* sources = nullptr;  // (register-blocked float32 panels only)
};

// The forward's tile: query block x key block.
inline Blocks forward_blocks(bool banded, bool tiles) {
  const Blocks blk = tiles ? fwd_tile_blocks() : banded ? fwd_blas_banded_blocks() : fwd_blas_blocks();
  return {blk.m, tiles ? round16(blk.n) : blk.n};
}

// The index of the part holding unit u, given first[p] = the first unit of part p (ascending,
// first.back() = the total).
inline int64_t part_of(const std::vector<int64_t>& first, int64_t u) {
  return static_cast<int64_t>(std::upper_bound(first.begin(), first.end(), u) - first.begin()) - 1;
}

// Runs body(begin, end) on contiguous ranges of the units [0, first.back()) in one
// at::parallel_for; part p's units are first[p] .. first[p + 1] - 1 and cost about unit_cost[p]
// each. One part (a dense call: units of equal cost): at::parallel_for's even split, `grain`
// units at least per range. Several (varlen sequences of different lengths): even counts would
// leave one thread the long sequences, so the ranges, one per thread (fewer when there are under
// `grain` units per thread), split the total cost evenly instead.
template <typename Body>
void parallel_over_units(const std::vector<int64_t>& first, const std::vector<double>& unit_cost, int64_t grain,
                         const Body& body) {
  const int64_t units = first.back();
  const int64_t n_parts = static_cast<int64_t>(first.size()) - 1;
  std::vector<double> cost_before(n_parts + 1, 0.0);
  for (int64_t p = 0; p < n_parts; ++p)
    cost_before[p + 1] = cost_before[p] + static_cast<double>(first[p + 1] - first[p]) * unit_cost[p];
  if (n_parts <= 1 || !(cost_before.back() > 0.0)) {  // (no cost to balance: empty head dims)
    at::parallel_for(0, units, grain, body);
    return;
  }
  const int64_t ranges = std::clamp<int64_t>(units / std::max<int64_t>(grain, 1), 1, at::get_num_threads());
  // the first unit of range r: where the cost before it reaches r / ranges of the total
  const auto range_start = [&](int64_t r) -> int64_t {
    if (r <= 0) return 0;
    if (r >= ranges) return units;
    const double target = cost_before.back() * static_cast<double>(r) / static_cast<double>(ranges);
    int64_t p = static_cast<int64_t>(std::upper_bound(cost_before.begin(), cost_before.end(), target) -
                                     cost_before.begin()) - 1;
    p = std::clamp<int64_t>(p, 0, n_parts - 1);
    const double within = (target - cost_before[p]) / std::max(unit_cost[p], 1e-30);
    return std::clamp<int64_t>(first[p] + std::llround(within), first[p], first[p + 1]);
  };
  at::parallel_for(0, ranges, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t begin = range_start(r), end = range_start(r + 1);
      if (begin < end) body(begin, end);
    }
  });
}

// Writes the parts' out and lse. tiles: the products run as
// register-blocked kernels (float32 only; they read pb's q rows and `ops`' panels, or, when
// ops->bf16 is set, AVX512-BF16 dot products over its bf16 q rows and panels, or its k and v
// rows when ops->bf16->rows: decoding), else as BLAS calls.
// The units (part, b, h, query block) of every part go to one at::parallel_for.
template <typename T, typename scalar_t, bool tiles>
void forward_kernel(const std::vector<ForwardPart<T, scalar_t>>& parts) {
  static_assert(!tiles || std::is_same_v<T, float>, "the register-blocked products are float32");
  if (parts.empty()) return;
  const T ninf = -std::numeric_limits<T>::infinity();
  const Problem<T>& pb0 = *parts[0].pb;  // the options every part shares (dropout, D, Dv, ...)
  const uint32_t threshold = fused_attn::dropout_threshold(pb0.dropout_p);
  const T inv_keep = static_cast<T>(1.0 / (1.0 - pb0.dropout_p));
  const bool dropout = pb0.dropout_p > 0.0;
  // the accumulator's row: the register-blocked P V writes whole 16-column panels
  const int64_t acc_ld = tiles ? round16(pb0.Dv) : pb0.Dv;
  // units per part, the scratch the largest tile needs, and the flops of the average unit
  std::vector<int64_t> first_unit(parts.size() + 1, 0);
  std::vector<double> unit_cost(parts.size());
  int64_t tile_m = 0, tile_n = 0;
  double flops = 0.0;
  for (size_t p = 0; p < parts.size(); ++p) {
    const Problem<T>& pb = *parts[p].pb;
    const Blocks blk = forward_blocks(pb.banded(), tiles);
    const int64_t units = pb.B * pb.Hq * ceil_div(pb.Lq, blk.m);
    first_unit[p + 1] = first_unit[p] + units;
    tile_m = std::max(tile_m, std::min(blk.m, pb.Lq));
    tile_n = std::max(tile_n, std::min(blk.n, tiles ? round16(pb.Lk) : pb.Lk));
    unit_cost[p] = 2.0 * blk.m * pb.Lk * (pb.D + pb.Dv);
    flops += units * unit_cost[p];
  }
  const int64_t units = first_unit.back();
  if (units == 0) return;
  const double unit_flops = flops / static_cast<double>(units);
  const bool bf16_products = tiles && parts[0].ops && parts[0].ops->bf16 != nullptr && !parts[0].ops->bf16->rows;

  parallel_over_units(first_unit, unit_cost, grain_for(unit_flops), [&](int64_t begin, int64_t end) {
    SequentialBlas sequential_blas;
    // Scratch sized to the problem (a decode step needs a few floats, not a full tile) and left
    // uninitialised: every score is written by the product before it is read, and acc/row_max_/
    // row_sum are reset per unit.
    std::unique_ptr<T[]> scores(new T[tile_m * tile_n]), acc(new T[tile_m * acc_ld]);
    std::vector<T> row_max_(tile_m), row_sum(tile_m);
    // the bf16 dot products: P rounded to bf16 rows (round16(bn) wide, zero past the tile's keys)
    std::unique_ptr<uint16_t[]> p_bf16(bf16_products ? new uint16_t[tile_m * tile_n] : nullptr);
    // (sources: the panels of the (part, b, kv head) laid out last, in head_buffer)
    scratch::Block head_buffer;
    TileOperands head_ops;
    std::array<int64_t, 3> head_laid_out{-1, -1, -1};
    for (int64_t u = begin, part_index = part_of(first_unit, begin); u < end; ++u) {
      while (u >= first_unit[part_index + 1]) ++part_index;
      const ForwardPart<T, scalar_t>& part = parts[part_index];
      const Problem<T>& pb = *part.pb;
      const Blocks blk = forward_blocks(pb.banded(), tiles);
      const int64_t BM = blk.m, BN = blk.n, n_qblocks = ceil_div(pb.Lq, BM);
      const int64_t unit = u - first_unit[part_index];
      const int64_t bh = unit / n_qblocks, qb = zigzag(unit % n_qblocks, n_qblocks);
      const int64_t b = bh / pb.Hq, h = bh % pb.Hq, hk = h / pb.group();
      const TileOperands* ops = part.ops;
      if (part.sources) {
        const std::array<int64_t, 3> head{part_index, b, hk};
        if (head != head_laid_out) {
          const ForwardSources<scalar_t>& src = *part.sources;
          head_buffer.reserve(sizeof(float) * (src.k_keys.head_floats() + src.v_columns.head_floats()));
          head_ops.k_keys = src.k_keys.pack_heads(b, hk, 1, head_buffer.as<float>());
          head_ops.v_columns = src.v_columns.pack_heads(b, hk, 1, head_buffer.as<float>() + src.k_keys.head_floats());
          head_laid_out = head;
        }
        ops = &head_ops;
      }
      const Bf16Operands* bf = tiles ? ops->bf16 : nullptr;
      const int64_t i0 = qb * BM, bm = std::min(BM, pb.Lq - i0);
      const T* Q = bf ? nullptr : pb.q.at(b, h) + i0 * pb.q.ld;  // (the bf16 path reads bf's q rows)
      const T slope = pb.alibi ? pb.alibi_slope(b, h) : T(0);
      std::fill(row_max_.begin(), row_max_.end(), ninf);
      std::fill(row_sum.begin(), row_sum.end(), T(0));
      std::fill(acc.get(), acc.get() + bm * acc_ld, T(0));
      // Only the keys the band shows some row of this block, from a multiple of 16 (where the
      // key panels start); a block that sees none keeps row_sum = 0: empty rows.
      const auto [key_begin, key_end] = pb.keys_seen(i0, i0 + bm);
      for (int64_t j0 = key_begin / 16 * 16; j0 < key_end; j0 += BN) {
        const int64_t bn = std::min(BN, key_end - j0);
        // the band's edges cut this tile: prune the products, test the rows
        const bool cut = pb.straddles(i0, bm, j0, bn);
        // scores row stride: the register-blocked product writes whole 16-key panels
        const int64_t lds = tiles ? round16(bn) : bn;
        T* S = scores.get();
        if constexpr (tiles) {
          // blocks outside the band are skipped (left unwritten: the row loop never reads them)
          if (bf && bf->rows)  // decoding: every column of the tile (the row loop reads the visible ones)
            bf16_dot::row_scores(bm, bn, pb.D, bf->q.rows(b, h, i0), bf->q.ld, bf->k_rows.rows(b, hk, j0),
                                 bf->k_rows.ld, S, lds, pb.scale);
          else if (bf)  // over D rounded up to even: q's and k's padding are zero
            bf16_dot::product<false>(bm, lds / 16, bf->q.even, bf->q.rows(b, h, i0), bf->q.ld, bf->k_keys.keys_from(b, hk, j0),
                                     S, lds, pb.scale, cut ? tile_gemm::Band::key_columns : tile_gemm::Band::none,
                                     pb.lo + i0 - j0, pb.hi + i0 - j0);
          else
            tile_gemm::product<false, false>(bm, lds, pb.D, Q, pb.q.ld, ops->k_keys.keys_from(b, hk, j0), S, lds,
                                             pb.scale, cut ? tile_gemm::Band::key_columns : tile_gemm::Band::none,
                                             pb.lo + i0 - j0, pb.hi + i0 - j0);
        } else {
          const T* K = pb.k.at(b, hk) + j0 * pb.k.ld;
          gemm_rm<T>(pb.fortran_blas, false, true, bm, bn, pb.D, pb.scale, Q, pb.q.ld, K, pb.k.ld, T(0), S, bn);
        }
        for (int64_t r = 0; r < bm; ++r) {
          const int64_t i = i0 + r;
          T* s = S + r * lds;
          // the row's visible columns [c0, c0 + nv): all of them unless the tile is cut
          const auto [c0, c1] = cut ? pb.visible(i, j0, bn) : std::pair<int64_t, int64_t>{0, bn};
          const int64_t nv = c1 - c0;
          T* sv = s + c0;
          if (pb.softcap > T(0)) row_softcap(sv, nv, pb.softcap, pb.inv_softcap, static_cast<T*>(nullptr));
          if (pb.mask) apply_mask_row<T, scalar_t>(sv, nv, *pb.mask, b, h, i, j0 + c0);
          if (pb.alibi) row_alibi(sv, nv, slope, pb.alibi_diagonal(i, j0 + c0));
          T tile_max = row_max(sv, nv);
          // row_max skips NaN; a tile of only NaN and -inf must still make the row NaN, not masked
          if (tile_max == ninf && row_has_nan(sv, nv)) tile_max = std::numeric_limits<T>::quiet_NaN();
          // NaN-propagating max (std::max would drop a NaN tile max and the row would read as masked)
          const T m_new = tile_max != tile_max ? tile_max : std::max(row_max_[r], tile_max);
          if (m_new == ninf) {  // nothing visible yet: this tile contributes nothing to the row
            std::fill(s, s + bn, T(0));
            continue;
          }
          const T rescale = std::exp(row_max_[r] - m_new);  // 0 on the row's first visible tile
          const T tile_sum = row_exp_sum(sv, nv, m_new);
          std::fill(s, sv, T(0));  // the columns outside the band (P V reads them: zero, not unwritten)
          std::fill(sv + nv, s + bn, T(0));
          row_sum[r] = row_sum[r] * rescale + tile_sum;
          row_max_[r] = m_new;
          if (rescale != T(1)) row_scale(acc.get() + r * acc_ld, acc_ld, rescale);
          // dropout acts on the normalised probabilities; the normaliser l stays the full sum
          if (dropout)
            row_dropout(sv, sv, nv, pb.dropout_key(b, h, i), static_cast<uint32_t>(j0 + c0), threshold, inv_keep);
        }
        if constexpr (tiles) {
          if (bf && bf->rows) {
            // decoding: each row's visible keys (P is zero elsewhere; a key the band hides is not
            // read, as the products over panels prune it), P in float32
            for (int64_t r = 0; r < bm; ++r) {
              const auto [c0, c1] = cut ? pb.visible(i0 + r, j0, bn) : std::pair<int64_t, int64_t>{0, bn};
              bf16_dot::row_accumulate(c1 - c0, S + r * lds + c0, bf->v_rows.rows(b, hk, j0 + c0), bf->v_rows.ld,
                                       pb.Dv, acc.get() + r * acc_ld);
            }
          } else if (bf) {
            // P (every row written on [0, bn) by the loop above: values on the visible columns,
            // zero elsewhere) rounded to bf16, zero on [bn, lds): the pairs of the last keys
            bf16_dot::convert_rows(S, lds, bm, bn, p_bf16.get(), lds);
            bf16_dot::product<true>(bm, acc_ld / 16, bn, p_bf16.get(), lds, bf->v_columns.rows_from(b, hk, j0), acc.get(),
                                    acc_ld, 1.f, cut ? tile_gemm::Band::key_inner : tile_gemm::Band::none,
                                    pb.lo + i0 - j0, pb.hi + i0 - j0);
          } else {
            tile_gemm::product<false, true>(bm, acc_ld, bn, S, lds, ops->v_columns.rows_from(b, hk, j0), acc.get(),
                                            acc_ld, 1.f, cut ? tile_gemm::Band::key_inner : tile_gemm::Band::none,
                                            pb.lo + i0 - j0, pb.hi + i0 - j0);
          }
        } else {
          const T* V = pb.v.at(b, hk) + j0 * pb.v.ld;
          gemm_rm<T>(pb.fortran_blas, false, false, bm, pb.Dv, bn, T(1), S, bn, V, pb.v.ld, T(1), acc.get(), pb.Dv);
        }
      }
      for (int64_t r = 0; r < bm; ++r) {
        const int64_t i = i0 + r;
        const bool empty_row = row_sum[r] == T(0);  // no key left: zeros and lse = +inf
        part.lse[b * part.lse_sb + h * part.lse_sh + i] =
            empty_row ? std::numeric_limits<T>::infinity() : row_max_[r] + std::log(row_sum[r]);
        scalar_t* o = part.out + b * part.out_sb + h * part.out_sh + i * part.out_si;
        const T inv = empty_row ? T(0) : T(1) / row_sum[r];
        const T* a = acc.get() + r * acc_ld;
        for (int64_t c = 0; c < pb.Dv; ++c) o[c] = static_cast<scalar_t>(a[c] * inv);
      }
    }
  });
}

// The one part of a dense call: out with the given (b, h, i) strides, lse contiguous (B, Hq, Lq).
template <typename T, typename scalar_t>
ForwardPart<T, scalar_t> dense_forward_part(const Problem<T>& pb, const TileOperands* ops, scalar_t* out,
                                            std::array<int64_t, 3> out_strides, T* lse) {
  return {&pb, ops, out, out_strides[0], out_strides[1], out_strides[2], lse, pb.Hq * pb.Lq, pb.Lq};
}

// ---- backward ---------------------------------------------------------------------------------

// A gradient accumulator in T: row i of (b, h) at rows(b, h, i), `width` columns (D, or Dv for dv,
// rounded up to a multiple of 16 for the register-blocked products), rows ld apart.
template <typename T>
struct Accumulator {
  T* data;
  int64_t sb, sh, ld, width;
  T* rows(int64_t b, int64_t h, int64_t i0) const { return data + b * sb + h * sh + i0 * ld; }
};

// A contiguous (B, H, L, width) accumulator.
template <typename T>
Accumulator<T> dense_accumulator(Tensor& acc) {
  return {acc.data_ptr<T>(), acc.stride(0), acc.stride(1), acc.stride(2), acc.size(3)};
}

template <typename T>
struct Grads {
  Matrices<T> dout;
  const T* lse;    // row i of (b, h) at lse[b * row_sb + h * row_sh + i]
  const T* delta;  // rowsum(dO * O) (- dlse), numbered as lse
  int64_t row_sb, row_sh;
  Accumulator<T> dq, dk, dv;
};

// One tile of queries [i0, i0 + bm) of head h against keys [j0, j0 + bn) of its kv head. tiles:
// register-blocked products (A operands from pb's q rows and g.dout, B operands from `ops`'
// panels; or, when ops->bf16 is set, AVX512-BF16 dot products over its bf16 layouts), else BLAS.
//
// The bf16 dot products (bfloat16 inputs, attention_bf16_dot.h) run the five products on bf16
// operands paired along their inner dimension, accumulating in float32:
//  S = scale Q K^T      A: q rows (pairs along D)         B: k key panels (pairs along D)
//  dP = dO V^T          A: dO rows (pairs along Dv)       B: v key panels (pairs along Dv)
//  dV += P_drop^T dO    A: P_drop^T in bf16 (pairs of queries)  B: dO column panels (pairs of queries)
//  dK += scale dS^T Q   A: dS^T in bf16 (pairs of queries)      B: q column panels (pairs of queries)
//  dQ += scale dS K     A: dS rows in bf16 (pairs of keys)      B: k column panels (pairs of keys)
// P and dS are rounded to bf16 only as operands of the gradient products (as GPU FlashAttention
// kernels do); the softmax recompute, dropout, delta, the cap's derivative, dmask and every
// accumulator stay float32. The transposed operands are rows of the tile's keys, ldt (the query
// block rounded up to even) apart, zero at the odd tile's last query + 1; their B panels start at
// the pair of the tile's first query i0 (a multiple of the even query block).
template <typename T, typename scalar_t, bool tiles>
struct BackwardTile {
  const Problem<T>* problem;  // the part the tiles run on (rebound from part to part)
  const Grads<T>* grads;
  const TileOperands* ops;
  scalar_t* dmask;  // contiguous (B, Hq, Lq, Lk), or null
  int64_t ld;       // row stride of the tiles below
  std::vector<T> p, dp, p_drop;
  std::vector<T> tanh_;  // the soft-cap's tanh of each score (softcap > 0 only)
  // bf16 dot products only: dS rows (bm x ld) and P_drop^T or dS^T (bn x ldt) in bf16
  int64_t ldt = 0;
  std::vector<uint16_t> rows16, cols16;

  static Blocks tile_blocks() {
    return tiles ? Blocks{bwd_tile_blocks().m, round16(bwd_tile_blocks().n)} : bwd_blas_blocks();
  }

  // (pb_'s dropout and softcap, and whether ops_ holds bf16 layouts, size the scratch: the same
  // for every part of a call)
  BackwardTile(const Problem<T>& pb_, const Grads<T>& g_, const TileOperands* ops_, scalar_t* dmask_)
      : problem(&pb_), grads(&g_), ops(ops_), dmask(dmask_), ld(tile_blocks().n),
        p(tile_blocks().m * ld), dp(tile_blocks().m * ld), p_drop(pb_.dropout_p > 0.0 ? tile_blocks().m * ld : 0),
        tanh_(pb_.softcap > T(0) ? tile_blocks().m * ld : 0) {
    if (ops_ && ops_->bf16) {
      ldt = (tile_blocks().m + 1) / 2 * 2;
      rows16.resize(tile_blocks().m * ld);
      cols16.resize(ld * ldt);
    }
  }

  void run(int64_t b, int64_t h, int64_t i0, int64_t bm, int64_t j0, int64_t bn, bool want_dkdv, bool want_dq) {
    using tile_gemm::Band;
    const Problem<T>& pb = *problem;
    const Grads<T>& g = *grads;
    const int64_t hk = h / pb.group();
    [[maybe_unused]] const Bf16Operands* bf = tiles ? ops->bf16 : nullptr;
    // (the bf16 dot products read q from bf's layouts)
    const T* Q = bf ? nullptr : pb.q.at(b, h) + i0 * pb.q.ld;
    // K and V rows for BLAS (the register-blocked products read `ops`' panels instead)
    [[maybe_unused]] const T* K = tiles ? nullptr : pb.k.at(b, hk) + j0 * pb.k.ld;
    [[maybe_unused]] const T* V = tiles ? nullptr : pb.v.at(b, hk) + j0 * pb.v.ld;
    const T* dO = g.dout.at(b, h) + i0 * g.dout.ld;
    const int64_t row0 = b * g.row_sb + h * g.row_sh + i0;  // of lse and delta
    const bool dropout = pb.dropout_p > 0.0;
    const uint32_t threshold = fused_attn::dropout_threshold(pb.dropout_p);
    const T inv_keep = static_cast<T>(1.0 / (1.0 - pb.dropout_p));
    // the band's edges cut this tile: the rows are tested, and the register-blocked products
    // pruned with the band in the tile's numbering (lo_t, hi_t)
    const bool cut = pb.straddles(i0, bm, j0, bn);
    [[maybe_unused]] const int64_t lo_t = pb.lo + i0 - j0, hi_t = pb.hi + i0 - j0;
    [[maybe_unused]] const auto prune = [&](Band role) { return cut ? role : Band::none; };
    T* dK = g.dk.rows(b, hk, j0);
    T* dV = g.dv.rows(b, hk, j0);
    T* dQ = g.dq.rows(b, h, i0);
    const bool capped = pb.softcap > T(0);
    T* tanh_tile = tanh_.data();
    const T slope = pb.alibi ? pb.alibi_slope(b, h) : T(0);

    // P = exp(cap(scale * Q K^T) + mask + alibi - lse), zero where masked or outside the band
    // (lse = +inf on empty rows gives 0). Register-blocked: score blocks outside the band are not
    // computed; the row loop zeroes them.
    T* P = p.data();
    if constexpr (tiles) {
      if (bf)  // over D rounded up to even: q's and k's padding are zero
        bf16_dot::product<false>(bm, round16(bn) / 16, bf->q.even, bf->q.rows(b, h, i0), bf->q.ld,
                                 bf->k_keys.keys_from(b, hk, j0), P, ld, pb.scale, prune(Band::key_columns), lo_t, hi_t);
      else
        tile_gemm::product<false, false>(bm, round16(bn), pb.D, Q, pb.q.ld, ops->k_keys.keys_from(b, hk, j0), P, ld,
                                         pb.scale, prune(Band::key_columns), lo_t, hi_t);
    } else {
      gemm_rm<T>(pb.fortran_blas, false, true, bm, bn, pb.D, pb.scale, Q, pb.q.ld, K, pb.k.ld, T(0), P, ld);
    }
    for (int64_t r = 0; r < bm; ++r) {
      const int64_t i = i0 + r;
      T* s = P + r * ld;
      const auto [c0, c1] = cut ? pb.visible(i, j0, bn) : std::pair<int64_t, int64_t>{0, bn};
      if (capped) row_softcap(s + c0, c1 - c0, pb.softcap, pb.inv_softcap, tanh_tile + r * ld + c0);
      if (pb.mask) apply_mask_row<T, scalar_t>(s + c0, c1 - c0, *pb.mask, b, h, i, j0 + c0);
      if (pb.alibi) row_alibi(s + c0, c1 - c0, slope, pb.alibi_diagonal(i, j0 + c0));
      row_exp_sum(s + c0, c1 - c0, g.lse[row0 + r]);
      std::fill(s, s + c0, T(0));
      std::fill(s + c1, s + bn, T(0));
    }
    // dP = dO V^T, then the dropout mask on both P (for dV) and dP
    T* dP = dp.data();
    if constexpr (tiles) {
      if (bf)
        bf16_dot::product<false>(bm, round16(bn) / 16, bf->dout.even, bf->dout.rows(b, h, i0), bf->dout.ld,
                                 bf->v_keys.keys_from(b, hk, j0), dP, ld, 1.f, prune(Band::key_columns), lo_t, hi_t);
      else
        tile_gemm::product<false, false>(bm, round16(bn), pb.Dv, dO, g.dout.ld, ops->v_keys.keys_from(b, hk, j0), dP, ld,
                                         1.f, prune(Band::key_columns), lo_t, hi_t);
      if (cut)  // skipped blocks hold garbage; dS = P * (dP - D) must see finite values there
        for (int64_t r = 0; r < bm; ++r) {
          const auto [c0, c1] = pb.visible(i0 + r, j0, bn);
          std::fill(dP + r * ld, dP + r * ld + c0, T(0));
          std::fill(dP + r * ld + c1, dP + r * ld + bn, T(0));
        }
    } else {
      gemm_rm<T>(pb.fortran_blas, false, true, bm, bn, pb.Dv, T(1), dO, g.dout.ld, V, pb.v.ld, T(0), dP, ld);
    }
    const T* P_used = P;
    if (dropout) {
      for (int64_t r = 0; r < bm; ++r) {
        const uint32_t key = pb.dropout_key(b, h, i0 + r);
        row_dropout(P + r * ld, p_drop.data() + r * ld, bn, key, static_cast<uint32_t>(j0), threshold, inv_keep);
        row_dropout(dP + r * ld, dP + r * ld, bn, key, static_cast<uint32_t>(j0), threshold, inv_keep);
      }
      P_used = p_drop.data();
    }
    if (want_dkdv) {  // dV += P_drop^T dO
      if constexpr (tiles) {
        if (bf) {  // P_drop (zero outside the band and past bn on [0, bn)) transposed into bf16 pairs of queries
          bf16_dot::convert_transposed(P_used, ld, bm, bn, cols16.data(), ldt);
          bf16_dot::product<true>(bn, g.dv.width / 16, bm, cols16.data(), ldt, bf->dout_columns.rows_from(b, h, i0), dV,
                                  g.dv.ld, 1.f, prune(Band::query_inner), lo_t, hi_t);
        } else {
          tile_gemm::product<true, true>(bn, g.dv.width, bm, P_used, ld, ops->dout_columns.rows_from(b, h, i0), dV, g.dv.ld, 1.f,
                                         prune(Band::query_inner), lo_t, hi_t);
        }
      } else {
        gemm_rm<T>(pb.fortran_blas, true, false, bn, pb.Dv, bm, T(1), P_used, ld, dO, g.dout.ld, T(1), dV, g.dv.ld);
      }
    }
    // dS = P * (dP - delta), in place in dP
    for (int64_t r = 0; r < bm; ++r) row_softmax_bwd(P + r * ld, dP + r * ld, bn, g.delta[row0 + r]);
    if (dmask) {
      for (int64_t r = 0; r < bm; ++r) {
        scalar_t* dm = dmask + ((b * pb.Hq + h) * pb.Lq + i0 + r) * pb.Lk + j0;
        const T* ds = dP + r * ld;
        for (int64_t c = 0; c < bn; ++c) dm[c] = static_cast<scalar_t>(ds[c]);
      }
    }
    // the soft-cap's backward: dS_raw = dS * (1 - t^2) on the visible columns (dS is 0 elsewhere)
    if (capped)
      for (int64_t r = 0; r < bm; ++r) {
        const auto [c0, c1] = cut ? pb.visible(i0 + r, j0, bn) : std::pair<int64_t, int64_t>{0, bn};
        row_softcap_bwd(dP + r * ld + c0, tanh_tile + r * ld + c0, c1 - c0);
      }
    if (want_dkdv) {  // dK += scale * dS_raw^T Q
      if constexpr (tiles) {
        if (bf) {
          bf16_dot::convert_transposed(dP, ld, bm, bn, cols16.data(), ldt);
          bf16_dot::product<true>(bn, g.dk.width / 16, bm, cols16.data(), ldt, bf->q_columns.rows_from(b, h, i0), dK,
                                  g.dk.ld, pb.scale, prune(Band::query_inner), lo_t, hi_t);
        } else {
          tile_gemm::product<true, true>(bn, g.dk.width, bm, dP, ld, ops->q_columns.rows_from(b, h, i0), dK, g.dk.ld, pb.scale,
                                         prune(Band::query_inner), lo_t, hi_t);
        }
      } else {
        gemm_rm<T>(pb.fortran_blas, true, false, bn, pb.D, bm, pb.scale, dP, ld, Q, pb.q.ld, T(1), dK, g.dk.ld);
      }
    }
    if (want_dq) {  // dQ += scale * dS_raw K
      if constexpr (tiles) {
        if (bf) {  // dS rows in bf16, zero on [bn, ld): the pairs of the last keys
          bf16_dot::convert_rows(dP, ld, bm, bn, rows16.data(), ld);
          bf16_dot::product<true>(bm, g.dq.width / 16, bn, rows16.data(), ld, bf->k_columns.rows_from(b, hk, j0), dQ,
                                  g.dq.ld, pb.scale, prune(Band::key_inner), lo_t, hi_t);
        } else {
          tile_gemm::product<false, true>(bm, g.dq.width, bn, dP, ld, ops->k_columns.rows_from(b, hk, j0), dQ, g.dq.ld, pb.scale,
                                          prune(Band::key_inner), lo_t, hi_t);
        }
      } else {
        gemm_rm<T>(pb.fortran_blas, false, false, bm, pb.D, bn, pb.scale, dP, ld, K, pb.k.ld, T(1), dQ, g.dq.ld);
      }
    }
  }
};

// Whole kv heads per unit when they spread evenly over the threads; two passes otherwise.
// kv_heads: the (batch row or sequence, kv head) pairs of the call.
inline bool backward_per_head(int64_t kv_heads) {
  const int64_t threads = at::get_num_threads();
  return kv_heads >= threads && (kv_heads % threads == 0 || kv_heads >= 4 * threads);
}

// One attention problem of a backward call (a dense call's B batch rows, or one varlen sequence):
// its Problem and Grads, and the register-blocked products' B operands, laid out up front (ops)
// or, in the per-head schedule, by each unit from `sources` (else both null: BLAS).
template <typename T, typename scalar_t>
struct BackwardPart {
  const Problem<T>* pb;
  const Grads<T>* g;
  const TileOperands* ops;
  const HeadSources<scalar_t>* sources;
};

// per_head: backward_per_head(...), decided once by the caller, which lays out the operands to
// match. Each schedule's units (per part: (b, kv head), or (b, kv head, key block) and (b, query
// head, query block)) of every part go to one at::parallel_for; a thread's tile moves from part to
// part. dmask (dense calls only, one part) is the (B, Hq, Lq, Lk) additive mask's gradient.
template <typename T, typename scalar_t, bool tiles>
void backward_kernel(const std::vector<BackwardPart<T, scalar_t>>& parts, bool per_head, scalar_t* dmask) {
  using Tile = BackwardTile<T, scalar_t, tiles>;
  if (parts.empty()) return;
  const int64_t BM = Tile::tile_blocks().m, BN = Tile::tile_blocks().n;
  const Problem<T>& pb0 = *parts[0].pb;  // the options every part shares
  const int64_t G = pb0.group();
  // ~5 products of 2 * BM * BN * D flops per tile
  const double tile_flops = 10.0 * BM * BN * std::max<int64_t>(pb0.D, pb0.Dv);
  // Units of one schedule's pass: first[p] = the first unit of part p; the grain from the tiles of
  // the average unit.
  struct Units {
    std::vector<int64_t> first;
    std::vector<double> cost;  // of one unit of each part, in tiles
    int64_t grain;
  };
  const auto units_of = [&](auto units_and_tiles) {
    Units out{std::vector<int64_t>(parts.size() + 1, 0), std::vector<double>(parts.size()), 1};
    double tiles_all = 0.0;
    for (size_t p = 0; p < parts.size(); ++p) {
      const auto [units, tiles_per_unit] = units_and_tiles(*parts[p].pb);
      out.first[p + 1] = out.first[p] + units;
      out.cost[p] = tiles_per_unit;
      tiles_all += static_cast<double>(units) * tiles_per_unit;
    }
    const int64_t total = out.first.back();
    out.grain = grain_for(tile_flops * (total ? tiles_all / static_cast<double>(total) : 0.0));
    return out;
  };
  // Runs unit(tile, part, index within the part, head buffer) for every unit, in one parallel_for
  // (the head buffer: where the per-head schedule's units lay out their head, reused by a thread).
  const auto run_units = [&](const Units& units, scalar_t* tile_dmask, auto unit) {
    if (units.first.back() == 0) return;
    parallel_over_units(units.first, units.cost, units.grain, [&](int64_t begin, int64_t end) {
      SequentialBlas sequential_blas;
      Tile tile(pb0, *parts[0].g, parts[0].ops, tile_dmask);
      scratch::Block head_buffer;
      for (int64_t u = begin, p = part_of(units.first, begin); u < end; ++u) {
        while (u >= units.first[p + 1]) ++p;
        tile.problem = parts[p].pb;
        tile.grads = parts[p].g;
        tile.ops = parts[p].ops;
        unit(tile, parts[p], u - units.first[p], head_buffer);
      }
    });
  };

  // The tiles' keys. Register-blocked: pass 1 runs key block kb whole, (kb * BN, min(BN, Lk -
  // kb * BN)); the per-head schedule and pass 2 run a query block against the keys the band shows
  // it, from a multiple of 16 (where the key panels start), BN at a time. These products give the
  // same bits for any tile shape.
  // BLAS: every schedule runs query block [i0, i0 + bm) against key block kb on the keys of that
  // block some row of the query block sees (seen_keys; bn > 0 for every pair the schedules run),
  // so that each product has the same (i0, bm, j0, bn) in every schedule: MKL's summation order
  // follows the operands' shapes, and the schedule follows the thread count (backward_per_head),
  // so differently cut tiles made float64 dK and dV differ in the last bit between
  // torch.set_num_threads(1) and (2), against the bitwise reproducibility README.md promises.
  // (Trimmed to the keys seen, not whole key blocks: pass 1 skips keys no row of the query block
  // sees, and the per-head schedule runs no more keys than before.) The tile's row loop cuts the
  // keys the band hides from each row (straddles, visible), as in any tile.
  [[maybe_unused]] const auto seen_keys = [&](const Problem<T>& pb, int64_t i0, int64_t bm, int64_t kb) {
    const auto [key_begin, key_end] = pb.keys_seen(i0, i0 + bm);
    const int64_t j0 = std::max(kb * BN, key_begin);
    return std::pair<int64_t, int64_t>{j0, std::min((kb + 1) * BN, key_end) - j0};
  };
  // The per-head schedule's and pass 2's tiles of query block [i0, i0 + bm): tile_at(j0, bn) for
  // each, ascending.
  const auto for_key_tiles = [&](const Problem<T>& pb, int64_t i0, int64_t bm, auto tile_at) {
    const auto [key_begin, key_end] = pb.keys_seen(i0, i0 + bm);
    if constexpr (tiles) {
      for (int64_t j0 = key_begin / 16 * 16; j0 < key_end; j0 += BN) tile_at(j0, std::min(BN, key_end - j0));
    } else {
      for (int64_t kb = key_begin / BN; key_begin < key_end && kb * BN < key_end; ++kb) {
        const auto [j0, bn] = seen_keys(pb, i0, bm, kb);
        tile_at(j0, bn);
      }
    }
  };

  if (per_head) {
    const Units units = units_of([&](const Problem<T>& pb) {
      return std::pair<int64_t, double>{pb.B * pb.Hkv, double(G) * ceil_div(pb.Lq, BM) * ceil_div(pb.Lk, BN)};
    });
    run_units(units, dmask, [&](Tile& tile, const BackwardPart<T, scalar_t>& part, int64_t unit,
                                scratch::Block& head_buffer) {
      const Problem<T>& pb = *part.pb;
      const int64_t b = unit / pb.Hkv, hk = unit % pb.Hkv;
      TileOperands head_ops;
      if (part.sources) {
        head_ops = part.sources->pack(b, hk, G, head_buffer);
        tile.ops = &head_ops;
      }
      const int64_t n_qblocks = ceil_div(pb.Lq, BM);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
        for (int64_t qb = 0; qb < n_qblocks; ++qb) {
          const int64_t i0 = qb * BM, bm = std::min(BM, pb.Lq - i0);
          for_key_tiles(pb, i0, bm, [&](int64_t j0, int64_t bn) { tile.run(b, h, i0, bm, j0, bn, true, true); });
        }
      tile.ops = part.ops;  // (head_ops ends here)
    });
    return;
  }
  // pass 1: dK, dV by key blocks
  const Units key_units = units_of([&](const Problem<T>& pb) {
    return std::pair<int64_t, double>{pb.B * pb.Hkv * ceil_div(pb.Lk, BN), double(G) * ceil_div(pb.Lq, BM)};
  });
  run_units(key_units, nullptr, [&](Tile& tile, const BackwardPart<T, scalar_t>& part, int64_t unit,
                                    scratch::Block&) {
    const Problem<T>& pb = *part.pb;
    const int64_t n_kblocks = ceil_div(pb.Lk, BN);
    const int64_t bhk = unit / n_kblocks, kb = zigzag(unit % n_kblocks, n_kblocks);
    const int64_t b = bhk / pb.Hkv, hk = bhk % pb.Hkv;
    const int64_t j0 = kb * BN, bn = std::min(BN, pb.Lk - j0);
    // only the query blocks holding rows the band shows these keys to (none: dK, dV stay zero)
    const auto [query_begin, query_end] = pb.queries_seeing(j0, j0 + bn);
    const int64_t qb_end = query_begin < query_end ? ceil_div(query_end, BM) : 0;
    for (int64_t h = hk * G; h < (hk + 1) * G; ++h)
      for (int64_t qb = query_begin / BM; qb < qb_end; ++qb) {
        const int64_t i0 = qb * BM, bm = std::min(BM, pb.Lq - i0);
        if constexpr (tiles) {
          tile.run(b, h, i0, bm, j0, bn, true, false);
        } else {  // (the keys of the block the query block sees: see seen_keys)
          const auto [j0_seen, bn_seen] = seen_keys(pb, i0, bm, kb);
          tile.run(b, h, i0, bm, j0_seen, bn_seen, true, false);
        }
      }
  });
  // pass 2: dQ (and dmask) by query blocks
  const Units query_units = units_of([&](const Problem<T>& pb) {
    return std::pair<int64_t, double>{pb.B * pb.Hq * ceil_div(pb.Lq, BM), double(ceil_div(pb.Lk, BN))};
  });
  run_units(query_units, dmask, [&](Tile& tile, const BackwardPart<T, scalar_t>& part, int64_t unit,
                                    scratch::Block&) {
    const Problem<T>& pb = *part.pb;
    const int64_t n_qblocks = ceil_div(pb.Lq, BM);
    const int64_t bh = unit / n_qblocks, qb = zigzag(unit % n_qblocks, n_qblocks);
    const int64_t b = bh / pb.Hq, h = bh % pb.Hq;
    const int64_t i0 = qb * BM, bm = std::min(BM, pb.Lq - i0);
    for_key_tiles(pb, i0, bm, [&](int64_t j0, int64_t bn) { tile.run(b, h, i0, bm, j0, bn, false, true); });
  });
}

// ---- entry points -----------------------------------------------------------------------------

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// The lse's dtype (ops_common.lse_dtype): the compute type, float32, or float64 for float64 inputs
// (so the returned lse, the sinks applied through it and merges of float64 parts keep float64's
// precision, and the backward reads it as it was computed).
at::ScalarType lse_dtype(const Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The scalar options every attention op takes; `what` names the op in the message.
void check_options(const char* what, double dropout_p, double scale, double softcap) {
  FA_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, what, ": dropout_p must be in [0, 1), got ", dropout_p);
  FA_CHECK(std::isfinite(scale), what, ": scale must be finite, got ", scale);
  FA_CHECK(std::isfinite(softcap) && softcap >= 0.0, what,
           ": softcap must be finite and >= 0 (0 turns the logit cap off), got ", softcap);
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& attn_mask,
                  double dropout_p, double scale, double softcap, const std::optional<Tensor>& alibi_slopes) {
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    FA_CHECK(t->defined(), "attention (cpu): ", name, " is undefined");
    FA_CHECK(t->device().is_cpu(), "attention (cpu): ", name, " must be a CPU tensor, got ", t->device());
    FA_CHECK(t->dim() == 4, "attention (cpu): ", name, " must be 4-D (B, H, L, D), got shape ", t->sizes());
    FA_CHECK(t->scalar_type() == q.scalar_type(), "attention (cpu): ", name, " has dtype ", t->scalar_type(),
                " but q has ", q.scalar_type());
  }
  FA_CHECK(is_supported_dtype(q.scalar_type()),
              "attention (cpu): q/k/v must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  FA_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "attention (cpu): batch sizes differ: q ", q.sizes(),
              ", k ", k.sizes(), ", v ", v.sizes());
  FA_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2),
              "attention (cpu): k and v must agree in heads and length, got k ", k.sizes(), ", v ", v.sizes());
  FA_CHECK(k.size(3) == q.size(3), "attention (cpu): q and k must have the same head dim, got q ", q.sizes(),
              ", k ", k.sizes());
  FA_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "attention (cpu): query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
  check_options("attention (cpu)", dropout_p, scale, softcap);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const Tensor& m = *attn_mask;
    FA_CHECK(m.device().is_cpu(), "attention (cpu): attn_mask must be a CPU tensor, got ", m.device());
    FA_CHECK(m.scalar_type() == at::kBool || m.scalar_type() == q.scalar_type(),
                "attention (cpu): attn_mask must be bool or q's dtype ", q.scalar_type(), ", got ", m.scalar_type());
    FA_CHECK(m.dim() == 4 && m.size(0) == q.size(0) && m.size(1) == q.size(1) && m.size(2) == q.size(2) &&
                    m.size(3) == k.size(2),
                "attention (cpu): attn_mask must be a (B, Hq, Lq, Lk) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
                ", ", k.size(2), ") view (expand broadcast dims), got shape ", m.sizes());
  }
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const Tensor& a = *alibi_slopes;
    FA_CHECK(a.device().is_cpu(), "attention (cpu): alibi_slopes must be a CPU tensor, got ", a.device());
    FA_CHECK(a.scalar_type() == at::kFloat, "attention (cpu): alibi_slopes must be float32, got ", a.scalar_type());
    FA_CHECK(a.dim() == 2 && a.size(0) == q.size(0) && a.size(1) == q.size(1),
             "attention (cpu): alibi_slopes must be a (B, Hq) = (", q.size(0), ", ", q.size(1),
             ") tensor (expand a (Hq,) one), got shape ", a.sizes());
  }
}

// Shapes and options of the call, from the inputs as given; the rows the kernels read are set
// by with_rows.
template <typename T>
Problem<T> make_problem(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& attn_mask,
                        int64_t band_lo, int64_t band_hi, double dropout_p, double scale, int64_t seed,
                        int64_t offset, double softcap, const std::optional<Tensor>& alibi_slopes,
                        bool bottom_right, GemmMode mode) {
  Problem<T> pb;
  pb.fortran_blas = use_fortran_blas(mode);
  pb.B = q.size(0);
  pb.Hq = q.size(1);
  pb.Lq = q.size(2);
  pb.D = q.size(3);
  pb.Hkv = k.size(1);
  pb.Lk = k.size(2);
  pb.Dv = v.size(3);
  if (attn_mask.has_value() && attn_mask->defined()) {
    const Tensor& m = *attn_mask;
    pb.mask = MaskView{m.const_data_ptr(), m.scalar_type() == at::kBool, m.stride(0), m.stride(1), m.stride(2),
                       m.stride(3)};
  }
  pb.set_band(band_lo, band_hi);  // after Lq, Lk: clamped to [-Lq, Lk]
  pb.scale = static_cast<T>(scale);
  FA_CHECK(std::isfinite(pb.scale), "attention (cpu): scale ", scale, " is out of the computation's range (",
           sizeof(T) == 4 ? "float32" : "float64", ")");
  if (softcap > 0.0) {
    pb.softcap = static_cast<T>(softcap);
    pb.inv_softcap = static_cast<T>(1.0 / softcap);
    // (a cap that rounds to inf gives inf * tanh(s / inf) = NaN; one whose inverse does, 0 * inf)
    FA_CHECK(pb.softcap > T(0) && std::isfinite(pb.softcap) && std::isfinite(pb.inv_softcap),
             "attention (cpu): softcap ", softcap, " is out of the computation's range (",
             sizeof(T) == 4 ? "float32" : "float64", ")");
  }
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const Tensor& a = *alibi_slopes;
    pb.alibi = a.const_data_ptr<float>();
    pb.alibi_sb = a.stride(0);
    pb.alibi_sh = a.stride(1);
    pb.alibi_shift = bottom_right ? pb.Lk - pb.Lq : 0;
  }
  pb.dropout_p = dropout_p;
  pb.seed = static_cast<uint64_t>(seed);
  pb.offset = static_cast<uint64_t>(offset);
  return pb;
}

// The q/k/v rows the kernels read, in the accumulation dtype (a path that does not read some of
// them passes an undefined tensor).
template <typename T>
Problem<T> with_rows(Problem<T> pb, const Tensor& q_rows, const Tensor& k_rows, const Tensor& v_rows) {
  if (q_rows.defined()) pb.q = matrices<T>(q_rows);
  if (k_rows.defined()) pb.k = matrices<T>(k_rows);
  if (v_rows.defined()) pb.v = matrices<T>(v_rows);
  return pb;
}

// The forward with the register-blocked products (float32 compute; pb holds the q rows), or, with
// bf16_products (bfloat16 inputs), with AVX512-BF16 dot products on bf16 layouts of q, k and v (pb's q
// rows unused).
template <typename scalar_t, typename acc_t>
void forward_tiles(const Problem<acc_t>& pb, const Tensor& q, const Tensor& k, const Tensor& v, bool bf16_products,
                   bool bf16_rows, scalar_t* out, std::array<int64_t, 3> out_strides, float* lse) {
  if constexpr (std::is_same_v<acc_t, float>) {
    TileOperands ops;
    std::unique_ptr<Bf16Operands> bf;
    if (bf16_products) {
      FA_CHECK(q.scalar_type() == at::kBFloat16, "attention (cpu): the bf16 dot products need bfloat16 inputs");
      bf = make_bf16_operands(q, k, v, bf16_rows);
      ops.bf16 = bf.get();
    } else {
      ops.k_keys = make_panels<scalar_t>(k, true);
      ops.v_columns = make_panels<scalar_t>(v, false);
    }
    forward_kernel<float, scalar_t, true>({dense_forward_part(pb, &ops, out, out_strides, lse)});
  } else {
    FA_CHECK(false, "attention (cpu): the register-blocked products are float32");
  }
}

// The backward with the register-blocked products (float32 compute; pb holds the q rows, g the
// dout rows and accumulators 16-column multiples wide), or, with bf16_products (bfloat16 inputs),
// with AVX512-BF16 dot products on bf16 layouts of q, k, v and dout (pb's q rows unused).
template <typename scalar_t, typename acc_t>
void backward_tiles(const Problem<acc_t>& pb, const Grads<acc_t>& g, const Tensor& q, const Tensor& k,
                    const Tensor& v, const Tensor& dout, bool per_head, bool bf16_products, scalar_t* dmask) {
  if constexpr (std::is_same_v<acc_t, float>) {
    // float32 panels, per-head schedule: each unit lays out its own head; two passes: everything
    // up front. bf16 layouts (half the bytes): everything up front for both schedules.
    std::optional<HeadSources<scalar_t>> sources;
    TileOperands ops;
    std::unique_ptr<Bf16Operands> bf;
    if (bf16_products) {
      FA_CHECK(q.scalar_type() == at::kBFloat16, "attention_bwd (cpu): the bf16 dot products need bfloat16 inputs");
      bf = make_bf16_backward_operands(q, k, v, dout);
      ops.bf16 = bf.get();
    } else if (per_head) {
      sources.emplace(q, k, v, dout);
    } else {
      ops.k_keys = make_panels<scalar_t>(k, true);
      ops.v_keys = make_panels<scalar_t>(v, true);
      ops.dout_columns = make_panels<scalar_t>(dout, false);
      ops.q_columns = make_panels<scalar_t>(q, false);
      ops.k_columns = make_panels<scalar_t>(k, false);
    }
    backward_kernel<float, scalar_t, true>({{&pb, &g, sources ? nullptr : &ops, sources ? &*sources : nullptr}},
                                           per_head, dmask);
  } else {
    FA_CHECK(false, "attention (cpu): the register-blocked products are float32");
  }
}

// A gradient accumulator (B, H, L, width >= cols) returned as its first cols columns, contiguous,
// in the input dtype.
Tensor finish_grad(const Tensor& grad_acc, int64_t cols, at::ScalarType dtype) {
  // The accumulator's first cols columns in the input dtype, contiguous: the accumulator itself
  // when it already is that, else a copy into an output from the scratch cache (as the
  // accumulator: kept and taken back from step to step, not faulted in afresh).
  const Tensor g = grad_acc.narrow(-1, 0, cols);
  if (g.scalar_type() == dtype && g.is_contiguous()) return g;
  Tensor out = scratch::empty(g.sizes(), dtype);
  out.copy_(g);
  return out;
}

// Whether a call in the automatic mode runs its products with BLAS instead of the register-blocked
// kernels, as a decoding step does (few_query_rows: the panels' layout would cost more than it
// saves) where every query sees every key (the register-blocked products skip the blocks a band
// hides, BLAS on whole tiles would read them, and an inf there would reach P V as NaN). pbs: the
// call's problems (the dense op's one; the packed op's one per sequence that runs). packed: the
// varlen op, which takes BLAS only for float32 k and v that need no copy (as_blas_operand would
// convert or copy every packed row, the cache's unused ones too); the dense op takes it for any
// dtype but bfloat16 on the AVX512-BF16 dot products (which read K and V as rows: decode_rows).
// The forward and the backward of a call both ask this, with the same inputs, so they run the
// same products: the backward recomputes P = exp(s - lse) against the forward's lse, and the two
// paths sum a score's products in different orders, so with the other path's scores a sharp
// softmax row of P no longer sums to 1 (float32 decoding gradients were off by ~1e-5 relative,
// several times the oracle's bound, while each path on its own passes with a wide margin).
template <typename T>
bool decode_takes_blas(GemmMode mode, c10::ArrayRef<Problem<T>> pbs, const Tensor& q, const Tensor& k,
                       const Tensor& v, bool packed) {
  if (mode != GemmMode::automatic || pbs.empty()) return false;
  int64_t max_lq = 0;
  for (const Problem<T>& pb : pbs) {
    if (pb.banded()) return false;
    max_lq = std::max(max_lq, pb.Lq);
  }
  if (!few_query_rows(max_lq, pbs[0].Hq, pbs[0].Hkv)) return false;
  return packed ? q.scalar_type() == c10::CppTypeToScalarType<T>::value && blas_ready(k) && blas_ready(v)
                : !use_bf16_dot(q.scalar_type(), true);
}

std::tuple<Tensor, Tensor> attention_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const std::optional<Tensor>& attn_mask, int64_t band_lo, int64_t band_hi,
                                             double dropout_p, double scale, int64_t seed, int64_t offset,
                                             double softcap, const std::optional<Tensor>& alibi_slopes,
                                             bool bottom_right) {
  check_inputs(q, k, v, attn_mask, dropout_p, scale, softcap, alibi_slopes);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), Dv = v.size(3);
  // (outputs from the scratch cache's allocator: csrc/cpu/scratch.h)
  Tensor out = scratch::empty({B, Lq, Hq, Dv}, q.scalar_type()).transpose(1, 2);
  Tensor lse = scratch::empty({B, Hq, Lq}, lse_dtype(q));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const GemmMode mode = gemm_mode();
  FA_DISPATCH_FLOATING(q.scalar_type(), "attention_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Problem<acc_t> shape = make_problem<acc_t>(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed,
                                                     offset, softcap, alibi_slopes, bottom_right, mode);
    const std::array<int64_t, 3> out_strides{out.stride(0), out.stride(1), out.stride(2)};
    // Decoding (few_query_rows, automatic mode): float32 compute takes BLAS where every query sees
    // every key (decode_takes_blas, which the backward asks too); bfloat16 with the AVX512-BF16
    // dot products reads k and v as rows (decode_rows, any band).
    const bool decoding = mode == GemmMode::automatic && few_query_rows(Lq, Hq, k.size(1));
    const bool tiles = std::is_same_v<acc_t, float> && use_tile_kernels(mode) &&
                       !decode_takes_blas<acc_t>(mode, shape, q, k, v, false);
    const bool bf16_products = use_bf16_dot(q.scalar_type(), tiles);
    const bool bf16_rows = bf16_products && decoding && decode_rows(Lq, Hq, k.size(1)) && can_read_rows(k) &&
                           can_read_rows(v);
    // named: pb points into them (the register-blocked products read k and v from their panels;
    // the bf16 dot products q too)
    const Tensor qa = bf16_products ? Tensor() : as_blas_operand(q, acc);
    const Tensor ka = tiles ? Tensor() : as_blas_operand(k, acc), va = tiles ? Tensor() : as_blas_operand(v, acc);
    const Problem<acc_t> pb = with_rows(shape, qa, ka, va);
    if (tiles)
      forward_tiles<scalar_t>(pb, q, k, v, bf16_products, bf16_rows, out.data_ptr<scalar_t>(), out_strides,
                              lse.data_ptr<float>());
    else
      forward_kernel<acc_t, scalar_t, false>(
          {dense_forward_part(pb, nullptr, out.data_ptr<scalar_t>(), out_strides, lse.data_ptr<acc_t>())});
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> attention_bwd_cpu(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                             const Tensor& v, const Tensor& out, const Tensor& lse,
                                                             const std::optional<Tensor>& attn_mask, int64_t band_lo,
                                                             int64_t band_hi, double dropout_p, double scale, int64_t seed,
                                                             int64_t offset, bool mask_grad, double softcap,
                                                             const std::optional<Tensor>& alibi_slopes,
                                                             bool bottom_right, const std::optional<Tensor>& dlse) {
  check_inputs(q, k, v, attn_mask, dropout_p, scale, softcap, alibi_slopes);
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), Lk = k.size(2), Dv = v.size(3);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"dout", &dout}, {"out", &out}}) {
    FA_CHECK(t->defined() && t->device().is_cpu(), "attention_bwd (cpu): ", name, " must be a CPU tensor");
    FA_CHECK(t->scalar_type() == q.scalar_type(), "attention_bwd (cpu): ", name, " must have q's dtype ",
                q.scalar_type(), ", got ", t->scalar_type());
    FA_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == Hq && t->size(2) == Lq && t->size(3) == Dv,
                "attention_bwd (cpu): ", name, " must have shape (B, Hq, Lq, Dv) = (", B, ", ", Hq, ", ", Lq, ", ",
                Dv, "), got ", t->sizes());
  }
  FA_CHECK(lse.defined() && lse.device().is_cpu() && lse.scalar_type() == lse_dtype(q) && lse.dim() == 3 &&
                  lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Lq,
              "attention_bwd (cpu): lse must be a ", lse_dtype(q), " CPU tensor of shape (B, Hq, Lq) = (", B, ", ", Hq,
              ", ", Lq, "), got ", lse.scalar_type(), " ", lse.sizes());
  const bool has_dlse = dlse.has_value() && dlse->defined();
  FA_CHECK(!has_dlse || (dlse->device().is_cpu() && dlse->scalar_type() == lse_dtype(q) && dlse->sizes() == lse.sizes()),
              "attention_bwd (cpu): dlse must be None or a ", lse_dtype(q), " CPU tensor of lse's shape (", B, ", ", Hq,
              ", ", Lq, "), got ", has_dlse ? dlse->scalar_type() : lse_dtype(q), " ", has_dlse ? dlse->sizes() : lse.sizes());
  const bool has_mask = attn_mask.has_value() && attn_mask->defined();
  FA_CHECK(!mask_grad || (has_mask && attn_mask->scalar_type() != at::kBool),
              "attention_bwd (cpu): mask_grad needs an additive (floating) attn_mask");

  Tensor dmask = mask_grad ? at::zeros({B, Hq, Lq, Lk}, q.options()) : at::empty({0}, q.options());
  Tensor dq, dk, dv;
  const GemmMode mode = gemm_mode();
  FA_DISPATCH_FLOATING(q.scalar_type(), "attention_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Problem<acc_t> shape = make_problem<acc_t>(q, k, v, attn_mask, band_lo, band_hi, dropout_p, scale, seed,
                                                     offset, softcap, alibi_slopes, bottom_right, mode);
    scalar_t* dmask_data = mask_grad ? dmask.data_ptr<scalar_t>() : nullptr;
    const int64_t D = q.size(3), Hkv = k.size(1);
    // the products the forward ran (decode_takes_blas): P is recomputed against its lse
    const bool tiles = std::is_same_v<acc_t, float> && use_tile_kernels(mode) &&
                       !decode_takes_blas<acc_t>(mode, shape, q, k, v, false);
    // bf16 dot products: the query tiles' pairs of queries start at their first query, a multiple
    // of the query block, so they need an even block (FUSED_ATTN_CPU_BWD_BM odd: float32 panels)
    const bool bf16_products = use_bf16_dot(q.scalar_type(), tiles) && bwd_tile_blocks().m % 2 == 0;
    // (the bf16 dot products read q and dout from their bf16 layouts; dout_a is delta's)
    const Tensor qa = bf16_products ? Tensor() : as_blas_operand(q, acc), dout_a = as_blas_operand(dout, acc);
    // (the register-blocked products read k and v from their panels)
    const Tensor ka = tiles ? Tensor() : as_blas_operand(k, acc), va = tiles ? Tensor() : as_blas_operand(v, acc);
    const Problem<acc_t> pb = with_rows(shape, qa, ka, va);
    // delta = rowsum(dO * O): the softmax backward's correction (with dropout too: O is the
    // dropped output, and sum_j P_drop dP = dO . O). The lse's gradient joins it as delta - dlse
    // (d lse_i / d s_ij = P_ij, so dS = P (dP - delta + dlse)).
    Tensor delta = at::sum(dout_a * out.to(acc), {-1});
    if (has_dlse) delta = delta - dlse->to(acc);
    delta = delta.contiguous();
    const Tensor lse_acc = lse.contiguous();  // (in acc_t: the forward wrote it so)
    // accumulator rows: the register-blocked products write whole 16-column panels
    const int64_t dw = tiles ? round16(D) : D, dvw = tiles ? round16(Dv) : Dv;
    Tensor dq_acc = scratch::zeros({B, Hq, Lq, dw}, acc);
    Tensor dk_acc = scratch::zeros({B, Hkv, Lk, dw}, acc);
    Tensor dv_acc = scratch::zeros({B, Hkv, Lk, dvw}, acc);
    const Grads<acc_t> g{matrices<acc_t>(dout_a), lse_acc.const_data_ptr<acc_t>(), delta.const_data_ptr<acc_t>(),
                         Hq * Lq, Lq, dense_accumulator<acc_t>(dq_acc), dense_accumulator<acc_t>(dk_acc),
                         dense_accumulator<acc_t>(dv_acc)};
    const bool per_head = backward_per_head(B * Hkv);
    if (tiles)
      backward_tiles<scalar_t>(pb, g, q, k, v, dout, per_head, bf16_products, dmask_data);
    else
      backward_kernel<acc_t, scalar_t, false>({{&pb, &g, nullptr, nullptr}}, per_head, dmask_data);
    dq = finish_grad(dq_acc, D, q.scalar_type());
    dk = finish_grad(dk_acc, D, q.scalar_type());
    dv = finish_grad(dv_acc, Dv, q.scalar_type());
  });
  return {dq, dk, dv, dmask};
}

// ---- varlen (packed) attention ----------------------------------------------------------------
//
// fused_attn_C::attention_varlen_fwd / _bwd (csrc/ops.cpp). Sequence s holds query rows
// cu_q[s]:cu_q[s+1] and key rows cu_k[s]:cu_k[s] + Lk_s (Lk_s = seqused_k[s], else every key up to
// cu_k[s+1]) of packed (total, heads, dim) tensors. Each sequence is one part of the kernels
// above: a Problem of batch 1 whose rows start at the sequence's first row, with the sequence's
// own band (ops_common.sequence_band: bottom-right shifts it by the sequence's Lk - Lq), ALiBi row
// and shift, and dropout offset offset + Hq * cu_q[s] (ops_common.varlen_rng_offset, so its rows
// draw the mask the dense op draws for that sequence alone). The operands are laid out per
// sequence, every sequence's in one buffer per operand; outputs and gradients are written in
// place in the packed layouts. So every tile is the one the dense op computes for the sequence on
// its own (what the base backend's Python loop does), but the units of all sequences share one
// at::parallel_for: no per-sequence launches, views or copies.
// Sequences without queries or keys run no unit: their output rows are zero, their lse +inf and
// their gradients zero (as are those of keys past seqused_k, which are never read).

// One sequence: its index and where its query and (used) key rows are.
struct Sequence {
  int64_t index, q0, Lq, k0, Lk;
};

// Entries of a 1-D int32/int64 CPU tensor (any stride).
std::vector<int64_t> read_indices(const Tensor& t) {
  std::vector<int64_t> out(t.size(0));
  for (int64_t i = 0; i < t.size(0); ++i)
    out[i] = t.scalar_type() == at::kInt ? int64_t{t.const_data_ptr<int32_t>()[i * t.stride(0)]}
                                         : t.const_data_ptr<int64_t>()[i * t.stride(0)];
  return out;
}

// An int32/int64 1-D CPU tensor of n entries (`expect` says what n is).
void check_index_tensor(const char* what, const char* name, const Tensor& t, int64_t n, const char* expect) {
  FA_CHECK(t.defined(), what, ": ", name, " is undefined");
  FA_CHECK(t.device().is_cpu(), what, ": ", name, " must be a CPU tensor, got ", t.device());
  FA_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, what, ": ", name,
           " must be int32 or int64, got ", t.scalar_type());
  FA_CHECK(t.dim() == 1 && (n < 0 || t.size(0) == n), what, ": ", name, " must be 1-D with ", expect,
           " entries, got shape ", t.sizes());
}

// The sequences of a varlen call after checking q, k, v, the boundaries and the options (those
// without queries or keys run nothing: runs_kernel).
inline bool runs_kernel(const Sequence& seq) { return seq.Lq > 0 && seq.Lk > 0; }
std::vector<Sequence> check_varlen_inputs(const char* what, const Tensor& q, const Tensor& k, const Tensor& v,
                                          const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                          const std::optional<Tensor>& seqused_k,
                                          const std::optional<Tensor>& alibi_slopes, double dropout_p, double scale,
                                          double softcap) {
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    FA_CHECK(t->defined(), what, ": ", name, " is undefined");
    FA_CHECK(t->device().is_cpu(), what, ": ", name, " must be a CPU tensor, got ", t->device());
    FA_CHECK(t->dim() == 3, what, ": ", name, " must be 3-D (total, heads, dim), got shape ", t->sizes());
    FA_CHECK(t->scalar_type() == q.scalar_type(), what, ": ", name, " has dtype ", t->scalar_type(), " but q has ",
             q.scalar_type());
  }
  FA_CHECK(is_supported_dtype(q.scalar_type()), what, ": q/k/v must be float16, bfloat16, float32 or float64, got ",
           q.scalar_type());
  FA_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1),
           what, ": k and v must agree in total length and heads, got k ", k.sizes(), ", v ", v.sizes());
  FA_CHECK(k.size(2) == q.size(2), what, ": q and k must have the same head dim, got q ", q.sizes(), ", k ",
           k.sizes());
  FA_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, what, ": query heads (", q.size(1),
           ") must be a multiple of key/value heads (", k.size(1), ")");
  check_options(what, dropout_p, scale, softcap);
  check_index_tensor(what, "cu_seqlens_q", cu_seqlens_q, -1, "num_sequences + 1");
  FA_CHECK(cu_seqlens_q.size(0) >= 1, what, ": cu_seqlens_q must have num_sequences + 1 >= 1 entries, got none");
  const int64_t n_seqs = cu_seqlens_q.size(0) - 1;
  check_index_tensor(what, "cu_seqlens_k", cu_seqlens_k, n_seqs + 1, "cu_seqlens_q's (num_sequences + 1)");
  const bool has_used = seqused_k.has_value() && seqused_k->defined();
  if (has_used) check_index_tensor(what, "seqused_k", *seqused_k, n_seqs, "num_sequences (cu_seqlens_q's - 1)");
  if (alibi_slopes.has_value() && alibi_slopes->defined()) {
    const Tensor& a = *alibi_slopes;
    FA_CHECK(a.device().is_cpu(), what, ": alibi_slopes must be a CPU tensor, got ", a.device());
    FA_CHECK(a.scalar_type() == at::kFloat, what, ": alibi_slopes must be float32, got ", a.scalar_type());
    FA_CHECK(a.dim() == 2 && a.size(0) == n_seqs && a.size(1) == q.size(1), what,
             ": alibi_slopes must be a (num_sequences, Hq) = (", n_seqs, ", ", q.size(1), ") tensor, got shape ",
             a.sizes());
  }
  const std::vector<int64_t> cu_q = read_indices(cu_seqlens_q), cu_k = read_indices(cu_seqlens_k);
  for (const auto& [name, cu, total] : {std::tuple<const char*, const std::vector<int64_t>*, int64_t>{
                                            "cu_seqlens_q", &cu_q, q.size(0)},
                                        {"cu_seqlens_k", &cu_k, k.size(0)}}) {
    FA_CHECK((*cu)[0] == 0, what, ": ", name, " must start at 0, got ", (*cu)[0]);
    for (int64_t s = 0; s < n_seqs; ++s)
      FA_CHECK((*cu)[s + 1] >= (*cu)[s], what, ": ", name, " must never decrease, got ", (*cu)[s], " then ",
               (*cu)[s + 1], " at entries ", s, ", ", s + 1);
    FA_CHECK((*cu)[n_seqs] == total, what, ": ", name, " must end at the total length ", total, ", got ",
             (*cu)[n_seqs]);
  }
  const std::vector<int64_t> used = has_used ? read_indices(*seqused_k) : std::vector<int64_t>();
  std::vector<Sequence> seqs;
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t keys = cu_k[s + 1] - cu_k[s];
    if (has_used)
      FA_CHECK(used[s] >= 0 && used[s] <= keys, what, ": seqused_k[", s, "] = ", used[s], " is outside [0, ", keys,
               "], the keys sequence ", s, " has in cu_seqlens_k");
    seqs.push_back({s, cu_q[s], cu_q[s + 1] - cu_q[s], cu_k[s], has_used ? used[s] : keys});
  }
  return seqs;
}

// A packed (total, H, dim) tensor as the (1, H, total, dim) view the Problem helpers read.
Tensor as_batch_of_one(const Tensor& t) { return t.unsqueeze(0).transpose(1, 2); }

// The Problem of each sequence from the one of the whole packed call (`all`: B = 1, L = the
// totals, the rows of make_problem + with_rows on as_batch_of_one views).
template <typename T>
std::vector<Problem<T>> sequence_problems(const Problem<T>& all, const std::vector<Sequence>& seqs, int64_t band_lo,
                                          int64_t band_hi, bool bottom_right, const std::optional<Tensor>& alibi_slopes,
                                          int64_t offset) {
  // Ends beyond +-2^62 see what +-2^62 sees (every |index| stays far below); clamped first, the
  // shift by the sequence's diagonal cannot overflow.
  constexpr int64_t kUnbounded = int64_t{1} << 62;
  const int64_t lo_all = std::clamp(band_lo, -kUnbounded, kUnbounded);
  const int64_t hi_all = std::clamp(band_hi, -kUnbounded, kUnbounded);
  const bool alibi = alibi_slopes.has_value() && alibi_slopes->defined();
  std::vector<Problem<T>> out(seqs.size(), all);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const Sequence& seq = seqs[i];
    Problem<T>& pb = out[i];
    pb.Lq = seq.Lq;
    pb.Lk = seq.Lk;
    // sequence_band: shifted by the sequence's diagonal, clamped to [-Lq, Lk], an empty band as (Lk, Lk)
    const int64_t diag = bottom_right ? seq.Lk - seq.Lq : 0;
    int64_t lo = std::clamp(lo_all + diag, -seq.Lq, seq.Lk), hi = std::clamp(hi_all + diag, -seq.Lq, seq.Lk);
    if (lo > hi) lo = hi = seq.Lk;
    pb.set_band(lo, hi);
    if (all.q.data) pb.q.data = all.q.data + seq.q0 * all.q.ld;
    if (all.k.data) pb.k.data = all.k.data + seq.k0 * all.k.ld;
    if (all.v.data) pb.v.data = all.v.data + seq.k0 * all.v.ld;
    if (alibi) {
      pb.alibi = alibi_slopes->const_data_ptr<float>() + seq.index * alibi_slopes->stride(0);
      pb.alibi_sb = 0;
      pb.alibi_sh = alibi_slopes->stride(1);
      pb.alibi_shift = bottom_right ? seq.Lk - seq.Lq : 0;
    }
    pb.offset = static_cast<uint64_t>(offset) + static_cast<uint64_t>(all.Hq * seq.q0);
  }
  return out;
}

// Every head of every sequence's source (PanelSource: float32 panels; Bf16PanelSource: bf16
// panels) laid out in one buffer, sequence after sequence, in parallel over the panels. Returns the
// buffer and where each sequence's heads start in it (in Elem).
template <typename Elem, typename Source>
std::pair<Tensor, std::vector<int64_t>> layout_sequences(const std::vector<Source>& srcs, int64_t H,
                                                         at::TensorOptions options) {
  std::vector<int64_t> start(srcs.size() + 1, 0), first_panel(srcs.size() + 1, 0);
  for (size_t s = 0; s < srcs.size(); ++s) {
    start[s + 1] = start[s] + H * srcs[s].n_panels() * srcs[s].panel_size();
    first_panel[s + 1] = first_panel[s] + H * srcs[s].n_panels();
  }
  Tensor storage = scratch::empty({start.back()}, c10::typeMetaToScalarType(options.dtype()));
  Elem* dst = reinterpret_cast<Elem*>(storage.data_ptr());
  const int64_t panels = first_panel.back();
  const int64_t mean_panel = start.back() / std::max<int64_t>(panels, 1);
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(mean_panel, 1));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin, s = part_of(first_panel, begin); u < end; ++u) {
      while (u >= first_panel[s + 1]) ++s;
      const Source& src = srcs[s];
      const int64_t local = u - first_panel[s], n = src.n_panels();
      src.pack(0, local / n, local % n, dst + start[s] + local * src.panel_size());
    }
  });
  return {storage, start};
}

// Where a sequence's rows of a packed (total, H, dim) tensor are: its queries or its keys.
enum class Rows { queries, keys };
inline int64_t first_row(const Sequence& seq, Rows rows) { return rows == Rows::queries ? seq.q0 : seq.k0; }
inline int64_t row_count(const Sequence& seq, Rows rows) { return rows == Rows::queries ? seq.Lq : seq.Lk; }

// Each sequence's float32 key panels (keys = true) or column panels of packed t; the buffer is
// appended to `storage`.
template <typename scalar_t>
std::vector<Panels> sequence_panels(const Tensor& t, const std::vector<Sequence>& seqs, Rows rows, bool keys,
                                    std::vector<Tensor>& storage) {
  std::vector<PanelSource<scalar_t>> srcs;
  srcs.reserve(seqs.size());
  for (const Sequence& seq : seqs)
    srcs.emplace_back(t.const_data_ptr<scalar_t>() + first_row(seq, rows) * t.stride(0), t.stride(1), t.stride(0),
                      t.stride(2), row_count(seq, rows), t.size(2), keys);
  auto [buffer, start] = layout_sequences<float>(srcs, t.size(1), t.options().dtype(at::kFloat));
  std::vector<Panels> out(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    out[s].data = buffer.template const_data_ptr<float>() + start[s];
    out[s].panel_stride = srcs[s].panel_size();
    out[s].stride_h = srcs[s].n_panels() * out[s].panel_stride;
  }
  storage.push_back(std::move(buffer));
  return out;
}

// The same for the bf16 layouts (bfloat16 t).
std::vector<Bf16Panels> sequence_bf16_panels(const Tensor& t, const std::vector<Sequence>& seqs, Rows rows, bool keys,
                                             std::vector<Tensor>& storage) {
  std::vector<Bf16PanelSource> srcs;
  srcs.reserve(seqs.size());
  for (const Sequence& seq : seqs)
    srcs.emplace_back(bf16_bits(t) + first_row(seq, rows) * t.stride(0), t.stride(1), t.stride(0), t.stride(2),
                      row_count(seq, rows), t.size(2), keys);
  auto [buffer, start] = layout_sequences<uint16_t>(srcs, t.size(1), t.options());
  std::vector<Bf16Panels> out(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    out[s].data = reinterpret_cast<const uint16_t*>(buffer.const_data_ptr<c10::BFloat16>()) + start[s];
    out[s].panel = srcs[s].panel_size();
    out[s].sh = srcs[s].n_panels() * out[s].panel;
  }
  storage.push_back(std::move(buffer));
  return out;
}

// Each sequence's bf16 rows (A operands) of packed bfloat16 t's queries: bf16_rows of the whole
// tensor (in place, or one padded copy, appended to `storage`), from the sequence's first row on.
std::vector<Bf16Rows> sequence_bf16_rows(const Tensor& t, const std::vector<Sequence>& seqs,
                                         std::vector<Tensor>& storage) {
  Bf16Rows all = bf16_rows(as_batch_of_one(t));
  if (all.store.defined()) storage.push_back(all.store);
  all.store = Tensor();
  std::vector<Bf16Rows> out(seqs.size(), all);
  for (size_t s = 0; s < seqs.size(); ++s) out[s].data = all.data + seqs[s].q0 * all.ld;
  return out;
}

// The register-blocked products' operands of every sequence (bf16: their bf16 layouts, which the
// TileOperands point to), and the buffers they live in.
struct SequenceOperands {
  std::vector<Tensor> storage;
  std::vector<Bf16Operands> bf16;
  std::vector<TileOperands> tiles;
};

// The forward's bf16 layouts of q, k and v for every sequence (bfloat16 inputs, bf16 dot products);
// with `rows` (decoding), k and v read in place as rows.
template <typename scalar_t>
void forward_sequence_operands(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<Sequence>& seqs,
                               bool bf16_products, bool rows, SequenceOperands& ops) {
  FA_CHECK(bf16_products, "attention_varlen (cpu): the forward lays out float32 panels in its units");
  ops.tiles.resize(seqs.size());
  ops.bf16.resize(seqs.size());
  const auto q_rows = sequence_bf16_rows(q, seqs, ops.storage);
  std::vector<Bf16Panels> k_keys, v_columns;
  if (!rows) {
    k_keys = sequence_bf16_panels(k, seqs, Rows::keys, true, ops.storage);
    v_columns = sequence_bf16_panels(v, seqs, Rows::keys, false, ops.storage);
  }
  const Bf16Rows k_all = bf16_rows_in_place(as_batch_of_one(k)), v_all = bf16_rows_in_place(as_batch_of_one(v));
  for (size_t s = 0; s < seqs.size(); ++s) {
    Bf16Operands& b = ops.bf16[s];
    b.q = q_rows[s];
    b.rows = rows;
    if (rows) {  // the sequence's keys from its first row on (B = 1)
      b.k_rows = k_all;
      b.k_rows.data += seqs[s].k0 * k_all.ld;
      b.v_rows = v_all;
      b.v_rows.data += seqs[s].k0 * v_all.ld;
    } else {
      b.k_keys = k_keys[s];
      b.v_columns = v_columns[s];
    }
    ops.tiles[s].bf16 = &b;
  }
}

// A PanelSource over one sequence's rows of packed t.
template <typename scalar_t>
PanelSource<scalar_t> sequence_source(const Tensor& t, int64_t row0, int64_t L, bool keys) {
  return PanelSource<scalar_t>(t.const_data_ptr<scalar_t>() + row0 * t.stride(0), t.stride(1), t.stride(0),
                               t.stride(2), L, t.size(2), keys);
}

// The forward's float32 panel sources of every sequence: K's key panels and V's column panels.
template <typename scalar_t>
std::vector<ForwardSources<scalar_t>> sequence_forward_sources(const Tensor& k, const Tensor& v,
                                                               const std::vector<Sequence>& seqs) {
  std::vector<ForwardSources<scalar_t>> out;
  out.reserve(seqs.size());
  for (const Sequence& seq : seqs)
    out.push_back({sequence_source<scalar_t>(k, seq.k0, seq.Lk, true),
                   sequence_source<scalar_t>(v, seq.k0, seq.Lk, false)});
  return out;
}

// The backward's: bf16 layouts (both schedules), or float32 panels up front (two passes); the
// per-head schedule's float32 panels are laid out by its units (sequence_head_sources).
template <typename scalar_t>
void backward_sequence_operands(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                                const std::vector<Sequence>& seqs, bool bf16_products, SequenceOperands& ops) {
  ops.tiles.resize(seqs.size());
  if (bf16_products) {
    ops.bf16.resize(seqs.size());
    const auto q_rows = sequence_bf16_rows(q, seqs, ops.storage);
    const auto dout_rows = sequence_bf16_rows(dout, seqs, ops.storage);
    const auto k_keys = sequence_bf16_panels(k, seqs, Rows::keys, true, ops.storage);
    const auto v_keys = sequence_bf16_panels(v, seqs, Rows::keys, true, ops.storage);
    const auto dout_columns = sequence_bf16_panels(dout, seqs, Rows::queries, false, ops.storage);
    const auto q_columns = sequence_bf16_panels(q, seqs, Rows::queries, false, ops.storage);
    const auto k_columns = sequence_bf16_panels(k, seqs, Rows::keys, false, ops.storage);
    for (size_t s = 0; s < seqs.size(); ++s) {
      Bf16Operands& b = ops.bf16[s];
      b.q = q_rows[s];
      b.dout = dout_rows[s];
      b.k_keys = k_keys[s];
      b.v_keys = v_keys[s];
      b.dout_columns = dout_columns[s];
      b.q_columns = q_columns[s];
      b.k_columns = k_columns[s];
      ops.tiles[s].bf16 = &b;
    }
    return;
  }
  const auto k_keys = sequence_panels<scalar_t>(k, seqs, Rows::keys, true, ops.storage);
  const auto v_keys = sequence_panels<scalar_t>(v, seqs, Rows::keys, true, ops.storage);
  const auto dout_columns = sequence_panels<scalar_t>(dout, seqs, Rows::queries, false, ops.storage);
  const auto q_columns = sequence_panels<scalar_t>(q, seqs, Rows::queries, false, ops.storage);
  const auto k_columns = sequence_panels<scalar_t>(k, seqs, Rows::keys, false, ops.storage);
  for (size_t s = 0; s < seqs.size(); ++s) {
    TileOperands& t = ops.tiles[s];
    t.k_keys = k_keys[s];
    t.v_keys = v_keys[s];
    t.dout_columns = dout_columns[s];
    t.q_columns = q_columns[s];
    t.k_columns = k_columns[s];
  }
}

template <typename scalar_t>
std::vector<HeadSources<scalar_t>> sequence_head_sources(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const Tensor& dout, const std::vector<Sequence>& seqs) {
  const auto source = [](const Tensor& t, int64_t row0, int64_t L, bool keys) {
    return PanelSource<scalar_t>(t.const_data_ptr<scalar_t>() + row0 * t.stride(0), t.stride(1), t.stride(0),
                                 t.stride(2), L, t.size(2), keys);
  };
  std::vector<HeadSources<scalar_t>> out;
  out.reserve(seqs.size());
  for (const Sequence& seq : seqs)
    out.emplace_back(source(k, seq.k0, seq.Lk, true), source(v, seq.k0, seq.Lk, true),
                     source(k, seq.k0, seq.Lk, false), source(q, seq.q0, seq.Lq, false),
                     source(dout, seq.q0, seq.Lq, false));
  return out;
}

// forward_kernel / backward_kernel on the register-blocked path, which exists for float32 compute
// only (a float64 call never asks for it).
template <typename acc_t, typename scalar_t>
void register_blocked_forward(const std::vector<ForwardPart<acc_t, scalar_t>>& parts) {
  if constexpr (std::is_same_v<acc_t, float>)
    forward_kernel<float, scalar_t, true>(parts);
  else
    FA_CHECK(false, "attention_varlen (cpu): the register-blocked products are float32");
}
template <typename acc_t, typename scalar_t>
void register_blocked_backward(const std::vector<BackwardPart<acc_t, scalar_t>>& parts, bool per_head) {
  if constexpr (std::is_same_v<acc_t, float>)
    backward_kernel<float, scalar_t, true>(parts, per_head, nullptr);
  else
    FA_CHECK(false, "attention_varlen (cpu): the register-blocked products are float32");
}

std::tuple<Tensor, Tensor> attention_varlen_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k,
                                                    int64_t max_seqlen_q, int64_t max_seqlen_k, int64_t band_lo,
                                                    int64_t band_hi, bool bottom_right, double dropout_p, double scale,
                                                    int64_t seed, int64_t offset, double softcap,
                                                    const std::optional<Tensor>& seqused_k,
                                                    const std::optional<Tensor>& alibi_slopes) {
  // (max_seqlen_q/k size the Triton kernels' grid; the lengths here come from the boundaries)
  (void)max_seqlen_q, (void)max_seqlen_k;
  const std::vector<Sequence> all_seqs = check_varlen_inputs("attention_varlen (cpu)", q, k, v, cu_seqlens_q,
                                                             cu_seqlens_k, seqused_k, alibi_slopes, dropout_p, scale,
                                                             softcap);
  const int64_t total_q = q.size(0), Hq = q.size(1), Dv = v.size(2);
  Tensor out = scratch::empty({total_q, Hq, Dv}, q.scalar_type());
  // (the rows of sequences that run nothing keep lse = +inf)
  Tensor lse = scratch::empty({Hq, total_q}, lse_dtype(q)).fill_(std::numeric_limits<double>::infinity());
  std::vector<Sequence> seqs;
  for (const Sequence& seq : all_seqs) {
    if (runs_kernel(seq))
      seqs.push_back(seq);
    else if (seq.Lq > 0)  // queries without keys: zero rows (all bits zero is 0 in every float type)
      std::memset(static_cast<char*>(out.data_ptr()) + seq.q0 * Hq * Dv * out.element_size(), 0,
                  seq.Lq * Hq * Dv * out.element_size());
  }
  if (seqs.empty() || (out.numel() == 0 && lse.numel() == 0)) return {out, lse};
  const GemmMode mode = gemm_mode();
  FA_DISPATCH_FLOATING(q.scalar_type(), "attention_varlen_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor q1 = as_batch_of_one(q), k1 = as_batch_of_one(k), v1 = as_batch_of_one(v);
    const Problem<acc_t> shape = make_problem<acc_t>(q1, k1, v1, std::nullopt, band_lo, band_hi, dropout_p, scale,
                                                     seed, offset, softcap, std::nullopt, bottom_right, mode);
    // Decoding (a KV cache: few query rows per kv head in every sequence), as in attention_fwd_cpu,
    // so that a step does not lay out the whole used cache as panels: float32 takes BLAS where
    // every sequence's queries see all of its keys and k and v need no copy (decode_takes_blas,
    // which the backward asks too: float16, and bfloat16 without AVX512-BF16, keep the panels of
    // the used keys); bfloat16 on the dot products reads k and v as rows (any band).
    const std::vector<Problem<acc_t>> bands =
        sequence_problems(shape, seqs, band_lo, band_hi, bottom_right, std::nullopt, offset);
    int64_t max_lq = 0;
    for (const Problem<acc_t>& pb : bands) max_lq = std::max(max_lq, pb.Lq);
    const bool decoding = mode == GemmMode::automatic && few_query_rows(max_lq, Hq, k.size(1));
    const bool tiles = std::is_same_v<acc_t, float> && use_tile_kernels(mode) &&
                       !decode_takes_blas<acc_t>(mode, bands, q, k1, v1, true);
    const bool bf16_products = use_bf16_dot(q.scalar_type(), tiles);
    const bool bf16_rows = bf16_products && decoding && decode_rows(max_lq, Hq, k.size(1)) &&
                           can_read_rows(k1) && can_read_rows(v1);
    // as in attention_fwd_cpu: the rows the products read in place
    const Tensor qa = bf16_products ? Tensor() : as_blas_operand(q1, acc);
    const Tensor ka = tiles ? Tensor() : as_blas_operand(k1, acc), va = tiles ? Tensor() : as_blas_operand(v1, acc);
    const std::vector<Problem<acc_t>> problems =
        sequence_problems(with_rows(shape, qa, ka, va), seqs, band_lo, band_hi, bottom_right, alibi_slopes, offset);
    // the register-blocked products' operands: bf16 layouts up front, float32 panels by the units
    SequenceOperands ops;
    std::vector<ForwardSources<scalar_t>> sources;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (tiles && bf16_products) forward_sequence_operands<scalar_t>(q, k, v, seqs, true, bf16_rows, ops);
      if (tiles && !bf16_products) sources = sequence_forward_sources<scalar_t>(k, v, seqs);
    }
    // out (total_q, Hq, Dv) contiguous: row i of (0, h) at (q0 + i) * Hq * Dv + h * Dv; lse (Hq, total_q)
    scalar_t* out_data = out.data_ptr<scalar_t>();
    acc_t* lse_data = lse.data_ptr<acc_t>();
    std::vector<ForwardPart<acc_t, scalar_t>> parts(seqs.size());
    for (size_t s = 0; s < seqs.size(); ++s)
      parts[s] = {&problems[s], ops.tiles.empty() ? nullptr : &ops.tiles[s], out_data + seqs[s].q0 * Hq * Dv, 0, Dv,
                  Hq * Dv, lse_data + seqs[s].q0, 0, total_q, sources.empty() ? nullptr : &sources[s]};
    if (tiles)
      register_blocked_forward(parts);
    else
      forward_kernel<acc_t, scalar_t, false>(parts);
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_varlen_bwd_cpu(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
    const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    int64_t band_lo, int64_t band_hi, bool bottom_right, double dropout_p, double scale, int64_t seed, int64_t offset,
    double softcap, const std::optional<Tensor>& seqused_k, const std::optional<Tensor>& alibi_slopes,
    const std::optional<Tensor>& dlse) {
  (void)max_seqlen_q, (void)max_seqlen_k;
  const char* what = "attention_varlen_bwd (cpu)";
  std::vector<Sequence> seqs = check_varlen_inputs(what, q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes,
                                                   dropout_p, scale, softcap);
  // (the others get zero gradients)
  seqs.erase(std::remove_if(seqs.begin(), seqs.end(), [](const Sequence& seq) { return !runs_kernel(seq); }),
             seqs.end());
  const int64_t total_q = q.size(0), Hq = q.size(1), D = q.size(2), total_k = k.size(0), Hkv = k.size(1),
                Dv = v.size(2);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"dout", &dout}, {"out", &out}}) {
    FA_CHECK(t->defined() && t->device().is_cpu(), what, ": ", name, " must be a CPU tensor");
    FA_CHECK(t->scalar_type() == q.scalar_type(), what, ": ", name, " must have q's dtype ", q.scalar_type(),
             ", got ", t->scalar_type());
    FA_CHECK(t->dim() == 3 && t->size(0) == total_q && t->size(1) == Hq && t->size(2) == Dv, what, ": ", name,
             " must have shape (total_q, Hq, Dv) = (", total_q, ", ", Hq, ", ", Dv, "), got ", t->sizes());
  }
  FA_CHECK(lse.defined() && lse.device().is_cpu() && lse.scalar_type() == lse_dtype(q) && lse.dim() == 2 &&
               lse.size(0) == Hq && lse.size(1) == total_q,
           what, ": lse must be a ", lse_dtype(q), " CPU tensor of shape (Hq, total_q) = (", Hq, ", ", total_q,
           "), got ", lse.scalar_type(), " ", lse.sizes());
  const bool has_dlse = dlse.has_value() && dlse->defined();
  FA_CHECK(!has_dlse || (dlse->device().is_cpu() && dlse->scalar_type() == lse_dtype(q) && dlse->sizes() == lse.sizes()),
           what, ": dlse must be None or a ", lse_dtype(q), " CPU tensor of lse's shape (", Hq, ", ", total_q,
           "), got ", has_dlse ? dlse->scalar_type() : lse_dtype(q), " ", has_dlse ? dlse->sizes() : lse.sizes());
  Tensor dq, dk, dv;
  if (seqs.empty())
    return {at::zeros_like(q, at::MemoryFormat::Contiguous), at::zeros_like(k, at::MemoryFormat::Contiguous),
            at::zeros_like(v, at::MemoryFormat::Contiguous)};
  const GemmMode mode = gemm_mode();
  FA_DISPATCH_FLOATING(q.scalar_type(), "attention_varlen_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const Tensor q1 = as_batch_of_one(q), k1 = as_batch_of_one(k), v1 = as_batch_of_one(v);
    const Tensor dout1 = as_batch_of_one(dout), out1 = as_batch_of_one(out);
    const Problem<acc_t> shape = make_problem<acc_t>(q1, k1, v1, std::nullopt, band_lo, band_hi, dropout_p, scale,
                                                     seed, offset, softcap, std::nullopt, bottom_right, mode);
    // the products the forward ran (decode_takes_blas): P is recomputed against its lse
    const bool tiles =
        std::is_same_v<acc_t, float> && use_tile_kernels(mode) &&
        !decode_takes_blas<acc_t>(mode, sequence_problems(shape, seqs, band_lo, band_hi, bottom_right, std::nullopt,
                                                          offset),
                                  q, k1, v1, true);
    // as in attention_bwd_cpu (the bf16 query tiles' pairs need an even query block)
    const bool bf16_products = use_bf16_dot(q.scalar_type(), tiles) && bwd_tile_blocks().m % 2 == 0;
    const Tensor qa = bf16_products ? Tensor() : as_blas_operand(q1, acc), dout_a = as_blas_operand(dout1, acc);
    const Tensor ka = tiles ? Tensor() : as_blas_operand(k1, acc), va = tiles ? Tensor() : as_blas_operand(v1, acc);
    const Problem<acc_t> all = with_rows(shape, qa, ka, va);
    const std::vector<Problem<acc_t>> problems =
        sequence_problems(all, seqs, band_lo, band_hi, bottom_right, alibi_slopes, offset);
    // delta = rowsum(dO * O) - dlse, as attention_bwd_cpu forms it, (Hq, total_q) like the lse
    Tensor delta = at::sum(dout_a * out1.to(acc), {-1});
    if (has_dlse) delta = delta - dlse->to(acc);
    delta = delta.contiguous();
    const Tensor lse_acc = lse.contiguous();  // (Hq, total_q), in acc_t
    // accumulators in the packed layouts (total, heads, width): the gradients need no transpose
    const int64_t dw = tiles ? round16(D) : D, dvw = tiles ? round16(Dv) : Dv;
    Tensor dq_acc = scratch::zeros({total_q, Hq, dw}, acc);
    Tensor dk_acc = scratch::zeros({total_k, Hkv, dw}, acc);
    Tensor dv_acc = scratch::zeros({total_k, Hkv, dvw}, acc);
    const auto packed = [](Tensor& t, int64_t row0) {  // row i of head h at (row0 + i) * H * w + h * w
      const int64_t H = t.size(1), w = t.size(2);
      return Accumulator<acc_t>{t.data_ptr<acc_t>() + row0 * H * w, 0, w, H * w, w};
    };
    const Matrices<acc_t> dout_rows = matrices<acc_t>(dout_a);
    std::vector<Grads<acc_t>> grads;
    grads.reserve(seqs.size());
    for (const Sequence& seq : seqs) {
      Matrices<acc_t> dout_seq = dout_rows;
      dout_seq.data += seq.q0 * dout_rows.ld;
      grads.push_back({dout_seq, lse_acc.const_data_ptr<acc_t>() + seq.q0, delta.const_data_ptr<acc_t>() + seq.q0, 0,
                       total_q, packed(dq_acc, seq.q0), packed(dk_acc, seq.k0), packed(dv_acc, seq.k0)});
    }
    const bool per_head = backward_per_head(static_cast<int64_t>(seqs.size()) * Hkv);
    SequenceOperands ops;
    std::vector<HeadSources<scalar_t>> sources;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (tiles && per_head && !bf16_products)
        sources = sequence_head_sources<scalar_t>(q, k, v, dout, seqs);
      else if (tiles)
        backward_sequence_operands<scalar_t>(q, k, v, dout, seqs, bf16_products, ops);
    }
    std::vector<BackwardPart<acc_t, scalar_t>> parts(seqs.size());
    for (size_t s = 0; s < seqs.size(); ++s)
      parts[s] = {&problems[s], &grads[s], ops.tiles.empty() ? nullptr : &ops.tiles[s],
                  sources.empty() ? nullptr : &sources[s]};
    if (tiles)
      register_blocked_backward(parts, per_head);
    else
      backward_kernel<acc_t, scalar_t, false>(parts, per_head, nullptr);
    dq = finish_grad(dq_acc, D, q.scalar_type());
    dk = finish_grad(dk_acc, D, q.scalar_type());
    dv = finish_grad(dv_acc, Dv, q.scalar_type());
  });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fused_attn::cpu_attention

TORCH_LIBRARY_IMPL(fused_attn_C, CPU, m) {
  m.impl("attention_fwd", &fused_attn::cpu_attention::attention_fwd_cpu);
  m.impl("attention_bwd", &fused_attn::cpu_attention::attention_bwd_cpu);
  m.impl("attention_varlen_fwd", &fused_attn::cpu_attention::attention_varlen_fwd_cpu);
  m.impl("attention_varlen_bwd", &fused_attn::cpu_attention::attention_varlen_bwd_cpu);
}
