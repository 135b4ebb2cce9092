#include "trainer/cuda_backend.h"

#include <stdexcept>

namespace dmc::trainer {

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const model::Llama<float>& host,
                                                                 const OptimizerConfig& optimizer,
                                                                 parallel::Communicator* tp,
                                                                 parallel::Communicator* dp) {
  std::unique_ptr<model::LlamaCuda> device;
  try {
    device =
        std::make_unique<model::LlamaCuda>(host.config(), tp, optimizer.zero1 ? dp : nullptr);
    device->CopyParamsFromHost(host);
    device->set_distillation(true);  // a DMS step distils, as CpuBackend::Forward
  } catch (const std::invalid_argument& e) {
    return absl::InvalidArgumentError(std::string("--device=cuda: ") + e.what());
  } catch (const std::runtime_error& e) {
    return absl::FailedPreconditionError(std::string("--device=cuda: ") + e.what());
  }
  return std::unique_ptr<CudaBackend>(new CudaBackend(std::move(device), optimizer, dp));
}

absl::Status CudaBackend::SetTeacher(model::Llama<float>* teacher) {
  try {
    model_->SetTeacher(*teacher);
  } catch (const std::invalid_argument& e) {
    return absl::InvalidArgumentError(std::string("DMS teacher on the GPU: ") + e.what());
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::Backward(double loss_scale, bool average_gradients) {
  try {
    model_->Backward(loss_scale, average_gradients ? dp_ : nullptr);
  } catch (const std::runtime_error& e) {  // a failed TP or DP collective
    return absl::InternalError(e.what());
  }
  return absl::OkStatus();
}

absl::StatusOr<model::ForwardResult> CudaBackend::ForwardBackward(
    const int32_t* tokens, const int32_t* targets, int B, int seq_len,
    const model::StepOptions& options, double loss_scale, bool average_gradients) {
  model_->ForwardAsync(tokens, targets, B, seq_len, options);
  if (absl::Status s = Backward(loss_scale, average_gradients); !s.ok()) return s;
  try {
    return model_->ForwardResults();
  } catch (const std::runtime_error& e) {  // a failed TP collective
    return absl::InternalError(e.what());
  }
}

absl::StatusOr<double> CudaBackend::OptimizerStep(float lr) {
  model::CudaAdamWSettings s;
  s.lr = lr;
  s.beta1 = optimizer_.beta1;
  s.beta2 = optimizer_.beta2;
  s.eps = optimizer_.eps;
  s.weight_decay = optimizer_.weight_decay;
  s.grad_clip = optimizer_.grad_clip;
  try {
    return model_->OptimizerStep(s);
  } catch (const std::runtime_error& e) {  // a failed TP all-reduce of the norm
    return absl::InternalError(e.what());
  }
}

absl::Status CudaBackend::SyncToHost(model::Llama<float>* host, AdamW* optimizer) {
  try {
    model_->CopyParamsToHost(host);
    model_->OptimizerStateToHost(&optimizer->m(), &optimizer->v());
  } catch (const std::invalid_argument& e) {
    return absl::InternalError(e.what());
  }
  optimizer->set_step(model_->optimizer_step());
  return absl::OkStatus();
}

absl::Status CudaBackend::SyncFromHost(const model::Llama<float>& host, AdamW& optimizer) {
  try {
    model_->CopyParamsFromHost(host);
    model_->OptimizerStateFromHost(optimizer.m(), optimizer.v(), optimizer.step());
  } catch (const std::invalid_argument& e) {
    return absl::InternalError(e.what());
  }
  return absl::OkStatus();
}

}  // namespace dmc::trainer
