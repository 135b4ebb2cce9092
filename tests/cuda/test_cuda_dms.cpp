// DMS on the GPU against the CPU references: the decision gates (kernels/dms_gates.h) and the
// vocabulary-parallel KL distillation (kernels/kl_distill.h) on fresh random inputs of several
// shapes, odd ones included, forward and backward; one whole DMS step of the CUDA model (the
// teacher's pass, the student under the delayed-eviction mask, KL + compression loss, every
// trained gradient) in both decision variants and both decision modes, through the trainer's
// backends; and the Trainer's DMS phases on the CUDA backend following the CPU Trainer.
//
// The model tests use the weights of model_test_util.h (bf16-exact, residual channel h = ±1 in
// every embedding), with KV head h's decision input reading only that channel, so the hard
// decisions are mixed but far from the threshold (|a| >= 1.5) and do not flip between the fp32
// CPU model and the bf16 GPU one; in relaxed mode the noisy evictions round(σ(a + noise)) may
// flip where a + noise ≈ 0, which the test counts (as test_cuda_model.cpp does for DMC). The LM
// head is scaled by 4 so that the logits are far from uniform and the KL stands well above the
// bf16 rounding of the logits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda_ops.h"
#include "kernels/dms_gates.h"
#include "kernels/kl_distill.h"
#include "model/llama.h"
#include "model/llama_cuda.h"
#include "parallel/communicator.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/model_test_util.h"
#include "trainer/backend.h"
#include "trainer/cuda_backend.h"
#include "trainer/optimizer.h"
#include "trainer/trainer.h"

namespace dmc::cuda_test {
namespace {

using kernels::DmcDecisionMode;
using model::DmsVariant;

// ---- the decision gates ----

struct GateShape {
  int B, T, Hkv;
};

class CudaDmsGates : public ::testing::TestWithParam<GateShape> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

// The spec's constants (s = 100, c = 5, tau = 0.1), x around c / s so that a = s·x - c falls on
// both sides of 0.
TEST_P(CudaDmsGates, RelaxedForwardAndBackwardMatchCpu) {
  const GateShape g = GetParam();
  const size_t n = size_t(g.B) * g.T * g.Hkv;
  const kernels::DmsGateParams p{100.0f, 5.0f, 0.1f, DmcDecisionMode::kRelaxed};
  std::vector<double> x = randn(n, 0.03, 0.05), noise = randn(n, 1.5);
  std::vector<double> devict = randn(n), dmask = randn(n);
  const std::vector<float> xf = to_f32(x), nf = to_f32(noise), ef = to_f32(devict),
                           mf = to_f32(dmask);
  std::vector<double> logit(n), alpha(n), evict(n), mask(n);
  kernels::dms_gates_forward<double>(logit.data(), alpha.data(), evict.data(), mask.data(),
                                     x.data(), noise.data(), g.B, g.T, g.Hkv, p);

  DevBuf<float> d_x(xf), d_noise(nf), d_logit(n), d_alpha(n), d_evict(n), d_mask(n);
  for (DevBuf<float>* b : {&d_logit, &d_alpha, &d_evict, &d_mask}) b->poison();
  cuda::dms_gates_forward(d_logit, d_alpha, d_evict, d_mask, d_x, d_noise, g.B, g.T, g.Hkv, p);
  const std::vector<float> alpha_g = d_alpha.download(), evict_g = d_evict.download();
  expect_close("dms relaxed logit", d_logit.download(), logit, kF32Tol);
  expect_close("dms relaxed alpha", alpha_g, alpha, kF32Tol);
  expect_close("dms relaxed mask", d_mask.download(), mask, kF32Tol);
  // evict = 1[alpha >= 0.5] of the kernel's own alpha; against the fp64 reference only an alpha
  // within round-off of 0.5 may round the other way.
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(evict_g[i], alpha_g[i] >= 0.5f ? 1.0f : 0.0f) << i;
    if (std::fabs(alpha[i] - 0.5) > 1e-5) {
      ASSERT_EQ(evict_g[i], evict[i]) << i;
    }
  }

