// kernels::paged_kv_dms_evict and paged_kv_dms_prefill (DMS's delayed eviction on the flat cache
// layer the GPU engine keeps) against the CPU cache's own DMS path, CacheToken (append, then
// DmsUpdate) over a PagedKvCache, fed the same keys, values and decisions: token by token, every
// head keeps the same slots in the same order with the same rows and marks; after a prefill, the
// same tokens (in position order there), and decoding on from both keeps them equal.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <tuple>
#include <vector>

#include "inference/paged_decoder.h"
#include "inference/paged_kv_cache.h"
#include "kernels/paged_kv_dms_evict.h"
#include "tests/flat_kv_layer.h"

namespace dmc {
namespace {

using inference::CacheMethod;

constexpr int kRows = 3, kHkv = 2, kD = 4, kPage = 3;

// One layer of kHkv heads of kD channels with DMS window w (CacheToken reads the head size, RoPE
// and the window).
model::LlamaConfig DmsLayer(int window) {
  model::LlamaConfig c;
  c.vocab_size = 8;
  c.hidden_size = kHkv * kD;
  c.intermediate_size = 8;
  c.num_hidden_layers = 1;
  c.num_attention_heads = kHkv;
  c.num_key_value_heads = kHkv;
  c.max_position_embeddings = 256;
  c.rope_theta = 100.0f;
  c.dms.variant = model::DmsVariant::kAdapter;
  c.dms.enabled = true;
  c.dms.window = window;
  return c;
}

// The tokens of one step: keys and values [n, Hkv, D] (pre-RoPE), decisions [n, Hkv].
struct Tokens {
  std::vector<float> k, v, evict;
};
Tokens RandomTokens(int n, std::mt19937_64& rng) {
  std::normal_distribution<float> n01;
  Tokens t;
  t.k.resize(size_t(n) * kHkv * kD);
  t.v.resize(t.k.size());
  t.evict.resize(size_t(n) * kHkv);
  for (float& x : t.k) x = n01(rng);
  for (float& x : t.v) x = n01(rng);
  for (float& x : t.evict) x = rng() % 2 ? 1.0f : 0.0f;
  return t;
}

// Feeds token i of `t` to sequence seqs[i] of the CPU cache at positions[i] (CacheToken: append,
// then DmsUpdate).
void FeedCpu(inference::PagedKvCache<float>& cache, const model::LlamaConfig& c,
             const std::vector<int>& seqs, const Tokens& t, const std::vector<int32_t>& positions) {
  for (size_t i = 0; i < seqs.size(); ++i)
    for (int h = 0; h < kHkv; ++h) {
      const size_t g = i * kHkv + h;
      ASSERT_TRUE(inference::CacheToken(cache, c, CacheMethod::kDms, seqs[i], 0, h,
                                        t.k.data() + g * kD, t.v.data() + g * kD, 1.0f,
                                        t.evict[g] > 0.5f, positions[i])
                      .ok());
    }
}

// A decode step of rows 0..n-1 of a flat layer: the vanilla append, then the DMS eviction.
void StepFlat(const kernels::PagedKvLayer<float>& layer, std::vector<uint8_t>& marks,
              const Tokens& t, const std::vector<int32_t>& positions, int window, float theta) {
  const int n = static_cast<int>(positions.size());
  kernels::paged_kv_append(layer, t.k.data(), t.v.data(), nullptr, nullptr, positions.data(), n,
                           kHkv, kD, theta, false);
  kernels::paged_kv_dms_evict(layer, marks.data(), t.evict.data(), positions.data(), n, kHkv, kD,
                              window);
}

// What a head holds: position → (key, value, mark).
using HeadContent = std::map<int32_t, std::tuple<std::vector<float>, std::vector<float>, bool>>;
HeadContent CpuHead(inference::PagedKvCache<float>& cache, int seq, int h) {
  HeadContent m;
  for (int s = 0; s < cache.length(seq, 0, h); ++s) {
    std::vector<float> key(kD), value(kD);
    cache.ReadSlot(seq, 0, h, s, key.data(), value.data());
    m[cache.position(seq, 0, h, s)] = {key, value, cache.score(seq, 0, h, s) > 0};
  }
  return m;
}
HeadContent FlatHead(const test_util::FlatKvLayer& flat, const std::vector<uint8_t>& marks,
                     int row, int h) {
  HeadContent m;
  for (int s = 0; s < flat.length(row, h); ++s) {
    const long r = flat.Row(row, h, s);
    m[flat.slot_pos[r]] = {{flat.k_pool.begin() + r * kD, flat.k_pool.begin() + (r + 1) * kD},
                           {flat.v_pool.begin() + r * kD, flat.v_pool.begin() + (r + 1) * kD},
                           marks[r] != 0};
  }
  return m;
}

// Rows no slot holds get marks of 1: a token appended there later must enter unmarked.
void PoisonFreeMarks(const test_util::FlatKvLayer& flat, std::vector<uint8_t>& marks) {
  std::vector<bool> held(marks.size(), false);
  for (int i = 0; i < flat.rows; ++i)
    for (int h = 0; h < kHkv; ++h)
      for (int s = 0; s < flat.length(i, h); ++s) held[flat.Row(i, h, s)] = true;
  for (size_t r = 0; r < held.size(); ++r)
    if (!held[r]) marks[r] = 1;
}

inference::PagedKvCache<float> CpuCache(const model::LlamaConfig& c) {
  inference::PagedKvCache<float> cache(inference::CacheOptionsFor(c, CacheMethod::kDms, 1 << 22,
                                                                  kPage));
  for (int i = 0; i < kRows; ++i) EXPECT_TRUE(cache.AddSequence(i).ok());
  return cache;
}

class PagedKvDmsEvict : public ::testing::TestWithParam<int> {};

// Row i at positions 5i, 5i + 1, ... (the first one marks nothing the cache holds); every step
// the same slots in the same order, rows, positions and marks as the CPU cache.
TEST_P(PagedKvDmsEvict, DecodeMatchesTheCachePolicySlotBySlot) {
  const int window = GetParam(), steps = 30;
  const model::LlamaConfig c = DmsLayer(window);
  std::mt19937_64 rng(5 + window);
  test_util::FlatKvLayer flat(kRows, kHkv, kD, kPage, steps + 1, rng);
  std::vector<uint8_t> marks(flat.slot_pos.size(), 1);
  inference::PagedKvCache<float> cache = CpuCache(c);
  long evicted = 0;
  for (int step = 0; step < steps; ++step) {
    std::vector<int32_t> positions(kRows);
    for (int i = 0; i < kRows; ++i) positions[i] = step + 5 * i;
    const Tokens t = RandomTokens(kRows, rng);
    FeedCpu(cache, c, {0, 1, 2}, t, positions);
    StepFlat(flat.View(), marks, t, positions, window, c.rope_theta);
    for (int i = 0; i < kRows; ++i)
      for (int h = 0; h < kHkv; ++h) {
        SCOPED_TRACE(testing::Message() << "step " << step << " row " << i << " head " << h);
        const int n = cache.length(i, 0, h);
        ASSERT_EQ(flat.length(i, h), n);
        for (int s = 0; s < n; ++s) {
          const long r = flat.Row(i, h, s);
          ASSERT_EQ(flat.slot_pos[r], cache.position(i, 0, h, s)) << "slot " << s;
          ASSERT_EQ(marks[r] != 0, cache.score(i, 0, h, s) > 0) << "slot " << s;
          std::vector<float> key(kD), value(kD);
          cache.ReadSlot(i, 0, h, s, key.data(), value.data());
          for (int d = 0; d < kD; ++d) {
            ASSERT_EQ(flat.k_pool[r * kD + d], key[d]);
            ASSERT_EQ(flat.v_pool[r * kD + d], value[d]);
          }
        }
        if (step == steps - 1) evicted += step + 1 - n;
      }
    PoisonFreeMarks(flat, marks);
  }
  EXPECT_GT(evicted, kRows * kHkv * (steps - window) / 4) << "too few evictions to exercise";
}

// A prompt of P tokens written at once into row 1 holds what feeding it token by token leaves
// (the same tokens, rows and marks, in position order), and decoding on from there keeps both
// equal.
TEST_P(PagedKvDmsEvict, PrefillThenDecodeHoldWhatTokenByTokenFeedingHolds) {
  const int window = GetParam(), row = 1, steps = 12;
  const model::LlamaConfig c = DmsLayer(window);
  for (int P : {1, 2, 7, 20}) {
    SCOPED_TRACE(testing::Message() << "prompt " << P);
    std::mt19937_64 rng(17 + P + window);
    test_util::FlatKvLayer flat(kRows, kHkv, kD, kPage, P + steps, rng);
    std::vector<uint8_t> marks(flat.slot_pos.size(), 1);
    inference::PagedKvCache<float> cache = CpuCache(c);
    const Tokens prompt = RandomTokens(P, rng);
    for (int t = 0; t < P; ++t) {
      Tokens one;
      one.k.assign(prompt.k.begin() + t * kHkv * kD, prompt.k.begin() + (t + 1) * kHkv * kD);
      one.v.assign(prompt.v.begin() + t * kHkv * kD, prompt.v.begin() + (t + 1) * kHkv * kD);
      one.evict.assign(prompt.evict.begin() + t * kHkv, prompt.evict.begin() + (t + 1) * kHkv);
      FeedCpu(cache, c, {row}, one, {t});
    }
    kernels::paged_kv_dms_prefill(flat.View(), marks.data(), row, prompt.k.data(),
                                  prompt.v.data(), prompt.evict.data(), P, kHkv, kD, window,
                                  c.rope_theta);
    for (int h = 0; h < kHkv; ++h) {
      SCOPED_TRACE(testing::Message() << "head " << h);
      ASSERT_EQ(flat.length(row, h), cache.length(row, 0, h));
      EXPECT_EQ(FlatHead(flat, marks, row, h), CpuHead(cache, row, h));
      for (int s = 1; s < flat.length(row, h); ++s)
        EXPECT_LT(flat.slot_pos[flat.Row(row, h, s - 1)], flat.slot_pos[flat.Row(row, h, s)]);
      if (P == 20) {
        EXPECT_LT(flat.length(row, h), P - window / 2) << "too few evictions to exercise";
      }
    }
    PoisonFreeMarks(flat, marks);
    // Row 1 decodes on alone: a step covers rows 0..n-1, so it steps row 0 of a view that
    // starts at row 1.
    kernels::PagedKvLayer<float> from_row = flat.View();
    from_row.page_table += static_cast<long>(row) * kHkv * flat.max_pages;
    from_row.lengths += static_cast<long>(row) * kHkv;
    for (int step = 0; step < steps; ++step) {
      const Tokens t = RandomTokens(1, rng);
      FeedCpu(cache, c, {row}, t, {P + step});
      StepFlat(from_row, marks, t, {P + step}, window, c.rope_theta);
      for (int h = 0; h < kHkv; ++h) {
        SCOPED_TRACE(testing::Message() << "decode step " << step << " head " << h);
        ASSERT_EQ(FlatHead(flat, marks, row, h), CpuHead(cache, row, h));
      }
      PoisonFreeMarks(flat, marks);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Windows, PagedKvDmsEvict, ::testing::Values(0, 1, 3),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "w" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace dmc
