// CUDA kernels for the mambadeploy ORT custom ops: the math of models/ref_ops.py, fp32 accumulation for every dtype.
//
// SelectiveScan: one block = 8 channels x 16 lanes; a lane holds states n = lane, lane + 16, ... of its channel in
//   registers. Time runs in chunks of 32 steps: the block stages delta (bias + softplus applied), u, B and C of the chunk
//   in shared memory with coalesced loads, walks the chunk step by step (the 16 lanes of a channel sum <h, C> with
//   shuffles), then writes y = (y + D u) silu(z) coalesced.
// CausalConv1d: one thread per output element; the final state (last K inputs) by a second small kernel.
// TopKExpertGather: the (token, slot) pairs are grouped by expert (one block: counts, segments padded to the GEMM tile
//   height, a tile -> expert table of static size cdiv(P, 64) + E), then two tiled GEMMs over the grouped rows — fc1
//   (gate and up together, h = act(gate) * up rounded to T as in the reference) and fc2 (scaled by the routing weight,
//   one fp32 row per pair) — and a combine that sums a token's k rows. Only the chosen experts' weights are read.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "ops_cuda_kernels.h"
#include "ops_cuda_math.cuh"

namespace mambadeploy_cuda {
namespace {

// ------------------------------------------------------------------------------------------------ SelectiveScan
constexpr int kLanes = 16, kChannels = 8, kChunk = 32;

template <typename T, int S>  // S = states per lane (N <= 16 * S)
__global__ void __launch_bounds__(kLanes * kChannels) scan_kernel(ScanArgs a) {
  __shared__ float s_u[kChannels][kChunk], s_dt[kChannels][kChunk], s_y[kChannels][kChunk];
  __shared__ float s_B[kScanMaxState][kChunk + 1], s_C[kScanMaxState][kChunk + 1];  // +1: lanes read down a column
  const int lane = threadIdx.x % kLanes, local = threadIdx.x / kLanes;
  const int64_t b = blockIdx.y, c0 = int64_t(blockIdx.x) * kChannels, c = c0 + local;
  const int64_t dim = a.dim, L = a.L, N = a.N;
  const bool valid = c < dim;
  const T* u = static_cast<const T*>(a.u);
  const T* delta = static_cast<const T*>(a.delta);
  const T* Bm = static_cast<const T*>(a.B);
  const T* Cm = static_cast<const T*>(a.C);
  const T* D = static_cast<const T*>(a.D);
  const T* z = static_cast<const T*>(a.z);
  const T* bias = static_cast<const T*>(a.delta_bias);
  T* y = static_cast<T*>(a.y);

  float A[S], h[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t n = lane + s * kLanes;
    const bool on = valid && n < N;
    A[s] = on ? a.A[c * N + n] : 0.f;
    h[s] = (on && a.initial_state) ? a.initial_state[(b * dim + c) * N + n] : 0.f;
  }
  for (int64_t t0 = 0; t0 < L; t0 += kChunk) {
    for (int i = threadIdx.x; i < kChannels * kChunk; i += blockDim.x) {
      const int ch = i / kChunk, tt = i % kChunk;
      const int64_t cc = c0 + ch, t = t0 + tt;
      float uu = 0.f, dt = 0.f;  // outside the sequence / channels: dt = 0 leaves h unchanged
      if (cc < dim && t < L) {
        const int64_t at = (b * dim + cc) * L + t;
        uu = to_f(u[at]);
        dt = to_f(delta[at]) + (bias ? to_f(bias[cc]) : 0.f);
        if (a.softplus) dt = softplus(dt);
      }
      s_u[ch][tt] = uu;
      s_dt[ch][tt] = dt;
    }
    for (int i = threadIdx.x; i < N * kChunk; i += blockDim.x) {
      const int n = i / kChunk, tt = i % kChunk;
      const int64_t t = t0 + tt;
      const bool in = t < L;
      s_B[n][tt] = in ? to_f(Bm[(b * N + n) * L + t]) : 0.f;
      s_C[n][tt] = in ? to_f(Cm[(b * N + n) * L + t]) : 0.f;
    }
    __syncthreads();
    const int steps = int(L - t0 < kChunk ? L - t0 : kChunk);
    for (int tt = 0; tt < steps; ++tt) {
      const float dt = s_dt[local][tt], du = dt * s_u[local][tt];
      float acc = 0.f;
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const int n = lane + s * kLanes;
        if (n < N) {
          h[s] = expf(dt * A[s]) * h[s] + du * s_B[n][tt];
          acc += h[s] * s_C[n][tt];
        }
      }
#pragma unroll
      for (int off = kLanes / 2; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (lane == 0) s_y[local][tt] = acc;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < kChannels * kChunk; i += blockDim.x) {
      const int ch = i / kChunk, tt = i % kChunk;
      const int64_t cc = c0 + ch, t = t0 + tt;
      if (cc < dim && t < L) {
        const int64_t at = (b * dim + cc) * L + t;
        float out = s_y[ch][tt];
        if (D) out += s_u[ch][tt] * to_f(D[cc]);
        if (z) out *= silu(to_f(z[at]));
        y[at] = from_f<T>(out);
      }
    }
    __syncthreads();  // the next chunk overwrites the staging buffers
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t n = lane + s * kLanes;
    if (valid && n < N) a.last_state[(b * dim + c) * N + n] = h[s];
  }
}

template <typename T>
void launch_scan(const ScanArgs& a, cudaStream_t stream) {
  const dim3 grid(unsigned(cdiv(a.dim, kChannels)), unsigned(a.batch));
  const dim3 block(kLanes * kChannels);
  if (a.N <= 16)
    scan_kernel<T, 1><<<grid, block, 0, stream>>>(a);
  else if (a.N <= 32)
    scan_kernel<T, 2><<<grid, block, 0, stream>>>(a);
  else
    scan_kernel<T, 4><<<grid, block, 0, stream>>>(a);
}

// ------------------------------------------------------------------------------------------------ CausalConv1d
template <typename T>
__global__ void conv_kernel(ConvArgs a) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.batch * a.dim * a.L) return;
  const int64_t t = idx % a.L, row = idx / a.L, c = row % a.dim, K = a.K;
  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  float acc = bias ? to_f(bias[c]) : 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t src = t + k - (K - 1);  // < 0: the initial state's column K + src
    const float v = src >= 0 ? to_f(x[row * a.L + src])
                             : (a.initial_state ? a.initial_state[row * K + K + src] : 0.f);
    acc += to_f(w[c * K + k]) * v;
  }
  static_cast<T*>(a.y)[idx] = from_f<T>(a.silu ? silu(acc) : acc);
}

