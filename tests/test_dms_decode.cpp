// The central DMS test (model/DMS.md §8.7): the training-mode forward with hard decisions equals
// decoding token by token over the paged cache with the dms policy, and equals a parallel prefill
// followed by decoding; every head ends with the tokens the hard mask leaves visible to the last
// query, and evicted slots go back to the allocator.
#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "inference/paged_decoder.h"
#include "inference/paged_kv_cache.h"
#include "model/llama.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;
using inference::PagedDecoder;
using inference::PagedKvCache;
using model::DmsVariant;
using model::Llama;

Llama<double> DmsModel(DmsVariant variant, int kv_heads) {
  model::LlamaConfig c = tiny_models::TinyLlama(11, kv_heads);
  c.dms.variant = variant;
  c.dms.enabled = true;
  c.dms.window = 3;
  // a = 100·x - 0.2 with x of either sign: about half of the tokens are marked
  c.dms.offset = 0.2f;
  Llama<double> m(c, nullptr);
  tiny_models::RandomizeParams(m, 40 + kv_heads);
  return m;
}

struct Case {
  DmsVariant variant;
  int kv_heads;
};

class DmsDecode : public ::testing::TestWithParam<Case> {};

TEST_P(DmsDecode, HardTrainingForwardEqualsPrefillAndTokenByTokenDecode) {
  Llama<double> m = DmsModel(GetParam().variant, GetParam().kv_heads);
  const model::LlamaConfig& c = m.config();
  const int T = 24, P = 9, V = c.vocab_size, Hkv = c.num_key_value_heads, w = c.dms.window;
  std::mt19937_64 rng(3);
  std::vector<int32_t> tokens(T), no_targets(T, -1);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % V);
  model::StepOptions hard;
  hard.mode = kernels::DmcDecisionMode::kHard;
  const model::ForwardResult r = m.Forward(tokens.data(), no_targets.data(), 1, T, hard);
  ASSERT_GT(r.merge_fraction, 0.2) << "the test needs evictions";
  ASSERT_LT(r.merge_fraction, 0.8) << "the test needs tokens that stay";
  const std::vector<double> logits = m.logits();
  // what the hard mask leaves visible to the last query: j unless d[j+1] and T-1-j > w
  std::vector<int> visible(size_t(c.num_hidden_layers) * Hkv, 0);
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int h = 0; h < Hkv; ++h)
      for (int j = 0; j < T; ++j)
        visible[l * Hkv + h] +=
            j + 1 < T && m.merge(l)[size_t(j + 1) * Hkv + h] > 0.5 && T - 1 - j > w ? 0 : 1;

  for (int prompt : {0, P}) {  // token by token from the start, and after a parallel prefill
    PagedKvCache<double> cache(inference::CacheOptionsFor(c, CacheMethod::kDms, 1L << 24, 2));
    ASSERT_TRUE(cache.AddSequence(0).ok());
    if (prompt > 0) {
      const std::vector<int32_t> head(tokens.begin(), tokens.begin() + prompt);
      absl::StatusOr<std::vector<double>> pre =
          inference::Prefill(m, CacheMethod::kDms, &cache, 0, head);
      ASSERT_TRUE(pre.ok()) << pre.status();
      for (size_t i = 0; i < pre->size(); ++i)
        EXPECT_NEAR((*pre)[i], logits[i], 1e-10) << "prompt logit " << i;
    }
    auto decoder = PagedDecoder<double>::Create(m, CachePolicy{CacheMethod::kDms}, &cache);
    ASSERT_TRUE(decoder.ok()) << decoder.status();
    std::vector<double> step;
    for (int t = prompt; t < T; ++t) {
      ASSERT_TRUE((*decoder)->Step({0}, &tokens[t], &step).ok());
      for (int v = 0; v < V; ++v)
        ASSERT_NEAR(step[v], logits[size_t(t) * V + v], 1e-10)
            << "position " << t << " (prompt " << prompt << ")";
    }
    long pages = 0;
    for (int l = 0; l < c.num_hidden_layers; ++l)
      for (int h = 0; h < Hkv; ++h) {
        EXPECT_EQ(cache.length(0, l, h), visible[l * Hkv + h]) << "layer " << l << " head " << h;
        pages += (cache.length(0, l, h) + 1) / 2;
      }
    // pages of 2 slots: evicted slots' pages went back and were handed out again
    EXPECT_EQ(cache.allocator().pages_in_use(), pages);
    EXPECT_LT(cache.allocator().high_water(), long(T / 2) * c.num_hidden_layers * Hkv);
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, DmsDecode,
                         ::testing::Values(Case{DmsVariant::kAdapter, 2},
                                           Case{DmsVariant::kAdapter, 1},
                                           Case{DmsVariant::kQueryChannel, 2},
                                           Case{DmsVariant::kQueryChannel, 4}));

// A DMS model decodes with its own decisions only, and the dms cache needs a DMS model.
TEST(DmsDecodeErrors, MethodAndModelMustAgree) {
  Llama<double> dms = DmsModel(DmsVariant::kAdapter, 2);
  PagedKvCache<double> cache(
      inference::CacheOptionsFor(dms.config(), CacheMethod::kVanilla, 1L << 20, 4));
  auto wrong = PagedDecoder<double>::Create(dms, CachePolicy{CacheMethod::kVanilla}, &cache);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("dms cache"), std::string::npos) << wrong.status();
  Llama<double> plain(tiny_models::TinyLlama(11, 2), nullptr);
  auto no_dms = PagedDecoder<double>::Create(plain, CachePolicy{CacheMethod::kDms}, &cache);
  ASSERT_FALSE(no_dms.ok());
  EXPECT_NE(no_dms.status().message().find("DMS model"), std::string::npos) << no_dms.status();
}

}  // namespace
}  // namespace dmc
