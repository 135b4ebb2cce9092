// Per-layer budgets of the eviction baselines (inference/layer_budgets.h): PyramidInfer's and
// ZigZagKV's allocation rules against their formulas evaluated directly, the total kept equal to
// the uniform budget's; ZigZagKV's LMBA and its calibration on attention whose answer is known;
// H2O and TOVA decoding holding each layer's budget; the byte budget knob.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_format.h"
#include "inference/cache_policy.h"
#include "inference/layer_budgets.h"
#include "tests/decode_util.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;
using inference::LayerAllocation;

long Sum(const std::vector<int>& x) { return std::accumulate(x.begin(), x.end(), 0L); }

// PyramidInfer: w_l = Π_{i <= l} ((1 − 0.9)(cos(π i / L) + 1) / 2 + 0.9), budget_l the share
// L·B·w_l / Σ w rounded: within one slot of it, shrinking with depth, the total exactly L·B.
TEST(LayerBudgets, PyramidInferFollowsItsCosineDecay) {
  for (int L : {4, 12}) {
    std::vector<double> w;
    double kept = 1;
    for (int l = 0; l < L; ++l) w.push_back(kept *= 0.1 * (std::cos(M_PI * l / L) + 1) / 2 + 0.9);
    const double sum = std::accumulate(w.begin(), w.end(), 0.0);
    for (int B : {5, 40, 100}) {
      const std::vector<int> b = inference::PyramidInferBudgets(L, B, 1000);
      ASSERT_EQ(static_cast<int>(b.size()), L);
      EXPECT_EQ(Sum(b), static_cast<long>(L) * B);
      for (int l = 0; l < L; ++l) {
        EXPECT_LT(std::abs(b[l] - L * B * w[l] / sum), 1.0) << "L " << L << " B " << B;
        if (l > 0) {
          EXPECT_LE(b[l], b[l - 1]);
        }
      }
      if (B >= 40) {
        EXPECT_LT(b[L - 1], b[0]) << "no pyramid at L " << L << " B " << B;
      }
    }
  }
}

// ZigZagKV's Eq. 6: budget_l = 0.2·B + 0.8·B·L·LMBA_l / Σ LMBA; a share above seq_len is capped
// and its excess goes to the other layers, keeping L·B.
TEST(LayerBudgets, ZigZagFollowsEquationSix) {
  const std::vector<double> lmba = {12.0, 3.0, 6.0, 3.0};
  const int L = 4, B = 20;
  const std::vector<int> b = inference::ZigZagBudgets(lmba, B, 1000);
  EXPECT_EQ(Sum(b), L * B);
  for (int l = 0; l < L; ++l) EXPECT_LT(std::abs(b[l] - (4.0 + 16.0 * L * lmba[l] / 24.0)), 1.0);
  // Layer 0's share (36) over a cap of 30: 30, and the 6 left spread over the others as weighed.
  const std::vector<int> capped = inference::ZigZagBudgets(lmba, B, 30);
  EXPECT_EQ(capped[0], 30);
  EXPECT_EQ(Sum(capped), L * B);
  for (int l = 1; l < L; ++l) EXPECT_GE(capped[l], b[l]);
  // Every budget at least one slot.
  const std::vector<int> tiny = inference::ZigZagBudgets({100.0, 1.0, 1.0, 1.0}, 1, 1000);
  EXPECT_EQ(tiny, (std::vector<int>{1, 1, 1, 1}));
}

TEST(LayerBudgets, LayerMinimumBudgetIsTheFewestTokensReachingTau) {
  EXPECT_EQ(inference::LayerMinimumBudget({0.5, 0.1, 0.3, 0.1}, 0.9), 3);
  EXPECT_EQ(inference::LayerMinimumBudget({0.5, 0.1, 0.3, 0.1}, 0.8), 2);
  EXPECT_EQ(inference::LayerMinimumBudget({1.0}, 0.9), 1);
  EXPECT_EQ(inference::LayerMinimumBudget(std::vector<double>(10, 0.1), 0.9), 9);
}

// With the query projections zeroed, every query attends uniformly: the query at position t
// needs ceil(0.9 (t + 1)) tokens in every layer, which the calibration must average.
TEST(LayerBudgets, ZigZagCalibrationOnUniformAttention) {
  model::Llama<float> m(tiny_models::TinyLlama(11, 2), nullptr);
  tiny_models::RandomizeParams(m, 5);
  for (const auto& s : m.param_specs())
    if (s.name.find("q_proj") != std::string::npos)
      std::fill_n(m.params().begin() + s.offset, s.size, 0.0f);
  const int T = 20;
  const auto calibrated = inference::CalibrateZigZag(
      m, {tiny_models::RandomTokens(T, 11, 1), tiny_models::RandomTokens(T, 11, 2)});
  ASSERT_TRUE(calibrated.ok()) << calibrated.status();
  double want = 0;
  for (int t = T - inference::kZigZagObservation; t < T; ++t)
    want += std::ceil(inference::kZigZagAttentionMass * (t + 1) - 1e-9);
  want /= inference::kZigZagObservation;
  ASSERT_EQ(calibrated->size(), 2u);
  for (double x : *calibrated) EXPECT_NEAR(x, want, 1e-9);
}

