// DMC windowed partial accumulation, "poolsum" (spec: kernels/dmc_scan.h, model/DMC.md §3), for each
// sequence b and KV head h independently:
//   c[t, j]  = omega[j] · prod_{m=j+1}^{t} alpha[m]          for t-w < j <= t  (0 otherwise)
//   denom[t] = sum_j c[t, j]
//   xhat[t]  = sum_j c[t, j] x[j] / denom[t]
// alpha[m] near 1 means "token m merges into the running slot", so older tokens keep their
// weight; alpha[m] = 0 starts a new slot and cuts everything before m off. The window w bounds
// the sum as the reference (and our inference cache) does. alpha[0] never enters.
//
// Forward: for each t walk j = t, t-1, ... keeping the running product prod_{m=j+1}^{t} alpha[m].
//
// Backward. With dy = dxhat[t] and y = xhat[t], the quotient rule gives the gradient of each
// coefficient:
//   dc[t, j] = (dy·x[j] - dy·y) / denom[t]
// and then
//   dx[j]     += sum_t c[t, j] / denom[t] · dy[t]
//   domega[j] += sum_t dc[t, j] · prod_{m=j+1}^{t} alpha[m]
//   dalpha[m] += sum_t sum_{j<m} dc[t, j] · c[t, j] / alpha[m]
// The last line must not be computed by dividing (hard decisions make alpha exactly 0). For a
// fixed t we walk m upwards with
//   A[m] = sum_{j<m} dc[t, j] · omega[j] · prod_{i=j+1}^{m-1} alpha[i]   (the part of c[t, j]
//          below m),   A[m+1] = A[m] · alpha[m] + dc[t, m] · omega[m]
//   S[m] = prod_{i=m+1}^{t} alpha[i]                                      (the part above m)
// so that dalpha[m] += S[m] · A[m], all in O(w) per t. Everything is O(T · w · D).
// Different (b, h) touch disjoint outputs, so they run in parallel under OpenMP.
#include "kernels/dmc_scan.h"

#include <algorithm>
#include <vector>

namespace dmc::kernels {

template <typename T>
void dmc_scan_forward(T* xhat, T* denom, const T* x, const T* alpha, const T* omega, int B, int T_,
                      int Hkv, int D, int window) {
  const int BH = B * Hkv;
  // one thread below this much work: thread start-up would dominate
  const bool parallel = static_cast<long>(BH) * T_ * window * D >= (1L << 18);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int bh = 0; bh < BH; ++bh) {
    const int b = bh / Hkv, h = bh % Hkv;
    auto s = [&](int t) { return (static_cast<long>(b) * T_ + t) * Hkv + h; };  // scalar index
    std::vector<double> acc(D);
    for (int t = 0; t < T_; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0);
      double den = 0, prod = 1;  // prod = prod_{m=j+1}^{t} alpha[m]
      const int jmin = std::max(0, t - window + 1);
      for (int j = t; j >= jmin; --j) {
        const double c = omega[s(j)] * prod;
        den += c;
        const T* xj = x + s(j) * D;
        for (int d = 0; d < D; ++d) acc[d] += c * xj[d];
        prod *= alpha[s(j)];
      }
      T* y = xhat + s(t) * D;
      for (int d = 0; d < D; ++d) y[d] = static_cast<T>(acc[d] / den);
      if (denom) denom[s(t)] = static_cast<T>(den);
    }
  }
}

template <typename T>
void dmc_scan_backward(T* dx, T* dalpha, T* domega, const T* dxhat, const T* x, const T* xhat,
                       const T* alpha, const T* omega, const T* denom, int B, int T_, int Hkv,
                       int D, int window, bool accumulate) {
  const int BH = B * Hkv;
  // one thread below this much work: thread start-up would dominate
  const bool parallel = static_cast<long>(BH) * T_ * window * D >= (1L << 18);
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int bh = 0; bh < BH; ++bh) {
    const int b = bh / Hkv, h = bh % Hkv;
    auto s = [&](int t) { return (static_cast<long>(b) * T_ + t) * Hkv + h; };
    if (dx && !accumulate)
      for (int t = 0; t < T_; ++t) std::fill(dx + s(t) * D, dx + s(t) * D + D, T(0));
    // Per-t scratch, indexed by k = t - j in [0, window): dc[t, t-k] and P[k] = prod_{t-k+1..t}.
    std::vector<double> dc(window), P(window);
    for (int t = 0; t < T_; ++t) {
      const int jmin = std::max(0, t - window + 1);
      const int n = t - jmin + 1;  // tokens in the window
      const T* dy = dxhat + s(t) * D;
      const double den = denom[s(t)];
      double dy_y = 0;
      for (int d = 0; d < D; ++d) dy_y += static_cast<double>(dy[d]) * xhat[s(t) * D + d];
      double prod = 1;
      for (int k = 0; k < n; ++k) {
        const int j = t - k;
        P[k] = prod;  // prod_{m=j+1}^{t} alpha[m]
        const double c = omega[s(j)] * prod;
        const T* xj = x + s(j) * D;
        double dy_x = 0;
        for (int d = 0; d < D; ++d) dy_x += static_cast<double>(dy[d]) * xj[d];
        dc[k] = (dy_x - dy_y) / den;
        if (dx) {
          T* dxj = dx + s(j) * D;
          const double w = c / den;
          for (int d = 0; d < D; ++d) dxj[d] += static_cast<T>(w * dy[d]);
        }
        if (domega) domega[s(j)] += static_cast<T>(dc[k] * prod);
        prod *= alpha[s(j)];
      }
      if (dalpha) {
        // walk m = jmin+1 .. t upwards; S[m] = P[t-m]
        double A = dc[t - jmin] * omega[s(jmin)];
        for (int m = jmin + 1; m <= t; ++m) {
          dalpha[s(m)] += static_cast<T>(P[t - m] * A);
          A = A * alpha[s(m)] + dc[t - m] * omega[s(m)];
        }
      }
    }
  }
}

template void dmc_scan_forward<float>(float*, float*, const float*, const float*, const float*, int,
                                      int, int, int, int);
template void dmc_scan_forward<double>(double*, double*, const double*, const double*,
                                       const double*, int, int, int, int, int);
template void dmc_scan_backward<float>(float*, float*, float*, const float*, const float*,
                                       const float*, const float*, const float*, const float*, int,
                                       int, int, int, int, bool);
template void dmc_scan_backward<double>(double*, double*, double*, const double*, const double*,
                                        const double*, const double*, const double*, const double*,
                                        int, int, int, int, int, bool);

}  // namespace dmc::kernels
