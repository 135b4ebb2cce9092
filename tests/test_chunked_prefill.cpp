// Chunked prefill on the CPU engine (DecodeEngine::Prefill of a sequence that already holds
// tokens): a prompt prefilled in chunks of any sizes equals the whole prompt prefilled at once
// and the prompt fed token by token through Step, for the dmc, dms and vanilla caches: the same
// slots per head, the same cache contents (keys, values, positions), the same next-token logits
// and choice, and decoding after it goes on the same (DMC's window state and DMS's marks carried).
// The scheduler then prefills long prompts in chunks between decode steps without changing what
// any sequence generates. The GPU engine's chunk attention has its reference checked here too.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include "inference/cpu_engine.h"
#include "kernels/chunk_attention.h"
#include "kernels/decode_attention.h"
#include "inference/scheduler.h"
#include "model/llama.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;
using inference::CpuEngine;
using inference::TokenOutput;
using model::Llama;
using model::LlamaConfig;

constexpr long kAmple = 1L << 26;
constexpr int kPrompt = 150, kDecoded = 6;

// A tiny model of 160 positions whose compression (if any) keeps the test honest: DMC merges
// runs longer than its window of 3, DMS (the adapter) marks about half of its tokens (window 3).
LlamaConfig ConfigFor(CacheMethod method, int kv_heads) {
  LlamaConfig c = tiny_models::TinyLlama(11, kv_heads);
  c.max_position_embeddings = 160;
  if (method == CacheMethod::kDmc) {
    c.dmc.enabled = true;
    c.dmc.window = 3;
    c.dmc.init_val = -0.5f;
  } else if (method == CacheMethod::kDms) {
    c.dms.enabled = true;
    c.dms.variant = model::DmsVariant::kAdapter;
    c.dms.window = 3;
    c.dms.offset = 0.2f;
  }
  return c;
}

// What a sequence left in the engine: every head's slots (key, value, position) and the last
// output and logits.
struct Snapshot {
  std::vector<int> lengths;
  std::vector<double> keys, values;
  std::vector<int32_t> positions;
  TokenOutput out;
  std::vector<double> logits;
};

Snapshot Take(const CpuEngine<double>& engine, int seq, const TokenOutput& out) {
  const LlamaConfig& c = engine.config();
  const int D = c.head_dim();
  Snapshot s;
  std::vector<double> k(D), v(D);
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int h = 0; h < c.num_key_value_heads; ++h) {
      const int n = engine.length(seq, l, h);
      s.lengths.push_back(n);
      for (int i = 0; i < n; ++i) {
        engine.cache().ReadSlot(seq, l, h, i, k.data(), v.data());
        s.keys.insert(s.keys.end(), k.begin(), k.end());
        s.values.insert(s.values.end(), v.begin(), v.end());
        s.positions.push_back(engine.cache().position(seq, l, h, i));
      }
    }
  s.out = out;
  s.logits.assign(engine.last_logits(seq), engine.last_logits(seq) + c.vocab_size);
  return s;
}

void ExpectSame(const Snapshot& got, const Snapshot& want, const std::string& what) {
  ASSERT_EQ(got.lengths, want.lengths) << what << ": slots per head";
  EXPECT_EQ(got.positions, want.positions) << what << ": slot positions";
  ASSERT_EQ(got.keys.size(), want.keys.size()) << what;
  for (size_t i = 0; i < got.keys.size(); ++i) {
    ASSERT_NEAR(got.keys[i], want.keys[i], 1e-10) << what << ": key element " << i;
    ASSERT_NEAR(got.values[i], want.values[i], 1e-10) << what << ": value element " << i;
  }
  for (size_t i = 0; i < got.logits.size(); ++i)
    ASSERT_NEAR(got.logits[i], want.logits[i], 1e-10) << what << ": logit " << i;
  EXPECT_EQ(got.out.argmax, want.out.argmax) << what;
  EXPECT_EQ(got.out.next, want.out.next) << what;
  EXPECT_NEAR(got.out.logprob, want.out.logprob, 1e-9) << what;
}

