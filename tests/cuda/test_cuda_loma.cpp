// LoMA on the GPU against the CPU references: the attention kernels under the LoMA block mask
// (forward out and lse, backward dq/dk/dv accumulated into random values) for zone layouts from
// chunks shorter than a tile to memory zones longer than one, partial last chunks, odd head counts,
// GQA and both head dims; RoPE at explicit positions; a whole LlamaCuda LoMA training step
// (reading and repetition losses, logits, every gradient tensor) against model::Llama; and the
// Trainer on the CUDA backend with --method=loma against the CPU Trainer.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "kernels/loma_attention.h"
#include "kernels/loma_mask.h"
#include "kernels/rope_positions.h"
#include "model/llama.h"
#include "model/llama_cuda.h"
#include "model/loma.h"
#include "parallel/communicator.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/cuda/model_test_util.h"
#include "trainer/cuda_backend.h"
#include "trainer/trainer.h"

namespace dmc::cuda_test {
namespace {
namespace K = dmc::kernels;
namespace C = dmc::cuda;

// ---------------------------------------------------------------- attention kernels

struct AttnCase {
  int B, T, H, Hkv, D;
  int t, c;        // zones; the chunk is S = t·(2c+1) positions
  double q_scale;  // larger values give peakier softmax rows
};

std::string name_of(const AttnCase& a) {
  const K::LomaZones z{a.t, a.c};
  return "B" + std::to_string(a.B) + " T" + std::to_string(a.T) + " H" + std::to_string(a.H) +
         "/" + std::to_string(a.Hkv) + " D" + std::to_string(a.D) + " t" + std::to_string(a.t) +
         " c" + std::to_string(a.c) + " (S" + std::to_string(z.chunk()) + ")";
}

void run_attention_case(const AttnCase& a) {
  const K::LomaZones z{a.t, a.c};
  const size_t nq = static_cast<size_t>(a.B) * a.T * a.H * a.D;
  const size_t nk = static_cast<size_t>(a.B) * a.T * a.Hkv * a.D;
  const size_t nl = static_cast<size_t>(a.B) * a.H * a.T;
  const float scale = 1.0f / std::sqrt(static_cast<float>(a.D));
  auto q = randn(nq, a.q_scale), k = randn(nk), v = randn(nk);
  auto qb = to_bf16(q), kb = to_bf16(k), vb = to_bf16(v);
  DevBuf<bf16> dq(qb), dk(kb), dv(vb), dout(nq);
  DevBuf<float> dlse(nl);
  dout.poison();
  dlse.poison();
  C::loma_attention_forward(dout, dlse, dq, dk, dv, a.B, a.T, a.H, a.Hkv, a.D, z, scale);
  std::vector<double> out(nq), lse(nl);
  K::loma_attention_forward<double>(out.data(), lse.data(), q.data(), k.data(), v.data(), a.B,
                                    a.T, a.H, a.Hkv, a.D, z, scale);
  const std::string n = name_of(a);
  expect_close(("loma fwd out  " + n).c_str(), dout.download(), out, kBf16Tol);
  expect_close(("loma fwd lse  " + n).c_str(), dlse.download(), lse, 1e-4);

  // The backward adds onto random values (+=) or writes into NaN (=); it reads the kernel's own
  // out and lse, as the model does, and the reference reads its own.
  auto go = randn(nq);
  auto gob = to_bf16(go);
  DevBuf<bf16> dgo(gob);
  for (bool accumulate : {true, false}) {
    auto gq = grad_start(nq, accumulate, 0.01), gk = grad_start(nk, accumulate, 0.01),
         gv = grad_start(nk, accumulate, 0.01);
    auto gqb = to_bf16(gq), gkb = to_bf16(gk), gvb = to_bf16(gv);
    DevBuf<bf16> dgq(gqb), dgk(gkb), dgv(gvb);
    C::loma_attention_backward(dgq, dgk, dgv, dgo, dq, dk, dv, dout, dlse, a.B, a.T, a.H, a.Hkv,
                               a.D, z, scale, accumulate);
    K::loma_attention_backward<double>(gq.data(), gk.data(), gv.data(), go.data(), q.data(),
                                       k.data(), v.data(), out.data(), lse.data(), a.B, a.T, a.H,
                                       a.Hkv, a.D, z, scale, accumulate);
    expect_close(with_mode("loma bwd dq   " + n, accumulate), dgq.download(), gq, kBf16Tol);
    expect_close(with_mode("loma bwd dk   " + n, accumulate), dgk.download(), gk, kBf16Tol);
    expect_close(with_mode("loma bwd dv   " + n, accumulate), dgv.download(), gv, kBf16Tol);
  }
}

class CudaLomaAttention : public ::testing::TestWithParam<AttnCase> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_P(CudaLomaAttention, MatchesCpuReference) { run_attention_case(GetParam()); }

// 32 queries / keys per CTA and 32-row tiles: the shapes put chunks shorter and longer than a
// tile, memory zones longer than a tile (t 40), more than 32 memory slots (several memory CTAs
// in the dk/dv pass), partial last chunks and sequences shorter than a tile.
INSTANTIATE_TEST_SUITE_P(
    Zones, CudaLomaAttention,
    ::testing::Values(AttnCase{2, 72, 4, 2, 64, 2, 4, 1.0},     // 4 chunks of 18
                      AttnCase{1, 100, 3, 1, 128, 1, 1, 1.0},   // S 3: 33 chunks + 1, 33 slots
                      AttnCase{2, 240, 2, 2, 128, 16, 2, 1.0},  // S 80, memory zone of 16
                      AttnCase{1, 340, 6, 2, 64, 4, 8, 2.0},    // S 68, segments of 32
                      AttnCase{1, 400, 5, 5, 64, 3, 5, 1.0},    // S 33: 12 chunks + 4 tokens
                      AttnCase{1, 290, 2, 1, 128, 40, 1, 1.0},  // memory zone of 40 > a tile
                      AttnCase{3, 14, 2, 1, 64, 2, 3, 1.0},     // one chunk, T < a tile
                      AttnCase{1, 648, 2, 1, 128, 8, 4, 3.0}),  // 9 chunks of 72, 72 slots
    [](const ::testing::TestParamInfo<AttnCase>& info) {
      return "case" + std::to_string(info.index);
    });

// ---------------------------------------------------------------- RoPE at positions

class CudaLoma : public ::testing::Test {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_F(CudaLoma, RopeAtPositionsMatchesCpu) {
  const int B = 2, H = 3;
  const K::LomaZones z{2, 4};
  std::mt19937_64 pick(rng()());
  for (bool layout : {true, false}) {  // LoMA's position ids, or arbitrary ones (with repeats)
    const int T = layout ? 3 * z.chunk() : 41;
    std::vector<int32_t> positions(T);
    for (int p = 0; p < T; ++p)
      positions[p] = layout ? K::loma_position(p, z) : static_cast<int32_t>(pick() % 2000);
    DevBuf<int32_t> dpos(positions);
    for (bool keep : {false, true})
      for (int D : {64, 128}) {
        const std::string what = std::string(layout ? "layout" : "random") + " positions D" +
                                 std::to_string(D) + (keep ? " keep_last" : "");
        const size_t n = static_cast<size_t>(B) * T * H * D;
        auto x = randn(n);
        auto xb = to_bf16(x);
        DevBuf<bf16> dx(xb), dout(n);
        dout.poison();
        C::rope_forward_positions(dout, dx, B, T, H, D, dpos, 10000.f, keep);
        std::vector<double> ref(n);
        K::rope_forward_positions<double>(ref.data(), x.data(), B, T, H, D, positions.data(),
                                          10000.f, keep);
        expect_close(("rope fwd " + what).c_str(), dout.download(), ref, kBf16Tol);
        {
          // The same tokens as rows of a wider product (the decode step's Q, K, V): equal bits.
          const long hd = static_cast<long>(H) * D, ld = hd + 2 * D;
          std::vector<bf16> rows(static_cast<size_t>(B) * T * ld, __float2bfloat16(7.f));
          for (long t = 0; t < static_cast<long>(B) * T; ++t)
            std::copy_n(xb.begin() + t * hd, hd, rows.begin() + t * ld);
          DevBuf<bf16> drows(rows), dout2(n);
          C::rope_forward_positions(dout2, drows, B, T, H, D, dpos, 10000.f, keep, nullptr, ld);
          EXPECT_TRUE(same_bits(dout2.download(), dout.download()))
              << "rope fwd from wider rows, " << what;
        }

        for (bool accumulate : {true, false}) {
          auto g = randn(n), acc = grad_start(n, accumulate);
          auto gb = to_bf16(g), accb = to_bf16(acc);
          DevBuf<bf16> dg(gb), dacc(accb);
          C::rope_backward_positions(dacc, dg, B, T, H, D, dpos, 10000.f, keep, accumulate);
          K::rope_backward_positions<double>(acc.data(), g.data(), B, T, H, D, positions.data(),
                                             10000.f, keep, accumulate);
          expect_close(with_mode("rope bwd " + what, accumulate), dacc.download(), acc, kBf16Tol);
        }
      }
  }
}

// ---------------------------------------------------------------- the model

struct ModelCase {
  const char* name;
  int hidden, heads, kv_heads;
  int t, c;
};

constexpr int kBaseVocab = 64;

// A LoMA model grown from a random base model (the dmc-train path), its weights rounded to bf16
// so that both models compute with the same values. Matrices at std 0.06 rather than 0.02: the
// attention rows are then far from uniform, so the mask and the positions matter.
std::unique_ptr<model::Llama<float>> LomaModel(const ModelCase& mc, uint64_t seed) {
  model::LlamaConfig config;
  config.vocab_size = kBaseVocab;
  config.hidden_size = mc.hidden;
  config.intermediate_size = 2 * mc.hidden;
  config.num_hidden_layers = 2;
  config.num_attention_heads = mc.heads;
  config.num_key_value_heads = mc.kv_heads;
  config.max_position_embeddings = 64;
  model::Llama<float> base(config, nullptr);
  base.InitRandom(seed);
  for (const auto& s : base.param_specs())
    if (s.shape.size() == 2)
      for (size_t i = 0; i < s.size; ++i) base.params()[s.offset + i] *= 3.0f;
  std::unique_ptr<model::Llama<float>> m = model::AddLomaTokens(base, nullptr, {mc.t, mc.c});
  for (float& w : m->params()) w = RoundBf16(w);
  return m;
}

// B random plain windows of `plain` tokens (a few targets unlabelled), in the LoMA layout.
model::LomaBatch LomaBatchOf(const model::LomaLayout& layout, int B, int plain, uint64_t seed) {
  std::mt19937_64 r(seed);
  std::vector<int32_t> in(static_cast<size_t>(B) * plain), tgt(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    in[i] = static_cast<int32_t>(r() % kBaseVocab);
    tgt[i] = static_cast<int32_t>(r() % kBaseVocab);
  }
  tgt[3] = -1;  // unlabelled reading positions are left out of the reading mean
  tgt[in.size() - 2] = -1;
  absl::StatusOr<model::LomaBatch> batch =
      model::LomaTransform(layout, in.data(), tgt.data(), B, plain);
  EXPECT_TRUE(batch.ok()) << batch.status();
  return *batch;
}

class CudaLomaModelStep : public ::testing::TestWithParam<ModelCase> {
 protected:
  void SetUp() override { DMC_REQUIRE_GPU(); }
};

TEST_P(CudaLomaModelStep, LossesAndGradientsMatchCpu) {
  const ModelCase& mc = GetParam();
  const std::unique_ptr<model::Llama<float>> cpu = LomaModel(mc, 7);
  const model::LomaLayout& layout = cpu->config().loma;
  ASSERT_TRUE(layout.enabled());
  model::LlamaCuda gpu(cpu->config());
  gpu.CopyParamsFromHost(*cpu);

  // 4 segments: 4·t·c text positions, within max_position_embeddings 64.
  const int B = 2, plain = 4 * layout.zones.segment();
  const model::LomaBatch batch = LomaBatchOf(layout, B, plain, 11);
  model::StepOptions opt;
  opt.loma = layout.zones;
  cpu->ZeroGrad();
  gpu.ZeroGrad();
  const model::ForwardResult rc =
      cpu->Forward(batch.tokens.data(), batch.targets.data(), B, batch.seq_len, opt);
  const model::ForwardResult rg =
      gpu.Forward(batch.tokens.data(), batch.targets.data(), B, batch.seq_len, opt);
  cpu->Backward(0.5);  // a loss scale other than 1 (gradient accumulation)
  gpu.Backward(0.5);

  std::printf("[ loma  ] %-12s T %d  reading %.6f / %.6f  repetition %.6f / %.6f (gpu / cpu)\n",
              mc.name, batch.seq_len, rg.lm_loss, rc.lm_loss, rg.rep_loss, rc.rep_loss);
  EXPECT_TRUE(std::isfinite(rg.loss));
  EXPECT_GT(rc.rep_loss, 0.0);
  EXPECT_LE(std::fabs(rg.lm_loss - rc.lm_loss) / rc.lm_loss, kLossTol) << "reading-zone loss";
  EXPECT_LE(std::fabs(rg.rep_loss - rc.rep_loss) / rc.rep_loss, kLossTol) << "repetition loss";
  EXPECT_EQ(rg.cr_loss, 0.0);
  EXPECT_EQ(rg.merge_fraction, 0.0);
  EXPECT_NEAR(rg.loss, rg.lm_loss + rg.rep_loss, 1e-12);

  const std::vector<float> logits = gpu.LogitsToHost();
  ASSERT_EQ(logits.size(), cpu->logits().size());
  const double logit_err = RelError(logits.data(), cpu->logits().data(), logits.size());
  std::printf("[ error ] %-12s %-52s rel %.3e\n", mc.name, "logits", logit_err);
  EXPECT_LE(logit_err, kLossTol) << "logits";

  const std::vector<float> gg = gpu.GradsToHost();
  const std::vector<float>& gc = cpu->grads();
  ASSERT_EQ(gg.size(), gc.size());
  for (const auto& spec : cpu->param_specs()) {
    const double err = RelError(gg.data() + spec.offset, gc.data() + spec.offset, spec.size);
    std::printf("[ error ] %-12s grad %-47s rel %.3e\n", mc.name, spec.name.c_str(), err);
    EXPECT_LE(err, spec.shape.size() == 1 ? kNormGradTol : kGradTol) << spec.name;
  }
  // The <m> and <r> rows of the embedding are trained (through the repetition loss and the
  // memory slots every later query reads).
  const model::ParamSpec* emb = cpu->FindParam("model.embed_tokens.weight");
  const size_t Cw = cpu->config().hidden_size;
  for (int32_t id : {layout.memory_token, layout.repetition_token}) {
    const size_t row = emb->offset + static_cast<size_t>(id) * Cw;
    const double err = RelError(gg.data() + row, gc.data() + row, Cw);
    std::printf("[ error ] %-12s grad embedding row %-35d rel %.3e\n", mc.name, id, err);
    EXPECT_LE(err, kGradTol) << "embedding row " << id;
  }
  std::fflush(stdout);

  // Gradients accumulate: a second identical step doubles them.
  gpu.Forward(batch.tokens.data(), batch.targets.data(), B, batch.seq_len, opt);
  gpu.Backward(0.5);
  const std::vector<float> g2 = gpu.GradsToHost();
  std::vector<float> twice(gg.size());
  for (size_t i = 0; i < gg.size(); ++i) twice[i] = 2 * gg[i];
  EXPECT_LE(RelError(g2.data(), twice.data(), twice.size()), 1e-2) << "Backward must accumulate";
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, CudaLomaModelStep,
    ::testing::Values(ModelCase{"mha_t2_c4", 128, 2, 2, 2, 4},     // D 64, S 18
                      ModelCase{"gqa_t3_c2", 256, 4, 2, 3, 2},     // D 64, S 15
                      ModelCase{"gqa3_t4_c3", 192, 3, 1, 4, 3},    // 3 heads on 1 KV head, S 28
                      ModelCase{"d128_t1_c8", 256, 2, 1, 1, 8}),   // D 128, S 17
    [](const ::testing::TestParamInfo<ModelCase>& info) { return std::string(info.param.name); });

// A step LlamaCuda cannot take the way the CPU model cannot is refused the same way.
TEST_F(CudaLoma, RefusesWhatTheCpuModelRefuses) {
  const std::unique_ptr<model::Llama<float>> cpu = LomaModel({"refuse", 128, 2, 2, 2, 4}, 3);
  model::LlamaCuda gpu(cpu->config());
  const int S = cpu->config().loma.zones.chunk();
  std::vector<int32_t> tokens(S + 1, 1), targets(S + 1, 1);
  model::StepOptions opt;
  opt.loma = cpu->config().loma.zones;
  // not whole chunks
  EXPECT_THROW(gpu.Forward(tokens.data(), targets.data(), 1, S + 1, opt), std::invalid_argument);
  EXPECT_THROW(cpu->Forward(tokens.data(), targets.data(), 1, S + 1, opt), std::invalid_argument);
}

// ---------------------------------------------------------------- the trainer

// dmc-train --device=cuda --method=loma: the Trainer on the CUDA backend follows the CPU Trainer
// through LoMA steps with gradient accumulation (losses, repetition loss, gradient norm), and the
// weights handed back stay close.
TEST_F(CudaLoma, TrainerOnCudaTracksCpu) {
  const ModelCase mc{"trainer", 128, 2, 2, 2, 4};
  const std::unique_ptr<model::Llama<float>> cpu_model = LomaModel(mc, 8);
  model::Llama<float> gpu_host(cpu_model->config(), nullptr);
  gpu_host.params() = cpu_model->params();
  trainer::TrainConfig t;
  t.seq_len = 32;  // 4 segments of t·c = 8 tokens
  t.micro_batch = 2;
  t.grad_accum = 2;
  t.seed = 5;
  t.schedule.pretrain_steps = 5;
  t.schedule.lr = 1e-3f;
  t.schedule.min_lr = 1e-3f;
  t.loma = cpu_model->config().loma;
  ASSERT_TRUE(t.Validate(cpu_model->config()).ok()) << t.Validate(cpu_model->config());
  auto batches = [&]() {
    auto n = std::make_shared<int>(0);
    return [n](std::vector<int32_t>* in, std::vector<int32_t>* tgt) {
      std::mt19937_64 r(100 + (*n)++ % 3);
      in->resize(2 * 32);
      tgt->resize(in->size());
      for (size_t i = 0; i < in->size(); ++i) {
        (*in)[i] = static_cast<int32_t>(r() % kBaseVocab);
        (*tgt)[i] = static_cast<int32_t>(r() % kBaseVocab);
      }
      return absl::OkStatus();
    };
  };
  parallel::LocalCommunicator dp, tp;
  absl::StatusOr<std::unique_ptr<trainer::CudaBackend>> backend =
      trainer::CudaBackend::Create(gpu_host, t.optimizer, &tp);
  ASSERT_TRUE(backend.ok()) << backend.status();
  trainer::Trainer cpu(t, cpu_model.get(), batches(), &dp, &tp);
  trainer::Trainer gpu(t, &gpu_host, batches(), &dp, &tp, std::move(*backend));
  for (int step = 0; step < t.schedule.total_steps(); ++step) {
    absl::StatusOr<trainer::StepMetrics> mcpu = cpu.Step();
    absl::StatusOr<trainer::StepMetrics> mgpu = gpu.Step();
    ASSERT_TRUE(mcpu.ok()) << mcpu.status();
    ASSERT_TRUE(mgpu.ok()) << mgpu.status();
    const int steps = t.schedule.total_steps();
    std::printf("[ train ] gpu: %s\n", trainer::FormatProgress(*mgpu, steps).c_str());
    std::printf("[ train ] cpu: %s\n", trainer::FormatProgress(*mcpu, steps).c_str());
    EXPECT_EQ(mgpu->phase, trainer::Phase::kLoma);
    EXPECT_LE(std::fabs(mgpu->lm_loss - mcpu->lm_loss) / mcpu->lm_loss, 2e-2) << "step " << step;
    EXPECT_LE(std::fabs(mgpu->rep_loss - mcpu->rep_loss) / mcpu->rep_loss, 2e-2) << "step " << step;
    EXPECT_LE(std::fabs(mgpu->grad_norm - mcpu->grad_norm) / mcpu->grad_norm, 5e-2)
        << "step " << step;
  }
  ASSERT_TRUE(gpu.SyncToHost().ok());
  const double err = RelError(gpu_host.params().data(), cpu_model->params().data(),
                              cpu_model->params().size());
  std::printf("[ error ] LoMA trainer parameters after %d steps rel %.3e\n",
              t.schedule.total_steps(), err);
  EXPECT_LE(err, 5e-2);
}

}  // namespace
}  // namespace dmc::cuda_test
