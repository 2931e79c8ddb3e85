// TOFU CUDA kernels (docs/design.md section 3 for the byte and exponential count).
//
// Two-pass path: row_stats (grid rows x splits: one read of the logits, 2 exponentials
// per element, 1 when beta == 1) -> [the tensor-parallel all-gather] -> epilogue (ONE
// block: merges every part of every row, loss, cross entropy, focal weight, the backward's
// record, the reduction) -> grad (grid rows x tiles: one read, one write, coef = upstream *
// scale * g folded in fp32 in the kernel).
// Gradient in the forward (a scalar upstream): count (one block) -> grad_in_forward (one block per
// row: the statistics pass, the loss, then the gradient pass over the same row in reverse
// order, so its last vectors are still in L2) -> reduce (one block); in the backward
// rescale (returns at once, on the device, when the upstream gradient is 1).
//
// Every streaming loop walks its row in vectors of 16 bytes (8 bf16/fp16, 4 fp32): one
// 16-byte load or store each when the rows are 16-byte aligned (the launcher checks the
// base pointers and row strides and picks the Aligned instance), element by element
// otherwise; the last, partial vector of a row is one column per thread, outside the loop.
// Offsets are int64. Every reduction is warp shuffles + shared memory in a
// fixed order: no float atomics, bitwise deterministic. No host synchronisation anywhere.
// This file includes only CUDA headers (fast to compile); op registration with torch is
// in tofu_ops.cpp.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "tofu_kernels.h"
#include "tofu_math.cuh"

namespace tofu {
namespace {

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

// Two values in one 32-bit word of a vector of 16-bit types, and back (explicit words: a
// 16-byte vector assembled from 16-bit pieces is stored as four 4-byte stores on sm_90).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  uint32_t w;
  memcpy(&w, &h, sizeof(w));
  return w;
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w) {
  __half2 h;
  memcpy(&h, &w, sizeof(w));
  return __half22float2(h);
}
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  __nv_bfloat162 h;
  memcpy(&h, &w, sizeof(w));
  return __bfloat1622float2(h);
}

// One vector of a row: a 16-byte load (Aligned: p is 16-byte aligned), else element by element.
template <typename T, bool Aligned>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  if constexpr (Aligned) {
    const uint4 raw = __ldca(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(T) == 4) {
        out[k] = __uint_as_float(w[k]);
      } else {
        const float2 f = unpack2<T>(w[k]);
        out[2 * k] = f.x;
        out[2 * k + 1] = f.y;
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < Vec<T>::N; ++k) out[k] = to_float(p[k]);
  }
}

// (__ldca / __stwb: one 16-byte access with the default caching; a plain uint4 assignment
// is split into four 4-byte stores on sm_90, and a fp32 load into 4- and 8-byte ones on sm_100.)
template <typename T, bool Aligned>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
  if constexpr (Aligned) {
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (sizeof(T) == 4) {
        w[k] = __float_as_uint(in[k]);
      } else {
        w[k] = pack2<T>(in[2 * k], in[2 * k + 1]);
      }
    }
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  } else {
#pragma unroll
    for (int k = 0; k < Vec<T>::N; ++k) p[k] = from_float<T>(in[k]);
  }
}

// Rows starting 16-byte aligned: the base, and both row strides (in bytes) multiples of 16.
template <typename T>
bool rows_aligned(const void* p, int64_t s_outer, int64_t s_inner) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0 && (s_outer * int64_t(sizeof(T))) % kVecBytes == 0 &&
         (s_inner * int64_t(sizeof(T))) % kVecBytes == 0;
}

__device__ __forceinline__ int64_t row_offset(int64_t row, const RowLayoutArgs& l, bool out) {
  return (row / l.n_inner) * (out ? l.os_outer : l.xs_outer) +
         (row % l.n_inner) * (out ? l.os_inner : l.xs_inner);
}

template <bool BetaOne, bool Metrics>
__device__ __forceinline__ Stats shfl_merge(Stats s, float ib) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Stats o;
    o.m = __shfl_xor_sync(0xffffffffu, s.m, off);
    o.s1 = __shfl_xor_sync(0xffffffffu, s.s1, off);
    o.sb = __shfl_xor_sync(0xffffffffu, s.sb, off);
    o.e = Metrics ? __shfl_xor_sync(0xffffffffu, s.e, off) : 0.f;
    o.before = Metrics ? __shfl_xor_sync(0xffffffffu, s.before, off) : -INFINITY;
    s = merge<BetaOne, Metrics>(s, o, ib);
  }
  return s;
}

