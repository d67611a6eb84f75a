// CUDA kernels of the sdfused ops (fp32 / fp16 / bf16, statistics and softmax in fp32).
//
// Kernels take plain pointers and strides through small params structs; the host wrappers at
// the bottom do the checks (csrc/sdfused_common.h), pick a kernel and launch it on the current
// stream.  16-byte vector loads are used where sizes, strides and pointers allow.
//
// sm_90 notes: attention here uses sm_80-style WMMA (mma.sync under the hood) with operands
// staged through shared memory by ordinary loads.  On H100 a wgmma + TMA pipeline (async
// K/V tile copies, warpgroup MMA with the accumulator rescaled in registers, FA3 style) would
// roughly double attention throughput; group_norm / geglu are bandwidth bound and would gain
// little.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../sdfused_common.h"

namespace sdfused {
namespace {

// ---- type helpers -----------------------------------------------------------------------

template <typename T> struct DevType { using type = T; };
template <> struct DevType<c10::Half> { using type = __half; };
template <> struct DevType<c10::BFloat16> { using type = __nv_bfloat16; };

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// VEC elements of T in one 16-byte (or smaller, for VEC == 1) aligned pack.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__device__ __forceinline__ float silu_f(float y) { return y / (1.0f + __expf(-y)); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// ---- group_norm ---------------------------------------------------------------------------
// Three kernels: (1) per (n, group, split) Welford partials, (2) merge partials into
// per-(n, channel) (mean, scale, shift), (3) one elementwise pass
// y = (x - mean) * scale + shift (+ SiLU); the mean is subtracted first to avoid cancellation.
// Splitting each group over several blocks keeps all SMs busy at SD shapes (N * G = 64).

struct GroupNormParams {
  const void* x;
  void* y;
  const float* weight;  // (C,) fp32
  const float* bias;    // (C,) fp32
  float* partial;       // (N * G * splits, 3): count, mean, M2
  float* ab;            // (N * C, 3): mean, scale, shift
  int64_t N, C, S, G, Cg;
  int64_t chunk;  // elements of a group per split (multiple of 8)
  int splits;
  float eps;
  bool silu;
  bool channels_last;
};

struct Welford {
  float n, mean, m2;
};

__device__ __forceinline__ Welford welford_merge(Welford a, Welford b) {
  const float n = a.n + b.n;
  if (n == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float fb = b.n / n;
  return {n, a.mean + delta * fb, a.m2 + b.m2 + delta * delta * a.n * fb};
}

__device__ __forceinline__ Welford welford_add(Welford a, float x) {
  a.n += 1.0f;
  const float d = x - a.mean;
  a.mean += d / a.n;
  a.m2 += d * (x - a.mean);
  return a;
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) gn_stats_kernel(GroupNormParams p) {
  const int64_t ng = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t n = ng / p.G, g = ng % p.G;
  const int64_t M = p.Cg * p.S;
  const int64_t e0 = split * p.chunk, e1 = min(M, e0 + p.chunk);
  const T* x = static_cast<const T*>(p.x);
  Welford w{0.0f, 0.0f, 0.0f};
  if (!p.channels_last) {
    const T* base = x + (n * p.C + g * p.Cg) * p.S;
    // VEC > 1 only when the group span, the chunk and the pointer are 16-byte aligned.
    for (int64_t e = e0 + threadIdx.x * VEC; e < e1; e += blockDim.x * VEC) {
      const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(base + e);
#pragma unroll
      for (int i = 0; i < VEC; ++i) w = welford_add(w, to_f(pk.v[i]));
    }
  } else {
    // TODO(perf): for channels_last a (rows x C) tile per block would read full cache lines.
    const T* base = x + n * p.S * p.C + g * p.Cg;
    for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
      const int64_t s = e / p.Cg, cc = e - s * p.Cg;
      w = welford_add(w, to_f(base[s * p.C + cc]));
    }
  }
  // warp then block merge
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Welford o{__shfl_xor_sync(0xffffffffu, w.n, off), __shfl_xor_sync(0xffffffffu, w.mean, off),
              __shfl_xor_sync(0xffffffffu, w.m2, off)};
    w = welford_merge(w, o);
  }
  __shared__ Welford warp_w[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_w[warp] = w;
  __syncthreads();
  if (threadIdx.x == 0) {
    Welford t = warp_w[0];
    for (int i = 1; i < static_cast<int>(blockDim.x >> 5); ++i) t = welford_merge(t, warp_w[i]);
    float* out = p.partial + (ng * p.splits + split) * 3;
    out[0] = t.n;
    out[1] = t.mean;
    out[2] = t.m2;
  }
}

__global__ void gn_finalize_kernel(GroupNormParams p) {
  const int64_t ng = blockIdx.x;
  const int64_t n = ng / p.G, g = ng % p.G;
  __shared__ float s_mean, s_rstd;
  if (threadIdx.x == 0) {
    Welford t{0.0f, 0.0f, 0.0f};
    for (int s = 0; s < p.splits; ++s) {
      const float* q = p.partial + (ng * p.splits + s) * 3;
      t = welford_merge(t, Welford{q[0], q[1], q[2]});
    }
    s_mean = t.mean;
    s_rstd = rsqrtf(t.m2 / fmaxf(t.n, 1.0f) + p.eps);
  }
  __syncthreads();
  for (int64_t cc = threadIdx.x; cc < p.Cg; cc += blockDim.x) {
    const int64_t c = g * p.Cg + cc;
    const float a = s_rstd * p.weight[c];
    float* out = p.ab + (n * p.C + c) * 3;
    out[0] = s_mean;
    out[1] = a;
    out[2] = p.bias[c];
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(256) gn_apply_kernel(GroupNormParams p) {
  const int64_t total = p.N * p.C * p.S / VEC;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * VEC;
    const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + e);
    Pack<T, VEC> out;
    if (!p.channels_last) {  // the VEC elements share one channel (S % VEC == 0)
      const int64_t nc = e / p.S;
      const float mu = p.ab[nc * 3], a = p.ab[nc * 3 + 1], b = p.ab[nc * 3 + 2];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float r = (to_f(in.v[j]) - mu) * a + b;
        out.v[j] = from_f<T>(p.silu ? silu_f(r) : r);
      }
    } else {  // VEC consecutive channels of one pixel (C % VEC == 0)
      const int64_t n = e / (p.S * p.C), c = e % p.C;
      const float* ab = p.ab + (n * p.C + c) * 3;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float r = (to_f(in.v[j]) - ab[3 * j]) * ab[3 * j + 1] + ab[3 * j + 2];
        out.v[j] = from_f<T>(p.silu ? silu_f(r) : r);
      }
    }
    *reinterpret_cast<Pack<T, VEC>*>(y + e) = out;
  }
}

