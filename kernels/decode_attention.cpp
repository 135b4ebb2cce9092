#include "kernels/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmc::kernels {

// Plain two-pass softmax per query head: the reference the paged CUDA decode kernel is checked
// against, and the CPU decoder's inner loop.
template <typename T>
void decode_attention(T* out, T* probs, const T* q, const T* const* keys, const T* const* values,
                      const int* lengths, int H, int Hkv, int D, bool exclude_ctrl, float scale) {
  const int group = H / Hkv;
  const int dqk = exclude_ctrl ? D - 1 : D;
  std::vector<double> s;
  long probs_offset = 0;
  for (int g = 0; g < H; ++g) {
    const int h = g / group;
    const int n = lengths[h];
    const T* qg = q + static_cast<long>(g) * D;
    s.assign(n, 0.0);
    double max_s = -std::numeric_limits<double>::infinity();
    for (int i = 0; i < n; ++i) {
      const T* ki = keys[h] + static_cast<long>(i) * D;
      double dot = 0;
      for (int c = 0; c < dqk; ++c) dot += static_cast<double>(qg[c]) * ki[c];
      s[i] = dot * scale;
      max_s = std::max(max_s, s[i]);
    }
    double sum = 0;
    for (int i = 0; i < n; ++i) sum += (s[i] = std::exp(s[i] - max_s));
    T* og = out + static_cast<long>(g) * D;
    for (int c = 0; c < D; ++c) {
      double acc = 0;
      for (int i = 0; i < n; ++i) acc += s[i] * values[h][static_cast<long>(i) * D + c];
      og[c] = static_cast<T>(acc / sum);
    }
    if (probs) {
      for (int i = 0; i < n; ++i) probs[probs_offset + i] = static_cast<T>(s[i] / sum);
      probs_offset += n;
    }
  }
}

template void decode_attention<float>(float*, float*, const float*, const float* const*,
                                      const float* const*, const int*, int, int, int, bool, float);
template void decode_attention<double>(double*, double*, const double*, const double* const*,
                                       const double* const*, const int*, int, int, int, bool,
                                       float);

}  // namespace dmc::kernels
