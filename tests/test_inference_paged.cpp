// The paged inference path: batched decoding over the paged DMC cache under continuous batching
// (admission, preemption) equals the training-mode forward with hard decisions; every head's
// length is its number of appends; a budget too small is refused with a clear error.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <random>

#include "inference/dmc_window.h"
#include "inference/paged_decoder.h"
#include "inference/cpu_engine.h"
#include "inference/scheduler.h"
#include "model/llama.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;
using inference::PagedDecoder;
using inference::PagedKvCache;
using inference::Request;
using model::Llama;
using model::LlamaConfig;

using tiny_models::RandomizeParams;

LlamaConfig DmcConfig(int kv_heads) {
  LlamaConfig c = tiny_models::TinyLlama(11, kv_heads);
  c.dmc.enabled = true;
  c.dmc.window = 3;
  c.dmc.init_val = -0.5f;  // biased towards merging: runs longer than the window
  return c;
}


struct Reference {
  std::vector<int32_t> tokens;  // [B, T]
  std::vector<double> logits;   // [B, T, V]
  std::vector<std::vector<int>> appends;  // [B][layer · Hkv + h]
};

// The training-mode forward with hard decisions over B sequences at once.
template <typename T>
Reference TrainingForward(Llama<T>& m, int B, int T_, uint64_t seed) {
  const LlamaConfig& c = m.config();
  const int Hkv = c.num_key_value_heads;
  Reference ref;
  std::mt19937_64 rng(seed);
  ref.tokens.resize(size_t(B) * T_);
  for (auto& t : ref.tokens) t = static_cast<int32_t>(rng() % c.vocab_size);
  std::vector<int32_t> targets(ref.tokens.size(), -1);
  model::StepOptions hard;
  hard.mode = kernels::DmcDecisionMode::kHard;
  const model::ForwardResult r = m.Forward(ref.tokens.data(), targets.data(), B, T_, hard);
  EXPECT_GT(r.merge_fraction, 0.3) << "the test needs plenty of merges";
  EXPECT_LT(r.merge_fraction, 0.95) << "the test needs some appends";
  ref.logits.assign(m.logits().begin(), m.logits().end());
  ref.appends.assign(B, std::vector<int>(size_t(c.num_hidden_layers) * Hkv, 0));
  for (int b = 0; b < B; ++b)
    for (int l = 0; l < c.num_hidden_layers; ++l)
      for (int h = 0; h < Hkv; ++h)
        for (int t = 0; t < T_; ++t)
          ref.appends[b][l * Hkv + h] +=
              t == 0 || m.merge(l)[(size_t(b) * T_ + t) * Hkv + h] < 0.5 ? 1 : 0;
  return ref;
}

struct RunResult {
  inference::SchedulerStats stats;
  int compared = 0;
};

// Decodes the reference's sequences under continuous batching and compares every logit and, at
// the end of each sequence, every head's length.
template <typename T>
RunResult DecodeAndCompare(Llama<T>& m, const Reference& ref, int B, int T_, int page_size,
                           long budget, int max_batch, double tol) {
  const LlamaConfig& c = m.config();
  const int V = c.vocab_size, Hkv = c.num_key_value_heads;
  auto engine = inference::CpuEngine<T>::Create(m, CachePolicy{}, budget, page_size);
  EXPECT_TRUE(engine.ok()) << engine.status();
  const inference::CpuEngine<T>& e = **engine;
  std::vector<Request> requests(B);
  for (int b = 0; b < B; ++b) {
    requests[b].tokens.assign(ref.tokens.begin() + size_t(b) * T_,
                              ref.tokens.begin() + size_t(b + 1) * T_);
    requests[b].length = T_;
  }
  RunResult out;
  auto stats = inference::RunBatched(
      **engine, requests, max_batch,
      [&](int r, int pos, const inference::TokenOutput&) {
        const T* logits = e.last_logits(r);
        for (int v = 0; v < V; ++v)
          EXPECT_NEAR(logits[v], ref.logits[(size_t(r) * T_ + pos) * V + v], tol)
              << "sequence " << r << " position " << pos;
        ++out.compared;
        return true;
      },
      [&](int r, bool) {
        for (int l = 0; l < c.num_hidden_layers; ++l)
          for (int h = 0; h < Hkv; ++h)
            EXPECT_EQ(e.length(r, l, h), ref.appends[r][l * Hkv + h])
                << "sequence " << r << " layer " << l << " head " << h;
      });
  EXPECT_TRUE(stats.ok()) << stats.status();
  if (stats.ok()) out.stats = *stats;
  EXPECT_EQ(e.num_sequences(), 0);
  EXPECT_EQ(e.used_bytes(), 0) << "pages or window state leaked";
  return out;
}

