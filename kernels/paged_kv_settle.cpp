#include "kernels/paged_kv_settle.h"

#include <algorithm>
#include <vector>

namespace dmc::kernels {

void paged_kv_settle_step(int32_t* page_ids, int32_t* page_rows, int32_t* rows,
                          const KvSettleLayer& c, const float* merge, const int32_t* positions,
                          int n, int Hkv) {
  const int P = c.page_size;
  for (long head = 0; head < static_cast<long>(n) * Hkv; ++head) {
    const int r = c.r_lengths[head];
    const bool merges = merge && r > 0 && positions[head / Hkv] > 0 && merge[head] > 0.5f;
    page_ids[head] = -1;
    if (merges || r != (c.slots_settle ? 1 : P)) continue;
    if (c.slots_settle) {  // the residual's one slot into the next row of the last page
      KvSettleSlot(c, head, page_ids, page_rows, rows);
      continue;
    }
    std::vector<int> order(P);
    for (int j = 0; j < P; ++j) order[j] = j;
    if (c.r_scores) {
      const float* score = c.r_scores + head * c.residual_slots;
      auto saliency = [&](int j) { return static_cast<double>(score[j]) / (P - j); };
      std::stable_sort(order.begin(), order.end(),
                       [&](int a, int b) { return saliency(a) > saliency(b); });
    }
    page_ids[head] = c.page_table[head * c.max_pages + c.q_lengths[head] / P];
    for (int j = 0; j < P; ++j)
      rows[head * P + j] = static_cast<int32_t>(head * c.residual_slots + order[j]);
    c.q_lengths[head] += P;
    c.r_lengths[head] = 0;
  }
}

template <typename T>
void paged_kv_settle_lagged_step(int32_t* page_ids, int32_t* rows, T* stage_k, T* stage_v,
                                 const KvSettleLayer& c, T* r_k, T* r_v,
                                 const int32_t* positions, int n, int Hkv, int D) {
  const int P = c.page_size;
  for (long head = 0; head < static_cast<long>(n) * Hkv; ++head) {
    const int r = c.r_lengths[head], cut = positions[head / Hkv] - c.settle_lag;
    int32_t* pos = c.r_pos + head * c.residual_slots;
    uint8_t* marks = c.r_marks + head * c.residual_slots;
    T* k = r_k + head * c.residual_slots * D;
    T* v = r_v + head * c.residual_slots * D;
    std::vector<int> settled;
    for (int j = 0; j < r; ++j)
      if (pos[j] < cut) settled.push_back(j);
    page_ids[head] = -1;
    if (static_cast<int>(settled.size()) < P) continue;
    std::sort(settled.begin(), settled.end(), [&](int a, int b) { return pos[a] < pos[b]; });
    std::vector<bool> closes(r, false);
    for (int i = 0; i < P; ++i) {
      const int j = settled[i];
      closes[j] = true;
      std::copy_n(k + static_cast<long>(j) * D, D, stage_k + (head * P + i) * D);
      std::copy_n(v + static_cast<long>(j) * D, D, stage_v + (head * P + i) * D);
      rows[head * P + i] = static_cast<int32_t>(head * P + i);
    }
    int kept = 0;
    for (int j = 0; j < r; ++j) {
      if (closes[j]) continue;
      std::copy_n(k + static_cast<long>(j) * D, D, k + static_cast<long>(kept) * D);
      std::copy_n(v + static_cast<long>(j) * D, D, v + static_cast<long>(kept) * D);
      pos[kept] = pos[j];
      marks[kept] = marks[j];
      ++kept;
    }
    page_ids[head] = c.page_table[head * c.max_pages + c.q_lengths[head] / P];
    c.q_lengths[head] += P;
    c.r_lengths[head] = kept;
  }
}

template <typename T>
void paged_kv_settle_prefill(int32_t* page_ids, int32_t* page_rows, int32_t* rows,
                             int max_closed, const KvSettleLayer& c, T* r_k, T* r_v,
                             const T* stage_k,
                             const T* stage_v, const int32_t* stage_pos,
                             const uint8_t* stage_marks, int stage_stride, int row, int tokens,
                             int Hkv, int D) {
  const int P = c.page_size;
  for (int h = 0; h < Hkv; ++h) {
    const long head = static_cast<long>(row) * Hkv + h, first = static_cast<long>(h) * stage_stride;
    const int S = c.r_lengths[head];
    int settled = std::max(0, S - 1);
    if (c.settle_lag > 0) {
      settled = 0;
      for (int s = 0; s < S; ++s) settled += stage_pos[first + s] < tokens - 1 - c.settle_lag;
    }
    if (c.slots_settle) {  // every settled slot into its row
      for (int i = 0; i < max_closed * P; ++i) {
        const long j = static_cast<long>(h) * max_closed * P + i;
        page_ids[j] = i < settled ? c.page_table[head * c.max_pages + i / P] : -1;
        page_rows[j] = i % P;
        rows[j] = static_cast<int32_t>(first + i);
      }
    }
    const int closed = settled / P, C = c.slots_settle ? settled : closed * P;
    for (int m = 0; !c.slots_settle && m < max_closed; ++m) {
      const long j = static_cast<long>(h) * max_closed + m;
      page_ids[j] = m < closed ? c.page_table[head * c.max_pages + m] : -1;
      for (int r = 0; m < closed && r < P; ++r)
        rows[j * P + r] = static_cast<int32_t>(first + m * P + r);
    }
    const long from = (first + C) * D, to = head * c.residual_slots * D;
    std::copy(stage_k + from, stage_k + from + static_cast<long>(S - C) * D, r_k + to);
    std::copy(stage_v + from, stage_v + from + static_cast<long>(S - C) * D, r_v + to);
    if (c.settle_lag > 0) {
      std::copy_n(stage_pos + first + C, S - C, c.r_pos + head * c.residual_slots);
      std::copy_n(stage_marks + first + C, S - C, c.r_marks + head * c.residual_slots);
    }
    c.q_lengths[head] = C;
    c.r_lengths[head] = S - C;
  }
}

void paged_kv_settle_scores(const KvSettleLayer& c, const float* probs, int probs_stride, int n,
                            int H, int Hkv) {
  const int G = H / Hkv;
  for (long head = 0; head < static_cast<long>(n) * Hkv; ++head) {
    const long i = head / Hkv, h = head % Hkv;
    const int r = c.r_lengths[head], q = c.q_lengths[head];
    float* score = c.r_scores + head * c.residual_slots;
    for (int j = 0; j < r; ++j) {
      float s = j == r - 1 ? 0.0f : score[j];
      for (long g = h * G; g < (h + 1) * G; ++g) s += probs[(i * H + g) * probs_stride + q + j];
      score[j] = s;
    }
  }
}

template void paged_kv_settle_lagged_step<float>(int32_t*, int32_t*, float*, float*,
                                                 const KvSettleLayer&, float*, float*,
                                                 const int32_t*, int, int, int);
template void paged_kv_settle_lagged_step<double>(int32_t*, int32_t*, double*, double*,
                                                  const KvSettleLayer&, double*, double*,
                                                  const int32_t*, int, int, int);
template void paged_kv_settle_prefill<float>(int32_t*, int32_t*, int32_t*, int,
                                             const KvSettleLayer&, float*, float*, const float*,
                                             const float*, const int32_t*, const uint8_t*, int,
                                             int, int, int, int);
template void paged_kv_settle_prefill<double>(int32_t*, int32_t*, int32_t*, int,
                                              const KvSettleLayer&, double*, double*,
                                              const double*, const double*, const int32_t*,
                                              const uint8_t*, int, int, int, int, int);

}  // namespace dmc::kernels
