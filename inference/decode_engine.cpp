#include "inference/decode_engine.h"

#include "absl/strings/str_format.h"
#include "kernels/sample.h"

namespace dmc::inference {

absl::Status DecodeEngine::CheckLaunch(const std::vector<int>& seqs, const int32_t* tokens,
                                       const std::vector<int>* out_seqs) const {
  if (out_seqs == nullptr) {
    for (size_t i = 0; i < seqs.size(); ++i)
      if (tokens[i] < 0)
        return absl::InvalidArgumentError(absl::StrFormat(
            "sequence %d takes the previous step's choice, but no step is out", seqs[i]));
    return absl::OkStatus();
  }
  if (steps_out() >= 2)
    return absl::FailedPreconditionError("two steps are out already: collect one first");
  if (seqs != *out_seqs)
    return absl::FailedPreconditionError(
        "a step launched ahead must hold the sequences of the step out, in the same order");
  return absl::OkStatus();
}

absl::Status DecodeEngine::Launch(const std::vector<int>& seqs, const int32_t* tokens,
                                  const int32_t* targets) {
  if (absl::Status s = CheckLaunch(seqs, tokens, out_.empty() ? nullptr : &out_.back().seqs);
      !s.ok())
    return s;
  const int n = static_cast<int>(seqs.size());
  std::vector<int32_t> own(tokens, tokens + n), previous(n, kPreviousChoice);
  if (!out_.empty())
    for (int i = 0; i < n; ++i) previous[i] = out_.back().outputs[i].next;
  kernels::take_previous_choices(own.data(), previous.data(), n);
  OutStep step{seqs, {}};
  if (absl::Status s = Step(seqs, own.data(), targets, &step.outputs); !s.ok()) return s;
  out_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status DecodeEngine::Collect(std::vector<TokenOutput>* out) {
  if (out_.empty()) return absl::FailedPreconditionError("no step is out to collect");
  *out = std::move(out_.front().outputs);
  out_.pop_front();
  return absl::OkStatus();
}

absl::Status DecodeEngine::set_launch_ahead(bool on) {
  if (on)
    if (absl::Status s = CanLaunchAhead(); !s.ok()) return s;
  launch_ahead_ = on;
  return absl::OkStatus();
}

}  // namespace dmc::inference
