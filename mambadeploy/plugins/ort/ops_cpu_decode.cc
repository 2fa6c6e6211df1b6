// ONNX Runtime CPU kernels (fp32) for the decode step's mambadeploy ops: CausalConv1dUpdate, SelectiveStateUpdate,
// AddRMSNorm, RoutedMoE — the math of mambadeploy/models/ref_ops.py (causal_conv1d_update_ref,
// selective_state_update_ref, add_rms_norm_ref, routed_moe_ref), fp32 accumulation — and DecodeAttention
// (kernels/decode_attention.py decode_attention_update_ref) and SparseLinear (kernels/sparse_gemv.py sparse_linear_ref)
// in fp32, fp16 and bf16. Registered by register.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "ops.h"
#include "ops_cpu_common.h"

namespace {

using mambadeploy_ort::Attr;
using mambadeploy_ort::RegistryOp;
namespace op = mambadeploy_opset;
using mambadeploy_ort::Require;
constexpr ONNXTensorElementDataType kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;

using namespace mambadeploy_ort_cpu;

// --- CausalConv1dUpdate: x (b, d), conv_state (b, d, K), weight (d, K), bias (d) -> y (b, d), new_state (b, d, K)
struct ConvUpdateKernel {
  int64_t activation_;
  explicit ConvUpdateKernel(const OrtKernelInfo* info) : activation_(Attr(info, op::CausalConv1dUpdate::activation)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), s = input(ctx, 1), w = input(ctx, 2), bias = input(ctx, 3);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::CausalConv1dUpdate>(x, s, w, bias);
    const int64_t b = dims.b, d = dims.d, K = dims.K;
    float* y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
    float* ns = ctx.GetOutput(1, s.shape).GetTensorMutableData<float>();
    for (int64_t r = 0; r < b * d; ++r) {
      const int64_t c = r % d;
      std::vector<float> win(s.data + r * K + 1, s.data + r * K + K);
      win.push_back(x.data[r]);  // may alias nothing: the output is a separate buffer unless ORT reuses the input
      float acc = bias.data ? bias.data[c] : 0.f;
      for (int64_t k = 0; k < K; ++k) acc += win[k] * w.data[c * K + k];
      std::copy(win.begin(), win.end(), ns + r * K);
      y[r] = activation_ == 1 ? silu(acc) : acc;
    }
  }
};

// --- SelectiveStateUpdate: state (b, d, N), x dt z (b, d), A (d, N), B C (b, N), D dt_bias (d) -> y, new_state
struct StateUpdateKernel {
  int64_t softplus_;
  explicit StateUpdateKernel(const OrtKernelInfo* info) : softplus_(Attr(info, op::SelectiveStateUpdate::dt_softplus)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In h = input(ctx, 0), x = input(ctx, 1), dt = input(ctx, 2), A = input(ctx, 3), B = input(ctx, 4);
    In C = input(ctx, 5), D = input(ctx, 6), z = input(ctx, 7), bias = input(ctx, 8);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::SelectiveStateUpdate>(h, x, dt, A, B, C, D, z, bias);
    const int64_t b = dims.b, d = dims.d, N = dims.N;
    float* y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
    float* hn = ctx.GetOutput(1, h.shape).GetTensorMutableData<float>();
    for (int64_t r = 0; r < b * d; ++r) {
      const int64_t bi = r / d, c = r % d;
      float delta = dt.data[r] + (bias.data ? bias.data[c] : 0.f);
      if (softplus_) delta = softplus(delta);
      const float xv = x.data[r];
      float acc = 0.f;
      for (int64_t n = 0; n < N; ++n) {
        const float v = std::exp(delta * A.data[c * N + n]) * h.data[r * N + n] + delta * xv * B.data[bi * N + n];
        hn[r * N + n] = v;
        acc += v * C.data[bi * N + n];
      }
      if (D.data) acc += xv * D.data[c];
      if (z.data) acc *= silu(z.data[r]);
      y[r] = acc;
    }
  }
};

