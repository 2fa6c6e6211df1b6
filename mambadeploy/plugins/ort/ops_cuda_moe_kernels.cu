// CUDA kernels of the RoutedMoE ORT op (its hand-written path: batch-1 top-1, and the fallback when no AOT Triton
// kernel is registered, ops_cuda_aot.cc): the math of models/ref_ops.routed_moe_ref, fp32 inside for every dtype.
//   (1) a block per token computes the router logits (rounded to T, as the model's Linear gives them) and picks its
//   experts; (2) fc1 and (3) fc2 run on a grid of (row blocks, distinct chosen experts): each block lists the
//   (token, slot) pairs that chose its expert, and each warp streams a weight row of that expert with 16-byte loads,
//   dotting it with the expert's pairs (kPairChunk at a time). So every chosen expert's weights are read in place — no
//   gathered copy — once per step at batch 1. (4) k > 1: a combine sums each token's k rows, weighted, in slot order.
//   A tensor-core (wmma m8n32k16) path for experts with many pairs was measured slower on the H200 (batch 64 1.5b: 4.61
//   against 3.98 ms a step; see benchmarks/HISTORY.md) and removed.
#include "ops_cuda_kernels.h"
#include "ops_cuda_math.cuh"

#include <algorithm>

namespace mambadeploy_cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------------------ RoutedMoE
constexpr int kRowsPerWarp = 1, kRowsPerBlock = kWarps * kRowsPerWarp, kPairChunk = 4;

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements in one 16-byte load

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_f(e[i]);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// acc_r[p] += <rows[r], vs[p]> over n elements for R weight rows and np (<= P) vectors, lane-strided; VEC: 16-byte
// loads (n a multiple of kVec and every pointer 16-byte aligned, checked by the launcher), kUnroll of them per row in
// flight before any is used (a GEMV at batch 1 is bound by the loads in flight). Sums are per lane.
constexpr int kUnroll = 4;

template <typename T, bool VEC, int R, int P>
__device__ __forceinline__ void warp_dots(const T* const (&rows)[R], const T* const (&vs)[P], int np, int64_t n,
                                          float (&acc)[R][P]) {
  const int lane = threadIdx.x % 32;
  if constexpr (VEC) {
    constexpr int V = kVec<T>, STEP = 32 * V;
    int64_t i = int64_t(lane) * V;
    for (; i + (kUnroll - 1) * STEP < n; i += kUnroll * STEP) {
      float w[R][kUnroll][V];
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) load_vec(rows[r] + i + u * STEP, w[r][u]);
#pragma unroll
      for (int p = 0; p < P; ++p) {
        if (p >= np) break;
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          float v[V];
          load_vec(vs[p] + i + u * STEP, v);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int j = 0; j < V; ++j) acc[r][p] += w[r][u][j] * v[j];
        }
      }
    }
    for (; i < n; i += STEP) {
      float w[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) load_vec(rows[r] + i, w[r]);
#pragma unroll
      for (int p = 0; p < P; ++p) {
        if (p >= np) break;
        float v[V];
        load_vec(vs[p] + i, v);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[r][p] += w[r][j] * v[j];
      }
    }
  } else {
    for (int64_t i = lane; i < n; i += 32) {
      float w[R];
#pragma unroll
      for (int r = 0; r < R; ++r) w[r] = to_f(rows[r][i]);
#pragma unroll
      for (int p = 0; p < P; ++p) {
        if (p >= np) break;
        const float v = to_f(vs[p][i]);
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][p] += w[r] * v;
      }
    }
  }
}

// The pairs grouped by expert, in global memory (one block; any number of pairs): counts[e], offsets[e] (exclusive
// prefix sum) and sorted[offsets[e] .. + counts[e]) = the pairs of expert e (in no fixed order: each pair's result is
// computed on its own, so the outputs do not depend on it).
__global__ void __launch_bounds__(kThreads) group_kernel(const int* experts, int64_t P, int E, int* counts,
                                                         int* offsets, int* sorted) {
  extern __shared__ int fill[];  // (E): next free slot of each expert
  for (int e = threadIdx.x; e < E; e += kThreads) fill[e] = 0;
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += kThreads) atomicAdd(&fill[experts[p]], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int run = 0;
    for (int e = 0; e < E; ++e) {
      counts[e] = fill[e];
      offsets[e] = run;
      fill[e] = run;
      run += counts[e];
    }
  }
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += kThreads) sorted[atomicAdd(&fill[experts[p]], 1)] = int(p);
}

// Block y of a GEMV grid serves the y-th distinct expert that any pair chose (in expert order): the grid has
// min(E, pairs) rows of blocks, so a batch-1 step launches blocks for its one expert only, not for all E. Returns that
// expert, or -1 (fewer distinct experts than y + 1); `list` and `count` are its pairs.
__device__ int expert_and_pairs(const int* groups, int E, const int*& list, int& count) {
  const int *counts = groups, *offsets = groups + E, *sorted = groups + 2 * E;  // group_kernel's layout
  __shared__ int s_expert;
  if (threadIdx.x == 0) {
    int seen = -1, found = -1;
    for (int e = 0; e < E && found < 0; ++e)
      if (counts[e] && ++seen == int(blockIdx.y)) found = e;
    s_expert = found;
  }
  __syncthreads();
  const int e = s_expert;
  if (e >= 0) {
    list = sorted + offsets[e];
    count = counts[e];
  }
  return e;
}

