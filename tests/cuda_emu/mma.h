// Stand-in for the emulation (tests/cuda_emu): declarations only; the WMMA path is never
// instantiated on CPU (float32 takes the FMA path).
#pragma once
namespace nvcuda {
namespace wmma {
struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void> struct fragment;
template <typename F, typename P> void load_matrix_sync(F&, const P*, unsigned);
template <typename F, typename P> void load_matrix_sync(F&, const P*, unsigned, layout_t);
template <typename F, typename P> void store_matrix_sync(P*, const F&, unsigned, layout_t);
template <typename F> void fill_fragment(F&, float);
template <typename A, typename B, typename C> void mma_sync(C&, const A&, const B&, const C&);
}  // namespace wmma
}  // namespace nvcuda
