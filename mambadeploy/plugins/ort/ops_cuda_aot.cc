// The AOT launches of ops_cuda_aot.h. Launch geometry follows the kernels' Python launchers (kernels/moe_experts.py
// `_grouped_gemm`, kernels/selective_scan.py `selective_scan`); the tiles come from the registered variant's metadata,
// chosen in Python by the same launch_config torch-fast uses.
#include "ops_cuda_aot.h"

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "aot_launch.h"

namespace mambadeploy_ort_cuda {
namespace {

using mambadeploy_aot::Find;
using mambadeploy_aot::Key;
using mambadeploy_aot::Launch;
using mambadeploy_aot::Meta;

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align256(size_t n) { return (n + 255) / 256 * 256; }

// The kernels were compiled with every pointer marked 16-byte aligned (aot_table.compile_spec)
bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16) return false;
  return true;
}

void check(const char* error, const char* op) {
  if (error) ORT_CXX_API_THROW(std::string(op) + ": AOT kernel launch failed: " + error, ORT_RUNTIME_EXCEPTION);
}

}  // namespace

const char* DtypeName(DType t) {
  return t == DType::kFloat32 ? "fp32" : t == DType::kFloat16 ? "fp16" : "bf16";
}

bool AotGroupedMoE(Ort::KernelContext& ctx, int device, DType t, const AotMoEArgs& a, void* stream, const char* op) {
  const int64_t P = a.T * a.k;
  if (P <= 0 || P >= (int64_t(1) << 31)) return false;
  const char* dt = DtypeName(t);
  const auto* fc1 = Find(Key("moe.fc1", dt, {{"E", a.E}, {"F", a.F}, {"act", a.activation}, {"d", a.d},
                                            {"k", a.k}}), P);
  const auto* fc2 = Find(Key("moe.fc2", dt, {{"E", a.E}, {"F", a.F}, {"d", a.d}, {"k", a.k}}), P);
  const auto* align = Find(Key(a.experts_int64 ? "moe.align.i64" : "moe.align.i32", "-", {{"E", a.E}}), P);
  const auto* sum = a.k > 1 ? Find(Key("moe.sum", dt, {{"d", a.d}, {"k", a.k}}), P) : nullptr;
  if (!fc1 || !fc2 || !align || (a.k > 1 && !sum) || !aligned16({a.x, a.w1, a.w2, a.experts, a.weights, a.y})) {
    mambadeploy_aot::CountFallback();
    return false;
  }
  const int64_t bm = Meta(fc1, "BLOCK_M");
  if (Meta(align, "BLOCK_M") != bm || Meta(fc2, "BLOCK_M") != bm) {
    mambadeploy_aot::CountFallback();
    return false;
  }
  const int64_t n_blocks = cdiv(P, bm) + a.E;  // the static upper bound moe_align fills (padding blocks do nothing)
  const size_t elem = t == DType::kFloat32 ? 4 : 2;
  const size_t b_sorted = align256(size_t(n_blocks * bm) * 4), b_block = align256(size_t(n_blocks) * 4);
  const size_t b_h = align256(size_t(P * a.F) * elem), b_rows = a.k > 1 ? size_t(P * a.d) * 4 : 0;
  DeviceScratch scratch(ctx, device, b_sorted + b_block + b_h + b_rows, op);
  char* base = static_cast<char*>(scratch.ptr);
  void* sorted = base;
  void* block_expert = base + b_sorted;
  void* h = base + b_sorted + b_block;
  void* out = a.k > 1 ? static_cast<void*>(base + b_sorted + b_block + b_h) : a.y;  // top-k: fp32 (P, d) rows
  const void *x = a.x, *w1 = a.w1, *w2 = a.w2, *experts = a.experts, *weights = a.weights;
  void* y = a.y;
  int32_t p32 = int32_t(P), nb32 = int32_t(n_blocks), t32 = int32_t(a.T);
  check(Launch(align, 1, 1, 1, {&experts, &sorted, &block_expert, &p32, &nb32}, stream), op);
  check(Launch(fc1, unsigned(n_blocks), unsigned(cdiv(a.F, Meta(fc1, "BLOCK_N"))), 1,
               {&x, &w1, &sorted, &block_expert, &h, &p32}, stream), op);
  check(Launch(fc2, unsigned(n_blocks), unsigned(cdiv(a.d, Meta(fc2, "BLOCK_N"))), 1,
               {&h, &w2, &sorted, &block_expert, &weights, &out, &p32}, stream), op);
  if (a.k > 1)
    check(Launch(sum, unsigned(a.T), unsigned(cdiv(a.d, Meta(sum, "BLOCK"))), 1, {&out, &y, &t32}, stream), op);
  return true;
}

