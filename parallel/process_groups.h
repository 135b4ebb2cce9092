// Data- and tensor-parallel process groups, laid out TP-fastest as Megatron-LM does: with TP size
// T, world ranks 0..T-1 form TP group 0 (one model replica), T..2T-1 TP group 1, and so on; the DP
// group of a rank is the ranks with the same TP rank. TP ranks then sit next to each other, i.e. on
// the same node when ranks are placed by slot, which is where TP's many small all-reduces must be.
//
//   world 8, tp 4:   tp groups {0,1,2,3} {4,5,6,7}     dp groups {0,4} {1,5} {2,6} {3,7}
#pragma once

#include <mpi.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "parallel/communicator.h"

namespace dmc::parallel {

struct ParallelLayout {
  int world_size = 1, world_rank = 0;
  int tp_size = 1, tp_rank = 0;
  int dp_size = 1, dp_rank = 0;

  // The layout of `world_rank`; InvalidArgument unless tp_size >= 1 divides world_size.
  static absl::StatusOr<ParallelLayout> Make(int world_size, int world_rank, int tp_size);
  // World rank of the rank at (dp_rank, tp_rank).
  int WorldRank(int dp, int tp) const { return dp * tp_size + tp; }
  // "world 4 = dp 2 x tp 2, rank 3 = (dp 1, tp 1)", for logs.
  std::string ToString() const;
};

class ProcessGroups {
 public:
  // Collective over `world` (normally MPI_COMM_WORLD), and every step has the deadline, so a rank
  // that never arrives gives DeadlineExceeded rather than a hang:
  //   1. duplicates `world` (a rank stuck or dead before this point is detected here),
  //   2. checks that every rank asked for the same tp_size (CheckSameOnAllRanks),
  //   3. validates the layout (tp_size divides the world size),
  //   4. splits the TP and DP groups (MPI_Comm_split).
  // Errors of steps 2 and 3 are the same on every rank; the caller prints them and exits (after a
  // timeout it must abort instead: see AbortJob in mpi_env.h).
  static absl::StatusOr<ProcessGroups> Create(
      MPI_Comm world, int tp_size,
      double timeout_seconds = MpiCommunicator::kDefaultTimeoutSeconds);
  // One process, no MPI: every group is a LocalCommunicator.
  static ProcessGroups Single();

  const ParallelLayout& layout() const { return layout_; }

  // The groups that the step's collectives use: the host (MPI or local) communicators, or the
  // device (NCCL) ones once SetDeviceCommunicators was called.
  Communicator& tp() { return device_tp_ ? *device_tp_ : *tp_; }
  Communicator& dp() { return device_dp_ ? *device_dp_ : *dp_; }
  // The whole world, always on the host: start-up checks, metrics, checkpoints.
  Communicator& world() { return *world_; }
  // Always the host (MPI or local) communicators, e.g. to bootstrap NCCL or to check configs.
  Communicator& host_tp() { return *tp_; }
  Communicator& host_dp() { return *dp_; }

  // Makes tp() and dp() return these (e.g. NcclCommunicators built from host_tp() and host_dp();
  // see UseNccl in nccl_communicator.h). Each must have the size and rank of the host group; a
  // null one leaves that group on its host communicator.
  absl::Status SetDeviceCommunicators(std::unique_ptr<Communicator> tp,
                                      std::unique_ptr<Communicator> dp);

 private:
  ParallelLayout layout_;
  std::unique_ptr<Communicator> world_, tp_, dp_;
  std::unique_ptr<Communicator> device_tp_, device_dp_;
};

}  // namespace dmc::parallel
