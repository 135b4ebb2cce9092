// RoPE at explicit positions (spec: kernels/rope_positions.h). The rotation of one token depends
// only on its own position, and the H·D values of token (b, t) are contiguous in [B, T, H, D], so
// each token is the one-token sequence of kernels/rope.cpp started at pos0 = positions[t]: the
// rotation, its control-channel exemption and its backward are reused, not restated.
#include "kernels/rope_positions.h"

#include "kernels/rope.h"

namespace dmc::kernels {

template <typename T>
void rope_forward_positions(T* out, const T* inp, int B, int T_, int H, int D,
                            const int32_t* positions, float theta, bool keep_last_channel) {
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T_; ++t) {
      const long base = (static_cast<long>(b) * T_ + t) * H * D;
      rope_forward(out + base, inp + base, 1, 1, H, D, positions[t], theta, keep_last_channel);
    }
}

template <typename T>
void rope_backward_positions(T* dinp, const T* dout, int B, int T_, int H, int D,
                             const int32_t* positions, float theta, bool keep_last_channel,
                             bool accumulate) {
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T_; ++t) {
      const long base = (static_cast<long>(b) * T_ + t) * H * D;
      rope_backward(dinp + base, dout + base, 1, 1, H, D, positions[t], theta, keep_last_channel,
                    accumulate);
    }
}

template void rope_forward_positions<float>(float*, const float*, int, int, int, int,
                                            const int32_t*, float, bool);
template void rope_forward_positions<double>(double*, const double*, int, int, int, int,
                                             const int32_t*, float, bool);
template void rope_backward_positions<float>(float*, const float*, int, int, int, int,
                                             const int32_t*, float, bool, bool);
template void rope_backward_positions<double>(double*, const double*, int, int, int, int,
                                              const int32_t*, float, bool, bool);

}  // namespace dmc::kernels
