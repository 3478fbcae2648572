// The attention kernels of csrc/cuda/attention.cu (float32 path) run on CPU threads, for
// tests/test_cuda_emulated.py. The emu_attention_fwd/bwd(_mma) entries launch the kernels as
// attention_fwd_typed/attention_bwd_typed do (their grids from the launchers' seq_grid), with the
// tile sizes / compiled head dim given by the caller (so every tile choice gets exercised); the
// emu_attention_*_host entries run the launchers themselves (attention_fwd, attention_bwd) on an
// emulated device (emu_device.h): their choices, grids and shared-memory opt-ins.
#include "cuda_runtime.h"
#include "emu_device.h"

#include <algorithm>
#include <cstddef>
#include <cstdio>
#include <cstdlib>

namespace fused_attn_cuda {
namespace {
alignas(128) unsigned char smem_raw[256 * 1024];  // the blocks' dynamic shared memory
}  // namespace
}  // namespace fused_attn_cuda

#include "../../csrc/cuda/attention.cu"

using namespace fused_attn_cuda;

namespace {

AttentionFwdArgs make_args(const void* q, const int64_t* qs, const void* k, const int64_t* ks, const void* v,
                           const int64_t* vs, const int64_t* sizes, int mask_kind, const void* mask,
                           const int64_t* ms, int64_t band_lo, int64_t band_hi, float scale,
                           const uint64_t* dropout, float softcap, const float* alibi, const int64_t* alibi_stride,
                           int64_t alibi_shift, void* out, const int64_t* os, float* lse,
                           DType dtype = DType::kFloat32) {
  AttentionFwdArgs a{};
  a.dtype = dtype;
  a.batch = sizes[0]; a.heads_q = sizes[1]; a.heads_kv = sizes[2]; a.len_q = sizes[3]; a.len_k = sizes[4];
  a.head_dim = sizes[5]; a.head_dim_v = sizes[6];
  a.q = q; a.k = k; a.v = v;
  for (int i = 0; i < 4; ++i) {
    a.q_stride[i] = qs[i]; a.k_stride[i] = ks[i]; a.v_stride[i] = vs[i];
    a.mask_stride[i] = ms[i]; a.out_stride[i] = os[i];
  }
  a.mask_kind = static_cast<MaskKind>(mask_kind);
  a.mask = mask;
  // The band clamped to [-Lq, Lk], as attention_binding.cpp does (callers pass unbounded ends as +-2^62).
  a.band_lo = std::min(std::max(band_lo, -a.len_q), a.len_k);
  a.band_hi = std::min(std::max(band_hi, -a.len_q), a.len_k);
  a.scale = scale;
  a.softcap = softcap;
  // ALiBi as attention_binding.cpp passes it: the slopes (null: off) with their two strides, and the
  // shift (Lk - Lq for bottom-right alignment, else 0)
  a.alibi_slopes = alibi;
  a.alibi_stride[0] = alibi_stride[0];
  a.alibi_stride[1] = alibi_stride[1];
  a.alibi_shift = alibi_shift;
  a.dropout.enabled = dropout[0] != 0;  // [enabled, seed, offset, threshold, scale bits]
  a.dropout.seed = dropout[1];
  a.dropout.offset = dropout[2];
  a.dropout.threshold = static_cast<uint32_t>(dropout[3]);
  const uint32_t scale_bits = static_cast<uint32_t>(dropout[4]);
  std::memcpy(&a.dropout.scale, &scale_bits, sizeof(float));
  a.out = out;
  a.lse = lse;
  return a;
}

Dims dims_for(const AttentionFwdArgs& a, int bm, int bn) {
  return Dims{bm, bn, static_cast<int>(round_up(a.head_dim, 16)), static_cast<int>(round_up(a.head_dim_v, 16))};
}

// The launchers' grid (seq_grid) for the direct entries' small cases, which always fit it.
dim3 grid_for(const char* what, int64_t len, int64_t rows, int64_t pairs) {
  dim3 grid;
  if (const char* err = seq_grid(what, len, rows, pairs, &grid)) {
    std::fprintf(stderr, "tests/cuda_emu: %s\n", err);
    std::abort();
  }
  return grid;
}

}  // namespace

