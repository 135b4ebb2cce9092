#include "trainer/backend.h"

namespace dmc::trainer {

absl::Status CpuBackend::AverageGradients(parallel::Communicator& dp) {
  if (dp.size() == 1) return absl::OkStatus();
  std::vector<float>& grads = model_->grads();
  if (absl::Status s = dp.AllReduceSum(grads.data(), grads.size()); !s.ok()) return s;
  const float inv = 1.0f / dp.size();
  for (float& g : grads) g *= inv;
  return absl::OkStatus();
}

}  // namespace dmc::trainer
