// Schemas of the fused-op library `sdfused` (defined once, here).
// Backend kernels live in csrc/cpu/ops_cpu.cpp (TORCH_LIBRARY_IMPL(sdfused, CPU), arithmetic in
// kernels.cpp) and csrc/cuda/ops_cuda.cu (TORCH_LIBRARY_IMPL(sdfused, CUDA)).  Fake (meta) kernels and the
// autograd formulas are registered from Python in runtime/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu/kernels.h"

// `import runtime._C` loads this shared object, which runs the static registrations below.  The
// module's functions report and switch the CPU kernels build (csrc/cpu/kernels.h); setup.py builds
// it against the limited API.
namespace {

PyObject* py_cpu_kernels(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sdfused::cpu_kernels().capability);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_cpu_kernel_capabilities(PyObject*, PyObject*) {
  try {
    const auto names = sdfused::cpu_kernel_capabilities();
    PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(names.size()));
    if (out == nullptr) return nullptr;
    for (size_t i = 0; i < names.size(); ++i) {
      PyObject* s = PyUnicode_FromString(names[i].c_str());
      if (s == nullptr) {
        Py_DECREF(out);
        return nullptr;
      }
      PyTuple_SetItem(out, static_cast<Py_ssize_t>(i), s);  // steals s
    }
    return out;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* py_use_cpu_kernels(PyObject*, PyObject* arg) {
  if (!PyUnicode_Check(arg)) {
    PyErr_SetString(PyExc_TypeError, "use_cpu_kernels: the capability must be a str");
    return nullptr;
  }
  Py_ssize_t n = 0;
  const char* name = PyUnicode_AsUTF8AndSize(arg, &n);
  if (name == nullptr) return nullptr;
  try {
    const std::string why = sdfused::use_cpu_kernels(std::string(name, static_cast<size_t>(n)));
    if (!why.empty()) {
      PyErr_SetString(PyExc_ValueError, why.c_str());
      return nullptr;
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyMethodDef kMethods[] = {
    {"cpu_kernels", py_cpu_kernels, METH_NOARGS, "The CPU kernels build the ops run: default, avx2 or avx512."},
    {"cpu_kernel_capabilities", py_cpu_kernel_capabilities, METH_NOARGS,
     "The CPU kernels builds this CPU runs and this install ships, lowest first."},
    {"use_cpu_kernels", py_use_cpu_kernels, METH_O, "Run later CPU op calls on the named kernels build."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "sdexport fused custom ops (registered as torch.ops.sdfused.*)",
      -1,
      kMethods,
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
