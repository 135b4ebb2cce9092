// Checkpoints: bit-exact resume across DMC phases, atomic saves, clear errors on bad input, and
// the Hugging Face export that round-trips through our import.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>

#include "model/hf_config.h"
#include "model/hf_weights.h"
#include "model/llama.h"
#include "trainer/checkpoint.h"
#include "trainer/export.h"
#include "trainer/trainer.h"

namespace dmc::trainer {
namespace {
namespace fs = std::filesystem;

model::LlamaConfig Config() {
  model::LlamaConfig c;
  c.vocab_size = 29;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 64;
  c.dmc.window = 4;
  return c;
}

TrainConfig Training() {
  TrainConfig tc;
  tc.seq_len = 12;
  tc.micro_batch = 3;
  tc.schedule.pretrain_steps = 4;
  tc.schedule.stage1_steps = 2;
  tc.schedule.stage2_steps = 4;
  tc.schedule.lr = 5e-3f;
  tc.schedule.retrofit_lr = 5e-3f;
  tc.schedule.cr_target = 3.0f;
  return tc;
}

// A batch source whose batch depends on a counter that the test can reset, standing in for the
// loader's cursor.
struct CountingBatches {
  int next = 0;
  BatchSource Source(int B, int T, int vocab) {
    return [this, B, T, vocab](std::vector<int32_t>* in, std::vector<int32_t>* tgt) {
      std::mt19937_64 rng(1000 + next++);
      in->resize(B * T);
      tgt->resize(B * T);
      for (auto& x : *in) x = static_cast<int32_t>(rng() % vocab);
      for (auto& x : *tgt) x = static_cast<int32_t>(rng() % vocab);
      return absl::OkStatus();
    };
  }
};

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("dmc_ckpt_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  fs::path dir_;
  parallel::LocalCommunicator local_;
};

TEST_F(CheckpointTest, ResumeContinuesBitExactlyAcrossPhases) {
  const model::LlamaConfig mc = Config();
  const TrainConfig tc = Training();
  const int total = tc.schedule.total_steps(), half = 5;  // the split falls inside stage 1

  // Straight run.
  model::Llama<float> straight(mc, nullptr);
  straight.InitRandom(tc.seed);
  CountingBatches straight_batches;
  Trainer a(tc, &straight, straight_batches.Source(tc.micro_batch, tc.seq_len, mc.vocab_size),
            &local_, &local_);
  std::vector<double> straight_losses;
  for (int s = 0; s < total; ++s) straight_losses.push_back(a.Step()->loss);

  // Interrupted run: half the steps, checkpoint, everything rebuilt from the checkpoint.
  Checkpointer ckpt(dir_.string(), 2, &local_, 0, 1, 0);
  {
    model::Llama<float> first(mc, nullptr);
    first.InitRandom(tc.seed);
    CountingBatches batches;
    Trainer b(tc, &first, batches.Source(tc.micro_batch, tc.seq_len, mc.vocab_size), &local_,
              &local_);
    for (int s = 0; s < half; ++s) ASSERT_TRUE(b.Step().ok());
    TrainingState state{b.step(), b.tokens(), b.optimizer().step(), std::to_string(batches.next),
                        tc.seed, ""};
    ASSERT_TRUE(ckpt.Save(first, b.optimizer(), state).ok());
  }
  model::Llama<float> resumed(mc, nullptr);
  resumed.InitRandom(tc.seed + 1);  // different weights: the checkpoint must overwrite them all
  CountingBatches batches;
  Trainer c(tc, &resumed, batches.Source(tc.micro_batch, tc.seq_len, mc.vocab_size), &local_,
            &local_);
  absl::StatusOr<TrainingState> state = ckpt.LoadLatest(resumed, c.optimizer());
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->step, half);
  c.set_step(state->step);
  c.set_tokens(state->tokens);
  batches.next = std::stoi(state->loader_cursor);
  for (int s = half; s < total; ++s) {
    absl::StatusOr<StepMetrics> m = c.Step();
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->loss, straight_losses[s]) << "step " << s + 1;
  }
  EXPECT_EQ(resumed.params(), straight.params());
  EXPECT_EQ(c.tokens(), a.tokens());
}

TEST_F(CheckpointTest, InterruptedSaveKeepsThePreviousCheckpointAndPrunes) {
  const model::LlamaConfig mc = Config();
  model::Llama<float> m(mc, nullptr);
  m.InitRandom(3);
  AdamW opt(OptimizerConfig{}, m.params().size());
  Checkpointer ckpt(dir_.string(), 2, &local_, 0, 1, 0);
  for (int step : {1, 2, 3}) ASSERT_TRUE(ckpt.Save(m, opt, {step, 0, 0, "c", 1, ""}).ok());
  EXPECT_FALSE(fs::exists(dir_ / Checkpointer::StepDirName(1))) << "keep_last = 2";
  EXPECT_TRUE(fs::exists(dir_ / Checkpointer::StepDirName(2)));

  // A save killed half-way leaves only its temporary directory behind.
  const fs::path partial = dir_ / (".tmp-" + Checkpointer::StepDirName(4));
  fs::create_directories(partial);
  std::ofstream(partial / "model-tp0.safetensors") << "garbage";
  model::Llama<float> loaded(mc, nullptr);
  AdamW loaded_opt(OptimizerConfig{}, loaded.params().size());
  absl::StatusOr<TrainingState> st = ckpt.LoadLatest(loaded, loaded_opt);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->step, 3);
  EXPECT_EQ(loaded.params(), m.params());
  // The next save replaces the leftover.
  ASSERT_TRUE(ckpt.Save(m, opt, {4, 0, 0, "c", 1, ""}).ok());
  EXPECT_FALSE(fs::exists(partial));
  EXPECT_EQ(ckpt.LoadLatest(loaded, loaded_opt)->step, 4);
}