  // Backward from the kernel's logit and alpha on both sides, adding onto dx (+=) or writing it
  // (=, into NaN): the gradient scales by s / tau = 1000, so the forwards' fp32 round-off alone
  // would reach 1e-4 near a saturated alpha; from the same inputs the comparison measures the
  // backward kernel.
  const std::vector<double> logit_g = as_double(d_logit.download()), alpha_d = as_double(alpha_g);
  DevBuf<float> d_devict(ef), d_dmask(mf);
  for (bool accumulate : {true, false}) {
    std::vector<double> dx_ref = grad_start(n, accumulate);
    DevBuf<float> d_dx(to_f32(dx_ref));
    kernels::dms_gates_backward<double>(dx_ref.data(), devict.data(), dmask.data(),
                                        logit_g.data(), alpha_d.data(), g.B, g.T, g.Hkv, p,
                                        accumulate);
    cuda::dms_gates_backward(d_dx, d_devict, d_dmask, d_logit, d_alpha, g.B, g.T, g.Hkv, p,
                             accumulate);
    expect_close(with_mode("dms relaxed dx", accumulate), d_dx.download(), dx_ref, 1e-4);
  }
}

// Hard decisions with |a| >= 0.05 (no threshold case for fp32 to round differently): decisions
// and the -inf mask match exactly; the straight-through gradient goes through sigmoid(a) and the
// hard mask passes none.
TEST_P(CudaDmsGates, HardForwardAndBackwardMatchCpu) {
  const GateShape g = GetParam();
  const size_t n = size_t(g.B) * g.T * g.Hkv;
  const kernels::DmsGateParams p{100.0f, 5.0f, 0.1f, DmcDecisionMode::kHard};
  std::vector<double> a = randu(n, 0.05, 5.0), sign = randu(n, -1.0, 1.0), x(n);
  for (size_t i = 0; i < n; ++i) x[i] = ((sign[i] < 0 ? -a[i] : a[i]) + p.offset) / p.scale;
  std::vector<double> devict = randn(n), dmask = randn(n);
  const std::vector<float> xf = to_f32(x), ef = to_f32(devict), mf = to_f32(dmask);
  std::vector<double> logit(n), alpha(n), evict(n), mask(n);
  kernels::dms_gates_forward<double>(logit.data(), alpha.data(), evict.data(), mask.data(),
                                     x.data(), nullptr, g.B, g.T, g.Hkv, p);

  DevBuf<float> d_x(xf), d_logit(n), d_alpha(n), d_evict(n), d_mask(n);
  for (DevBuf<float>* b : {&d_logit, &d_alpha, &d_evict, &d_mask}) b->poison();
  cuda::dms_gates_forward(d_logit, d_alpha, d_evict, d_mask, d_x, nullptr, g.B, g.T, g.Hkv, p);
  expect_close("dms hard logit", d_logit.download(), logit, kF32Tol);
  const std::vector<float> alpha_g = d_alpha.download(), evict_g = d_evict.download(),
                           mask_g = d_mask.download();
  int evicted = 0;
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(alpha_g[i], alpha[i]) << i;
    ASSERT_EQ(evict_g[i], evict[i]) << i;
    ASSERT_EQ(mask_g[i], mask[i]) << i;  // 0 or -inf
    evicted += evict[i] > 0;
  }
  if (n >= 16) {
    EXPECT_GT(evicted, 0);
  }

