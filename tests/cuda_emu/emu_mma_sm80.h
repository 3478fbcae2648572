// CPU emulation of csrc/cuda/mma_sm80.cuh's warp primitives (mma.sync m16n8k16, ldmatrix.x4 and
// its .trans form, cp.async), written from the PTX ISA's fragment layouts (see that header).
//
// A warp-wide instruction becomes: every lane writes its operands (registers or an address) into
// the block's per-lane scratch, a warp barrier, every lane computes its own result from all 32
// lanes' operands, a second warp barrier (so the scratch may be reused). The layouts here are
// independent of the kernels' use of them: tests/test_cuda_emulated.py checks them against plain
// matrix products, so a kernel that indexes fragments wrongly fails against the reference.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fused_attn_cuda {

template <typename T> inline uint16_t emu_bits(float x) {
  const T v = from_float<T>(x);
  uint16_t bits;
  std::memcpy(&bits, &v, 2);
  return bits;
}

template <typename T> inline float emu_value(uint16_t bits) {
  T v;
  std::memcpy(&v, &bits, 2);
  return to_float<T>(v);
}

template <typename T> inline uint32_t pack2(float x, float y) {
  return uint32_t(emu_bits<T>(x)) | (uint32_t(emu_bits<T>(y)) << 16);
}

namespace emu_detail {
inline uint32_t* lane_words(unsigned lane_in_block) { return &emu::block->words[lane_in_block * 8]; }
inline void warp_barrier() { emu::block->warps[threadIdx.x / 32]->arrive_and_wait(); }
// element `half` (0 = low) of a 32-bit register
inline uint16_t half_of(uint32_t reg, int half) { return static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu); }
}  // namespace emu_detail

template <typename T> inline void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  using namespace emu_detail;
  const unsigned warp_base = threadIdx.x & ~31u, lane = threadIdx.x & 31u;
  uint32_t* mine = lane_words(threadIdx.x);
  for (int r = 0; r < 4; ++r) mine[r] = a[r];
  mine[4] = b[0];
  mine[5] = b[1];
  warp_barrier();
  // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row / 8) + 2 * (k / 8), half k % 2
  auto A = [&](int row, int k) {
    const uint32_t reg = lane_words(warp_base + (row % 8) * 4 + (k % 8) / 2)[(row / 8) + 2 * (k / 8)];
    return emu_value<T>(half_of(reg, k % 2));
  };
  // B[k][n]: lane n * 4 + (k % 8) / 2, register 4 + k / 8, half k % 2
  auto B = [&](int k, int n) {
    const uint32_t reg = lane_words(warp_base + n * 4 + (k % 8) / 2)[4 + k / 8];
    return emu_value<T>(half_of(reg, k % 2));
  };
  const int g = static_cast<int>(lane / 4), t = static_cast<int>(lane % 4);
  float result[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + (e / 2) * 8, col = 2 * t + (e % 2);
    double acc = d[e];
    for (int k = 0; k < 16; ++k) acc += double(A(row, k)) * double(B(k, col));
    result[e] = static_cast<float>(acc);
  }
  warp_barrier();
  for (int e = 0; e < 4; ++e) d[e] = result[e];
}

template <bool kTrans> inline void ldmatrix_x4(uint32_t r[4], const void* row_address) {
  using namespace emu_detail;
  const unsigned warp_base = threadIdx.x & ~31u, lane = threadIdx.x & 31u;
  emu::block->addresses[threadIdx.x] = row_address;
  warp_barrier();
  // element (row, col) of matrix m: 16-bit word col of the row whose address lane m * 8 + row gave
  auto element = [&](int m, int row, int col) {
    uint16_t bits;
    std::memcpy(&bits, static_cast<const unsigned char*>(emu::block->addresses[warp_base + m * 8 + row]) + 2 * col, 2);
    return bits;
  };
  const int g = static_cast<int>(lane / 4), t = static_cast<int>(lane % 4);
  uint32_t result[4];
  for (int m = 0; m < 4; ++m) {
    const uint16_t lo = kTrans ? element(m, 2 * t, g) : element(m, g, 2 * t);
    const uint16_t hi = kTrans ? element(m, 2 * t + 1, g) : element(m, g, 2 * t + 1);
    result[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
  warp_barrier();
  for (int m = 0; m < 4; ++m) r[m] = result[m];
}

// The copies complete at once; the kernel's waits and barriers then order them as on the GPU.
inline void cp_async_16(void* smem_dst, const void* global_src, bool valid) {
  if (valid) {
    std::memcpy(smem_dst, global_src, 16);
  } else {
    std::memset(smem_dst, 0, 16);
  }
}
inline void cp_async_commit() {}
template <int kPending> inline void cp_async_wait() {}

}  // namespace fused_attn_cuda
