// The Llama decoder with DMC heads on one CUDA device: the same layer graph, forward and
// hand-written backward as model::Llama<T> (model/llama.h), op by op, on the kernels of
// kernels/cuda_ops.h, LoMA steps (StepOptions::loma) and DMS steps included. The CPU model is the
// specification; tests/cuda/test_cuda_model.cpp (DMC), tests/cuda/test_cuda_loma.cpp (LoMA) and
// tests/cuda/test_cuda_dms.cpp (DMS) check losses, merge statistics and every gradient tensor of
// this one against it.
//
// DMS (model/llama.h, model/DMS.md): with eviction on and distillation on (set_distillation, what
// the
// trainer's step does), a Forward first runs the teacher on the same batch — the frozen bf16 copy
// of SetTeacher (the query-channel variant's), or this model's own weights with eviction off (the
// adapter variant's: its base is frozen) — and keeps its logits (this rank's vocabulary rows) and
// logsumexps; the student's pass then attends under the delayed-eviction mask and the loss is
// KL(student || teacher) (kernels/kl_distill.h, vocabulary-parallel: the ranks all-reduce N
// per-row sums, never logits) + the compression loss, the LM loss only reported, as
// Llama::SetDistillationTarget makes the CPU model do. Frozen tensors (the adapter variant's base)
// get no gradient here (the CPU model computes and ignores them) and the optimizer skips them.
//
// What lives on the device (all allocated once; activations again only when B·T grows):
//   - fp32 master weights, their bf16 compute copy, fp32 gradients, fp32 AdamW moments, all in
//     the flat layout of the host model's param_specs() (same offsets), so parameters and moments
//     move to and from a host model::Llama<float> / trainer AdamW state with one copy each (with
//     ZeRO-1 the moments are this rank's slice of that layout: model/zero1_shard.h);
//   - the bf16 activations of the last Forward (plus fp32 rstd, lse, losses and the fp32 DMC
//     per-(b, t, KV head) tensors) that Backward needs, per layer;
//   - backward work buffers, reused across layers.
// Everything is enqueued on one stream. A training step needs no host wait until its end:
// ForwardAsync leaves the loss statistics to a pinned copy that ForwardResults reads (it waits for
// the forward only, while the backward runs), and OptimizerStepAsync clips on the device (the norm
// never goes to the host inside the step) and, at TP size 1, replays the whole optimizer step as
// one CUDA graph; OptimizerStepNorm is the step's one wait. Every CUDA and cuBLAS error aborts with
// its location (kernels/ use the same policy); shape errors throw std::invalid_argument before any
// work.
//
// Tensor parallelism (Megatron-style), exactly as model/llama.cpp: the layout of the host
// Llama<float> built with the same TP group (q/k/v and gate/up split by output rows, o and down by
// input columns; embedding and LM head split by vocabulary rows; norms replicated), so each rank
// holds its share of the heads, KV heads, MLP hidden units and vocabulary. TpAllReduce sums the
// embedding output and the row-parallel outputs after o_proj and down_proj in the forward pass,
// and in the backward pass dxn, the input gradient of the column-parallel projections and of the
// LM head (in the backward pass started before the weight gradients of those projections, which
// run while it is in flight: Megatron-LM's asynchronous input-gradient all-reduce); the cross-entropy all-gathers 2·N per-row statistics (TpAllGather); the DMC statistics (each sequence's mean merge and the per-layer merge
// fractions) are summed over TP before the CR loss, so the loss and its gradient equal the single
// process's. Data parallelism: Backward(loss_scale, dp) averages the gradients over dp in buckets
// that overlap with the backward pass. The collectives and their stream ordering (NCCL on its own
// stream behind events; MPI through pinned host memory, which lets ranks share one GPU) are in
// model/llama_cuda_parallel.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/cuda_ops.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/loma.h"
#include "model/zero1_shard.h"
#include "parallel/communicator.h"

