// The library's entry point: SessionOptions.register_custom_ops_library calls RegisterCustomOps, which adds one
// "mambadeploy" domain holding the CPU kernels and, in the CUDA build (MAMBADEPLOY_WITH_CUDA), the CUDA kernels of the
// same ops — one domain, so ORT picks per node the kernel of the provider the node is assigned to.
#include <mutex>
#include <vector>

#include "ops.h"

namespace {
std::mutex g_mutex;
std::vector<Ort::CustomOpDomain> g_domains;  // kept alive for the life of the process (sessions hold raw pointers)
}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                         const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  try {
    Ort::CustomOpDomain domain{"mambadeploy"};
    mambadeploy_ort::AddCpuOps(domain);
    mambadeploy_ort::AddCpuDecodeOps(domain);
#ifdef MAMBADEPLOY_WITH_CUDA
    mambadeploy_ort::AddCudaOps(domain);
    mambadeploy_ort::AddCudaDecodeOps(domain);
#endif
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(g_mutex);
    g_domains.push_back(std::move(domain));
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
