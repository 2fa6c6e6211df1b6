// ONNX Runtime CUDA glue for the decode step's mambadeploy ops (kernels in ops_cuda_decode_kernels.cu). One op object
// per activation dtype T in {fp32, fp16, bf16}; names, dtypes ("T" = the model dtype, "F" = fp32), optional inputs
// and attribute defaults come from the registry (opset.py) through opset_generated.h (ops.h RegistryOp).
// Compiled only in the CUDA build of the library (build.py --cuda).
#include <cuda_runtime_api.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "ops_cuda_aot.h"
#include "ops_cuda_glue.h"

namespace {

using mambadeploy_ort::Attr;
namespace op = mambadeploy_opset;
using namespace mambadeploy_ort_cuda;

struct ConvUpdateKernel {
  using Spec = op::CausalConv1dUpdate;
  static constexpr const char* kName = Spec::kName;
  DType t_;
  int64_t activation_;
  ConvUpdateKernel(const OrtKernelInfo* info, ONNXTensorElementDataType t) : t_(dtype_of(t)), activation_(Attr(info, Spec::activation)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), s = input(ctx, 1), w = input(ctx, 2), bias = input(ctx, 3);
    const auto dims = mambadeploy_ort::CheckInputShapes<Spec>(x, s, w, bias);
    const int64_t b = dims.b, d = dims.d, K = dims.K;
    mambadeploy_cuda::ConvUpdateArgs a{};
    a.x = x.data, a.conv_state = static_cast<const float*>(s.data), a.weight = w.data, a.bias = bias.data;
    a.y = ctx.GetOutput(0, x.shape).GetTensorMutableRawData();
    a.new_state = ctx.GetOutput(1, s.shape).GetTensorMutableData<float>();
    a.batch = b, a.dim = d, a.K = K, a.silu = activation_ == 1;
    check_launch(mambadeploy_cuda::LaunchConvUpdate(t_, a, ctx.GetGPUComputeStream()), kName);
  }
};

struct StateUpdateKernel {
  using Spec = op::SelectiveStateUpdate;
  static constexpr const char* kName = Spec::kName;
  DType t_;
  int64_t softplus_;
  StateUpdateKernel(const OrtKernelInfo* info, ONNXTensorElementDataType t) : t_(dtype_of(t)), softplus_(Attr(info, Spec::dt_softplus)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In h = input(ctx, 0), x = input(ctx, 1), dt = input(ctx, 2), A = input(ctx, 3), B = input(ctx, 4);
    In C = input(ctx, 5), D = input(ctx, 6), z = input(ctx, 7), bias = input(ctx, 8);
    const auto dims = mambadeploy_ort::CheckInputShapes<Spec>(h, x, dt, A, B, C, D, z, bias);
    const int64_t b = dims.b, d = dims.d, N = dims.N;
    mambadeploy_cuda::StateUpdateArgs a{};
    a.state = static_cast<const float*>(h.data), a.x = x.data, a.dt = dt.data;
    a.A = static_cast<const float*>(A.data), a.B = B.data, a.C = C.data, a.D = D.data, a.z = z.data;
    a.dt_bias = bias.data;
    a.y = ctx.GetOutput(0, x.shape).GetTensorMutableRawData();
    a.new_state = ctx.GetOutput(1, h.shape).GetTensorMutableData<float>();
    a.batch = b, a.dim = d, a.N = N, a.softplus = softplus_ != 0;
    check_launch(mambadeploy_cuda::LaunchStateUpdate(t_, a, ctx.GetGPUComputeStream()), kName);
  }
};

struct SparseLinearKernel {
  using Spec = op::SparseLinear;
  static constexpr const char* kName = Spec::kName;
  DType t_;
  float mode_, threshold_;
  SparseLinearKernel(const OrtKernelInfo* info, ONNXTensorElementDataType t)
      : t_(dtype_of(t)), mode_(Attr(info, Spec::mode)), threshold_(Attr(info, Spec::threshold)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), w = input(ctx, 1), bias = input(ctx, 2);
    const auto dims = mambadeploy_ort::CheckInputShapes<Spec>(x, w, bias);
    mambadeploy_cuda::SparseLinearArgs a{};
    a.x = x.data, a.weight = w.data, a.bias = bias.data;
    a.y = ctx.GetOutput(0, {dims.rows, dims.N}).GetTensorMutableRawData();
    a.rows = dims.rows, a.K = dims.K, a.N = dims.N, a.mode = mode_, a.threshold = threshold_;
    check_launch(mambadeploy_cuda::LaunchSparseLinear(t_, a, ctx.GetGPUComputeStream()), kName);
  }
};

