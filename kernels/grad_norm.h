// Sum of squares of a buffer, accumulated in double: the global gradient norm is the square root
// of the sum of this over every gradient tensor (and, in parallel runs, over ranks).
#pragma once
#include <cstddef>

namespace dmc::kernels {

double sum_of_squares(const float* x, size_t n);

}  // namespace dmc::kernels