bool AotSelectiveScan(Ort::KernelContext& ctx, int device, DType t, const AotScanArgs& a, void* stream) {
  const char* op = mambadeploy_opset::SelectiveScan::kName;
  if (a.L <= 0 || a.batch * a.dim * a.L >= (int64_t(1) << 40)) return false;
  const mambadeploy_aot::Dims dims{{"D", a.D != nullptr}, {"N", a.N}, {"bias", a.delta_bias != nullptr},
                                   {"h0", a.initial_state != nullptr}, {"softplus", a.softplus}, {"z", a.z != nullptr}};
  const auto* out_pass = Find(Key("scan.out", DtypeName(t), dims), a.L);
  const auto* state_pass = Find(Key("scan.state", DtypeName(t), dims), a.L);
  const auto* fold = Find(Key("scan.fold", "-", {{"N", a.N}, {"h0", a.initial_state != nullptr}}), a.L);
  if (!out_pass || !state_pass || !fold ||
      !aligned16({a.u, a.delta, a.B, a.C, a.D, a.z, a.delta_bias, a.A, a.initial_state, a.y, a.last_state})) {
    mambadeploy_aot::CountFallback();
    return false;
  }
  const int64_t seg_len = Meta(out_pass, "seg_len"), n_seg = cdiv(a.L, seg_len);
  const int64_t block_d = Meta(out_pass, "BLOCK_D"), block_n = Meta(out_pass, "BLOCK_N");
  const size_t b_hseg = align256(size_t(a.batch * n_seg * a.dim * block_n) * 4);
  DeviceScratch scratch(ctx, device, n_seg > 1 ? b_hseg + size_t(a.batch * n_seg * a.dim) * 4 : 0, op);
  // a left-out optional input is never read (its HAS_ flag is off in the compiled variant): any valid pointer will do
  const void *u = a.u, *delta = a.delta, *A = a.A, *B = a.B, *C = a.C;
  const void *D = a.D ? a.D : a.u, *z = a.z ? a.z : a.u, *bias = a.delta_bias ? a.delta_bias : a.u;
  const void* h0 = a.initial_state ? static_cast<const void*>(a.initial_state) : a.u;
  void *y = a.y, *h_last = a.last_state;
  void* hseg = n_seg > 1 ? scratch.ptr : h_last;  // one segment: never read
  void* dseg = n_seg > 1 ? static_cast<char*>(scratch.ptr) + b_hseg : static_cast<void*>(h_last);
  int32_t dim = int32_t(a.dim), L = int32_t(a.L), seg = int32_t(seg_len), nseg = int32_t(n_seg);
  std::vector<void*> args{&u, &delta, &A, &B, &C, &D, &z, &bias, &h0, &y, &h_last, &hseg, &dseg, &dim, &L, &seg, &nseg};
  const unsigned gb = unsigned(a.batch), gd = unsigned(cdiv(a.dim, block_d));
  if (n_seg > 1) {
    check(Launch(state_pass, gb, gd, unsigned(n_seg - 1), args, stream), op);
    check(Launch(fold, gb, unsigned(cdiv(a.dim * block_n, Meta(fold, "BLOCK"))), 1, {&A, &h0, &hseg, &dseg, &dim, &nseg},
                 stream), op);
  }
  check(Launch(out_pass, gb, gd, unsigned(n_seg), args, stream), op);
  return true;
}