struct AddNormKernel {
  using Spec = op::AddRMSNorm;
  static constexpr const char* kName = Spec::kName;
  DType t_;
  float eps_;
  AddNormKernel(const OrtKernelInfo* info, ONNXTensorElementDataType t) : t_(dtype_of(t)), eps_(Attr(info, Spec::epsilon)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), r = input(ctx, 1), w = input(ctx, 2);
    const auto dims = mambadeploy_ort::CheckInputShapes<Spec>(x, r, w);
    const int64_t rows = dims.rows, d = dims.d;
    mambadeploy_cuda::AddNormArgs a{};
    a.x = x.data, a.residual = static_cast<const float*>(r.data), a.weight = w.data;
    a.y = ctx.GetOutput(0, x.shape).GetTensorMutableRawData();
    a.residual_out = ctx.GetOutput(1, x.shape).GetTensorMutableData<float>();
    a.rows = rows, a.d = d, a.eps = eps_;
    check_launch(mambadeploy_cuda::LaunchAddRMSNorm(t_, a, ctx.GetGPUComputeStream()), kName);
  }
};

struct MoEKernel {
  using Spec = op::RoutedMoE;
  static constexpr const char* kName = Spec::kName;
  DType t_;
  int64_t router_, top_k_, activation_;
  MoEKernel(const OrtKernelInfo* info, ONNXTensorElementDataType t)
      : t_(dtype_of(t)), router_(Attr(info, Spec::router)), top_k_(Attr(info, Spec::top_k)),
        activation_(Attr(info, Spec::activation)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), rw = input(ctx, 1), rb = input(ctx, 2), w1 = input(ctx, 3), w2 = input(ctx, 4);
    const int64_t k = router_ == 0 ? 1 : top_k_;
    const auto dims = mambadeploy_ort::CheckInputShapes<Spec>(x, rw, rb, w1, w2);
    const int64_t T = dims.T, d = dims.d, E = dims.E, F = dims.F;
    mambadeploy_ort::Require(k >= 1 && k <= E, std::string(kName) + ": top_k must be in [1, E]");
    mambadeploy_cuda::MoEArgs a{};
    a.x = x.data, a.router_weight = rw.data, a.router_bias = rb.data, a.w1 = w1.data, a.w2 = w2.data;
    a.y = ctx.GetOutput(0, x.shape).GetTensorMutableRawData();
    a.tokens = T, a.d = d, a.E = E, a.F = F, a.k = k, a.router = int(router_), a.activation = int(activation_);
    if (T == 0) return;
    const int device = ctx.GetInput(0).GetTensorMemoryInfo().GetDeviceId();
    if (T * k > 1 && AotDecode(ctx, device, a)) return;  // one pair (batch-1 top-1) keeps the SIMT GEMV below
    DeviceScratch scratch(ctx, device, mambadeploy_cuda::MoEWorkspaceBytes(t_, T, d, E, F, k), kName);
    a.workspace = scratch.ptr;
    check_launch(mambadeploy_cuda::LaunchRoutedMoE(t_, a, ctx.GetGPUComputeStream()), kName);
  }

  // The router here (logits rounded to T, as the reference), then torch-fast's grouped-GEMM experts (AOT Triton).
  bool AotDecode(Ort::KernelContext& ctx, int device, const mambadeploy_cuda::MoEArgs& a) {
    const int64_t P = a.tokens * a.k;
    const size_t gates_at = (size_t(P) * 4 + 255) / 256 * 256;  // 16-byte aligned, as the AOT kernels assume
    DeviceScratch route(ctx, device, gates_at + size_t(P) * 4, kName);  // experts int32 (P), then gates fp32 (P)
    int* experts = static_cast<int*>(route.ptr);
    float* gates = reinterpret_cast<float*>(static_cast<char*>(route.ptr) + gates_at);
    AotMoEArgs m{a.x, a.w1, a.w2, experts, false, gates, a.y, a.tokens, a.d, a.E, a.F, a.k, a.activation};
    void* stream = ctx.GetGPUComputeStream();
    check_launch(mambadeploy_cuda::LaunchMoERouter(t_, a, experts, gates, stream), kName);
    return AotGroupedMoE(ctx, device, t_, m, stream, kName);
  }
};