template <typename T>
__global__ void conv_final_state_kernel(ConvArgs a) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.batch * a.dim * a.K) return;
  const int64_t j = idx % a.K, row = idx / a.K, src = a.L - a.K + j;
  const T* x = static_cast<const T*>(a.x);
  a.final_state[idx] = src >= 0 ? to_f(x[row * a.L + src])
                                : (a.initial_state ? a.initial_state[row * a.K + a.K + src] : 0.f);
}

template <typename T>
void launch_conv(const ConvArgs& a, cudaStream_t stream) {
  const int64_t n = a.batch * a.dim * a.L, ns = a.batch * a.dim * a.K;
  if (n > 0) conv_kernel<T><<<unsigned(cdiv(n, 256)), 256, 0, stream>>>(a);
  if (ns > 0) conv_final_state_kernel<T><<<unsigned(cdiv(ns, 256)), 256, 0, stream>>>(a);
}

// ------------------------------------------------------------------------------------------------ TopKExpertGather
constexpr int kBM = 64, kBN = 64, kBK = 16, kGemmThreads = 256;

// Group the P = T * k pairs by expert: each expert's segment of `sorted` starts at a multiple of kBM and is padded with
// -1; tile_expert[i] = expert of rows [i * kBM, (i + 1) * kBM), or -1 past the last segment. Indices outside [0, E)
// join no segment (their pair contributes nothing).
__global__ void align_kernel(const int64_t* experts, int64_t P, int64_t E, int64_t max_tiles, int* sorted,
                             int* tile_expert) {
  extern __shared__ int sm[];
  int *count = sm, *start = sm + E, *cursor = sm + 2 * E;
  for (int64_t i = threadIdx.x; i < E; i += blockDim.x) count[i] = cursor[i] = 0;
  for (int64_t i = threadIdx.x; i < max_tiles * kBM; i += blockDim.x) sorted[i] = -1;
  __syncthreads();
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const int64_t e = experts[p];
    if (e >= 0 && e < E) atomicAdd(&count[e], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int64_t e = 0; e < E; ++e) {
      start[e] = s;
      s += (count[e] + kBM - 1) / kBM * kBM;
    }
  }
  __syncthreads();
  for (int64_t tile = threadIdx.x; tile < max_tiles; tile += blockDim.x) {
    const int64_t row = tile * kBM;
    int owner = -1;
    for (int64_t e = 0; e < E; ++e)
      if (row >= start[e] && row < start[e] + (count[e] + kBM - 1) / kBM * kBM) owner = int(e);
    tile_expert[tile] = owner;
  }
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const int64_t e = experts[p];
    if (e >= 0 && e < E) sorted[start[e] + atomicAdd(&cursor[e], 1)] = int(p);
  }
}

