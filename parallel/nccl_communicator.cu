// NCCL communicator: host code only (no kernels); a .cu file so that it is compiled only in CUDA
// builds, and only added to dmc_parallel when NCCL is found (parallel/CMakeLists.txt).
#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "parallel/nccl_communicator.h"

namespace dmc::parallel {
namespace {

using Clock = std::chrono::steady_clock;

Clock::time_point DeadlineAfter(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

// Spin first (a collective that is already done answers at once), then sleep between polls: 20 us
// is far below a step's time and leaves the CPU to data loading and the other ranks.
void Pause(int polls) {
  if (polls > 1000) std::this_thread::sleep_for(std::chrono::microseconds(20));
}

ncclDataType_t NcclType(DType dtype) {
  return dtype == DType::kFloat32 ? ncclFloat32 : ncclFloat64;
}

std::string NcclError(ncclComm_t comm, ncclResult_t result) {
  std::string text = ncclGetErrorString(result);
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  if (last != nullptr && *last != '\0') absl::StrAppend(&text, " (", last, ")");
  return text;
}

// A non-blocking communicator answers ncclInProgress while it initializes, finalizes or enqueues;
// poll its state until it is settled or the deadline passes.
absl::Status WaitReady(ncclComm_t comm, Clock::time_point deadline) {
  for (int polls = 0;; ++polls) {
    ncclResult_t state = ncclSuccess;
    if (ncclResult_t r = ncclCommGetAsyncError(comm, &state); r != ncclSuccess) {
      return absl::InternalError(NcclError(comm, r));
    }
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return absl::InternalError(NcclError(comm, state));
    if (Clock::now() >= deadline) return absl::DeadlineExceededError("timed out");
    Pause(polls);
  }
}

std::string Describe(const char* op, size_t n, DType dtype) {
  return absl::StrFormat("%s(%d x %s)", op, n, DTypeName(dtype));
}

// Whether the current devices of the ranks of host_group are pairwise different GPUs; the same
// answer on every rank (each decides from the same gathered UUIDs). Collective.
absl::StatusOr<bool> EveryRankHasItsOwnGpu(Communicator& host_group) {
  int device = 0;
  cudaDeviceProp prop;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaGetDeviceProperties(&prop, device);
  if (e != cudaSuccess) {
    return absl::InternalError(
        absl::StrCat("reading this rank's GPU for group '", host_group.name(), "': ",
                     cudaGetErrorString(e)));
  }
  // The 16-byte UUID travels as four 32-bit pieces, each exact in a double.
  std::array<double, 4> mine;
  for (int i = 0; i < 4; ++i) {
    uint32_t word = 0;
    std::memcpy(&word, prop.uuid.bytes + 4 * i, sizeof(word));
    mine[i] = word;
  }
  std::vector<double> all(4 * static_cast<size_t>(host_group.size()));
  if (absl::Status s = host_group.AllGather(mine.data(), all.data(), 4); !s.ok()) return s;
  std::set<std::array<double, 4>> gpus;
  for (int r = 0; r < host_group.size(); ++r)
    gpus.insert({all[4 * r], all[4 * r + 1], all[4 * r + 2], all[4 * r + 3]});
  return static_cast<int>(gpus.size()) == host_group.size();
}

}  // namespace

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(Communicator& host_group,
                                                                           cudaStream_t stream,
                                                                           double timeout_seconds) {
  if (host_group.device_buffers()) {
    return absl::InvalidArgumentError("NcclCommunicator::Create needs a host (MPI) group");
  }
  std::unique_ptr<NcclCommunicator> c(new NcclCommunicator());
  c->stream_ = stream;
  c->name_ = host_group.name();
  c->timeout_seconds_ = timeout_seconds;
  c->rank_ = host_group.rank();
  c->size_ = host_group.size();

  // Rank 0 makes the id; it travels over the host group as doubles (bit copies: the host
  // group's broadcast is typed, and MPI moves the bytes unchanged).
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (c->rank_ == 0) {
    if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess) {
      return absl::InternalError(absl::StrCat("ncclGetUniqueId: ", ncclGetErrorString(r)));
    }
  }
  static_assert(sizeof(ncclUniqueId) % sizeof(double) == 0, "ncclUniqueId size");
  double words[sizeof(ncclUniqueId) / sizeof(double)];
  std::memcpy(words, &id, sizeof(id));
  if (absl::Status s = host_group.Broadcast(words, sizeof(words) / sizeof(double), 0); !s.ok()) {
    return s;
  }
  std::memcpy(&id, words, sizeof(id));

