// ThinK (arXiv 2407.21018) in the paged cache: every page's kept key channels against a direct
// implementation of the paper's score (the Frobenius norm of Q[:, j] K[:, j]^T over the queries
// observed since the head's previous page, top kept channels); attention over the pruned pages
// against a direct dot product over the kept channels; bytes charged against KvSequenceBytes and
// the allocator; decoding with every channel kept equal to the vanilla cache; the byte budget
// knob. The same on the retrofits' dmc and dms caches: every channel kept decodes as the plain
// cache, fewer as a direct reference decoder that masks the settled slots' keys itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "inference/cache_policy.h"
#include "inference/cpu_engine.h"
#include "inference/paged_decoder.h"
#include "inference/paged_kv_cache.h"
#include "kernels/decode_attention.h"
#include "kernels/dmc_gates.h"
#include "kernels/dms_gates.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
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
// by entry; the kept channels are the top `kept` scores, ties to the lower channel. A DMC model's
// control channel (exclude_ctrl: D-1), which attention never reads, scores 0.
std::vector<bool> DirectKeptChannels(const std::vector<std::vector<double>>& queries,
                                     const std::vector<std::vector<double>>& keys, int kept,
                                     bool exclude_ctrl = false) {
  const int D = static_cast<int>(keys[0].size());
  std::vector<double> score(D, 0.0);
  for (int j = 0; j < (exclude_ctrl ? D - 1 : D); ++j) {
    double frobenius = 0;
    for (const auto& q : queries)
      for (const auto& k : keys) frobenius += (q[j] * k[j]) * (q[j] * k[j]);
    score[j] = std::sqrt(frobenius);
  }
  std::vector<int> order(D);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[a] > score[b]; });
  std::vector<bool> keep(D, false);
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
    cache.ObserveQuery(0, 0, q.data(), kH, false);
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

