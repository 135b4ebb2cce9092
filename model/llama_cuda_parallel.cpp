#include "model/llama_cuda_parallel.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "absl/strings/str_cat.h"
#include "kernels/cuda_check.h"
#include "model/llama_cuda.h"

namespace dmc::model {

// Element-wise helpers of llama_cuda.cu and llama_cuda_parallel.cu.
namespace cuda_model_detail {
void scale(float* x, size_t n, float s, cudaStream_t stream);
void to_bf16(cuda::bf16* out, const float* in, size_t n, cudaStream_t stream);
void to_f32(float* out, const cuda::bf16* in, size_t n, cudaStream_t stream);
}  // namespace cuda_model_detail

namespace {
namespace h = cuda_model_detail;

// A host communicator's buffers pass through pinned memory in pieces of at most this size: a
// bucket or the whole gradient (AverageGradients) never needs a pinned copy of its own size.
constexpr size_t kStagingBytes = 16u << 20;

}  // namespace

// ---- DeviceReducer ----

DeviceReducer::DeviceReducer(parallel::Communicator& comm, cudaStream_t compute)
    : comm_(comm), compute_(compute) {
  DMC_CUDA_CHECK(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming));
  DMC_CUDA_CHECK(cudaEventCreateWithFlags(&done_, cudaEventDisableTiming));
}

DeviceReducer::~DeviceReducer() {
  // Nothing in flight may still read the buffers freed here.
  DMC_CUDA_CHECK(cudaStreamSynchronize(compute_));
  if (staging_) DMC_CUDA_CHECK(cudaFreeHost(staging_));
  if (scratch_) DMC_CUDA_CHECK(cudaFree(scratch_));
  DMC_CUDA_CHECK(cudaEventDestroy(ready_));
  DMC_CUDA_CHECK(cudaEventDestroy(done_));
}

void* DeviceReducer::Staging(size_t bytes) {
  if (bytes > staging_bytes_) {
    DMC_CUDA_CHECK(cudaStreamSynchronize(compute_));  // copies from the old buffer may be queued
    if (staging_) DMC_CUDA_CHECK(cudaFreeHost(staging_));
    DMC_CUDA_CHECK(cudaMallocHost(&staging_, bytes));
    staging_bytes_ = bytes;
  }
  return staging_;
}

float* DeviceReducer::Scratch(size_t n) {
  if (n > scratch_floats_) {
    // Earlier sums in the old buffer were joined, so the compute stream is the last to touch it.
    DMC_CUDA_CHECK(cudaStreamSynchronize(compute_));
    if (scratch_) DMC_CUDA_CHECK(cudaFree(scratch_));
    DMC_CUDA_CHECK(cudaMalloc(&scratch_, n * sizeof(float)));
    scratch_floats_ = n;
  }
  return scratch_;
}

template <typename X>
absl::Status DeviceReducer::Start(X* x, size_t n) {
  if (n == 0 || comm_.size() == 1) return absl::OkStatus();
  if (comm_.device_buffers()) {
    DMC_CUDA_CHECK(cudaEventRecord(ready_, compute_));
    DMC_CUDA_CHECK(cudaStreamWaitEvent(comm_.device_stream(), ready_, 0));
    started_ = true;
    return comm_.AllReduceSum(x, n);
  }
  // Host communicator: piece by piece through the pinned buffer. Every copy is on the compute
  // stream, so the next piece's download cannot overtake the previous piece's upload.
  const size_t piece = kStagingBytes / sizeof(X);
  X* host = static_cast<X*>(Staging(std::min(n, piece) * sizeof(X)));
  for (size_t done = 0; done < n; done += piece) {
    const size_t m = std::min(piece, n - done);
    DMC_CUDA_CHECK(
        cudaMemcpyAsync(host, x + done, m * sizeof(X), cudaMemcpyDeviceToHost, compute_));
    DMC_CUDA_CHECK(cudaStreamSynchronize(compute_));
    if (absl::Status s = comm_.AllReduceSum(host, m); !s.ok()) return s;
    DMC_CUDA_CHECK(
        cudaMemcpyAsync(x + done, host, m * sizeof(X), cudaMemcpyHostToDevice, compute_));
  }
  return absl::OkStatus();
}

