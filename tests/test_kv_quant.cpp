// KV quantization (kernels/kv_quant.h, the quantized PagedKvCache): pages against a direct
// implementation of KIVI's and ZipCache's rule (keys per channel, values per token, min-max
// round to nearest) and its round-off bound; the quantized decode attention against attention
// over the dequantized rows; byte accounting against the bytes a page really spans and the
// allocator; decoding with int8 close to the full-precision cache, for vanilla, DMC and DMS;
// per-token keys against a full-precision cache whose settled slots stand for their round trips
// (the cache, and decoding); the GPU engine's flat form of the cache (vanilla, DMC, DMS,
// ZipCache) against the cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "inference/cache_policy.h"
#include "inference/cpu_engine.h"
#include "inference/paged_decoder.h"
#include "inference/paged_kv_cache.h"
#include "inference/scheduler.h"
#include "kernels/decode_attention.h"
#include "kernels/kv_quant.h"
#include "kernels/paged_kv_dms_evict.h"
#include "kernels/paged_kv_pages.h"
#include "kernels/paged_kv_settle.h"
#include "kernels/paged_kv_write.h"
#include "kernels/rope.h"
#include "model/llama.h"
#include "tests/decode_util.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;
using inference::PagedCacheOptions;
using inference::PagedKvCache;
using kernels::KvQuantOptions;

// Rows of D channels with an outlier channel (keys have them: KIVI Fig. 2).
std::vector<double> RandomRows(int rows, int D, std::mt19937_64& rng) {
  std::normal_distribution<double> n(0.0, 1.0);
  std::vector<double> x(static_cast<size_t>(rows) * D);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < D; ++c) x[size_t(r) * D + c] = n(rng) * (c == 1 ? 20.0 : 1.0) + c;
  return x;
}

// The rule, directly: the group's min and max, scale = (max − min) / (2^b − 1), the nearest
// level. Returns the dequantized group and its scale.
std::vector<double> DirectRoundTrip(const std::vector<double>& group, int bits, double* scale) {
  const double lo = *std::min_element(group.begin(), group.end());
  const double hi = *std::max_element(group.begin(), group.end());
  const double s = hi > lo ? (hi - lo) / ((1 << bits) - 1) : 1.0;
  std::vector<double> out;
  for (double x : group) out.push_back(lo + std::nearbyint((x - lo) / s) * s);
  *scale = s;
  return out;
}

struct PageCase {
  int D, P, bits, value_group, salient_bits, salient_slots;
  bool token_keys = false;
  int key_group = 0;
};

class KvQuantPage : public ::testing::TestWithParam<PageCase> {};

