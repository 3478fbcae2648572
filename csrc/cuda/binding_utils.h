// Helpers shared by the torch bindings of the CUDA kernels (csrc/cuda/*_binding.cpp): argument
// checks with messages naming the argument, dtype mapping, dropout arguments.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/Exception.h>

#include <string>

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

// Makes a CUDA device current for its scope and restores the previous one, as c10::cuda::CUDAGuard
// does, through the same libc10_cuda calls (ExchangeDevice, MaybeSetDevice), but without formatting
// through std::ostream (check.h: the device build crashed there): CUDAGuard's inline constructor
// checks the device type with TORCH_CHECK(..., DeviceType), an ostringstream instantiated in every
// function of ours that took one, and its destructor warns through another. Our checks have put
// every tensor on a CUDA device before a guard is made (check_tensor).
class DeviceGuard {
 public:
  explicit DeviceGuard(const c10::Device& device) : previous_(c10::cuda::ExchangeDevice(device.index())) {}
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  ~DeviceGuard() {
    const cudaError_t err = c10::cuda::MaybeSetDevice(previous_);
    if (C10_UNLIKELY(err != cudaSuccess)) {  // (a destructor must not throw: CUDAGuard warns too)
      (void)cudaGetLastError();
      std::string message = "fused_attn_C: could not restore CUDA device ";
      message += std::to_string(static_cast<int>(previous_));
      message += ": ";
      message += cudaGetErrorString(err);
      c10::warn(c10::Warning(c10::UserWarning(), {__func__, __FILE__, static_cast<uint32_t>(__LINE__)},
                             std::move(message), false));
    }
  }

 private:
  c10::DeviceIndex previous_;
};

inline void check_status(const char* message, const char* op) {
  FA_CHECK(message == nullptr, "fused_attn_C::", op, " (cuda): ", message);
}

}  // namespace fused_attn_cuda