template absl::Status DeviceReducer::Start(float* x, size_t n);
template absl::Status DeviceReducer::Start(double* x, size_t n);

void DeviceReducer::Join() {
  if (started_) {
    DMC_CUDA_CHECK(cudaEventRecord(done_, comm_.device_stream()));
    DMC_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
    started_ = false;
  }
  if (pending_bf16_) {
    h::to_bf16(pending_bf16_, scratch_, pending_n_, compute_);
    pending_bf16_ = nullptr;
  }
}

// Partial sums in bf16 are reduced in fp32: converted into an fp32 scratch buffer, summed, and
// rounded to bf16 once. The communicators carry fp32/fp64 only (MPI has no bf16 type), and one
// rounding after the sum is what the single-GPU model does (its matmul accumulates in fp32 and
// rounds its output once); a bf16 sum would round at every step of NCCL's ring, an error that grows
// with the TP size. The price, twice the bytes of a bf16 all-reduce and two element-wise passes
// over N·C values, is small next to the projections that produce these sums.
absl::Status DeviceReducer::Start(cuda::bf16* x, size_t n) {
  if (n == 0 || comm_.size() == 1) return absl::OkStatus();
  if (pending_bf16_)
    return absl::FailedPreconditionError("a bf16 sum is already in flight: Join() it first");
  float* sum = Scratch(n);
  h::to_f32(sum, x, n, compute_);
  pending_bf16_ = x;
  pending_n_ = n;
  return Start(sum, n);
}

absl::Status DeviceReducer::AllGather(const float* send, float* recv, size_t n) {
  if (n == 0) return absl::OkStatus();
  if (comm_.size() == 1) {
    DMC_CUDA_CHECK(
        cudaMemcpyAsync(recv, send, n * sizeof(float), cudaMemcpyDeviceToDevice, compute_));
    return absl::OkStatus();
  }
  if (comm_.device_buffers()) {
    DMC_CUDA_CHECK(cudaEventRecord(ready_, compute_));
    DMC_CUDA_CHECK(cudaStreamWaitEvent(comm_.device_stream(), ready_, 0));
    started_ = true;
    absl::Status status = comm_.AllGather(send, recv, n);
    Join();
    return status;
  }
  const size_t ranks = comm_.size();
  float* host = static_cast<float*>(Staging((ranks + 1) * n * sizeof(float)));
  DMC_CUDA_CHECK(cudaMemcpyAsync(host, send, n * sizeof(float), cudaMemcpyDeviceToHost, compute_));
  DMC_CUDA_CHECK(cudaStreamSynchronize(compute_));
  if (absl::Status s = comm_.AllGather(host, host + n, n); !s.ok()) return s;
  DMC_CUDA_CHECK(cudaMemcpyAsync(recv, host + n, ranks * n * sizeof(float), cudaMemcpyHostToDevice,
                                 compute_));
  return absl::OkStatus();
}

absl::Status DeviceReducer::AllGatherUneven(float* x, const std::vector<size_t>& counts) {
  if (comm_.size() == 1) return absl::OkStatus();
  if (comm_.device_buffers()) {
    DMC_CUDA_CHECK(cudaEventRecord(ready_, compute_));
    DMC_CUDA_CHECK(cudaStreamWaitEvent(comm_.device_stream(), ready_, 0));
    started_ = true;
    absl::Status status = comm_.AllGatherUneven(x, counts);
    Join();
    return status;
  }
  // This rank's block is [first, first + own) of the total.
  size_t total = 0, first = 0, own = 0;
  for (size_t r = 0; r < counts.size(); ++r) {
    if (static_cast<int>(r) < comm_.rank()) first += counts[r];
    if (static_cast<int>(r) == comm_.rank()) own = counts[r];
    total += counts[r];
  }
  float* host = static_cast<float*>(Staging(total * sizeof(float)));
  DMC_CUDA_CHECK(cudaMemcpyAsync(host + first, x + first, own * sizeof(float),
                                 cudaMemcpyDeviceToHost, compute_));
  DMC_CUDA_CHECK(cudaStreamSynchronize(compute_));
  if (absl::Status s = comm_.AllGatherUneven(host, counts); !s.ok()) return s;
  DMC_CUDA_CHECK(
      cudaMemcpyAsync(x, host, total * sizeof(float), cudaMemcpyHostToDevice, compute_));
  return absl::OkStatus();
}