  // Non-blocking creation so that a missing rank is a timeout, not a hang.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclResult_t r = ncclCommInitRankConfig(&c->comm_, c->size_, id, c->rank_, &config);
  absl::Status status = r == ncclSuccess || r == ncclInProgress
                            ? WaitReady(c->comm_, DeadlineAfter(timeout_seconds))
                            : absl::InternalError(NcclError(nullptr, r));
  if (!status.ok()) {
    if (c->comm_ != nullptr) ncclCommAbort(c->comm_);
    c->comm_ = nullptr;
    return absl::Status(
        status.code(),
        absl::StrFormat(
            "creating NCCL group '%s' (rank %d of %d)%s: %s", c->name_, c->rank_, c->size_,
            absl::IsDeadlineExceeded(status) ? " did not complete: a rank failed or is stuck" : "",
            status.message()));
  }
  if (cudaError_t e = cudaMalloc(&c->scratch_, sizeof(float)); e != cudaSuccess) {
    c->scratch_ = nullptr;
    return absl::ResourceExhaustedError(absl::StrCat("cudaMalloc: ", cudaGetErrorString(e)));
  }
  cudaMemset(c->scratch_, 0, sizeof(float));
  return c;
}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::CreateOnOwnStream(
    Communicator& host_group, double timeout_seconds) {
  cudaStream_t stream = nullptr;
  if (cudaError_t e = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking); e != cudaSuccess) {
    return absl::InternalError(absl::StrCat("cudaStreamCreateWithFlags: ", cudaGetErrorString(e)));
  }
  absl::StatusOr<std::unique_ptr<NcclCommunicator>> c = Create(host_group, stream, timeout_seconds);
  if (!c.ok()) {
    cudaStreamDestroy(stream);
    return c.status();
  }
  (*c)->owns_stream_ = true;
  return c;
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) {
    // Finalize flushes the queued operations (polled, as the communicator is non-blocking); on
    // any failure abort, which never waits for other ranks.
    bool clean = broken_by_.empty();
    if (clean) {
      ncclResult_t r = ncclCommFinalize(comm_);
      clean = (r == ncclSuccess || r == ncclInProgress) &&
              WaitReady(comm_, DeadlineAfter(timeout_seconds_)).ok();
    }
    if (clean) {
      ncclCommDestroy(comm_);
    } else {
      ncclCommAbort(comm_);
    }
  }
  if (scratch_ != nullptr) cudaFree(scratch_);
  if (owns_stream_) cudaStreamDestroy(stream_);
}

absl::Status NcclCommunicator::Fail(const std::string& what, absl::Status status) {
  broken_by_ = what;
  std::string message =
      absl::IsDeadlineExceeded(status)
          ? absl::StrFormat(
                "did not complete within %g s: a rank failed or is stuck (every rank "
                "of a group must call the same collectives in the same order)",
                timeout_seconds_)
          : std::string(status.message());
  ncclCommAbort(comm_);  // frees GPUs stuck in a collective of this communicator
  comm_ = nullptr;
  return absl::Status(status.code(),
                      absl::StrFormat("%s on NCCL group '%s' (rank %d of %d) %s; abort the job",
                                      what, name_, rank_, size_, message));
}

absl::Status NcclCommunicator::Check(const std::string& what, ncclResult_t result) {
  if (result == ncclSuccess) return absl::OkStatus();
  if (result == ncclInProgress) {
    absl::Status status = WaitReady(comm_, DeadlineAfter(timeout_seconds_));
    return status.ok() ? status : Fail(what, status);
  }
  return Fail(what, absl::InternalError(NcclError(comm_, result)));
}

absl::Status NcclCommunicator::Usable(const std::string& what) const {
  if (broken_by_.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrFormat("%s on NCCL group '%s': the group is unusable since %s failed; abort the job",
                      what, name_, broken_by_));
}

absl::Status NcclCommunicator::DoAllReduce(void* x, size_t n, DType dtype, ReduceOp op) {
  const std::string what = Describe(op == kSum ? "AllReduceSum" : "AllReduceMax", n, dtype);
  if (absl::Status s = Usable(what); !s.ok()) return s;
  return Check(what, ncclAllReduce(x, x, n, NcclType(dtype), op == kSum ? ncclSum : ncclMax, comm_,
                                   stream_));
}

absl::Status NcclCommunicator::DoAllGather(const void* send, void* recv, size_t n, DType dtype) {
  const std::string what = Describe("AllGather", n, dtype);
  if (absl::Status s = Usable(what); !s.ok()) return s;
  return Check(what, ncclAllGather(send, recv, n, NcclType(dtype), comm_, stream_));
}

