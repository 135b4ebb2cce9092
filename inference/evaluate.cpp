#include "inference/evaluate.h"

#include <algorithm>
#include <cmath>

#include "inference/paged_decoder.h"
#include "inference/scheduler.h"

namespace dmc::inference {

absl::StatusOr<EvalResult> Evaluate(const model::Llama<float>& model,
                                    const std::vector<std::vector<int32_t>>& windows,
                                    const EvalOptions& options) {
  const model::LlamaConfig& c = model.config();
  const int L = c.num_hidden_layers, Hkv = c.num_key_value_heads, V = c.vocab_size;
  PagedKvCache<float> cache(
      CacheOptionsFor(c, options.policy.method, options.budget_bytes, options.page_size));
  absl::StatusOr<std::unique_ptr<PagedDecoder<float>>> decoder =
      PagedDecoder<float>::Create(model, options.policy, &cache);
  if (!decoder.ok()) return decoder.status();

  std::vector<Request> requests;
  for (const auto& w : windows)
    requests.push_back({std::vector<int32_t>(w.begin(), w.end() - 1),
                        static_cast<int>(w.size()) - 1});
  double nll = 0;
  long hits = 0, predictions = 0;
  std::vector<double> tokens(size_t(L) * Hkv, 0.0), slots(size_t(L) * Hkv, 0.0);
  absl::StatusOr<SchedulerStats> stats = RunBatched<float>(
      **decoder, requests, options.max_batch,
      [&](int r, int pos, const float* logits) {
        const int32_t target = windows[r][pos + 1];
        const float max_l = *std::max_element(logits, logits + V);
        double sum = 0;
        for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(logits[v]) - max_l);
        nll += std::log(sum) + max_l - logits[target];
        hits += std::max_element(logits, logits + V) - logits == target ? 1 : 0;
        ++predictions;
        return kStopRequest;
      },
      [&](int r) {
        for (int l = 0; l < L; ++l)
          for (int h = 0; h < Hkv; ++h) {
            tokens[l * Hkv + h] += cache.tokens(r);
            slots[l * Hkv + h] += cache.length(r, l, h);
          }
      });
  if (!stats.ok()) return stats.status();

  EvalResult res;
  res.policy = options.policy;
  res.predictions = predictions;
  res.perplexity = std::exp(nll / std::max(1L, predictions));
  res.accuracy = static_cast<double>(hits) / std::max(1L, predictions);
  double all_tokens = 0, all_slots = 0;
  res.layer_cr.assign(L, 0.0);
  res.head_cr.assign(size_t(L) * Hkv, 0.0);
  for (int l = 0; l < L; ++l) {
    double lt = 0, ls = 0;
    for (int h = 0; h < Hkv; ++h) {
      res.head_cr[l * Hkv + h] = tokens[l * Hkv + h] / slots[l * Hkv + h];
      lt += tokens[l * Hkv + h];
      ls += slots[l * Hkv + h];
    }
    res.layer_cr[l] = lt / ls;
    all_tokens += lt;
    all_slots += ls;
  }
  res.cr = all_tokens / all_slots;
  res.peak_kv_bytes = cache.allocator().peak_bytes();
  res.tokens_per_second = stats->tokens / std::max(1e-9, stats->seconds);
  res.max_concurrent = stats->max_concurrent;
  res.preemptions = stats->preemptions;
  return res;
}

}  // namespace dmc::inference