// After every operation of the accounting tests: each of the 3 sequences' bytes against
// KvSequenceBytes of its heads' lengths (exactly, or at most when `exact` is false), and the
// allocator holding exactly the pruned pages and the sequences' charges. Returns the pages.
long CheckHeldBytes(const PagedKvCache<double>& cache, const PagedCacheOptions& o, bool exact,
                    int op) {
  long pages = 0, charged = 0;
  for (int s = 0; s < 3; ++s) {
    std::vector<int> slots;
    for (int l = 0; l < o.layers; ++l)
      for (int h = 0; h < kHkv; ++h) {
        slots.push_back(cache.length(s, l, h));
        pages += cache.compressed_length(s, l, h) / kP;
      }
    const long bound = inference::KvSequenceBytes<double>(o, slots);
    EXPECT_LE(cache.bytes(s), bound) << "op " << op;
    if (exact) {
      EXPECT_EQ(cache.bytes(s), bound) << "op " << op;
    }
    charged += cache.bytes(s);
  }
  EXPECT_EQ(cache.allocator().pages_in_use(), pages) << "op " << op;
  EXPECT_EQ(cache.allocator().used_bytes(), charged) << "op " << op;
  return pages;
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
  // The GPU engine's: bf16 residual blocks, the query energy at fp32 as its window state.
  EXPECT_EQ(inference::KvReservedBytes(o, 2, 4), 2L * kHkv * (kP * 2 * kD * 2 + kD * 4));
  std::mt19937_64 rng(5);
  std::vector<std::vector<int>> pos(3, std::vector<int>(o.layers * kHkv, 0));
  for (int seq = 0; seq < 3; ++seq) ASSERT_TRUE(cache.AddSequence(seq).ok());
  for (int op = 0; op < 300; ++op) {
    const int seq = rng() % 3, l = rng() % o.layers, h = rng() % kHkv;
    const std::vector<double> row = Random(kD, rng), q = Random(kH * kD, rng);
    ASSERT_TRUE(cache.Append(seq, l, h, row.data(), row.data(), pos[seq][l * kHkv + h]++).ok());
    cache.ObserveQuery(seq, l, q.data(), kH, false);
    CheckHeldBytes(cache, o, /*exact=*/true, op);
    if (HasFailure()) return;
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

// ThinK serves the vanilla, dmc and dms caches at full precision; the eviction baselines, whose
// every slot may leave, LoMA, which removes each segment it compresses, and quantized pages are
// refused, naming the problem.
TEST(Think, RefusesWhatItCannotServe) {
  CachePolicy p;
  for (CacheMethod method : {CacheMethod::kVanilla, CacheMethod::kDmc, CacheMethod::kDms}) {
    p.method = method;
    p.think_channels = 9;
    EXPECT_TRUE(absl::IsInvalidArgument(inference::ValidateThink(p, 8)));
    p.think_channels = 4;
    EXPECT_TRUE(inference::ValidateThink(p, 8).ok()) << inference::PolicyName(p);
    p.quant = {8, 0, 0, 0};
    const absl::Status s = inference::ValidateThink(p, 8);
    EXPECT_TRUE(absl::IsInvalidArgument(s));
    EXPECT_NE(s.message().find(absl::StrFormat("quantization (%s-int8)",
                                               inference::CacheMethodName(method))),
              std::string::npos)
        << s;
    p.quant = {};
  }
  for (CacheMethod method : {CacheMethod::kH2O, CacheMethod::kTova, CacheMethod::kLoma}) {
    p.method = method;
    const absl::Status s = inference::ValidateThink(p, 8);
    EXPECT_TRUE(absl::IsInvalidArgument(s));
    EXPECT_NE(s.message().find(absl::StrFormat("not of %s", inference::CacheMethodName(method))),
              std::string::npos)
        << s;
  }
  // The engine refuses it too, before anything is decoded.
  model::Llama<double> m(tiny_models::TinyLlama(11, 2), nullptr);
  p = *inference::PolicyForCr(CacheMethod::kH2O, 32, 2.0);
  p.think_channels = 2;
  auto engine = inference::CpuEngine<double>::Create(m, p, 1 << 20, 4);
  EXPECT_TRUE(absl::IsInvalidArgument(engine.status()));
  EXPECT_NE(engine.status().message().find("ThinK"), std::string::npos) << engine.status();
  // Names in results: the vanilla cache's as before, the retrofits' with their method.
  p = CachePolicy{CacheMethod::kVanilla};
  p.think_channels = 24;
  EXPECT_EQ(inference::PolicyName(p), "think-k24");
  p.method = CacheMethod::kDmc;
  EXPECT_EQ(inference::PolicyName(p), "dmc-think-k24");
  p.method = CacheMethod::kDms;
  EXPECT_EQ(inference::PolicyName(p), "dms-think-k24");
}

// dmc-eval --kv_fraction=F --methods=think: the most channels whose bytes meet the budget (one
// more does not); ThinK prunes keys only, so half of vanilla is out of reach: a clear error.
TEST(Think, BudgetKnobIsTheKeptChannels) {
  const PagedCacheOptions shape = tiny_models::BudgetShape();
  const int T = 512;
  const std::vector<int> whole(4, T);
  const long vanilla = inference::KvSequenceBytes<float>(shape, whole);
  auto bytes = [&](int kept) {
    PagedCacheOptions o = shape;
    o.think_channels = kept;
    return inference::KvSequenceBytes(o, whole, 4, 4);
  };
  const long budget = static_cast<long>(0.7 * vanilla);
  auto think = inference::PolicyForBytes("think", shape, 4, 4, T, budget, {});
  ASSERT_TRUE(think.ok()) << think.status();
  EXPECT_EQ(inference::PolicyName(*think),
            absl::StrFormat("think-k%d", think->think_channels));
  EXPECT_LE(bytes(think->think_channels), budget);
  EXPECT_GT(bytes(think->think_channels + 1), budget);
  const auto half = inference::PolicyForBytes("think", shape, 4, 4, T, vanilla / 2, {});
  EXPECT_TRUE(absl::IsInvalidArgument(half.status()));
  EXPECT_NE(half.status().message().find("no setting of think"), std::string::npos)
      << half.status();
}


// ThinK on the retrofits' caches (as KV quantization composes with them): a slot settles, and
// may be pruned, once DMC has closed it or DMS's eviction window has passed it.

// The tiny DMC model of the quantization tests (plenty of merges), and DMS models of either
// variant with about half of the tokens marked (window 3).
model::Llama<double> CompressingModel(CacheMethod method, model::DmsVariant variant) {
  model::LlamaConfig c = tiny_models::TinyLlama(11, 2);
  if (method == CacheMethod::kDmc) {
    c.dmc.enabled = true;
    c.dmc.window = 3;
    c.dmc.init_val = -0.5f;
  } else {
    c.dms.enabled = true;
    c.dms.variant = variant;
    c.dms.window = 3;
    c.dms.offset = 0.2f;
  }
  model::Llama<double> m(c, nullptr);
  tiny_models::RandomizeParams(m, method == CacheMethod::kDmc ? 23 : 42);
  return m;
}

// The direct reference of one sequence, token by token: the model's blocks as the paged decoder
// runs them, keys and values kept by CacheToken in the plain full-precision cache of the method
// (DMC's merges, DMS's delayed evictions), and attention here, over every slot of a head with
// the keys of its settled slots (positions below t − settle lag: DMC's closed slots, DMS's
// tokens past the window) masked, page_size at a time, oldest first, to the channels of
// DirectKeptChannels over the queries of the head's group since its previous page. Returns the
// logits [T, V]; appends the slots of every (layer, KV head) at the end to *lengths.
std::vector<double> ReferenceLogits(const model::Llama<double>& m, CacheMethod method, int kept,
                                    int page_size, const std::vector<int32_t>& tokens,
                                    std::vector<int>* lengths) {
  namespace k = kernels;
  const model::LlamaConfig& c = m.config();
  const int C = c.hidden_size, D = c.head_dim(), H = c.num_attention_heads;
  const int Hkv = c.num_key_value_heads, G = H / Hkv, F = c.intermediate_size, V = c.vocab_size;
  const bool dmc = c.dmc.enabled, dms = c.dms.enabled;
  const bool qchannel = dms && c.dms.variant == model::DmsVariant::kQueryChannel;
  const int lag = dms ? c.dms.window + 1 : 0;
  PagedKvCache<double> cache(inference::CacheOptionsFor(c, method, 1L << 24, page_size));
  EXPECT_TRUE(cache.AddSequence(0).ok());
  struct HeadPages {
    std::map<int32_t, std::vector<bool>> mask;    // by the position of each pruned slot
    std::vector<std::vector<double>> queries;     // since the head's previous page
  };
  std::vector<HeadPages> pages(size_t(c.num_hidden_layers) * Hkv);
  std::vector<double> x(C), xn(C), rstd(1), q(H * D), qr(H * D), key(Hkv * D), value(Hkv * D);
  std::vector<double> att(H * D), o(C), x2(C), gate(F), up(F), hidden(F), logits;
  std::vector<double> logit(Hkv), alpha(Hkv), merge(Hkv), bias(Hkv), omega(Hkv, 1.0);
  std::vector<double> dms_x(Hkv), dms_xn(C), dms_rstd(1);
  for (int t = 0; t < static_cast<int>(tokens.size()); ++t) {
    k::embedding_forward(x.data(), &tokens[t], m.embedding(), 1, C);
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const auto w = m.layer(l);
      k::rmsnorm_forward(xn.data(), rstd.data(), x.data(), w.attn_norm, 1, C, c.rms_norm_eps);
      k::matmul_forward(q.data(), xn.data(), w.wq, 1, C, H * D);
      k::matmul_forward(key.data(), xn.data(), w.wk, 1, C, Hkv * D);
      k::matmul_forward(value.data(), xn.data(), w.wv, 1, C, Hkv * D);
      if (dmc)
        k::dmc_gates_forward<double>(
            {logit.data(), alpha.data(), merge.data(), bias.data(), omega.data()}, q.data(),
            key.data(), nullptr, 1, 1, H, Hkv, D,
            {c.dmc.init_val, c.dmc.temperature, c.dmc.omega_eps, k::DmcDecisionMode::kHard});
      if (dms) {
        m.DmsDecisionInput(l, x.data(), q.data(), dms_x.data(), 1, dms_rstd.data(),
                           dms_xn.data());
        if (qchannel) model::ZeroDmsQueryChannel(q.data(), 1, H, Hkv, D);
        k::dms_gates_forward<double>(
            logit.data(), alpha.data(), merge.data(), nullptr, dms_x.data(), nullptr, 1, 1, Hkv,
            {c.dms.scale, c.dms.offset, c.dms.temperature, k::DmcDecisionMode::kHard});
      }
      for (int h = 0; h < Hkv; ++h)
        EXPECT_TRUE(inference::CacheToken(cache, c, method, 0, l, h, &key[h * D], &value[h * D],
                                          omega[h], alpha[h] > 0.5, t)
                        .ok());
      k::rope_forward(qr.data(), q.data(), 1, 1, H, D, t, c.rope_theta, dmc);
      if (qchannel) model::ZeroDmsQueryChannel(qr.data(), 1, H, Hkv, D);
      for (int h = 0; h < Hkv; ++h) {
        HeadPages& hp = pages[size_t(l) * Hkv + h];
        std::vector<std::pair<int32_t, int>> settled;  // (position, slot), not yet in a page
        for (int i = 0; i < cache.length(0, l, h); ++i) {
          const int32_t pos = cache.position(0, l, h, i);
          if (pos < t - lag && hp.mask.count(pos) == 0) settled.push_back({pos, i});
        }
        std::sort(settled.begin(), settled.end());
        for (size_t first = 0; first + page_size <= settled.size(); first += page_size) {
          std::vector<std::vector<double>> page_keys;
          for (size_t r = first; r < first + page_size; ++r) {
            std::vector<double> k_row(D), v_row(D);
            cache.ReadSlot(0, l, h, settled[r].second, k_row.data(), v_row.data());
            page_keys.push_back(k_row);
          }
          const std::vector<bool> keep = DirectKeptChannels(hp.queries, page_keys, kept, dmc);
          for (size_t r = first; r < first + page_size; ++r) hp.mask[settled[r].first] = keep;
          hp.queries.clear();
        }
        for (int g = h * G; g < (h + 1) * G; ++g)
          hp.queries.emplace_back(qr.begin() + g * D, qr.begin() + (g + 1) * D);
      }
      for (int g = 0; g < H; ++g) {  // softmax over the slots of the query head's KV head
        const int h = g / G, n = cache.length(0, l, h);
        const HeadPages& hp = pages[size_t(l) * Hkv + h];
        std::vector<double> p(n), k_row(D);
        std::vector<std::vector<double>> v_rows(n, std::vector<double>(D));
        double max_s = -1e300, sum = 0;
        for (int i = 0; i < n; ++i) {
          cache.ReadSlot(0, l, h, i, k_row.data(), v_rows[i].data());
          const auto pruned = hp.mask.find(cache.position(0, l, h, i));
          p[i] = 0;
          for (int j = 0; j < (dmc ? D - 1 : D); ++j)
            if (pruned == hp.mask.end() || pruned->second[j]) p[i] += qr[g * D + j] * k_row[j];
          p[i] /= std::sqrt(static_cast<double>(D));
          max_s = std::max(max_s, p[i]);
        }
        for (double& s : p) sum += (s = std::exp(s - max_s));
        for (int j = 0; j < D; ++j) {
          att[g * D + j] = 0;
          for (int i = 0; i < n; ++i) att[g * D + j] += p[i] / sum * v_rows[i][j];
        }
      }
      k::matmul_forward(o.data(), att.data(), w.wo, 1, H * D, C);
      for (int i = 0; i < C; ++i) x2[i] = x[i] + o[i];
      m.MlpForward(l, x2.data(), x.data(), 1, rstd.data(), xn.data(), gate.data(), up.data(),
                   hidden.data());
    }
    cache.AdvanceToken(0);
    k::rmsnorm_forward(xn.data(), rstd.data(), x.data(), m.final_norm(), 1, C, c.rms_norm_eps);
    logits.resize(logits.size() + V);
    k::matmul_forward(logits.data() + logits.size() - V, xn.data(), m.lm_head(), 1, C, V);
  }
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int h = 0; h < Hkv; ++h) lengths->push_back(cache.length(0, l, h));
  return logits;
}

