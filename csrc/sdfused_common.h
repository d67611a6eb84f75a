// Shared argument checking and layout rules for the sdfused ops (CPU and CUDA backends).
// Keep these in sync with the fake kernels in runtime/ops.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace sdfused {

// Memory layout a group_norm kernel runs on.  kChannelsFirst means (N, C, S) contiguous;
// kChannelsLast means (N, S, C) contiguous, i.e. a channels_last / channels_last_3d input.
enum class Layout { kChannelsFirst, kChannelsLast };

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// A contiguous input (also the degenerate case where it is both) runs channels-first;
// a 4-d channels_last or 5-d channels_last_3d input runs channels-last; anything else is
// made contiguous first.  The output always has the layout the kernel ran on.
inline Layout group_norm_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return Layout::kChannelsFirst;
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kChannelsLast;
  if (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d)) return Layout::kChannelsLast;
  return Layout::kChannelsFirst;
}

inline at::Tensor group_norm_output(const at::Tensor& x, Layout layout) {
  if (layout == Layout::kChannelsLast) {
    return at::empty(x.sizes(), x.options(),
                     x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d);
  }
  return at::empty(x.sizes(), x.options());
}

inline void check_affine(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "sdfused::group_norm: ", name,
              " must be a 1-d tensor of C=", x.size(1), " elements, got shape ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), "sdfused::group_norm: ", name, " is on ", t->device(),
              " but x is on ", x.device());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "sdfused::group_norm: ", name,
              " must be a floating-point tensor, got ", t->scalar_type());
}

inline void check_group_norm(const at::Tensor& x, int64_t groups, const std::optional<at::Tensor>& weight,
                             const std::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x.dim() >= 2, "sdfused::group_norm: x must have shape (N, C, *) with at least 2 dims, got shape ",
              x.sizes());
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "sdfused::group_norm: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(groups > 0, "sdfused::group_norm: groups must be positive, got ", groups);
  TORCH_CHECK(x.size(1) % groups == 0, "sdfused::group_norm: groups=", groups,
              " must divide the channel count C=", x.size(1));
  TORCH_CHECK(eps >= 0.0, "sdfused::group_norm: eps must be non-negative, got ", eps);
  check_affine(weight, "weight", x);
  check_affine(bias, "bias", x);
}

// Per-channel affine parameters as fp32 (ones / zeros when absent), on x's device.  The CPU
// kernels use this; the CUDA kernels read weight / bias in their own dtype (AffineParam).
inline at::Tensor affine_or(const std::optional<at::Tensor>& t, const at::Tensor& x, double fill) {
  if (t.has_value() && t->defined()) return t->to(at::kFloat).contiguous();
  return at::full({x.size(1)}, fill, x.options().dtype(at::kFloat));
}

inline void check_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& value_weights) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "sdfused::attention: q, k and v must be 4-d (B, H, L, D), got shapes ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "sdfused::attention: q, k and v must have the same dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(is_supported_float(q.scalar_type()),
              "sdfused::attention: q, k, v must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(),
              "sdfused::attention: q, k and v must be on the same device");
  TORCH_CHECK(k.sizes() == v.sizes(), "sdfused::attention: k and v must have the same shape (B, H, Lk, D), got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "sdfused::attention: q (B, H, Lq, D) and k (B, H, Lk, D) disagree in B, H or D: ", q.sizes(),
              " vs ", k.sizes());
  TORCH_CHECK(k.size(2) > 0, "sdfused::attention: need at least one key (Lk > 0)");
  TORCH_CHECK(q.size(3) > 0, "sdfused::attention: head dim D must be positive");
  if (value_weights.has_value() && value_weights->defined()) {
    const auto& w = *value_weights;
    TORCH_CHECK(w.dim() == 2 && w.size(0) == k.size(0) && w.size(1) == k.size(2),
                "sdfused::attention: value_weights must have shape (B, Lk) = (", k.size(0), ", ", k.size(2),
                "), got ", w.sizes());
    TORCH_CHECK(at::isFloatingType(w.scalar_type()),
                "sdfused::attention: value_weights must be floating point, got ", w.scalar_type());
    TORCH_CHECK(w.device() == q.device(), "sdfused::attention: value_weights is on ", w.device(),
                " but q is on ", q.device());
  }
}

// Makes the last dim unit-stride (the kernels take strides for the other three dims).
inline at::Tensor unit_last_stride(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

inline void check_geglu(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1, "sdfused::geglu: x must have at least 1 dim");
  TORCH_CHECK(x.size(-1) % 2 == 0, "sdfused::geglu: last dim must be even (2F), got ", x.size(-1));
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "sdfused::geglu: x must be float32, float16 or bfloat16, got ", x.scalar_type());
}

