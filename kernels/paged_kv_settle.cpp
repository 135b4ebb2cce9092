#include "kernels/paged_kv_settle.h"

#include <algorithm>

namespace dmc::kernels {

void paged_kv_settle_step(int32_t* page_ids, int32_t* rows, const KvSettleLayer& c, const float* merge,
                    const int32_t* positions, int n, int Hkv) {
  const int P = c.page_size;
  for (long head = 0; head < static_cast<long>(n) * Hkv; ++head) {
    const int r = c.r_lengths[head];
    const bool merges = merge && r > 0 && positions[head / Hkv] > 0 && merge[head] > 0.5f;
    page_ids[head] = -1;
    if (merges || r != P) continue;
    page_ids[head] = c.page_table[head * c.max_pages + c.q_lengths[head] / P];
    for (int j = 0; j < P; ++j) rows[head * P + j] = static_cast<int32_t>(head * c.residual_slots + j);
    c.q_lengths[head] += P;
    c.r_lengths[head] = 0;
  }
}

template <typename T>
void paged_kv_settle_prefill(int32_t* page_ids, int32_t* rows, int max_closed, const KvSettleLayer& c,
                       T* r_k, T* r_v, const T* stage_k, const T* stage_v, int stage_stride,
                       int row, int Hkv, int D) {
  const int P = c.page_size;
  for (int h = 0; h < Hkv; ++h) {
    const long head = static_cast<long>(row) * Hkv + h;
    const int S = c.r_lengths[head], closed = std::max(0, S - 1) / P, C = closed * P;
    for (int m = 0; m < max_closed; ++m) {
      const long j = static_cast<long>(h) * max_closed + m;
      page_ids[j] = m < closed ? c.page_table[head * c.max_pages + m] : -1;
      for (int r = 0; m < closed && r < P; ++r)
        rows[j * P + r] = static_cast<int32_t>(static_cast<long>(h) * stage_stride + m * P + r);
    }
    const long from = (static_cast<long>(h) * stage_stride + C) * D;
    const long to = head * c.residual_slots * D;
    std::copy(stage_k + from, stage_k + from + static_cast<long>(S - C) * D, r_k + to);
    std::copy(stage_v + from, stage_v + from + static_cast<long>(S - C) * D, r_v + to);
    c.q_lengths[head] = C;
    c.r_lengths[head] = S - C;
  }
}

template void paged_kv_settle_prefill<float>(int32_t*, int32_t*, int, const KvSettleLayer&, float*,
                                       float*, const float*, const float*, int, int, int, int);
template void paged_kv_settle_prefill<double>(int32_t*, int32_t*, int, const KvSettleLayer&, double*,
                                        double*, const double*, const double*, int, int, int, int);

}  // namespace dmc::kernels
