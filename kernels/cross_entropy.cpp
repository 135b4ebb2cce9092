// Softmax cross-entropy over the vocabulary (spec: kernels/cross_entropy.h), one row per token:
//   loss = logsumexp(logits) - logits[target]
//   dlogits += dloss · (softmax(logits) - onehot(target))
// logsumexp subtracts the row maximum first so exp never overflows. A negative target marks a
// position without a label (e.g. padding): loss 0, no gradient. The softmax is recomputed in the
// backward from the saved logsumexp instead of being stored: a [N, V] probability buffer would be
// as large as the logits. The whole-vocabulary functions are the vocabulary-parallel ones with a
// single shard, so the two can never disagree.
#include "kernels/cross_entropy.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <vector>

namespace dmc::kernels {
namespace {

// One thread below this much work: thread start-up would dominate.
bool worth_threads(int N, int V) { return static_cast<long>(N) * V >= (1L << 18); }

template <typename T>
double row_logsumexp(const T* x, int V) {
  double m = x[0];
  for (int v = 1; v < V; ++v) m = std::fmax(m, static_cast<double>(x[v]));
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(x[v] - m);
  return m + std::log(s);
}

}  // namespace

template <typename T>
void cross_entropy_shard_stats(T* stats, const T* logits, const int32_t* targets, int N, int V,
                               int vocab_begin) {
  const bool parallel = worth_threads(N, V);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int n = 0; n < N; ++n) {
    stats[n] = stats[N + n] = T(0);
    if (targets[n] < 0) continue;
    const T* x = logits + static_cast<long>(n) * V;
    stats[n] = static_cast<T>(row_logsumexp(x, V));
    const long t = static_cast<long>(targets[n]) - vocab_begin;
    if (t >= 0 && t < V) stats[N + n] = x[t];
  }
}

template <typename T>
void cross_entropy_combine_shards(T* losses, T* lse, const T* shard_stats,
                                  const int32_t* targets, int N, int shards) {
  for (int n = 0; n < N; ++n) {
    losses[n] = lse[n] = T(0);
    if (targets[n] < 0) continue;
    double m = -INFINITY, target_logit = 0;
    for (int r = 0; r < shards; ++r) {
      m = std::fmax(m, static_cast<double>(shard_stats[(2L * r) * N + n]));
      target_logit += shard_stats[(2L * r + 1) * N + n];
    }
    double s = 0;
    for (int r = 0; r < shards; ++r) s += std::exp(shard_stats[(2L * r) * N + n] - m);
    const double total = m + std::log(s);
    lse[n] = static_cast<T>(total);
    losses[n] = static_cast<T>(total - target_logit);
  }
}

template <typename T>
void cross_entropy_shard_backward(T* dlogits, const T* logits, const T* lse,
                                  const int32_t* targets, const T* dlosses, int N, int V,
                                  int vocab_begin, bool accumulate) {
  const bool parallel = worth_threads(N, V);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int n = 0; n < N; ++n) {
    T* dx = dlogits + static_cast<long>(n) * V;
    if (targets[n] < 0) {  // no label, no gradient
      if (!accumulate) std::fill(dx, dx + V, T(0));
      continue;
    }
    const T* x = logits + static_cast<long>(n) * V;
    const long t = static_cast<long>(targets[n]) - vocab_begin;
    const double dl = dlosses[n], row_lse = lse[n];
    for (int v = 0; v < V; ++v) {
      const double p = std::exp(x[v] - row_lse);
      const T g = static_cast<T>(dl * (p - (v == t ? 1.0 : 0.0)));
      dx[v] = accumulate ? dx[v] + g : g;
    }
  }
}

template <typename T>
void cross_entropy_forward(T* losses, const T* logits, const int32_t* targets, int N, int V) {
  for (int n = 0; n < N; ++n) assert(targets[n] < V);
  std::vector<T> stats(2 * static_cast<size_t>(N)), lse(N);
  cross_entropy_shard_stats(stats.data(), logits, targets, N, V, 0);
  cross_entropy_combine_shards(losses, lse.data(), stats.data(), targets, N, 1);
}

template <typename T>
void cross_entropy_backward(T* dlogits, const T* logits, const int32_t* targets, const T* dlosses,
                            int N, int V, bool accumulate) {
  std::vector<T> stats(2 * static_cast<size_t>(N));
  cross_entropy_shard_stats(stats.data(), logits, targets, N, V, 0);
  // One shard: the shard's logsumexp (stats[0, :]) is the global one.
  cross_entropy_shard_backward(dlogits, logits, stats.data(), targets, dlosses, N, V, 0,
                               accumulate);
}

#define DMC_CROSS_ENTROPY(T)                                                                  \
  template void cross_entropy_forward<T>(T*, const T*, const int32_t*, int, int);            \
  template void cross_entropy_backward<T>(T*, const T*, const int32_t*, const T*, int, int,  \
                                          bool);                                             \
  template void cross_entropy_shard_stats<T>(T*, const T*, const int32_t*, int, int, int);   \
  template void cross_entropy_combine_shards<T>(T*, T*, const T*, const int32_t*, int, int); \
  template void cross_entropy_shard_backward<T>(T*, const T*, const T*, const int32_t*,      \
                                                const T*, int, int, int, bool);
DMC_CROSS_ENTROPY(float)
DMC_CROSS_ENTROPY(double)
#undef DMC_CROSS_ENTROPY

}  // namespace dmc::kernels
