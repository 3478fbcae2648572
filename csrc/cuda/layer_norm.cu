// Residual-add + LayerNorm / RMSNorm, forward and backward.
//
// Forward, one block per row: read x (and the residual) once with 16-byte loads where the rows
// allow, form summed = dropout(x) + residual, write it and keep its float value in shared
// memory, then reduce: mean (LayerNorm) and the variance around it in a second pass over the
// shared copy (two passes are exact where E[x^2] - E[x]^2 cancels; the second also sums s - mean,
// which corrects the mean's rounding), or the mean square (RMSNorm);
// finally write ((summed - mean) - corr) * rstd * weight + bias, the row's mean held as the pair
// (mean, corr): mean the float32 mean that is saved, corr = sum(s - mean)/d the part of the row's
// mean a float32 cannot hold (see the forward kernel). RMSNorm: mean = corr = 0.
//
// Backward, with xhat = ((s - mean) - corr) * rstd (RMSNorm: s * rstd), corr recomputed from the
// row and the saved mean in the first pass, and g = dout * weight:
//   ds   = rstd * (g - mean(g) - xhat * mean(g * xhat))      (RMSNorm: without the mean(g) term)
//   dsum = ds + dsummed,   dx = dropout(dsum) (only when dropout is on)
//   dweight = sum over rows of dout * xhat,   dbias = sum over rows of dout.
// A fixed grid of blocks walks the rows; each block accumulates its rows' dweight/dbias in shared
// memory (each thread owns fixed columns) and writes one partial row; a second kernel sums the
// partials in a fixed order. No atomics: the result is deterministic.
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fused_attn_cuda {
namespace {

constexpr int kMaxThreads = 512;

// N consecutive elements of a row as floats; one or two 16-byte loads when N * sizeof(U) allows.
template <typename U, int N>
__device__ __forceinline__ void load_n(const U* p, float (&v)[N]) {
  if constexpr (N > 1 && (N * sizeof(U)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(U);
#pragma unroll
    for (int l = 0; l < N / kPer; ++l) {
      union { uint4 raw; U e[kPer]; } chunk;
      chunk.raw = reinterpret_cast<const uint4*>(p)[l];
#pragma unroll
      for (int t = 0; t < kPer; ++t) v[l * kPer + t] = to_float<U>(chunk.e[t]);
    }
  } else {
#pragma unroll
    for (int t = 0; t < N; ++t) v[t] = to_float<U>(p[t]);
  }
}

template <typename U, int N>
__device__ __forceinline__ void store_n(U* p, const float (&v)[N]) {
  if constexpr (N > 1 && (N * sizeof(U)) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(U);
#pragma unroll
    for (int l = 0; l < N / kPer; ++l) {
      union { uint4 raw; U e[kPer]; } chunk;
#pragma unroll
      for (int t = 0; t < kPer; ++t) chunk.e[t] = from_float<U>(v[l * kPer + t]);
      reinterpret_cast<uint4*>(p)[l] = chunk.raw;
    }
  } else {
#pragma unroll
    for (int t = 0; t < N; ++t) p[t] = from_float<U>(v[t]);
  }
}

// The power of two q with q^2 <= 1/d < 4 q^2 (fused_attn.ops_common.norm_stat_scale). The row
// statistics sum scaled terms, so that they overflow float only where the statistic itself does
// (a plain sum of squares overflowed at +-1e18 over 1024 columns, whose variance is 1e36:
// LayerNorm gave NaN, RMSNorm a silent row of bias): the mean is sum(s q^2) / d / q^2 and the
// mean square sum((s q)^2) / d / q^2, no partial sum beyond max |s| or the mean square; the
// deviations e = s - mean0 are scaled by t = q / max(1, |mean0| / 2^60), each (e t)^2 at most the
// variance plus mean0's rounding squared, which t keeps in range up to float's largest means.
// Powers of two round nothing: below 2^60 the results are the unscaled ones, bit for bit, wherever
// those did not overflow. (The Triton kernel scales alike.)
__device__ __forceinline__ float norm_stat_scale(int64_t d) {
  int k = 0;  // 2^k >= d
  while ((int64_t{1} << k) < d) ++k;
  return ldexpf(1.0f, -((k + 1) / 2));
}

// T: x/weight/bias/out, R: residual, S: summed. N: elements per thread step (16 bytes of T when
// the rows are aligned, else 1). Dynamic shared memory: hidden floats (the row) + 32 (scratch).
template <typename T, typename R, typename S, int N>
__global__ void layer_norm_fwd_kernel(const LayerNormFwdArgs a) {
  extern __shared__ float smem_f[];
  float* row_cache = smem_f;
  float* scratch = smem_f + a.hidden;
  const int64_t row = blockIdx.x;
  const int chunks = static_cast<int>(a.hidden / N);
  const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride;
  const R* res = a.residual ? static_cast<const R*>(a.residual) + row * a.residual_row_stride : nullptr;
  // summed may be null (inference without prenorm): the sum then lives only in the row cache
  S* summed = a.summed ? static_cast<S*>(a.summed) + row * a.hidden : nullptr;
  const uint32_t key = a.dropout.enabled ? dropout_row_key(a.dropout, row) : 0u;

  const float q = norm_stat_scale(a.hidden), q2 = q * q;
  float sum = 0.0f, sum_sq = 0.0f;  // of s q^2 and (s q)^2 (see norm_stat_scale)
  for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
    const int c0 = ch * N;
    float v[N];
    load_n<T, N>(x + c0, v);
    if (a.dropout.enabled) {  // the reference drops in x's dtype: round(x * factor)
#pragma unroll
      for (int t = 0; t < N; ++t) v[t] = round_to<T>(v[t] * dropout_factor(a.dropout, key, c0 + t));
    }
    if (res) {
      float r[N];
      load_n<R, N>(res + c0, r);
#pragma unroll
      for (int t = 0; t < N; ++t) v[t] = round_to<S>(v[t] + r[t]);  // the sum as stored in summed's dtype
    }
    if (summed) store_n<S, N>(summed + c0, v);
#pragma unroll
    for (int t = 0; t < N; ++t) {
      row_cache[c0 + t] = v[t];
      sum += v[t] * q2;
      const float vq = v[t] * q;
      sum_sq += vq * vq;
    }
  }
  const float inv_d = 1.0f / static_cast<float>(a.hidden);
  float mean = 0.0f, corr = 0.0f, var;
  if (a.rms) {
    var = block_sum(sum_sq, scratch) * inv_d / q2;  // the mean square
  } else {
    mean = block_sum(sum, scratch) * inv_d / q2;
    // Beyond 2^60 the mean's rounding, a few ulps of a huge number, swamped the variance of a
    // (nearly) constant row (a constant 1e20: rstd 2e-11, not 1/sqrt(eps); 1e36: NaN): there the
    // deviations are taken from the row's first element when it lies within 2^-14 |mean| (the
    // Triton kernel's _origin); a constant row's are then exactly 0. (block_sum synchronised the
    // row cache.)
    const float s0 = row_cache[0];
    if (fabsf(mean) > 1.152921504606847e18f && fabsf(s0 - mean) <= fabsf(mean) * 6.103515625e-05f) mean = s0;
    // The corrected two-pass variance: with e = s - mean, mean += sum(e)/d and var = (sum(e^2) -
    // sum(e)^2/d)/d. The first mean is a few ulps off (a float sum of the whole row), a visible
    // shift of xhat on rows whose mean is large against their spread (mean 30, std 0.01); sum(e)
    // is small and exact enough to correct it. (e1^2/d <= e2 exactly; the guard only keeps rounding
    // from going negative, and lets a NaN through, as fmaxf would not.)
    // The sums are of e t (see norm_stat_scale): e1 = t sum(e), e2 = t^2 sum(e^2).
    const float ts = q / fmaxf(fabsf(mean) * 8.673617379884035e-19f, 1.0f);  // 2^-60
    float centred = 0.0f, centred_sum = 0.0f;
    for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
#pragma unroll
      for (int t = 0; t < N; ++t) {
        const float dv = (row_cache[ch * N + t] - mean) * ts;
        centred_sum += dv;
        centred += dv * dv;
      }
    }
    const float e1 = block_sum(centred_sum, scratch);
    const float e2 = block_sum(centred, scratch);
    const float c = e1 * inv_d;
    const float m2 = e2 - e1 * c;
    // The corrected mean, mean0 + sum(e)/d, is saved rounded to float, but the row is normalised
    // with the pair (mean, corr), corr = sum(s - mean)/d the part of the mean the float cannot
    // hold. A single float mean fails where the row's spread is only a few float ulps of its mean
    // (|mean|/std beyond ~2^22, 1e4 +- 2e-3): its rounding, up to ulp(mean)/2, shifted every
    // xhat by up to ulp(mean)/(2 std) (out off by 0.05, dx by 0.25 %). With the pair, s - mean is
    // exact on such rows (Sterbenz: s and mean within a factor of 2 of each other), as is
    // hi = mean - mean0, and xhat = ((s - mean) - corr) * rstd rounds only that small difference.
    // corr = sum(e - hi)/d as (e1 - d hi t)/d/t: for a constant row d hi t is e1 exactly and corr
    // exactly 0 (out exactly the bias), where sum(e)/d - hi kept inv_d's rounding. The backward
    // recomputes corr from the row and the saved mean.
    const float mean0 = mean;
    mean = mean0 + c / ts;
    const float hi = mean - mean0;
    corr = (e1 - static_cast<float>(a.hidden) * (hi * ts)) * inv_d / ts;
    var = (m2 < 0.0f ? 0.0f : m2) * inv_d / ts / ts;
  }
  // LayerNorm: a variance beyond float's range gives NaN, as torch does (rsqrt(inf) = 0 gave out =
  // bias and dx = 0 silently); RMSNorm keeps 0, as torch's rms_norm does.
  const float rstd = (!a.rms && var == INFINITY) ? NAN : rsqrtf(var + a.eps);
  if (threadIdx.x == 0) {
    a.rstd[row] = rstd;
    if (a.mean) a.mean[row] = mean;
  }
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out) + row * a.hidden;
  for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
    const int c0 = ch * N;
    float y[N], w[N], b[N];
    if (weight) load_n<T, N>(weight + c0, w);
    if (bias) load_n<T, N>(bias + c0, b);
#pragma unroll
    for (int t = 0; t < N; ++t) {
      y[t] = ((row_cache[c0 + t] - mean) - corr) * rstd;
      if (weight) y[t] *= w[t];
      if (bias) y[t] += b[t];
    }
    store_n<T, N>(out + c0, y);
  }
}

