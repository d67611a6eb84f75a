// Run-time choice of the CPU kernels build (kernels.h).  The first op call picks the best build
// that this CPU runs and this install ships, capped at ATen's own choice (ATEN_CPU_CAPABILITY
// lowers both alike); use_cpu_kernels switches later calls (tests and benchmarks).
#include <ATen/Version.h>  // at::get_cpu_capability
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"

#if defined(__linux__) || defined(__APPLE__)
#include <dlfcn.h>
#define SDFUSED_HAVE_DLOPEN 1
#endif

namespace sdfused {
namespace {

const CpuKernels* builtin() {
  return sdfused_cpu_kernels_builtin(sizeof(CpuKernels), sizeof(GroupNormParams), sizeof(AttnParams),
                                     sizeof(GegluParams));
}

struct Build {
  const char* name;
  const char* needs;  // for messages
  bool (*runs_here)();
};

// Lowest first.  __builtin_cpu_supports also checks that the OS saves the AVX / AVX-512 registers.
bool always() { return true; }
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
bool has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && has_avx2();
}
#else
bool has_avx2() { return false; }
bool has_avx512() { return false; }
#endif

const Build kBuilds[] = {
    {"default", "", &always},
    {"avx2", "AVX2, FMA and F16C", &has_avx2},
    {"avx512", "AVX-512 F/BW/VL/DQ", &has_avx512},
};

std::string known_names() {
  std::string s;
  for (const Build& b : kBuilds) s += std::string(s.empty() ? "" : ", ") + b.name;
  return s;
}

// The directory of this shared object (runtime/), where setup.py puts the SIMD builds.
std::filesystem::path own_dir() {
#if defined(SDFUSED_HAVE_DLOPEN)
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&builtin), &info) != 0 && info.dli_fname != nullptr)
    return std::filesystem::path(info.dli_fname).parent_path();
#endif
  return {};
}

// Files _sdfused_cpu_<name>.*.so beside this library, sorted.
std::vector<std::filesystem::path> build_files(const std::string& name) {
  std::vector<std::filesystem::path> found;
  const std::filesystem::path dir = own_dir();
  std::error_code ec;
  if (dir.empty() || !std::filesystem::is_directory(dir, ec)) return found;
  const std::string prefix = "_sdfused_cpu_" + name + ".";
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string f = entry.path().filename().string();
    if (f.rfind(prefix, 0) == 0 && f.size() > 3 && f.compare(f.size() - 3, 3, ".so") == 0) found.push_back(entry.path());
  }
  std::sort(found.begin(), found.end());
  return found;
}

std::mutex g_mu;                               // guards g_loaded and the first choice
std::map<std::string, const CpuKernels*> g_loaded;  // builds loaded so far
std::atomic<const CpuKernels*> g_active{nullptr};

// The named build's table, loading its shared object once; nullptr with `why` set when it cannot.
// Caller holds g_mu and has checked that the CPU runs it.
const CpuKernels* load_build(const std::string& name, std::string& why) {
  if (name == "default") return builtin();
  if (auto it = g_loaded.find(name); it != g_loaded.end()) return it->second;
#if defined(SDFUSED_HAVE_DLOPEN)
  const auto files = build_files(name);
  if (files.empty()) {
    why = "this install has no " + name + " build (no _sdfused_cpu_" + name + ".*.so beside runtime._C)";
    return nullptr;
  }
  for (const auto& path : files) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      const char* err = dlerror();
      why = "cannot load " + path.string() + ": " + (err ? err : "unknown error");
      continue;
    }
    auto entry = reinterpret_cast<CpuKernelsEntry>(dlsym(handle, SDFUSED_CPU_KERNELS_ENTRY));
    const CpuKernels* k = entry == nullptr ? nullptr
                                           : entry(sizeof(CpuKernels), sizeof(GroupNormParams), sizeof(AttnParams),
                                                   sizeof(GegluParams));
    if (k == nullptr) {
      why = path.string() + " does not match this runtime._C (a stale build: rebuild the op library)";
      dlclose(handle);
      continue;
    }
    g_loaded[name] = k;  // the handle stays open for the life of the process
    return k;
  }
  return nullptr;
#else
  why = "run-time loading of kernel builds is not supported on this platform";
  return nullptr;
#endif
}

// ATen's capability as an index into kBuilds ("AVX512" -> 2, "AVX2" -> 1, anything else -> 0).
size_t aten_rank() {
  const std::string cap = at::get_cpu_capability();
  if (cap.rfind("AVX512", 0) == 0) return 2;
  if (cap.rfind("AVX2", 0) == 0) return 1;
  return 0;
}

const CpuKernels* choose() {
  for (size_t i = std::min(aten_rank(), std::size(kBuilds) - 1); i > 0; --i) {
    const Build& b = kBuilds[i];
    if (!b.runs_here()) continue;
    std::string why;
    if (const CpuKernels* k = load_build(b.name, why)) return k;
    // a build that is there but will not load is worth a word; a build left out on purpose is not
    if (!build_files(b.name).empty()) TORCH_WARN("sdfused: ", why, "; using slower CPU kernels");
  }
  return builtin();
}

}  // namespace

const CpuKernels& cpu_kernels() {
  const CpuKernels* k = g_active.load(std::memory_order_acquire);
  if (k != nullptr) return *k;
  std::lock_guard<std::mutex> lock(g_mu);
  k = g_active.load(std::memory_order_relaxed);
  if (k == nullptr) {
    k = choose();
    g_active.store(k, std::memory_order_release);
  }
  return *k;
}

std::vector<std::string> cpu_kernel_capabilities() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::vector<std::string> names;
  for (const Build& b : kBuilds) {
    std::string why;
    if (b.runs_here() && load_build(b.name, why) != nullptr) names.emplace_back(b.name);
  }
  return names;
}

std::string use_cpu_kernels(const std::string& capability) {
  const Build* build = nullptr;
  for (const Build& b : kBuilds)
    if (capability == b.name) build = &b;
  if (build == nullptr) return "unknown CPU kernels '" + capability + "': choose one of " + known_names();
  if (!build->runs_here()) return "this CPU cannot run the " + capability + " kernels (they need " + build->needs + ")";
  std::lock_guard<std::mutex> lock(g_mu);
  std::string why;
  const CpuKernels* k = load_build(capability, why);
  if (k == nullptr) return why;
  g_active.store(k, std::memory_order_release);
  return "";
}

}  // namespace sdfused
