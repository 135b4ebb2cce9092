#include "inference/evaluate_cuda.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <stdexcept>
#include <string>

#include "absl/strings/str_format.h"
#include "inference/paged_decoder.h"
#include "inference/paged_kv_cache.h"
#include "kernels/cuda_ops.h"
#include "model/llama_cuda.h"

namespace dmc::inference {
namespace {

// Slots a head holds after the window: the first token opens one, then every token that does not
// merge (merge: the hard decisions [B, T, Hkv] of one layer), as CacheToken feeds the cache.
int HeadSlots(const std::vector<float>& merge, int b, int h, int T, int Hkv) {
  int slots = 1;
  for (int t = 1; t < T; ++t) slots += merge[(static_cast<size_t>(b) * T + t) * Hkv + h] > 0.5f ? 0 : 1;
  return slots;
}

}  // namespace

absl::Status CudaEvalSupports(const model::LlamaConfig& config, CacheMethod method) {
  const char* name = CacheMethodName(method);
  switch (method) {
    case CacheMethod::kDmc:
      if (config.dmc.enabled) return absl::OkStatus();
      return absl::InvalidArgumentError(
          "--device=cuda: the dmc method needs a DMC model (DMC on in its config.json)");
    case CacheMethod::kVanilla:
      if (!config.dmc.enabled) return absl::OkStatus();
      return absl::InvalidArgumentError(
          "--device=cuda: vanilla on a DMC model needs the token-by-token decoder (the parallel "
          "forward cannot make DMC heads append every token); run it on the CPU (--device=cpu)");
    case CacheMethod::kH2O:
    case CacheMethod::kTova:
      return absl::InvalidArgumentError(absl::StrFormat(
          "--device=cuda --parallel_forward: %s evicts by each step's attention and needs the "
          "token-by-token decoder; leave out --parallel_forward (the GPU engine) or run it on the "
          "CPU (--device=cpu)",
          name));
    case CacheMethod::kDms:
      return absl::InvalidArgumentError(
          "--device=cuda --parallel_forward: dms is evaluated by decoding; leave out "
          "--parallel_forward (the GPU engine) or run it on the CPU (--device=cpu)");
    case CacheMethod::kLoma:
      break;
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "--device=cuda --parallel_forward: %s compresses its cache between decoding steps; leave "
      "out --parallel_forward (the GPU engine) or run it on the CPU (--device=cpu)",
      name));
}

absl::StatusOr<EvalResult> EvaluateCuda(const model::Llama<float>& model,
                                        const std::vector<std::vector<int32_t>>& windows,
                                        const EvalOptions& options) {
  const model::LlamaConfig& c = model.config();
  const CacheMethod method = options.policy.method;
  if (absl::Status s = CudaEvalSupports(c, method); !s.ok()) return s;
  if (model.local_heads() != c.num_attention_heads)
    return absl::InvalidArgumentError(
        "--device=cuda evaluates a whole model on one GPU, not a tensor-parallel shard");
  if (windows.empty() || windows[0].size() < 2)
    return absl::InvalidArgumentError("--device=cuda: no window of at least 2 tokens to evaluate");
  for (const auto& w : windows)
    if (w.size() != windows[0].size())
      return absl::InvalidArgumentError(absl::StrFormat(
          "--device=cuda: windows of %d and %d tokens; the parallel forward needs one length",
          windows[0].size(), w.size()));
  if (options.page_size < 1)
    return absl::InvalidArgumentError(
        absl::StrFormat("page size %d: a page must hold at least one slot", options.page_size));
  if (!cuda::device_available())
    return absl::FailedPreconditionError("--device=cuda: no usable CUDA device");

  std::unique_ptr<model::LlamaCuda> gpu;
  try {
    gpu = std::make_unique<model::LlamaCuda>(c);
    gpu->CopyParamsFromHost(model);
  } catch (const std::invalid_argument& e) {  // a head dim the attention kernel does not support
    return absl::InvalidArgumentError(std::string("--device=cuda: ") + e.what());
  }

  const int L = c.num_hidden_layers, Hkv = c.num_key_value_heads, V = c.vocab_size;
  const int T = static_cast<int>(windows[0].size()) - 1, n = static_cast<int>(windows.size());
  const int batch = std::clamp(options.max_batch, 1, n);
  const bool dmc = method == CacheMethod::kDmc;
  const PagedCacheOptions cache =
      CacheOptionsFor(c, method, options.budget_bytes, options.page_size);
  model::StepOptions step;
  step.mode = kernels::DmcDecisionMode::kHard;

  const long total = static_cast<long>(n) * T;
  double nll = 0, seconds = 0;
  long hits = 0, predictions = 0, kv_bytes = 0;
  std::vector<double> tokens(size_t(L) * Hkv, 0.0), slots(size_t(L) * Hkv, 0.0);
  std::vector<int32_t> inputs, targets;
  std::vector<std::vector<float>> merges(L);
  std::vector<int> head_slots(size_t(L) * Hkv, T);
  for (int first = 0; first < n; first += batch) {
    const int B = std::min(batch, n - first);
    inputs.clear();
    targets.clear();
    for (int w = first; w < first + B; ++w) {
      inputs.insert(inputs.end(), windows[w].begin(), windows[w].end() - 1);
      targets.insert(targets.end(), windows[w].begin() + 1, windows[w].end());
    }
    const auto start = std::chrono::steady_clock::now();
    model::ForwardResult r;
    try {
      r = gpu->Forward(inputs.data(), targets.data(), B, T, step);
    } catch (const std::invalid_argument& e) {  // a window past max_position_embeddings
      return absl::InvalidArgumentError(std::string("--device=cuda: ") + e.what());
    }
    seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    nll += r.lm_loss * B * T;  // the mean over the B·T positions, all labelled

    const std::vector<float> logits = gpu->LogitsToHost();
    for (size_t i = 0; i < targets.size(); ++i) {
      const float* row = logits.data() + i * V;
      hits += std::max_element(row, row + V) - row == targets[i] ? 1 : 0;
    }
    predictions += static_cast<long>(B) * T;

    if (dmc)
      for (int l = 0; l < L; ++l) merges[l] = gpu->MergeToHost(l);
    for (int b = 0; b < B; ++b) {
      for (int l = 0; l < L; ++l)
        for (int h = 0; h < Hkv; ++h) {
          const size_t lh = size_t(l) * Hkv + h;
          if (dmc) head_slots[lh] = HeadSlots(merges[l], b, h, T, Hkv);
          tokens[lh] += T;
          slots[lh] += head_slots[lh];
        }
      kv_bytes += KvSequenceBytes<float>(cache, head_slots);
    }
    if (options.progress) options.progress(predictions, total);
  }

  EvalResult res = SummarizeEval(options.policy, nll, hits, predictions, tokens, slots, L, Hkv);
  res.peak_kv_bytes = kv_bytes;
  res.tokens_per_second = predictions / std::max(1e-9, seconds);
  res.max_concurrent = n;
  return res;
}

}  // namespace dmc::inference
