// CUDA implementations of fused_attn_C::feed_forward_fwd / _bwd: the GEMMs through torch's matmul
// (cuBLAS, the biases in its epilogue), the activation + dropout and its backward through the
// fused elementwise kernels of feed_forward.cu (one pass each).
#include <ATen/ATen.h>
#include <ATen/ops/_addmm_activation.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "binding_utils.h"
#include "launchers.h"

namespace fused_attn_cuda {
namespace {

Activation parse_activation(c10::string_view name, const char* op) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  if (name == "silu") return Activation::kSilu;
  if (name == "swiglu") return Activation::kSwiglu;
  if (name == "geglu") return Activation::kGeglu;
  FA_CHECK(false, "fused_attn_C::", op, " (cuda): activation must be one of relu, gelu, gelu_tanh, silu, swiglu, ",
              "geglu, got '", std::string(name.data(), name.size()), "'");
  return Activation::kRelu;
}

bool gated(Activation a) { return a == Activation::kSwiglu || a == Activation::kGeglu; }

// Checks x, w1, w2 and returns d_ff (the activation width).
int64_t check_shapes(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, Activation act) {
  check_tensor(x, x, 2, op, "x");
  check_tensor(w1, x, 2, op, "w1");
  check_tensor(w2, x, 2, op, "w2");
  dtype_of(x, op, "x");
  check_dtype(w1, x.scalar_type(), op, "w1");
  check_dtype(w2, x.scalar_type(), op, "w2");
  FA_CHECK(w1.size(1) == x.size(1), "fused_attn_C::", op, " (cuda): w1 must have shape (d_ff, ", x.size(1),
              "), got ", w1.sizes());
  FA_CHECK(!gated(act) || w1.size(0) % 2 == 0, "fused_attn_C::", op,
              " (cuda): gated activations need an even number of w1 rows, got ", w1.sizes());
  const int64_t d_ff = gated(act) ? w1.size(0) / 2 : w1.size(0);
  FA_CHECK(w2.size(1) == d_ff, "fused_attn_C::", op, " (cuda): w2 must have shape (d_out, ", d_ff, "), got ",
              w2.sizes());
  return d_ff;
}

std::tuple<at::Tensor, at::Tensor> feed_forward_fwd_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                         const std::optional<at::Tensor>& b1_in, const at::Tensor& w2,
                                                         const std::optional<at::Tensor>& b2_in,
                                                         c10::string_view activation, double dropout_p, int64_t seed,
                                                         int64_t offset) {
  const char* op = "feed_forward_fwd";
  const Activation act = parse_activation(activation, op);
  const int64_t d_ff = check_shapes(op, x, w1, w2, act);
  const int64_t tokens = x.size(0);
  at::Tensor b1, b2;
  if (b1_in.has_value() && b1_in->defined()) {
    check_tensor(*b1_in, x, 1, op, "b1");
    check_dtype(*b1_in, x.scalar_type(), op, "b1");
    FA_CHECK(b1_in->size(0) == w1.size(0), "fused_attn_C::", op, " (cuda): b1 must have shape (", w1.size(0),
                ",), got ", b1_in->sizes());
    b1 = *b1_in;
  }
  if (b2_in.has_value() && b2_in->defined()) {
    check_tensor(*b2_in, x, 1, op, "b2");
    check_dtype(*b2_in, x.scalar_type(), op, "b2");
    FA_CHECK(b2_in->size(0) == w2.size(0), "fused_attn_C::", op, " (cuda): b2 must have shape (", w2.size(0),
                ",), got ", b2_in->sizes());
    b2 = *b2_in;
  }
  const DeviceGuard guard(x.device());
  FfnActFwdArgs a{};
  a.dtype = dtype_of(x, op, "x");
  a.activation = act;
  a.tokens = tokens;
  a.d_ff = d_ff;
  a.dropout = dropout_args(dropout_p, seed, offset, op);
  if (act == Activation::kRelu && !a.dropout.enabled && b1.defined()) {
    // ReLU without dropout: bias and ReLU ride in the GEMM's epilogue (cuBLASLt's RELU_BIAS where
    // torch's addmm takes that path), so there is no elementwise pass at all; h itself is saved for
    // the backward in place of pre, which the op contract allows for relu without dropout
    // (relu'(pre) = [h > 0] and relu(h) = h: every backend's backward computes the same from it).
    at::Tensor h = at::_addmm_activation(b1, x, w1.t(), 1, 1, /*use_gelu=*/false);
    at::Tensor out = b2.defined() ? at::addmm(b2, h, w2.t()) : at::mm(h, w2.t());
    return {out, h};
  }
  // The bias rides in cuBLAS's epilogue (one rounding, as nn.Linear): pre is saved for the backward.
  at::Tensor pre = (b1.defined() ? at::addmm(b1, x, w1.t()) : at::mm(x, w1.t())).contiguous();
  at::Tensor h = at::empty({tokens, d_ff}, x.options());
  a.pre = pre.data_ptr();
  a.h = h.data_ptr();
  check_status(ffn_act_fwd(a, c10::cuda::getCurrentCUDAStream().stream()), op);
  at::Tensor out = b2.defined() ? at::addmm(b2, h, w2.t()) : at::mm(h, w2.t());
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> feed_forward_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& pre_in,
    c10::string_view activation, double dropout_p, int64_t seed, int64_t offset, bool has_b1, bool has_b2) {
  const char* op = "feed_forward_bwd";
  const Activation act = parse_activation(activation, op);
  const int64_t d_ff = check_shapes(op, x, w1, w2, act);
  const int64_t tokens = x.size(0);
  check_tensor(dout, x, 2, op, "dout");
  check_tensor(pre_in, x, 2, op, "pre");
  check_dtype(dout, x.scalar_type(), op, "dout");
  check_dtype(pre_in, x.scalar_type(), op, "pre");
  FA_CHECK(dout.size(0) == tokens && dout.size(1) == w2.size(0), "fused_attn_C::", op,
              " (cuda): dout must have shape (", tokens, ", ", w2.size(0), "), got ", dout.sizes());
  FA_CHECK(pre_in.size(0) == tokens && pre_in.size(1) == w1.size(0), "fused_attn_C::", op,
              " (cuda): pre must have shape (", tokens, ", ", w1.size(0), "), got ", pre_in.sizes());
  const DeviceGuard guard(x.device());
  const at::Tensor pre = pre_in.contiguous();
  at::Tensor dh = at::mm(dout, w2).contiguous();  // (T, d_ff): the gradient of the dropped activation
  at::Tensor dpre = at::empty({tokens, w1.size(0)}, x.options());
  at::Tensor h = at::empty({tokens, d_ff}, x.options());
  FfnActBwdArgs a{};
  a.dtype = dtype_of(x, op, "x");
  a.activation = act;
  a.tokens = tokens;
  a.d_ff = d_ff;
  a.pre = pre.data_ptr();
  a.dh = dh.data_ptr();
  a.dpre = dpre.data_ptr();
  a.h = h.data_ptr();
  a.dropout = dropout_args(dropout_p, seed, offset, op);
  check_status(ffn_act_bwd(a, c10::cuda::getCurrentCUDAStream().stream()), op);
  // Bias gradients are reduced in float32 and rounded once, as the reference does.
  at::Tensor dw2 = at::mm(dout.t(), h);
  at::Tensor db2 = has_b2 ? at::sum(dout, {0}, false, at::kFloat).to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor dw1 = at::mm(dpre.t(), x);
  at::Tensor db1 = has_b1 ? at::sum(dpre, {0}, false, at::kFloat).to(x.scalar_type()) : at::empty({0}, x.options());
  at::Tensor dx = at::mm(dpre, w1);
  return {dx, dw1, db1, dw2, db2};
}

}  // namespace
}  // namespace fused_attn_cuda

TORCH_LIBRARY_IMPL(fused_attn_C, CUDA, m) {
  m.impl("feed_forward_fwd", &fused_attn_cuda::feed_forward_fwd_cuda);
  m.impl("feed_forward_bwd", &fused_attn_cuda::feed_forward_bwd_cuda);
}
