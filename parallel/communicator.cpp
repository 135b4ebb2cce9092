#include "parallel/communicator.h"

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace dmc::parallel {

size_t DTypeSize(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }
const char* DTypeName(DType dtype) { return dtype == DType::kFloat32 ? "float32" : "float64"; }

absl::Status Communicator::CheckRoot(const char* op, int root) const {
  if (root >= 0 && root < size()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s on group '%s': root %d is not a rank of a group of size %d", op, name(), root, size()));
}

absl::Status Communicator::CheckedAllGatherUneven(void* x, const std::vector<size_t>& counts,
                                                  DType dtype) {
  if (counts.size() != static_cast<size_t>(size())) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "AllGatherUneven on group '%s': %d block sizes for a group of %d ranks", name(),
        counts.size(), size()));
  }
  return DoAllGatherUneven(x, counts, dtype);
}

// ---------------------------------------------------------------------------------------------
// LocalCommunicator: a group of one. Sums and maxima over one rank are the value itself.

absl::Status LocalCommunicator::DoAllReduce(void*, size_t, DType, ReduceOp) {
  return absl::OkStatus();
}

absl::Status LocalCommunicator::DoAllGather(const void* send, void* recv, size_t n, DType dtype) {
  if (send != recv) std::memmove(recv, send, n * DTypeSize(dtype));
  return absl::OkStatus();
}

absl::Status LocalCommunicator::DoReduceScatterSum(const void* send, void* recv, size_t n,
                                                   DType dtype) {
  if (send != recv) std::memmove(recv, send, n * DTypeSize(dtype));
  return absl::OkStatus();
}

absl::Status LocalCommunicator::DoBroadcast(void*, size_t, DType, int root) {
  return CheckRoot("Broadcast", root);
}

absl::Status LocalCommunicator::DoAllGatherUneven(void*, const std::vector<size_t>&, DType) {
  return absl::OkStatus();  // the one block is this rank's already
}

// ---------------------------------------------------------------------------------------------
// MPI

std::string MpiErrorString(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return absl::StrCat("MPI error ", code);
  return std::string(text, length);
}

absl::Status WaitMpiRequest(MPI_Request* request, double timeout_seconds) {
  using Clock = std::chrono::steady_clock;
  const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                           std::chrono::duration<double>(timeout_seconds));
  // Spin first: a healthy collective between ranks on one node finishes in microseconds. Then
  // sleep between polls, because with more ranks than cores a spinning waiter steals the CPU from
  // the rank it is waiting for. MPI_Test also drives MPI's progress engine.
  constexpr int kSpinPolls = 2000;
  for (int polls = 0;; ++polls) {
    int done = 0;
    const int rc = MPI_Test(request, &done, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) return absl::InternalError(MpiErrorString(rc));
    if (done) return absl::OkStatus();
    if (Clock::now() >= deadline) return absl::DeadlineExceededError("MPI request timed out");
    if (polls >= kSpinPolls) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

static MPI_Datatype MpiType(DType dtype) {
  return dtype == DType::kFloat32 ? MPI_FLOAT : MPI_DOUBLE;
}

MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name, double timeout_seconds)
    : comm_(comm), name_(std::move(name)), timeout_seconds_(timeout_seconds) {
  MPI_Comm_rank(comm_, &rank_);
  MPI_Comm_size(comm_, &size_);
  MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
}

absl::StatusOr<std::unique_ptr<MpiCommunicator>> MpiCommunicator::Dup(MPI_Comm comm,
                                                                      std::string name,
                                                                      double timeout_seconds) {
  // MPI_Comm_dup blocks until every rank calls it, so first make sure that they are all here with
  // a barrier under the deadline. (Not MPI_Comm_idup: Open MPI's agreement on the new context id
  // runs several rounds on `comm`, which collide with later collectives on `comm` when a rank
  // gave up waiting.) The barrier is left in flight on timeout; the job is aborting.
  int size = 0;
  MPI_Comm_size(comm, &size);
  MPI_Request request = MPI_REQUEST_NULL;
  int rc = MPI_Ibarrier(comm, &request);
  absl::Status status = rc == MPI_SUCCESS ? WaitMpiRequest(&request, timeout_seconds)
                                          : absl::InternalError(MpiErrorString(rc));
  if (absl::IsDeadlineExceeded(status)) {
    return absl::DeadlineExceededError(absl::StrFormat(
        "creating group '%s' of %d ranks: not every rank arrived within %g s: a rank failed or is "
        "stuck before this point (e.g. at start-up)",
        name, size, timeout_seconds));
  }
  MPI_Comm dup = MPI_COMM_NULL;
  if (status.ok()) {
    rc = MPI_Comm_dup(comm, &dup);
    if (rc != MPI_SUCCESS) status = absl::InternalError(MpiErrorString(rc));
  }
  if (!status.ok()) {
    return absl::InternalError(absl::StrFormat("creating group '%s': %s", name, status.message()));
  }
  return std::make_unique<MpiCommunicator>(dup, std::move(name), timeout_seconds);
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized || comm_ == MPI_COMM_NULL) return;
  if (pending_ != MPI_REQUEST_NULL) {
    // A timed-out collective: give a late rank a moment to complete it, else leak the request and
    // the communicator (MPI can neither cancel nor free an active collective; the job aborts).
    if (!WaitMpiRequest(&pending_, 1.0).ok()) return;
  }
  MPI_Comm_free(&comm_);
}