// Decoding with per-layer budgets: each layer ends holding its own budget; budgets equal in every
// layer decode exactly as the uniform policy.
TEST(LayerBudgets, EvictionHoldsEachLayersBudget) {
  model::Llama<double> m(tiny_models::TinyLlama(11, 2), nullptr);
  tiny_models::RandomizeParams(m, 31);
  std::vector<std::vector<int32_t>> tokens;
  for (int b = 0; b < 2; ++b) tokens.push_back(tiny_models::RandomTokens(30, 11, 9 + b));
  for (CacheMethod method : {CacheMethod::kH2O, CacheMethod::kTova}) {
    CachePolicy uniform{method, 8, method == CacheMethod::kH2O ? 4 : 0};
    std::vector<int> uniform_lengths, same_lengths, layered_lengths;
    const std::vector<double> want =
        tiny_models::DecodeLogits(m, uniform, tokens, 4, &uniform_lengths);
    CachePolicy same = uniform;
    same.layer_budget = {8, 8};
    EXPECT_LT(tiny_models::MaxAbsDiff(tiny_models::DecodeLogits(m, same, tokens, 4, &same_lengths),
                                      want),
              1e-12);
    EXPECT_EQ(same_lengths, uniform_lengths);
    CachePolicy layered = uniform;
    layered.layer_budget = {11, 5};
    tiny_models::DecodeLogits(m, layered, tokens, 4, &layered_lengths);
    // [sequence][layer][KV head]
    EXPECT_EQ(layered_lengths, (std::vector<int>{11, 11, 5, 5, 11, 11, 5, 5}));
  }
}

// dmc-eval --kv_fraction with h2o_pyramid / tova_zigzag: the largest mean budget whose per-layer
// budgets meet the bytes; the next one up does not; zigzag without a calibration, and a per-layer
// allocation of a method without a budget, are errors.
TEST(LayerBudgets, BudgetKnobIsTheMeanSlotsPerLayer) {
  inference::PagedCacheOptions shape;
  shape.layers = 4;
  shape.kv_heads = 2;
  shape.head_dim = 16;
  shape.page_size = 16;
  const int T = 512;
  const long vanilla = inference::KvSequenceBytes<float>(shape, std::vector<int>(8, T));
  const std::vector<double> lmba = {100.0, 20.0, 30.0, 10.0};
  auto bytes = [&](const std::vector<int>& layer_budget) {
    std::vector<int> slots;
    for (int b : layer_budget) slots.insert(slots.end(), 2, b);
    return inference::KvSequenceBytes<float>(shape, slots);
  };
  for (const char* method : {"h2o_pyramid", "tova_zigzag"}) {
    const auto policy =
        inference::PolicyForBytes(method, shape, 4, 4, T, vanilla / 4, {}, {lmba, {}});
    ASSERT_TRUE(policy.ok()) << policy.status();
    EXPECT_EQ(Sum(policy->layer_budget), 4L * policy->budget);
    EXPECT_LE(bytes(policy->layer_budget), vanilla / 4);
    const std::vector<int> next =
        std::string(method) == "h2o_pyramid"
            ? inference::PyramidInferBudgets(4, policy->budget + 1, T)
            : inference::ZigZagBudgets(lmba, policy->budget + 1, T);
    EXPECT_GT(bytes(next), vanilla / 4) << method;
  }
  // The name carries the mean budget per layer: each setting has its own.
  const auto pyramid = inference::PolicyForBytes("h2o_pyramid", shape, 4, 4, T, vanilla / 4, {});
  ASSERT_TRUE(pyramid.ok()) << pyramid.status();
  EXPECT_EQ(inference::PolicyName(*pyramid), absl::StrFormat("h2o-pyramid-%d", pyramid->budget));
  EXPECT_TRUE(absl::IsInvalidArgument(
      inference::PolicyForBytes("h2o_zigzag", shape, 4, 4, T, vanilla / 4, {}).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(
      inference::PolicyForBytes("vanilla_pyramid", shape, 4, 4, T, vanilla / 4, {}).status()));
}

}  // namespace
}  // namespace dmc
