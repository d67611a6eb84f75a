// CPU kernels of the sdfused ops: vectorised with at::vec::Vectorized<float>, parallel with
// at::parallel_for.  All arithmetic is fp32; float16 / bfloat16 are converted on load/store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>
#include <cstdlib>

#include "../sdfused_common.h"

namespace sdfused {
namespace {

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

inline Vec silu_v(const Vec& y) { return y / (Vec(1.0f) + y.neg().exp()); }
inline float silu_s(float y) { return y / (1.0f + std::exp(-y)); }

// ---- group_norm ------------------------------------------------------------------------

// y = (x - mean) * a + b (then SiLU) over n contiguous elements.  Subtracting the mean first
// (rather than folding it into the shift) avoids cancellation when |mean| >> std.
template <typename T>
inline void affine_row(const T* x, T* y, int64_t n, float mean, float a, float b, bool silu) {
  const Vec vm(mean), va(a), vb(b);
  int64_t i = 0;
  for (; i + kV <= n; i += kV) {
    Vec r = at::vec::fmadd(load_f(x + i) - vm, va, vb);
    if (silu) r = silu_v(r);
    store_f(y + i, r);
  }
  for (; i < n; ++i) {
    float r = (static_cast<float>(x[i]) - mean) * a + b;
    y[i] = static_cast<T>(silu ? silu_s(r) : r);
  }
}

// y[c] = (x[c] - mean[c]) * a[c] + b[c] (then SiLU) over one row of C channels.
template <typename T>
inline void affine_channels(const T* x, T* y, const float* mean, const float* a, const float* b, int64_t C,
                            bool silu) {
  int64_t c = 0;
  for (; c + kV <= C; c += kV) {
    Vec r = at::vec::fmadd(load_f(x + c) - Vec::loadu(mean + c), Vec::loadu(a + c), Vec::loadu(b + c));
    if (silu) r = silu_v(r);
    store_f(y + c, r);
  }
  for (; c < C; ++c) {
    float r = (static_cast<float>(x[c]) - mean[c]) * a[c] + b[c];
    y[c] = static_cast<T>(silu ? silu_s(r) : r);
  }
}

// sum(x - shift) over n elements; the shift (a sample of the data) keeps fp32 partial sums
// small when |mean| >> std.
template <typename T>
double sum_span(const T* x, int64_t n, float shift) {
  const Vec vs(shift);
  Vec acc0(0.0f), acc1(0.0f);
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV) {
    acc0 += load_f(x + i) - vs;
    acc1 += load_f(x + i + kV) - vs;
  }
  for (; i + kV <= n; i += kV) acc0 += load_f(x + i) - vs;
  double s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) s += static_cast<float>(x[i]) - shift;
  return s;
}

template <typename T>
double sqdev_span(const T* x, int64_t n, float mean) {
  const Vec vm(mean);
  Vec acc0(0.0f), acc1(0.0f);
  int64_t i = 0;
  for (; i + 2 * kV <= n; i += 2 * kV) {
    Vec d0 = load_f(x + i) - vm, d1 = load_f(x + i + kV) - vm;
    acc0 = at::vec::fmadd(d0, d0, acc0);
    acc1 = at::vec::fmadd(d1, d1, acc1);
  }
  for (; i + kV <= n; i += kV) {
    Vec d = load_f(x + i) - vm;
    acc0 = at::vec::fmadd(d, d, acc0);
  }
  double s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc0 + acc1);
  for (; i < n; ++i) {
    double d = static_cast<double>(static_cast<float>(x[i])) - mean;
    s += d * d;
  }
  return s;
}

// (N, C, S) contiguous: one task per (n, group); the group is one contiguous span.
template <typename T>
void group_norm_cf(const T* x, T* y, const float* w, const float* b, int64_t N, int64_t C, int64_t S,
                   int64_t G, double eps, bool silu) {
  const int64_t Cg = C / G, M = Cg * S;
  at::parallel_for(0, N * G, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t n = idx / G, g = idx % G;
      const int64_t off = (n * C + g * Cg) * S;
      const float shift = static_cast<float>(x[off]);
      const float mean = static_cast<float>(shift + sum_span(x + off, M, shift) / static_cast<double>(M));
      const double var = sqdev_span(x + off, M, mean) / static_cast<double>(M);
      const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps));
      for (int64_t cc = 0; cc < Cg; ++cc) {
        const int64_t c = g * Cg + cc;
        affine_row(x + off + cc * S, y + off + cc * S, S, mean, rstd * w[c], b[c], silu);
      }
    }
  });
}

