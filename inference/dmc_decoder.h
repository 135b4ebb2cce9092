// Token-by-token decoding of a Llama with DMC heads over a real per-head cache (spec §6): the
// inference path whose outputs must equal the training-mode forward with hard decisions.
#pragma once

#include <cstdint>
#include <vector>

#include "inference/dmc_cache.h"
#include "model/llama.h"

namespace dmc::inference {

template <typename T>
class DmcDecoder {
 public:
  // The model must be a single-process (tensor-parallel size 1) model and outlive the decoder.
  explicit DmcDecoder(const model::Llama<T>& model);

  // Feeds the token at the next position; returns the logits [V] of the next-token distribution.
  const std::vector<T>& Step(int32_t token);

  int position() const { return position_; }
  const DmcCache<T>& cache() const { return cache_; }
  // Appends (cache slots created) per layer and KV head so far.
  int appends(int layer, int h) const { return cache_.length(layer, h); }

 private:
  const model::Llama<T>& model_;
  DmcCache<T> cache_;
  int position_ = 0;
  std::vector<T> x_, xn_, rstd_, q_, k_, v_, qr_, att_, o_, x2_, gate_, up_, h_, logits_;
  std::vector<T> logit_, alpha_, merge_, mask_, omega_;
};

}  // namespace dmc::inference
