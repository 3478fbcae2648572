// The counter-based dropout hash shared by the C++ and CUDA kernels. It must match
// fused_attn/_rng.py bit for bit (tests compare dropout results of every backend with the
// reference exactly); see that file for the definition and for each op's (row, col) numbering.
// Torch-free, so both host compilers and nvcc include it.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FUSED_ATTN_HD __host__ __device__ __forceinline__
#else
#define FUSED_ATTN_HD inline
#endif

namespace fused_attn {

// Chris Wellons' "lowbias32" finaliser: a bijection of uint32 with good avalanche.
FUSED_ATTN_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Key of one logical row: computed once per row, then combined with each column.
FUSED_ATTN_HD uint32_t dropout_row_key(uint64_t seed, uint64_t offset, uint64_t row) {
  const uint64_t r = offset + row;
  return mix32(mix32(static_cast<uint32_t>(r) ^ static_cast<uint32_t>(seed)) ^ static_cast<uint32_t>(r >> 32) ^
               mix32(static_cast<uint32_t>(seed >> 32)));
}

FUSED_ATTN_HD uint32_t dropout_bits(uint32_t row_key, uint32_t col) { return mix32(mix32(row_key ^ col) + row_key); }

// Elements whose bits fall below the threshold are dropped: P(drop) = threshold / 2^32 = p.
FUSED_ATTN_HD uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

FUSED_ATTN_HD bool dropout_keep(uint32_t row_key, uint32_t col, uint32_t threshold) {
  return dropout_bits(row_key, col) >= threshold;
}

}  // namespace fused_attn
