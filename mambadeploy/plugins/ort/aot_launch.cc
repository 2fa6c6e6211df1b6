// The AOT kernel table (see aot_launch.h) and its C entry points, which aot_table.py calls through ctypes on the same
// library ORT loaded (dlopen of one path gives one copy of these globals). The CUDA driver API is reached through
// dlopen("libcuda.so.1"), so the library links no libcuda and still loads on a machine without a driver (CPU sessions).
#include "aot_launch.h"

#include <cuda.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>

namespace mambadeploy_aot {

struct Kernel {
  std::string image;  // cubin
  std::string name;
  int threads = 128;
  int shared = 0;
  int n_params = 0;  // the entry's parameter count, implicit ones included
  int64_t lo = 0, hi = 0;
  std::map<std::string, int64_t> meta;
  std::map<CUcontext, std::pair<CUmodule, CUfunction>> loaded;  // per context, loaded on first use
};

namespace {

struct Driver {
  CUresult (*module_load_data)(CUmodule*, const void*) = nullptr;
  CUresult (*module_get_function)(CUfunction*, CUmodule, const char*) = nullptr;
  CUresult (*func_set_attribute)(CUfunction, CUfunction_attribute, int) = nullptr;
  CUresult (*launch_kernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                            void**, void**) = nullptr;
  CUresult (*ctx_get_current)(CUcontext*) = nullptr;
  CUresult (*get_error_string)(CUresult, const char**) = nullptr;
  std::string error;  // why the driver could not be reached
};

const Driver& driver() {
  static const Driver d = [] {
    Driver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      d.error = std::string("cannot load libcuda.so.1: ") + dlerror();
      return d;
    }
    auto sym = [&](const char* name) {
      void* p = dlsym(lib, name);
      if (!p && d.error.empty()) d.error = std::string("libcuda.so.1 has no ") + name;
      return p;
    };
    d.module_load_data = reinterpret_cast<decltype(d.module_load_data)>(sym("cuModuleLoadData"));
    d.module_get_function = reinterpret_cast<decltype(d.module_get_function)>(sym("cuModuleGetFunction"));
    d.func_set_attribute = reinterpret_cast<decltype(d.func_set_attribute)>(sym("cuFuncSetAttribute"));
    d.launch_kernel = reinterpret_cast<decltype(d.launch_kernel)>(sym("cuLaunchKernel"));
    d.ctx_get_current = reinterpret_cast<decltype(d.ctx_get_current)>(sym("cuCtxGetCurrent"));
    d.get_error_string = reinterpret_cast<decltype(d.get_error_string)>(sym("cuGetErrorString"));
    return d;
  }();
  return d;
}

std::mutex g_mutex;
std::map<std::string, std::vector<std::unique_ptr<Kernel>>> g_table;
std::atomic<bool> g_enabled{true};
std::atomic<int64_t> g_launches{0}, g_fallbacks{0};
thread_local std::string g_error;

const char* fail(const std::string& what, CUresult r) {
  const char* s = nullptr;
  if (driver().get_error_string) driver().get_error_string(r, &s);
  g_error = what + ": " + (s ? s : "CUDA driver error " + std::to_string(int(r)));
  return g_error.c_str();
}

// The kernel's function in the current context (loaded on first use there). Called with g_mutex held.
const char* function_in_current_context(Kernel& k, CUfunction* fn) {
  const Driver& d = driver();
  if (!d.error.empty()) return (g_error = d.error).c_str();
  CUcontext ctx = nullptr;
  CUresult r = d.ctx_get_current(&ctx);
  if (r != CUDA_SUCCESS || !ctx) return fail("no current CUDA context for AOT kernel " + k.name, r);
  auto it = k.loaded.find(ctx);
  if (it == k.loaded.end()) {
    CUmodule mod = nullptr;
    CUfunction f = nullptr;
    if ((r = d.module_load_data(&mod, k.image.data())) != CUDA_SUCCESS) return fail("loading " + k.name, r);
    if ((r = d.module_get_function(&f, mod, k.name.c_str())) != CUDA_SUCCESS) return fail("finding " + k.name, r);
    if (k.shared > 48 * 1024 &&  // above the default limit a function must opt in to its dynamic shared memory
        (r = d.func_set_attribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, k.shared)) != CUDA_SUCCESS)
      return fail("shared memory for " + k.name, r);
    it = k.loaded.emplace(ctx, std::make_pair(mod, f)).first;
  }
  *fn = it->second.second;
  return nullptr;
}

}  // namespace

std::string Key(const char* role, const char* dtype, Dims dims) {
  std::sort(dims.begin(), dims.end());
  std::string key = std::string(role) + "|" + dtype + "|";
  for (size_t i = 0; i < dims.size(); ++i) key += (i ? "," : "") + dims[i].first + "=" + std::to_string(dims[i].second);
  return key;
}

