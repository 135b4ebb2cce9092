// KVSharer (arXiv 2410.18517): the layer distances against the window-averaged caches formed
// directly, the greedy search against the paper's rule replayed on those distances, decoding with
// a shared layer that stores nothing, and the byte budget knob.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "inference/cache_policy.h"
#include "inference/kv_sharer.h"
#include "tests/decode_util.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;

model::LlamaConfig FourLayers() {
  model::LlamaConfig c = tiny_models::TinyLlama(11, 2);
  c.num_hidden_layers = 4;
  return c;
}

std::vector<std::vector<int32_t>> Windows() {
  return {tiny_models::RandomTokens(12, 11, 1), tiny_models::RandomTokens(12, 11, 2)};
}

TEST(KvSharer, DistancesAreBetweenTheWindowAveragedCaches) {
  model::Llama<float> m(FourLayers(), nullptr);
  tiny_models::RandomizeParams(m, 4);
  const auto windows = Windows();
  const auto distance = inference::KvSharerLayerDistances(m, windows);
  ASSERT_TRUE(distance.ok()) << distance.status();
  // Directly: each layer's keys and values of both windows, averaged, then the norm.
  std::vector<std::vector<double>> mean(4);
  for (const auto& w : windows) {
    const std::vector<int32_t> none(w.size(), -1);
    m.Forward(w.data(), none.data(), 1, static_cast<int>(w.size()), model::StepOptions{});
    for (int l = 0; l < 4; ++l) {
      std::vector<float> kv = m.rotated_keys(l);
      kv.insert(kv.end(), m.values(l).begin(), m.values(l).end());
      mean[l].resize(kv.size(), 0.0);
      for (size_t i = 0; i < kv.size(); ++i) mean[l][i] += kv[i] / 2.0;
    }
  }
  for (int a = 0; a < 4; ++a)
    for (int b = 0; b < 4; ++b) {
      double d2 = 0;
      for (size_t i = 0; i < mean[a].size(); ++i) d2 += std::pow(mean[a][i] - mean[b][i], 2);
      EXPECT_NEAR((*distance)[a * 4 + b], std::sqrt(d2), 1e-6 * (1 + std::sqrt(d2)));
    }
}

// With a threshold every model meets, the search keeps pairs in descending distance, skipping a
// pair whose later layer already shares or is read, or whose earlier layer shares; with one no
// model meets, none.
TEST(KvSharer, SearchFollowsTheDissimilarityOrder) {
  model::Llama<float> m(FourLayers(), nullptr);
  tiny_models::RandomizeParams(m, 4);
  const auto windows = Windows();
  const auto distance = inference::KvSharerLayerDistances(m, windows);
  ASSERT_TRUE(distance.ok());
  std::vector<std::pair<int, int>> pairs;
  for (int l = 1; l < 4; ++l)
    for (int s = 0; s < l; ++s) pairs.push_back({l, s});
  std::stable_sort(pairs.begin(), pairs.end(), [&](auto a, auto b) {
    return (*distance)[a.first * 4 + a.second] > (*distance)[b.first * 4 + b.second];
  });
  std::vector<int> source = {0, 1, 2, 3};
  std::vector<std::pair<int, int>> want;
  for (auto [l, s] : pairs) {
    const bool read = std::count(source.begin(), source.end(), l) > 1;
    if (want.size() == 3 || source[s] != s || source[l] != l || read) continue;
    source[l] = s;
    want.push_back({l, s});
  }
  const auto all = inference::CalibrateKvSharer(m, windows, 4, -2.0);
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(*all, want);
  const auto none = inference::CalibrateKvSharer(m, windows, 4, 2.0);
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->empty());
}

// Layer 1 reading layer 0's cache: layer 1 holds no slot, the sequence's bytes are those of the
// other layers; every layer reading its own decodes as vanilla.
TEST(KvSharer, ASharedLayerStoresNothing) {
  model::Llama<double> m(tiny_models::TinyLlama(11, 2), nullptr);
  tiny_models::RandomizeParams(m, 31);
  std::vector<std::vector<int32_t>> tokens = {tiny_models::RandomTokens(20, 11, 3)};
  CachePolicy policy;
  policy.method = CacheMethod::kVanilla;
  std::vector<int> vanilla_lengths, own_lengths, shared_lengths;
  const std::vector<double> vanilla =
      tiny_models::DecodeLogits(m, policy, tokens, 4, &vanilla_lengths);
  policy.kv_source = {0, 1};
  EXPECT_LT(tiny_models::MaxAbsDiff(vanilla, tiny_models::DecodeLogits(m, policy, tokens, 4,
                                                                      &own_lengths)),
            1e-12);
  policy.kv_source = {0, 0};
  const std::vector<double> shared =
      tiny_models::DecodeLogits(m, policy, tokens, 4, &shared_lengths);
  EXPECT_GT(tiny_models::MaxAbsDiff(vanilla, shared), 1e-6);
  EXPECT_EQ(shared_lengths, (std::vector<int>{20, 20, 0, 0}));
  EXPECT_EQ(inference::PolicyName(policy), "kvsharer-1");
  policy.kv_source = {1, 1};
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateKvSharing(policy, 2)));
  policy.kv_source = {0, 0};
  policy.method = CacheMethod::kH2O;
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateKvSharing(policy, 2)));
}

// The knob: the fewest accepted pairs whose bytes meet the budget, the shared layers counted once.
TEST(KvSharer, BudgetKnobIsTheSharedLayers) {
  inference::PagedCacheOptions shape;
  shape.layers = 4;
  shape.kv_heads = 2;
  shape.head_dim = 16;
  shape.page_size = 16;
  const int T = 256;
  const long vanilla = inference::KvSequenceBytes<float>(shape, std::vector<int>(8, T));
  const inference::LayerCalibration calibration{{}, {{3, 0}, {2, 1}}};
  const auto half =
      inference::PolicyForBytes("kvsharer", shape, 4, 4, T, vanilla / 2, {}, calibration);
  ASSERT_TRUE(half.ok()) << half.status();
  EXPECT_EQ(half->kv_source, (std::vector<int>{0, 1, 1, 0}));
  const auto three_quarters =
      inference::PolicyForBytes("kvsharer", shape, 4, 4, T, vanilla * 3 / 4, {}, calibration);
  ASSERT_TRUE(three_quarters.ok());
  EXPECT_EQ(three_quarters->kv_source, (std::vector<int>{0, 1, 2, 0}));
  EXPECT_TRUE(absl::IsInvalidArgument(
      inference::PolicyForBytes("kvsharer", shape, 4, 4, T, vanilla / 4, {}, calibration)
          .status()));
}

}  // namespace
}  // namespace dmc
