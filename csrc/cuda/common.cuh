// Device helpers shared by the CUDA kernels: dtype conversions, warp/block reductions, the
// dropout factors, dtype dispatch and the launch-error check. No torch headers.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../common/dropout_hash.h"
#include "launchers.h"

namespace fused_attn_cuda {

// ---- conversions (all arithmetic is float32) -------------------------------------------------
template <typename T> __device__ __forceinline__ float to_float(T x);
template <> __device__ __forceinline__ float to_float<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Round a float to T's precision and back (to reproduce a value the reference holds in T).
template <typename T> __device__ __forceinline__ float round_to(float x) { return to_float<T>(from_float<T>(x)); }

// ---- reductions --------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Over the 4 lanes of a quad (lane / 4 equal): one row of an mma.sync accumulator tile.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory; the call ends with a barrier so it can be reused.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  x = warp_sum(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < warps; ++w) total += scratch[w];  // same order in every thread: deterministic
  __syncthreads();
  return total;
}

// ---- dropout: the shared counter-based hash (csrc/common/dropout_hash.h, = fused_attn/_rng.py) --
__device__ __forceinline__ uint32_t dropout_row_key(const DropoutArgs& d, int64_t row) {
  return fused_attn::dropout_row_key(d.seed, d.offset, static_cast<uint64_t>(row));
}

// The factor dropout multiplies element (row_key, col) by: scale when kept, 0 when dropped.
__device__ __forceinline__ float dropout_factor(const DropoutArgs& d, uint32_t row_key, int64_t col) {
  return fused_attn::dropout_keep(row_key, static_cast<uint32_t>(col), d.threshold) ? d.scale : 0.0f;
}

// ---- dispatch and errors -----------------------------------------------------------------------
// Calls fn(T{}) with T the C++ type of `dtype`.
template <typename Fn>
inline const char* dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat16: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat32: return fn(float{});
  }
  return "unsupported dtype";
}

// The launch status: nullptr when the last launch on this thread succeeded.
inline const char* last_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// An attribute of the current device, or `fallback` when it cannot be read (the error is cleared).
inline int device_attribute(cudaDeviceAttr attr, int fallback) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess || cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) {
    cudaGetLastError();
    return fallback;
  }
  return value;
}

// The opt-in shared-memory limit per block (bytes).
inline int max_shared_memory_per_block() {
  return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 48 * 1024);
}
// The compute capability's major version (0 when unknown: no sm_80 paths then).
inline int compute_capability_major() { return device_attribute(cudaDevAttrComputeCapabilityMajor, 0); }
inline int multiprocessor_count() { return device_attribute(cudaDevAttrMultiProcessorCount, 108); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

}  // namespace fused_attn_cuda
