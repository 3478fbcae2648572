// Rotary position embedding (RoPE), forward and backward in one kernel.
//
// Token (b, l) sits at position p = positions[b, l]. Pair i of every head (features (i, i + R/2),
// GPT-NeoX's halves, or (2i, 2i + 1), GPT-J's interleaved pairs) is a point of the plane turned by
// the angle theta_{p,i} whose cosine and sine are row p of the tables:
//   (x1, x2) -> (x1 c - x2 s, x1 s + x2 c).
// A rotation's inverse is its transpose, i.e. the same turn with s negated (conjugate), so the
// backward (dx from dout) is this kernel with conjugate set. Features R..D-1 are copied bit for
// bit. Arithmetic in float32 (the tables converted from their own dtype, float64 included), one
// rounding to x's dtype per output.
//
// Work split: a token has W = H * (D - R/2) work items, per head its R/2 rotations (two features
// each) then its D - R copies, numbered head-major. A block takes a group of G whole tokens,
// G = blockDim / W when a token's items fit in a block (else 1, and the threads stride over them),
// so one launch is ceil(B * L / G) blocks and each block reads one position per token.
// Memory pattern: with the feature stride 1, consecutive threads take consecutive items, so the
// first features of the pairs (i, or 2i), the second ones (i + R/2, or 2i + 1) and the copies
// (R + k) each form one contiguous run per head: coalesced loads and stores. Interleaved pairs sit
// side by side; when the strides and pointers allow, a pair is one 4- or 8-byte access instead of
// two stride-2 ones. Any other strides go through the general indexing.
// Tables: each rotation reads cos[p, i] and sin[p, i] in the tables' dtype (no converted copy of a
// table per call); the H heads of a token re-read the same R/2-element rows, which the first
// warp to touch them brings into L1 for the others. positions is read once per item: one or two
// distinct addresses per warp, a broadcast.
// Positions outside [0, S) are clamped into it: the Python layer raises on them before calling,
// the clamp only guarantees that a bad call never reads outside the tables.
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "launchers.h"

