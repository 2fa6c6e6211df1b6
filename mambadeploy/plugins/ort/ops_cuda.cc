// ONNX Runtime CUDA kernels for the mambadeploy custom ops: the ORT side (shape checks, outputs, the CUDA EP's compute
// stream, workspace from the EP's allocator) of the kernels in ops_cuda_kernels.cu. One op object per activation dtype
// T in {fp32, fp16, bf16} (ORT dispatches same-name custom ops by input types), with the dtypes an export gives:
// the registry's node_dtypes (opset.py), read here through opset_generated.h (ops.h RegistryOp).
// Compiled only in the CUDA build of the library (build.py --cuda).
#include <string>
#include <vector>

#include "ops.h"
#include "ops_cuda_aot.h"
#include "ops_cuda_glue.h"

namespace {

using mambadeploy_cuda::DType;
using mambadeploy_ort::Attr;
namespace op = mambadeploy_opset;
template <typename Spec, typename K, ONNXTensorElementDataType TT>
using CudaOp = mambadeploy_ort::RegistryOp<Spec, K, TT, true>;
using mambadeploy_ort::Require;
using namespace mambadeploy_ort_cuda;

// --- SelectiveScan -------------------------------------------------------------------------------------------------
template <ONNXTensorElementDataType TT>
struct ScanKernel {
  int64_t softplus_;
  explicit ScanKernel(const OrtKernelInfo* info) : softplus_(Attr(info, op::SelectiveScan::delta_softplus)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In u = input(ctx, 0), dt = input(ctx, 1), A = input(ctx, 2), B = input(ctx, 3), C = input(ctx, 4);
    In D = input(ctx, 5), z = input(ctx, 6), bias = input(ctx, 7), h0 = input(ctx, 8);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::SelectiveScan>(u, dt, A, B, C, D, z, bias, h0);
    const int64_t b = dims.b, d = dims.d, L = dims.L, N = dims.N;
    Require(N <= mambadeploy_cuda::kScanMaxState, "SelectiveScan (CUDA): state size N = " + std::to_string(N) +
                                                      " is above the supported " +
                                                      std::to_string(mambadeploy_cuda::kScanMaxState));
    mambadeploy_cuda::ScanArgs a{};
    a.u = u.data, a.delta = dt.data, a.A = static_cast<const float*>(A.data), a.B = B.data, a.C = C.data;
    a.D = D.data, a.z = z.data, a.delta_bias = bias.data, a.initial_state = static_cast<const float*>(h0.data);
    a.y = ctx.GetOutput(0, u.shape).GetTensorMutableRawData();
    a.last_state = ctx.GetOutput(1, std::vector<int64_t>{b, d, N}).GetTensorMutableData<float>();
    a.batch = b, a.dim = d, a.L = L, a.N = N, a.softplus = softplus_ != 0;
    const AotScanArgs s{u.data, dt.data, B.data, C.data, D.data, z.data, bias.data, a.A, a.initial_state,
                        a.y, a.last_state, b, d, L, N, a.softplus};
    if (AotSelectiveScan(ctx, ctx.GetInput(0).GetTensorMemoryInfo().GetDeviceId(), dtype_of<TT>(), s,
                         ctx.GetGPUComputeStream()))
      return;
    check_launch(mambadeploy_cuda::LaunchSelectiveScan(dtype_of<TT>(), a, ctx.GetGPUComputeStream()),
                 op::SelectiveScan::kName);
  }
};

// --- CausalConv1d ---------------------------------------------------------------------------------------------------
template <ONNXTensorElementDataType TT>
struct ConvKernel {
  int64_t activation_;
  explicit ConvKernel(const OrtKernelInfo* info) : activation_(Attr(info, op::CausalConv1d::activation)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), w = input(ctx, 1), bias = input(ctx, 2), s0 = input(ctx, 3);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::CausalConv1d>(x, w, bias, s0);
    const int64_t b = dims.b, d = dims.d, L = dims.L, K = dims.K;
    mambadeploy_cuda::ConvArgs a{};
    a.x = x.data, a.weight = w.data, a.bias = bias.data, a.initial_state = static_cast<const float*>(s0.data);
    a.y = ctx.GetOutput(0, x.shape).GetTensorMutableRawData();
    a.final_state = ctx.GetOutput(1, std::vector<int64_t>{b, d, K}).GetTensorMutableData<float>();
    a.batch = b, a.dim = d, a.L = L, a.K = K, a.silu = activation_ == 1;
    if (AotCausalConv1d(dtype_of<TT>(), a, ctx.GetGPUComputeStream())) return;
    check_launch(mambadeploy_cuda::LaunchCausalConv1d(dtype_of<TT>(), a, ctx.GetGPUComputeStream()),
                 op::CausalConv1d::kName);
  }
};

