// CPU kernels of the sdfused ops: vectorised with at::vec::Vectorized<float>, parallel with
// at::parallel_for.  All arithmetic is fp32; float16 / bfloat16 are converted on load/store.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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
// Flash-style: each task owns a block of BQ query rows of one (b, h) and streams key/value
// blocks of BK rows, keeping a running max m, normaliser l and fp32 accumulator per row.
// K is transposed into a (Dp, BK) buffer so that scores are broadcast-FMAs over keys;
// P V is broadcast-FMAs over the head dim.  Dp = D rounded up to the vector width.

constexpr int64_t kBQ = 64;
constexpr int64_t kBK = 128;

struct AttnParams {
  int64_t B, H, Lq, Lk, D;
  int64_t q_sb, q_sh, q_sl;  // element strides of q over B, H, Lq (D stride is 1)
  int64_t k_sb, k_sh, k_sl;
  int64_t v_sb, v_sh, v_sl;
  const float* w;  // (B, Lk) fp32 contiguous or nullptr
  float scale;
};

// S[i, j] = sum_d Q[i, d] * Kt[d, j] for 4 rows at a time, BK columns.
inline void scores_block(const float* Q, const float* Kt, float* S, int64_t rows, int64_t Dp, int64_t D) {
  int64_t i = 0;
  for (; i < rows; i += 4) {
    const int64_t nr = std::min<int64_t>(4, rows - i);
    for (int64_t j = 0; j < kBK; j += 2 * kV) {
      Vec a[4][2];
      for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = Vec(0.0f);
      for (int64_t d = 0; d < D; ++d) {
        const Vec k0 = Vec::loadu(Kt + d * kBK + j), k1 = Vec::loadu(Kt + d * kBK + j + kV);
        for (int r = 0; r < 4; ++r) {
          const Vec qv(Q[(i + (r < nr ? r : 0)) * Dp + d]);
          a[r][0] = at::vec::fmadd(qv, k0, a[r][0]);
          a[r][1] = at::vec::fmadd(qv, k1, a[r][1]);
        }
      }
      for (int r = 0; r < nr; ++r) {
        a[r][0].store(S + (i + r) * kBK + j);
        a[r][1].store(S + (i + r) * kBK + j + kV);
      }
    }
  }
}

// Acc[i, :] += sum_j P[i, j] * V[j, :] for `rows` rows, `cols` keys.
inline void pv_block(const float* P, const float* V, float* Acc, int64_t rows, int64_t cols, int64_t Dp) {
  for (int64_t i = 0; i < rows; i += 4) {
    const int64_t nr = std::min<int64_t>(4, rows - i);
    for (int64_t d = 0; d < Dp; d += kV) {
      Vec a[4];
      for (int r = 0; r < 4; ++r) a[r] = r < nr ? Vec::loadu(Acc + (i + r) * Dp + d) : Vec(0.0f);
      for (int64_t j = 0; j < cols; ++j) {
        const Vec vv = Vec::loadu(V + j * Dp + d);
        for (int r = 0; r < 4; ++r) a[r] = at::vec::fmadd(Vec(P[(i + (r < nr ? r : 0)) * kBK + j]), vv, a[r]);
      }
      for (int r = 0; r < nr; ++r) a[r].store(Acc + (i + r) * Dp + d);
    }
  }
}

template <typename T>
void attention_cpu_kernel(const T* q, const T* k, const T* v, T* out, const AttnParams& p) {
  const int64_t D = p.D, Dp = (D + kV - 1) / kV * kV;
  const int64_t nqb = (p.Lq + kBQ - 1) / kBQ;
  at::parallel_for(0, p.B * p.H * nqb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> Q(kBQ * Dp), Kt(Dp * kBK), V(kBK * Dp), S(kBQ * kBK), Acc(kBQ * Dp);
    std::vector<float> m(kBQ), l(kBQ);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bh = t / nqb, qb = t % nqb, b = bh / p.H, h = bh % p.H;
      const int64_t q0 = qb * kBQ, rows = std::min(kBQ, p.Lq - q0);
      const T* qbase = q + b * p.q_sb + h * p.q_sh;
      const T* kbase = k + b * p.k_sb + h * p.k_sh;
      const T* vbase = v + b * p.v_sb + h * p.v_sh;
      const float* wrow = p.w ? p.w + b * p.Lk : nullptr;
      std::fill(Q.begin(), Q.end(), 0.0f);
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t d = 0; d < D; ++d) Q[i * Dp + d] = static_cast<float>(qbase[(q0 + i) * p.q_sl + d]) * p.scale;
      std::fill(Acc.begin(), Acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(V.begin(), V.end(), 0.0f);
      for (int64_t k0 = 0; k0 < p.Lk; k0 += kBK) {
        const int64_t cols = std::min(kBK, p.Lk - k0);
        // columns >= cols of Kt / rows >= cols of V hold stale data; they are never read back
        for (int64_t j = 0; j < cols; ++j) {
          const T* kr = kbase + (k0 + j) * p.k_sl;
          const T* vr = vbase + (k0 + j) * p.v_sl;
          for (int64_t d = 0; d < D; ++d) {
            Kt[d * kBK + j] = static_cast<float>(kr[d]);
            V[j * Dp + d] = static_cast<float>(vr[d]);
          }
        }
        scores_block(Q.data(), Kt.data(), S.data(), rows, Dp, D);
        for (int64_t i = 0; i < rows; ++i) {
          float* s = S.data() + i * kBK;
          float mx = m[i];
          {
            Vec vmax(mx);
            int64_t j = 0;
            for (; j + kV <= cols; j += kV) vmax = at::vec::maximum(vmax, Vec::loadu(s + j));
            mx = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return at::vec::maximum(a, c); }, vmax);
            for (; j < cols; ++j) mx = std::max(mx, s[j]);
          }
          const float alpha = std::exp(m[i] - mx);  // 0 on the first block (m = -inf)
          m[i] = mx;
          // p = exp(s - mx) vectorised; the row sum excludes the value weights.
          const Vec vmx(mx);
          Vec vsum(0.0f);
          int64_t j = 0;
          for (; j + kV <= cols; j += kV) {
            const Vec e = (Vec::loadu(s + j) - vmx).exp();
            vsum += e;
            e.store(s + j);
          }
          float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& c) { return a + c; }, vsum);
          for (; j < cols; ++j) {
            s[j] = std::exp(s[j] - mx);
            sum += s[j];
          }
          l[i] = l[i] * alpha + sum;
          if (wrow != nullptr) {
            int64_t jj = 0;
            for (; jj + kV <= cols; jj += kV) (Vec::loadu(s + jj) * Vec::loadu(wrow + k0 + jj)).store(s + jj);
            for (; jj < cols; ++jj) s[jj] *= wrow[k0 + jj];
          }
          if (alpha != 1.0f) {
            float* a = Acc.data() + i * Dp;
            for (int64_t d = 0; d < Dp; d += kV) (Vec::loadu(a + d) * Vec(alpha)).store(a + d);
          }
        }
        pv_block(S.data(), V.data(), Acc.data(), rows, cols, Dp);
      }
      T* obase = out + ((b * p.H + h) * p.Lq + q0) * D;
      for (int64_t i = 0; i < rows; ++i) {
        const float inv = 1.0f / l[i];
        for (int64_t d = 0; d < D; ++d) obase[i * D + d] = static_cast<T>(Acc[i * Dp + d] * inv);
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
