// Held-out evaluation on the GPU (dmc-eval --device=cuda): the dmc and vanilla methods by the
// CUDA model's parallel forward over whole windows instead of token-by-token decoding. The
// training-mode forward with hard decisions equals DMC decoding (the central equivalence), so the
// figures are Evaluate's (inference/evaluate.h) by the same definitions, to bf16 round-off:
//   perplexity = exp(mean next-token cross-entropy), accuracy = share of argmax hits, over every
//   position of every window but its last;
//   CR = tokens × heads / slots held at the end of each sequence, overall, per layer and per
//   (layer, KV head), the slots counted from the hard merge decisions (the first token of a
//   sequence always opens a slot);
//   KV memory = what the paged cache would hold with every window resident at once: per
//   (sequence, layer, KV head) ceil(slots / page_size) pages plus DMC's window state, in the fp32
//   elements of the cache Evaluate decodes over (KvSequenceBytes, inference/paged_kv_cache.h).
//   That is Evaluate's peak when max_batch admits every window; the budget is not applied;
//   tokens/s = tokens through the parallel forward passes per second (not a decode speed).
// Up to max_batch windows go through one forward, which bounds the host copy of the logits
// (max_batch × seq_len × vocabulary floats) and the device activations.
// h2o, tova (they evict by each step's attention) and loma (it compresses between steps) need
// token-by-token decoding and are refused, as are vanilla on a DMC model (the forward has no way
// to append every token of DMC heads) and models split by tensor parallelism.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "inference/cache_policy.h"
#include "inference/evaluate.h"
#include "model/llama.h"

namespace dmc::inference {

// OK when `method` can be evaluated on the GPU for a model of this config; otherwise
// InvalidArgument naming the method and saying to run it on the CPU. dmc-eval checks every method
// before it evaluates any.
absl::Status CudaEvalSupports(const model::LlamaConfig& config, CacheMethod method);

// windows: token windows of equal length seq_len + 1, as for Evaluate. Uses the current CUDA
// device; FailedPrecondition without one.
absl::StatusOr<EvalResult> EvaluateCuda(const model::Llama<float>& model,
                                        const std::vector<std::vector<int32_t>>& windows,
                                        const EvalOptions& options);

}  // namespace dmc::inference