constexpr long kAmple = 1L << 24;

TEST(InferencePagedDecode, BatchedEqualsTrainingForwardWithHardDecisions) {
  for (int kv_heads : {1, 2, 4})
    for (int page_size : {1, 3, 16}) {
      SCOPED_TRACE(testing::Message() << "kv_heads " << kv_heads << " page_size " << page_size);
      Llama<double> m(DmcConfig(kv_heads), nullptr);
      RandomizeParams(m, 21 + kv_heads);
      const int B = 3, T_ = 24;
      const Reference ref = TrainingForward(m, B, T_, 8);
      const RunResult r = DecodeAndCompare(m, ref, B, T_, page_size, kAmple, 2, 1e-10);
      EXPECT_EQ(r.compared, B * T_);
      EXPECT_EQ(r.stats.max_concurrent, 2);
      EXPECT_EQ(r.stats.preemptions, 0);
    }
}

TEST(InferencePagedDecode, FloatEqualsTrainingForward) {
  Llama<float> m(DmcConfig(2), nullptr);
  RandomizeParams(m, 22);
  const Reference ref = TrainingForward(m, 2, 24, 9);
  EXPECT_EQ(DecodeAndCompare(m, ref, 2, 24, 4, kAmple, 2, 2e-4).compared, 48);
}

// A budget for about one and a half sequences: the scheduler must preempt and recompute, and the
// logits it reports stay those of the training forward.
TEST(InferencePagedDecode, PreemptionUnderATightBudgetKeepsTheLogits) {
  Llama<double> m(DmcConfig(2), nullptr);
  RandomizeParams(m, 23);
  const int B = 4, T_ = 24, page_size = 2;
  const Reference ref = TrainingForward(m, B, T_, 10);
  const LlamaConfig& c = m.config();
  const long page_bytes = page_size * 2 * c.head_dim() * long(sizeof(double));
  long most_pages = 0;
  for (const auto& a : ref.appends) {
    long pages = 0;
    for (int n : a) pages += (n + page_size - 1) / page_size;
    most_pages = std::max(most_pages, pages);
  }
  const long window = long(c.num_hidden_layers) * c.num_key_value_heads *
                      inference::DmcWindow<double>::Bytes(c.dmc.window, c.head_dim());
  const long budget = (most_pages * 3 / 2) * page_bytes + 2 * window;
  const RunResult r = DecodeAndCompare(m, ref, B, T_, page_size, budget, B, 1e-10);
  EXPECT_EQ(r.compared, B * T_);
  EXPECT_GT(r.stats.preemptions, 0);
  EXPECT_GE(r.stats.max_concurrent, 2);
}

TEST(InferenceAdmission, ABudgetTooSmallIsRefusedWithAClearError) {
  Llama<double> m(DmcConfig(2), nullptr);
  RandomizeParams(m, 24);
  const LlamaConfig& c = m.config();
  // Not even the first token (one page per head plus the window state) fits.
  PagedKvCache<double> tiny(inference::CacheOptionsFor(c, CacheMethod::kDmc, 1000, 16));
  const absl::Status refused = tiny.AddSequence(0);
  EXPECT_TRUE(absl::IsResourceExhausted(refused)) << refused;
  EXPECT_NE(refused.message().find("cannot admit sequence 0"), std::string::npos) << refused;
  EXPECT_EQ(tiny.allocator().used_bytes(), 0);

  // A single request longer than the budget can hold: refused mid-way, nothing crashes, and the
  // failing step leaves the cache as it was.
  const int page_size = 2;
  const long page_bytes = page_size * 2 * c.head_dim() * long(sizeof(double));
  const long window = long(c.num_hidden_layers) * c.num_key_value_heads *
                      inference::DmcWindow<double>::Bytes(c.dmc.window, c.head_dim());
  auto small = inference::CpuEngine<double>::Create(m, CachePolicy{}, window + 8 * page_bytes,
                                                    page_size);
  ASSERT_TRUE(small.ok()) << small.status();
  std::vector<Request> requests(1);
  requests[0].tokens.assign(40, 3);
  requests[0].length = 40;
  auto stats = inference::RunBatched(
      **small, requests, 1, [](int, int, const inference::TokenOutput&) { return true; },
      [](int, bool) {});
  ASSERT_FALSE(stats.ok());
  EXPECT_TRUE(absl::IsResourceExhausted(stats.status())) << stats.status();
  EXPECT_NE(stats.status().message().find("does not fit the KV cache even alone"),
            std::string::npos)
      << stats.status();
  const PagedKvCache<double>& cache = (*small)->cache();
  ASSERT_TRUE(cache.contains(0));
  const int fed = cache.tokens(0);
  const long slots = cache.total_slots(0);
  std::vector<inference::TokenOutput> outs;
  const int32_t token = 3;
  EXPECT_TRUE(absl::IsResourceExhausted((*small)->Step({0}, &token, nullptr, &outs)));
  EXPECT_EQ(cache.tokens(0), fed);
  EXPECT_EQ(cache.total_slots(0), slots);
}

