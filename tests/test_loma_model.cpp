// LoMA in the whole model (model/loma.h): the window transform, the two-term loss and its
// gradient through every parameter, the vocabulary extension, and cached LoMA decoding against
// the training-layout forward.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>

#include "inference/loma_decoder.h"
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

// Cached decoding (memory KVs kept, segment KVs dropped every t·c tokens) gives the logits of the
// training-layout forward at every reading position, and the cache holds t·⌊n/tc⌋ + n mod tc
// slots after n tokens.
template <typename T>
void ExpectDecodeMatchesTrainingForward(int kv_heads, int t, int c, double tol) {
  LlamaConfig config = BaseConfig(kv_heads);
  config.vocab_size += 2;
  Llama<T> m(config, nullptr);
  RandomizeParams(m, 21);
  const LomaLayout layout = Layout(t, c);
  const int tc = layout.zones.segment(), n = 3 * tc;
  std::vector<int32_t> tokens, targets;
  RandomWindow(1, n, 8, &tokens, &targets);
  absl::StatusOr<model::LomaBatch> batch =
      model::LomaTransform(layout, tokens.data(), targets.data(), 1, n);
  ASSERT_TRUE(batch.ok()) << batch.status();
  model::StepOptions opt;
  opt.loma = layout.zones;
  m.Forward(batch->tokens.data(), batch->targets.data(), 1, batch->seq_len, opt);

  inference::LomaDecoder<T> decoder(m, layout);
  const int V = config.vocab_size;
  for (int j = 0; j < n; ++j) {
    const std::vector<T>& logits = decoder.Step(tokens[j]);
    const int p = j / tc * layout.zones.chunk() + j % tc;  // its reading-zone position
    for (int v = 0; v < V; ++v)
      ASSERT_NEAR(logits[v], m.logits()[size_t(p) * V + v], tol)
          << "token " << j << " (t " << t << ", c " << c << ", kv heads " << kv_heads << ")";
    const int fed = j + 1;
    EXPECT_EQ(decoder.cache_slots(), t * (fed / tc) + fed % tc) << "after " << fed << " tokens";
  }
  EXPECT_EQ(decoder.memory_slots(), 3 * t);
}

TEST(LomaDecode, EqualsTrainingLayoutForwardDouble) {
  ExpectDecodeMatchesTrainingForward<double>(2, 2, 2, 1e-10);
  ExpectDecodeMatchesTrainingForward<double>(4, 1, 4, 1e-10);
  ExpectDecodeMatchesTrainingForward<double>(1, 3, 2, 1e-10);
}

TEST(LomaDecode, EqualsTrainingLayoutForwardFloat) {
  ExpectDecodeMatchesTrainingForward<float>(2, 2, 4, 2e-4);
}

TEST(LomaDecode, RejectsAModelWithoutTheSpecialTokens) {
  Llama<double> base(BaseConfig(), nullptr);
  EXPECT_THROW(inference::LomaDecoder<double>(base, Layout(2, 2)), std::invalid_argument);
}

}  // namespace
}  // namespace dmc
