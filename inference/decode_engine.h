// The decoding engine: one interface over the CPU decoder (the specification: PagedDecoder over
// PagedKvCache, inference/cpu_engine.h) and the CUDA one (inference/cuda_engine.h), so that the
// scheduler and every front end (dmc-eval, dmc-generate, dmc-serve) run on either.
//
// An engine holds a model, a paged KV cache under a byte budget and a cache method. Sequences are
// admitted (AddSequence: window state reserved, first token checked against the budget), fed
// (Prefill: a prompt, or a chunk of one; Step: one token each for a batch) and freed. A step returns per
// sequence what callers use rather than the logits [n, V], which on a GPU would cost a copy:
// the next token by the sequence's SamplingOptions, a log-probability and the argmax
// (kernels/sample.h defines all three). Memory is accounted as KvSequenceBytes does, so the CPU
// and the GPU report the same bytes for the same cache content (at their storage precision).
#pragma once

#include <cstdint>
#include <deque>
#include <vector>

#include "absl/status/status.h"
#include "inference/cache_policy.h"
#include "inference/paged_kv_cache.h"
#include "model/config.h"

namespace dmc::inference {

struct SamplingOptions {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // (0, 1]
  uint64_t seed = 0;
};

struct TokenOutput {
  int32_t next = -1;     // the chosen next token
  float logprob = 0;     // log p(target) when a target was given, else log p(next)
  int32_t argmax = -1;   // the most likely next token
};

class DecodeEngine {
 public:
  virtual ~DecodeEngine() = default;

  virtual const model::LlamaConfig& config() const = 0;
  virtual const CachePolicy& policy() const = 0;
  virtual const PagedCacheOptions& cache_options() const = 0;
  // Bytes of one cache element (pages, residual blocks and the keys and values of DMC's window
  // state, the model's activations) on this engine: 4 on the CPU (fp32), 2 on the GPU (bf16); and
  // of one element of running state, DMC's importances and ThinK's query energy (the CPU model's
  // precision; fp32 on the GPU). Each engine also names them as the static kElementBytes and
  // kStateElementBytes, for plans made before it exists.
  virtual int element_bytes() const = 0;
  virtual int state_element_bytes() const = 0;

  // Admits sequence `seq` (an id not admitted): ResourceExhausted, nothing changed, when the
  // budget cannot hold its window state and first token.
  virtual absl::Status AddSequence(int seq, const SamplingOptions& sampling) = 0;
  // Returns all of its pages and reservations.
  virtual absl::Status Free(int seq) = 0;
  virtual bool contains(int seq) const = 0;
  virtual int num_sequences() const = 0;
  // Tokens fed to `seq` so far: the position of its next token.
  virtual int tokens(int seq) const = 0;
  // Whether one more token of each of `seqs` fits the budget at worst (every head opens a slot).
  virtual absl::Status CanStep(const std::vector<int>& seqs) const = 0;

