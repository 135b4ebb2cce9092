// Sum of squares in double (spec: kernels/grad_norm.h): the building block of the global
// gradient norm used for clipping. Double keeps the sum exact enough that the order in which
// tensors and ranks are added does not matter in practice.
#include "kernels/grad_norm.h"

namespace dmc::kernels {

double sum_of_squares(const float* x, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return s;
}

}  // namespace dmc::kernels