template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) route_kernel(MoEArgs a, int* experts, float* gates) {
  extern __shared__ float logits[];  // (E)
  const int64_t t = blockIdx.x, d = a.d, E = a.E;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* x = static_cast<const T*>(a.x) + t * d;
  for (int64_t e = warp; e < E; e += kWarps) {
    const T* rows[1] = {static_cast<const T*>(a.router_weight) + e * d};
    const T* vs[1] = {x};
    float acc[1][1] = {{0.f}};
    warp_dots<T, VEC, 1, 1>(rows, vs, 1, d, acc);
    const float s = warp_sum(acc[0][0]);
    const float bias = a.router_bias ? to_f(static_cast<const T*>(a.router_bias)[e]) : 0.f;
    if (lane == 0) logits[e] = to_f(from_f<T>(s + bias));  // logits in x's dtype, as the model's nn.Linear gives them
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  int best = 0;
  for (int e = 1; e < E; ++e)
    if (logits[e] > logits[best]) best = e;  // first maximum, as argmax
  if (a.router == 0) {
    experts[t] = best;
    gates[t] = 1.f / (1.f + expf(-logits[best]));
    return;
  }
  const float top = logits[best];
  float total = 0.f;
  for (int e = 0; e < E; ++e) total += expf(logits[e] - top);
  for (int j = 0; j < a.k; ++j) {  // k largest, ties to the lower expert; chosen ones are marked -inf
    int pick = 0;
    for (int e = 1; e < E; ++e)
      if (logits[e] > logits[pick]) pick = e;
    experts[t * a.k + j] = pick;
    gates[t * a.k + j] = expf(logits[pick] - top) / total;
    logits[pick] = -INFINITY;
  }
}

// fc1: for each pair of expert e and each hidden unit f: h = act(x.gate_f) * (x.up_f), rounded to T like the reference.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) fc1_kernel(MoEArgs a, const int* groups, T* H) {
  const int64_t d = a.d, F = a.F;
  const int* list = nullptr;
  int count = 0;
  const int e = expert_and_pairs(groups, int(a.E), list, count);
  if (e < 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* w1 = static_cast<const T*>(a.w1) + int64_t(e) * 2 * F * d;
  const T* x = static_cast<const T*>(a.x);
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t f = int64_t(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp + r;
    if (f >= F) break;
    const T* rows[2] = {w1 + f * d, w1 + (F + f) * d};
    for (int c0 = 0; c0 < count; c0 += kPairChunk) {
      const int np = min(kPairChunk, count - c0);
      const T* vs[kPairChunk];
      for (int p = 0; p < kPairChunk; ++p) vs[p] = x + (list[c0 + min(p, np - 1)] / a.k) * d;
      float acc[2][kPairChunk] = {};
      warp_dots<T, VEC, 2, kPairChunk>(rows, vs, np, d, acc);
      for (int p = 0; p < np; ++p) {
        const float g = to_f(from_f<T>(warp_sum(acc[0][p]))), u = to_f(from_f<T>(warp_sum(acc[1][p])));
        if (lane == 0) H[int64_t(list[c0 + p]) * F + f] = from_f<T>(to_f(from_f<T>(activate(g, a.activation))) * u);
      }
    }
  }
}

// fc2: y_pair = w2_e . h_pair, rounded to T; k == 1 writes y = gate * y_pair directly, else fp32 rows for the combine.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads) fc2_kernel(MoEArgs a, const int* groups, const float* gates, const T* H,
                                                       float* rows_out) {
  const int64_t d = a.d, F = a.F;
  const int* list = nullptr;
  int count = 0;
  const int e = expert_and_pairs(groups, int(a.E), list, count);
  if (e < 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* w2 = static_cast<const T*>(a.w2) + int64_t(e) * d * F;
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int64_t i = int64_t(blockIdx.x) * kRowsPerBlock + warp * kRowsPerWarp + r;
    if (i >= d) break;
    const T* rows[1] = {w2 + i * F};
    for (int c0 = 0; c0 < count; c0 += kPairChunk) {
      const int np = min(kPairChunk, count - c0);
      const T* vs[kPairChunk];
      for (int p = 0; p < kPairChunk; ++p) vs[p] = H + int64_t(list[c0 + min(p, np - 1)]) * F;
      float acc[1][kPairChunk] = {};
      warp_dots<T, VEC, 1, kPairChunk>(rows, vs, np, F, acc);
      for (int p = 0; p < np; ++p) {
        const float v = to_f(from_f<T>(warp_sum(acc[0][p])));
        const int pair = list[c0 + p];
        if (lane != 0) continue;
        if (a.k == 1)
          static_cast<T*>(a.y)[int64_t(pair) * d + i] = from_f<T>(v * gates[pair]);
        else
          rows_out[int64_t(pair) * d + i] = v;
      }
    }
  }
}