// T: dout/weight/dx (x's dtype), S: summed/dsummed/dsum. Dynamic shared memory: 2 * hidden floats
// (this block's dweight and dbias partials) + 32 (scratch).
template <typename T, typename S, int N>
__global__ void layer_norm_bwd_kernel(const LayerNormBwdArgs a) {
  extern __shared__ float smem_f[];
  float* dw_part = smem_f;
  float* db_part = smem_f + a.hidden;
  float* scratch = smem_f + 2 * a.hidden;
  const int chunks = static_cast<int>(a.hidden / N);
  const T* weight = static_cast<const T*>(a.weight);
  for (int c = threadIdx.x * N; c < a.hidden; c += blockDim.x * N) {  // the columns this thread owns
#pragma unroll
    for (int t = 0; t < N; ++t) dw_part[c + t] = db_part[c + t] = 0.0f;
  }
  const float inv_d = 1.0f / static_cast<float>(a.hidden);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const float mean = a.rms ? 0.0f : a.mean[row];
    const float rstd = a.rstd[row];
    const S* summed = static_cast<const S*>(a.summed) + row * a.hidden;
    const T* dout = static_cast<const T*>(a.dout) + row * a.dout_row_stride;
    // First pass: with e = s - mean and xh0 = e * rstd, the sums of e, g and g * xh0; then
    // corr = sum(e)/d (the forward's: the part of the row's mean the saved float mean cannot hold)
    // and sum(g * xhat) = sum(g * xh0) - corr * rstd * sum(g). (xh0 rather than e in the product
    // keeps its terms as small as g * xhat's.) dweight needs xhat, so it waits for the second pass.
    float sum_g = 0.0f, sum_gx = 0.0f, sum_e = 0.0f;
    for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {
      const int c0 = ch * N;
      float s[N], dy[N], w[N];
      load_n<S, N>(summed + c0, s);
      load_n<T, N>(dout + c0, dy);
      if (weight) load_n<T, N>(weight + c0, w);
#pragma unroll
      for (int t = 0; t < N; ++t) {
        const float e = s[t] - mean;
        const float g = weight ? dy[t] * w[t] : dy[t];
        sum_e += e;
        sum_g += g;
        sum_gx += g * (e * rstd);
        db_part[c0 + t] += dy[t];
      }
    }
    const float corr = a.rms ? 0.0f : block_sum(sum_e, scratch) * inv_d;
    const float total_g = a.rms ? 0.0f : block_sum(sum_g, scratch);
    float total_gx = block_sum(sum_gx, scratch);
    if (!a.rms) total_gx -= corr * rstd * total_g;
    const float mean_g = total_g * inv_d;
    const float mean_gx = total_gx * inv_d;
    const S* dsummed = a.dsummed ? static_cast<const S*>(a.dsummed) + row * a.dsummed_row_stride : nullptr;
    S* dsum = static_cast<S*>(a.dsum) + row * a.hidden;
    T* dx = a.dx ? static_cast<T*>(a.dx) + row * a.hidden : nullptr;
    const uint32_t key = a.dropout.enabled ? dropout_row_key(a.dropout, row) : 0u;
    for (int ch = threadIdx.x; ch < chunks; ch += blockDim.x) {  // second read: from L1/L2
      const int c0 = ch * N;
      float s[N], dy[N], w[N], ds[N] = {};
      load_n<S, N>(summed + c0, s);
      load_n<T, N>(dout + c0, dy);
      if (weight) load_n<T, N>(weight + c0, w);
      if (dsummed) load_n<S, N>(dsummed + c0, ds);
#pragma unroll
      for (int t = 0; t < N; ++t) {
        const float xhat = ((s[t] - mean) - corr) * rstd;
        const float g = weight ? dy[t] * w[t] : dy[t];
        const float grad = rstd * (g - mean_g - xhat * mean_gx);
        ds[t] = dsummed ? grad + ds[t] : grad;
        dw_part[c0 + t] += dy[t] * xhat;
      }
      store_n<S, N>(dsum + c0, ds);
      if (dx) {  // dx = dropout(dsum) in x's dtype, as the reference: round(round(dsum) * factor)
        float v[N];
#pragma unroll
        for (int t = 0; t < N; ++t) {
          v[t] = round_to<T>(round_to<S>(ds[t])) * dropout_factor(a.dropout, key, c0 + t);
        }
        store_n<T, N>(dx + c0, v);
      }
    }
  }
  __syncthreads();
  float* out_w = a.partials + int64_t(blockIdx.x) * 2 * a.hidden;
  for (int c = threadIdx.x; c < a.hidden; c += blockDim.x) {
    out_w[c] = dw_part[c];
    out_w[a.hidden + c] = db_part[c];
  }
}

