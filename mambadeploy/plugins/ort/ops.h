// Shared declarations of the mambadeploy ORT custom-op library: the ORT C++ API (initialised by register.cc from the
// OrtApiBase ORT hands over) and the functions that add each build's kernels to the "mambadeploy" domain.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <string>
#include <type_traits>
#include <vector>

#include "opset_generated.h"  // the registry's names, signatures and attribute defaults (gen_opset.py)

namespace mambadeploy_ort {
void AddCpuOps(Ort::CustomOpDomain& domain);   // ops_cpu.cc: fp32 CPU kernels
void AddCudaOps(Ort::CustomOpDomain& domain);  // ops_cuda.cc: fp32/fp16/bf16 CUDA kernels (CUDA build only)
void AddCpuDecodeOps(Ort::CustomOpDomain& domain);   // ops_cpu_decode.cc: the decode step's ops, fp32 CPU
void AddCudaDecodeOps(Ort::CustomOpDomain& domain);  // ops_cuda_decode.cc: the decode step's ops on CUDA
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

// A float attribute, or `fallback` when the node leaves it out.
inline float AttrFloatOr(const OrtKernelInfo* info, const char* name, float fallback) {
  try {
    return Ort::ConstKernelInfo(info).GetAttribute<float>(name);
  } catch (const Ort::Exception&) {
    return fallback;
  }
}

// A registry attribute (opset_generated.h): the node's value, or the registry default when the node leaves it out.
inline int64_t Attr(const OrtKernelInfo* info, mambadeploy_opset::IntAttr a) { return AttrOr(info, a.name, a.fallback); }
inline float Attr(const OrtKernelInfo* info, mambadeploy_opset::FloatAttr a) {
  return AttrFloatOr(info, a.name, a.fallback);
}

// A registry signature letter as an ORT element type: T = the op object's activation dtype `tt`, F = fp32, I = int64.
inline ONNXTensorElementDataType NodeDtype(char letter, ONNXTensorElementDataType tt) {
  switch (letter | 0x20) {
    case 'f': return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    case 'i': return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    default: return tt;
  }
}

// The ORT op object of registry op `Spec` (a struct of opset_generated.h) run by kernel `K`, for activation dtype `TT`
// on ORT's CUDA provider (kCuda) or its CPU provider. Name, input/output counts, dtypes and optionality all come from the registry; K is
// built from the kernel info (and TT, when it takes it).
template <typename Spec, typename K, ONNXTensorElementDataType TT, bool kCuda = false>
struct RegistryOp : Ort::CustomOpBase<RegistryOp<Spec, K, TT, kCuda>, K> {
  void* CreateKernel(const OrtApi&, const OrtKernelInfo* info) const {
    if constexpr (std::is_constructible_v<K, const OrtKernelInfo*, ONNXTensorElementDataType>)
      return new K(info, TT);
    else
      return new K(info);
  }
  const char* GetName() const { return Spec::kName; }
  const char* GetExecutionProviderType() const { return kCuda ? "CUDAExecutionProvider" : nullptr; }
  size_t GetInputTypeCount() const { return Spec::kNumInputs; }
  ONNXTensorElementDataType GetInputType(size_t i) const { return NodeDtype(Spec::kInputs[i], TT); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t i) const {
    return (Spec::kInputs[i] & 0x20) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return Spec::kNumOutputs; }
  ONNXTensorElementDataType GetOutputType(size_t i) const { return NodeDtype(Spec::kOutputs[i], TT); }
};

inline void Require(bool ok, const std::string& what) {
  if (!ok) ORT_CXX_API_THROW(std::string(what), ORT_INVALID_ARGUMENT);
}
}  // namespace mambadeploy_ort

