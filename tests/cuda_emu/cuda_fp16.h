// The emulation's float16 (tests/cuda_emu): real IEEE half conversions through the compiler's
// _Float16, round to nearest even, so the 16-bit kernel paths compute what the GPU computes.
#pragma once
#include <cstring>
struct __half { unsigned short bits; };
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