// One kBM x kBN tile of a grouped GEMM over the rows of one expert. kGated (fc1): A rows are the pairs' tokens in x
// (K = d), B is the expert's gate rows and (second accumulator) up rows of w1; out = act(gate) * up as T into H (P, F).
// Otherwise (fc2): A rows are the pairs' rows of H (K = F), B the expert's w2 rows; out = weight * acc, fp32, (P, d).
template <typename T, bool kGated>
__global__ void __launch_bounds__(kGemmThreads) moe_gemm_kernel(const T* A, const T* W, const int* sorted,
                                                                const int* tile_expert, const float* weights,
                                                                void* out, int64_t K, int64_t Nout, int64_t top_k,
                                                                int activation) {
  __shared__ __align__(16) float As[kBK][kBM + 4];
  __shared__ __align__(16) float Bs[kBK][kBN + 4];
  __shared__ __align__(16) float Us[kGated ? kBK : 1][kBN + 4];
  __shared__ int rows[kBM];
  const int e = tile_expert[blockIdx.x];
  if (e < 0) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n0 = int64_t(blockIdx.y) * kBN;
  if (tid < kBM) rows[tid] = sorted[int64_t(blockIdx.x) * kBM + tid];
  __syncthreads();
  // expert e's weights: w1 (2F, d) with F = Nout, K = d; w2 (d, F) with Nout = d, K = F
  const T* We = W + int64_t(e) * (kGated ? 2 * Nout : Nout) * K;
  float acc[4][4] = {}, acc_up[kGated ? 4 : 1][4] = {};
  const int lr = tid / 4, lk = (tid % 4) * 4;  // loader: 4 consecutive k of tile row / weight row lr
  const int p = rows[lr];
  const int64_t a_row = p < 0 ? -1 : (kGated ? p / top_k : p);
  const int64_t n = n0 + lr;
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int64_t kk = k0 + lk + q;
      const bool kin = kk < K;
      As[lk + q][lr] = (a_row >= 0 && kin) ? to_f(A[a_row * K + kk]) : 0.f;
      Bs[lk + q][lr] = (n < Nout && kin) ? to_f(We[n * K + kk]) : 0.f;
      if constexpr (kGated) Us[lk + q][lr] = (n < Nout && kin) ? to_f(We[(Nout + n) * K + kk]) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
      const float4 bv = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
      const float a4[4] = {av.x, av.y, av.z, av.w}, b4[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a4[i] * b4[j];
      if constexpr (kGated) {
        const float4 uv = *reinterpret_cast<const float4*>(&Us[kk][tx * 4]);
        const float u4[4] = {uv.x, uv.y, uv.z, uv.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc_up[kGated ? i : 0][j] += a4[i] * u4[j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int pr = rows[ty * 4 + i];
    if (pr < 0) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + tx * 4 + j;
      if (col >= Nout) continue;
      if constexpr (kGated) {
        static_cast<T*>(out)[int64_t(pr) * Nout + col] =
            from_f<T>(activate(acc[i][j], activation) * acc_up[kGated ? i : 0][j]);
      } else {
        static_cast<float*>(out)[int64_t(pr) * Nout + col] = weights[pr] * acc[i][j];
      }
    }
  }
}

template <typename T>
__global__ void combine_kernel(const float* rows, const int64_t* experts, int64_t tokens, int64_t d, int64_t k,
                               int64_t E, T* y) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= tokens * d) return;
  const int64_t t = idx / d, col = idx % d;
  float s = 0.f;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t e = experts[t * k + j];
    if (e >= 0 && e < E) s += rows[(t * k + j) * d + col];
  }
  y[idx] = from_f<T>(s);
}

