// GENERATED from mambadeploy/opset.py by `python -m mambadeploy.plugins.ort.gen_opset`: do not edit by hand.
// One struct per registry op: name, version, signature strings (one letter per input/output: T = the model
// dtype, F = float32, I = int64; a lower-case letter marks an optional input), attributes with defaults, and
// each input's symbolic shape (a dim: a name, 2F = twice F, *rows = any leading dims) with the Dims they
// bind.
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

// SelectiveScan(u (b, d, L), delta (b, d, L), A (d, N), B (b, N, L), C (b, N, L), D (d), z (b, d, L), delta_bias (d),
//   initial_state (b, d, N)) -> (y (b, d, L), last_state (b, d, N))
struct SelectiveScan {
  static constexpr const char* kName = "SelectiveScan";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTFTTtttf";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 9, kNumOutputs = 2;
  static constexpr IntAttr delta_softplus{"delta_softplus", 1};
  static constexpr const char* kInputNames[] = {"u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"};
  static constexpr const char* kInputShapes[] = {"b d L", "b d L", "d N", "b N L", "b N L", "d", "b d L", "d", "b d N"};
  static constexpr const char* kDimNames[] = {"b", "d", "L", "N"};
  static constexpr size_t kNumDims = 4;
  struct Dims { int64_t b, d, L, N; };
  static Dims Named(const int64_t* v) { return {v[0], v[1], v[2], v[3]}; }
};

// CausalConv1d(x (b, d, L), weight (d, K), bias (d), initial_state (b, d, K)) -> (y (b, d, L), final_state (b, d, K))
struct CausalConv1d {
  static constexpr const char* kName = "CausalConv1d";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTtf";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 4, kNumOutputs = 2;
  static constexpr IntAttr activation{"activation", 1};
  static constexpr const char* kInputNames[] = {"x", "weight", "bias", "initial_state"};
  static constexpr const char* kInputShapes[] = {"b d L", "d K", "d", "b d K"};
  static constexpr const char* kDimNames[] = {"b", "d", "L", "K"};
  static constexpr size_t kNumDims = 4;
  struct Dims { int64_t b, d, L, K; };
  static Dims Named(const int64_t* v) { return {v[0], v[1], v[2], v[3]}; }
};

// TopKExpertGather(x (T, d), w1 (E, 2F, d), w2 (E, d, F), experts (T, k), weights (T, k)) -> (y (T, d))
struct TopKExpertGather {
  static constexpr const char* kName = "TopKExpertGather";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTTIF";
  static constexpr const char* kOutputs = "T";
  static constexpr size_t kNumInputs = 5, kNumOutputs = 1;
  static constexpr IntAttr activation{"activation", 0};
  static constexpr IntAttr top_k{"top_k", 1};
  static constexpr const char* kInputNames[] = {"x", "w1", "w2", "experts", "weights"};
  static constexpr const char* kInputShapes[] = {"T d", "E 2F d", "E d F", "T k", "T k"};
  static constexpr const char* kDimNames[] = {"T", "d", "E", "F", "k"};
  static constexpr size_t kNumDims = 5;
  struct Dims { int64_t T, d, E, F, k; };
  static Dims Named(const int64_t* v) { return {v[0], v[1], v[2], v[3], v[4]}; }
};

// CausalConv1dUpdate(x (b, d), conv_state (b, d, K), weight (d, K), bias (d)) -> (y (b, d), new_state (b, d, K))
struct CausalConv1dUpdate {
  static constexpr const char* kName = "CausalConv1dUpdate";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TFTt";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 4, kNumOutputs = 2;
  static constexpr IntAttr activation{"activation", 1};
  static constexpr const char* kInputNames[] = {"x", "conv_state", "weight", "bias"};
  static constexpr const char* kInputShapes[] = {"b d", "b d K", "d K", "d"};
  static constexpr const char* kDimNames[] = {"b", "d", "K"};
  static constexpr size_t kNumDims = 3;
  struct Dims { int64_t b, d, K; };
  static Dims Named(const int64_t* v) { return {v[0], v[1], v[2]}; }
};

// SelectiveStateUpdate(state (b, d, N), x (b, d), dt (b, d), A (d, N), B (b, N), C (b, N), D (d), z (b, d), dt_bias
//   (d)) -> (y (b, d), new_state (b, d, N))
struct SelectiveStateUpdate {
  static constexpr const char* kName = "SelectiveStateUpdate";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "FTTFTTttt";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 9, kNumOutputs = 2;
  static constexpr IntAttr dt_softplus{"dt_softplus", 1};
  static constexpr const char* kInputNames[] = {"state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias"};
  static constexpr const char* kInputShapes[] = {"b d N", "b d", "b d", "d N", "b N", "b N", "d", "b d", "d"};
  static constexpr const char* kDimNames[] = {"b", "d", "N"};
  static constexpr size_t kNumDims = 3;
  struct Dims { int64_t b, d, N; };
  static Dims Named(const int64_t* v) { return {v[0], v[1], v[2]}; }
};

