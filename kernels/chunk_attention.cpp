#include "kernels/chunk_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmc::kernels {

template <typename T>
void chunk_attention(T* out, const T* q, const T* k_pool, const T* v_pool,
                     const int32_t* page_table, int max_pages, int page_size, const int* prefix,
                     const T* k, const T* v, const T* mask, int n, int H, int Hkv, int D,
                     bool exclude_ctrl, float scale) {
  const int G = H / Hkv, dqk = exclude_ctrl ? D - 1 : D;
  std::vector<double> s;
  std::vector<const T*> krow, vrow;
  for (int t = 0; t < n; ++t)
    for (int g = 0; g < H; ++g) {
      const int h = g / G;
      krow.clear();
      vrow.clear();
      s.clear();
      for (int j = 0; j < prefix[t * Hkv + h]; ++j) {
        const long row =
            static_cast<long>(page_table[h * max_pages + j / page_size]) * page_size + j % page_size;
        krow.push_back(k_pool + row * D);
        vrow.push_back(v_pool + row * D);
        s.push_back(0.0);
      }
      for (int i = 0; i <= t; ++i) {
        krow.push_back(k + (static_cast<long>(i) * Hkv + h) * D);
        vrow.push_back(v + (static_cast<long>(i) * Hkv + h) * D);
        s.push_back(i < t && mask ? static_cast<double>(mask[i * Hkv + h]) : 0.0);
      }
      const T* qg = q + (static_cast<long>(t) * H + g) * D;
      double max_s = -std::numeric_limits<double>::infinity();
      for (size_t i = 0; i < s.size(); ++i) {
        double dot = 0;
        for (int c = 0; c < dqk; ++c) dot += static_cast<double>(qg[c]) * krow[i][c];
        s[i] += dot * scale;
        max_s = std::max(max_s, s[i]);
      }
      double sum = 0;
      for (double& x : s) sum += (x = std::exp(x - max_s));
      T* og = out + (static_cast<long>(t) * H + g) * D;
      for (int c = 0; c < D; ++c) {
        double acc = 0;
        for (size_t i = 0; i < s.size(); ++i) acc += s[i] * vrow[i][c];
        og[c] = static_cast<T>(acc / sum);
      }
    }
}

template void chunk_attention<float>(float*, const float*, const float*, const float*,
                                     const int32_t*, int, int, const int*, const float*,
                                     const float*, const float*, int, int, int, int, bool, float);

}  // namespace dmc::kernels
