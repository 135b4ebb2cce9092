#include "trainer/optimizer.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_format.h"
#include "kernels/adamw.h"
#include "kernels/grad_norm.h"

namespace dmc::trainer {

namespace {

parallel::Communicator* ShardGroup(const OptimizerConfig& config, parallel::Communicator* dp) {
  return config.zero1 && dp != nullptr && dp->size() > 1 ? dp : nullptr;
}

}  // namespace

AdamW::AdamW(const OptimizerConfig& config, size_t num_params, parallel::Communicator* dp)
    : config_(config),
      num_params_(num_params),
      dp_(ShardGroup(config, dp)),
      shard_(dp_ ? model::Zero1Shard::Make(num_params, dp_->rank(), dp_->size())
                 : model::Zero1Shard::Make(num_params, 0, 1)),
      m_(shard_.slice.size, 0.0f),
      v_(shard_.slice.size, 0.0f) {}

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
    if (spec.frozen) continue;
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
  if (!norm.ok() || !std::isfinite(*norm)) return norm;
  float grad_scale = 1.0f;
  if (config_.grad_clip > 0 && *norm > config_.grad_clip)
    grad_scale = static_cast<float>(config_.grad_clip / *norm);
  ++step_;
  const size_t first = shard_.slice.begin;  // m_[i] is the moment of parameter first + i
  for (const auto& spec : model.param_specs()) {
    if (spec.frozen) continue;  // a DMS adapter model trains its adapter only
    const model::FlatRange part = shard_.Overlap(spec.offset, spec.size);
    if (part.size == 0) continue;
    kernels::AdamWHyper hyper{lr, config_.beta1, config_.beta2, config_.eps,
                              spec.weight_decay ? config_.weight_decay : 0.0f, step_};
    kernels::adamw_update(model.params().data() + part.begin, model.grads().data() + part.begin,
                          m_.data() + (part.begin - first), v_.data() + (part.begin - first),
                          part.size, hyper, grad_scale);
  }
  if (dp_)
    if (absl::Status s = dp_->AllGatherUneven(model.params().data(), shard_.counts); !s.ok())
      return s;
  return norm;
}

absl::Status AdamW::GatherMoments(std::vector<float>* m, std::vector<float>* v) const {
  for (auto [full, mine] : {std::pair{m, &m_}, std::pair{v, &v_}}) {
    full->assign(num_params_, 0.0f);
    std::copy(mine->begin(), mine->end(), full->begin() + shard_.slice.begin);
    if (dp_)
      if (absl::Status s = dp_->AllGatherUneven(full->data(), shard_.counts); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status AdamW::SetMoments(const std::vector<float>& m, const std::vector<float>& v) {
  if (m.size() != num_params_ || v.size() != num_params_)
    return absl::InvalidArgumentError(absl::StrFormat(
        "AdamW moments of %d and %d values for a model of %d parameters", m.size(), v.size(),
        num_params_));
  const auto first = static_cast<std::ptrdiff_t>(shard_.slice.begin);
  const auto last = static_cast<std::ptrdiff_t>(shard_.slice.end());
  m_.assign(m.begin() + first, m.begin() + last);
  v_.assign(v.begin() + first, v.begin() + last);
  return absl::OkStatus();
}

}  // namespace dmc::trainer
