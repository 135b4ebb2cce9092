// Collective communication for data- and tensor-parallel training.
//
// A Communicator is one group of ranks (the TP group, the DP group or the whole world). The model
// and the trainer only see this interface, so the same code runs:
//   - on one process (LocalCommunicator: size 1, every collective is the identity),
//   - on CPUs under mpirun (MpiCommunicator: host buffers, MPI collectives), which is how CI tests
//     the parallel logic with `mpirun -np 2` and `-np 4`,
//   - on GPUs (NcclCommunicator in nccl_communicator.h: device buffers, NCCL on a CUDA stream).
//
// Rules (as in MPI and NCCL): every rank of the group calls the same collectives in the same order
// with the same counts. A rank that does not (it crashed, is stuck, or took another code path)
// would make the others wait forever, so every wait has a deadline: a collective that does not
// complete in time returns DeadlineExceeded, the communicator is then unusable, and the caller
// must abort the job (AbortJob in mpi_env.h) so that no rank hangs.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// cudaStream_t is a CUstream_st*; declared here so that this header needs no CUDA.
struct CUstream_st;

namespace dmc::parallel {

enum class DType { kFloat32, kFloat64 };
size_t DTypeSize(DType dtype);
const char* DTypeName(DType dtype);

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Name of the group ("world", "tp", "dp"), used in error messages.
  virtual const std::string& name() const = 0;
  // True when buffers are device pointers (NCCL), false for host pointers (MPI, local).
  virtual bool device_buffers() const { return false; }
  // Device communicators: the CUDA stream (a cudaStream_t) that their collectives are enqueued on,
  // so that a caller can order them after its own work, and its work after them, with events;
  // null for host communicators.
  virtual CUstream_st* device_stream() const { return nullptr; }

  // x[i] = sum (max) over the ranks of x[i], in place, on every rank.
  absl::Status AllReduceSum(float* x, size_t n) { return DoAllReduce(x, n, DType::kFloat32, kSum); }
  absl::Status AllReduceSum(double* x, size_t n) {
    return DoAllReduce(x, n, DType::kFloat64, kSum);
  }
  absl::Status AllReduceMax(float* x, size_t n) { return DoAllReduce(x, n, DType::kFloat32, kMax); }
  absl::Status AllReduceMax(double* x, size_t n) {
    return DoAllReduce(x, n, DType::kFloat64, kMax);
  }

  // recv[r*n + i] = send[i] of rank r; recv holds size()*n. In place when send == recv + rank()*n
  // (NCCL's convention). Otherwise send and recv must not overlap.
  absl::Status AllGather(const float* send, float* recv, size_t n) {
    return DoAllGather(send, recv, n, DType::kFloat32);
  }
  absl::Status AllGather(const double* send, double* recv, size_t n) {
    return DoAllGather(send, recv, n, DType::kFloat64);
  }

  // The uneven all-gather, in place: x holds every rank's block back to back in rank order, rank
  // r's block counts[r] values long (counts: size() entries, the same on every rank, zeros
  // allowed). On entry this rank's block holds its values; on return every block holds its rank's
  // (MPI_Allgatherv). ZeRO-1 gathers the updated parameter slices with it (model/zero1_shard.h).
  absl::Status AllGatherUneven(float* x, const std::vector<size_t>& counts) {
    return CheckedAllGatherUneven(x, counts, DType::kFloat32);
  }
  absl::Status AllGatherUneven(double* x, const std::vector<size_t>& counts) {
    return CheckedAllGatherUneven(x, counts, DType::kFloat64);
  }

  // recv[i] = sum over ranks r of send_r[rank()*n + i]; send holds size()*n, recv n. In place when
  // recv == send + rank()*n (NCCL's convention). Otherwise send and recv must not overlap.
  absl::Status ReduceScatterSum(const float* send, float* recv, size_t n) {
    return DoReduceScatterSum(send, recv, n, DType::kFloat32);
  }
  absl::Status ReduceScatterSum(const double* send, double* recv, size_t n) {
    return DoReduceScatterSum(send, recv, n, DType::kFloat64);
  }

  // x on every rank = x on rank `root` (a rank of this group), in place.
  absl::Status Broadcast(float* x, size_t n, int root) {
    return DoBroadcast(x, n, DType::kFloat32, root);
  }
  absl::Status Broadcast(double* x, size_t n, int root) {
    return DoBroadcast(x, n, DType::kFloat64, root);
  }

  // Returns once every rank of the group has entered it.
  virtual absl::Status Barrier() = 0;

  // MPI and local collectives are complete when they return. NCCL collectives are enqueued on the
  // communicator's stream (later work on that stream sees the result); Synchronize() waits for
  // them with the deadline and reports asynchronous errors. Call it at least once per step.
  virtual absl::Status Synchronize() { return absl::OkStatus(); }

 protected:
  enum ReduceOp { kSum, kMax };
  virtual absl::Status DoAllReduce(void* x, size_t n, DType dtype, ReduceOp op) = 0;
  virtual absl::Status DoAllGather(const void* send, void* recv, size_t n, DType dtype) = 0;
  virtual absl::Status DoReduceScatterSum(const void* send, void* recv, size_t n, DType dtype) = 0;
  virtual absl::Status DoBroadcast(void* x, size_t n, DType dtype, int root) = 0;
  // counts has size() entries (checked before the call).
  virtual absl::Status DoAllGatherUneven(void* x, const std::vector<size_t>& counts,
                                         DType dtype) = 0;

  // InvalidArgument naming the group when root is not a rank of it.
  absl::Status CheckRoot(const char* op, int root) const;

