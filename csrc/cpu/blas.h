// Single-threaded fp32 GEMM for the attention kernel's per-task blocks.  Included only by
// kernels.cpp (one copy per instruction-set build).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace sdfused {
namespace {  // each including build keeps its own copy (kernels.h)
// The BLAS torch links (MKL / OpenBLAS export the Fortran symbol, 32-bit ints as in
// ATen/native/CPUBlas.cpp).  Weak: when absent, gemm_rm falls back to at::mm.
#if defined(__GNUC__) && !defined(_WIN32)
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
inline bool have_sgemm() { return sgemm_ != nullptr; }
// Our tasks' GEMMs are small and must run on the calling thread: MKL would otherwise thread
// each of them (torch turns MKL's dynamic threading off), oversubscribing the cores inside a
// parallel_for and slowing the serial case.  MKL's C API (by value); absent for other BLAS.
extern "C" int MKL_Set_Num_Threads_Local(int nt) __attribute__((weak));
// Single-threaded MKL on this thread while alive (restores the previous local setting).
struct SerialBlasGuard {
  int prev = -1;
  SerialBlasGuard() {
    if (MKL_Set_Num_Threads_Local != nullptr) prev = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlasGuard() {
    if (prev >= 0) MKL_Set_Num_Threads_Local(prev);
  }
};
#else
struct SerialBlasGuard {};
inline bool have_sgemm() { return false; }
#endif

// C (M, N) = A (M, K) . op(B) (+ C when accumulate), all row-major fp32 with leading dims;
// op(B) = B for B (K, N), or B^T for B (N, K) when trans_b.
inline void gemm_rm(bool trans_b, int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
#if defined(__GNUC__) && !defined(_WIN32)
  if (have_sgemm()) {
    // column-major view: C^T (N, M) = op(B)^T (N, K) . A^T (K, M)
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    sgemm_(trans_b ? "T" : "N", "N", &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
#endif
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  const at::Tensor b = trans_b ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, opts).t()
                               : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

}  // namespace
}  // namespace sdfused
