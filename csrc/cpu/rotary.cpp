// Rotary position embedding (RoPE) on CPU (fused_attn_C::rotary; the schema and its contract are in
// csrc/ops.cpp, the Python side in fused_attn/rotary.py).
//
// Token (b, l) sits at position p = positions[b, l]; feature pair i of every head turns by the
// angle theta whose cosine and sine are row p of the tables:
//     (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
// with (x1, x2) = features (i, i + R/2) (GPT-NeoX's halves) or (2i, 2i + 1) (interleaved, GPT-J's).
// The backward is the inverse rotation, the same loop with sin negated (conjugate). Features R..D-1
// are copied.
//
// Work: tokens in parallel chunks. A token's table row is converted once into a small buffer of
// the accumulation type and reused by all its heads (H reads of the row become one). Memory-bound:
// one read of x and one write of out; the loops run at unit stride (vectorised) when the last
// dimension is contiguous, the usual layouts, and through strides otherwise.
#include <torch/library.h>

#include "cpu_common.h"
#include "scratch.h"
#include "../common/overlap.h"

#include <ATen/MemoryOverlap.h>

namespace fused_attn::cpu {
namespace {

// One head's row: kUnit when x and out have unit stride along D (the usual layouts), so that the
// pair loops run over contiguous halves (or contiguous pairs) the compiler vectorises.
template <bool kInterleaved, bool kUnit, typename x_t, typename acc>
// xr and orow may be the same row (rotary_out with out = x): each pair is read before it is written.
inline void turn_row(const x_t* xr, x_t* orow, int64_t sx, int64_t so, const acc* c, const acc* s, int64_t half,
                     int64_t D) {
  const int64_t step = kUnit ? 1 : sx, ostep = kUnit ? 1 : so;
  for (int64_t i = 0; i < half; ++i) {
    const int64_t j1 = kInterleaved ? 2 * i : i, j2 = kInterleaved ? 2 * i + 1 : i + half;
    const acc x1 = static_cast<acc>(xr[j1 * step]), x2 = static_cast<acc>(xr[j2 * step]);
    orow[j1 * ostep] = static_cast<x_t>(x1 * c[i] - x2 * s[i]);
    orow[j2 * ostep] = static_cast<x_t>(x1 * s[i] + x2 * c[i]);
  }
  for (int64_t j = 2 * half; j < D; ++j) orow[j * ostep] = xr[j * step];
}

template <typename x_t, typename table_t, bool kInterleaved, bool kUnit>
void rotary_kernel(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const int64_t* pos,
                   bool conjugate, at::Tensor& out) {
  using acc = acc_t<x_t>;
  const int64_t L = x.size(1), H = x.size(2), D = x.size(3), half = cos.size(1);
  const int64_t sx0 = x.stride(0), sx1 = x.stride(1), sx2 = x.stride(2), sx3 = x.stride(3);
  const int64_t so0 = out.stride(0), so1 = out.stride(1), so2 = out.stride(2), so3 = out.stride(3);
  const int64_t sc0 = cos.stride(0), sc1 = cos.stride(1), ss0 = sin.stride(0), ss1 = sin.stride(1);
  const x_t* xp = x.const_data_ptr<x_t>();
  x_t* op = out.mutable_data_ptr<x_t>();
  const table_t* cp = cos.const_data_ptr<table_t>();
  const table_t* sp = sin.const_data_ptr<table_t>();
  const acc sign = conjugate ? acc(-1) : acc(1);
  const int64_t tokens = x.size(0) * L;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * D));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> table(2 * half);  // this token's cos row, then its sin row (times sign)
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / L, l = n % L, p = pos[n];
      for (int64_t i = 0; i < half; ++i) {
        table[i] = static_cast<acc>(cp[p * sc0 + i * sc1]);
        table[half + i] = sign * static_cast<acc>(sp[p * ss0 + i * ss1]);
      }
      for (int64_t h = 0; h < H; ++h)
        turn_row<kInterleaved, kUnit>(xp + b * sx0 + l * sx1 + h * sx2, op + b * so0 + l * so1 + h * so2, sx3, so3,
                                      table.data(), table.data() + half, half, D);
    }
  });
}

