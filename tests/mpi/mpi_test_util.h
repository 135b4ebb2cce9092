// Helpers for tests that run on every rank of `mpirun -np N dmc_mpi_tests`.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <memory>

#include "parallel/communicator.h"

namespace dmc::testing {

// Collectives in tests time out after this long, so a test that goes wrong on one rank fails on the
// others instead of hanging them.
constexpr double kTestTimeoutSeconds = 30.0;

inline int WorldRank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

inline int WorldSize() {
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return size;
}

// A private duplicate of MPI_COMM_WORLD for one test, so a test's leftovers (a timed-out
// collective) never reach another test.
inline std::unique_ptr<parallel::MpiCommunicator> TestWorld(const char* name = "test-world") {
  auto comm = parallel::MpiCommunicator::Dup(MPI_COMM_WORLD, name, kTestTimeoutSeconds);
  if (!comm.ok()) {
    ADD_FAILURE() << comm.status();
    return nullptr;
  }
  return std::move(*comm);
}

// True iff `flag` is true on every rank of `comm` (collective).
inline bool OnAllRanks(parallel::Communicator& comm, bool flag) {
  double not_flag = flag ? 0.0 : 1.0;
  absl::Status status = comm.AllReduceMax(&not_flag, 1);
  EXPECT_TRUE(status.ok()) << status;
  return status.ok() && not_flag == 0.0;
}

}  // namespace dmc::testing
