// kernels::paged_kv_drop_span (LoMA's segment removal on the flat cache layer the GPU engine
// keeps) against the CPU cache's PagedKvCache::Remove, both holding the same slots: every head
// keeps the same slots in the same order with the same rows and positions, and the CPU cache
// returns the pages that emptied. Spans shaped as LoMA's (t new slots after a segment of t·c),
// c = 1 (the moved slots land right below themselves) and a span shorter than the slots moved
// over it (the moves overlap, so their order matters).
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "inference/paged_kv_cache.h"
#include "kernels/paged_kv_drop.h"
#include "tests/flat_kv_layer.h"

namespace dmc {
namespace {

constexpr int kRows = 3, kHkv = 2, kD = 4, kPage = 3;

TEST(PagedKvDrop, SpanMatchesTheCpuCachesRemove) {
  std::mt19937_64 rng(17);
  std::normal_distribution<float> n01;
  struct Span {
    int count, keep;
  };
  for (const Span span : {Span{6, 2}, Span{2, 2}, Span{1, 3}, Span{8, 4}}) {
    SCOPED_TRACE(testing::Message() << "count " << span.count << " keep " << span.keep);
    inference::PagedCacheOptions o;
    o.layers = 1;
    o.kv_heads = kHkv;
    o.head_dim = kD;
    o.page_size = kPage;
    o.budget_bytes = 1L << 20;
    inference::PagedKvCache<float> cache(o);
    test_util::FlatKvLayer flat(kRows, kHkv, kD, kPage, 32, rng);
    // Row i, head h holds count + keep + 3i + h slots: some spans start on a page boundary.
    std::vector<float> key(kD), value(kD);
    for (int i = 0; i < kRows; ++i) {
      ASSERT_TRUE(cache.AddSequence(i).ok());
      for (int h = 0; h < kHkv; ++h)
        for (int s = 0; s < span.count + span.keep + 3 * i + h; ++s) {
          for (float& x : key) x = n01(rng);
          for (float& x : value) x = n01(rng);
          ASSERT_TRUE(cache.Append(i, 0, h, key.data(), value.data(), 100 * h + s).ok());
          flat.Append(i, h, key.data(), value.data(), 100 * h + s);
        }
    }
    kernels::paged_kv_drop_span(flat.View(), kRows, kHkv, kD, span.count, span.keep);
    long pages = 0;
    for (int i = 0; i < kRows; ++i)
      for (int h = 0; h < kHkv; ++h) {
        const int first = cache.length(i, 0, h) - span.keep - span.count;
        ASSERT_TRUE(cache.Remove(i, 0, h, first, span.count).ok());
        ASSERT_EQ(flat.length(i, h), cache.length(i, 0, h)) << "row " << i << " head " << h;
        EXPECT_EQ(cache.length(i, 0, h), first + span.keep);
        for (int s = 0; s < cache.length(i, 0, h); ++s) {
          cache.ReadSlot(i, 0, h, s, key.data(), value.data());
          const long r = flat.Row(i, h, s);
          for (int d = 0; d < kD; ++d) {
            ASSERT_EQ(flat.k_pool[r * kD + d], key[d]) << "row " << i << " slot " << s;
            ASSERT_EQ(flat.v_pool[r * kD + d], value[d]) << "row " << i << " slot " << s;
          }
          EXPECT_EQ(flat.slot_pos[r], cache.position(i, 0, h, s));
          // the slots before the span stay, the moved ones keep their order
          EXPECT_EQ(cache.position(i, 0, h, s), 100 * h + (s < first ? s : s + span.count));
        }
        pages += (cache.length(i, 0, h) + kPage - 1) / kPage;
      }
    EXPECT_EQ(cache.allocator().pages_in_use(), pages) << "the emptied pages were not returned";
    const absl::Status s = cache.Remove(0, 0, 0, 1, cache.length(0, 0, 0));
    EXPECT_TRUE(absl::IsOutOfRange(s)) << s;
  }
}

}  // namespace
}  // namespace dmc