absl::Status NcclCommunicator::DoReduceScatterSum(const void* send, void* recv, size_t n,
                                                  DType dtype) {
  const std::string what = Describe("ReduceScatterSum", n, dtype);
  if (absl::Status s = Usable(what); !s.ok()) return s;
  return Check(what, ncclReduceScatter(send, recv, n, NcclType(dtype), ncclSum, comm_, stream_));
}

absl::Status NcclCommunicator::DoBroadcast(void* x, size_t n, DType dtype, int root) {
  const std::string what = Describe("Broadcast", n, dtype);
  if (absl::Status s = Usable(what); !s.ok()) return s;
  if (absl::Status s = CheckRoot("Broadcast", root); !s.ok()) return s;
  return Check(what, ncclBroadcast(x, x, n, NcclType(dtype), root, comm_, stream_));
}

// ncclAllGather needs equal blocks. Padding every block to the largest would need a padded copy of
// the buffer and two extra device copies per call; instead each rank broadcasts its block in place,
// and ncclGroupStart/End fuse the broadcasts into one operation. Every rank receives the other
// ranks' blocks once, the traffic of an all-gather, and no memory beyond x is touched.
absl::Status NcclCommunicator::DoAllGatherUneven(void* x, const std::vector<size_t>& counts,
                                                 DType dtype) {
  size_t total = 0;
  for (size_t c : counts) total += c;
  const std::string what = Describe("AllGatherUneven", total, dtype);
  if (absl::Status s = Usable(what); !s.ok()) return s;
  // Inside a group a non-blocking communicator may answer ncclInProgress; ncclGroupEnd (checked,
  // and polled by Check) reports the outcome of the whole group.
  auto queued = [](ncclResult_t r) { return r == ncclSuccess || r == ncclInProgress; };
  char* block = static_cast<char*>(x);
  ncclResult_t result = ncclGroupStart();
  for (int root = 0; root < size_ && queued(result); ++root) {
    if (counts[root] > 0)
      result = ncclBroadcast(block, block, counts[root], NcclType(dtype), root, comm_, stream_);
    block += counts[root] * DTypeSize(dtype);
  }
  const ncclResult_t end = ncclGroupEnd();
  return Check(what, queued(result) ? end : result);
}

absl::Status NcclCommunicator::Barrier() {
  if (absl::Status s = Usable("Barrier"); !s.ok()) return s;
  if (absl::Status s = Check(
          "Barrier", ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_, stream_));
      !s.ok()) {
    return s;
  }
  return Synchronize();
}

absl::Status NcclCommunicator::Synchronize() {
  if (absl::Status s = Usable("Synchronize"); !s.ok()) return s;
  // Wait for the stream, watching NCCL's asynchronous error state: a peer that died or stopped
  // calling collectives leaves our kernels waiting forever, and only the deadline ends that.
  const Clock::time_point deadline = DeadlineAfter(timeout_seconds_);
  for (int polls = 0;; ++polls) {
    const cudaError_t e = cudaStreamQuery(stream_);
    ncclResult_t state = ncclSuccess;
    ncclCommGetAsyncError(comm_, &state);
    if (state != ncclSuccess && state != ncclInProgress) {
      return Fail("Synchronize", absl::InternalError(NcclError(comm_, state)));
    }
    if (e == cudaSuccess) return absl::OkStatus();
    if (e != cudaErrorNotReady) {
      return Fail("Synchronize", absl::InternalError(cudaGetErrorString(e)));
    }
    if (Clock::now() >= deadline) return Fail("Synchronize", absl::DeadlineExceededError(""));
    Pause(polls);
  }
}

absl::StatusOr<NcclGroups> UseNccl(ProcessGroups& groups, double timeout_seconds) {
  NcclGroups moved;
  Communicator* host[2] = {&groups.host_tp(), &groups.host_dp()};
  bool* flag[2] = {&moved.tp, &moved.dp};
  std::unique_ptr<NcclCommunicator> device[2];
  // TP first, then DP, on every rank: the groups' collectives never interleave differently.
  for (int g = 0; g < 2; ++g) {
    if (host[g]->size() == 1) continue;  // nothing to communicate
    absl::StatusOr<bool> own_gpus = EveryRankHasItsOwnGpu(*host[g]);
    if (!own_gpus.ok()) return own_gpus.status();
    if (!*own_gpus) continue;
    absl::StatusOr<std::unique_ptr<NcclCommunicator>> c =
        NcclCommunicator::CreateOnOwnStream(*host[g], timeout_seconds);
    if (!c.ok()) return c.status();
    device[g] = std::move(*c);
    *flag[g] = true;
  }
  if (absl::Status s = groups.SetDeviceCommunicators(std::move(device[0]), std::move(device[1]));
      !s.ok()) {
    return s;
  }
  return moved;
}

}  // namespace dmc::parallel
