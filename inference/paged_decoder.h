// Token-by-token decoding of a batch of sequences over the paged KV cache (model/DMC.md §6): every step
// feeds one token to each of a set of sequences (each at its own position), runs the layers with
// all rows batched through the matmuls, and updates each sequence's cache by the method of
// inference/cache_policy.h. With the dmc method (and with dms on a DMS model) the logits equal
// the training-mode forward with hard decisions (Llama::Forward, DmcDecisionMode::kHard) to
// round-off.
//
// LoMA (the loma method, a LoMA model: model/loma.h): a head's slots are the memory slots of the
// finished segments, then the KVs of the current segment, each token's key rotated at its text
// position. The step whose token completes a segment (every t·c tokens) then compresses it: the
// t <m> tokens run one after another over that cache at their layout positions
// (kernels/loma_mask.h: <m> number m of chunk i at i·tc + (m+1)·c − 1), each appending its KVs
// and attending to every slot before it, and the segment's slots are removed, the t new ones
// moving down over them, its pages returned. The training mask never needs evaluating: the cache
// holds exactly what it lets a reading or memory token see (the earlier memory zones, the
// current segment and, for <m>, the earlier <m> of its event), so the logits of every token equal
// the training forward's at its reading-zone position, and after n tokens a head holds
// t·⌊n/(tc)⌋ + n mod tc slots (t·k + tc + t at the peak of a compression).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "inference/cache_policy.h"
#include "inference/paged_kv_cache.h"
#include "model/llama.h"

namespace dmc::inference {

// Cache shape for `config` under `method` (the window state only for dmc on a DMC model).
PagedCacheOptions CacheOptionsFor(const model::LlamaConfig& config, CacheMethod method,
                                  long budget_bytes, int page_size);
// The same under `policy`, with its KV quantization or ThinK (a dms cache settles a token once
// it is past the eviction window: settle_lag w + 1).
PagedCacheOptions CacheOptionsFor(const model::LlamaConfig& config, const CachePolicy& policy,
                                  long budget_bytes, int page_size);

// Adds one token's pre-RoPE key, value and importance to head (layer, h) of `seq` at position
// `pos` by `method`: dmc appends or merges (`merge`, never for the first token) and rotates the
// open slot's mean key at `pos`; the other methods append the rotated key, and dms then marks
// and evicts by the token's decision (`merge`: d_pos = 1; DmsUpdate).
template <typename T>
absl::Status CacheToken(PagedKvCache<T>& cache, const model::LlamaConfig& config, CacheMethod method,
                        int seq, int layer, int h, const T* key, const T* value, T omega,
                        bool merge, int pos);

// Parallel prefill: runs the prompt of `seq` (admitted, still empty) through the training-mode
// forward with hard decisions — every position at once — and materialises its cache from that
// pass's keys, values, importances and decisions. Returns the logits [prompt, V]; decoding then
// continues with PagedDecoder::Step. Equal to feeding the prompt token by token, to round-off.
// Only for the vanilla, dmc and dms methods (H2O and TOVA evict by each step's attention, and
// ZipCache's mixed precision ranks slots by it). The prompt's own logits see its keys and values
// at full precision; the cache it leaves is quantized as token-by-token feeding would leave it.
// Refuses
// with ResourceExhausted, changing nothing, when the budget cannot hold the prompt.
template <typename T>
absl::StatusOr<std::vector<T>> Prefill(model::Llama<T>& model, CacheMethod method,
                                       PagedKvCache<T>* cache, int seq,
                                       const std::vector<int32_t>& prompt);

template <typename T>
class PagedDecoder {
 public:
  // The model must be a single-process (tensor-parallel size 1) model; it and the cache (shaped
  // by CacheOptionsFor) must outlive the decoder.
  static absl::StatusOr<std::unique_ptr<PagedDecoder>> Create(const model::Llama<T>& model,
                                                              const CachePolicy& policy,
                                                              PagedKvCache<T>* cache);

  // Feeds tokens[i] at the next position of sequence seqs[i] (admitted to the cache, each at
  // most once); logits [n, V] gets the next-token logits, row i for seqs[i]. If the cache cannot
  // hold the step's worst-case growth, returns ResourceExhausted with nothing changed.
  absl::Status Step(const std::vector<int>& seqs, const int32_t* tokens, std::vector<T>* logits);
  // Whether the cache holds one more step of `seqs` at worst: every head opens a slot (LoMA: and
  // the t of a compression, for a sequence whose next token completes its segment).
  absl::Status CanStep(const std::vector<int>& seqs) const;
  // Chunked prefill: feeds tokens [n] to `seq` (admitted, empty or not) at its next n positions,
  // exactly as n Steps of `seq` alone would (the semantics are DecodeEngine::Prefill's), with the
  // matmuls batched over the chunk: layer by layer, token i's cache update and attention follow
  // token i − 1's. logits [V] gets the last token's next-token logits. ResourceExhausted with
  // nothing changed when the chunk's worst case (every token a slot) does not fit; a chunk past
  // max_position_embeddings or a token outside the vocabulary is InvalidArgument, and so is the
  // loma method (its compressions run between steps: feed it token by token).
  absl::Status Extend(int seq, const int32_t* tokens, int n, std::vector<T>* logits);

  PagedKvCache<T>& cache() { return *cache_; }
  const PagedKvCache<T>& cache() const { return *cache_; }
  const CachePolicy& policy() const { return policy_; }

 private:
  PagedDecoder(const model::Llama<T>& model, const CachePolicy& policy, PagedKvCache<T>* cache)
      : model_(model), policy_(policy), cache_(cache) {}
  // Feeds tokens[i] to seqs[i] at positions[i] through every layer; within a layer the rows go
  // in waves of `wave` (the last may be shorter), each updating the cache and then attending to
  // it. A step's rows are distinct sequences (one wave); a chunk's rows are one sequence's
  // consecutive tokens (waves of one). Leaves the last hidden states in x_.
  absl::Status Run(const std::vector<int>& seqs, const std::vector<int>& positions,
                   const int32_t* tokens, int wave);
  // The next-token logits [count, V] of rows first .. first + count − 1 of the last Run.
  void Logits(int first, int count, std::vector<T>* logits);
  // LoMA: the sequences of `seqs` whose last token completed a segment compress it (above).
  absl::Status CompressSegments(const std::vector<int>& seqs);
  // Adds the keys and values of `layer` of rows first_row .. to the cache: seqs[i] at
  // positions[i] from row first_row + i.
  absl::Status UpdateCache(const std::vector<int>& seqs, const int* positions, int first_row,
                           int layer);

  const model::Llama<T>& model_;
  CachePolicy policy_;
  PagedKvCache<T>* cache_;
  std::vector<T> x_, xn_, rstd_, q_, k_, v_, qr_, kr_, att_, probs_, o_, x2_, gate_, up_, h_;
  std::vector<T> logit_, alpha_, merge_, mask_, omega_;
  std::vector<T> dms_x_, dms_xn_, dms_rstd_;  // DMS: decision inputs, the adapter's norm
  std::vector<int32_t> page_table_, residual_blocks_;
  std::vector<int> lengths_, residual_lengths_;
};

}  // namespace dmc::inference
