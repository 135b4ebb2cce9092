// ThinK (arXiv 2407.21018) in the paged cache: every page's kept key channels against a direct
// implementation of the paper's score (the Frobenius norm of Q[:, j] K[:, j]^T over the queries
// observed since the head's previous page, top kept channels); attention over the pruned pages
// against a direct dot product over the kept channels; bytes charged against KvSequenceBytes and
// the allocator; decoding with every channel kept equal to the vanilla cache; the byte budget
// knob.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "inference/cache_policy.h"
#include "inference/paged_kv_cache.h"
#include "kernels/decode_attention.h"
#include "tests/decode_util.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;
using inference::PagedCacheOptions;
using inference::PagedKvCache;

constexpr int kH = 4, kHkv = 2, kD = 8, kP = 3, kKept = 3;

PagedCacheOptions ThinkOptions(int layers = 1) {
  PagedCacheOptions o;
  o.layers = layers;
  o.kv_heads = kHkv;
  o.head_dim = kD;
  o.page_size = kP;
  o.budget_bytes = 1 << 20;
  o.think_channels = kKept;
  return o;
}

std::vector<double> Random(int n, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> x(n);
  for (int i = 0; i < n; ++i) x[i] = normal(rng) * (1 + i % kD);  // channels of unequal size
  return x;
}

// The paper's rule, directly: score_j = || Q[:, j] K[:, j]^T ||_F, the outer product formed entry
// by entry; the kept channels are the top `kept` scores, ties to the lower channel.
std::vector<bool> DirectKeptChannels(const std::vector<std::vector<double>>& queries,
                                     const std::vector<std::vector<double>>& keys, int kept) {
  std::vector<double> score(kD, 0.0);
  for (int j = 0; j < kD; ++j) {
    double frobenius = 0;
    for (const auto& q : queries)
      for (const auto& k : keys) frobenius += (q[j] * k[j]) * (q[j] * k[j]);
    score[j] = std::sqrt(frobenius);
  }
  std::vector<int> order(kD);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
  std::vector<bool> keep(kD, false);
  for (int r = 0; r < kept; ++r) keep[order[r]] = true;
  return keep;
}