struct Case {
  CacheMethod method;
  int kv_heads;
};

class ChunkedPrefill : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override {
    model_ = std::make_unique<Llama<double>>(ConfigFor(GetParam().method, GetParam().kv_heads),
                                             nullptr);
    tiny_models::RandomizeParams(*model_, 40 + GetParam().kv_heads);
    tokens_ = tiny_models::RandomTokens(kPrompt + kDecoded, 11, 7);
  }
  std::unique_ptr<CpuEngine<double>> Engine() {
    auto engine =
        CpuEngine<double>::Create(*model_, CachePolicy{GetParam().method}, kAmple, 4);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return *std::move(engine);
  }
  // Feeds the prompt by `chunks` (sizes; 0: one token through Step), then decodes kDecoded
  // tokens; returns the snapshot after the prompt and after decoding.
  std::pair<Snapshot, Snapshot> Feed(const std::vector<int>& chunks) {
    auto engine = Engine();
    EXPECT_TRUE(engine->AddSequence(0, {}).ok());
    TokenOutput out;
    int fed = 0;
    for (int n : chunks) {
      if (n == 0) {
        std::vector<TokenOutput> outs;
        const absl::Status s = engine->Step({0}, &tokens_[fed], nullptr, &outs);
        EXPECT_TRUE(s.ok()) << s;
        out = outs[0];
        ++fed;
      } else {
        const std::vector<int32_t> chunk(tokens_.begin() + fed, tokens_.begin() + fed + n);
        const absl::Status s = engine->Prefill(0, chunk, -1, &out);
        EXPECT_TRUE(s.ok()) << s;
        fed += n;
      }
      EXPECT_EQ(engine->tokens(0), fed);
    }
    EXPECT_EQ(fed, kPrompt);
    const Snapshot prompt = Take(*engine, 0, out);
    std::vector<TokenOutput> outs;
    for (int t = kPrompt; t < kPrompt + kDecoded; ++t)
      EXPECT_TRUE(engine->Step({0}, &tokens_[t], nullptr, &outs).ok());
    return {prompt, Take(*engine, 0, outs[0])};
  }

  std::unique_ptr<Llama<double>> model_;
  std::vector<int32_t> tokens_;
};

// Chunks of `size` tokens (the last one shorter).
std::vector<int> Chunks(int size) {
  std::vector<int> c;
  for (int fed = 0; fed < kPrompt; fed += size) c.push_back(std::min(size, kPrompt - fed));
  return c;
}

TEST_P(ChunkedPrefill, EqualsWholePromptAndTokenByToken) {
  const auto token_by_token = Feed(std::vector<int>(kPrompt, 0));
  // The decisions must matter: some heads compress, none to nothing.
  if (GetParam().method != CacheMethod::kVanilla) {
    const int slots = std::accumulate(token_by_token.first.lengths.begin(),
                                      token_by_token.first.lengths.end(), 0);
    const int heads = static_cast<int>(token_by_token.first.lengths.size());
    EXPECT_LT(slots, heads * kPrompt * 3 / 4) << "the test needs plenty of merges or evictions";
    EXPECT_GT(slots, heads * kPrompt / 10) << "the test needs slots that stay";
  }
  const std::map<std::string, std::vector<int>> splits = {
      {"whole", {kPrompt}},
      {"chunks of 1", Chunks(1)},
      {"chunks of 7", Chunks(7)},
      {"chunks of 64", Chunks(64)},
      {"uneven", {5, 1, 33, 2, 64, 3, 42}},
      {"first token alone", {1, 149}},
      {"steps between chunks", {9, 0, 0, 17, 0, 50, 0, 0, 0, 68}},
  };
  for (const auto& [name, chunks] : splits) {
    const auto got = Feed(chunks);
    ExpectSame(got.first, token_by_token.first, name + ", after the prompt");
    ExpectSame(got.second, token_by_token.second, name + ", after decoding on");
  }
}