// Merge every thread's statistics in a fixed order; the result is valid in warp 0.
template <bool BetaOne, bool Metrics, int NThreads>
__device__ __forceinline__ Stats block_merge(Stats st, float ib) {
  __shared__ Stats smem[NThreads / 32];
  st = shfl_merge<BetaOne, Metrics>(st, ib);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < NThreads / 32 ? smem[lane] : empty_stats();
    st = shfl_merge<BetaOne, Metrics>(st, ib);
  }
  return st;
}

// Sum over the block in a fixed order; the result is valid in warp 0. `smem` holds
// NThreads / 32 floats and is free again when this returns.
template <int NThreads, typename A>
__device__ __forceinline__ A block_sum(A v, A* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < NThreads / 32 ? smem[lane] : A(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  __syncthreads();
  return v;
}

// One thread's statistics over columns [lo, hi) of a row, NThreads threads per row slice
// (with Metrics also the metrics' accumulators; t: the target's column in the row). The
// vectors in a loop unrolled kUnroll times, then the vector left over, then the last partial
// vector one column per thread (neither of them a loop).
template <typename T, bool Aligned, bool BetaOne, bool Metrics, int NThreads>
__device__ __forceinline__ Stats thread_stats(const T* xr, int64_t lo, int64_t hi, float ib, int64_t t) {
  constexpr int V = Vec<T>::N;
  static_assert(NThreads >= V, "the tail is one column per thread");
  Stats st = empty_stats();
  const int64_t n_vec = (hi - lo) / V;
  const T* base = xr + lo;
  int64_t i = threadIdx.x;
  for (; i + (kUnroll - 1) * NThreads < n_vec; i += kUnroll * NThreads) {
    float z[kUnroll * V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec<T, Aligned>(base + (i + u * NThreads) * V, z + u * V);
    update<kUnroll * V, BetaOne, Metrics>(st, z, ib);  // one rescale of the sums per kUnroll vectors
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) update_before<V, Metrics>(st, z + u * V, lo + (i + u * NThreads) * V, t);
  }
  static_assert(kUnroll == 2, "one vector per thread at most is left after the unrolled loop");
  if (i < n_vec) {
    float z[V];
    load_vec<T, Aligned>(base + i * V, z);
    update<V, BetaOne, Metrics>(st, z, ib);
    update_before<V, Metrics>(st, z, lo + i * V, t);
  }
  const int64_t c = lo + n_vec * V + threadIdx.x;
  if (c < hi) {
    float z[1] = {to_float(xr[c])};
    update<1, BetaOne, Metrics>(st, z, ib);
    update_before<1, Metrics>(st, z, c, t);
  }
  return st;
}

// Write the gradient of columns [lo, hi) of one row: coef * q_j (coef * (q_t - 1) at the
// target), 0 at columns >= valid_hi (padding; everything when coef == 0, then nothing is
// read). A vector that straddles valid_hi is read whole (its padding columns are memory of
// the row) and written with zeros there. Vectors are visited from the last to the first when
// `Reverse`; the last, partial vector of [lo, hi) one column per thread.
template <typename T, bool Aligned, int NThreads, bool Reverse>
__device__ __forceinline__ void write_grad(const T* xr, T* orow, int64_t lo, int64_t hi, int64_t valid_hi,
                                           int64_t t, const RowGrad& r, float ib) {
  constexpr int V = Vec<T>::N;
  static_assert(NThreads >= V, "the tail is one column per thread");
  const int64_t n_vec = (hi - lo) / V;
  for (int64_t k = threadIdx.x; k < n_vec; k += NThreads) {
    const int64_t c0 = lo + (Reverse ? n_vec - 1 - k : k) * V;
    float gv[V];
    if (c0 < valid_hi) {
      float z[V];
      load_vec<T, Aligned>(xr + c0, z);
#pragma unroll
      for (int j = 0; j < V; ++j) gv[j] = c0 + j < valid_hi ? grad_elem(z[j], c0 + j == t, r, ib) : 0.f;
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) gv[j] = 0.f;
    }
    store_vec<T, Aligned>(orow + c0, gv);
  }
  const int64_t c = lo + n_vec * V + threadIdx.x;
  if (c < hi) orow[c] = from_float<T>(c < valid_hi ? grad_elem(to_float(xr[c]), c == t, r, ib) : 0.f);
}

