// MPI start-up and shut-down for the binaries (dmc-train, the MPI tests).
//
// Usage, first thing in main():
//   dmc::parallel::MpiEnv mpi(&argc, &argv);   // before flag parsing and before any CUDA call
//   ... absl::ParseCommandLine, ProcessGroups::Create(MPI_COMM_WORLD, tp), ...
//   if (!status.ok()) dmc::parallel::AbortJob(status);   // on any error once MPI is up
// Objects holding MPI communicators (ProcessGroups) must be destroyed before `mpi`.
#pragma once

#include "absl/status/status.h"

namespace dmc::parallel {

class MpiEnv {
 public:
  // MPI_Init_thread with MPI_THREAD_FUNNELED (only the main thread calls MPI; other threads, such
  // as data prefetchers, may exist). Under mpirun/srun the ranks find each other; run as a plain
  // process, MPI starts as a singleton (world size 1). Does nothing if MPI is already initialized.
  MpiEnv(int* argc, char*** argv);
  // MPI_Finalize, if this object initialized MPI.
  ~MpiEnv();
  MpiEnv(const MpiEnv&) = delete;
  MpiEnv& operator=(const MpiEnv&) = delete;

  int world_rank() const { return world_rank_; }
  int world_size() const { return world_size_; }
  // Rank among the ranks on this node, for picking a GPU when the launcher did not set
  // CUDA_VISIBLE_DEVICES per rank: from OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID (MPICH) or
  // SLURM_LOCALID, else 0 in a world of 1, else -1 (unknown).
  int local_rank() const { return local_rank_; }
  // The thread level MPI provided (MPI_THREAD_*).
  int thread_level() const { return thread_level_; }

 private:
  bool owns_ = false;
  int world_rank_ = 0, world_size_ = 1, local_rank_ = 0, thread_level_ = 0;
};

// Prints "[rank R] fatal: <status>" to stderr and ends the whole job: MPI_Abort on MPI_COMM_WORLD
// when MPI is up (mpirun then kills every rank, so no rank is left waiting in a collective), else
// exit(exit_code). Use it for every error once MPI is up, and always after a DeadlineExceeded from
// a collective.
[[noreturn]] void AbortJob(const absl::Status& status, int exit_code = 1);

}  // namespace dmc::parallel
