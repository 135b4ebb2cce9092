// The CUDA model's optimizer step (model/llama_cuda.h): global gradient norm, clipping and AdamW
// over the whole flat parameter layout, with no host wait inside the step.
//
//   args copy (pinned → device) → sum of squares (2 launches) → [TP all-reduce] → AdamW (1 launch,
//   reads the norm and derives the clipping scale itself) → norm copy (device → pinned)
//
// At TP size 1 this sequence is captured once into a CUDA graph and replayed every step: every
// per-step scalar (rate, bias corrections, clip, betas) travels through the pinned AdamWStepArgs the
// captured copy reads when the graph runs, and every pointer is fixed for the model's lifetime. At
// TP > 1 the all-reduce goes through the communicator, which is left out of graphs (it runs on a
// stream of its own, or on host memory), so the same launches are enqueued directly around it.
//
// ZeRO-1 (model/zero1_shard.h): the norm still reads every gradient, but the AdamW launch gets the
// sub-buffers that start at this rank's slice (master, gradients, bf16 copy; the moments hold the
// slice only) and a chunk table of each tensor's part of the slice, offsets counted from the
// slice's start: to the kernel it is the flat layout of a smaller model. The slice starts on a
// multiple of 4 values, so the kernel's 16-byte vector path still applies. Then the master is
// all-gathered over DP and converted to bf16 (Zero1AllGatherMaster); that collective keeps the step
// out of the graph too.
//
// Forward and backward are not captured: their per-step scalars (the noise counter from the step
// and seed, cr_prior, control_fade, the loss scale over the label count) are kernel arguments, and
// control_fade and the decision mode change which kernels run, so a graph of them would need those
// values moved to device memory through several kernels' signatures, plus one graph per phase.
// bench_train_step's host-enqueue column says whether that would pay: at 1.36B the host should
// enqueue a step's ~1,500 launches in a few ms against ~180 ms of device work (hidden); the 17M
// `medium` shape is where they may show.
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels/cuda_check.h"
#include "model/llama_cuda.h"

namespace dmc::model {

namespace c = dmc::cuda;

struct LlamaCuda::OptimizerState {
  OptimizerState(const std::vector<ParamSpec>& specs, const Zero1Shard& shard)
      : norm_layout(Tensors(specs)), update_layout(SliceTensors(specs, shard)) {
    DMC_CUDA_CHECK(cudaMallocHost(&args_host, sizeof(c::AdamWStepArgs)));
    DMC_CUDA_CHECK(cudaMalloc(&args, sizeof(c::AdamWStepArgs)));
    DMC_CUDA_CHECK(cudaMalloc(&sumsq, sizeof(double)));
    DMC_CUDA_CHECK(cudaMallocHost(&sumsq_host, sizeof(double)));
  }
  ~OptimizerState() {
    if (graph) DMC_CUDA_CHECK(cudaGraphExecDestroy(graph));
    DMC_CUDA_CHECK(cudaFreeHost(args_host));
    DMC_CUDA_CHECK(cudaFree(args));
    DMC_CUDA_CHECK(cudaFree(sumsq));
    DMC_CUDA_CHECK(cudaFreeHost(sumsq_host));
  }
  // The trained tensors: frozen ones (a DMS adapter model's base) are neither in the norm nor
  // updated, as trainer/optimizer.cpp.
  static std::vector<c::FlatTensor> Tensors(const std::vector<ParamSpec>& specs) {
    std::vector<c::FlatTensor> t;
    for (const ParamSpec& s : specs)
      if (!s.frozen) t.push_back({s.offset, s.size, s.weight_decay, s.split_dim >= 0});
    return t;
  }
  // Each trained tensor's part of the slice, offsets from the slice's start (all of it without
  // ZeRO-1).
  static std::vector<c::FlatTensor> SliceTensors(const std::vector<ParamSpec>& specs,
                                                 const Zero1Shard& shard) {
    std::vector<c::FlatTensor> t;
    for (const ParamSpec& s : specs) {
      if (s.frozen) continue;
      const FlatRange part = shard.Overlap(s.offset, s.size);
      if (part.size > 0)
        t.push_back({part.begin - shard.slice.begin, part.size, s.weight_decay, s.split_dim >= 0});
    }
    return t;
  }

