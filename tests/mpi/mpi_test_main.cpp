// main() of dmc_mpi_tests: every rank runs every test; rank 0 prints gtest's report, the other
// ranks print only their own failures (prefixed "[rank R]"). After each test the ranks' results
// are gathered, so a test that failed on any rank is reported as failed with the failing ranks, and
// the exit code (non-zero on every rank) makes mpirun and CTest fail.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "parallel/communicator.h"
#include "parallel/mpi_env.h"
#include "tests/mpi/mpi_test_util.h"

namespace {

using dmc::parallel::MpiCommunicator;

class RankResults : public ::testing::EmptyTestEventListener {
 public:
  RankResults(int rank, MpiCommunicator* world) : rank_(rank), world_(world) {}

  bool all_passed() const { return all_passed_; }

  // Failures on ranks other than 0 (whose printer gtest removed) are printed here.
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (rank_ == 0 || !result.failed()) return;
    std::printf("[rank %d] %s:%d: Failure\n%s\n", rank_,
                result.file_name() ? result.file_name() : "?", result.line_number(),
                result.message());
    std::fflush(stdout);
  }

  void OnTestEnd(const ::testing::TestInfo& info) override {
    const double failed = info.result()->Failed() ? 1.0 : 0.0;
    std::vector<double> all(world_->size());
    if (absl::Status s = world_->AllGather(&failed, all.data(), 1); !s.ok()) {
      dmc::parallel::AbortJob(s);  // a rank is gone or stuck: end the job rather than hang
    }
    std::vector<int> failing;
    for (int r = 0; r < world_->size(); ++r) {
      if (all[r] != 0.0) failing.push_back(r);
    }
    if (failing.empty()) return;
    all_passed_ = false;
    // gtest still counts this test as current here (and calls the printer after us), so on rank 0
    // a failure added now turns the report of a test that failed elsewhere into FAILED.
    if (rank_ == 0) {
      ADD_FAILURE() << info.test_suite_name() << "." << info.name() << " failed on rank(s) ["
                    << absl::StrJoin(failing, ", ") << "] of " << world_->size();
    }
  }

 private:
  int rank_;
  MpiCommunicator* world_;
  bool all_passed_ = true;
};

}  // namespace

int main(int argc, char** argv) {
  dmc::parallel::MpiEnv mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  auto world = MpiCommunicator::Dup(MPI_COMM_WORLD, "test-results", 120.0);
  if (!world.ok()) dmc::parallel::AbortJob(world.status());

  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (mpi.world_rank() != 0) delete listeners.Release(listeners.default_result_printer());
  auto* results = new RankResults(mpi.world_rank(), world->get());
  listeners.Append(results);  // gtest owns it

  const int gtest_result = RUN_ALL_TESTS();
  const bool passed = gtest_result == 0 && results->all_passed();
  if (mpi.world_rank() == 0) {
    std::printf("dmc_mpi_tests: %s on %d rank(s)\n", passed ? "PASSED" : "FAILED",
                mpi.world_size());
  }
  world->reset();  // free the communicator before MPI_Finalize
  return passed ? 0 : 1;
}
