// Row operations of the CPU attention kernels (csrc/cpu/attention.cpp): row max, exp-and-sum,
// rescale, dropout, the logit soft-cap (tanh) and its backward, ALiBi's bias, and the
// softmax-backward row dS = P * (dP - D). They run on one row of a score tile at a time (a few hundred contiguous
// values), between the two BLAS products.
//
// Why not at::vec::Vectorized? An extension is compiled once, without ATen's per-capability
// builds, so at::vec here is its DEFAULT (scalar, std::exp per element) flavour, and exp would
// then cost as much as the GEMMs. Instead the float rows are written with GCC vector extensions
// (8 lanes) and compiled twice with `target_clones("arch=x86-64-v3", "default")`: the loader picks
// the AVX2 + FMA clone on CPUs that have them (an ifunc), the SSE2 one elsewhere. No -march flag, so the
// build stays portable. The float64 rows (gradcheck only) are plain scalar loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../common/dropout_hash.h"

namespace fused_attn::cpu_attention {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));

// x86-64-v3 = AVX2 + FMA (+ BMI, F16C); fp-contract=fast (GCC's default for C++, stated here
// so the row ops keep it under any flags) lets the compiler fuse a * b + c into FMAs there.
#define FA_ROWOP __attribute__((target_clones("arch=x86-64-v3", "default"), optimize("fp-contract=fast")))
#define FA_INLINE static inline __attribute__((always_inline))

FA_INLINE f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
FA_INLINE void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }
// The first n (< 8) lanes from p, the others `fill`.
FA_INLINE f8 load_partial(const float* p, int64_t n, float fill) {
  f8 v = {fill, fill, fill, fill, fill, fill, fill, fill};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}
FA_INLINE void store_partial(float* p, f8 v, int64_t n) { std::memcpy(p, &v, n * sizeof(float)); }
FA_INLINE f8 splat(float x) { return f8{x, x, x, x, x, x, x, x}; }

// exp(x) for 8 floats, at most ~2.3 ulp (measured against float64 on [-87, 0]): x = n ln2 + r
// with |r| <= ln2/2 (ln2 split in two for an exact reduction), exp(x) = 2^n exp(r), and
// exp(r) = 1 + r + r^2 p(r) with p a cubic fitted for minimax relative error on that interval
// (a degree-5 approximation; the degree-7 one of Cephes' expf is ~1 ulp but costs two more FMAs
// and, with its constants, more registers than AVX2 has, so its loop spilled). n is rounded with
// the 1.5 * 2^23 trick (its integer value then sits in the low mantissa bits, which also gives
// 2^n by a shift). Inputs below -87.3 (including -inf, the masked scores) give exactly 0; NaN
// stays NaN. Inputs here are scores minus their row max or log-sum-exp, so at most a few ulp
// above 0: no upper clamp.
FA_INLINE f8 exp8(f8 x) {
  const f8 lo = splat(-87.33654475f);
  const i8 flushed = x < lo;  // all-ones lanes flushed to 0 (NaN is not: it propagates)
  x = lo > x ? lo : x;        // maxps(lo, x): NaN in x stays
  const float magic = 12582912.0f;  // 1.5 * 2^23
  const f8 t = x * splat(1.44269504088896341f) + splat(magic);
  const f8 n = t - splat(magic);
  const f8 r = x - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  f8 p = splat(8.3125252e-3f);
  p = p * r + splat(4.1890111e-2f);
  p = p * r + splat(1.6667114e-1f);
  p = p * r + splat(4.9999231e-1f);
  const f8 y = p * (r * r) + r + splat(1.0f);
  i8 ti;
  std::memcpy(&ti, &t, sizeof(ti));
  const int32_t magic_bits = 0x4B400000;  // bits of 1.5 * 2^23
  const i8 e = (ti + (127 - magic_bits)) << 23;
  f8 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return flushed ? splat(0.f) : y * scale;
}

