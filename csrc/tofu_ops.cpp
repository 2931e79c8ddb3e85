// The CUDA kernels of the torch ops tofu_kernels::<op> (TORCH_LIBRARY_IMPL only). The ops,
// their schemas and fakes (the same buffer checks as here) are defined once in Python:
// tofu_kernels/backends/gpu.py, OPS (docs/design.md section 5); torch refuses a function
// below whose signature does not match its schema. Importing tofu_kernels._C registers them.

#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "tofu_kernels.h"
#include "tofu_math.cuh"

// The architectures the extension holds, e.g. "sm_80 sm_90 sm_100 compute_100" (cubins sm_XY,
// PTX compute_XY): setup.py reads them from the -gencode flags torch passes nvcc.
#ifndef TOFU_CUDA_ARCHS
#error "TOFU_CUDA_ARCHS is not defined: build the extension with setup.py (pip install --no-build-isolation .)"
#endif

namespace {

tofu::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return tofu::DType::kFloat32;
    case at::kBFloat16: return tofu::DType::kBFloat16;
    case at::kHalf: return tofu::DType::kFloat16;
    default: TORCH_CHECK(false, "tofu_kernels: logits must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

// 1 / beta rounded once, in double (the Triton backend passes the same fp32 value).
float inv(double beta) { return static_cast<float>(1.0 / beta); }

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "tofu_kernels: ", what, " launch failed: ", cudaGetErrorString(err));
}

void check_labels(const at::Tensor& labels, int64_t n_rows) {
  TORCH_CHECK(labels.is_cuda() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == n_rows,
              "tofu_kernels: labels must be a contiguous int64 CUDA tensor with one entry per row");
}

void check_common(const at::Tensor& x, const at::Tensor& labels, int64_t n_rows) {
  TORCH_CHECK(x.is_cuda(), "tofu_kernels: logits must be a CUDA tensor");
  check_labels(labels, n_rows);
  TORCH_CHECK(x.dim() == 0 || x.stride(-1) == 1 || x.size(-1) <= 1, "tofu_kernels: vocab dim must have stride 1");
}

void check_f32(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "tofu_kernels: ", name, " must be a contiguous float32 CUDA tensor of ", numel, " elements");
}

// Floats of one rank's partial statistics (records.Partials.per_rank): the records, the
// meta record under TP, the metric accumulators with metrics.
int64_t parts_per_rank(int64_t n_rows, int64_t splits, bool has_meta, bool metrics) {
  return (n_rows * splits + (has_meta ? 1 : 0)) * tofu::stat::kWidth + (metrics ? n_rows * splits * tofu::macc::kWidth : 0);
}

// The optional metrics output: [n_rows, metric::kWidth] fp32, or nullptr.
float* metrics_out(const std::optional<at::Tensor>& met, int64_t n_rows) {
  if (!met.has_value()) return nullptr;
  check_f32(*met, n_rows * tofu::metric::kWidth, "met");
  return met->data_ptr<float>();
}

void row_stats(const at::Tensor& x, const at::Tensor& labels, at::Tensor& stats, int64_t n_rows, int64_t splits,
               int64_t n_inner, int64_t s_outer, int64_t s_inner, int64_t n_valid, int64_t vocab_start, int64_t chunk,
               int64_t ignore_index, double beta, bool write_meta, int64_t meta_vocab_end, int64_t meta_width,
               bool metrics) {
  check_common(x, labels, n_rows);
  TORCH_CHECK(n_rows > 0 && splits > 0 && splits <= 65535 && chunk > 0, "tofu_kernels: bad split configuration");
  check_f32(stats, parts_per_rank(n_rows, splits, write_meta, metrics), "stats");
  const c10::cuda::CUDAGuard guard(x.device());
  const tofu::RowLayoutArgs l{n_inner, s_outer, s_inner, 0, 0};
  const tofu::StatsArgs a{n_valid,   vocab_start, chunk,          ignore_index, static_cast<float>(beta),
                          inv(beta), write_meta,  meta_vocab_end, meta_width,   metrics};
  check_cuda(tofu::launch_row_stats(dtype_of(x), x.data_ptr(), labels.data_ptr<int64_t>(), stats.data_ptr<float>(),
                                    n_rows, static_cast<int>(splits), l, a, c10::cuda::getCurrentCUDAStream()),
             "row_stats");
}

