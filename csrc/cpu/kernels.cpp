// CPU kernels of the sdfused ops: vectorised with at::vec::Vectorized<float>, parallel with
// at::parallel_for.  All arithmetic is fp32; float16 / bfloat16 are converted on load/store.
// Compiled once per instruction set (kernels.h): the CPU_CAPABILITY_* macros setup.py defines pick
// the at::vec width and the AVX2 intrinsics below; every other build takes the portable paths.
#if defined(SDFUSED_KERNELS_DSO)
#include <Python.h>  // first, as Python asks; only for the empty module below
#endif
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "blas.h"
#include "kernels.h"
#include "vec_math.h"

namespace sdfused {
namespace {

// ---- group_norm ------------------------------------------------------------------------
// One statistics pass, then one fused affine (+SiLU) pass.  Statistics are per-channel
// moments shifted by a sample of that channel (so fp32 partial sums stay O(std) even when
// |mean| >> std), accumulated in fp32 lanes over short runs and in double beyond, then merged
// per group with the exact parallel-variance formula.  The output is computed as
// (x - shift_c) * a_c + b_c with b_c folded in double, so the group mean is never rounded.

// sum(x - shift) and sum((x - shift)^2) over n contiguous values, added to s1, s2.
template <typename T>
void shifted_moments(const T* x, int64_t n, float shift, double& s1, double& s2) {
  constexpr int64_t kChunk = 2048;  // fp32 lane sums over <= 128 values each
  const Vec vs(shift);
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    Vec a0(0.0f), a1(0.0f), q0(0.0f), q1(0.0f);
    int64_t i = c0;
    for (; i + 2 * kV <= c1; i += 2 * kV) {
      const Vec d0 = load_f(x + i) - vs, d1 = load_f(x + i + kV) - vs;
      a0 += d0;
      a1 += d1;
      q0 = at::vec::fmadd(d0, d0, q0);
      q1 = at::vec::fmadd(d1, d1, q1);
    }
    for (; i + kV <= c1; i += kV) {
      const Vec d = load_f(x + i) - vs;
      a0 += d;
      q0 = at::vec::fmadd(d, d, q0);
    }
    s1 += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, a0 + a1);
    s2 += at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, q0 + q1);
    for (; i < c1; ++i) {
      const double d = static_cast<double>(static_cast<float>(x[i]) - shift);
      s1 += d;
      s2 += d * d;
    }
  }
}

// From per-channel shifted moments (cnt values per channel) of the Cg channels of one group,
// the per-channel affine y = (x - shift[c]) * a[c] + b[c] of the normalised, weighted output.
inline void group_affine(const float* shift, const double* s1, const double* s2, int64_t Cg, int64_t cnt,
                         double eps, const float* w, const float* b, float* a_out, float* b_out) {
  double mean = 0.0;
  for (int64_t c = 0; c < Cg; ++c) mean += shift[c] + s1[c] / cnt;
  mean /= Cg;
  double m2 = 0.0;  // sum of squared deviations from the group mean
  for (int64_t c = 0; c < Cg; ++c) {
    const double mc = shift[c] + s1[c] / cnt;
    m2 += std::max(0.0, s2[c] - s1[c] * s1[c] / cnt) + cnt * (mc - mean) * (mc - mean);
  }
  const double rstd = 1.0 / std::sqrt(m2 / static_cast<double>(Cg * cnt) + eps);
  for (int64_t c = 0; c < Cg; ++c) {
    const double a = rstd * w[c];
    a_out[c] = static_cast<float>(a);
    b_out[c] = static_cast<float>((shift[c] - mean) * a + b[c]);
  }
}

// y = (x - s) * a + b (then SiLU) over n contiguous elements.
template <typename T>
inline void affine_row(const T* x, T* y, int64_t n, float s, float a, float b, bool silu) {
  const Vec vs(s), va(a), vb(b);
  int64_t i = 0;
  for (; i + kV <= n; i += kV) {
    Vec r = at::vec::fmadd(load_f(x + i) - vs, va, vb);
    if (silu) r = silu_v(r);
    store_f(y + i, r);
  }
  for (; i < n; ++i) {
    float r = (static_cast<float>(x[i]) - s) * a + b;
    y[i] = static_cast<T>(silu ? silu_s(r) : r);
  }
}