// tanh(x) for 8 floats (the logit soft-cap), a few ulp: for |x| <= 0.625 the odd polynomial of
// Cephes' tanhf, x + x^3 p(x^2); above, 1 - 2 / (exp(2|x|) + 1) with |x| clamped to 10 (tanh
// rounds to 1 in float from ~9.01 on, as it does here from 10; exp8 has no upper clamp), then x's sign. NaN stays NaN (both
// branches carry it, and the comparisons pick the polynomial's), +-inf gives +-1. With `zp`, also
// x^2 p(x^2): tanh(x) = x (1 + *zp) where |x| <= 0.625 (row_softcap's capped logits).
FA_INLINE f8 tanh8(f8 x, f8* zp = nullptr) {
  u8 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const u8 sign = bits & 0x80000000u;
  bits &= 0x7FFFFFFFu;
  f8 a;
  std::memcpy(&a, &bits, sizeof(a));
  const f8 clamped = a > splat(10.f) ? splat(10.f) : a;  // NaN stays
  const f8 big = splat(1.f) - splat(2.f) / (exp8(clamped + clamped) + splat(1.f));
  const f8 z = a * a;
  f8 p = splat(-5.70498872745e-3f);
  p = p * z + splat(2.06390887954e-2f);
  p = p * z + splat(-5.37397155531e-2f);
  p = p * z + splat(1.33314422036e-1f);
  p = p * z + splat(-3.33332819422e-1f);
  const f8 pz = p * z;
  if (zp) *zp = pz;
  const f8 small = pz * a + a;
  f8 r = a > splat(0.625f) ? big : small;
  u8 rbits;
  std::memcpy(&rbits, &r, sizeof(rbits));
  rbits |= sign;
  std::memcpy(&r, &rbits, sizeof(r));
  return r;
}

