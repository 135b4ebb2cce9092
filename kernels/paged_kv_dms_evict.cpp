#include "kernels/paged_kv_dms_evict.h"

#include <algorithm>
#include <vector>

namespace dmc::kernels {

template <typename T>
void paged_kv_dms_evict(const PagedKvLayer<T>& c, uint8_t* marks, const float* evict,
                        const int32_t* positions, int n, int Hkv, int D, int window) {
  for (int i = 0; i < n; ++i)
    for (int h = 0; h < Hkv; ++h) {
      const long head = static_cast<long>(i) * Hkv + h;
      const int t = positions[i], leaving = t - window - 1;
      const bool marks_previous = t > 0 && evict[head] > 0.5f;
      int leaving_slot = -1;
      for (int s = 0; s < c.lengths[head]; ++s) {
        const long r = SlotRow(c, head, s);
        if (c.slot_pos[r] == t) marks[r] = 0;
        if (c.slot_pos[r] == t - 1 && marks_previous) marks[r] = 1;
        if (c.slot_pos[r] == leaving && marks[r]) leaving_slot = s;
      }
      if (leaving_slot < 0) continue;
      const int last = --c.lengths[head];
      if (leaving_slot == last) continue;
      MoveSlot(c, marks, SlotRow(c, head, leaving_slot), SlotRow(c, head, last), D, 0, 1);
    }
}

template <typename T>
void paged_kv_dms_prefill(const PagedKvLayer<T>& c, uint8_t* marks, int row, const T* k,
                          const T* v, const float* evict, int P, int Hkv, int D, int window,
                          float theta) {
  std::vector<float> merge(evict, evict + static_cast<long>(P) * Hkv);
  for (int s = std::max(0, P - window); s < P; ++s)
    std::fill_n(merge.begin() + static_cast<long>(s) * Hkv, Hkv, 0.0f);
  paged_kv_prefill(c, row, k, v, k, v, merge.data(), nullptr, P, Hkv, D, theta, false);
  for (int h = 0; h < Hkv; ++h) {
    const long head = static_cast<long>(row) * Hkv + h;
    for (int s = 0; s < c.lengths[head]; ++s) {
      const long r = SlotRow(c, head, s);
      const int t = c.slot_pos[r];
      marks[r] = t + 1 < P && evict[static_cast<long>(t + 1) * Hkv + h] > 0.5f ? 1 : 0;
    }
  }
}

template void paged_kv_dms_evict<float>(const PagedKvLayer<float>&, uint8_t*, const float*,
                                        const int32_t*, int, int, int, int);
template void paged_kv_dms_prefill<float>(const PagedKvLayer<float>&, uint8_t*, int, const float*,
                                          const float*, const float*, int, int, int, int, float);

}  // namespace dmc::kernels
