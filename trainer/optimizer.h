// AdamW over the model's flat parameter buffer, with global-norm gradient clipping. Moments are
// fp32 and laid out like the parameters, so a checkpoint stores them next to the weights.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "model/llama.h"
#include "parallel/communicator.h"

namespace dmc::trainer {

struct OptimizerConfig {
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;
  float grad_clip = 1.0f;  // max global L2 norm; <= 0 disables clipping
};

class AdamW {
 public:
  AdamW(const OptimizerConfig& config, size_t num_params);

  // Global L2 norm of the gradients of the whole model. tp is the tensor-parallel group: sharded
  // tensors are summed over it, replicated ones counted once.
  static absl::StatusOr<double> GradNorm(const model::Llama<float>& model,
                                         const std::vector<float>& grads,
                                         parallel::Communicator& tp);

  // One update at learning rate lr; returns the gradient norm before clipping.
  absl::StatusOr<double> Step(model::Llama<float>& model, float lr, parallel::Communicator& tp);

  // Forget the moments (between DMC stages, as the reference does).
  void Reset();

  int step() const { return step_; }
  void set_step(int step) { step_ = step; }
  std::vector<float>& m() { return m_; }
  std::vector<float>& v() { return v_; }

 private:
  OptimizerConfig config_;
  int step_ = 0;  // updates taken since the last Reset
  std::vector<float> m_, v_;
};

}  // namespace dmc::trainer
