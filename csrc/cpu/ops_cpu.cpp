// CPU entry points of the sdfused ops: argument checks, output allocation and the params structs;
// the arithmetic is in the kernels build cpu_kernels() chose for this CPU (kernels.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "kernels.h"

namespace sdfused {
namespace {

at::Tensor group_norm_cpu(const at::Tensor& x_in, int64_t groups, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& bias, double eps, bool silu) {
  check_group_norm(x_in, groups, weight, bias, eps);
  const Layout layout = group_norm_layout(x_in);
  const at::Tensor x = layout == Layout::kChannelsFirst ? x_in.contiguous() : x_in;
  at::Tensor y = group_norm_output(x, layout);
  if (x.numel() == 0) return y;
  // fp32 affine parameters (ones / zeros when absent): the kernels index them as float
  const at::Tensor w = affine_or(weight, x, 1.0), b = affine_or(bias, x, 0.0);
  const GroupNormParams p = make_group_norm_params(x, y, w, b, groups, eps, silu, layout);
  cpu_kernels().group_norm(p, x.scalar_type());
  return y;
}

at::Tensor attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
                         const std::optional<at::Tensor>& value_weights) {
  check_attention(q_in, k_in, v_in, value_weights);
  const at::Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  at::Tensor w;
  if (value_weights.has_value() && value_weights->defined()) w = value_weights->to(at::kFloat).contiguous();
  const AttnParams p = make_attn_params(q, k, v, out, w, scale);
  cpu_kernels().attention(p, q.scalar_type());
  return out;
}

at::Tensor geglu_cpu(const at::Tensor& x_in) {
  check_geglu(x_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(geglu_out_shape(x), x.options());
  if (y.numel() == 0) return y;
  const GegluParams p = make_geglu_params(x, y);
  cpu_kernels().geglu(p, x.scalar_type());
  return y;
}

}  // namespace
}  // namespace sdfused

TORCH_LIBRARY_IMPL(sdfused, CPU, m) {
  m.impl("group_norm", &sdfused::group_norm_cpu);
  m.impl("attention", &sdfused::attention_cpu);
  m.impl("geglu", &sdfused::geglu_cpu);
}
