#include "inference/kv_sharer.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "absl/strings/str_format.h"
#include "inference/cpu_engine.h"
#include "inference/scheduler.h"

namespace dmc::inference {
namespace {

// The logits of every position of every window [windows, T, V], decoded under `policy`.
absl::StatusOr<std::vector<float>> WindowLogits(model::Llama<float>& model,
                                                const CachePolicy& policy,
                                                const std::vector<std::vector<int32_t>>& windows,
                                                int page_size) {
  const int V = model.config().vocab_size;
  absl::StatusOr<std::unique_ptr<CpuEngine<float>>> engine =
      CpuEngine<float>::Create(model, policy, 1L << 40, page_size);
  if (!engine.ok()) return engine.status();
  std::vector<Request> requests(windows.size());
  for (size_t w = 0; w < windows.size(); ++w) {
    requests[w].tokens = windows[w];
    requests[w].length = static_cast<int>(windows[w].size());
  }
  const size_t T = windows[0].size();
  std::vector<float> logits(windows.size() * T * V);
  const CpuEngine<float>& e = **engine;
  absl::StatusOr<SchedulerStats> stats = RunBatched(
      **engine, requests, static_cast<int>(windows.size()),
      [&](int r, int pos, const TokenOutput&) {
        std::copy_n(e.last_logits(r), V, logits.begin() + (r * T + pos) * V);
        return true;
      },
      [](int, bool) {});
  if (!stats.ok()) return stats.status();
  return logits;
}

// Mean over positions of the cosine similarity of two logit rows.
double MeanCosine(const std::vector<float>& a, const std::vector<float>& b, int V) {
  double total = 0;
  const size_t rows = a.size() / V;
  for (size_t r = 0; r < rows; ++r) {
    double ab = 0, aa = 0, bb = 0;
    for (int v = 0; v < V; ++v) {
      ab += double(a[r * V + v]) * b[r * V + v];
      aa += double(a[r * V + v]) * a[r * V + v];
      bb += double(b[r * V + v]) * b[r * V + v];
    }
    total += ab / std::sqrt(std::max(1e-300, aa * bb));
  }
  return total / rows;
}

}  // namespace

absl::StatusOr<std::vector<double>> KvSharerLayerDistances(
    model::Llama<float>& model, const std::vector<std::vector<int32_t>>& windows) {
  const model::LlamaConfig& c = model.config();
  if (c.compression_enabled() || model.local_heads() != c.num_attention_heads)
    return absl::InvalidArgumentError(
        "KVSharer calibrates on a single-process model without DMC or DMS compression");
  if (windows.empty()) return absl::InvalidArgumentError("KVSharer needs calibration windows");
  const int L = c.num_hidden_layers;
  std::vector<std::vector<double>> mean(L);
  for (const std::vector<int32_t>& w : windows) {
    if (w.size() != windows[0].size())
      return absl::InvalidArgumentError("KVSharer: calibration windows of unequal lengths");
    const std::vector<int32_t> no_targets(w.size(), -1);
    model.Forward(w.data(), no_targets.data(), 1, static_cast<int>(w.size()),
                  model::StepOptions{});
    for (int l = 0; l < L; ++l) {
      const std::vector<float>& k = model.rotated_keys(l);
      const std::vector<float>& v = model.values(l);
      mean[l].resize(k.size() + v.size(), 0.0);
      for (size_t i = 0; i < k.size(); ++i) mean[l][i] += k[i] / windows.size();
      for (size_t i = 0; i < v.size(); ++i) mean[l][k.size() + i] += v[i] / windows.size();
    }
  }
  std::vector<double> distance(size_t(L) * L, 0.0);
  for (int a = 0; a < L; ++a)
    for (int b = 0; b < L; ++b) {
      double d2 = 0;
      for (size_t i = 0; i < mean[a].size(); ++i)
        d2 += (mean[a][i] - mean[b][i]) * (mean[a][i] - mean[b][i]);
      distance[size_t(a) * L + b] = std::sqrt(d2);
    }
  return distance;
}

absl::StatusOr<std::vector<std::pair<int, int>>> CalibrateKvSharer(
    model::Llama<float>& model, const std::vector<std::vector<int32_t>>& windows, int page_size,
    double threshold) {
  absl::StatusOr<std::vector<double>> distance = KvSharerLayerDistances(model, windows);
  if (!distance.ok()) return distance.status();
  const int L = model.config().num_hidden_layers, V = model.config().vocab_size;
  std::vector<std::pair<int, int>> pairs;  // (layer, source), source < layer
  for (int l = 1; l < L; ++l)
    for (int s = 0; s < l; ++s) pairs.push_back({l, s});
  std::stable_sort(pairs.begin(), pairs.end(), [&](auto a, auto b) {
    return (*distance)[a.first * L + a.second] > (*distance)[b.first * L + b.second];
  });
  CachePolicy policy;
  policy.method = CacheMethod::kVanilla;
  absl::StatusOr<std::vector<float>> reference = WindowLogits(model, policy, windows, page_size);
  if (!reference.ok()) return reference.status();
  policy.kv_source.resize(L);
  std::iota(policy.kv_source.begin(), policy.kv_source.end(), 0);
  std::vector<std::pair<int, int>> accepted;
  for (auto [layer, source] : pairs) {
    if (static_cast<int>(accepted.size()) == L - 1) break;
    const bool source_shares = policy.kv_source[source] != source;
    // A layer that shares, or whose cache another layer reads, stays as it is.
    const bool layer_taken =
        policy.kv_source[layer] != layer ||
        std::count(policy.kv_source.begin(), policy.kv_source.end(), layer) > 1;
    if (source_shares || layer_taken) continue;
    policy.kv_source[layer] = source;
    absl::StatusOr<std::vector<float>> logits = WindowLogits(model, policy, windows, page_size);
    if (!logits.ok()) return logits.status();
    if (MeanCosine(*reference, *logits, V) >= threshold) {
      accepted.push_back({layer, source});
    } else {
      policy.kv_source[layer] = layer;
    }
  }
  return accepted;
}

}  // namespace dmc::inference
