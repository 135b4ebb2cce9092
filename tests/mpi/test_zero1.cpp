// ZeRO-1 (model/zero1_shard.h, trainer/optimizer.h) under mpirun: with the AdamW moments sharded
// over the data-parallel group, training gives the same losses, weights and (gathered) moments as
// without, bit for bit (every element goes through the same arithmetic), at DP 2 (np 2) and at
// DP 2 × TP 2 and DP 4 (np 4). A checkpoint saved with ZeRO-1 is the same bytes as one saved
// without, and a run resumes from either with ZeRO-1 on or off, or at DP 1.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "model/llama.h"
#include "model/zero1_shard.h"
#include "parallel/process_groups.h"
#include "tests/mpi/mpi_test_util.h"
#include "tests/mpi/training_test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/trainer.h"

namespace dmc {
namespace {

namespace fs = std::filesystem;
using model::Zero1Shard;
using testing::GlobalBatchSlice;

TEST(Zero1Shard, SlicesTileTheBufferInAlignedBlocks) {
  for (size_t n : {0, 1, 3, 4, 5, 17, 64, 1001}) {
    for (int d = 1; d <= 5; ++d) {
      size_t next = 0;
      for (int r = 0; r < d; ++r) {
        const Zero1Shard s = Zero1Shard::Make(n, r, d);
        ASSERT_EQ(s.counts.size(), static_cast<size_t>(d));
        EXPECT_EQ(s.slice.begin, next) << "n " << n << " d " << d << " rank " << r;
        EXPECT_EQ(s.slice.size, s.counts[r]);
        if (s.slice.size > 0) {
          EXPECT_EQ(s.slice.begin % model::kZero1Align, 0u);
        }
        // As even as whole blocks allow: one block apart, plus the short last block.
        const auto [lo, hi] = std::minmax_element(s.counts.begin(), s.counts.end());
        EXPECT_LT(*hi - *lo, 2 * model::kZero1Align) << "n " << n << " d " << d;
        next = s.slice.end();
      }
      EXPECT_EQ(next, n) << "the slices of n " << n << " over d " << d << " do not cover it";
    }
  }
  const Zero1Shard s = Zero1Shard::Make(10, 1, 2);  // blocks [0, 4) [4, 8) [8, 10): rank 1 [8, 10)
  EXPECT_EQ(s.slice.begin, 8u);
  EXPECT_EQ(s.counts, (std::vector<size_t>{8, 2}));
  EXPECT_EQ(s.Overlap(6, 3).begin, 8u);  // a tensor [6, 9) across the boundary
  EXPECT_EQ(s.Overlap(6, 3).size, 1u);
  EXPECT_EQ(s.Overlap(0, 8).size, 0u);
}

// The training tests' model with 2 heads of 6 (hidden 12): every TP shard's flat buffer is an odd
// number of 4-value blocks, so the ZeRO-1 slices are uneven at every DP size.
model::LlamaConfig UnevenModel() {
  model::LlamaConfig c = testing::TrainingTestModel();
  c.hidden_size = 12;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 2;
  c.intermediate_size = 24;
  return c;
}

// Stage 2 for 3 steps, stage 3 for 2: a checkpoint after step 2 carries moments that step 3 uses.
trainer::TrainConfig Schedule(int micro_batch, bool zero1) {
  trainer::TrainConfig tc = testing::TrainingTestSchedule(micro_batch);
  tc.schedule.stage2_steps = 3;
  tc.optimizer.zero1 = zero1;
  return tc;
}

// One model and trainer of this rank; batch calls count the steps taken (grad_accum 1).
struct Run {
  Run(parallel::ProcessGroups& groups, bool zero1, uint64_t seed)
      : model(UnevenModel(), &groups.tp()),
        trainer(Schedule(kMicro, zero1), &model,
                GlobalBatchSlice(groups.layout().dp_rank * kMicro, kMicro, 10,
                                 UnevenModel().vocab_size, &calls),
                &groups.dp(), &groups.tp()) {
    model.InitRandom(seed);
  }
  static constexpr int kMicro = 2;
  int calls = 0;
  model::Llama<float> model;
  trainer::Trainer trainer;
};

std::vector<float> FullMoment(const trainer::AdamW& optimizer, bool second) {
  std::vector<float> m, v;
  const absl::Status s = optimizer.GatherMoments(&m, &v);
  EXPECT_TRUE(s.ok()) << s;
  return second ? v : m;
}

// After each step: the same loss, norm, weights and moments, exactly.
void ExpectSameStep(Run& want, Run& got, const std::string& what) {
  absl::StatusOr<trainer::StepMetrics> w = want.trainer.Step();
  absl::StatusOr<trainer::StepMetrics> g = got.trainer.Step();
  ASSERT_TRUE(w.ok()) << w.status();
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->loss, w->loss) << what << ", step " << w->step;
  EXPECT_EQ(g->grad_norm, w->grad_norm) << what << ", step " << w->step;
  EXPECT_TRUE(got.model.params() == want.model.params()) << what << ": weights, step " << w->step;
  for (bool second : {false, true})
    EXPECT_TRUE(FullMoment(got.trainer.optimizer(), second) ==
                FullMoment(want.trainer.optimizer(), second))
        << what << ": " << (second ? "v" : "m") << ", step " << w->step;
}

std::optional<parallel::ProcessGroups> DataParallelGroups(int tp_size) {
  if (testing::WorldSize() % tp_size != 0) return std::nullopt;
  absl::StatusOr<parallel::ProcessGroups> groups =
      parallel::ProcessGroups::Create(MPI_COMM_WORLD, tp_size, testing::kTestTimeoutSeconds);
  EXPECT_TRUE(groups.ok()) << groups.status();
  if (!groups.ok() || groups->layout().dp_size == 1) return std::nullopt;
  return std::move(*groups);
}

void ExpectZero1EqualsUnsharded(int tp_size) {
  std::optional<parallel::ProcessGroups> groups = DataParallelGroups(tp_size);
  if (!groups) GTEST_SKIP() << "needs dp > 1 at tp " << tp_size;
  Run plain(*groups, false, 5), sharded(*groups, true, 5);
  const trainer::AdamW& opt = sharded.trainer.optimizer();
  ASSERT_TRUE(opt.sharded());
  ASSERT_FALSE(plain.trainer.optimizer().sharded());
  const size_t n = sharded.model.params().size(), d = groups->layout().dp_size;
  EXPECT_EQ(opt.m().size(), opt.shard().slice.size);
  EXPECT_LE(opt.m().size(), (n + d - 1) / d + model::kZero1Align) << "moments / dp";
  const auto [lo, hi] = std::minmax_element(opt.shard().counts.begin(), opt.shard().counts.end());
  EXPECT_NE(*lo, *hi) << "the test model's buffer of " << n << " should split unevenly over " << d;
  for (int step = 0; step < 5; ++step)  // through the optimizer reset at the start of stage 3
    ExpectSameStep(plain, sharded, "zero1 vs unsharded, dp " + std::to_string(d));
}

TEST(Zero1, DataParallelEqualsUnsharded) { ExpectZero1EqualsUnsharded(1); }
TEST(Zero1, DataTimesTensorParallelEqualsUnsharded) { ExpectZero1EqualsUnsharded(2); }

std::string ReadBytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

void ExpectCheckpointResumesEitherWay(int tp_size) {
  std::optional<parallel::ProcessGroups> groups = DataParallelGroups(tp_size);
  if (!groups) GTEST_SKIP() << "needs dp > 1 at tp " << tp_size;
  const parallel::ParallelLayout& layout = groups->layout();
  // One directory for the whole job: rank 0 names it.
  std::string dir =
      (fs::temp_directory_path() / ("dmc_zero1_" + std::to_string(static_cast<long>(::getpid()))))
          .string();
  int length = static_cast<int>(dir.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  dir.resize(length);
  MPI_Bcast(dir.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  auto checkpointer = [&](const std::string& name) {
    return trainer::Checkpointer(dir + "/" + name, 1, &groups->world(), layout.tp_rank,
                                 layout.tp_size, layout.dp_rank);
  };
  auto save = [&](Run& run, const std::string& name) {
    trainer::TrainingState state{run.trainer.step(), run.trainer.tokens(),
                                 run.trainer.optimizer().step(), "cursor", 1};
    const absl::Status s = checkpointer(name).Save(run.model, run.trainer.optimizer(), state);
    EXPECT_TRUE(s.ok()) << s;
  };
  auto resume = [&](Run& run, const std::string& name) {
    absl::StatusOr<trainer::TrainingState> state =
        checkpointer(name).LoadLatest(run.model, run.trainer.optimizer());
    ASSERT_TRUE(state.ok()) << state.status();
    run.trainer.set_step(state->step);
    run.trainer.set_tokens(state->tokens);
    run.calls = state->step;
  };

  Run plain(*groups, false, 5), sharded(*groups, true, 5);
  for (int step = 0; step < 2; ++step) ExpectSameStep(plain, sharded, "before the checkpoint");
  save(plain, "plain");
  save(sharded, "sharded");
  ASSERT_TRUE(groups->world().Barrier().ok());
  const fs::path step_dir = trainer::Checkpointer::StepDirName(2);
  if (layout.world_rank == 0)
    for (int tp = 0; tp < tp_size; ++tp)
      for (const std::string file : {"model-tp", "optim-tp"}) {
        const fs::path name = step_dir / (file + std::to_string(tp) + ".safetensors");
        EXPECT_TRUE(ReadBytes(dir / fs::path("sharded") / name) ==
                    ReadBytes(dir / fs::path("plain") / name))
            << name << ": the ZeRO-1 checkpoint differs from the unsharded one";
      }

  // Resumed from the ZeRO-1 checkpoint without ZeRO-1, and the other way round: both continue
  // exactly as the straight unsharded run (step 3 uses the saved moments).
  Run off_from_sharded(*groups, false, 6), on_from_plain(*groups, true, 6);
  resume(off_from_sharded, "sharded");
  resume(on_from_plain, "plain");
  Run straight_copy(*groups, false, 5);  // a second straight run, for the second comparison
  for (int step = 0; step < 2; ++step) ASSERT_TRUE(straight_copy.trainer.Step().ok());
  for (int step = 2; step < 5; ++step) {
    ExpectSameStep(plain, off_from_sharded, "resumed without ZeRO-1 from a ZeRO-1 checkpoint");
    ExpectSameStep(straight_copy, on_from_plain,
                   "resumed with ZeRO-1 from an unsharded checkpoint");
  }

  // At DP 1 (each rank alone with its TP group, the whole global batch): the loaded state is the
  // gathered one, and the next step's loss is the DP run's up to the order of the gradient sums.
  parallel::LocalCommunicator alone("dp1");
  const int global = Run::kMicro * layout.dp_size;
  model::Llama<float> single(UnevenModel(), &groups->tp());
  int calls = 0;
  trainer::Trainer dp1(Schedule(global, true), &single,
                       GlobalBatchSlice(0, global, 10, UnevenModel().vocab_size, &calls), &alone,
                       &groups->tp());
  absl::StatusOr<trainer::TrainingState> state =
      checkpointer("sharded").LoadLatest(single, dp1.optimizer());
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_FALSE(dp1.optimizer().sharded()) << "ZeRO-1 has nothing to shard over at dp 1";
  Run reference(*groups, false, 5);
  for (int step = 0; step < 2; ++step) ASSERT_TRUE(reference.trainer.Step().ok());
  EXPECT_TRUE(single.params() == reference.model.params());
  EXPECT_TRUE(dp1.optimizer().m() == FullMoment(reference.trainer.optimizer(), false));
  EXPECT_TRUE(dp1.optimizer().v() == FullMoment(reference.trainer.optimizer(), true));
  dp1.set_step(state->step);
  calls = state->step;
  absl::StatusOr<trainer::StepMetrics> want = reference.trainer.Step();
  absl::StatusOr<trainer::StepMetrics> got = dp1.Step();
  ASSERT_TRUE(want.ok() && got.ok());
  EXPECT_NEAR(got->loss, want->loss, 1e-5 * std::fabs(want->loss)) << "step 3 at dp 1";

  ASSERT_TRUE(groups->world().Barrier().ok());
  if (layout.world_rank == 0) fs::remove_all(dir);
}

TEST(Zero1, CheckpointResumesWithZero1OnOffAndAtDpOne) { ExpectCheckpointResumesEitherWay(1); }
TEST(Zero1, TensorParallelCheckpointResumesWithZero1OnOffAndAtDpOne) {
  ExpectCheckpointResumesEitherWay(2);
}

}  // namespace
}  // namespace dmc