TEST_P(KvQuantPage, MatchesTheDirectRuleWithinHalfAStep) {
  const PageCase pc = GetParam();
  KvQuantOptions o{pc.bits, pc.value_group, pc.salient_bits, pc.salient_slots, pc.token_keys,
                   pc.key_group};
  const kernels::KvQuantPageLayout layout = kernels::kv_quant_page_layout(o, pc.P, pc.D);
  std::mt19937_64 rng(pc.bits * 100 + pc.salient_slots);
  const std::vector<double> keys = RandomRows(pc.P, pc.D, rng), values = RandomRows(pc.P, pc.D, rng);
  // The page spans exactly layout.bytes: a guard after it stays untouched.
  std::vector<uint8_t> page(layout.bytes + 64, 0xA5);
  kernels::kv_quantize_page(page.data(), layout, keys.data(), values.data());
  for (long i = layout.bytes; i < layout.bytes + 64; ++i) ASSERT_EQ(page[i], 0xA5);
  std::vector<double> k(pc.P * pc.D), v(pc.P * pc.D);
  for (int r = 0; r < pc.P; ++r)
    kernels::kv_dequantize_row(k.data() + r * pc.D, v.data() + r * pc.D, page.data(), layout, r);
  // Per token: each row, per group of G channels, at the row's tier bits.
  auto expect_per_token = [&](const std::vector<double>& x, const std::vector<double>& got, int G,
                              const char* what) {
    for (int r = 0; r < pc.P; ++r)
      for (int g = 0; g < pc.D / G; ++g) {
        const std::vector<double> group(x.begin() + r * pc.D + g * G,
                                        x.begin() + r * pc.D + (g + 1) * G);
        double s;
        const std::vector<double> want =
            DirectRoundTrip(group, r < pc.salient_slots ? pc.salient_bits : pc.bits, &s);
        for (int c = 0; c < G; ++c) {
          const double y = got[r * pc.D + g * G + c];
          EXPECT_NEAR(y, want[c], 1e-5 * (1 + std::abs(group[c])) + 1e-3 * s)
              << what << " row " << r;
          EXPECT_LE(std::abs(y - group[c]), s / 2 * (1 + 1e-4) + 1e-5 * std::abs(group[c]));
        }
      }
  };
  expect_per_token(values, v, pc.value_group > 0 ? pc.value_group : pc.D, "value");
  if (pc.token_keys) {
    expect_per_token(keys, k, pc.key_group > 0 ? pc.key_group : pc.D, "key");
    return;
  }
  // Keys: per channel over each tier's rows (salient rows [0, S) at salient_bits).
  const int tiers[3] = {0, pc.salient_slots, pc.P};
  for (int t = 0; t < 2; ++t) {
    if (tiers[t] == tiers[t + 1]) continue;
    const int bits = t == 0 ? pc.salient_bits : pc.bits;
    for (int c = 0; c < pc.D; ++c) {
      std::vector<double> group;
      for (int r = tiers[t]; r < tiers[t + 1]; ++r) group.push_back(keys[r * pc.D + c]);
      double s;
      const std::vector<double> want = DirectRoundTrip(group, bits, &s);
      for (int r = tiers[t]; r < tiers[t + 1]; ++r) {
        const double got = k[r * pc.D + c], x = keys[r * pc.D + c];
        EXPECT_NEAR(got, want[r - tiers[t]], 1e-5 * (1 + std::abs(x)) + 1e-3 * s)
            << "key row " << r << " channel " << c;
        EXPECT_LE(std::abs(got - x), s / 2 * (1 + 1e-4) + 1e-5 * std::abs(x));
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, KvQuantPage,
                         ::testing::Values(PageCase{8, 4, 8, 0, 0, 0}, PageCase{8, 5, 4, 4, 0, 0},
                                           PageCase{16, 6, 2, 8, 0, 0},
                                           PageCase{8, 6, 2, 4, 4, 2},
                                           PageCase{8, 4, 4, 0, 8, 4},
                                           PageCase{6, 3, 4, 3, 8, 1},
                                           PageCase{8, 4, 8, 0, 0, 0, true, 0},
                                           PageCase{8, 5, 4, 4, 0, 0, true, 2},
                                           PageCase{16, 6, 2, 8, 0, 0, true, 4}));

// The layout by hand: D 8, 4 rows, int4 with 2 salient rows at int8, value groups of 4.
TEST(KvQuantPage, LayoutBytesByHand) {
  const kernels::KvQuantPageLayout l = kernels::kv_quant_page_layout({4, 4, 8, 2}, 4, 8);
  EXPECT_EQ(l.value_codes, 2 * 8 + 2 * 4);      // key codes: 2 rows of 8 bytes, 2 of 4
  EXPECT_EQ(l.key_params, 2 * 24);              // value codes the same
  EXPECT_EQ(l.value_params, 48 + 2 * 2 * 8 * 4);  // scale and zero per tier per channel
  EXPECT_EQ(l.bytes, 176 + 2 * 4 * 2 * 4);        // scale and zero per row per group
}

// Per-token keys by hand: D 8, 4 rows, int4, key groups of 4, value groups of 2.
TEST(KvQuantPage, TokenKeysLayoutBytesByHand) {
  const kernels::KvQuantPageLayout l =
      kernels::kv_quant_page_layout({4, 2, 0, 0, true, 4}, 4, 8);
  EXPECT_EQ(l.value_codes, 4 * 4);              // key codes: 4 rows of 4 bytes
  EXPECT_EQ(l.key_params, 2 * 16);              // value codes the same
  EXPECT_EQ(l.value_params, 32 + 2 * 4 * 2 * 4);  // scale and zero per row per key group
  EXPECT_EQ(l.bytes, 96 + 2 * 4 * 4 * 4);         // scale and zero per row per value group
}

// Per-token keys: every row of a page is its own. Rows written one at a time, in any order, give
// the page that kv_quantize_page writes at once, byte for byte; writing a row touches no other.
TEST(KvQuantPage, TokenKeysRowsAreIndependent) {
  const int D = 16, P = 5;
  const kernels::KvQuantPageLayout l = kernels::kv_quant_page_layout({4, 8, 0, 0, true, 4}, P, D);
  std::mt19937_64 rng(3);
  const std::vector<double> keys = RandomRows(P, D, rng), values = RandomRows(P, D, rng);
  std::vector<uint8_t> whole(l.bytes, 0), by_row(l.bytes, 0);
  kernels::kv_quantize_page(whole.data(), l, keys.data(), values.data());
  for (int r = P - 1; r >= 0; --r) {
    const std::vector<uint8_t> before = by_row;
    kernels::kv_quantize_row(by_row.data(), l, r, keys.data() + r * D, values.data() + r * D);
    std::vector<double> k(D), v(D);
    for (int other = r + 1; other < P; ++other) {  // written before, and left as they were
      std::vector<double> k0(D), v0(D);
      kernels::kv_dequantize_row(k0.data(), v0.data(), before.data(), l, other);
      kernels::kv_dequantize_row(k.data(), v.data(), by_row.data(), l, other);
      EXPECT_EQ(k, k0) << "row " << r << " changed row " << other;
      EXPECT_EQ(v, v0) << "row " << r << " changed row " << other;
    }
  }
  EXPECT_EQ(whole, by_row);
}

// A cache of one layer of two KV heads of dimension 8, in pages of 3 slots.
PagedCacheOptions SmallCache() {
  PagedCacheOptions o;
  o.layers = 1;
  o.kv_heads = 2;
  o.head_dim = 8;
  o.page_size = 3;
  o.budget_bytes = 1 << 20;
  return o;
}

// Attention over a quantized cache equals attention over its dequantized rows, laid out in a
// full-precision pool (the unquantized kernel, itself checked against the training forward).
// Per-token keys: the heads' last pages partly filled.
void ExpectAttentionOverTheDequantizedRows(bool token_keys) {
  PagedCacheOptions o = SmallCache();
  o.quant = {4, 4, 0, 0, token_keys};
  PagedKvCache<double> cache(o);
  std::mt19937_64 rng(7);
  const int H = 4, B = 2, D = o.head_dim;
  for (int seq = 0; seq < B; ++seq) {
    ASSERT_TRUE(cache.AddSequence(seq).ok());
    for (int h = 0; h < o.kv_heads; ++h) {
      const int n = 5 + 4 * seq + h;
      const std::vector<double> rows = RandomRows(n, D, rng);
      for (int t = 0; t < n; ++t)
        ASSERT_TRUE(cache.Append(seq, 0, h, &rows[t * D], &rows[t * D], t).ok());
      ASSERT_GT(cache.compressed_length(seq, 0, h), 0);
      ASSERT_LT(cache.compressed_length(seq, 0, h), n);
    }
  }
  const std::vector<double> q = RandomRows(B * H, D, rng);
  std::vector<int32_t> table, blocks;
  std::vector<int> q_lengths, r_lengths;
  int max_pages = 0;
  cache.BlockTable({0, 1}, 0, &table, &q_lengths, &max_pages);
  cache.ResidualTable({0, 1}, 0, &blocks, &r_lengths);
  const int stride = 32;
  std::vector<double> out(B * H * D), probs(B * H * stride);
  kernels::paged_decode_attention_quantized(
      out.data(), probs.data(), stride, q.data(), cache.q_pool(), cache.quant_layout(),
      table.data(), q_lengths.data(), max_pages, cache.r_k_pool(), cache.r_v_pool(), blocks.data(),
      r_lengths.data(), inference::KvResidualSlots(o), B, H, o.kv_heads, D, false, 0.35f);
  // The reference: every slot read back (dequantized) into one page per head of a plain pool.
  std::vector<double> k_pool(B * o.kv_heads * stride * D), v_pool(k_pool.size());
  std::vector<int32_t> plain_table(B * o.kv_heads);
  std::vector<int> lengths(B * o.kv_heads);
  for (int seq = 0; seq < B; ++seq)
    for (int h = 0; h < o.kv_heads; ++h) {
      const int head = seq * o.kv_heads + h;
      plain_table[head] = head;
      lengths[head] = cache.length(seq, 0, h);
      for (int i = 0; i < lengths[head]; ++i)
        cache.ReadSlot(seq, 0, h, i, &k_pool[(head * stride + i) * D],
                       &v_pool[(head * stride + i) * D]);
    }
  std::vector<double> want(out.size()), want_probs(probs.size());
  kernels::paged_decode_attention(want.data(), want_probs.data(), stride, q.data(), k_pool.data(),
                                  v_pool.data(), plain_table.data(), lengths.data(), 1, stride, B,
                                  H, o.kv_heads, D, false, 0.35f);
  for (size_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out[i], want[i], 1e-12);
  for (int bg = 0; bg < B * H; ++bg)
    for (int i = 0; i < lengths[(bg / H) * o.kv_heads + (bg % H) / 2]; ++i)
      EXPECT_NEAR(probs[bg * stride + i], want_probs[bg * stride + i], 1e-12);
  if (token_keys) {
    EXPECT_TRUE(std::any_of(q_lengths.begin(), q_lengths.end(),
                            [&](int n) { return n % o.page_size != 0; }))
        << "no head has a partly filled page";
  }
}

TEST(KvQuantAttention, EqualsAttentionOverTheDequantizedRows) {
  ExpectAttentionOverTheDequantizedRows(false);
}

TEST(KvQuantAttention, TokenKeysEqualsAttentionOverTheDequantizedRows) {
  ExpectAttentionOverTheDequantizedRows(true);
}

// Random appends, DMC accumulations and (residual) evictions on a quantized cache: the allocator
// holds exactly the pages of the quantized slots and the reservations, each sequence's bytes are
// KvSequenceBytes of its heads' lengths while only appends and DMC steps happened, and every
// slot reads back within the bound (exactly while at full precision).
// Per-token keys: pages fill a row at a time (the last one partly), the residual is a row per
// head, and the pages one more token may open (PagesForStep) bound what it opens.
void ExpectByteAccountingEqualsWhatIsAllocated(bool token_keys) {
  PagedCacheOptions o;
  o.layers = 2;
  o.kv_heads = 2;
  o.head_dim = 8;
  o.page_size = 3;
  o.dmc_window = 2;
  o.budget_bytes = 1 << 20;
  o.quant = {8, 4, 0, 0, token_keys};
  PagedKvCache<double> cache(o);
  const long page_bytes = kernels::kv_quant_page_layout(o.quant, o.page_size, o.head_dim).bytes;
  EXPECT_EQ(cache.page_bytes(), page_bytes);
  EXPECT_EQ(inference::KvResidualBytes(o, sizeof(double)),
            2L * 2 * (token_keys ? 1 : o.page_size) * 2 * o.head_dim * sizeof(double));
  std::mt19937_64 rng(11);
  std::vector<std::vector<int>> pos(3, std::vector<int>(o.layers * o.kv_heads, 0));
  for (int seq = 0; seq < 3; ++seq) ASSERT_TRUE(cache.AddSequence(seq).ok());
  std::vector<double> row(o.head_dim);
  for (int op = 0; op < 600; ++op) {
    const int seq = rng() % 3, l = rng() % o.layers, h = rng() % o.kv_heads;
    int& t = pos[seq][l * o.kv_heads + h];
    for (double& x : row) x = std::sin(op + 0.7 * (&x - row.data()));
    const long bound = cache.PagesForStep({seq}), in_use = cache.allocator().pages_in_use();
    if (seq == 2) {  // DMC: merges keep the open slot in the residual
      ASSERT_TRUE(cache.AddDmc(seq, l, h, row.data(), row.data(), 1.0, rng() % 2 == 0, t++).ok());
    } else {
      ASSERT_TRUE(cache.Append(seq, l, h, row.data(), row.data(), t++).ok());
    }
    ASSERT_LE(cache.allocator().pages_in_use() - in_use, bound) << "op " << op;
    long pages = 0, charged = 0;
    for (int s = 0; s < 3; ++s) {
      std::vector<int> head_slots;
      for (int ll = 0; ll < o.layers; ++ll)
        for (int hh = 0; hh < o.kv_heads; ++hh) {
          head_slots.push_back(cache.length(s, ll, hh));
          const int quantized = cache.compressed_length(s, ll, hh);
          if (!token_keys) {
            ASSERT_EQ(quantized % o.page_size, 0);
          }
          pages += (quantized + o.page_size - 1) / o.page_size;
        }
      ASSERT_EQ(cache.bytes(s), inference::KvSequenceBytes<double>(o, head_slots)) << "op " << op;
      charged += cache.bytes(s);
    }
    ASSERT_EQ(cache.allocator().pages_in_use(), pages);
    ASSERT_EQ(cache.allocator().used_bytes(), charged);
    ASSERT_EQ(charged, pages * page_bytes + 3 * (inference::KvWindowBytes<double>(o) +
                                                 inference::KvResidualBytes(o, sizeof(double))));
  }
  // The residual takes evictions; quantized slots refuse them.
  const int n = cache.length(0, 0, 0), nq = cache.compressed_length(0, 0, 0);
  ASSERT_GT(nq, 0);
  ASSERT_LT(nq, n);
  EXPECT_TRUE(absl::IsFailedPrecondition(cache.Evict(0, 0, 0, 0)));
  EXPECT_TRUE(cache.Evict(0, 0, 0, n - 1).ok());
  EXPECT_EQ(cache.length(0, 0, 0), n - 1);
  for (int s = 0; s < 3; ++s) ASSERT_TRUE(cache.Free(s).ok());
  EXPECT_EQ(cache.allocator().used_bytes(), 0);
  EXPECT_EQ(cache.allocator().pages_in_use(), 0);
}

TEST(KvQuantCache, ByteAccountingEqualsWhatIsAllocated) {
  ExpectByteAccountingEqualsWhatIsAllocated(false);
}

TEST(KvQuantCache, TokenKeysByteAccountingEqualsWhatIsAllocated) {
  ExpectByteAccountingEqualsWhatIsAllocated(true);
}

TEST(KvQuantCache, RefusesWhatItCannotServe) {
  CachePolicy p;
  p.method = CacheMethod::kVanilla;
  p.quant = {3, 0, 0, 0};
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateKvQuant(p, 8, 4)));
  p.quant = {4, 3, 0, 0};
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateKvQuant(p, 8, 4)));
  p.quant = {4, 0, 4, 2};
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateKvQuant(p, 8, 4)));
  p.quant = {4, 0, 8, 5};
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateKvQuant(p, 8, 4)));
  p.quant = {4, 0, 8, 2};
  EXPECT_TRUE(inference::ValidateKvQuant(p, 8, 4).ok());
  p.method = CacheMethod::kDmc;
  EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateKvQuant(p, 8, 4)));
  p.method = CacheMethod::kH2O;
  p.quant = {8, 0, 0, 0};
  const absl::Status s = inference::ValidateKvQuant(p, 8, 4);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("h2o"), std::string::npos) << s;
}

// Per-token keys: bits 2, 4 or 8, a key group dividing the head, on a quantized cache only and
// not with ZipCache's tiers; each refusal names the setting.
TEST(KvQuantCache, RefusesABadTokenKeysOption) {
  CachePolicy p;
  p.method = CacheMethod::kDmc;
  auto refused = [&](const char* named) {
    const absl::Status s = inference::ValidateKvQuant(p, 8, 4);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << named;
    EXPECT_NE(s.message().find(named), std::string::npos) << s;
  };
  p.quant = {3, 0, 0, 0, true};
  refused("dmc-int3-token");
  p.quant = {4, 0, 0, 0, true, 3};
  refused("key group of 3 channels does not divide head_dim 8");
  EXPECT_EQ(inference::PolicyName(p), "dmc-int4-token-g3");
  p.quant = {4, 0, 0, 0, false, 4};
  refused("needs per-token keys");
  p.quant = {0, 0, 0, 0, true};
  refused("per-token keys need a quantized cache");
  p.method = CacheMethod::kVanilla;
  p.quant = {4, 0, 8, 2, true};
  refused("ZipCache");
  for (int bits : {2, 4, 8})
    for (int group : {0, 2, 4, 8}) {
      p.quant = {bits, 0, 0, 0, true, group};
      EXPECT_TRUE(inference::ValidateKvQuant(p, 8, 4).ok()) << inference::PolicyName(p);
    }
}

