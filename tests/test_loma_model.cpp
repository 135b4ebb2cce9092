// LoMA in the whole model (model/loma.h): the window transform, the two-term loss and its
// gradient through every parameter, the vocabulary extension, and LoMA decoding on the CPU
// engine (the loma cache method) against the training-layout forward.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "inference/cpu_engine.h"
#include "model/llama.h"
#include "tests/tiny_models.h"
#include "model/loma.h"
#include "tests/gradcheck.h"

namespace dmc {
namespace {

using model::Llama;
using model::LlamaConfig;
using model::LomaLayout;

constexpr int kBaseVocab = 9;

using tiny_models::RandomizeParams;

LlamaConfig BaseConfig(int kv_heads = 2, bool tied = false) {
  return tiny_models::TinyLlama(kBaseVocab, kv_heads, tied);
}


// A window of text tokens with next-token targets (the last target is the token after it).
void RandomWindow(int B, int n, uint64_t seed, std::vector<int32_t>* tokens,
                  std::vector<int32_t>* targets) {
  std::mt19937_64 rng(seed);
  tokens->resize(size_t(B) * n);
  targets->resize(tokens->size());
  for (int b = 0; b < B; ++b) {
    std::vector<int32_t> seq(n + 1);
    for (auto& x : seq) x = static_cast<int32_t>(rng() % kBaseVocab);
    for (int j = 0; j < n; ++j) {
      (*tokens)[size_t(b) * n + j] = seq[j];
      (*targets)[size_t(b) * n + j] = seq[j + 1];
    }
  }
}

LomaLayout Layout(int t, int c) {
  absl::StatusOr<LomaLayout> layout = model::MakeLomaLayout(kBaseVocab, t, c);
  EXPECT_TRUE(layout.ok()) << layout.status();
  return *layout;
}

TEST(LomaTransform, LaysOutReadingMemoryAndRepetitionZones) {
  const LomaLayout layout = Layout(1, 2);  // chunk: 2 reading, 1 <m>, 2 <r>
  const std::vector<int32_t> tokens = {3, 4, 5, 6}, targets = {4, 5, 6, 7};
  absl::StatusOr<model::LomaBatch> batch =
      model::LomaTransform(layout, tokens.data(), targets.data(), 1, 4);
  ASSERT_TRUE(batch.ok()) << batch.status();
  const int m = kBaseVocab, r = kBaseVocab + 1;
  EXPECT_EQ(batch->seq_len, 10);
  EXPECT_EQ(batch->tokens, (std::vector<int32_t>{3, 4, m, r, r, 5, 6, m, r, r}));
  EXPECT_EQ(batch->targets, (std::vector<int32_t>{4, 5, -1, 3, 4, 6, 7, -1, 5, 6}));
}

TEST(LomaTransform, RejectsBadShapesWithAClearMessage) {
  const std::vector<int32_t> tokens(6, 1);
  absl::StatusOr<model::LomaBatch> partial =
      model::LomaTransform(Layout(2, 2), tokens.data(), tokens.data(), 1, 6);
  ASSERT_FALSE(partial.ok());
  EXPECT_NE(std::string(partial.status().message()).find("multiple of t·c = 4"), std::string::npos)
      << partial.status();
  EXPECT_FALSE(model::MakeLomaLayout(kBaseVocab, 0, 4).ok());
  EXPECT_FALSE(model::MakeLomaLayout(kBaseVocab, 2, 0).ok());

  LlamaConfig config = BaseConfig();
  config.vocab_size += 2;
  Llama<double> m(config, nullptr);
  model::StepOptions opt;
  opt.loma = {2, 2};
  const std::vector<int32_t> eleven(11, 1);
  EXPECT_THROW(m.Forward(eleven.data(), eleven.data(), 1, 11, opt), std::invalid_argument);
}

struct GradCase {
  int kv_heads;
  bool tied;
  int t, c;
};

class LomaModelGradient : public ::testing::TestWithParam<GradCase> {};

// d(L_read + L_rep)/d(params) against central differences, on a sample of every tensor.
TEST_P(LomaModelGradient, MatchesFiniteDifferences) {
  const GradCase gc = GetParam();
  LlamaConfig config = BaseConfig(gc.kv_heads, gc.tied);
  config.vocab_size += 2;
  Llama<double> m(config, nullptr);
  RandomizeParams(m, 7);
  const LomaLayout layout = Layout(gc.t, gc.c);
  const int B = 2, n = 2 * layout.zones.segment();
  std::vector<int32_t> tokens, targets;
  RandomWindow(B, n, 1, &tokens, &targets);
  targets[1] = -1;  // an unlabelled reading position
  absl::StatusOr<model::LomaBatch> batch =
      model::LomaTransform(layout, tokens.data(), targets.data(), B, n);
  ASSERT_TRUE(batch.ok()) << batch.status();
  model::StepOptions opt;
  opt.loma = layout.zones;
  const int T = batch->seq_len;

  const model::ForwardResult r = m.Forward(batch->tokens.data(), batch->targets.data(), B, T, opt);
  EXPECT_GT(r.lm_loss, 0.0);
  EXPECT_GT(r.rep_loss, 0.0);
  EXPECT_DOUBLE_EQ(r.loss, r.lm_loss + r.rep_loss);
  m.ZeroGrad();
  m.Backward();
  std::vector<double> analytic = m.grads();
  auto loss = [&] {
    return m.Forward(batch->tokens.data(), batch->targets.data(), B, T, opt).loss;
  };
  std::mt19937_64 rng(3);
  for (const auto& s : m.param_specs()) {
    std::vector<size_t> idx;
    for (int i = 0; i < 6; ++i) idx.push_back(s.offset + rng() % s.size);
    if (s.name.find("embed_tokens") != std::string::npos) {
      // the rows of <m> and <r>: they only get gradient through the LoMA layout
      const int64_t C = s.shape[1];
      idx.push_back(s.offset + kBaseVocab * C + 1);
      idx.push_back(s.offset + (kBaseVocab + 1) * C + 2);
    }
    testing::expect_gradient_matches(loss, m.params(), analytic, s.name.c_str(), idx, 1e-6,
                                     1e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, LomaModelGradient,
                         ::testing::Values(GradCase{2, false, 2, 2}, GradCase{4, true, 1, 4},
                                           GradCase{1, false, 3, 1}));

// Each loss term is the mean of its own zone: scaling the number of labelled positions of one
// zone does not change the other, and the memory zone carries no loss.
TEST(LomaLoss, ReportsReadingAndRepetitionSeparately) {
  const kernels::LomaZones z{1, 2};  // chunk: R R M P P
  const std::vector<double> losses = {1, 3, 100, 10, 20, 5, 7, 100, 30, 40};
  const std::vector<int32_t> targets = {0, 0, -1, 0, 0, 0, -1, -1, 0, 0};
  std::vector<double> weights;
  const model::LomaLosses l =
      model::LomaZoneLosses(losses.data(), targets.data(), 1, 10, z, &weights);
  EXPECT_DOUBLE_EQ(l.reading, (1 + 3 + 5) / 3.0);
  EXPECT_DOUBLE_EQ(l.repetition, (10 + 20 + 30 + 40) / 4.0);
  EXPECT_EQ(weights, (std::vector<double>{1 / 3.0, 1 / 3.0, 0, 0.25, 0.25, 1 / 3.0, 0, 0, 0.25,
                                          0.25}));
}

// Growing the vocabulary keeps the model's behaviour on its own tokens and starts <m>, <r> at the
// mean embedding.
TEST(LomaVocabulary, AddsTwoMeanRowsAndKeepsBaseLogits) {
  for (bool tied : {false, true}) {
    Llama<double> base(BaseConfig(2, tied), nullptr);
    RandomizeParams(base, 13);
    std::unique_ptr<Llama<double>> grown = model::AddLomaTokens(base, nullptr);
    const int V = kBaseVocab, C = base.config().hidden_size;
    ASSERT_EQ(grown->config().vocab_size, V + 2);
    for (int c = 0; c < C; ++c) {
      double mean = 0;
      for (int v = 0; v < V; ++v) mean += base.embedding()[v * C + c] / V;
      EXPECT_NEAR(grown->embedding()[V * C + c], mean, 1e-12);
      EXPECT_NEAR(grown->embedding()[(V + 1) * C + c], mean, 1e-12);
    }
    const int T = 7;
    std::vector<int32_t> tokens, targets;
    RandomWindow(1, T, 4, &tokens, &targets);
    const model::StepOptions opt;
    const double base_loss = base.Forward(tokens.data(), targets.data(), 1, T, opt).loss;
    grown->Forward(tokens.data(), targets.data(), 1, T, opt);
    for (int t = 0; t < T; ++t)
      for (int v = 0; v < V; ++v)
        ASSERT_NEAR(grown->logits()[size_t(t) * (V + 2) + v], base.logits()[size_t(t) * V + v],
                    1e-12);
    EXPECT_GT(base_loss, 0.0);
  }
}

// The loma method of the CPU decoding engine, several sequences interleaved over the paged cache
// (pages of 3 slots, so segments straddle pages and compressions return some): every token's
// logits equal the training-layout forward's at its reading position, and every head holds
// t·⌊n/tc⌋ + n mod tc slots after n tokens, the bytes KvSequenceBytes gives.
// Sequences 0 and 1 compress in the same steps, sequence 2 one step later.
template <typename T>
void ExpectEngineMatchesTrainingForward(int kv_heads, int t, int c, double tol) {
  LlamaConfig config = BaseConfig(kv_heads);
  config.vocab_size += 2;
  const LomaLayout layout = Layout(t, c);
  config.loma = layout;
  Llama<T> m(config, nullptr);
  RandomizeParams(m, 21);
  const int tc = layout.zones.segment(), n = 3 * tc, B = 3, V = config.vocab_size;
  std::vector<int32_t> tokens, targets;
  RandomWindow(B, n, 8, &tokens, &targets);
  absl::StatusOr<model::LomaBatch> batch =
      model::LomaTransform(layout, tokens.data(), targets.data(), B, n);
  ASSERT_TRUE(batch.ok()) << batch.status();
  model::StepOptions opt;
  opt.loma = layout.zones;
  m.Forward(batch->tokens.data(), batch->targets.data(), B, batch->seq_len, opt);
  const std::vector<T> reference = m.logits();

  inference::CachePolicy policy;
  policy.method = inference::CacheMethod::kLoma;
  auto engine = inference::CpuEngine<T>::Create(m, policy, 1L << 22, 3);
  ASSERT_TRUE(engine.ok()) << engine.status();
  EXPECT_FALSE((*engine)->parallel_prefill());
  const int ids[B] = {7, 2, 11}, start[B] = {0, 0, 1};
  for (int b = 0; b < B; ++b) ASSERT_TRUE((*engine)->AddSequence(ids[b], {}).ok());
  for (int step = 0; step < n + 1; ++step) {
    std::vector<int> seqs;
    std::vector<int32_t> fed;
    for (int b = 0; b < B; ++b) {
      const int j = step - start[b];
      if (j < 0 || j >= n) continue;
      seqs.push_back(ids[b]);
      fed.push_back(tokens[size_t(b) * n + j]);
    }
    std::vector<inference::TokenOutput> out;
    ASSERT_TRUE((*engine)->Step(seqs, fed.data(), nullptr, &out).ok()) << "step " << step;
    for (int b = 0; b < B; ++b) {
      const int j = step - start[b];
      if (j < 0 || j >= n) continue;
      const int p = j / tc * layout.zones.chunk() + j % tc;  // its reading-zone position
      const T* logits = (*engine)->last_logits(ids[b]);
      for (int v = 0; v < V; ++v)
        ASSERT_NEAR(logits[v], reference[(size_t(b) * batch->seq_len + p) * V + v], tol)
            << "sequence " << b << " token " << j << " (t " << t << ", c " << c << ")";
      const int tokens_fed = j + 1, slots = t * (tokens_fed / tc) + tokens_fed % tc;
      for (int l = 0; l < config.num_hidden_layers; ++l)
        for (int h = 0; h < kv_heads; ++h)
          ASSERT_EQ((*engine)->length(ids[b], l, h), slots)
              << "sequence " << b << " after " << tokens_fed << " tokens";
      EXPECT_EQ((*engine)->bytes(ids[b]),
                inference::KvSequenceBytes<T>(
                    (*engine)->cache_options(),
                    std::vector<int>(config.num_hidden_layers * kv_heads, slots)));
    }
  }
  for (int id : ids) ASSERT_TRUE((*engine)->Free(id).ok());
  EXPECT_EQ((*engine)->used_bytes(), 0);
}

TEST(LomaEngine, EqualsTrainingLayoutForwardDouble) {
  ExpectEngineMatchesTrainingForward<double>(2, 2, 2, 1e-10);
  ExpectEngineMatchesTrainingForward<double>(4, 1, 4, 1e-10);
  ExpectEngineMatchesTrainingForward<double>(1, 3, 2, 1e-10);
}

TEST(LomaEngine, EqualsTrainingLayoutForwardFloat) {
  ExpectEngineMatchesTrainingForward<float>(2, 2, 4, 2e-4);
}

// A step that completes a segment also holds its t memory slots before the segment goes: with
// pages of one slot the budget must hold tc + t slots per head, and one short of that refuses
// the step with nothing changed. A model without the layout, and prefill, are refused.
TEST(LomaEngine, BudgetsTheCompressionPeakAndRefusesWhatItCannotServe) {
  LlamaConfig config = BaseConfig(2);
  config.vocab_size += 2;
  const LomaLayout layout = Layout(2, 3);
  config.loma = layout;
  Llama<double> m(config, nullptr);
  RandomizeParams(m, 4);
  inference::CachePolicy policy;
  policy.method = inference::CacheMethod::kLoma;
  const int heads = config.num_hidden_layers * config.num_key_value_heads, tc = 6, t = 2;
  const long page = inference::KvPageBytes<double>(
      inference::CacheOptionsFor(config, policy, 0, 1));
  for (const int peak_slots : {tc + t - 1, tc + t}) {
    auto engine = inference::CpuEngine<double>::Create(m, policy, heads * peak_slots * page, 1);
    ASSERT_TRUE(engine.ok()) << engine.status();
    ASSERT_TRUE((*engine)->AddSequence(0, {}).ok());
    std::vector<inference::TokenOutput> out;
    for (int j = 0; j < tc - 1; ++j) {
      const int32_t token = j % kBaseVocab;
      ASSERT_TRUE((*engine)->Step({0}, &token, nullptr, &out).ok());
    }
    const int32_t token = 1;
    const absl::Status s = (*engine)->Step({0}, &token, nullptr, &out);
    if (peak_slots == tc + t) {
      EXPECT_TRUE(s.ok()) << s;
      EXPECT_EQ((*engine)->length(0, 0, 0), t);
      EXPECT_EQ((*engine)->peak_bytes(), heads * (tc + t) * page);
      continue;
    }
    EXPECT_TRUE(absl::IsResourceExhausted(s)) << s;
    EXPECT_NE(s.message().find("memory slots"), std::string::npos) << s;
    EXPECT_EQ((*engine)->tokens(0), tc - 1);
    EXPECT_EQ((*engine)->length(0, 1, 1), tc - 1);
    inference::TokenOutput one;
    EXPECT_TRUE(absl::IsInvalidArgument((*engine)->Prefill(1, {1, 2}, -1, &one)));
  }
  Llama<double> plain(BaseConfig(2), nullptr);
  auto refused = inference::CpuEngine<double>::Create(plain, policy, 1L << 20, 4);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("needs a LoMA model"), std::string::npos)
      << refused.status();
}

}  // namespace
}  // namespace dmc