// A chunk that may not fit is refused with nothing changed; H2O and TOVA, which evict by each
// step's attention, have no parallel prefill and refuse a chunk by name; so does the vanilla
// cache of a DMC model.
TEST_P(ChunkedPrefill, RefusesWhatItCannotServe) {
  const LlamaConfig& c = model_->config();
  const auto options = inference::CacheOptionsFor(c, CachePolicy{GetParam().method}, kAmple, 4);
  const long heads = static_cast<long>(c.num_hidden_layers) * c.num_key_value_heads;
  // Admission, the first chunk of 8 tokens (2 pages per head) and one page per head to spare.
  const long budget = inference::KvReservedBytes(options, 8, 8) +
                      3 * heads * inference::KvPageBytes<double>(options);
  auto engine = CpuEngine<double>::Create(*model_, CachePolicy{GetParam().method}, budget, 4);
  ASSERT_TRUE(engine.ok()) << engine.status();
  ASSERT_TRUE((*engine)->AddSequence(0, {}).ok());
  TokenOutput out;
  ASSERT_TRUE((*engine)->Prefill(0, {tokens_.begin(), tokens_.begin() + 8}, -1, &out).ok());
  const long used = (*engine)->used_bytes();
  const absl::Status s = (*engine)->Prefill(0, {tokens_.begin() + 8, tokens_.begin() + 40}, -1, &out);
  EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
  EXPECT_EQ((*engine)->tokens(0), 8);
  EXPECT_EQ((*engine)->used_bytes(), used);
  const absl::Status past = (*engine)->Prefill(0, std::vector<int32_t>(153, 1), -1, &out);
  EXPECT_TRUE(absl::IsInvalidArgument(past)) << past;

  if (GetParam().method == CacheMethod::kDmc) {
    // The vanilla cache of a DMC model: its training forward would merge, so no prefill at all.
    auto v = CpuEngine<double>::Create(*model_, CachePolicy{CacheMethod::kVanilla}, kAmple, 4);
    ASSERT_TRUE(v.ok()) << v.status();
    EXPECT_FALSE((*v)->parallel_prefill());
    ASSERT_TRUE((*v)->AddSequence(0, {}).ok());
    const absl::Status refused = (*v)->Prefill(0, {tokens_.begin(), tokens_.begin() + 8}, -1, &out);
    EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
    EXPECT_EQ((*v)->tokens(0), 0);
  }
  if (GetParam().method != CacheMethod::kVanilla) return;
  for (CacheMethod evicting : {CacheMethod::kH2O, CacheMethod::kTova}) {
    CachePolicy policy{evicting};
    policy.budget = 8;
    policy.recent = 2;
    auto h = CpuEngine<double>::Create(*model_, policy, kAmple, 4);
    ASSERT_TRUE(h.ok()) << h.status();
    EXPECT_FALSE((*h)->chunked_prefill());
    ASSERT_TRUE((*h)->AddSequence(0, {}).ok());
    std::vector<TokenOutput> outs;
    ASSERT_TRUE((*h)->Step({0}, tokens_.data(), nullptr, &outs).ok());
    const absl::Status refused = (*h)->Prefill(0, {tokens_[1], tokens_[2]}, -1, &out);
    EXPECT_TRUE(absl::IsInvalidArgument(refused)) << refused;
    EXPECT_NE(refused.message().find("token by token"), std::string::npos) << refused;
  }
}