void epilogue(const at::Tensor& parts, const at::Tensor& labels, at::Tensor& loss, at::Tensor& ce, at::Tensor& rec,
              at::Tensor& red, const std::optional<at::Tensor>& met, int64_t n_rows, int64_t splits, int64_t world,
              int64_t rank_stride, bool has_meta, int64_t vocab_size, int64_t ignore_index, double gamma, double beta,
              int64_t reduction) {
  check_labels(labels, n_rows);
  const int64_t per_rank = parts_per_rank(n_rows, splits, has_meta, met.has_value());
  TORCH_CHECK(world >= 1 && (world == 1 || rank_stride >= per_rank), "tofu_kernels: bad partial-statistics layout");
  check_f32(parts, world == 1 ? per_rank : world * rank_stride, "parts");
  check_f32(loss, n_rows, "loss");
  check_f32(ce, n_rows, "ce");
  check_f32(rec, n_rows * tofu::gparam::kWidth, "rec");
  check_f32(red, tofu::reduced::kWidth, "red");
  float* met_ptr = metrics_out(met, n_rows);
  TORCH_CHECK(reduction >= tofu::reduction::kNone && reduction <= tofu::reduction::kMean, "tofu_kernels: bad reduction");
  if (n_rows == 0) return;
  const c10::cuda::CUDAGuard guard(parts.device());
  const tofu::PartsArgs p{n_rows, splits, world, rank_stride, has_meta, vocab_size};
  const tofu::LossArgs a{ignore_index, static_cast<float>(gamma), static_cast<float>(beta), inv(beta),
                         static_cast<int>(reduction)};
  check_cuda(tofu::launch_epilogue(parts.data_ptr<float>(), labels.data_ptr<int64_t>(), loss.data_ptr<float>(),
                                   ce.data_ptr<float>(), rec.data_ptr<float>(), red.data_ptr<float>(), met_ptr, p, a,
                                   c10::cuda::getCurrentCUDAStream()),
             "epilogue");
}

void check_upstream(const at::Tensor& upstream, const at::Tensor& scale, int64_t up_stride, int64_t n_rows) {
  TORCH_CHECK(upstream.is_cuda() && upstream.scalar_type() == at::kFloat && upstream.dim() == 1 &&
                  upstream.numel() >= 1 && (up_stride == 0 || (up_stride == upstream.stride(0) && upstream.numel() == n_rows)),
              "tofu_kernels: upstream must be a 1-D float32 CUDA tensor: one element (up_stride 0) or one per row");
  check_f32(scale, 1, "scale");
}

void grad(const at::Tensor& x, at::Tensor& out, const at::Tensor& labels, const at::Tensor& rec,
          const at::Tensor& upstream, const at::Tensor& scale, int64_t up_stride, int64_t n_inner, int64_t xs_outer,
          int64_t xs_inner, int64_t os_outer, int64_t os_inner, int64_t n_valid, int64_t vocab_start, double beta) {
  const int64_t n_rows = labels.numel();
  check_common(x, labels, n_rows);
  check_f32(rec, n_rows * tofu::gparam::kWidth, "rec");
  check_upstream(upstream, scale, up_stride, n_rows);
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_cuda(), "tofu_kernels: out must match logits");
  const int64_t width = x.size(-1);
  TORCH_CHECK((width + tofu::kTileCols - 1) / tofu::kTileCols <= 65535, "tofu_kernels: vocab shard too wide");
  if (n_rows == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const tofu::RowLayoutArgs l{n_inner, xs_outer, xs_inner, os_outer, os_inner};
  const tofu::GradArgs a{n_valid, width, vocab_start, up_stride, inv(beta)};
  check_cuda(tofu::launch_grad(dtype_of(x), x.data_ptr(), out.data_ptr(), labels.data_ptr<int64_t>(),
                               rec.data_ptr<float>(), upstream.data_ptr<float>(), scale.data_ptr<float>(), n_rows, l, a,
                               c10::cuda::getCurrentCUDAStream()),
             "grad");
}

// In-place variant: the gradient overwrites the logits (each element read, then written).
void grad_inplace(at::Tensor& x, const at::Tensor& labels, const at::Tensor& rec, const at::Tensor& upstream,
                  const at::Tensor& scale, int64_t up_stride, int64_t n_inner, int64_t xs_outer, int64_t xs_inner,
                  int64_t n_valid, int64_t vocab_start, double beta) {
  grad(x, x, labels, rec, upstream, scale, up_stride, n_inner, xs_outer, xs_inner, xs_outer, xs_inner, n_valid,
       vocab_start, beta);
}

