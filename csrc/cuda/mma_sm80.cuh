// Warp-level tensor-core primitives of sm_80+ as small inline functions: `mma.sync` m16n8k16 with
// float32 accumulation, `ldmatrix` (plain and transposed) and `cp.async` 16-byte copies.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16", 16-bit A/B, float C/D). A lane is g * 4 + t with
// g = lane / 4 (the "group", 0..7) and t = lane % 4:
//   A (16 x 16, row major)  a[0] = A[g][2t..2t+1]      a[1] = A[g+8][2t..2t+1]
//                           a[2] = A[g][2t+8..2t+9]    a[3] = A[g+8][2t+8..2t+9]
//   B (16 x 8, "col")       b[0] = B[2t..2t+1][g]      b[1] = B[2t+8..2t+9][g]
//   C (16 x 8)              c[0..1] = C[g][2t..2t+1]   c[2..3] = C[g+8][2t..2t+1]
// Each 32-bit register holds two consecutive-k elements, the lower k in the low half.
//
// `ldmatrix.x4` loads four 8 x 8 16-bit matrices; lane l gives the address of row l % 8 of
// matrix l / 8 (16 contiguous bytes), and gets in register m the elements (l / 4, 2(l % 4) ..+1)
// of matrix m, or with `.trans` the elements (2(l % 4) ..+1, l / 4), i.e. of the transpose. So a
// row-major [rows][k] tile in shared memory gives A fragments (and B fragments of a [n][k] tile)
// with the plain form, and a [k][n] tile gives B fragments with `.trans`.
//
// Under FUSED_ATTN_CPU_EMULATION (tests/cuda_emu) the same functions are provided by the CPU
// emulation, which exchanges the lanes' registers through per-warp scratch memory.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.cuh"

#ifdef FUSED_ATTN_CPU_EMULATION
#include "emu_mma_sm80.h"
#else

namespace fused_attn_cuda {

// Two floats as one register of two 16-bit values (x in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float x, float y) {
  const T lo = from_float<T>(x), hi = from_float<T>(y);
  uint16_t lo_bits, hi_bits;
  memcpy(&lo_bits, &lo, 2);
  memcpy(&hi_bits, &hi, 2);
  return uint32_t(lo_bits) | (uint32_t(hi_bits) << 16);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
// These instructions need sm_80; the launchers only take this path on such devices.
#define FUSED_ATTN_MMA_UNSUPPORTED() __trap()
#endif

// d += A * B for one 16 x 8 x 16 tile (T = __half or __nv_bfloat16).
template <typename T> __device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#ifdef FUSED_ATTN_MMA_UNSUPPORTED
  FUSED_ATTN_MMA_UNSUPPORTED();
#else
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

template <bool kTrans> __device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row_address) {
#ifdef FUSED_ATTN_MMA_UNSUPPORTED
  FUSED_ATTN_MMA_UNSUPPORTED();
#else
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row_address)));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address(row_address)));
  }
#endif
}

// 16 bytes global -> shared without passing through registers; `valid` false writes zeros (the
// source is not read, but must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* global_src, bool valid) {
#ifdef FUSED_ATTN_MMA_UNSUPPORTED
  FUSED_ATTN_MMA_UNSUPPORTED();
#else
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem_dst)), "l"(global_src),
               "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef FUSED_ATTN_MMA_UNSUPPORTED
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `kPending` committed groups of this thread are still in flight.
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
#ifndef FUSED_ATTN_MMA_UNSUPPORTED
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
#endif
}

}  // namespace fused_attn_cuda

#endif  // FUSED_ATTN_CPU_EMULATION