// dweight[c] = sum_p partials[p][0][c], dbias[c] = sum_p partials[p][1][c], in a fixed order.
template <typename T>
__global__ void layer_norm_bwd_reduce_kernel(const LayerNormBwdArgs a, int64_t parts) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.hidden) return;
  float dw = 0.0f, db = 0.0f;
  for (int64_t p = 0; p < parts; ++p) {
    dw += a.partials[p * 2 * a.hidden + c];
    db += a.partials[p * 2 * a.hidden + a.hidden + c];
  }
  if (a.dweight) static_cast<T*>(a.dweight)[c] = from_float<T>(dw);
  if (a.dbias) static_cast<T*>(a.dbias)[c] = from_float<T>(db);
}

int threads_for(int64_t chunks) {
  int64_t t = round_up(chunks < 1 ? 1 : chunks, 32);
  return static_cast<int>(t > kMaxThreads ? kMaxThreads : t);
}

// Dynamic shared memory of the kernels: the forward keeps the row (hidden floats), the backward two
// rows of weight/bias partials; both 32 floats of scratch. fused_attn/backends/cuda.py mirrors these
// (_layer_norm_shared_memory) to decline up front a hidden size the device cannot take.
constexpr size_t layer_norm_fwd_smem_bytes(int64_t hidden) { return size_t(hidden + 32) * sizeof(float); }
constexpr size_t layer_norm_bwd_smem_bytes(int64_t hidden) { return size_t(2 * hidden + 32) * sizeof(float); }