// ------------------------------------------------------------------ two-pass path

// grid (rows, splits): block (row, split) covers columns [split*chunk, min(+chunk, n_valid)).
// With Metrics (metrics) the metric accumulators follows the records (and the meta record).
template <typename T, bool Aligned, bool BetaOne, bool Metrics>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const T* __restrict__ x,
                                                             const int64_t* __restrict__ labels,
                                                             float* __restrict__ stats,
                                                             RowLayoutArgs l, StatsArgs a) {
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const T* xr = x + row_offset(row, l, false);
  const int64_t label = labels[row];
  const bool active = label != a.ignore_index;  // ignored rows are not read
  const int64_t lo = int64_t(split) * a.chunk;
  // The last split can start past the row's end (e.g. 5 tiles over 4 splits of 2): empty.
  const int64_t hi = active ? max(lo, min(lo + a.chunk, a.n_valid)) : lo;
  const float ib = kLog2e * a.inv_beta;
  const int64_t t = label - a.vocab_start;
  Stats st = thread_stats<T, Aligned, BetaOne, Metrics, kThreads>(xr, lo, hi, ib, t);
  st = block_merge<BetaOne, Metrics, kThreads>(st, ib);
  if (threadIdx.x == 0) {
    const float zt = (active && t >= lo && t < hi) ? to_float(xr[t]) : 0.f;
    float* out = stats + (row * gridDim.y + split) * stat::kWidth;
    out[stat::kM] = st.m;
    out[stat::kS1] = st.s1;
    out[stat::kSb] = st.sb;
    out[stat::kZt] = zt;
    if (Metrics) {
      const int64_t parts = int64_t(gridDim.x) * gridDim.y;
      float* acc = stats + (parts + (a.write_meta ? 1 : 0)) * stat::kWidth + (row * gridDim.y + split) * macc::kWidth;
      acc[macc::kE] = st.e;
      acc[macc::kBefore] = st.before;
    }
    if (a.write_meta && row == 0 && split == 0) {  // this rank's meta record, int32 bits
      float* mr = stats + int64_t(gridDim.x) * gridDim.y * stat::kWidth;
      mr[meta::kVocabStart] = __int_as_float(static_cast<int>(a.vocab_start));
      mr[meta::kVocabEnd] = __int_as_float(static_cast<int>(a.meta_vocab_end));
      mr[meta::kWidth] = __int_as_float(static_cast<int>(a.meta_width));
      mr[meta::kRows] = __int_as_float(static_cast<int>(gridDim.x));
    }
  }
}

// One block: every row's parts merged (ranks, then splits: a fixed order), finalized, the
// per-row outputs written, and the sums reduced in a fixed order. With Metrics the metrics
// plane of each rank is merged too and met [n_rows, metric::kWidth] written.
template <bool BetaOne, bool Metrics>
__global__ void __launch_bounds__(kEpilogueThreads, 1) epilogue_kernel(const float* __restrict__ parts,
                                                                    const int64_t* __restrict__ labels,
                                                                    float* __restrict__ loss, float* __restrict__ ce,
                                                                    float* __restrict__ rec, float* __restrict__ red,
                                                                    float* __restrict__ met, PartsArgs p, LossArgs a) {
  const float ib = kLog2e * a.inv_beta;
  int64_t vocab_size = p.vocab_size;
  if (p.has_meta) {  // the global vocab size: the largest vocab_end of the ranks
    const int64_t meta_off = p.n_rows * p.splits * stat::kWidth;
    int vs = 0;
    for (int64_t w = 0; w < p.world; ++w)
      vs = max(vs, __float_as_int(parts[w * p.rank_stride + meta_off + meta::kVocabEnd]));
    vocab_size = vs;
  }
  const int64_t ent_off = (p.n_rows * p.splits + (p.has_meta ? 1 : 0)) * stat::kWidth;
  float acc_loss = 0.f, acc_ce = 0.f;
  int acc_n = 0;
  for (int64_t r = threadIdx.x; r < p.n_rows; r += kEpilogueThreads) {
    Stats st = empty_stats();
    float zt = 0.f;
    for (int64_t w = 0; w < p.world; ++w) {
      for (int64_t s = 0; s < p.splits; ++s) {
        const float* q = parts + w * p.rank_stride + (r * p.splits + s) * stat::kWidth;
        const float* acc = parts + w * p.rank_stride + ent_off + (r * p.splits + s) * macc::kWidth;
        const float e = Metrics ? acc[macc::kE] : 0.f, before = Metrics ? acc[macc::kBefore] : -INFINITY;
        st = merge<BetaOne, Metrics>(st, Stats{q[stat::kM], q[stat::kS1], q[stat::kSb], e, before}, ib);
        zt += q[stat::kZt];
      }
    }
    const int64_t label = labels[r];
    const RowOut o = finalize_row(st, zt, label, a.ignore_index, vocab_size, a.gamma, a.beta, a.inv_beta);
    if (Metrics) {
      const RowMetrics mt = row_metrics(st, zt, label, a.ignore_index, vocab_size);
      met[r * metric::kWidth + metric::kEntropy] = mt.entropy;
      met[r * metric::kWidth + metric::kTop1] = mt.top1;
    }
    loss[r] = o.loss;
    ce[r] = o.ce;
    float* q = rec + r * gparam::kWidth;
    q[gparam::kG] = o.g;
    q[gparam::kM] = o.m;
    q[gparam::kLogSb] = o.log_sb;
    q[gparam::kQtM1] = o.qt_m1;
    acc_loss += o.loss;
    acc_ce += o.ce;
    acc_n += label != a.ignore_index;
  }
  __shared__ float sf[kEpilogueThreads / 32];
  __shared__ int si[kEpilogueThreads / 32];
  acc_loss = block_sum<kEpilogueThreads>(acc_loss, sf);
  acc_ce = block_sum<kEpilogueThreads>(acc_ce, sf);
  acc_n = block_sum<kEpilogueThreads>(acc_n, si);
  if (threadIdx.x == 0) {
    const float scale = a.reduction == reduction::kMean ? div_normal(1.f, static_cast<float>(max(acc_n, 1))) : 1.f;
    red[reduced::kLoss] = acc_loss * scale;
    red[reduced::kCe] = acc_ce * scale;
    red[reduced::kScale] = scale;
  }
}

