// FA_CHECK(cond, parts...): TORCH_CHECK's contract (a c10::Error, i.e. a RuntimeError in Python,
// naming the function, file and line) with the message assembled here, without std::ostream.
//
// TORCH_CHECK(cond, a, b, c) formats its parts with c10::str, i.e. through a std::ostringstream
// instantiated in this extension. On the H200 machine's toolchain (g++ in /opt/gcc) that
// instantiation crashed: the first failing check that formatted a number segfaulted inside
// ostream::_M_insert<long> in _C.abi3.so (cuda-gdb backtrace, 2026-11-29), for the CPU and the
// CUDA ops alike, so bad input killed the process instead of raising. Passing TORCH_CHECK one
// std::string is not enough: c10::str canonicalises it to `const std::string&`, which misses the
// pass-through specialisation and still streams it through an ostringstream (seen in the
// disassembly: every check called _str_wrapper<std::string const&>::call). So FA_CHECK appends
// the parts to a std::string (std::to_string, snprintf) and hands it straight to
// c10::detail::torchCheckFail, the function TORCH_CHECK itself ends in, which lives in libc10 and
// builds the exception there. tests/test_compiled_ops_fuzz.py reads the disassembly of _C to keep
// it so.
// The message is only assembled when the check fails.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdio>
#include <cstdlib>
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

#define FA_FAIL(...)                                                                                 \
  ::c10::detail::torchCheckFail(__func__, __FILE__, static_cast<uint32_t>(__LINE__),                 \
                                ::fused_attn::check::message(__VA_ARGS__))

#define FA_CHECK(cond, ...)                  \
  do {                                       \
    if (C10_UNLIKELY(!(cond))) {             \
      FA_FAIL(__VA_ARGS__);                  \
    }                                        \
  } while (false)

// FA_CHECK_VALUE: as FA_CHECK, raising ValueError in Python (a bad value of a setting, as the
// package's Python switches raise), not RuntimeError.
#define FA_CHECK_VALUE(cond, ...)                                                   \
  do {                                                                              \
    if (C10_UNLIKELY(!(cond))) {                                                    \
      C10_THROW_ERROR(ValueError, ::fused_attn::check::message(__VA_ARGS__));      \
    }                                                                               \
  } while (false)

namespace fused_attn::check {
// A whole-number setting from the environment: -1 when unset or empty; else the value, which
// must be plain decimal digits (an optional minus sign; no spaces, no suffix) within [lo, hi],
// or ValueError naming the variable, what it wants and the value.
inline long long env_whole_number(const char* name, long long lo, long long hi, const char* wanted) {
  const char* s = std::getenv(name);
  if (s == nullptr || *s == '\0') return -1;
  char* end = nullptr;
  const bool digits_first = (*s >= '0' && *s <= '9') || (*s == '-' && s[1] >= '0' && s[1] <= '9');
  const long long n = digits_first ? std::strtoll(s, &end, 10) : 0;
  FA_CHECK_VALUE(digits_first && *end == '\0' && n >= lo && n <= hi, name, " must be a whole number ", wanted,
                 "; got '", s, "'");
  return n;
}
}  // namespace fused_attn::check

// FA_DISPATCH_FLOATING(dtype, "name", [&] { ... scalar_t ... }): the lambda instantiated for the
// four dtypes the kernels take (float32, float64, bfloat16, float16), as AT_DISPATCH_* does, but
// failing through FA_FAIL (AT_DISPATCH's message is streamed).
#define FA_DISPATCH_CASE(ENUM, TYPE, ...) \
  case ENUM: {                            \
    using scalar_t = TYPE;                \
    return __VA_ARGS__();                 \
  }
#define FA_DISPATCH_FLOATING(DTYPE, NAME, ...)                                              \
  [&] {                                                                                    \
    const ::c10::ScalarType fa_dispatch_dtype_ = (DTYPE);                                 \
    switch (fa_dispatch_dtype_) {                                                         \
      FA_DISPATCH_CASE(::c10::ScalarType::Float, float, __VA_ARGS__)                       \
      FA_DISPATCH_CASE(::c10::ScalarType::Double, double, __VA_ARGS__)                     \
      FA_DISPATCH_CASE(::c10::ScalarType::BFloat16, ::c10::BFloat16, __VA_ARGS__)          \
      FA_DISPATCH_CASE(::c10::ScalarType::Half, ::c10::Half, __VA_ARGS__)                  \
      default:                                                                             \
        FA_FAIL(NAME, ": dtype must be float32, float64, bfloat16 or float16, got ",       \
                fa_dispatch_dtype_);                                                       \
    }                                                                                      \
  }()