bool AotCausalConv1d(DType t, const mambadeploy_cuda::ConvArgs& a, void* stream) {
  if (a.L <= 0 || a.batch * a.dim == 0) return false;
  const auto* conv = Find(Key("conv", DtypeName(t), {{"K", a.K}, {"bias", a.bias != nullptr},
                                                    {"init", a.initial_state != nullptr}, {"silu", a.silu}}), a.L);
  if (!conv || !aligned16({a.x, a.weight, a.bias, a.initial_state, a.y, a.final_state})) {
    mambadeploy_aot::CountFallback();
    return false;
  }
  const void *x = a.x, *w = a.weight, *bias = a.bias ? a.bias : a.x;  // a left-out input is never read
  const void* init = a.initial_state ? static_cast<const void*>(a.initial_state) : a.x;
  void *y = a.y, *fin = a.final_state;
  int32_t dim = int32_t(a.dim), L = int32_t(a.L);
  check(Launch(conv, unsigned(a.batch), unsigned(cdiv(a.dim, Meta(conv, "BLOCK_D"))),
               unsigned(cdiv(a.L, Meta(conv, "BLOCK_L"))), {&x, &w, &bias, &init, &y, &fin, &dim, &L}, stream),
        mambadeploy_opset::CausalConv1d::kName);
  return true;
}

bool AotDecodeAttention(Ort::KernelContext& ctx, int device, DType t, const AotAttentionArgs& a, void* stream) {
  const char* op = mambadeploy_opset::DecodeAttention::kName;
  const char* dt = DtypeName(t);
  const auto* write = Find(Key("attn.write", dt, {{"hd", a.hd}}), 1);
  const auto* split = Find(Key("attn.split", dt, {{"G", a.H / a.KV}, {"hd", a.hd}}), 1);
  if (!write || !split || !aligned16({a.q, a.k, a.v, a.pos, a.out, a.present_key, a.present_value})) {
    mambadeploy_aot::CountFallback();
    return false;
  }
  // kernels/decode_attention.launch_config: the splits follow the shapes only (never the fill)
  const int64_t block_n = Meta(split, "BLOCK_N"), target = Meta(split, "TARGET_PROGRAMS");
  int64_t splits = std::min(Meta(split, "MAX_SPLITS"), target / std::max<int64_t>(a.B * a.KV, 1));
  splits = std::max<int64_t>(1, std::min(splits, cdiv(a.S, block_n)));
  const auto* combine = Find(Key("attn.combine", dt, {{"hd", a.hd}}), splits);
  if (!combine) {
    mambadeploy_aot::CountFallback();
    return false;
  }
  const size_t b_len = align256(size_t(a.B) * 4), b_lse = align256(size_t(a.B * a.H * splits) * 4);
  DeviceScratch scratch(ctx, device, b_len + b_lse + size_t(a.B * a.H * splits * a.hd) * 4, op);
  void* lengths = scratch.ptr;
  void* lse = static_cast<char*>(scratch.ptr) + b_len;
  void* part = static_cast<char*>(scratch.ptr) + b_len + b_lse;
  const void *q = a.q, *k = a.k, *v = a.v, *pos = a.pos;
  void *out = a.out, *pk = a.present_key, *pv = a.present_value;
  int32_t kv = int32_t(a.KV), slots = int32_t(a.S), n_splits = int32_t(splits);
  float scale = a.scale;
  check(Launch(write, unsigned(a.B), unsigned(a.KV), 1, {&k, &v, &pos, &kv, &slots, &pk, &pv, &lengths}, stream), op);
  check(Launch(split, unsigned(a.B), unsigned(a.KV), unsigned(splits),
               {&q, &pk, &pv, &lengths, &kv, &slots, &n_splits, &scale, &part, &lse}, stream), op);
  check(Launch(combine, unsigned(a.B), unsigned(a.H), 1, {&part, &lse, &n_splits, &out}, stream), op);
  return true;
}

}  // namespace mambadeploy_ort_cuda
