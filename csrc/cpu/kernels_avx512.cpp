// kernels.cpp built with the avx512 flags setup.py gives this file, into its own shared object
// (see kernels.h for why not into runtime._C).
#include "kernels.cpp"

SDFUSED_KERNELS_MODULE(avx512)