struct ComposedCase {
  CacheMethod method;
  model::DmsVariant variant;  // dms only
};

class ThinkComposed : public ::testing::TestWithParam<ComposedCase> {};

// Decoding three sequences (batches of two) on the CPU engine: every channel kept is the plain
// cache of the method (to round-off: the settled slots sit in another order); half of them kept
// equals the direct reference, logits and per-head lengths, and differs from the plain cache.
TEST_P(ThinkComposed, DecodesAsTheDirectReference) {
  const auto [method, variant] = GetParam();
  model::Llama<double> m = CompressingModel(method, variant);
  const int D = m.config().head_dim(), P = 4, T = 30, V = m.config().vocab_size;
  std::vector<std::vector<int32_t>> tokens;
  for (int b = 0; b < 3; ++b) tokens.push_back(tiny_models::RandomTokens(T, V, 7 + b));
  CachePolicy policy{method};
  std::vector<int> plain_lengths, all_lengths, half_lengths, reference_lengths;
  const std::vector<double> plain = tiny_models::DecodeLogits(m, policy, tokens, P, &plain_lengths);
  policy.think_channels = D;
  const std::vector<double> all = tiny_models::DecodeLogits(m, policy, tokens, P, &all_lengths);
  policy.think_channels = D / 2;
  const std::vector<double> half = tiny_models::DecodeLogits(m, policy, tokens, P, &half_lengths);
  EXPECT_LT(tiny_models::MaxAbsDiff(plain, all), 1e-12);
  EXPECT_EQ(all_lengths, plain_lengths);
  int compressed_heads = 0;
  for (int n : plain_lengths) compressed_heads += n < T;
  EXPECT_GT(compressed_heads, 0) << "the test needs merged or evicted tokens";

  std::vector<double> reference;
  for (const std::vector<int32_t>& sequence : tokens) {
    const std::vector<double> r =
        ReferenceLogits(m, method, D / 2, P, sequence, &reference_lengths);
    reference.insert(reference.end(), r.begin(), r.end());
  }
  ASSERT_EQ(reference.size(), half.size());
  EXPECT_LT(tiny_models::MaxAbsDiff(half, reference), 1e-10);
  EXPECT_EQ(half_lengths, reference_lengths);
  EXPECT_GT(tiny_models::MaxAbsDiff(plain, half), 1e-6) << "pruning changed nothing";
}

