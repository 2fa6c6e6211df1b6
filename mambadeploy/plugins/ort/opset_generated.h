// GENERATED from mambadeploy/opset.py by `python -m mambadeploy.plugins.ort.gen_opset`: do not edit by hand.
// One struct per registry op: name, version, signature strings (one letter per input/output: T = the model
// dtype, F = float32, I = int64; a lower-case letter marks an optional input) and attributes with defaults.
#pragma once

#include <cstddef>
#include <cstdint>

namespace mambadeploy_opset {

constexpr const char* kDomain = "mambadeploy";

struct IntAttr {
  const char* name;
  int64_t fallback;  // the registry default, used when a node leaves the attribute out
};
struct FloatAttr {
  const char* name;
  float fallback;
};

// SelectiveScan(u, delta, A, B, C, D, z, delta_bias, initial_state) -> (y, last_state)
struct SelectiveScan {
  static constexpr const char* kName = "SelectiveScan";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTFTTtttf";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 9, kNumOutputs = 2;
  static constexpr IntAttr delta_softplus{"delta_softplus", 1};
};

// CausalConv1d(x, weight, bias, initial_state) -> (y, final_state)
struct CausalConv1d {
  static constexpr const char* kName = "CausalConv1d";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTtf";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 4, kNumOutputs = 2;
  static constexpr IntAttr activation{"activation", 1};
};

// TopKExpertGather(x, w1, w2, experts, weights) -> (y)
struct TopKExpertGather {
  static constexpr const char* kName = "TopKExpertGather";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTTIF";
  static constexpr const char* kOutputs = "T";
  static constexpr size_t kNumInputs = 5, kNumOutputs = 1;
  static constexpr IntAttr activation{"activation", 0};
  static constexpr IntAttr top_k{"top_k", 1};
};

// CausalConv1dUpdate(x, conv_state, weight, bias) -> (y, new_state)
struct CausalConv1dUpdate {
  static constexpr const char* kName = "CausalConv1dUpdate";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TFTt";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 4, kNumOutputs = 2;
  static constexpr IntAttr activation{"activation", 1};
};

// SelectiveStateUpdate(state, x, dt, A, B, C, D, z, dt_bias) -> (y, new_state)
struct SelectiveStateUpdate {
  static constexpr const char* kName = "SelectiveStateUpdate";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "FTTFTTttt";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 9, kNumOutputs = 2;
  static constexpr IntAttr dt_softplus{"dt_softplus", 1};
};

// AddRMSNorm(x, residual, weight) -> (y, residual_out)
struct AddRMSNorm {
  static constexpr const char* kName = "AddRMSNorm";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TFT";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 3, kNumOutputs = 2;
  static constexpr FloatAttr epsilon{"epsilon", 1e-05f};
};

// RoutedMoE(x, router_weight, router_bias, w1, w2) -> (y)
struct RoutedMoE {
  static constexpr const char* kName = "RoutedMoE";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTtTT";
  static constexpr const char* kOutputs = "T";
  static constexpr size_t kNumInputs = 5, kNumOutputs = 1;
  static constexpr IntAttr router{"router", 0};
  static constexpr IntAttr top_k{"top_k", 1};
  static constexpr IntAttr activation{"activation", 0};
};

// DecodeAttention(q, k, v, key_cache, value_cache, pos) -> (out, present_key, present_value)
struct DecodeAttention {
  static constexpr const char* kName = "DecodeAttention";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTTTTI";
  static constexpr const char* kOutputs = "TTT";
  static constexpr size_t kNumInputs = 6, kNumOutputs = 3;
  static constexpr FloatAttr scale{"scale", 0.0f};
};

}  // namespace mambadeploy_opset