// grid (rows, tiles): block writes columns [tile * kTileCols, +kTileCols) of one row.
template <typename T, bool Aligned>
__global__ void __launch_bounds__(kThreads) grad_kernel(const T* x, T* out, const int64_t* __restrict__ labels,
                                                        const float* __restrict__ rec,
                                                        const float* __restrict__ upstream,
                                                        const float* __restrict__ scale, RowLayoutArgs l,
                                                        GradArgs a) {
  const int64_t row = blockIdx.x;
  const int64_t lo = int64_t(blockIdx.y) * kTileCols;
  const int64_t hi = min(lo + kTileCols, a.width);
  const float* p = rec + row * gparam::kWidth;
  const RowGrad r{upstream[row * a.up_stride] * scale[0] * p[gparam::kG], p[gparam::kM], p[gparam::kLogSb] * kLog2e,
                  p[gparam::kQtM1]};
  const float ib = kLog2e * a.inv_beta;
  int64_t t = labels[row] - a.vocab_start;
  if (t < 0 || t >= a.n_valid) t = -1;  // target on another rank, or in padding
  // coef == 0 (ignored or loss-masked token): write zeros without reading.
  const int64_t valid_hi = r.coef != 0.f ? min(hi, a.n_valid) : lo;
  write_grad<T, Aligned, kThreads, false>(x + row_offset(row, l, false), out + row_offset(row, l, true), lo, hi,
                                          valid_hi, t, r, ib);
}

// ------------------------------------------------------------------ gradient in the forward

__global__ void __launch_bounds__(kEpilogueThreads) count_kernel(const int64_t* __restrict__ labels,
                                                                 float* __restrict__ red, int64_t n_rows,
                                                                 LossArgs a) {
  int n = 0;
  for (int64_t r = threadIdx.x; r < n_rows; r += kEpilogueThreads) n += labels[r] != a.ignore_index;
  __shared__ int si[kEpilogueThreads / 32];
  n = block_sum<kEpilogueThreads>(n, si);
  if (threadIdx.x == 0)
    red[reduced::kScale] = a.reduction == reduction::kMean ? div_normal(1.f, static_cast<float>(max(n, 1))) : 1.f;
}

