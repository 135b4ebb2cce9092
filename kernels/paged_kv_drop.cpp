#include "kernels/paged_kv_drop.h"

namespace dmc::kernels {

template <typename T>
void paged_kv_drop_span(const PagedKvLayer<T>& c, int n, int Hkv, int D, int count, int keep) {
  for (long head = 0; head < static_cast<long>(n) * Hkv; ++head) {
    const int first = c.lengths[head] - keep - count;
    for (int j = 0; j < keep; ++j)
      MoveSlot(c, static_cast<float*>(nullptr), SlotRow(c, head, first + j),
               SlotRow(c, head, first + count + j), D, 0, 1);
    c.lengths[head] -= count;
  }
}

template void paged_kv_drop_span<float>(const PagedKvLayer<float>&, int, int, int, int, int);
template void paged_kv_drop_span<double>(const PagedKvLayer<double>&, int, int, int, int, int);

}  // namespace dmc::kernels