  // Whether Prefill runs the prompt in one parallel pass (dmc and vanilla); H2O and TOVA evict by
  // each step's attention and LoMA compresses between steps, so their prompts go token by token
  // through Step.
  virtual bool parallel_prefill() const = 0;
  // Whether Prefill also continues a sequence that holds tokens (chunked prefill, below).
  virtual bool chunked_prefill() const = 0;
  // Feeds the tokens of `prompt` to `seq` (admitted) in one pass with hard decisions and writes
  // its compressed cache; *out is the output at the last token's position (target: scored when
  // >= 0). ResourceExhausted, nothing changed, when the budget cannot hold the tokens at worst.
  //
  // Chunked prefill: `seq` may already hold p0 tokens (an earlier chunk, or decoded ones, when
  // chunked_prefill()); the chunk x_{p0} .. x_{p0+n−1} then continues it, and the result (every
  // output, every head's slots and the cache's contents, to round-off) is exactly that of
  // feeding the chunk's tokens one by one through Step, the same hard decisions included. So a
  // prompt prefilled whole, in chunks of any sizes, or token by token leaves the same cache.
  // Position t of the chunk (p0 <= t < p0 + n) sees, per KV head:
  //   vanilla  every slot of the prefix and the chunk's keys at positions <= t.
  //   dmc      (model/DMC.md §6; α_t the hard decision of token t, α = 1 merges) the prefix's
  //            slots but its last, which is DMC's open slot: its window state holds the raw
  //            keys, values and importances of the (at most w) newest tokens merged into it.
  //            If α_{p0} = 0, the open slot is closed as it is and seen by every chunk query;
  //            if α_{p0} = 1, token p0 merges into it and it is seen only through the chunk's
  //            key k̂_{p0}. Then the chunk's k̂_i, p0 <= i <= t, under the hard mask: k̂_i is
  //            seen by t iff i = t or α_{i+1} = 0 (the slot closed at i). k̂_i is the
  //            ω-weighted mean of the run of merged tokens ending at i (tokens j <= i with
  //            α_{j+1..i} all 1), truncated to its w newest tokens; a run that reaches back to
  //            p0 with α_{p0} = 1 continues into the window state's tokens. k̂_i is rotated at
  //            position i, the value v̂_i likewise averaged, not rotated. Per head the prefix
  //            part is thus its first length − α_{p0} slots (α_{p0} = 0 for p0 = 0).
  //   dms      (model/DMS.md §3, §5; d_t the hard decision of token t, which marks token t − 1) the
  //            hard mask of the whole sequence: key j <= t is seen iff t − j <= w or
  //            d_{j+1} = 0, across the chunk boundary: the prefix's held slots include its last
  //            w + 1 tokens with their marks, a marked one leaves when a chunk query is more
  //            than w past it, and d_{p0} marks the prefix's last token p0 − 1.
  // Then the cache holds what Step would leave: dmc's window state is that of the run open
  // at the chunk's end, dms's marks those of its last w + 1 tokens.
  virtual absl::Status Prefill(int seq, const std::vector<int32_t>& prompt, int32_t target,
                               TokenOutput* out) = 0;
  // Feeds tokens[i] to seqs[i] (each admitted, at most once); targets null or [n] (< 0: none).
  // out gets one entry per sequence. ResourceExhausted with nothing changed when the step's
  // worst-case growth does not fit; InvalidArgument for a token outside the vocabulary;
  // OutOfRange for a sequence at max_position_embeddings.
  virtual absl::Status Step(const std::vector<int>& seqs, const int32_t* tokens,
                            const int32_t* targets, std::vector<TokenOutput>* out) = 0;

  // Steps launched ahead, so that a GPU engine overlaps the host's work between two steps (the
  // outputs' delivery, the scheduler's bookkeeping, the callers' callbacks) with the device's:
  // Launch starts a step as Step does and returns; Collect waits for the oldest step launched and
  // not collected (`out`: its outputs, as Step's). While a step is out, the only other call
  // allowed is a Launch of the same sequences in the same order (two steps out at most), each of
  // whose tokens may be kPreviousChoice: the `next` token that sequence's step out will choose,
  // read on the device. tokens(seq) counts the launched tokens. The engine's state is that of
  // the steps one after the other: a step launched ahead computes exactly what Step would.
  // This default runs Step at Launch; an engine that overlaps overrides all three.
  static constexpr int32_t kPreviousChoice = -1;
  virtual absl::Status Launch(const std::vector<int>& seqs, const int32_t* tokens,
                              const int32_t* targets);
  virtual absl::Status Collect(std::vector<TokenOutput>* out);
  virtual int steps_out() const { return static_cast<int>(out_.size()); }
  // Whether the scheduler launches each step ahead of the previous one's delivery on this engine
  // (inference/scheduler.h); set_launch_ahead(true) refuses, with CanLaunchAhead's reason, an
  // engine whose cache method cannot.
  virtual absl::Status CanLaunchAhead() const { return absl::OkStatus(); }
  absl::Status set_launch_ahead(bool on);
  bool launch_ahead() const { return launch_ahead_; }

  // Slots of head (layer, h) of `seq`; bytes of `seq` (KvSequenceBytes); the cache's totals.
  virtual int length(int seq, int layer, int h) const = 0;
  // Slots of every head of `seq` together (an engine that knows the sum overrides the walk).
  virtual long slots(int seq) const {
    long sum = 0;
    for (int l = 0; l < config().num_hidden_layers; ++l)
      for (int h = 0; h < config().num_key_value_heads; ++h) sum += length(seq, l, h);
    return sum;
  }
  virtual long bytes(int seq) const = 0;
  virtual long used_bytes() const = 0;
  virtual long peak_bytes() const = 0;
  long budget_bytes() const { return cache_options().budget_bytes; }

 protected:
  // The rules of Launch (above), for every engine: OK, or why not. out_seqs: the sequences of
  // the newest step out, null when none is.
  absl::Status CheckLaunch(const std::vector<int>& seqs, const int32_t* tokens,
                           const std::vector<int>* out_seqs) const;

 private:
  struct OutStep {
    std::vector<int> seqs;
    std::vector<TokenOutput> outputs;
  };
  std::deque<OutStep> out_;  // the default Launch's steps, computed and not collected
  bool launch_ahead_ = false;
};

}  // namespace dmc::inference
