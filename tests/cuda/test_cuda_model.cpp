// The CUDA model (model/llama_cuda.h) against the CPU model (model/llama.h, the specification):
// one training step's losses, merge statistics and every gradient tensor, in vanilla, stage-1
// fade, relaxed-DMC and hard-DMC modes (MHA and GQA), and a few optimizer steps side by side;
// also the model's residual add helper against the rounded sum.
//
// Both models get the same bf16-rounded weights, so the comparison measures the bf16 arithmetic
// of the GPU path, not the rounding of its weights. The weights are shaped so that the hard DMC
// decisions are mixed but far from the threshold (|a| >= ~1.5), so no decision flips between the
// fp32 CPU model and the bf16 GPU model: KV head h's control channel k[D-1] reads only channel h of
// the residual stream, which every token's embedding sets to ±1. In relaxed mode the noisy
// decisions merge = round(σ(a + noise)) could flip where a + noise ≈ 0: the test counts the flips
// (at most 4 allowed; about 0.5 are expected) and bounds the merge-fraction and CR-loss differences by them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "kernels/cuda_ops.h"
#include "model/llama.h"
#include "model/llama_cuda.h"
#include "parallel/communicator.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/model_test_util.h"
#include "tests/zero_grad_cases.h"
#include "trainer/cuda_backend.h"
#include "trainer/optimizer.h"
#include "trainer/trainer.h"

// llama_cuda.cu's residual add, which the row-parallel projections keep under TP.
namespace dmc::model::cuda_model_detail {
void add(cuda::bf16* out, const cuda::bf16* a, const cuda::bf16* b, size_t n, cudaStream_t stream);
}

namespace dmc::cuda_test {
namespace {

using kernels::DmcDecisionMode;

struct Case {
  const char* name;
  bool dmc;
  DmcDecisionMode mode;
  float fade;
  int hidden, heads, kv_heads;
};

model::LlamaConfig MakeConfig(const Case& c) {
  return SmallModelConfig(c.dmc, c.hidden, c.heads, c.kv_heads);
}

class CudaModelStep : public ::testing::TestWithParam<Case> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_P(CudaModelStep, LossesMergeStatisticsAndGradientsMatchCpu) {
  const Case& tc = GetParam();
  const model::LlamaConfig config = MakeConfig(tc);
  const int B = 2, T = 33, L = config.num_hidden_layers, Hkv = config.num_key_value_heads;
  model::Llama<float> cpu(config, nullptr);
  ShapeWeights(&cpu, 7);
  model::LlamaCuda gpu(config);
  gpu.CopyParamsFromHost(cpu);
  ASSERT_EQ(gpu.ParamsToHost(), cpu.params()) << "parameter upload/download is not exact";

  std::vector<int32_t> in, tgt;
  MakeBatch(B, T, config.vocab_size, 11, &in, &tgt);
  model::StepOptions opt;
  opt.mode = tc.mode;
  opt.noise_seed = 1234;
  opt.step = 3;
  opt.seq0 = 2;
  opt.cr_prior = tc.dmc ? 0.75f : 0.0f;  // above the merge fractions: the hinge is active
  opt.control_fade = tc.fade;

  cpu.ZeroGrad();
  gpu.ZeroGrad();
  const model::ForwardResult rc = cpu.Forward(in.data(), tgt.data(), B, T, opt);
  const model::ForwardResult rg = gpu.Forward(in.data(), tgt.data(), B, T, opt);
  cpu.Backward(0.5);  // a loss scale other than 1 (gradient accumulation)
  gpu.Backward(0.5);

