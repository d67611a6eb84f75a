// Schemas of the fused-op library `sdfused` (defined once, here).
// Backend kernels live in csrc/cpu/ops_cpu.cpp (TORCH_LIBRARY_IMPL(sdfused, CPU)) and
// csrc/cuda/ops_cuda.cu (TORCH_LIBRARY_IMPL(sdfused, CUDA)).  Fake (meta) kernels and the
// autograd formulas are registered from Python in runtime/ops.py.
#include <Python.h>
#include <torch/library.h>

// `import runtime._C` loads this shared object, which runs the static registrations below.
// The module itself is empty; setup.py builds it against the limited API.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "sdexport fused custom ops (registered as torch.ops.sdfused.*)",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(sdfused, m) {
  // GroupNorm over (N, C, *) with an optional SiLU fused after the affine transform.
  // Contiguous and channels_last inputs keep their memory format; stats in fp32.
  m.def(
      "group_norm(Tensor x, int groups, Tensor? weight, Tensor? bias, float eps, bool silu) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // softmax(q k^T * scale) (v * value_weights[:, None, :, None]); online softmax, never
  // materialises Lq x Lk.  q (B, H, Lq, D), k/v (B, H, Lk, D), value_weights (B, Lk) or None.
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? value_weights) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // x[..., :F] * gelu(x[..., F:]) with exact (erf) GELU; last dim 2F -> F.
  m.def("geglu(Tensor x) -> Tensor", {at::Tag::pt2_compliant_tag});
}
