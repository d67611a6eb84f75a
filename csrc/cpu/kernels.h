// The CPU kernels of the sdfused ops, compiled once per instruction set from csrc/cpu/kernels.cpp
// and chosen at run time (csrc/cpu/dispatch.cpp), as ATen does:
//   default  portable baseline, linked into runtime._C itself (any x86-64 / other CPU)
//   avx2     AVX2 + FMA + F16C, 8 fp32 lanes        runtime/_sdfused_cpu_avx2*.so
//   avx512   AVX-512 F/BW/VL/DQ, 16 fp32 lanes      runtime/_sdfused_cpu_avx512*.so
// The SIMD builds are separate shared objects, not extra objects in runtime._C: inline functions
// of the torch headers compiled with AVX-512 flags would otherwise be merged by the linker with the
// baseline copies (one COMDAT copy kept), and an AVX2-only CPU could end up running AVX-512 code.
#pragma once

#include <string>
#include <vector>

#include "../sdfused_common.h"

namespace sdfused {

// One build's kernels; dtype is x's (q's) dtype, one the checks admit.
struct CpuKernels {
  const char* capability;  // "default", "avx2", "avx512"
  void (*group_norm)(const GroupNormParams& p, at::ScalarType dtype);
  void (*attention)(const AttnParams& p, at::ScalarType dtype);
  void (*geglu)(const GegluParams& p, at::ScalarType dtype);
};

// The entry point each build exports (the name carries the table's version).  It returns nullptr
// when the caller's struct sizes differ from the build's (a stale shared object from another build).
#define SDFUSED_CPU_KERNELS_ENTRY "sdfused_cpu_kernels_v1"
using CpuKernelsEntry = const CpuKernels* (*)(size_t table, size_t gn, size_t attn, size_t geglu);
extern "C" const CpuKernels* sdfused_cpu_kernels_builtin(size_t table, size_t gn, size_t attn, size_t geglu);

// The kernels the ops run: on first use the best build this CPU runs, capped at ATen's choice
// (so ATEN_CPU_CAPABILITY=default / avx2 lowers both alike).
const CpuKernels& cpu_kernels();

// Capabilities this CPU supports and this build ships, lowest first.
std::vector<std::string> cpu_kernel_capabilities();

// Switches every later call to the named build; returns "" on success, else why not (state unchanged).
std::string use_cpu_kernels(const std::string& capability);

}  // namespace sdfused
