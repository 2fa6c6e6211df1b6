// CUDA kernels behind the ORT custom ops (ops_cuda_kernels.cu), called from the ORT glue (ops_cuda.cc). Plain C++ on
// this side (no CUDA or ORT types), so the glue compiles with the host compiler alone. Every tensor is contiguous in
// the layout of the op docstrings (models/ref_ops.py). Launchers return nullptr or a CUDA error message.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mambadeploy_cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };  // the op's activation dtype T

// SelectiveScan: u, delta, z, y (b, dim, L) in T; A (dim, N) fp32; B, C (b, N, L) in T; D, delta_bias (dim) in T;
// initial_state, last_state (b, dim, N) fp32. D, z, delta_bias, initial_state may be null (left out).
struct ScanArgs {
  const void *u, *delta;
  const float* A;
  const void *B, *C, *D, *z, *delta_bias;
  const float* initial_state;
  void* y;
  float* last_state;
  int64_t batch, dim, L, N;
  bool softplus;
};
constexpr int64_t kScanMaxState = 64;  // N above this is refused by the glue
const char* LaunchSelectiveScan(DType t, const ScanArgs& a, void* stream);

// CausalConv1d: x, y (b, dim, L) in T; weight (dim, K), bias (dim) in T; initial_state, final_state (b, dim, K) fp32.
struct ConvArgs {
  const void *x, *weight, *bias;
  const float* initial_state;
  void* y;
  float* final_state;
  int64_t batch, dim, L, K;
  bool silu;
};
const char* LaunchCausalConv1d(DType t, const ConvArgs& a, void* stream);

// TopKExpertGather: x, y (T, d) in T; w1 (E, 2F, d), w2 (E, d, F) in T; experts (T, k) int64; weights (T, k) fp32.
// Needs a device workspace of GatherWorkspaceBytes(...) bytes.
struct GatherArgs {
  const void *x, *w1, *w2;
  const int64_t* experts;
  const float* weights;
  void* y;
  int64_t tokens, d, E, F, k;
  int activation;  // 0 exact GELU, 1 SiLU, 2 tanh GELU (opset.ACTIVATION_CODES)
  void* workspace;
};
size_t GatherWorkspaceBytes(DType t, int64_t tokens, int64_t d, int64_t E, int64_t F, int64_t k);
const char* LaunchExpertGather(DType t, const GatherArgs& a, void* stream);

// --- the decode step's ops (ops_cuda_decode_kernels.cu); parameters in T, states fp32 ----------------------------------
// CausalConv1dUpdate: x, y (b, dim) in T; conv_state, new_state (b, dim, K) fp32; weight (dim, K), bias (dim) in T.
struct ConvUpdateArgs {
  const void* x;
  const float* conv_state;
  const void *weight, *bias;  // bias may be null
  void* y;
  float* new_state;
  int64_t batch, dim, K;
  bool silu;
};
const char* LaunchConvUpdate(DType t, const ConvUpdateArgs& a, void* stream);

// SelectiveStateUpdate: state, new_state (b, dim, N) fp32; x, dt, z, y (b, dim) in T; A (dim, N) fp32; B, C (b, N) in
// T; D, dt_bias (dim) in T. D, z, dt_bias may be null.
struct StateUpdateArgs {
  const float* state;
  const void *x, *dt;
  const float* A;
  const void *B, *C, *D, *z, *dt_bias;
  void* y;
  float* new_state;
  int64_t batch, dim, N;
  bool softplus;
};
const char* LaunchStateUpdate(DType t, const StateUpdateArgs& a, void* stream);

// AddRMSNorm: x, y (rows, d) in T; residual, residual_out (rows, d) fp32; weight (d) in T.
struct AddNormArgs {
  const void* x;
  const float* residual;
  const void* weight;
  void* y;
  float* residual_out;
  int64_t rows, d;
  float eps;
};
const char* LaunchAddRMSNorm(DType t, const AddNormArgs& a, void* stream);

// SparseLinear: x (rows, K), weight (N, K), bias (N, may be null), y (rows, N), all in T; y = s(x) W^T + b with
// s(x) = (x - mode) where |x - mode| > threshold (rounded to T), fp32 accumulation.
struct SparseLinearArgs {
  const void *x, *weight, *bias;
  void* y;
  int64_t rows, K, N;
  float mode, threshold;
};
const char* LaunchSparseLinear(DType t, const SparseLinearArgs& a, void* stream);

// RoutedMoE: x, y (T, d) in T; router_weight (E, d), router_bias (E) in T (bias may be null); w1 (E, 2F, d),
// w2 (E, d, F) in T. router 0 = sigmoid top-1, 1 = softmax top-k. Needs MoEWorkspaceBytes(...) bytes of workspace.
struct MoEArgs {
  const void *x, *router_weight, *router_bias, *w1, *w2;
  void* y;
  int64_t tokens, d, E, F, k;
  int router, activation;
  void* workspace;
};
size_t MoEWorkspaceBytes(DType t, int64_t tokens, int64_t d, int64_t E, int64_t F, int64_t k);
const char* LaunchRoutedMoE(DType t, const MoEArgs& a, void* stream);
// The router alone: experts (T, k) int32 and gates (T, k) fp32, as RoutedMoE picks them (a.workspace unused).
const char* LaunchMoERouter(DType t, const MoEArgs& a, int* experts, float* gates, void* stream);

}  // namespace mambadeploy_cuda
