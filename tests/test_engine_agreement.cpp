// CompareEngines (inference/engine_agreement.h), the check of the GPU engine against the CPU one on
// a user's checkpoint, on two CPU engines: over the same model nothing differs; over a model
// whose decision channel is shifted, the decisions that differ and the step at which each window
// first differs are those of the two models' training forwards with hard decisions, and the
// predictions before that step are equal. Engines of other shapes or methods, an empty batch and
// a window without a target are refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "inference/cpu_engine.h"
#include "inference/engine_agreement.h"
#include "model/llama.h"
#include "tests/tiny_models.h"

namespace dmc {
namespace {

using inference::CacheMethod;
using inference::CachePolicy;
using inference::CpuEngine;
using model::Llama;

constexpr int kVocab = 11, kWindows = 5, kTokens = 40;

std::unique_ptr<Llama<float>> DmcModel() {
  model::LlamaConfig c = tiny_models::TinyLlama(kVocab, 2);
  c.dmc.enabled = true;
  c.dmc.window = 3;
  c.dmc.init_val = -0.5f;  // merges and appends both common
  auto m = std::make_unique<Llama<float>>(c, nullptr);
  tiny_models::RandomizeParams(*m, 7);
  return m;
}

std::vector<std::vector<int32_t>> Windows() {
  std::vector<std::vector<int32_t>> w;
  for (int i = 0; i < kWindows; ++i)
    w.push_back(tiny_models::RandomTokens(kTokens + 1, kVocab, 100 + i));
  return w;
}

std::unique_ptr<CpuEngine<float>> Engine(Llama<float>& m, CacheMethod method) {
  CachePolicy policy;
  policy.method = method;
  auto e = CpuEngine<float>::Create(m, policy, 1L << 24, 4);
  EXPECT_TRUE(e.ok()) << e.status();
  return std::move(*e);
}

TEST(EngineAgreement, TheSameModelAgreesEverywhere) {
  auto a = DmcModel(), b = DmcModel();
  auto ra = Engine(*a, CacheMethod::kDmc), rb = Engine(*b, CacheMethod::kDmc);
  auto r = inference::CompareEngines(*a, *ra, *rb, Windows(), 2);
  ASSERT_TRUE(r.ok()) << r.status();
  const int heads = a->config().num_hidden_layers * a->config().num_key_value_heads;
  EXPECT_EQ(r->windows, kWindows);
  EXPECT_EQ(r->predictions, kWindows * kTokens);
  EXPECT_EQ(r->decisions, long(kWindows) * kTokens * heads);
  EXPECT_EQ(r->flips, 0);
  EXPECT_EQ(r->windows_flipped, 0);
  EXPECT_EQ(r->max_logprob_diff, 0.0);
  EXPECT_EQ(r->argmax_differ, 0);
  EXPECT_EQ(r->head_tokens, long(kWindows) * kTokens * heads);
  EXPECT_EQ(r->reference_slots, r->candidate_slots);
  EXPECT_LT(r->reference_slots, r->head_tokens) << "the model must merge";
  EXPECT_EQ(r->reference_bytes, r->candidate_bytes);
}

TEST(EngineAgreement, FlipsAreThoseOfTheTwoForwards) {
  auto a = DmcModel(), b = DmcModel();
  // Shift the decision channel k[D-1] of KV head 1 in layer 1 in the candidate: attention never
  // reads that channel (model/DMC.md), so the two decode alike until a decision differs.
  const model::LlamaConfig& c = a->config();
  const int D = c.hidden_size / c.num_attention_heads;
  const model::ParamSpec* wk = b->FindParam("model.layers.1.self_attn.k_proj.weight");
  ASSERT_NE(wk, nullptr);
  for (int i = 0; i < c.hidden_size; ++i)
    b->params()[wk->offset + size_t(1 * D + D - 1) * c.hidden_size + i] *= 1.05f;

  // The expectation from the training forwards: each window's first step t >= 1 at which some
  // (layer, KV head) decides otherwise, how many do there, and the largest margin among them.
  const auto windows = Windows();
  const int L = c.num_hidden_layers, Hkv = c.num_key_value_heads, heads = L * Hkv;
  long decisions = 0, flips = 0, flipped = 0;
  double margin = 0;
  for (const auto& w : windows) {
    model::StepOptions hard;
    hard.mode = kernels::DmcDecisionMode::kHard;
    const std::vector<int32_t> none(kTokens, -1);
    std::vector<float> ma, mb, la;
    for (Llama<float>* m : {a.get(), b.get()}) {
      m->Forward(w.data(), none.data(), 1, kTokens, hard);
      for (int t = 0; t < kTokens; ++t)
        for (int l = 0; l < L; ++l)
          for (int h = 0; h < Hkv; ++h) {
            (m == a.get() ? ma : mb).push_back(m->merge(l)[size_t(t) * Hkv + h]);
            if (m == a.get()) la.push_back(m->decision_logits(l)[size_t(t) * Hkv + h]);
          }
    }
    int first = -1;
    for (int t = 1; t < kTokens && first < 0; ++t)
      for (int x = 0; x < heads; ++x)
        if ((ma[t * heads + x] > 0.5f) != (mb[t * heads + x] > 0.5f)) {
          first = t;
          ++flips;
          const double unit = std::ldexp(1.0, -8) * std::fabs(la[t * heads + x] + c.dmc.init_val);
          margin = std::max(margin, std::fabs(la[t * heads + x]) / unit);
        }
    decisions += long(first < 0 ? kTokens : first + 1) * heads;
    flipped += first >= 0;
  }
  ASSERT_GT(flipped, 0) << "the shift must flip a decision";
  ASSERT_LT(flipped, kWindows) << "the shift must leave a window alike";

  auto ra = Engine(*a, CacheMethod::kDmc), rb = Engine(*b, CacheMethod::kDmc);
  auto r = inference::CompareEngines(*a, *ra, *rb, windows, 3);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->decisions, decisions);
  EXPECT_EQ(r->flips, flips);
  EXPECT_EQ(r->windows_flipped, flipped);
  EXPECT_DOUBLE_EQ(r->max_flip_margin, margin);
  EXPECT_LT(r->max_logprob_diff_before_flip, 1e-5);
  EXPECT_GT(r->max_logprob_diff, r->max_logprob_diff_before_flip);
  EXPECT_NE(r->reference_slots, r->candidate_slots);
}

void ExpectRefused(const absl::StatusOr<inference::EngineAgreement>& r, const char* why) {
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(why), std::string::npos) << r.status();
}

