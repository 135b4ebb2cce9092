// Data- and tensor-parallel training equals the single-process run: every rank also trains the
// full model on the whole global batch by itself, and the parallel run must give the same losses,
// achieved compression and updated weights (each rank's shard) to fp32 round-off.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "model/llama.h"
#include "parallel/process_groups.h"
#include "tests/mpi/mpi_test_util.h"
#include "trainer/trainer.h"

namespace dmc {
namespace {

model::LlamaConfig Config() {
  model::LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 4;
  c.max_position_embeddings = 32;
  c.dmc.enabled = true;
  c.dmc.window = 4;
  // Mixed decisions from the first step, so the mask, the scan and the CR loss all matter.
  c.dmc.init_val = 0.5f;
  c.dmc.temperature = 1.0f;
  return c;
}

trainer::TrainConfig Training(int micro_batch) {
  trainer::TrainConfig tc;
  tc.seq_len = 10;
  tc.micro_batch = micro_batch;
  tc.schedule.stage2_steps = 2;
  tc.schedule.stage3_steps = 2;
  tc.schedule.retrofit_lr = 1e-2f;
  tc.schedule.retrofit_min_lr = 1e-3f;
  tc.schedule.cr_target = 3.0f;
  return tc;
}

// Global batch g of the run: `sequences` rows; a rank takes rows [first, first + count).
trainer::BatchSource Slice(int first, int count, int seq_len, int vocab, int* calls) {
  return [=](std::vector<int32_t>* in, std::vector<int32_t>* tgt) {
    in->clear();
    tgt->clear();
    for (int b = first; b < first + count; ++b) {
      std::mt19937_64 rng(7919 * (*calls) + b);
      for (int t = 0; t < seq_len; ++t) {
        in->push_back(static_cast<int32_t>(rng() % vocab));
        tgt->push_back(static_cast<int32_t>(rng() % vocab));
      }
    }
    ++*calls;
    return absl::OkStatus();
  };
}

void ExpectParallelMatchesSingle(int tp_size) {
  const int world = testing::WorldSize();
  if (world % tp_size != 0) GTEST_SKIP() << "tp " << tp_size << " does not divide " << world;
  absl::StatusOr<parallel::ProcessGroups> groups =
      parallel::ProcessGroups::Create(MPI_COMM_WORLD, tp_size, testing::kTestTimeoutSeconds);
  ASSERT_TRUE(groups.ok()) << groups.status();
  const auto& layout = groups->layout();
  const model::LlamaConfig mc = Config();
  const int micro = 2, global = micro * layout.dp_size;

  model::Llama<float> single(mc, nullptr);
  single.InitRandom(5);
  parallel::LocalCommunicator local;
  int single_calls = 0;
  trainer::Trainer reference(Training(global), &single,
                             Slice(0, global, 10, mc.vocab_size, &single_calls), &local, &local);

  model::Llama<float> shard(mc, &groups->tp());
  shard.InitRandom(5);
  int calls = 0;
  trainer::Trainer parallel(Training(micro), &shard,
                            Slice(layout.dp_rank * micro, micro, 10, mc.vocab_size, &calls),
                            &groups->dp(), &groups->tp());
  // This rank's shard of every tensor must equal the same slice of the single-process weights.
  auto max_weight_error = [&]() {
    double max_err = 0;
    for (const model::ParamSpec& s : shard.param_specs()) {
      const model::ParamSpec* full = single.FindParam(s.name);
      EXPECT_NE(full, nullptr) << s.name;
      if (full == nullptr) return 1.0;
      const int64_t rows = s.shape[0], cols = s.shape.size() > 1 ? s.shape[1] : 1;
      const int64_t full_cols = s.full_shape.size() > 1 ? s.full_shape[1] : 1;
      const int64_t row0 = s.split_dim == 0 ? s.split_begin : 0;
      const int64_t col0 = s.split_dim == 1 ? s.split_begin : 0;
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j) {
          const float a = shard.params()[s.offset + i * cols + j];
          const float b = single.params()[full->offset + (row0 + i) * full_cols + col0 + j];
          max_err = std::max(max_err, static_cast<double>(std::fabs(a - b)));
        }
    }
    return max_err;
  };
  for (int step = 0; step < 4; ++step) {
    absl::StatusOr<trainer::StepMetrics> want = reference.Step();
    absl::StatusOr<trainer::StepMetrics> got = parallel.Step();
    ASSERT_TRUE(want.ok() && got.ok());
    EXPECT_NEAR(got->loss, want->loss, 1e-5 * std::fabs(want->loss)) << "step " << step;
    EXPECT_NEAR(got->cr_loss, want->cr_loss, 1e-6) << "step " << step;
    EXPECT_NEAR(got->achieved_cr, want->achieved_cr, 1e-6) << "step " << step;
    EXPECT_NEAR(got->grad_norm, want->grad_norm, 1e-4 * want->grad_norm) << "step " << step;
    // One step from the same weights: the updated weights agree to fp32 round-off. (Later steps
    // are not compared weight by weight: Adam divides each gradient by its own magnitude, so the
    // round-off of the gradients of nearly idle units grows by ~10x a step.)
    if (step == 0) {
      EXPECT_LT(max_weight_error(), 2e-6)
          << "weights after one step, dp " << layout.dp_size << " tp " << tp_size;
    }
  }
}

TEST(ParallelTraining, DataParallelEqualsSingleProcess) { ExpectParallelMatchesSingle(1); }
TEST(ParallelTraining, TensorParallelTwoEqualsSingleProcess) { ExpectParallelMatchesSingle(2); }
TEST(ParallelTraining, TensorParallelFourEqualsSingleProcess) { ExpectParallelMatchesSingle(4); }

}  // namespace
}  // namespace dmc
