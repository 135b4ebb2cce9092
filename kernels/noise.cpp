#include "kernels/noise.h"

#include <cmath>

namespace dmc::kernels {

template <typename T>
void logistic_noise(T* out, int B, int T_, int Hkv_local, uint64_t seed, uint64_t stream,
                    long seq0, int h0, int Hkv_total) {
  for (int b = 0; b < B; ++b)
    for (int t = 0; t < T_; ++t)
      for (int h = 0; h < Hkv_local; ++h) {
        const uint64_t i = (static_cast<uint64_t>(seq0 + b) * T_ + t) * Hkv_total + h0 + h;
        const double g1 = -std::log(-std::log(static_cast<double>(hash_uniform(seed, stream, 2 * i))));
        const double g2 = -std::log(-std::log(static_cast<double>(hash_uniform(seed, stream, 2 * i + 1))));
        out[(static_cast<long>(b) * T_ + t) * Hkv_local + h] = static_cast<T>(g1 - g2);
      }
}

template void logistic_noise<float>(float*, int, int, int, uint64_t, uint64_t, long, int, int);
template void logistic_noise<double>(double*, int, int, int, uint64_t, uint64_t, long, int, int);

}  // namespace dmc::kernels
