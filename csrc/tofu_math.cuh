// TOFU per-element and per-row math, shared by the CUDA kernels (tofu_kernels.cu) and a
// host test harness (tests/kernels/csrc/header_harness.cpp) compiled by g++ from this same file,
// so the math is checked against the Python reference on machines without a GPU.
// Twin of tofu_kernels/tofu_math.py (same records, same formulas); the math is derived in
// docs/design.md section 2.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define TOFU_HD __host__ __device__ __forceinline__
#else
#define TOFU_HD inline
#endif

namespace tofu {

// fp32 record layouts, mirrored from tofu_kernels/records.py (Stat, GradParam, Meta,
// Reduced, Reduction, Metric, MetricAcc); tests/kernels/test_cuda_ext.py::test_record_layouts_agree checks the two agree.
namespace stat {  // statistics of (part of) a row: [..., kWidth]
enum : int { kM = 0, kS1 = 1, kSb = 2, kZt = 3, kWidth = 4 };
}
namespace gparam {  // what the backward reads per row: [N, kWidth]
enum : int { kG = 0, kM = 1, kLogSb = 2, kQtM1 = 3, kWidth = 4 };
}
namespace meta {  // a rank's metadata record (int32 bits), after its statistics records
enum : int { kVocabStart = 0, kVocabEnd = 1, kWidth = 2, kRows = 3 };
}
namespace reduced {  // the reduced outputs of a forward: [kWidth]
enum : int { kLoss = 0, kCe = 1, kScale = 2, kWidth = 3 };
}
namespace reduction {  // reduction= as the kernels see it
enum : int { kNone = 0, kSum = 1, kMean = 2 };
}
namespace metric {  // the optional per-row metrics: [N, kWidth]
enum : int { kEntropy = 0, kTop1 = 1, kWidth = 2 };
}
namespace macc {  // the metric accumulators of one part of a row
enum : int { kE = 0, kBefore = 1, kWidth = 2 };
}

// log2(e): the kernels use exp2 on pre-scaled arguments (ex2.approx on the SFU).
constexpr float kLog2e = 1.4426950408889634f;

// Running statistics of a set of columns of one row, in fp32:
//   m = max z,  s1 = sum exp(z - m),  sb = sum exp((z - m) / beta),
//   e = sum exp(z - m) (z - m)   (the entropy accumulator; only with Metrics, else left 0),
//   before = max z over the columns before the target (only with Metrics, else left -inf).
// An empty set is {-inf, 0, 0, 0, -inf}.
struct Stats {
  float m;
  float s1;
  float sb;
  float e;
  float before;
};

TOFU_HD Stats empty_stats() { return {-INFINITY, 0.f, 0.f, 0.f, -INFINITY}; }

// Merge two partial statistics: warp/block reductions, vocab splits, TP ranks.
// inv_beta_log2e = log2(e) / beta. With BetaOne, sb mirrors s1 (1 exponential/element).
// With Metrics, e = sum_r exp(m_r - M) (e_r + (m_r - M) s1_r) (an empty part adds 0) and
// before = max_r before_r.
template <bool BetaOne, bool Metrics = false>
TOFU_HD Stats merge(Stats a, Stats b, float inv_beta_log2e) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return a;  // both empty (before <= m): keep a, never exp(-inf + inf)
  const float da = a.m - m, db = b.m - m;
  const float ea = exp2f(da * kLog2e), eb = exp2f(db * kLog2e);
  Stats r;
  r.m = m;
  r.s1 = a.s1 * ea + b.s1 * eb;
  r.sb = BetaOne ? r.s1 : a.sb * exp2f(da * inv_beta_log2e) + b.sb * exp2f(db * inv_beta_log2e);
  r.e = Metrics ? ea * (a.e + (a.m == -INFINITY ? 0.f : da) * a.s1) + eb * (b.e + (b.m == -INFINITY ? 0.f : db) * b.s1)
            : 0.f;
  r.before = Metrics ? fmaxf(a.before, b.before) : -INFINITY;
  return r;
}

// Fold K new values (masked ones are -inf) into st: one max over the K values, one
// rescale of the running sums only when the max grew, then K (or 2K) exponentials; with
// Metrics the entropy terms exp(d) * d from the same exponentials (-inf columns add 0).
template <int K, bool BetaOne, bool Metrics = false>
TOFU_HD void update(Stats& st, const float (&z)[K], float inv_beta_log2e) {
  float bm = st.m;
#pragma unroll
  for (int k = 0; k < K; ++k) bm = fmaxf(bm, z[k]);
  if (bm == -INFINITY) return;
  float s1 = st.s1, sb = st.sb, e = st.e;
  if (bm > st.m) {  // st.m = -inf gives exp2(-inf) = 0: the empty sums stay 0
    const float a = exp2f((st.m - bm) * kLog2e);
    if (Metrics) e = st.m == -INFINITY ? 0.f : a * (e + (st.m - bm) * s1);  // with the old s1
    s1 *= a;
    if (!BetaOne) sb *= exp2f((st.m - bm) * inv_beta_log2e);
  }
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float d = z[k] - bm;
    const float x = exp2f(d * kLog2e);
    s1 += x;
    if (Metrics) e += x * fmaxf(d, -3.402823466e+38f);
    if (!BetaOne) sb += exp2f(d * inv_beta_log2e);
  }
  st.m = bm;
  st.s1 = s1;
  st.sb = BetaOne ? s1 : sb;
  st.e = Metrics ? e : 0.f;
}

