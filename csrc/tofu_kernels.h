// Host-side interface of the TOFU CUDA kernels (implemented in tofu_kernels.cu).
// Plain C++ types only, so tofu_ops.cpp (torch op registration) and the kernels compile
// separately: the .cu never includes torch headers.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace tofu {

// Launch policy of both GPU backends, defined here: the extension module exports
// TILE_COLS, TARGET_BLOCKS, EPILOGUE_THREADS and RESCALE_BLOCKS, which the Triton
// backend's launch policy reads (tofu_kernels/backends/gpu.py; a test compares its
// defaults, used where the extension is not built, with this file).
constexpr int kThreads = 256;     // threads per block: statistics, gradient, rescale
constexpr int kVecBytes = 16;     // one vector load / store per thread
constexpr int kUnroll = 2;        // vectors in flight per thread in the streaming loops
// Columns per gradient block, and the granularity of statistics splits: a multiple of
// every dtype's vector width (8 bf16 / 4 fp32), so every split starts 16-byte aligned.
constexpr int64_t kTileCols = 4096;
// Blocks that fill 132 SMs several times over; fewer rows than this get split.
constexpr int64_t kTargetBlocks = 1024;
constexpr int kEpilogueThreads = 1024;  // the one-block O(N) kernels (epilogue, count, reduce)
constexpr int kRowThreads = 512;        // gradient in the forward: one block per row
constexpr int kRescaleBlocks = 1056;    // persistent grid of the rescale (8 per SM)

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
  float beta, inv_beta;  // inv_beta = 1 / beta, rounded once on the host
  bool write_meta;       // tensor parallelism: this rank's meta record after the stats
  int64_t meta_vocab_end, meta_width;
  bool metrics;          // the metric accumulators after the records (and the meta record)
};

// The partial statistics the epilogue merges: rank w's block starts at w * rank_stride
// floats and holds n_rows * splits records (then one meta record under TP).
struct PartsArgs {
  int64_t n_rows, splits, world, rank_stride;
  bool has_meta;        // read the global vocab size from the ranks' meta records
  int64_t vocab_size;   // otherwise this one
};

struct LossArgs {
  int64_t ignore_index;
  float gamma, beta, inv_beta;
  int reduction;  // tofu::reduction
};

struct GradArgs {
  int64_t n_valid, width, vocab_start;
  int64_t up_stride;  // upstream gradient element of row r: r * up_stride (0: a scalar)
  float inv_beta;
};

// stats: fp32 [n_rows, splits, stat::kWidth] per (row, split) (+ 1 meta record).
cudaError_t launch_row_stats(DType dt, const void* x, const int64_t* labels, float* stats,
                             int64_t n_rows, int splits, const RowLayoutArgs& l, const StatsArgs& a,
                             cudaStream_t s);
// One block: loss, ce [n_rows]; rec [n_rows, gparam::kWidth]; red [reduced::kWidth] = the
// reduced loss and ce, and the scale (1 / token count for a mean, else 1); met
// [n_rows, metric::kWidth] or nullptr (then parts has no metric accumulators).
cudaError_t launch_epilogue(const float* parts, const int64_t* labels, float* loss, float* ce, float* rec,
                            float* red, float* met, const PartsArgs& p, const LossArgs& a, cudaStream_t s);
// rec: fp32 [n_rows, gparam::kWidth]; upstream fp32; scale fp32 [1]; out may alias x.
cudaError_t launch_grad(DType dt, const void* x, void* out, const int64_t* labels, const float* rec,
                        const float* upstream, const float* scale, int64_t n_rows, const RowLayoutArgs& l,
                        const GradArgs& a, cudaStream_t s);
// Gradient in the forward, whole rows: the count of tokens (the scale
// into red[reduced::kScale]), one block per row writing loss, ce and the gradient for an
// upstream of 1 (out may alias x) and, where met is not nullptr, the row's metrics, then the
// reduced loss and ce into red.
cudaError_t launch_grad_in_forward(DType dt, const void* x, void* out, const int64_t* labels, float* loss,
                                   float* ce, float* red, float* met, int64_t n_rows, int64_t width,
                                   const RowLayoutArgs& l, const LossArgs& a, cudaStream_t s);
// out *= *grad_out, on the device, returning at once when it is 1.
cudaError_t launch_rescale(DType dt, void* out, const float* grad_out, int64_t n_rows, int64_t width,
                           const RowLayoutArgs& l, cudaStream_t s);

}  // namespace tofu