  DevBuf<float> d_devict(ef), d_dmask(mf);
  for (bool accumulate : {true, false}) {  // added onto random values, or written into NaN
    std::vector<double> dx_ref = grad_start(n, accumulate);
    DevBuf<float> d_dx(to_f32(dx_ref));
    kernels::dms_gates_backward<double>(dx_ref.data(), devict.data(), dmask.data(), logit.data(),
                                        alpha.data(), g.B, g.T, g.Hkv, p, accumulate);
    cuda::dms_gates_backward(d_dx, d_devict, d_dmask, d_logit, d_alpha, g.B, g.T, g.Hkv, p,
                             accumulate);
    expect_close(with_mode("dms hard dx", accumulate), d_dx.download(), dx_ref, 1e-4);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaDmsGates,
                         ::testing::Values(GateShape{1, 1, 1}, GateShape{1, 2, 1},
                                           GateShape{2, 33, 3}, GateShape{3, 129, 4},
                                           GateShape{1, 1000, 7}, GateShape{4, 257, 8}));

// ---- the KL distillation ----

// N rows over a vocabulary of V + extra entries, of which the shard holds the first V (the other
// extra entries are a second shard, when there are any).
struct KlShape {
  int N, V, extra;
};

class CudaKlDistill : public ::testing::TestWithParam<KlShape> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

// Columns [begin, begin + width) of rows [N, Vf].
std::vector<double> Columns(const std::vector<double>& full, int N, int Vf, int begin, int width) {
  std::vector<double> out(size_t(N) * width);
  for (int n = 0; n < N; ++n)
    std::copy_n(full.begin() + size_t(n) * Vf + begin, width, out.begin() + size_t(n) * width);
  return out;
}

TEST_P(CudaKlDistill, ShardForwardAndBackwardMatchCpu) {
  const KlShape k = GetParam();
  const int N = k.N, Vf = k.V + k.extra;
  // Student and teacher logits of different spreads and offsets: KL of order 1.
  std::vector<double> s = randn(size_t(N) * Vf, 2.0), u = randn(size_t(N) * Vf, 1.5, 0.5);
  to_bf16(s);
  to_bf16(u);
  std::vector<double> lse_s(N), lse_u(N), kl(N, 0.0), weight(N, 0.0);
  int counted = 0;
  for (int n = 0; n < N; ++n) counted += n % 3 != 1;  // every third row is not distilled
  for (int n = 0; n < N; ++n) {
    double ms = -INFINITY, mu = -INFINITY, ss = 0, su = 0;
    for (int v = 0; v < Vf; ++v) {
      ms = std::max(ms, s[size_t(n) * Vf + v]);
      mu = std::max(mu, u[size_t(n) * Vf + v]);
    }
    for (int v = 0; v < Vf; ++v) {
      ss += std::exp(s[size_t(n) * Vf + v] - ms);
      su += std::exp(u[size_t(n) * Vf + v] - mu);
    }
    lse_s[n] = ms + std::log(ss);
    lse_u[n] = mu + std::log(su);
    if (n % 3 != 1) weight[n] = 1.0 / counted;
  }
  const std::vector<float> lse_sf = to_f32(lse_s), lse_uf = to_f32(lse_u), wf = to_f32(weight);
  for (int n = 0; n < N; ++n)  // the whole row's KL: what the all-reduce of the partials gives
    for (int v = 0; v < Vf; ++v) {
      const double log_p = s[size_t(n) * Vf + v] - lse_s[n];
      kl[n] += std::exp(log_p) * (log_p - (u[size_t(n) * Vf + v] - lse_u[n]));
    }
  const std::vector<float> klf = to_f32(kl);
  DevBuf<float> d_lse_s(lse_sf), d_lse_u(lse_uf), d_weight(wf), d_kl(klf);

  std::vector<double> gpu_total(N, 0.0);
  struct Shard {
    int begin, width;
  };
  std::vector<Shard> shards = {{0, k.V}};
  if (k.extra > 0) shards.push_back({k.V, k.extra});
  for (const Shard& sh : shards) {
    const std::string tag = " [" + std::to_string(sh.begin) + ", +" + std::to_string(sh.width) + ")";
    std::vector<double> ss = Columns(s, N, Vf, sh.begin, sh.width),
                        us = Columns(u, N, Vf, sh.begin, sh.width);
    std::vector<double> partial(N);
    kernels::kl_distill_shard<double>(partial.data(), ss.data(), us.data(), lse_s.data(),
                                      lse_u.data(), weight.data(), N, sh.width);
    DevBuf<bf16> d_s(to_bf16(ss)), d_u(to_bf16(us));
    DevBuf<float> d_partial(N);
    d_partial.poison();
    cuda::kl_distill_shard(d_partial, d_s, d_u, d_lse_s, d_lse_u, d_weight, N, sh.width);
    const std::vector<float> partial_g = d_partial.download();
    expect_close(("kl partial" + tag).c_str(), partial_g, partial, 1e-4);
    for (int n = 0; n < N; ++n) {
      if (weight[n] == 0) {
        ASSERT_EQ(partial_g[n], 0.0f) << "row " << n << " is not distilled";
      }
      gpu_total[n] += partial_g[n];
    }

    // Added onto random values (+=): a row that is not distilled keeps its values exactly;
    // written into NaN (=): it is set to zeros.
    for (bool accumulate : {true, false}) {
      std::vector<double> ds = grad_start(ss.size(), accumulate);
      const std::vector<bf16> ds0 = to_bf16(ds);
      const double dloss = 0.5;  // a loss scale other than 1
      kernels::kl_distill_shard_backward<double>(ds.data(), ss.data(), us.data(), lse_s.data(),
                                                 lse_u.data(), kl.data(), weight.data(), dloss, N,
                                                 sh.width, accumulate);
      DevBuf<bf16> d_ds(ds0);
      cuda::kl_distill_shard_backward(d_ds, d_s, d_u, d_lse_s, d_lse_u, d_kl, d_weight,
                                      static_cast<float>(dloss), N, sh.width, accumulate);
      const std::vector<bf16> ds_g = d_ds.download();
      expect_close(with_mode("kl ds" + tag, accumulate), ds_g, ds, kBf16Tol);
      for (int n = 0; n < N; ++n)
        if (weight[n] == 0)
          for (int v = 0; v < sh.width; ++v) {
            const size_t i = size_t(n) * sh.width + v;
            ASSERT_EQ(__bfloat162float(ds_g[i]), accumulate ? __bfloat162float(ds0[i]) : 0.0f)
                << "row " << n;
          }
    }
  }
  // The partials of the shards sum to the whole row's KL (the vocabulary-parallel form).
  std::vector<double> kl_weighted(N);
  for (int n = 0; n < N; ++n) kl_weighted[n] = weight[n] != 0 ? kl[n] : 0.0;
  expect_close("kl sum of shard partials", gpu_total, kl_weighted, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaKlDistill,
                         ::testing::Values(KlShape{1, 8, 0}, KlShape{3, 7, 5},
                                           KlShape{17, 64, 64}, KlShape{33, 1001, 999},
                                           KlShape{9, 4096, 0}, KlShape{4, 16000, 16003}));

// ---- the model ----

// The config the retrofit starts from (the teacher's): the same model without DMS.
model::LlamaConfig WithoutDms(model::LlamaConfig c) {
  c.dms = model::DmsConfig();
  return c;
}

// ShapeWeights, then (all × 4, exact in bf16) the LM head, so that the logits are far from
// uniform, and the value and output projections, so that eviction moves the logits well beyond
// their bf16 rounding even where the teacher is the student itself (the adapter variant: KL
// 0.1-0.5 on these shapes, against 5e-4 unscaled); then (a DMS model) ShapeDmsDecisions, the same
// in every layer. Every decision of these tests stays at least 0.1 from the threshold (checked on
// the CPU model by moving the offset by ±0.1).
void ShapeDmsWeights(model::Llama<float>* m, uint64_t seed) {
  ShapeWeights(m, seed);
  const model::LlamaConfig& c = m->config();
  auto scale = [m](const std::string& name) {
    const model::ParamSpec* spec = m->FindParam(name);
    for (size_t i = 0; i < spec->size; ++i) m->params()[spec->offset + i] *= 4.0f;
  };
  scale("lm_head.weight");
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".self_attn.";
    scale(p + "v_proj.weight");
    scale(p + "o_proj.weight");
  }
  ShapeDmsDecisions(m, false);
}

struct StepCase {
  const char* name;
  DmsVariant variant;
  DmcDecisionMode mode;
  int hidden, heads, kv_heads;
};

class CudaDmsStep : public ::testing::TestWithParam<StepCase> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

// One DMS step through the trainer's backends (CpuBackend::Forward runs the teacher and hands
// its logits to the student; the CUDA model runs both passes itself). The query-channel variant's
// frozen teacher is another model (not the student's start), so the KL is of order 1 and checks
// that the teacher's logits come from the frozen copy.
TEST_P(CudaDmsStep, LossesEvictionsAndTrainedGradientsMatchCpu) {
  const StepCase& tc = GetParam();
  const model::LlamaConfig config = DmsModelConfig(tc.variant, tc.hidden, tc.heads, tc.kv_heads);
  const bool adapter = tc.variant == DmsVariant::kAdapter;
  const int B = 2, T = 33, L = config.num_hidden_layers, Hkv = config.num_key_value_heads;
  model::Llama<float> cpu(config, nullptr), gpu_host(config, nullptr);
  ShapeDmsWeights(&cpu, 7);
  gpu_host.params() = cpu.params();
  model::Llama<float> teacher(WithoutDms(config), nullptr);
  ShapeDmsWeights(&teacher, 8);

  trainer::OptimizerConfig oc;
  trainer::AdamW cpu_opt(oc, cpu.params().size());
  parallel::LocalCommunicator tp, dp;
  trainer::CpuBackend cpu_backend(&cpu, &cpu_opt, &tp, &dp);
  absl::StatusOr<std::unique_ptr<trainer::CudaBackend>> created =
      trainer::CudaBackend::Create(gpu_host, oc, &tp);
  ASSERT_TRUE(created.ok()) << created.status();
  trainer::CudaBackend& gpu_backend = **created;
  model::LlamaCuda& gpu = gpu_backend.model();
  if (!adapter) {
    ASSERT_TRUE(cpu_backend.SetTeacher(&teacher).ok());
    ASSERT_TRUE(gpu_backend.SetTeacher(&teacher).ok());
  }

  std::vector<int32_t> in, tgt;
  MakeBatch(B, T, config.vocab_size, 11, &in, &tgt);
  model::StepOptions opt;
  opt.mode = tc.mode;
  opt.noise_seed = 1234;
  opt.step = 3;
  opt.seq0 = 2;
  opt.cr_prior = 0.75f;  // above the eviction fractions: the hinge is active

  cpu_backend.ZeroGrad();
  gpu_backend.ZeroGrad();
  const model::ForwardResult rc = cpu_backend.Forward(in.data(), tgt.data(), B, T, opt);
  ASSERT_TRUE(cpu_backend.Backward(0.5, false).ok());  // a loss scale other than 1
  absl::StatusOr<model::ForwardResult> rg =
      gpu_backend.ForwardBackward(in.data(), tgt.data(), B, T, opt, 0.5, false);
  ASSERT_TRUE(rg.ok()) << rg.status();

  const auto [flips, evictions] = CompareDecisions(gpu, cpu, L);
  const double decisions = static_cast<double>(L) * B * T * Hkv;
  std::printf("[ dms   ] %-18s kl %.6f / %.6f  lm %.6f / %.6f  cr %.6f / %.6f  evict %.4f / %.4f "
              "(gpu / cpu), %d of %.0f decisions evict, %d flips\n",
              tc.name, rg->distill_loss, rc.distill_loss, rg->lm_loss, rc.lm_loss, rg->cr_loss,
              rc.cr_loss, rg->merge_fraction, rc.merge_fraction, evictions, decisions, flips);
  // Mixed decisions, or the test would not exercise the mask.
  EXPECT_GT(evictions, decisions * 0.15);
  EXPECT_LT(evictions, decisions * 0.85);
  EXPECT_LE(flips, tc.mode == DmcDecisionMode::kHard ? 0 : 4);
  EXPECT_GT(rc.distill_loss, 0.0);
  EXPECT_LE(std::fabs(rg->distill_loss - rc.distill_loss) / rc.distill_loss, 3e-2);
  EXPECT_LE(std::fabs(rg->lm_loss - rc.lm_loss) / rc.lm_loss, kLossTol);
  ExpectStatisticsWithinFlips(*rg, rc, flips, L, B, T, Hkv);
  EXPECT_NEAR(rg->loss, rg->distill_loss + rg->cr_loss, 1e-12);  // the LM loss is only reported

  ExpectLogitsClose(gpu, cpu, tc.name, "student logits", kLossTol);

  // Every trained tensor's gradient; the frozen ones (the adapter variant's base) get none here.
  const std::vector<float> gg = gpu.GradsToHost();
  const std::vector<float>& gc = cpu.grads();
  ASSERT_EQ(gg.size(), gc.size());
  int trained = 0;
  for (const auto& spec : cpu.param_specs()) {
    EXPECT_EQ(spec.frozen, adapter && spec.name.find("dms_proj_alpha") == std::string::npos)
        << spec.name;
    if (spec.frozen) {
      for (size_t i = 0; i < spec.size; ++i)
        ASSERT_EQ(gg[spec.offset + i], 0.0f) << "frozen " << spec.name << " got a gradient";
      continue;
    }
    ++trained;
    const double err = RelError(gg.data() + spec.offset, gc.data() + spec.offset, spec.size);
    std::printf("[ error ] %-18s grad %-47s rel %.3e\n", tc.name, spec.name.c_str(), err);
    EXPECT_LE(err, spec.shape.size() == 1 ? kNormGradTol : kGradTol) << spec.name;
  }
  EXPECT_EQ(trained, adapter ? 2 * L : static_cast<int>(cpu.param_specs().size()));
  std::fflush(stdout);
}

INSTANTIATE_TEST_SUITE_P(
    Variants, CudaDmsStep,
    ::testing::Values(
        StepCase{"adapter_relaxed", DmsVariant::kAdapter, DmcDecisionMode::kRelaxed, 128, 2, 2},
        StepCase{"adapter_hard", DmsVariant::kAdapter, DmcDecisionMode::kHard, 128, 2, 2},
        StepCase{"adapter_gqa", DmsVariant::kAdapter, DmcDecisionMode::kRelaxed, 256, 4, 2},
        StepCase{"qchannel_relaxed", DmsVariant::kQueryChannel, DmcDecisionMode::kRelaxed, 128,
                 2, 2},
        StepCase{"qchannel_hard", DmsVariant::kQueryChannel, DmcDecisionMode::kHard, 128, 2, 2},
        StepCase{"qchannel_gqa_hard", DmsVariant::kQueryChannel, DmcDecisionMode::kHard, 256, 4,
                 2}),
    [](const ::testing::TestParamInfo<StepCase>& info) { return std::string(info.param.name); });

class CudaDmsModel : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

// A teacher whose layout is not the student's base is refused with a message.
TEST_F(CudaDmsModel, RefusesATeacherOfAnotherLayout) {
  const model::LlamaConfig config = DmsModelConfig(DmsVariant::kQueryChannel, 128, 2, 2);
  model::LlamaCuda gpu(config);
  model::LlamaConfig other = WithoutDms(config);
  other.intermediate_size *= 2;
  const model::Llama<float> wrong(other, nullptr);
  EXPECT_THROW(gpu.SetTeacher(wrong), std::invalid_argument);
}

// The Trainer on the CUDA backend follows the CPU Trainer through a DMS retrofit: stage 1 (the
// query-channel variant frees its channel first), then stages 2 and 3 (eviction on, the CR target
// ramped then held, the teacher = the model the retrofit started from), with gradient
// accumulation; SyncToHost hands back weights close to the CPU run's, the frozen base untouched.
class CudaDmsTrainer : public ::testing::TestWithParam<DmsVariant> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_P(CudaDmsTrainer, TracksCpuThroughTheStages) {
  const DmsVariant variant = GetParam();
  const bool adapter = variant == DmsVariant::kAdapter;
  model::LlamaConfig config = DmsModelConfig(variant, 128, 2, 2);
  config.dms.enabled = false;  // the trainer switches eviction on at stage 2
  trainer::TrainConfig t;
  t.seq_len = 33;
  t.micro_batch = 2;
  t.grad_accum = 2;
  t.seed = 5;
  t.schedule.stage1_steps = adapter ? 0 : 2;
  t.schedule.stage2_steps = 3;
  t.schedule.stage3_steps = 2;
  t.schedule.cr_target = 3.0f;
  t.schedule.retrofit_lr = 1e-3f;
  t.schedule.retrofit_min_lr = 1e-3f;
  ASSERT_TRUE(t.Validate(config).ok());
  model::Llama<float> cpu_model(config, nullptr), gpu_host(config, nullptr);
  ShapeDmsWeights(&cpu_model, 8);
  gpu_host.params() = cpu_model.params();
  const std::vector<float> initial = cpu_model.params();
  // The query-channel variant's teacher: the model the retrofit starts from (same layout).
  model::Llama<float> teacher(WithoutDms(config), nullptr);
  teacher.params() = cpu_model.params();

