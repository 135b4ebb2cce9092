// GPU collectives over NCCL. Built only when the CUDA backend is on and NCCL is found
// (DMC_HAVE_NCCL, set by parallel/CMakeLists.txt); include it only from GPU code.
//
// Buffers are device pointers; collectives are enqueued on the communicator's CUDA stream and are
// asynchronous like any kernel: later work on that stream sees the result. Synchronize() waits for
// the stream with the deadline while polling ncclCommGetAsyncError, and on a timeout or an NCCL
// error aborts the NCCL communicator (ncclCommAbort frees GPUs stuck in a collective) and returns
// the error; the caller then aborts the job (AbortJob).
#pragma once

#ifndef DMC_HAVE_NCCL
#error "nccl_communicator.h needs NCCL: include it only where DMC_HAVE_NCCL is defined"
#endif

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "parallel/communicator.h"
#include "parallel/process_groups.h"

namespace dmc::parallel {

class NcclCommunicator : public Communicator {
 public:
  // Collective over the ranks of `host_group` (MPI or local; its rank and size become ours).
  // Rank 0 makes the ncclUniqueId and broadcasts it over host_group; the NCCL communicator is
  // created non-blocking and polled with the deadline, so a missing rank gives DeadlineExceeded.
  // Uses the current CUDA device (one GPU per rank: launch/mpirun.sh sets CUDA_VISIBLE_DEVICES).
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(
      Communicator& host_group, cudaStream_t stream,
      double timeout_seconds = MpiCommunicator::kDefaultTimeoutSeconds);
  // The same on a stream of its own (destroyed with it), created non-blocking: it never waits
  // implicitly for the legacy default stream that the model computes on, so the model can overlap
  // collectives with compute, ordering the two with events (device_stream()).
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> CreateOnOwnStream(
      Communicator& host_group, double timeout_seconds = MpiCommunicator::kDefaultTimeoutSeconds);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  bool device_buffers() const override { return true; }
  cudaStream_t device_stream() const override { return stream_; }
  // An all-reduce of one float, then Synchronize().
  absl::Status Barrier() override;
  absl::Status Synchronize() override;

  ncclComm_t comm() const { return comm_; }

 protected:
  absl::Status DoAllReduce(void* x, size_t n, DType dtype, ReduceOp op) override;
  absl::Status DoAllGather(const void* send, void* recv, size_t n, DType dtype) override;
  absl::Status DoReduceScatterSum(const void* send, void* recv, size_t n, DType dtype) override;
  absl::Status DoBroadcast(void* x, size_t n, DType dtype, int root) override;
  // One ncclBroadcast per rank of its block, in one NCCL group (nccl_communicator.cu says why).
  absl::Status DoAllGatherUneven(void* x, const std::vector<size_t>& counts,
                                 DType dtype) override;

 private:
  NcclCommunicator() = default;
  // Checks an NCCL call's result; a non-blocking communicator may answer ncclInProgress, after
  // which it must be polled until it is ready (under the deadline) before the next call.
  absl::Status Check(const std::string& what, ncclResult_t result);
  // FailedPrecondition once an earlier call failed.
  absl::Status Usable(const std::string& what) const;
  // Aborts the NCCL communicator and remembers why: later calls return FailedPrecondition.
  absl::Status Fail(const std::string& what, absl::Status status);

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool owns_stream_ = false;
  std::string name_;
  double timeout_seconds_ = MpiCommunicator::kDefaultTimeoutSeconds;
  int rank_ = 0, size_ = 1;
  float* scratch_ = nullptr;  // one device float for Barrier()
  std::string broken_by_;
};

// Which groups UseNccl moved to NCCL.
struct NcclGroups {
  bool tp = false, dp = false;
};

// Makes groups.tp() and groups.dp() NCCL communicators, built from host_tp() and host_dp(), each
// on a stream of its own (CreateOnOwnStream: TP's all-reduces never queue behind a DP gradient
// bucket), wherever NCCL can run them: a group moves to NCCL when every rank of it drives a GPU
// of its own (the current devices' UUIDs differ). NCCL refuses two ranks on one device, so a
// group whose ranks share a GPU stays on its host (MPI) communicator, which the CUDA model stages
// through host memory: slower, and the same results. A group of one rank stays too (it has
// nothing to communicate; a single-GPU run never starts NCCL). Every rank of a group reaches the
// same decision. Collective over the world; call after cudaSetDevice. groups.world() stays on MPI.
absl::StatusOr<NcclGroups> UseNccl(ProcessGroups& groups,
                                   double timeout_seconds = MpiCommunicator::kDefaultTimeoutSeconds);

}  // namespace dmc::parallel
