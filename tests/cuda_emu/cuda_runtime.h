// CPU emulation of the few CUDA features the kernels in csrc/cuda use, so that their float32
// paths can run on a machine without a GPU (tests/test_cuda_emulated.py). Each CUDA thread is a
// std::thread; __syncthreads is a std::barrier over the block, warp shuffles exchange through a
// per-warp array between two warp barriers; blocks run one after another, so shared memory is a
// plain global array. The WMMA products have no emulation, so of the block_gemm kernels only the
// float32 instantiations run here; the register-resident kernels' warp primitives (mma.sync,
// ldmatrix, cp.async) are emulated in emu_mma_sm80.h, so they run in float16 and bfloat16.
#pragma once

#include <barrier>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorUnknown = 999 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t);
cudaError_t cudaGetDevice(int*);
cudaError_t cudaDeviceGetAttribute(int*, cudaDeviceAttr, int);

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline float __expf(float x) { return std::exp(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

namespace emu {
struct Block {
  explicit Block(unsigned threads) : all(threads), exchange(threads), words(threads * 8), addresses(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> all;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> exchange;
  std::vector<uint32_t> words;             // 8 registers a lane, for the warp primitives
  std::vector<const void*> addresses;      // one address a lane (ldmatrix)
};
inline thread_local Block* block = nullptr;

// Runs kernel(args...) over the grid, one std::thread per CUDA thread, one block at a time.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 threads, Kernel kernel, const Args&... args) {
  gridDim = grid;
  blockDim = threads;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      Block b(threads.x);
      std::vector<std::thread> pool;
      for (unsigned t = 0; t < threads.x; ++t) {
        pool.emplace_back([&, t] {
          threadIdx = uint3{t, 0, 0};
          blockIdx = uint3{bx, by, 0};
          block = &b;
          kernel(args...);
        });
      }
      for (auto& th : pool) th.join();
    }
  }
}
}  // namespace emu

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }

// a warp barrier over the calling thread's warp (all 32 lanes take part, as the kernels use it)
inline void __syncwarp(unsigned = 0xffffffffu) { emu::block->warps[threadIdx.x / 32]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  emu::Block& b = *emu::block;
  std::barrier<>& warp = *b.warps[threadIdx.x / 32];
  b.exchange[threadIdx.x] = value;
  warp.arrive_and_wait();
  const float other = b.exchange[(threadIdx.x & ~31u) | ((threadIdx.x & 31u) ^ unsigned(lane_mask))];
  warp.arrive_and_wait();
  return other;
}
