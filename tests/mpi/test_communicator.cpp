// Collectives of MpiCommunicator (and LocalCommunicator) against values computed by hand, on float
// and double; the timeout path; CheckSameOnAllRanks. All values are small integers or halves, so
// sums are exact in any order and results are compared with ==.
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "parallel/communicator.h"
#include "tests/mpi/mpi_test_util.h"

namespace dmc::parallel {
namespace {

using dmc::testing::OnAllRanks;
using dmc::testing::TestWorld;

template <typename T>
class CollectiveTest : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(CollectiveTest, Types);

// 3 elements go eagerly; 5000 doubles (40 KB) take MPI's large-message path.
constexpr size_t kCounts[] = {3, 5000};

TYPED_TEST(CollectiveTest, AllReduceSum) {
  using T = TypeParam;
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  const int rank = comm->rank(), size = comm->size();
  for (size_t n : kCounts) {
    std::vector<T> x(n);
    for (size_t i = 0; i < n; ++i) x[i] = T(rank + 1) + T(0.5) * T(i % 64);
    ASSERT_TRUE(comm->AllReduceSum(x.data(), n).ok());
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(x[i], T(size * (size + 1) / 2) + T(0.5) * T(size) * T(i % 64)) << "i=" << i;
    }
  }
}

TYPED_TEST(CollectiveTest, AllReduceMax) {
  using T = TypeParam;
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  const int rank = comm->rank(), size = comm->size();
  auto value = [](int r, size_t i) { return T(-2.5) * T((r * 7 + int(i)) % 5) + T(r); };
  for (size_t n : kCounts) {
    std::vector<T> x(n);
    for (size_t i = 0; i < n; ++i) x[i] = value(rank, i);
    ASSERT_TRUE(comm->AllReduceMax(x.data(), n).ok());
    for (size_t i = 0; i < n; ++i) {
      T expected = value(0, i);
      for (int r = 1; r < size; ++r) expected = std::max(expected, value(r, i));
      ASSERT_EQ(x[i], expected) << "i=" << i;
    }
  }
}

TYPED_TEST(CollectiveTest, AllGather) {
  using T = TypeParam;
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  const int rank = comm->rank(), size = comm->size();
  for (size_t n : kCounts) {
    std::vector<T> send(n), recv(n * size, T(-1)), in_place(n * size, T(-1));
    for (size_t i = 0; i < n; ++i) send[i] = in_place[rank * n + i] = T(rank * 1000) + T(i % 999);
    ASSERT_TRUE(comm->AllGather(send.data(), recv.data(), n).ok());
    ASSERT_TRUE(comm->AllGather(in_place.data() + rank * n, in_place.data(), n).ok());
    for (int r = 0; r < size; ++r) {
      for (size_t i = 0; i < n; ++i) {
        ASSERT_EQ(recv[r * n + i], T(r * 1000) + T(i % 999)) << "r=" << r << " i=" << i;
        ASSERT_EQ(in_place[r * n + i], T(r * 1000) + T(i % 999)) << "r=" << r << " i=" << i;
      }
    }
  }
}

// Blocks of unequal sizes, one of them empty (ZeRO-1's slices when a rank gets nothing).
TYPED_TEST(CollectiveTest, AllGatherUnevenInPlace) {
  using T = TypeParam;
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  const int rank = comm->rank(), size = comm->size();
  for (size_t n : kCounts) {
    std::vector<size_t> counts(size), offsets(size);
    size_t total = 0;
    for (int r = 0; r < size; ++r) {
      counts[r] = r == 1 ? 0 : n + r;
      offsets[r] = total;
      total += counts[r];
    }
    std::vector<T> x(total, T(-1));
    for (size_t i = 0; i < counts[rank]; ++i) x[offsets[rank] + i] = T(rank * 1000) + T(i % 999);
    ASSERT_TRUE(comm->AllGatherUneven(x.data(), counts).ok());
    for (int r = 0; r < size; ++r)
      for (size_t i = 0; i < counts[r]; ++i)
        ASSERT_EQ(x[offsets[r] + i], T(r * 1000) + T(i % 999)) << "r=" << r << " i=" << i;
  }
  std::vector<T> x(1);
  EXPECT_EQ(comm->AllGatherUneven(x.data(), std::vector<size_t>(size + 1, 0)).code(),
            absl::StatusCode::kInvalidArgument)
      << "one block size per rank";
}

TYPED_TEST(CollectiveTest, ReduceScatterSum) {
  using T = TypeParam;
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  const int rank = comm->rank(), size = comm->size();
  // send_r[j] = r + (j % 100): this rank's block sums to size*(size-1)/2 + size*(j % 100).
  for (size_t n : kCounts) {
    std::vector<T> send(n * size), recv(n, T(-1));
    for (size_t j = 0; j < send.size(); ++j) send[j] = T(rank) + T(j % 100);
    std::vector<T> in_place = send;
    ASSERT_TRUE(comm->ReduceScatterSum(send.data(), recv.data(), n).ok());
    ASSERT_TRUE(comm->ReduceScatterSum(in_place.data(), in_place.data() + rank * n, n).ok());
    for (size_t i = 0; i < n; ++i) {
      const size_t j = rank * n + i;
      const T expected = T(size * (size - 1) / 2) + T(size) * T(j % 100);
      ASSERT_EQ(recv[i], expected) << "i=" << i;
      ASSERT_EQ(in_place[j], expected) << "i=" << i;
    }
  }
}

TYPED_TEST(CollectiveTest, BroadcastFromEveryRoot) {
  using T = TypeParam;
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  const int rank = comm->rank(), size = comm->size();
  for (int root = 0; root < size; ++root) {
    for (size_t n : kCounts) {
      std::vector<T> x(n, T(-7));
      if (rank == root) {
        for (size_t i = 0; i < n; ++i) x[i] = T(root) + T(0.25) * T(i % 17);
      }
      ASSERT_TRUE(comm->Broadcast(x.data(), n, root).ok());
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(x[i], T(root) + T(0.25) * T(i % 17));
    }
  }
}

TEST(MpiCommunicator, BarrierWaitsForTheLastRank) {
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  if (comm->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  ASSERT_TRUE(comm->Barrier().ok());  // every rank starts its clock together, not a test apart
  const auto start = std::chrono::steady_clock::now();
  if (comm->rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(300));
  ASSERT_TRUE(comm->Barrier().ok());
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_GE(waited, 0.25);
}

TEST(MpiCommunicator, InvalidRootIsAnErrorOnEveryRank) {
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  float x = 0;
  absl::Status status = comm->Broadcast(&x, 1, comm->size());
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("root"), std::string::npos) << status;
  EXPECT_TRUE(comm->Barrier().ok());  // the group is still usable
}

TEST(MpiCommunicator, ReportsRankSizeAndName) {
  auto comm = TestWorld("my-group");
  ASSERT_NE(comm, nullptr);
  EXPECT_EQ(comm->rank(), dmc::testing::WorldRank());
  EXPECT_EQ(comm->size(), dmc::testing::WorldSize());
  EXPECT_EQ(comm->name(), "my-group");
  EXPECT_FALSE(comm->device_buffers());
}

// The last rank is "stuck": it joins the collective only once the others have passed their 1 s
// timeout (it waits for them on another communicator, so the order does not depend on timing).
// The others must get DeadlineExceeded (not hang), naming the collective and the group, and their
// communicator must refuse further work. Then the stuck rank joins late, which completes the
// abandoned collective everywhere, so the test ends cleanly and the communicators can be freed.
TEST(MpiCommunicator, TimeoutReturnsDeadlineExceededInsteadOfHanging) {
  auto sync = TestWorld("sync");
  ASSERT_NE(sync, nullptr);
  if (sync->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  {
    auto comm = TestWorld("timeout-group");
    ASSERT_NE(comm, nullptr);
    const bool stuck = comm->rank() == comm->size() - 1;
    std::vector<float> x(4, 1.0f);  // outlives the abandoned collective, which MPI may still write
    if (!stuck) {
      comm->set_timeout_seconds(1.0);
      const auto start = std::chrono::steady_clock::now();
      absl::Status status = comm->AllReduceSum(x.data(), x.size());
      const double waited =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
      EXPECT_NE(status.message().find("AllReduceSum"), std::string::npos) << status;
      EXPECT_NE(status.message().find("'timeout-group'"), std::string::npos) << status;
      EXPECT_NE(status.message().find("a rank failed or is stuck"), std::string::npos) << status;
      EXPECT_GE(waited, 0.9);
      EXPECT_LT(waited, 10.0);
      absl::Status after = comm->Barrier();
      EXPECT_EQ(after.code(), absl::StatusCode::kFailedPrecondition) << after;
      EXPECT_NE(after.message().find("timed out"), std::string::npos) << after;
      EXPECT_TRUE(sync->Barrier().ok());  // lets the stuck rank join
    } else {
      // Late by construction, not by a sleep: it joins only after every other rank timed out.
      EXPECT_TRUE(sync->Barrier().ok());
      absl::Status status = comm->AllReduceSum(x.data(), x.size());
      EXPECT_TRUE(status.ok()) << status;
      EXPECT_EQ(x[0], float(comm->size()));
    }
    // The others wait here (polling, so MPI progresses their abandoned collective) until the
    // stuck rank has joined it.
    EXPECT_TRUE(sync->Barrier().ok());
  }
  EXPECT_TRUE(sync->Barrier().ok());
}

TEST(LocalCommunicator, CollectivesAreTheIdentity) {
  LocalCommunicator local;
  EXPECT_EQ(local.rank(), 0);
  EXPECT_EQ(local.size(), 1);
  std::vector<double> x = {1.5, -2, 3};
  ASSERT_TRUE(local.AllReduceSum(x.data(), 3).ok());
  ASSERT_TRUE(local.AllReduceMax(x.data(), 3).ok());
  ASSERT_TRUE(local.Broadcast(x.data(), 3, 0).ok());
  EXPECT_EQ(x, (std::vector<double>{1.5, -2, 3}));
  std::vector<float> send = {4, 5}, recv(2);
  ASSERT_TRUE(local.AllGather(send.data(), recv.data(), 2).ok());
  EXPECT_EQ(recv, send);
  std::fill(recv.begin(), recv.end(), 0.f);
  ASSERT_TRUE(local.ReduceScatterSum(send.data(), recv.data(), 2).ok());
  EXPECT_EQ(recv, send);
  ASSERT_TRUE(local.AllGatherUneven(x.data(), {3}).ok());
  EXPECT_EQ(x, (std::vector<double>{1.5, -2, 3}));
  EXPECT_EQ(local.AllGatherUneven(x.data(), {1, 2}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(local.Broadcast(x.data(), 3, 1).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(local.Barrier().ok());
  EXPECT_TRUE(CheckSameOnAllRanks(local, "config", "anything").ok());
  EXPECT_TRUE(AgreeOnStatus(local, absl::OkStatus()).ok());
  EXPECT_EQ(AgreeOnStatus(local, absl::DataLossError("x")), absl::DataLossError("x"));
}

TEST(AgreeOnStatus, OkWhenEveryRankIsOk) {
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  EXPECT_TRUE(AgreeOnStatus(*comm, absl::OkStatus()).ok());
}

// The last rank (and, with 3 or more ranks, rank 1) fails: every rank gets the lowest failing
// rank's code and message.
TEST(AgreeOnStatus, EveryRankGetsTheLowestFailingRanksError) {
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  const int size = comm->size();
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  const int first = size > 2 ? 1 : size - 1;
  absl::Status mine = absl::OkStatus();
  if (comm->rank() == first) mine = absl::DataLossError("shard.h5: chunk 3 is damaged");
  if (comm->rank() == size - 1 && first != size - 1) mine = absl::InternalError("later");
  const absl::Status status = AgreeOnStatus(*comm, mine);
  EXPECT_EQ(status.code(), absl::StatusCode::kDataLoss) << status;
  EXPECT_EQ(std::string(status.message()),
            "rank " + std::to_string(first) + " of group '" + comm->name() +
                "': shard.h5: chunk 3 is damaged");
}

TEST(CheckSameOnAllRanks, PassesWhenEveryRankAgrees) {
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  EXPECT_TRUE(CheckSameOnAllRanks(*comm, "config", "seq_len=128 tp=2").ok());
  EXPECT_TRUE(CheckSameOnAllRanks(*comm, "empty", "").ok());
}

// One rank (the last) has another config: every rank must get the error, naming what differs and
// the differing rank.
TEST(CheckSameOnAllRanks, NamesTheRankWhoseConfigDiffers) {
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  const int size = comm->size();
  if (size < 2) GTEST_SKIP() << "needs 2 ranks";
  const int odd = size - 1;
  const std::string value = comm->rank() == odd ? "seq_len=256" : "seq_len=128";
  absl::Status status = CheckSameOnAllRanks(*comm, "--seq_len", value);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  const std::string message(status.message());
  EXPECT_NE(message.find("--seq_len differs"), std::string::npos) << message;
  EXPECT_NE(message.find("rank(s) [" + std::to_string(odd) + "] differ"), std::string::npos)
      << message;
  EXPECT_NE(message.find("'" + value + "'"), std::string::npos) << message;
  EXPECT_TRUE(OnAllRanks(*comm, !status.ok()));
}

TEST(CheckSameOnAllRanks, ListsSeveralDifferingRanks) {
  auto comm = TestWorld();
  ASSERT_NE(comm, nullptr);
  if (comm->size() < 4) GTEST_SKIP() << "needs 4 ranks";
  // Ranks 1 and 3 differ from the majority {0, 2}... with a tie, the lowest rank's value wins.
  const std::string value = comm->rank() % 2 == 0 ? "a" : "b";
  absl::Status status = CheckSameOnAllRanks(*comm, "config", value);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
  EXPECT_NE(status.message().find("rank(s) [1, 3] differ from rank(s) [0, 2]"), std::string::npos)
      << status;
  // Rank 0 alone is odd: the majority is the reference, not rank 0.
  status = CheckSameOnAllRanks(*comm, "config", comm->rank() == 0 ? "x" : "y");
  EXPECT_NE(status.message().find("rank(s) [0] differ from rank(s) [1, 2, 3]"), std::string::npos)
      << status;
}

}  // namespace
}  // namespace dmc::parallel
