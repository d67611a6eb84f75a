// CUDA kernels of the sdfused ops (fp32 / fp16 / bf16, statistics in fp32).
//
// group_norm and geglu are our own bandwidth-bound kernels; attention runs ATen's SDPA (flash /
// memory-efficient / cuDNN, whichever it picks) on value rows pre-scaled by the emphasis weights:
// softmax(q k^T) (diag(w) v) is exactly SDPA on w-scaled v (issue #16: the tensor-core kernel
// this replaced was estimated at 0.25-0.45x of SDPA and failed for head dims above 256).
// Kernels take the params structs of csrc/sdfused_common.h by value; host wrappers at the
// bottom check (sdfused_common.h), pick a kernel and launch on the current stream.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

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

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
inline bool aligned16(const void* p) { return aligned_to(p, 16); }

inline int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// ---- group_norm ---------------------------------------------------------------------------
// Grid (N * G, splits): block (ng, split) owns one chunk of group ng, either contiguous elements
// [e0, e1) of the group's Cg * S span (channels-first) or rows [s0, s1) of its Cg channels
// (channels-last, Cg contiguous channels per row).  Statistics are shifted sums
// s1 = sum(x - k), s2 = sum((x - k)^2) with k the group's first element: the sums of different
// blocks add exactly, and fp32 terms stay O(std) even when |mean| >> std.
//   splits == 1: one launch (kFused); the block reduces, then applies (the re-read hits L1/L2).
//   splits  > 1: two launches; kStats writes (s1, s2) per block, kApply adds its group's <= 64
//                partials (L2) in a prologue, then applies.  No finalize kernel, no cast or fill
//                kernels: weight / bias are read in their own dtype (absent = ones / zeros).
// Loads and stores are VEC-element packs (16 bytes when the layout allows, down to 1 element).

enum class GnMode { kFused, kStats, kApply };
constexpr int kGnThreads = 256;
constexpr int kGnMaxSplits = 64;
constexpr int64_t kGnFusedMaxElems = 16384;  // one block per group below this (SD 8x8 / 16x16 levels)

__device__ __forceinline__ float load_affine(const AffineParam& a, int64_t c, float fill) {
  switch (a.type) {
    case AffineType::kFloat: return static_cast<const float*>(a.ptr)[c * a.stride];
    case AffineType::kHalf: return __half2float(static_cast<const __half*>(a.ptr)[c * a.stride]);
    case AffineType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(a.ptr)[c * a.stride]);
    default: return fill;
  }
}

// Block-wide sum of (a, b); every thread gets the result.
__device__ __forceinline__ float2 block_sum2(float a, float b) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
  }
  __shared__ float2 warp_sums[kGnThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    float2 t = lane < kGnThreads / 32 ? warp_sums[lane] : make_float2(0.0f, 0.0f);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      t.x += __shfl_xor_sync(0xffffffffu, t.x, off);
      t.y += __shfl_xor_sync(0xffffffffu, t.y, off);
    }
    if (lane == 0) warp_sums[0] = t;
  }
  __syncthreads();
  return warp_sums[0];
}

// Calls f(offset, cc) for every VEC pack of this block's chunk: offset = element index of the
// pack in x / y, cc = channel (within the group) of its first element.  Channels-first packs lie
// in one channel (S % VEC == 0); channels-last packs are VEC consecutive channels (Cg % VEC == 0).
template <int VEC, typename F>
__device__ __forceinline__ void gn_for_chunk(const GroupNormParams& p, int64_t base, int split, int64_t chunk,
                                             F&& f) {
  if (p.layout == Layout::kChannelsFirst) {
    const int64_t M = p.Cg * p.S;
    const int64_t e0 = split * chunk, e1 = min(M, e0 + chunk);
    const bool small = M < (int64_t(1) << 31);  // 32-bit channel division
    for (int64_t e = e0 + int64_t(threadIdx.x) * VEC; e < e1; e += int64_t(kGnThreads) * VEC) {
      const int64_t cc = small ? int64_t(uint32_t(e) / uint32_t(p.S)) : e / p.S;
      f(base + e, cc);
    }
  } else {
    // tp threads across the Pg packs of a row, R rows at a time (leftover threads idle)
    const int Pg = static_cast<int>(p.Cg / VEC);
    const int tp = min(Pg, kGnThreads), R = kGnThreads / tp;
    const int rt = threadIdx.x / tp, pt = threadIdx.x - rt * tp;
    if (rt >= R) return;
    const int64_t s0 = split * chunk, s1 = min(p.S, s0 + chunk);
    for (int64_t s = s0 + rt; s < s1; s += R)
      for (int pk = pt; pk < Pg; pk += tp) f(base + s * p.C + int64_t(pk) * VEC, int64_t(pk) * VEC);
  }
}