// ---- host side (compiled under the CPU emulation too: tests/cuda_emu runs these launchers) ----
bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename T, typename R, typename S>
const char* fwd_typed(const LayerNormFwdArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.hidden % kVec == 0 && a.x_row_stride % kVec == 0 && a.residual_row_stride % kVec == 0 &&
                   aligned16(a.x) && aligned16(a.residual) && aligned16(a.weight) && aligned16(a.bias) &&
                   aligned16(a.out) && aligned16(a.summed);
  const size_t smem = layer_norm_fwd_smem_bytes(a.hidden);
  if (smem > static_cast<size_t>(max_shared_memory_per_block()))
    return "layer_norm_residual: hidden size too large for this device's shared memory";
  auto kernel = vec ? layer_norm_fwd_kernel<T, R, S, kVec> : layer_norm_fwd_kernel<T, R, S, 1>;
  return launch(kernel, dim3(static_cast<unsigned>(a.rows)), threads_for(a.hidden / (vec ? kVec : 1)), smem, stream,
                a);
}

template <typename T, typename S>
const char* bwd_typed(const LayerNormBwdArgs& a, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.hidden % kVec == 0 && a.dout_row_stride % kVec == 0 && a.dsummed_row_stride % kVec == 0 &&
                   aligned16(a.dout) && aligned16(a.dsummed) && aligned16(a.summed) && aligned16(a.weight) &&
                   aligned16(a.dsum) && aligned16(a.dx);
  const int64_t parts = layer_norm_bwd_partial_rows(a.rows);
  if (parts > 0) {
    const size_t smem = layer_norm_bwd_smem_bytes(a.hidden);
    if (smem > static_cast<size_t>(max_shared_memory_per_block()))
      return "layer_norm_residual: hidden size too large for this device's shared memory";
    auto kernel = vec ? layer_norm_bwd_kernel<T, S, kVec> : layer_norm_bwd_kernel<T, S, 1>;
    if (const char* err = launch(kernel, dim3(static_cast<unsigned>(parts)), threads_for(a.hidden / (vec ? kVec : 1)),
                                 smem, stream, a))
      return err;
  }
  if (a.dweight || a.dbias)
    return launch(layer_norm_bwd_reduce_kernel<T>, dim3(static_cast<unsigned>(ceil_div(a.hidden, 256))), 256, 0,
                  stream, a, parts);
  return nullptr;
}

}  // namespace

