// RMSNorm (spec: kernels/rmsnorm.h), per row of C channels:
//   rstd = 1 / sqrt(mean_c x_c^2 + eps),   out_c = x_c · rstd · w_c
// Backward, with g_c = dout_c · w_c (the gradient reaching the normalised value x_c · rstd):
//   dw_c += dout_c · x_c · rstd   (summed over the rows)
//   dx_c += rstd · g_c  -  x_c · rstd^3 · (sum_j g_j x_j) / C
// (both = without accumulate). The second term of dx is the path through rstd:
// d rstd / d x_c = -rstd^3 · x_c / C. Unlike LayerNorm there is no mean to subtract, hence no
// "mean of g" term. rstd is saved by the forward so the backward does not recompute it.
#include "kernels/rmsnorm.h"

#include <cmath>

namespace dmc::kernels {

template <typename T>
void rmsnorm_forward(T* out, T* rstd, const T* inp, const T* weight, int N, int C, float eps) {
  for (int n = 0; n < N; ++n) {
    const T* x = inp + static_cast<long>(n) * C;
    double ss = 0;
    for (int c = 0; c < C; ++c) ss += static_cast<double>(x[c]) * x[c];
    const double r = 1.0 / std::sqrt(ss / C + static_cast<double>(eps));
    T* o = out + static_cast<long>(n) * C;
    for (int c = 0; c < C; ++c) o[c] = static_cast<T>(x[c] * r * weight[c]);
    if (rstd) rstd[n] = static_cast<T>(r);
  }
}

template <typename T>
void rmsnorm_backward(T* dinp, T* dweight, const T* dout, const T* inp, const T* weight,
                      const T* rstd, int N, int C, bool accumulate) {
  if (dweight && !accumulate)
    for (int c = 0; c < C; ++c) dweight[c] = T(0);  // then the rows' terms are summed into it
  for (int n = 0; n < N; ++n) {
    const T* x = inp + static_cast<long>(n) * C;
    const T* d = dout + static_cast<long>(n) * C;
    const double r = rstd[n];
    if (dweight)
      for (int c = 0; c < C; ++c)
        dweight[c] += static_cast<T>(static_cast<double>(d[c]) * x[c] * r);
    if (dinp) {
      double gx = 0;  // sum_j g_j x_j
      for (int c = 0; c < C; ++c) gx += static_cast<double>(d[c]) * weight[c] * x[c];
      const double k = r * r * r * gx / C;
      T* dx = dinp + static_cast<long>(n) * C;
      for (int c = 0; c < C; ++c) {
        const T g = static_cast<T>(r * static_cast<double>(d[c]) * weight[c] - k * x[c]);
        dx[c] = accumulate ? dx[c] + g : g;
      }
    }
  }
}

template void rmsnorm_forward<float>(float*, float*, const float*, const float*, int, int, float);
template void rmsnorm_forward<double>(double*, double*, const double*, const double*, int, int,
                                      float);
template void rmsnorm_backward<float>(float*, float*, const float*, const float*, const float*,
                                      const float*, int, int, bool);
template void rmsnorm_backward<double>(double*, double*, const double*, const double*,
                                       const double*, const double*, int, int, bool);

}  // namespace dmc::kernels
