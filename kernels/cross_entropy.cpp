// Softmax cross-entropy over the vocabulary (spec: kernels/cross_entropy.h), one row per token:
//   loss = logsumexp(logits) - logits[target]
//   dlogits += dloss · (softmax(logits) - onehot(target))
// logsumexp subtracts the row maximum first so exp never overflows. A negative target marks a
// position without a label (e.g. padding): loss 0, no gradient. The softmax is recomputed in the
// backward instead of being stored: a [N, V] probability buffer would be as large as the logits.
#include "kernels/cross_entropy.h"

#include <cassert>
#include <cmath>

namespace dmc::kernels {
namespace {

template <typename T>
double row_max(const T* x, int V) {
  double m = x[0];
  for (int v = 1; v < V; ++v) m = std::fmax(m, static_cast<double>(x[v]));
  return m;
}

template <typename T>
double row_sumexp(const T* x, int V, double max) {
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(x[v] - max);
  return s;
}

}  // namespace

template <typename T>
void cross_entropy_forward(T* losses, const T* logits, const int32_t* targets, int N, int V) {
  // one thread below this much work: thread start-up would dominate
  const bool parallel = static_cast<long>(N) * V >= (1L << 18);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int n = 0; n < N; ++n) {
    if (targets[n] < 0) {
      losses[n] = T(0);
      continue;
    }
    assert(targets[n] < V);
    const T* x = logits + static_cast<long>(n) * V;
    const double m = row_max(x, V);
    const double lse = m + std::log(row_sumexp(x, V, m));
    losses[n] = static_cast<T>(lse - x[targets[n]]);
  }
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int32_t* targets, const T* dlosses,
                            int N, int V) {
  // one thread below this much work: thread start-up would dominate
  const bool parallel = static_cast<long>(N) * V >= (1L << 18);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int n = 0; n < N; ++n) {
    if (targets[n] < 0) continue;
    assert(targets[n] < V);
    const T* x = logits + static_cast<long>(n) * V;
    T* dx = dlogits + static_cast<long>(n) * V;
    const double m = row_max(x, V);
    const double inv_sum = 1.0 / row_sumexp(x, V, m);
    const double dl = dlosses[n];
    for (int v = 0; v < V; ++v) {
      const double p = std::exp(x[v] - m) * inv_sum;
      dx[v] += static_cast<T>(dl * (p - (v == targets[n] ? 1.0 : 0.0)));
    }
  }
}

template void cross_entropy_forward<float>(float*, const float*, const int32_t*, int, int);
template void cross_entropy_forward<double>(double*, const double*, const int32_t*, int, int);
template void cross_entropy_backward<float>(float*, const float*, const int32_t*, const float*, int,
                                            int);
template void cross_entropy_backward<double>(double*, const double*, const int32_t*, const double*,
                                             int, int);

}  // namespace dmc::kernels
