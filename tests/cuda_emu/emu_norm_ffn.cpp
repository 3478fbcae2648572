// The layer-norm and feed-forward kernels of csrc/cuda (float32 path) run on CPU threads, for
// tests/test_cuda_emulated.py. The emu_layer_norm_fwd/bwd and emu_ffn_* entries launch the kernels
// as fwd_typed/bwd_typed and ffn_act_* do, with the vector width and the number of partial-sum blocks
// the caller picks; the emu_layer_norm_*_host entries run the launchers themselves.
#include "cuda_runtime.h"
#include "emu_device.h"

namespace fused_attn_cuda {
namespace {
float smem_f[64 * 1024];  // the blocks' dynamic shared memory
}  // namespace
}  // namespace fused_attn_cuda

#include "../../csrc/cuda/feed_forward.cu"
#include "../../csrc/cuda/layer_norm.cu"

using namespace fused_attn_cuda;

namespace {
DropoutArgs dropout_from(const uint64_t* d) {  // [enabled, seed, offset, threshold, scale bits]
  DropoutArgs a;
  a.enabled = d[0] != 0;
  a.seed = d[1];
  a.offset = d[2];
  a.threshold = static_cast<uint32_t>(d[3]);
  const uint32_t bits = static_cast<uint32_t>(d[4]);
  std::memcpy(&a.scale, &bits, sizeof(float));
  return a;
}

// The float32 forward's arguments, as the kernel tests (emu_layer_norm_fwd) and the launcher tests
// (emu_layer_norm_fwd_host) pass them.
LayerNormFwdArgs fwd_args(const float* x, int64_t x_stride, const float* residual, int64_t res_stride,
                          const float* weight, const float* bias, int64_t rows, int64_t hidden, float eps, int rms,
                          const uint64_t* dropout, float* out, float* summed, float* mean, float* rstd) {
  LayerNormFwdArgs a{};
  a.dtype = a.residual_dtype = a.summed_dtype = DType::kFloat32;
  a.rows = rows; a.hidden = hidden;
  a.x = x; a.x_row_stride = x_stride; a.residual = residual; a.residual_row_stride = res_stride;
  a.weight = weight; a.bias = bias; a.eps = eps; a.rms = rms != 0; a.dropout = dropout_from(dropout);
  a.out = out; a.summed = summed; a.mean = mean; a.rstd = rstd;
  return a;
}
}  // namespace

extern "C" int emu_layer_norm_fwd(const float* x, int64_t x_stride, const float* residual, int64_t res_stride,
                                  const float* weight, const float* bias, int64_t rows, int64_t hidden, float eps,
                                  int rms, const uint64_t* dropout, float* out, float* summed, float* mean,
                                  float* rstd, int vec) {
  LayerNormFwdArgs a =
      fwd_args(x, x_stride, residual, res_stride, weight, bias, rows, hidden, eps, rms, dropout, out, summed, mean, rstd);
  if (hidden + 32 > int64_t(sizeof(smem_f) / sizeof(float))) return 1;
  if (vec) {
    if (hidden % 4) return 2;
    emu::launch(dim3(unsigned(rows)), dim3(threads_for(hidden / 4)), layer_norm_fwd_kernel<float, float, float, 4>, a);
  } else {
    emu::launch(dim3(unsigned(rows)), dim3(threads_for(hidden)), layer_norm_fwd_kernel<float, float, float, 1>, a);
  }
  return 0;
}

extern "C" int emu_layer_norm_bwd(const float* dout, int64_t dout_stride, const float* dsummed, int64_t ds_stride,
                                  const float* summed, const float* weight, int has_bias, const float* mean,
                                  const float* rstd, int64_t rows, int64_t hidden, int rms, const uint64_t* dropout,
                                  float* dsum, float* dx, float* dweight, float* dbias, float* partials, int64_t parts,
                                  int vec) {
  LayerNormBwdArgs a{};
  a.dtype = a.summed_dtype = a.x_dtype = DType::kFloat32;
  a.rows = rows; a.hidden = hidden;
  a.dout = dout; a.dout_row_stride = dout_stride; a.dsummed = dsummed; a.dsummed_row_stride = ds_stride;
  a.summed = summed; a.weight = weight; a.has_bias = has_bias != 0; a.mean = mean; a.rstd = rstd; a.rms = rms != 0;
  a.dropout = dropout_from(dropout);
  a.dsum = dsum; a.dx = dx; a.dweight = dweight; a.dbias = dbias; a.partials = partials;
  if (2 * hidden + 32 > int64_t(sizeof(smem_f) / sizeof(float))) return 1;
  if (parts > 0) {
    if (vec) {
      if (hidden % 4) return 2;
      emu::launch(dim3(unsigned(parts)), dim3(threads_for(hidden / 4)), layer_norm_bwd_kernel<float, float, 4>, a);
    } else {
      emu::launch(dim3(unsigned(parts)), dim3(threads_for(hidden)), layer_norm_bwd_kernel<float, float, 1>, a);
    }
  }
  if (dweight || dbias)
    emu::launch(dim3(unsigned(ceil_div(hidden, 256))), dim3(256), layer_norm_bwd_reduce_kernel<float>, a, parts);
  return 0;
}

