// Token-by-token decoding of ONE sequence of a LoMA-retrofitted Llama (model/loma.h): every t·c
// tokens the segment is compressed. Per layer and KV head the cache holds the memory slots of
// all finished segments plus the KVs of the current segment; once the segment holds t·c tokens,
// the t <m> tokens are run over that cache, their KVs become t new memory slots and the
// segment's KVs are dropped. After n tokens a head holds t·⌊n/(tc)⌋ + n mod tc slots.
//
// Positions and visibility are those of the training layout (kernels/loma_mask.h), so the logits
// of every token equal the training forward's logits at its reading-zone position.
#pragma once

#include <cstdint>
#include <vector>

#include "model/llama.h"
#include "model/loma.h"

namespace dmc::inference {

template <typename T>
class LomaDecoder {
 public:
  // The model must be a single-process (tensor-parallel size 1) model with DMC off whose
  // vocabulary holds the layout's special tokens, and outlive the decoder; throws
  // std::invalid_argument otherwise.
  LomaDecoder(const model::Llama<T>& model, const model::LomaLayout& layout);

  // Feeds the next text token (prompt or generated) and returns the logits [V] of the token after
  // it; the call that completes a segment also compresses it. Throws std::out_of_range past
  // max_position_embeddings or for a token outside the vocabulary.
  const std::vector<T>& Step(int32_t token);

  int position() const { return position_; }               // text tokens fed so far
  int cache_slots() const { return memory_ + segment_; }   // KV slots of each layer and KV head
  int memory_slots() const { return memory_; }
  // Most slots a head has held at once: a compression's t <m> KVs join the full segment before
  // the segment is dropped, so after k ≥ 1 compressions this is t·k + t·c.
  int peak_slots() const { return peak_slots_; }

 private:
  // Runs one token at RoPE position pos through every layer; its key and value go to cache slot
  // `slot` of every head and it attends to slots 0..slot. Leaves the final hidden state in x_.
  void Run(int32_t token, int pos, int slot);
  // The t <m> tokens over the full segment; their KVs replace the segment's.
  void Compress();

  const model::Llama<T>& model_;
  model::LomaLayout layout_;
  int capacity_;  // slots per head: every memory slot of the context + one segment + t
  std::vector<std::vector<T>> keys_, values_;  // per layer: [Hkv, capacity, D], keys rotated
  std::vector<int32_t> head_pages_;            // KV head h is page h of its layer's pool
  int memory_ = 0, segment_ = 0, position_ = 0, peak_slots_ = 0;
  std::vector<T> x_, logits_;
};

}  // namespace dmc::inference
