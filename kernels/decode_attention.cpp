#include "kernels/decode_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmc::kernels {

// Plain two-pass softmax per (sequence, query head) in double: the reference the CUDA paged
// decode kernel is checked against, and the CPU decoder's inner loop.
template <typename T>
void paged_decode_attention(T* out, T* probs, int probs_stride, const T* q, const T* k_pool,
                            const T* v_pool, const int32_t* page_table, const int* lengths,
                            int max_pages, int page_size, int B, int H, int Hkv, int D,
                            bool exclude_ctrl, float scale) {
  const int group = H / Hkv;
  const int dqk = exclude_ctrl ? D - 1 : D;
  std::vector<double> s;
  std::vector<const T*> krow, vrow;
  for (int b = 0; b < B; ++b)
    for (int g = 0; g < H; ++g) {
      const int head = b * Hkv + g / group;
      const int n = lengths[head];
      const int32_t* pages = page_table + static_cast<long>(head) * max_pages;
      krow.resize(n);
      vrow.resize(n);
      for (int i = 0; i < n; ++i) {
        const long row = static_cast<long>(pages[i / page_size]) * page_size + i % page_size;
        krow[i] = k_pool + row * D;
        vrow[i] = v_pool + row * D;
      }
      const T* qg = q + (static_cast<long>(b) * H + g) * D;
      s.assign(n, 0.0);
      double max_s = -std::numeric_limits<double>::infinity();
      for (int i = 0; i < n; ++i) {
        double dot = 0;
        for (int c = 0; c < dqk; ++c) dot += static_cast<double>(qg[c]) * krow[i][c];
        s[i] = dot * scale;
        max_s = std::max(max_s, s[i]);
      }
      double sum = 0;
      for (int i = 0; i < n; ++i) sum += (s[i] = std::exp(s[i] - max_s));
      T* og = out + (static_cast<long>(b) * H + g) * D;
      for (int c = 0; c < D; ++c) {
        double acc = 0;
        for (int i = 0; i < n; ++i) acc += s[i] * vrow[i][c];
        og[c] = static_cast<T>(acc / sum);
      }
      if (probs)
        for (int i = 0; i < n; ++i)
          probs[(static_cast<long>(b) * H + g) * probs_stride + i] = static_cast<T>(s[i] / sum);
    }
}

template void paged_decode_attention<float>(float*, float*, int, const float*, const float*,
                                            const float*, const int32_t*, const int*, int, int,
                                            int, int, int, int, bool, float);
template void paged_decode_attention<double>(double*, double*, int, const double*, const double*,
                                             const double*, const int32_t*, const int*, int, int,
                                             int, int, int, int, bool, float);

}  // namespace dmc::kernels