namespace dmc::model {

class DeviceReducer;  // model/llama_cuda_parallel.h

// AdamW hyper-parameters of OptimizerStep (the trainer's OptimizerConfig, plus the rate).
struct CudaAdamWSettings {
  float lr = 3e-4f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;  // applied to the tensors whose ParamSpec says weight_decay
  float grad_clip = 1.0f;     // max global L2 norm; <= 0 disables clipping
};

class LlamaCuda {
 public:
  // Uses the current CUDA device. tp_comm: the tensor-parallel group (null: a single process); it
  // must outlive the model, and its size must divide num_key_value_heads and intermediate_size.
  // zero1_dp: with a data-parallel group of size > 1 here, ZeRO-1 (model/zero1_shard.h): this rank
  // allocates and keeps the AdamW moments of its slice optimizer_shard().slice of the flat layout
  // only, OptimizerStep updates only that slice of the master weights and all-gathers the master
  // over the group (before the bf16 copy is refreshed), and the optimizer-state transfers move the
  // slice's moments. It must outlive the model. Null (or size 1): the unsharded optimizer.
  // Throws std::invalid_argument when the shape is not supported (head dim other than 64 or 128:
  // the fused attention kernel's limit).
  LlamaCuda(const LlamaConfig& config, parallel::Communicator* tp_comm = nullptr,
            parallel::Communicator* zero1_dp = nullptr);
  ~LlamaCuda();
  LlamaCuda(const LlamaCuda&) = delete;
  LlamaCuda& operator=(const LlamaCuda&) = delete;

  const LlamaConfig& config() const { return config_; }
  const std::vector<ParamSpec>& param_specs() const { return specs_; }
  size_t num_params() const { return num_params_; }
  // DMC merging or (a DMS model) DMS eviction on or off, as Llama::set_compression_enabled.
  void set_compression_enabled(bool enabled) {
    if (config_.dms.is_dms())
      config_.dms.enabled = enabled;
    else
      config_.dmc.enabled = enabled;
  }
  // DMS: whether a Forward with eviction on distils from the teacher (above); off (the default),
  // it is the plain forward with eviction, whose loss is the LM loss + the compression loss.
  void set_distillation(bool on) { distillation_ = on; }
  // DMS query-channel variant: the teacher, a frozen bf16 copy of `teacher`'s weights (the model
  // the retrofit started from, built with the same TP group). Its parameter layout must be this
  // model's without DMS: the same tensors at the same offsets, or the base tensors of an adapter
  // model. Throws std::invalid_argument otherwise. Without one the teacher is this model itself.
  void SetTeacher(const Llama<float>& teacher);

  // Parameters (fp32 master and bf16 copy) from / to a host model of the same config. The host
  // model's layout must match (same param_specs); throws std::invalid_argument otherwise.
  void CopyParamsFromHost(const Llama<float>& host);
  void CopyParamsToHost(Llama<float>* host) const;
  void CopyParamsFromHost(const std::vector<float>& params);
  std::vector<float> ParamsToHost() const;
  // fp32 gradients of the last Backward(s), in the flat layout (zeros after ZeroGrad).
  std::vector<float> GradsToHost() const;
  void GradsFromHost(const std::vector<float>& grads);
  // AdamW moments of optimizer_shard().slice (the whole layout without ZeRO-1) and the number of
  // updates since the last reset (for checkpoints).
  void OptimizerStateToHost(std::vector<float>* m, std::vector<float>* v) const;
  void OptimizerStateFromHost(const std::vector<float>& m, const std::vector<float>& v, int step);
  int optimizer_step() const { return adam_step_; }
  const Zero1Shard& optimizer_shard() const { return moment_shard_; }

  // End of DMC stage 1 (as Llama::ZeroControlChannelRows): zero the weight rows producing q[D-1]
  // and k[D-1], in the master weights and the bf16 copy.
  void ZeroControlChannelRows();

  // tokens, targets: host arrays [B, T] (targets < 0 unlabelled). Same semantics and results as
  // Llama<T>::Forward (with distillation, as the CPU model given the teacher's logits on the same
  // batch); keeps the activations for Backward. Waits for the device at the end: = ForwardAsync,
  // then ForwardResults.
  ForwardResult Forward(const int32_t* tokens, const int32_t* targets, int B, int seq_len,
                        const StepOptions& options);
  // Enqueues the forward without waiting; its statistics go to pinned host memory.
  void ForwardAsync(const int32_t* tokens, const int32_t* targets, int B, int seq_len,
                    const StepOptions& options);
  // The results of the last ForwardAsync; waits for that forward only (work enqueued after it,
  // such as the Backward, keeps running).
  ForwardResult ForwardResults();
  // Accumulates loss_scale · d(loss)/d(params) of the last Forward into the fp32 gradients. With
  // average_over (the last micro-batch of a step under data parallelism) the gradients are then
  // averaged over that group as AverageGradients does, but in buckets of dp_bucket_floats() that
  // start as soon as the backward pass has finished them, so that with NCCL the communication
  // overlaps with the rest of the backward. Throws std::runtime_error if a collective fails.
  // The first Backward after ZeroGrad writes the gradients instead.
  void Backward(double loss_scale = 1.0, parallel::Communicator* average_over = nullptr);
  // The gradients are zero from here on, as Llama::ZeroGrad says, without the memset of all of
  // them (4 bytes a parameter: 5.5 GB a step at 1.36B): the next Backward's first
  // writer of each gradient writes it (cuBLAS beta 0, which also spares the GEMM's read of it),
  // and that Backward zeroes only what none of its writers writes (UnwrittenGradients, and frozen
  // tensors written by something else since they were last zeroed). Any other use of the
  // gradients before it (SetGradient, AverageGradients, the optimizer step) zeroes them all first;
  // GradsToHost returns zeros.
  void ZeroGrad();
  // gradient[offset] = value (fp32, flat layout), in stream order: the trainer's fault injection.
  void SetGradient(size_t offset, float value);