// y[c] = (x[c] - s[c]) * a[c] + b[c] (then SiLU) over one row of C channels.
template <typename T>
inline void affine_channels(const T* x, T* y, const float* s, const float* a, const float* b, int64_t C, bool silu) {
  int64_t c = 0;
  for (; c + kV <= C; c += kV) {
    Vec r = at::vec::fmadd(load_f(x + c) - Vec::loadu(s + c), Vec::loadu(a + c), Vec::loadu(b + c));
    if (silu) r = silu_v(r);
    store_f(y + c, r);
  }
  for (; c < C; ++c) {
    float r = (static_cast<float>(x[c]) - s[c]) * a[c] + b[c];
    y[c] = static_cast<T>(silu ? silu_s(r) : r);
  }
}

// (N, C, S) contiguous: one task per (n, group), a contiguous span of Cg * S values that stays
// in cache between the statistics and the affine pass.
template <typename T>
void group_norm_cf(const GroupNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const float* w = static_cast<const float*>(p.weight.ptr);
  const float* b = static_cast<const float*>(p.bias.ptr);
  const int64_t N = p.N, C = p.C, S = p.S, G = p.G, Cg = p.Cg;
  const double eps = p.eps;
  const bool silu = p.silu;
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shift(Cg), a(Cg), bb(Cg);
    std::vector<double> s1(Cg), s2(Cg);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / G, g = idx % G;
      const T* xg = x + (n * C + g * Cg) * S;
      T* yg = y + (n * C + g * Cg) * S;
      for (int64_t c = 0; c < Cg; ++c) {
        shift[c] = static_cast<float>(xg[c * S]);
        s1[c] = s2[c] = 0.0;
        shifted_moments(xg + c * S, S, shift[c], s1[c], s2[c]);
      }
      group_affine(shift.data(), s1.data(), s2.data(), Cg, S, eps, w + g * Cg, b + g * Cg, a.data(), bb.data());
      for (int64_t c = 0; c < Cg; ++c) affine_row(xg + c * S, yg + c * S, S, shift[c], a[c], bb[c], silu);
    }
  });
}

// Adds the kV lanes of v to dst[0..kV) (double).
inline void add_lanes(const Vec& v, double* dst) {
  float tmp[kV];
  v.store(tmp);
  for (int64_t i = 0; i < kV; ++i) dst[i] += tmp[i];
}

// Shifted per-channel moments of `rows` rows of C channels (row stride C), added to s1[C],
// s2[C].  Blocks of 64 rows x 16 channels are summed in registers (each 16-channel slice of
// a row is one cache line), then folded into double.
template <typename T>
void channel_moments(const T* x, int64_t rows, int64_t C, const float* shift, double* s1, double* s2) {
  constexpr int64_t kRows = 64;
  for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
    const T* xb = x + r0 * C;
    const int64_t nr = std::min(kRows, rows - r0);
    int64_t c = 0;
    for (; c + 2 * kV <= C; c += 2 * kV) {
      const Vec h0 = Vec::loadu(shift + c), h1 = Vec::loadu(shift + c + kV);
      Vec a0(0.0f), a1(0.0f), q0(0.0f), q1(0.0f);
      for (int64_t r = 0; r < nr; ++r) {
        const Vec d0 = load_f(xb + r * C + c) - h0, d1 = load_f(xb + r * C + c + kV) - h1;
        a0 += d0;
        a1 += d1;
        q0 = at::vec::fmadd(d0, d0, q0);
        q1 = at::vec::fmadd(d1, d1, q1);
      }
      add_lanes(a0, s1 + c), add_lanes(a1, s1 + c + kV), add_lanes(q0, s2 + c), add_lanes(q1, s2 + c + kV);
    }
    for (; c + kV <= C; c += kV) {
      const Vec h = Vec::loadu(shift + c);
      Vec a0(0.0f), q0(0.0f);
      for (int64_t r = 0; r < nr; ++r) {
        const Vec d = load_f(xb + r * C + c) - h;
        a0 += d;
        q0 = at::vec::fmadd(d, d, q0);
      }
      add_lanes(a0, s1 + c), add_lanes(q0, s2 + c);
    }
    for (; c < C; ++c)
      for (int64_t r = 0; r < nr; ++r) {
        const double d = static_cast<double>(static_cast<float>(xb[r * C + c]) - shift[c]);
        s1[c] += d;
        s2[c] += d * d;
      }
  }
}