template <typename T, int VEC, GnMode kMode>
__global__ void __launch_bounds__(kGnThreads) gn_kernel(GroupNormParams p, float* partial, int64_t chunk, int splits) {
  const int64_t ng = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t n = ng / p.G, g = ng - n * p.G;
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.y);
  // first element of the group: (n, g * Cg, 0) channels-first, (n, 0, g * Cg) channels-last
  const int64_t base = p.layout == Layout::kChannelsLast ? n * p.S * p.C + g * p.Cg : (n * p.C + g * p.Cg) * p.S;
  const float shift = to_f(x[base]);
  const int64_t M = p.Cg * p.S;
  __shared__ float s_mean, s_rstd;

  float2 sums = make_float2(0.0f, 0.0f);
  if constexpr (kMode != GnMode::kApply) {
    float a = 0.0f, b = 0.0f;
    gn_for_chunk<VEC>(p, base, split, chunk, [&](int64_t off, int64_t) {
      const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(x + off);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = to_f(pk.v[j]) - shift;
        a += d;
        b = fmaf(d, d, b);
      }
    });
    sums = block_sum2(a, b);
    if constexpr (kMode == GnMode::kStats) {
      if (threadIdx.x == 0) reinterpret_cast<float2*>(partial)[ng * splits + split] = sums;
      return;
    }
  } else {
    if (threadIdx.x < 32) {
      float2 t = make_float2(0.0f, 0.0f);
      for (int i = threadIdx.x; i < splits; i += 32) {
        const float2 q = reinterpret_cast<const float2*>(partial)[ng * splits + i];
        t.x += q.x;
        t.y += q.y;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        t.x += __shfl_xor_sync(0xffffffffu, t.x, off);
        t.y += __shfl_xor_sync(0xffffffffu, t.y, off);
      }
      sums = t;
    }
  }
  if (threadIdx.x == 0) {
    const float inv_m = 1.0f / static_cast<float>(M);
    const float md = sums.x * inv_m;  // mean - shift
    s_mean = shift + md;
    s_rstd = rsqrtf(fmaxf(sums.y * inv_m - md * md, 0.0f) + static_cast<float>(p.eps));
  }
  __syncthreads();
  const float mean = s_mean, rstd = s_rstd;
  const int64_t c0 = g * p.Cg;
  gn_for_chunk<VEC>(p, base, split, chunk, [&](int64_t off, int64_t cc) {
    const Pack<T, VEC> in = *reinterpret_cast<const Pack<T, VEC>*>(x + off);
    Pack<T, VEC> out;
    if (p.layout == Layout::kChannelsFirst) {  // one channel per pack
      const float a = rstd * load_affine(p.weight, c0 + cc, 1.0f), b = load_affine(p.bias, c0 + cc, 0.0f);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float r = (to_f(in.v[j]) - mean) * a + b;
        out.v[j] = from_f<T>(p.silu ? silu_f(r) : r);
      }
    } else {  // VEC consecutive channels
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float a = rstd * load_affine(p.weight, c0 + cc + j, 1.0f), b = load_affine(p.bias, c0 + cc + j, 0.0f);
        const float r = (to_f(in.v[j]) - mean) * a + b;
        out.v[j] = from_f<T>(p.silu ? silu_f(r) : r);
      }
    }
    *reinterpret_cast<Pack<T, VEC>*>(y + off) = out;
  });
}

