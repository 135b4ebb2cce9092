// One layer of the flat paged cache that the GPU engine keeps (kernels/paged_kv_write.h) on the
// host, its pages in shuffled order, for the tests that check the device-side cache ops' CPU
// references (paged_kv_evict, paged_kv_dms_evict) against the CPU cache, PagedKvCache.
#pragma once

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/paged_kv_write.h"

namespace dmc::test_util {

struct FlatKvLayer {
  int rows = 0, kv_heads = 0, head_dim = 0, page_size = 0, max_pages = 0;
  std::vector<float> k_pool, v_pool;
  std::vector<int32_t> slot_pos, table, lengths;

  // Room for max_slots slots in every head of `rows` rows, each head's pages drawn at random.
  FlatKvLayer(int rows_, int kv_heads_, int head_dim_, int page_size_, int max_slots,
              std::mt19937_64& rng)
      : rows(rows_), kv_heads(kv_heads_), head_dim(head_dim_), page_size(page_size_),
        max_pages((max_slots + page_size_ - 1) / page_size_) {
    const size_t pages = static_cast<size_t>(rows) * kv_heads * max_pages;
    k_pool.assign(pages * page_size * head_dim, 0.f);
    v_pool = k_pool;
    slot_pos.assign(pages * page_size, -1);
    table.resize(pages);
    for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i);
    std::shuffle(table.begin(), table.end(), rng);
    lengths.assign(static_cast<size_t>(rows) * kv_heads, 0);
  }
  kernels::PagedKvLayer<float> View() {
    kernels::PagedKvLayer<float> c;
    c.k_pool = k_pool.data();
    c.v_pool = v_pool.data();
    c.slot_pos = slot_pos.data();
    c.page_table = table.data();
    c.lengths = lengths.data();
    c.max_pages = max_pages;
    c.page_size = page_size;
    return c;
  }
  // The pool row of slot s of head (row, h).
  long Row(int row, int h, int s) const {
    kernels::PagedKvLayer<float> c;
    c.page_table = table.data();
    c.max_pages = max_pages;
    c.page_size = page_size;
    return kernels::SlotRow(c, static_cast<long>(row) * kv_heads + h, s);
  }
  int length(int row, int h) const { return lengths[static_cast<size_t>(row) * kv_heads + h]; }
  // Appends (key, value) at `pos` as the next slot of head (row, h), as they are.
  void Append(int row, int h, const float* key, const float* value, int pos) {
    const int s = lengths[static_cast<size_t>(row) * kv_heads + h]++;
    const long r = Row(row, h, s);
    std::copy_n(key, head_dim, k_pool.begin() + r * head_dim);
    std::copy_n(value, head_dim, v_pool.begin() + r * head_dim);
    slot_pos[r] = pos;
  }
};

}  // namespace dmc::test_util
