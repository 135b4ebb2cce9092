#include "trainer/backend.h"

namespace dmc::trainer {

model::ForwardResult CpuBackend::Forward(const int32_t* tokens, const int32_t* targets, int B,
                                         int seq_len, const model::StepOptions& options) {
  if (model_->config().dms.enabled) {
    // The teacher: the frozen copy, or this model with eviction off (model/DMS.md §4).
    model::Llama<float>& teacher = teacher_ ? *teacher_ : *model_;
    if (!teacher_) model_->set_compression_enabled(false);
    model::StepOptions plain = options;
    plain.cr_prior = 0;
    teacher.Forward(tokens, targets, B, seq_len, plain);
    if (!teacher_) model_->set_compression_enabled(true);
    model_->SetDistillationTarget(teacher.logits(), teacher.lse());
  }
  return model_->Forward(tokens, targets, B, seq_len, options);
}

absl::Status CpuBackend::Backward(double loss_scale, bool average_gradients) {
  model_->Backward(loss_scale);
  if (!average_gradients || dp_->size() == 1) return absl::OkStatus();
  std::vector<float>& grads = model_->grads();
  if (absl::Status s = dp_->AllReduceSum(grads.data(), grads.size()); !s.ok()) return s;
  const float inv = 1.0f / dp_->size();
  for (float& g : grads) g *= inv;
  return absl::OkStatus();
}

}  // namespace dmc::trainer
