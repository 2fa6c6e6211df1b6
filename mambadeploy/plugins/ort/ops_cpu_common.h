// Helpers shared by the fp32 CPU kernel files (ops_cpu.cc, ops_cpu_decode.cc): fp32 inputs (an omitted optional input
// is a null pointer), int64 inputs, and the activations of models/ref_ops.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "ops.h"

namespace mambadeploy_ort_cpu {

struct In {
  const float* data = nullptr;  // nullptr: optional input left out
  std::vector<int64_t> shape;
  const std::vector<int64_t>* shape_or_null() const { return data ? &shape : nullptr; }
};

inline In input(Ort::KernelContext& ctx, size_t i) {
  In in;
  if (i >= ctx.GetInputCount()) return in;
  Ort::ConstValue v = ctx.GetInput(i);
  if (!static_cast<const OrtValue*>(v)) return in;
  in.shape = v.GetTensorTypeAndShapeInfo().GetShape();
  in.data = v.GetTensorData<float>();
  return in;
}

inline const int64_t* input_i64(Ort::KernelContext& ctx, size_t i, std::vector<int64_t>& shape) {
  Ort::ConstValue v = ctx.GetInput(i);
  shape = v.GetTensorTypeAndShapeInfo().GetShape();
  return v.GetTensorData<int64_t>();
}

inline float softplus(float x) { return x > 20.f ? x : (x < -15.f ? std::exp(x) : std::log1p(std::exp(x))); }
inline float silu(float x) { return x / (1.f + std::exp(-x)); }
inline float activate(float x, int64_t code) {
  if (code == 0) return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));  // exact GELU
  if (code == 1) return silu(x);
  const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);        // tanh GELU
  return 0.5f * x * (1.f + std::tanh(inner));
}

}  // namespace mambadeploy_ort_cpu
