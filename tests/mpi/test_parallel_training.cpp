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

// A DMS model on the same shape, mixed decisions from the first step (scale 1, offset 0.5,
// temperature 1), distilled from itself with eviction off (adapter) or from a frozen copy of the
// initial model (query channel).
model::LlamaConfig DmsTrainingTestModel(model::DmsVariant variant) {
  model::LlamaConfig c = TrainingTestModel();
  c.dmc.enabled = false;
  c.dms.variant = variant;
  c.dms.window = 2;
  c.dms.scale = 1.0f;
  c.dms.offset = 0.5f;
  c.dms.temperature = 1.0f;
  // No EOS among the random tokens: each rank then distils as many positions as any other, and
  // the mean of the ranks' means (data parallelism, as the reference) is the global mean.
  c.eos_token_id = -1;
  return c;
}

void ExpectParallelMatchesSingle(int tp_size,
                                 const model::LlamaConfig& mc = TrainingTestModel()) {
  const int world = testing::WorldSize();
  if (world % tp_size != 0) GTEST_SKIP() << "tp " << tp_size << " does not divide " << world;
  absl::StatusOr<parallel::ProcessGroups> groups =
      parallel::ProcessGroups::Create(MPI_COMM_WORLD, tp_size, testing::kTestTimeoutSeconds);
  ASSERT_TRUE(groups.ok()) << groups.status();
  const auto& layout = groups->layout();
  const int micro = 2, global = micro * layout.dp_size;
  // the query-channel variant's teachers: the initial model without DMS, whole and sharded
  model::LlamaConfig plain = mc;
  plain.dms = model::DmsConfig();
  model::Llama<float> single_teacher(plain, nullptr), shard_teacher(plain, &groups->tp());
  single_teacher.InitRandom(5);
  shard_teacher.InitRandom(5);
  // DMS: weights 10x the initial ones (elementwise, so every layout scales alike), so that the
  // logits are far from uniform and the KL stands well above fp32 round-off
  const float gain = mc.dms.is_dms() ? 10.0f : 1.0f;
  auto amplify = [gain](model::Llama<float>& m) {
    for (const model::ParamSpec& s : m.param_specs())
      if (s.shape.size() == 2)
        for (size_t i = 0; i < s.size; ++i) m.params()[s.offset + i] *= gain;
  };
  amplify(single_teacher);
  amplify(shard_teacher);
  const bool frozen_teacher = mc.dms.variant == model::DmsVariant::kQueryChannel;

  model::Llama<float> single(mc, nullptr);
  single.InitRandom(5);
  amplify(single);
  parallel::LocalCommunicator local;
  int single_calls = 0;
  trainer::Trainer reference(TrainingTestSchedule(global), &single,
                             GlobalBatchSlice(0, global, 10, mc.vocab_size, &single_calls), &local,
                             &local);

  model::Llama<float> shard(mc, &groups->tp());
  shard.InitRandom(5);
  amplify(shard);
  int calls = 0;
  trainer::Trainer parallel(
      TrainingTestSchedule(micro), &shard,
      GlobalBatchSlice(layout.dp_rank * micro, micro, 10, mc.vocab_size, &calls), &groups->dp(),
      &groups->tp());
  if (frozen_teacher) {
    ASSERT_TRUE(reference.backend().SetTeacher(&single_teacher).ok());
    ASSERT_TRUE(parallel.backend().SetTeacher(&shard_teacher).ok());
  }
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
    // The KL sums p (log p - log p_t) over the vocabulary: terms of order log V that cancel, so
    // its fp32 round-off is absolute (~1e-7 log V), not relative to the small difference.
    // The 10x weights train fast (lr 1e-2): by step 3 round-off has grown to ~2e-5 of the loss.
    const double kl_roundoff = mc.dms.is_dms() ? 1e-6 : 0.0, rel = mc.dms.is_dms() ? 1e-4 : 1e-5;
    EXPECT_NEAR(got->loss, want->loss, rel * std::fabs(want->loss) + kl_roundoff)
        << "step " << step;
    EXPECT_NEAR(got->cr_loss, want->cr_loss, 1e-6) << "step " << step;
    EXPECT_NEAR(got->distill_loss, want->distill_loss,
                rel * std::fabs(want->distill_loss) + kl_roundoff)
        << "step " << step;
    if (mc.dms.is_dms()) {
      EXPECT_GT(want->distill_loss, 0.0) << "step " << step;
    }
    EXPECT_NEAR(got->achieved_cr, want->achieved_cr, 1e-6) << "step " << step;
    EXPECT_NEAR(got->grad_norm, want->grad_norm, 1e-4 * want->grad_norm) << "step " << step;
    // One step from the same weights: the updated weights agree to fp32 round-off. (Later steps
    // are not compared weight by weight: Adam divides each gradient by its own magnitude, so the
    // round-off of the gradients of nearly idle units grows by ~10x a step.)
    if (step == 0) {
      // (DMS: the KL's absolute round-off reaches the gradients of the weights the decisions
      // barely use, and Adam's first step moves each weight by ~lr whatever its gradient's size)
      EXPECT_LT(max_weight_error(), mc.dms.is_dms() ? 5e-5 : 2e-6)
          << "weights after one step, dp " << layout.dp_size << " tp " << tp_size;
    }
  }
}

TEST(ParallelTraining, DataParallelEqualsSingleProcess) { ExpectParallelMatchesSingle(1); }
TEST(ParallelTraining, TensorParallelTwoEqualsSingleProcess) { ExpectParallelMatchesSingle(2); }
TEST(ParallelTraining, TensorParallelFourEqualsSingleProcess) { ExpectParallelMatchesSingle(4); }
TEST(ParallelTraining, DmsAdapterDataParallelEqualsSingleProcess) {
  ExpectParallelMatchesSingle(1, DmsTrainingTestModel(model::DmsVariant::kAdapter));
}
TEST(ParallelTraining, DmsAdapterTensorParallelTwoEqualsSingleProcess) {
  ExpectParallelMatchesSingle(2, DmsTrainingTestModel(model::DmsVariant::kAdapter));
}
TEST(ParallelTraining, DmsQueryChannelTensorParallelTwoEqualsSingleProcess) {
  ExpectParallelMatchesSingle(2, DmsTrainingTestModel(model::DmsVariant::kQueryChannel));
}

}  // namespace
}  // namespace dmc