namespace fused_attn_cuda {
namespace {

constexpr int kRotaryThreads = 256;

// A table entry as float32: the tables come in any float dtype, float64 included.
template <typename C>
__device__ __forceinline__ float table_value(C v) {
  if constexpr (std::is_same<C, double>::value) {
    return static_cast<float>(v);
  } else {
    return to_float<C>(v);
  }
}

// An interleaved pair (2i, 2i + 1) as one aligned access.
template <typename T>
struct alignas(2 * sizeof(T)) ElementPair {
  T first, second;
};

// T: x and out; C: cos and sin. tokens_per_block: G above; pair_vec: interleaved pairs are one
// aligned access (feature stride 1, even offsets: rotary_launch_config checks).
template <typename T, typename C>
__global__ void __launch_bounds__(kRotaryThreads) rotary_kernel(const RotaryArgs a, int tokens_per_block, bool pair_vec) {
  const int pairs = static_cast<int>(a.pairs);
  const int slots = static_cast<int>(a.head_dim - a.pairs);  // per head: pairs rotations, D - R copies
  const int per_token = static_cast<int>(a.heads) * slots;
  const int len = static_cast<int>(a.len);
  const int64_t tokens = a.batch * a.len;
  const int64_t first_token = int64_t(blockIdx.x) * tokens_per_block;
  const int items = tokens_per_block * per_token;
  const T* x = static_cast<const T*>(a.x);
  T* out = static_cast<T*>(a.out);
  const C* cos_t = static_cast<const C*>(a.cos);
  const C* sin_t = static_cast<const C*>(a.sin);
  // the pair's features: (i, i + R/2), or (2i, 2i + 1)
  const int first_step = a.interleaved ? 2 : 1;
  const int second_off = a.interleaved ? 1 : pairs;
  const float sign = a.conjugate ? -1.0f : 1.0f;  // conjugate: the inverse rotation
  for (int e = threadIdx.x; e < items; e += blockDim.x) {
    const int g = e / per_token;
    if (first_token + g >= tokens) break;  // items are token-major: this thread's next ones are past the end too
    const int token = static_cast<int>(first_token + g);
    const int r = e - g * per_token;
    const int h = r / slots, k = r - h * slots;
    const int b = token / len, l = token - b * len;
    const int64_t xrow = b * a.x_stride[0] + l * a.x_stride[1] + h * a.x_stride[2];
    const int64_t orow = b * a.out_stride[0] + l * a.out_stride[1] + h * a.out_stride[2];
    if (k >= pairs) {  // pass-through: feature R + (k - R/2)
      const int64_t j = k + pairs;
      out[orow + j * a.out_stride[3]] = x[xrow + j * a.x_stride[3]];
      continue;
    }
    const int64_t pos_at = b * a.positions_stride[0] + l * a.positions_stride[1];
    int64_t p = a.positions_int64 ? static_cast<const int64_t*>(a.positions)[pos_at]
                                  : static_cast<const int32_t*>(a.positions)[pos_at];
    p = p < 0 ? 0 : (p >= a.rows ? a.rows - 1 : p);  // clamped: never outside the tables
    const float c = table_value<C>(cos_t[p * a.cos_stride[0] + k * a.cos_stride[1]]);
    const float s = sign * table_value<C>(sin_t[p * a.sin_stride[0] + k * a.sin_stride[1]]);
    const int64_t j1 = int64_t(k) * first_step, j2 = j1 + second_off;
    float x1, x2;
    if (pair_vec) {
      const ElementPair<T> v = *reinterpret_cast<const ElementPair<T>*>(x + xrow + j1);
      x1 = to_float<T>(v.first);
      x2 = to_float<T>(v.second);
    } else {
      x1 = to_float<T>(x[xrow + j1 * a.x_stride[3]]);
      x2 = to_float<T>(x[xrow + j2 * a.x_stride[3]]);
    }
    const T o1 = from_float<T>(x1 * c - x2 * s);
    const T o2 = from_float<T>(x1 * s + x2 * c);
    if (pair_vec) {
      *reinterpret_cast<ElementPair<T>*>(out + orow + j1) = ElementPair<T>{o1, o2};
    } else {
      out[orow + j1 * a.out_stride[3]] = o1;
      out[orow + j2 * a.out_stride[3]] = o2;
    }
  }
}

// Host side, shared with the CPU emulation (tests/cuda_emu/emu_rotary.cpp).

// Calls fn(C{}) with C the C++ type of the tables' dtype.
template <typename Fn>
const char* dispatch_table_dtype(TableDType dtype, Fn&& fn) {
  switch (dtype) {
    case TableDType::kFloat16: return fn(__half{});
    case TableDType::kBFloat16: return fn(__nv_bfloat16{});
    case TableDType::kFloat32: return fn(float{});
    case TableDType::kFloat64: return fn(double{});
  }
  return "rotary: unsupported cos/sin dtype";
}

// Why the kernel cannot take these sizes (its int32 indexing, the clamp's row), or nullptr.
const char* rotary_problem(const RotaryArgs& a) {
  if (a.batch < 0 || a.len < 0 || a.heads < 0 || a.head_dim < 0 || a.rows < 0) return "rotary: negative size";
  if (a.pairs < 1 || 2 * a.pairs > a.head_dim) return "rotary: the rotary dim 2 * pairs must be in [2, head_dim]";
  if (a.batch * a.len > 0x7fffffffLL) return "rotary: batch * len does not fit in 32 bits";
  if (a.heads * a.head_dim > 0x7fffffffLL) return "rotary: heads * head_dim does not fit in 32 bits";
  if (a.batch * a.len * a.heads > 0 && a.rows < 1) return "rotary: cos and sin have no rows";
  return nullptr;
}

struct RotaryLaunch {
  int tokens_per_block;
  int64_t blocks;
  bool pair_vec;
};

// An element offset that only matters when its dimension has more than one index.
inline bool even_stride(int64_t size, int64_t stride) { return size <= 1 || stride % 2 == 0; }

// The grid for blocks of `threads` threads, and whether interleaved pairs can be single accesses:
// feature stride 1 for x and out, every other used stride even and both pointers aligned to a
// pair, so that element 2i of every row starts an aligned pair.
RotaryLaunch rotary_launch_config(const RotaryArgs& a, int threads) {
  const int64_t per_token = a.heads * (a.head_dim - a.pairs);
  const int64_t tokens = a.batch * a.len;
  RotaryLaunch cfg;
  cfg.tokens_per_block = per_token >= threads ? 1 : static_cast<int>(threads / per_token);
  cfg.blocks = (tokens + cfg.tokens_per_block - 1) / cfg.tokens_per_block;
  const uintptr_t pair_bytes = a.dtype == DType::kFloat32 ? 8 : 4;
  const int64_t sizes[3] = {a.batch, a.len, a.heads};
  bool vec = a.interleaved && a.x_stride[3] == 1 && a.out_stride[3] == 1 &&
             reinterpret_cast<uintptr_t>(a.x) % pair_bytes == 0 && reinterpret_cast<uintptr_t>(a.out) % pair_bytes == 0;
  for (int d = 0; d < 3; ++d) vec = vec && even_stride(sizes[d], a.x_stride[d]) && even_stride(sizes[d], a.out_stride[d]);
  cfg.pair_vec = vec;
  return cfg;
}

}  // namespace

#ifndef FUSED_ATTN_CPU_EMULATION  // tests/cuda_emu runs the kernel above on CPU threads
const char* rotary(const RotaryArgs& a, cudaStream_t stream) {
  if (const char* why = rotary_problem(a)) return why;
  if (a.batch * a.len * a.heads == 0) return nullptr;  // empty: no launch
  const RotaryLaunch cfg = rotary_launch_config(a, kRotaryThreads);
  return dispatch_dtype(a.dtype, [&](auto x_zero) -> const char* {
    using T = decltype(x_zero);
    return dispatch_table_dtype(a.table_dtype, [&](auto table_zero) -> const char* {
      using C = decltype(table_zero);
      rotary_kernel<T, C><<<static_cast<unsigned>(cfg.blocks), kRotaryThreads, 0, stream>>>(a, cfg.tokens_per_block,
                                                                                          cfg.pair_vec);
      return last_launch_error();
    });
  });
}
#endif  // FUSED_ATTN_CPU_EMULATION

}  // namespace fused_attn_cuda