// The GPU engine settles DMS's slots a page at a time past its window: it refuses per-token keys
// on the dms cache by name (its Create runs this check), and a budget planned for it never picks
// them there; on the vanilla and dmc caches it serves them, and the plan may pick them.
TEST(KvQuantCache, GpuEngineRefusesDmsTokenKeysByName) {
  CachePolicy p;
  for (CacheMethod method : {CacheMethod::kVanilla, CacheMethod::kDmc}) {
    p.method = method;
    p.quant = {8, 0, 0, 0, true};
    EXPECT_TRUE(inference::ValidateGpuKvQuant(p).ok()) << inference::PolicyName(p);
  }
  p.method = CacheMethod::kDms;
  p.quant = {8, 0, 0, 0};
  EXPECT_TRUE(inference::ValidateGpuKvQuant(p).ok());
  p.quant.token_keys = true;
  const absl::Status s = inference::ValidateGpuKvQuant(p);
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_NE(s.message().find("dms-int8-token"), std::string::npos) << s;
  const PagedCacheOptions shape = tiny_models::BudgetShape();
  const std::vector<int> slots(4, 512 / 8);
  PagedCacheOptions token = shape;
  token.quant = {2, 0, 0, 0, true};
  const long smallest = inference::KvSequenceBytes(token, slots, 2, 4);
  const absl::StatusOr<CachePolicy> cpu =
      inference::PolicyForBytes("dms", shape, 2, 4, 512, smallest, slots);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  EXPECT_TRUE(cpu->quant.token_keys);
  const absl::StatusOr<CachePolicy> gpu =
      inference::PolicyForBytes("dms", shape, 2, 4, 512, smallest, slots, {}, true);
  EXPECT_TRUE(absl::IsInvalidArgument(gpu.status())) << gpu.status();
  EXPECT_NE(gpu.status().message().find("dms-int2,"), std::string::npos) << gpu.status();
  const absl::StatusOr<CachePolicy> dmc_gpu =
      inference::PolicyForBytes("dmc", shape, 2, 4, 512, smallest, slots, {}, true);
  ASSERT_TRUE(dmc_gpu.ok()) << dmc_gpu.status();
  EXPECT_TRUE(dmc_gpu->quant.token_keys) << inference::PolicyName(*dmc_gpu);
}

// Every method the quantization serves: int8 stays close to full precision (and int4 further
// off), and the cache keeps each head's slots: the same lengths as the full-precision run.
void ExpectInt8CloseToFullPrecision(model::Llama<double>& m, CacheMethod method,
                                    bool token_keys = false) {
  std::vector<std::vector<int32_t>> tokens;
  for (int b = 0; b < 3; ++b)
    tokens.push_back(tiny_models::RandomTokens(30, m.config().vocab_size, 5 + b));
  CachePolicy policy;
  policy.method = method;
  std::vector<int> full_lengths, int8_lengths, int4_lengths;
  const std::vector<double> full = tiny_models::DecodeLogits(m, policy, tokens, 4, &full_lengths);
  policy.quant = {8, 0, 0, 0, token_keys};
  const std::vector<double> int8 = tiny_models::DecodeLogits(m, policy, tokens, 4, &int8_lengths);
  policy.quant = {4, 0, 0, 0, token_keys};
  const std::vector<double> int4 = tiny_models::DecodeLogits(m, policy, tokens, 4, &int4_lengths);
  const double d8 = tiny_models::MaxAbsDiff(full, int8), d4 = tiny_models::MaxAbsDiff(full, int4);
  double scale = 0;
  for (double x : full) scale = std::max(scale, std::abs(x));
  EXPECT_GT(d8, 0.0) << "int8 changed nothing: was anything quantized?";
  EXPECT_LT(d8, 5e-3 * scale) << "int8 logits far from full precision";
  EXPECT_GT(d4, d8);
  EXPECT_EQ(int8_lengths, full_lengths);
}

TEST(KvQuantDecode, Int8VanillaCloseToFullPrecision) {
  model::Llama<double> m(tiny_models::TinyLlama(11, 2), nullptr);
  tiny_models::RandomizeParams(m, 31);
  ExpectInt8CloseToFullPrecision(m, CacheMethod::kVanilla);
  ExpectInt8CloseToFullPrecision(m, CacheMethod::kVanilla, true);
}

// Composition with DMC: a DMC model's merged slots are quantized once they close; the open slot
// stays the full-precision omega-weighted mean of its window state.
TEST(KvQuantDecode, Int8DmcCloseToFullPrecision) {
  model::LlamaConfig c = tiny_models::TinyLlama(11, 2);
  c.dmc.enabled = true;
  c.dmc.window = 3;
  c.dmc.init_val = -0.5f;  // plenty of merges
  model::Llama<double> m(c, nullptr);
  tiny_models::RandomizeParams(m, 23);
  ExpectInt8CloseToFullPrecision(m, CacheMethod::kDmc);
  ExpectInt8CloseToFullPrecision(m, CacheMethod::kDmc, true);
}

// A tiny DMS model (adapter, window 3) that marks about half of the tokens.
model::LlamaConfig TinyDmsConfig() {
  model::LlamaConfig c = tiny_models::TinyLlama(11, 2);
  c.dms.enabled = true;
  c.dms.variant = model::DmsVariant::kAdapter;
  c.dms.window = 3;
  c.dms.offset = 0.2f;
  return c;
}

// Composition with DMS: a token is quantized once it is past the eviction window (and was not
// evicted); the evictions are those of the full-precision cache.
TEST(KvQuantDecode, Int8DmsCloseToFullPrecision) {
  model::Llama<double> m(TinyDmsConfig(), nullptr);
  tiny_models::RandomizeParams(m, 42);
  ExpectInt8CloseToFullPrecision(m, CacheMethod::kDms);
  ExpectInt8CloseToFullPrecision(m, CacheMethod::kDms, true);
}

// Decoding with per-token keys (int4, key groups of 4) equals decoding with the full-precision
// cache in which, before each step, every slot that has just settled (position < t − settle_lag)
// is replaced by its quantize → dequantize round trip, once: the logits of every step, to
// round-off (the two caches order their slots differently). Vanilla and DMS, whose tokens each
// open a slot, so the settled set before a step is known; DMC's open slot settles inside the
// step that opens the next one (KvQuantCache.TokenKeysHoldTheDirectRoundTripOfEverySettledSlot).
void ExpectDecodeEqualsTheRoundTrippedCache(model::Llama<double>& m, CacheMethod method) {
  const model::LlamaConfig& c = m.config();
  const int D = c.head_dim(), Hkv = c.num_key_value_heads, P = 4;
  CachePolicy full{method};
  CachePolicy token = full;
  token.quant = {4, 0, 0, 0, true, 4};
  PagedKvCache<double> q_cache(inference::CacheOptionsFor(c, token, 1L << 24, P));
  PagedKvCache<double> f_cache(inference::CacheOptionsFor(c, full, 1L << 24, P));
  auto q = inference::PagedDecoder<double>::Create(m, token, &q_cache);
  auto f = inference::PagedDecoder<double>::Create(m, full, &f_cache);
  ASSERT_TRUE(q.ok() && f.ok()) << q.status() << f.status();
  ASSERT_TRUE(q_cache.AddSequence(0).ok() && f_cache.AddSequence(0).ok());
  const kernels::KvQuantPageLayout& layout = q_cache.quant_layout();
  std::vector<uint8_t> page(layout.bytes);
  const int lag = q_cache.options().settle_lag;
  std::vector<std::vector<int32_t>> replaced(c.num_hidden_layers * Hkv);  // positions, per head
  const std::vector<int32_t> tokens = tiny_models::RandomTokens(30, c.vocab_size, 9);
  std::vector<double> q_logits, f_logits;
  for (int t = 0; t < static_cast<int>(tokens.size()); ++t) {
    // Rebuild the reference's slots in their order, the newly settled ones round-tripped.
    std::vector<std::vector<double>> keys(replaced.size()), values(replaced.size());
    std::vector<std::vector<int32_t>> positions(replaced.size());
    std::vector<std::vector<float>> scores(replaced.size());
    for (int l = 0; l < c.num_hidden_layers; ++l)
      for (int h = 0; h < Hkv; ++h) {
        const int head = l * Hkv + h;
        for (int i = 0; i < f_cache.length(0, l, h); ++i) {
          std::vector<double> k(D), v(D);
          f_cache.ReadSlot(0, l, h, i, k.data(), v.data());
          const int32_t pos = f_cache.position(0, l, h, i);
          std::vector<int32_t>& done = replaced[head];
          if (pos < t - lag && std::find(done.begin(), done.end(), pos) == done.end()) {
            kernels::kv_quantize_row(page.data(), layout, 0, k.data(), v.data());
            kernels::kv_dequantize_row(k.data(), v.data(), page.data(), layout, 0);
            done.push_back(pos);
          }
          keys[head].insert(keys[head].end(), k.begin(), k.end());
          values[head].insert(values[head].end(), v.begin(), v.end());
          positions[head].push_back(pos);
          scores[head].push_back(f_cache.score(0, l, h, i));  // DMS: the marks
        }
      }
    ASSERT_TRUE(f_cache.Free(0).ok() && f_cache.AddSequence(0).ok());
    for (int i = 0; i < t; ++i) f_cache.AdvanceToken(0);
    for (int l = 0; l < c.num_hidden_layers; ++l)
      for (int h = 0; h < Hkv; ++h) {
        const int head = l * Hkv + h;
        for (size_t i = 0; i < positions[head].size(); ++i) {
          ASSERT_TRUE(f_cache.Append(0, l, h, &keys[head][i * D], &values[head][i * D],
                                     positions[head][i]).ok());
          f_cache.score(0, l, h, static_cast<int>(i)) = scores[head][i];
        }
      }
    ASSERT_TRUE((*q)->Step({0}, &tokens[t], &q_logits).ok());
    ASSERT_TRUE((*f)->Step({0}, &tokens[t], &f_logits).ok());
    for (size_t i = 0; i < q_logits.size(); ++i)
      ASSERT_NEAR(q_logits[i], f_logits[i], 1e-10 * (1 + std::abs(f_logits[i]))) << "t " << t;
  }
  int settled = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int h = 0; h < Hkv; ++h) {
      ASSERT_EQ(q_cache.length(0, l, h), f_cache.length(0, l, h));
      settled += q_cache.compressed_length(0, l, h);
    }
  EXPECT_GT(settled, 0);
}

