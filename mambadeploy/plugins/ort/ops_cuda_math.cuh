// Device helpers shared by the CUDA kernel files: dtype conversions and the activations, the math of
// models/ref_ops.py (fp32 inside). Internal to each file that includes it (an anonymous namespace).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace mambadeploy_cuda {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float softplus(float x) {
  return x > 20.f ? x : (x < -15.f ? expf(x) : log1pf(expf(x)));
}
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }
__device__ __forceinline__ float activate(float x, int code) {
  if (code == 0) return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
  if (code == 1) return silu(x);
  const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  return 0.5f * x * (1.f + tanhf(inner));
}

const char* last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Run the launcher for the op's dtype on `stream`; returns nullptr or the CUDA error message.
template <typename Args, void (*F32)(const Args&, cudaStream_t), void (*F16)(const Args&, cudaStream_t),
          void (*BF16)(const Args&, cudaStream_t)>
const char* dispatch(DType t, const Args& a, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (t == DType::kFloat32) F32(a, s);
  else if (t == DType::kFloat16) F16(a, s);
  else BF16(a, s);
  return last_error();
}

}  // namespace
}  // namespace mambadeploy_cuda