absl::Status MpiCommunicator::Collective(const std::string& what, size_t n,
                                         const std::function<int(MPI_Request*)>& start) {
  if (!broken_by_.empty()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s on group '%s': the group is unusable since %s timed out; abort the job",
                        what, name_, broken_by_));
  }
  if (n > static_cast<size_t>(INT_MAX)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s on group '%s': %d elements exceed MPI's int count", what, name_, n));
  }
  MPI_Request request = MPI_REQUEST_NULL;
  const int rc = start(&request);
  absl::Status status = rc == MPI_SUCCESS ? WaitMpiRequest(&request, timeout_seconds_)
                                          : absl::InternalError(MpiErrorString(rc));
  if (status.ok()) return status;
  if (absl::IsDeadlineExceeded(status)) {
    pending_ = request;
    broken_by_ = what;
    return absl::DeadlineExceededError(absl::StrFormat(
        "%s on group '%s' (rank %d of %d) did not complete within %g s: a rank failed or is stuck "
        "(every rank of a group must call the same collectives in the same order); abort the job",
        what, name_, rank_, size_, timeout_seconds_));
  }
  return absl::InternalError(absl::StrFormat("%s on group '%s' (rank %d of %d) failed: %s", what,
                                             name_, rank_, size_, status.message()));
}

absl::Status MpiCommunicator::DoAllReduce(void* x, size_t n, DType dtype, ReduceOp op) {
  return Collective(
      absl::StrFormat("AllReduce%s(%d x %s)", op == kSum ? "Sum" : "Max", n, DTypeName(dtype)), n,
      [&](MPI_Request* request) {
        return MPI_Iallreduce(MPI_IN_PLACE, x, static_cast<int>(n), MpiType(dtype),
                              op == kSum ? MPI_SUM : MPI_MAX, comm_, request);
      });
}

absl::Status MpiCommunicator::DoAllGather(const void* send, void* recv, size_t n, DType dtype) {
  // In place (NCCL's convention: send is this rank's block of recv) is MPI_IN_PLACE.
  const bool in_place = send == static_cast<char*>(recv) + rank_ * n * DTypeSize(dtype);
  return Collective(
      absl::StrFormat("AllGather(%d x %s)", n, DTypeName(dtype)), n, [&](MPI_Request* request) {
        return MPI_Iallgather(in_place ? MPI_IN_PLACE : send, static_cast<int>(n), MpiType(dtype),
                              recv, static_cast<int>(n), MpiType(dtype), comm_, request);
      });
}

absl::Status MpiCommunicator::DoReduceScatterSum(const void* send, void* recv, size_t n,
                                                 DType dtype) {
  const std::string what = absl::StrFormat("ReduceScatterSum(%d x %s)", n, DTypeName(dtype));
  const size_t block = n * DTypeSize(dtype);
  const bool in_place = recv == static_cast<const char*>(send) + rank_ * block;
  if (!in_place) {
    return Collective(what, n, [&](MPI_Request* request) {
      return MPI_Ireduce_scatter_block(send, recv, static_cast<int>(n), MpiType(dtype), MPI_SUM,
                                       comm_, request);
    });
  }
  // NCCL's in-place convention (recv is this rank's block of send). MPI_IN_PLACE instead reads
  // the input from the receive buffer and writes the result to its first block, so run it on the
  // whole buffer and move the result to this rank's block (the other blocks are left unspecified).
  void* buffer = const_cast<void*>(send);
  absl::Status status = Collective(what, n, [&](MPI_Request* request) {
    return MPI_Ireduce_scatter_block(MPI_IN_PLACE, buffer, static_cast<int>(n), MpiType(dtype),
                                     MPI_SUM, comm_, request);
  });
  if (status.ok() && recv != buffer) std::memmove(recv, buffer, block);
  return status;
}

absl::Status MpiCommunicator::DoBroadcast(void* x, size_t n, DType dtype, int root) {
  if (absl::Status s = CheckRoot("Broadcast", root); !s.ok()) return s;
  return Collective(absl::StrFormat("Broadcast(%d x %s, root %d)", n, DTypeName(dtype), root), n,
                    [&](MPI_Request* request) {
                      return MPI_Ibcast(x, static_cast<int>(n), MpiType(dtype), root, comm_,
                                        request);
                    });
}

