// The eviction baselines in the paged cache (H2O, TOVA) against plain reference implementations
// that keep every head's tokens in a list in position order and recompute attention densely.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "inference/cache_policy.h"
#include "inference/paged_kv_cache.h"
#include "kernels/decode_attention.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;
using inference::PagedCacheOptions;
using inference::PagedKvCache;

constexpr int kH = 4, kHkv = 2, kD = 4, kSteps = 40;

struct Token {
  int pos;
  std::vector<double> k, v;
  double score = 0;
};

// softmax_i(q · k_i / sqrt(D)) over tokens, straightforwardly.
std::vector<double> Softmax(const double* q, const std::vector<Token>& tokens) {
  std::vector<double> p;
  double max_s = -1e300, sum = 0;
  for (const Token& tk : tokens) {
    double dot = 0;
    for (int c = 0; c < kD; ++c) dot += q[c] * tk.k[c];
    p.push_back(dot / std::sqrt(double(kD)));
    max_s = std::max(max_s, p.back());
  }
  for (double& x : p) sum += (x = std::exp(x - max_s));
  for (double& x : p) x /= sum;
  return p;
}

std::vector<double> Mix(const std::vector<double>& p, const std::vector<Token>& tokens) {
  std::vector<double> out(kD, 0.0);
  for (size_t i = 0; i < tokens.size(); ++i)
    for (int c = 0; c < kD; ++c) out[c] += p[i] * tokens[i].v[c];
  return out;
}

// Runs kSteps random tokens through the cache with `policy` and through `reference_step`
// (which updates the per-head token lists and returns the attention outputs [H, D]); compares
// outputs and kept positions at every step.
template <typename Ref>
void Compare(const CachePolicy& policy, uint64_t seed, Ref reference_step) {
  PagedCacheOptions o;
  o.layers = 1;
  o.kv_heads = kHkv;
  o.head_dim = kD;
  o.page_size = 2;
  o.budget_bytes = 1 << 20;
  PagedKvCache<double> cache(o);
  ASSERT_TRUE(cache.AddSequence(0).ok());
  std::vector<std::vector<Token>> ref(kHkv);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> n01(0.0, 1.5);
  std::vector<double> q(kH * kD), out(kH * kD);
  for (int t = 0; t < kSteps; ++t) {
    for (double& x : q) x = n01(rng);
    for (int h = 0; h < kHkv; ++h) {
      Token tk{t, std::vector<double>(kD), std::vector<double>(kD)};
      for (double& x : tk.k) x = n01(rng);
      for (double& x : tk.v) x = n01(rng);
      ASSERT_TRUE(cache.Append(0, 0, h, tk.k.data(), tk.v.data(), t).ok());
      ref[h].push_back(tk);
    }
    std::vector<int32_t> table;
    std::vector<int> lengths;
    int max_pages = 0;
    cache.BlockTable({0}, 0, &table, &lengths, &max_pages);
    const int stride = max_pages * o.page_size;
    std::vector<double> probs(kH * stride);
    kernels::paged_decode_attention<double>(out.data(), probs.data(), stride, q.data(),
                                            cache.k_pool(), cache.v_pool(), table.data(),
                                            lengths.data(), max_pages, o.page_size, 1, kH, kHkv,
                                            kD, false, 1.0f / std::sqrt(float(kD)));
    const absl::Status s =
        policy.method == CacheMethod::kH2O
            ? inference::H2OUpdate(cache, 0, 0, t, probs.data(), stride, kH, policy)
            : inference::TovaUpdate(cache, 0, 0, probs.data(), stride, kH, policy);
    ASSERT_TRUE(s.ok()) << s;
    const std::vector<double> want = reference_step(q.data(), t, ref);
    for (int i = 0; i < kH * kD; ++i) ASSERT_NEAR(out[i], want[i], 1e-12) << "step " << t;
    for (int h = 0; h < kHkv; ++h) {
      std::vector<int> got, kept;
      for (int i = 0; i < cache.length(0, 0, h); ++i) got.push_back(cache.position(0, 0, h, i));
      for (const Token& tk : ref[h]) kept.push_back(tk.pos);
      std::sort(got.begin(), got.end());
      ASSERT_EQ(got, kept) << "step " << t << " head " << h;
      ASSERT_EQ(static_cast<int>(kept.size()), std::min(t + 1, policy.budget));
    }
  }
}

