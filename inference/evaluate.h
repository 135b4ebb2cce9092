// Held-out evaluation of one cache method (dmc-eval): every window is decoded token by token over
// the paged cache under continuous batching; the dmc method therefore reports what the
// training-mode forward with hard decisions computes (the central equivalence), and every method
// is measured on the same path.
//   perplexity = exp(mean next-token cross-entropy), accuracy = share of argmax hits;
//   CR = tokens fed × heads / slots held at the end of each sequence (summed over sequences),
//   overall, per layer and per (layer, KV head); for DMC this is 1 / (1 − merge fraction);
//   KV memory = peak bytes the cache held (pages and window state) at the run's concurrency.
// For the loma method (a LoMA model, config.loma) every text position is scored (the reading
// zones of the training layout), and the memory peaks at each compression, when a head holds the
// segment beside its t new memory slots.
// EvaluateCuda (inference/evaluate_cuda.h) computes the dmc and vanilla figures by the CUDA
// model's parallel forward instead, by the same definitions (SummarizeEval, KvSequenceBytes).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "inference/cache_policy.h"
#include "inference/decode_engine.h"
#include "model/llama.h"

namespace dmc::inference {

struct EvalOptions {
  CachePolicy policy;
  long budget_bytes = 1L << 28;
  int page_size = 16;
  int max_batch = 16;
  // Called after every prediction with (predictions so far, predictions in all): a long
  // evaluation shows its progress through it (dmc-eval prints a line every few seconds).
  std::function<void(long done, long total)> progress;
};

struct EvalResult {
  CachePolicy policy;
  double perplexity = 0, accuracy = 0;
  long predictions = 0;
  double cr = 0;
  std::vector<double> layer_cr;  // [L]
  std::vector<double> head_cr;   // [L, Hkv]
  long peak_kv_bytes = 0;
  long max_sequence_bytes = 0;  // the most one sequence held at its end (DecodeEngine::bytes)
  double mean_sequence_bytes = 0;  // what a sequence held at its end, on average
  double tokens_per_second = 0;
  int max_concurrent = 0;
  long preemptions = 0;
};

// The figures from the sums over sequences: cross-entropy nll and argmax hits over predictions,
// tokens and slots [L, Hkv] at the end of each sequence. Shared with the GPU path
// (inference/evaluate_cuda.h), so both report by one definition.
EvalResult SummarizeEval(const CachePolicy& policy, double nll, long hits, long predictions,
                         const std::vector<double>& tokens, const std::vector<double>& slots,
                         int L, int Hkv);

// windows: token windows of seq_len + 1 (inputs and the last target), as ShardLoader yields.
// On the CPU engine; the model's activations are overwritten.
absl::StatusOr<EvalResult> Evaluate(model::Llama<float>& model,
                                    const std::vector<std::vector<int32_t>>& windows,
                                    const EvalOptions& options);

// On any engine (the CPU one, or the GPU's: inference/cuda_engine.h); options.policy,
// budget_bytes and page_size are the engine's own, max_batch and progress apply.
absl::StatusOr<EvalResult> Evaluate(DecodeEngine& engine,
                                    const std::vector<std::vector<int32_t>>& windows,
                                    const EvalOptions& options);

}  // namespace dmc::inference
