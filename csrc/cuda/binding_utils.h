// Helpers shared by the torch bindings of the CUDA kernels (csrc/cuda/*_binding.cpp): argument
// checks with messages naming the argument, dtype mapping, dropout arguments.
#pragma once

#include <ATen/ATen.h>

#include "../common/check.h"
#include "../common/dropout_hash.h"
#include "launchers.h"

namespace fused_attn_cuda {

inline DType dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat32;
    default: break;
  }
  FA_CHECK(false, "fused_attn_C::", op, " (cuda): ", name, " must be float16, bfloat16 or float32, got ",
              t.scalar_type());
  return DType::kFloat32;
}

// `t` is a CUDA tensor on `like`'s device, of `ndim` dimensions.
inline void check_tensor(const at::Tensor& t, const at::Tensor& like, int64_t ndim, const char* op, const char* name) {
  FA_CHECK(t.defined(), "fused_attn_C::", op, " (cuda): ", name, " is undefined");
  FA_CHECK(t.is_cuda(), "fused_attn_C::", op, " (cuda): ", name, " must be a CUDA tensor, got ", t.device());
  FA_CHECK(t.device() == like.device(), "fused_attn_C::", op, " (cuda): ", name, " is on ", t.device(),
              " but the other inputs are on ", like.device());
  FA_CHECK(t.dim() == ndim, "fused_attn_C::", op, " (cuda): ", name, " must be ", ndim, "-D, got shape ",
              t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  FA_CHECK(t.scalar_type() == dtype, "fused_attn_C::", op, " (cuda): ", name, " must have dtype ", dtype,
              ", got ", t.scalar_type());
}

inline DropoutArgs dropout_args(double p, int64_t seed, int64_t offset, const char* op) {
  FA_CHECK(p >= 0.0 && p < 1.0, "fused_attn_C::", op, " (cuda): dropout_p must be in [0, 1), got ", p);
  DropoutArgs d;
  if (p > 0.0) {
    d.enabled = true;
    d.seed = static_cast<uint64_t>(seed);
    d.offset = static_cast<uint64_t>(offset);
    d.threshold = fused_attn::dropout_threshold(p);
    d.scale = static_cast<float>(1.0 / (1.0 - p));
  }
  return d;
}

inline void check_status(const char* message, const char* op) {
  FA_CHECK(message == nullptr, "fused_attn_C::", op, " (cuda): ", message);
}

}  // namespace fused_attn_cuda
