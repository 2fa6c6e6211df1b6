// ONNX Runtime CPU kernels for the mambadeploy custom ops (domain "mambadeploy"): SelectiveScan, CausalConv1d,
// TopKExpertGather — the same math as mambadeploy/models/ref_ops.py (fp32 inputs, fp32 accumulation). Loaded with
// SessionOptions.register_custom_ops_library; built by mambadeploy/plugins/ort/build.py against ORT's C API headers
// (API version 21, accepted by onnxruntime 1.21 and later). Registered by register.cc.
#include "ops.h"
#include "ops_cpu_common.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

using namespace mambadeploy_ort_cpu;
using mambadeploy_ort::Attr;
using mambadeploy_ort::RegistryOp;
namespace op = mambadeploy_opset;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
using mambadeploy_ort::Require;

// --- SelectiveScan -------------------------------------------------------------------------------------------------
// u, delta, z: (b, d, L); A: (d, N); B, C: (b, N, L); D, delta_bias: (d); initial_state: (b, d, N) -> y, last_state
struct ScanKernel {
  int64_t softplus_;
  explicit ScanKernel(const OrtKernelInfo* info) : softplus_(Attr(info, op::SelectiveScan::delta_softplus)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In u = input(ctx, 0), dt = input(ctx, 1), A = input(ctx, 2), B = input(ctx, 3), C = input(ctx, 4);
    In D = input(ctx, 5), z = input(ctx, 6), bias = input(ctx, 7), h0 = input(ctx, 8);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::SelectiveScan>(u, dt, A, B, C, D, z, bias, h0);
    const int64_t b = dims.b, d = dims.d, L = dims.L, N = dims.N;
    float* y = ctx.GetOutput(0, u.shape).GetTensorMutableData<float>();
    float* hl = ctx.GetOutput(1, std::vector<int64_t>{b, d, N}).GetTensorMutableData<float>();
    std::vector<float> h(N);
    for (int64_t bi = 0; bi < b; ++bi) {
      for (int64_t di = 0; di < d; ++di) {
        for (int64_t n = 0; n < N; ++n) h[n] = h0.data ? h0.data[(bi * d + di) * N + n] : 0.f;
        const int64_t row = (bi * d + di) * L;
        for (int64_t t = 0; t < L; ++t) {
          float delta = dt.data[row + t] + (bias.data ? bias.data[di] : 0.f);
          if (softplus_) delta = softplus(delta);
          const float ut = u.data[row + t];
          float acc = 0.f;
          for (int64_t n = 0; n < N; ++n) {
            const int64_t bn = (bi * N + n) * L + t;
            h[n] = std::exp(delta * A.data[di * N + n]) * h[n] + delta * ut * B.data[bn];
            acc += h[n] * C.data[bn];
          }
          if (D.data) acc += ut * D.data[di];
          if (z.data) acc *= silu(z.data[row + t]);
          y[row + t] = acc;
        }
        std::memcpy(hl + (bi * d + di) * N, h.data(), N * sizeof(float));
      }
    }
  }
};


// --- CausalConv1d ---------------------------------------------------------------------------------------------------
// x: (b, d, L); weight: (d, K); bias: (d); initial_state: (b, d, K) = last K inputs -> y (b, d, L), final_state (b, d, K)
struct ConvKernel {
  int64_t activation_;
  explicit ConvKernel(const OrtKernelInfo* info) : activation_(Attr(info, op::CausalConv1d::activation)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), w = input(ctx, 1), bias = input(ctx, 2), s0 = input(ctx, 3);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::CausalConv1d>(x, w, bias, s0);
    const int64_t b = dims.b, d = dims.d, L = dims.L, K = dims.K;
    float* y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
    float* sf = ctx.GetOutput(1, std::vector<int64_t>{b, d, K}).GetTensorMutableData<float>();
    std::vector<float> full(K + L);
    for (int64_t bi = 0; bi < b; ++bi) {
      for (int64_t di = 0; di < d; ++di) {
        const int64_t row = (bi * d + di);
        for (int64_t k = 0; k < K; ++k) full[k] = s0.data ? s0.data[row * K + k] : 0.f;
        std::memcpy(full.data() + K, x.data + row * L, L * sizeof(float));
        for (int64_t t = 0; t < L; ++t) {
          float acc = bias.data ? bias.data[di] : 0.f;
          for (int64_t k = 0; k < K; ++k) acc += w.data[di * K + k] * full[t + 1 + k];
          y[row * L + t] = activation_ == 1 ? silu(acc) : acc;
        }
        std::memcpy(sf + row * K, full.data() + L, K * sizeof(float));
      }
    }
  }
};


// --- TopKExpertGather -----------------------------------------------------------------------------------------------
// x: (T, d); w1: (E, 2F, d) = [gate; up]; w2: (E, d, F); experts: (T, k) int64; weights: (T, k) -> y (T, d)
struct GatherKernel {
  int64_t activation_;
  explicit GatherKernel(const OrtKernelInfo* info) : activation_(Attr(info, op::TopKExpertGather::activation)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), w1 = input(ctx, 1), w2 = input(ctx, 2), wt = input(ctx, 4);
    std::vector<int64_t> eshape;
    const int64_t* experts = input_i64(ctx, 3, eshape);
    const auto dims = mambadeploy_ort::CheckShapes<op::TopKExpertGather>(
        {&x.shape, &w1.shape, &w2.shape, &eshape, &wt.shape});
    const int64_t T = dims.T, d = dims.d, E = dims.E, F = dims.F, k = dims.k;
    const int64_t F2 = 2 * F;
    float* y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
    std::vector<float> h(F2), a(F);
    for (int64_t t = 0; t < T; ++t) {
      float* yt = y + t * d;
      std::fill(yt, yt + d, 0.f);
      const float* xt = x.data + t * d;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t e = experts[t * k + j];
        Require(e >= 0 && e < E, "TopKExpertGather: expert index out of range");
        const float* W1 = w1.data + e * F2 * d;
        const float* W2 = w2.data + e * d * F;
        for (int64_t f = 0; f < F2; ++f) {
          float acc = 0.f;
          for (int64_t i = 0; i < d; ++i) acc += W1[f * d + i] * xt[i];
          h[f] = acc;
        }
        for (int64_t f = 0; f < F; ++f) a[f] = activate(h[f], activation_) * h[F + f];
        const float g = wt.data[t * k + j];
        for (int64_t i = 0; i < d; ++i) {
          float acc = 0.f;
          for (int64_t f = 0; f < F; ++f) acc += W2[i * F + f] * a[f];
          yt[i] += g * acc;
        }
      }
    }
  }
};


// fp32 CPU kernels: the registry's "T" inputs are float32 here
RegistryOp<op::SelectiveScan, ScanKernel, kF32> g_scan;
RegistryOp<op::CausalConv1d, ConvKernel, kF32> g_conv;
RegistryOp<op::TopKExpertGather, GatherKernel, kF32> g_gather;

}  // namespace

namespace mambadeploy_ort {
void AddCpuOps(Ort::CustomOpDomain& domain) {
  domain.Add(&g_scan);
  domain.Add(&g_conv);
  domain.Add(&g_gather);
}
}  // namespace mambadeploy_ort