// The scheduler prefills prompts longer than prefill_tokens_per_step in chunks over successive
// steps, between decode steps of the running sequences: no StepOnce prefills more than the
// budget, prompts are under way while others decode, and every request generates (greedy) what
// it generates with whole prompts.
TEST_P(ChunkedPrefill, SchedulerChunksLongPromptsBetweenDecodeSteps) {
  const int V = model_->config().vocab_size;
  std::vector<inference::Request> requests(6);
  for (size_t r = 0; r < requests.size(); ++r) {
    const int P = r == 0 ? 3 : 30 + 7 * static_cast<int>(r);
    requests[r].tokens = tiny_models::RandomTokens(P, V, 100 + r);
    requests[r].length = P + (r == 0 ? 40 : 5);
    requests[r].prefill = true;
  }
  struct Outcome {
    std::vector<std::vector<int32_t>> tokens;
    long most_prefilled = 0;       // prompt tokens of one StepOnce, at most
    bool chunks_between_steps = false;  // a prompt under way across a decode step
  };
  auto run = [&](long budget) {
    auto engine = Engine();
    EXPECT_TRUE(engine->chunked_prefill());
    inference::Scheduler scheduler(*engine, 3, budget);
    for (const inference::Request& r : requests) EXPECT_TRUE(scheduler.Submit(r).ok());
    Outcome o;
    o.tokens.resize(requests.size());
    std::vector<int> under_way;  // requests whose prompt is partly prefilled
    while (!scheduler.idle()) {
      const long prefilled = scheduler.stats().prefill_tokens, steps = scheduler.stats().steps;
      const absl::Status s = scheduler.StepOnce(
          [](int, int, const TokenOutput&) { return true; },
          [&](int r, bool) { o.tokens[r] = scheduler.request(r).tokens; });
      EXPECT_TRUE(s.ok()) << s;
      if (!s.ok()) break;
      o.most_prefilled = std::max(o.most_prefilled, scheduler.stats().prefill_tokens - prefilled);
      std::vector<int> now;
      for (size_t r = 0; r < requests.size(); ++r)
        if (engine->contains(r) && engine->tokens(r) < static_cast<int>(requests[r].tokens.size()))
          now.push_back(r);
      for (int r : now)
        if (std::count(under_way.begin(), under_way.end(), r) && scheduler.stats().steps > steps)
          o.chunks_between_steps = true;
      under_way = now;
    }
    return o;
  };
  const Outcome whole = run(0);
  for (long budget : {16L, 7L}) {
    const Outcome chunked = run(budget);
    EXPECT_EQ(chunked.tokens, whole.tokens) << "budget " << budget;
    EXPECT_LE(chunked.most_prefilled, budget);
    EXPECT_TRUE(chunked.chunks_between_steps) << "budget " << budget;
  }
  EXPECT_GT(whole.most_prefilled, 16) << "the test needs prompts longer than the budget";
  for (size_t r = 0; r < requests.size(); ++r)
    EXPECT_EQ(whole.tokens[r].size(), static_cast<size_t>(requests[r].length)) << "request " << r;
}

struct AdmissionRun {
  std::vector<std::vector<int32_t>> tokens;  // each request's, when it finished
  inference::SchedulerStats stats;
};

// Runs `requests` to their ends on a CPU engine of m with pages of 4 slots and a budget of
// `pages` pages a head beside 8 sequences' reserved bytes; every page must come back.
AdmissionRun RunUnderBudget(Llama<double>& m, CacheMethod method,
                            const std::vector<inference::Request>& requests, long pages,
                            long prefill_budget, long piece) {
  auto probe = CpuEngine<double>::Create(m, CachePolicy{method}, kAmple, 4);
  EXPECT_TRUE(probe.ok()) << probe.status();
  const inference::PagedCacheOptions& o = (*probe)->cache_options();
  const long budget =
      pages * o.layers * o.kv_heads * inference::KvPageBytes(o, (*probe)->element_bytes()) +
      8 * inference::KvReservedBytes(o, (*probe)->element_bytes(), (*probe)->state_element_bytes());
  auto engine = CpuEngine<double>::Create(m, CachePolicy{method}, budget, 4);
  EXPECT_TRUE(engine.ok()) << engine.status();
  inference::Scheduler scheduler(**engine, 64, prefill_budget, piece);
  for (const inference::Request& r : requests) EXPECT_TRUE(scheduler.Submit(r).ok());
  AdmissionRun run;
  run.tokens.resize(requests.size());
  while (!scheduler.idle()) {
    const absl::Status s = scheduler.StepOnce(
        [](int, int, const TokenOutput&) { return true; },
        [&](int r, bool) { run.tokens[r] = scheduler.request(r).tokens; });
    EXPECT_TRUE(s.ok()) << s;
    if (!s.ok()) break;
  }
  EXPECT_EQ((*engine)->used_bytes(), 0) << "pages leaked";
  run.stats = scheduler.stats();
  return run;
}

