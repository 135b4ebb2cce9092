// What the training loop drives: a model with its optimizer on one device. The Trainer always
// holds the host model::Llama<float> and the host AdamW state, which checkpoints, export and
// Hugging Face import read and write; a backend either works on them directly (the CPU) or keeps
// its own device copies (the GPU, trainer/cuda_backend.h) and moves them with SyncToHost /
// SyncFromHost.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/llama.h"
#include "parallel/communicator.h"
#include "trainer/optimizer.h"

namespace dmc::trainer {

class TrainBackend {
 public:
  virtual ~TrainBackend() = default;

  // "cpu", "cuda": for messages.
  virtual const char* name() const = 0;
  // DMC merging or DMS eviction on or off (the model's compression; stages 2 and 3 on).
  virtual void SetCompressionEnabled(bool enabled) = 0;
  // DMS: the frozen copy of the original model whose logits the query-channel variant distils
  // (model/DMS.md §4); it must outlive the backend. Without one, the model itself with eviction off
  // is
  // the teacher (the adapter variant: its base is frozen, so that is exactly the original model).
  virtual absl::Status SetTeacher(model::Llama<float>* teacher) = 0;
  // End of DMC stage 1 (Llama::ZeroControlChannelRows) on the weights being trained.
  virtual void ZeroControlChannelRows() = 0;
  virtual void ZeroGrad() = 0;
  virtual model::ForwardResult Forward(const int32_t* tokens, const int32_t* targets, int B,
                                       int seq_len, const model::StepOptions& options) = 0;
  // With DMS eviction on, the teacher's forward on the same batch comes first and the loss is the
  // distillation loss (model/llama.h).
  // Accumulates loss_scale · d(loss)/d(params) of the last Forward into the gradients. With
  // average_gradients (the trainer sets it on the last micro-batch of a step) the gradients are
  // then averaged over the backend's data-parallel group; the GPU backend reduces them in buckets
  // as the backward pass finishes them, overlapping the communication with the rest of it.
  virtual absl::Status Backward(double loss_scale, bool average_gradients) = 0;
  // Forward, then Backward, of one micro-batch: the results and effects of the two calls. A device
  // backend enqueues both before it waits for the forward's statistics, so the device does not
  // idle between them while the host reads them back.
  virtual absl::StatusOr<model::ForwardResult> ForwardBackward(const int32_t* tokens,
                                                               const int32_t* targets, int B,
                                                               int seq_len,
                                                               const model::StepOptions& options,
                                                               double loss_scale,
                                                               bool average_gradients) {
    model::ForwardResult r = Forward(tokens, targets, B, seq_len, options);
    if (absl::Status s = Backward(loss_scale, average_gradients); !s.ok()) return s;
    return r;
  }
  // Clip + one AdamW update at rate lr; returns the gradient norm before clipping. A non-finite
  // norm skips the update: weights, moments and the update count stay as they were.
  virtual absl::StatusOr<double> OptimizerStep(float lr) = 0;
  // gradient[offset] = value: the nan_grad fault of trainer/fault_injection.h.
  virtual void SetGradient(size_t offset, float value) = 0;
  // Forget the optimizer moments (between DMC stages).
  virtual void ResetOptimizer() = 0;
  // Device state → the host model and AdamW (before a checkpoint or export), and back (after a
  // checkpoint load or an import). No-ops for the CPU backend, which works on the host objects.
  virtual absl::Status SyncToHost(model::Llama<float>* host, AdamW* optimizer) = 0;
  virtual absl::Status SyncFromHost(const model::Llama<float>& host, AdamW& optimizer) = 0;
};

// The CPU backend: the host model and AdamW themselves (the reference path).
class CpuBackend : public TrainBackend {
 public:
  CpuBackend(model::Llama<float>* model, AdamW* optimizer, parallel::Communicator* tp,
             parallel::Communicator* dp)
      : model_(model), optimizer_(optimizer), tp_(tp), dp_(dp) {}
  const char* name() const override { return "cpu"; }
  void SetCompressionEnabled(bool enabled) override { model_->set_compression_enabled(enabled); }
  absl::Status SetTeacher(model::Llama<float>* teacher) override {
    teacher_ = teacher;
    return absl::OkStatus();
  }
  void ZeroControlChannelRows() override { model_->ZeroControlChannelRows(); }
  void ZeroGrad() override { model_->ZeroGrad(); }
  model::ForwardResult Forward(const int32_t* tokens, const int32_t* targets, int B, int seq_len,
                               const model::StepOptions& options) override;
  absl::Status Backward(double loss_scale, bool average_gradients) override;
  absl::StatusOr<double> OptimizerStep(float lr) override {
    return optimizer_->Step(*model_, lr, *tp_);
  }
  void SetGradient(size_t offset, float value) override { model_->grads()[offset] = value; }
  void ResetOptimizer() override { optimizer_->Reset(); }
  absl::Status SyncToHost(model::Llama<float>*, AdamW*) override { return absl::OkStatus(); }
  absl::Status SyncFromHost(const model::Llama<float>&, AdamW&) override {
    return absl::OkStatus();
  }

 private:
  model::Llama<float>* model_;
  model::Llama<float>* teacher_ = nullptr;
  AdamW* optimizer_;
  parallel::Communicator *tp_, *dp_;
};

}  // namespace dmc::trainer