TEST_F(CheckpointTest, BadCheckpointsGiveClearErrors) {
  const model::LlamaConfig mc = Config();
  model::Llama<float> m(mc, nullptr);
  AdamW opt(OptimizerConfig{}, m.params().size());
  Checkpointer ckpt(dir_.string(), 0, &local_, 0, 1, 0);

  absl::StatusOr<TrainingState> st = ckpt.LoadLatest(m, opt);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("latest"), std::string::npos) << st.status();

  ASSERT_TRUE(ckpt.Save(m, opt, {7, 0, 0, "c", 1, ""}).ok());
  model::LlamaConfig other = mc;
  other.hidden_size = 32;
  model::Llama<float> different(other, nullptr);
  AdamW different_opt(OptimizerConfig{}, different.params().size());
  st = ckpt.LoadLatest(different, different_opt);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("hidden_size"), std::string::npos) << st.status();

  // Truncate the weights file: the error names it.
  const fs::path weights = dir_ / Checkpointer::StepDirName(7) / "model-tp0.safetensors";
  fs::resize_file(weights, fs::file_size(weights) / 2);
  st = ckpt.LoadLatest(m, opt);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("model-tp0.safetensors"), std::string::npos) << st.status();
}

TEST_F(CheckpointTest, ExportRoundTripsThroughImport) {
  model::LlamaConfig mc = Config();
  mc.dmc.enabled = true;
  model::Llama<float> m(mc, nullptr);
  m.InitRandom(11);
  AdamW opt(OptimizerConfig{}, m.params().size());
  Checkpointer ckpt((dir_ / "ckpt").string(), 1, &local_, 0, 1, 0);
  ASSERT_TRUE(ckpt.Save(m, opt, {1, 0, 0, "c", 1, ""}).ok());

  // fp32, forced into several shards: bit-exact.
  const fs::path out = dir_ / "hf32";
  ASSERT_TRUE(ExportCheckpoint((dir_ / "ckpt").string(), out.string(), model::DType::kF32, 20000).ok());
  EXPECT_TRUE(fs::exists(out / "model.safetensors.index.json"));
  absl::StatusOr<model::LlamaConfig> cfg = model::ReadHfConfig((out / "config.json").string());
  ASSERT_TRUE(cfg.ok()) << cfg.status();
  EXPECT_TRUE(cfg->dmc.enabled);
  EXPECT_EQ(cfg->dmc.window, mc.dmc.window);
  model::Llama<float> imported(*cfg, nullptr);
  ASSERT_TRUE(model::ImportHfWeights(out.string(), &imported).ok());
  EXPECT_EQ(imported.params(), m.params());

  // bf16: within bf16 rounding (relative 2^-8).
  const fs::path out16 = dir_ / "hf16";
  ASSERT_TRUE(ExportCheckpoint((dir_ / "ckpt").string(), out16.string(), model::DType::kBF16,
                               int64_t(1) << 30).ok());
  model::Llama<float> imported16(*cfg, nullptr);
  ASSERT_TRUE(model::ImportHfWeights(out16.string(), &imported16).ok());
  for (size_t i = 0; i < m.params().size(); ++i)
    ASSERT_NEAR(imported16.params()[i], m.params()[i], std::fabs(m.params()[i]) / 256 + 1e-30);
}

TEST_F(CheckpointTest, ImportRejectsAShapeThatDoesNotMatchTheConfig) {
  model::LlamaConfig mc = Config();
  model::Llama<float> m(mc, nullptr);
  m.InitRandom(1);
  AdamW opt(OptimizerConfig{}, m.params().size());
  Checkpointer ckpt((dir_ / "ckpt").string(), 1, &local_, 0, 1, 0);
  ASSERT_TRUE(ckpt.Save(m, opt, {1, 0, 0, "c", 1, ""}).ok());
  ASSERT_TRUE(ExportCheckpoint((dir_ / "ckpt").string(), (dir_ / "hf").string(),
                               model::DType::kBF16, int64_t(1) << 30).ok());
  model::LlamaConfig wider = mc;
  wider.intermediate_size = 48;
  model::Llama<float> other(wider, nullptr);
  const absl::Status s = model::ImportHfWeights((dir_ / "hf").string(), &other);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("mlp.gate_proj.weight"), std::string::npos) << s;
}

}  // namespace
}  // namespace dmc::trainer
