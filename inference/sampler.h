// Next-token choice from logits: greedy (temperature 0), or sampling from softmax(logits / T)
// restricted to the top-p nucleus (the smallest set of most likely tokens whose probability
// reaches p). Seeded, with its own uniform draw, so a seed gives the same text on every platform.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

namespace dmc::inference {

struct SamplingOptions {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options) : opt_(options), rng_(options.seed) {}
  template <typename T>
  int32_t Sample(const T* logits, int V);

 private:
  SamplingOptions opt_;
  std::mt19937_64 rng_;
  std::vector<std::pair<double, int32_t>> probs_;
};

}  // namespace dmc::inference