namespace mambadeploy_ort {
// Shape checks shared by the CPU and CUDA kernels (one rule per op, as opset.py states it). An optional input that was
// left out is passed as nullptr.
using Shape = std::vector<int64_t>;

struct ScanDims { int64_t b, d, L, N; };
// u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L); D, delta_bias: (d); initial_state: (b, d, N)
inline ScanDims CheckScanShapes(const Shape& u, const Shape& dt, const Shape& A, const Shape& B, const Shape& C,
                                const Shape* D, const Shape* z, const Shape* bias, const Shape* h0) {
  Require(u.size() == 3 && A.size() == 2, "SelectiveScan: u must be (b, d, L), A (d, N)");
  const int64_t b = u[0], d = u[1], L = u[2], N = A[1];
  Require(dt == u && A[0] == d, "SelectiveScan: delta/A do not match u");
  Require(B == Shape{b, N, L} && C == B, "SelectiveScan: B/C must be (b, N, L)");
  Require(!z || *z == u, "SelectiveScan: z must match u");
  Require(!D || *D == Shape{d}, "SelectiveScan: D must be (d)");
  Require(!bias || *bias == Shape{d}, "SelectiveScan: delta_bias must be (d)");
  Require(!h0 || *h0 == Shape{b, d, N}, "SelectiveScan: initial_state must be (b, d, N)");
  return {b, d, L, N};
}

struct ConvDims { int64_t b, d, L, K; };
// x: (b, d, L); weight: (d, K); bias: (d); initial_state: (b, d, K)
inline ConvDims CheckConvShapes(const Shape& x, const Shape& w, const Shape* bias, const Shape* s0) {
  Require(x.size() == 3 && w.size() == 2 && w[0] == x[1], "CausalConv1d: x must be (b, d, L) and weight (d, K)");
  const int64_t b = x[0], d = x[1], L = x[2], K = w[1];
  Require(!bias || *bias == Shape{d}, "CausalConv1d: bias must be (d)");
  Require(!s0 || *s0 == Shape{b, d, K}, "CausalConv1d: initial_state must be (b, d, K)");
  return {b, d, L, K};
}

struct GatherDims { int64_t T, d, E, F, k; };
// x: (T, d); w1: (E, 2F, d); w2: (E, d, F); experts, weights: (T, k)
inline GatherDims CheckGatherShapes(const Shape& x, const Shape& w1, const Shape& w2, const Shape& experts,
                                    const Shape& weights) {
  Require(x.size() == 2 && w1.size() == 3 && w2.size() == 3, "TopKExpertGather: bad ranks");
  const int64_t T = x[0], d = x[1], E = w1[0], F2 = w1[1], F = F2 / 2;
  Require(w1[2] == d && w2 == Shape{E, d, F} && F2 == 2 * F,
          "TopKExpertGather: w1 must be (E, 2F, d) and w2 (E, d, F)");
  Require(experts.size() == 2 && experts[0] == T && weights == experts, "TopKExpertGather: experts/weights (T, k)");
  return {T, d, E, F, experts[1]};
}

// --- the decode step's ops (one token per row) ---------------------------------------------------------------------
struct ConvUpdateDims { int64_t b, d, K; };
// x: (b, d); conv_state: (b, d, K); weight: (d, K); bias: (d)
inline ConvUpdateDims CheckConvUpdateShapes(const Shape& x, const Shape& s, const Shape& w, const Shape* bias) {
  Require(x.size() == 2 && s.size() == 3 && w.size() == 2, "CausalConv1dUpdate: x (b, d), conv_state (b, d, K), weight (d, K)");
  const int64_t b = x[0], d = x[1], K = w[1];
  Require(s == Shape{b, d, K} && w[0] == d, "CausalConv1dUpdate: conv_state/weight do not match x");
  Require(!bias || *bias == Shape{d}, "CausalConv1dUpdate: bias must be (d)");
  return {b, d, K};
}

struct StateUpdateDims { int64_t b, d, N; };
// state: (b, d, N); x, dt, z: (b, d); A: (d, N); B, C: (b, N); D, dt_bias: (d)
inline StateUpdateDims CheckStateUpdateShapes(const Shape& h, const Shape& x, const Shape& dt, const Shape& A,
                                              const Shape& B, const Shape& C, const Shape* D, const Shape* z,
                                              const Shape* bias) {
  Require(x.size() == 2 && A.size() == 2, "SelectiveStateUpdate: x must be (b, d), A (d, N)");
  const int64_t b = x[0], d = x[1], N = A[1];
  Require(h == Shape{b, d, N} && dt == x && A[0] == d, "SelectiveStateUpdate: state/dt/A do not match x");
  Require(B == Shape{b, N} && C == B, "SelectiveStateUpdate: B/C must be (b, N)");
  Require(!z || *z == x, "SelectiveStateUpdate: z must match x");
  Require(!D || *D == Shape{d}, "SelectiveStateUpdate: D must be (d)");
  Require(!bias || *bias == Shape{d}, "SelectiveStateUpdate: dt_bias must be (d)");
  return {b, d, N};
}

struct NormDims { int64_t rows, d; };
// x, residual: (..., d); weight: (d)
inline NormDims CheckAddNormShapes(const Shape& x, const Shape& r, const Shape& w) {
  Require(!x.empty() && x == r && w == Shape{x.back()}, "AddRMSNorm: x and residual must match, weight must be (d)");
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) rows *= x[i];
  return {rows, x.back()};
}

struct AttentionDims { int64_t B, H, KV, S, hd; };
// q: (B, H, hd); k, v: (B, KV, hd); key_cache, value_cache: (B, KV, S, hd) with KV dividing H; pos: (B,)
inline AttentionDims CheckDecodeAttentionShapes(const Shape& q, const Shape& k, const Shape& v, const Shape& kc,
                                                const Shape& vc, const Shape& pos) {
  Require(q.size() == 3 && kc.size() == 4, "DecodeAttention: q must be (B, H, hd) and the caches (B, KV, S, hd)");
  const int64_t B = q[0], H = q[1], hd = q[2], KV = kc[1], S = kc[2];
  Require(kc[0] == B && kc[3] == hd && KV > 0 && H % KV == 0, "DecodeAttention: caches do not fit q (KV must divide H)");
  Require(vc == kc, "DecodeAttention: value_cache must match key_cache");
  Require(k == Shape{B, KV, hd} && v == k, "DecodeAttention: k and v must be (B, KV, hd)");
  Require(pos == Shape{B}, "DecodeAttention: pos must be (B,)");
  return {B, H, KV, S, hd};
}

struct MoEDims { int64_t T, d, E, F; };
// x: (T, d); router_weight: (E, d); router_bias: (E); w1: (E, 2F, d); w2: (E, d, F)
inline MoEDims CheckRoutedMoEShapes(const Shape& x, const Shape& rw, const Shape* rb, const Shape& w1,
                                    const Shape& w2, int64_t top_k) {
  Require(x.size() == 2 && rw.size() == 2 && w1.size() == 3 && w2.size() == 3, "RoutedMoE: bad ranks");
  const int64_t T = x[0], d = x[1], E = rw[0], F = w1[1] / 2;
  Require(rw[1] == d && (!rb || *rb == Shape{E}), "RoutedMoE: router_weight must be (E, d), router_bias (E)");
  Require(w1 == Shape{E, 2 * F, d} && w2 == Shape{E, d, F}, "RoutedMoE: w1 must be (E, 2F, d) and w2 (E, d, F)");
  Require(top_k >= 1 && top_k <= E, "RoutedMoE: top_k must be in [1, E]");
  return {T, d, E, F};
}
}  // namespace mambadeploy_ort