int64_t layer_norm_bwd_partial_rows(int64_t rows) {
  const int64_t blocks = 2 * static_cast<int64_t>(multiprocessor_count());
  return rows < blocks ? rows : blocks;
}

const char* layer_norm_fwd(const LayerNormFwdArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.hidden < 0) return "layer_norm_residual: negative size";
  if (a.rows > 0x7fffffffLL) return "layer_norm_residual: too many rows for the grid";
  if (a.hidden > 0x7fffffffLL) return "layer_norm_residual: hidden size too large";
  if (a.rows == 0 || a.hidden == 0) return nullptr;
  const bool fp32_sum = a.summed_dtype == DType::kFloat32;
  const bool fp32_res = a.residual_dtype == DType::kFloat32;
  return dispatch_dtype(a.dtype, [&](auto zero) -> const char* {
    using T = decltype(zero);
    if (std::is_same<T, float>::value || (!fp32_sum && !fp32_res)) return fwd_typed<T, T, T>(a, stream);
    if (!fp32_sum) return "layer_norm_residual: a float32 residual needs a float32 sum";
    return fp32_res ? fwd_typed<T, float, float>(a, stream) : fwd_typed<T, T, float>(a, stream);
  });
}

const char* layer_norm_bwd(const LayerNormBwdArgs& a, cudaStream_t stream) {
  if (a.rows < 0 || a.hidden < 0) return "layer_norm_residual: negative size";
  if (a.hidden > 0x7fffffffLL) return "layer_norm_residual: hidden size too large";
  if (a.hidden == 0) return nullptr;
  if (a.x_dtype != a.dtype) return "layer_norm_residual: dout must have x's dtype";
  return dispatch_dtype(a.dtype, [&](auto zero) -> const char* {
    using T = decltype(zero);
    if (std::is_same<T, float>::value || a.summed_dtype != DType::kFloat32) return bwd_typed<T, T>(a, stream);
    return bwd_typed<T, float>(a, stream);
  });
}

}  // namespace fused_attn_cuda