// ---- kernel parameter structs ----------------------------------------------------------
// One struct per op, shared by the CPU and CUDA backends and filled by member name by the
// make_*_params helpers below (as flash-attention fills Flash_fwd_params), never positionally.
// Plain pointers and element strides only, so the structs can be passed to CUDA kernels by value.

enum class AffineType : int8_t { kNone, kFloat, kHalf, kBFloat16 };

// A 1-d per-channel weight or bias (C,), read in its own dtype; kNone means absent (ones / zeros).
struct AffineParam {
  const void* ptr = nullptr;
  int64_t stride = 1;
  AffineType type = AffineType::kNone;
};

struct GroupNormParams {
  const void* x = nullptr;  // (N, C, S) contiguous, or (N, S, C) when layout == kChannelsLast
  void* y = nullptr;        // same shape and layout as x
  AffineParam weight, bias;
  int64_t N = 0, C = 0, S = 0;  // S: product of the spatial dims
  int64_t G = 0, Cg = 0;        // groups, channels per group
  double eps = 0.0;
  bool silu = false;
  Layout layout = Layout::kChannelsFirst;
};

struct AttnParams {
  const void* q = nullptr;  // (B, H, Lq, D), unit stride over D
  const void* k = nullptr;  // (B, H, Lk, D), unit stride over D
  const void* v = nullptr;  // (B, H, Lk, D), unit stride over D
  void* o = nullptr;        // (B, H, Lq, D) contiguous
  const float* w = nullptr;  // value weights (B, Lk) fp32 contiguous, or nullptr
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0;
  int64_t q_sb = 0, q_sh = 0, q_sl = 0;  // element strides over B, H, L
  int64_t k_sb = 0, k_sh = 0, k_sl = 0;
  int64_t v_sb = 0, v_sh = 0, v_sl = 0;
  float scale = 1.0f;
};

struct GegluParams {
  const void* x = nullptr;  // (rows, 2F) contiguous
  void* y = nullptr;        // (rows, F) contiguous
  int64_t rows = 0, F = 0;
};

inline AffineParam make_affine_param(const at::Tensor& t) {
  AffineParam a;
  if (!t.defined()) return a;
  a.ptr = t.const_data_ptr();
  a.stride = t.stride(0);
  switch (t.scalar_type()) {
    case at::kFloat: a.type = AffineType::kFloat; break;
    case at::kHalf: a.type = AffineType::kHalf; break;
    case at::kBFloat16: a.type = AffineType::kBFloat16; break;
    default: TORCH_CHECK(false, "sdfused::group_norm: affine dtype ", t.scalar_type(), " must be cast first");
  }
  return a;
}

// x: the input as the kernel reads it (contiguous, or channels_last when layout says so).
// weight / bias: undefined, or 1-d of a dtype make_affine_param accepts.
inline GroupNormParams make_group_norm_params(const at::Tensor& x, at::Tensor& y, const at::Tensor& weight,
                                              const at::Tensor& bias, int64_t groups, double eps, bool silu,
                                              Layout layout) {
  GroupNormParams p;
  p.x = x.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.weight = make_affine_param(weight);
  p.bias = make_affine_param(bias);
  p.N = x.size(0);
  p.C = x.size(1);
  p.S = p.N * p.C == 0 ? 0 : x.numel() / (p.N * p.C);
  p.G = groups;
  p.Cg = p.C / groups;
  p.eps = eps;
  p.silu = silu;
  p.layout = layout;
  return p;
}

// q, k, v with unit stride over D (unit_last_stride); out contiguous (B, H, Lq, D);
// w undefined or (B, Lk) fp32 contiguous.
inline AttnParams make_attn_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                   const at::Tensor& w, double scale) {
  AttnParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.o = out.mutable_data_ptr();
  p.w = w.defined() ? w.const_data_ptr<float>() : nullptr;
  p.B = q.size(0);
  p.H = q.size(1);
  p.Lq = q.size(2);
  p.Lk = k.size(2);
  p.D = q.size(3);
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.scale = static_cast<float>(scale);
  return p;
}

// x contiguous (*, 2F), y contiguous (*, F).
inline GegluParams make_geglu_params(const at::Tensor& x, at::Tensor& y) {
  GegluParams p;
  p.x = x.const_data_ptr();
  p.y = y.mutable_data_ptr();
  p.F = x.size(-1) / 2;
  p.rows = p.F == 0 ? 0 : y.numel() / p.F;
  return p;
}

// Calls f(T{}) with T = float, c10::Half or c10::BFloat16 (the dtypes the checks admit).
template <typename F>
inline void dispatch_float(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "sdfused::", op, ": unsupported dtype ", t);
  }
}

inline std::vector<int64_t> geglu_out_shape(const at::Tensor& x) {
  auto s = x.sizes().vec();
  s.back() /= 2;
  return s;
}

}  // namespace sdfused