template <typename T>
void launch_group_norm(GroupNormParams& p, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t M = p.Cg * p.S;
  const bool ptr_ok = aligned16(p.x) && aligned16(p.y);
  // stats: vector loads need every group span to start on a 16-byte boundary
  const bool stats_vec = ptr_ok && !p.channels_last && (M % kVec == 0);
  const int64_t want = std::max<int64_t>(1, (4 * num_sms() + p.N * p.G - 1) / (p.N * p.G));
  p.splits = static_cast<int>(std::min<int64_t>({want, 64, std::max<int64_t>(1, M / 2048)}));
  p.chunk = ((M + p.splits - 1) / p.splits + 7) / 8 * 8;
  p.splits = static_cast<int>((M + p.chunk - 1) / p.chunk);
  const dim3 sgrid(static_cast<unsigned>(p.N * p.G), static_cast<unsigned>(p.splits));
  if (stats_vec) {
    gn_stats_kernel<T, kVec><<<sgrid, 256, 0, stream>>>(p);
  } else {
    gn_stats_kernel<T, 1><<<sgrid, 256, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gn_finalize_kernel<<<static_cast<unsigned>(p.N * p.G), 128, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool apply_vec = ptr_ok && (p.channels_last ? p.C % kVec == 0 : p.S % kVec == 0);
  const int vec = apply_vec ? kVec : 1;
  const int64_t items = p.N * p.C * p.S / vec;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, num_sms() * 16));
  if (apply_vec) {
    gn_apply_kernel<T, kVec><<<blocks, 256, 0, stream>>>(p);
  } else {
    gn_apply_kernel<T, 1><<<blocks, 256, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor group_norm_cuda(const at::Tensor& x_in, int64_t groups, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, bool silu) {
  check_group_norm(x_in, groups, weight, bias, eps);
  const at::cuda::OptionalCUDAGuard guard(x_in.device());
  const Layout layout = group_norm_layout(x_in);
  const at::Tensor x = layout == Layout::kChannelsFirst ? x_in.contiguous() : x_in;
  at::Tensor y = group_norm_output(x, layout);
  if (x.numel() == 0) return y;
  const at::Tensor w = affine_or(weight, x, 1.0), b = affine_or(bias, x, 0.0);
  const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
  TORCH_CHECK(N * groups < (int64_t(1) << 31), "sdfused::group_norm: N * groups = ", N * groups,
              " exceeds the CUDA grid limit");
  at::Tensor partial = at::empty({N * groups * 64 * 3}, x.options().dtype(at::kFloat));
  at::Tensor ab = at::empty({N * C * 3}, x.options().dtype(at::kFloat));
  GroupNormParams p{x.const_data_ptr(), y.mutable_data_ptr(), w.const_data_ptr<float>(), b.const_data_ptr<float>(),
                    partial.mutable_data_ptr<float>(), ab.mutable_data_ptr<float>(), N, C, S, groups, C / groups,
                    0, 1, static_cast<float>(eps), silu, layout == Layout::kChannelsLast};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "group_norm", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    launch_group_norm<T>(p, stream);
  });
  return y;
}

