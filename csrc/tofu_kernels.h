// Host-side interface of the TOFU CUDA kernels (implemented in tofu_kernels.cu).
// Plain C++ types only, so tofu_ops.cpp (torch op registration) and the kernels compile
// separately: the .cu never includes torch headers.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace tofu {

// Launch policy, owned here and read by Python from the extension module
// (tofu_kernels._C.THREADS, .TILE_COLS, .TARGET_BLOCKS).
constexpr int kThreads = 256;     // threads per block, every kernel
constexpr int kVecBytes = 16;     // one vector load / store per thread
constexpr int kUnroll = 2;        // vectors in flight per thread in the statistics loop
// Columns per gradient block, and the granularity of statistics splits: a multiple of
// every dtype's vector width (8 bf16 / 4 fp32), so every split starts 16-byte aligned.
constexpr int64_t kTileCols = 4096;
// Blocks that fill 132 SMs several times over; fewer rows than this get split.
constexpr int64_t kTargetBlocks = 1024;

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Row r of x starts at (r / n_inner) * xs_outer + (r % n_inner) * xs_inner elements;
// of the output (gradient) at the same with os_*. The vocab dim has stride 1.
struct RowLayoutArgs {
  int64_t n_inner, xs_outer, xs_inner, os_outer, os_inner;
};

struct StatsArgs {
  int64_t n_valid;       // real columns [0, n_valid); the rest of the row is padding
  int64_t vocab_start;   // global id of local column 0
  int64_t chunk;         // columns per split (grid.y)
  int64_t ignore_index;
  float beta;
};

struct GradArgs {
  int64_t n_valid, width, vocab_start;
  float beta;
};

struct FinalizeArgs {
  int64_t ignore_index;
  int64_t vocab_size;  // used when no device vocab-size tensor is given
  float gamma, beta;
};

// stats: fp32 [n_rows, splits, stat::kWidth] per (row, split).
cudaError_t launch_row_stats(DType dt, const void* x, const int64_t* labels, float* stats,
                             int64_t n_rows, int splits, const RowLayoutArgs& l, const StatsArgs& a,
                             cudaStream_t s);
// params: fp32 [n_rows, gparam::kWidth]; out may alias x.
cudaError_t launch_grad(DType dt, const void* x, void* out, const int64_t* labels,
                        const float* params, int64_t n_rows, const RowLayoutArgs& l,
                        const GradArgs& a, cudaStream_t s);
// stats fp32 [n_rows, stat::kWidth] combined; out fp32 [rowout::kWidth, n_rows].
cudaError_t launch_finalize(const float* stats, const int64_t* labels, const int64_t* vocab_size_ptr,
                            float* out, int64_t n_rows, const FinalizeArgs& a, cudaStream_t s);

}  // namespace tofu