struct GatherLayout {
  int64_t max_tiles;
  size_t sorted, tile_expert, h, rows, total;  // byte offsets into the workspace, and its size
};

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

GatherLayout gather_layout(size_t elem, int64_t tokens, int64_t d, int64_t E, int64_t F, int64_t k) {
  GatherLayout g;
  const int64_t P = tokens * k;
  g.max_tiles = cdiv(P, kBM) + E;
  g.sorted = 0;
  g.tile_expert = align256(g.sorted + sizeof(int) * g.max_tiles * kBM);
  g.h = align256(g.tile_expert + sizeof(int) * g.max_tiles);
  g.rows = align256(g.h + elem * P * F);
  g.total = align256(g.rows + sizeof(float) * P * d);
  return g;
}

size_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

template <typename T>
void launch_gather(const GatherArgs& a, cudaStream_t stream) {
  const int64_t P = a.tokens * a.k;
  if (P == 0) return;
  const GatherLayout g = gather_layout(sizeof(T), a.tokens, a.d, a.E, a.F, a.k);
  char* ws = static_cast<char*>(a.workspace);
  int* sorted = reinterpret_cast<int*>(ws + g.sorted);
  int* tile_expert = reinterpret_cast<int*>(ws + g.tile_expert);
  T* h = reinterpret_cast<T*>(ws + g.h);
  float* rows = reinterpret_cast<float*>(ws + g.rows);
  align_kernel<<<1, 1024, 3 * sizeof(int) * a.E, stream>>>(a.experts, P, a.E, g.max_tiles, sorted, tile_expert);
  moe_gemm_kernel<T, true><<<dim3(unsigned(g.max_tiles), unsigned(cdiv(a.F, kBN))), kGemmThreads, 0, stream>>>(
      static_cast<const T*>(a.x), static_cast<const T*>(a.w1), sorted, tile_expert, a.weights, h, a.d, a.F, a.k,
      a.activation);
  moe_gemm_kernel<T, false><<<dim3(unsigned(g.max_tiles), unsigned(cdiv(a.d, kBN))), kGemmThreads, 0, stream>>>(
      h, static_cast<const T*>(a.w2), sorted, tile_expert, a.weights, rows, a.F, a.d, a.k, a.activation);
  combine_kernel<T><<<unsigned(cdiv(a.tokens * a.d, 256)), 256, 0, stream>>>(rows, a.experts, a.tokens, a.d, a.k, a.E,
                                                                            static_cast<T*>(a.y));
}

template <template <typename> class Launch, typename Args>
const char* dispatch(DType t, const Args& a, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (t) {
    case DType::kFloat32: Launch<float>::run(a, s); break;
    case DType::kFloat16: Launch<__half>::run(a, s); break;
    case DType::kBFloat16: Launch<__nv_bfloat16>::run(a, s); break;
  }
  return last_error();
}

template <typename T>
struct ScanLaunch { static void run(const ScanArgs& a, cudaStream_t s) { launch_scan<T>(a, s); } };
template <typename T>
struct ConvLaunch { static void run(const ConvArgs& a, cudaStream_t s) { launch_conv<T>(a, s); } };
template <typename T>
struct GatherLaunch { static void run(const GatherArgs& a, cudaStream_t s) { launch_gather<T>(a, s); } };

}  // namespace

const char* LaunchSelectiveScan(DType t, const ScanArgs& a, void* stream) {
  if (a.batch == 0 || a.dim == 0) return nullptr;
  return dispatch<ScanLaunch>(t, a, stream);
}

const char* LaunchCausalConv1d(DType t, const ConvArgs& a, void* stream) { return dispatch<ConvLaunch>(t, a, stream); }

size_t GatherWorkspaceBytes(DType t, int64_t tokens, int64_t d, int64_t E, int64_t F, int64_t k) {
  return gather_layout(elem_size(t), tokens, d, E, F, k).total;
}

const char* LaunchExpertGather(DType t, const GatherArgs& a, void* stream) {
  return dispatch<GatherLaunch>(t, a, stream);
}

}  // namespace mambadeploy_cuda