  // Decision flips between the two models (hard decisions, layer by layer).
  const auto [flips, merges] = tc.dmc ? CompareDecisions(gpu, cpu, L) : DecisionCount{};
  const double decisions = static_cast<double>(L) * B * T * Hkv;
  std::printf("[ model ] %-14s lm %.6f / %.6f  cr %.6f / %.6f  merge %.4f / %.4f  (gpu / cpu), "
              "%d of %.0f decisions merge, %d flips\n",
              tc.name, rg.lm_loss, rc.lm_loss, rg.cr_loss, rc.cr_loss, rg.merge_fraction,
              rc.merge_fraction, merges, decisions, flips);
  EXPECT_TRUE(std::isfinite(rg.loss));
  EXPECT_LE(std::fabs(rg.lm_loss - rc.lm_loss) / rc.lm_loss, kLossTol);
  if (tc.dmc) {
    // Mixed decisions, or the test would not exercise the mask and the scan.
    EXPECT_GT(merges, decisions * 0.15);
    EXPECT_LT(merges, decisions * 0.85);
    EXPECT_LE(flips, tc.mode == DmcDecisionMode::kHard ? 0 : 4);
    ExpectStatisticsWithinFlips(rg, rc, flips, L, B, T, Hkv);
  } else {
    EXPECT_EQ(rg.cr_loss, 0.0);
    EXPECT_EQ(rg.merge_fraction, 0.0);
    EXPECT_TRUE(rg.layer_merge_fraction.empty());
  }
  EXPECT_NEAR(rg.loss, rg.lm_loss + rg.cr_loss, 1e-12);

  ExpectLogitsClose(gpu, cpu, tc.name, "logits", kLossTol);

  const std::vector<float> gg = gpu.GradsToHost();
  const std::vector<float>& gc = cpu.grads();
  ASSERT_EQ(gg.size(), gc.size());
  double worst = 0;
  for (const auto& spec : cpu.param_specs()) {
    const double err = RelError(gg.data() + spec.offset, gc.data() + spec.offset, spec.size);
    worst = std::max(worst, err);
    std::printf("[ error ] %-14s grad %-47s rel %.3e\n", tc.name, spec.name.c_str(), err);
    EXPECT_LE(err, spec.shape.size() == 1 ? kNormGradTol : kGradTol) << spec.name;
  }
  std::printf("[ model ] %-14s worst gradient error %.3e (tol %.0e)\n", tc.name, worst, kGradTol);
  std::fflush(stdout);