// |x| for 8 floats: the sign bits cleared.
FA_INLINE f8 abs8(f8 x) {
  u8 bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits &= 0x7FFFFFFFu;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

FA_INLINE float hsum8(f8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// ---- float rows (vectorised) ------------------------------------------------------------------

// max of s[0..n); -inf when n == 0. NaN elements are skipped (one vmaxps per vector instead of
// a NaN-propagating compare-and-blend): a NaN among finite scores still turns the row into NaN
// through exp(NaN - max) in row_exp_sum, and a tile with nothing but NaN and -inf (max -inf)
// is caught by the caller with row_has_nan.
FA_ROWOP inline float row_max(const float* s, int64_t n) {
  const float ninf = -std::numeric_limits<float>::infinity();
  f8 m0 = splat(ninf), m1 = splat(ninf);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    f8 a = load8(s + c), b = load8(s + c + 8);
    m0 = a > m0 ? a : m0;  // maxps semantics: NaN in a keeps m0
    m1 = b > m1 ? b : m1;
  }
  for (; c + 8 <= n; c += 8) {
    f8 a = load8(s + c);
    m0 = a > m0 ? a : m0;
  }
  if (c < n) {
    f8 a = load_partial(s + c, n - c, ninf);
    m0 = a > m0 ? a : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  float m = m0[0];
  for (int i = 1; i < 8; ++i) m = m0[i] > m ? m0[i] : m;
  return m;
}

inline bool row_has_nan(const float* s, int64_t n) {
  for (int64_t c = 0; c < n; ++c)
    if (s[c] != s[c]) return true;
  return false;
}

// s[c] = exp(s[c] - m) for c < n; returns the sum of the new values. One vector per iteration
// and one accumulator: exp8's constants then stay in registers (an unrolled loop with two
// accumulators spilled them, and the second accumulator, to the stack).
FA_ROWOP inline float row_exp_sum(float* s, int64_t n, float m) {
  const f8 mv = splat(m);
  f8 acc = splat(0.f);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const f8 a = exp8(load8(s + c) - mv);
    store8(s + c, a);
    acc += a;
  }
  if (c < n) {
    f8 a = exp8(load_partial(s + c, n - c, 0.f) - mv);
    a = (i8{0, 1, 2, 3, 4, 5, 6, 7} < static_cast<int32_t>(n - c)) ? a : splat(0.f);
    store_partial(s + c, a, n - c);
    acc += a;
  }
  return hsum8(acc);
}

// The capped logits of 8 scores x, cap * tanh(u) with u = x * inv_cap, and tanh(u) in *th. Where
// |u| <= 0.625 they are formed as x (1 + u^2 p(u^2)) (tanh8's polynomial: tanh(u) = u (1 + ...),
// and cap * u = x), not as cap * tanh(u): above a cap of ~8.5e37 inv_cap is subnormal in float32,
// and u is wherever |x| < 1.2e-38 * cap, so cap * tanh(u) scaled every logit by 1/cap's rounding
// (~2e-7 at the largest cap) and lost those under ~0.1 to u's (0 below ~1e-7). A cap far above
// the logits leaves them exactly as they are. (NaN: not > 0.625, x's NaN.)
FA_INLINE f8 softcap8(f8 x, f8 cap, f8 inv_cap, f8* th) {
  const f8 u = x * inv_cap;
  f8 zp;
  *th = tanh8(u, &zp);
  return abs8(u) > splat(0.625f) ? *th * cap : x + x * zp;
}

// The logit soft-cap on one row: s[c] = cap * tanh(s[c] * inv_cap); t (if not null) gets the
// tanh values, for the backward's dS * (1 - t^2).
FA_ROWOP inline void row_softcap(float* s, int64_t n, float cap, float inv_cap, float* t) {
  const f8 capv = splat(cap), inv = splat(inv_cap);
  int64_t c = 0;
  f8 th;
  for (; c + 8 <= n; c += 8) {
    const f8 capped = softcap8(load8(s + c), capv, inv, &th);
    if (t) store8(t + c, th);
    store8(s + c, capped);
  }
  if (c < n) {
    const f8 capped = softcap8(load_partial(s + c, n - c, 0.f), capv, inv, &th);
    if (t) store_partial(t + c, th, n - c);
    store_partial(s + c, capped, n - c);
  }
}

// The soft-cap's backward on one row: ds[c] *= 1 - t[c]^2, as (1 - t)(1 + t).
FA_ROWOP inline void row_softcap_bwd(float* ds, const float* t, int64_t n) {
  const f8 one = splat(1.f);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const f8 th = load8(t + c);
    store8(ds + c, load8(ds + c) * ((one - th) * (one + th)));
  }
  for (; c < n; ++c) ds[c] *= (1.f - t[c]) * (1.f + t[c]);
}

// ALiBi on one row: s[c] -= slope * |c - d| for c < n, where d is the row's diagonal in the
// row's own column numbering (query i's key position i + shift, minus the key of column 0), so
// |c - d| = |j - i - shift| for key j. The signed distances c - d run along the row as a float
// vector stepped by 8: integers, exact below 2^24 (sequences far longer than any here), so every
// element gets the same distance whichever tile, column offset or vector lane it lands in (the
// partial tail goes through the same vector code), and the backward's recomputed scores match
// the forward's (exp(s - lse) consistent). Masked scores (-inf) stay -inf.
FA_ROWOP inline void row_alibi(float* s, int64_t n, float slope, int64_t d) {
  const f8 neg = splat(-slope), step = splat(8.f);
  f8 x = splat(static_cast<float>(-d)) + f8{0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f};  // c - d, c = 0..7
  int64_t c = 0;
  for (; c + 8 <= n; c += 8, x += step) store8(s + c, load8(s + c) + neg * abs8(x));
  if (c < n) store_partial(s + c, load_partial(s + c, n - c, 0.f) + neg * abs8(x), n - c);
}

// o[c] *= a
FA_ROWOP inline void row_scale(float* o, int64_t n, float a) {
  const f8 av = splat(a);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) store8(o + c, load8(o + c) * av);
  for (; c < n; ++c) o[c] *= a;
}

