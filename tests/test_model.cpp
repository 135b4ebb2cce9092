// Whole-model tests of the CPU reference backend: end-to-end finite-difference gradients, the
// stage-1/stage-2 hand-over, and the central DMC equivalence between the training-mode forward
// with hard decisions and token-by-token decoding over a real per-head cache.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "inference/dmc_decoder.h"
#include "model/llama.h"
#include "tests/tiny_models.h"
#include "tests/gradcheck.h"
#include "tests/zero_grad_cases.h"

namespace dmc {
namespace {

using model::Llama;
using model::LlamaConfig;
using kernels::DmcDecisionMode;

using tiny_models::RandomizeParams;
using tiny_models::RandomTokens;

LlamaConfig TestConfig(bool dmc, int kv_heads = 2, bool tied = false) {
  LlamaConfig c = tiny_models::TinyLlama(11, kv_heads, tied);
  c.dmc.enabled = dmc;
  c.dmc.window = 3;
  return c;
}


struct GradCase {
  bool dmc;
  int kv_heads;
  bool tied;
  float fade;
};

class ModelGradient : public ::testing::TestWithParam<GradCase> {};

// Loss w.r.t. a sample of every parameter tensor, by central differences in double precision.
TEST_P(ModelGradient, MatchesFiniteDifferences) {
  const GradCase gc = GetParam();
  LlamaConfig config = TestConfig(gc.dmc, gc.kv_heads, gc.tied);
  // A soft regime: decisions near 0.5 with a temperature of 1, so every DMC path carries gradient.
  config.dmc.init_val = 0.0f;
  config.dmc.temperature = 1.0f;
  Llama<double> m(config, nullptr);
  RandomizeParams(m, 7);
  const int B = 2, T = 7;
  std::vector<int32_t> tokens = RandomTokens(B * T, config.vocab_size, 1);
  std::vector<int32_t> targets = RandomTokens(B * T, config.vocab_size, 2);
  targets[3] = -1;  // an unlabelled position
  model::StepOptions opt;
  opt.mode = DmcDecisionMode::kRelaxed;
  opt.noise_seed = 99;
  opt.control_fade = gc.fade;
  // The CR loss's gradient is straight-through (not a derivative of the forward), so it is
  // checked separately; here the loss is the smooth LM loss.
  opt.cr_prior = 0.0f;

  m.Forward(tokens.data(), targets.data(), B, T, opt);
  m.ZeroGrad();
  m.Backward();
  std::vector<double> analytic = m.grads();
  std::vector<double>& params = m.params();
  auto loss = [&] { return m.Forward(tokens.data(), targets.data(), B, T, opt).loss; };

  std::mt19937_64 rng(3);
  for (const auto& s : m.param_specs()) {
    std::vector<size_t> idx;
    for (int i = 0; i < 6; ++i) idx.push_back(s.offset + rng() % s.size);
    if (s.name.find("k_proj") != std::string::npos) {
      // the control channel rows (the last row of each head) carry the DMC decision gradient
      const int64_t C = s.shape[1], D = config.head_dim();
      idx.push_back(s.offset + (D - 1) * C + 1);
    }
    if (s.name.find("q_proj") != std::string::npos) {
      const int64_t C = s.shape[1], D = config.head_dim();
      idx.push_back(s.offset + (2 * D - 1) * C + 2);
    }
    testing::expect_gradient_matches(loss, params, analytic, s.name.c_str(), idx, 1e-6, 1e-6);
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, ModelGradient,
                         ::testing::Values(GradCase{false, 4, false, 1.0f},
                                           GradCase{false, 2, true, 0.5f},
                                           GradCase{true, 2, false, 1.0f},
                                           GradCase{true, 1, true, 1.0f},
                                           GradCase{true, 4, false, 1.0f}));

// ZeroGrad without a pass over the gradients (model/llama.h): the first Backward after it writes
// each gradient, the later ones add, and the tensors no writer writes are zeroed. So gradients
// that held NaN before ZeroGrad give, over two micro-batches, exactly the gradients of a buffer
// set to zeros (whose Backwards all add: a written sum and 0 plus it are the same value), and the
// sum of the two micro-batches' own gradients, in each configuration whose writers differ
// (tests/zero_grad_cases.h; the batches look up 8 of the table's 32 rows).
class ModelZeroGrad : public ::testing::TestWithParam<testing::ZeroGradCase> {};

TEST_P(ModelZeroGrad, NanBeforeZeroGradGivesTheGradientsOfZeros) {
  const testing::ZeroGradCase zc = GetParam();
  LlamaConfig config = TestConfig(zc.dmc, 2, zc.tied);
  config.vocab_size = 32;
  config.dms.variant = zc.dms;
  config.dms.enabled = zc.eviction;
  config.dms.window = 2;
  const int B = 2, T = 7, used_rows = 8;
  // The gradients of Backward on micro-batches `micros`, the buffer holding NaN then ZeroGrad, or
  // set to zeros.
  auto gradients = [&](std::vector<int> micros, bool nan_then_zero_grad) {
    Llama<float> m(config, nullptr);
    RandomizeParams(m, 7);
    std::vector<float>& g = m.grads();
    std::fill(g.begin(), g.end(), nan_then_zero_grad ? std::nanf("") : 0.0f);
    if (nan_then_zero_grad) m.ZeroGrad();
    model::StepOptions opt;
    opt.noise_seed = 99;
    opt.cr_prior = 0.5f;
    for (int micro : micros) {
      const std::vector<int32_t> tokens = RandomTokens(B * T, used_rows, 1 + micro);
      const std::vector<int32_t> targets = RandomTokens(B * T, config.vocab_size, 11 + micro);
      m.Forward(tokens.data(), targets.data(), B, T, opt);
      m.Backward(0.5);
    }
    return m.grads();
  };
  const std::vector<float> lazy = gradients({0, 1}, true), zeroed = gradients({0, 1}, false);
  const std::vector<float> first = gradients({0}, true), second = gradients({1}, true);
  const std::vector<model::ParamSpec> specs = Llama<float>(config, nullptr).param_specs();
  for (const model::ParamSpec& s : specs) {
    double diff = 0, norm = 0;  // to the sum, up to fp32 rounding
    for (size_t i = s.offset; i < s.offset + s.size; ++i) {
      ASSERT_EQ(lazy[i], zeroed[i]) << zc.name << ": " << s.name << " element " << i - s.offset;
      const double sum = double(first[i]) + second[i];
      diff += (lazy[i] - sum) * (lazy[i] - sum);
      norm += sum * sum;
    }
    EXPECT_LE(std::sqrt(diff), 1e-5 * std::sqrt(norm)) << zc.name << ": " << s.name;
  }
  // The test reaches the zeroing: the rows of the untied table that no token looks up are zero,
  // the others are not.
  const model::ParamSpec& table = specs.front();
  ASSERT_EQ(table.name, "model.embed_tokens.weight");
  const size_t used_end = table.offset + size_t(used_rows) * config.hidden_size;
  double looked_up = 0;
  for (size_t i = table.offset; i < used_end; ++i) looked_up += std::fabs(lazy[i]);
  EXPECT_GT(looked_up, 0.0);
  for (size_t i = used_end; !zc.tied && i < table.offset + table.size; ++i)
    ASSERT_EQ(lazy[i], 0.0f) << "table element " << i - table.offset;
}

INSTANTIATE_TEST_SUITE_P(Configs, ModelZeroGrad,
                         ::testing::ValuesIn(testing::kZeroGradCases),
                         testing::ZeroGradCaseName);

// After ZeroGrad, a write through grads() lands on zeros and the next Backward adds to it (the
// trainer's NaN injection).
TEST(Model, GradientWrittenAfterZeroGradSurvivesBackward) {
  Llama<float> m(TestConfig(false), nullptr);
  RandomizeParams(m, 3);
  std::fill(m.grads().begin(), m.grads().end(), 1.0f);
  m.ZeroGrad();
  m.grads()[5] = std::nanf("");
  for (size_t i = 0; i < m.grads().size(); ++i) {
    if (i == 5) continue;
    ASSERT_EQ(m.grads()[i], 0.0f) << i;
  }
  const std::vector<int32_t> tokens = RandomTokens(14, 11, 1), targets = RandomTokens(14, 11, 2);
  m.Forward(tokens.data(), targets.data(), 2, 7, model::StepOptions());
  m.Backward();
  EXPECT_TRUE(std::isnan(m.grads()[5]));
  EXPECT_FALSE(std::isnan(m.grads()[6]));
}

// Stage 2 starts exactly where stage 1 ended: a model whose control channel was faded out
// (m = 0) and a DMC model with the control rows zeroed (so alpha = 0: every token appends, the
// mask vanishes and accumulation is the identity) give the same logits.
TEST(Model, DmcWithAlphaZeroEqualsFadedVanilla) {
  LlamaConfig vanilla_cfg = TestConfig(false);
  LlamaConfig dmc_cfg = TestConfig(true);
  Llama<double> vanilla(vanilla_cfg, nullptr), dmc(dmc_cfg, nullptr);
  RandomizeParams(vanilla, 11);
  vanilla.ZeroControlChannelRows();
  dmc.params() = vanilla.params();
  const int B = 2, T = 9;
  std::vector<int32_t> tokens = RandomTokens(B * T, vanilla_cfg.vocab_size, 5);
  std::vector<int32_t> targets = RandomTokens(B * T, vanilla_cfg.vocab_size, 6);
  model::StepOptions faded;
  faded.control_fade = 0.0f;
  vanilla.Forward(tokens.data(), targets.data(), B, T, faded);
  model::StepOptions hard;
  hard.mode = DmcDecisionMode::kHard;
  const model::ForwardResult r = dmc.Forward(tokens.data(), targets.data(), B, T, hard);
  EXPECT_EQ(r.merge_fraction, 0.0);
  ASSERT_EQ(vanilla.logits().size(), dmc.logits().size());
  for (size_t i = 0; i < dmc.logits().size(); ++i)
    ASSERT_NEAR(vanilla.logits()[i], dmc.logits()[i], 1e-12) << "logit " << i;
}

// With hard decisions the parallel training-mode forward (windowed scan + mask) equals decoding
// token by token over a cache that really appends and accumulates, and every head's cache length
// is its number of appends.
template <typename T>
void ExpectDecodeMatchesTrainingForward(int kv_heads, double tol) {
  LlamaConfig config = TestConfig(true, kv_heads);
  config.dmc.init_val = -0.5f;  // biased towards merging: runs longer than the window of 3
  Llama<T> m(config, nullptr);
  RandomizeParams(m, 21);
  const int T_ = 24;
  std::vector<int32_t> tokens = RandomTokens(T_, config.vocab_size, 8);
  std::vector<int32_t> targets(T_, -1);
  model::StepOptions hard;
  hard.mode = DmcDecisionMode::kHard;
  const model::ForwardResult r = m.Forward(tokens.data(), targets.data(), 1, T_, hard);
  ASSERT_GT(r.merge_fraction, 0.3) << "the test needs plenty of merges";
  ASSERT_LT(r.merge_fraction, 0.95) << "the test needs some appends";

  inference::DmcDecoder<T> decoder(m);
  const int V = config.vocab_size;
  for (int t = 0; t < T_; ++t) {
    const std::vector<T>& logits = decoder.Step(tokens[t]);
    for (int v = 0; v < V; ++v)
      ASSERT_NEAR(logits[v], m.logits()[size_t(t) * V + v], tol) << "position " << t;
  }
  bool some_run_longer_than_window = false;
  for (int l = 0; l < config.num_hidden_layers; ++l)
    for (int h = 0; h < kv_heads; ++h) {
      int appends = 0, run = 0;
      for (int t = 0; t < T_; ++t) {
        const bool merge = t > 0 && m.merge(l)[size_t(t) * kv_heads + h] > 0.5;
        appends += merge ? 0 : 1;
        run = merge ? run + 1 : 1;
        some_run_longer_than_window |= run > config.dmc.window;
      }
      EXPECT_EQ(decoder.appends(l, h), appends) << "layer " << l << " head " << h;
    }
  EXPECT_TRUE(some_run_longer_than_window) << "the window truncation was not exercised";
  EXPECT_LT(decoder.cache().total_slots(), long(T_) * config.num_hidden_layers * kv_heads);
}

TEST(DmcDecode, EqualsTrainingForwardWithHardDecisionsDouble) {
  ExpectDecodeMatchesTrainingForward<double>(2, 1e-10);
  ExpectDecodeMatchesTrainingForward<double>(4, 1e-10);
  ExpectDecodeMatchesTrainingForward<double>(1, 1e-10);
}

TEST(DmcDecode, EqualsTrainingForwardWithHardDecisionsFloat) {
  ExpectDecodeMatchesTrainingForward<float>(2, 2e-4);
}

TEST(ModelConfig, RejectsBadValuesWithAClearMessage) {
  struct Case {
    void (*mutate)(LlamaConfig&);
    const char* expected;
  };
  const Case cases[] = {
      {[](LlamaConfig& c) { c.hidden_size = -16; }, "hidden_size"},
      {[](LlamaConfig& c) { c.num_attention_heads = 3; }, "must divide hidden_size"},
      {[](LlamaConfig& c) { c.num_key_value_heads = 3; }, "num_key_value_heads"},
      {[](LlamaConfig& c) { c.vocab_size = 0; }, "vocab_size"},
      {[](LlamaConfig& c) { c.dmc.window = 0; }, "window"},
      {[](LlamaConfig& c) { c.dmc.temperature = 0; }, "temperature"},
  };
  for (const Case& k : cases) {
    LlamaConfig c = TestConfig(true);
    k.mutate(c);
    const absl::Status s = c.Validate();
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find(k.expected), std::string::npos) << s.message();
  }
}

// Every preset is a valid model; an unknown name is refused with the list of known ones.
TEST(ModelConfig, PresetsAreValidAndUnknownNamesAreRefused) {
  for (const char* name : {"tiny", "small", "small-d64", "medium"}) {
    LlamaConfig c;
    ASSERT_TRUE(model::PresetConfig(name, &c).ok()) << name;
    EXPECT_TRUE(c.Validate().ok()) << name;
  }
  LlamaConfig c;
  const absl::Status s = model::PresetConfig("huge", &c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("'huge'"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("small-d64"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace dmc

namespace dmc {
namespace {

// Every index of a dimension belongs to exactly one rank, in rank order, and shard sizes differ
// by at most one (the vocabulary need not divide).
TEST(TpShard, CoversEveryIndexOnceAndEvenly) {
  for (int full : {1, 7, 37, 64, 32000})
    for (int ranks : {1, 2, 3, 4, 8}) {
      if (ranks > full) continue;
      int64_t next = 0, smallest = full, largest = 0;
      for (int r = 0; r < ranks; ++r) {
        const model::TpSlice s = model::TpShard(full, r, ranks);
        EXPECT_EQ(s.begin, next) << full << " over " << ranks << ", rank " << r;
        next = s.begin + s.size;
        smallest = std::min(smallest, s.size);
        largest = std::max(largest, s.size);
      }
      EXPECT_EQ(next, full) << full << " over " << ranks;
      EXPECT_LE(largest - smallest, 1) << full << " over " << ranks;
    }
}

}  // namespace
}  // namespace dmc