// acc[c] += x[c] - ref[c] (pass 1, ref = a per-channel sample) or (x[c] - ref[c])^2
// (pass 2, ref = group mean) over C channels.
template <typename T>
inline void accumulate_channels(const T* x, float* acc, const float* mean, int64_t C, bool square) {
  int64_t c = 0;
  if (!square) {
    for (; c + kV <= C; c += kV) (Vec::loadu(acc + c) + (load_f(x + c) - Vec::loadu(mean + c))).store(acc + c);
    for (; c < C; ++c) acc[c] += static_cast<float>(x[c]) - mean[c];
  } else {
    for (; c + kV <= C; c += kV) {
      Vec d = load_f(x + c) - Vec::loadu(mean + c);
      at::vec::fmadd(d, d, Vec::loadu(acc + c)).store(acc + c);
    }
    for (; c < C; ++c) {
      float d = static_cast<float>(x[c]) - mean[c];
      acc[c] += d * d;
    }
  }
}

// (N, S, C) contiguous (channels_last): per-channel partial sums over row chunks, reduced
// per group; two passes (mean, then squared deviations) for accuracy, then the affine pass.
template <typename T>
void group_norm_cl(const T* x, T* y, const float* w, const float* b, int64_t N, int64_t C, int64_t S,
                   int64_t G, double eps, bool silu) {
  const int64_t Cg = C / G;
  const int64_t threads = at::get_num_threads();
  const int64_t K = std::max<int64_t>(1, std::min<int64_t>(S, (4 * threads + N - 1) / N));
  std::vector<float> partial(static_cast<size_t>(N * K * C));
  std::vector<float> chan_mean(static_cast<size_t>(N * C)), chan_shift(static_cast<size_t>(N * C));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) chan_shift[n * C + c] = static_cast<float>(x[n * S * C + c]);
  std::vector<float> scale(static_cast<size_t>(N * C)), shift(static_cast<size_t>(N * C));
  std::vector<double> group_mean(static_cast<size_t>(N * G));

  auto pass = [&](bool second) {
    std::fill(partial.begin(), partial.end(), 0.0f);
    at::parallel_for(0, N * K, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / K, k = t % K;
        const int64_t r0 = k * S / K, r1 = (k + 1) * S / K;
        float* acc = partial.data() + t * C;
        const float* ref = (second ? chan_mean.data() : chan_shift.data()) + n * C;
        for (int64_t r = r0; r < r1; ++r) accumulate_channels(x + (n * S + r) * C, acc, ref, C, second);
      }
    });
  };
  auto group_sums = [&](int64_t n, int64_t g) {
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) s += partial[(n * K + k) * C + c];
    return s;
  };

  const double M = static_cast<double>(Cg * S);
  pass(false);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      double shifted = 0.0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) shifted += static_cast<double>(chan_shift[n * C + c]) * S;
      group_mean[n * G + g] = (shifted + group_sums(n, g)) / M;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) chan_mean[n * C + c] = static_cast<float>(group_mean[n * G + g]);
    }
  pass(true);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t g = 0; g < G; ++g) {
      const float rstd = static_cast<float>(1.0 / std::sqrt(group_sums(n, g) / M + eps));
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        scale[n * C + c] = rstd * w[c];
        shift[n * C + c] = b[c];
      }
    }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1));
  at::parallel_for(0, N * S, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / S;
      affine_channels(x + r * C, y + r * C, chan_mean.data() + n * C, scale.data() + n * C, shift.data() + n * C, C,
                      silu);
    }
  });
}

at::Tensor group_norm_cpu(const at::Tensor& x_in, int64_t groups, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps, bool silu) {
  check_group_norm(x_in, groups, weight, bias, eps);
  const Layout layout = group_norm_layout(x_in);
  const at::Tensor x = layout == Layout::kChannelsFirst ? x_in.contiguous() : x_in;
  at::Tensor y = group_norm_output(x, layout);
  if (x.numel() == 0) return y;
  const at::Tensor w = affine_or(weight, x, 1.0), b = affine_or(bias, x, 0.0);
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  dispatch_float(x.scalar_type(), "group_norm", [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* yp = y.mutable_data_ptr<scalar_t>();
    if (layout == Layout::kChannelsLast) {
      group_norm_cl(xp, yp, w.const_data_ptr<float>(), b.const_data_ptr<float>(), N, C, S, groups, eps, silu);
    } else {
      group_norm_cf(xp, yp, w.const_data_ptr<float>(), b.const_data_ptr<float>(), N, C, S, groups, eps, silu);
    }
  });
  return y;
}