// --- AddRMSNorm: x, residual (..., d), weight (d) -> y = rms_norm(residual + x) * weight, residual_out = residual + x
struct AddNormKernel {
  float eps_;
  explicit AddNormKernel(const OrtKernelInfo* info) : eps_(Attr(info, op::AddRMSNorm::epsilon)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), res = input(ctx, 1), w = input(ctx, 2);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::AddRMSNorm>(x, res, w);
    const int64_t rows = dims.rows, d = dims.d;
    float* y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
    float* ro = ctx.GetOutput(1, x.shape).GetTensorMutableData<float>();
    for (int64_t r = 0; r < rows; ++r) {
      float sq = 0.f;
      for (int64_t i = 0; i < d; ++i) {
        const float v = res.data[r * d + i] + x.data[r * d + i];
        ro[r * d + i] = v;
        sq += v * v;
      }
      const float inv = 1.f / std::sqrt(sq / static_cast<float>(d) + eps_);
      for (int64_t i = 0; i < d; ++i) y[r * d + i] = ro[r * d + i] * inv * w.data[i];
    }
  }
};

// --- RoutedMoE: x (T, d), router_weight (E, d), router_bias (E), w1 (E, 2F, d), w2 (E, d, F) -> y (T, d)
// router 0: argmax, weight = sigmoid(logit); 1: softmax, top-k (ties: lower expert first). Only chosen experts are read.
struct MoEKernel {
  int64_t router_, top_k_, activation_;
  explicit MoEKernel(const OrtKernelInfo* info)
      : router_(Attr(info, op::RoutedMoE::router)), top_k_(Attr(info, op::RoutedMoE::top_k)),
        activation_(Attr(info, op::RoutedMoE::activation)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In x = input(ctx, 0), rw = input(ctx, 1), rb = input(ctx, 2), w1 = input(ctx, 3), w2 = input(ctx, 4);
    const int64_t k = router_ == 0 ? 1 : top_k_;
    const auto dims = mambadeploy_ort::CheckInputShapes<op::RoutedMoE>(x, rw, rb, w1, w2);
    const int64_t T = dims.T, d = dims.d, E = dims.E, F = dims.F;
    Require(k >= 1 && k <= E, std::string(op::RoutedMoE::kName) + ": top_k must be in [1, E]");
    float* y = ctx.GetOutput(0, x.shape).GetTensorMutableData<float>();
    std::vector<float> logits(E), h(2 * F), a(F);
    std::vector<int64_t> order(E);
    for (int64_t t = 0; t < T; ++t) {
      const float* xt = x.data + t * d;
      for (int64_t e = 0; e < E; ++e) {
        float acc = rb.data ? rb.data[e] : 0.f;
        for (int64_t i = 0; i < d; ++i) acc += rw.data[e * d + i] * xt[i];
        logits[e] = acc;
      }
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int64_t p, int64_t q) { return logits[p] > logits[q]; });
      std::vector<float> gates(k);
      if (router_ == 0) {
        gates[0] = 1.f / (1.f + std::exp(-logits[order[0]]));
      } else {
        const float top = logits[order[0]];
        float total = 0.f;
        for (int64_t e = 0; e < E; ++e) total += std::exp(logits[e] - top);
        for (int64_t j = 0; j < k; ++j) gates[j] = std::exp(logits[order[j]] - top) / total;
      }
      float* yt = y + t * d;
      std::fill(yt, yt + d, 0.f);
      for (int64_t j = 0; j < k; ++j) {
        const float* W1 = w1.data + order[j] * 2 * F * d;
        const float* W2 = w2.data + order[j] * d * F;
        for (int64_t f = 0; f < 2 * F; ++f) {
          float acc = 0.f;
          for (int64_t i = 0; i < d; ++i) acc += W1[f * d + i] * xt[i];
          h[f] = acc;
        }
        for (int64_t f = 0; f < F; ++f) a[f] = activate(h[f], activation_) * h[F + f];
        for (int64_t i = 0; i < d; ++i) {
          float acc = 0.f;
          for (int64_t f = 0; f < F; ++f) acc += W2[i * F + f] * a[f];
          yt[i] += gates[j] * acc;
        }
      }
    }
  }
};

