// The DMS model (model/llama.h, model/DMS.md): the whole step's gradient by finite differences in
// both decision variants, distilling from a teacher; the adapter's start is the base model exactly.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/llama.h"
#include "tests/gradcheck.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using model::DmsVariant;
using model::Llama;
using model::LlamaConfig;
using tiny_models::RandomTokens;

LlamaConfig DmsConfig(DmsVariant variant, int kv_heads) {
  LlamaConfig c = tiny_models::TinyLlama(11, kv_heads);
  c.dms.variant = variant;
  c.dms.enabled = true;
  c.dms.window = 2;
  return c;
}

struct DmsGradCase {
  DmsVariant variant;
  int kv_heads;
};

class DmsModelGradient : public ::testing::TestWithParam<DmsGradCase> {};

// L = KL(student || teacher) on a sample of every tensor (the adapter's included), in a soft
// regime (scale 1, offset 0, temperature 1) where every eviction path carries gradient. The
// compression loss's gradient is straight-through, checked in the kernel test.
TEST_P(DmsModelGradient, DistillationLossMatchesFiniteDifferences) {
  const DmsGradCase gc = GetParam();
  LlamaConfig config = DmsConfig(gc.variant, gc.kv_heads);
  config.dms.scale = 1.0f;
  config.dms.offset = 0.0f;
  config.dms.temperature = 1.0f;
  Llama<double> m(config, nullptr);
  tiny_models::RandomizeParams(m, 7);
  const int B = 2, T = 7, N = B * T, V = config.vocab_size;
  std::vector<int32_t> tokens = RandomTokens(N, V, 1), targets = RandomTokens(N, V, 2);
  targets[3] = -1;                       // unlabelled: not distilled
  tokens[5] = config.eos_token_id;       // EOS input: not distilled
  // a teacher: any logits, with their logsumexps
  std::mt19937_64 rng(5);
  const std::vector<double> teacher = testing::random_vector(size_t(N) * V, rng, -2, 2);
  std::vector<double> teacher_lse(N);
  for (int n = 0; n < N; ++n) {
    double s = 0;
    for (int v = 0; v < V; ++v) s += std::exp(teacher[size_t(n) * V + v]);
    teacher_lse[n] = std::log(s);
  }
  model::StepOptions opt;
  opt.noise_seed = 99;
  auto forward = [&] {
    m.SetDistillationTarget(teacher, teacher_lse);
    return m.Forward(tokens.data(), targets.data(), B, T, opt);
  };
  const model::ForwardResult r = forward();
  EXPECT_GT(r.distill_loss, 0.0);
  EXPECT_DOUBLE_EQ(r.loss, r.distill_loss);  // the LM loss is only reported
  m.ZeroGrad();
  m.Backward();
  std::vector<double> analytic = m.grads();
  auto loss = [&] { return forward().loss; };
  std::mt19937_64 pick(3);
  bool adapter_seen = false;
  for (const auto& s : m.param_specs()) {
    std::vector<size_t> idx;
    for (int i = 0; i < 6; ++i) idx.push_back(s.offset + pick() % s.size);
    if (s.name.find("q_proj") != std::string::npos) {  // the decision channel of head 0
      const int64_t C = s.shape[1], D = config.head_dim();
      idx.push_back(s.offset + (D - 1) * C + 1);
    }
    adapter_seen |= s.name.find("dms_proj_alpha") != std::string::npos;
    EXPECT_EQ(s.frozen, gc.variant == DmsVariant::kAdapter &&
                            s.name.find("dms_proj_alpha") == std::string::npos)
        << s.name;
    testing::expect_gradient_matches(loss, m.params(), analytic, s.name.c_str(), idx, 1e-6, 1e-6);
  }
  EXPECT_EQ(adapter_seen, gc.variant == DmsVariant::kAdapter);
}

INSTANTIATE_TEST_SUITE_P(Variants, DmsModelGradient,
                         ::testing::Values(DmsGradCase{DmsVariant::kAdapter, 2},
                                           DmsGradCase{DmsVariant::kAdapter, 4},
                                           DmsGradCase{DmsVariant::kQueryChannel, 2},
                                           DmsGradCase{DmsVariant::kQueryChannel, 1}));

// The adapter starts with a zero projection: a = -offset, nothing is evicted, and the student is
// the base model exactly (so the first distillation loss is 0).
TEST(DmsModel, AdapterStartsAsTheBaseModel) {
  LlamaConfig base_config = tiny_models::TinyLlama(11, 2);
  Llama<double> base(base_config, nullptr);
  tiny_models::RandomizeParams(base, 3);
  Llama<double> dms(DmsConfig(DmsVariant::kAdapter, 2), nullptr);
  dms.InitRandom(1);
  std::copy(base.params().begin(), base.params().end(), dms.params().begin());
  const int B = 2, T = 9;
  std::vector<int32_t> tokens = RandomTokens(B * T, 11, 5), targets = RandomTokens(B * T, 11, 6);
  base.Forward(tokens.data(), targets.data(), B, T, {});
  model::StepOptions hard;
  hard.mode = kernels::DmcDecisionMode::kHard;
  dms.SetDistillationTarget(base.logits(), base.lse());
  const model::ForwardResult r = dms.Forward(tokens.data(), targets.data(), B, T, hard);
  EXPECT_EQ(r.merge_fraction, 0.0);
  EXPECT_NEAR(r.distill_loss, 0.0, 1e-12);
  for (size_t i = 0; i < base.logits().size(); ++i)
    ASSERT_NEAR(base.logits()[i], dms.logits()[i], 1e-12) << "logit " << i;
}

}  // namespace
}  // namespace dmc