// ---- attention -------------------------------------------------------------------------
// Flash-style: each task owns a block of up to BQ query rows of one (b, h) and streams key /
// value blocks of up to BK rows, keeping a running row max m, normaliser l and an fp32
// accumulator, so the full (Lq, Lk) score matrix is never materialised.  Both products are
// fp32 BLAS calls (cpublas::brgemm: oneDNN / MKL underneath):
//   S   (rows, cols) = Qs (rows, D) . Kt[:, k0:k0+cols]     Kt = K^T, (D, Lk), packed per (b, h)
//   Acc (rows, D)   += P (rows, cols) . Vw[k0:k0+cols, :]    Vw = V * w[:, None] (fp32)
// Scaling the value rows by w equals scaling the columns of P; the softmax normaliser l
// excludes w.

constexpr int64_t kBK = 512;            // key block (max)
constexpr int64_t kScoreBlock = 128 * 512;  // floats in the per-thread score buffer S

// C (M, N) = A (M, K) . B (K, N) (+ C when accumulate); row-major fp32 with leading dims.
inline void gemm_rm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C);
}

struct AttnParams {
  int64_t B, H, Lq, Lk, D;
  int64_t q_sb, q_sh, q_sl;  // element strides of q over B, H, Lq (D stride is 1)
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  const float* w;  // (B, Lk) fp32 contiguous or nullptr
  float scale;
};

// max(init, s[0..n)); four accumulators hide the latency of the (NaN-propagating) max.
inline float row_max(const float* s, int64_t n, float init) {
  Vec m0(init), m1(init), m2(init), m3(init);
  int64_t j = 0;
  for (; j + 4 * kV <= n; j += 4 * kV) {
    m0 = at::vec::maximum(m0, Vec::loadu(s + j));
    m1 = at::vec::maximum(m1, Vec::loadu(s + j + kV));
    m2 = at::vec::maximum(m2, Vec::loadu(s + j + 2 * kV));
    m3 = at::vec::maximum(m3, Vec::loadu(s + j + 3 * kV));
  }
  for (; j + kV <= n; j += kV) m0 = at::vec::maximum(m0, Vec::loadu(s + j));
  const Vec mv = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  float mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, mv);
  for (; j < n; ++j) mx = std::max(mx, s[j]);
  return mx;
}

// s[j] = exp(s[j] - mx) in place; returns the sum.  exp_u20 is the fast polynomial exp that
// torch's own CPU flash attention uses (a few ulp).
inline float exp_sum_inplace(float* s, int64_t n, float mx) {
  const Vec vmx(mx);
  Vec sum0(0.0f), sum1(0.0f);
  int64_t j = 0;
  for (; j + 2 * kV <= n; j += 2 * kV) {
    const Vec e0 = (Vec::loadu(s + j) - vmx).exp_u20(), e1 = (Vec::loadu(s + j + kV) - vmx).exp_u20();
    sum0 += e0;
    sum1 += e1;
    e0.store(s + j);
    e1.store(s + j + kV);
  }
  for (; j + kV <= n; j += kV) {
    const Vec e = (Vec::loadu(s + j) - vmx).exp_u20();
    sum0 += e;
    e.store(s + j);
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, sum0 + sum1);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - mx);
    sum += s[j];
  }
  return sum;
}

template <typename T>
inline void convert_row(const T* src, float* dst, int64_t n, float mul) {
  const Vec vm(mul);
  int64_t i = 0;
  for (; i + kV <= n; i += kV) (load_f(src + i) * vm).store(dst + i);
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]) * mul;
}

