// CPU reference of the page bookkeeping (spec: kernels/paged_kv_pages.h).
#include "kernels/paged_kv_pages.h"

#include <algorithm>

namespace dmc::kernels {

void paged_kv_page_changes(const PagedKvPages& p, int row0, int n, int tokens,
                           PageChange* changes, int32_t* counts, int32_t* row_slots,
                           int32_t* row_spare) {
  const bool quant = p.q_lengths != nullptr;
  for (int j = 0; j < n; ++j) {
    PageChange* list = changes + static_cast<long>(j) * p.L * p.Hkv;
    int32_t slots = 0, spare = 0, count = 0;
    for (int i = 0; i < p.L * p.Hkv; ++i) {
      const int l = i / p.Hkv;
      const long head = (static_cast<long>(l) * p.R + row0 + j) * p.Hkv + i % p.Hkv;
      const int residual = p.lengths[head], quantized = quant ? p.q_lengths[head] : 0;
      slots += residual + quantized;
      const int keep = KvHeadPagesKept(p, l, residual, quantized);
      const int grow = KvHeadPagesToGrow(p, l, residual, quantized, tokens);
      spare += grow - keep;
      if (p.held[head] != grow) {
        list[count++] = {i, std::max(0, p.held[head] - grow), std::max(0, grow - p.held[head])};
        p.held[head] = std::min(p.held[head], grow);
      }
    }
    counts[j] = count;
    row_slots[j] = slots;
    row_spare[j] = spare;
  }
}

void paged_kv_assign_pages(int32_t* page_table, int32_t* held, const int64_t* index,
                           const int32_t* page, int n, int max_pages) {
  for (int j = 0; j < n; ++j) {
    page_table[index[j]] = page[j];
    int32_t& h = held[index[j] / max_pages];
    h = std::max<int32_t>(h, static_cast<int32_t>(index[j] % max_pages) + 1);
  }
}

void paged_kv_clear_rows(int32_t* page_table, int32_t* lengths, int32_t* q_lengths,
                         int32_t* window_count, int32_t sink, int L, int R, int Hkv,
                         int max_pages, int row0, int n) {
  for (int l = 0; l < L; ++l) {
    const long first = (static_cast<long>(l) * R + row0) * Hkv;
    for (long head = first; head < first + static_cast<long>(n) * Hkv; ++head) {
      lengths[head] = 0;
      if (q_lengths != nullptr) q_lengths[head] = 0;
      window_count[head] = 0;
      page_table[head * max_pages] = sink;
    }
  }
}

}  // namespace dmc::kernels