TEST(KvQuantDecode, TokenKeysVanillaEqualsTheRoundTrippedCache) {
  model::Llama<double> m(tiny_models::TinyLlama(11, 2), nullptr);
  tiny_models::RandomizeParams(m, 31);
  ExpectDecodeEqualsTheRoundTrippedCache(m, CacheMethod::kVanilla);
}

TEST(KvQuantDecode, TokenKeysDmsEqualsTheRoundTrippedCache) {
  model::Llama<double> m(TinyDmsConfig(), nullptr);
  tiny_models::RandomizeParams(m, 42);
  ExpectDecodeEqualsTheRoundTrippedCache(m, CacheMethod::kDms);
}

// At the cache: DMC slots leave the full-precision residual only once closed, and then hold the
// quantized final mean of their tokens; the open slot is the exact mean at all times. DMS
// (settle_lag) keeps the tokens still inside the window at full precision.
TEST(KvQuantCache, DmcOpenSlotAndDmsWindowStayFullPrecision) {
  PagedCacheOptions o;
  o.layers = 1;
  o.kv_heads = 1;
  o.head_dim = 4;
  o.page_size = 2;
  o.dmc_window = 2;
  o.budget_bytes = 1 << 20;
  o.quant = {8, 0, 0, 0};
  PagedKvCache<double> dmc(o);
  ASSERT_TRUE(dmc.AddSequence(0).ok());
  std::vector<double> closed_means;  // the final mean of every slot, in slot order
  double prev = 0;
  for (int t = 0; t < 23; ++t) {
    const double x = std::sin(1.3 * t);
    const std::vector<double> row(o.head_dim, x);
    const bool merge = t % 3 != 0;  // slots of three tokens: window 2 keeps the last two
    ASSERT_TRUE(dmc.AddDmc(0, 0, 0, row.data(), row.data(), 1.0, merge, t).ok());
    const double mean = merge ? 0.5 * (prev + x) : x;
    if (!merge) closed_means.push_back(mean);
    closed_means.back() = mean;
    prev = x;
    const int n = dmc.length(0, 0, 0);
    EXPECT_LE(dmc.compressed_length(0, 0, 0), n - 1) << "the open slot was quantized";
    std::vector<double> key(o.head_dim), value(o.head_dim);
    dmc.ReadSlot(0, 0, 0, n - 1, key.data(), value.data());
    EXPECT_DOUBLE_EQ(value[0], mean) << "the open slot is not the exact window mean";
  }
  EXPECT_EQ(dmc.compressed_length(0, 0, 0), 6);  // 8 slots: 7 closed, 3 full pages of 2
  std::vector<double> key(o.head_dim), value(o.head_dim);
  for (int i = 0; i < dmc.compressed_length(0, 0, 0); ++i) {
    dmc.ReadSlot(0, 0, 0, i, key.data(), value.data());
    // A constant row quantizes exactly, up to its zero point stored as a float.
    EXPECT_NEAR(value[0], closed_means[i], 1e-7) << "slot " << i;
  }

  o.dmc_window = 0;
  o.settle_lag = 3;  // a DMS window of 2
  PagedKvCache<double> dms(o);
  ASSERT_TRUE(dms.AddSequence(0).ok());
  for (int t = 0; t < 12; ++t) {
    const std::vector<double> row(o.head_dim, t);
    ASSERT_TRUE(dms.Append(0, 0, 0, row.data(), row.data(), t).ok());
    // Settled: positions below t − 3; quantized: whole pages of them.
    EXPECT_EQ(dms.compressed_length(0, 0, 0), std::max(0, t - 3) / 2 * 2) << "t " << t;
    for (int i = dms.compressed_length(0, 0, 0); i < dms.length(0, 0, 0); ++i)
      EXPECT_GE(dms.position(0, 0, 0, i), t - 3 - 1);
  }
}

// Per-token keys against a direct implementation: a full-precision cache driven by the same
// appends, DMC steps and DMS evictions, each slot of which, once it has settled (a token more
// than settle_lag positions newer has reached its head), stands for the direct rule's round trip
// of its final value (per token: groups of key_group and of value_group channels). After every
// token of every head, the cache holds the same slots (by position), the settled ones at those
// round trips and the others exactly; its quantized slots are exactly the settled ones, oldest
// first (also when several settle at once); and its residual holds at most settle_lag + 1 rows
// (vanilla and DMC: exactly 1).
TEST(KvQuantCache, TokenKeysHoldTheDirectRoundTripOfEverySettledSlot) {
  enum Method { kVanilla, kDmc, kDms };
  for (Method method : {kVanilla, kDmc, kDms}) {
    SCOPED_TRACE(method == kVanilla ? "vanilla" : method == kDmc ? "dmc" : "dms");
    const int w = 2;  // DMS's window
    PagedCacheOptions full = SmallCache();
    full.dmc_window = method == kDmc ? 2 : 0;
    PagedCacheOptions o = full;
    o.settle_lag = method == kDms ? w + 1 : 0;
    o.quant = {4, 4, 0, 0, true, 2};
    const int D = o.head_dim, lag = o.settle_lag;
    EXPECT_EQ(inference::KvResidualSlots(o), lag + 1);
    PagedKvCache<double> cache(o), reference(full);
    ASSERT_TRUE(cache.AddSequence(0).ok());
    ASSERT_TRUE(reference.AddSequence(0).ok());
    std::mt19937_64 rng(17 + method);
    auto round_trip = [&](const std::vector<double>& x, int G, std::vector<double>* step) {
      std::vector<double> out;
      for (int g = 0; g < D / G; ++g) {
        double s;
        const std::vector<double> y =
            DirectRoundTrip(std::vector<double>(x.begin() + g * G, x.begin() + (g + 1) * G),
                            o.quant.bits, &s);
        out.insert(out.end(), y.begin(), y.end());
        step->insert(step->end(), G, s);
      }
      return out;
    };
    int settled_ever = 0;
    for (int t = 0; t < 40; ++t)
      for (int h = 0; h < o.kv_heads; ++h) {
        // Positions skip 2 every 4 tokens: DMS then settles several slots at once.
        const int32_t p = t + 2 * (t / 4);
        const std::vector<double> k = RandomRows(1, D, rng), v = RandomRows(1, D, rng);
        for (PagedKvCache<double>* c : {&cache, &reference}) {
          if (method == kDmc) {
            ASSERT_TRUE(c->AddDmc(0, 0, h, k.data(), v.data(), 0.25 + t % 3, t % 3 != 0, p).ok());
          } else {
            ASSERT_TRUE(c->Append(0, 0, h, k.data(), v.data(), p).ok());
          }
          if (method == kDms) {
            ASSERT_TRUE(inference::DmsUpdate(*c, 0, 0, h, p, (t * 7 + h) % 3 == 0, w).ok());
          }
        }
        const int n = cache.length(0, 0, h), nq = cache.compressed_length(0, 0, h);
        ASSERT_EQ(n, reference.length(0, 0, h)) << "t " << t;
        int settled = 0;
        int32_t last_quantized = -1;
        for (int i = 0; i < n; ++i) {
          const int32_t pos = cache.position(0, 0, h, i);
          int j = 0;
          while (j < n && reference.position(0, 0, h, j) != pos) ++j;
          ASSERT_LT(j, n) << "t " << t << ": the cache holds position " << pos;
          std::vector<double> key(D), value(D), want_k(D), want_v(D), k_step, v_step;
          cache.ReadSlot(0, 0, h, i, key.data(), value.data());
          reference.ReadSlot(0, 0, h, j, want_k.data(), want_v.data());
          if (pos >= p - lag) {  // may still change or leave: exact
            ASSERT_GE(i, nq) << "t " << t << ": position " << pos << " quantized early";
            EXPECT_EQ(key, want_k);
            EXPECT_EQ(value, want_v);
            continue;
          }
          ++settled;
          ASSERT_LT(i, nq) << "t " << t << ": settled position " << pos << " not quantized";
          ASSERT_GT(pos, last_quantized) << "t " << t << ": quantized slots out of order";
          last_quantized = pos;
          const std::vector<double> rk = round_trip(want_k, o.quant.key_group, &k_step);
          const std::vector<double> rv = round_trip(want_v, o.quant.value_group, &v_step);
          for (int c = 0; c < D; ++c) {
            EXPECT_NEAR(key[c], rk[c], 1e-5 * (1 + std::abs(want_k[c])) + 1e-3 * k_step[c])
                << "t " << t << " position " << pos;
            EXPECT_NEAR(value[c], rv[c], 1e-5 * (1 + std::abs(want_v[c])) + 1e-3 * v_step[c])
                << "t " << t << " position " << pos;
          }
        }
        ASSERT_EQ(nq, settled) << "t " << t;
        ASSERT_LE(n - nq, lag + 1) << "t " << t;
        if (method != kDms) {
          ASSERT_EQ(n - nq, 1) << "t " << t;
        }
        settled_ever = std::max(settled_ever, settled);
      }
    EXPECT_GT(settled_ever, o.page_size) << "too few slots settled to fill a page";
  }
}

// One layer of kv_heads KV heads of head_dim channels in pages of page_size, at a budget that
// never binds.
PagedCacheOptions OneLayerCache(int kv_heads, int head_dim, int page_size) {
  PagedCacheOptions o;
  o.layers = 1;
  o.kv_heads = kv_heads;
  o.head_dim = head_dim;
  o.page_size = page_size;
  o.budget_bytes = 1 << 22;
  return o;
}