INSTANTIATE_TEST_SUITE_P(
    Retrofits, ThinkComposed,
    ::testing::Values(ComposedCase{CacheMethod::kDmc, model::DmsVariant::kAdapter},
                      ComposedCase{CacheMethod::kDms, model::DmsVariant::kAdapter},
                      ComposedCase{CacheMethod::kDms, model::DmsVariant::kQueryChannel}),
    [](const ::testing::TestParamInfo<ComposedCase>& info) {
      return std::string(inference::CacheMethodName(info.param.method)) +
             (info.param.method == CacheMethod::kDms
                  ? std::string("_") + model::DmsVariantName(info.param.variant)
                  : "");
    });

// Random DMC steps (appends and merges), and DMS appends with random marks and their delayed
// evictions, over three sequences and two layers: the allocator holds exactly the pruned pages
// and the reservations (window state, residual, query energy), and each sequence's bytes are
// KvSequenceBytes of its heads' lengths (DMC: exactly; DMS, which settles w + 1 tokens later:
// at most). DMC's open slot and DMS's window never enter a page.
TEST(ThinkComposedCache, ByteAccountingEqualsWhatIsHeld) {
  for (CacheMethod method : {CacheMethod::kDmc, CacheMethod::kDms}) {
    const bool dmc = method == CacheMethod::kDmc;
    SCOPED_TRACE(inference::CacheMethodName(method));
    PagedCacheOptions o = ThinkOptions(2);
    const int window = 2;
    o.dmc_window = dmc ? window : 0;
    o.settle_lag = dmc ? 0 : window + 1;
    PagedKvCache<double> cache(o);
    EXPECT_EQ(inference::KvReservedBytes(o, sizeof(double), sizeof(double)),
              inference::KvWindowBytes<double>(o) +
                  2L * kHkv * ((kP + o.settle_lag) * 2 * kD + kD) * sizeof(double));
    std::mt19937_64 rng(dmc ? 13 : 17);
    std::vector<std::vector<int>> pos(3, std::vector<int>(o.layers * kHkv, 0));
    for (int seq = 0; seq < 3; ++seq) ASSERT_TRUE(cache.AddSequence(seq).ok());
    for (int op = 0; op < 600; ++op) {
      const int seq = rng() % 3, l = rng() % o.layers, h = rng() % kHkv;
      int& t = pos[seq][l * kHkv + h];
      const std::vector<double> row = Random(kD, rng), q = Random(kH * kD, rng);
      const bool decision = rng() % 2 == 0;
      if (dmc) {
        ASSERT_TRUE(cache.AddDmc(seq, l, h, row.data(), row.data(), 1.0, decision, t).ok());
      } else {
        ASSERT_TRUE(cache.Append(seq, l, h, row.data(), row.data(), t).ok());
        ASSERT_TRUE(inference::DmsUpdate(cache, seq, l, h, t, t > 0 && decision, window).ok());
      }
      cache.ObserveQuery(seq, l, q.data(), kH, dmc);
      const int n = cache.length(seq, l, h), pruned = cache.compressed_length(seq, l, h);
      ASSERT_LE(pruned, n - 1) << "the newest slot (DMC: the open one) was pruned";
      for (int i = 0; i < pruned; ++i)
        ASSERT_LT(cache.position(seq, l, h, i), t - o.settle_lag) << "a slot inside the window";
      ++t;
      const long pages = CheckHeldBytes(cache, o, /*exact=*/dmc, op);
      ASSERT_EQ(cache.allocator().used_bytes(),
                pages * cache.page_bytes() +
                    3 * inference::KvReservedBytes(o, sizeof(double), sizeof(double)));
      if (HasFailure()) return;
    }
    EXPECT_GT(cache.allocator().pages_in_use(), 0);
    for (int s = 0; s < 3; ++s) ASSERT_TRUE(cache.Free(s).ok());
    EXPECT_EQ(cache.allocator().used_bytes(), 0);
  }
}