absl::Status MpiCommunicator::DoAllGatherUneven(void* x, const std::vector<size_t>& counts,
                                                DType dtype) {
  size_t total = 0;
  for (size_t c : counts) total += c;
  // Collective refuses totals beyond MPI's int, which bounds every count and displacement too.
  return Collective(
      absl::StrFormat("AllGatherUneven(%d x %s)", total, DTypeName(dtype)), total,
      [&](MPI_Request* request) {
        gatherv_counts_.assign(counts.begin(), counts.end());
        gatherv_displs_.assign(counts.size(), 0);
        for (size_t r = 1; r < counts.size(); ++r)
          gatherv_displs_[r] = gatherv_displs_[r - 1] + gatherv_counts_[r - 1];
        return MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, x, gatherv_counts_.data(),
                               gatherv_displs_.data(), MpiType(dtype), comm_, request);
      });
}

absl::Status MpiCommunicator::Barrier() {
  return Collective("Barrier", 0,
                    [&](MPI_Request* request) { return MPI_Ibarrier(comm_, request); });
}

// ---------------------------------------------------------------------------------------------
// CheckSameOnAllRanks

static uint64_t Fnv1a64(const std::string& s) {
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

absl::Status CheckSameOnAllRanks(Communicator& comm, const std::string& what,
                                 const std::string& value) {
  if (comm.device_buffers()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CheckSameOnAllRanks('%s') needs a host communicator, not the device group '%s'", what,
        comm.name()));
  }
  // The 64-bit hash travels as four 16-bit pieces, each exact in a double.
  const uint64_t hash = Fnv1a64(value);
  double mine[4];
  for (int i = 0; i < 4; ++i) mine[i] = static_cast<double>((hash >> (16 * i)) & 0xffff);
  std::vector<double> all(4 * static_cast<size_t>(comm.size()));
  if (absl::Status s = comm.AllGather(mine, all.data(), 4); !s.ok()) return s;

  // Every rank computes the same grouping from the same gathered hashes, so every rank returns
  // the same message (apart from its own value).
  std::map<uint64_t, std::vector<int>> ranks_by_hash;
  std::vector<uint64_t> hashes(comm.size());
  for (int r = 0; r < comm.size(); ++r) {
    uint64_t h = 0;
    for (int i = 0; i < 4; ++i) h |= static_cast<uint64_t>(all[4 * r + i]) << (16 * i);
    hashes[r] = h;
    ranks_by_hash[h].push_back(r);
  }
  if (ranks_by_hash.size() == 1) return absl::OkStatus();

  // The majority value is the reference (ties: the one that the lowest rank holds).
  uint64_t majority = hashes[0];
  for (int r = 0; r < comm.size(); ++r) {
    if (ranks_by_hash[hashes[r]].size() > ranks_by_hash[majority].size()) majority = hashes[r];
  }
  std::vector<int> differing;
  for (int r = 0; r < comm.size(); ++r) {
    if (hashes[r] != majority) differing.push_back(r);
  }
  std::string shown = value.size() > 200 ? value.substr(0, 200) + "..." : value;
  return absl::InvalidArgumentError(absl::StrFormat(
      "%s differs across the %d ranks of group '%s' (%d distinct values): rank(s) [%s] differ "
      "from rank(s) [%s]; this rank (%d) has '%s'",
      what, comm.size(), comm.name(), ranks_by_hash.size(), absl::StrJoin(differing, ", "),
      absl::StrJoin(ranks_by_hash[majority], ", "), comm.rank(), shown));
}

absl::Status AgreeOnStatus(Communicator& comm, const absl::Status& mine) {
  if (comm.size() == 1) return mine;
  if (comm.device_buffers())
    return absl::InvalidArgumentError(absl::StrFormat(
        "AgreeOnStatus needs a host communicator, not the device group '%s'", comm.name()));
  // Every rank's status code (0 = OK), then the message of the lowest failing rank, one byte per
  // double (messages are short and this is off the hot path).
  const double code = static_cast<double>(mine.code());
  std::vector<double> codes(static_cast<size_t>(comm.size()));
  if (absl::Status s = comm.AllGather(&code, codes.data(), 1); !s.ok()) return s;
  int failed = -1;
  for (int r = 0; r < comm.size() && failed < 0; ++r)
    if (codes[r] != 0) failed = r;
  if (failed < 0) return absl::OkStatus();
  constexpr size_t kMaxMessage = 4000;
  const absl::string_view text = mine.message().substr(0, kMaxMessage);
  double length = static_cast<double>(text.size());
  if (absl::Status s = comm.Broadcast(&length, 1, failed); !s.ok()) return s;
  std::vector<double> bytes(static_cast<size_t>(length));
  if (comm.rank() == failed)
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<unsigned char>(text[i]);
  if (!bytes.empty())
    if (absl::Status s = comm.Broadcast(bytes.data(), bytes.size(), failed); !s.ok()) return s;
  std::string message(bytes.size(), '\0');
  for (size_t i = 0; i < bytes.size(); ++i) message[i] = static_cast<char>(bytes[i]);
  return absl::Status(static_cast<absl::StatusCode>(codes[failed]),
                      absl::StrFormat("rank %d of group '%s': %s", failed, comm.name(), message));
}

}  // namespace dmc::parallel