const Kernel* Find(const std::string& key, int64_t size) {
  if (!g_enabled.load()) return nullptr;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_table.find(key);
  if (it == g_table.end()) return nullptr;
  for (const auto& k : it->second)
    if (size >= k->lo && size <= k->hi) return k.get();
  return nullptr;
}

int64_t Meta(const Kernel* k, const char* name) {
  auto it = k->meta.find(name);
  if (it == k->meta.end()) throw std::runtime_error("AOT kernel " + k->name + " has no launch value " + name);
  return it->second;
}

const char* Launch(const Kernel* kc, unsigned gx, unsigned gy, unsigned gz, std::vector<void*> args, void* stream) {
  static void* null_ptr = nullptr;
  Kernel& k = const_cast<Kernel&>(*kc);
  if (int(args.size()) > k.n_params) return (g_error = k.name + ": more arguments than parameters").c_str();
  while (int(args.size()) < k.n_params) args.push_back(&null_ptr);  // Triton's scratch pointers: unused (checked)
  CUfunction fn = nullptr;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (const char* e = function_in_current_context(k, &fn)) return e;
  }
  if (gx == 0 || gy == 0 || gz == 0) return nullptr;
  CUresult r = driver().launch_kernel(fn, gx, gy, gz, unsigned(k.threads), 1, 1, unsigned(k.shared),
                                      static_cast<CUstream>(stream), args.data(), nullptr);
  if (r != CUDA_SUCCESS) return fail("launching " + k.name, r);
  g_launches.fetch_add(1);
  return nullptr;
}

void CountFallback() {
  if (g_enabled.load()) g_fallbacks.fetch_add(1);
}

}  // namespace mambadeploy_aot

// ---- C entry points (ctypes) ----------------------------------------------------------------------------------------
#define MAMBADEPLOY_EXPORT extern "C" __attribute__((visibility("default")))

// Add one variant. Returns 0, or -1 with the reason in mambadeploy_aot_error(). The image is copied; when a CUDA
// context is current on the calling thread the module is loaded at once (so that no load happens inside a capture).
MAMBADEPLOY_EXPORT int mambadeploy_aot_register(const char* key, const char* image, int64_t image_size,
                                                const char* name, int threads, int shared, int n_params, int64_t lo,
                                                int64_t hi, int n_meta, const char** meta_names,
                                                const int64_t* meta_values) {
  using namespace mambadeploy_aot;
  auto k = std::make_unique<Kernel>();
  k->image.assign(image, size_t(image_size));
  k->name = name, k->threads = threads, k->shared = shared, k->n_params = n_params, k->lo = lo, k->hi = hi;
  for (int i = 0; i < n_meta; ++i) k->meta[meta_names[i]] = meta_values[i];
  std::lock_guard<std::mutex> lock(g_mutex);
  CUcontext ctx = nullptr;
  if (driver().error.empty() && driver().ctx_get_current(&ctx) == CUDA_SUCCESS && ctx) {
    CUfunction fn = nullptr;
    if (function_in_current_context(*k, &fn)) return -1;
  }
  auto& variants = g_table[key];
  variants.erase(std::remove_if(variants.begin(), variants.end(),
                                [&](const std::unique_ptr<Kernel>& v) { return v->lo == lo && v->hi == hi; }),
                 variants.end());
  variants.push_back(std::move(k));
  return 0;
}

MAMBADEPLOY_EXPORT const char* mambadeploy_aot_error() { return mambadeploy_aot::g_error.c_str(); }

MAMBADEPLOY_EXPORT void mambadeploy_aot_enable(int on) { mambadeploy_aot::g_enabled.store(on != 0); }

// Registered variants; AOT launches and fallbacks (an op's hand-written kernel while AOT was on) since the last reset.
MAMBADEPLOY_EXPORT void mambadeploy_aot_stats(int64_t* variants, int64_t* launches, int64_t* fallbacks, int reset) {
  using namespace mambadeploy_aot;
  std::lock_guard<std::mutex> lock(g_mutex);
  int64_t n = 0;
  for (const auto& kv : g_table) n += int64_t(kv.second.size());
  *variants = n;
  *launches = reset ? g_launches.exchange(0) : g_launches.load();
  *fallbacks = reset ? g_fallbacks.exchange(0) : g_fallbacks.load();
}

// The key aot_launch.cc builds from (role, dtype, dims): lets the tests hold it to aot_table.kernel_key.
MAMBADEPLOY_EXPORT int mambadeploy_aot_key(const char* role, const char* dtype, int n, const char** names,
                                           const int64_t* values, char* out, int out_size) {
  mambadeploy_aot::Dims dims;
  for (int i = 0; i < n; ++i) dims.emplace_back(names[i], values[i]);
  const std::string key = mambadeploy_aot::Key(role, dtype, dims);
  if (int(key.size()) + 1 > out_size) return -1;
  std::copy(key.begin(), key.end(), out);
  out[key.size()] = 0;
  return int(key.size());
}