  // Gradients accumulate: a second identical step doubles them.
  gpu.Forward(in.data(), tgt.data(), B, T, opt);
  gpu.Backward(0.5);
  const std::vector<float> g2 = gpu.GradsToHost();
  std::vector<float> twice(gg.size());
  for (size_t i = 0; i < gg.size(); ++i) twice[i] = 2 * gg[i];
  EXPECT_LE(RelError(g2.data(), twice.data(), twice.size()), 1e-2) << "Backward must accumulate";
}

INSTANTIATE_TEST_SUITE_P(
    Modes, CudaModelStep,
    ::testing::Values(Case{"vanilla", false, DmcDecisionMode::kRelaxed, 1.0f, 128, 2, 2},
                      Case{"stage1_fade", false, DmcDecisionMode::kRelaxed, 0.4f, 128, 2, 2},
                      Case{"dmc_relaxed", true, DmcDecisionMode::kRelaxed, 1.0f, 128, 2, 2},
                      Case{"dmc_hard", true, DmcDecisionMode::kHard, 1.0f, 128, 2, 2},
                      Case{"gqa_relaxed", true, DmcDecisionMode::kRelaxed, 1.0f, 256, 4, 2},
                      Case{"gqa_hard", true, DmcDecisionMode::kHard, 1.0f, 256, 4, 2},
                      // head dim 128: on Hopper the sm90 attention kernels, forward and backward
                      Case{"gqa_d128_relaxed", true, DmcDecisionMode::kRelaxed, 1.0f, 256, 2, 1}),
    [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

// ZeroGrad without the memset of every gradient (model/llama_cuda.h): the first Backward after it
// writes each gradient (cuBLAS beta 0 for the weights), the later ones add, and the tensors no
// writer writes are zeroed. Gradients filled with NaN before ZeroGrad (GradsFromHost) must give,
// over two micro-batches, the gradients of a buffer set to zeros (whose Backwards all add), the
// sum of the two micro-batches' own gradients, and (without DMS) the CPU model's, in each
// configuration whose writers differ (tests/zero_grad_cases.h, as the CPU test ModelZeroGrad; the
// batches look up 16 of the table's 64 rows, the rest of an untied one must be zero, a frozen base
// exactly zero). A second step from ZeroGrad, the frozen range now known to hold zeros, gives the
// first step's gradients again.
class CudaModelZeroGrad : public ::testing::TestWithParam<testing::ZeroGradCase> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_P(CudaModelZeroGrad, NanBeforeZeroGradGivesTheGradientsOfZeros) {
  const testing::ZeroGradCase& zc = GetParam();
  const bool dms = zc.dms != model::DmsVariant::kNone;
  model::LlamaConfig config =
      dms ? DmsModelConfig(zc.dms, 128, 2, 2) : SmallModelConfig(zc.dmc, 128, 2, 2);
  config.dms.enabled = zc.eviction;
  config.tie_word_embeddings = zc.tied;
  model::Llama<float> cpu(config, nullptr);
  ShapeWeights(&cpu, 7);
  ShapeDmsDecisions(&cpu, false);
  const size_t P = cpu.params().size();
  const int B = 2, T = 33, used_rows = 16;
  std::vector<int32_t> in[2], tgt[2];
  for (int m = 0; m < 2; ++m) {
    MakeBatch(B, T, config.vocab_size, 11 + m, &in[m], &tgt[m]);
    for (int32_t& t : in[m]) t %= used_rows;
  }
  model::StepOptions opt;
  opt.mode = DmcDecisionMode::kHard;  // no decision flips between the CPU and the GPU model
  opt.noise_seed = 1234;
  opt.cr_prior = 0.75f;
  auto run = [&](auto& model, std::vector<int> micros) {
    for (int m : micros) {
      opt.seq0 = m * B;
      model.Forward(in[m].data(), tgt[m].data(), B, T, opt);
      model.Backward(0.5);
    }
  };
  const std::vector<float> nan(P, std::nanf("")), zeros(P, 0.0f);
  // The gradients of the GPU model on micro-batches `micros`, from NaN then ZeroGrad or from zeros.
  auto gpu_gradients = [&](std::vector<int> micros, bool nan_then_zero_grad) {
    model::LlamaCuda gpu(config);
    gpu.CopyParamsFromHost(cpu);
    gpu.GradsFromHost(nan_then_zero_grad ? nan : zeros);
    if (nan_then_zero_grad) {
      gpu.ZeroGrad();
      EXPECT_EQ(gpu.GradsToHost(), zeros) << "the gradients after ZeroGrad";
    }
    run(gpu, micros);
    std::vector<float> g = gpu.GradsToHost();
    if (nan_then_zero_grad && micros.size() == 2) {  // a second step
      gpu.ZeroGrad();
      run(gpu, micros);
      const std::vector<float> again = gpu.GradsToHost();
      EXPECT_LE(RelError(again.data(), g.data(), P), 1e-2) << "a second step from ZeroGrad";
    }
    return g;
  };
  const std::vector<float> lazy = gpu_gradients({0, 1}, true);
  const std::vector<float> zeroed = gpu_gradients({0, 1}, false);
  const std::vector<float> first = gpu_gradients({0}, true), second = gpu_gradients({1}, true);
  std::vector<float> sum(P);
  for (size_t i = 0; i < P; ++i) sum[i] = first[i] + second[i];
  std::fill(cpu.grads().begin(), cpu.grads().end(), std::nanf(""));
  cpu.ZeroGrad();
  run(cpu, {0, 1});
  const std::vector<float>& gc = cpu.grads();

  // The GPU runs differ only by the order of the attention backward's fp32 atomics (a dq element
  // may round to the other bf16 neighbour), far below what a lost or doubled micro-batch moves.
  constexpr double kSameTol = 1e-2;
  for (const model::ParamSpec& spec : cpu.param_specs()) {
    const float* g = lazy.data() + spec.offset;
    if (spec.frozen) {
      for (size_t i = 0; i < spec.size; ++i)
        ASSERT_EQ(g[i], 0.0f) << zc.name << ": frozen " << spec.name << " element " << i;
      continue;
    }
    const double vs_zeroed = RelError(g, zeroed.data() + spec.offset, spec.size);
    const double vs_sum = RelError(g, sum.data() + spec.offset, spec.size);
    const double vs_cpu = RelError(g, gc.data() + spec.offset, spec.size);
    std::printf("[ error ] %-16s grad %-47s rel %.3e vs zeros, %.3e vs sum, %.3e vs cpu\n",
                zc.name, spec.name.c_str(), vs_zeroed, vs_sum, vs_cpu);
    EXPECT_LE(vs_zeroed, kSameTol) << zc.name << ": " << spec.name;
    EXPECT_LE(vs_sum, kSameTol) << zc.name << ": " << spec.name;
    if (!dms) {  // the CPU model's DMS step without a teacher is not compared elsewhere either
      EXPECT_LE(vs_cpu, spec.shape.size() == 1 ? kNormGradTol : kGradTol) << spec.name;
    }
  }
  // The test reaches the zeroing: the rows of the untied table that no token looks up are zero.
  const model::ParamSpec* table = cpu.FindParam("model.embed_tokens.weight");
  if (!zc.tied && !table->frozen) {
    for (size_t i = size_t(used_rows) * config.hidden_size; i < table->size; ++i)
      ASSERT_EQ(lazy[table->offset + i], 0.0f) << zc.name << ": table element " << i;
  }
  std::fflush(stdout);
}

INSTANTIATE_TEST_SUITE_P(Configs, CudaModelZeroGrad,
                         ::testing::ValuesIn(testing::kZeroGradCases),
                         testing::ZeroGradCaseName);

class CudaModel : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

// The residual add under TP is the bf16 rounding of the exact sum, bit for bit, on its 16-byte path
// (n a multiple of 8, aligned buffers) and its scalar one (an odd n, or buffers 2 bytes past
// alignment), into NaN.
TEST_F(CudaModel, ResidualAddIsTheRoundedSum) {
  for (auto [n, shift] : {std::pair{100000, 0}, std::pair{100003, 0}, std::pair{100000, 1}}) {
    auto a = randn(n), b = randn(n);
    auto ab = to_bf16(a), bb = to_bf16(b);
    ab.insert(ab.begin(), shift, bf16());
    bb.insert(bb.begin(), shift, bf16());
    DevBuf<bf16> da(ab), db(bb), dout(n + shift);
    dout.poison();
    model::cuda_model_detail::add(dout + shift, da + shift, db + shift, n, nullptr);
    std::vector<double> ref(n);
    for (int i = 0; i < n; ++i)  // a + b is exact in double, so fp32 rounds it as the GPU does
      ref[i] = __bfloat162float(__float2bfloat16(static_cast<float>(a[i] + b[i])));
    std::vector<bf16> out = dout.download();
    out.erase(out.begin(), out.begin() + shift);
    expect_close("residual add n" + std::to_string(n) + (shift ? " unaligned" : ""), out, ref,
                 0.0);
  }
}

// Six full steps (forward, backward, AdamW; relaxed DMC with the CR loss, clipping active on some
// steps) on both models: the losses and gradient norms track, and both models learn.
TEST_F(CudaModel, OptimizerStepsTrackCpu) {
  const Case tc{"steps", true, DmcDecisionMode::kRelaxed, 1.0f, 128, 2, 2};
  const model::LlamaConfig config = MakeConfig(tc);
  const int B = 2, T = 33;
  model::Llama<float> cpu(config, nullptr);
  ShapeWeights(&cpu, 21);
  model::LlamaCuda gpu(config);
  gpu.CopyParamsFromHost(cpu);

  trainer::OptimizerConfig oc;
  oc.grad_clip = 0.5f;  // small enough to clip on some steps
  trainer::AdamW cpu_opt(oc, cpu.params().size());
  parallel::LocalCommunicator tp;
  model::CudaAdamWSettings gs;
  gs.beta1 = oc.beta1;
  gs.beta2 = oc.beta2;
  gs.eps = oc.eps;
  gs.weight_decay = oc.weight_decay;
  gs.grad_clip = oc.grad_clip;
  gs.lr = 3e-3f;

  std::vector<int32_t> in, tgt;
  MakeBatch(B, T, config.vocab_size, 5, &in, &tgt);
  std::vector<double> lc, lg;
  for (int step = 0; step < 6; ++step) {
    model::StepOptions opt;
    opt.noise_seed = 99;
    opt.step = step;
    opt.cr_prior = 0.6f;
    cpu.ZeroGrad();
    gpu.ZeroGrad();
    const model::ForwardResult rc = cpu.Forward(in.data(), tgt.data(), B, T, opt);
    cpu.Backward();
    // The trainer's order on the GPU: forward and backward enqueued before the statistics are
    // read, then the optimizer step (a CUDA graph replay from the second step on) and its one wait.
    gpu.ForwardAsync(in.data(), tgt.data(), B, T, opt);
    gpu.Backward();
    const model::ForwardResult rg = gpu.ForwardResults();
    absl::StatusOr<double> nc = cpu_opt.Step(cpu, gs.lr, tp);
    ASSERT_TRUE(nc.ok()) << nc.status();
    gpu.OptimizerStepAsync(gs);
    const double ng = gpu.OptimizerStepNorm();
    std::printf("[ steps ] step %d  loss %.5f / %.5f  lm %.5f / %.5f  grad norm %.4f / %.4f "
                "(gpu / cpu)\n",
                step, rg.loss, rc.loss, rg.lm_loss, rc.lm_loss, ng, *nc);
    EXPECT_LE(std::fabs(rg.lm_loss - rc.lm_loss) / rc.lm_loss, kLossTol) << "step " << step;
    EXPECT_LE(std::fabs(rg.cr_loss - rc.cr_loss), 0.02) << "step " << step;
    EXPECT_LE(std::fabs(ng - *nc) / *nc, kGradTol) << "step " << step;
    lc.push_back(rc.lm_loss);
    lg.push_back(rg.lm_loss);
  }
  EXPECT_EQ(gpu.optimizer_step(), cpu_opt.step());
  EXPECT_LT(lc.back(), lc.front() - 0.05) << "the CPU model did not learn";
  EXPECT_LT(lg.back(), lg.front() - 0.05) << "the GPU model did not learn";

  // The updated weights agree too (loosely: AdamW's first steps are ±lr wherever a gradient is
  // nonzero, so an element whose tiny gradient changes sign in bf16 moves the other way).
  const std::vector<float> pg = gpu.ParamsToHost();
  const double err = RelError(pg.data(), cpu.params().data(), pg.size());
  std::printf("[ error ] parameters after 6 steps rel %.3e\n", err);
  EXPECT_LE(err, 5e-2);

  // Moments and step survive a round trip through the host (checkpoints).
  std::vector<float> m, v;
  gpu.OptimizerStateToHost(&m, &v);
  EXPECT_LE(RelError(m.data(), cpu_opt.m().data(), m.size()), 0.1);
  model::LlamaCuda other(config);
  other.CopyParamsFromHost(pg);
  other.OptimizerStateFromHost(m, v, gpu.optimizer_step());
  std::vector<float> m2, v2;
  other.OptimizerStateToHost(&m2, &v2);
  EXPECT_EQ(m, m2);
  EXPECT_EQ(v, v2);
  EXPECT_EQ(other.ParamsToHost(), pg);
}

// The deferred read changes nothing: ForwardAsync + Backward + ForwardResults gives the statistics
// Forward gives, and with clipping disabled or inactive the optimizer step (captured once, then
// replayed with new rates) tracks the CPU AdamW, whose steps are then not scaled.
TEST_F(CudaModel, DeferredForwardAndGraphOptimizerMatchCpu) {
  const Case tc{"deferred", true, DmcDecisionMode::kRelaxed, 1.0f, 128, 2, 2};
  const model::LlamaConfig config = MakeConfig(tc);
  const int B = 2, T = 33;
  model::Llama<float> cpu(config, nullptr);
  ShapeWeights(&cpu, 17);
  model::LlamaCuda gpu(config);
  gpu.CopyParamsFromHost(cpu);
  std::vector<int32_t> in, tgt;
  MakeBatch(B, T, config.vocab_size, 9, &in, &tgt);
  model::StepOptions opt;
  opt.noise_seed = 5;
  opt.cr_prior = 0.6f;
  const model::ForwardResult r1 = gpu.Forward(in.data(), tgt.data(), B, T, opt);
  gpu.ForwardAsync(in.data(), tgt.data(), B, T, opt);
  gpu.Backward();
  const model::ForwardResult r2 = gpu.ForwardResults();
  EXPECT_EQ(r1.loss, r2.loss);
  EXPECT_EQ(r1.lm_loss, r2.lm_loss);
  EXPECT_EQ(r1.cr_loss, r2.cr_loss);
  EXPECT_EQ(r1.merge_fraction, r2.merge_fraction);
  EXPECT_EQ(r1.layer_merge_fraction, r2.layer_merge_fraction);

  for (const float clip : {0.0f, 1e6f}) {
    trainer::OptimizerConfig oc;
    oc.grad_clip = clip;
    trainer::AdamW cpu_opt(oc, cpu.params().size());
    parallel::LocalCommunicator tp;
    model::CudaAdamWSettings gs;
    gs.grad_clip = clip;
    gpu.CopyParamsFromHost(cpu);
    gpu.ResetOptimizer();
    for (int step = 0; step < 3; ++step) {
      const float lr = 1e-3f * (step + 1);  // a new rate each replay
      opt.step = step;
      cpu.ZeroGrad();
      gpu.ZeroGrad();
      cpu.Forward(in.data(), tgt.data(), B, T, opt);
      cpu.Backward();
      gpu.ForwardAsync(in.data(), tgt.data(), B, T, opt);
      gpu.Backward();
      gpu.ForwardResults();
      absl::StatusOr<double> nc = cpu_opt.Step(cpu, lr, tp);
      ASSERT_TRUE(nc.ok()) << nc.status();
      gs.lr = lr;
      const double ng = gpu.OptimizerStep(gs);
      EXPECT_LE(std::fabs(ng - *nc) / *nc, kGradTol) << "clip " << clip << " step " << step;
    }
    EXPECT_EQ(gpu.optimizer_step(), 3);
    const std::vector<float> pg = gpu.ParamsToHost();
    const double err = RelError(pg.data(), cpu.params().data(), pg.size());
    std::printf("[ error ] parameters after 3 unclipped steps (clip %g) rel %.3e\n", clip, err);
    EXPECT_LE(err, 5e-2);
  }
}

// Stage-2 entry on the device zeroes the same rows as the host model; ResetOptimizer forgets.
TEST_F(CudaModel, ZeroControlChannelRowsAndResetMatchHost) {
  const Case tc{"rows", true, DmcDecisionMode::kRelaxed, 1.0f, 256, 4, 2};
  const model::LlamaConfig config = MakeConfig(tc);
  model::Llama<float> cpu(config, nullptr);
  ShapeWeights(&cpu, 3);
  model::LlamaCuda gpu(config);
  gpu.CopyParamsFromHost(cpu);
  cpu.ZeroControlChannelRows();
  gpu.ZeroControlChannelRows();
  EXPECT_EQ(gpu.ParamsToHost(), cpu.params());

  // The bf16 copy was zeroed too: with zero control rows a = -init_val everywhere, so in hard
  // mode nothing merges.
  std::vector<int32_t> in, tgt;
  MakeBatch(2, 17, config.vocab_size, 1, &in, &tgt);
  model::StepOptions opt;
  opt.mode = DmcDecisionMode::kHard;
  const model::ForwardResult r = gpu.Forward(in.data(), tgt.data(), 2, 17, opt);
  EXPECT_EQ(r.merge_fraction, 0.0);
  EXPECT_EQ(cpu.Forward(in.data(), tgt.data(), 2, 17, opt).merge_fraction, 0.0);

  gpu.ZeroGrad();
  gpu.Backward();
  model::CudaAdamWSettings s;
  gpu.OptimizerStep(s);
  EXPECT_EQ(gpu.optimizer_step(), 1);
  gpu.ResetOptimizer();
  EXPECT_EQ(gpu.optimizer_step(), 0);
  std::vector<float> m, v;
  gpu.OptimizerStateToHost(&m, &v);
  for (size_t i = 0; i < m.size(); ++i) ASSERT_TRUE(m[i] == 0 && v[i] == 0) << i;
}

// The Trainer on the CUDA backend follows the CPU Trainer through pre-training, stage 1 (fade)
// and stage 2 (DMC on, control rows zeroed, optimizer reset) with gradient accumulation, and
// SyncToHost hands back weights and moments close to the CPU run's.
TEST_F(CudaModel, TrainerOnCudaTracksCpuThroughThePhases) {
  const Case tc{"trainer", false, DmcDecisionMode::kRelaxed, 1.0f, 128, 2, 2};
  model::LlamaConfig config = MakeConfig(tc);
  trainer::TrainConfig t;
  t.seq_len = 33;
  t.micro_batch = 2;
  t.grad_accum = 2;
  t.seed = 5;
  t.schedule.pretrain_steps = 2;
  t.schedule.stage1_steps = 3;
  t.schedule.stage2_steps = 3;
  t.schedule.cr_target = 3.0f;
  t.schedule.lr = 1e-3f;
  t.schedule.min_lr = 1e-3f;
  t.schedule.retrofit_lr = 1e-3f;
  t.schedule.retrofit_min_lr = 1e-3f;
  ASSERT_TRUE(t.Validate(config).ok());
  model::Llama<float> cpu_model(config, nullptr), gpu_host(config, nullptr);
  ShapeWeights(&cpu_model, 8);
  gpu_host.params() = cpu_model.params();
  parallel::LocalCommunicator dp, tp;
  absl::StatusOr<std::unique_ptr<trainer::CudaBackend>> backend =
      trainer::CudaBackend::Create(gpu_host, t.optimizer, &tp);
  ASSERT_TRUE(backend.ok()) << backend.status();
  trainer::Trainer cpu(t, &cpu_model, CyclingBatches(config.vocab_size), &dp, &tp);
  trainer::Trainer gpu(t, &gpu_host, CyclingBatches(config.vocab_size), &dp, &tp, std::move(*backend));
  EXPECT_STREQ(gpu.backend().name(), "cuda");
  for (int step = 0; step < t.schedule.total_steps(); ++step) {
    absl::StatusOr<trainer::StepMetrics> mc = cpu.Step();
    absl::StatusOr<trainer::StepMetrics> mg = gpu.Step();
    ASSERT_TRUE(mc.ok()) << mc.status();
    ASSERT_TRUE(mg.ok()) << mg.status();
    std::printf("[ train ] %s  gpu: %s\n", trainer::PhaseName(mc->phase),
                trainer::FormatProgress(*mg, t.schedule.total_steps()).c_str());
    std::printf("[ train ] %s  cpu: %s\n", trainer::PhaseName(mc->phase),
                trainer::FormatProgress(*mc, t.schedule.total_steps()).c_str());
    EXPECT_LE(std::fabs(mg->lm_loss - mc->lm_loss) / mc->lm_loss, 2e-2) << "step " << step;
    EXPECT_LE(std::fabs(mg->cr_loss - mc->cr_loss), 0.02) << "step " << step;
    EXPECT_LE(std::fabs(mg->grad_norm - mc->grad_norm) / mc->grad_norm, 5e-2) << "step " << step;
  }
  ASSERT_TRUE(gpu.SyncToHost().ok());
  EXPECT_EQ(gpu.optimizer().step(), cpu.optimizer().step());
  const double err = RelError(gpu_host.params().data(), cpu_model.params().data(),
                              cpu_model.params().size());
  std::printf("[ error ] trainer parameters after %d steps rel %.3e\n", t.schedule.total_steps(), err);
  EXPECT_LE(err, 5e-2);
  // Host → device → host is exact (what a resume does before its first step).
  const std::vector<float> saved = gpu_host.params();
  ASSERT_TRUE(gpu.SyncFromHost().ok());
  ASSERT_TRUE(gpu.SyncToHost().ok());
  EXPECT_EQ(gpu_host.params(), saved);
}

// Shapes the fused attention cannot run are refused with a message, not a crash.
TEST_F(CudaModel, RefusesUnsupportedHeadDim) {
  model::LlamaConfig c = MakeConfig({"d32", false, DmcDecisionMode::kRelaxed, 1.0f, 128, 4, 4});
  EXPECT_THROW(model::LlamaCuda m(c), std::invalid_argument);
}

// A DMC window longer than the scan's backward can stage on this GPU is refused by the backward,
// naming the window, not left to abort the scan; the forward (evaluation) runs it.
TEST_F(CudaModel, RefusesToTrainADmcWindowTooLongForTheScan) {
  model::LlamaConfig c = SmallModelConfig(true, 64, 1, 1);
  // The staging holds min(T, one block's rows + twice the window) gates: a window one past the
  // longest fails only over sequences long enough to need all of it.
  const int window = cuda::dmc_scan_max_window() + 1;
  const int T = 2 * window + 1024;
  c.max_position_embeddings = T;
  c.dmc.window = window;
  ASSERT_FALSE(cuda::dmc_scan_window_fits(T, window));
  ASSERT_TRUE(cuda::dmc_scan_window_fits(T, window - 1));
  model::LlamaCuda m(c);
  const std::vector<int32_t> tokens(T, 1);
  const model::ForwardResult r = m.Forward(tokens.data(), tokens.data(), 1, T, {});
  EXPECT_TRUE(std::isfinite(r.loss));
  try {
    m.Backward();
    FAIL() << "a window of " << window << " tokens was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("DMC window " + std::to_string(window)), std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace dmc::cuda_test