// AddRMSNorm(x (*rows, d), residual (*rows, d), weight (d)) -> (y (*rows, d), residual_out (*rows, d))
struct AddRMSNorm {
  static constexpr const char* kName = "AddRMSNorm";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TFT";
  static constexpr const char* kOutputs = "TF";
  static constexpr size_t kNumInputs = 3, kNumOutputs = 2;
  static constexpr FloatAttr epsilon{"epsilon", 1e-05f};
  static constexpr const char* kInputNames[] = {"x", "residual", "weight"};
  static constexpr const char* kInputShapes[] = {"*rows d", "*rows d", "d"};
  static constexpr const char* kDimNames[] = {"rows", "d"};
  static constexpr size_t kNumDims = 2;
  struct Dims { int64_t rows, d; };
  static Dims Named(const int64_t* v) { return {v[0], v[1]}; }
};

// RoutedMoE(x (T, d), router_weight (E, d), router_bias (E), w1 (E, 2F, d), w2 (E, d, F)) -> (y (T, d))
struct RoutedMoE {
  static constexpr const char* kName = "RoutedMoE";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTtTT";
  static constexpr const char* kOutputs = "T";
  static constexpr size_t kNumInputs = 5, kNumOutputs = 1;
  static constexpr IntAttr router{"router", 0};
  static constexpr IntAttr top_k{"top_k", 1};
  static constexpr IntAttr activation{"activation", 0};
  static constexpr const char* kInputNames[] = {"x", "router_weight", "router_bias", "w1", "w2"};
  static constexpr const char* kInputShapes[] = {"T d", "E d", "E", "E 2F d", "E d F"};
  static constexpr const char* kDimNames[] = {"T", "d", "E", "F"};
  static constexpr size_t kNumDims = 4;
  struct Dims { int64_t T, d, E, F; };
  static Dims Named(const int64_t* v) { return {v[0], v[1], v[2], v[3]}; }
};

// DecodeAttention(q (B, H, hd), k (B, KV, hd), v (B, KV, hd), key_cache (B, KV, S, hd), value_cache (B, KV, S, hd), pos
//   (B)) -> (out (B, H, hd), present_key (B, KV, S, hd), present_value (B, KV, S, hd))
struct DecodeAttention {
  static constexpr const char* kName = "DecodeAttention";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTTTTI";
  static constexpr const char* kOutputs = "TTT";
  static constexpr size_t kNumInputs = 6, kNumOutputs = 3;
  static constexpr FloatAttr scale{"scale", 0.0f};
  static constexpr const char* kInputNames[] = {"q", "k", "v", "key_cache", "value_cache", "pos"};
  static constexpr const char* kInputShapes[] = {"B H hd", "B KV hd", "B KV hd", "B KV S hd", "B KV S hd", "B"};
  static constexpr const char* kDimNames[] = {"B", "H", "hd", "KV", "S"};
  static constexpr size_t kNumDims = 5;
  struct Dims { int64_t B, H, hd, KV, S; };
  static Dims Named(const int64_t* v) { return {v[0], v[1], v[2], v[3], v[4]}; }
};

// SparseLinear(x (rows, K), weight (N, K), bias (N)) -> (y (rows, N))
struct SparseLinear {
  static constexpr const char* kName = "SparseLinear";
  static constexpr int kVersion = 1;
  static constexpr const char* kInputs = "TTt";
  static constexpr const char* kOutputs = "T";
  static constexpr size_t kNumInputs = 3, kNumOutputs = 1;
  static constexpr FloatAttr mode{"mode", 0.0f};
  static constexpr FloatAttr threshold{"threshold", 0.0f};
  static constexpr const char* kInputNames[] = {"x", "weight", "bias"};
  static constexpr const char* kInputShapes[] = {"rows K", "N K", "N"};
  static constexpr const char* kDimNames[] = {"rows", "K", "N"};
  static constexpr size_t kNumDims = 3;
  struct Dims { int64_t rows, K, N; };
  static Dims Named(const int64_t* v) { return {v[0], v[1], v[2]}; }
};

}  // namespace mambadeploy_opset
