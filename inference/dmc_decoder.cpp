#include "inference/dmc_decoder.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace dmc::inference {
namespace {

// A cache whose budget holds every position of the context in every head, plus the window state.
template <typename T>
PagedCacheOptions WholeContextOptions(const model::LlamaConfig& c, int page_size) {
  PagedCacheOptions o = CacheOptionsFor(c, CacheMethod::kDmc, 0, page_size);
  o.budget_bytes = KvSequenceBytes<T>(
      o, std::vector<int>(static_cast<size_t>(c.num_hidden_layers) * c.num_key_value_heads,
                          c.max_position_embeddings));
  return o;
}

}  // namespace

template <typename T>
DmcDecoder<T>::DmcDecoder(const model::Llama<T>& model, int page_size)
    : cache_(WholeContextOptions<T>(model.config(), page_size)) {
  absl::StatusOr<std::unique_ptr<PagedDecoder<T>>> d =
      PagedDecoder<T>::Create(model, CachePolicy{}, &cache_);
  if (!d.ok()) throw std::invalid_argument(std::string(d.status().message()));
  decoder_ = *std::move(d);
  if (absl::Status s = cache_.AddSequence(kSeq); !s.ok())
    throw std::invalid_argument(std::string(s.message()));
}

template <typename T>
const std::vector<T>& DmcDecoder<T>::Step(int32_t token) {
  if (absl::Status s = decoder_->Step({kSeq}, &token, &logits_); !s.ok())
    throw std::out_of_range(std::string(s.message()));
  return logits_;
}

template class DmcDecoder<float>;
template class DmcDecoder<double>;

}  // namespace dmc::inference