// --- DecodeAttention: q (B, H, hd), k v (B, KV, hd), caches (B, KV, S, hd), pos (B,) -> out (B, H, hd), present caches
// present_* alias the caches: when ORT hands the input buffers as the outputs (OrtRunner binds present to past), a
// step writes slot pos[b] and reads slots [0, pos[b]] only. A separate output buffer gets the cache copied once first
// (correct, O(cache)). Scores and softmax in fp32 (the reference's math), out rounded once to T.
inline float Widen(float x) { return x; }
inline float Widen(Ort::Float16_t x) { return x.ToFloat(); }
inline float Widen(Ort::BFloat16_t x) { return x.ToFloat(); }
template <typename T> T Narrow(float x) { return T(x); }
template <> inline float Narrow<float>(float x) { return x; }

template <typename T>
struct DecodeAttentionKernel {
  float scale_;
  explicit DecodeAttentionKernel(const OrtKernelInfo* info) : scale_(Attr(info, op::DecodeAttention::scale)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    Ort::ConstValue qv = ctx.GetInput(0), kv = ctx.GetInput(1), vv = ctx.GetInput(2);
    Ort::ConstValue kc = ctx.GetInput(3), vc = ctx.GetInput(4);
    std::vector<int64_t> pos_shape;
    const int64_t* pos = input_i64(ctx, 5, pos_shape);
    const In qi = input(ctx, 0), ci = input(ctx, 3);  // (the shapes; the typed data comes from the values above)
    const std::vector<int64_t>& qs = qi.shape;
    const std::vector<int64_t>& cs = ci.shape;
    // shapes from the registry (opset_generated.h); that KV divides H is a value rule, checked here
    const auto dims = mambadeploy_ort::CheckInputShapes<op::DecodeAttention>(qi, input(ctx, 1), input(ctx, 2), ci,
                                                                             input(ctx, 4), input(ctx, 5));
    const int64_t B = dims.B, H = dims.H, KV = dims.KV, S = dims.S, hd = dims.hd;
    Require(H % KV == 0, "DecodeAttention: the KV heads must divide the query heads");
    for (int64_t b = 0; b < B; ++b) Require(pos[b] >= 0 && pos[b] < S, "DecodeAttention: pos outside the cache");
    const T* q = qv.GetTensorData<T>();
    T* out = ctx.GetOutput(0, qs).GetTensorMutableData<T>();
    T* caches[2] = {ctx.GetOutput(1, cs).GetTensorMutableData<T>(), ctx.GetOutput(2, cs).GetTensorMutableData<T>()};
    const T* past[2] = {kc.GetTensorData<T>(), vc.GetTensorData<T>()};
    const T* fresh[2] = {kv.GetTensorData<T>(), vv.GetTensorData<T>()};
    const int64_t row = S * hd;
    for (int c = 0; c < 2; ++c) {
      if (caches[c] != past[c]) std::memcpy(caches[c], past[c], sizeof(T) * B * KV * row);  // not aliased
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < KV; ++h)
          std::memcpy(caches[c] + (b * KV + h) * row + pos[b] * hd, fresh[c] + (b * KV + h) * hd, sizeof(T) * hd);
    }
    const float scale = scale_ != 0.f ? scale_ : 1.f / std::sqrt(static_cast<float>(hd));
    const int64_t group = H / KV;
    std::vector<float> qf(hd), p, acc(hd);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = pos[b] + 1;
      p.resize(n);
      for (int64_t h = 0; h < H; ++h) {
        const T* K = caches[0] + (b * KV + h / group) * row;
        const T* V = caches[1] + (b * KV + h / group) * row;
        for (int64_t i = 0; i < hd; ++i) qf[i] = Widen(q[(b * H + h) * hd + i]);
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < n; ++s) {
          float dot = 0.f;
          for (int64_t i = 0; i < hd; ++i) dot += qf[i] * Widen(K[s * hd + i]);
          p[s] = dot * scale;
          top = std::max(top, p[s]);
        }
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t s = 0; s < n; ++s) {
          const float w = std::exp(p[s] - top);
          total += w;
          for (int64_t i = 0; i < hd; ++i) acc[i] += w * Widen(V[s * hd + i]);
        }
        for (int64_t i = 0; i < hd; ++i) out[(b * H + h) * hd + i] = Narrow<T>(acc[i] / total);
      }
    }
  }
};