// The GPU engine's form of the quantized cache (kernels/paged_kv_settle.h: pages closed by
// paged_kv_settle_step and written by the quantizer from the rows it lists, appends into residual
// blocks by paged_kv_append) holds what the quantized PagedKvCache, the specification, holds:
// after every token of a random vanilla or DMC sequence, every head's quantized and residual slot
// counts, its residual rows, and its pages byte for byte. The cache is handed the keys the flat
// form rotated (the decoder's RoPE), so both hold the same rows. With per-token keys the lists
// hold a row each (slots_settle), written by the row quantizer into its page's next row. Every
// page written is one the GPU engine's page count hands the head before the step.
TEST(KvQuantCache, DeviceFormHoldsWhatTheCacheHolds) {
  for (bool token_keys : {false, true})
  for (bool dmc : {false, true}) {
    SCOPED_TRACE(testing::Message() << (dmc ? "dmc" : "vanilla")
                                    << (token_keys ? " token keys" : ""));
    std::mt19937_64 rng(dmc ? 11 : 12);
    PagedCacheOptions o = OneLayerCache(3, 16, 4);
    o.dmc_window = dmc ? 3 : 0;
    o.quant = {4, 0, 0, 0, token_keys};
    const int Hkv = o.kv_heads, D = o.head_dim, P = o.page_size, w = o.dmc_window, steps = 40;
    PagedKvCache<float> cache(o);
    ASSERT_TRUE(cache.AddSequence(0).ok());
    const kernels::KvQuantPageLayout layout = kernels::kv_quant_page_layout(o.quant, P, D);
    const int residual = inference::KvResidualSlots(o), max_pages = steps / P + 1;
    std::vector<float> r_k(size_t(Hkv) * residual * D), r_v(r_k.size());
    std::vector<float> window(size_t(Hkv) * std::max(1, w) * 2 * D);
    std::vector<float> window_omega(size_t(Hkv) * std::max(1, w));
    std::vector<int32_t> r_len(Hkv, 0), q_len(Hkv, 0), count(Hkv, 0), blocks(Hkv);
    std::vector<int32_t> table(size_t(Hkv) * max_pages), ids(Hkv), rows(size_t(Hkv) * P);
    std::vector<int32_t> page_rows(Hkv);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::iota(table.begin(), table.end(), 0);
    std::vector<uint8_t> pages(table.size() * layout.bytes);
    const kernels::PagedKvLayer<float> flat{r_k.data(), r_v.data(), nullptr,
                                            blocks.data(), r_len.data(),
                                            w ? window.data() : nullptr,
                                            w ? window_omega.data() : nullptr, count.data(),
                                            1, residual, w};
    kernels::KvSettleLayer settle{table.data(), q_len.data(), r_len.data(), max_pages, P,
                                  residual};
    settle.slots_settle = token_keys;
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> k(size_t(Hkv) * D), v(k.size()), merge(Hkv), omega(Hkv);
    std::vector<float> gk(size_t(P) * D), gv(gk.size()), key(D), value(D);
    for (int32_t t = 0; t < steps; ++t) {
      for (float& x : k) x = normal(rng);
      for (float& x : v) x = normal(rng);
      for (int h = 0; h < Hkv; ++h) {
        merge[h] = dmc && rng() % 3 ? 1.0f : 0.0f;
        omega[h] = 0.2f + (rng() % 100) / 100.0f;
      }
      const float* m = dmc ? merge.data() : nullptr;
      // The pages the GPU engine hands a head before a step (kernels/paged_kv_pages.h): the one
      // this step writes is among them.
      std::vector<int> handed(Hkv);
      for (int h = 0; h < Hkv; ++h)
        handed[h] = token_keys ? kernels::KvSlotPagesToGrow(r_len[h], q_len[h], 1, P)
                               : kernels::KvPagesToGrow(r_len[h], q_len[h], 1, P, true);
      kernels::paged_kv_settle_step(ids.data(), page_rows.data(), rows.data(), settle, m, &t, 1,
                                    Hkv);
      for (int h = 0; h < Hkv; ++h) {
        if (ids[h] < 0) continue;
        ASSERT_LT(ids[h] - h * max_pages, handed[h]) << "t " << t << " head " << h;
        if (token_keys) {
          kernels::kv_quantize_row(pages.data() + size_t(ids[h]) * layout.bytes, layout,
                                   page_rows[h], r_k.data() + size_t(rows[h]) * D,
                                   r_v.data() + size_t(rows[h]) * D);
          continue;
        }
        for (int r = 0; r < P; ++r) {
          std::copy_n(r_k.begin() + size_t(rows[h * P + r]) * D, D, gk.begin() + r * D);
          std::copy_n(r_v.begin() + size_t(rows[h * P + r]) * D, D, gv.begin() + r * D);
        }
        kernels::kv_quantize_page(pages.data() + size_t(ids[h]) * layout.bytes, layout, gk.data(),
                                  gv.data());
      }
      kernels::paged_kv_append(flat, k.data(), v.data(), m, dmc ? omega.data() : nullptr, &t, 1,
                               Hkv, D, 10000.0f, dmc);
      for (int h = 0; h < Hkv; ++h) {
        const float* stored = r_k.data() + (size_t(h) * residual + r_len[h] - 1) * D;
        if (dmc) {
          absl::StatusOr<float*> row = cache.AddDmc(0, 0, h, k.data() + h * D, v.data() + h * D,
                                                    omega[h], merge[h] > 0.5f, t);
          ASSERT_TRUE(row.ok()) << row.status();
          std::copy_n(stored, D, *row);
        } else {
          ASSERT_TRUE(cache.Append(0, 0, h, stored, v.data() + h * D, t).ok());
        }
        ASSERT_EQ(cache.compressed_length(0, 0, h), q_len[h]) << "t " << t << " head " << h;
        ASSERT_EQ(cache.length(0, 0, h), q_len[h] + r_len[h]) << "t " << t << " head " << h;
        for (int j = 0; j < r_len[h]; ++j) {
          cache.ReadSlot(0, 0, h, q_len[h] + j, key.data(), value.data());
          const size_t at = (size_t(h) * residual + j) * D;
          for (int c = 0; c < D; ++c) {
            ASSERT_EQ(key[c], r_k[at + c]) << "t " << t << " head " << h << " row " << j;
            // DMC: the window means of both, summed in their own order
            ASSERT_NEAR(value[c], r_v[at + c], 1e-5) << "t " << t << " head " << h << " row " << j;
          }
        }
      }
      cache.AdvanceToken(0);
    }
    std::vector<int32_t> cache_table;
    std::vector<int> lengths;
    int cache_pages = 0;
    cache.BlockTable({0}, 0, &cache_table, &lengths, &cache_pages);
    int closed = 0;  // pages, the last partly filled with per-token keys
    for (int h = 0; h < Hkv; ++h)
      for (int i = 0; i < (q_len[h] + (token_keys ? P - 1 : 0)) / P; ++i, ++closed) {
        EXPECT_EQ(std::memcmp(cache.q_pool() + size_t(cache_table[h * cache_pages + i]) * layout.bytes,
                              pages.data() + size_t(table[h * max_pages + i]) * layout.bytes,
                              layout.bytes),
                  0)
            << "head " << h << " page " << i;
      }
    EXPECT_GE(closed, Hkv * (dmc ? 1 : 9));
  }
}

// Feeds the first `prompt` tokens of ks, vs [tokens, Hkv, D] to sequence 0 (layer 0) of a cache
// as a decoder does, each key rotated at its position (RoPE), each value as it is, and runs
// after_append(t, h) after each append (DMS: its decision). What a prefill form is checked
// against.
template <typename AfterAppend>
void FeedPrompt(PagedKvCache<float>* cache, const std::vector<float>& ks,
                const std::vector<float>& vs, int prompt, int Hkv, int D,
                AfterAppend after_append) {
  ASSERT_TRUE(cache->AddSequence(0).ok());
  std::vector<float> rotated(D);
  for (int t = 0; t < prompt; ++t)
    for (int h = 0; h < Hkv; ++h) {
      const size_t at = (size_t(t) * Hkv + h) * D;
      kernels::rope_forward(rotated.data(), ks.data() + at, 1, 1, 1, D, t, 10000.0f, false);
      ASSERT_TRUE(cache->Append(0, 0, h, rotated.data(), vs.data() + at, t).ok());
      after_append(t, h);
    }
}

// Per-token keys, the prefill form (paged_kv_prefill into staging rows, then
// paged_kv_settle_prefill a slot at a time and the row quantizer on every row it lists) leaves
// what feeding the prompt token by token leaves in the quantized PagedKvCache: the same counts,
// the residual's row, and every page byte for byte, the last partly filled; prompts around a
// page's edge.
TEST(KvQuantCache, DevicePrefillHoldsWhatTheCacheHoldsWithTokenKeys) {
  PagedCacheOptions o = OneLayerCache(3, 16, 4);
  o.quant = {4, 0, 0, 0, true, 8};
  const int Hkv = o.kv_heads, D = o.head_dim, P = o.page_size, longest = 17;
  const kernels::KvQuantPageLayout layout = kernels::kv_quant_page_layout(o.quant, P, D);
  const int residual = inference::KvResidualSlots(o), max_pages = longest / P + 1;
  ASSERT_EQ(residual, 1);
  std::mt19937_64 rng(31);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> ks(size_t(longest) * Hkv * D), vs(ks.size());
  for (float& x : ks) x = normal(rng);
  for (float& x : vs) x = normal(rng);
  std::vector<int32_t> table(size_t(Hkv) * max_pages), stage_table(Hkv), count(Hkv, 0);
  std::iota(table.begin(), table.end(), 0);
  std::iota(stage_table.begin(), stage_table.end(), 0);
  for (int prompt : {1, 2, P, P + 1, longest}) {
    SCOPED_TRACE(testing::Message() << "prompt " << prompt);
    PagedKvCache<float> fed(o);
    FeedPrompt(&fed, ks, vs, prompt, Hkv, D, [](int, int) {});
    std::vector<float> sk(size_t(Hkv) * prompt * D), sv(sk.size());
    std::vector<float> r_k(size_t(Hkv) * residual * D), r_v(r_k.size());
    std::vector<int32_t> r_len(Hkv, 0), q_len(Hkv, 0);
    const kernels::PagedKvLayer<float> stage{sk.data(), sv.data(), nullptr, stage_table.data(),
                                             r_len.data(), nullptr, nullptr, count.data(), 1,
                                             prompt, 0};
    kernels::paged_kv_prefill(stage, 0, ks.data(), vs.data(), ks.data(), vs.data(), nullptr,
                              nullptr, prompt, Hkv, D, 10000.0f, false);
    kernels::KvSettleLayer settle{table.data(), q_len.data(), r_len.data(), max_pages, P,
                                  residual};
    settle.slots_settle = true;
    const int max_closed = kernels::KvSettlePrefillMaxClosed(prompt, P, true),
              entries = Hkv * max_closed * P;
    std::vector<int32_t> ids(std::max(1, entries)), page_rows(ids.size()), rows(ids.size());
    kernels::paged_kv_settle_prefill(ids.data(), page_rows.data(), rows.data(), max_closed,
                                     settle, r_k.data(), r_v.data(), sk.data(), sv.data(),
                                     static_cast<const int32_t*>(nullptr), nullptr, prompt, 0,
                                     prompt, Hkv, D);
    std::vector<uint8_t> pages(table.size() * layout.bytes, 0);
    int listed = 0;
    for (int j = 0; j < entries; ++j)
      if (ids[j] >= 0) {
        kernels::kv_quantize_row(pages.data() + size_t(ids[j]) * layout.bytes, layout,
                                 page_rows[j], sk.data() + size_t(rows[j]) * D,
                                 sv.data() + size_t(rows[j]) * D);
        ++listed;
      }
    EXPECT_EQ(listed, Hkv * (prompt - 1));
    std::vector<int32_t> cache_table;
    std::vector<int> lengths;
    int cache_pages = 0;
    fed.BlockTable({0}, 0, &cache_table, &lengths, &cache_pages);
    std::vector<float> key(D), value(D);
    for (int h = 0; h < Hkv; ++h) {
      ASSERT_EQ(fed.compressed_length(0, 0, h), q_len[h]) << "head " << h;
      ASSERT_EQ(fed.length(0, 0, h), q_len[h] + r_len[h]) << "head " << h;
      ASSERT_EQ(r_len[h], 1) << "head " << h;
      fed.ReadSlot(0, 0, h, q_len[h], key.data(), value.data());
      for (int c = 0; c < D; ++c) {
        ASSERT_EQ(key[c], r_k[size_t(h) * D + c]) << "head " << h;
        ASSERT_EQ(value[c], r_v[size_t(h) * D + c]) << "head " << h;
      }
      for (int m = 0; m < (q_len[h] + P - 1) / P; ++m)
        EXPECT_EQ(
            std::memcmp(fed.q_pool() + size_t(cache_table[h * cache_pages + m]) * layout.bytes,
                        pages.data() + size_t(table[h * max_pages + m]) * layout.bytes,
                        layout.bytes),
            0)
            << "head " << h << " page " << m;
    }
  }
}