// DecodeAttention: only the AOT Triton kernels (torch-fast's split-K attention, ops_cuda_aot.cc); there is no
// hand-written CUDA kernel. present_* alias the caches when ORT hands the input buffers as outputs (OrtRunner binds
// them so); other output buffers get the caches copied once first (correct, O(cache)).
struct DecodeAttentionKernel {
  using Spec = op::DecodeAttention;
  static constexpr const char* kName = Spec::kName;
  DType t_;
  float scale_;
  DecodeAttentionKernel(const OrtKernelInfo* info, ONNXTensorElementDataType t)
      : t_(dtype_of(t)), scale_(Attr(info, Spec::scale)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In q = input(ctx, 0), k = input(ctx, 1), v = input(ctx, 2), kc = input(ctx, 3), vc = input(ctx, 4);
    In pos = input(ctx, 5);
    const auto dims = mambadeploy_ort::CheckInputShapes<Spec>(q, k, v, kc, vc, pos);  // shapes from the registry
    const int64_t B = dims.B, H = dims.H, KV = dims.KV, S = dims.S, hd = dims.hd;
    Require(H % KV == 0, "DecodeAttention: the KV heads must divide the query heads");
    AotAttentionArgs a{};
    a.q = q.data, a.k = k.data, a.v = v.data, a.pos = static_cast<const int64_t*>(pos.data);
    a.out = ctx.GetOutput(0, q.shape).GetTensorMutableRawData();
    a.present_key = ctx.GetOutput(1, kc.shape).GetTensorMutableRawData();
    a.present_value = ctx.GetOutput(2, vc.shape).GetTensorMutableRawData();
    a.B = B, a.H = H, a.KV = KV, a.S = S, a.hd = hd;
    a.scale = scale_ != 0.f ? scale_ : 1.f / std::sqrt(static_cast<float>(hd));
    void* stream = ctx.GetGPUComputeStream();
    const size_t bytes = size_t(B * KV * S * hd) * (t_ == DType::kFloat32 ? 4 : 2);
    for (auto [past, present] : {std::pair{kc.data, a.present_key}, std::pair{vc.data, a.present_value}}) {
      if (past == present) continue;
      const cudaError_t err = cudaMemcpyAsync(present, past, bytes, cudaMemcpyDeviceToDevice,
                                              static_cast<cudaStream_t>(stream));
      if (err != cudaSuccess) check_launch(cudaGetErrorString(err), kName);
    }
    const int device = ctx.GetInput(0).GetTensorMemoryInfo().GetDeviceId();
    Require(AotDecodeAttention(ctx, device, t_, a, stream),
            std::string(kName) + ": no AOT Triton kernel registered for these shapes (the CUDA library has no "
            "hand-written one): run OrtRunner with aot_kernels=True and triton installed");
  }
};

template <typename K>
struct AllDtypes {
  mambadeploy_ort::RegistryOp<typename K::Spec, K, kF32, true> f32;
  mambadeploy_ort::RegistryOp<typename K::Spec, K, kF16, true> f16;
  mambadeploy_ort::RegistryOp<typename K::Spec, K, kBF16, true> bf16;
  void AddTo(Ort::CustomOpDomain& domain) {
    domain.Add(&f32);
    domain.Add(&f16);
    domain.Add(&bf16);
  }
};

AllDtypes<ConvUpdateKernel> g_conv_update;
AllDtypes<StateUpdateKernel> g_state_update;
AllDtypes<AddNormKernel> g_add_norm;
AllDtypes<MoEKernel> g_moe;
AllDtypes<DecodeAttentionKernel> g_attention;
AllDtypes<SparseLinearKernel> g_sparse_linear;

}  // namespace

namespace mambadeploy_ort {
void AddCudaDecodeOps(Ort::CustomOpDomain& domain) {
  g_conv_update.AddTo(domain);
  g_state_update.AddTo(domain);
  g_add_norm.AddTo(domain);
  g_moe.AddTo(domain);
  g_attention.AddTo(domain);
  g_sparse_linear.AddTo(domain);
}
}  // namespace mambadeploy_ort