// ---- geglu --------------------------------------------------------------------------------

struct GegluParams {
  const void* x;
  void* y;
  int64_t rows, F;
};

template <typename T, int VEC>
__global__ void __launch_bounds__(256) geglu_kernel(GegluParams p) {
  const int64_t total = p.rows * p.F / VEC;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = i * VEC, r = o / p.F, f = o - r * p.F;
    const T* row = x + r * 2 * p.F;
    const Pack<T, VEC> a = *reinterpret_cast<const Pack<T, VEC>*>(row + f);
    const Pack<T, VEC> g = *reinterpret_cast<const Pack<T, VEC>*>(row + p.F + f);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float gv = to_f(g.v[j]);
      out.v[j] = from_f<T>(to_f(a.v[j]) * (0.5f * gv * (1.0f + erff(gv * 0.70710678118654752f))));
    }
    *reinterpret_cast<Pack<T, VEC>*>(y + o) = out;
  }
}

at::Tensor geglu_cuda(const at::Tensor& x_in) {
  check_geglu(x_in);
  const at::cuda::OptionalCUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(geglu_out_shape(x), x.options());
  if (y.numel() == 0) return y;
  GegluParams p{x.const_data_ptr(), y.mutable_data_ptr(), 0, x.size(-1) / 2};
  p.rows = y.numel() / p.F;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "geglu", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    constexpr int kVec = 16 / sizeof(T);
    const bool vec = p.F % kVec == 0 && aligned16(p.x) && aligned16(p.y);
    const int64_t items = p.rows * p.F / (vec ? kVec : 1);
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((items + 255) / 256, num_sms() * 16));
    if (vec) {
      geglu_kernel<T, kVec><<<blocks, 256, 0, stream>>>(p);
    } else {
      geglu_kernel<T, 1><<<blocks, 256, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

// ---- attention ----------------------------------------------------------------------------

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;          // (B, H, Lq, D) contiguous
  const float* w;   // (B, Lk) fp32 contiguous, or nullptr
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;  // element strides (D stride is 1)
  int B, H, Lq, Lk, D;
  float scale;
  bool vec_ok;  // 16-byte loads of rows are legal (D, strides and pointers suitably aligned)
};

// Tensor-core flash attention for fp16 / bf16, head dim padded to DP (multiple of 16).
// Block = 4 warps = 64 query rows; key/value tiles of 64 rows.  Per key tile each warp does
// S = Q K^T (WMMA 16x16x16, fp32 accumulate) into shared memory, an online-softmax update on
// its 16 rows (two lanes per row), then O += P V with O kept as fp32 in shared memory (the WMMA
// accumulator layout is opaque, so the per-row rescale happens there; an mma.sync register
// layout would avoid that round trip).
namespace wmma = nvcuda::wmma;
constexpr int kBM = 64, kBN = 64, kAttnThreads = 128;

