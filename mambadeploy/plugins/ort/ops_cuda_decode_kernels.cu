// CUDA kernels for the decode step's mambadeploy ORT ops: the math of models/ref_ops.py, fp32 inside for every dtype.
//
// CausalConv1dUpdate, SelectiveStateUpdate: one thread per (row, channel); states fp32.
// AddRMSNorm: one block per row (sum of squares reduced over the block).
// SparseLinear: one warp per (row, output): lanes walk the weight row (coalesced), loads of dropped features predicated
// off (a 32-byte sector is skipped only when every feature in it is dropped).
// RoutedMoE: ops_cuda_moe_kernels.cu.
#include "ops_cuda_kernels.h"
#include "ops_cuda_math.cuh"

#include <algorithm>

namespace mambadeploy_cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------------------ conv / state update
template <typename T>
__global__ void conv_update_kernel(ConvUpdateArgs a) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= a.batch * a.dim) return;
  const int64_t c = i % a.dim, K = a.K;
  const T* w = static_cast<const T*>(a.weight) + c * K;
  const float* s = a.conv_state + i * K;
  float* ns = a.new_state + i * K;
  const float xv = to_f(static_cast<const T*>(a.x)[i]);
  float acc = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float v = k + 1 < K ? s[k + 1] : xv;
    ns[k] = v;
    acc += v * to_f(w[k]);
  }
  if (a.bias) acc += to_f(static_cast<const T*>(a.bias)[c]);
  static_cast<T*>(a.y)[i] = from_f<T>(a.silu ? silu(acc) : acc);
}

