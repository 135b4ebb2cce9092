// SwiGLU (spec: kernels/swiglu.h), elementwise: out = silu(gate) · up, silu(x) = x · sigmoid(x).
// Derivative of silu: silu'(x) = s + x · s · (1 - s) = s · (1 + x · (1 - s)), s = sigmoid(x).
#include "kernels/swiglu.h"

#include <cmath>

namespace dmc::kernels {
namespace {
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

template <typename T>
void swiglu_forward(T* out, const T* gate, const T* up, size_t rows, size_t F, size_t ld) {
  for (size_t r = 0; r < rows; ++r)
    for (size_t f = 0; f < F; ++f) {
      const double g = gate[r * ld + f];
      out[r * F + f] = static_cast<T>(g * sigmoid(g) * up[r * ld + f]);
    }
}

template <typename T>
void swiglu_backward(T* dgate, T* dup, const T* dout, const T* gate, const T* up, size_t rows,
                     size_t F, size_t ld, bool accumulate) {
  for (size_t r = 0; r < rows; ++r)
    for (size_t f = 0; f < F; ++f) {
      const size_t i = r * ld + f;
      const double g = gate[i], s = sigmoid(g), d = dout[r * F + f];
      const T dg = static_cast<T>(d * up[i] * s * (1.0 + g * (1.0 - s)));
      const T du = static_cast<T>(d * g * s);
      if (dgate) dgate[i] = accumulate ? dgate[i] + dg : dg;
      if (dup) dup[i] = accumulate ? dup[i] + du : du;
    }
}

template void swiglu_forward<float>(float*, const float*, const float*, size_t, size_t, size_t);
template void swiglu_forward<double>(double*, const double*, const double*, size_t, size_t,
                                     size_t);
template void swiglu_backward<float>(float*, float*, const float*, const float*, const float*,
                                     size_t, size_t, size_t, bool);
template void swiglu_backward<double>(double*, double*, const double*, const double*, const double*,
                                      size_t, size_t, size_t, bool);

}  // namespace dmc::kernels
