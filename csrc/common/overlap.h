// Whether a strided tensor's elements could share memory, decided from its sizes and strides.
//
// at::has_internal_overlap answers No only for dense layouts and TooHard for every other strided
// one, so a slice such as qkv[:, :, 0] of a packed (B, L, 3, H, D) tensor, whose elements are
// distinct, could not be written in place (FlashAttention's apply_rotary_emb_qkv_ turns exactly
// that). The test here: order the dims of more than one element by stride; the elements are
// distinct when each stride exceeds the largest offset the smaller dims reach, which holds for
// every slice, transpose and sub-view of a dense tensor. A layout it calls overlapping may in rare
// cases not overlap (interleaved dims); it never calls an overlapping one distinct.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace fused_attn {

inline bool elements_may_overlap(const int64_t* sizes, const int64_t* strides, int64_t ndim) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (|stride|, size) of the dims that step
  for (int64_t i = 0; i < ndim; ++i) {
    if (sizes[i] == 0) return false;  // no elements
    if (sizes[i] > 1) dims.emplace_back(strides[i] < 0 ? -strides[i] : strides[i], sizes[i]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;  // the largest offset the dims so far reach from the first element
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return true;
    reach += (size - 1) * stride;
  }
  return false;
}

}  // namespace fused_attn
