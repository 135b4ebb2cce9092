// DMC compression-ratio loss (spec: kernels/cr_loss.h, model/DMC.md §4), in two parts so that
// tensor-parallel ranks can sum their statistics before the non-linear hinge:
//   1. per layer: mean_merge[b] += scale · sum_{t,h} merge[b, t, h]
//      (the caller's scale = 1 / (L · T · Hkv_total) turns the sum over layers into the mean over
//      layers of the per-layer merge fraction f[l, b])
//   2. L_CR = (1/B) sum_b relu(prior - mean_merge[b]),  prior = 1 - 1/CR_target
// One-sided: a sequence that already merges more than the target is not pushed back. The hinge's
// derivative at the kink (prior == mean_merge) is taken as 0, matching relu'(0) = 0.
#include "kernels/cr_loss.h"

namespace dmc::kernels {

template <typename T>
void cr_accumulate_merge(T* mean_merge, const T* merge, int B, int T_, int Hkv, T scale) {
  for (int b = 0; b < B; ++b) {
    double s = 0;
    const T* m = merge + static_cast<long>(b) * T_ * Hkv;
    for (long i = 0; i < static_cast<long>(T_) * Hkv; ++i) s += m[i];
    mean_merge[b] += static_cast<T>(static_cast<double>(scale) * s);
  }
}

template <typename T>
void cr_accumulate_merge_backward(T* dmerge, const T* dmean_merge, int B, int T_, int Hkv,
                                  T scale) {
  for (int b = 0; b < B; ++b) {
    const T g = static_cast<T>(static_cast<double>(scale) * dmean_merge[b]);
    T* d = dmerge + static_cast<long>(b) * T_ * Hkv;
    for (long i = 0; i < static_cast<long>(T_) * Hkv; ++i) d[i] += g;
  }
}

template <typename T>
T cr_loss_forward(const T* mean_merge, int B, T prior) {
  if (B <= 0) return T(0);
  double s = 0;
  for (int b = 0; b < B; ++b) {
    const double gap = static_cast<double>(prior) - mean_merge[b];
    if (gap > 0) s += gap;
  }
  return static_cast<T>(s / B);
}

template <typename T>
void cr_loss_backward(T* dmean_merge, const T* mean_merge, int B, T prior, T dloss) {
  if (B <= 0) return;
  const double g = -static_cast<double>(dloss) / B;
  for (int b = 0; b < B; ++b)
    if (prior > mean_merge[b]) dmean_merge[b] += static_cast<T>(g);
}

template void cr_accumulate_merge<float>(float*, const float*, int, int, int, float);
template void cr_accumulate_merge<double>(double*, const double*, int, int, int, double);
template void cr_accumulate_merge_backward<float>(float*, const float*, int, int, int, float);
template void cr_accumulate_merge_backward<double>(double*, const double*, int, int, int, double);
template float cr_loss_forward<float>(const float*, int, float);
template double cr_loss_forward<double>(const double*, int, double);
template void cr_loss_backward<float>(float*, const float*, int, float, float);
template void cr_loss_backward<double>(double*, const double*, int, double, double);

}  // namespace dmc::kernels