// --- TopKExpertGather -----------------------------------------------------------------------------------------------
template <ONNXTensorElementDataType TT>
struct GatherKernel {
  int64_t activation_;
  explicit GatherKernel(const OrtKernelInfo* info) : activation_(Attr(info, op::TopKExpertGather::activation)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), w1 = input(ctx, 1), w2 = input(ctx, 2), ex = input(ctx, 3), wt = input(ctx, 4);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::TopKExpertGather>(x, w1, w2, ex, wt);
    const int64_t T = dims.T, d = dims.d, E = dims.E, F = dims.F, k = dims.k;
    const DType t = dtype_of<TT>();
    mambadeploy_cuda::GatherArgs a{};
    a.x = x.data, a.w1 = w1.data, a.w2 = w2.data;
    a.experts = static_cast<const int64_t*>(ex.data), a.weights = static_cast<const float*>(wt.data);
    a.y = ctx.GetOutput(0, x.shape).GetTensorMutableRawData();
    a.tokens = T, a.d = d, a.E = E, a.F = F, a.k = k, a.activation = int(activation_);
    if (T == 0) return;
    const int device = ctx.GetInput(0).GetTensorMemoryInfo().GetDeviceId();
    const AotMoEArgs m{x.data, w1.data, w2.data, ex.data, true, a.weights, a.y, T, d, E, F, k, activation_};
    if (T * k > 1 && AotGroupedMoE(ctx, device, t, m, ctx.GetGPUComputeStream(), op::TopKExpertGather::kName)) return;
    DeviceScratch scratch(ctx, device, mambadeploy_cuda::GatherWorkspaceBytes(t, T, d, E, F, k), op::TopKExpertGather::kName);
    a.workspace = scratch.ptr;
    check_launch(mambadeploy_cuda::LaunchExpertGather(t, a, ctx.GetGPUComputeStream()), op::TopKExpertGather::kName);
  }
};

CudaOp<op::SelectiveScan, ScanKernel<kF32>, kF32> g_scan_f32;
CudaOp<op::SelectiveScan, ScanKernel<kF16>, kF16> g_scan_f16;
CudaOp<op::SelectiveScan, ScanKernel<kBF16>, kBF16> g_scan_bf16;
CudaOp<op::CausalConv1d, ConvKernel<kF32>, kF32> g_conv_f32;
CudaOp<op::CausalConv1d, ConvKernel<kF16>, kF16> g_conv_f16;
CudaOp<op::CausalConv1d, ConvKernel<kBF16>, kBF16> g_conv_bf16;
CudaOp<op::TopKExpertGather, GatherKernel<kF32>, kF32> g_gather_f32;
CudaOp<op::TopKExpertGather, GatherKernel<kF16>, kF16> g_gather_f16;
CudaOp<op::TopKExpertGather, GatherKernel<kBF16>, kBF16> g_gather_bf16;

}  // namespace

namespace mambadeploy_ort {
void AddCudaOps(Ort::CustomOpDomain& domain) {
  for (OrtCustomOp* op : std::vector<OrtCustomOp*>{&g_scan_f32, &g_scan_f16, &g_scan_bf16, &g_conv_f32, &g_conv_f16,
                                                   &g_conv_bf16, &g_gather_f32, &g_gather_f16, &g_gather_bf16})
    domain.Add(op);
}
}  // namespace mambadeploy_ort