  c::MultiTensorLayout norm_layout;    // every tensor: the gradient norm
  c::MultiTensorLayout update_layout;  // this rank's slice of them: AdamW
  c::AdamWStepArgs* args_host = nullptr;  // pinned: the step's scalars
  c::AdamWStepArgs* args = nullptr;       // device copy, read by the AdamW kernel
  double* sumsq = nullptr;                // device: the (TP-reduced) sum of squares
  double* sumsq_host = nullptr;           // pinned: its copy, read after the step's wait
  cudaGraphExec_t graph = nullptr;        // TP size 1: the whole step
  bool pending = false;                   // enqueued, OptimizerStepNorm not called yet
};

void LlamaCuda::OptimizerStateDeleter::operator()(OptimizerState* state) const { delete state; }

void LlamaCuda::ResetOptimizer() {
  adam_step_ = 0;
  const size_t M = moment_shard_.slice.size;
  DMC_CUDA_CHECK(cudaMemsetAsync(adam_m_, 0, M * sizeof(float), stream_));
  DMC_CUDA_CHECK(cudaMemsetAsync(adam_v_, 0, M * sizeof(float), stream_));
}

void LlamaCuda::OptimizerStepAsync(const CudaAdamWSettings& s) {
  if (!opt_) opt_.reset(new OptimizerState(specs_, moment_shard_));
  FlushZeroGrad();  // a step with no Backward since ZeroGrad reads zero gradients
  OptimizerState& o = *opt_;
  // The previous step's copy of args_host must have run before it is overwritten.
  if (o.pending) OptimizerStepNorm();
  ++adam_step_;
  *o.args_host = c::adamw_step_args({s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, adam_step_},
                                    s.grad_clip);
  // As trainer/optimizer.cpp: replicated tensors weighted 1/tp so a TP all-reduce counts them once.
  const double replicated_weight = 1.0 / tp_->size();
  auto norm = [&](cudaStream_t st) {
    DMC_CUDA_CHECK(cudaMemcpyAsync(o.args, o.args_host, sizeof(c::AdamWStepArgs),
                                   cudaMemcpyHostToDevice, st));
    c::multi_tensor_sum_of_squares(o.sumsq, grads_, o.norm_layout, replicated_weight, st);
  };
  auto update = [&](cudaStream_t st) {
    const size_t first = moment_shard_.slice.begin;  // 0 without ZeRO-1
    c::multi_tensor_adamw(master_ + first, grads_ + first, adam_m_, adam_v_, weights_ + first,
                          o.update_layout, o.args, o.sumsq, st);
    DMC_CUDA_CHECK(
        cudaMemcpyAsync(o.sumsq_host, o.sumsq, sizeof(double), cudaMemcpyDeviceToHost, st));
  };
  o.pending = true;
  if (tp_->size() == 1 && !zero1_dp_) {
    if (!o.graph) {
      // Captured on a private stream (the model's is the legacy default stream, which cannot be
      // captured); the graph is then launched on the model's stream like any kernel.
      c::detail::num_sms();  // cached now: its first call queries the device, not a stream op
      cudaStream_t capture;
      DMC_CUDA_CHECK(cudaStreamCreateWithFlags(&capture, cudaStreamNonBlocking));
      DMC_CUDA_CHECK(cudaStreamBeginCapture(capture, cudaStreamCaptureModeThreadLocal));
      norm(capture);
      update(capture);
      cudaGraph_t graph;
      DMC_CUDA_CHECK(cudaStreamEndCapture(capture, &graph));
      DMC_CUDA_CHECK(cudaGraphInstantiate(&o.graph, graph, 0));
      DMC_CUDA_CHECK(cudaGraphDestroy(graph));
      DMC_CUDA_CHECK(cudaStreamDestroy(capture));
    }
    DMC_CUDA_CHECK(cudaGraphLaunch(o.graph, stream_));
    return;
  }
  norm(stream_);
  // The group's sum (model/llama_cuda_parallel.h): on the device value in stream order when the
  // communicator takes device buffers, through a pinned host copy when it cannot.
  TpAllReduce(o.sumsq, 1);
  update(stream_);
  if (zero1_dp_) Zero1AllGatherMaster();
}

double LlamaCuda::OptimizerStepNorm() {
  if (!opt_ || !opt_->pending) throw std::logic_error("OptimizerStepNorm without OptimizerStepAsync");
  // One wait per step: asynchronous faults of the whole step surface here, inside it.
  TpSynchronize();
  Zero1Synchronize();
  DMC_CUDA_CHECK(cudaStreamSynchronize(stream_));
  opt_->pending = false;
  const double norm = std::sqrt(*opt_->sumsq_host);
  if (!std::isfinite(norm)) --adam_step_;  // the AdamW launch skipped the update
  return norm;
}

double LlamaCuda::OptimizerStep(const CudaAdamWSettings& settings) {
  OptimizerStepAsync(settings);
  return OptimizerStepNorm();
}

}  // namespace dmc::model
