// Shared declarations of the mambadeploy ORT custom-op library: the ORT C++ API (initialised by register.cc from the
// OrtApiBase ORT hands over) and the functions that add each build's kernels to the "mambadeploy" domain.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <array>
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
// Shape checks shared by the CPU and CUDA kernels, from the registry's symbolic shapes (opset.py `shapes`, written into
// opset_generated.h): no op's shape rule is restated here. An optional input that was left out is passed as nullptr.
using Shape = std::vector<int64_t>;

namespace detail {
inline std::string ShapeText(const Shape& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
}

// Binds one present input's dims (the same rules as op_shapes.resolve): `spec` is its symbolic shape, space-separated
// dims "name", "2F" (an integer factor) or "*name" (first only: any number of leading dims, equal across inputs,
// sized by their product). sizes[i] < 0: dim i not bound yet.
inline void BindShape(const char* op, const char* input, const char* spec, const char* const* dim_names, size_t n_dims,
                      const Shape& shape, int64_t* sizes, Shape& lead, bool& lead_bound) {
  struct Dim { bool variadic; int64_t factor; size_t index; };
  std::vector<Dim> dims;
  const std::string text(spec);
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find(' ', at);
    if (end == std::string::npos) end = text.size();
    std::string token = text.substr(at, end - at);
    at = end + 1;
    Dim dim{false, 1, n_dims};
    if (token[0] == '*') dim.variadic = true, token.erase(0, 1);
    size_t digits = 0;
    while (digits < token.size() && token[digits] >= '0' && token[digits] <= '9') ++digits;
    if (digits) dim.factor = std::stoll(token.substr(0, digits)), token.erase(0, digits);
    for (size_t i = 0; i < n_dims; ++i)
      if (token == dim_names[i]) dim.index = i;
    Require(dim.index < n_dims, std::string(op) + ": input " + input + ": dim " + token + " is not the op's");
    dims.push_back(dim);
  }
  const bool variadic = !dims.empty() && dims[0].variadic;
  const size_t fixed = dims.size() - (variadic ? 1 : 0);
  const auto wrong = [&] {
    std::string bound;
    for (size_t i = 0; i < n_dims; ++i)
      if (sizes[i] >= 0)
        bound += std::string(bound.empty() ? " with " : ", ") + dim_names[i] + "=" + std::to_string(sizes[i]);
    std::string want(spec);
    for (size_t at = want.find(' '); at != std::string::npos; at = want.find(' ', at + 2)) want.replace(at, 1, ", ");
    return std::string(op) + ": input " + input + " has shape " + ShapeText(shape) + ", not (" + want + ")" + bound;
  };
  Require(variadic ? shape.size() >= fixed : shape.size() == fixed, wrong());
  const size_t n_lead = shape.size() - fixed;
  if (variadic) {
    const Shape seq(shape.begin(), shape.begin() + n_lead);
    Require(!lead_bound || seq == lead, wrong());
    lead = seq, lead_bound = true;
    int64_t product = 1;
    for (int64_t v : seq) product *= v;
    sizes[dims[0].index] = product;
  }
  for (size_t j = 0; j < fixed; ++j) {
    const Dim& dim = dims[j + (variadic ? 1 : 0)];
    const int64_t size = shape[n_lead + j];
    if (sizes[dim.index] < 0 && size % dim.factor == 0) sizes[dim.index] = size / dim.factor;
    Require(sizes[dim.index] * dim.factor == size, wrong());
  }
}
}  // namespace detail

// The dims of registry op `Spec` (a struct of opset_generated.h) bound from its inputs' shapes, in input order
// (nullptr: an absent optional input); throws naming the first input whose shape breaks the entry's symbolic shapes.
template <typename Spec>
typename Spec::Dims CheckShapes(const std::array<const Shape*, Spec::kNumInputs>& inputs) {
  int64_t sizes[Spec::kNumDims];
  std::fill(sizes, sizes + Spec::kNumDims, int64_t(-1));
  Shape lead;
  bool lead_bound = false;
  for (size_t i = 0; i < Spec::kNumInputs; ++i) {
    if (!inputs[i]) {
      Require(Spec::kInputs[i] & 0x20, std::string(Spec::kName) + ": input " + Spec::kInputNames[i] + " is required");
      continue;
    }
    detail::BindShape(Spec::kName, Spec::kInputNames[i], Spec::kInputShapes[i], Spec::kDimNames, Spec::kNumDims,
                      *inputs[i], sizes, lead, lead_bound);
  }
  for (size_t i = 0; i < Spec::kNumDims; ++i)  // the registry test guarantees required inputs bind every dim
    Require(sizes[i] >= 0, std::string(Spec::kName) + ": dim " + Spec::kDimNames[i] + " is bound by no input");
  return Spec::Named(sizes);
}

// CheckShapes over kernel inputs that carry `.data` (nullptr when left out) and `.shape`.
template <typename Spec, typename... In>
typename Spec::Dims CheckInputShapes(const In&... in) {
  static_assert(sizeof...(In) == Spec::kNumInputs, "pass every input of the op, in order");
  return CheckShapes<Spec>({(in.data ? &in.shape : static_cast<const Shape*>(nullptr))...});
}
}  // namespace mambadeploy_ort
