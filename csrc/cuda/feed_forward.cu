// Feed-forward epilogues: the elementwise work between the two GEMMs (which the binding runs
// through torch's matmul, i.e. cuBLAS, with b1 and b2 added in the GEMM epilogue), one pass each.
//
// Forward:  h = dropout(act(pre))                       (gated: act(gate) * up)
// Backward: h = dropout(act(pre)) recomputed (for dW2 = dout^T h), and
//           dpre = act'(pre) * dropout(dh)              (gated: dgate = dh' * up * act'(gate),
//                                                                dup = dh' * act(gate))
// Element (t, c) of the (T, d_ff) activation is dropout element (row t, col c). All arithmetic is
// float32; pre is rounded to the input dtype before the activation, as the reference holds it.
#include <cmath>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace fused_attn_cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kSqrt1_2 = 0.70710678118654752f;        // 1/sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143268f;     // 1/sqrt(2 pi)
constexpr float kSqrt2OverPi = 0.79788456080286536f;    // sqrt(2/pi)
constexpr float kGeluTanhCoef = 0.044715f;

// act(x) and act'(x) for the ungated activations (and the gate of the gated ones).
template <Activation A>
__device__ __forceinline__ void activation(float x, float& value, float& slope) {
  if constexpr (A == Activation::kRelu) {
    value = x < 0.0f ? 0.0f : x;  // NaN propagates, as in torch.relu
    slope = x <= 0.0f ? 0.0f : 1.0f;  // torch's rule: a NaN x passes the gradient (relu(x) <= 0 is false)
  } else if constexpr (A == Activation::kGelu || A == Activation::kGeglu) {
    // x * Phi(x);  derivative Phi(x) + x * phi(x)
    const float cdf = 0.5f * (1.0f + erff(x * kSqrt1_2));
    value = x * cdf;
    slope = cdf + x * kInvSqrt2Pi * expf(-0.5f * x * x);
  } else if constexpr (A == Activation::kGeluTanh) {
    // 0.5 x (1 + tanh u), u = sqrt(2/pi) (x + 0.044715 x^3)
    const float u = kSqrt2OverPi * (x + kGeluTanhCoef * x * x * x);
    const float th = tanhf(u);
    value = 0.5f * x * (1.0f + th);
    slope = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoef * x * x);
  } else {  // silu / swiglu gate: x * sigmoid(x);  derivative sigmoid(x) (1 + x (1 - sigmoid(x)))
    const float sig = 1.0f / (1.0f + expf(-x));
    value = x * sig;
    slope = sig * (1.0f + x * (1.0f - sig));
  }
}

template <Activation A> constexpr bool kGated = A == Activation::kSwiglu || A == Activation::kGeglu;

template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads) ffn_act_fwd_kernel(const FfnActFwdArgs a) {
  const int64_t total = a.tokens * a.d_ff;
  const int64_t width = kGated<A> ? 2 * a.d_ff : a.d_ff;  // row length of pre
  const T* pre = static_cast<const T*>(a.pre);
  T* h = static_cast<T*>(a.h);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / a.d_ff, c = idx - t * a.d_ff;
    const int64_t at = t * width + c;
    float value, slope;
    activation<A>(to_float<T>(pre[at]), value, slope);
    if constexpr (kGated<A>) {
      value = round_to<T>(value) * to_float<T>(pre[at + a.d_ff]);  // the reference rounds act(gate) first
    }
    if (a.dropout.enabled) value *= dropout_factor(a.dropout, dropout_row_key(a.dropout, t), c);
    h[idx] = from_float<T>(value);
  }
}

template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads) ffn_act_bwd_kernel(const FfnActBwdArgs a) {
  const int64_t total = a.tokens * a.d_ff;
  const int64_t width = kGated<A> ? 2 * a.d_ff : a.d_ff;
  const T* pre = static_cast<const T*>(a.pre);
  const T* dh = static_cast<const T*>(a.dh);
  T* dpre = static_cast<T*>(a.dpre);
  T* h = static_cast<T*>(a.h);
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / a.d_ff, c = idx - t * a.d_ff;
    const float z = a.dropout.enabled ? dropout_factor(a.dropout, dropout_row_key(a.dropout, t), c) : 1.0f;
    const float grad = to_float<T>(dh[idx]) * z;  // gradient of the activation before dropout
    const int64_t at = t * width + c;
    float value, slope;
    activation<A>(to_float<T>(pre[at]), value, slope);
    if constexpr (kGated<A>) {
      const float up = to_float<T>(pre[at + a.d_ff]);
      dpre[at] = from_float<T>(grad * up * slope);
      dpre[at + a.d_ff] = from_float<T>(grad * value);
      h[idx] = from_float<T>(round_to<T>(value) * up * z);
    } else {
      dpre[at] = from_float<T>(grad * slope);
      h[idx] = from_float<T>(value * z);
    }
  }
}

#ifndef FUSED_ATTN_CPU_EMULATION  // tests/cuda_emu runs the kernels on CPU threads
unsigned grid_for(int64_t total) {
  const int64_t blocks = ceil_div(total, kThreads), cap = int64_t(multiprocessor_count()) * 32;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}
#endif  // FUSED_ATTN_CPU_EMULATION

// Calls fn(std::integral_constant<Activation, A>{}) for the run-time activation.
template <typename Fn>
const char* dispatch_activation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::kRelu: return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kGelu: return fn(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kGeluTanh: return fn(std::integral_constant<Activation, Activation::kGeluTanh>{});
    case Activation::kSilu: return fn(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kSwiglu: return fn(std::integral_constant<Activation, Activation::kSwiglu>{});
    case Activation::kGeglu: return fn(std::integral_constant<Activation, Activation::kGeglu>{});
  }
  return "feed_forward: unknown activation";
}

}  // namespace

#ifndef FUSED_ATTN_CPU_EMULATION
const char* ffn_act_fwd(const FfnActFwdArgs& a, cudaStream_t stream) {
  if (a.tokens < 0 || a.d_ff < 0) return "feed_forward: negative size";
  if (a.tokens * a.d_ff == 0) return nullptr;
  return dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_activation(a.activation, [&](auto act) {
      ffn_act_fwd_kernel<T, decltype(act)::value><<<grid_for(a.tokens * a.d_ff), kThreads, 0, stream>>>(a);
      return last_launch_error();
    });
  });
}

const char* ffn_act_bwd(const FfnActBwdArgs& a, cudaStream_t stream) {
  if (a.tokens < 0 || a.d_ff < 0) return "feed_forward: negative size";
  if (a.tokens * a.d_ff == 0) return nullptr;
  return dispatch_dtype(a.dtype, [&](auto zero) {
    using T = decltype(zero);
    return dispatch_activation(a.activation, [&](auto act) {
      ffn_act_bwd_kernel<T, decltype(act)::value><<<grid_for(a.tokens * a.d_ff), kThreads, 0, stream>>>(a);
      return last_launch_error();
    });
  });
}

#endif  // FUSED_ATTN_CPU_EMULATION

}  // namespace fused_attn_cuda