template <int DP>
struct AttnSmem {
  static constexpr int LD = DP + 8;        // half-element row stride of Q/K/V tiles
  static constexpr int LDS = kBN + 4;      // float row stride of S
  static constexpr int LDP = kBN + 8;      // half row stride of P
  static constexpr int LDO = DP + 4;       // float row stride of O
  static constexpr size_t q_off = 0;
  static constexpr size_t k_off = q_off + size_t(kBM) * LD * 2;
  static constexpr size_t v_off = k_off + size_t(kBN) * LD * 2;
  static constexpr size_t w_off = v_off + size_t(kBN) * LD * 2;
  static constexpr size_t s_off = w_off + size_t(kBN) * 4;
  static constexpr size_t p_off = s_off + size_t(kBM) * LDS * 4;
  static constexpr size_t o_off = p_off + size_t(kBM) * LDP * 2;
  static constexpr size_t bytes = o_off + size_t(kBM) * LDO * 4;
};

// Loads `rows_valid` rows of D elements (row stride `ld_g`) into a zero-padded (kRows x DP) tile.
template <typename T, int DP, int kRows>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld_g, int rows_valid, int D, bool vec_ok) {
  constexpr int LD = DP + 8;
  constexpr int kChunks = DP / 8;
  for (int idx = threadIdx.x; idx < kRows * kChunks; idx += kAttnThreads) {
    const int r = idx / kChunks, d0 = (idx % kChunks) * 8;
    T* out = dst + r * LD + d0;
    if (vec_ok && r < rows_valid && d0 + 8 <= D) {
      *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(src + r * ld_g + d0);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j)
        out[j] = (r < rows_valid && d0 + j < D) ? src[r * ld_g + d0 + j] : from_f<T>(0.0f);
    }
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(kAttnThreads) attn_wmma_kernel(AttnParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using SM = AttnSmem<DP>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + SM::q_off);
  T* Ks = reinterpret_cast<T*>(smem + SM::k_off);
  T* Vs = reinterpret_cast<T*>(smem + SM::v_off);
  float* Ws = reinterpret_cast<float*>(smem + SM::w_off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* Ss = reinterpret_cast<float*>(smem + SM::s_off) + warp * 16 * SM::LDS;
  T* Ps = reinterpret_cast<T*>(smem + SM::p_off) + warp * 16 * SM::LDP;
  float* Os = reinterpret_cast<float*>(smem + SM::o_off) + warp * 16 * SM::LDO;

  const int nqt = (p.Lq + kBM - 1) / kBM;
  const int bh = blockIdx.x / nqt, qt = blockIdx.x % nqt;
  const int b = bh / p.H, h = bh % p.H;
  const int q0 = qt * kBM;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + int64_t(q0) * p.q_sl;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  const float* wg = p.w != nullptr ? p.w + int64_t(b) * p.Lk : nullptr;

  load_tile<T, DP, kBM>(Qs, qg, p.q_sl, min(kBM, p.Lq - q0), p.D, p.vec_ok);
  for (int i = lane; i < 16 * SM::LDO; i += 32) Os[i] = 0.0f;

  // two lanes per query row; lane pair (2r, 2r+1) owns columns [0, 32) and [32, 64)
  const int row = lane >> 1, col0 = (lane & 1) * 32;
  float m_run = -INFINITY, l_run = 0.0f;

  for (int k0 = 0; k0 < p.Lk; k0 += kBN) {
    const int kv_rows = min(kBN, p.Lk - k0);
    __syncthreads();  // previous tile fully consumed (and Q tile visible on the first pass)
    load_tile<T, DP, kBN>(Ks, kg + int64_t(k0) * p.k_sl, p.k_sl, kv_rows, p.D, p.vec_ok);
    load_tile<T, DP, kBN>(Vs, vg + int64_t(k0) * p.v_sl, p.v_sl, kv_rows, p.D, p.vec_ok);
    for (int j = threadIdx.x; j < kBN; j += kAttnThreads) Ws[j] = (wg != nullptr && j < kv_rows) ? wg[k0 + j] : 1.0f;
    __syncthreads();

    // S (16 x 64) = Q_warp (16 x DP) K^T
#pragma unroll
    for (int nf = 0; nf < kBN / 16; ++nf) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kf = 0; kf < DP / 16; ++kf) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
        wmma::load_matrix_sync(a, Qs + warp * 16 * SM::LD + kf * 16, SM::LD);
        wmma::load_matrix_sync(bf, Ks + nf * 16 * SM::LD + kf * 16, SM::LD);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Ss + nf * 16, acc, SM::LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // online softmax on this lane's half row
    float s[32];
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int c = col0 + j;
      s[j] = c < kv_rows ? Ss[row * SM::LDS + c] * p.scale : -INFINITY;
      mx = fmaxf(mx, s[j]);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m_run, mx);  // finite: every tile has at least one valid key
    const float alpha = __expf(m_run - m_new);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float e = __expf(s[j] - m_new);  // 0 for masked columns
      sum += e;
      Ps[row * SM::LDP + col0 + j] = from_f<T>(e * Ws[col0 + j]);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    for (int d = lane & 1; d < DP; d += 2) Os[row * SM::LDO + d] *= alpha;
    __syncwarp();

    // O_warp (16 x DP) += P (16 x 64) V (64 x DP)
#pragma unroll
    for (int df = 0; df < DP / 16; ++df) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, Os + df * 16, SM::LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
        wmma::load_matrix_sync(a, Ps + kk * 16, SM::LDP);
        wmma::load_matrix_sync(bf, Vs + kk * 16 * SM::LD + df * 16, SM::LD);
        wmma::mma_sync(acc, a, bf, acc);
      }
      wmma::store_matrix_sync(Os + df * 16, acc, SM::LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  const int qrow = q0 + warp * 16 + row;
  if (qrow < p.Lq) {
    const float inv = 1.0f / l_run;
    T* og = static_cast<T*>(p.o) + ((int64_t(b) * p.H + h) * p.Lq + qrow) * p.D;
    for (int d = lane & 1; d < p.D; d += 2) og[d] = from_f<T>(Os[row * SM::LDO + d] * inv);
  }
#else
  __trap();  // tensor-core path is only launched on sm_80+
#endif
}