// Tokens fed one at a time: the key and value of each KV head appended, then the token's queries
// observed. Every page the cache writes holds the page's keys on the channels of the direct rule
// (the queries since the previous page of that head, both query heads of its group) and 0 on
// the others; its values whole; and attention equals a direct softmax over kept-channel scores.
TEST(Think, PagesKeepTheChannelsOfThePapersScore) {
  PagedKvCache<double> cache(ThinkOptions());
  ASSERT_TRUE(cache.AddSequence(0).ok());
  std::mt19937_64 rng(3);
  std::vector<std::vector<std::vector<double>>> keys(kHkv), values(kHkv), window(kHkv);
  int pages_checked = 0;
  for (int t = 0; t < 14; ++t) {
    for (int h = 0; h < kHkv; ++h) {
      keys[h].push_back(Random(kD, rng));
      values[h].push_back(Random(kD, rng));
      const int before = cache.compressed_length(0, 0, h);
      ASSERT_TRUE(cache.Append(0, 0, h, keys[h].back().data(), values[h].back().data(), t).ok());
      const int after = cache.compressed_length(0, 0, h);
      ASSERT_EQ(after, std::max(0, t) / kP * kP) << "a page every page_size settled slots";
      if (after == before) continue;
      const std::vector<std::vector<double>> page(keys[h].begin() + before,
                                                   keys[h].begin() + after);
      const std::vector<bool> keep = DirectKeptChannels(window[h], page, kKept);
      window[h].clear();
      for (int i = before; i < after; ++i) {
        std::vector<double> k(kD), v(kD);
        cache.ReadSlot(0, 0, h, i, k.data(), v.data());
        ASSERT_EQ(cache.position(0, 0, h, i), i);
        for (int j = 0; j < kD; ++j) {
          EXPECT_EQ(k[j], keep[j] ? keys[h][i][j] : 0.0) << "slot " << i << " channel " << j;
          EXPECT_EQ(v[j], values[h][i][j]);
        }
      }
      ++pages_checked;
    }
    const std::vector<double> q = Random(kH * kD, rng);
    cache.ObserveQuery(0, 0, q.data(), kH);
    for (int g = 0; g < kH; ++g)
      window[g / (kH / kHkv)].emplace_back(q.begin() + g * kD, q.begin() + (g + 1) * kD);
  }
  EXPECT_EQ(pages_checked, 2 * 4);

  // Attention of one more query over the pruned pages and the residual.
  const std::vector<double> q = Random(kH * kD, rng);
  std::vector<int32_t> table, blocks;
  std::vector<int> p_lengths, r_lengths;
  int max_pages = 0;
  cache.BlockTable({0}, 0, &table, &p_lengths, &max_pages);
  cache.ResidualTable({0}, 0, &blocks, &r_lengths);
  const int stride = 16;
  const float scale = 0.3f;
  std::vector<double> out(kH * kD), probs(kH * stride);
  kernels::paged_decode_attention_think(
      out.data(), probs.data(), stride, q.data(), cache.k_pool(), cache.v_pool(),
      cache.mask_pool(), kKept, table.data(), p_lengths.data(), max_pages, kP, cache.r_k_pool(),
      cache.r_v_pool(), blocks.data(), r_lengths.data(),
      inference::KvResidualSlots(cache.options()), 1, kH, kHkv, kD, false, scale);
  for (int g = 0; g < kH; ++g) {
    const int h = g / (kH / kHkv), n = cache.length(0, 0, h);
    ASSERT_EQ(n, 14);
    std::vector<double> s(n);
    double max_s = -1e300, sum = 0;
    for (int i = 0; i < n; ++i) {
      std::vector<double> k(kD), v(kD);
      cache.ReadSlot(0, 0, h, i, k.data(), v.data());  // pruned channels read 0
      s[i] = 0;
      for (int j = 0; j < kD; ++j) s[i] += q[g * kD + j] * k[j];
      s[i] *= scale;
      max_s = std::max(max_s, s[i]);
    }
    for (double& x : s) sum += (x = std::exp(x - max_s));
    for (int j = 0; j < kD; ++j) {
      double want = 0;
      for (int i = 0; i < n; ++i) {
        std::vector<double> k(kD), v(kD);
        cache.ReadSlot(0, 0, h, i, k.data(), v.data());
        want += s[i] / sum * v[j];
      }
      EXPECT_NEAR(out[g * kD + j], want, 1e-12);
    }
    for (int i = 0; i < n; ++i) EXPECT_NEAR(probs[g * stride + i], s[i] / sum, 1e-12);
  }
}

// Random appends over three sequences and two layers: each sequence's bytes are KvSequenceBytes
// of its heads' lengths, the allocator holds exactly the pages written and the reservations,
// and a page is its kept key channels, its values and a D-bit mask.
TEST(Think, ByteAccountingEqualsWhatIsAllocated) {
  const PagedCacheOptions o = ThinkOptions(2);
  PagedKvCache<double> cache(o);
  const long page_bytes = kP * (kKept + kD) * sizeof(double) + 1;  // D = 8: one mask byte
  EXPECT_EQ(cache.page_bytes(), page_bytes);
  EXPECT_EQ(inference::KvReservedBytes(o, sizeof(double), sizeof(double)),
            2L * kHkv * (kP * 2 * kD + kD) * sizeof(double));
  std::mt19937_64 rng(5);
  std::vector<std::vector<int>> pos(3, std::vector<int>(o.layers * kHkv, 0));
  for (int seq = 0; seq < 3; ++seq) ASSERT_TRUE(cache.AddSequence(seq).ok());
  for (int op = 0; op < 300; ++op) {
    const int seq = rng() % 3, l = rng() % o.layers, h = rng() % kHkv;
    const std::vector<double> row = Random(kD, rng), q = Random(kH * kD, rng);
    ASSERT_TRUE(cache.Append(seq, l, h, row.data(), row.data(), pos[seq][l * kHkv + h]++).ok());
    cache.ObserveQuery(seq, l, q.data(), kH);
    long pages = 0, charged = 0;
    for (int s = 0; s < 3; ++s) {
      std::vector<int> slots;
      for (int ll = 0; ll < o.layers; ++ll)
        for (int hh = 0; hh < kHkv; ++hh) {
          slots.push_back(cache.length(s, ll, hh));
          pages += cache.compressed_length(s, ll, hh) / kP;
        }
      ASSERT_EQ(cache.bytes(s), inference::KvSequenceBytes<double>(o, slots)) << "op " << op;
      charged += cache.bytes(s);
    }
    ASSERT_EQ(cache.allocator().pages_in_use(), pages);
    ASSERT_EQ(cache.allocator().used_bytes(), charged);
  }
  EXPECT_TRUE(absl::IsFailedPrecondition(cache.Evict(0, 0, 0, 0)));
  for (int s = 0; s < 3; ++s) ASSERT_TRUE(cache.Free(s).ok());
  EXPECT_EQ(cache.allocator().used_bytes(), 0);
}