void grad_in_forward(const at::Tensor& x, at::Tensor& out, const at::Tensor& labels, at::Tensor& loss,
                     at::Tensor& ce, at::Tensor& red, const std::optional<at::Tensor>& met, int64_t n_inner,
                     int64_t xs_outer, int64_t xs_inner, int64_t os_outer, int64_t os_inner, int64_t ignore_index,
                     double gamma, double beta, bool mean) {
  const int64_t n_rows = labels.numel();
  check_common(x, labels, n_rows);
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_cuda(), "tofu_kernels: out must match logits");
  check_f32(loss, n_rows, "loss");
  check_f32(ce, n_rows, "ce");
  check_f32(red, tofu::reduced::kWidth, "red");
  float* met_ptr = metrics_out(met, n_rows);
  TORCH_CHECK(n_rows > 0, "tofu_kernels: grad_in_forward needs at least one row");
  const c10::cuda::CUDAGuard guard(x.device());
  const tofu::RowLayoutArgs l{n_inner, xs_outer, xs_inner, os_outer, os_inner};
  const tofu::LossArgs a{ignore_index, static_cast<float>(gamma), static_cast<float>(beta), inv(beta),
                         mean ? tofu::reduction::kMean : tofu::reduction::kSum};
  check_cuda(tofu::launch_grad_in_forward(dtype_of(x), x.data_ptr(), out.data_ptr(), labels.data_ptr<int64_t>(),
                                          loss.data_ptr<float>(), ce.data_ptr<float>(), red.data_ptr<float>(), met_ptr,
                                          n_rows, x.size(-1), l, a, c10::cuda::getCurrentCUDAStream()),
             "grad_in_forward");
}

void grad_in_forward_inplace(at::Tensor& x, const at::Tensor& labels, at::Tensor& loss, at::Tensor& ce,
                             at::Tensor& red, const std::optional<at::Tensor>& met, int64_t n_inner, int64_t xs_outer,
                             int64_t xs_inner, int64_t ignore_index, double gamma, double beta, bool mean) {
  grad_in_forward(x, x, labels, loss, ce, red, met, n_inner, xs_outer, xs_inner, xs_outer, xs_inner, ignore_index,
                  gamma, beta, mean);
}

void rescale(at::Tensor& out, const at::Tensor& grad_out, int64_t n_rows, int64_t n_inner, int64_t s_outer,
             int64_t s_inner) {
  TORCH_CHECK(out.is_cuda(), "tofu_kernels: out must be a CUDA tensor");
  check_f32(grad_out, 1, "grad_out");
  if (n_rows == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const tofu::RowLayoutArgs l{n_inner, 0, 0, s_outer, s_inner};
  check_cuda(tofu::launch_rescale(dtype_of(out), out.data_ptr(), grad_out.data_ptr<float>(), n_rows, out.size(-1), l,
                                  c10::cuda::getCurrentCUDAStream()),
             "rescale");
}

}  // namespace

TORCH_LIBRARY_IMPL(tofu_kernels, CUDA, m) {
  m.impl("row_stats", &row_stats);
  m.impl("epilogue", &epilogue);
  m.impl("grad", &grad);
  m.impl("grad_inplace", &grad_inplace);
  m.impl("grad_in_forward", &grad_in_forward);
  m.impl("grad_in_forward_inplace", &grad_in_forward_inplace);
  m.impl("rescale", &rescale);
}

// A Python module named _C so that `import tofu_kernels._C` loads the library (and the
// static registrations above) the ordinary way. It also carries the launch constants of
// tofu_kernels.h, which the Python launch policy of both GPU backends reads, and ARCHS, from
// which tofu_kernels.extension decides whether the kernels run on a card.
static struct PyModuleDef tofu_module = {PyModuleDef_HEAD_INIT, "_C", "TOFU CUDA kernels (torch ops)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&tofu_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "TILE_COLS", static_cast<long>(tofu::kTileCols)) < 0 ||
      PyModule_AddIntConstant(m, "TARGET_BLOCKS", static_cast<long>(tofu::kTargetBlocks)) < 0 ||
      PyModule_AddIntConstant(m, "EPILOGUE_THREADS", tofu::kEpilogueThreads) < 0 ||
      PyModule_AddIntConstant(m, "RESCALE_BLOCKS", tofu::kRescaleBlocks) < 0 ||
      PyModule_AddStringConstant(m, "ARCHS", TOFU_CUDA_ARCHS) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