// The checks of x, the tables and the positions; returns the positions as (B * L) int64, checked.
at::Tensor checked_positions(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                             const at::Tensor& positions) {
  check_cpu_float(x, "x");
  check_cpu_float(cos, "cos");
  check_cpu_float(sin, "sin");
  FA_CHECK(x.dim() == 4, "x must be 4-D (B, L, H, D), got shape ", x.sizes());
  FA_CHECK(cos.dim() == 2 && sin.sizes() == cos.sizes(), "cos and sin must be 2-D (S, R/2) of one shape, got ",
           cos.sizes(), " and ", sin.sizes());
  FA_CHECK(sin.scalar_type() == cos.scalar_type(), "cos and sin must share a dtype, got ", cos.scalar_type(),
           " and ", sin.scalar_type());
  const int64_t B = x.size(0), L = x.size(1), D = x.size(3), S = cos.size(0), half = cos.size(1);
  FA_CHECK(half >= 1 && 2 * half <= D, "cos and sin must have between 1 and D/2 = ", D / 2,
           " columns (the rotary dim R/2), got ", half);
  FA_CHECK(positions.device().is_cpu(), "positions must be a CPU tensor, got one on ", positions.device());
  FA_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
           "positions must be int32 or int64, got ", positions.scalar_type());
  FA_CHECK(positions.dim() == 2 && positions.size(0) == B && positions.size(1) == L,
           "positions must have shape (B, L) = (", B, ", ", L, "), got ", positions.sizes());
  for (int64_t d = 0; d < 4; ++d) FA_CHECK(x.stride(d) >= 0, "x must have non-negative strides, got ", x.strides());
  const auto pos = positions.to(at::kLong).contiguous();  // (B, L) row-major: token n = b * L + l
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < B * L; ++n)
    FA_CHECK(pp[n] >= 0 && pp[n] < S, "positions[", n / L, ", ", n % L, "] = ", pp[n], " is outside the ", S,
             " rows of cos and sin");
  return pos;
}

void rotary_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& pos,
                 bool interleaved, bool conjugate, at::Tensor& out) {
  if (x.numel() == 0) return;
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  FA_DISPATCH_FLOATING(x.scalar_type(), "rotary", [&] {
    using x_t = scalar_t;
    FA_DISPATCH_FLOATING(cos.scalar_type(), "rotary", [&] {
      const bool unit = x.stride(3) == 1 && out.stride(3) == 1;
      if (interleaved)
        unit ? rotary_kernel<x_t, scalar_t, true, true>(x, cos, sin, pp, conjugate, out)
             : rotary_kernel<x_t, scalar_t, true, false>(x, cos, sin, pp, conjugate, out);
      else
        unit ? rotary_kernel<x_t, scalar_t, false, true>(x, cos, sin, pp, conjugate, out)
             : rotary_kernel<x_t, scalar_t, false, false>(x, cos, sin, pp, conjugate, out);
    });
  });
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                  bool interleaved, bool conjugate) {
  const auto pos = checked_positions(x, cos, sin, positions);
  auto out = scratch::empty_like(x);  // kept between calls: a training step's outputs fault no pages in
  rotary_into(x, cos, sin, pos, interleaved, conjugate, out);
  return out;
}

// The result written into `out` (x's shape and dtype, any strides without overlapping elements): with
// out = x, the embedding in place (apply_rotary_emb(inplace=True)); the loops read each pair and
// pass-through feature before they write it.
void rotary_out(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions,
                bool interleaved, bool conjugate, at::Tensor out) {
  const auto pos = checked_positions(x, cos, sin, positions);
  FA_CHECK(out.device().is_cpu() && out.scalar_type() == x.scalar_type() && out.sizes() == x.sizes(),
           "out must be a CPU tensor of x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ", out.sizes(),
           " ", out.scalar_type(), " on ", out.device());
  FA_CHECK(!elements_may_overlap(out.sizes().data(), out.strides().data(), out.dim()),
           "out must not have overlapping elements (stride 0 or overlapping strides), got strides ", out.strides());
  // (get_overlap_status answers "too hard" for any non-dense tensor, even one in other memory: asked
  // only of tensors that share a storage, so a strided x with a separate out is taken)
  FA_CHECK(out.is_same(x) || !out.storage().is_alias_of(x.storage()) ||
               at::get_overlap_status(out, x) == at::MemOverlapStatus::No,
           "out must be x itself or not overlap it");
  rotary_into(x, cos, sin, pos, interleaved, conjugate, out);
}

}  // namespace
}  // namespace fused_attn::cpu

TORCH_LIBRARY_IMPL(fused_attn_C, CPU, m) {
  m.impl("rotary", &fused_attn::cpu::rotary);
  m.impl("rotary_out", &fused_attn::cpu::rotary_out);
}
