#include "inference/evaluate.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_format.h"
#include "inference/loma_decoder.h"
#include "inference/cpu_engine.h"
#include "inference/scheduler.h"

namespace dmc::inference {
namespace {

// Adds the cross-entropy of target under logits [V] to *nll and an argmax hit to *hits.
void Score(const float* logits, int V, int32_t target, double* nll, long* hits) {
  const float max_l = *std::max_element(logits, logits + V);
  double sum = 0;
  for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(logits[v]) - max_l);
  *nll += std::log(sum) + max_l - logits[target];
  *hits += std::max_element(logits, logits + V) - logits == target ? 1 : 0;
}

// The loma method: up to max_batch LomaDecoders at a time, stepped in lockstep over their
// windows, so with windows of equal length their cache peaks coincide and KV memory is the sum
// of their peaks (keys and values of every layer and KV head, no paging).
// Predictions in all: every position of every window but its last.
long TotalPredictions(const std::vector<std::vector<int32_t>>& windows) {
  long total = 0;
  for (const auto& w : windows) total += static_cast<long>(w.size()) - 1;
  return total;
}

absl::StatusOr<EvalResult> EvaluateLoma(const model::Llama<float>& model,
                                        const std::vector<std::vector<int32_t>>& windows,
                                        const EvalOptions& options) {
  const model::LlamaConfig& c = model.config();
  if (!c.loma.enabled())
    return absl::InvalidArgumentError(
        "the loma method needs a LoMA model (a config with \"loma\" settings)");
  const int L = c.num_hidden_layers, Hkv = c.num_key_value_heads, V = c.vocab_size;
  const long slot_bytes = 2L * L * Hkv * c.head_dim() * static_cast<long>(sizeof(float));
  const int batch = std::max(1, std::min<int>(options.max_batch, windows.size()));
  const long total = TotalPredictions(windows);
  double nll = 0;
  long hits = 0, predictions = 0, fed = 0, peak_bytes = 0;
  std::vector<double> tokens(size_t(L) * Hkv, 0.0), slots(size_t(L) * Hkv, 0.0);
  const auto start = std::chrono::steady_clock::now();
  try {
    for (size_t first = 0; first < windows.size(); first += batch) {
      const size_t end = std::min(windows.size(), first + batch);
      std::vector<LomaDecoder<float>> decoders;
      decoders.reserve(end - first);
      for (size_t w = first; w < end; ++w) decoders.emplace_back(model, c.loma);
      size_t longest = 0;
      for (size_t w = first; w < end; ++w) longest = std::max(longest, windows[w].size() - 1);
      for (size_t pos = 0; pos < longest; ++pos)
        for (size_t w = first; w < end; ++w) {
          if (pos + 1 >= windows[w].size()) continue;
          const std::vector<float>& logits = decoders[w - first].Step(windows[w][pos]);
          Score(logits.data(), V, windows[w][pos + 1], &nll, &hits);
          ++predictions;
          ++fed;
          if (options.progress) options.progress(predictions, total);
        }
      long held = 0;
      for (const LomaDecoder<float>& d : decoders) {
        held += d.peak_slots() * slot_bytes;
        for (double& x : tokens) x += d.position();
        for (double& x : slots) x += d.cache_slots();
      }
      peak_bytes = std::max(peak_bytes, held);
    }
  } catch (const std::exception& e) {  // a window past max_position_embeddings, a bad token
    return absl::InvalidArgumentError(std::string("loma: ") + e.what());
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (peak_bytes > options.budget_bytes)
    return absl::ResourceExhaustedError(absl::StrFormat(
        "loma: %d concurrent sequences held %ld bytes of KV cache, over the budget of %ld "
        "(lower --max_batch or raise --kv_budget_mb)",
        batch, peak_bytes, options.budget_bytes));
  EvalResult res = SummarizeEval(options.policy, nll, hits, predictions, tokens, slots, L, Hkv);
  res.peak_kv_bytes = peak_bytes;
  res.tokens_per_second = fed / std::max(1e-9, seconds);
  res.max_concurrent = batch;
  return res;
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
  if (options.policy.method == CacheMethod::kLoma) return EvaluateLoma(model, windows, options);
  absl::StatusOr<std::unique_ptr<CpuEngine<float>>> engine =
      CpuEngine<float>::Create(model, options.policy, options.budget_bytes, options.page_size);
  if (!engine.ok()) return engine.status();
  return Evaluate(**engine, windows, options);
}

}  // namespace dmc::inference
