// The ORT ops' launches of the AOT-compiled Triton kernels (aot_launch.h): the grouped-GEMM MoE (prefill and batched
// decode), the segment-parallel selective scan and the prefill causal conv, the kernels torch-fast runs. Each returns true when it ran, false
// when no kernel is registered for the key and size (the caller then runs its hand-written CUDA kernel).
#pragma once

#include "ops_cuda_glue.h"

namespace mambadeploy_ort_cuda {

struct AotMoEArgs {
  const void *x, *w1, *w2;  // (T, d), (E, 2F, d), (E, d, F) in the model dtype
  const void* experts;      // (T, k) int64 (TopKExpertGather) or int32 (RoutedMoE's router)
  bool experts_int64;
  const float* weights;  // (T, k)
  void* y;               // (T, d)
  int64_t T, d, E, F, k, activation;
};
bool AotGroupedMoE(Ort::KernelContext& ctx, int device, DType t, const AotMoEArgs& a, void* stream, const char* op);

struct AotScanArgs {
  const void *u, *delta, *B, *C, *D, *z, *delta_bias;  // D, z, delta_bias may be null (left out)
  const float *A, *initial_state;                      // initial_state may be null
  void* y;
  float* last_state;
  int64_t batch, dim, L, N;
  bool softplus;
};
bool AotSelectiveScan(Ort::KernelContext& ctx, int device, DType t, const AotScanArgs& a, void* stream);

bool AotCausalConv1d(DType t, const mambadeploy_cuda::ConvArgs& a, void* stream);

struct AotAttentionArgs {
  const void *q, *k, *v;  // (B, H, hd), (B, KV, hd) x 2 in the model dtype
  const int64_t* pos;     // (B,)
  void *out, *present_key, *present_value;  // (B, H, hd); the caches (B, KV, S, hd), written at slot pos in place
  int64_t B, H, KV, S, hd;
  float scale;
};
// DecodeAttention: the slot write, torch-fast's split-K kernel over [0, pos] and its combine (three launches).
bool AotDecodeAttention(Ort::KernelContext& ctx, int device, DType t, const AotAttentionArgs& a, void* stream);

const char* DtypeName(DType t);  // "fp32" | "fp16" | "bf16", as aot_table.py names them

}  // namespace mambadeploy_ort_cuda
