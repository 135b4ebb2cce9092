// The page allocator and the paged cache under random append / accumulate / evict / free
// sequences: page counts always match the heads' lengths, no page is held twice, every slot holds
// what was put there, and freeing everything returns every byte; double frees are refused.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "inference/page_allocator.h"
#include "inference/paged_kv_cache.h"

namespace dmc {
namespace {

using inference::PagedCacheOptions;
using inference::PagedKvCache;
using inference::PageAllocator;

TEST(InferenceAllocator, RefusesDoubleFreesAndUnknownPages) {
  PageAllocator a(10 * 64, 64);
  EXPECT_EQ(a.free_pages(), 10);
  auto p = a.Allocate();
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(a.used_bytes(), 64);
  EXPECT_TRUE(a.Free(*p).ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(a.Free(*p)));
  EXPECT_TRUE(absl::IsInvalidArgument(a.Free(7)));
  EXPECT_TRUE(absl::IsFailedPrecondition(a.Release(1)));
  for (int i = 0; i < 10; ++i) ASSERT_TRUE(a.Allocate().ok());
  const auto full = a.Allocate();
  EXPECT_TRUE(absl::IsResourceExhausted(full.status()));
  EXPECT_NE(full.status().message().find("budget of 640 bytes exhausted"), std::string::npos);
  EXPECT_EQ(a.peak_bytes(), 640);
}

// The accounting a slot-counting path (the GPU evaluation) uses, by hand: layers 2, one KV head,
// head dim 4, pages of 3 slots, fp32; heads of 4 and 3 slots hold 2 + 1 pages of
// 3 × (key + value) × 4 × 4 = 96 bytes; DMC with a window of 2 adds per head 2 × (4 + 4 + 1) × 4.
// At bf16 pages (the GPU engine's), a page is 48 bytes.
TEST(InferenceAllocator, KvSequenceBytesChargesPagesAndWindowState) {
  PagedCacheOptions o;
  o.layers = 2;
  o.kv_heads = 1;
  o.head_dim = 4;
  o.page_size = 3;
  EXPECT_EQ(inference::KvPageBytes<float>(o), 96);
  EXPECT_EQ(inference::KvWindowBytes<float>(o), 0);
  EXPECT_EQ(inference::KvSequenceBytes<float>(o, {4, 3}), 3 * 96);
  EXPECT_EQ(inference::KvSequenceBytes<float>(o, {0, 1}), 96);
  o.dmc_window = 2;
  EXPECT_EQ(inference::KvWindowBytes<float>(o), 2 * 72);
  EXPECT_EQ(inference::KvSequenceBytes<float>(o, {4, 3}), 3 * 96 + 144);
  // At the GPU engine's widths the window's keys and values take the pages' bf16 and the
  // importances fp32: per head 2 × ((4 + 4) × 2 + 4).
  EXPECT_EQ(inference::KvWindowBytes(o, 2, 4), 2 * 2 * 20);
  EXPECT_EQ(inference::KvSequenceBytes(o, {4, 3}, 2, 4), 3 * 48 + 80);
  // The cache itself charges the same once it holds those slots.
  o.budget_bytes = 1 << 16;
  PagedKvCache<float> cache(o);
  ASSERT_TRUE(cache.AddSequence(0).ok());
  const std::vector<float> row(o.head_dim, 1.0f);
  for (int t = 0; t < 4; ++t)
    ASSERT_TRUE(cache.AddDmc(0, 0, 0, row.data(), row.data(), 1.0f, false, t).ok());
  for (int t = 0; t < 5; ++t)  // 3 slots: tokens 1 and 3 merge
    ASSERT_TRUE(cache.AddDmc(0, 1, 0, row.data(), row.data(), 1.0f, t % 2 == 1, t).ok());
  EXPECT_EQ(cache.length(0, 1, 0), 3);
  EXPECT_EQ(cache.allocator().used_bytes(), 3 * 96 + 144);
}

// One slot's expected content: the key and value rows are filled with a tag.
struct Slot {
  int32_t position;
  double tag;
};
// A head of the model: its slots in cache order, and the newest raw token of a DMC open slot
// (a merge may follow only an AddDmc: the window belongs to the slot that AddDmc opened).
struct HeadModel {
  std::vector<Slot> slots;
  bool dmc_open = false;
  double last_raw = 0;
};

TEST(InferenceAllocator, RandomCacheOperationsNeverLeakOrDoubleFree) {
  PagedCacheOptions o;
  o.layers = 2;
  o.kv_heads = 2;
  o.head_dim = 4;
  o.page_size = 3;
  o.dmc_window = 2;
  o.budget_bytes = 1 << 16;
  PagedKvCache<double> cache(o);
  const long window_bytes =
      o.layers * o.kv_heads * inference::DmcWindow<double>::Bytes(o.dmc_window, o.head_dim);
  std::mt19937_64 rng(5);
  // Model of the cache: per sequence, per (layer, head), the slots in cache order.
  std::map<int, std::vector<HeadModel>> model;
  int next_seq = 0;
  long frees = 0, evicts = 0, merges = 0;
  for (int op = 0; op < 4000; ++op) {
    const int kind = static_cast<int>(rng() % 10);
    if (model.empty() || kind == 0) {
      ASSERT_TRUE(cache.AddSequence(next_seq).ok());
      model[next_seq++].assign(o.layers * o.kv_heads, {});
    } else if (kind == 1) {
      auto it = std::next(model.begin(), rng() % model.size());
      ASSERT_TRUE(cache.Free(it->first).ok());
      EXPECT_FALSE(cache.Free(it->first).ok()) << "a second free of a sequence must be refused";
      model.erase(it);
      ++frees;
    } else {
      auto it = std::next(model.begin(), rng() % model.size());
      const int seq = it->first, l = rng() % o.layers, h = rng() % o.kv_heads;
      HeadModel& hm = it->second[l * o.kv_heads + h];
      std::vector<Slot>& slots = hm.slots;
      const double tag = static_cast<double>(op);
      const std::vector<double> row(o.head_dim, tag);
      if (kind <= 4 && !slots.empty()) {
        const int victim = static_cast<int>(rng() % slots.size());
        ASSERT_TRUE(cache.Evict(seq, l, h, victim).ok());
        slots[victim] = slots.back();
        slots.pop_back();
        hm.dmc_open = false;
        ++evicts;
      } else if (kind <= 6) {
        // DMC: with a window of 2 the open slot is the omega-weighted mean of its last 2 tokens.
        const bool merge = kind == 6 && hm.dmc_open;
        auto key = cache.AddDmc(seq, l, h, row.data(), row.data(), 1.0, merge, op);
        ASSERT_TRUE(key.ok());
        if (merge) {
          slots.back() = {op, 0.5 * (hm.last_raw + tag)};
          ++merges;
        } else {
          slots.push_back({op, tag});
        }
        hm.dmc_open = true;
        hm.last_raw = tag;
      } else {
        ASSERT_TRUE(cache.Append(seq, l, h, row.data(), row.data(), op).ok());
        slots.push_back({op, tag});
        hm.dmc_open = false;
      }
    }
    // Counting: pages held = sum of ceil(length / page_size); bytes = pages + window state, as
    // KvSequenceBytes charges each sequence from its heads' lengths alone.
    long pages = 0, charged = 0;
    std::set<int32_t> seen;
    for (const auto& [seq, heads] : model) {
      std::vector<int> head_slots;
      for (const HeadModel& hm : heads) head_slots.push_back(static_cast<int>(hm.slots.size()));
      charged += inference::KvSequenceBytes<double>(o, head_slots);
      ASSERT_EQ(cache.bytes(seq), inference::KvSequenceBytes<double>(o, head_slots));
      for (int l = 0; l < o.layers; ++l) {
        std::vector<int32_t> table;
        std::vector<int> lengths;
        int max_pages = 0;
        cache.BlockTable({seq}, l, &table, &lengths, &max_pages);
        for (int h = 0; h < o.kv_heads; ++h) {
          const auto& slots = heads[l * o.kv_heads + h].slots;
          ASSERT_EQ(lengths[h], static_cast<int>(slots.size()));
          const int held = (lengths[h] + o.page_size - 1) / o.page_size;
          pages += held;
          for (int p = 0; p < held; ++p)
            ASSERT_TRUE(seen.insert(table[h * max_pages + p]).second) << "page held twice";
        }
      }
    }
    ASSERT_EQ(cache.allocator().pages_in_use(), pages) << "op " << op;
    ASSERT_EQ(cache.allocator().used_bytes(), charged) << "op " << op;
    ASSERT_EQ(cache.allocator().used_bytes(),
              pages * cache.page_bytes() + long(model.size()) * window_bytes);
  }
  // Contents survived the moves of eviction and the merges.
  for (const auto& [seq, heads] : model)
    for (int l = 0; l < o.layers; ++l)
      for (int h = 0; h < o.kv_heads; ++h) {
        const auto& slots = heads[l * o.kv_heads + h].slots;
        std::vector<double> key(o.head_dim), value(o.head_dim);
        for (int i = 0; i < static_cast<int>(slots.size()); ++i) {
          EXPECT_EQ(cache.position(seq, l, h, i), slots[i].position);
          cache.ReadSlot(seq, l, h, i, key.data(), value.data());
          EXPECT_DOUBLE_EQ(key[0], slots[i].tag);
          EXPECT_DOUBLE_EQ(value[o.head_dim - 1], slots[i].tag);
        }
      }
  EXPECT_GT(frees, 50);
  EXPECT_GT(evicts, 500);
  EXPECT_GT(merges, 100);
  for (const auto& [seq, heads] : model) ASSERT_TRUE(cache.Free(seq).ok());
  EXPECT_EQ(cache.allocator().pages_in_use(), 0);
  EXPECT_EQ(cache.allocator().used_bytes(), 0);
}

}  // namespace
}  // namespace dmc