  // Clip to settings.grad_clip by the global gradient L2 norm (replicated tensors counted once over
  // TP), then one AdamW update of every tensor (weight decay on the tensors that decay) writing
  // the fp32 master and the bf16 copy. Returns the norm before clipping. A non-finite norm skips
  // the update on the device (master, bf16 copy and moments unchanged) and the update count. = OptimizerStepAsync,
  // then OptimizerStepNorm (model/llama_cuda_optimizer.cpp).
  double OptimizerStep(const CudaAdamWSettings& settings);
  // Enqueues the step: the norm and the clipping scale on the device, one multi-tensor AdamW
  // launch, the norm's copy to pinned memory; at TP size 1 without ZeRO-1 all of it is one CUDA
  // graph launch. At TP > 1 the sum of squares is all-reduced over the group in between
  // (TpAllReduce: on the device value with a device communicator, through a pinned host copy with
  // a host one). With ZeRO-1 the launch updates this rank's slice only, and the master weights are
  // then all-gathered over the DP group and copied to bf16 (Zero1AllGatherMaster).
  void OptimizerStepAsync(const CudaAdamWSettings& settings);
  // Waits for the step enqueued last (the step's one wait) and returns its norm before clipping.
  double OptimizerStepNorm();
  void ResetOptimizer();

  // Data parallelism: grads = (sum over dp ranks of grads) / dp.size(), in one piece after the
  // backward pass. Device buffers go to the communicator directly when it takes them (NCCL);
  // otherwise through a host copy.
  absl::Status AverageGradients(parallel::Communicator& dp);
  // 25 MB of fp32 by default, as PyTorch DDP: large enough that an all-reduce runs near NCCL's
  // bandwidth (its fixed cost, tens of microseconds, is small next to 25 MB at NVLink speed), small
  // enough that the first bucket starts soon after the backward pass does and the last one (up to
  // the embedding) is short. Tests set a small size so that every layer is a bucket of its own.
  static constexpr size_t kDpBucketFloats = (25u << 20) / sizeof(float);
  size_t dp_bucket_floats() const { return dp_bucket_floats_; }
  void set_dp_bucket_floats(size_t floats) { dp_bucket_floats_ = floats; }

  // Device results of the last Forward, for tests: logits [B, T, V_local] (this rank's vocabulary
  // rows, as Llama::logits; bf16 → float) and the hard
  // merge decisions [B, T, Hkv] of layer l.
  std::vector<float> LogitsToHost() const;
  std::vector<float> MergeToHost(int layer) const;

  cudaStream_t stream() const { return stream_; }