template <typename T>
void attention_cpu_kernel(const T* q, const T* k, const T* v, T* out, const AttnParams& p) {
  static const int64_t kBKe = getenv("SDF_BK") ? atoi(getenv("SDF_BK")) : kBK;
  static const int64_t kSB = getenv("SDF_SB") ? atoi(getenv("SDF_SB")) : kScoreBlock;
  static const int64_t kMode = getenv("SDF_MODE") ? atoi(getenv("SDF_MODE")) : 0;
  const int64_t D = p.D, Lk = p.Lk, BK = std::min(kBKe, Lk);
  // Query block: fill the score buffer (large blocks amortise the per-call GEMM overhead when
  // Lk is short, e.g. 77 text tokens), but keep a few tasks per thread for load balance.
  int64_t BQ = std::clamp<int64_t>(kSB / BK, 32, 512);
  BQ = std::min(BQ, p.Lq);
  const int64_t tasks_wanted = 4 * static_cast<int64_t>(at::get_num_threads());
  while (BQ > 32 && p.B * p.H * ((p.Lq + BQ - 1) / BQ) < tasks_wanted) BQ = (BQ + 1) / 2;
  const int64_t nqb = (p.Lq + BQ - 1) / BQ;
  // fp32 values without weights are read in place; otherwise converted / weighted per (b, h).
  const bool v_in_place = std::is_same_v<T, float> && p.w == nullptr;

  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Kt(D * Lk), Vw(v_in_place ? 0 : Lk * D);
    std::vector<float> Qs(BQ * D), S(BQ * BK), Acc(BQ * D), m(BQ), l(BQ);
    int64_t packed_bh = -1;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, qb = t % nqb, b = bh / p.H, h = bh % p.H;
      const int64_t q0 = qb * BQ, rows = std::min(BQ, p.Lq - q0);
      const T* kbase = k + b * p.k_sb + h * p.k_sh;
      const T* vbase = v + b * p.v_sb + h * p.v_sh;
      // Pack K^T (and weighted fp32 V) once per (b, h); a thread's tasks are consecutive.
      if (bh != packed_bh) {
        packed_bh = bh;
        constexpr int64_t kTile = 16;  // 16 key rows -> one cache line per Kt row
        for (int64_t j0 = 0; j0 < Lk; j0 += kTile) {
          const int64_t nj = std::min(kTile, Lk - j0);
          for (int64_t d = 0; d < D; ++d)
            for (int64_t j = 0; j < nj; ++j) Kt[d * Lk + j0 + j] = static_cast<float>(kbase[(j0 + j) * p.k_sl + d]);
        }
        if (!v_in_place) {
          const float* wrow = p.w ? p.w + b * Lk : nullptr;
          for (int64_t j = 0; j < Lk; ++j) convert_row(vbase + j * p.v_sl, Vw.data() + j * D, D, wrow ? wrow[j] : 1.0f);
        }
      }
      const float* Vp;
      int64_t ldv;
      if constexpr (std::is_same_v<T, float>) {
        Vp = v_in_place ? vbase : Vw.data();
        ldv = v_in_place ? p.v_sl : D;
      } else {
        Vp = Vw.data();
        ldv = D;
      }
      // Qs = q block * scale (fp32): scaling q once is cheaper than scaling every score.
      const T* qbase = q + b * p.q_sb + h * p.q_sh + q0 * p.q_sl;
      for (int64_t i = 0; i < rows; ++i) convert_row(qbase + i * p.q_sl, Qs.data() + i * D, D, p.scale);

      for (int64_t k0 = 0; k0 < Lk; k0 += BK) {
        const int64_t cols = std::min(BK, Lk - k0);
        const bool first = k0 == 0;
        if (kMode != 2 && kMode != 3) gemm_rm(rows, cols, D, Qs.data(), D, Kt.data() + k0, Lk, S.data(), BK, false);
        if (kMode != 1) for (int64_t i = 0; i < rows; ++i) {
          float* s = S.data() + i * BK;
          const float m_new = row_max(s, cols, first ? -std::numeric_limits<float>::infinity() : m[i]);
          const float sum = kMode == 3 ? 1.0f : exp_sum_inplace(s, cols, m_new);
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
        if (kMode != 2 && kMode != 3) gemm_rm(rows, D, cols, S.data(), BK, Vp + k0 * ldv, ldv, Acc.data(), D, !first);
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

at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                         const std::optional<at::Tensor>& value_weights) {
  check_attention(q_in, k_in, v_in, value_weights);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  at::Tensor w;
  if (value_weights.has_value() && value_weights->defined()) w = value_weights->to(at::kFloat).contiguous();
  AttnParams p{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3),
               q.stride(0), q.stride(1), q.stride(2),
               k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               w.defined() ? w.const_data_ptr<float>() : nullptr, static_cast<float>(scale)};
  dispatch_float(q.scalar_type(), "attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    attention_cpu_kernel(q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                         out.mutable_data_ptr<scalar_t>(), p);
  });
  return out;
}

// ---- geglu -------------------------------------------------------------------------------

template <typename T>
void geglu_cpu_kernel(const T* x, T* y, int64_t rows, int64_t F) {
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
        const Vec gelu = gv * half * (one + (gv * rsqrt2).erf());
        store_f(o + i, load_f(a + i) * gelu);
      }
      for (; i < F; ++i) {
        const float gv = static_cast<float>(g[i]);
        o[i] = static_cast<T>(static_cast<float>(a[i]) * (gv * 0.5f * (1.0f + std::erf(gv * static_cast<float>(M_SQRT1_2)))));
      }
    }
  });
}

at::Tensor geglu_cpu(const at::Tensor& x_in) {
  check_geglu(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(geglu_out_shape(x), x.options());
  if (y.numel() == 0) return y;
  const int64_t F = x.size(-1) / 2, rows = y.numel() / F;
  dispatch_float(x.scalar_type(), "geglu", [&](auto tag) {
    using scalar_t = decltype(tag);
    geglu_cpu_kernel(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rows, F);
  });
  return y;
}

}  // namespace
}  // namespace sdfused

TORCH_LIBRARY_IMPL(sdfused, CPU, m) {
  m.impl("group_norm", &sdfused::group_norm_cpu);
  m.impl("attention", &sdfused::attention_cpu);
  m.impl("geglu", &sdfused::geglu_cpu);
}