// Generic fallback (fp32, or head dims the WMMA path does not cover): one warp per query
// row, lane owns dims lane, lane + 32, ...; online softmax over keys.
constexpr int kSimtMaxD = 256;

template <typename T>
__global__ void __launch_bounds__(128) attn_simt_kernel(AttnParams p) {
  constexpr int kPer = kSimtMaxD / 32;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nqt = (p.Lq + 3) / 4;
  const int bh = blockIdx.x / nqt, qi = (blockIdx.x % nqt) * 4 + warp;
  if (qi >= p.Lq) return;
  const int b = bh / p.H, h = bh % p.H;
  const T* qg = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + int64_t(qi) * p.q_sl;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vg = static_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  float qv[kPer], acc[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    qv[i] = d < p.D ? to_f(qg[d]) * p.scale : 0.0f;
    acc[i] = 0.0f;
  }
  float m_run = -INFINITY, l_run = 0.0f;
  for (int j = 0; j < p.Lk; ++j) {
    const T* kr = kg + int64_t(j) * p.k_sl;
    float dot = 0.0f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      if (d < p.D) dot += qv[i] * to_f(kr[d]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    const float m_new = fmaxf(m_run, dot);
    const float alpha = __expf(m_run - m_new), e = __expf(dot - m_new);
    l_run = l_run * alpha + e;
    m_run = m_new;
    const float pw = p.w != nullptr ? e * p.w[int64_t(b) * p.Lk + j] : e;
    const T* vr = vg + int64_t(j) * p.v_sl;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int d = lane + 32 * i;
      acc[i] = acc[i] * alpha + (d < p.D ? pw * to_f(vr[d]) : 0.0f);
    }
  }
  T* og = static_cast<T*>(p.o) + ((int64_t(b) * p.H + h) * p.Lq + qi) * p.D;
  const float inv = 1.0f / l_run;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < p.D) og[d] = from_f<T>(acc[i] * inv);
  }
}