// (N, S, C) contiguous (channels_last): per-channel moments over K row chunks per sample (in
// parallel), merged per group, then the affine pass over rows.
template <typename T>
void group_norm_cl(const GroupNormParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const float* w = static_cast<const float*>(p.weight.ptr);
  const float* b = static_cast<const float*>(p.bias.ptr);
  const int64_t N = p.N, C = p.C, S = p.S, G = p.G, Cg = p.Cg;
  const double eps = p.eps;
  const bool silu = p.silu;
  const int64_t threads = at::get_num_threads();
  const int64_t K = threads == 1 ? 1 : std::max<int64_t>(1, std::min<int64_t>(S, (4 * threads + N - 1) / N));
  std::vector<float> shift(N * C), a(N * C), bb(N * C);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) shift[n * C + c] = static_cast<float>(x[n * S * C + c]);  // row 0
  std::vector<double> part(2 * N * K * C, 0.0);  // (N, K, {s1, s2}, C)
  at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / K, k = t % K, r0 = k * S / K, r1 = (k + 1) * S / K;
      double* pt = part.data() + 2 * t * C;
      channel_moments(x + (n * S + r0) * C, r1 - r0, C, shift.data() + n * C, pt, pt + C);
    }
  });
  std::vector<double> s1(C), s2(C);
  for (int64_t n = 0; n < N; ++n) {
    std::fill(s1.begin(), s1.end(), 0.0);
    std::fill(s2.begin(), s2.end(), 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double* pk = part.data() + 2 * (n * K + k) * C;
      for (int64_t c = 0; c < C; ++c) s1[c] += pk[c], s2[c] += pk[C + c];
    }
    for (int64_t g = 0; g < G; ++g) {
      const int64_t c0 = g * Cg, o = n * C + c0;
      group_affine(shift.data() + o, s1.data() + c0, s2.data() + c0, Cg, S, eps, w + c0, b + c0, a.data() + o,
                   bb.data() + o);
    }
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, N * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t o = (r / S) * C;
      affine_channels(x + r * C, y + r * C, shift.data() + o, a.data() + o, bb.data() + o, C, silu);
    }
  });
}

// ---- attention -------------------------------------------------------------------------
// Flash-style: each task owns a block of up to BQ query rows of one (b, h) and streams key /
// value blocks of up to BK rows, keeping a running row max m, normaliser l and an fp32
// accumulator, so the full (Lq, Lk) score matrix is never materialised.  Both products are
// fp32 BLAS GEMMs:
//   S   (rows, cols) = Qs (rows, D) . K[k0:k0+cols, :]^T      Qs = q * scale
//   Acc (rows, D)   += P (rows, cols) . V[k0:k0+cols, :]       P = exp(S - m)
// Value weights scale the rows of V (equivalent to scaling the columns of P) in an fp32 copy
// made once per (b, h); the softmax normaliser l excludes them.  fp16 / bf16 K and V are
// converted to such fp32 copies too.


constexpr int64_t kBK = 512;                // key block (max)
constexpr int64_t kScoreBlock = 256 * 512;  // floats in the per-thread score buffer S


