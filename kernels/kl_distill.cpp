// KL(student || teacher) distillation over a vocabulary shard (spec: kernels/kl_distill.h).
// fp64 accumulation per row; rows are independent, split over OpenMP threads when large.
#include "kernels/kl_distill.h"

#include <algorithm>
#include <cmath>

namespace dmc::kernels {
namespace {

bool worth_threads(int N, int V) { return static_cast<long>(N) * V >= (1L << 16); }

}  // namespace

template <typename T>
void kl_distill_shard(T* partial, const T* s, const T* u, const T* lse_s, const T* lse_u,
                      const T* weight, int N, int V) {
  const bool parallel = worth_threads(N, V);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int n = 0; n < N; ++n) {
    double sum = 0;
    if (weight[n] != T(0)) {
      const T* sn = s + static_cast<long>(n) * V;
      const T* un = u + static_cast<long>(n) * V;
      for (int v = 0; v < V; ++v) {
        const double log_p = sn[v] - static_cast<double>(lse_s[n]);
        sum += std::exp(log_p) * (log_p - (un[v] - static_cast<double>(lse_u[n])));
      }
    }
    partial[n] = static_cast<T>(sum);
  }
}

template <typename T>
void kl_distill_shard_backward(T* ds, const T* s, const T* u, const T* lse_s, const T* lse_u,
                               const T* kl, const T* weight, T dloss, int N, int V,
                               bool accumulate) {
  const bool parallel = worth_threads(N, V);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int n = 0; n < N; ++n) {
    T* dn = ds + static_cast<long>(n) * V;
    if (weight[n] == T(0)) {
      if (!accumulate) std::fill(dn, dn + V, T(0));
      continue;
    }
    const T* sn = s + static_cast<long>(n) * V;
    const T* un = u + static_cast<long>(n) * V;
    const double g = static_cast<double>(dloss) * weight[n];
    for (int v = 0; v < V; ++v) {
      const double log_p = sn[v] - static_cast<double>(lse_s[n]);
      const double log_pt = un[v] - static_cast<double>(lse_u[n]);
      const T d = static_cast<T>(g * std::exp(log_p) * (log_p - log_pt - kl[n]));
      dn[v] = accumulate ? dn[v] + d : d;
    }
  }
}

#define DMC_KL_DISTILL(T)                                                                     \
  template void kl_distill_shard<T>(T*, const T*, const T*, const T*, const T*, const T*, int, \
                                    int);                                                     \
  template void kl_distill_shard_backward<T>(T*, const T*, const T*, const T*, const T*,      \
                                             const T*, const T*, T, int, int, bool);
DMC_KL_DISTILL(float)
DMC_KL_DISTILL(double)
#undef DMC_KL_DISTILL

}  // namespace dmc::kernels