// dp[c] = p[c] * (dp[c] - d): the softmax backward of one row (d = rowsum(dO * O)).
FA_ROWOP inline void row_softmax_bwd(const float* p, float* dp, int64_t n, float d) {
  const f8 dv = splat(d);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) store8(dp + c, load8(p + c) * (load8(dp + c) - dv));
  for (; c < n; ++c) dp[c] = p[c] * (dp[c] - d);
}

// dst[c] = keep(row, j0 + c) ? src[c] * inv_keep : 0, with the shared counter hash
// (csrc/common/dropout_hash.h, bit-exact with fused_attn/_rng.py); src may equal dst.
FA_ROWOP inline void row_dropout(const float* src, float* dst, int64_t n, uint32_t row_key, uint32_t j0,
                                 uint32_t threshold, float inv_keep) {
  const u8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const u8 key = {row_key, row_key, row_key, row_key, row_key, row_key, row_key, row_key};
  const f8 zero = splat(0.f), inv = splat(inv_keep);
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    u8 x = key ^ (lane + static_cast<uint32_t>(j0 + c));
    // mix32 twice, lane-wise (the same steps as fused_attn::mix32)
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    x += key;
    x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
    // unsigned compare: flip the sign bit and compare as signed
    const i8 keep = (i8)(x ^ 0x80000000u) >= (int32_t)(threshold ^ 0x80000000u);
    store8(dst + c, keep ? load8(src + c) * inv : zero);
  }
  for (; c < n; ++c) {
    const bool keep = fused_attn::dropout_keep(row_key, static_cast<uint32_t>(j0 + c), threshold);
    dst[c] = keep ? src[c] * inv_keep : 0.f;
  }
}

// ---- double rows (scalar; float64 exists for gradcheck, not for speed) -------------------------

inline bool row_has_nan(const double* s, int64_t n) {
  for (int64_t c = 0; c < n; ++c)
    if (s[c] != s[c]) return true;
  return false;
}
inline double row_max(const double* s, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t c = 0; c < n; ++c) m = (s[c] > m || s[c] != s[c]) ? s[c] : m;  // NaN wins
  return m;
}
inline double row_exp_sum(double* s, int64_t n, double m) {
  double sum = 0;
  for (int64_t c = 0; c < n; ++c) {
    s[c] = std::exp(s[c] - m);
    sum += s[c];
  }
  return sum;
}
inline void row_scale(double* o, int64_t n, double a) {
  for (int64_t c = 0; c < n; ++c) o[c] *= a;
}
inline void row_softcap(double* s, int64_t n, double cap, double inv_cap, double* t) {
  for (int64_t c = 0; c < n; ++c) {
    const double th = std::tanh(s[c] * inv_cap);
    if (t) t[c] = th;
    s[c] = cap * th;
  }
}
inline void row_alibi(double* s, int64_t n, double slope, int64_t d) {
  for (int64_t c = 0; c < n; ++c) s[c] -= slope * static_cast<double>(c >= d ? c - d : d - c);
}
inline void row_softcap_bwd(double* ds, const double* t, int64_t n) {
  for (int64_t c = 0; c < n; ++c) ds[c] *= (1.0 - t[c]) * (1.0 + t[c]);
}
inline void row_softmax_bwd(const double* p, double* dp, int64_t n, double d) {
  for (int64_t c = 0; c < n; ++c) dp[c] = p[c] * (dp[c] - d);
}
inline void row_dropout(const double* src, double* dst, int64_t n, uint32_t row_key, uint32_t j0, uint32_t threshold,
                        double inv_keep) {
  for (int64_t c = 0; c < n; ++c) {
    const bool keep = fused_attn::dropout_keep(row_key, static_cast<uint32_t>(j0 + c), threshold);
    dst[c] = keep ? src[c] * inv_keep : 0.0;
  }
}

#undef FA_ROWOP
#undef FA_INLINE

}  // namespace fused_attn::cpu_attention