// With Metrics: fold K values of consecutive columns col0, col0 + 1, ... into st.before, those
// before the target column t (the row's columns counted as the caller counts col0).
template <int K, bool Metrics>
TOFU_HD void update_before(Stats& st, const float* z, int64_t col0, int64_t t) {
  if constexpr (Metrics) {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (col0 + k < t) st.before = fmaxf(st.before, z[k]);
  }
}

// What the gradient of one row needs, per row: the GradParam record with every per-row
// factor folded in fp32 (coef = upstream * scale * g) and log Sb pre-scaled for exp2.
struct RowGrad {
  float coef;     // upstream * scale * g
  float m;        // the global row max
  float log2_sb;  // log(Sb) * log2(e)
  float qt_m1;    // q_t - 1 = expm1(log q_t)
};

// Gradient of one element: coef * (q_j - [j == t]) with q_j = exp((z - m)/beta - log Sb)
// and the target column taking the precomputed q_t - 1.
TOFU_HD float grad_elem(float z, bool is_target, const RowGrad& r, float inv_beta_log2e) {
  const float q = is_target ? r.qt_m1 : exp2f((z - r.m) * inv_beta_log2e - r.log2_sb);
  return r.coef * q;
}

// x / y where y is known to lie in [2^-126, 2^126]: on the GPU the approximate division
// (2 ulp there), which needs no slow-path call (the IEEE division's would make the one-block
// epilogue spill); on the host (the test harness) the exact one.
TOFU_HD float div_normal(float x, float y) {
#ifdef __CUDA_ARCH__
  return __fdividef(x, y);
#else
  return x / y;
#endif
}

// Focal weight g(p) from log p, finite everywhere (see tofu_math.focal_weight):
//   om = 1 - p = -expm1(log p),  g = om^gamma * (1 + gamma * p * (-log p / om)).
// -log p / om -> 1 as om -> 0; below the normal range it is 1 to fp32 precision.
TOFU_HD float focal_weight(float log_p, float gamma) {
  if (gamma == 0.f) return 1.f;
  const float lp = fminf(log_p, 0.f);
  const float p = expf(lp);
  const float om = -expm1f(lp);
  const float r = om >= 1.17549435e-38f ? div_normal(-lp, om) : 1.f;
  const float pr = p > 0.f ? p * r : 0.f;  // p -> 0: p * r -> 0, never 0 * inf
  return expf(gamma * logf(om)) * (1.f + gamma * pr);
}

// Per-row outputs of the loss (tofu_math.RowResult).
struct RowOut {
  float loss, ce, g, m, log_sb, qt_m1;
};

// Loss, focal weight and backward scalars from the combined statistics of one row
// (inv_beta = 1 / beta, rounded once on the host, as the Triton kernels use it).
// Ignored rows give zeros; labels outside [0, vocab_size) give NaN (no host check can
// run under graph capture, and a plausible number would hide the bug).
TOFU_HD RowOut finalize_row(Stats st, float zt, int64_t label, int64_t ignore_index,
                            int64_t vocab_size, float gamma, float beta, float inv_beta) {
  RowOut o = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (label == ignore_index) return o;
  if (label < 0 || label >= vocab_size) {
    o.loss = o.ce = o.g = NAN;
    return o;
  }
  const float zt_m = zt - st.m;  // exact: both are fp32 copies of logits
  const float log_p = zt_m - logf(st.s1);
  const float log_sb = logf(st.sb);
  const float log_qt = zt_m * inv_beta - log_sb;
  o.g = focal_weight(log_p, gamma);
  o.loss = -o.g * beta * log_qt;
  o.ce = -log_p;
  o.m = st.m;
  o.log_sb = log_sb;
  o.qt_m1 = expm1f(log_qt);
  return o;
}

// The metrics of one row from its merged statistics (tofu_math.row_metrics): the entropy of
// the untempered softmax log(s1) - e / s1, and top-1 (the target is the row's first maximum:
// zt == m and every column before it below m).
// Ignored rows give zeros, invalid labels NaN (as finalize_row).
struct RowMetrics {
  float entropy, top1;
};

TOFU_HD RowMetrics row_metrics(Stats st, float zt, int64_t label, int64_t ignore_index, int64_t vocab_size) {
  if (label == ignore_index) return {0.f, 0.f};
  if (label < 0 || label >= vocab_size) return {NAN, NAN};
  return {logf(st.s1) - div_normal(st.e, st.s1), (zt >= st.m && zt > st.before) ? 1.f : 0.f};  // s1 >= 1
}

}  // namespace tofu
