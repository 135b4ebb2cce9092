// NcclCommunicator on GPUs (built only with NCCL): the collectives on device buffers against the
// same hand-computed values as the MPI tests, through ProcessGroups + UseNccl (and its fallback to
// MPI for ranks that share a GPU), and the timeout path. Skips (on every rank alike) without one
// GPU per rank on the node.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "parallel/mpi_env.h"
#include "parallel/nccl_communicator.h"
#include "parallel/process_groups.h"
#include "tests/mpi/mpi_test_util.h"

namespace dmc::parallel {
namespace {

using dmc::testing::TestWorld;

// Every rank decides alike (same node, same count), so all skip or none. Selects this rank's GPU.
bool HaveOneGpuPerRank() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) return false;
  if (count < dmc::testing::WorldSize()) return false;
  return cudaSetDevice(dmc::testing::WorldRank() % count) == cudaSuccess;
}

template <typename T>
struct DeviceBuffer {
  explicit DeviceBuffer(size_t n) : n(n) {
    EXPECT_EQ(cudaMalloc(&ptr, n * sizeof(T)), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  void Upload(const std::vector<T>& v) {
    EXPECT_EQ(cudaMemcpy(ptr, v.data(), n * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  std::vector<T> Download() {
    std::vector<T> v(n);
    EXPECT_EQ(cudaMemcpy(v.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  T* ptr = nullptr;
  size_t n;
};

template <typename T>
void CheckCollectives(Communicator& comm) {
  const int rank = comm.rank(), size = comm.size();
  ASSERT_TRUE(comm.device_buffers());
  const size_t n = 5000;

  DeviceBuffer<T> x(n);
  std::vector<T> host(n);
  for (size_t i = 0; i < n; ++i) host[i] = T(rank + 1) + T(0.5) * T(i % 64);
  x.Upload(host);
  ASSERT_TRUE(comm.AllReduceSum(x.ptr, n).ok());
  ASSERT_TRUE(comm.Synchronize().ok());
  std::vector<T> got = x.Download();
  for (size_t i = 0; i < n; ++i)
    ASSERT_EQ(got[i], T(size * (size + 1) / 2) + T(0.5) * T(size) * T(i % 64)) << i;

  for (size_t i = 0; i < n; ++i) host[i] = T(rank) - T(i % 7);
  x.Upload(host);
  ASSERT_TRUE(comm.AllReduceMax(x.ptr, n).ok());
  ASSERT_TRUE(comm.Synchronize().ok());
  got = x.Download();
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], T(size - 1) - T(i % 7)) << i;

  DeviceBuffer<T> gathered(n * size);
  for (size_t i = 0; i < n; ++i) host[i] = T(rank * 1000) + T(i % 999);
  x.Upload(host);
  ASSERT_TRUE(comm.AllGather(x.ptr, gathered.ptr, n).ok());
  ASSERT_TRUE(comm.Synchronize().ok());
  got = gathered.Download();
  for (int r = 0; r < size; ++r)
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[r * n + i], T(r * 1000) + T(i % 999));

  std::vector<T> full(n * size);
  for (size_t j = 0; j < full.size(); ++j) full[j] = T(rank) + T(j % 100);
  gathered.Upload(full);
  ASSERT_TRUE(comm.ReduceScatterSum(gathered.ptr, x.ptr, n).ok());
  ASSERT_TRUE(comm.Synchronize().ok());
  got = x.Download();
  for (size_t i = 0; i < n; ++i)
    ASSERT_EQ(got[i], T(size * (size - 1) / 2) + T(size) * T((rank * n + i) % 100)) << i;

  // Uneven blocks, one empty: grouped broadcasts in place.
  std::vector<size_t> counts(size);
  std::vector<T> blocks;
  for (int r = 0; r < size; ++r) {
    counts[r] = r == 1 ? 0 : n / 2 + r;
    for (size_t i = 0; i < counts[r]; ++i) blocks.push_back(T(r * 1000) + T(i % 999));
  }
  std::vector<T> mine(n * size, T(-1));  // gathered's size; the blocks fill its start
  size_t first = 0;
  for (int r = 0; r < rank; ++r) first += counts[r];
  std::copy(blocks.begin() + first, blocks.begin() + first + counts[rank], mine.begin() + first);
  gathered.Upload(mine);
  ASSERT_TRUE(comm.AllGatherUneven(gathered.ptr, counts).ok());
  ASSERT_TRUE(comm.Synchronize().ok());
  got = gathered.Download();
  for (size_t j = 0; j < blocks.size(); ++j) ASSERT_EQ(got[j], blocks[j]) << j;

  const int root = size - 1;
  for (size_t i = 0; i < n; ++i) host[i] = rank == root ? T(0.25) * T(i % 17) : T(-7);
  x.Upload(host);
  ASSERT_TRUE(comm.Broadcast(x.ptr, n, root).ok());
  ASSERT_TRUE(comm.Barrier().ok());
  got = x.Download();
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(got[i], T(0.25) * T(i % 17)) << i;
}

TEST(NcclCommunicator, CollectivesOnDeviceBuffers) {
  if (!HaveOneGpuPerRank()) GTEST_SKIP() << "needs one GPU per rank";
  auto world = TestWorld();
  ASSERT_NE(world, nullptr);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  {
    auto comm = NcclCommunicator::Create(*world, stream, dmc::testing::kTestTimeoutSeconds);
    ASSERT_TRUE(comm.ok()) << comm.status();
    EXPECT_EQ((*comm)->size(), world->size());
    EXPECT_EQ((*comm)->rank(), world->rank());
    CheckCollectives<float>(**comm);
    CheckCollectives<double>(**comm);
  }
  cudaStreamDestroy(stream);
}

// Both layouts of the world: all TP (the DP groups have one rank) and all DP (the TP groups have
// one rank). A group of several ranks, each with its own GPU, moves to NCCL; one of one rank stays.
TEST(NcclCommunicator, ProcessGroupsUseNccl) {
  if (!HaveOneGpuPerRank()) GTEST_SKIP() << "needs one GPU per rank";
  auto world = TestWorld();
  ASSERT_NE(world, nullptr);
  for (const int tp : {world->size(), 1}) {
    auto groups = ProcessGroups::Create(world->comm(), tp, dmc::testing::kTestTimeoutSeconds);
    ASSERT_TRUE(groups.ok()) << groups.status();
    absl::StatusOr<NcclGroups> moved = UseNccl(*groups, dmc::testing::kTestTimeoutSeconds);
    ASSERT_TRUE(moved.ok()) << moved.status();
    EXPECT_EQ(moved->tp, groups->tp().size() > 1) << "tp " << tp;
    EXPECT_EQ(moved->dp, groups->dp().size() > 1) << "tp " << tp;
    EXPECT_EQ(groups->tp().device_buffers(), moved->tp);
    EXPECT_EQ(groups->dp().device_buffers(), moved->dp);
    EXPECT_FALSE(groups->world().device_buffers());
    EXPECT_EQ(groups->tp().size(), tp);
    for (Communicator* group : {&groups->tp(), &groups->dp()}) {
      if (!group->device_buffers()) continue;
      // A stream of its own, which does not wait for the legacy default stream.
      unsigned flags = 0;
      ASSERT_EQ(cudaStreamGetFlags(group->device_stream(), &flags), cudaSuccess);
      EXPECT_EQ(flags, cudaStreamNonBlocking);
      CheckCollectives<float>(*group);
    }
  }
}

// Ranks that share one GPU (all on device 0): NCCL would refuse them, so every group stays on
// MPI, and every rank says so alike.
TEST(NcclCommunicator, ProcessGroupsSharingAGpuStayOnMpi) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) GTEST_SKIP() << "needs a GPU";
  auto world = TestWorld();
  ASSERT_NE(world, nullptr);
  if (world->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
  auto groups = ProcessGroups::Create(world->comm(), 2, dmc::testing::kTestTimeoutSeconds);
  ASSERT_TRUE(groups.ok()) << groups.status();
  absl::StatusOr<NcclGroups> moved = UseNccl(*groups, dmc::testing::kTestTimeoutSeconds);
  ASSERT_TRUE(moved.ok()) << moved.status();
  EXPECT_FALSE(moved->tp) << "the TP ranks share device 0";
  EXPECT_FALSE(moved->dp) << "one rank (world 2) or ranks sharing device 0 (world 4)";
  EXPECT_FALSE(groups->tp().device_buffers());
  EXPECT_FALSE(groups->dp().device_buffers());
}

// The last rank skips an all-reduce: the others' Synchronize must return DeadlineExceeded after
// 2 s (and abort their NCCL communicator) instead of hanging. The late rank's all-reduce can then
// never complete (its peers aborted), so it times out as well; no rank hangs.
TEST(NcclCommunicator, TimeoutReturnsDeadlineExceeded) {
  if (!HaveOneGpuPerRank()) GTEST_SKIP() << "needs one GPU per rank";
  auto world = TestWorld();
  ASSERT_NE(world, nullptr);
  if (world->size() < 2) GTEST_SKIP() << "needs 2 ranks";
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  {
    auto comm = NcclCommunicator::Create(*world, stream, 2.0);
    ASSERT_TRUE(comm.ok()) << comm.status();
    DeviceBuffer<float> x(1024);
    const bool stuck = world->rank() == world->size() - 1;
    if (stuck) std::this_thread::sleep_for(std::chrono::seconds(4));
    absl::Status status = (*comm)->AllReduceSum(x.ptr, x.n);
    if (status.ok()) status = (*comm)->Synchronize();
    if (!stuck) {
      EXPECT_EQ(status.code(), absl::StatusCode::kDeadlineExceeded) << status;
      EXPECT_NE(status.message().find("a rank failed or is stuck"), std::string::npos) << status;
    } else {
      EXPECT_FALSE(status.ok());
    }
    EXPECT_EQ((*comm)->Barrier().code(), absl::StatusCode::kFailedPrecondition);
  }
  cudaStreamDestroy(stream);
  EXPECT_TRUE(world->Barrier().ok());
}

}  // namespace
}  // namespace dmc::parallel