TEST(EngineAgreement, RefusesEnginesOfDifferentMethods) {
  auto a = DmcModel();
  auto dmc = Engine(*a, CacheMethod::kDmc), vanilla = Engine(*a, CacheMethod::kVanilla);
  ExpectRefused(inference::CompareEngines(*a, *dmc, *vanilla, Windows(), 2),
                "different cache methods");
}

TEST(EngineAgreement, RefusesEnginesOfDifferentShapes) {
  auto a = DmcModel();
  model::LlamaConfig c = a->config();
  c.num_hidden_layers += 1;
  Llama<float> deeper(c, nullptr);
  tiny_models::RandomizeParams(deeper, 8);
  auto two = Engine(*a, CacheMethod::kDmc), three = Engine(deeper, CacheMethod::kDmc);
  ExpectRefused(inference::CompareEngines(*a, *two, *three, Windows(), 2),
                "models of different shapes");
}

TEST(EngineAgreement, RefusesAnEmptyBatchAndAWindowWithoutTarget) {
  auto a = DmcModel();
  auto r = Engine(*a, CacheMethod::kDmc), c = Engine(*a, CacheMethod::kDmc);
  ExpectRefused(inference::CompareEngines(*a, *r, *c, Windows(), 0), "max_batch must be at least 1");
  std::vector<std::vector<int32_t>> windows = Windows();
  windows[2].resize(1);
  ExpectRefused(inference::CompareEngines(*a, *r, *c, windows, 2),
                "at least one input and its target");
}

}  // namespace
}  // namespace dmc
