#include "inference/evaluate.h"

#include <algorithm>
#include <cmath>

#include "inference/cpu_engine.h"
#include "inference/scheduler.h"

namespace dmc::inference {
namespace {

// Predictions in all: every position of every window but its last.
long TotalPredictions(const std::vector<std::vector<int32_t>>& windows) {
  long total = 0;
  for (const auto& w : windows) total += static_cast<long>(w.size()) - 1;
  return total;
}

}  // namespace

EvalResult SummarizeEval(const CachePolicy& policy, double nll, long hits, long predictions,
                         const std::vector<double>& tokens, const std::vector<double>& slots,
                         int L, int Hkv) {
  EvalResult res;
  res.policy = policy;
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
  return res;
}

absl::StatusOr<EvalResult> Evaluate(DecodeEngine& engine,
                                    const std::vector<std::vector<int32_t>>& windows,
                                    const EvalOptions& options) {
  const model::LlamaConfig& c = engine.config();
  const int L = c.num_hidden_layers, Hkv = c.num_key_value_heads;
  std::vector<Request> requests;
  for (const auto& w : windows) {  // every position but the last fed, each scored by the next
    Request q;
    q.tokens = w;
    q.length = static_cast<int>(w.size()) - 1;
    requests.push_back(q);
  }
  const long total = TotalPredictions(windows);
  double nll = 0;
  long hits = 0, predictions = 0, max_sequence_bytes = 0;
  double sum_sequence_bytes = 0;
  std::vector<double> tokens(size_t(L) * Hkv, 0.0), slots(size_t(L) * Hkv, 0.0);
  absl::StatusOr<SchedulerStats> stats = RunBatched(
      engine, requests, options.max_batch,
      [&](int r, int pos, const TokenOutput& out) {
        nll -= out.logprob;  // of windows[r][pos + 1], the step's target
        hits += out.argmax == windows[r][pos + 1] ? 1 : 0;
        ++predictions;
        if (options.progress) options.progress(predictions, total);
        return true;
      },
      [&](int r, bool) {
        max_sequence_bytes = std::max(max_sequence_bytes, engine.bytes(r));
        sum_sequence_bytes += engine.bytes(r);
        for (int l = 0; l < L; ++l)
          for (int h = 0; h < Hkv; ++h) {
            tokens[l * Hkv + h] += engine.tokens(r);
            slots[l * Hkv + h] += engine.length(r, l, h);
          }
      });
  if (!stats.ok()) return stats.status();

  EvalResult res =
      SummarizeEval(engine.policy(), nll, hits, predictions, tokens, slots, L, Hkv);
  res.peak_kv_bytes = engine.peak_bytes();
  res.max_sequence_bytes = max_sequence_bytes;
  res.mean_sequence_bytes = sum_sequence_bytes / std::max<size_t>(1, windows.size());
  res.tokens_per_second = stats->tokens / std::max(1e-9, stats->seconds);
  res.max_concurrent = stats->max_concurrent;
  res.preemptions = stats->preemptions;
  return res;
}

absl::StatusOr<EvalResult> Evaluate(model::Llama<float>& model,
                                    const std::vector<std::vector<int32_t>>& windows,
                                    const EvalOptions& options) {
  absl::StatusOr<std::unique_ptr<CpuEngine<float>>> engine =
      CpuEngine<float>::Create(model, options.policy, options.budget_bytes, options.page_size);
  if (!engine.ok()) return engine.status();
  return Evaluate(**engine, windows, options);
}

}  // namespace dmc::inference