TEST(InferenceEviction, H2OMatchesAPlainReference) {
  for (const auto& [budget, recent] : std::vector<std::pair<int, int>>{{8, 4}, {5, 2}, {3, 0}}) {
    SCOPED_TRACE(testing::Message() << "budget " << budget << " recent " << recent);
    const CachePolicy policy{CacheMethod::kH2O, budget, recent};
    long not_oldest = 0;  // evictions a sliding window would not make
    Compare(policy, 3 + budget, [&](const double* q, int t, std::vector<std::vector<Token>>& ref) {
      std::vector<double> out;
      for (int h = 0; h < kHkv; ++h) {
        std::vector<Token>& tokens = ref[h];
        std::vector<std::vector<double>> p;
        for (int g = h * (kH / kHkv); g < (h + 1) * (kH / kHkv); ++g)
          p.push_back(Softmax(q + g * kD, tokens));
        for (int g = 0; g < kH / kHkv; ++g) {
          const std::vector<double> o = Mix(p[g], tokens);
          out.insert(out.end(), o.begin(), o.end());
        }
        for (size_t i = 0; i < tokens.size(); ++i)
          for (const auto& pg : p) tokens[i].score += pg[i];
        // Keep the recent window and the heaviest of the rest (tokens are in position order, so
        // the first minimum is the oldest).
        while (static_cast<int>(tokens.size()) > budget) {
          int victim = -1;
          for (int i = 0; i < static_cast<int>(tokens.size()); ++i)
            if (tokens[i].pos <= t - recent &&
                (victim < 0 || tokens[i].score < tokens[victim].score))
              victim = i;
          not_oldest += victim != 0 ? 1 : 0;
          tokens.erase(tokens.begin() + victim);
        }
      }
      return out;
    });
    EXPECT_GT(not_oldest, 0) << "heavy hitters were never exercised";
  }
}

TEST(InferenceEviction, TovaMatchesAPlainReference) {
  for (int budget : {6, 3, 1}) {
    SCOPED_TRACE(testing::Message() << "budget " << budget);
    const CachePolicy policy{CacheMethod::kTova, budget, 0};
    Compare(policy, 11 + budget, [&](const double* q, int, std::vector<std::vector<Token>>& ref) {
      std::vector<double> out, mean(ref[0].size(), 0.0);
      for (int g = 0; g < kH; ++g) {
        const int h = g / (kH / kHkv);
        const std::vector<double> p = Softmax(q + g * kD, ref[h]);
        const std::vector<double> o = Mix(p, ref[h]);
        out.insert(out.end(), o.begin(), o.end());
        for (size_t i = 0; i < p.size(); ++i) mean[i] += p[i] / kH;
      }
      while (static_cast<int>(mean.size()) > budget) {
        const int victim = static_cast<int>(std::min_element(mean.begin(), mean.end()) - mean.begin());
        mean.erase(mean.begin() + victim);
        for (auto& tokens : ref) tokens.erase(tokens.begin() + victim);
      }
      return out;
    });
  }
}

TEST(InferenceEviction, BudgetMatchesTheCompressionRatio) {
  auto h2o = inference::PolicyForCr(CacheMethod::kH2O, 100, 3.0);
  ASSERT_TRUE(h2o.ok());
  EXPECT_EQ(h2o->budget, 34);
  EXPECT_EQ(h2o->recent, 17);
  auto tova = inference::PolicyForCr(CacheMethod::kTova, 64, 4.0);
  ASSERT_TRUE(tova.ok());
  EXPECT_EQ(tova->budget, 16);
  EXPECT_EQ(tova->recent, 0);
  EXPECT_FALSE(inference::PolicyForCr(CacheMethod::kTova, 64, 0.5).ok());
  EXPECT_FALSE(inference::ParseCacheMethod("snapkv").ok());
}

}  // namespace
}  // namespace dmc