// Gathers the page_size rows a closing page lists (kernels/paged_kv_settle.h) from k_rows, v_rows
// and writes the page as the device quantizer does.
void QuantizeListedPage(uint8_t* page, const kernels::KvQuantPageLayout& layout,
                        const int32_t* rows, const std::vector<float>& k_rows,
                        const std::vector<float>& v_rows) {
  const int P = layout.page_size, D = layout.head_dim;
  std::vector<float> k(size_t(P) * D), v(k.size());
  for (int r = 0; r < P; ++r) {
    std::copy_n(k_rows.begin() + size_t(rows[r]) * D, D, k.begin() + size_t(r) * D);
    std::copy_n(v_rows.begin() + size_t(rows[r]) * D, D, v.begin() + size_t(r) * D);
  }
  kernels::kv_quantize_page(page, layout, k.data(), v.data());
}

// Every page the cache's head h of layer 0 holds, byte for byte against the flat form's (its
// page m is pages[table[h · max_pages + m]]).
void ExpectSamePages(const PagedKvCache<float>& cache, const std::vector<uint8_t>& pages,
                     const std::vector<int32_t>& table, int max_pages, int h, int quantized) {
  const kernels::KvQuantPageLayout& layout = cache.quant_layout();
  std::vector<int32_t> cache_table;
  std::vector<int> lengths;
  int cache_pages = 0;
  cache.BlockTable({0}, 0, &cache_table, &lengths, &cache_pages);
  for (int m = 0; m < quantized / layout.page_size; ++m)
    EXPECT_EQ(std::memcmp(cache.q_pool() + size_t(cache_table[h * cache_pages + m]) * layout.bytes,
                          pages.data() + size_t(table[h * max_pages + m]) * layout.bytes,
                          layout.bytes),
              0)
        << "head " << h << " page " << m;
}

// DMS's quantized cache in the GPU engine's form (kernels/paged_kv_settle.h at settle lag w + 1:
// paged_kv_settle_lagged_step closes page_size settled slots, staged for the quantizer, and moves
// the residual up; paged_kv_append, then paged_kv_dms_evict on the residual blocks) holds what
// the quantized PagedKvCache with DmsUpdate, the specification, holds after every token of random
// decisions: every head's quantized and residual slot counts, the residual's positions and rows
// in the same order, its pages byte for byte. Its prefill form (paged_kv_dms_prefill into
// staging rows with positions and marks, then paged_kv_settle_prefill) leaves what feeding the
// prompt token by token leaves: the same counts and pages, and the same row at each position of
// the residual, with the mark that makes the next steps evict as the cache does.
TEST(KvQuantCache, DeviceFormHoldsWhatTheDmsCacheHolds) {
  for (int window : {0, 2, 6}) {
    SCOPED_TRACE(testing::Message() << "window " << window);
    std::mt19937_64 rng(20 + window);
    PagedCacheOptions o = OneLayerCache(3, 16, 4);
    o.quant = {4, 0, 0, 0};
    o.settle_lag = window + 1;
    const int Hkv = o.kv_heads, D = o.head_dim, P = o.page_size, steps = 48;
    const kernels::KvQuantPageLayout layout = kernels::kv_quant_page_layout(o.quant, P, D);
    const int residual = inference::KvResidualSlots(o), max_pages = steps / P + 1;
    std::vector<int32_t> table(size_t(Hkv) * max_pages), blocks(Hkv), count(Hkv, 0);
    std::iota(table.begin(), table.end(), 0);
    std::iota(blocks.begin(), blocks.end(), 0);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> ks(size_t(steps) * Hkv * D), vs(ks.size()), evict(size_t(steps) * Hkv);
    for (float& x : ks) x = normal(rng);
    for (float& x : vs) x = normal(rng);
    for (float& x : evict) x = rng() % 2 ? 1.0f : 0.0f;
    // The flat form of one row: residual blocks with positions and marks, quantized pages.
    struct Flat {
      std::vector<float> r_k, r_v;
      std::vector<int32_t> r_pos, r_len, q_len, ids, rows;
      std::vector<uint8_t> r_marks, pages;
    };
    auto make_flat = [&]() {
      Flat f;
      f.r_k.assign(size_t(Hkv) * residual * D, 0.0f);
      f.r_v = f.r_k;
      f.r_pos.assign(size_t(Hkv) * residual, -1);
      f.r_marks.assign(f.r_pos.size(), 1);
      f.r_len.assign(Hkv, 0);
      f.q_len.assign(Hkv, 0);
      f.ids.assign(size_t(Hkv) * max_pages, -1);
      f.rows.assign(f.ids.size() * P, 0);
      f.pages.assign(table.size() * layout.bytes, 0);
      return f;
    };
    auto settle_of = [&](Flat& f) {
      return kernels::KvSettleLayer{table.data(), f.q_len.data(), f.r_len.data(), max_pages, P,
                                    residual, o.settle_lag, f.r_pos.data(), f.r_marks.data()};
    };
    // Head h of the cache against the flat form; by_position: the residual's slots matched by
    // position (the prefill keeps them in position order, the steps' evictions reorder them).
    auto expect_same = [&](PagedKvCache<float>& cache, const Flat& f, int h, bool by_position,
                           int t) {
      ASSERT_EQ(cache.compressed_length(0, 0, h), f.q_len[h]) << "t " << t << " head " << h;
      ASSERT_EQ(cache.length(0, 0, h), f.q_len[h] + f.r_len[h]) << "t " << t << " head " << h;
      std::vector<float> key(D), value(D);
      for (int j = 0; j < f.r_len[h]; ++j) {
        int slot = f.q_len[h] + j;
        const int32_t pos = f.r_pos[size_t(h) * residual + j];
        for (int i = f.q_len[h]; by_position && i < cache.length(0, 0, h); ++i)
          if (cache.position(0, 0, h, i) == pos) slot = i;
        ASSERT_EQ(cache.position(0, 0, h, slot), pos) << "t " << t << " head " << h << " row " << j;
        cache.ReadSlot(0, 0, h, slot, key.data(), value.data());
        const size_t at = (size_t(h) * residual + j) * D;
        for (int c = 0; c < D; ++c) {
          ASSERT_EQ(key[c], f.r_k[at + c]) << "t " << t << " head " << h << " row " << j;
          ASSERT_EQ(value[c], f.r_v[at + c]) << "t " << t << " head " << h << " row " << j;
        }
        // The mark: whether the next token's decision marked this one (DmsUpdate's score).
        ASSERT_EQ(cache.score(0, 0, h, slot) > 0, f.r_marks[size_t(h) * residual + j] == 1)
            << "t " << t << " head " << h << " position " << pos;
      }
      ExpectSamePages(cache, f.pages, table, max_pages, h, f.q_len[h]);
    };
    // Token by token, both forms.
    PagedKvCache<float> cache(o);
    ASSERT_TRUE(cache.AddSequence(0).ok());
    Flat f = make_flat();
    const kernels::KvSettleLayer settle = settle_of(f);
    const kernels::PagedKvLayer<float> flat{f.r_k.data(), f.r_v.data(), f.r_pos.data(),
                                            blocks.data(), f.r_len.data(), nullptr, nullptr,
                                            count.data(), 1, residual, 0};
    std::vector<float> stage_k(size_t(Hkv) * P * D), stage_v(stage_k.size());
    int closed = 0, evicted = 0;
    for (int32_t t = 0; t < steps; ++t) {
      const float* k = ks.data() + size_t(t) * Hkv * D;
      const float* v = vs.data() + size_t(t) * Hkv * D;
      const float* e = evict.data() + size_t(t) * Hkv;
      kernels::paged_kv_settle_lagged_step(f.ids.data(), f.rows.data(), stage_k.data(),
                                           stage_v.data(), settle, f.r_k.data(), f.r_v.data(), &t,
                                           1, Hkv, D);
      for (int h = 0; h < Hkv; ++h)
        if (f.ids[h] >= 0) {
          QuantizeListedPage(f.pages.data() + size_t(f.ids[h]) * layout.bytes, layout,
                             f.rows.data() + h * P, stage_k, stage_v);
          ++closed;
        }
      kernels::paged_kv_append(flat, k, v, nullptr, nullptr, &t, 1, Hkv, D, 10000.0f, false);
      for (int h = 0; h < Hkv; ++h) {  // the key as the flat form rotated it
        const float* stored = f.r_k.data() + (size_t(h) * residual + f.r_len[h] - 1) * D;
        ASSERT_TRUE(cache.Append(0, 0, h, stored, v + h * D, t).ok());
        ASSERT_TRUE(inference::DmsUpdate(cache, 0, 0, h, t, t > 0 && e[h] > 0.5f, window).ok());
      }
      kernels::paged_kv_dms_evict(flat, f.r_marks.data(), e, &t, 1, Hkv, D, window);
      for (int h = 0; h < Hkv; ++h) expect_same(cache, f, h, false, t);
      cache.AdvanceToken(0);
    }
    for (int h = 0; h < Hkv; ++h) evicted += steps - cache.length(0, 0, h);
    EXPECT_GE(closed, Hkv * 4);
    EXPECT_GT(evicted, Hkv * 4);

    // The prefill form against the prompt fed token by token, prompts around a page's edge.
    for (int prompt : {1, window + 2, window + 2 + P, 17, steps}) {
      SCOPED_TRACE(testing::Message() << "prompt " << prompt);
      PagedKvCache<float> fed(o);
      FeedPrompt(&fed, ks, vs, prompt, Hkv, D, [&](int t, int h) {
        ASSERT_TRUE(inference::DmsUpdate(fed, 0, 0, h, t,
                                         t > 0 && evict[size_t(t) * Hkv + h] > 0.5f, window)
                        .ok());
      });
      Flat g = make_flat();
      std::vector<float> sk(size_t(Hkv) * prompt * D), sv(sk.size());
      std::vector<int32_t> stage_pos(size_t(Hkv) * prompt), stage_table(Hkv);
      std::vector<uint8_t> stage_marks(stage_pos.size());
      std::iota(stage_table.begin(), stage_table.end(), 0);
      const kernels::PagedKvLayer<float> stage{sk.data(), sv.data(), stage_pos.data(),
                                               stage_table.data(), g.r_len.data(), nullptr,
                                               nullptr, count.data(), 1, prompt, 0};
      kernels::paged_kv_dms_prefill(stage, stage_marks.data(), 0, ks.data(), vs.data(),
                                    evict.data(), prompt, Hkv, D, window, 10000.0f);
      const int max_closed = kernels::KvSettlePrefillMaxClosed(prompt, P, false);
      kernels::paged_kv_settle_prefill(g.ids.data(), nullptr, g.rows.data(), max_closed,
                                       settle_of(g), g.r_k.data(), g.r_v.data(), sk.data(),
                                       sv.data(), stage_pos.data(), stage_marks.data(), prompt, 0,
                                       prompt, Hkv, D);
      for (int j = 0; j < Hkv * max_closed; ++j)
        if (g.ids[j] >= 0)
          QuantizeListedPage(g.pages.data() + size_t(g.ids[j]) * layout.bytes, layout,
                             g.rows.data() + j * P, sk, sv);
      for (int h = 0; h < Hkv; ++h) expect_same(fed, g, h, true, prompt);
    }
  }
}

