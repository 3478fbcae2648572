// CUDA implementation of fused_attn_C::rotary (RoPE; the contract is in csrc/ops.cpp): check the
// tensors, allocate the output and launch the kernel of rotary.cu. Nothing is copied: x, the
// tables and the positions are read through their own strides and dtypes.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_utils.h"
#include "launchers.h"
#include "../common/overlap.h"

namespace fused_attn_cuda {
namespace {

TableDType rotary_table_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return TableDType::kFloat16;
    case at::kBFloat16: return TableDType::kBFloat16;
    case at::kFloat: return TableDType::kFloat32;
    case at::kDouble: return TableDType::kFloat64;
    default: break;
  }
  FA_CHECK(false, "fused_attn_C::", op, " (cuda): ", name, " must be float16, bfloat16, float32 or float64, got ",
           t.scalar_type());
  return TableDType::kFloat32;
}

constexpr int64_t kInt32Max = 0x7fffffffLL;

// The checks and the launch, into `out` (a fresh at::empty_like(x), or rotary_out's: x itself for the
// embedding in place, which the kernel allows: each thread reads its pair or feature before writing it).
void rotary_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                 bool interleaved, bool conjugate, const at::Tensor* given_out, at::Tensor& out) {
  const char* op = given_out ? "rotary_out" : "rotary";
  check_tensor(x, x, 4, op, "x");
  RotaryArgs a{};
  a.dtype = dtype_of(x, op, "x");
  check_tensor(cos, x, 2, op, "cos");
  check_tensor(sin, x, 2, op, "sin");
  a.table_dtype = rotary_table_dtype(cos, op, "cos");
  check_dtype(sin, cos.scalar_type(), op, "sin");
  FA_CHECK(sin.sizes() == cos.sizes(), "fused_attn_C::", op, " (cuda): cos and sin must have one shape (S, R/2), got ",
           cos.sizes(), " and ", sin.sizes());
  check_tensor(positions, x, 2, op, "positions");
  FA_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, "fused_attn_C::", op,
           " (cuda): positions must be int32 or int64, got ", positions.scalar_type());
  a.batch = x.size(0);
  a.len = x.size(1);
  a.heads = x.size(2);
  a.head_dim = x.size(3);
  a.pairs = cos.size(1);
  a.rows = cos.size(0);
  FA_CHECK(a.pairs >= 1 && 2 * a.pairs <= a.head_dim, "fused_attn_C::", op,
           " (cuda): the rotary dim R = 2 * cos.size(1) must be in [2, D = ", a.head_dim, "], got cos of shape ",
           cos.sizes());
  FA_CHECK(positions.size(0) == a.batch && positions.size(1) == a.len, "fused_attn_C::", op,
           " (cuda): positions must have shape (B, L) = (", a.batch, ", ", a.len, "), got ", positions.sizes());
  // the kernel indexes tokens and a token's features in int32 (element offsets are int64)
  FA_CHECK(a.batch * a.len <= kInt32Max, "fused_attn_C::", op, " (cuda): B * L = ", a.batch * a.len,
           " tokens do not fit in 32 bits");
  FA_CHECK(a.heads * a.head_dim <= kInt32Max, "fused_attn_C::", op, " (cuda): H * D = ", a.heads * a.head_dim,
           " features per token do not fit in 32 bits");
  const DeviceGuard guard(x.device());
  if (given_out) {
    const at::Tensor& o = *given_out;
    FA_CHECK(o.device() == x.device() && o.scalar_type() == x.scalar_type() && o.sizes() == x.sizes(), "fused_attn_C::",
             op, " (cuda): out must have x's shape ", x.sizes(), ", dtype ", x.scalar_type(), " and device, got ",
             o.sizes(), " ", o.scalar_type(), " on ", o.device());
    FA_CHECK(!fused_attn::elements_may_overlap(o.sizes().data(), o.strides().data(), o.dim()), "fused_attn_C::", op,
             " (cuda): out must not have overlapping elements, got strides ", o.strides());
    FA_CHECK(o.is_same(x) || at::get_overlap_status(o, x) == at::MemOverlapStatus::No, "fused_attn_C::", op,
             " (cuda): out must be x itself or not overlap it");
    out = o;
  } else {
    out = at::empty_like(x);  // x's layout when x is dense, else contiguous: written through its strides
  }
  if (x.numel() == 0) return;
  FA_CHECK(a.rows >= 1, "fused_attn_C::", op, " (cuda): cos and sin have no rows, got shape ", cos.sizes());
  a.positions_int64 = positions.scalar_type() == at::kLong;
  a.interleaved = interleaved;
  a.conjugate = conjugate;
  a.x = x.data_ptr();
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.positions = positions.data_ptr();
  a.out = out.data_ptr();
  for (int d = 0; d < 4; ++d) {
    a.x_stride[d] = x.stride(d);
    a.out_stride[d] = out.stride(d);
  }
  for (int d = 0; d < 2; ++d) {
    a.cos_stride[d] = cos.stride(d);
    a.sin_stride[d] = sin.stride(d);
    a.positions_stride[d] = positions.stride(d);
  }
  check_status(rotary(a, c10::cuda::getCurrentCUDAStream().stream()), op);
}

at::Tensor rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                       bool interleaved, bool conjugate) {
  at::Tensor out;
  rotary_into(x, cos, sin, positions, interleaved, conjugate, nullptr, out);
  return out;
}

void rotary_out_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                     bool interleaved, bool conjugate, at::Tensor out) {
  at::Tensor written;
  rotary_into(x, cos, sin, positions, interleaved, conjugate, &out, written);
}

}  // namespace
}  // namespace fused_attn_cuda

TORCH_LIBRARY_IMPL(fused_attn_C, CUDA, m) {
  m.impl("rotary", &fused_attn_cuda::rotary_cuda);
  m.impl("rotary_out", &fused_attn_cuda::rotary_out_cuda);
}