// ---- GradientBuckets ----

GradientBuckets::GradientBuckets(DeviceReducer* reducer, float* grads, size_t num_params,
                                 size_t bucket_floats)
    : reducer_(reducer && reducer->comm().size() > 1 ? reducer : nullptr),
      grads_(grads),
      num_params_(num_params),
      bucket_floats_(std::max<size_t>(bucket_floats, 1)),
      end_(num_params) {}

void GradientBuckets::Ready(size_t offset) {
  if (!reducer_ || !status_.ok()) return;
  if (offset > end_)
    throw std::logic_error(absl::StrCat("GradientBuckets: gradients finished at ", offset,
                                        " above the range already started at ", end_));
  if (end_ - offset < bucket_floats_) return;
  status_ = reducer_->Start(grads_ + offset, end_ - offset);
  end_ = offset;
}

absl::Status GradientBuckets::Finish() {
  if (!reducer_) return absl::OkStatus();
  if (status_.ok() && end_ > 0) status_ = reducer_->Start(grads_, end_);
  end_ = 0;
  reducer_->Join();
  if (!status_.ok()) return status_;
  h::scale(grads_, num_params_, 1.0f / reducer_->comm().size(), reducer_->compute_stream());
  return reducer_->Synchronize();
}

// ---- LlamaCuda's collectives ----

template <typename X>
void LlamaCuda::TpAllReduce(X* x, size_t n) const {
  if (absl::Status s = tp_reduce_->AllReduceSum(x, n); !s.ok()) {
    // A failed collective leaves the ranks inconsistent; the trainer aborts the job on it.
    throw std::runtime_error("tensor-parallel all-reduce failed: " + s.ToString());
  }
}

template void LlamaCuda::TpAllReduce(cuda::bf16* x, size_t n) const;
template void LlamaCuda::TpAllReduce(float* x, size_t n) const;
template void LlamaCuda::TpAllReduce(double* x, size_t n) const;

void LlamaCuda::TpStartAllReduce(cuda::bf16* x, size_t n) const {
  if (absl::Status s = tp_reduce_->Start(x, n); !s.ok())
    throw std::runtime_error("tensor-parallel all-reduce failed: " + s.ToString());
}

void LlamaCuda::TpJoin() const { tp_reduce_->Join(); }

void LlamaCuda::TpAllGather(const float* send, float* recv, size_t n) const {
  if (absl::Status s = tp_reduce_->AllGather(send, recv, n); !s.ok())
    throw std::runtime_error("tensor-parallel all-gather failed: " + s.ToString());
}

void LlamaCuda::TpSynchronize() const {
  if (tp_->size() == 1) return;
  if (absl::Status s = tp_reduce_->Synchronize(); !s.ok())
    throw std::runtime_error("tensor-parallel group failed: " + s.ToString());
}

void LlamaCuda::Zero1AllGatherMaster() {
  if (absl::Status s = DpReducer(zero1_dp_)->AllGatherUneven(master_, moment_shard_.counts);
      !s.ok())
    throw std::runtime_error("data-parallel all-gather of the weights failed: " + s.ToString());
  h::to_bf16(weights_, master_, num_params_, stream_);
}

void LlamaCuda::Zero1Synchronize() {
  if (!zero1_dp_) return;
  if (absl::Status s = DpReducer(zero1_dp_)->Synchronize(); !s.ok())
    throw std::runtime_error("data-parallel group failed: " + s.ToString());
}

DeviceReducer* LlamaCuda::DpReducer(parallel::Communicator* dp) {
  if (dp == nullptr) return nullptr;
  if (!dp_reduce_ || &dp_reduce_->comm() != dp)
    dp_reduce_ = std::make_unique<DeviceReducer>(*dp, stream_);
  return dp_reduce_.get();
}

absl::Status LlamaCuda::AverageGradients(parallel::Communicator& dp) {
  FlushZeroGrad();
  frozen_grads_zero_ = false;  // they are summed with the other ranks'
  // One bucket of everything: the reduction Backward(loss_scale, &dp) overlaps, after the fact.
  return GradientBuckets(DpReducer(&dp), grads_, num_params_, num_params_).Finish();
}

}  // namespace dmc::model
