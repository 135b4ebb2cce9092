// The GPU evaluation (inference/evaluate_cuda.h, one parallel forward per batch of windows)
// against the CPU one (inference/evaluate.h, token-by-token decoding over the paged cache) on the
// same windows, DMC on (hard decisions, MHA and GQA) and off: perplexity, accuracy, CR overall,
// per layer and per head, and KV memory.
//
// The weights are model_test_util.h's ShapeWeights, whose hard decisions are mixed but far from
// the threshold, so no decision flips between the fp32 CPU decoder and the bf16 GPU forward: the
// slot counts must then agree exactly, so the CRs are compared for equality and the KV bytes too
// (a CR off by the first token, pages counted wrongly or window state left out all show). The LM
// head is shaped so that accuracy means something: row v is the embedding row of token σ(v)
// (without the decision channels), so the model predicts σ⁻¹(current token) by a wide margin, and
// three in four targets of the windows follow that rule.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "inference/evaluate.h"
#include "inference/evaluate_cuda.h"
#include "model/llama.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/model_test_util.h"

namespace dmc::cuda_test {
namespace {

using inference::CacheMethod;
using inference::EvalOptions;
using inference::EvalResult;

struct Case {
  const char* name;
  bool dmc;
  int hidden, heads, kv_heads;
};

// A third layer (odd layers merge differently) and a vocabulary large enough for the
// successor-shaped LM head; evaluation uses hard decisions, so the temperature plays no part.
model::LlamaConfig MakeConfig(const Case& c) {
  model::LlamaConfig m = SmallModelConfig(c.dmc, c.hidden, c.heads, c.kv_heads);
  m.vocab_size = 256;
  m.num_hidden_layers = 3;
  return m;
}

class CudaEval : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_P(CudaEval, MatchesTokenByTokenEvaluation) {
  const Case& tc = GetParam();
  const model::LlamaConfig config = MakeConfig(tc);
  const int L = config.num_hidden_layers, Hkv = config.num_key_value_heads;
  model::Llama<float> host(config, nullptr);
  const std::vector<int32_t> predicted = ShapeEvalModel(&host, 7);
  const int n = 10, T = 32;
  const std::vector<std::vector<int32_t>> windows = PredictableWindows(n, T, predicted, 11);

  EvalOptions cpu_options;
  cpu_options.policy.method = tc.dmc ? CacheMethod::kDmc : CacheMethod::kVanilla;
  cpu_options.page_size = 4;  // a window spans several pages per head
  cpu_options.max_batch = n;  // every window resident at once: the peak the GPU path reports
  EvalOptions gpu_options = cpu_options;
  gpu_options.max_batch = 4;  // batches of 4, 4 and 2 windows
  long progress_calls = 0, last_done = 0;
  gpu_options.progress = [&](long done, long total) {
    ++progress_calls;
    last_done = done;
    EXPECT_EQ(total, long(n) * T);
  };

  const absl::StatusOr<EvalResult> cpu = inference::Evaluate(host, windows, cpu_options);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  const absl::StatusOr<EvalResult> gpu = inference::EvaluateCuda(host, windows, gpu_options);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::printf("[ eval  ] %-8s perplexity %.5f / %.5f  accuracy %.4f / %.4f  CR %.4f / %.4f  "
              "KV %ld / %ld bytes  (gpu / cpu), %.0f tokens/s\n",
              tc.name, gpu->perplexity, cpu->perplexity, gpu->accuracy, cpu->accuracy, gpu->cr,
              cpu->cr, gpu->peak_kv_bytes, cpu->peak_kv_bytes, gpu->tokens_per_second);
  std::fflush(stdout);

  EXPECT_EQ(gpu->policy.method, cpu_options.policy.method);
  EXPECT_EQ(gpu->predictions, long(n) * T);
  EXPECT_EQ(gpu->predictions, cpu->predictions);
  EXPECT_EQ(progress_calls, 3);
  EXPECT_EQ(last_done, long(n) * T);
  EXPECT_LE(std::fabs(gpu->perplexity - cpu->perplexity) / cpu->perplexity, 2e-2);
  // The shaped head makes the windows predictable, well above chance (1/256), so a wrong argmax
  // or a misaligned target would show.
  EXPECT_GT(cpu->accuracy, 0.4);
  EXPECT_LE(std::fabs(gpu->accuracy - cpu->accuracy), 0.02);
  EXPECT_GT(gpu->tokens_per_second, 0.0);
  EXPECT_EQ(gpu->max_concurrent, n);
  EXPECT_EQ(cpu->max_concurrent, n);

  // No decision flips (the weights keep them far from the threshold): equal slot counts.
  if (tc.dmc) {
    EXPECT_GT(cpu->cr, 1.15) << "too few merges to exercise the slot counting";
  } else {
    EXPECT_EQ(cpu->cr, 1.0);
  }
  EXPECT_EQ(gpu->cr, cpu->cr);
  ASSERT_EQ(gpu->layer_cr.size(), size_t(L));
  ASSERT_EQ(gpu->head_cr.size(), size_t(L) * Hkv);
  for (int l = 0; l < L; ++l) EXPECT_EQ(gpu->layer_cr[l], cpu->layer_cr[l]) << "layer " << l;
  for (int i = 0; i < L * Hkv; ++i)
    EXPECT_EQ(gpu->head_cr[i], cpu->head_cr[i]) << "layer " << i / Hkv << " head " << i % Hkv;
  EXPECT_EQ(gpu->peak_kv_bytes, cpu->peak_kv_bytes);
}

INSTANTIATE_TEST_SUITE_P(Methods, CudaEval,
                         ::testing::Values(Case{"vanilla", false, 128, 2, 2},
                                           Case{"dmc", true, 128, 2, 2},
                                           Case{"dmc_gqa", true, 256, 4, 2}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(info.param.name);
                         });

// The methods that need token-by-token decoding are refused before any device work, with the
// method named and the CPU suggested; so is vanilla on a DMC model.
TEST(CudaEvalRefusal, NamesTheMethodAndPointsToTheCpu) {
  model::LlamaConfig config = MakeConfig(Case{"dmc", true, 128, 2, 2});
  for (CacheMethod m : {CacheMethod::kH2O, CacheMethod::kTova, CacheMethod::kLoma,
                        CacheMethod::kVanilla}) {
    const absl::Status s = inference::CudaEvalSupports(config, m);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << inference::CacheMethodName(m);
    EXPECT_NE(s.message().find(inference::CacheMethodName(m)), std::string::npos) << s;
    EXPECT_NE(s.message().find("--device=cpu"), std::string::npos) << s;
  }
  EXPECT_TRUE(inference::CudaEvalSupports(config, CacheMethod::kDmc).ok());
  config.dmc.enabled = false;
  EXPECT_TRUE(inference::CudaEvalSupports(config, CacheMethod::kVanilla).ok());
  EXPECT_TRUE(absl::IsInvalidArgument(inference::CudaEvalSupports(config, CacheMethod::kDmc)));
}

}  // namespace
}  // namespace dmc::cuda_test
