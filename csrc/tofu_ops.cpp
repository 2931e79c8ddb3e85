// Torch custom-op registration for the TOFU CUDA kernels (namespace tofu_kernels).
//
// Ops write, wrappers allocate: every op writes into tensors the Python wrapper
// allocated, and the schemas mark them mutated (Tensor(a!)), so torch.compile and
// CUDA-graph capture see the true data flow. Fake (meta) implementations are in
// tofu_kernels/backends/cuda_backend.py. Importing tofu_kernels._C registers the ops.

#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "tofu_kernels.h"
#include "tofu_math.cuh"

namespace {

tofu::DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return tofu::DType::kFloat32;
    case at::kBFloat16: return tofu::DType::kBFloat16;
    case at::kHalf: return tofu::DType::kFloat16;
    default: TORCH_CHECK(false, "tofu_kernels: logits must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "tofu_kernels: ", what, " launch failed: ", cudaGetErrorString(err));
}

void check_common(const at::Tensor& x, const at::Tensor& labels, int64_t n_rows) {
  TORCH_CHECK(x.is_cuda(), "tofu_kernels: logits must be a CUDA tensor");
  TORCH_CHECK(labels.is_cuda() && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == n_rows,
              "tofu_kernels: labels must be a contiguous int64 CUDA tensor with one entry per row");
  TORCH_CHECK(x.dim() == 0 || x.stride(-1) == 1 || x.size(-1) <= 1, "tofu_kernels: vocab dim must have stride 1");
}

void check_f32(const at::Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "tofu_kernels: ", name, " must be a contiguous float32 CUDA tensor of ", numel, " elements");
}

void row_stats(const at::Tensor& x, const at::Tensor& labels, at::Tensor& stats, int64_t n_inner,
               int64_t s_outer, int64_t s_inner, int64_t n_valid, int64_t vocab_start, int64_t chunk,
               int64_t ignore_index, double beta) {
  const int64_t n_rows = labels.numel();
  check_common(x, labels, n_rows);
  TORCH_CHECK(n_rows > 0 && stats.numel() % (n_rows * tofu::stat::kWidth) == 0,
              "tofu_kernels: stats must be [N, splits, ", int(tofu::stat::kWidth), "]");
  const int64_t splits = stats.numel() / (n_rows * tofu::stat::kWidth);
  check_f32(stats, n_rows * splits * tofu::stat::kWidth, "stats");
  TORCH_CHECK(splits <= 65535 && chunk > 0, "tofu_kernels: bad split configuration");
  const c10::cuda::CUDAGuard guard(x.device());
  const tofu::RowLayoutArgs l{n_inner, s_outer, s_inner, 0, 0};
  const tofu::StatsArgs a{n_valid, vocab_start, chunk, ignore_index, static_cast<float>(beta)};
  check_cuda(tofu::launch_row_stats(dtype_of(x), x.data_ptr(), labels.data_ptr<int64_t>(),
                                    stats.data_ptr<float>(), n_rows, static_cast<int>(splits), l, a,
                                    c10::cuda::getCurrentCUDAStream()),
             "row_stats");
}

