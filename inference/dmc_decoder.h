// Token-by-token decoding of ONE sequence of a Llama with DMC heads (model/DMC.md §6): the paged decoder
// with the dmc method, over a cache whose budget holds the whole context
// (max_position_embeddings tokens), so a step can only fail past the end of the context.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "inference/paged_decoder.h"
#include "inference/paged_kv_cache.h"
#include "model/llama.h"

namespace dmc::inference {

template <typename T>
class DmcDecoder {
 public:
  // The model must be a single-process (tensor-parallel size 1) model and outlive the decoder;
  // throws std::invalid_argument otherwise.
  explicit DmcDecoder(const model::Llama<T>& model, int page_size = 16);

  // Feeds the token at the next position; returns the logits [V] of the next-token distribution.
  // Throws std::out_of_range past max_position_embeddings or for a token outside the vocabulary.
  const std::vector<T>& Step(int32_t token);

  int position() const { return cache_.tokens(kSeq); }
  const PagedKvCache<T>& cache() const { return cache_; }
  // Appends (cache slots created) of a layer's KV head so far.
  int appends(int layer, int h) const { return cache_.length(kSeq, layer, h); }

 private:
  static constexpr int kSeq = 0;
  PagedKvCache<T> cache_;
  std::unique_ptr<PagedDecoder<T>> decoder_;
  std::vector<T> logits_;
};

}  // namespace dmc::inference
