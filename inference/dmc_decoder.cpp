#include "inference/dmc_decoder.h"

#include <stdexcept>
#include <string>

#include "inference/dmc_window.h"

namespace dmc::inference {
namespace {

// Bytes that hold every position of the context in every head, plus the window state.
template <typename T>
long WholeContextBytes(const model::LlamaConfig& c, int page_size) {
  const long heads = static_cast<long>(c.num_hidden_layers) * c.num_key_value_heads;
  const long pages = (c.max_position_embeddings + page_size - 1) / page_size;
  return heads * (pages * page_size * 2 * c.head_dim() * static_cast<long>(sizeof(T)) +
                  DmcWindow<T>::Bytes(c.dmc.window, c.head_dim()));
}

}  // namespace

template <typename T>
DmcDecoder<T>::DmcDecoder(const model::Llama<T>& model, int page_size)
    : cache_(CacheOptionsFor(model.config(), CacheMethod::kDmc,
                             WholeContextBytes<T>(model.config(), page_size), page_size)) {
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