// One block per whole row: statistics, loss, then the gradient for an upstream of 1 (with
// Metrics also the row's metrics into met).
template <typename T, bool Aligned, bool BetaOne, bool Metrics>
__global__ void __launch_bounds__(kRowThreads, 2)
    grad_in_forward_kernel(const T* x, T* out, const int64_t* __restrict__ labels, float* __restrict__ loss,
                           float* __restrict__ ce, const float* __restrict__ red, float* __restrict__ met,
                           int64_t width, RowLayoutArgs l, LossArgs a) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row_offset(row, l, false);
  T* orow = out + row_offset(row, l, true);
  const int64_t label = labels[row];
  const bool active = label != a.ignore_index;
  const float ib = kLog2e * a.inv_beta;
  Stats st = thread_stats<T, Aligned, BetaOne, Metrics, kRowThreads>(xr, 0, active ? width : 0, ib, label);
  st = block_merge<BetaOne, Metrics, kRowThreads>(st, ib);
  const bool hit = active && label >= 0 && label < width;
  __shared__ RowGrad row_grad;  // thread 0 finalizes the row, every thread writes its gradient
  if (threadIdx.x == 0) {
    const float zt = hit ? to_float(xr[label]) : 0.f;
    const RowOut o = finalize_row(st, zt, label, a.ignore_index, width, a.gamma, a.beta, a.inv_beta);
    loss[row] = o.loss;
    ce[row] = o.ce;
    if (Metrics) {
      const RowMetrics mt = row_metrics(st, zt, label, a.ignore_index, width);
      met[row * metric::kWidth + metric::kEntropy] = mt.entropy;
      met[row * metric::kWidth + metric::kTop1] = mt.top1;
    }
    row_grad = RowGrad{red[reduced::kScale] * o.g, o.m, o.log_sb * kLog2e, o.qt_m1};
  }
  __syncthreads();
  const RowGrad r = row_grad;
  write_grad<T, Aligned, kRowThreads, true>(xr, orow, 0, width, r.coef != 0.f ? width : 0, hit ? label : -1, r, ib);
}

__global__ void __launch_bounds__(kEpilogueThreads) reduce_kernel(const float* __restrict__ loss,
                                                                  const float* __restrict__ ce, float* __restrict__ red,
                                                                  int64_t n_rows) {
  float acc_loss = 0.f, acc_ce = 0.f;
  for (int64_t r = threadIdx.x; r < n_rows; r += kEpilogueThreads) {
    acc_loss += loss[r];
    acc_ce += ce[r];
  }
  __shared__ float sf[kEpilogueThreads / 32];
  acc_loss = block_sum<kEpilogueThreads>(acc_loss, sf);
  acc_ce = block_sum<kEpilogueThreads>(acc_ce, sf);
  if (threadIdx.x == 0) {
    const float scale = red[reduced::kScale];
    red[reduced::kLoss] = acc_loss * scale;
    red[reduced::kCe] = acc_ce * scale;
  }
}

// Persistent grid over (row, tile) pairs; the whole grid returns at once when s == 1.
template <typename T, bool Aligned>
__global__ void __launch_bounds__(kThreads) rescale_kernel(T* out, const float* __restrict__ grad_out, int64_t n_rows,
                                                           int64_t width, RowLayoutArgs l) {
  constexpr int V = Vec<T>::N;
  const float s = grad_out[0];
  if (s == 1.f) return;
  const int64_t tiles = (width + kTileCols - 1) / kTileCols;
  for (int64_t w = blockIdx.x; w < n_rows * tiles; w += gridDim.x) {
    const int64_t row = w / tiles, lo = (w % tiles) * kTileCols, hi = min(lo + kTileCols, width);
    T* orow = out + row_offset(row, l, true);
    const int64_t n_vec = (hi - lo) / V;
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      float v[V];
      load_vec<T, Aligned>(orow + lo + i * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] *= s;
      store_vec<T, Aligned>(orow + lo + i * V, v);
    }
    const int64_t c = lo + n_vec * V + threadIdx.x;
    if (c < hi) orow[c] = from_float<T>(to_float(orow[c]) * s);
  }
}

// ------------------------------------------------------------------ launchers

// Run-time flags as compile-time ones: f(std::integral_constant<bool, a>, ...).
template <typename F>
cudaError_t by_flag(bool a, F&& f) {
  return a ? f(std::true_type{}) : f(std::false_type{});
}
template <typename F>
cudaError_t by_flags(bool a, bool b, F&& f) {
  return by_flag(a, [&](auto x) { return by_flag(b, [&](auto y) { return f(x, y); }); });
}
template <typename F>
cudaError_t by_flags(bool a, bool b, bool c, F&& f) {
  return by_flag(a, [&](auto x) { return by_flags(b, c, [&](auto y, auto z) { return f(x, y, z); }); });
}