// Under a budget that binds, a prompt that goes in by chunks (a prefill budget) or by pieces (a
// whole prompt the engine refuses at its worst case) is admitted at one chunk's or piece's worst
// case and its rest at the running sequences' kept fraction (Scheduler, Admission), where a
// prompt prefilled whole needs its whole worst case free. A DMC model that merges nearly every
// token then runs more sequences at once, every request generates the same, and every page comes
// back; a vanilla model keeps every token, so its admission does not change.
TEST(ChunkedPrefillAdmission, CompressedPromptsAreAdmittedAtTheKeptFraction) {
  std::vector<inference::Request> requests(32);
  for (size_t r = 0; r < requests.size(); ++r) {
    requests[r].tokens = tiny_models::RandomTokens(64, ConfigFor(CacheMethod::kDmc, 2).vocab_size,
                                                   300 + r);
    requests[r].length = 160;
    requests[r].prefill = true;
  }
  for (CacheMethod method : {CacheMethod::kDmc, CacheMethod::kVanilla}) {
    SCOPED_TRACE(inference::CacheMethodName(method));
    LlamaConfig c = ConfigFor(method, 2);
    c.dmc.init_val = -4.0f;  // a = k[D-1] + 4: nearly every token merges
    Llama<double> m(c, nullptr);
    tiny_models::RandomizeParams(m, 17);
    // Pieces 0: none, every prompt at its whole worst case.
    const AdmissionRun whole = RunUnderBudget(m, method, requests, 48, 0, 0),
                       pieces = RunUnderBudget(m, method, requests, 48, 0, 16),
                       chunked = RunUnderBudget(m, method, requests, 48, 32, 0);
    EXPECT_EQ(pieces.tokens, whole.tokens);
    EXPECT_EQ(chunked.tokens, whole.tokens);
    for (size_t r = 0; r < requests.size(); ++r)
      EXPECT_EQ(whole.tokens[r].size(), 160u) << "request " << r;
    EXPECT_EQ(whole.stats.pieced_prompts, 0);
    if (method == CacheMethod::kDmc) {
      EXPECT_GT(pieces.stats.pieced_prompts, 0) << "the test needs prompts refused whole";
      EXPECT_GT(pieces.stats.max_concurrent, whole.stats.max_concurrent);
      EXPECT_GT(chunked.stats.max_concurrent, whole.stats.max_concurrent);
    } else {
      EXPECT_LE(pieces.stats.max_concurrent, whole.stats.max_concurrent);
      EXPECT_LE(chunked.stats.max_concurrent, whole.stats.max_concurrent);
    }
  }
}

// The kept fraction is the running sequences': a prompt whose own cache keeps more can be
// refused for memory partway through its pieces. It is queued again and admitted only at its
// whole worst case, so each request is refused at most once; re-admitted at the kept fraction it
// was refused round after round (23 refusals of 16 requests here), its pieces redone each time.
TEST(ChunkedPrefillAdmission, APromptRefusedAfterAdmissionWaitsForItsWorstCase) {
  Llama<double> m(ConfigFor(CacheMethod::kDmc, 2), nullptr);
  tiny_models::RandomizeParams(m, 17);
  // Token 2 repeated merges nearly always (~2% of the tokens kept), token 0 about every other.
  std::vector<inference::Request> requests(16);
  for (size_t r = 0; r < requests.size(); ++r) {
    requests[r].tokens = std::vector<int32_t>(96, r < 8 ? 2 : 0);
    requests[r].length = r < 8 ? 160 : 100;
    requests[r].prefill = true;
  }
  const AdmissionRun whole = RunUnderBudget(m, CacheMethod::kDmc, requests, 20, 0, 0),
                     pieces = RunUnderBudget(m, CacheMethod::kDmc, requests, 20, 0, 16);
  EXPECT_EQ(pieces.tokens, whole.tokens);
  EXPECT_EQ(whole.stats.refused_prompts, 0);
  EXPECT_GT(pieces.stats.refused_prompts, 0) << "the test needs a prompt refused after admission";
  EXPECT_LE(pieces.stats.refused_prompts, static_cast<long>(requests.size()));
}