template <typename T, int VEC>
void launch_group_norm_vec(const GroupNormParams& p, const at::Tensor& x, cudaStream_t stream) {
  const int64_t NG = p.N * p.G, M = p.Cg * p.S;
  const int sms = num_sms();
  // split a group over several blocks only when the groups alone leave SMs idle
  int64_t splits = 1;
  if (M > kGnFusedMaxElems && NG < 2 * sms) {
    splits = std::min<int64_t>({(4 * sms + NG - 1) / NG, kGnMaxSplits, std::max<int64_t>(1, M / 4096)});
  }
  // channels-first chunks are elements (a multiple of VEC), channels-last chunks are rows
  const int64_t work = p.layout == Layout::kChannelsLast ? p.S : M;
  int64_t chunk = (work + splits - 1) / splits;
  if (p.layout == Layout::kChannelsFirst) chunk = (chunk + VEC - 1) / VEC * VEC;
  splits = (work + chunk - 1) / chunk;
  const dim3 grid(static_cast<unsigned>(NG), static_cast<unsigned>(splits));
  const int ns = static_cast<int>(splits);
  if (splits == 1) {
    gn_kernel<T, VEC, GnMode::kFused><<<grid, kGnThreads, 0, stream>>>(p, nullptr, chunk, ns);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor partial = at::empty({NG * splits * 2}, x.options().dtype(at::kFloat));  // (NG, splits, {s1, s2})
  float* part = partial.mutable_data_ptr<float>();
  gn_kernel<T, VEC, GnMode::kStats><<<grid, kGnThreads, 0, stream>>>(p, part, chunk, ns);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  gn_kernel<T, VEC, GnMode::kApply><<<grid, kGnThreads, 0, stream>>>(p, part, chunk, ns);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Largest pack (16 bytes down to one element) that the layout and both pointers allow.
template <typename T>
void launch_group_norm(const GroupNormParams& p, const at::Tensor& x, cudaStream_t stream) {
  constexpr int kMaxVec = 16 / sizeof(T);
  const int64_t along = p.layout == Layout::kChannelsLast ? p.Cg : p.S;  // packs must not cross it
  int vec = kMaxVec;
  while (vec > 1 && (along % vec != 0 || !aligned_to(p.x, vec * sizeof(T)) || !aligned_to(p.y, vec * sizeof(T))))
    vec /= 2;
  if constexpr (kMaxVec >= 8) {
    if (vec == 8) return launch_group_norm_vec<T, 8>(p, x, stream);
  }
  if (vec == 4) return launch_group_norm_vec<T, 4>(p, x, stream);
  if (vec == 2) return launch_group_norm_vec<T, 2>(p, x, stream);
  launch_group_norm_vec<T, 1>(p, x, stream);
}

// weight / bias as the kernels read them: absent stays absent, fp32 / fp16 / bf16 as they are,
// anything else (float64) cast to fp32.
at::Tensor affine_as_read(const std::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return is_supported_float(t->scalar_type()) ? *t : t->to(at::kFloat);
}

at::Tensor group_norm_cuda(const at::Tensor& x_in, int64_t groups, const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, double eps, bool silu) {
  check_group_norm(x_in, groups, weight, bias, eps);
  const at::cuda::OptionalCUDAGuard guard(x_in.device());
  const Layout layout = group_norm_layout(x_in);
  const at::Tensor x = layout == Layout::kChannelsFirst ? x_in.contiguous() : x_in;
  at::Tensor y = group_norm_output(x, layout);
  if (x.numel() == 0) return y;
  TORCH_CHECK(x.size(0) * groups < (int64_t(1) << 31), "sdfused::group_norm: N * groups = ", x.size(0) * groups,
              " exceeds the CUDA grid limit");
  const at::Tensor w = affine_as_read(weight), b = affine_as_read(bias);
  const GroupNormParams p = make_group_norm_params(x, y, w, b, groups, eps, silu, layout);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(x.scalar_type(), "group_norm", [&](auto tag) {
    using T = typename DevType<decltype(tag)>::type;
    launch_group_norm<T>(p, x, stream);
  });
  return y;
}

// ---- geglu --------------------------------------------------------------------------------


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
  const GegluParams p = make_geglu_params(x, y);
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
// ATen SDPA on v * w[:, None, :, None]: one elementwise pass over V (77 rows in cross-attention)
// in v's dtype, exactly the torch composite; any head dim (the VAE's mid-block has D = 512).
// The output is made contiguous (B, H, Lq, D), as the fake kernel promises: flash / efficient /
// cuDNN return a (B, Lq, H, D)-major layout, so this costs one copy of the output.

at::Tensor attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                          const std::optional<at::Tensor>& value_weights) {
  check_attention(q, k, v, value_weights);
  const at::cuda::OptionalCUDAGuard guard(q.device());
  if (q.numel() == 0) return at::empty(q.sizes(), q.options());
  at::Tensor vw = v;
  if (value_weights.has_value() && value_weights->defined()) {
    vw = v * value_weights->to(v.scalar_type()).unsqueeze(1).unsqueeze(3);  // (B, 1, Lk, 1)
  }
  return at::scaled_dot_product_attention(q, k, vw, /*attn_mask=*/std::nullopt, /*dropout_p=*/0.0,
                                          /*is_causal=*/false, /*scale=*/scale)
      .contiguous();
}

}  // namespace
}  // namespace sdfused

TORCH_LIBRARY_IMPL(sdfused, CUDA, m) {
  m.impl("group_norm", &sdfused::group_norm_cuda);
  m.impl("attention", &sdfused::attention_cuda);
  m.impl("geglu", &sdfused::geglu_cuda);
}
