#include "inference/sampler.h"

#include <algorithm>
#include <cmath>

namespace dmc::inference {

template <typename T>
int32_t Sampler::Sample(const T* logits, int V) {
  if (opt_.temperature <= 0.0f)  // greedy, ties to the lowest id
    return static_cast<int32_t>(std::max_element(logits, logits + V) - logits);
  const double max_l = *std::max_element(logits, logits + V);
  probs_.resize(V);
  double sum = 0;
  for (int v = 0; v < V; ++v) {
    probs_[v] = {std::exp((logits[v] - max_l) / opt_.temperature), v};
    sum += probs_[v].first;
  }
  // Most likely first (ties to the lower id), then cut at the nucleus.
  std::sort(probs_.begin(), probs_.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  size_t keep = 0;
  double mass = 0;
  while (keep < probs_.size() && (keep == 0 || mass < opt_.top_p * sum)) mass += probs_[keep++].first;
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * mass;
  double acc = 0;
  for (size_t i = 0; i < keep; ++i)
    if ((acc += probs_[i].first) > u) return probs_[i].second;
  return probs_[keep - 1].second;
}

template int32_t Sampler::Sample<float>(const float*, int);
template int32_t Sampler::Sample<double>(const double*, int);

}  // namespace dmc::inference
