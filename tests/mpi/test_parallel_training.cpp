// Data- and tensor-parallel training equals the single-process run: every rank also trains the
// full model on the whole global batch by itself, and the parallel run must give the same losses,
// achieved compression and updated weights (each rank's shard) to fp32 round-off.
#include <gtest/gtest.h>

#include <cmath>

#include "model/llama.h"
#include "parallel/process_groups.h"
#include "tests/mpi/mpi_test_util.h"
#include "tests/mpi/training_test_util.h"
#include "trainer/trainer.h"

namespace dmc {
namespace {

using testing::GlobalBatchSlice;
using testing::TrainingTestModel;
using testing::TrainingTestSchedule;

void ExpectParallelMatchesSingle(int tp_size) {
  const int world = testing::WorldSize();
  if (world % tp_size != 0) GTEST_SKIP() << "tp " << tp_size << " does not divide " << world;
  absl::StatusOr<parallel::ProcessGroups> groups =
      parallel::ProcessGroups::Create(MPI_COMM_WORLD, tp_size, testing::kTestTimeoutSeconds);
  ASSERT_TRUE(groups.ok()) << groups.status();
  const auto& layout = groups->layout();
  const model::LlamaConfig mc = TrainingTestModel();
  const int micro = 2, global = micro * layout.dp_size;

  model::Llama<float> single(mc, nullptr);
  single.InitRandom(5);
  parallel::LocalCommunicator local;
  int single_calls = 0;
  trainer::Trainer reference(TrainingTestSchedule(global), &single,
                             GlobalBatchSlice(0, global, 10, mc.vocab_size, &single_calls), &local,
                             &local);

  model::Llama<float> shard(mc, &groups->tp());
  shard.InitRandom(5);
  int calls = 0;
  trainer::Trainer parallel(
      TrainingTestSchedule(micro), &shard,
      GlobalBatchSlice(layout.dp_rank * micro, micro, 10, mc.vocab_size, &calls), &groups->dp(),
      &groups->tp());
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
