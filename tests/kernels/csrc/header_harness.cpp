// Host harness for csrc/tofu_math.cuh: the kernels' per-element and per-row math,
// compiled by g++ from the same header and called from tests/kernels/test_cuda_ext.py via
// ctypes, so it is checked against the Python reference on machines without a GPU.
#include "tofu_math.cuh"

namespace {

// Mirror of the kernels' data flow: `parts` independent partial statistics (threads /
// splits / ranks), each folding its values in vectors of 8 (masked lanes = -inf), then
// merged pairwise in a fixed order like the warp/block reduction (with Metrics, the metrics'
// accumulators too: the entropy's, and the max before the target column t).
template <bool BetaOne, bool Metrics = false>
tofu::Stats stats_of(const float* z, int n, float beta, int parts, long long t = 0) {
  const float ib = tofu::kLog2e / beta;
  tofu::Stats total = tofu::empty_stats();
  const int per = (n + parts - 1) / parts;
  for (int p = 0; p < parts; ++p) {
    tofu::Stats st = tofu::empty_stats();
    for (int i = p * per; i < (p + 1) * per && i < n; i += 8) {
      float v[8];
      for (int k = 0; k < 8; ++k) {
        const int j = i + k;
        v[k] = (j < n && j < (p + 1) * per) ? z[j] : -INFINITY;
      }
      tofu::update<8, BetaOne, Metrics>(st, v, ib);
      tofu::update_before<8, Metrics>(st, v, i, t);
    }
    total = tofu::merge<BetaOne, Metrics>(total, st, ib);
  }
  return total;
}

}  // namespace

extern "C" {

// The record layouts as the kernels see them: stat::{kM, kS1, kSb, kZt, kWidth},
// gparam::{kG, kM, kLogSb, kQtM1, kWidth}, meta::{kVocabStart, kVocabEnd, kWidth, kRows},
// reduced::{kLoss, kCe, kScale, kWidth}, reduction::{kNone, kSum, kMean},
// metric::{kEntropy, kTop1, kWidth}, macc::{kE, kBefore, kWidth}.
int tofu_layouts(int* out) {
  const int v[] = {tofu::stat::kM,        tofu::stat::kS1,        tofu::stat::kSb,      tofu::stat::kZt,
                   tofu::stat::kWidth,    tofu::gparam::kG,       tofu::gparam::kM,     tofu::gparam::kLogSb,
                   tofu::gparam::kQtM1,   tofu::gparam::kWidth,   tofu::meta::kVocabStart, tofu::meta::kVocabEnd,
                   tofu::meta::kWidth,    tofu::meta::kRows,      tofu::reduced::kLoss, tofu::reduced::kCe,
                   tofu::reduced::kScale, tofu::reduced::kWidth,  tofu::reduction::kNone, tofu::reduction::kSum,
                   tofu::reduction::kMean, tofu::metric::kEntropy, tofu::metric::kTop1, tofu::metric::kWidth,
                   tofu::macc::kE,        tofu::macc::kBefore,    tofu::macc::kWidth};
  const int n = sizeof(v) / sizeof(v[0]);
  for (int k = 0; k < n; ++k) out[k] = v[k];
  return n;
}

void tofu_row_stats(const float* z, int n, float beta, int parts, float* out) {
  const tofu::Stats st = beta == 1.0f ? stats_of<true>(z, n, beta, parts) : stats_of<false>(z, n, beta, parts);
  out[0] = st.m;
  out[1] = st.s1;
  out[2] = st.sb;
}

// The statistics with the metrics' accumulators (the metrics' compile-time switch on), the
// target at column t: out = {m, s1, sb, e, before}.
void tofu_row_stats_ent(const float* z, int n, float beta, int parts, long long t, float* out) {
  const tofu::Stats st =
      beta == 1.0f ? stats_of<true, true>(z, n, beta, parts, t) : stats_of<false, true>(z, n, beta, parts, t);
  out[0] = st.m;
  out[1] = st.s1;
  out[2] = st.sb;
  out[3] = st.e;
  out[4] = st.before;
}

// out = {entropy, top1} of one row's merged statistics.
void tofu_row_metrics(float m, float s1, float sb, float e, float before, float zt, long long label,
                      long long ignore_index, long long vocab_size, float* out) {
  const tofu::RowMetrics r = tofu::row_metrics({m, s1, sb, e, before}, zt, label, ignore_index, vocab_size);
  out[0] = r.entropy;
  out[1] = r.top1;
}

float tofu_focal_weight(float log_p, float gamma) { return tofu::focal_weight(log_p, gamma); }

void tofu_finalize_row(float m, float s1, float sb, float zt, long long label, long long ignore_index,
                       long long vocab_size, float gamma, float beta, float* out) {
  const float inv_beta = static_cast<float>(1.0 / beta);  // as tofu_ops.cpp rounds it
  const tofu::RowOut o = tofu::finalize_row({m, s1, sb}, zt, label, ignore_index, vocab_size, gamma, beta, inv_beta);
  const float v[6] = {o.loss, o.ce, o.g, o.m, o.log_sb, o.qt_m1};
  for (int k = 0; k < 6; ++k) out[k] = v[k];
}

void tofu_grad_row(const float* z, int n, int t, float coef, float m, float log_sb, float qt_m1,
                   float beta, float* out) {
  const float ib = tofu::kLog2e / beta;
  for (int j = 0; j < n; ++j)
    out[j] = tofu::grad_elem(z[j], j == t, tofu::RowGrad{coef, m, log_sb * tofu::kLog2e, qt_m1}, ib);
}

}  // extern "C"
