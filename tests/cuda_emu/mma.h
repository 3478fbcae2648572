// Stand-in for the emulation (tests/cuda_emu): the WMMA products are not emulated. The launchers
// (compiled here too) instantiate the 16-bit shared-memory kernels, so the API compiles; running one
// stops the process with a message (the tests run them only as dry runs, which launch nothing;
// float32 takes the FMA path and runs).
#pragma once
#include <cstdio>
#include <cstdlib>
namespace nvcuda {
namespace wmma {
struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
enum layout_t { mem_row_major, mem_col_major };
[[noreturn]] inline void not_emulated() {
  std::fputs("tests/cuda_emu: a WMMA product ran; WMMA is not emulated (16-bit shared-memory kernels)\n", stderr);
  std::abort();
}
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment {};
template <typename F, typename P> void load_matrix_sync(F&, const P*, unsigned) { not_emulated(); }
template <typename F, typename P> void load_matrix_sync(F&, const P*, unsigned, layout_t) { not_emulated(); }
template <typename F, typename P> void store_matrix_sync(P*, const F&, unsigned, layout_t) { not_emulated(); }
template <typename F> void fill_fragment(F&, float) { not_emulated(); }
template <typename A, typename B, typename C> void mma_sync(C&, const A&, const B&, const C&) { not_emulated(); }
}  // namespace wmma
}  // namespace nvcuda