 private:
  // The decision kernels' constants from the config, in `mode`.
  kernels::DmcGateParams DmcGates(kernels::DmcDecisionMode mode) const {
    return {config_.dmc.init_val, config_.dmc.temperature, config_.dmc.omega_eps, mode};
  }
  kernels::DmsGateParams DmsGates(kernels::DmcDecisionMode mode) const {
    return {config_.dms.scale, config_.dms.offset, config_.dms.temperature, mode};
  }
  // Copies n floats and waits for the copy.
  void Transfer(float* dst, const float* src, size_t n, cudaMemcpyKind kind) const;
  struct Buffers;
  void Allocate(int B, int T);
  // Sums the device buffer x[0, n) (bf16, float or double) over the TP group in stream order;
  // throws std::runtime_error on failure, as model/llama.cpp does (llama_cuda_parallel.cpp).
  template <typename X>
  void TpAllReduce(X* x, size_t n) const;
  // TpAllReduce in two halves, so that work which neither reads nor writes x (the weight
  // gradients of the projections that produced it) runs while x is summed: the sum is in x for
  // the work enqueued after TpJoin().
  void TpStartAllReduce(cuda::bf16* x, size_t n) const;
  void TpJoin() const;
  // NCCL: waits for the TP group's collectives under its deadline (a failed peer would otherwise
  // leave the compute stream waiting forever); before each wait of the host for the device.
  void TpSynchronize() const;
  // recv [tp · n] = every TP rank's send [n] (device buffers), in stream order.
  void TpAllGather(const float* send, float* recv, size_t n) const;
  // The reducer over dp (made again when dp changes); null for null.
  DeviceReducer* DpReducer(parallel::Communicator* dp);
  // ZeRO-1: every DP rank's updated slice of the fp32 master weights to every rank, then the bf16
  // copy of the whole buffer from them, in stream order; throws std::runtime_error on failure.
  void Zero1AllGatherMaster();
  // ZeRO-1 with NCCL: waits for that all-gather under the group's deadline, as TpSynchronize.
  void Zero1Synchronize();
  // Carries out a pending ZeroGrad on every gradient (a use of them other than Backward's).
  void FlushZeroGrad();
  const cuda::bf16* W(size_t offset) const;
  // The gradient of the tensor at offset; null for a frozen tensor, whose gradient is not formed.
  float* G(size_t offset) const;
  // The layer graph from the embedding to the logits [N, vocab_rows_] and the cross-entropy on
  // the uploaded batch, with the bf16 weights `weights` (this model's layout, or a prefix of it:
  // the teacher's) and compression as dmc / dms say; the global logsumexps go to lse, the
  // per-position losses to buf_->losses, the compression statistics to buf_->stats.
  void ForwardLogits(const cuda::bf16* weights, bool dmc, bool dms, const StepOptions& options,
                     const int32_t* positions, cuda::bf16* logits, float* lse);
  // Multi-tensor table, AdamW arguments, norm and the optimizer's CUDA graph; made at the first
  // OptimizerStepAsync (model/llama_cuda_optimizer.cpp).
  struct OptimizerState;
  struct OptimizerStateDeleter {
    void operator()(OptimizerState* state) const;
  };

  LlamaConfig config_;
  parallel::Communicator* tp_;
  int heads_, kv_heads_, ffn_, head_dim_;
  int vocab_begin_ = 0, vocab_rows_ = 0;  // this rank's rows of the embedding and LM head
  std::vector<ParamSpec> specs_;
  std::vector<size_t> layer_offsets_;  // per layer: attn_norm, wq, wk, wv, wo, mlp_norm, gate, up, down
  size_t embed_offset_ = 0, final_norm_offset_ = 0, lm_head_offset_ = 0, num_params_ = 0;
  std::vector<size_t> dms_offsets_;  // per layer: the DMS adapter's norm and projection
  // Frozen tensors all lie in [0, frozen_end_) and trained ones after it (model/llama.cpp puts the
  // DMS adapter after the base); 0 without frozen tensors.
  size_t frozen_end_ = 0;

  cudaStream_t stream_ = nullptr;
  float* master_ = nullptr;          // fp32 [num_params]
  cuda::bf16* weights_ = nullptr;  // bf16 [num_params]
  cuda::bf16* teacher_weights_ = nullptr;  // bf16, SetTeacher's layout; null: no frozen teacher
  bool distillation_ = false;
  float* grads_ = nullptr;           // fp32 [num_params]
  // ZeroGrad was called, and nothing has used the gradients since: they are zero, whatever grads_
  // holds (ZeroGrad).
  bool zero_grad_pending_ = false;
  // grads_[0, frozen_end_) is known to hold zeros: Backward never writes there, only
  // GradsFromHost, SetGradient and AverageGradients do.
  bool frozen_grads_zero_ = true;
  parallel::Communicator* zero1_dp_;  // the ZeRO-1 group (null: moments not sharded)
  Zero1Shard moment_shard_;           // whose moments adam_m_ / adam_v_ hold
  float* adam_m_ = nullptr;           // fp32 [moment_shard_.slice.size]
  float* adam_v_ = nullptr;
  int adam_step_ = 0;
  std::unique_ptr<OptimizerState, OptimizerStateDeleter> opt_;

  std::unique_ptr<DeviceReducer> tp_reduce_, dp_reduce_;
  size_t dp_bucket_floats_ = kDpBucketFloats;

  std::unique_ptr<Buffers> buf_;
  // Last forward.
  int batch_ = 0, seq_ = 0;
  StepOptions options_;
  double label_count_ = 0;
  bool forward_dmc_ = false, forward_dms_ = false, distilling_ = false;
  LomaLosses loma_losses_;  // of a LoMA step, formed in ForwardAsync
};

}  // namespace dmc::model
