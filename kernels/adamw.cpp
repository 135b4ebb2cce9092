// AdamW (spec: kernels/adamw.h), one step over n fp32 master weights:
//   g = grad · grad_scale
//   m = b1 m + (1 - b1) g           first moment (momentum)
//   v = b2 v + (1 - b2) g^2         second moment
//   mhat = m / (1 - b1^t), vhat = v / (1 - b2^t)    bias corrections (t = hyper.step, 1-based)
//   param -= lr · (mhat / (sqrt(vhat) + eps) + weight_decay · param)
// The weight decay is decoupled (Loshchilov & Hutter): it shrinks the parameter directly instead
// of being added to the gradient, so it is not rescaled by the adaptive denominator. Arithmetic is
// in double; m, v and param are stored back as fp32.
#include "kernels/adamw.h"

#include <cmath>

namespace dmc::kernels {

void adamw_update(float* param, const float* grad, float* m, float* v, size_t n,
                  const AdamWHyper& hyper, float grad_scale) {
  const double b1 = hyper.beta1, b2 = hyper.beta2;
  const double bc1 = 1.0 - std::pow(b1, hyper.step);
  const double bc2 = 1.0 - std::pow(b2, hyper.step);
  const double lr = hyper.lr, eps = hyper.eps, wd = hyper.weight_decay;
  for (size_t i = 0; i < n; ++i) {
    const double g = static_cast<double>(grad[i]) * grad_scale;
    const double mi = b1 * m[i] + (1.0 - b1) * g;
    const double vi = b2 * v[i] + (1.0 - b2) * g * g;
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    const double p = param[i];
    param[i] = static_cast<float>(p - lr * ((mi / bc1) / (std::sqrt(vi / bc2) + eps) + wd * p));
  }
}

}  // namespace dmc::kernels