TEST(InferenceAdmission, EvictionPolicyNeedsAValidBudget) {
  Llama<double> m(DmcConfig(2), nullptr);
  PagedKvCache<double> cache(
      inference::CacheOptionsFor(m.config(), CacheMethod::kH2O, kAmple, 16));
  CachePolicy p{CacheMethod::kH2O, 4, 4};
  auto d = PagedDecoder<double>::Create(m, p, &cache);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("recent window below it"), std::string::npos) << d.status();
  // A dmc-shaped cache (with window state) does not fit the h2o method.
  PagedKvCache<double> dmc_cache(
      inference::CacheOptionsFor(m.config(), CacheMethod::kDmc, kAmple, 16));
  auto wrong = PagedDecoder<double>::Create(m, CachePolicy{CacheMethod::kH2O, 4, 2}, &dmc_cache);
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("does not fit"), std::string::npos) << wrong.status();
}

}  // namespace
}  // namespace dmc

namespace dmc {
namespace {

// Parallel prefill of a prompt, then token-by-token decoding: the prompt's logits, the cache
// (every head's length) and the continuation's logits all equal the training-mode forward with
// hard decisions over the whole sequence — i.e. what feeding every token one by one gives.
TEST(InferencePrefill, ParallelPrefillThenDecodeEqualsTrainingForward) {
  for (int kv_heads : {1, 2, 4}) {
    Llama<double> m(DmcConfig(kv_heads), nullptr);
    RandomizeParams(m, 40 + kv_heads);
    const int T_ = 23, P = 14, V = m.config().vocab_size, Hkv = kv_heads;
    const Reference ref = TrainingForward(m, 1, T_, 7 + kv_heads);
    PagedKvCache<double> cache(
        inference::CacheOptionsFor(m.config(), CacheMethod::kDmc, 1L << 24, 3));
    ASSERT_TRUE(cache.AddSequence(0).ok());
    const std::vector<int32_t> prompt(ref.tokens.begin(), ref.tokens.begin() + P);
    absl::StatusOr<std::vector<double>> logits =
        inference::Prefill(m, CacheMethod::kDmc, &cache, 0, prompt);
    ASSERT_TRUE(logits.ok()) << logits.status();
    ASSERT_EQ(logits->size(), size_t(P) * V);
    for (size_t i = 0; i < logits->size(); ++i)
      EXPECT_NEAR((*logits)[i], ref.logits[i], 1e-10) << "prompt logit " << i;
    EXPECT_EQ(cache.tokens(0), P);

    auto decoder = PagedDecoder<double>::Create(m, CachePolicy{}, &cache);
    ASSERT_TRUE(decoder.ok()) << decoder.status();
    std::vector<double> step;
    for (int t = P; t < T_; ++t) {
      ASSERT_TRUE((*decoder)->Step({0}, &ref.tokens[t], &step).ok());
      for (int v = 0; v < V; ++v)
        EXPECT_NEAR(step[v], ref.logits[size_t(t) * V + v], 1e-10) << "position " << t;
    }
    for (int l = 0; l < m.config().num_hidden_layers; ++l)
      for (int h = 0; h < Hkv; ++h)
        EXPECT_EQ(cache.length(0, l, h), ref.appends[0][l * Hkv + h]) << "layer " << l;
  }
}

// The prefill budget: every step prefills at most prefill_tokens_per_step prompt tokens (a prompt
// that the rest of the budget does not hold goes on in chunks), and the generated tokens are
// those of an unbounded run (the budget moves admissions, never what a sequence computes).
// Request 0 runs throughout; requests 1.. finish in pairs, so pairs of places open at once.
TEST(InferenceAdmission, PrefillBudgetBoundsThePromptsBetweenSteps) {
  Llama<double> m(DmcConfig(2), nullptr);
  RandomizeParams(m, 17);
  const int P = 6, V = m.config().vocab_size;
  std::mt19937_64 rng(5);
  std::vector<Request> requests(7);
  for (size_t r = 0; r < requests.size(); ++r) {
    for (int t = 0; t < P; ++t) requests[r].tokens.push_back(static_cast<int32_t>(rng() % V));
    requests[r].length = r == 0 ? P + 24 : P + 3;
    requests[r].prefill = true;
  }
  struct Outcome {
    std::vector<std::vector<int32_t>> tokens;
    std::map<long, int> prefills_after_step;  // steps done -> prompts prefilled then
    long most_prefilled = 0;                   // prompt tokens of one StepOnce, at most
  };
  auto run = [&](long budget) {
    auto engine = inference::CpuEngine<double>::Create(m, CachePolicy{}, kAmple, 4);
    EXPECT_TRUE(engine.ok()) << engine.status();
    inference::Scheduler scheduler(**engine, 3, budget);
    for (const Request& r : requests) EXPECT_TRUE(scheduler.Submit(r).ok());
    Outcome o;
    o.tokens.resize(requests.size());
    while (!scheduler.idle()) {
      const long before = scheduler.stats().prefill_tokens;
      const absl::Status s = scheduler.StepOnce(
          [&](int r, int pos, const inference::TokenOutput&) {
            if (pos == P - 1) ++o.prefills_after_step[scheduler.stats().steps];
            return true;
          },
          [&](int r, bool) { o.tokens[r] = scheduler.request(r).tokens; });
      EXPECT_TRUE(s.ok()) << s;
      if (!s.ok()) break;
      o.most_prefilled = std::max(o.most_prefilled, scheduler.stats().prefill_tokens - before);
    }
    EXPECT_EQ(scheduler.stats().prefill_tokens, static_cast<long>(requests.size()) * P);
    return o;
  };
  const Outcome unbounded = run(0), bounded = run(P + 1);
  EXPECT_EQ(bounded.tokens, unbounded.tokens);
  bool pair_unbounded = false, later_bounded = false;
  for (const auto& [steps, n] : unbounded.prefills_after_step) pair_unbounded |= steps > 0 && n > 1;
  for (const auto& [steps, n] : bounded.prefills_after_step) later_bounded |= steps > 0;
  EXPECT_TRUE(pair_unbounded) << "the test needs two places opening at once";
  EXPECT_TRUE(later_bounded) << "the test needs admissions while request 0 runs";
  EXPECT_GT(unbounded.most_prefilled, P + 1) << "the test needs steps the budget bounds";
  EXPECT_LE(bounded.most_prefilled, P + 1);
  for (size_t r = 0; r < requests.size(); ++r)
    EXPECT_EQ(bounded.tokens[r].size(), static_cast<size_t>(requests[r].length))
        << "request " << r << " generated every token";
}

TEST(InferencePrefill, RefusesWhatItCannotServe) {
  Llama<double> m(DmcConfig(2), nullptr);
  RandomizeParams(m, 3);
  const std::vector<int32_t> prompt(60, 1);
  // Room for a few pages per head (and the window state) cannot hold 60 tokens in pages of 4
  // slots if none merge.
  const auto options = inference::CacheOptionsFor(m.config(), CacheMethod::kDmc, 0, 4);
  PagedKvCache<double> probe(options);
  const long small = static_cast<long>(2) * 2 * 2 * probe.page_bytes() + (1L << 12);
  PagedKvCache<double> cache(inference::CacheOptionsFor(m.config(), CacheMethod::kDmc, small, 4));
  ASSERT_TRUE(cache.AddSequence(0).ok());
  absl::StatusOr<std::vector<double>> r = inference::Prefill(m, CacheMethod::kDmc, &cache, 0, prompt);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_EQ(cache.tokens(0), 0) << "a refused prefill changes nothing";
  EXPECT_EQ(cache.total_slots(), 0);

  r = inference::Prefill(m, CacheMethod::kH2O, &cache, 0, prompt);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  r = inference::Prefill(m, CacheMethod::kDmc, &cache, 1, prompt);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
}

}  // namespace
}  // namespace dmc
