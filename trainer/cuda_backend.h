// The GPU backend of the Trainer: model::LlamaCuda (weights, gradients, AdamW state and
// activations on the current CUDA device) behind trainer/backend.h. Built only with the CUDA
// backend (library dmc_trainer_cuda). Tensor-parallel size 1; data parallelism averages the
// gradients through the dp communicator (host copies unless it takes device buffers).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "model/llama_cuda.h"
#include "trainer/backend.h"

namespace dmc::trainer {

class CudaBackend : public TrainBackend {
 public:
  // Builds the device model from host's config and copies host's weights to it. Errors (no
  // device, tp > 1, a head dim the attention kernel does not support) come back as a status.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const model::Llama<float>& host,
                                                             const OptimizerConfig& optimizer,
                                                             parallel::Communicator* tp);

  const char* name() const override { return "cuda"; }
  void SetDmcEnabled(bool enabled) override { model_->set_dmc_enabled(enabled); }
  void ZeroControlChannelRows() override { model_->ZeroControlChannelRows(); }
  void ZeroGrad() override { model_->ZeroGrad(); }
  model::ForwardResult Forward(const int32_t* tokens, const int32_t* targets, int B, int seq_len,
                               const model::StepOptions& options) override {
    return model_->Forward(tokens, targets, B, seq_len, options);
  }
  void Backward(double loss_scale) override { model_->Backward(loss_scale); }
  absl::Status AverageGradients(parallel::Communicator& dp) override {
    return model_->AverageGradients(dp);
  }
  absl::StatusOr<double> OptimizerStep(float lr) override;
  void ResetOptimizer() override { model_->ResetOptimizer(); }
  absl::Status SyncToHost(model::Llama<float>* host, AdamW* optimizer) override;
  absl::Status SyncFromHost(const model::Llama<float>& host, AdamW& optimizer) override;

  model::LlamaCuda& model() { return *model_; }

 private:
  CudaBackend(std::unique_ptr<model::LlamaCuda> model, const OptimizerConfig& optimizer)
      : model_(std::move(model)), optimizer_(optimizer) {}
  std::unique_ptr<model::LlamaCuda> model_;
  OptimizerConfig optimizer_;
};

}  // namespace dmc::trainer