// On a tiny model: every channel kept decodes as the vanilla cache (to round-off); fewer change
// the logits but not the slots each head holds.
TEST(Think, DecodingWithEveryChannelKeptIsVanilla) {
  model::Llama<double> m(tiny_models::TinyLlama(11, 2), nullptr);
  tiny_models::RandomizeParams(m, 31);
  const int D = m.config().head_dim();
  std::vector<std::vector<int32_t>> tokens;
  for (int b = 0; b < 3; ++b) tokens.push_back(tiny_models::RandomTokens(30, 11, 7 + b));
  CachePolicy policy;
  policy.method = CacheMethod::kVanilla;
  std::vector<int> vanilla_lengths, all_lengths, half_lengths;
  const std::vector<double> vanilla =
      tiny_models::DecodeLogits(m, policy, tokens, 4, &vanilla_lengths);
  policy.think_channels = D;
  const std::vector<double> all = tiny_models::DecodeLogits(m, policy, tokens, 4, &all_lengths);
  policy.think_channels = D / 2;
  const std::vector<double> half = tiny_models::DecodeLogits(m, policy, tokens, 4, &half_lengths);
  EXPECT_LT(tiny_models::MaxAbsDiff(vanilla, all), 1e-12);
  EXPECT_GT(tiny_models::MaxAbsDiff(vanilla, half), 1e-6);
  for (double x : half) ASSERT_TRUE(std::isfinite(x));
  EXPECT_EQ(all_lengths, vanilla_lengths);
  EXPECT_EQ(half_lengths, vanilla_lengths);
}

TEST(Think, RefusesWhatItCannotServe) {
  CachePolicy p;
  p.method = CacheMethod::kVanilla;
  p.think_channels = 9;
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateThink(p, 8)));
  p.think_channels = 4;
  EXPECT_TRUE(inference::ValidateThink(p, 8).ok());
  p.quant = {8, 0, 0, 0};
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateThink(p, 8)));
  p.quant = {};
  p.method = CacheMethod::kH2O;
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateThink(p, 8)));
}

// dmc-eval --kv_fraction=F --methods=think: the most channels whose bytes meet the budget (one
// more does not); ThinK prunes keys only, so half of vanilla is out of reach: a clear error.
TEST(Think, BudgetKnobIsTheKeptChannels) {
  PagedCacheOptions shape;
  shape.layers = 2;
  shape.kv_heads = 2;
  shape.head_dim = 16;
  shape.page_size = 16;
  const int T = 512;
  const std::vector<int> whole(4, T);
  const long vanilla = inference::KvSequenceBytes<float>(shape, whole);
  auto bytes = [&](int kept) {
    PagedCacheOptions o = shape;
    o.think_channels = kept;
    return inference::KvSequenceBytes(o, whole, 4, 4);
  };
  const long budget = static_cast<long>(0.7 * vanilla);
  auto think = inference::PolicyForBytes("think", shape, 4, T, budget, {});
  ASSERT_TRUE(think.ok()) << think.status();
  EXPECT_EQ(inference::PolicyName(*think),
            absl::StrFormat("think-k%d", think->think_channels));
  EXPECT_LE(bytes(think->think_channels), budget);
  EXPECT_GT(bytes(think->think_channels + 1), budget);
  const auto half = inference::PolicyForBytes("think", shape, 4, T, vanilla / 2, {});
  EXPECT_TRUE(absl::IsInvalidArgument(half.status()));
  EXPECT_NE(half.status().message().find("no setting of think"), std::string::npos)
      << half.status();
}

}  // namespace
}  // namespace dmc