void grad(const at::Tensor& x, at::Tensor& out, const at::Tensor& labels, const at::Tensor& params,
          int64_t n_inner, int64_t xs_outer, int64_t xs_inner, int64_t os_outer, int64_t os_inner,
          int64_t n_valid, int64_t vocab_start, double beta) {
  const int64_t n_rows = labels.numel();
  check_common(x, labels, n_rows);
  check_f32(params, n_rows * tofu::gparam::kWidth, "params");
  TORCH_CHECK(out.scalar_type() == x.scalar_type() && out.is_cuda(), "tofu_kernels: out must match logits");
  const int64_t width = x.size(-1);
  TORCH_CHECK((width + tofu::kTileCols - 1) / tofu::kTileCols <= 65535, "tofu_kernels: vocab shard too wide");
  if (n_rows == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const tofu::RowLayoutArgs l{n_inner, xs_outer, xs_inner, os_outer, os_inner};
  const tofu::GradArgs a{n_valid, width, vocab_start, static_cast<float>(beta)};
  check_cuda(tofu::launch_grad(dtype_of(x), x.data_ptr(), out.data_ptr(), labels.data_ptr<int64_t>(),
                               params.data_ptr<float>(), n_rows, l, a, c10::cuda::getCurrentCUDAStream()),
             "grad");
}

// In-place variant: the gradient overwrites the logits (each element read, then written).
void grad_inplace(at::Tensor& x, const at::Tensor& labels, const at::Tensor& params, int64_t n_inner,
                  int64_t s_outer, int64_t s_inner, int64_t n_valid, int64_t vocab_start, double beta) {
  grad(x, x, labels, params, n_inner, s_outer, s_inner, s_outer, s_inner, n_valid, vocab_start, beta);
}

void finalize(const at::Tensor& stats, const at::Tensor& labels, const std::optional<at::Tensor>& vocab_size_t,
              at::Tensor& out, int64_t vocab_size, double gamma, double beta, int64_t ignore_index) {
  const int64_t n_rows = labels.numel();
  TORCH_CHECK(labels.is_cuda() && labels.scalar_type() == at::kLong && labels.is_contiguous(),
              "tofu_kernels: labels must be a contiguous int64 CUDA tensor");
  check_f32(stats, n_rows * tofu::stat::kWidth, "stats");
  check_f32(out, n_rows * tofu::rowout::kWidth, "out");
  const int64_t* vs = nullptr;
  if (vocab_size_t.has_value()) {
    TORCH_CHECK(vocab_size_t->is_cuda() && vocab_size_t->scalar_type() == at::kLong && vocab_size_t->numel() == 1,
                "tofu_kernels: vocab_size tensor must be a one-element int64 CUDA tensor");
    vs = vocab_size_t->data_ptr<int64_t>();
  }
  if (n_rows == 0) return;
  const c10::cuda::CUDAGuard guard(stats.device());
  const tofu::FinalizeArgs a{ignore_index, vocab_size, static_cast<float>(gamma), static_cast<float>(beta)};
  check_cuda(tofu::launch_finalize(stats.data_ptr<float>(), labels.data_ptr<int64_t>(), vs,
                                   out.data_ptr<float>(), n_rows, a, c10::cuda::getCurrentCUDAStream()),
             "finalize");
}

}  // namespace

TORCH_LIBRARY(tofu_kernels, m) {
  m.def(
      "row_stats(Tensor x, Tensor labels, Tensor(a!) stats, int n_inner, int s_outer, int s_inner, "
      "int n_valid, int vocab_start, int chunk, int ignore_index, float beta) -> ()");
  m.def(
      "grad(Tensor x, Tensor(a!) out, Tensor labels, Tensor params, int n_inner, int xs_outer, "
      "int xs_inner, int os_outer, int os_inner, int n_valid, int vocab_start, float beta) -> ()");
  m.def(
      "grad_inplace(Tensor(a!) x, Tensor labels, Tensor params, int n_inner, int s_outer, "
      "int s_inner, int n_valid, int vocab_start, float beta) -> ()");
  m.def(
      "finalize(Tensor stats, Tensor labels, Tensor? vocab_size_t, Tensor(a!) out, int vocab_size, "
      "float gamma, float beta, int ignore_index) -> ()");
}

TORCH_LIBRARY_IMPL(tofu_kernels, CUDA, m) {
  m.impl("row_stats", &row_stats);
  m.impl("grad", &grad);
  m.impl("grad_inplace", &grad_inplace);
  m.impl("finalize", &finalize);
}

// A Python module named _C so that `import tofu_kernels._C` loads the library (and the
// static registrations above) the ordinary way. It also carries the launch constants
// (tofu_kernels.h), so Python's launch policy reads them from C++ instead of copying them.
static struct PyModuleDef tofu_module = {PyModuleDef_HEAD_INIT, "_C", "TOFU CUDA kernels (torch ops)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&tofu_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "THREADS", tofu::kThreads) < 0 ||
      PyModule_AddIntConstant(m, "TILE_COLS", static_cast<long>(tofu::kTileCols)) < 0 ||
      PyModule_AddIntConstant(m, "TARGET_BLOCKS", static_cast<long>(tofu::kTargetBlocks)) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
