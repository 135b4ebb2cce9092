// LoMA decoding (spec: inference/loma_decoder.h). Each layer's cache is a paged pool with one page
// per KV head holding [memory slots | segment slots], so one token's attention is the plain
// paged decode kernel over slots 0..slot: the training mask never needs evaluating here, because
// the cache holds exactly what the mask lets a reading or memory token see (the earlier memory
// zones, the current segment and, for <m>, the earlier <m> of the same event).
//
// The t <m> tokens of a compression event run one after another rather than as one t-token pass:
// the memory zone is causal, so the result is the same and one code path serves both.
#include "inference/loma_decoder.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "absl/strings/str_format.h"
#include "kernels/decode_attention.h"
#include "kernels/embedding.h"
#include "kernels/matmul.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"

namespace dmc::inference {
namespace k = dmc::kernels;

template <typename T>
LomaDecoder<T>::LomaDecoder(const model::Llama<T>& model, const model::LomaLayout& layout)
    : model_(model), layout_(layout) {
  const model::LlamaConfig& c = model.config();
  const kernels::LomaZones& z = layout.zones;
  if (model.local_heads() != c.num_attention_heads)
    throw std::invalid_argument("the LoMA decoder needs a tensor-parallel size 1 model");
  if (c.dmc.enabled) throw std::invalid_argument("the LoMA decoder needs a model with DMC off");
  if (z.t < 1 || z.c < 1 || layout.memory_token >= c.vocab_size ||
      layout.repetition_token >= c.vocab_size)
    throw std::invalid_argument(absl::StrFormat(
        "LoMA layout (t %d, c %d, <m> %d, <r> %d) does not fit a model of %d tokens", z.t, z.c,
        layout.memory_token, layout.repetition_token, c.vocab_size));
  capacity_ = c.max_position_embeddings / z.segment() * z.t + z.segment() + z.t;
  const size_t pool = static_cast<size_t>(c.num_key_value_heads) * capacity_ * c.head_dim();
  keys_.assign(c.num_hidden_layers, std::vector<T>(pool));
  values_.assign(c.num_hidden_layers, std::vector<T>(pool));
  for (int h = 0; h < c.num_key_value_heads; ++h) head_pages_.push_back(h);
}

template <typename T>
void LomaDecoder<T>::Run(int32_t token, int pos, int slot) {
  const model::LlamaConfig& c = model_.config();
  const int C = c.hidden_size, D = c.head_dim(), H = c.num_attention_heads;
  const int Hkv = c.num_key_value_heads, F = c.intermediate_size;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  std::vector<T> xn(C), rstd(1), q(H * D), kv(Hkv * D), att(H * D), o(C), x2(C);
  std::vector<T> gate(F), up(F), h(F);
  const std::vector<int> lengths(Hkv, slot + 1);
  peak_slots_ = std::max(peak_slots_, slot + 1);
  x_.resize(C);
  k::embedding_forward(x_.data(), &token, model_.embedding(), 1, C);
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const auto w = model_.layer(l);
    k::rmsnorm_forward(xn.data(), rstd.data(), x_.data(), w.attn_norm, 1, C, c.rms_norm_eps);
    k::matmul_forward(q.data(), xn.data(), w.wq, 1, C, H * D);
    k::rope_forward(q.data(), q.data(), 1, 1, H, D, pos, c.rope_theta, false);
    // this token's rotated key and its value into slot `slot` of every head's page
    k::matmul_forward(kv.data(), xn.data(), w.wk, 1, C, Hkv * D);
    k::rope_forward(kv.data(), kv.data(), 1, 1, Hkv, D, pos, c.rope_theta, false);
    for (int hk = 0; hk < Hkv; ++hk)
      std::copy(kv.begin() + hk * D, kv.begin() + (hk + 1) * D,
                keys_[l].begin() + (static_cast<size_t>(hk) * capacity_ + slot) * D);
    k::matmul_forward(kv.data(), xn.data(), w.wv, 1, C, Hkv * D);
    for (int hk = 0; hk < Hkv; ++hk)
      std::copy(kv.begin() + hk * D, kv.begin() + (hk + 1) * D,
                values_[l].begin() + (static_cast<size_t>(hk) * capacity_ + slot) * D);
    k::paged_decode_attention(att.data(), static_cast<T*>(nullptr), 0, q.data(), keys_[l].data(),
                              values_[l].data(), head_pages_.data(), lengths.data(), 1, capacity_,
                              1, H, Hkv, D, false, scale);
    k::matmul_forward(o.data(), att.data(), w.wo, 1, H * D, C);
    for (int i = 0; i < C; ++i) x2[i] = x_[i] + o[i];
    model_.MlpForward(l, x2.data(), x_.data(), 1, rstd.data(), xn.data(), gate.data(), up.data(),
                      h.data());
  }
}

template <typename T>
void LomaDecoder<T>::Compress() {
  const model::LlamaConfig& c = model_.config();
  const kernels::LomaZones& z = layout_.zones;
  const int D = c.head_dim(), tc = z.segment();
  const int chunk = position_ / tc - 1;  // the segment just completed
  for (int m = 0; m < z.t; ++m) {
    const int layout_pos = chunk * z.chunk() + tc + m;  // <m> number m of this chunk
    Run(layout_.memory_token, kernels::loma_position(layout_pos, z), memory_ + tc + m);
  }
  // the new memory slots move down over the dropped segment
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (auto* pool : {&keys_[l], &values_[l]})
      for (int hk = 0; hk < c.num_key_value_heads; ++hk) {
        auto head = pool->begin() + static_cast<size_t>(hk) * capacity_ * D;
        std::copy(head + static_cast<size_t>(memory_ + tc) * D,
                  head + static_cast<size_t>(memory_ + tc + z.t) * D,
                  head + static_cast<size_t>(memory_) * D);
      }
  memory_ += z.t;
  segment_ = 0;
}

template <typename T>
const std::vector<T>& LomaDecoder<T>::Step(int32_t token) {
  const model::LlamaConfig& c = model_.config();
  if (position_ >= c.max_position_embeddings)
    throw std::out_of_range(absl::StrFormat("position %d is past max_position_embeddings %d",
                                            position_, c.max_position_embeddings));
  if (token < 0 || token >= c.vocab_size)
    throw std::out_of_range(absl::StrFormat("token %d outside the vocabulary of %d", token,
                                            c.vocab_size));
  Run(token, position_, memory_ + segment_);
  ++segment_;
  ++position_;
  std::vector<T> xn(c.hidden_size), rstd(1);
  k::rmsnorm_forward(xn.data(), rstd.data(), x_.data(), model_.final_norm(), 1, c.hidden_size,
                     c.rms_norm_eps);
  logits_.resize(c.vocab_size);
  k::matmul_forward(logits_.data(), xn.data(), model_.lm_head(), 1, c.hidden_size, c.vocab_size);
  if (segment_ == layout_.zones.segment()) Compress();
  return logits_;
}

template class LomaDecoder<float>;
template class LomaDecoder<double>;

}  // namespace dmc::inference