// The chunk attention's reference (kernels/chunk_attention.h, which the GPU engine's chunked
// prefill computes) is the decode attention of each query over exactly the keys it sees: its
// prefix of cached slots and the chunk's keys i <= t that the hard mask leaves visible.
TEST(ChunkAttention, EachQueryIsADecodeOverTheKeysItSees) {
  const int n = 9, H = 4, Hkv = 2, D = 8, page = 4, max_pages = 5;
  const float scale = 0.35f;
  std::mt19937_64 rng(11);
  std::normal_distribution<float> normal(0.f, 1.f);
  auto random = [&](size_t count) {
    std::vector<float> x(count);
    for (float& e : x) e = normal(rng);
    return x;
  };
  const int pages = Hkv * max_pages;
  const std::vector<float> k_pool = random(size_t(pages) * page * D), v_pool = random(k_pool.size());
  const std::vector<float> q = random(size_t(n) * H * D), k = random(size_t(n) * Hkv * D);
  const std::vector<float> v = random(k.size());
  std::vector<int32_t> table(pages);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), rng);
  std::vector<int> prefix(size_t(n) * Hkv);
  for (int t = 0; t < n; ++t) prefix[t * Hkv] = 13, prefix[t * Hkv + 1] = t % 3 == 0 ? 0 : 7;
  std::vector<float> mask(size_t(n) * Hkv);
  for (float& m : mask) m = rng() % 2 ? -50000.f : 0.f;
  for (bool exclude : {false, true}) {
    std::vector<float> got(q.size());
    kernels::chunk_attention(got.data(), q.data(), k_pool.data(), v_pool.data(), table.data(),
                             max_pages, page, prefix.data(), k.data(), v.data(), mask.data(), n, H,
                             Hkv, D, exclude, scale);
    for (int t = 0; t < n; ++t) {
      // The keys query t sees, one slot per page of one slot.
      std::vector<float> keys, values;
      std::vector<int32_t> slots;
      std::vector<int> lengths(Hkv, 0);
      const int most = max_pages * page + n;
      for (int h = 0; h < Hkv; ++h) {
        auto add = [&](const float* key, const float* value) {
          slots.push_back(static_cast<int32_t>(keys.size() / D));
          keys.insert(keys.end(), key, key + D);
          values.insert(values.end(), value, value + D);
          ++lengths[h];
        };
        for (int j = 0; j < prefix[t * Hkv + h]; ++j) {
          const long row = static_cast<long>(table[h * max_pages + j / page]) * page + j % page;
          add(k_pool.data() + row * D, v_pool.data() + row * D);
        }
        for (int i = 0; i <= t; ++i)
          if (i == t || mask[i * Hkv + h] == 0.f)
            add(k.data() + (size_t(i) * Hkv + h) * D, v.data() + (size_t(i) * Hkv + h) * D);
        slots.resize(size_t(h + 1) * most, 0);
      }
      std::vector<float> want(size_t(H) * D);
      kernels::paged_decode_attention(want.data(), static_cast<float*>(nullptr), 0,
                                      q.data() + size_t(t) * H * D, keys.data(), values.data(),
                                      slots.data(), lengths.data(), most, 1, 1, H, Hkv, D,
                                      exclude, scale);
      for (int i = 0; i < H * D; ++i)
        ASSERT_NEAR(got[size_t(t) * H * D + i], want[i], 1e-5) << "query " << t << " element " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, ChunkedPrefill,
                         ::testing::Values(Case{CacheMethod::kDmc, 1}, Case{CacheMethod::kDmc, 2},
                                           Case{CacheMethod::kDms, 2}, Case{CacheMethod::kDms, 4},
                                           Case{CacheMethod::kVanilla, 2}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(inference::CacheMethodName(info.param.method)) +
                                  "_kv" + std::to_string(info.param.kv_heads);
                         });

}  // namespace
}  // namespace dmc
