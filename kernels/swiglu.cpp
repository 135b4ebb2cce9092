// SwiGLU (spec: kernels/swiglu.h), elementwise: out = silu(gate) · up, silu(x) = x · sigmoid(x).
// Derivative of silu: silu'(x) = s + x · s · (1 - s) = s · (1 + x · (1 - s)), s = sigmoid(x).
#include "kernels/swiglu.h"

#include <cmath>

namespace dmc::kernels {
namespace {
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const double g = gate[i];
    out[i] = static_cast<T>(g * sigmoid(g) * up[i]);
  }
}

template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t n,
                     bool accumulate) {
  for (size_t i = 0; i < n; ++i) {
    const double g = gate[i], s = sigmoid(g), d = dout[i];
    const T dg = static_cast<T>(d * up[i] * s * (1.0 + g * (1.0 - s)));
    const T du = static_cast<T>(d * g * s);
    if (dgate) dgate[i] = accumulate ? dgate[i] + dg : dg;
    if (dup) dup[i] = accumulate ? dup[i] + du : du;
  }
}

template void swiglu_forward<float>(float*, const float*, const float*, size_t);
template void swiglu_forward<double>(double*, const double*, const double*, size_t);
template void swiglu_backward<float>(float*, float*, const float*, const float*, const float*,
                                     size_t, bool);
template void swiglu_backward<double>(double*, double*, const double*, const double*, const double*,
                                      size_t, bool);

}  // namespace dmc::kernels
