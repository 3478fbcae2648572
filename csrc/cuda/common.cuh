// Device helpers shared by the CUDA kernels: dtype conversions, warp/block reductions, the
// dropout factors, dtype dispatch and the launch-error check. No torch headers.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <mutex>
#include <set>
#include <type_traits>
#include <utility>

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

// A launcher's error message with numbers in it: formatted into a buffer of the calling thread, valid
// until the thread's next such message (the bindings turn it into their error at once).
#if defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
inline const char* format_message(const char* format, ...) {
  thread_local char buffer[256];
  va_list args;
  va_start(args, format);
  std::vsnprintf(buffer, sizeof(buffer), format, args);
  va_end(args);
  return buffer;
}

// The current device's largest grid, per dimension (x: 2^31 - 1, y and z: 65535 on every GPU so far).
struct GridLimits { int64_t x, y, z; };
inline GridLimits grid_limits() {
  return {device_attribute(cudaDevAttrMaxGridDimX, 0x7fffffff), device_attribute(cudaDevAttrMaxGridDimY, 65535),
          device_attribute(cudaDevAttrMaxGridDimZ, 65535)};
}

// ---- launches ------------------------------------------------------------------------------------
// A block may take up to 48 KB of dynamic shared memory unless its kernel's
// cudaFuncAttributeMaxDynamicSharedMemorySize allows more. That attribute belongs to the kernel on a
// device, not to a launch or a thread: the launchers used to set it to each call's own size before
// launching, so a thread could lower it between another thread's setting and that thread's launch
// (A sets 65 664 bytes, B sets 4 224, A's launch fails with an invalid argument), and calls may come
// from several threads. It is only a ceiling (occupancy follows each launch's own size), so it is
// raised once per (kernel, device) to all the device lets a block opt in to, less the kernel's static
// shared memory, and never lowered. The mutex makes a thread's launch wait until the ceiling is
// raised, whichever thread raises it; after that a launch pays one uncontended lock and a lookup.
// (A cudaDeviceReset would drop the attributes the set remembers; torch never resets a device.)
inline const char* raise_dynamic_smem_ceiling(const void* kernel) {
  static std::mutex mutex;
  static std::set<std::pair<const void*, int>> raised;  // (kernel, device)
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return last_launch_error();
  const std::lock_guard<std::mutex> lock(mutex);
  if (raised.count({kernel, device}) != 0) return nullptr;
  int optin = 0;
  cudaFuncAttributes attributes{};
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaFuncGetAttributes(&attributes, kernel) != cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           optin - static_cast<int>(attributes.sharedSizeBytes)) != cudaSuccess)
    return last_launch_error();
  raised.insert({kernel, device});
  return nullptr;
}

// kernel<<<grid, block, smem, stream>>>(args...) with its error check; a kernel launched with dynamic
// shared memory first has its ceiling raised (above). Under the CPU emulation (tests/cuda_emu) the
// kernel runs on CPU threads, with the checks a device makes at launch.
template <typename Kernel, typename... Args>
const char* launch(Kernel kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const Args&... args) {
  if (smem > 0) {
    if (const char* err = raise_dynamic_smem_ceiling(reinterpret_cast<const void*>(kernel))) return err;
  }
#ifdef FUSED_ATTN_CPU_EMULATION
  emu::launch_checked(grid, block, smem, stream, kernel, args...);
#else
  kernel<<<grid, block, smem, stream>>>(args...);
#endif
  return last_launch_error();
}

}  // namespace fused_attn_cuda