template <typename T>
void attention_cpu_kernel(const AttnParams& p) {
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.o);
  const int64_t D = p.D, Lk = p.Lk, BK = std::min(kBK, Lk);
  // Query block: fill the score buffer (large blocks amortise the per-call GEMM overhead when
  // Lk is short, e.g. 77 text tokens), but keep a few tasks per thread for load balance.
  int64_t BQ = std::min(std::clamp<int64_t>(kScoreBlock / BK, 32, 1024), p.Lq);
  const int64_t tasks_wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  while (BQ > 32 && p.B * p.H * ((p.Lq + BQ - 1) / BQ) < tasks_wanted) BQ = (BQ + 1) / 2;
  const int64_t nqb = (p.Lq + BQ - 1) / BQ;
  // fp32 K / V are read in place (V only without weights) when their row stride is a valid
  // BLAS leading dimension (>= D, fits an int; not e.g. a stride-0 expand); otherwise fp32
  // copies are made per (b, h).
  constexpr bool is_f32 = std::is_same_v<T, float>;
  const auto ld_ok = [&](int64_t ld) { return ld >= D && ld <= std::numeric_limits<int>::max(); };
  const bool k_in_place = is_f32 && ld_ok(p.k_sl);
  const bool v_in_place = is_f32 && p.w == nullptr && ld_ok(p.v_sl);

  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    const SerialBlasGuard serial_blas;
    std::vector<float> Kc(k_in_place ? 0 : Lk * D), Vc(v_in_place ? 0 : Lk * D);
    std::vector<float> Qs(BQ * D), S(BQ * BK), Acc(BQ * D), m(BQ), l(BQ);
    int64_t copied_bh = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, qb = t % nqb, b = bh / p.H, h = bh % p.H;
      const int64_t q0 = qb * BQ, rows = std::min(BQ, p.Lq - q0);
      const T* kbase = k + b * p.k_sb + h * p.k_sh;
      const T* vbase = v + b * p.v_sb + h * p.v_sh;
      // fp32 copies once per (b, h): a thread's tasks are consecutive, so usually once per task run
      if (bh != copied_bh) {
        copied_bh = bh;
        if (!k_in_place)
          for (int64_t j = 0; j < Lk; ++j) convert_row(kbase + j * p.k_sl, Kc.data() + j * D, D, 1.0f);
        if (!v_in_place) {
          const float* wrow = p.w ? p.w + b * Lk : nullptr;
          for (int64_t j = 0; j < Lk; ++j) convert_row(vbase + j * p.v_sl, Vc.data() + j * D, D, wrow ? wrow[j] : 1.0f);
        }
      }
      const float *Kp = Kc.data(), *Vp = Vc.data();
      int64_t ldk = D, ldv = D;
      if constexpr (is_f32) {
        if (k_in_place) Kp = kbase, ldk = p.k_sl;
        if (v_in_place) Vp = vbase, ldv = p.v_sl;
      }
      // Qs = q block * scale in fp32: scaling q once is cheaper than scaling every score
      const T* qbase = q + b * p.q_sb + h * p.q_sh + q0 * p.q_sl;
      for (int64_t i = 0; i < rows; ++i) convert_row(qbase + i * p.q_sl, Qs.data() + i * D, D, p.scale);

      for (int64_t k0 = 0; k0 < Lk; k0 += BK) {
        const int64_t cols = std::min(BK, Lk - k0);
        const bool first = k0 == 0;
        gemm_rm(true, rows, cols, D, Qs.data(), D, Kp + k0 * ldk, ldk, S.data(), BK, false);
        for (int64_t i = 0; i < rows; ++i) {
          float* s = S.data() + i * BK;
          const float m_new = row_max(s, cols, first ? -std::numeric_limits<float>::infinity() : m[i]);
          const float sum = exp_sum_inplace(s, cols, m_new);
          if (first) {
            l[i] = sum;
          } else {
            // rescale the running sum and accumulator to the new max
            const float alpha = std::exp(m[i] - m_new);
            l[i] = l[i] * alpha + sum;
            if (alpha != 1.0f) {
              float* a = Acc.data() + i * D;
              int64_t d = 0;
              for (; d + kV <= D; d += kV) (Vec::loadu(a + d) * Vec(alpha)).store(a + d);
              for (; d < D; ++d) a[d] *= alpha;
            }
          }
          m[i] = m_new;
        }
        // the first block overwrites Acc, later ones accumulate
        gemm_rm(false, rows, D, cols, S.data(), BK, Vp + k0 * ldv, ldv, Acc.data(), D, !first);
      }
      T* obase = out + ((b * p.H + h) * p.Lq + q0) * D;
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.0f / l[i];
        const float* a = Acc.data() + i * D;
        T* o = obase + i * D;
        int64_t d = 0;
        for (; d + kV <= D; d += kV) store_f(o + d, Vec::loadu(a + d) * Vec(inv));
        for (; d < D; ++d) o[d] = static_cast<T>(a[d] * inv);
      }
    }
  });
}

