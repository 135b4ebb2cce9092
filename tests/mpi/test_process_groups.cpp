// DP/TP group construction (TP-fastest layout), its validation, and start-up failures.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <vector>

#include "parallel/process_groups.h"
#include "tests/mpi/mpi_test_util.h"

namespace dmc::parallel {
namespace {

using dmc::testing::OnAllRanks;
using dmc::testing::TestWorld;

TEST(ParallelLayout, IsTensorParallelFastest) {
  // world 8, tp 4: tp groups {0..3} {4..7}; dp groups {0,4} {1,5} {2,6} {3,7}.
  for (int r = 0; r < 8; ++r) {
    absl::StatusOr<ParallelLayout> layout = ParallelLayout::Make(8, r, 4);
    ASSERT_TRUE(layout.ok()) << layout.status();
    EXPECT_EQ(layout->tp_size, 4);
    EXPECT_EQ(layout->dp_size, 2);
    EXPECT_EQ(layout->tp_rank, r % 4);
    EXPECT_EQ(layout->dp_rank, r / 4);
    EXPECT_EQ(layout->WorldRank(layout->dp_rank, layout->tp_rank), r);
  }
  EXPECT_EQ(ParallelLayout::Make(8, 6, 2)->ToString(),
            "world 8 = dp 4 x tp 2, rank 6 = (dp 3, tp 0)");
}

TEST(ParallelLayout, RejectsTpThatDoesNotDivideTheWorld) {
  for (int tp : {0, -1, 3, 8}) {
    absl::StatusOr<ParallelLayout> layout = ParallelLayout::Make(4, 0, tp);
    EXPECT_EQ(layout.status().code(), absl::StatusCode::kInvalidArgument) << "tp=" << tp;
    EXPECT_NE(layout.status().message().find("--tp=" + std::to_string(tp)), std::string::npos)
        << layout.status();
  }
}

// For every tp that divides the world (np 2: tp 1, 2; np 4: tp 1, 2, 4): the layout, and the
// members of the TP and DP groups, read back by gathering world ranks over each group.
TEST(ProcessGroups, BuildsTpAndDpGroups) {
  auto world = TestWorld();
  ASSERT_NE(world, nullptr);
  const int size = world->size(), rank = world->rank();
  for (int tp : {1, 2, 4}) {
    if (size % tp != 0) continue;
    SCOPED_TRACE("tp=" + std::to_string(tp));
    absl::StatusOr<ProcessGroups> groups =
        ProcessGroups::Create(world->comm(), tp, dmc::testing::kTestTimeoutSeconds);
    ASSERT_TRUE(groups.ok()) << groups.status();
    const ParallelLayout& l = groups->layout();
    EXPECT_EQ(l.world_size, size);
    EXPECT_EQ(l.world_rank, rank);
    EXPECT_EQ(l.tp_size, tp);
    EXPECT_EQ(l.dp_size, size / tp);
    EXPECT_EQ(l.tp_rank, rank % tp);
    EXPECT_EQ(l.dp_rank, rank / tp);
    EXPECT_EQ(groups->world().size(), size);
    EXPECT_EQ(groups->world().rank(), rank);
    EXPECT_EQ(groups->tp().size(), tp);
    EXPECT_EQ(groups->tp().rank(), l.tp_rank);
    EXPECT_EQ(groups->dp().size(), size / tp);
    EXPECT_EQ(groups->dp().rank(), l.dp_rank);
    EXPECT_EQ(&groups->tp(), &groups->host_tp());
    EXPECT_EQ(groups->tp().name(), "tp[" + std::to_string(l.dp_rank) + "]");

    const double me = rank;
    std::vector<double> tp_members(tp), dp_members(size / tp);
    ASSERT_TRUE(groups->tp().AllGather(&me, tp_members.data(), 1).ok());
    ASSERT_TRUE(groups->dp().AllGather(&me, dp_members.data(), 1).ok());
    for (int t = 0; t < tp; ++t) EXPECT_EQ(tp_members[t], l.WorldRank(l.dp_rank, t));
    for (int d = 0; d < size / tp; ++d) EXPECT_EQ(dp_members[d], l.WorldRank(d, l.tp_rank));

    // A sum over TP then over DP is a sum over the world.
    double x = rank + 1;
    ASSERT_TRUE(groups->tp().AllReduceSum(&x, 1).ok());
    ASSERT_TRUE(groups->dp().AllReduceSum(&x, 1).ok());
    EXPECT_EQ(x, size * (size + 1) / 2);
  }
}

// tp = 3 on 4 ranks (or on 2): every rank gets the same clear error, none hangs.
TEST(ProcessGroups, InvalidTpIsAnErrorOnEveryRank) {
  auto world = TestWorld();
  ASSERT_NE(world, nullptr);
  absl::StatusOr<ProcessGroups> groups =
      ProcessGroups::Create(world->comm(), 3, dmc::testing::kTestTimeoutSeconds);
  EXPECT_EQ(groups.status().code(), absl::StatusCode::kInvalidArgument) << groups.status();
  EXPECT_NE(groups.status().message().find("--tp=3 must be a divisor of the number of ranks (" +
                                           std::to_string(world->size()) + ")"),
            std::string::npos)
      << groups.status();
  EXPECT_TRUE(OnAllRanks(*world, !groups.ok()));
}

// Ranks launched with different --tp must not build different groups (and hang in the split).
TEST(ProcessGroups, TpThatDiffersAcrossRanksIsAnErrorOnEveryRank) {
  auto world = TestWorld();
  ASSERT_NE(world, nullptr);
  if (world->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  const int tp = world->rank() == 0 ? 2 : 1;
  absl::StatusOr<ProcessGroups> groups =
      ProcessGroups::Create(world->comm(), tp, dmc::testing::kTestTimeoutSeconds);
  EXPECT_EQ(groups.status().code(), absl::StatusCode::kInvalidArgument) << groups.status();
  EXPECT_NE(groups.status().message().find("--tp differs"), std::string::npos) << groups.status();
  EXPECT_TRUE(OnAllRanks(*world, !groups.ok()));
}

// A rank stuck before start-up: the others get DeadlineExceeded from ProcessGroups::Create after
// their 1 s timeout instead of hanging. Create begins with a barrier under the deadline; the late
// rank joins that barrier once the others have timed out (as a late Create would; it waits for
// them on another communicator, not for a time), so the test ends cleanly.
TEST(ProcessGroups, RankMissingAtStartUpTimesOut) {
  auto world = TestWorld();
  auto sync = TestWorld("sync");
  ASSERT_NE(world, nullptr);
  ASSERT_NE(sync, nullptr);
  if (world->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  if (world->rank() != world->size() - 1) {
    const auto start = std::chrono::steady_clock::now();
    absl::StatusOr<ProcessGroups> groups = ProcessGroups::Create(world->comm(), 1, 1.0);
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_EQ(groups.status().code(), absl::StatusCode::kDeadlineExceeded) << groups.status();
    EXPECT_NE(groups.status().message().find("creating group 'world'"), std::string::npos)
        << groups.status();
    EXPECT_NE(groups.status().message().find("a rank failed or is stuck"), std::string::npos)
        << groups.status();
    EXPECT_LT(waited, 10.0);
    EXPECT_TRUE(sync->Barrier().ok());  // lets the late rank in
  } else {
    EXPECT_TRUE(sync->Barrier().ok());  // late by construction: every other rank has timed out
    EXPECT_TRUE(world->Barrier().ok());  // the barrier that the others abandoned
  }
  EXPECT_TRUE(world->Barrier().ok());
}

TEST(ProcessGroups, SingleIsOneLocalRank) {
  ProcessGroups groups = ProcessGroups::Single();
  EXPECT_EQ(groups.layout().world_size, 1);
  EXPECT_EQ(groups.layout().tp_size, 1);
  EXPECT_EQ(groups.layout().dp_size, 1);
  EXPECT_EQ(groups.world().size(), 1);
  EXPECT_EQ(groups.tp().size(), 1);
  EXPECT_EQ(groups.dp().size(), 1);
  float x = 2;
  EXPECT_TRUE(groups.tp().AllReduceSum(&x, 1).ok());
  EXPECT_EQ(x, 2);
  // A null device group leaves that group on its host communicator (UseNccl does this for a
  // group whose ranks share a GPU).
  EXPECT_TRUE(groups.SetDeviceCommunicators(nullptr, nullptr).ok());
  EXPECT_EQ(&groups.tp(), &groups.host_tp());
  EXPECT_EQ(&groups.dp(), &groups.host_dp());
  // One of another size is refused.
  if (dmc::testing::WorldSize() > 1) {
    std::unique_ptr<MpiCommunicator> other = TestWorld();
    ASSERT_NE(other, nullptr);
    EXPECT_EQ(groups.SetDeviceCommunicators(nullptr, std::move(other)).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

}  // namespace
}  // namespace dmc::parallel