template <typename F>
cudaError_t by_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_row_stats(DType dt, const void* x, const int64_t* labels, float* stats, int64_t n_rows,
                             int splits, const RowLayoutArgs& l, const StatsArgs& a, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(splits));
  return by_dtype(dt, [&](auto zero) {
    using T = decltype(zero);
    const T* xt = static_cast<const T*>(x);
    const bool aligned = rows_aligned<T>(x, l.xs_outer, l.xs_inner) && rows_aligned<T>(nullptr, a.chunk, 0);
    return by_flags(aligned, a.beta == 1.0f, a.metrics, [&](auto al, auto beta_one, auto metrics) {
      row_stats_kernel<T, al.value, beta_one.value, metrics.value><<<grid, kThreads, 0, s>>>(xt, labels, stats, l, a);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_epilogue(const float* parts, const int64_t* labels, float* loss, float* ce, float* rec, float* red,
                            float* met, const PartsArgs& p, const LossArgs& a, cudaStream_t s) {
  return by_flags(a.beta == 1.0f, met != nullptr, [&](auto beta_one, auto metrics) {
    epilogue_kernel<beta_one.value, metrics.value><<<1, kEpilogueThreads, 0, s>>>(parts, labels, loss, ce, rec, red, met,
                                                                              p, a);
    return cudaGetLastError();
  });
}

cudaError_t launch_grad(DType dt, const void* x, void* out, const int64_t* labels, const float* rec,
                        const float* upstream, const float* scale, int64_t n_rows, const RowLayoutArgs& l,
                        const GradArgs& a, cudaStream_t s) {
  const int64_t tiles = (a.width + kTileCols - 1) / kTileCols;
  const dim3 grid(static_cast<unsigned>(n_rows), static_cast<unsigned>(tiles));
  return by_dtype(dt, [&](auto zero) {
    using T = decltype(zero);
    const bool aligned = rows_aligned<T>(x, l.xs_outer, l.xs_inner) && rows_aligned<T>(out, l.os_outer, l.os_inner);
    return by_flag(aligned, [&](auto al) {
      grad_kernel<T, al.value><<<grid, kThreads, 0, s>>>(static_cast<const T*>(x), static_cast<T*>(out), labels, rec,
                                                         upstream, scale, l, a);
      return cudaGetLastError();
    });
  });
}

cudaError_t launch_grad_in_forward(DType dt, const void* x, void* out, const int64_t* labels, float* loss, float* ce,
                                   float* red, float* met, int64_t n_rows, int64_t width, const RowLayoutArgs& l,
                                   const LossArgs& a, cudaStream_t s) {
  count_kernel<<<1, kEpilogueThreads, 0, s>>>(labels, red, n_rows, a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = by_dtype(dt, [&](auto zero) {
    using T = decltype(zero);
    const T* xt = static_cast<const T*>(x);
    T* ot = static_cast<T*>(out);
    const bool aligned = rows_aligned<T>(x, l.xs_outer, l.xs_inner) && rows_aligned<T>(out, l.os_outer, l.os_inner);
    return by_flags(aligned, a.beta == 1.0f, met != nullptr, [&](auto al, auto beta_one, auto metrics) {
      grad_in_forward_kernel<T, al.value, beta_one.value, metrics.value>
          <<<static_cast<unsigned>(n_rows), kRowThreads, 0, s>>>(xt, ot, labels, loss, ce, red, met, width, l, a);
      return cudaGetLastError();
    });
  });
  if (err != cudaSuccess) return err;
  reduce_kernel<<<1, kEpilogueThreads, 0, s>>>(loss, ce, red, n_rows);
  return cudaGetLastError();
}

cudaError_t launch_rescale(DType dt, void* out, const float* grad_out, int64_t n_rows, int64_t width,
                           const RowLayoutArgs& l, cudaStream_t s) {
  const int64_t work = n_rows * ((width + kTileCols - 1) / kTileCols);
  const unsigned blocks = static_cast<unsigned>(work < kRescaleBlocks ? (work > 0 ? work : 1) : kRescaleBlocks);
  return by_dtype(dt, [&](auto zero) {
    using T = decltype(zero);
    return by_flag(rows_aligned<T>(out, l.os_outer, l.os_inner), [&](auto al) {
      rescale_kernel<T, al.value><<<blocks, kThreads, 0, s>>>(static_cast<T*>(out), grad_out, n_rows, width, l);
      return cudaGetLastError();
    });
  });
}

}  // namespace tofu