// ZipCache in the GPU engine's form (kernels/paged_kv_settle.h: paged_kv_settle_scores adds each
// step's attention to the residual slots' scores, paged_kv_settle_step orders a closing page's
// rows by their normalized scores) holds what the quantized PagedKvCache with
// AccumulateAttention holds after every token of a vanilla sequence with random attention
// weights: the same residual scores, exactly, and the same mixed-precision pages, byte for byte.
TEST(KvQuantZipCache, DeviceFormHoldsWhatTheCacheHolds) {
  std::mt19937_64 rng(13);
  PagedCacheOptions o = OneLayerCache(2, 16, 8);
  o.quant = {2, 0, 8, 3};
  const int Hkv = o.kv_heads, H = 2 * Hkv, D = o.head_dim, P = o.page_size, steps = 50;
  PagedKvCache<float> cache(o);
  ASSERT_TRUE(cache.AddSequence(0).ok());
  const kernels::KvQuantPageLayout layout = kernels::kv_quant_page_layout(o.quant, P, D);
  const int residual = inference::KvResidualSlots(o), max_pages = steps / P + 1;
  const int stride = max_pages * P + residual;
  std::vector<float> r_k(size_t(Hkv) * residual * D), r_v(r_k.size());
  std::vector<float> r_scores(size_t(Hkv) * residual, -1.0f);
  std::vector<int32_t> r_len(Hkv, 0), q_len(Hkv, 0), count(Hkv, 0), blocks(Hkv);
  std::vector<int32_t> table(size_t(Hkv) * max_pages), ids(Hkv), rows(size_t(Hkv) * P);
  std::iota(blocks.begin(), blocks.end(), 0);
  std::iota(table.begin(), table.end(), 0);
  std::vector<uint8_t> pages(table.size() * layout.bytes);
  const kernels::PagedKvLayer<float> flat{r_k.data(), r_v.data(), nullptr, blocks.data(),
                                          r_len.data(), nullptr, nullptr, count.data(), 1,
                                          residual, 0};
  kernels::KvSettleLayer settle{table.data(), q_len.data(), r_len.data(), max_pages, P, residual};
  settle.r_scores = r_scores.data();
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> weight(0.0f, 1.0f);
  std::vector<float> k(size_t(Hkv) * D), v(k.size()), probs(size_t(H) * stride);
  int closed = 0;
  for (int32_t t = 0; t < steps; ++t) {
    for (float& x : k) x = normal(rng);
    for (float& x : v) x = normal(rng);
    kernels::paged_kv_settle_step(ids.data(), nullptr, rows.data(), settle, nullptr, &t, 1, Hkv);
    for (int h = 0; h < Hkv; ++h)
      if (ids[h] >= 0) {
        QuantizeListedPage(pages.data() + size_t(ids[h]) * layout.bytes, layout,
                           rows.data() + h * P, r_k, r_v);
        ++closed;
      }
    kernels::paged_kv_append(flat, k.data(), v.data(), nullptr, nullptr, &t, 1, Hkv, D, 10000.0f,
                             false);
    for (int h = 0; h < Hkv; ++h) {
      const float* stored = r_k.data() + (size_t(h) * residual + r_len[h] - 1) * D;
      ASSERT_TRUE(cache.Append(0, 0, h, stored, v.data() + h * D, t).ok());
    }
    // The step's attention weights over each head's slots (quantized, then residual), as both
    // forms index them.
    for (float& p : probs) p = weight(rng);
    kernels::paged_kv_settle_scores(settle, probs.data(), stride, 1, H, Hkv);
    inference::AccumulateAttention(cache, 0, 0, probs.data(), stride, H);
    for (int h = 0; h < Hkv; ++h) {
      ASSERT_EQ(cache.compressed_length(0, 0, h), q_len[h]) << "t " << t;
      ASSERT_EQ(cache.length(0, 0, h), q_len[h] + r_len[h]) << "t " << t;
      for (int j = 0; j < r_len[h]; ++j)
        ASSERT_EQ(cache.score(0, 0, h, q_len[h] + j), r_scores[size_t(h) * residual + j])
            << "t " << t << " head " << h << " slot " << j;
    }
    cache.AdvanceToken(0);
  }
  for (int h = 0; h < Hkv; ++h) ExpectSamePages(cache, pages, table, max_pages, h, q_len[h]);
  EXPECT_EQ(closed, Hkv * ((steps - 1) / P));
  // The saliency order is not the position order (else the test shows nothing).
  bool reordered = false;
  for (int j = 0; j < P; ++j) reordered |= rows[j] != j;
  EXPECT_TRUE(reordered);
}

// ZipCache's salient tokens (§4.2): the normalized attention score of token i is its
// accumulated attention over the number of queries that saw it, sum_k A[k, i] / nnz(A[:, i]),
// with A the lower-triangular attention matrix; the S highest of a page are stored at the high
// precision. A direct implementation on a hand-made matrix whose accumulated-score winner
// (token 0, seen by every query) is not the normalized winner.
TEST(KvQuantZipCache, SalientSlotsAreTheHighestNormalizedAttentionScores) {
  const std::vector<std::vector<double>> A = {
      {1.0}, {0.5, 0.5}, {0.4, 0.2, 0.4}, {0.2, 0.1, 0.1, 0.6}};
  const int P = 4;
  std::vector<double> normalized(P), accumulated(P);
  for (int i = 0; i < P; ++i) {
    int nnz = 0;
    for (int k = i; k < P; ++k) accumulated[i] += A[k][i], ++nnz;
    normalized[i] = accumulated[i] / nnz;
  }
  ASSERT_NE(std::max_element(accumulated.begin(), accumulated.end()) - accumulated.begin(),
            std::max_element(normalized.begin(), normalized.end()) - normalized.begin());
  for (int S : {1, 2, 3}) {
    PagedCacheOptions o;
    o.layers = 1;
    o.kv_heads = 1;
    o.head_dim = 4;
    o.page_size = P;
    o.budget_bytes = 1 << 20;
    o.quant = {2, 0, 8, S};
    PagedKvCache<double> cache(o);
    ASSERT_TRUE(cache.AddSequence(0).ok());
    for (int t = 0; t <= P; ++t) {  // token P settles tokens 0..P-1 into a page
      const std::vector<double> row(o.head_dim, t);
      ASSERT_TRUE(cache.Append(0, 0, 0, row.data(), row.data(), t).ok());
      if (t == P) break;
      std::vector<double> probs(P + 1, 0.0);  // query t attends slots 0..t (slot i: token i)
      for (int i = 0; i <= t; ++i) probs[i] = A[t][i];
      inference::AccumulateAttention(cache, 0, 0, probs.data(), P + 1, 1);
    }
    ASSERT_EQ(cache.compressed_length(0, 0, 0), P);
    std::vector<int> want(P);
    for (int i = 0; i < P; ++i) want[i] = i;
    std::stable_sort(want.begin(), want.end(),
                     [&](int a, int b) { return normalized[a] > normalized[b]; });
    std::vector<int> got_salient, want_salient(want.begin(), want.begin() + S);
    for (int r = 0; r < S; ++r) got_salient.push_back(cache.position(0, 0, 0, r));
    std::sort(got_salient.begin(), got_salient.end());
    std::sort(want_salient.begin(), want_salient.end());
    EXPECT_EQ(got_salient, want_salient) << "S " << S;
  }
}

// Decoding with ZipCache's mixed precision: every slot salient at 8 bits is exactly int8; a
// few salient slots at 8 bits over int4 lie between int4 and int8.
TEST(KvQuantZipCache, MixedPrecisionDecodeSpansInt4ToInt8) {
  model::Llama<double> m(tiny_models::TinyLlama(11, 2), nullptr);
  tiny_models::RandomizeParams(m, 31);
  std::vector<std::vector<int32_t>> tokens;
  for (int b = 0; b < 2; ++b) tokens.push_back(tiny_models::RandomTokens(30, 11, 5 + b));
  CachePolicy policy;
  policy.method = CacheMethod::kVanilla;
  const std::vector<double> full = tiny_models::DecodeLogits(m, policy, tokens, 4);
  policy.quant = {8, 0, 0, 0};
  const std::vector<double> int8 = tiny_models::DecodeLogits(m, policy, tokens, 4);
  policy.quant = {4, 0, 0, 0};
  const std::vector<double> int4 = tiny_models::DecodeLogits(m, policy, tokens, 4);
  policy.quant = {4, 0, 8, 4};
  // (to round-off: the page's rows are in saliency order, so attention sums in another order)
  EXPECT_LT(tiny_models::MaxAbsDiff(tiny_models::DecodeLogits(m, policy, tokens, 4), int8), 1e-12);
  policy.quant = {4, 0, 8, 2};
  const double mixed = tiny_models::MaxAbsDiff(full, tiny_models::DecodeLogits(m, policy, tokens, 4));
  EXPECT_LT(mixed, tiny_models::MaxAbsDiff(full, int4));
  EXPECT_GT(mixed, tiny_models::MaxAbsDiff(full, int8));
}