template <typename T, int DP>
void launch_attn_wmma(const AttnParams& p, cudaStream_t stream) {
  constexpr size_t bytes = AttnSmem<DP>::bytes;
  static_assert(bytes <= 160 * 1024, "attention tile does not fit shared memory");
  const auto kernel = attn_wmma_kernel<T, DP>;
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
  const int64_t nqt = (int64_t(p.Lq) + kBM - 1) / kBM;
  kernel<<<static_cast<unsigned>(nqt * p.B * p.H), kAttnThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Launches the tensor-core kernel when its tile fits the device's opt-in shared memory
// (sm_86 / sm_89 allow only ~99 KB, less than the DP = 128 / 160 tiles need); false otherwise.
template <typename T, int DP>
bool try_attn_wmma(const AttnParams& p, size_t smem_optin, cudaStream_t stream) {
  if (AttnSmem<DP>::bytes > smem_optin) return false;
  launch_attn_wmma<T, DP>(p, stream);
  return true;
}

template <typename T>
void launch_attention(const AttnParams& p, bool tensor_cores, size_t smem_optin, cudaStream_t stream) {
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores) {
      if (p.D <= 48 && try_attn_wmma<T, 48>(p, smem_optin, stream)) return;
      if (p.D > 48 && p.D <= 64 && try_attn_wmma<T, 64>(p, smem_optin, stream)) return;
      if (p.D > 64 && p.D <= 80 && try_attn_wmma<T, 80>(p, smem_optin, stream)) return;
      if (p.D > 80 && p.D <= 128 && try_attn_wmma<T, 128>(p, smem_optin, stream)) return;
      if (p.D > 128 && p.D <= 160 && try_attn_wmma<T, 160>(p, smem_optin, stream)) return;
    }
  }
  const int64_t nqt = (int64_t(p.Lq) + 3) / 4;
  attn_simt_kernel<T><<<static_cast<unsigned>(nqt * p.B * p.H), 128, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                          const std::optional<at::Tensor>& value_weights) {
  check_attention(q_in, k_in, v_in, value_weights);
  const at::cuda::OptionalCUDAGuard guard(q_in.device());
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t D = q.size(3);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  at::Tensor w;
  if (value_weights.has_value() && value_weights->defined()) w = value_weights->to(at::kFloat).contiguous();
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const bool half = q.scalar_type() != at::kFloat;
  const bool tensor_cores = half && D <= 160 && prop->major >= 8;
  // The tensor-core path falls back to the SIMT kernel where its tile does not fit shared memory.
  TORCH_CHECK(D <= kSimtMaxD, "sdfused::attention: CUDA supports head dim D <= ", kSimtMaxD, ", got D=", D);
  TORCH_CHECK(q.size(2) < (int64_t(1) << 31) && k.size(2) < (int64_t(1) << 31),
              "sdfused::attention: sequence length too large");
  // Both kernels put (B * H * query tiles) on gridDim.x (at most 2^31 - 1 blocks); SIMT tiles are 4 rows.
  TORCH_CHECK(q.size(0) * q.size(1) * ((q.size(2) + 3) / 4) < (int64_t(1) << 31),
              "sdfused::attention: B * H * Lq too large for one launch, got q shape ", q.sizes());
  AttnParams p{q.const_data_ptr(), k.const_data_ptr(), v.const_data_ptr(), out.mutable_data_ptr(),
               w.defined() ? w.const_data_ptr<float>() : nullptr,
               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2),
               static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(q.size(2)),
               static_cast<int>(k.size(2)), static_cast<int>(D), static_cast<float>(scale), false};
  bool vec_ok = D % 8 == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v);
  for (int64_t s : {p.q_sb, p.q_sh, p.q_sl, p.k_sb, p.k_sh, p.k_sl, p.v_sb, p.v_sh, p.v_sl}) vec_ok &= s % 8 == 0;
  p.vec_ok = vec_ok;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(q.scalar_type(), "attention", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    launch_attention<T>(p, tensor_cores, prop->sharedMemPerBlockOptin, stream);
  });
  return out;
}

}  // namespace
}  // namespace sdfused

TORCH_LIBRARY_IMPL(sdfused, CUDA, m) {
  m.impl("group_norm", &sdfused::group_norm_cuda);
  m.impl("attention", &sdfused::attention_cuda);
  m.impl("geglu", &sdfused::geglu_cuda);
}