extern "C" int emu_attention_fwd(const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v,
                                 const int64_t* vs, const int64_t* sizes, int mask_kind, const void* mask,
                                 const int64_t* ms, int64_t band_lo, int64_t band_hi, float scale,
                                 const uint64_t* dropout, float softcap, const float* alibi,
                                 const int64_t* alibi_stride, int64_t alibi_shift, float* out, const int64_t* os,
                                 float* lse, int bm, int bn) {
  const AttentionFwdArgs a = make_args(q, qs, k, ks, v, vs, sizes, mask_kind, mask, ms, band_lo, band_hi, scale,
                                       dropout, softcap, alibi, alibi_stride, alibi_shift, out, os, lse);
  const Dims d = dims_for(a, bm, bn);
  FwdSmem<float> plan;
  if (plan.carve(nullptr, d) > sizeof(smem_raw)) return 1;
  if (a.batch * a.heads_q == 0 || a.len_q == 0) return 0;
  emu::launch(grid_for("len_q", a.len_q, d.bm, a.batch * a.heads_q), dim3(kThreads), attention_fwd_kernel<float>, a,
              d);
  return 0;
}

// The register-resident forward (mma.sync, ldmatrix, cp.async emulated) in float16 (dtype 0) or
// bfloat16 (1), compiled for head dim kD (a value attention_fwd_mma may pick).
template <typename T>
int fwd_mma_typed(const AttentionFwdArgs& a, int kd) {
  const dim3 grid = grid_for("len_q", a.len_q, kMmaRows, a.batch * a.heads_q);
  switch (kd) {
    case 32: emu::launch(grid, dim3(kMmaThreads), fwd_mma_kernel_for<T, 32>(a), a); return 0;
    case 64: emu::launch(grid, dim3(kMmaThreads), fwd_mma_kernel_for<T, 64>(a), a); return 0;
    case 96: emu::launch(grid, dim3(kMmaThreads), fwd_mma_kernel_for<T, 96>(a), a); return 0;
    case 128: emu::launch(grid, dim3(kMmaThreads), fwd_mma_kernel_for<T, 128>(a), a); return 0;
    case 256: emu::launch(grid, dim3(kMmaThreads), fwd_mma_kernel_for<T, 256>(a), a); return 0;
  }
  return 2;
}

extern "C" int emu_attention_fwd_mma(int dtype, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                                     const void* v, const int64_t* vs, const int64_t* sizes, int mask_kind,
                                     const void* mask, const int64_t* ms, int64_t band_lo, int64_t band_hi, float scale,
                                     const uint64_t* dropout, float softcap, const float* alibi,
                                     const int64_t* alibi_stride, int64_t alibi_shift, void* out, const int64_t* os,
                                     float* lse, int kd) {
  const AttentionFwdArgs a = make_args(q, qs, k, ks, v, vs, sizes, mask_kind, mask, ms, band_lo, band_hi, scale,
                                       dropout, softcap, alibi, alibi_stride, alibi_shift, out, os, lse,
                                       dtype == 0 ? DType::kFloat16 : DType::kBFloat16);
  if (kd < a.head_dim || kd < a.head_dim_v) return 3;
  if (a.batch * a.heads_q == 0 || a.len_q == 0) return 0;
  return dtype == 0 ? fwd_mma_typed<__half>(a, kd) : fwd_mma_typed<__nv_bfloat16>(a, kd);
}

// The register-resident backward (delta, dK/dV, dQ kernels) in float16 (dtype 0) or bfloat16 (1).
template <typename T, int kD>
void bwd_mma_kernels(const AttentionBwdArgs& b) {
  const AttentionFwdArgs& f = b.fwd;
  const int64_t rows = f.batch * f.heads_q * f.len_q;
  emu::launch(dim3(unsigned(ceil_div(rows, kWarps))), dim3(kThreads), attention_bwd_delta_kernel<T>, b);
  if (f.len_k > 0)
    emu::launch(grid_for("len_k", f.len_k, kMmaRows, f.batch * f.heads_kv), dim3(kMmaThreads),
                bwd_dkdv_mma_kernel_for<T, kD>(b), b);
  emu::launch(grid_for("len_q", f.len_q, kMmaRows, f.batch * f.heads_q), dim3(kMmaThreads),
              bwd_dq_mma_kernel_for<T, kD>(b), b);
}

