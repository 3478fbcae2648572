// The torch-free interface between the CUDA kernels (csrc/cuda/*.cu) and their torch bindings
// (csrc/cuda/*_binding.cpp).
//
// The kernels take raw pointers, sizes, element strides and a cudaStream_t; the bindings turn
// tensors into these structs, allocate every output and workspace with torch's allocator, and
// turn a non-null returned message into a TORCH_CHECK error. Nothing here includes torch, so
// `nvcc -c` compile-checks the kernels on machines without torch's CUDA build.
//
// Every launcher returns nullptr on success, else a message: an argument it refuses (sizes over its
// limits; static, or formatted into a buffer of the calling thread that its next message reuses) or
// the CUDA error of the launch (cudaGetErrorString). The bindings turn it into their error at once.
// The launchers may be called from several threads at once.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fused_attn_cuda {

// Element type of the floating-point tensors of a call (all of q/k/v/out, or x/weight/out, ...).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Dropout with the counter-based hash of fused_attn/_rng.py: element (row, col) is kept when
// bits(seed, offset, row, col) >= threshold, and kept elements are multiplied by `scale`.
struct DropoutArgs {
  bool enabled = false;    // dropout_p > 0
  uint64_t seed = 0;
  uint64_t offset = 0;
  uint32_t threshold = 0;  // min(floor(p * 2**32), 2**32 - 1)
  float scale = 1.0f;      // 1 / (1 - p)
};

// Largest head dim (of q/k and of v) the attention kernels take.
constexpr int64_t kMaxHeadDim = 256;

enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

// attention forward: out = softmax(cap(q k^T * scale) + alibi + mask) v, lse = logsumexp of each score
// row (cap: see softcap below, the identity when it is 0; alibi: see alibi_slopes below, 0 when null).
// Strides are in elements, in (B, H, L, D) order; any strides are allowed (0 too).
struct AttentionFwdArgs {
  DType dtype;
  int64_t batch, heads_q, heads_kv, len_q, len_k, head_dim, head_dim_v;
  const void* q; int64_t q_stride[4];
  const void* k; int64_t k_stride[4];
  const void* v; int64_t v_stride[4];
  MaskKind mask_kind;  // kBool: uint8 (nonzero = attend); kAdditive: `dtype` values
  const void* mask; int64_t mask_stride[4];  // a (B, Hq, Lq, Lk) view
  // The visibility band: query i sees key j iff band_lo <= j - i <= band_hi (and the mask), both
  // ends already clamped to [-len_q, len_k] (by the binding), so i + band fits in 32 bits.
  // No band is (-len_q, len_k), top-left causal (-len_q, 0).
  int64_t band_lo, band_hi;
  float scale;
  // Logit soft-capping (Gemma 2, FlashAttention's softcap): > 0 turns the scaled score s into
  // softcap * tanh(s / softcap) before the mask is added; the backward multiplies dS by 1 - tanh^2
  // on its way to dq and dk (dmask is dS itself). 0: off.
  float softcap;
  // ALiBi (Press et al.; FlashAttention's alibi_slopes): when non-null, the logit of query i, key j
  // of (batch b, query head h) gets -slope * |j - i - alibi_shift|, slope =
  // alibi_slopes[b * alibi_stride[0] + h * alibi_stride[1]] (float32, any strides, 0 too), added
  // where the additive mask is (after the cap). alibi_shift = len_k - len_q for bottom-right
  // alignment, else 0: query i sits at key position i + shift. The band already carries that
  // alignment for visibility; the bias needs it separately. A constant: the backward recomputes P
  // with it and nothing else changes (no gradient for the slopes). Null: off (shift unused).
  const float* alibi_slopes; int64_t alibi_stride[2];
  int64_t alibi_shift;
  DropoutArgs dropout;
  void* out; int64_t out_stride[4];  // (B, Hq, Lq, Dv)
  float* lse;                        // contiguous (B, Hq, Lq); +inf for rows with no key
};

// attention backward. dq, dk, dv are contiguous and shaped like q, k, v; dmask (when non-null) is
// a zero-initialised contiguous (B, Hq, Lq, Lk) tensor of `dtype`; delta is a float32 workspace of
// B * Hq * Lq elements.
struct AttentionBwdArgs {
  AttentionFwdArgs fwd;  // the forward's inputs (fwd.out and fwd.lse are read, not written)
  const void* dout; int64_t dout_stride[4];
  void* dq; void* dk; void* dv;
  void* dmask;
  float* delta;
  const float* dlse;  // the lse's gradient, contiguous (B, Hq, Lq), or null: delta -= dlse
};

const char* attention_fwd(const AttentionFwdArgs& args, cudaStream_t stream);
const char* attention_bwd(const AttentionBwdArgs& args, cudaStream_t stream);

