// The Llama decoder with DMC heads on one CUDA device: the same layer graph, forward and
// hand-written backward as model::Llama<T> (model/llama.h), op by op, on the kernels of
// kernels/cuda_ops.h. The CPU model is the specification; tests/cuda/test_cuda_model.cpp checks
// losses, merge statistics and every gradient tensor of this one against it.
//
// What lives on the device (all allocated once; activations again only when B·T grows):
//   - fp32 master weights, their bf16 compute copy, fp32 gradients, fp32 AdamW moments, all in
//     the flat layout of the host model's param_specs() (same offsets), so parameters and moments
//     move to and from a host model::Llama<float> / trainer AdamW state with one copy each;
//   - the bf16 activations of the last Forward (plus fp32 rstd, lse, losses and the fp32 DMC
//     per-(b, t, KV head) tensors) that Backward needs, per layer;
//   - backward work buffers, reused across layers.
// Everything is enqueued on one stream; inside a step the host waits for the device only to read
// back the scalar results at the end of Forward and the gradient norm in OptimizerStep (clipping
// needs it on the host). Every CUDA and cuBLAS error aborts with its location (kernels/ use the
// same policy); shape errors throw std::invalid_argument before any work.
//
// Tensor parallelism: only size 1 for now. The places where model/llama.cpp all-reduces over the
// TP group are kept as TpAllReduce() calls (no-ops at size 1), so TP can be added there.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/cuda_ops.h"
#include "model/config.h"
#include "model/llama.h"
#include "parallel/communicator.h"

namespace dmc::model {

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
  // Uses the current CUDA device. tp_comm: the tensor-parallel group (null or size 1; larger
  // sizes are refused). Throws std::invalid_argument when the shape is not supported (head dim
  // other than 64 or 128: the fused attention kernel's limit).
  LlamaCuda(const LlamaConfig& config, parallel::Communicator* tp_comm = nullptr);
  ~LlamaCuda();
  LlamaCuda(const LlamaCuda&) = delete;
  LlamaCuda& operator=(const LlamaCuda&) = delete;

  const LlamaConfig& config() const { return config_; }
  const std::vector<ParamSpec>& param_specs() const { return specs_; }
  size_t num_params() const { return num_params_; }
  void set_dmc_enabled(bool enabled) { config_.dmc.enabled = enabled; }

  // Parameters (fp32 master and bf16 copy) from / to a host model of the same config. The host
  // model's layout must match (same param_specs); throws std::invalid_argument otherwise.
  void CopyParamsFromHost(const Llama<float>& host);
  void CopyParamsToHost(Llama<float>* host) const;
  void CopyParamsFromHost(const std::vector<float>& params);
  std::vector<float> ParamsToHost() const;
  // fp32 gradients of the last Backward(s), in the flat layout.
  std::vector<float> GradsToHost() const;
  void GradsFromHost(const std::vector<float>& grads);
  // AdamW moments and the number of updates since the last reset (for checkpoints).
  void OptimizerStateToHost(std::vector<float>* m, std::vector<float>* v) const;
  void OptimizerStateFromHost(const std::vector<float>& m, const std::vector<float>& v, int step);
  int optimizer_step() const { return adam_step_; }

  // End of DMC stage 1 (as Llama::ZeroControlChannelRows): zero the weight rows producing q[D-1]
  // and k[D-1], in the master weights and the bf16 copy.
  void ZeroControlChannelRows();

  // tokens, targets: host arrays [B, T] (targets < 0 unlabelled). Same semantics and results as
  // Llama<T>::Forward; keeps the activations for Backward. Waits for the device at the end.
  ForwardResult Forward(const int32_t* tokens, const int32_t* targets, int B, int seq_len,
                        const StepOptions& options);
  // Accumulates loss_scale · d(loss)/d(params) of the last Forward into the fp32 gradients.
  void Backward(double loss_scale = 1.0);
  void ZeroGrad();

  // Global gradient L2 norm (replicated tensors counted once over TP), computed on the device.
  double GradNorm();
  // Clip to settings.grad_clip, then one AdamW update of every tensor (weight decay on the tensors
  // that decay) writing the fp32 master and the bf16 copy. Returns the norm before clipping.
  double OptimizerStep(const CudaAdamWSettings& settings);
  void ResetOptimizer();

  // Data parallelism: grads = (sum over dp ranks of grads) / dp.size(). Device buffers go to the
  // communicator directly when it takes them (NCCL); otherwise through a host copy.
  absl::Status AverageGradients(parallel::Communicator& dp);

  // Device results of the last Forward, for tests: logits [B, T, V] (bf16 → float) and the hard
  // merge decisions [B, T, Hkv] of layer l.
  std::vector<float> LogitsToHost() const;
  std::vector<float> MergeToHost(int layer) const;

  cudaStream_t stream() const { return stream_; }

 private:
  // Copies num_params_ floats (a parameter-layout buffer) and waits for the copy.
  void Transfer(float* dst, const float* src, cudaMemcpyKind kind) const;
  struct Buffers;
  void Allocate(int B, int T);
  void TpAllReduce(cuda::bf16* x, size_t n) const;
  const cuda::bf16* W(size_t offset) const;
  float* G(size_t offset) const;

  LlamaConfig config_;
  parallel::Communicator* tp_;
  int heads_, kv_heads_, ffn_, head_dim_;
  std::vector<ParamSpec> specs_;
  std::vector<size_t> layer_offsets_;  // per layer: attn_norm, wq, wk, wv, wo, mlp_norm, gate, up, down
  size_t embed_offset_ = 0, final_norm_offset_ = 0, lm_head_offset_ = 0, num_params_ = 0;

  cudaStream_t stream_ = nullptr;
  float* master_ = nullptr;          // fp32 [num_params]
  cuda::bf16* weights_ = nullptr;  // bf16 [num_params]
  float* grads_ = nullptr;           // fp32 [num_params]
  float* adam_m_ = nullptr;
  float* adam_v_ = nullptr;
  double* norm_ = nullptr;           // [2]: sum of squares of replicated, sharded tensors
  int adam_step_ = 0;

  std::unique_ptr<Buffers> buf_;
  // Last forward.
  int batch_ = 0, seq_ = 0;
  StepOptions options_;
  double label_count_ = 0;
  bool forward_dmc_ = false;
};

}  // namespace dmc::model