template <typename T>
int bwd_mma_typed(const AttentionBwdArgs& b, int kd) {
  switch (kd) {
    case 32: bwd_mma_kernels<T, 32>(b); return 0;
    case 64: bwd_mma_kernels<T, 64>(b); return 0;
    case 96: bwd_mma_kernels<T, 96>(b); return 0;
    case 128: bwd_mma_kernels<T, 128>(b); return 0;
  }
  return 2;
}

extern "C" int emu_attention_bwd_mma(int dtype, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                                     const void* v, const int64_t* vs, const int64_t* sizes, int mask_kind,
                                     const void* mask, const int64_t* ms, int64_t band_lo, int64_t band_hi, float scale,
                                     const uint64_t* dropout, float softcap, const float* alibi,
                                     const int64_t* alibi_stride, int64_t alibi_shift, const void* out,
                                     const int64_t* os, const float* lse,
                                     const void* dout, const int64_t* dos, void* dq, void* dk, void* dv,
                                     void* dmask, float* delta, int kd) {
  AttentionBwdArgs b{};
  b.fwd = make_args(q, qs, k, ks, v, vs, sizes, mask_kind, mask, ms, band_lo, band_hi, scale, dropout, softcap,
                    alibi, alibi_stride, alibi_shift, const_cast<void*>(out), os, const_cast<float*>(lse),
                    dtype == 0 ? DType::kFloat16 : DType::kBFloat16);
  b.dout = dout;
  for (int i = 0; i < 4; ++i) b.dout_stride[i] = dos[i];
  b.dq = dq; b.dk = dk; b.dv = dv; b.dmask = dmask; b.delta = delta;
  if (kd < b.fwd.head_dim || kd < b.fwd.head_dim_v) return 3;
  if (b.fwd.batch * b.fwd.heads_q == 0 || b.fwd.len_q == 0) return 0;
  return dtype == 0 ? bwd_mma_typed<__half>(b, kd) : bwd_mma_typed<__nv_bfloat16>(b, kd);
}

// One warp: C (16 x 16) = A B through the emulated primitives, with the addressing the kernels'
// mma_slice uses: trans_b 0 gives B as [n][k] (like K in S = Q K^T), 1 as [k][n] (like V in
// O += P V); A, B and C are 16 x 16 (two n8 tiles). tests/test_cuda_emulated.py checks the result
// against a plain product, i.e. the fragment layouts.
template <typename T>
void warp_product(const void* a_raw, const void* b_raw, int trans_b, float* c) {
  alignas(16) static uint16_t a_tile[16][16 + 8], b_tile[16][16 + 8];
  const uint16_t* a_in = static_cast<const uint16_t*>(a_raw);
  const uint16_t* b_in = static_cast<const uint16_t*>(b_raw);
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) a_tile[r][col] = a_in[r * 16 + col];
  // two n8 tiles side by side (n = 16): rows = n ([16][16] given as n, k) or rows = k ([16][16] as k, n)
  for (int r = 0; r < 16; ++r)
    for (int col = 0; col < 16; ++col) b_tile[r][col] = b_in[r * 16 + col];
  emu::launch(dim3(1), dim3(32), [&] {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    uint32_t a[4], b[4];
    float d[2][4] = {};
    ldmatrix_x4<false>(a, &a_tile[lane & 15][(lane >> 4) * 8]);
    if (trans_b) {
      ldmatrix_x4<true>(b, &b_tile[lane & 15][(lane >> 4) * 8]);
    } else {
      ldmatrix_x4<false>(b, &b_tile[((lane >> 4) << 3) + (lane & 7)][((lane >> 3) & 1) * 8]);
    }
    mma_16816<T>(d[0], a, b);
    mma_16816<T>(d[1], a, b + 2);
    for (int j = 0; j < 2; ++j)
      for (int e = 0; e < 4; ++e) c[(g + (e >> 1) * 8) * 16 + j * 8 + 2 * t + (e & 1)] = d[j][e];
  });
}