 private:
  // InvalidArgument naming the group unless counts has one entry per rank; else DoAllGatherUneven.
  absl::Status CheckedAllGatherUneven(void* x, const std::vector<size_t>& counts, DType dtype);
};

// One process: size 1, rank 0. Collectives are the identity (copies when send != recv; host
// buffers only).
class LocalCommunicator : public Communicator {
 public:
  explicit LocalCommunicator(std::string name = "local") : name_(std::move(name)) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const std::string& name() const override { return name_; }
  absl::Status Barrier() override { return absl::OkStatus(); }

 protected:
  absl::Status DoAllReduce(void* x, size_t n, DType dtype, ReduceOp op) override;
  absl::Status DoAllGather(const void* send, void* recv, size_t n, DType dtype) override;
  absl::Status DoReduceScatterSum(const void* send, void* recv, size_t n, DType dtype) override;
  absl::Status DoBroadcast(void* x, size_t n, DType dtype, int root) override;
  absl::Status DoAllGatherUneven(void* x, const std::vector<size_t>& counts,
                                 DType dtype) override;

 private:
  std::string name_;
};

// Host buffers over an MPI communicator. Each collective is the non-blocking MPI call
// (MPI_Iallreduce and friends) polled with MPI_Test until it completes or the deadline passes, so
// a missing rank gives DeadlineExceeded instead of a hang. After a timeout the operation is still
// in flight (MPI cannot cancel a collective): the communicator refuses further work
// (FailedPrecondition), and the buffers of the timed-out call must stay alive, which is true when
// the caller aborts.
class MpiCommunicator : public Communicator {
 public:
  static constexpr double kDefaultTimeoutSeconds = 300.0;

  // Takes ownership of `comm` (freed in the destructor) and sets MPI_ERRORS_RETURN on it, so MPI
  // errors come back as a Status. Use Dup() to share a communicator someone else owns.
  MpiCommunicator(MPI_Comm comm, std::string name, double timeout_seconds = kDefaultTimeoutSeconds);
  // A private duplicate of `comm` (so our traffic never matches anyone else's). Collective; a
  // barrier under the deadline comes first, so a rank that never arrives gives DeadlineExceeded.
  static absl::StatusOr<std::unique_ptr<MpiCommunicator>> Dup(
      MPI_Comm comm, std::string name, double timeout_seconds = kDefaultTimeoutSeconds);
  ~MpiCommunicator() override;
  MpiCommunicator(const MpiCommunicator&) = delete;
  MpiCommunicator& operator=(const MpiCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  absl::Status Barrier() override;

  MPI_Comm comm() const { return comm_; }
  double timeout_seconds() const { return timeout_seconds_; }
  // Applies to later collectives (the tests shorten it; a trainer may lengthen it around I/O).
  void set_timeout_seconds(double seconds) { timeout_seconds_ = seconds; }

 protected:
  absl::Status DoAllReduce(void* x, size_t n, DType dtype, ReduceOp op) override;
  absl::Status DoAllGather(const void* send, void* recv, size_t n, DType dtype) override;
  absl::Status DoReduceScatterSum(const void* send, void* recv, size_t n, DType dtype) override;
  absl::Status DoBroadcast(void* x, size_t n, DType dtype, int root) override;
  absl::Status DoAllGatherUneven(void* x, const std::vector<size_t>& counts,
                                 DType dtype) override;

 private:
  // Runs one collective: refuses work after a timeout and counts beyond MPI's int, calls `start`
  // (an MPI_I* call that fills the request), then polls the request until it completes or the
  // deadline passes. On timeout the request stays in pending_.
  absl::Status Collective(const std::string& what, size_t n,
                          const std::function<int(MPI_Request*)>& start);

  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string name_;
  double timeout_seconds_;
  int rank_ = 0;
  int size_ = 1;
  MPI_Request pending_ = MPI_REQUEST_NULL;  // a timed-out collective still in flight
  std::string broken_by_;                   // what timed out (empty while healthy)
  // MPI_Iallgatherv's counts and displacements: members, because MPI reads them until the
  // request completes, which after a timeout is after the call has returned.
  std::vector<int> gatherv_counts_, gatherv_displs_;
};

// Waits for `request` with MPI_Test until `timeout_seconds` pass; sleeps between polls after a
// short spin so oversubscribed ranks leave the CPU to the rank they wait for. Returns OK, the MPI
// error, or DeadlineExceeded (request still in flight, left in *request).
absl::Status WaitMpiRequest(MPI_Request* request, double timeout_seconds);

// Text of an MPI error code.
std::string MpiErrorString(int code);

// Checks that `value` (e.g. a config, a flag's value, a hash of the weights) is the same on every
// rank of `comm`. Collective. On mismatch EVERY rank gets the same InvalidArgument naming `what`,
// the group and the ranks whose value differs from the majority, plus this rank's own value
// (shortened) so each rank's log shows what it had. Values are compared by a 64-bit FNV-1a hash.
// `comm` must use host buffers (MPI or local).
absl::Status CheckSameOnAllRanks(Communicator& comm, const std::string& what,
                                 const std::string& value);

// Turns each rank's own outcome into one outcome for the group, so that no rank goes on to a
// collective that a failed rank will never join (it would wait out the deadline, then abort with
// a message that hides the cause). Collective. OK on every rank when `mine` is OK on every rank;
// otherwise every rank returns the status of the lowest failing rank: its code, and its message
// (at most 4000 bytes) prefixed with "rank R of group 'G': ". `comm` must use host buffers.
absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& mine);

}  // namespace dmc::parallel
