// CUDA implementations of fused_attn_C::layer_norm_residual_fwd / _bwd: check the tensors,
// allocate the outputs and the workspace, and launch the kernels of layer_norm.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "binding_utils.h"
#include "launchers.h"

namespace fused_attn_cuda {
namespace {

// (N, d) with unit stride along d (a copy only when the rows are not unit-stride).
at::Tensor unit_stride_rows(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous(); }

const at::Tensor* present(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_residual_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, const std::optional<at::Tensor>& weight_in,
    const std::optional<at::Tensor>& bias_in, double eps, double dropout_p, bool rms, bool residual_in_fp32,
    int64_t seed, int64_t offset, bool store_summed) {
  // store_summed=false (inference without prenorm): the sum is neither allocated nor stored (the
  // kernel keeps it in shared memory only); an empty (0,) tensor is returned, as the op contract says.
  const char* op = "layer_norm_residual_fwd";
  check_tensor(x_in, x_in, 2, op, "x");
  LayerNormFwdArgs a{};
  a.dtype = dtype_of(x_in, op, "x");
  a.rows = x_in.size(0);
  a.hidden = x_in.size(1);
  // (as the cpu and Triton launchers check it: eps 0 is a valid norm, NaN is not)
  FA_CHECK(eps >= 0.0, "fused_attn_C::", op, " (cuda): eps must be non-negative, got ", eps);
  const at::Tensor x = unit_stride_rows(x_in);
  at::Tensor residual;
  if (const at::Tensor* r = present(residual_in)) {
    check_tensor(*r, x, 2, op, "residual");
    FA_CHECK(r->sizes() == x.sizes(), "fused_attn_C::", op, " (cuda): residual must have x's shape ", x.sizes(),
                ", got ", r->sizes());
    FA_CHECK(r->scalar_type() == x.scalar_type() || (residual_in_fp32 && r->scalar_type() == at::kFloat),
                "fused_attn_C::", op, " (cuda): residual must have x's dtype ", x.scalar_type(),
                " (or float32 with residual_in_fp32), got ", r->scalar_type());
    residual = unit_stride_rows(*r);
  }
  at::Tensor weight, bias;
  for (auto [t, name, dst] : {std::tuple{present(weight_in), "weight", &weight}, std::tuple{present(bias_in), "bias", &bias}}) {
    if (t == nullptr) continue;
    check_tensor(*t, x, 1, op, name);
    check_dtype(*t, x.scalar_type(), op, name);
    FA_CHECK(t->size(0) == a.hidden, "fused_attn_C::", op, " (cuda): ", name, " must have shape (", a.hidden,
                ",), got ", t->sizes());
    *dst = t->contiguous();
  }
  const DeviceGuard guard(x.device());
  const at::ScalarType summed_type = residual_in_fp32 ? at::kFloat : x.scalar_type();
  at::Tensor out = at::empty({a.rows, a.hidden}, x.options());
  at::Tensor summed = store_summed ? at::empty({a.rows, a.hidden}, x.options().dtype(summed_type))
                                   : at::empty({0}, x.options().dtype(summed_type));
  at::Tensor mean = at::empty({rms ? 0 : a.rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({a.rows}, x.options().dtype(at::kFloat));
  if (a.hidden == 0) {  // statistics of empty rows are NaN, as the reference's
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    rstd.fill_(std::numeric_limits<double>::quiet_NaN());
    return {out, summed, mean, rstd};
  }
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.residual_dtype = residual.defined() ? dtype_of(residual, op, "residual") : a.dtype;
  a.residual = residual.defined() ? residual.data_ptr() : nullptr;
  a.residual_row_stride = residual.defined() ? residual.stride(0) : 0;
  a.summed_dtype = residual_in_fp32 ? DType::kFloat32 : a.dtype;
  a.weight = weight.defined() ? weight.data_ptr() : nullptr;
  a.bias = bias.defined() ? bias.data_ptr() : nullptr;
  a.eps = static_cast<float>(eps);
  a.rms = rms;
  a.dropout = dropout_args(dropout_p, seed, offset, op);
  a.out = out.data_ptr();
  a.summed = store_summed ? summed.data_ptr() : nullptr;
  a.mean = rms ? nullptr : mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  check_status(layer_norm_fwd(a, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {out, summed, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_residual_bwd_cuda(
    const at::Tensor& dout_in, const std::optional<at::Tensor>& dsummed_in, const at::Tensor& summed_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, double eps, double dropout_p, bool rms, int64_t seed, int64_t offset,
    at::ScalarType x_dtype) {
  const char* op = "layer_norm_residual_bwd";
  check_tensor(summed_in, summed_in, 2, op, "summed");
  check_tensor(dout_in, summed_in, 2, op, "dout");
  LayerNormBwdArgs a{};
  a.rows = summed_in.size(0);
  a.hidden = summed_in.size(1);
  FA_CHECK(dout_in.sizes() == summed_in.sizes(), "fused_attn_C::", op, " (cuda): dout must have summed's shape ",
              summed_in.sizes(), ", got ", dout_in.sizes());
  check_dtype(dout_in, x_dtype, op, "dout");
  a.dtype = dtype_of(dout_in, op, "dout");
  a.x_dtype = a.dtype;
  a.summed_dtype = dtype_of(summed_in, op, "summed");
  FA_CHECK(summed_in.scalar_type() == x_dtype || summed_in.scalar_type() == at::kFloat, "fused_attn_C::", op,
              " (cuda): summed must have x's dtype ", x_dtype, " or float32, got ", summed_in.scalar_type());
  // eps is not used here (the forward's rstd holds it), but checked as the cpu and Triton backwards
  // check it, so that a call one backend refuses is refused by all.
  FA_CHECK(eps >= 0.0, "fused_attn_C::", op, " (cuda): eps must be non-negative, got ", eps);
  const at::Tensor summed = summed_in.contiguous();
  const at::Tensor dout = unit_stride_rows(dout_in);
  at::Tensor dsummed;
  if (const at::Tensor* t = present(dsummed_in)) {
    check_tensor(*t, summed, 2, op, "dsummed");
    check_dtype(*t, summed.scalar_type(), op, "dsummed");
    FA_CHECK(t->sizes() == summed.sizes(), "fused_attn_C::", op, " (cuda): dsummed must have summed's shape ",
                summed.sizes(), ", got ", t->sizes());
    dsummed = unit_stride_rows(*t);
  }
  at::Tensor weight;
  if (const at::Tensor* t = present(weight_in)) {
    check_tensor(*t, summed, 1, op, "weight");
    check_dtype(*t, x_dtype, op, "weight");
    FA_CHECK(t->size(0) == a.hidden, "fused_attn_C::", op, " (cuda): weight must have shape (", a.hidden,
                ",), got ", t->sizes());
    weight = t->contiguous();
  }
  const at::Tensor* bias = present(bias_in);
  if (bias != nullptr) {
    check_tensor(*bias, summed, 1, op, "bias");
    check_dtype(*bias, x_dtype, op, "bias");
    FA_CHECK(bias->size(0) == a.hidden, "fused_attn_C::", op, " (cuda): bias must have shape (", a.hidden,
                ",), got ", bias->sizes());
  }
  check_tensor(rstd_in, summed, 1, op, "rstd");
  check_dtype(rstd_in, at::kFloat, op, "rstd");
  FA_CHECK(rstd_in.size(0) == a.rows, "fused_attn_C::", op, " (cuda): rstd must have shape (", a.rows, ",), got ",
              rstd_in.sizes());
  if (!rms) {
    check_tensor(mean_in, summed, 1, op, "mean");
    check_dtype(mean_in, at::kFloat, op, "mean");
    FA_CHECK(mean_in.size(0) == a.rows, "fused_attn_C::", op, " (cuda): mean must have shape (", a.rows,
                ",), got ", mean_in.sizes());
  }
  const DeviceGuard guard(summed.device());
  const at::Tensor rstd = rstd_in.contiguous();
  const at::Tensor mean = rms ? at::Tensor() : mean_in.contiguous();

  at::Tensor dsum = at::empty({a.rows, a.hidden}, summed.options());
  at::Tensor dx = dropout_p > 0.0 ? at::empty({a.rows, a.hidden}, summed.options().dtype(x_dtype))
                                  : at::empty({0}, summed.options().dtype(x_dtype));
  at::Tensor dweight = weight.defined() ? at::empty({a.hidden}, weight.options()) : at::empty({0}, summed.options());
  at::Tensor dbias = bias != nullptr ? at::empty({a.hidden}, bias->options()) : at::empty({0}, summed.options());
  if (a.hidden == 0) return {dsum, dx, dweight, dbias};
  const int64_t parts = layer_norm_bwd_partial_rows(a.rows);
  at::Tensor partials = at::empty({parts, 2, a.hidden}, summed.options().dtype(at::kFloat));

  a.dout = dout.data_ptr();
  a.dout_row_stride = dout.stride(0);
  a.dsummed = dsummed.defined() ? dsummed.data_ptr() : nullptr;
  a.dsummed_row_stride = dsummed.defined() ? dsummed.stride(0) : 0;
  a.summed = summed.data_ptr();
  a.weight = weight.defined() ? weight.data_ptr() : nullptr;
  a.has_bias = bias != nullptr;
  a.mean = rms ? nullptr : mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.rms = rms;
  a.dropout = dropout_args(dropout_p, seed, offset, op);
  a.dsum = dsum.data_ptr();
  a.dx = dropout_p > 0.0 ? dx.data_ptr() : nullptr;
  a.dweight = weight.defined() ? dweight.data_ptr() : nullptr;
  a.dbias = bias != nullptr ? dbias.data_ptr() : nullptr;
  a.partials = partials.data_ptr<float>();
  check_status(layer_norm_bwd(a, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {dsum, dx, dweight, dbias};
}

}  // namespace
}  // namespace fused_attn_cuda

TORCH_LIBRARY_IMPL(fused_attn_C, CUDA, m) {
  m.impl("layer_norm_residual_fwd", &fused_attn_cuda::layer_norm_residual_fwd_cuda);
  m.impl("layer_norm_residual_bwd", &fused_attn_cuda::layer_norm_residual_bwd_cuda);
}