// LANES lanes per (row, channel); lane l holds S consecutive states n = l*S .. l*S+S-1 (S = 4: one 16-byte load of the
// state and of A), <h, C> reduced by shuffles over the channel's lanes. The generic form (S = 1, LANES = 16, n = l,
// l + 16, ...) takes any N; the vector form N = 4 * LANES exactly (N in 4, 8, 16, 32), 4x the bytes in flight.
template <typename T, int LANES, int S>
__global__ void __launch_bounds__(kThreads) state_update_kernel(StateUpdateArgs a) {
  const int lane = threadIdx.x % LANES;
  const int64_t i = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / LANES;  // (row, channel)
  const bool valid = i < a.batch * a.dim;  // invalid lanes still take part in the shuffles
  const int64_t r = valid ? i : 0, b = r / a.dim, c = r % a.dim, N = a.N;
  float dt = to_f(static_cast<const T*>(a.dt)[r]);
  if (a.dt_bias) dt += to_f(static_cast<const T*>(a.dt_bias)[c]);
  if (a.softplus) dt = softplus(dt);
  const float x = to_f(static_cast<const T*>(a.x)[r]);
  const T* B = static_cast<const T*>(a.B) + b * N;
  const T* C = static_cast<const T*>(a.C) + b * N;
  float acc = 0.f;
  if constexpr (S == 4) {
    const int64_t n0 = int64_t(lane) * 4;
    const float4 A4 = *reinterpret_cast<const float4*>(a.A + c * N + n0);
    const float4 h4 = *reinterpret_cast<const float4*>(a.state + r * N + n0);
    const float Av[4] = {A4.x, A4.y, A4.z, A4.w}, hv[4] = {h4.x, h4.y, h4.z, h4.w};
    float out[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[j] = expf(dt * Av[j]) * hv[j] + dt * x * to_f(B[n0 + j]);
      acc += out[j] * to_f(C[n0 + j]);
    }
    if (valid) *reinterpret_cast<float4*>(a.new_state + r * N + n0) = make_float4(out[0], out[1], out[2], out[3]);
  } else {
    for (int64_t n = lane; n < N; n += LANES) {
      const float h = expf(dt * a.A[c * N + n]) * a.state[r * N + n] + dt * x * to_f(B[n]);
      if (valid) a.new_state[r * N + n] = h;
      acc += h * to_f(C[n]);
    }
  }
#pragma unroll
  for (int o = LANES / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (!valid || lane != 0) return;
  if (a.D) acc += x * to_f(static_cast<const T*>(a.D)[c]);
  if (a.z) acc *= silu(to_f(static_cast<const T*>(a.z)[r]));
  static_cast<T*>(a.y)[r] = from_f<T>(acc);
}

// ------------------------------------------------------------------------------------------------ add + RMSNorm
__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) add_rms_norm_kernel(AddNormArgs a) {
  __shared__ float scratch[kWarps];
  const int64_t off = int64_t(blockIdx.x) * a.d;
  const T* x = static_cast<const T*>(a.x) + off;
  const float* r = a.residual + off;
  float* ro = a.residual_out + off;
  float sq = 0.f;
  for (int64_t i = threadIdx.x; i < a.d; i += kThreads) {
    const float v = r[i] + to_f(x[i]);
    ro[i] = v;
    sq += v * v;
  }
  const float inv = rsqrtf(block_sum(sq, scratch) / float(a.d) + a.eps);
  const T* w = static_cast<const T*>(a.weight);
  T* y = static_cast<T*>(a.y) + off;
  for (int64_t i = threadIdx.x; i < a.d; i += kThreads) y[i] = from_f<T>(ro[i] * inv * to_f(w[i]));
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sparse_linear_kernel(SparseLinearArgs a) {
  const int lane = threadIdx.x % 32;
  const int64_t n = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, row = blockIdx.y;
  if (n >= a.N) return;  // whole warps leave together: the shuffles below see full warps
  const T* x = static_cast<const T*>(a.x) + row * a.K;
  const T* w = static_cast<const T*>(a.weight) + n * a.K;
  float acc = 0.f;
  for (int64_t k = lane; k < a.K; k += 32) {
    const float c = to_f(x[k]) - a.mode;
    if (fabsf(c) > a.threshold) acc += to_f(from_f<T>(c)) * to_f(w[k]);  // the weight is read only for kept features
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) {
    if (a.bias) acc += to_f(static_cast<const T*>(a.bias)[n]);
    static_cast<T*>(a.y)[row * a.N + n] = from_f<T>(acc);
  }
}

template <typename T>
void launch_sparse_linear(const SparseLinearArgs& a, cudaStream_t s) {
  sparse_linear_kernel<T><<<dim3(unsigned(cdiv(a.N, kWarps)), unsigned(a.rows)), kThreads, 0, s>>>(a);
}

template <typename T>
void launch_conv_update(const ConvUpdateArgs& a, cudaStream_t s) {
  conv_update_kernel<T><<<unsigned(cdiv(a.batch * a.dim, kThreads)), kThreads, 0, s>>>(a);
}
template <typename T>
void launch_state_update(const StateUpdateArgs& a, cudaStream_t s) {
  const int64_t rows = a.batch * a.dim;
  const bool vec = a.N % 4 == 0 && aligned16(a.A) && aligned16(a.state) && aligned16(a.new_state);
  auto grid = [&](int lanes) { return unsigned(cdiv(rows * lanes, kThreads)); };
  if (vec && a.N == 4) state_update_kernel<T, 1, 4><<<grid(1), kThreads, 0, s>>>(a);
  else if (vec && a.N == 8) state_update_kernel<T, 2, 4><<<grid(2), kThreads, 0, s>>>(a);
  else if (vec && a.N == 16) state_update_kernel<T, 4, 4><<<grid(4), kThreads, 0, s>>>(a);
  else if (vec && a.N == 32) state_update_kernel<T, 8, 4><<<grid(8), kThreads, 0, s>>>(a);
  else state_update_kernel<T, 16, 1><<<grid(16), kThreads, 0, s>>>(a);
}
template <typename T>
void launch_add_norm(const AddNormArgs& a, cudaStream_t s) {
  add_rms_norm_kernel<T><<<unsigned(a.rows), kThreads, 0, s>>>(a);
}


}  // namespace

const char* LaunchConvUpdate(DType t, const ConvUpdateArgs& a, void* stream) {
  if (a.batch * a.dim == 0) return nullptr;
  return dispatch<ConvUpdateArgs, launch_conv_update<float>, launch_conv_update<__half>,
                  launch_conv_update<__nv_bfloat16>>(t, a, stream);
}

const char* LaunchStateUpdate(DType t, const StateUpdateArgs& a, void* stream) {
  if (a.batch * a.dim == 0) return nullptr;
  return dispatch<StateUpdateArgs, launch_state_update<float>, launch_state_update<__half>,
                  launch_state_update<__nv_bfloat16>>(t, a, stream);
}

const char* LaunchSparseLinear(DType t, const SparseLinearArgs& a, void* stream) {
  if (a.rows * a.N == 0) return nullptr;
  return dispatch<SparseLinearArgs, launch_sparse_linear<float>, launch_sparse_linear<__half>,
                  launch_sparse_linear<__nv_bfloat16>>(t, a, stream);
}

const char* LaunchAddRMSNorm(DType t, const AddNormArgs& a, void* stream) {
  if (a.rows == 0) return nullptr;
  return dispatch<AddNormArgs, launch_add_norm<float>, launch_add_norm<__half>, launch_add_norm<__nv_bfloat16>>(
      t, a, stream);
}

}  // namespace mambadeploy_cuda
