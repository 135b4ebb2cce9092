#include "trainer/backend.h"

namespace dmc::trainer {

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
