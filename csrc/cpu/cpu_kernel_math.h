// Vectorisable row helpers of the CPU kernels. No include guard and no namespace on purpose:
// each kernel header includes this file inside its ISA namespace (see cpu_common.h), so the
// helpers are compiled once per ISA with that ISA's code generation. Include cpu_common.h first.

// ---- vector lanes ------------------------------------------------------------------------------
//
// Reductions are written with GCC/Clang vector extensions (32-byte vectors: 8 floats / 4 doubles),
// not at::vec: in an extension at::vec::Vectorized is its generic array-of-lanes version, whose
// loadu (a memcpy into the lane array in 16-byte pieces, then a 32-byte reload) stalls on store
// forwarding in every iteration (measured with perf here: most of the row time). A memcpy into a
// vector type is one unaligned vector load. The compiler cannot vectorise a float reduction loop
// by itself (it may not reorder the sum), hence the explicit lanes. Under the AVX2 pragma these
// are ymm instructions, in the baseline build pairs of SSE registers.
#if defined(__GNUC__) || defined(__clang__)
template <typename A>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int64_t size = 8;
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int64_t size = 4;
};

template <typename A>
inline typename Lanes<A>::type lanes_load(const A* p) {
  typename Lanes<A>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename A>
inline void lanes_store(A* p, typename Lanes<A>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename A>
inline typename Lanes<A>::type lanes_splat(A x) {
  typename Lanes<A>::type v = {};
  return v + x;
}

template <typename A>
inline A lanes_sum(typename Lanes<A>::type v) {
  A s = 0;
  for (int64_t i = 0; i < Lanes<A>::size; ++i) s += v[i];
  return s;
}
#define FUSED_ATTN_HAVE_LANES 1
#endif

// ---- rows to and from the accumulation type ---------------------------------------------------
//
// 16-bit float rows convert 8 values at a time: bfloat16 -> float is a 16-bit shift, and
// float -> bfloat16 rounds to nearest even (NaN -> the quiet NaN 0x7FC0), bit for bit what
// c10::BFloat16 does, written with vector extensions so the compiler emits vector shifts/adds.
// float16 uses the F16C conversions in the AVX2 copy of the kernels (FUSED_ATTN_ISA_AVX2, set
// by the including file) and c10::Half's scalar ones elsewhere. With c10's scalar conversions
// (at::vec::convert is the scalar generic version in an extension) the half precision paths of
// these kernels were conversion-bound, 2x slower than float32.
//
// lanes_load_as<A>(p) / lanes_store_as<A>(p, v) read / write one vector of A from / to a row of
// T (a plain vector access when T is A; else A is float and T a 16-bit type), and
// lanes_round_through<T>(v) rounds float lanes to T's precision and back.
#if defined(FUSED_ATTN_HAVE_LANES)
typedef uint16_t fa_u16x8 __attribute__((vector_size(16)));
typedef uint32_t fa_u32x8 __attribute__((vector_size(32)));
typedef int32_t fa_i32x8 __attribute__((vector_size(32)));
using fa_f32x8 = Lanes<float>::type;

inline fa_u32x8 bf16_round_bits(fa_f32x8 f) {  // the bfloat16 bits in the upper half of each lane
  fa_u32x8 bits;
  std::memcpy(&bits, &f, sizeof(bits));
  const fa_u32x8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  const fa_i32x8 is_nan = f != f;
  return is_nan ? fa_u32x8{} + 0x7FC00000u : rounded;
}

inline fa_f32x8 load8(const c10::BFloat16* p) {
  fa_u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const fa_u32x8 w = __builtin_convertvector(h, fa_u32x8) << 16;
  fa_f32x8 f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
}

inline void store8(c10::BFloat16* p, fa_f32x8 f) {
  const fa_u16x8 h = __builtin_convertvector(bf16_round_bits(f) >> 16, fa_u16x8);
  std::memcpy(p, &h, sizeof(h));
}

inline fa_f32x8 load8(const c10::Half* p) {
#if defined(FUSED_ATTN_ISA_AVX2)
  return (fa_f32x8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  fa_f32x8 f;
  for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(p[i]);
  return f;
#endif
}

inline void store8(c10::Half* p, fa_f32x8 f) {
#if defined(FUSED_ATTN_ISA_AVX2)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < 8; ++i) p[i] = static_cast<c10::Half>(f[i]);
#endif
}

// Whether rows of T can be read/written as vectors of A (else the kernels use scalar loops; the
// one such pair is float64 compute with a float32 residual stream).
template <typename A, typename T>
inline constexpr bool kLaneIO = std::is_same_v<T, A> || (std::is_same_v<A, float> &&
                                                         (std::is_same_v<T, c10::BFloat16> ||
                                                          std::is_same_v<T, c10::Half>));

template <typename A, typename T>
inline typename Lanes<A>::type lanes_load_as(const T* p) {
  if constexpr (std::is_same_v<T, A>) return lanes_load(p);
  else return load8(p);
}

template <typename A, typename T>
inline void lanes_store_as(T* p, typename Lanes<A>::type v) {
  if constexpr (std::is_same_v<T, A>) lanes_store(p, v);
  else store8(p, v);
}

template <typename T, typename A>
inline typename Lanes<A>::type lanes_round_through(typename Lanes<A>::type v) {
  if constexpr (std::is_same_v<T, A>) {
    return v;
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const fa_u32x8 bits = bf16_round_bits(v);
    fa_f32x8 f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  } else {
    T h[8];
    store8(h, v);
    return load8(h);
  }
}
#endif

template <typename T, typename A>
inline void load_row(const T* src, A* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    if (n > 0) std::memcpy(dst, src, n * sizeof(A));  // (an empty row may come with a null pointer)
  } else {
    int64_t i = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
    if constexpr (std::is_same_v<A, float>)
      for (; i + 8 <= n; i += 8) lanes_store(dst + i, load8(src + i));
#endif
    for (; i < n; ++i) dst[i] = static_cast<A>(src[i]);
  }
}

template <typename A, typename T>
inline void store_row(const A* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    if (n > 0) std::memcpy(dst, src, n * sizeof(A));  // (an empty row may come with a null pointer)
  } else {
    int64_t i = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
    if constexpr (std::is_same_v<A, float>)
      for (; i + 8 <= n; i += 8) store8(dst + i, lanes_load(src + i));
#endif
    for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  }
}

// Round a row of A values to T and back (what storing in T then reading it again gives).
template <typename T, typename A>
inline void round_row_through(A* buf, int64_t n) {
  if constexpr (!std::is_same_v<T, A>) {
    int64_t i = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
    if constexpr (std::is_same_v<A, float>)
      for (; i + 8 <= n; i += 8) lanes_store(buf + i, lanes_round_through<T, A>(lanes_load(buf + i)));
#endif
    for (; i < n; ++i) buf[i] = static_cast<A>(static_cast<T>(buf[i]));
  }
}

// ---- dropout ----------------------------------------------------------------------------------

// Dropout multipliers of one logical row: keep/(1-p), i.e. 0 or 1/(1-p), for columns
// [0, n) of row `row` (fused_attn/_rng.py numbering). The hash is 32-bit integer math only.
template <typename A>
inline void dropout_row_scale(A* mult, int64_t n, uint64_t seed, uint64_t offset, uint64_t row, uint32_t threshold,
                              A scale) {
  const uint32_t key = fused_attn::dropout_row_key(seed, offset, row);
  for (int64_t c = 0; c < n; ++c) {
    mult[c] = fused_attn::dropout_bits(key, static_cast<uint32_t>(c)) >= threshold ? scale : A(0);
  }
}

// ---- branch-free float math (vectorisable; float64 uses libm for full accuracy) ------------------

// exp(x) for float: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, a degree-6
// polynomial for e^r (Cephes expf coefficients, ~1 ulp), and 2^n put into the exponent bits.
// x is clamped to [-88, 88.5], where n runs from -127 to 128, whose exponent fields are those of
// 0 and of +inf: x <= -87.68 gives 0 (the true value is under 8e-39), -87.68..-87.3 a denormal,
// x >= 88.38 gives +inf (the true value is over 2.4e38; FLT_MAX is e^88.72), NaN stays NaN (every
// comparison with it is false), with no blend after the polynomial. (The clamp was [-87.3, 88]:
// e^-inf came out 1.2e-38 and e^inf 1.7e38, so sigmoid(-3e38) was 6e-39, silu(-3e38) = -1.82,
// and gelu'(3e38) = 1 + 3e38 * 0.4 * 1.2e-38.)
inline float exp_f(float x) {
  x = x < -88.0f ? -88.0f : x;  // ternaries (not std::min/max) if-convert into vector blends
  x = x > 88.5f ? 88.5f : x;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * kLog2e + kRound;
  const float n = t - kRound;
  int32_t ni;
  std::memcpy(&ni, &t, sizeof(ni));
  ni -= 0x4B400000;  // the bits of kRound: what remains is n as an integer
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float er = (p * r * r + r) + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return er * two_n;
}
inline double exp_f(double x) { return std::exp(x); }

// erf for float: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), the formula ATen's own AVX2
// erf uses; float64 uses std::erf.
inline float erf_f(float x) {
  const float ax = std::fabs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float y = 1.0f - p * t * exp_f(-ax * ax);
  return std::copysign(y, x);
}
inline double erf_f(double x) { return std::erf(x); }

template <typename A>
inline A sigmoid_f(A x) {
  return A(1) / (A(1) + exp_f(-x));
}


// ---- vectorised row reductions ---------------------------------------------------------------

// sum(v)
template <typename A>
inline A row_sum(const A* v, int64_t n) {
  int64_t i = 0;
  A s = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
  using L = Lanes<A>;
  auto acc0 = lanes_splat<A>(0), acc1 = lanes_splat<A>(0);
  for (; i + 2 * L::size <= n; i += 2 * L::size) {
    acc0 += lanes_load(v + i);
    acc1 += lanes_load(v + i + L::size);
  }
  for (; i + L::size <= n; i += L::size) acc0 += lanes_load(v + i);
  s = lanes_sum<A>(acc0 + acc1);
#endif
  for (; i < n; ++i) s += v[i];
  return s;
}

// sum(a * b)
template <typename A>
inline A row_dot(const A* a, const A* b, int64_t n) {
  int64_t i = 0;
  A s = 0;
#if defined(FUSED_ATTN_HAVE_LANES)
  using L = Lanes<A>;
  auto acc0 = lanes_splat<A>(0), acc1 = lanes_splat<A>(0);
  for (; i + 2 * L::size <= n; i += 2 * L::size) {
    acc0 += lanes_load(a + i) * lanes_load(b + i);
    acc1 += lanes_load(a + i + L::size) * lanes_load(b + i + L::size);
  }
  for (; i + L::size <= n; i += L::size) acc0 += lanes_load(a + i) * lanes_load(b + i);
  s = lanes_sum<A>(acc0 + acc1);
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// buf[c] += src[c], src converted to A (aux: scratch of n values, used when a conversion is needed).
template <typename T, typename A>
inline void add_row(const T* src, A* buf, A* aux, int64_t n) {
  if constexpr (std::is_same_v<T, A>) {
    for (int64_t c = 0; c < n; ++c) buf[c] += src[c];
  } else {
    load_row(src, aux, n);
    for (int64_t c = 0; c < n; ++c) buf[c] += aux[c];
  }
}
