#include "trainer/optimizer.h"

#include <cmath>

#include "kernels/adamw.h"
#include "kernels/grad_norm.h"

namespace dmc::trainer {

AdamW::AdamW(const OptimizerConfig& config, size_t num_params)
    : config_(config), m_(num_params, 0.0f), v_(num_params, 0.0f) {}

void AdamW::Reset() {
  step_ = 0;
  std::fill(m_.begin(), m_.end(), 0.0f);
  std::fill(v_.begin(), v_.end(), 0.0f);
}

absl::StatusOr<double> AdamW::GradNorm(const model::Llama<float>& model,
                                       const std::vector<float>& grads,
                                       parallel::Communicator& tp) {
  // Replicated tensors have identical gradients on every TP rank: weight them 1/tp so the
  // all-reduce counts them once.
  double sum = 0;
  for (const auto& spec : model.param_specs()) {
    const double ss = kernels::sum_of_squares(grads.data() + spec.offset, spec.size);
    sum += spec.split_dim < 0 ? ss / tp.size() : ss;
  }
  if (tp.size() > 1)
    if (absl::Status s = tp.AllReduceSum(&sum, 1); !s.ok()) return s;
  return std::sqrt(sum);
}

absl::StatusOr<double> AdamW::Step(model::Llama<float>& model, float lr,
                                   parallel::Communicator& tp) {
  absl::StatusOr<double> norm = GradNorm(model, model.grads(), tp);
  if (!norm.ok()) return norm.status();
  float grad_scale = 1.0f;
  if (config_.grad_clip > 0 && *norm > config_.grad_clip)
    grad_scale = static_cast<float>(config_.grad_clip / *norm);
  ++step_;
  for (const auto& spec : model.param_specs()) {
    kernels::AdamWHyper hyper{lr, config_.beta1, config_.beta2, config_.eps,
                              spec.weight_decay ? config_.weight_decay : 0.0f, step_};
    kernels::adamw_update(model.params().data() + spec.offset, model.grads().data() + spec.offset,
                          m_.data() + spec.offset, v_.data() + spec.offset, spec.size, hyper,
                          grad_scale);
  }
  return norm;
}

}  // namespace dmc::trainer
