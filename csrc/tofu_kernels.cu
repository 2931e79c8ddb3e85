// TOFU CUDA kernels: row statistics (forward), fused gradient (backward), finalize.
//
// Cost model (docs/design.md section 3): the forward reads each logit once (2 B/element in bf16) and
// does 2 exponentials per element (1 when beta == 1); the backward reads each logit once
// and writes the gradient once (4 B/element in bf16) with 1 exponential per element.
// Loads and stores are 16-byte vectors when the row base is 16-byte aligned, scalar
// otherwise. Offsets are int64. Reductions are warp shuffles + shared memory in a fixed
// order: no float atomics, bitwise deterministic. No host synchronisation anywhere.
//
// This file includes only CUDA headers (fast to compile); op registration with torch is
// in tofu_ops.cpp.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "tofu_kernels.h"
#include "tofu_math.cuh"

namespace tofu {
namespace {

constexpr int kWarps = kThreads / 32;  // launch constants: tofu_kernels.h

template <typename T>
struct Vec {
  static constexpr int N = kVecBytes / sizeof(T);
};

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::N]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec<T>::N; ++k) out[k] = to_float(v[k]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::N]) {
  uint4 raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec<T>::N; ++k) v[k] = from_float<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ int64_t row_offset(int64_t row, const RowLayoutArgs& l, bool out) {
  return (row / l.n_inner) * (out ? l.os_outer : l.xs_outer) +
         (row % l.n_inner) * (out ? l.os_inner : l.xs_inner);
}

template <bool BetaOne>
__device__ __forceinline__ Stats shfl_merge(Stats s, float ib) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o;
    o.m = __shfl_xor_sync(0xffffffffu, s.m, off);
    o.s1 = __shfl_xor_sync(0xffffffffu, s.s1, off);
    o.sb = __shfl_xor_sync(0xffffffffu, s.sb, off);
    s = merge<BetaOne>(s, o, ib);
  }
  return s;
}

// grid (rows, splits): block (row, split) covers columns [split*chunk, min(+chunk, n_valid)).
template <typename T, bool BetaOne>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const T* __restrict__ x,
                                                             const int64_t* __restrict__ labels,
                                                             float* __restrict__ stats,
                                                             RowLayoutArgs l, StatsArgs a) {
  constexpr int V = Vec<T>::N;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const T* xr = x + row_offset(row, l, false);
  const int64_t label = labels[row];
  const bool active = label != a.ignore_index;  // ignored rows are not read
  const int64_t lo = int64_t(split) * a.chunk;
  const int64_t hi = active ? min(lo + a.chunk, a.n_valid) : lo;
  const float ib = kLog2e / a.beta;
  Stats st = empty_stats();
  const bool aligned = (reinterpret_cast<uintptr_t>(xr + lo) % kVecBytes) == 0;
  int64_t tail_start = lo;
  if (aligned) {
    const int64_t n_vec = (hi - lo) / V;
    const T* base = xr + lo;
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * kThreads < n_vec; i += kUnroll * kThreads) {
      float z[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_vec(base + (i + u * kThreads) * V, z[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) update<V, BetaOne>(st, z[u], ib);
    }
    for (; i < n_vec; i += kThreads) {
      float z[V];
      load_vec(base + i * V, z);
      update<V, BetaOne>(st, z, ib);
    }
    tail_start = lo + n_vec * V;
  }
  for (int64_t c = tail_start + threadIdx.x; c < hi; c += kThreads) {
    float z[1] = {to_float(xr[c])};
    update<1, BetaOne>(st, z, ib);
  }
  // Block reduction in a fixed order (deterministic): warps, then warp 0.
  __shared__ Stats smem[kWarps];
  st = shfl_merge<BetaOne>(st, ib);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? smem[lane] : empty_stats();
    st = shfl_merge<BetaOne>(st, ib);
    if (lane == 0) {
      const int64_t t = label - a.vocab_start;
      const float zt = (active && t >= lo && t < hi) ? to_float(xr[t]) : 0.f;
      float* out = stats + (row * gridDim.y + split) * stat::kWidth;
      out[stat::kM] = st.m;
      out[stat::kS1] = st.s1;
      out[stat::kSb] = st.sb;
      out[stat::kZt] = zt;
    }
  }
}

