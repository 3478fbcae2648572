// FA_CHECK(cond, parts...): TORCH_CHECK with the message assembled here, without std::ostream.
//
// TORCH_CHECK(cond, a, b, c) formats its parts with c10::str, i.e. through a std::ostringstream
// instantiated in this extension. On the H200 machine's toolchain (g++ in /opt/gcc with the
// GCC 13 headers) that instantiation crashed: the first failing check that formatted a number
// segfaulted inside ostream::_M_insert<long> in _C.abi3.so (cuda-gdb backtrace, 2026-11-29), for
// the CPU and the CUDA ops alike, so bad input killed the process instead of raising. Here the
// parts are appended to a std::string (std::to_string, snprintf) and TORCH_CHECK receives that
// one string, which c10::str passes through untouched: no stream is built in this library.
// The message is only assembled when the check fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <string>
#include <string_view>
#include <type_traits>

namespace fused_attn::check {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, std::string_view v) { s.append(v.data(), v.size()); }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, bool v) { s += v ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", static_cast<double>(v));
  s += buf;
}
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string s;
  (append(s, parts), ...);
  return s;
}

}  // namespace fused_attn::check

#define FA_CHECK(cond, ...) TORCH_CHECK(cond, ::fused_attn::check::message(__VA_ARGS__))
