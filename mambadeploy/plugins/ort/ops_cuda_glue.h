// ORT-side helpers shared by the CUDA glue files (ops_cuda.cc, ops_cuda_decode.cc): the dtype of a kernel
// instantiation, device inputs (an omitted optional input is a null pointer), launch-error reporting, and workspace
// from the CUDA provider's allocator.
#pragma once

#include <string>
#include <vector>

#include "ops.h"
#include "ops_cuda_kernels.h"

namespace mambadeploy_ort_cuda {

using mambadeploy_cuda::DType;
using mambadeploy_ort::Require;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr ONNXTensorElementDataType kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr ONNXTensorElementDataType kBF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
constexpr const char* kCudaProvider = "CUDAExecutionProvider";

template <ONNXTensorElementDataType TT>
constexpr DType dtype_of() {
  return TT == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT     ? DType::kFloat32
         : TT == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16
                                                       : DType::kBFloat16;
}

// The same, for a dtype known at run time (RegistryOp hands its kernels the op object's activation dtype).
inline DType dtype_of(ONNXTensorElementDataType tt) {
  return tt == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT     ? DType::kFloat32
         : tt == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? DType::kFloat16
                                                       : DType::kBFloat16;
}

struct In {
  const void* data = nullptr;  // device pointer; nullptr: optional input left out
  std::vector<int64_t> shape;
};

inline In input(Ort::KernelContext& ctx, size_t i) {
  In in;
  if (i >= ctx.GetInputCount()) return in;
  Ort::ConstValue v = ctx.GetInput(i);
  if (!static_cast<const OrtValue*>(v)) return in;
  in.shape = v.GetTensorTypeAndShapeInfo().GetShape();
  in.data = v.GetTensorRawData();
  return in;
}

inline void check_launch(const char* error, const char* op) {
  if (error) ORT_CXX_API_THROW(std::string(op) + ": CUDA kernel launch failed: " + error, ORT_RUNTIME_EXCEPTION);
}

// A device buffer from the CUDA EP's allocator, returned to it when the kernel's Compute ends. Work queued on the
// EP's one compute stream before the return runs before any later user of the memory.
struct DeviceScratch {
  OrtAllocator* allocator = nullptr;
  void* ptr = nullptr;
  DeviceScratch(Ort::KernelContext& ctx, int device_id, size_t bytes, const std::string& op) {
    Ort::MemoryInfo info("Cuda", OrtArenaAllocator, device_id, OrtMemTypeDefault);
    allocator = ctx.GetAllocator(*static_cast<const OrtMemoryInfo*>(info));
    Require(allocator != nullptr, op + ": the CUDA provider gave no allocator for the workspace");
    ptr = allocator->Alloc(allocator, bytes);
    Require(ptr != nullptr || bytes == 0, op + ": out of device memory for the workspace");
  }
  ~DeviceScratch() {
    if (allocator) {
      if (ptr) allocator->Free(allocator, ptr);
      Ort::GetApi().ReleaseAllocator(allocator);
    }
  }
};

}  // namespace mambadeploy_ort_cuda