extern "C" void emu_warp_product(int dtype, const void* a, const void* b, int trans_b, float* c) {
  if (dtype == 0) {
    warp_product<__half>(a, b, trans_b, c);
  } else {
    warp_product<__nv_bfloat16>(a, b, trans_b, c);
  }
}

extern "C" int emu_attention_bwd(const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v,
                                 const int64_t* vs, const int64_t* sizes, int mask_kind, const void* mask,
                                 const int64_t* ms, int64_t band_lo, int64_t band_hi, float scale,
                                 const uint64_t* dropout, float softcap, const float* alibi,
                                 const int64_t* alibi_stride, int64_t alibi_shift, const float* out,
                                 const int64_t* os, const float* lse, const float* dout, const int64_t* dos, float* dq,
                                 float* dk, float* dv, float* dmask, float* delta, int bm, int bn,
                                 const float* dlse) {
  AttentionBwdArgs b{};
  b.fwd = make_args(q, qs, k, ks, v, vs, sizes, mask_kind, mask, ms, band_lo, band_hi, scale, dropout, softcap,
                    alibi, alibi_stride, alibi_shift, const_cast<float*>(out), os, const_cast<float*>(lse));
  const AttentionFwdArgs& f = b.fwd;
  b.dout = dout;
  for (int i = 0; i < 4; ++i) b.dout_stride[i] = dos[i];
  b.dq = dq; b.dk = dk; b.dv = dv; b.dmask = dmask; b.delta = delta; b.dlse = dlse;
  const Dims d = dims_for(f, bm, bn);
  BwdSmem<float> plan;
  if (std::max(plan.carve(nullptr, d, true), plan.carve(nullptr, d, false)) > sizeof(smem_raw)) return 1;
  if (f.batch * f.heads_q == 0 || f.len_q == 0) return 0;
  const int64_t rows = f.batch * f.heads_q * f.len_q;
  emu::launch(dim3(unsigned(ceil_div(rows, kWarps))), dim3(kThreads), attention_bwd_delta_kernel<float>, b);
  if (f.len_k > 0)
    emu::launch(grid_for("len_k", f.len_k, d.bn, f.batch * f.heads_kv), dim3(kThreads), attention_bwd_dkdv_kernel<float>,
                b, d);
  emu::launch(grid_for("len_q", f.len_q, d.bm, f.batch * f.heads_q), dim3(kThreads), attention_bwd_dq_kernel<float>, b,
              d);
  return 0;
}

// The host-side tile plans of attention.cu (fwd_plan, bwd_plan) for dtype 0 float16, 1 bfloat16,
// 2 float32 on a device with `limit` bytes of opt-in shared memory per block: out = {bytes of the
// forward kernel or of the dK/dV kernel, bytes of the dQ kernel (backward; else 0), BM, BN}, the
// bytes 0 when no tile choice fits. tests/test_cuda_emulated.py holds fused_attn/backends/cuda.py's
// mirror of the plans to these.
template <typename T>
void plan_typed(int backward, int64_t head_dim, int64_t head_dim_v, size_t limit, int64_t* out) {
  size_t a = 0, b = 0;
  const Dims d = backward ? bwd_plan<T>(head_dim, head_dim_v, limit, &a, &b)
                          : fwd_plan<T>(head_dim, head_dim_v, limit, &a);
  out[0] = static_cast<int64_t>(a);
  out[1] = static_cast<int64_t>(b);
  out[2] = d.bm;
  out[3] = d.bn;
}

extern "C" void emu_attention_plan(int dtype, int backward, int64_t head_dim, int64_t head_dim_v, int64_t limit,
                                   int64_t* out) {
  if (dtype == 0) {
    plan_typed<__half>(backward, head_dim, head_dim_v, static_cast<size_t>(limit), out);
  } else if (dtype == 1) {
    plan_typed<__nv_bfloat16>(backward, head_dim, head_dim_v, static_cast<size_t>(limit), out);
  } else {
    plan_typed<float>(backward, head_dim, head_dim_v, static_cast<size_t>(limit), out);
  }
}

