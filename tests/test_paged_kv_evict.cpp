// kernels::paged_kv_evict (the flat cache layer the GPU engine keeps) against the CPU cache's own
// policies, H2OUpdate and TovaUpdate over a PagedKvCache: fed the same tokens and the same
// attention weights, every head must keep the same slots in the same order (the same victims,
// ties included), the same rows and, for H2O, the same accumulated scores.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <vector>

#include "inference/cache_policy.h"
#include "inference/paged_kv_cache.h"
#include "kernels/paged_kv_evict.h"
#include "tests/flat_kv_layer.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;

constexpr int kRows = 3, kH = 4, kHkv = 2, kD = 4, kPage = 3, kSteps = 30;

// Feeds both caches `burst` tokens per row (row i at positions 3i, 3i + 1, ...), then one
// eviction call (several victims per head) with weights on a coarse grid (multiples of 1/8, so
// equal scores are common and the tie rule is exercised), and compares everything; then kSteps
// steps of one token each (one victim per head).
void Compare(const CachePolicy& policy, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> n01;
  const int burst = policy.budget + 3, max_slots = burst + 1;
  test_util::FlatKvLayer flat(kRows, kHkv, kD, kPage, max_slots, rng);
  std::vector<float> scores(flat.slot_pos.size(), 0.0f);  // H2O's, as a fresh cache's slots
  inference::PagedCacheOptions o;
  o.layers = 1;
  o.kv_heads = kHkv;
  o.head_dim = kD;
  o.page_size = kPage;
  o.budget_bytes = 1 << 20;
  inference::PagedKvCache<float> cache(o);
  for (int i = 0; i < kRows; ++i) ASSERT_TRUE(cache.AddSequence(i).ok());

  const int stride = max_slots + 2;
  const kernels::EvictPolicy rule{
      policy.method == CacheMethod::kH2O ? kernels::EvictRule::kH2O : kernels::EvictRule::kTova,
      policy.budget, policy.recent};
  long not_oldest = 0;  // victims other than a head's oldest token
  int pos = 0;
  for (int step = 0; step <= kSteps; ++step) {
    const int tokens = step == 0 ? burst : 1;
    std::vector<int32_t> positions(kRows);
    for (int k = 0; k < tokens; ++k, ++pos)
      for (int i = 0; i < kRows; ++i) {
        positions[i] = pos + 3 * i;
        for (int h = 0; h < kHkv; ++h) {
          std::vector<float> key(kD), value(kD);
          for (float& x : key) x = n01(rng);
          for (float& x : value) x = n01(rng);
          ASSERT_TRUE(cache.Append(i, 0, h, key.data(), value.data(), positions[i]).ok());
          flat.Append(i, h, key.data(), value.data(), positions[i]);
        }
      }
    std::vector<float> probs(size_t(kRows) * kH * stride, -1.0f);
    for (int i = 0; i < kRows; ++i)
      for (int g = 0; g < kH; ++g)
        for (int s = 0; s < cache.length(i, 0, g / (kH / kHkv)); ++s)
          probs[(size_t(i) * kH + g) * stride + s] = (rng() % 8) / 8.0f;
    std::vector<int32_t> oldest(kRows * kHkv);
    for (int i = 0; i < kRows; ++i)
      for (int h = 0; h < kHkv; ++h) {
        oldest[i * kHkv + h] = positions[i];
        for (int s = 0; s < cache.length(i, 0, h); ++s)
          oldest[i * kHkv + h] = std::min(oldest[i * kHkv + h], cache.position(i, 0, h, s));
      }

    std::vector<float> kernel_probs = probs;
    kernels::paged_kv_evict(flat.View(), scores.data(), kernel_probs.data(), stride,
                            positions.data(), kRows, kH, kHkv, kD, rule);
    for (int i = 0; i < kRows; ++i) {
      const float* p = probs.data() + size_t(i) * kH * stride;
      const absl::Status s =
          policy.method == CacheMethod::kH2O
              ? inference::H2OUpdate(cache, i, 0, positions[i], p, stride, kH, policy)
              : inference::TovaUpdate(cache, i, 0, p, stride, kH, policy);
      ASSERT_TRUE(s.ok()) << s;
    }
    for (int i = 0; i < kRows; ++i)
      for (int h = 0; h < kHkv; ++h) {
        SCOPED_TRACE(testing::Message() << "step " << step << " row " << i << " head " << h);
        const int n = cache.length(i, 0, h);
        ASSERT_EQ(flat.lengths[i * kHkv + h], n);
        ASSERT_EQ(n, std::min(policy.budget, pos));
        bool kept_oldest = false;
        for (int s = 0; s < n; ++s) {
          const long r = flat.Row(i, h, s);
          ASSERT_EQ(flat.slot_pos[r], cache.position(i, 0, h, s)) << "slot " << s;
          std::vector<float> key(kD), value(kD);
          cache.ReadSlot(i, 0, h, s, key.data(), value.data());
          for (int d = 0; d < kD; ++d) {
            ASSERT_EQ(flat.k_pool[r * kD + d], key[d]);
            ASSERT_EQ(flat.v_pool[r * kD + d], value[d]);
          }
          if (policy.method == CacheMethod::kH2O) {
            ASSERT_EQ(scores[r], cache.score(i, 0, h, s)) << "slot " << s;
          }
          kept_oldest = kept_oldest || flat.slot_pos[r] == oldest[i * kHkv + h];
        }
        not_oldest += kept_oldest && step > 0 ? 1 : 0;
      }
    // Rows no slot holds get garbage scores: a slot appended there later must start from 0.
    std::vector<bool> held(scores.size(), false);
    for (int i = 0; i < kRows; ++i)
      for (int h = 0; h < kHkv; ++h)
        for (int s = 0; s < flat.lengths[i * kHkv + h]; ++s) held[flat.Row(i, h, s)] = true;
    for (size_t r = 0; r < held.size(); ++r)
      if (!held[r]) scores[r] = 123.0f;
  }
  EXPECT_GT(not_oldest, 0) << "every eviction took the oldest token: the scores never mattered";
}

TEST(PagedKvEvict, H2OMatchesTheCachePolicy) {
  for (const auto& [budget, recent] :
       std::vector<std::pair<int, int>>{{8, 4}, {5, 2}, {3, 0}, {1, 0}}) {
    SCOPED_TRACE(testing::Message() << "budget " << budget << " recent " << recent);
    Compare({CacheMethod::kH2O, budget, recent}, 7 + budget);
  }
}

TEST(PagedKvEvict, TovaMatchesTheCachePolicy) {
  for (int budget : {6, 3, 1}) {
    SCOPED_TRACE(testing::Message() << "budget " << budget);
    Compare({CacheMethod::kTova, budget, 0}, 21 + budget);
  }
}

}  // namespace
}  // namespace dmc