// dmc-eval --kv_fraction: each method's knob is the least compression whose KvSequenceBytes
// meets the budget (the next setting up does not), and a budget no setting meets is an error.
TEST(KvQuantBudget, KnobMeetsTheBudgetExactlyOrFailsClearly) {
  const PagedCacheOptions shape = tiny_models::BudgetShape();
  const int T = 512, heads = 4;
  const std::vector<int> whole(heads, T);
  const long vanilla = inference::KvSequenceBytes<float>(shape, whole);
  auto bytes = [&](const CachePolicy& p, const std::vector<int>& slots) {
    PagedCacheOptions o = shape;
    o.quant = p.quant;
    return inference::KvSequenceBytes(o, slots, 4, 4);
  };
  for (double f : {0.5, 0.25}) {
    const long budget = static_cast<long>(f * vanilla);
    auto quant = inference::PolicyForBytes("quant", shape, 4, 4, T, budget, {});
    ASSERT_TRUE(quant.ok()) << quant.status();
    EXPECT_LE(bytes(*quant, whole), budget);
    if (quant->quant.bits < 8) {
      CachePolicy more = *quant;
      more.quant.bits *= 2;
      EXPECT_GT(bytes(more, whole), budget);
    }
    auto h2o = inference::PolicyForBytes("h2o", shape, 4, 4, T, budget, {});
    ASSERT_TRUE(h2o.ok()) << h2o.status();
    EXPECT_LE(bytes(*h2o, std::vector<int>(heads, h2o->budget)), budget);
    EXPECT_GT(bytes(*h2o, std::vector<int>(heads, h2o->budget + 1)), budget);
    EXPECT_EQ(h2o->recent, h2o->budget / 2);
    // Two tiers of key scales per page of 16: the mixture reaches 1/2 of fp32, not 1/4.
    auto zip = inference::PolicyForBytes("zipcache", shape, 4, 4, T, budget, {});
    ASSERT_EQ(zip.ok(), f == 0.5) << zip.status();
    if (zip.ok()) {
      EXPECT_LE(bytes(*zip, whole), budget);
      EXPECT_GT(zip->quant.salient_slots, 0);
    }
    const std::vector<int> dmc_slots(heads, T / 3);
    auto dmc = inference::PolicyForBytes("dmc", shape, 4, 4, T, budget, dmc_slots);
    ASSERT_TRUE(dmc.ok()) << dmc.status();
    EXPECT_LE(bytes(*dmc, dmc_slots), budget);
  }
  const absl::StatusOr<CachePolicy> vanilla_half =
      inference::PolicyForBytes("vanilla", shape, 4, 4, T, vanilla / 2, {});
  EXPECT_TRUE(absl::IsInvalidArgument(vanilla_half.status()));
  const absl::StatusOr<CachePolicy> tiny =
      inference::PolicyForBytes("quant", shape, 4, 4, T, 100, {});
  EXPECT_TRUE(absl::IsInvalidArgument(tiny.status()));
  EXPECT_NE(tiny.status().message().find("no setting of quant meets 100 bytes"), std::string::npos)
      << tiny.status();
  // The error names the smallest setting and splits its bytes into pages and what a sequence
  // reserves: int2 pages and the full-precision residual (a page per head); DMC's also its window
  // state.
  CachePolicy int2;
  int2.method = CacheMethod::kVanilla;
  int2.quant.bits = 2;
  PagedCacheOptions int2_shape = shape;
  int2_shape.quant = int2.quant;
  const long residual = inference::KvResidualBytes(int2_shape, 4);
  EXPECT_NE(tiny.status().message().find(absl::StrFormat(
                "its smallest cache, vanilla-int2, holds %d (pages %d, full-precision residual %d, "
                "DMC window state 0, ThinK query energy 0)",
                bytes(int2, whole), bytes(int2, whole) - residual, residual)),
            std::string::npos)
      << tiny.status();
  PagedCacheOptions dmc_shape = shape;
  dmc_shape.dmc_window = 4;
  const absl::StatusOr<CachePolicy> dmc_tiny = inference::PolicyForBytes(
      "dmc", dmc_shape, 4, 4, T, 100, std::vector<int>(heads, T / 3));
  EXPECT_NE(dmc_tiny.status().message().find(
                absl::StrFormat("DMC window state %d, ThinK query energy 0)",
                                inference::KvWindowBytes(dmc_shape, 4, 4))),
            std::string::npos)
      << dmc_tiny.status();
  // Eviction budgets are part of the policy's name in results.
  EXPECT_EQ(inference::PolicyName(*inference::PolicyForCr(CacheMethod::kH2O, 128, 4)), "h2o-32");
}

// The GPU engine holds pages, residual blocks and DMC's windowed keys and values in bf16 but DMC's
// importances and ThinK's query energy in fp32: a budget is planned at both widths, as the engine
// then counts the sequence (KvSequenceBytes), not at the pages' width alone, which undercounts
// the running state.
TEST(KvQuantBudget, PlansPagesAndWindowStateAtTheEnginesTwoWidths) {
  PagedCacheOptions shape = tiny_models::BudgetShape();
  shape.dmc_window = 8;
  const int T = 512, page_bytes = 2, state_bytes = 4;
  const std::vector<int> slots(4, T / 3);
  auto bytes = [&](int bits, int page, int state, bool token_keys = false) {
    PagedCacheOptions o = shape;
    o.quant = {bits, 0, 0, 0, token_keys};
    return inference::KvSequenceBytes(o, slots, page, state);
  };
  ASSERT_GT(bytes(0, page_bytes, state_bytes), bytes(0, page_bytes, page_bytes));
  // A budget that the full-precision dmc cache meets only with its importances at bf16: the
  // single-width plan keeps full precision, the engine's widths need int8.
  const long budget = bytes(0, page_bytes, page_bytes);
  const absl::StatusOr<CachePolicy> single =
      inference::PolicyForBytes("dmc", shape, page_bytes, page_bytes, T, budget, slots);
  ASSERT_TRUE(single.ok()) << single.status();
  EXPECT_EQ(single->quant.bits, 0);
  const absl::StatusOr<CachePolicy> planned =
      inference::PolicyForBytes("dmc", shape, page_bytes, state_bytes, T, budget, slots);
  ASSERT_TRUE(planned.ok()) << planned.status();
  EXPECT_EQ(planned->quant.bits, 8);
  EXPECT_LE(bytes(8, page_bytes, state_bytes), budget);
  // The planned bytes are KvSequenceBytes at the two widths exactly: met at that budget, not a
  // byte below it. The candidates, least compressed first: full precision, then at each bits
  // keys per channel and per token (whose residual is a row, not a page plus a row).
  const std::vector<std::pair<int, bool>> order = {{0, false}, {8, false}, {8, true}, {4, false},
                                                   {4, true},  {2, false}, {2, true}};
  for (size_t i = 0; i + 1 < order.size(); ++i) {
    const auto [bits, token_keys] = order[i];
    const long exact = bytes(bits, page_bytes, state_bytes, token_keys);
    ASSERT_LT(bytes(order[i + 1].first, page_bytes, state_bytes, order[i + 1].second), exact);
    const absl::StatusOr<CachePolicy> at =
        inference::PolicyForBytes("dmc", shape, page_bytes, state_bytes, T, exact, slots);
    ASSERT_TRUE(at.ok()) << at.status();
    EXPECT_EQ(at->quant.bits, bits);
    EXPECT_EQ(at->quant.token_keys, token_keys);
    const absl::StatusOr<CachePolicy> below =
        inference::PolicyForBytes("dmc", shape, page_bytes, state_bytes, T, exact - 1, slots);
    ASSERT_TRUE(below.ok()) << below.status();
    EXPECT_EQ(below->quant.bits, order[i + 1].first);
    EXPECT_EQ(below->quant.token_keys, order[i + 1].second);
  }
  // An unmet budget splits the smallest cache by the same widths: the residual and the window's
  // keys and values at the pages', the importances and ThinK's query energy at the state's.
  PagedCacheOptions int2 = shape;
  int2.quant = {2, 0, 0, 0, true};
  const absl::StatusOr<CachePolicy> tiny =
      inference::PolicyForBytes("dmc", shape, page_bytes, state_bytes, T, 100, slots);
  EXPECT_NE(tiny.status().message().find(absl::StrFormat(
                "holds %d (pages %d, full-precision residual %d, DMC window state %d, ThinK query "
                "energy 0)",
                bytes(2, page_bytes, state_bytes, true),
                bytes(2, page_bytes, state_bytes, true) -
                    inference::KvReservedBytes(int2, page_bytes, state_bytes),
                inference::KvResidualBytes(int2, page_bytes),
                inference::KvWindowBytes(int2, page_bytes, state_bytes))),
            std::string::npos)
      << tiny.status();
  PagedCacheOptions think = shape;
  think.think_channels = 1;
  const long think_bytes = inference::KvSequenceBytes(think, slots, page_bytes, state_bytes);
  const absl::StatusOr<CachePolicy> think_tiny =
      inference::PolicyForBytes("dmc_think", shape, page_bytes, state_bytes, T, 100, slots);
  EXPECT_NE(think_tiny.status().message().find(absl::StrFormat(
                "holds %d (pages %d, full-precision residual %d, DMC window state %d, ThinK query "
                "energy %d)",
                think_bytes,
                think_bytes - inference::KvReservedBytes(think, page_bytes, state_bytes),
                inference::KvResidualBytes(think, page_bytes),
                inference::KvWindowBytes(think, page_bytes, state_bytes),
                inference::KvObservationBytes(think, state_bytes))),
            std::string::npos)
      << think_tiny.status();
  EXPECT_NE(inference::KvObservationBytes(think, state_bytes),
            inference::KvObservationBytes(think, page_bytes));
}

}  // namespace
}  // namespace dmc