// ---- the launchers themselves (attention_fwd, attention_bwd) on the emulated device ------------------
// dtype: 0 float16, 1 bfloat16, 2 float32 (DType). Returns 0, or 1 with *error = the launcher's message.
// Under emu_set_dry_run(1) nothing runs (null pointers are fine): emu_launches tells what was launched.
extern "C" int emu_attention_fwd_host(int dtype, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                                      const void* v, const int64_t* vs, const int64_t* sizes, int mask_kind,
                                      const void* mask, const int64_t* ms, int64_t band_lo, int64_t band_hi,
                                      float scale, const uint64_t* dropout, float softcap, const float* alibi,
                                      const int64_t* alibi_stride, int64_t alibi_shift, void* out, const int64_t* os,
                                      float* lse, const char** error) {
  const AttentionFwdArgs a = make_args(q, qs, k, ks, v, vs, sizes, mask_kind, mask, ms, band_lo, band_hi, scale,
                                       dropout, softcap, alibi, alibi_stride, alibi_shift, out, os, lse,
                                       static_cast<DType>(dtype));
  *error = attention_fwd(a, nullptr);
  return *error != nullptr;
}

extern "C" int emu_attention_bwd_host(int dtype, const void* q, const int64_t* qs, const void* k, const int64_t* ks,
                                      const void* v, const int64_t* vs, const int64_t* sizes, int mask_kind,
                                      const void* mask, const int64_t* ms, int64_t band_lo, int64_t band_hi,
                                      float scale, const uint64_t* dropout, float softcap, const float* alibi,
                                      const int64_t* alibi_stride, int64_t alibi_shift, const void* out,
                                      const int64_t* os, const float* lse, const void* dout, const int64_t* dos,
                                      void* dq, void* dk, void* dv, void* dmask, float* delta, const float* dlse,
                                      const char** error) {
  AttentionBwdArgs b{};
  b.fwd = make_args(q, qs, k, ks, v, vs, sizes, mask_kind, mask, ms, band_lo, band_hi, scale, dropout, softcap,
                    alibi, alibi_stride, alibi_shift, const_cast<void*>(out), os, const_cast<float*>(lse),
                    static_cast<DType>(dtype));
  b.dout = dout;
  for (int i = 0; i < 4; ++i) b.dout_stride[i] = dos[i];
  b.dq = dq; b.dk = dk; b.dv = dv; b.dmask = dmask; b.delta = delta; b.dlse = dlse;
  *error = attention_bwd(b, nullptr);
  return *error != nullptr;
}

// `threads` std::threads, each on device `devices[t % 2]`, make `iterations` dry-run calls of the
// launchers (forward and backward, float32 and float16, head dims 256, 16, 128, 32 in turn: kernels
// shared between the threads with more and less shared memory). Returns the number of calls that
// failed; the first failure's message in *first_error.
extern "C" int emu_attention_threads(int threads, int iterations, const int* devices, const char** first_error) {
  std::mutex mutex;
  int failures = 0;
  *first_error = nullptr;
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      emu::current_device = devices[t % 2];
      emu::dry_run = true;
      for (int i = 0; i < iterations; ++i) {
        static constexpr int64_t kDims[4] = {256, 16, 128, 32};
        AttentionBwdArgs b{};
        AttentionFwdArgs& a = b.fwd;
        a.dtype = i % 3 != 0 ? DType::kFloat32 : DType::kFloat16;
        a.batch = 1; a.heads_q = 2; a.heads_kv = 1; a.len_q = a.len_k = 200;
        a.head_dim = a.head_dim_v = kDims[(t + i) % 4];
        a.band_lo = -a.len_q; a.band_hi = a.len_k;
        const char* err = i % 2 != 0 ? attention_bwd(b, nullptr) : attention_fwd(a, nullptr);
        emu::launches.clear();
        if (err != nullptr) {
          const std::lock_guard<std::mutex> lock(mutex);
          if (failures++ == 0) *first_error = err;
        }
      }
    });
  }
  for (auto& th : pool) th.join();
  return failures;
}
