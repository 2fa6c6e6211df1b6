// RoutedMoE's tensor-core path (fp16 / bf16), for a GEMV block whose expert was chosen by more pairs than the SIMT
// path dots at once: the block's 8 weight rows times up to 32 pairs per round as warp MMAs (wmma m8n32k16, fp32
// accumulation). The pairs' input rows are gathered into shared memory 256 columns at a time; the 8 warps split the
// columns of each chunk and their partial tiles are summed in shared memory. The weight rows are read once per round of
// 32 pairs instead of once per 4. Included by ops_cuda_decode_kernels.cu (inside its anonymous namespace).
#pragma once

#include <mma.h>

#include <type_traits>

constexpr int kMmaRows = 8, kMmaPairs = 32, kMmaK = 16, kMmaChunk = 256, kMmaChunkLd = kMmaChunk + 16;
constexpr int kMmaSmem = kMmaPairs * kMmaChunkLd * 2;  // the staged inputs; later the warps' partial tiles (fp32)
static_assert(kMmaRows * kMmaPairs == kThreads, "the epilogue gives one tile element to each thread");
static_assert(kWarps * 2 * kMmaRows * kMmaPairs * 4 <= kMmaSmem, "partial tiles of two row sets fit the buffer");

template <typename T>
constexpr bool kHasMma = !std::is_same_v<T, float>;

// A block may take the MMA path: 16-bit dtype, K a multiple of 16 (whole k-steps, 32-byte aligned rows), the row count
// a multiple of 8 (a tile never reads past its expert), more pairs than one SIMT round.
template <typename T>
__device__ __forceinline__ bool use_mma(int count, int64_t K, int64_t rows) {
  return kHasMma<T> && count > kPairChunk && K % kMmaK == 0 && rows % kMmaRows == 0;
}

// red[w][r][j * 32 + q] = sum over warp w's k-steps of <w_rows[r] row j, x row xrow[q]> for the np pairs of this round.
template <typename T, int R>
__device__ void mma_rows_by_pairs(const T* const (&w)[R], int64_t K, const T* x, const int* xrow, int np,
                                  unsigned char* buf) {
  using namespace nvcuda;
  T* xs = reinterpret_cast<T*>(buf);
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, kMmaRows, kMmaPairs, kMmaK, float> acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wmma::fill_fragment(acc[r], 0.f);
  for (int64_t k0 = 0; k0 < K; k0 += kMmaChunk) {
    const int kc = int(K - k0 < kMmaChunk ? K - k0 : kMmaChunk), vecs = kc / 8;
    __syncthreads();  // the last chunk's readers are done
    for (int idx = threadIdx.x; idx < kMmaPairs * vecs; idx += kThreads) {
      const int q = idx / vecs, v = idx % vecs;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);  // pairs beyond np: zero columns
      if (q < np) val = *reinterpret_cast<const uint4*>(x + int64_t(xrow[q]) * K + k0 + v * 8);
      *reinterpret_cast<uint4*>(xs + q * kMmaChunkLd + v * 8) = val;
    }
    __syncthreads();
    for (int ks = warp; ks < kc / kMmaK; ks += kWarps) {
      wmma::fragment<wmma::matrix_b, kMmaRows, kMmaPairs, kMmaK, T, wmma::col_major> b;
      wmma::load_matrix_sync(b, xs + ks * kMmaK, kMmaChunkLd);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wmma::fragment<wmma::matrix_a, kMmaRows, kMmaPairs, kMmaK, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, w[r] + k0 + ks * kMmaK, unsigned(K));
        wmma::mma_sync(acc[r], a, b, acc[r]);
      }
    }
  }
  __syncthreads();  // every warp is done with xs: the buffer now takes the partial tiles
  float* red = reinterpret_cast<float*>(buf);
#pragma unroll
  for (int r = 0; r < R; ++r)
    wmma::store_matrix_sync(red + (warp * R + r) * kThreads, acc[r], kMmaPairs, wmma::mem_row_major);
  __syncthreads();
}

// This thread's element (row j = tid / 32, pair q = tid % 32) of set r, summed over the warps.
template <int R>
__device__ __forceinline__ float tile_sum(const unsigned char* buf, int r) {
  const float* red = reinterpret_cast<const float*>(buf);
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) s += red[(w * R + r) * kThreads + threadIdx.x];
  return s;
}

// fc1 of one block (rows f0 .. f0 + 7 of the gate and up halves) for all `count` pairs of expert e.
template <typename T>
__device__ void fc1_mma(const MoEArgs& a, int e, const int* list, int count, T* H) {
  __shared__ __align__(32) unsigned char buf[kMmaSmem];
  __shared__ int xrow[kMmaPairs], pid[kMmaPairs];
  const int64_t d = a.d, F = a.F, f0 = int64_t(blockIdx.x) * kMmaRows;
  const T* w1 = static_cast<const T*>(a.w1) + int64_t(e) * 2 * F * d;
  const T* rows[2] = {w1 + f0 * d, w1 + (F + f0) * d};
  const int j = threadIdx.x / kMmaPairs, q = threadIdx.x % kMmaPairs;
  for (int c0 = 0; c0 < count; c0 += kMmaPairs) {
    const int np = min(kMmaPairs, count - c0);
    __syncthreads();  // the last round's epilogue is done with pid and the buffer
    if (threadIdx.x < kMmaPairs) {
      const int p = threadIdx.x < np ? list[c0 + threadIdx.x] : 0;
      pid[threadIdx.x] = p;
      xrow[threadIdx.x] = int(p / a.k);  // fc1 reads the pair's token row of x
    }
    __syncthreads();
    mma_rows_by_pairs<T, 2>(rows, d, static_cast<const T*>(a.x), xrow, np, buf);
    const float g = to_f(from_f<T>(tile_sum<2>(buf, 0))), u = to_f(from_f<T>(tile_sum<2>(buf, 1)));
    if (q < np && f0 + j < F)
      H[int64_t(pid[q]) * F + f0 + j] = from_f<T>(to_f(from_f<T>(activate(g, a.activation))) * u);
  }
}

// fc2 of one block (rows i0 .. i0 + 7 of w2) for all `count` pairs of expert e.
template <typename T>
__device__ void fc2_mma(const MoEArgs& a, int e, const int* list, int count, const float* gates, const T* H,
                        float* rows_out) {
  __shared__ __align__(32) unsigned char buf[kMmaSmem];
  __shared__ int pid[kMmaPairs];
  const int64_t d = a.d, F = a.F, i0 = int64_t(blockIdx.x) * kMmaRows;
  const T* rows[1] = {static_cast<const T*>(a.w2) + (int64_t(e) * d + i0) * F};
  const int j = threadIdx.x / kMmaPairs, q = threadIdx.x % kMmaPairs;
  for (int c0 = 0; c0 < count; c0 += kMmaPairs) {
    const int np = min(kMmaPairs, count - c0);
    __syncthreads();
    if (threadIdx.x < kMmaPairs) pid[threadIdx.x] = threadIdx.x < np ? list[c0 + threadIdx.x] : 0;
    __syncthreads();
    mma_rows_by_pairs<T, 1>(rows, F, H, pid, np, buf);  // fc2 reads the pair's own row of H
    const float v = to_f(from_f<T>(tile_sum<1>(buf, 0)));
    if (q >= np || i0 + j >= d) continue;
    const int64_t pair = pid[q];
    if (a.k == 1)
      static_cast<T*>(a.y)[pair * d + i0 + j] = from_f<T>(v * gates[pair]);
    else
      rows_out[pair * d + i0 + j] = v;
  }
}