  parallel::LocalCommunicator dp, tp;
  absl::StatusOr<std::unique_ptr<trainer::CudaBackend>> backend =
      trainer::CudaBackend::Create(gpu_host, t.optimizer, &tp);
  ASSERT_TRUE(backend.ok()) << backend.status();
  trainer::Trainer cpu(t, &cpu_model, CyclingBatches(config.vocab_size), &dp, &tp);
  trainer::Trainer gpu(t, &gpu_host, CyclingBatches(config.vocab_size), &dp, &tp, std::move(*backend));
  if (!adapter) {
    ASSERT_TRUE(cpu.backend().SetTeacher(&teacher).ok());
    ASSERT_TRUE(gpu.backend().SetTeacher(&teacher).ok());
  }
  for (int step = 0; step < t.schedule.total_steps(); ++step) {
    absl::StatusOr<trainer::StepMetrics> mc = cpu.Step();
    absl::StatusOr<trainer::StepMetrics> mg = gpu.Step();
    ASSERT_TRUE(mc.ok()) << mc.status();
    ASSERT_TRUE(mg.ok()) << mg.status();
    std::printf("[ train ] %s  gpu: %s\n", trainer::PhaseName(mc->phase),
                trainer::FormatProgress(*mg, t.schedule.total_steps()).c_str());
    std::printf("[ train ] %s  cpu: %s\n", trainer::PhaseName(mc->phase),
                trainer::FormatProgress(*mc, t.schedule.total_steps()).c_str());
    ASSERT_EQ(mg->phase, mc->phase);
    const bool evicting = mc->phase == trainer::Phase::kStage2 || mc->phase == trainer::Phase::kStage3;
    EXPECT_EQ(mc->distill_loss > 0, evicting) << "step " << step;
    EXPECT_LE(std::fabs(mg->distill_loss - mc->distill_loss), 5e-2 * mc->distill_loss)
        << "step " << step;
    EXPECT_LE(std::fabs(mg->lm_loss - mc->lm_loss) / mc->lm_loss, 2e-2) << "step " << step;
    EXPECT_LE(std::fabs(mg->cr_loss - mc->cr_loss), 0.02) << "step " << step;
    EXPECT_LE(std::fabs(mg->grad_norm - mc->grad_norm) / mc->grad_norm, 5e-2) << "step " << step;
  }
  ASSERT_TRUE(gpu.SyncToHost().ok());
  EXPECT_EQ(gpu.optimizer().step(), cpu.optimizer().step());
  const double err = RelError(gpu_host.params().data(), cpu_model.params().data(),
                              cpu_model.params().size());
  std::printf("[ error ] DMS trainer parameters after %d steps rel %.3e\n",
              t.schedule.total_steps(), err);
  EXPECT_LE(err, 5e-2);
  for (const model::ParamSpec& spec : cpu_model.param_specs()) {
    if (!spec.frozen) continue;
    for (size_t i = 0; i < spec.size; ++i)
      ASSERT_EQ(gpu_host.params()[spec.offset + i], initial[spec.offset + i])
          << "frozen " << spec.name << " was updated";
  }
}

INSTANTIATE_TEST_SUITE_P(Variants, CudaDmsTrainer,
                         ::testing::Values(DmsVariant::kAdapter, DmsVariant::kQueryChannel),
                         [](const ::testing::TestParamInfo<DmsVariant>& info) {
                           return std::string(model::DmsVariantName(info.param));
                         });

}  // namespace
}  // namespace dmc::cuda_test
