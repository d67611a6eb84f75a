// fp32 vector helpers of the CPU kernels: dtype-converting loads and stores, fast exp / erf and
// the softmax row passes.  Included only by kernels.cpp, so every instruction-set build gets its
// own copy; the AVX2 intrinsics are used where CPU_CAPABILITY_AVX2 is defined, at::vec otherwise.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>

namespace sdfused {
namespace {  // each including build keeps its own copy (kernels.h)
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

// ---- fp32 load/store of float / half / bfloat16 (kV elements) ----------------------------
inline Vec load_f(const float* p) { return Vec::loadu(p); }
inline Vec load_f(const c10::Half* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline Vec load_f(const c10::BFloat16* p) {
  Vec out;
  at::vec::load_to_float(p, out);
  return out;
}
inline void store_f(float* p, const Vec& v) { v.store(p); }
template <typename T>
inline void store_f(T* p, const Vec& v) {
  at::vec::convert_from_float<T>(v, v).store(p, kV);
}

// exp(x) for fp32 lanes, accurate to a few ulp (the degree-5 polynomial of ATen's exp_u20) in
// about half the instructions of Sleef's exp.  x = n ln2 + r with n = round(x log2e): adding
// 1.5 * 2^23 + 127 leaves n + 127 in the low mantissa bits, which shifted into the exponent
// field give 2^n.  x is clamped to [-87, 88] (to [-87, inf) when the caller knows x <= 0) so
// that 2^n stays a normal float; the clamps keep NaN.
template <bool kClampHigh = true>
inline Vec fast_exp(const Vec& x_in) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  const __m256 magic = _mm256_set1_ps(12583039.0f);  // 1.5 * 2^23 + 127
  __m256 x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x_in);  // operand order keeps NaN
  if (kClampHigh) x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);
  const __m256 t = _mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), magic);
  const __m256 n = _mm256_sub_ps(t, magic);
  const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693147182f), x);  // |r| <= ln2 / 2
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00828929059f), _mm256_set1_ps(0.0418978221f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166676521f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.499991506f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.999999701f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  return Vec(_mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23))));
#else
  return x_in.exp_u20();
#endif
}

// max of two vectors; NaN handling is left to the caller (the AVX2 instruction drops it).
inline Vec vmax(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  return Vec(_mm256_max_ps(a, b));
#else
  return at::vec::maximum(a, b);
#endif
}

// erf(x) for fp32 lanes: Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7) with fast_exp, about
// twice as fast as Vec::erf, which evaluates the same formula with Sleef's exp.
inline Vec fast_erf(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(_MSC_VER)
  const __m256 sign = _mm256_and_ps(x, _mm256_set1_ps(-0.0f));
  const __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(ax, _mm256_set1_ps(0.3275911f), one));
  __m256 p = _mm256_fmadd_ps(t, _mm256_set1_ps(1.061405429f), _mm256_set1_ps(-1.453152027f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
  p = _mm256_mul_ps(p, t);
  const __m256 e = fast_exp<false>(Vec(_mm256_mul_ps(_mm256_xor_ps(ax, _mm256_set1_ps(-0.0f)), ax)));
  return Vec(_mm256_or_ps(_mm256_fnmadd_ps(p, e, one), sign));
#else
  return x.erf();
#endif
}

inline Vec silu_v(const Vec& y) { return y / (Vec(1.0f) + fast_exp(y.neg())); }
inline float silu_s(float y) { return y / (1.0f + std::exp(-y)); }

// max(init, s[0..n)); four accumulators hide the max latency.  A NaN score may be dropped
// here but still reaches the output through exp(NaN - max).
inline float row_max(const float* s, int64_t n, float init) {
  Vec m0(init), m1(init), m2(init), m3(init);
  int64_t j = 0;
  for (; j + 4 * kV <= n; j += 4 * kV) {
    m0 = vmax(m0, Vec::loadu(s + j));
    m1 = vmax(m1, Vec::loadu(s + j + kV));
    m2 = vmax(m2, Vec::loadu(s + j + 2 * kV));
    m3 = vmax(m3, Vec::loadu(s + j + 3 * kV));
  }
  for (; j + kV <= n; j += kV) m0 = vmax(m0, Vec::loadu(s + j));
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return vmax(a, c); }, vmax(vmax(m0, m1), vmax(m2, m3)));
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// s[j] = exp(s[j] - mx) in place; returns the sum.
inline float exp_sum_inplace(float* s, int64_t n, float mx) {
  const Vec vmx(mx);
  Vec vsum(0.0f);  // one accumulator: a second one gets spilled (16 ymm registers)
  int64_t j = 0;
  for (; j + 2 * kV <= n; j += 2 * kV) {
    const Vec e0 = fast_exp<false>(Vec::loadu(s + j) - vmx), e1 = fast_exp<false>(Vec::loadu(s + j + kV) - vmx);
    vsum += e0 + e1;
    e0.store(s + j);
    e1.store(s + j + kV);
  }
  for (; j + kV <= n; j += kV) {
    const Vec e = fast_exp<false>(Vec::loadu(s + j) - vmx);
    vsum += e;
    e.store(s + j);
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, vsum);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

// dst[0..n) = src[0..n) * mul in fp32.
template <typename T>
inline void convert_row(const T* src, float* dst, int64_t n, float mul) {
  const Vec vm(mul);
  int64_t i = 0;
  for (; i + kV <= n; i += kV) (load_f(src + i) * vm).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * mul;
}

}  // namespace
}  // namespace sdfused