// --- SparseLinear: x (rows, K), weight (N, K), bias (N) -> y (rows, N) = s(x) W^T + b (kernels/sparse_gemv.py
// sparse_linear_ref). s(x) = (x - mode) where |x - mode| > threshold, rounded to T, as the reference. Per row, the kept
// features are listed first; every output then reads only those weight columns: a dropped activation's weights are
// never loaded (SCAP's saving; the weight stays (N, K), the layout prefill shares). fp32 accumulation, y rounded once.
template <typename T>
struct SparseLinearKernel {
  float mode_, threshold_;
  explicit SparseLinearKernel(const OrtKernelInfo* info)
      : mode_(Attr(info, op::SparseLinear::mode)), threshold_(Attr(info, op::SparseLinear::threshold)) {}
  void Compute(OrtKernelContext* raw) {
    Ort::KernelContext ctx(raw);
    In xi = input(ctx, 0), wi = input(ctx, 1), bi = input(ctx, 2);
    const auto dims = mambadeploy_ort::CheckInputShapes<op::SparseLinear>(xi, wi, bi);
    const int64_t rows = dims.rows, K = dims.K, N = dims.N;
    const T* x = ctx.GetInput(0).GetTensorData<T>();
    const T* W = ctx.GetInput(1).GetTensorData<T>();
    const T* bias = bi.data ? ctx.GetInput(2).GetTensorData<T>() : nullptr;
    T* y = ctx.GetOutput(0, {rows, N}).GetTensorMutableData<T>();
    std::vector<int64_t> kept;
    std::vector<float> value;
    kept.reserve(K), value.reserve(K);
    for (int64_t r = 0; r < rows; ++r) {
      kept.clear(), value.clear();
      for (int64_t k = 0; k < K; ++k) {
        const float c = Widen(x[r * K + k]) - mode_;
        if (std::fabs(c) > threshold_) kept.push_back(k), value.push_back(Widen(Narrow<T>(c)));
      }
      for (int64_t n = 0; n < N; ++n) {
        const T* w = W + n * K;
        float acc = 0.f;
        for (size_t j = 0; j < kept.size(); ++j) acc += value[j] * Widen(w[kept[j]]);
        if (bias) acc += Widen(bias[n]);
        y[r * N + n] = Narrow<T>(acc);
      }
    }
  }
};

// fp32 CPU kernels: the registry's "T" inputs are float32 here
RegistryOp<op::CausalConv1dUpdate, ConvUpdateKernel, kF32> g_conv_update;
RegistryOp<op::SelectiveStateUpdate, StateUpdateKernel, kF32> g_state_update;
RegistryOp<op::AddRMSNorm, AddNormKernel, kF32> g_add_norm;
RegistryOp<op::RoutedMoE, MoEKernel, kF32> g_moe;
// DecodeAttention moves whole KV caches: it runs in the cache's own dtype (fp16/bf16 caches are not widened to fp32)
RegistryOp<op::DecodeAttention, DecodeAttentionKernel<float>, kF32> g_attention_f32;
RegistryOp<op::DecodeAttention, DecodeAttentionKernel<Ort::Float16_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>
    g_attention_f16;
RegistryOp<op::DecodeAttention, DecodeAttentionKernel<Ort::BFloat16_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>
    g_attention_bf16;
RegistryOp<op::SparseLinear, SparseLinearKernel<float>, kF32> g_sparse_linear_f32;
RegistryOp<op::SparseLinear, SparseLinearKernel<Ort::Float16_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16>
    g_sparse_linear_f16;
RegistryOp<op::SparseLinear, SparseLinearKernel<Ort::BFloat16_t>, ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16>
    g_sparse_linear_bf16;

}  // namespace

namespace mambadeploy_ort {
void AddCpuDecodeOps(Ort::CustomOpDomain& domain) {
  domain.Add(&g_conv_update);
  domain.Add(&g_state_update);
  domain.Add(&g_add_norm);
  domain.Add(&g_moe);
  domain.Add(&g_attention_f32);
  domain.Add(&g_attention_f16);
  domain.Add(&g_attention_bf16);
  domain.Add(&g_sparse_linear_f32);
  domain.Add(&g_sparse_linear_f16);
  domain.Add(&g_sparse_linear_bf16);
}
}  // namespace mambadeploy_ort
