// The collectives of the CUDA model (model/llama_cuda.h): tensor-parallel all-reduces in the order
// of the model's compute stream, and the data-parallel gradient average in buckets that overlap
// with the backward pass.
//
// A device communicator (NCCL) takes device buffers and runs its collectives on a stream of its
// own: a collective is enqueued there behind an event recorded on the compute stream (so it reads
// what the kernels before it wrote), and the compute stream waits on an event recorded behind it
// (so the kernels after it read the sum). The host never waits, and the compute stream runs on
// while a collective that it does not wait for yet is in flight.
//
// A host communicator (MPI) gets the buffer through pinned host memory, synchronously. This is
// what lets several ranks share one GPU, which NCCL refuses; the results are the same.
#pragma once

#include <cstddef>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cuda_ops.h"
#include "parallel/communicator.h"

namespace dmc::model {

// Sums device buffers over one group, ordered on one compute stream.
class DeviceReducer {
 public:
  DeviceReducer(parallel::Communicator& comm, cudaStream_t compute);
  ~DeviceReducer();
  DeviceReducer(const DeviceReducer&) = delete;
  DeviceReducer& operator=(const DeviceReducer&) = delete;

  parallel::Communicator& comm() const { return comm_; }
  cudaStream_t compute_stream() const { return compute_; }

  // Starts summing x[0, n) (device memory; X is float or double) over the group, behind the work
  // enqueued on the compute stream so far. Device communicator: returns at once, and the compute
  // stream must leave x alone until Join(). Host communicator: the sum is in x (in stream order)
  // when it returns.
  template <typename X>
  absl::Status Start(X* x, size_t n);
  // bf16 partial sums (the row-parallel outputs, the inputs' gradients of the column-parallel
  // projections): summed in fp32 (see llama_cuda_parallel.cpp) and rounded back into x by the
  // next Join(); one at a time.
  absl::Status Start(cuda::bf16* x, size_t n);
  // Makes later work on the compute stream see every sum started so far (no host wait).
  void Join();
  // Start + Join.
  template <typename X>
  absl::Status AllReduceSum(X* x, size_t n) {
    absl::Status status = Start(x, n);
    Join();
    return status;
  }
  // recv [size · n] = every rank's send [n] in rank order (device memory, send and recv apart), in
  // the compute stream's order; for small buffers (the vocabulary-parallel cross-entropy's
  // per-row statistics).
  absl::Status AllGather(const float* send, float* recv, size_t n);
  // Communicator::AllGatherUneven of device memory x in the compute stream's order: x holds every
  // rank's block back to back (counts[r] floats each), this rank's filled. Host communicator:
  // through a pinned copy of the whole of x (ZeRO-1's weights; ranks sharing a GPU are tests and
  // small models).
  absl::Status AllGatherUneven(float* x, const std::vector<size_t>& counts);
  // Device communicator: waits on the host, under the group's deadline, for the collectives started
  // so far and reports asynchronous errors (Communicator::Synchronize). Host communicator: no-op.
  absl::Status Synchronize() { return comm_.Synchronize(); }

 private:
  // Pinned host memory of at least `bytes`, and an fp32 device buffer of at least n floats.
  void* Staging(size_t bytes);
  float* Scratch(size_t n);

  parallel::Communicator& comm_;
  cudaStream_t compute_;
  cudaEvent_t ready_ = nullptr;  // on the compute stream, before a device collective
  cudaEvent_t done_ = nullptr;   // on the communicator's stream, after the last one
  bool started_ = false;         // a device collective the compute stream does not wait for yet
  cuda::bf16* pending_bf16_ = nullptr;  // a bf16 sum in scratch_, rounded back by Join()
  size_t pending_n_ = 0;
  void* staging_ = nullptr;
  size_t staging_bytes_ = 0;
  float* scratch_ = nullptr;
  size_t scratch_floats_ = 0;
};

// The data-parallel average of the flat gradient buffer, reduced in buckets while the backward
// pass still runs. The backward pass finishes the parameters from the end of the flat layout
// towards its start (LM head and final norm, the layers last to first, the embedding: it is last,
// and with tied embeddings it also holds the LM head's gradient), so the finished gradients are
// always one range [offset, end): each time it has grown by a bucket's worth it is started
// (DeviceReducer::Start), and the communication of a bucket overlaps with the backward of the
// layers below it.
class GradientBuckets {
 public:
  // reducer null or of size 1: nothing to do. Buckets hold at least bucket_floats floats (a
  // bucket ends at a layer boundary; the last one may be smaller).
  GradientBuckets(DeviceReducer* reducer, float* grads, size_t num_params, size_t bucket_floats);

  // The gradients of [offset, num_params) are final. The first error is kept for Finish(); after
  // it nothing more is started.
  void Ready(size_t offset);
  // Every gradient is final: starts the rest, makes the compute stream wait for all buckets,
  // divides by the group size and, for a device communicator, waits for the group under its
  // deadline (once per step: this is where a stuck or failed peer is reported). Returns the first
  // error.
  absl::Status Finish();

 private:
  DeviceReducer* reducer_;
  float* grads_;
  size_t num_params_, bucket_floats_;
  size_t end_;  // [end_, num_params_) has been started
  absl::Status status_;
};

}  // namespace dmc::model