// dmc-eval --kv_fraction=F --methods=dmc_think,dms_think: the most kept channels whose bytes
// over the retrofit's measured slots per head meet the budget (one more does not), in the
// method's own cache shape (DMC's window state, DMS's longer residual).
TEST(ThinkComposedCache, BudgetKnobIsTheKeptChannels) {
  const PagedCacheOptions shape = tiny_models::BudgetShape();
  const int T = 512;
  const long vanilla = inference::KvSequenceBytes<float>(shape, std::vector<int>(4, T));
  const std::vector<int> slots = {200, 150, 260, 90};
  for (const char* name : {"dmc_think", "dms_think"}) {
    const bool dmc = std::string(name) == "dmc_think";
    PagedCacheOptions o = shape;
    o.dmc_window = dmc ? 4 : 0;
    o.settle_lag = dmc ? 0 : 5;
    auto bytes = [&](int kept) {
      PagedCacheOptions with = o;
      with.think_channels = kept;
      return inference::KvSequenceBytes(with, slots, 4, 4);
    };
    const long budget = static_cast<long>(0.3 * vanilla);
    auto think = inference::PolicyForBytes(name, o, 4, 4, T, budget, slots);
    ASSERT_TRUE(think.ok()) << think.status();
    EXPECT_EQ(think->method, dmc ? CacheMethod::kDmc : CacheMethod::kDms);
    EXPECT_EQ(think->quant.bits, 0);
    EXPECT_LE(bytes(think->think_channels), budget);
    EXPECT_GT(bytes(think->think_channels + 1), budget);
    EXPECT_EQ(inference::PolicyName(*think),
              absl::StrFormat("%s-think-k%d", dmc ? "dmc" : "dms", think->think_channels));
    const auto tiny = inference::PolicyForBytes(name, o, 4, 4, T, 100, slots);
    EXPECT_NE(tiny.status().message().find(absl::StrFormat("no setting of %s", name)),
              std::string::npos)
        << tiny.status();
    EXPECT_TRUE(absl::IsInvalidArgument(
        inference::PolicyForBytes(name, o, 4, 4, T, budget, {100}).status()))
        << "slots of every head are needed";
  }
  EXPECT_EQ(*inference::BudgetCacheMethod("dms_think"), CacheMethod::kDms);
  EXPECT_TRUE(absl::IsInvalidArgument(inference::BudgetCacheMethod("h2o_think").status()));
}

}  // namespace
}  // namespace dmc
