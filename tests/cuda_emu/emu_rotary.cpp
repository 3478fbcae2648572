// The rotary kernel of csrc/cuda/rotary.cu on CPU threads, for tests/test_cuda_rotary_emulated.py.
// The entry mirrors the launcher: the same size checks (rotary_problem) and grid
// (rotary_launch_config), with the block size the caller picks, and hands back the config so
// the test can tell which access path ran.
#include "cuda_runtime.h"

#include "../../csrc/cuda/rotary.cu"

using namespace fused_attn_cuda;

// sizes: [B, L, H, D, pairs, rows]; strides in elements in the order of RotaryArgs. config (out):
// [tokens_per_block, blocks, pair_vec]. Returns 0, or 1 when rotary_problem refuses the sizes.
extern "C" int emu_rotary(int x_dtype, int table_dtype, int positions_int64, const int64_t* sizes, const void* x,
                          const int64_t* x_stride, const void* cos, const int64_t* cos_stride, const void* sin,
                          const int64_t* sin_stride, const void* positions, const int64_t* positions_stride,
                          int interleaved, int conjugate, void* out, const int64_t* out_stride, int threads,
                          int64_t* config) {
  RotaryArgs a{};
  a.dtype = static_cast<DType>(x_dtype);
  a.table_dtype = static_cast<TableDType>(table_dtype);
  a.positions_int64 = positions_int64 != 0;
  a.interleaved = interleaved != 0;
  a.conjugate = conjugate != 0;
  a.batch = sizes[0]; a.len = sizes[1]; a.heads = sizes[2]; a.head_dim = sizes[3]; a.pairs = sizes[4];
  a.rows = sizes[5];
  a.x = x; a.cos = cos; a.sin = sin; a.positions = positions; a.out = out;
  for (int d = 0; d < 4; ++d) {
    a.x_stride[d] = x_stride[d];
    a.out_stride[d] = out_stride[d];
  }
  for (int d = 0; d < 2; ++d) {
    a.cos_stride[d] = cos_stride[d];
    a.sin_stride[d] = sin_stride[d];
    a.positions_stride[d] = positions_stride[d];
  }
  if (rotary_problem(a) != nullptr) return 1;
  config[0] = config[1] = config[2] = 0;
  if (a.batch * a.len * a.heads == 0) return 0;  // the launcher's early return: no launch
  const RotaryLaunch cfg = rotary_launch_config(a, threads);
  config[0] = cfg.tokens_per_block;
  config[1] = cfg.blocks;
  config[2] = cfg.pair_vec;
  dispatch_dtype(a.dtype, [&](auto x_zero) -> const char* {
    using T = decltype(x_zero);
    return dispatch_table_dtype(a.table_dtype, [&](auto table_zero) -> const char* {
      using C = decltype(table_zero);
      emu::launch(dim3(static_cast<unsigned>(cfg.blocks)), dim3(static_cast<unsigned>(threads)), rotary_kernel<T, C>, a,
                  cfg.tokens_per_block, cfg.pair_vec);
      return nullptr;
    });
  });
  return 0;
}