// grid (rows, tiles): block writes columns [tile * kTileCols, +kTileCols) of one row.
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_kernel(const T* x, T* out,
                                                        const int64_t* __restrict__ labels,
                                                        const float* __restrict__ params,
                                                        RowLayoutArgs l, GradArgs a) {
  constexpr int V = Vec<T>::N;
  const int64_t row = blockIdx.x;
  const int64_t lo = int64_t(blockIdx.y) * kTileCols;
  const int64_t hi = min(lo + kTileCols, a.width);
  const float* p = params + row * gparam::kWidth;
  const float coef = p[gparam::kCoef], m = p[gparam::kM], qt_m1 = p[gparam::kQtM1];
  const float log2_sb = p[gparam::kLogSb] * kLog2e;
  const float ib = kLog2e / a.beta;
  int64_t t = labels[row] - a.vocab_start;
  if (t < 0 || t >= a.n_valid) t = -1;  // target on another rank, or in padding
  const T* xr = x + row_offset(row, l, false);
  T* orow = out + row_offset(row, l, true);
  // coef == 0 (ignored or loss-masked token): write zeros without reading.
  const int64_t valid_hi = coef != 0.f ? min(hi, a.n_valid) : lo;
  const bool aligned = (reinterpret_cast<uintptr_t>(xr + lo) % kVecBytes) == 0 &&
                       (reinterpret_cast<uintptr_t>(orow + lo) % kVecBytes) == 0;
  int64_t tail_start = lo;
  if (aligned) {
    const int64_t n_vec = (hi - lo) / V;
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const int64_t c0 = lo + i * V;
      float z[V];
      if (c0 + V <= valid_hi) {
        load_vec(xr + c0, z);
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) z[k] = c0 + k < valid_hi ? to_float(xr[c0 + k]) : -INFINITY;
      }
      float gv[V];
#pragma unroll
      for (int k = 0; k < V; ++k)
        gv[k] = c0 + k < valid_hi ? grad_elem(z[k], c0 + k == t, coef, m, log2_sb, qt_m1, ib)
                                  : 0.f;
      store_vec(orow + c0, gv);
    }
    tail_start = lo + n_vec * V;
  }
  for (int64_t c = tail_start + threadIdx.x; c < hi; c += kThreads) {
    const float g = c < valid_hi ? grad_elem(to_float(xr[c]), c == t, coef, m, log2_sb, qt_m1, ib)
                                 : 0.f;
    orow[c] = from_float<T>(g);
  }
}

__global__ void finalize_kernel(const float* __restrict__ stats, const int64_t* __restrict__ labels,
                                const int64_t* __restrict__ vocab_size_ptr, float* __restrict__ out,
                                int64_t n_rows, FinalizeArgs a) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n_rows) return;
  const float* s = stats + row * stat::kWidth;
  const int64_t vocab_size = vocab_size_ptr ? *vocab_size_ptr : a.vocab_size;
  const RowOut o = finalize_row({s[stat::kM], s[stat::kS1], s[stat::kSb]}, s[stat::kZt], labels[row],
                                a.ignore_index, vocab_size, a.gamma, a.beta);
  // out is [rowout::kWidth, N]: one field per row of out (coalesced per field)
  out[rowout::kLoss * n_rows + row] = o.loss;
  out[rowout::kCe * n_rows + row] = o.ce;
  out[rowout::kG * n_rows + row] = o.g;
  out[rowout::kM * n_rows + row] = o.m;
  out[rowout::kLogSb * n_rows + row] = o.log_sb;
  out[rowout::kQtM1 * n_rows + row] = o.qt_m1;
}

template <typename T>
cudaError_t launch_stats_t(const void* x, const int64_t* labels, float* stats, int64_t n_rows,
                           int splits, const RowLayoutArgs& l, const StatsArgs& a, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(splits));
  if (a.beta == 1.0f)
    row_stats_kernel<T, true><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), labels, stats, l, a);
  else
    row_stats_kernel<T, false><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), labels, stats, l, a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_t(const void* x, void* out, const int64_t* labels, const float* params,
                          int64_t n_rows, const RowLayoutArgs& l, const GradArgs& a, cudaStream_t s) {
  const int64_t tiles = (a.width + kTileCols - 1) / kTileCols;
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(tiles));
  grad_kernel<T><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<T*>(out), labels,
                                           params, l, a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_row_stats(DType dt, const void* x, const int64_t* labels, float* stats,
                             int64_t n_rows, int splits, const RowLayoutArgs& l, const StatsArgs& a,
                             cudaStream_t s) {
  switch (dt) {
    case DType::kFloat32: return launch_stats_t<float>(x, labels, stats, n_rows, splits, l, a, s);
    case DType::kBFloat16: return launch_stats_t<__nv_bfloat16>(x, labels, stats, n_rows, splits, l, a, s);
    case DType::kFloat16: return launch_stats_t<__half>(x, labels, stats, n_rows, splits, l, a, s);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_grad(DType dt, const void* x, void* out, const int64_t* labels,
                        const float* params, int64_t n_rows, const RowLayoutArgs& l,
                        const GradArgs& a, cudaStream_t s) {
  switch (dt) {
    case DType::kFloat32: return launch_grad_t<float>(x, out, labels, params, n_rows, l, a, s);
    case DType::kBFloat16: return launch_grad_t<__nv_bfloat16>(x, out, labels, params, n_rows, l, a, s);
    case DType::kFloat16: return launch_grad_t<__half>(x, out, labels, params, n_rows, l, a, s);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_finalize(const float* stats, const int64_t* labels, const int64_t* vocab_size_ptr,
                            float* out, int64_t n_rows, const FinalizeArgs& a, cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>((n_rows + kThreads - 1) / kThreads);
  finalize_kernel<<<blocks, kThreads, 0, s>>>(stats, labels, vocab_size_ptr, out, n_rows, a);
  return cudaGetLastError();
}

}  // namespace tofu