template <typename T>
__global__ void combine_rows_kernel(MoEArgs a, const float* gates, const float* rows) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.tokens * a.d) return;
  const int64_t t = idx / a.d, i = idx % a.d;
  float acc = 0.f;
  for (int64_t j = 0; j < a.k; ++j) acc += rows[(t * a.k + j) * a.d + i] * gates[t * a.k + j];
  static_cast<T*>(a.y)[idx] = from_f<T>(acc);
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

struct MoEWorkspace {
  int* experts;
  float* gates;
  int* groups;  // counts (E), offsets (E), sorted pairs (P)
  void* H;
  float* rows;
};

MoEWorkspace carve(void* base, size_t elem, int64_t P, int64_t E, int64_t F) {
  char* p = static_cast<char*>(base);
  MoEWorkspace w{};
  w.experts = reinterpret_cast<int*>(p);
  p += align256(P * sizeof(int));
  w.gates = reinterpret_cast<float*>(p);
  p += align256(P * sizeof(float));
  w.groups = reinterpret_cast<int*>(p);
  p += align256((2 * E + P) * sizeof(int));
  w.H = p;
  p += align256(P * F * elem);
  w.rows = reinterpret_cast<float*>(p);
  return w;
}

size_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

template <typename T>
void launch_router(const MoEArgs& a, int* experts, float* gates, cudaStream_t s) {
  const size_t logit_bytes = size_t(a.E) * sizeof(float);
  if (a.d % kVec<T> == 0 && aligned16(a.x) && aligned16(a.router_weight))
    route_kernel<T, true><<<unsigned(a.tokens), kThreads, logit_bytes, s>>>(a, experts, gates);
  else
    route_kernel<T, false><<<unsigned(a.tokens), kThreads, logit_bytes, s>>>(a, experts, gates);
}

template <typename T>
void launch_moe(const MoEArgs& a, cudaStream_t s) {
  const int64_t P = a.tokens * a.k;
  const MoEWorkspace w = carve(a.workspace, sizeof(T), P, a.E, a.F);
  const unsigned blocks_y = unsigned(std::min<int64_t>(a.E, P));  // distinct experts chosen: at most this many
  const bool vec1 = a.d % kVec<T> == 0 && aligned16(a.x) && aligned16(a.w1);
  launch_router<T>(a, w.experts, w.gates, s);
  group_kernel<<<1, kThreads, size_t(a.E) * sizeof(int), s>>>(w.experts, P, int(a.E), w.groups, w.groups + a.E,
                                                              w.groups + 2 * a.E);
  const dim3 g1(unsigned(cdiv(a.F, kRowsPerBlock)), blocks_y);
  if (vec1)
    fc1_kernel<T, true><<<g1, kThreads, 0, s>>>(a, w.groups, static_cast<T*>(w.H));
  else
    fc1_kernel<T, false><<<g1, kThreads, 0, s>>>(a, w.groups, static_cast<T*>(w.H));
  const bool vec2 = a.F % kVec<T> == 0 && aligned16(a.w2);
  const dim3 g2(unsigned(cdiv(a.d, kRowsPerBlock)), blocks_y);
  if (vec2)
    fc2_kernel<T, true><<<g2, kThreads, 0, s>>>(a, w.groups, w.gates, static_cast<T*>(w.H), w.rows);
  else
    fc2_kernel<T, false><<<g2, kThreads, 0, s>>>(a, w.groups, w.gates, static_cast<T*>(w.H), w.rows);
  if (a.k > 1)
    combine_rows_kernel<T><<<unsigned(cdiv(a.tokens * a.d, kThreads)), kThreads, 0, s>>>(a, w.gates, w.rows);
}


}  // namespace

size_t MoEWorkspaceBytes(DType t, int64_t tokens, int64_t d, int64_t E, int64_t F, int64_t k) {
  const int64_t P = tokens * k;
  return align256(P * sizeof(int)) + align256(P * sizeof(float)) + align256((2 * E + P) * sizeof(int)) +
         align256(P * F * elem_size(t)) +
         (k > 1 ? align256(P * d * sizeof(float)) : 0);
}

const char* LaunchRoutedMoE(DType t, const MoEArgs& a, void* stream) {
  if (a.tokens == 0) return nullptr;
  return dispatch<MoEArgs, launch_moe<float>, launch_moe<__half>, launch_moe<__nv_bfloat16>>(t, a, stream);
}

const char* LaunchMoERouter(DType t, const MoEArgs& a, int* experts, float* gates, void* stream) {
  if (a.tokens == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (t == DType::kFloat32) launch_router<float>(a, experts, gates, s);
  else if (t == DType::kFloat16) launch_router<__half>(a, experts, gates, s);
  else launch_router<__nv_bfloat16>(a, experts, gates, s);
  return last_error();
}

}  // namespace mambadeploy_cuda