// residual-add + LayerNorm / RMSNorm over rows of `hidden` elements (unit stride along a row).
//   summed = dropout(x) + residual   (in `summed_dtype`), out = norm(summed) * weight + bias.
struct LayerNormFwdArgs {
  DType dtype;           // x, weight, bias, out
  DType residual_dtype;  // residual (dtype or float32)
  DType summed_dtype;    // summed (dtype or float32)
  int64_t rows, hidden;
  const void* x; int64_t x_row_stride;
  const void* residual; int64_t residual_row_stride;  // may be null
  const void* weight; const void* bias;               // may be null
  float eps;
  bool rms;
  DropoutArgs dropout;   // on x, logical element (row, col)
  void* out; void* summed;  // contiguous (rows, hidden); summed may be null (not stored)
  float* mean;           // (rows,), null for rms
  float* rstd;           // (rows,)
};

struct LayerNormBwdArgs {
  DType dtype;         // dout, weight, bias, dweight, dbias
  DType summed_dtype;  // summed, dsummed, dsum
  DType x_dtype;       // dx
  int64_t rows, hidden;
  const void* dout; int64_t dout_row_stride;
  const void* dsummed; int64_t dsummed_row_stride;  // may be null
  const void* summed;                                // contiguous
  const void* weight;                                // may be null
  bool has_bias;
  const float* mean; const float* rstd;
  bool rms;
  DropoutArgs dropout;
  void* dsum;          // contiguous (rows, hidden)
  void* dx;            // contiguous (rows, hidden) when dropout is on, else null
  void* dweight; void* dbias;  // (hidden,) or null
  float* partials;     // workspace: layer_norm_bwd_partial_rows(...) x 2 x hidden floats
};

const char* layer_norm_fwd(const LayerNormFwdArgs& args, cudaStream_t stream);
// Number of per-block partial rows the backward's weight/bias reduction uses (the workspace size).
int64_t layer_norm_bwd_partial_rows(int64_t rows);
const char* layer_norm_bwd(const LayerNormBwdArgs& args, cudaStream_t stream);

// feed-forward: the elementwise passes between the GEMMs (which the binding runs through torch / cuBLAS).
enum class Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kSwiglu = 4, kGeglu = 5 };

// h = dropout(act(pre)). pre is contiguous (T, F1) (x @ w1^T + b1, from one cuBLAS call with the
// bias in its epilogue), h (T, d_ff), with F1 = d_ff, or 2 * d_ff for the gated activations (gate
// columns first, then up).
struct FfnActFwdArgs {
  DType dtype;
  Activation activation;
  int64_t tokens, d_ff;
  const void* pre;
  void* h;
  DropoutArgs dropout;  // logical element (token, c) of the (T, d_ff) activation
};

// dpre = d(dropout(act(pre))) / d pre applied to dh, and h = dropout(act(pre)) recomputed.
struct FfnActBwdArgs {
  DType dtype;
  Activation activation;
  int64_t tokens, d_ff;
  const void* pre;  // (T, F1) contiguous
  const void* dh;   // (T, d_ff) contiguous
  void* dpre;       // (T, F1)
  void* h;          // (T, d_ff)
  DropoutArgs dropout;
};

const char* ffn_act_fwd(const FfnActFwdArgs& args, cudaStream_t stream);
const char* ffn_act_bwd(const FfnActBwdArgs& args, cudaStream_t stream);

// rotary position embedding (RoPE): token (b, l) takes row p = positions[b, l] of the (rows, pairs)
// tables and turns feature pair i of every head by that row's angle,
//   (x1, x2) -> (x1 c - x2 s, x1 s + x2 c),   c = cos[p, i], s = sin[p, i] (-sin when conjugate),
// with (x1, x2) = features (i, i + pairs) (GPT-NeoX), or (2i, 2i + 1) when interleaved (GPT-J);
// features 2 * pairs .. head_dim - 1 are copied. float32 arithmetic, rounded once to `dtype`.
// Strides are in elements, any (0 too), in (B, L, H, D), (S, R/2) and (B, L) order.
// Limits: batch * len and heads * head_dim fit in 32 bits; rows >= 1 when there are tokens.
// Positions outside [0, rows) are clamped into it (the callers check them first; the clamp only
// keeps such a call from reading outside the tables).
enum class TableDType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

struct RotaryArgs {
  DType dtype;             // x and out
  TableDType table_dtype;  // cos and sin (read in their own dtype, converted per element)
  bool positions_int64;    // else int32
  bool interleaved, conjugate;
  int64_t batch, len, heads, head_dim, pairs, rows;  // pairs = R/2 (>= 1, 2 * pairs <= head_dim)
  const void* x; int64_t x_stride[4];
  const void* cos; int64_t cos_stride[2];
  const void* sin; int64_t sin_stride[2];
  const void* positions; int64_t positions_stride[2];
  void* out; int64_t out_stride[4];
};

const char* rotary(const RotaryArgs& args, cudaStream_t stream);

}  // namespace fused_attn_cuda
