// The GPU backend of the Trainer: model::LlamaCuda (weights, gradients, AdamW state and
// activations on the current CUDA device) behind trainer/backend.h. Built only with the CUDA
// backend (library dmc_trainer_cuda). Tensor parallelism splits the model over the tp group as
// the CPU model does; data parallelism averages the gradients over the dp group in buckets that
// overlap with the backward pass. Either group may be NCCL (device buffers, on its own stream) or
// MPI (host copies: ranks sharing one GPU); see model/llama_cuda_parallel.h. DMS steps distil on
// the device: the teacher's forward runs inside the model's (LlamaCuda::set_distillation).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "model/llama_cuda.h"
#include "trainer/backend.h"

namespace dmc::trainer {

class CudaBackend : public TrainBackend {
 public:
  // Builds the device model from host's config and copies host's weights to it; host must have
  // been built with a TP group of the same size and rank as tp (its shard is what is copied).
  // tp and dp: the groups the model's collectives use (null: a single process); they must outlive
  // the backend. With optimizer.zero1 the device model shards its AdamW moments over dp (ZeRO-1,
  // model/zero1_shard.h), as the trainer's host AdamW does, so SyncToHost / SyncFromHost move the
  // same slice. Errors (no device, a head dim the attention kernel does not support, a tp size
  // that does not divide the heads) come back as a status.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const model::Llama<float>& host,
                                                             const OptimizerConfig& optimizer,
                                                             parallel::Communicator* tp,
                                                             parallel::Communicator* dp = nullptr);

  const char* name() const override { return "cuda"; }
  void SetCompressionEnabled(bool enabled) override { model_->set_compression_enabled(enabled); }
  // A frozen bf16 copy of the teacher's weights on the device (LlamaCuda::SetTeacher).
  absl::Status SetTeacher(model::Llama<float>* teacher) override;
  void ZeroControlChannelRows() override { model_->ZeroControlChannelRows(); }
  void ZeroGrad() override { model_->ZeroGrad(); }
  model::ForwardResult Forward(const int32_t* tokens, const int32_t* targets, int B, int seq_len,
                               const model::StepOptions& options) override {
    return model_->Forward(tokens, targets, B, seq_len, options);
  }
  absl::Status Backward(double loss_scale, bool average_gradients) override;
  // ForwardAsync, Backward, then ForwardResults: the host reads the statistics while the device
  // runs the backward.
  absl::StatusOr<model::ForwardResult> ForwardBackward(const int32_t* tokens,
                                                       const int32_t* targets, int B, int seq_len,
                                                       const model::StepOptions& options,
                                                       double loss_scale,
                                                       bool average_gradients) override;
  absl::StatusOr<double> OptimizerStep(float lr) override;
  void SetGradient(size_t offset, float value) override { model_->SetGradient(offset, value); }
  void ResetOptimizer() override { model_->ResetOptimizer(); }
  absl::Status SyncToHost(model::Llama<float>* host, AdamW* optimizer) override;
  absl::Status SyncFromHost(const model::Llama<float>& host, AdamW& optimizer) override;

  model::LlamaCuda& model() { return *model_; }

 private:
  CudaBackend(std::unique_ptr<model::LlamaCuda> model, const OptimizerConfig& optimizer,
              parallel::Communicator* dp)
      : model_(std::move(model)), optimizer_(optimizer), dp_(dp) {}
  std::unique_ptr<model::LlamaCuda> model_;
  OptimizerConfig optimizer_;
  parallel::Communicator* dp_;
};

}  // namespace dmc::trainer
