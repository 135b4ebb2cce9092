#include "kernels/think_channels.h"

#include <algorithm>
#include <numeric>
#include <vector>

namespace dmc::kernels {

template <typename T>
void think_select_channels(uint8_t* mask, const T* query_energy, const T* keys, int n, int D,
                           int kept) {
  std::vector<double> score(D, 0.0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < D; ++j) score[j] += static_cast<double>(keys[i * D + j]) * keys[i * D + j];
  for (int j = 0; j < D; ++j) score[j] *= static_cast<double>(query_energy[j]);
  std::vector<int> order(D);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
  std::fill(mask, mask + ThinkMaskBytes(D), uint8_t{0});
  for (int r = 0; r < kept; ++r) mask[order[r] / 8] |= static_cast<uint8_t>(1 << (order[r] % 8));
}

template <typename T>
void think_observe_queries(T* energy, const T* q, int G, int D, bool exclude_ctrl) {
  const int observed = exclude_ctrl ? D - 1 : D;
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < observed; ++j) {
      const T square = q[static_cast<long>(g) * D + j] * q[static_cast<long>(g) * D + j];
      energy[j] += square;
    }
}

template <typename T>
void think_prune_rows(T* pruned, const T* rows, const uint8_t* mask, int n, int D, int kept) {
  for (int i = 0; i < n; ++i)
    for (int j = 0, c = 0; j < D; ++j)
      if (ThinkKept(mask, j))
        pruned[static_cast<long>(i) * kept + c++] = rows[static_cast<long>(i) * D + j];
}

template void think_select_channels<float>(uint8_t*, const float*, const float*, int, int, int);
template void think_select_channels<double>(uint8_t*, const double*, const double*, int, int,
                                            int);
template void think_observe_queries<float>(float*, const float*, int, int, bool);
template void think_observe_queries<double>(double*, const double*, int, int, bool);
template void think_prune_rows<float>(float*, const float*, const uint8_t*, int, int, int);
template void think_prune_rows<double>(double*, const double*, const uint8_t*, int, int, int);

}  // namespace dmc::kernels