template <typename Fn>
static void with_activation(int act, Fn&& fn) {
  dispatch_activation(static_cast<Activation>(act), [&](auto a) -> const char* {
    fn(a);
    return nullptr;
  });
}

extern "C" int emu_ffn_fwd(const float* pre, float* h, int64_t tokens, int64_t d_ff, int act, const uint64_t* dropout,
                           int blocks) {
  FfnActFwdArgs a{};
  a.dtype = DType::kFloat32; a.activation = static_cast<Activation>(act); a.tokens = tokens; a.d_ff = d_ff;
  a.pre = pre; a.h = h; a.dropout = dropout_from(dropout);
  with_activation(act, [&](auto A) {
    emu::launch(dim3(unsigned(blocks)), dim3(kThreads), ffn_act_fwd_kernel<float, decltype(A)::value>, a);
  });
  return 0;
}

extern "C" int emu_ffn_bwd(const float* pre, const float* dh, float* dpre, float* h, int64_t tokens, int64_t d_ff,
                           int act, const uint64_t* dropout, int blocks) {
  FfnActBwdArgs a{};
  a.dtype = DType::kFloat32; a.activation = static_cast<Activation>(act); a.tokens = tokens; a.d_ff = d_ff;
  a.pre = pre; a.dh = dh; a.dpre = dpre; a.h = h; a.dropout = dropout_from(dropout);
  with_activation(act, [&](auto A) {
    emu::launch(dim3(unsigned(blocks)), dim3(kThreads), ffn_act_bwd_kernel<float, decltype(A)::value>, a);
  });
  return 0;
}

// The layer-norm kernels' dynamic shared memory (layer_norm.cu), for the check of
// fused_attn/backends/cuda.py's mirror of it: the forward's bytes, or the backward's.
extern "C" int64_t emu_layer_norm_smem_bytes(int64_t hidden, int backward) {
  return static_cast<int64_t>(backward ? layer_norm_bwd_smem_bytes(hidden) : layer_norm_fwd_smem_bytes(hidden));
}

// The launchers themselves (layer_norm_fwd, layer_norm_bwd: float32) on the emulated device
// (emu_device.h): their kernel choice, grid and shared-memory opt-in. Returns 0, or 1 with *error =
// the launcher's message. Under emu_set_dry_run(1) nothing runs (null pointers are fine).
extern "C" int emu_layer_norm_fwd_host(const float* x, int64_t x_stride, const float* residual, int64_t res_stride,
                                       const float* weight, const float* bias, int64_t rows, int64_t hidden, float eps,
                                       int rms, const uint64_t* dropout, float* out, float* summed, float* mean,
                                       float* rstd, const char** error) {
  LayerNormFwdArgs a =
      fwd_args(x, x_stride, residual, res_stride, weight, bias, rows, hidden, eps, rms, dropout, out, summed, mean, rstd);
  *error = layer_norm_fwd(a, nullptr);
  return *error != nullptr;
}

extern "C" int emu_layer_norm_bwd_host(const float* dout, int64_t dout_stride, const float* summed,
                                       const float* weight, int has_bias, const float* mean, const float* rstd,
                                       int64_t rows, int64_t hidden, int rms, float* dsum, float* dweight,
                                       float* dbias, float* partials, const char** error) {
  LayerNormBwdArgs a{};
  a.dtype = a.summed_dtype = a.x_dtype = DType::kFloat32;
  a.rows = rows; a.hidden = hidden;
  a.dout = dout; a.dout_row_stride = dout_stride;
  a.summed = summed; a.weight = weight; a.has_bias = has_bias != 0; a.mean = mean; a.rstd = rstd; a.rms = rms != 0;
  a.dsum = dsum; a.dweight = dweight; a.dbias = dbias; a.partials = partials;
  *error = layer_norm_bwd(a, nullptr);
  return *error != nullptr;
}
