#include "parallel/process_groups.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace dmc::parallel {

absl::StatusOr<ParallelLayout> ParallelLayout::Make(int world_size, int world_rank, int tp_size) {
  if (world_size < 1 || world_rank < 0 || world_rank >= world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("invalid world: rank %d of %d", world_rank, world_size));
  }
  if (tp_size < 1 || world_size % tp_size != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "--tp=%d must be a divisor of the number of ranks (%d): the world is split into "
        "data-parallel replicas of tp ranks each",
        tp_size, world_size));
  }
  ParallelLayout layout;
  layout.world_size = world_size;
  layout.world_rank = world_rank;
  layout.tp_size = tp_size;
  layout.tp_rank = world_rank % tp_size;  // TP-fastest
  layout.dp_size = world_size / tp_size;
  layout.dp_rank = world_rank / tp_size;
  return layout;
}

std::string ParallelLayout::ToString() const {
  return absl::StrFormat("world %d = dp %d x tp %d, rank %d = (dp %d, tp %d)", world_size, dp_size,
                         tp_size, world_rank, dp_rank, tp_rank);
}

absl::StatusOr<ProcessGroups> ProcessGroups::Create(MPI_Comm world, int tp_size,
                                                    double timeout_seconds) {
  ProcessGroups groups;
  absl::StatusOr<std::unique_ptr<MpiCommunicator>> world_comm =
      MpiCommunicator::Dup(world, "world", timeout_seconds);
  if (!world_comm.ok()) return world_comm.status();
  MpiCommunicator& w = **world_comm;

  // Ranks that disagree on tp would build different groups and then hang in MPI_Comm_split: check
  // first, so that every rank gets the same error.
  if (absl::Status s = CheckSameOnAllRanks(w, "--tp", absl::StrCat(tp_size)); !s.ok()) return s;
  absl::StatusOr<ParallelLayout> layout = ParallelLayout::Make(w.size(), w.rank(), tp_size);
  if (!layout.ok()) return layout.status();
  groups.layout_ = *layout;

  // Every rank is known to be here (the check above completed), so the blocking splits cannot hang.
  MPI_Comm tp_comm = MPI_COMM_NULL, dp_comm = MPI_COMM_NULL;
  if (int rc = MPI_Comm_split(w.comm(), layout->dp_rank, layout->tp_rank, &tp_comm);
      rc != MPI_SUCCESS) {
    return absl::InternalError(absl::StrCat("MPI_Comm_split (tp): ", MpiErrorString(rc)));
  }
  if (int rc = MPI_Comm_split(w.comm(), layout->tp_rank, layout->dp_rank, &dp_comm);
      rc != MPI_SUCCESS) {
    MPI_Comm_free(&tp_comm);
    return absl::InternalError(absl::StrCat("MPI_Comm_split (dp): ", MpiErrorString(rc)));
  }
  // Group names say which group this is: tp[d] is the TP group of replica d, dp[t] the DP group
  // of TP rank t.
  groups.tp_ = std::make_unique<MpiCommunicator>(
      tp_comm, absl::StrFormat("tp[%d]", layout->dp_rank), timeout_seconds);
  groups.dp_ = std::make_unique<MpiCommunicator>(
      dp_comm, absl::StrFormat("dp[%d]", layout->tp_rank), timeout_seconds);
  groups.world_ = std::move(*world_comm);
  return groups;
}

ProcessGroups ProcessGroups::Single() {
  ProcessGroups groups;
  groups.world_ = std::make_unique<LocalCommunicator>("world");
  groups.tp_ = std::make_unique<LocalCommunicator>("tp[0]");
  groups.dp_ = std::make_unique<LocalCommunicator>("dp[0]");
  return groups;
}

absl::Status ProcessGroups::SetDeviceCommunicators(std::unique_ptr<Communicator> tp,
                                                   std::unique_ptr<Communicator> dp) {
  auto matches = [](const std::unique_ptr<Communicator>& device, const Communicator& host) {
    return !device || (device->size() == host.size() && device->rank() == host.rank());
  };
  if (!matches(tp, *tp_) || !matches(dp, *dp_)) {
    return absl::InvalidArgumentError(
        "SetDeviceCommunicators: the device groups must match the host groups in size and rank");
  }
  device_tp_ = std::move(tp);
  device_dp_ = std::move(dp);
  return absl::OkStatus();
}

}  // namespace dmc::parallel
