#include "kernels/control_channel.h"

namespace dmc::kernels {

template <typename T>
void scale_last_channel(T* x, long rows, int D, T m) {
  for (long r = 0; r < rows; ++r) x[r * D + D - 1] *= m;
}

template void scale_last_channel<float>(float*, long, int, float);
template void scale_last_channel<double>(double*, long, int, double);

}  // namespace dmc::kernels
