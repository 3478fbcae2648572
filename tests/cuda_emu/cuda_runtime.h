// CPU emulation of the few CUDA features the kernels in csrc/cuda use, so that their float32
// paths can run on a machine without a GPU (tests/test_cuda_emulated.py). Each CUDA thread is a
// std::thread; __syncthreads is a std::barrier over the block, warp shuffles exchange through a
// per-warp array between two warp barriers; blocks run one after another, so shared memory is a
// plain global array. The WMMA products have no emulation, so of the block_gemm kernels only the
// float32 instantiations run here; the register-resident kernels' warp primitives (mma.sync,
// ldmatrix, cp.async) are emulated in emu_mma_sm80.h, so they run in float16 and bfloat16.
//
// The runtime API the launchers call is emulated too (emu::Device below): a table of devices with
// their attributes (compute capability, opt-in shared memory, grid limits), a current device per
// thread, the last error per thread, each kernel's dynamic shared-memory ceiling per device
// (cudaFuncSetAttribute, recorded), and the checks a device makes at a launch (grid and block
// within the limits, dynamic shared memory within the kernel's ceiling). A thread may ask for dry
// runs: launches are checked and recorded, not run (grids far too large to run on CPU threads).
#pragma once

#include <barrier>
#include <climits>
#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

typedef struct CUstream_st* cudaStream_t;
// (the values of CUDA's own enums)
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorUnknown = 999
};
enum cudaDeviceAttr {
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
struct cudaFuncAttributes {
  size_t sharedSizeBytes;  // static shared memory (none of the kernels has any)
  int maxDynamicSharedSizeBytes;
};

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return uint4{a, b, c, d}; }

inline thread_local uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
// An emulated device. The defaults are an H100/H200's (sm_90); the opt-in shared memory must stay
// within the emulation's shared-memory buffers (256 KB) for kernels that really run.
struct Device {
  int cc_major = 9;
  int optin = 232448;    // cudaDevAttrMaxSharedMemoryPerBlockOptin
  int sms = 132;
  int64_t max_grid[3] = {INT_MAX, 65535, 65535};
};
struct AttributeCall { const void* kernel; int device; int attribute; int value; };
struct LaunchRecord { const void* kernel; int device; dim3 grid, block; size_t smem; };

inline std::mutex state_mutex;  // guards devices, ceilings, attribute_calls
inline std::vector<Device> devices(1);
inline std::map<std::pair<const void*, int>, int> ceilings;  // (kernel, device) -> max dynamic smem
inline std::vector<AttributeCall> attribute_calls;            // every cudaFuncSetAttribute, in order
inline thread_local int current_device = 0;
inline thread_local cudaError_t last_error = cudaSuccess;
inline thread_local bool dry_run = false;
inline thread_local std::vector<LaunchRecord> launches;  // this thread's checked launches

inline cudaError_t fail(cudaError_t err) {
  last_error = err;  // a runtime call's error is also the thread's last error, as in CUDA
  return err;
}
inline bool valid_device(int device) {
  const std::lock_guard<std::mutex> lock(state_mutex);
  return device >= 0 && device < static_cast<int>(devices.size());
}
inline Device device(int index) {
  const std::lock_guard<std::mutex> lock(state_mutex);
  return devices[static_cast<size_t>(index)];
}
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::last_error;
  emu::last_error = cudaSuccess;
  return err;
}
inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    default: return "unknown error";
  }
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = emu::current_device;
  return emu::valid_device(*device) ? cudaSuccess : emu::fail(cudaErrorInvalidDevice);
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int index) {
  if (!emu::valid_device(index)) return emu::fail(cudaErrorInvalidDevice);
  const emu::Device d = emu::device(index);
  switch (attr) {
    case cudaDevAttrMaxGridDimX: *value = static_cast<int>(d.max_grid[0]); return cudaSuccess;
    case cudaDevAttrMaxGridDimY: *value = static_cast<int>(d.max_grid[1]); return cudaSuccess;
    case cudaDevAttrMaxGridDimZ: *value = static_cast<int>(d.max_grid[2]); return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.cc_major; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.optin; return cudaSuccess;
  }
  return emu::fail(cudaErrorInvalidValue);
}
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return cudaErrorInvalidDevice;
  const std::lock_guard<std::mutex> lock(emu::state_mutex);
  const auto it = emu::ceilings.find({kernel, device});
  attributes->sharedSizeBytes = 0;
  attributes->maxDynamicSharedSizeBytes = it == emu::ceilings.end() ? 48 * 1024 : it->second;
  return cudaSuccess;
}
// Sets the kernel's ceiling on the current device (CUDA refuses more than the opt-in limit less the
// static shared memory, here 0), and records the call.
inline cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attr, int value) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return cudaErrorInvalidDevice;
  const emu::Device d = emu::device(device);
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > d.optin)
    return emu::fail(cudaErrorInvalidValue);
  {
    const std::lock_guard<std::mutex> lock(emu::state_mutex);
    emu::attribute_calls.push_back({kernel, device, static_cast<int>(attr), value});
    emu::ceilings[{kernel, device}] = value;
  }
  std::this_thread::yield();  // (a driver call takes its time: other threads run meanwhile)
  return cudaSuccess;
}

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
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b(threads.x);
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads.x; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = uint3{t, 0, 0};
            blockIdx = uint3{bx, by, bz};
            block = &b;
            kernel(args...);
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}

// kernel<<<grid, threads, smem, stream>>>(args...) as csrc/cuda/common.cuh's `launch` issues it: the
// checks a device makes (else the thread's last error is set and nothing runs), then a record of
// the launch, then the run (unless this thread asked for dry runs).
template <typename Kernel, typename... Args>
void launch_checked(dim3 grid, dim3 threads, size_t smem, cudaStream_t, Kernel kernel, const Args&... args) {
  int index = 0;
  if (cudaGetDevice(&index) != cudaSuccess) return;
  const Device d = device(index);
  const unsigned dims[3] = {grid.x, grid.y, grid.z};
  for (int i = 0; i < 3; ++i) {
    if (dims[i] == 0 || dims[i] > d.max_grid[i]) {
      fail(cudaErrorInvalidConfiguration);
      return;
    }
  }
  if (threads.x == 0 || threads.x > 1024 || threads.y != 1 || threads.z != 1) {
    fail(cudaErrorInvalidConfiguration);
    return;
  }
  const void* id = reinterpret_cast<const void*>(kernel);
  cudaFuncAttributes attributes{};
  cudaFuncGetAttributes(&attributes, id);
  if (smem > static_cast<size_t>(attributes.maxDynamicSharedSizeBytes)) {
    fail(cudaErrorInvalidValue);  // what a GPU answers to a launch above the kernel's ceiling
    return;
  }
  launches.push_back({id, index, grid, threads, smem});
  if (!dry_run) launch(grid, threads, kernel, args...);
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