// ---- geglu -------------------------------------------------------------------------------

template <typename T>
void geglu_cpu_kernel(const GegluParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  const int64_t rows = p.rows, F = p.F;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(F, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    const Vec half(0.5f), one(1.0f), rsqrt2(static_cast<float>(M_SQRT1_2));
    for (int64_t r = begin; r < end; ++r) {
      const T* a = x + r * 2 * F;
      const T* g = a + F;
      T* o = y + r * F;
      int64_t i = 0;
      for (; i + kV <= F; i += kV) {
        const Vec gv = load_f(g + i);
        const Vec gelu = gv * half * (one + fast_erf(gv * rsqrt2));
        store_f(o + i, load_f(a + i) * gelu);
      }
      for (; i < F; ++i) {
        const float gv = static_cast<float>(g[i]);
        o[i] = static_cast<T>(static_cast<float>(a[i]) * (gv * 0.5f * (1.0f + std::erf(gv * static_cast<float>(M_SQRT1_2)))));
      }
    }
  });
}

// ---- the table of this build --------------------------------------------------------------

void group_norm(const GroupNormParams& p, at::ScalarType dtype) {
  dispatch_float(dtype, "group_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    if (p.layout == Layout::kChannelsLast) {
      group_norm_cl<scalar_t>(p);
    } else {
      group_norm_cf<scalar_t>(p);
    }
  });
}

void attention(const AttnParams& p, at::ScalarType dtype) {
  dispatch_float(dtype, "attention", [&](auto tag) { attention_cpu_kernel<decltype(tag)>(p); });
}

void geglu(const GegluParams& p, at::ScalarType dtype) {
  dispatch_float(dtype, "geglu", [&](auto tag) { geglu_cpu_kernel<decltype(tag)>(p); });
}

#if defined(CPU_CAPABILITY_AVX512)
constexpr const char* kCapability = "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
constexpr const char* kCapability = "avx2";
#else
constexpr const char* kCapability = "default";
#endif

const CpuKernels* kernels_table(size_t table, size_t gn, size_t attn, size_t gg) {
  static const CpuKernels k{kCapability, &group_norm, &attention, &geglu};
  const bool same = table == sizeof(CpuKernels) && gn == sizeof(GroupNormParams) && attn == sizeof(AttnParams) &&
                    gg == sizeof(GegluParams);
  return same ? &k : nullptr;
}

}  // namespace
}  // namespace sdfused

// A SIMD build (its own shared object, SDFUSED_KERNELS_DSO) exports the entry for dlsym; the
// baseline build in runtime._C keeps its entry hidden under another name.
#if defined(SDFUSED_KERNELS_DSO)
extern "C" __attribute__((visibility("default"))) const sdfused::CpuKernels* sdfused_cpu_kernels_v1(
    size_t table, size_t gn, size_t attn, size_t geglu) {
  return sdfused::kernels_table(table, gn, attn, geglu);
}

// setuptools builds the SIMD builds as extension modules, so whatever walks the package and imports
// every module (pkgutil, freezers) gets an empty module: SDFUSED_KERNELS_MODULE(avx2) in kernels_avx2.cpp.
#define SDFUSED_KERNELS_MODULE(NAME)                                                                    \
  extern "C" PyMODINIT_FUNC PyInit__sdfused_cpu_##NAME(void) {                                          \
    static PyModuleDef def = {PyModuleDef_HEAD_INIT, "_sdfused_cpu_" #NAME,                             \
                              "sdfused CPU kernels (" #NAME "), loaded by runtime._C", -1, nullptr};    \
    return PyModule_Create(&def);                                                                       \
  }
#else
extern "C" const sdfused::CpuKernels* sdfused_cpu_kernels_builtin(size_t table, size_t gn, size_t attn,
                                                                   size_t geglu) {
  return sdfused::kernels_table(table, gn, attn, geglu);
}
#endif
