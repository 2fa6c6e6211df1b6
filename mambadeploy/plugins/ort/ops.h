// Shared declarations of the mambadeploy ORT custom-op library: the ORT C++ API (initialised by register.cc from the
// OrtApiBase ORT hands over) and the functions that add each build's kernels to the "mambadeploy" domain.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>

namespace mambadeploy_ort {
void AddCpuOps(Ort::CustomOpDomain& domain);   // ops_cpu.cc: fp32 CPU kernels
void AddCudaOps(Ort::CustomOpDomain& domain);  // ops_cuda.cc: fp32/fp16/bf16 CUDA kernels (CUDA build only)
}  // namespace mambadeploy_ort

namespace mambadeploy_ort {
// An int attribute, or `fallback` (the registry default) when the node leaves it out.
inline int64_t AttrOr(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<int64_t>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

inline void Require(bool ok, const std::string& what) {
  if (!ok) ORT_CXX_API_THROW(std::string(what), ORT_INVALID_ARGUMENT);
}
}  // namespace mambadeploy_ort
